//! The HorizontalPodAutoscaler's arithmetic (autoscaling/v2, CPU utilization), as Kubernetes'
//! replica calculator and behavior do it, in pure functions:
//!
//! 1. `utilization_replicas`: the usage ratio (mean utilization of the pods with metrics over
//!    the target); within the tolerance (10%) nothing changes; pods without metrics count as
//!    using all they request when scaling down and nothing when scaling up, pods not yet
//!    ready count as nothing when scaling up, and if that turns the decision around or into
//!    the tolerance, nothing changes.
//! 2. `Recommendations::stabilized`: scaling down takes the highest recommendation of the
//!    stabilization window (300 s by default), scaling up the lowest of its window (0 s).
//! 3. `limit_rate`: the scale-up and scale-down policies (by default up: the larger of 100%
//!    and 4 pods per 15 s; down: 100% per 15 s) against the changes already made in their
//!    periods; then `minReplicas` and `maxReplicas`.
//!
//! `podautoscaler` runs it against the cluster.

use std::collections::VecDeque;

/// Kubernetes' default tolerance: no change while the ratio is within 1 ± 0.1.
pub const TOLERANCE: f64 = 0.1;

/// One pod of the scale target, as the calculator sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PodSample {
    /// Ready (and past its CPU initialization period).
    pub ready: bool,
    /// CPU used, in millicores; None when no metrics were reported for it.
    pub usage_milli: Option<i64>,
    /// CPU requested by its containers, in millicores.
    pub request_milli: i64,
}

/// Why no recommendation could be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CalcError {
    #[error("did not receive metrics for targeted pods (pods might be unready)")]
    NoMetrics,
    #[error("missing request for cpu in container(s) of the targeted pods")]
    MissingRequests,
}

/// A recommendation: replicas, and the current utilization (percent of requests) of the pods
/// with metrics, for the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recommendation {
    pub replicas: i32,
    pub utilization: i64,
}

/// Replicas for a target utilization (percent of requests), from `current` replicas.
pub fn utilization_replicas(current: i32, target: i64, pods: &[PodSample]) -> Result<Recommendation, CalcError> {
    if pods.iter().any(|p| p.request_milli <= 0) {
        return Err(CalcError::MissingRequests);
    }
    let measured: Vec<&PodSample> = pods.iter().filter(|p| p.ready && p.usage_milli.is_some()).collect();
    let usage = |set: &[&PodSample]| set.iter().map(|p| p.usage_milli.unwrap_or(0)).sum::<i64>();
    let requests = |set: &[&PodSample]| set.iter().map(|p| p.request_milli).sum::<i64>();
    // Unready pods with metrics count only when scaling up, as using nothing.
    let missing: Vec<&PodSample> = pods.iter().filter(|p| p.usage_milli.is_none()).collect();
    let unready: Vec<&PodSample> = pods.iter().filter(|p| !p.ready && p.usage_milli.is_some()).collect();
    if measured.is_empty() {
        return Err(CalcError::NoMetrics);
    }
    let utilization = usage(&measured) * 100 / requests(&measured);
    let ratio = utilization as f64 / target as f64;
    let within = |r: f64| (r - 1.0).abs() <= TOLERANCE;
    let keep = Recommendation { replicas: current, utilization };
    if missing.is_empty() && unready.is_empty() {
        if within(ratio) {
            return Ok(keep);
        }
        return Ok(Recommendation { replicas: (ratio * measured.len() as f64).ceil() as i32, utilization });
    }
    // Fill in the unknown: the assumption that argues against the change.
    let scale_up = ratio > 1.0;
    let mut total_usage = usage(&measured);
    let mut total_requests = requests(&measured);
    for p in &missing {
        total_requests += p.request_milli;
        if !scale_up {
            total_usage += p.request_milli;
        }
    }
    if scale_up {
        total_requests += requests(&unready);
    }
    let considered = measured.len() + missing.len() + if scale_up { unready.len() } else { 0 };
    let new_ratio = (total_usage * 100 / total_requests) as f64 / target as f64;
    if within(new_ratio) || (new_ratio > 1.0) != scale_up {
        return Ok(keep);
    }
    let replicas = (new_ratio * considered as f64).ceil() as i32;
    // Never a change in the direction the filled-in ratio argues against.
    if (scale_up && replicas < current) || (!scale_up && replicas > current) {
        return Ok(keep);
    }
    Ok(Recommendation { replicas, utilization })
}

