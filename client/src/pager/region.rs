//! One region under the pager: its memory, its uffd, its strategy, and the
//! installer that puts verified pages into it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use faultline_proto::{PageIndex, PageRange};

use super::error::InstallError;
use crate::backing::GuestMemory;
use crate::strategy::{Decision, Strategy};
use crate::uffd::{ResolveError, ResolveOps, Uffd};

/// How long an install keeps retrying EAGAIN (a memory-map event the fault
/// thread has not handled yet) before giving up. Events are read within
/// microseconds; a second means the fault thread is stuck.
pub const EAGAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between EAGAIN retries: the refusal lasts until the thread that
/// caused the event (in `madvise`, `munmap`) resumes, which a busy loop
/// would only delay.
const EAGAIN_PAUSE: Duration = Duration::from_micros(50);

/// A region of guest memory being filled.
#[derive(Debug)]
pub struct RegionState {
    /// Position in the pager's region list.
    pub index: usize,
    /// The uffd it is registered on; taken when the pager completes.
    /// Declared before `memory`, so dropped first: while the range is
    /// registered on a uffd with `EVENT_UNMAP`, `munmap` sleeps until someone
    /// reads the UNMAP message, and when a region is dropped nobody is
    /// reading (a `Pager::start` that failed after registering a region hung).
    uffd: Mutex<Option<Arc<Uffd>>>,
    /// The memory.
    pub memory: GuestMemory,
    /// How it is filled, and why.
    pub decision: Decision,
    /// Where the guest mapping is now (REMAP events move it).
    host: AtomicUsize,
    /// First snapshot page held by the region.
    pub first_page: u64,
    /// Snapshot pages held.
    pub pages: u64,
    /// Bytes per snapshot page.
    pub page_bytes: usize,
    /// Snapshot pages per *install unit*: 1 where a snapshot page is a whole
    /// number of the memory's pages, else the memory's page over the
    /// snapshot's (512 for a 4 KiB snapshot in 2 MiB hugetlbfs memory).
    /// The kernel installs, zeroes, poisons and discards whole memory pages
    /// only, so every path claims, installs and settles a unit at once;
    /// the snapshot page stays the unit of transfer and verification.
    pub unit: u64,
}

/// Who is calling a resolve operation. It decides what EAGAIN (a memory-map
/// event pending on the uffd) means: another thread pauses and retries while
/// the fault thread reads the event; the fault thread itself must not wait,
/// since it is the one that reads events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The pager's demand thread, which reads the uffd (its fault loops)
    /// and runs the demand link: EAGAIN returns [`InstallError::Again`] and
    /// the fault loop reads messages, then the fault or the request is
    /// retried.
    FaultThread,
    /// Any other thread (prefetcher, `Pager::fault`, teardown):
    /// EAGAIN is retried here for up to [`EAGAIN_TIMEOUT`].
    Other,
}

/// Zeros to COPY from where ZEROPAGE is not advertised (hugetlbfs).
fn zero_buffer(len: usize) -> &'static [u8] {
    static ZEROS: OnceLock<Vec<u8>> = OnceLock::new();
    let z = ZEROS.get_or_init(|| vec![0u8; crate::backing::HUGE_PAGE_SIZE]);
    &z[..len]
}

impl RegionState {
    /// A region whose memory starts at snapshot page `first_page`.
    pub fn new(
        index: usize,
        memory: GuestMemory,
        decision: Decision,
        uffd: Option<Arc<Uffd>>,
        first_page: u64,
        page_bytes: usize,
    ) -> Self {
        let pages = (memory.len() / page_bytes) as u64;
        let unit = (memory.page_size() / page_bytes).max(1) as u64;
        Self {
            index,
            host: AtomicUsize::new(memory.host_addr()),
            memory,
            decision,
            uffd: Mutex::new(uffd),
            first_page,
            pages,
            page_bytes,
            unit,
        }
    }

    /// Bytes per install unit (see [`Self::unit`]).
    pub fn unit_bytes(&self) -> usize {
        self.unit as usize * self.page_bytes
    }

    /// Whether this region installs several snapshot pages as one memory
    /// page (a 4 KiB snapshot in hugetlbfs memory).
    pub fn is_mixed(&self) -> bool {
        self.unit > 1
    }

