//! What the pager did, for the API, the CLI's summary and the `metrics`
//! facade (`faultline_client_*`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, histogram};

/// Pages installed, by how they arrived.
pub const PAGES: &str = "faultline_client_pages_total";
/// Faults read from the uffds (and `Pager::fault` calls).
pub const FAULTS: &str = "faultline_client_faults_total";
/// Time from reading a fault to installing its page, for faults that
/// needed the network.
pub const FAULT_LATENCY: &str = "faultline_client_fault_latency_seconds";
/// Page bytes received from the server.
pub const BYTES_RECEIVED: &str = "faultline_client_bytes_received_total";
/// Connections re-established after a failure.
pub const RECONNECTS: &str = "faultline_client_reconnects_total";
/// Pages that did not match their digest.
pub const CORRUPT_PAGES: &str = "faultline_client_corrupt_pages_total";

/// Most fault latencies kept for percentiles; later ones only update the
/// maximum. 1M samples is 4 MiB.
const MAX_LATENCY_SAMPLES: usize = 1 << 20;

/// How a page got into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The faulting page itself, fetched on demand.
    Demand,
    /// A neighbour fetched with a faulting page.
    Readahead,
    /// Streamed by the prefetcher.
    Prefetch,
    /// A zero page, resolved without the network.
    Zero,
    /// Already in the page cache; mapped without the network.
    Local,
    /// Written before the guest ran (no lazy method on this backing).
    Eager,
}

impl Source {
    /// Every source, in the order of [`Handles::pages`].
    const ALL: [Self; 6] = [
        Self::Demand,
        Self::Readahead,
        Self::Prefetch,
        Self::Zero,
        Self::Local,
        Self::Eager,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Demand => "demand",
            Self::Readahead => "readahead",
            Self::Prefetch => "prefetch",
            Self::Zero => "zero",
            Self::Local => "local",
            Self::Eager => "eager",
        }
    }
}

/// Live counters, updated by every path.
#[derive(Debug, Default)]
pub struct Counters {
    demand: AtomicU64,
    readahead: AtomicU64,
    prefetch: AtomicU64,
    zero: AtomicU64,
    local: AtomicU64,
    eager: AtomicU64,
    faults: AtomicU64,
    joined: AtomicU64,
    removed: AtomicU64,
    bytes: AtomicU64,
    reconnects: AtomicU64,
    corrupt: AtomicU64,
    poisoned: AtomicU64,
    released: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    max_latency_us: AtomicU64,
    /// The `metrics` handles, registered once on first use: looking a
    /// counter up by name and labels on every call (hashing, comparing
    /// keys) was a few percent of the demand thread's CPU per fault.
    handles: std::sync::OnceLock<Handles>,
}

/// Registered `metrics` handles of the counters.
#[derive(Debug)]
struct Handles {
    /// Per [`Source`], in `Source::ALL` order.
    pages: [metrics::Counter; 6],
    faults: metrics::Counter,
    bytes: metrics::Counter,
    latency: metrics::Histogram,
}

impl Handles {
    fn new() -> Self {
        Self {
            pages: Source::ALL.map(|s| counter!(PAGES, "source" => s.label())),
            faults: counter!(FAULTS),
            bytes: counter!(BYTES_RECEIVED),
            latency: histogram!(FAULT_LATENCY),
        }
    }
}

impl Counters {
    fn handles(&self) -> &Handles {
        self.handles.get_or_init(Handles::new)
    }

    /// `n` pages arrived from `source`.
    pub fn pages(&self, source: Source, n: u64) {
        let (c, i) = match source {
            Source::Demand => (&self.demand, 0),
            Source::Readahead => (&self.readahead, 1),
            Source::Prefetch => (&self.prefetch, 2),
            Source::Zero => (&self.zero, 3),
            Source::Local => (&self.local, 4),
            Source::Eager => (&self.eager, 5),
        };
        c.fetch_add(n, Ordering::Relaxed);
        self.handles().pages[i].increment(n);
    }

