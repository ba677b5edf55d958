//! The end-to-end harness: a local cluster of real `corral server` processes made with
//! `corral up`, and the real `etcdctl` pointed at it. Each test takes its own ports and
//! state directory, and the cluster is taken down when the test ends, pass or fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// The corral binary under test: `$CORRAL_BIN`, or the one beside the test's target dir.
pub fn corral_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("CORRAL_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable");
    // target/debug/deps/test-HASH -> target/debug/corral
    exe.parent().and_then(Path::parent).map(|d| d.join("corral")).expect("target dir")
}

/// Starts tracing output for a test, once.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
}

/// A server of the cluster, as `corral up` recorded it.
#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub api_url: String,
    pub pid: u32,
}

/// A local cluster made by `corral up`.
pub struct Cluster {
    /// Owned by the handle that made the cluster; None for an adopted handle.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub base_port: u16,
}

impl Cluster {
    /// `corral up --servers N` on ports from `base_port`, with extra flags.
    pub fn up(servers: usize, base_port: u16, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("corral-e2e-").tempdir()?;
        let cluster = Self { path: dir.path().to_path_buf(), dir: Some(dir), base_port };
        cluster.run_up(servers, extra)?;
        Ok(cluster)
    }

    fn run_up(&self, servers: usize, extra: &[&str]) -> Result<()> {
        let mut cmd = Command::new(corral_bin());
        cmd.args(["up", "--servers", &servers.to_string(), "--base-port", &self.base_port.to_string()])
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(extra);
        // Servers only unless a test asks for agents (a new cluster would get two; an existing
        // one keeps its count).
        let new = !self.state_dir().join("cluster.json").exists();
        if new && !extra.contains(&"--agents") && !extra.contains(&"--etcd-only") {
            cmd.args(["--agents", "0", "--dedicated-servers"]);
        }
        let out = cmd.output().context("running corral up")?;
        if !out.status.success() {
            bail!("corral up failed:\n{}{}\n{}", text(&out.stdout), text(&out.stderr), self.logs());
        }
        Ok(())
    }

    /// Runs `corral up` again: restarts any server that is not running.
    pub fn restart_stopped(&self, servers: usize) -> Result<()> {
        self.run_up(servers, &[])
    }

    /// Runs `corral up` again with flags (`--agents N` restarts agents that are not running).
    pub fn up_again(&self, servers: usize, extra: &[&str]) -> Result<()> {
        self.run_up(servers, extra)
    }

