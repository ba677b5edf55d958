//! `corral up` and `corral down`: a cluster of server processes on this machine.
//!
//! Layout of the state directory:
//! ```text
//! DIR/cluster.json          what was started: ports, pids
//! DIR/pki/                  ca.crt/key, server.crt/key, admin.crt/key
//! DIR/servers/sN/           data, server.log
//! DIR/kubeconfig            admin credentials for kubectl
//! DIR/etcdctl.env           ETCDCTL_* for etcdctl
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_agent::containerd::Layout;
use corral_proto::etcdserverpb::cluster_client::ClusterClient;
use corral_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use corral_proto::etcdserverpb::{MemberListRequest, StatusRequest};
use corral_transport::{CertificateAuthority, Usage};
use serde::{Deserialize, Serialize};
use tonic::transport::Endpoint;

use crate::nodenet::{self, NodeNetwork};
use crate::tls;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Control-plane servers (odd: 1, 3, 5, 7).
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// Worker agents, each with its own containerd and network namespace (default: 2 for a
    /// new cluster, none with --etcd-only; an existing cluster keeps its count).
    #[arg(long)]
    pub agents: Option<usize>,
    /// Where the cluster keeps everything.
    #[arg(long, default_value = "/var/lib/corral/local")]
    pub state_dir: PathBuf,
    /// First port: server i uses base+10*i (etcd API), +1 (peers), +2 (Kubernetes API).
    #[arg(long, default_value_t = 23790)]
    pub base_port: u16,
    /// Raft entries between snapshots (passed to every server).
    #[arg(long)]
    pub snapshot_count: Option<u64>,
    /// Entries kept behind a snapshot (passed to every server).
    #[arg(long)]
    pub snapshot_catchup_entries: Option<u64>,
    /// Writes are refused beyond this many bytes on a server's disk (passed to every server).
    #[arg(long)]
    pub quota_backend_bytes: Option<u64>,
    /// Servers serve only the etcd API: Corral as a drop-in etcd, no Kubernetes objects.
    #[arg(long)]
    pub etcd_only: bool,
    /// Pods' addresses (passed to every server; default 10.244.0.0/16): the servers' node
    /// IPAM gives each node a /24 of it.
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// A node silent this long is marked NotReady (passed to every server; default 40s).
    #[arg(long)]
    pub node_monitor_grace_period: Option<String>,
    /// Seconds pods tolerate a not-ready or unreachable node before eviction (passed to
    /// every server as both default toleration flags; default 300).
    #[arg(long)]
    pub default_toleration_seconds: Option<u64>,
    /// Seconds to wait for the cluster to become healthy.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Servers run no agent for their own node (by default each does, as k3s servers do:
    /// nodes s1, s2, ... with the control-plane role, schedulable).
    #[arg(long)]
    pub dedicated_servers: bool,
    /// Run the agents in this host's network namespace (each with its own pod bridge and
    /// rules) instead of giving each a namespace of its own on a host bridge (its own
    /// address, containerd, pod bridge, service rules and DNS, as separate machines have).
    #[arg(long)]
    pub host_network: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, default_value = "/var/lib/corral/local")]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    #[arg(long, default_value = "/var/lib/corral/local")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRecord {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub api_url: String,
    pub pid: Option<u32>,
    /// The server's node namespace (it listens on its node address there), when the cluster
    /// has a node network: a machine of its own, which partitions can cut off.
    #[serde(default)]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub servers: Vec<ServerRecord>,
    /// Tuning flags every server was started with; a restart by `corral up` reuses them.
    #[serde(default)]
    pub server_flags: Vec<String>,
    #[serde(default)]
    pub agents: Vec<AgentRecord>,
    /// The node network, when agents have namespaces of their own (not `--host-network`).
    #[serde(default)]
    pub network: Option<NodeNetwork>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    pub bridge: String,
    pub pid: Option<u32>,
    /// A server's own node (named after it, with the control-plane role).
    #[serde(default)]
    pub control_plane: bool,
}

impl ServerRecord {
    /// Where the server keeps its store.
    pub fn data_dir(&self, state_dir: &Path) -> PathBuf {
        state_dir.join("servers").join(&self.name).join("data")
    }
}

impl AgentRecord {
    pub fn data_dir(&self, state_dir: &Path) -> PathBuf {
        state_dir.join("agents").join(&self.name)
    }
}

