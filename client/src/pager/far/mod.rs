//! Far memory: a region larger than the local memory it may use, the rest held by a store
//! (a volume on a faultline server, [`RemoteStore`]).
//!
//! The region is registered MISSING | WP on its own uffd, served by one fault thread:
//!
//! - a **missing fault** fetches the page from the store (its newest bytes) and maps it with
//!   `UFFDIO_COPY`, write-protected (`UFFDIO_COPY_MODE_WP`), or writable and dirty at once when
//!   the fault was a write (saving the WP fault that would follow); a fault continuing a
//!   sequential scan reads ahead (a window of up to [`READAHEAD_MAX`] pages in one store call);
//! - a **WP fault** (the first write to a clean page) marks the page dirty and unprotects it,
//!   which wakes the writer;
//! - before mapping a page beyond the **budget**, CLOCK ([`evict`]) chooses a batch of resident
//!   pages; the dirty ones are **written back** ([`writeback`]: protect, read, send, wait for the
//!   store's acknowledgement) and all are **dropped** (`MADV_DONTNEED`, or `MADV_REMOVE` which
//!   punches a hole in shmem); their next touch is a missing fault again.
//!
//! [`FarPager::flush`] writes back every dirty page; [`FarPager::shutdown`] (and drop) flush
//! first. Every state change happens under one lock ([`Engine`]), taken by the fault thread per
//! fault and by `flush`; threads touching the region only ever wait in faults.
//! docs/far-memory.md has the model, the crash semantics and the measurements behind the
//! choices (synchronous WP faults rather than WP_ASYNC, CLOCK).
//!
//! Layout: [`budget`] (the budget), [`dirty`] (page states), [`evict`] (CLOCK), [`writeback`]
//! (protect-read-send), [`store`] (where pages live), [`stats`] (counters and metrics).

pub mod budget;
pub mod dirty;
pub mod evict;
pub mod stats;
pub mod store;
pub mod writeback;

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use faultline_proto::backoff::Backoff;

pub use budget::{Budget, BudgetTooSmall};
pub use stats::FarStats;
pub use store::{FarStore, FileStore, RemoteStore, StoreError};

use crate::backing::{AccessError, BackingKind, GuestMemory};
use crate::uffd::{
    Event, EventBuffer, FaultKind, Features, OpenError, Readiness, RegisterError, RegisterModes,
    ResolveError, ResolveOps, StopSignal, Uffd, UffdOptions,
};
use dirty::{FarState, PageTable};
use evict::{Clock, EVICT_BATCH};
use stats::Counters;

/// Messages read per `read(2)` on the uffd.
const FAULT_BATCH: usize = 64;

/// Most pages one fault fetches (the faulting page and the pages after it, in one
/// `ReadPages`): 32 pages (128 KiB). A fetch costs a round trip (~200 us on loopback)
/// whatever its size up to a few hundred KiB, so a sequential scan reading ahead 32 pages
/// pays about 1/20 of a round trip per page (measured by `faultline-bench far-memory`,
/// docs/far-memory.md); more would evict more of the budget for pages a scan that stops
/// never touches.
pub const READAHEAD_MAX: u64 = 32;

