//! Writing dirty pages back to the store, for eviction and for `flush`.
//!
//! The order is what makes a racing write safe: **protect, then read, then send, then (once
//! acknowledged) mark clean**. After `UFFDIO_WRITEPROTECT` returns (it flushes the TLBs), no
//! thread can write the page without a WP fault, and WP faults wait for the engine's lock,
//! which the write-back holds; so the bytes read are the page's final bytes until the lock is
//! released. A write that raced it is then served: on a page still resident, the WP fault
//! marks it dirty again and unprotects it; on an evicted one, it wakes the writer, whose retry
//! faults the page back in (the bytes just written back) and writes again.

use super::dirty::FarState;
use super::{Engine, FarError, Shared};

/// Most pages in one run sent to the store (1 MiB of 4 KiB pages, well under the 16 MiB a
/// `WriteRun` may carry), and in one call of a flush: a flush of many pages is a pipeline of
/// such calls, not one buffer of every dirty page.
pub const WRITEBACK_CHUNK: usize = 256;

/// Consecutive runs of the ascending `pages`, each at most `max` long: (first, count).
pub fn runs(pages: &[usize], max: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, count)) if *start + *count == p && *count < max => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

impl Shared {
    /// Writes the ascending dirty `pages` back (protect, read, send, acknowledged) and marks
    /// them clean. On failure nothing is marked clean; pages already protected stay dirty and
    /// their next write is unprotected by its WP fault.
    pub(super) fn write_back(&self, eng: &mut Engine, pages: &[usize]) -> Result<(), FarError> {
        let ps = self.page_size;
        for chunk in pages.chunks(WRITEBACK_CHUNK) {
            let mut buffers = Vec::new();
            for (start, count) in runs(chunk, WRITEBACK_CHUNK) {
                debug_assert!((start..start + count).all(|p| eng.pages.get(p) == FarState::Dirty));
                self.uffd
                    .writeprotect(self.addr(start), count * ps, true, false)
                    .map_err(FarError::Resolve)?;
                let mut data = vec![0u8; count * ps];
                self.memory.guest().read(start * ps, &mut data)?;
                buffers.push((start as u64, data));
            }
            let runs: Vec<(u64, &[u8])> = buffers.iter().map(|(s, d)| (*s, &d[..])).collect();
            self.store.write(&runs).map_err(FarError::Store)?;
            for &p in chunk {
                eng.pages.set(p, FarState::Clean);
            }
            self.counters
                .written_back(chunk.len() as u64, (chunk.len() * ps) as u64);
            self.counters
                .levels(eng.pages.resident(), eng.pages.dirty());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs join consecutive pages and split at the maximum.
    #[test]
    fn runs_split() {
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9], 8), vec![(1, 3), (5, 2), (9, 1)]);
        assert_eq!(runs(&[0, 1, 2, 3, 4], 2), vec![(0, 2), (2, 2), (4, 1)]);
        assert!(runs(&[], 4).is_empty());
    }
}
