//! `faultline-server`: serve, import, inspect and list memory snapshots.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use faultline_proto::{
    CreateVolume, PageIndex, PageRange, PageSize, SealVolume, SnapshotId, VolumeSource,
};
use faultline_server::auth::{self, Right, TokensFile};
use faultline_server::import::{RegionArg, import, parse_size};
use faultline_server::readiness::Readiness;
use faultline_server::server::{self, ServeOptions, Server};
use faultline_server::store::object::{DiskCache, ObjectStoreOptions, OpenedStore, StoreLocation};
use faultline_server::store::{LayerInfo, LocalStore};
use faultline_server::tls::TlsFiles;
use faultline_server::{Limits, metrics};
use indicatif::{ProgressBar, ProgressStyle};

/// How long in-flight streams may take to finish after SIGINT/SIGTERM before
/// the server exits anyway. A second signal exits at once.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "faultline-server",
    version,
    about = "Serves VM memory snapshots over gRPC to faultline pagers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the snapshots of a store over gRPC. Without TLS and tokens it serves loopback only.
    /// SIGHUP reloads the TLS files and the tokens file (a bad file keeps the old one).
    Serve(ServeArgs),
    /// Make, list or revoke the bearer tokens of a tokens file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Import a raw memory file (e.g. a Firecracker memory snapshot) as a snapshot.
    Import {
        /// Snapshot store: a directory (created if missing), or
        /// s3://BUCKET/PREFIX (credentials, region and endpoint from the
        /// AWS_* variables).
        #[arg(long, env = "FAULTLINE_STORE")]
        store: StoreLocation,
        /// Name of the new snapshot: letters, digits, '.', '_', '-'.
        #[arg(long)]
        name: SnapshotId,
        /// The raw memory file: guest regions back to back.
        #[arg(long)]
        mem_file: PathBuf,
        /// Page size: 4K, or 2M for guests backed by hugetlbfs.
        #[arg(long, default_value = "4K")]
        page_size: PageSize,
        /// A region NAME:SIZE[@GPA], in file order; repeat for each. Default:
        /// one region "mem" covering the file at guest address 0.
        #[arg(long = "region")]
        regions: Vec<RegionArg>,
        /// Import a diff memory file (a sparse file whose holes are the pages unchanged since
        /// the snapshot PARENT, as Firecracker writes diff snapshots) as a child of PARENT.
        /// Page size and layout are PARENT's.
        #[arg(long, conflicts_with_all = ["page_size", "regions"])]
        parent: Option<SnapshotId>,
        #[command(flatten)]
        limits: Limits,
    },
    /// Create or seal writable volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Write the resolved image of a diff snapshot (or a volume) as a standalone snapshot.
    Flatten {
        /// Snapshot store directory.
        #[arg(long, env = "FAULTLINE_STORE")]
        store: PathBuf,
        /// The diff snapshot or volume.
        #[arg(long)]
        name: SnapshotId,
        /// Name of the new standalone snapshot.
        #[arg(long = "as")]
        as_name: SnapshotId,
        #[command(flatten)]
        limits: Limits,
    },
    /// Show a snapshot's manifest.
    Inspect {
        /// Snapshot store: a directory, or s3://BUCKET/PREFIX (credentials,
        /// region and endpoint from the AWS_* variables).
        #[arg(long, env = "FAULTLINE_STORE")]
        store: StoreLocation,
        /// The snapshot.
        #[arg(long)]
        name: SnapshotId,
        /// Also read every page and check it against its digest.
        #[arg(long)]
        verify: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots of a store.
    List {
        /// Snapshot store: a directory, or s3://BUCKET/PREFIX (credentials,
        /// region and endpoint from the AWS_* variables).
        #[arg(long, env = "FAULTLINE_STORE")]
        store: StoreLocation,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `faultline-server volume ...`.
#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume: empty (`--size`) or a copy-on-write child of a snapshot (`--from`).
    Create {
        /// Snapshot store directory (created if missing).
        #[arg(long, env = "FAULTLINE_STORE")]
        store: PathBuf,
        /// Name of the new volume.
        #[arg(long)]
        name: SnapshotId,
        /// Start as this snapshot's pages.
        #[arg(long, required_unless_present = "size", conflicts_with = "size")]
        from: Option<SnapshotId>,
        /// Start empty, of this many bytes (suffixes K, M, G, T: powers of 1024).
        #[arg(long, value_parser = parse_bytes)]
        size: Option<u64>,
        /// Page size of an empty volume: 4K or 2M.
        #[arg(long, default_value = "4K", conflicts_with = "from")]
        page_size: PageSize,
        #[command(flatten)]
        limits: Limits,
    },
    /// Seal a volume into an immutable diff snapshot (the volume's name is gone afterwards).
    Seal {
        /// Snapshot store directory.
        #[arg(long, env = "FAULTLINE_STORE")]
        store: PathBuf,
        /// The volume.
        #[arg(long)]
        name: SnapshotId,
        /// Name of the snapshot it becomes.
        #[arg(long = "as")]
        as_name: SnapshotId,
    },
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "{s:?}: use a number of bytes, or a suffix K, M, G or T"
                    ));
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 4096, 64M, 1G)"))
}

