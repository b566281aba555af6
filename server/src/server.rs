//! Running the gRPC server: transport tuning and limits, TLS, tokens,
//! health, reflection, graceful shutdown.
//!
//! [`Server`] takes its [`ServeOptions`] (TLS files, tokens file, limits),
//! then serves a bound listener until a shutdown future completes, so tests
//! start a server on `127.0.0.1:0` in-process and the binary only parses
//! arguments. Connections are accepted by our own loop ([`accept_loop`]):
//! it caps their number, sets `TCP_NODELAY`, runs the TLS handshake with the
//! configuration current at that moment (so certificates reload without
//! dropping anything) and gives each connection [`HANDSHAKE_TIMEOUT`] to
//! finish TLS and send HTTP/2's preface. A connection that sends the magic of
//! a lean transport (fault or prefetch) instead is served by
//! [`crate::lean`] on the same port.
//!
//! The same loop serves a Unix socket ([`Server::run_unix`],
//! `--listen unix:///PATH`), for a server on the VM's own host: gRPC and the
//! lean transport as on TCP (tokens and limits the same, no TLS), each
//! client's credentials (`SO_PEERCRED`) logged, and the page-file handover
//! ([`crate::page_file`]) on connections that ask for it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use faultline_proto::frame;
use faultline_proto::pb::faultline_server::FaultlineServer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::service::interceptor::InterceptedService;

use crate::auth::{AuthInterceptor, Authenticator, TokensError};
use crate::lean::LeanServer;
use crate::limits::Limits;
use crate::page_file::PageFiles;
use crate::readiness::Readiness;
use crate::service::FaultlineService;
use crate::store::SnapshotStore;
use crate::tls::{TlsError, TlsFiles, TlsReloader};

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

/// Most connections served at once. Each costs the HTTP/2 state of its
/// streams and what its flow-control windows let a client make the server
/// buffer; a fleet of pagers uses two per VM. A connection past the limit is
/// closed at once (the client sees UNAVAILABLE and retries) instead of
/// waiting unseen in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 1024;

/// Most concurrent streams on one connection (HTTP/2 SETTINGS). A pager
/// needs one per path (fault, prefetch); a bulk client a few. hyper's
/// default is 200; fewer bound what one connection can make the server hold.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// How long a new connection may take to finish its TLS handshake and send
/// HTTP/2's connection preface. A client that opens a socket and sends
/// nothing (or dribbles its handshake) holds a connection slot only this
/// long; an HTTP/2 client sends its preface at once.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest header block (metadata) of one request: tokens and a few
/// metadata entries fit in far less; this bounds what a request's headers
/// cost before any handler runs.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// Connections open now (past their handshake). Named here, where the
/// accept loop keeps it, in the style of [`crate::metrics`].
pub const CONNECTIONS_OPEN: &str = "faultline_server_connections_open";

/// Connections closed before they were served, by `reason`: `limit` (over
/// [`MAX_CONNECTIONS`]), `handshake` (TLS failed or not HTTP/2), `timeout`
/// (no handshake and preface within [`HANDSHAKE_TIMEOUT`]).
pub const CONNECTIONS_REFUSED: &str = "faultline_server_connections_refused_total";

/// HTTP/2's connection preface, the first bytes every client sends.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long the accept loop pauses when the process is out of file
/// descriptors, instead of spinning on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Connection-level limits; the defaults are the constants above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportLimits {
    /// [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// [`MAX_STREAMS_PER_CONNECTION`].
    pub max_streams_per_connection: u32,
    /// [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// [`KEEPALIVE_INTERVAL`].
    pub keepalive_interval: Duration,
    /// [`KEEPALIVE_TIMEOUT`].
    pub keepalive_timeout: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            max_streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_timeout: KEEPALIVE_TIMEOUT,
        }
    }
}

