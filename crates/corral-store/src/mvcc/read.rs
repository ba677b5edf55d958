//! Reads: ranges at a revision, the event history for watchers, and HashKV.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use corral_proto::etcdserverpb::{RangeRequest, RangeResponse, range_request};
use corral_proto::mvccpb::{self, KeyValue};

use super::keys::{after_versions, decode_user_key, encode_user_key, split_rev_key, split_version_key, version_key};
use super::{Event, Mvcc, Record};
use crate::engine::{Cf, EngineError, View};
use crate::error::{StoreError, StoreResult};

/// The keys a request names, in etcd's terms: `key` alone, `[key, range_end)`, or every key
/// from `key` on when `range_end` is `"\0"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: RangeEnd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeEnd {
    Single,
    Before(Vec<u8>),
    Unbounded,
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        let end = match range_end {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            end => RangeEnd::Before(end.to_vec()),
        };
        KeyRange { start: key.to_vec(), end }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start.as_slice(),
            RangeEnd::Before(end) => key >= self.start.as_slice() && key < end.as_slice(),
            RangeEnd::Unbounded => key >= self.start.as_slice(),
        }
    }

    /// True when the range cannot hold any key (`range_end <= key`).
    pub fn is_empty(&self) -> bool {
        matches!(&self.end, RangeEnd::Before(end) if end.as_slice() <= self.start.as_slice())
    }
}

/// How much of each key a scan keeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct RangeOptions {
    pub keys_only: bool,
    pub count_only: bool,
}

/// A live key found by a scan.
pub(crate) fn key_value(key: Vec<u8>, mod_rev: i64, record: Record, keys_only: bool) -> Option<KeyValue> {
    match record {
        Record::Live { create_rev, version, lease, value } => Some(KeyValue {
            key,
            create_revision: create_rev,
            mod_revision: mod_rev,
            version,
            value: if keys_only { Vec::new() } else { value },
            lease,
        }),
        Record::Tombstone => None,
    }
}

/// Visits the newest version at or below `rev` of every key in `range`, in key order,
/// tombstones included.
pub(crate) fn scan(
    view: &dyn View,
    range: &KeyRange,
    rev: i64,
    mut visit: impl FnMut(&[u8], i64, &[u8]) -> Result<ControlFlow<()>, EngineError>,
) -> Result<(), EngineError> {
    if range.is_empty() {
        return Ok(());
    }
    let mut start_enc = Vec::new();
    encode_user_key(&range.start, &mut start_enc);
    let end_enc = match &range.end {
        RangeEnd::Before(end) => {
            let mut e = Vec::new();
            encode_user_key(end, &mut e);
            Some(e)
        }
        _ => None,
    };
    let mut cursor = view.cursor(Cf::Kv);
    let mut target = start_enc.clone();
    target.extend_from_slice(&(!(rev as u64)).to_be_bytes());
    cursor.seek(&target);
    while cursor.valid() {
        let Some((user_enc, version_rev)) = split_version_key(cursor.key()) else {
            return Err(EngineError::Corrupt { cf: Cf::Kv, what: "short version key".into() });
        };
        let past_end = match (&range.end, &end_enc) {
            (RangeEnd::Single, _) => user_enc != start_enc.as_slice(),
            (RangeEnd::Before(_), Some(end)) => user_enc >= end.as_slice(),
            _ => false,
        };
        if past_end {
            break;
        }
        let user_enc = user_enc.to_vec();
        if version_rev > rev {
            let mut target = user_enc;
            target.extend_from_slice(&(!(rev as u64)).to_be_bytes());
            cursor.seek(&target);
            continue;
        }
        if visit(&user_enc, version_rev, cursor.value())?.is_break() {
            return Ok(());
        }
        cursor.seek(&after_versions(&user_enc));
    }
    cursor.status()
}

/// The newest version of `key` at or below `rev`: its mod revision and record.
pub(crate) fn get_version(view: &dyn View, key: &[u8], rev: i64) -> Result<Option<(i64, Record)>, EngineError> {
    let target = version_key(key, rev);
    let mut cursor = view.cursor(Cf::Kv);
    cursor.seek(&target);
    if !cursor.valid() {
        return cursor.status().map(|_| None);
    }
    let (user_enc, version_rev) =
        split_version_key(cursor.key()).ok_or_else(|| EngineError::Corrupt { cf: Cf::Kv, what: "short key".into() })?;
    if user_enc != &target[..target.len() - 8] {
        return Ok(None);
    }
    Ok(Some((version_rev, Record::decode(cursor.value())?)))
}

