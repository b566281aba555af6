//! The pager: fills guest memory from a faultline server, lazily.
//!
//! ```text
//!  vCPU / guest thread faults
//!        |
//!        v
//!  uffd --> fault thread (one per region) --+--> zero page, page-cache page: resolved here
//!                                           |
//!                                           +--> claim a read-ahead window --> demand link
//!                                                                             (Fault stream)
//!  Pager::fault (VMM's own fault source) ---'                                       |
//!                                                       verify digest, install <----'
//!  prefetcher (Prefetch stream, own connection) ---> verify digest, install unclaimed pages
//! ```
//!
//! Every page has one state in [`pages::PageTable`]; claiming a page is an
//! atomic MISSING -> IN_FLIGHT, so concurrent faults, read-ahead and
//! prefetch never fetch or install a page twice, and a fault on a page in
//! flight simply waits for its install (which wakes it). When every page is
//! settled the pager unregisters its regions and reports completion.
//!
//! Threads: fault threads are plain OS threads blocked on their uffd, never
//! async workers. The demand link runs on a single-threaded tokio runtime on
//! a thread of its own; the prefetcher and the completion watcher share a
//! small multi-threaded runtime. Both runtimes belong to the pager.
//! A panic on any pager thread aborts the process: a guest must not run on
//! with memory nobody fills.

mod faults;
mod link;
mod pages;
mod prefetch;
mod region;
mod stats;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use faultline_proto::{
    Compression, Manifest, PageBitmap, PageIndex, PageRange, SnapshotId, WorkingSetName, pb,
};
use futures::FutureExt;
use tokio::sync::{Notify, mpsc};

pub use faults::Readahead;
pub use link::{CORRUPT_RETRIES, Demand};
pub use region::{InstallError, RegionState};
pub use stats::{Latency, PagesBySource, Stats};

use crate::backing::BackingKind;
use crate::backing::GuestMemory;
use crate::remote::{ConnectOptions, Remote, RemoteError};
use crate::strategy::{Choice, Decision, Mode, Strategy, StrategyError, register_for_strategy};
use crate::uffd::{
    OpenError, RegisterModes, ResolveError, ResolveOps, StopSignal, Uffd, WaitError,
};

/// Smallest read-ahead window: 16 KiB. A random fault fetches its page and
/// three neighbours; a page costs ~1 us to send on loopback against a
/// ~50 us round trip, so a few extra pages are nearly free.
pub const MIN_READAHEAD_BYTES: u64 = 16 << 10;

/// Largest read-ahead window: 1 MiB, the prefetch batch size. Sequential
/// scans reach it after six faults.
pub const MAX_READAHEAD_BYTES: u64 = 1 << 20;

/// Read-ahead bounds that fetch only the faulting page. For recording an
/// exact working set: a neighbour fetched ahead is never faulted on, so a
/// recording with read-ahead holds each fault's whole window (on a scattered
/// 10% of 2 GiB, 2.2x the pages touched: docs/BENCHMARKS.md), all of which a
/// replay then moves.
pub const NO_READAHEAD: (u64, u64) = (0, 0);

/// Default time the server may be unreachable (or a page keep failing its
/// digest) before the failure policy applies.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// EAGAIN answers in a row at one page before teardown gives the page up.
const POISON_RETRIES: u32 = 3;

/// Worker threads of the pager's shared network runtime (prefetcher,
/// completion watcher). The demand link has a thread of its own
/// ([`spawn_demand_link`]).
const RUNTIME_THREADS: usize = 2;

/// What to prefetch in the background.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefetchPolicy {
    /// Nothing: demand faults only.
    None,
    /// The recorded working set only.
    WorkingSet,
    /// The working set, then every other page.
    #[default]
    All,
}

impl std::str::FromStr for PrefetchPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "working-set" => Ok(Self::WorkingSet),
            "all" => Ok(Self::All),
            _ => Err(format!(
                "unknown prefetch policy {s:?}; use none, working-set or all"
            )),
        }
    }
}

