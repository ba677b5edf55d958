//! Objects in the replicated store: JSON under `/registry/...` keys, every write a
//! compare-and-swap on the key's revision, through this server's Raft.

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_api::ApiError;
use corral_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, compare, request_op, response_op,
};
use corral_proto::store::{Command, command, command_result};
use corral_store::StoreError;
use corral_store::mvcc::KeyRange;
use corral_store::node::StoreNode;
use corral_store::watch::WatchStream;
use serde_json::{Value, json};

/// Objects above this size are refused, as etcd's request limit would refuse them.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;

/// An object as stored, with the revision that last wrote it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub value: Value,
    pub rev: i64,
}

/// One page of a list.
pub struct Page {
    pub items: Vec<Stored>,
    /// The store revision the page was read at.
    pub rev: i64,
    /// The key to continue after, when more remain.
    pub next: Option<String>,
    pub remaining: i64,
}

#[derive(Clone)]
pub struct ObjectStore {
    node: Arc<StoreNode>,
    /// The lease Events are written with.
    events: Arc<SharedLease>,
    /// The lease metrics samples are written with.
    metrics: Arc<SharedLease>,
}

/// Events expire this long after their last write, as kube-apiserver's `--event-ttl` default.
pub const EVENT_TTL: Duration = Duration::from_secs(3600);
/// A metrics sample expires this long after its last write: its node stopped reporting.
pub const METRICS_TTL: Duration = Duration::from_secs(corral_api::metrics::STALE_AFTER_S as u64);
/// One lease serves the keys written within this long (kube-apiserver reuses its leases for
/// a minute too), so a key lives between one TTL and one TTL plus this after its last write.
const LEASE_REUSE: Duration = Duration::from_secs(60);

/// One lease many keys are written with, granted with the TTL plus the reuse time and
/// replaced once it has served its minute (so it cannot expire while in use).
struct SharedLease {
    ttl: Duration,
    current: std::sync::Mutex<Option<(i64, Instant)>>,
}

impl SharedLease {
    fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self { ttl, current: std::sync::Mutex::new(None) })
    }

    async fn id(&self, node: &StoreNode) -> Result<i64, ApiError> {
        {
            let current = self.current.lock().expect("not poisoned");
            if let Some((id, at)) = *current
                && at.elapsed() < LEASE_REUSE
            {
                return Ok(id);
            }
        }
        let ttl = (self.ttl + LEASE_REUSE).as_secs() as i64;
        let granted = node
            .lease_grant(corral_proto::etcdserverpb::LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(store_error)?;
        *self.current.lock().expect("not poisoned") = Some((granted.id, Instant::now()));
        Ok(granted.id)
    }
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Compacted { compact_rev } => ApiError::Gone { requested: 0, oldest: compact_rev },
        StoreError::NoLeader | StoreError::LeaderChanged | StoreError::Unavailable(_) => {
            ApiError::Unavailable(format!("the store has no leader: {e}"))
        }
        // The leader's own answer, forwarded: "no leader" and the like, retryable as above.
        StoreError::Remote { .. } if e.is_unavailable() => {
            ApiError::Unavailable(format!("the store has no leader: {e}"))
        }
        StoreError::Timeout | StoreError::LeaderChangedInFlight => {
            ApiError::Timeout(format!("the store did not answer in time: {e}"))
        }
        StoreError::RequestTooLarge => ApiError::TooLarge("Request entity too large: limit is 3145728".into()),
        StoreError::NoSpace => ApiError::Internal("etcdserver: mvcc: database space exceeded".into()),
        other => ApiError::Internal(other.to_string()),
    }
}

fn decode(raw: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(raw).map_err(|e| ApiError::Internal(format!("stored object is not JSON: {e}")))
}

fn encode(value: &Value) -> Result<Vec<u8>, ApiError> {
    let raw = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    if raw.len() > MAX_OBJECT_BYTES {
        return Err(ApiError::TooLarge(format!(
            "the object is {} bytes; objects are limited to {MAX_OBJECT_BYTES} bytes",
            raw.len()
        )));
    }
    Ok(raw)
}

