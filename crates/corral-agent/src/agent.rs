//! The agent's loops: the pods bound to its node arrive over a watch that resumes from the
//! last revision on whichever server answers (`watch_pods`); every second, or at once on a
//! change, each pod is synced against the runtime (`sync_round`); statuses, terminations,
//! the Node and its Lease go out in batches (`report_loop`). With no server reachable, pods
//! keep running and what is to be reported waits in the outbox.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_proto::agent::{self as proto, AgentRequest, agent_request, agent_response, pod_event::Type};
use corral_transport::frame;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::cri::Runtime;
use crate::gc::{self, GcPolicy};
use crate::link::{Link, LinkError};
use crate::metrics;
use crate::node::{self, Facts};
use crate::spec::str_at;
use crate::sync::PodView;
use crate::worker::{Lookup, Worker, grace_period};

const SYNC_EVERY: Duration = Duration::from_secs(1);
const LEASE_EVERY: Duration = Duration::from_secs(10);
const METRICS_EVERY: Duration = Duration::from_secs(corral_api::metrics::RESOLUTION_S as u64);
/// The Node's status goes out when it changes, and at least this often.
const NODE_EVERY: Duration = Duration::from_secs(60);
/// A pod watch silent this long (servers send progress every 5 s) is given up.
const WATCH_SILENCE: Duration = Duration::from_secs(15);
/// Statuses per report.
const BATCH: usize = 200;
const EVENTS_PER_REPORT: usize = 100;
/// How long a pod deleted behind the agent's back (force deletion) gets to stop.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// Objects pods refer to, fetched from the servers.
pub struct LinkLookup(pub Arc<Link>);

impl Lookup for LinkLookup {
    async fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let request = AgentRequest {
            kind: Some(agent_request::Kind::Lookup(proto::Lookup {
                plural: plural.into(),
                namespace: namespace.into(),
                name: name.into(),
            })),
        };
        match self.0.request(request).await {
            Ok(proto::AgentResponse { kind: Some(agent_response::Kind::Found(f)) }) if !f.object.is_empty() => {
                serde_json::from_slice(&f.object).ok()
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(plural, namespace, name, error = %e, "lookup failed");
                None
            }
        }
    }
}

#[derive(Default)]
struct Desired {
    /// By uid.
    pods: HashMap<String, Value>,
    /// Whether a snapshot has arrived: until then, no pod the runtime has is an orphan.
    known: bool,
    revision: i64,
}

#[derive(Default)]
struct Outbox {
    statuses: HashMap<String, (proto::PodRef, Value)>,
    terminated: HashMap<String, proto::PodRef>,
}

pub struct Agent<R: Runtime> {
    worker: Arc<Worker<R, LinkLookup>>,
    link: Arc<Link>,
    facts: Mutex<Facts>,
    version: String,
    desired: Mutex<Desired>,
    changed: Notify,
    outbox: Mutex<Outbox>,
    outgoing: Notify,
    terminating: Mutex<HashSet<String>>,
}

fn pod_ref(pod: &Value) -> proto::PodRef {
    proto::PodRef {
        namespace: str_at(pod, "/metadata/namespace").to_string(),
        name: str_at(pod, "/metadata/name").to_string(),
        uid: str_at(pod, "/metadata/uid").to_string(),
    }
}

impl<R: Runtime> Agent<R> {
    /// `version` is what the Node reports as its kubelet version.
    pub fn new(worker: Arc<Worker<R, LinkLookup>>, link: Arc<Link>, facts: Facts, version: &str) -> Arc<Self> {
        Arc::new(Self {
            worker,
            link,
            facts: Mutex::new(facts),
            version: version.to_string(),
            desired: Mutex::new(Desired::default()),
            changed: Notify::new(),
            outbox: Mutex::new(Outbox::default()),
            outgoing: Notify::new(),
            terminating: Mutex::new(HashSet::new()),
        })
    }

