//! Talking to a faultline server: connections tuned for each path, the
//! manifest, and verified page batches.
//!
//! A pager keeps two connections to its server: one for the `Fault` stream
//! and one for `Prefetch`, so urgent answers never queue behind bulk data in
//! one TCP stream (QEMU's postcopy-preempt lesson). [`Remote::connect`] opens
//! one; open two for the two paths.
//!
//! A server on this host may be reached on its Unix socket, `unix:///PATH`:
//! the same gRPC, tokens and checks over a Unix-domain socket instead of TCP
//! (no TLS: the socket never leaves the host). On such a connection the
//! pager can also take a snapshot's pages from its image file, handed over
//! by the server ([`crate::pager`]'s page source, `faultline_proto::unix`).
//!
//! [`ConnectOptions`] say how: TLS for `https://` servers (a CA file, and a
//! client certificate for mutual TLS), the bearer token sent with every
//! call, and the transport's tuning. The pager, fetch, restore and the
//! Firecracker handler all take one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use faultline_proto::codec::PageBatch;
use faultline_proto::pb::faultline_client::FaultlineClient;
use faultline_proto::{Manifest, ProtocolError, SnapshotId, pb};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

/// The URI a Unix socket's channel is given (tonic needs one); never
/// resolved or dialled.
const UNIX_AUTHORITY: &str = "http://faultline.local";

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

/// The environment variable a token is taken from when none is given.
pub const TOKEN_ENV: &str = "FAULTLINE_TOKEN";

/// A bearer token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(AsciiMetadataValue);

impl Token {
    /// The `authorization` value sent (`Bearer TOKEN`), for the page-file
    /// handover, which authorizes as a call does.
    pub(crate) fn header_value(&self) -> &str {
        self.0.to_str().expect("checked to be printable ASCII")
    }

    /// Checks `token` (printable ASCII, as gRPC metadata must be).
    pub fn new(token: &str) -> Result<Self, RemoteError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(RemoteError::BadToken("it is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RemoteError::BadToken(
                "it has characters other than printable ASCII",
            ));
        }
        let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| RemoteError::BadToken("it has characters other than printable ASCII"))?;
        // Kept out of HPACK's dynamic table (and so out of any later
        // compression side channel).
        value.set_sensitive(true);
        Ok(Self(value))
    }

    /// What goes in the `authorization` metadata: `Bearer TOKEN` (the lean
    /// fault transport sends it in its hello).
    pub(crate) fn authorization(&self) -> &str {
        self.0
            .to_str()
            .expect("checked printable ASCII in Token::new")
    }

    /// `--token`, or else `FAULTLINE_TOKEN`, or else none.
    pub fn from_arg_or_env(arg: Option<&str>) -> Result<Option<Self>, RemoteError> {
        match arg {
            Some(t) => Self::new(t).map(Some),
            None => match std::env::var(TOKEN_ENV) {
                Ok(t) if !t.trim().is_empty() => Self::new(&t).map(Some),
                _ => Ok(None),
            },
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// TLS for `https://` servers.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// CA certificates (PEM) the server's certificate must chain to; the
    /// system's roots if `None`.
    pub ca: Option<Certificate>,
    /// The client's certificate chain and key (PEM), for mutual TLS.
    pub identity: Option<Identity>,
    /// The name the server's certificate must carry, if not the URL's host.
    pub domain: Option<String>,
    /// The PEM of `identity` (certificate chain, key), which the lean fault
    /// transport's own TLS needs (tonic's `Identity` does not give it back);
    /// set by [`ConnectOptions::from_files`]. With `identity` set and this
    /// not, demand faults go over gRPC.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

/// How to connect: TLS, token, transport tuning.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// TLS settings for `https://` URLs (an `http://` URL with a CA or a
    /// client certificate set is refused).
    pub tls: TlsOptions,
    /// The token sent as `authorization: Bearer ...` with every call.
    pub token: Option<Token>,
    /// Transport settings.
    pub transport: Transport,
    /// On a `unix://` server, take pages as bytes on the stream even where
    /// the server could hand over the snapshot's file (for comparisons; the
    /// file is faster).
    pub no_page_file: bool,
}

/// Reads a PEM file for [`ConnectOptions::from_files`].
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, RemoteError> {
    let pem = std::fs::read(path).map_err(|source| RemoteError::TlsFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(RemoteError::TlsFile {
            what,
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no PEM block in it"),
        });
    }
    Ok(pem)
}

impl ConnectOptions {
    /// Options from the command line's `--ca`, `--cert`, `--key` and
    /// `--token` (or `FAULTLINE_TOKEN`); the files are read now, so a bad
    /// path is reported before any connection is tried.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        token: Option<&str>,
    ) -> Result<Self, RemoteError> {
        let ca = ca
            .map(|p| read_pem("CA certificate", p).map(Certificate::from_pem))
            .transpose()?;
        let identity_pem = match (cert, key) {
            (Some(c), Some(k)) => Some((
                read_pem("client certificate", c)?,
                read_pem("client key", k)?,
            )),
            (None, None) => None,
            _ => return Err(RemoteError::IncompleteIdentity),
        };
        Ok(Self {
            tls: TlsOptions {
                ca,
                identity: identity_pem.as_ref().map(|(c, k)| Identity::from_pem(c, k)),
                domain: None,
                identity_pem,
            },
            token: Token::from_arg_or_env(token)?,
            transport: Transport::default(),
            no_page_file: false,
        })
    }

    /// The same options with `transport` settings.
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }
}

