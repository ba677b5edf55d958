//! The service proxy on a 3-server cluster with a real agent and containerd: a pod that asks
//! a Service's cluster IP again and again is answered by all three replicas; the node reaches
//! it too, and the host through its node port; the node's DNS names it; endpoints follow the
//! pods within a second or two; a Service without endpoints refuses at once; ClientIP affinity keeps a client on one
//! replica; after `kill -9` of the leader the rules follow a change made through a survivor;
//! and the rules go with `corral down`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use corral_e2e::{Cluster, http_get, init_tracing};
use tracing::info;

const BASE_PORT: u16 = 25800;

/// Three busybox web servers, each answering with its own pod name.
const ECHO: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 3
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: busybox
        command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: busybox
    command: ["sleep", "3600"]
"#;

/// Who answered `n` requests to `addr` (ip:port) from the client pod.
fn answers_from_pod(c: &Cluster, addr: &str, n: usize) -> Result<Vec<String>> {
    answers_from_pod_via(c, &[], addr, n)
}

/// `answers_from_pod`, with kubectl's extra arguments (`--server`).
fn answers_from_pod_via(c: &Cluster, via: &[&str], addr: &str, n: usize) -> Result<Vec<String>> {
    let script = requests(addr, n)?;
    let args: Vec<&str> = via.iter().copied().chain(["exec", "client", "--", "sh", "-c", &script]).collect();
    let out = c.kube(&args)?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Who answered `n` requests to `addr` from the host.
fn answers_from_host(addr: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let response = http_get(addr, Duration::from_secs(2));
            response.and_then(|r| r.lines().last().map(|l| l.trim().to_string())).unwrap_or_else(|| "FAILED".into())
        })
        .collect()
}

fn distinct(answers: &[String]) -> BTreeSet<&str> {
    answers.iter().map(String::as_str).collect()
}

