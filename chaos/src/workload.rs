//! The etcd-API workload: clients doing reads, writes, compare-and-swaps and deletes on a few
//! hot keys, and watchers on their prefix that move to another server when theirs fails.
//! Each records what it saw; nothing here judges it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corral_proto::etcdserverpb::kv_client::KvClient;
use corral_proto::etcdserverpb::watch_client::WatchClient;
use corral_proto::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest, compare, request_op,
    watch_request,
};
use corral_proto::mvccpb::event::EventType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, info};

use crate::history::{Event, Kind, Op, Outcome, Value, WatchHistory, encode_value, parse_value, value_of};

/// How the workload is shaped.
#[derive(Clone, Debug)]
pub struct Config {
    /// Every key the workload touches starts with it (unique per run).
    pub prefix: String,
    pub clients: u32,
    pub keys: u32,
    pub watchers: u32,
    /// A request with no answer after this long has an unknown outcome.
    pub op_timeout: Duration,
    /// Upper bound on the operations of one client (a run is bounded even if never stopped).
    pub max_ops_per_client: u32,
    pub seed: u64,
}

impl Config {
    pub fn key(&self, k: u32) -> String {
        format!("{}k{k}", self.prefix)
    }

    /// The key the runner writes once the run is over: watchers stop when they see it.
    pub fn sentinel(&self) -> String {
        format!("{}~end", self.prefix)
    }

    pub fn range_end(&self) -> Vec<u8> {
        prefix_end(self.prefix.as_bytes())
    }
}

/// The key just past every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A running workload.
pub struct Workload {
    pub started: Instant,
    stop: watch::Sender<bool>,
    clients: Vec<JoinHandle<Vec<Op>>>,
    watchers: Vec<JoinHandle<WatchHistory>>,
    /// Operations answered so far (for the runner's throughput check).
    pub answered: Arc<AtomicU64>,
}

impl Workload {
    /// Starts clients and watchers over `endpoints` (client `i` and watcher `i` start on
    /// endpoint `i` modulo their count). Watchers begin at `start_revision`.
    pub fn start(config: &Config, endpoints: Vec<Channel>, start_revision: i64) -> Workload {
        let started = Instant::now();
        let (stop, stopped) = watch::channel(false);
        let answered = Arc::new(AtomicU64::new(0));
        let clients = (0..config.clients)
            .map(|c| {
                let client = Client {
                    id: c,
                    config: config.clone(),
                    endpoints: endpoints.clone(),
                    at: c as usize % endpoints.len(),
                    started,
                    answered: answered.clone(),
                    rng: StdRng::seed_from_u64(config.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(c))),
                };
                tokio::spawn(client.run(stopped.clone()))
            })
            .collect();
        let watchers = (0..config.watchers)
            .map(|w| {
                let watcher = Watcher { id: w, config: config.clone(), endpoints: endpoints.clone(), start_revision };
                tokio::spawn(watcher.run())
            })
            .collect();
        Workload { started, stop, clients, watchers, answered }
    }

    /// Microseconds since the workload started, on the clients' clock.
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Stops the clients and returns their operations.
    pub async fn stop_clients(&mut self) -> Vec<Op> {
        let _ = self.stop.send(true);
        let mut ops = Vec::new();
        for c in self.clients.drain(..) {
            ops.extend(c.await.unwrap_or_default());
        }
        ops.sort_by_key(|op| op.call_us);
        ops
    }

    /// Waits (at most `bound`) for every watcher to see the sentinel, and returns what each saw.
    pub async fn finish_watchers(&mut self, bound: Duration) -> Vec<WatchHistory> {
        let mut out = Vec::new();
        for (i, w) in self.watchers.drain(..).enumerate() {
            let abort = w.abort_handle();
            match tokio::time::timeout(bound, w).await {
                Ok(Ok(h)) => out.push(h),
                _ => {
                    abort.abort();
                    out.push(WatchHistory { watcher: i as u32, ..Default::default() });
                }
            }
        }
        out
    }
}

