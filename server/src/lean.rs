//! The lean fault transport, server side: a connection that starts with
//! [`frame::MAGIC`] instead of HTTP/2's preface carries one `Fault` stream
//! as length-delimited frames ([`faultline_proto::frame`]), answered on the
//! connection's own task (docs/protocol.md, "The lean fault transport").
//!
//! It is the gRPC `Fault` stream without HTTP/2: the same messages, the
//! token checked by the same [`Authenticator`] as the gRPC interceptor (the
//! `FaultHello` carries what gRPC's `authorization` metadata would), the
//! stream opened and each request answered by the same service code
//! ([`FaultlineService::open_fault`], `FaultSession::answer`), with the same
//! in-band errors and the same `--fault-concurrency`. The connection counts
//! against the server's connection limit like any other (the accept loop
//! holds its slot), its hello and `open` must arrive within the handshake
//! timeout, frames are bounded by [`frame::MAX_REQUEST_FRAME_BYTES`], and a
//! frame that is not one of this protocol gets an in-band error and closes
//! the connection. A vanished client is found by TCP keepalive (the role
//! HTTP/2 pings play for gRPC connections), set by the accept loop.
//!
//! A connection that starts with [`frame::PREFETCH_MAGIC`] carries one
//! `Prefetch` stream the same way ([`LeanServer::serve_prefetch`]; "The lean
//! prefetch transport"): the hello, the `PrefetchRequest`, checked and
//! planned by the same code as the gRPC call
//! ([`FaultlineService::open_prefetch`]: the token's rights, the prefetch
//! slots per client, the limits), then a frame per batch written by
//! vectored writes straight from the buffers the pages were read into, and
//! an end or an in-band error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use faultline_proto::frame::{self, BatchFrame, FrameError, FrameStream};
use faultline_proto::pb;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::{Access, Authenticator};
use crate::service::{FaultSession, FaultlineService};

/// Lean connections open now.
pub const LEAN_CONNECTIONS_OPEN: &str = "faultline_server_lean_connections_open";

/// A frame a prefetch client does not take within this long ends its
/// stream: a client that stopped reading gives back its prefetch slot and
/// connection. As long as the client's own stall timeout (5 s) many times
/// over: a reader busy installing a batch takes milliseconds.
pub const PREFETCH_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What serves lean connections: the service and the tokens.
#[derive(Clone, Debug)]
pub struct LeanServer {
    service: FaultlineService,
    auth: Arc<Authenticator>,
}

/// Why a lean connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum LeanError {
    /// The client sent no hello and `open` (or `PrefetchRequest`) within
    /// the handshake timeout.
    #[error("no hello and request within {0:?}")]
    Timeout(Duration),
    /// A prefetch client took no frame for [`PREFETCH_WRITE_TIMEOUT`].
    #[error("the client took no prefetch frame for {0:?}")]
    Stalled(Duration),
    /// Reading or writing a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The client closed the connection before its `open`.
    #[error("the client closed the connection before opening its stream")]
    Closed,
    /// The hello or `open` was refused (the client was told why).
    #[error("refused: {0}")]
    Refused(String),
}

impl LeanServer {
    /// Serves with `service`, checking tokens with `auth`.
    pub fn new(service: FaultlineService, auth: Arc<Authenticator>) -> Self {
        Self { service, auth }
    }

