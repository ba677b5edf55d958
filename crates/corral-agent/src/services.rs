//! The node's view of the cluster's Services and EndpointSlices, kept by two watches on the
//! servers (resumed from the last revision, as the pod watch), and the loop that keeps the
//! service proxy's rules equal to it (`proxy`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_proto::agent::{self as proto, AgentRequest, agent_request, pod_event::Type, watch_services::Resource};
use serde_json::Value;
use tokio::sync::Notify;

use crate::agent::follow;
use crate::link::Link;
use crate::proxy::{self, Firewall};
use crate::spec::str_at;

/// Changes closer together than this go out as one rule update.
const SETTLE: Duration = Duration::from_millis(100);
/// How long a refused rule update waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The objects of one watched resource, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Objects {
    pub by_key: BTreeMap<String, Value>,
    pub revision: i64,
    /// Whether a snapshot has arrived (until then, what is here may be stale or partial).
    pub known: bool,
}

fn key(obj: &Value) -> String {
    format!("{}/{}", str_at(obj, "/metadata/namespace"), str_at(obj, "/metadata/name"))
}

impl Objects {
    /// Applies one event; true when the objects changed.
    pub fn apply(&mut self, event: &proto::PodEvent) -> bool {
        self.revision = self.revision.max(event.revision);
        let object = || serde_json::from_slice::<Value>(&event.object).ok();
        match Type::try_from(event.r#type).unwrap_or(Type::Unspecified) {
            Type::Snapshot => {
                let all: Vec<Value> = serde_json::from_slice(&event.object).unwrap_or_default();
                self.by_key = all.into_iter().map(|o| (key(&o), o)).collect();
                self.known = true;
                true
            }
            Type::Put => {
                let Some(o) = object() else { return false };
                self.by_key.insert(key(&o), o);
                true
            }
            Type::Delete => object().is_some_and(|o| self.by_key.remove(&key(&o)).is_some()),
            Type::Progress | Type::Unspecified => false,
        }
    }
}

/// Services and EndpointSlices as this node last heard of them.
#[derive(Default)]
pub struct ServiceView {
    pub services: Mutex<Objects>,
    pub slices: Mutex<Objects>,
    changed: Notify,
}

impl ServiceView {
    /// Keeps the view current, for good.
    pub async fn follow(self: Arc<Self>, link: Arc<Link>) {
        let services = tokio::spawn(self.clone().follow_one(link.clone(), Resource::Services));
        let slices = tokio::spawn(self.clone().follow_one(link, Resource::EndpointSlices));
        let _ = tokio::join!(services, slices);
    }

    fn objects(&self, resource: Resource) -> &Mutex<Objects> {
        if resource == Resource::Services { &self.services } else { &self.slices }
    }

    async fn follow_one(self: Arc<Self>, link: Arc<Link>, resource: Resource) {
        let what = if resource == Resource::Services { "service watch" } else { "endpoint slice watch" };
        let request = || {
            let from = self.objects(resource).lock().expect("not poisoned").revision;
            let watch = proto::WatchServices { resource: resource as i32, from_revision: from };
            (from, AgentRequest { kind: Some(agent_request::Kind::WatchServices(watch)) })
        };
        follow(&link, what, request, |event| {
            if self.objects(resource).lock().expect("not poisoned").apply(&event) {
                self.changed.notify_one();
            }
        })
        .await
    }

    /// The service ports and their endpoints now; None until both watches have sent their
    /// snapshot.
    pub fn ports(&self) -> Option<Vec<proxy::ServicePort>> {
        let services = self.services.lock().expect("not poisoned");
        let slices = self.slices.lock().expect("not poisoned");
        (services.known && slices.known).then(|| proxy::service_ports(services.by_key.values(), slices.by_key.values()))
    }
}

/// Keeps table `ip <table>` equal to the view's rules, for good. Nothing is written before
/// the view is complete, so an agent restarted over working rules keeps them until it knows
/// better.
pub async fn run_proxy<F: Firewall>(view: Arc<ServiceView>, firewall: F, table: String) {
    let mut applied: Option<String> = None;
    loop {
        let Some(ports) = view.ports() else {
            view.changed.notified().await;
            continue;
        };
        let script = proxy::render(&table, &ports);
        if applied.as_ref() != Some(&script) {
            let started = std::time::Instant::now();
            match firewall.apply(&script).await {
                Ok(()) => {
                    tracing::info!(table = %table, ports = ports.len(), ms = started.elapsed().as_millis() as u64, "service rules written");
                    applied = Some(script);
                }
                Err(e) => {
                    tracing::warn!(table = %table, error = %e, "service rules not written; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        view.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: Type, revision: i64, object: Value) -> proto::PodEvent {
        proto::PodEvent { r#type: kind as i32, revision, object: serde_json::to_vec(&object).unwrap() }
    }

    #[test]
    fn a_snapshot_replaces_then_changes_apply_in_order() {
        let mut objects = Objects::default();
        let svc =
            |name: &str, ip: &str| json!({"metadata": {"namespace": "shop", "name": name}, "spec": {"clusterIP": ip}});
        assert!(objects.apply(&event(Type::Snapshot, 10, json!([svc("web", "10.96.0.20"), svc("db", "10.96.0.21")]))));
        assert!(objects.known);
        assert!(objects.apply(&event(Type::Put, 11, svc("web", "10.96.0.22"))));
        assert!(objects.apply(&event(Type::Delete, 12, svc("db", "10.96.0.21"))));
        assert!(
            !objects.apply(&event(Type::Delete, 13, svc("gone", ""))),
            "deleting what is not there changes nothing"
        );
        assert!(!objects.apply(&event(Type::Progress, 20, json!(null))));
        assert_eq!(objects.revision, 20);
        let keys: Vec<&str> = objects.by_key.keys().map(String::as_str).collect();
        assert_eq!(keys, ["shop/web"]);
        assert_eq!(objects.by_key["shop/web"]["spec"]["clusterIP"], "10.96.0.22");
    }
}