    /// Runs until `stop` turns true. Pods keep running after it returns.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let tasks = [
            tokio::spawn(self.clone().watch_pods()),
            tokio::spawn(self.clone().sync_loop()),
            tokio::spawn(self.clone().report_loop()),
            tokio::spawn(self.clone().gc_loop()),
        ];
        let _ = stop.wait_for(|s| *s).await;
        for t in tasks {
            t.abort();
        }
    }

    /// Keeps `desired` equal to the pods bound to this node, resuming from the last
    /// revision seen on whichever server answers.
    async fn watch_pods(self: Arc<Self>) {
        let request = || {
            let from = self.desired.lock().expect("not poisoned").revision;
            let watch = proto::WatchPods { from_revision: from };
            (from, AgentRequest { kind: Some(agent_request::Kind::WatchPods(watch)) })
        };
        follow(&self.link, "pod watch", request, |event| {
            if self.apply(event) {
                self.changed.notify_one();
            }
        })
        .await
    }

    /// Applies a pod event; true when the agent has something new to do (not for progress,
    /// nor for the echo of a status it reported itself).
    fn apply(&self, event: proto::PodEvent) -> bool {
        let mut desired = self.desired.lock().expect("not poisoned");
        let kind = Type::try_from(event.r#type).unwrap_or(Type::Unspecified);
        let object = || serde_json::from_slice::<Value>(&event.object).ok();
        desired.revision = desired.revision.max(event.revision);
        match kind {
            Type::Snapshot => {
                let pods: Vec<Value> = serde_json::from_slice(&event.object).unwrap_or_default();
                desired.pods = pods.into_iter().map(|p| (str_at(&p, "/metadata/uid").to_string(), p)).collect();
                desired.known = true;
                true
            }
            Type::Put => {
                let Some(p) = object() else { return false };
                let uid = str_at(&p, "/metadata/uid").to_string();
                let acted_on = |o: &Value| (o.get("spec").cloned(), o.pointer("/metadata/deletionTimestamp").cloned());
                let news = desired.pods.get(&uid).is_none_or(|old| acted_on(old) != acted_on(&p));
                desired.pods.insert(uid, p);
                news
            }
            Type::Delete => {
                let Some(p) = object() else { return false };
                desired.pods.remove(str_at(&p, "/metadata/uid")).is_some()
            }
            Type::Progress | Type::Unspecified => false,
        }
    }

    /// Dead containers every minute, images every five (when the disk is filling up).
    async fn gc_loop(self: Arc<Self>) {
        let policy = GcPolicy::default();
        let mut images_at = Instant::now();
        loop {
            tokio::time::sleep(gc::CONTAINERS_EVERY).await;
            match self.worker.collect_containers().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(containers = n, "removed dead containers"),
                Err(e) => tracing::warn!(error = %e, "container garbage collection"),
            }
            if images_at.elapsed() >= gc::IMAGES_EVERY {
                images_at = Instant::now();
                match self.worker.collect_images(&policy).await {
                    Ok(0) => {}
                    Ok(bytes) => tracing::info!(bytes, "removed unused images"),
                    Err(e) => tracing::warn!(error = %e, "image garbage collection"),
                }
            }
        }
    }

    async fn sync_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SYNC_EVERY) => {}
                _ = self.changed.notified() => {}
                _ = self.worker.wake().notified() => {}
            }
            self.sync_round().await;
        }
    }

    /// One pass over every pod: runs the desired ones, terminates the deleted ones and the
    /// orphans, and queues the statuses that changed.
    pub async fn sync_round(self: &Arc<Self>) {
        let views = match self.worker.observe().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "the runtime does not answer");
                return;
            }
        };
        let (pods, known) = {
            let d = self.desired.lock().expect("not poisoned");
            (d.pods.clone(), d.known)
        };
        let empty = PodView::default();
        let running =
            pods.iter().filter(|(_, p)| p.pointer("/metadata/deletionTimestamp").is_none()).map(|(uid, pod)| {
                let view = views.get(uid).unwrap_or(&empty);
                async move { (pod, self.worker.sync_pod(pod, view).await) }
            });
        for (pod, status) in futures::future::join_all(running).await {
            self.queue_status(pod, status);
        }
        for (uid, pod) in pods.iter().filter(|(_, p)| p.pointer("/metadata/deletionTimestamp").is_some()) {
            self.spawn_terminate(
                uid,
                views.get(uid).cloned().unwrap_or_default(),
                grace_period(pod),
                Some(pod.clone()),
            );
        }
        if known {
            for (uid, view) in views.iter().filter(|(uid, _)| !pods.contains_key(*uid)) {
                self.spawn_terminate(uid, view.clone(), ORPHAN_GRACE, None);
            }
        }
        // Forget terminations that are over (the pod is gone from both sides), and what was
        // queued or reported for pods the servers no longer have.
        self.terminating.lock().expect("not poisoned").retain(|uid| pods.contains_key(uid) || views.contains_key(uid));
        if known {
            let mut outbox = self.outbox.lock().expect("not poisoned");
            outbox.statuses.retain(|uid, _| pods.contains_key(uid));
        }
    }

    fn queue_status(&self, pod: &Value, status: Value) {
        // Transition times stay as the servers have them while nothing changed.
        let mut wrapped = json!({"status": status});
        node::stabilize(Some(pod), &mut wrapped, false);
        let status = wrapped["status"].take();
        let uid = str_at(pod, "/metadata/uid").to_string();
        let mut outbox = self.outbox.lock().expect("not poisoned");
        // Against what the servers hold, not what was last sent: a status changed there
        // (a pod marked not ready by the node controller) is put right.
        let last = match outbox.statuses.get(&uid) {
            Some((_, s)) => Some(s),
            None => pod.get("status"),
        };
        if last == Some(&status) {
            return;
        }
        outbox.statuses.insert(uid, (pod_ref(pod), status));
        drop(outbox);
        self.outgoing.notify_one();
    }

    /// Stops a pod's containers within `grace` in the background (once per pod); a pod
    /// being deleted is reported terminated afterwards so the servers remove it.
    fn spawn_terminate(self: &Arc<Self>, uid: &str, view: PodView, grace: Duration, pod: Option<Value>) {
        if !self.terminating.lock().expect("not poisoned").insert(uid.to_string()) {
            return;
        }
        let this = self.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            let name = pod.as_ref().map_or("(deleted)", |p| str_at(p, "/metadata/name"));
            tracing::info!(uid = %uid, pod = name, ?grace, "terminating");
            if let Err(e) = this.worker.terminate(&uid, &view, grace, pod.as_ref()).await {
                tracing::warn!(uid = %uid, error = %e, "terminating failed; retrying");
                this.terminating.lock().expect("not poisoned").remove(&uid);
                return;
            }
            if let Some(pod) = pod {
                let mut outbox = this.outbox.lock().expect("not poisoned");
                outbox.statuses.remove(&uid);
                outbox.terminated.insert(uid, pod_ref(&pod));
                drop(outbox);
                this.outgoing.notify_one();
            }
        });
    }

    async fn report_loop(self: Arc<Self>) {
        let mut last_lease: Option<Instant> = None;
        let mut last_node: Option<(Instant, Value)> = None;
        let mut failing_since: Option<Instant> = None;
        let mut sampler = metrics::Sampler::default();
        let mut last_sample: Option<Instant> = None;
        loop {
            let _ = tokio::time::timeout(SYNC_EVERY, self.outgoing.notified()).await;
            let lease_due = last_lease.is_none_or(|t| t.elapsed() >= LEASE_EVERY);
            // A sample is taken every resolution period and sent with that round's report
            // only: a lost one is replaced by the next.
            let sample = if last_sample.is_none_or(|t| t.elapsed() >= METRICS_EVERY) {
                last_sample = Some(Instant::now());
                self.sample(&mut sampler).await
            } else {
                None
            };
            let node = lease_due.then(|| self.node_report(last_node.as_ref()));
            let (statuses, terminated) = {
                let outbox = self.outbox.lock().expect("not poisoned");
                let statuses: Vec<(String, proto::PodRef, Value)> = outbox
                    .statuses
                    .iter()
                    .take(BATCH)
                    .map(|(uid, (r, s))| (uid.clone(), r.clone(), s.clone()))
                    .collect();
                (statuses, outbox.terminated.clone())
            };
            let events = self.worker.events().lock().expect("not poisoned").peek(EVENTS_PER_REPORT);
            if !lease_due && statuses.is_empty() && terminated.is_empty() && events.is_empty() && sample.is_none() {
                continue;
            }
            let report = proto::Report {
                node: node.as_ref().map(|(n, _)| serde_json::to_vec(n).expect("JSON")).unwrap_or_default(),
                heartbeat: lease_due,
                pods: statuses
                    .iter()
                    .map(|(_, r, s)| proto::PodStatus {
                        pod: Some(r.clone()),
                        status: serde_json::to_vec(s).expect("JSON"),
                    })
                    .collect(),
                terminated: terminated.values().cloned().collect(),
                events: events.iter().map(|e| serde_json::to_vec(e).expect("JSON")).collect(),
                metrics: sample.as_ref().map(|s| serde_json::to_vec(s).expect("JSON")).unwrap_or_default(),
            };
            let request = AgentRequest { kind: Some(agent_request::Kind::Report(report)) };
            match self.link.request(request).await {
                Ok(answer) => {
                    // Statuses the server could not write stay queued (or go with their pod).
                    let rejected: HashSet<String> = match answer.kind {
                        Some(agent_response::Kind::Reported(r)) => r.rejected.into_iter().map(|p| p.uid).collect(),
                        _ => HashSet::new(),
                    };
                    if let Some(since) = failing_since.take() {
                        tracing::info!(after_ms = since.elapsed().as_millis() as u64, "reporting again");
                    }
                    if lease_due {
                        last_lease = Some(Instant::now());
                    }
                    if let Some((n, refreshed)) = node {
                        let at = match &last_node {
                            Some((at, _)) if !refreshed => *at,
                            _ => Instant::now(),
                        };
                        last_node = Some((at, n));
                    }
                    self.worker.events().lock().expect("not poisoned").written(&events);
                    let mut outbox = self.outbox.lock().expect("not poisoned");
                    for (uid, _, sent) in statuses {
                        if rejected.contains(&uid) {
                            continue;
                        }
                        if outbox.statuses.get(&uid).is_some_and(|(_, s)| *s == sent) {
                            outbox.statuses.remove(&uid);
                        }
                    }
                    for uid in terminated.keys() {
                        outbox.terminated.remove(uid);
                    }
                }
                Err(e) => {
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(error = %e, "reporting failed; keeping it for later");
                    }
                    if matches!(e, LinkError::Unreachable(_)) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    /// The node's usage and its pods' now, or None when the runtime cannot say.
    async fn sample(&self, sampler: &mut metrics::Sampler) -> Option<corral_api::metrics::NodeSample> {
        let runtime = self.worker.runtime();
        let (stats, containers) = match tokio::try_join!(runtime.list_container_stats(), runtime.list_containers()) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "no container stats this period");
                return None;
            }
        };
        let running: HashSet<String> = containers
            .into_iter()
            .filter(|c| c.state == corral_proto::cri::ContainerState::ContainerRunning as i32)
            .map(|c| c.id)
            .collect();
        let pods: HashMap<String, metrics::PodInfo> = {
            let desired = self.desired.lock().expect("not poisoned");
            desired
                .pods
                .iter()
                .map(|(uid, pod)| {
                    let labels = pod
                        .pointer("/metadata/labels")
                        .and_then(Value::as_object)
                        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                        .unwrap_or_default();
                    let info = metrics::PodInfo {
                        namespace: str_at(pod, "/metadata/namespace").to_string(),
                        name: str_at(pod, "/metadata/name").to_string(),
                        labels,
                    };
                    (uid.clone(), info)
                })
                .collect()
        };
        let node = self.facts.lock().expect("not poisoned").node_name.clone();
        let now = crate::sync::now_ns();
        Some(sampler.sample(&node, &stats, &running, &pods, metrics::read_host(now), now))
    }

    /// The Node to send with a heartbeat, and whether its heartbeat times were refreshed (a
    /// minute after `last`'s). It goes with every heartbeat: the servers write it only when it
    /// differs from theirs, so a status changed there (conditions the node controller set to
    /// Unknown) is put right within one heartbeat, as kubelet does.
    fn node_report(&self, last: Option<&(Instant, Value)>) -> (Value, bool) {
        let facts = {
            let mut f = self.facts.lock().expect("not poisoned");
            f.refresh();
            f.clone()
        };
        let now = corral_api::meta::rfc3339(crate::sync::now_ns() / 1_000_000_000);
        let mut node = node::node_object(&facts, &self.version, &now);
        let due = last.is_none_or(|(t, _)| t.elapsed() >= NODE_EVERY);
        node::stabilize(last.map(|(_, n)| n), &mut node, due);
        (node, due)
    }
}