/// Adds the token to every call.
#[derive(Clone, Debug)]
pub struct Authorize(Option<Token>);

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.0.clone());
        }
        Ok(req)
    }
}

/// The generated client on a connection, sending the token.
pub type Client = FaultlineClient<InterceptedService<Channel, Authorize>>;

/// The error and its causes, as one sentence (tonic's transport error alone
/// says only "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `s`, then each cause from `source` on that it does not already say.
fn with_causes(mut s: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(c) = source {
        // Many errors already print their cause; say each thing once.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
}

/// What to check when a connection fails.
fn connect_hint(url: &str) -> &'static str {
    if url.starts_with(faultline_proto::unix::UNIX_SCHEME) {
        "is `faultline-server serve --listen unix:///PATH` running there, and may this user open \
         the socket (it is mode 0600: the server's user only)?"
    } else if url.starts_with("https://") {
        "is `faultline-server serve` running there with TLS, does --ca hold the CA that signed \
         its certificate, and does it want a client certificate (--cert, --key)?"
    } else {
        "is `faultline-server serve` running there?"
    }
}

/// A status's message, and the causes of a transport failure (tonic says
/// only "transport error" and keeps the reason, e.g. a refused certificate,
/// in the source chain).
fn status_text(status: &tonic::Status) -> String {
    with_causes(
        status.message().to_owned(),
        std::error::Error::source(status),
    )
}

/// A call to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not a valid endpoint.
    #[error("{url:?} is not a server URL; use http://HOST:PORT or unix:///PATH ({source})")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// No connection could be made.
    #[error("cannot connect to {url}: {}; {}", chain(cause), connect_hint(url))]
    Connect {
        /// The server.
        url: String,
        /// Why (its causes are in the message: tonic's error alone says only
        /// "transport error").
        cause: tonic::transport::Error,
    },
    /// A TLS file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    TlsFile {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--cert` without `--key` or the reverse.
    #[error("a client certificate needs both --cert and --key")]
    IncompleteIdentity,
    /// TLS options for a Unix socket.
    #[error(
        "{url} is a Unix socket, which carries no TLS (it never leaves this host), but TLS \
         options (--ca, --cert) were given; drop them or use https://"
    )]
    TlsOptionsOnUnix {
        /// The URL.
        url: String,
    },
    /// TLS options for a plaintext URL.
    #[error("{url} is plaintext (http://) but TLS options (--ca, --cert) were given; use https://")]
    TlsOptionsWithoutTls {
        /// The URL.
        url: String,
    },
    /// The token cannot be sent.
    #[error("the token cannot be used: {0}")]
    BadToken(&'static str),
    /// The server answered with an error (or the connection failed under
    /// the call: then the causes follow the message).
    #[error("{call} failed: {} ({:?})", status_text(.status), .status.code())]
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
            Self::BadUrl { .. }
            | Self::Protocol { .. }
            | Self::TlsFile { .. }
            | Self::IncompleteIdentity
            | Self::TlsOptionsWithoutTls { .. }
            | Self::TlsOptionsOnUnix { .. }
            | Self::BadToken(_) => false,
        }
    }
}

