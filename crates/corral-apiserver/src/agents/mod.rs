//! The agent endpoint every server runs: QUIC with mutual TLS, one stream per request.
//! Agents join with a token (and get a node certificate), watch the pods bound to their
//! node from a revision, report node and pod status in batches, and look up the objects
//! their pods refer to. Every write goes through the API's own paths (`Api`), so agents get
//! the same validation, compare-and-swap and deletion semantics as kubectl.

pub mod rules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_api::metrics::NodeSample;
use corral_api::{ApiError, meta};
use corral_proto::agent::{
    AgentRequest, AgentResponse, Found, Join, Joined, Lookup, PodEvent, PodRef, Refused, Report, Reported,
    ServerRequest, StreamReply, agent_request, agent_response, pod_event::Type,
    watch_services::Resource as WatchResource,
};
use corral_transport::{CertificateAuthority, JoinToken, frame, quic};
use serde_json::{Value, json};

use crate::api::{Api, Output, Query, Reply};
use crate::cache::ChangeSource;
use crate::storage::{Stored, WriteOutcome};

/// How often an idle pod watch tells the agent how far it has got.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The Lease duration agents' heartbeats promise (kubelet's default).
const LEASE_SECONDS: i64 = 40;
/// Where each server records its agent address, for agents to fail over to.
const SERVERS_PREFIX: &str = "/registry/corral/servers/";

/// The Node annotation naming the server a node's agent reports through.
pub const REPORTING_SERVER: &str = "corral.dev/reporting-server";

pub struct AgentEndpoint {
    api: Arc<Api>,
    ca: CertificateAuthority,
    ca_hash: String,
    server_name: String,
    advertise: String,
    /// The open connections of each node's agent (for the streams servers open to agents).
    connections: Mutex<HashMap<String, Vec<quinn::Connection>>>,
}

type Send = quinn::SendStream;

use crate::route::object_route as route;

/// The resource a `WatchServices` names.
fn watched_plural(resource: i32) -> Option<&'static str> {
    match WatchResource::try_from(resource).ok()? {
        WatchResource::Services => Some("services"),
        WatchResource::EndpointSlices => Some("discovery.k8s.io/endpointslices"),
        WatchResource::Nodes => Some("nodes"),
        WatchResource::Unspecified => None,
    }
}

fn refused(message: impl Into<String>) -> AgentResponse {
    AgentResponse { kind: Some(agent_response::Kind::Refused(Refused { message: message.into() })) }
}

fn object(reply: Reply) -> Value {
    reply.into_object()
}

impl AgentEndpoint {
    /// `ca` signs agents' certificates; `advertise` is the address agents reach this
    /// server's endpoint at.
    pub fn new(api: Arc<Api>, ca: CertificateAuthority, server_name: &str, advertise: &str) -> Arc<Self> {
        let ca_hash = quic::ca_hash(ca.cert_pem()).expect("the cluster CA is a certificate");
        Arc::new(Self {
            api,
            ca,
            ca_hash,
            server_name: server_name.to_string(),
            advertise: advertise.to_string(),
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts agents until `stop` turns true.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, mut stop: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(self.clone().publish(stop.clone()));
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i { Some(i) => i, None => break },
                _ = stop.wait_for(|s| *s) => break,
            };
            tokio::spawn(self.clone().connection(incoming));
        }
        endpoint.close(0u32.into(), b"server stopping");
    }

