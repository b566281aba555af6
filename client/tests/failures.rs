//! The pager when things go wrong: the server dies mid-restore (and comes
//! back, or not), the guest discards pages being fetched or resolved, the
//! server holds a corrupt page, the pager is shut down early. Outcomes that
//! end a process (SIGBUS on a poisoned page, abort) are checked in a child
//! process: this test binary run again on one test, told what to do through
//! the environment.

mod common;

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    DEADLINE, Mem, PAGE, Server, Snapshot, assert_corrupt_page_poisoned, assert_touched_right,
    block_on, check_all, complete, config, hung, image_4k, memory, runtime, settle, start,
    touch_and_check, within,
};
use faultline_client::backing::{BackingKind, ExternalMemory, GuestMemory};
use faultline_client::pager::{
    CORRUPT_RETRIES, FaultError, OnFailure, PagerConfig, PrefetchPolicy,
};
use faultline_client::testutil;
use faultline_proto::{PageSize, SnapshotId};

/// Pages of the images here: 4 MiB.
const PAGES: u64 = 1024;

/// Demand faults blocked while the server is down complete with the right bytes once it is back.
#[test]
fn server_killed_mid_restore_and_restarted() {
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(31, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Wait;
    cfg.deadline = Duration::from_secs(60);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let data = snap.data_pages();
    let (early, late) = data.split_at(data.len() / 2);
    let early: Vec<usize> = early.iter().copied().step_by(9).collect();
    let late: Vec<usize> = late.iter().copied().step_by(9).collect();
    assert_touched_right(mem, &snap, early);

    server.kill();
    // Faults now wait for a server that is not there.
    let (tx, rx) = mpsc::channel();
    for t in 0..2 {
        let part: Vec<usize> = late.iter().copied().skip(t).step_by(2).collect();
        let (tx, snap) = (tx.clone(), snap.clone());
        std::thread::Builder::new()
            .name(format!("blocked-{t}"))
            .spawn(move || {
                let mut buf = vec![0u8; PAGE];
                let bad: Vec<usize> = part
                    .into_iter()
                    .filter(|&p| {
                        mem.read(p * PAGE, &mut buf);
                        buf != snap.page(p)
                    })
                    .collect();
                let _ = tx.send(bad);
            })
            .expect("spawn");
    }
    drop(tx);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "pages were filled while the server was down"
    );
    let s = pager.stats();
    assert_eq!(s.reconnects, 0, "{s:#?}");

    server.restart();
    let started = Instant::now();
    for _ in 0..2 {
        let bad = rx
            .recv_timeout(DEADLINE.saturating_sub(started.elapsed()))
            .unwrap_or_else(|_| hung("faults after the server came back", DEADLINE));
        assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
    }
    let s = pager.stats();
    assert!(s.reconnects >= 1, "{s:#?}");
    assert_eq!(s.poisoned_pages + s.corrupt_pages, 0, "{s:#?}");

    // The rest of the restore goes on as usual.
    check_all(mem, &snap, 2);
    let s = complete(&pager);
    assert_eq!(
        s.pages_by_source.demand + s.pages_by_source.readahead,
        data.len() as u64,
        "{s:#?}"
    );
}

/// A prefetch cut off by the server dying resumes when it is back, and completes right.
#[test]
fn server_killed_during_prefetch_and_restarted() {
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(33, 4 * PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::All), mem);
    // Killed once the stream has started bringing pages.
    settle(&pager, "the first prefetched pages", |s| {
        s.pages_by_source.prefetch > 0
    });
    server.kill();
    let at_kill = pager.stats();
    let data = snap.data_pages().len() as u64;
    assert!(at_kill.pages_by_source.prefetch < data, "{at_kill:#?}");
    std::thread::sleep(Duration::from_millis(700));
    server.restart();
    let s = complete(&pager);
    // Resumed, not restarted: no page came twice.
    let p = s.pages_by_source;
    assert_eq!(p.prefetch + p.demand + p.readahead, data, "{s:#?}");
    assert_eq!(s.bytes_received, data * PAGE as u64, "{s:#?}");
    check_all(Mem::of(&pager, 0), &snap, 2);
}

/// A page the guest discards while its fetch waits on a dead server reads zeros once it is back.
#[test]
fn page_discarded_while_in_flight_reads_zeros() {
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(35, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::None), mem);
    let mem = Mem::of(&pager, 0);
    let data = snap.data_pages();
    // A page with content followed by one with content: both in the
    // read-ahead window of a fault on the first.
    let page = *data
        .iter()
        .find(|&&p| data.contains(&(p + 1)))
        .expect("two adjacent pages with content");
    server.kill();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PAGE];
        mem.read(page * PAGE, &mut buf);
        let _ = tx.send(buf);
    });
    // Its fetch is in flight (and cannot be answered) ...
    settle(&pager, "the fault read", |s| s.faults >= 1);
    // ... when the guest discards the page.
    within("madvise", DEADLINE, move || {
        // SAFETY: one page of the live guest mapping, which holds no Rust
        // object; the faulting thread only copies out of it.
        let rc = unsafe {
            libc::madvise(
                (mem.base() + page * PAGE) as *mut libc::c_void,
                PAGE,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    });
    settle(&pager, "the REMOVE event", |s| s.removed_pages >= 1);
    server.restart();
    let got = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| hung("the fault on the discarded page", DEADLINE));
    assert!(
        got.iter().all(|&b| b == 0),
        "the discarded page is not zeros"
    );
    // The rest of its window arrived as usual, and nothing was taken for
    // corrupt.
    assert_touched_right(mem, &snap, vec![page + 1]);
    let rest: Vec<usize> = (0..snap.pages()).filter(|&p| p != page).collect();
    assert_touched_right(mem, &snap, rest);
    let s = complete(&pager);
    assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
}

