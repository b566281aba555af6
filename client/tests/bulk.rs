//! The prefetcher's bulk path (parallel streams, batch sizes, `UFFDIO_COPY`
//! on shmem) end to end: real userfaultfd on real memory of each backing
//! type, from an in-process server on 127.0.0.1, every page checked byte for
//! byte against the image while threads fault on it.

mod common;

use common::{
    Mem, Rng, Server, Snapshot, check_all, complete, config, image_2m, image_4k, memory, start,
    touch_and_check,
};
use faultline_client::backing::BackingKind;
use faultline_client::pager::{Bulk, PrefetchPolicy};
use faultline_proto::PageSize;

/// 4 KiB pages in the 4 KiB images: 16 MiB.
const PAGES: u64 = 4096;
/// Huge pages in the hugetlb image: 32 MiB.
const HUGE_PAGES: usize = 16;

/// The settings tried: the old single stream with the server's batches and
/// CONTINUE, many small streams with COPY and receive and install
/// overlapped, and the defaults.
fn settings() -> [Bulk; 3] {
    [
        Bulk {
            streams: 1,
            page_file_streams: 1,
            batch_bytes: 0,
            shmem_copy: false,
            hugetlb_copy: false,
            overlap: false,
        },
        Bulk {
            streams: 4,
            page_file_streams: 4,
            batch_bytes: 64 << 10,
            shmem_copy: true,
            hugetlb_copy: true,
            overlap: true,
        },
        Bulk::default(),
    ]
}

fn snapshot_for(server: &Server, kind: BackingKind) -> Snapshot {
    match kind {
        BackingKind::Hugetlb => {
            server.import("huge", PageSize::Size2M, image_2m(5, HUGE_PAGES, &[3, 9]))
        }
        _ => server.import("small", PageSize::Size4K, image_4k(11, PAGES)),
    }
}

/// Prefetch of everything with `bulk`, racing 3 threads faulting random
/// pages: every page right, each page with content received once.
fn prefetch_with(kind: BackingKind, bulk: Bulk) {
    let server = Server::start();
    let snap = snapshot_for(&server, kind);
    let Some((mem, _huge_pages)) = memory(kind, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.bulk = bulk;
    let pager = start(cfg, mem);
    let mut rng = Rng::new(3);
    let orders = (0..3)
        .map(|_| (0..200).map(|_| rng.below(snap.pages())).collect())
        .collect();
    let bad = touch_and_check(Mem::of(&pager, 0), &snap, orders);
    assert!(bad.is_empty(), "{kind}, {bulk:?}: pages differ: {bad:?}");
    let stats = complete(&pager);
    let p = stats.pages_by_source;
    let data = snap.data_pages().len() as u64;
    assert_eq!(
        p.demand + p.readahead + p.prefetch,
        data,
        "{bulk:?}: {stats:#?}"
    );
    assert_eq!(
        stats.bytes_received,
        data * snap.page_size as u64,
        "{bulk:?}: {stats:#?}"
    );
    assert_eq!(stats.corrupt_pages + stats.poisoned_pages, 0, "{stats:#?}");
    check_all(Mem::of(&pager, 0), &snap, 2);
}

/// Anonymous memory: every bulk setting restores every page right under faults.
#[test]
fn anon_bulk_settings_restore_every_page() {
    for bulk in settings() {
        prefetch_with(BackingKind::Anonymous, bulk);
    }
}

/// shmem (COPY or CONTINUE for bulk runs): every bulk setting restores every page right under faults.
#[test]
fn shmem_bulk_settings_restore_every_page() {
    for bulk in settings() {
        prefetch_with(BackingKind::Shmem, bulk);
    }
}

/// hugetlbfs (2 MiB pages): every bulk setting restores every page right under faults.
#[test]
fn hugetlb_bulk_settings_restore_every_page() {
    for bulk in settings() {
        prefetch_with(BackingKind::Hugetlb, bulk);
    }
}

/// shmem pages the page cache already holds (written through another
/// mapping before the pager started) get the snapshot's bytes from the COPY
/// bulk path too: COPY answers EEXIST there, and the page goes the CONTINUE
/// way instead of being taken for installed.
#[test]
fn shmem_bulk_copy_overwrites_cached_pages() {
    let server = Server::start();
    let snap = server.import("small", PageSize::Size4K, image_4k(17, PAGES));
    let Some((mem, _)) = memory(BackingKind::Shmem, snap.image.len()) else {
        return;
    };
    let stale: Vec<usize> = snap.data_pages().into_iter().step_by(97).collect();
    let view = mem.fill_view().expect("shmem memory has a fill view");
    for &p in &stale {
        view.write(p * 4096, &[0xee; 4096])
            .expect("writing the fill view");
    }
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.bulk = Bulk {
        shmem_copy: true,
        ..Bulk::default()
    };
    let pager = start(cfg, mem);
    let stats = complete(&pager);
    assert_eq!(stats.faults, 0, "{stats:#?}");
    check_all(Mem::of(&pager, 0), &snap, 2);
}