struct Client {
    id: u32,
    config: Config,
    endpoints: Vec<Channel>,
    at: usize,
    started: Instant,
    answered: Arc<AtomicU64>,
    rng: StdRng,
}

/// What an RPC answered: the kind as completed (a read's value, a txn's result) and the
/// header revision.
type Answer = Result<(Kind, i64), tonic::Status>;

impl Client {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Vec<Op> {
        let mut ops = Vec::new();
        // The last value this client saw per key: what its compare-and-swaps expect.
        let mut seen: Vec<Option<Value>> = vec![None; self.config.keys as usize];
        for seq in 0..self.config.max_ops_per_client {
            if *stop.borrow() {
                break;
            }
            let k = self.rng.random_range(0..self.config.keys);
            let key = self.config.key(k);
            let value = value_of(self.id, seq);
            let kind = match self.rng.random_range(0..100) {
                0..35 => Kind::Read { value: None, serializable: false },
                35..45 => Kind::Read { value: None, serializable: true },
                45..70 => Kind::Write { value },
                70..95 => Kind::Cas { expect: seen[k as usize], value, succeeded: false },
                _ => Kind::Delete,
            };
            let call_us = self.now_us();
            let channel = self.endpoints[self.at].clone();
            let answer = tokio::select! {
                a = tokio::time::timeout(self.config.op_timeout, call(channel, &key, &kind)) => a,
                // A stop interrupts a pending call: its outcome is unknown.
                _ = stop.changed() => Ok(Err(tonic::Status::cancelled("stopped"))),
            };
            let return_us = self.now_us();
            let (kind, outcome, revision) = match answer {
                Ok(Ok((kind, revision))) => {
                    self.answered.fetch_add(1, Ordering::Relaxed);
                    match kind {
                        Kind::Read { value, .. } => seen[k as usize] = value,
                        Kind::Write { value } | Kind::Cas { value, succeeded: true, .. } => {
                            seen[k as usize] = Some(value)
                        }
                        Kind::Delete => seen[k as usize] = None,
                        Kind::Cas { .. } => {}
                    }
                    (kind, Outcome::Ok, Some(revision))
                }
                Ok(Err(status)) => {
                    debug!(client = self.id, code = ?status.code(), message = status.message(), "request failed");
                    (kind, classify(&status), None)
                }
                Err(_) => (kind, Outcome::Unknown, None),
            };
            let failed = outcome != Outcome::Ok;
            ops.push(Op { client: self.id, key, kind, outcome, call_us, return_us, revision });
            if failed {
                // Another server, after a pause: the next request should not land on the
                // one that just failed, nor spin while there is no leader.
                self.at = (self.at + 1) % self.endpoints.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        ops
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

/// Errors that prove the request never took effect: the connection was refused, or the
/// server rejected the request as invalid. Everything else may have happened.
fn classify(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let mut chain = format!("{status:?}");
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        chain.push_str(&s.to_string());
        source = s.source();
    }
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::ResourceExhausted => {
            Outcome::Failed
        }
        _ if chain.contains("Connection refused") || chain.contains("tcp connect error") => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

async fn call(channel: Channel, key: &str, kind: &Kind) -> Answer {
    let mut kv = KvClient::new(channel);
    let header_rev = |h: Option<corral_proto::etcdserverpb::ResponseHeader>| h.map(|h| h.revision).unwrap_or(0);
    match kind {
        Kind::Read { serializable, .. } => {
            let resp = kv
                .range(RangeRequest { key: key.into(), serializable: *serializable, ..Default::default() })
                .await?
                .into_inner();
            let value = resp.kvs.first().and_then(|kv| parse_value(&kv.value));
            Ok((Kind::Read { value, serializable: *serializable }, header_rev(resp.header)))
        }
        Kind::Write { value } => {
            let resp = kv
                .put(PutRequest { key: key.into(), value: encode_value(*value), ..Default::default() })
                .await?
                .into_inner();
            Ok((kind.clone(), header_rev(resp.header)))
        }
        Kind::Delete => {
            let resp = kv
                .delete_range(corral_proto::etcdserverpb::DeleteRangeRequest { key: key.into(), ..Default::default() })
                .await?
                .into_inner();
            Ok((Kind::Delete, header_rev(resp.header)))
        }
        Kind::Cas { expect, value, .. } => {
            let compare = match expect {
                Some(v) => Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Value as i32,
                    key: key.into(),
                    target_union: Some(compare::TargetUnion::Value(encode_value(*v))),
                    ..Default::default()
                },
                None => Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Version as i32,
                    key: key.into(),
                    target_union: Some(compare::TargetUnion::Version(0)),
                    ..Default::default()
                },
            };
            let put = RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.into(),
                    value: encode_value(*value),
                    ..Default::default()
                })),
            };
            let resp =
                kv.txn(TxnRequest { compare: vec![compare], success: vec![put], failure: vec![] }).await?.into_inner();
            Ok((Kind::Cas { expect: *expect, value: *value, succeeded: resp.succeeded }, header_rev(resp.header)))
        }
    }
}