/// With policy poison, faults waiting on a server down past the deadline are poisoned.
#[test]
fn server_down_past_deadline_poisons() {
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(37, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Poison;
    cfg.deadline = Duration::from_millis(500);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let data = snap.data_pages();
    assert_touched_right(mem, &snap, data[..8].to_vec());
    server.kill();
    let page = *data.last().expect("a page with content");
    let started = Instant::now();
    // Fed through `Pager::fault`: touching a poisoned page would be SIGBUS.
    let r = block_on(
        &runtime(),
        "Pager::fault with the server down",
        pager.fault(mem.base() + page * PAGE, PAGE),
    );
    assert!(
        matches!(r, Err(FaultError::Poisoned(p)) if p.0 == page as u64),
        "{r:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let s = pager.stats();
    assert!(s.poisoned_pages >= 1, "{s:#?}");
    assert_eq!(s.corrupt_pages, 0, "{s:#?}");
    // Pages filled before stay right.
    assert_touched_right(mem, &snap, data[..8].to_vec());
}

/// A corrupt page in memory that must be filled eagerly (guest_memfd here) fails `Pager::start`.
#[test]
fn corrupt_page_fails_an_eager_start() {
    let (server, snap, bad) = corrupt_server();
    let Some((mem, _)) = memory(BackingKind::GuestMemfd, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.deadline = Duration::from_secs(2);
    match faultline_client::pager::Pager::start(
        cfg,
        vec![faultline_client::pager::Region {
            memory: mem,
            snapshot_offset: 0,
        }],
    ) {
        Err(err) => {
            let msg = err.to_string();
            assert!(
                matches!(err, faultline_client::pager::StartError::Eager(_)),
                "{err:?}"
            );
            assert!(msg.contains(&format!("page {bad}")), "{msg}");
        }
        // A kernel that serves guest_memfd lazily: then it is not eager.
        Ok(pager) => assert_ne!(
            pager.decision(0).strategy(),
            faultline_client::strategy::Strategy::Eager
        ),
    }
}

/// Starting without a reachable server fails with the manifest error, naming the snapshot.
#[test]
fn start_without_a_server_fails() {
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(39, 64));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let cfg = config(&server, &snap, PrefetchPolicy::None);
    server.kill();
    let err = faultline_client::pager::Pager::start(
        cfg,
        vec![faultline_client::pager::Region {
            memory: mem,
            snapshot_offset: 0,
        }],
    )
    .expect_err("no server");
    assert!(
        matches!(err, faultline_client::pager::StartError::Manifest { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("img") && msg.contains("cannot connect"),
        "{msg}"
    );
}

/// The corrupt-page fixture: the image, and the page corrupted on disk.
const CORRUPT_SEED: u64 = 41;

/// A server whose snapshot `img` has one page flipped in its `memory` file
/// (before the server has opened the snapshot). Returns the page.
fn corrupt_server() -> (Server, Snapshot, usize) {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(CORRUPT_SEED, PAGES));
    let bad = snap.page_between_data();
    server.corrupt_page(&snap, bad);
    (server, snap, bad)
}

/// A corrupt page fails its digest on every fetch and is poisoned; its neighbours are installed.
#[test]
fn corrupt_page_is_poisoned_never_installed() {
    let (server, snap, bad) = corrupt_server();
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Poison;
    cfg.deadline = Duration::from_secs(2);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let rt = runtime();
    let s = assert_corrupt_page_poisoned(&pager, &snap, bad, &rt);
    // The page stays poisoned: asking again gives the same answer, at once.
    let again = block_on(
        &rt,
        "Pager::fault again",
        pager.fault(mem.base() + bad * PAGE, 1),
    );
    assert!(matches!(again, Err(FaultError::Poisoned(_))), "{again:?}");
    assert_eq!(pager.stats().corrupt_pages, s.corrupt_pages);
}

/// Prefetch skips a corrupt page (never installs it) and installs every other one.
#[test]
fn corrupt_page_is_skipped_by_prefetch() {
    let (server, snap, bad) = corrupt_server();
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.on_failure = OnFailure::Poison;
    let pager = start(cfg, mem);
    let data = snap.data_pages().len() as u64;
    let s = settle(&pager, "prefetching", |s| {
        s.pages_by_source.prefetch >= data - 1
    });
    assert_eq!(s.pages_by_source.prefetch, data - 1, "{s:#?}");
    assert!(s.corrupt_pages >= 1, "{s:#?}");
    // One page is still missing: no completion, and every other page right.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!pager.is_complete());
    let others: Vec<usize> = (0..snap.pages()).filter(|&p| p != bad).collect();
    assert_touched_right(Mem::of(&pager, 0), &snap, others);
    // The prefetcher mapped the zero pages too (the stream names them), so
    // nothing faulted and nothing was fetched on demand.
    let zeros = snap.zero_pages().len() as u64;
    let s = settle(&pager, "zero pages counted", |s| {
        s.pages_by_source.zero >= zeros
    });
    assert_eq!(s.faults, 0, "{s:#?}");
    assert_eq!(s.pages_by_source.zero, zeros, "{s:#?}");
    assert_eq!(
        s.pages_by_source.demand + s.pages_by_source.readahead,
        0,
        "{s:#?}"
    );
}

/// Environment of the child processes: the server's URL and a page.
const CHILD_URL_ENV: &str = "FAULTLINE_TEST_CHILD_URL";
const CHILD_PAGE_ENV: &str = "FAULTLINE_TEST_CHILD_PAGE";

/// A line for the parent to read (stderr is not captured by the harness).
fn say(line: &str) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

/// In a child process: the server's URL and the page the parent named.
fn child_args() -> Option<(String, usize)> {
    let url = std::env::var(CHILD_URL_ENV).ok()?;
    let page = std::env::var(CHILD_PAGE_ENV)
        .expect("page")
        .parse()
        .expect("page number");
    // No core file for the crash the parent expects.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; it touches no other memory.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    Some((url, page))
}

/// Runs test `test` of this binary in a child process told about `server`
/// and `page` (which it finds with [`child_args`]); returns how it ended and
/// its stderr. Fails the test if the child runs past [`DEADLINE`].
fn run_child(test: &str, server: &Server, page: usize) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_URL_ENV, server.url())
        .env(CHILD_PAGE_ENV, page.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            hung(&format!("child process {test}"), DEADLINE);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = out.join().expect("stdout");
    let err = err.join().expect("stderr");
    (
        status,
        format!("child {status}\n--- stdout\n{out}\n--- stderr\n{err}"),
    )
}

/// The corrupt snapshot as the child sees it.
fn corrupt_snapshot() -> Snapshot {
    Snapshot {
        id: SnapshotId::new("img").expect("name"),
        image: std::sync::Arc::new(image_4k(CORRUPT_SEED, PAGES)),
        page_size: PAGE,
    }
}

/// The child: restore from the corrupt server with `on_failure`, check good
/// pages, then touch the corrupt one, which must end the process.
fn corrupt_child(url: String, bad: usize, on_failure: OnFailure) {
    let snap = corrupt_snapshot();
    let mem = GuestMemory::anonymous(snap.image.len()).expect("memory");
    let mut cfg = PagerConfig::new(url, snap.id.clone());
    cfg.prefetch = PrefetchPolicy::None;
    cfg.on_failure = on_failure;
    cfg.deadline = Duration::from_secs(2);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let good: Vec<usize> = (0..64).chain(bad + 8..bad + 64).collect();
    assert_touched_right(mem, &snap, good);
    say("CHILD: good pages ok");
    say(&format!("CHILD: touching page {bad}"));
    let mut buf = vec![0u8; PAGE];
    mem.read(bad * PAGE, &mut buf);
    say(&format!("CHILD: read page {bad}: {:02x?}", &buf[96..120]));
}

/// Touching a page that fails its digest (policy poison) kills with SIGBUS; its bytes never show.
#[test]
fn touching_a_corrupt_page_raises_sigbus() {
    if let Some((url, bad)) = child_args() {
        corrupt_child(url, bad, OnFailure::Poison);
        return;
    }
    if testutil::require_uffd().is_none() {
        return;
    }
    let (server, _snap, bad) = corrupt_server();
    let (status, report) = run_child("touching_a_corrupt_page_raises_sigbus", &server, bad);
    assert!(report.contains("CHILD: good pages ok"), "{report}");
    assert!(
        report.contains(&format!("CHILD: touching page {bad}")),
        "{report}"
    );
    assert!(!report.contains("CHILD: read page"), "{report}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{report}");
}

/// With policy abort, a page that keeps failing its digest aborts the process, saying why.
#[test]
fn corrupt_page_with_policy_abort_aborts() {
    if let Some((url, bad)) = child_args() {
        corrupt_child(url, bad, OnFailure::Abort);
        return;
    }
    if testutil::require_uffd().is_none() {
        return;
    }
    let (server, _snap, bad) = corrupt_server();
    let (status, report) = run_child("corrupt_page_with_policy_abort_aborts", &server, bad);
    assert!(report.contains("CHILD: good pages ok"), "{report}");
    assert!(!report.contains("CHILD: read page"), "{report}");
    assert!(
        report.contains("faultline: fatal: cannot fill") && report.contains("corrupt"),
        "{report}"
    );
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{report}");
}

/// The child: restore into memory it mapped itself, fill some pages, shut
/// the pager down early, then touch a page never filled.
fn shutdown_child(url: String, unfilled: usize) {
    let snap = Snapshot {
        id: SnapshotId::new("img").expect("name"),
        image: std::sync::Arc::new(image_4k(SHUTDOWN_SEED, PAGES)),
        page_size: PAGE,
    };
    let len = snap.image.len();
    // SAFETY: a new private anonymous mapping at an address the kernel
    // chooses; it is never unmapped, so it outlives the pager.
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
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    // SAFETY: the mapping above, read-write, never unmapped, holding no
    // Rust object.
    let memory = unsafe {
        GuestMemory::from_external(ExternalMemory {
            addr: addr as usize,
            len,
            kind: BackingKind::Anonymous,
            page_size: PAGE,
            fd: None,
            fd_offset: 0,
        })
    }
    .expect("wrap the mapping");
    let pager = start(
        {
            let mut cfg = PagerConfig::new(url, snap.id.clone());
            cfg.prefetch = PrefetchPolicy::None;
            cfg
        },
        memory,
    );
    let mem = Mem::of(&pager, 0);
    let filled: Vec<usize> = (0..32).collect();
    assert_touched_right(mem, &snap, filled.clone());
    assert!(!pager.is_complete());
    pager.into_inner().shutdown();
    // Pages filled stay; zero pages of the snapshot read as zeros.
    let zeros: Vec<usize> = snap
        .zero_pages()
        .into_iter()
        .filter(|&p| p > 32)
        .take(8)
        .collect();
    let wrong = touch_and_check(mem, &snap, vec![filled, zeros]);
    assert!(wrong.is_empty(), "pages differ after shutdown: {wrong:?}");
    say("CHILD: filled pages ok after shutdown");
    say(&format!("CHILD: touching page {unfilled}"));
    let mut buf = vec![0u8; PAGE];
    mem.read(unfilled * PAGE, &mut buf);
    say(&format!("CHILD: read page {unfilled}: {:02x?}", &buf[..16]));
}

/// The image of `shutdown_poisons_unfilled_pages`.
const SHUTDOWN_SEED: u64 = 43;

/// A pager shut down before completion poisons pages it never filled: SIGBUS on touch, not zeros.
#[test]
fn shutdown_poisons_unfilled_pages() {
    if let Some((url, page)) = child_args() {
        shutdown_child(url, page);
        return;
    }
    if testutil::require_uffd().is_none() {
        return;
    }
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(SHUTDOWN_SEED, PAGES));
    let unfilled = *snap.data_pages().last().expect("a page with content");
    let (status, report) = run_child("shutdown_poisons_unfilled_pages", &server, unfilled);
    assert!(
        report.contains("CHILD: filled pages ok after shutdown"),
        "{report}"
    );
    assert!(
        report.contains(&format!("CHILD: touching page {unfilled}")),
        "{report}"
    );
    assert!(!report.contains("CHILD: read page"), "{report}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{report}");
}

/// The image of `remove_events_while_resolving_zero_pages`.
const REMOVE_SEED: u64 = 47;

/// Which pages a REMOVE-storm child faults.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StormPages {
    /// Every zero page (each resolved by the fault loop itself).
    Zero,
    /// Every page with content but the victim (each fetched, and installed
    /// by the demand link on the thread that reads the uffd).
    Data,
}

