//! Choosing pages to evict: CLOCK (second chance) over the resident pages.
//!
//! The reference bit of a page is set by every fault the pager sees on it: the fault that
//! fetched it and the WP fault of its first write after it was fetched or written back. Reads
//! of a resident page do not fault, so CLOCK here approximates LRU by "faulted on recently";
//! docs/far-memory.md says what this costs against the accessed bits of `PAGEMAP_SCAN`.

use super::dirty::{FarState, PageTable};

/// Most pages evicted in one batch: one write-back call for the dirty ones and one
/// `madvise` per run, instead of one round trip per page. A write-back is acknowledged only
/// once durable, and the server makes each run durable on its own (a journal write and
/// fsyncs: 10-100 ms on a loaded disk, however few pages the run carries), so the batch is
/// large: 256 pages (1 MiB) cut the write-back calls of an eviction-heavy workload by 4x
/// against 64 (`faultline-bench far-memory`, docs/far-memory.md), at the price of a longer
/// wait for the one fault that triggers the eviction. A quarter of the budget at most.
pub const EVICT_BATCH: u64 = 256;

/// The CLOCK hand.
#[derive(Debug, Default)]
pub struct Clock {
    hand: usize,
}

impl Clock {
    /// Chooses up to `n` resident pages to evict, ascending: sweeping from the hand, a
    /// referenced page loses its bit and is passed over once, an unreferenced one is taken.
    /// Two sweeps at most, so a table where every page is referenced still yields victims.
    pub fn choose(&mut self, pages: &mut PageTable, n: u64) -> Vec<usize> {
        let len = pages.page_count();
        let mut victims = Vec::new();
        if len == 0 {
            return victims;
        }
        for _ in 0..2 * len {
            if victims.len() as u64 >= n {
                break;
            }
            let p = self.hand;
            self.hand = (self.hand + 1) % len;
            if pages.get(p) == FarState::Absent {
                continue;
            }
            if !pages.take_referenced(p) {
                victims.push(p);
            }
        }
        victims.sort_unstable();
        victims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unreferenced pages go first; referenced ones get a second chance; absent ones never go.
    #[test]
    fn second_chance() {
        let mut t = PageTable::new(6);
        for p in 0..5 {
            t.set(p, FarState::Clean);
        }
        t.touch(0);
        t.touch(2);
        let mut clock = Clock::default();
        assert_eq!(clock.choose(&mut t, 2), vec![1, 3]);
        // The hand is past 3; 4 is next, then (0 and 2 lost their bits) 0.
        assert_eq!(clock.choose(&mut t, 2), vec![0, 4]);
        // Everything referenced: the second sweep still finds victims.
        for p in 0..5 {
            t.touch(p);
        }
        assert_eq!(clock.choose(&mut t, 5).len(), 5);
        assert!(!clock.choose(&mut t, 5).contains(&5));
    }
}
