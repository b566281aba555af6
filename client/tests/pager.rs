//! The pager end to end: real userfaultfd on real memory of each backing
//! type, filled from an in-process server on 127.0.0.1, every page checked
//! byte for byte against the image.

mod common;

use common::{
    DEADLINE, Mem, PAGE, Rng, Server, Snapshot, TestPager, assert_touched_right, block_on,
    check_all, complete, config, image_2m, image_4k, memory, runtime, settle, start,
    touch_and_check, within,
};
use faultline_client::backing::{BackingKind, HUGE_PAGE_SIZE};
use faultline_client::pager::{FaultError, Pager, PrefetchPolicy, Region, StartError, Stats};
use faultline_client::strategy::{Decision, Mode, Strategy};
use faultline_client::uffd::{RegisterModes, ResolveOps, Uffd};
use faultline_proto::{Compression, PageSize, WorkingSetName};
use faultline_server::store::Snapshot as _;
use faultline_server::store::local::WORKING_SET_PREFIX;

/// 4 KiB pages in the images of the 4 KiB tests: 8 MiB.
const PAGES: u64 = 2048;
/// Huge pages in the hugetlb image: 32 MiB.
const HUGE_PAGES: usize = 16;
/// Threads touching memory in the per-backing tests.
const TOUCHERS: usize = 4;

/// The strategy the kernel's answers in `decision` imply for `kind` under
/// `mode`, worked out here from the registration attempts alone (not from
/// the kernel version): CONTINUE where a MISSING|MINOR registration
/// advertised it on memory with a fill view and mode allows, else COPY where
/// advertised, else eager filling.
fn implied_strategy(kind: BackingKind, mode: Mode, decision: &Decision) -> Strategy {
    assert!(!decision.attempts.is_empty(), "no registration was tried");
    let ok: Vec<(RegisterModes, ResolveOps)> = decision
        .attempts
        .iter()
        .filter_map(|a| a.ops().map(|ops| (a.modes, ops)))
        .collect();
    let cont = ok
        .iter()
        .any(|(m, ops)| m.contains(RegisterModes::MINOR) && ops.contains(ResolveOps::CONTINUE));
    let copy = ok.iter().find(|(_, ops)| ops.contains(ResolveOps::COPY));
    if cont && kind.is_file_backed() && mode != Mode::Copy {
        Strategy::Continue
    } else if let Some((_, ops)) = copy {
        Strategy::Copy {
            zeropage: ops.contains(ResolveOps::ZEROPAGE),
        }
    } else {
        Strategy::Eager
    }
}

/// Panics unless region 0 of `pager` is free of any uffd registration: a
/// fresh uffd can register it (a range still registered elsewhere gives
/// EBUSY). Memory that cannot be registered at all (EINVAL: guest_memfd
/// here) is only accepted for an eager region.
fn assert_unregistered(pager: &Pager) {
    let uffd = Uffd::open().expect("uffd");
    let m = pager.memory(0);
    // SAFETY: guest memory, in which no Rust object lives; nothing touches
    // it while this uffd holds it, and the registration is undone (and the
    // uffd closed) at once.
    match unsafe { uffd.register(m.host_addr(), m.len(), RegisterModes::MISSING) } {
        Ok(_) => uffd
            .unregister(m.host_addr(), m.len())
            .expect("unregister the probe"),
        Err(e) if e.errno() == libc::EINVAL => {
            assert_eq!(pager.decision(0).strategy(), Strategy::Eager, "{e}");
        }
        Err(e) => panic!("the pager left its region registered after completion: {e}"),
    }
}

/// Pages installed by any path: never more than the pages there are.
fn installed(s: &Stats) -> u64 {
    let p = s.pages_by_source;
    p.demand + p.readahead + p.prefetch + p.zero + p.local + p.eager
}

/// The snapshot used for `kind`: 2 MiB pages for hugetlb memory (two of them
/// zero), 4 KiB pages otherwise.
fn import_for(server: &Server, kind: BackingKind) -> Snapshot {
    match kind {
        BackingKind::Hugetlb => {
            server.import("img", PageSize::Size2M, image_2m(11, HUGE_PAGES, &[3, 12]))
        }
        _ => server.import("img", PageSize::Size4K, image_4k(11, PAGES)),
    }
}

