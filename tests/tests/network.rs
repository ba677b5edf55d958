//! Pod and Service networking across nodes on `corral up`'s defaults: 3 servers, each with
//! its own node (control-plane), and 2 agents, every node in a network namespace of its own
//! on a host bridge (made and removed by corral up and down). The seed's deployment.yml gives
//! three nginx pods over the nodes; a deleted one is replaced; a pod on one node reaches every
//! one of them by IP, through the Service's cluster IP and by its DNS name; the host reaches them through a node port on either node and by pod IP; the seed's
//! hostPath volume is pinned to the node pod1 writes on and pod2 reads `Hello Students` there;
//! a hostPort answers on its node's address; a Local node port answers only where its pod
//! runs, which sees the client's address, and drops elsewhere; all of it after `kill -9` of the leader server,
//! against the survivors; nothing of the namespaces, links and routes is left after
//! `corral down`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use corral_e2e::{Cluster, http_get, init_tracing};
use tracing::info;

const BASE_PORT: u16 = 25900;
const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seed/deployment.yml");
const PV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seed/pv-pvc.yml");
const POD1: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seed/pod1.yml");
const POD2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seed/pod2.yml");

/// A client pod on node a1.
const CLIENT: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  nodeName: a1
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: busybox
    command: ["sleep", "3600"]
"#;

/// nginx on node a2, its port 80 published on the node's port 8080.
const HOST_PORT: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: host-port
  labels:
    app: host-port
spec:
  nodeName: a2
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: nginx:latest
    ports:
    - containerPort: 80
      hostPort: 8080
"#;

/// A node port to the host-port pod with the Local external traffic policy.
const LOCAL_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web-local
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector:
    app: host-port
  ports:
  - port: 80
    targetPort: 80
"#;

/// The nginx welcome page's title, from `addr` (ip:port) asked from the client pod.
fn title_from_client(c: &Cluster, host: &str, port: u16) -> Result<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port} | grep -o '<title>[^<]*'");
    c.kube(&["exec", "client", "--", "sh", "-c", &script]).map(|o| o.trim().to_string())
}

