//! A linearizability checker for one register (one key), after Wing and Gong with Lowe's
//! cache, as Knossos and Porcupine do it.
//!
//! The history is a list of call and return entries in time order. The search walks it,
//! linearizing a pending call whenever the model accepts it in the current state, and
//! backtracks when it meets the return of an operation it has not linearized. A set of
//! (linearized operations, state) pairs already explored prunes repeats. Operations of unknown
//! outcome return "at infinity": they may take effect at any moment after their call, or,
//! placed after everything else, not at all.

use std::collections::HashSet;

use crate::history::{Kind, Op, Outcome, Value};

/// The register's state: the key's value, None when it does not exist.
type State = Option<Value>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order fits. `op` is the operation whose return the deepest search could not pass:
    /// no linearization explains what it saw.
    NotLinearizable {
        op: usize,
        linearized: usize,
    },
    /// The search gave up after `explored` steps.
    Undecided {
        explored: u64,
    },
}

/// The register model: the state after `op` in `state`, or None if `op` cannot happen there.
fn step(state: State, op: &Op) -> Option<State> {
    match (&op.kind, op.outcome) {
        (Kind::Read { value, .. }, _) => (*value == state).then_some(state),
        (Kind::Write { value }, _) => Some(Some(*value)),
        (Kind::Delete, _) => Some(None),
        (Kind::Cas { expect, value, .. }, Outcome::Unknown) => {
            Some(if state == *expect { Some(*value) } else { state })
        }
        (Kind::Cas { expect, value, succeeded: true }, _) => (state == *expect).then_some(Some(*value)),
        (Kind::Cas { expect, succeeded: false, .. }, _) => (state != *expect).then_some(state),
    }
}

const NIL: usize = usize::MAX;

struct Node {
    op: usize,
    call: bool,
    /// For a call, its return's node.
    other: usize,
    prev: usize,
    next: usize,
}

/// A doubly linked list of entries with a head sentinel at index 0, from which a call and its
/// return are lifted together and put back in reverse order.
struct Entries {
    nodes: Vec<Node>,
}

impl Entries {
    fn new(ops: &[&Op]) -> Self {
        // (time, is_return, op): at equal times calls come first, so the two overlap.
        let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            order.push((op.call_us, false, i));
            let ret = if op.outcome == Outcome::Unknown { u64::MAX } else { op.return_us.max(op.call_us) };
            order.push((ret, true, i));
        }
        order.sort();
        let mut nodes = vec![Node { op: NIL, call: false, other: NIL, prev: NIL, next: NIL }];
        let mut call_node = vec![NIL; ops.len()];
        for (n, (_, is_return, op)) in order.iter().enumerate() {
            let index = n + 1;
            nodes.push(Node { op: *op, call: !is_return, other: NIL, prev: index - 1, next: NIL });
            nodes[index - 1].next = index;
            if *is_return {
                nodes[call_node[*op]].other = index;
            } else {
                call_node[*op] = index;
            }
        }
        Entries { nodes }
    }

    fn first(&self) -> usize {
        self.nodes[0].next
    }

    fn unlink(&mut self, n: usize) {
        let (prev, next) = (self.nodes[n].prev, self.nodes[n].next);
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    fn relink(&mut self, n: usize) {
        let (prev, next) = (self.nodes[n].prev, self.nodes[n].next);
        self.nodes[prev].next = n;
        if next != NIL {
            self.nodes[next].prev = n;
        }
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.nodes[call].other);
    }

    fn unlift(&mut self, call: usize) {
        self.relink(self.nodes[call].other);
        self.relink(call);
    }
}

