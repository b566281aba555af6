//! Scenario 3: Working set.
//!
//! A workload that reads a scattered 10% of a snapshot's pages, run on
//! restored memory three ways (demand faults only, replaying a recorded
//! working set, replaying it then everything else) and on memory already
//! filled locally; beside them, the kernel's share of a replay alone (the
//! install floor). Each time runs from the restore's start (`Pager::start`)
//! to the workload's last page read; the workload's checksum must match the
//! image's every time.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::{Context, bail};
use faultline_client::backing::{BackingKind, GuestMemory};
use faultline_client::pager::{PagerConfig, PrefetchPolicy, Stats};
use faultline_client::uffd::{RegisterModes, Uffd};
use serde_json::json;

use super::report::{Bar, Plot, ratio};
use super::restore::fill_from_image;
use super::sample::sample_pages;
use super::unix::{Transport, UnixServer};
use super::{Ctx, ImageSpec, ScenarioReport, Summary, Table, Target, start_pager};

/// Share of the snapshot's pages the workload reads, in percent: the issue's
/// scattered 10% working set.
const WORKING_SET_PERCENT: u64 = 10;

/// Seed of the workload's page order: fixed, so every mode and every run
/// reads the same pages in the same order.
const ORDER_SEED: u64 = 0x5eed_0003;

/// Odd multiplier folding page sums into the checksum, so that the checksum
/// depends on which content is at which position of the order.
const FOLD_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// REAP's mean cold-start speed-up from replaying a recorded working set
/// (Ustiugov et al., ASPLOS '21): the demand-only vs replay goal.
const REAP_GAIN: f64 = 3.7;

/// Largest replay / local ratio the issue asks for.
const REPLAY_GOAL: f64 = 1.5;

/// Folds one page into the checksum: the wrapping sum of its little-endian
/// u64 words, added to the running value times [`FOLD_MULTIPLIER`].
pub(crate) fn fold_page(acc: u64, page: &[u8]) -> u64 {
    let sum = page.chunks_exact(8).fold(0u64, |s, w| {
        s.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")))
    });
    acc.wrapping_mul(FOLD_MULTIPLIER).wrapping_add(sum)
}

/// The workload: reads each page of `order` (pages of `page_bytes`) whole
/// from `memory`, in order, and folds it into a checksum. On restored memory
/// each first read of a page faults it in through the pager.
pub(crate) fn workload(
    memory: &GuestMemory,
    page_bytes: usize,
    order: &[u64],
) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; page_bytes];
    let mut acc = 0u64;
    for &p in order {
        memory
            .guest()
            .read(p as usize * page_bytes, &mut buf)
            .context("workload page outside the memory")?;
        acc = fold_page(acc, &buf);
    }
    Ok(acc)
}

/// The workload's checksum computed on the image file.
fn expected_checksum(image: &File, page_bytes: usize, order: &[u64]) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; page_bytes];
    let mut acc = 0u64;
    for &p in order {
        image
            .read_exact_at(&mut buf, p * page_bytes as u64)
            .context("reading the image")?;
        acc = fold_page(acc, &buf);
    }
    Ok(acc)
}

/// The modes measured, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Prefetch none: every page by a demand fault.
    Demand,
    /// Prefetch the recorded working set only.
    ReplayWorkingSet,
    /// The same with the prefetch stream on gRPC (before the lean prefetch
    /// transport).
    ReplayWorkingSetGrpc,
    /// Prefetch the recorded working set, then everything else.
    ReplayAll,
    /// Prefetch the working set from a server on a Unix socket, as bytes.
    ReplayUnixStream,
    /// Prefetch the working set from the page file of a server on a Unix
    /// socket.
    ReplayUnixFile,
    /// Memory filled from the image before the clock starts.
    Local,
    /// The kernel's share of a replay alone ([`install_floor_run`]).
    InstallFloor,
    /// The same, each data page first read from a file holding the set's
    /// data pages in order, as a replay reads the store's `wspages-` file.
    InstallFloorReads,
}

