//! The lean transports (docs/protocol.md, "The lean fault transport", "The
//! lean prefetch transport"): restores by demand faults and by prefetch on
//! real userfaultfd from an in-process server on 127.0.0.1, with the
//! transport forced (a server without it would fail, not fall back), tokens
//! (over mutual TLS: tests/secure.rs), fail-over, a corrupt page, and the
//! fall-back to gRPC for a server that lacks them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Mem, PAGE, Server, Snapshot, assert_corrupt_page_poisoned, block_on, check_all, complete,
    config, image_4k, memory, runtime, start, touch_and_check,
};
use faultline_client::backing::BackingKind;
use faultline_client::fleet;
use faultline_client::pager::{OnFailure, PagerConfig, PrefetchPolicy, StreamTransport};
use faultline_client::remote::ConnectOptions;
use faultline_proto::{PageSize, SnapshotId, frame};
use faultline_server::auth::{Right, TokensFile};
use faultline_server::server::ServeOptions;
use faultline_server::store::SnapshotStore;
use faultline_server::{LocalStore, ServerHandle};

/// Pages of the images here: 4 MiB.
const PAGES: u64 = 1024;

/// Touching threads.
const TOUCHERS: usize = 4;

/// A configuration with the lean transport forced and no prefetch, so that
/// every page comes by demand fault over it.
fn lean(server: &Server, snap: &Snapshot) -> PagerConfig {
    let mut cfg = config(server, snap, PrefetchPolicy::None);
    cfg.fault_transport = StreamTransport::Lean;
    cfg
}

/// Every page touched by [`TOUCHERS`] threads in shuffled orders, checked
/// byte for byte; the stats show network faults and nothing corrupt.
fn restore_by_faults(kind: BackingKind, cfg: impl FnOnce(&Server, &Snapshot) -> PagerConfig) {
    let server = Server::start();
    let snap = server.import("lean", PageSize::Size4K, image_4k(13, PAGES));
    let Some((mem, _huge)) = memory(kind, snap.image.len()) else {
        return;
    };
    let pager = start(cfg(&server, &snap), mem);
    let mem = Mem::of(&pager, 0);
    check_all(mem, &snap, TOUCHERS);
    let s = complete(&pager);
    assert!(s.pages_by_source.demand > 0, "{s:#?}");
    assert_eq!(s.pages_by_source.prefetch, 0, "{s:#?}");
    assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
}

/// Anonymous memory restored by demand faults over the lean transport (forced): every byte right.
#[test]
fn lean_demand_restore_anon() {
    restore_by_faults(BackingKind::Anonymous, lean);
}

/// shmem memory (UFFDIO_CONTINUE) restored by demand faults over the lean transport: every byte right.
#[test]
fn lean_demand_restore_shmem() {
    restore_by_faults(BackingKind::Shmem, lean);
}

/// The same restore with the `Fault` stream forced onto gRPC still works (the comparison switch).
#[test]
fn grpc_forced_demand_restore_anon() {
    restore_by_faults(BackingKind::Anonymous, |server, snap| {
        let mut cfg = config(server, snap, PrefetchPolicy::None);
        cfg.fault_transport = StreamTransport::Grpc;
        cfg
    });
}

/// A server on 127.0.0.1 that requires tokens, on a runtime of its own.
struct TokenServer {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    handle: Option<ServerHandle>,
    snap: Snapshot,
    /// Read on `lean*`.
    token: String,
    /// Read on `other*` only.
    other: String,
}

impl TokenServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path().join("store")).unwrap());
        let image = image_4k(17, PAGES);
        let file = dir.path().join("mem.img");
        std::fs::write(&file, &image).unwrap();
        let id = SnapshotId::new("lean-1").unwrap();
        faultline_server::import::import_file(
            &*store,
            id.clone(),
            PageSize::Size4K,
            &[],
            &file,
            |_| {},
        )
        .unwrap();
        let tokens = dir.path().join("tokens.json");
        let mut file = TokensFile::default();
        let (token, _) = file
            .add_new("vmm".into(), vec!["lean*".into()], vec![Right::Read])
            .unwrap();
        let (other, _) = file
            .add_new("other".into(), vec!["other*".into()], vec![Right::Read])
            .unwrap();
        file.save(&tokens).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let opts = ServeOptions {
            tokens: Some(tokens),
            ..ServeOptions::default()
        };
        let handle = runtime
            .block_on(faultline_server::spawn_with(
                "127.0.0.1:0".parse().unwrap(),
                store as Arc<dyn SnapshotStore>,
                opts,
            ))
            .unwrap();
        Self {
            _dir: dir,
            runtime,
            handle: Some(handle),
            snap: Snapshot {
                id,
                image: Arc::new(image),
                page_size: PAGE,
            },
            token,
            other,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().addr()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        drop(self.handle.take());
        let rt = std::mem::replace(
            &mut self.runtime,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        );
        rt.shutdown_background();
    }
}

