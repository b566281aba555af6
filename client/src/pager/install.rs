//! The install protocol, the one way fetched pages get into guest memory,
//! whichever path fetched them (the demand link for faults and read-ahead,
//! the prefetcher):
//!
//! 1. **claim**: `Missing -> InFlight` ([`Shared::claim`]), before the
//!    fetch; whoever claims a page is the only one to install it.
//! 2. **install without waking**: COPY or CONTINUE with DONTWAKE
//!    ([`RegionState::install`]); pages found present (EEXIST) are skipped.
//! 3. **count**: statistics before settling, so they are complete when the
//!    last page settling completes the pager.
//! 4. **finish**: `InFlight -> Present`; if a REMOVE made the page
//!    `ZeroOnFault` meanwhile, the install is stale: **discard** it.
//! 5. **wake** the run's waiters, only now (woken earlier, a guest thread
//!    could discard a page the pager still counts as in flight), and only
//!    if there are any: the faulting page of a demand install, pages a
//!    fault joined while they were in flight ([`PageTable::join`]; a fault
//!    that finds its page settled instead wakes itself), pages whose state
//!    changed under the install.
//!
//! A claim never outlives its path: when an install fails, the path either
//! retries the run itself (the demand link, after a backoff, still holding
//! the claim) or **releases** it (`InFlight -> Missing`) and wakes its
//! waiters, whose retry faults again and claims afresh (the prefetcher); a
//! path that gives up on pages **poisons** them.

use faultline_proto::{PageIndex, PageRange};

use super::Shared;
use super::error::InstallError;
use super::pages::{Finished, PageState};
use super::region::{Caller, RegionState};
use super::stats::Source;
use crate::backing::BackingKind;

/// How step 2 puts the bytes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Method {
    /// As the region's strategy says, on behalf of a caller
    /// ([`RegionState::install_as`]).
    Strategy(Caller),
    /// `UFFDIO_COPY` into a CONTINUE region ([`RegionState::install_bulk_copy`]).
    BulkCopy,
}

impl Shared {
    /// Step 1: claims `page` for fetching and installing (`Missing ->
    /// InFlight`). False if another path has it or it is settled.
    pub(super) fn claim(&self, page: PageIndex) -> bool {
        self.table.claim(page)
    }

    /// Step 1 for a whole install unit of a mixed region
    /// (`RegionState::unit`): every page of `unit` Missing -> InFlight, or
    /// none. A claim that fails half-way gives its pages back and wakes the
    /// unit (a fault may have joined one of them meanwhile).
    pub(super) fn claim_unit(&self, region: &RegionState, unit: PageRange) -> bool {
        if self.table.get(unit.start()) != PageState::Missing {
            return false;
        }
        if self.table.claim_unit(unit) {
            return true;
        }
        region.wake_range(unit.start(), unit.count());
        false
    }

    /// Steps 2 to 5 for consecutive pages of `region` from `start` that the
    /// caller claimed, with their verified bytes: `fault`, if among them, is
    /// counted as demand, the rest as `source`. On failure the pages stay
    /// claimed: the caller retries them or [`Self::release_claimed`]s them.
    /// On behalf of `caller`: the demand link runs on the fault thread, where
    /// EAGAIN comes back as [`InstallError::Again`] (the link retries).
    pub(super) fn install_claimed(
        &self,
        region: &RegionState,
        start: PageIndex,
        data: &[u8],
        source: Source,
        fault: Option<PageIndex>,
        caller: Caller,
    ) -> Result<(), InstallError> {
        self.install_claimed_by(region, start, data, source, fault, Method::Strategy(caller))
    }

    /// [`Self::install_claimed`] for the prefetcher's bulk runs: by
    /// `UFFDIO_COPY` on shmem or hugetlbfs when [`super::Bulk::shmem_copy`]
    /// or [`super::Bulk::hugetlb_copy`] says so and the registration offers
    /// it ([`RegionState::install_bulk_copy`]), else as the region's
    /// strategy says.
    pub(super) fn install_claimed_bulk(
        &self,
        region: &RegionState,
        start: PageIndex,
        data: &[u8],
        source: Source,
    ) -> Result<(), InstallError> {
        let method = self.bulk_method(region);
        self.install_claimed_by(region, start, data, source, None, method)
    }

    /// How the prefetcher installs its runs into `region` (see
    /// [`Self::install_claimed_bulk`]).
    pub(super) fn bulk_method(&self, region: &RegionState) -> Method {
        let wanted = match region.memory.kind() {
            BackingKind::Shmem => self.config.bulk.shmem_copy,
            BackingKind::Hugetlb => self.config.bulk.hugetlb_copy,
            _ => false,
        };
        if wanted && region.bulk_copy_offered() {
            Method::BulkCopy
        } else {
            Method::Strategy(Caller::Other)
        }
    }

