//! How a pager runs: its configuration, the policies it takes, and the regions it fills.

use std::time::Duration;

use faultline_proto::{Compression, SnapshotId, WorkingSetName};

use crate::backing::GuestMemory;
use crate::remote::ConnectOptions;
use crate::strategy::Mode;

/// Smallest read-ahead window: 16 KiB. A random fault fetches its page and
/// three neighbours; a page costs ~1 us to send on loopback against a
/// ~50 us round trip, so a few extra pages are nearly free.
pub const MIN_READAHEAD_BYTES: u64 = 16 << 10;

/// Largest read-ahead window: 1 MiB, the prefetch batch size. Sequential
/// scans reach it after six faults.
pub const MAX_READAHEAD_BYTES: u64 = 1 << 20;

/// Read-ahead bounds that fetch only the faulting page. For recording an
/// exact working set: a neighbour fetched ahead is never faulted on, so a
/// recording with read-ahead holds each fault's whole window (on a scattered
/// 10% of 2 GiB, 2.2x the pages touched: docs/BENCHMARKS.md), all of which a
/// replay then moves.
pub const NO_READAHEAD: (u64, u64) = (0, 0);

/// Prefetch streams run in parallel, each on its own connection, for the
/// bulk of a restore (after the recorded working set, which one stream
/// sends first, in order). One: on the 2-core machines measured, where the
/// server and the client share the cores, 2 and 4 streams were no faster
/// than one (docs/BENCHMARKS.md, "Bulk restore"); more streams pay where
/// there are cores to spare.
pub const PREFETCH_STREAMS: usize = 1;

/// Prefetch streams when the pages come from the server's page file (a
/// `unix://` server on this host, `super::source`): three, on two cores.
/// There the server does no work per page, so the client's streams read,
/// check and install on every core. Two streams (one per core) were
/// 1.32-1.44x one stream on every backing (docs/BENCHMARKS.md, "Same-host
/// transport"); three were another 1.2-1.4x two on every backing in
/// interleaved restore runs on a 2-core Intel host (1 GiB: anon 5.8-6.0
/// against 3.9-4.6 GB/s, hugetlbfs 6.9 against 5.3), and four no faster than
/// three. Running the streams on threads of their own instead of the
/// runtime's two workers did not help two streams, so the gain is not a
/// worker left idle; what it is was not established. The working-set replay from the page file is a little
/// faster too (0.135 against 0.144 s median of four runs of five).
pub const PAGE_FILE_STREAMS: usize = 3;

/// Page bytes per prefetch batch asked of the server: 1 MiB. Larger
/// batches (4 and 16 MiB) measured slower here, not faster: a batch is
/// copied into the decode buffer, checked and installed while the next one
/// waits, and 1 MiB of it stays in the CPU's cache for those three passes
/// (docs/BENCHMARKS.md, "Bulk restore").
pub const PREFETCH_BATCH_BYTES: u64 = 1 << 20;

/// Default time the server may be unreachable (or a page keep failing its
/// digest) before the failure policy applies.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// What to prefetch in the background.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefetchPolicy {
    /// Nothing: demand faults only.
    None,
    /// The recorded working set only.
    WorkingSet,
    /// The working set, then every other page.
    #[default]
    All,
}

impl std::str::FromStr for PrefetchPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "working-set" => Ok(Self::WorkingSet),
            "all" => Ok(Self::All),
            _ => Err(format!(
                "unknown prefetch policy {s:?}; use none, working-set or all"
            )),
        }
    }
}

/// How the prefetcher moves the bulk of a restore. The defaults are the
/// measured best on the machines described in docs/BENCHMARKS.md; the
/// benchmarks vary them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Bulk {
    /// Parallel prefetch streams (at least 1; 1 sends everything on one
    /// stream, working set first).
    pub streams: usize,
    /// Parallel prefetch streams when the pager reads the server's page
    /// file instead of a socket (at least 1), in place of `streams`.
    pub page_file_streams: usize,
    /// Page bytes per batch asked of the server (0: the server's default;
    /// the server caps it at 16 MiB).
    pub batch_bytes: u64,
    /// Install prefetched pages of shmem memory with `UFFDIO_COPY` rather
    /// than writing the fill view and `UFFDIO_CONTINUE` (one ioctl and one
    /// copy per run instead of a copy and an ioctl). A page the page cache
    /// already holds (COPY answers EEXIST) still goes the CONTINUE way, so
    /// the guest sees the same bytes either way.
    pub shmem_copy: bool,
    /// The same for hugetlbfs memory: `UFFDIO_COPY` fills a new huge page
    /// straight from the received buffer, where writing the fill view first
    /// has the kernel zero the 2 MiB page, then copies into it. On by
    /// default since the lean prefetch transport: faster in six of eight
    /// interleaved restores into hugetlbfs, 1.14x in the median
    /// (docs/BENCHMARKS.md, "Session 11"), where over gRPC the zeroing was
    /// hidden behind the stream's own copies.
    pub hugetlb_copy: bool,
    /// Verify and install each stream's batches on a thread of their own
    /// while the stream's task receives the next ones (receive and install
    /// overlap), rather than one after the other on the task. Off by
    /// default: on two cores shared with the server it measured no faster
    /// (docs/BENCHMARKS.md); it pays with a core to spare.
    pub overlap: bool,
}

