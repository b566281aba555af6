//! Scenario 1: demand-fault latency, against the floor a remote fault
//! cannot beat, pinned to one CPU and unpinned.
//!
//! One page at a time, in a fixed random order, the touching thread times
//! each touch (an [`Instant`] before and after a volatile read of one byte)
//! for every method alike:
//!
//! - faultline from the in-process server on its lean fault transport
//!   (default read-ahead, and read-ahead off), and over gRPC (the `Fault`
//!   stream on HTTP/2, default read-ahead), in the same run;
//! - the floor's two halves, written here: a local userfaultfd handler (a
//!   thread polling the uffd, one `UFFDIO_COPY` of 4 KiB per fault, the
//!   image in local memory) and a bare loopback TCP ping-pong (64 B out, 4 KiB
//!   back). A remote fault needs both, so their sum is *the floor*; and the
//!   same ping-pong on tokio (a multi-thread runtime's task serving, a
//!   current-thread runtime's client, as faultline's server and demand
//!   thread are), which shows what the async runtime adds to a round trip;
//! - a plain page fault: first read of a page of a fresh private mapping of
//!   the (page-cache-warm) image file, and first write of fresh anonymous
//!   memory (zero fill).
//!
//! Every repeat runs every method twice: with every thread of the process
//! (client, pager, in-process server, probes) pinned to one CPU, which
//! measures the software path (a wake-up is a plain context switch), and
//! unpinned, what a user sees (a wake-up crossing to an idle vCPU costs
//! 35-80 µs here). Methods are interleaved repeat by repeat on fresh memory,
//! so a noisy neighbour hits them all. faultline's runs also count the
//! context switches of the client's and the server's threads over the timed
//! loop (`/proc`), per fault.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use anyhow::{Context, bail};
use faultline_client::backing::GuestMemory;
use faultline_client::pager::{PagerConfig, PrefetchPolicy, Stats, StreamTransport};
use faultline_client::uffd::{Event, Readiness, RegisterModes, ResolveError, StopSignal, Uffd};
use faultline_proto::PageIndex;
use serde_json::json;

use super::floor::{Placement, Side, Switches};
use super::report::{Plot, ratio};
use super::sample::sample_pages;
use super::unix::{Transport, UnixServer};
use super::{
    Ctx, ImageSpec, Percentiles, ScenarioReport, Snapshot, Summary, Table, Target, start_pager,
};

/// Seed of the page sample: fixed, so that every method, repeat and run
/// touches the same pages in the same order.
const SEED: u64 = 0x5eed_0001;

/// The goal, pinned: faultline's p50 at most this many times the
/// floor's (local uffd handler + TCP ping-pong).
const GOAL_P50: f64 = 1.5;

/// The goal, pinned: faultline's p99 at most this many times the
/// floor's p99.
const GOAL_P99: f64 = 3.0;

/// The goal, unpinned: faultline's p50 at most this many times the
/// unpinned floor's.
const GOAL_UNPINNED_P50: f64 = 1.5;

/// Request bytes of the TCP floor: a little more than a `Fault` request for
/// one window carries (its framing included).
const TCP_REQUEST: usize = 64;

/// Reply bytes of the TCP floor: one 4 KiB page.
const TCP_REPLY: usize = 4096;

/// Page size of the scenario's snapshot (4 KiB pages).
const PAGE: usize = 4096;

/// What is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// faultline, default read-ahead, the default (lean) fault transport.
    Faultline,
    /// faultline, default read-ahead, the `Fault` stream over gRPC (HTTP/2).
    FaultlineGrpc,
    /// faultline, read-ahead off.
    FaultlineNoReadahead,
    /// faultline from a server on a Unix socket, pages as bytes.
    FaultlineUnixStream,
    /// faultline from a server on a Unix socket, pages from its page file.
    FaultlineUnixFile,
    /// The floor's local half: a `UFFDIO_COPY` handler from a local buffer.
    LocalHandler,
    /// The floor's network half: a loopback TCP ping-pong of a page.
    Tcp,
    /// The same ping-pong on tokio runtimes on both ends.
    TcpTokio,
    /// First read of a private file mapping (page cache warm).
    FileFault,
    /// First read of a one-page private file mapping (no fault-around).
    FilePageFault,
    /// First write of fresh anonymous memory.
    ZeroFill,
}

impl Method {
    /// Every method, in the order each repeat runs them.
    const ALL: [Method; 11] = [
        Self::Faultline,
        Self::LocalHandler,
        Self::Tcp,
        Self::TcpTokio,
        Self::FaultlineGrpc,
        Self::FaultlineNoReadahead,
        Self::FaultlineUnixStream,
        Self::FaultlineUnixFile,
        Self::FileFault,
        Self::FilePageFault,
        Self::ZeroFill,
    ];

