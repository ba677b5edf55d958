//! URL paths to what they name: discovery documents, or a resource, namespace, object and
//! subresource.

use corral_api::resources::{self, Resource};

/// What a request path names.
#[derive(Debug, PartialEq)]
pub enum Route {
    Version,
    Health(&'static str),
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/{group}`
    Group(String),
    /// `/api/v1`, `/apis/{group}/{version}`: the resource list.
    Resources {
        group: String,
        version: String,
    },
    OpenApiV2,
    /// `/openapi/v3` (None) or one group-version document (`api/v1`, `apis/apps/v1`).
    OpenApiV3(Option<String>),
    Object(ObjectRoute),
    NotFound,
}

/// A resource path: `.../namespaces/{ns}/{plural}/{name}/{sub}` with the optional parts.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectRoute {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

/// The route of a served resource (`pods`, `apps/deployments`), for in-process callers.
/// Panics on a resource that is not served: callers name them in code.
pub fn object_route(plural: &str, namespace: Option<&str>, sub: Option<&str>) -> ObjectRoute {
    let (group, plural) = plural.split_once('/').unwrap_or(("", plural));
    ObjectRoute {
        resource: corral_api::resources::find(group, plural).expect("a served resource"),
        namespace: namespace.map(str::to_string),
        name: None,
        sub: sub.map(str::to_string),
    }
}

pub fn parse(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Route::Version,
        ["healthz"] => Route::Health("healthz"),
        ["livez"] => Route::Health("livez"),
        ["readyz"] => Route::Health("readyz"),
        ["healthz" | "livez" | "readyz", _check] => Route::Health("check"),
        ["api"] => Route::CoreVersions,
        ["apis"] => Route::Groups,
        ["openapi", "v2"] => Route::OpenApiV2,
        ["openapi", "v3"] => Route::OpenApiV3(None),
        ["openapi", "v3", rest @ ..] => Route::OpenApiV3(Some(rest.join("/"))),
        ["api", "v1"] => Route::Resources { group: String::new(), version: "v1".into() },
        ["apis", group] => Route::Group(group.to_string()),
        ["apis", group, version] => Route::Resources { group: group.to_string(), version: version.to_string() },
        ["api", "v1", rest @ ..] => object(rest, "", "v1"),
        ["apis", group, version, rest @ ..] => object(rest, group, version),
        _ => Route::NotFound,
    }
}

fn object(rest: &[&str], group: &str, version: &str) -> Route {
    let find = |plural: &str| resources::find_versioned(group, version, plural);
    let route = |resource, namespace: Option<&str>, name: Option<&&str>, sub: Option<&&str>| {
        Route::Object(ObjectRoute {
            resource,
            namespace: namespace.map(str::to_string),
            name: name.map(|s| s.to_string()),
            sub: sub.map(|s| s.to_string()),
        })
    };
    // `namespaces/{ns}/{plural}...` names a namespaced resource, unless the third segment
    // is a subresource of the namespace itself (`namespaces/{ns}/status`).
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(r) = find(plural).filter(|r| r.namespaced)
        && tail.len() <= 2
    {
        return route(r, Some(ns), tail.first(), tail.get(1));
    }
    match rest {
        [plural, tail @ ..] if tail.len() <= 2 => match find(plural) {
            Some(r) => route(r, None, tail.first(), tail.get(1)),
            None => Route::NotFound,
        },
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object_of(path: &str) -> (String, Option<String>, Option<String>, Option<String>) {
        match parse(path) {
            Route::Object(o) => (o.resource.plural.to_string(), o.namespace, o.name, o.sub),
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn paths_name_resources_namespaces_objects_and_subresources() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(object_of("/api/v1/namespaces/default/pods"), ("pods".into(), s("default"), None, None));
        assert_eq!(object_of("/api/v1/namespaces/d/pods/p/log"), ("pods".into(), s("d"), s("p"), s("log")));
        assert_eq!(object_of("/api/v1/pods"), ("pods".into(), None, None, None));
        assert_eq!(object_of("/api/v1/namespaces/kube-system"), ("namespaces".into(), None, s("kube-system"), None));
        assert_eq!(object_of("/api/v1/namespaces/x/status"), ("namespaces".into(), None, s("x"), s("status")));
        assert_eq!(object_of("/api/v1/nodes/n1/status"), ("nodes".into(), None, s("n1"), s("status")));
        assert_eq!(
            object_of("/apis/apps/v1/namespaces/d/deployments/web/scale"),
            ("deployments".into(), s("d"), s("web"), s("scale"))
        );
        assert_eq!(parse("/apis/apps/v2/deployments"), Route::NotFound);
        assert_eq!(parse("/apis/apps/v1"), Route::Resources { group: "apps".into(), version: "v1".into() });
        assert_eq!(parse("/openapi/v3/apis/apps/v1"), Route::OpenApiV3(Some("apis/apps/v1".into())));
    }
}