/// The child: one thread faults every zero page (each resolved by the fault
/// thread itself) while another keeps discarding a page (REMOVE events,
/// which make resolve operations fail with EAGAIN until the fault thread
/// reads them).
fn remove_storm_child(url: String, victim: usize) {
    remove_storm(url, victim, StormPages::Zero);
}

/// [`remove_storm_child`], faulting `which` pages.
fn remove_storm(url: String, victim: usize, which: StormPages) {
    let snap = Snapshot {
        id: SnapshotId::new("img").expect("name"),
        image: std::sync::Arc::new(image_4k(REMOVE_SEED, 4 * PAGES)),
        page_size: PAGE,
    };
    let mem = GuestMemory::anonymous(snap.image.len()).expect("memory");
    let mut cfg = PagerConfig::new(url, snap.id.clone());
    cfg.prefetch = PrefetchPolicy::None;
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: one page of the live guest mapping, which holds no
                // Rust object and which nothing else reads.
                let rc = unsafe {
                    libc::madvise(
                        (mem.base() + victim * PAGE) as *mut libc::c_void,
                        PAGE,
                        libc::MADV_DONTNEED,
                    )
                };
                assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
                n += 1;
                // A balloon's pace, not a tight loop: back-to-back REMOVE
                // events would leave the kernel refusing every resolve
                // (EAGAIN) almost all the time.
                std::thread::sleep(Duration::from_micros(100));
            }
            n
        })
    };
    if which == StormPages::Data {
        let data: Vec<usize> = snap
            .data_pages()
            .into_iter()
            .filter(|&p| p != victim)
            .collect();
        let wrong = touch_and_check(mem, &snap, vec![data.clone()]);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let discards = storm.join().expect("storm");
        assert!(
            wrong.is_empty(),
            "fetched pages differ from the image: {wrong:?}"
        );
        let s = pager.stats();
        say(&format!(
            "CHILD: {} fetched pages faulted during {discards} discards; {} REMOVE pages, {} \
             reconnects",
            data.len(),
            s.removed_pages,
            s.reconnects
        ));
        return;
    }
    let zeros: Vec<usize> = snap.zero_pages();
    let wrong = touch_and_check(mem, &snap, vec![zeros.clone()]);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let discards = storm.join().expect("storm");
    assert!(wrong.is_empty(), "zero pages read non-zero: {wrong:?}");
    let s = settle(&pager, "zero pages counted", |s| {
        s.pages_by_source.zero >= zeros.len() as u64
    });
    say(&format!(
        "CHILD: {} zero pages faulted during {discards} discards; {} REMOVE pages",
        zeros.len(),
        s.removed_pages
    ));
}