/// `faultline-server serve`'s arguments.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Snapshot store: a directory, or s3://BUCKET/PREFIX (credentials, region and endpoint
    /// from the AWS_* variables).
    #[arg(long, env = "FAULTLINE_STORE")]
    store: StoreLocation,
    /// Where to serve gRPC: HOST:PORT, or unix:///PATH for a Unix socket (clients on this
    /// host only; created mode 0600, a stale socket replaced, a live one refused, removed on
    /// shutdown; no TLS there; a client on it may take pages as a file instead of bytes).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: server::Listen,
    /// Address for Prometheus metrics (GET /metrics) and the liveness and readiness probes
    /// (GET /livez, /readyz); none if not given.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Memory for chunks read from an object store (K/M/G suffixes).
    #[arg(long = "chunk-cache", value_name = "BYTES", default_value = "1G", value_parser = parse_size)]
    chunk_cache: u64,
    /// Also keep chunks read from an object store as files in this directory (created mode
    /// 0700: they hold guest memory).
    #[arg(long = "chunk-cache-dir", value_name = "DIR")]
    chunk_cache_dir: Option<PathBuf>,
    /// Most bytes of chunks kept in --chunk-cache-dir (K/M/G/T suffixes).
    #[arg(long = "chunk-cache-disk", value_name = "BYTES", default_value = "10G", value_parser = parse_size)]
    chunk_cache_disk: u64,
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Require a bearer token from this file (made with `faultline-server token new`) on every
    /// Faultline RPC; health (and reflection) stay open.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Serve gRPC reflection (the schema only), for grpcurl and similar tools.
    #[arg(long)]
    reflection: bool,
    /// Allow plaintext on an address other than loopback (pages and tokens cross the network
    /// unencrypted).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Allow serving without tokens on an address other than loopback (anyone who reaches it
    /// may read every snapshot and upload new ones).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Most connections served at once; more are closed at once.
    #[arg(long, default_value_t = server::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Most concurrent streams on one connection.
    #[arg(long, default_value_t = server::MAX_STREAMS_PER_CONNECTION)]
    max_streams_per_connection: u32,
    /// Seconds a new connection may take to finish TLS and send HTTP/2's preface.
    #[arg(long, default_value_t = server::HANDSHAKE_TIMEOUT.as_secs())]
    handshake_timeout: u64,
    /// Seconds between HTTP/2 keepalive pings on a connection; a ping unanswered for as long
    /// closes it.
    #[arg(long, default_value_t = server::KEEPALIVE_INTERVAL.as_secs())]
    keepalive: u64,
    #[command(flatten)]
    limits: Limits,
}

