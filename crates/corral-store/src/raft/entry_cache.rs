//! The newest entries of the Raft log, kept in memory as they were appended.
//!
//! openraft reads an entry back from the log several times soon after appending it: once
//! to apply it, and on the leader once per follower to replicate it. Served from here, such
//! a read is a clone of an `Arc` (see [`Request`](super::Request)) instead of a read from
//! the engine and a decoding of every write in the entry.
//!
//! Invariant: the cache holds a contiguous run of the log's entries that ends at the last
//! one appended (or nothing). The log store updates it in the order that keeps this true for
//! a concurrent reader: after an append is written, before a truncation or a purge is.

use std::collections::VecDeque;

use super::types::{Entry, entry_bytes};

/// How much the cache holds at most: entries beyond either bound are dropped oldest first,
/// and read from the engine if they are needed again (a follower far behind).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    pub entries: usize,
    pub bytes: usize,
}

/// Half a second of writes at full speed (about 8 MB/s of entries at 256 clients): far more
/// than an entry waits to be applied, and to be replicated to a follower that keeps up. Each
/// cached entry is held twice (encoded and decoded), so this costs a server 10 MiB or so.
pub(crate) const BOUNDS: Bounds = Bounds { entries: 1024, bytes: 4 << 20 };

pub(crate) struct EntryCache {
    bounds: Bounds,
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl EntryCache {
    pub fn new(bounds: Bounds) -> Self {
        Self { bounds, entries: VecDeque::new(), bytes: 0 }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn next_index(&self) -> Option<u64> {
        self.entries.back().map(|e| e.log_id.index + 1)
    }

    /// Records entries just appended to the log. Entries that do not follow the cached ones
    /// start the cache afresh, so it never holds a gap.
    pub fn append(&mut self, entries: &[Entry]) {
        for entry in entries {
            if self.next_index().is_some_and(|next| next != entry.log_id.index) {
                self.entries.clear();
                self.bytes = 0;
            }
            self.bytes += entry_bytes(entry);
            self.entries.push_back(entry.clone());
        }
        while self.entries.len() > self.bounds.entries || (self.bytes > self.bounds.bytes && self.entries.len() > 1) {
            let dropped = self.entries.pop_front().expect("the cache is not empty");
            self.bytes -= entry_bytes(&dropped);
        }
    }

    /// Forgets the entries from `index` on (the log is about to be truncated there).
    pub fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= index) {
            let dropped = self.entries.pop_back().expect("checked above");
            self.bytes -= entry_bytes(&dropped);
        }
    }

    /// Forgets the entries up to `index`, inclusive (the log is about to be purged there).
    pub fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= index) {
            let dropped = self.entries.pop_front().expect("checked above");
            self.bytes -= entry_bytes(&dropped);
        }
    }

    /// The cached entries from `start` to before `end`, if `start` is cached, and the index
    /// after the last one returned. Entries from there to `end` are not cached; the log may
    /// still hold them (an append written but not yet recorded here).
    pub fn get(&self, start: u64, end: u64) -> Option<(Vec<Entry>, u64)> {
        let first = self.first_index()?;
        let next = self.next_index()?;
        if start < first || start >= next {
            return None;
        }
        let stop = end.clamp(start, next);
        let from = (start - first) as usize;
        let to = (stop - first) as usize;
        Some((self.entries.range(from..to).cloned().collect(), stop))
    }
}

#[cfg(test)]
mod tests {
    use corral_proto::etcdserverpb::PutRequest;
    use corral_proto::store::{Command, CommandBatch, command};
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;
    use crate::raft::types::Request;

    fn entry(term: u64, index: u64, value_len: usize) -> Entry {
        let put = PutRequest { key: b"k".to_vec(), value: vec![b'v'; value_len], ..Default::default() };
        let batch = CommandBatch { commands: vec![Command { op: Some(command::Op::Put(put)) }] };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Request::new(batch)),
        }
    }

    fn indexes(found: Option<(Vec<Entry>, u64)>) -> Option<(Vec<u64>, u64)> {
        found.map(|(entries, next)| (entries.iter().map(|e| e.log_id.index).collect(), next))
    }

    #[test]
    fn serves_what_was_appended_until_truncated_or_purged() {
        let mut cache = EntryCache::new(BOUNDS);
        assert_eq!(indexes(cache.get(1, 10)), None, "nothing cached yet");

        // Entries 5 to 9 are appended: any range starting among them is served, up to 9.
        cache.append(&(5..10).map(|i| entry(1, i, 10)).collect::<Vec<_>>());
        assert_eq!(indexes(cache.get(5, 10)), Some((vec![5, 6, 7, 8, 9], 10)));
        assert_eq!(indexes(cache.get(7, 9)), Some((vec![7, 8], 9)));
        assert_eq!(indexes(cache.get(8, 20)), Some((vec![8, 9], 10)), "the rest is the log's to find");
        assert_eq!(indexes(cache.get(4, 10)), None, "4 is older than the cache");
        assert_eq!(indexes(cache.get(10, 12)), None, "10 is not appended yet");

        // A new leader's entries replace 8 and 9.
        cache.truncate(8);
        assert_eq!(indexes(cache.get(5, 10)), Some((vec![5, 6, 7], 8)));
        cache.append(&[entry(2, 8, 10)]);
        let (found, _) = cache.get(8, 9).expect("8 is cached again");
        assert_eq!(found[0].log_id.leader_id.term, 2, "the new leader's entry");

        // A snapshot purges up to 6.
        cache.purge(6);
        assert_eq!(indexes(cache.get(6, 9)), None);
        assert_eq!(indexes(cache.get(7, 9)), Some((vec![7, 8], 9)));
    }

    #[test]
    fn an_append_that_leaves_a_gap_starts_the_cache_afresh() {
        let mut cache = EntryCache::new(BOUNDS);
        cache.append(&[entry(1, 1, 10), entry(1, 2, 10)]);
        cache.append(&[entry(1, 7, 10)]);
        assert_eq!(indexes(cache.get(1, 8)), None);
        assert_eq!(indexes(cache.get(7, 8)), Some((vec![7], 8)));
    }

    #[test]
    fn the_oldest_entries_go_first_beyond_either_bound() {
        let mut by_count = EntryCache::new(Bounds { entries: 3, bytes: usize::MAX });
        by_count.append(&(1..=5).map(|i| entry(1, i, 10)).collect::<Vec<_>>());
        assert_eq!(indexes(by_count.get(1, 6)), None);
        assert_eq!(indexes(by_count.get(3, 6)), Some((vec![3, 4, 5], 6)));

        let one = entry_bytes(&entry(1, 1, 1000));
        let mut by_bytes = EntryCache::new(Bounds { entries: usize::MAX, bytes: 2 * one });
        by_bytes.append(&(1..=4).map(|i| entry(1, i, 1000)).collect::<Vec<_>>());
        assert_eq!(indexes(by_bytes.get(3, 5)), Some((vec![3, 4], 5)));
        assert_eq!(indexes(by_bytes.get(2, 5)), None);

        // An entry larger than the whole bound is still kept, alone.
        let mut tiny = EntryCache::new(Bounds { entries: usize::MAX, bytes: 1 });
        tiny.append(&[entry(1, 1, 1000), entry(1, 2, 1000)]);
        assert_eq!(indexes(tiny.get(1, 3)), None);
        assert_eq!(indexes(tiny.get(2, 3)), Some((vec![2], 3)));
    }
}