/// How a server is exposed: TLS, tokens, reflection, limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// Serve TLS with these files; plaintext if `None`.
    pub tls: Option<TlsFiles>,
    /// Require tokens from this file on every Faultline RPC; none if `None`.
    pub tokens: Option<PathBuf>,
    /// Serve gRPC reflection (the schema, never data; open like health).
    pub reflection: bool,
    /// Allow plaintext on an address other than loopback.
    pub insecure_plaintext: bool,
    /// Allow serving without tokens on an address other than loopback.
    pub insecure_no_auth: bool,
    /// Connection limits.
    pub limits: TransportLimits,
    /// The service's limits (`crate::limits`): image sizes, uploads,
    /// prefetch streams, working sets, fault concurrency.
    pub service_limits: Limits,
}

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from the descriptor set.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("the gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS files are not usable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The tokens file is not usable.
    #[error(transparent)]
    Tokens(#[from] TokensError),
    /// The listener's address could not be read.
    #[error("cannot read the listening address: {0}")]
    Addr(std::io::Error),
    /// The Unix socket could not be bound.
    #[error(transparent)]
    Unix(#[from] faultline_proto::unix::BindError),
    /// TLS asked for on a Unix socket.
    #[error(
        "TLS is not served on a Unix socket ({0}): the socket never leaves this host, and who may          connect is the socket file's permissions (mode 0600, the server's user); drop          --tls-cert/--tls-key, or listen on TCP for TLS"
    )]
    TlsOnUnix(PathBuf),
    /// Asked to serve beyond loopback without TLS or tokens, and without the
    /// flag that allows it.
    #[error(
        "refusing to serve on {addr} without {missing}: anyone who can reach it could {risk}. \
         {fix}, or listen on 127.0.0.1 / [::1] only"
    )]
    Exposed {
        /// The address.
        addr: SocketAddr,
        /// "TLS" or "tokens".
        missing: &'static str,
        /// What that would let others do.
        risk: &'static str,
        /// How to allow it.
        fix: &'static str,
    },
}

/// Where `faultline-server serve --listen` listens: a TCP address
/// (`127.0.0.1:7070`) or a Unix socket (`unix:///run/faultline.sock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket's path.
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = faultline_proto::unix::unix_path(s) {
            if !path.is_absolute() {
                return Err(format!(
                    "{s:?}: a Unix socket needs an absolute path, as in unix:///run/faultline.sock"
                ));
            }
            return Ok(Self::Unix(path));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{s:?} is neither HOST:PORT (127.0.0.1:7070) nor unix:///PATH"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "{}{}", faultline_proto::unix::UNIX_SCHEME, p.display()),
        }
    }
}

/// Whether `addr` can only be reached from this machine.
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Refuses to expose a server beyond loopback without TLS and tokens, unless
/// the options say so explicitly; call it before binding.
pub fn check_exposure(addr: SocketAddr, opts: &ServeOptions) -> Result<(), ServeError> {
    if is_loopback(addr) {
        return Ok(());
    }
    if opts.tls.is_none() && !opts.insecure_plaintext {
        return Err(ServeError::Exposed {
            addr,
            missing: "TLS",
            risk: "read guest memory and tokens off the wire",
            fix: "Pass --tls-cert and --tls-key (or --insecure-plaintext on a network you trust)",
        });
    }
    if opts.tokens.is_none() && !opts.insecure_no_auth {
        return Err(ServeError::Exposed {
            addr,
            missing: "tokens",
            risk: "read every snapshot and upload new ones",
            fix: "Pass --tokens FILE (made with `faultline-server token new`), or \
                  --insecure-no-auth on a network you trust",
        });
    }
    Ok(())
}

/// Renews a running server's certificates and tokens from their files
/// (what SIGHUP does). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Reloader {
    tls: Option<Arc<TlsReloader>>,
    auth: Arc<Authenticator>,
}

/// What a reload renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reloaded {
    /// Whether TLS material was reloaded (false when serving plaintext).
    pub tls: bool,
    /// Tokens now accepted (None when tokens are not required).
    pub tokens: Option<usize>,
}

/// A reload failed in part; what failed kept its old state.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ReloadError {
    /// Why the TLS files were not taken, if they were not.
    pub tls: Option<Box<TlsError>>,
    /// Why the tokens file was not taken, if it was not.
    pub tokens: Option<Box<TokensError>>,
}

impl ReloadError {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.tls {
            parts.push(format!("{e}; still serving the previous certificate"));
        }
        if let Some(e) = &self.tokens {
            parts.push(format!("{e}; still accepting the previous tokens"));
        }
        parts.join("; and ")
    }
}