/// Restores a snapshot into `kind` memory with `mode` and `prefetch`, and
/// checks the strategy, every byte, the statistics and completion.
fn restore(kind: BackingKind, mode: Mode, prefetch: PrefetchPolicy) {
    let server = Server::start();
    let snap = import_for(&server, kind);
    let Some((mem, _huge_pages)) = memory(kind, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, prefetch);
    cfg.mode = mode;
    let pager = start(cfg, mem);
    let decision = pager.decision(0).clone();
    let strategy = decision.strategy();
    assert_eq!(
        strategy,
        implied_strategy(kind, mode, &decision),
        "{decision}"
    );
    let expected = match (kind, mode) {
        (BackingKind::Anonymous, _) | (BackingKind::Shmem, Mode::Copy) => {
            Some(Strategy::Copy { zeropage: true })
        }
        (BackingKind::Shmem | BackingKind::Hugetlb, _) => Some(Strategy::Continue),
        // Whatever this kernel answers; `implied_strategy` checked it.
        (BackingKind::GuestMemfd, _) => None,
    };
    if let Some(expected) = expected {
        assert_eq!(strategy, expected, "{decision}");
    }
    if strategy == Strategy::Eager {
        // Nothing could be registered: the kernel answered EINVAL to every
        // attempt (no uffd support there), and the memory is already filled
        // when `start` returns.
        assert!(
            decision
                .attempts
                .iter()
                .all(|a| a.result == Err(libc::EINVAL)),
            "{decision}"
        );
        assert!(decision.registered.is_none(), "{decision}");
        let s = pager.stats();
        assert_eq!(
            s.pages_by_source.eager,
            snap.data_pages().len() as u64,
            "{s:#?}"
        );
        assert_eq!(s.faults, 0, "{s:#?}");
    }
    let mem = Mem::of(&pager, 0);
    let data = snap.data_pages().len() as u64;
    let ps = snap.page_size as u64;

    let stats = match prefetch {
        PrefetchPolicy::None => {
            check_all(mem, &snap, TOUCHERS);
            complete(&pager)
        }
        _ => {
            // Completion as a future, awaited on a runtime of ours; then
            // `wait_complete` agrees at once.
            let done = block_on(&runtime(), "completion()", pager.completion())
                .expect("the pager completes");
            assert!(pager.is_complete());
            let stats = complete(&pager);
            assert_eq!(done.completed_s, stats.completed_s);
            assert_eq!(done.pages_by_source, stats.pages_by_source);
            check_all(mem, &snap, TOUCHERS);
            stats
        }
    };
    let p = stats.pages_by_source;
    assert!(pager.is_complete());
    assert!(stats.completed_s.is_some(), "{stats:#?}");
    assert_eq!(stats.pages_total, snap.pages() as u64);
    assert!(installed(&stats) <= stats.pages_total, "{stats:#?}");
    assert_eq!(stats.corrupt_pages + stats.poisoned_pages, 0, "{stats:#?}");
    if strategy == Strategy::Eager {
        assert_eq!(p.eager, data, "{stats:#?}");
        assert_eq!(stats.bytes_received, data * ps, "{stats:#?}");
    } else {
        // Each page with content came from the server exactly once.
        assert_eq!(p.demand + p.readahead + p.prefetch, data, "{stats:#?}");
        assert_eq!(stats.bytes_received, data * ps, "{stats:#?}");
        match prefetch {
            PrefetchPolicy::None => {
                assert!(p.demand > 0, "{stats:#?}");
                assert_eq!(p.prefetch, 0, "{stats:#?}");
                assert!(stats.fault_latency_us.count > 0, "{stats:#?}");
            }
            _ => {
                assert!(p.prefetch > 0, "{stats:#?}");
                // Nothing touched the memory before completion.
                assert_eq!(stats.faults, 0, "{stats:#?}");
            }
        }
    }
    assert_unregistered(&pager);
    // Still right once the pager has let go of the memory.
    check_all(mem, &snap, 2);
}

