//! Watch fan-out on one server: every applied batch is published once, and each watcher
//! reads what it missed from the store's history, so a slow watcher never loses an event
//! and never holds the applier back. While no watcher wants prev_kv the applier does not
//! read the previous values of the keys it overwrites; a watcher that starts wanting them
//! meanwhile reads such a batch's events from the store, as a late watcher does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{broadcast, watch};

use crate::error::{StoreError, StoreResult};
use crate::mvcc::{Event, KeyRange, Mvcc};

/// Batches kept for live watchers; a watcher further behind reads from storage.
const PUBLISHED_BATCHES: usize = 1024;
/// Events read from storage per catch-up step.
const CATCH_UP_EVENTS: usize = 1000;

/// Events of revisions `(from_rev, to_rev]`, as one applied batch produced them.
#[derive(Debug)]
pub struct Published {
    pub from_rev: i64,
    pub to_rev: i64,
    pub events: Vec<Event>,
    /// Every event carries its previous version (`mvcc::Applied::prev_kvs`).
    pub prev_kvs: bool,
}

pub struct WatchHub {
    batches: broadcast::Sender<Arc<Published>>,
    revision: watch::Sender<i64>,
    /// Watchers that want prev_kv.
    prev_kv_watchers: Arc<AtomicUsize>,
}

impl WatchHub {
    pub fn new(current_rev: i64) -> Arc<Self> {
        let (batches, _) = broadcast::channel(PUBLISHED_BATCHES);
        let (revision, _) = watch::channel(current_rev);
        Arc::new(Self { batches, revision, prev_kv_watchers: Arc::default() })
    }

    /// Whether the next batch's events should carry previous versions: some watcher wants
    /// them. One that starts after this answer reads that batch from the store.
    pub fn wants_prev_kvs(&self) -> bool {
        self.prev_kv_watchers.load(Ordering::Acquire) > 0
    }

    /// Called by the applier after a batch is durable in the store.
    pub fn publish(&self, batch: Published) {
        let to_rev = batch.to_rev;
        if !batch.events.is_empty() {
            let _ = self.batches.send(Arc::new(batch));
        }
        self.revision.send_replace(to_rev);
    }

    /// Called after a snapshot replaced the state: watchers re-read from storage.
    pub fn reset(&self, current_rev: i64) {
        self.revision.send_replace(current_rev);
    }

    pub fn revision(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }
}

/// One watcher's cursor over the history: yields each event of `range` from `next_rev` on,
/// in revision order, once.
pub struct WatchStream {
    mvcc: Arc<Mvcc>,
    range: KeyRange,
    prev_kv: bool,
    /// Counted among the hub's prev_kv watchers while it lives.
    _counted: Option<Counted>,
    next_rev: i64,
    batches: broadcast::Receiver<Arc<Published>>,
    revision: watch::Receiver<i64>,
}

impl WatchStream {
    /// Starts at `start_rev` (0: after the current revision).
    pub fn new(mvcc: Arc<Mvcc>, hub: &WatchHub, range: KeyRange, start_rev: i64, prev_kv: bool) -> StoreResult<Self> {
        // Subscribe before reading the revision, so no batch falls between the two.
        let counted = prev_kv.then(|| Counted::new(&hub.prev_kv_watchers));
        let batches = hub.batches.subscribe();
        let revision = hub.revision.subscribe();
        let current = *revision.borrow();
        let next_rev = if start_rev <= 0 { current + 1 } else { start_rev };
        let compact_rev = mvcc.compact_revision();
        if next_rev < compact_rev {
            return Err(StoreError::Compacted { compact_rev });
        }
        Ok(Self { mvcc, range, prev_kv, _counted: counted, next_rev, batches, revision })
    }

    /// The next revision this watcher will deliver.
    pub fn next_revision(&self) -> i64 {
        self.next_rev
    }

