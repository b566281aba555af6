//! Scenario 2: Full restore throughput.
//!
//! A whole snapshot restored by the pager's background prefetch alone
//! (nothing touches the memory), per backing type, against the two things a
//! user could do instead on one machine: read the page-cache-warm image file
//! straight into fresh memory (an eager local copy), and the bare memcpy
//! bandwidth of the machine. Measurements are interleaved per repeat, so a
//! noisy neighbour hits all of them.
//!
//! Also home of the eager local fill the working-set scenario shares
//! ([`fill_from_image`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Instant;

use anyhow::{Context, bail};
use faultline_client::backing::{BackingKind, GuestMemory, HUGE_PAGE_SIZE};
use faultline_client::pager::{Bulk, PagerConfig, Stats, StreamTransport};
use faultline_proto::{Manifest, PageIndex, PageSize};
use serde_json::json;

use super::report::{Bar, Plot};
use super::sample::SplitMix64;
use super::tls::TlsServer;
use super::unix::{Transport, UnixServer};
use super::{
    Content, Ctx, HugePages, ImageSpec, Restored, ScenarioReport, Snapshot, Summary, Table, Target,
    fresh_memory, full_restore, qemu,
};

/// Pages compared with the image after each faultline restore: enough to
/// catch a wrong offset or a missed region without slowing the scenario.
const SPOT_CHECKS: usize = 64;

/// Of [`SPOT_CHECKS`], how many are zero pages of the snapshot (pages the
/// pager never transfers, which must still read as zeros).
const SPOT_ZERO_PAGES: usize = 16;

/// Bytes per `pread` of the eager copy: 2 MiB, one huge page, large enough
/// that the system call costs nothing next to the copy.
const READ_CHUNK: usize = 2 << 20;

/// Size of each of the two memcpy buffers: 256 MiB, far beyond any CPU
/// cache, so the copy runs at memory bandwidth.
const MEMCPY_BYTES: usize = 256 << 20;

/// Copies per memcpy measurement: four passes over 256 MiB take long enough
/// (~0.1 s) for the clock and the scheduler to be noise.
const MEMCPY_ROUNDS: usize = 4;

/// Bytes per `write` and `read` of the bare TCP stream: 1 MiB, the
/// prefetcher's batch ([`faultline_client::pager::PREFETCH_BATCH_BYTES`]).
const TCP_CHUNK: usize = 1 << 20;

/// Huge pages reserved beyond the image's: the restored memory needs exactly
/// the image's, a few spare ones absorb rounding and other users.
const HUGE_PAGE_MARGIN: usize = 8;

/// Seed of the spot-check page choice.
const SPOT_SEED: u64 = 0x5eed_0002;

/// Bytes per GB in the reported bandwidths (decimal, as in GB/s).
const GB: f64 = 1e9;

/// Target: faultline's full restore at least this many times QEMU
/// postcopy's throughput on the same memory (issue 13).
const QEMU_TARGET: f64 = 6.0;

/// Target: faultline's full restore at least this fraction of an eager
/// local copy's throughput, on every backing.
const EAGER_TARGET: f64 = 0.5;

/// Fills `memory` with the first `memory.len()` bytes of `image` by
/// `pread`ing straight into it, 2 MiB at a time: the eager local restore
/// (one copy from the page cache, destination page faults included).
/// `memory` must not be registered with a uffd.
pub(crate) fn fill_from_image(memory: &GuestMemory, image: &File) -> anyhow::Result<()> {
    let len = memory.len();
    let base = memory.guest().as_ptr();
    let mut off = 0usize;
    while off < len {
        let want = (len - off).min(READ_CHUNK);
        let pos = libc::off_t::try_from(off).context("image offset overflows off_t")?;
        // SAFETY: `base + off .. base + off + want` lies inside the guest
        // mapping (off + want <= len), which stays mapped read-write while
        // `memory` is borrowed for this call; no Rust object lives in guest
        // memory, and the kernel writes at most `want` bytes there.
        let n = unsafe { libc::pread(image.as_raw_fd(), base.add(off).cast(), want, pos) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("reading the image into guest memory");
        }
        if n == 0 {
            bail!("the image ends at {off} bytes, before the memory's {len}");
        }
        off += n as usize;
    }
    Ok(())
}

/// GB/s of `bytes` moved in `secs`.
fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / GB
}

/// The pages spot-checked after a restore: `zero` distinct zero pages of the
/// snapshot (as many as it has, if fewer), then random pages up to `total`.
fn spot_pages(manifest: &Manifest, total: usize, zero: usize, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    let zeros: Vec<u64> = (0..manifest.page_count)
        .filter(|&p| manifest.is_zero(PageIndex(p)))
        .collect();
    let mut pages = Vec::with_capacity(total);
    if !zeros.is_empty() {
        let mut tries = 0;
        while pages.len() < zero.min(zeros.len()) && tries < 16 * zero {
            let p = zeros[rng.below(zeros.len() as u64) as usize];
            if !pages.contains(&p) {
                pages.push(p);
            }
            tries += 1;
        }
    }
    while pages.len() < total && manifest.page_count > 0 {
        pages.push(rng.below(manifest.page_count));
    }
    pages
}

