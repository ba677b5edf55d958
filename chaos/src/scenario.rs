//! Scenarios: which fault a run injects each round, and how long it holds it. Pure: the
//! runner asks the plan for a round's step given the seed's random stream.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use crate::proxy::Shaping;

/// One fault, named by whom it hits. The runner picks the members when it injects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the leader, restart it after the hold.
    KillLeader,
    /// SIGKILL a follower, restart it after the hold.
    KillFollower,
    /// SIGKILL the leader and a follower (the quorum is gone), restart both.
    KillTwo,
    /// SIGKILL every server, restart them all.
    KillAll,
    /// SIGSTOP the leader past the election timeout, then SIGCONT: it wakes up deposed.
    PauseLeader,
    /// SIGSTOP a follower, then SIGCONT.
    PauseFollower,
    /// SIGKILL a member, and after the hold start it with a failpoint armed that crashes it
    /// (the round's `failpoint`); once it has fired, start it clean.
    Failpoint,
    /// Cut the leader off from its peers, both ways (nftables in its node namespace): the
    /// others elect, it must stop answering linearizable reads; then heal.
    IsolateLeader,
    /// Drop only what the leader sends its peers (it still hears them).
    OneWayLeader,
    /// Cut a follower off long enough that the leader compacts past it: on healing it
    /// catches up from a snapshot.
    IsolateFollower,
    /// Delay, jitter and loss on every peer link (the round's `shaping`), through the
    /// userspace proxies the links run through in this scenario.
    SlowLinks,
    /// SIGKILL a follower, wipe its data directory, remove it from the membership and add
    /// it back (a membership change under load), then start it empty: it rejoins through a
    /// snapshot.
    WipeFollower,
    /// Move a member's data onto a small filesystem that fills up under the workload (the
    /// leader or a follower), hold, then give it its space back and restart it.
    DiskFull,
    /// Jump the leader's wall clock 5 minutes forward, hold, and back (libfaketime, its
    /// monotonic clock untouched, as an NTP step would): no node may go NotReady, no pod be
    /// evicted.
    ClockJump,
    /// SIGKILL every server for 60 s while pods run on the nodes, then restart them all:
    /// no pod may restart or be evicted, every node must be Ready within 40 s.
    ServersDown,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill leader",
            Fault::KillFollower => "kill follower",
            Fault::KillTwo => "kill two",
            Fault::KillAll => "kill all",
            Fault::PauseLeader => "pause leader",
            Fault::PauseFollower => "pause follower",
            Fault::Failpoint => "failpoint",
            Fault::IsolateLeader => "isolate leader",
            Fault::OneWayLeader => "one-way leader",
            Fault::IsolateFollower => "isolate follower",
            Fault::SlowLinks => "slow links",
            Fault::ServersDown => "servers down 60 s",
            Fault::WipeFollower => "wipe follower",
            Fault::ClockJump => "clock jump",
            Fault::DiskFull => "disk full",
        }
    }

    /// Whether the fault cuts links with nftables (the cluster's members need namespaces).
    pub fn cuts(self) -> bool {
        matches!(self, Fault::IsolateLeader | Fault::OneWayLeader | Fault::IsolateFollower)
    }
}

/// A named scenario: the faults it draws from.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub faults: &'static [Fault],
    /// Whether the cluster has nodes and a Kubernetes workload (deployments created, scaled,
    /// rolled and deleted, services exposed) runs beside the etcd one, judged by the
    /// control-plane checkers.
    pub kube: bool,
}

/// The failpoints the `failpoints` scenario cycles through, and after how many passes each
/// crashes its server (0: at once). A compaction is requested in `mvcc-compact`'s round, a
/// learner added and removed in `sm-membership-apply`'s.
pub const FAILPOINTS: &[(&str, u32)] = &[
    ("raft-log-before-append", 20),
    ("raft-log-after-fsync", 20),
    ("sm-before-batch", 20),
    ("sm-after-batch", 20),
    ("sm-membership-apply", 0),
    ("snapshot-build", 0),
    ("raft-log-purge", 0),
    ("snapshot-install-before-restore", 0),
    ("mvcc-compact", 0),
];

