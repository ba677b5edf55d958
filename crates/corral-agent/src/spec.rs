//! A pod's spec in CRI terms: the sandbox config and each container's config, as kubelet
//! derives them. Pure: everything the translation needs from the node or the API (volume
//! paths, ConfigMaps and Secrets) is passed in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use corral_api::quantity::Quantity;
use corral_proto::cri;
use serde_json::Value;

/// Labels every sandbox and container carries, as kubelet sets them: a restarted agent finds
/// its pods by these.
pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const POD_UID: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// Annotations on containers: the restart count, and the hash of the container's spec that
/// tells a changed container from the one running.
pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const SPEC_HASH: &str = "io.kubernetes.container.hash";
/// Set on init containers.
pub const INIT_CONTAINER: &str = "io.corral.container.init";

const CPU_PERIOD: i64 = 100_000;
const MIN_SHARES: i64 = 2;

/// Where the node puts a pod's things, and how it is reached.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// The cgroup under which the node's pods go (one per agent, so agents sharing a
    /// machine do not collide).
    pub cgroup_root: String,
    /// Where pod logs go: `<log_root>/<namespace>_<name>_<uid>/<container>/<attempt>.log`.
    pub log_root: PathBuf,
    /// Host directories of the pod's volumes, by volume name.
    pub volumes: HashMap<String, PathBuf>,
    /// The cluster DNS server and domain, for `dnsPolicy: ClusterFirst`.
    pub cluster_dns: Option<(String, String)>,
    pub node_name: String,
    pub host_ip: String,
    pub pod_ip: String,
}

/// The ConfigMaps and Secrets of the pod's namespace that its containers refer to.
#[derive(Clone, Debug, Default)]
pub struct References {
    pub config_maps: HashMap<String, Value>,
    pub secrets: HashMap<String, Value>,
}

/// Why a container cannot be configured (kubelet's CreateContainerConfigError).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub(crate) use corral_api::meta::str_at;