/// With tokens required, a restore over the lean transport with a valid token works byte for byte.
#[test]
fn lean_restore_with_token() {
    let s = TokenServer::start();
    let Some((mem, _)) = memory(BackingKind::Anonymous, s.snap.image.len()) else {
        return;
    };
    let mut cfg = PagerConfig::new(format!("http://{}", s.addr()), s.snap.id.clone());
    cfg.prefetch = PrefetchPolicy::None;
    cfg.fault_transport = StreamTransport::Lean;
    cfg.connect = ConnectOptions::from_files(None, None, None, Some(&s.token)).unwrap();
    let pager = start(cfg, mem);
    check_all(Mem::of(&pager, 0), &s.snap, TOUCHERS);
    let st = complete(&pager);
    assert!(st.pages_by_source.demand > 0, "{st:#?}");
}

/// Opens a raw lean connection to `addr` that starts with `magic`, sends a hello with
/// `authorization` and `first`, and returns the server's first frame; if `refused` says it is a
/// refusal, checks that the server closes the connection after it.
fn raw_lean<Q, A>(
    addr: SocketAddr,
    magic: &[u8],
    authorization: &str,
    first: Q,
    refused: impl FnOnce(&A) -> bool,
) -> A
where
    Q: prost::Message + Sync,
    A: prost::Message + Default + std::fmt::Debug,
{
    let rt = runtime();
    block_on(&rt, "a raw lean connection", async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut io = frame::FrameStream::new(tcp, frame::MAX_ANSWER_FRAME_BYTES);
        let hello = faultline_proto::pb::FaultHello {
            authorization: authorization.into(),
        };
        io.write_all_of(magic, &[&hello, &first]).await.unwrap();
        let answer: A = io.read("the first frame").await.unwrap().unwrap();
        if refused(&answer) {
            // The server closes the connection after saying why.
            let end = io.read::<A>("a frame").await;
            assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
        }
        answer
    })
}

/// [`raw_lean`] on a fault connection asking to open `snapshot`.
fn raw_open(
    addr: SocketAddr,
    authorization: &str,
    snapshot: &str,
) -> faultline_proto::pb::FaultResponse {
    use faultline_proto::pb;
    let open = pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Open(pb::FaultOpen {
            snapshot: snapshot.into(),
            compression: 0,
        })),
    };
    raw_lean(
        addr,
        &frame::MAGIC,
        authorization,
        open,
        |r: &pb::FaultResponse| r.result.is_some(),
    )
}

/// The lean transport checks tokens as gRPC does: none, a wrong one, or one without the right on the snapshot is refused with a clear error; the right one opens.
#[test]
fn lean_tokens_checked_like_grpc() {
    use faultline_proto::pb::fault_response::Result as R;
    let s = TokenServer::start();
    let err = |r: faultline_proto::pb::FaultResponse| match r.result {
        Some(R::Error(e)) => (e.code, e.message),
        other => panic!("not refused: {other:?}"),
    };
    let unauthenticated = tonic::Code::Unauthenticated as i32;
    let (code, msg) = err(raw_open(s.addr(), "", "lean-1"));
    assert_eq!(code, unauthenticated, "{msg}");
    assert!(
        msg.contains("requires a token") && msg.contains("--token"),
        "{msg}"
    );
    let (code, msg) = err(raw_open(s.addr(), "Bearer fl_not-a-real-token", "lean-1"));
    assert_eq!(code, unauthenticated, "{msg}");
    assert!(msg.contains("not valid on this server"), "{msg}");
    let (code, msg) = err(raw_open(s.addr(), &format!("Bearer {}", s.other), "lean-1"));
    assert_eq!(code, tonic::Code::PermissionDenied as i32, "{msg}");
    assert!(msg.contains("does not grant read"), "{msg}");
    let ok = raw_open(s.addr(), &format!("Bearer {}", s.token), "lean-1");
    assert_eq!(ok, frame::opened());
}

