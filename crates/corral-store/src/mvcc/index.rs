//! The newest live version of every key, in memory (etcd keeps the same in its keyIndex).
//!
//! Writes look a key up here instead of seeking through the engine: a key that does not
//! exist costs no I/O at all, and a put that needs no previous value (no prev_kv asked, by
//! the client or by a watcher) costs none either, since the index keeps each newest
//! version's create revision, version and lease; the value is a point read of the exact
//! version, which the engine's bloom filters make cheap. Only the writer uses it; it is rebuilt from
//! the engine at open and after a snapshot is installed, and updated after each batch is
//! written, so it always matches the last written revision.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use super::Record;
use super::keys::{decode_user_key, version_key};
use super::read::{KeyRange, RangeEnd, scan};
use crate::engine::{Cf, EngineError, View};

#[derive(Debug, Default)]
pub(crate) struct KeyIndex {
    /// Live key → its newest version.
    keys: BTreeMap<Vec<u8>, Newest>,
}

/// A key's newest live version, without its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Newest {
    /// Its mod revision.
    pub rev: i64,
    pub create_rev: i64,
    pub version: i64,
    pub lease: i64,
}

impl Newest {
    pub fn of(rev: i64, record: &Record) -> Option<Self> {
        match record {
            Record::Live { create_rev, version, lease, .. } => {
                Some(Newest { rev, create_rev: *create_rev, version: *version, lease: *lease })
            }
            Record::Tombstone => None,
        }
    }
}

impl KeyIndex {
    /// Reads the newest version of every key in `view` (tombstoned keys are left out).
    pub fn build(view: &dyn View) -> Result<Self, EngineError> {
        let mut keys = BTreeMap::new();
        let everything = KeyRange { start: Vec::new(), end: RangeEnd::Unbounded };
        scan(view, &everything, i64::MAX, |user_enc, rev, raw| {
            if let Some(newest) = Newest::of(rev, &Record::decode(raw)?) {
                let key = decode_user_key(user_enc)
                    .ok_or_else(|| EngineError::Corrupt { cf: Cf::Kv, what: "bad user key".into() })?;
                keys.insert(key, newest);
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The newest version of `key`, read from `view`, if the key is live.
    pub fn get(&self, view: &dyn View, key: &[u8]) -> Result<Option<(i64, Record)>, EngineError> {
        match self.keys.get(key) {
            Some(newest) => read_version(view, key, newest.rev).map(|r| Some((newest.rev, r))),
            None => Ok(None),
        }
    }

    /// The newest version of `key` without its value, if the key is live.
    pub fn newest(&self, key: &[u8]) -> Option<Newest> {
        self.keys.get(key).copied()
    }

    /// The live keys in `range` with their newest versions, in key order.
    pub fn live_in(&self, view: &dyn View, range: &KeyRange) -> Result<Vec<(Vec<u8>, i64, Record)>, EngineError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let start = Included(range.start.clone());
        let bounds = match &range.end {
            RangeEnd::Single => (start.clone(), Included(range.start.clone())),
            RangeEnd::Before(end) => (start, Excluded(end.clone())),
            RangeEnd::Unbounded => (start, Unbounded),
        };
        self.keys
            .range::<Vec<u8>, _>(bounds)
            .map(|(key, newest)| Ok((key.clone(), newest.rev, read_version(view, key, newest.rev)?)))
            .collect()
    }

    /// Records a written version: a live one replaces the key's entry, a tombstone removes it.
    pub fn set(&mut self, key: Vec<u8>, rev: i64, record: &Record) {
        match Newest::of(rev, record) {
            Some(newest) => {
                self.keys.insert(key, newest);
            }
            None => {
                self.keys.remove(&key);
            }
        }
    }
}

/// One exact version of a key, which the index says exists.
fn read_version(view: &dyn View, key: &[u8], rev: i64) -> Result<Record, EngineError> {
    let raw = view.get(Cf::Kv, &version_key(key, rev))?.ok_or_else(|| EngineError::Corrupt {
        cf: Cf::Kv,
        what: format!("the key index names revision {rev} of a key that has no such version"),
    })?;
    Record::decode(&raw)
}