    /// Label in the table and plot.
    fn label(self) -> &'static str {
        match self {
            Self::Faultline => "faultline (lean fault transport, loopback)",
            Self::FaultlineGrpc => "faultline (gRPC fault stream, loopback)",
            Self::FaultlineNoReadahead => "faultline, read-ahead off",
            Self::FaultlineUnixStream => "faultline over unix:// (byte stream)",
            Self::FaultlineUnixFile => "faultline over unix:// + page file",
            Self::LocalHandler => "local uffd handler (poll thread, one UFFDIO_COPY)",
            Self::Tcp => "TCP ping-pong, 64 B -> 4 KiB",
            Self::TcpTokio => "TCP ping-pong on tokio (multi-thread server, current-thread client)",
            Self::FileFault => "plain fault, file mapping (page cache)",
            Self::FilePageFault => "plain fault, one-page file mapping",
            Self::ZeroFill => "plain fault, anonymous zero fill (write)",
        }
    }

    /// Key in the report's data.
    fn key(self) -> &'static str {
        match self {
            Self::Faultline => "faultline",
            Self::FaultlineGrpc => "faultline_grpc",
            Self::FaultlineNoReadahead => "faultline_no_readahead",
            Self::FaultlineUnixStream => "faultline_unix_stream",
            Self::FaultlineUnixFile => "faultline_unix_file",
            Self::LocalHandler => "local_handler",
            Self::Tcp => "tcp",
            Self::TcpTokio => "tcp_tokio",
            Self::FileFault => "file_fault",
            Self::FilePageFault => "file_page_fault",
            Self::ZeroFill => "zero_fill",
        }
    }
}

/// What one faultline run saw besides the timings.
struct PagerRun {
    /// Thread-timed touches of the sample, µs.
    samples: Vec<f64>,
    /// Thread-timed touches of zero pages after the sample, µs (default
    /// read-ahead run only).
    zero_samples: Vec<f64>,
    /// The pager's statistics at the end.
    stats: Stats,
    /// Context switches per fault over the timed loop: client, server.
    switches: (f64, f64),
    /// The first touch after `Pager::start` returned, µs (not in `samples`).
    first: f64,
}

/// Everything measured for one placement, over the repeats.
#[derive(Default)]
struct Measured {
    /// samples[method][repeat]
    samples: Vec<Vec<Vec<f64>>>,
    zero_samples: Vec<Vec<f64>>,
    /// pager_stats[variant][repeat], variants in [`PAGER_METHODS`] order.
    pager_stats: Vec<Vec<Stats>>,
    /// switches[variant][repeat]: (client, server) per fault.
    switches: Vec<Vec<(f64, f64)>>,
    /// The first fault of every faultline run, µs.
    first: Vec<f64>,
}