/// What to do when pages cannot be fetched (server unreachable past the
/// deadline, or a page that keeps failing its digest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Keep retrying; faulting threads keep waiting.
    #[default]
    Wait,
    /// `UFFDIO_POISON` the pages: a thread touching them gets SIGBUS.
    Poison,
    /// Abort the process.
    Abort,
}

impl std::str::FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(Self::Wait),
            "poison" => Ok(Self::Poison),
            "abort" => Ok(Self::Abort),
            _ => Err(format!(
                "unknown failure policy {s:?}; use wait, poison or abort"
            )),
        }
    }
}

/// How the pager runs.
#[derive(Clone, Debug)]
pub struct PagerConfig {
    /// Server URLs (`http://HOST:PORT` or `https://HOST:PORT`), tried in
    /// order on failures.
    pub servers: Vec<String>,
    /// How to connect to them: TLS, token, transport.
    pub connect: ConnectOptions,
    /// The snapshot to restore.
    pub snapshot: SnapshotId,
    /// Resolve method: from the kernel's answer, or forced.
    pub mode: Mode,
    /// Background prefetch.
    pub prefetch: PrefetchPolicy,
    /// Working set prefetched first, and recorded under, if `record`.
    pub working_set: WorkingSetName,
    /// Record the first-touch order of faults, for
    /// [`Pager::record_working_set`] (and upload it on completion). Each
    /// fault records the read-ahead window it fetched; with
    /// [`NO_READAHEAD`] the recording is exactly the pages touched.
    pub record: bool,
    /// Read-ahead window bounds, in bytes.
    pub readahead: (u64, u64),
    /// After this long without the server, or a page failing its digest
    /// past its retries, `on_failure` applies.
    pub deadline: Duration,
    /// What to do then.
    pub on_failure: OnFailure,
    /// Compression asked of the server.
    pub compression: Compression,
}

impl PagerConfig {
    /// Defaults for restoring `snapshot` from `server`.
    pub fn new(server: impl Into<String>, snapshot: SnapshotId) -> Self {
        Self {
            servers: vec![server.into()],
            connect: ConnectOptions::default(),
            snapshot,
            mode: Mode::Auto,
            prefetch: PrefetchPolicy::All,
            working_set: WorkingSetName::default_name(),
            record: false,
            readahead: (MIN_READAHEAD_BYTES, MAX_READAHEAD_BYTES),
            deadline: DEFAULT_DEADLINE,
            on_failure: OnFailure::Wait,
            compression: Compression::None,
        }
    }
}

/// Guest memory to fill, and where in the snapshot its content is.
#[derive(Debug)]
pub struct Region {
    /// The memory.
    pub memory: GuestMemory,
    /// Byte offset in the snapshot's image of the memory's first byte.
    pub snapshot_offset: u64,
}

