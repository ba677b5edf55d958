//! Object metadata as kube-apiserver manages it: names and generateName, uid,
//! creationTimestamp, generation, resourceVersion, and what an update may not change.
//!
//! Objects are JSON values throughout: the server keeps every field a client sent, including
//! those this version does not know.

use serde_json::{Map, Value, json};

use crate::resources::Resource;
use crate::status::{ApiError, FieldError};

/// The clock and randomness object creation needs, so tests can fix them.
pub trait Minter: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64;
    /// `len` characters from Kubernetes' generateName alphabet.
    fn suffix(&self, len: usize) -> String;
    fn uid(&self) -> String;
}

/// The real clock and the thread's random generator.
pub struct SystemMinter;

/// generateName's alphabet: no vowels, no look-alikes.
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

impl Minter for SystemMinter {
    fn now(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
    }

    fn suffix(&self, len: usize) -> String {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
    }

    fn uid(&self) -> String {
        let b: [u8; 16] = rand::random();
        let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
        // Version 4, variant 1.
        let v = format!("4{}", &h(6..8)[1..]);
        let var = format!("{:x}{}", 8 | (b[8] >> 4 & 3), &h(8..10)[1..]);
        format!("{}-{}-{v}-{var}-{}", h(0..4), h(4..6), h(10..16))
    }
}

/// RFC 3339 in UTC with seconds, as Kubernetes writes timestamps.
pub fn rfc3339(secs: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Kubernetes' MicroTime (RFC 3339 in UTC with microseconds), as Leases and Events carry.
pub fn micro_time(since_epoch: std::time::Duration) -> String {
    let secs = rfc3339(since_epoch.as_secs() as i64);
    format!("{}.{:06}Z", secs.trim_end_matches('Z'), since_epoch.subsec_micros())
}

/// Seconds since the epoch of an RFC 3339 timestamp.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp())
}

/// The string at a JSON pointer; empty when absent or not a string.
pub fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.at(pointer).and_then(Value::as_str).unwrap_or_default()
}

/// `Value::pointer` without its cost: serde_json unescapes every segment into a new String;
/// controllers look up fields of every object on every pass, so segments with nothing to
/// unescape are looked up as they are.
pub trait JsonAt {
    /// The value at a JSON pointer (RFC 6901), as `Value::pointer` finds it.
    fn at(&self, pointer: &str) -> Option<&Value>;
}

impl JsonAt for Value {
    fn at(&self, pointer: &str) -> Option<&Value> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        if rest.contains('~') {
            return self.pointer(pointer);
        }
        rest.split('/').try_fold(self, |v, segment| match v {
            Value::Object(m) => m.get(segment),
            Value::Array(a) => array_index(segment).and_then(|i| a.get(i)),
            _ => None,
        })
    }
}

/// An array index as RFC 6901 writes it: digits, no sign, no leading zero.
fn array_index(segment: &str) -> Option<usize> {
    let digits = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
    if !digits || (segment.len() > 1 && segment.starts_with('0')) {
        return None;
    }
    segment.parse().ok()
}

/// An object of strings (labels, annotations, a nodeSelector) as a sorted map; entries that
/// are not strings are left out.
pub fn string_map(v: Option<&Value>) -> std::collections::BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

/// The strings of a JSON array (others skipped); empty when it is not an array.
pub fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).map(String::from).collect()
}

pub fn name(obj: &Value) -> &str {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

pub fn namespace(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/namespace").and_then(Value::as_str)
}

pub fn uid(obj: &Value) -> &str {
    obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default()
}

/// The object's metadata map, created if missing.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata is an object")
}

/// Stamps the revision an object was read at (it is never stored).
pub fn set_resource_version(obj: &mut Value, rev: i64) {
    metadata_mut(obj).insert("resourceVersion".into(), Value::String(rev.to_string()));
}

/// The resourceVersion a client sent, if any: 0 when absent or empty.
pub fn resource_version(obj: &Value) -> Result<i64, ApiError> {
    match obj.pointer("/metadata/resourceVersion") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) if s.is_empty() => Ok(0),
        Some(Value::String(s)) => parse_resource_version(s),
        Some(other) => Err(ApiError::BadRequest(format!("metadata.resourceVersion must be a string, not {other}"))),
    }
}

