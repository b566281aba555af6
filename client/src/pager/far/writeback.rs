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

/// Longest gap between two dirty pages that a write-back bridges to join their runs into
/// one, sending the gap's pages too: resident ones from memory, absent ones as the store holds
/// them (read back in one call per run; nobody can change an absent page meanwhile, since a
/// fault on it waits for the engine's lock, which the write-back holds). The server makes
/// every run durable on its own (a journal write and fsyncs: milliseconds on a loaded disk,
/// measured by `faultline-bench far-memory`), while a page more in a run costs microseconds;
/// so a write-back of scattered dirty pages sends few long runs rather than many short ones.
pub const BRIDGE_GAP: usize = 16;

/// Runs of the ascending `pages` where a gap of at most `gap` pages for which `bridge` holds
/// joins two runs into one; each run at most `max` long: (first, count).
pub fn bridged_runs(
    pages: &[usize],
    max: usize,
    gap: usize,
    bridge: impl Fn(usize) -> bool,
) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in pages {
        if let Some((start, count)) = out.last_mut() {
            let end = *start + *count;
            if p < end {
                continue;
            }
            if p + 1 - *start <= max && p - end <= gap && (end..p).all(&bridge) {
                *count = p + 1 - *start;
                continue;
            }
        }
        out.push((p, 1));
    }
    out
}

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
    ///
    /// Runs bridge short gaps ([`BRIDGE_GAP`]): a clean or absent page sent again is the bytes
    /// the store holds already, a dirty one is made durable (and clean) like the pages asked
    /// for.
    pub(super) fn write_back(&self, eng: &mut Engine, pages: &[usize]) -> Result<(), FarError> {
        let ps = self.page_size;
        for chunk in pages.chunks(WRITEBACK_CHUNK) {
            let mut buffers = Vec::new();
            let spans = bridged_runs(chunk, WRITEBACK_CHUNK, BRIDGE_GAP, |_| true);
            let mut sent = 0;
            for &(start, count) in &spans {
                sent += count;
                let mut data = vec![0u8; count * ps];
                let resident = |p: usize| eng.pages.get(p) != FarState::Absent;
                if !(start..start + count).all(resident) {
                    // The absent pages' durable bytes; the resident ones are overwritten below.
                    self.store.read_run(start as u64, &mut data)?;
                }
                let here: Vec<usize> = (start..start + count).filter(|&p| resident(p)).collect();
                for (s, c) in runs(&here, count) {
                    self.uffd
                        .writeprotect(self.addr(s), c * ps, true, false)
                        .map_err(FarError::Resolve)?;
                    let at = (s - start) * ps;
                    self.memory
                        .guest()
                        .read(s * ps, &mut data[at..at + c * ps])?;
                }
                buffers.push((start as u64, data));
            }
            let slices: Vec<(u64, &[u8])> = buffers.iter().map(|(s, d)| (*s, &d[..])).collect();
            self.store.write(&slices).map_err(FarError::Store)?;
            for &(start, count) in &spans {
                for p in start..start + count {
                    if eng.pages.get(p) == FarState::Dirty {
                        eng.pages.set(p, FarState::Clean);
                    }
                }
            }
            self.counters.written_back(sent as u64, (sent * ps) as u64);
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

    /// Bridged runs join across short gaps where the bridge holds, never across a page it
    /// refuses or a gap too long, and split at the maximum.
    #[test]
    fn bridged_runs_join_short_resident_gaps() {
        let all = |_| true;
        assert_eq!(bridged_runs(&[1, 3, 6], 8, 2, all), vec![(1, 6)]);
        assert_eq!(bridged_runs(&[1, 3, 7], 8, 2, all), vec![(1, 3), (7, 1)]);
        assert_eq!(
            bridged_runs(&[1, 3, 6], 8, 2, |p| p != 4),
            vec![(1, 3), (6, 1)]
        );
        assert_eq!(bridged_runs(&[0, 2, 4, 6], 4, 1, all), vec![(0, 3), (4, 3)]);
        assert_eq!(bridged_runs(&[5], 4, 1, all), vec![(5, 1)]);
        assert!(bridged_runs(&[], 4, 1, all).is_empty());
    }
}
