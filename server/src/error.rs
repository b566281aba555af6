//! What a request can fail with, and the one mapping to gRPC status codes.

use faultline_proto::model::OutOfRange;
use faultline_proto::{ProtocolError, pb};

use crate::store::{CreateError, ListError, OpenError, RecordError};

/// Why a request failed. Every variant has one gRPC code (see the
/// `From<Error> for tonic::Status` impl); messages say what was wrong and the
/// limit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed field.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Pages past the end of the snapshot.
    #[error(transparent)]
    OutOfRange(#[from] OutOfRange),
    /// A request larger than the server accepts at once.
    #[error("{what}: {got} is more than the limit of {limit}; split it into smaller requests")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// How large it was.
        got: u64,
        /// The most accepted.
        limit: u64,
    },
    /// A message above the transport's size limit.
    #[error("{0}; send smaller messages")]
    MessageTooLarge(String),
    /// A stream's messages came in an order the RPC does not allow.
    #[error("{0}")]
    Sequence(&'static str),
    /// A working set that was asked for does not exist.
    #[error(
        "snapshot \"{snapshot}\" has no working set \"{name}\"; record one first or prefetch without it"
    )]
    NoWorkingSet {
        /// The snapshot.
        snapshot: faultline_proto::SnapshotId,
        /// The working set.
        name: faultline_proto::WorkingSetName,
    },
    /// Opening a snapshot failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Listing snapshots failed.
    #[error(transparent)]
    List(#[from] ListError),
    /// Creating a snapshot failed.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// Recording a working set failed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The caller's token does not allow this.
    #[error(transparent)]
    Denied(#[from] crate::auth::Denied),
    /// The server is shutting down or a worker went away.
    #[error("the server is shutting down; retry on another server or later")]
    Unavailable,
}

impl Error {
    /// The gRPC code of this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Protocol(_) | Self::Sequence(_) => Code::InvalidArgument,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::NoWorkingSet { .. } => Code::NotFound,
            Self::TooLarge { .. } | Self::MessageTooLarge(_) => Code::ResourceExhausted,
            Self::Open(e) | Self::List(ListError::Open(e)) | Self::Record(RecordError::Open(e)) => {
                open_code(e)
            }
            Self::List(ListError::ReadDir { .. }) => Code::Internal,
            Self::Create(e) => match e {
                CreateError::AlreadyExists(_) => Code::AlreadyExists,
                CreateError::Invalid(_)
                | CreateError::OutOfOrder { .. }
                | CreateError::TooLong { .. }
                | CreateError::Incomplete { .. } => Code::InvalidArgument,
                CreateError::Io { .. } => Code::Internal,
            },
            Self::Record(e) => match e {
                RecordError::Open(_) => unreachable!("matched above"),
                RecordError::OutOfRange(_) => Code::OutOfRange,
                RecordError::TooManyPages { .. } => Code::InvalidArgument,
                RecordError::Write { .. } => Code::Internal,
            },
            Self::Denied(_) => Code::PermissionDenied,
            Self::Unavailable => Code::Unavailable,
        }
    }

    /// The in-band form used on streams.
    pub fn to_pb(&self) -> pb::Error {
        pb::Error {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }
}

impl Error {
    /// The error behind a broken request stream: an oversized message (which
    /// tonic reports as OutOfRange) or the client going away.
    pub fn from_stream(status: &tonic::Status, broke: &'static str) -> Self {
        if status.message().contains("message length too large") {
            Self::MessageTooLarge(status.message().to_owned())
        } else {
            Self::Sequence(broke)
        }
    }
}

fn open_code(e: &OpenError) -> tonic::Code {
    match e {
        OpenError::NotFound(_) => tonic::Code::NotFound,
        OpenError::Corrupt { .. } => tonic::Code::DataLoss,
        OpenError::Read { .. } => tonic::Code::Internal,
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