/// Follows one watch the servers serve (the node's pods, Services, EndpointSlices) for
/// good: opened with the request `request` makes (from the last revision seen) on whichever
/// server answers, each event handed to `apply`, opened again when it breaks, is refused or
/// falls silent. `what` names it in the log.
pub async fn follow(
    link: &Link,
    what: &str,
    request: impl Fn() -> (i64, AgentRequest),
    mut apply: impl FnMut(proto::PodEvent),
) {
    let mut broken_at: Option<Instant> = None;
    loop {
        let (from, request) = request();
        let (conn, mut recv) = match link.open(request).await {
            Ok(opened) => opened,
            Err(e) => {
                tracing::debug!(error = %e, "{what} not open");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let mut first = true;
        loop {
            let event =
                match tokio::time::timeout(WATCH_SILENCE, frame::read::<proto::AgentResponse, _>(&mut recv)).await {
                    Ok(Ok(Some(proto::AgentResponse { kind: Some(agent_response::Kind::PodEvent(e)) }))) => e,
                    Ok(Ok(Some(other))) => {
                        tracing::warn!(?other, "the {what} was refused");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                        link.abandon(&conn);
                        break;
                    }
                };
            if first {
                first = false;
                let server = link.server().unwrap_or_default();
                match broken_at.take() {
                    Some(t) => {
                        let after_ms = t.elapsed().as_millis() as u64;
                        tracing::info!(server = %server, from, after_ms, "{what} resumed")
                    }
                    None => tracing::info!(server = %server, from, "{what} started"),
                }
            }
            apply(event);
        }
        if broken_at.is_none() {
            broken_at = Some(Instant::now());
            tracing::warn!("{what} broke; trying the servers again");
        }
    }
}

/// How long an agent waits for the cluster to give its node a pod CIDR.
const POD_CIDR_WAIT: Duration = Duration::from_secs(300);

/// Registers the node (not Ready: its network is not set up yet) and waits until the
/// cluster's node IPAM gives it a pod CIDR, which the CNI bridge is then built from, as a
/// kubelet waits for `spec.podCIDR` before the runtime's network is ready.
pub async fn await_pod_cidr(link: &Arc<Link>, facts: &Facts, version: &str) -> Result<String, String> {
    let now = corral_api::meta::rfc3339(crate::sync::now_ns() / 1_000_000_000);
    let mut registration = node::node_object(facts, version, &now);
    for c in registration["status"]["conditions"].as_array_mut().into_iter().flatten() {
        if c["type"] == "Ready" {
            c["status"] = json!("False");
            c["reason"] = json!("KubeletNotReady");
            c["message"] = json!("container runtime network not ready: the node has no pod CIDR yet");
        }
    }
    let report = AgentRequest {
        kind: Some(agent_request::Kind::Report(proto::Report {
            node: serde_json::to_vec(&registration).expect("JSON"),
            heartbeat: true,
            ..Default::default()
        })),
    };
    let started = Instant::now();
    let mut registered = false;
    let mut told = Instant::now();
    let lookup = LinkLookup(link.clone());
    while started.elapsed() < POD_CIDR_WAIT {
        if !registered {
            match link.request(report.clone()).await {
                Ok(proto::AgentResponse { kind: Some(agent_response::Kind::Refused(r)) }) => return Err(r.message),
                Ok(_) => registered = true,
                Err(e) => tracing::debug!(error = %e, "registering the node"),
            }
        }
        if registered
            && let Some(node) = lookup.get("nodes", "", &facts.node_name).await
            && let cidr = str_at(&node, "/spec/podCIDR")
            && !cidr.is_empty()
        {
            return Ok(cidr.to_string());
        }
        if told.elapsed() > Duration::from_secs(10) {
            tracing::info!(
                waited_s = started.elapsed().as_secs(),
                "waiting for the cluster to give this node a pod CIDR"
            );
            told = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "node {} got no pod CIDR in {} s: the servers allocate them unless run with --allocate-node-cidrs=false \
         (then give the agent --pod-cidr)",
        facts.node_name,
        POD_CIDR_WAIT.as_secs()
    ))
}
