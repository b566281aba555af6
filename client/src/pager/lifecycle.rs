//! A pager's life: starting (manifest, registration, threads), ending once
//! with an [`Outcome`], and the teardown that leaves no page for the kernel to
//! zero-fill and no thread of the guest asleep.
//!
//! Who ends a pager: the watcher task when every page is settled
//! ([`Outcome::Complete`]); any pager thread that finds the memory's owner
//! gone or its uffd broken, or that panics ([`Shared::end`]); a [`Stopper`];
//! [`Pager::shutdown`] or drop. The first reason wins; the teardown runs
//! once, on the watcher or in `shutdown`, and then publishes the outcome.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use faultline_proto::{PageBitmap, PageIndex, PageRange};
use futures::FutureExt;
use tokio::sync::{Notify, mpsc, watch};

use super::config::{PagerConfig, Region};
use super::error::{InstallError, StartError};
use super::faults::Readahead;
use super::link::Demand;
use super::pages::{self, PageState};
use super::region::RegionState;
use super::{Pager, Shared, faults, link, prefetch, recording, stats};
use crate::backing::BackingKind;
use crate::remote::Remote;
use crate::strategy::{Choice, Decision, Mode, Strategy, register_for_strategy};
use crate::uffd::{RegisterModes, ResolveError, ResolveOps, StopSignal, Uffd};

/// EAGAIN answers in a row at one page before teardown gives the page up.
const POISON_RETRIES: u32 = 3;

/// Worker threads of the pager's shared network runtime (prefetcher,
/// watcher). The fault loops and the demand link have a thread of their own
/// ([`spawn_demand_thread`]).
const RUNTIME_THREADS: usize = 2;

/// How long [`Pager::shutdown`] waits for a teardown the watcher is already
/// running (it may be uploading a recording) before returning anyway.
const TEARDOWN_WAIT: Duration = Duration::from_secs(5);

/// Shortest wait for a server's manifest at start, whatever the deadline (a
/// zero deadline must not make every start fail).
const MIN_MANIFEST_WAIT: Duration = Duration::from_secs(1);

/// How long the watcher sleeps between looks when nothing notifies it.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// How a pager ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every page was settled (filled, or poisoned by the failure policy:
    /// see [`super::Stats::poisoned_pages`]) and the regions unregistered.
    Complete,
    /// The process owning the memory exited (a resolve ioctl answered ESRCH,
    /// or ENOENT on a peer's memory): a VM killed. Its fault threads, demand
    /// link and prefetcher stopped; nothing else was affected.
    OwnerGone {
        /// What the kernel said, and where.
        detail: String,
    },
    /// Stopped by [`Pager::shutdown`], drop or a [`Stopper`]; unfilled pages
    /// were poisoned.
    Stopped,
    /// The memory's uffd failed in a way the pager cannot serve past (or a
    /// pager thread panicked); unfilled pages were poisoned.
    Failed {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Complete => f.write_str("every page was filled"),
            Self::OwnerGone { detail } => write!(f, "the memory's owner exited ({detail})"),
            Self::Stopped => f.write_str("stopped; unfilled pages were poisoned"),
            Self::Failed { reason } => {
                write!(f, "failed: {reason}; unfilled pages were poisoned")
            }
        }
    }
}

/// Stops a pager from any thread without owning it (see [`Pager::stopper`]).
#[derive(Clone, Debug)]
pub struct Stopper(pub(super) Weak<Shared>);

impl Stopper {
    /// Ends the pager as [`Outcome::Stopped`]: its threads stop and every
    /// page it has not filled is poisoned (`UFFDIO_POISON`), so a vCPU
    /// waiting on one gets SIGBUS instead of hanging. Returns at once; the
    /// pager's watcher does the teardown (see [`Pager::wait_ended`]). Does
    /// nothing if the pager has ended or is gone.
    pub fn stop_and_poison(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.end(Outcome::Stopped);
        }
    }
}

impl Shared {
    /// Ends the pager for `outcome`, unless it is ending already: marks it
    /// stopping, stops the fault threads, and wakes the watcher, which tears
    /// down. Callable from any pager thread; never blocks.
    pub(super) fn end(&self, outcome: Outcome) {
        let log = outcome.to_string();
        if self.ending.set(outcome).is_err() {
            return;
        }
        match self.ending.get() {
            Some(Outcome::Complete | Outcome::Stopped) => tracing::debug!("pager ending: {log}"),
            _ => tracing::error!("pager ending: {log}"),
        }
        self.stopping.store(true, Ordering::Release);
        self.stop.stop();
        self.progress.notify_waiters();
    }