    /// An agent's log (`corral up --agents`).
    pub fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_dir().join("agents").join(name).join("agent.log")).unwrap_or_default()
    }

    /// The pid of an agent (`corral up --agents`), from cluster.json.
    pub fn agent_pid(&self, name: &str) -> Result<u32> {
        let raw = std::fs::read(self.state_dir().join("cluster.json"))?;
        let record: serde_json::Value = serde_json::from_slice(&raw)?;
        let agents = record["agents"].as_array().context("cluster.json has no agents")?;
        let agent = agents.iter().find(|a| a["name"] == name).context("no such agent")?;
        agent["pid"].as_u64().map(|p| p as u32).context("the agent has no pid")
    }

    /// A second handle on the same cluster, for tasks that outlive a borrow; it does not
    /// take the cluster down when dropped.
    pub fn adopt(other: &Cluster) -> Cluster {
        Cluster { dir: None, path: other.path.clone(), base_port: other.base_port }
    }

    pub fn state_dir(&self) -> &Path {
        &self.path
    }

    pub fn servers(&self) -> Result<Vec<Server>> {
        let raw = std::fs::read(self.state_dir().join("cluster.json"))?;
        let record: serde_json::Value = serde_json::from_slice(&raw)?;
        let servers = record["servers"].as_array().context("cluster.json has no servers")?;
        Ok(servers
            .iter()
            .map(|s| Server {
                name: s["name"].as_str().unwrap_or_default().to_string(),
                client_url: s["client_url"].as_str().unwrap_or_default().to_string(),
                peer_url: s["peer_url"].as_str().unwrap_or_default().to_string(),
                api_url: s["api_url"].as_str().unwrap_or_default().to_string(),
                pid: s["pid"].as_u64().unwrap_or(0) as u32,
            })
            .collect())
    }

    /// The environment etcdctl needs, from `DIR/etcdctl.env`.
    pub fn etcdctl_env(&self) -> Result<Vec<(String, String)>> {
        let raw = std::fs::read_to_string(self.state_dir().join("etcdctl.env"))?;
        Ok(raw.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// An etcdctl command against every endpoint.
    pub fn etcdctl(&self) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.envs(self.etcdctl_env().expect("etcdctl.env"));
        cmd
    }

    /// An etcdctl command against one endpoint only.
    pub fn etcdctl_at(&self, url: &str) -> Command {
        let mut cmd = self.etcdctl();
        cmd.env_remove("ETCDCTL_ENDPOINTS").arg(format!("--endpoints={url}"));
        cmd
    }

    /// Runs etcdctl with `args`; fails with its output if it fails.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        run(self.etcdctl().args(args), None)
    }

    /// Runs etcdctl with `args`; its stdout and stderr (some commands report on stderr).
    pub fn ctl_combined(&self, args: &[&str]) -> Result<String> {
        let out = self.etcdctl().args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("etcdctl {args:?} failed ({}):\n{}{}", out.status, text(&out.stdout), text(&out.stderr));
        }
        Ok(text(&out.stdout) + &text(&out.stderr))
    }

    /// Runs etcdctl with `args` and `stdin`.
    pub fn ctl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        run(self.etcdctl().args(args), Some(stdin))
    }

    /// kubectl with the cluster's kubeconfig and a discovery cache of its own.
    pub fn kubectl(&self) -> Command {
        self.kubectl_version("kubectl")
    }

    /// kubectl from a given binary (`kubectl.1.27` ...), with this cluster's kubeconfig.
    pub fn kubectl_version(&self, binary: &str) -> Command {
        let mut cmd = Command::new(binary);
        cmd.env("KUBECONFIG", self.state_dir().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.state_dir().join("kube-cache"));
        cmd
    }

    /// Runs kubectl with `args`; fails with its output if it fails.
    pub fn kube(&self, args: &[&str]) -> Result<String> {
        run(self.kubectl().args(args), None)
    }

    /// Runs kubectl with `args`, feeding it `stdin` (`apply -f -`).
    pub fn kube_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        run(self.kubectl().args(args), Some(stdin))
    }

    /// Runs kubectl with `args` against one server's API ([`Cluster::api_url`]).
    pub fn kube_at(&self, server: &str, args: &[&str]) -> Result<String> {
        run(self.kubectl().arg(format!("--server={server}")).args(args), None)
    }

    /// Runs kubectl with `args` every 100 ms until `done` accepts its output (returned), or
    /// fails after `timeout` with the last output and the cluster's logs.
    pub fn kube_until(&self, args: &[&str], timeout: Duration, done: impl Fn(&str) -> bool) -> Result<String> {
        let started = std::time::Instant::now();
        let mut last = String::new();
        while started.elapsed() < timeout {
            match self.kube(args) {
                Ok(out) if done(&out) => return Ok(out),
                Ok(out) => last = out,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("kubectl {args:?} did not get there in {timeout:?}; last: {last}\n{}", self.logs())
    }

    /// Runs kubectl with `args`, expecting it to fail; returns what it printed on stderr.
    pub fn kube_fails(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).stdin(Stdio::null()).output()?;
        if out.status.success() {
            bail!("kubectl {args:?} succeeded but should have failed:\n{}", text(&out.stdout));
        }
        Ok(text(&out.stderr))
    }

    /// The Kubernetes API URL of server `i` (0-based), as `corral up` recorded it (its node
    /// address, or the host's loopback for an etcd-only cluster).
    pub fn api_url(&self, i: usize) -> String {
        self.servers().ok().and_then(|s| s.get(i).map(|s| s.api_url.clone())).unwrap_or_default()
    }

    /// Points the cluster's kubeconfig at server `i` (as a user does when the server in it
    /// died), with kubectl itself.
    pub fn use_server(&self, i: usize) -> Result<()> {
        let url = self.api_url(i);
        ensure!(!url.is_empty(), "no server {i} in cluster.json");
        run(self.kubectl().args(["config", "set-cluster", "corral", &format!("--server={url}")]), None).map(|_| ())
    }

    /// The last lines of every server's and agent's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (kind, file) in [("servers", "server.log"), ("agents", "agent.log")] {
            let Ok(entries) = std::fs::read_dir(self.state_dir().join(kind)) else { continue };
            for e in entries.flatten() {
                let log = std::fs::read_to_string(e.path().join(file)).unwrap_or_default();
                // A backtrace would fill the tail: its frames are left out, its error stays.
                let tail: Vec<&str> = log.lines().rev().filter(|l| !backtrace_frame(l)).take(30).collect();
                out.push_str(&format!("--- {kind}/{} (last lines) ---\n", e.file_name().to_string_lossy()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// SIGKILLs one server.
    pub fn kill(&self, name: &str) -> Result<()> {
        let server = self.servers()?.into_iter().find(|s| s.name == name).context("no such server")?;
        unsafe { libc::kill(server.pid as i32, libc::SIGKILL) };
        // Reap it if it was our child (it is not: corral up detached it), and wait until gone.
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{}", server.pid)).exists() || is_zombie(server.pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("server {name} (pid {}) did not die", server.pid)
    }

    /// The leader's name, as the first answering server reports it.
    pub fn leader(&self) -> Result<Server> {
        let servers = self.servers()?;
        for s in &servers {
            let Ok(out) = run(self.etcdctl_at(&s.client_url).args(["endpoint", "status", "-w", "json"]), None) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&out)?;
            let leader = v[0]["Status"]["leader"].as_u64().unwrap_or(0);
            let me = v[0]["Status"]["header"]["member_id"].as_u64().unwrap_or(0);
            if leader == 0 {
                continue;
            }
            if leader == me {
                return Ok(s.clone());
            }
            // Ask the others who they are.
            for other in &servers {
                if let Ok(out) =
                    run(self.etcdctl_at(&other.client_url).args(["endpoint", "status", "-w", "json"]), None)
                {
                    let v: serde_json::Value = serde_json::from_str(&out)?;
                    if v[0]["Status"]["header"]["member_id"].as_u64() == Some(leader) {
                        return Ok(other.clone());
                    }
                }
            }
        }
        bail!("no server reports a leader")
    }
}

impl Cluster {
    /// A gRPC channel to one server, with the admin certificate.
    pub async fn channel(&self, url: &str) -> Result<tonic::transport::Channel> {
        let pki = self.state_dir().join("pki");
        let read = |name: &str| std::fs::read_to_string(pki.join(name));
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")?))
            .identity(tonic::transport::Identity::from_pem(read("admin.crt")?, read("admin.key")?));
        Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy())
    }

    /// Starts `corral server` for `name` by hand with extra flags (joining, say), and records
    /// its pid so `corral down` stops it.
    pub fn start_server(&self, name: &str, extra: &[&str]) -> Result<()> {
        let servers = self.servers()?;
        let me = servers.iter().find(|s| s.name == name).context("no such server")?;
        let initial: Vec<String> = servers.iter().map(|s| format!("{}={}", s.name, s.peer_url)).collect();
        let server_dir = self.state_dir().join("servers").join(name);
        std::fs::create_dir_all(&server_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(server_dir.join("server.log"))?;
        // In the server's node namespace, when it has one, as `corral up` starts it.
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(self.state_dir().join("cluster.json"))?)?;
        let netns = record["servers"]
            .as_array()
            .and_then(|list| list.iter().find(|s| s["name"] == name))
            .and_then(|s| s["netns"].as_str().map(str::to_string));
        let mut command = match &netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(corral_bin());
                c
            }
            None => Command::new(corral_bin()),
        };
        let child = command
            .args([
                "server",
                "--name",
                name,
                "--listen-client-urls",
                &me.client_url,
                "--listen-peer-urls",
                &me.peer_url,
            ])
            .arg("--data-dir")
            .arg(server_dir.join("data"))
            .args(["--initial-cluster", &initial.join(",")])
            .arg("--tls-dir")
            .arg(self.state_dir().join("pki"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let path = self.state_dir().join("cluster.json");
        let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        for s in record["servers"].as_array_mut().context("servers")? {
            if s["name"] == name {
                s["pid"] = child.id().into();
            }
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&record)?)?;
        // The child is reaped by nobody until the test ends; corral down stops it by pid.
        std::mem::forget(child);
        Ok(())
    }
}