/// Anonymous memory, pure demand faults from 4 threads: COPY, every byte right.
#[test]
fn anon_copy_demand() {
    restore(BackingKind::Anonymous, Mode::Auto, PrefetchPolicy::None);
}

/// Anonymous memory, prefetch all: COPY, completes and unregisters with no touch.
#[test]
fn anon_copy_prefetch_all() {
    restore(BackingKind::Anonymous, Mode::Auto, PrefetchPolicy::All);
}

/// shmem, pure demand faults from 4 threads: CONTINUE, every byte right.
#[test]
fn shmem_continue_demand() {
    restore(BackingKind::Shmem, Mode::Auto, PrefetchPolicy::None);
}

/// shmem, prefetch all: CONTINUE, completes and unregisters with no touch.
#[test]
fn shmem_continue_prefetch_all() {
    restore(BackingKind::Shmem, Mode::Auto, PrefetchPolicy::All);
}

/// shmem forced to `Mode::Copy`, pure demand: COPY, every byte right.
#[test]
fn shmem_forced_copy_demand() {
    restore(BackingKind::Shmem, Mode::Copy, PrefetchPolicy::None);
}

/// shmem forced to `Mode::Copy`, prefetch all: COPY, completes and unregisters.
#[test]
fn shmem_forced_copy_prefetch_all() {
    restore(BackingKind::Shmem, Mode::Copy, PrefetchPolicy::All);
}

/// hugetlbfs (2 MiB pages, two of them zero), pure demand: CONTINUE, every byte right.
#[test]
fn hugetlb_continue_demand() {
    restore(BackingKind::Hugetlb, Mode::Auto, PrefetchPolicy::None);
}

/// hugetlbfs (2 MiB pages), prefetch all: CONTINUE, completes and unregisters.
#[test]
fn hugetlb_continue_prefetch_all() {
    restore(BackingKind::Hugetlb, Mode::Auto, PrefetchPolicy::All);
}

/// guest_memfd gets the strategy its registration answers imply (eager on 6.18), filled right.
#[test]
fn guest_memfd_demand() {
    restore(BackingKind::GuestMemfd, Mode::Auto, PrefetchPolicy::None);
}

/// guest_memfd with prefetch all: the implied strategy, complete and right.
#[test]
fn guest_memfd_prefetch_all() {
    restore(BackingKind::GuestMemfd, Mode::Auto, PrefetchPolicy::All);
}

/// Restores with the server compressing batches (`codec`), demand then prefetch, byte for byte.
fn compressed(codec: Compression) {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(29, 2048));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.compression = codec;
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let mut rng = Rng::new(3);
    let orders = (0..2)
        .map(|_| (0..300).map(|_| rng.below(snap.pages())).collect())
        .collect();
    let bad = touch_and_check(mem, &snap, orders);
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
    let s = complete(&pager);
    let p = s.pages_by_source;
    assert_eq!(
        p.demand + p.readahead + p.prefetch,
        snap.data_pages().len() as u64,
        "{s:#?}"
    );
    check_all(mem, &snap, 2);
}

/// LZ4-compressed batches restore every page right.
#[test]
fn lz4_compressed_restore() {
    compressed(Compression::Lz4);
}

/// zstd-compressed batches restore every page right.
#[test]
fn zstd_compressed_restore() {
    compressed(Compression::Zstd);
}

/// 8 threads touching the same pages in different orders all read the right bytes; faults join.
fn overlapping_faults(kind: BackingKind) {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(5, 1024));
    let Some((mem, _)) = memory(kind, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::None), mem);
    let n = snap.pages();
    let mut rng = Rng::new(99);
    let orders: Vec<Vec<usize>> = (0..8)
        .map(|t| match t {
            // Two pairs walking in lockstep (forward, backward): they fault
            // on the same page at the same moment.
            0 | 1 => (0..n).collect(),
            2 | 3 => (0..n).rev().collect(),
            _ => rng.shuffle((0..n).collect()),
        })
        .collect();
    let bad = touch_and_check(Mem::of(&pager, 0), &snap, orders);
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
    let stats = complete(&pager);
    let p = stats.pages_by_source;
    let data = snap.data_pages().len() as u64;
    // No page installed twice: every page with content fetched once, and
    // nothing counted beyond the pages there are.
    assert_eq!(p.demand + p.readahead, data, "{stats:#?}");
    assert_eq!(stats.bytes_received, data * PAGE as u64, "{stats:#?}");
    assert!(installed(&stats) <= stats.pages_total, "{stats:#?}");
    assert!(p.zero <= snap.zero_pages().len() as u64, "{stats:#?}");
    assert!(
        stats.joined_faults > 0,
        "no fault joined a fetch: {stats:#?}"
    );
    check_all(Mem::of(&pager, 0), &snap, 2);
}