/// A scaling policy: at most `value` pods or percent of the replicas per `period_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Pods { value: i32, period_s: u64 },
    Percent { value: i32, period_s: u64 },
}

/// How the policies of one direction combine: the most change allowed, the least, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    Max,
    Min,
    Disabled,
}

/// One direction's behavior.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub stabilization_s: u64,
    pub select: Select,
    pub policies: Vec<Policy>,
}

/// spec.behavior with Kubernetes' defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behavior {
    pub up: Rules,
    pub down: Rules,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            up: Rules {
                stabilization_s: 0,
                select: Select::Max,
                policies: vec![Policy::Percent { value: 100, period_s: 15 }, Policy::Pods { value: 4, period_s: 15 }],
            },
            down: Rules {
                stabilization_s: 300,
                select: Select::Max,
                policies: vec![Policy::Percent { value: 100, period_s: 15 }],
            },
        }
    }
}

/// Recommendations of recent passes, (seconds, replicas), oldest first.
#[derive(Clone, Debug, Default)]
pub struct Recommendations(VecDeque<(u64, i32)>);

impl Recommendations {
    /// Records this pass's recommendation and returns it stabilized: a scale down goes no
    /// lower than the highest recommendation of the down window, a scale up no higher than
    /// the lowest of the up window.
    pub fn stabilized(&mut self, now: u64, current: i32, recommended: i32, behavior: &Behavior) -> i32 {
        let longest = behavior.up.stabilization_s.max(behavior.down.stabilization_s);
        while self.0.front().is_some_and(|(t, _)| now.saturating_sub(*t) > longest) {
            self.0.pop_front();
        }
        self.0.push_back((now, recommended));
        let within =
            |window: u64| self.0.iter().filter(move |(t, _)| now.saturating_sub(*t) <= window).map(|(_, r)| *r);
        let up_limit = within(behavior.up.stabilization_s).min().unwrap_or(recommended);
        let down_limit = within(behavior.down.stabilization_s).max().unwrap_or(recommended);
        if recommended > current {
            up_limit.max(current)
        } else if recommended < current {
            down_limit.min(current)
        } else {
            current
        }
    }
}

