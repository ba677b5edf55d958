//! Field ownership: the `managedFields` every write keeps, and server-side apply on top of it.
//!
//! A field set is a tree in Kubernetes' `FieldsV1` form: `f:<name>` for a field, `k:{...}` for
//! an item of a list merged by key, `v:<json>` for an item of a set, and `.` marking a node
//! that is itself owned. A node without children is owned too (a leaf).
//!
//! - An update (PUT, the three patch types, create) gives its manager the fields it changed
//!   and takes them from everyone else.
//! - An apply makes its manager own exactly the fields of the applied configuration: it
//!   refuses (409, or takes them with `force`) fields another manager owns with another
//!   value, removes the fields it owned before and no longer applies unless someone else
//!   owns them too, and merges the rest into the live object.
//!
//! How a list merges (by which key, or whole) comes from the same table as strategic merge
//! patch ([`crate::patch::list_strategy`]).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::patch::{ListStrategy, list_strategy};
use crate::status::ApiError;

/// A field set in `FieldsV1` form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSet(BTreeMap<String, FieldSet>);

/// A path of `FieldsV1` elements from the object's root to an owned field.
pub type FieldPath = Vec<String>;

const SELF: &str = ".";

impl FieldSet {
    pub fn from_json(v: &Value) -> FieldSet {
        let children = v.as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), FieldSet::from_json(v))).collect());
        FieldSet(children.unwrap_or_default())
    }

    pub fn to_json(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every owned path.
    pub fn members(&self) -> Vec<FieldPath> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut FieldPath, out: &mut Vec<FieldPath>) {
        for (k, child) in &self.0 {
            if k == SELF {
                continue;
            }
            prefix.push(k.clone());
            if child.0.is_empty() || child.0.contains_key(SELF) {
                out.push(prefix.clone());
            }
            child.collect(prefix, out);
            prefix.pop();
        }
    }

    pub fn contains(&self, path: &[String]) -> bool {
        let Some((last, parents)) = path.split_last() else { return false };
        let mut node = self;
        for p in parents {
            match node.0.get(p) {
                Some(n) => node = n,
                None => return false,
            }
        }
        node.0.get(last).is_some_and(|n| n.0.is_empty() || n.0.contains_key(SELF))
    }

    pub fn insert(&mut self, path: &[String]) {
        let Some((last, parents)) = path.split_last() else { return };
        let mut node = self;
        for p in parents {
            let existed = node.0.contains_key(p);
            node = node.0.entry(p.clone()).or_default();
            // An owned leaf that gains children stays owned, through `.`.
            if existed && node.0.is_empty() {
                node.0.insert(SELF.into(), FieldSet::default());
            }
        }
        let leaf = node.0.entry(last.clone()).or_default();
        if !leaf.0.is_empty() {
            leaf.0.insert(SELF.into(), FieldSet::default());
        }
    }

    pub fn remove(&mut self, path: &[String]) {
        let Some((first, rest)) = path.split_first() else { return };
        let Some(child) = self.0.get_mut(first) else { return };
        if rest.is_empty() {
            if child.0.len() > 1 || (child.0.len() == 1 && !child.0.contains_key(SELF)) {
                child.0.remove(SELF);
            } else {
                self.0.remove(first);
            }
            return;
        }
        child.remove(rest);
        if child.0.is_empty() {
            self.0.remove(first);
        }
    }
}

/// The fields of an object (or an applied configuration) as a field set. The identity and
/// bookkeeping fields are nobody's.
pub fn fields_of(obj: &Value) -> FieldSet {
    let mut set = FieldSet::default();
    if let Value::Object(m) = obj {
        walk_map(m, &mut Vec::new(), &mut Vec::new(), &mut set);
    }
    set
}

/// Fields nobody owns: the type, the status (its own subresource) and the metadata the server
/// keeps.
fn is_bookkeeping(names: &[String]) -> bool {
    match names {
        [top] => matches!(top.as_str(), "apiVersion" | "kind" | "status"),
        [meta, field] if meta == "metadata" => {
            matches!(
                field.as_str(),
                "name" | "namespace" | "uid" | "resourceVersion" | "generation" | "creationTimestamp" | "managedFields"
            ) || field.starts_with("deletion")
        }
        _ => false,
    }
}

