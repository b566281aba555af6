//! Fault handling: the per-region fault threads reading the uffd, and the
//! one decision procedure they share with `Pager::fault`.

use std::time::Instant;

use faultline_proto::{PageIndex, PageRange};

use super::error::InstallError;
use super::link::Demand;
use super::pages::PageState;
pub(crate) use super::region::Caller;
use super::region::RegionState;
use super::stats::Source;
use super::{Outcome, Shared};
use crate::strategy::Strategy;
use crate::uffd::{Event, EventBuffer, FaultKind, Readable, StopSignal};

/// Messages read from a uffd with one `read(2)`. Faults from many vCPUs
/// arrive together; 64 covers a burst without a large buffer.
const EVENT_BATCH: usize = 64;

/// Non-sequential faults in a row after which read-ahead stops: the window
/// drops to the faulting page alone, below the configured minimum, until
/// faults move forward again (Linux's `MMAP_LOTSAMISS` does the same for
/// file read-around). A random access pattern then pays for one page per
/// fault instead of a minimum window of pages it never touches: in the
/// pinned latency benchmark the lean fault went from 2.8-3.2x to 1.5-2.3x
/// the floor at p50 (docs/BENCHMARKS.md, "What was changed because of the
/// measurements"). Eight is long enough that a sequential scan crossing a
/// few holes keeps its window.
pub const READAHEAD_MISS_RUN: u32 = 8;

/// Adaptive read-ahead: the window doubles while faults move forward
/// through memory, halves when they jump around, and drops to one page
/// after [`READAHEAD_MISS_RUN`] jumps in a row.
#[derive(Debug)]
pub struct Readahead {
    last: Option<u64>,
    window: u64,
    min: u64,
    max: u64,
    misses: u32,
}

impl Readahead {
    /// Windows between `min` and `max` pages, starting at `min`.
    pub fn new(min: u64, max: u64) -> Self {
        let min = min.max(1);
        Self {
            last: None,
            window: min,
            min,
            max: max.max(min),
            misses: 0,
        }
    }

    /// The window (in pages, the faulting one included) for a fault on
    /// `page`.
    pub fn next(&mut self, page: u64) -> u64 {
        if let Some(last) = self.last {
            if page > last && page <= last + 2 * self.window {
                self.misses = 0;
                self.window = (self.window * 2).min(self.max);
            } else {
                self.misses = self.misses.saturating_add(1);
                self.window = if self.misses >= READAHEAD_MISS_RUN {
                    1
                } else {
                    (self.window / 2).max(self.min)
                };
            }
        }
        self.last = Some(page);
        self.window
    }
}

impl Shared {
    /// Handles a fault on `page` of `region`: resolves it locally when it
    /// can (present, zero, already in the page cache), joins a fetch in
    /// flight, or claims a read-ahead window and asks the demand link for it.
    /// `caller` says whether this runs on the region's fault thread (see
    /// [`Caller`]).
    pub(crate) fn on_fault(
        &self,
        region: &RegionState,
        page: PageIndex,
        minor: bool,
        caller: Caller,
    ) -> Result<(), InstallError> {
        self.counters.fault();
        self.serve_fault(region, page, minor, caller)
    }

