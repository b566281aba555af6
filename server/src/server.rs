//! Running the gRPC server: transport tuning, health, reflection, graceful
//! shutdown.
//!
//! [`run`] takes a bound listener and a shutdown future, so tests start a
//! server on `127.0.0.1:0` in-process and the binary only parses arguments.

use std::sync::Arc;
use std::time::Duration;

use faultline_proto::pb::faultline_server::FaultlineServer;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::limits::Limits;
use crate::readiness::Readiness;
use crate::service::FaultlineService;
use crate::store::SnapshotStore;

/// HTTP/2 receive window per stream on the server, which paces uploads
/// (`CreateSnapshot`). The same value as the client's receive window, whose
/// effect on bulk streams is measured with `faultline-bench wire`
/// (docs/protocol.md: 1.8x hyper's default, 5.5x the protocol's 64 KiB).
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;

/// HTTP/2 connection window: room for the stream windows of a fault stream
/// and a prefetch stream sharing one connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// HTTP/2 frame size the server accepts (the protocol's maximum is 16 MiB -
/// 1); it paces uploads. The client's setting, which paces prefetch, was
/// measured with `faultline-bench wire`: 1 MiB frames moved 1.5x the bytes of
/// the 16 KiB default (docs/protocol.md); single-page faults do not notice.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Largest message the server decodes: an upload chunk or a working set.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 32 << 20;

/// Largest message the server encodes: a manifest carries 4 bytes of digest
/// and one bit of zero map per page, so 96 MiB covers snapshots up to about
/// 90 GiB at 4 KiB pages (any size at 2 MiB pages).
pub const MAX_ENCODING_MESSAGE_BYTES: usize = 96 << 20;

/// Keepalive pings on idle connections, so a vanished client's streams are
/// torn down instead of holding their buffers forever.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a keepalive ping may go unanswered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from the descriptor set.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("the gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `store` on `listener` until `shutdown` completes, then stops
/// accepting and lets streams in flight finish.
pub async fn run(
    listener: tokio::net::TcpListener,
    store: Arc<dyn SnapshotStore>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    run_with_limits(listener, store, Limits::default(), shutdown).await
}

/// [`run`] within `limits`.
pub async fn run_with_limits(
    listener: tokio::net::TcpListener,
    store: Arc<dyn SnapshotStore>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    run_with_readiness(listener, store, limits, Readiness::always(), shutdown).await
}

/// [`run_with_limits`], with gRPC health NOT_SERVING while `readiness` is
/// not ready (see [`crate::readiness`]).
pub async fn run_with_readiness(
    listener: tokio::net::TcpListener,
    store: Arc<dyn SnapshotStore>,
    limits: Limits,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    readiness.drive_health::<FaultlineServer<FaultlineService>>(health);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(faultline_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = FaultlineService::with_limits(store, limits);
    // In the background: a store that does not answer yet (an object store
    // starting) must not hold up serving health and readiness.
    tokio::spawn({
        let service = service.clone();
        async move { service.count_snapshots().await }
    });
    let faultline = FaultlineServer::new(service)
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES);

    // Nagle's algorithm must be off: with it, a small answer waits for the
    // peer's delayed ACK (measured: 44 ms per 4 KiB unary call).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            crate::error::fix_transport_codes as fn(_) -> _,
        ))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(faultline)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// A server running on a background task, for tests, benchmarks and
/// embedding.
#[derive(Debug)]
pub struct ServerHandle {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl ServerHandle {
    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Its URL, `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections and waits until the streams in flight
    /// have finished.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task panicked")
    }

    /// Asks the server to stop without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the server task to end.
    pub async fn join(mut self) -> Result<(), ServeError> {
        (&mut self.task).await.expect("server task panicked")
    }
}

/// Binds `addr` (use port 0 for any free port) and serves `store` on a
/// background task of the current runtime.
pub async fn spawn(
    addr: std::net::SocketAddr,
    store: Arc<dyn SnapshotStore>,
) -> std::io::Result<ServerHandle> {
    spawn_with_limits(addr, store, Limits::default()).await
}

/// [`spawn`] within `limits`.
pub async fn spawn_with_limits(
    addr: std::net::SocketAddr,
    store: Arc<dyn SnapshotStore>,
    limits: Limits,
) -> std::io::Result<ServerHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run_with_limits(listener, store, limits, async move {
        let _ = stopped.await;
    }));
    Ok(ServerHandle {
        addr,
        stop: Some(stop),
        task,
    })
}
