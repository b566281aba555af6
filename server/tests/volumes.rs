//! Volumes and diff snapshots end to end, on a real server on 127.0.0.1:
//! writes read back through every path, in-order durable acks, bad input,
//! seal, import of a sparse diff file, flatten, and the `write` right.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{Fixture, PAGE, PAGES, SNAPSHOT, apply, fault_open, fault_pages, range};
use faultline_proto::pb::faultline_client::FaultlineClient;
use faultline_proto::{Compression, LayerKind, PageIndex, RequestId, SnapshotId, pb};
use faultline_server::auth::{Right, TokensFile};
use faultline_server::store::SnapshotStore;
use faultline_server::store::layers::MAX_CHAIN_DEPTH;
use faultline_server::{LocalStore, ServeOptions};
use tokio_stream::StreamExt;
use tonic::Code;

type Client = FaultlineClient<tonic::transport::Channel>;

fn from_snapshot(name: &str, parent: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        source: Some(pb::create_volume_request::Source::FromSnapshot(
            parent.into(),
        )),
    }
}

/// `count` pages whose every byte is `fill`.
fn pattern(count: u64, fill: u8) -> Vec<u8> {
    vec![fill; count as usize * PAGE]
}

fn run(id: u64, start: u64, data: &[u8]) -> pb::WritePagesRequest {
    pb::WritePagesRequest {
        kind: Some(pb::write_pages_request::Kind::Run(
            faultline_proto::model::write_run(
                RequestId(id),
                PageIndex(start),
                (data.len() / PAGE) as u64,
                data.to_vec().into(),
                Compression::Lz4,
            ),
        )),
    }
}

fn open(volume: &str) -> pb::WritePagesRequest {
    pb::WritePagesRequest {
        kind: Some(pb::write_pages_request::Kind::Open(pb::WriteOpen {
            volume: volume.into(),
        })),
    }
}

