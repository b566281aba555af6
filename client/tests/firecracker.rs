//! `faultline fc-handler` end to end. In this file the handler runs in-process on a thread
//! through the library (`Handler::serve`) and the test plays Firecracker: it maps guest memory
//! itself, opens a userfaultfd with EVENT_REMOVE, registers the memory MISSING, connects to the
//! handler's socket and sends the JSON regions (both page size fields in bytes, as Firecracker
//! sends them) with the uffd as SCM_RIGHTS, then reads every page from several threads and
//! compares it with the snapshot image byte for byte. `processes` runs the handler binary and
//! each VM as processes of their own: isolation, poisoning, restarts, and Firecracker's captured
//! handshakes sent byte for byte.

mod common;
#[path = "firecracker/processes.rs"]
mod processes;

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use common::{DEADLINE, Mem, PAGE, Server, Snapshot, check_all, hung, image_2m, image_4k};
use faultline_client::backing::HUGE_PAGE_SIZE;
use faultline_client::firecracker::{
    ConnectionEvent, ConnectionReport, EndReason, GuestRegionUffdMapping, Handler, ServeError, bind,
};
use faultline_client::pager::{PagerConfig, PrefetchPolicy};
use faultline_client::testutil;
use faultline_client::uffd::{Features, RegisterModes, Uffd, UffdOptions};
use faultline_proto::PageSize;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// 4 KiB pages in the test image: 4 MiB.
const PAGES: u64 = 1024;
/// Threads reading guest memory.
const READERS: usize = 4;
/// `MAP_HUGE_2MB`: log2(2 MiB) << MAP_HUGE_SHIFT.
const MAP_HUGE_2MB: libc::c_int = 21 << 26;

/// Guest memory as Firecracker maps it: private anonymous (optionally
/// hugetlb), unmapped on drop.
#[derive(Debug)]
struct GuestMap {
    addr: usize,
    len: usize,
}

impl GuestMap {
    /// `len` bytes of private anonymous memory, with 2 MiB pages if `huge`.
    fn new(len: usize, huge: bool) -> Self {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if huge {
            flags |= libc::MAP_HUGETLB | MAP_HUGE_2MB;
        }
        // SAFETY: a new mapping at an address the kernel picks; no existing
        // memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap of guest memory: {}",
            std::io::Error::last_os_error()
        );
        Self {
            addr: ptr as usize,
            len,
        }
    }

    fn mem(&self) -> Mem {
        Mem::new(self.addr, self.len)
    }
}

// No `Drop` for `GuestMap`: the test binary never unmaps guest memory. Every
// "VM" here lives in this one process, so a range unmapped by one test can be
// mapped and registered again by another test running in parallel, and the
// kernel lets any uffd fill any registered range of the same process (it
// checks that the range is registered, not with which uffd). A handler pager
// whose network tasks still run for a moment after `shutdown` could then
// write into (or poison) another test's memory. Firecracker VMs are separate
// processes, where this cannot happen. A few MiB per test are leaked.

/// One Firecracker VM: its memory regions (with their snapshot offsets), its
/// uffd, and its connection to the handler.
#[derive(Debug)]
struct Vm {
    regions: Vec<(GuestMap, u64)>,
    uffd: Uffd,
    stream: Option<UnixStream>,
}

impl Vm {
    /// Maps one region per `(len, snapshot offset)`, opens a uffd the way
    /// Firecracker does (EVENT_REMOVE) and registers every region MISSING.
    /// None (a skip) where userfaultfd is not permitted.
    fn new(layout: &[(usize, u64)], huge: bool) -> Option<Self> {
        testutil::require_uffd()?;
        let uffd = Uffd::open_with(UffdOptions {
            wanted: Features::EVENT_REMOVE,
            required: Features::EVENT_REMOVE,
        })
        .expect("a uffd with EVENT_REMOVE");
        let regions: Vec<(GuestMap, u64)> = layout
            .iter()
            .map(|&(len, offset)| (GuestMap::new(len, huge), offset))
            .collect();
        for (map, _) in &regions {
            // SAFETY: the test's own fresh guest mapping, holding no Rust
            // object; only the handler fills it.
            unsafe { uffd.register(map.addr, map.len, RegisterModes::MISSING) }
                .expect("register MISSING");
        }
        Some(Self {
            regions,
            uffd,
            stream: None,
        })
    }

