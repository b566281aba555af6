//! One snapshot for every backing: a snapshot of 4 KiB pages restored into
//! 2 MiB hugetlbfs memory (issue 13). The pager claims, fetches and installs
//! whole huge pages (512 snapshot pages, zero pages included), each 4 KiB
//! page verified against its digest. Real hugetlbfs memfd, real userfaultfd,
//! a real server on 127.0.0.1.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    Mem, PAGE, Rng, Server, Snapshot, assert_touched_right, block_on, check_all, complete, config,
    image_4k, memory, runtime, settle, start, touch_and_check,
};
use faultline_client::backing::{BackingKind, GuestMemory, HUGE_PAGE_SIZE};
use faultline_client::pager::{Bulk, CORRUPT_RETRIES, FaultError, OnFailure, PrefetchPolicy};
use faultline_client::strategy::{Mode, Strategy};
use faultline_client::testutil;
use faultline_proto::PageSize;

/// Snapshot pages per huge page.
const UNIT: usize = HUGE_PAGE_SIZE / PAGE;

/// Huge pages of the test image.
const UNITS: usize = 8;

/// The all-zero huge page of the image (needs no data).
const ZERO_UNIT: usize = 1;

/// The huge page whose first half is zero (a partly zero unit: its zeros
/// are filled in locally).
const HALF_ZERO_UNIT: usize = 3;

/// A 16 MiB image of 4 KiB pages: synthetic content (about 40% zero pages,
/// in runs of 8), one huge page all zero, one half zero.
fn mixed_image(seed: u64) -> Vec<u8> {
    let mut image = image_4k(seed, (UNITS * UNIT) as u64);
    let huge = HUGE_PAGE_SIZE;
    image[ZERO_UNIT * huge..(ZERO_UNIT + 1) * huge].fill(0);
    image[HALF_ZERO_UNIT * huge..HALF_ZERO_UNIT * huge + huge / 2].fill(0);
    image
}

fn import(server: &Server) -> Snapshot {
    server.import("img", PageSize::Size4K, mixed_image(13))
}

/// Pages of the image in units that have data (every page of them, zero
/// ones included, is installed with its huge page).
fn pages_of_data_units(snap: &Snapshot) -> u64 {
    (0..UNITS)
        .filter(|&u| (u * UNIT..(u + 1) * UNIT).any(|p| !snap.is_zero(p)))
        .count() as u64
        * UNIT as u64
}

/// Demand faults in random order from two threads fill every page right, one
/// fetch per huge page, by CONTINUE (the default) and by COPY (forced); the
/// all-zero huge page travels as nothing.
#[test]
fn demand_faults_in_random_order() {
    let server = Server::start();
    let snap = import(&server);
    for (mode, strategy) in [
        (Mode::Auto, Strategy::Continue),
        (Mode::Copy, Strategy::Copy { zeropage: false }),
    ] {
        let Some((mem, _huge)) = memory(BackingKind::Hugetlb, snap.image.len()) else {
            return;
        };
        let mut cfg = config(&server, &snap, PrefetchPolicy::None);
        cfg.mode = mode;
        let pager = start(cfg, mem);
        assert_eq!(pager.decision(0).strategy(), strategy);
        let order = Rng::new(7).shuffle((0..snap.pages()).collect::<Vec<_>>());
        let (a, b) = order.split_at(order.len() / 2);
        let bad = touch_and_check(Mem::of(&pager, 0), &snap, vec![a.to_vec(), b.to_vec()]);
        assert!(
            bad.is_empty(),
            "{mode:?}: pages differ from the image: {bad:?}"
        );
        let s = complete(&pager);
        let p = s.pages_by_source;
        // One demand fault per huge page with data (its other pages came
        // with it).
        assert_eq!(p.demand, (UNITS - 1) as u64, "{s:#?}");
        assert_eq!(
            s.bytes_received,
            snap.data_pages().len() as u64 * PAGE as u64,
            "only pages with content travel: {s:#?}"
        );
        // Every page of the units with data, plus the zero unit mapped on
        // fault.
        assert_eq!(
            p.demand + p.readahead + p.zero,
            pages_of_data_units(&snap) + UNIT as u64,
            "{s:#?}"
        );
        assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
    }
}