impl ClusterRecord {
    pub fn load(state_dir: &Path) -> Result<Option<Self>> {
        match std::fs::read(state_dir.join("cluster.json")) {
            Ok(raw) => Ok(Some(serde_json::from_slice(&raw).context("cluster.json is corrupt")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self, state_dir: &Path) -> Result<()> {
        let tmp = state_dir.join("cluster.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, state_dir.join("cluster.json"))?;
        Ok(())
    }
}

/// Prints one step of a long operation with how long it took.
struct Progress {
    total: usize,
    step: usize,
    started: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self { total, step: 0, started: Instant::now() }
    }

    fn start(&mut self, what: &str) {
        use std::io::Write;
        self.step += 1;
        self.started = Instant::now();
        print!("[{}/{}] {what} ... ", self.step, self.total);
        let _ = std::io::stdout().flush();
    }

    fn done(&self, note: &str) {
        println!("{note} ({:.1}s)", self.started.elapsed().as_secs_f64());
    }
}

pub async fn up(args: UpArgs) -> Result<()> {
    if args.servers == 0 || args.servers > 7 {
        bail!("--servers {}: want 1 to 7", args.servers);
    }
    if args.servers.is_multiple_of(2) {
        bail!(
            "--servers {}: an even count tolerates no more failures than one fewer; use {}",
            args.servers,
            args.servers + 1
        );
    }
    if let Some(n) = args.agents.filter(|n| *n > 50) {
        bail!("--agents {n}: want at most 50");
    }
    let dir = &args.state_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = &dir.canonicalize()?;
    let existing = ClusterRecord::load(dir)?;
    let agents = match (args.agents, &existing) {
        (Some(n), _) => n,
        (None, Some(record)) => record.agents.iter().filter(|a| !a.control_plane).count(),
        (None, None) if args.etcd_only => 0,
        (None, None) => 2,
    };
    if agents > 0 && args.etcd_only {
        bail!("--agents {agents} with --etcd-only: an etcd has no nodes; drop one of them");
    }
    // Whether servers run an agent for their own node: as the cluster was made, else unless
    // told not to.
    let server_nodes = match &existing {
        Some(record) if !record.agents.is_empty() => record.agents.iter().any(|a| a.control_plane),
        // A cluster made without nodes stays so, unless nodes are asked for now (a restart
        // of its servers must not add any).
        Some(_) if args.agents.is_none() => false,
        _ => !args.dedicated_servers && !args.etcd_only,
    };
    let nodes = agents + if server_nodes { args.servers } else { 0 };
    let mut progress = Progress::new(if nodes > 0 { 8 } else { 4 });

    if let Some(record) = &existing
        && record.servers.len() != args.servers
    {
        bail!(
            "{} holds a cluster of {} servers; run `corral down --state-dir {}` first to make one of {}",
            dir.display(),
            record.servers.len(),
            dir.display(),
            args.servers
        );
    }

    // Bridges and namespaces are named after the state directory, so two local clusters
    // never share one.
    let tag = crate::urls::stable_id(&[&dir.to_string_lossy()]) & 0xffff;
    // A new cluster gets a node network (a namespace per machine on a host bridge) unless
    // it runs on the host's network or is an etcd only.
    let net = (!args.host_network && !args.etcd_only).then(|| NodeNetwork::for_tag(tag as u32));
    progress.start("certificates");
    let pki = dir.join("pki");
    if pki.join("ca.crt").exists() {
        progress.done("kept");
    } else {
        std::fs::create_dir_all(&pki)?;
        let ca = CertificateAuthority::generate("corral-ca")?;
        // The servers' node addresses too: agents and clients reach them there.
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        if let Some(net) = &net {
            sans.push(net.host_ip.to_string());
            sans.extend((0..args.servers).map(|i| net.node_ip(i).to_string()));
        }
        ca.issue("corral-server", &["corral:servers"], &sans, Usage::ServerAndClient)?.write(&pki, "server")?;
        ca.issue("admin", &["system:masters"], &[], Usage::Client)?.write(&pki, "admin")?;
        ca.write(&pki)?;
        progress.done("cluster CA, server and admin certificates");
    }

    progress.start(&format!("starting {} servers", args.servers));
    let mut record = existing.unwrap_or_else(|| ClusterRecord {
        servers: (0..args.servers)
            .map(|i| {
                let port = args.base_port + 10 * i as u16;
                let name = format!("s{}", i + 1);
                let host = net.as_ref().map_or(Ipv4Addr::LOCALHOST, |net| net.node_ip(i));
                ServerRecord {
                    client_url: format!("https://{host}:{port}"),
                    peer_url: format!("https://{host}:{}", port + 1),
                    api_url: format!("https://{host}:{}", port + 2),
                    pid: None,
                    netns: net.as_ref().map(|net| net.netns(&name)),
                    name,
                }
            })
            .collect(),
        server_flags: Vec::new(),
        agents: Vec::new(),
        network: net.clone(),
    });
    if nodes > 0 && record.network.is_none() && !args.host_network {
        println!("note: the servers in {} run without a node network: agents share this host's", dir.display());
    }
    if let Some(net) = &record.network {
        nodenet::ensure_host(net).context("making the node network's host bridge")?;
    }
    let mut flags = Vec::new();
    if let Some(n) = args.snapshot_count {
        flags.extend(["--snapshot-count".to_string(), n.to_string()]);
    }
    if let Some(n) = args.snapshot_catchup_entries {
        flags.extend(["--snapshot-catchup-entries".to_string(), n.to_string()]);
    }
    if let Some(n) = args.quota_backend_bytes {
        flags.extend(["--quota-backend-bytes".to_string(), n.to_string()]);
    }
    if args.etcd_only {
        flags.push("--etcd-only".to_string());
    }
    if let Some(cidr) = &args.cluster_cidr {
        let parsed =
            corral_controllers::nodeipam::Cidr::parse(cidr).map_err(|e| anyhow::anyhow!("--cluster-cidr {e}"))?;
        if parsed.prefix > 22 {
            bail!("--cluster-cidr {cidr}: too small for more than a few nodes (each gets a /24): use a /16");
        }
        flags.extend(["--cluster-cidr".to_string(), cidr.clone()]);
    }
    if let Some(grace) = &args.node_monitor_grace_period {
        flags.extend(["--node-monitor-grace-period".to_string(), grace.clone()]);
    }
    if let Some(s) = args.default_toleration_seconds {
        for flag in ["--default-not-ready-toleration-seconds", "--default-unreachable-toleration-seconds"] {
            flags.extend([flag.to_string(), s.to_string()]);
        }
    }
    if !flags.is_empty() {
        record.server_flags = flags;
    }
    let initial_cluster =
        record.servers.iter().map(|s| format!("{}={}", s.name, s.peer_url)).collect::<Vec<_>>().join(",");
    // A server whose data is gone while the others have theirs joins the running cluster
    // (after `etcdctl member remove` and `member add`) instead of founding one. Decided
    // before any server starts: a founding server writes its member file at once, and the
    // others of a new cluster must not take that for a running cluster.
    let member_file = |s: &ServerRecord| s.data_dir(dir).join("member.json").exists();
    let rejoin: Vec<String> = match record.servers.iter().any(member_file) {
        true => record.servers.iter().filter(|s| !member_file(s)).map(|s| s.name.clone()).collect(),
        false => Vec::new(),
    };
    let mut started = 0;
    for i in 0..record.servers.len() {
        let server = &record.servers[i];
        if server.pid.is_some_and(|pid| is_our_server(pid, dir)) {
            continue;
        }
        if let (Some(net), Some(_)) = (&record.network, &server.netns) {
            nodenet::ensure_node(net, &server.name, i)
                .with_context(|| format!("making server {}'s namespace", server.name))?;
        }
        let mut flags = record.server_flags.clone();
        if rejoin.contains(&server.name) {
            println!("note: {} has no data: it joins the running cluster as an existing member", server.name);
            flags.extend(["--initial-cluster-state".to_string(), "existing".to_string()]);
        }
        let pid = spawn_server(dir, server, &initial_cluster, &flags, record.network.as_ref())?;
        record.servers[i].pid = Some(pid);
        started += 1;
        // Recorded at once: if a later step fails, `corral down` still finds this one.
        record.save(dir)?;
    }
    record.save(dir)?;
    progress.done(&if started == record.servers.len() {
        "started".to_string()
    } else {
        format!("{} already running, {} started", record.servers.len() - started, started)
    });

    progress.start("waiting for a leader");
    let leader = wait_healthy(dir, &record, Duration::from_secs(args.timeout_s)).await?;
    progress.done(&format!("leader is {leader}"));

    progress.start("writing kubeconfig and etcdctl.env");
    write_client_files(dir, &record)?;
    progress.done("done");
    if nodes > 0 {
        start_agents(dir, &mut record, agents, server_nodes, &args, &mut progress).await?;
    }
    println!();
    println!("Cluster is up. Try:");
    println!("  set -a; . {}/etcdctl.env; set +a; etcdctl member list -w table", dir.display());
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "corral".into());
    println!("Stop it with: {exe} down --state-dir {}", dir.display());
    Ok(())
}

fn spawn_server(
    dir: &Path,
    server: &ServerRecord,
    initial_cluster: &str,
    extra: &[String],
    network: Option<&NodeNetwork>,
) -> Result<u32> {
    let server_dir = dir.join("servers").join(&server.name);
    let mut cmd = corral_command(server.netns.as_deref(), "server", &server_dir.join("server.log"))?;
    let agent_addr = server.api_url.trim_start_matches("https://");
    match (network, &server.netns) {
        // In its node namespace a server listens for agents where it serves everything else.
        (Some(_), Some(_)) => {
            cmd.args(["--listen-agent-addr", agent_addr]).args(["--advertise-agent-addr", agent_addr]);
        }
        // A cluster made before servers had namespaces: agents reach them on the host bridge.
        (Some(net), None) => {
            let port = agent_addr.rsplit(':').next().unwrap_or_default();
            cmd.args(["--listen-agent-addr", &format!("0.0.0.0:{port}")])
                .args(["--advertise-agent-addr", &format!("{}:{port}", net.host_ip)]);
        }
        (None, _) => {}
    }
    cmd.args(["--name", &server.name])
        .arg("--data-dir")
        .arg(server.data_dir(dir))
        .args(["--listen-client-urls", &server.client_url])
        .args(["--listen-peer-urls", &server.peer_url])
        .args(["--listen-api-url", &server.api_url])
        .args(["--initial-cluster", initial_cluster])
        .arg("--tls-dir")
        .arg(dir.join("pki"))
        .args(extra);
    Ok(cmd.spawn().context("starting corral server")?.id())
}

/// `corral <sub>` appending to `log`, in a session of its own: it outlives `corral up` and
/// its terminal.
fn corral_command(netns: Option<&str>, sub: &str, log: &Path) -> Result<std::process::Command> {
    use std::os::unix::process::CommandExt;
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let exe = std::env::current_exe().context("locating the corral binary")?;
    let mut cmd = match netns {
        // nsenter enters the network namespace only (not a mount namespace, as `ip netns
        // exec` would) and execs corral: the pid stays the one recorded.
        Some(ns) => {
            let mut c = std::process::Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    cmd.arg(sub).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; it only detaches the child from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd)
}

/// Live `corral <command>` processes started for this state directory, from /proc.
fn strays(dir: &Path, command: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| is_ours(*pid, dir, command))
        .collect()
}

/// True if `pid` is a corral server started for this state directory.
fn is_our_server(pid: u32, dir: &Path) -> bool {
    is_ours(pid, dir, "server")
}

/// An error naming the process and the error it ended with, if `pid` (a `corral <command>`
/// this `up` started) is no longer running: waiting on would only end in a timeout.
async fn gone(pid: u32, command: &str, name: &str, log: &Path) -> Result<()> {
    // Not `is_ours`: for a moment after the spawn, the process is still `nsenter`. Looked
    // at twice, in case a process just starting is ever seen between states.
    if running(pid) {
        return Ok(());
    }
    let first = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    if running(pid) {
        eprintln!("note: {command} {name} (pid {pid}) was seen not running once: {first:?}");
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = last_error(&text).unwrap_or_else(|| format!("its log is empty (pid {pid})"));
    bail!("{command} {name} exited: {last}; see {}", log.display())
}

/// What a process ended with: its `Error: ...` and causes, or its panic and message; else
/// its last line.
fn last_error(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    let Some(start) = lines.iter().rposition(|l| l.starts_with("Error: ") || l.contains("panicked at")) else {
        return lines.iter().rev().find(|l| !l.is_empty()).map(|l| l.to_string());
    };
    let end = |l: &&str| l.eq_ignore_ascii_case("stack backtrace:") || l.starts_with("note: ");
    let told: Vec<&str> = lines[start..]
        .iter()
        .take_while(|l| !end(l))
        .filter(|l| !l.is_empty() && **l != "Caused by:")
        .take(6)
        .copied()
        .collect();
    Some(told.join(" "))
}

/// True if `pid` is a live `corral <command>` started for this state directory.
fn is_ours(pid: u32, dir: &Path, command: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let text = String::from_utf8_lossy(&cmdline);
    // argv[1] is the subcommand: `server\0` also appears in an agent's `--server` argument.
    running(pid) && text.split('\0').nth(1) == Some(command) && text.contains(&*dir.to_string_lossy())
}

/// True if `pid` exists and is not a zombie (an exited child not yet reaped).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    !stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'))
}

/// Builds the images and a join token (once), starts every agent that is not running, and
/// waits until every node is Ready.
async fn start_agents(
    dir: &Path,
    record: &mut ClusterRecord,
    count: usize,
    server_nodes: bool,
    args: &UpArgs,
    progress: &mut Progress,
) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_s);
    let tag = crate::urls::stable_id(&[&dir.to_string_lossy()]) & 0xffff;
    progress.start("images");
    let images = dir.join("images");
    if images.join("nginx.tar").exists() {
        progress.done("kept");
    } else {
        let built = corral_image::build_all(&corral_image::Host::default(), &images, |_, _| {})
            .context("building images (deploy/install-deps.sh installs busybox-static, nginx and gcc)")?;
        progress.done(&format!("{} archives in {}", built.len(), images.display()));
    }
    progress.start("join token");
    let token_file = dir.join("token");
    if token_file.exists() {
        progress.done("kept");
    } else {
        let token = crate::token::create(&dir.join("pki"), &record.servers[0].api_url, None, "corral up").await?;
        std::fs::write(&token_file, format!("{token}\n"))?;
        std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        progress.done(&format!("{}", token_file.display()));
    }
    // The servers' own nodes first (s1, s2, ...), then the workers (a1, a2, ...).
    let record_of = |name: String, control_plane: bool| AgentRecord {
        bridge: format!("cr{tag:04x}-{name}"),
        name,
        pid: None,
        control_plane,
    };
    let mut wanted: Vec<AgentRecord> = Vec::new();
    if server_nodes {
        wanted.extend(record.servers.iter().map(|s| record_of(s.name.clone(), true)));
    }
    wanted.extend((0..count).map(|i| record_of(format!("a{}", i + 1), false)));
    let names = |list: &[AgentRecord]| list.iter().map(|a| a.name.clone()).collect::<Vec<_>>();
    if names(&record.agents) != names(&wanted) {
        record.agents = wanted;
    }
    progress.start(&format!("starting {} agents", record.agents.len()));
    let servers: Vec<String> = record
        .servers
        .iter()
        .map(|s| {
            let addr = s.api_url.trim_start_matches("https://");
            match &record.network {
                Some(net) if s.netns.is_none() => {
                    format!("{}:{}", net.host_ip, addr.rsplit(':').next().unwrap_or_default())
                }
                _ => addr.to_string(),
            }
        })
        .collect();
    let mut started = 0;
    let network = record.network.clone();
    let server_names: Vec<String> = record.servers.iter().map(|s| s.name.clone()).collect();
    let mut workers = 0;
    for agent in record.agents.iter_mut() {
        // A server's node shares its namespace and address; workers come after the servers.
        let i = match server_names.iter().position(|n| *n == agent.name) {
            Some(i) => i,
            None => {
                workers += 1;
                server_names.len() + workers - 1
            }
        };
        if agent.pid.is_some_and(|pid| is_ours(pid, dir, "agent")) {
            continue;
        }
        let node = match &network {
            Some(net) => {
                nodenet::ensure_node(net, &agent.name, i)
                    .with_context(|| format!("making node {}'s namespace", agent.name))?;
                Some((net.netns(&agent.name), net.node_ip(i)))
            }
            None => None,
        };
        agent.pid = Some(spawn_agent(dir, agent, &servers, &token_file, &images, node)?);
        started += 1;
    }
    record.save(dir)?;
    progress.done(&format!("{started} started"));
    progress.start("waiting for the nodes to be Ready");
    let nodes = wait_nodes_ready(dir, &record.servers[0].api_url, &record.agents, timeout).await?;
    progress.done("Ready");
    if record.network.is_some() {
        // The host reaches every node's pods through the node.
        for node in &nodes {
            let (Some(cidr), Some(ip)) = (
                node.pointer("/spec/podCIDR").and_then(|v| v.as_str()),
                node.pointer("/status/addresses")
                    .and_then(|a| a.as_array())
                    .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
                    .and_then(|a| a["address"].as_str()),
            ) else {
                continue;
            };
            nodenet::route_pods(cidr, ip)?;
        }
    }
    Ok(())
}

