//! Scenario 4: Fan-out.
//!
//! N restores of one snapshot at once from one server, each in its own client
//! process, for N in [`CLIENT_COUNTS`]. The server is a separate process too
//! (`faultline-bench fanout-server`, a fresh one per run) so that its memory
//! and CPU can be read from `/proc`:
//! - peak RSS: `VmHWM` at the end, and the peak of `RssAnon` sampled every
//!   [`SAMPLE_INTERVAL`] (`VmHWM` also counts the snapshot's file pages the
//!   server has mapped, which the page cache holds anyway);
//! - CPU: `utime + stime` of `/proc/PID/stat` before the clients start and
//!   after the last one exits.
//!
//! Each client (`faultline-bench fanout-client`) restores the snapshot into
//! fresh anonymous memory with a full prefetch and no touching, and prints one
//! [`ClientLine`] of JSON. The clients' CPU comes from `getrusage` of the
//! reaped children.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use faultline_client::backing::BackingKind;
use faultline_client::pager::{DEFAULT_DEADLINE, OnFailure, PagesBySource, PrefetchPolicy};
use faultline_client::restore::{RestoreOptions, Touch};
use faultline_client::strategy::Mode;
use faultline_proto::SnapshotId;
use faultline_server::LocalStore;
use faultline_server::store::SnapshotStore;
use serde::{Deserialize, Serialize};

use super::report::{Bar, Plot, ratio};
use super::{Ctx, ImageSpec, ScenarioReport, Summary, Table, Target};

/// Client processes per run with `--quick`: all four counts fit in the
/// scenario's ~45 s budget at the quick image size (measured: 11 s including
/// the image's generation, on 2 cores with builds running next to it).
const QUICK_CLIENT_COUNTS: [usize; 4] = [1, 4, 16, 64];

/// Client processes per run in a full run: the fan-outs.
const CLIENT_COUNTS: [usize; 4] = [1, 4, 16, 64];

/// Image size with `--quick`: 64 restores of it stay well inside the quick
/// suite's time budget.
const QUICK_IMAGE_BYTES: u64 = 64 << 20;

/// Image size in a full run: 64 clients' copies (8 GiB) fit in the 24 GiB
/// machines the suite is written for, next to the page cache and the rest.
const FULL_IMAGE_BYTES: u64 = 128 << 20;

/// How often the server's `/proc/PID/status` is sampled for `RssAnon`: often
/// enough to catch the buffers of a burst of streams (a 64-client run lasts
/// seconds), rarely enough to cost the 2 cores nothing measurable.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// How often the parent checks whether clients have exited: the precision
/// of the wall time (runs last 0.1 s to tens of seconds).
pub(super) const REAP_INTERVAL: Duration = Duration::from_millis(2);

/// Longest wait for the server process to print its URL.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest a run of N clients may take before the stragglers are killed and
/// the scenario fails: about 10x the slowest run measured (64 × 128 MiB).
const RUN_TIMEOUT: Duration = Duration::from_secs(150);

/// Longest wait for the server to stop after its stdin closes (its streams
/// have all ended by then; it only has to close its listener).
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The peak RSS target's allowance over the snapshot's size: the server maps
/// the snapshot (file pages, counted by `VmHWM`) and may buffer a few batches
/// per stream on top.
const RSS_HEADROOM_BYTES: u64 = 256 << 20;

/// What a `fanout-client` prints: one line of JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientLine {
    /// Seconds from the start of the restore (connect, manifest) to its
    /// completion, inside the client process.
    pub elapsed_s: f64,
    /// Seconds from the pager's start to completion.
    pub completed_s: f64,
    /// Page bytes received from the server.
    pub bytes_received: u64,
    /// Pages in the region.
    pub pages_total: u64,
    /// Pages by how they arrived.
    pub pages: PagesBySource,
}

/// Arguments of the hidden `fanout-server` subcommand.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Store directory to serve.
    #[arg(long)]
    pub store: PathBuf,
}

