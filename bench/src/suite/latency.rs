//! Scenario 1: demand-fault latency.
//!
//! One page at a time, in a fixed random order, the touching thread times
//! each touch (an [`Instant`] before and after a volatile read of one byte)
//! for every method alike:
//!
//! - faultline over gRPC from the in-process server (default read-ahead, and
//!   read-ahead off);
//! - an in-process local handler, as Firecracker's example handler: the
//!   image in local memory, one `UFFDIO_COPY` per fault;
//! - a plain page fault: first read of a page of a fresh private mapping of
//!   the (page-cache-warm) image file, and first write of fresh anonymous
//!   memory (zero fill);
//! - the floor of any network fetch: a 16-byte request and a 4 KiB reply
//!   over loopback TCP.
//!
//! Methods are interleaved repeat by repeat on fresh memory, so a noisy
//! neighbour hits them all.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use anyhow::{Context, bail};
use faultline_client::backing::GuestMemory;
use faultline_client::pager::{PagerConfig, PrefetchPolicy, Stats};
use faultline_client::uffd::{Event, Readiness, RegisterModes, ResolveError, StopSignal, Uffd};
use faultline_proto::PageIndex;
use serde_json::json;

use super::report::{Plot, ratio};
use super::sample::sample_pages;
use super::{
    Ctx, ImageSpec, Percentiles, ScenarioReport, Snapshot, Summary, Table, Target, start_pager,
};

/// Seed of the page sample: fixed, so that every method, repeat and run
/// touches the same pages in the same order.
const SEED: u64 = 0x5eed_0001;

/// The goal: faultline's p50 at most this many times the local
/// handler's.
const GOAL_RATIO: f64 = 3.0;

/// Request bytes of the TCP floor: about what a page request carries (an
/// address and a length).
const TCP_REQUEST: usize = 16;

/// Reply bytes of the TCP floor: one 4 KiB page.
const TCP_REPLY: usize = 4096;

/// Page size of the scenario's snapshot (4 KiB pages).
const PAGE: usize = 4096;

/// What is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// faultline, default read-ahead.
    Faultline,
    /// faultline, read-ahead off.
    FaultlineNoReadahead,
    /// In-process `UFFDIO_COPY` handler from a local buffer.
    LocalHandler,
    /// First read of a private file mapping (page cache warm).
    FileFault,
    /// First read of a one-page private file mapping (no fault-around).
    FilePageFault,
    /// First write of fresh anonymous memory.
    ZeroFill,
    /// Loopback TCP round trip of a page.
    Tcp,
}

impl Method {
    /// Every method, in the order each repeat runs them.
    const ALL: [Method; 7] = [
        Self::Faultline,
        Self::FaultlineNoReadahead,
        Self::LocalHandler,
        Self::FileFault,
        Self::FilePageFault,
        Self::ZeroFill,
        Self::Tcp,
    ];

