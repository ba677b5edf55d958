//! The types openraft is instantiated with.

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
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request(pub CommandBatch);

/// What applying a [`Request`] produced, one result per command. Blank and membership
/// entries produce the empty default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response(pub CommandResults);

macro_rules! serde_as_protobuf {
    ($outer:ident, $inner:ty) => {
        impl Serialize for $outer {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0.encode_to_vec())
            }
        }

        impl<'de> Deserialize<'de> for $outer {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw: serde_bytes::ByteBuf = serde_bytes::ByteBuf::deserialize(d)?;
                <$inner>::decode(raw.as_slice()).map($outer).map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_protobuf!(Request, CommandBatch);
serde_as_protobuf!(Response, CommandResults);

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

/// bincode with one configuration for everything the store persists or sends.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("bincode encodes serde types")
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(raw, bincode::config::standard()).map(|(v, _)| v)
}
