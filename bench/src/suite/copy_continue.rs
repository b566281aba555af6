//! Scenario 5: COPY vs CONTINUE on shmem and hugetlbfs.
//!
//! For each file-backed memory kind the pager can fill two ways: copy each
//! page in with `UFFDIO_COPY` (MISSING registration), or write it through a
//! second mapping of the file and map it with `UFFDIO_CONTINUE`. Both are
//! forced in turn (`PagerConfig::mode`) and measured on fresh memory, the
//! modes interleaved over repeats: the latency of random single-page faults
//! (no prefetch, timed by the touching thread as in scenario 1), and the
//! throughput of a full restore (prefetch everything, no touching). A probe
//! then times what a new huge page costs by each way in: a copy, or the
//! kernel's clear of a page first written through the fill view.

use std::time::Instant;

use anyhow::{Context, bail};
use faultline_client::backing::{BackingKind, HUGE_PAGE_SIZE};
use faultline_client::pager::{Pager, PagerConfig, PrefetchPolicy, Stats};
use faultline_client::strategy::{Mode, Strategy};
use faultline_client::uffd::{RegisterModes, Uffd};
use faultline_proto::{Manifest, PageIndex};
use serde_json::json;

use super::latency::{timed_touches, us};
use super::report::{Bar, Plot, ratio};
use super::sample::sample_pages;
use super::{
    Content, Ctx, HugePages, ImageSpec, Percentiles, Restored, ScenarioReport, Snapshot, Summary,
    Table, fresh_memory, full_restore, start_pager,
};
use crate::vm::restore::snapshot_page_size;

/// Seed of the page sample: fixed, so every mode and run touches the same
/// pages in the same order.
const SEED: u64 = 0x5eed_0005;

/// Huge pages reserved beyond the image's own: slack for pages a previous
/// run's memory may not have given back yet.
const HUGE_PAGE_MARGIN: usize = 4;

/// Huge pages each half of the new-page probe fills ([`new_huge_page_cost`]):
/// 64 MiB, enough pages for a steady per-page time.
const PROBE_HUGE_PAGES: usize = 32;

/// The two forced modes, in the order each repeat runs them.
const MODES: [Mode; 2] = [Mode::Copy, Mode::Continue];

/// The backings compared, in order.
const BACKINGS: [BackingKind; 2] = [BackingKind::Shmem, BackingKind::Hugetlb];

/// What one mode measured on one backing, over the repeats.
#[derive(Default)]
struct ModeResult {
    /// Thread-timed touches, µs, per repeat.
    latency: Vec<Vec<f64>>,
    /// Full-restore throughput, GB/s, per repeat.
    gbps: Vec<f64>,
    /// Full-restore time, s, per repeat.
    seconds: Vec<f64>,
    /// The pager's statistics of each full restore.
    restore_stats: Vec<Stats>,
    /// The pager's statistics of each latency run.
    latency_stats: Vec<Stats>,
}

impl ModeResult {
    /// Each repeat's latency percentiles.
    fn percentiles(&self) -> Vec<Percentiles> {
        self.latency.iter().map(|s| Percentiles::of(s)).collect()
    }

    /// Median over repeats of each repeat's p50 and p99.
    fn p50_p99(&self) -> (f64, f64) {
        let p = self.percentiles();
        let med =
            |f: fn(&Percentiles) -> f64| Summary::of(&p.iter().map(f).collect::<Vec<_>>()).median;
        (med(|p| p.p50), med(|p| p.p99))
    }
}

