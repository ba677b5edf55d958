//! `corral server`: one control-plane node (store, etcd API, Raft peers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use corral_proto::store::ClusterInfoRequest;
use corral_store::node::{MemberChange, StoreConfig, StoreNode};
use corral_store::peer::PeerService;
use corral_store::raft::Member;
use corral_store::raft::network::Peers;
use serde::{Deserialize, Serialize};

use crate::tls;
use crate::urls::{parse_initial_cluster, socket_addr, stable_id};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClusterState {
    /// Form a new cluster from --initial-cluster.
    New,
    /// Join a running cluster that already lists this server (etcdctl member add).
    Existing,
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// This server's name, unique in the cluster.
    #[arg(long)]
    pub name: String,
    /// Where the store keeps its data.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The etcd API address.
    #[arg(long, default_value = "https://127.0.0.1:2379")]
    pub listen_client_urls: String,
    /// The etcd API address other servers and clients use (default: the listen URL).
    #[arg(long)]
    pub advertise_client_urls: Option<String>,
    /// The Raft peer address.
    #[arg(long, default_value = "https://127.0.0.1:2380")]
    pub listen_peer_urls: String,
    /// The peer address other servers use (default: the listen URL).
    #[arg(long)]
    pub initial_advertise_peer_urls: Option<String>,
    /// Every initial member as NAME=PEER_URL, comma-separated.
    #[arg(long)]
    pub initial_cluster: String,
    #[arg(long, value_enum, default_value = "new")]
    pub initial_cluster_state: ClusterState,
    /// Distinguishes clusters formed from the same member list.
    #[arg(long, default_value = "corral")]
    pub initial_cluster_token: String,
    /// Directory with ca.crt, server.crt and server.key (mutual TLS on every port).
    #[arg(long, required_unless_present = "plaintext")]
    pub tls_dir: Option<PathBuf>,
    /// Serve without TLS. For debugging only: anyone who can reach the ports owns the data.
    #[arg(long)]
    pub plaintext: bool,
    #[arg(long, default_value_t = 50)]
    pub heartbeat_interval_ms: u64,
    #[arg(long, default_value_t = 150)]
    pub election_timeout_min_ms: u64,
    #[arg(long, default_value_t = 300)]
    pub election_timeout_max_ms: u64,
    /// Writes are refused ("database space exceeded") beyond this many bytes on disk.
    #[arg(long, default_value_t = 8 << 30)]
    pub quota_backend_bytes: u64,
    /// Entries between Raft snapshots.
    #[arg(long, default_value_t = 50_000)]
    pub snapshot_count: u64,
    /// Entries kept behind a snapshot for slow followers; one further behind gets the snapshot.
    #[arg(long, default_value_t = 5_000)]
    pub snapshot_catchup_entries: u64,
    /// Allow an even number of voters.
    #[arg(long)]
    pub allow_even_voters: bool,
    /// Serve only the etcd API (a drop-in etcd): no Kubernetes API and no system objects in
    /// the store.
    #[arg(long)]
    pub etcd_only: bool,
    /// The Kubernetes API address.
    #[arg(long, default_value = "https://127.0.0.1:6443")]
    pub listen_api_url: String,
    /// Bearer tokens for the Kubernetes API: lines of `token,user,uid,"group1,group2"`.
    #[arg(long)]
    pub token_auth_file: Option<PathBuf>,
    /// Where Services' cluster IPs come from (the first address is `default/kubernetes`'s).
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: String,
    /// Where NodePort Services' node ports come from.
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: String,
    /// The agent endpoint (QUIC, UDP; default: the Kubernetes API's address and port).
    #[arg(long)]
    pub listen_agent_addr: Option<String>,
    /// The agent address other servers hand to agents (default: the listen address).
    #[arg(long)]
    pub advertise_agent_addr: Option<String>,
    /// A node whose Lease and status stop being renewed for this long is marked NotReady
    /// (its conditions Unknown) and tainted unreachable (`40s`, `2m`).
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// Seconds a new pod tolerates a not-ready node before it is evicted.
    #[arg(long, default_value_t = 300)]
    pub default_not_ready_toleration_seconds: i64,
    /// Seconds a new pod tolerates an unreachable node before it is evicted.
    #[arg(long, default_value_t = 300)]
    pub default_unreachable_toleration_seconds: i64,
    /// Pods' addresses: node IPAM gives each node a subnet of it.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// The prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// Give nodes pod CIDRs (false: agents are given theirs with --pod-cidr).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub allocate_node_cidrs: bool,
}