fn walk_map(m: &Map<String, Value>, names: &mut Vec<String>, path: &mut FieldPath, set: &mut FieldSet) {
    for (k, v) in m {
        names.push(k.clone());
        if !is_bookkeeping(names) {
            path.push(format!("f:{k}"));
            walk_value(v, names, path, set);
            path.pop();
        }
        names.pop();
    }
}

/// The fields an update changed: set to a new value (`set`), or removed (`gone`). Equal
/// subtrees are skipped whole, so a small change to a large object costs little.
fn diff(
    old: &Value,
    new: &Value,
    names: &mut Vec<String>,
    path: &mut FieldPath,
    set: &mut FieldSet,
    gone: &mut FieldSet,
) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(o), Value::Object(n)) if !o.is_empty() && !n.is_empty() && !is_atomic_map(names) => {
            for k in o.keys().chain(n.keys().filter(|k| !o.contains_key(*k))) {
                names.push(k.clone());
                if !is_bookkeeping(names) {
                    path.push(format!("f:{k}"));
                    match (o.get(k), n.get(k)) {
                        (Some(a), Some(b)) => diff(a, b, names, path, set, gone),
                        (Some(a), None) => walk_value(a, names, path, gone),
                        (None, Some(b)) => walk_value(b, names, path, set),
                        (None, None) => {}
                    }
                    path.pop();
                }
                names.pop();
            }
        }
        (Value::Array(o), Value::Array(n)) if matches!(shape(names), Shape::Keyed(_)) => {
            let Shape::Keyed(keys) = shape(names) else { unreachable!() };
            let keyed = |items: &[Value]| -> Vec<(Map<String, Value>, Value)> {
                items.iter().filter_map(|i| Some((key_of(i, &keys)?, i.clone()))).collect()
            };
            let (o, n) = (keyed(o), keyed(n));
            for (key, item) in &o {
                path.push(key_elem(key));
                match n.iter().find(|(k, _)| k == key) {
                    Some((_, b)) => diff(item, b, names, path, set, gone),
                    None => {
                        gone.insert(path);
                        if let Value::Object(m) = item {
                            walk_map(m, names, path, gone);
                        }
                    }
                }
                path.pop();
            }
            for (key, item) in n.iter().filter(|(k, _)| !o.iter().any(|(ok, _)| ok == k)) {
                path.push(key_elem(key));
                set.insert(path);
                if let Value::Object(m) = item {
                    walk_map(m, names, path, set);
                }
                path.pop();
            }
        }
        (Value::Array(o), Value::Array(n)) if matches!(shape(names), Shape::Set) => {
            for (items, others, into) in [(o, n, &mut *gone), (n, o, &mut *set)] {
                for item in items.iter().filter(|i| !others.contains(i)) {
                    path.push(format!("v:{item}"));
                    into.insert(path);
                    path.pop();
                }
            }
        }
        // A scalar, an atomic value, or a change of shape: what was there is gone, what is
        // there now is set.
        _ => {
            walk_value(old, names, path, gone);
            walk_value(new, names, path, set);
        }
    }
}

fn walk_value(v: &Value, names: &mut Vec<String>, path: &mut FieldPath, set: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() && !is_atomic_map(names) => walk_map(m, names, path, set),
        Value::Array(items) => match shape(names) {
            Shape::Keyed(keys) => {
                let mut any = false;
                for item in items {
                    let Some(key) = key_of(item, &keys) else { continue };
                    any = true;
                    path.push(key_elem(&key));
                    set.insert(path);
                    if let Value::Object(m) = item {
                        walk_map(m, names, path, set);
                    }
                    path.pop();
                }
                if !any {
                    set.insert(path);
                }
            }
            Shape::Set if !items.is_empty() => {
                for item in items {
                    path.push(format!("v:{item}"));
                    set.insert(path);
                    path.pop();
                }
            }
            _ => set.insert(path),
        },
        _ => set.insert(path),
    }
}

/// Maps owned whole: a label selector (Service's and the workloads' `selector`).
fn is_atomic_map(names: &[String]) -> bool {
    names.last().is_some_and(|n| n == "selector")
}

