//! The three patch types of PATCH: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and
//! Kubernetes' strategic merge patch, applied to JSON objects.
//!
//! Strategic merge patch merges lists of objects by a key (containers by name, ports by port)
//! instead of replacing them, and honours the directives kubectl sends: `$patch`
//! (replace, delete, merge), `$retainKeys`, `$setElementOrder/<list>` and
//! `$deleteFromPrimitiveList/<list>`. Which lists merge, and by which key, comes from the
//! table in [`list_strategy`], written from the Kubernetes types' patch tags.

use serde_json::{Map, Value};

use crate::status::ApiError;

/// The patch types PATCH accepts, by Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    /// Server-side apply (`application/apply-patch+yaml`).
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(PatchType::Apply),
            _ => None,
        }
    }

    pub const ACCEPTED: &'static str = "application/json-patch+json, application/merge-patch+json, \
        application/strategic-merge-patch+json, application/apply-patch+yaml";
}

/// Applies a JSON or merge patch (the strategic and apply kinds have their own functions).
pub fn apply_generic(kind: PatchType, target: &Value, patch: &Value) -> Result<Value, ApiError> {
    let mut out = target.clone();
    match kind {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::BadRequest(format!("the JSON patch is not valid: {e}")))?;
            json_patch::patch(&mut out, &ops).map_err(|e| ApiError::Invalid {
                group: String::new(),
                kind: String::new(),
                name: String::new(),
                causes: vec![crate::FieldError {
                    reason: "FieldValueInvalid",
                    field: String::new(),
                    message: format!("the JSON patch could not be applied: {e}"),
                }],
            })?;
        }
        PatchType::Merge => json_patch::merge(&mut out, patch),
        PatchType::Strategic => return strategic_merge(target, patch),
        PatchType::Apply => return Err(ApiError::BadRequest("apply patches go through server-side apply".into())),
    }
    Ok(out)
}

/// How a list field merges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListStrategy {
    /// Replaced whole (the default for lists without patch tags).
    Replace,
    /// Objects merged by this key.
    MergeByKey(&'static str),
    /// A set of scalars, merged as a union.
    MergePrimitives,
}

/// The patch strategy of the list at `path` (field names from the object's root, list
/// indices left out), from the `patchStrategy`/`patchMergeKey` tags of the Kubernetes types.
pub fn list_strategy(path: &[&str]) -> ListStrategy {
    use ListStrategy::*;
    let Some((field, parents)) = path.split_last() else { return Replace };
    let in_container = parents.iter().any(|p| matches!(*p, "containers" | "initContainers" | "ephemeralContainers"));
    match *field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => MergeByKey("name"),
        "env" if in_container => MergeByKey("name"),
        "volumeMounts" if in_container => MergeByKey("mountPath"),
        "volumeDevices" if in_container => MergeByKey("devicePath"),
        "ports" if in_container => MergeByKey("containerPort"),
        "ports" if parents.last() == Some(&"spec") => MergeByKey("port"),
        "conditions" => MergeByKey("type"),
        "addresses" if parents.last() == Some(&"status") => MergeByKey("type"),
        "ownerReferences" => MergeByKey("uid"),
        "hostAliases" => MergeByKey("ip"),
        "topologySpreadConstraints" => MergeByKey("topologyKey"),
        "podIPs" | "hostIPs" => MergeByKey("ip"),
        "finalizers" | "podCIDRs" => MergePrimitives,
        _ => Replace,
    }
}

/// Applies a strategic merge patch to `target`.
pub fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    let Value::Object(p) = patch else {
        return Err(ApiError::BadRequest("a strategic merge patch must be a JSON object".into()));
    };
    let mut path = Vec::new();
    merge_map(target.as_object().cloned().unwrap_or_default(), p, &mut path)
        .map(|m| m.map_or(Value::Null, Value::Object))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// Merges a patch map into an original map. `None` means the map is deleted (`$patch: delete`).
