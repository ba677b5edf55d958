//! The cluster as control loops see it: typed enough to be mocked, plain JSON objects.

use std::future::Future;
use std::sync::Arc;

use corral_api::meta::JsonAt;
use serde_json::Value;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
    /// The revision a watch was to resume from is no longer kept: list again.
    Expired,
}

/// One change of a watched resource; the object carries its resourceVersion.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// Shared with the server's other watchers of the change.
    pub object: Arc<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The object changed since it was read (or the server is no longer leader and its
    /// write could not be made): read again.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Other(String),
}

pub type ClusterResult<T> = Result<T, ClusterError>;

/// The API calls the control loops make. `plural` is `pods`, `apps/replicasets`, ...
pub trait Cluster: Send + Sync + 'static {
    /// Every object of the resource, then its changes from the list's revision on, until the
    /// receiver is dropped or the watch ends (then list and watch again).
    fn list_watch(
        &self,
        plural: &str,
    ) -> impl Future<Output = ClusterResult<(Vec<Value>, mpsc::Receiver<WatchEvent>)>> + Send;
    /// The resource's changes after revision `after`, to resume a watch that ended; an
    /// `Expired` event when that revision is compacted away.
    fn watch(
        &self,
        plural: &str,
        after: &str,
    ) -> impl Future<Output = ClusterResult<mpsc::Receiver<WatchEvent>>> + Send;
    /// The objects of a namespace ("": every namespace) matching a label selector ("":
    /// all), as one list.
    fn list(
        &self,
        plural: &str,
        namespace: &str,
        labels: &str,
    ) -> impl Future<Output = ClusterResult<Vec<Value>>> + Send;
    /// One object, read through a quorum (to confirm what an informer may not show yet).
    fn get(&self, plural: &str, namespace: &str, name: &str) -> impl Future<Output = ClusterResult<Value>> + Send;
    fn create(&self, plural: &str, namespace: &str, object: Value)
    -> impl Future<Output = ClusterResult<Value>> + Send;
    /// Replaces the object if its resourceVersion is still the one given in it.
    fn update(&self, plural: &str, object: Value) -> impl Future<Output = ClusterResult<Value>> + Send;
    /// The status subresource, compare-and-swap like `update`.
    fn update_status(&self, plural: &str, object: Value) -> impl Future<Output = ClusterResult<Value>> + Send;
    /// Deletes with the options of a DeleteOptions body (preconditions, propagation).
    fn delete(
        &self,
        plural: &str,
        namespace: &str,
        name: &str,
        options: Value,
    ) -> impl Future<Output = ClusterResult<()>> + Send;
    /// Creates an Event, or replaces the one of the same name (a repeat with its new count).
    fn put_event(&self, event: Value) -> impl Future<Output = ClusterResult<()>> + Send;
    /// pods/binding: sets the pod's node if it has none. `pod` is the pod as the caller last
    /// saw it (with its resourceVersion): the write starts from it and reads the store only
    /// if it is no longer current.
    fn bind(&self, pod: &Value, node: &str) -> impl Future<Output = ClusterResult<()>> + Send;
}

pub use corral_api::meta::str_at as text;

/// Seconds since the epoch, as Kubernetes' timestamps count them.
pub fn now_seconds() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(pod: &Value) -> bool {
    pod.at("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Leaves out counts that are zero, as Kubernetes' `omitempty` does.
pub fn omit_zeros(status: &mut Value, fields: &[&str]) {
    if let Some(map) = status.as_object_mut() {
        map.retain(|k, v| !(fields.contains(&k.as_str()) && v.as_i64() == Some(0)));
    }
}

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn key_of(obj: &Value) -> String {
    let (ns, name) = (text(obj, "/metadata/namespace"), text(obj, "/metadata/name"));
    if ns.is_empty() { name.to_string() } else { format!("{ns}/{name}") }
}
