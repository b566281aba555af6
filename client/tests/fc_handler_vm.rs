//! The Firecracker handler (`faultline fc-handler`, in-process) serves a real KVM guest: the
//! test plays Firecracker (fresh anonymous memory, a uffd with EVENT_REMOVE registered MISSING,
//! the JSON regions and the uffd sent over the handler's Unix socket) and the micro-VM's vCPU
//! faults its pages in through the handler. Fails (or skips under `FAULTLINE_ALLOW_SKIP=1`)
//! without `/dev/kvm` or userfaultfd.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use faultline_client::firecracker::{
    ConnectionEvent, ConnectionReport, EndReason, GuestRegionUffdMapping, Handler, bind,
};
use faultline_client::pager::{PagerConfig, PrefetchPolicy};
use faultline_client::testutil;
use faultline_client::uffd::{Features, RegisterModes, Uffd, UffdOptions};
use faultline_microvm::{
    GuestRam, ImageSpec, Layout, RunOptions, SnapshotFiles, Walk, create_snapshot,
    expected_checksum, load_state, run_guest,
};
use faultline_proto::{PageSize, SnapshotId};
use faultline_server::LocalStore;
use faultline_server::import::import_file;
use faultline_server::store::SnapshotStore;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// Slot size: 16,384 pages.
const MEM: usize = 64 << 20;
/// Pages the guest's random walk visits.
const PAGES: usize = 2048;
/// The page size of the memory and of the snapshot.
const PAGE: usize = 4096;
/// Longest wait for a handler report.
const DEADLINE: Duration = Duration::from_secs(60);

/// Private anonymous guest memory as Firecracker maps it; unmapped on drop.
struct GuestMap {
    addr: usize,
    len: usize,
}