/// Pause bounds between retries of a fault whose fetch or write-back failed: the faulting
/// thread waits (it must never see a wrong page) while the store comes back.
const RETRY_INITIAL: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Starting or running a far-memory pager failed.
#[derive(Debug, thiserror::Error)]
pub enum FarError {
    /// Far memory needs anonymous or shmem memory.
    #[error(
        "far memory works on anonymous or shmem memory, not {0}: write-protection of \
         hugetlbfs and guest_memfd is not offered here"
    )]
    Backing(BackingKind),
    /// The region and the store differ.
    #[error(
        "the region ({region_pages} pages of {region_page_size} bytes) does not fit the store \
         ({store_pages} pages of {store_page_size} bytes); make them the same size"
    )]
    Shape {
        /// Region pages.
        region_pages: u64,
        /// Region page size.
        region_page_size: u64,
        /// Store pages.
        store_pages: u64,
        /// Store page size.
        store_page_size: u64,
    },
    /// The budget is too small.
    #[error(transparent)]
    Budget(#[from] BudgetTooSmall),
    /// Opening the uffd.
    #[error("opening a userfaultfd for far memory: {0}")]
    Open(#[from] OpenError),
    /// Registering the region.
    #[error("registering the far-memory region: {0}")]
    Register(#[from] RegisterError),
    /// The kernel does not offer what far memory needs on this memory.
    #[error(
        "the kernel offers {offered} on this memory, but far memory needs COPY and WRITEPROTECT \
         (Linux 5.19 or later for shmem)"
    )]
    NotOffered {
        /// What was offered.
        offered: ResolveOps,
    },
    /// Starting the fault thread.
    #[error("starting the far-memory fault thread: {0}")]
    Spawn(std::io::Error),
    /// A uffd operation failed.
    #[error(transparent)]
    Resolve(ResolveError),
    /// Reading a page for write-back.
    #[error("reading a page for write-back: {0}")]
    Access(#[from] AccessError),
    /// Dropping evicted pages.
    #[error("dropping evicted pages: {0}")]
    Discard(std::io::Error),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The fault thread stopped on an error; faults on absent pages are no longer served.
    #[error("the far-memory fault thread stopped: {0}")]
    Stopped(String),
}

/// The state every change goes through, under one lock.
#[derive(Debug)]
pub(crate) struct Engine {
    pages: PageTable,
    clock: Clock,
    /// The page after the last run fetched: a fault there continues a sequential scan.
    next_seq: usize,
    /// Pages the next fetch of a sequential scan asks for: doubled on every fault that
    /// continues the scan (up to [`READAHEAD_MAX`]), back to 1 on any other fault.
    window: u64,
}

/// What the fault thread and the handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    // Declared before `memory`: dropped first, so the region is unregistered before it is
    // unmapped.
    uffd: Uffd,
    memory: GuestMemory,
    store: Arc<dyn FarStore>,
    engine: Mutex<Engine>,
    counters: Counters,
    page_size: usize,
    /// Pages in the region.
    pages: u64,
    budget: u64,
    /// Set when the fault thread stops on an error.
    failure: Mutex<Option<String>>,
}

/// A far-memory region served from a [`FarStore`] under a local [`Budget`].
///
/// ```no_run
/// use std::sync::Arc;
/// use faultline_client::backing::GuestMemory;
/// use faultline_client::pager::far::{Budget, FarPager, FarStore, RemoteStore};
/// use faultline_client::remote::ConnectOptions;
///
/// let volume = "scratch".parse().unwrap();
/// let store = RemoteStore::open("http://127.0.0.1:7000", &ConnectOptions::default(), volume)?;
/// let memory = GuestMemory::anonymous(store.page_count() as usize * 4096)?;
/// let far = FarPager::start(memory, Budget::Bytes(64 << 20), Arc::new(store))?;
/// far.memory().guest().write(0, b"hello")?; // faults, fetches, marks dirty
/// far.flush()?; // durable on the server
/// let stats = far.shutdown()?; // flushes again, stops
/// println!("{} evictions", stats.evictions);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FarPager {
    shared: Arc<Shared>,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
}

