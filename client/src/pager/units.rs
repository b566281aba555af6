//! Install units of a mixed region: a snapshot of 4 KiB pages restored into
//! 2 MiB hugetlbfs memory (`RegionState::unit`, 512 snapshot pages per huge
//! page).
//!
//! The kernel installs whole huge pages only (CONTINUE, COPY, POISON and a
//! discard all take 2 MiB), while the snapshot's page stays the unit of
//! transfer and verification. So every path claims a whole unit at once
//! (`PageTable::claim_unit`), fetches all its snapshot pages (the server
//! names the zero ones as zeros: no bytes), verifies each against its
//! CRC32C, assembles the unit in a buffer (zero pages as zeros, never
//! left out) and installs it as one huge page (`Shared::install_unit`).
//! A unit whose every page is zero stays ZeroOnFault and needs no data.
//!
//! - The demand link ([`install_demand`]): a fault claims its unit (and the
//!   read-ahead window's, counted in units) and asks for them whole; the
//!   answer's units are assembled one at a time and installed. A unit with
//!   a page missing or failing its digest is not installed: it stays
//!   claimed, and the request is retried whole (the failure policy counts
//!   it as corrupt, as for any page).
//! - The prefetcher ([`Assembler`]): pages arrive in stream order, a unit
//!   across batches. A unit is assembled *unclaimed* (a fault on it meanwhile
//!   goes through the demand link as usual) and claimed only once complete,
//!   then installed; if another path has it by then, the assembly is
//!   dropped. A stream in the recorded working set's order can bring a
//!   unit's pages far apart: at most [`MAX_PARTIAL_UNITS`] units are kept
//!   half-assembled, the oldest dropped beyond that, and the units dropped
//!   (or incomplete when the stream ended) are streamed again whole
//!   ([`Assembler::take_dropped`]).

use std::cell::RefCell;

use faultline_proto::codec::PageBatch;
use faultline_proto::{PageIndex, PageRange};

use super::Shared;
use super::error::InstallError;
use super::install::Method;
use super::link::Demand;
use super::pages::PageState;
use super::region::{Caller, RegionState};
use super::stats::Source;

/// Units one prefetch stream keeps half-assembled at once: 4 huge pages
/// (8 MiB of buffers). A stream in snapshot order completes each unit
/// before the next starts (two 1 MiB batches), so one would do; the spare
/// ones absorb a working set whose pages of one unit are a little apart.
pub const MAX_PARTIAL_UNITS: usize = 4;

/// What installing a demand answer into a mixed region left to do (the
/// demand link's `Installed`, field for field).
pub(super) struct DemandInstalled {
    /// Per page of the range: claimed and not installed; those stay claimed.
    pub left: Vec<bool>,
    /// Why an install failed, if one did.
    pub failed: Option<String>,
    /// An install met EAGAIN.
    pub again: bool,
}