    /// [`Self::on_fault`] without counting the fault (a retry).
    fn serve_fault(
        &self,
        region: &RegionState,
        page: PageIndex,
        minor: bool,
        caller: Caller,
    ) -> Result<(), InstallError> {
        loop {
            match self.table.get(page) {
                PageState::Present => {
                    if minor && region.strategy() == Strategy::Continue {
                        // Counted only if mapped here: a MINOR message can
                        // be stale too (the install's CONTINUE mapped it).
                        if region.map_present(page, caller)? {
                            self.counters.pages(Source::Local, 1);
                        }
                    } else if region.map_zero_if_absent(page, caller)? {
                        // Present in the table, absent in memory: discarded
                        // behind the table's back (see `map_zero_if_absent`).
                        tracing::debug!(
                            region = region.index,
                            page = page.0,
                            "a page marked present was not mapped; mapped zeros, its content                              after a discard"
                        );
                        self.counters.pages(Source::Zero, 1);
                    }
                    return Ok(());
                }
                PageState::ZeroOnFault => {
                    // The page's install unit: the page itself, or its whole
                    // huge page in a mixed region (zero as a whole: a unit
                    // with data keeps its zero pages Missing, and a discard
                    // takes whole huge pages).
                    let unit = region.unit_of(page);
                    // Part of the working set like any page the guest
                    // touches: a replay then maps it ahead of the guest.
                    self.record(unit);
                    let mapped = region.install_zero(page, minor, caller)?;
                    for p in unit.iter() {
                        self.table.zero_installed(p);
                    }
                    // Counted once, by the path that mapped it: `Pager::fault`,
                    // a fault thread and the prefetcher's zero runs (which
                    // leave the page ZeroOnFault) may all resolve it; the
                    // later ones get EEXIST.
                    if mapped {
                        self.counters.pages(
                            if minor { Source::Local } else { Source::Zero },
                            unit.count(),
                        );
                    }
                    self.demand_progress();
                    return Ok(());
                }
                PageState::InFlight => {
                    // Joined: the fetch in flight wakes the page when it
                    // installs it, because it is marked joined now. If the
                    // install finished first, look again: the page is
                    // settled and resolving it here wakes the thread.
                    if !self.table.join(page) {
                        continue;
                    }
                    self.counters.joined();
                    self.record(region.unit_of(page));
                    return Ok(());
                }
                PageState::Poisoned => return region.poison(page, 1, caller),
                PageState::Outside => {
                    region.wake(page);
                    return Ok(());
                }
                PageState::Missing if region.is_mixed() => {
                    let unit = region.unit_of(page);
                    if !self.claim_unit(region, unit) {
                        continue; // lost a race; look again
                    }
                    self.request_units(region, unit, page);
                    return Ok(());
                }
                PageState::Missing => {
                    if !self.claim(page) {
                        continue; // lost a race; look again
                    }
                    self.request_window(region, page, caller);
                    return Ok(());
                }
            }
        }
    }

    /// Having claimed `page`, claims the pages after it that are missing (up
    /// to the read-ahead window, through zero pages, stopping at anything
    /// present or in flight) and sends the request.
    fn request_window(&self, region: &RegionState, page: PageIndex, caller: Caller) {
        let window = self.readahead[region.index]
            .lock()
            .expect("readahead lock")
            .next(page.0);
        let limit = (page.0 + window).min(region.first_page + region.pages);
        let mut claimed = vec![true];
        let mut end = page.0 + 1;
        while end < limit {
            let p = PageIndex(end);
            match self.table.get(p) {
                PageState::Missing if self.claim(p) => claimed.push(true),
                PageState::ZeroOnFault => claimed.push(false),
                _ => break,
            }
            end += 1;
        }
        // The zero pages walked over: mapped below, once the request is out.
        let walked = PageRange::new(page, end - page.0).expect("non-empty");
        let zeros = claimed.iter().filter(|c| !**c).count();
        while claimed.last() == Some(&false) {
            claimed.pop();
            end -= 1;
        }
        let range = PageRange::new(page, end - page.0).expect("non-empty");
        self.record(range);
        self.demand(Demand {
            region: region.index,
            range,
            claimed,
            fault: Some(page),
            started: Instant::now(),
        });
        if zeros > 0 && caller == Caller::FaultThread {
            self.install_zero_pages(region, walked, caller);
        }
    }

    /// [`Self::request_window`] for a mixed region (`RegionState::unit`):
    /// having claimed `unit`, the install unit of the faulting `page`,
    /// claims the units after it that are missing, up to the read-ahead
    /// window (counted in units), walking over all-zero units and stopping
    /// at anything else, and asks for them whole: every snapshot page of a
    /// claimed unit, zero pages included (the server names those as zeros,
    /// no bytes travel). The all-zero units walked over are left to their
    /// faults: hugetlbfs has no ZEROPAGE, and a COPY of 2 MiB of zeros ahead
    /// of need is not worth it (`install_zero_run` says the same).
    fn request_units(&self, region: &RegionState, unit: PageRange, page: PageIndex) {
        let window = self.readahead[region.index]
            .lock()
            .expect("readahead lock")
            .next(unit.start().0 / region.unit);
        let limit = (unit.start().0 + window * region.unit).min(region.first_page + region.pages);
        let mut claimed = vec![true; unit.count() as usize];
        let mut end = unit.end();
        while end < limit {
            let next = region.unit_of(PageIndex(end));
            match self.table.get(next.start()) {
                PageState::Missing if self.claim_unit(region, next) => {
                    claimed.extend(std::iter::repeat_n(true, next.count() as usize));
                }
                PageState::ZeroOnFault => {
                    claimed.extend(std::iter::repeat_n(false, next.count() as usize));
                }
                _ => break,
            }
            end = next.end();
        }
        while claimed.last() == Some(&false) {
            claimed.pop();
            end -= 1;
        }
        let range = PageRange::new(unit.start(), end - unit.start().0).expect("non-empty");
        self.record(range);
        self.demand(Demand {
            region: region.index,
            range,
            claimed,
            fault: Some(page),
            started: Instant::now(),
        });
    }

