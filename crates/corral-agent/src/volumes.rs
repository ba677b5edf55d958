//! A pod's volumes as host directories: emptyDir and configMap/secret contents under the
//! pod's own directory, hostPath checked against its type, a persistentVolumeClaim through
//! its bound volume's hostPath.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::spec::{ConfigError, secret_data, str_at, string_map};

/// The API objects a pod's volumes refer to, by name in the pod's namespace (volumes by
/// their own name).
#[derive(Clone, Debug, Default)]
pub struct VolumeSources {
    /// The node mounting them.
    pub node: String,
    pub config_maps: HashMap<String, Value>,
    pub secrets: HashMap<String, Value>,
    pub claims: HashMap<String, Value>,
    pub volumes: HashMap<String, Value>,
}

/// The directory that holds a pod's emptyDir, configMap and secret volumes.
pub fn pod_dir(root: &Path, uid: &str) -> PathBuf {
    root.join(uid)
}

fn io(path: &Path, e: std::io::Error) -> ConfigError {
    ConfigError(format!("{}: {e}", path.display()))
}

/// Makes every volume of the pod ready on the host; returns their directories by name.
pub fn prepare(
    pod: &Value,
    pods_root: &Path,
    sources: &VolumeSources,
) -> Result<HashMap<String, PathBuf>, ConfigError> {
    let uid = str_at(pod, "/metadata/uid");
    let dir = pod_dir(pods_root, uid).join("volumes");
    let mut out = HashMap::new();
    for v in pod.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten() {
        let name = str_at(v, "/name");
        let path = if v.get("emptyDir").is_some() {
            let p = dir.join("empty-dir").join(name);
            std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).map_err(|e| io(&p, e))?;
            p
        } else if let Some(h) = v.get("hostPath") {
            host_path(str_at(h, "/path"), str_at(h, "/type"))?
        } else if let Some(c) = v.get("configMap") {
            let cm_name = str_at(c, "/name");
            let data = match sources.config_maps.get(cm_name) {
                Some(cm) => string_map(cm.get("data")).into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
                None if c.get("optional").and_then(Value::as_bool).unwrap_or(false) => Vec::new(),
                None => return Err(ConfigError(format!("configmap \"{cm_name}\" not found"))),
            };
            let p = dir.join("configmap").join(name);
            write_files(&p, data, c)?;
            p
        } else if let Some(s) = v.get("secret") {
            let secret_name = str_at(s, "/secretName");
            let data = match sources.secrets.get(secret_name) {
                Some(secret) => secret_data(secret).into_iter().collect(),
                None if s.get("optional").and_then(Value::as_bool).unwrap_or(false) => Vec::new(),
                None => return Err(ConfigError(format!("secret \"{secret_name}\" not found"))),
            };
            let p = dir.join("secret").join(name);
            write_files(&p, data, s)?;
            p
        } else if let Some(c) = v.get("persistentVolumeClaim") {
            claim_path(str_at(c, "/claimName"), sources)?
        } else {
            return Err(ConfigError(format!("volume \"{name}\" has a type this node does not support")));
        };
        out.insert(name.to_string(), path);
    }
    Ok(out)
}

/// The host path of the volume bound to a claim (a hostPath or local volume).
fn claim_path(claim: &str, sources: &VolumeSources) -> Result<PathBuf, ConfigError> {
    let pvc =
        sources.claims.get(claim).ok_or_else(|| ConfigError(format!("persistentvolumeclaim \"{claim}\" not found")))?;
    let volume = str_at(pvc, "/spec/volumeName");
    if volume.is_empty() || str_at(pvc, "/status/phase") != "Bound" {
        return Err(ConfigError(format!("persistentvolumeclaim \"{claim}\" is not bound")));
    }
    let pv =
        sources.volumes.get(volume).ok_or_else(|| ConfigError(format!("persistentvolume \"{volume}\" not found")))?;
    if let Some(nodes) = pinned_elsewhere(pv, &sources.node) {
        return Err(ConfigError(format!(
            "persistentvolume \"{volume}\" is pinned to node {nodes} (its data is there), not {}",
            sources.node
        )));
    }
    let path = match (pv.pointer("/spec/hostPath/path"), pv.pointer("/spec/local/path")) {
        (Some(Value::String(p)), _) | (None, Some(Value::String(p))) => p.clone(),
        _ => return Err(ConfigError(format!("persistentvolume \"{volume}\" is neither hostPath nor local"))),
    };
    host_path(&path, str_at(pv, "/spec/hostPath/type"))
}