    /// Steps 2 to 5 for one install unit of a mixed region
    /// (`RegionState::unit`: a huge page of 4 KiB snapshot pages) that the
    /// caller claimed whole, with its assembled bytes (`data`: the unit's
    /// snapshot pages, each verified against its digest, its zero pages
    /// zeros). Installed as one memory page, by `method`. Counted in
    /// snapshot pages: `fault` as demand, the unit's zero pages as zero
    /// (no bytes travelled for them), the rest as `source`. On failure the
    /// unit stays claimed, as with [`Self::install_claimed`].
    pub(super) fn install_unit(
        &self,
        region: &RegionState,
        unit: PageRange,
        data: &[u8],
        source: Source,
        fault: Option<PageIndex>,
        method: Method,
    ) -> Result<(), InstallError> {
        debug_assert_eq!(data.len(), region.unit_bytes());
        let start = unit.start();
        match method {
            Method::Strategy(caller) => region.install_as(start, data, caller)?,
            Method::BulkCopy => region.install_bulk_copy(start, data)?,
        }
        let zeros = unit.iter().filter(|&p| self.manifest.is_zero(p)).count() as u64;
        let received = unit.count() - zeros;
        self.counters
            .bytes(received * self.manifest.page_size.bytes());
        let demand = fault.filter(|f| f.0 >= start.0 && f.0 < unit.end());
        if demand.is_some() {
            self.counters.pages(Source::Demand, 1);
        }
        let demand_zero = demand.is_some_and(|f| self.manifest.is_zero(f));
        let zeros = zeros - u64::from(demand_zero);
        let rest = received - u64::from(demand.is_some() && !demand_zero);
        if zeros > 0 {
            self.counters.pages(Source::Zero, zeros);
        }
        if rest > 0 {
            self.counters.pages(source, rest);
        }
        let mut raced = false;
        let waiters = self.finish_run(start, unit.count(), |_| raced = true);
        if raced {
            // The guest discarded the huge page while it was being
            // installed (a discard takes it whole).
            region.discard(start);
        }
        if waiters || demand.is_some() {
            region.wake_range(start, unit.count());
        }
        Ok(())
    }

    fn install_claimed_by(
        &self,
        region: &RegionState,
        start: PageIndex,
        data: &[u8],
        source: Source,
        fault: Option<PageIndex>,
        method: Method,
    ) -> Result<(), InstallError> {
        let count = (data.len() / self.manifest.page_size.bytes_usize()) as u64;
        match method {
            Method::Strategy(caller) => region.install_as(start, data, caller)?,
            Method::BulkCopy => region.install_bulk_copy(start, data)?,
        }
        self.counters.bytes(data.len() as u64);
        let demand = u64::from(fault.is_some_and(|f| f.0 >= start.0 && f.0 < start.0 + count));
        if demand > 0 {
            self.counters.pages(Source::Demand, demand);
        }
        if count > demand {
            self.counters.pages(source, count - demand);
        }
        let waiters = self.finish_run(start, count, |p| region.discard(p));
        // The faulting page of a demand install was claimed by its fault,
        // not joined: it always has a sleeper.
        if waiters || demand > 0 {
            region.wake_range(start, count);
        }
        Ok(())
    }

    /// Step 4 for the `count` installed pages from `start`, and what step 5 needs:
    /// true if a thread may sleep on one of them (a fault joined it, or its
    /// state changed under the install). `stale` gets each page the guest
    /// discarded while it was being installed (ZeroOnFault now), whose
    /// install must be thrown away; a page a fault has resolved since is
    /// not stale (discarding a present page would leave it unmapped).
    fn finish_run(&self, start: PageIndex, count: u64, mut stale: impl FnMut(PageIndex)) -> bool {
        let mut waiters = false;
        for p in (start.0..start.0 + count).map(PageIndex) {
            match self.table.finish(p) {
                Finished::Present { waited } => waiters |= waited,
                Finished::Changed => {
                    waiters = true;
                    if self.table.get(p) == PageState::ZeroOnFault {
                        stale(p);
                    }
                }
            }
        }
        waiters
    }

    /// Gives claimed pages back (`InFlight -> Missing`) and wakes their
    /// waiters: the digest or the install failed, and whoever faults next
    /// claims them again. Pages installed before a failure are right (verified) and
    /// stay mapped; the next claim's install finds them present (EEXIST).
    pub(super) fn release_claimed(&self, region: &RegionState, start: PageIndex, count: u64) {
        let released = (start.0..start.0 + count)
            .filter(|&p| self.table.release(PageIndex(p)))
            .count();
        self.counters.released(released as u64);
        region.wake_range(start, count);
        self.progress.notify_waiters();
    }

    /// The failure policy gave up on claimed pages: poisons each one still
    /// in flight (a thread touching it gets SIGBUS) and marks it so.
    ///
    /// On behalf of `caller`: on the demand thread (the link runs there) a
    /// page refused with EAGAIN stays in flight (not poisoned, not counted):
    /// returns false then, and the caller tries again once the pending event
    /// is read.
    pub(super) fn poison_claimed(
        &self,
        region: &RegionState,
        pages: impl Iterator<Item = PageIndex>,
        caller: Caller,
    ) -> bool {
        let mut all = true;
        for p in pages {
            if self.table.get(p) != PageState::InFlight {
                continue;
            }
            match region.poison(p, 1, caller) {
                Ok(()) => {}
                Err(InstallError::Again { .. }) => {
                    all = false;
                    continue;
                }
                Err(e) => {
                    tracing::error!("poisoning page {} failed: {e}", p.0);
                    self.on_install_error(&e);
                }
            }
            // Counted first: a waiter sees the page poisoned only once the
            // statistics say so. In a mixed region the poison took the
            // page's whole install unit, whose pages are claimed together.
            let unit = region.unit_of(p);
            let n = unit
                .iter()
                .filter(|&q| self.table.get(q) == PageState::InFlight)
                .count();
            self.counters.poisoned(n as u64);
            for q in unit.iter() {
                self.table.poison(q);
            }
        }
        self.progress.notify_waiters();
        all
    }
}