    /// Waits for the next events. Returns them with all events of one revision together,
    /// and `Err(Compacted)` if the history it needs is gone.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is consumed that is not returned, except batches whose events
    /// stay readable from storage.
    pub async fn next(&mut self) -> StoreResult<Vec<Event>> {
        loop {
            let applied = *self.revision.borrow_and_update();
            if self.next_rev > applied {
                if self.revision.changed().await.is_err() {
                    return Err(StoreError::Unavailable("etcdserver: server is shutting down".into()));
                }
                continue;
            }
            let out = match self.batches.try_recv() {
                Ok(batch) if batch.to_rev < self.next_rev => continue,
                // Contiguous with what was delivered, and with what this watcher wants of
                // previous versions: serve from memory.
                Ok(batch) if batch.from_rev < self.next_rev && (batch.prev_kvs || !self.prev_kv) => {
                    let out = self.filter_batch(&batch);
                    self.next_rev = batch.to_rev + 1;
                    out
                }
                // A gap, a lag, batches without events or without the previous versions this
                // watcher wants: the store has it all. Reading it
                // is plain computation on this thread, and a watcher far behind reads step
                // after step: other tasks get their turn before each one.
                _ => {
                    tokio::task::yield_now().await;
                    self.catch_up(applied)?
                }
            };
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    fn filter_batch(&self, batch: &Published) -> Vec<Event> {
        batch
            .events
            .iter()
            .filter(|e| e.revision() >= self.next_rev && self.range.contains(e.key()))
            .map(|e| {
                let mut e = e.clone();
                if !self.prev_kv {
                    e.inner.prev_kv = None;
                }
                e
            })
            .collect()
    }

    /// Reads history up to revision `upto` (exclusive of later ones) from storage.
    fn catch_up(&mut self, upto: i64) -> StoreResult<Vec<Event>> {
        let mut out = Vec::new();
        while self.next_rev <= upto {
            let (events, covered) =
                self.mvcc.events_in(&self.range, self.next_rev, upto, CATCH_UP_EVENTS, self.prev_kv)?;
            out.extend(events);
            self.next_rev = covered + 1;
            if out.len() >= CATCH_UP_EVENTS || covered < upto {
                break;
            }
        }
        Ok(out)
    }
}

/// One count in a counter while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use corral_proto::etcdserverpb::{CompactionRequest, PutRequest};
    use corral_proto::store::{Command, command};

    use super::*;
    use crate::engine::{MemEngine, RocksEngine, SharedEngine};

    /// Applies puts of `key` one batch at a time, publishing like the state machine does.
    fn put(mvcc: &Mvcc, hub: &WatchHub, keys: &[&str]) {
        let mut w = mvcc.writer().with_prev_kvs(hub.wants_prev_kvs());
        let from_rev = w.revision();
        for key in keys {
            let cmd = Command {
                op: Some(command::Op::Put(PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })),
            };
            w.apply(&cmd).unwrap();
        }
        let applied = w.finish().unwrap();
        hub.publish(Published {
            from_rev,
            to_rev: applied.revision,
            events: applied.events,
            prev_kvs: applied.prev_kvs,
        });
    }

    async fn next(stream: &mut WatchStream) -> Vec<(i64, String)> {
        let events =
            tokio::time::timeout(Duration::from_secs(2), stream.next()).await.expect("events in time").unwrap();
        events.iter().map(|e| (e.revision(), String::from_utf8_lossy(e.key()).into_owned())).collect()
    }

    fn engines() -> Vec<(SharedEngine, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        vec![(Arc::new(MemEngine::new()), None), (Arc::new(RocksEngine::open(dir.path()).unwrap()), Some(dir))]
    }

    fn put_value(key: &str, value: &str) -> Command {
        let req = PutRequest { key: key.into(), value: value.into(), ..Default::default() };
        Command { op: Some(command::Op::Put(req)) }
    }

