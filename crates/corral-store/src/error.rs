//! Store errors, with the gRPC codes and messages etcd gives for them.

use tonic::Code;

use crate::engine::EngineError;

/// An error answered to a client. The messages are etcd's, word for word, because client
/// libraries match on them (`etcdserver: mvcc: required revision has been compacted`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { compact_rev: i64 },
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The write was not appended: this server is not the leader. Safe to send again.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// The leader changed (or lost its quorum) while the write was in flight: it may or may
    /// not commit. Never sent again by the server; the client decides, as with etcd.
    #[error("etcdserver: leader changed")]
    LeaderChangedInFlight,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: can only promote a learner member")]
    NotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("etcdserver: {0}")]
    Internal(String),
    #[error("{message}")]
    Remote { code: Code, message: String },
}

impl StoreError {
    /// The gRPC code etcd answers this error with.
    pub fn code(&self) -> Code {
        use StoreError::*;
        match self {
            Compacted { .. } | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExists | PeerUrlExists => Code::FailedPrecondition,
            KeyNotFound | EmptyKey | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey | RequestTooLarge
            | InvalidArgument(_) => Code::InvalidArgument,
            NotLearner | LearnerNotReady => Code::FailedPrecondition,
            NoSpace => Code::ResourceExhausted,
            NoLeader | Timeout | LeaderChanged | LeaderChangedInFlight | NotEnoughStartedMembers | Unavailable(_) => {
                Code::Unavailable
            }
            Unimplemented(_) => Code::Unimplemented,
            Internal(_) => Code::Internal,
            Remote { code, .. } => *code,
        }
    }

    /// Whether etcd answers it with Unavailable: the request may be sent again elsewhere.
    pub fn is_unavailable(&self) -> bool {
        self.code() == Code::Unavailable
    }

    /// A copy of `e` for another waiter: the variants callers match on are kept.
    pub fn from_code_keeping(e: &StoreError) -> Self {
        match e {
            StoreError::LeaderChanged => StoreError::LeaderChanged,
            StoreError::LeaderChangedInFlight => StoreError::LeaderChangedInFlight,
            StoreError::Timeout => StoreError::Timeout,
            StoreError::NoLeader => StoreError::NoLeader,
            StoreError::Compacted { compact_rev } => StoreError::Compacted { compact_rev: *compact_rev },
            e => StoreError::from_code(e.code(), e.to_string()),
        }
    }

    /// Rebuilds an error carried through a Raft entry's result or a forwarded call.
    pub fn from_code(code: Code, message: String) -> Self {
        StoreError::Remote { code, message }
    }
}

impl From<EngineError> for StoreError {
    fn from(e: EngineError) -> Self {
        StoreError::Internal(e.to_string())
    }
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl From<tonic::Status> for StoreError {
    fn from(s: tonic::Status) -> Self {
        StoreError::Remote { code: s.code(), message: s.message().to_string() }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