    /// Serves one lean connection whose [`frame::MAGIC`] has been read,
    /// until the client closes it, it breaks, or `stop` completes (the
    /// server is shutting down: the answers in flight go out first).
    pub async fn serve<S>(
        &self,
        io: S,
        peer: Option<SocketAddr>,
        handshake_timeout: Duration,
        stop: impl Future<Output = ()>,
    ) -> Result<(), LeanError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let _open = OpenGauge::new();
        let mut io = FrameStream::new(io, frame::MAX_REQUEST_FRAME_BYTES);
        let opened = tokio::time::timeout(handshake_timeout, self.open(&mut io, peer)).await;
        let refusal = |e: pb::Error| frame::refused(e.code, e.message);
        let session = settle(&mut io, opened, handshake_timeout, refusal).await?;
        io.write(&frame::opened()).await?;
        self.answer_all(&mut io, session, stop).await
    }

    /// Serves one lean prefetch connection whose [`frame::PREFETCH_MAGIC`]
    /// has been read: the hello and the request within `handshake_timeout`,
    /// then the batches until the stream ends, the client goes away, or
    /// `stop` completes (the server is shutting down: the client is told,
    /// in-band, to retry).
    pub async fn serve_prefetch<S>(
        &self,
        io: S,
        peer: Option<SocketAddr>,
        handshake_timeout: Duration,
        stop: impl Future<Output = ()>,
    ) -> Result<(), LeanError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let _open = OpenGauge::new();
        let mut io = FrameStream::new(io, frame::MAX_PREFETCH_REQUEST_FRAME_BYTES);
        let t = crate::metrics::Request::start("prefetch");
        let opened = tokio::time::timeout(handshake_timeout, async {
            let (access, req) = self.prefetch_request(&mut io, peer).await?;
            let client = access.identity(peer.map(|a| a.ip())).to_string();
            self.service
                .open_prefetch(access, client, req)
                .await
                .map_err(|e| Rejection::failed(&t, e))
        })
        .await;
        let refusal = |e: pb::Error| frame::prefetch_error(e.code, e.message);
        let start = settle(&mut io, opened, handshake_timeout, refusal).await?;
        drop(t);
        let mut producer = start.start();
        let mut stop = std::pin::pin!(stop);
        loop {
            let next = tokio::select! {
                next = producer.next() => next,
                () = &mut stop => {
                    let e = crate::Error::Unavailable.to_pb();
                    let e = frame::prefetch_error(e.code, e.message);
                    let _ = tokio::time::timeout(PREFETCH_WRITE_TIMEOUT, io.write(&e)).await;
                    return Ok(());
                }
            };
            let last = match next {
                Some(Ok(batch)) => {
                    let frame = BatchFrame::new(batch);
                    within_write_timeout(io.write_batch(&frame)).await?;
                    continue;
                }
                Some(Err(e)) => {
                    let e = e.to_pb();
                    frame::prefetch_error(e.code, e.message)
                }
                None => frame::prefetch_end(),
            };
            return within_write_timeout(io.write(&last)).await;
        }
    }

    /// Reads a prefetch connection's hello and request, and checks the token.
    async fn prefetch_request<S>(
        &self,
        io: &mut FrameStream<S>,
        peer: Option<SocketAddr>,
    ) -> Result<(Access, pb::PrefetchRequest), Rejection>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let access = self.hello(io, peer).await?;
        let req: pb::PrefetchRequest = io
            .read("a PrefetchRequest")
            .await
            .map_err(Rejection::frame)?
            .ok_or(Rejection::closed())?;
        Ok((access, req))
    }

    /// Reads the hello and checks its token.
    async fn hello<S>(
        &self,
        io: &mut FrameStream<S>,
        peer: Option<SocketAddr>,
    ) -> Result<Access, Rejection>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let hello: pb::FaultHello = io
            .read("a FaultHello")
            .await
            .map_err(Rejection::frame)?
            .ok_or(Rejection::closed())?;
        self.authenticate(&hello).map_err(|status| {
            tracing::debug!(?peer, "lean connection refused: {}", status.message());
            Rejection::refused(status.code() as i32, status.message().to_owned())
        })
    }

    /// Reads the hello and the `open`, checks the token and opens the
    /// stream's session.
    async fn open<S>(
        &self,
        io: &mut FrameStream<S>,
        peer: Option<SocketAddr>,
    ) -> Result<Arc<FaultSession>, Rejection>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let t = crate::metrics::Request::start("fault_open");
        let access = self.hello(io, peer).await?;
        let first: pb::FaultRequest = io
            .read("a FaultRequest")
            .await
            .map_err(Rejection::frame)?
            .ok_or(Rejection::closed())?;
        let open = match first.kind {
            Some(pb::fault_request::Kind::Open(open)) => open,
            _ => {
                let e =
                    crate::Error::Sequence("the first message of a Fault stream must be `open`");
                return Err(Rejection::failed(&t, e));
            }
        };
        self.service
            .open_fault(access, open)
            .await
            .map_err(|e| Rejection::failed(&t, e))
    }

    /// The token of `hello`, checked as the gRPC interceptor checks the
    /// `authorization` metadata.
    fn authenticate(&self, hello: &pb::FaultHello) -> Result<Access, tonic::Status> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if !hello.authorization.is_empty() {
            let value = hello.authorization.parse().map_err(|_| {
                tonic::Status::unauthenticated(
                    "the `authorization` of the hello must be `Bearer TOKEN` in printable ASCII",
                )
            })?;
            metadata.insert("authorization", value);
        }
        self.auth.authenticate(&metadata)
    }

    /// Answers requests until the client closes the connection: up to
    /// `--fault-concurrency` at once, each written as soon as it is ready
    /// (a cold page does not hold up the others), all on this task. New
    /// requests are read only while there is room, so a client that does
    /// not read its answers holds at most that many.
    async fn answer_all<S>(
        &self,
        io: &mut FrameStream<S>,
        session: Arc<FaultSession>,
        stop: impl Future<Output = ()>,
    ) -> Result<(), LeanError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let room = self.service.fault_concurrency();
        let mut inflight = FuturesUnordered::new();
        let mut stop = std::pin::pin!(stop);
        let mut reading = true;
        loop {
            tokio::select! {
                // Answers first: the one just asked is usually ready at once.
                biased;
                Some(answer) = inflight.next(), if !inflight.is_empty() => {
                    io.write(&answer).await?;
                }
                read = io.read::<pb::FaultRequest>("a FaultRequest"),
                    if reading && inflight.len() < room =>
                {
                    match read {
                        Ok(Some(req)) => {
                            let session = session.clone();
                            inflight.push(async move { session.answer(req).await });
                        }
                        // The client is done.
                        Ok(None) => reading = false,
                        Err(e) if e.is_malformed() => {
                            let msg = format!("{e}; closing the connection");
                            let _ = io.write(&frame::refused(tonic::Code::InvalidArgument as i32, msg)).await;
                            return Err(e.into());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                () = &mut stop, if reading => reading = false,
            }
            if !reading && inflight.is_empty() {
                return Ok(());
            }
        }
    }
}

/// A refused hello or request: what to tell the client (in the frame its
/// transport answers with), and the error.
struct Rejection {
    answer: Option<pb::Error>,
    error: LeanError,
}

impl Rejection {
    fn refused(code: i32, message: String) -> Self {
        Self {
            answer: Some(pb::Error {
                code,
                message: message.clone(),
            }),
            error: LeanError::Refused(message),
        }
    }

    /// Refused by the service: counted as a failed `rpc`.
    fn failed(t: &crate::metrics::Request, e: crate::Error) -> Self {
        let status = t.fail(e);
        Self::refused(status.code() as i32, status.message().to_owned())
    }

    fn frame(e: FrameError) -> Self {
        let answer = e.is_malformed().then(|| pb::Error {
            code: tonic::Code::InvalidArgument as i32,
            message: format!("{e}; closing the connection"),
        });
        Self {
            answer,
            error: e.into(),
        }
    }

    fn closed() -> Self {
        Self {
            answer: None,
            error: LeanError::Closed,
        }
    }
}

/// What a connection's hello and first request came to within the
/// handshake timeout: the opened stream, or the error that ends the
/// connection, after telling the client why in the frame `refusal` makes.
async fn settle<S, T, M>(
    io: &mut FrameStream<S>,
    opened: Result<Result<T, Rejection>, tokio::time::error::Elapsed>,
    handshake_timeout: Duration,
    refusal: impl FnOnce(pb::Error) -> M,
) -> Result<T, LeanError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    M: prost::Message,
{
    match opened {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(Rejection { answer, error })) => {
            if let Some(e) = answer {
                // Best effort: the client may have gone already.
                let _ = io.write(&refusal(e)).await;
            }
            Err(error)
        }
        Err(_) => Err(LeanError::Timeout(handshake_timeout)),
    }
}