impl Reloader {
    /// Reads the TLS files and the tokens file again. Each part that loads is
    /// used for new connections and requests at once; a part that fails keeps
    /// what it had, and the error says why. Connections already open are not
    /// touched.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let tls = self.tls.as_ref().map(|t| t.reload()).transpose();
        let tokens = if self.auth.required() {
            self.auth.reload().map(Some)
        } else {
            Ok(None)
        };
        match (tls, tokens) {
            (Ok(tls), Ok(tokens)) => Ok(Reloaded {
                tls: tls.is_some(),
                tokens,
            }),
            (tls, tokens) => Err(ReloadError {
                tls: tls.err().map(Box::new),
                tokens: tokens.err().map(Box::new),
            }),
        }
    }
}

/// A server, its TLS and tokens loaded, ready to serve a listener.
#[derive(Debug)]
pub struct Server {
    store: Arc<dyn SnapshotStore>,
    /// Built with the server, so /metrics shows its limits from the start.
    service: FaultlineService,
    opts: ServeOptions,
    tls: Option<Arc<TlsReloader>>,
    auth: Arc<Authenticator>,
    /// gRPC health follows it (always ready unless [`Server::with_readiness`]).
    readiness: Readiness,
}

impl Server {
    /// Loads the TLS files and the tokens file of `opts`; fails if either is
    /// not usable.
    pub fn new(store: Arc<dyn SnapshotStore>, opts: ServeOptions) -> Result<Self, ServeError> {
        let tls = opts
            .tls
            .clone()
            .map(TlsReloader::new)
            .transpose()?
            .map(Arc::new);
        let auth = Arc::new(match &opts.tokens {
            Some(path) => Authenticator::from_file(path.clone())?,
            None => Authenticator::open(),
        });
        let service = FaultlineService::with_limits(store.clone(), opts.service_limits.clone());
        Ok(Self {
            store,
            service,
            opts,
            tls,
            auth,
            readiness: Readiness::always(),
        })
    }

    /// Reports gRPC health NOT_SERVING while `readiness` is not ready (see
    /// [`crate::readiness`]).
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// The handle that reloads certificates and tokens.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tls: self.tls.clone(),
            auth: self.auth.clone(),
        }
    }

    /// How it is exposed, for the start-up log line.
    pub fn describe_security(&self) -> String {
        let tls = match &self.opts.tls {
            Some(f) if f.client_ca.is_some() => "TLS with client certificates (mutual TLS)",
            Some(_) => "TLS",
            None => "plaintext",
        };
        if self.auth.required() {
            format!("{tls}, tokens required: {} known", self.auth.count())
        } else {
            format!("{tls}, no tokens")
        }
    }

    /// Serves `listener` until `shutdown` completes, then stops accepting
    /// and lets streams in flight finish.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        self.serve(Listener::Tcp(listener), shutdown).await
    }

    /// Serves the Unix socket `socket` (bound with
    /// [`faultline_proto::unix::bind`]) until `shutdown` completes, like
    /// [`Server::run`]; the socket file is removed when serving ends. TLS is
    /// refused ([`ServeError::TlsOnUnix`]).
    pub async fn run_unix(
        self,
        mut socket: faultline_proto::unix::UnixSocket,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        if self.opts.tls.is_some() {
            return Err(ServeError::TlsOnUnix(socket.path().to_owned()));
        }
        let std_listener = socket.take_listener();
        std_listener
            .set_nonblocking(true)
            .map_err(ServeError::Addr)?;
        let listener =
            tokio::net::UnixListener::from_std(std_listener).map_err(ServeError::Addr)?;
        let page_files = PageFiles {
            store: self.store.clone(),
            auth: self.auth.clone(),
        };
        let served = self
            .serve(Listener::Unix(listener, Arc::new(page_files)), shutdown)
            .await;
        // Removes the socket file (and releases its lock) now that nothing
        // accepts on it.
        drop(socket);
        served
    }

    async fn serve(
        self,
        listener: Listener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        match &listener {
            Listener::Tcp(tcp) => {
                let addr = tcp.local_addr().map_err(ServeError::Addr)?;
                check_exposure(addr, &self.opts)?;
                if !is_loopback(addr) {
                    if self.opts.tls.is_none() {
                        tracing::warn!(
                            "--insecure-plaintext: serving plaintext on {addr}; pages and tokens cross \
                             the network unencrypted"
                        );
                    }
                    if !self.auth.required() {
                        tracing::warn!(
                            "--insecure-no-auth: serving without tokens on {addr}; anyone who reaches it \
                             may read every snapshot and upload new ones"
                        );
                    }
                } else if self.opts.tls.is_none() && !self.auth.required() {
                    tracing::info!(
                        "no TLS and no tokens: listening on loopback ({addr}) only; to serve a network, \
                         pass --tls-cert/--tls-key and --tokens"
                    );
                }
            }
            // Only processes on this host reach a Unix socket, and only those
            // the socket file's mode (0600) lets connect: not network
            // exposure, so neither TLS nor tokens are demanded.
            Listener::Unix(..) if !self.auth.required() => tracing::info!(
                "no tokens on the Unix socket: every process of this user (the socket is mode \
                 0600) may read every snapshot; pass --tokens to require them"
            ),
            Listener::Unix(..) => {}
        }
        if self.auth.required() && self.auth.count() == 0 {
            tracing::warn!(
                "the tokens file lists no token: every call will be refused; add one with \
                 `faultline-server token new` and send SIGHUP"
            );
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        self.readiness
            .drive_health::<FaultlineServer<FaultlineService>>(health);
        let reflection = if self.opts.reflection {
            Some(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(faultline_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1()?,
            )
        } else {
            None
        };
        let service = self.service;
        // The lean fault transport shares the port, the service and the tokens.
        let lean = Arc::new(LeanServer::new(service.clone(), self.auth.clone()));
        // In the background: a store that does not answer yet (an object
        // store starting) must not hold up serving health and readiness.
        tokio::spawn({
            let service = service.clone();
            async move { service.count_snapshots().await }
        });
        let faultline = InterceptedService::new(
            FaultlineServer::new(service)
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES),
            AuthInterceptor::new(self.auth),
        );

        let limits = self.opts.limits;
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = AbortOnDrop(tokio::spawn(accept_loop(
            listener, self.tls, lean, limits, tx,
        )));
        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
        tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                crate::error::fix_transport_codes as fn(_) -> _,
            ))
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .max_concurrent_streams(limits.max_streams_per_connection)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .add_service(health_service)
            .add_optional_service(reflection)
            .add_service(faultline)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        drop(acceptor);
        Ok(())
    }
}