struct Watcher {
    id: u32,
    config: Config,
    endpoints: Vec<Channel>,
    start_revision: i64,
}

impl Watcher {
    /// Watches the prefix until it sees the sentinel, resuming on the next server from the
    /// revision after the last one seen whenever its stream breaks. Bounded by the number
    /// of resumes (10,000) and of responses (10 million).
    async fn run(self) -> WatchHistory {
        let mut history = WatchHistory { watcher: self.id, start_revision: self.start_revision, ..Default::default() };
        let sentinel = self.config.sentinel();
        let mut next = self.start_revision;
        let mut at = self.id as usize % self.endpoints.len();
        let mut responses = 0u64;
        for _attempt in 0..10_000 {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let create = WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                    key: self.config.prefix.clone().into_bytes(),
                    range_end: self.config.range_end(),
                    start_revision: next,
                    ..Default::default()
                })),
            };
            let _ = tx.send(create).await;
            let mut client = WatchClient::new(self.endpoints[at].clone());
            let stream = tokio::time::timeout(
                Duration::from_secs(2),
                client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await;
            if let Ok(Ok(stream)) = stream {
                let mut stream = stream.into_inner();
                while let Ok(Some(resp)) = stream.message().await {
                    if resp.compact_revision != 0 {
                        info!(watcher = self.id, compact_revision = resp.compact_revision, "watch compacted");
                        return history;
                    }
                    if resp.canceled || responses > 10_000_000 {
                        break;
                    }
                    responses += 1;
                    for e in resp.events {
                        let Some(kv) = e.kv else { continue };
                        let key = String::from_utf8_lossy(&kv.key).into_owned();
                        if key == sentinel {
                            history.finished = true;
                            return history;
                        }
                        let value = match EventType::try_from(e.r#type) {
                            Ok(EventType::Delete) => None,
                            _ => parse_value(&kv.value),
                        };
                        next = next.max(kv.mod_revision + 1);
                        history.events.push(Event { revision: kv.mod_revision, key, value, response: responses });
                    }
                }
            }
            drop(tx);
            history.resumes += 1;
            at = (at + 1) % self.endpoints.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        history
    }
}

/// Reads the store's own log of the prefix: a watch from `start_revision` on `channel` until
/// the sentinel, which the caller has written. Bounded by `bound`.
pub async fn read_log(config: &Config, channel: Channel, start_revision: i64, bound: Duration) -> Option<Vec<Event>> {
    let watcher = Watcher { id: u32::MAX, config: config.clone(), endpoints: vec![channel], start_revision };
    let history = tokio::time::timeout(bound, watcher.run()).await.ok()?;
    history.finished.then_some(history.events)
}