/// Checks one key's operations (reads of unknown outcome and failed operations are best left
/// out by the caller: they constrain nothing). `limit` bounds the search steps.
pub fn check(ops: &[&Op], limit: u64) -> Verdict {
    let mut entries = Entries::new(ops);
    // The linearized set is kept as a 128-bit Zobrist hash: one random word pair per
    // operation, xored in and out. A collision could only prune a branch wrongly with
    // probability ~n²/2¹²⁸.
    let keys: Vec<u128> = (0..ops.len()).map(|i| mix(i as u64)).collect();
    let mut linearized: u128 = 0;
    let mut seen: HashSet<(u128, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut explored = 0u64;
    let mut deepest = (0usize, NIL);
    let mut entry = entries.first();
    while entries.first() != NIL {
        explored += 1;
        if explored > limit {
            return Verdict::Undecided { explored };
        }
        let node = &entries.nodes[entry];
        let op = node.op;
        if node.call {
            if let Some(next) = step(state, ops[op])
                && seen.insert((linearized ^ keys[op], next))
            {
                linearized ^= keys[op];
                stack.push((entry, state));
                state = next;
                entries.lift(entry);
                entry = entries.first();
                continue;
            }
            entry = entries.nodes[entry].next;
        } else {
            if stack.len() >= deepest.0 {
                deepest = (stack.len(), op);
            }
            let Some((call, before)) = stack.pop() else {
                return Verdict::NotLinearizable { op: deepest.1, linearized: deepest.0 };
            };
            state = before;
            linearized ^= keys[entries.nodes[call].op];
            entries.unlift(call);
            entry = entries.nodes[call].next;
        }
    }
    Verdict::Linearizable
}

/// splitmix64, twice: a fixed pseudo-random 128-bit word per operation.
fn mix(i: u64) -> u128 {
    let one = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (u128::from(one(i)) << 64) | u128::from(one(i ^ 0xA5A5_A5A5_A5A5_A5A5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, kind: Kind, call_us: u64, return_us: u64) -> Op {
        Op { client, key: "k".into(), kind, outcome: Outcome::Ok, call_us, return_us, revision: None }
    }
    fn read(value: Option<Value>, call: u64, ret: u64) -> Op {
        op(9, Kind::Read { value, serializable: false }, call, ret)
    }
    fn write(value: Value, call: u64, ret: u64) -> Op {
        op(1, Kind::Write { value }, call, ret)
    }
    fn run(ops: &[Op]) -> Verdict {
        let refs: Vec<&Op> = ops.iter().collect();
        check(&refs, 1_000_000)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let ops = [read(None, 0, 1), write(1, 2, 3), read(Some(1), 4, 5), op(2, Kind::Delete, 6, 7), read(None, 8, 9)];
        assert_eq!(run(&ops), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_a_write() {
        // The write overlaps both reads: one sees the old value, one the new, in either order
        // of their calls, as long as the new is not followed by the old.
        let ops = [write(1, 0, 1), write(2, 10, 20), read(Some(1), 11, 12), read(Some(2), 13, 14)];
        assert_eq!(run(&ops), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let ops = [write(1, 0, 1), write(2, 2, 3), read(Some(1), 4, 5)];
        assert!(matches!(run(&ops), Verdict::NotLinearizable { op: 2, .. }), "{:?}", run(&ops));
    }

    #[test]
    fn new_then_old_among_overlapping_reads_is_caught() {
        // Both reads follow each other and overlap the write: seeing 2 then 1 is impossible.
        let ops = [write(1, 0, 1), write(2, 10, 40), read(Some(2), 11, 12), read(Some(1), 13, 14)];
        assert!(matches!(run(&ops), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_value_nobody_wrote_is_caught() {
        let ops = [write(1, 0, 1), read(Some(7), 2, 3)];
        assert!(matches!(run(&ops), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let ops = [write(1, 0, 1), read(None, 2, 3)];
        assert!(matches!(run(&ops), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn compare_and_swap_follows_the_register() {
        let cas = |expect, value, succeeded, c, r| op(3, Kind::Cas { expect, value, succeeded }, c, r);
        let good = [write(1, 0, 1), cas(Some(1), 2, true, 2, 3), cas(Some(1), 3, false, 4, 5), read(Some(2), 6, 7)];
        assert_eq!(run(&good), Verdict::Linearizable);
        // Two swaps from the same value cannot both succeed.
        let double = [write(1, 0, 1), cas(Some(1), 2, true, 2, 10), cas(Some(1), 3, true, 3, 11)];
        assert!(matches!(run(&double), Verdict::NotLinearizable { .. }));
        // A create-if-absent on an existing key must fail.
        let create = [write(1, 0, 1), cas(None, 2, true, 2, 3)];
        assert!(matches!(run(&create), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        let mut unknown = write(5, 2, 3);
        unknown.outcome = Outcome::Unknown;
        // Seen later...
        let seen = [write(1, 0, 1), unknown.clone(), read(Some(1), 4, 5), read(Some(5), 6, 7)];
        assert_eq!(run(&seen), Verdict::Linearizable);
        // ...or never.
        let never = [write(1, 0, 1), unknown.clone(), read(Some(1), 4, 5), read(Some(1), 60, 70)];
        assert_eq!(run(&never), Verdict::Linearizable);
        // But not before its call.
        let mut late = write(5, 10, 11);
        late.outcome = Outcome::Unknown;
        let early = [write(1, 0, 1), read(Some(5), 2, 3), late];
        assert!(matches!(run(&early), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn many_concurrent_clients_finish_quickly() {
        // 8 clients, 2,000 operations, each client's ops overlapping the others': a correct
        // history generated from a sequential register.
        let mut ops = Vec::new();
        let mut state = None;
        for i in 0..2_000u64 {
            let t = i * 10;
            let kind = match i % 4 {
                0 => Kind::Write { value: i },
                1 => Kind::Read { value: state, serializable: false },
                2 => Kind::Cas { expect: state, value: i, succeeded: true },
                _ => Kind::Read { value: state, serializable: false },
            };
            if let Kind::Write { value } | Kind::Cas { value, .. } = kind {
                state = Some(value);
            }
            // Each op takes effect at t + 40 and spans t..t+80: they overlap eight deep.
            ops.push(op((i % 8) as u32, kind, t.saturating_sub(40) + 1, t + 40));
        }
        let refs: Vec<&Op> = ops.iter().collect();
        assert_eq!(check(&refs, 5_000_000), Verdict::Linearizable);
    }
}
