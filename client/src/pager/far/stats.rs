//! What a far-memory pager did: counters for the API and the `metrics` facade
//! (`faultline_client_far_*`, in the style of the pager's own `faultline_client_*`).

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, gauge};

/// Pages of far-memory regions mapped locally now.
pub const RESIDENT: &str = "faultline_client_far_resident_pages";
/// Pages written since they were last made durable.
pub const DIRTY: &str = "faultline_client_far_dirty_pages";
/// Pages fetched from the store.
pub const FETCHES: &str = "faultline_client_far_fetches_total";
/// Pages fetched ahead of a sequential scan (counted in the fetches too).
pub const READAHEAD: &str = "faultline_client_far_readahead_pages_total";
/// Fetches of pages evicted before.
pub const REFAULTS: &str = "faultline_client_far_refaults_total";
/// Pages dropped to stay within the budget.
pub const EVICTIONS: &str = "faultline_client_far_evictions_total";
/// Pages written back (by eviction or flush), acknowledged durable.
pub const WRITEBACK_PAGES: &str = "faultline_client_far_writeback_pages_total";
/// Bytes written back, acknowledged durable.
pub const WRITEBACK_BYTES: &str = "faultline_client_far_writeback_bytes_total";
/// Write-protect faults (first writes to a clean page).
pub const WP_FAULTS: &str = "faultline_client_far_wp_faults_total";
/// Store calls that failed (and were retried).
pub const STORE_ERRORS: &str = "faultline_client_far_store_errors_total";

/// What a far-memory pager did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FarStats {
    /// Pages in the region.
    pub pages: u64,
    /// The budget, in pages.
    pub budget_pages: u64,
    /// Pages mapped now.
    pub resident_pages: u64,
    /// Pages dirty now.
    pub dirty_pages: u64,
    /// Pages fetched from the store.
    pub fetches: u64,
    /// Of those, pages evicted before.
    pub refaults: u64,
    /// Of the fetches, pages read ahead of a sequential scan (not faulted on themselves).
    pub readahead_pages: u64,
    /// Pages dropped to stay within the budget.
    pub evictions: u64,
    /// Pages written back, acknowledged durable.
    pub writeback_pages: u64,
    /// Their bytes.
    pub writeback_bytes: u64,
    /// Write-protect faults.
    pub wp_faults: u64,
    /// Store calls that failed and were retried.
    pub store_errors: u64,
}

/// Live counters.
#[derive(Debug, Default)]
pub struct Counters {
    fetches: AtomicU64,
    refaults: AtomicU64,
    readahead: AtomicU64,
    evictions: AtomicU64,
    writeback_pages: AtomicU64,
    writeback_bytes: AtomicU64,
    wp_faults: AtomicU64,
    store_errors: AtomicU64,
    resident: AtomicU64,
    dirty: AtomicU64,
}

impl Counters {
    /// A page was fetched; `refault` if it had been evicted.
    pub fn fetched(&self, refault: bool) {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        counter!(FETCHES).increment(1);
        if refault {
            self.refaults.fetch_add(1, Ordering::Relaxed);
            counter!(REFAULTS).increment(1);
        }
    }

    /// `n` pages were fetched ahead of a scan.
    pub fn read_ahead(&self, n: u64) {
        self.readahead.fetch_add(n, Ordering::Relaxed);
        counter!(READAHEAD).increment(n);
    }

    /// `n` pages were evicted.
    pub fn evicted(&self, n: u64) {
        self.evictions.fetch_add(n, Ordering::Relaxed);
        counter!(EVICTIONS).increment(n);
    }

    /// `pages` pages (`bytes` bytes) were written back and acknowledged.
    pub fn written_back(&self, pages: u64, bytes: u64) {
        self.writeback_pages.fetch_add(pages, Ordering::Relaxed);
        self.writeback_bytes.fetch_add(bytes, Ordering::Relaxed);
        counter!(WRITEBACK_PAGES).increment(pages);
        counter!(WRITEBACK_BYTES).increment(bytes);
    }

    /// A write-protect fault.
    pub fn wp_fault(&self) {
        self.wp_faults.fetch_add(1, Ordering::Relaxed);
        counter!(WP_FAULTS).increment(1);
    }

    /// A store call failed.
    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
        counter!(STORE_ERRORS).increment(1);
    }

    /// The resident and dirty counts changed.
    pub fn levels(&self, resident: u64, dirty: u64) {
        self.resident.store(resident, Ordering::Relaxed);
        self.dirty.store(dirty, Ordering::Relaxed);
        gauge!(RESIDENT).set(resident as f64);
        gauge!(DIRTY).set(dirty as f64);
    }

    /// A snapshot of the counters for a region of `pages` pages and `budget_pages`.
    pub fn snapshot(&self, pages: u64, budget_pages: u64) -> FarStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FarStats {
            pages,
            budget_pages,
            resident_pages: get(&self.resident),
            dirty_pages: get(&self.dirty),
            fetches: get(&self.fetches),
            refaults: get(&self.refaults),
            readahead_pages: get(&self.readahead),
            evictions: get(&self.evictions),
            writeback_pages: get(&self.writeback_pages),
            writeback_bytes: get(&self.writeback_bytes),
            wp_faults: get(&self.wp_faults),
            store_errors: get(&self.store_errors),
        }
    }
}
