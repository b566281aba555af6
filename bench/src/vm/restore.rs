//! A whole VM restore through faultline in one process, as `faultline-bench vm` shows it:
//!
//! 1. build a micro-VM snapshot in a temporary directory (data pattern, guest program, page
//!    list), optionally after one run of its walk, and write the raw memory file and the vCPU
//!    file;
//! 2. import the memory file into a store (2 MiB pages for hugetlbfs memory, else 4 KiB) and
//!    record the walk's pages as the snapshot's working set (what the guest touched before
//!    the snapshot);
//! 3. serve the store in-process on `127.0.0.1:0`;
//! 4. create fresh guest memory of the chosen backing and start the faultline pager on it;
//! 5. run the guest from the vCPU file: its own accesses fault the pages in (the host never
//!    touches the memory), except on guest_memfd, which this kernel cannot fill lazily and the
//!    pager fills before the vCPU runs;
//! 6. compare the guest's checksum with the one the same walk gives on the original memory,
//!    and report the pager's statistics.
//!
//! Order matters: the pager is running before the vCPU runs (a vCPU waiting for a page nobody
//! fills cannot be interrupted), and it outlives the run (the VM's borrow of the memory says
//! so); dropping it afterwards unregisters the memory before unmapping it.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_client::backing::{BackingError, BackingKind, GuestMemory};
use faultline_client::pager::{
    Latency, Pager, PagerConfig, PagesBySource, PrefetchPolicy, Region, StartError, Stats,
};
use faultline_microvm::{
    DEFAULT_RUN_TIMEOUT, GuestBytes, ImageSpec, InspectError, Layout, LayoutError, PAGE_SIZE,
    RunError, RunOptions, RunResult, SnapshotError, SnapshotFiles, Walk, create_snapshot,
    expected_checksum, load_memory, load_state, run_guest,
};
use faultline_proto::{PageIndex, PageRange, PageSize, SnapshotId, WorkingSetName};
use faultline_server::import::{ImportError, import_file};
use faultline_server::store::{RecordError, SnapshotStore};
use faultline_server::{LocalStore, ServerHandle};
use serde::Serialize;
use thiserror::Error;

use super::{RamError, ram, view};

/// Name of the snapshot in the temporary store.
const SNAPSHOT_NAME: &str = "vm";

/// Longest wait for the pager to finish after the guest halted, when it prefetches.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(120);

/// Worker threads of the in-process server's runtime.
const SERVER_THREADS: usize = 2;

/// The order in which the guest visits pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WalkOrder {
    /// Consecutive data pages from the first.
    Seq,
    /// Distinct data pages in a random order (fixed by the seed).
    Random,
}

impl std::str::FromStr for WalkOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seq" | "sequential" => Ok(Self::Seq),
            "random" => Ok(Self::Random),
            _ => Err(format!("unknown walk {s:?}; use seq or random")),
        }
    }
}

impl std::fmt::Display for WalkOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Seq => "seq",
            Self::Random => "random",
        })
    }
}

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct VmRestoreConfig {
    /// Backing type of the fresh guest memory.
    pub backing: BackingKind,
    /// Slot size in bytes (a multiple of 2 MiB).
    pub size: u64,
    /// Page order of the guest's walk.
    pub walk: WalkOrder,
    /// Pages the guest visits.
    pub pages: u64,
    /// The pager's background prefetch (`None`: the vCPU's faults fetch every page).
    pub prefetch: PrefetchPolicy,
    /// Seed of the data pattern and the random walk.
    pub seed: u64,
    /// Run the walk once before taking the snapshot (the restored vCPU then resumes after its
    /// `hlt` and walks again); otherwise the snapshot holds the boot state.
    pub first_run: bool,
    /// Deadline of the restored guest's run.
    pub timeout: Duration,
    /// The baseline: copy the snapshot's memory file into the fresh memory and run the guest
    /// on it, without faultline.
    pub local: bool,
}