/// Serves `store` on `listener` without TLS or tokens (loopback only), with
/// reflection, until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    store: Arc<dyn SnapshotStore>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let opts = ServeOptions {
        reflection: true,
        ..ServeOptions::default()
    };
    Server::new(store, opts)?.run(listener, shutdown).await
}

/// Connections that finished their handshake, waiting for tonic to take
/// them: a few, as tonic takes each at once.
const ACCEPTED_QUEUE: usize = 16;

/// Aborts a task when dropped (the accept loop, when serving ends early).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the server accepts connections on.
enum Listener {
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, and what its page-file requests need.
    Unix(tokio::net::UnixListener, Arc<PageFiles>),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Io, Peer)> {
        match self {
            Self::Tcp(l) => {
                let (tcp, addr) = l.accept().await?;
                // Nagle's algorithm must be off: with it, a small answer
                // waits for the peer's delayed ACK (measured: 44 ms per 4 KiB
                // unary call).
                tcp.set_nodelay(true)?;
                Ok((Io::Plain(tcp), Peer::Tcp(addr)))
            }
            Self::Unix(l, _) => {
                let (unix, _) = l.accept().await?;
                let cred = unix.peer_cred().ok();
                Ok((
                    Io::Unix(unix),
                    Peer::Unix {
                        pid: cred.and_then(|c| c.pid()),
                        uid: cred.map(|c| c.uid()),
                    },
                ))
            }
        }
    }

    fn page_files(&self) -> Option<Arc<PageFiles>> {
        match self {
            Self::Tcp(_) => None,
            Self::Unix(_, p) => Some(p.clone()),
        }
    }
}

/// Who connected: a TCP address, or a Unix socket's peer credentials
/// (`SO_PEERCRED`, what the kernel says of the connecting process).
#[derive(Clone, Copy, Debug)]
enum Peer {
    Tcp(SocketAddr),
    Unix { pid: Option<i32>, uid: Option<u32> },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix { pid, uid } => {
                f.write_str("unix peer")?;
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                if let Some(uid) = uid {
                    write!(f, " uid {uid}")?;
                }
                Ok(())
            }
        }
    }
}