fn merge_map(
    mut original: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut replaced = patch.clone();
            replaced.remove("$patch");
            return Ok(Some(strip_directives(replaced)));
        }
        Some("merge") | None => {}
        Some(other) => return Err(bad(format!("unknown patch type: {other} in map"))),
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| bad("$retainKeys must be a list of strings"))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        original.retain(|k, _| keep.contains(&k.as_str()));
    }
    // Primitive-list deletions and element orders apply to the lists named after them.
    let mut orders: Vec<(&str, &Vec<Value>)> = Vec::new();
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let doomed = value.as_array().ok_or_else(|| bad(format!("{key} must be a list")))?;
            if let Some(Value::Array(items)) = original.get_mut(list) {
                items.retain(|v| !doomed.contains(v));
            }
        } else if let Some(list) = key.strip_prefix("$setElementOrder/") {
            orders.push((list, value.as_array().ok_or_else(|| bad(format!("{key} must be a list")))?));
        }
    }
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        path.push(key.clone());
        match value {
            Value::Null => {
                original.remove(key);
            }
            Value::Object(p) => match original.remove(key) {
                Some(Value::Object(o)) => {
                    if let Some(merged) = merge_map(o, p, path)? {
                        original.insert(key.clone(), Value::Object(merged));
                    }
                }
                _ => {
                    if let Some(merged) = merge_map(Map::new(), p, path)? {
                        original.insert(key.clone(), Value::Object(merged));
                    }
                }
            },
            Value::Array(p) => {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let strategy = list_strategy(&refs);
                let old = match original.remove(key) {
                    Some(Value::Array(o)) => o,
                    _ => Vec::new(),
                };
                let merged = merge_list(old, p, strategy, path)?;
                original.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                original.insert(key.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    for (list, order) in orders {
        let refs: Vec<String> = path.iter().cloned().chain([list.to_string()]).collect();
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        if let Some(Value::Array(items)) = original.get_mut(list) {
            sort_by_order(items, order, list_strategy(&refs));
        }
    }
    Ok(Some(original))
}

fn merge_list(
    mut original: Vec<Value>,
    patch: &[Value],
    strategy: ListStrategy,
    path: &mut Vec<String>,
) -> Result<Vec<Value>, ApiError> {
    let replace_all = patch.iter().any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace_all {
        return Ok(patch
            .iter()
            .filter(|v| v.get("$patch").is_none())
            .cloned()
            .map(|v| match v {
                Value::Object(m) => Value::Object(strip_directives(m)),
                other => other,
            })
            .collect());
    }
    match strategy {
        ListStrategy::Replace => Ok(patch
            .iter()
            .cloned()
            .map(|v| match v {
                Value::Object(m) => Value::Object(strip_directives(m)),
                other => other,
            })
            .collect()),
        ListStrategy::MergePrimitives => {
            for v in patch {
                if !original.contains(v) {
                    original.push(v.clone());
                }
            }
            Ok(original)
        }
        ListStrategy::MergeByKey(key) => {
            for item in patch {
                let Value::Object(p) = item else {
                    return Err(bad(format!("a list merged by {key} holds objects, found {item}")));
                };
                let id =
                    p.get(key).ok_or_else(|| bad(format!("map: {p:?} does not contain declared merge key: {key}")))?;
                let at = original.iter().position(|o| o.get(key) == Some(id));
                if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(i) = at {
                        original.remove(i);
                    }
                    continue;
                }
                match at {
                    Some(i) => {
                        let old = original[i].as_object().cloned().unwrap_or_default();
                        match merge_map(old, p, path)? {
                            Some(m) => original[i] = Value::Object(m),
                            None => {
                                original.remove(i);
                            }
                        }
                    }
                    None => {
                        if let Some(m) = merge_map(Map::new(), p, path)? {
                            original.push(Value::Object(m));
                        }
                    }
                }
            }
            Ok(original)
        }
    }
}

/// Orders a merged list as `$setElementOrder` says; items it does not name keep their
/// relative order after the named ones.
fn sort_by_order(items: &mut [Value], order: &[Value], strategy: ListStrategy) {
    let rank = |item: &Value| -> usize {
        let found = match strategy {
            ListStrategy::MergeByKey(key) => {
                order.iter().position(|o| o.get(key).is_some() && o.get(key) == item.get(key))
            }
            _ => order.iter().position(|o| o == item),
        };
        found.unwrap_or(usize::MAX)
    };
    items.sort_by_key(|item| rank(item)); // stable: unnamed items keep their order
}

/// Removes directive keys from a map that is taken as it is.
fn strip_directives(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    for v in m.values_mut() {
        if let Value::Object(inner) = v {
            *inner = strip_directives(std::mem::take(inner));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn containers_merge_by_name_and_ports_by_container_port() {
        let deploy = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80}]},
            {"name": "side", "image": "busybox"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "web"}],
            "containers": [{"name": "web", "image": "nginx:2", "ports": [{"containerPort": 443}]}]
        }}}});
        let out = strategic_merge(&deploy, &patch).unwrap();
        let containers = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["name"], "side", "ordered by $setElementOrder");
        assert_eq!(containers[1]["image"], "nginx:2");
        assert_eq!(containers[1]["ports"], json!([{"containerPort": 80}, {"containerPort": 443}]));
    }

    #[test]
    fn directives_delete_replace_and_retain() {
        let pod = json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
                         "spec": {"containers": [{"name": "c", "image": "i"}, {"name": "d", "image": "j"}],
                                  "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"],
                         "labels": {"$patch": "replace", "z": "3"}},
            "spec": {"containers": [{"name": "d", "$patch": "delete"}],
                     "strategy": {"$retainKeys": ["type"], "type": "Recreate"}}
        });
        let out = strategic_merge(&pod, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b", "c"]));
        assert_eq!(out["metadata"]["labels"], json!({"z": "3"}));
        assert_eq!(out["spec"]["containers"], json!([{"name": "c", "image": "i"}]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn lists_without_a_strategy_are_replaced_and_nulls_delete() {
        let svc = json!({"spec": {"selector": {"app": "a"}, "externalIPs": ["1.1.1.1"]}});
        let out = strategic_merge(&svc, &json!({"spec": {"selector": null, "externalIPs": ["2.2.2.2"]}})).unwrap();
        assert_eq!(out, json!({"spec": {"externalIPs": ["2.2.2.2"]}}));
        let merged = apply_generic(PatchType::Merge, &svc, &json!({"spec": {"selector": {"b": "c"}}})).unwrap();
        assert_eq!(merged["spec"]["selector"], json!({"app": "a", "b": "c"}));
        let jp = json!([{"op": "replace", "path": "/spec/externalIPs/0", "value": "3.3.3.3"}]);
        assert_eq!(apply_generic(PatchType::Json, &svc, &jp).unwrap()["spec"]["externalIPs"][0], "3.3.3.3");
    }
}