/// Arguments of the hidden `fanout-client` subcommand.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// Server URL.
    #[arg(long)]
    pub server: String,
    /// Snapshot to restore.
    #[arg(long)]
    pub snapshot: String,
}

/// `faultline-bench fanout-server`: serves `args.store` on 127.0.0.1 (any
/// free port), prints the URL as one line on stdout, and serves until stdin
/// closes; then stops gracefully.
pub fn server_main(args: &ServerArgs) -> anyhow::Result<()> {
    let store = LocalStore::new(&args.store)
        .with_context(|| format!("opening the store {}", args.store.display()))?;
    let (runtime, handle) =
        super::spawn_server(Arc::new(store) as Arc<dyn SnapshotStore>, "fanout-server")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", handle.url())?;
        out.flush()?;
    }
    // The runtime's workers serve while this thread waits for EOF; a read
    // error means the parent is gone, which is as good as EOF.
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    runtime
        .block_on(async { tokio::time::timeout(SERVER_STOP_TIMEOUT, handle.shutdown()).await })
        .context("streams were still open when the server was asked to stop")?
        .context("the server failed")?;
    Ok(())
}

/// `faultline-bench fanout-client`: one restore into fresh anonymous memory
/// (full prefetch, nothing touched, no verification); prints a [`ClientLine`].
pub fn client_main(args: &ClientArgs) -> anyhow::Result<()> {
    let opts = RestoreOptions {
        servers: vec![args.server.clone()],
        connect: Default::default(),
        snapshot: SnapshotId::new(&args.snapshot)?,
        backing: BackingKind::Anonymous,
        mode: Mode::Auto,
        prefetch: PrefetchPolicy::All,
        touch: Touch::None,
        threads: 1,
        record: false,
        verify: false,
        on_failure: OnFailure::Wait,
        deadline: DEFAULT_DEADLINE,
        fault_transport: Default::default(),
        prefetch_transport: Default::default(),
    };
    let s = faultline_client::restore::run(&opts)
        .with_context(|| format!("restoring {} from {}", args.snapshot, args.server))?;
    let completed_s = s.completed_s.with_context(|| {
        let p = &s.pages_by_source;
        let installed = p.demand + p.readahead + p.prefetch + p.zero + p.local + p.eager;
        format!(
            "the restore did not complete ({installed} of {} pages)",
            s.pages_total
        )
    })?;
    let line = ClientLine {
        elapsed_s: s.elapsed_s,
        completed_s,
        bytes_received: s.bytes_received,
        pages_total: s.pages_total,
        pages: s.pages_by_source,
    };
    println!("{}", serde_json::to_string(&line)?);
    Ok(())
}

/// A child process killed and reaped on drop unless it was reaped already,
/// so that no error path leaks one.
pub(super) struct Reaped {
    pub(super) child: Child,
    exited: bool,
}

impl Reaped {
    pub(super) fn new(child: Child) -> Self {
        Self {
            child,
            exited: false,
        }
    }

    /// Whether it has exited (and is reaped), without blocking.
    pub(super) fn poll(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let status = self.child.try_wait()?;
        self.exited |= status.is_some();
        Ok(status)
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value in KiB of `key` (e.g. `VmHWM`) in a `/proc/PID/status` text.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k != key {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse().ok()?;
        (words.next() == Some("kB")).then_some(value)
    })
}

/// `(utime, stime)` in clock ticks from a `/proc/PID/stat` line (the command
/// name, in parentheses, may hold spaces and parentheses itself).
fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime = fields.next()?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// `(busy, total)` clock ticks of all CPUs from `/proc/stat`'s first line:
/// busy is everything but idle and iowait.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice],
    // guest time being counted in user and nice already.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// [`machine_ticks`] of this machine now ((0, 0) if unreadable).
pub(super) fn read_machine_ticks() -> (u64, u64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_ticks(&s))
        .unwrap_or((0, 0))
}