/// Everything measured on one backing.
struct BackingResult {
    backing: BackingKind,
    snapshot: Snapshot,
    pages_sampled: usize,
    /// What `Mode::Auto` chose there, and why.
    auto: String,
    /// Per mode of [`MODES`].
    modes: Vec<ModeResult>,
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport {
        id: "copy-continue".into(),
        title: "COPY vs CONTINUE on shmem and hugetlbfs".into(),
        method: "Each resolve method forced in turn (PagerConfig::mode) on fresh shmem and \
                 hugetlbfs memory: random single-page faults with no prefetch, timed by the \
                 touching thread as in scenario 1, and a full restore with prefetch of every \
                 page and no touching (image bytes / time from Pager::start to completion). \
                 Modes interleaved over repeats; medians, with min–max. Then, on hugetlbfs, \
                 what a new 2 MiB page costs: filled by UFFDIO_COPY from a cache-hot buffer, \
                 against allocated and cleared by the kernel (MADV_POPULATE_WRITE)."
            .into(),
        ..Default::default()
    };
    if let Err(e) = Uffd::open() {
        report.skipped = Some(format!("no userfaultfd here: {e}"));
        return Ok(report);
    }
    let size = ctx.pick(128 << 20, 512 << 20);
    let mut bars = Vec::new();
    let mut series = Vec::new();
    let mut data = serde_json::Map::new();
    for backing in BACKINGS {
        let result = match measure(ctx, backing, size) {
            Ok(result) => result,
            Err(e) => {
                report.notes.push(format!("{backing}: not measured: {e:#}"));
                continue;
            }
        };
        add_results(&result, &mut report, &mut bars, &mut series, &mut data);
    }
    if data.is_empty() {
        report.skipped = Some(report.notes.join(" "));
        return Ok(report);
    }
    match new_huge_page_cost(ctx) {
        Ok((copy, clear)) => {
            let mut table = Table::new(
                format!(
                    "hugetlbfs: what a new 2 MiB page costs, µs per page ({PROBE_HUGE_PAGES} \
                     pages a repeat, median (min–max) of {})",
                    ctx.repeats()
                ),
                &["install", "µs per 2 MiB page", "vs UFFDIO_COPY"],
            );
            let c = Summary::of(&copy);
            table.row(vec![
                "UFFDIO_COPY from a cache-hot buffer".into(),
                c.fmt(1),
                "1.00x".into(),
            ]);
            let over: Vec<f64> = clear.iter().zip(&copy).map(|(a, b)| a / b).collect();
            table.row(vec![
                "allocate and clear (MADV_POPULATE_WRITE of a fresh mapping)".into(),
                Summary::of(&clear).fmt(1),
                format!("{}x", Summary::of(&over).fmt(2)),
            ]);
            report.tables.push(table);
            report.notes.push(
                "The new-page probe: receiving a huge page's bytes straight into the fill view \
                 (then CONTINUE) instead of into a buffer (then COPY) would trade the install's \
                 copy for the kernel's clearing of the new page on the fill view's first touch; \
                 it gains only as much as the clear is faster than the copy."
                    .into(),
            );
            data.insert(
                "new_huge_page_us".into(),
                json!({"copy": copy, "clear": clear}),
            );
        }
        Err(e) => report
            .notes
            .push(format!("hugetlbfs new-page probe: not measured: {e:#}")),
    }
    report.notes.push(
        "Fault latency runs use the default read-ahead: a 4 KiB fault also fetches up to 3 \
         neighbours, installed the same way (COPY, or fill view + CONTINUE); on hugetlbfs the \
         window is the one 2 MiB page."
            .into(),
    );
    report.plots.push(Plot::Bars {
        file: "copy-continue-throughput.png".into(),
        title: "Full restore throughput by resolve method".into(),
        y_label: "GB/s".into(),
        bars,
    });
    report.plots.push(Plot::Cdf {
        file: "copy-continue-cdf.png".into(),
        title: "Single-page fault latency by resolve method".into(),
        x_label: "µs".into(),
        log_x: true,
        series,
    });
    report.data = json!({
        "image_bytes": size,
        "repeats": ctx.repeats(),
        "seed": SEED,
        "backings": data,
    });
    Ok(report)
}

/// µs per 2 MiB page, per repeat, of filling [`PROBE_HUGE_PAGES`] new huge
/// pages of a hugetlbfs memfd: by `UFFDIO_COPY` from one cache-hot buffer
/// into a MISSING registration, and by allocating and clearing them
/// (`MADV_POPULATE_WRITE`), as a first write through the fill view does.
fn new_huge_page_cost(ctx: &Ctx) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let len = PROBE_HUGE_PAGES * HUGE_PAGE_SIZE;
    let _huge = HugePages::reserve(2 * PROBE_HUGE_PAGES + HUGE_PAGE_MARGIN)
        .map_err(|why| anyhow::anyhow!("cannot reserve huge pages: {why}"))?;
    let src = vec![0x5au8; HUGE_PAGE_SIZE];
    let (mut copy, mut clear) = (Vec::new(), Vec::new());
    for _ in 0..ctx.repeats() {
        let memory = fresh_memory(BackingKind::Hugetlb, len)?;
        let uffd = Uffd::open().context("opening a userfaultfd")?;
        let base = memory.host_addr();
        // SAFETY: `memory` is fresh hugetlbfs memory that no Rust object
        // lives in and nothing touches; the uffd is dropped (ending the
        // registration) before `memory`.
        unsafe { uffd.register(base, len, RegisterModes::MISSING) }
            .context("registering the memory")?;
        let started = Instant::now();
        for i in 0..PROBE_HUGE_PAGES {
            // Nobody faults on this memory: no wake.
            uffd.copy(base + i * HUGE_PAGE_SIZE, &src, true)?;
        }
        copy.push(started.elapsed().as_secs_f64() * 1e6 / PROBE_HUGE_PAGES as f64);
        drop(uffd);
        drop(memory);

        let memory = fresh_memory(BackingKind::Hugetlb, len)?;
        let started = Instant::now();
        // SAFETY: MADV_POPULATE_WRITE only faults in the pages of this
        // mapping, which `memory` owns and no Rust object lives in.
        let rc = unsafe {
            libc::madvise(
                memory.host_addr() as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            bail!(
                "MADV_POPULATE_WRITE failed: {}",
                std::io::Error::last_os_error()
            );
        }
        clear.push(started.elapsed().as_secs_f64() * 1e6 / PROBE_HUGE_PAGES as f64);
    }
    Ok((copy, clear))
}