/// Accepts connections, within the connection limit, and hands each to
/// tonic once its handshake (TLS, then HTTP/2's preface) is done; on a Unix
/// socket, a connection that asks for a page file is answered here instead.
/// Ends, and closes the listening socket, when tonic stops taking
/// connections.
async fn accept_loop(
    listener: Listener,
    tls: Option<Arc<TlsReloader>>,
    lean: Arc<LeanServer>,
    limits: TransportLimits,
    tx: mpsc::Sender<std::io::Result<Conn>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Dropped when this loop ends (the server stops): lean connections then
    // finish the answers in flight and close, as gRPC streams do.
    let (_stopping, stopped) = tokio::sync::watch::channel(());
    let mut last_full_warning: Option<Instant> = None;
    let page_files = listener.page_files();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let (io, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) persists until a
                // connection closes: pause rather than spin. Others (a peer
                // that reset before we accepted, TCP_NODELAY refused)
                // concern that peer only.
                tracing::warn!("accepting a connection failed: {e}");
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    "refusing connections: {} open, the limit (--max-connections)",
                    limits.max_connections
                );
                last_full_warning = Some(Instant::now());
            }
            metrics::counter!(CONNECTIONS_REFUSED, "reason" => "limit").increment(1);
            drop(io);
            continue;
        };
        if let Peer::Unix { .. } = peer {
            tracing::debug!("{peer}: connected");
        }
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let tx = tx.clone();
        let lean = lean.clone();
        let mut stopped = stopped.clone();
        let page_files = page_files.clone();
        tokio::spawn(async move {
            let shaken = tokio::time::timeout(limits.handshake_timeout, async {
                match handshake(io, acceptor).await? {
                    Handshaken::Grpc(io, preface) => Ok(Some(Ok((io, preface)))),
                    Handshaken::Lean(io, kind) => Ok(Some(Err((io, kind)))),
                    Handshaken::PageFile(stream) => {
                        let Some(files) = page_files else {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "a page-file request on TCP",
                            ));
                        };
                        files.serve(stream, &peer.to_string()).await?;
                        Ok(None)
                    }
                }
            })
            .await;
            match shaken {
                Ok(Ok(Some(Err((io, kind))))) => {
                    // The lean transports, on this task (crate::lean).
                    io.keepalive(limits.keepalive_interval);
                    let _open = OpenConnection::new();
                    let stop = async move {
                        let _ = stopped.changed().await;
                    };
                    let tcp_peer = match peer {
                        Peer::Tcp(a) => Some(a),
                        Peer::Unix { .. } => None,
                    };
                    let timeout = limits.handshake_timeout;
                    let served = match kind {
                        LeanKind::Fault => lean.serve(io, tcp_peer, timeout, stop).await,
                        LeanKind::Prefetch => {
                            lean.serve_prefetch(io, tcp_peer, timeout, stop).await
                        }
                    };
                    if let Err(e) = served {
                        tracing::debug!("{peer}: lean {kind:?} connection ended: {e}");
                    }
                    drop(slot);
                }
                Ok(Ok(Some(Ok((io, preface))))) => {
                    metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
                    let conn = Conn {
                        io,
                        preface,
                        replayed: 0,
                        peer,
                        _slot: slot,
                    };
                    let _ = tx.send(Ok(conn)).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    metrics::counter!(CONNECTIONS_REFUSED, "reason" => "handshake").increment(1);
                    tracing::info!("{peer}: connection refused: {e}");
                }
                Err(_) => {
                    metrics::counter!(CONNECTIONS_REFUSED, "reason" => "timeout").increment(1);
                    tracing::debug!(
                        "{peer}: no TLS handshake and HTTP/2 preface within {:?}; closed",
                        limits.handshake_timeout
                    );
                }
            }
        });
    }
}

/// A connection past its handshake.
enum Handshaken {
    /// An HTTP/2 client (gRPC), with the preface read from it, to be
    /// replayed to hyper.
    Grpc(Io, [u8; 24]),
    /// A lean transport client, its magic consumed: [`frame::MAGIC`] (a
    /// fault stream) or [`frame::PREFETCH_MAGIC`] (a prefetch).
    Lean(Io, LeanKind),
    /// A Unix client asking for a page file (its preface read).
    PageFile(tokio::net::UnixStream),
}

/// Which stream a lean connection carries.
#[derive(Clone, Copy, Debug)]
enum LeanKind {
    Fault,
    Prefetch,
}

