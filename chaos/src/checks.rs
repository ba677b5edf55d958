//! The checkers: each reads a run's [`History`] and says whether one guarantee held, with the
//! criterion it applied and, when it failed, the first evidence.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::history::{Event, History, Kind, Op, Outcome, Value};
use crate::linearizable::{self, Verdict};

/// One checker's verdict.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    /// What passing means, printed beside the verdict.
    pub criterion: &'static str,
    pub passed: bool,
    /// Figures when it passed; the first evidence when it did not.
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, criterion: &'static str, failures: Vec<String>, figures: String) -> Check {
        let passed = failures.is_empty();
        let detail = if passed {
            figures
        } else {
            let more = if failures.len() > 3 { format!(" (and {} more)", failures.len() - 3) } else { String::new() };
            format!("{}{more}", failures.into_iter().take(3).collect::<Vec<_>>().join("; "))
        };
        Check { name, criterion, passed, detail }
    }
}

/// Every checker over one history.
pub fn all(history: &History, search_limit: u64) -> Vec<Check> {
    vec![
        log_order(history),
        linearizability(history, search_limit),
        lost_writes(history),
        watches(history),
        client_revisions(history),
        serializable_reads(history),
    ]
}

/// Per key, the value it held after each revision that changed it.
fn timeline(log: &[Event]) -> HashMap<&str, Vec<(i64, Option<Value>)>> {
    let mut keys: HashMap<&str, Vec<(i64, Option<Value>)>> = HashMap::new();
    for e in log {
        keys.entry(e.key.as_str()).or_default().push((e.revision, e.value));
    }
    keys
}

/// Every value the log shows written, per key.
fn written_values(log: &[Event]) -> HashSet<(&str, Value)> {
    log.iter().filter_map(|e| e.value.map(|v| (e.key.as_str(), v))).collect()
}

/// The store's own log is in revision order, one event per key and revision.
pub fn log_order(history: &History) -> Check {
    let mut failures = Vec::new();
    for pair in history.log.windows(2) {
        if pair[1].revision < pair[0].revision || (pair[1].revision == pair[0].revision && pair[1].key == pair[0].key) {
            failures.push(format!("log event at revision {} follows {}", pair[1].revision, pair[0].revision));
        }
    }
    Check::new(
        "store log",
        "the watch from the first revision, read after healing, is ordered and unique",
        failures,
        format!("{} events", history.log.len()),
    )
}

/// Per key, Wing-Gong-Lowe over the operations that constrain the register. Writes of unknown
/// outcome are resolved with the store's log where it can say: a value no event carries was
/// never written (its write is dropped), one it carries was (kept, of unknown time); an
/// unknown delete stays "may have happened".
pub fn linearizability(history: &History, search_limit: u64) -> Check {
    let in_log = written_values(&history.log);
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &history.ops {
        let keep = match (op.outcome, &op.kind) {
            (Outcome::Failed, _) => false,
            (Outcome::Unknown, Kind::Read { .. }) => false,
            (Outcome::Ok, Kind::Read { serializable, .. }) => !serializable,
            (Outcome::Unknown, Kind::Write { value } | Kind::Cas { value, .. }) => {
                in_log.contains(&(op.key.as_str(), *value))
            }
            _ => true,
        };
        if keep {
            by_key.entry(op.key.as_str()).or_default().push(op);
        }
    }
    let mut failures = Vec::new();
    let mut checked = 0;
    for (key, ops) in &by_key {
        checked += ops.len();
        match linearizable::check(ops, search_limit) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable { op, linearized } => {
                let op = ops[op];
                failures.push(format!(
                    "{key}: no order explains client {}'s {:?} ({:?}, {}..{} µs) after {linearized} operations",
                    op.client, op.kind, op.outcome, op.call_us, op.return_us
                ));
            }
            Verdict::Undecided { explored } => {
                failures.push(format!("{key}: undecided after {explored} search steps ({} operations)", ops.len()))
            }
        }
    }
    Check::new(
        "linearizable",
        "per key, one order of the operations fits both real time and a register",
        failures,
        format!("{checked} operations on {} keys", by_key.len()),
    )
}