/// Faults by signal and restart, which every system supports (Debian's etcd included).
const PROCESS_FAULTS: &[Fault] =
    &[Fault::KillLeader, Fault::KillFollower, Fault::KillTwo, Fault::KillAll, Fault::PauseLeader, Fault::PauseFollower];

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "kill-leader",
        about: "SIGKILL the leader, restart it",
        faults: &[Fault::KillLeader],
        kube: false,
    },
    Scenario {
        name: "kill-follower",
        about: "SIGKILL a follower, restart it",
        faults: &[Fault::KillFollower],
        kube: false,
    },
    Scenario {
        name: "kill-two",
        about: "SIGKILL the leader and a follower: no quorum until they return",
        faults: &[Fault::KillTwo],
        kube: false,
    },
    Scenario {
        name: "kill-all",
        about: "SIGKILL every server, restart them all",
        faults: &[Fault::KillAll],
        kube: false,
    },
    Scenario {
        name: "pause-leader",
        about: "SIGSTOP the leader past the election timeout, then SIGCONT",
        faults: &[Fault::PauseLeader],
        kube: false,
    },
    Scenario {
        name: "pause-follower",
        about: "SIGSTOP a follower, then SIGCONT",
        faults: &[Fault::PauseFollower],
        kube: false,
    },
    Scenario {
        name: "failpoints",
        about: "crash a server at a failpoint (log append and fsync, state machine batch, snapshot build, purge and install, compaction, membership apply), round after round",
        faults: &[Fault::Failpoint],
        kube: false,
    },
    Scenario {
        name: "mixed",
        about: "each round a kill or a pause from the above, drawn by the seed",
        faults: PROCESS_FAULTS,
        kube: false,
    },
    Scenario {
        name: "partition-leader",
        about: "cut the leader off from its peers both ways (nftables in its namespace), then heal",
        faults: &[Fault::IsolateLeader],
        kube: false,
    },
    Scenario {
        name: "partition-one-way",
        about: "drop what the leader sends its peers, not what it hears, then heal",
        faults: &[Fault::OneWayLeader],
        kube: false,
    },
    Scenario {
        name: "partition-snapshot",
        about: "cut a follower off until the leader has compacted past it: it must catch up from a snapshot",
        faults: &[Fault::IsolateFollower],
        kube: false,
    },
    Scenario {
        name: "partitions",
        about: "each round one of the three partitions, drawn by the seed",
        faults: &[Fault::IsolateLeader, Fault::OneWayLeader, Fault::IsolateFollower],
        kube: false,
    },
    Scenario {
        name: "slow-links",
        about: "delay (20-150 ms), jitter and loss (up to 10%) on every peer link through userspace proxies",
        faults: &[Fault::SlowLinks],
        kube: false,
    },
    Scenario {
        name: "wipe-follower",
        about: "kill a follower, wipe its data, remove it from the membership and add it back under load",
        faults: &[Fault::WipeFollower],
        kube: false,
    },
    Scenario {
        name: "kube-mixed",
        about: "kills, pauses and partitions while Kubernetes clients create, scale, roll and delete deployments and expose services",
        faults: &[
            Fault::KillLeader,
            Fault::KillFollower,
            Fault::KillAll,
            Fault::PauseLeader,
            Fault::IsolateLeader,
            Fault::IsolateFollower,
        ],
        kube: true,
    },
    Scenario {
        name: "disk-full",
        about: "a server's data on a small filesystem that fills up under load, then space again",
        faults: &[Fault::DiskFull],
        kube: false,
    },
    Scenario {
        name: "clock-jump",
        about: "the leader's wall clock jumps 5 minutes forward and back (libfaketime) while pods run: no node NotReady, no pod evicted",
        faults: &[Fault::ClockJump],
        kube: true,
    },
    Scenario {
        name: "servers-down",
        about: "every server down for 60 s while pods run: none restarts or is evicted, every node Ready within 40 s",
        faults: &[Fault::ServersDown],
        kube: true,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// One round: run quietly, then inject, hold, heal.
#[derive(Clone, Debug, PartialEq)]
pub struct Round {
    pub fault: Fault,
    /// Quiet time before the fault (the workload's throughput is measured over its end).
    pub quiet: Duration,
    /// How long the fault lasts before healing.
    pub hold: Duration,
    /// For [`Fault::Failpoint`]: which, and its `fail` action (e.g. `20*off->panic`).
    pub failpoint: Option<(&'static str, String)>,
    /// Whether the victim is the leader (else a follower), where the fault leaves a choice.
    pub on_leader: bool,
    /// For [`Fault::SlowLinks`]: how the links misbehave.
    pub shaping: Option<Shaping>,
}

impl Scenario {
    /// Whether the scenario's servers run with libfaketime, their clocks set through files.
    pub fn fakes_clocks(&self) -> bool {
        self.faults.contains(&Fault::ClockJump)
    }

    /// Whether the scenario's links run through the shaping proxies.
    pub fn shapes_links(&self) -> bool {
        self.faults.contains(&Fault::SlowLinks)
    }

    /// Round `index`, drawn from `rng` (the run's seed): quiet 3-6 s, hold 1-4 s (5-8 s for
    /// an isolated follower, long enough to need a snapshot). Failpoint rounds take the
    /// failpoints in turn.
    pub fn round(&self, index: usize, rng: &mut StdRng) -> Round {
        let fault = self.faults[rng.random_range(0..self.faults.len())];
        let quiet = Duration::from_millis(rng.random_range(3_000..6_000));
        let hold = match fault {
            Fault::ServersDown => Duration::from_secs(60),
            Fault::ClockJump | Fault::DiskFull => Duration::from_millis(rng.random_range(5_000..8_000)),
            Fault::IsolateFollower => Duration::from_millis(rng.random_range(5_000..8_000)),
            _ => Duration::from_millis(rng.random_range(1_000..4_000)),
        };
        let on_leader = rng.random_bool(0.5);
        let failpoint = (fault == Fault::Failpoint).then(|| {
            let (name, passes) = FAILPOINTS[index % FAILPOINTS.len()];
            let action =
                if passes == 0 { "panic".to_string() } else { format!("{}*off->panic", rng.random_range(1..=passes)) };
            (name, action)
        });
        let shaping = (fault == Fault::SlowLinks).then(|| Shaping {
            delay: Duration::from_millis(rng.random_range(20..150)),
            jitter: Duration::from_millis(rng.random_range(0..50)),
            loss: rng.random_range(0.0..0.1),
        });
        Round { fault, quiet, hold, failpoint, on_leader, shaping }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn a_seed_gives_the_same_rounds() {
        let mixed = find("mixed").expect("mixed");
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20).map(|i| mixed.round(i, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let faults: std::collections::HashSet<_> = draw(7).iter().map(|r| r.fault.name()).collect();
        assert!(faults.len() >= 4, "twenty rounds draw most faults: {faults:?}");
    }

    #[test]
    fn scenario_names_are_unique() {
        let names: std::collections::HashSet<_> = SCENARIOS.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), SCENARIOS.len());
    }
}

#[cfg(test)]
mod failpoint_tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn failpoint_rounds_take_every_failpoint_in_turn() {
        let scenario = find("failpoints").expect("failpoints");
        let mut rng = StdRng::seed_from_u64(1);
        let names: Vec<_> =
            (0..FAILPOINTS.len()).map(|i| scenario.round(i, &mut rng).failpoint.expect("armed").0).collect();
        assert_eq!(names, FAILPOINTS.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    }
}
