//! Scenario 9: Far memory.
//!
//! Six workloads ([`workload::WORKLOADS`]: sequential scan, uniform random, Zipf(0.99); each
//! read-only and with 50% writes) over a footprint of [`FULL_PAGES`] pages (1 GiB), run on
//! three systems:
//!
//! - **all-local memory**: the footprint in plain anonymous memory, the reference every
//!   slowdown is measured against;
//! - **faultline far memory** (`faultline_client::pager::far`) with 100%, 75%, 50% and 25% of
//!   the footprint as its local budget, against a volume (a copy-on-write child of a snapshot
//!   holding the footprint's initial content) on the in-process server;
//! - **Linux's own answer** ([`linux`]): the same workloads in a child process in a memory
//!   cgroup limited to the same budget, swapping to zram (or a swap file).
//!
//! Every system starts from the same state: the footprint holds its initial content (far
//! memory: on the server; the others: written locally, the cgroup's excess swapped out), then
//! one untimed read of every page warms the budget with the footprint's last pages. The six
//! workloads then run one after the other on that memory, each timed on its own, each bounded
//! in operations and time; far memory flushes (untimed, reported) after each, so that every
//! workload starts with no dirty page and pays for its own write-backs only. Afterwards every page is checked against what was written (the
//! writes are deterministic: [`workload`]), and for far memory, after a flush, a second client
//! reads the whole volume from the server and checks it too.

pub mod linux;
pub mod workload;

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use faultline_client::backing::GuestMemory;
use faultline_client::pager::far::{Budget, FarPager, FarStats, RemoteStore};
use faultline_client::remote::{ConnectOptions, Remote, decode_batch};
use faultline_proto::{Compression, PageSize, SnapshotId, pb};
use faultline_server::import::import_file;
use serde::Serialize;

use super::report::{Plot, Series, ratio};
use super::{Ctx, ScenarioReport, Summary, Table, Target};
use workload::{PAGE, Region, WORKLOADS, Workload};

/// Pages of the footprint in a full run: the 1 GiB.
pub const FULL_PAGES: u32 = 1 << 18;

/// Pages with `--quick` and inside `all`: 128 MiB.
pub const QUICK_PAGES: u32 = 1 << 15;

/// Local budgets, as fractions of the footprint: the four.
const FULL_FRACTIONS: [f64; 4] = [1.0, 0.75, 0.5, 0.25];

/// With `--quick`: three points still draw the curve.
const QUICK_FRACTIONS: [f64; 3] = [1.0, 0.5, 0.25];

/// Operations of each random workload (uniform, Zipf): enough for the hit rates to settle
/// (many times the pages a 25% budget evicts per second).
const FULL_RANDOM_OPS: usize = 100_000;
const QUICK_RANDOM_OPS: usize = 20_000;

/// Longest a workload runs on one system: the full run's 24 far-memory and 24 cgroup
/// workloads stay inside ~10 minutes on 2 cores whatever the fault costs; a workload stopped
/// early reports the operations it did (throughput is operations per second).
const FULL_LIMIT: Duration = Duration::from_secs(6);
const QUICK_LIMIT: Duration = Duration::from_millis(1500);

/// Runs of the all-local reference per workload (it takes milliseconds): their median.
const LOCAL_REPEATS: usize = 3;

/// Pages per `ReadPages` call of the second client's check (4 MiB, well under the 16 MiB a
/// batch may carry).
const CHECK_CHUNK: u64 = 1024;

/// The systems measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum System {
    Local,
    Far,
    Linux,
}