    /// The handshake's regions, with `page_size` (or, if `kib`, only the
    /// deprecated `page_size_kib`, which holds bytes too).
    fn mappings(&self, page_size: usize, kib: bool) -> Vec<GuestRegionUffdMapping> {
        self.regions
            .iter()
            .map(|(map, offset)| GuestRegionUffdMapping {
                base_host_virt_addr: map.addr as u64,
                size: map.len,
                offset: *offset,
                page_size: (!kib).then_some(page_size),
                page_size_kib: kib.then_some(page_size),
            })
            .collect()
    }

    /// Connects and sends `body` with the uffd attached (if `with_fd`).
    fn handshake(&mut self, socket: &PathBuf, body: &[u8], with_fd: bool) {
        let stream = UnixStream::connect(socket).expect("connect to the handler");
        send(&stream, body, with_fd.then(|| self.uffd.as_raw_fd()));
        self.stream = Some(stream);
    }

    /// Connects and sends the regions as they are.
    fn connect(&mut self, socket: &PathBuf, page_size: usize, kib: bool) {
        let body = serde_json::to_vec(&self.mappings(page_size, kib)).expect("json");
        self.handshake(socket, &body, true);
    }

    /// Reads every page of every region from [`READERS`] threads and
    /// compares it with the image.
    fn check(&self, snap: &Snapshot) {
        for (map, offset) in &self.regions {
            let (start, end) = (*offset as usize, *offset as usize + map.len);
            let part = Snapshot {
                id: snap.id.clone(),
                image: Arc::new(snap.image[start..end].to_vec()),
                page_size: snap.page_size,
            };
            check_all(map.mem(), &part, READERS);
        }
    }

    /// Hangs up, like Firecracker exiting.
    fn hang_up(&mut self) {
        drop(self.stream.take());
    }
}

/// `sendmsg` of `body` with `fd` as SCM_RIGHTS, as Firecracker sends it.
fn send(stream: &UnixStream, body: &[u8], fd: Option<RawFd>) {
    let iov = [IoSlice::new(body)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent =
        sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).expect("sendmsg");
    assert_eq!(sent, body.len());
}

/// The server, a snapshot on it, and the handler serving it on a socket.
struct Fixture {
    server: Server,
    snap: Snapshot,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    handler: Handler,
    reports: Receiver<ConnectionReport>,
    pending: Vec<ConnectionReport>,
    serve: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl Fixture {
    fn new(page_size: PageSize, image: Vec<u8>, prefetch: PrefetchPolicy) -> Self {
        // The handler's log, shown for failing tests.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
        let server = Server::start();
        let snap = server.import("fc", page_size, image);
        let mut config = PagerConfig::new(server.url(), snap.id.clone());
        config.prefetch = prefetch;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fc.sock");
        let listener = bind(&socket).expect("bind the socket");
        let handler = Handler::new(config);
        let reports = handler.subscribe();
        let h = handler.clone();
        let serve = std::thread::Builder::new()
            .name("fc-handler".into())
            .spawn(move || h.serve(listener))
            .expect("spawn the handler");
        Self {
            server,
            snap,
            _dir: dir,
            socket,
            handler,
            reports,
            pending: Vec::new(),
            serve: Some(serve),
        }
    }

    /// The first report (already received or to come) that `matches`.
    fn expect(
        &mut self,
        what: &str,
        matches: impl Fn(&ConnectionReport) -> bool,
    ) -> ConnectionReport {
        if let Some(i) = self.pending.iter().position(&matches) {
            return self.pending.remove(i);
        }
        let started = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(started.elapsed());
            match self.reports.recv_timeout(left) {
                Ok(r) if matches(&r) => return r,
                Ok(r) => self.pending.push(r),
                Err(_) => hung(what, DEADLINE),
            }
        }
    }

    /// Waits for connection `id` to be served.
    fn serving(&mut self, id: u64) {
        let r = self.expect(&format!("connection {id} served"), |r| r.id == id);
        match r.event {
            ConnectionEvent::Serving { .. } => {}
            other => panic!("connection {id} was not served: {other:?}"),
        }
    }

    /// Waits for connection `id` to end; returns whether it was complete and
    /// the demand-faulted pages.
    fn ended(&mut self, id: u64, why: EndReason) -> (bool, u64) {
        let r = self.expect(&format!("connection {id} ended"), |r| {
            r.id == id && matches!(r.event, ConnectionEvent::Ended { .. })
        });
        match r.event {
            ConnectionEvent::Ended {
                reason,
                complete,
                stats,
            } => {
                assert_eq!(reason, why, "connection {id}");
                (complete, stats.pages_by_source.demand)
            }
            _ => unreachable!(),
        }
    }