impl Mode {
    const ALL: [Mode; 9] = [
        Self::Demand,
        Self::ReplayWorkingSet,
        Self::ReplayWorkingSetGrpc,
        Self::ReplayAll,
        Self::ReplayUnixStream,
        Self::ReplayUnixFile,
        Self::Local,
        Self::InstallFloor,
        Self::InstallFloorReads,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Demand => "demand only (prefetch none)",
            Self::ReplayWorkingSet => "replay (prefetch working-set)",
            Self::ReplayWorkingSetGrpc => "replay (working-set), prefetch on gRPC (before)",
            Self::ReplayAll => "replay (prefetch all)",
            Self::ReplayUnixStream => "replay (working-set) over unix:// (byte stream)",
            Self::ReplayUnixFile => "replay (working-set) over unix:// + page file",
            Self::Local => "local memory",
            Self::InstallFloor => {
                "kernel install floor (one thread: UFFDIO_COPY / ZEROPAGE per page, no network, \
                 no digest, no workload)"
            }
            Self::InstallFloorReads => {
                "kernel install floor with reads (the same, each data page first read by one \
                 pread from a file of the set's data pages in order, as the store keeps it)"
            }
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Demand => "demand",
            Self::ReplayWorkingSet => "replay_working_set",
            Self::ReplayWorkingSetGrpc => "replay_working_set_grpc",
            Self::ReplayAll => "replay_all",
            Self::ReplayUnixStream => "replay_unix_stream",
            Self::ReplayUnixFile => "replay_unix_file",
            Self::Local => "local",
            Self::InstallFloor => "install_floor",
            Self::InstallFloorReads => "install_floor_reads",
        }
    }

    fn prefetch(self) -> Option<PrefetchPolicy> {
        match self {
            Self::Demand => Some(PrefetchPolicy::None),
            Self::ReplayWorkingSet
            | Self::ReplayWorkingSetGrpc
            | Self::ReplayUnixStream
            | Self::ReplayUnixFile => Some(PrefetchPolicy::WorkingSet),
            Self::ReplayAll => Some(PrefetchPolicy::All),
            Self::Local | Self::InstallFloor | Self::InstallFloorReads => None,
        }
    }

    fn transport(self) -> Transport {
        match self {
            Self::ReplayUnixStream => Transport::UnixStream,
            Self::ReplayUnixFile => Transport::UnixFile,
            Self::ReplayWorkingSetGrpc => Transport::TcpGrpcPrefetch,
            _ => Transport::Tcp,
        }
    }
}

/// One timed run.
#[derive(Debug)]
struct Run {
    /// Restore start (or, locally, workload start) to the last page read.
    secs: f64,
    /// Of which `Pager::start` took.
    start_s: f64,
    /// The pager's statistics right after the workload.
    stats: Option<Stats>,
    /// Pages uploaded as the working set, when recording.
    recorded: Option<u64>,
    /// The pager's strategy.
    strategy: Option<&'static str>,
}

impl Run {
    /// A run that timed something other than a restore (no pager).
    fn without_pager(secs: f64) -> Self {
        Self {
            secs,
            start_s: 0.0,
            stats: None,
            recorded: None,
            strategy: None,
        }
    }
}

/// A restore into fresh anonymous memory with `prefetch` (recording the
/// first-touch order and uploading it if `record`) running the workload.
#[allow(clippy::too_many_arguments)]
fn restored_run(
    ctx: &Ctx,
    snapshot: &super::Snapshot,
    (transport, unix): (Transport, &UnixServer),
    prefetch: PrefetchPolicy,
    record: bool,
    order: &[u64],
    expected: u64,
) -> anyhow::Result<Run> {
    let page_bytes = snapshot.manifest.page_size.bytes_usize();
    let memory = GuestMemory::new(BackingKind::Anonymous, ctx.size as usize)
        .context("creating anonymous memory")?;
    let mut config = PagerConfig::new(ctx.url(), snapshot.id.clone());
    config.prefetch = prefetch;
    config.record = record;
    transport.configure(&mut config, unix);
    if record {
        // The exact pages touched, not each fault's read-ahead window.
        config.readahead = faultline_client::pager::NO_READAHEAD;
    }
    let started = Instant::now();
    let pager = start_pager(config, memory).context("starting the pager")?;
    let start_s = started.elapsed().as_secs_f64();
    let checksum = workload(pager.memory(0), page_bytes, order)?;
    let secs = started.elapsed().as_secs_f64();
    let stats = pager.stats();
    check(checksum, expected, &format!("{prefetch:?} restore"))?;
    let recorded = if record {
        Some(
            pager
                .record_working_set()
                .context("uploading the working set")?,
        )
    } else {
        None
    };
    let strategy = pager.decision(0).strategy().as_str();
    // Untimed: an incomplete pager poisons what it did not fill, then unmaps.
    drop(pager);
    Ok(Run {
        secs,
        start_s,
        stats: Some(stats),
        recorded,
        strategy: Some(strategy),
    })
}