pub fn parse_resource_version(s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::BadRequest(format!("invalid resource version: {s:?}")))
}

/// Checks that a body names the kind and version of the endpoint it was sent to.
pub fn check_type(r: &Resource, obj: &Value) -> Result<(), ApiError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    if !kind.is_empty() && kind != r.kind {
        return Err(ApiError::BadRequest(format!(
            "the kind of the provided object ({kind}) does not match the expected kind ({})",
            r.kind
        )));
    }
    if !api_version.is_empty() && api_version != r.api_version() {
        return Err(ApiError::BadRequest(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            r.api_version()
        )));
    }
    if !obj.is_object() {
        return Err(ApiError::BadRequest("the body must be a JSON object".into()));
    }
    Ok(())
}

/// Sets the kind and apiVersion, which clients may leave out of request bodies.
pub fn set_type(r: &Resource, obj: &mut Value) {
    obj["kind"] = json!(r.kind);
    obj["apiVersion"] = json!(r.api_version());
}

/// Makes a new object ready to store: its namespace matches the request's, its name is
/// chosen (generateName), and uid, creationTimestamp and generation are set. Fields only the
/// server writes are cleared.
pub fn prepare_create(r: &Resource, obj: &mut Value, ns: Option<&str>, mint: &dyn Minter) -> Result<(), ApiError> {
    check_type(r, obj)?;
    set_type(r, obj);
    let meta = metadata_mut(obj);
    if r.namespaced {
        let ns = ns.unwrap_or("default");
        match meta.get("namespace").and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            _ => {
                meta.insert("namespace".into(), json!(ns));
            }
        }
    } else {
        meta.remove("namespace");
    }
    let has_name = meta.get("name").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
    if !has_name {
        match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => {
                let prefix = &prefix[..prefix.len().min(58)];
                let name = format!("{prefix}{}", mint.suffix(5));
                meta.insert("name".into(), json!(name));
            }
            _ => {
                return Err(ApiError::invalid(
                    r,
                    "",
                    vec![FieldError::required("metadata.name", "name or generateName is required")],
                ));
            }
        }
    }
    meta.insert("uid".into(), json!(mint.uid()));
    meta.insert("creationTimestamp".into(), json!(rfc3339(mint.now())));
    meta.remove("resourceVersion");
    meta.remove("deletionTimestamp");
    meta.remove("deletionGracePeriodSeconds");
    meta.remove("selfLink");
    if obj.get("spec").is_some() {
        metadata_mut(obj).insert("generation".into(), json!(1));
    } else {
        metadata_mut(obj).remove("generation");
    }
    // Status is the controllers' and agents' to write, except a Node's, which its agent
    // registers with.
    if r.has_status
        && r.plural != "nodes"
        && let Some(map) = obj.as_object_mut()
    {
        map.remove("status");
    }
    let name = name(obj).to_string();
    validate_name(r, &name)?;
    Ok(())
}

/// Carries over what an update may not change (uid, creationTimestamp, deletion state, and the
/// status when the status subresource owns it), and bumps generation when the spec changed.
pub fn prepare_update(r: &Resource, old: &Value, new: &mut Value) -> Result<(), ApiError> {
    check_type(r, new)?;
    set_type(r, new);
    let old_meta = old.get("metadata").and_then(Value::as_object).cloned().unwrap_or_default();
    let meta = metadata_mut(new);
    for key in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace"] {
        match old_meta.get(key) {
            Some(v) => meta.insert(key.into(), v.clone()),
            None => meta.remove(key),
        };
    }
    meta.remove("resourceVersion");
    let generation = old_meta.get("generation").and_then(Value::as_i64);
    if r.has_status {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                new.as_object_mut().map(|m| m.remove("status"));
            }
        }
    }
    if let Some(g) = generation {
        let changed = old.get("spec") != new.get("spec");
        metadata_mut(new).insert("generation".into(), json!(if changed { g + 1 } else { g }));
    }
    Ok(())
}

/// For a write to the status subresource: everything but the status comes from the stored
/// object.
pub fn prepare_status_update(r: &Resource, old: &Value, new: &Value) -> Result<Value, ApiError> {
    check_type(r, new)?;
    let mut merged = old.clone();
    match new.get("status") {
        Some(status) => merged["status"] = status.clone(),
        None => {
            merged.as_object_mut().map(|m| m.remove("status"));
        }
    }
    metadata_mut(&mut merged).remove("resourceVersion");
    Ok(merged)
}

