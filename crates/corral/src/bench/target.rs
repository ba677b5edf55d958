//! A benchmark target: endpoints, TLS, and (for local clusters) the server processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use corral_proto::etcdserverpb::StatusRequest;
use corral_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::TargetArgs;

/// One server process of a local cluster, and how to start it again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Process {
    pub name: String,
    pub client_url: String,
    pub pid: u32,
    /// argv to start it again (etcd); empty for Corral, which `corral up` restarts.
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub log: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub tls: Option<ClientTlsConfig>,
    /// The same certificates as a rustls configuration (for the load generator's own client).
    pub rustls: Option<Arc<rustls::ClientConfig>>,
    pub state_dir: Option<PathBuf>,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Corral,
    Etcd,
    Remote,
}

impl Target {
    pub fn from_args(args: &TargetArgs) -> Result<Self> {
        if let Some(dir) = &args.state_dir {
            let env = std::fs::read_to_string(dir.join("etcdctl.env"))
                .with_context(|| format!("{} has no etcdctl.env: is a cluster up there?", dir.display()))?;
            let get = |k: &str| {
                env.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")))
                    .map(str::to_string)
                    .with_context(|| format!("etcdctl.env lacks {k}"))
            };
            let endpoints = get("ETCDCTL_ENDPOINTS")?.split(',').map(str::to_string).collect();
            let (ca, cert, key) = (get("ETCDCTL_CACERT")?, get("ETCDCTL_CERT")?, get("ETCDCTL_KEY")?);
            let (tls, rustls) = tls(Path::new(&ca), Path::new(&cert), Path::new(&key))?;
            let kind = if dir.join("etcd.json").exists() { Kind::Etcd } else { Kind::Corral };
            return Ok(Self { endpoints, tls: Some(tls), rustls: Some(rustls), state_dir: Some(dir.clone()), kind });
        }
        let Some(endpoints) = &args.endpoints else { bail!("give --state-dir DIR or --endpoints URL[,URL...]") };
        let (tls, rustls) = match (&args.cacert, &args.cert, &args.key) {
            (Some(ca), Some(cert), Some(key)) => {
                let (tls, rustls) = tls(ca, cert, key)?;
                (Some(tls), Some(rustls))
            }
            (None, None, None) => (None, None),
            _ => bail!("--cacert, --cert and --key go together"),
        };
        Ok(Self {
            endpoints: endpoints.split(',').map(str::to_string).collect(),
            tls,
            rustls,
            state_dir: None,
            kind: Kind::Remote,
        })
    }

    /// A local cluster's state directory (from `corral up` or `corral bench etcd up`).
    pub fn local(state_dir: &Path) -> Result<Self> {
        Self::from_args(&TargetArgs {
            state_dir: Some(state_dir.to_path_buf()),
            endpoints: None,
            cacert: None,
            cert: None,
            key: None,
        })
    }

    pub fn channel(&self, url: &str) -> Result<Channel> {
        let mut endpoint =
            Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_millis(500)).tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// The server processes of a local cluster.
    pub fn processes(&self) -> Result<Vec<Process>> {
        let dir = self.state_dir.as_ref().context("failover needs --state-dir")?;
        let (file, key) = match self.kind {
            Kind::Etcd => ("etcd.json", "members"),
            _ => ("cluster.json", "servers"),
        };
        let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(file))?)?;
        Ok(serde_json::from_value(raw[key].clone())?)
    }

    /// Sends `signal` to a local cluster's member `name`, if its recorded process is still
    /// the one started for this state directory.
    pub fn signal(&self, name: &str, signal: i32) -> Result<()> {
        let dir = self.state_dir.as_ref().context("signals need --state-dir")?;
        let p = self.processes()?.into_iter().find(|p| p.name == name).with_context(|| format!("no member {name}"))?;
        if !super::etcd::owns(p.pid, dir) {
            bail!("{name} (pid {}) is not running", p.pid);
        }
        // SAFETY: kill(2) on a pid we started and just checked.
        unsafe { libc::kill(p.pid as i32, signal) };
        Ok(())
    }

    /// Starts a killed member of a local cluster again: `corral up` for Corral (which starts
    /// every server that is not running), the recorded argv for etcd.
    pub fn restart(&self, name: &str) -> Result<()> {
        self.restart_with_env(name, &[])
    }

    /// As [`Target::restart`], with `env` added to the restarted process's environment.
    pub fn restart_with_env(&self, name: &str, env: &[(&str, &str)]) -> Result<()> {
        let dir = self.state_dir.as_ref().context("restarts need --state-dir")?;
        match self.kind {
            Kind::Corral => {
                let servers = self.processes()?.len();
                let status = std::process::Command::new(std::env::current_exe()?)
                    .args(["up", "--servers", &servers.to_string(), "--timeout-s", "30", "--state-dir"])
                    .arg(dir)
                    .envs(env.iter().copied())
                    .stdout(std::process::Stdio::null())
                    .status()?;
                if !status.success() {
                    bail!("corral up could not restart {name}");
                }
            }
            Kind::Etcd if !env.is_empty() => bail!("etcd has no failpoints of ours"),
            Kind::Etcd => {
                let mut processes = self.processes()?;
                for p in processes.iter_mut().filter(|p| p.name == name) {
                    let log = p.log.clone().unwrap_or_else(|| dir.join(format!("{name}.log")));
                    p.pid = super::etcd::spawn(&p.argv, &log)?;
                }
                super::etcd::save(dir, &processes)?;
            }
            Kind::Remote => bail!("{name} is remote: only a local cluster's members can be restarted"),
        }
        Ok(())
    }

    /// CPU seconds (user and system) used so far by a local cluster's server processes.
    pub fn server_cpu_s(&self) -> Option<f64> {
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let mut total = 0.0;
        for p in self.processes().ok()? {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            total += (user + system) / ticks;
        }
        Some(total)
    }

    /// The endpoint of the current leader and the leader's member id.
    pub async fn leader(&self) -> Result<(String, u64)> {
        let mut leader = 0;
        let mut ids = Vec::new();
        for url in &self.endpoints {
            let Ok(resp) = tokio::time::timeout(Duration::from_secs(1), async {
                MaintenanceClient::new(self.channel(url)?).status(StatusRequest {}).await.map_err(anyhow::Error::from)
            })
            .await
            else {
                continue;
            };
            let Ok(resp) = resp else { continue };
            let resp = resp.into_inner();
            if resp.leader != 0 {
                leader = resp.leader;
            }
            ids.push((url.clone(), resp.header.map(|h| h.member_id).unwrap_or(0)));
        }
        match ids.into_iter().find(|(_, id)| *id == leader && leader != 0) {
            Some((url, id)) => Ok((url, id)),
            None => bail!("no leader reachable"),
        }
    }
}

/// The client certificates, as tonic's configuration and as rustls's (HTTP/2 by ALPN).
fn tls(ca: &Path, cert: &Path, key: &Path) -> Result<(ClientTlsConfig, Arc<rustls::ClientConfig>)> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let tonic = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .identity(Identity::from_pem(read(cert)?, read(key)?));
    Ok((tonic, Arc::new(corral_transport::tls::h2_client_config(ca, cert, key)?)))
}