    /// What an install error means for the pager: the memory's owner gone
    /// ends it ([`Outcome::OwnerGone`]); while stopping, errors are expected
    /// (the uffd is being taken away); anything else is a failure of the
    /// uffd that ends it ([`Outcome::Failed`]). Never aborts.
    pub(super) fn on_install_error(&self, e: &InstallError) {
        match e {
            InstallError::OwnerGone { .. } => self.end(Outcome::OwnerGone {
                detail: e.to_string(),
            }),
            _ if self.is_stopping() => {}
            // EAGAIN left to the fault thread to retry: not an error.
            InstallError::Again { .. } => {}
            _ => self.end(Outcome::Failed {
                reason: e.to_string(),
            }),
        }
    }
}

/// Runs `fut` as a pager task: a panic ends the pager (poisoning what it has
/// not filled), never the process.
fn guarded(
    shared: Arc<Shared>,
    fut: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    AssertUnwindSafe(fut).catch_unwind().map(move |r| {
        if r.is_err() {
            shared.end(Outcome::Failed {
                reason: "a pager task panicked".into(),
            });
        }
    })
}

/// Starts the pager's demand thread ("faultline-fault"): one OS thread with
/// a single-threaded tokio runtime that runs the fault loop of every uffd
/// (`groups`), the demand link and the link's HTTP/2 connection. Returns the
/// thread (joined at teardown) and the link task's abort handle. `runtime`
/// is where `Pager::start` opened the demand stream (`opened`), so the
/// connection's tasks already live on it.
///
/// Why one thread: a demand fault then costs no wake-up of another thread
/// on the client between reading the fault and the request leaving, nor
/// between the answer arriving and the install that wakes the guest (the
/// thread reading the uffd used to hand each fault to a demand thread over a
/// channel). Measured in docs/BENCHMARKS.md (context switches per fault, and
/// latency pinned and unpinned). The link keeps a thread of its own, away
/// from the prefetcher's runtime, for the reason measured before
/// (docs/profile-notes.md): fault answers must not wait for a worker busy
/// installing a 1 MiB prefetch batch.
///
/// Nothing on this thread blocks: installs and poisons it does return EAGAIN
/// instead of waiting it out (it is the thread that reads the event), and
/// the fault loops end on the stop signal, so the thread ends promptly once
/// the pager stops.
fn spawn_demand_thread(
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    rx: mpsc::UnboundedReceiver<Demand>,
    opened: Option<(link::Session, usize)>,
    groups: Vec<Vec<usize>>,
) -> std::io::Result<(std::thread::JoinHandle<()>, tokio::task::AbortHandle)> {
    let task = runtime.spawn(guarded(
        shared.clone(),
        link::run(shared.clone(), rx, opened),
    ));
    let abort = task.abort_handle();
    let thread = std::thread::Builder::new()
        .name("faultline-fault".into())
        .spawn(move || {
            let loops = async {
                let stop = match crate::uffd::readable(shared.stop.clone()) {
                    Ok(stop) => stop,
                    Err(e) => {
                        return shared.end(Outcome::Failed {
                            reason: format!("watching the pager's stop signal failed: {e}"),
                        });
                    }
                };
                if groups.is_empty() {
                    // Nothing to read (every region filled eagerly): wait for
                    // the stop like the loops would.
                    let _ = stop.readable().await;
                    return;
                }
                let loops = groups.iter().map(|g| faults::fault_loop(&shared, g, &stop));
                futures::future::join_all(loops).await;
            };
            let body = AssertUnwindSafe(|| runtime.block_on(loops));
            if std::panic::catch_unwind(body).is_err() {
                shared.end(Outcome::Failed {
                    reason: "the pager's fault thread panicked".into(),
                });
            }
            // Dropping the runtime drops the link and its connection.
        })?;
    Ok((thread, abort))
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

    pub(super) fn launch(
        mut config: PagerConfig,
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
        // Each server in turn, each attempt bounded by the deadline (at least
        // `MIN_MANIFEST_WAIT`): a server that accepts and never answers must
        // not hang the start.
        let manifest_wait = config.deadline.max(MIN_MANIFEST_WAIT);
        // The snapshot's home server first, then the fail-over order, the
        // servers not ready last (crate::fleet).
        let plan = runtime.block_on(crate::fleet::plan(
            &config.servers,
            &mut config.connect,
            &config.snapshot,
        ))?;
        config.servers = plan.servers;
        let manifest = runtime.block_on(async {
            let mut last = None;
            for (server, url) in config.servers.iter().enumerate() {
                let attempt = async {
                    let remote = Remote::connect_with(url, &config.connect).await?;
                    remote.manifest(&config.snapshot).await
                };
                match tokio::time::timeout(manifest_wait, attempt).await {
                    Ok(Ok(m)) => return Ok((m, server)),
                    Ok(Err(source)) => {
                        last = Some(StartError::Manifest {
                            snapshot: config.snapshot.clone(),
                            source,
                        });
                    }
                    Err(_) => {
                        last = Some(StartError::ManifestTimeout {
                            snapshot: config.snapshot.clone(),
                            url: url.clone(),
                            after: manifest_wait,
                        });
                    }
                }
                if let Some(e) = &last {
                    tracing::warn!("{e}; trying the next server");
                }
            }
            Err(last.expect("at least one server"))
        });
        let (manifest, answered) = manifest?;
        let origin = config.servers[answered].clone();
        let manifest = Arc::new(manifest);

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
            // Either unit divides the other (both are powers of two): a
            // snapshot page of several memory pages is installed page by
            // page; memory pages of several snapshot pages (a 4 KiB
            // snapshot in 2 MiB hugetlbfs memory) are installed as one, a
            // whole *install unit* fetched, verified page by page and
            // assembled first (`RegionState::unit`).
            if !ps.is_multiple_of(mem_ps) && !mem_ps.is_multiple_of(ps) {
                return Err(layout(format!(
                    "its {} memory has {mem_ps}-byte pages and the snapshot {ps}-byte pages; \
                     one must be a multiple of the other",
                    region.memory.kind()
                )));
            }
            let unit = ps.max(mem_ps);
            if region.snapshot_offset % unit != 0 || !len.is_multiple_of(unit) {
                return Err(layout(format!(
                    "offset {:#x} and size {len:#x} must be multiples of {unit} bytes (the \
                     snapshot's page size {ps}, and the {} memory's {mem_ps})",
                    region.snapshot_offset,
                    region.memory.kind()
                )));
            }
            if region.snapshot_offset + len > manifest.image_size() {
                let tail = if mem_ps > ps && !manifest.image_size().is_multiple_of(mem_ps) {
                    format!(
                        "; {} memory is filled in whole {mem_ps}-byte pages and the snapshot's \
                         size is not a multiple of that: map the memory without its last, \
                         partial page, or import the image padded to a multiple of {mem_ps} bytes",
                        region.memory.kind()
                    )
                } else {
                    String::new()
                };
                return Err(layout(format!(
                    "offset {:#x} + size {len:#x} is past the snapshot's end ({:#x} bytes){tail}",
                    region.snapshot_offset,
                    manifest.image_size()
                )));
            }
            // A word at a time: page by page this took about 2.5 ms for
            // 2 GiB of 4 KiB pages.
            let (first, count) = (region.snapshot_offset / ps, len / ps);
            let taken = in_region.next_set(first, first + count);
            if taken < first + count {
                return Err(layout(format!(
                    "page {taken} is also held by another region"
                )));
            }
            in_region.set_range(first, count);
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
        // In install units (one snapshot page, or one huge page of a mixed
        // region): the window never splits a unit.
        let readahead = states
            .iter()
            .map(|r| {
                let unit = r.unit_bytes() as u64;
                Mutex::new(Readahead::new(ra_min / unit, ra_max / unit))
            })
            .collect();
        let zero_map = unit_zero_map(&manifest, &states);
        // A server on this host may hand over its page file (source.rs).
        let page_file = super::source::open(&config, &manifest, &config.servers[answered]);
        let shared = Arc::new(Shared {
            page_file,
            table: pages::PageTable::new(manifest.page_count, &in_region, &zero_map),
            manifest,
            regions: states,
            counters: stats::Counters::default(),
            readahead,
            demand_tx,
            progress: Notify::new(),
            fault_waiters: AtomicUsize::new(0),
            started: Instant::now(),
            completed: OnceLock::new(),
            stopping: AtomicBool::new(false),
            stop: Arc::new(StopSignal::new()?),
            ending: OnceLock::new(),
            tearing_down: AtomicBool::new(false),
            ended: watch::channel(None).0,
            tasks: Mutex::new(Vec::new()),
            recorded: Mutex::new(Vec::new()),
            fleet: crate::fleet::Consistency::new(&origin),
            config,
        });
        let mut pager = Pager {
            shared: shared.clone(),
            runtime: None,
            threads: Vec::new(),
            watcher: None,
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
                .find(|&p| shared.table.get(p) == PageState::Missing)
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
        // The demand stream, opened now on the server that gave the manifest,
        // so that the first fault does not wait for a connection. If that
        // fails the link connects (and retries) by itself.
        let demand_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let url = shared.config.servers[answered].clone();
        let limit = link::OPEN_TIMEOUT.min(manifest_wait);
        let open = async { tokio::time::timeout(limit, link::open_session(&shared, &url)).await };
        let opened = match demand_rt.block_on(open) {
            Ok(Ok(session)) => Some((session, answered)),
            Ok(Err(e)) => {
                tracing::warn!("demand link: {e}; connecting again when faults come");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "demand link: {url} did not open the Fault stream within {limit:?}; \
                     connecting again when faults come"
                );
                None
            }
        };
        let (thread, link) =
            spawn_demand_thread(shared.clone(), demand_rt, demand_rx, opened, groups)
                .map_err(StartError::Runtime)?;
        pager.threads.push(thread);
        let prefetch = runtime.spawn(guarded(shared.clone(), prefetch::run(shared.clone())));
        *shared
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            vec![link, prefetch.abort_handle()];
        let watcher = runtime.spawn(guarded(shared.clone(), watch(shared.clone())));
        pager.watcher = Some(watcher.abort_handle());
        pager.runtime = Some(runtime);
        Ok(pager)
    }
}

