//! Validation of the types served, with Kubernetes' field paths and messages (422 Invalid).

use corral_api::selector::LabelSelector;
use corral_api::{ApiError, FieldError, Resource, meta};
use serde_json::{Value, json};

pub fn object(r: &Resource, obj: &Value) -> Result<(), ApiError> {
    let mut errs = Vec::new();
    for (field, pointer) in [("metadata.labels", "/metadata/labels"), ("metadata.annotations", "/metadata/annotations")]
    {
        if let Some(map) = obj.pointer(pointer) {
            match map.as_object() {
                Some(m) => {
                    for (k, v) in m {
                        if !v.is_string() {
                            errs.push(FieldError::invalid(format!("{field}.{k}"), v, "must be a string"));
                        }
                    }
                }
                None => errs.push(FieldError::invalid(field, map, "must be a map of strings")),
            }
        }
    }
    match (r.group, r.plural) {
        ("", "pods") => pod_spec(obj.get("spec"), "spec", &mut errs),
        ("apps", "deployments" | "replicasets") => {
            match obj.pointer("/spec/selector") {
                None => errs.push(FieldError::required("spec.selector", "")),
                Some(sel) => match LabelSelector::from_json(sel) {
                    Err(e) => errs.push(FieldError::invalid("spec.selector", sel, &e)),
                    Ok(selector) => {
                        let template = obj.pointer("/spec/template").cloned().unwrap_or(json!({}));
                        if selector.is_empty() {
                            errs.push(FieldError::invalid(
                                "spec.selector",
                                sel,
                                "empty selector is invalid for deployment",
                            ));
                        } else if !selector.matches(&template) {
                            let labels = template.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
                            errs.push(FieldError::invalid(
                                "spec.template.metadata.labels",
                                &labels,
                                "`selector` does not match template `labels`",
                            ));
                        }
                    }
                },
            }
            if let Some(n) = obj.pointer("/spec/replicas")
                && n.as_i64().is_none_or(|n| n < 0)
            {
                errs.push(FieldError::invalid("spec.replicas", n, "must be greater than or equal to 0"));
            }
            pod_spec(obj.pointer("/spec/template/spec"), "spec.template.spec", &mut errs);
        }
        ("", "services") => {
            for (i, port) in obj.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
                match port.get("port").and_then(Value::as_i64) {
                    Some(1..=65535) => {}
                    _ => errs.push(FieldError::invalid(
                        format!("spec.ports[{i}].port"),
                        port.get("port").unwrap_or(&Value::Null),
                        "must be between 1 and 65535, inclusive",
                    )),
                }
            }
        }
        _ => {}
    }
    if errs.is_empty() { Ok(()) } else { Err(ApiError::invalid(r, meta::name(obj), errs)) }
}

fn pod_spec(spec: Option<&Value>, path: &str, errs: &mut Vec<FieldError>) {
    let containers = spec.and_then(|s| s.get("containers")).and_then(Value::as_array);
    match containers {
        None => errs.push(FieldError::required(format!("{path}.containers"), "")),
        Some(list) if list.is_empty() => errs.push(FieldError::required(format!("{path}.containers"), "")),
        Some(list) => {
            let mut names = Vec::new();
            for (i, c) in list.iter().enumerate() {
                let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
                if name.is_empty() {
                    errs.push(FieldError::required(format!("{path}.containers[{i}].name"), ""));
                } else if !meta::is_dns1123_label(name) {
                    errs.push(FieldError::invalid(
                        format!("{path}.containers[{i}].name"),
                        &json!(name),
                        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                    ));
                } else if names.contains(&name) {
                    errs.push(FieldError::duplicate(format!("{path}.containers[{i}].name"), &json!(name)));
                }
                names.push(name);
                if c.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
                    errs.push(FieldError::required(format!("{path}.containers[{i}].image"), ""));
                }
            }
        }
    }
    if let Some(policy) = spec.and_then(|s| s.get("restartPolicy"))
        && !matches!(policy.as_str(), Some("Always" | "OnFailure" | "Never"))
    {
        errs.push(FieldError::not_supported(
            format!("{path}.restartPolicy"),
            policy,
            &["Always", "OnFailure", "Never"],
        ));
    }
}

const POD_UPDATE_FORBIDDEN: &str = "pod updates may not change fields other than `spec.containers[*].image`,\
`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing \
tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

/// What an update (PUT, PATCH, apply) may change of a pod's spec, as Kubernetes allows:
/// container images, the active deadline and added tolerations. The rest is fixed at
/// creation; the node most of all, which only a binding sets (agents rely on it: a pod
/// never moves from one node to another).
pub fn pod_update(r: &Resource, old: &Value, new: &Value) -> Result<(), ApiError> {
    let (Some(was), Some(is)) = (old.get("spec"), new.get("spec")) else {
        return Err(ApiError::invalid(r, meta::name(new), vec![FieldError::forbidden("spec", POD_UPDATE_FORBIDDEN)]));
    };
    let mut errs = Vec::new();
    let tolerations = |s: &Value| s.get("tolerations").and_then(Value::as_array).cloned().unwrap_or_default();
    let (kept, now) = (tolerations(was), tolerations(is));
    if !kept.iter().all(|t| now.contains(t)) {
        errs.push(FieldError::forbidden(
            "spec.tolerations",
            "existing toleration can not be modified except its tolerationSeconds",
        ));
    }
    // The spec with what may change carried over from the stored one must be the stored one.
    let mut fixed = is.clone();
    if let Some(m) = fixed.as_object_mut() {
        for field in ["activeDeadlineSeconds", "tolerations"] {
            match was.get(field) {
                Some(v) => m.insert(field.into(), v.clone()),
                None => m.remove(field),
            };
        }
        for list in ["containers", "initContainers"] {
            let images = was.get(list).and_then(Value::as_array);
            if let (Some(images), Some(Value::Array(cs))) = (images, m.get_mut(list))
                && images.len() == cs.len()
            {
                for (c, old) in cs.iter_mut().zip(images) {
                    c["image"] = old.get("image").cloned().unwrap_or(Value::Null);
                }
            }
        }
    }
    if &fixed != was {
        errs.push(FieldError::forbidden("spec", POD_UPDATE_FORBIDDEN));
    }
    if errs.is_empty() { Ok(()) } else { Err(ApiError::invalid(r, meta::name(new), errs)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str, image: &str) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {"nodeName": node, "containers": [{"name": "c", "image": image}],
               "tolerations": [{"key": "a", "operator": "Exists"}]}})
    }

    #[test]
    fn a_pod_update_may_change_images_and_add_tolerations_but_never_move_the_pod() {
        let r = corral_api::resources::find("", "pods").expect("pods");
        let stored = pod("n1", "nginx:1");

        // Images and added tolerations may change.
        let mut newer = pod("n1", "nginx:2");
        newer["spec"]["tolerations"].as_array_mut().unwrap().push(json!({"key": "b", "operator": "Exists"}));
        newer["spec"]["activeDeadlineSeconds"] = json!(30);
        pod_update(r, &stored, &newer).expect("images, deadline and tolerations");

        // The node may not, nor may a toleration go away.
        let err = pod_update(r, &stored, &pod("n2", "nginx:1")).unwrap_err().to_string();
        assert!(err.contains("spec: Forbidden: pod updates may not change fields other than"), "{err}");
        let mut fewer = pod("n1", "nginx:1");
        fewer["spec"]["tolerations"] = json!([]);
        let err = pod_update(r, &stored, &fewer).unwrap_err().to_string();
        assert!(err.contains("spec.tolerations: Forbidden"), "{err}");
    }
}
