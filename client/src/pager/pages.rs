//! The state of every page of the snapshot, shared by the fault threads,
//! the demand link, the prefetcher and `Pager::fault`.
//!
//! ```text
//!            claim (demand or prefetch)         installed
//!  MISSING ------------------------------> IN_FLIGHT ----------> PRESENT
//!     |                                       |                    |
//!     |  REMOVE event                         | REMOVE event       | REMOVE event
//!     v                                       v                    v
//!  ZERO_ON_FAULT <-----------------------------------------------------
//!     |  fault: resolved locally with zeros (or CONTINUE of what the page cache holds)
//!     v
//!  PRESENT
//! ```
//!
//! Zero pages of the snapshot start as ZERO_ON_FAULT: they are never fetched,
//! and never installed unless faulted before the pager completes (after it
//! unregisters, the kernel supplies zero pages itself). A page is *settled*
//! when it is PRESENT or ZERO_ON_FAULT (or POISONED); the pager completes
//! when every page of its regions is settled.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use faultline_proto::{PageBitmap, PageIndex};

/// Not here yet; nobody is fetching it.
pub const MISSING: u8 = 0;
/// Claimed by one path (demand request or prefetch batch), which will
/// install it.
pub const IN_FLIGHT: u8 = 1;
/// Installed with the snapshot's content.
pub const PRESENT: u8 = 2;
/// Its content is zeros: a zero page of the snapshot, or discarded by the
/// guest (REMOVE). Resolved locally when faulted.
pub const ZERO_ON_FAULT: u8 = 3;
/// Could not be fetched; touching it raises SIGBUS (failure policy).
pub const POISONED: u8 = 4;
/// Not part of any region: never faulted, never fetched.
pub const OUTSIDE: u8 = 5;

/// Atomic page states plus the count of pages not yet settled.
#[derive(Debug)]
pub struct PageTable {
    states: Vec<AtomicU8>,
    /// Pages in MISSING or IN_FLIGHT.
    unsettled: AtomicU64,
}

fn is_settled(state: u8) -> bool {
    !matches!(state, MISSING | IN_FLIGHT)
}

impl PageTable {
    /// A table of `page_count` pages: those inside `in_region` start MISSING,
    /// or ZERO_ON_FAULT if `zero_map` says they are zero; the rest OUTSIDE.
    pub fn new(page_count: u64, in_region: &PageBitmap, zero_map: &PageBitmap) -> Self {
        let mut unsettled = 0;
        let states = (0..page_count)
            .map(|i| {
                AtomicU8::new(if !in_region.get(i) {
                    OUTSIDE
                } else if zero_map.get(i) {
                    ZERO_ON_FAULT
                } else {
                    unsettled += 1;
                    MISSING
                })
            })
            .collect();
        Self {
            states,
            unsettled: AtomicU64::new(unsettled),
        }
    }

    /// The state of `page`.
    pub fn get(&self, page: PageIndex) -> u8 {
        self.states[page.0 as usize].load(Ordering::Acquire)
    }

    /// Pages still MISSING or IN_FLIGHT.
    pub fn unsettled(&self) -> u64 {
        self.unsettled.load(Ordering::Acquire)
    }

