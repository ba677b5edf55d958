//! Label selectors (`app=web,tier in (a,b),!canary`) and field selectors
//! (`metadata.name=x,spec.nodeName!=`), parsed once and matched against JSON objects.

use serde_json::Value;

use crate::resources::Resource;
use crate::status::ApiError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::BadRequest(format!("unable to parse requirement: {why}: {text:?}"));
        let mut reqs = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelReq::NotExists(check_key(key.trim()).map_err(|e| bad(&e))?)
            } else if let Some((key, rest)) = split_word(part, " notin ") {
                LabelReq::NotIn(check_key(key).map_err(|e| bad(&e))?, parse_set(rest).ok_or_else(|| bad("bad set"))?)
            } else if let Some((key, rest)) = split_word(part, " in ") {
                LabelReq::In(check_key(key).map_err(|e| bad(&e))?, parse_set(rest).ok_or_else(|| bad("bad set"))?)
            } else if let Some((key, value)) = part.split_once("!=") {
                LabelReq::NotEq(check_key(key.trim()).map_err(|e| bad(&e))?, value.trim().to_string())
            } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
                LabelReq::Eq(check_key(key.trim()).map_err(|e| bad(&e))?, value.trim().to_string())
            } else {
                LabelReq::Exists(check_key(part).map_err(|e| bad(&e))?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// The selector of a `matchLabels`/`matchExpressions` object (a Deployment's selector).
    pub fn from_json(selector: &Value) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in labels {
                reqs.push(LabelReq::Eq(k.clone(), v.as_str().unwrap_or_default().to_string()));
            }
        }
        for expr in selector.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
            let key = expr.get("key").and_then(Value::as_str).unwrap_or_default().to_string();
            let values: Vec<String> = expr
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            reqs.push(match expr.get("operator").and_then(Value::as_str) {
                Some("In") => LabelReq::In(key, values),
                Some("NotIn") => LabelReq::NotIn(key, values),
                Some("Exists") => LabelReq::Exists(key),
                Some("DoesNotExist") => LabelReq::NotExists(key),
                other => return Err(format!("{other:?} is not a valid label selector operator")),
            });
        }
        Ok(LabelSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        self.matches_with(|k| labels.and_then(|l| l.get(k)).and_then(Value::as_str))
    }

    /// Whether labels already read into a map satisfy every requirement.
    pub fn matches_labels(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.matches_with(|k| labels.get(k).map(String::as_str))
    }

    fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn split_word<'a>(part: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let at = part.find(word)?;
    Some((part[..at].trim(), part[at + word.len()..].trim()))
}

fn parse_set(rest: &str) -> Option<Vec<String>> {
    let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

fn check_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.len() <= 317
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok { Ok(key.to_string()) } else { Err(format!("invalid label key {key:?}")) }
}

/// A parsed field selector, checked against the fields the resource supports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str, resource: &Resource) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::BadRequest(format!("invalid selector: '{part}'; can't understand '{part}'")));
            };
            let field = field.trim();
            if !supported_fields(resource).contains(&field) {
                return Err(ApiError::BadRequest(format!("field label not supported: {field}")));
            }
            reqs.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The object name the selector pins, if it says `metadata.name=X`.
    pub fn name(&self) -> Option<&str> {
        self.0.iter().find(|(f, eq, _)| f == "metadata.name" && *eq).map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, want)| {
            let got = field_value(obj, field);
            (got == *want) == *equal
        })
    }
}

/// The fields a resource can be selected by, as kube-apiserver allows them.
fn supported_fields(r: &Resource) -> Vec<&'static str> {
    let mut fields = vec!["metadata.name", "metadata.namespace"];
    fields.extend_from_slice(match (r.group, r.plural) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ][..],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("", "secrets") => &["type"],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "namespaces") => &["status.phase"],
        ("", "persistentvolumeclaims") => &["spec.volumeName"],
        ("apps", "replicasets") => &["status.replicas"],
        _ => &[],
    });
    fields
}

/// A field's value as a selector compares it: strings as they are, booleans and numbers as
/// text, missing fields as "" (and `source` of an event as its component).
fn field_value(obj: &Value, field: &str) -> String {
    let path = match field {
        "source" => "/source/component".to_string(),
        f => format!("/{}", f.replace('.', "/")),
    };
    match obj.pointer(&path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ if field == "spec.unschedulable" || field == "spec.hostNetwork" => "false".into(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resources;

    #[test]
    fn label_selectors_match_as_kubernetes_does() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("tier in (front, back)", true),
            ("tier notin (front)", false),
            ("missing notin (x)", true),
            ("app", true),
            ("!app", false),
            ("!canary,app in (web)", true),
        ] {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches(&obj), want, "{sel}");
        }
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_selectors_know_each_resource_fields() {
        let pods = resources::find("", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"},
                         "status": {"phase": "Running"}});
        assert!(FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed", pods).unwrap().matches(&pod));
        assert!(!FieldSelector::parse("spec.nodeName=", pods).unwrap().matches(&pod));
        assert_eq!(FieldSelector::parse("metadata.name=p", pods).unwrap().name(), Some("p"));
        let cms = resources::find("", "configmaps").unwrap();
        let err = FieldSelector::parse("spec.nodeName=x", cms).unwrap_err();
        assert_eq!(err.to_string(), "field label not supported: spec.nodeName");
    }
}
