//! Writes: Put, DeleteRange, Txn, Compact, leases and alarms, applied in batches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use corral_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest,
    DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest,
    PutResponse, RangeRequest, RequestOp, ResponseOp, TxnRequest, TxnResponse, alarm_request, compare, request_op,
    response_op,
};
use corral_proto::mvccpb::{self, KeyValue};
use corral_proto::store::{Command, CommandResult, command, command_result};

use super::index::{KeyIndex, Newest};
use super::keys::{rev_key, split_rev_key, split_version_key, version_key};
use super::read::{KeyRange, header, key_value, range_with_overlay};
use super::{Event, LeaseInfo, Mvcc, Record, encode_alarms, lease_attachment_key, lease_key, meta};
use crate::engine::{Batch, Cf, EngineError, View};
use crate::error::{StoreError, StoreResult};

/// etcd's limit on operations in one branch of a txn.
pub const MAX_TXN_OPS: usize = 128;
/// etcd's largest lease TTL.
pub const MAX_LEASE_TTL_S: i64 = 9_000_000_000;
/// Revisions removed per batch when a compaction runs.
const COMPACTION_BATCH: usize = 10_000;

/// What a finished batch changed.
#[derive(Debug, Default)]
pub struct Applied {
    pub revision: i64,
    pub events: Vec<Event>,
    /// Every event carries its previous version (false: puts were written without reading
    /// it, and a watcher that wants it reads the events from the store).
    pub prev_kvs: bool,
}

/// A batch of commands applied together. Reads inside the batch see its own earlier writes;
/// nothing is visible to other readers until [`Writer::finish`].
pub struct Writer<'a> {
    mvcc: &'a Mvcc,
    view: Box<dyn View + 'a>,
    view_rev: i64,
    /// Held for the whole batch: the writer is its only user.
    index: std::sync::MutexGuard<'a, KeyIndex>,
    batch: Batch,
    overlay: BTreeMap<Vec<u8>, (i64, Record)>,
    rev: i64,
    events: Vec<Event>,
    compact_to: Option<i64>,
    leases_changed: BTreeSet<i64>,
    /// Events carry the previous version of a put's key (reading its value).
    prev_kvs: bool,
}

/// A key's newest live version as a put needs it: its value only when asked for.
type Prev = (Newest, Option<Vec<u8>>);

/// The revision being written by one command, and its next sub-revision.
struct Step {
    rev: i64,
    sub: u32,
}

impl<'a> Writer<'a> {
    pub(super) fn new(mvcc: &'a Mvcc) -> Self {
        let view_rev = mvcc.current_revision();
        Writer {
            mvcc,
            view: mvcc.engine.view(),
            view_rev,
            index: mvcc.index.lock().expect("index lock"),
            batch: Batch::default(),
            overlay: BTreeMap::new(),
            rev: view_rev,
            events: Vec::new(),
            compact_to: None,
            leases_changed: BTreeSet::new(),
            prev_kvs: true,
        }
    }

    /// Whether events carry the previous version of a put's key (by default they do). Without,
    /// a put that asks for no prev_kv reads nothing of the key's previous version but what the
    /// key index keeps; `Applied::prev_kvs` says which it was.
    pub fn with_prev_kvs(mut self, prev_kvs: bool) -> Self {
        self.prev_kvs = prev_kvs;
        self
    }

    /// The revision after every command applied so far.
    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// Adds a raw write to the batch (the Raft layer's applied log id, membership).
    pub fn put_meta(&mut self, key: &[u8], value: Vec<u8>) {
        self.batch.put(Cf::Meta, key.to_vec(), value);
    }