    /// A fault was read.
    pub fn fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.handles().faults.increment(1);
    }

    /// A fault found its page already being fetched.
    pub fn joined(&self) {
        self.joined.fetch_add(1, Ordering::Relaxed);
    }

    /// Pages discarded by the guest (REMOVE).
    pub fn removed(&self, n: u64) {
        self.removed.fetch_add(n, Ordering::Relaxed);
    }

    /// Page bytes received.
    pub fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.handles().bytes.increment(n);
    }

    /// A connection was re-established.
    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        counter!(RECONNECTS).increment(1);
    }

    /// A page failed its digest.
    pub fn corrupt(&self) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        counter!(CORRUPT_PAGES).increment(1);
    }

    /// Pages poisoned by the failure policy.
    pub fn poisoned(&self, n: u64) {
        self.poisoned.fetch_add(n, Ordering::Relaxed);
    }

    /// Claimed pages given back after a failed digest or install.
    pub fn released(&self, n: u64) {
        self.released.fetch_add(n, Ordering::Relaxed);
    }

    /// A demand fault took `latency` from read to install.
    pub fn latency(&self, latency: Duration) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.max_latency_us
            .fetch_max(u64::from(us), Ordering::Relaxed);
        self.handles().latency.record(latency.as_secs_f64());
        let mut v = self.latencies_us.lock().expect("latency lock");
        if v.len() < MAX_LATENCY_SAMPLES {
            v.push(us);
        }
    }

    /// A snapshot of the counters.
    pub fn snapshot(
        &self,
        pages_total: u64,
        elapsed: Duration,
        completed: Option<Duration>,
    ) -> Stats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut lat = self.latencies_us.lock().expect("latency lock").clone();
        lat.sort_unstable();
        let pct = |p: f64| -> u64 {
            if lat.is_empty() {
                0
            } else {
                u64::from(lat[((lat.len() - 1) as f64 * p).round() as usize])
            }
        };
        Stats {
            pages_total,
            pages_by_source: PagesBySource {
                demand: load(&self.demand),
                readahead: load(&self.readahead),
                prefetch: load(&self.prefetch),
                zero: load(&self.zero),
                local: load(&self.local),
                eager: load(&self.eager),
            },
            faults: load(&self.faults),
            joined_faults: load(&self.joined),
            removed_pages: load(&self.removed),
            bytes_received: load(&self.bytes),
            reconnects: load(&self.reconnects),
            corrupt_pages: load(&self.corrupt),
            poisoned_pages: load(&self.poisoned),
            released_pages: load(&self.released),
            fault_latency_us: Latency {
                count: lat.len() as u64,
                p50: pct(0.5),
                p99: pct(0.99),
                max: load(&self.max_latency_us),
            },
            elapsed_s: elapsed.as_secs_f64(),
            completed_s: completed.map(|d| d.as_secs_f64()),
        }
    }
}

/// Pages installed, by how they arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PagesBySource {
    /// Faulting pages fetched on demand.
    pub demand: u64,
    /// Neighbours fetched with a faulting page.
    pub readahead: u64,
    /// Streamed by the prefetcher.
    pub prefetch: u64,
    /// Zero pages resolved locally on a fault.
    pub zero: u64,
    /// Pages the page cache held, mapped without the network.
    pub local: u64,
    /// Written before the guest ran.
    pub eager: u64,
}

/// Fault latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Latency {
    /// Faults measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

/// What the pager has done so far.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Pages in the pager's regions.
    pub pages_total: u64,
    /// Pages installed, by how they arrived.
    pub pages_by_source: PagesBySource,
    /// Faults handled.
    pub faults: u64,
    /// Faults on pages already being fetched (no extra request).
    pub joined_faults: u64,
    /// Pages the guest discarded (REMOVE events).
    pub removed_pages: u64,
    /// Page bytes received from the server.
    pub bytes_received: u64,
    /// Reconnections after failures.
    pub reconnects: u64,
    /// Pages that failed their digest (never installed).
    pub corrupt_pages: u64,
    /// Pages poisoned by the failure policy.
    pub poisoned_pages: u64,
    /// Claimed pages given back (made missing again, their waiters woken)
    /// by the prefetcher after a failed digest or install; fetched again by
    /// whoever faults next.
    pub released_pages: u64,
    /// Latency from fault to install, for faults that needed the network.
    pub fault_latency_us: Latency,
    /// Seconds since the pager started.
    pub elapsed_s: f64,
    /// Seconds from start to completion, once complete.
    pub completed_s: Option<f64>,
}
