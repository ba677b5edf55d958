//! OpenAPI v3 schemas of the served types, generated from the message table the protobuf
//! decoder uses (`protobuf/schema.txt`): one component per message, fields with their
//! types, lists with the merge keys of strategic merge patch, and each kind tagged with its
//! group, version and kind. This is what `kubectl explain` walks and where kubectl learns
//! how lists merge for client-side apply.

use serde_json::{Map, Value, json};

use crate::patch::{ListStrategy, list_strategy};
use crate::protobuf::schema::{self, Field, Message, Type};
use crate::resources::RESOURCES;

/// The component name of a message.
pub fn component(message: &str) -> String {
    format!("io.corral.api.{message}")
}

fn reference(message: &str) -> Value {
    json!({ "allOf": [{ "$ref": format!("#/components/schemas/{}", component(message)) }] })
}

/// `components.schemas` for every message; kinds carry `x-kubernetes-group-version-kind`.
pub fn components() -> Value {
    let mut schemas = Map::new();
    for m in schema::messages() {
        schemas.insert(component(&m.name), message_schema(m));
    }
    for r in RESOURCES.iter() {
        let name = component(r.kind);
        let entry = schemas.entry(name).or_insert_with(|| json!({ "type": "object", "properties": {} }));
        let gvks = entry.as_object_mut().expect("schemas are objects");
        let list = gvks.entry("x-kubernetes-group-version-kind").or_insert_with(|| json!([]));
        let gvk = json!({ "group": r.group, "version": r.version, "kind": r.kind });
        if let Some(list) = list.as_array_mut()
            && !list.contains(&gvk)
        {
            list.push(gvk);
        }
        let props = entry["properties"].as_object_mut().expect("kinds have properties");
        props.insert(
            "apiVersion".into(),
            json!({ "type": "string", "description": "APIVersion defines the versioned schema of this representation of an object." }),
        );
        props.insert(
            "kind".into(),
            json!({ "type": "string", "description": "Kind is a string value representing the REST resource this object represents." }),
        );
        props.entry("metadata").or_insert_with(|| reference("ObjectMeta"));
    }
    Value::Object(schemas)
}

fn message_schema(m: &Message) -> Value {
    let mut props = Map::new();
    add_fields(m, &mut props);
    json!({ "type": "object", "properties": props })
}

fn add_fields(m: &Message, props: &mut Map<String, Value>) {
    for f in &m.fields {
        if f.name == schema::INLINE {
            if let Type::Message(inner) = &f.ty
                && let Some(inner) = schema::message(inner)
            {
                add_fields(inner, props);
            }
            continue;
        }
        props.insert(f.name.clone(), field_schema(m, f));
    }
}

fn field_schema(m: &Message, f: &Field) -> Value {
    let item = type_schema(&f.ty);
    if !f.repeated {
        return item;
    }
    let mut list = json!({ "type": "array", "items": item });
    let path = context(&m.name, &f.name);
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match list_strategy(&path) {
        ListStrategy::MergeByKey(key) => {
            list["x-kubernetes-patch-merge-key"] = json!(key);
            list["x-kubernetes-patch-strategy"] = json!("merge");
            list["x-kubernetes-list-type"] = json!("map");
            list["x-kubernetes-list-map-keys"] = json!([key]);
        }
        ListStrategy::MergePrimitives => {
            list["x-kubernetes-patch-strategy"] = json!("merge");
            list["x-kubernetes-list-type"] = json!("set");
        }
        ListStrategy::Replace => list["x-kubernetes-list-type"] = json!("atomic"),
    }
    list
}

/// A representative path to a message's field, for the merge-key table (which is keyed by
/// where a list sits in an object).
fn context(message: &str, field: &str) -> Vec<String> {
    let parents: &[&str] = match message {
        "Container" | "EphemeralContainerCommon" | "EphemeralContainer" => &["spec", "containers"],
        m if m.ends_with("Spec") => &["spec"],
        m if m.ends_with("Status") => &["status"],
        "ObjectMeta" => &["metadata"],
        _ => &[],
    };
    parents.iter().map(|p| p.to_string()).chain([field.to_string()]).collect()
}