/// Anonymous memory: 8 threads on the same pages, right bytes, joined faults, no double install.
#[test]
fn overlapping_faults_anon() {
    overlapping_faults(BackingKind::Anonymous);
}

/// shmem (CONTINUE): 8 threads on the same pages, right bytes, joined faults, no double install.
#[test]
fn overlapping_faults_shmem() {
    overlapping_faults(BackingKind::Shmem);
}

/// Prefetch of everything racing 4 threads faulting random pages: right bytes, completes.
#[test]
fn prefetch_races_demand_faults() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(21, 4096));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::All), mem);
    let mut rng = Rng::new(7);
    let orders = (0..4)
        .map(|_| (0..600).map(|_| rng.below(snap.pages())).collect())
        .collect();
    let bad = touch_and_check(Mem::of(&pager, 0), &snap, orders);
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
    let stats = complete(&pager);
    let p = stats.pages_by_source;
    let data = snap.data_pages().len() as u64;
    assert_eq!(p.demand + p.readahead + p.prefetch, data, "{stats:#?}");
    assert!(p.prefetch > 0, "{stats:#?}");
    assert!(installed(&stats) <= stats.pages_total, "{stats:#?}");
    check_all(Mem::of(&pager, 0), &snap, 2);
    assert_unregistered(&pager);
}

/// Faults on zero pages are resolved locally: nothing is requested or received.
#[test]
fn zero_pages_are_never_fetched() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(3, 1024));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::None), mem);
    let mem = Mem::of(&pager, 0);
    let zeros = snap.zero_pages();
    assert!(zeros.len() > 100, "the image needs zero pages");
    let orders = (0..4)
        .map(|t| zeros.iter().copied().skip(t).step_by(4).collect())
        .collect();
    let bad = touch_and_check(mem, &snap, orders);
    assert!(bad.is_empty(), "zero pages read non-zero: {bad:?}");
    let s = settle(&pager, "zero pages counted", |s| {
        s.pages_by_source.zero >= zeros.len() as u64
    });
    let p = s.pages_by_source;
    assert_eq!(p.zero, zeros.len() as u64, "{s:#?}");
    assert_eq!(s.faults, zeros.len() as u64, "{s:#?}");
    assert_eq!(s.bytes_received, 0, "{s:#?}");
    assert_eq!(p.demand + p.readahead + p.prefetch, 0, "{s:#?}");
    // No fault needed the network.
    assert_eq!(s.fault_latency_us.count, 0, "{s:#?}");
    assert!(!pager.is_complete());

    // The pages with content then travel, and only they.
    check_all(mem, &snap, 4);
    let s = complete(&pager);
    let data = snap.data_pages().len() as u64;
    assert_eq!(s.bytes_received, data * PAGE as u64, "{s:#?}");
    assert_eq!(s.pages_by_source.zero, zeros.len() as u64, "{s:#?}");
    assert_eq!(
        s.pages_by_source.demand + s.pages_by_source.readahead,
        data,
        "{s:#?}"
    );
}

/// `madvise(advice)` on page `page` of `mem`, from a thread under the
/// deadline (it waits until the pager has read the REMOVE event).
fn madvise(mem: Mem, page: usize, advice: libc::c_int) {
    within("madvise", DEADLINE, move || {
        // SAFETY: one page inside the live guest mapping, which holds no Rust
        // object; discarding it is what a balloon driver does.
        let rc = unsafe {
            libc::madvise(
                (mem.base() + page * PAGE) as *mut libc::c_void,
                PAGE,
                advice,
            )
        };
        assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    });
}