    /// Waits for connection `id` to be refused; returns the reason.
    fn rejected(&mut self, id: u64) -> String {
        let r = self.expect(&format!("connection {id} refused"), |r| r.id == id);
        match r.event {
            ConnectionEvent::Rejected { reason } => reason,
            other => panic!("connection {id} was not refused: {other:?}"),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // A failing test may have threads stuck in faults: stopping the
        // pagers would poison their pages and kill the whole test binary.
        if std::thread::panicking() {
            return;
        }
        self.handler.stop();
        if let Some(t) = self.serve.take() {
            t.join().expect("handler thread").expect("serve");
        }
    }
}

/// The peer's socket sees EOF: the handler closed the connection.
fn assert_closed(vm: &mut Vm) {
    let stream = vm.stream.as_mut().expect("connected");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut buf = [0u8; 16];
    let n = stream
        .read(&mut buf)
        .expect("read until the handler closes");
    assert_eq!(n, 0, "the handler sent data instead of closing");
}

/// Anonymous 4 KiB memory is served page by page by demand faults, every
/// page equal to the image, and hanging up stops the pager.
#[test]
fn serves_anonymous_memory() {
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(11, PAGES), PrefetchPolicy::None);
    let len = fx.snap.image.len();
    let Some(mut vm) = Vm::new(&[(len, 0)], false) else {
        return;
    };
    vm.connect(&fx.socket, PAGE, false);
    fx.serving(1);
    vm.check(&fx.snap);
    vm.hang_up();
    let (_, demand) = fx.ended(1, EndReason::PeerClosed);
    assert!(demand > 0, "no page came through a demand fault");
    let s = fx.handler.stats();
    assert_eq!(
        (s.accepted, s.rejected, s.peer_closed, s.serving),
        (1, 0, 1, 0)
    );
}

/// A balloon discarding served pages (MADV_DONTNEED, a REMOVE event on
/// Firecracker's uffd) makes them read as zeros on the next fault.
#[test]
fn balloon_discard_reads_zeros() {
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(16, PAGES), PrefetchPolicy::None);
    let len = fx.snap.image.len();
    let Some(mut vm) = Vm::new(&[(len, 0)], false) else {
        return;
    };
    vm.connect(&fx.socket, PAGE, false);
    fx.serving(1);
    vm.check(&fx.snap);
    let base = vm.regions[0].0.addr;
    // A page with content, faulted in by `check`.
    let page = (0..len / PAGE)
        .find(|&p| {
            fx.snap.image[p * PAGE..(p + 1) * PAGE]
                .iter()
                .any(|&b| b != 0)
        })
        .expect("a non-zero page");
    // SAFETY: the page is inside the test's own anonymous mapping, which
    // holds no Rust object; discarding it is what a balloon does.
    let rc = unsafe {
        libc::madvise(
            (base + page * PAGE) as *mut libc::c_void,
            PAGE,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    let mut buf = vec![0xAAu8; PAGE];
    let reader = std::thread::spawn(move || {
        // SAFETY: reading the test's own mapping; the fault is served by the
        // handler through the uffd.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (base + page * PAGE) as *const u8,
                buf.as_mut_ptr(),
                PAGE,
            );
        }
        buf
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !reader.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-fault after REMOVE hung"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let buf = reader.join().expect("reader");
    assert!(
        buf.iter().all(|&b| b == 0),
        "a discarded page must read zeros"
    );
    vm.hang_up();
    fx.ended(1, EndReason::PeerClosed);
}

/// Hugetlb memory with 2 MiB pages (deprecated `page_size_kib` only) is
/// served from a 2 MiB-page snapshot, zero huge pages included.
#[test]
fn serves_hugetlb_memory() {
    const HUGE: usize = 4;
    if testutil::require_uffd().is_none() {
        return;
    }
    let Some(_reserved) = testutil::reserve_huge_pages(HUGE) else {
        return;
    };
    let mut fx = Fixture::new(
        PageSize::Size2M,
        image_2m(12, HUGE, &[1]),
        PrefetchPolicy::None,
    );
    let Some(mut vm) = Vm::new(&[(HUGE * HUGE_PAGE_SIZE, 0)], true) else {
        return;
    };
    vm.connect(&fx.socket, HUGE_PAGE_SIZE, true);
    fx.serving(1);
    vm.check(&fx.snap);
    vm.hang_up();
    fx.ended(1, EndReason::PeerClosed);
}

/// Two VMs on one socket at once, one of them with two regions on one
/// uffd, are served side by side.
#[test]
fn two_vms_at_once() {
    // Prefetch and demand faults together, completing while readers run:
    // this once left a reader asleep (the last install's wake came after
    // the uffd was taken away; completion now wakes every region).
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(13, PAGES), PrefetchPolicy::All);
    let len = fx.snap.image.len();
    let half = len / 2;
    let Some(mut a) = Vm::new(&[(len, 0)], false) else {
        return;
    };
    // B's regions in the opposite order of their snapshot offsets.
    let mut b = Vm::new(&[(half, half as u64), (half, 0)], false).expect("second VM");
    a.connect(&fx.socket, PAGE, false);
    fx.serving(1);
    b.connect(&fx.socket, PAGE, true);
    fx.serving(2);
    assert_eq!(fx.handler.stats().serving, 2);
    let snap = fx.snap.clone();
    std::thread::scope(|s| {
        let (a, b, snap) = (&a, &b, &snap);
        s.spawn(move || a.check(snap));
        s.spawn(move || b.check(snap));
    });
    a.hang_up();
    b.hang_up();
    fx.ended(1, EndReason::PeerClosed);
    fx.ended(2, EndReason::PeerClosed);
    assert_eq!(fx.handler.stats().peer_closed, 2);
}

