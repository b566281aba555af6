//! `faultline restore`: a whole lazy restore in one process, as a VMM would
//! run it: create guest memory of a backing type, start the pager on it,
//! touch pages from several threads the way a guest would, verify every
//! touched page against the manifest's digests, and summarise.
//!
//! With a volume and a budget ([`run_far`]), the same in far memory: the touching threads write
//! a file's pages into a region larger than the budget, evicting and writing back on the way,
//! and a final flush makes all of it durable on the server.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultline_proto::{PageIndex, SnapshotId, pb};
use futures::StreamExt;

use crate::backing::{AccessError, BackingError, BackingKind, GuestMemory};
use crate::pager::far::{Budget, FarError, FarPager, FarStats, FarStore, RemoteStore, StoreError};
use crate::pager::{
    Latency, OnFailure, PagerConfig, PagesBySource, PrefetchPolicy, Region, StartError, Stats,
    StreamTransport,
};
use crate::remote::{ConnectOptions, Remote, RemoteError};
use crate::strategy::Mode;

/// Longest wait for the background prefetch to finish after touching.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(600);

/// Which pages the touching threads read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    /// None: only the prefetcher fills memory.
    None,
    /// Every page, in address order, interleaved across threads.
    All,
    /// `n` pages chosen at random (fixed seed), spread across threads.
    Random(u64),
    /// The recorded working set, in its first-touch order.
    WorkingSet,
}

impl std::str::FromStr for Touch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "all" => Ok(Self::All),
            "working-set" => Ok(Self::WorkingSet),
            _ => s
                .strip_prefix("random:")
                .and_then(|n| n.parse().ok())
                .map(Self::Random)
                .ok_or_else(|| {
                    format!("unknown touch pattern {s:?}; use none, all, random:N or working-set")
                }),
        }
    }
}

/// What to restore and how.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Server URLs (a fleet: DNS names expanded, the snapshot's home
    /// server chosen by rendezvous hashing, the rest the fail-over order;
    /// see [`crate::fleet`]).
    pub servers: Vec<String>,
    /// How to connect to them: TLS, token.
    pub connect: ConnectOptions,
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Backing type of the guest memory created.
    pub backing: BackingKind,
    /// Resolve method.
    pub mode: Mode,
    /// Background prefetch.
    pub prefetch: PrefetchPolicy,
    /// Pages touched.
    pub touch: Touch,
    /// Touching threads.
    pub threads: usize,
    /// Record the first-touch order and upload it as the working set.
    pub record: bool,
    /// Check every touched page against its digest.
    pub verify: bool,
    /// Failure policy.
    pub on_failure: OnFailure,
    /// Failure deadline.
    pub deadline: Duration,
    /// Which transport carries demand faults.
    pub fault_transport: StreamTransport,
    /// Which transport carries prefetch streams.
    pub prefetch_transport: StreamTransport,
}

/// The outcome, as printed by `faultline restore --json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreSummary {
    /// The snapshot.
    pub snapshot: String,
    /// Backing type.
    pub backing: String,
    /// The servers in the order the pager used them: the snapshot's home
    /// server first, then the fail-over order (those not ready last).
    pub servers: Vec<String>,
    /// Strategy chosen.
    pub strategy: String,
    /// Why.
    pub strategy_reason: String,
    /// Pages in the region.
    pub pages_total: u64,
    /// Pages touched by the threads.
    pub pages_touched: u64,
    /// Pages installed, by how they arrived.
    pub pages_by_source: PagesBySource,
    /// Page bytes received from the server.
    pub bytes_received: u64,
    /// Seconds from start to the end (touching done and, with prefetch,
    /// completion).
    pub elapsed_s: f64,
    /// Seconds the touching threads took.
    pub touch_s: f64,
    /// Seconds to completion, if the restore completed.
    pub completed_s: Option<f64>,
    /// Fault latency.
    pub fault_latency_us: Latency,
    /// Every touched page matched its digest (null without `--verify`).
    pub verified: Option<bool>,
    /// Touched pages that did not match.
    pub mismatches: u64,
    /// Pages recorded as the working set, with `--record`.
    pub recorded_pages: Option<u64>,
    /// All statistics.
    pub stats: Stats,
}

/// A restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Talking to the server failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The guest memory could not be created.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The pager did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The image does not fit the backing.
    #[error("{0}")]
    Layout(String),
    /// The runtime could not start.
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
}