/// Runs the TLS handshake (if any) and reads HTTP/2's connection preface,
/// a lean transport's magic (as long as the preface), or, on a Unix
/// socket, the page-file preface.
async fn handshake(io: Io, tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<Handshaken> {
    let mut io = match (io, tls) {
        (Io::Plain(tcp), Some(acceptor)) => {
            Io::Tls(Box::new(acceptor.accept(tcp).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("TLS handshake failed: {e}"))
            })?))
        }
        (io, _) => io,
    };
    // The lean transport's magic is as long as the preface.
    let mut preface = [0u8; 24];
    io.read_exact(&mut preface).await?;
    if &preface == H2_PREFACE {
        return Ok(Handshaken::Grpc(io, preface));
    }
    if preface == frame::MAGIC {
        return Ok(Handshaken::Lean(io, LeanKind::Fault));
    }
    if preface == frame::PREFETCH_MAGIC {
        return Ok(Handshaken::Lean(io, LeanKind::Prefetch));
    }
    match io {
        Io::Unix(stream) if &preface == faultline_proto::unix::PAGE_FILE_PREFACE => {
            Ok(Handshaken::PageFile(stream))
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an HTTP/2 (gRPC) client, nor a lean fault or prefetch connection",
        )),
    }
}

/// Counts a connection in [`CONNECTIONS_OPEN`] while it lives (a lean one;
/// gRPC's are counted by [`Conn`]).
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

impl Io {
    /// Turns on TCP keepalive probes after `idle` without traffic: a lean
    /// connection has no HTTP/2 pings, and a client that vanished must not
    /// hold its slot forever.
    fn keepalive(&self, idle: Duration) {
        let tcp = match self {
            Self::Plain(t) => t,
            Self::Tls(t) => t.get_ref().0,
            // A Unix peer that dies closes its end: the kernel tells us.
            Self::Unix(_) => return,
        };
        let probes = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle)
            .with_retries(KEEPALIVE_PROBES);
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&probes) {
            tracing::debug!("cannot set TCP keepalive: {e}");
        }
    }
}

/// Unanswered keepalive probes before the kernel drops a lean connection:
/// with [`KEEPALIVE_INTERVAL`] between them, a vanished client is found
/// within about a minute and a half, as HTTP/2's ping finds one in 40 s.
const KEEPALIVE_PROBES: u32 = 3;

/// A connection's byte stream.
enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    Unix(tokio::net::UnixStream),
}