    /// Records this server's agent address in the store (retried until a leader takes it).
    async fn publish(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let key = format!("{SERVERS_PREFIX}{}", self.server_name);
        let record = json!({"name": self.server_name, "agentAddress": self.advertise});
        for _ in 0..600 {
            let done = match self.api.store.get(&key, false).await {
                Ok(Some(s)) if s.value == record => true,
                Ok(found) => {
                    matches!(
                        self.api.store.put_if(&key, &record, found.map_or(0, |f| f.rev)).await,
                        Ok(WriteOutcome::Written(_))
                    )
                }
                Err(_) => false,
            };
            if done {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        tracing::warn!("gave up recording this server's agent address");
    }

    async fn servers(&self) -> Vec<String> {
        let mut out = vec![self.advertise.clone()];
        if let Ok(page) = self.api.store.list(SERVERS_PREFIX, None, 0, 0, true).await {
            for s in page.items {
                if let Some(addr) = s.value.get("agentAddress").and_then(Value::as_str)
                    && !out.iter().any(|o| o == addr)
                {
                    out.push(addr.to_string());
                }
            }
        }
        out
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "an agent's handshake failed");
                return;
            }
        };
        let node = quic::peer(&conn).and_then(|p| rules::node_of(&p.name, &p.groups));
        let span = tracing::info_span!("agent", node = node.as_deref().unwrap_or("-"), remote = %conn.remote_address());
        if let Some(n) = &node {
            span.in_scope(|| tracing::info!("agent connected"));
            self.connections.lock().expect("not poisoned").entry(n.clone()).or_default().push(conn.clone());
        }
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    if node.is_some() {
                        span.in_scope(|| tracing::info!(reason = %e, "agent disconnected"));
                    }
                    break;
                }
            };
            let this = self.clone();
            let node = node.clone();
            tokio::spawn(tracing::Instrument::instrument(this.stream(node, send, recv), span.clone()));
        }
        if let Some(n) = &node {
            let mut conns = self.connections.lock().expect("not poisoned");
            if let Some(list) = conns.get_mut(n) {
                list.retain(|c| c.stable_id() != conn.stable_id());
                if list.is_empty() {
                    conns.remove(n);
                }
            }
        }
    }

    async fn stream(self: Arc<Self>, node: Option<String>, mut send: Send, mut recv: quinn::RecvStream) {
        let request: AgentRequest = match frame::read(&mut recv).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "a bad request frame");
                return;
            }
        };
        use agent_request::Kind;
        let reply = match (request.kind, node) {
            (Some(Kind::Join(join)), _) => self.join(join).await,
            (_, None) => refused("join first: this connection has no node certificate"),
            (Some(Kind::WatchPods(w)), Some(node)) => {
                let pods = route("pods", None, None).resource;
                let mine = |pod: &Value| rules::node_name(pod) == node;
                let event = |obj: Option<&Value>, deleted: Option<&Value>| rules::pod_event(obj, deleted, &node);
                if let Err(e) = self.watch(pods, w.from_revision, &mut send, mine, event).await {
                    tracing::debug!(error = %e, "pod watch ended");
                }
                let _ = send.finish();
                return;
            }
            (Some(Kind::WatchServices(w)), Some(_)) if watched_plural(w.resource).is_none() => {
                refused("watch services, endpoint slices or nodes")
            }
            (Some(Kind::WatchServices(w)), Some(_)) => {
                let plural = watched_plural(w.resource).expect("checked above");
                let resource = route(plural, None, None).resource;
                let watched = self.watch(resource, w.from_revision, &mut send, |_| true, rules::object_event).await;
                if let Err(e) = watched {
                    tracing::debug!(error = %e, plural, "service watch ended");
                }
                let _ = send.finish();
                return;
            }
            (Some(Kind::Report(report)), Some(node)) => self.report(&node, report).await,
            (Some(Kind::Lookup(lookup)), Some(node)) => self.lookup(&node, lookup).await,
            (None, Some(_)) => refused("an empty request"),
        };
        if frame::write(&mut send, &reply).await.is_ok() {
            let _ = send.finish();
        }
    }

    async fn join(&self, join: Join) -> AgentResponse {
        let token = match JoinToken::parse(&join.token) {
            Ok(t) => t,
            Err(e) => return refused(e.to_string()),
        };
        if !meta::is_dns1123_subdomain(&join.node_name) {
            return refused(format!(
                "node name {:?} is not a lowercase RFC 1123 subdomain: fix --node-name",
                join.node_name
            ));
        }
        let key = route("secrets", Some("kube-system"), None).resource.key(Some("kube-system"), &token.secret_name());
        let secret = match self.api.store.get(&key, false).await {
            Ok(s) => s.map(|s| s.value),
            Err(e) => return refused(format!("the cluster cannot check the token now ({e}); retry")),
        };
        if let Err(why) = rules::check_join(&token, &self.ca_hash, secret.as_ref(), self.api.mint.now()) {
            tracing::warn!(node = %join.node_name, token = %token.id, "join refused: {why}");
            return refused(why);
        }
        let user = format!("{}{}", rules::NODE_USER_PREFIX, join.node_name);
        match self.ca.sign_request(&join.csr_pem, &user, &[rules::NODES_GROUP]) {
            Ok(cert_pem) => {
                tracing::info!(node = %join.node_name, token = %token.id, "agent joined");
                AgentResponse {
                    kind: Some(agent_response::Kind::Joined(Joined {
                        cert_pem,
                        ca_pem: self.ca.cert_pem().to_string(),
                        servers: self.servers().await,
                        pod_cidr: String::new(),
                    })),
                }
            }
            Err(e) => refused(format!("the certificate request is invalid: {e}")),
        }
    }

    /// Streams the objects of `r` that are the agent's (`mine`; `event` says what a change
    /// means to it, given the object and, for a deletion, the one deleted): a snapshot first when starting from 0 or from a revision compacted
    /// away, then every change in revision order, with progress when idle. Changes come
    /// from the server's watch cache, decoded once for every agent and API watcher.
    async fn watch(
        &self,
        r: &'static corral_api::Resource,
        from: i64,
        send: &mut Send,
        mine: impl Fn(&Value) -> bool,
        event: impl Fn(Option<&Value>, Option<&Value>) -> Option<Type>,
    ) -> Result<(), String> {
        let (api, prefix) = (&self.api, r.prefix(None));
        let resumed = (from > 0).then(|| ChangeSource::after(&api.cache, &api.store, r, &prefix, from).ok()).flatten();
        // The revision every change up to which is handled (sent, or not the agent's).
        let mut sent = from;
        let mut source = match resumed {
            Some(source) => {
                // At once, so the agent knows its watch is live again.
                self.send_event(send, Type::Progress, from, Vec::new()).await?;
                source
            }
            None => {
                // Subscribe before listing: whatever the feed sent before is in the list.
                let mut source = ChangeSource::from_now(&api.cache, &api.store, r).map_err(|e| e.to_string())?;
                let page = api.store.list(&prefix, None, 0, 0, false).await.map_err(|e| e.to_string())?;
                let objects: Vec<Value> = page
                    .items
                    .into_iter()
                    .filter(|s| mine(&s.value))
                    .map(|mut s| {
                        meta::set_resource_version(&mut s.value, s.rev);
                        s.value
                    })
                    .collect();
                let raw = serde_json::to_vec(&objects).expect("JSON");
                self.send_event(send, Type::Snapshot, page.rev, raw).await?;
                source.known_upto(page.rev);
                sent = page.rev;
                source
            }
        };
        // An interval, not a sleep per loop: in a busy cluster, changes of other nodes' pods
        // would otherwise keep postponing the progress this agent resumes from.
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.reset();
        loop {
            let changes = tokio::select! {
                c = source.next() => match c {
                    Ok(changes) => changes,
                    // Fell behind the feed (or it restarts): on from what was sent, from the
                    // store's history if the feed no longer has it.
                    Err(None) => {
                        source = ChangeSource::after(&api.cache, &api.store, r, &prefix, sent).map_err(|e| e.to_string())?;
                        continue;
                    }
                    Err(Some(e)) => return Err(e.to_string()),
                },
                _ = progress.tick() => {
                    sent = sent.max(source.progress());
                    self.send_event(send, Type::Progress, sent, Vec::new()).await?;
                    continue;
                }
            };
            for change in changes {
                // Only a deletion's object before is decoded: for the rest it never matters.
                let deleted = if change.obj.is_none() { change.prev() } else { None };
                // The watch cache's objects carry their resourceVersion.
                let (obj, deleted) = (change.obj.as_deref(), deleted.map(|d| &**d));
                let sent_as = match event(obj, deleted) {
                    Some(Type::Delete) => deleted.map(|d| (Type::Delete, d)),
                    Some(kind) => obj.map(|o| (kind, o)),
                    None => None,
                };
                if let Some((kind, obj)) = sent_as {
                    self.send_event(send, kind, change.rev, serde_json::to_vec(obj).expect("JSON")).await?;
                }
                // Sent, or none of the agent's business: handled either way. Another change
                // of the same revision may still be on its way, so that revision is complete
                // only once a later one (or the feed's progress) says so.
                sent = sent.max(change.rev - 1);
            }
        }
    }

    async fn send_event(&self, send: &mut Send, kind: Type, revision: i64, object: Vec<u8>) -> Result<(), String> {
        let event = PodEvent { r#type: kind as i32, revision, object };
        let msg = AgentResponse { kind: Some(agent_response::Kind::PodEvent(event)) };
        frame::write(send, &msg).await.map_err(|e| e.to_string())
    }

    async fn report(&self, node: &str, report: Report) -> AgentResponse {
        if !report.node.is_empty() {
            let reported: Value = match serde_json::from_slice(&report.node) {
                Ok(v) => v,
                Err(e) => return refused(format!("the node is not JSON: {e}")),
            };
            if meta::name(&reported) != node {
                return refused(format!("an agent of node {node} may not report node {}", meta::name(&reported)));
            }
            if let Err(e) = timed("node written", self.write_node(node, &reported)).await {
                return refused(format!("updating node {node}: {e}"));
            }
        }
        if report.heartbeat
            && let Err(e) = timed("lease renewed", self.renew_lease(node)).await
        {
            return refused(format!("renewing node {node}'s lease: {e}"));
        }
        let mut rejected = Vec::new();
        for status in report.pods {
            let Some(pod) = status.pod else { continue };
            let value: Value = match serde_json::from_slice(&status.status) {
                Ok(v) => v,
                Err(_) => {
                    rejected.push(pod);
                    continue;
                }
            };
            match self.write_pod_status(node, &pod, value).await {
                Ok(()) => {}
                Err(ApiError::NotFound { .. }) | Err(ApiError::Conflict { .. }) | Err(ApiError::Forbidden(_)) => {
                    rejected.push(pod)
                }
                Err(e) => return refused(format!("updating pod {}/{}: {e}", pod.namespace, pod.name)),
            }
        }
        for pod in report.terminated {
            // Only pods of this node: uids are no secret.
            let key = route("pods", Some(&pod.namespace), None).resource.key(Some(&pod.namespace), &pod.name);
            match self.api.store.get(&key, true).await {
                Ok(Some(stored)) if rules::node_name(&stored.value) == node => {}
                Ok(_) => continue,
                Err(e) => return refused(format!("reading pod {}/{}: {e}", pod.namespace, pod.name)),
            }
            let options = json!({"gracePeriodSeconds": 0, "preconditions": {"uid": pod.uid}});
            let route = route("pods", Some(&pod.namespace), None);
            match self.api.delete(&route, &pod.name, &options, &Query::default()).await {
                Ok(_) | Err(ApiError::NotFound { .. }) | Err(ApiError::Conflict { .. }) => {}
                Err(e) => return refused(format!("removing pod {}/{}: {e}", pod.namespace, pod.name)),
            }
        }
        for event in report.events {
            let Ok(event) = serde_json::from_slice::<Value>(&event) else { continue };
            if let Err(e) = self.write_event(node, event).await {
                tracing::debug!(node, error = %e, "an event from the agent was not written");
            }
        }
        if !report.metrics.is_empty() {
            // Best effort, as Events: the next sample comes in 15 s.
            match serde_json::from_slice::<NodeSample>(&report.metrics) {
                Ok(sample) if sample.node == node => {
                    if let Err(e) = self.api.record_metrics(&sample).await {
                        tracing::debug!(node, error = %e, "a metrics sample was not written");
                    }
                }
                Ok(sample) => tracing::warn!(node, other = %sample.node, "an agent reported another node's metrics"),
                Err(e) => tracing::warn!(node, error = %e, "a metrics sample did not parse"),
            }
        }
        AgentResponse { kind: Some(agent_response::Kind::Reported(Reported { rejected })) }
    }

    /// Creates an Event about one of the node's pods, or replaces the one of the same name
    /// with its new count. Events are best effort: a failure is logged, not retried.
    async fn write_event(&self, node: &str, event: Value) -> Result<(), ApiError> {
        let event = rules::agent_event(node, event).map_err(ApiError::Forbidden)?;
        self.api.put_event(event).await
    }

    async fn write_node(&self, node: &str, reported: &Value) -> Result<(), ApiError> {
        let main = route("nodes", None, None);
        let key = main.resource.key(None, node);
        let q = Query::default();
        let Some(stored) = self.api.store.get(&key, false).await? else {
            let created =
                object(self.api.create(&main, rules::merge_node(None, reported), &q, Output::default()).await?);
            // A create keeps no status: write it as the status subresource does.
            let mut with_status = created;
            with_status["status"] = reported["status"].clone();
            let status = route("nodes", None, Some("status"));
            self.api.update(&status, node, with_status, &q, Output::default()).await?;
            return Ok(());
        };
        let mut merged = rules::merge_node(Some(&stored.value), reported);
        // Which server the node reports through (`corral status` shows it).
        let annotations = meta::metadata_mut(&mut merged).entry("annotations").or_insert_with(|| json!({}));
        annotations[REPORTING_SERVER] = json!(self.server_name);
        meta::set_resource_version(&mut merged, stored.rev);
        if merged.get("metadata") != stored.value.get("metadata") {
            let updated = object(self.api.update(&main, node, merged.clone(), &q, Output::default()).await?);
            merged["metadata"] = updated["metadata"].clone();
        }
        if merged.get("status") != stored.value.get("status") {
            let status = route("nodes", None, Some("status"));
            self.api.update(&status, node, merged, &q, Output::default()).await?;
        }
        Ok(())
    }

    async fn renew_lease(&self, node: &str) -> Result<(), ApiError> {
        let leases = route("coordination.k8s.io/leases", Some("kube-node-lease"), None);
        let key = leases.resource.key(Some("kube-node-lease"), node);
        let nodes = route("nodes", None, None);
        let owner = self.api.store.get(&nodes.resource.key(None, node), false).await?;
        let uid = owner.as_ref().map(|n| meta::uid(&n.value).to_string());
        let mut lease = rules::lease(
            node,
            uid.as_deref(),
            &meta::micro_time(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()),
            LEASE_SECONDS,
        );
        let q = Query::default();
        match self.api.store.get(&key, false).await? {
            None => match self.api.create(&leases, lease, &q, Output::default()).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
                Err(e) => Err(e),
            },
            Some(stored) => {
                lease["metadata"] = stored.value["metadata"].clone();
                meta::set_resource_version(&mut lease, stored.rev);
                self.api.update(&leases, node, lease, &q, Output::default()).await.map(|_| ())
            }
        }
    }

    /// Replaces a pod's status, if the pod is still the one the agent runs (same uid) and
    /// bound to its node.
    async fn write_pod_status(&self, node: &str, pod: &PodRef, status: Value) -> Result<(), ApiError> {
        let route = route("pods", Some(&pod.namespace), Some("status"));
        let key = route.resource.key(Some(&pod.namespace), &pod.name);
        for _ in 0..3 {
            // A local read: the update below compares its resourceVersion, so a stale read
            // only costs a retry, and the usual report costs one quorum read instead of two.
            let stored =
                self.api.store.get(&key, true).await?.ok_or_else(|| ApiError::not_found(route.resource, &pod.name))?;
            if meta::uid(&stored.value) != pod.uid {
                return Err(ApiError::not_found(route.resource, &pod.name));
            }
            if rules::node_name(&stored.value) != node {
                return Err(ApiError::Forbidden(format!("pod {} is not bound to node {node}", pod.name)));
            }
            if stored.value.get("status") == Some(&status) {
                return Ok(());
            }
            let mut obj = stored.value.clone();
            obj["status"] = status.clone();
            meta::set_resource_version(&mut obj, stored.rev);
            match self.api.update(&route, &pod.name, obj, &Query::default(), Output::default()).await {
                Err(ApiError::Conflict { .. }) => continue,
                other => return other.map(|_| ()),
            }
        }
        Err(ApiError::modified(route.resource, &pod.name))
    }

    async fn lookup(&self, node: &str, lookup: Lookup) -> AgentResponse {
        const ALLOWED: &[&str] = &["configmaps", "secrets", "persistentvolumeclaims", "persistentvolumes", "nodes"];
        if !ALLOWED.contains(&lookup.plural.as_str()) {
            return refused(format!("agents may not read {}", lookup.plural));
        }
        if lookup.plural == "nodes" && lookup.name != node {
            return refused(format!("node {node} may read only its own Node, not {}", lookup.name));
        }
        let r = route(&lookup.plural, None, None).resource;
        let namespace = r.namespaced.then_some(lookup.namespace.as_str());
        let stored = match self.api.store.get(&r.key(namespace, &lookup.name), false).await {
            Ok(s) => s,
            Err(e) => return refused(format!("reading {} {}: {e}", lookup.plural, lookup.name)),
        };
        // A volume is read through its claim: the claim must be one of the node's pods'.
        let (plural, ns, name) = match &stored {
            Some(pv) if r.plural == "persistentvolumes" => (
                "persistentvolumeclaims",
                meta::str_at(&pv.value, "/spec/claimRef/namespace").to_string(),
                meta::str_at(&pv.value, "/spec/claimRef/name").to_string(),
            ),
            _ => (r.plural, lookup.namespace.clone(), lookup.name.clone()),
        };
        match self.node_refers(node, plural, &ns, &name).await {
            _ if plural == "nodes" => {}
            Ok(true) => {}
            Ok(false) => {
                return refused(format!(
                    "node {node} may not read {} {}: no pod bound to it refers to it",
                    lookup.plural, lookup.name
                ));
            }
            Err(e) => return refused(format!("reading the pods of node {node}: {e}")),
        }
        let stored = match stored {
            Some(s) if r.plural == "persistentvolumes" => Some(self.pin_volume(node, s).await),
            other => other,
        };
        let object = match stored {
            Some(mut s) => {
                meta::set_resource_version(&mut s.value, s.rev);
                meta::set_type(r, &mut s.value);
                serde_json::to_vec(&s.value).expect("JSON")
            }
            None => Vec::new(),
        };
        AgentResponse { kind: Some(agent_response::Kind::Found(Found { object })) }
    }

    /// A hostPath volume a node is about to mount, pinned to that node if nothing pinned it
    /// yet (compare-and-swap: of two nodes racing, one wins and the other reads its pin).
    async fn pin_volume(&self, node: &str, pv: Stored) -> Stored {
        let Some(mut pinned) = rules::pin_to_node(&pv.value, node) else { return pv };
        let r = route("persistentvolumes", None, None);
        let name = meta::name(&pv.value).to_string();
        meta::set_resource_version(&mut pinned, pv.rev);
        match self.api.update(&r, &name, pinned, &Query::default(), Output::default()).await {
            Ok(Reply::Object(_, value)) => {
                tracing::info!(node, volume = %name, "hostPath volume pinned to the node that first mounts it");
                let rev = meta::resource_version(&value).unwrap_or(pv.rev);
                Stored { value, rev }
            }
            _ => match self.api.store.get(&r.resource.key(None, &name), false).await {
                Ok(Some(now)) => now,
                _ => pv,
            },
        }
    }

    /// Whether a pod bound to `node` in `namespace` refers to the object.
    async fn node_refers(&self, node: &str, plural: &str, namespace: &str, name: &str) -> Result<bool, ApiError> {
        if namespace.is_empty() || name.is_empty() {
            return Ok(false);
        }
        let pods = route("pods", Some(namespace), None).resource.prefix(Some(namespace));
        let page = self.api.store.list(&pods, None, 0, 0, true).await?;
        Ok(page.items.iter().any(|p| rules::node_name(&p.value) == node && rules::pod_refers(&p.value, plural, name)))
    }

    /// The newest live connection of a node's agent to this server.
    pub fn agent(&self, node: &str) -> Option<quinn::Connection> {
        let conns = self.connections.lock().expect("not poisoned");
        conns.get(node)?.iter().rev().find(|c| c.close_reason().is_none()).cloned()
    }

    /// Opens a stream to a node's agent and sends `request`; returns the stream once the
    /// agent has accepted it, or the error for the client.
    pub async fn open(
        &self,
        node: &str,
        request: &ServerRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ApiError> {
        let unreachable = |why: String| ApiError::Unavailable(format!("node {node:?}: {why}"));
        let conn = self.agent(node).ok_or_else(|| unreachable("its agent is not connected".into()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(e.to_string()))?;
        frame::write(&mut send, request).await.map_err(|e| unreachable(e.to_string()))?;
        let reply: StreamReply = tokio::time::timeout(Duration::from_secs(30), frame::read(&mut recv))
            .await
            .map_err(|_| unreachable("no answer in 30s".into()))?
            .map_err(|e| unreachable(e.to_string()))?
            .ok_or_else(|| unreachable("the agent closed the stream".into()))?;
        if !reply.ok {
            return Err(match reply.code {
                404 => ApiError::NoRoute,
                400 => ApiError::BadRequest(reply.message),
                _ => ApiError::Internal(reply.message),
            });
        }
        Ok((send, recv))
    }
}

/// Runs `work`, logging how long it took (debug): under load a node's report waits on the
/// store, and these say for how long.
async fn timed<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = work.await;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "{what}");
    out
}
