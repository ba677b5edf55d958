//! One conformance suite for the MVCC store, run on the memory engine and on RocksDB.

use std::sync::Arc;

use corral_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, compare, range_request, request_op,
};
use corral_proto::mvccpb::event::EventType;
use corral_proto::store::{Command, CommandResult, command, command_result};

use super::Mvcc;
use crate::engine::{MemEngine, RocksEngine, SharedEngine};

/// A store under test, with the directory that keeps its RocksDB alive.
struct Fixture {
    mvcc: Arc<Mvcc>,
    _dir: Option<tempfile::TempDir>,
}

fn stores() -> Vec<(&'static str, Fixture)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rocks: SharedEngine = Arc::new(RocksEngine::open(dir.path()).expect("open rocksdb"));
    vec![
        ("memory", Fixture { mvcc: Mvcc::open(Arc::new(MemEngine::new())).unwrap(), _dir: None }),
        ("rocksdb", Fixture { mvcc: Mvcc::open(rocks).unwrap(), _dir: Some(dir) }),
    ]
}

fn apply(mvcc: &Mvcc, op: command::Op) -> CommandResult {
    let mut w = mvcc.writer();
    let result = w.apply(&Command { op: Some(op) }).expect("engine");
    w.finish().expect("write");
    result
}

fn put(mvcc: &Mvcc, key: &str, value: &str) -> i64 {
    let res = apply(mvcc, command::Op::Put(PutRequest { key: key.into(), value: value.into(), ..Default::default() }));
    assert_eq!(res.error_code, 0, "{}", res.error_message);
    mvcc.current_revision()
}

fn get(mvcc: &Mvcc, req: RangeRequest) -> Vec<(String, String)> {
    mvcc.range(&req)
        .expect("range")
        .kvs
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap()))
        .collect()
}

fn key(k: &str) -> RangeRequest {
    RangeRequest { key: k.into(), ..Default::default() }
}

fn prefix(p: &str) -> RangeRequest {
    let mut end = p.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    RangeRequest { key: p.into(), range_end: end, ..Default::default() }
}

#[test]
fn revisions_versions_and_history() {
    for (name, f) in stores() {
        let m = &f.mvcc;
        assert_eq!(m.current_revision(), 1, "{name}: a new store is at revision 1, as etcd");
        assert_eq!(put(m, "a", "1"), 2);
        assert_eq!(put(m, "a", "2"), 3);
        assert_eq!(put(m, "b", "x"), 4);
        let kv = m.range(&key("a")).unwrap().kvs.remove(0);
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2), "{name}");
        assert_eq!(get(m, RangeRequest { revision: 2, ..key("a") }), vec![("a".into(), "1".into())], "{name}");
        let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
        assert_eq!(get(m, all.clone()).len(), 2, "{name}");
        assert_eq!(get(m, RangeRequest { revision: 3, ..all.clone() }).len(), 1, "{name}");
        assert!(m.range(&RangeRequest { revision: 99, ..all }).is_err(), "{name}: future revision");

        apply(m, command::Op::DeleteRange(DeleteRangeRequest { key: "a".into(), ..Default::default() }));
        assert_eq!(m.current_revision(), 5);
        assert!(get(m, key("a")).is_empty(), "{name}");
        assert_eq!(put(m, "a", "3"), 6);
        let kv = m.range(&key("a")).unwrap().kvs.remove(0);
        assert_eq!((kv.create_revision, kv.version), (6, 1), "{name}: a key deleted and put again starts over");
        // Deleting nothing does not move the revision.
        apply(m, command::Op::DeleteRange(DeleteRangeRequest { key: "zz".into(), ..Default::default() }));
        assert_eq!(m.current_revision(), 6, "{name}");
    }
}

