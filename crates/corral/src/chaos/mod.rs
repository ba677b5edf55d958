//! `corral chaos run|list`: the chaos harness (crate corral-chaos) against a local cluster of
//! processes: Corral from `corral up`, or Debian's etcd 3.4 from `corral bench etcd up`, the
//! anchor the checkers must pass on.

mod kube;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use corral_chaos::checks::Check;
use corral_chaos::proxy::{Knob, LinkProxy, Shaping};
use corral_chaos::runner::{self, Cluster, Error, Options};
use corral_chaos::scenario::{self, Fault, SCENARIOS};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::bench::Target;
use crate::local::{ClusterRecord, ServerRecord};
use crate::nodenet;

#[derive(Subcommand, Debug)]
pub enum ChaosCommand {
    /// The scenarios and the faults they inject.
    List,
    /// Run a scenario: workload, faults, heal, checkers; a summary table at the end.
    Run(RunArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Corral,
    /// Debian's etcd 3.4 (the anchor: the checkers must pass on it).
    Etcd,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A scenario from `corral chaos list`.
    pub scenario: String,
    /// Seeds the fault schedule and the workload; a failure replays with the same seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds of faults (the last round completes).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    #[arg(long, value_enum, default_value_t = System::Corral)]
    pub system: System,
    /// A cluster to use as it is; without it the run brings one up in
    /// /var/tmp/corral-chaos/SYSTEM-SCENARIO-SEED and removes it if every checker passes.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// First port of the cluster the run brings up.
    #[arg(long, default_value_t = 26600)]
    pub base_port: u16,
    /// Workload clients (each a sequence of reads, puts, txns and deletes).
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    /// Keep the cluster the run brought up even when every checker passes.
    #[arg(long)]
    pub keep: bool,
}

pub async fn run(cmd: ChaosCommand) -> Result<()> {
    match cmd {
        ChaosCommand::List => {
            for s in SCENARIOS {
                println!("{:<20} {}", s.name, s.about);
            }
            Ok(())
        }
        ChaosCommand::Run(args) => run_scenario(args).await,
    }
}

async fn run_scenario(args: RunArgs) -> Result<()> {
    let Some(scenario) = scenario::find(&args.scenario) else {
        bail!("no scenario {:?}: `corral chaos list` shows them", args.scenario);
    };
    let system = args.system.to_string();
    let (dir, ours) = match &args.state_dir {
        Some(dir) => (dir.clone(), false),
        None => (PathBuf::from(format!("/var/tmp/corral-chaos/{system}-{}-{}", scenario.name, args.seed)), true),
    };
    if scenario.kube && args.system == System::Etcd {
        bail!("{} runs a Kubernetes workload: Corral only", scenario.name);
    }
    if ours {
        bring_up(args.system, &dir, args.base_port, scenario.kube)?;
    }
    let target = Target::local(&dir)?;
    let record = match args.system {
        System::Corral => ClusterRecord::load(&dir)?.filter(|r| r.network.is_some()),
        System::Etcd => None,
    };
    let kube = match (&record, scenario.kube) {
        (Some(record), true) => {
            Some(Arc::new(kube::Kube::new(dir.join("pki"), record.servers.iter().map(|s| s.api_url.clone()).collect())))
        }
        _ => None,
    };
    let cluster = Processes { target, record, knob: Knob::default(), proxies: Mutex::new(Vec::new()), kube };
    if scenario.shapes_links() {
        cluster.route_links_through_proxies().await?;
    }
    if scenario.fakes_clocks() {
        cluster.fake_clocks().await?;
    }
    let options = Options {
        seed: args.seed,
        duration: Duration::from_secs(args.duration),
        clients: args.clients,
        ..Options::default()
    };
    // The Kubernetes workload runs from before the first fault to the end of the last.
    let kube_run = match &cluster.kube {
        Some(kube) => {
            kube.prepare().await?;
            let channels = cluster.channels()?;
            let start = runner::current_revision(&channels).await? + 1;
            let stop = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(kube.clone().run_workload(args.seed, stop.clone()));
            Some((kube.clone(), start, stop, task))
        }
        None => None,
    };
    let mut report = runner::run(&cluster, scenario, &options).await?;
    if let Some((kube, start, stop, task)) = kube_run {
        stop.store(true, Ordering::Relaxed);
        let _ = task.await;
        report.checks.extend(judge_control_plane(&kube, &cluster.channels()?, start, args.seed).await);
    }
    let out = dir.join("chaos");
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!("{}-{}.json", scenario.name, args.seed));
    let record = serde_json::json!({"faults": report.faults, "history": report.history});
    std::fs::write(&file, serde_json::to_vec(&record)?)?;
    println!("{}", report.render());
    if !report.passed() {
        println!("kept for inspection: {} (history), {}", file.display(), logs_hint(args.system, &dir));
        println!(
            "replay: corral chaos run {} --seed {} --duration {} --system {system}",
            scenario.name, args.seed, args.duration
        );
        bail!("scenario {} failed with seed {}", scenario.name, args.seed);
    }
    if ours && !args.keep {
        tear_down(args.system, &dir)?;
    }
    Ok(())
}

