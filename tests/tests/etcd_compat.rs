//! One etcdctl script against Corral and against a 3-member Debian etcd 3.4 cluster: where
//! etcd's output is deterministic, Corral's must be the same.

use std::process::Command;

use anyhow::Result;
use corral_e2e::{Cluster, corral_bin, init_tracing, run};
use tracing::info;

/// Each step: etcdctl arguments and optional stdin.
fn script() -> Vec<(Vec<&'static str>, Option<&'static str>)> {
    let s = |args: &[&'static str]| (args.to_vec(), None);
    vec![
        s(&["put", "a", "1"]),
        s(&["put", "b", "2"]),
        s(&["put", "a", "3", "--prev-kv"]),
        s(&["put", "dir/x", "x"]),
        s(&["put", "dir/y", "y"]),
        s(&["get", "a"]),
        s(&["get", "a", "--rev=2"]),
        s(&["get", "a", "-w", "json"]),
        s(&["get", "dir/", "--prefix", "-w", "json"]),
        s(&["get", "", "--from-key", "--keys-only"]),
        s(&["get", "dir/", "--prefix", "--limit=1", "--print-value-only"]),
        s(&["get", "", "--from-key", "--sort-by=MODIFY", "--order=DESCEND"]),
        s(&["get", "", "--from-key", "--count-only", "-w", "json"]),
        s(&["get", "a", "b"]),
        s(&["del", "a", "--prev-kv"]),
        s(&["del", "nothing"]),
        (vec!["txn"], Some("value(\"b\") = \"2\"\n\nput b 20\nget b\n\nput b fail\n\n")),
        (vec!["txn", "-w", "json"], Some("version(\"b\") = \"1\"\n\nput c 1\n\nget b\n\n")),
        (vec!["txn"], Some("mod(\"dir/x\") < \"100\"\ncreate(\"nope\") = \"0\"\n\ndel dir/ --prefix\n\n\n")),
        s(&["get", "", "--from-key"]),
        s(&["watch", "b", "--rev=2"]),
        s(&["compaction", "5"]),
        s(&["get", "b", "--rev=3"]),
        s(&["get", "b", "--rev=99"]),
        s(&["put", "x", "v", "--lease=1234"]),
        s(&["put", "x", "--ignore-value"]),
        s(&["lease", "timetolive", "1234"]),
        s(&["lease", "revoke", "1234"]),
        s(&["member", "list", "-w", "json"]),
    ]
}

/// Runs the script; for each step its exit status and output, normalized where etcd's is not
/// deterministic (ids, terms, timings).
fn outputs(cluster_env: &[(String, String)]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (args, stdin) in script() {
        let mut cmd = Command::new("etcdctl");
        cmd.envs(cluster_env.iter().cloned());
        if args[0] == "watch" {
            // A watch never ends by itself: give it a moment, then read what it printed.
            let output = Command::new("timeout")
                .arg("2")
                .arg("etcdctl")
                .args(&args)
                .envs(cluster_env.iter().cloned())
                .output()?;
            out.push(normalize(&String::from_utf8_lossy(&output.stdout)));
            continue;
        }
        cmd.args(&args);
        let result = run(&mut cmd, stdin);
        out.push(match result {
            Ok(stdout) => normalize(&stdout),
            Err(e) => format!("ERROR {}", normalize(&error_line(&e.to_string()))),
        });
    }
    Ok(out)
}

/// The line of etcdctl's stderr that says what went wrong ("Error: ...").
fn error_line(err: &str) -> String {
    err.lines().find(|l| l.starts_with("Error:")).unwrap_or("").to_string()
}

fn normalize(text: &str) -> String {
    if let Ok(mut json) = serde_json::from_str::<serde_json::Value>(text) {
        scrub(&mut json);
        return json.to_string();
    }
    text.to_string()
}

/// Drops the fields that differ between any two clusters: ids, terms, names, URLs.
fn scrub(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for k in ["cluster_id", "member_id", "raft_term", "ID", "name", "peerURLs", "clientURLs"] {
                map.remove(k);
            }
            map.values_mut().for_each(scrub);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

#[test]
fn etcdctl_sees_the_same_as_with_etcd() -> Result<()> {
    init_tracing();
    info!("a Corral cluster and an etcd 3.4 cluster, both fresh");
    let corral = Cluster::up(3, 24300, &["--etcd-only"])?;
    let etcd_dir = tempfile::Builder::new().prefix("etcd-compat-").tempdir()?;
    let status = Command::new(corral_bin())
        .args(["bench", "etcd", "up", "--base-port", "24400", "--state-dir"])
        .arg(etcd_dir.path())
        .status()?;
    anyhow::ensure!(status.success(), "etcd did not start");
    let _etcd_down = EtcdDown(etcd_dir.path().to_path_buf());
    let etcd_env: Vec<(String, String)> = std::fs::read_to_string(etcd_dir.path().join("etcdctl.env"))?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

    info!("the same script against both");
    let ours = outputs(&corral.etcdctl_env()?)?;
    let theirs = outputs(&etcd_env)?;
    let mut differences = Vec::new();
    for ((step, ours), theirs) in script().iter().zip(&ours).zip(&theirs) {
        if ours != theirs {
            differences.push(format!("etcdctl {}:\n  corral: {ours:?}\n  etcd:   {theirs:?}", step.0.join(" ")));
        }
    }
    anyhow::ensure!(
        differences.is_empty(),
        "{} of {} steps differ:\n{}",
        differences.len(),
        ours.len(),
        differences.join("\n")
    );
    Ok(())
}

/// Takes the etcd cluster down when the test ends, pass or fail.
struct EtcdDown(std::path::PathBuf);

impl Drop for EtcdDown {
    fn drop(&mut self) {
        let _ = Command::new(corral_bin()).args(["bench", "etcd", "down", "--state-dir"]).arg(&self.0).status();
    }
}