impl ServeArgs {
    /// The library's options for these arguments.
    fn options(&self) -> anyhow::Result<ServeOptions> {
        for (flag, value) in [
            ("--max-connections", self.max_connections as u64),
            (
                "--max-streams-per-connection",
                u64::from(self.max_streams_per_connection),
            ),
            ("--handshake-timeout", self.handshake_timeout),
            ("--keepalive", self.keepalive),
        ] {
            if value == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            }),
            _ => None,
        };
        Ok(ServeOptions {
            tls,
            tokens: self.tokens.clone(),
            reflection: self.reflection,
            insecure_plaintext: self.insecure_plaintext,
            insecure_no_auth: self.insecure_no_auth,
            limits: server::TransportLimits {
                max_connections: self.max_connections,
                max_streams_per_connection: self.max_streams_per_connection,
                handshake_timeout: Duration::from_secs(self.handshake_timeout),
                keepalive_interval: Duration::from_secs(self.keepalive),
                keepalive_timeout: Duration::from_secs(self.keepalive),
            },
            service_limits: self.limits.clone(),
        })
    }
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a token: print it once (store it now) and keep only its SHA-256 in the tokens file.
    /// A running server takes it on SIGHUP.
    New {
        /// The tokens file (created, readable by its owner only, if missing).
        #[arg(long)]
        tokens: PathBuf,
        /// Snapshot name patterns it applies to (globs `*` and `?`), comma-separated or repeated.
        #[arg(long, required = true)]
        snapshots: Vec<String>,
        /// Its rights: read (manifests, pages, faults, prefetch, list), record (working sets),
        /// write (create snapshots); comma-separated.
        #[arg(long, value_parser = parse_rights)]
        rights: RightsArg,
        /// A name for logs and `token list`.
        #[arg(long, default_value = "token")]
        name: String,
    },
    /// List the tokens of a tokens file (names, ids, patterns, rights; never the tokens).
    List {
        /// The tokens file.
        #[arg(long)]
        tokens: PathBuf,
    },
    /// Remove tokens by id (from `token list`) or name. A running server drops them on SIGHUP.
    Revoke {
        /// The tokens file.
        #[arg(long)]
        tokens: PathBuf,
        /// The token's id, or a prefix of it.
        #[arg(long, required_unless_present = "name", conflicts_with = "name")]
        id: Option<String>,
        /// Every token of this name.
        #[arg(long)]
        name: Option<String>,
    },
}

/// `--rights`, parsed.
#[derive(Clone, Debug)]
struct RightsArg(Vec<Right>);

fn parse_rights(s: &str) -> Result<RightsArg, String> {
    auth::parse_rights(s).map(RightsArg)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args),
        Command::Token(cmd) => token(cmd),
        Command::Import {
            store,
            name,
            mem_file,
            page_size,
            regions,
            parent: Some(parent),
            limits,
        } => {
            let _ = (page_size, regions);
            let StoreLocation::Local(dir) = store else {
                bail!(
                    "--parent needs a local store directory: diff snapshots are kept by the \
                     local store only (the object store holds standalone snapshots)"
                );
            };
            import_diff_cmd(dir, name, parent, mem_file, limits)
        }
        Command::Import {
            store,
            name,
            mem_file,
            page_size,
            regions,
            parent: None,
            limits,
        } => import_cmd(store, name, mem_file, page_size, regions, limits),
        Command::Volume(cmd) => volume(cmd),
        Command::Flatten {
            store,
            name,
            as_name,
            limits,
        } => flatten(store, name, as_name, limits),
        Command::Inspect {
            store,
            name,
            verify,
            json,
        } => inspect(store, name, verify, json),
        Command::List { store, json } => list(store, json),
    }
}

fn open_store(store: &StoreLocation, limits: &Limits) -> anyhow::Result<OpenedStore> {
    Ok(store.open(limits, ObjectStoreOptions::with_limits(limits))?)
}

