//! Far memory end to end: the `faultline` binary writing a file through a region larger than
//! its budget into a volume on a real server (in-process on 127.0.0.1), and another `faultline`
//! process fetching the volume back.

mod common;

use std::process::Command;

use faultline_client::testutil;
use faultline_proto::{CreateVolume, PageSize, SnapshotId, VolumeSource};

/// Pages of the file: 4 MiB, four times the budget.
const PAGES: usize = 1024;
/// The budget given to `faultline restore`.
const BUDGET: &str = "1M";

/// A file of `PAGES` pages: distinct bytes per page, with every seventh page zeros (which the
/// server stores as holes).
fn file_image() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut image = vec![0u8; PAGES * common::PAGE];
    for (i, page) in image.chunks_mut(common::PAGE).enumerate() {
        if i % 7 == 3 {
            continue;
        }
        for w in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
    }
    image
}

/// Runs the `faultline` binary with `args`, failing the test with its output if it fails.
fn faultline(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(args)
        .output()
        .expect("run faultline");
    assert!(out.status.success(), "faultline {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Writes FILE through far memory of `backing` and fetches it back from another process.
fn write_through_and_fetch(backing: &str) {
    if testutil::require_uffd().is_none() {
        return;
    }
    let server = common::Server::start();
    let name = format!("far-{backing}");
    server
        .store()
        .create_volume_blocking(CreateVolume {
            name: SnapshotId::new(name.clone()).unwrap(),
            source: VolumeSource::Empty {
                page_size: PageSize::try_from(common::PAGE as u64).unwrap(),
                size: (PAGES * common::PAGE) as u64,
            },
        })
        .expect("create the volume");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    let image = file_image();
    std::fs::write(&file, &image).unwrap();
    let touch = format!("write-from:{}", file.display());
    let url = server.url();
    let summary = faultline(&[
        "restore",
        "--server",
        &url,
        "--volume",
        &name,
        "--budget",
        BUDGET,
        "--backing",
        backing,
        "--touch",
        &touch,
        "--threads",
        "4",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).expect("json");
    let stats = &summary["stats"];
    let num = |k: &str| {
        stats[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    assert_eq!(
        summary["pages_written"].as_u64(),
        Some(PAGES as u64),
        "{summary}"
    );
    assert_eq!(num("budget_pages"), 256, "{summary}");
    // Three quarters of the pages cannot stay: they were evicted, written back first.
    assert!(num("evictions") >= (PAGES - 256) as u64, "{summary}");
    assert!(num("writeback_pages") >= PAGES as u64, "{summary}");
    assert_eq!(num("dirty_pages"), 0, "{summary}");
    let out = dir.path().join("fetched.bin");
    faultline(&[
        "fetch",
        "--server",
        &url,
        "--volume",
        &name,
        "--out",
        out.to_str().unwrap(),
    ]);
    let fetched = std::fs::read(&out).unwrap();
    assert_eq!(fetched.len(), image.len());
    if let Some(p) = (0..PAGES).find(|&p| {
        let r = p * common::PAGE..(p + 1) * common::PAGE;
        fetched[r.clone()] != image[r]
    }) {
        panic!("page {p} of the fetched volume differs from the file");
    }
}

/// `faultline restore --volume V --budget 1M --touch write-from:FILE` on anonymous memory
/// writes a 4 MiB FILE through the budget (evicting and writing back), flushes, and
/// `faultline fetch --volume V` from another process returns FILE byte for byte.
#[test]
fn anonymous_far_memory_round_trips_a_file() {
    write_through_and_fetch("anon");
}

/// The same on shmem memory (evicted pages are punched out of the memfd).
#[test]
fn shmem_far_memory_round_trips_a_file() {
    write_through_and_fetch("shmem");
}
