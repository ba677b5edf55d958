//! A run: the workload against a cluster, the scenario's faults round after round, then heal,
//! converge, read the store's log and judge the history.

use std::time::{Duration, Instant};

use corral_proto::etcdserverpb::cluster_client::ClusterClient;
use corral_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use corral_proto::etcdserverpb::{HashKvRequest, PutRequest, RangeRequest, StatusRequest};
use corral_proto::etcdserverpb::{Member, MemberAddRequest, MemberListRequest, MemberRemoveRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::checks::{self, Check};
use crate::history::{History, Outcome};
use crate::proxy::Shaping;
use crate::scenario::{Fault, Scenario};
use crate::workload::{self, Workload};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Cluster(String),
    #[error("no leader within {0:?}: the cluster is not healthy")]
    NoLeader(Duration),
}

/// What the runner needs from a cluster: its members, their endpoints, and the faults it can
/// inject. The binary implements it over processes (Corral from `corral up`, or Debian's etcd).
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// Member names, in the order of [`Cluster::channels`].
    fn members(&self) -> Vec<String>;
    /// One etcd-API channel per member (lazy: a dead member's fails per request).
    fn channels(&self) -> Result<Vec<Channel>, Error>;
    async fn kill(&self, member: &str) -> Result<(), Error>;
    /// Starts a killed member again (same data directory).
    async fn restart(&self, member: &str) -> Result<(), Error>;
    async fn pause(&self, member: &str) -> Result<(), Error>;
    async fn resume(&self, member: &str) -> Result<(), Error>;
    /// Starts a killed member with failpoints armed (`name=actions;...`).
    async fn restart_with_failpoints(&self, member: &str, spec: &str) -> Result<(), Error>;
    /// Whether the member's process is alive.
    fn running(&self, member: &str) -> bool;
    /// How many times the failpoint `name` has crashed the member so far (from its log).
    fn fired(&self, member: &str, name: &str) -> usize;
    /// Drops the packets between `member` and `peers`: both ways, or only those it sends.
    async fn cut(&self, member: &str, peers: &[String], one_way: bool) -> Result<(), Error>;
    /// Lifts every cut on `member`.
    async fn mend(&self, member: &str) -> Result<(), Error>;
    /// Shapes every peer link (for scenarios whose links run through proxies).
    fn shape_links(&self, shaping: Shaping) -> Result<(), Error>;
    /// Snapshots the member has installed from its leader so far (from its log).
    fn snapshots_installed(&self, member: &str) -> usize;
    /// Deletes a killed member's data; its next start must join the running cluster.
    async fn wipe(&self, member: &str) -> Result<(), Error>;
    /// Restarts the member with its data on a filesystem with `spare_bytes` left.
    async fn fill_disk(&self, member: &str, spare_bytes: u64) -> Result<(), Error>;
    /// Gives a member filled by [`Cluster::fill_disk`] its own disk back (its data as the
    /// small filesystem left it) and starts it again; how full the small one was.
    async fn free_disk(&self, member: &str) -> Result<String, Error>;
    /// Sets the member's wall clock `offset_s` seconds from the true time (for scenarios
    /// whose servers run with a faked clock).
    async fn set_clock(&self, member: &str, offset_s: i64) -> Result<(), Error>;
    /// Called just before a fault is injected: a cluster with nodes notes what runs there.
    async fn before_fault(&self, _fault: Fault) -> Result<(), Error> {
        Ok(())
    }
    /// Called once a fault is healed and every member has a leader: what the cluster judged
    /// of it (for all servers down: the nodes' return and the pods' survival).
    async fn after_heal(&self, _fault: Fault) -> Vec<Check> {
        Vec::new()
    }
}

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Faults are injected until this much time has passed (the last round completes).
    pub duration: Duration,
    pub clients: u32,
    pub keys: u32,
    pub watchers: u32,
    /// Steps the linearizability search may take per key before it answers "undecided".
    pub search_limit: u64,
    /// Operations per second the workload must have answered before each fault.
    pub min_ops_per_s: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seed: 1,
            duration: Duration::from_secs(60),
            clients: 8,
            keys: 4,
            watchers: 2,
            search_limit: 20_000_000,
            min_ops_per_s: 100.0,
        }
    }
}