/// A local store directory: volumes, diff imports and flattening are features of the local
/// store (docs/store.md).
fn open_local(dir: PathBuf, limits: &Limits) -> anyhow::Result<LocalStore> {
    LocalStore::with_limits(&dir, limits)
        .with_context(|| format!("cannot open the snapshot store {}", dir.display()))
}

#[tokio::main]
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let opts = args.options()?;
    let listen = args.listen.clone();
    let metrics_listen = args.metrics_listen;
    match &listen {
        server::Listen::Tcp(addr) => server::check_exposure(*addr, &opts)?,
        server::Listen::Unix(path) if opts.tls.is_some() => {
            return Err(server::ServeError::TlsOnUnix(path.clone()).into());
        }
        server::Listen::Unix(_) => {}
    }
    // Before the store, whose cache reports its capacity as it starts, and
    // before the metrics endpoint answers: every series is there from its
    // first scrape.
    metrics::install();
    metrics::register_limits(&args.limits);
    let options = ObjectStoreOptions {
        cache_bytes: args.chunk_cache,
        ..ObjectStoreOptions::with_limits(&args.limits)
    };
    let disk = match &args.chunk_cache_dir {
        Some(dir) => Some(
            DiskCache::open(dir, args.chunk_cache_disk)
                .with_context(|| format!("cannot use {} as the chunk cache", dir.display()))?,
        ),
        None => None,
    };
    let location = args.store.clone();
    let opened = location.open_with(&args.limits, options, disk)?;
    let store = opened.store.clone();
    // A directory must be readable now; an object store may come up later
    // (until it answers, the server is live but not ready), and listing a
    // large one is work for no one.
    let snapshots = if opened.object.is_some() {
        "the".to_owned()
    } else {
        let list = store.list().await;
        list.with_context(|| format!("in {location}"))?
            .len()
            .to_string()
    };
    let readiness = Readiness::spawn(opened.probe());
    let server = Server::new(store, opts)?.with_readiness(readiness.clone());
    let security = server.describe_security();
    reload_on_sighup(server.reloader())?;
    let listener = match &listen {
        server::Listen::Tcp(addr) => {
            Listener::Tcp(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr}; is another server running there?")
            })?)
        }
        server::Listen::Unix(path) => {
            let socket = faultline_proto::unix::bind(path)?;
            if socket.replaced_stale() {
                tracing::info!(
                    "replaced the stale socket {} (left by a server that died)",
                    path.display()
                );
            }
            Listener::Unix(socket)
        }
    };
    let listening = match &listener {
        Listener::Tcp(l) => l.local_addr()?.to_string(),
        Listener::Unix(_) => listen.to_string(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let mut stop = stop_rx.clone();
        let routes = readiness.routes();
        tracing::info!(
            "metrics at {}",
            metrics::describe(metrics_listener.local_addr()?)
        );
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = metrics::serve_with(metrics_listener, routes, shutdown).await {
                tracing::error!("metrics endpoint failed: {e}");
            }
        });
    }
    tracing::info!("serving {snapshots} snapshot(s) of {location} on {listening} ({security})");
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "shutting down: no new connections; streams in flight may finish (up to {}s, or signal again)",
            SHUTDOWN_GRACE.as_secs()
        );
        let _ = stop_tx.send(true);
        tokio::select! {
            () = wait_for_signal() => tracing::warn!("second signal: exiting now"),
            () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("grace period over: exiting"),
        }
        std::process::exit(1);
    });
    let mut stop = stop_rx;
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    match listener {
        Listener::Tcp(l) => server.run(l, stopped).await?,
        // Removes the socket file once serving ends.
        Listener::Unix(socket) => server.run_unix(socket, stopped).await?,
    }
    tracing::info!("stopped");
    Ok(())
}