/// Compares the pages of `manifest` listed in `pages` in `memory` with the
/// image; an error names the first that differs.
fn spot_check(
    memory: &GuestMemory,
    image: &File,
    manifest: &Manifest,
    pages: &[u64],
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let ps = manifest.page_size.bytes_usize();
    let (mut got, mut want) = (vec![0u8; ps], vec![0u8; ps]);
    for &p in pages {
        let off = p as usize * ps;
        memory
            .guest()
            .read(off, &mut got)
            .context("spot check outside the memory")?;
        image
            .read_exact_at(&mut want, off as u64)
            .context("reading the image for the spot check")?;
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            bail!(
                "restored {} memory differs from the image at page {p} (byte {at} of the page; \
                 zero page in the snapshot: {})",
                memory.kind(),
                manifest.is_zero(PageIndex(p))
            );
        }
    }
    Ok(())
}

/// One backing's measurements.
#[derive(Debug)]
struct Row {
    kind: BackingKind,
    /// How the row is named in tables: the backing, and the snapshot's page
    /// size where it is not the backing's own.
    label: String,
    snapshot: Snapshot,
    strategy: Option<&'static str>,
    decision: Option<String>,
    faultline_s: Vec<f64>,
    faultline_gbps: Vec<f64>,
    eager_gbps: Vec<f64>,
    ratios: Vec<f64>,
    stats: Vec<Stats>,
    /// The same-host transport's GB/s, per repeat: byte stream, page file.
    unix_stream_gbps: Vec<f64>,
    unix_file_gbps: Vec<f64>,
    /// The page file read by one prefetch stream (before PAGE_FILE_STREAMS).
    unix_file1_gbps: Vec<f64>,
    /// Over TLS, per repeat.
    tls_gbps: Vec<f64>,
    /// Why the backing stopped being measured, if it did.
    failed: Option<String>,
}

/// One faultline restore of `row`'s snapshot into fresh memory: seconds
/// from `Pager::start` to completion, and the pager's final statistics.
/// A spot-check mismatch is an error; so is anything else (the caller tells
/// them apart by [`RestoreFailure`]).
fn faultline_once(
    ctx: &Ctx,
    row: &mut Row,
    image: &File,
    spots: &[u64],
    configure: impl FnOnce(&mut PagerConfig),
) -> Result<(f64, Stats), RestoreFailure> {
    let setup = |e: anyhow::Error| RestoreFailure::Setup(format!("{e:#}"));
    let memory = fresh_memory(row.kind, ctx.size as usize).map_err(setup)?;
    let Restored {
        elapsed,
        stats,
        pager,
    } = full_restore(ctx, &row.snapshot, memory, configure).map_err(setup)?;
    let secs = elapsed.as_secs_f64();
    let decision = pager.decision(0);
    row.strategy = Some(decision.strategy().as_str());
    row.decision = Some(decision.to_string());
    spot_check(pager.memory(0), image, &row.snapshot.manifest, spots)
        .map_err(RestoreFailure::Mismatch)?;
    drop(pager);
    Ok((secs, stats))
}

/// The prefetcher's bulk settings measured next to the default
/// ([`Bulk::default`] on the default transport), interleaved with it: its
/// label, settings and the transport of its prefetch streams. The first is
/// the prefetcher as it was before issue 13 (one stream, the server's 1 MiB
/// batches, CONTINUE on shmem, gRPC); the second the default over gRPC, as
/// before the lean prefetch transport.
fn bulk_variants(quick: bool) -> Vec<(String, Bulk, StreamTransport)> {
    let d = Bulk::default();
    let mut v: Vec<(String, Bulk)> = vec![(
        "1 stream, 1 MiB batches, shmem by CONTINUE, gRPC (before)".to_string(),
        Bulk {
            streams: 1,
            page_file_streams: 1,
            batch_bytes: 0,
            shmem_copy: false,
            hugetlb_copy: false,
            overlap: false,
        },
    )];
    let grpc = |v: Vec<(String, Bulk)>| {
        let mut out: Vec<_> = v
            .into_iter()
            .map(|(l, b)| (l, b, StreamTransport::Auto))
            .collect();
        out[0].2 = StreamTransport::Grpc;
        out.insert(
            1,
            (
                "default, prefetch over gRPC".into(),
                d,
                StreamTransport::Grpc,
            ),
        );
        out
    };
    // Receive and install overlapped, and hugetlbfs by COPY (issue 13,
    // hugetlbfs bulk); measured in quick runs too.
    v.push((
        "default, receive and install overlapped".into(),
        Bulk {
            overlap: !d.overlap,
            ..d
        },
    ));
    let other = if d.hugetlb_copy { "CONTINUE" } else { "COPY" };
    v.push((
        format!("default, hugetlbfs by {other}"),
        Bulk {
            hugetlb_copy: !d.hugetlb_copy,
            ..d
        },
    ));
    if quick {
        return grpc(v);
    }
    for streams in [2, 4] {
        v.push((
            format!("{streams} streams, default batches"),
            Bulk { streams, ..d },
        ));
    }
    for kib in [256, 4096] {
        v.push((
            format!("default streams, {kib} KiB batches"),
            Bulk {
                batch_bytes: kib << 10,
                ..d
            },
        ));
    }
    v.push((
        "default streams, 16 MiB batches".into(),
        Bulk {
            batch_bytes: 16 << 20,
            ..d
        },
    ));
    v.push((
        "default, shmem by CONTINUE".into(),
        Bulk {
            shmem_copy: false,
            ..d
        },
    ));
    grpc(v)
}