/// One workload on one system at one budget.
#[derive(Clone, Debug, Serialize)]
struct Run {
    system: System,
    workload: String,
    /// Budget / footprint.
    fraction: f64,
    /// Operations planned and done (fewer if the time limit stopped it).
    ops_planned: usize,
    ops: usize,
    seconds: f64,
    ops_per_s: f64,
    /// Pages brought in: far-memory fetches, or the child's major faults (swap-ins).
    faults: u64,
    /// Of those, pages evicted before (far memory; swap-ins are all refaults).
    refaults: u64,
    /// Pages dropped: far-memory evictions, or pages swapped out.
    evictions: u64,
    /// Pages written back: far-memory write-backs, or pages swapped out (written to swap).
    writeback_pages: u64,
    writeback_bytes: u64,
    /// First writes to clean pages (far memory's write-protect faults).
    wp_faults: u64,
    /// Far memory: the untimed flush after the workload (every page it left dirty made
    /// durable, so that the next workload starts clean): pages written and seconds.
    flush_pages: u64,
    flush_s: f64,
}

/// What one far-memory or cgroup run did around its workloads.
#[derive(Clone, Debug, Serialize)]
struct Setup {
    system: System,
    fraction: f64,
    budget_pages: u64,
    warm_s: f64,
    check_s: f64,
    /// Far memory: the flush after the check, and the second client's read of the volume.
    flush_s: f64,
    server_check_s: f64,
    /// The cgroup's limit and the child's usage when it set it.
    limit: u64,
    base_usage: u64,
    peak_usage: u64,
    /// The swap device (Linux).
    swap: String,
    /// Total far-memory statistics at shutdown.
    stats: Option<FarStats>,
}

struct Plan {
    pages: u32,
    fractions: Vec<f64>,
    random_ops: usize,
    limit: Duration,
}

impl Plan {
    fn ops(&self, w: &Workload) -> Vec<u32> {
        w.ops(self.pages, self.random_ops)
    }

    fn budget_pages(&self, fraction: f64) -> u64 {
        (f64::from(self.pages) * fraction).round() as u64
    }
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    // Inside `all` the quick size keeps the suite short; `far-memory` alone runs the full one.
    let quick = ctx.quick || !ctx.solo;
    let plan = Plan {
        pages: if quick { QUICK_PAGES } else { FULL_PAGES },
        fractions: if quick {
            QUICK_FRACTIONS.to_vec()
        } else {
            FULL_FRACTIONS.to_vec()
        },
        random_ops: if quick {
            QUICK_RANDOM_OPS
        } else {
            FULL_RANDOM_OPS
        },
        limit: if quick { QUICK_LIMIT } else { FULL_LIMIT },
    };
    let footprint = u64::from(plan.pages) * PAGE as u64;
    let scratch = ctx.scratch("far-memory")?;
    let base = base_snapshot(ctx, &plan, &scratch)?;

