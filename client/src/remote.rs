//! Talking to a faultline server: connections tuned for each path, the
//! manifest, and verified page batches.
//!
//! A pager keeps two connections to its server: one for the `Fault` stream
//! and one for `Prefetch`, so urgent answers never queue behind bulk data in
//! one TCP stream (QEMU's postcopy-preempt lesson). [`Remote::connect`] opens
//! one; open two for the two paths.

use std::time::Duration;

use faultline_proto::codec::PageBatch;
use faultline_proto::pb::faultline_client::FaultlineClient;
use faultline_proto::{Manifest, ProtocolError, SnapshotId, pb};
use tonic::transport::{Channel, Endpoint};

/// HTTP/2 receive window per stream. The receiver's window is what limits a
/// server stream: with the 64 KiB default, a 1 MiB prefetch batch needs 16
/// window updates, each a round trip. Measured with `faultline-bench wire`
/// (docs/protocol.md).
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;

/// HTTP/2 receive window per connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Largest HTTP/2 frame accepted, which the server then sends: fewer frame
/// headers and wake-ups per batch. Measured with `faultline-bench wire`: 1.5x
/// the throughput of the 16 KiB default (docs/protocol.md).
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Largest message accepted: a manifest is 4 bytes of digest and a bit per
/// page (96 MiB: ~90 GiB snapshots of 4 KiB pages); page batches are at most
/// 16 MiB.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 96 << 20;

/// Largest message sent (upload chunks, working sets).
pub const MAX_ENCODING_MESSAGE_BYTES: usize = 32 << 20;

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 keepalive: detects a dead server on an idle connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Transport settings of a connection; the defaults are the constants
/// above. `None` leaves a setting to hyper's default. Benchmarks vary them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    /// Receive window per stream.
    pub stream_window: Option<u32>,
    /// Receive window per connection.
    pub connection_window: Option<u32>,
    /// Largest frame.
    pub max_frame: Option<u32>,
}

impl Default for Transport {
    fn default() -> Self {
        Self {
            stream_window: Some(STREAM_WINDOW_BYTES),
            connection_window: Some(CONNECTION_WINDOW_BYTES),
            max_frame: Some(MAX_FRAME_BYTES),
        }
    }
}

/// A call to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not a valid endpoint.
    #[error("{url:?} is not a server URL; use http://HOST:PORT ({source})")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// No connection could be made.
    #[error("cannot connect to {url}: {source}; is `faultline-server serve` running there?")]
    Connect {
        /// The server.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The server answered with an error.
    #[error("{call} failed: {} ({:?})", .status.message(), .status.code())]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// The server's status.
        status: tonic::Status,
    },
    /// The server sent something that is not valid.
    #[error("the server sent an invalid {what}: {source}")]
    Protocol {
        /// What was being received.
        what: &'static str,
        /// What is wrong with it.
        source: ProtocolError,
    },
}

impl RemoteError {
    /// A wrapper for `map_err` on a call.
    pub fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Rpc { call, status }
    }

    /// Whether retrying on a new connection may help (the server is down,
    /// restarting, or the connection broke), as opposed to an answer that
    /// will not change.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Rpc { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            Self::BadUrl { .. } | Self::Protocol { .. } => false,
        }
    }
}

/// One connection to a server.
#[derive(Clone, Debug)]
pub struct Remote {
    url: String,
    client: FaultlineClient<Channel>,
}

impl Remote {
    /// Connects to `url` (`http://HOST:PORT`) with the default transport.
    pub async fn connect(url: &str) -> Result<Self, RemoteError> {
        Self::connect_with(url, Transport::default()).await
    }

    /// Connects to `url` with `transport` settings.
    pub async fn connect_with(url: &str, transport: Transport) -> Result<Self, RemoteError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| RemoteError::BadUrl {
                url: url.to_owned(),
                source,
            })?
            // Nagle off: a fault request must leave at once.
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_INTERVAL)
            .initial_stream_window_size(transport.stream_window)
            .initial_connection_window_size(transport.connection_window)
            .max_frame_size(transport.max_frame);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| RemoteError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let client = FaultlineClient::new(channel)
            .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES);
        Ok(Self {
            url: url.to_owned(),
            client,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The generated client, for calls this type does not wrap.
    pub fn client(&self) -> FaultlineClient<Channel> {
        self.client.clone()
    }

    /// Fetches and validates the manifest of `id`.
    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest, RemoteError> {
        let m = self
            .client()
            .get_manifest(pb::GetManifestRequest {
                snapshot: id.to_string(),
            })
            .await
            .map_err(RemoteError::rpc("GetManifest"))?
            .into_inner();
        Manifest::try_from(m).map_err(|source| RemoteError::Protocol {
            what: "manifest",
            source,
        })
    }

    /// Opens a `Prefetch` stream; decode each batch with [`decode_batch`].
    pub async fn prefetch(
        &self,
        req: pb::PrefetchRequest,
    ) -> Result<tonic::Streaming<pb::PageBatch>, RemoteError> {
        Ok(self
            .client()
            .prefetch(req)
            .await
            .map_err(RemoteError::rpc("Prefetch"))?
            .into_inner())
    }
}

/// Decodes a batch of `manifest`'s snapshot: runs inside the snapshot,
/// decompressed to exactly their pages' bytes. Digests are checked by the
/// caller, page by page, before a page is used.
pub fn decode_batch(batch: pb::PageBatch, manifest: &Manifest) -> Result<PageBatch, RemoteError> {
    PageBatch::decode(batch, manifest.page_size, manifest.page_count).map_err(|source| {
        RemoteError::Protocol {
            what: "page batch",
            source,
        }
    })
}