/// One connection to a server.
#[derive(Clone, Debug)]
pub struct Remote {
    url: String,
    channel: Channel,
    client: Client,
}

impl Remote {
    /// Connects to `url` (`http://HOST:PORT`, `https://HOST:PORT` with the
    /// system's CA roots, or `unix:///PATH`) with the default transport and
    /// no token.
    pub async fn connect(url: &str) -> Result<Self, RemoteError> {
        Self::connect_with(url, &ConnectOptions::default()).await
    }

    /// Connects to `url` with `opts`: TLS for `https://`, the token, the
    /// transport settings.
    pub async fn connect_with(url: &str, opts: &ConnectOptions) -> Result<Self, RemoteError> {
        let unix = faultline_proto::unix::unix_path(url);
        let transport = opts.transport;
        // A Unix socket's endpoint needs some http:// URI for HTTP/2's
        // `:authority`; the connector below ignores it.
        let endpoint_url = if unix.is_some() {
            UNIX_AUTHORITY.to_owned()
        } else {
            url.to_owned()
        };
        let endpoint = Endpoint::from_shared(endpoint_url)
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
        let endpoint = if unix.is_some() {
            if opts.tls.ca.is_some() || opts.tls.identity.is_some() {
                return Err(RemoteError::TlsOptionsOnUnix {
                    url: url.to_owned(),
                });
            }
            endpoint
        } else if endpoint.uri().scheme_str() == Some("https") {
            let mut tls = ClientTlsConfig::new();
            tls = match &opts.tls.ca {
                Some(ca) => tls.ca_certificate(ca.clone()),
                None => tls.with_native_roots(),
            };
            if let Some(id) = &opts.tls.identity {
                tls = tls.identity(id.clone());
            }
            if let Some(d) = &opts.tls.domain {
                tls = tls.domain_name(d.clone());
            }
            endpoint
                .tls_config(tls)
                .map_err(|source| RemoteError::BadUrl {
                    url: url.to_owned(),
                    source,
                })?
        } else {
            if opts.tls.ca.is_some() || opts.tls.identity.is_some() {
                return Err(RemoteError::TlsOptionsWithoutTls {
                    url: url.to_owned(),
                });
            }
            endpoint
        };
        let connected = match unix {
            Some(path) => {
                let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                });
                endpoint.connect_with_connector(connector).await
            }
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|cause| RemoteError::Connect {
            url: url.to_owned(),
            cause,
        })?;
        let client =
            FaultlineClient::with_interceptor(channel.clone(), Authorize(opts.token.clone()))
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES);
        Ok(Self {
            url: url.to_owned(),
            channel,
            client,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection, for other services on it (health).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The generated client, for calls this type does not wrap.
    pub fn client(&self) -> Client {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A token is sent as `Bearer TOKEN`, never shown by `Debug`, and refused
    /// if empty or not printable ASCII.
    #[test]
    fn tokens() {
        let t = Token::new(" fl_abc ").unwrap();
        assert_eq!(t.0.to_str().unwrap(), "Bearer fl_abc");
        assert!(t.0.is_sensitive());
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        let opts = ConnectOptions {
            token: Some(t),
            ..ConnectOptions::default()
        };
        assert!(!format!("{opts:?}").contains("fl_abc"));
        assert!(Token::new("").is_err());
        assert!(Token::new("fl_\u{e9}").is_err());
    }

    /// Causes are appended once each, even when an error already prints its
    /// source.
    #[test]
    fn causes_said_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let inner = E("UnknownIssuer", None);
        let mid = E(
            "invalid peer certificate: UnknownIssuer",
            Some(Box::new(inner)),
        );
        let top = E("transport error", Some(Box::new(mid)));
        assert_eq!(
            chain(&top),
            "transport error: invalid peer certificate: UnknownIssuer"
        );
    }

    /// TLS options with a plaintext URL are refused before connecting.
    #[tokio::test]
    async fn tls_options_need_https() {
        let opts = ConnectOptions {
            tls: TlsOptions {
                ca: Some(Certificate::from_pem("-----BEGIN CERTIFICATE-----")),
                ..TlsOptions::default()
            },
            ..ConnectOptions::default()
        };
        let e = Remote::connect_with("http://127.0.0.1:1", &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, RemoteError::TlsOptionsWithoutTls { .. }), "{e}");
    }
}
