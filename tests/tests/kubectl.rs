//! The real kubectl against a 3-server cluster from `corral up`: discovery, apply, get in its
//! output formats, scale, label, patch, delete, watch, and Kubernetes' errors.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use corral_e2e::{Cluster, init_tracing, run, text};
use tracing::info;

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seed");

const CONFIGMAP: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  labels:
    app: myapp
data:
  mode: fast
";

#[test]
fn kubectl_works_against_a_three_server_cluster() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24900, &[])?;

    info!("discovery and health: every server answers, the system namespaces exist");
    assert_eq!(c.kube(&["get", "--raw", "/readyz"])?, "ok");
    let namespaces = c.kube(&["get", "namespaces"])?;
    assert!(namespaces.starts_with("NAME "), "{namespaces}");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(namespaces.lines().any(|l| l.starts_with(ns) && l.contains("Active")), "{ns}:\n{namespaces}");
    }
    let resources = c.kube(&["api-resources"])?;
    for line in ["deployments   ", "pods   ", "configmaps   "] {
        assert!(resources.contains(line), "{line}\n{resources}");
    }
    assert!(resources.lines().any(|l| l.starts_with("deployments") && l.contains("deploy") && l.contains("apps/v1")));

    info!("apply the seed deployment: created, then unchanged");
    let deployment = format!("{SEED}/deployment.yml");
    assert_eq!(c.kube(&["apply", "-f", &deployment])?, "deployment.apps/my-deployment created\n");
    assert_eq!(c.kube(&["apply", "-f", &deployment])?, "deployment.apps/my-deployment unchanged\n");
    let table = c.kube(&["get", "deployments"])?;
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"], "{table}");
    let wide = c.kube(&["get", "deploy", "-o", "wide"])?;
    assert!(wide.contains("nginx:latest") && wide.contains("app=myapp"), "{wide}");
    assert_eq!(c.kube(&["get", "deploy", "-o", "name"])?, "deployment.apps/my-deployment\n");
    let defaults = c.kube(&[
        "get",
        "deploy",
        "my-deployment",
        "-o",
        "jsonpath={.spec.strategy.rollingUpdate.maxSurge} {.spec.revisionHistoryLimit} {.metadata.generation}",
    ])?;
    assert_eq!(defaults, "25% 10 1", "Kubernetes' defaults are filled in");

    info!("a write through one server is read back at once through another");
    run(c.kubectl().arg(format!("--server={}", c.api_url(1))).args(["apply", "-f", "-"]), Some(CONFIGMAP))?;
    for i in 0..3 {
        let mode = c.kube_at(&c.api_url(i), &["get", "configmap", "settings", "-o", "jsonpath={.data.mode}"])?;
        assert_eq!(mode, "fast", "server {i}");
    }

    info!("scale, label, annotate and the three patch types");
    assert_eq!(
        c.kube(&["scale", "deployment", "my-deployment", "--replicas=5"])?,
        "deployment.apps/my-deployment scaled\n"
    );
    let generation =
        c.kube(&["get", "deploy", "my-deployment", "-o", "jsonpath={.spec.replicas} {.metadata.generation}"])?;
    assert_eq!(generation, "5 2");
    assert_eq!(c.kube(&["label", "configmap", "settings", "tier=back"])?, "configmap/settings labeled\n");
    assert_eq!(c.kube(&["annotate", "configmap", "settings", "note=hi"])?, "configmap/settings annotated\n");
    assert_eq!(c.kube(&["get", "cm", "-l", "tier=back,app in (myapp)", "-o", "name"])?, "configmap/settings\n");
    c.kube(&["patch", "configmap", "settings", "--type", "merge", "-p", r#"{"data":{"extra":"1"}}"#])?;
    c.kube(&["patch", "configmap", "settings", "--type", "json", "-p", r#"[{"op":"remove","path":"/data/mode"}]"#])?;
    c.kube(&[
        "patch",
        "deployment",
        "my-deployment",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"myapp-container","image":"nginx:1.27"}]}}}}"#,
    ])?;
    let images =
        c.kube(&["get", "deploy", "my-deployment", "-o", "jsonpath={.spec.template.spec.containers[*].image}"])?;
    assert_eq!(images, "nginx:1.27", "a strategic merge patch merges containers by name");
    assert_eq!(c.kube(&["get", "cm", "settings", "-o", "jsonpath={.data}"])?, r#"{"extra":"1"}"#);

    info!("watch: a change made while kubectl watches is printed");
    let watcher =
        c.kubectl().args(["get", "configmaps", "-w"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    run(c.kubectl().args(["apply", "-f", "-"]), Some(&CONFIGMAP.replace("settings", "watched")))?;
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(watcher.id() as i32, libc::SIGTERM) };
    let seen = text(&watcher.wait_with_output()?.stdout);
    assert!(seen.lines().next().is_some_and(|h| h.starts_with("NAME")), "{seen}");
    assert!(seen.lines().any(|l| l.starts_with("watched ")), "{seen}");

    info!("watches resume from a resourceVersion: recent ones from the watch cache, old ones from the store");
    let rv = c.kube(&["get", "cm", "watched", "-o", "jsonpath={.metadata.resourceVersion}"])?;
    c.kube(&["label", "cm", "watched", "step=two"])?;
    for from in [rv.as_str(), "1"] {
        let url = format!("/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1&resourceVersion={from}");
        let events = c.kube(&["get", "--raw", &url])?;
        let modified: Vec<serde_json::Value> = events
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|e: &serde_json::Value| e["type"] == "MODIFIED" && e["object"]["metadata"]["name"] == "watched")
            .collect();
        assert_eq!(modified.len(), 1, "from {from}: {events}");
        assert_eq!(modified[0]["object"]["metadata"]["labels"]["step"], "two");
    }

    info!("errors read as Kubernetes writes them, and nothing is stored");
    let missing = c.kube_fails(&["get", "pod", "nope"])?;
    assert_eq!(missing.trim(), r#"Error from server (NotFound): pods "nope" not found"#);
    let bad_name = CONFIGMAP.replace("name: settings", "name: Bad_Name");
    let out = c.kubectl().args(["apply", "-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let invalid = {
        use std::io::Write;
        let mut out = out;
        out.stdin.take().expect("piped").write_all(bad_name.as_bytes())?;
        text(&out.wait_with_output()?.stderr)
    };
    assert!(
        invalid.contains(r#"ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name""#),
        "{invalid}"
    );
    let stale = c.kube_fails(&["create", "-f", &deployment])?;
    assert!(
        stale.starts_with("Error from server (AlreadyExists)")
            && stale.contains(r#"deployments.apps "my-deployment" already exists"#),
        "{stale}"
    );
    assert_eq!(c.kube(&["get", "pods", "-n", "nowhere", "-o", "name"])?, "", "an absent namespace lists empty");
    let bad = |manifest: &str, args: &[&str]| -> Result<String> {
        let out = run(c.kubectl().args(args), Some(manifest));
        Ok(out.expect_err("bad input is refused").to_string())
    };
    let cm = |extra: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n{extra}");
    let err = bad(&cm(" data: [\n"), &["apply", "-f", "-"])?;
    assert!(err.contains("error converting YAML to JSON"), "malformed YAML: {err}");
    let err = bad(&cm("bogus: 1\n"), &["apply", "-f", "-"])?;
    assert!(err.contains(r#"ConfigMap in version "v1" cannot be handled as a ConfigMap: strict decoding error: unknown field "bogus""#), "{err}");
    let err = bad(&cm("").replace("kind: ConfigMap", "kind: Gizmo"), &["apply", "-f", "-"])?;
    assert!(err.contains(r#"no matches for kind "Gizmo" in version "v1""#), "unknown kind: {err}");
    let raw = ["create", "--raw", "/api/v1/namespaces/default/configmaps", "-f", "-"];
    let err = bad(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"bad""#, &raw)?;
    assert!(err.contains("could not be decoded as JSON"), "malformed JSON: {err}");
    let err = bad(r#"{"apiVersion":"apps/v1","kind":"ConfigMap","metadata":{"name":"bad"}}"#, &raw)?;
    assert!(err.contains("does not match the expected API version (v1)"), "wrong apiVersion: {err}");
    let err = bad(&format!("{}data:\n  a: {}\n", cm(""), "x".repeat(1_600_000)), &["create", "-f", "-"])?;
    assert!(err.contains("RequestEntityTooLarge") && err.contains("objects are limited to 1572864 bytes"), "{err}");
    let err = bad(&format!("{}data:\n  a: {}\n", cm(""), "x".repeat(3_200_000)), &["create", "-f", "-"])?;
    assert!(err.contains("Request entity too large: limit is 3145728"), "{err}");
    c.kube(&["create", "configmap", "versioned", "--from-literal=a=b"])?;
    let old = c.kube(&["get", "cm", "versioned", "-o", "yaml"])?;
    c.kube(&["label", "cm", "versioned", "x=y"])?;
    let err = bad(&old, &["replace", "-f", "-"])?;
    assert!(
        err.contains(r#"Operation cannot be fulfilled on configmaps "versioned": the object has been modified"#),
        "{err}"
    );
    assert!(c.kube_fails(&["get", "cm", "bad"])?.contains("NotFound"), "nothing bad was stored");
    c.kube(&["delete", "cm", "versioned"])?;

    info!("describe, sorting, custom columns, labels and explain print as they do against Kubernetes");
    let described = c.kube(&["describe", "deployment", "my-deployment"])?;
    let field = |name: &str| described.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default();
    assert_eq!(field("Name:"), "my-deployment", "{described}");
    // No agents here: the controllers make the pods, none becomes available.
    let replicas = field("Replicas:");
    assert!(replicas.starts_with("5 desired |") && replicas.ends_with("| 0 available | 5 unavailable"), "{replicas}");
    assert_eq!(field("StrategyType:"), "RollingUpdate");
    for (name, rank) in [("z-first", "1"), ("a-second", "2")] {
        c.kube(&["create", "configmap", name, &format!("--from-literal=rank={rank}")])?;
        c.kube(&["label", "configmap", name, "group=ranked"])?;
    }
    let columns = "custom-columns=NAME:.metadata.name,RANK:.data.rank";
    let sorted = c.kube(&["get", "cm", "-l", "group=ranked", "--sort-by=.data.rank", "-o", columns])?;
    assert_eq!(sorted, "NAME       RANK\nz-first    1\na-second   2\n");
    let labelled = c.kube(&["get", "cm", "settings", "--show-labels"])?;
    assert!(labelled.lines().nth(1).is_some_and(|l| l.ends_with("app=myapp,tier=back")), "{labelled}");
    let everywhere = c.kube(&["get", "cm", "-A"])?;
    assert!(everywhere.starts_with("NAMESPACE ") && everywhere.contains("z-first"), "{everywhere}");
    assert!(c.kube(&["get", "cm", "z-first", "-o", "yaml"])?.contains("kind: ConfigMap\n"));
    let explained = c.kube(&["explain", "pod.spec.containers"])?;
    assert!(
        explained.contains("FIELD: containers <[]Container>") && explained.contains("image\t<string>"),
        "{explained}"
    );
    assert_eq!(
        c.kube(&["delete", "cm", "-l", "group=ranked"])?,
        "configmap \"a-second\" deleted\nconfigmap \"z-first\" deleted\n"
    );
    c.kube(&["create", "namespace", "scratch"])?;
    for name in ["one", "two"] {
        c.kube(&["create", "configmap", name, "-n", "scratch"])?;
    }
    assert_eq!(
        c.kube(&["delete", "cm", "--all", "-n", "scratch"])?,
        "configmap \"one\" deleted\nconfigmap \"two\" deleted\n"
    );

    info!("delete by name and by file; the objects are gone");
    assert_eq!(
        c.kube(&["delete", "configmap", "settings", "watched"])?,
        "configmap \"settings\" deleted\nconfigmap \"watched\" deleted\n"
    );
    assert_eq!(c.kube(&["delete", "-f", &deployment])?, "deployment.apps \"my-deployment\" deleted\n");
    assert_eq!(text(&c.kubectl().args(["get", "deploy,cm", "-o", "name"]).output()?.stdout), "");
    Ok(())
}

const SSA: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: ssa
spec:
  replicas: 2
  selector: {matchLabels: {app: ssa}}
  template:
    metadata: {labels: {app: ssa}}
    spec:
      containers:
      - name: web
        image: nginx:1.25
";

#[test]
fn typed_clients_and_server_side_apply() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24930, &[])?;

    info!("kubectl create sends protobuf: every kind it creates that way is decoded");
    assert_eq!(c.kube(&["create", "namespace", "team-a"])?, "namespace/team-a created\n");
    assert_eq!(
        c.kube(&["create", "configmap", "conf", "-n", "team-a", "--from-literal=mode=fast"])?,
        "configmap/conf created\n"
    );
    assert_eq!(
        c.kube(&["create", "secret", "generic", "creds", "--from-literal=user=admin"])?,
        "secret/creds created\n"
    );
    assert_eq!(
        c.kube(&["create", "deployment", "web", "--image=nginx:1.25", "--replicas=0", "--port=80"])?,
        "deployment.apps/web created\n"
    );
    assert_eq!(c.kube(&["get", "cm", "conf", "-n", "team-a", "-o", "jsonpath={.data.mode}"])?, "fast");
    assert_eq!(c.kube(&["get", "secret", "creds", "-o", "jsonpath={.data.user}"])?, "YWRtaW4=");
    let web = c.kube(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].ports[0].containerPort}",
    ])?;
    assert_eq!(web, "0 80", "an explicit zero survives the protobuf decoding");
    let manager = c.kube(&[
        "get",
        "deploy",
        "web",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[0].manager}",
    ])?;
    assert_eq!(manager, "kubectl-create");

    info!("Services get a cluster IP and node ports from their ranges, each address once");
    assert_eq!(c.kube(&["get", "svc", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"])?, "10.96.0.1");
    assert_eq!(c.kube(&["create", "service", "nodeport", "web", "--tcp=80:8080"])?, "service/web created\n");
    let addr = c.kube(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP} {.spec.ports[0].nodePort}"])?;
    let (ip, port) = addr.split_once(' ').expect("an address and a port");
    let ip: std::net::Ipv4Addr = ip.parse()?;
    assert!(ip.octets()[0] == 10 && (96..112).contains(&ip.octets()[1]), "{ip} is in 10.96.0.0/12");
    assert!((30000..=32767).contains(&port.parse::<u32>()?), "{port} is a node port");
    let taken = c.kube_fails(&["create", "service", "clusterip", "again", "--tcp=80", &format!("--clusterip={ip}")])?;
    assert!(taken.contains("provided IP is already allocated"), "{taken}");
    c.kube(&["delete", "service", "web"])?;
    c.kube(&["create", "service", "clusterip", "again", "--tcp=80", &format!("--clusterip={ip}")])?;

    info!("server-side apply creates, owns its fields and reports another manager's as a conflict");
    assert_eq!(
        run(c.kubectl().args(["apply", "--server-side", "-f", "-"]), Some(SSA))?,
        "deployment.apps/ssa serverside-applied\n"
    );
    c.kube(&["scale", "deployment", "ssa", "--replicas=4"])?;
    let changed = SSA.replace("replicas: 2", "replicas: 3");
    let conflict = run(c.kubectl().args(["apply", "--server-side", "-f", "-"]), Some(&changed))
        .expect_err("another manager's field is a conflict")
        .to_string();
    let expected = r#"Apply failed with 1 conflict: conflict with "kubectl" with subresource "scale" using apps/v1: .spec.replicas"#;
    assert!(conflict.contains(expected), "{conflict}");
    assert_eq!(c.kube(&["get", "deploy", "ssa", "-o", "jsonpath={.spec.replicas}"])?, "4", "nothing applied");
    run(c.kubectl().args(["apply", "--server-side", "--force-conflicts", "-f", "-"]), Some(&changed))?;
    assert_eq!(c.kube(&["get", "deploy", "ssa", "-o", "jsonpath={.spec.replicas}"])?, "3");

    info!("binding assigns a pod once; eviction honours a disruption budget");
    c.kube(&["apply", "-f", &format!("{SEED}/pod1.yml")])?;
    let binding =
        r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"pod1"},"target":{"kind":"Node","name":"n1"}}"#;
    let bind = ["create", "--raw", "/api/v1/namespaces/default/pods/pod1/binding", "-f", "-"];
    run(c.kubectl().args(bind), Some(binding))?;
    assert_eq!(c.kube(&["get", "pod", "pod1", "-o", "jsonpath={.spec.nodeName}"])?, "n1");
    let again = run(c.kubectl().args(bind), Some(&binding.replace("n1", "n2"))).expect_err("bound once").to_string();
    assert!(again.contains("already assigned to node"), "{again}");
    c.kube(&["label", "pod", "pod1", "app=evictme"])?;
    c.kube(&["create", "pdb", "keep", "--selector=app=evictme", "--min-available=1"])?;
    let evict = ["create", "--raw", "/api/v1/namespaces/default/pods/pod1/eviction", "-f", "-"];
    let eviction = r#"{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"pod1"}}"#;
    let refused = run(c.kubectl().args(evict), Some(eviction)).expect_err("the budget allows none").to_string();
    assert!(refused.contains("would violate the pod's disruption budget"), "{refused}");
    c.kube(&["delete", "pdb", "keep"])?;
    run(c.kubectl().args(evict), Some(eviction))?;

    info!("a pod on a node terminates gracefully: marked with its grace period until its node (or a force) ends it");
    let marked = c.kube(&["get", "pod", "pod1", "-o", "jsonpath={.metadata.deletionGracePeriodSeconds}"])?;
    assert_eq!(marked, "30", "evicted with the default grace period");
    assert!(c.kube(&["get", "pod", "pod1"])?.contains("Terminating"));
    let forced = c.kube(&["delete", "pod", "pod1", "--grace-period=0", "--force"])?;
    assert!(forced.contains(r#"pod "pod1" force deleted"#), "{forced}");
    assert!(c.kube_fails(&["get", "pod", "pod1"])?.contains("NotFound"), "gone");

    info!("a finalizer holds a deleted object until an update removes it");
    c.kube(&["create", "configmap", "held", "--from-literal=a=b"])?;
    c.kube(&["patch", "cm", "held", "--type", "merge", "-p", r#"{"metadata":{"finalizers":["example.com/hold"]}}"#])?;
    assert_eq!(c.kube(&["delete", "cm", "held", "--wait=false"])?, "configmap \"held\" deleted\n");
    assert!(!c.kube(&["get", "cm", "held", "-o", "jsonpath={.metadata.deletionTimestamp}"])?.is_empty());
    c.kube(&["patch", "cm", "held", "--type", "json", "-p", r#"[{"op":"remove","path":"/metadata/finalizers"}]"#])?;
    assert!(c.kube_fails(&["get", "cm", "held"])?.contains("NotFound"), "released and gone");

    info!("the oldest and newest kubectl we support: apply, get, delete");
    for version in ["1.27", "1.33"] {
        let binary = format!("/usr/lib/google-cloud-sdk/bin/kubectl.{version}");
        let k = |args: &[&str]| run(c.kubectl_version(&binary).args(args), None);
        let file = format!("{SEED}/deployment.yml");
        assert_eq!(k(&["apply", "-f", &file])?, "deployment.apps/my-deployment created\n", "kubectl {version}");
        assert!(k(&["get", "deploy", "my-deployment"])?.starts_with("NAME "), "kubectl {version}");
        let created =
            k(&["create", "configmap", &format!("smoke-{}", version.replace('.', "-")), "--from-literal=a=b"])?;
        assert!(created.ends_with("created\n"), "kubectl {version}: {created}");
        assert_eq!(k(&["delete", "-f", &file])?, "deployment.apps \"my-deployment\" deleted\n", "kubectl {version}");
    }

    info!("a field left out of the applied configuration is removed");
    let with_env = changed.replace("image: nginx:1.25", "image: nginx:1.25\n        env: [{name: A, value: '1'}]");
    run(c.kubectl().args(["apply", "--server-side", "-f", "-"]), Some(&with_env))?;
    let env = "jsonpath={.spec.template.spec.containers[0].env[*].name}";
    assert_eq!(c.kube(&["get", "deploy", "ssa", "-o", env])?, "A");
    run(c.kubectl().args(["apply", "--server-side", "-f", "-"]), Some(&changed))?;
    assert_eq!(c.kube(&["get", "deploy", "ssa", "-o", env])?, "");
    Ok(())
}
