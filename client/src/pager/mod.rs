//! The pager: fills guest memory from a faultline server, lazily.
//!
//! ```text
//!  vCPU / guest thread faults
//!        |
//!        v                  demand thread (one OS thread, one tokio runtime)
//!  uffd --> fault loop (faults.rs, one per uffd) --+--> zero page, page-cache page: resolved here
//!                                                  |
//!                                                  +--> claim a read-ahead window --> demand link
//!                                                                 (link.rs, Fault stream)
//!  Pager::fault (VMM's own fault source) ----------'                                     |
//!                                                      verify digest, install.rs <-------'
//!  prefetcher (prefetch.rs, Prefetch stream, own connection) --> verify, install.rs
//!  (on the server's host, both read pages from its page file: source.rs)
//! ```
//!
//! Every page has one [`pages::PageState`]; claiming a page is an atomic
//! `Missing -> InFlight`, so concurrent faults, read-ahead and prefetch never
//! fetch or install a page twice, and a fault on a page in flight simply
//! waits for its install (which wakes it). Every path installs through one
//! protocol (`install.rs`: claim, install without waking, count, settle,
//! discard on a race, wake).
//!
//! Where to read, in order: this file (the [`Pager`] a caller holds, and the
//! state its threads share), `config.rs`, `lifecycle.rs` (start, end,
//! teardown), `faults.rs` (the fault thread and the one decision procedure),
//! `install.rs`, `link.rs` (demand link), `lean.rs` (the lean transports:
//! the demand link's and the prefetcher's connections), `prefetch.rs`,
//! `source.rs` (the page file of a server on this host), `region.rs` (one
//! region's ioctls), `pages.rs` (page states), `units.rs` (a 4 KiB snapshot
//! in hugetlbfs memory: whole 2 MiB install units), `recording.rs`,
//! `stats.rs`, `error.rs`.
//!
//! Threads: one demand thread (`faultline-fault`) runs a single-threaded
//! tokio runtime holding the fault loop of every uffd, the demand link and
//! the link's connection (`lean.rs`, or HTTP/2): the thread that reads a fault sends its
//! request and installs the answer, with no other thread woken on the way.
//! Nothing on it blocks; its resolves report EAGAIN instead of waiting (it
//! is the thread that reads the event the kernel waits for). The prefetcher
//! and the watcher share a small multi-threaded runtime. Both runtimes
//! belong to the pager.
//!
//! Ending: a pager ends once, with an [`Outcome`]: every page settled, the
//! process owning the memory gone, stopped, or failed. An error on the
//! memory's uffd, or a panic on a pager thread, ends that pager only (its
//! unfilled pages poisoned where the memory still exists); it never aborts
//! the process. Only the failure policy [`OnFailure::Abort`] does, for the
//! server failing.

mod config;
mod error;
pub mod far;
mod faults;
mod install;
mod lean;
mod lifecycle;
mod link;
mod pages;
mod prefetch;
mod recording;
mod region;
mod source;
mod stats;
mod units;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use faultline_proto::{Manifest, PageIndex, PageRange};
use tokio::sync::{Notify, mpsc, watch};

pub use config::{
    Bulk, DEFAULT_DEADLINE, MAX_READAHEAD_BYTES, MIN_READAHEAD_BYTES, NO_READAHEAD, OnFailure,
    PAGE_FILE_STREAMS, PREFETCH_BATCH_BYTES, PREFETCH_STREAMS, PagerConfig, PrefetchPolicy, Region,
    StreamTransport,
};
pub use error::{FaultError, InstallError, StartError};
pub use faults::Readahead;
pub use lifecycle::{Outcome, Stopper};
pub use link::{CORRUPT_RETRIES, Demand};
pub use region::RegionState;
pub use stats::{Latency, PagesBySource, Stats};

use crate::backing::GuestMemory;
use crate::remote::RemoteError;
use crate::strategy::Decision;
use crate::uffd::StopSignal;
use pages::PageState;

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
    /// Notified after installs and state changes; waiters re-check. The
    /// demand path notifies only when someone needs it (see
    /// [`Shared::demand_progress`]).
    progress: Notify,
    /// `Pager::fault` calls waiting on `progress` now.
    fault_waiters: AtomicUsize,
    started: Instant,
    completed: OnceLock<Duration>,
    /// Set once the pager is ending: paths stop, errors are expected.
    stopping: AtomicBool,
    /// Raised to stop the fault loops (and with them the demand thread).
    stop: Arc<StopSignal>,
    /// Why the pager ends: the first reason given wins.
    ending: OnceLock<Outcome>,
    /// Whether someone has taken on the teardown (it runs once).
    tearing_down: AtomicBool,
    /// The outcome, published once the teardown is done.
    ended: watch::Sender<Option<Outcome>>,
    /// The network tasks (demand link, prefetcher), aborted at the end.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// First-touch order, when recording.
    recorded: Mutex<Vec<PageRange>>,
    /// Which servers serve the manifest in use (checked before the link or
    /// the prefetcher uses a server the manifest did not come from).
    fleet: crate::fleet::Consistency,
    /// The snapshot's image, handed over by a server on this host
    /// (`unix://`): the prefetcher and the demand link read pages from it
    /// instead of their streams (`source.rs`).
    page_file: Option<source::PageFile>,
}

impl Shared {
    fn demand(&self, d: Demand) {
        // The link lives as long as the pager; a send fails only while
        // stopping, when nothing waits for the answer.
        let _ = self.demand_tx.send(d);
    }

