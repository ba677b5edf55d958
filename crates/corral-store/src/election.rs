//! Prompt elections: after the leader dies, the follower with the longest log campaigns as
//! soon as the voters' leader lease lets it win.
//!
//! openraft 0.9 has no pre-vote. On its own, a follower campaigns one leader lease
//! (`election_timeout_max`) plus its own random election timeout after the last heartbeat,
//! and if the first to campaign has the shorter log its vote is refused, it raises the term,
//! and everyone waits another round: 1.5 s or more without a leader. Here each follower that
//! has heard nothing for a lease and a heartbeat asks the other voters (the `ElectionProbe`
//! RPC) how long their logs are and whether their lease still refuses votes; the one with the
//! longest log (ties go to the lowest id) triggers openraft's election, which then runs as
//! usual. This only chooses *when* and *who* campaigns: Raft's vote rules still decide, so
//! safety does not depend on it. A voter that still hears its leader answers with lease time
//! left, and nobody campaigns: a follower cut off alone does not disrupt a healthy leader.
//! openraft's own election timer is off (`enable_elect: false`), so this is the only way a
//! server campaigns: one that cannot reach a quorum never raises its term, and does not
//! depose the leader when it returns.

use std::sync::Weak;
use std::time::Duration;

use corral_proto::store::{ElectionProbeRequest, ElectionProbeResponse};
use openraft::ServerState;

use crate::node::StoreNode;
use crate::raft::{LogId, LogStore, NodeId, decode, encode};

/// What one voter reports about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub leader: bool,
    /// How much longer its leader lease refuses votes.
    pub lease_left: Duration,
    pub last_log_id: Option<LogId>,
}

/// Whether `me` should campaign now, given the voters that answered. `voters` counts every
/// voter, this one included.
pub fn should_campaign(me: (NodeId, &Probe), answers: &[(NodeId, Probe)], voters: usize) -> bool {
    let reachable = answers.len() + 1;
    if reachable <= voters / 2 {
        return false; // no quorum to win with
    }
    if answers.iter().any(|(_, p)| p.leader || !p.lease_left.is_zero()) {
        return false; // a leader is alive, or a voter would still refuse
    }
    // The candidate with the greatest log wins the votes; ties go to the lowest id, so that
    // exactly one follower campaigns.
    answers.iter().all(|(id, p)| match me.1.last_log_id.cmp(&p.last_log_id) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => me.0 < *id,
        std::cmp::Ordering::Less => false,
    })
}

/// This server's Raft state as a probe answers it, with how long it has gone without hearing
/// from a leader, whether its vote is committed (it follows a leader) and whether it votes.
struct Local {
    probe: Probe,
    silent: Duration,
    committed: bool,
    voter: bool,
}

async fn local_state(node: &StoreNode, with_log: bool) -> Option<Local> {
    let lease = Duration::from_millis(node.config().election_timeout_max_ms);
    let id = node.id();
    let mut local = node
        .raft()
        .with_raft_state(move |st| {
            let silent = st.vote_last_modified().map_or(Duration::MAX, |t| t.elapsed());
            let leader = st.server_state == ServerState::Leader;
            let committed = st.vote_ref().is_committed();
            let lease_left = if committed && !leader { lease.saturating_sub(silent) } else { Duration::ZERO };
            let voter = st.membership_state.effective().voter_ids().any(|v| v == id);
            Local { probe: Probe { leader, lease_left, last_log_id: None }, silent, committed, voter }
        })
        .await
        .ok()?;
    // Read only when needed: the log on disk is where openraft's own is once appends settle,
    // and a leader silent this long has sent nothing for a while.
    if with_log {
        local.probe.last_log_id = LogStore::new(node.engine().clone()).last_log_id().ok()?;
    }
    Some(local)
}

/// The answer to another server's `ElectionProbe`.
pub async fn answer_probe(node: &StoreNode) -> ElectionProbeResponse {
    match local_state(node, true).await.map(|l| l.probe) {
        Some(p) => ElectionProbeResponse {
            leader: p.leader,
            lease_left_ms: p.lease_left.as_millis() as u64,
            last_log_id: encode(&p.last_log_id),
        },
        // Raft is shutting down: a voter that will grant nothing.
        None => ElectionProbeResponse { leader: false, lease_left_ms: u64::MAX, last_log_id: encode(&None::<LogId>) },
    }
}