/// The control plane's checkers, once the workload has stopped and the deployments have
/// settled: the Kubernetes workload did real work, it settles, and the store's record of
/// the run passes bound once, replicas bounded and unique allocations.
async fn judge_control_plane(kube: &kube::Kube, channels: &[Channel], start: i64, seed: u64) -> Vec<Check> {
    let (answered, failed) = (kube.answered.load(Ordering::Relaxed), kube.failed.load(Ordering::Relaxed));
    let mut checks = vec![Check {
        name: "kube workload",
        criterion: "Kubernetes clients had at least 5 requests answered (creates, scales, rollouts, deletes)",
        passed: answered >= 5,
        detail: format!("{answered} answered, {failed} failed"),
    }];
    let settled = kube.settle(Duration::from_secs(90)).await;
    checks.push(Check {
        name: "deployments settle",
        criterion: "every Deployment has its replicas updated and available within 90 s of the end",
        passed: settled.is_ok(),
        detail: match settled {
            Ok(took) => format!("after {:.1} s", took.as_secs_f64()),
            Err(unsettled) => format!("not settled after 90 s: {unsettled}"),
        },
    });
    match kube::read_log(channels, start, seed, Duration::from_secs(60)).await {
        Some(log) => {
            info!(initial = log.initial.len(), changes = log.changes.len(), "control-plane log read");
            checks.push(corral_chaos::kube::bound_once(&log));
            checks.push(corral_chaos::kube::replicas_bounded(&log));
            checks.push(corral_chaos::kube::unique_allocations(&log));
            checks.push(corral_chaos::kube::nodes_stayed_ready(&log));
        }
        None => checks.push(Check {
            name: "control plane judged",
            criterion: "the store's record of the run's objects can be read back",
            passed: false,
            detail: "no member served the /registry/ log".into(),
        }),
    }
    checks
}

/// Bytes in the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// KiB available on the filesystem holding `path`.
fn free_kib(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("df").args(["-k", "--output=avail"]).arg(path).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().nth(1)?.trim().parse().ok()
}