/// Why a faultline restore gave no measurement.
#[derive(Debug)]
enum RestoreFailure {
    /// The backing could not be measured (memory, pager start, timeout):
    /// noted, and the backing's rows left out.
    Setup(String),
    /// Restored memory differs from the image: the scenario fails.
    Mismatch(anyhow::Error),
}

/// One eager local copy into fresh memory of `kind`: GB/s.
fn eager_once(kind: BackingKind, size: u64, image: &File) -> anyhow::Result<f64> {
    // Right after a restore into huge pages: once they are back in the pool.
    let memory = fresh_memory(kind, size as usize)?;
    let started = Instant::now();
    fill_from_image(&memory, image)?;
    let secs = started.elapsed().as_secs_f64();
    drop(memory);
    Ok(gbps(size, secs))
}

/// One memcpy measurement between two populated buffers: GB/s.
fn memcpy_once(src: &[u8], dst: &mut [u8]) -> f64 {
    let started = Instant::now();
    for _ in 0..MEMCPY_ROUNDS {
        dst.copy_from_slice(src);
        std::hint::black_box(&mut *dst);
    }
    gbps(
        (MEMCPY_ROUNDS * src.len()) as u64,
        started.elapsed().as_secs_f64(),
    )
}

/// One bare loopback TCP stream moving `data_bytes` (the image's non-zero
/// bytes, what a restore must move) from one thread to another, 1 MiB
/// writes into 1 MiB reads and nothing else: the ceiling of any one-stream
/// transport on this machine, in GB/s of the `image_bytes` it stands for.
fn tcp_stream_once(data_bytes: u64, image_bytes: u64) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut chunk = vec![0u8; TCP_CHUNK];
        let mut rng = SplitMix64::new(SPOT_SEED);
        for word in chunk.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let mut left = data_bytes as usize;
        while left > 0 {
            let n = left.min(TCP_CHUNK);
            conn.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    });
    let mut conn = std::net::TcpStream::connect(addr)?;
    let mut buf = vec![0u8; TCP_CHUNK];
    let started = Instant::now();
    let mut got = 0u64;
    while got < data_bytes {
        match conn.read(&mut buf)? {
            0 => bail!("the bare TCP stream ended after {got} of {data_bytes} bytes"),
            n => got += n as u64,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the bare TCP sender panicked"))??;
    Ok(gbps(image_bytes, secs))
}

/// `a[i] / b[i]`, repeat by repeat (as far as both go).
fn per_repeat(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// Reads the whole image once (untimed), so the eager copies read a warm
/// page cache from their first repeat.
fn warm(image: &File) -> anyhow::Result<()> {
    use std::io::Read;
    let mut f = image.try_clone()?;
    let mut buf = vec![0u8; READ_CHUNK];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let repeats = ctx.pick(3, 5);
    let mut notes = Vec::new();
    let small = ctx.snapshot(ImageSpec {
        content: Content::RandomThenZero,
        ..ImageSpec::realistic(ctx.size)
    })?;
    let qemu_image = small.image.clone();
    // What a restore must move: the image's non-zero pages.
    let m = &small.manifest;
    let data_bytes = (m.page_count - m.zero_map.count_ones()) * m.page_size.bytes();
    let mut rows = vec![
        Row::new(BackingKind::Anonymous, small.clone()),
        Row::new(BackingKind::Shmem, small),
    ];

    // hugetlbfs: its own snapshot of 2 MiB pages, and huge pages held while
    // its rows run (the whole loop, since repeats are interleaved).
    let huge_spec = ImageSpec {
        size: ctx.size,
        content: Content::RandomThenZero,
        page_size: PageSize::Size2M,
    };
    let mut _huge_pages = None;
    if !ctx.size.is_multiple_of(HUGE_PAGE_SIZE as u64) {
        notes.push(format!(
            "hugetlb left out: the size {} is not a multiple of 2 MiB",
            ctx.size
        ));
    } else {
        match HugePages::reserve(ctx.size as usize / HUGE_PAGE_SIZE + HUGE_PAGE_MARGIN) {
            Err(why) => notes.push(format!("hugetlb left out: {why}")),
            Ok(guard) => match ctx.snapshot(huge_spec) {
                Ok(s) => {
                    _huge_pages = Some(guard);
                    rows.push(Row::new(BackingKind::Hugetlb, s));
                    // One snapshot for every backing (issue 13): the 4 KiB
                    // snapshot restored into huge pages, whole 2 MiB units.
                    let mut mixed = Row::new(BackingKind::Hugetlb, rows[0].snapshot.clone());
                    mixed.label = "hugetlb (4 KiB snapshot)".into();
                    rows.push(mixed);
                }
                Err(e) => notes.push(format!("hugetlb left out: its snapshot: {e:#}")),
            },
        }
    }

    let images = rows
        .iter()
        .map(|r| {
            let f = File::open(&r.snapshot.image)
                .with_context(|| format!("opening {}", r.snapshot.image.display()))?;
            warm(&f)?;
            Ok(f)
        })
        .collect::<anyhow::Result<Vec<File>>>()?;
    let spots: Vec<Vec<u64>> = rows
        .iter()
        .map(|r| {
            spot_pages(
                &r.snapshot.manifest,
                SPOT_CHECKS,
                SPOT_ZERO_PAGES,
                SPOT_SEED,
            )
        })
        .collect();

    let src = vec![0x5au8; MEMCPY_BYTES];
    let mut dst = vec![0xa5u8; MEMCPY_BYTES];
    let mut memcpy_gbps = Vec::new();
    let mut tcp_gbps = Vec::new();
    let mut qemu = Qemu {
        not_run: qemu::unavailable(),
        runs: Vec::new(),
    };
    let qemu_dir = ctx.scratch("qemu")?;

    let variants = bulk_variants(ctx.quick);
    let unix = UnixServer::start(ctx)?;
    let tls = TlsServer::start(ctx)
        .map_err(|e| notes.push(format!("the TLS restores were not run: {e:#}")))
        .ok();
    // Per backing row, per variant: GB/s of each repeat.
    let mut variant_gbps = vec![vec![Vec::<f64>::new(); variants.len()]; rows.len()];
    let bar = ctx.bar(
        "restore: faultline / QEMU postcopy / eager / memcpy",
        (repeats * ((6 + variants.len()) * rows.len() + 2)) as u64,
    );
    for _ in 0..repeats {
        if qemu.not_run.is_none() {
            match qemu::migrate_once(&qemu_dir, &qemu_image, ctx.size) {
                Ok(m) => qemu.runs.push(m),
                Err(e) => qemu.not_run = Some(format!("the QEMU migration failed: {e:#}")),
            }
        }
        bar.inc(1);
        for (i, row) in rows.iter_mut().enumerate() {
            if row.failed.is_some() {
                bar.inc(6 + variants.len() as u64);
                continue;
            }
            for (v, (_, bulk, transport)) in variants.iter().enumerate() {
                let set = |c: &mut PagerConfig| {
                    c.bulk = *bulk;
                    c.prefetch_transport = *transport;
                };
                match faultline_once(ctx, row, &images[i], &spots[i], set) {
                    Ok((secs, _)) => variant_gbps[i][v].push(gbps(ctx.size, secs)),
                    Err(RestoreFailure::Mismatch(e)) => return Err(e),
                    Err(RestoreFailure::Setup(why)) => {
                        notes.push(format!("{} with {:?}: {why}", row.label, bulk));
                    }
                }
                bar.inc(1);
            }
            // The page file with its default streams, and with one (as
            // before PAGE_FILE_STREAMS).
            for (t, one_stream) in [
                (Transport::UnixStream, false),
                (Transport::UnixFile, false),
                (Transport::UnixFile, true),
            ] {
                let at = |c: &mut PagerConfig| {
                    t.configure(c, &unix);
                    if one_stream {
                        c.bulk.page_file_streams = 1;
                    }
                };
                match faultline_once(ctx, row, &images[i], &spots[i], at) {
                    Ok((secs, _)) => match (t, one_stream) {
                        (Transport::UnixStream, _) => &mut row.unix_stream_gbps,
                        (_, false) => &mut row.unix_file_gbps,
                        _ => &mut row.unix_file1_gbps,
                    }
                    .push(gbps(ctx.size, secs)),
                    Err(RestoreFailure::Mismatch(e)) => return Err(e),
                    Err(RestoreFailure::Setup(why)) => {
                        notes.push(format!("{} over {}: {why}", row.label, t.label()));
                    }
                }
                bar.inc(1);
            }
            // The same restore over TLS (the lean transports on rustls).
            if let Some(tls) = &tls {
                match faultline_once(ctx, row, &images[i], &spots[i], |c| tls.configure(c)) {
                    Ok((secs, _)) => row.tls_gbps.push(gbps(ctx.size, secs)),
                    Err(RestoreFailure::Mismatch(e)) => return Err(e),
                    Err(RestoreFailure::Setup(why)) => {
                        notes.push(format!("{} over TLS: {why}", row.label));
                    }
                }
            }
            bar.inc(1);
            match faultline_once(ctx, row, &images[i], &spots[i], |_| {}) {
                Ok((secs, stats)) => {
                    row.faultline_s.push(secs);
                    row.faultline_gbps.push(gbps(ctx.size, secs));
                    row.stats.push(stats);
                }
                Err(RestoreFailure::Mismatch(e)) => return Err(e),
                Err(RestoreFailure::Setup(why)) => {
                    notes.push(format!("{} left out: {why}", row.label));
                    row.failed = Some(why);
                    bar.inc(2);
                    continue;
                }
            }
            bar.inc(1);
            match eager_once(row.kind, ctx.size, &images[i]) {
                Ok(g) => {
                    row.eager_gbps.push(g);
                    let f = *row.faultline_gbps.last().expect("pushed above");
                    row.ratios.push(f / g);
                }
                Err(e) => {
                    let why = format!("eager copy: {e:#}");
                    notes.push(format!("{} left out: {why}", row.label));
                    row.failed = Some(why);
                }
            }
            bar.inc(1);
        }
        memcpy_gbps.push(memcpy_once(&src, &mut dst));
        match tcp_stream_once(data_bytes, ctx.size) {
            Ok(g) => tcp_gbps.push(g),
            Err(e) => notes.push(format!("bare TCP stream: {e:#}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop((src, dst, _huge_pages));

    drop((unix, tls));
    let mut report = report(ctx, repeats, &rows, &qemu, [&memcpy_gbps, &tcp_gbps], notes);
    same_host(&mut report, ctx, repeats, &rows, &qemu);
    over_tls(&mut report, repeats, &rows);
    let mut table = Table::new(
        format!(
            "Prefetcher bulk settings, interleaved with the default ({}); GB/s, median (min–max) \
             of {repeats}",
            describe(Bulk::default())
        ),
        &["backing", "settings", "GB/s", "default / these"],
    );
    let mut variant_data = Vec::new();
    for (i, row) in rows.iter().enumerate().filter(|(_, r)| r.complete()) {
        for (v, (label, bulk, transport)) in variants.iter().enumerate() {
            let g = &variant_gbps[i][v];
            if g.is_empty() {
                continue;
            }
            let speedup = per_repeat(&row.faultline_gbps, g);
            table.row(vec![
                row.label.clone(),
                label.clone(),
                Summary::of(g).fmt(2),
                format!("{}x", Summary::of(&speedup).fmt(2)),
            ]);
            variant_data.push(json!({
                "backing": row.kind, "label": label, "bulk": bulk,
                "prefetch_transport": transport, "gbps": g,
                "default_over_these": speedup,
            }));
        }
    }
    report.tables.push(table);
    report.data["bulk_default"] = json!(Bulk::default());
    report.data["bulk_variants"] = json!(variant_data);
    Ok(report)
}

/// The same-host transport's table and targets: per backing, TCP, the Unix
/// socket's byte stream and its page file, each against QEMU and the eager
/// copy of the same repeat.
fn same_host(report: &mut ScenarioReport, ctx: &Ctx, repeats: usize, rows: &[Row], qemu: &Qemu) {
    let qemu_gbps = qemu.gbps(ctx.size);
    let mut table = Table::new(
        format!(
            "Same-host transport: the restore above over a Unix socket (GB/s of image bytes; \
             median (min–max) of {repeats}, interleaved with the TCP restores)"
        ),
        &[
            "backing",
            "TCP GB/s",
            "unix:// stream GB/s",
            "unix:// + page file GB/s",
            "page file, 1 stream GB/s (before)",
            "page file / TCP",
            "page file / QEMU",
            "page file / eager",
        ],
    );
    let mut data = Vec::new();
    for row in rows
        .iter()
        .filter(|r| r.complete() && !r.unix_file_gbps.is_empty())
    {
        let over_tcp = per_repeat(&row.unix_file_gbps, &row.faultline_gbps);
        let over_qemu = per_repeat(&row.unix_file_gbps, &qemu_gbps);
        let over_eager = per_repeat(&row.unix_file_gbps, &row.eager_gbps);
        let q = (qemu.not_run.is_none() && !over_qemu.is_empty()).then(|| Summary::of(&over_qemu));
        let e = Summary::of(&over_eager);
        let fmt_or = |v: &[f64]| {
            if v.is_empty() {
                "not run".to_string()
            } else {
                Summary::of(v).fmt(2)
            }
        };
        table.row(vec![
            row.label.clone(),
            Summary::of(&row.faultline_gbps).fmt(2),
            fmt_or(&row.unix_stream_gbps),
            Summary::of(&row.unix_file_gbps).fmt(2),
            fmt_or(&row.unix_file1_gbps),
            format!("{}x", Summary::of(&over_tcp).fmt(2)),
            q.map_or_else(|| "not run".into(), |q| format!("{}x", q.fmt(2))),
            format!("{}x", e.fmt(2)),
        ]);
        report.targets.push(Target {
            name: format!(
                "full restore over unix:// + page file vs QEMU postcopy ({})",
                row.label
            ),
            goal: format!(">= {QEMU_TARGET}x"),
            value: q.map_or_else(
                || "not run".into(),
                |q| format!("{:.2}x ({:.2}–{:.2})", q.median, q.min, q.max),
            ),
            met: q.is_some_and(|q| q.median >= QEMU_TARGET),
        });
        report.targets.push(Target {
            name: format!(
                "full restore over unix:// + page file vs eager local copy ({})",
                row.label
            ),
            goal: format!(">= {EAGER_TARGET}x"),
            value: format!("{:.2}x ({:.2}–{:.2})", e.median, e.min, e.max),
            met: e.median >= EAGER_TARGET,
        });
        data.push(json!({
            "backing": row.kind,
            "tcp_gbps": row.faultline_gbps,
            "unix_stream_gbps": row.unix_stream_gbps,
            "unix_file_gbps": row.unix_file_gbps,
            "unix_file_1_stream_gbps": row.unix_file1_gbps,
            "unix_file_over_tcp": over_tcp,
            "unix_file_over_qemu": over_qemu,
            "unix_file_over_eager": over_eager,
        }));
    }
    report.tables.push(table);
    report.data["same_host"] = json!(data);
}

/// The TLS table: per backing, the restore over TLS against the same
/// repeat's plaintext TCP restore.
fn over_tls(report: &mut ScenarioReport, repeats: usize, rows: &[Row]) {
    let mut table = Table::new(
        format!(
            "Over TLS: the restore above from a server with TLS (rustls; a server certificate, \
             no client certificate or token), GB/s of image bytes; median (min–max) of \
             {repeats}, interleaved with the TCP restores"
        ),
        &["backing", "TCP GB/s", "TLS GB/s", "TLS / TCP"],
    );
    let mut data = Vec::new();
    for row in rows
        .iter()
        .filter(|r| r.complete() && !r.tls_gbps.is_empty())
    {
        let over_tcp = per_repeat(&row.tls_gbps, &row.faultline_gbps);
        table.row(vec![
            row.label.clone(),
            Summary::of(&row.faultline_gbps).fmt(2),
            Summary::of(&row.tls_gbps).fmt(2),
            format!("{}x", Summary::of(&over_tcp).fmt(2)),
        ]);
        data.push(json!({
            "backing": row.kind,
            "tcp_gbps": row.faultline_gbps,
            "tls_gbps": row.tls_gbps,
            "tls_over_tcp": over_tcp,
        }));
    }
    if !data.is_empty() {
        report.tables.push(table);
    }
    report.data["tls"] = json!(data);
}

/// The settings in words.
fn describe(b: Bulk) -> String {
    format!(
        "{} stream(s), {} MiB batches, shmem by {}, hugetlbfs by {}, receive and install {}",
        b.streams,
        b.batch_bytes >> 20,
        if b.shmem_copy { "COPY" } else { "CONTINUE" },
        if b.hugetlb_copy { "COPY" } else { "CONTINUE" },
        if b.overlap { "overlapped" } else { "in turn" }
    )
}

/// The QEMU postcopy baseline's runs, or why it was not run.
#[derive(Debug)]
struct Qemu {
    not_run: Option<String>,
    runs: Vec<qemu::Migration>,
}

impl Qemu {
    /// GB/s of each run (image bytes over the migration's time).
    fn gbps(&self, size: u64) -> Vec<f64> {
        self.runs.iter().map(|m| gbps(size, m.secs)).collect()
    }
}

impl Row {
    fn new(kind: BackingKind, snapshot: Snapshot) -> Self {
        Self {
            label: kind.to_string(),
            kind,
            snapshot,
            strategy: None,
            decision: None,
            faultline_s: Vec::new(),
            faultline_gbps: Vec::new(),
            eager_gbps: Vec::new(),
            ratios: Vec::new(),
            stats: Vec::new(),
            unix_stream_gbps: Vec::new(),
            unix_file_gbps: Vec::new(),
            unix_file1_gbps: Vec::new(),
            tls_gbps: Vec::new(),
            failed: None,
        }
    }

    /// Whether every repeat measured both faultline and the eager copy.
    fn complete(&self) -> bool {
        self.failed.is_none() && !self.ratios.is_empty()
    }
}

/// The report from the measurements.
fn report(
    ctx: &Ctx,
    repeats: usize,
    rows: &[Row],
    qemu: &Qemu,
    [memcpy_gbps, tcp_gbps]: [&[f64]; 2],
    mut notes: Vec<String>,
) -> ScenarioReport {
    let memcpy = Summary::of(memcpy_gbps);
    let tcp = (!tcp_gbps.is_empty()).then(|| Summary::of(tcp_gbps));
    let fmt_tcp = |s: Option<Summary>| s.map_or_else(|| "not run".to_string(), |s| s.fmt(2));
    let qemu_gbps = qemu.gbps(ctx.size);
    let qemu_summary =
        (qemu.not_run.is_none() && !qemu_gbps.is_empty()).then(|| Summary::of(&qemu_gbps));
    let mut table = Table::new(
        format!(
            "Full restore of a {} MiB random-then-zero snapshot (GB/s of image bytes; median (min–max) of {repeats})",
            ctx.size >> 20
        ),
        &[
            "backing",
            "strategy",
            "faultline GB/s",
            "QEMU postcopy GB/s",
            "eager local copy GB/s",
            "memcpy GB/s",
            "bare TCP stream GB/s",
            "faultline / QEMU",
            "faultline / eager",
            "faultline / bare TCP",
        ],
    );
    let mut targets = Vec::new();
    let mut bars = Vec::new();
    let mut data_rows = Vec::new();
    for row in rows.iter().filter(|r| r.complete()) {
        let f = Summary::of(&row.faultline_gbps);
        let e = Summary::of(&row.eager_gbps);
        let r = Summary::of(&row.ratios);
        // faultline over QEMU, repeat by repeat (the two ran in the same
        // repeat, minutes apart at most).
        let over_qemu = per_repeat(&row.faultline_gbps, &qemu_gbps);
        let q = (qemu_summary.is_some() && !over_qemu.is_empty()).then(|| Summary::of(&over_qemu));
        let over_tcp = per_repeat(&row.faultline_gbps, tcp_gbps);
        let over_tcp = (!over_tcp.is_empty()).then(|| Summary::of(&over_tcp));
        table.row(vec![
            row.label.clone(),
            // The region's strategy serves faults; bulk runs may differ.
            match (row.kind, Bulk::default()) {
                (BackingKind::Shmem, b) if b.shmem_copy => "continue (bulk: copy)".into(),
                (BackingKind::Hugetlb, b) if b.hugetlb_copy => "continue (bulk: copy)".into(),
                _ => row.strategy.unwrap_or("?").to_string(),
            },
            f.fmt(2),
            qemu_summary.map_or_else(|| "not run".into(), |s| s.fmt(2)),
            e.fmt(2),
            memcpy.fmt(2),
            fmt_tcp(tcp),
            q.map_or_else(|| "not run".into(), |q| q.fmt(2)),
            r.fmt(2),
            fmt_tcp(over_tcp),
        ]);
        targets.push(Target {
            name: format!("full restore vs QEMU postcopy ({})", row.label),
            goal: format!(">= {QEMU_TARGET}x"),
            value: match (&q, &qemu.not_run) {
                (Some(q), _) => format!("{:.2}x ({:.2}–{:.2})", q.median, q.min, q.max),
                (None, Some(why)) => format!("not run: {why}"),
                (None, None) => "not run".into(),
            },
            met: q.is_some_and(|q| q.median >= QEMU_TARGET),
        });
        targets.push(Target {
            name: format!("full restore vs eager local copy ({})", row.label),
            goal: format!(">= {EAGER_TARGET}x"),
            value: format!("{:.2}x ({:.2}–{:.2})", r.median, r.min, r.max),
            met: r.median >= EAGER_TARGET,
        });
        bars.push(Bar {
            label: format!("{} faultline", row.label),
            value: f,
        });
        bars.push(Bar {
            label: format!("{} eager", row.label),
            value: e,
        });
        let last = row.stats.last().expect("complete rows have stats");
        let s = &last.pages_by_source;
        notes.push(format!(
            "{}: the pager chose {}; last restore: {} pages prefetched, {} zero pages mapped by \
             the pager, {} left to the kernel (it zero-fills them on first touch after \
             completion), {:.0} MiB received, {} faults",
            row.label,
            row.decision.as_deref().unwrap_or("?"),
            s.prefetch,
            s.zero,
            last.pages_total - (s.prefetch + s.demand + s.readahead + s.local + s.eager + s.zero),
            last.bytes_received as f64 / f64::from(1 << 20),
            last.faults
        ));
        data_rows.push(json!({
            "backing": row.kind,
            "label": row.label,
            "strategy": row.strategy,
            "decision": row.decision,
            "snapshot": row.snapshot.id.to_string(),
            "page_size": row.snapshot.manifest.page_size.bytes(),
            "zero_pages": row.snapshot.manifest.zero_map.count_ones(),
            "faultline_s": row.faultline_s,
            "faultline_gbps": row.faultline_gbps,
            "eager_gbps": row.eager_gbps,
            "faultline_over_eager": row.ratios,
            "faultline_over_qemu": over_qemu,
            "faultline_over_bare_tcp": over_tcp,
            "faultline": f,
            "eager": e,
            "ratio": r,
            "stats": row.stats,
        }));
    }
    if let Some(q) = qemu_summary {
        bars.push(Bar {
            label: "QEMU postcopy".into(),
            value: q,
        });
    }
    bars.push(Bar {
        label: "memcpy".into(),
        value: memcpy,
    });
    match (&qemu.not_run, qemu.runs.last()) {
        (Some(why), _) => notes.push(format!("QEMU postcopy not run: {why}")),
        (None, Some(m)) => notes.push(format!(
            "QEMU postcopy ({}, guest-less, -machine none): last migration {:.2} s, {:.0} MiB on \
             the wire, {} MiB before the switch to postcopy, {} zero pages sent as a flag; the \
             destination's memory spot-checked against the image",
            qemu::QEMU,
            m.secs,
            m.transferred as f64 / f64::from(1 << 20),
            m.precopy_bytes >> 20,
            m.zero_pages
        )),
        (None, None) => {}
    }
    notes.push(
        "faultline's time runs from Pager::start (connect, manifest, uffd registration) to \
         completion, with only the background prefetch filling memory over loopback from the \
         in-process server; the server and the pager share the machine's cores. Zero pages are \
         never sent, while the eager copy writes every byte, zeros included."
            .into(),
    );
    let failed: Vec<_> = rows
        .iter()
        .filter_map(|r| {
            r.failed
                .as_ref()
                .map(|w| json!({"backing": r.kind, "why": w}))
        })
        .collect();
    ScenarioReport {
        id: "restore".into(),
        title: "Full restore throughput".into(),
        method: format!(
            "A {} MiB snapshot (its first three quarters random, the rest zeros) restored into \
             fresh memory of each backing with prefetch `all` and nothing touching it, timed \
             from Pager::start to completion; against QEMU's postcopy migration of the same \
             memory between two guest-less QEMU processes over 127.0.0.1 (postcopy from the \
             start, timed from the source's MIGRATION setup event to the destination's \
             completed event), reading the page-cache-warm image file with pread straight into \
             fresh memory of the same backing, a memcpy between two populated 256 MiB \
             buffers, and a bare TCP stream over 127.0.0.1 moving the image's non-zero bytes \
             between two threads (1 MiB writes and reads, nothing else: the ceiling of one \
             stream, counted in the image bytes it stands for). The same restore also runs \
             over a Unix socket (the same-host transport) and from a server with TLS. GB/s are \
             of image bytes (1 GB = 1e9 B); {repeats} interleaved repeats; {SPOT_CHECKS} pages \
             of every restore compared with the image.",
            ctx.size >> 20
        ),
        tables: vec![table],
        targets,
        plots: vec![Plot::Bars {
            file: "restore-throughput.png".into(),
            title: format!("Full restore of {} MiB", ctx.size >> 20),
            y_label: "GB/s".into(),
            bars,
        }],
        notes,
        data: json!({
            "size": ctx.size,
            "repeats": repeats,
            "backings": data_rows,
            "memcpy_gbps": memcpy_gbps,
            "qemu_postcopy": {
                "not_run": qemu.not_run,
                "runs": qemu.runs,
                "gbps": qemu_gbps,
            },
            "memcpy": memcpy,
            "bare_tcp_gbps": tcp_gbps,
            "bare_tcp": tcp,
            "memcpy_bytes": MEMCPY_BYTES * MEMCPY_ROUNDS,
            "failed": failed,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_proto::model::DigestAlgorithm;
    use faultline_proto::{PageBitmap, SnapshotId};

    fn manifest(page_count: u64, zeros: &[u64]) -> Manifest {
        let mut zero_map = PageBitmap::new(page_count);
        for &z in zeros {
            zero_map.set(z);
        }
        Manifest {
            format_version: 1,
            id: SnapshotId::new("t").expect("a valid id"),
            page_size: PageSize::Size4K,
            page_count,
            regions: Vec::new(),
            zero_map,
            digest_algorithm: DigestAlgorithm::Crc32c,
            digests: vec![0; page_count as usize],
            working_sets: Vec::new(),
        }
    }

    /// Spot checks include the asked number of distinct zero pages, stay in
    /// range and are the same for the same seed.
    #[test]
    fn spot_pages_include_zero_pages() {
        let m = manifest(1000, &[3, 10, 500, 999]);
        let pages = spot_pages(&m, 64, 2, 7);
        assert_eq!(pages.len(), 64);
        assert!(pages.iter().all(|&p| p < 1000));
        assert!(pages[..2].iter().all(|&p| m.is_zero(PageIndex(p))));
        assert_ne!(pages[0], pages[1]);
        assert_eq!(pages, spot_pages(&m, 64, 2, 7));
        // Fewer zero pages than asked: all of them, then random pages.
        let few = spot_pages(&manifest(100, &[42]), 8, 4, 1);
        assert_eq!((few.len(), few[0]), (8, 42));
    }
}
