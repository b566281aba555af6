//! The same-host transport end to end: a real server on a Unix socket in a
//! temporary directory, real userfaultfd on real memory, restores over
//! `unix://` by the byte stream and by the page file (the snapshot's image
//! handed over as a descriptor), every page checked against the image.

mod common;

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Mem, Rng, Server, Snapshot, assert_corrupt_page_poisoned, assert_touched_right, block_on,
    check_all, complete, config, image_2m, image_4k, memory, runtime, settle, start,
    touch_and_check,
};
use faultline_client::backing::BackingKind;
use faultline_client::pager::{OnFailure, PrefetchPolicy};
use faultline_client::remote::{ConnectOptions, Remote, Token};
use faultline_proto::unix::PageFileResponse;
use faultline_proto::{CreateVolume, PageSize, SnapshotId, VolumeSource, WorkingSetName};
use faultline_server::auth::{Right, TokensFile};
use faultline_server::store::SnapshotStore;
use faultline_server::{LocalStore, ServeOptions};

/// 4 KiB pages in the test images: 8 MiB.
const PAGES: u64 = 2048;
/// Huge pages in the hugetlb image: 16 MiB.
const HUGE_PAGES: usize = 8;

/// Restores `kind` memory from a Unix server with prefetch all while three
/// threads fault, by the page file or (`no_page_file`) the byte stream:
/// every page right, and the path the pager says it took.
fn restore_over_unix(kind: BackingKind, no_page_file: bool) {
    let server = Server::start_unix(ServeOptions::default());
    let snap = match kind {
        BackingKind::Hugetlb => {
            server.import("huge", PageSize::Size2M, image_2m(5, HUGE_PAGES, &[2, 5]))
        }
        _ => server.import("small", PageSize::Size4K, image_4k(11, PAGES)),
    };
    let Some((mem, _huge)) = memory(kind, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.connect.no_page_file = no_page_file;
    let pager = start(cfg, mem);
    assert_eq!(pager.reads_page_file(), !no_page_file, "{kind}");
    let mut rng = Rng::new(7);
    let orders = (0..3)
        .map(|_| (0..100).map(|_| rng.below(snap.pages())).collect())
        .collect();
    let bad = touch_and_check(Mem::of(&pager, 0), &snap, orders);
    assert!(bad.is_empty(), "{kind}: pages differ: {bad:?}");
    let stats = complete(&pager);
    let p = stats.pages_by_source;
    assert_eq!(
        p.demand + p.readahead + p.prefetch,
        snap.data_pages().len() as u64,
        "{kind}: each page with content installed once: {stats:#?}"
    );
    assert_eq!(stats.corrupt_pages + stats.poisoned_pages, 0, "{stats:#?}");
    check_all(Mem::of(&pager, 0), &snap, 2);
}

/// Anonymous memory restores right over unix:// from the page file.
#[test]
fn anon_restore_by_page_file() {
    restore_over_unix(BackingKind::Anonymous, false);
}

/// Anonymous memory restores right over unix:// by the byte stream.
#[test]
fn anon_restore_by_stream() {
    restore_over_unix(BackingKind::Anonymous, true);
}

/// shmem memory restores right over unix:// from the page file.
#[test]
fn shmem_restore_by_page_file() {
    restore_over_unix(BackingKind::Shmem, false);
}

/// shmem memory restores right over unix:// by the byte stream.
#[test]
fn shmem_restore_by_stream() {
    restore_over_unix(BackingKind::Shmem, true);
}

/// hugetlbfs memory (a 2 MiB-page snapshot) restores right over unix:// from the page file.
#[test]
fn hugetlb_restore_by_page_file() {
    restore_over_unix(BackingKind::Hugetlb, false);
}

/// With no prefetch, demand faults are answered from the page file: every page touched is
/// right and counted as demand or read-ahead.
#[test]
fn demand_faults_read_the_page_file() {
    let server = Server::start_unix(ServeOptions::default());
    let snap = server.import("small", PageSize::Size4K, image_4k(13, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let pager = start(config(&server, &snap, PrefetchPolicy::None), mem);
    assert!(pager.reads_page_file());
    let mut rng = Rng::new(9);
    let order = rng
        .shuffle(snap.data_pages())
        .into_iter()
        .take(300)
        .collect();
    let bad = touch_and_check(Mem::of(&pager, 0), &snap, vec![order]);
    assert!(bad.is_empty(), "pages differ: {bad:?}");
    let s = pager.stats();
    assert!(s.faults > 0, "{s:#?}");
    assert!(s.pages_by_source.demand >= 1, "{s:#?}");
    assert_eq!(s.pages_by_source.prefetch, 0, "{s:#?}");
}

/// A page corrupted in the store's file (behind the descriptor) fails its digest on every
/// read and is poisoned by the policy, never installed; its neighbours are right.
#[test]
fn corrupt_page_behind_the_page_file_is_never_installed() {
    let server = Server::start_unix(ServeOptions::default());
    let snap = server.import("img", PageSize::Size4K, image_4k(41, PAGES));
    let bad = snap.page_between_data();
    server.corrupt_page(&snap, bad);
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.on_failure = OnFailure::Poison;
    cfg.deadline = Duration::from_secs(2);
    let pager = start(cfg, mem);
    assert!(pager.reads_page_file());
    assert_corrupt_page_poisoned(&pager, &snap, bad, &runtime());
}

/// A recorded working set longer than a chunk is replayed from its own page
/// file (the image's copy of a page, corrupted after recording, is never
/// read) on several streams taking turns: every page of it prefetched before
/// any touch, each right.
#[test]
fn working_set_replays_from_the_page_file_on_several_streams() {
    let server = Server::start_unix(ServeOptions::default());
    let snap = server.import("ws", PageSize::Size4K, image_4k(23, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.record = true;
    cfg.readahead = faultline_client::pager::NO_READAHEAD;
    cfg.working_set = WorkingSetName::new("boot").expect("name");
    let pager = start(cfg, mem);
    // Scattered data pages, a chunk of the split (256 pages) for every
    // stream and more.
    let data = snap.data_pages();
    let touched = Rng::new(9).shuffle(data.to_vec());
    let streams = faultline_client::pager::PAGE_FILE_STREAMS;
    assert!(touched.len() > 256 * streams, "{} pages", touched.len());
    assert_touched_right(Mem::of(&pager, 0), &snap, touched.clone());
    let stored = pager.record_working_set().expect("record the working set");
    assert!(stored >= touched.len() as u64, "{stored} pages stored");
    drop(pager);
    server.corrupt_page(&snap, touched[touched.len() / 2]);

    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::WorkingSet);
    cfg.working_set = WorkingSetName::new("boot").expect("name");
    assert!(cfg.bulk.page_file_streams >= 2, "{:?}", cfg.bulk);
    let pager = start(cfg, mem);
    assert!(pager.reads_page_file());
    let want = touched.len() as u64;
    let s = settle(&pager, "prefetching the working set", |s| {
        s.pages_by_source.prefetch >= want
    });
    assert_eq!(s.pages_by_source.prefetch, want, "{s:#?}");
    assert_eq!(s.faults, 0, "{s:#?}");
    assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
    assert_touched_right(Mem::of(&pager, 0), &snap, touched);
    assert_eq!(pager.stats().faults, 0, "every touched page was there");
}

/// A page corrupted in the working set's own page file fails its digest and
/// is never installed: the guest's touch of it is served right from the
/// image, and every other page of the set is prefetched.
#[test]
fn corrupt_page_in_the_working_set_file_is_never_installed() {
    let server = Server::start_unix(ServeOptions::default());
    let snap = server.import("wsbad", PageSize::Size4K, image_4k(29, PAGES));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::None);
    cfg.record = true;
    cfg.readahead = faultline_client::pager::NO_READAHEAD;
    cfg.working_set = WorkingSetName::new("boot").expect("name");
    let pager = start(cfg, mem);
    let touched = Rng::new(5).shuffle(snap.data_pages().to_vec());
    assert_touched_right(Mem::of(&pager, 0), &snap, touched.clone());
    pager.record_working_set().expect("record the working set");
    drop(pager);
    // Only data pages were touched, so the file holds them in touch order.
    let bad = 3;
    server.corrupt_file_page(&snap, "wspages-boot", bad, touched[bad]);

    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::WorkingSet);
    cfg.working_set = WorkingSetName::new("boot").expect("name");
    let pager = start(cfg, mem);
    let want = touched.len() as u64 - 1;
    // Both passes over the set (the page-file streams', then the one that
    // settles what they left) find the corrupt page: waiting for the second
    // keeps the touches below from racing it, where a touch joining its
    // claim would fault twice.
    let s = settle(&pager, "prefetching the working set", |s| {
        s.pages_by_source.prefetch >= want && s.corrupt_pages >= 2
    });
    assert_eq!(s.pages_by_source.prefetch, want, "{s:#?}");
    assert_touched_right(Mem::of(&pager, 0), &snap, touched);
    assert_eq!(pager.stats().faults, 1, "only the corrupt page was missing");
}

fn ask_page_file(path: &std::path::Path, snapshot: &str, token: Option<&str>) -> PageFileResponse {
    faultline_server::testing::ask_page_file(path, snapshot, token.map(|t| format!("Bearer {t}")))
}

/// Tokens apply on the Unix socket as on TCP: a token-less client is refused (gRPC and the
/// page-file handover alike), a token without a match is denied, a good token restores from
/// the page file.
#[test]
fn tokens_apply_on_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let mut file = TokensFile::default();
    let (token, _) = file
        .add_new("vmm".into(), vec!["vm-*".into()], vec![Right::Read])
        .unwrap();
    file.save(&tokens).unwrap();
    let server = Server::start_unix(ServeOptions {
        tokens: Some(tokens),
        ..ServeOptions::default()
    });
    let snap = server.import("vm-1", PageSize::Size4K, image_4k(3, 256));
    let other = server.import("db-1", PageSize::Size4K, image_4k(4, 256));
    let rt = runtime();
    let url = server.url();
    let remote = block_on(&rt, "connect", Remote::connect(&url)).expect("connects");
    let e = block_on(&rt, "manifest", remote.manifest(&snap.id)).unwrap_err();
    assert!(e.to_string().contains("Unauthenticated"), "{e}");
    let socket = faultline_proto::unix::unix_path(&url).unwrap();
    let refused = ask_page_file(&socket, "vm-1", None);
    assert_eq!(
        refused.code,
        tonic::Code::Unauthenticated as i32,
        "{refused:?}"
    );
    let denied = ask_page_file(&socket, other.id.as_str(), Some(&token));
    assert_eq!(
        denied.code,
        tonic::Code::PermissionDenied as i32,
        "{denied:?}"
    );
    let ok = ask_page_file(&socket, "vm-1", Some(&token));
    assert_eq!((ok.code, ok.page_count), (0, 256), "{ok:?}");

    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = config(&server, &snap, PrefetchPolicy::All);
    cfg.connect = ConnectOptions {
        token: Some(Token::new(&token).unwrap()),
        ..ConnectOptions::default()
    };
    let pager = start(cfg, mem);
    assert!(pager.reads_page_file());
    complete(&pager);
    check_all(Mem::of(&pager, 0), &snap, 1);
}

/// A stale socket file (its server killed) is replaced; a live one is refused; a server
/// stopping removes its socket; TLS on a Unix socket is refused with the reason.
#[test]
fn stale_socket_replaced_live_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fl.sock");
    drop(UnixListener::bind(&path).expect("a stale socket"));
    let store =
        Arc::new(LocalStore::new(dir.path().join("store")).unwrap()) as Arc<dyn SnapshotStore>;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt
        .block_on(faultline_server::spawn_unix(
            &path,
            store.clone(),
            ServeOptions::default(),
        ))
        .expect("the stale socket is replaced");
    let e = rt
        .block_on(faultline_server::spawn_unix(
            &path,
            store.clone(),
            ServeOptions::default(),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("is in use"), "{e}");
    let remote = rt.block_on(Remote::connect(&handle.url())).expect("serves");
    assert!(
        rt.block_on(
            remote
                .client()
                .list_snapshots(faultline_proto::pb::ListSnapshotsRequest::default())
        )
        .is_ok()
    );
    drop(remote);
    rt.block_on(handle.shutdown()).expect("stops");
    assert!(!path.exists(), "the socket is removed on shutdown");

    let tls = ServeOptions {
        tls: Some(faultline_server::tls::TlsFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            client_ca: None,
        }),
        ..ServeOptions::default()
    };
    let e = rt
        .block_on(faultline_server::spawn_unix(&path, store, tls))
        .unwrap_err();
    assert!(
        e.to_string().contains("TLS is not served on a Unix socket"),
        "{e}"
    );
}

/// A volume (a layered snapshot, which has no single image file) cannot be handed over: the
/// pager falls back to the byte stream on the same socket and restores it right.
#[test]
fn volume_falls_back_to_the_stream() {
    let server = Server::start_unix(ServeOptions::default());
    let snap = server.import("base", PageSize::Size4K, image_4k(21, PAGES));
    let vol = SnapshotId::new("vol").unwrap();
    server
        .store()
        .create_volume_blocking(CreateVolume {
            name: vol.clone(),
            source: VolumeSource::Snapshot(snap.id.clone()),
        })
        .expect("create the volume");
    let socket = faultline_proto::unix::unix_path(&server.url()).unwrap();
    let answer = ask_page_file(&socket, "vol", None);
    assert_eq!(answer.code, tonic::Code::Unimplemented as i32, "{answer:?}");
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let view = Snapshot {
        id: vol,
        ..snap.clone()
    };
    let pager = start(config(&server, &view, PrefetchPolicy::All), mem);
    assert!(!pager.reads_page_file());
    complete(&pager);
    check_all(Mem::of(&pager, 0), &view, 2);
}