/// One injected fault.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    pub fault: &'static str,
    /// The leader (as found just before) was among the victims: write unavailability is
    /// measured.
    pub hits_leader: bool,
    pub victims: Vec<String>,
    pub at_us: u64,
    pub healed_us: u64,
    /// Answered operations per second over the two seconds before the fault.
    pub ops_per_s_before: f64,
    /// The longest time without an acknowledged write from just before the fault to ten
    /// seconds after healing (leader faults).
    pub write_unavailable_ms: Option<f64>,
    /// From healing until every member answered with a leader.
    pub recovered_ms: Option<f64>,
    /// For a failpoint round: which, and whether it fired.
    pub failpoint: Option<(&'static str, bool)>,
    /// For a slow-links round: how the links misbehaved.
    pub shaping: Option<Shaping>,
    /// For an isolated follower: whether it installed a snapshot within 30 s of healing.
    pub caught_up_by_snapshot: Option<bool>,
    /// For a full disk: how full it got and whether the server stopped.
    pub disk: Option<String>,
}

impl FaultRecord {
    /// What the table says besides the figures: the failpoint, the links' shaping, the
    /// snapshot.
    fn note(&self) -> String {
        if let Some((name, fired)) = self.failpoint {
            return format!("{name}{}", if fired { "" } else { " (did not fire)" });
        }
        if let Some(s) = self.shaping {
            return format!("{} ms ±{} ms, {:.1}% loss", s.delay.as_millis(), s.jitter.as_millis(), s.loss * 100.0);
        }
        if let Some(disk) = &self.disk {
            return disk.clone();
        }
        match self.caught_up_by_snapshot {
            Some(true) => "caught up by snapshot".into(),
            Some(false) => "no snapshot installed".into(),
            None => String::new(),
        }
    }
}

#[derive(Debug)]
pub struct Report {
    pub scenario: &'static str,
    pub seed: u64,
    pub faults: Vec<FaultRecord>,
    pub history: History,
    pub checks: Vec<Check>,
    pub elapsed: Duration,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// Write unavailability after leader faults: (median, max) in milliseconds.
    pub fn unavailability_ms(&self) -> Option<(f64, f64)> {
        let mut gaps: Vec<f64> = self.faults.iter().filter_map(|f| f.write_unavailable_ms).collect();
        gaps.sort_by(f64::total_cmp);
        Some((*gaps.get(gaps.len() / 2)?, *gaps.last()?))
    }

    /// (answered, failed, unknown) operations.
    pub fn op_counts(&self) -> (usize, usize, usize) {
        let count = |o| self.history.ops.iter().filter(|op| op.outcome == o).count();
        (count(Outcome::Ok), count(Outcome::Failed), count(Outcome::Unknown))
    }

    /// The summary a person reads: the faults, the work done, each checker's verdict.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let (ok, failed, unknown) = self.op_counts();
        let secs = self.elapsed.as_secs_f64();
        let _ = writeln!(out, "scenario {}  seed {}  {:.0} s", self.scenario, self.seed, secs);
        let _ = writeln!(
            out,
            "{:<4} {:<16} {:<10} {:>12} {:>12} {:>12}  note",
            "#", "fault", "victims", "ops/s before", "write gap", "recovered"
        );
        for (i, f) in self.faults.iter().enumerate() {
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
            let _ = writeln!(
                out,
                "{:<4} {:<16} {:<10} {:>12.0} {:>12} {:>12}  {}",
                i + 1,
                f.fault,
                f.victims.join(","),
                f.ops_per_s_before,
                ms(f.write_unavailable_ms),
                ms(f.recovered_ms),
                f.note()
            );
        }
        let _ = writeln!(
            out,
            "operations: {ok} answered ({:.0}/s), {failed} refused, {unknown} unknown outcome; {} watch events",
            ok as f64 / secs.max(1.0),
            self.history.watches.iter().map(|w| w.events.len()).sum::<usize>()
        );
        if let Some((median, max)) = self.unavailability_ms() {
            let _ = writeln!(out, "write unavailability after leader faults: median {median:.0} ms, max {max:.0} ms");
        }
        for c in &self.checks {
            let verdict = if c.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(out, "{verdict}  {:<20} {}", c.name, c.detail);
            let _ = writeln!(out, "      {:<20} ({})", "", c.criterion);
        }
        let _ = writeln!(out, "{}", if self.passed() { "PASSED" } else { "FAILED" });
        out
    }
}

