//! See the files under tests/tests/.