/// Runs a command to completion; its stderr in the error.
fn run_tool(program: &str, args: &[&str]) -> Result<(), Error> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Cluster(format!("{program}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Cluster(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn logs_hint(system: System, dir: &Path) -> String {
    match system {
        System::Corral => format!("{0}/servers/*/server.log (logs), {0}/servers/*/data (data)", dir.display()),
        System::Etcd => format!("{0}/e*.log (logs), {0}/e* (data)", dir.display()),
    }
}

/// Brings up a fresh 3-member cluster in `dir` (removing what a previous run left there);
/// with `nodes`, two worker agents with their containerds beside the servers.
fn bring_up(system: System, dir: &Path, base_port: u16, nodes: bool) -> Result<()> {
    if dir.exists() {
        tear_down(system, dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let exe = std::env::current_exe()?;
    let port = base_port.to_string();
    let mut cmd = std::process::Command::new(exe);
    match system {
        // Small snapshot intervals: failpoint rounds need snapshots built, purged and sent.
        System::Corral => cmd.args([
            "up",
            "--servers",
            "3",
            "--agents",
            if nodes { "2" } else { "0" },
            "--dedicated-servers",
            "--snapshot-count",
            "500",
            "--snapshot-catchup-entries",
            "100",
            "--base-port",
            &port,
        ]),
        System::Etcd => cmd.args(["bench", "etcd", "up", "--base-port", &port]),
    };
    let status = cmd.arg("--state-dir").arg(dir).stdout(std::process::Stdio::null()).status()?;
    if !status.success() {
        bail!("could not bring up a {system} cluster in {}", dir.display());
    }
    Ok(())
}

fn tear_down(system: System, dir: &Path) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    match system {
        System::Corral => cmd.arg("down"),
        System::Etcd => cmd.args(["bench", "etcd", "down"]),
    };
    let status = cmd.arg("--state-dir").arg(dir).stdout(std::process::Stdio::null()).status()?;
    if !status.success() {
        bail!("could not remove the cluster in {}", dir.display());
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// A local cluster's processes, faulted by signals and restarted as they were started; for
/// Corral, whose servers have node namespaces, also cut off by nftables there and slowed by
/// proxies on their peer links.
struct Processes {
    target: Target,
    /// Corral's cluster record, when its servers have namespaces.
    record: Option<ClusterRecord>,
    /// The shaping of every peer link, once they run through `proxies`.
    knob: Knob,
    proxies: Mutex<Vec<LinkProxy>>,
    /// The Kubernetes API, for scenarios with nodes.
    kube: Option<Arc<kube::Kube>>,
}

/// The table a cut lives in, in the victim's namespace.
const CUT_TABLE: &str = "inet corral-chaos-cut";
/// The table that sends peer links through the proxies, in every server's namespace.
const LINKS_TABLE: &str = "ip corral-chaos-links";
/// Attempts at making the balloon that fills a small disk (the server writes meanwhile).
const BALLOON_TRIES: u32 = 5;

fn peer_addr(server: &ServerRecord) -> Result<SocketAddr, Error> {
    crate::urls::socket_addr(&server.peer_url).map_err(|e| Error::Cluster(format!("{}: {e:#}", server.name)))
}

fn cluster_error(e: anyhow::Error) -> Error {
    Error::Cluster(format!("{e:#}"))
}

impl Processes {
    /// Signals a member; one that has already exited on its own (a crash the faults led to,
    /// which the checkers judge) is left as it is: killing or pausing it again is moot.
    fn signal(&self, member: &str, signal: i32) -> Result<(), Error> {
        if !Cluster::running(self, member) {
            warn!(member, signal, "the member has already exited; not signalled");
            return Ok(());
        }
        self.target.signal(member, signal).map_err(cluster_error)
    }

    /// The servers with namespaces: network faults need them.
    fn servers(&self) -> Result<&[ServerRecord], Error> {
        match &self.record {
            Some(record) if record.servers.iter().all(|s| s.netns.is_some()) => Ok(&record.servers),
            _ => Err(Error::Cluster(
                "network faults need Corral's servers in node namespaces (`corral up` without --host-network); \
                 etcd's members share this host's loopback"
                    .into(),
            )),
        }
    }

    fn server(&self, member: &str) -> Result<&ServerRecord, Error> {
        self.servers()?.iter().find(|s| s.name == member).ok_or_else(|| Error::Cluster(format!("no server {member}")))
    }

    /// Restarts every server, one at a time, with libfaketime reading its wall clock's
    /// offset from `DIR/servers/NAME/clock` (re-read every second; the monotonic clock is
    /// left alone, as an NTP step leaves it).
    async fn fake_clocks(&self) -> Result<(), Error> {
        let library = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
            .iter()
            .map(|arch| PathBuf::from(format!("/usr/lib/{arch}/faketime/libfaketimeMT.so.1")))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Error::Cluster("clock jumps need libfaketime (deploy/install-deps.sh installs it)".into())
            })?;
        for server in self.servers()?.to_vec() {
            let file = self.clock_file(&server.name)?;
            std::fs::write(&file, "+0\n").map_err(|e| Error::Cluster(format!("{}: {e}", file.display())))?;
            self.kill(&server.name).await?;
            let name = server.name.clone();
            let env = [
                ("LD_PRELOAD", library.display().to_string()),
                ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
                ("FAKETIME_CACHE_DURATION", "1".to_string()),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
            ];
            self.restart_with(&name, &env).await?;
        }
        info!("every server's wall clock is faked (offset 0 until a jump)");
        Ok(())
    }

    /// A server's data directory, the small filesystem's mount point, and where the data
    /// directory waits while the server runs on the small one.
    fn disk_paths(&self, member: &str) -> Result<(PathBuf, PathBuf, PathBuf), Error> {
        self.server(member)?;
        let server = self.server_dir(member)?;
        Ok((server.join("data"), server.join("small-disk"), server.join("data.full-disk")))
    }

    fn clock_file(&self, member: &str) -> Result<PathBuf, Error> {
        Ok(self.server_dir(member)?.join("clock"))
    }

    /// `DIR/servers/NAME`: a Corral server's data, log, clock file.
    fn server_dir(&self, member: &str) -> Result<PathBuf, Error> {
        let dir = self.target.state_dir.as_ref().ok_or_else(|| Error::Cluster("no state directory".into()))?;
        Ok(dir.join("servers").join(member))
    }

    /// Starts a killed member again (`corral up`, which waits for the cluster: off the
    /// runtime's worker threads), with `env` added to its environment.
    async fn restart_with(&self, member: &str, env: &[(&str, String)]) -> Result<(), Error> {
        let (target, member) = (self.target.clone(), member.to_string());
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            target.restart_with_env(&member, &env)
        })
        .await
        .map_err(|e| Error::Cluster(e.to_string()))?
        .map_err(cluster_error)
    }

    /// Starts a proxy per directed peer link, sends each server's connections to its peers
    /// through them (DNAT in its namespace), and restarts every server so that no link
    /// bypasses them.
    async fn route_links_through_proxies(&self) -> Result<(), Error> {
        let servers = self.servers()?.to_vec();
        let host = self.record.as_ref().and_then(|r| r.network.as_ref()).map(|n| n.host_ip).expect("a network");
        let mut proxies = Vec::new();
        for from in &servers {
            let mut rules = String::new();
            for to in servers.iter().filter(|s| s.name != from.name) {
                let target = peer_addr(to)?;
                let proxy = LinkProxy::start(SocketAddr::new(host.into(), 0), target, self.knob.clone())
                    .await
                    .map_err(|e| Error::Cluster(format!("proxy for {} to {}: {e}", from.name, to.name)))?;
                rules.push_str(&format!(
                    "    ip daddr {} tcp dport {} dnat to {}\n",
                    target.ip(),
                    target.port(),
                    proxy.listen
                ));
                proxies.push(proxy);
            }
            let script = format!(
                "table {LINKS_TABLE} {{}}\ndelete table {LINKS_TABLE}\ntable {LINKS_TABLE} {{\n  chain output {{\n    \
                 type nat hook output priority -100; policy accept;\n{rules}  }}\n}}\n"
            );
            nodenet::nft_in(from.netns.as_deref().expect("a namespace"), &script).map_err(cluster_error)?;
        }
        *self.proxies.lock().expect("proxies lock") = proxies;
        // Connections made before the rules bypass them: start every server afresh.
        for server in &servers {
            self.kill(&server.name).await?;
        }
        self.restart(&servers[0].name).await?;
        info!(links = servers.len() * (servers.len() - 1), "peer links run through shaping proxies");
        Ok(())
    }
}

