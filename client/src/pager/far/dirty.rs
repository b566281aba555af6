//! The state of every page of a far-memory region: absent, resident and clean (mapped
//! write-protected), or resident and dirty (written since its content was last made durable).
//!
//! ```text
//!            fault: fetch, COPY write-protected          first write: WP fault, unprotect
//!  Absent ---------------------------------------> Clean -----------------------------> Dirty
//!    ^  ^            (a write fault: COPY writable, Dirty directly)                      |
//!    |  |  evict: drop                               |  ^  write back: protect, read,    |
//!    |  +--------------------------------------------+  +--- send, acknowledged ---------+
//!    +-------- evict: protect, read, send, acknowledged, drop ---------------------------+
//! ```
//!
//! Only code holding the engine's lock changes a state, so the table is plain data.

/// The state of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FarState {
    /// Not mapped: the next touch fetches it (from the server, its newest bytes).
    Absent,
    /// Mapped write-protected; its content is what the server holds.
    Clean,
    /// Mapped writable; written since it was last made durable.
    Dirty,
}

/// Per-page state, the CLOCK reference bits and the counts the statistics report.
#[derive(Debug)]
pub struct PageTable {
    states: Vec<FarState>,
    /// Touched since the CLOCK hand last passed (a fault on the page sets it).
    referenced: Vec<bool>,
    /// Evicted at least once: its next fetch is a refault.
    evicted: Vec<bool>,
    resident: u64,
    dirty: u64,
}

impl PageTable {
    /// A table of `pages` absent pages.
    pub fn new(pages: usize) -> Self {
        Self {
            states: vec![FarState::Absent; pages],
            referenced: vec![false; pages],
            evicted: vec![false; pages],
            resident: 0,
            dirty: 0,
        }
    }

    /// Pages in the region.
    pub fn page_count(&self) -> usize {
        self.states.len()
    }

    /// The state of `page`.
    pub fn get(&self, page: usize) -> FarState {
        self.states[page]
    }

    /// Pages mapped (clean or dirty).
    pub fn resident(&self) -> u64 {
        self.resident
    }

    /// Pages dirty.
    pub fn dirty(&self) -> u64 {
        self.dirty
    }

    /// Sets `page`'s state, keeping the counts. Returns the previous state.
    pub fn set(&mut self, page: usize, to: FarState) -> FarState {
        let from = std::mem::replace(&mut self.states[page], to);
        let resident = |s| u64::from(s != FarState::Absent);
        let dirty = |s| u64::from(s == FarState::Dirty);
        self.resident = self.resident + resident(to) - resident(from);
        self.dirty = self.dirty + dirty(to) - dirty(from);
        if to == FarState::Absent && from != FarState::Absent {
            self.evicted[page] = true;
        }
        from
    }

    /// Whether `page` was evicted before (its fetch is a refault).
    pub fn was_evicted(&self, page: usize) -> bool {
        self.evicted[page]
    }

    /// Marks `page` touched (CLOCK's reference bit).
    pub fn touch(&mut self, page: usize) {
        self.referenced[page] = true;
    }

    /// Clears and returns `page`'s reference bit.
    pub fn take_referenced(&mut self, page: usize) -> bool {
        std::mem::take(&mut self.referenced[page])
    }

    /// The dirty pages, ascending.
    pub fn dirty_pages(&self) -> Vec<usize> {
        (0..self.states.len())
            .filter(|&p| self.states[p] == FarState::Dirty)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts follow every transition, and dropping a page marks it evicted.
    #[test]
    fn counts_follow_transitions() {
        let mut t = PageTable::new(4);
        t.set(0, FarState::Clean);
        t.set(1, FarState::Dirty);
        assert_eq!((t.resident(), t.dirty()), (2, 1));
        t.set(0, FarState::Dirty);
        assert_eq!((t.resident(), t.dirty()), (2, 2));
        assert_eq!(t.dirty_pages(), vec![0, 1]);
        t.set(1, FarState::Clean);
        assert!(!t.was_evicted(1));
        t.set(1, FarState::Absent);
        assert_eq!((t.resident(), t.dirty()), (1, 1));
        assert!(t.was_evicted(1));
    }
}