/// An accepted connection: its stream, the preface already read from it
/// (replayed to hyper first), and its slot under the connection limit.
struct Conn {
    io: Io,
    preface: [u8; 24],
    replayed: usize,
    peer: Peer,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let tcp = match &self.io {
            Io::Plain(t) => t,
            Io::Tls(t) => t.get_ref().0,
            // A Unix peer has no address: per-client limits count it as one
            // unknown client (docs/protocol.md).
            Io::Unix(_) => {
                return tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: None,
                };
            }
        };
        tonic::transport::server::TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: match self.peer {
                Peer::Tcp(a) => Some(a),
                Peer::Unix { .. } => None,
            },
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(t).poll_read(cx, buf),
            Self::Unix(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Self::Tls(t) => Pin::new(t).poll_write(cx, buf),
            Self::Unix(t) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Self::Tls(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Self::Unix(t) => Pin::new(t).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(t) => t.is_write_vectored(),
            Self::Tls(t) => t.is_write_vectored(),
            Self::Unix(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_flush(cx),
            Self::Tls(t) => Pin::new(t).poll_flush(cx),
            Self::Unix(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(t).poll_shutdown(cx),
            Self::Unix(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.preface.len() {
            let rest = &this.preface[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A server running on a background task, for tests, benchmarks and
/// embedding.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    /// The socket path of a server on a Unix socket.
    unix: Option<PathBuf>,
    tls: bool,
    reloader: Reloader,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl ServerHandle {
    /// Where it listens on TCP (`0.0.0.0:0` for a server on a Unix socket:
    /// see [`ServerHandle::unix_path`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The socket path of a server on a Unix socket.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// Its URL, `http://ADDR`, or `https://ADDR` when it serves TLS, or
    /// `unix://PATH` on a Unix socket.
    pub fn url(&self) -> String {
        if let Some(path) = &self.unix {
            return format!("{}{}", faultline_proto::unix::UNIX_SCHEME, path.display());
        }
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Reloads its certificates and tokens from their files, as SIGHUP does
    /// for `faultline-server serve`.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        self.reloader.reload()
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
/// background task of the current runtime, without TLS or tokens (so on
/// loopback only), with reflection.
pub async fn spawn(
    addr: SocketAddr,
    store: Arc<dyn SnapshotStore>,
) -> std::io::Result<ServerHandle> {
    let opts = ServeOptions {
        reflection: true,
        ..ServeOptions::default()
    };
    spawn_with(addr, store, opts)
        .await
        .map_err(std::io::Error::other)
}

/// [`spawn`] within the service limits `limits`.
pub async fn spawn_with_limits(
    addr: SocketAddr,
    store: Arc<dyn SnapshotStore>,
    limits: Limits,
) -> std::io::Result<ServerHandle> {
    let opts = ServeOptions {
        reflection: true,
        service_limits: limits,
        ..ServeOptions::default()
    };
    spawn_with(addr, store, opts)
        .await
        .map_err(std::io::Error::other)
}

/// Binds `addr` and serves `store` with `opts` on a background task of the
/// current runtime. The TLS files, tokens file and exposure are checked
/// before anything is bound.
pub async fn spawn_with(
    addr: SocketAddr,
    store: Arc<dyn SnapshotStore>,
    opts: ServeOptions,
) -> Result<ServerHandle, ServeError> {
    check_exposure(addr, &opts)?;
    let tls = opts.tls.is_some();
    let server = Server::new(store, opts)?;
    let reloader = server.reloader();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(ServeError::Addr)?;
    let addr = listener.local_addr().map_err(ServeError::Addr)?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(server.run(listener, async move {
        let _ = stopped.await;
    }));
    Ok(ServerHandle {
        addr,
        unix: None,
        tls,
        reloader,
        stop: Some(stop),
        task,
    })
}

/// Binds the Unix socket `path` (mode 0600; a stale socket there replaced,
/// a live one refused) and serves `store` with `opts` on a background task
/// of the current runtime. The socket file is removed when the server
/// stops. TLS in `opts` is refused; tokens apply as on TCP.
pub async fn spawn_unix(
    path: &Path,
    store: Arc<dyn SnapshotStore>,
    opts: ServeOptions,
) -> Result<ServerHandle, ServeError> {
    if opts.tls.is_some() {
        return Err(ServeError::TlsOnUnix(path.to_owned()));
    }
    let server = Server::new(store, opts)?;
    let reloader = server.reloader();
    let socket = faultline_proto::unix::bind(path)?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(server.run_unix(socket, async move {
        let _ = stopped.await;
    }));
    Ok(ServerHandle {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        unix: Some(path.to_owned()),
        tls: false,
        reloader,
        stop: Some(stop),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback needs no TLS or tokens; any other address needs both or the insecure flags.
    #[test]
    fn exposure_rules() {
        let lo: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let lo6: SocketAddr = "[::1]:7070".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let open = ServeOptions::default();
        assert!(check_exposure(lo, &open).is_ok());
        assert!(check_exposure(lo6, &open).is_ok());
        let e = check_exposure(any, &open).unwrap_err().to_string();
        assert!(e.contains("without TLS") && e.contains("--tls-cert"), "{e}");
        let plaintext = ServeOptions {
            insecure_plaintext: true,
            ..ServeOptions::default()
        };
        let e = check_exposure(any, &plaintext).unwrap_err().to_string();
        assert!(
            e.contains("without tokens") && e.contains("--tokens"),
            "{e}"
        );
        let both = ServeOptions {
            insecure_plaintext: true,
            insecure_no_auth: true,
            ..ServeOptions::default()
        };
        assert!(check_exposure(any, &both).is_ok());
    }

    /// `--listen` takes HOST:PORT or unix:///PATH (absolute), and says both forms when wrong.
    #[test]
    fn listen_forms() {
        assert_eq!(
            "127.0.0.1:7070".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:7070".parse().unwrap())
        );
        let unix: Listen = "unix:///run/fl.sock".parse().unwrap();
        assert_eq!(unix, Listen::Unix(PathBuf::from("/run/fl.sock")));
        assert_eq!(unix.to_string(), "unix:///run/fl.sock");
        assert!(
            "unix://rel.sock"
                .parse::<Listen>()
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            "nowhere"
                .parse::<Listen>()
                .unwrap_err()
                .contains("unix:///PATH")
        );
    }
}