/// Appends one backing's table, plot data, notes and data.
fn add_results(
    r: &BackingResult,
    report: &mut ScenarioReport,
    bars: &mut Vec<Bar>,
    series: &mut Vec<(String, Vec<f64>)>,
    data: &mut serde_json::Map<String, serde_json::Value>,
) {
    let page_bytes = r.snapshot.manifest.page_size.bytes();
    let cont = &r.modes[MODES.len() - 1];
    let (cont_p50, _) = cont.p50_p99();
    let cont_gbps = Summary::of(&cont.gbps).median;
    let mut table = Table::new(
        format!(
            "{}: {} random single-page faults ({} KiB pages) and full restores of {} MiB, {} \
             repeats",
            r.backing,
            r.pages_sampled,
            page_bytes >> 10,
            r.snapshot.spec.size >> 20,
            cont.gbps.len(),
        ),
        &[
            "method",
            "fault p50 µs",
            "fault p99 µs",
            "p50 vs CONTINUE",
            "full restore GB/s",
            "GB/s vs CONTINUE",
        ],
    );
    let mut modes = serde_json::Map::new();
    for (mode, m) in MODES.iter().zip(&r.modes) {
        let (p50, p99) = m.p50_p99();
        let gbps = Summary::of(&m.gbps);
        let label = format!("{} {}", r.backing, mode.to_string().to_uppercase());
        table.row(vec![
            mode.to_string().to_uppercase(),
            us(p50),
            us(p99),
            ratio(p50, cont_p50),
            gbps.fmt(2),
            ratio(gbps.median, cont_gbps),
        ]);
        bars.push(Bar {
            label: label.clone(),
            value: gbps,
        });
        series.push((label, m.latency.concat()));
        modes.insert(
            mode.to_string(),
            json!({
                "latency_p50_us": p50,
                "latency_p99_us": p99,
                "latency_repeats": m.percentiles(),
                "latency_samples_us": m.latency,
                "gbps": gbps,
                "gbps_repeats": m.gbps,
                "restore_seconds": m.seconds,
                "restore_stats": m.restore_stats,
                "latency_stats": m.latency_stats,
            }),
        );
    }
    report.tables.push(table);
    report.notes.push(format!(
        "{}: the pager's default (Mode::Auto) is {}.",
        r.backing, r.auto
    ));
    data.insert(
        r.backing.as_str().to_string(),
        json!({
            "page_bytes": page_bytes,
            "pages_sampled": r.pages_sampled,
            "auto": r.auto,
            "modes": modes,
        }),
    );
}