/// A small deterministic generator for random touches.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The recorded working set's pages in order, read from a Prefetch stream
/// of just that set on a throwaway connection (page data is discarded).
async fn working_set_order(
    url: &str,
    connect: &ConnectOptions,
    snapshot: &SnapshotId,
    page_bytes: u64,
) -> Result<Vec<PageIndex>, RemoteError> {
    let remote = Remote::connect_with(url, connect).await?;
    let mut stream = remote
        .prefetch(pb::PrefetchRequest {
            snapshot: snapshot.to_string(),
            order: pb::PrefetchOrder::WorkingSetOnly as i32,
            // One page per batch keeps the first-touch order exact.
            max_batch_bytes: page_bytes,
            ..Default::default()
        })
        .await?;
    let mut order = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(RemoteError::rpc("Prefetch"))?;
        for r in batch.runs {
            order.extend((r.start..r.start + r.count).map(PageIndex));
        }
        for z in batch.zero {
            order.extend((z.start..z.start + z.count).map(PageIndex));
        }
    }
    Ok(order)
}

/// Runs a restore; see the module docs. Blocking.
pub fn run(opts: &RestoreOptions) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    if opts.servers.is_empty() {
        return Err(StartError::NoServer.into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RestoreError::Runtime)?;
    // The snapshot's home server first, then the fail-over order.
    let mut connect = opts.connect.clone();
    let plan = rt
        .block_on(crate::fleet::plan(
            &opts.servers,
            &mut connect,
            &opts.snapshot,
        ))
        .map_err(StartError::from)?;
    let (manifest, url) = rt.block_on(async {
        let mut last = None;
        for url in &plan.servers {
            let got = async {
                let remote = Remote::connect_with(url, &connect).await?;
                remote.manifest(&opts.snapshot).await
            };
            match got.await {
                Ok(m) => return Ok((m, url.clone())),
                Err(e) if e.is_transient() && plan.servers.len() > 1 => {
                    tracing::warn!("{e}; trying the next server");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("one server at least"))
    })?;
    let page_bytes = manifest.page_size.bytes();
    let pages: Vec<PageIndex> = match opts.touch {
        Touch::None => Vec::new(),
        Touch::All => (0..manifest.page_count).map(PageIndex).collect(),
        Touch::Random(n) => {
            let mut seed = 0x2545_f491_4f6c_dd1d;
            (0..n.min(manifest.page_count))
                .map(|_| PageIndex(xorshift(&mut seed) % manifest.page_count))
                .collect()
        }
        Touch::WorkingSet => rt.block_on(working_set_order(
            &url,
            &connect,
            &opts.snapshot,
            page_bytes,
        ))?,
    };
    drop(rt);

    let size = usize::try_from(manifest.image_size()).map_err(|_| {
        RestoreError::Layout("the snapshot is larger than the address space".into())
    })?;
    let memory = GuestMemory::new(opts.backing, size)?;
    let mut config = PagerConfig::new(url, opts.snapshot.clone());
    config.servers = plan.servers.clone();
    config.connect = connect;
    config.mode = opts.mode;
    config.prefetch = opts.prefetch;
    config.record = opts.record;
    if opts.record {
        // Exactly the pages touched, not their read-ahead neighbours.
        config.readahead = crate::pager::NO_READAHEAD;
    }
    config.on_failure = opts.on_failure;
    config.deadline = opts.deadline;
    config.fault_transport = opts.fault_transport;
    config.prefetch_transport = opts.prefetch_transport;
    let pager = crate::pager::Pager::start(
        config,
        vec![Region {
            memory,
            snapshot_offset: 0,
        }],
    )?;
    let decision = pager.decision(0).clone();
    let base = pager.memory(0).host_addr();

    let touch_started = Instant::now();
    let mismatches = AtomicU64::new(0);
    let threads = opts.threads.max(1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (pages, manifest, mismatches) = (&pages, &manifest, &mismatches);
            let verify = opts.verify;
            s.spawn(move || {
                let mut buf = vec![0u8; page_bytes as usize];
                for p in pages.iter().skip(t).step_by(threads) {
                    let addr = base + (p.0 * page_bytes) as usize;
                    // SAFETY: `addr..addr + page_bytes` is inside the pager's
                    // region, mapped read-write while `pager` lives (it
                    // outlives this scope); the read faults the page in
                    // through the pager like a guest access would. Guest
                    // memory holds no Rust object, so a byte copy is sound.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            addr as *const u8,
                            buf.as_mut_ptr(),
                            buf.len(),
                        );
                    }
                    if verify && !manifest.verify(*p, &buf) {
                        mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let touch_s = touch_started.elapsed().as_secs_f64();
    // Only a full prefetch completes a restore whose touches miss pages.
    if opts.prefetch == PrefetchPolicy::All && pager.wait_complete(COMPLETION_TIMEOUT).is_none() {
        tracing::warn!("the restore did not complete within {COMPLETION_TIMEOUT:?}");
    }
    // On completion the pager uploads its recording itself; uploading again
    // replaces it with the same pages and tells how many were stored.
    let recorded_pages = if opts.record {
        Some(pager.record_working_set()?)
    } else {
        None
    };
    let stats = pager.stats();
    let mismatches = mismatches.into_inner();
    let mut distinct: Vec<u64> = pages.iter().map(|p| p.0).collect();
    distinct.sort_unstable();
    distinct.dedup();
    Ok(RestoreSummary {
        snapshot: opts.snapshot.to_string(),
        backing: opts.backing.to_string(),
        servers: plan.servers.clone(),
        strategy: decision.strategy().to_string(),
        strategy_reason: decision.choice.reason.clone(),
        pages_total: stats.pages_total,
        pages_touched: distinct.len() as u64,
        pages_by_source: stats.pages_by_source,
        bytes_received: stats.bytes_received,
        elapsed_s: started.elapsed().as_secs_f64(),
        touch_s,
        completed_s: stats.completed_s,
        fault_latency_us: stats.fault_latency_us,
        verified: opts.verify.then_some(mismatches == 0),
        mismatches,
        recorded_pages,
        stats,
    })
}

impl std::fmt::Display for RestoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.pages_by_source;
        writeln!(f, "restored {} into {} memory", self.snapshot, self.backing)?;
        if self.servers.len() > 1 {
            writeln!(
                f,
                "  servers    {} (home), then {}",
                self.servers[0],
                self.servers[1..].join(", ")
            )?;
        }
        writeln!(
            f,
            "  strategy   {}: {}",
            self.strategy, self.strategy_reason
        )?;
        writeln!(
            f,
            "  pages      {} in the region, {} touched",
            self.pages_total, self.pages_touched
        )?;
        writeln!(
            f,
            "  arrived    demand {}, read-ahead {}, prefetch {}, zero (local) {}, page cache {}, \
             eager {}",
            s.demand, s.readahead, s.prefetch, s.zero, s.local, s.eager
        )?;
        writeln!(
            f,
            "  received   {:.1} MiB",
            self.bytes_received as f64 / (1 << 20) as f64
        )?;
        let l = &self.fault_latency_us;
        writeln!(
            f,
            "  faults     {} over the network: p50 {} us, p99 {} us, max {} us",
            l.count, l.p50, l.p99, l.max
        )?;
        match self.completed_s {
            Some(c) => writeln!(
                f,
                "  time       touching {:.3}s, complete after {c:.3}s, total {:.3}s",
                self.touch_s, self.elapsed_s
            )?,
            None => writeln!(
                f,
                "  time       touching {:.3}s, total {:.3}s (not complete: pages not touched \
                 were not prefetched)",
                self.touch_s, self.elapsed_s
            )?,
        }
        if let Some(n) = self.recorded_pages {
            writeln!(f, "  recorded   working set of {n} pages uploaded")?;
        }
        match self.verified {
            Some(true) => write!(f, "  verified   every touched page matches its digest"),
            Some(false) => write!(
                f,
                "  verified   {} touched page(s) DO NOT match their digest",
                self.mismatches
            ),
            None => write!(f, "  verified   not checked (pass --verify)"),
        }
    }
}
/// What `faultline restore --volume V --budget B --touch write-from:FILE` does: far memory.
#[derive(Clone, Debug)]
pub struct FarRestoreOptions {
    /// The server URL.
    pub server: String,
    /// How to connect to it.
    pub connect: ConnectOptions,
    /// The volume.
    pub volume: SnapshotId,
    /// Backing type of the memory: anonymous or shmem.
    pub backing: BackingKind,
    /// Local memory budget.
    pub budget: Budget,
    /// The file whose pages the touching threads write into the region, in a random order.
    pub source: PathBuf,
    /// Touching threads.
    pub threads: usize,
}

/// The outcome of a far-memory restore, as printed by `faultline restore --json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FarRestoreSummary {
    /// The volume.
    pub volume: String,
    /// Backing type.
    pub backing: String,
    /// Pages of the file written into the region.
    pub pages_written: u64,
    /// Seconds the touching threads took (evictions and write-backs included).
    pub touch_s: f64,
    /// Seconds the final flush took.
    pub flush_s: f64,
    /// Pages the final flush wrote back.
    pub flushed_pages: u64,
    /// Seconds in all.
    pub elapsed_s: f64,
    /// The far-memory pager's statistics.
    pub stats: FarStats,
}

/// A far-memory restore failed. Nothing written since the last flush is durable.
#[derive(Debug, thiserror::Error)]
pub enum FarRestoreError {
    /// The volume could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Source {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not fit the volume.
    #[error(
        "{} is {file} bytes, larger than volume {volume} ({size} bytes); create a larger \
         volume (faultline-server volume create --size)", path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        file: u64,
        /// The volume.
        volume: String,
        /// The volume's size.
        size: u64,
    },
    /// The memory could not be created.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The far-memory pager failed.
    #[error(transparent)]
    Far(#[from] FarError),
    /// Writing into the region failed.
    #[error("writing into the region: {0}")]
    Access(#[from] AccessError),
}

/// Runs a far-memory restore; see [`FarRestoreOptions`]. Blocking.
pub fn run_far(opts: &FarRestoreOptions) -> Result<FarRestoreSummary, FarRestoreError> {
    let started = Instant::now();
    let source_err = |source| FarRestoreError::Source {
        path: opts.source.clone(),
        source,
    };
    let file = File::open(&opts.source).map_err(source_err)?;
    let file_len = file.metadata().map_err(source_err)?.len();
    let store = RemoteStore::open(&opts.server, &opts.connect, opts.volume.clone())?;
    let page_bytes = store.page_size();
    let size = store.page_count() * page_bytes;
    if file_len > size {
        return Err(FarRestoreError::TooLarge {
            path: opts.source.clone(),
            file: file_len,
            volume: opts.volume.to_string(),
            size,
        });
    }
    let memory = GuestMemory::new(opts.backing, size as usize)?;
    let far = FarPager::start(memory, opts.budget, Arc::new(store))?;
    // Every page of the file once, in a random order (Fisher-Yates, fixed seed).
    let mut order: Vec<u64> = (0..file_len.div_ceil(page_bytes)).collect();
    let mut seed = 0x2545_f491_4f6c_dd1d;
    for i in (1..order.len()).rev() {
        order.swap(i, (xorshift(&mut seed) % (i as u64 + 1)) as usize);
    }
    let touch_started = Instant::now();
    let threads = opts.threads.max(1);
    let progress = AtomicU64::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (order, far, file, progress) = (&order, &far, &file, &progress);
                s.spawn(move || -> Result<(), FarRestoreError> {
                    let mut buf = vec![0u8; page_bytes as usize];
                    for &p in order.iter().skip(t).step_by(threads) {
                        let offset = p * page_bytes;
                        let len = (file_len - offset).min(page_bytes) as usize;
                        file.read_exact_at(&mut buf[..len], offset)
                            .map_err(source_err)?;
                        // Faults the page in (evicting others on the way) and dirties it.
                        far.memory().guest().write(offset as usize, &buf[..len])?;
                        let done = progress.fetch_add(1, Ordering::Relaxed) + 1;
                        if done % (order.len() as u64 / 10).max(1) == 0 {
                            tracing::info!("written {done}/{} pages", order.len());
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a touching thread panicked"))
    })?;
    let touch_s = touch_started.elapsed().as_secs_f64();
    let flush_started = Instant::now();
    let flushed_pages = far.flush()?;
    let flush_s = flush_started.elapsed().as_secs_f64();
    let stats = far.shutdown()?;
    Ok(FarRestoreSummary {
        volume: opts.volume.to_string(),
        backing: opts.backing.to_string(),
        pages_written: order.len() as u64,
        touch_s,
        flush_s,
        flushed_pages,
        elapsed_s: started.elapsed().as_secs_f64(),
        stats,
    })
}

impl std::fmt::Display for FarRestoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stats;
        writeln!(
            f,
            "wrote {} pages into volume {} through {} memory with a budget of {} of {} pages",
            self.pages_written, self.volume, self.backing, s.budget_pages, s.pages
        )?;
        writeln!(
            f,
            "  touching: {:.2}s; {} fetches ({} refaults), {} evictions, {} write-protect faults",
            self.touch_s, s.fetches, s.refaults, s.evictions, s.wp_faults
        )?;
        writeln!(
            f,
            "  written back: {} pages ({:.1} MiB), acknowledged durable by the server",
            s.writeback_pages,
            s.writeback_bytes as f64 / (1 << 20) as f64
        )?;
        write!(
            f,
            "  final flush: {} pages in {:.2}s; every write is durable on the server ({:.2}s in all)",
            self.flushed_pages, self.flush_s, self.elapsed_s
        )
    }
}