impl Default for Bulk {
    fn default() -> Self {
        Self {
            streams: PREFETCH_STREAMS,
            page_file_streams: PAGE_FILE_STREAMS,
            batch_bytes: PREFETCH_BATCH_BYTES,
            shmem_copy: true,
            hugetlb_copy: true,
            overlap: false,
        }
    }
}

/// What to do when pages cannot be fetched (server unreachable past the
/// deadline, or a page that keeps failing its digest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Keep retrying, with backoff; faulting threads keep waiting. Never aborts anything.
    #[default]
    Wait,
    /// `UFFDIO_POISON` the pages: a thread touching them gets SIGBUS.
    Poison,
    /// Abort the process (in `fc-handler`: with every VM it serves). Only the server failing
    /// does this: an error on the memory's uffd never aborts (see [`super::Outcome`]).
    Abort,
}

impl std::str::FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(Self::Wait),
            "poison" => Ok(Self::Poison),
            "abort" => Ok(Self::Abort),
            _ => Err(format!(
                "unknown failure policy {s:?}; use wait, poison or abort"
            )),
        }
    }
}

/// Which transport carries a stream: the demand link's `Fault` stream
/// ([`PagerConfig::fault_transport`]) or the prefetcher's `Prefetch`
/// streams ([`PagerConfig::prefetch_transport`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamTransport {
    /// The lean transport where the server offers it, else gRPC (with a
    /// debug log). The default: the same messages and checks, without
    /// HTTP/2's cost per fault and its copies of bulk data (docs/protocol.md,
    /// "The lean fault transport", "The lean prefetch transport").
    #[default]
    Auto,
    /// The lean transport only: a server without it is a failed connection.
    Lean,
    /// gRPC over HTTP/2, as before the lean transport (for comparison, or
    /// a proxy that passes only HTTP/2).
    Grpc,
}

impl std::str::FromStr for StreamTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "lean" => Ok(Self::Lean),
            "grpc" => Ok(Self::Grpc),
            _ => Err(format!("unknown transport {s:?}; use auto, lean or grpc")),
        }
    }
}

/// How the pager runs.
#[derive(Clone, Debug)]
pub struct PagerConfig {
    /// Server URLs (`http://HOST:PORT`, `https://HOST:PORT`, or
    /// `unix:///PATH` for a server on this host, whose page file the pager
    /// then reads pages from: `source.rs`). With
    /// several (or a DNS name resolving to several addresses), the pager
    /// orders them at start ([`crate::fleet::plan`]): the snapshot's home
    /// server by rendezvous hashing, then the fail-over order, servers not
    /// SERVING last; on failures it moves to the next.
    pub servers: Vec<String>,
    /// How to connect to them: TLS, token, transport.
    pub connect: ConnectOptions,
    /// The snapshot to restore.
    pub snapshot: SnapshotId,
    /// Resolve method: from the kernel's answer, or forced.
    pub mode: Mode,
    /// Background prefetch.
    pub prefetch: PrefetchPolicy,
    /// Working set prefetched first, and recorded under, if `record`.
    pub working_set: WorkingSetName,
    /// Record the first-touch order of faults, for
    /// [`Pager::record_working_set`] (and upload it on completion). Each
    /// fault records the read-ahead window it fetched; with
    /// [`NO_READAHEAD`] the recording is exactly the pages touched.
    pub record: bool,
    /// Read-ahead window bounds, in bytes.
    pub readahead: (u64, u64),
    /// After this long without the server, or a page failing its digest
    /// past its retries, `on_failure` applies.
    pub deadline: Duration,
    /// What to do then.
    pub on_failure: OnFailure,
    /// Compression asked of the server.
    pub compression: Compression,
    /// How the prefetcher moves bulk data.
    pub bulk: Bulk,
    /// Which transport carries demand faults.
    pub fault_transport: StreamTransport,
    /// Which transport carries prefetch streams (a server on a Unix socket
    /// with a page file hands that over instead, `source.rs`).
    pub prefetch_transport: StreamTransport,
}

impl PagerConfig {
    /// Defaults for restoring `snapshot` from `server`.
    pub fn new(server: impl Into<String>, snapshot: SnapshotId) -> Self {
        Self {
            servers: vec![server.into()],
            connect: ConnectOptions::default(),
            snapshot,
            mode: Mode::Auto,
            prefetch: PrefetchPolicy::All,
            working_set: WorkingSetName::default_name(),
            record: false,
            readahead: (MIN_READAHEAD_BYTES, MAX_READAHEAD_BYTES),
            deadline: DEFAULT_DEADLINE,
            on_failure: OnFailure::Wait,
            compression: Compression::None,
            bulk: Bulk::default(),
            fault_transport: StreamTransport::Auto,
            prefetch_transport: StreamTransport::Auto,
        }
    }
}

/// Guest memory to fill, and where in the snapshot its content is.
#[derive(Debug)]
pub struct Region {
    /// The memory.
    pub memory: GuestMemory,
    /// Byte offset in the snapshot's image of the memory's first byte.
    pub snapshot_offset: u64,
}