/// What `serve` listens on, bound.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(faultline_proto::unix::UnixSocket),
}

/// Reloads certificates and tokens on every SIGHUP, saying what was taken.
fn reload_on_sighup(reloader: server::Reloader) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match reloader.reload() {
                Ok(r) if !r.tls && r.tokens.is_none() => {
                    tracing::info!("SIGHUP: nothing to reload (no TLS, no tokens file)");
                }
                Ok(r) => tracing::info!(
                    "SIGHUP: reloaded{}{}",
                    if r.tls {
                        " the TLS certificate and key"
                    } else {
                        ""
                    },
                    r.tokens
                        .map(|n| format!(" {n} token(s)"))
                        .unwrap_or_default()
                ),
                Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
            }
        }
    });
    Ok(())
}

fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::New {
            tokens,
            snapshots,
            rights,
            name,
        } => {
            let patterns = auth::parse_patterns(&snapshots).map_err(anyhow::Error::msg)?;
            let mut file = TokensFile::load(&tokens)?;
            let (token, entry) = file.add_new(name, patterns, rights.0)?;
            file.save(&tokens)?;
            eprintln!(
                "new token {:?} (id {}) for snapshots {} with rights {}; it is shown only now, \
                 store it (clients take --token or FAULTLINE_TOKEN); a running server takes it \
                 on SIGHUP",
                entry.name,
                entry.id(),
                entry.snapshots.join(","),
                rights_list(&entry.rights),
            );
            println!("{token}");
            Ok(())
        }
        TokenCommand::List { tokens } => {
            let file = TokensFile::load(&tokens)?;
            if file.tokens.is_empty() {
                println!("no tokens; make one with `faultline-server token new`");
            }
            for t in &file.tokens {
                println!(
                    "{:<14} {:<20} snapshots {:<24} rights {}",
                    t.id(),
                    t.name,
                    t.snapshots.join(","),
                    rights_list(&t.rights)
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { tokens, id, name } => {
            if id.as_ref().is_some_and(|id| id.len() < 4) {
                bail!("give at least 4 hex digits of the id (see `faultline-server token list`)");
            }
            let mut file = TokensFile::load(&tokens)?;
            let before = file.tokens.len();
            file.tokens.retain(|t| match (&id, &name) {
                (Some(id), _) => !t.sha256.starts_with(id.as_str()),
                (None, Some(name)) => &t.name != name,
                (None, None) => true,
            });
            let removed = before - file.tokens.len();
            if removed == 0 {
                bail!(
                    "no token in {} matches; see `faultline-server token list`",
                    tokens.display()
                );
            }
            file.save(&tokens)?;
            println!("revoked {removed} token(s); send SIGHUP to a running server to drop them");
            Ok(())
        }
    }
}

fn rights_list(rights: &[Right]) -> String {
    rights
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[tokio::main]
async fn import_cmd(
    location: StoreLocation,
    name: SnapshotId,
    mem_file: PathBuf,
    page_size: PageSize,
    regions: Vec<RegionArg>,
    limits: Limits,
) -> anyhow::Result<()> {
    let opened = open_store(&location, &limits)?;
    let size = std::fs::metadata(&mem_file)
        .with_context(|| format!("cannot read the memory file {}", mem_file.display()))?
        .len();
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("importing {name}"));
    let started = std::time::Instant::now();
    let summary = import(
        &*opened.store,
        &limits,
        name,
        page_size,
        &regions,
        &mem_file,
        |done| bar.set_position(done),
    )
    .await;
    bar.finish_and_clear();
    let summary = summary?;
    println!(
        "imported {} : {} pages of {} ({} zero, not stored) in {:.1}s",
        summary.name,
        summary.page_count,
        page_size,
        summary.zero_pages,
        started.elapsed().as_secs_f64()
    );
    if let Some((_, c)) = opened.object.as_ref().and_then(|o| o.last_write()) {
        println!(
            "chunks   {} : {} uploaded ({} bytes), {} already in {location} (not uploaded), {} zero (not stored)",
            c.chunks, c.uploaded, c.uploaded_bytes, c.reused, c.zero
        );
    }
    Ok(())
}

fn bar(total: u64, msg: String) -> ProgressBar {
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

fn import_diff_cmd(
    store: PathBuf,
    name: SnapshotId,
    parent: SnapshotId,
    mem_file: PathBuf,
    limits: Limits,
) -> anyhow::Result<()> {
    let store = open_local(store, &limits)?;
    let bar = bar(0, format!("importing {name} over {parent}"));
    let summary = store.import_diff_blocking(&name, &parent, &mem_file, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let s = summary?;
    println!(
        "imported {} : a diff over {parent} holding {} of {} pages, chain depth {}",
        s.name, s.layer.own_pages, s.page_count, s.layer.depth
    );
    Ok(())
}

fn volume(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create {
            store,
            name,
            from,
            size,
            page_size,
            limits,
        } => {
            let store = open_local(store, &limits)?;
            let source = match (from, size) {
                (Some(p), _) => VolumeSource::Snapshot(p),
                (None, Some(size)) => {
                    let spec = faultline_server::store::SnapshotSpec::new(
                        name.clone(),
                        page_size,
                        size,
                        Vec::new(),
                    )?;
                    limits.check_spec(&spec)?;
                    VolumeSource::Empty { page_size, size }
                }
                (None, None) => bail!("give --from SNAPSHOT or --size BYTES"),
            };
            let s = store.create_volume_blocking(CreateVolume { name, source })?;
            println!(
                "created volume {} : {} pages of {}{}",
                s.name,
                s.page_count,
                PageSize::try_from(s.page_size)
                    .map_or_else(|_| s.page_size.to_string(), |p| p.to_string()),
                s.layer
                    .parent
                    .map(|p| format!(", copy-on-write over {p}"))
                    .unwrap_or_default()
            );
        }
        VolumeCommand::Seal {
            store,
            name,
            as_name,
        } => {
            let store = open_local(store, &Limits::default())?;
            let s = store.seal_blocking(&SealVolume {
                volume: name,
                snapshot: as_name,
            })?;
            println!(
                "sealed into snapshot {} : {} of {} pages its own{}",
                s.name,
                s.layer.own_pages,
                s.page_count,
                s.layer
                    .parent
                    .map(|p| format!(", a diff over {p}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn flatten(
    store: PathBuf,
    name: SnapshotId,
    as_name: SnapshotId,
    limits: Limits,
) -> anyhow::Result<()> {
    let store = open_local(store, &limits)?;
    let bar = bar(0, format!("flattening {name}"));
    let summary = store.flatten_blocking(&name, &as_name, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let s = summary?;
    println!(
        "flattened {name} into {} : {} pages, standalone",
        s.name, s.page_count
    );
    Ok(())
}

#[tokio::main]
async fn inspect(
    location: StoreLocation,
    name: SnapshotId,
    verify: bool,
    json: bool,
) -> anyhow::Result<()> {
    let opened = open_store(&location, &Limits::default())?;
    let snapshot = opened.store.open(&name).await?;
    let m = snapshot.manifest();
    let chunks = match &opened.object {
        Some(object) => Some(object.open(&name).await?.chunk_layout()),
        None => None,
    };
    let mismatches = if verify {
        let mut bad = Vec::new();
        let chunk = (8 << 20) / m.page_size.bytes();
        let mut start = 0;
        while start < m.page_count {
            let range = PageRange::new(PageIndex(start), chunk.min(m.page_count - start))
                .expect("non-empty");
            let data = snapshot.read(range).await?;
            for (i, page) in data.chunks(m.page_size.bytes_usize()).enumerate() {
                let p = PageIndex(start + i as u64);
                if !m.verify(p, page) {
                    bad.push(p.0);
                }
            }
            start = range.end();
        }
        Some(bad)
    } else {
        None
    };
    let working_sets: Vec<_> = m
        .working_sets
        .iter()
        .map(|ws| {
            let pages = snapshot.working_set(ws).map_or(0, |p| p.len());
            serde_json::json!({ "name": ws, "pages": pages })
        })
        .collect();
    let zero_pages = m.zero_map.count_ones();
    let layer = match opened.local() {
        Some(local) => local.layer_info_blocking(&name)?,
        None => LayerInfo::standalone(m.page_count),
    };
    if json {
        let out = serde_json::json!({
            "name": m.id,
            "kind": layer.kind,
            "parent": layer.parent,
            "depth": layer.depth,
            "own_pages": layer.own_pages,
            "format_version": m.format_version,
            "page_size": m.page_size.bytes(),
            "page_count": m.page_count,
            "image_size": m.image_size(),
            "zero_pages": zero_pages,
            "digest_algorithm": m.digest_algorithm,
            "regions": m.regions,
            "working_sets": working_sets,
            "verified": mismatches.as_ref().map(Vec::is_empty),
            "mismatched_pages": mismatches,
            "chunks": chunks,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:<12} {}", layer.kind.to_string(), m.id);
        if let Some(p) = &layer.parent {
            println!(
                "parent       {p} (chain depth {}, {} pages its own)",
                layer.depth, layer.own_pages
            );
        }
        println!("page size    {}", m.page_size);
        println!("pages        {} ({} bytes)", m.page_count, m.image_size());
        println!(
            "zero pages   {} ({:.1}%, not stored)",
            zero_pages,
            100.0 * zero_pages as f64 / m.page_count as f64
        );
        println!("digests      {:?}", m.digest_algorithm);
        if let Some(c) = chunks {
            println!(
                "chunks       {} of {} bytes, {} stored ({} all zeros, not stored)",
                c.chunks,
                c.chunk_bytes,
                c.stored,
                c.chunks - c.stored
            );
        }
        for r in &m.regions {
            println!(
                "region       {:<12} guest {:#x} offset {:#x} size {:#x}",
                r.name, r.guest_address, r.offset, r.size
            );
        }
        for ws in &working_sets {
            println!("working set  {} ({} pages)", ws["name"], ws["pages"]);
        }
        if let Some(bad) = &mismatches {
            if bad.is_empty() {
                println!("verify       every page matches its digest");
            } else {
                println!(
                    "verify       {} page(s) do not match their digest, first: {:?}",
                    bad.len(),
                    &bad[..bad.len().min(10)]
                );
            }
        }
    }
    if mismatches.is_some_and(|b| !b.is_empty()) {
        bail!("snapshot {} is corrupt; re-import it", m.id);
    }
    Ok(())
}

#[tokio::main]
async fn list(location: StoreLocation, json: bool) -> anyhow::Result<()> {
    let store = open_store(&location, &Limits::default())?.store;
    let snapshots = store
        .list()
        .await
        .with_context(|| format!("in {location}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshots)?);
        return Ok(());
    }
    if snapshots.is_empty() {
        println!("no snapshots; add one with `faultline-server import`");
    }
    for s in snapshots {
        println!(
            "{:<32} {:<8} {:>10} pages of {:>7}  {:>5.1}% zero  {}  working sets: {}",
            s.name.as_str(),
            s.layer.kind.to_string(),
            s.page_count,
            PageSize::try_from(s.page_size)
                .map_or_else(|_| s.page_size.to_string(), |p| p.to_string()),
            100.0 * s.zero_pages as f64 / s.page_count as f64,
            match &s.layer.parent {
                Some(p) => format!("over {p} (depth {})", s.layer.depth),
                None => "standalone".to_owned(),
            },
            if s.working_sets.is_empty() {
                "none".to_owned()
            } else {
                s.working_sets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    Ok(())
}