/// Clock ticks per second, the unit of `/proc/PID/stat` times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value; no pointers involved.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// User and system CPU seconds of process `pid` so far.
fn process_cpu(pid: u32) -> anyhow::Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (u, s) = stat_ticks(&stat).with_context(|| format!("parsing {path}: {stat:?}"))?;
    let hz = clock_ticks();
    Ok((u as f64 / hz, s as f64 / hz))
}

/// User + system CPU seconds of this process's reaped children so far.
pub(super) fn children_cpu() -> f64 {
    // SAFETY: all-zero bytes are a valid `rusage` (integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` for the call's duration.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Samples `/proc/PID/status` every [`SAMPLE_INTERVAL`] until stopped;
/// returns the peak `RssAnon` (KiB) and the number of samples.
fn sample_rss_anon(pid: u32, stop: &AtomicBool) -> (u64, usize) {
    let path = format!("/proc/{pid}/status");
    let limit = Instant::now() + SERVER_START_TIMEOUT + RUN_TIMEOUT + SERVER_STOP_TIMEOUT;
    let (mut peak, mut samples) = (0, 0);
    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
        if let Some(kib) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| status_kib(&s, "RssAnon"))
        {
            peak = peak.max(kib);
            samples += 1;
        }
        std::thread::sleep(SAMPLE_INTERVAL);
    }
    (peak, samples)
}

/// What one client process reported, and how long the parent saw it run.
#[derive(Clone, Debug, Serialize)]
struct ClientRun {
    /// Spawn to exit, as the parent saw it (includes exec and start-up).
    process_s: f64,
    #[serde(flatten)]
    line: ClientLine,
}

/// The server process over one run.
#[derive(Clone, Debug, Serialize)]
struct ServerRun {
    /// `VmHWM` after the last client exited, KiB.
    vm_hwm_kib: u64,
    /// Peak of the sampled `RssAnon`, KiB.
    peak_rss_anon_kib: u64,
    /// `RssAnon` samples taken.
    samples: usize,
    /// User CPU seconds while the clients ran.
    cpu_user_s: f64,
    /// System CPU seconds while the clients ran.
    cpu_sys_s: f64,
}

/// One run of N clients.
#[derive(Clone, Debug, Serialize)]
struct Run {
    clients: usize,
    repeat: usize,
    /// First spawn to last exit.
    wall_s: f64,
    /// N × image bytes / `wall_s`, GB/s.
    aggregate_gbps: f64,
    /// CPU seconds of all client processes.
    clients_cpu_s: f64,
    /// Share of the machine's CPU time that was busy during the run (any
    /// process: the clients, the server, and whatever else runs here).
    machine_busy: f64,
    server: ServerRun,
    per_client: Vec<ClientRun>,
}

impl Run {
    /// Server CPU seconds per GB of image restored.
    fn server_cpu_per_gb(&self, image_bytes: u64) -> f64 {
        let gb = (self.clients as u64 * image_bytes) as f64 / 1e9;
        (self.server.cpu_user_s + self.server.cpu_sys_s) / gb
    }
}

/// The last lines of a log file, for an error message.
pub(super) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Reads the one JSON line a finished client process printed (`what` names
/// it in the error).
pub(super) fn json_line<T: serde::de::DeserializeOwned>(
    child: &mut std::process::Child,
    what: &str,
) -> anyhow::Result<T> {
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)?;
    serde_json::from_str(out.trim()).with_context(|| format!("{what} printed {out:?}"))
}

/// Starts a server process on `store`; returns it and its URL.
fn start_server(exe: &Path, store: &Path, log: &Path) -> anyhow::Result<(Reaped, String)> {
    let stderr =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(exe)
        .arg("fanout-server")
        .arg("--store")
        .arg(store)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting the fanout-server process")?;
    let stdout = child.stdout.take().expect("piped");
    let server = Reaped::new(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let got = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(got);
    });
    let url = match rx.recv_timeout(SERVER_START_TIMEOUT) {
        Ok(Ok(line)) if line.starts_with("http://") => line.trim().to_string(),
        Ok(Ok(line)) => bail!(
            "the server process printed {line:?} instead of its URL: {}",
            tail(log)
        ),
        Ok(Err(e)) => bail!("reading the server's URL: {e}"),
        Err(_) => bail!(
            "the server process printed no URL within {SERVER_START_TIMEOUT:?}: {}",
            tail(log)
        ),
    };
    Ok((server, url))
}