impl VmRestoreConfig {
    /// Defaults: a random walk of 4096 pages over `size` bytes of `backing` memory, no
    /// prefetch, a first run before the snapshot.
    pub fn new(backing: BackingKind, size: u64) -> Self {
        Self {
            backing,
            size,
            walk: WalkOrder::Random,
            pages: 4096,
            prefetch: PrefetchPolicy::None,
            seed: 1,
            first_run: true,
            timeout: DEFAULT_RUN_TIMEOUT,
            local: false,
        }
    }
}

/// A restore failed. Each message includes the inner error's (which is therefore not also
/// given as the `source`).
#[derive(Debug, Error)]
pub enum VmRestoreError {
    /// The slot size does not fit the harness.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// More pages asked for than the slot has data pages.
    #[error(
        "a walk of {pages} pages does not fit: a {size}-byte slot has {data} data pages; use \
         --pages {data} or less, or a larger --size"
    )]
    TooManyPages {
        /// Pages asked for.
        pages: u64,
        /// Slot size.
        size: u64,
        /// Data pages available.
        data: u64,
    },
    /// The temporary directory, the store or the server's runtime could not be made.
    #[error("{what} failed: {error}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        error: std::io::Error,
    },
    /// Building the snapshot, or reading its files, failed.
    #[error("making the VM snapshot failed: {0}")]
    Snapshot(SnapshotError),
    /// Importing the memory file failed.
    #[error("importing the memory file failed: {0}")]
    Import(ImportError),
    /// Recording the working set failed.
    #[error("recording the walk's pages as the working set failed: {0}")]
    Record(RecordError),
    /// The fresh guest memory could not be created.
    #[error("creating {backing} guest memory failed: {error}")]
    Memory {
        /// Backing type.
        backing: BackingKind,
        /// Why (for hugetlb, how many huge pages to reserve and how).
        error: BackingError,
    },
    /// The pager did not start.
    #[error("the pager did not start: {0}")]
    Pager(StartError),
    /// The fresh memory cannot be a guest's slot.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The restored guest did not run to its checksum.
    #[error("running the restored guest failed: {0}")]
    Run(RunError),
    /// The expected checksum could not be computed from the memory file.
    #[error("computing the expected checksum from the memory file failed: {0}")]
    Expected(InspectError),
}

// Written out rather than `#[from]`: these messages already include the inner error's, and
// `#[from]` would also make it the `source`, which error reporters (anyhow's `{:#}`) print
// again.
impl From<SnapshotError> for VmRestoreError {
    fn from(e: SnapshotError) -> Self {
        Self::Snapshot(e)
    }
}

impl From<ImportError> for VmRestoreError {
    fn from(e: ImportError) -> Self {
        Self::Import(e)
    }
}

impl From<RecordError> for VmRestoreError {
    fn from(e: RecordError) -> Self {
        Self::Record(e)
    }
}

impl From<StartError> for VmRestoreError {
    fn from(e: StartError) -> Self {
        Self::Pager(e)
    }
}

impl From<RunError> for VmRestoreError {
    fn from(e: RunError) -> Self {
        Self::Run(e)
    }
}