/// Runs `scenario` against `cluster`.
pub async fn run<C: Cluster>(cluster: &C, scenario: &Scenario, options: &Options) -> Result<Report, Error> {
    let began = Instant::now();
    let members = cluster.members();
    let channels = cluster.channels()?;
    if !all_have_leader(&channels, Duration::from_secs(60)).await {
        return Err(Error::NoLeader(Duration::from_secs(60)));
    }
    if scenario.faults.contains(&Fault::Failpoint) {
        fill(&channels, 200).await?;
    }
    let start_revision = current_revision(&channels).await? + 1;
    let config = workload::Config {
        prefix: format!("chaos/{}/{}/{}/", scenario.name, options.seed, start_revision),
        clients: options.clients,
        keys: options.keys,
        watchers: options.watchers,
        op_timeout: Duration::from_secs(2),
        max_ops_per_client: 10_000_000,
        seed: options.seed,
    };
    info!(scenario = scenario.name, seed = options.seed, start_revision, "workload starting");
    // Revisions below the run's, for the compactions of failpoint rounds (each must compact
    // further than the last; none may touch the run's history).
    let mut compact_to = 1;
    let mut workload = Workload::start(&config, channels.clone(), start_revision);
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut faults = Vec::new();
    let mut extra = Vec::new();
    let deadline = Instant::now() + options.duration;
    while Instant::now() < deadline && faults.len() < 1_000 {
        let round = scenario.round(faults.len(), &mut rng);
        tokio::time::sleep(round.quiet.saturating_sub(Duration::from_secs(2))).await;
        let before = workload.answered.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ops_per_s_before = (workload.answered.load(std::sync::atomic::Ordering::Relaxed) - before) as f64 / 2.0;
        let leader = leader_name(&members, &channels).await;
        let victims = pick_victims(&round, &members, leader.as_deref(), &mut rng);
        cluster.before_fault(round.fault).await?;
        let at_us = workload.now_us();
        info!(fault = round.fault.name(), victims = ?victims, failpoint = ?round.failpoint, ops_per_s_before, "injecting");
        let mut failpoint = None;
        let mut snapshot = None;
        let mut disk = None;
        match round.fault {
            Fault::PauseLeader | Fault::PauseFollower => {
                for v in &victims {
                    cluster.pause(v).await?;
                }
                tokio::time::sleep(round.hold).await;
                for v in &victims {
                    cluster.resume(v).await?;
                }
            }
            Fault::Failpoint => {
                let (name, action) = round.failpoint.clone().expect("a failpoint round names its failpoint");
                let victim = &victims[0];
                let fired_before = cluster.fired(victim, name);
                cluster.kill(victim).await?;
                // Long enough behind for the leader to have purged what it missed: it
                // catches up from a snapshot.
                tokio::time::sleep(round.hold + Duration::from_secs(2)).await;
                if name == "snapshot-install-before-restore" {
                    // Past two snapshot intervals (500 entries and 100 kept, as the chaos
                    // cluster runs): the victim can only catch up from a snapshot.
                    extend_log(&channels, 1_300).await;
                }
                if let Err(e) = cluster.restart_with_failpoints(victim, &format!("{name}={action}")).await {
                    // It may have crashed before its start was confirmed: what fired decides.
                    warn!(member = %victim, error = %e, "restart with the failpoint armed did not confirm");
                }
                if matches!(name, "snapshot-build" | "raft-log-purge") {
                    // A snapshot interval's worth of entries for the victim to apply.
                    extend_log(&channels, 700).await;
                }
                let waited = Instant::now();
                let mut churned: Option<Instant> = None;
                while cluster.running(victim) && waited.elapsed() < Duration::from_secs(20) {
                    // Membership entries and compactions the victim applies itself, not
                    // inside a snapshot it installs while catching up (a victim down for
                    // long restarts from one): again every 2 s until it crashes.
                    let again = churned.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                    if name == "sm-membership-apply" && again {
                        churn_membership(&channels).await?;
                        churned = Some(Instant::now());
                    }
                    if name == "mvcc-compact" && again && compact_to + 1 < start_revision {
                        compact_to += 1;
                        compact(&channels, compact_to).await;
                        churned = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let fired = cluster.fired(victim, name) > fired_before;
                if cluster.running(victim) {
                    cluster.kill(victim).await?;
                }
                info!(failpoint = name, fired, "failpoint round over; restarting clean");
                if let Err(e) = cluster.restart(victim).await {
                    warn!(member = %victim, error = %e, "restart failed");
                }
                failpoint = Some((name, fired));
            }
            Fault::IsolateLeader | Fault::OneWayLeader | Fault::IsolateFollower => {
                let victim = &victims[0];
                let peers: Vec<String> = members.iter().filter(|m| *m != victim).cloned().collect();
                let installed = cluster.snapshots_installed(victim);
                cluster.cut(victim, &peers, round.fault == Fault::OneWayLeader).await?;
                tokio::time::sleep(round.hold).await;
                cluster.mend(victim).await?;
                if round.fault == Fault::IsolateFollower {
                    let waited = Instant::now();
                    while cluster.snapshots_installed(victim) == installed && waited.elapsed() < Duration::from_secs(30)
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    snapshot = Some(cluster.snapshots_installed(victim) > installed);
                }
            }
            Fault::WipeFollower => {
                let victim = &victims[0];
                let installed = cluster.snapshots_installed(victim);
                cluster.kill(victim).await?;
                cluster.wipe(victim).await?;
                let peer_urls = remove_member(&channels, victim).await?;
                tokio::time::sleep(round.hold).await;
                add_member(&channels, &peer_urls, false).await?;
                if let Err(e) = cluster.restart(victim).await {
                    warn!(member = %victim, error = %e, "restart failed");
                }
                let waited = Instant::now();
                while cluster.snapshots_installed(victim) == installed && waited.elapsed() < Duration::from_secs(30) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                snapshot = Some(cluster.snapshots_installed(victim) > installed);
            }
            Fault::DiskFull => {
                let victim = &victims[0];
                cluster.fill_disk(victim, 64 << 10).await?;
                tokio::time::sleep(round.hold).await;
                let stopped = !cluster.running(victim);
                let full = cluster.free_disk(victim).await?;
                info!(member = %victim, stopped, full = %full, "gave the disk back");
                disk = Some(format!("{full}{}", if stopped { ", server stopped" } else { ", server ran on" }));
            }
            Fault::ClockJump => {
                let victim = &victims[0];
                cluster.set_clock(victim, 300).await?;
                tokio::time::sleep(round.hold).await;
                cluster.set_clock(victim, 0).await?;
            }
            Fault::SlowLinks => {
                cluster.shape_links(round.shaping.unwrap_or_default())?;
                tokio::time::sleep(round.hold).await;
                cluster.shape_links(Shaping::default())?;
            }
            Fault::KillLeader | Fault::KillFollower | Fault::KillTwo | Fault::KillAll | Fault::ServersDown => {
                for v in &victims {
                    cluster.kill(v).await?;
                }
                tokio::time::sleep(round.hold).await;
                for v in &victims {
                    // A member that cannot start again is a finding, not a harness error.
                    if let Err(e) = cluster.restart(v).await {
                        warn!(member = %v, error = %e, "restart failed");
                    }
                }
            }
        }
        let healed_us = workload.now_us();
        let healed = Instant::now();
        let recovered = all_have_leader(&channels, Duration::from_secs(60)).await.then(|| healed.elapsed());
        if recovered.is_some() {
            extra.extend(cluster.after_heal(round.fault).await);
        }
        faults.push(FaultRecord {
            fault: round.fault.name(),
            hits_leader: leader.as_deref().is_some_and(|l| victims.iter().any(|v| v == l)),
            victims,
            at_us,
            healed_us,
            ops_per_s_before,
            write_unavailable_ms: None,
            recovered_ms: recovered.map(|d| d.as_secs_f64() * 1000.0),
            failpoint,
            shaping: round.shaping,
            caught_up_by_snapshot: snapshot,
            disk,
        });
        if recovered.is_none() {
            warn!(fault = round.fault.name(), "the cluster did not recover within 60 s; ending the run");
            break;
        }
    }
    let ops = workload.stop_clients().await;
    info!(operations = ops.len(), "workload stopped; healing and reading the log");
    let healthy = all_have_leader(&channels, Duration::from_secs(60)).await;
    // Judged even when some member never came back: the log is read from any that serves it.
    let mut log = None;
    if put_sentinel(&config, &channels).await.is_ok() {
        extra.push(convergence(&members, &channels, Duration::from_secs(if healthy { 60 } else { 5 })).await);
        for channel in &channels {
            log = workload::read_log(&config, channel.clone(), start_revision, Duration::from_secs(30)).await;
            if log.is_some() {
                break;
            }
        }
    }
    if !healthy {
        extra.push(Check {
            name: "healed",
            criterion: "every member answers with a leader within 60 s of the run's end",
            passed: false,
            detail: "some member has no leader 60 s after the last fault".into(),
        });
    }
    let Some(log) = log else {
        // Nothing to read the history against: the verdict is the recovery's.
        extra.push(Check {
            name: "judged",
            criterion: "the run's log can be read back from some member, to judge the history against",
            passed: false,
            detail: "no member wrote the end-of-run key and served the log: the history was not judged".into(),
        });
        extra.push(workload_check(&faults, options.min_ops_per_s));
        extra.push(recovery_check(&faults));
        let history = History { ops, start_revision, ..History::default() };
        return Ok(Report {
            scenario: scenario.name,
            seed: options.seed,
            faults,
            history,
            checks: extra,
            elapsed: began.elapsed(),
        });
    };
    let watches = workload.finish_watchers(Duration::from_secs(30)).await;
    let history = History { ops, watches, log, start_revision };
    let next_faults: Vec<u64> = faults.iter().skip(1).map(|f| f.at_us).chain([u64::MAX]).collect();
    for (f, next) in faults.iter_mut().zip(next_faults) {
        if f.hits_leader {
            let until = next.min(f.healed_us + 10_000_000);
            f.write_unavailable_ms = write_gap_ms(&history, f.at_us, until);
        }
    }
    extra.push(workload_check(&faults, options.min_ops_per_s));
    extra.push(recovery_check(&faults));
    if scenario.faults.contains(&Fault::Failpoint) {
        extra.push(failpoint_check(&faults));
    }
    if scenario.faults.iter().any(|f| matches!(f, Fault::IsolateFollower | Fault::WipeFollower)) {
        extra.push(snapshot_check(&faults));
    }
    let mut checks = checks::all(&history, options.search_limit);
    checks.extend(extra);
    Ok(Report { scenario: scenario.name, seed: options.seed, faults, history, checks, elapsed: began.elapsed() })
}

fn pick_victims(
    round: &crate::scenario::Round,
    members: &[String],
    leader: Option<&str>,
    rng: &mut StdRng,
) -> Vec<String> {
    let followers: Vec<&String> = members.iter().filter(|m| Some(m.as_str()) != leader).collect();
    let mut follower = || followers[rng.random_range(0..followers.len())].clone();
    // With no leader known, the first member stands in for it.
    let leader = leader.map(str::to_string).unwrap_or_else(|| members[0].clone());
    match round.fault {
        Fault::KillLeader | Fault::PauseLeader | Fault::IsolateLeader | Fault::OneWayLeader | Fault::ClockJump => {
            vec![leader]
        }
        Fault::KillFollower | Fault::PauseFollower | Fault::IsolateFollower | Fault::WipeFollower => {
            vec![follower()]
        }
        Fault::SlowLinks => members.to_vec(),
        Fault::Failpoint | Fault::DiskFull if round.on_leader => vec![leader],
        Fault::DiskFull => vec![follower()],
        Fault::Failpoint => vec![follower()],
        Fault::KillTwo => vec![leader, follower()],
        Fault::KillAll | Fault::ServersDown => members.to_vec(),
    }
}

/// Write unavailability around a fault at `at_us`: the longest time without an acknowledged
/// write, from the last acknowledged before the fault until `until_us` (the next fault, or
/// ten seconds after healing).
fn write_gap_ms(history: &History, at_us: u64, until_us: u64) -> Option<f64> {
    let mut acks: Vec<u64> =
        history.ops.iter().filter(|o| o.is_write() && o.acknowledged()).map(|o| o.return_us).collect();
    acks.sort_unstable();
    let last = acks.iter().rev().find(|t| **t <= at_us).copied().unwrap_or(at_us);
    let after: Vec<u64> = acks.into_iter().filter(|t| *t > at_us && *t <= until_us).collect();
    after.first()?;
    let gap = after.iter().fold((last, 0), |(prev, max), t| (*t, max.max(t - prev))).1;
    Some(gap as f64 / 1000.0)
}

fn workload_check(faults: &[FaultRecord], min: f64) -> Check {
    let idle: Vec<String> = faults
        .iter()
        .enumerate()
        .filter(|(_, f)| f.ops_per_s_before < min)
        .map(|(i, f)| format!("before fault {} ({}) only {:.0} ops/s", i + 1, f.fault, f.ops_per_s_before))
        .collect();
    let lowest = faults.iter().map(|f| f.ops_per_s_before).fold(f64::INFINITY, f64::min);
    let mut check = Check {
        name: "workload",
        criterion: "at least 100 answered ops/s before each fault, and at least one fault",
        passed: idle.is_empty() && !faults.is_empty(),
        detail: if faults.is_empty() { "no fault was injected".into() } else { format!("lowest {lowest:.0} ops/s") },
    };
    if !idle.is_empty() {
        check.detail = idle.join("; ");
    }
    check
}

fn failpoint_check(faults: &[FaultRecord]) -> Check {
    let rounds: Vec<(&str, bool)> = faults.iter().filter_map(|f| f.failpoint).collect();
    let silent: Vec<&str> = rounds.iter().filter(|(_, fired)| !fired).map(|(name, _)| *name).collect();
    let mut names: Vec<&str> = rounds.iter().map(|(name, _)| *name).collect();
    names.dedup();
    Check {
        name: "failpoints fired",
        criterion: "each armed failpoint crashed its server within 20 s",
        passed: silent.is_empty() && !rounds.is_empty(),
        detail: if silent.is_empty() {
            format!("{} rounds: {}", rounds.len(), names.join(", "))
        } else {
            format!("never fired: {}", silent.join(", "))
        },
    }
}

fn snapshot_check(faults: &[FaultRecord]) -> Check {
    let rounds: Vec<bool> = faults.iter().filter_map(|f| f.caught_up_by_snapshot).collect();
    let missed = rounds.iter().filter(|installed| !**installed).count();
    Check {
        name: "snapshot catch-up",
        criterion: "a follower cut off past the snapshot interval installs a snapshot within 30 s of healing",
        passed: missed == 0,
        detail: if rounds.is_empty() {
            "no follower was cut off in this run".into()
        } else {
            format!(
                "{} of {} followers cut off or wiped caught up from a snapshot",
                rounds.len() - missed,
                rounds.len()
            )
        },
    }
}

fn recovery_check(faults: &[FaultRecord]) -> Check {
    let slowest = faults.iter().filter_map(|f| f.recovered_ms).fold(0.0, f64::max);
    let failed = faults.iter().any(|f| f.recovered_ms.is_none());
    Check {
        name: "recovery",
        criterion: "every member answers with a leader within 60 s of each heal",
        passed: !failed,
        detail: if failed {
            "a fault left the cluster without a leader for 60 s".into()
        } else {
            format!("slowest {slowest:.0} ms")
        },
    }
}

/// Convergence: within `bound` of healing, every member has the same HashKV at one revision.
async fn convergence(members: &[String], channels: &[Channel], bound: Duration) -> Check {
    let began = Instant::now();
    let mut last = String::new();
    while began.elapsed() < bound {
        match hashes(channels).await {
            Ok((revision, hashes)) if hashes.windows(2).all(|w| w[0] == w[1]) => {
                return Check {
                    name: "convergence",
                    criterion: "HashKV equal on every member at one revision within 60 s of healing",
                    passed: true,
                    detail: format!(
                        "{} members equal at revision {revision} after {} ms",
                        members.len(),
                        began.elapsed().as_millis()
                    ),
                };
            }
            Ok((revision, hashes)) => last = format!("at revision {revision}: {hashes:?} ({members:?})"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Check {
        name: "convergence",
        criterion: "HashKV equal on every member at one revision within 60 s of healing",
        passed: false,
        detail: format!("not equal after 60 s: {last}"),
    }
}

/// Every member's HashKV at the lowest current revision among them.
async fn hashes(channels: &[Channel]) -> Result<(i64, Vec<u32>), String> {
    let mut revisions = Vec::new();
    for c in channels {
        let resp = MaintenanceClient::new(c.clone()).status(StatusRequest {}).await.map_err(|e| e.to_string())?;
        revisions.push(resp.into_inner().header.map(|h| h.revision).unwrap_or(0));
    }
    let revision = revisions.into_iter().min().unwrap_or(0);
    let mut hashes = Vec::new();
    for c in channels {
        let resp =
            MaintenanceClient::new(c.clone()).hash_kv(HashKvRequest { revision }).await.map_err(|e| e.to_string())?;
        hashes.push(resp.into_inner().hash);
    }
    Ok((revision, hashes))
}

pub async fn current_revision(channels: &[Channel]) -> Result<i64, Error> {
    for _ in 0..50 {
        for c in channels {
            let mut kv = corral_proto::etcdserverpb::kv_client::KvClient::new(c.clone());
            let req = RangeRequest { key: b"chaos/".to_vec(), count_only: true, ..Default::default() };
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), kv.range(req)).await {
                return Ok(resp.into_inner().header.map(|h| h.revision).unwrap_or(0));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Error::Cluster("no member answered a range for 10 s".into()))
}

/// Puts `count` keys outside the workload's prefix: revisions for failpoint rounds to compact.
async fn fill(channels: &[Channel], count: usize) -> Result<(), Error> {
    for i in 0..count {
        let mut kv = corral_proto::etcdserverpb::kv_client::KvClient::new(channels[0].clone());
        let req =
            PutRequest { key: format!("chaos-fill/{i}").into_bytes(), value: b"x".to_vec(), ..Default::default() };
        kv.put(req).await.map_err(|e| Error::Cluster(format!("filling: {e}")))?;
    }
    Ok(())
}

/// Appends `count` entries, one sequential put each, through whichever member answers (best
/// effort): enough for the leader to snapshot and purge past a member that is down, so that
/// the snapshot failpoints are reached for certain, not only when the workload happened to
/// write enough.
async fn extend_log(channels: &[Channel], count: usize) {
    // A cluster without a quorum answers none of them: the round goes on after a minute, and
    // its recovery check reports the cluster.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at = 0;
    for i in 0..count {
        if Instant::now() >= deadline {
            warn!(written = i, count, "the log was not extended within 60 s");
            return;
        }
        for _ in 0..channels.len() {
            let mut kv = corral_proto::etcdserverpb::kv_client::KvClient::new(channels[at].clone());
            let req = PutRequest {
                key: format!("chaos-fill/extend/{}", i % 64).into_bytes(),
                value: b"x".to_vec(),
                ..Default::default()
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), kv.put(req)).await {
                break;
            }
            at = (at + 1) % channels.len();
        }
    }
}

/// Compacts the store at `revision` (best effort: the failpoint round checks what fired).
async fn compact(channels: &[Channel], revision: i64) {
    for c in channels {
        let mut kv = corral_proto::etcdserverpb::kv_client::KvClient::new(c.clone());
        let req = corral_proto::etcdserverpb::CompactionRequest { revision, physical: false };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), kv.compact(req)).await {
            return;
        }
    }
    warn!(revision, "no member accepted the compaction");
}

async fn put_sentinel(config: &workload::Config, channels: &[Channel]) -> Result<(), Error> {
    for attempt in 0..20 {
        let mut kv = corral_proto::etcdserverpb::kv_client::KvClient::new(channels[attempt % channels.len()].clone());
        let req = PutRequest { key: config.sentinel().into_bytes(), value: b"end".to_vec(), ..Default::default() };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), kv.put(req)).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::Cluster("could not write the end-of-run key for 20 attempts".into()))
}

