//! `faultline-bench all` and its scenarios: faultline measured against the
//! baselines a user would otherwise use, in one run, on one machine.
//!
//! # Layout
//! - [`report`]: the data model of `report.json` and `BENCHMARKS.md`.
//! - [`render`]: writes the report's JSON, Markdown and PNG plots.
//! - [`floor`]: pinning to one CPU and counting context switches (latency).
//! - One module per scenario: [`latency`] (1), [`restore`] (2),
//!   [`working_set`] (3), [`fanout`] (4), [`copy_continue`] (5),
//!   [`microvm`] (6), [`compression`] (7), [`fleet`] (8: S3 and a fleet of
//!   server processes; needs Garage), [`far_memory`] (9).
//! - [`qemu`]: QEMU's postcopy migration, the restore scenario's baseline.
//! - [`unix`]: a second in-process server on a Unix socket, for the
//!   same-host transport's rows (latency, restore, working set).
//! - `sample`: deterministic page choices shared by the scenarios.
//!
//! A [`Ctx`] is shared by the scenarios: it owns the work directory, the
//! snapshot store, an in-process server on 127.0.0.1 serving it, the
//! snapshots generated so far (each made once, on first use), and the
//! progress display. Baselines are measured in the same run as faultline,
//! interleaved with it where a scenario repeats, so that a noisy neighbour
//! hits both; reports quote ratios.

pub mod compression;
pub mod copy_continue;
pub mod fanout;
pub mod far_memory;
pub mod fleet;
pub mod floor;
pub mod latency;
pub mod microvm;
pub mod qemu;
pub mod render;
pub mod report;
pub mod restore;
mod sample;
pub mod tls;
pub mod unix;
pub mod working_set;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use faultline_client::backing::{BackingKind, GuestMemory, HUGE_PAGE_SIZE};
use faultline_client::pager::{Pager, PagerConfig, PrefetchPolicy, Region, StartError, Stats};
use faultline_client::remote::Remote;
use faultline_proto::{Manifest, PageSize, SnapshotId};
use faultline_server::store::SnapshotStore;
use faultline_server::{LocalStore, ServerHandle, import::import_file};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use report::{Percentiles, Report, ScenarioReport, Summary, Table, Target};

/// Worker threads of a server's runtime (in-process, or the fan-out server
/// process): two, one per core of the machines the suite is written for.
pub const SERVER_THREADS: usize = 2;

/// The scenarios, in the order `all` runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioId {
    /// 1. Demand-fault latency vs a local UFFDIO_COPY handler, a plain fault and TCP.
    Latency,
    /// 2. Full restore throughput vs eager local copy and memcpy.
    Restore,
    /// 3. Working set: demand only vs recorded replay vs local memory.
    WorkingSet,
    /// 4. Fan-out: many client processes restoring from one server.
    Fanout,
    /// 5. COPY vs CONTINUE on shmem and hugetlbfs.
    CopyContinue,
    /// 6. The micro-VM's page walk on restored vs local memory.
    Vm,
    /// 7. Compression on the prefetch path.
    Compression,
    /// 8. Fleet: restores from S3 through 1 and 3 server processes vs a local store.
    Fleet,
    /// 9. Far memory under a local budget vs all-local memory and a cgroup swapping.
    FarMemory,
}

impl ScenarioId {
    /// Every scenario, in run order.
    pub const ALL: [ScenarioId; 9] = [
        Self::Latency,
        Self::Restore,
        Self::WorkingSet,
        Self::Fanout,
        Self::CopyContinue,
        Self::Vm,
        Self::Compression,
        Self::Fleet,
        Self::FarMemory,
    ];