#[test]
fn ranges_limit_count_sort_and_filters() {
    for (name, f) in stores() {
        let m = &f.mvcc;
        for i in 0..10 {
            put(m, &format!("k/{i}"), &format!("{}", 9 - i));
        }
        put(m, "k0", "outside");
        put(m, "k/\0odd", "zero byte");
        let r = m.range(&RangeRequest { limit: 3, ..prefix("k/") }).unwrap();
        assert_eq!((r.kvs.len(), r.count, r.more), (3, 11, true), "{name}");
        assert_eq!(r.kvs[0].key, b"k/\0odd", "{name}: keys sort bytewise, zero bytes included");
        let r = m.range(&RangeRequest { count_only: true, ..prefix("k/") }).unwrap();
        assert_eq!((r.kvs.len(), r.count), (0, 11), "{name}");
        let r = m.range(&RangeRequest { keys_only: true, ..prefix("k/") }).unwrap();
        assert!(r.kvs.iter().all(|kv| kv.value.is_empty()), "{name}");
        let r = m
            .range(&RangeRequest {
                sort_order: range_request::SortOrder::Descend as i32,
                sort_target: range_request::SortTarget::Value as i32,
                limit: 2,
                ..prefix("k/")
            })
            .unwrap();
        assert_eq!(r.kvs[0].value, b"zero byte", "{name}");
        assert_eq!(r.kvs[1].value, b"9", "{name}");
        let r = m.range(&RangeRequest { min_mod_revision: 5, max_mod_revision: 6, ..prefix("k/") }).unwrap();
        assert_eq!(r.kvs.len(), 2, "{name}");
        assert_eq!(r.count, 11, "{name}: count ignores filters, as etcd");
    }
}

#[test]
fn txn_compares_branches_and_sees_its_own_writes() {
    for (name, f) in stores() {
        let m = &f.mvcc;
        put(m, "lock", "free");
        let cmp = |value: &str| Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: "lock".into(),
            target_union: Some(compare::TargetUnion::Value(value.into())),
            ..Default::default()
        };
        let op_put = |k: &str, v: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            })),
        };
        let op_get = |k: &str| RequestOp { request: Some(request_op::Request::RequestRange(key(k))) };
        let txn = TxnRequest {
            compare: vec![cmp("free")],
            success: vec![op_put("lock", "held"), op_put("owner", "me"), op_get("owner")],
            failure: vec![op_get("lock")],
        };
        let res = apply(m, command::Op::Txn(txn.clone()));
        let Some(command_result::Result::Txn(t)) = res.result else { panic!("{name}: {res:?}") };
        assert!(t.succeeded, "{name}");
        assert_eq!(m.current_revision(), 3, "{name}: one revision for the whole txn");
        let Some(corral_proto::etcdserverpb::response_op::Response::ResponseRange(r)) = &t.responses[2].response else {
            panic!()
        };
        assert_eq!(r.kvs[0].value, b"me", "{name}: a txn reads its own writes");
        let res = apply(m, command::Op::Txn(txn));
        let Some(command_result::Result::Txn(t)) = res.result else { panic!() };
        assert!(!t.succeeded, "{name}");
        assert_eq!(m.current_revision(), 3, "{name}: a read-only branch writes nothing");

        // Missing key: version compares against 0, value compares fail.
        let missing = Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key: "nobody".into(),
            target_union: Some(compare::TargetUnion::Version(0)),
            ..Default::default()
        };
        let res = apply(
            m,
            command::Op::Txn(TxnRequest {
                compare: vec![missing],
                success: vec![op_put("nobody", "1")],
                failure: vec![],
            }),
        );
        let Some(command_result::Result::Txn(t)) = res.result else { panic!() };
        assert!(t.succeeded, "{name}");

        let dup = TxnRequest { success: vec![op_put("x", "1"), op_put("x", "2")], ..Default::default() };
        let res = apply(m, command::Op::Txn(dup));
        assert_eq!(res.error_message, "etcdserver: duplicate key given in txn request", "{name}");
        let many =
            TxnRequest { success: (0..129).map(|i| op_put(&format!("m{i}"), "v")).collect(), ..Default::default() };
        let res = apply(m, command::Op::Txn(many));
        assert_eq!(res.error_message, "etcdserver: too many operations in txn request", "{name}");
        // A txn that fails its checks writes nothing at all.
        let bad = TxnRequest {
            success: vec![
                op_put("y", "1"),
                RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: "z".into(),
                        lease: 777,
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        let before = m.current_revision();
        let res = apply(m, command::Op::Txn(bad));
        assert_eq!(res.error_message, "etcdserver: requested lease not found", "{name}");
        assert_eq!(m.current_revision(), before, "{name}");
        assert!(get(m, key("y")).is_empty(), "{name}");
    }
}

