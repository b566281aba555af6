//! The lean transports, client side: the demand link's `Fault` stream
//! as length-delimited frames ([`faultline_proto::frame`]) on its own TCP
//! (or TLS) connection, without HTTP/2 (docs/protocol.md, "The lean fault
//! transport"). TLS uses the same options as gRPC connections (CA, client
//! certificate, domain).
//!
//! The link ([`super::link`]) keeps one state machine for both transports;
//! this module opens a lean session and moves its frames. The connection
//! starts with the magic, the `FaultHello` (the token, as gRPC's
//! `authorization` metadata would carry it) and the stream's `open`, in one
//! write; the server's first frame says whether the stream opened. A server
//! without the transport closes a connection that does not start with
//! HTTP/2's preface: that, before any frame, is [`Opened::Unsupported`], and
//! the link falls back to gRPC.
//!
//! A prefetch stream opens its own lean connection the same way
//! ([`open_prefetch`], docs/protocol.md "The lean prefetch transport"): the
//! prefetch magic, the hello and the `PrefetchRequest` in one write, then a
//! frame per batch, read whole into one buffer sized from its header, whose
//! runs' page bytes are slices of it.

use std::sync::Arc;
use std::time::Duration;

use faultline_proto::frame::{self, FrameError, FrameStream};
use faultline_proto::pb;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Shared;
use super::link::STALL_TIMEOUT;
use crate::remote::TlsOptions;

/// How long connecting the TCP socket may take: as for gRPC connections
/// ([`crate::remote::CONNECT_TIMEOUT`]).
const CONNECT_TIMEOUT: Duration = crate::remote::CONNECT_TIMEOUT;

/// A byte stream a lean session runs on: TCP, TLS over TCP (a Unix socket
/// fits the same way).
pub(crate) trait LeanIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> LeanIo for T {}

/// An open lean `Fault` stream.
pub(crate) struct LeanSession {
    io: FrameStream<Box<dyn LeanIo>>,
}

/// What opening a lean stream (or its connection) came to.
pub(crate) enum Opened<S = LeanSession> {
    /// The stream is open (the connection made).
    Session(S),
    /// The server does not offer the transport (or the URL is one it does
    /// not run on); why, for the log.
    Unsupported(String),
}

impl std::fmt::Debug for LeanSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeanSession")
    }
}

/// Opens a lean `Fault` stream on `url`, after checking a fail-over
/// server's manifest as the gRPC path does.
pub(crate) async fn open(shared: &Shared, url: &str) -> Result<Opened, String> {
    match connect(shared, url).await? {
        Opened::Session(io) => start(io, shared, url).await,
        Opened::Unsupported(why) => Ok(Opened::Unsupported(why)),
    }
}