    /// The id used in file names and the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Latency => "latency",
            Self::Restore => "restore",
            Self::WorkingSet => "working-set",
            Self::Fanout => "fanout",
            Self::CopyContinue => "copy-continue",
            Self::Vm => "vm",
            Self::Compression => "compression",
            Self::Fleet => "fleet",
            Self::FarMemory => "far-memory",
        }
    }

    fn run(self, ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
        match self {
            Self::Latency => latency::run(ctx),
            Self::Restore => restore::run(ctx),
            Self::WorkingSet => working_set::run(ctx),
            Self::Fanout => fanout::run(ctx),
            Self::CopyContinue => copy_continue::run(ctx),
            Self::Vm => microvm::run(ctx),
            Self::Compression => compression::run(ctx),
            Self::Fleet => fleet::run(ctx),
            Self::FarMemory => far_memory::run(ctx),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct SuiteConfig {
    /// Smaller sizes and fewer repeats: the whole suite in under 5 minutes.
    pub quick: bool,
    /// Size of the large snapshots (scenarios 2 and 3).
    pub size: u64,
    /// Output directory (created).
    pub out: PathBuf,
    /// Scenarios to run.
    pub scenarios: Vec<ScenarioId>,
    /// The command line, for the report.
    pub command: String,
}

/// Default size of the large snapshots: the 2 GiB.
pub const DEFAULT_SIZE: u64 = 2 << 30;

/// Size of the large snapshots with `--quick` (unless `--size` is given).
pub const QUICK_SIZE: u64 = 256 << 20;

/// Content of a generated image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Content {
    /// [`crate::image::write_image`]: about 40% zero pages in runs, 30% text,
    /// 30% random, like a guest's memory.
    Realistic,
    /// Every byte random: incompressible, no zero pages.
    Random,
    /// The first three quarters random, the rest zeros: the restore
    /// scenario's image (of 2 GiB: 1.5 GiB random, 0.5 GiB zero), the one
    /// QEMU's postcopy baseline migrates too.
    RandomThenZero,
}

/// A snapshot to generate (once) and serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    /// Image bytes, a multiple of `page_size`.
    pub size: u64,
    /// Content.
    pub content: Content,
    /// The snapshot's page size (2 MiB for hugetlbfs restores).
    pub page_size: PageSize,
}

impl ImageSpec {
    /// A realistic image of `size` bytes in 4 KiB pages.
    pub fn realistic(size: u64) -> Self {
        Self {
            size,
            content: Content::Realistic,
            page_size: PageSize::Size4K,
        }
    }

    /// The snapshot's name in the store.
    pub fn name(&self) -> String {
        let content = match self.content {
            Content::Realistic => "realistic",
            Content::Random => "random",
            Content::RandomThenZero => "random-zero",
        };
        format!(
            "{content}-{}m-{}k",
            self.size >> 20,
            self.page_size.bytes() >> 10
        )
    }
}

/// A generated snapshot: in the store (served) and as a raw image file (for
/// local baselines).
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Its id in the store.
    pub id: SnapshotId,
    /// The raw image (same bytes as the snapshot).
    pub image: PathBuf,
    /// What it was made from.
    pub spec: ImageSpec,
    /// Its manifest, as the server gives it.
    pub manifest: Manifest,
}

/// The server on 127.0.0.1 the scenarios restore from.
struct InProcessServer {
    runtime: tokio::runtime::Runtime,
    handle: Option<ServerHandle>,
    url: String,
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.runtime.block_on(handle.shutdown());
        }
    }
}

/// What the scenarios share; see the module docs.
pub struct Ctx {
    /// `--quick`.
    pub quick: bool,
    /// Size of the large snapshots.
    pub size: u64,
    /// Output directory (plots go here).
    pub out: PathBuf,
    work: tempfile::TempDir,
    store: Arc<LocalStore>,
    server: InProcessServer,
    snapshots: Mutex<HashMap<ImageSpec, Snapshot>>,
    progress: MultiProgress,
    interactive: bool,
    /// Only one scenario runs (its own subcommand, not `all`): far-memory runs its full size
    /// then, and a quick one inside `all`.
    pub solo: bool,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("quick", &self.quick)
            .field("size", &self.size)
            .field("work", &self.work.path())
            .field("url", &self.server.url)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// Creates the work directory (under the system's temporary directory),
    /// the store and the server.
    pub fn new(quick: bool, size: u64, out: &Path) -> anyhow::Result<Self> {
        let work = tempfile::Builder::new()
            .prefix("faultline-bench-")
            .tempdir()
            .context("creating a work directory")?;
        let store = Arc::new(LocalStore::new(work.path().join("store"))?);
        let (runtime, handle) =
            spawn_server(store.clone() as Arc<dyn SnapshotStore>, "faultline-server")?;
        let url = handle.url();
        let interactive = std::io::stderr().is_terminal();
        let progress = MultiProgress::with_draw_target(if interactive {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Ok(Self {
            quick,
            size,
            out: out.to_path_buf(),
            work,
            store,
            server: InProcessServer {
                runtime,
                handle: Some(handle),
                url,
            },
            snapshots: Mutex::new(HashMap::new()),
            progress,
            interactive,
            solo: false,
        })
    }

    /// `quick` with `--quick`, else `full`.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick { quick } else { full }
    }

    /// Repeats of a measurement: 3 with `--quick`, 5 otherwise.
    pub fn repeats(&self) -> usize {
        self.pick(3, 5)
    }

    /// URL of the in-process server.
    pub fn url(&self) -> String {
        self.server.url.clone()
    }

    /// The store's directory (another server process can serve it too).
    pub fn store_dir(&self) -> PathBuf {
        self.work.path().join("store")
    }

    /// A scratch directory for a scenario's own files.
    pub fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.work.path().join("scratch").join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The in-process server's runtime, for async client code.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.server.runtime
    }