/// The zero pages the page table starts as ZeroOnFault: the manifest's,
/// except in a mixed region (`RegionState::unit`), where only units whose
/// every page is zero stay so (they need no data: the kernel zeroes them).
/// The zero pages of a partly zero unit start Missing: they are claimed,
/// fetched (named as zeros by the server, no bytes) and installed with the
/// rest of their huge page, as zeros.
fn unit_zero_map(manifest: &faultline_proto::Manifest, regions: &[RegionState]) -> PageBitmap {
    let mut zero = manifest.zero_map.clone();
    for r in regions.iter().filter(|r| r.is_mixed()) {
        let mut start = r.first_page;
        while start < r.first_page + r.pages {
            let unit = r.unit_of(PageIndex(start));
            if !unit.iter().all(|p| zero.get(p.0)) {
                for p in unit.iter() {
                    zero.clear(p.0);
                }
            }
            start = unit.end();
        }
    }
    zero
}

/// Poisons `len` bytes from `start`, skipping pages that turn out to be
/// present (an install still finishing on the demand thread).
///
/// Kernel gotcha: a partial POISON reports EAGAIN with the bytes done,
/// whatever stopped it; retrying the rest then says EEXIST if a present page
/// stopped it (skipped), or EAGAIN again if a memory-map event is pending,
/// which nobody reads any more at teardown: after `POISON_RETRIES` such
/// answers in a row the page is given up, as the per-page loop this replaced
/// did. Fails if the kernel refused for another reason: the memory's owner is
/// gone (nothing to protect any more), or the uffd no longer works.
fn poison_run(
    uffd: &Uffd,
    start: usize,
    len: usize,
    page_bytes: usize,
) -> Result<(), ResolveError> {
    let (mut at, end) = (start, start + len);
    let mut again = 0;
    while at < end {
        match uffd.poison(at, end - at, false) {
            Ok(_) => return Ok(()),
            Err(e @ ResolveError::Exists { .. }) => at += e.done() + page_bytes,
            Err(e @ ResolveError::Again { .. }) => {
                at += e.done();
                again = if e.done() > 0 { 0 } else { again + 1 };
                if again > POISON_RETRIES {
                    at += page_bytes;
                    again = 0;
                }
            }
            Err(e @ ResolveError::Failed { .. }) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until every page is settled or someone ends the pager, then tears
/// down (unless [`Pager::shutdown`] has taken that on) and publishes the
/// outcome.
async fn watch(shared: Arc<Shared>) {
    loop {
        let n = shared.progress.notified();
        if shared.ending.get().is_some() || shared.table.unsettled() == 0 {
            break;
        }
        let _ = tokio::time::timeout(WATCH_INTERVAL, n).await;
    }
    // Complete, unless someone ended the pager first. Not `end`: the fault
    // threads must go on reading until the regions are unregistered.
    if shared.ending.set(Outcome::Complete).is_ok() {
        let _ = shared.completed.set(shared.started.elapsed());
    }
    if shared.tearing_down.swap(true, Ordering::AcqRel) {
        return;
    }
    let outcome = shared.ending.get().cloned().expect("set above");
    if outcome == Outcome::Complete {
        complete(&shared);
        if shared.config.record {
            match recording::upload(&shared).await {
                Ok(n) => tracing::info!("recorded working set: {n} pages"),
                Err(e) => tracing::warn!("uploading the recorded working set failed: {e}"),
            }
        }
        let elapsed = shared.completed.get().copied().unwrap_or_default();
        tracing::info!("restore complete in {:.3}s", elapsed.as_secs_f64());
    } else {
        stop_serving(&shared, &outcome);
    }
    shared.ended.send_replace(Some(outcome));
}

/// Every page is settled: unregisters the regions, stops the fault threads
/// and the network tasks.
fn complete(shared: &Shared) {
    // Unregister first (no new message can then arrive; sleepers are woken
    // and retry on memory that is complete), then stop the fault threads,
    // which read whatever is still queued (a REMOVE blocks the guest thread
    // that caused it until read) and close their share of the uffd.
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
    shared.stopping.store(true, Ordering::Release);
    shared.stop.stop();
    abort_tasks(shared);
}

fn abort_tasks(shared: &Shared) {
    for t in shared
        .tasks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        t.abort();
    }
}

/// The pager ends before completion: stops the network tasks, then, region
/// by region, poisons every page not filled (one ioctl per run: a restore
/// stopped early can leave hundreds of thousands), unregisters and wakes
/// the whole region, so that no guest thread sleeps on a page nobody will
/// fill and none reads zeros where the snapshot has data. Skipped where the
/// memory's owner is gone (nothing left to protect). If poisoning fails
/// otherwise, the uffd is kept open for good (threads touching those pages
/// wait rather than read zeros), and that is logged.
fn stop_serving(shared: &Shared, outcome: &Outcome) {
    shared.stopping.store(true, Ordering::Release);
    shared.stop.stop();
    abort_tasks(shared);
    let owner_gone = matches!(outcome, Outcome::OwnerGone { .. });
    for r in &shared.regions {
        let Some(uffd) = r.take_uffd() else { continue };
        let mut failed = None;
        if !owner_gone {
            // By install unit (a snapshot page, or a huge page of a mixed
            // region, which POISON takes whole): a unit is unfilled if any
            // of its pages is (an install still settling it on another
            // thread; its present pages answer EEXIST and are skipped).
            let unfilled = |q: u64| {
                r.unit_of(PageIndex(q))
                    .iter()
                    .any(|p| shared.table.get(p).is_unsettled())
            };
            let (mut p, end) = (r.range().start().0, r.range().end());
            while p < end && failed.is_none() {
                if !unfilled(p) {
                    p += r.unit;
                    continue;
                }
                let from = p;
                while p < end && unfilled(p) {
                    p += r.unit;
                }
                let len = (p - from) as usize * r.page_bytes;
                if let Err(e) = poison_run(&uffd, r.addr_of(PageIndex(from)), len, r.unit_bytes()) {
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) if !e.is_owner_gone() => {
                tracing::error!(
                    region = r.index,
                    "cannot poison the unfilled pages ({e}); keeping the uffd open so that \
                     threads touching them wait instead of reading zeros"
                );
                std::mem::forget(uffd);
                continue;
            }
            _ => {}
        }
        let _ = uffd.unregister(r.memory.host_addr(), r.memory.len());
        // As in `complete`: no waiter may be left asleep.
        let _ = uffd.wake(r.memory.host_addr(), r.memory.len());
    }
}

impl Pager {
    /// Ends the pager as [`Outcome::Stopped`] unless it has ended already,
    /// joins the fault threads, tears down (or waits for the watcher's
    /// teardown), and returns the outcome.
    pub(super) fn teardown(&mut self) -> Outcome {
        let shared = self.shared.clone();
        if shared.table.unsettled() == 0 && shared.ending.get().is_none() {
            // Complete, and the watcher is about to say so: let it.
            shared.progress.notify_waiters();
            if let Some(outcome) = self.wait_ended(TEARDOWN_WAIT) {
                shared.end(outcome);
            }
        }
        shared.end(Outcome::Stopped);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let outcome = if shared.tearing_down.swap(true, Ordering::AcqRel) {
            // The watcher has it (or had it): wait for the outcome.
            let waited = self.wait_ended(TEARDOWN_WAIT);
            waited.unwrap_or_else(|| shared.ending.get().cloned().unwrap_or(Outcome::Stopped))
        } else {
            let outcome = shared.ending.get().cloned().expect("ended above");
            stop_serving(&shared, &outcome);
            shared.ended.send_replace(Some(outcome.clone()));
            outcome
        };
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        outcome
    }
}
