//! Measures what the object store's chunk size costs, against a real Garage
//! on 127.0.0.1 (built by `scripts/garage.sh install`), to choose
//! `store::object::CHUNK_BYTES` (docs/store.md has the numbers):
//!
//! - cold restore: GET every chunk of a 128 MiB image, 4 at a time (what one
//!   server does for the first restore of a snapshot), in MB/s;
//! - cold fault: the time to GET one chunk, which a demand fault on a chunk
//!   not yet cached waits for (median of 16);
//! - dedup: the bytes a child snapshot must upload when 0.5% of its base's
//!   pages changed, as a share of the image: scattered single pages (the
//!   worst case), and runs of 16 pages (64 KiB) at random places (closer to
//!   a VM that ran briefly after its template was taken: heap, stacks, page
//!   tables, written in runs).
//!
//! Each cold restore is timed three times; the best is shown.
//!
//! `cargo run --release -p faultline-server --example chunk_size`

use std::time::Instant;

use bytes::Bytes;
use faultline_server::garage::Garage;
use faultline_server::store::object::ObjectStoreOptions;
use object_store::path::Path;

const IMAGE: usize = 128 << 20;
const PAGE: usize = 4096;
const SIZES: [usize; 6] = [256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20];
const CONCURRENCY: usize = 4;

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = vec![0u8; n];
    for w in out.chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let garage = Garage::start()?;
    let store = garage.store("bench", ObjectStoreOptions::default())?;
    let (io, _) = store.io();
    let image = Bytes::from(random_bytes(IMAGE, 42));
    // Changed pages of the child: 0.5% of them, spread by a fixed stride.
    let pages = IMAGE / PAGE;
    let scattered: Vec<usize> = (0..pages / 200).map(|i| (i * 7919) % pages).collect();
    let starts = random_bytes(pages / 200 / 16 * 8, 7);
    let runs: Vec<usize> = starts
        .chunks(8)
        .flat_map(|c| {
            let at = u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize % (pages - 16);
            at..at + 16
        })
        .collect();

    println!(
        "| chunk | cold restore MB/s | cold fault ms (p50) | child upload: scattered | in runs |"
    );
    println!("|---|---|---|---|---|");
    for size in SIZES {
        let keys: Vec<Path> = (0..IMAGE / size)
            .map(|i| Path::from(format!("bench/{size}/{i}")))
            .collect();
        let puts = futures::future::join_all(keys.iter().enumerate().map(|(i, k)| {
            let data = image.slice(i * size..(i + 1) * size);
            async move { io.put(k, data, false).await }
        }));
        for r in puts.await {
            r?;
        }
        let mut mbps: f64 = 0.0;
        for _ in 0..3 {
            let started = Instant::now();
            for group in keys.chunks(CONCURRENCY) {
                for r in futures::future::join_all(group.iter().map(|k| io.get(k))).await {
                    r?;
                }
            }
            mbps = mbps.max(IMAGE as f64 / started.elapsed().as_secs_f64() / 1e6);
        }
        let mut lat = Vec::new();
        for k in keys.iter().take(16) {
            let t = Instant::now();
            io.get(k).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        let share = |changed: &[usize]| {
            let mut touched: Vec<usize> = changed.iter().map(|p| p * PAGE / size).collect();
            touched.sort_unstable();
            touched.dedup();
            100.0 * (touched.len() * size) as f64 / IMAGE as f64
        };
        println!(
            "| {} KiB | {mbps:.0} | {:.2} | {:.1}% | {:.1}% |",
            size >> 10,
            lat[lat.len() / 2],
            share(&scattered),
            share(&runs)
        );
    }
    Ok(())
}
