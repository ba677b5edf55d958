//! Order-preserving encodings of the MVCC column families' keys.
//!
//! `Kv`: `enc(user_key) ‖ !main_rev (u64 BE)`, so all versions of a key are adjacent, newest
//! first, and a seek to `enc(key) ‖ !rev` lands on the newest version at or below `rev`.
//! `enc` escapes 0x00 as 0x00 0xFF and ends with 0x00 0x01, which keeps byte order between
//! user keys and never lets one key's encoding be a prefix of another's.
//!
//! `Rev`: `main (u64 BE) ‖ sub (u32 BE)`: the order in which events happened.

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;

/// Encodes a user key for the `Kv` column family.
pub fn encode_user_key(key: &[u8], out: &mut Vec<u8>) {
    out.reserve(key.len() + 10);
    for &b in key {
        out.push(b);
        if b == ESCAPE {
            out.push(ESCAPED_ZERO);
        }
    }
    out.push(ESCAPE);
    out.push(TERMINATOR);
}

/// `enc(key) ‖ !rev`: where the newest version of `key` at or below `rev` sorts.
pub fn version_key(key: &[u8], rev: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    encode_user_key(key, &mut out);
    out.extend_from_slice(&(!(rev as u64)).to_be_bytes());
    out
}

/// A key that sorts after every version of `key` and before the next user key.
pub fn after_versions(encoded_user_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_user_key.len() + 8);
    out.extend_from_slice(encoded_user_key);
    out.extend_from_slice(&[0xFF; 8]);
    out
}

/// Splits a `Kv` key into the encoded user key (with its terminator) and the revision.
pub fn split_version_key(raw: &[u8]) -> Option<(&[u8], i64)> {
    if raw.len() < 10 {
        return None;
    }
    let (enc, rev) = raw.split_at(raw.len() - 8);
    let inverted = u64::from_be_bytes(rev.try_into().ok()?);
    Some((enc, (!inverted) as i64))
}

/// Decodes an encoded user key (terminator included).
pub fn decode_user_key(enc: &[u8]) -> Option<Vec<u8>> {
    let body = enc.strip_suffix(&[ESCAPE, TERMINATOR])?;
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        out.push(body[i]);
        if body[i] == ESCAPE {
            if body.get(i + 1) != Some(&ESCAPED_ZERO) {
                return None;
            }
            i += 1;
        }
        i += 1;
    }
    Some(out)
}

/// The `Rev` column family's key for an event.
pub fn rev_key(main: i64, sub: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&(main as u64).to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

pub fn split_rev_key(raw: &[u8]) -> Option<(i64, u32)> {
    if raw.len() != 12 {
        return None;
    }
    let main = u64::from_be_bytes(raw[..8].try_into().ok()?) as i64;
    let sub = u32::from_be_bytes(raw[8..].try_into().ok()?);
    Some((main, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(key: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_user_key(key, &mut out);
        out
    }

    #[test]
    fn encoding_keeps_byte_order() {
        let keys: Vec<&[u8]> =
            vec![b"", b"\0", b"\0\0", b"\0a", b"a", b"a\0", b"a\0\0", b"a\x01", b"ab", b"b", b"\xff"];
        for pair in keys.windows(2) {
            assert!(enc(pair[0]) < enc(pair[1]), "{:?} < {:?}", pair[0], pair[1]);
            assert!(after_versions(&enc(pair[0])) < enc(pair[1]));
        }
        for key in keys {
            assert_eq!(decode_user_key(&enc(key)).as_deref(), Some(key));
        }
    }

    #[test]
    fn newer_versions_sort_first() {
        assert!(version_key(b"k", 9) < version_key(b"k", 3));
        assert!(version_key(b"k", 1) < version_key(b"k\0", 9));
        let raw = version_key(b"a\0b", 42);
        let (user, rev) = split_version_key(&raw).unwrap();
        assert_eq!(rev, 42);
        assert_eq!(decode_user_key(user).unwrap(), b"a\0b");
    }
}