    /// Maps the zero pages of `range` (pages still ZeroOnFault) ahead of
    /// the guest, one `UFFDIO_ZEROPAGE` per run: without it each of them
    /// costs the guest a fault of its own later (a fault thread wake-up and
    /// a ZEROPAGE anyway). Best effort: a page left out is resolved by its
    /// fault as before. Callers: the fault thread, for the zero pages of a
    /// read-ahead window while its request is on the wire; the prefetcher,
    /// for the zero ranges of its stream (the recorded working set's zero
    /// pages first).
    ///
    /// Only a region's fault thread marks the pages Present: it is the
    /// thread that reads REMOVE events, so a guest discard racing the
    /// install is handled after it. Another thread leaves them ZeroOnFault,
    /// which is right for a mapped zero page: it never faults while mapped,
    /// and if the guest discards it, zeros are again its content (marking it
    /// Present there could land after a racing REMOVE and leave a discarded
    /// page Present, whose next fault would then never be resolved). Off the
    /// fault thread only anonymous memory (COPY) is mapped ahead: there a
    /// ZEROPAGE maps the shared zero page, while on shmem it would allocate
    /// a page-cache page for every zero page of the snapshot.
    pub(crate) fn install_zero_pages(
        &self,
        region: &RegionState,
        range: PageRange,
        caller: Caller,
    ) {
        let fault_thread = caller == Caller::FaultThread;
        if !fault_thread && !matches!(region.strategy(), Strategy::Copy { .. }) {
            return;
        }
        let end = range.end().min(region.first_page + region.pages);
        let mut p = range.start().0.max(region.first_page);
        while p < end {
            if self.table.get(PageIndex(p)) != PageState::ZeroOnFault {
                p += 1;
                continue;
            }
            let from = p;
            while p < end && self.table.get(PageIndex(p)) == PageState::ZeroOnFault {
                p += 1;
            }
            match region.install_zero_run(PageIndex(from), p - from, caller) {
                Ok(Some(mapped)) => {
                    // Counted by what this ioctl mapped: a page some other
                    // path mapped first (a fault, `Pager::fault`, or the
                    // prefetcher, which leaves its zero pages ZeroOnFault)
                    // answered EEXIST here and was counted by that path.
                    // Counting the state changes instead counted a page the
                    // prefetcher had mapped a second time.
                    if fault_thread {
                        for q in from..p {
                            self.table.zero_installed(PageIndex(q));
                        }
                    }
                    self.counters.pages(Source::Zero, mapped);
                }
                // No ZEROPAGE for this memory: nothing to gain here.
                Ok(None) => return,
                // EAGAIN (a memory-map event pending) or stopping: leave the
                // rest to their faults. Pages mapped before the refusal stay
                // ZeroOnFault, which is right for a mapped zero page (a
                // discard keeps it so; it never faults while mapped). The
                // memory's owner gone ends the pager.
                Err(e) => {
                    if matches!(e, InstallError::OwnerGone { .. }) {
                        self.on_install_error(&e);
                    }
                    return;
                }
            }
        }
    }

