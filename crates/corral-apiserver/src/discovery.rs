//! Discovery documents: `/version`, `/api`, `/apis`, the resource lists, and the OpenAPI v3
//! index kubectl reads before it applies.

use corral_api::resources::{self, RESOURCES};
use serde_json::{Value, json};

/// The Kubernetes version Corral's API answers as.
pub const KUBE_MINOR: &str = "33";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBE_MINOR,
        "gitVersion": format!("v1.{KUBE_MINOR}.0+corral-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rustc",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
    })
}

pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_json(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

pub fn groups() -> Value {
    let groups: Vec<Value> =
        resources::groups().into_iter().filter(|(g, _)| !g.is_empty()).map(|(g, v)| group_json(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(name: &str) -> Option<Value> {
    let (g, v) = resources::groups().into_iter().find(|(g, _)| *g == name && !g.is_empty())?;
    let mut doc = group_json(g, v);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// A resource's short names and categories, left out when it has none (as kube-apiserver).
fn add_names(entry: &mut Value, r: &resources::Resource) {
    if !r.short_names.is_empty() {
        entry["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        entry["categories"] = json!(r.categories);
    }
}

/// The APIResourceList of one group-version, or None when it is not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut entries = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs(),
        });
        add_names(&mut entry, r);
        entries.push(entry);
        for s in r.subresources {
            let mut sub = json!({
                "name": format!("{}/{}", r.plural, s.name),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": s.kind,
                "verbs": s.verbs,
            });
            if let Some(g) = s.group {
                sub["group"] = json!(g);
            }
            if let Some(v) = s.version {
                sub["version"] = json!(v);
            }
            entries.push(sub);
        }
    }
    if entries.is_empty() {
        return None;
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}))
}

/// The aggregated discovery versions clients ask for, newest first, with the Content-Type
/// each is answered with (client-go compares it to decide how to read the body).
pub const AGGREGATED: [(&str, &str); 2] = [
    ("v2", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"),
    ("v2beta1", "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"),
];

/// Which aggregated discovery version (and its Content-Type) an Accept header asks for, if
/// any: the first listed that Corral serves.
pub fn aggregated_version(accept: &str) -> Option<(&'static str, &'static str)> {
    accept.split(',').find_map(|part| {
        let params: Vec<&str> = part.split(';').map(str::trim).collect();
        let has = |p: &str| params.contains(&p);
        if !(has("g=apidiscovery.k8s.io") && has("as=APIGroupDiscoveryList")) {
            return None;
        }
        AGGREGATED.iter().copied().find(|(v, _)| has(&format!("v={v}")))
    })
}

/// `/api` (`core`) or `/apis` as an APIGroupDiscoveryList: every group with its resources in
/// one document, so kubectl needs one request instead of one per group-version.
pub fn aggregated(core: bool, version: &str) -> Value {
    let items: Vec<Value> = resources::groups()
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(g, v)| {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == g && r.version == v)
                .map(|r| {
                    let subresources: Vec<Value> = r
                        .subresources
                        .iter()
                        .map(|s| {
                            json!({
                                "subresource": s.name,
                                "responseKind": {"group": s.group.unwrap_or(g), "version": s.version.unwrap_or(v),
                                                 "kind": s.kind},
                                "verbs": s.verbs,
                            })
                        })
                        .collect();
                    let mut entry = json!({
                        "resource": r.plural,
                        "responseKind": {"group": g, "version": v, "kind": r.kind},
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": r.singular,
                        "verbs": r.verbs(),
                    });
                    add_names(&mut entry, r);
                    if !subresources.is_empty() {
                        entry["subresources"] = json!(subresources);
                    }
                    entry
                })
                .collect();
            let mut metadata = json!({"creationTimestamp": null});
            if !g.is_empty() {
                metadata["name"] = json!(g);
            }
            json!({"metadata": metadata,
                   "versions": [{"version": v, "resources": resources, "freshness": "Current"}]})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

/// `/openapi/v3`: one entry per group-version.
pub fn openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in resources::groups() {
        let path = if g.is_empty() { format!("api/{v}") } else { format!("apis/{g}/{v}") };
        let hash = format!("{:016X}", fnv(path.as_bytes()) ^ fnv(env!("CARGO_PKG_VERSION").as_bytes()));
        paths.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}));
    }
    json!({"paths": paths})
}