/// `40s`, `2m`, `1h` or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: want a duration such as 40s or 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("{text:?}: want a duration such as 40s or 2m")),
    }
}

/// Who this server is, kept in the data directory across restarts.
#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    member_id: u64,
    cluster_id: u64,
}

impl ServerArgs {
    fn peer_url(&self) -> &str {
        self.initial_advertise_peer_urls.as_deref().unwrap_or(&self.listen_peer_urls)
    }

    fn client_url(&self) -> &str {
        self.advertise_client_urls.as_deref().unwrap_or(&self.listen_client_urls)
    }
}

pub async fn run(args: ServerArgs) -> Result<()> {
    if cfg!(feature = "ack-before-fsync") {
        tracing::error!(
            "this build acknowledges writes before they are on disk (chaos negative control): never use it"
        );
    }
    tokio::spawn(watch_for_stalls());
    let armed = corral_store::failpoints::arm_from_env().map_err(anyhow::Error::msg)?;
    if !armed.is_empty() {
        tracing::warn!(failpoints = ?armed, "failpoints armed (chaos testing)");
    }
    let initial = parse_initial_cluster(&args.initial_cluster)?;
    let peer_addr = socket_addr(&args.listen_peer_urls)?;
    let client_addr = socket_addr(&args.listen_client_urls)?;
    if !initial.iter().any(|(name, url)| name == &args.name && url == args.peer_url()) {
        bail!(
            "--initial-cluster does not list this server as {}={}: add it, or fix --name/--initial-advertise-peer-urls",
            args.name,
            args.peer_url()
        );
    }
    let client_tls = match &args.tls_dir {
        Some(dir) => Some(tls::client_config(dir, "server")?),
        None => None,
    };
    let peers = Peers::new(client_tls);
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let identity = identify(&args, &initial, &peers).await?;
    tracing::info!(
        member = format_args!("{:x}", identity.member_id),
        cluster = format_args!("{:x}", identity.cluster_id),
        "starting server"
    );

    let mut cfg = StoreConfig::new(identity.member_id, identity.cluster_id, args.data_dir.clone());
    cfg.heartbeat_interval_ms = args.heartbeat_interval_ms;
    cfg.election_timeout_min_ms = args.election_timeout_min_ms;
    cfg.election_timeout_max_ms = args.election_timeout_max_ms;
    cfg.quota_bytes = args.quota_backend_bytes;
    cfg.snapshot_every_entries = args.snapshot_count;
    cfg.logs_kept_behind_snapshot = args.snapshot_catchup_entries;
    cfg.allow_even_voters = args.allow_even_voters;
    let node = StoreNode::open(cfg, peers).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server_tls = match &args.tls_dir {
        Some(dir) => Some(corral_transport::tls::server_config(
            dir,
            "server",
            corral_transport::tls::ClientCerts::Required,
            &[b"h2"],
        )?),
        None => None,
    };
    // openraft cancels an AppendEntries or heartbeat that takes longer than its heartbeat
    // interval, and each cancel resets an HTTP/2 stream. h2 answers more than 20 such resets
    // of streams not yet accepted (its rapid-reset guard) by closing the connection, which
    // cuts a busy leader off from its followers just when they lag. Peers are authenticated
    // servers of this cluster: the guard is set far above what replication produces.
    //
    // HTTP/2's default windows (64 KiB) would make every AppendEntries or forwarded batch
    // larger than that wait a round trip for a WINDOW_UPDATE: a peer may send a whole
    // AppendEntries (at most `MAX_PEER_WINDOW` bytes) at once.
    let mut peer_http = http2_builder();
    peer_http
        .max_pending_accept_reset_streams(100_000)
        .initial_stream_window_size(corral_store::raft::network::MAX_PEER_WINDOW)
        .initial_connection_window_size(2 * corral_store::raft::network::MAX_PEER_WINDOW);
    let peer_task = tokio::spawn(crate::grpc_serve::serve(
        bind(peer_addr, "peers").await?,
        server_tls.clone(),
        tonic::service::Routes::new(PeerService::server(node.clone())),
        peer_http,
        stop_rx.clone(),
    ));
    let client_task = tokio::spawn(crate::grpc_serve::serve(
        bind(client_addr, "the etcd API").await?,
        server_tls,
        corral_store::etcd::routes(node.clone()),
        http2_builder(),
        stop_rx.clone(),
    ));

    if args.initial_cluster_state == ClusterState::New {
        let members: BTreeMap<u64, Member> = initial
            .iter()
            .map(|(name, url)| {
                let id = stable_id(&[name, url, &args.initial_cluster_token]);
                (id, Member { name: name.clone(), peer_urls: vec![url.clone()], client_urls: vec![] })
            })
            .collect();
        node.bootstrap(members).await?;
    }
    tokio::spawn(publish(node.clone(), args.name.clone(), args.client_url().to_string(), stop_rx.clone()));
    let api_task = match args.etcd_only {
        true => None,
        false => Some(start_api(&args, node.clone(), stop_rx.clone()).await?),
    };
    let api = if args.etcd_only { String::new() } else { format!(", Kubernetes API on {}", args.listen_api_url) };
    println!("corral server {} ready: etcd API on {}, peers on {}{api}", args.name, args.client_url(), args.peer_url());

    tokio::select! {
        _ = wait_for_signal() => {}
        fatal = node.raft_stopped() => {
            // Crash-only: a server whose Raft stopped (its disk full or failing) would go on
            // answering from a store that no longer moves. It exits, to be restarted once
            // the cause is fixed; what it acknowledged is on a quorum's disks.
            tracing::error!(error = %fatal, "raft stopped: exiting");
            eprintln!("corral server {}: raft stopped: {fatal}", args.name);
            std::process::exit(2);
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    node.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = peer_task.await;
        let _ = client_task.await;
        if let Some(task) = api_task {
            let _ = task.await;
        }
    })
    .await;
    Ok(())
}