    /// Applies one command. Client errors become the result's error; only engine failures
    /// are returned as `Err`.
    pub fn apply(&mut self, cmd: &Command) -> Result<CommandResult, EngineError> {
        use command::Op;
        use command_result::Result as R;
        let outcome = match &cmd.op {
            Some(Op::Put(req)) => self.txn_of(|w, step| w.put(step, req)).map(R::Put),
            Some(Op::DeleteRange(req)) => self.txn_of(|w, step| w.delete_range(step, req)).map(R::DeleteRange),
            Some(Op::Txn(req)) => self.txn(req).map(R::Txn),
            Some(Op::Compaction(req)) => self.compact(req).map(R::Compaction),
            Some(Op::LeaseGrant(req)) => self.lease_grant(req).map(R::LeaseGrant),
            Some(Op::LeaseRevoke(req)) => self.lease_revoke(req).map(R::LeaseRevoke),
            Some(Op::Alarm(req)) => self.alarm(req).map(R::Alarm),
            Some(Op::Noop(_)) | None => return Ok(CommandResult::default()),
        };
        match outcome {
            Ok(result) => Ok(CommandResult { error_code: 0, error_message: String::new(), result: Some(result) }),
            Err(StoreError::Internal(msg)) => Err(EngineError::Corrupt { cf: Cf::Kv, what: msg }),
            Err(e) => Ok(CommandResult { error_code: e.code() as u32, error_message: e.to_string(), result: None }),
        }
    }

    /// Writes the batch, then publishes the new revision. A compaction applied in this batch
    /// is recorded in it (reads below it are refused from now on) and carried out in the
    /// background. The write is replayable ([`crate::engine::Engine::write_replayable`]): the
    /// Raft log that the batch was applied from is what makes it durable.
    pub fn finish(mut self) -> Result<Applied, EngineError> {
        self.batch.put(Cf::Meta, meta::CURRENT_REV.to_vec(), self.rev.to_be_bytes().to_vec());
        for id in std::mem::take(&mut self.leases_changed) {
            self.persist_lease(id);
        }
        let compact_to = self.compact_to;
        if let Some(rev) = compact_to {
            self.batch.put(Cf::Meta, meta::COMPACT_REV.to_vec(), rev.to_be_bytes().to_vec());
            self.mvcc.compact_rev.store(rev, Ordering::Release);
        }
        let Writer { mvcc, batch, rev, events, view, mut index, overlay, prev_kvs, .. } = self;
        drop(view);
        mvcc.engine.write_replayable(batch)?;
        for (key, (rev, record)) in overlay {
            index.set(key, rev, &record);
        }
        drop(index);
        mvcc.current_rev.store(rev, Ordering::Release);
        if let Some(compact_rev) = compact_to {
            mvcc.schedule_compaction(compact_rev);
        }
        Ok(Applied { revision: rev, events, prev_kvs })
    }

    fn persist_lease(&mut self, id: i64) {
        let leases = self.mvcc.leases.lock().expect("lease lock");
        match leases.get(&id) {
            Some(info) => {
                self.batch.put(Cf::Lease, lease_key(id), info.ttl_s.to_be_bytes().to_vec());
            }
            None => {
                self.batch.delete(Cf::Lease, lease_key(id));
            }
        }
    }

    // ---- reads that see this batch's writes ----

    fn lookup(&self, key: &[u8]) -> Result<Option<(i64, Record)>, EngineError> {
        if let Some(found) = self.overlay.get(key) {
            return Ok(Some(found.clone()));
        }
        self.index.get(self.view.as_ref(), key)
    }

    fn live_keys(&self, range: &KeyRange) -> Result<Vec<(Vec<u8>, i64, Record)>, EngineError> {
        let mut found: BTreeMap<_, _> = self
            .index
            .live_in(self.view.as_ref(), range)?
            .into_iter()
            .map(|(key, rev, record)| (key, (rev, record)))
            .collect();
        for (key, (rev, record)) in self.overlay.iter().filter(|(k, _)| range.contains(k)) {
            if record.is_live() {
                found.insert(key.clone(), (*rev, record.clone()));
            } else {
                found.remove(key);
            }
        }
        Ok(found.into_iter().map(|(k, (rev, rec))| (k, rev, rec)).collect())
    }