#[test]
fn services_balance_over_ready_endpoints_from_pods_nodes_and_the_host() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, BASE_PORT, &["--agents", "1", "--cluster-cidr", "10.250.0.0/16"])?;
    let minute = Duration::from_secs(60);

    info!("three replicas behind kubectl expose, and a client pod");
    c.kube_stdin(&["apply", "-f", "-"], ECHO)?;
    c.kube_until(&["get", "deployment", "echo", "-o", "jsonpath={.status.readyReplicas}"], minute, |o| o == "3")?;
    c.kube_until(&["get", "pod", "client", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Running")?;
    c.kube(&["expose", "deployment", "echo", "--port=80", "--target-port=8080"])?;
    let ip = c.kube(&["get", "service", "echo", "-o", "jsonpath={.spec.clusterIP}"])?;
    let pods: BTreeSet<String> = c
        .kube(&["get", "pods", "-l", "app=echo", "-o", "jsonpath={.items[*].metadata.name}"])?
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(pods.len(), 3);

    info!(%ip, "a pod asking the cluster IP again and again is answered by all three");
    let url = format!("{ip}:80");
    let answered = Instant::now();
    let mut first = answers_from_pod(&c, &url, 1)?;
    while !pods.contains(&first[0]) && answered.elapsed() < minute {
        first = answers_from_pod(&c, &url, 1)?;
    }
    info!(after = ?answered.elapsed(), ?first, "the service answers");
    // The Endpoints controller may list the replicas over more than one write.
    c.kube_until(&["get", "endpoints", "echo", "-o", "jsonpath={.subsets[*].addresses[*].ip}"], minute, |o| {
        o.split_whitespace().count() == 3
    })?;
    let mut answers = answers_from_pod(&c, &url, 30)?;
    for _ in 0..5 {
        if distinct(&answers).len() == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        answers = answers_from_pod(&c, &url, 30)?;
    }
    let seen = distinct(&answers);
    assert_eq!(seen.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(), pods, "{answers:?}");
    info!(spread = ?pods.iter().map(|p| answers.iter().filter(|a| *a == p).count()).collect::<Vec<_>>(), "30 requests");

    info!("the node's DNS names the Service: in full, and through the pod's search path");
    let resolved = c.kube(&["exec", "client", "--", "nslookup", "echo.default.svc.cluster.local"])?;
    assert!(resolved.contains(&ip), "{resolved}");
    for short in ["echo", "echo.default"] {
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {short} 80 | tail -n 1");
        let by_name = c.kube(&["exec", "client", "--", "sh", "-c", &script])?;
        assert!(pods.contains(by_name.trim()), "{short}: {by_name}");
    }
    let missing = c.kube_fails(&["exec", "client", "--", "nslookup", "nothing.default.svc.cluster.local"])?;
    info!(%missing, "an unknown name");
    let resolv = c.kube(&["exec", "client", "--", "cat", "/etc/resolv.conf"])?;
    assert!(resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"), "{resolv}");

    info!("the node reaches the cluster IP (from its namespace), the host its node port");
    let netns = node_netns(&c, "a1")?;
    let from_node = answers_from_node(&netns, &url, 10)?;
    assert!(from_node.iter().all(|a| pods.contains(a)), "{from_node:?}");
    c.kube(&["expose", "deployment", "echo", "--name=echo-np", "--type=NodePort", "--port=80", "--target-port=8080"])?;
    let node_port = c.kube(&["get", "service", "echo-np", "-o", "jsonpath={.spec.ports[0].nodePort}"])?;
    let node_ip =
        c.kube(&["get", "node", "a1", "-o", "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}"])?;
    let np_url = format!("{node_ip}:{node_port}");
    let deadline = Instant::now() + minute;
    let mut through_node_port = answers_from_host(&np_url, 1);
    while !pods.contains(&through_node_port[0]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        through_node_port = answers_from_host(&np_url, 1);
    }
    assert!(pods.contains(&through_node_port[0]), "{np_url}: {through_node_port:?}");

    info!("endpoints follow the pods: scaled to one, only that one answers");
    c.kube(&["scale", "deployment", "echo", "--replicas=1"])?;
    let scaled = Instant::now();
    c.kube_until(&["get", "endpoints", "echo", "-o", "jsonpath={.subsets[*].addresses[*].ip}"], minute, |o| {
        o.split_whitespace().count() == 1
    })?;
    let mut answers = answers_from_pod(&c, &url, 10)?;
    while distinct(&answers).len() > 1 && scaled.elapsed() < minute {
        answers = answers_from_pod(&c, &url, 10)?;
    }
    info!(after = ?scaled.elapsed(), "one endpoint left");
    assert_eq!(distinct(&answers).len(), 1, "{answers:?}");
    assert!(!answers.iter().any(|a| a == "FAILED"), "{answers:?}");

    info!("a Service without endpoints refuses at once; affinity keeps a client on one pod");
    c.kube_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: Service\nmetadata: {name: nothing}\nspec:\n  selector: {app: none}\n  ports: [{port: 80}]\n")?;
    let nothing = c.kube(&["get", "service", "nothing", "-o", "jsonpath={.spec.clusterIP}"])?;
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let refused =
        c.kube(&["exec", "client", "--", "sh", "-c", &format!("nc -w 5 {nothing} 80 </dev/null 2>&1; echo done")])?;
    assert!(refused.contains("refused") && started.elapsed() < Duration::from_secs(4), "{refused}");
    c.kube(&["scale", "deployment", "echo", "--replicas=3"])?;
    c.kube_until(&["get", "endpoints", "echo", "-o", "jsonpath={.subsets[*].addresses[*].ip}"], minute, |o| {
        o.split_whitespace().count() == 3
    })?;
    c.kube(&["patch", "service", "echo", "-p", r#"{"spec":{"sessionAffinity":"ClientIP"}}"#])?;
    std::thread::sleep(Duration::from_secs(2));
    let sticky = answers_from_pod(&c, &url, 15)?;
    assert_eq!(distinct(&sticky).len(), 1, "{sticky:?}");

    info!("kill -9 the leader: a change made through a survivor reaches the rules");
    let leader = c.leader()?;
    let index: usize = leader.name.trim_start_matches('s').parse::<usize>()? - 1;
    let other = c.api_url((index + 1) % 3);
    let via = ["--server", other.as_str()];
    c.kill(&leader.name)?;
    let killed = Instant::now();
    let scale: Vec<&str> = via.iter().copied().chain(["scale", "deployment", "echo", "--replicas=2"]).collect();
    let mut scaled = c.kube(&scale);
    while scaled.is_err() && killed.elapsed() < minute {
        std::thread::sleep(Duration::from_millis(200));
        scaled = c.kube(&scale);
    }
    scaled?;
    let unstick: Vec<&str> = via
        .iter()
        .copied()
        .chain(["patch", "service", "echo", "-p", r#"{"spec":{"sessionAffinity":"None"}}"#])
        .collect();
    c.kube(&unstick)?;
    let endpoints: Vec<&str> = via
        .iter()
        .copied()
        .chain(["get", "endpoints", "echo", "-o", "jsonpath={.subsets[*].addresses[*].ip}"])
        .collect();
    c.kube_until(&endpoints, minute, |o| o.split_whitespace().count() == 2)?;
    let mut answers = answers_from_pod_via(&c, &via, &url, 20)?;
    while distinct(&answers).len() != 2 && killed.elapsed() < minute {
        answers = answers_from_pod_via(&c, &via, &url, 20)?;
    }
    info!(after = ?killed.elapsed(), "two replicas answer, through the new leader's Endpoints");
    assert_eq!(distinct(&answers).len(), 2, "{answers:?}");
    assert!(!answers.iter().any(|a| a == "FAILED"), "{answers:?}");

    info!("corral down removes the node's namespace, and its rules with it");
    let tables =
        std::process::Command::new("ip").args(["netns", "exec", &netns, "nft", "list", "tables", "ip"]).output()?;
    assert!(String::from_utf8_lossy(&tables.stdout).contains("table ip cr"), "the agent's table is in its namespace");
    c.down()?;
    assert!(!std::path::Path::new(&format!("/run/netns/{netns}")).exists(), "{netns} left behind");
    Ok(())
}

/// The network namespace of a node of the cluster.
fn node_netns(c: &Cluster, node: &str) -> Result<String> {
    let raw = std::fs::read_to_string(c.state_dir().join("cluster.json"))?;
    let record: serde_json::Value = serde_json::from_str(&raw)?;
    let bridge = record["network"]["bridge"].as_str().context("the cluster's node network")?;
    Ok(format!("{bridge}-{node}"))
}

/// Who answered `n` requests to `addr` (ip:port) from a node's namespace.
fn answers_from_node(netns: &str, addr: &str, n: usize) -> Result<Vec<String>> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["busybox", "sh", "-c", &requests(addr, n)?])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

/// A busybox shell script making `n` HTTP requests to `addr` (ip:port), printing the last
/// line of each answer or FAILED. (nc: Debian's static busybox wget crashes.)
fn requests(addr: &str, n: usize) -> Result<String> {
    let (ip, port) = addr.split_once(':').context("ip:port")?;
    Ok(format!(
        "for i in $(seq {n}); do r=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port} 2>&1 | tail -n 1); \
         echo \"${{r:-FAILED}}\"; done"
    ))
}