    /// Claims `page` for fetching: MISSING -> IN_FLIGHT. False if another
    /// path has it or it is settled.
    pub fn claim(&self, page: PageIndex) -> bool {
        self.states[page.0 as usize]
            .compare_exchange(MISSING, IN_FLIGHT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Gives a claimed page back (its fetch failed and will be retried by
    /// whoever faults next): IN_FLIGHT -> MISSING.
    pub fn release(&self, page: PageIndex) {
        let _ = self.states[page.0 as usize].compare_exchange(
            IN_FLIGHT,
            MISSING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Marks a claimed page installed: IN_FLIGHT -> PRESENT. Returns false
    /// if the state changed meanwhile (a REMOVE made it ZERO_ON_FAULT): the
    /// caller installed stale content and must discard it.
    pub fn finish(&self, page: PageIndex) -> bool {
        let ok = self.states[page.0 as usize]
            .compare_exchange(IN_FLIGHT, PRESENT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ok {
            self.unsettled.fetch_sub(1, Ordering::AcqRel);
        }
        ok
    }

    /// A ZERO_ON_FAULT page was installed locally: -> PRESENT. False if
    /// another path got there first.
    pub fn zero_installed(&self, page: PageIndex) -> bool {
        self.states[page.0 as usize]
            .compare_exchange(ZERO_ON_FAULT, PRESENT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A REMOVE event: the page's content is now zeros, whatever it was.
    /// Returns the previous state.
    pub fn remove(&self, page: PageIndex) -> u8 {
        let slot = &self.states[page.0 as usize];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur == OUTSIDE || cur == POISONED {
                return cur;
            }
            match slot.compare_exchange(cur, ZERO_ON_FAULT, Ordering::AcqRel, Ordering::Acquire) {
                Ok(prev) => {
                    if !is_settled(prev) {
                        self.unsettled.fetch_sub(1, Ordering::AcqRel);
                    }
                    return prev;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// The failure policy gave up on a claimed page: IN_FLIGHT -> POISONED.
    pub fn poison(&self, page: PageIndex) {
        if self.states[page.0 as usize]
            .compare_exchange(IN_FLIGHT, POISONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.unsettled.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The page's memory went away (UNMAP): it is no longer served.
    pub fn forget(&self, page: PageIndex) {
        let prev = self.states[page.0 as usize].swap(OUTSIDE, Ordering::AcqRel);
        if !is_settled(prev) {
            self.unsettled.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Pages the server need not send: settled or outside every region,
    /// except zero pages not mapped yet (ZERO_ON_FAULT), which the server
    /// then names in its stream as zero ranges (a few bytes each), so that
    /// the prefetcher can map them ahead of the guest.
    pub fn fetched_bitmap(&self) -> PageBitmap {
        let mut map = PageBitmap::new(self.states.len() as u64);
        for (i, s) in self.states.iter().enumerate() {
            let state = s.load(Ordering::Acquire);
            if is_settled(state) && state != ZERO_ON_FAULT {
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

    /// Zero pages start settled, pages outside regions are ignored, and the
    /// unsettled count follows claims and installs.
    #[test]
    fn initial_states_and_settling() {
        let t = table();
        assert_eq!(t.unsettled(), 5);
        assert_eq!(t.get(PageIndex(1)), ZERO_ON_FAULT);
        assert_eq!(t.get(PageIndex(7)), OUTSIDE);
        assert!(t.claim(PageIndex(0)));
        assert!(!t.claim(PageIndex(0)), "claimed twice");
        assert!(t.finish(PageIndex(0)));
        assert_eq!(t.unsettled(), 4);
        assert!(!t.claim(PageIndex(0)), "present page claimed");
    }

    /// A REMOVE during an install makes `finish` fail, settles the page once,
    /// and a later local zero install makes it present.
    #[test]
    fn remove_races_install() {
        let t = table();
        assert!(t.claim(PageIndex(2)));
        assert_eq!(t.remove(PageIndex(2)), IN_FLIGHT);
        assert_eq!(t.unsettled(), 4);
        assert!(!t.finish(PageIndex(2)));
        assert_eq!(t.unsettled(), 4);
        assert!(t.zero_installed(PageIndex(2)));
        assert!(!t.zero_installed(PageIndex(2)), "installed twice");
        assert_eq!(t.get(PageIndex(2)), PRESENT);
        assert_eq!(t.remove(PageIndex(2)), PRESENT);
        assert_eq!(t.unsettled(), 4);
    }

    /// The bitmap of pages not to send covers present and outside pages, and zero pages once mapped.
    #[test]
    fn fetched_bitmap() {
        let t = table();
        assert!(t.claim(PageIndex(3)));
        assert!(t.finish(PageIndex(3)));
        let m = t.fetched_bitmap();
        let set: Vec<u64> = (0..8).filter(|&i| m.get(i)).collect();
        // Not the zero page 1 until it is mapped.
        assert_eq!(set, vec![3, 6, 7]);
        assert!(t.zero_installed(PageIndex(1)));
        assert!(t.fetched_bitmap().get(1));
    }
}