impl FarPager {
    /// Registers `memory` (anonymous or shmem, every page absent: fresh memory) and serves it
    /// from `store` with at most `budget` resident.
    pub fn start(
        memory: GuestMemory,
        budget: Budget,
        store: Arc<dyn FarStore>,
    ) -> Result<Self, FarError> {
        let kind = memory.kind();
        if !matches!(kind, BackingKind::Anonymous | BackingKind::Shmem) {
            return Err(FarError::Backing(kind));
        }
        let page_size = memory.page_size();
        let pages = (memory.len() / page_size) as u64;
        if store.page_size() != page_size as u64 || pages > store.page_count() {
            return Err(FarError::Shape {
                region_pages: pages,
                region_page_size: page_size as u64,
                store_pages: store.page_count(),
                store_page_size: store.page_size(),
            });
        }
        let budget = budget.pages(page_size as u64)?;
        let required = if kind == BackingKind::Shmem {
            Features::MISSING_SHMEM | Features::WP_HUGETLBFS_SHMEM
        } else {
            Features::empty()
        };
        let uffd = Uffd::open_with(UffdOptions {
            wanted: Features::FAR_MEMORY,
            required,
        })?;
        // SAFETY: `memory` is guest memory owned by this pager (no Rust object lives in it);
        // it stays mapped while registered (`Shared` drops the uffd first).
        let ops = unsafe {
            uffd.register(
                memory.host_addr(),
                memory.len(),
                RegisterModes::MISSING | RegisterModes::WP,
            )?
        };
        if !ops.contains(ResolveOps::COPY | ResolveOps::WRITEPROTECT) {
            return Err(FarError::NotOffered { offered: ops });
        }
        let shared = Arc::new(Shared {
            uffd,
            memory,
            store,
            engine: Mutex::new(Engine {
                pages: PageTable::new(pages as usize),
                clock: Clock::default(),
                next_seq: usize::MAX,
                window: 1,
            }),
            counters: Counters::default(),
            page_size,
            pages,
            budget,
            failure: Mutex::new(None),
        });
        let stop =
            Arc::new(StopSignal::new().map_err(|e| FarError::Spawn(std::io::Error::other(e)))?);
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("faultline-far".into())
                .spawn(move || shared.fault_loop(&stop))
                .map_err(FarError::Spawn)?
        };
        Ok(Self {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The region.
    pub fn memory(&self) -> &GuestMemory {
        &self.shared.memory
    }

    /// What the pager did so far.
    pub fn stats(&self) -> FarStats {
        self.shared
            .counters
            .snapshot(self.shared.pages, self.shared.budget)
    }

    /// Makes every dirty page durable in the store; returns how many pages were written.
    /// Writes racing the flush are never lost: a page written after it was read for the flush
    /// is dirty again when `flush` returns.
    pub fn flush(&self) -> Result<u64, FarError> {
        if let Some(f) = self.shared.failure() {
            return Err(FarError::Stopped(f));
        }
        let mut eng = self.shared.lock();
        let dirty = eng.pages.dirty_pages();
        self.shared.write_back(&mut eng, &dirty)?;
        Ok(dirty.len() as u64)
    }

    /// Flushes, then stops serving the region and releases it. Every thread touching the
    /// region must be done: the memory is unmapped.
    pub fn shutdown(mut self) -> Result<FarStats, FarError> {
        let flushed = self.flush();
        self.stop_thread();
        flushed?;
        Ok(self.stats())
    }

    fn stop_thread(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the far-memory fault thread panicked");
        }
    }
}

impl Drop for FarPager {
    /// As [`FarPager::shutdown`], logging a failed flush (the writes since the last successful
    /// flush are then lost, as in a crash).
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = self.flush() {
                tracing::error!(
                    "far memory: the flush at drop failed, recent writes are lost: {e}"
                );
            }
            self.stop_thread();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn addr(&self, page: usize) -> usize {
        self.memory.host_addr() + page * self.page_size
    }

    /// The fault thread: reads faults and resolves each in turn until stopped.
    fn fault_loop(&self, stop: &StopSignal) {
        let mut buf = EventBuffer::new(FAULT_BATCH);
        let mut events = Vec::with_capacity(FAULT_BATCH);
        let fail = |what: String| {
            tracing::error!("far memory: {what}; faults on absent pages are no longer served");
            *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
        };
        loop {
            match self.uffd.wait(None, Some(stop)) {
                Ok(Readiness::Stopped) => return,
                Ok(_) => {}
                Err(e) => return fail(format!("waiting on the uffd failed: {e}")),
            }
            events.clear();
            if let Err(e) = self.uffd.read_events(&mut buf, &mut events) {
                return fail(format!("reading the uffd failed: {e}"));
            }
            for event in &events {
                if let Event::Pagefault {
                    address,
                    kind,
                    write,
                    ..
                } = *event
                {
                    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
                    while let Err(e) = self.on_fault(address, kind, write) {
                        if !matches!(e, FarError::Store(_)) {
                            return fail(e.to_string());
                        }
                        self.counters.store_error();
                        tracing::warn!("far memory: {e}; the faulting thread waits, retrying");
                        if stop.is_stopped() {
                            return;
                        }
                        std::thread::sleep(backoff.next_delay());
                    }
                }
            }
        }
    }

