//! An informer: the objects of one resource kept from a list and a watch, listed again when
//! the watch ends; waiters are woken on every change. `Informers` shares one informer per
//! resource among all the control loops of a term.

use std::collections::{BTreeMap, HashMap};
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

/// The objects of one resource, by `namespace/name`: in order, so that one namespace's
/// objects are a range of keys.
pub struct Informer {
    plural: String,
    objects: Mutex<BTreeMap<String, Arc<Value>>>,
    changed: Notify,
    /// Turns true once the first list has been read.
    synced: watch::Sender<bool>,
}

impl Informer {
    /// Starts keeping `plural` from `cluster`; runs until the task is aborted.
    pub fn start<C: Cluster>(cluster: Arc<C>, plural: &str) -> (Arc<Informer>, tokio::task::JoinHandle<()>) {
        let informer = Arc::new(Informer {
            plural: plural.to_string(),
            objects: Mutex::new(BTreeMap::new()),
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
                    objects.insert(key, event.object);
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

    /// The objects of one namespace (of a namespaced resource), without reading any other's.
    pub fn list_in(&self, namespace: &str) -> Vec<Arc<Value>> {
        // Keys are `namespace/name`; '0' is the character after '/'.
        let (from, to) = (format!("{namespace}/"), format!("{namespace}0"));
        self.objects.lock().expect("not poisoned").range(from..to).map(|(_, o)| o.clone()).collect()
    }
}

/// What a loop read from each object, kept per object version: an informer hands out the
/// same `Arc` for a version until it changes, so a pass looks its objects up by address
/// instead of reading their JSON again. The memo holds each `Arc`, so an address is never
/// reused while it is kept.
pub struct ByVersion<T> {
    seen: HashMap<usize, (Arc<Value>, T)>,
}

impl<T> Default for ByVersion<T> {
    fn default() -> Self {
        Self { seen: HashMap::new() }
    }
}

impl<T: Clone> ByVersion<T> {
    /// What `read` makes of this version of the object, read once.
    pub fn get(&mut self, object: &Arc<Value>, read: impl FnOnce(&Arc<Value>) -> T) -> T {
        let entry = self.seen.entry(Arc::as_ptr(object) as usize).or_insert_with(|| (object.clone(), read(object)));
        entry.1.clone()
    }

    /// Forgets versions that are not in `live` (the objects as they are now), once those
    /// are a good part of what is kept.
    pub fn forget_gone(&mut self, live: &[Arc<Value>]) {
        if self.seen.len() > live.len() + live.len() / 4 + 1024 {
            let current: std::collections::HashSet<usize> = live.iter().map(|o| Arc::as_ptr(o) as usize).collect();
            self.seen.retain(|address, _| current.contains(address));
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_lists_its_own_objects_only() {
        let informer = Informer {
            plural: "pods".into(),
            objects: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            synced: watch::channel(true).0,
        };
        // Names that sort around `a/`: a namespace that extends another, one that is its
        // prefix, and a cluster-scoped key.
        for (ns, name) in [("a", "p1"), ("a", "p2"), ("a-b", "p3"), ("ab", "p4"), ("", "a"), ("b", "p5")] {
            let pod = serde_json::json!({"metadata": {"namespace": ns, "name": name}});
            informer.objects.lock().unwrap().insert(key_of(&pod), Arc::new(pod));
        }
        let names = |ns: &str| -> Vec<String> {
            informer.list_in(ns).iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(names("a"), ["p1", "p2"]);
        assert_eq!(names("a-b"), ["p3"]);
        assert_eq!(names("b"), ["p5"]);
        assert!(names("c").is_empty());
    }

    #[test]
    fn a_version_is_read_once_and_forgotten_when_gone() {
        let mut memo: ByVersion<String> = ByVersion::default();
        let mut reads = 0;
        let mut read = |o: &Arc<Value>| {
            reads += 1;
            o["v"].to_string()
        };
        let first: Vec<Arc<Value>> = (0..2000).map(|i| Arc::new(serde_json::json!({"v": i}))).collect();
        for o in &first {
            memo.get(o, &mut read);
        }
        assert_eq!(memo.get(&first[7], &mut read), "7");
        // Every object changes: the old versions go once the new ones are far more.
        let second: Vec<Arc<Value>> = (0..2000).map(|i| Arc::new(serde_json::json!({"v": i + 10_000}))).collect();
        for o in &second {
            memo.get(o, &mut read);
        }
        memo.forget_gone(&second);
        assert_eq!(memo.len(), 2000, "only the versions listed now are kept");
        assert_eq!(memo.get(&second[7], &mut read), "10007");
        assert_eq!(reads, 4000, "each version read once");
    }
}