#[test]
fn leases_attach_and_revoke_their_keys() {
    for (name, f) in stores() {
        let m = &f.mvcc;
        let res = apply(m, command::Op::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 7 }));
        assert_eq!(res.error_code, 0, "{name}");
        let res = apply(m, command::Op::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 7 }));
        assert_eq!(res.error_message, "etcdserver: lease already exists", "{name}");
        for k in ["l/1", "l/2"] {
            apply(m, command::Op::Put(PutRequest { key: k.into(), value: "v".into(), lease: 7, ..Default::default() }));
        }
        put(m, "l/3", "no lease");
        assert_eq!(m.lease(7).unwrap().keys.len(), 2, "{name}");
        // Put with ignore_value keeps the value and moves nothing else.
        apply(
            m,
            command::Op::Put(PutRequest { key: "l/1".into(), ignore_value: true, lease: 7, ..Default::default() }),
        );
        assert_eq!(get(m, key("l/1")), vec![("l/1".into(), "v".into())], "{name}");
        let rev = m.current_revision();
        apply(m, command::Op::LeaseRevoke(LeaseRevokeRequest { id: 7 }));
        assert_eq!(m.current_revision(), rev + 1, "{name}: revoking deletes the keys in one revision");
        assert_eq!(get(m, prefix("l/")), vec![("l/3".into(), "no lease".into())], "{name}");
        assert!(m.lease(7).is_none(), "{name}");
        let res = apply(m, command::Op::LeaseRevoke(LeaseRevokeRequest { id: 7 }));
        assert_eq!(res.error_message, "etcdserver: requested lease not found", "{name}");
    }
}

#[test]
fn puts_that_read_no_previous_value_keep_versions_and_leases() {
    for (name, f) in stores() {
        let m = &f.mvcc;
        let lean = |op: command::Op| {
            let mut w = m.writer().with_prev_kvs(false);
            let result = w.apply(&Command { op: Some(op) }).expect("engine");
            assert!(!w.finish().expect("write").prev_kvs);
            result
        };
        let put_req =
            |value: &str, lease: i64| PutRequest { key: "k".into(), value: value.into(), lease, ..Default::default() };
        apply(m, command::Op::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 7 }));
        let created = {
            lean(command::Op::Put(put_req("one", 7)));
            m.current_revision()
        };
        lean(command::Op::Put(put_req("two", 7)));
        assert_eq!(m.lease(7).unwrap().keys.len(), 1, "{name}");

        tracing::info!("an overwrite without the lease detaches the key, from the index alone");
        lean(command::Op::Put(put_req("three", 0)));
        let kv = m.range(&key("k")).unwrap().kvs.remove(0);
        assert_eq!(
            (kv.create_revision, kv.version, kv.lease, kv.value.as_slice()),
            (created, 3, 0, &b"three"[..]),
            "{name}"
        );
        assert!(m.lease(7).unwrap().keys.is_empty(), "{name}");

        tracing::info!("a put that asks for prev_kv, or ignore_value, still reads the value");
        let res = lean(command::Op::Put(PutRequest { prev_kv: true, ..put_req("four", 0) }));
        let Some(command_result::Result::Put(put)) = res.result else { panic!("{name}: a put result") };
        assert_eq!(put.prev_kv.map(|kv| kv.value), Some(b"three".to_vec()), "{name}");
        lean(command::Op::Put(PutRequest { ignore_value: true, lease: 7, ..put_req("", 0) }));
        let kv = m.range(&key("k")).unwrap().kvs.remove(0);
        assert_eq!((kv.version, kv.lease, kv.value.as_slice()), (5, 7, &b"four"[..]), "{name}");

        tracing::info!("after a delete the key starts over");
        lean(command::Op::DeleteRange(DeleteRangeRequest { key: "k".into(), ..Default::default() }));
        lean(command::Op::Put(put_req("again", 0)));
        let kv = m.range(&key("k")).unwrap().kvs.remove(0);
        assert_eq!((kv.create_revision, kv.version), (m.current_revision(), 1), "{name}");
    }
}