    fn range(&self, req: &RangeRequest) -> StoreResult<corral_proto::etcdserverpb::RangeResponse> {
        if req.revision > 0 && req.revision < self.rev {
            // A read of the past inside a txn: the batch's writes are all newer.
            if req.revision < self.mvcc.compact_revision() {
                return Err(StoreError::Compacted { compact_rev: self.mvcc.compact_revision() });
            }
            if req.revision <= self.view_rev {
                return Ok(range_with_overlay(self.view.as_ref(), req, req.revision, None)?);
            }
        } else if req.revision > self.rev {
            return Err(StoreError::FutureRev);
        }
        let mut resp = range_with_overlay(self.view.as_ref(), req, self.view_rev, Some(&self.overlay))?;
        resp.header = Some(header(self.rev));
        Ok(resp)
    }

    // ---- writes ----

    /// Runs a single write as a txn of one operation: it gets its own revision if it wrote.
    fn txn_of<T>(&mut self, op: impl FnOnce(&mut Self, &mut Step) -> StoreResult<T>) -> StoreResult<T> {
        let mut step = Step { rev: self.rev + 1, sub: 0 };
        let out = op(self, &mut step)?;
        if step.sub > 0 {
            self.rev = step.rev;
        }
        Ok(out)
    }

    /// The newest live version of `key`, with its value if `with_value` (or if this batch
    /// wrote it: then it is in memory anyway).
    fn lookup_newest(&self, key: &[u8], with_value: bool) -> Result<Option<Prev>, EngineError> {
        if !with_value && !self.overlay.contains_key(key) {
            return Ok(self.index.newest(key).map(|newest| (newest, None)));
        }
        Ok(self.lookup(key)?.and_then(|(rev, record)| {
            let newest = Newest::of(rev, &record)?;
            let Record::Live { value, .. } = record else { return None };
            Some((newest, Some(value)))
        }))
    }