    /// The demand path settled pages (a fault's answer installed, a zero
    /// page mapped): notifies `progress` if someone needs to hear it now, a
    /// `Pager::fault` call waiting, or the watcher once no page is left
    /// unsettled. Otherwise nobody is woken: the watcher would only count
    /// and sleep again, and on a demand fault that wake-up of a worker of the
    /// shared runtime cost the client one or two context switches per fault
    /// (docs/BENCHMARKS.md). The watcher also looks every `WATCH_INTERVAL`.
    fn demand_progress(&self) {
        // Pairs with the fence in `Pager::fault`: either it sees the page
        // settled, or this sees it waiting.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.table.unsettled() == 0 || self.fault_waiters.load(Ordering::SeqCst) > 0 {
            self.progress.notify_waiters();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn region_of(&self, page: PageIndex) -> Option<&RegionState> {
        self.regions
            .iter()
            .find(|r| page.0 >= r.first_page && page.0 < r.first_page + r.pages)
    }

    fn stats(&self) -> Stats {
        let total = self.regions.iter().map(|r| r.pages).sum();
        self.counters
            .snapshot(total, self.started.elapsed(), self.completed.get().copied())
    }
}

/// A running pager. Dropping it before completion poisons the pages it has
/// not filled (touching them raises SIGBUS) rather than let the guest see
/// zeros; see [`Pager::shutdown`].
#[derive(Debug)]
pub struct Pager {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The watcher task (completion, or an end asked for by a pager thread).
    watcher: Option<tokio::task::AbortHandle>,
}

impl Pager {
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

    /// Whether pages are read from the page file of a server on this host
    /// (`unix://`, handed over at start) instead of the streams.
    pub fn reads_page_file(&self) -> bool {
        self.shared.page_file.is_some()
    }

    /// Whether every page is settled (and the regions unregistered).
    pub fn is_complete(&self) -> bool {
        matches!(self.outcome(), Some(Outcome::Complete))
    }

    /// How the pager ended, once it has (and its teardown is done); `None`
    /// while it runs.
    pub fn outcome(&self) -> Option<Outcome> {
        self.shared.ended.borrow().clone()
    }

    /// A receiver that sees the [`Outcome`] once the pager has ended: for a
    /// handler that waits on many pagers (`changed()`, then `borrow()`).
    pub fn watch_outcome(&self) -> watch::Receiver<Option<Outcome>> {
        self.shared.ended.subscribe()
    }

    /// The end, as a future: resolves with the [`Outcome`] once the pager
    /// has ended, however it ends.
    pub fn ended(&self) -> impl Future<Output = Outcome> + Send + 'static {
        let mut rx = self.shared.ended.subscribe();
        async move {
            loop {
                if let Some(o) = rx.borrow_and_update().clone() {
                    return o;
                }
                if rx.changed().await.is_err() {
                    // The pager is gone: it was dropped, which stops it.
                    return rx.borrow().clone().unwrap_or(Outcome::Stopped);
                }
            }
        }
    }

    /// Waits up to `timeout` for the pager to end; its [`Outcome`], or
    /// `None` on timeout. Blocking; not from inside an async task.
    pub fn wait_ended(&self, timeout: Duration) -> Option<Outcome> {
        let runtime = self.runtime.as_ref()?;
        runtime
            .block_on(async { tokio::time::timeout(timeout, self.ended()).await })
            .ok()
    }

    /// Waits up to `timeout` for completion; the final statistics, or
    /// `None` on timeout or if the pager ended otherwise (see
    /// [`Pager::outcome`]). Blocking.
    pub fn wait_complete(&self, timeout: Duration) -> Option<Stats> {
        match self.wait_ended(timeout)? {
            Outcome::Complete => Some(self.stats()),
            _ => None,
        }
    }

    /// Completion, as a future: the final statistics once every page is
    /// settled, or the [`Outcome`] if the pager ended otherwise.
    pub fn completion(&self) -> impl Future<Output = Result<Stats, Outcome>> + Send + 'static {
        let shared = self.shared.clone();
        let ended = self.ended();
        async move {
            match ended.await {
                Outcome::Complete => Ok(shared.stats()),
                other => Err(other),
            }
        }
    }

    /// A handle that can stop this pager from any thread (a signal handler's
    /// thread, a supervisor), without owning it.
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::downgrade(&self.shared))
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
        // Counted as waiting for as long as this call lives (a dropped future
        // included), so that the demand path notifies `progress`.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        shared.fault_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&shared.fault_waiters);
        std::sync::atomic::fence(Ordering::SeqCst);
        loop {
            let progress = shared.progress.notified();
            let mut waiting = false;
            for p in (first.0..=last.0).map(PageIndex) {
                match shared.table.get(p) {
                    PageState::Present | PageState::Outside => {}
                    PageState::Poisoned => return Err(FaultError::Poisoned(p)),
                    PageState::ZeroOnFault if region.uffd().is_none() => {}
                    PageState::InFlight => waiting = true,
                    _ => {
                        if let Err(e) = shared.on_fault(region, p, false, faults::Caller::Other) {
                            shared.on_install_error(&e);
                            return Err(e.into());
                        }
                        waiting |= shared.table.get(p) != PageState::Present;
                    }
                }
            }
            if !waiting {
                return Ok(());
            }
            if let Some(outcome) = shared.ending.get() {
                return Err(FaultError::Ended(outcome.clone()));
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
        runtime.block_on(recording::upload(&self.shared))
    }

    /// Stops the pager now and returns how it ended. Pages not filled yet
    /// are poisoned with `UFFDIO_POISON` (a thread touching one, or waiting
    /// on one now, gets SIGBUS), never left for the kernel to zero-fill or
    /// for a vCPU to wait on forever. If the pager had already ended, that
    /// outcome is returned (and nothing more is done).
    pub fn shutdown(mut self) -> Outcome {
        self.teardown()
    }
}

impl Drop for Pager {
    /// As [`Pager::shutdown`].
    fn drop(&mut self) {
        self.teardown();
    }
}