/// One group-version's OpenAPI v3 document: every object path with its operations. PATCH
/// declares the `fieldValidation` parameter and the object's kind, which tells kubectl the
/// server validates fields itself.
pub fn openapi_v3_group(path: &str) -> Option<Value> {
    let (group, version) = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), v.to_string()),
        ["apis", g, v] => (g.to_string(), v.to_string()),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let prefix = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
        let item = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let field_validation = json!({
            "name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true},
            "description": "How the server treats unknown or duplicate fields: Ignore, Warn or Strict."
        });
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", r.kind),
                "parameters": [field_validation.clone()],
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk.clone(),
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
                    "$ref": format!("#/components/schemas/{}", corral_api::openapi::component(r.kind))
                }}}}},
            })
        };
        let mut patch = op("patch");
        patch["requestBody"] = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
        }});
        let ops = if r.stored() {
            json!({"get": op("get"), "put": op("put"), "patch": patch, "delete": op("delete")})
        } else {
            json!({"get": op("get")})
        };
        paths.insert(item, ops);
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Corral", "version": format!("v1.{KUBE_MINOR}.0")},
        "paths": paths,
        "components": {"schemas": SCHEMAS.clone()},
    }))
}

/// The served types' schemas, built once.
static SCHEMAS: std::sync::LazyLock<Value> = std::sync::LazyLock::new(corral_api::openapi::components);

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_lists_carry_subresources_with_their_own_kinds() {
        let core = resource_list("", "v1").unwrap();
        let eviction = core["resources"].as_array().unwrap().iter().find(|r| r["name"] == "pods/eviction").unwrap();
        assert_eq!((eviction["group"].as_str(), eviction["kind"].as_str()), (Some("policy"), Some("Eviction")));
        let apps = resource_list("apps", "v1").unwrap();
        assert_eq!(apps["groupVersion"], "apps/v1");
        assert!(apps["resources"].as_array().unwrap().iter().any(|r| r["name"] == "deployments/scale"));
        assert!(resource_list("apps", "v2").is_none());
        assert!(groups()["groups"].as_array().unwrap().iter().any(|g| g["name"] == "apps"));
        assert!(openapi_v3_index()["paths"]["apis/apps/v1"]["serverRelativeURL"].as_str().unwrap().contains("hash="));
    }

    #[test]
    fn aggregated_discovery_answers_the_first_version_asked_for_in_one_document() {
        let v2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,\
                  application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(v2).map(|(v, _)| v), Some("v2"));
        let beta = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(beta), Some(AGGREGATED[1]));
        assert_eq!(aggregated_version("application/json, */*"), None);

        let core = aggregated(true, "v2");
        assert_eq!(core["items"].as_array().map(Vec::len), Some(1), "/api holds the core group only");
        assert!(core["items"][0]["metadata"].get("name").is_none());
        let pods = &core["items"][0]["versions"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == "pods")
            .unwrap();
        assert_eq!(pods["scope"], "Namespaced");
        let eviction =
            pods["subresources"].as_array().unwrap().iter().find(|s| s["subresource"] == "eviction").unwrap();
        assert_eq!(eviction["responseKind"], json!({"group": "policy", "version": "v1", "kind": "Eviction"}));
        let apis = aggregated(false, "v2beta1");
        assert_eq!(apis["apiVersion"], "apidiscovery.k8s.io/v2beta1");
        assert!(apis["items"].as_array().unwrap().iter().any(|g| g["metadata"]["name"] == "apps"));
    }
}