/// Panics, saying where and how, if page `page` read `got` instead of `want`.
fn same(got: &[u8], want: &[u8], page: usize) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
        let zeros = got.iter().all(|&b| b == 0);
        panic!(
            "page {page}: {differ} bytes differ, the first at offset {first} \
             (read {:#04x}, expected {:#04x}); the page read {}",
            got[first],
            want[first],
            if zeros { "all zeros" } else { "other bytes" }
        );
    }
}

/// Reads page `page` of `mem` from a thread under the deadline.
fn read_page(mem: Mem, page: usize) -> Vec<u8> {
    within("reading a page", DEADLINE, move || {
        let mut buf = vec![0u8; PAGE];
        mem.read(page * PAGE, &mut buf);
        buf
    })
}

/// Discards pages with `advice` and checks what they read as afterwards
/// (zeros, or their content when `keeps` says the backing keeps it), that
/// the REMOVE events are counted, and that the pager still completes.
fn discard_then_refault(kind: BackingKind, advice: libc::c_int, keeps: bool) {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(9, 1024));
    let Some((mem, _)) = memory(kind, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::None), mem);
    let mem = Mem::of(&pager, 0);
    let data = snap.data_pages();
    // A page with content and its neighbour (fetched with it by read-ahead),
    // and a page with content nobody touched yet.
    let touched = *data
        .iter()
        .find(|&&p| data.contains(&(p + 1)))
        .expect("two adjacent pages with content");
    let untouched = *data.last().expect("a page with content");
    same(&read_page(mem, touched), snap.page(touched), touched);

    madvise(mem, touched, advice);
    madvise(mem, untouched, advice);
    settle(&pager, "REMOVE events counted", |s| s.removed_pages >= 2);

    let expect = |p: usize| {
        if keeps {
            snap.page(p).to_vec()
        } else {
            vec![0u8; PAGE]
        }
    };
    same(&read_page(mem, touched), &expect(touched), touched);
    if !keeps {
        // A discarded page the guest never read holds zeros too, however
        // the snapshot filled it.
        same(&read_page(mem, untouched), &expect(untouched), untouched);
    }
    same(
        &read_page(mem, touched + 1),
        snap.page(touched + 1),
        touched + 1,
    );

    // Every other page is still served, and the pager completes: discarded
    // pages count as settled exactly once.
    let rest = (0..snap.pages())
        .filter(|&p| p != touched && p != untouched)
        .collect::<Vec<_>>();
    assert_touched_right(mem, &snap, rest);
    let s = complete(&pager);
    assert!(installed(&s) <= s.pages_total + s.removed_pages, "{s:#?}");
    same(&read_page(mem, touched), &expect(touched), touched);
}

/// Anonymous memory: MADV_DONTNEED (a REMOVE event) makes a page read zeros on its next fault.
#[test]
fn anon_dontneed_refaults_as_zeros() {
    discard_then_refault(BackingKind::Anonymous, libc::MADV_DONTNEED, false);
}

/// shmem: MADV_REMOVE punches the page out; its next fault reads zeros.
#[test]
fn shmem_remove_refaults_as_zeros() {
    discard_then_refault(BackingKind::Shmem, libc::MADV_REMOVE, false);
}

/// shmem: MADV_DONTNEED only unmaps (the file keeps the page); the refault maps the same bytes.
#[test]
fn shmem_dontneed_keeps_content() {
    discard_then_refault(BackingKind::Shmem, libc::MADV_DONTNEED, true);
}

