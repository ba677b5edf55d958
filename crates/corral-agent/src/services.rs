//! The node's view of the cluster's Services, EndpointSlices and Nodes, kept by watches on
//! the servers (resumed from the last revision, as the pod watch), and the loops that keep
//! the service proxy's rules (`proxy`) and the routes to other nodes' pods (`routes`) equal
//! to it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_proto::agent::{self as proto, AgentRequest, agent_request, pod_event::Type, watch_services::Resource};
use serde_json::Value;
use tokio::sync::watch;

use crate::agent::follow;
use crate::link::Link;
use crate::proxy::{self, Firewall};
use crate::routes::{self, IpRoutes};
use crate::spec::str_at;

/// Changes closer together than this go out as one rule update.
const SETTLE: Duration = Duration::from_millis(100);
/// How long a refused rule update waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Routes are checked this often even when no Node changed.
const ROUTES_RESYNC: Duration = Duration::from_secs(30);

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
        self.apply_kept(event, |o| o)
    }

    /// Applies one event, keeping of each object what `keep` returns.
    pub fn apply_kept(&mut self, event: &proto::PodEvent, keep: impl Fn(Value) -> Value) -> bool {
        self.revision = self.revision.max(event.revision);
        let object = || serde_json::from_slice::<Value>(&event.object).ok().map(&keep);
        match Type::try_from(event.r#type).unwrap_or(Type::Unspecified) {
            Type::Snapshot => {
                let all: Vec<Value> = serde_json::from_slice(&event.object).unwrap_or_default();
                self.by_key = all.into_iter().map(&keep).map(|o| (key(&o), o)).collect();
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

/// Services, EndpointSlices and Nodes as this node last heard of them. Each change bumps a
/// version that any number of readers follow (the proxy and DNS the services', routes the
/// nodes').
pub struct ServiceView {
    pub services: Mutex<Objects>,
    pub slices: Mutex<Objects>,
    pub nodes: Mutex<Objects>,
    services_version: watch::Sender<u64>,
    nodes_version: watch::Sender<u64>,
}

impl Default for ServiceView {
    fn default() -> Self {
        ServiceView {
            services: Mutex::default(),
            slices: Mutex::default(),
            nodes: Mutex::default(),
            services_version: watch::channel(0).0,
            nodes_version: watch::channel(0).0,
        }
    }
}

impl ServiceView {
    /// Keeps the view current, for good.
    pub async fn follow(self: Arc<Self>, link: Arc<Link>) {
        let services = tokio::spawn(self.clone().follow_one(link.clone(), Resource::Services));
        let slices = tokio::spawn(self.clone().follow_one(link.clone(), Resource::EndpointSlices));
        let nodes = tokio::spawn(self.clone().follow_one(link, Resource::Nodes));
        let _ = tokio::join!(services, slices, nodes);
    }

    fn objects(&self, resource: Resource) -> &Mutex<Objects> {
        match resource {
            Resource::Services => &self.services,
            Resource::Nodes => &self.nodes,
            _ => &self.slices,
        }
    }

    async fn follow_one(self: Arc<Self>, link: Arc<Link>, resource: Resource) {
        let what = match resource {
            Resource::Services => "service watch",
            Resource::Nodes => "node watch",
            _ => "endpoint slice watch",
        };
        let request = || {
            let from = self.objects(resource).lock().expect("not poisoned").revision;
            let watch = proto::WatchServices { resource: resource as i32, from_revision: from };
            (from, AgentRequest { kind: Some(agent_request::Kind::WatchServices(watch)) })
        };
        // Of a Node only what routes need: a Node carries its images and more.
        let keep = move |o: Value| if resource == Resource::Nodes { routes::routing_fields(o) } else { o };
        follow(&link, what, request, |event| {
            if self.objects(resource).lock().expect("not poisoned").apply_kept(&event, keep) {
                let version = if resource == Resource::Nodes { &self.nodes_version } else { &self.services_version };
                version.send_modify(|v| *v += 1);
            }
        })
        .await
    }

    /// Follows the version of the Services and EndpointSlices.
    pub fn services_changes(&self) -> watch::Receiver<u64> {
        self.services_version.subscribe()
    }

    /// The service ports and their endpoints now, as node `node` sees them (its own
    /// endpoints marked); None until both watches have sent their snapshot.
    pub fn ports(&self, node: &str) -> Option<Vec<proxy::ServicePort>> {
        let services = self.services.lock().expect("not poisoned");
        let slices = self.slices.lock().expect("not poisoned");
        (services.known && slices.known)
            .then(|| proxy::service_ports(services.by_key.values(), slices.by_key.values(), node))
    }
}

/// Keeps table `ip <table>` equal to the view's rules, for good. Nothing is written before
/// the view is complete, so an agent restarted over working rules keeps them until it knows
/// better.
pub async fn run_proxy<F: Firewall>(
    view: Arc<ServiceView>,
    firewall: F,
    table: String,
    node: String,
    pod_cidr: Option<String>,
) {
    let mut applied: Option<String> = None;
    let mut changes = view.services_changes();
    loop {
        changes.mark_unchanged();
        let Some(ports) = view.ports(&node) else {
            let _ = changes.changed().await;
            continue;
        };
        let script = proxy::render(&table, &ports, pod_cidr.as_deref());
        if applied.as_ref() != Some(&script) {
            let started = std::time::Instant::now();
            match firewall.apply(&script).await {
                Ok(()) => {
                    let endpoints: usize = ports.iter().map(|p| p.backends.len()).sum();
                    let ms = started.elapsed().as_millis() as u64;
                    tracing::info!(table = %table, ports = ports.len(), endpoints, ms, "service rules written");
                    applied = Some(script);
                }
                Err(e) => {
                    tracing::warn!(table = %table, error = %e, "service rules not written; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        let _ = changes.changed().await;
        tokio::time::sleep(SETTLE).await;
    }
}

/// Keeps this machine's routes to the other nodes' pod CIDRs equal to what the Nodes say,
/// for good; checked again every `ROUTES_RESYNC` in case someone removed one.
pub async fn run_routes(view: Arc<ServiceView>, routes: IpRoutes, me: String) {
    let mut changes = view.nodes_version.subscribe();
    loop {
        changes.mark_unchanged();
        let desired = {
            let nodes = view.nodes.lock().expect("not poisoned");
            nodes.known.then(|| routes::plan(nodes.by_key.values(), &me))
        };
        if let Some(desired) = desired {
            match routes.reconcile(&desired).await {
                Ok((0, 0)) => {}
                Ok((set, removed)) => {
                    tracing::info!(set, removed, routes = desired.len(), "routes to other nodes' pods")
                }
                Err(e) => tracing::warn!(error = %e, "routes to other nodes' pods not written; retrying"),
            }
        }
        let _ = tokio::time::timeout(ROUTES_RESYNC, changes.changed()).await;
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