    /// Label in the table and plot.
    fn label(self) -> &'static str {
        match self {
            Self::Faultline => "faultline (gRPC, loopback)",
            Self::FaultlineNoReadahead => "faultline, read-ahead off",
            Self::LocalHandler => "in-process UFFDIO_COPY handler",
            Self::FileFault => "plain fault, file mapping (page cache)",
            Self::FilePageFault => "plain fault, one-page file mapping",
            Self::ZeroFill => "plain fault, anonymous zero fill (write)",
            Self::Tcp => "TCP round trip, 16 B -> 4 KiB",
        }
    }

    /// Key in the report's data.
    fn key(self) -> &'static str {
        match self {
            Self::Faultline => "faultline",
            Self::FaultlineNoReadahead => "faultline_no_readahead",
            Self::LocalHandler => "local_handler",
            Self::FileFault => "file_fault",
            Self::FilePageFault => "file_page_fault",
            Self::ZeroFill => "zero_fill",
            Self::Tcp => "tcp",
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
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport {
        id: "latency".into(),
        title: "Demand-fault latency".into(),
        method: "Random single-page touches of distinct non-zero pages, one at a time, each timed \
                 by the touching thread (Instant around a volatile one-byte read); the same pages \
                 in the same order for every method, methods interleaved over repeats on fresh \
                 memory. p50/p90/p99/max are medians over repeats."
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
    // (connection, thread wake-ups) and is not counted.
    let sample = sample_pages(manifest.page_count, count + 1, SEED, |p| {
        !manifest.is_zero(PageIndex(p))
    });
    let zeros = sample_pages(manifest.page_count, count / 4, SEED + 1, |p| {
        manifest.is_zero(PageIndex(p))
    });
    let image = std::fs::read(&snap.image).context("reading the image")?;
    let file = File::open(&snap.image).context("opening the image")?;

    let repeats = ctx.repeats();
    // samples[method][repeat]
    let mut samples: Vec<Vec<Vec<f64>>> = vec![Vec::new(); Method::ALL.len()];
    let mut zero_samples = Vec::new();
    let mut pager_stats: Vec<Vec<Stats>> = vec![Vec::new(); 2];
    let bar = ctx.bar("latency", (repeats * Method::ALL.len()) as u64);
    for _ in 0..repeats {
        for (m, method) in Method::ALL.into_iter().enumerate() {
            let s = match method {
                Method::Faultline | Method::FaultlineNoReadahead => {
                    let off = method == Method::FaultlineNoReadahead;
                    let run = faultline(ctx, &snap, &sample, &zeros, off, &image)?;
                    pager_stats[usize::from(off)].push(run.stats);
                    if !off {
                        zero_samples.push(run.zero_samples);
                    }
                    run.samples
                }
                Method::LocalHandler => local_handler(&image, &sample)?,
                Method::FileFault => file_fault(&file, image.len(), &sample)?,
                Method::FilePageFault => file_page_fault(&file, &sample)?,
                Method::ZeroFill => zero_fill(image.len(), &sample)?,
                Method::Tcp => tcp(sample.len())?,
            };
            samples[m].push(s);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    // Per method: percentiles of each repeat, and their medians.
    let per_repeat: Vec<Vec<Percentiles>> = samples
        .iter()
        .map(|reps| reps.iter().map(|s| Percentiles::of(s)).collect())
        .collect();
    let medians: Vec<Percentiles> = per_repeat.iter().map(|p| median_of(p)).collect();
    let local_p50 = medians[index(Method::LocalHandler)].p50;
    let mut table = Table::new(
        format!(
            "Demand-fault latency, µs ({count} random non-zero 4 KiB pages of a {} MiB image, \
             {repeats} repeats)",
            snap.spec.size >> 20
        ),
        &[
            "method",
            "p50",
            "p90",
            "p99",
            "max",
            "p50 over repeats (min–max)",
            "p50 vs local handler",
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
            ratio(p.p50, local_p50),
        ]
    };
    for (m, method) in Method::ALL.into_iter().enumerate() {
        table.row(row(method.label(), &medians[m], &per_repeat[m]));
    }
    let zero_per_repeat: Vec<Percentiles> =
        zero_samples.iter().map(|s| Percentiles::of(s)).collect();
    let zero = median_of(&zero_per_repeat);
    if zero.n > 0 {
        table.row(row(
            "faultline, zero page (no network)",
            &zero,
            &zero_per_repeat,
        ));
    }
    report.tables.push(table);

    let faultline_p50 = medians[index(Method::Faultline)].p50;
    report.targets.push(Target {
        name: "demand-fault p50 vs in-process local UFFDIO_COPY handler".into(),
        goal: format!("<= {GOAL_RATIO:.0}x"),
        value: ratio(faultline_p50, local_p50),
        met: local_p50 > 0.0 && faultline_p50 <= GOAL_RATIO * local_p50,
    });

    let mut series: Vec<(String, Vec<f64>)> = Method::ALL
        .into_iter()
        .zip(&samples)
        .map(|(method, reps)| (method.label().to_string(), reps.concat()))
        .collect();
    if zero.n > 0 {
        series.push((
            "faultline, zero page (no network)".into(),
            zero_samples.concat(),
        ));
    }
    report.plots.push(Plot::Cdf {
        file: "latency-cdf.png".into(),
        title: "Demand-fault latency, every touch of every repeat".into(),
        x_label: "µs".into(),
        log_x: true,
        series,
    });

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
    let (own_p50, own_p99) = pager_view(&pager_stats[0]);
    let (own_off_p50, own_off_p99) = pager_view(&pager_stats[1]);
    let readahead_hits: u64 = pager_stats[0]
        .iter()
        .map(|s| s.pages_by_source.readahead)
        .sum();
    report.notes.push(format!(
        "The pager's own view (Stats::fault_latency_us, from reading the fault message to \
         installing the page, network faults only): p50 {own_p50:.0} µs, p99 {own_p99:.0} µs \
         with read-ahead ({own_off_p50:.0} / {own_off_p99:.0} µs without), against {} / {} µs \
         timed by the touching thread; the difference is the kernel's fault entry, the wake-up \
         of the pager's fault thread and of the faulting thread.",
        us(faultline_p50),
        us(medians[index(Method::Faultline)].p99),
    ));
    report.notes.push(format!(
        "Zero pages (about 40% of a realistic image) never touch the network: the manifest marks \
         them and the pager resolves them with UFFDIO_ZEROPAGE on the spot (p50 {} µs over \
         {} touches per repeat). The sample above holds only non-zero pages; read-ahead also \
         skips over zero pages without installing them.",
        us(zero.p50),
        zeros.len(),
    ));
    report.notes.push(format!(
        "With default read-ahead each fault also fetched up to 3 neighbours ({readahead_hits} \
         read-ahead pages over all repeats); a sampled page that a previous fault's read-ahead \
         had installed costs a plain memory read, which pulls the low percentiles of that line \
         down slightly."
    ));
    report.notes.push(format!(
        "On a mapping of the whole file one read fault maps more than its page (fault-around, \
         and whole large folios where the file system caches the file in them), so later \
         touches often find their page mapped already (p50 {} µs); mapping each page on its own \
         leaves one fault per touch (p50 {} µs), the cost of a plain minor fault here.",
        us(medians[index(Method::FileFault)].p50),
        us(medians[index(Method::FilePageFault)].p50),
    ));

    let method_data: serde_json::Map<String, serde_json::Value> = Method::ALL
        .into_iter()
        .enumerate()
        .map(|(m, method)| {
            (
                method.key().to_string(),
                json!({
                    "label": method.label(),
                    "median": medians[m],
                    "repeats": per_repeat[m],
                    "samples_us": samples[m],
                }),
            )
        })
        .collect();
    report.data = json!({
        "image_bytes": snap.spec.size,
        "page_bytes": PAGE,
        "pages_sampled": count,
        "repeats": repeats,
        "seed": SEED,
        "methods": method_data,
        "faultline_zero_page": {
            "median": zero,
            "repeats": zero_per_repeat,
            "samples_us": zero_samples,
        },
        "pager_stats": {
            "faultline": pager_stats[0],
            "faultline_no_readahead": pager_stats[1],
        },
        "ratio_p50_vs_local_handler": if local_p50 > 0.0 { faultline_p50 / local_p50 } else { 0.0 },
    });
    Ok(report)
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
fn faultline(
    ctx: &Ctx,
    snap: &Snapshot,
    sample: &[u64],
    zeros: &[u64],
    readahead_off: bool,
    image: &[u8],
) -> anyhow::Result<PagerRun> {
    let memory = GuestMemory::anonymous(image.len())?;
    let mut config = PagerConfig::new(ctx.url(), snap.id.clone());
    config.prefetch = PrefetchPolicy::None;
    if readahead_off {
        config.readahead = faultline_client::pager::NO_READAHEAD;
    }
    let pager = start_pager(config, memory)?;
    let base = pager.memory(0).host_addr();
    // SAFETY: the pages are inside the pager's region, mapped read-write
    // while `pager` lives; guest memory holds no Rust object.
    let mut samples = unsafe { timed_touches(base, PAGE, sample, false) };
    samples.remove(0);
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

/// `count` loopback TCP round trips (TCP_NODELAY): a 16-byte request, a
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
            let mut request = [0u8; TCP_REQUEST];
            request[..8].copy_from_slice(&(i as u64 * PAGE as u64).to_le_bytes());
            request[8..].copy_from_slice(&(PAGE as u64).to_le_bytes());
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