/// `meta::string_map` as the HashMap CRI's messages carry.
pub(crate) fn string_map(v: Option<&Value>) -> HashMap<String, String> {
    corral_api::meta::string_map(v).into_iter().collect()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

pub fn pod_labels(pod: &Value) -> HashMap<String, String> {
    let mut labels = string_map(pod.pointer("/metadata/labels"));
    labels.insert(POD_NAME.into(), str_at(pod, "/metadata/name").into());
    labels.insert(POD_NAMESPACE.into(), str_at(pod, "/metadata/namespace").into());
    labels.insert(POD_UID.into(), str_at(pod, "/metadata/uid").into());
    labels
}

/// `<namespace>_<name>_<uid>`, the directory of a pod's logs.
pub fn log_directory(pod: &Value, placement: &Placement) -> PathBuf {
    placement.log_root.join(format!(
        "{}_{}_{}",
        str_at(pod, "/metadata/namespace"),
        str_at(pod, "/metadata/name"),
        str_at(pod, "/metadata/uid")
    ))
}

fn host_network(pod: &Value) -> bool {
    pod.pointer("/spec/hostNetwork").and_then(Value::as_bool).unwrap_or(false)
}

/// The sandbox of a pod (its `attempt`-th).
pub fn sandbox_config(pod: &Value, placement: &Placement, attempt: u32) -> cri::PodSandboxConfig {
    let name = str_at(pod, "/metadata/name");
    let namespace = str_at(pod, "/metadata/namespace");
    let uid = str_at(pod, "/metadata/uid");
    let hostname = if host_network(pod) {
        String::new()
    } else {
        let h = str_at(pod, "/spec/hostname");
        let h = if h.is_empty() { name } else { h };
        h.chars().take(63).collect::<String>().trim_end_matches(['-', '.']).to_string()
    };
    let mut port_mappings = Vec::new();
    for c in pod.pointer("/spec/containers").and_then(Value::as_array).into_iter().flatten() {
        for p in c.get("ports").and_then(Value::as_array).into_iter().flatten() {
            let host_port = p.get("hostPort").and_then(Value::as_i64).unwrap_or(0);
            if host_port == 0 {
                continue;
            }
            port_mappings.push(cri::PortMapping {
                protocol: protocol(p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")) as i32,
                container_port: p.get("containerPort").and_then(Value::as_i64).unwrap_or(0) as i32,
                host_port: host_port as i32,
                host_ip: p.get("hostIP").and_then(Value::as_str).unwrap_or_default().to_string(),
            });
        }
    }
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt,
        }),
        hostname,
        log_directory: log_directory(pod, placement).display().to_string(),
        dns_config: dns_config(pod, placement),
        port_mappings,
        labels: pod_labels(pod),
        annotations: string_map(pod.pointer("/metadata/annotations")),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: pod_cgroup(pod, placement),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(pod)),
                ..Default::default()
            }),
            sysctls: pod
                .pointer("/spec/securityContext/sysctls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|s| (str_at(s, "/name").to_string(), str_at(s, "/value").to_string()))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The namespaces the pod's sandbox and containers share: the node's network and IPC with
/// hostNetwork, the node's PID namespace with hostPID, one per pod with shareProcessNamespace.
fn namespace_options(pod: &Value) -> cri::NamespaceOption {
    let flag = |field: &str| pod.pointer(field).and_then(Value::as_bool).unwrap_or(false);
    let shared = if host_network(pod) { cri::NamespaceMode::Node } else { cri::NamespaceMode::Pod };
    let pid = if flag("/spec/hostPID") {
        cri::NamespaceMode::Node
    } else if flag("/spec/shareProcessNamespace") {
        cri::NamespaceMode::Pod
    } else {
        cri::NamespaceMode::Container
    };
    cri::NamespaceOption { network: shared as i32, pid: pid as i32, ipc: shared as i32, ..Default::default() }
}

/// `<root>/pod<uid>`: one cgroup per pod under the node's.
pub fn pod_cgroup(pod: &Value, placement: &Placement) -> String {
    format!("{}/pod{}", placement.cgroup_root.trim_end_matches('/'), str_at(pod, "/metadata/uid"))
}

fn protocol(p: &str) -> cri::Protocol {
    match p {
        "UDP" => cri::Protocol::Udp,
        "SCTP" => cri::Protocol::Sctp,
        _ => cri::Protocol::Tcp,
    }
}

fn dns_config(pod: &Value, placement: &Placement) -> Option<cri::DnsConfig> {
    let policy = pod.pointer("/spec/dnsPolicy").and_then(Value::as_str).unwrap_or("ClusterFirst");
    let cluster_first = policy == "ClusterFirst" || (policy == "ClusterFirstWithHostNet" && host_network(pod));
    let mut config =
        match (&placement.cluster_dns, cluster_first && !host_network(pod) || policy == "ClusterFirstWithHostNet") {
            (Some((server, domain)), true) => {
                let ns = str_at(pod, "/metadata/namespace");
                cri::DnsConfig {
                    servers: vec![server.clone()],
                    searches: vec![format!("{ns}.svc.{domain}"), format!("svc.{domain}"), domain.clone()],
                    options: vec!["ndots:5".into()],
                }
            }
            // Default (and ClusterFirst without cluster DNS): the node's resolver, which the
            // runtime copies when the config is empty.
            _ if policy != "None" => {
                return pod.pointer("/spec/dnsConfig").map(|_| custom_dns(pod, cri::DnsConfig::default()));
            }
            _ => cri::DnsConfig::default(),
        };
    config = custom_dns(pod, config);
    Some(config)
}

/// `spec.dnsConfig` added to (or, for `dnsPolicy: None`, making) the DNS config.
fn custom_dns(pod: &Value, mut config: cri::DnsConfig) -> cri::DnsConfig {
    let custom = pod.pointer("/spec/dnsConfig");
    config.servers.extend(strings(custom.and_then(|c| c.get("nameservers"))));
    config.searches.extend(strings(custom.and_then(|c| c.get("searches"))));
    for o in custom.and_then(|c| c.get("options")).and_then(Value::as_array).into_iter().flatten() {
        let name = str_at(o, "/name");
        config.options.retain(|existing| existing.split(':').next() != Some(name));
        config.options.push(match o.get("value").and_then(Value::as_str) {
            Some(v) => format!("{name}:{v}"),
            None => name.to_string(),
        });
    }
    config
}

/// A container's config, for its `attempt`-th run.
pub fn container_config(
    pod: &Value,
    container: &Value,
    attempt: u32,
    init: bool,
    placement: &Placement,
    refs: &References,
) -> Result<cri::ContainerConfig, ConfigError> {
    let name = str_at(container, "/name");
    let env = environment(pod, container, placement, refs)?;
    let expand = |s: &String| expand_vars(s, &env);
    let mut labels = HashMap::from([
        (POD_NAME.to_string(), str_at(pod, "/metadata/name").to_string()),
        (POD_NAMESPACE.to_string(), str_at(pod, "/metadata/namespace").to_string()),
        (POD_UID.to_string(), str_at(pod, "/metadata/uid").to_string()),
        (CONTAINER_NAME.to_string(), name.to_string()),
    ]);
    if init {
        labels.insert(INIT_CONTAINER.into(), "true".into());
    }
    let annotations = HashMap::from([
        (RESTART_COUNT.to_string(), attempt.to_string()),
        (SPEC_HASH.to_string(), spec_hash(container)),
    ]);
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt }),
        image: Some(cri::ImageSpec { image: str_at(container, "/image").into(), ..Default::default() }),
        command: strings(container.get("command")).iter().map(expand).collect(),
        args: strings(container.get("args")).iter().map(expand).collect(),
        working_dir: str_at(container, "/workingDir").into(),
        envs: env.iter().map(|(k, v)| cri::KeyValue { key: k.clone(), value: v.clone() }).collect(),
        mounts: mounts(container, placement)?,
        labels,
        annotations,
        log_path: format!("{name}/{attempt}.log"),
        stdin: container.get("stdin").and_then(Value::as_bool).unwrap_or(false),
        stdin_once: container.get("stdinOnce").and_then(Value::as_bool).unwrap_or(false),
        tty: container.get("tty").and_then(Value::as_bool).unwrap_or(false),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(resources(container)),
            security_context: Some(security_context(pod, container)),
        }),
        ..Default::default()
    })
}

