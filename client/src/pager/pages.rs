//! The state of every page of the snapshot, shared by the fault threads,
//! the demand link, the prefetcher and `Pager::fault`.
//!
//! ```text
//!          claim (demand or prefetch)       installed
//!  Missing ---------------------------> InFlight ----------> Present
//!     |                                    |                   |
//!     |  REMOVE event                      | REMOVE event      | REMOVE event
//!     v                                    v                   v
//!  ZeroOnFault <-------------------------------------------------
//!     |  fault: resolved locally with zeros (or CONTINUE of what the page cache holds)
//!     v
//!  Present
//! ```
//!
//! Zero pages of the snapshot start as ZeroOnFault: they are never fetched,
//! and never installed unless faulted before the pager completes (after it
//! unregisters, the kernel supplies zero pages itself). A page is *settled*
//! when it is Present or ZeroOnFault (or Poisoned); the pager completes
//! when every page of its regions is settled.
//!
//! An InFlight page also records whether a fault sleeps on it
//! ([`PageTable::join`], a bit beside the state): only then does its
//! installer wake it (`UFFDIO_WAKE`). A replay installs tens of thousands of
//! scattered one-page runs while the guest sleeps on one of them; a wake
//! per run cost the prefetcher a fifth of its time (docs/BENCHMARKS.md).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use faultline_proto::{PageBitmap, PageIndex, PageRange};

/// The state of one snapshot page, stored as one atomic byte per page (see
/// the module's diagram; a release after a failed fetch goes InFlight ->
/// Missing, the failure policy InFlight -> Poisoned).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Not here yet; nobody is fetching it.
    Missing = 0,
    /// Claimed by one path (demand request or prefetch batch), which will
    /// install it.
    InFlight = 1,
    /// Installed with the snapshot's content.
    Present = 2,
    /// Its content is zeros: a zero page of the snapshot, or discarded by the
    /// guest (REMOVE). Resolved locally when faulted.
    ZeroOnFault = 3,
    /// Could not be fetched; touching it raises SIGBUS (failure policy).
    Poisoned = 4,
    /// Not part of any region: never faulted, never fetched.
    Outside = 5,
}

/// The bit of a stored byte saying that a fault sleeps on an InFlight page
/// (set by [`PageTable::join`]; every transition out of InFlight clears it).
const WAITED: u8 = 0x80;

impl PageState {
    /// The state stored as `byte` (only this module stores bytes).
    fn from_byte(byte: u8) -> Self {
        match byte & !WAITED {
            0 => Self::Missing,
            1 => Self::InFlight,
            2 => Self::Present,
            3 => Self::ZeroOnFault,
            4 => Self::Poisoned,
            _ => Self::Outside,
        }
    }

    /// Missing or in flight: the pager still owes this page its content.
    pub fn is_unsettled(self) -> bool {
        matches!(self, Self::Missing | Self::InFlight)
    }
}

/// What [`PageTable::finish`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// The page is Present now; `waited` if a fault sleeps on it.
    Present {
        /// A fault joined the page while it was in flight.
        waited: bool,
    },
    /// The page was no longer in flight (a REMOVE or the failure policy
    /// settled it meanwhile).
    Changed,
}

/// Atomic page states plus the count of pages not yet settled.
#[derive(Debug)]
pub struct PageTable {
    states: Vec<AtomicU8>,
    /// Pages in Missing or InFlight.
    unsettled: AtomicU64,
}

