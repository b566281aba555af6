//! What a request can fail with, and the one mapping to gRPC status codes.

use faultline_proto::model::OutOfRange;
use faultline_proto::{ProtocolError, pb};

use crate::store::{
    CreateError, ListError, OpenError, ReadError, RecordError, VolumeError, WriteError,
};

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
    /// A message that does not decode as the RPC's protobuf message.
    #[error("a message does not decode: {0}; send well-formed faultline.v1 messages")]
    Decode(String),
    /// More streams of a kind than the server serves at once.
    #[error(
        "{what}: {limit} are open already, this server's limit; retry when one ends (or the \
         operator raises `--{flag}`)"
    )]
    Busy {
        /// What is at its limit.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// The flag that sets it.
        flag: &'static str,
        /// The reason label of the rejection metric.
        reason: &'static str,
    },
    /// An upload that sent nothing for too long.
    #[error(
        "the upload sent nothing for {0} s and was dropped; nothing was kept (send chunks \
         without pausing, or the operator raises `--upload-idle-timeout`)"
    )]
    UploadIdle(u64),
    /// Reading pages failed.
    #[error(transparent)]
    Read(#[from] ReadError),
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
    /// Creating, sealing or opening a volume failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// Writing pages to a volume failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the server is shutting down; retry on another server or later")]
    Unavailable,
    /// A prefetch stream's producer died (it panicked) before the stream
    /// was done.
    #[error("the server failed while streaming this prefetch; retry it")]
    PrefetchDied,
}

impl Error {
    /// The gRPC code of this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Protocol(_) | Self::Sequence(_) | Self::Decode(_) => Code::InvalidArgument,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::NoWorkingSet { .. } => Code::NotFound,
            Self::TooLarge { .. } | Self::MessageTooLarge(_) | Self::Busy { .. } => {
                Code::ResourceExhausted
            }
            Self::UploadIdle(_) => Code::DeadlineExceeded,
            Self::Read(e) => read_code(e),
            Self::Open(e) | Self::List(ListError::Open(e)) | Self::Record(RecordError::Open(e)) => {
                open_code(e)
            }
            Self::List(ListError::ReadDir { .. }) => Code::Internal,
            Self::List(ListError::Unavailable { .. }) => Code::Unavailable,
            Self::Create(e) => create_code(e),
            Self::Volume(e) => match e {
                VolumeError::Unsupported { .. } => Code::Unimplemented,
                VolumeError::AlreadyExists(_) => Code::AlreadyExists,
                VolumeError::NotFound(_) => Code::NotFound,
                VolumeError::NotAVolume(_) | VolumeError::TooDeep { .. } => {
                    Code::FailedPrecondition
                }
                VolumeError::Parent(e) | VolumeError::Open(e) => open_code(e),
                VolumeError::Invalid(_) | VolumeError::Mismatch(_) => Code::InvalidArgument,
                VolumeError::Limit(e) => create_code(e),
                VolumeError::Read(e) => read_code(e),
                VolumeError::Unavailable { .. } => Code::Unavailable,
                VolumeError::Io { .. } => Code::Internal,
            },
            Self::Write(e) => match e {
                WriteError::NotAVolume(_) | WriteError::Sealed(_) => Code::FailedPrecondition,
                WriteError::OutOfRange(_) => Code::OutOfRange,
                WriteError::WrongSize { .. } => Code::InvalidArgument,
                WriteError::DiskFull { .. } => Code::ResourceExhausted,
                WriteError::Unavailable { .. } => Code::Unavailable,
                WriteError::Io { .. } => Code::Internal,
            },
            Self::Record(e) => match e {
                RecordError::Open(e) => open_code(e),
                RecordError::OutOfRange(_) => Code::OutOfRange,
                RecordError::TooManyPages { .. } => Code::InvalidArgument,
                RecordError::TooLarge { .. } | RecordError::TooManySets { .. } => {
                    Code::ResourceExhausted
                }
                RecordError::Unavailable { .. } => Code::Unavailable,
                RecordError::Write { .. } => Code::Internal,
            },
            Self::Denied(_) => Code::PermissionDenied,
            Self::Unavailable => Code::Unavailable,
            Self::PrefetchDied => Code::Internal,
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
    /// tonic reports as OutOfRange), one that does not decode (which tonic
    /// reports as Internal), or the client going away.
    pub fn from_stream(status: &tonic::Status, broke: &'static str) -> Self {
        if is_too_large(status.message()) {
            Self::MessageTooLarge(status.message().to_owned())
        } else if is_decode_error(status.message()) {
            Self::Decode(status.message().to_owned())
        } else {
            Self::Sequence(broke)
        }
    }