/// The faultline methods, in the order of [`Measured::pager_stats`].
const PAGER_METHODS: [Method; 3] = [
    Method::Faultline,
    Method::FaultlineNoReadahead,
    Method::FaultlineGrpc,
];

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport {
        id: "latency".into(),
        title: "Demand-fault latency".into(),
        method: "Random single-page touches of distinct non-zero pages, one at a time, each timed \
                 by the touching thread (Instant around a volatile one-byte read); the same pages \
                 in the same order for every method, methods interleaved over repeats on fresh \
                 memory, each repeat once with every thread of the process (client, pager, \
                 in-process server, probes) pinned to CPU 0 and once unpinned. p50/p90/p99/max \
                 are medians over repeats. The floor is the sum of a local userfaultfd handler's \
                 fault and a bare TCP ping-pong (64 B out, 4 KiB back), measured the same way."
            .into(),
        ..Default::default()
    };
    if let Err(e) = Uffd::open() {
        report.skipped = Some(format!("no userfaultfd here: {e}"));
        return Ok(report);
    }
    let snap = ctx.snapshot(ImageSpec::realistic(ctx.pick(128 << 20, 256 << 20)))?;
    let manifest = &snap.manifest;
    let count = ctx.pick(1000, 3000);
    // One more than measured: the first touch of each run warms the path up
    // (thread wake-ups, and the demand connection if `Pager::start` did not
    // open it) and is reported on its own.
    let sample = sample_pages(manifest.page_count, count + 1, SEED, |p| {
        !manifest.is_zero(PageIndex(p))
    });
    let zeros = sample_pages(manifest.page_count, count / 4, SEED + 1, |p| {
        manifest.is_zero(PageIndex(p))
    });
    let image = std::fs::read(&snap.image).context("reading the image")?;
    let file = File::open(&snap.image).context("opening the image")?;

    let repeats = ctx.repeats();
    // Before any placement pins the process's threads: its workers too.
    let unix = UnixServer::start(ctx)?;
    let mut measured: HashMap<Placement, Measured> = Placement::ALL
        .into_iter()
        .map(|p| {
            let m = Measured {
                samples: vec![Vec::new(); Method::ALL.len()],
                pager_stats: vec![Vec::new(); PAGER_METHODS.len()],
                switches: vec![Vec::new(); PAGER_METHODS.len()],
                ..Default::default()
            };
            (p, m)
        })
        .collect();
    let bar = ctx.bar(
        "latency",
        (repeats * Method::ALL.len() * Placement::ALL.len()) as u64,
    );
    for _ in 0..repeats {
        for placement in Placement::ALL {
            let _pinned = placement.apply()?;
            let out = measured.get_mut(&placement).expect("every placement");
            for (m, method) in Method::ALL.into_iter().enumerate() {
                let s = match method {
                    Method::Faultline | Method::FaultlineNoReadahead | Method::FaultlineGrpc => {
                        let off = method == Method::FaultlineNoReadahead;
                        let transport = if method == Method::FaultlineGrpc {
                            StreamTransport::Grpc
                        } else {
                            StreamTransport::Lean
                        };
                        let via = (Transport::Tcp, &unix);
                        let run =
                            faultline(ctx, &snap, &sample, &zeros, off, transport, &image, via)?;
                        let v = PAGER_METHODS
                            .iter()
                            .position(|m| *m == method)
                            .expect("a pager method");
                        out.pager_stats[v].push(run.stats);
                        out.switches[v].push(run.switches);
                        if method == Method::Faultline {
                            out.first.push(run.first);
                            out.zero_samples.push(run.zero_samples);
                        }
                        run.samples
                    }
                    Method::FaultlineUnixStream | Method::FaultlineUnixFile => {
                        let t = if method == Method::FaultlineUnixFile {
                            Transport::UnixFile
                        } else {
                            Transport::UnixStream
                        };
                        let auto = StreamTransport::Auto;
                        faultline(ctx, &snap, &sample, &zeros, false, auto, &image, (t, &unix))?
                            .samples
                    }
                    Method::LocalHandler => local_handler(&image, &sample)?,
                    Method::FileFault => file_fault(&file, image.len(), &sample)?,
                    Method::FilePageFault => file_page_fault(&file, &sample)?,
                    Method::ZeroFill => zero_fill(image.len(), &sample)?,
                    Method::Tcp => tcp(sample.len())?,
                    Method::TcpTokio => tcp_tokio(sample.len())?,
                };
                out.samples[m].push(s);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();

    let mut data = serde_json::Map::new();
    let mut floors = HashMap::new();
    let mut faultlines = HashMap::new();
    for placement in Placement::ALL {
        let m = &measured[&placement];
        let (floor, faultline) = placement_report(
            &mut report,
            &mut data,
            placement,
            m,
            &snap,
            count,
            zeros.len(),
        );
        floors.insert(placement, floor);
        faultlines.insert(placement, faultline);
    }

    // Context switches per fault, by side.
    let mut table = Table::new(
        "Context switches per demand fault over the timed loop (voluntary + involuntary, \
         from /proc/self/task/*/status), median (min–max) over repeats"
            .to_string(),
        &["method", "placement", "client", "server"],
    );
    for placement in Placement::ALL {
        let m = &measured[&placement];
        for (v, method) in PAGER_METHODS.into_iter().enumerate() {
            let client: Vec<f64> = m.switches[v].iter().map(|s| s.0).collect();
            let server: Vec<f64> = m.switches[v].iter().map(|s| s.1).collect();
            table.row(vec![
                method.label().into(),
                placement.label().into(),
                Summary::of(&client).fmt(1),
                Summary::of(&server).fmt(1),
            ]);
        }
    }
    report.tables.push(table);

    let (floor_p, fl_p) = (&floors[&Placement::Pinned], &faultlines[&Placement::Pinned]);
    report.targets.push(Target {
        name: "demand-fault p50 vs the floor (local uffd + TCP), pinned".into(),
        goal: format!("<= {GOAL_P50}x"),
        value: ratio(fl_p.p50, floor_p.p50),
        met: floor_p.p50 > 0.0 && fl_p.p50 <= GOAL_P50 * floor_p.p50,
    });
    report.targets.push(Target {
        name: "demand-fault p99 vs the floor's p99, pinned".into(),
        goal: format!("<= {GOAL_P99}x"),
        value: ratio(fl_p.p99, floor_p.p99),
        met: floor_p.p99 > 0.0 && fl_p.p99 <= GOAL_P99 * floor_p.p99,
    });
    let (floor_u, fl_u) = (
        &floors[&Placement::Unpinned],
        &faultlines[&Placement::Unpinned],
    );
    report.targets.push(Target {
        name: "demand-fault p50 vs the floor, unpinned".into(),
        goal: format!("<= {GOAL_UNPINNED_P50}x"),
        value: ratio(fl_u.p50, floor_u.p50),
        met: floor_u.p50 > 0.0 && fl_u.p50 <= GOAL_UNPINNED_P50 * floor_u.p50,
    });

    // The same-host transport's demand fault against the same floors.
    for placement in Placement::ALL {
        let reps = &measured[&placement].samples[index(Method::FaultlineUnixFile)];
        let per: Vec<Percentiles> = reps.iter().map(|s| Percentiles::of(s)).collect();
        let file = median_of(&per);
        let floor = &floors[&placement];
        report.targets.push(Target {
            name: format!(
                "demand-fault p50 over unix:// + page file vs the floor, {}",
                placement.label()
            ),
            goal: format!("<= {GOAL_P50}x"),
            value: ratio(file.p50, floor.p50),
            met: floor.p50 > 0.0 && file.p50 <= GOAL_P50 * floor.p50,
        });
    }

    let pinned = &measured[&Placement::Pinned];
    let series: Vec<(String, Vec<f64>)> = Method::ALL
        .into_iter()
        .zip(&pinned.samples)
        .take(5)
        .map(|(method, reps)| (method.label().to_string(), reps.concat()))
        .collect();
    report.plots.push(Plot::Cdf {
        file: "latency-cdf.png".into(),
        title: "Demand-fault latency pinned to one CPU, every touch of every repeat".into(),
        x_label: "µs".into(),
        log_x: true,
        series,
    });

    report.data = json!({
        "image_bytes": snap.spec.size,
        "page_bytes": PAGE,
        "pages_sampled": count,
        "repeats": repeats,
        "seed": SEED,
        "placements": data,
    });
    Ok(report)
}

/// The floor: the local handler's and the TCP ping-pong's percentiles added.
fn floor_of(local: &Percentiles, tcp: &Percentiles) -> Percentiles {
    Percentiles {
        n: local.n.min(tcp.n),
        p50: local.p50 + tcp.p50,
        p90: local.p90 + tcp.p90,
        p99: local.p99 + tcp.p99,
        max: local.max + tcp.max,
    }
}

/// One placement's table, notes and data; returns its floor and faultline's
/// medians.
fn placement_report(
    report: &mut ScenarioReport,
    data: &mut serde_json::Map<String, serde_json::Value>,
    placement: Placement,
    m: &Measured,
    snap: &Snapshot,
    count: usize,
    zero_count: usize,
) -> (Percentiles, Percentiles) {
    // Per method: percentiles of each repeat, and their medians.
    let per_repeat: Vec<Vec<Percentiles>> = m
        .samples
        .iter()
        .map(|reps| reps.iter().map(|s| Percentiles::of(s)).collect())
        .collect();
    let medians: Vec<Percentiles> = per_repeat.iter().map(|p| median_of(p)).collect();
    let floor_repeats: Vec<Percentiles> = per_repeat[index(Method::LocalHandler)]
        .iter()
        .zip(&per_repeat[index(Method::Tcp)])
        .map(|(l, t)| floor_of(l, t))
        .collect();
    let floor = floor_of(
        &medians[index(Method::LocalHandler)],
        &medians[index(Method::Tcp)],
    );
    let repeats = m.samples[0].len();
    let mut table = Table::new(
        format!(
            "Demand-fault latency {}, µs ({count} random non-zero 4 KiB pages of a {} MiB image, \
             {repeats} repeats)",
            placement.label(),
            snap.spec.size >> 20
        ),
        &[
            "method",
            "p50",
            "p90",
            "p99",
            "max",
            "p50 over repeats (min–max)",
            "p50 vs the floor",
            "p99 vs the floor's p99",
        ],
    );
    // One row: percentiles (medians over repeats) and the spread of p50.
    let row = |label: &str, p: &Percentiles, repeats: &[Percentiles]| {
        let p50s: Vec<f64> = repeats.iter().map(|p| p.p50).collect();
        vec![
            label.to_string(),
            us(p.p50),
            us(p.p90),
            us(p.p99),
            us(p.max),
            Summary::of(&p50s).fmt(1),
            ratio(p.p50, floor.p50),
            ratio(p.p99, floor.p99),
        ]
    };
    for (i, method) in Method::ALL.into_iter().enumerate() {
        table.row(row(method.label(), &medians[i], &per_repeat[i]));
        if method == Method::Tcp {
            table.row(row(
                "the floor (local uffd handler + TCP ping-pong)",
                &floor,
                &floor_repeats,
            ));
        }
    }
    let zero_per_repeat: Vec<Percentiles> =
        m.zero_samples.iter().map(|s| Percentiles::of(s)).collect();
    let zero = median_of(&zero_per_repeat);
    if zero.n > 0 {
        table.row(row(
            "faultline, zero page (no network)",
            &zero,
            &zero_per_repeat,
        ));
    }
    // One sample per run: the percentiles are over runs.
    let first = Percentiles::of(&m.first);
    table.row(row(
        "faultline, first fault after Pager::start (one per run)",
        &first,
        &[first],
    ));
    report.tables.push(table);

    // The pager's own view: from reading the fault to installing the page.
    let pager_view = |stats: &[Stats]| {
        let p50: Vec<f64> = stats
            .iter()
            .map(|s| s.fault_latency_us.p50 as f64)
            .collect();
        let p99: Vec<f64> = stats
            .iter()
            .map(|s| s.fault_latency_us.p99 as f64)
            .collect();
        (Summary::of(&p50).median, Summary::of(&p99).median)
    };
    let faultline = medians[index(Method::Faultline)];
    let (own_p50, own_p99) = pager_view(&m.pager_stats[0]);
    let (own_off_p50, own_off_p99) = pager_view(&m.pager_stats[1]);
    let (own_grpc_p50, own_grpc_p99) = pager_view(&m.pager_stats[2]);
    report.notes.push(format!(
        "{}: the pager's own view (Stats::fault_latency_us, from reading the fault message to \
         installing the page, network faults only): p50 {own_p50:.0} µs, p99 {own_p99:.0} µs \
         with read-ahead on the lean transport ({own_off_p50:.0} / {own_off_p99:.0} µs without \
         read-ahead, {own_grpc_p50:.0} / {own_grpc_p99:.0} µs over gRPC), against {} / {} µs \
         timed by the touching thread; the difference is the kernel's fault entry, the wake-up \
         of the pager's thread and of the faulting thread.",
        placement.label(),
        us(faultline.p50),
        us(faultline.p99),
    ));
    if placement == Placement::Pinned {
        let readahead_hits: u64 = m.pager_stats[0]
            .iter()
            .map(|s| s.pages_by_source.readahead)
            .sum();
        report.notes.push(format!(
            "Zero pages (about 40% of a realistic image) never touch the network: the manifest \
             marks them and the pager resolves them with UFFDIO_ZEROPAGE on the spot (pinned p50 \
             {} µs over {zero_count} touches per repeat). The sample holds only non-zero pages; \
             with default read-ahead each fault also fetched up to 3 neighbours \
             ({readahead_hits} read-ahead pages over the pinned repeats), so a sampled page a \
             previous fault's read-ahead installed costs a plain memory read.",
            us(zero.p50),
        ));
    }

    let method_data: serde_json::Map<String, serde_json::Value> = Method::ALL
        .into_iter()
        .enumerate()
        .map(|(i, method)| {
            (
                method.key().to_string(),
                json!({
                    "label": method.label(),
                    "median": medians[i],
                    "repeats": per_repeat[i],
                    "samples_us": m.samples[i],
                }),
            )
        })
        .collect();
    data.insert(
        placement.key().into(),
        json!({
            "methods": method_data,
            "floor": { "median": floor, "repeats": floor_repeats },
            "faultline_zero_page": { "median": zero, "repeats": zero_per_repeat },
            "faultline_first_fault": { "over_runs": first, "samples_us": m.first },
            "switches_per_fault": {
                "faultline": m.switches[0],
                "faultline_no_readahead": m.switches[1],
                "faultline_grpc": m.switches[2],
            },
            "pager_stats": {
                "faultline": m.pager_stats[0],
                "faultline_no_readahead": m.pager_stats[1],
                "faultline_grpc": m.pager_stats[2],
            },
            "ratio_p50_vs_floor": if floor.p50 > 0.0 { faultline.p50 / floor.p50 } else { 0.0 },
            "ratio_p99_vs_floor": if floor.p99 > 0.0 { faultline.p99 / floor.p99 } else { 0.0 },
        }),
    );
    (floor, faultline)
}

/// Position of `method` in [`Method::ALL`].
fn index(method: Method) -> usize {
    Method::ALL
        .iter()
        .position(|m| *m == method)
        .expect("every method is in ALL")
}

/// Each percentile's median over repeats.
fn median_of(repeats: &[Percentiles]) -> Percentiles {
    let med =
        |f: fn(&Percentiles) -> f64| Summary::of(&repeats.iter().map(f).collect::<Vec<_>>()).median;
    Percentiles {
        n: repeats.iter().map(|p| p.n).sum(),
        p50: med(|p| p.p50),
        p90: med(|p| p.p90),
        p99: med(|p| p.p99),
        max: med(|p| p.max),
    }
}

/// Microseconds for a table cell: more decimals for small values.
pub(crate) fn us(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Touches one byte of each of `pages` (of `page_size` bytes, from `base`),
/// one after the other, and returns each touch's time in µs. A write
/// touch stores a zero byte.
///
/// # Safety
///
/// Every touched page must be mapped (readable, and writable for `write`)
/// for the whole call, and hold no Rust object.
pub(crate) unsafe fn timed_touches(
    base: usize,
    page_size: usize,
    pages: &[u64],
    write: bool,
) -> Vec<f64> {
    let addrs: Vec<usize> = pages
        .iter()
        .map(|&p| base + p as usize * page_size)
        .collect();
    // SAFETY: the caller's guarantee, for these addresses.
    unsafe { touch_each(&addrs, write) }
}

/// Touches one byte at each of `addrs`, one after the other, and returns
/// each touch's time in µs. A write touch stores a zero byte.
///
/// # Safety
///
/// As [`timed_touches`], for the pages of `addrs`.
unsafe fn touch_each(addrs: &[usize], write: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let addr = addr as *mut u8;
        let t = Instant::now();
        if write {
            // SAFETY: the caller guarantees the page is mapped writable and
            // holds no Rust object; a one-byte volatile store.
            unsafe { std::ptr::write_volatile(addr, 0) };
        } else {
            // SAFETY: the caller guarantees the page is mapped readable; a
            // one-byte volatile load (which may fault the page in).
            unsafe { std::ptr::read_volatile(addr) };
        }
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out
}

/// Compares the 4 KiB `pages` of the memory at `base` with the image.
///
/// # Safety
///
/// Every page must be mapped readable and present (already touched) for the
/// whole call, with nobody writing to it.
unsafe fn check_pages(base: usize, pages: &[u64], image: &[u8]) -> anyhow::Result<()> {
    for &p in pages {
        let offset = p as usize * PAGE;
        // SAFETY: the caller guarantees the page is mapped, present and not
        // written while this slice lives; plain bytes.
        let got = unsafe { std::slice::from_raw_parts((base + offset) as *const u8, PAGE) };
        if got != &image[offset..offset + PAGE] {
            bail!("page {p} differs from the image after the restore");
        }
    }
    Ok(())
}

/// One faultline restore: fresh anonymous memory, the pager with no
/// prefetch, the sample touched (then the zero pages, with read-ahead on),
/// and every touched page compared with the image.
#[allow(clippy::too_many_arguments)]
fn faultline(
    ctx: &Ctx,
    snap: &Snapshot,
    sample: &[u64],
    zeros: &[u64],
    readahead_off: bool,
    fault_transport: StreamTransport,
    image: &[u8],
    (transport, unix): (Transport, &UnixServer),
) -> anyhow::Result<PagerRun> {
    let memory = GuestMemory::anonymous(image.len())?;
    let mut config = PagerConfig::new(ctx.url(), snap.id.clone());
    config.prefetch = PrefetchPolicy::None;
    config.fault_transport = fault_transport;
    transport.configure(&mut config, unix);
    if readahead_off {
        config.readahead = faultline_client::pager::NO_READAHEAD;
    }
    let pager = start_pager(config, memory)?;
    let base = pager.memory(0).host_addr();
    // SAFETY: the pages are inside the pager's region, mapped read-write
    // while `pager` lives; guest memory holds no Rust object.
    let first = unsafe { timed_touches(base, PAGE, &sample[..1], false) }[0];
    let (faults_before, before) = (pager.stats().faults, Switches::now()?);
    // SAFETY: as above.
    let samples = unsafe { timed_touches(base, PAGE, &sample[1..], false) };
    let (faults_after, after) = (pager.stats().faults, Switches::now()?);
    let switched = after.since(&before);
    let faults = (faults_after - faults_before).max(1) as f64;
    let per_fault = |side| switched.get(&side).copied().unwrap_or(0) as f64 / faults;
    let switches = (per_fault(Side::Client), per_fault(Side::Server));
    let zero_samples = if readahead_off {
        Vec::new()
    } else {
        // SAFETY: as above.
        unsafe { timed_touches(base, PAGE, zeros, false) }
    };
    let stats = pager.stats();
    // SAFETY: every page of `sample` and `zeros` was touched, so it is
    // present; nothing writes to the region.
    unsafe {
        check_pages(base, sample, image)?;
        if !readahead_off {
            check_pages(base, zeros, image)?;
        }
    }
    drop(pager);
    Ok(PagerRun {
        samples,
        zero_samples,
        stats,
        switches,
        first,
    })
}

/// The local baseline, as Firecracker's example handler: the image in local
/// memory, a handler thread resolving each fault with one `UFFDIO_COPY`.
fn local_handler(image: &[u8], sample: &[u64]) -> anyhow::Result<Vec<f64>> {
    let memory = GuestMemory::anonymous(image.len())?;
    let base = memory.host_addr();
    let uffd = Uffd::open()?;
    // SAFETY: `memory` is fresh guest memory that no Rust object lives in; it
    // outlives the registration (the handler closes the uffd before
    // `memory` is dropped).
    unsafe { uffd.register(base, memory.len(), RegisterModes::MISSING) }?;
    let stop = StopSignal::new()?;
    let (samples, served) = std::thread::scope(|s| {
        let handler = s.spawn(|| serve_local(uffd, &stop, base, image));
        // SAFETY: the pages are inside `memory`, mapped read-write until the
        // end of this function; the handler fills them (or, if it fails,
        // closes the uffd so that they read as zeros and the check fails).
        let samples = unsafe { timed_touches(base, PAGE, sample, false) };
        stop.stop();
        let served = handler.join().expect("the local handler does not panic");
        (samples, served)
    });
    let faults = served?;
    // SAFETY: every sampled page was touched and is present; the uffd is
    // closed and nothing writes to `memory`.
    unsafe { check_pages(base, sample, image)? };
    if faults < sample.len() as u64 {
        bail!(
            "the local handler served {faults} faults for {} pages",
            sample.len()
        );
    }
    let mut samples = samples;
    samples.remove(0);
    Ok(samples)
}

/// The local handler's loop: each fault resolved by one `UFFDIO_COPY` of its
/// page from `image`, until `stop`. Closes the uffd on return; returns the
/// faults served.
fn serve_local(uffd: Uffd, stop: &StopSignal, base: usize, image: &[u8]) -> anyhow::Result<u64> {
    let mut faults = 0;
    loop {
        match uffd.wait(None, Some(stop))? {
            Readiness::Stopped => return Ok(faults),
            Readiness::TimedOut => continue,
            Readiness::Events => {}
        }
        while let Some(event) = uffd.read_event()? {
            let Event::Pagefault { address, .. } = event else {
                continue;
            };
            let page = address & !(PAGE - 1);
            let offset = page - base;
            match uffd.copy(page, &image[offset..offset + PAGE], false) {
                Ok(_) => {}
                // Already there (a fault queued twice): just wake.
                Err(ResolveError::Exists { .. }) => uffd.wake(page, PAGE)?,
                Err(e) => return Err(e.into()),
            }
            faults += 1;
        }
    }
}

/// A private mapping made for a baseline, unmapped on drop.
struct LocalMap {
    addr: usize,
    len: usize,
}

impl LocalMap {
    /// `len` bytes of `file` from `offset`, read-only and private.
    fn file(file: &File, offset: usize, len: usize) -> anyhow::Result<Self> {
        // SAFETY: a new mapping at an address the kernel picks; it replaces
        // nothing. Its bytes are only read through raw pointers.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        Self::mapped(addr, len)
    }

    /// `len` bytes of fresh anonymous memory, private, without transparent
    /// huge pages (each 4 KiB page then faults on its own).
    fn anonymous(len: usize) -> anyhow::Result<Self> {
        // SAFETY: as in `file`.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let map = Self::mapped(addr, len)?;
        // SAFETY: advice on the mapping just made, which this value owns.
        if unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(std::io::Error::last_os_error()).context("madvise(MADV_NOHUGEPAGE)");
        }
        Ok(map)
    }

    fn mapped(addr: *mut libc::c_void, len: usize) -> anyhow::Result<Self> {
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        Ok(Self {
            addr: addr as usize,
            len,
        })
    }
}

impl Drop for LocalMap {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made; no reference into it outlives
        // the value.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// First read of each sampled page of a fresh private mapping of the image
/// file (its page cache is warm: the file was just read).
fn file_fault(file: &File, len: usize, sample: &[u64]) -> anyhow::Result<Vec<f64>> {
    let map = LocalMap::file(file, 0, len)?;
    // SAFETY: the pages are inside `map`, mapped readable while it lives.
    let mut samples = unsafe { timed_touches(map.addr, PAGE, sample, false) };
    samples.remove(0);
    Ok(samples)
}

/// First read of each sampled page, each mapped on its own (a private
/// read-only mapping of just that page of the image file): exactly one
/// page per fault, as the mapping leaves no room for fault-around.
fn file_page_fault(file: &File, sample: &[u64]) -> anyhow::Result<Vec<f64>> {
    let maps = sample
        .iter()
        .map(|&p| LocalMap::file(file, p as usize * PAGE, PAGE))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addrs: Vec<usize> = maps.iter().map(|m| m.addr).collect();
    // SAFETY: each address is the start of a page mapping in `maps`, mapped
    // readable while `maps` lives.
    let mut samples = unsafe { touch_each(&addrs, false) };
    samples.remove(0);
    Ok(samples)
}

/// First write of each sampled page of fresh anonymous memory.
fn zero_fill(len: usize, sample: &[u64]) -> anyhow::Result<Vec<f64>> {
    let map = LocalMap::anonymous(len)?;
    // SAFETY: the pages are inside `map`, mapped read-write while it lives;
    // it holds no Rust object.
    let mut samples = unsafe { timed_touches(map.addr, PAGE, sample, true) };
    samples.remove(0);
    Ok(samples)
}

/// `count` loopback TCP round trips (TCP_NODELAY): a 64-byte request, a
/// 4 KiB reply from a server thread; µs each, the first left out.
fn tcp(count: usize) -> anyhow::Result<Vec<f64>> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    // Connected before the server thread accepts (the backlog holds it), so
    // that a failure here cannot leave that thread waiting.
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    client.set_nodelay(true)?;
    std::thread::scope(|s| {
        let server = s.spawn(move || -> std::io::Result<()> {
            let (mut conn, _) = listener.accept()?;
            conn.set_nodelay(true)?;
            let mut request = [0u8; TCP_REQUEST];
            let reply = vec![0x5a; TCP_REPLY];
            loop {
                match conn.read_exact(&mut request) {
                    Ok(()) => conn.write_all(&reply)?,
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        });
        let mut samples = Vec::with_capacity(count);
        let mut reply = vec![0u8; TCP_REPLY];
        for i in 0..count {
            let request = tcp_request(i);
            let t = Instant::now();
            client.write_all(&request)?;
            client.read_exact(&mut reply)?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        // EOF ends the server's loop.
        drop(client);
        server.join().expect("the TCP server does not panic")?;
        samples.remove(0);
        Ok(samples)
    })
}

/// The ping-pong's `i`-th request: the page's offset and length, as a
/// fault request would name them, in 64 bytes.
fn tcp_request(i: usize) -> [u8; TCP_REQUEST] {
    let mut request = [0u8; TCP_REQUEST];
    request[..8].copy_from_slice(&(i as u64 * PAGE as u64).to_le_bytes());
    request[8..16].copy_from_slice(&(PAGE as u64).to_le_bytes());
    request
}

/// [`tcp`] on tokio: the server a task on a multi-thread runtime of as many
/// workers as the in-process faultline server's, the client on a
/// current-thread runtime (as the pager's demand thread is); µs per round
/// trip, the first left out.
fn tcp_tokio(count: usize) -> anyhow::Result<Vec<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(super::SERVER_THREADS)
        .enable_io()
        .build()?;
    let listener = server_rt.block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
    let addr = listener.local_addr()?;
    let server = server_rt.spawn(async move {
        let (mut conn, _) = listener.accept().await?;
        conn.set_nodelay(true)?;
        let mut request = [0u8; TCP_REQUEST];
        let reply = vec![0x5a; TCP_REPLY];
        loop {
            match conn.read_exact(&mut request).await {
                Ok(_) => conn.write_all(&reply).await?,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let mut samples = client_rt.block_on(async {
        let mut client = tokio::net::TcpStream::connect(addr).await?;
        client.set_nodelay(true)?;
        let mut samples = Vec::with_capacity(count);
        let mut reply = vec![0u8; TCP_REPLY];
        for i in 0..count {
            let request = tcp_request(i);
            let t = Instant::now();
            client.write_all(&request).await?;
            client.read_exact(&mut reply).await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok::<_, std::io::Error>(samples)
    })?;
    // The client's socket is closed: EOF ends the server's loop.
    server_rt
        .block_on(server)
        .context("the tokio TCP server panicked")??;
    samples.remove(0);
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles over repeats are each the median of that percentile.
    #[test]
    fn median_over_repeats() {
        let p = |v: f64| Percentiles {
            n: 10,
            p50: v,
            p90: 2.0 * v,
            p99: 3.0 * v,
            max: 4.0 * v,
        };
        let m = median_of(&[p(1.0), p(5.0), p(3.0)]);
        assert_eq!((m.n, m.p50, m.p90, m.p99, m.max), (30, 3.0, 6.0, 9.0, 12.0));
    }
}
