//! The namespaces every cluster has, and the removal of a deleted namespace's content.

use std::time::Duration;

use corral_api::meta::{self, Minter};
use corral_api::resources::{self, RESOURCES};
use serde_json::json;

use crate::storage::{ObjectStore, WriteOutcome};

pub const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Creates the system namespaces that do not exist yet. Safe on every server and every
/// start: creation is a compare-and-swap on absence.
pub async fn ensure_system(
    store: &ObjectStore,
    mint: &dyn Minter,
    ranges: &crate::services::Ranges,
) -> Result<(), corral_api::ApiError> {
    let r = resources::find("", "namespaces").expect("namespaces are served");
    for name in SYSTEM_NAMESPACES {
        let key = r.key(None, name);
        if store.get(&key, false).await?.is_some() {
            continue;
        }
        let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        meta::prepare_create(r, &mut ns, None, mint)?;
        crate::defaults::apply(r, &mut ns);
        store.put_if(&key, &ns, 0).await?;
    }
    crate::services::ensure_kubernetes(store, mint, ranges).await
}

/// Deletes everything in a terminating namespace, then the namespace. Runs on the server
/// that accepted the DELETE, at once; `run_controller` on the leader finishes the work if
/// that server dies first.
pub fn spawn_cleanup(store: ObjectStore, namespace: String) {
    tokio::spawn(async move {
        for attempt in 0..30 {
            match cleanup(&store, &namespace).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(namespace, attempt, error = %e, "namespace cleanup"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// The namespace controller on the Raft leader: empties and removes every terminating
/// namespace, so one whose cleaner died with its server is finished anyway. Runs until
/// aborted.
pub async fn run_controller(store: ObjectStore) {
    let r = resources::find("", "namespaces").expect("namespaces are served");
    loop {
        match store.list(&r.prefix(None), None, 0, 0, false).await {
            Ok(page) => {
                for ns in page.items.iter().filter(|ns| ns.value.pointer("/metadata/deletionTimestamp").is_some()) {
                    let name = meta::name(&ns.value);
                    if let Err(e) = cleanup(&store, name).await {
                        tracing::debug!(namespace = name, error = %e, "namespace cleanup");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "listing namespaces"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One pass; true once the namespace is gone. The namespace itself goes only after a pass
/// that found nothing left in it: content created while the previous pass deleted (a write
/// that passed the Terminating check just before it was set) is caught by the next one.
async fn cleanup(store: &ObjectStore, namespace: &str) -> Result<bool, corral_api::ApiError> {
    let mut left = 0;
    for r in RESOURCES.iter().filter(|r| r.namespaced && r.stored()) {
        let page = store.list(&r.prefix(Some(namespace)), None, 0, 0, false).await?;
        for item in page.items {
            let finalizers = item.value.pointer("/metadata/finalizers").and_then(|f| f.as_array()).map_or(0, Vec::len);
            if finalizers > 0 {
                left += 1;
                continue;
            }
            let key = r.key(Some(namespace), meta::name(&item.value));
            let side = crate::services::side_of_delete(r, &item.value);
            // Deleted now or changed meanwhile: either way the next pass looks again.
            store.delete_if_with(&key, item.rev, &side).await?;
            left += 1;
        }
    }
    if left > 0 {
        return Ok(false);
    }
    let r = resources::find("", "namespaces").expect("namespaces are served");
    let key = r.key(None, namespace);
    match store.get(&key, false).await? {
        None => Ok(true),
        Some(ns) => Ok(matches!(store.delete_if(&key, ns.rev).await?, WriteOutcome::Written(_))),
    }
}