/// shmem: a page discarded (MADV_DONTNEED) right after its fault returns keeps its content.
#[test]
fn shmem_dontneed_right_after_fault_keeps_content() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(19, 4096));
    let Some((mem, _)) = memory(BackingKind::Shmem, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    // One page per fault: every page read is a fresh install, racing the
    // discard that follows the read.
    cfg.readahead = (PAGE as u64, PAGE as u64);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let pages: Vec<usize> = snap.data_pages().into_iter().step_by(6).collect();
    let snap2 = snap.clone();
    let bad = within("fault, discard, fault again", DEADLINE, move || {
        let mut buf = vec![0u8; PAGE];
        let mut bad = Vec::new();
        for p in pages {
            mem.read(p * PAGE, &mut buf);
            let first = buf == snap2.page(p);
            // SAFETY: one page of the live guest mapping, which holds no
            // Rust object; only this thread uses it.
            let rc = unsafe {
                libc::madvise(
                    (mem.base() + p * PAGE) as *mut libc::c_void,
                    PAGE,
                    libc::MADV_DONTNEED,
                )
            };
            assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
            mem.read(p * PAGE, &mut buf);
            if !first || buf != snap2.page(p) {
                bad.push(p);
            }
        }
        bad
    });
    assert!(bad.is_empty(), "pages lost their content: {bad:?}");
}

/// Forcing CONTINUE on anonymous memory is refused, naming the backing and the kernel's answers.
#[test]
fn forced_continue_on_anon_is_refused() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(1, 64));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.mode = Mode::Continue;
    let err = Pager::start(
        cfg,
        vec![Region {
            memory: mem,
            snapshot_offset: 0,
        }],
    )
    .expect_err("CONTINUE on anonymous memory must be refused");
    let msg = err.to_string();
    assert!(
        matches!(err, StartError::Strategy { region: 0, .. }),
        "{err:?}"
    );
    assert!(msg.contains("anon memory"), "{msg}");
    assert!(msg.contains("CONTINUE"), "{msg}");
    // What the kernel offered, attempt by attempt.
    assert!(msg.contains("MISSING|MINOR refused (EINVAL)"), "{msg}");
    assert!(msg.contains("MISSING advertised"), "{msg}");
}

/// Forcing COPY on guest_memfd, where the kernel registers nothing, is refused the same way.
#[test]
fn forced_copy_on_guest_memfd_is_refused_where_unsupported() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(1, 64));
    let Some((mem, _)) = memory(BackingKind::GuestMemfd, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.mode = Mode::Copy;
    match Pager::start(
        cfg,
        vec![Region {
            memory: mem,
            snapshot_offset: 0,
        }],
    ) {
        // A kernel with uffd support for guest_memfd.
        Ok(pager) => assert!(
            matches!(pager.decision(0).strategy(), Strategy::Copy { .. }),
            "{}",
            pager.decision(0)
        ),
        Err(err) => {
            let msg = err.to_string();
            assert!(matches!(err, StartError::Strategy { .. }), "{err:?}");
            assert!(msg.contains("guest-memfd memory"), "{msg}");
            assert!(msg.contains("MISSING refused (EINVAL)"), "{msg}");
        }
    }
}

/// `Pager::fault` fed from outside fills pages before any touch; reading them faults no more.
#[test]
fn external_faults_fill_without_touching() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(13, 1024));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::None), mem);
    let mem = Mem::of(&pager, 0);
    let rt = runtime();
    let fault = |addr: usize, len: usize| block_on(&rt, "Pager::fault", pager.fault(addr, len));
    // Single pages far apart (beyond any read-ahead window), with content
    // and zero, each one call.
    let data = snap.data_pages();
    let zeros = snap.zero_pages();
    let singles: Vec<usize> = data
        .iter()
        .step_by(97)
        .chain(zeros.iter().step_by(131))
        .copied()
        .collect();
    for &p in &singles {
        fault(mem.base() + p * PAGE + 100, 8).expect("fault");
    }
    let s = pager.stats();
    assert_eq!(s.faults, singles.len() as u64, "one fault per call: {s:#?}");
    // Several at once, from one async context.
    let several = [data[5], data[data.len() / 2], data[data.len() - 3]];
    let all = futures::future::join_all(
        several
            .iter()
            .map(|&p| pager.fault(mem.base() + p * PAGE, PAGE)),
    );
    for r in block_on(&rt, "concurrent Pager::fault", all) {
        r.expect("fault");
    }
    // A range of 40 pages, zero pages and pages with content mixed.
    let range_start = 600;
    fault(mem.base() + range_start * PAGE, 40 * PAGE).expect("fault a range");
    let before = pager.stats();
    assert!(before.faults > s.faults, "{before:#?}");

    // Reading every page filled so far takes no fault at all.
    let filled: Vec<usize> = singles
        .iter()
        .chain(&several)
        .copied()
        .chain(range_start..range_start + 40)
        .collect();
    assert_touched_right(mem, &snap, filled);
    let after = pager.stats();
    assert_eq!(
        after.faults, before.faults,
        "reading faulted again: {after:#?}"
    );

    // Addresses outside the region are refused.
    let outside = fault(mem.base() + snap.image.len(), PAGE);
    assert!(
        matches!(outside, Err(FaultError::Outside { .. })),
        "{outside:?}"
    );
}

