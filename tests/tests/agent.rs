//! Agents through the servers, with the real kubectl and containerd: `corral up --agents 1`
//! brings a node Ready; pods bound to it run; logs, exec (WebSocket v5 and SPDY), attach and
//! port-forward reach them; deletion honours the grace period; a killed
//! agent comes back and adopts its pods without restarting them; an agent whose server is
//! killed fails over to another and keeps reporting.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use corral_e2e::{Cluster, init_tracing};
use tracing::info;

const BASE_PORT: u16 = 25200;

fn pod(name: &str, grace: u32, command: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: a1
  terminationGracePeriodSeconds: {grace}
  containers:
  - name: main
    image: busybox
    command: [\"sh\", \"-c\", {command:?}]
"
    )
}

/// Polls kubectl (against `server`) until `done` holds for its output.
fn wait_for(
    c: &Cluster,
    server: &str,
    args: &[&str],
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < timeout {
        match c.kube_at(server, args) {
            Ok(out) if done(&out) => return Ok(out),
            Ok(out) => last = out,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("kubectl {args:?} did not get there in {timeout:?}; last: {last}\n{}", c.logs())
}

/// Runs a command that does not end by itself (`logs -f`) for `d`; returns its output.
fn run_for(cmd: &mut std::process::Command, d: Duration) -> Result<String> {
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn()?;
    std::thread::sleep(d);
    child.kill()?;
    Ok(String::from_utf8_lossy(&child.wait_with_output()?.stdout).into_owned())
}

/// GET / on a local port, the whole answer.
fn http_get(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The server the agent's pod watch last (re)started on, from its log.
fn connected_server(c: &Cluster) -> Option<String> {
    let log = c.agent_log("a1");
    let line = log.lines().rev().find(|l| l.contains("pod watch") && l.contains("server="))?;
    Some(line.split("server=").nth(1)?.split_whitespace().next()?.to_string())
}

#[test]
fn an_agent_runs_pods_survives_its_own_death_and_fails_over() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, BASE_PORT, &["--agents", "1", "--dedicated-servers", "--cluster-cidr", "10.251.0.0/16"])?;
    let s1 = c.api_url(0);

    info!("the node registered itself Ready, with its runtime, capacity and a Lease");
    let nodes = c.kube(&["get", "nodes"])?;
    assert!(nodes.lines().any(|l| l.starts_with("a1 ") && l.contains(" Ready ")), "{nodes}");
    let info = c.kube(&[
        "get",
        "node",
        "a1",
        "-o",
        "jsonpath={.status.nodeInfo.containerRuntimeVersion} {.status.capacity.pods} {.status.addresses[0].type}",
    ])?;
    assert!(info.starts_with("containerd://") && info.ends_with(" 110 InternalIP"), "{info}");
    assert_eq!(
        c.kube(&["get", "lease", "-n", "kube-node-lease", "a1", "-o", "jsonpath={.spec.holderIdentity}"])?,
        "a1"
    );

    info!("the node got the first /24 of the cluster CIDR from the servers' node IPAM");
    assert_eq!(
        c.kube(&["get", "node", "a1", "-o", "jsonpath={.spec.podCIDR} {.spec.podCIDRs}"])?,
        r#"10.251.0.0/24 ["10.251.0.0/24"]"#
    );

    info!("a busybox pod bound to the node runs, with an IP from the node's pod CIDR");
    c.kube_stdin(&["apply", "-f", "-"], &pod("ticker", 30, "trap 'exit 0' TERM; while true; do sleep 1; done"))?;
    let running = wait_for(
        &c,
        &s1,
        &["get", "pod", "ticker", "-o", "jsonpath={.status.phase} {.status.podIP}"],
        Duration::from_secs(60),
        |o| o.starts_with("Running 10.251.0."),
    )?;
    info!(%running, "running");
    let first_id = c.kube(&["get", "pod", "ticker", "-o", "jsonpath={.status.containerStatuses[0].containerID}"])?;
    assert!(first_id.starts_with("containerd://"), "{first_id}");

    info!("kubectl logs (--tail, --timestamps, -f) and exec (plain, stdin, exit codes) reach the container");
    c.kube_stdin(
        &["apply", "-f", "-"],
        &pod("talker", 1, "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.2; done"),
    )?;
    // Until a second line exists, `--tail 2` could only show one.
    wait_for(&c, &s1, &["logs", "talker", "--tail", "1"], Duration::from_secs(60), |o| {
        o.starts_with("line ") && !o.starts_with("line 0")
    })?;
    let two = c.kube(&["logs", "talker", "--tail", "2"])?;
    assert_eq!(two.lines().count(), 2, "{two}");
    let stamped = c.kube(&["logs", "talker", "--tail", "1", "--timestamps"])?;
    assert!(stamped.starts_with("20") && stamped.contains("Z line "), "{stamped}");
    let followed = run_for(c.kubectl().args(["logs", "-f", "talker", "--tail", "1"]), Duration::from_secs(2))?;
    assert!(followed.lines().count() >= 3, "following shows new lines as they come:\n{followed}");
    // Through another server than the one the agent reports to: every server reaches it.
    for i in 0..3 {
        assert_eq!(c.kube_at(&c.api_url(i), &["exec", "talker", "--", "echo", "hi"])?, "hi\n", "through server {i}");
    }
    assert_eq!(c.kube_stdin(&["exec", "-i", "talker", "--", "cat"], "piped\n")?, "piped\n");
    let failed = c.kube_fails(&["exec", "talker", "--", "sh", "-c", "exit 3"])?;
    assert!(failed.contains("exit code 3"), "{failed}");
    let verbose = c.kubectl().args(["exec", "talker", "-v=7", "--", "true"]).output()?;
    let verbose = String::from_utf8_lossy(&verbose.stderr);
    assert!(
        verbose.contains("The subprotocol is v5.channel.k8s.io"),
        "kubectl 1.33 execs over WebSocket v5:\n{verbose}"
    );
    let old = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27";
    let spdy = c.kubectl_version(old).args(["exec", "talker", "--", "echo", "over SPDY"]).output()?;
    assert_eq!(String::from_utf8_lossy(&spdy.stdout), "over SPDY\n", "kubectl 1.27 execs over SPDY");
    let attached = run_for(c.kubectl().args(["attach", "talker"]), Duration::from_secs(2))?;
    assert!(attached.contains("line "), "attach shows the container's output as it comes:\n{attached}");

    info!("kubectl port-forward reaches a port of the pod");
    c.kube_stdin(
        &["apply", "-f", "-"],
        &pod("web", 1, "mkdir /www; echo served > /www/index.html; httpd -f -p 8080 -h /www"),
    )?;
    wait_for(&c, &s1, &["get", "pod", "web", "-o", "jsonpath={.status.phase}"], Duration::from_secs(60), |o| {
        o == "Running"
    })?;
    let local = BASE_PORT + 90;
    let mut forward = c
        .kubectl()
        .args(["port-forward", "pod/web", &format!("{local}:8080")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let answer = (0..50).find_map(|_| {
        std::thread::sleep(Duration::from_millis(200));
        http_get(local).ok().filter(|a| a.contains("served"))
    });
    forward.kill()?;
    let _ = forward.wait();
    let answer = answer.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.") && answer.ends_with("served\n"), "{answer}");

    info!("deletion honours the grace period: a container ignoring SIGTERM is killed after it");
    c.kube_stdin(&["apply", "-f", "-"], &pod("stubborn", 3, "trap '' TERM; while true; do sleep 1; done"))?;
    wait_for(&c, &s1, &["get", "pod", "stubborn", "-o", "jsonpath={.status.phase}"], Duration::from_secs(60), |o| {
        o == "Running"
    })?;
    let started = Instant::now();
    c.kube(&["delete", "pod", "stubborn", "--wait=false"])?;
    let terminating = c.kube(&["get", "pod", "stubborn", "-o", "jsonpath={.metadata.deletionGracePeriodSeconds}"])?;
    assert_eq!(terminating, "3", "marked for deletion, not gone");
    wait_for(&c, &s1, &["get", "pods", "-o", "name"], Duration::from_secs(30), |o| !o.contains("stubborn"))?;
    let took = started.elapsed();
    info!(?took, "the stubborn pod is gone");
    assert!(took >= Duration::from_secs(3), "removed before its grace period ended: {took:?}");

    info!("kill -9 the agent: the pod keeps running; the restarted agent adopts it, restarting nothing");
    let agent = c.agent_pid("a1")?;
    // SAFETY: the pid is the agent `corral up` started for this test's cluster.
    unsafe { libc::kill(agent as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_secs(2));
    c.up_again(3, &["--agents", "1", "--dedicated-servers", "--cluster-cidr", "10.251.0.0/16"])?;
    assert_ne!(c.agent_pid("a1")?, agent, "a new agent");
    std::thread::sleep(Duration::from_secs(3));
    let after = c.kube(&[
        "get",
        "pod",
        "ticker",
        "-o",
        "jsonpath={.status.containerStatuses[0].containerID} {.status.containerStatuses[0].restartCount}",
    ])?;
    assert_eq!(after, format!("{first_id} 0"), "the same container, never restarted");

    info!("kill the server the agent is connected to: it resumes on another and keeps reporting");
    let server = connected_server(&c).expect("the agent logged its server");
    let port: u16 = server.rsplit(':').next().unwrap_or_default().parse()?;
    let index = ((port - BASE_PORT - 2) / 10) as usize;
    let victim = format!("s{}", index + 1);
    c.kill(&victim)?;
    let other = c.api_url((index + 1) % 3);
    let killed_at = Instant::now();
    c.kube_stdin(&["--server", &other, "apply", "-f", "-"], &pod("after-failover", 1, "sleep 3600")).or_else(|_| {
        std::thread::sleep(Duration::from_secs(2));
        c.kube_stdin(&["--server", &other, "apply", "-f", "-"], &pod("after-failover", 1, "sleep 3600"))
    })?;
    wait_for(
        &c,
        &other,
        &["get", "pod", "after-failover", "-o", "jsonpath={.status.phase}"],
        Duration::from_secs(60),
        |o| o == "Running",
    )?;
    info!(took = ?killed_at.elapsed(), "a pod created after the kill runs and is reported");
    let resumed = c.agent_log("a1");
    let line = resumed.lines().rev().find(|l| l.contains("pod watch resumed")).unwrap_or_default();
    assert!(line.contains("after_ms="), "the agent resumed its pod watch:\n{resumed}");
    assert_ne!(connected_server(&c).as_deref(), Some(server.as_str()), "now on another server");
    info!(%line, "failover");
    Ok(())
}

const FAILING_PORT: u16 = 25300;

/// Pods that fail in the ways kubelet reports, and probes that act on containers.
const FAILING: &str = "
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  nodeName: a1
  restartPolicy: Never
  containers:
  - {name: hog, image: busybox, command: [sh, -c, 'tail /dev/zero'], resources: {limits: {memory: 32Mi}}}
---
apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  nodeName: a1
  containers:
  - {name: main, image: busybox, command: [sh, -c, 'exit 1']}
---
apiVersion: v1
kind: Pod
metadata: {name: lively}
spec:
  nodeName: a1
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: [sh, -c, 'touch /tmp/healthy; sleep 3; rm /tmp/healthy; sleep 600']
    livenessProbe: {exec: {command: [cat, /tmp/healthy]}, periodSeconds: 1, failureThreshold: 2}
---
apiVersion: v1
kind: Pod
metadata: {name: gated}
spec:
  nodeName: a1
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: [sh, -c, 'mkdir /www; httpd -p 8080 -h /www; sleep 600']
    startupProbe: {tcpSocket: {port: web}, periodSeconds: 1, failureThreshold: 30}
    readinessProbe: {httpGet: {port: web, path: /ready}, periodSeconds: 1}
    ports: [{name: web, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: no-image}
spec:
  nodeName: a1
  containers:
  - {name: main, image: 'registry.invalid/app:1.0'}
---
apiVersion: v1
kind: Pod
metadata: {name: no-config}
spec:
  nodeName: a1
  containers:
  - {name: main, image: busybox, envFrom: [{configMapRef: {name: missing}}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-path}
spec:
  nodeName: a1
  volumes: [{name: data, hostPath: {path: /nonexistent/corral-test, type: Directory}}]
  containers:
  - {name: main, image: busybox, volumeMounts: [{name: data, mountPath: /data}]}
";

fn events_of(c: &Cluster, pod: &str) -> Result<String> {
    c.kube(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={pod}"),
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    ])
}

#[test]
fn failing_pods_are_reported_as_kubelet_does_and_probes_act() -> Result<()> {
    init_tracing();
    let c = Cluster::up(1, FAILING_PORT, &["--agents", "1", "--dedicated-servers", "--cluster-cidr", "10.250.0.0/16"])?;
    let s1 = c.api_url(0);
    let agent = c.agent_pid("a1")?;
    c.kube_stdin(&["apply", "-f", "-"], FAILING)?;
    let field = |pod: &str, path: &str| c.kube(&["get", "pod", pod, "-o", &format!("jsonpath={path}")]);
    let minute = Duration::from_secs(60);

    info!("a container over its memory limit is OOM-killed and shown OOMKilled");
    let oom =
        ["get", "pod", "hog", "-o", "jsonpath={.status.phase} {.status.containerStatuses[0].state.terminated.reason}"];
    wait_for(&c, &s1, &oom, minute, |o| o == "Failed OOMKilled")?;

    info!("a missing image, a missing ConfigMap and an invalid hostPath wait with kubelet's reasons");
    let waiting = "jsonpath={.status.containerStatuses[0].state.waiting.reason}: \
                   {.status.containerStatuses[0].state.waiting.message}";
    let no_config = ["get", "pod", "no-config", "-o", waiting];
    wait_for(&c, &s1, &no_config, minute, |o| o == "CreateContainerConfigError: configmap \"missing\" not found")?;
    let bad_path = ["get", "pod", "bad-path", "-o", waiting];
    let out =
        wait_for(&c, &s1, &bad_path, minute, |o| o.starts_with("CreateContainerConfigError: hostPath type check"))?;
    assert!(out.contains("/nonexistent/corral-test"), "{out}");
    let no_image = ["get", "pod", "no-image", "-o", waiting];
    wait_for(&c, &s1, &no_image, minute, |o| o.starts_with("ErrImagePull: "))?;
    let out = wait_for(&c, &s1, &no_image, minute, |o| o.starts_with("ImagePullBackOff: "))?;
    assert!(out.contains("registry.invalid/app:1.0"), "{out}");
    let events = events_of(&c, "no-image")?;
    assert!(events.contains("Failed: Failed to pull image \"registry.invalid/app:1.0\""), "{events}");
    assert!(events.contains("BackOff: Back-off pulling image"), "{events}");
    let events = events_of(&c, "no-config")?;
    assert!(events.contains("Failed: Error: configmap \"missing\" not found"), "{events}");

    info!("a failing liveness probe restarts its container; the event says why");
    let lively = ["get", "pod", "lively", "-o", "jsonpath={.status.containerStatuses[0].restartCount}"];
    wait_for(&c, &s1, &lively, minute, |o| o.parse::<u32>().unwrap_or(0) >= 1)?;
    let events = events_of(&c, "lively")?;
    assert!(events.contains("Unhealthy: Liveness probe failed: cat: can't open '/tmp/healthy'"), "{events}");
    assert!(events.contains("Killing: Container main failed liveness probe, will be restarted"), "{events}");

    info!("readiness gates Ready: the startup probe passes, then Ready follows the readiness probe");
    let gated = [
        "get",
        "pod",
        "gated",
        "-o",
        "jsonpath={.status.containerStatuses[0].started} {.status.conditions[?(@.type==\"Ready\")].status}",
    ];
    wait_for(&c, &s1, &gated, minute, |o| o == "true False")?;
    c.kube(&["exec", "gated", "--", "touch", "/www/ready"])?;
    wait_for(&c, &s1, &gated, Duration::from_secs(10), |o| o == "true True")?;
    c.kube(&["exec", "gated", "--", "rm", "/www/ready"])?;
    wait_for(&c, &s1, &gated, Duration::from_secs(10), |o| o == "true False")?;
    assert_eq!(field("gated", "{.status.containerStatuses[0].restartCount}")?, "0", "readiness never restarts");

    info!("a crashing container goes to CrashLoopBackOff with growing delays");
    let crasher = ["get", "pod", "crasher", "-o", "jsonpath={.status.containerStatuses[0].state.waiting.message}"];
    let back_off = |o: &str| -> Option<u64> {
        let delay = o.strip_prefix("back-off ")?.split(' ').next()?;
        let (m, s) = delay.trim_end_matches('s').split_once('m').unwrap_or(("0", delay.trim_end_matches('s')));
        Some(m.parse::<u64>().ok()? * 60 + s.parse::<u64>().ok()?)
    };
    let first = wait_for(&c, &s1, &crasher, minute, |o| back_off(o).is_some())?;
    assert!(first.contains("restarting failed container=main pod=crasher_default("), "{first}");
    let before = back_off(&first).unwrap_or_default();
    let later =
        wait_for(&c, &s1, &crasher, Duration::from_secs(before + 30), |o| back_off(o).is_some_and(|d| d > before))?;
    assert_eq!(back_off(&later), Some(before * 2), "the delay doubles: {first} then {later}");
    let table = c.kube(&["get", "pod", "crasher"])?;
    assert!(table.contains("CrashLoopBackOff"), "{table}");
    assert!(events_of(&c, "crasher")?.contains("BackOff: Back-off restarting failed container main"));

    assert_eq!(c.agent_pid("a1")?, agent, "the agent never crashed");
    Ok(())
}