    /// Handles a memory-map event on `region`.
    fn on_event(&self, region: &RegionState, event: Event) {
        match event {
            Event::Remove { start, end } => {
                // The guest discarded these pages (balloon, MADV_DONTNEED):
                // they read as zeros from now on. Installs in flight notice
                // and undo themselves (see `PageTable::finish`).
                let (start, end) = if region.is_mixed() {
                    // hugetlbfs discards whole huge pages only (the kernel
                    // trims a range to them): a partial one at either end
                    // keeps its content, and its install unit its state.
                    let unit = region.unit_bytes();
                    (start.next_multiple_of(unit), end - end % unit)
                } else {
                    (start, end)
                };
                let mut n = 0;
                let mut addr = start;
                while addr < end {
                    if let Some(p) = region.page_of(addr) {
                        self.table.remove(p);
                        n += 1;
                    }
                    addr += region.page_bytes;
                }
                self.counters.removed(n);
                self.progress.notify_waiters();
            }
            Event::Unmap { start, end } => {
                tracing::warn!(
                    region = region.index,
                    "guest memory {start:#x}..{end:#x} was unmapped; those pages are no longer served"
                );
                let mut addr = start;
                while addr < end {
                    if let Some(p) = region.page_of(addr) {
                        self.table.forget(p);
                    }
                    addr += region.page_bytes;
                }
                self.progress.notify_waiters();
            }
            Event::Remap { from, to, len } => {
                if region.moved(from, to) {
                    tracing::info!(
                        region = region.index,
                        "guest memory moved {from:#x} -> {to:#x} ({len} bytes)"
                    );
                } else {
                    tracing::error!(
                        region = region.index,
                        "part of the guest memory was moved ({from:#x} -> {to:#x}, {len} bytes); \
                         only whole regions can move, pages there are no longer served"
                    );
                }
            }
            Event::Fork => tracing::warn!("the process forked; the child's memory is not served"),
            Event::Pagefault { .. } => unreachable!("faults are handled separately"),
        }
    }
}

/// A fault thread's loop: serves `regions` (all registered on one uffd: its
/// own for a region the pager registered, or a peer's shared by every region
/// it registered), reading messages until stopped, memory-map events first
/// (so faults see their effect), then faults.
///
/// It runs as a task on the demand thread's single-threaded runtime, beside
/// the demand link and its HTTP/2 connection: the thread that reads a fault
/// is the one that sends its request and installs the answer, with no
/// wake-up of another thread in between (docs/BENCHMARKS.md measures it).
/// It never awaits anything but the uffd, the stop signal and the EAGAIN
/// retry timer; every resolve it does is synchronous, and an installer on
/// this thread never waits out an EAGAIN (it is the thread that reads the
/// event the kernel waits for: see [`Caller`]).
///
/// An error on the uffd ends the pager (see [`Shared::on_install_error`]),
/// never the process: the teardown then poisons what is unfilled.
pub(crate) async fn fault_loop(shared: &Shared, regions: &[usize], stop: &Readable<StopSignal>) {
    let first = &shared.regions[regions[0]];
    let Some(uffd) = first.uffd() else { return };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        shared.end(Outcome::Failed {
            reason: format!("{what} the uffd of regions {regions:?} failed: {e}"),
        });
    };
    // The registration holds the uffd for the loop's life.
    let ready = match crate::uffd::readable(uffd) {
        Ok(r) => r,
        Err(e) => return fail("watching", &e),
    };
    let uffd = ready.get_ref();
    let mut buf = EventBuffer::new(EVENT_BATCH);
    let mut events = Vec::with_capacity(EVENT_BATCH);
    let mut deferred: Vec<(usize, PageIndex, bool)> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.readable() => {
                drain(shared, regions, uffd);
                return;
            }
            guard = ready.readable() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => return fail("waiting on", &e),
                };
                events.clear();
                match uffd.read_events(&mut buf, &mut events) {
                    // Fewer than asked for: the queue is empty (the readiness is
                    // edge-triggered; a message arriving since re-arms it).
                    Ok(n) if n < EVENT_BATCH => guard.clear_ready(),
                    Ok(_) => {}
                    Err(e) => return fail("reading", &e),
                }
            }
            // With faults set aside, retry soon: the refusal ends when the
            // thread that caused the event resumes, which brings no message.
            () = tokio::time::sleep(DEFERRED_RETRY), if !deferred.is_empty() => {
                events.clear();
            }
        }
        handle_messages(shared, regions, &events, &mut deferred);
    }
}

