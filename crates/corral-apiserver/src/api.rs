//! The verbs on resources: get, list, watch, create, update, patch and delete, as
//! kube-apiserver answers them, over the [`ObjectStore`].

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::time::Duration;

use corral_api::apply::{self, Writer};
use corral_api::deletion::{self, Deletion, Propagation};
use corral_api::meta::{self, Minter};
use corral_api::patch::{self, PatchType};
use corral_api::resources::{self, Resource};
use corral_api::selector::{FieldSelector, LabelSelector};
use corral_api::table::{self, IncludeObject};
use corral_api::{ApiError, FieldError};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::cache::{ChangeSource, WatchCache};
use crate::route::ObjectRoute;
use crate::services::{self, Ranges};
use crate::storage::{ObjectStore, Stored, WriteOutcome};

/// Retries of a read-modify-write that lost a race to another writer (each retry starts from
/// the object the failed write found, without another read).
const WRITE_RETRIES: usize = 32;

/// How the client wants objects back.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Output {
    pub table: bool,
    pub include: IncludeObject,
}

/// The parsed query string.
#[derive(Debug, Default)]
pub struct Query(pub HashMap<String, String>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Self {
        Query(Self::parse_all(raw).into_iter().collect())
    }

    /// Every pair in order, repeated keys included (`command=sh&command=-c`).
    pub fn parse_all(raw: Option<&str>) -> Vec<(String, String)> {
        raw.unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode_component(k), decode_component(v))
            })
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a handler answers.
pub enum Reply {
    Object(u16, Value),
    /// A watch: lines of JSON events, until the receiver closes.
    Watch(mpsc::Receiver<WatchEvent>),
}

/// One event of a watch as it is sent: its type and object, the object shared with every
/// other watcher of the same change.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub kind: &'static str,
    pub object: Arc<Value>,
}

impl WatchEvent {
    fn new(kind: &'static str, object: Value) -> Self {
        WatchEvent { kind, object: Arc::new(object) }
    }

    /// `{"type": .., "object": ..}` and a newline, written without building the envelope.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = Vec::with_capacity(256);
        line.extend_from_slice(br#"{"type":""#);
        line.extend_from_slice(self.kind.as_bytes());
        line.extend_from_slice(br#"","object":"#);
        serde_json::to_writer(&mut line, &*self.object).expect("JSON");
        line.extend_from_slice(b"}\n");
        line
    }
}

impl Reply {
    /// The object of an answer (Null for a watch).
    pub fn into_object(self) -> Value {
        match self {
            Reply::Object(_, v) => v,
            Reply::Watch(_) => Value::Null,
        }
    }
}

pub struct Api {
    pub store: ObjectStore,
    pub mint: Box<dyn Minter + Send + Sync>,
    /// Where Services' cluster IPs and node ports come from.
    pub services: Ranges,
    pub cache: WatchCache,
    /// Tolerations every new pod gets for the not-ready and unreachable NoExecute taints.
    pub tolerations: crate::defaults::DefaultTolerations,
}

/// What a read-modify-write was asked: the object, the resourceVersion the client expects
/// (0: any), the query and the form of the answer.
struct Ask<'a> {
    route: &'a ObjectRoute,
    name: &'a str,
    expect: i64,
    q: &'a Query,
    out: Output,
}

/// How one read-modify-write step ended.
enum Written {
    /// Written: the answer.
    Done(Reply),
    /// An answer without a write (dry run, nothing to change).
    Answer(Reply),
    /// The compare-and-swap found another version (None: the object is gone).
    Swapped(Option<Stored>),
    /// A cluster IP or node port the write claimed was taken meanwhile: again, from `old`.
    ClaimTaken(Stored),
}

fn now(api: &Api) -> i64 {
    api.mint.now()
}

impl Api {
    /// Who a write is recorded under in managedFields: `fieldManager`, else the client's name.
    fn writer(&self, r: &Resource, q: &Query, sub: Option<&str>) -> Writer {
        Writer {
            manager: q.get("fieldManager").unwrap_or("unknown").to_string(),
            api_version: r.api_version(),
            subresource: sub.map(str::to_string),
            time: meta::rfc3339(now(self)),
        }
    }

    fn present(&self, r: &Resource, mut obj: Value, rev: i64, out: Output) -> Value {
        meta::set_resource_version(&mut obj, rev);
        meta::set_type(r, &mut obj);
        if out.table {
            let list_meta = json!({"resourceVersion": rev.to_string()});
            return table::table(r, &[obj], now(self), out.include, list_meta);
        }
        obj
    }