    /// Resolves one fault at `address`.
    fn on_fault(&self, address: usize, kind: FaultKind, write: bool) -> Result<(), FarError> {
        let ps = self.page_size;
        let page = address.wrapping_sub(self.memory.host_addr()) / ps;
        if page as u64 >= self.pages {
            // Not this region's: the kernel reports faults of registered ranges only.
            tracing::warn!("far memory: a fault at {address:#x}, outside the region");
            return Ok(());
        }
        let addr = self.addr(page);
        let mut eng = self.lock();
        let wake = || self.uffd.wake(addr, ps).map_err(FarError::Resolve);
        match (kind, eng.pages.get(page)) {
            // The page was evicted after the writer faulted: its retry fetches it again.
            (FaultKind::WriteProtect, FarState::Absent) => wake(),
            (FaultKind::WriteProtect, state) => {
                if state == FarState::Clean {
                    self.counters.wp_fault();
                    eng.pages.set(page, FarState::Dirty);
                    self.counters
                        .levels(eng.pages.resident(), eng.pages.dirty());
                }
                eng.pages.touch(page);
                // Unprotecting wakes the writer.
                self.uffd
                    .writeprotect(addr, ps, false, false)
                    .map_err(FarError::Resolve)
            }
            (_, FarState::Absent) => {
                let n = self.fetch_size(&mut eng, page);
                self.make_room(&mut eng, n)?;
                let mut data = vec![0u8; n as usize * ps];
                self.store.read_run(page as u64, &mut data)?;
                eng.next_seq = page + n as usize;
                let state = self.map(addr, &data[..ps], write, &wake)?;
                self.counters.fetched(eng.pages.was_evicted(page));
                eng.pages.set(page, state);
                eng.pages.touch(page);
                // The pages read ahead: clean, write-protected, and not referenced (a scan
                // that passes them once leaves them first in line for eviction).
                for i in 1..n as usize {
                    let (p, at) = (page + i, self.addr(page + i));
                    let state = self.map(at, &data[i * ps..(i + 1) * ps], false, &|| {
                        self.uffd.wake(at, ps).map_err(FarError::Resolve)
                    })?;
                    self.counters.fetched(eng.pages.was_evicted(p));
                    self.counters.read_ahead(1);
                    eng.pages.set(p, state);
                }
                self.counters
                    .levels(eng.pages.resident(), eng.pages.dirty());
                Ok(())
            }
            // Resident already: a stale message.
            _ => wake(),
        }
    }

    /// How many pages a fault on the absent `page` fetches: 1, or on a fault continuing a
    /// sequential scan the scan's window, cut at the first page that is not absent, at the
    /// region's end and at an eighth of the budget.
    fn fetch_size(&self, eng: &mut Engine, page: usize) -> u64 {
        eng.window = if page == eng.next_seq {
            (eng.window * 2).min(READAHEAD_MAX)
        } else {
            1
        };
        let most = eng.window.min((self.budget / 8).max(1));
        let mut n = 1;
        while n < most
            && ((page as u64 + n) < self.pages)
            && eng.pages.get(page + n as usize) == FarState::Absent
        {
            n += 1;
        }
        n
    }

    /// Maps one fetched page at `addr` (absent in the table): writable and dirty for a
    /// write fault, else write-protected and clean. Wakes the threads waiting there.
    fn map(
        &self,
        addr: usize,
        data: &[u8],
        write: bool,
        wake: &dyn Fn() -> Result<(), FarError>,
    ) -> Result<FarState, FarError> {
        match self.uffd.copy_mode(addr, data, false, !write) {
            Ok(_) if write => Ok(FarState::Dirty),
            Ok(_) => Ok(FarState::Clean),
            // Mapped behind the table's back (never by this pager): its protection is
            // unknown, so count it dirty; a write-back protects it before reading.
            Err(ResolveError::Exists { .. }) => {
                wake()?;
                Ok(FarState::Dirty)
            }
            Err(e) => Err(FarError::Resolve(e)),
        }
    }

    /// Evicts until `need` more pages fit the budget.
    fn make_room(&self, eng: &mut Engine, need: u64) -> Result<(), FarError> {
        let batch = EVICT_BATCH.min(self.budget / 4).max(need).max(1);
        while eng.pages.resident() + need > self.budget {
            let Engine { pages, clock, .. } = &mut *eng;
            let victims = clock.choose(pages, batch);
            if victims.is_empty() {
                break;
            }
            self.evict(eng, &victims)?;
        }
        Ok(())
    }

