//! An informer: the objects of one resource kept from a list and a watch, listed again when
//! the watch ends; waiters are woken on every change. `Informers` shares one informer per
//! resource among all the control loops of a term.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::cluster::{Cluster, EventKind, key_of};

const RETRY: Duration = Duration::from_millis(500);
const RESUME: Duration = Duration::from_millis(20);

fn revision(obj: &Value) -> i64 {
    crate::cluster::text(obj, "/metadata/resourceVersion").parse().unwrap_or(0)
}

type Running = (Arc<Informer>, tokio::task::JoinHandle<()>);
type Starter = dyn Fn(&str) -> Running + Send + Sync;

/// One informer per resource, started on first use, shared by every loop that asks for it;
/// dropping the last handle stops them all.
pub struct Informers {
    start: Box<Starter>,
    running: Mutex<HashMap<String, Running>>,
}

impl Informers {
    pub fn new<C: Cluster>(cluster: Arc<C>) -> Arc<Informers> {
        Arc::new(Informers {
            start: Box::new(move |plural| Informer::start(cluster.clone(), plural)),
            running: Mutex::new(HashMap::new()),
        })
    }

    /// The informer of `plural`, synced (its first list read).
    pub async fn get(&self, plural: &str) -> Arc<Informer> {
        let informer = {
            let mut running = self.running.lock().expect("not poisoned");
            running.entry(plural.to_string()).or_insert_with(|| (self.start)(plural)).0.clone()
        };
        informer.synced().await;
        informer
    }
}

impl Drop for Informers {
    fn drop(&mut self) {
        for (_, task) in self.running.get_mut().expect("not poisoned").values() {
            task.abort();
        }
    }
}

/// The objects of one resource, by `namespace/name`.
pub struct Informer {
    plural: String,
    objects: Mutex<HashMap<String, Arc<Value>>>,
    changed: Notify,
    /// Turns true once the first list has been read.
    synced: watch::Sender<bool>,
}

impl Informer {
    /// Starts keeping `plural` from `cluster`; runs until the task is aborted.
    pub fn start<C: Cluster>(cluster: Arc<C>, plural: &str) -> (Arc<Informer>, tokio::task::JoinHandle<()>) {
        let informer = Arc::new(Informer {
            plural: plural.to_string(),
            objects: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            synced: watch::channel(false).0,
        });
        let task = tokio::spawn(informer.clone().run(cluster));
        (informer, task)
    }

    async fn run<C: Cluster>(self: Arc<Self>, cluster: Arc<C>) {
        // Where a watch that ended resumes; None: list everything again.
        let mut resume: Option<i64> = None;
        loop {
            let mut rx = match resume.take() {
                Some(rv) => match cluster.watch(&self.plural, &rv.to_string()).await {
                    Ok(rx) => rx,
                    Err(e) => {
                        tracing::debug!(resource = %self.plural, error = %e, "informer could not resume; listing");
                        continue;
                    }
                },
                None => {
                    let (items, rx) = match cluster.list_watch(&self.plural).await {
                        Ok(opened) => opened,
                        Err(e) => {
                            tracing::debug!(resource = %self.plural, error = %e, "informer list failed; retrying");
                            tokio::time::sleep(RETRY).await;
                            continue;
                        }
                    };
                    resume = items.iter().map(revision).max();
                    // What was deleted while the watch was down disappears with the new list.
                    *self.objects.lock().expect("not poisoned") =
                        items.into_iter().map(|o| (key_of(&o), Arc::new(o))).collect();
                    self.synced.send_replace(true);
                    self.changed.notify_waiters();
                    rx
                }
            };
            let mut expired = false;
            while let Some(event) = rx.recv().await {
                if event.kind == EventKind::Expired {
                    expired = true;
                    break;
                }
                resume = Some(resume.unwrap_or(0).max(revision(&event.object)));
                let key = key_of(&event.object);
                let mut objects = self.objects.lock().expect("not poisoned");
                if event.kind == EventKind::Deleted {
                    objects.remove(&key);
                } else {
                    objects.insert(key, Arc::new(event.object));
                }
                drop(objects);
                self.changed.notify_waiters();
            }
            if expired {
                resume = None;
            }
            // A watch dropped for falling behind resumes from its last revision (the store
            // keeps the history); only a compacted one lists everything again.
            tracing::debug!(resource = %self.plural, resume = ?resume, "informer watch ended");
            tokio::time::sleep(if resume.is_some() { RESUME } else { RETRY }).await;
        }
    }

    /// Waits until the first list has been read.
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Resolves at the next change (create it before reading, so nothing is missed).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.objects.lock().expect("not poisoned").get(key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Value>> {
        self.objects.lock().expect("not poisoned").values().cloned().collect()
    }
}

/// Waits before a loop's next pass: at least `debounce`, and long enough that the pass that
/// just ran (`worked`, its time before waiting for news) was at most `share` of the time, so
/// a loop whose passes grow with the cluster spends at most that share of a core however fast
/// changes come (they are taken together in the next pass). The shares of all loops add up
/// to well under one core: the leader also serves the API and replicates.
pub async fn pace(worked: Duration, debounce: Duration, share: f64) {
    let rest = worked.mul_f64((1.0 - share) / share.clamp(0.01, 1.0));
    tokio::time::sleep(debounce.max(rest)).await;
}