/// Connects to `url` for a lean stream, after checking a fail-over server's
/// manifest as the gRPC path does: a Unix socket, TCP, or TLS over TCP,
/// with nothing sent yet.
async fn connect(shared: &Shared, url: &str) -> Result<Opened<Box<dyn LeanIo>>, String> {
    if let Some(path) = faultline_proto::unix::unix_path(url) {
        // A server on this host: the same frames on its Unix socket (no TLS
        // there, docs/security.md).
        shared
            .fleet
            .check_url(url, &shared.config.connect, &shared.manifest)
            .await
            .map_err(|e| e.to_string())?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(&path))
            .await
            .map_err(|_| format!("connecting to {url} took over {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        return Ok(Opened::Session(Box::new(stream)));
    }
    let (tls, authority) = if let Some(a) = url.strip_prefix("http://") {
        (false, a)
    } else if let Some(a) = url.strip_prefix("https://") {
        (true, a)
    } else {
        return Ok(Opened::Unsupported(format!(
            "the lean transports run on http://, https:// and unix:// URLs, not {url}"
        )));
    };
    let authority = authority.trim_end_matches('/');
    let opts = &shared.config.connect.tls;
    if tls && opts.identity.is_some() && opts.identity_pem.is_none() {
        return Ok(Opened::Unsupported(
            "the client certificate was given without its PEM (TlsOptions::identity_pem)".into(),
        ));
    }
    // A fail-over server must serve the manifest in use (crate::fleet).
    shared
        .fleet
        .check_url(url, &shared.config.connect, &shared.manifest)
        .await
        .map_err(|e| e.to_string())?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| format!("connecting to {url} took over {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    // Nagle off: a fault request must leave at once.
    tcp.set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY on the connection to {url}: {e}"))?;
    if !tls {
        return Ok(Opened::Session(Box::new(tcp)));
    }
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = opts.domain.as_deref().unwrap_or(host);
    let name = ServerName::try_from(name.to_owned())
        .map_err(|e| format!("{name:?} is not a name a TLS certificate can carry: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(opts)?));
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("the TLS handshake with {url} failed: {e}"))?;
    Ok(Opened::Session(Box::new(stream)))
}

/// The TLS client configuration of `opts`, as tonic builds it for gRPC
/// connections: the CA given (else the system's roots), the client
/// certificate if any. No ALPN: the magic after the handshake says what the
/// connection carries, as on plaintext (docs/protocol.md).
fn tls_config(opts: &TlsOptions) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca {
        Some(ca) => {
            for cert in CertificateDer::pem_slice_iter(ca.get_ref()) {
                let cert = cert.map_err(|e| format!("the CA certificate does not parse: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system root rustls cannot use is skipped, as tonic does.
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    match &opts.identity_pem {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the client certificate does not parse: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("the client key does not parse: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate is not usable: {e}"))
        }
    }
}

/// Sends the magic, the hello and the `open` on `io`, and reads the
/// server's verdict.
async fn start(io: Box<dyn LeanIo>, shared: &Shared, url: &str) -> Result<Opened, String> {
    let mut io = FrameStream::new(io, frame::MAX_ANSWER_FRAME_BYTES).reserving_whole_frames();
    let hello = hello(shared);
    let open = pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Open(pb::FaultOpen {
            snapshot: shared.config.snapshot.to_string(),
            compression: shared.config.compression.into(),
        })),
    };
    io.write_all_of(&frame::MAGIC, &[&hello, &open])
        .await
        .map_err(|e| format!("cannot write to {url}: {e}"))?;
    match io.read::<pb::FaultResponse>("a FaultResponse").await {
        Ok(Some(resp)) if resp.request_id == 0 => match resp.result {
            None => Ok(Opened::Session(LeanSession { io })),
            Some(pb::fault_response::Result::Error(e)) => Err(format!(
                "{url} refused the Fault stream: {} (code {})",
                e.message, e.code
            )),
            Some(pb::fault_response::Result::Pages(_)) => Err(format!(
                "{url} answered the Fault stream's `open` with pages"
            )),
        },
        Ok(Some(_)) => Err(format!(
            "{url} answered a request before the Fault stream's `open`"
        )),
        // Closed unanswered: a server that speaks only HTTP/2.
        Ok(None) => Ok(Opened::Unsupported(format!(
            "{url} closed the connection on the lean fault transport's greeting (a server \
             without it)"
        ))),
        Err(FrameError::Io(e)) if refused_greeting(&e) => Ok(Opened::Unsupported(format!(
            "{url} reset the connection on the lean fault transport's greeting (a server \
                 without it)"
        ))),
        Err(e) => Err(format!(
            "reading {url}'s answer to the Fault stream's open: {e}"
        )),
    }
}

/// The hello of every lean connection: the token, as gRPC's
/// `authorization` metadata would carry it.
fn hello(shared: &Shared) -> pb::FaultHello {
    pb::FaultHello {
        authorization: shared
            .config
            .connect
            .token
            .as_ref()
            .map(|t| t.authorization().to_owned())
            .unwrap_or_default(),
    }
}

/// Whether `e`, before any frame came back, is a server closing a
/// connection whose greeting it does not know (one without the transport).
fn refused_greeting(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
    )
}

/// An open lean `Prefetch` stream: the batches as the server sends them.
pub(crate) struct PrefetchSession {
    io: FrameStream<Box<dyn LeanIo>>,
    /// The first frame, read to learn that the server speaks the transport.
    first: Option<pb::PrefetchFrame>,
    /// The end (or an error) came: the stream is over.
    done: bool,
}

/// A failure of a lean prefetch stream: an in-band error from the server
/// (its code and message, as a gRPC status would carry them), or the
/// connection failing.
#[derive(Debug)]
pub(crate) enum PrefetchFailure {
    /// The server's in-band error.
    Server(tonic::Status),
    /// The connection broke or carried something else; why.
    Broken(String),
}

/// Opens a lean `Prefetch` stream of `req` on `url`: the magic, the hello
/// and the request in one write, then the server's first frame, which says
/// whether it speaks the transport (a server without it closes at the
/// magic: [`Opened::Unsupported`]).
pub(crate) async fn open_prefetch(
    shared: &Shared,
    url: &str,
    req: &pb::PrefetchRequest,
) -> Result<Opened<PrefetchSession>, PrefetchFailure> {
    let io = match connect(shared, url)
        .await
        .map_err(PrefetchFailure::Broken)?
    {
        Opened::Session(io) => io,
        Opened::Unsupported(why) => return Ok(Opened::Unsupported(why)),
    };
    let mut io = FrameStream::new(io, frame::MAX_ANSWER_FRAME_BYTES).reserving_whole_frames();
    let unsupported = || {
        Opened::Unsupported(format!(
            "{url} closed the connection on the lean prefetch transport's greeting (a server \
             without it)"
        ))
    };
    match io
        .write_all_of(&frame::PREFETCH_MAGIC, &[&hello(shared), req])
        .await
    {
        Ok(()) => {}
        Err(FrameError::Io(e)) if refused_greeting(&e) => return Ok(unsupported()),
        Err(e) => {
            return Err(PrefetchFailure::Broken(format!(
                "cannot write to {url}: {e}"
            )));
        }
    }
    match io.read::<pb::PrefetchFrame>("a PrefetchFrame").await {
        Ok(Some(first)) => Ok(Opened::Session(PrefetchSession {
            io,
            first: Some(first),
            done: false,
        })),
        Ok(None) => Ok(unsupported()),
        Err(FrameError::Io(e)) if refused_greeting(&e) => Ok(unsupported()),
        Err(e) => Err(PrefetchFailure::Broken(format!(
            "reading {url}'s first prefetch frame: {e}"
        ))),
    }
}

impl PrefetchSession {
    /// The next batch; `None` once the server sent the stream's end.
    /// Cancel-safe. An in-band error ends the stream with that error; a
    /// connection that closes before the end is broken.
    pub(crate) async fn next(&mut self) -> Option<Result<pb::PageBatch, PrefetchFailure>> {
        if self.done {
            return None;
        }
        let frame = match self.first.take() {
            Some(f) => Ok(Some(f)),
            None => self.io.read::<pb::PrefetchFrame>("a PrefetchFrame").await,
        };
        let broken = |why: String| Some(Err(PrefetchFailure::Broken(why)));
        let item = match frame {
            Ok(Some(f)) => match f.kind {
                Some(pb::prefetch_frame::Kind::Batch(b)) => Some(Ok(b)),
                Some(pb::prefetch_frame::Kind::End(_)) => None,
                Some(pb::prefetch_frame::Kind::Error(e)) => Some(Err(PrefetchFailure::Server(
                    tonic::Status::new(tonic::Code::from(e.code), e.message),
                ))),
                None => broken("the server sent a prefetch frame without a kind".into()),
            },
            Ok(None) => broken("the server closed the prefetch stream before its end".into()),
            Err(e) => broken(e.to_string()),
        };
        // Anything but a batch is the stream's last item.
        self.done = !matches!(item, Some(Ok(_)));
        item
    }
}

impl LeanSession {
    /// Sends one request. A write that cannot finish within
    /// [`STALL_TIMEOUT`] (a server that stopped reading) fails like a
    /// stalled answer.
    pub(crate) async fn send(&mut self, req: &pb::FaultRequest) -> Result<(), String> {
        let write = self.io.write(req);
        let mut write = std::pin::pin!(write);
        // A request fits the socket buffer at once but when the server has
        // stopped reading: only then is the (costly, per call) timer armed.
        if let std::task::Poll::Ready(r) = futures::poll!(write.as_mut()) {
            return r.map_err(|e| e.to_string());
        }
        match tokio::time::timeout(STALL_TIMEOUT, write).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the server has not taken a request for {STALL_TIMEOUT:?}"
            )),
        }
    }

    /// The next answer; `None` once the server closed the stream.
    /// Cancel-safe. An error for the stream as a whole (request id 0: the
    /// server refused a frame, and closes) is an error here.
    pub(crate) async fn next(&mut self) -> Option<Result<pb::FaultResponse, String>> {
        match self.io.read::<pb::FaultResponse>("a FaultResponse").await {
            Ok(Some(resp)) if resp.request_id == 0 => Some(Err(match resp.result {
                Some(pb::fault_response::Result::Error(e)) => e.message,
                _ => "the server sent an answer without a request id".into(),
            })),
            Ok(Some(resp)) => Some(Ok(resp)),
            Ok(None) => None,
            Err(e) => Some(Err(e.to_string())),
        }
    }
}