/// Set-full: every acknowledged write is in the store's log; no refused write is.
pub fn lost_writes(history: &History) -> Check {
    let in_log = written_values(&history.log);
    let mut failures = Vec::new();
    let mut acknowledged = 0;
    for op in &history.ops {
        let Some(value) = op.written() else { continue };
        let present = in_log.contains(&(op.key.as_str(), value));
        if op.acknowledged() {
            acknowledged += 1;
            if !present {
                failures.push(format!("{} = {value} acknowledged at {} µs is not in the log", op.key, op.return_us));
            }
        } else if op.outcome != Outcome::Unknown && present {
            failures.push(format!("{} = {value} was refused ({:?}) yet written", op.key, op.kind));
        }
    }
    Check::new(
        "no lost write",
        "every acknowledged put and successful txn is in the log; no refused one is",
        failures,
        format!("{acknowledged} acknowledged writes, all present"),
    )
}

/// Each watcher: ordered, unique, atomic (a revision's events in one response), and, from its
/// start to the last revision it saw, exactly the log's events: none missed across resumes.
pub fn watches(history: &History) -> Check {
    let mut failures = Vec::new();
    let mut events = 0;
    let mut resumes = 0;
    for w in &history.watches {
        events += w.events.len();
        resumes += w.resumes;
        if !w.finished {
            failures.push(format!(
                "watcher {}: never saw the end of the run (stopped at {} events)",
                w.watcher,
                w.events.len()
            ));
        }
        let mut response_of: HashMap<i64, u64> = HashMap::new();
        for pair in w.events.windows(2) {
            if (pair[1].revision, &pair[1].key) <= (pair[0].revision, &pair[0].key) {
                failures.push(format!(
                    "watcher {}: revision {} {} after {} {}",
                    w.watcher, pair[1].revision, pair[1].key, pair[0].revision, pair[0].key
                ));
            }
        }
        for e in &w.events {
            if *response_of.entry(e.revision).or_insert(e.response) != e.response {
                failures.push(format!("watcher {}: revision {} split across responses", w.watcher, e.revision));
            }
        }
        let Some(last) = w.events.last().map(|e| e.revision) else { continue };
        let expected: Vec<(i64, &str, Option<Value>)> = history
            .log
            .iter()
            .filter(|e| e.revision >= w.start_revision && e.revision <= last)
            .map(|e| (e.revision, e.key.as_str(), e.value))
            .collect();
        let seen: Vec<(i64, &str, Option<Value>)> =
            w.events.iter().map(|e| (e.revision, e.key.as_str(), e.value)).collect();
        if seen != expected {
            let first = expected.iter().zip(&seen).position(|(a, b)| a != b).unwrap_or(expected.len().min(seen.len()));
            failures.push(format!(
                "watcher {}: {} events where the log has {} from revision {}; first difference at #{first}: saw {:?}, log {:?}",
                w.watcher,
                seen.len(),
                expected.len(),
                w.start_revision,
                seen.get(first),
                expected.get(first)
            ));
        }
    }
    Check::new(
        "watch",
        "ordered, unique, atomic, and equal to the log up to the last revision seen, across resumes",
        failures,
        format!("{} watchers, {events} events, {resumes} resumes on another server", history.watches.len()),
    )
}

/// A client never sees the revision go backwards across its answered linearizable operations.
pub fn client_revisions(history: &History) -> Check {
    let mut by_client: BTreeMap<u32, Vec<&Op>> = BTreeMap::new();
    for op in &history.ops {
        let serializable = matches!(op.kind, Kind::Read { serializable: true, .. });
        if op.outcome == Outcome::Ok && !serializable && op.revision.is_some() {
            by_client.entry(op.client).or_default().push(op);
        }
    }
    let mut failures = Vec::new();
    for (client, ops) in &mut by_client {
        ops.sort_by_key(|op| op.call_us);
        for pair in ops.windows(2) {
            if pair[1].revision < pair[0].revision {
                failures.push(format!(
                    "client {client}: revision {:?} at {} µs after {:?}",
                    pair[1].revision, pair[1].call_us, pair[0].revision
                ));
            }
        }
    }
    Check::new(
        "revisions monotonic",
        "each client's linearizable answers carry non-decreasing revisions",
        failures,
        format!("{} clients", by_client.len()),
    )
}

