//! The watch cache: one store watch per resource on each server, decoded once, fanned out
//! to every client watching that resource.
//!
//! A feed keeps its recent changes in a bounded buffer, so a client resuming from a recent
//! resourceVersion is served from memory; an older one gets a watch of its own on the store
//! (the store keeps history until compaction). A client that falls more than
//! [`FANOUT_CAPACITY`] changes behind is dropped (its stream ends, as kube-apiserver ends a
//! slow watcher's), so a slow reader never grows the server's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use corral_api::{ApiError, Resource};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::storage::{ObjectStore, store_error};

/// Changes a feed remembers for clients that resume from a recent revision.
const BUFFER: usize = 2048;
/// Changes a client may fall behind before it is dropped.
pub const FANOUT_CAPACITY: usize = 1024;

/// One change to one object, decoded once for every watcher and shared by all of them: the
/// object carries its kind and resourceVersion, as sent. The object before the change is
/// decoded only when a watcher asks for it: a watch without selectors needs to know only
/// whether it existed (ADDED or MODIFIED), so most changes never decode it.
#[derive(Debug)]
pub struct Change {
    pub key: String,
    pub rev: i64,
    /// The object after the change; None for a deletion.
    pub obj: Option<Arc<Value>>,
    /// The object before it as stored, if it existed.
    prev_raw: Option<Vec<u8>>,
    /// Decoded, it carries the change's revision (a deletion is sent as it).
    prev: OnceLock<Option<Arc<Value>>>,
    r: &'static Resource,
}

impl Change {
    pub fn from_event(r: &'static Resource, ev: &corral_store::mvcc::Event) -> Option<Change> {
        let kv = ev.inner.kv.as_ref()?;
        let obj = match ev.inner.r#type == 1 {
            true => None,
            false => ObjectStore::decode(&kv.value).ok().map(|o| Arc::new(as_sent(r, o, kv.mod_revision))),
        };
        Some(Change {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            rev: kv.mod_revision,
            obj,
            prev_raw: ev.inner.prev_kv.as_ref().map(|p| p.value.clone()),
            prev: OnceLock::new(),
            r,
        })
    }

    /// Whether the object existed before the change.
    pub fn had_prev(&self) -> bool {
        self.prev_raw.is_some()
    }

    /// The object before the change, decoded on first use.
    pub fn prev(&self) -> Option<&Arc<Value>> {
        self.prev
            .get_or_init(|| {
                let raw = self.prev_raw.as_deref()?;
                ObjectStore::decode(raw).ok().map(|o| Arc::new(as_sent(self.r, o, self.rev)))
            })
            .as_ref()
    }
}

/// An object as watchers are sent it: its kind, and the revision of the change.
fn as_sent(r: &Resource, mut obj: Value, rev: i64) -> Value {
    corral_api::meta::set_resource_version(&mut obj, rev);
    corral_api::meta::set_type(r, &mut obj);
    obj
}

struct Feed {
    /// The feed's task holds the only sender: a feed whose sender no longer upgrades has
    /// ended, every subscriber's receiver closes and its watcher starts again (on a new feed).
    tx: broadcast::WeakSender<Arc<Change>>,
    state: Mutex<FeedState>,
    /// The revision everything up to which has been sent (for bookmarks).
    progress: AtomicI64,
}

struct FeedState {
    buffer: VecDeque<Arc<Change>>,
    /// Every change from this revision on is in the buffer or still to come.
    covered_from: i64,
}

pub struct WatchCache {
    feeds: Mutex<HashMap<&'static str, Arc<Feed>>>,
    /// Where feeds run: the runtime the cache was made on (the server's own), not that of
    /// whoever subscribes first (the control loops' runtime runs at a lower priority, and
    /// every API and agent watch of the server reads from these feeds).
    runtime: Option<tokio::runtime::Handle>,
}

impl Default for WatchCache {
    fn default() -> Self {
        Self { feeds: Mutex::default(), runtime: tokio::runtime::Handle::try_current().ok() }
    }
}

impl WatchCache {
    /// A watcher of every change of `r` after `after` (None: from now on) on the shared
    /// feed; None when the feed no longer remembers that far back.
    fn shared(
        &self,
        store: &ObjectStore,
        r: &'static Resource,
        after: Option<i64>,
    ) -> Result<Option<ChangeSource>, ApiError> {
        let (feed, tx) = self.feed(store, r)?;
        let state = feed.state.lock().expect("feed lock");
        let replay = match after {
            None => VecDeque::new(),
            Some(rev) if rev + 1 >= state.covered_from => {
                state.buffer.iter().filter(|c| c.rev > rev).cloned().collect()
            }
            Some(_) => return Ok(None),
        };
        let rx = tx.subscribe();
        drop(state);
        let known = after.unwrap_or(0);
        Ok(Some(ChangeSource(Source::Shared { rx, replay, skip_upto: known, given: known, feed })))
    }