enum Shape {
    Keyed(Vec<&'static str>),
    Set,
    Atomic,
}

fn shape(names: &[String]) -> Shape {
    let path: Vec<&str> = names.iter().map(String::as_str).collect();
    match list_strategy(&path) {
        // Apply keys ports by port and protocol (two ports may differ only by protocol).
        ListStrategy::MergeByKey("containerPort") => Shape::Keyed(vec!["containerPort", "protocol"]),
        ListStrategy::MergeByKey("port") => Shape::Keyed(vec!["port", "protocol"]),
        ListStrategy::MergeByKey(key) => Shape::Keyed(vec![key]),
        ListStrategy::MergePrimitives => Shape::Set,
        ListStrategy::Replace => Shape::Atomic,
    }
}

/// An item's key fields, with Kubernetes' defaults filled in.
fn key_of(item: &Value, keys: &[&str]) -> Option<Map<String, Value>> {
    let mut key = Map::new();
    for k in keys {
        let v = match (item.get(*k), *k) {
            (Some(v), _) => v.clone(),
            (None, "protocol") => json!("TCP"),
            (None, _) => return None,
        };
        key.insert((*k).to_string(), v);
    }
    Some(key)
}

/// The path element of a keyed item: `k:{"name":"web"}`.
fn key_elem(key: &Map<String, Value>) -> String {
    format!("k:{}", serde_json::to_string(key).expect("a map serializes"))
}

/// The value at a path, if the object has it.
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = obj;
    for p in path {
        v = step(v, p)?;
    }
    Some(v)
}

fn step<'a>(v: &'a Value, elem: &str) -> Option<&'a Value> {
    match elem.strip_prefix("f:") {
        Some(field) => v.get(field),
        None => v.get(item_index(v.as_array()?, elem)?),
    }
}

/// The position of the list item a `k:` or `v:` element names.
fn item_index(items: &[Value], elem: &str) -> Option<usize> {
    if let Some(key) = elem.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(key).ok()?;
        return items.iter().position(|item| key_matches(item, &key));
    }
    let want: Value = serde_json::from_str(elem.strip_prefix("v:")?).ok()?;
    items.iter().position(|item| *item == want)
}

fn key_matches(item: &Value, key: &Map<String, Value>) -> bool {
    key.iter().all(|(k, want)| match item.get(k) {
        Some(v) => v == want,
        None => k == "protocol" && want == "TCP",
    })
}

/// Removes the field or item at a path.
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut v = obj;
    for p in parents {
        let next = match p.strip_prefix("f:") {
            Some(field) => v.get_mut(field),
            None => match v.as_array().and_then(|items| item_index(items, p)) {
                Some(i) => v.get_mut(i),
                None => None,
            },
        };
        match next {
            Some(n) => v = n,
            None => return,
        }
    }
    match (last.strip_prefix("f:"), v) {
        (Some(field), Value::Object(m)) => {
            m.remove(field);
        }
        (None, Value::Array(items)) => {
            if let Some(i) = item_index(items, last) {
                items.remove(i);
            }
        }
        _ => {}
    }
}

/// `.spec.containers[name="web"].image`, as Kubernetes names a path in messages.
pub fn describe(path: &[String]) -> String {
    let mut out = String::new();
    for p in path {
        if let Some(f) = p.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = p.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = p.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// One entry of `metadata.managedFields`.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl Entry {
    fn from_json(v: &Value) -> Option<Entry> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Some(Entry {
            manager: s("manager")?,
            operation: s("operation").unwrap_or_else(|| "Update".into()),
            api_version: s("apiVersion").unwrap_or_default(),
            time: s("time").unwrap_or_default(),
            subresource: s("subresource"),
            fields: FieldSet::from_json(v.get("fieldsV1").unwrap_or(&Value::Null)),
        })
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_json(),
        });
        if let Some(sub) = &self.subresource {
            v["subresource"] = json!(sub);
        }
        v
    }
}

pub fn entries(obj: &Value) -> Vec<Entry> {
    let list = obj.pointer("/metadata/managedFields").and_then(Value::as_array);
    list.map(|l| l.iter().filter_map(Entry::from_json).collect()).unwrap_or_default()
}