fn type_schema(ty: &Type) -> Value {
    match ty {
        Type::String => json!({ "type": "string" }),
        Type::Bytes => json!({ "type": "string", "format": "byte" }),
        Type::Int32 => json!({ "type": "integer", "format": "int32" }),
        Type::Int64 => json!({ "type": "integer", "format": "int64" }),
        Type::Bool => json!({ "type": "boolean" }),
        Type::Double => json!({ "type": "number", "format": "double" }),
        Type::Time { .. } => json!({ "type": "string", "format": "date-time" }),
        Type::Quantity => json!({ "type": "string", "x-kubernetes-int-or-string": true, "format": "quantity" }),
        Type::IntOrString => json!({ "type": "string", "x-kubernetes-int-or-string": true, "format": "int-or-string" }),
        Type::Duration => json!({ "type": "string" }),
        Type::RawJson => json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true }),
        Type::Map(value) => json!({ "type": "object", "additionalProperties": type_schema(value) }),
        Type::Message(name) => reference(name),
    }
}

/// Removes the fields an object of `kind` does not have, and returns their paths
/// (`spec.template.spec.containers[0].bogus`), as kube-apiserver drops what its types do not
/// know. Kinds without a schema are left alone.
pub fn prune_unknown(kind: &str, obj: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    if let (Some(m), Value::Object(map)) = (schema::message(kind), obj) {
        prune_message(m, map, "", &mut unknown, true);
    }
    unknown
}

fn prune_message(m: &'static Message, map: &mut Map<String, Value>, path: &str, unknown: &mut Vec<String>, top: bool) {
    let fields = flattened(m);
    map.retain(|k, v| {
        let here = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        if top && (k == "apiVersion" || k == "kind") {
            return true;
        }
        let Some(f) = fields.iter().find(|f| f.name == *k) else {
            unknown.push(here);
            return false;
        };
        prune_value(&f.ty, f.repeated, v, &here, unknown);
        true
    });
}

fn prune_value(ty: &Type, repeated: bool, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match (ty, v) {
        (_, Value::Array(items)) if repeated => {
            for (i, item) in items.iter_mut().enumerate() {
                prune_value(ty, false, item, &format!("{path}[{i}]"), unknown);
            }
        }
        (Type::Map(inner), Value::Object(map)) => {
            for (k, item) in map.iter_mut() {
                prune_value(inner, false, item, &format!("{path}.{k}"), unknown);
            }
        }
        (Type::Message(name), Value::Object(map)) => {
            if let Some(m) = schema::message(name) {
                prune_message(m, map, path, unknown, false);
            }
        }
        _ => {}
    }
}

/// A message's fields with the inline structs' fields in place.
fn flattened(m: &'static Message) -> Vec<&'static Field> {
    let mut out = Vec::new();
    for f in &m.fields {
        match (&f.ty, f.name == schema::INLINE) {
            (Type::Message(inner), true) => {
                if let Some(inner) = schema::message(inner) {
                    out.extend(flattened(inner));
                }
            }
            _ => out.push(f),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named_by_path_and_removed() {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "bogus": 1,
            "metadata": { "name": "x", "labels": { "any": "thing" } },
            "spec": { "template": { "spec": { "containers": [
                { "name": "c", "image": "i", "imagePullPolicy": "Always", "colour": "red",
                  "livenessProbe": { "httpGet": { "path": "/", "port": 80 }, "periodSeconds": 3 } }
            ] } } }
        });
        let unknown = prune_unknown("Deployment", &mut d);
        assert_eq!(unknown, ["bogus", "spec.template.spec.containers[0].colour"]);
        assert!(d.get("bogus").is_none());
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"], 80);
        let mut node = json!({ "kind": "Node", "whatever": 1 });
        assert!(prune_unknown("Node", &mut node).is_empty(), "kinds without a schema are left alone");
    }

    #[test]
    fn kinds_are_tagged_and_lists_carry_their_merge_keys() {
        let c = components();
        let pod = &c[component("Pod")];
        assert_eq!(pod["x-kubernetes-group-version-kind"], json!([{ "group": "", "version": "v1", "kind": "Pod" }]));
        assert!(pod["properties"]["spec"]["allOf"][0]["$ref"].as_str().unwrap().ends_with("PodSpec"));
        let containers = &c[component("PodSpec")]["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        let env = &c[component("Container")]["properties"]["env"];
        assert_eq!(env["x-kubernetes-patch-merge-key"], "name");
        let ports = &c[component("Container")]["properties"]["ports"];
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "containerPort");
        let command = &c[component("Container")]["properties"]["command"];
        assert_eq!(command["x-kubernetes-list-type"], "atomic");
        let probe = &c[component("Probe")]["properties"];
        assert!(probe.get("httpGet").is_some(), "an inline struct's fields are the parent's");
        let node = &c[component("Node")];
        assert_eq!(node["x-kubernetes-group-version-kind"][0]["kind"], "Node", "kinds without a table entry too");
    }
}
