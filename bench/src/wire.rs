//! Prefetch throughput over loopback, by codec, batch size and HTTP/2
//! window: the measurements behind the protocol's defaults
//! (docs/protocol.md).
//!
//! Server and client run in this one process on 127.0.0.1, as a pager and a
//! server on one host would; the client decodes and verifies every page, as
//! a pager does, so the figures include what compression costs on receive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use faultline_client::remote::{ConnectOptions, Remote, Transport, decode_batch};
use faultline_proto::{Compression, PageSize, SnapshotId, pb};
use faultline_server::store::SnapshotStore;
use faultline_server::{LocalStore, import::import_file};
use futures::StreamExt;

/// One configuration measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WireResult {
    /// "realistic" (zero, text and random pages) or "random".
    pub image: String,
    /// Codec.
    pub compression: String,
    /// Transport label.
    pub transport: String,
    /// Batch bytes asked for.
    pub batch_bytes: u64,
    /// Median throughput of page bytes (after decompression), GB/s.
    pub gbps_median: f64,
    /// Lowest and highest of the repeats, GB/s.
    pub gbps_min: f64,
    /// See `gbps_min`.
    pub gbps_max: f64,
    /// Bytes of page data on the wire over bytes of non-zero pages.
    pub wire_ratio: f64,
}

/// Settings for [`run`].
#[derive(Clone, Debug)]
pub struct WireConfig {
    /// Image size in bytes.
    pub size: u64,
    /// Repeats per configuration.
    pub repeats: usize,
}

/// The transports compared.
fn transports() -> Vec<(&'static str, Transport)> {
    vec![
        ("faultline", Transport::default()),
        (
            "hyper-default",
            Transport {
                stream_window: None,
                connection_window: None,
                max_frame: None,
            },
        ),
        (
            "16k-frames",
            Transport {
                max_frame: None,
                ..Transport::default()
            },
        ),
        (
            "h2-spec-64k",
            Transport {
                stream_window: Some(65_535),
                connection_window: Some(65_535),
                max_frame: Some(16_384),
            },
        ),
    ]
}

/// Streams the whole snapshot once, decoding and verifying every page;
/// returns (page bytes, wire bytes, time).
pub async fn prefetch_once(
    remote: &Remote,
    name: &str,
    compression: Compression,
    batch_bytes: u64,
) -> anyhow::Result<(u64, u64, Duration)> {
    let id = SnapshotId::new(name)?;
    let manifest = remote.manifest(&id).await?;
    let started = Instant::now();
    let mut stream = remote
        .prefetch(pb::PrefetchRequest {
            snapshot: name.into(),
            compression: compression.into(),
            max_batch_bytes: batch_bytes,
            ..Default::default()
        })
        .await?;
    let (mut bytes, mut wire) = (0, 0);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        wire += batch.runs.iter().map(|r| r.data.len() as u64).sum::<u64>();
        let batch = decode_batch(batch, &manifest)?;
        for run in &batch.runs {
            for (p, data) in run.pages(manifest.page_size) {
                anyhow::ensure!(manifest.verify(p, &data), "page {} corrupt", p.0);
            }
            bytes += run.data.len() as u64;
        }
    }
    Ok((bytes, wire, started.elapsed()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs every configuration and returns the results.
pub async fn run(
    cfg: &WireConfig,
    mut log: impl FnMut(&WireResult),
) -> anyhow::Result<Vec<WireResult>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(LocalStore::new(dir.path().join("store"))?);
    for (name, write) in [
        (
            "realistic",
            crate::image::write_image as fn(&std::path::Path, u64, u64) -> std::io::Result<()>,
        ),
        ("random", crate::image::write_random_image),
    ] {
        let file = dir.path().join(name);
        write(&file, cfg.size, 1)?;
        import_file(
            &*store,
            SnapshotId::new(name)?,
            PageSize::Size4K,
            &[],
            &file,
            |_| {},
        )
        .with_context(|| format!("importing the {name} image"))?;
        std::fs::remove_file(&file)?;
    }
    let server =
        faultline_server::spawn("127.0.0.1:0".parse()?, store as Arc<dyn SnapshotStore>).await?;
    let url = server.url();

    let mut plan: Vec<(&str, Compression, &str, Transport, u64)> = Vec::new();
    for image in ["realistic", "random"] {
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            plan.push((image, codec, "faultline", Transport::default(), 1 << 20));
        }
    }
    for (label, t) in transports().into_iter().skip(1) {
        plan.push(("realistic", Compression::None, label, t, 1 << 20));
    }
    for batch in [256 << 10, 4 << 20] {
        plan.push((
            "realistic",
            Compression::None,
            "faultline",
            Transport::default(),
            batch,
        ));
    }

    let mut results = Vec::new();
    for (image, codec, label, transport, batch) in plan {
        let remote =
            Remote::connect_with(&url, &ConnectOptions::default().with_transport(transport))
                .await?;
        // Warm-up: page cache and connection.
        prefetch_once(&remote, image, codec, batch).await?;
        let mut gbps = Vec::new();
        let mut ratio = 0.0;
        for _ in 0..cfg.repeats {
            let (bytes, wire, t) = prefetch_once(&remote, image, codec, batch).await?;
            gbps.push(bytes as f64 / t.as_secs_f64() / 1e9);
            ratio = wire as f64 / bytes as f64;
        }
        let r = WireResult {
            image: image.into(),
            compression: format!("{codec:?}").to_lowercase(),
            transport: label.into(),
            batch_bytes: batch,
            gbps_min: gbps.iter().copied().fold(f64::INFINITY, f64::min),
            gbps_max: gbps.iter().copied().fold(0.0, f64::max),
            gbps_median: median(&mut gbps),
            wire_ratio: ratio,
        };
        log(&r);
        results.push(r);
    }
    server.shutdown().await?;
    Ok(results)
}
