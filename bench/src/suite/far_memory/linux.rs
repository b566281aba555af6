//! Linux's own answer, the baseline: the same workloads in a memory cgroup limited to the same
//! budget, swapping to zram (or, where zram is not usable, a swap file).
//!
//! The parent sets up the swap device ([`Swap`]) and one cgroup per budget ([`Cgroup`]), and
//! re-executes itself as `faultline-bench far-memory-child`, which joins the cgroup first,
//! sets the limit to its own usage at that point plus the budget, then allocates, populates,
//! warms and runs exactly what the far-memory runs do, checks every page, and prints one
//! [`ChildReport`] line of JSON. cgroup v1 (`memory.limit_in_bytes`) and v2 (`memory.max`)
//! are both handled; which one is used is in the report.
//!
//! Nothing may be left behind: the guards turn swap off and remove the cgroup on drop, and
//! SIGINT/SIGTERM run the same teardown from a signal handler (async-signal-safe system calls
//! only: kill, waitpid, rmdir, swapoff, open/write/close, unlink) before exiting. The child
//! dies with its parent (`PR_SET_PDEATHSIG`).

use std::ffi::{CString, c_char};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use faultline_client::backing::GuestMemory;
use serde::{Deserialize, Serialize};

use super::workload::{PAGE, Region, WORKLOADS};

/// The zram device tried first.
const ZRAM: &str = "/sys/block/zram0";
const ZRAM_DEV: &str = "/dev/zram0";

/// zram's compressor: lz4, the fastest this kernel offers (the default lzo-rle compresses a
/// little better, and slower); the workloads' pages hardly compress anyway.
const ZRAM_ALGORITHM: &str = "lz4";

/// Swap beyond the footprint: the child's own pages that the limit pushes out too.
const SWAP_SLACK: u64 = 256 << 20;

/// Memory the child is given beyond its usage at joining plus the budget: the page tables
/// of the footprint (8 bytes per 4 KiB page, charged to the cgroup) and 4 MiB for its stack,
/// heap growth and the code it faults in later. Far memory's budget counts the footprint's
/// pages only, too; without this slack a "100%" limit is a few pages short of the footprint
/// and a sequential scan, under LRU, misses on every page.
fn limit_slack(pages: u32) -> u64 {
    u64::from(pages) * 8 + (4 << 20)
}

/// Longest a child may run (populate, warm, six workloads, check) before it is killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(600);

/// How often the parent checks whether the child has exited.
const REAP_INTERVAL: Duration = Duration::from_millis(10);

/// The memory cgroup hierarchies tried, v1 first (this machine's), then v2.
const CGROUP_V1: &str = "/sys/fs/cgroup/memory";
const CGROUP_V2: &str = "/sys/fs/cgroup";

// What the signal handler tears down: leaked C strings (never freed, so the handler can read
// them at any time), null when there is nothing to do.
static SIG_SWAPOFF: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());
static SIG_ZRAM_RESET: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());
static SIG_UNLINK: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());
static SIG_RMDIR: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());
static SIG_CHILD: AtomicI32 = AtomicI32::new(0);
static HANDLER: AtomicBool = AtomicBool::new(false);

fn leak(s: &str) -> *mut c_char {
    CString::new(s).expect("no NUL in a path").into_raw()
}