/// The nodes a volume's required `kubernetes.io/hostname` affinity names, when `node` is not
/// one of them.
fn pinned_elsewhere(pv: &Value, node: &str) -> Option<String> {
    let terms = pv.pointer("/spec/nodeAffinity/required/nodeSelectorTerms")?.as_array()?;
    let mut named = Vec::new();
    for term in terms {
        for e in term.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
            if e["key"] == "kubernetes.io/hostname" && e["operator"] == "In" {
                let values: Vec<&str> =
                    e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                if values.contains(&node) {
                    return None;
                }
                named.extend(values);
            }
        }
    }
    (!named.is_empty()).then(|| named.join(", "))
}

/// A hostPath checked against its type, created for the `...OrCreate` types.
fn host_path(path: &str, kind: &str) -> Result<PathBuf, ConfigError> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(ConfigError(format!("hostPath {path:?} must be an absolute path")));
    }
    let fail = |what: &str| Err(ConfigError(format!("hostPath type check failed: {path} is not {what}")));
    match kind {
        "" => {}
        "DirectoryOrCreate" => {
            std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
        }
        "Directory" if !p.is_dir() => return fail("a directory"),
        "FileOrCreate" if !p.exists() => {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            std::fs::write(&p, b"").map_err(|e| io(&p, e))?;
        }
        "File" if !p.is_file() => return fail("a file"),
        "Socket" | "CharDevice" | "BlockDevice" if !p.exists() => return fail(&format!("a {kind}")),
        _ => {}
    }
    Ok(p)
}