impl Cluster for Processes {
    fn members(&self) -> Vec<String> {
        self.target.processes().map(|ps| ps.into_iter().map(|p| p.name).collect()).unwrap_or_default()
    }

    fn channels(&self) -> Result<Vec<Channel>, Error> {
        let processes = self.target.processes().map_err(cluster_error)?;
        processes.iter().map(|p| self.target.channel(&p.client_url).map_err(cluster_error)).collect()
    }

    async fn kill(&self, member: &str) -> Result<(), Error> {
        self.signal(member, libc::SIGKILL)?;
        // Gone before the next step: a restart must not find it still running.
        let pid = self.target.processes().ok().and_then(|ps| ps.into_iter().find(|p| p.name == member)).map(|p| p.pid);
        for _ in 0..100 {
            match pid {
                Some(pid) if std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists() => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => break,
            }
        }
        Ok(())
    }

    async fn restart(&self, member: &str) -> Result<(), Error> {
        if let Some(kube) = &self.kube {
            // The first restart of a round is when the servers return.
            kube.returned.lock().expect("returned lock").get_or_insert((Instant::now(), SystemTime::now()));
        }
        self.restart_with(member, &[]).await
    }

    async fn pause(&self, member: &str) -> Result<(), Error> {
        self.signal(member, libc::SIGSTOP)
    }