/// Handles what one read of a uffd brought (and the faults set aside
/// earlier): memory-map events first, then faults. A fault whose resolve met
/// EAGAIN is set aside in `deferred` for the next round.
fn handle_messages(
    shared: &Shared,
    regions: &[usize],
    events: &[Event],
    deferred: &mut Vec<(usize, PageIndex, bool)>,
) {
    let caller = Caller::FaultThread;
    let region_of = |address: usize| {
        regions.iter().find_map(|&i| {
            let r = &shared.regions[i];
            r.page_of(address).map(|p| (r, p))
        })
    };
    for e in events
        .iter()
        .filter(|e| !matches!(e, Event::Pagefault { .. }))
    {
        // An event's range may span regions; each takes its part.
        for &i in regions {
            shared.on_event(&shared.regions[i], *e);
        }
    }
    let retries = std::mem::take(deferred)
        .into_iter()
        .map(|(i, p, minor)| ((&shared.regions[i], p, minor), true));
    let faults = events.iter().filter_map(|e| match *e {
        Event::Pagefault { address, kind, .. } => match region_of(address) {
            Some((r, page)) => Some(((r, page, kind == FaultKind::Minor), false)),
            None => {
                tracing::error!("fault at {address:#x} outside regions {regions:?}");
                None
            }
        },
        _ => None,
    });
    for ((r, page, minor), retry) in retries.chain(faults) {
        let result = if retry {
            shared.serve_fault(r, page, minor, caller)
        } else {
            shared.on_fault(r, page, minor, caller)
        };
        match result {
            Ok(()) => {}
            Err(InstallError::Again { .. }) => deferred.push((r.index, page, minor)),
            // Stopping: the range may be unregistered already. Wake the
            // thread; its retry is served by the kernel or the teardown.
            Err(_) if shared.is_stopping() => r.wake(page),
            // The owner gone, or the uffd failing: the pager ends, and
            // its teardown answers this fault (poison) where it still can.
            Err(e) => shared.on_install_error(&e),
        }
    }
}

/// Last act of a stopping fault thread: reads what is still queued, so that
/// no thread of the guest stays blocked on it. A REMOVE event blocks the
/// thread that caused it (in `madvise`) until the event is read, and the
/// uffd stays open as long as the peer (Firecracker) holds it too; faults
/// still queued are woken (their ranges are unregistered by now, or about
/// to be poisoned by the teardown). After a completed restore the thread
/// then closes its share of the uffd.
fn drain(shared: &Shared, regions: &[usize], uffd: &crate::uffd::Uffd) {
    let mut buf = EventBuffer::new(EVENT_BATCH);
    let mut events = Vec::with_capacity(EVENT_BATCH);
    while matches!(uffd.read_events(&mut buf, &mut events), Ok(n) if n > 0) {
        for e in events.drain(..) {
            match e {
                Event::Pagefault { address, .. } => {
                    let page = base_page_size();
                    let _ = uffd.wake(address & !(page - 1), page);
                }
                other => {
                    for &i in regions {
                        shared.on_event(&shared.regions[i], other);
                    }
                }
            }
        }
    }
    if shared.completed.get().is_some() {
        for &i in regions {
            drop(shared.regions[i].take_uffd());
        }
    }
}

fn base_page_size() -> usize {
    crate::backing::base_page_size()
}

/// Pause before retrying faults that met EAGAIN when no message arrives.
const DEFERRED_RETRY: std::time::Duration = std::time::Duration::from_micros(50);

#[cfg(test)]
mod tests {
    use super::*;

    /// The window grows on forward access and shrinks on random access,
    /// within its bounds; a long run of jumps stops read-ahead until faults
    /// move forward again.
    #[test]
    fn readahead_adapts() {
        let mut ra = Readahead::new(4, 64);
        assert_eq!(ra.next(100), 4);
        assert_eq!(ra.next(104), 8);
        assert_eq!(ra.next(112), 16);
        assert_eq!(ra.next(128), 32);
        assert_eq!(ra.next(160), 64);
        assert_eq!(ra.next(224), 64);
        assert_eq!(ra.next(5), 32);
        assert_eq!(ra.next(9000), 16);
        // Jumps 3..7 of a run: halved, never below the minimum.
        assert_eq!(ra.next(1), 8);
        for _ in 4..READAHEAD_MISS_RUN {
            assert_eq!(ra.next(1), 4);
        }
        // The eighth jump in a row: the faulting page alone.
        assert_eq!(ra.next(1), 1);
        assert_eq!(ra.next(70_000), 1);
        // Forward faults grow the window back from one page.
        assert_eq!(ra.next(70_001), 2);
        assert_eq!(ra.next(70_003), 4);
        assert_eq!(ra.next(70_007), 8);
        // One jump after that halves again (the run starts over).
        assert_eq!(ra.next(10), 4);
    }
}