impl PageTable {
    /// A table of `page_count` pages: those inside `in_region` start Missing,
    /// or ZeroOnFault if `zero_map` says they are zero; the rest Outside.
    ///
    /// Built 64 pages at a time from the bitmaps' words: a page at a time
    /// (two checked bit reads each) took about 3 ms for 2 GiB of 4 KiB pages,
    /// part of every `Pager::start` (docs/BENCHMARKS.md, "Session 13").
    pub fn new(page_count: u64, in_region: &PageBitmap, zero_map: &PageBitmap) -> Self {
        assert!(in_region.len() == page_count && zero_map.len() == page_count);
        // Indexed by (inside << 1) | zero; a zero page outside every region
        // is Outside.
        const STATE: [PageState; 4] = [
            PageState::Outside,
            PageState::Outside,
            PageState::Missing,
            PageState::ZeroOnFault,
        ];
        let pages = usize::try_from(page_count).expect("page table fits in memory");
        let mut states = Vec::with_capacity(pages);
        let mut unsettled = 0;
        for w in 0..pages.div_ceil(64) {
            let (inside, zero) = (in_region.word(w), zero_map.word(w));
            unsettled += u64::from((inside & !zero).count_ones());
            let count = (pages - w * 64).min(64);
            states.extend((0..count).map(|b| {
                let i = ((inside >> b) & 1) << 1 | ((zero >> b) & 1);
                AtomicU8::new(STATE[i as usize] as u8)
            }));
        }
        Self {
            states,
            unsettled: AtomicU64::new(unsettled),
        }
    }

    /// The state of `page`.
    pub fn get(&self, page: PageIndex) -> PageState {
        PageState::from_byte(self.states[page.0 as usize].load(Ordering::Acquire))
    }

    /// Swaps `page` from `from` to `to`; false if it was not in `from`.
    fn swap(&self, page: PageIndex, from: PageState, to: PageState) -> bool {
        self.take(page, from, to).is_some()
    }