/// The member that reports itself leader (in the highest term, should a deposed one not
/// know yet).
async fn leader_name(members: &[String], channels: &[Channel]) -> Option<String> {
    for _ in 0..50 {
        // (own id, the leader it follows, term) per member that answered.
        let mut views = Vec::new();
        for c in channels {
            let mut client = MaintenanceClient::new(c.clone());
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_millis(500), client.status(StatusRequest {})).await
            {
                let resp = resp.into_inner();
                views.push(Some((resp.header.map(|h| h.member_id).unwrap_or(0), resp.leader, resp.raft_term)));
            } else {
                views.push(None);
            }
        }
        if let Some(i) = agreed_leader(&views) {
            return Some(members[i].clone());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The member a majority follows at the highest term reported, when it claims to lead too: a
/// deposed leader that has not heard of its successor still claims to lead, alone.
fn agreed_leader(views: &[Option<(u64, u64, u64)>]) -> Option<usize> {
    let term = views.iter().flatten().map(|v| v.2).max()?;
    let i = views.iter().position(|v| v.is_some_and(|(own, leader, t)| own != 0 && own == leader && t == term))?;
    let leader = views[i].expect("answered").0;
    let followers = views.iter().flatten().filter(|v| v.1 == leader && v.2 == term).count();
    (followers > views.len() / 2).then_some(i)
}

/// Calls `call` on each member in turn until one answers Ok, for up to 30 s; the last
/// refusal otherwise, under `what`.
async fn on_any_member<T, Fut>(
    channels: &[Channel],
    what: &str,
    mut call: impl FnMut(ClusterClient<Channel>) -> Fut,
) -> Result<T, Error>
where
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = String::new();
    for _ in 0..60 {
        for channel in channels {
            match tokio::time::timeout(Duration::from_secs(5), call(ClusterClient::new(channel.clone()))).await {
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                Ok(Err(e)) => last = e.message().to_string(),
                Err(_) => last = "no answer in 5 s".into(),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::Cluster(format!("{what}: {last}")))
}

/// Removes the member named `name` from the membership; its peer URLs, to add it back with.
async fn remove_member(channels: &[Channel], name: &str) -> Result<Vec<String>, Error> {
    let member = members(channels)
        .await?
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| Error::Cluster(format!("no member named {name} to remove")))?;
    let id = member.id;
    on_any_member(channels, &format!("removing member {name}"), |mut c| async move {
        c.member_remove(MemberRemoveRequest { id }).await
    })
    .await?;
    info!(member = name, id, "member removed");
    Ok(member.peer_ur_ls)
}

/// Adds a member with `peer_urls`, a voter or a learner; its id.
async fn add_member(channels: &[Channel], peer_urls: &[String], is_learner: bool) -> Result<u64, Error> {
    let added = on_any_member(channels, &format!("adding a member at {peer_urls:?}"), |mut c| {
        let add = MemberAddRequest { peer_ur_ls: peer_urls.to_vec(), is_learner };
        async move { c.member_add(add).await }
    })
    .await?;
    let id = added.member.map_or(0, |m| m.id);
    info!(id, is_learner, "member added");
    Ok(id)
}

/// Two membership changes for every member to apply: a learner that never starts (its
/// address refuses at once, on each server's own loopback) is added, then removed.
///
/// The server crashing in these rounds is the one that applies membership changes, so an
/// answer may be lost after the change committed: a learner an unanswered add left is
/// removed all the same, and a removal that finds it gone is done.
async fn churn_membership(channels: &[Channel]) -> Result<(), Error> {
    const CHURN_URL: &str = "https://127.0.0.1:1";
    let id = match add_member(channels, &[CHURN_URL.to_string()], true).await {
        Ok(id) => id,
        Err(e) => learner_at(channels, CHURN_URL).await?.ok_or(e)?,
    };
    for _ in 0..3 {
        match on_any_member(channels, "removing the learner added for a membership change", |mut c| async move {
            c.member_remove(MemberRemoveRequest { id }).await
        })
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) if learner_at(channels, CHURN_URL).await? != Some(id) => {
                info!(id, error = %e, "the learner's removal went through unanswered");
                return Ok(());
            }
            Err(e) => warn!(id, error = %e, "removing the learner; trying again"),
        }
    }
    Err(Error::Cluster(format!("the learner {id:x} added for a membership change could not be removed")))
}