    /// The feed of `r`, started if it is not running, and a sender to subscribe with.
    fn feed(
        &self,
        store: &ObjectStore,
        r: &'static Resource,
    ) -> Result<(Arc<Feed>, broadcast::Sender<Arc<Change>>), ApiError> {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        if let Some(f) = feeds.get(r.plural)
            && let Some(tx) = f.tx.upgrade()
        {
            return Ok((f.clone(), tx));
        }
        let prefix = r.prefix(None);
        let mut stream = store.watch(&prefix, 0)?;
        let start = stream.next_revision();
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        let feed = Arc::new(Feed {
            tx: tx.downgrade(),
            state: Mutex::new(FeedState { buffer: VecDeque::new(), covered_from: start }),
            progress: AtomicI64::new(start - 1),
        });
        feeds.insert(r.plural, feed.clone());
        let (f, subscribe_with) = (feed.clone(), tx.clone());
        let task = async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let events = tokio::select! {
                    e = stream.next() => e,
                    _ = tick.tick() => {
                        f.progress.store(stream.next_revision() - 1, Ordering::Release);
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
                for change in events.iter().filter_map(|e| Change::from_event(r, e)) {
                    let change = Arc::new(change);
                    if state.buffer.len() == BUFFER
                        && let Some(old) = state.buffer.pop_front()
                    {
                        state.covered_from = old.rev + 1;
                    }
                    state.buffer.push_back(change.clone());
                    // No receivers is fine: the buffer keeps it for the next one.
                    let _ = tx.send(change);
                }
                f.progress.store(stream.next_revision() - 1, Ordering::Release);
            }
            drop(tx);
        };
        match &self.runtime {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        };
        Ok((feed, subscribe_with))
    }
}

/// Where one watcher's changes come from: the resource's shared feed, or a store watch of
/// its own for a revision older than the feed remembers.
pub struct ChangeSource(Source);

enum Source {
    /// Changes up to `skip_upto` are already known to the watcher; `given` is the revision
    /// of the last change handed out.
    Shared {
        rx: broadcast::Receiver<Arc<Change>>,
        replay: VecDeque<Arc<Change>>,
        skip_upto: i64,
        given: i64,
        feed: Arc<Feed>,
    },
    Direct(corral_store::watch::WatchStream, &'static Resource),
}

impl ChangeSource {
    /// Every change of `r` after revision `after` (> 0): from the feed if it still has
    /// them, else from the store (there only those under `prefix`, the watcher's own);
    /// `ApiError::Gone` when the store has compacted them away.
    pub fn after(
        cache: &WatchCache,
        store: &ObjectStore,
        r: &'static Resource,
        prefix: &str,
        after: i64,
    ) -> Result<Self, ApiError> {
        match cache.shared(store, r, Some(after))? {
            Some(source) => Ok(source),
            None => Ok(ChangeSource(Source::Direct(store.watch(prefix, after)?, r))),
        }
    }

    /// Every change of `r` from now on. A watcher that lists after subscribing passes the
    /// list's revision to `known_upto`.
    pub fn from_now(cache: &WatchCache, store: &ObjectStore, r: &'static Resource) -> Result<Self, ApiError> {
        Ok(cache.shared(store, r, None)?.expect("a watcher from now on is always on the feed"))
    }

    /// Skips the changes up to `rev` (those a list read after subscribing already has).
    pub fn known_upto(&mut self, rev: i64) {
        if let Source::Shared { skip_upto, .. } = &mut self.0 {
            *skip_upto = (*skip_upto).max(rev);
        }
    }

    /// The next changes; `Err(None)` when the watcher fell too far behind or the feed
    /// restarts (it watches again from its last revision), `Err(Some)` for a store error.
    pub async fn next(&mut self) -> Result<Vec<Arc<Change>>, Option<ApiError>> {
        use tokio::sync::broadcast::error::RecvError;
        match &mut self.0 {
            Source::Shared { rx, replay, skip_upto, given, .. } => loop {
                let c = match replay.pop_front() {
                    Some(c) => c,
                    None => match rx.recv().await {
                        Ok(c) => c,
                        Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return Err(None),
                    },
                };
                if c.rev > *skip_upto {
                    *given = c.rev;
                    return Ok(vec![c]);
                }
            },
            Source::Direct(stream, r) => {
                let events = stream.next().await.map_err(|e| Some(store_error(e)))?;
                Ok(events.iter().filter_map(|e| Change::from_event(r, e)).map(Arc::new).collect())
            }
        }
    }

    /// The revision every change up to which this watcher has been given, for bookmarks
    /// and progress: the feed's own only once nothing it sent is still waiting here (a
    /// client resuming from it would otherwise miss those changes).
    pub fn progress(&self) -> i64 {
        match &self.0 {
            Source::Shared { rx, replay, skip_upto, given, feed } => {
                // Read before looking at the queue: the feed sends a change before it
                // advances its progress past it.
                let fed = feed.progress.load(Ordering::Acquire);
                // The next change, waiting or still to be sent, may be of the same revision
                // as the last one given.
                let given = (*given - 1).max(*skip_upto);
                match replay.is_empty() && rx.is_empty() {
                    true => fed.max(given),
                    false => given,
                }
            }
            Source::Direct(stream, _) => stream.next_revision() - 1,
        }
    }
}