impl From<InspectError> for VmRestoreError {
    fn from(e: InspectError) -> Self {
        Self::Expected(e)
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmRestoreError {
    move |error| VmRestoreError::Io { what, error }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmRestoreReport {
    /// Backing type of the restored memory.
    pub backing: BackingKind,
    /// The pager's method for it: `copy`, `continue` or `eager`.
    pub strategy: &'static str,
    /// The pager's decision, with the kernel's reason.
    pub decision: String,
    /// Slot size in bytes.
    pub size: u64,
    /// Snapshot page size in bytes.
    pub snapshot_page_size: u64,
    /// The walk's order.
    pub walk: WalkOrder,
    /// Pages the guest visited.
    pub pages_walked: u64,
    /// Whether the snapshot was taken after a first run.
    pub first_run: bool,
    /// Prefetch policy.
    pub prefetch: PrefetchPolicy,
    /// The restored guest's checksum.
    #[serde(serialize_with = "hex")]
    pub checksum: u64,
    /// The checksum of the same walk on the original memory (the memory file).
    #[serde(serialize_with = "hex")]
    pub expected: u64,
    /// Whether they agree.
    #[serde(rename = "match")]
    pub matches: bool,
    /// Wall time of the restored guest's run, from its first `KVM_RUN` to its `hlt`.
    pub elapsed_s: f64,
    /// Time `Pager::start` took (connecting, the manifest, registering; for guest_memfd,
    /// filling the whole memory).
    pub pager_start_s: f64,
    /// Exits of the vCPU to the VMM during the run.
    pub vcpu_exits: u64,
    /// Pages in the pager's region.
    pub pages_total: u64,
    /// Pages installed, by how they arrived.
    pub pages_by_source: PagesBySource,
    /// Faults the pager handled.
    pub faults: u64,
    /// Faults on pages already being fetched.
    pub joined_faults: u64,
    /// Fault-to-install latency of faults that needed the network, in microseconds.
    pub fault_latency_us: Latency,
    /// Page bytes received from the server.
    pub bytes_received: u64,
    /// Seconds from the pager's start to its completion, if it completed (it does not with
    /// prefetch none unless the guest touched every page).
    pub completed_s: Option<f64>,
}

fn hex<S: serde::Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
    // A string: JSON readers that hold numbers as doubles (jq) would round a u64.
    s.serialize_str(&format!("{value:#018x}"))
}

impl std::fmt::Display for VmRestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.pages_by_source;
        writeln!(
            f,
            "restored a {} MiB micro-VM into {} memory through faultline",
            self.size >> 20,
            self.backing
        )?;
        writeln!(f, "  pager      {}", self.decision)?;
        writeln!(
            f,
            "  guest      {} walk of {} pages{}, prefetch {}: {:.3} s, {} exits",
            self.walk,
            self.pages_walked,
            if self.first_run {
                " (resumed after a first run)"
            } else {
                " (from boot)"
            },
            match self.prefetch {
                PrefetchPolicy::None => "none",
                PrefetchPolicy::WorkingSet => "working-set",
                PrefetchPolicy::All => "all",
            },
            self.elapsed_s,
            self.vcpu_exits
        )?;
        writeln!(
            f,
            "  checksum   {:#018x}, expected {:#018x}: {}",
            self.checksum,
            self.expected,
            if self.matches { "MATCH" } else { "MISMATCH" }
        )?;
        writeln!(
            f,
            "  pages      {} of {} bytes in the region; demand {}, read-ahead {}, prefetch {}, \
             zero {}, page cache {}, eager {}",
            self.pages_total,
            self.snapshot_page_size,
            s.demand,
            s.readahead,
            s.prefetch,
            s.zero,
            s.local,
            s.eager
        )?;
        let l = &self.fault_latency_us;
        writeln!(
            f,
            "  faults     {} handled ({} joined a fetch in flight); {} over the network: p50 {} \
             us, p99 {} us, max {} us",
            self.faults, self.joined_faults, l.count, l.p50, l.p99, l.max
        )?;
        write!(
            f,
            "  received   {:.1} MiB; pager started in {:.3} s",
            self.bytes_received as f64 / f64::from(1 << 20),
            self.pager_start_s
        )?;
        if let Some(c) = self.completed_s {
            write!(f, ", complete after {c:.3} s")?;
        }
        Ok(())
    }
}

/// A raw memory file read in place (the expected checksum reads one word per page).
#[derive(Debug)]
struct FileBytes {
    file: File,
    size: u64,
}

impl FileBytes {
    fn open(path: &Path) -> Result<Self, VmRestoreError> {
        let file = File::open(path).map_err(io("opening the memory file"))?;
        let size = file
            .metadata()
            .map_err(io("reading the memory file's size"))?
            .len();
        Ok(Self { file, size })
    }
}