/// Collects the live keys of `range` at `rev` (plus `overlay`, the writes of a batch not yet
/// written), then filters, sorts and limits them as etcd does.
pub(crate) fn range_with_overlay(
    view: &dyn View,
    req: &RangeRequest,
    rev: i64,
    overlay: Option<&BTreeMap<Vec<u8>, (i64, Record)>>,
) -> Result<RangeResponse, EngineError> {
    let range = KeyRange::new(&req.key, &req.range_end);
    let sort_order = range_request::SortOrder::try_from(req.sort_order).unwrap_or(range_request::SortOrder::None);
    let sort_target = range_request::SortTarget::try_from(req.sort_target).unwrap_or(range_request::SortTarget::Key);
    let filtered = req.min_mod_revision > 0
        || req.max_mod_revision > 0
        || req.min_create_revision > 0
        || req.max_create_revision > 0;
    // Keys already come in ascending order: only other orders and targets need a sort.
    let sorted = sort_target != range_request::SortTarget::Key || sort_order == range_request::SortOrder::Descend;
    // Without sorting, filtering or an overlay, keys arrive in order and we can stop keeping
    // values past the limit (but etcd still counts every key in the range).
    let keep_max =
        if req.limit > 0 && !sorted && !filtered && overlay.is_none() { req.limit as usize + 1 } else { usize::MAX };
    let keep_values = !req.count_only;
    let mut count: i64 = 0;
    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut merged: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
    scan(view, &range, rev, |user_enc, mod_rev, raw| {
        let record = Record::decode(raw)?;
        if !record.is_live() {
            return Ok(ControlFlow::Continue(()));
        }
        count += 1;
        if keep_values && kvs.len() + merged.len() < keep_max {
            let key = decode_user_key(user_enc)
                .ok_or_else(|| EngineError::Corrupt { cf: Cf::Kv, what: "bad user key encoding".into() })?;
            let kv = key_value(key, mod_rev, record, req.keys_only).expect("live record");
            if overlay.is_some() {
                merged.insert(kv.key.clone(), kv);
            } else {
                kvs.push(kv);
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    if let Some(overlay) = overlay {
        for (key, (mod_rev, record)) in overlay.iter().filter(|(k, _)| range.contains(k)) {
            match key_value(key.clone(), *mod_rev, record.clone(), req.keys_only) {
                Some(kv) => {
                    if merged.insert(key.clone(), kv).is_none() {
                        count += 1;
                    }
                }
                None => {
                    if merged.remove(key).is_some() {
                        count -= 1;
                    }
                }
            }
        }
        kvs = merged.into_values().collect();
        if !keep_values {
            kvs.clear();
        }
    }
    if filtered {
        kvs.retain(|kv| {
            (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                && (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
                && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
        });
    }
    if sorted {
        use range_request::SortTarget as T;
        match sort_target {
            T::Key => {}
            T::Version => kvs.sort_by_key(|kv| kv.version),
            T::Create => kvs.sort_by_key(|kv| kv.create_revision),
            T::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
            T::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if sort_order == range_request::SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.count_only {
        kvs.clear();
    }
    Ok(RangeResponse { header: None, kvs, more, count })
}

/// Revisions of history looked at per read at most (see [`Mvcc::events_in`]).
pub const SCAN_PER_READ: usize = 20_000;

impl Mvcc {
    /// A Range at the request's revision (0: the current one).
    pub fn range(&self, req: &RangeRequest) -> StoreResult<RangeResponse> {
        let _gate = self.reading();
        let rev = self.check_revision(req.revision)?;
        let view = self.engine.view();
        let mut resp = range_with_overlay(view.as_ref(), req, rev, None)?;
        // A compaction may have started while we read: its revision is raised first.
        if rev < self.compact_revision() {
            return Err(StoreError::Compacted { compact_rev: self.compact_revision() });
        }
        // A read of the present reports the revision it read at (a write applied since must
        // not be claimed: a serializable reader compares the two); a read of the past reports
        // the store's current revision, as etcd does.
        let reported = if req.revision <= 0 { rev } else { self.current_revision().max(rev) };
        resp.header = Some(header(reported));
        Ok(resp)
    }

    /// Events with revisions in `[from_rev, to_rev]`, in order, stopping at a revision
    /// boundary once `max_events` is reached. With `prev_kv`, each event carries the version
    /// before it.
    pub fn events(&self, from_rev: i64, to_rev: i64, max_events: usize, prev_kv: bool) -> StoreResult<Vec<Event>> {
        let all = KeyRange::new(b"", b"\0");
        let (mut out, mut next) = (Vec::new(), from_rev);
        loop {
            let (events, covered) = self.events_in(&all, next, to_rev, max_events - out.len(), prev_kv)?;
            out.extend(events);
            if covered >= to_rev || out.len() >= max_events {
                return Ok(out);
            }
            next = covered + 1;
        }
    }

    /// The events of keys in `range` with revisions in `[from_rev, to_rev]`, in order, and
    /// the revision up to which history was read: it stops at a revision boundary once
    /// `max_events` are found or [`SCAN_PER_READ`] revisions were looked at, so a watcher of
    /// a quiet range catching up through a busy history reads it in bounded steps. Only the
    /// events in the range are rebuilt from their versions.
    pub fn events_in(
        &self,
        range: &KeyRange,
        from_rev: i64,
        to_rev: i64,
        max_events: usize,
        prev_kv: bool,
    ) -> StoreResult<(Vec<Event>, i64)> {
        let _gate = self.reading();
        let compact_rev = self.compact_revision();
        if from_rev < compact_rev {
            return Err(StoreError::Compacted { compact_rev });
        }
        let view = self.engine.view();
        let mut out: Vec<Event> = Vec::new();
        let mut cursor = view.cursor(Cf::Rev);
        cursor.seek(&super::keys::rev_key(from_rev, 0));
        let (mut scanned, mut covered) = (0usize, to_rev);
        let mut last_main = from_rev - 1;
        while cursor.valid() {
            let (main, sub) = split_rev_key(cursor.key())
                .ok_or_else(|| EngineError::Corrupt { cf: Cf::Rev, what: "bad revision key".into() })?;
            if main > to_rev {
                break;
            }
            if main != last_main && (out.len() >= max_events || scanned >= SCAN_PER_READ) {
                covered = last_main;
                break;
            }
            last_main = main;
            scanned += 1;
            if range.contains(cursor.value()) {
                let key = cursor.value().to_vec();
                out.push(event_at(view.as_ref(), key, main, sub, prev_kv)?);
            }
            cursor.next();
        }
        cursor.status()?;
        if from_rev < self.compact_revision() {
            return Err(StoreError::Compacted { compact_rev: self.compact_revision() });
        }
        Ok((out, covered))
    }

    /// A hash of every version at or below `rev` (0: current) that compaction keeps, equal on
    /// members that applied the same log however far their background compaction got.
    /// Returns the hash and the compact revision it covers from.
    pub fn hash_kv(&self, rev: i64) -> StoreResult<(u32, i64)> {
        let _gate = self.reading();
        let rev = self.check_revision(rev)?;
        let compact_rev = self.compact_revision();
        let view = self.engine.view();
        let mut hasher = crc32fast::Hasher::new();
        let mut cursor = view.cursor(Cf::Kv);
        cursor.seek(&[]);
        // Versions of one key come newest first: below the compact revision only the first
        // (if live, or a tombstone at exactly the compact revision) is logically there.
        let mut key_seen_below: Option<Vec<u8>> = None;
        while cursor.valid() {
            if let Some((user_enc, version_rev)) = split_version_key(cursor.key())
                && version_rev <= rev
            {
                let counts = if version_rev > compact_rev {
                    true
                } else if key_seen_below.as_deref() == Some(user_enc) {
                    false
                } else {
                    key_seen_below = Some(user_enc.to_vec());
                    version_rev == compact_rev || Record::decode(cursor.value())?.is_live()
                };
                if counts {
                    hasher.update(cursor.key());
                    hasher.update(cursor.value());
                }
            }
            cursor.next();
        }
        cursor.status()?;
        Ok((hasher.finalize(), compact_rev))
    }
}

/// Rebuilds the event at `(main, sub)` for `key` from the stored versions.
fn event_at(view: &dyn View, key: Vec<u8>, main: i64, sub: u32, with_prev: bool) -> Result<Event, EngineError> {
    let missing = || EngineError::Corrupt { cf: Cf::Kv, what: format!("event at revision {main} has no version") };
    let (mod_rev, record) = get_version(view, &key, main)?.ok_or_else(missing)?;
    if mod_rev != main {
        return Err(missing());
    }
    let prev_kv = if with_prev {
        match get_version(view, &key, main - 1)? {
            Some((prev_rev, prev)) => key_value(key.clone(), prev_rev, prev, false),
            None => None,
        }
    } else {
        None
    };
    let (kind, kv) = match key_value(key.clone(), main, record, false) {
        Some(kv) => (mvccpb::event::EventType::Put, kv),
        None => (mvccpb::event::EventType::Delete, KeyValue { key, mod_revision: main, ..Default::default() }),
    };
    Ok(Event { sub, inner: mvccpb::Event { r#type: kind as i32, kv: Some(kv), prev_kv } })
}

pub(crate) fn header(revision: i64) -> corral_proto::etcdserverpb::ResponseHeader {
    corral_proto::etcdserverpb::ResponseHeader { revision, ..Default::default() }
}
