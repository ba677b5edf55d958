//! Watch: one bidirectional stream per client, many watchers on it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use corral_proto::etcdserverpb::watch_server::Watch;
use corral_proto::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, watch_create_request, watch_request,
};
use corral_proto::mvccpb::event::EventType;
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::StoreError;
use crate::mvcc::KeyRange;
use crate::node::StoreNode;

/// Responses queued per client stream before watchers wait for the client to read.
const STREAM_QUEUE: usize = 128;
/// Watchers per client stream.
const MAX_WATCHERS_PER_STREAM: usize = 10_000;
/// How often a watcher that asked for progress notifications gets one when idle (etcd: 10 min).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

pub struct WatchService {
    node: Arc<StoreNode>,
}

impl WatchService {
    pub fn new(node: Arc<StoreNode>) -> Self {
        Self { node }
    }
}

type WatchResponseStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchResponseStream;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let node = self.node.clone();
        tokio::spawn(async move {
            let mut watchers: HashMap<i64, tokio::task::JoinHandle<()>> = HashMap::new();
            let mut next_id: i64 = 0;
            while let Ok(Some(req)) = requests.message().await {
                watchers.retain(|_, task| !task.is_finished());
                match req.request_union {
                    Some(watch_request::RequestUnion::CreateRequest(create)) => {
                        let id = if create.watch_id != 0 {
                            create.watch_id
                        } else {
                            while watchers.contains_key(&next_id) {
                                next_id += 1;
                            }
                            next_id
                        };
                        let header = Some(node.header(node.mvcc().current_revision()));
                        if watchers.contains_key(&id) || watchers.len() >= MAX_WATCHERS_PER_STREAM {
                            let resp = WatchResponse {
                                header,
                                watch_id: id,
                                created: true,
                                canceled: true,
                                cancel_reason: "etcdserver: duplicate watch id or too many watchers".into(),
                                ..Default::default()
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        let range = KeyRange::new(&create.key, &create.range_end);
                        let stream = node.watch(range, create.start_revision, create.prev_kv);
                        if tx
                            .send(Ok(WatchResponse { header, watch_id: id, created: true, ..Default::default() }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                        let task = tokio::spawn(run_watcher(node.clone(), id, create, stream, tx.clone()));
                        watchers.insert(id, task);
                    }
                    Some(watch_request::RequestUnion::CancelRequest(cancel)) => {
                        if let Some(task) = watchers.remove(&cancel.watch_id) {
                            task.abort();
                            let resp = WatchResponse {
                                header: Some(node.header(node.mvcc().current_revision())),
                                watch_id: cancel.watch_id,
                                canceled: true,
                                ..Default::default()
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                break;
                            }
                        }
                    }
                    Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                        // etcd 3.4 answers with the stream's current revision and watch id -1.
                        let resp = WatchResponse {
                            header: Some(node.header(node.mvcc().current_revision())),
                            watch_id: -1,
                            ..Default::default()
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                    }
                    None => {}
                }
            }
            for (_, task) in watchers {
                task.abort();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn run_watcher(
    node: Arc<StoreNode>,
    id: i64,
    create: WatchCreateRequest,
    stream: Result<crate::watch::WatchStream, StoreError>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Ok(canceled(&node, id, &e))).await;
            return;
        }
    };
    let no_put = create.filters.contains(&(watch_create_request::FilterType::Noput as i32));
    let no_delete = create.filters.contains(&(watch_create_request::FilterType::Nodelete as i32));
    loop {
        let next = if create.progress_notify {
            match tokio::time::timeout(PROGRESS_INTERVAL, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let resp = WatchResponse {
                        header: Some(node.header(stream.next_revision() - 1)),
                        watch_id: id,
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        let events = match next {
            Ok(events) => events,
            Err(e) => {
                let _ = tx.send(Ok(canceled(&node, id, &e))).await;
                return;
            }
        };
        let events: Vec<_> = events
            .into_iter()
            .map(|e| e.inner)
            .filter(|e| {
                let is_put = e.r#type == EventType::Put as i32;
                !(is_put && no_put || !is_put && no_delete)
            })
            .collect();
        if events.is_empty() {
            continue;
        }
        let revision = events.last().and_then(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).unwrap_or(0);
        let header = Some(node.header(revision.max(node.mvcc().current_revision())));
        for resp in fragments(header, id, events, create.fragment) {
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}

/// The response that ends a watcher, as etcd words it: a compacted start revision carries the
/// compact revision, so the client knows where history now begins.
fn canceled(node: &StoreNode, watch_id: i64, e: &StoreError) -> WatchResponse {
    let compact_revision = match e {
        StoreError::Compacted { compact_rev } => *compact_rev,
        _ => 0,
    };
    WatchResponse {
        header: Some(node.header(node.mvcc().current_revision())),
        watch_id,
        canceled: true,
        compact_revision,
        cancel_reason: e.to_string(),
        ..Default::default()
    }
}

/// Splits events over responses of at most etcd's request size when the client allows it.
fn fragments(
    header: Option<corral_proto::etcdserverpb::ResponseHeader>,
    watch_id: i64,
    events: Vec<corral_proto::mvccpb::Event>,
    fragment: bool,
) -> Vec<WatchResponse> {
    let whole = WatchResponse { header, watch_id, events, ..Default::default() };
    if !fragment || whole.encoded_len() <= super::MAX_REQUEST_BYTES {
        return vec![whole];
    }
    let mut out: Vec<WatchResponse> = Vec::new();
    let mut current = WatchResponse { header, watch_id, fragment: true, ..Default::default() };
    let mut size = 0;
    for event in whole.events {
        let len = event.encoded_len();
        if size + len > super::MAX_REQUEST_BYTES && !current.events.is_empty() {
            out.push(std::mem::replace(
                &mut current,
                WatchResponse { header, watch_id, fragment: true, ..Default::default() },
            ));
            size = 0;
        }
        size += len;
        current.events.push(event);
    }
    current.fragment = false;
    out.push(current);
    out
}