/// One run: a fresh server process, `n` clients restoring `snapshot` at once.
fn fan_out(
    exe: &Path,
    store: &Path,
    scratch: &Path,
    snapshot: &str,
    image_bytes: u64,
    n: usize,
    repeat: usize,
) -> anyhow::Result<Run> {
    let (mut server, url) = start_server(exe, store, &scratch.join("server.log"))?;
    let pid = server.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || sample_rss_anon(pid, &stop))
    };
    // Stops the sampler on every path out of here.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop_guard = StopOnDrop(stop);

    let cpu0 = process_cpu(pid)?;
    let children0 = children_cpu();
    let machine0 = read_machine_ticks();
    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let log = scratch.join(format!("client-{i}.log"));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(exe)
            .args(["fanout-client", "--server", &url, "--snapshot", snapshot])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting client {i} of {n}"))?;
        clients.push((Reaped::new(child), None::<Duration>, log));
    }
    let mut running = n;
    while running > 0 {
        if started.elapsed() > RUN_TIMEOUT {
            // Dropping `clients` kills the stragglers.
            bail!("{running} of {n} clients were still running after {RUN_TIMEOUT:?}; killed them");
        }
        for (client, exited, _) in &mut clients {
            if exited.is_none() && client.poll()?.is_some() {
                *exited = Some(started.elapsed());
                running -= 1;
            }
        }
        std::thread::sleep(REAP_INTERVAL);
    }
    let clients_cpu_s = children_cpu() - children0;
    let machine1 = read_machine_ticks();
    let cpu1 = process_cpu(pid)?;
    let status_path = format!("/proc/{pid}/status");
    let vm_hwm_kib = std::fs::read_to_string(&status_path)
        .ok()
        .and_then(|s| status_kib(&s, "VmHWM"))
        .with_context(|| format!("reading VmHWM from {status_path}"))?;
    drop(stop_guard);
    let (peak_rss_anon_kib, samples) = sampler.join().expect("the sampler does not panic");

    let mut per_client = Vec::with_capacity(n);
    let mut wall = Duration::ZERO;
    for (i, (mut client, exited, log)) in clients.into_iter().enumerate() {
        let exited = exited.expect("every client exited");
        wall = wall.max(exited);
        let status = client.child.wait()?;
        ensure!(
            status.success(),
            "client {i} of {n} failed ({status}): {}",
            tail(&log)
        );
        let line: ClientLine = json_line(&mut client.child, &format!("client {i} of {n}"))?;
        per_client.push(ClientRun {
            process_s: exited.as_secs_f64(),
            line,
        });
    }

    // Closing stdin asks the server to stop.
    drop(server.child.stdin.take());
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = server.poll()? {
            break status;
        }
        if stopping.elapsed() > SERVER_STOP_TIMEOUT {
            bail!("the server did not stop within {SERVER_STOP_TIMEOUT:?} of its stdin closing");
        }
        std::thread::sleep(REAP_INTERVAL * 5);
    };
    ensure!(
        status.success(),
        "the server process failed ({status}): {}",
        tail(&scratch.join("server.log"))
    );

    let wall_s = wall.as_secs_f64();
    Ok(Run {
        clients: n,
        repeat,
        wall_s,
        aggregate_gbps: (n as u64 * image_bytes) as f64 / wall_s / 1e9,
        clients_cpu_s,
        machine_busy: (machine1.0 - machine0.0) as f64 / (machine1.1 - machine0.1).max(1) as f64,
        server: ServerRun {
            vm_hwm_kib,
            peak_rss_anon_kib,
            samples,
            cpu_user_s: cpu1.0 - cpu0.0,
            cpu_sys_s: cpu1.1 - cpu0.1,
        },
        per_client,
    })
}