/// REMOVE events arriving while fetched pages are installed on the thread that reads the uffd (EAGAIN there is retried, never waited out) leave every page right.
#[test]
fn remove_events_while_installing_fetched_pages() {
    if let Some((url, victim)) = child_args() {
        remove_storm(url, victim, StormPages::Data);
        return;
    }
    if testutil::require_uffd().is_none() {
        return;
    }
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(REMOVE_SEED, 4 * PAGES));
    let victim = *snap.data_pages().last().expect("a page with content");
    let (status, report) = run_child(
        "remove_events_while_installing_fetched_pages",
        &server,
        victim,
    );
    assert!(status.success(), "{report}");
    assert!(report.contains("fetched pages faulted during"), "{report}");
    eprintln!("{report}");
}

/// REMOVE events arriving while the fault thread resolves zero pages do not stall or abort it.
#[test]
fn remove_events_while_resolving_zero_pages() {
    if let Some((url, victim)) = child_args() {
        remove_storm_child(url, victim);
        return;
    }
    if testutil::require_uffd().is_none() {
        return;
    }
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(REMOVE_SEED, 4 * PAGES));
    let victim = *snap.data_pages().last().expect("a page with content");
    let (status, report) = run_child("remove_events_while_resolving_zero_pages", &server, victim);
    assert!(status.success(), "{report}");
    assert!(report.contains("zero pages faulted during"), "{report}");
    eprintln!("{report}");
}