    async fn resume(&self, member: &str) -> Result<(), Error> {
        self.signal(member, libc::SIGCONT)
    }

    async fn restart_with_failpoints(&self, member: &str, spec: &str) -> Result<(), Error> {
        self.restart_with(member, &[("FAILPOINTS", spec.to_string())]).await
    }

    fn running(&self, member: &str) -> bool {
        let Some(dir) = self.target.state_dir.as_ref() else { return false };
        self.target
            .processes()
            .ok()
            .and_then(|ps| ps.into_iter().find(|p| p.name == member))
            .is_some_and(|p| crate::bench::owns(p.pid, dir))
    }

    fn fired(&self, member: &str, name: &str) -> usize {
        let line = format!("failpoint fired: {name}");
        self.log_lines(member, |l| l.trim() == line)
    }

    async fn cut(&self, member: &str, peers: &[String], one_way: bool) -> Result<(), Error> {
        let victim = self.server(member)?;
        let addresses = peers
            .iter()
            .map(|p| Ok(peer_addr(self.server(p)?)?.ip().to_string()))
            .collect::<Result<Vec<_>, Error>>()?
            .join(", ");
        // Before NAT, so that a cut also holds for links sent through proxies.
        let chain = |name: &str, hook: &str, matcher: &str| {
            format!(
                "  chain {name} {{\n    type filter hook {hook} priority -200; policy accept;\n    \
                 {matcher} {{ {addresses} }} drop\n  }}\n"
            )
        };
        let mut chains = chain("output", "output", "ip daddr");
        if !one_way {
            chains.push_str(&chain("input", "input", "ip saddr"));
        }
        let script = format!("table {CUT_TABLE} {{}}\ndelete table {CUT_TABLE}\ntable {CUT_TABLE} {{\n{chains}}}\n");
        nodenet::nft_in(victim.netns.as_deref().expect("a namespace"), &script).map_err(cluster_error)
    }

    async fn mend(&self, member: &str) -> Result<(), Error> {
        let victim = self.server(member)?;
        let script = format!("table {CUT_TABLE} {{}}\ndelete table {CUT_TABLE}\n");
        nodenet::nft_in(victim.netns.as_deref().expect("a namespace"), &script).map_err(cluster_error)
    }

    fn shape_links(&self, shaping: Shaping) -> Result<(), Error> {
        if self.proxies.lock().expect("proxies lock").is_empty() {
            return Err(Error::Cluster("the peer links do not run through proxies in this run".into()));
        }
        self.knob.set(shaping);
        Ok(())
    }

    fn snapshots_installed(&self, member: &str) -> usize {
        self.log_lines(member, |l| l.contains("installing snapshot"))
    }

    async fn wipe(&self, member: &str) -> Result<(), Error> {
        self.server(member)?;
        let data = self.server_dir(member)?.join("data");
        std::fs::remove_dir_all(&data).map_err(|e| Error::Cluster(format!("wiping {}: {e}", data.display())))
    }