/// Measures both modes on `backing` (an error when it is not available
/// here, e.g. no huge pages).
fn measure(ctx: &Ctx, backing: BackingKind, size: u64) -> anyhow::Result<BackingResult> {
    let spec = ImageSpec {
        size,
        content: Content::Realistic,
        page_size: snapshot_page_size(backing),
    };
    let snapshot = ctx.snapshot(spec)?;
    // Held until the end of this function: the pool shrinks back on drop.
    let _huge = if backing == BackingKind::Hugetlb {
        let count = size as usize / HUGE_PAGE_SIZE + HUGE_PAGE_MARGIN;
        match HugePages::reserve(count) {
            Ok(guard) => Some(guard),
            Err(why) => bail!("cannot reserve {count} huge pages: {why}"),
        }
    } else {
        None
    };
    let manifest = &snapshot.manifest;
    let count = if backing == BackingKind::Hugetlb {
        ctx.pick(16, 48)
    } else {
        ctx.pick(300, 1000)
    };
    // One more than measured: the first touch of each run warms the path up.
    let sample = sample_pages(manifest.page_count, count + 1, SEED, |p| {
        !manifest.is_zero(PageIndex(p))
    });
    let auto = {
        let pager = start(ctx, &snapshot, backing, Mode::Auto, PrefetchPolicy::None)?;
        let d = pager.decision(0);
        format!("{} ({d})", d.strategy().as_str().to_uppercase())
    };
    let repeats = ctx.repeats();
    let mut modes: Vec<ModeResult> = MODES.iter().map(|_| ModeResult::default()).collect();
    let bar = ctx.bar(
        &format!("copy-continue {backing}"),
        (repeats * MODES.len()) as u64,
    );
    for _ in 0..repeats {
        for (mode, result) in MODES.into_iter().zip(&mut modes) {
            // Fault latency.
            let pager = start(ctx, &snapshot, backing, mode, PrefetchPolicy::None)?;
            check_strategy(&pager, mode)?;
            let base = pager.memory(0).host_addr();
            let page = manifest.page_size.bytes_usize();
            // SAFETY: the pages are inside the pager's region, mapped
            // read-write while `pager` lives; guest memory holds no Rust
            // object.
            let mut samples = unsafe { timed_touches(base, page, &sample, false) };
            samples.remove(0);
            result.latency_stats.push(pager.stats());
            // SAFETY: every sampled page was touched, so it is present;
            // nothing writes to the region.
            unsafe { verify(base, manifest, &sample)? };
            drop(pager);
            result.latency.push(samples);

            // Full-restore throughput.
            let memory = fresh_memory(backing, size as usize)?;
            let Restored {
                elapsed,
                stats,
                pager,
            } = full_restore(ctx, &snapshot, memory, |c| c.mode = mode)
                .with_context(|| format!("{backing} {mode}"))?;
            let seconds = elapsed.as_secs_f64();
            check_strategy(&pager, mode)?;
            // SAFETY: the restore is complete, so every page is present;
            // nothing writes to the region.
            unsafe { verify(pager.memory(0).host_addr(), manifest, &sample)? };
            drop(pager);
            result.seconds.push(seconds);
            result.gbps.push(size as f64 / seconds / 1e9);
            result.restore_stats.push(stats);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(BackingResult {
        backing,
        snapshot,
        pages_sampled: count,
        auto,
        modes,
    })
}

/// Starts a pager with `mode` and `prefetch` on fresh memory of `backing`.
fn start(
    ctx: &Ctx,
    snapshot: &Snapshot,
    backing: BackingKind,
    mode: Mode,
    prefetch: PrefetchPolicy,
) -> anyhow::Result<Pager> {
    let memory = fresh_memory(backing, snapshot.spec.size as usize)?;
    let mut config = PagerConfig::new(ctx.url(), snapshot.id.clone());
    config.mode = mode;
    config.prefetch = prefetch;
    start_pager(config, memory)
        .with_context(|| format!("starting the pager on {backing} with mode {mode}"))
}

/// Fails unless the pager resolves with what `mode` forced.
fn check_strategy(pager: &Pager, mode: Mode) -> anyhow::Result<()> {
    let got = pager.decision(0).strategy();
    let ok = match mode {
        Mode::Copy => matches!(got, Strategy::Copy { .. }),
        Mode::Continue => got == Strategy::Continue,
        Mode::Auto => true,
    };
    if !ok {
        bail!("mode {mode} was forced but the pager uses {got:?}");
    }
    Ok(())
}

/// Checks each of `pages` at `base` against the manifest's digests.
///
/// # Safety
///
/// Every page must be mapped readable and present for the whole call, with
/// nobody writing to it.
unsafe fn verify(base: usize, manifest: &Manifest, pages: &[u64]) -> anyhow::Result<()> {
    let size = manifest.page_size.bytes_usize();
    for &p in pages {
        // SAFETY: the caller guarantees the page is mapped, present and not
        // written while this slice lives; plain bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts((base + p as usize * size) as *const u8, size) };
        if !manifest.verify(PageIndex(p), bytes) {
            bail!("page {p} does not match its digest after the restore");
        }
    }
    Ok(())
}