    #[tokio::test]
    async fn a_watcher_wanting_prev_kv_gets_it_even_for_a_batch_written_without() {
        for (engine, _dir) in engines() {
            let mvcc = Mvcc::open(engine).unwrap();
            let hub = WatchHub::new(mvcc.current_revision());
            put(&mvcc, &hub, &["a"]); // revision 2, value "v"

            tracing::info!("no watcher wants previous versions: the next batch is written without them");
            assert!(!hub.wants_prev_kvs());
            let mut w = mvcc.writer().with_prev_kvs(hub.wants_prev_kvs());
            let from_rev = w.revision();

            tracing::info!("watchers start before the batch is published");
            let mut with_prev = WatchStream::new(mvcc.clone(), &hub, KeyRange::new(b"a", b""), 0, true).unwrap();
            let mut without = WatchStream::new(mvcc.clone(), &hub, KeyRange::new(b"a", b""), 0, false).unwrap();
            assert!(hub.wants_prev_kvs());
            w.apply(&put_value("a", "new")).unwrap();
            let applied = w.finish().unwrap();
            assert!(!applied.prev_kvs);
            assert_eq!(applied.events[0].inner.prev_kv, None, "written without reading the old value");
            hub.publish(Published { from_rev, to_rev: applied.revision, events: applied.events, prev_kvs: false });

            tracing::info!("the one that wants prev_kv reads the batch from the store, and gets it");
            let events = tokio::time::timeout(Duration::from_secs(2), with_prev.next()).await.unwrap().unwrap();
            let prev = events[0].inner.prev_kv.as_ref().expect("prev_kv");
            assert_eq!((prev.value.as_slice(), prev.mod_revision, prev.version), (&b"v"[..], 2, 1));
            let events = tokio::time::timeout(Duration::from_secs(2), without.next()).await.unwrap().unwrap();
            assert_eq!(events[0].inner.prev_kv, None);
            assert_eq!(events[0].inner.kv.as_ref().map(|kv| kv.version), Some(2), "the version from the index");

            tracing::info!("while it watches, batches carry previous versions; once it is gone, not");
            let mut w = mvcc.writer().with_prev_kvs(hub.wants_prev_kvs());
            w.apply(&put_value("a", "newer")).unwrap();
            let applied = w.finish().unwrap();
            assert!(applied.prev_kvs);
            assert_eq!(applied.events[0].inner.prev_kv.as_ref().map(|kv| kv.value.as_slice()), Some(&b"new"[..]));
            drop(with_prev);
            assert!(!hub.wants_prev_kvs());
        }
    }

    #[tokio::test]
    async fn watchers_get_every_event_once_in_order_live_or_from_history() {
        for (engine, _dir) in engines() {
            let mvcc = Mvcc::open(engine).unwrap();
            let hub = WatchHub::new(mvcc.current_revision());
            put(&mvcc, &hub, &["a", "b"]); // revisions 2, 3

            tracing::info!("a watcher from revision 2 replays history, then follows live");
            let mut from_start = WatchStream::new(mvcc.clone(), &hub, KeyRange::new(b"a", b"z"), 2, false).unwrap();
            let mut live = WatchStream::new(mvcc.clone(), &hub, KeyRange::new(b"b", b""), 0, false).unwrap();
            assert_eq!(next(&mut from_start).await, vec![(2, "a".into()), (3, "b".into())]);
            put(&mvcc, &hub, &["b", "zz", "a"]); // 4, 5 (outside), 6
            assert_eq!(next(&mut from_start).await, vec![(4, "b".into()), (6, "a".into())]);
            assert_eq!(next(&mut live).await, vec![(4, "b".into())], "only its key, only after it started");

            tracing::info!("a watcher that falls behind the published batches reads the store instead");
            for i in 0..(PUBLISHED_BATCHES + 10) {
                put(&mvcc, &hub, &[if i % 2 == 0 { "b" } else { "c" }]);
            }
            let mut seen = Vec::new();
            while seen.len() < (PUBLISHED_BATCHES + 10) / 2 {
                seen.extend(next(&mut live).await);
            }
            assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "in order, no duplicate");
            assert!(seen.iter().all(|(_, k)| k == "b"));

            tracing::info!("a start revision below the compaction is refused with the compact revision");
            let mut w = mvcc.writer();
            w.apply(&Command { op: Some(command::Op::Compaction(CompactionRequest { revision: 5, physical: false })) })
                .unwrap();
            w.finish().unwrap();
            match WatchStream::new(mvcc.clone(), &hub, KeyRange::new(b"a", b""), 3, false) {
                Err(StoreError::Compacted { compact_rev }) => assert_eq!(compact_rev, 5),
                other => panic!("expected compacted, got {:?}", other.map(|_| ())),
            }
        }
    }
}