/// SIGINT/SIGTERM: undo what is set up, then exit as the signal would have.
extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: only async-signal-safe system calls on C strings leaked for the process's life
    // (or null, checked); nothing allocates or locks.
    unsafe {
        let child = SIG_CHILD.swap(0, Ordering::SeqCst);
        if child > 0 {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        let rmdir = SIG_RMDIR.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !rmdir.is_null() {
            libc::rmdir(rmdir);
        }
        let swap = SIG_SWAPOFF.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !swap.is_null() {
            libc::swapoff(swap);
        }
        let reset = SIG_ZRAM_RESET.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !reset.is_null() {
            let fd = libc::open(reset, libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, b"1".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        let unlink = SIG_UNLINK.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !unlink.is_null() {
            libc::unlink(unlink);
        }
        libc::_exit(128 + sig);
    }
}

/// Installs [`on_signal`] for SIGINT and SIGTERM (once).
fn install_handler() {
    if HANDLER.swap(true, Ordering::SeqCst) {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is an `extern "C" fn(c_int)` doing only async-signal-safe work.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// A swap device turned on for the baseline, off again on drop.
#[derive(Debug)]
pub struct Swap {
    /// What it is, for the report: "zram (lz4, 1.3 GiB)" or "swap file (...)".
    pub describe: String,
    device: PathBuf,
    zram: bool,
}

fn write_file(path: impl AsRef<Path>, value: &str) -> anyhow::Result<()> {
    let path = path.as_ref();
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

fn run_tool(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Swap {
    /// Turns on swap of at least `bytes` (+ slack): zram0 if it is free, else a swap file in
    /// `scratch`. Refuses if swap is on already (a baseline with someone else's swap in the
    /// way would measure that swap too).
    pub fn on(bytes: u64, scratch: &Path) -> anyhow::Result<Self> {
        let swaps = std::fs::read_to_string("/proc/swaps").context("reading /proc/swaps")?;
        ensure!(
            swaps.lines().count() <= 1,
            "swap is on already ({}); the baseline needs its own",
            swaps.lines().skip(1).collect::<Vec<_>>().join("; ")
        );
        install_handler();
        let size = bytes + SWAP_SLACK;
        match Self::zram(size) {
            Ok(s) => Ok(s),
            Err(zram) => Self::file(size, scratch)
                .map_err(|file| anyhow::anyhow!("zram: {zram:#}; a swap file: {file:#}")),
        }
    }

    fn zram(size: u64) -> anyhow::Result<Self> {
        let initstate = std::fs::read_to_string(format!("{ZRAM}/initstate"))
            .with_context(|| format!("{ZRAM} is not there (no zram module)"))?;
        ensure!(initstate.trim() == "0", "{ZRAM_DEV} is in use already");
        // Optional: the default compressor does too.
        let algorithm = match write_file(format!("{ZRAM}/comp_algorithm"), ZRAM_ALGORITHM) {
            Ok(()) => ZRAM_ALGORITHM.to_string(),
            Err(_) => std::fs::read_to_string(format!("{ZRAM}/comp_algorithm"))
                .unwrap_or_default()
                .split_whitespace()
                .find(|a| a.starts_with('['))
                .unwrap_or("default")
                .trim_matches(['[', ']'])
                .to_string(),
        };
        write_file(format!("{ZRAM}/disksize"), &size.to_string())?;
        SIG_ZRAM_RESET.store(leak(&format!("{ZRAM}/reset")), Ordering::SeqCst);
        let reset = || {
            SIG_ZRAM_RESET.store(std::ptr::null_mut(), Ordering::SeqCst);
            let _ = write_file(format!("{ZRAM}/reset"), "1");
        };
        if let Err(e) = run_tool("mkswap", &[ZRAM_DEV]) {
            reset();
            return Err(e);
        }
        SIG_SWAPOFF.store(leak(ZRAM_DEV), Ordering::SeqCst);
        if let Err(e) = run_tool("swapon", &[ZRAM_DEV]) {
            SIG_SWAPOFF.store(std::ptr::null_mut(), Ordering::SeqCst);
            reset();
            return Err(e);
        }
        Ok(Self {
            describe: format!("zram ({algorithm}, {} MiB)", size >> 20),
            device: ZRAM_DEV.into(),
            zram: true,
        })
    }

    fn file(size: u64, scratch: &Path) -> anyhow::Result<Self> {
        let path = scratch.join("swapfile");
        let p = path.to_str().context("a UTF-8 scratch path")?.to_string();
        SIG_UNLINK.store(leak(&p), Ordering::SeqCst);
        let made = (|| {
            // Written out, not fallocated: swapon refuses files with holes or unwritten
            // extents on some filesystems.
            let f = std::fs::File::create(&path)?;
            use std::io::Write;
            let mut w = std::io::BufWriter::new(f);
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..size.div_ceil(1 << 20) {
                w.write_all(&chunk)?;
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            anyhow::Ok(())
        })()
        .and_then(|()| run_tool("mkswap", &[&p]));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            SIG_UNLINK.store(std::ptr::null_mut(), Ordering::SeqCst);
            return Err(e);
        }
        SIG_SWAPOFF.store(leak(&p), Ordering::SeqCst);
        if let Err(e) = run_tool("swapon", &[&p]) {
            SIG_SWAPOFF.store(std::ptr::null_mut(), Ordering::SeqCst);
            let _ = std::fs::remove_file(&path);
            SIG_UNLINK.store(std::ptr::null_mut(), Ordering::SeqCst);
            return Err(e);
        }
        Ok(Self {
            describe: format!(
                "a swap file on the work directory's filesystem ({} MiB)",
                size >> 20
            ),
            device: path,
            zram: false,
        })
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let dev = self.device.to_string_lossy().to_string();
        if let Err(e) = run_tool("swapoff", &[&dev]) {
            eprintln!("  warning: swapoff {dev} failed: {e:#}; turn it off by hand");
            return;
        }
        SIG_SWAPOFF.store(std::ptr::null_mut(), Ordering::SeqCst);
        if self.zram {
            let _ = write_file(format!("{ZRAM}/reset"), "1");
            SIG_ZRAM_RESET.store(std::ptr::null_mut(), Ordering::SeqCst);
        } else {
            let _ = std::fs::remove_file(&self.device);
            SIG_UNLINK.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

/// Which cgroup interface a memory cgroup speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// `memory.limit_in_bytes`.
    V1,
    /// `memory.max`.
    V2,
}

/// A memory cgroup made for one child, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    /// Its directory.
    pub path: PathBuf,
    /// Its interface.
    pub version: CgroupVersion,
}

impl Cgroup {
    /// Makes `name` in the v1 memory hierarchy, or in v2 if that has the memory controller.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        install_handler();
        let (root, version) = if Path::new(CGROUP_V1).join("memory.limit_in_bytes").exists() {
            (PathBuf::from(CGROUP_V1), CgroupVersion::V1)
        } else {
            let controllers = std::fs::read_to_string(format!("{CGROUP_V2}/cgroup.controllers"))
                .unwrap_or_default();
            ensure!(
                controllers.split_whitespace().any(|c| c == "memory"),
                "no memory cgroup: neither {CGROUP_V1} (v1) nor a v2 hierarchy with the memory \
                 controller at {CGROUP_V2}"
            );
            let _ = write_file(format!("{CGROUP_V2}/cgroup.subtree_control"), "+memory");
            (PathBuf::from(CGROUP_V2), CgroupVersion::V2)
        };
        let path = root.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating the cgroup {} (root needed)", path.display()))?;
        SIG_RMDIR.store(leak(&path.to_string_lossy()), Ordering::SeqCst);
        Ok(Self { path, version })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The child has exited (or was killed): the cgroup is empty. Its charged pages, if
        // any, are reparented by the kernel.
        let t = Instant::now();
        while let Err(e) = std::fs::remove_dir(&self.path) {
            if t.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "  warning: cannot remove the cgroup {}: {e}; remove it by hand",
                    self.path.display()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        SIG_RMDIR.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
}

/// Arguments of the hidden `far-memory-child` subcommand.
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    /// The cgroup directory to join.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Its interface: v1 or v2.
    #[arg(long)]
    pub v2: bool,
    /// The budget, bytes, on top of the child's own memory when it joins.
    #[arg(long)]
    pub budget: u64,
    /// Pages of the footprint.
    #[arg(long)]
    pub pages: u32,
    /// Operations of each random workload.
    #[arg(long)]
    pub random_ops: usize,
    /// Longest each workload runs, milliseconds.
    #[arg(long)]
    pub limit_ms: u64,
}

/// One workload's run in the child.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildRun {
    /// Operations done.
    pub ops: usize,
    /// Seconds.
    pub seconds: f64,
    /// Major faults (swap-ins) of the child.
    pub major_faults: u64,
    /// Pages swapped out (machine-wide `pswpout`; the child is the only one swapping).
    pub swap_out_pages: u64,
    /// Pages swapped in (`pswpin`).
    pub swap_in_pages: u64,
}

/// What a child prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildReport {
    /// The limit it set, bytes.
    pub limit: u64,
    /// Its usage when it set the limit (the budget and [`limit_slack`] come on top).
    pub base_usage: u64,
    /// Populating the footprint (every page written once), seconds.
    pub populate_s: f64,
    /// The warm-up read of every page, seconds.
    pub warm_s: f64,
    /// One per workload, in [`WORKLOADS`] order.
    pub runs: Vec<ChildRun>,
    /// Checking every page, seconds.
    pub check_s: f64,
    /// The first wrong page, if any.
    pub wrong_page: Option<u32>,
    /// Peak usage the cgroup saw, bytes (v1 `max_usage_in_bytes`, v2 `memory.peak`).
    pub peak_usage: u64,
}

/// `(pswpin, pswpout)` from /proc/vmstat.
fn swap_counts() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    (get("pswpin"), get("pswpout"))
}

/// This process's major faults.
fn major_faults() -> u64 {
    // SAFETY: all-zero bytes are a valid `rusage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_majflt as u64
}

fn read_u64(path: &Path) -> anyhow::Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds {text:?}", path.display()))
}

/// `faultline-bench far-memory-child`: see the module's documentation.
pub fn child_main(args: &ChildArgs) -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let (usage_file, limit_file, peak_file) = if args.v2 {
        ("memory.current", "memory.max", "memory.peak")
    } else {
        (
            "memory.usage_in_bytes",
            "memory.limit_in_bytes",
            "memory.max_usage_in_bytes",
        )
    };
    // The operations and versions first, outside the cgroup: the budget is the footprint's.
    let all_ops: Vec<Vec<u32>> = WORKLOADS
        .iter()
        .map(|w| w.ops(args.pages, args.random_ops))
        .collect();
    let mut versions = vec![0u32; args.pages as usize];
    write_file(
        args.cgroup.join("cgroup.procs"),
        &std::process::id().to_string(),
    )?;
    let base_usage = read_u64(&args.cgroup.join(usage_file))?;
    let limit =
        (base_usage + args.budget + limit_slack(args.pages)).div_ceil(PAGE as u64) * PAGE as u64;
    write_file(args.cgroup.join(limit_file), &limit.to_string())?;

    let len = args.pages as usize * PAGE;
    let memory = GuestMemory::anonymous(len).context("allocating the footprint")?;
    // SAFETY: `memory` is `len` bytes of anonymous memory owned here, holding no Rust object,
    // used by this thread only, and alive until the end of this function.
    let region = unsafe { Region::new(memory.host_addr(), args.pages) };
    let t = Instant::now();
    region.populate();
    let populate_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    std::hint::black_box(region.scan());
    let warm_s = t.elapsed().as_secs_f64();
    let limit_each = Duration::from_millis(args.limit_ms);
    let mut runs = Vec::new();
    for ops in &all_ops {
        let (in0, out0) = swap_counts();
        let maj0 = major_faults();
        let t = Instant::now();
        let done = region.run(ops, &mut versions, limit_each);
        let seconds = t.elapsed().as_secs_f64();
        let (in1, out1) = swap_counts();
        runs.push(ChildRun {
            ops: done,
            seconds,
            major_faults: major_faults() - maj0,
            swap_out_pages: out1 - out0,
            swap_in_pages: in1 - in0,
        });
    }
    let t = Instant::now();
    let wrong_page = region.first_wrong(&versions);
    let check_s = t.elapsed().as_secs_f64();
    let report = ChildReport {
        limit,
        base_usage,
        populate_s,
        warm_s,
        runs,
        check_s,
        wrong_page,
        peak_usage: read_u64(&args.cgroup.join(peak_file)).unwrap_or(0),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Runs a child in `cgroup` with `budget` bytes and waits for its report.
pub fn run_child(
    cgroup: &Cgroup,
    budget: u64,
    pages: u32,
    random_ops: usize,
    limit: Duration,
    log: &Path,
) -> anyhow::Result<ChildReport> {
    let exe = std::env::current_exe().context("finding faultline-bench's own executable")?;
    let stderr =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("far-memory-child")
        .arg("--cgroup")
        .arg(&cgroup.path)
        .args(["--budget", &budget.to_string()])
        .args(["--pages", &pages.to_string()])
        .args(["--random-ops", &random_ops.to_string()])
        .args(["--limit-ms", &limit.as_millis().to_string()]);
    if cgroup.version == CgroupVersion::V2 {
        cmd.arg("--v2");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting the far-memory-child process")?;
    SIG_CHILD.store(child.id() as i32, Ordering::SeqCst);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            SIG_CHILD.store(0, Ordering::SeqCst);
            bail!("the child did not finish within {CHILD_TIMEOUT:?}; killed it");
        }
        std::thread::sleep(REAP_INTERVAL);
    };
    SIG_CHILD.store(0, Ordering::SeqCst);
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)?;
    let tail = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    };
    ensure!(status.success(), "the child failed ({status}): {}", tail());
    serde_json::from_str(out.trim()).with_context(|| format!("the child printed {out:?}"))
}