/// A recorded first-touch order lands in the manifest and is prefetched by the next restore.
#[test]
fn recorded_working_set_is_prefetched() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(17, 2048));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.record = true;
    cfg.working_set = WorkingSetName::new("boot").expect("name");
    let pager = start(cfg, mem);
    // Pages with content, far apart (each starts its own read-ahead
    // window), touched in a scrambled order.
    let data = snap.data_pages();
    let touched = Rng::new(4).shuffle(data.iter().copied().step_by(41).collect::<Vec<_>>());
    assert!(touched.len() > 20);
    assert_touched_right(Mem::of(&pager, 0), &snap, touched.clone());
    let stored = pager.record_working_set().expect("record the working set");
    assert!(stored >= touched.len() as u64, "{stored} pages stored");
    drop(pager);

    // The server lists it, and stores the pages in first-touch order.
    let manifest = server
        .store()
        .open_blocking(&snap.id)
        .expect("open")
        .manifest();
    assert!(
        manifest.working_sets.iter().any(|w| w.as_str() == "boot"),
        "{:?}",
        manifest.working_sets
    );
    let file = server
        .snapshot_dir(&snap.id)
        .join(format!("{WORKING_SET_PREFIX}boot"));
    let ws: Vec<u64> = std::fs::read(&file)
        .expect("working set file")
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    assert_eq!(ws.len() as u64, stored);
    let positions: Vec<usize> = touched
        .iter()
        .map(|&p| {
            ws.iter()
                .position(|&w| w == p as u64)
                .unwrap_or_else(|| panic!("touched page {p} is not in the working set"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "the working set is not in first-touch order: {positions:?}"
    );

    // A second restore prefetches exactly those pages before any touch.
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::WorkingSet);
    cfg.working_set = WorkingSetName::new("boot").expect("name");
    let pager = start(cfg, mem);
    let want = ws.iter().filter(|&&p| !snap.is_zero(p as usize)).count() as u64;
    let s = settle(&pager, "prefetching the working set", |s| {
        s.pages_by_source.prefetch >= want
    });
    assert!(s.pages_by_source.prefetch >= touched.len() as u64, "{s:#?}");
    assert_eq!(s.faults, 0, "{s:#?}");
    // Only the working set: the rest is left to demand faults.
    assert!(!pager.is_complete());
    assert_touched_right(Mem::of(&pager, 0), &snap, touched);
    let s = pager.stats();
    assert_eq!(s.faults, 0, "the prefetched pages faulted: {s:#?}");
    assert_eq!(s.pages_by_source.prefetch, want, "{s:#?}");
}

/// Two regions at different snapshot offsets, of different backings, are each filled right.
#[test]
fn two_regions_of_different_backings() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(23, 1024));
    let half = snap.image.len() / 2;
    let Some((low, _)) = memory(BackingKind::Anonymous, half) else {
        return;
    };
    let Some((high, _)) = memory(BackingKind::Shmem, half) else {
        return;
    };
    let pager = TestPager::new(
        Pager::start(
            config(&server, &snap, PrefetchPolicy::None),
            vec![
                Region {
                    memory: low,
                    snapshot_offset: 0,
                },
                Region {
                    memory: high,
                    snapshot_offset: half as u64,
                },
            ],
        )
        .expect("start"),
    );
    let halves: Vec<(Mem, Snapshot)> = (0..2)
        .map(|i| {
            let mut s = snap.clone();
            s.image = std::sync::Arc::new(snap.image[i * half..(i + 1) * half].to_vec());
            (Mem::of(&pager, i), s)
        })
        .collect();
    for (mem, s) in &halves {
        check_all(*mem, s, 2);
    }
    let s = complete(&pager);
    assert_eq!(s.pages_total, snap.pages() as u64);
    assert_eq!(
        s.bytes_received,
        snap.data_pages().len() as u64 * PAGE as u64,
        "{s:#?}"
    );
    assert_eq!(pager.decision(1).strategy(), Strategy::Continue);
}