/// `write`, failed as [`LeanError::Stalled`] if the client takes none of it
/// for [`PREFETCH_WRITE_TIMEOUT`].
async fn within_write_timeout(
    write: impl Future<Output = Result<(), FrameError>>,
) -> Result<(), LeanError> {
    match tokio::time::timeout(PREFETCH_WRITE_TIMEOUT, write).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(LeanError::Stalled(PREFETCH_WRITE_TIMEOUT)),
    }
}

/// Counts a lean connection in [`LEAN_CONNECTIONS_OPEN`] while it lives.
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        metrics::gauge!(LEAN_CONNECTIONS_OPEN).increment(1.0);
        Self
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!(LEAN_CONNECTIONS_OPEN).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;
    use crate::store::SnapshotStore;
    use faultline_proto::{PageSize, SnapshotId};

    /// A prefetch of every page of a 256-page snapshot, one page per batch.
    fn request() -> pb::PrefetchRequest {
        pb::PrefetchRequest {
            snapshot: "s".into(),
            order: pb::PrefetchOrder::Ranges as i32,
            ranges: vec![pb::PageRange {
                start: 0,
                count: 256,
            }],
            max_batch_bytes: 4096,
            ..Default::default()
        }
    }

    /// A server that stops mid-prefetch ends the stream with an in-band Unavailable, never with
    /// its end frame, and the connection's task returns.
    #[tokio::test]
    async fn stopping_ends_a_lean_prefetch_with_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path().join("store")).unwrap());
        let image: Vec<u8> = (0..256 * 4096u32).map(|i| (i / 4096 + 1) as u8).collect();
        let file = dir.path().join("img");
        std::fs::write(&file, &image).unwrap();
        let id = SnapshotId::new("s").unwrap();
        crate::import::import_file(&*store, id, PageSize::Size4K, &[], &file, |_| {}).unwrap();
        let service = FaultlineService::new(store as Arc<dyn SnapshotStore>);
        let lean = LeanServer::new(service, Arc::new(Authenticator::open()));
        // A narrow pipe: the server can only write as fast as the test reads.
        let (client, server_io) = tokio::io::duplex(256);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.await;
            };
            lean.serve_prefetch(server_io, None, Duration::from_secs(10), stop)
                .await
        });
        let mut io = FrameStream::new(client, frame::MAX_ANSWER_FRAME_BYTES);
        io.write_all_of(&[], &[&pb::FaultHello::default(), &request()])
            .await
            .unwrap();
        let first: pb::PrefetchFrame = io.read("a frame").await.unwrap().unwrap();
        assert!(matches!(
            first.kind,
            Some(pb::prefetch_frame::Kind::Batch(_))
        ));
        stop.send(()).unwrap();
        let mut batches = 1;
        let last = loop {
            let f: pb::PrefetchFrame = io.read("a frame").await.unwrap().unwrap();
            match f.kind {
                Some(pb::prefetch_frame::Kind::Batch(_)) => batches += 1,
                other => break other,
            }
        };
        let Some(pb::prefetch_frame::Kind::Error(e)) = last else {
            panic!("not ended with an error after {batches} batches: {last:?}");
        };
        assert_eq!(e.code, tonic::Code::Unavailable as i32, "{e:?}");
        assert!(e.message.contains("shutting down"), "{e:?}");
        assert!(batches < 256, "{batches}");
        serving.await.unwrap().unwrap();
    }
}