/// Sends `runs` on one WritePages stream and collects every answer.
async fn write(
    c: &mut Client,
    volume: &str,
    runs: Vec<pb::WritePagesRequest>,
) -> Result<Vec<pb::WritePagesResponse>, tonic::Status> {
    let msgs = std::iter::once(open(volume)).chain(runs);
    let mut answers = c.write_pages(tokio_stream::iter(msgs)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(a) = answers.next().await {
        out.push(a?);
    }
    Ok(out)
}

fn acked(a: &pb::WritePagesResponse) -> Option<(u64, u64)> {
    match &a.result {
        Some(pb::write_pages_response::Result::Ack(ack)) => {
            let r = ack.range.unwrap();
            Some((r.start, r.count))
        }
        _ => None,
    }
}

fn error_code(a: &pb::WritePagesResponse) -> Option<i32> {
    match &a.result {
        Some(pb::write_pages_response::Result::Error(e)) => Some(e.code),
        _ => None,
    }
}

/// The whole image of `name` through ReadPages.
async fn read_all(c: &mut Client, name: &str) -> Vec<u8> {
    let mut out = vec![0xAAu8; PAGES as usize * PAGE];
    let mut seen = Vec::new();
    for start in (0..PAGES).step_by(256) {
        let batch = c
            .read_pages(pb::ReadPagesRequest {
                snapshot: name.into(),
                ranges: vec![range(start, 256)],
                compression: 0,
            })
            .await
            .unwrap()
            .into_inner();
        apply(batch, &mut out, &mut seen);
    }
    assert_eq!(seen.len() as u64, PAGES);
    out
}

/// What a `Prefetch` of `req` streams: the image it fills (pages not sent
/// stay 0xAA) and the pages it sent, in order.
async fn prefetch_all(c: &mut Client, req: pb::PrefetchRequest) -> (Vec<u8>, Vec<u64>) {
    let mut stream = c.prefetch(req).await.unwrap().into_inner();
    let mut out = vec![0xAAu8; PAGES as usize * PAGE];
    let mut seen = Vec::new();
    while let Some(batch) = stream.next().await {
        apply(batch.unwrap(), &mut out, &mut seen);
    }
    (out, seen)
}

/// Checks the manifest of `name` describes `image` page by page.
async fn assert_manifest_matches(c: &mut Client, name: &str, image: &[u8]) {
    let m = c
        .get_manifest(pb::GetManifestRequest {
            snapshot: name.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let m = faultline_proto::Manifest::try_from(m).unwrap();
    for (p, page) in image.chunks(PAGE).enumerate() {
        let p = PageIndex(p as u64);
        assert!(m.verify(p, page), "{name}: digest of {p} does not match");
        assert_eq!(
            m.is_zero(p),
            page.iter().all(|&b| b == 0),
            "{name}: zero bit of {p}"
        );
    }
}

fn overlay(image: &mut [u8], start: u64, data: &[u8]) {
    image[start as usize * PAGE..start as usize * PAGE + data.len()].copy_from_slice(data);
}

fn server_bin(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_faultline-server"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "faultline-server {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn store_arg(f: &Fixture) -> String {
    f.store.root().to_str().unwrap().to_owned()
}

/// A volume written over a snapshot reads back through ReadPages, Fault and
/// Prefetch as its own pages where written and the parent's elsewhere,
/// with a resolved manifest whose digests and zero bits match.
#[tokio::test]
async fn write_then_read_through_every_path() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let v = c
        .create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!((v.kind, v.parent.as_str(), v.depth), (1, SNAPSHOT, 2));
    let mut want = f.image.clone();
    let a = pattern(4, 0x5A);
    let zeros = pattern(1, 0);
    let answers = write(&mut c, "vol", vec![run(1, 10, &a), run(2, 500, &zeros)])
        .await
        .unwrap();
    assert_eq!(
        answers.iter().map(acked).collect::<Vec<_>>(),
        [Some((10, 4)), Some((500, 1))]
    );
    overlay(&mut want, 10, &a);
    overlay(&mut want, 500, &zeros);

    assert!(read_all(&mut c, "vol").await == want, "ReadPages differs");
    assert_manifest_matches(&mut c, "vol", &want).await;

    // Fault: a range straddling written and parent pages, and the zeroed one.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(fault_open("vol")).await.unwrap();
    let mut answers = c
        .fault(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (id, start, count) in [(1, 8, 8), (2, 498, 4)] {
        tx.send(fault_pages(id, start, count)).await.unwrap();
        let a = answers.next().await.unwrap().unwrap();
        let Some(pb::fault_response::Result::Pages(batch)) = a.result else {
            panic!("fault {id}: {a:?}");
        };
        let mut out = vec![0xAAu8; PAGES as usize * PAGE];
        let mut seen = Vec::new();
        apply(batch, &mut out, &mut seen);
        let span = start as usize * PAGE..(start + count) as usize * PAGE;
        assert!(out[span.clone()] == want[span], "Fault {id} differs");
    }
    drop(tx);

    // Prefetch of every page.
    let req = pb::PrefetchRequest {
        snapshot: "vol".into(),
        ..Default::default()
    };
    let (out, seen) = prefetch_all(&mut c, req).await;
    assert_eq!(seen.len() as u64, PAGES);
    assert!(out == want, "Prefetch differs");
    // The parent is untouched.
    assert!(read_all(&mut c, SNAPSHOT).await == f.image);
}

/// Acks come in request order, each only once its pages are on disk: a
/// second store opened on the same directory reads them right after.
#[tokio::test]
async fn acks_in_order_after_durability() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    c.create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap();
    // Many runs in flight on one stream: answers in order.
    let runs: Vec<_> = (0..40u64)
        .map(|i| run(100 + i, i * 3, &pattern(2, i as u8 + 1)))
        .collect();
    let answers = write(&mut c, "vol", runs).await.unwrap();
    let ids: Vec<u64> = answers.iter().map(|a| a.request_id).collect();
    assert_eq!(ids, (100..140).collect::<Vec<_>>());
    assert!(answers.iter().all(|a| acked(a).is_some()), "{answers:?}");

    // One run at a time: each ack, then the bytes from a fresh store.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(open("vol")).await.unwrap();
    let mut acks = c
        .write_pages(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5u64 {
        let data = pattern(3, 0xC0 + i as u8);
        tx.send(run(i, 800 + i * 3, &data)).await.unwrap();
        let a = acks.next().await.unwrap().unwrap();
        assert_eq!((a.request_id, acked(&a)), (i, Some((800 + i * 3, 3))));
        let fresh = LocalStore::new(f.store.root()).unwrap();
        let chain = fresh
            .open_chain_blocking(&SnapshotId::new("vol").unwrap())
            .unwrap();
        let got = chain
            .read_blocking(faultline_proto::PageRange::new(PageIndex(800 + i * 3), 3).unwrap())
            .unwrap();
        assert!(got == data, "run {i} is not on disk after its ack");
    }
}

/// Bad writes and bad volumes get their codes and change nothing: out of
/// range, wrong size, a write to a sealed snapshot, a missing parent, a
/// taken name, too deep a chain; the stream goes on after an in-band error.
#[tokio::test]
async fn bad_input_gets_its_code_and_loses_nothing() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    c.create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap();
    let mut wrong_size = run(2, 5, &pattern(2, 9));
    if let Some(pb::write_pages_request::Kind::Run(r)) = &mut wrong_size.kind {
        let p = r.pages.as_mut().unwrap();
        p.count = 3;
    }
    let answers = write(
        &mut c,
        "vol",
        vec![
            run(1, PAGES - 1, &pattern(2, 7)),
            wrong_size,
            run(3, 20, &pattern(1, 0x33)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(error_code(&answers[0]), Some(Code::OutOfRange as i32));
    assert_eq!(error_code(&answers[1]), Some(Code::InvalidArgument as i32));
    assert_eq!(acked(&answers[2]), Some((20, 1)));
    let mut want = f.image.clone();
    overlay(&mut want, 20, &pattern(1, 0x33));
    assert!(
        read_all(&mut c, "vol").await == want,
        "a failed run changed pages"
    );

    // A snapshot takes no writes; a missing volume is NotFound.
    let e = write(&mut c, SNAPSHOT, vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = write(&mut c, "nope", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // A missing parent, a taken name, a bad size.
    let e = c
        .create_volume(from_snapshot("v2", "missing"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            name: "v3".into(),
            source: Some(pb::create_volume_request::Source::Empty(pb::EmptyVolume {
                page_size: 4096,
                size: 1000,
            })),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Too deep a chain: seal and stack until the bound.
    let mut parent = SNAPSHOT.to_owned();
    for depth in 2..=MAX_CHAIN_DEPTH {
        let v = format!("layer-v{depth}");
        c.create_volume(from_snapshot(&v, &parent)).await.unwrap();
        write(
            &mut c,
            &v,
            vec![run(0, depth as u64, &pattern(1, depth as u8))],
        )
        .await
        .unwrap();
        let s = format!("layer-s{depth}");
        let sealed = c
            .seal_volume(pb::SealVolumeRequest {
                volume: v,
                snapshot: s.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(sealed.depth, depth);
        parent = s;
    }
    let e = c
        .create_volume(from_snapshot("too-deep", &parent))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("flatten"), "{e:?}");
    // The deepest chain still reads right: each layer's page and the rest.
    let mut want = f.image.clone();
    for depth in 2..=MAX_CHAIN_DEPTH {
        overlay(&mut want, depth as u64, &pattern(1, depth as u8));
    }
    assert!(read_all(&mut c, &parent).await == want);
}

/// Sealing gives an immutable diff snapshot over the volume's parent that
/// holds only the written pages and restores to the same bytes; the volume
/// is gone and the snapshot refuses writes.
#[tokio::test]
async fn seal_gives_a_diff_snapshot() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    c.create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap();
    let data = pattern(8, 0x77);
    write(&mut c, "vol", vec![run(1, 100, &data)])
        .await
        .unwrap();
    let before = read_all(&mut c, "vol").await;
    let s = c
        .seal_volume(pb::SealVolumeRequest {
            volume: "vol".into(),
            snapshot: "sealed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(
        (s.kind, s.parent.as_str(), s.depth, s.own_pages),
        (0, SNAPSHOT, 2, 8)
    );
    assert!(read_all(&mut c, "sealed").await == before);
    assert_manifest_matches(&mut c, "sealed", &before).await;
    let e = write(&mut c, "sealed", vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .get_manifest(pb::GetManifestRequest {
            snapshot: "vol".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Listed with its kind and chain.
    let list = f.store.list().await.unwrap();
    let sealed = list.iter().find(|s| s.name.as_str() == "sealed").unwrap();
    assert_eq!(sealed.layer.kind, LayerKind::Snapshot);
    assert_eq!(sealed.layer.parent.as_ref().unwrap().as_str(), SNAPSHOT);
    // A fresh server process (a new store) reads the same.
    let fresh = LocalStore::new(f.store.root()).unwrap();
    let chain = fresh
        .open_chain_blocking(&SnapshotId::new("sealed").unwrap())
        .unwrap();
    let all = chain
        .read_blocking(faultline_proto::PageRange::new(PageIndex(0), PAGES).unwrap())
        .unwrap();
    assert!(all == before);
}

/// Writes a sparse diff file the way Firecracker does: the full size, data
/// only where pages changed.
fn sparse_diff(path: &Path, changed: &[(u64, u8)]) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(PAGES * PAGE as u64).unwrap();
    for &(p, fill) in changed {
        file.write_all_at(&pattern(1, fill), p * PAGE as u64)
            .unwrap();
    }
    file.sync_all().unwrap();
}

/// `import --parent` of a real sparse file makes a child whose holes read
/// as the parent's pages, and `flatten` makes a standalone copy equal to
/// the chain; `list` and `inspect` show kind, parent and depth.
#[tokio::test]
async fn import_parent_and_flatten() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let diff = f.dir.path().join("diff.mem");
    let changed = [(3, 0x11), (700, 0x22), (701, 0x23), (1023, 0)];
    sparse_diff(&diff, &changed);
    let store = store_arg(&f);
    server_bin(&[
        "import",
        "--store",
        &store,
        "--name",
        "child",
        "--parent",
        SNAPSHOT,
        "--mem-file",
        diff.to_str().unwrap(),
    ]);
    let mut want = f.image.clone();
    for &(p, fill) in &changed {
        overlay(&mut want, p, &pattern(1, fill));
    }
    assert!(read_all(&mut c, "child").await == want, "child differs");
    assert_manifest_matches(&mut c, "child", &want).await;

    server_bin(&[
        "flatten", "--store", &store, "--name", "child", "--as", "flat",
    ]);
    assert!(read_all(&mut c, "flat").await == want, "flat differs");
    let list = String::from_utf8(server_bin(&["list", "--store", &store]).stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("child ") && l.contains(&format!("over {SNAPSHOT} (depth 2)"))),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("flat ") && l.contains("standalone")),
        "{list}"
    );
    let inspect = String::from_utf8(
        server_bin(&[
            "inspect", "--store", &store, "--name", "child", "--json", "--verify",
        ])
        .stdout,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["kind"], "snapshot");
    assert_eq!(v["parent"], SNAPSHOT);
    assert_eq!(v["depth"], 2);
    assert_eq!(v["verified"], true);

    // A file of the wrong size is refused, and nothing is kept.
    let short = f.dir.path().join("short.mem");
    std::fs::write(&short, pattern(2, 1)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_faultline-server"))
        .args([
            "import", "--store", &store, "--name", "bad", "--parent", SNAPSHOT,
        ])
        .arg("--mem-file")
        .arg(&short)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bytes"));
    assert!(!f.store.root().join("bad").exists());
}

/// The CLI creates an empty volume (`--size`) that reads as zeros, takes
/// writes over gRPC, and seals into a standalone snapshot.
#[tokio::test]
async fn cli_volume_create_and_seal() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let store = store_arg(&f);
    server_bin(&[
        "volume", "create", "--store", &store, "--name", "empty", "--size", "4M",
    ]);
    assert!(read_all(&mut c, "empty").await.iter().all(|&b| b == 0));
    write(&mut c, "empty", vec![run(1, 9, &pattern(2, 0xEE))])
        .await
        .unwrap();
    server_bin(&[
        "volume",
        "seal",
        "--store",
        &store,
        "--name",
        "empty",
        "--as",
        "from-empty",
    ]);
    let mut want = vec![0u8; PAGES as usize * PAGE];
    overlay(&mut want, 9, &pattern(2, 0xEE));
    assert!(read_all(&mut c, "from-empty").await == want);
    assert_manifest_matches(&mut c, "from-empty", &want).await;
}

/// Tokens without the `write` right cannot create, write or seal volumes;
/// a token with it can.
#[tokio::test]
async fn tokens_without_write_are_refused() {
    let f = Fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let mut file = TokensFile::default();
    let reader = file
        .add_new("reader".into(), vec!["*".into()], vec![Right::Read])
        .unwrap()
        .0;
    let writer = file
        .add_new(
            "writer".into(),
            vec!["*".into()],
            vec![Right::Read, Right::Write],
        )
        .unwrap()
        .0;
    file.save(&tokens).unwrap();
    let server = faultline_server::spawn_with(
        "127.0.0.1:0".parse().unwrap(),
        f.store.clone() as Arc<dyn SnapshotStore>,
        ServeOptions {
            tokens: Some(tokens),
            ..ServeOptions::default()
        },
    )
    .await
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let as_token = |token: String| {
        FaultlineClient::with_interceptor(channel.clone(), move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(req)
        })
    };
    let mut r = as_token(reader);
    let e = r
        .create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut w = as_token(writer);
    w.create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap();
    let e = r
        .write_pages(tokio_stream::iter(vec![
            open("vol"),
            run(1, 0, &pattern(1, 1)),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = r
        .seal_volume(pb::SealVolumeRequest {
            volume: "vol".into(),
            snapshot: "s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The writer can.
    let mut acks = w
        .write_pages(tokio_stream::iter(vec![
            open("vol"),
            run(1, 0, &pattern(1, 1)),
        ]))
        .await
        .unwrap()
        .into_inner();
    let a = acks.next().await.unwrap().unwrap();
    assert_eq!(acked(&a), Some((0, 1)));
}

/// A page written while a `Fault` stream is open on the volume is served
/// with its new bytes on that stream, never as the zeros it was when the
/// stream opened.
#[tokio::test]
async fn fault_stream_sees_pages_written_since_it_opened() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    c.create_volume(pb::CreateVolumeRequest {
        name: "empty".into(),
        source: Some(pb::create_volume_request::Source::Empty(pb::EmptyVolume {
            page_size: PAGE as u64,
            size: PAGES * PAGE as u64,
        })),
    })
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(fault_open("empty")).await.unwrap();
    let mut answers = c
        .clone()
        .fault(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut fault = async |id: u64| {
        tx.send(fault_pages(id, 5, 1)).await.unwrap();
        let a = answers.next().await.unwrap().unwrap();
        let Some(pb::fault_response::Result::Pages(batch)) = a.result else {
            panic!("{a:?}");
        };
        let mut out = vec![0xAAu8; PAGES as usize * PAGE];
        apply(batch, &mut out, &mut Vec::new());
        out[5 * PAGE..6 * PAGE].to_vec()
    };
    assert!(fault(1).await.iter().all(|&b| b == 0));
    let data = pattern(1, 0x99);
    let acks = write(&mut c, "empty", vec![run(1, 5, &data)])
        .await
        .unwrap();
    assert_eq!(acked(&acks[0]), Some((5, 1)));
    assert!(fault(2).await == data, "a written page was served stale");
}

/// A working set recorded on a volume is listed in its manifest, served by
/// Prefetch first, and carried into the snapshot it is sealed as.
#[tokio::test]
async fn working_sets_of_a_volume() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    c.create_volume(from_snapshot("vol", SNAPSHOT))
        .await
        .unwrap();
    let recorded = c
        .record_working_set(pb::RecordWorkingSetRequest {
            snapshot: "vol".into(),
            name: String::new(),
            ranges: vec![range(900, 2), range(3, 1)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.pages, 3);
    c.seal_volume(pb::SealVolumeRequest {
        volume: "vol".into(),
        snapshot: "sealed".into(),
    })
    .await
    .unwrap();
    let m = c
        .get_manifest(pb::GetManifestRequest {
            snapshot: "sealed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.working_sets, ["default"]);
    let req = pb::PrefetchRequest {
        snapshot: "sealed".into(),
        order: pb::PrefetchOrder::WorkingSetOnly as i32,
        ..Default::default()
    };
    let (_, mut seen) = prefetch_all(&mut c, req).await;
    seen.sort_unstable();
    assert_eq!(seen, [3, 900, 901]);
}