#[test]
fn events_replay_in_order_with_prev_kv() {
    for (name, f) in stores() {
        let m = &f.mvcc;
        put(m, "w/a", "1");
        put(m, "w/a", "2");
        apply(
            m,
            command::Op::DeleteRange(DeleteRangeRequest {
                key: "w/".into(),
                range_end: "w0".into(),
                ..Default::default()
            }),
        );
        let events = m.events(2, i64::MAX, 100, true).unwrap();
        let kinds: Vec<(i32, i64)> = events.iter().map(|e| (e.inner.r#type, e.revision())).collect();
        assert_eq!(
            kinds,
            vec![(EventType::Put as i32, 2), (EventType::Put as i32, 3), (EventType::Delete as i32, 4)],
            "{name}"
        );
        assert_eq!(events[1].inner.prev_kv.as_ref().unwrap().value, b"1", "{name}");
        assert_eq!(events[2].inner.prev_kv.as_ref().unwrap().value, b"2", "{name}");
        // The stored history and what the writer published agree.
        let mut w = m.writer();
        w.apply(&Command {
            op: Some(command::Op::Put(PutRequest { key: "w/b".into(), value: "x".into(), ..Default::default() })),
        })
        .unwrap();
        let applied = w.finish().unwrap();
        assert_eq!(applied.events, m.events(5, 5, 10, true).unwrap(), "{name}");
    }
}

#[test]
fn a_quiet_range_reads_a_busy_history_in_bounded_steps() {
    use super::KeyRange;
    use super::read::SCAN_PER_READ;
    for (name, f) in stores() {
        let m = &f.mvcc;
        // One write to the quiet range between many to another, in one batch per revision.
        let busy = SCAN_PER_READ + SCAN_PER_READ / 2;
        let mut quiet_rev = 0;
        for i in 0..busy {
            put(m, &format!("busy/{i}"), "x");
            if i == SCAN_PER_READ + 10 {
                quiet_rev = put(m, "quiet/a", "1");
            }
        }
        let last = m.current_revision();
        let quiet = KeyRange::new(b"quiet/", b"quiet0");

        tracing::info!("the first read stops after its share of revisions, having found nothing");
        let (events, covered) = m.events_in(&quiet, 2, last, 100, true).unwrap();
        assert!(events.is_empty(), "{name}");
        assert_eq!(covered, 1 + SCAN_PER_READ as i64, "{name}: read up to a revision boundary");

        tracing::info!("the next one, from there, finds the quiet write and reaches the end");
        let (events, covered) = m.events_in(&quiet, covered + 1, last, 100, true).unwrap();
        assert_eq!(events.iter().map(|e| e.revision()).collect::<Vec<_>>(), vec![quiet_rev], "{name}");
        assert_eq!(covered, last, "{name}");
    }
}

#[test]
fn compaction_keeps_what_later_revisions_read() {
    for (name, f) in stores() {
        let m = &f.mvcc;
        put(m, "c", "1"); // 2
        put(m, "c", "2"); // 3
        put(m, "d", "1"); // 4
        apply(m, command::Op::DeleteRange(DeleteRangeRequest { key: "d".into(), ..Default::default() })); // 5
        put(m, "c", "3"); // 6
        let res = apply(m, command::Op::Compaction(CompactionRequest { revision: 5, physical: true }));
        assert_eq!(res.error_code, 0, "{name}: {}", res.error_message);
        assert!(
            matches!(m.range(&RangeRequest { revision: 4, ..key("c") }), Err(crate::StoreError::Compacted { .. })),
            "{name}"
        );
        assert_eq!(get(m, RangeRequest { revision: 5, ..key("c") }), vec![("c".into(), "2".into())], "{name}");
        assert!(get(m, RangeRequest { revision: 5, ..key("d") }).is_empty(), "{name}");
        assert_eq!(get(m, key("c")), vec![("c".into(), "3".into())], "{name}");
        assert!(m.events(4, i64::MAX, 10, false).is_err(), "{name}");
        assert_eq!(m.events(5, i64::MAX, 10, false).unwrap().len(), 2, "{name}");
        let res = apply(m, command::Op::Compaction(CompactionRequest { revision: 5, physical: true }));
        assert_eq!(res.error_message, "etcdserver: mvcc: required revision has been compacted", "{name}");
        // Compacting again later removes what the first compaction kept.
        put(m, "c", "4"); // 7
        apply(m, command::Op::Compaction(CompactionRequest { revision: 7, physical: true }));
        assert_eq!(get(m, RangeRequest { revision: 7, ..key("c") }), vec![("c".into(), "4".into())], "{name}");
        let (hash_a, compacted) = m.hash_kv(0).unwrap();
        assert_eq!(compacted, 7, "{name}");
        assert_ne!(hash_a, 0, "{name}");
    }
}

#[test]
fn rocksdb_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = Mvcc::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();
        apply(&m, command::Op::LeaseGrant(LeaseGrantRequest { ttl: 10, id: 3 }));
        apply(&m, command::Op::Put(PutRequest { key: "p".into(), value: "v".into(), lease: 3, ..Default::default() }));
        put(&m, "q", "1");
        apply(&m, command::Op::Compaction(CompactionRequest { revision: 3, physical: false }));
    }
    let m = Mvcc::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();
    assert_eq!((m.current_revision(), m.compact_revision()), (3, 3), "a lease grant takes no revision");
    assert_eq!(m.lease(3).unwrap().keys.len(), 1);
    assert_eq!(get(&m, key("p")), vec![("p".into(), "v".into())]);
}