    /// The install unit holding snapshot page `page` (in the region): the
    /// page itself unless [`Self::is_mixed`].
    pub fn unit_of(&self, page: PageIndex) -> PageRange {
        let start = self.first_page + (page.0 - self.first_page) / self.unit * self.unit;
        let count = self.unit.min(self.first_page + self.pages - start);
        PageRange::new(PageIndex(start), count).expect("a unit is non-empty")
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.decision.strategy()
    }

    /// The snapshot pages held.
    pub fn range(&self) -> PageRange {
        PageRange::new(PageIndex(self.first_page), self.pages).expect("regions are non-empty")
    }

    /// The uffd, while registered. (The lock is never held across a call
    /// that can panic; a poisoned one is used as it is, so that a teardown
    /// after a panic still reaches the uffd.)
    pub fn uffd(&self) -> Option<Arc<Uffd>> {
        self.uffd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes the uffd away (completion, shutdown).
    pub fn take_uffd(&self) -> Option<Arc<Uffd>> {
        self.uffd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Host address of snapshot page `page` (which must be in the region).
    pub fn addr_of(&self, page: PageIndex) -> usize {
        self.host.load(Ordering::Acquire) + (page.0 - self.first_page) as usize * self.page_bytes
    }

    /// The snapshot page holding host address `addr`, if in the region.
    pub fn page_of(&self, addr: usize) -> Option<PageIndex> {
        let base = self.host.load(Ordering::Acquire);
        let off = addr.checked_sub(base)?;
        (off < self.memory.len())
            .then(|| PageIndex(self.first_page + (off / self.page_bytes) as u64))
    }

    /// The region moved (REMAP).
    pub fn moved(&self, from: usize, to: usize) -> bool {
        self.host
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn offset_of(&self, page: PageIndex) -> usize {
        (page.0 - self.first_page) as usize * self.page_bytes
    }

    /// Installs verified snapshot bytes for the consecutive pages from
    /// `start` (`data.len()` a multiple of the page size) *without* waking the
    /// threads waiting on them: the caller settles the pages first (marks
    /// them present), then calls [`Self::wake_range`]. Woken earlier, a guest
    /// thread could go on to discard a page the pager still counts as in
    /// flight, and the pager would take its own install for stale and throw
    /// the page away (for shmem: punch it out, losing content the guest
    /// keeps through MADV_DONTNEED). Pages already present are skipped
    /// (EEXIST: another path won the race with the same content).
    pub fn install(&self, start: PageIndex, data: &[u8]) -> Result<(), InstallError> {
        self.install_as(start, data, Caller::Other)
    }

    /// [`Self::install`] on behalf of `caller`: on the fault thread (the
    /// demand link, which runs there) EAGAIN returns
    /// [`InstallError::Again`] instead of being waited out, since that
    /// thread is the one that reads the event the kernel waits for.
    pub(crate) fn install_as(
        &self,
        start: PageIndex,
        data: &[u8],
        caller: Caller,
    ) -> Result<(), InstallError> {
        let region = self.index;
        match self.strategy() {
            Strategy::Eager => self
                .memory
                .guest()
                .write(self.offset_of(start), data)
                .map_err(|e| InstallError::Write {
                    region,
                    reason: e.to_string(),
                }),
            Strategy::Copy { .. } => {
                let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
                let addr = self.addr_of(start);
                self.resolve(caller, addr, data.len(), |at, done| {
                    uffd.copy(at, &data[done..], true)
                })
            }
            Strategy::Continue => {
                let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
                let view = self.memory.fill_view().ok_or(InstallError::Write {
                    region,
                    reason: "the region has no fill view".into(),
                })?;
                // Fill the page cache through the unregistered view, then map
                // the pages into the guest mapping.
                view.write(self.offset_of(start), data)
                    .map_err(|e| InstallError::Write {
                        region,
                        reason: e.to_string(),
                    })?;
                let addr = self.addr_of(start);
                self.resolve(caller, addr, data.len(), |at, done| {
                    uffd.continue_(at, data.len() - done, true)
                })
            }
        }
    }

    /// Whether [`Self::install_bulk_copy`] may be used: a CONTINUE region
    /// (shmem, hugetlbfs) whose registration also offers COPY.
    pub fn bulk_copy_offered(&self) -> bool {
        self.strategy() == Strategy::Continue
            && self
                .decision
                .registered
                .is_some_and(|(_, ops)| ops.contains(ResolveOps::COPY))
    }

    /// [`Self::install`] for a CONTINUE region by `UFFDIO_COPY` (the
    /// prefetcher's bulk path on shmem, see [`Self::bulk_copy_offered`]):
    /// one copy and one ioctl per run, where CONTINUE writes the fill view
    /// (faulting each page-cache page in) and then maps the run. A page
    /// that COPY finds present (EEXIST) may be in the page cache without
    /// being mapped (written through another mapping of the file): it goes
    /// the CONTINUE way (written through the fill view, then mapped), so
    /// the result is the same bytes as [`Self::install`]'s. Does not wake.
    pub fn install_bulk_copy(&self, start: PageIndex, data: &[u8]) -> Result<(), InstallError> {
        let region = self.index;
        let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
        let ps = self.memory.page_size();
        let (addr, offset) = (self.addr_of(start), self.offset_of(start));
        let mut done = 0;
        let started = Instant::now();
        while done < data.len() {
            match uffd.copy(addr + done, &data[done..], true) {
                Ok(n) => done += n.max(1),
                Err(ResolveError::Exists { done: d, .. }) => {
                    done += d;
                    let page = &data[done..done + ps];
                    self.install_continue(addr + done, offset + done, page)?;
                    done += ps;
                }
                Err(ResolveError::Again { done: d, .. }) => {
                    done += d;
                    if started.elapsed() > EAGAIN_TIMEOUT {
                        return Err(InstallError::Stuck { region });
                    }
                    std::thread::sleep(EAGAIN_PAUSE);
                }
                Err(source) => return Err(self.failed(source)),
            }
        }
        Ok(())
    }

    /// Writes `data` through the fill view at `offset` and maps it at the
    /// guest address `addr` with CONTINUE, without waking.
    fn install_continue(
        &self,
        addr: usize,
        offset: usize,
        data: &[u8],
    ) -> Result<(), InstallError> {
        let region = self.index;
        let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
        let view = self.memory.fill_view().ok_or(InstallError::Write {
            region,
            reason: "the region has no fill view".into(),
        })?;
        view.write(offset, data).map_err(|e| InstallError::Write {
            region,
            reason: e.to_string(),
        })?;
        self.resolve(Caller::Other, addr, data.len(), |at, done| {
            uffd.continue_(at, data.len() - done, true)
        })
    }

    /// Resolves a fault on a page whose content is zeros, without the
    /// network. `minor`: the page cache holds the page already (a shmem page
    /// the guest dropped with MADV_DONTNEED keeps its content), so it is
    /// mapped as it is. Returns whether this call mapped it: false if it was
    /// mapped already (EEXIST: the fault message was stale, another path
    /// mapped the page after the fault was queued).
    pub fn install_zero(
        &self,
        page: PageIndex,
        minor: bool,
        caller: Caller,
    ) -> Result<bool, InstallError> {
        if !minor {
            return self.map_zero_if_absent(page, caller);
        }
        let region = self.index;
        let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
        let (addr, len) = self.span_of(page);
        let skipped = self.resolve_skipping(caller, addr, len, |at, done| {
            uffd.continue_(at, len - done, false)
        })?;
        Ok(skipped == 0)
    }

    /// The guest address and length of the install unit holding `page`:
    /// what a resolve of that one page must cover (the whole huge page in a
    /// mixed region).
    fn span_of(&self, page: PageIndex) -> (usize, usize) {
        (self.addr_of(self.unit_of(page).start()), self.unit_bytes())
    }

    /// Maps zeros at `page` unless it is mapped already; returns whether it
    /// mapped them. For a fault on a zero page ([`Self::install_zero`]), and
    /// for a MISSING fault on a page the table says is present. Such a fault
    /// either has a stale message (the page was installed after the fault was
    /// queued, and its installer woke the thread): the kernel answers EEXIST,
    /// and the page is woken. Or the page really is unmapped: the guest
    /// discarded it while the table said present (a REMOVE that raced an
    /// install, or memory whose discards the pager is not told of), so its
    /// content is zeros, which this maps. One ioctl either way, and never a
    /// bare wake that the thread would answer with the same fault forever.
    pub fn map_zero_if_absent(
        &self,
        page: PageIndex,
        caller: Caller,
    ) -> Result<bool, InstallError> {
        let region = self.index;
        let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
        let (addr, len) = self.span_of(page);
        let ops = self
            .decision
            .registered
            .map_or(ResolveOps::empty(), |(_, ops)| ops);
        let skipped = if ops.contains(ResolveOps::ZEROPAGE) {
            self.resolve_skipping(caller, addr, len, |at, done| {
                uffd.zeropage(at, len - done, false)
            })?
        } else {
            // hugetlbfs has no ZEROPAGE: copy a buffer of zeros.
            let zeros = zero_buffer(len);
            self.resolve_skipping(caller, addr, len, |at, done| {
                uffd.copy(at, &zeros[done..], false)
            })?
        };
        Ok(skipped == 0)
    }

    /// Maps zeros at the `count` pages from `start` with one `UFFDIO_ZEROPAGE`,
    /// for zero pages nobody has faulted on yet (see
    /// `Shared::install_zero_pages` for who may call it and what state the
    /// pages keep). Returns the pages mapped (those found present are
    /// skipped), or `None` (having done nothing) where the kernel does not
    /// offer ZEROPAGE for the region (hugetlbfs: copying 2 MiB of zeros
    /// per page ahead of need is not worth it; a fault resolves them as
    /// before). Pages already mapped
    /// (EEXIST: a shmem page whose page cache kept content after
    /// MADV_DONTNEED, or another path's zero install) are skipped and woken.
    pub fn install_zero_run(
        &self,
        start: PageIndex,
        count: u64,
        caller: Caller,
    ) -> Result<Option<u64>, InstallError> {
        let region = self.index;
        let ops = self
            .decision
            .registered
            .map_or(ResolveOps::empty(), |(_, ops)| ops);
        if !ops.contains(ResolveOps::ZEROPAGE) || self.strategy() == Strategy::Eager {
            return Ok(None);
        }
        let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
        let len = count as usize * self.page_bytes;
        let skipped = self.resolve_skipping(caller, self.addr_of(start), len, |at, done| {
            uffd.zeropage(at, len - done, false)
        })?;
        Ok(Some(((len - skipped) / self.page_bytes) as u64))
    }

    /// Wakes threads waiting on the `count` pages from `start` (after
    /// [`Self::install`] and settling them).
    pub fn wake_range(&self, start: PageIndex, count: u64) {
        if let Some(uffd) = self.uffd() {
            let first = self.unit_of(start).start();
            let end = self.unit_of(PageIndex(start.0 + count.max(1) - 1)).end();
            let _ = uffd.wake(
                self.addr_of(first),
                (end - first.0) as usize * self.page_bytes,
            );
        }
    }

    /// Wakes threads waiting on `page` (its fault message was stale: someone
    /// else installed it).
    pub fn wake(&self, page: PageIndex) {
        if let Some(uffd) = self.uffd() {
            let (addr, len) = self.span_of(page);
            let _ = uffd.wake(addr, len);
        }
    }

    /// Maps the page cache's content of `page` (a MINOR fault on a page that
    /// is present in the file but not in the guest mapping). Returns false if
    /// the guest mapping had it already (the fault message was stale).
    pub fn map_present(&self, page: PageIndex, caller: Caller) -> Result<bool, InstallError> {
        let region = self.index;
        let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
        let (addr, len) = self.span_of(page);
        let skipped = self.resolve_skipping(caller, addr, len, |at, done| {
            uffd.continue_(at, len - done, false)
        })?;
        Ok(skipped == 0)
    }

    /// Makes `count` pages from `start` raise SIGBUS when touched, and wakes
    /// their waiters (who take the SIGBUS): the failure policy's "poison".
    /// In a mixed region the whole install units holding them are poisoned
    /// (the kernel poisons whole huge pages).
    pub fn poison(&self, start: PageIndex, count: u64, caller: Caller) -> Result<(), InstallError> {
        let region = self.index;
        let uffd = self.uffd().ok_or(InstallError::Closed { region })?;
        let first = self.unit_of(start).start();
        let end = self.unit_of(PageIndex(start.0 + count.max(1) - 1)).end();
        let len = (end - first.0) as usize * self.page_bytes;
        let len = len.next_multiple_of(self.unit_bytes());
        self.resolve(caller, self.addr_of(first), len, |at, done| {
            uffd.poison(at, len - done, false)
        })
    }

    /// Throws away an install that raced with the guest discarding the page
    /// (REMOVE): the guest must read zeros there.
    pub fn discard(&self, page: PageIndex) {
        // Memory of another process (Firecracker's, through its uffd) is not
        // in this address space: madvise here would hit whatever this process
        // has at that address. There is no cross-process discard, so the
        // page keeps the snapshot's content; the race (an install landing
        // between the guest's balloon discard and its REMOVE being handled)
        // is documented in docs/pager.md.
        if self.memory.is_in_peer() {
            tracing::warn!(
                region = self.index,
                page = page.0,
                "a page the guest discarded was installed meanwhile; it keeps the snapshot's content"
            );
            return;
        }
        // The whole install unit: hugetlbfs discards whole huge pages only.
        let offset = self.offset_of(self.unit_of(page).start());
        let len = self.unit_bytes();
        let shared = self.memory.fill_view().is_some();
        let result = match self.memory.fill_view() {
            Some(view) => view.discard(offset, len, shared),
            None => self.memory.guest().discard(offset, len, false),
        };
        if let Err(e) = result {
            tracing::error!(
                region = self.index,
                page = page.0,
                "cannot discard a stale page: {e}"
            );
        }
    }

    /// Runs a resolve operation over `addr..addr+len` to the end: EEXIST
    /// skips the page already there (and wakes it, in case its installer
    /// used DONTWAKE); EAGAIN means a memory-map event is pending on the
    /// uffd, which the fault thread will read: pause and retry the rest.
    fn resolve(
        &self,
        caller: Caller,
        addr: usize,
        len: usize,
        op: impl Fn(usize, usize) -> Result<usize, ResolveError>,
    ) -> Result<(), InstallError> {
        self.resolve_skipping(caller, addr, len, op).map(|_| ())
    }

    /// [`Self::resolve`], returning the bytes skipped as already present.
    fn resolve_skipping(
        &self,
        caller: Caller,
        addr: usize,
        len: usize,
        op: impl Fn(usize, usize) -> Result<usize, ResolveError>,
    ) -> Result<usize, InstallError> {
        let region = self.index;
        let mut done = 0;
        let mut skipped = 0;
        let started = Instant::now();
        while done < len {
            match op(addr + done, done) {
                Ok(n) => done += n.max(1),
                Err(ResolveError::Exists { done: d, .. }) => {
                    done += d;
                    // The kernel stops at the first present page of the
                    // memory's own page size.
                    let skip = self.memory.page_size();
                    if let Some(uffd) = self.uffd() {
                        let _ = uffd.wake(addr + done, skip);
                    }
                    done += skip;
                    skipped += skip;
                }
                Err(ResolveError::Again { done: d, .. }) => {
                    done += d;
                    if caller == Caller::FaultThread {
                        // Waiting here would wait for this very thread.
                        return Err(InstallError::Again { region });
                    }
                    if started.elapsed() > EAGAIN_TIMEOUT {
                        return Err(InstallError::Stuck { region });
                    }
                    std::thread::sleep(EAGAIN_PAUSE);
                }
                Err(source) => return Err(self.failed(source)),
            }
        }
        Ok(skipped)
    }

    /// The install error for a resolve operation that failed otherwise
    /// than EEXIST or EAGAIN.
    fn failed(&self, source: ResolveError) -> InstallError {
        let region = self.index;
        // ENOENT on memory of this process means the range was unmapped under the
        // install (an UNMAP the fault thread is about to read), not that we are gone.
        if source.is_owner_gone()
            && (self.memory.is_in_peer() || errno(&source) == Some(libc::ESRCH))
        {
            InstallError::OwnerGone { region, source }
        } else {
            InstallError::Resolve { region, source }
        }
    }
}

/// The errno of a failed resolve operation.
fn errno(e: &ResolveError) -> Option<i32> {
    match e {
        ResolveError::Failed { source, .. } => source.raw_os_error(),
        _ => None,
    }
}
