//! Scenario 7: compression on the prefetch path: none vs lz4 vs zstd, for a
//! realistic image (zero runs, text, random pages) and a random one.
//!
//! Two figures per codec: the full restore's throughput through the pager
//! (decode, verify, install included), and the bytes on the wire, counted
//! on a bare Prefetch stream of the same snapshot (the pager counts page
//! bytes after decoding).

use faultline_client::backing::BackingKind;
use faultline_client::remote::Remote;
use faultline_proto::Compression;

use super::report::{Bar, Plot, ratio};
use super::{Content, Ctx, ImageSpec, ScenarioReport, Summary, Table, fresh_memory, full_restore};

/// The codecs compared.
const CODECS: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

/// Batch size of the wire count: the prefetcher's default (1 MiB).
const BATCH_BYTES: u64 = 1 << 20;

fn codec_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Lz4 => "lz4",
        Compression::Zstd => "zstd",
    }
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let size = ctx.pick(128u64 << 20, 512 << 20);
    let repeats = ctx.repeats();
    let mut report = ScenarioReport {
        id: "compression".into(),
        title: "Compression on the prefetch path".into(),
        method: format!(
            "Full restores ({} MiB, anonymous memory, prefetch all, nothing touching) asking the \
             server for each codec; throughput is image bytes over the time to completion, \
             {repeats} repeats interleaved by codec. Bytes on the wire are counted on a bare \
             Prefetch stream of the same snapshot ({} KiB batches); zero pages never travel as \
             data, whatever the codec.",
            size >> 20,
            BATCH_BYTES >> 10
        ),
        ..Default::default()
    };
    let mut table = Table::new(
        "",
        &[
            "image",
            "codec",
            "restore GB/s",
            "vs none",
            "wire MiB",
            "wire / image",
            "wire / non-zero pages",
        ],
    );
    let mut bars = Vec::new();
    let mut data = Vec::new();
    let bar = ctx.bar("compression restores", (2 * CODECS.len() * repeats) as u64);
    for content in [Content::Realistic, Content::Random] {
        let snapshot = ctx.snapshot(ImageSpec {
            size,
            content,
            ..ImageSpec::realistic(size)
        })?;
        let image = match content {
            Content::Realistic => "realistic",
            Content::Random => "random",
            Content::RandomThenZero => "random, then zeros",
        };
        let mut gbps = vec![Vec::new(); CODECS.len()];
        for _ in 0..repeats {
            for (i, codec) in CODECS.iter().enumerate() {
                let memory = fresh_memory(BackingKind::Anonymous, size as usize)?;
                let restored = full_restore(ctx, &snapshot, memory, |c| c.compression = *codec)?;
                let (t, stats) = (restored.elapsed, restored.stats);
                anyhow::ensure!(
                    stats.pages_total > 0 && stats.completed_s.is_some(),
                    "the {image} restore with {} did not complete",
                    codec_name(*codec)
                );
                gbps[i].push(size as f64 / t.as_secs_f64() / 1e9);
                bar.inc(1);
            }
        }
        let nonzero = snapshot.manifest.page_count
            - (0..snapshot.manifest.page_count)
                .filter(|&p| snapshot.manifest.is_zero(faultline_proto::PageIndex(p)))
                .count() as u64;
        let nonzero_bytes = nonzero * snapshot.manifest.page_size.bytes();
        let none = Summary::of(&gbps[0]);
        for (i, codec) in CODECS.iter().enumerate() {
            let url = ctx.url();
            let id = snapshot.id.to_string();
            let (_, wire, _) = ctx.runtime().block_on(async {
                let remote = Remote::connect(&url).await?;
                crate::wire::prefetch_once(&remote, &id, *codec, BATCH_BYTES).await
            })?;
            let s = Summary::of(&gbps[i]);
            table.row(vec![
                image.into(),
                codec_name(*codec).into(),
                s.fmt(2),
                ratio(s.median, none.median),
                format!("{:.1}", wire as f64 / f64::from(1 << 20)),
                format!("{:.0}%", 100.0 * wire as f64 / size as f64),
                format!("{:.0}%", 100.0 * wire as f64 / nonzero_bytes.max(1) as f64),
            ]);
            bars.push(Bar {
                label: format!("{image} {}", codec_name(*codec)),
                value: s,
            });
            data.push(serde_json::json!({
                "image": image,
                "codec": codec_name(*codec),
                "restore_gbps": s,
                "wire_bytes": wire,
                "image_bytes": size,
                "nonzero_page_bytes": nonzero_bytes,
            }));
        }
    }
    bar.finish_and_clear();
    report.tables.push(table);
    report.plots.push(Plot::Bars {
        file: "compression-throughput.png".into(),
        title: "Full restore throughput by codec".into(),
        y_label: "GB/s".into(),
        bars,
    });
    report.notes.push(
        "On loopback the link is faster than either codec, so compression can only cost \
         throughput here; it pays where the network, not the CPU, is the limit (divide the \
         wire bytes by the link's bandwidth to see where). faultline therefore sends \
         uncompressed unless a client asks."
            .into(),
    );
    report.data = serde_json::json!({ "size": size, "results": data });
    Ok(report)
}