/// HTTP/2 settings for a gRPC port: a ping every 10 seconds finds dead clients, and responses
/// carry no Date header (gRPC has no use for it).
fn http2_builder() -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut http = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    http.timer(hyper_util::rt::TokioTimer::new()).keep_alive_interval(Duration::from_secs(10)).auto_date_header(false);
    http
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {what} to {addr}"))
}

/// Starts the Kubernetes API on --listen-api-url, and makes sure the system namespaces exist
/// (retried in the background until the cluster has a leader).
async fn start_api(
    args: &ServerArgs,
    node: Arc<StoreNode>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr = socket_addr(&args.listen_api_url)?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the API to {addr}"))?;
    let tls = match &args.tls_dir {
        Some(dir) => Some(corral_apiserver::tls_config(dir, "server").map_err(anyhow::Error::msg)?),
        None => None,
    };
    let tokens = match &args.token_auth_file {
        Some(path) => corral_apiserver::Tokens::load(path).with_context(|| format!("reading {}", path.display()))?,
        None => corral_apiserver::Tokens::default(),
    };
    let ranges =
        corral_apiserver::services::Ranges::parse(&args.service_cluster_ip_range, &args.service_node_port_range)
            .map_err(|e| anyhow::anyhow!("{e}: fix --service-cluster-ip-range or --service-node-port-range"))?;
    let leadership = node.leadership();
    let store = corral_apiserver::ObjectStore::new(node);
    let api = Arc::new(corral_apiserver::Api {
        store: store.clone(),
        mint: Box::new(corral_api::meta::SystemMinter),
        services: ranges.clone(),
        cache: Default::default(),
        tolerations: corral_apiserver::defaults::DefaultTolerations {
            not_ready_s: args.default_not_ready_toleration_seconds,
            unreachable_s: args.default_unreachable_toleration_seconds,
        },
    });
    let mut agent_endpoint = None;
    if let Some(dir) = &args.tls_dir {
        let agent_addr = match &args.listen_agent_addr {
            Some(a) => a.parse().with_context(|| format!("--listen-agent-addr {a}: want HOST:PORT"))?,
            None => addr,
        };
        let ca = corral_transport::CertificateAuthority::load(dir)
            .with_context(|| format!("the agent endpoint signs node certificates with {}/ca.key", dir.display()))?;
        let endpoint = corral_transport::quic::server(agent_addr, dir, "server")?;
        let advertise = args.advertise_agent_addr.clone().unwrap_or_else(|| agent_addr.to_string());
        let agents = corral_apiserver::agents::AgentEndpoint::new(api.clone(), ca, &args.name, &advertise);
        tokio::spawn(agents.clone().serve(endpoint, stop.clone()));
        agent_endpoint = Some(agents);
    }
    let config = corral_apiserver::ServerConfig { tls, tokens, advertise: addr.to_string(), agents: agent_endpoint };
    // The scheduler (and, as they come, the controllers) run while this server leads.
    let cluster = Arc::new(corral_apiserver::local::LocalCluster { api: api.clone() });
    let name = args.name.clone();
    let grace = args.node_monitor_grace_period;
    // Node IPAM's ranges, checked at start; None when agents bring their own (--pod-cidr).
    let allocator = corral_controllers::nodeipam::Cidr::parse(&args.cluster_cidr)
        .and_then(|c| corral_controllers::nodeipam::Allocator::new(c, args.node_cidr_mask_size))
        .map_err(|e| anyhow::anyhow!("{e}: fix --cluster-cidr or --node-cidr-mask-size"))?;
    let allocator = args.allocate_node_cidrs.then_some(allocator);
    let leader_store = store.clone();
    let term_runtime = corral_controllers::leader::control_runtime().context("starting the controllers' runtime")?;
    tokio::spawn(corral_controllers::leader::run_while_leader(leadership, move || {
        let informers = corral_controllers::informer::Informers::new(cluster.clone());
        // Every loop's writes are fenced to this server's leadership: never forwarded.
        let term_runtime = Fenced(term_runtime.clone());
        let mut tasks = vec![
            term_runtime.spawn(corral_controllers::scheduling::run(cluster.clone(), informers.clone(), name.clone())),
            term_runtime.spawn(corral_controllers::replicaset::run(cluster.clone(), informers.clone(), name.clone())),
            term_runtime.spawn(corral_controllers::deployment::run(cluster.clone(), informers.clone(), name.clone())),
            term_runtime.spawn(corral_controllers::nodelifecycle::run(
                cluster.clone(),
                informers.clone(),
                name.clone(),
                grace,
            )),
            term_runtime.spawn(corral_controllers::endpoints::run(cluster.clone(), informers.clone())),
            term_runtime.spawn(corral_controllers::volumes::run(cluster.clone(), informers.clone())),
            term_runtime.spawn(corral_controllers::gc::run(cluster.clone(), informers.clone())),
            term_runtime.spawn(corral_controllers::podautoscaler::run(
                cluster.clone(),
                informers.clone(),
                name.clone(),
            )),
            term_runtime.spawn(corral_apiserver::namespaces::run_controller(leader_store.clone())),
        ];
        if let Some(allocator) = allocator {
            tasks.push(term_runtime.spawn(corral_controllers::nodeipam::run(
                cluster.clone(),
                informers.clone(),
                allocator,
            )));
        }
        tasks
    }));
    tokio::spawn(async move {
        for _ in 0..600 {
            match corral_apiserver::namespaces::ensure_system(&store, &corral_api::meta::SystemMinter, &ranges).await {
                Ok(()) => return,
                Err(e) => tracing::debug!(error = %e, "system namespaces not created yet"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::warn!("gave up creating the system namespaces");
    });
    Ok(tokio::spawn(async move {
        if let Err(e) = corral_apiserver::serve(listener, config, api, stop).await {
            tracing::error!(error = %e, "the Kubernetes API stopped");
        }
    }))
}

/// The control loops' runtime, spawning each task inside `LEADER_ONLY`.
struct Fenced(tokio::runtime::Handle);

impl Fenced {
    fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.spawn(corral_store::node::LEADER_ONLY.scope(true, task))
    }
}

/// This server's member and cluster ids: from its data directory, else derived from the
/// initial cluster (new), else learned from a running member (existing).
async fn identify(args: &ServerArgs, initial: &[(String, String)], peers: &Peers) -> Result<Identity> {
    let path = args.data_dir.join("member.json");
    if let Ok(raw) = std::fs::read(&path) {
        return serde_json::from_slice(&raw).with_context(|| format!("{} is corrupt", path.display()));
    }
    let identity = match args.initial_cluster_state {
        ClusterState::New => {
            let mut ids: Vec<u64> =
                initial.iter().map(|(name, url)| stable_id(&[name, url, &args.initial_cluster_token])).collect();
            ids.sort();
            let ids_text: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            Identity {
                member_id: stable_id(&[&args.name, args.peer_url(), &args.initial_cluster_token]),
                cluster_id: stable_id(&[&ids_text.join(","), &args.initial_cluster_token]),
            }
        }
        ClusterState::Existing => join(args, initial, peers).await?,
    };
    write_atomic(&path, &serde_json::to_vec(&identity)?)?;
    Ok(identity)
}

async fn join(args: &ServerArgs, initial: &[(String, String)], peers: &Peers) -> Result<Identity> {
    let mut last_error = String::from("no other member in --initial-cluster");
    for attempt in 0..30 {
        for (_, url) in initial.iter().filter(|(name, _)| name != &args.name) {
            let Ok(mut client) = peers.client(url) else { continue };
            match client.cluster_info(ClusterInfoRequest {}).await {
                // A member that has not formed its cluster yet (started a moment ago) lists
                // nobody: ask again rather than conclude this server was never added.
                Ok(info) if info.get_ref().members.is_empty() => {
                    last_error = format!("{url}: its cluster has not formed yet");
                }
                Ok(info) => {
                    let info = info.into_inner();
                    let me = info.members.iter().find(|m| m.peer_ur_ls.iter().any(|u| u == args.peer_url()));
                    match me {
                        Some(m) => return Ok(Identity { member_id: m.id, cluster_id: info.cluster_id }),
                        None => bail!(
                            "the cluster at {url} has no member with peer URL {}: run `etcdctl member add {} --peer-urls={}` first",
                            args.peer_url(),
                            args.name,
                            args.peer_url()
                        ),
                    }
                }
                Err(e) => last_error = format!("{url}: {}", e.message()),
            }
        }
        if attempt == 0 {
            tracing::info!("waiting for a running member to join through");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("could not reach any member to join: {last_error}")
}

/// Announces this server's name and client URL in the membership, retrying until a leader
/// accepts it (bounded by shutdown).
async fn publish(node: Arc<StoreNode>, name: String, client_url: String, mut stop: tokio::sync::watch::Receiver<bool>) {
    for attempt in 0u32.. {
        let current = node.members().into_iter().find(|m| m.id == node.id());
        if let Some(m) = &current
            && m.name == name
            && m.client_ur_ls == [client_url.clone()]
        {
            return;
        }
        if current.is_some() {
            let change =
                MemberChange::Publish { id: node.id(), name: name.clone(), client_urls: vec![client_url.clone()] };
            match node.member_change(change).await {
                Ok(_) => return,
                Err(e) if attempt % 10 == 9 => tracing::warn!(error = %e, "still publishing member attributes"),
                Err(_) => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Reports when this server's runtime could not run a task on time: a worker thread held by
/// plain computation or a blocking call delays Raft's heartbeats and every connection with
/// it. A plain thread beside it tells a stalled runtime (the thread was on time) from a
/// starved process or machine (both late).
async fn watch_for_stalls() {
    const TICK: std::time::Duration = std::time::Duration::from_millis(50);
    let thread_late = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let late = thread_late.clone();
    let _ = std::thread::Builder::new().name("stall-watch".into()).spawn(move || {
        loop {
            let t = std::time::Instant::now();
            std::thread::sleep(TICK);
            let ms = (t.elapsed().saturating_sub(TICK)).as_millis() as u64;
            late.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
        }
    });
    loop {
        let t = std::time::Instant::now();
        tokio::time::sleep(TICK).await;
        let ms = (t.elapsed().saturating_sub(TICK)).as_millis() as u64;
        // The thread's lateness over this same tick.
        let thread_ms = thread_late.swap(0, std::sync::atomic::Ordering::Relaxed);
        if ms >= 100 {
            match ms >= 1000 {
                true => tracing::warn!(late_ms = ms, thread_late_ms = thread_ms, "runtime stalled"),
                false => tracing::debug!(late_ms = ms, thread_late_ms = thread_ms, "runtime stalled"),
            }
        }
    }
}