    let mut runs = Vec::new();
    let mut setups = Vec::new();
    ctx.log(&format!(
        "  footprint {} MiB, budgets {:?}, {} ops per random workload, {:?} limit each",
        footprint >> 20,
        plan.fractions,
        plan.random_ops,
        plan.limit
    ));
    runs.extend(run_local(&plan)?);
    for r in &runs {
        ctx.log(&format!(
            "  local {:<12} {:>10.0} ops/s",
            r.workload, r.ops_per_s
        ));
    }
    let local: Vec<f64> = runs.iter().map(|r| r.ops_per_s).collect();
    let mut linux_skipped: Option<String> = None;
    let bar = ctx.bar("far memory", (plan.fractions.len() * 2) as u64);
    for (i, &fraction) in plan.fractions.iter().enumerate() {
        let (far_runs, setup) = run_far(ctx, &plan, &base, fraction, i)
            .with_context(|| format!("far memory at {:.0}%", fraction * 100.0))?;
        log_runs(ctx, "far", fraction, &far_runs, &local);
        runs.extend(far_runs);
        setups.push(setup);
        bar.inc(1);
        if linux_skipped.is_none() {
            match run_linux(&plan, fraction, &scratch) {
                Ok((linux_runs, setup)) => {
                    log_runs(ctx, "linux", fraction, &linux_runs, &local);
                    runs.extend(linux_runs);
                    setups.push(setup);
                }
                Err(e) => {
                    ctx.log(&format!("  the Linux baseline did not run: {e:#}"));
                    linux_skipped = Some(format!("{e:#}"));
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(report(&plan, &runs, &setups, linux_skipped))
}

fn log_runs(ctx: &Ctx, system: &str, fraction: f64, runs: &[Run], local: &[f64]) {
    for (r, l) in runs.iter().zip(local) {
        ctx.log(&format!(
            "  {system:<5} {:>3.0}% {:<12} {:>10.0} ops/s  {:>8.1}x slower  {} faults, {} \
             evictions, {} pages written back{}",
            fraction * 100.0,
            r.workload,
            r.ops_per_s,
            l / r.ops_per_s.max(f64::MIN_POSITIVE),
            r.faults,
            r.evictions,
            r.writeback_pages,
            if r.ops < r.ops_planned {
                format!(" ({} of {} ops: time limit)", r.ops, r.ops_planned)
            } else {
                String::new()
            }
        ));
    }
}

/// The snapshot every volume starts from: every page at version 0.
fn base_snapshot(ctx: &Ctx, plan: &Plan, scratch: &std::path::Path) -> anyhow::Result<SnapshotId> {
    let name = format!("far-base-{}m", (u64::from(plan.pages) * PAGE as u64) >> 20);
    let image = scratch.join(&name);
    {
        use std::io::Write;
        let f = std::fs::File::create(&image)
            .with_context(|| format!("creating {}", image.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut page = vec![0u8; PAGE];
        for p in 0..plan.pages {
            workload::fill(&mut page, p, 0);
            w.write_all(&page)?;
        }
        w.flush()?;
    }
    let id = SnapshotId::new(&name)?;
    let bar = ctx.bar(&format!("importing {name}"), 1);
    import_file(
        &*ctx.store,
        id.clone(),
        PageSize::Size4K,
        &[],
        &image,
        |_| {},
    )
    .with_context(|| format!("importing {name}"))?;
    bar.finish_and_clear();
    // The store has its own copy now.
    let _ = std::fs::remove_file(&image);
    Ok(id)
}

fn run_record(
    system: System,
    w: &Workload,
    fraction: f64,
    planned: usize,
    ops: usize,
    seconds: f64,
) -> Run {
    Run {
        system,
        workload: w.name(),
        fraction,
        ops_planned: planned,
        ops,
        seconds,
        ops_per_s: ops as f64 / seconds.max(1e-9),
        faults: 0,
        refaults: 0,
        evictions: 0,
        writeback_pages: 0,
        writeback_bytes: 0,
        wp_faults: 0,
        flush_pages: 0,
        flush_s: 0.0,
    }
}

/// All-local memory: the reference.
fn run_local(plan: &Plan) -> anyhow::Result<Vec<Run>> {
    let memory = GuestMemory::anonymous(plan.pages as usize * PAGE)?;
    // SAFETY: `memory` is the footprint's anonymous memory, owned here and used by this thread
    // only while `region` is.
    let region = unsafe { Region::new(memory.host_addr(), plan.pages) };
    region.populate();
    std::hint::black_box(region.scan());
    let mut versions = vec![0u32; plan.pages as usize];
    let mut out = Vec::new();
    for w in &WORKLOADS {
        let ops = plan.ops(w);
        let mut times = Vec::new();
        let mut done = 0;
        for _ in 0..LOCAL_REPEATS {
            let t = Instant::now();
            done = region.run(&ops, &mut versions, plan.limit);
            times.push(t.elapsed().as_secs_f64());
        }
        out.push(run_record(
            System::Local,
            w,
            1.0,
            ops.len(),
            done,
            Summary::of(&times).median,
        ));
    }
    if let Some(p) = region.first_wrong(&versions) {
        bail!("all-local memory: page {p} does not hold what was written to it");
    }
    Ok(out)
}

/// Far memory at `fraction` of the footprint.
fn run_far(
    ctx: &Ctx,
    plan: &Plan,
    base: &SnapshotId,
    fraction: f64,
    index: usize,
) -> anyhow::Result<(Vec<Run>, Setup)> {
    let url = ctx.url();
    let volume = SnapshotId::new(format!("far-{index}-{:.0}", fraction * 100.0))?;
    ctx.runtime().block_on(async {
        Remote::connect(&url)
            .await?
            .client()
            .create_volume(pb::CreateVolumeRequest {
                name: volume.to_string(),
                source: Some(pb::create_volume_request::Source::FromSnapshot(
                    base.to_string(),
                )),
            })
            .await
            .context("CreateVolume")?;
        anyhow::Ok(())
    })?;
    let store = RemoteStore::open(&url, &ConnectOptions::default(), volume.clone())?;
    let budget_pages = plan.budget_pages(fraction);
    let memory = GuestMemory::anonymous(plan.pages as usize * PAGE)?;
    let far = FarPager::start(
        memory,
        Budget::Pages(budget_pages),
        std::sync::Arc::new(store),
    )?;
    // SAFETY: the far pager's region: mapped (absent pages are faulted in by the pager),
    // holding no Rust object, touched by this thread only while the pager runs.
    let region = unsafe { Region::new(far.memory().host_addr(), plan.pages) };
    let t = Instant::now();
    std::hint::black_box(region.scan());
    let warm_s = t.elapsed().as_secs_f64();
    let mut versions = vec![0u32; plan.pages as usize];
    let mut out = Vec::new();
    for w in &WORKLOADS {
        let ops = plan.ops(w);
        let before = far.stats();
        let t = Instant::now();
        let done = region.run(&ops, &mut versions, plan.limit);
        let seconds = t.elapsed().as_secs_f64();
        let after = far.stats();
        let mut r = run_record(System::Far, w, fraction, ops.len(), done, seconds);
        r.faults = after.fetches - before.fetches;
        r.refaults = after.refaults - before.refaults;
        r.evictions = after.evictions - before.evictions;
        r.writeback_pages = after.writeback_pages - before.writeback_pages;
        r.writeback_bytes = after.writeback_bytes - before.writeback_bytes;
        r.wp_faults = after.wp_faults - before.wp_faults;
        // Untimed: the next workload then starts with every page durable, and pays for its
        // own write-backs only, not for the dirty pages this one left.
        let t = Instant::now();
        far.flush().context("flushing between workloads")?;
        r.flush_s = t.elapsed().as_secs_f64();
        r.flush_pages = far.stats().writeback_pages - after.writeback_pages;
        out.push(r);
    }
    let t = Instant::now();
    let wrong = region.first_wrong(&versions);
    let check_s = t.elapsed().as_secs_f64();
    if let Some(p) = wrong {
        bail!("page {p} of the far-memory region does not hold what was written to it");
    }
    let t = Instant::now();
    let stats = far
        .shutdown()
        .context("flushing and stopping the far pager")?;
    let flush_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    ctx.runtime()
        .block_on(server_check(&url, &volume, &versions))
        .context("a second client reading the volume")?;
    let server_check_s = t.elapsed().as_secs_f64();
    Ok((
        out,
        Setup {
            system: System::Far,
            fraction,
            budget_pages,
            warm_s,
            check_s,
            flush_s,
            server_check_s,
            limit: 0,
            base_usage: 0,
            peak_usage: 0,
            swap: String::new(),
            stats: Some(stats),
        },
    ))
}

/// A second client reads every page of `volume` from the server and checks it against
/// `versions`.
async fn server_check(url: &str, volume: &SnapshotId, versions: &[u32]) -> anyhow::Result<()> {
    let remote = Remote::connect(url).await?;
    let manifest = remote.manifest(volume).await?;
    let pages = versions.len() as u64;
    ensure!(
        manifest.page_count == pages,
        "the volume holds {} pages, not {pages}",
        manifest.page_count
    );
    let mut start = 0;
    while start < pages {
        let count = CHECK_CHUNK.min(pages - start);
        let batch = remote
            .client()
            .read_pages(pb::ReadPagesRequest {
                snapshot: volume.to_string(),
                ranges: vec![pb::PageRange { start, count }],
                compression: Compression::None.into(),
            })
            .await
            .context("ReadPages")?
            .into_inner();
        let batch = decode_batch(batch, &manifest)?;
        if let Some(z) = batch.zero.first() {
            bail!(
                "the server answers page {} as zeros; every page was written non-zero",
                z.start().0
            );
        }
        let mut seen = 0;
        for run in &batch.runs {
            for (idx, bytes) in run.pages(manifest.page_size) {
                let p = idx.0 as usize;
                ensure!(
                    workload::holds(&bytes, p as u32, versions[p]),
                    "page {p} read from the server does not hold what was written to it \
                     (version {})",
                    versions[p]
                );
                seen += 1;
            }
        }
        ensure!(
            seen == count,
            "the server answered {seen} of {count} pages from {start}"
        );
        start += count;
    }
    Ok(())
}

/// The cgroup baseline at `fraction`, swap on for its duration only.
fn run_linux(
    plan: &Plan,
    fraction: f64,
    scratch: &std::path::Path,
) -> anyhow::Result<(Vec<Run>, Setup)> {
    let footprint = u64::from(plan.pages) * PAGE as u64;
    let budget_pages = plan.budget_pages(fraction);
    let swap = linux::Swap::on(footprint, scratch).context("turning swap on")?;
    let cgroup = linux::Cgroup::create(&format!(
        "faultline-bench-{}-{:.0}",
        std::process::id(),
        fraction * 100.0
    ))?;
    let child = linux::run_child(
        &cgroup,
        budget_pages * PAGE as u64,
        plan.pages,
        plan.random_ops,
        plan.limit,
        &scratch.join("child.log"),
    );
    let swap_name = swap.describe.clone();
    drop(cgroup);
    drop(swap);
    let child = child?;
    if let Some(p) = child.wrong_page {
        bail!("page {p} in the cgroup child does not hold what was written to it");
    }
    let runs = WORKLOADS
        .iter()
        .zip(&child.runs)
        .map(|(w, c)| {
            let mut r = run_record(
                System::Linux,
                w,
                fraction,
                plan.ops(w).len(),
                c.ops,
                c.seconds,
            );
            r.faults = c.major_faults;
            r.refaults = c.swap_in_pages;
            r.evictions = c.swap_out_pages;
            r.writeback_pages = c.swap_out_pages;
            r.writeback_bytes = c.swap_out_pages * PAGE as u64;
            r
        })
        .collect();
    Ok((
        runs,
        Setup {
            system: System::Linux,
            fraction,
            budget_pages,
            warm_s: child.warm_s,
            check_s: child.check_s,
            flush_s: 0.0,
            server_check_s: 0.0,
            limit: child.limit,
            base_usage: child.base_usage,
            peak_usage: child.peak_usage,
            swap: swap_name,
            stats: None,
        },
    ))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// The report: tables, the slowdown curves, notes.
fn report(
    plan: &Plan,
    runs: &[Run],
    setups: &[Setup],
    linux_skipped: Option<String>,
) -> ScenarioReport {
    let local = |w: &str| {
        runs.iter()
            .find(|r| r.system == System::Local && r.workload == w)
            .map_or(0.0, |r| r.ops_per_s)
    };
    let find = |system: System, w: &str, f: f64| {
        runs.iter()
            .find(|r| r.system == system && r.workload == w && r.fraction == f)
    };
    let slowdown = |r: &Run| local(&r.workload) / r.ops_per_s.max(f64::MIN_POSITIVE);
    let mut main = Table::new(
        "Throughput (operations/s, one 4 KiB page read or written per operation) and slowdown \
         against all-local memory",
        &[
            "workload",
            "local budget",
            "all-local ops/s",
            "far memory ops/s",
            "far slowdown",
            "Linux (cgroup + swap) ops/s",
            "Linux slowdown",
            "far time / Linux time",
        ],
    );
    let mut traffic = Table::new(
        "Paging traffic per workload: pages brought in (far: fetches, of which refaults; Linux: \
         major faults), pages evicted, pages written back (far: to the server; Linux: to swap)",
        &[
            "workload",
            "local budget",
            "ops done",
            "far faults (refaults)",
            "far evictions",
            "far write-back pages (MiB)",
            "far WP faults",
            "far flush after: pages (s)",
            "Linux faults",
            "Linux swap-outs (MiB)",
        ],
    );
    for w in WORKLOADS.iter().map(Workload::name) {
        for &f in &plan.fractions {
            let (Some(far), linux) = (find(System::Far, &w, f), find(System::Linux, &w, f)) else {
                continue;
            };
            main.row(vec![
                w.clone(),
                format!("{:.0}%", f * 100.0),
                format!("{:.0}", local(&w)),
                format!("{:.0}", far.ops_per_s),
                format!("{:.1}x", slowdown(far)),
                linux.map_or("—".into(), |l| format!("{:.0}", l.ops_per_s)),
                linux.map_or("—".into(), |l| format!("{:.1}x", slowdown(l))),
                linux.map_or("—".into(), |l| ratio(l.ops_per_s, far.ops_per_s)),
            ]);
            let ops = |r: &Run| {
                if r.ops < r.ops_planned {
                    format!("{} of {}", r.ops, r.ops_planned)
                } else {
                    r.ops.to_string()
                }
            };
            traffic.row(vec![
                w.clone(),
                format!("{:.0}%", f * 100.0),
                format!(
                    "far {}{}",
                    ops(far),
                    linux.map_or(String::new(), |l| format!("; Linux {}", ops(l)))
                ),
                format!("{} ({})", far.faults, far.refaults),
                far.evictions.to_string(),
                format!("{} ({:.0})", far.writeback_pages, mib(far.writeback_bytes)),
                far.wp_faults.to_string(),
                format!("{} ({:.2})", far.flush_pages, far.flush_s),
                linux.map_or("—".into(), |l| l.faults.to_string()),
                linux.map_or("—".into(), |l| {
                    format!("{} ({:.0})", l.evictions, mib(l.writeback_bytes))
                }),
            ]);
        }
    }
    let curves = |system: System| -> Vec<Series> {
        WORKLOADS
            .iter()
            .map(Workload::name)
            .map(|w| Series {
                label: w.clone(),
                points: plan
                    .fractions
                    .iter()
                    .filter_map(|&f| find(system, &w, f).map(|r| (f, slowdown(r))))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let mut plots = vec![Plot::Lines {
        file: "far-memory-slowdown.png".into(),
        title: "faultline far memory: slowdown vs local memory".into(),
        x_label: "local memory / footprint".into(),
        y_label: "slowdown vs all-local (x, log scale)".into(),
        log_y: true,
        series: curves(System::Far),
    }];
    let linux_curves = curves(System::Linux);
    if !linux_curves.is_empty() {
        plots.push(Plot::Lines {
            file: "far-memory-linux-slowdown.png".into(),
            title: "Linux cgroup + swap: slowdown vs local memory".into(),
            x_label: "local memory / footprint".into(),
            y_label: "slowdown vs all-local (x, log scale)".into(),
            log_y: true,
            series: linux_curves,
        });
    }
    let mut setup_table = Table::new(
        "Around the workloads: the warm-up read of every page, the check of every page, and \
         (far memory) the flush and the second client's read of the whole volume, seconds",
        &[
            "system",
            "local budget",
            "budget pages",
            "warm-up s",
            "check s",
            "flush s",
            "second client s",
            "limit / peak MiB",
        ],
    );
    for s in setups {
        setup_table.row(vec![
            match s.system {
                System::Far => "far memory".into(),
                _ => "Linux".into(),
            },
            format!("{:.0}%", s.fraction * 100.0),
            s.budget_pages.to_string(),
            format!("{:.2}", s.warm_s),
            format!("{:.2}", s.check_s),
            if s.system == System::Far {
                format!("{:.2}", s.flush_s)
            } else {
                "—".into()
            },
            if s.system == System::Far {
                format!("{:.2}", s.server_check_s)
            } else {
                "—".into()
            },
            if s.system == System::Linux {
                format!("{:.0} / {:.0}", mib(s.limit), mib(s.peak_usage))
            } else {
                "—".into()
            },
        ]);
    }
    let far_runs = setups.iter().filter(|s| s.system == System::Far).count();
    let linux_runs = setups.iter().filter(|s| s.system == System::Linux).count();
    let targets = vec![Target {
        name: "every page checked after each run (in memory; far memory also from a second \
               client of the server)"
            .into(),
        goal: "all runs".into(),
        value: format!("{far_runs} far, {linux_runs} Linux: all pages right"),
        met: far_runs == plan.fractions.len(),
    }];
    let mut notes = vec![format!(
        "Footprint {} MiB ({} pages). Random workloads: {} operations each; the sequential ones \
         one pass. Each workload stops after {:?} on one system and reports the operations it \
         did; rows saying \"N of M\" hit that limit.",
        mib(u64::from(plan.pages) * PAGE as u64),
        plan.pages,
        plan.random_ops,
        plan.limit
    )];
    match &linux_skipped {
        Some(why) => notes.push(format!("The Linux baseline did not run: {why}.")),
        None => {
            if let Some(s) = setups.iter().find(|s| s.system == System::Linux) {
                notes.push(format!(
                    "Linux baseline: a child process in a memory cgroup whose limit is its own \
                     usage when it joined ({:.0} MiB: its operations and page versions are \
                     made before it joins) plus the budget and the footprint's page tables, \
                     swapping to {}.",
                    mib(s.base_usage),
                    s.swap,
                ));
            }
        }
    }
    ScenarioReport {
        id: "far-memory".into(),
        title: "Far memory: slowdown against local memory under a budget".into(),
        method: format!(
            "Six workloads (sequential scan, uniform random, Zipf({}); read-only and 50% writes; \
             an operation reads or writes one whole 4 KiB page) over a {} MiB footprint, on \
             all-local anonymous memory (the reference, median of {LOCAL_REPEATS}), on \
             faultline far memory with {} of the footprint as its local budget (a volume on the \
             in-process server, copy-on-write child of a snapshot of the initial content), and \
             on Linux's own answer: the same workloads in a child process in a memory cgroup \
             limited to the same budget, swapping. Each system first holds the initial content \
             and reads every page once (untimed), then runs the six workloads in turn on the \
             same memory (far memory flushes, untimed, after each, so that every workload \
             starts with no dirty page and pays for its own write-backs only); afterwards every page is checked against the writes, and far \
             memory's volume is read back and checked by a second client after a flush.",
            workload::ZIPF_SKEW,
            (u64::from(plan.pages) * PAGE as u64) >> 20,
            plan.fractions
                .iter()
                .map(|f| format!("{:.0}%", f * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        skipped: None,
        tables: vec![main, traffic, setup_table],
        targets,
        plots,
        notes,
        data: serde_json::json!({
            "pages": plan.pages,
            "page_size": PAGE,
            "fractions": plan.fractions,
            "random_ops": plan.random_ops,
            "limit_s": plan.limit.as_secs_f64(),
            "linux_skipped": linux_skipped,
            "runs": runs,
            "setups": setups,
        }),
        duration_s: 0.0,
    }
}