/// The workload on fresh anonymous memory filled from the image (untimed).
fn local_run(
    ctx: &Ctx,
    image: &File,
    page_bytes: usize,
    order: &[u64],
    expected: u64,
) -> anyhow::Result<Run> {
    let memory = GuestMemory::new(BackingKind::Anonymous, ctx.size as usize)
        .context("creating anonymous memory")?;
    fill_from_image(&memory, image)?;
    let started = Instant::now();
    let checksum = workload(&memory, page_bytes, order)?;
    let secs = started.elapsed().as_secs_f64();
    check(checksum, expected, "local")?;
    Ok(Run::without_pager(secs))
}

/// The kernel's share of a replay, alone: the workload's pages put into
/// fresh anonymous memory registered with a uffd, in the workload's order,
/// by one thread, each data page by one `UFFDIO_COPY` from a buffer already
/// in memory (as a received batch is), each zero page by one
/// `UFFDIO_ZEROPAGE`. No network, no page file, no digest, no workload while
/// it runs: a replay does all of this and more, on the same cores as the
/// workload. Checked afterwards (untimed) by the workload's checksum. With
/// `reads`, the data pages are first copied in order into a file beside the
/// image (untimed: the store's `wspages-` file, written when the set is
/// recorded), and each is read from there by one `pread` inside the timed
/// loop, as a replay reads the set (the client from the handed-over file,
/// the server before sending it).
fn install_floor_run(
    ctx: &Ctx,
    manifest: &faultline_proto::Manifest,
    image: &File,
    order: &[u64],
    expected: u64,
    reads: bool,
) -> anyhow::Result<Run> {
    let page_bytes = manifest.page_size.bytes_usize();
    let is_zero = |p: u64| manifest.is_zero(faultline_proto::PageIndex(p));
    let read_page = |p: u64, into: &mut [u8]| {
        image
            .read_exact_at(into, p * page_bytes as u64)
            .context("reading the image")
    };
    // Every data page in memory before the clock starts, in order; with
    // `reads`, then written to the file the timed loop reads.
    let buffered: Vec<u64> = order.iter().copied().filter(|&p| !is_zero(p)).collect();
    let mut data = vec![0u8; buffered.len() * page_bytes];
    for (chunk, &p) in data.chunks_exact_mut(page_bytes).zip(&buffered) {
        read_page(p, chunk)?;
    }
    let in_order = if reads {
        let file = tempfile::tempfile_in(ctx.store.root()).context("creating the set's file")?;
        file.write_all_at(&data, 0)
            .context("writing the set's file")?;
        data = Vec::new();
        Some(file)
    } else {
        None
    };
    let memory = GuestMemory::new(BackingKind::Anonymous, ctx.size as usize)
        .context("creating anonymous memory")?;
    let base = memory.host_addr();
    let uffd = Uffd::open().context("opening a userfaultfd")?;
    // SAFETY: `memory` is fresh anonymous memory that no Rust object lives
    // in; the uffd is closed (ending the registration) before `memory` is
    // read or dropped.
    unsafe { uffd.register(base, memory.len(), RegisterModes::MISSING) }
        .context("registering the memory")?;
    let mut sources = data.chunks_exact(page_bytes);
    let mut page = vec![0u8; page_bytes];
    let mut slot = 0u64;
    let started = Instant::now();
    for &p in order {
        let dst = base + p as usize * page_bytes;
        // Nobody faults on this memory: no wake.
        if is_zero(p) {
            uffd.zeropage(dst, page_bytes, true)?;
            continue;
        }
        let src = if let Some(file) = &in_order {
            file.read_exact_at(&mut page, slot * page_bytes as u64)
                .context("reading the set's file")?;
            slot += 1;
            &page[..]
        } else {
            sources.next().expect("one buffered page per data page")
        };
        uffd.copy(dst, src, true)?;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(uffd);
    let checksum = workload(&memory, page_bytes, order)?;
    check(checksum, expected, "the install floor's")?;
    Ok(Run::without_pager(secs))
}

fn check(got: u64, want: u64, what: &str) -> anyhow::Result<()> {
    if got != want {
        bail!("the workload's checksum on {what} memory is {got:#018x}, the image's {want:#018x}");
    }
    Ok(())
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let repeats = ctx.pick(2, 3);
    let snapshot = ctx.snapshot(ImageSpec::realistic(ctx.size))?;
    let manifest = &snapshot.manifest;
    let page_bytes = manifest.page_size.bytes_usize();
    let count = manifest.page_count * WORKING_SET_PERCENT / 100;
    let order = sample_pages(manifest.page_count, count as usize, ORDER_SEED, |_| true);
    let zero_in_order = order
        .iter()
        .filter(|&&p| manifest.is_zero(faultline_proto::PageIndex(p)))
        .count();
    let image = File::open(&snapshot.image)
        .with_context(|| format!("opening {}", snapshot.image.display()))?;
    let expected = expected_checksum(&image, page_bytes, &order)?;

    let bar = ctx.bar(
        "working-set: record, then 9 modes",
        1 + (repeats * Mode::ALL.len()) as u64,
    );
    let unix = UnixServer::start(ctx)?;
    let tcp = (Transport::Tcp, &unix);
    let record = restored_run(
        ctx,
        &snapshot,
        tcp,
        PrefetchPolicy::None,
        true,
        &order,
        expected,
    )
    .context("recording the working set")?;
    bar.inc(1);
    let mut runs: Vec<Vec<Run>> = Mode::ALL.iter().map(|_| Vec::new()).collect();
    for _ in 0..repeats {
        for (i, mode) in Mode::ALL.iter().enumerate() {
            let run = match (mode, mode.prefetch()) {
                (_, Some(p)) => {
                    let via = (mode.transport(), &unix);
                    restored_run(ctx, &snapshot, via, p, false, &order, expected)
                }
                (Mode::InstallFloor | Mode::InstallFloorReads, None) => {
                    let reads = *mode == Mode::InstallFloorReads;
                    install_floor_run(ctx, manifest, &image, &order, expected, reads)
                }
                (_, None) => local_run(ctx, &image, page_bytes, &order, expected),
            }
            .with_context(|| mode.label())?;
            runs[i].push(run);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(report(
        ctx,
        repeats,
        &order,
        zero_in_order,
        expected,
        &record,
        &runs,
    ))
}

/// Median of `f` over the runs that have statistics.
fn median_of(runs: &[Run], f: impl Fn(&Stats) -> u64) -> u64 {
    let v: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.stats.as_ref())
        .map(|s| f(s) as f64)
        .collect();
    Summary::of(&v).median as u64
}

/// "demand / readahead / prefetch / zero" pages (medians), or a dash.
fn sources(runs: &[Run]) -> String {
    if runs.iter().all(|r| r.stats.is_none()) {
        return "—".into();
    }
    format!(
        "{} / {} / {} / {}",
        median_of(runs, |s| s.pages_by_source.demand),
        median_of(runs, |s| s.pages_by_source.readahead),
        median_of(runs, |s| s.pages_by_source.prefetch),
        median_of(runs, |s| s.pages_by_source.zero),
    )
}

fn run_json(r: &Run) -> serde_json::Value {
    json!({
        "seconds": r.secs,
        "pager_start_s": r.start_s,
        "stats": r.stats,
        "recorded_pages": r.recorded,
    })
}

/// The report from the measurements.
fn report(
    ctx: &Ctx,
    repeats: usize,
    order: &[u64],
    zero_in_order: usize,
    expected: u64,
    record: &Run,
    runs: &[Vec<Run>],
) -> ScenarioReport {
    let secs: Vec<Summary> = runs
        .iter()
        .map(|rs| Summary::of(&rs.iter().map(|r| r.secs).collect::<Vec<_>>()))
        .collect();
    let at = |m: Mode| Mode::ALL.iter().position(|&x| x == m).expect("a mode");
    let local = secs[at(Mode::Local)].median;
    let demand = secs[at(Mode::Demand)].median;
    let replay = secs[at(Mode::ReplayWorkingSet)].median;
    let replay_file = secs[at(Mode::ReplayUnixFile)].median;
    let floor = secs[at(Mode::InstallFloor)].median;
    let start_of =
        |m: Mode| Summary::of(&runs[at(m)].iter().map(|r| r.start_s).collect::<Vec<_>>()).median;
    let floor_reads = secs[at(Mode::InstallFloorReads)].median;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The least a replay can take given a floor: its Pager::start, then the
    // workload and the floor's work sharing the cores (the workload is one
    // thread).
    let start = start_of(Mode::ReplayUnixFile);
    let bound_of = |floor: f64| start + local.max((local + floor) / cores as f64);
    let bound = bound_of(floor);
    // With the page file's reads, for the replay that does them.
    let bound_reads = bound_of(floor_reads);
    let mut table = Table::new(
        format!(
            "A scattered {WORKING_SET_PERCENT}% of a {} MiB realistic snapshot ({} pages) read \
             once, anonymous memory (seconds from restore start to the last read; median \
             (min–max) of {repeats})",
            ctx.size >> 20,
            order.len()
        ),
        &[
            "mode",
            "seconds",
            "ratio to local",
            "pages: demand / readahead / prefetch / zero",
        ],
    );
    let mut bars = Vec::new();
    for (i, mode) in Mode::ALL.iter().enumerate() {
        table.row(vec![
            mode.label().into(),
            secs[i].fmt(4),
            ratio(secs[i].median, local),
            sources(&runs[i]),
        ]);
        bars.push(Bar {
            label: mode.label().into(),
            value: secs[i],
        });
    }
    table.row(vec![
        "record once (prefetch none, read-ahead off, recording; not repeated)".into(),
        format!("{:.4}", record.secs),
        ratio(record.secs, local),
        sources(std::slice::from_ref(record)),
    ]);

    let targets = vec![
        Target {
            name: "working-set replay vs local memory".into(),
            goal: format!("<= {REPLAY_GOAL}x"),
            value: ratio(replay, local),
            met: local > 0.0 && replay / local <= REPLAY_GOAL,
        },
        Target {
            name: "working-set replay over unix:// + page file vs local memory".into(),
            goal: format!("<= {REPLAY_GOAL}x"),
            value: ratio(replay_file, local),
            met: local > 0.0 && replay_file / local <= REPLAY_GOAL,
        },
        Target {
            name: "demand-only vs working-set replay".into(),
            goal: format!(">= {REAP_GAIN}x"),
            value: ratio(demand, replay),
            met: replay > 0.0 && demand / replay >= REAP_GAIN,
        },
    ];

    let recorded = record.recorded.unwrap_or(0);
    let data_in_order = order.len() - zero_in_order;
    let mut notes = vec![format!(
        "The kernel install floor: installing the {} pages alone takes {floor:.4} s on one \
         thread ({:.2} us per page on average; {data_in_order} UFFDIO_COPY, {zero_in_order} \
         UFFDIO_ZEROPAGE), {} local memory's workload. A replay does that work and the \
         workload's on {cores} core(s), so it cannot end before Pager::start + max(local, \
         (local + floor) / {cores}) = {bound:.4} s, {} local memory, without receiving, \
         reading or checking a single page; the replay over unix:// + page file is {} that \
         bound, over TCP {}. Reading each data page as well (one pread each from a file of \
         the set's data pages in order, as a replay reads the store's copy) takes the floor to {floor_reads:.4} s and the \
         bound to {bound_reads:.4} s, {} local memory; the replay over unix:// + page file is \
         {} that bound.",
        order.len(),
        floor * 1e6 / order.len().max(1) as f64,
        ratio(floor, local),
        ratio(bound, local),
        ratio(replay_file, bound),
        ratio(replay, bound),
        ratio(bound_reads, local),
        ratio(replay_file, bound_reads),
    )];
    notes.push(format!(
        "The local run reads {} pages ({:.0} MiB) already in RAM, a few microseconds each. A \
         replay must also move the recorded set's data pages (the recording holds {recorded} \
         pages, {:.0} MiB with its zero pages, which travel as ranges only) over loopback from the in-process server while the workload runs, with the server, \
         the pager and the workload sharing the machine's cores, and pays Pager::start \
         (connect, manifest with one digest per page, uffd registration: median {:.3} s).",
        order.len(),
        (order.len() as u64 * 4096) as f64 / f64::from(1 << 20),
        (recorded * 4096) as f64 / f64::from(1 << 20),
        start_of(Mode::ReplayWorkingSet),
    ));
    notes.push(format!(
        "The recorded working set holds {recorded} pages for the {} pages touched ({} of them \
         zero pages, which travel as ranges and are mapped ahead by the prefetcher): the \
         recording run has read-ahead off (faultline_client::pager::NO_READAHEAD, as \
         `faultline restore --record` does), so that it holds the pages touched and not their \
         neighbours.",
        order.len(),
        zero_in_order
    ));
    for (i, mode) in Mode::ALL.iter().enumerate() {
        let Some(last) = runs[i].last().and_then(|r| r.stats.as_ref()) else {
            continue;
        };
        let l = &last.fault_latency_us;
        notes.push(format!(
            "{}: {} faults ({} zero pages mapped, on a fault or ahead of it; {} faults joined a \
             fetch in flight), {} over the network (p50 {} us, p99 {} us, max {} us), {:.1} MiB received by the \
             last read (last repeat).",
            mode.label(),
            last.faults,
            last.pages_by_source.zero,
            last.joined_faults,
            l.count,
            l.p50,
            l.p99,
            l.max,
            last.bytes_received as f64 / f64::from(1 << 20)
        ));
    }
    if let Some(last) = runs[at(Mode::ReplayWorkingSet)]
        .last()
        .and_then(|r| r.stats.as_ref())
    {
        notes.push(format!(
            "What is left of a replay's time: moving the recorded set over loopback while the \
             workload runs, the {} faults on pages the workload reaches before the prefetcher \
             has mapped them (a wait for the stream, or a zero page not mapped yet), and the \
             pages it reaches first, which wait for the demand link: {} went over the network \
             (max {} us; its connection is still being opened right after Pager::start).",
            last.faults, last.fault_latency_us.count, last.fault_latency_us.max
        ));
    }

    let mut modes = serde_json::Map::new();
    for (i, mode) in Mode::ALL.iter().enumerate() {
        modes.insert(
            mode.key().into(),
            json!({
                "label": mode.label(),
                "seconds": secs[i],
                "runs": runs[i].iter().map(run_json).collect::<Vec<_>>(),
            }),
        );
    }
    let strategy = runs[at(Mode::Demand)].first().and_then(|r| r.strategy);
    ScenarioReport {
        id: "working-set".into(),
        title: "Working set".into(),
        method: format!(
            "A workload reads {WORKING_SET_PERCENT}% of a {} MiB realistic snapshot's pages \
             (distinct, fixed-seed scattered order), each whole, folding it into a checksum that \
             must equal the image's. Timed from Pager::start to the last read on fresh anonymous \
             memory with prefetch none, after recording the first-touch order once, with \
             prefetch working-set and all; and on anonymous memory filled from the image \
             beforehand (untimed); and, as the replay's floor, the same pages installed into \
             registered memory by one thread from memory, without the workload. {repeats} \
             interleaved repeats.",
            ctx.size >> 20
        ),
        tables: vec![table],
        targets,
        plots: vec![Plot::Bars {
            file: "working-set-seconds.png".into(),
            title: format!(
                "Scattered {WORKING_SET_PERCENT}% of {} MiB: time to the last read",
                ctx.size >> 20
            ),
            y_label: "seconds".into(),
            bars,
        }],
        notes,
        data: json!({
            "size": ctx.size,
            "repeats": repeats,
            "pages_touched": order.len(),
            "zero_pages_touched": zero_in_order,
            "checksum": format!("{expected:#018x}"),
            "strategy": strategy,
            "record": run_json(record),
            "recorded_pages": recorded,
            "modes": modes,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum depends on where each page's content sits in the order.
    #[test]
    fn fold_is_position_sensitive() {
        let (a, b) = ([1u8; 4096], [2u8; 4096]);
        let ab = fold_page(fold_page(0, &a), &b);
        let ba = fold_page(fold_page(0, &b), &a);
        assert_ne!(ab, ba);
        assert_eq!(ab, fold_page(fold_page(0, &a), &b));
    }
}