const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
     '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for \
     validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
     and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for \
     validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

pub fn is_dns1123_label(s: &str) -> bool {
    is_label(s)
}

/// Namespaces and services need RFC 1123 labels (they become DNS names); everything else a
/// subdomain.
pub fn validate_name(r: &Resource, name: &str) -> Result<(), ApiError> {
    let label = matches!(r.plural, "namespaces" | "services");
    let ok = if label { is_dns1123_label(name) } else { is_dns1123_subdomain(name) };
    if ok {
        return Ok(());
    }
    let detail = if label && name.len() > 63 {
        "must be no more than 63 characters"
    } else if !label && name.len() > 253 {
        "must be no more than 253 characters"
    } else if label {
        DNS1123_LABEL
    } else {
        DNS1123_SUBDOMAIN
    };
    Err(ApiError::invalid(r, name, vec![FieldError::invalid("metadata.name", &json!(name), detail)]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::resources;

    #[test]
    fn at_finds_what_pointer_finds() {
        let v = json!({"a": {"b/c": 1, "m~n": 2, "list": [10, 20], "": 3, "01": 4}});
        for p in [
            "",
            "/a",
            "/a/b~1c",
            "/a/m~0n",
            "/a/list/1",
            "/a/list/01",
            "/a/list/+1",
            "/a/list/9",
            "/a/",
            "/a/01",
            "/a/missing/x",
            "a",
            "/a/list/1/x",
        ] {
            assert_eq!(v.at(p), v.pointer(p), "{p}");
        }
    }

    pub struct FixedMinter;

    impl Minter for FixedMinter {
        fn now(&self) -> i64 {
            1_700_000_000
        }
        fn suffix(&self, len: usize) -> String {
            "x".repeat(len)
        }
        fn uid(&self) -> String {
            "00000000-0000-4000-8000-000000000001".into()
        }
    }

    #[test]
    fn create_names_stamps_and_clears_server_fields() {
        let pods = resources::find("", "pods").unwrap();
        let mut pod = json!({"metadata": {"generateName": "web-", "resourceVersion": "9"}, "spec": {},
                             "status": {"phase": "Running"}});
        prepare_create(pods, &mut pod, Some("team"), &FixedMinter).unwrap();
        assert_eq!(pod["metadata"]["name"], "web-xxxxx");
        assert_eq!(pod["metadata"]["namespace"], "team");
        assert_eq!(pod["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!((pod["kind"].as_str(), pod["apiVersion"].as_str()), (Some("Pod"), Some("v1")));
        assert!(pod["metadata"].get("resourceVersion").is_none() && pod.get("status").is_none());

        let mut wrong_ns = json!({"metadata": {"name": "a", "namespace": "other"}});
        assert!(matches!(
            prepare_create(pods, &mut wrong_ns, Some("team"), &FixedMinter),
            Err(ApiError::BadRequest(_))
        ));
        let mut bad_name = json!({"metadata": {"name": "Web_1"}});
        let err = prepare_create(pods, &mut bad_name, Some("team"), &FixedMinter).unwrap_err();
        assert!(err.to_string().starts_with("Pod \"Web_1\" is invalid: metadata.name: Invalid value: \"Web_1\""));
    }

    #[test]
    fn update_keeps_identity_and_status_and_counts_spec_changes() {
        let deploy = resources::find("apps", "deployments").unwrap();
        let old = json!({"metadata": {"name": "d", "uid": "u1", "generation": 3, "creationTimestamp": "t"},
                         "spec": {"replicas": 1}, "status": {"replicas": 1}});
        let mut new = json!({"metadata": {"name": "d", "uid": "evil"}, "spec": {"replicas": 2}});
        prepare_update(deploy, &old, &mut new).unwrap();
        assert_eq!(new["metadata"]["uid"], "u1");
        assert_eq!(new["metadata"]["generation"], 4);
        assert_eq!(new["status"]["replicas"], 1);
        let uid = SystemMinter.uid();
        assert_eq!((uid.len(), &uid[14..15]), (36, "4"));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(1_700_000_000));
    }
}