impl GuestMap {
    fn new(len: usize) -> Self {
        // SAFETY: a new mapping at an address the kernel picks; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
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
}

impl Drop for GuestMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, made in `new`; no VM uses it any more (the `MicroVm` of
        // `run_guest` is gone) and no Rust object lives in it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The first report matching `want`, within [`DEADLINE`].
fn expect(
    reports: &Receiver<ConnectionReport>,
    what: &str,
    want: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    let started = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(started.elapsed());
        match reports.recv_timeout(left) {
            Ok(r) if want(&r.event) => return r.event,
            Ok(ConnectionReport {
                event: ConnectionEvent::Rejected { reason },
                ..
            }) => panic!("the handler refused the connection: {reason}"),
            Ok(_) => {}
            Err(e) => panic!("no report of {what} within {DEADLINE:?}: {e}"),
        }
    }
}

/// A KVM guest faults its memory in through the fc-handler, Firecracker-style, to the right sum.
#[test]
fn fc_handler_serves_a_kvm_guest() {
    if testutil::require_kvm().is_none() || testutil::require_uffd().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");

    // 1. The snapshot: a random walk, run once before it is taken.
    let data = Layout::new(MEM as u64, PAGES as u64)
        .expect("layout")
        .data_pages();
    let walk = Walk::random(7, data, PAGES);
    let spec = ImageSpec::new(MEM as u64, 7).walk(walk.clone());
    let files = SnapshotFiles::next_to(dir.path().join("memory"));
    create_snapshot(&spec, Some(0), &files).expect("create the snapshot");
    let vcpu = load_state(&files.vcpu).expect("load the vCPU file").vcpu;
    let original = std::fs::read(&files.memory).expect("read the memory file");
    let expected = expected_checksum(original.as_slice(), &walk).expect("expected checksum");
    drop(original);

    // 2. Import it with 4 KiB pages and serve it on 127.0.0.1:0.
    let store = Arc::new(LocalStore::new(dir.path().join("store")).expect("store"));
    let id = SnapshotId::new("fc-vm").expect("name");
    import_file(
        &*store,
        id.clone(),
        PageSize::Size4K,
        &[],
        &files.memory,
        |_| {},
    )
    .expect("import");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let server = runtime
        .block_on(faultline_server::spawn(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            store as Arc<dyn SnapshotStore>,
        ))
        .expect("start the server");

    // 3. The handler, serving on a Unix socket before any vCPU runs.
    let mut config = PagerConfig::new(server.url(), id);
    config.prefetch = PrefetchPolicy::None;
    let socket: PathBuf = dir.path().join("fc.sock");
    let listener = bind(&socket).expect("bind the handler's socket");
    let handler = Handler::new(config);
    let reports = handler.subscribe();
    let serve = {
        let h = handler.clone();
        std::thread::Builder::new()
            .name("fc-handler".into())
            .spawn(move || h.serve(listener))
            .expect("spawn the handler")
    };

    // 4. Firecracker's side: fresh memory, a uffd with EVENT_REMOVE, MISSING over all of it.
    let memory = GuestMap::new(MEM);
    let uffd = Uffd::open_with(UffdOptions {
        wanted: Features::EVENT_REMOVE,
        required: Features::EVENT_REMOVE,
    })
    .expect("a uffd with EVENT_REMOVE");
    // SAFETY: the test's own fresh guest mapping, holding no Rust object; only the handler
    // fills it, and nothing on the host touches it.
    unsafe { uffd.register(memory.addr, memory.len, RegisterModes::MISSING) }
        .expect("register MISSING");
    // As Firecracker sends it: `page_size_kib` holds bytes too (its name is wrong).
    let body = format!(
        r#"[{{"base_host_virt_addr":{},"size":{},"offset":0,"page_size":{PAGE},"page_size_kib":{PAGE}}}]"#,
        memory.addr, memory.len
    );
    let parsed: Vec<GuestRegionUffdMapping> = serde_json::from_str(&body).expect("valid JSON");
    assert_eq!(parsed[0].page_size_bytes(0).expect("page size"), PAGE);
    let stream = UnixStream::connect(&socket).expect("connect to the handler");
    let fds = [uffd.as_raw_fd()];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(body.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    assert_eq!(sent, body.len());
    match expect(&reports, "serving", |e| {
        matches!(e, ConnectionEvent::Serving { .. })
    }) {
        ConnectionEvent::Serving { regions, bytes } => {
            assert_eq!((regions, bytes), (1, MEM as u64));
        }
        _ => unreachable!(),
    }

    // 5. The guest runs on that memory; its own accesses fault every page in.
    // SAFETY: `memory` is a page-aligned read-write mapping that outlives the VM (dropped at the
    // end of `run_guest`), guest memory holding no Rust object; the handler is serving it.
    let ram = unsafe { GuestRam::host(memory.addr, memory.len) };
    let result = run_guest(ram, &vcpu, &RunOptions::default()).expect("run the restored guest");
    eprintln!(
        "guest: checksum {:#018x} (expected {expected:#018x}), {:?}, {} exits",
        result.checksum, result.elapsed, result.exits
    );
    assert_eq!(
        result.checksum, expected,
        "the guest's checksum differs from the original memory's"
    );

    // 6. Firecracker exits: unregister, hang up, and the handler reports the end.
    uffd.unregister(memory.addr, memory.len)
        .expect("unregister");
    drop(stream);
    match expect(&reports, "the end", |e| {
        matches!(e, ConnectionEvent::Ended { .. })
    }) {
        ConnectionEvent::Ended {
            reason,
            complete,
            stats,
        } => {
            eprintln!(
                "handler: {} faults, pages by source {:?}",
                stats.faults, stats.pages_by_source
            );
            assert_eq!(reason, EndReason::PeerClosed);
            assert!(!complete, "a walk of {PAGES} pages cannot fill every page");
            let s = &stats.pages_by_source;
            assert!(s.demand > 0, "{stats:#?}");
            assert_eq!((s.prefetch, s.eager), (0, 0), "{stats:#?}");
            assert!(
                s.demand + s.readahead + s.zero >= PAGES as u64,
                "fewer pages served than walked: {stats:#?}"
            );
        }
        _ => unreachable!(),
    }
    let s = handler.stats();
    assert_eq!(
        (s.accepted, s.rejected, s.serving, s.peer_closed),
        (1, 0, 0, 1)
    );

    // Teardown: the uffd is closed before the memory is unmapped; the handler stops before
    // the server it fetches from.
    drop(uffd);
    drop(memory);
    handler.stop();
    serve.join().expect("handler thread").expect("serve");
    drop(server);
    runtime.shutdown_background();
}