/// A fault fed through `Pager::fault` on page `page` of `pager`, given up
/// to `limit`: its result, or `None` if it was still waiting then.
fn fault_within(
    pager: &faultline_client::pager::Pager,
    mem: Mem,
    page: usize,
    limit: Duration,
) -> Option<Result<(), FaultError>> {
    runtime()
        .block_on(async {
            tokio::time::timeout(limit, pager.fault(mem.base() + page * PAGE, PAGE)).await
        })
        .ok()
}

/// A server that accepts and never answers counts against the deadline: policy poison poisons the fault.
#[test]
fn stalled_server_counts_against_the_deadline() {
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(51, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Poison;
    cfg.deadline = Duration::from_secs(1);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let data = snap.data_pages();
    assert_touched_right(mem, &snap, data[..8].to_vec());
    let addr = server.addr();
    server.kill();
    let _stalled = common::StalledServer::bind(addr);
    let page = *data.last().expect("a page with content");
    let started = Instant::now();
    let r = fault_within(&pager, mem, page, DEADLINE);
    assert!(
        matches!(r, Some(Err(FaultError::Poisoned(p))) if p.0 == page as u64),
        "{r:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(pager.stats().poisoned_pages >= 1);
}

/// A stalled first server hangs neither the start nor the faults: the next server serves every page right.
#[test]
fn start_skips_a_stalled_server() {
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(53, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let stalled = common::StalledServer::bind("127.0.0.1:0".parse().expect("addr"));
    let mut cfg = PagerConfig::new(stalled.url(), snap.id.clone());
    cfg.servers.push(server.url());
    cfg.prefetch = PrefetchPolicy::None;
    cfg.deadline = Duration::from_secs(1);
    let started = Instant::now();
    let pager = start(cfg, mem);
    assert!(started.elapsed() < DEADLINE / 2, "{:?}", started.elapsed());
    check_all(Mem::of(&pager, 0), &snap, 2);
}

/// Policy wait outlives the deadline with the server down (no abort, no poison) and completes right after.
#[test]
fn policy_wait_waits_past_the_deadline() {
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(55, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Wait;
    cfg.deadline = Duration::from_millis(200);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    server.kill();
    let page = *snap.data_pages().last().expect("a page with content");
    // Five deadlines with the server down: still waiting.
    assert!(fault_within(&pager, mem, page, Duration::from_secs(1)).is_none());
    server.restart();
    let r = fault_within(&pager, mem, page, DEADLINE);
    assert!(matches!(r, Some(Ok(()))), "{r:?}");
    assert_touched_right(mem, &snap, vec![page]);
    assert_eq!(pager.stats().poisoned_pages, 0);
}

/// Truncates the memory file of `snap` on (killed) `server` by one page;
/// returns its bytes, to put back.
fn truncate_memory_file(server: &Server, snap: &Snapshot) -> Vec<u8> {
    let path = server.snapshot_dir(&snap.id).join("memory");
    let bytes = std::fs::read(&path).expect("read the memory file");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open the memory file");
    file.set_len((bytes.len() - PAGE) as u64).expect("truncate");
    bytes
}

/// A server refusing a corrupt snapshot file follows the policy: poison after the deadline; wait until repaired.
#[test]
fn server_errors_follow_the_policy() {
    for policy in [OnFailure::Poison, OnFailure::Wait] {
        let mut server = Server::start();
        let snap = server.import("img", PageSize::Size4K, image_4k(57, PAGES));
        let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
            return;
        };
        let mut cfg = config(&server, &snap, PrefetchPolicy::None);
        cfg.on_failure = policy;
        cfg.deadline = Duration::from_millis(500);
        let pager = start(cfg, mem);
        let mem = Mem::of(&pager, 0);
        server.kill();
        let good = truncate_memory_file(&server, &snap);
        server.restart_fresh();
        let page = *snap.data_pages().last().expect("a page with content");
        let started = Instant::now();
        match policy {
            OnFailure::Poison => {
                let r = fault_within(&pager, mem, page, DEADLINE);
                assert!(
                    matches!(r, Some(Err(FaultError::Poisoned(p))) if p.0 == page as u64),
                    "{r:?}"
                );
                assert!(started.elapsed() >= Duration::from_millis(400));
            }
            _ => {
                assert!(fault_within(&pager, mem, page, Duration::from_secs(2)).is_none());
                server.kill();
                let path = server.snapshot_dir(&snap.id).join("memory");
                std::fs::write(&path, &good).expect("repair the memory file");
                server.restart_fresh();
                let r = fault_within(&pager, mem, page, DEADLINE);
                assert!(matches!(r, Some(Ok(()))), "{r:?}");
                assert_touched_right(mem, &snap, vec![page]);
            }
        }
    }
}

/// A page whose digest keeps failing, under policy wait, is refetched with backoff (never a hot loop).
#[test]
fn corrupt_page_with_policy_wait_backs_off() {
    let (server, snap, bad) = corrupt_server();
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Wait;
    cfg.deadline = Duration::from_millis(200);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    assert!(fault_within(&pager, mem, bad, Duration::from_millis(2500)).is_none());
    let s = pager.stats();
    // Backoff from 20 ms doubling to 1 s: about ten fetches in 2.5 s.
    assert!(
        s.corrupt_pages > u64::from(CORRUPT_RETRIES) && s.corrupt_pages <= 25,
        "{s:#?}"
    );
    assert_eq!(s.poisoned_pages, 0, "{s:#?}");
}

/// Environment of a "peer VM" child: the socket to send its uffd on, and the
/// seed of its image.
const PEER_SOCKET_ENV: &str = "FAULTLINE_TEST_PEER_SOCKET";
const PEER_SEED_ENV: &str = "FAULTLINE_TEST_PEER_SEED";

/// The child playing a VM as Firecracker is one: it maps its guest memory,
/// opens a uffd with EVENT_REMOVE, registers the memory MISSING and sends
/// the uffd (SCM_RIGHTS) with "ADDR LEN" to the parent; on a byte from the
/// parent it reads every page and checks it against its image, says so, and
/// exits on a second byte.
fn peer_vm_child(socket: &str, seed: u64) {
    use faultline_client::uffd::{Features, RegisterModes, Uffd, UffdOptions};
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;

    let image = image_4k(seed, PAGES);
    let len = image.len();
    // SAFETY: a new private anonymous mapping at an address the kernel
    // chooses; never unmapped (the process exits or is killed).
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
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    let uffd = Uffd::open_with(UffdOptions {
        wanted: Features::EVENT_REMOVE,
        required: Features::EVENT_REMOVE,
    })
    .expect("uffd");
    // SAFETY: the fresh guest mapping above, holding no Rust object; only the
    // parent's pager fills it.
    unsafe { uffd.register(addr as usize, len, RegisterModes::MISSING) }.expect("register");
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    let body = format!("{} {len}", addr as usize);
    let fds = [uffd.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(body.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("send the uffd");
    let mut go = [0u8; 1];
    stream.read_exact(&mut go).expect("go");
    say("CHILD: touching");
    let mem = Mem::new(addr as usize, len);
    let mut buf = vec![0u8; PAGE];
    let wrong: Vec<usize> = (0..len / PAGE)
        .filter(|&p| {
            mem.read(p * PAGE, &mut buf);
            buf[..] != image[p * PAGE..(p + 1) * PAGE]
        })
        .collect();
    assert!(wrong.is_empty(), "pages differ from the image: {wrong:?}");
    say("CHILD: all pages ok");
    let _ = stream.read(&mut go);
}

/// A child VM process, connected, and its pager in this process.
struct PeerVm {
    child: std::process::Child,
    stream: std::os::unix::net::UnixStream,
    pager: faultline_client::pager::Pager,
    lines: mpsc::Receiver<String>,
}

impl PeerVm {
    /// Spawns a child VM of image `seed`, takes its uffd from `listener`,
    /// and starts a pager on it for `snap` on `server`.
    fn spawn(
        test: &str,
        listener: &std::os::unix::net::UnixListener,
        socket: &std::path::Path,
        seed: u64,
        server: &Server,
        snap: &Snapshot,
        prefetch: PrefetchPolicy,
    ) -> Self {
        use faultline_client::backing::PeerMemory;
        use faultline_client::pager::{Pager, Region};
        use faultline_client::uffd::{Features, Uffd};
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::io::{BufRead, BufReader, IoSliceMut};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(PEER_SOCKET_ENV, socket)
            .env(PEER_SEED_ENV, seed.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[child] {line}");
                let _ = tx.send(line);
            }
        });
        let (stream, _) = listener.accept().expect("the child connects");
        let mut buf = [0u8; 128];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .expect("receive the uffd");
        let fd = msg
            .cmsgs()
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .expect("an fd");
        let n = msg.bytes;
        let text = std::str::from_utf8(&buf[..n]).expect("utf-8").to_owned();
        let (addr, len) = text.split_once(' ').expect("ADDR LEN");
        // SAFETY: the kernel just gave us this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a uffd the child created and registered on its own guest
        // memory, in its address space, where no Rust object of ours lives.
        let uffd = unsafe { Uffd::from_peer(fd, Features::EVENT_REMOVE) }.expect("peer uffd");
        let memory = GuestMemory::in_peer(PeerMemory {
            addr: addr.parse().expect("addr"),
            len: len.parse().expect("len"),
            kind: BackingKind::Anonymous,
            page_size: PAGE,
        })
        .expect("peer memory");
        let pager = Pager::start_on_peer_uffd(
            config(server, snap, prefetch),
            vec![Region {
                memory,
                snapshot_offset: 0,
            }],
            uffd,
        )
        .expect("the pager starts");
        Self {
            child,
            stream,
            pager,
            lines,
        }
    }

    /// Tells the child to go on (touch, then exit).
    fn go(&mut self) {
        self.stream.write_all(&[1]).expect("tell the child");
    }

    /// Waits for the child to say `line`.
    fn expect_line(&self, line: &str) {
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains(line) => return,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        hung(&format!("the child saying {line:?}"), DEADLINE);
    }

    /// Waits for the child to exit.
    fn wait(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if started.elapsed() > DEADLINE {
                let _ = self.child.kill();
                hung("a child VM exiting", DEADLINE);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One of three VM processes SIGKILLed mid-restore ends only its pager (OwnerGone); the others finish right.
#[test]
fn killed_peer_ends_only_its_pager() {
    if let (Ok(socket), Ok(seed)) = (std::env::var(PEER_SOCKET_ENV), std::env::var(PEER_SEED_ENV)) {
        peer_vm_child(&socket, seed.parse().expect("seed"));
        return;
    }
    if testutil::require_uffd().is_none() {
        return;
    }
    let test = "killed_peer_ends_only_its_pager";
    let mut victim_server = Server::start();
    let victim_snap = victim_server.import("victim", PageSize::Size4K, image_4k(61, PAGES));
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(63, PAGES));
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vms.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let spawn = |seed, server: &Server, snap: &Snapshot, prefetch| {
        PeerVm::spawn(test, &listener, &socket, seed, server, snap, prefetch)
    };
    let mut victim = spawn(61, &victim_server, &victim_snap, PrefetchPolicy::None);
    let mut others = [
        spawn(63, &server, &snap, PrefetchPolicy::All),
        spawn(63, &server, &snap, PrefetchPolicy::None),
    ];

    // The victim faults while its server is down: its request is in flight
    // when it dies, and is answered once the server is back.
    victim_server.kill();
    victim.go();
    victim.expect_line("CHILD: touching");
    settle(&victim.pager, "the victim's fault", |s| s.faults >= 1);
    for vm in &mut others {
        vm.go();
    }
    victim.child.kill().expect("SIGKILL");
    assert_eq!(victim.wait().signal(), Some(libc::SIGKILL));
    victim_server.restart();
    let outcome = victim.pager.wait_ended(DEADLINE);
    assert!(
        matches!(
            outcome,
            Some(faultline_client::pager::Outcome::OwnerGone { .. })
        ),
        "{outcome:?}"
    );

    for vm in &mut others {
        vm.expect_line("CHILD: all pages ok");
        // Still serving, or complete (every page read): nothing else.
        let outcome = vm.pager.outcome();
        assert!(
            matches!(
                outcome,
                None | Some(faultline_client::pager::Outcome::Complete)
            ),
            "a surviving pager ended: {outcome:?}"
        );
        vm.go();
        assert!(vm.wait().success());
    }
}

/// Private anonymous memory of `len` bytes that the test maps itself (as a
/// VMM would) and never unmaps.
fn vmm_memory(len: usize) -> usize {
    // SAFETY: a new private anonymous mapping at an address the kernel
    // chooses; it is never unmapped, so it outlives every pager.
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
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    addr as usize
}

/// A pager on `uffd` (opened and registered by the test, as a peer would)
/// for the test's own memory at `addr`.
fn pager_on_own_uffd(
    cfg: PagerConfig,
    addr: usize,
    len: usize,
    uffd: faultline_client::uffd::Uffd,
) -> common::TestPager {
    // SAFETY: the test's mapping from `vmm_memory`, read-write, never
    // unmapped, holding no Rust object.
    let memory = unsafe {
        GuestMemory::from_external(ExternalMemory {
            addr,
            len,
            kind: BackingKind::Anonymous,
            page_size: PAGE,
            fd: None,
            fd_offset: 0,
        })
    }
    .expect("wrap the mapping");
    common::TestPager::new(
        faultline_client::pager::Pager::start_on_peer_uffd(
            cfg,
            vec![faultline_client::pager::Region {
                memory,
                snapshot_offset: 0,
            }],
            uffd,
        )
        .expect("the pager starts"),
    )
}

/// A fault on a page marked present but discarded behind the pager's back reads zeros, not a wake loop.
#[test]
fn fault_on_a_page_marked_present_but_unmapped_is_resolved() {
    use faultline_client::uffd::{Features, RegisterModes, Uffd, UffdOptions};
    if testutil::require_uffd().is_none() {
        return;
    }
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(65, PAGES));
    let len = snap.image.len();
    let addr = vmm_memory(len);
    // No EVENT_REMOVE: the pager is not told of discards.
    let uffd = Uffd::open_with(UffdOptions {
        wanted: Features::empty(),
        required: Features::empty(),
    })
    .expect("uffd");
    // SAFETY: the test's own guest mapping, holding no Rust object.
    unsafe { uffd.register(addr, len, RegisterModes::MISSING) }.expect("register");
    let fd = std::os::fd::AsFd::as_fd(&uffd)
        .try_clone_to_owned()
        .expect("dup");
    // SAFETY: a uffd of this process, registered only on guest memory.
    let uffd = unsafe { Uffd::from_peer(fd, Features::empty()) }.expect("adopt");
    let pager = pager_on_own_uffd(
        config(&server, &snap, PrefetchPolicy::None),
        addr,
        len,
        uffd,
    );
    let mem = Mem::new(addr, len);
    let page = snap.data_pages()[3];
    assert_touched_right(mem, &snap, vec![page]);
    // SAFETY: one page of the test's guest mapping, which holds no Rust object.
    let rc = unsafe {
        libc::madvise(
            (addr + page * PAGE) as *mut libc::c_void,
            PAGE,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    let read = within("a fault on a discarded page", DEADLINE, move || {
        let mut buf = vec![0xffu8; PAGE];
        mem.read(page * PAGE, &mut buf);
        buf
    });
    assert!(
        read.iter().all(|&b| b == 0),
        "a discarded page must read zeros"
    );
    // The rest is still served right.
    let others: Vec<usize> = snap.data_pages()[4..40].to_vec();
    assert_touched_right(mem, &snap, others);
    drop(pager);
}

/// A failing prefetch install (ENOENT: half the memory unregistered) releases its run; the restore completes.
#[test]
fn failed_prefetch_install_releases_its_run() {
    use faultline_client::uffd::{Features, RegisterModes, Uffd, UffdOptions};
    if testutil::require_uffd().is_none() {
        return;
    }
    let server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(67, PAGES));
    let len = snap.image.len();
    let addr = vmm_memory(len);
    let uffd = Uffd::open_with(UffdOptions {
        wanted: Features::EVENT_REMOVE,
        required: Features::empty(),
    })
    .expect("uffd");
    let features = uffd.features();
    // SAFETY: the first half of the test's own guest mapping, holding no
    // Rust object.
    unsafe { uffd.register(addr, len / 2, RegisterModes::MISSING) }.expect("register");
    let fd = std::os::fd::AsFd::as_fd(&uffd)
        .try_clone_to_owned()
        .expect("dup");
    // SAFETY: a uffd of this process, registered only on guest memory.
    let uffd = unsafe { Uffd::from_peer(fd, features) }.expect("adopt");
    let pager = pager_on_own_uffd(config(&server, &snap, PrefetchPolicy::All), addr, len, uffd);
    let s = settle(&pager, "a failed install released", |s| {
        s.released_pages > 0
    });
    assert!(!pager.is_complete(), "{s:#?}");
    let uffd = pager.regions()[0].uffd().expect("registered");
    // SAFETY: the second half of the same guest mapping.
    unsafe { uffd.register(addr + len / 2, len / 2, RegisterModes::MISSING) }.expect("register");
    drop(uffd);
    let s = complete(&pager);
    assert!(s.released_pages > 0, "{s:#?}");
    check_all(Mem::new(addr, len), &snap, 2);
}

/// The image of `stopper_turns_a_waiting_fault_into_sigbus`.
const STOPPER_SEED: u64 = 69;

/// The child: starts a pager, says so, and on a line from the parent (whose
/// server is then down) touches a page with content from one thread, which
/// waits, and stops the pager from another through its `Stopper`.
fn stopper_child(url: String, page: usize) {
    let snap = Snapshot {
        id: SnapshotId::new("img").expect("name"),
        image: std::sync::Arc::new(image_4k(STOPPER_SEED, PAGES)),
        page_size: PAGE,
    };
    let mem = GuestMemory::anonymous(snap.image.len()).expect("memory");
    let mut cfg = PagerConfig::new(url, snap.id.clone());
    cfg.prefetch = PrefetchPolicy::None;
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    say("CHILD: started");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .expect("the parent's go");
    let stopper = pager.stopper();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PAGE];
        mem.read(page * PAGE, &mut buf);
        say(&format!("CHILD: read page {page}: {:02x?}", &buf[..16]));
    });
    settle(&pager, "the fault read", |s| s.faults >= 1);
    std::thread::sleep(Duration::from_millis(100));
    say("CHILD: stopping");
    stopper.stop_and_poison();
    let outcome = pager.wait_ended(DEADLINE);
    say(&format!("CHILD: ended: {outcome:?}"));
    std::thread::sleep(DEADLINE);
}

/// A pager stopped through its `Stopper` poisons unfilled pages: a waiting fault gets SIGBUS, not a hang.
#[test]
fn stopper_turns_a_waiting_fault_into_sigbus() {
    if let Some((url, page)) = child_args() {
        stopper_child(url, page);
        return;
    }
    if testutil::require_uffd().is_none() {
        return;
    }
    let mut server = Server::start();
    let snap = server.import("img", PageSize::Size4K, image_4k(STOPPER_SEED, PAGES));
    let page = *snap.data_pages().last().expect("a page with content");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "stopper_turns_a_waiting_fault_into_sigbus",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL_ENV, server.url())
        .env(CHILD_PAGE_ENV, page.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let (tx, lines) = mpsc::channel();
    let err = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stdin = child.stdin.take().expect("stdin");
    let mut report = String::new();
    let mut wait_for = |what: &str, report: &mut String| {
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            if let Ok(l) = lines.recv_timeout(Duration::from_millis(50)) {
                report.push_str(&l);
                report.push('\n');
                if l.contains(what) {
                    return;
                }
            }
        }
        let _ = child.kill();
        panic!("the child never said {what:?}:\n{report}");
    };
    wait_for("CHILD: started", &mut report);
    server.kill();
    stdin.write_all(b"go\n").expect("tell the child");
    wait_for("CHILD: stopping", &mut report);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            hung("the waiting fault after the stop", DEADLINE);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    while let Ok(l) = lines.try_recv() {
        report.push_str(&l);
        report.push('\n');
    }
    assert!(!report.contains("CHILD: read page"), "{report}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{report}");
}
