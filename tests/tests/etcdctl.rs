//! Debian's etcdctl 3.4 against a 3-server cluster from `corral up --etcd-only` (no
//! Kubernetes objects in the store, so revisions start where a fresh etcd's do): every command
//! an operator reaches for, with the output etcd gives.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use corral_e2e::{Cluster, init_tracing, run, text};
use tracing::info;

/// Runs `etcdctl watch ARGS` for `secs` seconds and returns what it printed.
fn watch_for(cluster: &Cluster, args: &[&str], secs: u64) -> Result<String> {
    let child = cluster.etcdctl().arg("watch").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_secs(secs));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output()?;
    Ok(text(&out.stdout) + &text(&out.stderr))
}

#[test]
fn etcdctl_works_against_a_three_server_cluster() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24100, &["--etcd-only"])?;

    info!("members and endpoints: three started voters, one leader, all healthy");
    let members = c.ctl(&["member", "list"])?;
    assert_eq!(members.lines().count(), 3, "{members}");
    assert!(members.lines().all(|l| l.contains(", started, s") && l.ends_with(", false")), "{members}");
    let status = c.ctl(&["endpoint", "status", "--cluster", "-w", "table"])?;
    assert_eq!(status.matches(" true |").count(), 1, "exactly one leader:\n{status}");
    let health = c.ctl_combined(&["endpoint", "health", "--cluster"])?;
    assert_eq!(health.matches("is healthy").count(), 3, "{health}");

    info!("put and get: prefix, revision, limit, keys-only, value-only, json");
    assert_eq!(c.ctl(&["put", "k/a", "1"])?, "OK\n");
    c.ctl(&["put", "k/b", "2"])?;
    c.ctl(&["put", "k/c", "3"])?;
    c.ctl(&["put", "k/a", "10"])?;
    assert_eq!(c.ctl(&["get", "k/", "--prefix"])?, "k/a\n10\nk/b\n2\nk/c\n3\n");
    assert_eq!(c.ctl(&["get", "k/a", "--rev=2"])?, "k/a\n1\n", "a fresh cluster's first write is revision 2");
    assert_eq!(c.ctl(&["get", "k/", "--prefix", "--limit=2", "--keys-only"])?, "k/a\n\nk/b\n\n");
    assert_eq!(c.ctl(&["get", "k/b", "--print-value-only"])?, "2\n");
    let json: serde_json::Value =
        serde_json::from_str(&c.ctl(&["get", "k/", "--prefix", "--limit=1", "-w", "json"])?)?;
    assert_eq!(json["count"], 3);
    assert_eq!(json["more"], true);
    assert_eq!(json["kvs"][0]["version"], 2);
    assert_eq!(json["kvs"][0]["create_revision"], 2);
    assert_eq!(json["kvs"][0]["mod_revision"], 5);

    info!("del: one key with its previous value, then a prefix");
    assert_eq!(c.ctl(&["del", "k/a", "--prev-kv"])?, "1\nk/a\n10\n");
    assert_eq!(c.ctl(&["del", "k/", "--prefix"])?, "2\n");
    assert_eq!(c.ctl(&["get", "k/", "--prefix"])?, "");

    info!("txn from stdin: compares choose the branch");
    c.ctl(&["put", "lock", "free"])?;
    let txn = "value(\"lock\") = \"free\"\n\nput lock held\nput owner me\n\nget lock\n\n";
    assert_eq!(c.ctl_stdin(&["txn"], txn)?, "SUCCESS\n\nOK\n\nOK\n");
    assert_eq!(c.ctl_stdin(&["txn"], txn)?, "FAILURE\n\nlock\nheld\n");

    info!("watch: a prefix from a past revision with previous values, on a follower too");
    let from = json["header"]["revision"].as_i64().unwrap() + 1;
    c.ctl(&["put", "w/x", "1"])?;
    c.ctl(&["put", "w/x", "2"])?;
    c.ctl(&["del", "w/x"])?;
    let seen = watch_for(&c, &["--prefix", "w/", &format!("--rev={from}"), "--prev-kv"], 2)?;
    assert_eq!(seen, "PUT\nw/x\n1\nPUT\nw/x\n1\nw/x\n2\nDELETE\nw/x\n2\nw/x\n\n", "{seen}");

    info!("leases: grant, keep-alive once, time-to-live with keys, list, revoke deletes the keys");
    let granted = c.ctl(&["lease", "grant", "60"])?;
    let id = granted.split_whitespace().nth(1).expect("lease id").to_string();
    assert!(granted.ends_with("granted with TTL(60s)\n"), "{granted}");
    c.ctl(&["put", "leased", "v", &format!("--lease={id}")])?;
    let once = c.ctl(&["lease", "keep-alive", "--once", &id])?;
    assert!(once.contains(&format!("lease {id} keepalived with TTL(60)")), "{once}");
    let ttl = c.ctl(&["lease", "timetolive", &id, "--keys"])?;
    assert!(ttl.contains("granted with TTL(60s)") && ttl.contains("attached keys([leased])"), "{ttl}");
    assert!(c.ctl(&["lease", "list"])?.contains(&id));
    assert_eq!(c.ctl(&["lease", "revoke", &id])?, format!("lease {id} revoked\n"));
    assert_eq!(c.ctl(&["get", "leased"])?, "");
    let gone = c.ctl(&["lease", "timetolive", &id])?;
    assert!(gone.contains("already expired"), "{gone}");

    info!("a short lease expires by itself on the leader's clock");
    let short = c.ctl(&["lease", "grant", "2"])?;
    let short_id = short.split_whitespace().nth(1).unwrap().to_string();
    c.ctl(&["put", "ephemeral", "v", &format!("--lease={short_id}")])?;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(c.ctl(&["get", "ephemeral"])?, "", "the key went with its lease");

    info!("compaction: old revisions refused with etcd's error, newer ones kept");
    let rev = serde_json::from_str::<serde_json::Value>(&c.ctl(&["get", "lock", "-w", "json"])?)?["header"]["revision"]
        .as_i64()
        .unwrap();
    assert_eq!(c.ctl(&["compaction", &rev.to_string()])?, format!("compacted revision {rev}\n"));
    let err = c.ctl(&["get", "lock", "--rev=2"]).unwrap_err().to_string();
    assert!(err.contains("required revision has been compacted"), "{err}");
    let err = watch_for(&c, &["lock", "--rev=2"], 1)?;
    assert!(err.contains("required revision has been compacted"), "{err}");

    info!("bad input: etcd's errors");
    let err = c.ctl_stdin(&["put", "big"], &"x".repeat(2 << 20)).unwrap_err().to_string();
    assert!(err.contains("request is too large") || err.contains("larger than max"), "{err}");
    let err = c.ctl(&["put", "k", "v", "--lease=1234"]).unwrap_err().to_string();
    assert!(err.contains("requested lease not found"), "{err}");

    info!("snapshot save from one server");
    let first = &c.servers()?[0];
    let snap = c.state_dir().join("backup.db");
    let saved = run(c.etcdctl_at(&first.client_url).args(["snapshot", "save"]).arg(&snap), None)?;
    assert!(saved.contains("Snapshot saved at"), "{saved}");
    assert!(std::fs::metadata(&snap)?.len() > 0);

    info!("members: add a learner and remove it; adding a fourth voter is refused");
    let added = c.ctl(&["member", "add", "s4", "--learner", "--peer-urls=https://127.0.0.1:24191"])?;
    assert!(added.contains("Member") && added.contains("added to cluster"), "{added}");
    let list = c.ctl(&["member", "list"])?;
    assert_eq!(list.lines().count(), 4, "{list}");
    let learner = list.lines().find(|l| l.ends_with(", true")).expect("learner listed");
    let learner_id = learner.split(',').next().unwrap();
    c.ctl(&["member", "remove", learner_id])?;
    assert_eq!(c.ctl(&["member", "list"])?.lines().count(), 3);
    let err = c.ctl(&["member", "add", "s4", "--peer-urls=https://127.0.0.1:24191"]).unwrap_err().to_string();
    assert!(err.contains("refusing to make the voter count even"), "{err}");

    info!("check perf --load=s passes");
    let perf = c.ctl(&["check", "perf", "--load=s"])?;
    assert!(perf.contains("PASS: Throughput") && perf.trim_end().ends_with("PASS"), "{perf}");
    Ok(())
}