/// The seed's replicas: (name, pod IP, node).
fn placement(c: &Cluster) -> Result<Vec<(String, String, String)>> {
    let template = "jsonpath={range .items[*]}{.metadata.name}={.status.podIP}={.spec.nodeName} {end}";
    let out = c.kube(&["get", "pods", "-l", "app=myapp", "-o", template])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| {
            let mut f = p.split('=');
            Some((f.next()?.to_string(), f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect())
}

/// The same from the host.
fn title_from_host(addr: &str) -> Option<String> {
    let body = http_get(addr, Duration::from_secs(3))?;
    let rest = &body[body.find("<title>")?..];
    Some(rest[..rest[1..].find('<')? + 1].to_string())
}

/// The same, asked again for up to 10 s while the rules are being put in place.
fn title_from_host_within(addr: &str) -> Option<String> {
    within_10s(|| title_from_host(addr))
}

/// `ask` again every 200 ms until it answers, for up to 10 s.
fn within_10s<T>(ask: impl Fn() -> Option<T>) -> Option<T> {
    for _ in 0..50 {
        if let Some(answer) = ask() {
            return Some(answer);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ask()
}

/// The first line of the answer to `GET path` at `addr` (ip:port), within 3 s.
fn get_path(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(3)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.lines().next().map(str::to_string)
}

/// Whether connecting to `addr` times out (a drop rule) within 10 s of tries; a refusal
/// means no rule yet and is tried again; an answer is a failure.
fn dropped_within(addr: &str) -> bool {
    let Ok(target) = addr.parse() else { return false };
    for _ in 0..10 {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
            Ok(_) => return false,
        }
    }
    false
}

fn network_leftovers(tag: &str) -> Result<Vec<String>> {
    let netns = String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output()?.stdout)?;
    let links = String::from_utf8(std::process::Command::new("ip").args(["-o", "link", "show"]).output()?.stdout)?;
    let routes =
        String::from_utf8(std::process::Command::new("ip").args(["route", "show", "proto", "250"]).output()?.stdout)?;
    Ok(netns.lines().chain(links.lines()).chain(routes.lines()).filter(|l| l.contains(tag)).map(String::from).collect())
}

#[test]
fn pods_and_services_reach_across_node_namespaces() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, BASE_PORT, &["--agents", "2", "--cluster-cidr", "10.253.0.0/16"])?;
    let minute = Duration::from_secs(60);
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(c.state_dir().join("cluster.json"))?)?;

    info!("five nodes, each on an address of its own: the servers' own (control-plane) and two agents");
    let table = c.kube(&["get", "nodes", "--no-headers"])?;
    let roles: Vec<(&str, &str)> =
        table.lines().filter_map(|l| l.split_whitespace().collect::<Vec<_>>().get(..3).map(|f| (f[0], f[2]))).collect();
    assert_eq!(
        roles,
        [("a1", "<none>"), ("a2", "<none>"), ("s1", "control-plane"), ("s2", "control-plane"), ("s3", "control-plane")],
        "{table}"
    );
    assert!(table.lines().all(|l| l.split_whitespace().nth(1) == Some("Ready")), "{table}");
    let address = "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}";
    let ips = [c.kube(&["get", "node", "a1", "-o", address])?, c.kube(&["get", "node", "a2", "-o", address])?];
    assert!(ips.iter().all(|ip| ip.starts_with("10.2") && ips[0] != ips[1]), "{ips:?}");

    info!("the seed's deployment.yml: three nginx pods, on more than one node");
    c.kube(&["apply", "-f", SEED])?;
    c.kube_stdin(&["apply", "-f", "-"], CLIENT)?;
    c.kube_until(&["get", "deployment", "my-deployment", "-o", "jsonpath={.status.availableReplicas}"], minute, |o| {
        o == "3"
    })?;
    c.kube_until(&["get", "pod", "client", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Running")?;
    let pods: Vec<(String, String)> = placement(&c)?.into_iter().map(|(_, ip, node)| (ip, node)).collect();
    let nodes: BTreeSet<&str> = pods.iter().map(|(_, n)| n.as_str()).collect();
    info!(?pods, "placed");
    assert!(nodes.len() >= 2, "the replicas spread over the nodes: {pods:?}");

    info!("kill -9 the leader server: everything after this runs against the survivors");
    let leader = c.leader()?;
    c.kill(&leader.name)?;
    let survivor = c.servers()?.iter().position(|s| s.name != leader.name).context("a surviving server")?;
    c.use_server(survivor)?;
    // The survivors elect within half a second; requests in that window wait or get 503.
    c.kube_until(&["get", "nodes", "--no-headers"], minute, |o| o.lines().count() == 5)?;
    info!(killed = %leader.name, survivor = %c.api_url(survivor), "kubectl now talks to a survivor");

    info!("auto-healing: a deleted pod is replaced");
    let victim = pods[0].0.to_string();
    let names = |c: &Cluster| -> Result<BTreeSet<String>> {
        let running = "jsonpath={range .items[?(@.status.phase==\"Running\")]}{.metadata.name} {end}";
        Ok(c.kube(&["get", "pods", "-l", "app=myapp", "-o", running])?.split_whitespace().map(String::from).collect())
    };
    let before = names(&c)?;
    let victim_name = c.kube(&[
        "get",
        "pods",
        "-l",
        "app=myapp",
        "-o",
        &format!("jsonpath={{.items[?(@.status.podIP==\"{victim}\")].metadata.name}}"),
    ])?;
    c.kube(&["delete", "pod", &victim_name, "--wait=false"])?;
    let deadline = std::time::Instant::now() + minute;
    let mut after = names(&c)?;
    while (after.len() != 3 || after.contains(&victim_name)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = names(&c)?;
    }
    assert!(after.len() == 3 && !after.contains(&victim_name) && after != before, "{before:?} -> {after:?}");
    // The replicas now: the victim may still be terminating.
    let now = placement(&c)?;
    let pods: Vec<(String, String)> = now
        .iter()
        .filter(|(name, _, _)| after.contains(name))
        .map(|(_, ip, node)| (ip.clone(), node.clone()))
        .collect();
    assert_eq!(pods.len(), 3, "{now:?}");

    info!("pod to pod across nodes, by IP");
    for (ip, node) in &pods {
        let title = title_from_client(&c, ip, 80).with_context(|| format!("{ip} on {node}"))?;
        assert_eq!(title, "<title>Welcome to nginx!", "{ip} on {node}");
    }

    info!("pod to Service, by cluster IP and by DNS name");
    c.kube(&["expose", "deployment", "my-deployment", "--port=80"])?;
    let cluster_ip = c.kube(&["get", "service", "my-deployment", "-o", "jsonpath={.spec.clusterIP}"])?;
    c.kube_until(
        &["exec", "client", "--", "sh", "-c", &format!("nc -w 2 {cluster_ip} 80 </dev/null; echo rc=$?")],
        minute,
        |o| o.contains("rc=0"),
    )?;
    assert_eq!(title_from_client(&c, &cluster_ip, 80)?, "<title>Welcome to nginx!");
    for name in ["my-deployment", "my-deployment.default", "my-deployment.default.svc.cluster.local"] {
        assert_eq!(title_from_client(&c, name, 80)?, "<title>Welcome to nginx!", "{name}");
    }

    info!("the host: a node port on either node, and pod IPs through the nodes");
    c.kube(&["expose", "deployment", "my-deployment", "--name=web-np", "--type=NodePort", "--port=80"])?;
    let node_port = c.kube(&["get", "service", "web-np", "-o", "jsonpath={.spec.ports[0].nodePort}"])?;
    for ip in ips.iter() {
        let addr = format!("{ip}:{node_port}");
        assert_eq!(title_from_host_within(&addr).as_deref(), Some("<title>Welcome to nginx!"), "node port {addr}");
    }
    for (ip, _) in &pods {
        assert_eq!(title_from_host(&format!("{ip}:80")).as_deref(), Some("<title>Welcome to nginx!"), "{ip}");
    }

    info!("a hostPort: the node's address reaches the pod (the CNI portmap plugin)");
    c.kube_stdin(&["apply", "-f", "-"], HOST_PORT)?;
    c.kube_until(&["get", "pod", "host-port", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Running")?;
    let addr = format!("{}:8080", ips[1]);
    assert_eq!(title_from_host_within(&addr).as_deref(), Some("<title>Welcome to nginx!"), "host port {addr}");
    assert_eq!(title_from_client(&c, &ips[1], 8080)?, "<title>Welcome to nginx!", "host port from a pod");

    info!("externalTrafficPolicy Local: the node with the endpoint answers and the pod sees the client; others drop");
    // Local from its creation: an expose then a patch would leave a moment of the Cluster
    // policy, whose masqueraded answer the first request could get.
    c.kube_stdin(&["apply", "-f", "-"], LOCAL_SERVICE)?;
    let local_port: u16 =
        c.kube(&["get", "service", "web-local", "-o", "jsonpath={.spec.ports[0].nodePort}"])?.parse()?;
    let host_ip = record["network"]["host_ip"].as_str().context("the host's address in cluster.json")?.to_string();
    let path = format!("/local-{}", std::process::id());
    let with = format!("{}:{local_port}", ips[1]);
    let answer = within_10s(|| get_path(&with, &path));
    assert!(answer.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 404")), "{with}{path}: {answer:?}");
    // The access log reaches the node's log file a moment after the answer.
    c.kube_until(&["logs", "host-port"], Duration::from_secs(10), |log| {
        log.lines().any(|l| l.starts_with(&format!("{host_ip} ")) && l.contains(&format!("GET {path} ")))
    })
    .with_context(|| format!("the pod saw {host_ip} ask {path}"))?;
    let without = format!("{}:{local_port}", ips[0]);
    assert!(dropped_within(&without), "{without} (no endpoint there) drops, neither refuses nor answers");
    // The node's own pods still reach it, through the node with the endpoint.
    assert_eq!(title_from_client(&c, &ips[0], local_port)?, "<title>Welcome to nginx!", "from a pod on a1");

    info!("the seed's volume: pinned to the node pod1 wrote on, where pod2 then reads it");
    c.kube(&["apply", "-f", PV])?;
    c.kube(&["apply", "-f", POD1])?;
    c.kube_until(&["get", "pod", "pod1", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Succeeded")?;
    let writer = c.kube(&["get", "pod", "pod1", "-o", "jsonpath={.spec.nodeName}"])?;
    let affinity = "jsonpath={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}";
    assert_eq!(c.kube(&["get", "pv", "pv-demo", "-o", affinity])?, writer, "pinned to its first node");
    c.kube(&["delete", "pod", "pod1"])?;
    c.kube(&["apply", "-f", POD2])?;
    c.kube_until(&["get", "pod", "pod2", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Running")?;
    assert_eq!(c.kube(&["get", "pod", "pod2", "-o", "jsonpath={.spec.nodeName}"])?, writer);
    c.kube_until(&["logs", "pod2"], minute, |o| o.trim() == "Hello Students")?;

    info!("corral status: the servers with the leader, the agents with their server and address");
    let status = std::process::Command::new(corral_e2e::corral_bin())
        .args(["status", "--state-dir"])
        .arg(c.state_dir())
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert_eq!(status.lines().filter(|l| l.contains(" leader ")).count(), 1, "{status}");
    for (i, ip) in ips.iter().enumerate() {
        let line = status.lines().find(|l| l.starts_with(&format!("a{} ", i + 1))).unwrap_or_default();
        assert!(line.contains(ip) && line.contains(" s") && line.contains("True"), "{status}");
    }

    info!("corral down leaves no namespace, link or route behind");
    let bridge = record["network"]["bridge"].as_str().map(String::from).context("the node network in cluster.json")?;
    assert!(!network_leftovers(&bridge)?.is_empty(), "the network is there before");
    c.down()?;
    let left = network_leftovers(&bridge)?;
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