/// A serializable read reports a revision; what it returned must be the key's state there.
pub fn serializable_reads(history: &History) -> Check {
    let timeline = timeline(&history.log);
    let mut failures = Vec::new();
    let mut reads = 0;
    for op in &history.ops {
        let (Kind::Read { value, serializable: true }, Outcome::Ok, Some(revision)) =
            (&op.kind, op.outcome, op.revision)
        else {
            continue;
        };
        reads += 1;
        let at = timeline
            .get(op.key.as_str())
            .and_then(|t| t.iter().rev().find(|(rev, _)| *rev <= revision))
            .and_then(|(_, v)| *v);
        if at != *value {
            failures.push(format!("{} read {value:?} at revision {revision}, the log has {at:?}", op.key));
        }
    }
    Check::new(
        "serializable reads",
        "each returns the key's state at the revision it reports",
        failures,
        format!("{reads} reads"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::WatchHistory;

    fn op(client: u32, kind: Kind, outcome: Outcome, t: u64, revision: Option<i64>) -> Op {
        Op { client, key: "k".into(), kind, outcome, call_us: t, return_us: t + 1, revision }
    }
    fn event(revision: i64, value: Option<Value>, response: u64) -> Event {
        Event { revision, key: "k".into(), value, response }
    }
    /// A correct run: puts 1 and 2, a read of 2, a watcher that saw both.
    fn good() -> History {
        History {
            ops: vec![
                op(1, Kind::Write { value: 1 }, Outcome::Ok, 0, Some(10)),
                op(2, Kind::Write { value: 2 }, Outcome::Ok, 10, Some(11)),
                op(1, Kind::Read { value: Some(2), serializable: false }, Outcome::Ok, 20, Some(11)),
                op(3, Kind::Read { value: Some(1), serializable: true }, Outcome::Ok, 30, Some(10)),
                op(3, Kind::Write { value: 3 }, Outcome::Unknown, 40, None),
            ],
            watches: vec![WatchHistory {
                watcher: 0,
                start_revision: 10,
                events: vec![event(10, Some(1), 0), event(11, Some(2), 1)],
                resumes: 1,
                finished: true,
            }],
            log: vec![event(10, Some(1), 0), event(11, Some(2), 0)],
            start_revision: 9,
        }
    }

    #[test]
    fn a_correct_history_passes_every_checker() {
        for check in all(&good(), 100_000) {
            assert!(check.passed, "{}: {}", check.name, check.detail);
        }
    }

    #[test]
    fn a_write_missing_from_the_log_is_lost() {
        let mut h = good();
        h.log.pop();
        h.watches[0].events.pop();
        assert!(!lost_writes(&h).passed);
    }

    #[test]
    fn a_refused_write_that_took_effect_is_caught() {
        let mut h = good();
        h.ops[1].outcome = Outcome::Failed;
        assert!(!lost_writes(&h).passed);
    }

    #[test]
    fn a_watch_that_skips_or_repeats_an_event_is_caught() {
        let mut skipped = good();
        skipped.log.insert(1, Event { revision: 10, key: "other".into(), value: Some(9), response: 0 });
        assert!(!watches(&skipped).passed, "a missed event");
        let mut repeated = good();
        repeated.watches[0].events.push(event(11, Some(2), 2));
        assert!(!watches(&repeated).passed, "a duplicate");
        let mut split = good();
        split.log = vec![event(10, Some(1), 0), Event { revision: 10, key: "m".into(), value: Some(5), response: 0 }];
        split.watches[0].events =
            vec![event(10, Some(1), 0), Event { revision: 10, key: "m".into(), value: Some(5), response: 1 }];
        assert!(!watches(&split).passed, "a revision split over two responses");
    }

    #[test]
    fn a_revision_going_backwards_is_caught() {
        let mut h = good();
        h.ops[2].revision = Some(9);
        assert!(!client_revisions(&h).passed);
    }

    #[test]
    fn a_serializable_read_must_match_its_revision() {
        let mut h = good();
        h.ops[3].revision = Some(11);
        assert!(!serializable_reads(&h).passed);
    }
}