/// A server (or proxy) that knows only HTTP/2: it forwards connections to
/// `to` and closes those that start with a lean transport's magic, as a
/// server from before the transports does.
fn http2_only_proxy(to: SocketAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        // Ends with the test process.
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut head = [0u8; frame::MAGIC.len()];
                if conn.read_exact(&mut head).is_err()
                    || head == frame::MAGIC
                    || head == frame::PREFETCH_MAGIC
                {
                    return;
                }
                let Ok(mut up) = std::net::TcpStream::connect(to) else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let _ = conn.set_nodelay(true);
                up.write_all(&head).unwrap();
                let (mut r1, mut w1) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
                let t = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut r1, &mut w1);
                    let _ = w1.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut up, &mut conn);
                let _ = conn.shutdown(std::net::Shutdown::Write);
                let _ = t.join();
            });
        }
    });
    addr
}

/// With the default transport (auto), a server without the lean transport is served over gRPC instead: every byte right.
#[test]
fn auto_falls_back_to_grpc() {
    let server = Server::start();
    let snap = server.import("old", PageSize::Size4K, image_4k(19, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let proxy = http2_only_proxy(server.addr());
    let mut cfg = PagerConfig::new(format!("http://{proxy}"), snap.id.clone());
    cfg.prefetch = PrefetchPolicy::None;
    assert_eq!(cfg.fault_transport, StreamTransport::Auto);
    let pager = start(cfg, mem);
    check_all(Mem::of(&pager, 0), &snap, TOUCHERS);
    let s = complete(&pager);
    assert!(s.pages_by_source.demand > 0, "{s:#?}");
}

/// Over the lean transport a page failing its digest is fetched again, then poisoned, never installed; its neighbours are right.
#[test]
fn lean_corrupt_page_never_installed() {
    let server = Server::start();
    let snap = server.import("bad", PageSize::Size4K, image_4k(23, PAGES));
    let bad = snap.page_between_data();
    server.corrupt_page(&snap, bad);
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = lean(&server, &snap);
    cfg.on_failure = OnFailure::Poison;
    cfg.deadline = Duration::from_secs(2);
    let pager = start(cfg, mem);
    assert_corrupt_page_poisoned(&pager, &snap, bad, &runtime());
}

/// Over the lean transport, killing the home server mid-restore fails over to the other one: every page right.
#[test]
fn lean_fails_over_when_home_server_killed() {
    let a = Server::start();
    let b = Server::start();
    let image = image_4k(29, PAGES);
    let snap = a.import("fleet", PageSize::Size4K, image.clone());
    b.import("fleet", PageSize::Size4K, image);
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let urls = vec![a.url(), b.url()];
    let home_is_a = fleet::rendezvous(&urls, &snap.id)[0] == a.url();
    let mut cfg = lean(&a, &snap);
    cfg.servers = urls;
    cfg.deadline = Duration::from_secs(60);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let early: Vec<usize> = (0..snap.pages()).step_by(97).collect();
    assert!(touch_and_check(mem, &snap, vec![early]).is_empty());
    let (mut home, other) = if home_is_a { (a, b) } else { (b, a) };
    home.kill();
    check_all(mem, &snap, TOUCHERS);
    let s = complete(&pager);
    assert_eq!(s.poisoned_pages + s.corrupt_pages, 0, "{s:#?}");
    assert!(
        s.reconnects >= 1,
        "the link did not move to the other server: {s:#?}"
    );
    drop(other);
}

/// Every page of `kind` memory restored by the prefetcher on the lean prefetch transport (forced, so
/// a fall-back would fail it), nothing touched first: every byte right, all of it prefetched.
fn restore_by_lean_prefetch(kind: BackingKind, page_size: PageSize, image: Vec<u8>) {
    let server = Server::start();
    let snap = server.import("lean-bulk", page_size, image);
    let Some((mem, _huge)) = memory(kind, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.prefetch_transport = StreamTransport::Lean;
    cfg.fault_transport = StreamTransport::Lean;
    let pager = start(cfg, mem);
    let s = complete(&pager);
    check_all(Mem::of(&pager, 0), &snap, TOUCHERS);
    assert_eq!(s.pages_by_source.demand, 0, "{s:#?}");
    assert!(s.pages_by_source.prefetch > 0, "{s:#?}");
    assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
}

/// Anonymous memory restored by prefetch over the lean prefetch transport: every byte right.
#[test]
fn lean_prefetch_restore_anon() {
    restore_by_lean_prefetch(
        BackingKind::Anonymous,
        PageSize::Size4K,
        image_4k(31, PAGES),
    );
}

/// shmem memory restored by prefetch over the lean prefetch transport: every byte right.
#[test]
fn lean_prefetch_restore_shmem() {
    restore_by_lean_prefetch(BackingKind::Shmem, PageSize::Size4K, image_4k(37, PAGES));
}

/// hugetlbfs memory restored from a 2 MiB-page snapshot by prefetch over the lean prefetch transport.
#[test]
fn lean_prefetch_restore_hugetlb() {
    restore_by_lean_prefetch(
        BackingKind::Hugetlb,
        PageSize::Size2M,
        common::image_2m(41, 3, &[1]),
    );
}

/// With the default transports (auto), a server without the lean transports has its prefetch
/// streamed over gRPC instead: every byte right, all of it prefetched.
#[test]
fn auto_prefetch_falls_back_to_grpc() {
    let server = Server::start();
    let snap = server.import("old-bulk", PageSize::Size4K, image_4k(43, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let proxy = http2_only_proxy(server.addr());
    let cfg = PagerConfig::new(format!("http://{proxy}"), snap.id.clone());
    assert_eq!(cfg.prefetch_transport, StreamTransport::Auto);
    let pager = start(cfg, mem);
    let s = complete(&pager);
    check_all(Mem::of(&pager, 0), &snap, TOUCHERS);
    assert!(s.pages_by_source.prefetch > 0, "{s:#?}");
    assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
}

/// Forced onto the lean prefetch transport, a server without it is a failed prefetch (retried, and
/// said why), while the demand link still serves every page over gRPC.
#[test]
fn lean_prefetch_forced_on_an_old_server_leaves_demand_working() {
    let server = Server::start();
    let snap = server.import("old-forced", PageSize::Size4K, image_4k(47, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let proxy = http2_only_proxy(server.addr());
    let mut cfg = PagerConfig::new(format!("http://{proxy}"), snap.id.clone());
    cfg.prefetch_transport = StreamTransport::Lean;
    let pager = start(cfg, mem);
    check_all(Mem::of(&pager, 0), &snap, TOUCHERS);
    let s = complete(&pager);
    assert_eq!(s.pages_by_source.prefetch, 0, "{s:#?}");
    assert!(s.pages_by_source.demand > 0, "{s:#?}");
}

/// [`raw_lean`] on a prefetch connection asking for every page of `snapshot`.
fn raw_prefetch(
    addr: SocketAddr,
    authorization: &str,
    snapshot: &str,
) -> faultline_proto::pb::PrefetchFrame {
    use faultline_proto::pb;
    let req = pb::PrefetchRequest {
        snapshot: snapshot.into(),
        ..Default::default()
    };
    raw_lean(
        addr,
        &frame::PREFETCH_MAGIC,
        authorization,
        req,
        |f: &pb::PrefetchFrame| matches!(f.kind, Some(pb::prefetch_frame::Kind::Error(_))),
    )
}

/// The lean prefetch transport checks tokens as gRPC does: none, a wrong one, or one without the
/// right on the snapshot is refused in-band with a clear error; the right one streams pages.
#[test]
fn lean_prefetch_tokens_checked_like_grpc() {
    use faultline_proto::pb::prefetch_frame::Kind;
    let s = TokenServer::start();
    let err = |f: faultline_proto::pb::PrefetchFrame| match f.kind {
        Some(Kind::Error(e)) => (e.code, e.message),
        other => panic!("not refused: {other:?}"),
    };
    let unauthenticated = tonic::Code::Unauthenticated as i32;
    let (code, msg) = err(raw_prefetch(s.addr(), "", "lean-1"));
    assert_eq!(code, unauthenticated, "{msg}");
    assert!(msg.contains("requires a token"), "{msg}");
    let (code, msg) = err(raw_prefetch(s.addr(), "Bearer fl_nope", "lean-1"));
    assert_eq!(code, unauthenticated, "{msg}");
    let (code, msg) = err(raw_prefetch(
        s.addr(),
        &format!("Bearer {}", s.other),
        "lean-1",
    ));
    assert_eq!(code, tonic::Code::PermissionDenied as i32, "{msg}");
    assert!(msg.contains("does not grant read"), "{msg}");
    let ok = raw_prefetch(s.addr(), &format!("Bearer {}", s.token), "lean-1");
    assert!(matches!(ok.kind, Some(Kind::Batch(_))), "{ok:?}");
}