/// A guest_memfd region (filled eagerly here) and an anonymous one (lazily) in one pager.
#[test]
fn eager_and_lazy_regions_together() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(27, 1024));
    let half = snap.image.len() / 2;
    let Some((low, _)) = memory(BackingKind::GuestMemfd, half) else {
        return;
    };
    let Some((high, _)) = memory(BackingKind::Anonymous, half) else {
        return;
    };
    let pager = TestPager::new(
        Pager::start(
            config(&server, &snap, PrefetchPolicy::None),
            vec![
                Region {
                    memory: low,
                    snapshot_offset: 0,
                },
                Region {
                    memory: high,
                    snapshot_offset: half as u64,
                },
            ],
        )
        .expect("start"),
    );
    let halves: Vec<Snapshot> = (0..2)
        .map(|i| {
            let mut s = snap.clone();
            s.image = std::sync::Arc::new(snap.image[i * half..(i + 1) * half].to_vec());
            s
        })
        .collect();
    let eager = pager.decision(0).strategy() == Strategy::Eager;
    if eager {
        // Filled before `start` returned: nothing of it was faulted.
        let s = pager.stats();
        assert_eq!(
            s.pages_by_source.eager,
            halves[0].data_pages().len() as u64,
            "{s:#?}"
        );
        assert_eq!(s.faults, 0, "{s:#?}");
        assert!(!pager.is_complete(), "the lazy region is not filled yet");
    }
    check_all(Mem::of(&pager, 0), &halves[0], 2);
    if eager {
        assert_eq!(pager.stats().faults, 0);
    }
    check_all(Mem::of(&pager, 1), &halves[1], 2);
    let s = complete(&pager);
    assert_eq!(
        s.bytes_received,
        snap.data_pages().len() as u64 * PAGE as u64,
        "{s:#?}"
    );
    assert_eq!(
        pager.decision(1).strategy(),
        Strategy::Copy { zeropage: true }
    );
}

/// A 4 KiB snapshot restores into hugetlbfs memory (whole huge pages; more in
/// tests/hugetlb_mixed.rs), but a region not on huge-page boundaries is
/// refused with the sizes that would fit, before registering.
#[test]
fn hugetlb_region_must_be_huge_page_aligned() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(1, 2048));
    let Some((mem, _huge_pages)) = memory(BackingKind::Hugetlb, HUGE_PAGE_SIZE) else {
        return;
    };
    let err = Pager::start(
        config(&server, &snap, PrefetchPolicy::None),
        vec![Region {
            memory: mem,
            snapshot_offset: 16 * PAGE as u64,
        }],
    )
    .expect_err("a region off huge-page boundaries");
    assert!(matches!(err, StartError::Layout { .. }), "{err:?}");
    assert!(err.to_string().contains("multiples of 2097152"), "{err}");
}

/// Two regions that share snapshot pages are refused, naming the first page
/// they share, and the regions registered before it are let go (this hung).
#[test]
fn overlapping_regions_are_refused() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(1, 512));
    let region = |offset_pages: u64| {
        let (memory, _) = memory(BackingKind::Anonymous, 128 * PAGE).expect("anonymous memory");
        Region {
            memory,
            snapshot_offset: offset_pages * PAGE as u64,
        }
    };
    let err = Pager::start(
        config(&server, &snap, PrefetchPolicy::None),
        vec![region(0), region(300), region(100)],
    )
    .expect_err("regions sharing pages 100..128");
    assert!(
        matches!(err, StartError::Layout { region: 2, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("page 100 is also held by another region"),
        "{err}"
    );
}