    pub async fn get(&self, route: &ObjectRoute, name: &str, q: &Query, out: Output) -> Result<Reply, ApiError> {
        let r = route.resource;
        if !r.stored() {
            return self.metrics_get(route, name).await;
        }
        let key = r.key(route.namespace.as_deref(), name);
        let any = q.get("resourceVersion") == Some("0");
        let found = self.store.get(&key, any).await?.ok_or_else(|| ApiError::not_found(r, name))?;
        if route.sub.as_deref() == Some("scale") {
            return Ok(Reply::Object(200, scale_of(&found)));
        }
        Ok(Reply::Object(200, self.present(r, found.value, found.rev, out)))
    }

    pub async fn list(&self, route: &ObjectRoute, q: &Query, out: Output) -> Result<Reply, ApiError> {
        let r = route.resource;
        if !r.stored() {
            return self.metrics_list(route, q).await;
        }
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())?;
        let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), r)?;
        let limit: i64 = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
        let prefix = r.prefix(route.namespace.as_deref());
        let (mut rev, mut start) = (0, None);
        if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
            let (token_rev, key) = decode_continue(token)?;
            if !key.starts_with(&prefix) {
                return Err(ApiError::BadRequest("the continue token does not belong to this list".into()));
            }
            (rev, start) = (token_rev, Some(key));
        } else if let Some(v) = q.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0")
            && q.get("resourceVersionMatch") == Some("Exact")
        {
            rev = meta::parse_resource_version(v)?;
        }
        let any = q.get("resourceVersion") == Some("0");
        let filtered = !labels.is_empty() || !fields.is_empty();
        // With selectors the page holds only matches: read everything and filter.
        let page_limit = if filtered { 0 } else { limit };
        let page = self.store.list(&prefix, start.as_deref(), rev, page_limit, any).await?;
        let mut items: Vec<Value> = Vec::with_capacity(page.items.len());
        for Stored { mut value, rev } in page.items {
            if labels.matches(&value) && fields.matches(&value) {
                meta::set_resource_version(&mut value, rev);
                meta::set_type(r, &mut value);
                items.push(value);
            }
        }
        let mut list_meta = json!({"resourceVersion": page.rev.to_string()});
        if let Some(next) = page.next {
            list_meta["continue"] = json!(encode_continue(page.rev, &next));
            if page.remaining > 0 {
                list_meta["remainingItemCount"] = json!(page.remaining);
            }
        }
        if out.table {
            return Ok(Reply::Object(200, table::table(r, &items, now(self), out.include, list_meta)));
        }
        Ok(Reply::Object(
            200,
            json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": list_meta, "items": items}),
        ))
    }

    pub async fn create(&self, route: &ObjectRoute, mut obj: Value, q: &Query, out: Output) -> Result<Reply, ApiError> {
        let r = route.resource;
        check_fields(r, &mut obj, strict(q))?;
        meta::prepare_create(r, &mut obj, route.namespace.as_deref(), self.mint.as_ref())?;
        crate::defaults::apply(r, &mut obj);
        if r.plural == "pods" {
            self.tolerations.admit(&mut obj);
        }
        apply::record_update(None, &mut obj, &self.writer(r, q, None));
        crate::validate::object(r, &obj)?;
        let name = meta::name(&obj).to_string();
        if r.namespaced {
            self.check_namespace(meta::namespace(&obj).unwrap_or("default")).await?;
        }
        let key = r.key(meta::namespace(&obj), &name);
        for _ in 0..WRITE_RETRIES {
            let mut obj = obj.clone();
            let side = services::side_of_write(&self.store, &self.services, r, None, &mut obj).await?;
            if dry_run(q) {
                return Ok(Reply::Object(201, self.present(r, obj, 0, out)));
            }
            match self.store.put_if_with(&key, &obj, 0, &side).await? {
                WriteOutcome::Written(rev) => return Ok(Reply::Object(201, self.present(r, obj, rev, out))),
                WriteOutcome::Mismatch(_) => return Err(ApiError::already_exists(r, &name)),
                // Another Service took the address in between: choose again.
                WriteOutcome::ClaimTaken => continue,
            }
        }
        Err(ApiError::Unavailable("could not allocate the Service's addresses: too many concurrent writers".into()))
    }

    /// Refuses writes into a namespace that does not exist or is being deleted.
    async fn check_namespace(&self, ns: &str) -> Result<(), ApiError> {
        let namespaces = resources::find("", "namespaces").expect("namespaces are served");
        let found = self.store.get(&namespaces.key(None, ns), true).await?;
        match found {
            None => Err(ApiError::not_found(namespaces, ns)),
            Some(s) if s.value.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating") => {
                Err(ApiError::Forbidden(format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                )))
            }
            Some(_) => Ok(()),
        }
    }

    /// PUT: a compare-and-swap on the resourceVersion the body carries (none: the latest).
    pub async fn update(
        &self,
        route: &ObjectRoute,
        name: &str,
        body: Value,
        q: &Query,
        out: Output,
    ) -> Result<Reply, ApiError> {
        if meta::name(&body) != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta::name(&body)
            )));
        }
        let expect = meta::resource_version(&body)?;
        let mut body = body;
        if route.sub.is_none() {
            check_fields(route.resource, &mut body, strict(q))?;
        }
        let sub = route.sub.clone();
        let writer = self.writer(route.resource, q, sub.as_deref());
        self.read_modify_write(route, name, expect, q, out, move |r, old| {
            let mut new = match sub.as_deref() {
                Some("scale") => scale_into(r, old, &body)?,
                sub => into_update(r, sub, old, body.clone())?,
            };
            apply::record_update(Some(&old.value), &mut new, &writer);
            Ok(new)
        })
        .await
    }

    /// PATCH in any of the three patch types, or server-side apply.
    pub async fn patch(
        &self,
        route: &ObjectRoute,
        name: &str,
        kind: PatchType,
        body: Value,
        q: &Query,
        out: Output,
    ) -> Result<Reply, ApiError> {
        let sub = route.sub.clone();
        let writer = self.writer(route.resource, q, sub.as_deref());
        let strict = strict(q);
        if kind == PatchType::Apply {
            return self.server_side_apply(route, name, body, q, out, writer).await;
        }
        self.read_modify_write(route, name, 0, q, out, move |r, old| {
            let base = if sub.as_deref() == Some("scale") { scale_of(old) } else { with_rv(old) };
            let mut patched = patch::apply_generic(kind, &base, &body)?;
            if sub.is_none() {
                check_fields(r, &mut patched, strict)?;
            }
            if let Some(rv) = patched.pointer("/metadata/resourceVersion").and_then(Value::as_str)
                && rv != old.rev.to_string()
            {
                return Err(ApiError::modified(r, meta::name(&old.value)));
            }
            let mut new = match sub.as_deref() {
                Some("scale") => scale_into(r, old, &patched)?,
                sub => into_update(r, sub, old, patched)?,
            };
            apply::record_update(Some(&old.value), &mut new, &writer);
            Ok(new)
        })
        .await
    }

    /// Server-side apply: the object is created from the configuration when missing,
    /// otherwise merged into it with field ownership (409 on another manager's fields
    /// unless `force=true`).
    async fn server_side_apply(
        &self,
        route: &ObjectRoute,
        name: &str,
        mut body: Value,
        q: &Query,
        out: Output,
        writer: Writer,
    ) -> Result<Reply, ApiError> {
        let r = route.resource;
        if route.sub.is_some() {
            return Err(ApiError::BadRequest("server-side apply is served on the object, not its subresources".into()));
        }
        meta::check_type(r, &body)?;
        check_fields(r, &mut body, strict(q))?;
        match meta::name(&body) {
            "" => {
                meta::metadata_mut(&mut body).insert("name".into(), json!(name));
            }
            n if n != name => {
                return Err(ApiError::BadRequest(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        if body.pointer("/metadata/managedFields").is_some() {
            return Err(ApiError::BadRequest("metadata.managedFields must be nil in an apply configuration".into()));
        }
        let force = q.flag("force");
        let key = r.key(route.namespace.as_deref(), name);
        if self.store.get(&key, false).await?.is_none() {
            let obj = apply::apply(None, &body, &writer, force)?;
            match self.create(route, obj, q, out).await {
                Err(ApiError::AlreadyExists { .. }) => {}
                other => return other,
            }
        }
        self.read_modify_write(route, name, 0, q, out, move |r, old| {
            let merged = apply::apply(Some(&old.value), &body, &writer, force)?;
            into_update(r, None, old, merged)
        })
        .await
    }

    /// Reads the object, computes its new state and writes it if nobody wrote in between;
    /// retries when somebody did, unless the client named the revision it expected.
    async fn read_modify_write(
        &self,
        route: &ObjectRoute,
        name: &str,
        expect: i64,
        q: &Query,
        out: Output,
        change: impl Fn(&Resource, &Stored) -> Result<Value, ApiError>,
    ) -> Result<Reply, ApiError> {
        self.read_modify_write_from(Ask { route, name, expect, q, out }, None, change).await
    }

    /// A read-modify-write starting from `known` (None: from this server's own state).
    async fn read_modify_write_from(
        &self,
        ask: Ask<'_>,
        known: Option<Stored>,
        change: impl Fn(&Resource, &Stored) -> Result<Value, ApiError>,
    ) -> Result<Reply, ApiError> {
        let Ask { route, name, expect, q, out } = ask;
        let r = route.resource;
        let key = r.key(route.namespace.as_deref(), name);
        // The first read is this server's own state, without a quorum round: the write is a
        // compare-and-swap on the revision read, so a stale read only costs a failed swap,
        // which answers with the current object. Any answer other than a write (not found,
        // another resourceVersion than the client's, a refusal, nothing to change) is given
        // only from a linearizable read.
        let mut current = match known {
            Some(known) => Some(known),
            None => self.store.get(&key, true).await?,
        };
        let mut fresh = false;
        let mut tries = 0;
        while tries < WRITE_RETRIES {
            let ask = Ask { route, name, expect, q, out };
            let outcome = self.try_write(&ask, &change, &key, current.take()).await;
            let answer = match outcome {
                Ok(Written::Done(reply)) => return Ok(reply),
                Ok(Written::Swapped(found)) => {
                    // Somebody wrote in between: go again from what the failed swap found.
                    (current, fresh) = (found, true);
                    tries += 1;
                    continue;
                }
                Ok(Written::ClaimTaken(old)) => {
                    current = Some(old);
                    tries += 1;
                    continue;
                }
                Ok(Written::Answer(reply)) => Ok(reply),
                // The store could not answer (the write's outcome may be unknown): as it is.
                Err(e @ (ApiError::Unavailable(_) | ApiError::Timeout(_) | ApiError::Internal(_))) => return Err(e),
                Err(e) => Err(e),
            };
            if fresh {
                return answer;
            }
            current = self.store.get(&key, false).await?;
            fresh = true;
        }
        Err(ApiError::modified(route.resource, name))
    }

    /// One read-modify-write step from `current`.
    async fn try_write(
        &self,
        ask: &Ask<'_>,
        change: &impl Fn(&Resource, &Stored) -> Result<Value, ApiError>,
        key: &str,
        current: Option<Stored>,
    ) -> Result<Written, ApiError> {
        let Ask { route, name, expect, q, out } = *ask;
        let r = route.resource;
        let old = current.ok_or_else(|| ApiError::not_found(r, name))?;
        if expect != 0 && expect != old.rev {
            return Err(ApiError::modified(r, name));
        }
        let mut new = change(r, &old)?;
        crate::validate::object(r, &new)?;
        let side = services::side_of_write(&self.store, &self.services, r, Some(&old.value), &mut new).await?;
        if dry_run(q) || new == old.value {
            return Ok(Written::Answer(Reply::Object(200, self.present_sub(r, route, new, old.rev, out))));
        }
        // A namespace is removed by its cleaner once empty, never by a write.
        let written = if r.plural != "namespaces" && deletion::finished(&new) {
            // The last finalizer is gone from a marked object: the update deletes it.
            let side = services::side_of_delete(r, &old.value);
            self.store.delete_if_with(key, old.rev, &side).await?
        } else {
            self.store.put_if_with(key, &new, old.rev, &side).await?
        };
        match written {
            WriteOutcome::Written(rev) => {
                Ok(Written::Done(Reply::Object(200, self.present_sub(r, route, new, rev, out))))
            }
            WriteOutcome::Mismatch(None) => Err(ApiError::not_found(r, name)),
            WriteOutcome::Mismatch(Some(_)) if expect != 0 => Err(ApiError::modified(r, name)),
            WriteOutcome::Mismatch(found) => Ok(Written::Swapped(found)),
            WriteOutcome::ClaimTaken => Ok(Written::ClaimTaken(old)),
        }
    }

    fn present_sub(&self, r: &Resource, route: &ObjectRoute, obj: Value, rev: i64, out: Output) -> Value {
        if route.sub.as_deref() == Some("scale") {
            return scale_of(&Stored { value: obj, rev });
        }
        self.present(r, obj, rev, out)
    }

    /// Creates an Event, or replaces the one of the same name (a repeat, its count grown).
    pub async fn put_event(&self, event: Value) -> Result<(), ApiError> {
        let namespace = meta::namespace(&event).unwrap_or("default").to_string();
        let name = meta::name(&event).to_string();
        let events = crate::route::object_route("events", Some(&namespace), None);
        let key = events.resource.key(Some(&namespace), &name);
        let q = Query::default();
        // Most events are new (their names are unique): create first, read only for a repeat.
        let mut updated = match self.create(&events, event.clone(), &q, Output::default()).await {
            Err(ApiError::AlreadyExists { .. }) => event,
            done => return done.map(|_| ()),
        };
        let Some(stored) = self.store.get(&key, true).await? else { return Ok(()) };
        updated["metadata"] = stored.value["metadata"].clone();
        meta::set_resource_version(&mut updated, stored.rev);
        self.update(&events, &name, updated, &q, Output::default()).await.map(|_| ())
    }

    /// POST pods/binding: assigns an unassigned pod to a node (the scheduler's write).
    pub async fn bind(&self, route: &ObjectRoute, name: &str, body: &Value, q: &Query) -> Result<Reply, ApiError> {
        self.bind_from(route, name, body, q, None).await
    }

    /// A binding that starts from `known`, the pod as the caller last saw it (None: as this
    /// server has it): the write is a compare-and-swap on its revision, so a pod changed
    /// since only costs a failed swap and a read.
    pub async fn bind_from(
        &self,
        route: &ObjectRoute,
        name: &str,
        body: &Value,
        q: &Query,
        known: Option<Stored>,
    ) -> Result<Reply, ApiError> {
        let node = body.pointer("/target/name").and_then(Value::as_str).unwrap_or_default().to_string();
        if node.is_empty() {
            let r = route.resource;
            return Err(ApiError::invalid(r, name, vec![FieldError::required("target.name", "")]));
        }
        let pod_route = ObjectRoute { sub: None, ..route.clone() };
        let now = meta::rfc3339(now(self));
        let writer = self.writer(route.resource, q, Some("binding"));
        let ask = Ask { route: &pod_route, name, expect: 0, q, out: Output::default() };
        self.read_modify_write_from(ask, known, move |r, old| {
            let conflict = |detail: String| ApiError::Conflict {
                group: r.group.into(),
                plural: r.plural.into(),
                name: name.into(),
                detail,
            };
            if old.value.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(conflict("pod is being deleted, cannot be assigned to a host".into()));
            }
            match old.value.pointer("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                Some(current) => Err(conflict(format!("pod {name} is already assigned to node {current:?}"))),
                None => {
                    let mut new = old.value.clone();
                    new["spec"]["nodeName"] = json!(node);
                    let conditions = new["status"]["conditions"].as_array().cloned().unwrap_or_default();
                    let mut conditions: Vec<Value> =
                        conditions.into_iter().filter(|c| c["type"] != "PodScheduled").collect();
                    conditions.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                                           "lastTransitionTime": now}));
                    new["status"]["conditions"] = Value::Array(conditions);
                    apply::record_update(Some(&old.value), &mut new, &writer);
                    Ok(new)
                }
            }
        })
        .await?;
        Ok(Reply::Object(201, created_status()))
    }

    /// POST pods/eviction: deletes the pod unless a PodDisruptionBudget selecting it allows no
    /// disruption now (429, as kube-apiserver answers).
    pub async fn evict(&self, route: &ObjectRoute, name: &str, body: &Value, q: &Query) -> Result<Reply, ApiError> {
        let r = route.resource;
        let key = r.key(route.namespace.as_deref(), name);
        let pod = self.store.get(&key, false).await?.ok_or_else(|| ApiError::not_found(r, name))?;
        let pdbs = resources::find("policy", "poddisruptionbudgets").expect("PDBs are served");
        let page = self.store.list(&pdbs.prefix(route.namespace.as_deref()), None, 0, 0, false).await?;
        for pdb in page.items {
            // No selector selects nothing; an empty one (policy/v1) selects every pod.
            let Some(selector) = pdb.value.pointer("/spec/selector").filter(|s| !s.is_null()) else { continue };
            let selector = LabelSelector::from_json(selector).map_err(ApiError::Internal)?;
            if !selector.matches(&pod.value) {
                continue;
            }
            let allowed = pdb.value.pointer("/status/disruptionsAllowed").and_then(Value::as_i64).unwrap_or(0);
            if allowed < 1 {
                return Err(ApiError::TooManyRequests(format!(
                    "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget {} \
                     needs {} healthy pods and has {} currently",
                    meta::name(&pdb.value),
                    pdb.value.pointer("/status/desiredHealthy").and_then(Value::as_i64).unwrap_or(0),
                    pdb.value.pointer("/status/currentHealthy").and_then(Value::as_i64).unwrap_or(0),
                )));
            }
        }
        let options = body.get("deleteOptions").cloned().unwrap_or(Value::Null);
        let pod_route = ObjectRoute { sub: None, ..route.clone() };
        self.delete(&pod_route, name, &options, q).await?;
        Ok(Reply::Object(201, created_status()))
    }

    /// DELETE: at once, or by marking the object (deletionTimestamp) when finalizers or a
    /// graceful pod termination must run first.
    pub async fn delete(&self, route: &ObjectRoute, name: &str, options: &Value, q: &Query) -> Result<Reply, ApiError> {
        let r = route.resource;
        let key = r.key(route.namespace.as_deref(), name);
        let policy = Propagation::parse(
            options.get("propagationPolicy").and_then(Value::as_str).or(q.get("propagationPolicy")),
        )?;
        let grace = match options.get("gracePeriodSeconds").and_then(Value::as_i64) {
            Some(g) => Some(g),
            None => q
                .get("gracePeriodSeconds")
                .map(|g| g.parse::<i64>())
                .transpose()
                .map_err(|_| ApiError::BadRequest("gracePeriodSeconds must be a whole number of seconds".into()))?,
        };
        for _ in 0..WRITE_RETRIES {
            let old = self.store.get(&key, false).await?.ok_or_else(|| ApiError::not_found(r, name))?;
            if let Some(uid) = options.pointer("/preconditions/uid").and_then(Value::as_str)
                && uid != meta::uid(&old.value)
            {
                return Err(ApiError::Conflict {
                    group: r.group.into(),
                    plural: r.plural.into(),
                    name: name.into(),
                    detail: format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta::uid(&old.value)
                    ),
                });
            }
            let namespace_delete = r.plural == "namespaces";
            let plan = deletion::plan(r, &old.value, grace, policy, now(self));
            let mut obj = match plan {
                Deletion::Now if !namespace_delete => {
                    if dry_run(q) {
                        return Ok(Reply::Object(200, self.present(r, old.value, old.rev, Output::default())));
                    }
                    match self.store.delete_if_with(&key, old.rev, &services::side_of_delete(r, &old.value)).await? {
                        WriteOutcome::Written(_) => {
                            return Ok(Reply::Object(200, self.present(r, old.value, old.rev, Output::default())));
                        }
                        WriteOutcome::Mismatch(None) => return Err(ApiError::not_found(r, name)),
                        WriteOutcome::Mismatch(Some(_)) | WriteOutcome::ClaimTaken => continue,
                    }
                }
                Deletion::Mark(obj) => obj,
                Deletion::Now | Deletion::Unchanged => old.value.clone(),
            };
            // A namespace is marked and emptied by the cleaner, which deletes it last.
            if namespace_delete {
                let m = meta::metadata_mut(&mut obj);
                if !m.contains_key("deletionTimestamp") {
                    m.insert("deletionTimestamp".into(), json!(meta::rfc3339(now(self))));
                    m.insert("deletionGracePeriodSeconds".into(), json!(0));
                }
                obj["status"] = json!({"phase": "Terminating"});
            }
            if obj == old.value || dry_run(q) {
                return Ok(Reply::Object(200, self.present(r, obj, old.rev, Output::default())));
            }
            match self.store.put_if(&key, &obj, old.rev).await? {
                WriteOutcome::Written(rev) => {
                    if namespace_delete {
                        crate::namespaces::spawn_cleanup(self.store.clone(), name.to_string());
                    }
                    return Ok(Reply::Object(200, self.present(r, obj, rev, Output::default())));
                }
                WriteOutcome::Mismatch(None) => return Err(ApiError::not_found(r, name)),
                WriteOutcome::Mismatch(Some(_)) | WriteOutcome::ClaimTaken => continue,
            }
        }
        Err(ApiError::modified(r, name))
    }

    /// DELETE on a collection: every object the selectors match.
    pub async fn delete_collection(&self, route: &ObjectRoute, options: &Value, q: &Query) -> Result<Reply, ApiError> {
        let r = route.resource;
        let Reply::Object(_, list) = self.list(route, q, Output::default()).await? else { unreachable!() };
        let mut deleted = Vec::new();
        for item in list["items"].as_array().into_iter().flatten() {
            let route = ObjectRoute {
                resource: r,
                namespace: meta::namespace(item).map(str::to_string),
                name: None,
                sub: None,
            };
            match self.delete(&route, meta::name(item), options, q).await {
                Ok(Reply::Object(_, obj)) => deleted.push(obj),
                Ok(_) | Err(ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Reply::Object(
            200,
            json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                   "metadata": {"resourceVersion": list["metadata"]["resourceVersion"]}, "items": deleted}),
        ))
    }

    /// A watch: synthetic ADDED events for what exists when no resourceVersion (or 0) is
    /// given, then every change; objects entering or leaving the selectors are ADDED or
    /// DELETED as for kube-apiserver's watch cache.
    pub async fn watch(&self, route: &ObjectRoute, q: &Query, out: Output) -> Result<Reply, ApiError> {
        let r = route.resource;
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())?;
        let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), r)?;
        let bookmarks = q.flag("allowWatchBookmarks");
        let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
        // A watch of one object (`.../pods/web?watch=1`) watches its namespace and keeps only
        // that name: a key prefix would also match `web-2`.
        let only = route.name.clone();
        let everything = labels.is_empty() && fields.is_empty() && only.is_none();
        let selected = move |obj: &Value| {
            labels.matches(obj) && fields.matches(obj) && only.as_deref().is_none_or(|n| meta::name(obj) == n)
        };
        let prefix = r.prefix(route.namespace.as_deref());
        let from = q.get("resourceVersion").filter(|v| !v.is_empty()).map(meta::parse_resource_version).transpose()?;
        let (tx, rx) = mpsc::channel::<WatchEvent>(256);
        let mut initial = Vec::new();
        let mut source = match from {
            Some(rv) if rv > 0 => match ChangeSource::after(&self.cache, &self.store, r, &prefix, rv) {
                Ok(source) => source,
                Err(ApiError::Gone { oldest, .. }) => {
                    let status = ApiError::Gone { requested: rv, oldest }.to_status();
                    let _ = tx.send(WatchEvent::new("ERROR", status)).await;
                    return Ok(Reply::Watch(rx));
                }
                Err(e) => return Err(e),
            },
            _ => {
                // Subscribe before listing: whatever the feed sent before is in the list.
                let mut source = ChangeSource::from_now(&self.cache, &self.store, r)?;
                let page = self.store.list(&prefix, None, 0, 0, false).await?;
                for item in page.items {
                    if selected(&item.value) {
                        let mut obj = item.value;
                        meta::set_resource_version(&mut obj, item.rev);
                        initial.push(Arc::new(obj));
                    }
                }
                source.known_upto(page.rev);
                source
            }
        };
        let now_fn = self.mint.now();
        tokio::spawn(async move {
            // Table watches carry the column definitions in their first event only.
            let mut columns_sent = !out.table;
            // Objects come with their resourceVersion and, but for another version of the
            // resource sharing the feed, their kind.
            let mut send_event = |kind: &'static str, obj: &Arc<Value>| {
                let mut obj = match obj.get("apiVersion").and_then(Value::as_str) == Some(&r.api_version()) {
                    true => obj.clone(),
                    false => {
                        let mut typed = (**obj).clone();
                        meta::set_type(r, &mut typed);
                        Arc::new(typed)
                    }
                };
                if out.table {
                    let rev = obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
                    let mut t =
                        table::table(r, &[(*obj).clone()], now_fn, out.include, json!({"resourceVersion": rev}));
                    if columns_sent {
                        t["columnDefinitions"] = Value::Null;
                    }
                    columns_sent = true;
                    obj = Arc::new(t);
                }
                WatchEvent { kind, object: obj }
            };
            for obj in &initial {
                if tx.send(send_event("ADDED", obj)).await.is_err() {
                    return;
                }
            }
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let mut bookmark = tokio::time::interval(Duration::from_secs(60));
            bookmark.tick().await;
            loop {
                let next = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d, source.next()).await.ok(),
                        None => Some(source.next().await),
                    }
                };
                let changes = tokio::select! {
                    c = next => c,
                    _ = bookmark.tick(), if bookmarks => {
                        let rev = source.progress();
                        let mark = WatchEvent::new("BOOKMARK", json!({"kind": r.kind, "apiVersion": r.api_version(),
                            "metadata": {"resourceVersion": rev.to_string()}}));
                        if tx.send(mark).await.is_err() { return; }
                        continue;
                    }
                    _ = tx.closed() => return,
                };
                let Some(changes) = changes else { return }; // timeoutSeconds passed
                let changes = match changes {
                    Ok(changes) => changes,
                    // Too slow, or the feed restarts: the client watches again.
                    Err(None) => return,
                    Err(Some(e)) => {
                        let _ = tx.send(WatchEvent::new("ERROR", e.to_status())).await;
                        return;
                    }
                };
                for c in changes.iter().filter(|c| c.key.starts_with(&prefix)) {
                    // Without selectors, the object before the change matters only for a
                    // deletion (it is the event's object).
                    let was = if everything { c.had_prev() } else { c.prev().is_some_and(|p| selected(p)) };
                    let message = match &c.obj {
                        None => c.prev().filter(|_| was).map(|p| ("DELETED", p)),
                        Some(obj) => match (was, selected(obj)) {
                            (false, true) => Some(("ADDED", obj)),
                            (true, true) => Some(("MODIFIED", obj)),
                            (true, false) => Some(("DELETED", obj)),
                            (false, false) => None,
                        },
                    };
                    if let Some((kind, obj)) = message
                        && tx.send(send_event(kind, obj)).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Reply::Watch(rx))
    }
}