    /// Writes back the dirty pages among the ascending `victims`, then drops them all.
    fn evict(&self, eng: &mut Engine, victims: &[usize]) -> Result<(), FarError> {
        let dirty: Vec<usize> = victims
            .iter()
            .copied()
            .filter(|&p| eng.pages.get(p) == FarState::Dirty)
            .collect();
        self.write_back(eng, &dirty)?;
        let shared = self.memory.kind() == BackingKind::Shmem;
        for (start, count) in writeback::runs(victims, victims.len()) {
            // Clean pages are write-protected: a write racing the drop waits in a WP fault,
            // which finds the page absent and wakes the writer, whose retry fetches the page.
            // No REMOVE event comes of this: the uffd does not ask for EVENT_REMOVE (see
            // `Features::FAR_MEMORY`), so this thread cannot block on its own message.
            self.memory
                .guest()
                .discard(start * self.page_size, count * self.page_size, shared)
                .map_err(FarError::Discard)?;
            for p in start..start + count {
                eng.pages.set(p, FarState::Absent);
            }
        }
        self.counters.evicted(victims.len() as u64);
        self.counters
            .levels(eng.pages.resident(), eng.pages.dirty());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::testutil;

    const PAGE: usize = 4096;

    fn file_store(dir: &tempfile::TempDir, pages: u64) -> Arc<FileStore> {
        Arc::new(FileStore::create(&dir.path().join("far"), PAGE as u64, pages).unwrap())
    }

    fn start(kind: BackingKind, pages: u64, budget: u64, store: Arc<dyn FarStore>) -> FarPager {
        let memory = GuestMemory::new(kind, pages as usize * PAGE).unwrap();
        FarPager::start(memory, Budget::Pages(budget), store).unwrap()
    }

    /// The bytes page `p` holds after `round` writes of the hammer test.
    fn stamp(p: usize, round: u64) -> u64 {
        (p as u64) << 32 | round
    }

    /// A region four times its budget, written page by page and read back, stays within the
    /// budget, evicts and writes back on the way, and every page reads what was written; after
    /// a flush the store holds every page.
    fn round_trip(kind: BackingKind) {
        if testutil::require_uffd().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pages = 256u64;
        let store = file_store(&dir, pages);
        let far = start(kind, pages, 64, store.clone());
        let mem = far.memory().guest();
        for p in 0..pages as usize {
            mem.write(p * PAGE, &stamp(p, 1).to_le_bytes()).unwrap();
            assert!(far.stats().resident_pages <= 64);
        }
        for p in 0..pages as usize {
            let mut b = [0u8; 8];
            mem.read(p * PAGE, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), stamp(p, 1), "page {p}");
        }
        far.flush().unwrap();
        let stats = far.shutdown().unwrap();
        assert!(stats.evictions >= pages - 64, "{stats:?}");
        assert!(
            stats.refaults > 0 && stats.writeback_pages >= pages,
            "{stats:?}"
        );
        assert_eq!(stats.dirty_pages, 0);
        let mut page = vec![0u8; PAGE];
        for p in 0..pages {
            store.read(p, &mut page).unwrap();
            assert_eq!(
                page[..8],
                stamp(p as usize, 1).to_le_bytes(),
                "page {p} in the store"
            );
        }
    }

    /// Anonymous memory round-trips through the budget (see `round_trip`).
    #[test]
    fn anonymous_round_trip_under_budget() {
        round_trip(BackingKind::Anonymous);
    }

    /// Shmem memory round-trips through the budget, holes punched on eviction (see `round_trip`).
    #[test]
    fn shmem_round_trip_under_budget() {
        round_trip(BackingKind::Shmem);
    }

    /// Writes racing evictions and flushes on anonymous memory are never lost (see `hammer`).
    #[test]
    fn writes_racing_eviction_are_never_lost() {
        hammer(BackingKind::Anonymous);
    }

    /// Writes racing evictions (holes punched) and flushes on shmem are never lost (see `hammer`).
    #[test]
    fn shmem_writes_racing_eviction_are_never_lost() {
        hammer(BackingKind::Shmem);
    }