    /// [`Self::swap`], saying whether a fault had joined the page
    /// (`Some(true)`: its waiter needs a wake); `None` if it was not in
    /// `from`.
    fn take(&self, page: PageIndex, from: PageState, to: PageState) -> Option<bool> {
        let slot = &self.states[page.0 as usize];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur & !WAITED != from as u8 {
                return None;
            }
            match slot.compare_exchange(cur, to as u8, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(cur & WAITED != 0),
                Err(now) => cur = now,
            }
        }
    }

    /// A fault found `page` in flight and will sleep until its installer
    /// wakes it: marks it so. False if the page is no longer in flight (the
    /// caller looks again: an install that finished first did not wake it).
    /// The installer's [`Self::finish`] and this are one atomic byte, so
    /// exactly one of them sees the other: either the install wakes the
    /// page, or the fault finds it settled.
    pub fn join(&self, page: PageIndex) -> bool {
        let slot = &self.states[page.0 as usize];
        let in_flight = PageState::InFlight as u8;
        match slot.compare_exchange(
            in_flight,
            in_flight | WAITED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(now) => now == in_flight | WAITED,
        }
    }

    /// Pages still Missing or InFlight.
    pub fn unsettled(&self) -> u64 {
        self.unsettled.load(Ordering::Acquire)
    }

    /// Claims `page` for fetching: Missing -> InFlight. False if another
    /// path has it or it is settled.
    pub fn claim(&self, page: PageIndex) -> bool {
        self.swap(page, PageState::Missing, PageState::InFlight)
    }

    /// Claims every page of `unit` (an install unit of a mixed region, see
    /// `RegionState::unit`) at once: all Missing -> InFlight, or none. If a
    /// page is not Missing, the pages claimed so far are given back and this
    /// returns false; a fault that saw one of them in flight meanwhile joined
    /// and sleeps, so the caller wakes the unit then.
    pub fn claim_unit(&self, unit: PageRange) -> bool {
        for p in unit.iter() {
            if !self.claim(p) {
                for q in unit.start().0..p.0 {
                    self.release(PageIndex(q));
                }
                return false;
            }
        }
        true
    }

    /// Gives a claimed page back (its fetch failed and will be retried by
    /// whoever faults next): InFlight -> Missing. False if it was not in
    /// flight (a REMOVE or the failure policy settled it meanwhile).
    pub fn release(&self, page: PageIndex) -> bool {
        self.swap(page, PageState::InFlight, PageState::Missing)
    }

    /// Marks a claimed page installed: InFlight -> Present, saying whether
    /// a fault joined it meanwhile ([`Self::join`]: the caller must wake
    /// it). [`Finished::Changed`] if the state changed meanwhile (a REMOVE
    /// made it ZeroOnFault): the caller installed stale content and must
    /// discard it.
    pub fn finish(&self, page: PageIndex) -> Finished {
        match self.take(page, PageState::InFlight, PageState::Present) {
            Some(waited) => {
                self.unsettled.fetch_sub(1, Ordering::AcqRel);
                Finished::Present { waited }
            }
            None => Finished::Changed,
        }
    }

    /// A ZeroOnFault page was installed locally: -> Present. False if
    /// another path got there first.
    pub fn zero_installed(&self, page: PageIndex) -> bool {
        self.swap(page, PageState::ZeroOnFault, PageState::Present)
    }

    /// A REMOVE event: the page's content is now zeros, whatever it was.
    /// Returns the previous state.
    pub fn remove(&self, page: PageIndex) -> PageState {
        let slot = &self.states[page.0 as usize];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let state = PageState::from_byte(cur);
            if matches!(state, PageState::Outside | PageState::Poisoned) {
                return state;
            }
            let zero = PageState::ZeroOnFault as u8;
            match slot.compare_exchange(cur, zero, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if state.is_unsettled() {
                        self.unsettled.fetch_sub(1, Ordering::AcqRel);
                    }
                    return state;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// The failure policy gave up on a claimed page: InFlight -> Poisoned.
    pub fn poison(&self, page: PageIndex) {
        if self.swap(page, PageState::InFlight, PageState::Poisoned) {
            self.unsettled.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The page's memory went away (UNMAP): it is no longer served.
    pub fn forget(&self, page: PageIndex) {
        let prev = self.states[page.0 as usize].swap(PageState::Outside as u8, Ordering::AcqRel);
        if PageState::from_byte(prev).is_unsettled() {
            self.unsettled.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Pages the server need not send: settled or outside every region,
    /// except zero pages not mapped yet (ZeroOnFault), which the server
    /// then names in its stream as zero ranges (a few bytes each), so that
    /// the prefetcher can map them ahead of the guest.
    pub fn fetched_bitmap(&self) -> PageBitmap {
        let mut map = PageBitmap::new(self.states.len() as u64);
        for (i, s) in self.states.iter().enumerate() {
            let state = PageState::from_byte(s.load(Ordering::Acquire));
            if !state.is_unsettled() && state != PageState::ZeroOnFault {
                map.set(i as u64);
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PageTable {
        let mut region = PageBitmap::new(8);
        region.set_range(0, 6);
        let mut zero = PageBitmap::new(8);
        zero.set(1);
        PageTable::new(8, &region, &zero)
    }

    /// Every state survives the trip through its stored byte.
    #[test]
    fn states_round_trip_through_bytes() {
        use PageState::*;
        for s in [Missing, InFlight, Present, ZeroOnFault, Poisoned, Outside] {
            assert_eq!(PageState::from_byte(s as u8), s);
        }
        assert!(Missing.is_unsettled() && InFlight.is_unsettled() && !Present.is_unsettled());
    }

    /// Zero pages start settled, pages outside regions are ignored, and the
    /// unsettled count follows claims and installs.
    #[test]
    fn initial_states_and_settling() {
        let t = table();
        assert_eq!(t.unsettled(), 5);
        assert_eq!(t.get(PageIndex(1)), PageState::ZeroOnFault);
        assert_eq!(t.get(PageIndex(7)), PageState::Outside);
        assert!(t.claim(PageIndex(0)));
        assert!(!t.claim(PageIndex(0)), "claimed twice");
        assert_eq!(t.finish(PageIndex(0)), Finished::Present { waited: false });
        assert_eq!(t.unsettled(), 4);
        assert!(!t.claim(PageIndex(0)), "present page claimed");
    }

    /// The table built a word at a time gives every page the state the
    /// per-page rule says, across word edges and a partial last word.
    #[test]
    fn built_by_words_as_by_pages() {
        let pages = 64 * 3 + 37;
        let (mut region, mut zero) = (PageBitmap::new(pages), PageBitmap::new(pages));
        region.set_range(5, 120);
        region.set_range(150, pages - 150);
        for p in (0..pages).filter(|p| p % 3 == 0 || p % 7 == 0) {
            zero.set(p);
        }
        let t = PageTable::new(pages, &region, &zero);
        let mut unsettled = 0;
        for p in 0..pages {
            let want = if !region.get(p) {
                PageState::Outside
            } else if zero.get(p) {
                PageState::ZeroOnFault
            } else {
                unsettled += 1;
                PageState::Missing
            };
            assert_eq!(t.get(PageIndex(p)), want, "page {p}");
        }
        assert_eq!(t.unsettled(), unsettled);
    }

    /// A REMOVE during an install makes `finish` fail, settles the page once,
    /// and a later local zero install makes it present.
    #[test]
    fn remove_races_install() {
        let t = table();
        assert!(t.claim(PageIndex(2)));
        assert_eq!(t.remove(PageIndex(2)), PageState::InFlight);
        assert_eq!(t.unsettled(), 4);
        assert_eq!(t.finish(PageIndex(2)), Finished::Changed);
        assert_eq!(t.unsettled(), 4);
        assert!(t.zero_installed(PageIndex(2)));
        assert!(!t.zero_installed(PageIndex(2)), "installed twice");
        assert_eq!(t.get(PageIndex(2)), PageState::Present);
        assert_eq!(t.remove(PageIndex(2)), PageState::Present);
        assert_eq!(t.unsettled(), 4);
    }

    /// A unit is claimed whole or not at all, and a failed claim gives back
    /// what it took.
    #[test]
    fn units_are_claimed_whole() {
        let t = table();
        let unit = |s, n| PageRange::new(PageIndex(s), n).unwrap();
        assert!(t.claim(PageIndex(4)));
        assert!(!t.claim_unit(unit(2, 3)), "page 4 is taken");
        assert_eq!(t.get(PageIndex(2)), PageState::Missing);
        assert_eq!(t.get(PageIndex(3)), PageState::Missing);
        assert!(t.claim_unit(unit(2, 2)));
        assert_eq!(t.get(PageIndex(3)), PageState::InFlight);
        assert_eq!(t.unsettled(), 5);
    }

    /// The bitmap of pages not to send covers present and outside pages, and zero pages once mapped.
    #[test]
    fn fetched_bitmap() {
        let t = table();
        assert!(t.claim(PageIndex(3)));
        assert_eq!(t.finish(PageIndex(3)), Finished::Present { waited: false });
        let m = t.fetched_bitmap();
        let set: Vec<u64> = (0..8).filter(|&i| m.get(i)).collect();
        // Not the zero page 1 until it is mapped.
        assert_eq!(set, vec![3, 6, 7]);
        assert!(t.zero_installed(PageIndex(1)));
        assert!(t.fetched_bitmap().get(1));
    }

    /// A fault joins a page only while it is in flight; the install then
    /// reports the waiter once, and every other transition drops the mark.
    #[test]
    fn joined_pages_are_reported_to_their_installer() {
        let t = table();
        assert!(!t.join(PageIndex(0)), "a missing page cannot be joined");
        assert!(t.claim(PageIndex(0)));
        assert_eq!(
            t.finish(PageIndex(0)),
            Finished::Present { waited: false },
            "nobody joined"
        );
        assert!(t.claim(PageIndex(2)));
        assert!(t.join(PageIndex(2)));
        assert!(t.join(PageIndex(2)), "a second fault joins too");
        assert_eq!(t.get(PageIndex(2)), PageState::InFlight);
        assert!(!t.claim(PageIndex(2)), "a joined page is still claimed");
        assert_eq!(t.finish(PageIndex(2)), Finished::Present { waited: true });
        assert!(!t.join(PageIndex(2)), "settled: the fault looks again");
        assert_eq!(t.get(PageIndex(2)), PageState::Present);
        // Released, poisoned or removed while joined: the mark goes with it.
        assert!(t.claim(PageIndex(3)) && t.join(PageIndex(3)));
        assert!(t.release(PageIndex(3)));
        assert_eq!(t.get(PageIndex(3)), PageState::Missing);
        assert!(t.claim(PageIndex(4)) && t.join(PageIndex(4)));
        assert_eq!(t.remove(PageIndex(4)), PageState::InFlight);
        assert_eq!(t.get(PageIndex(4)), PageState::ZeroOnFault);
        assert!(t.claim(PageIndex(5)) && t.join(PageIndex(5)));
        t.poison(PageIndex(5));
        assert_eq!(t.get(PageIndex(5)), PageState::Poisoned);
        assert_eq!(t.unsettled(), 1, "only page 3 is owed");
    }
}