/// Starts an agent; `node` is its namespace and address when it has its own.
fn spawn_agent(
    dir: &Path,
    agent: &AgentRecord,
    servers: &[String],
    token: &Path,
    images: &Path,
    node: Option<(String, Ipv4Addr)>,
) -> Result<u32> {
    let data = agent.data_dir(dir);
    let mut cmd = corral_command(node.as_ref().map(|(ns, _)| ns.as_str()), "agent", &data.join("agent.log"))?;
    if let Some((_, ip)) = &node {
        cmd.args(["--node-ip", &ip.to_string()]);
    }
    if agent.control_plane {
        cmd.args(["--node-labels", "node-role.kubernetes.io/control-plane="]);
    }
    cmd.args(["--node-name", &agent.name])
        .arg("--data-dir")
        .arg(&data)
        .args(["--server", &servers.join(",")])
        .arg("--token-file")
        .arg(token)
        .arg("--images-dir")
        .arg(images)
        .args(["--bridge", &agent.bridge])
        // Agents of one machine share its network namespace: each keeps its own table.
        .args(["--proxy-table", &agent.bridge]);
    Ok(cmd.spawn().context("starting corral agent")?.id())
}

/// Waits until the nodes are Ready; the Node objects then.
async fn wait_nodes_ready(
    dir: &Path,
    api_url: &str,
    agents: &[AgentRecord],
    timeout: Duration,
) -> Result<Vec<serde_json::Value>> {
    let client = crate::kube::Client::connect(&dir.join("pki"), api_url, 1).await?;
    let deadline = Instant::now() + timeout;
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let mut missing = names.clone();
    while Instant::now() < deadline {
        for agent in agents {
            if let Some(pid) = agent.pid {
                gone(pid, "agent", &agent.name, &agent.data_dir(dir).join("agent.log")).await?;
            }
        }
        if let Ok(body) = client.ok(hyper::Method::GET, "/api/v1/nodes", None, "application/json").await {
            let list: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let ready: Vec<&str> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| {
                    n.pointer("/status/conditions")
                        .and_then(|c| c.as_array())
                        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
                })
                // Ready, and the node controller has lifted the not-ready taint a node
                // registers with: until then nothing is scheduled there.
                .filter(|n| {
                    !n.pointer("/spec/taints")
                        .and_then(|t| t.as_array())
                        .is_some_and(|t| t.iter().any(|t| t["key"] == "node.kubernetes.io/not-ready"))
                })
                .filter_map(|n| n.pointer("/metadata/name").and_then(|v| v.as_str()))
                .collect();
            missing = names.iter().filter(|n| !ready.contains(&n.as_str())).cloned().collect();
            if missing.is_empty() {
                return Ok(list["items"].as_array().cloned().unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!(
        "nodes {} did not become Ready in {}s; see {}/agents/*/agent.log",
        missing.join(", "),
        timeout.as_secs(),
        dir.display()
    )
}

/// Waits until every server reports the same leader; returns its name.
async fn wait_healthy(dir: &Path, record: &ClusterRecord, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let tls = tls::client_config(&dir.join("pki"), "admin")?;
    let mut last = String::new();
    while Instant::now() < deadline {
        for server in &record.servers {
            let log = dir.join("servers").join(&server.name).join("server.log");
            if let Some(pid) = server.pid {
                gone(pid, "server", &server.name, &log).await?;
            }
        }
        let mut leaders = Vec::new();
        for server in &record.servers {
            match status(&server.client_url, &tls).await {
                Ok((leader, member)) => leaders.push((leader, member)),
                Err(e) => last = format!("{}: {e}", server.name),
            }
        }
        let agreed =
            leaders.len() == record.servers.len() && leaders[0].0 != 0 && leaders.iter().all(|l| l.0 == leaders[0].0);
        // Healthy also means every member has published its client URL (etcdctl --cluster).
        let published = agreed && all_published(&record.servers[0].client_url, &tls, record.servers.len()).await;
        if published {
            let leader = leaders[0].0;
            let name = record
                .servers
                .iter()
                .zip(&leaders)
                .find(|(_, (_, member))| *member == leader)
                .map(|(s, _)| s.name.clone())
                .unwrap_or_else(|| format!("{leader:x}"));
            return Ok(name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "the cluster did not become healthy in {}s (last: {last}); see {}/servers/*/server.log",
        timeout.as_secs(),
        dir.display()
    )
}

async fn all_published(url: &str, tls: &tonic::transport::ClientTlsConfig, expected: usize) -> bool {
    let Ok(channel) = connect(url, tls).await else { return false };
    let Ok(resp) = ClusterClient::new(channel).member_list(MemberListRequest { linearizable: false }).await else {
        return false;
    };
    let members = resp.into_inner().members;
    members.len() == expected && members.iter().all(|m| !m.client_ur_ls.is_empty() && !m.name.is_empty())
}

async fn connect(url: &str, tls: &tonic::transport::ClientTlsConfig) -> Result<tonic::transport::Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .tls_config(tls.clone())?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

/// (leader id, own member id) of the server at `url`.
pub async fn status(url: &str, tls: &tonic::transport::ClientTlsConfig) -> Result<(u64, u64)> {
    let channel = connect(url, tls).await?;
    let resp = MaintenanceClient::new(channel).status(StatusRequest {}).await?.into_inner();
    let member = resp.header.map(|h| h.member_id).unwrap_or(0);
    Ok((resp.leader, member))
}

/// One server as `corral status` sees it.
struct ServerState {
    leader: bool,
    term: u64,
    index: u64,
}

async fn server_state(url: &str, tls: &tonic::transport::ClientTlsConfig) -> Result<ServerState> {
    let channel = tokio::time::timeout(Duration::from_secs(2), connect(url, tls)).await??;
    let mut client = MaintenanceClient::new(channel);
    let resp = tokio::time::timeout(Duration::from_secs(2), client.status(StatusRequest {})).await??.into_inner();
    let member = resp.header.map(|h| h.member_id).unwrap_or(0);
    Ok(ServerState { leader: resp.leader == member && member != 0, term: resp.raft_term, index: resp.raft_index })
}

/// A table with aligned columns.
fn print_table(rows: &[Vec<String>]) {
    let widths: Vec<usize> =
        (0..rows.first().map_or(0, Vec::len)).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

/// `corral status`: the servers (leader, term, Raft index, health), the agents (the server
/// each reports through) and the nodes' conditions.
pub async fn status_command(args: StatusArgs) -> Result<()> {
    let dir = &args.state_dir;
    let Some(record) = ClusterRecord::load(dir)? else {
        bail!("{} holds no cluster: start one with `corral up --state-dir {}`", dir.display(), dir.display());
    };
    let dir = &dir.canonicalize()?;
    let tls = tls::client_config(&dir.join("pki"), "admin")?;
    let mut rows =
        vec![["SERVER", "PID", "HEALTH", "ROLE", "TERM", "RAFT INDEX", "CLIENT URL"].map(String::from).to_vec()];
    let mut api_url = None;
    for s in &record.servers {
        let pid = s.pid.filter(|pid| is_our_server(*pid, dir));
        let state = server_state(&s.client_url, &tls).await;
        let (health, role, term, index) = match &state {
            Ok(st) => {
                api_url.get_or_insert(s.api_url.clone());
                ("ok", if st.leader { "leader" } else { "follower" }, st.term.to_string(), st.index.to_string())
            }
            Err(_) if pid.is_none() => ("stopped", "-", "-".into(), "-".into()),
            Err(_) => ("not answering", "-", "-".into(), "-".into()),
        };
        let pid = pid.map_or("-".to_string(), |p| p.to_string());
        rows.push(vec![s.name.clone(), pid, health.into(), role.into(), term, index, s.client_url.clone()]);
    }
    print_table(&rows);
    if record.agents.is_empty() {
        return Ok(());
    }
    let nodes: Vec<serde_json::Value> = match &api_url {
        Some(url) => {
            let client = crate::kube::Client::connect(&dir.join("pki"), url, 1).await?;
            let body = client.ok(hyper::Method::GET, "/api/v1/nodes", None, "application/json").await?;
            let list: serde_json::Value = serde_json::from_slice(&body)?;
            list["items"].as_array().cloned().unwrap_or_default()
        }
        None => Vec::new(),
    };
    println!();
    let mut rows = vec![["AGENT", "PID", "REPORTS TO", "ADDRESS", "READY", "CONDITIONS"].map(String::from).to_vec()];
    for a in &record.agents {
        let pid = a.pid.filter(|pid| is_ours(*pid, dir, "agent")).map_or("-".to_string(), |p| p.to_string());
        let node = nodes.iter().find(|n| n["metadata"]["name"] == a.name.as_str());
        let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or("-").to_string();
        let conditions: Vec<&serde_json::Value> = node
            .and_then(|n| n.pointer("/status/conditions"))
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .collect();
        let ready = conditions.iter().find(|c| c["type"] == "Ready").map(|c| text(c.get("status")));
        let others: Vec<String> = conditions
            .iter()
            .filter(|c| c["type"] != "Ready")
            .map(|c| format!("{}={}", text(c.get("type")), text(c.get("status"))))
            .collect();
        let address = node
            .and_then(|n| n.pointer("/status/addresses"))
            .and_then(|a| a.as_array())
            .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
            .map(|a| text(a.get("address")));
        rows.push(vec![
            a.name.clone(),
            pid,
            text(node.and_then(|n| n.pointer("/metadata/annotations/corral.dev~1reporting-server"))),
            address.unwrap_or_else(|| "-".into()),
            ready.unwrap_or_else(|| "-".into()),
            if others.is_empty() { "-".into() } else { others.join(" ") },
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn write_client_files(dir: &Path, record: &ClusterRecord) -> Result<()> {
    let pki = dir.join("pki");
    let endpoints = record.servers.iter().map(|s| s.client_url.as_str()).collect::<Vec<_>>().join(",");
    let env = format!(
        "ETCDCTL_API=3\nETCDCTL_ENDPOINTS={endpoints}\nETCDCTL_CACERT={}\nETCDCTL_CERT={}\nETCDCTL_KEY={}\n",
        pki.join("ca.crt").display(),
        pki.join("admin.crt").display(),
        pki.join("admin.key").display()
    );
    std::fs::write(dir.join("etcdctl.env"), env)?;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: corral\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\n\
         contexts:\n- name: corral\n  context:\n    cluster: corral\n    user: admin\ncurrent-context: corral\n",
        record.servers[0].api_url,
        pki.join("ca.crt").display(),
        pki.join("admin.crt").display(),
        pki.join("admin.key").display()
    );
    std::fs::write(dir.join("kubeconfig"), kubeconfig)?;
    Ok(())
}

pub async fn down(args: DownArgs) -> Result<()> {
    let dir = &args.state_dir;
    if !dir.exists() {
        println!("nothing to stop: {} does not exist", dir.display());
        return Ok(());
    }
    let dir = &dir.canonicalize()?;
    let record = ClusterRecord::load(dir)?;
    let mut pids: Vec<(String, u32)> = record
        .iter()
        .flat_map(|r| r.servers.iter())
        .filter_map(|s| s.pid.filter(|pid| is_our_server(*pid, dir)).map(|pid| (s.name.clone(), pid)))
        .collect();
    // Servers started for this directory that the record does not name (an `up` that failed
    // halfway): found by their command lines.
    for pid in strays(dir, "server") {
        if !pids.iter().any(|(_, p)| *p == pid) {
            pids.push(("unrecorded".into(), pid));
        }
    }
    let mut progress = Progress::new(3);
    progress.start(&format!("stopping {} agents and their pods", record.as_ref().map_or(0, |r| r.agents.len())));
    for agent in record.iter().flat_map(|r| r.agents.iter()) {
        if let Some(pid) = agent.pid.filter(|pid| is_ours(*pid, dir, "agent")) {
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_ours(pid, dir, "agent") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        corral_agent::containerd::teardown(&Layout::new(&agent.data_dir(dir).join("containerd")));
        let _ = std::process::Command::new("ip").args(["link", "del", &agent.bridge]).stderr(Stdio::null()).status();
        // An agent on the host's network kept its table there (best effort: none otherwise).
        let _ = nodenet::nft(&corral_agent::proxy::remove_script(&agent.bridge));
        if let Some(pid) = agent.pid.filter(|pid| is_ours(*pid, dir, "agent")) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(net) = record.as_ref().and_then(|r| r.network.as_ref()) {
            nodenet::remove_node(net, &agent.name);
        }
    }
    for pid in strays(dir, "agent") {
        // An agent a failed `up` never recorded.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    progress.done("stopped");
    progress.start(&format!("stopping {} servers", pids.len()));
    for (_, pid) in &pids {
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|(_, pid)| is_our_server(*pid, dir)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut killed = 0;
    for (_, pid) in &pids {
        if is_our_server(*pid, dir) {
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            killed += 1;
        }
    }
    if let Some(net) = record.as_ref().and_then(|r| r.network.as_ref()) {
        for server in record.iter().flat_map(|r| r.servers.iter()).filter(|s| s.netns.is_some()) {
            nodenet::remove_node(net, &server.name);
        }
        nodenet::remove_host(net);
    }
    // What a failed `up` made before it could record it: this directory's namespaces, by name.
    let tag = crate::urls::stable_id(&[&dir.to_string_lossy()]) & 0xffff;
    nodenet::remove_all(&NodeNetwork::for_tag(tag as u32));
    progress.done(&if killed > 0 { format!("{killed} did not stop in 10s and were killed") } else { "stopped".into() });
    // Filesystems mounted under the directory (a chaos run's small disk) go first.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for point in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        if Path::new(point).starts_with(dir) {
            let _ = std::process::Command::new("umount").args(["-l", point]).status();
        }
    }
    progress.start(&format!("removing {}", dir.display()));
    for name in ["agents", "servers", "pki", "images", "token", "cluster.json", "kubeconfig", "etcdctl.env"] {
        let path = dir.join(name);
        if path.is_dir() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        } else if path.exists() {
            std::fs::remove_file(&path)?;
        }
    }
    let _ = std::fs::remove_dir(dir);
    progress.done("removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_processs_error_is_what_its_log_ended_with() {
        let anyhow = "INFO starting\nError: starting the API\n\nCaused by:\n    0: binding the API to 10.0.0.1:6443\n    1: Address in use (os error 98)\n\nStack backtrace:\n   0: anyhow::msg\n             at src/x.rs:1\n";
        assert_eq!(
            last_error(anyhow).as_deref(),
            Some("Error: starting the API 0: binding the API to 10.0.0.1:6443 1: Address in use (os error 98)")
        );
        let panic =
            "INFO ok\nthread 'main' panicked at src/server.rs:9:5:\nsignal handler: EPERM\nstack backtrace:\n   0: x\n";
        assert_eq!(
            last_error(panic).as_deref(),
            Some("thread 'main' panicked at src/server.rs:9:5: signal handler: EPERM")
        );
        assert_eq!(last_error("INFO one\nWARN two\n\n").as_deref(), Some("WARN two"));
        assert_eq!(last_error(""), None);
    }
}