/// A hash of what the container runs: a change means the running container is replaced.
/// Stored on the container, so it must not change between builds: SHA-1, not std's hasher
/// (whose output Rust does not promise to keep).
pub fn spec_hash(container: &Value) -> String {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(serde_json::to_vec(container).unwrap_or_default());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// `$(VAR)` references to earlier variables expanded, `$$` escaping a `$`, as kubelet does.
fn expand_vars(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let var = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == var) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({var})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn environment(
    pod: &Value,
    container: &Value,
    placement: &Placement,
    refs: &References,
) -> Result<Vec<(String, String)>, ConfigError> {
    let namespace = str_at(pod, "/metadata/namespace");
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(existing, _)| *existing != k);
        env.push((k, v));
    };
    for from in container.get("envFrom").and_then(Value::as_array).into_iter().flatten() {
        let prefix = str_at(from, "/prefix");
        let optional = |r: &Value| r.get("optional").and_then(Value::as_bool).unwrap_or(false);
        if let Some(r) = from.get("configMapRef") {
            let name = str_at(r, "/name");
            match refs.config_maps.get(name) {
                Some(cm) => {
                    for (k, v) in string_map(cm.get("data")) {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                None if optional(r) => {}
                None => return Err(ConfigError(format!("configmap \"{name}\" not found"))),
            }
        }
        if let Some(r) = from.get("secretRef") {
            let name = str_at(r, "/name");
            match refs.secrets.get(name) {
                Some(secret) => {
                    for (k, v) in secret_data(secret) {
                        set(&mut env, format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                    }
                }
                None if optional(r) => {}
                None => return Err(ConfigError(format!("secret \"{name}\" not found"))),
            }
        }
    }
    for e in container.get("env").and_then(Value::as_array).into_iter().flatten() {
        let name = str_at(e, "/name").to_string();
        if let Some(v) = e.get("value").and_then(Value::as_str) {
            let v = expand_vars(v, &env);
            set(&mut env, name, v);
            continue;
        }
        let Some(from) = e.get("valueFrom") else {
            set(&mut env, name, String::new());
            continue;
        };
        let optional = |r: &Value| r.get("optional").and_then(Value::as_bool).unwrap_or(false);
        let value = if let Some(r) = from.get("configMapKeyRef") {
            let (cm_name, key) = (str_at(r, "/name"), str_at(r, "/key"));
            match refs.config_maps.get(cm_name) {
                Some(cm) => match cm
                    .pointer(&format!("/data/{}", key.replace('~', "~0").replace('/', "~1")))
                    .and_then(Value::as_str)
                {
                    Some(v) => Some(v.to_string()),
                    None if optional(r) => None,
                    None => {
                        return Err(ConfigError(format!("couldn't find key {key} in ConfigMap {namespace}/{cm_name}")));
                    }
                },
                None if optional(r) => None,
                None => return Err(ConfigError(format!("configmap \"{cm_name}\" not found"))),
            }
        } else if let Some(r) = from.get("secretKeyRef") {
            let (secret_name, key) = (str_at(r, "/name"), str_at(r, "/key"));
            match refs.secrets.get(secret_name) {
                Some(secret) => match secret_data(secret).remove(key) {
                    Some(v) => Some(String::from_utf8_lossy(&v).into_owned()),
                    None if optional(r) => None,
                    None => {
                        return Err(ConfigError(format!(
                            "couldn't find key {key} in Secret {namespace}/{secret_name}"
                        )));
                    }
                },
                None if optional(r) => None,
                None => return Err(ConfigError(format!("secret \"{secret_name}\" not found"))),
            }
        } else if let Some(r) = from.get("fieldRef") {
            Some(field_ref(pod, str_at(r, "/fieldPath"), placement)?)
        } else if let Some(r) = from.get("resourceFieldRef") {
            Some(resource_field(container, r)?)
        } else {
            None
        };
        if let Some(v) = value {
            set(&mut env, name, v);
        }
    }
    Ok(env)
}

/// A Secret's data, decoded, with stringData over it.
pub(crate) fn secret_data(secret: &Value) -> HashMap<String, Vec<u8>> {
    use base64::Engine as _;
    let mut out: HashMap<String, Vec<u8>> = HashMap::new();
    for (k, v) in string_map(secret.get("data")) {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(v.as_bytes()) {
            out.insert(k, bytes);
        }
    }
    for (k, v) in string_map(secret.get("stringData")) {
        out.insert(k, v.into_bytes());
    }
    out
}

/// The downward API's fields.
pub fn field_ref(pod: &Value, path: &str, placement: &Placement) -> Result<String, ConfigError> {
    let value = match path {
        "metadata.name" => str_at(pod, "/metadata/name").to_string(),
        "metadata.namespace" => str_at(pod, "/metadata/namespace").to_string(),
        "metadata.uid" => str_at(pod, "/metadata/uid").to_string(),
        "spec.nodeName" => placement.node_name.clone(),
        "spec.serviceAccountName" => str_at(pod, "/spec/serviceAccountName").to_string(),
        "status.hostIP" | "status.hostIPs" => placement.host_ip.clone(),
        "status.podIP" | "status.podIPs" => placement.pod_ip.clone(),
        p => {
            let labelled = |prefix: &str, field: &str| {
                let key = p.strip_prefix(prefix)?.strip_suffix("']")?;
                Some(string_map(pod.pointer(field)).get(key).cloned().unwrap_or_default())
            };
            labelled("metadata.labels['", "/metadata/labels")
                .or_else(|| labelled("metadata.annotations['", "/metadata/annotations"))
                .ok_or_else(|| ConfigError(format!("unsupported fieldPath: {p}")))?
        }
    };
    Ok(value)
}

fn resource_field(container: &Value, r: &Value) -> Result<String, ConfigError> {
    let resource = str_at(r, "/resource");
    let divisor = r.get("divisor").and_then(Quantity::from_json).unwrap_or_else(|| Quantity::parse("1").expect("one"));
    let q = container
        .pointer(&format!("/resources/{}", resource.replace('.', "/")))
        .and_then(Quantity::from_json)
        .ok_or_else(|| ConfigError(format!("no {resource} set on container {}", str_at(container, "/name"))))?;
    let (n, d) = if resource.ends_with("cpu") { (q.millis(), divisor.millis()) } else { (q.value(), divisor.value()) };
    Ok(((n + d - 1) / d.max(1)).to_string())
}

fn mounts(container: &Value, placement: &Placement) -> Result<Vec<cri::Mount>, ConfigError> {
    let mut out = Vec::new();
    for m in container.get("volumeMounts").and_then(Value::as_array).into_iter().flatten() {
        let volume = str_at(m, "/name");
        let host = placement
            .volumes
            .get(volume)
            .ok_or_else(|| ConfigError(format!("cannot find volume \"{volume}\" to mount into container")))?;
        let sub = str_at(m, "/subPath");
        if sub.split('/').any(|p| p == "..") || Path::new(sub).is_absolute() {
            return Err(ConfigError(format!("invalid subPath {sub:?}: must be a relative path without '..'")));
        }
        let host = if sub.is_empty() { host.clone() } else { host.join(sub) };
        let propagation = match str_at(m, "/mountPropagation") {
            "HostToContainer" => cri::MountPropagation::PropagationHostToContainer,
            "Bidirectional" => cri::MountPropagation::PropagationBidirectional,
            _ => cri::MountPropagation::PropagationPrivate,
        };
        out.push(cri::Mount {
            container_path: str_at(m, "/mountPath").into(),
            host_path: host.display().to_string(),
            readonly: m.get("readOnly").and_then(Value::as_bool).unwrap_or(false),
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    Ok(out)
}

/// CPU shares from the request, quota from the limit, memory limit; as kubelet maps them.
fn resources(container: &Value) -> cri::LinuxContainerResources {
    let get = |which: &str, name: &str| {
        container.pointer(&format!("/resources/{which}/{name}")).and_then(Quantity::from_json)
    };
    let cpu_limit = get("limits", "cpu");
    // A limit without a request requests the limit.
    let cpu_request = get("requests", "cpu").or(cpu_limit);
    let shares = match cpu_request {
        Some(q) => (q.millis() * 1024 / 1000).max(MIN_SHARES),
        None => MIN_SHARES,
    };
    let (period, quota) = match cpu_limit {
        Some(q) => (CPU_PERIOD, (q.millis() * CPU_PERIOD / 1000).max(1000)),
        None => (0, 0),
    };
    cri::LinuxContainerResources {
        cpu_period: period,
        cpu_quota: quota,
        cpu_shares: shares,
        memory_limit_in_bytes: get("limits", "memory").map_or(0, Quantity::value),
        ..Default::default()
    }
}

fn security_context(pod: &Value, container: &Value) -> cri::LinuxContainerSecurityContext {
    let pod_sc = pod.pointer("/spec/securityContext");
    let sc = container.get("securityContext");
    let pick = |field: &str| sc.and_then(|s| s.get(field)).or_else(|| pod_sc.and_then(|s| s.get(field)));
    cri::LinuxContainerSecurityContext {
        capabilities: sc.and_then(|s| s.get("capabilities")).map(|c| cri::Capability {
            add_capabilities: strings(c.get("add")),
            drop_capabilities: strings(c.get("drop")),
            ..Default::default()
        }),
        privileged: sc.and_then(|s| s.get("privileged")).and_then(Value::as_bool).unwrap_or(false),
        namespace_options: Some(namespace_options(pod)),
        run_as_user: pick("runAsUser").and_then(Value::as_i64).map(|value| cri::Int64Value { value }),
        run_as_group: pick("runAsGroup").and_then(Value::as_i64).map(|value| cri::Int64Value { value }),
        readonly_rootfs: sc.and_then(|s| s.get("readOnlyRootFilesystem")).and_then(Value::as_bool).unwrap_or(false),
        supplemental_groups: pod_sc
            .and_then(|s| s.get("supplementalGroups"))
            .and_then(Value::as_array)
            .map(|g| g.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default(),
        no_new_privs: sc.and_then(|s| s.get("allowPrivilegeEscalation")).and_then(Value::as_bool) == Some(false),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "n1",
                "containers": [{
                    "name": "nginx",
                    "image": "nginx:latest",
                    "command": ["sh", "-c"],
                    "args": ["echo $(GREETING) $$HOME"],
                    "ports": [{"containerPort": 80, "hostPort": 8080}],
                    "env": [
                        {"name": "GREETING", "value": "hello"},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                        {"name": "USER", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}},
                        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                    ],
                    "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "64Mi"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }],
            },
        })
    }

    fn placement() -> Placement {
        Placement {
            cgroup_root: "/corral/n1".into(),
            log_root: "/var/log/pods".into(),
            volumes: HashMap::from([("data".to_string(), PathBuf::from("/srv/data"))]),
            cluster_dns: Some(("10.96.0.10".into(), "cluster.local".into())),
            node_name: "n1".into(),
            host_ip: "10.0.0.1".into(),
            pod_ip: "10.244.1.5".into(),
        }
    }

    fn refs() -> References {
        References {
            config_maps: HashMap::from([("settings".to_string(), json!({"data": {"mode": "fast"}}))]),
            secrets: HashMap::from([("creds".to_string(), json!({"data": {"user": "YWRtaW4="}}))]),
        }
    }

    #[test]
    fn the_sandbox_carries_the_pods_identity_ports_dns_and_cgroup() {
        let s = sandbox_config(&pod(), &placement(), 0);
        let m = s.metadata.as_ref().unwrap();
        assert_eq!((m.name.as_str(), m.namespace.as_str(), m.uid.as_str()), ("web", "shop", "u-1"));
        assert_eq!(s.hostname, "web");
        assert_eq!(s.log_directory, "/var/log/pods/shop_web_u-1");
        assert_eq!(s.labels[POD_UID], "u-1");
        assert_eq!(s.labels["app"], "web");
        assert_eq!(s.port_mappings[0].host_port, 8080);
        let dns = s.dns_config.unwrap();
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(dns.searches, ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        assert_eq!(s.linux.unwrap().cgroup_parent, "/corral/n1/podu-1");
    }

    #[test]
    fn a_container_gets_its_environment_resources_mounts_and_log_path() {
        let p = pod();
        let c = container_config(&p, &p["spec"]["containers"][0], 2, false, &placement(), &refs()).unwrap();
        assert_eq!(c.args, ["echo hello $HOME"], "$(VAR) expanded, $$ escaped");
        let env: HashMap<_, _> = c.envs.iter().map(|kv| (kv.key.as_str(), kv.value.as_str())).collect();
        assert_eq!(env["POD"], "web");
        assert_eq!(env["MODE"], "fast");
        assert_eq!(env["USER"], "admin");
        assert_eq!(env["MEM"], "64");
        let r = c.linux.unwrap().resources.unwrap();
        assert_eq!((r.cpu_shares, r.cpu_quota, r.cpu_period), (256, 50_000, 100_000));
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        assert_eq!(c.mounts[0].host_path, "/srv/data");
        assert_eq!(c.log_path, "nginx/2.log");
        assert_eq!(c.annotations[RESTART_COUNT], "2");
    }

    #[test]
    fn a_missing_config_map_or_key_is_a_config_error_with_kubelets_words() {
        let p = pod();
        let mut r = refs();
        r.config_maps.clear();
        let err = container_config(&p, &p["spec"]["containers"][0], 0, false, &placement(), &r).unwrap_err();
        assert_eq!(err.0, "configmap \"settings\" not found");
        let mut r = refs();
        r.config_maps.insert("settings".into(), json!({"data": {}}));
        let err = container_config(&p, &p["spec"]["containers"][0], 0, false, &placement(), &r).unwrap_err();
        assert_eq!(err.0, "couldn't find key mode in ConfigMap shop/settings");
    }

    #[test]
    fn without_limits_a_container_gets_minimum_shares_and_no_quota() {
        let r = resources(&json!({"name": "c"}));
        assert_eq!((r.cpu_shares, r.cpu_quota, r.memory_limit_in_bytes), (2, 0, 0));
    }
}
