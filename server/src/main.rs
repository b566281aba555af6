//! `faultline-server`: serve, import, inspect and list memory snapshots.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use faultline_proto::{PageIndex, PageRange, PageSize, SnapshotId};
use faultline_server::import::parse_size;
use faultline_server::import::{RegionArg, import};
use faultline_server::readiness::Readiness;
use faultline_server::store::object::{DiskCache, ObjectStoreOptions, OpenedStore, StoreLocation};
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
    /// Serve the snapshots of a store over gRPC.
    Serve {
        /// Snapshot store: a directory, or s3://BUCKET/PREFIX (credentials,
        /// region and endpoint from the AWS_* variables).
        #[arg(long, env = "FAULTLINE_STORE")]
        store: StoreLocation,
        /// Address for gRPC.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Address for Prometheus metrics (GET /metrics) and the liveness and
        /// readiness probes (GET /livez, /readyz); none if not given.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Memory for chunks read from an object store (K/M/G suffixes).
        #[arg(long = "chunk-cache", value_name = "BYTES", default_value = "1G", value_parser = parse_size)]
        chunk_cache: u64,
        /// Also keep chunks read from an object store as files in this
        /// directory (created mode 0700: they hold guest memory).
        #[arg(long = "chunk-cache-dir", value_name = "DIR")]
        chunk_cache_dir: Option<PathBuf>,
        /// Most bytes of chunks kept in --chunk-cache-dir (K/M/G/T suffixes).
        #[arg(long = "chunk-cache-disk", value_name = "BYTES", default_value = "10G", value_parser = parse_size)]
        chunk_cache_disk: u64,
        #[command(flatten)]
        limits: Limits,
    },
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
        Command::Serve {
            store,
            listen,
            metrics_listen,
            chunk_cache,
            chunk_cache_dir,
            chunk_cache_disk,
            limits,
        } => serve(
            store,
            listen,
            metrics_listen,
            ChunkCaches {
                memory: chunk_cache,
                dir: chunk_cache_dir,
                disk: chunk_cache_disk,
            },
            limits,
        ),
        Command::Import {
            store,
            name,
            mem_file,
            page_size,
            regions,
            limits,
        } => import_cmd(store, name, mem_file, page_size, regions, limits),
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

/// `serve`'s chunk cache flags.
#[derive(Debug)]
struct ChunkCaches {
    memory: u64,
    dir: Option<PathBuf>,
    disk: u64,
}

#[tokio::main]
async fn serve(
    location: StoreLocation,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    caches: ChunkCaches,
    limits: Limits,
) -> anyhow::Result<()> {
    // Before the store, whose cache reports its capacity as it starts.
    metrics::install();
    let options = ObjectStoreOptions {
        cache_bytes: caches.memory,
        ..ObjectStoreOptions::with_limits(&limits)
    };
    let disk = match caches.dir {
        Some(dir) => Some(
            DiskCache::open(&dir, caches.disk)
                .with_context(|| format!("cannot use {} as the chunk cache", dir.display()))?,
        ),
        None => None,
    };
    let opened = location.open_with(&limits, options, disk)?;
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
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; is another server running there?"))?;
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
    tracing::info!(
        "serving {snapshots} snapshot(s) of {location} on {}",
        listener.local_addr()?
    );
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
    faultline_server::run_with_readiness(listener, store, limits, readiness, async move {
        let _ = stop.wait_for(|s| *s).await;
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
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
    if json {
        let out = serde_json::json!({
            "name": m.id,
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
        println!("snapshot     {}", m.id);
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
            "{:<32} {:>10} pages of {:>7}  {:>5.1}% zero  working sets: {}",
            s.name.as_str(),
            s.page_count,
            PageSize::try_from(s.page_size)
                .map_or_else(|_| s.page_size.to_string(), |p| p.to_string()),
            100.0 * s.zero_pages as f64 / s.page_count as f64,
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