thread_local! {
    /// The demand thread's assembly buffer (one unit at a time), kept across
    /// answers: a fresh 2 MiB buffer per fault would cost 512 page faults.
    static DEMAND_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Fills `buf` (one unit of `region`) from `batch`: the unit's zero pages
/// (per the manifest) with zeros, every other page with its bytes from the
/// batch if they match their digest. Returns whether every page is there.
fn assemble(
    shared: &Shared,
    region: &RegionState,
    unit: PageRange,
    batch: &PageBatch,
    buf: &mut [u8],
) -> bool {
    let manifest = &shared.manifest;
    let ps = region.page_bytes;
    let mut missing = 0u64;
    for p in unit.iter() {
        if manifest.is_zero(p) {
            let off = (p.0 - unit.start().0) as usize * ps;
            buf[off..off + ps].fill(0);
        } else {
            missing += 1;
        }
    }
    for run in &batch.runs {
        let from = run.range.start().0.max(unit.start().0);
        let to = run.range.end().min(unit.end());
        for p in (from..to).map(PageIndex) {
            if manifest.is_zero(p) {
                continue;
            }
            let src = (p.0 - run.range.start().0) as usize * ps;
            let data = &run.data[src..src + ps];
            if !manifest.verify(p, data) {
                shared.counters.corrupt();
                tracing::warn!("page {} does not match its digest; not installed", p.0);
                continue;
            }
            let dst = (p.0 - unit.start().0) as usize * ps;
            buf[dst..dst + ps].copy_from_slice(data);
            missing -= 1;
        }
    }
    missing == 0
}

/// The demand link's install of an answer for a mixed region: each claimed
/// unit of `demand` whose pages are all in `batch` and verified is installed
/// as one huge page (on the fault thread: EAGAIN is reported, not waited
/// out); a unit with a page missing or corrupt stays claimed whole.
pub(super) fn install_demand(
    shared: &Shared,
    demand: &Demand,
    batch: &PageBatch,
) -> DemandInstalled {
    let region = &shared.regions[demand.region];
    let start = demand.range.start().0;
    let mut left = demand.claimed.clone();
    let mut failed = None;
    let mut again = false;
    DEMAND_BUFFER.with_borrow_mut(|buf| {
        buf.resize(region.unit_bytes(), 0);
        let mut at = start;
        while at < demand.range.end() {
            let unit = region.unit_of(PageIndex(at));
            at = unit.end();
            let idx = |p: PageIndex| (p.0 - start) as usize;
            let slots = idx(unit.start())..idx(unit.start()) + unit.count() as usize;
            if !left[slots.clone()].iter().any(|c| *c) {
                continue;
            }
            // The guest discarded the huge page while it was being fetched
            // (a REMOVE made it ZeroOnFault): no longer ours to install; its
            // waiters retry and read zeros.
            if unit
                .iter()
                .any(|p| shared.table.get(p) != PageState::InFlight)
            {
                left[slots].fill(false);
                region.wake(unit.start());
                continue;
            }
            if !assemble(shared, region, unit, batch, buf) {
                continue;
            }
            let installed = shared.install_unit(
                region,
                unit,
                buf,
                Source::Readahead,
                demand.fault,
                Method::Strategy(Caller::FaultThread),
            );
            match installed {
                Ok(()) => left[slots].fill(false),
                Err(e) => {
                    shared.on_install_error(&e);
                    if matches!(e, InstallError::Again { .. }) {
                        again = true;
                    } else {
                        failed = Some(e.to_string());
                    }
                }
            }
        }
    });
    DemandInstalled {
        left,
        failed,
        again,
    }
}

/// A unit being assembled by the prefetcher.
struct Partial {
    unit: PageRange,
    buf: Vec<u8>,
    /// Per page of the unit: its bytes (or zeros) are in `buf`.
    have: Vec<bool>,
    /// Pages of the unit not in `buf` yet.
    missing: u64,
}

/// The prefetcher's assembly of units, per stream (see the module's doc).
#[derive(Default)]
pub(super) struct Assembler {
    partial: Vec<Partial>,
    /// Buffers of units done, reused.
    spare: Vec<Vec<u8>>,
    /// Units dropped half-assembled, to stream again.
    dropped: Vec<PageRange>,
    /// Units with a page that failed its digest: left to the demand link.
    corrupt: Vec<PageRange>,
}

impl Assembler {
    /// Takes snapshot page `p` of the mixed `region` with its bytes, as the
    /// stream brought it; installs its unit once complete (counted as
    /// `source`). An install that fails releases the unit and is returned.
    pub fn add(
        &mut self,
        shared: &Shared,
        region: &RegionState,
        p: PageIndex,
        data: &[u8],
        source: Source,
    ) -> Result<(), InstallError> {
        let manifest = &shared.manifest;
        // Units move together: a page not missing is a unit another path has
        // (or had); zero pages are zeros whatever the stream says.
        if shared.table.get(p) != PageState::Missing || manifest.is_zero(p) {
            return Ok(());
        }
        let unit = region.unit_of(p);
        if !manifest.verify(p, data) {
            shared.counters.corrupt();
            tracing::warn!(
                "prefetched page {} does not match its digest; not installed",
                p.0
            );
            // The unit stays missing: a fault on it goes through the demand
            // link, whose retries and failure policy apply. Not assembled
            // again by this stream, nor streamed again.
            if let Some(i) = self.position(unit) {
                let part = self.partial.remove(i);
                self.spare.push(part.buf);
            }
            if !self.corrupt.contains(&unit) {
                self.corrupt.push(unit);
            }
            return Ok(());
        }
        if self.corrupt.contains(&unit) {
            return Ok(());
        }
        let i = match self.position(unit) {
            Some(i) => i,
            None => self.start(shared, region, unit),
        };
        let part = &mut self.partial[i];
        let slot = (p.0 - unit.start().0) as usize;
        if !part.have[slot] {
            let ps = region.page_bytes;
            part.buf[slot * ps..(slot + 1) * ps].copy_from_slice(data);
            part.have[slot] = true;
            part.missing -= 1;
        }
        if part.missing > 0 {
            return Ok(());
        }
        let part = self.partial.remove(i);
        let result = if shared.claim_unit(region, unit) {
            let method = shared.bulk_method(region);
            let installed = shared.install_unit(region, unit, &part.buf, source, None, method);
            if installed.is_err() {
                // No page stays claimed: a fault on one now goes through the
                // demand link, with its retries and failure policy.
                shared.release_claimed(region, unit.start(), unit.count());
            }
            installed
        } else {
            Ok(())
        };
        self.spare.push(part.buf);
        result
    }

    fn position(&self, unit: PageRange) -> Option<usize> {
        self.partial.iter().position(|q| q.unit == unit)
    }

    /// Starts assembling `unit` (its zero pages filled in), dropping the
    /// oldest unit if [`MAX_PARTIAL_UNITS`] are under way. Returns its index.
    fn start(&mut self, shared: &Shared, region: &RegionState, unit: PageRange) -> usize {
        if self.partial.len() >= MAX_PARTIAL_UNITS {
            let old = self.partial.remove(0);
            self.dropped.push(old.unit);
            self.spare.push(old.buf);
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(region.unit_bytes(), 0);
        let ps = region.page_bytes;
        let mut have = vec![false; unit.count() as usize];
        let mut missing = unit.count();
        for (slot, p) in unit.iter().enumerate() {
            if shared.manifest.is_zero(p) {
                buf[slot * ps..(slot + 1) * ps].fill(0);
                have[slot] = true;
                missing -= 1;
            }
        }
        self.partial.push(Partial {
            unit,
            buf,
            have,
            missing,
        });
        self.partial.len() - 1
    }

    /// The units dropped half-assembled or left incomplete (the stream is
    /// over), merged into ranges, still missing: what to stream again.
    pub fn take_dropped(&mut self, shared: &Shared) -> Vec<PageRange> {
        let mut units: Vec<PageRange> = std::mem::take(&mut self.dropped);
        units.extend(self.partial.drain(..).map(|p| p.unit));
        units.retain(|u| {
            shared.table.get(u.start()) == PageState::Missing && !self.corrupt.contains(u)
        });
        units.sort_by_key(|u| u.start().0);
        let mut merged: Vec<PageRange> = Vec::new();
        for u in units {
            match merged.last_mut() {
                Some(last) if last.end() == u.start().0 => {
                    *last =
                        PageRange::new(last.start(), last.count() + u.count()).expect("non-empty");
                }
                Some(last) if last.end() > u.start().0 => {}
                _ => merged.push(u),
            }
        }
        merged
    }
}