    /// The snapshot of `spec`: generated, imported and served on first use.
    pub fn snapshot(&self, spec: ImageSpec) -> anyhow::Result<Snapshot> {
        if let Some(s) = self.lock().get(&spec) {
            return Ok(s.clone());
        }
        let name = spec.name();
        let image = self.work.path().join("images").join(&name);
        std::fs::create_dir_all(image.parent().expect("a parent"))?;
        let bar = self.bar(&format!("generating {name}"), 2);
        match spec.content {
            Content::Realistic => crate::image::write_image(&image, spec.size, 1),
            Content::Random => crate::image::write_random_image(&image, spec.size, 1),
            Content::RandomThenZero => crate::image::write_random_then_zero_image(
                &image,
                spec.size,
                spec.size / 4 * 3 / 4096 * 4096,
                1,
            ),
        }
        .with_context(|| format!("writing {}", image.display()))?;
        bar.inc(1);
        let id = SnapshotId::new(&name)?;
        import_file(
            &*self.store,
            id.clone(),
            spec.page_size,
            &[],
            &image,
            |_| {},
        )
        .with_context(|| format!("importing {name}"))?;
        bar.finish_and_clear();
        let url = self.url();
        let manifest = self
            .runtime()
            .block_on(async { Remote::connect(&url).await?.manifest(&id).await })?;
        let snapshot = Snapshot {
            id,
            image,
            spec,
            manifest,
        };
        self.lock().insert(spec, snapshot.clone());
        Ok(snapshot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ImageSpec, Snapshot>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A progress bar of `len` steps labelled `msg` (a log line when stderr is
    /// not a terminal).
    pub fn bar(&self, msg: &str, len: u64) -> ProgressBar {
        if !self.interactive {
            eprintln!("  {msg}");
        }
        let bar = self.progress.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template("  {spinner} {msg:40} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// Prints a line above the progress bars.
    pub fn log(&self, msg: &str) {
        if self.interactive {
            let _ = self.progress.println(msg);
        } else {
            eprintln!("{msg}");
        }
    }
}

/// Starts a pager on `memory`, which holds the snapshot from its first
/// byte.
pub fn start_pager(config: PagerConfig, memory: GuestMemory) -> Result<Pager, StartError> {
    Pager::start(
        config,
        vec![Region {
            memory,
            snapshot_offset: 0,
        }],
    )
}

/// A full restore that completed; its pager is still running so that its
/// memory can be checked.
#[derive(Debug)]
pub struct Restored {
    /// From `Pager::start` to completion.
    pub elapsed: Duration,
    /// The pager's statistics at completion.
    pub stats: Stats,
    /// The pager, holding the restored memory.
    pub pager: Pager,
}

/// One full restore of `snapshot` into `memory` (fresh): the pager
/// prefetches everything and nothing touches the memory. `configure`
/// adjusts the pager's settings (mode, compression).
pub fn full_restore(
    ctx: &Ctx,
    snapshot: &Snapshot,
    memory: GuestMemory,
    configure: impl FnOnce(&mut PagerConfig),
) -> anyhow::Result<Restored> {
    let mut config = PagerConfig::new(ctx.url(), snapshot.id.clone());
    config.prefetch = PrefetchPolicy::All;
    configure(&mut config);
    let started = Instant::now();
    let pager = start_pager(config, memory).context("starting the pager")?;
    let stats = pager
        .wait_complete(RESTORE_TIMEOUT)
        .with_context(|| format!("the restore did not complete in {RESTORE_TIMEOUT:?}"))?;
    Ok(Restored {
        elapsed: started.elapsed(),
        stats,
        pager,
    })
}

/// Longest a full restore may take before the suite gives up on it.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest wait for a dropped pager's huge pages to return to the pool: its
/// runtime, which holds the memory, shuts down in the background, normally
/// within milliseconds.
const HUGE_PAGE_RETURN_TIMEOUT: Duration = Duration::from_secs(10);

/// New memory of `backing`; for hugetlbfs, once the previous run's huge
/// pages are back in the pool (a dropped pager frees its memory a moment
/// later, when its runtime's tasks end).
pub fn fresh_memory(backing: BackingKind, len: usize) -> anyhow::Result<GuestMemory> {
    if backing == BackingKind::Hugetlb {
        let needed = len.div_ceil(HUGE_PAGE_SIZE);
        let t = Instant::now();
        while faultline_client::backing::available_huge_pages().unwrap_or(0) < needed
            && t.elapsed() < HUGE_PAGE_RETURN_TIMEOUT
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    GuestMemory::new(backing, len)
        .with_context(|| format!("creating {} MiB of {backing} memory", len >> 20))
}

/// Starts a server for `store` on 127.0.0.1 (a free port) on a runtime of
/// its own, with `SERVER_THREADS` workers named `thread_name`.
pub fn spawn_server(
    store: Arc<dyn SnapshotStore>,
    thread_name: &str,
) -> anyhow::Result<(tokio::runtime::Runtime, ServerHandle)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_THREADS)
        .thread_name(thread_name)
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    let handle = runtime
        .block_on(faultline_server::spawn(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            store,
        ))
        .context("starting the server on 127.0.0.1")?;
    Ok((runtime, handle))
}

/// Huge pages reserved for a scenario, given back on drop.
#[derive(Debug)]
pub struct HugePages {
    original: usize,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    /// Makes at least `count` 2 MiB pages free in the pool (as root), or says
    /// why not.
    pub fn reserve(count: usize) -> Result<Self, String> {
        let read = |path: &str| -> Option<usize> {
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        };
        let original = read(NR_HUGEPAGES).ok_or("no hugetlbfs in this kernel")?;
        let free = faultline_client::backing::available_huge_pages().unwrap_or(0);
        if free >= count {
            return Ok(Self { original });
        }
        let target = original + count - free;
        std::fs::write(NR_HUGEPAGES, target.to_string()).map_err(|e| {
            format!("cannot grow the huge page pool to {target} ({NR_HUGEPAGES}: {e}); run as root")
        })?;
        let guard = Self { original };
        let got = faultline_client::backing::available_huge_pages().unwrap_or(0);
        if got < count {
            return Err(format!(
                "the kernel found only {got} of {count} free huge pages (memory fragmented?)"
            ));
        }
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.original.to_string());
    }
}

/// Facts about this machine, for the report.
pub fn machine() -> report::Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let kernel = std::process::Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // /sys/module lists built-in modules too (/proc/modules only loadable ones).
    let kvm = std::fs::read_dir("/sys/module").ok().and_then(|dir| {
        dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|name| name.starts_with("kvm_"))
    });
    report::Machine {
        kernel,
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory,
        kvm,
    }
}

/// Runs the scenarios of `config` and writes the report; returns it.
pub fn run(config: &SuiteConfig) -> anyhow::Result<Report> {
    let started = Instant::now();
    let started_at = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let mut ctx = Ctx::new(config.quick, config.size, &config.out)?;
    ctx.solo = config.scenarios.len() == 1;
    let mut report = Report {
        command: config.command.clone(),
        quick: config.quick,
        size: config.size,
        started: started_at,
        duration_s: 0.0,
        machine: machine(),
        scenarios: Vec::new(),
    };
    let total = config.scenarios.len();
    for (i, id) in config.scenarios.iter().enumerate() {
        ctx.log(&format!("[{}/{total}] {}", i + 1, id.as_str()));
        let t = Instant::now();
        let mut scenario = match id.run(&ctx) {
            Ok(s) => s,
            // A scenario that fails is reported as such; the others still run.
            Err(e) => ScenarioReport {
                id: id.as_str().into(),
                title: id.as_str().into(),
                skipped: Some(format!("failed: {e:#}")),
                ..Default::default()
            },
        };
        scenario.duration_s = t.elapsed().as_secs_f64();
        if let Some(why) = &scenario.skipped {
            ctx.log(&format!("  {} did not run: {why}", id.as_str()));
        }
        report.scenarios.push(scenario);
        report.duration_s = started.elapsed().as_secs_f64();
        // Written after every scenario, so that an interrupted run keeps what it measured.
        render::write(&report, &config.out)?;
    }
    report.duration_s = started.elapsed().as_secs_f64();
    render::write(&report, &config.out)?;
    Ok(report)
}