    /// The label of `faultline_server_rejected_total` for an error that
    /// rejects a request over a limit; `None` for other errors.
    pub fn rejection(&self) -> Option<&'static str> {
        match self {
            Self::TooLarge { what, .. } => Some(match *what {
                w if w.contains("ranges in one ReadPages") => "read_ranges",
                w if w.contains("ranges in one Prefetch") => "prefetch_ranges",
                _ => "read_bytes",
            }),
            Self::MessageTooLarge(_) => Some("message_size"),
            Self::Busy { reason, .. } => Some(reason),
            Self::UploadIdle(_) => Some("upload_idle"),
            Self::Create(CreateError::TooLarge { flag, .. }) => {
                Some(if *flag == "max-image-pages" {
                    "image_pages"
                } else {
                    "image_size"
                })
            }
            Self::Create(CreateError::DiskFull { .. })
            | Self::Write(WriteError::DiskFull { .. }) => Some("disk_reserve"),
            Self::Record(RecordError::TooLarge { .. }) => Some("working_set_pages"),
            Self::Record(RecordError::TooManySets { .. }) => Some("working_sets"),
            _ => None,
        }
    }
}

/// Every reason label of `faultline_server_rejected_total`.
pub const REJECTION_REASONS: &[&str] = &[
    "read_ranges",
    "read_bytes",
    "prefetch_ranges",
    "prefetch_streams",
    "prefetch_streams_per_client",
    "message_size",
    "upload_idle",
    "image_size",
    "image_pages",
    "disk_reserve",
    "working_set_pages",
    "working_sets",
];

/// Whether a transport status message is tonic's "message too large".
fn is_too_large(message: &str) -> bool {
    message.contains("message length too large")
}

/// Whether a transport status message is prost's decode error.
fn is_decode_error(message: &str) -> bool {
    message.starts_with("failed to decode Protobuf message")
}

fn read_code(e: &ReadError) -> tonic::Code {
    match e {
        ReadError::Io { .. } | ReadError::Corrupt { .. } => tonic::Code::DataLoss,
        ReadError::Unavailable { .. } => tonic::Code::Unavailable,
    }
}

fn create_code(e: &CreateError) -> tonic::Code {
    use tonic::Code;
    match e {
        CreateError::AlreadyExists(_) => Code::AlreadyExists,
        CreateError::Invalid(_) | CreateError::Order(_) => Code::InvalidArgument,
        CreateError::TooLarge { .. } | CreateError::DiskFull { .. } => Code::ResourceExhausted,
        CreateError::Unavailable { .. } => Code::Unavailable,
        CreateError::Io { .. } => Code::Internal,
    }
}

fn open_code(e: &OpenError) -> tonic::Code {
    match e {
        OpenError::NotFound(_) => tonic::Code::NotFound,
        OpenError::Corrupt { .. } => tonic::Code::DataLoss,
        OpenError::Unavailable { .. } => tonic::Code::Unavailable,
        OpenError::Read { .. } => tonic::Code::Internal,
    }
}

/// Gives transport-level rejections the codes of docs/protocol.md. tonic
/// answers a request message above the decoding limit with OutOfRange, and
/// one that does not decode with Internal, before any handler runs; the
/// protocol promises ResourceExhausted and InvalidArgument (OutOfRange
/// means pages past the end of a snapshot, Internal a server fault). Such
/// rejections are trailers-only responses, so the status is in the headers
/// (the message percent-encoded). Installed as a response layer on the
/// server.
pub fn fix_transport_codes(
    mut resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let headers = resp.headers_mut();
    let status = headers.get("grpc-status").map(|v| v.as_bytes().to_vec());
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    match status.as_deref() {
        Some(b"11") if is_too_large(&message) => {
            headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        }
        Some(b"13") if is_decode_error(&message) => {
            headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        }
        _ => {}
    }
    resp
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