fn set_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries.iter().filter(|e| !e.fields.is_empty()).map(Entry::to_json).collect();
    if let Some(md) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            md.remove("managedFields");
        } else {
            md.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Who is writing, for the bookkeeping.
#[derive(Clone, Debug)]
pub struct Writer {
    pub manager: String,
    pub api_version: String,
    pub subresource: Option<String>,
    pub time: String,
}

/// Records an update (create when `old` is None): the writer owns what it changed, nobody
/// else does any more. A request that set `managedFields` itself keeps them as sent; an
/// empty list clears them.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Writer) {
    let before = old.map(entries).unwrap_or_default();
    let then = old.and_then(|o| o.pointer("/metadata/managedFields"));
    match new.pointer("/metadata/managedFields") {
        // Left out of the request: the bookkeeping carries on from the stored entries.
        None => {}
        Some(Value::Array(sent)) if sent.is_empty() && old.is_some() => {
            set_entries(new, Vec::new());
            return;
        }
        // Set by the request (server-side apply's create among them): kept as sent.
        Some(Value::Array(sent)) if old.is_none() && !sent.is_empty() => return,
        Some(sent) if old.is_some() && Some(sent) != then => return,
        Some(_) => {}
    }
    let (mut set, mut gone) = (FieldSet::default(), FieldSet::default());
    match old {
        Some(old) => diff(old, new, &mut Vec::new(), &mut Vec::new(), &mut set, &mut gone),
        None => set = fields_of(new),
    }
    let (changed, gone) = (set.members(), gone.members());
    if changed.is_empty() && gone.is_empty() {
        set_entries(new, before);
        return;
    }
    let mut list = before;
    for e in &mut list {
        for p in changed.iter().chain(&gone) {
            e.fields.remove(p);
        }
    }
    let mine = upsert(&mut list, w, "Update");
    for p in &changed {
        mine.fields.insert(p);
    }
    set_entries(new, list);
}

fn upsert<'a>(list: &'a mut Vec<Entry>, w: &Writer, operation: &str) -> &'a mut Entry {
    let found =
        list.iter().position(|e| e.manager == w.manager && e.operation == operation && e.subresource == w.subresource);
    let i = match found {
        Some(i) => i,
        None => {
            list.push(Entry {
                manager: w.manager.clone(),
                operation: operation.to_string(),
                api_version: String::new(),
                time: String::new(),
                subresource: w.subresource.clone(),
                fields: FieldSet::default(),
            });
            list.len() - 1
        }
    };
    let e = &mut list[i];
    e.api_version = w.api_version.clone();
    e.time = w.time.clone();
    e
}

