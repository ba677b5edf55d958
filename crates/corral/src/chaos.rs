//! `corral chaos run|list`: the chaos harness (crate corral-chaos) against a local cluster of
//! processes: Corral from `corral up`, or Debian's etcd 3.4 from `corral bench etcd up`, the
//! anchor the checkers must pass on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use corral_chaos::runner::{self, Cluster, Error, Options};
use corral_chaos::scenario::{self, SCENARIOS};
use tonic::transport::Channel;

use crate::bench::Target;

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
                println!("{:<16} {}", s.name, s.about);
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
    if ours {
        bring_up(args.system, &dir, args.base_port)?;
    }
    let target = Target::local(&dir)?;
    let cluster = Processes { target };
    let options = Options {
        seed: args.seed,
        duration: Duration::from_secs(args.duration),
        clients: args.clients,
        ..Options::default()
    };
    let report = runner::run(&cluster, scenario, &options).await?;
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

fn logs_hint(system: System, dir: &Path) -> String {
    match system {
        System::Corral => format!("{0}/servers/*/server.log (logs), {0}/servers/*/data (data)", dir.display()),
        System::Etcd => format!("{0}/e*.log (logs), {0}/e* (data)", dir.display()),
    }
}

/// Brings up a fresh 3-member cluster in `dir` (removing what a previous run left there).
fn bring_up(system: System, dir: &Path, base_port: u16) -> Result<()> {
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
            "0",
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

/// A local cluster's processes, faulted by signals and restarted as they were started.
struct Processes {
    target: Target,
}

impl Processes {
    fn signal(&self, member: &str, signal: i32) -> Result<(), Error> {
        self.target.signal(member, signal).map_err(|e| Error::Cluster(format!("{e:#}")))
    }
}

impl Cluster for Processes {
    fn members(&self) -> Vec<String> {
        self.target.processes().map(|ps| ps.into_iter().map(|p| p.name).collect()).unwrap_or_default()
    }

    fn channels(&self) -> Result<Vec<Channel>, Error> {
        let processes = self.target.processes().map_err(|e| Error::Cluster(format!("{e:#}")))?;
        processes
            .iter()
            .map(|p| self.target.channel(&p.client_url).map_err(|e| Error::Cluster(format!("{e:#}"))))
            .collect()
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
        let target = self.target.clone();
        let member = member.to_string();
        // `corral up` waits for the cluster: off the runtime's worker threads.
        tokio::task::spawn_blocking(move || target.restart(&member))
            .await
            .map_err(|e| Error::Cluster(e.to_string()))?
            .map_err(|e| Error::Cluster(format!("{e:#}")))
    }

    async fn pause(&self, member: &str) -> Result<(), Error> {
        self.signal(member, libc::SIGSTOP)
    }

    async fn resume(&self, member: &str) -> Result<(), Error> {
        self.signal(member, libc::SIGCONT)
    }

    async fn restart_with_failpoints(&self, member: &str, spec: &str) -> Result<(), Error> {
        let (target, member, spec) = (self.target.clone(), member.to_string(), spec.to_string());
        tokio::task::spawn_blocking(move || target.restart_with_env(&member, &[("FAILPOINTS", &spec)]))
            .await
            .map_err(|e| Error::Cluster(e.to_string()))?
            .map_err(|e| Error::Cluster(format!("{e:#}")))
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
        let Some(dir) = self.target.state_dir.as_ref() else { return 0 };
        let log = std::fs::read_to_string(dir.join("servers").join(member).join("server.log")).unwrap_or_default();
        let line = format!("failpoint fired: {name}");
        log.lines().filter(|l| l.trim() == line).count()
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
