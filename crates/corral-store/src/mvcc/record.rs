//! The value stored for each version of a key in the `Kv` column family.

use crate::engine::{Cf, EngineError};

/// One version of a key: a live value or a tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Live { create_rev: i64, version: i64, lease: i64, value: Vec<u8> },
    Tombstone,
}

const LIVE: u8 = 0;
const TOMBSTONE: u8 = 1;

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Live { create_rev, version, lease, value } => {
                let mut out = Vec::with_capacity(25 + value.len());
                out.push(LIVE);
                out.extend_from_slice(&create_rev.to_be_bytes());
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&lease.to_be_bytes());
                out.extend_from_slice(value);
                out
            }
            Record::Tombstone => vec![TOMBSTONE],
        }
    }

    pub fn decode(raw: &[u8]) -> Result<Self, EngineError> {
        let corrupt = || EngineError::Corrupt { cf: Cf::Kv, what: format!("version record of {} bytes", raw.len()) };
        match raw.first() {
            Some(&TOMBSTONE) => Ok(Record::Tombstone),
            Some(&LIVE) if raw.len() >= 25 => {
                let int = |at: usize| i64::from_be_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
                Ok(Record::Live { create_rev: int(1), version: int(9), lease: int(17), value: raw[25..].to_vec() })
            }
            _ => Err(corrupt()),
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self, Record::Live { .. })
    }
}
