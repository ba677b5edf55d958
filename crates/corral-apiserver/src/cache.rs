//! The watch cache: one store watch per resource on each server, decoded once, fanned out
//! to every client watching that resource.
//!
//! A feed keeps its recent changes in a bounded buffer, so a client resuming from a recent
//! resourceVersion is served from memory; an older one gets a watch of its own on the store
//! (the store keeps history until compaction). A client that falls more than
//! [`FANOUT_CAPACITY`] changes behind is dropped (its stream ends, as kube-apiserver ends a
//! slow watcher's), so a slow reader never grows the server's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_api::{ApiError, Resource};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::storage::{ObjectStore, store_error};

/// Changes a feed remembers for clients that resume from a recent revision.
const BUFFER: usize = 2048;
/// Changes a client may fall behind before it is dropped.
pub const FANOUT_CAPACITY: usize = 1024;

/// One change to one object, decoded once for every watcher.
#[derive(Debug)]
pub struct Change {
    pub key: String,
    pub rev: i64,
    /// The object after the change; None for a deletion.
    pub obj: Option<Value>,
    /// The object before it, if it existed.
    pub prev: Option<Value>,
}

impl Change {
    pub fn from_event(ev: &corral_store::mvcc::Event) -> Option<Change> {
        let kv = ev.inner.kv.as_ref()?;
        Some(Change {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            rev: kv.mod_revision,
            obj: if ev.inner.r#type == 1 { None } else { ObjectStore::decode(&kv.value).ok() },
            prev: ev.inner.prev_kv.as_ref().and_then(|p| ObjectStore::decode(&p.value).ok()),
        })
    }
}

struct Feed {
    tx: broadcast::Sender<Arc<Change>>,
    state: Mutex<FeedState>,
    /// The revision everything up to which has been seen (for bookmarks).
    progress: AtomicI64,
    alive: AtomicBool,
}

struct FeedState {
    buffer: VecDeque<Arc<Change>>,
    /// Every change from this revision on is in the buffer or still to come.
    covered_from: i64,
}

/// What a client watch reads from.
pub enum Subscription {
    Shared {
        rx: broadcast::Receiver<Arc<Change>>,
        replay: Vec<Arc<Change>>,
        feed: FeedHandle,
    },
    /// The revision is older than the feed remembers: the client needs its own store watch.
    TooOld,
}

/// What a subscriber may ask of its feed.
pub struct FeedHandle(Arc<Feed>);

impl FeedHandle {
    pub fn progress(&self) -> i64 {
        self.0.progress.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct WatchCache {
    feeds: Mutex<HashMap<&'static str, Arc<Feed>>>,
}

impl WatchCache {
    /// Subscribes to every change of `r` after `after` (None: from now on).
    pub fn subscribe(
        &self,
        store: &ObjectStore,
        r: &'static Resource,
        after: Option<i64>,
    ) -> Result<Subscription, ApiError> {
        let feed = self.feed(store, r)?;
        let state = feed.state.lock().expect("feed lock");
        let rx = feed.tx.subscribe();
        let replay = match after {
            None => Vec::new(),
            Some(rev) if rev + 1 >= state.covered_from => {
                state.buffer.iter().filter(|c| c.rev > rev).cloned().collect()
            }
            Some(_) => return Ok(Subscription::TooOld),
        };
        drop(state);
        Ok(Subscription::Shared { rx, replay, feed: FeedHandle(feed) })
    }

    fn feed(&self, store: &ObjectStore, r: &'static Resource) -> Result<Arc<Feed>, ApiError> {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        if let Some(f) = feeds.get(r.plural).filter(|f| f.alive.load(Ordering::Relaxed)) {
            return Ok(f.clone());
        }
        let prefix = r.prefix(None);
        let mut stream = store.watch(&prefix, 0)?;
        let start = stream.next_revision();
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        let feed = Arc::new(Feed {
            tx,
            state: Mutex::new(FeedState { buffer: VecDeque::new(), covered_from: start }),
            progress: AtomicI64::new(start - 1),
            alive: AtomicBool::new(true),
        });
        feeds.insert(r.plural, feed.clone());
        let f = feed.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let events = tokio::select! {
                    e = stream.next() => e,
                    _ = tick.tick() => {
                        f.progress.store(stream.next_revision() - 1, Ordering::Relaxed);
                        continue;
                    }
                };
                let events = match events {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::debug!(resource = r.plural, error = %store_error(e), "watch cache feed ended");
                        break;
                    }
                };
                let mut state = f.state.lock().expect("feed lock");
                for change in events.iter().filter_map(Change::from_event) {
                    let change = Arc::new(change);
                    if state.buffer.len() == BUFFER
                        && let Some(old) = state.buffer.pop_front()
                    {
                        state.covered_from = old.rev + 1;
                    }
                    state.buffer.push_back(change.clone());
                    // No receivers is fine: the buffer keeps it for the next one.
                    let _ = f.tx.send(change);
                }
                f.progress.store(stream.next_revision() - 1, Ordering::Relaxed);
            }
            f.alive.store(false, Ordering::Relaxed);
        });
        Ok(feed)
    }
}