    /// Four threads rewrite pages of a region eight times its budget (bounded: 20000 writes
    /// each, at most 20 s), a fifth flushes meanwhile; then every page holds its last write,
    /// in memory and in the store.
    fn hammer(kind: BackingKind) {
        if testutil::require_uffd().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pages = 128usize;
        const THREADS: usize = 4;
        let store = file_store(&dir, pages as u64);
        let far = start(kind, pages as u64, 16, store.clone());
        let mem = far.memory().guest();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let done = AtomicBool::new(false);
        // Each thread owns the pages p with p % THREADS == t, so the last write to each page
        // is known; rounds grow, so a lost write shows as an older round.
        let last: Vec<u64> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..THREADS)
                .map(|t| {
                    s.spawn(move || {
                        let mut rounds = vec![0u64; pages];
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                        for _ in 0..20_000 {
                            if std::time::Instant::now() > deadline {
                                break;
                            }
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let p = (x as usize % (pages / THREADS)) * THREADS + t;
                            rounds[p] += 1;
                            // Two words, at both ends of the page: a torn write-back shows.
                            let v = stamp(p, rounds[p]).to_le_bytes();
                            mem.write(p * PAGE, &v).unwrap();
                            mem.write(p * PAGE + PAGE - 8, &v).unwrap();
                        }
                        rounds
                    })
                })
                .collect();
            let flusher = s.spawn(|| {
                while !done.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    far.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let rounds: Vec<Vec<u64>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
            done.store(true, Ordering::Relaxed);
            flusher.join().unwrap();
            (0..pages).map(|p| rounds[p % THREADS][p]).collect()
        });
        let check = |p: usize, bytes: &[u8], r#where: &str| {
            let want = if last[p] == 0 {
                [0u8; 8]
            } else {
                stamp(p, last[p]).to_le_bytes()
            };
            assert_eq!(bytes[..8], want, "page {p} head {where}");
            assert_eq!(bytes[PAGE - 8..], want, "page {p} tail {where}");
        };
        let mut page = vec![0u8; PAGE];
        for p in 0..pages {
            mem.read(p * PAGE, &mut page).unwrap();
            check(p, &page, "in memory");
        }
        let stats = far.shutdown().unwrap();
        assert!(
            stats.evictions > 0 && stats.writeback_pages > 0,
            "{stats:?}"
        );
        for p in 0..pages {
            store.read(p as u64, &mut page).unwrap();
            check(p, &page, "in the store");
        }
    }

    /// A [`FileStore`] that counts the calls made to it.
    #[derive(Debug)]
    struct Counting {
        inner: FileStore,
        reads: std::sync::atomic::AtomicU64,
        writes: std::sync::atomic::AtomicU64,
        runs: std::sync::atomic::AtomicU64,
    }

    impl FarStore for Counting {
        fn page_size(&self) -> u64 {
            self.inner.page_size()
        }
        fn page_count(&self) -> u64 {
            self.inner.page_count()
        }
        fn read(&self, page: u64, out: &mut [u8]) -> Result<(), StoreError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read(page, out)
        }
        fn read_run(&self, start: u64, out: &mut [u8]) -> Result<(), StoreError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read_run(start, out)
        }
        fn write(&self, runs: &[(u64, &[u8])]) -> Result<(), StoreError> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.runs.fetch_add(runs.len() as u64, Ordering::Relaxed);
            self.inner.write(runs)
        }
    }

    fn counting(dir: &tempfile::TempDir, pages: u64) -> Arc<Counting> {
        Arc::new(Counting {
            inner: FileStore::create(&dir.path().join("far"), PAGE as u64, pages).unwrap(),
            reads: Default::default(),
            writes: Default::default(),
            runs: Default::default(),
        })
    }

    /// A sequential scan of a region four times its budget reads ahead: far fewer store
    /// reads than pages, every page right, the budget kept; a random pattern of faults does
    /// not read ahead.
    #[test]
    fn sequential_scans_read_ahead() {
        if testutil::require_uffd().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pages = 1024u64;
        let store = counting(&dir, pages);
        let mut page = vec![0u8; PAGE];
        for p in 0..pages {
            page[..8].copy_from_slice(&stamp(p as usize, 3).to_le_bytes());
            store.inner.write(&[(p, &page)]).unwrap();
        }
        let far = start(BackingKind::Anonymous, pages, 256, store.clone());
        let mem = far.memory().guest();
        for p in 0..pages as usize {
            let mut b = [0u8; 8];
            mem.read(p * PAGE, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), stamp(p, 3), "page {p}");
            assert!(far.stats().resident_pages <= 256);
        }
        // The fault thread counts a fetch after it maps the page (and wakes the reader).
        let settled = std::time::Instant::now() + Duration::from_secs(5);
        while far.stats().fetches < pages && std::time::Instant::now() < settled {
            std::thread::sleep(Duration::from_millis(1));
        }
        let stats = far.stats();
        let reads = store.reads.load(Ordering::Relaxed);
        assert_eq!(stats.fetches, pages, "{stats:?}");
        assert!(stats.readahead_pages > pages / 2, "{stats:?}");
        assert!(reads < pages / 8, "{reads} reads for {pages} pages");
        // Pages far apart, in a scattered order: one read each.
        let before = store.reads.load(Ordering::Relaxed);
        for i in 0..64usize {
            let p = (i * 389) % 700;
            let mut b = [0u8; 8];
            mem.read(p * PAGE, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), stamp(p, 3), "page {p}");
        }
        std::thread::sleep(Duration::from_millis(50));
        let after = far.stats();
        assert_eq!(
            store.reads.load(Ordering::Relaxed) - before,
            after.fetches - stats.fetches,
            "{after:?}"
        );
        assert_eq!(after.readahead_pages, stats.readahead_pages);
        far.shutdown().unwrap();
    }

    /// A flush of scattered dirty pages among resident clean ones sends a few long runs,
    /// bridging the clean gaps, and the store then holds every page's last bytes.
    #[test]
    fn flush_bridges_clean_gaps() {
        if testutil::require_uffd().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pages = 512u64;
        let store = counting(&dir, pages);
        let far = start(BackingKind::Anonymous, pages, pages, store.clone());
        let mem = far.memory().guest();
        for p in 0..pages as usize {
            let mut b = [0u8; 8];
            mem.read(p * PAGE, &mut b).unwrap();
        }
        // Every third page written: 171 dirty pages, none adjacent.
        for p in (0..pages as usize).step_by(3) {
            mem.write(p * PAGE, &stamp(p, 1).to_le_bytes()).unwrap();
        }
        assert_eq!(far.flush().unwrap(), 171);
        let runs = store.runs.load(Ordering::Relaxed);
        assert!(runs <= 2, "{runs} runs");
        let stats = far.shutdown().unwrap();
        assert_eq!(stats.dirty_pages, 0);
        for p in 0..pages {
            let mut b = page_buf();
            store.read(p, &mut b).unwrap();
            let want = if p % 3 == 0 { stamp(p as usize, 1) } else { 0 };
            assert_eq!(b[..8], want.to_le_bytes(), "page {p}");
        }
    }

    /// A flush of dirty pages with evicted pages between them bridges those too (their bytes
    /// read back from the store), sends a few long runs, and leaves every page in the store
    /// right: the dirty ones new, the bridged ones as they were.
    #[test]
    fn flush_bridges_absent_gaps() {
        if testutil::require_uffd().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pages = 512u64;
        let store = counting(&dir, pages);
        let mut page = page_buf();
        for p in 0..pages {
            page[..8].copy_from_slice(&stamp(p as usize, 0).to_le_bytes());
            store.inner.write(&[(p, &page)]).unwrap();
        }
        let far = start(BackingKind::Anonymous, pages, 64, store.clone());
        let mem = far.memory().guest();
        // Every fourth page of the first half written: 64 dirty pages, each fault evicting.
        for p in (0..256usize).step_by(4) {
            mem.write(p * PAGE, &stamp(p, 1).to_le_bytes()).unwrap();
        }
        let runs0 = store.runs.load(Ordering::Relaxed);
        let flushed = far.flush().unwrap();
        let runs = store.runs.load(Ordering::Relaxed) - runs0;
        assert!(runs <= 4, "{runs} runs for {flushed} dirty pages");
        let stats = far.shutdown().unwrap();
        assert_eq!(stats.dirty_pages, 0);
        for p in 0..pages {
            let mut b = page_buf();
            store.read(p, &mut b).unwrap();
            let want = if p < 256 && p % 4 == 0 {
                stamp(p as usize, 1)
            } else {
                stamp(p as usize, 0)
            };
            assert_eq!(b[..8], want.to_le_bytes(), "page {p}");
        }
    }

    fn page_buf() -> Vec<u8> {
        vec![0u8; PAGE]
    }

    /// A budget below the minimum and hugetlbfs memory are refused with the reason.
    #[test]
    fn refuses_small_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store(&dir, 64);
        let memory = GuestMemory::anonymous(64 * PAGE).unwrap();
        let err = FarPager::start(memory, Budget::Pages(2), store).unwrap_err();
        assert!(err.to_string().contains("at least 16 pages"), "{err}");
    }
}
