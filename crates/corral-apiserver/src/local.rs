//! The server's own API as the control loops' `Cluster`: calls go straight to `Api` (no
//! HTTP), so every write is proposed through this server's Raft, compare-and-swap on the
//! resourceVersion the caller read.

use std::sync::Arc;

use corral_api::{ApiError, meta};
use corral_controllers::cluster::{ClusterError, ClusterResult, EventKind, WatchEvent};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{Api, Output, Query, Reply};
use crate::route::object_route;
use crate::storage::Stored;

pub struct LocalCluster {
    pub api: Arc<Api>,
}

fn error(e: ApiError) -> ClusterError {
    match e {
        ApiError::Conflict { .. } => ClusterError::Conflict(e.to_string()),
        ApiError::NotFound { .. } => ClusterError::NotFound(e.to_string()),
        ApiError::AlreadyExists { .. } => ClusterError::AlreadyExists(e.to_string()),
        other => ClusterError::Other(other.to_string()),
    }
}

fn object(reply: Reply) -> Value {
    reply.into_object()
}

fn namespace_of(obj: &Value) -> Option<&str> {
    meta::namespace(obj).filter(|n| !n.is_empty())
}

impl corral_controllers::Cluster for LocalCluster {
    async fn list_watch(&self, plural: &str) -> ClusterResult<(Vec<Value>, mpsc::Receiver<WatchEvent>)> {
        let route = object_route(plural, None, None);
        let list = object(self.api.list(&route, &Query::default(), Output::default()).await.map_err(error)?);
        let rv = list.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("0").to_string();
        let items = list.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok((items, self.watch(plural, &rv).await?))
    }

    async fn watch(&self, plural: &str, after: &str) -> ClusterResult<mpsc::Receiver<WatchEvent>> {
        let route = object_route(plural, None, None);
        let q = Query([("resourceVersion".to_string(), after.to_string())].into_iter().collect());
        let Reply::Watch(mut rx) = self.api.watch(&route, &q, Output::default()).await.map_err(error)? else {
            return Err(ClusterError::Other("the watch answered with an object".into()));
        };
        let (tx, events) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let kind = match event.kind {
                    "ADDED" => EventKind::Added,
                    "MODIFIED" => EventKind::Modified,
                    "DELETED" => EventKind::Deleted,
                    // BOOKMARK carries nothing; ERROR (a compacted revision) ends the watch.
                    "BOOKMARK" => continue,
                    _ => EventKind::Expired,
                };
                // The watch cache's own object, shared: informers keep it without a copy.
                let object = event.object;
                if tx.send(WatchEvent { kind, object }).await.is_err() || kind == EventKind::Expired {
                    break;
                }
            }
        });
        Ok(events)
    }

    async fn list(&self, plural: &str, namespace: &str, labels: &str) -> ClusterResult<Vec<Value>> {
        let ns = (!namespace.is_empty()).then_some(namespace);
        let route = object_route(plural, ns, None);
        let q = Query([("labelSelector".to_string(), labels.to_string())].into_iter().collect());
        let list = object(self.api.list(&route, &q, Output::default()).await.map_err(error)?);
        Ok(list.get("items").and_then(Value::as_array).cloned().unwrap_or_default())
    }

    async fn get(&self, plural: &str, namespace: &str, name: &str) -> ClusterResult<Value> {
        let ns = (!namespace.is_empty()).then_some(namespace);
        let route = object_route(plural, ns, None);
        Ok(object(self.api.get(&route, name, &Query::default(), Output::default()).await.map_err(error)?))
    }

    async fn create(&self, plural: &str, namespace: &str, obj: Value) -> ClusterResult<Value> {
        let ns = (!namespace.is_empty()).then_some(namespace);
        let route = object_route(plural, ns, None);
        Ok(object(self.api.create(&route, obj, &Query::default(), Output::default()).await.map_err(error)?))
    }

    async fn update(&self, plural: &str, obj: Value) -> ClusterResult<Value> {
        let route = object_route(plural, namespace_of(&obj), None);
        let name = meta::name(&obj).to_string();
        Ok(object(self.api.update(&route, &name, obj, &Query::default(), Output::default()).await.map_err(error)?))
    }

    async fn update_status(&self, plural: &str, obj: Value) -> ClusterResult<Value> {
        let route = object_route(plural, namespace_of(&obj), Some("status"));
        let name = meta::name(&obj).to_string();
        Ok(object(self.api.update(&route, &name, obj, &Query::default(), Output::default()).await.map_err(error)?))
    }

    async fn delete(&self, plural: &str, namespace: &str, name: &str, options: Value) -> ClusterResult<()> {
        let ns = (!namespace.is_empty()).then_some(namespace);
        let route = object_route(plural, ns, None);
        self.api.delete(&route, name, &options, &Query::default()).await.map(|_| ()).map_err(error)
    }

    async fn put_event(&self, event: Value) -> ClusterResult<()> {
        self.api.put_event(event).await.map_err(error)
    }

    async fn bind(&self, pod: &Value, node: &str) -> ClusterResult<()> {
        let text = |path: &str| meta::str_at(pod, path);
        let (namespace, name, uid) = (text("/metadata/namespace"), text("/metadata/name"), text("/metadata/uid"));
        let route = object_route("pods", Some(namespace), Some("binding"));
        let body = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "uid": uid},
                          "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        // The pod as stored: without the resourceVersion it was presented with.
        let known = meta::parse_resource_version(text("/metadata/resourceVersion")).ok().map(|rev| {
            let mut value = pod.clone();
            meta::metadata_mut(&mut value).remove("resourceVersion");
            Stored { value, rev }
        });
        self.api.bind_from(&route, name, &body, &Query::default(), known).await.map(|_| ()).map_err(error)
    }
}
