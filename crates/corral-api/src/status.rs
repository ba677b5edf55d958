//! API errors as Kubernetes reports them: a `metav1.Status` with an HTTP code, a reason and a
//! message in kube-apiserver's words, so that kubectl prints what users know
//! (`Error from server (NotFound): pods "x" not found`).

use serde_json::{Value, json};

use crate::resources::Resource;

/// One invalid field of an object (a `StatusCause` of a 422 Invalid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, `FieldValueDuplicate`,
    /// `FieldValueForbidden`, `FieldValueTooLong`.
    pub reason: &'static str,
    /// The JSON path of the field: `spec.containers[0].image`.
    pub field: String,
    /// What kube-apiserver says: `Required value`, `Invalid value: "X": detail`.
    pub message: String,
}

impl FieldError {
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let message =
            if detail.is_empty() { "Required value".to_string() } else { format!("Required value: {detail}") };
        FieldError { reason: "FieldValueRequired", field: field.into(), message }
    }

    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        FieldError {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {shown}: {detail}"),
        }
    }

    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        FieldError {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!("Unsupported value: {value}: supported values: {}", list.join(", ")),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        FieldError { reason: "FieldValueForbidden", field: field.into(), message: format!("Forbidden: {detail}") }
    }

    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        FieldError { reason: "FieldValueDuplicate", field: field.into(), message: format!("Duplicate value: {value}") }
    }

    /// `spec.containers[0].image: Required value`, as the Invalid message lists it.
    pub fn summary(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

/// Every error the API answers with. `Display` is the Status message.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ApiError {
    #[error("{} \"{name}\" not found", resource_ref(.group, .plural))]
    NotFound { group: String, plural: String, name: String },
    #[error("{} \"{name}\" already exists", resource_ref(.group, .plural))]
    AlreadyExists { group: String, plural: String, name: String },
    #[error(
        "Operation cannot be fulfilled on {} \"{name}\": {detail}",
        resource_ref(.group, .plural)
    )]
    Conflict { group: String, plural: String, name: String, detail: String },
    #[error("{kind} \"{name}\" is invalid: {}", summarize(.causes))]
    Invalid { group: String, kind: String, name: String, causes: Vec<FieldError> },
    #[error("{0}")]
    BadRequest(String),
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{0}")]
    Forbidden(String),
    /// Server-side apply would take fields other managers own, with other values.
    #[error("{message}")]
    ApplyConflict { message: String, fields: Vec<String> },
    #[error("Unauthorized")]
    Unauthorized,
    #[error("the body of the request was in an unknown format - accepted media types include: {0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// A watch or list from a revision compaction removed.
    #[error("too old resource version: {requested} ({oldest})")]
    Gone { requested: i64, oldest: i64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    #[error("Internal error occurred: {0}")]
    Internal(String),
}

fn resource_ref(group: &str, plural: &str) -> String {
    if group.is_empty() { plural.to_string() } else { format!("{plural}.{group}") }
}

fn summarize(causes: &[FieldError]) -> String {
    match causes {
        [one] => one.summary(),
        many => format!("[{}]", many.iter().map(FieldError::summary).collect::<Vec<_>>().join(", ")),
    }
}

impl ApiError {
    pub fn not_found(r: &Resource, name: &str) -> Self {
        ApiError::NotFound { group: r.group.into(), plural: r.plural.into(), name: name.into() }
    }

    pub fn already_exists(r: &Resource, name: &str) -> Self {
        ApiError::AlreadyExists { group: r.group.into(), plural: r.plural.into(), name: name.into() }
    }

    /// The answer to an update whose resourceVersion is not the stored one.
    pub fn modified(r: &Resource, name: &str) -> Self {
        ApiError::Conflict {
            group: r.group.into(),
            plural: r.plural.into(),
            name: name.into(),
            detail: "the object has been modified; please apply your changes to the latest version and try again"
                .into(),
        }
    }

    pub fn invalid(r: &Resource, name: &str, causes: Vec<FieldError>) -> Self {
        ApiError::Invalid { group: r.group.into(), kind: r.kind.into(), name: name.into(), causes }
    }

    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } | ApiError::ApplyConflict { .. } => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::MethodNotAllowed => 405,
            ApiError::Forbidden(_) => 403,
            ApiError::Unauthorized => 401,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::TooLarge(_) => 413,
            ApiError::TooManyRequests(_) => 429,
            ApiError::Gone { .. } => 410,
            ApiError::Unavailable(_) => 503,
            ApiError::Timeout(_) => 504,
            ApiError::Internal(_) => 500,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } | ApiError::ApplyConflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::TooLarge(_) => "RequestEntityTooLarge",
            ApiError::TooManyRequests(_) => "TooManyRequests",
            ApiError::Gone { .. } => "Expired",
            ApiError::Unavailable(_) => "ServiceUnavailable",
            ApiError::Timeout(_) => "Timeout",
            ApiError::Internal(_) => "InternalError",
        }
    }

    /// The `metav1.Status` body.
    pub fn to_status(&self) -> Value {
        let details = match self {
            ApiError::NotFound { group, plural, name }
            | ApiError::AlreadyExists { group, plural, name }
            | ApiError::Conflict { group, plural, name, .. } => Some(details(name, group, plural, None)),
            ApiError::Invalid { group, kind, name, causes } => Some(details(name, group, kind, Some(causes))),
            ApiError::Internal(msg) => Some(json!({ "causes": [{ "message": msg }] })),
            ApiError::ApplyConflict { fields, .. } => Some(json!({
                "causes": fields.iter().map(|f| json!({ "reason": "FieldManagerConflict", "field": f })).collect::<Vec<_>>()
            })),
            _ => None,
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        if let Some(d) = details {
            status["details"] = d;
        }
        status
    }
}

fn details(name: &str, group: &str, kind: &str, causes: Option<&[FieldError]>) -> Value {
    let mut d = json!({ "name": name, "kind": kind });
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    if let Some(causes) = causes {
        d["causes"] =
            causes.iter().map(|c| json!({ "reason": c.reason, "message": c.message, "field": c.field })).collect();
    }
    d
}

/// The body of a successful DELETE that removed the object at once, for resources that do
/// not return the object.
pub fn success_status(r: &Resource, name: &str, uid: &str) -> Value {
    let mut d = json!({ "name": name, "kind": r.plural, "uid": uid });
    if !r.group.is_empty() {
        d["group"] = json!(r.group);
    }
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources;

    #[test]
    fn messages_read_as_kube_apiserver_writes_them() {
        let deploy = resources::find("apps", "deployments").unwrap();
        assert_eq!(ApiError::not_found(deploy, "web").to_string(), r#"deployments.apps "web" not found"#);
        let pods = resources::find("", "pods").unwrap();
        assert_eq!(ApiError::already_exists(pods, "p").to_string(), r#"pods "p" already exists"#);
        assert_eq!(
            ApiError::modified(deploy, "web").to_string(),
            "Operation cannot be fulfilled on deployments.apps \"web\": the object has been modified; \
             please apply your changes to the latest version and try again"
        );
        let invalid = ApiError::invalid(pods, "p", vec![FieldError::required("spec.containers", "")]);
        assert_eq!(invalid.to_string(), r#"Pod "p" is invalid: spec.containers: Required value"#);
        let status = invalid.to_status();
        assert_eq!((status["code"].as_u64(), status["reason"].as_str()), (Some(422), Some("Invalid")));
        assert_eq!(status["details"]["causes"][0]["field"], "spec.containers");
    }
}