/// Runs on every server until it shuts down, checking every 10 ms whether to campaign.
pub(crate) async fn prompt_elections(node: Weak<StoreNode>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Some(node) = node.upgrade() else { return };
        let cfg = node.config();
        let Some(Local { silent, committed, voter, probe }) = local_state(&node, false).await else { continue };
        // A committed vote follows a leader: silent for its lease and a heartbeat means the
        // leader is gone. An uncommitted one is an election under way: give it its time.
        let patience = if committed {
            Duration::from_millis(cfg.election_timeout_max_ms + cfg.heartbeat_interval_ms)
        } else {
            Duration::from_millis(cfg.election_timeout_min_ms)
        };
        if probe.leader || !voter || silent < patience {
            continue;
        }
        let Some(Local { probe: me, .. }) = local_state(&node, true).await else { continue };
        let metrics = node.metrics();
        let membership = metrics.membership_config.membership();
        let others: Vec<_> = membership
            .voter_ids()
            .filter(|id| *id != node.id())
            .filter_map(|id| membership.get_node(&id).map(|m| (id, m.clone())))
            .collect();
        let voters = others.len() + 1;
        if voters == 1 {
            continue; // openraft elects a single voter at once
        }
        let asks = others.into_iter().map(|(id, member)| {
            let node = node.clone();
            async move {
                let mut client = node.peers().member_client(&member).ok()?;
                let mut req = tonic::Request::new(ElectionProbeRequest {});
                req.set_timeout(Duration::from_millis(probe_timeout(&node)));
                let resp = client.election_probe(req).await.ok()?.into_inner();
                Some((
                    id,
                    Probe {
                        leader: resp.leader,
                        lease_left: Duration::from_millis(resp.lease_left_ms),
                        last_log_id: decode(&resp.last_log_id).ok()?,
                    },
                ))
            }
        });
        let answers: Vec<_> = futures::future::join_all(asks).await.into_iter().flatten().collect();
        if should_campaign((node.id(), &me), &answers, voters) {
            tracing::info!(silent_ms = silent.as_millis() as u64, last_log = ?me.last_log_id, "leader silent: campaigning");
            if let Err(e) = node.raft().trigger().elect().await {
                tracing::warn!(error = %e, "could not start an election");
            }
        }
    }
}

/// A probe waits at most a heartbeat: a voter slower than that is treated as unreachable.
fn probe_timeout(node: &StoreNode) -> u64 {
    node.config().heartbeat_interval_ms.max(20)
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn probe(term: u64, index: u64, lease_left_ms: u64) -> Probe {
        Probe {
            leader: false,
            lease_left: Duration::from_millis(lease_left_ms),
            last_log_id: Some(LogId::new(CommittedLeaderId::new(term, 1), index)),
        }
    }

    #[test]
    fn the_longest_log_campaigns_once_every_lease_has_expired() {
        let (long, short) = (probe(3, 120, 0), probe(3, 100, 0));
        assert!(should_campaign((2, &long), &[(3, short.clone())], 3), "longest log, quorum of two");
        assert!(!should_campaign((3, &short), &[(2, long.clone())], 3), "the shorter log waits");
        assert!(!should_campaign((2, &long), &[(3, probe(3, 100, 40))], 3), "a lease still refuses votes");
        assert!(!should_campaign((2, &long), &[], 3), "alone of three: no quorum");
    }

    #[test]
    fn ties_go_to_the_lowest_id_and_a_live_leader_stops_everyone() {
        let same = probe(4, 50, 0);
        assert!(should_campaign((2, &same), &[(5, same.clone())], 3));
        assert!(!should_campaign((5, &same), &[(2, same.clone())], 3));
        let leader = Probe { leader: true, ..probe(4, 50, 0) };
        assert!(!should_campaign((2, &probe(4, 60, 0)), &[(5, leader)], 3), "a cut-off follower must not disrupt");
        assert!(!should_campaign((2, &probe(3, 500, 0)), &[(5, probe(4, 10, 0))], 3), "a later term is the longer log");
    }
}