/// Starting the pager failed; nothing is registered.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No server listed.
    #[error("no server given; pass at least one http://HOST:PORT")]
    NoServer,
    /// The runtime could not start.
    #[error("cannot start the pager's runtime: {0}")]
    Runtime(std::io::Error),
    /// The manifest could not be fetched.
    #[error("cannot fetch the manifest of {snapshot}: {source}")]
    Manifest {
        /// The snapshot.
        snapshot: SnapshotId,
        /// Why.
        source: RemoteError,
    },
    /// A region does not fit the snapshot.
    #[error("region {region} does not fit snapshot {snapshot}: {reason}")]
    Layout {
        /// Region index.
        region: usize,
        /// The snapshot.
        snapshot: SnapshotId,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// A uffd could not be opened.
    #[error(transparent)]
    Uffd(#[from] OpenError),
    /// Registering a region or choosing its strategy failed.
    #[error("region {region}: {source}")]
    Strategy {
        /// Region index.
        region: usize,
        /// Why.
        source: StrategyError,
    },
    /// The stop signal could not be created.
    #[error("cannot create the pager's stop signal: {0}")]
    Stop(#[from] WaitError),
    /// An EAGER region could not be filled before the guest runs.
    #[error("filling region(s) without a lazy method failed: {0}")]
    Eager(String),
}

/// Waiting for a fault fed through [`Pager::fault`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The address range is not in any region.
    #[error("{addr:#x}+{len:#x} is not inside a region of this pager")]
    Outside {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// A page could not be filled (failure policy "poison").
    #[error("page {0} could not be filled and was poisoned")]
    Poisoned(PageIndex),
    /// Resolving failed.
    #[error(transparent)]
    Install(#[from] InstallError),
}

/// State shared by every pager thread and task.
#[derive(Debug)]
pub(crate) struct Shared {
    config: PagerConfig,
    manifest: Arc<Manifest>,
    regions: Vec<RegionState>,
    table: pages::PageTable,
    counters: stats::Counters,
    readahead: Vec<Mutex<Readahead>>,
    demand_tx: mpsc::UnboundedSender<Demand>,
    /// Notified after installs and state changes; waiters re-check.
    progress: Notify,
    started: Instant,
    completed: OnceLock<Duration>,
    stopping: AtomicBool,
    /// First-touch order, when recording.
    recorded: Mutex<Vec<PageRange>>,
}

impl Shared {
    fn demand(&self, d: Demand) {
        // The link lives as long as the pager; a send fails only while
        // stopping, when nothing waits for the answer.
        let _ = self.demand_tx.send(d);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn region_of(&self, page: PageIndex) -> Option<&RegionState> {
        self.regions
            .iter()
            .find(|r| page.0 >= r.first_page && page.0 < r.first_page + r.pages)
    }

    fn record(&self, range: PageRange) {
        if self.config.record {
            self.recorded.lock().expect("record lock").push(range);
        }
    }

    /// Installs verified bytes for consecutive pages of `region` that this
    /// path claimed, counts them (`fault`, if among them, as demand; the
    /// rest as `source`), settles them, and only then wakes their waiters.
    /// Counting comes before settling, so the statistics are complete when
    /// the last page settling completes the pager.
    fn install_claimed(
        &self,
        region: &RegionState,
        start: PageIndex,
        data: &[u8],
        source: stats::Source,
        fault: Option<PageIndex>,
    ) -> Result<(), InstallError> {
        region.install(start, data)?;
        let count = (data.len() / self.manifest.page_size.bytes_usize()) as u64;
        self.counters.bytes(data.len() as u64);
        let demand = u64::from(fault.is_some_and(|f| f.0 >= start.0 && f.0 < start.0 + count));
        if demand > 0 {
            self.counters.pages(stats::Source::Demand, demand);
        }
        if count > demand {
            self.counters.pages(source, count - demand);
        }
        for p in (start.0..start.0 + count).map(PageIndex) {
            // The guest discarded the page while it was being installed:
            // throw the install away, unless a fault has resolved the page
            // since (discarding a present page would leave it unmapped).
            if !self.table.finish(p) && self.table.get(p) == pages::ZERO_ON_FAULT {
                region.discard(p);
            }
        }
        region.wake_range(start, count);
        Ok(())
    }

    fn stats(&self) -> Stats {
        let total = self.regions.iter().map(|r| r.pages).sum();
        self.counters
            .snapshot(total, self.started.elapsed(), self.completed.get().copied())
    }
}

/// Runs `fut` as a pager task: a panic aborts the process.
fn guarded(
    fut: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    AssertUnwindSafe(fut).catch_unwind().map(|r| {
        if r.is_err() {
            faults::fatal("a pager task panicked");
        }
    })
}

/// A running pager. Dropping it before completion poisons the pages it has
/// not filled (touching them raises SIGBUS) rather than let the guest see
/// zeros; see [`Pager::shutdown`].
#[derive(Debug)]
pub struct Pager {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<StopSignal>,
    tasks: Vec<tokio::task::AbortHandle>,
    done: Arc<Notify>,
    torn_down: Arc<AtomicBool>,
}

/// Starts the demand link alone on a single-threaded tokio runtime on its
/// own OS thread ("faultline-demand"); returns the task's abort handle.
/// Aborting the task (completion, teardown) ends the thread. The thread is
/// not joined: an install it is running may be retrying EAGAIN (up to
/// `EAGAIN_TIMEOUT`) when the pager stops, and stopping must not wait for
/// that; it ends by itself, as the shared runtime's workers do after
/// `shutdown_background`.
///
/// Why: on the shared runtime the link, its HTTP/2 connection task and
/// hyper's request-body task share two workers with the prefetcher, which
/// holds a worker for each 1 MiB batch it verifies and installs; a fault
/// answer could wait behind that. Here every task of the demand connection
/// (tonic's `Channel` spawns its tasks on the runtime that connects, which
/// is this one) runs on this thread. Measured (docs/profile-notes.md): fault
/// p99 during a full prefetch ~4.7 ms instead of 9-13 ms; p50 unchanged,
/// and no change without prefetch.
fn spawn_demand_link(
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Demand>,
) -> std::io::Result<tokio::task::AbortHandle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let task = runtime.spawn(guarded(link::run(shared, rx)));
    let abort = task.abort_handle();
    std::thread::Builder::new()
        .name("faultline-demand".into())
        .spawn(move || {
            // Runs the link (and the connection's tasks) until the link task
            // is aborted; dropping the runtime then drops the connection.
            let _ = runtime.block_on(task);
        })?;
    Ok(abort)
}

impl Pager {
    /// Connects, fetches the manifest, registers every region with its own
    /// uffd, fills the regions that have no lazy method, and starts serving
    /// faults. Blocking; call it from a plain thread (not an async task).
    pub fn start(config: PagerConfig, regions: Vec<Region>) -> Result<Self, StartError> {
        Self::launch(config, regions, None)
    }

    /// Like [`Pager::start`], for memory another process registered on its
    /// own uffd (MISSING mode), which it handed over: Firecracker's UFFD
    /// snapshot-restore handshake. Every region is served through `uffd` by
    /// one fault thread, with `UFFDIO_COPY` (and `UFFDIO_ZEROPAGE` except on
    /// hugetlbfs), which is what a MISSING registration of anonymous or
    /// hugetlbfs memory advertises (docs/pager.md).
    pub fn start_on_peer_uffd(
        config: PagerConfig,
        regions: Vec<Region>,
        uffd: Uffd,
    ) -> Result<Self, StartError> {
        Self::launch(config, regions, Some(Arc::new(uffd)))
    }

    /// What a region registered by a peer is resolved with.
    fn peer_decision(kind: BackingKind) -> Decision {
        let zeropage = kind != BackingKind::Hugetlb;
        let base = ResolveOps::WAKE | ResolveOps::COPY | ResolveOps::POISON;
        let ops = if zeropage {
            base | ResolveOps::ZEROPAGE
        } else {
            base
        };
        Decision {
            kind,
            mode: Mode::Copy,
            choice: Choice {
                strategy: Strategy::Copy { zeropage },
                reason: format!(
                    "the peer registered the {kind} memory in MISSING mode on its own uffd: pages \
                     are installed with UFFDIO_COPY{}",
                    if zeropage {
                        ", zero pages with UFFDIO_ZEROPAGE"
                    } else {
                        ", zero pages by copying zeros (hugetlbfs has no ZEROPAGE)"
                    }
                ),
            },
            attempts: Vec::new(),
            registered: Some((RegisterModes::MISSING, ops)),
        }
    }

    fn launch(
        config: PagerConfig,
        regions: Vec<Region>,
        peer: Option<Arc<Uffd>>,
    ) -> Result<Self, StartError> {
        if config.servers.is_empty() {
            return Err(StartError::NoServer);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("faultline-net")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let manifest = runtime.block_on(async {
            let mut last = None;
            for url in &config.servers {
                match Remote::connect_with(url, &config.connect).await {
                    Ok(r) => match r.manifest(&config.snapshot).await {
                        Ok(m) => return Ok(m),
                        Err(e) => last = Some(e),
                    },
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("at least one server"))
        });
        let manifest = Arc::new(manifest.map_err(|source| StartError::Manifest {
            snapshot: config.snapshot.clone(),
            source,
        })?);

        // Check the layout, then register each region.
        let ps = manifest.page_size.bytes();
        let mut in_region = PageBitmap::new(manifest.page_count);
        let mut states = Vec::with_capacity(regions.len());
        for (index, region) in regions.into_iter().enumerate() {
            let layout = |reason: String| StartError::Layout {
                region: index,
                snapshot: config.snapshot.clone(),
                reason,
            };
            let len = region.memory.len() as u64;
            let mem_ps = region.memory.page_size() as u64;
            if mem_ps > ps || ps % mem_ps != 0 {
                return Err(layout(format!(
                    "its {} memory has {mem_ps}-byte pages but the snapshot has {ps}-byte pages; \
                     import the snapshot with `--page-size 2M` for hugetlbfs memory",
                    region.memory.kind()
                )));
            }
            if region.snapshot_offset % ps != 0 || !len.is_multiple_of(ps) {
                return Err(layout(format!(
                    "offset {:#x} and size {len:#x} must be multiples of the snapshot's page size {ps}",
                    region.snapshot_offset
                )));
            }
            if region.snapshot_offset + len > manifest.image_size() {
                return Err(layout(format!(
                    "offset {:#x} + size {len:#x} is past the snapshot's end ({:#x} bytes)",
                    region.snapshot_offset,
                    manifest.image_size()
                )));
            }
            let first = region.snapshot_offset / ps;
            for p in first..first + len / ps {
                if in_region.get(p) {
                    return Err(layout(format!("page {p} is also held by another region")));
                }
                in_region.set(p);
            }
            let (uffd, decision) = match &peer {
                Some(uffd) => (uffd.clone(), Self::peer_decision(region.memory.kind())),
                None => {
                    let uffd = Uffd::open()?;
                    let decision = register_for_strategy(&uffd, &region.memory, config.mode)
                        .map_err(|source| StartError::Strategy {
                            region: index,
                            source,
                        })?;
                    (Arc::new(uffd), decision)
                }
            };
            tracing::info!(region = index, "{decision}");
            if decision.strategy() == Strategy::Eager {
                tracing::warn!(
                    region = index,
                    "{} memory cannot be filled lazily on this kernel: filling all of it before \
                     the guest runs",
                    region.memory.kind()
                );
            }
            let uffd = (decision.strategy() != Strategy::Eager).then_some(uffd);
            states.push(RegionState::new(
                index,
                region.memory,
                decision,
                uffd,
                first,
                ps as usize,
            ));
        }

        let (demand_tx, demand_rx) = mpsc::unbounded_channel();
        let (ra_min, ra_max) = config.readahead;
        let readahead = states
            .iter()
            .map(|_| Mutex::new(Readahead::new(ra_min / ps, ra_max / ps)))
            .collect();
        let shared = Arc::new(Shared {
            table: pages::PageTable::new(manifest.page_count, &in_region, &manifest.zero_map),
            manifest,
            regions: states,
            counters: stats::Counters::default(),
            readahead,
            demand_tx,
            progress: Notify::new(),
            started: Instant::now(),
            completed: OnceLock::new(),
            stopping: AtomicBool::new(false),
            recorded: Mutex::new(Vec::new()),
            config,
        });
        let stop = Arc::new(StopSignal::new()?);
        let mut pager = Self {
            shared: shared.clone(),
            runtime: None,
            threads: Vec::new(),
            stop: stop.clone(),
            tasks: Vec::new(),
            done: Arc::new(Notify::new()),
            torn_down: Arc::new(AtomicBool::new(false)),
        };

        // Regions without a lazy method are filled now, before the guest
        // runs; from here on, dropping `pager` cleans up.
        let eager: Vec<PageRange> = shared
            .regions
            .iter()
            .filter(|r| r.strategy() == Strategy::Eager)
            .map(RegionState::range)
            .collect();
        if !eager.is_empty() {
            let deadline = shared.config.deadline;
            runtime
                .block_on(prefetch::fill_eager(&shared, eager.clone(), deadline))
                .map_err(|e| StartError::Eager(e.to_string()))?;
            if let Some(p) = eager
                .iter()
                .flat_map(PageRange::iter)
                .find(|&p| shared.table.get(p) == pages::MISSING)
            {
                return Err(StartError::Eager(format!(
                    "page {} failed its digest; the snapshot on the server is corrupt",
                    p.0
                )));
            }
        }

        // One fault thread per uffd: a region's own, or the peer's for all.
        let lazy: Vec<usize> = shared
            .regions
            .iter()
            .filter(|r| r.uffd().is_some())
            .map(|r| r.index)
            .collect();
        let groups: Vec<Vec<usize>> = match peer {
            Some(_) if !lazy.is_empty() => vec![lazy],
            _ => lazy.into_iter().map(|i| vec![i]).collect(),
        };
        for group in groups {
            let (shared, stop) = (shared.clone(), stop.clone());
            let handle = std::thread::Builder::new()
                .name(format!("faultline-fault-{}", group[0]))
                .spawn(move || {
                    let body = AssertUnwindSafe(|| faults::fault_loop(shared, group, stop));
                    if std::panic::catch_unwind(body).is_err() {
                        faults::fatal("a fault thread panicked");
                    }
                })
                .map_err(StartError::Runtime)?;
            pager.threads.push(handle);
        }
        let link = spawn_demand_link(shared.clone(), demand_rx).map_err(StartError::Runtime)?;
        let prefetch = runtime.spawn(guarded(prefetch::run(shared.clone())));
        pager.tasks = vec![link, prefetch.abort_handle()];
        let watcher = runtime.spawn(guarded(watch_completion(
            shared.clone(),
            pager.done.clone(),
            stop,
            pager.tasks.clone(),
            pager.torn_down.clone(),
        )));
        pager.tasks.push(watcher.abort_handle());
        pager.runtime = Some(runtime);
        Ok(pager)
    }

    /// The snapshot's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.shared.manifest
    }

    /// The regions, in the order given.
    pub fn regions(&self) -> &[RegionState] {
        &self.shared.regions
    }

    /// The memory of region `index`.
    pub fn memory(&self, index: usize) -> &GuestMemory {
        &self.shared.regions[index].memory
    }

    /// How region `index` is filled, and why.
    pub fn decision(&self, index: usize) -> &Decision {
        &self.shared.regions[index].decision
    }

    /// What the pager has done so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Whether every page is settled (and the regions unregistered).
    pub fn is_complete(&self) -> bool {
        self.torn_down.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for completion; the final statistics, or
    /// `None` on timeout. Blocking.
    pub fn wait_complete(&self, timeout: Duration) -> Option<Stats> {
        let runtime = self.runtime.as_ref()?;
        let done = self.done.clone();
        let torn_down = self.torn_down.clone();
        runtime.block_on(async {
            let wait = async {
                loop {
                    let n = done.notified();
                    if torn_down.load(Ordering::Acquire) {
                        return;
                    }
                    n.await;
                }
            };
            tokio::time::timeout(timeout, wait).await.ok()
        })?;
        Some(self.stats())
    }

    /// Completion, as a future: resolves with the final statistics once
    /// every page is settled.
    pub fn completion(&self) -> impl Future<Output = Stats> + Send + 'static {
        let shared = self.shared.clone();
        let done = self.done.clone();
        let torn_down = self.torn_down.clone();
        async move {
            loop {
                let n = done.notified();
                if torn_down.load(Ordering::Acquire) {
                    return shared.stats();
                }
                n.await;
            }
        }
    }

    /// Feeds a fault from a source other than the uffd (a VMM's KVM exits)
    /// and waits until `addr..addr+len` is filled.
    pub async fn fault(&self, addr: usize, len: usize) -> Result<(), FaultError> {
        let shared = &self.shared;
        let region = shared
            .regions
            .iter()
            .find(|r| r.page_of(addr).is_some() && r.page_of(addr + len.max(1) - 1).is_some())
            .ok_or(FaultError::Outside { addr, len })?;
        let first = region.page_of(addr).expect("checked");
        let last = region.page_of(addr + len.max(1) - 1).expect("checked");
        loop {
            let progress = shared.progress.notified();
            let mut waiting = false;
            for p in (first.0..=last.0).map(PageIndex) {
                match shared.table.get(p) {
                    pages::PRESENT | pages::OUTSIDE => {}
                    pages::POISONED => return Err(FaultError::Poisoned(p)),
                    pages::ZERO_ON_FAULT if region.uffd().is_none() => {}
                    pages::IN_FLIGHT => waiting = true,
                    _ => {
                        shared.on_fault(region, p, false)?;
                        waiting |= shared.table.get(p) != pages::PRESENT;
                    }
                }
            }
            if !waiting {
                return Ok(());
            }
            progress.await;
        }
    }

    /// Uploads the first-touch order recorded so far as the working set
    /// `config.working_set`, so later restores prefetch it first. Returns
    /// the pages stored. Blocking.
    pub fn record_working_set(&self) -> Result<u64, RemoteError> {
        let runtime = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as the pager");
        runtime.block_on(upload_recording(&self.shared))
    }

    /// Stops the pager now. Pages not filled yet are poisoned (touching them
    /// raises SIGBUS), never left for the kernel to zero-fill.
    pub fn shutdown(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.stop.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for t in &self.tasks {
            t.abort();
        }
        if !self.torn_down.swap(true, Ordering::AcqRel) {
            // Not complete: nothing may be left for the kernel to zero-fill.
            for r in &self.shared.regions {
                let Some(uffd) = r.take_uffd() else { continue };
                // One ioctl per run of unfilled pages, not per page: a
                // restore stopped early can leave hundreds of thousands.
                let mut p = r.range().start().0;
                let end = r.range().end();
                while p < end {
                    let unfilled = |q: u64| {
                        matches!(
                            self.shared.table.get(PageIndex(q)),
                            pages::MISSING | pages::IN_FLIGHT
                        )
                    };
                    if !unfilled(p) {
                        p += 1;
                        continue;
                    }
                    let from = p;
                    while p < end && unfilled(p) {
                        p += 1;
                    }
                    poison_run(
                        &uffd,
                        r.addr_of(PageIndex(from)),
                        (p - from) as usize * r.page_bytes,
                        r.page_bytes,
                    );
                }
                let _ = uffd.unregister(r.memory.host_addr(), r.memory.len());
                // As in `watch_completion`: no waiter may be left asleep.
                let _ = uffd.wake(r.memory.host_addr(), r.memory.len());
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Poisons `len` bytes from `start`, skipping pages that turn out to be
/// present (an install still finishing on the demand thread).
///
/// Kernel gotcha: a partial POISON reports EAGAIN with the bytes done,
/// whatever stopped it; retrying the rest then says EEXIST if a present page
/// stopped it (skipped), or EAGAIN again if a memory-map event is pending,
/// which nobody reads any more at teardown: after `POISON_RETRIES` such
/// answers in a row the page is given up, as the per-page loop this replaced
/// did.
fn poison_run(uffd: &Uffd, start: usize, len: usize, page_bytes: usize) {
    let (mut at, end) = (start, start + len);
    let mut again = 0;
    while at < end {
        match uffd.poison(at, end - at, false) {
            Ok(_) => return,
            Err(e @ ResolveError::Exists { .. }) => at += e.done() + page_bytes,
            Err(e @ ResolveError::Again { .. }) => {
                at += e.done();
                again = if e.done() > 0 { 0 } else { again + 1 };
                if again > POISON_RETRIES {
                    at += page_bytes;
                    again = 0;
                }
            }
            // Unregistered or closed: nothing left to protect.
            Err(ResolveError::Failed { .. }) => return,
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Waits for every page to settle, then unregisters the regions, closes
/// their uffds, stops the fault threads and the network tasks, uploads the
/// recording if asked, and signals completion.
async fn watch_completion(
    shared: Arc<Shared>,
    done: Arc<Notify>,
    stop: Arc<StopSignal>,
    tasks: Vec<tokio::task::AbortHandle>,
    torn_down: Arc<AtomicBool>,
) {
    loop {
        let n = shared.progress.notified();
        if shared.table.unsettled() == 0 {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), n).await;
    }
    let elapsed = shared.started.elapsed();
    let _ = shared.completed.set(elapsed);
    // Unregister first (no new message can then arrive; sleepers are woken
    // and retry on memory that is complete), then stop the fault threads,
    // which read whatever is still queued (a REMOVE blocks the guest thread
    // that caused it until read) and close their share of the uffd.
    shared.stopping.store(true, Ordering::Release);
    for r in &shared.regions {
        let Some(uffd) = r.uffd() else { continue };
        if let Err(e) = uffd.unregister(r.memory.host_addr(), r.memory.len()) {
            tracing::warn!(region = r.index, "unregistering failed: {e}");
        }
        // An installer that settled the last pages may still owe their
        // waiters the wake it does after settling: wake the whole region
        // once more (harmless where nobody waits).
        let _ = uffd.wake(r.memory.host_addr(), r.memory.len());
    }
    stop.stop();
    for t in &tasks {
        t.abort();
    }
    if shared.config.record {
        match upload_recording(&shared).await {
            Ok(n) => tracing::info!("recorded working set: {n} pages"),
            Err(e) => tracing::warn!("uploading the recorded working set failed: {e}"),
        }
    }
    torn_down.store(true, Ordering::Release);
    tracing::info!("restore complete in {:.3}s", elapsed.as_secs_f64());
    done.notify_waiters();
}

/// Uploads the recorded first-touch order.
async fn upload_recording(shared: &Shared) -> Result<u64, RemoteError> {
    let ranges: Vec<pb::PageRange> = {
        let rec = shared.recorded.lock().expect("record lock");
        rec.iter().map(|&r| r.into()).collect()
    };
    let remote = Remote::connect_with(&shared.config.servers[0], &shared.config.connect).await?;
    let resp = remote
        .client()
        .record_working_set(pb::RecordWorkingSetRequest {
            snapshot: shared.config.snapshot.to_string(),
            name: shared.config.working_set.to_string(),
            ranges: dedup(ranges),
        })
        .await
        .map_err(RemoteError::rpc("RecordWorkingSet"))?;
    Ok(resp.into_inner().pages)
}

/// Drops pages already listed (a joined fault repeats a page of an earlier
/// window), keeping first positions, and merges consecutive pages.
fn dedup(ranges: Vec<pb::PageRange>) -> Vec<pb::PageRange> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<pb::PageRange> = Vec::new();
    for r in ranges {
        for p in r.start..r.start + r.count {
            if !seen.insert(p) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.start + last.count == p => last.count += 1,
                _ => out.push(pb::PageRange { start: p, count: 1 }),
            }
        }
    }
    out
}