#[test]
fn writes_after_a_reopen_continue_each_key_history() {
    let dir = tempfile::tempdir().unwrap();
    let q_created;
    {
        let m = Mvcc::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();
        q_created = put(&m, "k/q", "1");
        put(&m, "k/q", "2");
        put(&m, "k/gone", "x");
        apply(&m, command::Op::DeleteRange(DeleteRangeRequest { key: "k/gone".into(), ..Default::default() }));
    }
    // Phase 2: the key index is rebuilt from disk, so versions continue where they were.
    let m = Mvcc::open(Arc::new(RocksEngine::open(dir.path()).unwrap())).unwrap();
    put(&m, "k/q", "3");
    put(&m, "k/gone", "back");
    let kvs = m.range(&prefix("k/")).unwrap().kvs;
    let q = kvs.iter().find(|kv| kv.key == b"k/q").unwrap();
    assert_eq!((q.version, q.create_revision), (3, q_created), "k/q keeps its history");
    let gone = kvs.iter().find(|kv| kv.key == b"k/gone").unwrap();
    assert_eq!((gone.version, gone.create_revision), (1, gone.mod_revision), "a deleted key starts anew");

    // Phase 3: a range delete finds exactly the live keys.
    let res = apply(
        &m,
        command::Op::DeleteRange(DeleteRangeRequest { key: "k/".into(), range_end: "k0".into(), ..Default::default() }),
    );
    match res.result {
        Some(command_result::Result::DeleteRange(d)) => assert_eq!(d.deleted, 2),
        other => panic!("unexpected {other:?}"),
    }
    assert!(get(&m, prefix("k/")).is_empty());
}
