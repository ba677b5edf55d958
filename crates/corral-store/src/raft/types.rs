//! The types openraft is instantiated with.

use std::sync::Arc;

use corral_proto::store::{CommandBatch, CommandResults};
use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A server as the membership records it: etcd's Member without the id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

/// A Raft entry's application data: the etcd writes the leader batched into it.
///
/// It carries its protobuf encoding beside the decoded batch, behind one `Arc`: the leader
/// encodes a batch once and each server decodes it once, however often the entry is then
/// written to the log, sent to a follower, or read back from the log's cache to be applied
/// or replicated (clones share both).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request(Arc<Encoded>);

#[derive(Debug, Default, PartialEq)]
struct Encoded {
    batch: CommandBatch,
    bytes: Vec<u8>,
}

impl Request {
    pub fn new(batch: CommandBatch) -> Self {
        let bytes = batch.encode_to_vec();
        Self(Arc::new(Encoded { batch, bytes }))
    }

    pub fn batch(&self) -> &CommandBatch {
        &self.0.batch
    }

    /// The length of its protobuf encoding, which is what the log and the wire carry.
    pub fn encoded_len(&self) -> usize {
        self.0.bytes.len()
    }
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.bytes)
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?.into_vec();
        let batch = CommandBatch::decode(bytes.as_slice()).map_err(serde::de::Error::custom)?;
        Ok(Self(Arc::new(Encoded { batch, bytes })))
    }
}

/// What applying a [`Request`] produced, one result per command. Blank and membership
/// entries produce the empty default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response(pub CommandResults);

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = serde_bytes::ByteBuf::deserialize(d)?;
        CommandResults::decode(raw.as_slice()).map(Response).map_err(serde::de::Error::custom)
    }
}

openraft::declare_raft_types!(
    /// Corral's Raft: u64 member ids, etcd writes as entries, snapshots as files.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type Membership = openraft::Membership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;

/// About how many bytes an entry takes in the log and on the wire.
pub(crate) fn entry_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(request) => request.encoded_len() + 32,
        _ => 256,
    }
}

/// bincode with one configuration for everything the store persists or sends.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("bincode encodes serde types")
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(raw, bincode::config::standard()).map(|(v, _)| v)
}