    async fn fill_disk(&self, member: &str, spare_bytes: u64) -> Result<(), Error> {
        let (data, small, saved) = self.disk_paths(member)?;
        self.kill(member).await?;
        let used = dir_bytes(&data);
        // Room to start (a new log file, a manifest) before the balloon takes the rest.
        let size_kib = (used + (16 << 20)).div_ceil(1024);
        std::fs::create_dir_all(&small).map_err(|e| Error::Cluster(format!("{}: {e}", small.display())))?;
        run_tool("mount", &["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs", &small.display().to_string()])?;
        run_tool("cp", &["-a", &format!("{}/.", data.display()), &small.display().to_string()])?;
        std::fs::rename(&data, &saved).map_err(|e| Error::Cluster(format!("{}: {e}", data.display())))?;
        std::os::unix::fs::symlink(&small, &data).map_err(|e| Error::Cluster(format!("{}: {e}", data.display())))?;
        info!(member, used_bytes = used, size_kib, "data moved onto a small filesystem");
        // It may fail to start, or soon stop, for want of space: that is the fault.
        if let Err(e) = self.restart(member).await {
            warn!(member, error = %e, "restart on the small filesystem did not confirm");
        }
        // Then all but `spare_bytes` of the space left goes to a balloon: the next few
        // hundred writes fill it. The server writes meanwhile, so the space measured may be
        // gone by the time the balloon is made (CI once failed on that 'No space left on
        // device'): measured again and tried again, a few times.
        let balloon_path = small.join("balloon").display().to_string();
        for attempt in 1..=BALLOON_TRIES {
            let Some(free) = free_kib(&small) else { break };
            let balloon = (free * 1024).saturating_sub(spare_bytes);
            if balloon == 0 {
                break;
            }
            match run_tool("fallocate", &["-l", &balloon.to_string(), &balloon_path]) {
                Ok(()) => break,
                Err(e) if attempt < BALLOON_TRIES => {
                    warn!(member, attempt, error = %e, "the balloon did not fit; measuring again");
                    let _ = std::fs::remove_file(&balloon_path);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn free_disk(&self, member: &str) -> Result<String, Error> {
        let (data, small, saved) = self.disk_paths(member)?;
        let free = free_kib(&small);
        if self.running(member) {
            self.kill(member).await?;
        }
        // What the full disk holds is the server's state now: copied back whole.
        let _ = std::fs::remove_file(small.join("balloon"));
        run_tool("cp", &["-a", &format!("{}/.", small.display()), &saved.display().to_string()])?;
        std::fs::remove_file(&data).map_err(|e| Error::Cluster(format!("{}: {e}", data.display())))?;
        std::fs::rename(&saved, &data).map_err(|e| Error::Cluster(format!("{}: {e}", saved.display())))?;
        run_tool("umount", &[&small.display().to_string()])?;
        let _ = std::fs::remove_dir(&small);
        self.restart(member).await?;
        Ok(free.map_or("free space unknown".into(), |kib| format!("{kib} KiB left")))
    }

    async fn set_clock(&self, member: &str, offset_s: i64) -> Result<(), Error> {
        let file = self.clock_file(member)?;
        if !file.exists() {
            return Err(Error::Cluster(format!("{member} does not run with a faked clock")));
        }
        std::fs::write(&file, format!("{offset_s:+}\n")).map_err(|e| Error::Cluster(format!("{}: {e}", file.display())))
    }

    async fn before_fault(&self, fault: Fault) -> Result<(), Error> {
        match (&self.kube, fault) {
            (Some(kube), Fault::ServersDown | Fault::ClockJump) => {
                *kube.returned.lock().expect("returned lock") = None;
                kube.note_pods().await.map_err(cluster_error)
            }
            _ => Ok(()),
        }
    }

    async fn after_heal(&self, fault: Fault) -> Vec<Check> {
        match (&self.kube, fault) {
            (Some(kube), Fault::ServersDown | Fault::ClockJump) => kube.judge_return(Duration::from_secs(40)).await,
            _ => Vec::new(),
        }
    }
}

impl Processes {
    /// Lines of a Corral server's log that match.
    fn log_lines(&self, member: &str, matches: impl Fn(&str) -> bool) -> usize {
        let Ok(server) = self.server_dir(member) else { return 0 };
        let log = std::fs::read_to_string(server.join("server.log")).unwrap_or_default();
        log.lines().filter(|l| matches(l)).count()
    }
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            System::Corral => "corral",
            System::Etcd => "etcd",
        })
    }
}