/// Prefetch all restores every page, whole huge pages, with nothing touching
/// the memory: the default settings; receive and install overlapped; and 3
/// streams (parts split inside huge pages) of 64 KiB batches installed by
/// COPY. The zero huge page is left to the kernel.
#[test]
fn prefetch_all_restores_every_page() {
    let server = Server::start();
    let snap = import(&server);
    let settings = [
        Bulk::default(),
        Bulk {
            overlap: true,
            ..Bulk::default()
        },
        Bulk {
            streams: 3,
            batch_bytes: 64 << 10,
            hugetlb_copy: true,
            ..Bulk::default()
        },
    ];
    for bulk in settings {
        let Some((mem, _huge)) = memory(BackingKind::Hugetlb, snap.image.len()) else {
            return;
        };
        let mut cfg = config(&server, &snap, PrefetchPolicy::All);
        cfg.bulk = bulk;
        let pager = start(cfg, mem);
        let s = complete(&pager);
        assert_eq!(s.faults, 0, "{s:#?}");
        let p = s.pages_by_source;
        assert_eq!(p.prefetch + p.zero, pages_of_data_units(&snap), "{s:#?}");
        assert_eq!(
            s.bytes_received,
            snap.data_pages().len() as u64 * PAGE as u64,
            "{s:#?}"
        );
        // Completed and unregistered: every page reads right (the zero huge
        // page is zero-filled by the kernel).
        check_all(Mem::of(&pager, 0), &snap, 2);
    }
}

/// Prefetch of the same snapshot racing demand faults in random order: every
/// page right, nothing installed twice.
#[test]
fn prefetch_racing_faults() {
    let server = Server::start();
    let snap = import(&server);
    let Some((mem, _huge)) = memory(BackingKind::Hugetlb, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::All), mem);
    let order = Rng::new(3).shuffle((0..snap.pages()).collect::<Vec<_>>());
    assert_touched_right(Mem::of(&pager, 0), &snap, order);
    let s = complete(&pager);
    assert_eq!(
        s.bytes_received,
        snap.data_pages().len() as u64 * PAGE as u64,
        "each page with content installed once: {s:#?}"
    );
    assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
}

