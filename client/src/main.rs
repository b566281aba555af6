//! `faultline`: the client side of faultline on the command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use faultline_client::backing::BackingKind;
use faultline_client::fetch::fetch_from_servers;
use faultline_client::firecracker;
use faultline_client::pager::far::Budget;
use faultline_client::pager::{OnFailure, PagerConfig, PrefetchPolicy, StreamTransport};
use faultline_client::remote::ConnectOptions;
use faultline_client::restore::{FarRestoreOptions, RestoreOptions, Touch};
use faultline_client::strategy::Mode;
use faultline_proto::{Compression, SnapshotId};

#[derive(Parser, Debug)]
#[command(
    name = "faultline",
    version,
    about = "Restores VM memory from a faultline server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Restore a snapshot lazily into memory of a backing type, touch pages from
    /// threads like a guest, verify them, and print a summary. With --volume and --budget:
    /// far memory, a region larger than the budget backed by a volume on the server; with
    /// --touch write-from:FILE the threads write FILE's pages into it in a random order
    /// (evicting and writing back on the way) and a final flush makes them durable.
    Restore(RestoreArgs),
    /// Serve Firecracker VMs restoring a snapshot: listen on a Unix socket for Firecracker's UFFD
    /// handshake (snapshot load with mem_backend {backend_type: "Uffd", backend_path: SOCKET}) and
    /// fill each VM's memory from the server until the VM exits. A VM that cannot be served (bad
    /// handshake, snapshot missing or of another page size, server unreachable past --deadline)
    /// gets SIGBUS at its next memory access instead of hanging. Stops on SIGINT or SIGTERM,
    /// poisoning the pages not yet filled of VMs still restoring (they get SIGBUS if they touch
    /// one).
    FcHandler {
        /// The Unix socket to listen on. A stale socket file left by a killed handler is
        /// replaced; a socket another handler is serving on is refused. SOCKET.lock is kept beside
        /// it as the handler's lock.
        #[arg(long)]
        socket: PathBuf,
        /// The server, http://HOST:PORT, https://HOST:PORT, or unix:///PATH for one on this host
        /// (pages then come from its page file, docs/protocol.md). For a fleet, repeat it or give a DNS
        /// name with several addresses: each snapshot's home server is chosen by rendezvous
        /// hashing, the others (ready ones first) are where it fails over to.
        #[arg(long = "server", env = "FAULTLINE_SERVER", required = true)]
        servers: Vec<String>,
        #[command(flatten)]
        connect: ConnectArgs,
        /// The snapshot of Firecracker's memory file (imported with faultline-server import).
        #[arg(long)]
        snapshot: SnapshotId,
        /// Background prefetch: none, working-set or all.
        #[arg(long, default_value = "all")]
        prefetch: PrefetchPolicy,
        /// When pages cannot be fetched: wait, or poison (SIGBUS on touch). abort means poison
        /// here: one VM's trouble never aborts the handler serving the others.
        #[arg(long, default_value = "wait")]
        on_failure: OnFailure,
        /// Seconds without the server before --on-failure applies (also to the manifest a new VM
        /// needs: past it, with poison, that VM fails).
        #[arg(long, default_value_t = 30)]
        deadline: u64,
        /// Transport of demand faults: auto (the lean transport where the server offers it, else
        /// gRPC), lean, or grpc (HTTP/2, for comparison).
        #[arg(long, default_value = "auto")]
        fault_transport: StreamTransport,
        /// Transport of prefetch streams: auto, lean or grpc, as for --fault-transport.
        #[arg(long, default_value = "auto")]
        prefetch_transport: StreamTransport,
    },
    /// Show what this host's kernel offers faultline, per backing type: run it first.
    Probe {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Download a whole snapshot into a raw memory file, every page verified.
    Fetch {
        /// The server, http://HOST:PORT, https://HOST:PORT, or unix:///PATH for one on this host
        /// (pages then come from its page file, docs/protocol.md). For a fleet, repeat it or give a DNS
        /// name with several addresses: each snapshot's home server is chosen by rendezvous
        /// hashing, the others (ready ones first) are where it fails over to.
        #[arg(long = "server", env = "FAULTLINE_SERVER", required = true)]
        servers: Vec<String>,
        #[command(flatten)]
        connect: ConnectArgs,
        /// The snapshot, or (--volume) a volume: its newest acknowledged writes.
        #[arg(long, visible_alias = "volume")]
        snapshot: SnapshotId,
        /// Output file (zero pages become holes).
        #[arg(long)]
        out: PathBuf,
        /// Compression on the wire: none, lz4 or zstd.
        #[arg(long, default_value = "none")]
        compression: Compression,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// How to connect to a server: TLS and token.
#[derive(clap::Args, Debug)]
struct ConnectArgs {
    /// CA certificates (PEM) an https:// server's certificate must chain to (default: the
    /// system's roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that require mutual TLS; needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Bearer token, for servers that require one (made with `faultline-server token new`).
    #[arg(long, env = "FAULTLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ConnectArgs {
    /// The library's options; reads the files now.
    fn options(&self) -> anyhow::Result<ConnectOptions> {
        Ok(ConnectOptions::from_files(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
            self.token.as_deref(),
        )?)
    }
}

/// `faultline restore`'s arguments.
#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// The server, http://HOST:PORT, https://HOST:PORT, or unix:///PATH for one on this host
    /// (pages then come from its page file, docs/protocol.md). For a fleet, repeat it or give a DNS
    /// name with several addresses: each snapshot's home server is chosen by rendezvous
    /// hashing, the others (ready ones first) are where it fails over to.
    #[arg(long = "server", env = "FAULTLINE_SERVER", required = true)]
    servers: Vec<String>,
    #[command(flatten)]
    connect: ConnectArgs,
    /// The snapshot.
    #[arg(long, required_unless_present = "volume", conflicts_with = "volume")]
    snapshot: Option<SnapshotId>,
    /// Far memory: a volume on the server (faultline-server volume create) backing a region
    /// of its size, of which at most --budget is resident; needs --budget.
    #[arg(long, requires = "budget")]
    volume: Option<SnapshotId>,
    /// The local memory budget of --volume: bytes (64M, 1GiB) or pages (16384pages).
    #[arg(long, requires = "volume")]
    budget: Option<Budget>,
    /// Memory to create: anon, shmem, hugetlb (2 MiB pages; a snapshot of 4 KiB pages is
    /// installed 2 MiB at a time, and its size must be a multiple of 2 MiB) or guest-memfd.
    /// Far memory: anon or shmem.
    #[arg(long, default_value = "anon")]
    backing: BackingKind,
    /// Resolve method: auto (from what the kernel advertises), copy or continue.
    #[arg(long, default_value = "auto", conflicts_with = "volume")]
    mode: Mode,
    /// Background prefetch: none, working-set or all.
    #[arg(long, default_value = "all", conflicts_with = "volume")]
    prefetch: PrefetchPolicy,
    /// Pages to touch: none, all, random:N or working-set; with --volume, write-from:FILE
    /// (every page of FILE written, in a random order, then flushed).
    #[arg(long, default_value = "all")]
    touch: String,
    /// Touching threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Record the first-touch order and store it on the server as the working set (read-ahead
    /// is off while recording, so that the set is exactly the pages touched).
    #[arg(long, conflicts_with = "volume")]
    record: bool,
    /// Check every touched page against the manifest's digest.
    #[arg(long, conflicts_with = "volume")]
    verify: bool,
    /// When pages cannot be fetched: wait, poison (SIGBUS on touch) or abort.
    #[arg(long, default_value = "wait", conflicts_with = "volume")]
    on_failure: OnFailure,
    /// Seconds without the server before --on-failure applies.
    #[arg(long, default_value_t = 30, conflicts_with = "volume")]
    deadline: u64,
    /// Transport of demand faults: auto (the lean transport where the server offers it, else
    /// gRPC), lean, or grpc (HTTP/2, for comparison).
    #[arg(long, default_value = "auto", conflicts_with = "volume")]
    fault_transport: StreamTransport,
    /// Transport of prefetch streams: auto, lean or grpc, as for --fault-transport.
    #[arg(long, default_value = "auto", conflicts_with = "volume")]
    prefetch_transport: StreamTransport,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl RestoreArgs {
    /// The far-memory options, if --volume was given.
    fn far_options(&self) -> anyhow::Result<Option<FarRestoreOptions>> {
        let (Some(volume), Some(budget)) = (&self.volume, self.budget) else {
            return Ok(None);
        };
        let source = self.touch.strip_prefix("write-from:").with_context(|| {
            format!(
                "--volume takes --touch write-from:FILE, not {:?}",
                self.touch
            )
        })?;
        if self.servers.len() > 1 {
            anyhow::bail!("--volume takes one --server");
        }
        Ok(Some(FarRestoreOptions {
            server: self.servers[0].clone(),
            connect: self.connect.options()?,
            volume: volume.clone(),
            backing: self.backing,
            budget,
            source: source.into(),
            threads: self.threads,
        }))
    }

    /// The library's options for these arguments.
    fn options(self) -> anyhow::Result<RestoreOptions> {
        if self.touch.starts_with("write-from:") {
            anyhow::bail!("--touch write-from:FILE needs --volume and --budget (far memory)");
        }
        Ok(RestoreOptions {
            connect: self.connect.options()?,
            servers: self.servers,
            snapshot: self
                .snapshot
                .context("--snapshot or --volume is required")?,
            backing: self.backing,
            mode: self.mode,
            prefetch: self.prefetch,
            touch: self.touch.parse::<Touch>().map_err(anyhow::Error::msg)?,
            threads: self.threads,
            record: self.record,
            verify: self.verify,
            on_failure: self.on_failure,
            deadline: std::time::Duration::from_secs(self.deadline),
            fault_transport: self.fault_transport,
            prefetch_transport: self.prefetch_transport,
        })
    }
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
        Command::Restore(args) => {
            let json = args.json;
            if let Some(far) = args.far_options()? {
                let summary = faultline_client::restore::run_far(&far).with_context(|| {
                    format!(
                        "writing {} into volume {}",
                        far.source.display(),
                        far.volume
                    )
                })?;
                if json {
                    println!("{}", serde_json::to_value(&summary)?);
                } else {
                    println!("{summary}");
                }
                return Ok(());
            }
            let opts = args.options()?;
            let summary = faultline_client::restore::run(&opts)
                .with_context(|| format!("restoring {}", opts.snapshot))?;
            if json {
                let mut v = serde_json::to_value(&summary)?;
                v.as_object_mut().expect("an object").remove("stats");
                println!("{v}");
            } else {
                println!("{summary}");
            }
            if summary.mismatches > 0 {
                anyhow::bail!(
                    "{} touched page(s) did not match their digest",
                    summary.mismatches
                );
            }
            Ok(())
        }
        Command::FcHandler {
            socket,
            servers,
            connect,
            snapshot,
            prefetch,
            on_failure,
            deadline,
            fault_transport,
            prefetch_transport,
        } => {
            let mut config = PagerConfig::new(servers[0].clone(), snapshot);
            config.servers = servers;
            config.connect = connect.options()?;
            config.prefetch = prefetch;
            config.on_failure = on_failure;
            config.deadline = std::time::Duration::from_secs(deadline);
            config.fault_transport = fault_transport;
            config.prefetch_transport = prefetch_transport;
            let listener = firecracker::bind(&socket)?;
            let handler = firecracker::Handler::new(config);
            stop_on_signal(handler.clone())?;
            tracing::info!("waiting for Firecracker on {}", socket.display());
            handler.serve(listener)?;
            let stats = handler.stats();
            tracing::info!(
                "stopped: {} connection(s), {} refused, {} failed (memory poisoned), {} ended by \
                 their VM, {} pager(s) failed, {} stopped with the handler",
                stats.accepted,
                stats.rejected,
                stats.failed,
                stats.peer_closed,
                stats.pager_failed,
                stats.stopped
            );
            Ok(())
        }
        Command::Probe { json } => {
            let report = faultline_client::probe::run();
            if json {
                println!("{}", report.to_json());
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Fetch {
            servers,
            connect,
            snapshot,
            out,
            compression,
            json,
        } => {
            let opts = connect.options()?;
            let rt = tokio::runtime::Runtime::new()?;
            let stats = rt.block_on(async {
                let mut last_pct = 0;
                fetch_from_servers(
                    &servers,
                    &opts,
                    &snapshot,
                    &out,
                    compression,
                    |done, total| {
                        let pct = done * 100 / total.max(1);
                        if !json && pct >= last_pct + 10 {
                            eprintln!("  {pct:>3}% ({done}/{total} pages)");
                            last_pct = pct;
                        }
                    },
                )
                .await
                .with_context(|| format!("fetching {snapshot} from {}", servers.join(", ")))
            })?;
            let secs = stats.elapsed.as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "snapshot": snapshot,
                        "pages": stats.pages,
                        "zero_pages": stats.zero_pages,
                        "bytes_received": stats.bytes,
                        "wire_bytes": stats.wire_bytes,
                        "batches": stats.batches,
                        "elapsed_s": secs,
                        "verified": true,
                    })
                );
            } else {
                println!(
                    "fetched {snapshot}: {} pages ({} zero, not sent), {:.1} MiB received in {} \
                     batches, {:.2}s ({:.2} GB/s), every page verified against its digest",
                    stats.pages,
                    stats.zero_pages,
                    stats.bytes as f64 / (1 << 20) as f64,
                    stats.batches,
                    secs,
                    stats.bytes as f64 / secs / 1e9
                );
            }
            Ok(())
        }
    }
}

/// Stops `handler` on SIGINT or SIGTERM (a thread with a small runtime waits for them).
fn stop_on_signal(handler: firecracker::Handler) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    tracing::warn!("cannot install signal handlers; stop with SIGKILL");
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("signal received: stopping every pager");
                handler.stop();
            });
        })?;
    Ok(())
}