/// KiB to MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let spec = ImageSpec::realistic(ctx.pick(QUICK_IMAGE_BYTES, FULL_IMAGE_BYTES));
    let snapshot = ctx.snapshot(spec)?;
    let image_bytes = spec.size;
    let counts: &[usize] = ctx.pick(&QUICK_CLIENT_COUNTS, &CLIENT_COUNTS);
    let repeats = ctx.pick(1, 3);
    let exe = std::env::current_exe().context("finding faultline-bench's own executable")?;
    let store = ctx.store_dir();
    let scratch = ctx.scratch("fanout")?;

    let bar = ctx.bar("fan-out", (counts.len() * repeats) as u64);
    let mut runs: Vec<Run> = Vec::new();
    for repeat in 0..repeats {
        // Interleaved, so that a noisy neighbour hits every N alike.
        for &n in counts {
            let run = fan_out(
                &exe,
                &store,
                &scratch,
                snapshot.id.as_str(),
                image_bytes,
                n,
                repeat,
            )
            .with_context(|| format!("{n} clients, repeat {}", repeat + 1))?;
            ctx.log(&format!(
                "  {n:>2} clients: {:.2} GB/s aggregate, {:.2} s wall, server {:.0} MiB VmHWM, \
                 {:.0} MiB anon, {:.2} CPU s; clients {:.2} CPU s; machine {:.0}% busy",
                run.aggregate_gbps,
                run.wall_s,
                mib(run.server.vm_hwm_kib),
                mib(run.server.peak_rss_anon_kib),
                run.server.cpu_user_s + run.server.cpu_sys_s,
                run.clients_cpu_s,
                100.0 * run.machine_busy,
            ));
            runs.push(run);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let mut table = Table::new(
        format!(
            "{} clients restoring one {} MiB snapshot at once from one server process \
             ({} run(s) per row)",
            counts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            image_bytes >> 20,
            repeats
        ),
        &[
            "clients",
            "aggregate GB/s",
            "per-restore s",
            "server peak RSS MiB (VmHWM)",
            "server peak RSS MiB (anon)",
            "server CPU s/GB",
            "clients CPU s/GB",
        ],
    );
    let mut agg_bars = Vec::new();
    let mut time_bars = Vec::new();
    let mut per_n = Vec::new();
    for &n in counts {
        let of_n: Vec<&Run> = runs.iter().filter(|r| r.clients == n).collect();
        let gb = (n as u64 * image_bytes) as f64 / 1e9;
        let agg = Summary::of(&of_n.iter().map(|r| r.aggregate_gbps).collect::<Vec<_>>());
        let per_restore = Summary::of(
            &of_n
                .iter()
                .flat_map(|r| r.per_client.iter().map(|c| c.line.elapsed_s))
                .collect::<Vec<_>>(),
        );
        let hwm = of_n.iter().map(|r| r.server.vm_hwm_kib).max().unwrap_or(0);
        let anon = of_n
            .iter()
            .map(|r| r.server.peak_rss_anon_kib)
            .max()
            .unwrap_or(0);
        let cpu = Summary::of(
            &of_n
                .iter()
                .map(|r| r.server_cpu_per_gb(image_bytes))
                .collect::<Vec<_>>(),
        );
        let clients_cpu = Summary::of(
            &of_n
                .iter()
                .map(|r| r.clients_cpu_s / gb)
                .collect::<Vec<_>>(),
        );
        table.row(vec![
            n.to_string(),
            agg.fmt(2),
            per_restore.fmt(2),
            format!("{:.0}", mib(hwm)),
            format!("{:.0}", mib(anon)),
            cpu.fmt(2),
            clients_cpu.fmt(2),
        ]);
        agg_bars.push(Bar {
            label: n.to_string(),
            value: agg,
        });
        time_bars.push(Bar {
            label: n.to_string(),
            value: per_restore,
        });
        per_n.push(serde_json::json!({
            "clients": n,
            "aggregate_gbps": agg,
            "per_restore_s": per_restore,
            "server_vm_hwm_mib": mib(hwm),
            "server_peak_rss_anon_mib": mib(anon),
            "server_cpu_s_per_gb": cpu,
            "clients_cpu_s_per_gb": clients_cpu,
        }));
    }

    let median_agg = |n: usize| {
        Summary::of(
            &runs
                .iter()
                .filter(|r| r.clients == n)
                .map(|r| r.aggregate_gbps)
                .collect::<Vec<_>>(),
        )
        .median
    };
    let mut targets = Vec::new();
    if counts.contains(&1) && counts.contains(&16) {
        let (one, sixteen) = (median_agg(1), median_agg(16));
        targets.push(Target {
            name: "fan-out aggregate at 16 clients vs 1 client".into(),
            goal: ">= 1x".into(),
            value: ratio(sixteen, one),
            met: sixteen >= one,
        });
    }
    let limit_mib = (image_bytes + RSS_HEADROOM_BYTES) >> 20;
    let worst_hwm = runs.iter().map(|r| r.server.vm_hwm_kib).max().unwrap_or(0);
    targets.push(Target {
        name: "server peak RSS vs snapshot + 256 MiB".into(),
        goal: format!("< {limit_mib} MiB"),
        value: format!("{:.0} MiB", mib(worst_hwm)),
        met: mib(worst_hwm) < limit_mib as f64,
    });

    let notes = notes(&runs, counts, image_bytes, &snapshot.manifest);

    Ok(ScenarioReport {
        id: "fanout".into(),
        title: "Fan-out: many restores from one server".into(),
        method: format!(
            "For each N, a fresh server process (faultline-bench fanout-server, {} \
             runtime workers) serves the store on 127.0.0.1 and N client processes are started \
             at once, each restoring the {} MiB realistic snapshot into fresh anonymous memory \
             (prefetch all, nothing touched, no verification). Aggregate GB/s = N × image bytes \
             / wall time from the first spawn to the last exit; per-restore time is each \
             client's own (connect to completion), median (min–max) over all clients of all \
             runs. Server peak RSS: VmHWM after the run (counts the mapped snapshot's file \
             pages) and the peak of RssAnon sampled every {} ms; server CPU = utime + stime \
             while the clients ran, per GB of image restored (N × image bytes). {} run(s) per N, \
             interleaved; the aggregate is their median, the RSS their maximum.",
            super::SERVER_THREADS,
            image_bytes >> 20,
            SAMPLE_INTERVAL.as_millis(),
            repeats
        ),
        skipped: None,
        tables: vec![table],
        targets,
        plots: vec![
            Plot::Bars {
                file: "fanout-aggregate.png".into(),
                title: format!(
                    "Fan-out: aggregate restore throughput ({} MiB snapshot)",
                    image_bytes >> 20
                ),
                y_label: "GB/s".into(),
                bars: agg_bars,
            },
            Plot::Bars {
                file: "fanout-per-restore.png".into(),
                title: "Fan-out: time of each restore".into(),
                y_label: "seconds".into(),
                bars: time_bars,
            },
        ],
        notes,
        data: serde_json::json!({
            "snapshot": snapshot.id.as_str(),
            "image_bytes": image_bytes,
            "clients": counts,
            "repeats": repeats,
            "server_threads": super::SERVER_THREADS,
            "sample_interval_ms": SAMPLE_INTERVAL.as_millis() as u64,
            "rss_limit_mib": limit_mib,
            "per_n": per_n,
            "runs": runs,
        }),
        duration_s: 0.0,
    })
}

/// Remarks computed from the runs: how busy the 2 cores were and who used
/// them.
fn notes(
    runs: &[Run],
    counts: &[usize],
    image_bytes: u64,
    manifest: &faultline_proto::Manifest,
) -> Vec<String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let zero = manifest.zero_map.count_ones();
    let mut notes = vec![format!(
        "The server and all N clients share this machine's {cpus} CPU(s): past a few clients \
         the restores are CPU-bound, so the aggregate measures the total CPU cost of a \
         restore (server + client + loopback TCP), not a network or the server alone, and \
         per-restore time grows about linearly with N. {:.0}% of the image's pages are zero \
         and never cross the wire.",
        100.0 * zero as f64 / manifest.page_count.max(1) as f64
    )];
    if let Some(&n) = counts.iter().max()
        && let Some(r) = runs.iter().find(|r| r.clients == n)
    {
        let server = r.server.cpu_user_s + r.server.cpu_sys_s;
        let total = server + r.clients_cpu_s;
        // The anonymous memory one more stream costs: the slope from the
        // smallest fan-out to the largest.
        let fewest = counts.iter().min().copied().unwrap_or(n);
        let base = runs
            .iter()
            .find(|r| r.clients == fewest)
            .map_or(0, |r| r.server.peak_rss_anon_kib);
        let per_stream = if n > fewest {
            mib(r.server.peak_rss_anon_kib.saturating_sub(base)) / (n - fewest) as f64
        } else {
            0.0
        };
        notes.push(format!(
            "At {n} clients (first run): the server and clients kept the cores {:.0}% busy over \
             the {:.2} s wall time ({cpus} CPU(s); the machine as a whole was {:.0}% busy, the \
             difference being other processes); the server used {:.0}% of that CPU ({:.0}% of \
             it system time: loopback TCP sends, which copy the page bytes into socket buffers \
             and deliver them to the receiver), the clients {:.0}% (UFFDIO_COPY, TCP receive, \
             decoding). The server's CPU per GB restored is {:.2} s. Its anonymous memory \
             peaked at {:.0} MiB, about {:.1} MiB more per concurrent stream, on top of the \
             snapshot's {} MiB of mapped file pages that VmHWM also counts.",
            100.0 * total / (r.wall_s * cpus as f64),
            r.wall_s,
            100.0 * r.machine_busy,
            100.0 * server / total.max(f64::MIN_POSITIVE),
            100.0 * r.server.cpu_sys_s / server.max(f64::MIN_POSITIVE),
            100.0 * r.clients_cpu_s / total.max(f64::MIN_POSITIVE),
            r.server_cpu_per_gb(image_bytes),
            mib(r.server.peak_rss_anon_kib),
            per_stream,
            image_bytes >> 20,
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status_kib` finds a key's value in KiB and ignores prefixes of other keys.
    #[test]
    fn parses_status() {
        let status = "Name:\tfaultline-bench\nVmHWM:\t  123456 kB\nVmRSS:\t 100 kB\n\
                      RssAnon:\t    4321 kB\nRssFile:\t  99 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(123_456));
        assert_eq!(status_kib(status, "RssAnon"), Some(4321));
        assert_eq!(status_kib(status, "Rss"), None);
        assert_eq!(status_kib(status, "Name"), None);
    }

    /// `machine_ticks` counts idle and iowait as not busy, and ignores guest time.
    #[test]
    fn parses_machine_stat() {
        let stat = "cpu  10 1 5 100 4 1 2 3 7 0\ncpu0 5 0 2 50 2 0 1 1 0 0\n";
        assert_eq!(machine_ticks(stat), Some((22, 126)));
        assert_eq!(machine_ticks("intr 1 2 3"), None);
    }

    /// `stat_ticks` reads utime and stime even when the command name holds spaces and ')'.
    #[test]
    fn parses_stat() {
        let stat = "4242 (fan out) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    731 42 0 0 20 0 3 0 12345 0 0";
        assert_eq!(stat_ticks(stat), Some((731, 42)));
        assert_eq!(stat_ticks("4242 (short"), None);
    }
}