/// Connections that bring no userfaultfd (none attached, a pipe instead, a
/// hang-up inside the JSON) are closed with the reason; the handler then still
/// serves a good one.
#[test]
fn connections_without_a_uffd_are_closed() {
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(14, PAGES), PrefetchPolicy::None);
    let len = fx.snap.image.len();
    let Some(mut vm) = Vm::new(&[(len, 0)], false) else {
        return;
    };
    let good = serde_json::to_vec(&vm.mappings(PAGE, false)).expect("json");
    // No fd.
    vm.handshake(&fx.socket, &good, false);
    let reason = fx.rejected(1);
    assert!(reason.contains("no userfaultfd"), "{reason}");
    assert_closed(&mut vm);
    // A pipe instead of the uffd.
    let (pipe, _writer) = std::io::pipe().expect("pipe");
    let stream = UnixStream::connect(&fx.socket).expect("connect");
    send(&stream, &good, Some(pipe.as_raw_fd()));
    vm.stream = Some(stream);
    let reason = fx.rejected(2);
    assert!(reason.contains("not a userfaultfd"), "{reason}");
    assert_closed(&mut vm);
    // A hang-up in the middle of the array.
    vm.handshake(&fx.socket, &good[..good.len() / 2], false);
    vm.hang_up();
    let reason = fx.rejected(3);
    assert!(reason.contains("inside the JSON array"), "{reason}");
    assert_eq!(fx.handler.stats().rejected, 3);
    vm.connect(&fx.socket, PAGE, false);
    fx.serving(4);
    vm.check(&fx.snap);
    vm.hang_up();
    fx.ended(4, EndReason::PeerClosed);
}

/// Handshakes that bring a uffd but cannot be served (bad JSON, a region past
/// the snapshot's end) are reported as failed
/// with the reason (the VM's memory is poisoned: `processes` shows the SIGBUS),
/// and the handler still serves the next VM.
#[test]
fn unservable_handshakes_fail_only_their_vm() {
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(17, PAGES), PrefetchPolicy::None);
    let len = fx.snap.image.len();
    fn json(m: &[GuestRegionUffdMapping]) -> Vec<u8> {
        serde_json::to_vec(m).expect("json")
    }
    /// What the case is, the handshake it sends for a VM, what the reason names.
    type Case = (&'static str, fn(&Vm) -> Vec<u8>, &'static str);
    let cases: [Case; 2] = [
        (
            "bad JSON",
            |_| b"[{\"base_host_virt_addr\": true}]".to_vec(),
            "invalid type",
        ),
        (
            "past the end",
            |vm| {
                json(&[GuestRegionUffdMapping {
                    offset: PAGE as u64,
                    ..vm.mappings(PAGE, false)[0].clone()
                }])
            },
            "past the end",
        ),
    ];
    // Each with memory of its own, never touched: it ends up poisoned.
    let mut poisoned = Vec::new();
    for (i, (what, body, expect)) in cases.into_iter().enumerate() {
        let Some(mut vm) = Vm::new(&[(len, 0)], false) else {
            return;
        };
        vm.handshake(&fx.socket, &body(&vm), true);
        let id = i as u64 + 1;
        let r = fx.expect(&format!("{what} reported"), |r| r.id == id);
        match r.event {
            ConnectionEvent::Failed { reason } => {
                assert!(reason.contains(expect), "{what}: {reason}");
            }
            other => panic!("{what}: not reported as failed: {other:?}"),
        }
        poisoned.push(vm);
    }
    assert_eq!(fx.handler.stats().failed, 2);
    let mut vm = Vm::new(&[(len, 0)], false).expect("a good VM");
    vm.connect(&fx.socket, PAGE, true);
    fx.serving(3);
    vm.check(&fx.snap);
    vm.hang_up();
    fx.ended(3, EndReason::PeerClosed);
    for mut vm in poisoned {
        vm.hang_up();
    }
}

