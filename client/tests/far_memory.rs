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

/// A far-memory region on a copy-on-write child of a snapshot, through the library: untouched
/// pages read the snapshot's bytes (verified against its digests), pages written and evicted
/// come back with their new bytes (verified against what was written), and after shutdown
/// another client fetching the volume sees the written pages over the snapshot's.
#[test]
fn copy_on_write_volume_through_the_library() {
    use std::sync::Arc;

    use faultline_client::backing::GuestMemory;
    use faultline_client::pager::far::{Budget, FarPager, FarStore, RemoteStore};
    use faultline_client::remote::{ConnectOptions, Remote};

    if testutil::require_uffd().is_none() {
        return;
    }
    let server = common::Server::start();
    let pages = 512usize;
    let snap = server.import(
        "base",
        PageSize::try_from(common::PAGE as u64).unwrap(),
        common::image_4k(7, pages as u64),
    );
    let volume = SnapshotId::new("child").unwrap();
    server
        .store()
        .create_volume_blocking(CreateVolume {
            name: volume.clone(),
            source: VolumeSource::Snapshot(snap.id.clone()),
        })
        .expect("create the volume");
    let store = RemoteStore::open(&server.url(), &ConnectOptions::default(), volume.clone())
        .expect("open the volume");
    assert_eq!(store.page_count(), pages as u64);
    let memory = GuestMemory::anonymous(pages * common::PAGE).unwrap();
    let far = FarPager::start(memory, Budget::Pages(64), Arc::new(store)).unwrap();
    let mem = far.memory().guest();
    let written = |p: usize| p.is_multiple_of(3);
    let stamp = |p: usize| vec![(p % 251) as u8 + 1; common::PAGE];
    // Write every third page, read every page: eight times the budget, twice over.
    for round in 0..2 {
        let mut page = vec![0u8; common::PAGE];
        for p in 0..pages {
            if round == 0 && written(p) {
                mem.write(p * common::PAGE, &stamp(p)).unwrap();
            }
            mem.read(p * common::PAGE, &mut page).unwrap();
            let want = if written(p) {
                stamp(p)
            } else {
                snap.page(p).to_vec()
            };
            assert!(page == want, "page {p} in round {round}");
        }
    }
    let stats = far.shutdown().unwrap();
    assert!(stats.refaults > 0 && stats.evictions > 0, "{stats:?}");
    assert_eq!(stats.store_errors, 0, "{stats:?}");
    // Another client: the volume's newest bytes.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("child.bin");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let remote = Remote::connect(&server.url()).await.unwrap();
        faultline_client::fetch::fetch_to_file(
            &remote,
            &volume,
            &file,
            faultline_proto::Compression::None,
            |_, _| {},
        )
        .await
        .unwrap();
    });
    let fetched = std::fs::read(&file).unwrap();
    for p in 0..pages {
        let want = if written(p) {
            stamp(p)
        } else {
            snap.page(p).to_vec()
        };
        assert!(
            fetched[p * common::PAGE..(p + 1) * common::PAGE] == want[..],
            "page {p} fetched"
        );
    }
}