impl Cluster {
    /// `corral down`: everything the cluster made goes (again at drop: down is idempotent).
    pub fn down(&self) -> Result<()> {
        let status = Command::new(corral_bin())
            .arg("down")
            .arg("--state-dir")
            .arg(self.state_dir())
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("corral down failed: {status}");
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = self.down();
    }
}

fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'))
}

/// The whole response (headers and body) to `GET /` at `addr` (ip:port), over HTTP/1.0.
pub fn http_get(addr: &str, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Runs a command to completion with an optional stdin; its stdout if it succeeded.
pub fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown: String = format!("{cmd:?}").chars().take(300).collect();
    let mut child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    }
    let out: Output = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{shown} failed ({}):\n{}{}", out.status, clip(&text(&out.stdout)), clip(&text(&out.stderr)));
    }
    Ok(text(&out.stdout))
}

/// The first 2000 characters of `s`: enough to see what failed, never a flood.
pub fn clip(s: &str) -> String {
    s.chars().take(2000).collect()
}

pub fn text(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// A line of a printed backtrace: `  12: function` or `      at file:line`.
pub fn backtrace_frame(line: &str) -> bool {
    let l = line.trim_start();
    l.starts_with("at ") || l == "Stack backtrace:" || l.split_once(": ").is_some_and(|(n, _)| n.parse::<u32>().is_ok())
}
