//! openraft's network over tonic: each RPC is a bincode payload in a gRPC frame, sent over
//! mutual TLS to the peer's Raft port.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_proto::store::RaftPayload;
use corral_proto::store::raft_peer_client::RaftPeerClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::types::{Member, NodeId, TypeConfig, decode, encode};

/// The largest gRPC message between servers. AppendEntries batches larger than this are
/// split by openraft after a `PayloadTooLarge` answer.
pub const MAX_PEER_MESSAGE_BYTES: usize = 16 << 20;

/// HTTP/2 flow-control window of a stream between servers, both ways: room for a whole
/// AppendEntries (4 entries of at most 1 MiB) or forwarded batch without waiting for a
/// WINDOW_UPDATE. The connection's window is twice that.
pub const MAX_PEER_WINDOW: u32 = 4 << 20;

/// Lazily connected channels to the other servers, by peer URL.
#[derive(Clone)]
pub struct Peers {
    tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    /// `tls` is None only when the cluster runs with the explicit plaintext flag.
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        Self { tls, channels: Arc::default() }
    }

    /// A client for the peer at `url` (https://host:port). Never blocks: connects on first use.
    pub fn client(&self, url: &str) -> Result<RaftPeerClient<Channel>, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("peer lock");
        let channel = match channels.get(url) {
            Some(ch) => ch.clone(),
            None => {
                let mut endpoint = Endpoint::from_shared(url.to_string())?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .initial_stream_window_size(MAX_PEER_WINDOW)
                    .initial_connection_window_size(2 * MAX_PEER_WINDOW);
                if let Some(tls) = &self.tls {
                    endpoint = endpoint.tls_config(tls.clone())?;
                }
                let ch = endpoint.connect_lazy();
                channels.insert(url.to_string(), ch.clone());
                ch
            }
        };
        Ok(RaftPeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }

    /// The client for a member, by its first peer URL.
    pub fn member_client(&self, member: &Member) -> Result<RaftPeerClient<Channel>, String> {
        let url = member.peer_urls.first().ok_or_else(|| "member has no peer URL".to_string())?;
        self.client(url).map_err(|e| format!("bad peer URL {url}: {e}"))
    }
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerConnection { target, client: self.member_client(node) }
    }
}

pub struct PeerConnection {
    target: NodeId,
    client: Result<RaftPeerClient<Channel>, String>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl PeerConnection {
    async fn call<Req, Resp, E>(&mut self, kind: &'static str, req: &Req, option: &RPCOption) -> Result<Resp, RpcErr<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.clone())))),
        };
        let mut client = client;
        let payload = RaftPayload { data: encode(req) };
        let mut request = tonic::Request::new(payload);
        request.set_timeout(option.hard_ttl());
        let reply = match kind {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let entries = rpc.entries.len();
        let size: usize = rpc.entries.iter().map(super::types::entry_bytes).sum();
        if entries > 1 && size > MAX_PEER_MESSAGE_BYTES / 2 {
            // Bound every Raft message: ask openraft to resend fewer entries.
            let hint = ((entries * (MAX_PEER_MESSAGE_BYTES / 2)) / size).max(1) as u64;
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
        }
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call("vote", &rpc, &option).await
    }
}