/// The id of the member whose peer URLs include `url`, if any.
async fn learner_at(channels: &[Channel], url: &str) -> Result<Option<u64>, Error> {
    Ok(members(channels).await?.into_iter().find(|m| m.peer_ur_ls.iter().any(|u| u == url)).map(|m| m.id))
}

/// The membership, as any member answers it.
async fn members(channels: &[Channel]) -> Result<Vec<Member>, Error> {
    let list = on_any_member(channels, "listing the members", |mut c| async move {
        c.member_list(MemberListRequest::default()).await
    })
    .await?;
    Ok(list.members)
}

/// True once every member answers Status with a leader, within `bound`.
async fn all_have_leader(channels: &[Channel], bound: Duration) -> bool {
    let began = Instant::now();
    while began.elapsed() < bound {
        let mut ok = 0;
        for c in channels {
            let mut client = MaintenanceClient::new(c.clone());
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_millis(500), client.status(StatusRequest {})).await
                && resp.into_inner().leader != 0
            {
                ok += 1;
            }
        }
        if ok == channels.len() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_is_the_one_a_majority_follows_at_the_highest_term() {
        // s1 leads at term 3, followed by everyone.
        assert_eq!(agreed_leader(&[Some((1, 1, 3)), Some((2, 1, 3)), Some((3, 1, 3))]), Some(0));
        // s2 was elected at term 4 while s1, deposed but unaware, still claims term 3.
        assert_eq!(agreed_leader(&[Some((1, 1, 3)), Some((2, 2, 4)), Some((3, 2, 4))]), Some(1));
        // A claim nobody else backs is no leader; neither is a silent majority.
        assert_eq!(agreed_leader(&[Some((1, 1, 3)), Some((2, 0, 3)), Some((3, 0, 3))]), None);
        assert_eq!(agreed_leader(&[Some((1, 1, 3)), None, None]), None);
    }
}