/// A working set recorded on 4 KiB memory (scattered pages, in touch order)
/// replayed into hugetlbfs memory: the prefetcher assembles the huge pages
/// the set touches, streams again those whose pages came too far apart, and
/// the touched pages then need no fault.
#[test]
fn working_set_replay() {
    let server = Server::start();
    let snap = import(&server);
    // Pages scattered over every unit with data, interleaved across units
    // (more units than the prefetcher keeps half-assembled at once).
    let touched: Vec<usize> = (0..40)
        .map(|i| (i % UNITS) * UNIT + (i * 37) % UNIT)
        .filter(|&p| p / UNIT != ZERO_UNIT && !snap.is_zero(p))
        .collect();
    let Some((anon, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.record = true;
    cfg.readahead = faultline_client::pager::NO_READAHEAD;
    let recorder = start(cfg, anon);
    assert_touched_right(Mem::of(&recorder, 0), &snap, touched.clone());
    let stored = recorder
        .record_working_set()
        .expect("upload the working set");
    assert_eq!(stored, touched.len() as u64);
    drop(recorder.into_inner());

    let Some((mem, _huge)) = memory(BackingKind::Hugetlb, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::WorkingSet), mem);
    let units: Vec<usize> = {
        let mut u: Vec<usize> = touched.iter().map(|p| p / UNIT).collect();
        u.sort_unstable();
        u.dedup();
        u
    };
    let wanted: u64 = units.len() as u64 * UNIT as u64;
    let s = settle(&pager, "replaying the working set", |s| {
        s.pages_by_source.prefetch + s.pages_by_source.zero >= wanted
    });
    assert_eq!(s.faults, 0, "{s:#?}");
    assert_touched_right(Mem::of(&pager, 0), &snap, touched);
    let after = pager.stats();
    assert_eq!(
        after.faults, 0,
        "the working set's pages were there: {after:#?}"
    );
    // The rest on demand, all right.
    check_all(Mem::of(&pager, 0), &snap, 2);
    complete(&pager);
}

/// A working set recorded on hugetlbfs memory names whole huge pages (the
/// units faulted), and its replay prefetches them before any fault.
#[test]
fn working_set_recorded_on_hugetlb() {
    let server = Server::start();
    let snap = import(&server);
    // Huge pages for both memories at once: the recorder's come back to the
    // pool only a moment after it is dropped.
    let Some((mem, _huge)) = memory(BackingKind::Hugetlb, 2 * snap.image.len()) else {
        return;
    };
    drop(mem);
    let huge_memory = || GuestMemory::new(BackingKind::Hugetlb, snap.image.len()).expect("hugetlb");
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.record = true;
    let recorder = start(cfg, huge_memory());
    let touched = vec![5 * UNIT + 9, 2 * UNIT + 100, HALF_ZERO_UNIT * UNIT + 400];
    assert_touched_right(Mem::of(&recorder, 0), &snap, touched.clone());
    let stored = recorder
        .record_working_set()
        .expect("upload the working set");
    assert_eq!(stored, 3 * UNIT as u64, "whole huge pages");
    drop(recorder.into_inner());

    let pager = start(
        config(&server, &snap, PrefetchPolicy::WorkingSet),
        huge_memory(),
    );
    let s = settle(&pager, "replaying", |s| {
        s.pages_by_source.prefetch + s.pages_by_source.zero >= 3 * UNIT as u64
    });
    assert_eq!(s.faults, 0, "{s:#?}");
    assert_touched_right(Mem::of(&pager, 0), &snap, touched);
    assert_eq!(pager.stats().faults, 0);
    check_all(Mem::of(&pager, 0), &snap, 1);
}

/// The snapshot's first page with content in the half-zero huge page's
/// second half, and the server's snapshot with that page corrupted on disk.
fn corrupt_server() -> (Server, Snapshot, usize) {
    let server = Server::start();
    let snap = import(&server);
    let bad = (HALF_ZERO_UNIT * UNIT + UNIT / 2..(HALF_ZERO_UNIT + 1) * UNIT)
        .find(|&p| !snap.is_zero(p))
        .expect("a page with content");
    server.corrupt_page(&snap, bad);
    (server, snap, bad)
}

/// A page failing its digest keeps its whole huge page from being installed;
/// policy poison then poisons that huge page (SIGBUS on touch), every other
/// huge page is right.
#[test]
fn corrupt_page_poisons_its_huge_page() {
    let (server, snap, bad) = corrupt_server();
    let Some((mem, _huge)) = memory(BackingKind::Hugetlb, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Poison;
    cfg.deadline = Duration::from_secs(2);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let unit = bad / UNIT;
    // A zero page of the same huge page, fed through `Pager::fault` so that
    // nothing in this process touches the poisoned memory.
    let rt = runtime();
    let r = block_on(
        &rt,
        "Pager::fault in the corrupt huge page",
        pager.fault(mem.base() + unit * HUGE_PAGE_SIZE, PAGE),
    );
    assert!(matches!(r, Err(FaultError::Poisoned(_))), "{r:?}");
    let s = pager.stats();
    assert_eq!(s.corrupt_pages, u64::from(CORRUPT_RETRIES) + 1, "{s:#?}");
    assert_eq!(s.poisoned_pages, UNIT as u64, "the whole huge page: {s:#?}");
    assert_eq!(s.bytes_received, 0, "nothing of it installed: {s:#?}");
    let good: Vec<usize> = (0..snap.pages()).filter(|&p| p / UNIT != unit).collect();
    assert_touched_right(mem, &snap, good);
}

/// Prefetch never installs a huge page with a corrupt page: every other one
/// is installed, that one stays missing (not complete).
#[test]
fn corrupt_page_is_skipped_by_prefetch() {
    let (server, snap, bad) = corrupt_server();
    let Some((mem, _huge)) = memory(BackingKind::Hugetlb, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.on_failure = OnFailure::Poison;
    let pager = start(cfg, mem);
    let others = pages_of_data_units(&snap) - UNIT as u64;
    let s = settle(&pager, "prefetching", |s| {
        s.pages_by_source.prefetch + s.pages_by_source.zero >= others
    });
    assert_eq!(s.pages_by_source.prefetch + s.pages_by_source.zero, others);
    assert!(s.corrupt_pages >= 1, "{s:#?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!pager.is_complete());
    assert_eq!(pager.stats().faults, 0);
    let unit = bad / UNIT;
    let good: Vec<usize> = (0..snap.pages()).filter(|&p| p / UNIT != unit).collect();
    assert_touched_right(Mem::of(&pager, 0), &snap, good);
    // Fed through `Pager::fault`: the demand link fails it too, and poisons it.
    let mem = Mem::of(&pager, 0);
    let rt = runtime();
    let r = block_on(
        &rt,
        "Pager::fault on the corrupt page",
        pager.fault(mem.base() + bad * PAGE, PAGE),
    );
    assert!(matches!(r, Err(FaultError::Poisoned(_))), "{r:?}");
}

/// A 4 KiB snapshot whose size is not a multiple of 2 MiB is refused for
/// hugetlbfs memory with a message saying what to do.
#[test]
fn partial_last_huge_page_is_refused() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(5, (UNIT + 8) as u64));
    let Some((mem, _huge)) = memory(BackingKind::Hugetlb, 2 * HUGE_PAGE_SIZE) else {
        return;
    };
    let err = faultline_client::pager::Pager::start(
        config(&server, &snap, PrefetchPolicy::None),
        vec![faultline_client::pager::Region {
            memory: mem,
            snapshot_offset: 0,
        }],
    )
    .expect_err("a region past the snapshot's end");
    let msg = err.to_string();
    assert!(msg.contains("multiple of 2097152"), "{msg}");
}

/// `faultline restore --backing hugetlb` of a 4 KiB snapshot touches and
/// verifies every page (a child process, prefetch all).
#[test]
fn cli_restores_a_4k_snapshot_into_hugetlb() {
    if testutil::require_uffd().is_none() {
        return;
    }
    let server = Server::start();
    let snap = import(&server);
    let Some(_huge) = testutil::reserve_huge_pages(UNITS) else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args([
            "restore",
            "--server",
            &server.url(),
            "--snapshot",
            snap.id.as_str(),
            "--backing",
            "hugetlb",
            "--touch",
            "all",
            "--verify",
            "--json",
        ])
        .output()
        .expect("run faultline");
    assert!(out.status.success(), "faultline restore: {out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let text = json.to_string();
    assert_eq!(json["backing"], "hugetlb", "{text}");
    assert_eq!(json["verified"], true, "{text}");
    assert_eq!(json["pages_touched"], snap.pages() as u64, "{text}");
    assert_eq!(
        json["bytes_received"],
        snap.data_pages().len() as u64 * PAGE as u64,
        "{text}"
    );
}

/// The reverse: a snapshot of 2 MiB pages restores into 4 KiB memory (anon,
/// shmem), each snapshot page installed as 512 memory pages, on demand in
/// random order and by prefetch.
#[test]
fn a_2m_snapshot_restores_into_4k_memory() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size2M, common::image_2m(17, 4, &[1]));
    for kind in [BackingKind::Anonymous, BackingKind::Shmem] {
        for prefetch in [PrefetchPolicy::None, PrefetchPolicy::All] {
            let Some((mem, _)) = memory(kind, snap.image.len()) else {
                return;
            };
            let pager = start(config(&server, &snap, prefetch), mem);
            // Every 4 KiB page, in random order, checked against the image.
            let pages = snap.image.len() / PAGE;
            let order = Rng::new(5).shuffle((0..pages).collect::<Vec<_>>());
            let m = Mem::of(&pager, 0);
            let mut buf = vec![0u8; PAGE];
            for p in order {
                m.read(p * PAGE, &mut buf);
                assert_eq!(
                    buf[..],
                    snap.image[p * PAGE..(p + 1) * PAGE],
                    "{kind} {prefetch:?}: page {p}"
                );
            }
            let s = complete(&pager);
            assert_eq!(s.bytes_received, 3 * HUGE_PAGE_SIZE as u64, "{s:#?}");
        }
    }
}

/// A huge page the guest discards (MADV_DONTNEED, a REMOVE event of 2 MiB)
/// is settled as a whole unit: its refault maps what the file still holds,
/// every page of it right, and the pager counts 512 pages removed.
#[test]
fn dontneed_of_a_huge_page_keeps_its_content() {
    let server = Server::start();
    let snap = import(&server);
    let Some((mem, _huge)) = memory(BackingKind::Hugetlb, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::None), mem);
    let m = Mem::of(&pager, 0);
    let unit = 2;
    let pages: Vec<usize> = (unit * UNIT..(unit + 1) * UNIT).collect();
    assert_touched_right(m, &snap, pages.clone());
    let base = m.base();
    // SAFETY: the range is one whole huge page of the test's guest mapping,
    // which holds no Rust object; the pager keeps it mapped.
    let rc = unsafe {
        libc::madvise(
            (base + unit * HUGE_PAGE_SIZE) as *mut libc::c_void,
            HUGE_PAGE_SIZE,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    let s = settle(&pager, "the REMOVE event", |s| {
        s.removed_pages >= UNIT as u64
    });
    assert_eq!(s.removed_pages, UNIT as u64, "{s:#?}");
    let mut reversed = pages;
    reversed.reverse();
    assert_touched_right(m, &snap, reversed);
    assert_eq!(pager.stats().poisoned_pages, 0);
}