/// A handshake split over several writes, the uffd on the first, with more
/// data after the JSON array (Firecracker keeps the socket open) and fields the
/// handler does not know, is served.
#[test]
fn split_handshake_with_more_data_is_served() {
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(18, PAGES), PrefetchPolicy::None);
    let len = fx.snap.image.len();
    let Some(mut vm) = Vm::new(&[(len, 0)], false) else {
        return;
    };
    let m = &vm.mappings(PAGE, false)[0];
    let body = format!(
        r#"[{{"base_host_virt_addr":{},"size":{},"offset":0,"gpa_start":0,"page_size":{PAGE},"is_guest_memfd":false,"page_size_kib":{PAGE}}}]"#,
        m.base_host_virt_addr, m.size
    );
    let body = body.as_bytes();
    let stream = UnixStream::connect(&fx.socket).expect("connect");
    send(&stream, &body[..10], Some(vm.uffd.as_raw_fd()));
    for part in body[10..].chunks(body.len() / 3) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        send(&stream, part, None);
    }
    send(&stream, b"\n{\"more\":true}\n", None);
    vm.stream = Some(stream);
    fx.serving(1);
    vm.check(&fx.snap);
    vm.hang_up();
    fx.ended(1, EndReason::PeerClosed);
}

/// A VM hanging up mid-restore makes the handler stop its pager before
/// completion, while another VM on the same socket keeps being served.
#[test]
fn peer_hang_up_stops_its_pager() {
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(15, PAGES), PrefetchPolicy::None);
    let len = fx.snap.image.len();
    let Some(mut quitter) = Vm::new(&[(len, 0)], false) else {
        return;
    };
    let mut stayer = Vm::new(&[(len, 0)], false).expect("second VM");
    quitter.connect(&fx.socket, PAGE, false);
    fx.serving(1);
    stayer.connect(&fx.socket, PAGE, false);
    fx.serving(2);
    // Touch one page of the quitter, then hang up: the rest is never filled.
    let mut page = vec![0u8; PAGE];
    quitter.regions[0].0.mem().read(0, &mut page);
    assert_eq!(page, fx.snap.page(0));
    quitter.hang_up();
    let (complete, _) = fx.ended(1, EndReason::PeerClosed);
    assert!(!complete, "the quitter's pager cannot have completed");
    let s = fx.handler.stats();
    assert_eq!((s.peer_closed, s.serving), (1, 1));
    stayer.check(&fx.snap);
    stayer.hang_up();
    fx.ended(2, EndReason::PeerClosed);
}

/// With `--on-failure wait`, a VM that connects while the server is down
/// waits (the handler retries the manifest with backoff) and is served once
/// the server is back.
#[test]
fn vm_waits_for_a_server_that_comes_back() {
    let mut fx = Fixture::new(PageSize::Size4K, image_4k(19, PAGES), PrefetchPolicy::None);
    let len = fx.snap.image.len();
    let Some(mut vm) = Vm::new(&[(len, 0)], false) else {
        return;
    };
    fx.server.kill();
    vm.connect(&fx.socket, PAGE, false);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(fx.handler.stats().serving, 0, "served without a server");
    fx.server.restart();
    fx.serving(1);
    vm.check(&fx.snap);
    vm.hang_up();
    fx.ended(1, EndReason::PeerClosed);
}