/// `desired` limited by the direction's policies, given the scale events of recent passes
/// ((seconds, change in replicas), oldest first), then to [min, max].
pub fn limit_rate(
    now: u64,
    current: i32,
    desired: i32,
    events: &[(u64, i32)],
    behavior: &Behavior,
    min: i32,
    max: i32,
) -> i32 {
    let changed_in = |period: u64, up: bool| -> i32 {
        events.iter().filter(|(t, c)| now.saturating_sub(*t) <= period && (*c > 0) == up).map(|(_, c)| c.abs()).sum()
    };
    let limited = if desired > current {
        let rules = &behavior.up;
        let limits = rules.policies.iter().map(|p| {
            let (period, allowed) = match *p {
                Policy::Pods { value, period_s } => (period_s, value),
                Policy::Percent { value, period_s } => {
                    let start = current - changed_in(period_s, true);
                    (period_s, (start as f64 * value as f64 / 100.0).ceil() as i32)
                }
            };
            current - changed_in(period, true) + allowed
        });
        let limit = match rules.select {
            Select::Max => limits.max(),
            Select::Min => limits.min(),
            Select::Disabled => Some(current),
        };
        desired.min(limit.unwrap_or(desired)).max(current)
    } else if desired < current {
        let rules = &behavior.down;
        let limits = rules.policies.iter().map(|p| {
            let (period, allowed) = match *p {
                Policy::Pods { value, period_s } => (period_s, value),
                Policy::Percent { value, period_s } => {
                    let start = current + changed_in(period_s, false);
                    (period_s, (start as f64 * value as f64 / 100.0) as i32)
                }
            };
            current + changed_in(period, false) - allowed
        });
        let limit = match rules.select {
            Select::Max => limits.min(),
            Select::Min => limits.max(),
            Select::Disabled => Some(current),
        };
        desired.max(limit.unwrap_or(desired)).min(current)
    } else {
        desired
    };
    limited.clamp(min.max(1), max.max(min.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(usage: Option<i64>, ready: bool) -> PodSample {
        PodSample { ready, usage_milli: usage, request_milli: 100 }
    }

    #[test]
    fn replicas_follow_the_usage_ratio_outside_the_tolerance() {
        let busy = [pod(Some(90), true), pod(Some(90), true)];
        assert_eq!(utilization_replicas(2, 50, &busy), Ok(Recommendation { replicas: 4, utilization: 90 }));
        let idle = [pod(Some(10), true), pod(Some(10), true), pod(Some(10), true), pod(Some(10), true)];
        assert_eq!(utilization_replicas(4, 50, &idle).unwrap().replicas, 1);
        let near = [pod(Some(54), true), pod(Some(54), true)];
        assert_eq!(utilization_replicas(2, 50, &near).unwrap().replicas, 2, "within 10% of the target");
    }

    #[test]
    fn unknown_pods_count_against_the_change() {
        // Scaling up: the pod without metrics counts as idle, the unready one too.
        let pods = [pod(Some(100), true), pod(None, true), pod(Some(100), false)];
        assert_eq!(utilization_replicas(3, 50, &pods).unwrap().replicas, 3, "ratio (100+0+0)/300/0.5 = 0.67: reversed");
        let pods = [pod(Some(200), true), pod(None, true)];
        assert_eq!(utilization_replicas(2, 50, &pods).unwrap().replicas, 4, "(200+0)/200 / 0.5 = 2, over 2 pods");
        // Scaling down: the pod without metrics counts as using all it asked for.
        let pods = [pod(Some(10), true), pod(None, true)];
        assert_eq!(
            utilization_replicas(2, 50, &pods).unwrap().replicas,
            2,
            "(10+100)/200 = 55%: no longer a scale down"
        );
    }

    #[test]
    fn no_metrics_or_no_requests_is_an_error() {
        assert_eq!(utilization_replicas(1, 50, &[pod(None, true)]), Err(CalcError::NoMetrics));
        let unrequested = [PodSample { ready: true, usage_milli: Some(10), request_milli: 0 }];
        assert_eq!(utilization_replicas(1, 50, &unrequested), Err(CalcError::MissingRequests));
    }

    #[test]
    fn scaling_down_waits_for_the_stabilization_window() {
        let b = Behavior::default();
        let mut r = Recommendations::default();
        assert_eq!(r.stabilized(0, 5, 10, &b), 10, "up at once");
        assert_eq!(r.stabilized(15, 10, 2, &b), 10, "the 10 of 15 s ago still counts");
        assert_eq!(r.stabilized(200, 10, 2, &b), 10);
        assert_eq!(r.stabilized(316, 10, 2, &b), 2, "after 300 s only the low recommendations remain");
    }

    #[test]
    fn policies_bound_the_rate_and_min_max_the_result() {
        let b = Behavior::default();
        // Up: the larger of 100% (4) and 4 pods per 15 s.
        assert_eq!(limit_rate(0, 4, 20, &[], &b, 1, 100), 8);
        assert_eq!(limit_rate(0, 1, 20, &[], &b, 1, 100), 5, "4 pods beat 100% of 1");
        assert_eq!(limit_rate(10, 8, 20, &[(0, 4)], &b, 1, 100), 8, "the period's allowance is spent");
        assert_eq!(limit_rate(20, 8, 20, &[(0, 4)], &b, 1, 100), 16, "a new period");
        // Down: 100% per 15 s allows going to the floor; min and max clamp.
        assert_eq!(limit_rate(0, 10, 0, &[], &b, 2, 100), 2);
        assert_eq!(limit_rate(0, 10, 50, &[], &b, 1, 12), 12);
        let slow = Behavior {
            down: Rules {
                stabilization_s: 0,
                select: Select::Max,
                policies: vec![Policy::Pods { value: 1, period_s: 60 }],
            },
            ..Behavior::default()
        };
        assert_eq!(limit_rate(0, 10, 3, &[], &slow, 1, 100), 9);
        assert_eq!(limit_rate(30, 9, 3, &[(0, -1)], &slow, 1, 100), 9, "one pod a minute");
        let disabled =
            Behavior { down: Rules { select: Select::Disabled, ..slow.down.clone() }, ..Behavior::default() };
        assert_eq!(limit_rate(0, 10, 3, &[], &disabled, 1, 100), 10);
    }
}