    /// Checks a put; returns the key's live version, if any (its value if `with_value`), so
    /// the put need not look again.
    fn check_put(&self, req: &PutRequest, with_value: bool) -> StoreResult<Option<Prev>> {
        if req.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        if req.ignore_value && !req.value.is_empty() {
            return Err(StoreError::ValueProvided);
        }
        if req.ignore_lease && req.lease != 0 {
            return Err(StoreError::LeaseProvided);
        }
        let prev = self.lookup_newest(&req.key, with_value)?;
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(StoreError::KeyNotFound);
        }
        if req.lease != 0 && !self.mvcc.leases.lock().expect("lease lock").contains_key(&req.lease) {
            return Err(StoreError::LeaseNotFound);
        }
        Ok(prev)
    }

    fn put(&mut self, step: &mut Step, req: &PutRequest) -> StoreResult<PutResponse> {
        let with_value = req.prev_kv || req.ignore_value || self.prev_kvs;
        let prev = self.check_put(req, with_value)?;
        let (create_rev, version, prev_lease) = match &prev {
            Some((p, _)) => (p.create_rev, p.version + 1, p.lease),
            None => (step.rev, 1, 0),
        };
        // ignore_value: check_put found the key and read its value.
        let value = match &prev {
            Some((_, Some(value))) if req.ignore_value => value.clone(),
            _ => req.value.clone(),
        };
        let lease = if req.ignore_lease { prev_lease } else { req.lease };
        let record = Record::Live { create_rev, version, lease, value };
        if prev_lease != 0 && prev_lease != lease {
            self.detach(prev_lease, &req.key);
        }
        if lease != 0 {
            self.attach(lease, &req.key);
        }
        let prev_kv = prev.and_then(|(p, value)| {
            Some(KeyValue {
                key: req.key.clone(),
                create_revision: p.create_rev,
                mod_revision: p.rev,
                version: p.version,
                value: value?,
                lease: p.lease,
            })
        });
        self.record(step, &req.key, record, prev_kv.clone());
        Ok(PutResponse { header: Some(header(step.rev)), prev_kv: if req.prev_kv { prev_kv } else { None } })
    }

    fn delete_range(&mut self, step: &mut Step, req: &DeleteRangeRequest) -> StoreResult<DeleteRangeResponse> {
        if req.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        let doomed = self.live_keys(&KeyRange::new(&req.key, &req.range_end))?;
        let mut prev_kvs = Vec::new();
        for (key, rev, record) in doomed.iter().cloned() {
            if let Record::Live { lease, .. } = &record
                && *lease != 0
            {
                self.detach(*lease, &key);
            }
            let prev = key_value(key.clone(), rev, record, false).expect("live");
            self.record(step, &key, Record::Tombstone, Some(prev.clone()));
            if req.prev_kv {
                prev_kvs.push(prev);
            }
        }
        let header_rev = if doomed.is_empty() { self.rev } else { step.rev };
        Ok(DeleteRangeResponse { header: Some(header(header_rev)), deleted: doomed.len() as i64, prev_kvs })
    }

    /// Adds one version and its event to the batch.
    fn record(&mut self, step: &mut Step, key: &[u8], record: Record, prev_kv: Option<KeyValue>) {
        self.batch.put(Cf::Kv, version_key(key, step.rev), record.encode());
        self.batch.put(Cf::Rev, rev_key(step.rev, step.sub).to_vec(), key.to_vec());
        let (kind, kv) = match key_value(key.to_vec(), step.rev, record.clone(), false) {
            Some(kv) => (mvccpb::event::EventType::Put, kv),
            None => (
                mvccpb::event::EventType::Delete,
                KeyValue { key: key.to_vec(), mod_revision: step.rev, ..Default::default() },
            ),
        };
        self.events.push(Event { sub: step.sub, inner: mvccpb::Event { r#type: kind as i32, kv: Some(kv), prev_kv } });
        self.overlay.insert(key.to_vec(), (step.rev, record));
        step.sub += 1;
    }

    fn attach(&mut self, lease: i64, key: &[u8]) {
        let mut leases = self.mvcc.leases.lock().expect("lease lock");
        if let Some(info) = leases.get_mut(&lease) {
            info.keys.insert(key.to_vec());
            self.batch.put(Cf::Lease, lease_attachment_key(lease, key), Vec::new());
        }
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        let mut leases = self.mvcc.leases.lock().expect("lease lock");
        if let Some(info) = leases.get_mut(&lease) {
            info.keys.remove(key);
        }
        self.batch.delete(Cf::Lease, lease_attachment_key(lease, key));
    }

    // ---- txn ----

    fn txn(&mut self, req: &TxnRequest) -> StoreResult<TxnResponse> {
        check_txn_request(req)?;
        let mut step = Step { rev: self.rev + 1, sub: 0 };
        let resp = self.txn_at(&mut step, req)?;
        if step.sub > 0 {
            self.rev = step.rev;
        }
        Ok(TxnResponse { header: Some(header(self.rev)), ..resp })
    }

    fn txn_at(&mut self, step: &mut Step, req: &TxnRequest) -> StoreResult<TxnResponse> {
        let mut succeeded = true;
        for cmp in &req.compare {
            if !self.compare(cmp)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { &req.success } else { &req.failure };
        self.check_ops(ops)?;
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => response_op::Response::ResponseRange(self.range(r)?),
                Some(request_op::Request::RequestPut(r)) => response_op::Response::ResponsePut(self.put(step, r)?),
                Some(request_op::Request::RequestDeleteRange(r)) => {
                    response_op::Response::ResponseDeleteRange(self.delete_range(step, r)?)
                }
                Some(request_op::Request::RequestTxn(r)) => response_op::Response::ResponseTxn(self.txn_at(step, r)?),
                None => continue,
            };
            responses.push(ResponseOp { response: Some(response) });
        }
        Ok(TxnResponse { header: None, succeeded, responses })
    }

    /// Checks a branch before any of it is written, so a txn fails whole or not at all.
    fn check_ops(&self, ops: &[RequestOp]) -> StoreResult<()> {
        for op in ops {
            match &op.request {
                Some(request_op::Request::RequestPut(r)) => {
                    self.check_put(r, false)?;
                }
                Some(request_op::Request::RequestRange(r)) => {
                    if r.revision > self.rev {
                        return Err(StoreError::FutureRev);
                    }
                    if r.revision > 0 && r.revision < self.mvcc.compact_revision() {
                        return Err(StoreError::Compacted { compact_rev: self.mvcc.compact_revision() });
                    }
                }
                Some(request_op::Request::RequestDeleteRange(r)) if r.key.is_empty() => {
                    return Err(StoreError::EmptyKey);
                }
                // Nested txns are checked when their compares have chosen a branch.
                _ => {}
            }
        }
        Ok(())
    }

    fn compare(&self, cmp: &Compare) -> StoreResult<bool> {
        let range = KeyRange::new(&cmp.key, &cmp.range_end);
        let kvs: Vec<KeyValue> = if matches!(range.end, super::read::RangeEnd::Single) {
            match self.lookup(&cmp.key)? {
                Some((rev, rec)) => key_value(cmp.key.clone(), rev, rec, false).into_iter().collect(),
                None => Vec::new(),
            }
        } else {
            self.live_keys(&range)?.into_iter().filter_map(|(k, rev, rec)| key_value(k, rev, rec, false)).collect()
        };
        let target = compare::CompareTarget::try_from(cmp.target).unwrap_or(compare::CompareTarget::Version);
        if kvs.is_empty() {
            if target == compare::CompareTarget::Value {
                return Ok(false);
            }
            return Ok(compare_one(cmp, target, &KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_one(cmp, target, kv)))
    }

    // ---- compaction, leases, alarms ----

    fn compact(&mut self, req: &CompactionRequest) -> StoreResult<CompactionResponse> {
        let compacted = self.compact_to.unwrap_or(self.mvcc.compact_revision());
        if req.revision <= compacted {
            return Err(StoreError::Compacted { compact_rev: compacted });
        }
        if req.revision > self.rev {
            return Err(StoreError::FutureRev);
        }
        self.compact_to = Some(req.revision);
        Ok(CompactionResponse { header: Some(header(self.rev)) })
    }

    fn lease_grant(&mut self, req: &LeaseGrantRequest) -> StoreResult<LeaseGrantResponse> {
        if req.ttl > MAX_LEASE_TTL_S {
            return Err(StoreError::LeaseTtlTooLarge);
        }
        if req.id <= 0 {
            return Err(StoreError::InvalidArgument("etcdserver: lease id must be positive".into()));
        }
        {
            let mut leases = self.mvcc.leases.lock().expect("lease lock");
            if leases.contains_key(&req.id) {
                return Err(StoreError::LeaseExists);
            }
            leases.insert(req.id, LeaseInfo { ttl_s: req.ttl, keys: BTreeSet::new() });
        }
        self.leases_changed.insert(req.id);
        Ok(LeaseGrantResponse { header: Some(header(self.rev)), id: req.id, ttl: req.ttl, error: String::new() })
    }

    fn lease_revoke(&mut self, req: &LeaseRevokeRequest) -> StoreResult<LeaseRevokeResponse> {
        let keys = match self.mvcc.leases.lock().expect("lease lock").get(&req.id) {
            Some(info) => info.keys.clone(),
            None => return Err(StoreError::LeaseNotFound),
        };
        let mut step = Step { rev: self.rev + 1, sub: 0 };
        for key in &keys {
            if let Some((rev, record @ Record::Live { .. })) = self.lookup(key)? {
                let prev = key_value(key.clone(), rev, record, false);
                self.record(&mut step, key, Record::Tombstone, prev);
            }
            self.batch.delete(Cf::Lease, lease_attachment_key(req.id, key));
        }
        if step.sub > 0 {
            self.rev = step.rev;
        }
        self.mvcc.leases.lock().expect("lease lock").remove(&req.id);
        self.leases_changed.insert(req.id);
        Ok(LeaseRevokeResponse { header: Some(header(self.rev)) })
    }

    fn alarm(&mut self, req: &AlarmRequest) -> StoreResult<AlarmResponse> {
        let mut alarms = self.mvcc.alarms.lock().expect("alarm lock");
        let entry = (req.member_id, req.alarm);
        match alarm_request::AlarmAction::try_from(req.action) {
            Ok(alarm_request::AlarmAction::Activate) if !alarms.contains(&entry) => alarms.push(entry),
            Ok(alarm_request::AlarmAction::Deactivate) => {
                alarms.retain(|a| !(a.1 == req.alarm && (req.member_id == 0 || a.0 == req.member_id)));
            }
            _ => {}
        }
        self.batch.put(Cf::Meta, meta::ALARMS.to_vec(), encode_alarms(&alarms));
        let listed =
            alarms.iter().map(|(member_id, alarm)| AlarmMember { member_id: *member_id, alarm: *alarm }).collect();
        Ok(AlarmResponse { header: Some(header(self.rev)), alarms: listed })
    }
}

fn compare_one(cmp: &Compare, target: compare::CompareTarget, kv: &KeyValue) -> bool {
    use compare::TargetUnion as U;
    use std::cmp::Ordering as O;
    let ord = match (target, &cmp.target_union) {
        (compare::CompareTarget::Value, Some(U::Value(v))) => kv.value.as_slice().cmp(v.as_slice()),
        (compare::CompareTarget::Version, Some(U::Version(v))) => kv.version.cmp(v),
        (compare::CompareTarget::Create, Some(U::CreateRevision(v))) => kv.create_revision.cmp(v),
        (compare::CompareTarget::Mod, Some(U::ModRevision(v))) => kv.mod_revision.cmp(v),
        (compare::CompareTarget::Lease, Some(U::Lease(v))) => kv.lease.cmp(v),
        // A target without its value compares against the zero value, as etcd's getters do.
        (compare::CompareTarget::Value, _) => kv.value.as_slice().cmp(&[][..]),
        (compare::CompareTarget::Version, _) => kv.version.cmp(&0),
        (compare::CompareTarget::Create, _) => kv.create_revision.cmp(&0),
        (compare::CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
        (compare::CompareTarget::Lease, _) => kv.lease.cmp(&0),
    };
    match compare::CompareResult::try_from(cmp.result).unwrap_or(compare::CompareResult::Equal) {
        compare::CompareResult::Equal => ord == O::Equal,
        compare::CompareResult::Greater => ord == O::Greater,
        compare::CompareResult::Less => ord == O::Less,
        compare::CompareResult::NotEqual => ord != O::Equal,
    }
}

/// etcd's checks on a txn's shape: the number of ops, and no key written twice in a branch.
pub fn check_txn_request(req: &TxnRequest) -> StoreResult<()> {
    if req.compare.len() > MAX_TXN_OPS || req.success.len() > MAX_TXN_OPS || req.failure.len() > MAX_TXN_OPS {
        return Err(StoreError::TooManyOps);
    }
    for branch in [&req.success, &req.failure] {
        let mut puts = BTreeSet::new();
        let mut deletes = Vec::new();
        collect_writes(branch, &mut puts, &mut deletes)?;
        for del in &deletes {
            if puts.iter().any(|k: &Vec<u8>| del.contains(k)) {
                return Err(StoreError::DuplicateKey);
            }
        }
    }
    Ok(())
}

fn collect_writes(ops: &[RequestOp], puts: &mut BTreeSet<Vec<u8>>, deletes: &mut Vec<KeyRange>) -> StoreResult<()> {
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestPut(p)) => {
                let first_time = puts.insert(p.key.clone());
                if !first_time {
                    return Err(StoreError::DuplicateKey);
                }
            }
            Some(request_op::Request::RequestDeleteRange(d)) => deletes.push(KeyRange::new(&d.key, &d.range_end)),
            Some(request_op::Request::RequestTxn(t)) => {
                check_txn_request(t)?;
                // Only one of a nested txn's branches runs: its writes are checked per branch.
                let mut branch_puts = puts.clone();
                collect_writes(&t.success, &mut branch_puts, deletes)?;
                let mut branch_puts = puts.clone();
                collect_writes(&t.failure, &mut branch_puts, deletes)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes every version that no revision at or above `compact_rev` can read, and every
/// event below it, in batches. Returns false if stopped before the end. Idempotent: run again after a crash until it records itself
/// finished. Safe beside the writer: it only touches versions below the compact revision,
/// which no later write changes.
pub(crate) fn compact(
    engine: &dyn crate::engine::Engine,
    compact_rev: i64,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<bool, EngineError> {
    fail::fail_point!("mvcc-compact");
    let started = std::time::Instant::now();
    let mut removed = 0usize;
    // Where the next batch starts: each batch picks up after the last, rather than scanning
    // again over the deletions it just made.
    let mut resume_at: Vec<u8> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let view = engine.view();
        let mut cursor = view.cursor(Cf::Rev);
        cursor.seek(&resume_at);
        let mut keys = BTreeSet::new();
        let mut batch = Batch::default();
        while cursor.valid() && keys.len() < COMPACTION_BATCH {
            let (main, _) = split_rev_key(cursor.key())
                .ok_or_else(|| EngineError::Corrupt { cf: Cf::Rev, what: "bad revision key".into() })?;
            if main >= compact_rev {
                break;
            }
            keys.insert(cursor.value().to_vec());
            batch.delete(Cf::Rev, cursor.key().to_vec());
            cursor.next();
        }
        cursor.status()?;
        let done = !cursor.valid() || split_rev_key(cursor.key()).map(|(main, _)| main >= compact_rev).unwrap_or(true);
        if !done {
            resume_at = cursor.key().to_vec();
        }
        drop(cursor);
        for key in &keys {
            let mut versions = view.cursor(Cf::Kv);
            let target = version_key(key, compact_rev);
            let user_enc = &target[..target.len() - 8];
            versions.seek(&target);
            let mut newest = true;
            while versions.valid() {
                let version_rev = match split_version_key(versions.key()) {
                    Some((enc, rev)) if enc == user_enc => rev,
                    _ => break,
                };
                // The newest version at or below the compact revision stays readable; a
                // tombstone only while its event (at the compact revision) is watchable.
                let keep = newest && (version_rev == compact_rev || Record::decode(versions.value())?.is_live());
                if !keep {
                    batch.delete(Cf::Kv, versions.key().to_vec());
                }
                newest = false;
                versions.next();
            }
            versions.status()?;
        }
        removed += batch.len();
        if done {
            batch.put(Cf::Meta, meta::COMPACT_FINISHED.to_vec(), compact_rev.to_be_bytes().to_vec());
        }
        drop(view);
        // Replayable, as the writes it compacts: a crash loses no compaction step without
        // every later one, and the compaction resumes at the next start (`COMPACT_FINISHED`
        // is behind `COMPACT_REV`).
        engine.write_replayable(batch)?;
        if done {
            tracing::info!(
                compact_rev,
                removed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "compaction finished"
            );
            return Ok(true);
        }
        // Leave room for the applier between batches.
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(false)
}

/// True when no branch of the txn, however deep, writes.
pub fn txn_is_read_only(req: &TxnRequest) -> bool {
    req.success.iter().chain(req.failure.iter()).all(|op| match &op.request {
        Some(request_op::Request::RequestRange(_)) | None => true,
        Some(request_op::Request::RequestTxn(t)) => txn_is_read_only(t),
        _ => false,
    })
}

impl Mvcc {
    /// Runs a txn that writes nothing against the current state, off the Raft log.
    pub fn read_only_txn(&self, req: &TxnRequest) -> StoreResult<TxnResponse> {
        debug_assert!(txn_is_read_only(req));
        let _gate = self.reading();
        let mut writer = Writer::new(self);
        writer.txn(req)
    }
}