fn dry_run(q: &Query) -> bool {
    q.get("dryRun").is_some_and(|d| d == "All")
}

fn with_rv(old: &Stored) -> Value {
    let mut v = old.value.clone();
    meta::set_resource_version(&mut v, old.rev);
    v
}

/// The Status a subresource POST (binding, eviction) answers with.
fn created_status() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})
}

/// Drops the fields the kind does not have, as kube-apiserver's decoding does; with
/// `fieldValidation=Strict` (kubectl's default) they are refused instead.
fn check_fields(r: &Resource, obj: &mut Value, strict: bool) -> Result<(), ApiError> {
    let unknown = corral_api::openapi::prune_unknown(r.kind, obj);
    if unknown.is_empty() || !strict {
        return Ok(());
    }
    let fields: Vec<String> = unknown.iter().map(|f| format!("unknown field {f:?}")).collect();
    Err(ApiError::BadRequest(format!(
        "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {}",
        fields.join(", "),
        kind = r.kind,
        version = r.version,
    )))
}

fn strict(q: &Query) -> bool {
    q.get("fieldValidation") == Some("Strict")
}

/// The object a PUT or PATCH produced, with the fields it may not change carried over.
fn into_update(r: &Resource, sub: Option<&str>, old: &Stored, mut new: Value) -> Result<Value, ApiError> {
    match sub {
        Some("status") => meta::prepare_status_update(r, &old.value, &new),
        None => {
            meta::prepare_update(r, &old.value, &mut new)?;
            crate::defaults::apply(r, &mut new);
            if (r.group, r.plural) == ("", "pods") {
                crate::validate::pod_update(r, &old.value, &new)?;
            }
            Ok(new)
        }
        Some(other) => Err(ApiError::BadRequest(format!("subresource {other:?} cannot be written this way"))),
    }
}