/// Server-side apply of `applied` onto `live` (None: the object is created from it).
pub fn apply(live: Option<&Value>, applied: &Value, w: &Writer, force: bool) -> Result<Value, ApiError> {
    if !applied.is_object() {
        return Err(ApiError::BadRequest("an apply configuration must be an object".into()));
    }
    let new_set = fields_of(applied);
    let Some(live) = live else {
        let mut obj = applied.clone();
        let mut list = Vec::new();
        upsert(&mut list, w, "Apply").fields = new_set;
        set_entries(&mut obj, list);
        return Ok(obj);
    };
    let mut list = entries(live);
    let mine = |e: &Entry| e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource;

    // Every other entry counts, the same manager's updates too (`kubectl scale` records
    // its replicas under "kubectl" with the scale subresource).
    let mut conflicts: Vec<(usize, FieldPath)> = Vec::new();
    let members = new_set.members();
    for (i, e) in list.iter().enumerate().filter(|(_, e)| !mine(e)) {
        for p in members.iter().filter(|p| e.fields.contains(p)) {
            let is_item = p.last().is_some_and(|l| !l.starts_with("f:"));
            if !is_item && value_at(live, p) != value_at(applied, p) {
                conflicts.push((i, p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&list, &conflicts));
    }
    for (i, p) in &conflicts {
        list[*i].fields.remove(p);
    }

    let mut obj = live.clone();
    let before = list.iter().find(|e| mine(e)).map(|e| e.fields.clone()).unwrap_or_default();
    let mut dropped: Vec<FieldPath> = before.members().into_iter().filter(|p| !new_set.contains(p)).collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in &dropped {
        let shared = list.iter().any(|e| !mine(e) && e.fields.contains(p));
        if !shared {
            remove_at(&mut obj, p);
        }
    }
    merge(&mut obj, applied, &mut Vec::new());
    upsert(&mut list, w, "Apply").fields = new_set;
    set_entries(&mut obj, list);
    Ok(obj)
}

fn conflict_error(list: &[Entry], conflicts: &[(usize, FieldPath)]) -> ApiError {
    let n = conflicts.len();
    let line = |(i, p): &(usize, FieldPath)| {
        let e = &list[*i];
        let sub = e.subresource.as_ref().map(|s| format!(" with subresource {s:?}")).unwrap_or_default();
        format!("conflict with {:?}{sub} using {}: {}", e.manager, e.api_version, describe(p))
    };
    let lines: Vec<String> = conflicts.iter().map(line).collect();
    let message = format!("Apply failed with {n} conflict{}: {}", if n == 1 { "" } else { "s" }, lines.join("\n"));
    ApiError::ApplyConflict { message, fields: conflicts.iter().map(|(_, p)| describe(p)).collect() }
}

/// Merges an applied configuration into the live object: maps field by field, keyed lists
/// item by item, everything else replaced.
fn merge(live: &mut Value, applied: &Value, names: &mut Vec<String>) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) if !is_atomic_map(names) => {
            for (k, av) in a {
                if k == "managedFields" {
                    continue;
                }
                names.push(k.clone());
                match l.get_mut(k) {
                    Some(lv) if !av.is_null() => merge(lv, av, names),
                    _ => {
                        l.insert(k.clone(), av.clone());
                    }
                }
                names.pop();
            }
        }
        (Value::Array(l), Value::Array(a)) => match shape(names) {
            Shape::Keyed(keys) => {
                for item in a {
                    let Some(key) = key_of(item, &keys) else { continue };
                    match l.iter_mut().find(|i| key_matches(i, &key)) {
                        Some(existing) => merge(existing, item, names),
                        None => l.push(item.clone()),
                    }
                }
            }
            Shape::Set => {
                for item in a {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            Shape::Atomic => *l = a.clone(),
        },
        (l, a) => *l = a.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(manager: &str) -> Writer {
        Writer {
            manager: manager.into(),
            api_version: "apps/v1".into(),
            subresource: None,
            time: "2026-11-23T00:00:00Z".into(),
        }
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": "web", "labels": { "app": "web" } },
            "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": { "app": "web" } },
                "template": { "spec": { "containers": [
                    { "name": "web", "image": image, "ports": [{ "containerPort": 80 }] }
                ] } }
            }
        })
    }

    #[test]
    fn an_applied_configuration_is_owned_field_by_field() {
        let obj = apply(None, &deployment(3, "nginx:1"), &writer("kubectl"), false).unwrap();
        let entry = &entries(&obj)[0];
        assert_eq!((entry.manager.as_str(), entry.operation.as_str()), ("kubectl", "Apply"));
        let fields = entry.fields.to_json();
        assert_eq!(fields["f:spec"]["f:replicas"], json!({}));
        assert_eq!(fields["f:spec"]["f:selector"], json!({}), "a selector is owned whole");
        let container = &fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!(container["."], json!({}));
        assert_eq!(container["f:image"], json!({}));
        assert!(container["f:ports"]["k:{\"containerPort\":80,\"protocol\":\"TCP\"}"].is_object());
        assert!(fields.get("f:apiVersion").is_none() && fields["f:metadata"].get("f:name").is_none());
    }

    #[test]
    fn another_managers_field_conflicts_unless_forced_or_equal() {
        let live = apply(None, &deployment(3, "nginx:1"), &writer("kubectl"), false).unwrap();
        // `kubectl scale` changes replicas: it owns them now.
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(5);
        record_update(Some(&live), &mut scaled, &writer("kubectl-scale"));
        let owners: Vec<String> = entries(&scaled).iter().map(|e| e.manager.clone()).collect();
        assert_eq!(owners, ["kubectl", "kubectl-scale"]);

        let err = apply(Some(&scaled), &deployment(3, "nginx:2"), &writer("kubectl"), false).unwrap_err();
        assert_eq!(err.code(), 409);
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-scale\" using apps/v1: .spec.replicas"
        );

        let same = apply(Some(&scaled), &deployment(5, "nginx:2"), &writer("kubectl"), false).unwrap();
        assert_eq!(same["spec"]["replicas"], 5, "the same value is shared, not a conflict");
        let forced = apply(Some(&scaled), &deployment(3, "nginx:2"), &writer("kubectl"), true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        assert_eq!(entries(&forced).len(), 1, "the scaler lost its only field");

        // The applier's own updates through a subresource are another entry: they conflict.
        let mut by_scale = live.clone();
        by_scale["spec"]["replicas"] = json!(7);
        let scale_writer = Writer { subresource: Some("scale".into()), ..writer("kubectl") };
        record_update(Some(&live), &mut by_scale, &scale_writer);
        let err = apply(Some(&by_scale), &deployment(3, "nginx:1"), &writer("kubectl"), false).unwrap_err();
        assert!(err.to_string().contains(r#"conflict with "kubectl" with subresource "scale" using apps/v1"#), "{err}");
    }

    #[test]
    fn fields_no_longer_applied_are_removed_unless_someone_else_owns_them() {
        let mut first = deployment(3, "nginx:1");
        first["metadata"]["annotations"] = json!({ "team": "a", "shared": "x" });
        let live = apply(None, &first, &writer("kubectl"), false).unwrap();
        let mut other = live.clone();
        other["metadata"]["annotations"]["shared"] = json!("y");
        record_update(Some(&live), &mut other, &writer("kubectl-annotate"));

        let mut second = deployment(3, "nginx:1");
        second["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{ "name": "A", "value": "1" }]);
        let out = apply(Some(&other), &second, &writer("kubectl"), false).unwrap();
        assert_eq!(out["metadata"]["annotations"], json!({ "shared": "y" }), "team dropped, shared kept");
        assert_eq!(out["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"], "1");
        assert_eq!(out["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1");
    }

    #[test]
    fn a_create_owns_everything_and_an_update_only_what_it_changed() {
        let mut created = deployment(3, "nginx:1");
        record_update(None, &mut created, &writer("kubectl-create"));
        let fields = entries(&created)[0].fields.to_json();
        let container = &fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!((container["."].clone(), container["f:image"].clone()), (json!({}), json!({})));

        let mut updated = created.clone();
        updated["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        updated["metadata"]["labels"] = json!({ "app": "web", "tier": "front" });
        record_update(Some(&created), &mut updated, &writer("kubectl-set"));
        let list = entries(&updated);
        let mine = list[1].fields.to_json();
        assert_eq!(
            mine,
            json!({ "f:metadata": { "f:labels": { "f:tier": {} } },
                    "f:spec": { "f:template": { "f:spec": { "f:containers": {
                        "k:{\"name\":\"web\"}": { "f:image": {} } } } } } })
        );
        let creator = list[0].fields.to_json();
        let container = &creator["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert!(container.get("f:image").is_none() && container.get("f:name").is_some(), "the image moved");
    }

    #[test]
    fn an_update_that_sets_managed_fields_keeps_them_and_a_no_op_changes_nothing() {
        let live = apply(None, &deployment(3, "nginx:1"), &writer("kubectl"), false).unwrap();
        let mut same = live.clone();
        record_update(Some(&live), &mut same, &writer("other"));
        assert_eq!(same, live);
        let mut cleared = live.clone();
        cleared["metadata"]["managedFields"] = json!([]);
        record_update(Some(&live), &mut cleared, &writer("other"));
        assert!(cleared["metadata"].get("managedFields").is_none(), "an empty list clears them");
        let mut moved = live.clone();
        moved["metadata"]["managedFields"][0]["manager"] = json!("someone");
        record_update(Some(&live), &mut moved, &writer("other"));
        assert_eq!(entries(&moved)[0].manager, "someone", "sent entries are kept as sent");
    }
}
