//! `corral agent`: one worker node. Joins with a token (once; the node certificate is kept in
//! the data directory), starts the node's own containerd unless given a socket, imports the
//! image archives, and runs the agent's loops until SIGTERM. Pods outlive the agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_agent::agent::{Agent, LinkLookup};
use corral_agent::containerd::{self, Layout};
use corral_agent::cri::{CriClient, Runtime};
use corral_agent::dns;
use corral_agent::link::{self, Credentials, Handler, Link};
use corral_agent::node::Facts;
use corral_agent::proxy::Nft;
use corral_agent::routes::IpRoutes;
use corral_agent::services::{self, ServiceView};
use corral_agent::streams::Streams;
use corral_agent::worker::{NodeConfig, Worker};

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// A server's agent address (HOST:PORT, the Kubernetes API's port over UDP); repeat or
    /// separate with commas. After joining, the agent also knows every other server.
    #[arg(long = "server", env = "CORRAL_SERVER", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// The join token (`corral token create`); only needed the first time.
    #[arg(long, env = "CORRAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the join token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where the agent keeps its certificate, containerd, pod volumes and logs.
    #[arg(long, default_value = "/var/lib/corral/agent")]
    pub data_dir: PathBuf,
    /// The node's name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// The address other nodes and the servers reach this node at.
    #[arg(long, default_value = "127.0.0.1")]
    pub node_ip: String,
    /// This node's pod CIDR, for its CNI bridge (default: the one the cluster's node IPAM
    /// gives the node; the agent waits for it).
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// The Linux bridge pods attach to.
    #[arg(long, default_value = "cni0")]
    pub bridge: String,
    /// Use a running containerd at this socket instead of starting the node's own.
    #[arg(long)]
    pub containerd_socket: Option<PathBuf>,
    /// OCI image archives imported at start (default: DATA_DIR/images).
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// The cluster DNS server pods resolve through (default: this node's own, on its
    /// bridge's address), and its search domain.
    #[arg(long)]
    pub cluster_dns: Option<String>,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Extra labels for the Node: key=value, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// The nftables table (family ip) the service proxy keeps: cluster IPs and node ports
    /// DNATed to ready endpoints.
    #[arg(long, default_value = "corral")]
    pub proxy_table: String,
    /// Run no service proxy (another one keeps the rules).
    #[arg(long)]
    pub disable_proxy: bool,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_else(|_| "node".into())
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let node_name = args.node_name.clone().unwrap_or_else(host_name);
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let pki = data_dir.join("pki");

    let credentials = match Credentials::load(&pki) {
        Some(c) => c,
        None => {
            let token = match (&args.token, &args.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
                (None, None) => bail!(
                    "this node has not joined yet: pass --token (or --token-file) with a token from `corral token create`"
                ),
            };
            if args.servers.is_empty() {
                bail!("pass --server HOST:PORT (a server's Kubernetes API address) to join through");
            }
            let c = link::join(&args.servers, token.trim(), &node_name).await.context("joining the cluster")?;
            c.save(&pki).with_context(|| format!("saving the node certificate in {}", pki.display()))?;
            println!("joined as node {node_name}; {} servers", c.servers.len());
            c
        }
    };

    let kubelet_version =
        format!("v1.{}.0+corral-{}", corral_apiserver::discovery::KUBE_MINOR, env!("CARGO_PKG_VERSION"));
    let pod_cidr = match &args.pod_cidr {
        Some(cidr) => cidr.clone(),
        None => {
            // A link of its own: the one the agent keeps must be made after the handler of the
            // servers' log, exec and port-forward streams is in place.
            let bootstrap = Arc::new(Link::new(&credentials, &args.servers)?);
            let facts = Facts::gather(&node_name, &args.node_ip, &data_dir, "");
            let cidr = corral_agent::agent::await_pod_cidr(&bootstrap, &facts, &kubelet_version)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(%cidr, "pod CIDR from the cluster");
            cidr
        }
    };

    // The node's own bridge and DNS, unless it uses a containerd (and network) of its own.
    let local_dns = match &args.containerd_socket {
        Some(_) => None,
        None => {
            let cidr = corral_api::net::Cidr::parse(&pod_cidr).map_err(|e| anyhow::anyhow!("pod CIDR: {e}"))?;
            let gateway = cidr.gateway();
            containerd::ensure_bridge(&args.bridge, &format!("{gateway}/{}", cidr.prefix))?;
            Some(std::net::SocketAddr::new(gateway.into(), 53))
        }
    };
    let cluster_dns = args.cluster_dns.clone().or_else(|| local_dns.map(|a| a.ip().to_string()));

    // Images the node was given are never garbage-collected: no registry could restore them.
    let mut pinned_images = vec![corral_image::PAUSE_IMAGE.to_string()];
    let runtime = match &args.containerd_socket {
        Some(socket) => CriClient::new(socket).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => {
            let layout = Layout::new(&data_dir.join("containerd"));
            let cni = containerd::cni_bridge_config(&args.bridge, &pod_cidr, true, &data_dir.join("cni-ipam"));
            let client = containerd::ensure_running(&layout, &cni, Duration::from_secs(30)).await?;
            let images = args.images_dir.clone().unwrap_or_else(|| data_dir.join("images"));
            let started = Instant::now();
            let refs = containerd::import_all(&layout, &images)?;
            tracing::info!(images = refs.len(), dir = %images.display(), ms = started.elapsed().as_millis() as u64, "images imported");
            pinned_images.extend(refs);
            client
        }
    };
    let version = runtime.version().await.context("asking the container runtime its version")?;
    let runtime_version = format!("{}://{}", version.runtime_name, version.runtime_version);

    let link = Arc::new(Link::new(&credentials, &args.servers)?);
    let node = NodeConfig {
        node_name: node_name.clone(),
        host_ip: args.node_ip.clone(),
        cgroup_root: format!("/corral/{node_name}"),
        log_root: data_dir.join("logs"),
        pods_root: data_dir.join("pods"),
        cluster_dns: cluster_dns.map(|ip| (ip, args.cluster_domain.clone())),
        pinned_images,
    };
    let worker = Arc::new(Worker::new(Arc::new(runtime), Arc::new(LinkLookup(link.clone())), node));
    let streams = Arc::new(Streams { worker: worker.clone(), log_root: data_dir.join("logs") });
    let handler: Handler = Arc::new(move |send, recv| Box::pin(streams.clone().serve(send, recv)));
    link.serve_streams(handler);
    let mut facts = Facts::gather(&node_name, &args.node_ip, &data_dir, &runtime_version);
    for label in &args.node_labels {
        let (k, v) = label.split_once('=').with_context(|| format!("--node-labels {label}: want key=value"))?;
        facts.labels.push((k.to_string(), v.to_string()));
    }
    // The Services as this node knows them, for its proxy and its DNS.
    let view = Arc::new(ServiceView::default());
    let mut network = vec![tokio::spawn(view.clone().follow(link.clone()))];
    if !args.disable_proxy {
        network.push(tokio::spawn(services::run_proxy(
            view.clone(),
            Nft,
            args.proxy_table.clone(),
            node_name.clone(),
            Some(pod_cidr.clone()),
        )));
    }
    network.push(tokio::spawn(services::run_routes(view.clone(), IpRoutes { netns: None }, node_name.clone())));
    if let Some(listen) = local_dns {
        let (view, domain) = (view.clone(), args.cluster_domain.clone());
        network.push(tokio::spawn(async move {
            if let Err(e) = dns::serve(listen, view, domain).await {
                tracing::error!(%listen, error = %e, "cluster DNS could not start: is another DNS server bound to port 53?");
            }
        }));
    }
    let agent = Agent::new(worker, link, facts, &kubelet_version);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(agent.run(stop_rx));
    println!("corral agent {node_name} running ({runtime_version})");
    network.push(tokio::spawn(give_back_code_pages()));
    crate::server::wait_for_signal().await;
    tracing::info!("stopping; pods and service rules stay");
    let _ = stop_tx.send(true);
    for t in network {
        t.abort();
    }
    let _ = task.await;
    Ok(())
}

/// Once start-up is over, and then now and then, unmaps the pages of code and constants the
/// agent no longer runs (see `trim`): most of one binary that is also a server.
async fn give_back_code_pages() {
    let mut wait = Duration::from_secs(20);
    loop {
        tokio::time::sleep(wait).await;
        match tokio::task::spawn_blocking(crate::trim::drop_file_pages).await {
            Ok(Ok(bytes)) => tracing::debug!(mib = bytes >> 20, "read-only file pages unmapped"),
            Ok(Err(e)) => tracing::debug!(error = %e, "reading /proc/self/smaps"),
            Err(_) => {}
        }
        wait = Duration::from_secs(600);
    }
}