/// The autoscaling/v1 Scale of a Deployment or ReplicaSet.
fn scale_of(s: &Stored) -> Value {
    let obj = &s.value;
    let selector = table::selector_text(obj.pointer("/spec/selector"));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta::name(obj),
            "namespace": meta::namespace(obj),
            "uid": meta::uid(obj),
            "resourceVersion": s.rev.to_string(),
            "creationTimestamp": obj.pointer("/metadata/creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)},
        "status": {
            "replicas": obj.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": if selector == "<none>" { String::new() } else { selector },
        },
    })
}

/// Writes a Scale's replicas into its Deployment or ReplicaSet.
fn scale_into(r: &Resource, old: &Stored, scale: &Value) -> Result<Value, ApiError> {
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| ApiError::invalid(r, meta::name(&old.value), vec![FieldError::required("spec.replicas", "")]))?;
    if replicas < 0 {
        return Err(ApiError::invalid(
            r,
            meta::name(&old.value),
            vec![FieldError::invalid("spec.replicas", &json!(replicas), "must be greater than or equal to 0")],
        ));
    }
    let mut new = old.value.clone();
    new["spec"]["replicas"] = json!(replicas);
    let generation = new.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
    if old.value.pointer("/spec/replicas") != new.pointer("/spec/replicas") {
        meta::metadata_mut(&mut new).insert("generation".into(), json!(generation + 1));
    }
    Ok(new)
}

fn encode_continue(rev: i64, key: &str) -> String {
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rev, "start": key}).to_string();
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_continue(token: &str) -> Result<(i64, String), ApiError> {
    let bad = || ApiError::BadRequest("continue key is not valid: illegal base64 data".into());
    let raw = URL_SAFE_NO_PAD.decode(token.trim_end_matches('=')).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rev = v.get("rv").and_then(Value::as_i64).ok_or_else(bad)?;
    let key = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rev, key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_queries_decode() {
        let token = encode_continue(42, "/registry/pods/default/web-1");
        assert_eq!(decode_continue(&token).unwrap(), (42, "/registry/pods/default/web-1".to_string()));
        assert!(decode_continue("!!").is_err());
        let q = Query::parse(Some("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=1"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(q.flag("watch"));
    }
}