impl GuestBytes for FileBytes {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> bool {
        gpa.checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.size)
            && self.file.read_exact_at(buf, gpa).is_ok()
    }
}

/// The in-process server: its store, its runtime, its handle.
#[derive(Debug)]
struct InProcessServer {
    runtime: Option<tokio::runtime::Runtime>,
    handle: Option<ServerHandle>,
}

impl InProcessServer {
    fn start(store: Arc<LocalStore>) -> Result<Self, VmRestoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_THREADS)
            .thread_name("faultline-server")
            .enable_all()
            .build()
            .map_err(io("starting the server's runtime"))?;
        let handle = runtime
            .block_on(faultline_server::spawn(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                store as Arc<dyn SnapshotStore>,
            ))
            .map_err(io("binding the server to 127.0.0.1"))?;
        Ok(Self {
            runtime: Some(runtime),
            handle: Some(handle),
        })
    }

    fn url(&self) -> String {
        self.handle
            .as_ref()
            .map(ServerHandle::url)
            .unwrap_or_default()
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        // Not a graceful shutdown: that would wait for the pager's Fault stream, which never
        // ends on its own. Shutting the runtime down drops every connection.
        drop(self.handle.take());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The snapshot's page size for memory of `backing`.
pub fn snapshot_page_size(backing: BackingKind) -> PageSize {
    if backing == BackingKind::Hugetlb {
        PageSize::Size2M
    } else {
        PageSize::Size4K
    }
}

/// The image: one walk (number 0) of `config.pages` data pages.
fn image_spec(config: &VmRestoreConfig) -> Result<ImageSpec, VmRestoreError> {
    let list_entries = match config.walk {
        WalkOrder::Seq => 0,
        WalkOrder::Random => config.pages,
    };
    let data = Layout::new(config.size, list_entries)?.data_pages();
    let available = data.end - data.start;
    if config.pages == 0 || config.pages > available {
        return Err(VmRestoreError::TooManyPages {
            pages: config.pages,
            size: config.size,
            data: available,
        });
    }
    let walk = match config.walk {
        WalkOrder::Seq => Walk::sequential(data.start, config.pages),
        WalkOrder::Random => Walk::random(config.seed, data, config.pages as usize),
    };
    Ok(ImageSpec::new(config.size, config.seed).walk(walk))
}

/// The pages the guest touches in a run, in first-touch order, as snapshot pages of
/// `page_size` bytes: the header (program, tables, page lists), then the walk's pages.
fn touched_pages(layout: &Layout, walk: &Walk, page_size: PageSize) -> Vec<PageRange> {
    let per = page_size.bytes() / PAGE_SIZE;
    let header = layout.data_pages().start;
    let mut seen = HashSet::new();
    let mut ranges: Vec<PageRange> = Vec::new();
    for page in (0..header).chain(walk.pages()).map(|p| p / per) {
        // Each page once, at its first position (2 MiB pages hold many walked pages).
        if !seen.insert(page) {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.start().0 + last.count() == page => {
                *last = PageRange::new(last.start(), last.count() + 1).expect("non-empty");
            }
            _ => ranges.push(PageRange::new(PageIndex(page), 1).expect("non-empty")),
        }
    }
    ranges
}

/// How the guest's memory was filled, for [`report`].
struct Outcome {
    strategy: &'static str,
    decision: String,
    pager_start: Duration,
    stats: Stats,
}

/// The report of a guest run on memory filled as `outcome` says.
fn report(
    config: &VmRestoreConfig,
    walk: &Walk,
    page_size: PageSize,
    expected: u64,
    result: &RunResult,
    outcome: Outcome,
) -> VmRestoreReport {
    let stats = outcome.stats;
    VmRestoreReport {
        backing: config.backing,
        strategy: outcome.strategy,
        decision: outcome.decision,
        size: config.size,
        snapshot_page_size: page_size.bytes(),
        walk: config.walk,
        pages_walked: walk.len(),
        first_run: config.first_run,
        prefetch: config.prefetch,
        checksum: result.checksum,
        expected,
        matches: result.checksum == expected,
        elapsed_s: result.elapsed.as_secs_f64(),
        pager_start_s: outcome.pager_start.as_secs_f64(),
        vcpu_exits: result.exits,
        pages_total: stats.pages_total,
        pages_by_source: stats.pages_by_source,
        faults: stats.faults,
        joined_faults: stats.joined_faults,
        fault_latency_us: stats.fault_latency_us,
        bytes_received: stats.bytes_received,
        completed_s: stats.completed_s,
    }
}

/// Runs the whole restore described by `config`; see the module documentation.
pub fn run(config: &VmRestoreConfig) -> Result<VmRestoreReport, VmRestoreError> {
    let spec = image_spec(config)?;
    let walk = spec.walks[0].clone();
    // The restore's memory first, so that a missing huge page pool fails before any work. Fresh
    // and untouched: only the pager and the vCPU will fill it.
    let memory = GuestMemory::new(config.backing, config.size as usize).map_err(|error| {
        VmRestoreError::Memory {
            backing: config.backing,
            error,
        }
    })?;
    let dir = tempfile::tempdir().map_err(io("creating a temporary directory"))?;

    // 1. The snapshot: memory file and vCPU file.
    let files = SnapshotFiles::next_to(dir.path().join("memory"));
    let created = create_snapshot(&spec, config.first_run.then_some(0), &files)?;
    let snapshot = load_state(&files.vcpu)?;
    let expected = expected_checksum(&FileBytes::open(&files.memory)?, &walk)?;

    let page_size = snapshot_page_size(config.backing);
    let options = RunOptions {
        walk: None,
        timeout: config.timeout,
    };
    if config.local {
        // The baseline: the memory file copied in before the vCPU runs.
        let started = Instant::now();
        load_memory(&files.memory, &view(memory.guest()))?;
        let load = started.elapsed();
        let result = run_guest(ram(&memory)?, &snapshot.vcpu, &options)?;
        let outcome = Outcome {
            strategy: "local",
            decision: "local memory: the memory file copied in before the guest ran".into(),
            pager_start: load,
            stats: Stats::default(),
        };
        return Ok(report(config, &walk, page_size, expected, &result, outcome));
    }

    // 2. Import it, with the walk's pages as its working set.
    let store = Arc::new(
        LocalStore::new(PathBuf::from(dir.path()).join("store"))
            .map_err(io("creating the snapshot store"))?,
    );
    let id = SnapshotId::new(SNAPSHOT_NAME).expect("a valid snapshot name");
    import_file(&*store, id.clone(), page_size, &[], &files.memory, |_| {})?;
    // The memory file is not needed any more: the store holds its own sparse copy.
    let _ = std::fs::remove_file(&files.memory);
    store.record_working_set_blocking(
        &id,
        &WorkingSetName::default_name(),
        &touched_pages(&created.image.layout, &walk, page_size),
    )?;

    // 3. Serve it.
    let server = InProcessServer::start(store)?;

    // 4. The pager on the fresh memory, running before the vCPU is.
    let mut pager_config = PagerConfig::new(server.url(), id);
    pager_config.prefetch = config.prefetch;
    let started = Instant::now();
    let pager = Pager::start(
        pager_config,
        vec![Region {
            memory,
            snapshot_offset: 0,
        }],
    )?;
    let pager_start = started.elapsed();

    // 5. The vCPU runs on the pager's memory (borrowed from the pager, so the pager outlives
    //    the VM) and does its own faulting.
    let result = run_guest(ram(pager.memory(0))?, &snapshot.vcpu, &options)?;

    // 6. Report. A pager prefetching everything is given time to finish, so its totals are
    //    final (with less prefetch it completes only if the guest touched every page).
    let stats = if config.prefetch == PrefetchPolicy::All {
        pager
            .wait_complete(COMPLETION_TIMEOUT)
            .unwrap_or_else(|| pager.stats())
    } else {
        pager.stats()
    };
    let decision = pager.decision(0);
    let outcome = Outcome {
        strategy: decision.strategy().as_str(),
        decision: decision.to_string(),
        pager_start,
        stats,
    };
    let report = report(config, &walk, page_size, expected, &result, outcome);
    // The pager (which unregisters, then unmaps the memory) before the server, so that its
    // network tasks stop before their connections are cut.
    drop(pager);
    drop(server);
    Ok(report)
}

#[cfg(test)]
mod tests {
    //! Restores through the real pager from an in-process server, one per backing type. Each
    //! test fails (or skips under `FAULTLINE_ALLOW_SKIP=1`) without `/dev/kvm`,
    //! userfaultfd or huge pages.

    use faultline_client::backing::HUGE_PAGE_SIZE;
    use faultline_client::testutil;

    use super::*;

    /// Slot size of the tests: 16,384 pages, 32 huge pages.
    const MEM: u64 = 64 << 20;
    /// Pages a test walk visits.
    const PAGES: u64 = 4096;

    fn config(backing: BackingKind, walk: WalkOrder, seed: u64) -> VmRestoreConfig {
        VmRestoreConfig {
            walk,
            pages: PAGES,
            seed,
            ..VmRestoreConfig::new(backing, MEM)
        }
    }

    /// KVM and userfaultfd are here, or the test is skipped.
    fn have_kvm_and_uffd() -> bool {
        testutil::require_kvm().is_some() && testutil::require_uffd().is_some()
    }

    /// Runs `config`, checks the checksum, and prints the report.
    fn restore(config: &VmRestoreConfig) -> VmRestoreReport {
        let report = run(config).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{report}");
        assert!(
            report.matches,
            "checksum {:#x}, expected {:#x}",
            report.checksum, report.expected
        );
        assert_eq!(report.pages_walked, config.pages);
        report
    }

    /// A lazy restore with prefetch none: every page came through a fault the vCPU raised.
    fn assert_faulted_by_the_vcpu(report: &VmRestoreReport) {
        let s = &report.pages_by_source;
        assert!(report.faults > 0, "{report:#?}");
        assert!(s.demand > 0, "{report:#?}");
        assert_eq!((s.prefetch, s.eager), (0, 0), "{report:#?}");
        assert!(report.fault_latency_us.count > 0, "{report:#?}");
    }

    /// A KVM guest restored into anonymous memory through the pager (UFFDIO_COPY) from an
    /// in-process server walks 4096 random pages, faulting them in itself, to the original's
    /// checksum.
    #[test]
    fn anonymous_restore_through_the_pager_matches() {
        if !have_kvm_and_uffd() {
            return;
        }
        let report = restore(&config(BackingKind::Anonymous, WalkOrder::Random, 51));
        assert_eq!(report.strategy, "copy");
        assert_faulted_by_the_vcpu(&report);
    }

    /// The same into a shmem memfd (UFFDIO_CONTINUE), walking 4096 pages in order.
    #[test]
    fn shmem_restore_through_the_pager_matches() {
        if !have_kvm_and_uffd() {
            return;
        }
        let report = restore(&config(BackingKind::Shmem, WalkOrder::Seq, 52));
        assert_eq!(report.strategy, "continue");
        assert_faulted_by_the_vcpu(&report);
    }

    /// The same into hugetlbfs memory (UFFDIO_CONTINUE of whole 2 MiB pages, from a snapshot
    /// imported with 2 MiB pages), with a random walk.
    #[test]
    fn hugetlb_restore_through_the_pager_matches() {
        if !have_kvm_and_uffd() {
            return;
        }
        let Some(_pages) = testutil::reserve_huge_pages(MEM as usize / HUGE_PAGE_SIZE) else {
            return;
        };
        let report = match run(&config(BackingKind::Hugetlb, WalkOrder::Random, 53)) {
            Ok(report) => report,
            // Another test process can shrink the pool between the reservation and the mapping.
            Err(
                err @ VmRestoreError::Memory {
                    error: BackingError::HugePages { .. },
                    ..
                },
            ) => {
                testutil::skip(format!("the huge page pool shrank under this test: {err}"));
                return;
            }
            Err(err) => panic!("{err}"),
        };
        eprintln!("{report}");
        assert!(report.matches, "{report:#?}");
        assert_eq!(report.strategy, "continue");
        assert_eq!(report.snapshot_page_size, HUGE_PAGE_SIZE as u64);
        assert_eq!(report.pages_total, MEM / HUGE_PAGE_SIZE as u64);
        assert_faulted_by_the_vcpu(&report);
    }

    /// The same into guest_memfd, a memslot of the guest_memfd's own VM: this kernel reports no
    /// faults there, so the pager fills it before the vCPU runs (Eager) and no fault is served.
    #[test]
    fn guest_memfd_restore_is_filled_eagerly_and_matches() {
        if !testutil::guest_memfd_available() {
            return;
        }
        let report = match run(&config(BackingKind::GuestMemfd, WalkOrder::Random, 54)) {
            Ok(report) => report,
            Err(err @ VmRestoreError::Memory { .. }) => {
                testutil::skip(format!("no mappable guest_memfd: {err}"));
                return;
            }
            Err(err) => panic!("{err}"),
        };
        eprintln!("{report}");
        assert!(report.matches, "{report:#?}");
        assert_eq!(report.strategy, "eager");
        let s = &report.pages_by_source;
        assert!(s.eager > 0, "{report:#?}");
        assert_eq!((report.faults, s.demand), (0, 0), "{report:#?}");
        assert!(report.completed_s.is_some(), "{report:#?}");
    }

    /// With prefetch all and a snapshot taken at boot, the prefetcher streams the pages while
    /// the vCPU faults, the checksum still matches, and the pager completes.
    #[test]
    fn prefetch_all_restore_matches_and_completes() {
        if !have_kvm_and_uffd() {
            return;
        }
        let report = restore(&VmRestoreConfig {
            prefetch: PrefetchPolicy::All,
            first_run: false,
            ..config(BackingKind::Anonymous, WalkOrder::Seq, 55)
        });
        assert!(report.pages_by_source.prefetch > 0, "{report:#?}");
        assert!(report.completed_s.is_some(), "{report:#?}");
    }

    /// A walk longer than the slot's data pages is refused before anything is built, with
    /// the largest count that fits.
    #[test]
    fn too_many_pages_are_refused() {
        let err = image_spec(&VmRestoreConfig {
            pages: MEM / PAGE_SIZE,
            ..VmRestoreConfig::new(BackingKind::Anonymous, MEM)
        })
        .unwrap_err();
        assert!(matches!(err, VmRestoreError::TooManyPages { .. }), "{err}");
    }

    /// With 2 MiB snapshot pages the recorded working set names each huge page once, header
    /// first, in first-touch order.
    #[test]
    fn working_set_names_each_page_once() {
        let spec = image_spec(&config(BackingKind::Hugetlb, WalkOrder::Random, 56)).unwrap();
        let layout = spec.layout().unwrap();
        let ranges = touched_pages(&layout, &spec.walks[0], PageSize::Size2M);
        let pages: Vec<u64> = ranges
            .iter()
            .flat_map(|r| r.start().0..r.start().0 + r.count())
            .collect();
        assert_eq!(pages[0], 0);
        assert_eq!(pages.len(), HashSet::<u64>::from_iter(pages.clone()).len());
        assert!(pages.len() as u64 <= MEM / HUGE_PAGE_SIZE as u64);
    }
}