/// The end of a prefix range: the prefix with its last byte incremented.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The condition "`key` was last written at revision `rev`".
fn at_revision(key: &str, rev: i64) -> Compare {
    Compare {
        key: key.as_bytes().to_vec(),
        target: compare::CompareTarget::Mod as i32,
        result: compare::CompareResult::Equal as i32,
        target_union: Some(compare::TargetUnion::ModRevision(rev)),
        ..Default::default()
    }
}

/// The condition "`key` does not exist".
fn absent(key: &str) -> Compare {
    Compare {
        key: key.as_bytes().to_vec(),
        target: compare::CompareTarget::Create as i32,
        result: compare::CompareResult::Equal as i32,
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
        ..Default::default()
    }
}

/// What a conditional write found when its condition failed.
pub enum WriteOutcome {
    Written(i64),
    /// The key held this revision (0: absent).
    Mismatch(Option<Stored>),
    /// The object was as expected but one of the side claims exists already.
    ClaimTaken,
}

/// Writes made in the same transaction as an object's: claim keys that must not exist yet
/// (written naming `owner`) and keys to delete.
#[derive(Debug, Default)]
pub struct Side {
    pub claims: Vec<String>,
    pub owner: Value,
    pub releases: Vec<String>,
    /// The lease the object is written with (0: none); Events expire with theirs.
    pub lease: i64,
}

impl ObjectStore {
    pub fn new(node: Arc<StoreNode>) -> Self {
        Self { node, events: SharedLease::new(EVENT_TTL), metrics: SharedLease::new(METRICS_TTL) }
    }

    /// The lease to attach an Event to.
    pub async fn event_lease(&self) -> Result<i64, ApiError> {
        self.events.id(&self.node).await
    }

    /// Writes a metrics sample under `key`, whatever was there: samples are replaced, never
    /// merged, and expire with their lease when their node stops reporting.
    pub async fn put_metrics(&self, key: &str, value: &Value) -> Result<(), ApiError> {
        let lease = self.metrics.id(&self.node).await?;
        let put = PutRequest { key: key.as_bytes().to_vec(), value: encode(value)?, lease, ..Default::default() };
        let result = self.node.propose(Command { op: Some(command::Op::Put(put)) }).await.map_err(store_error)?;
        if result.error_code != 0 {
            return Err(ApiError::Internal(result.error_message));
        }
        Ok(())
    }

    /// Reads one object; linearizable unless `any` (resourceVersion=0).
    pub async fn get(&self, key: &str, any: bool) -> Result<Option<Stored>, ApiError> {
        let req = RangeRequest { key: key.as_bytes().to_vec(), serializable: any, ..Default::default() };
        let resp = self.node.range(&req).await.map_err(store_error)?;
        resp.kvs.into_iter().next().map(|kv| Ok(Stored { value: decode(&kv.value)?, rev: kv.mod_revision })).transpose()
    }

    /// Lists objects under `prefix` from `start` (inclusive), at `rev` (0: the latest), at
    /// most `limit` (0: all).
    pub async fn list(
        &self,
        prefix: &str,
        start: Option<&str>,
        rev: i64,
        limit: i64,
        any: bool,
    ) -> Result<Page, ApiError> {
        let req = RangeRequest {
            key: start.unwrap_or(prefix).as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            revision: rev,
            limit: if limit > 0 { limit + 1 } else { 0 },
            serializable: any || rev > 0,
            ..Default::default()
        };
        let resp = self.node.range(&req).await.map_err(|e| match e {
            StoreError::Compacted { compact_rev } => ApiError::Gone { requested: rev, oldest: compact_rev },
            other => store_error(other),
        })?;
        let read_rev = if rev > 0 { rev } else { resp.header.as_ref().map_or(0, |h| h.revision) };
        let mut kvs = resp.kvs;
        let mut next = None;
        if limit > 0 && kvs.len() as i64 > limit {
            let extra = kvs.pop().expect("over the limit");
            next = Some(String::from_utf8_lossy(&extra.key).into_owned());
        }
        let remaining = if next.is_some() { resp.count - kvs.len() as i64 } else { 0 };
        let items = kvs
            .into_iter()
            .map(|kv| Ok(Stored { value: decode(&kv.value)?, rev: kv.mod_revision }))
            .collect::<Result<_, ApiError>>()?;
        Ok(Page { items, rev: read_rev, next, remaining })
    }