/// Writes a configMap or secret volume: every key (or the listed `items`), with the mode.
fn write_files(dir: &Path, data: Vec<(String, Vec<u8>)>, source: &Value) -> Result<(), ConfigError> {
    let default_mode = source.get("defaultMode").and_then(Value::as_u64).unwrap_or(0o644) as u32;
    let items = source.get("items").and_then(Value::as_array);
    let wanted: Vec<(String, String, u32)> = match items {
        Some(items) => items
            .iter()
            .map(|i| {
                let mode = i.get("mode").and_then(Value::as_u64).map_or(default_mode, |m| m as u32);
                (str_at(i, "/key").to_string(), str_at(i, "/path").to_string(), mode)
            })
            .collect(),
        None => data.iter().map(|(k, _)| (k.clone(), k.clone(), default_mode)).collect(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (key, path, mode) in wanted {
        if path.split('/').any(|p| p == "..") || path.starts_with('/') {
            return Err(ConfigError(format!("invalid path {path:?} for key {key}")));
        }
        let Some((_, bytes)) = data.iter().find(|(k, _)| *k == key) else {
            return Err(ConfigError(format!("couldn't find key {key}")));
        };
        let file = dir.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        // Written beside and renamed, so a container never reads half a file.
        let tmp = file.with_extension("corral-tmp");
        std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &file).map_err(|e| io(&file, e))?;
    }
    Ok(())
}

/// Removes what `prepare` made for a pod (never a hostPath).
pub fn cleanup(pods_root: &Path, uid: &str) -> std::io::Result<()> {
    let dir = pod_dir(pods_root, uid);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn volumes_become_directories_with_their_contents() {
        let root = tempfile::tempdir().unwrap();
        let host = root.path().join("host-data");
        let pod = json!({
            "metadata": {"uid": "u1"},
            "spec": {"volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "conf", "configMap": {"name": "settings", "items": [{"key": "mode", "path": "etc/mode"}]}},
                {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
                {"name": "host", "hostPath": {"path": host.to_str().unwrap(), "type": "DirectoryOrCreate"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "pvc-demo"}},
            ]},
        });
        let sources = VolumeSources {
            node: "a1".into(),
            config_maps: HashMap::from([("settings".into(), json!({"data": {"mode": "fast", "other": "x"}}))]),
            secrets: HashMap::from([("creds".into(), json!({"data": {"user": "YWRtaW4="}}))]),
            claims: HashMap::from([(
                "pvc-demo".into(),
                json!({"spec": {"volumeName": "pv-demo"}, "status": {"phase": "Bound"}}),
            )]),
            volumes: HashMap::from([(
                "pv-demo".into(),
                json!({"spec": {"hostPath": {"path": host.to_str().unwrap()}}}),
            )]),
        };
        let dirs = prepare(&pod, &root.path().join("pods"), &sources).unwrap();
        assert!(dirs["scratch"].is_dir());
        assert_eq!(std::fs::read_to_string(dirs["conf"].join("etc/mode")).unwrap(), "fast");
        assert!(!dirs["conf"].join("other").exists(), "only the listed items");
        let user = dirs["creds"].join("user");
        assert_eq!(std::fs::read_to_string(&user).unwrap(), "admin");
        assert_eq!(std::fs::metadata(&user).unwrap().permissions().mode() & 0o777, 0o400);
        assert_eq!(dirs["host"], host);
        assert!(host.is_dir(), "DirectoryOrCreate created it");
        assert_eq!(dirs["data"], host, "the claim leads to its volume's hostPath");

        cleanup(&root.path().join("pods"), "u1").unwrap();
        assert!(!dirs["scratch"].exists());
        assert!(host.is_dir(), "a hostPath is never removed");

        // A volume pinned to another node (its data is there) is not mounted here.
        let pinned = json!({"spec": {"hostPath": {"path": host.to_str().unwrap()}, "nodeAffinity": {"required": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["a2"]}]}]}}}});
        let elsewhere = VolumeSources { volumes: HashMap::from([("pv-demo".into(), pinned)]), ..sources.clone() };
        let err = prepare(&pod, &root.path().join("pods"), &elsewhere).unwrap_err().0;
        assert_eq!(err, "persistentvolume \"pv-demo\" is pinned to node a2 (its data is there), not a1");
        let here = VolumeSources { node: "a2".into(), ..elsewhere };
        assert_eq!(prepare(&pod, &root.path().join("pods"), &here).unwrap()["data"], host);
    }

    #[test]
    fn bad_volumes_are_config_errors_that_name_the_problem() {
        let root = tempfile::tempdir().unwrap();
        let pod = |v: Value| json!({"metadata": {"uid": "u"}, "spec": {"volumes": [v]}});
        let err = |v: Value| prepare(&pod(v), root.path(), &VolumeSources::default()).unwrap_err().0;
        assert_eq!(
            err(json!({"name": "h", "hostPath": {"path": "/nonexistent/dir", "type": "Directory"}})),
            "hostPath type check failed: /nonexistent/dir is not a directory"
        );
        assert_eq!(err(json!({"name": "c", "configMap": {"name": "gone"}})), "configmap \"gone\" not found");
        assert_eq!(
            err(json!({"name": "d", "persistentVolumeClaim": {"claimName": "pvc"}})),
            "persistentvolumeclaim \"pvc\" not found"
        );
        assert!(
            prepare(
                &pod(json!({"name": "c", "configMap": {"name": "gone", "optional": true}})),
                root.path(),
                &VolumeSources::default()
            )
            .is_ok()
        );
    }
}