    /// Writes `value` under `key` if the key's mod revision is `expect` (0: absent).
    pub async fn put_if(&self, key: &str, value: &Value, expect: i64) -> Result<WriteOutcome, ApiError> {
        self.put_if_with(key, value, expect, &Side::default()).await
    }

    /// [`Self::put_if`], with side writes in the same transaction.
    pub async fn put_if_with(
        &self,
        key: &str,
        value: &Value,
        expect: i64,
        side: &Side,
    ) -> Result<WriteOutcome, ApiError> {
        let raw = encode(value)?;
        let cmp = if expect == 0 { absent(key) } else { at_revision(key, expect) };
        let put = request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value: raw,
            lease: side.lease,
            ..Default::default()
        });
        self.txn(key, expect, cmp, put, side).await
    }

    /// Deletes `key` if its mod revision is `expect`.
    pub async fn delete_if(&self, key: &str, expect: i64) -> Result<WriteOutcome, ApiError> {
        self.delete_if_with(key, expect, &Side::default()).await
    }

    /// [`Self::delete_if`], with side writes in the same transaction.
    pub async fn delete_if_with(&self, key: &str, expect: i64, side: &Side) -> Result<WriteOutcome, ApiError> {
        let cmp = at_revision(key, expect);
        let del = request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        });
        self.txn(key, expect, cmp, del, side).await
    }

    async fn txn(
        &self,
        key: &str,
        expect: i64,
        cmp: Compare,
        op: request_op::Request,
        side: &Side,
    ) -> Result<WriteOutcome, ApiError> {
        let mut compare = vec![cmp];
        let mut success = vec![RequestOp { request: Some(op) }];
        for claim in &side.claims {
            compare.push(absent(claim));
            let value = encode(&json!({ "claim": claim, "owner": side.owner }))?;
            let put = PutRequest { key: claim.as_bytes().to_vec(), value, ..Default::default() };
            success.push(RequestOp { request: Some(request_op::Request::RequestPut(put)) });
        }
        for release in &side.releases {
            let del = DeleteRangeRequest { key: release.as_bytes().to_vec(), ..Default::default() };
            success.push(RequestOp { request: Some(request_op::Request::RequestDeleteRange(del)) });
        }
        let txn = TxnRequest {
            compare,
            success,
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                })),
            }],
        };
        let result = self.node.propose(Command { op: Some(command::Op::Txn(txn)) }).await.map_err(store_error)?;
        if result.error_code != 0 {
            return Err(ApiError::Internal(result.error_message));
        }
        let Some(command_result::Result::Txn(resp)) = result.result else {
            return Err(ApiError::Internal("the store answered a txn with something else".into()));
        };
        if resp.succeeded {
            return Ok(WriteOutcome::Written(resp.header.map_or(0, |h| h.revision)));
        }
        let found = resp.responses.into_iter().find_map(|r| match r.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        });
        let found = found
            .map(|kv| Ok::<_, ApiError>(Stored { value: decode(&kv.value)?, rev: kv.mod_revision }))
            .transpose()?;
        if found.as_ref().map_or(0, |f| f.rev) == expect {
            // The object was as expected: a claim was taken in the meantime.
            return Ok(WriteOutcome::ClaimTaken);
        }
        Ok(WriteOutcome::Mismatch(found))
    }

    /// Watches every key under `prefix` after revision `after` (0: from now).
    pub fn watch(&self, prefix: &str, after: i64) -> Result<WatchStream, ApiError> {
        let range = KeyRange::new(prefix.as_bytes(), &prefix_end(prefix));
        let start = if after > 0 { after + 1 } else { 0 };
        self.node.watch(range, start, true).map_err(|e| match e {
            StoreError::Compacted { compact_rev } => ApiError::Gone { requested: after, oldest: compact_rev },
            other => store_error(other),
        })
    }

    pub fn decode(raw: &[u8]) -> Result<Value, ApiError> {
        decode(raw)
    }
}
