//! Every kind of bad request gets its gRPC code and a message that says what
//! was wrong; nothing is lost and the server keeps serving.

mod common;

use common::{Fixture, PAGES, SNAPSHOT, apply, assert_code, fault_open, header, range};
use faultline_proto::pb;
use tokio_stream::StreamExt;
use tonic::Code;

fn read(snapshot: &str, ranges: Vec<pb::PageRange>) -> pb::ReadPagesRequest {
    pb::ReadPagesRequest {
        snapshot: snapshot.into(),
        ranges,
        compression: 0,
    }
}

/// Unary RPCs: unknown snapshot, out of range, too large, malformed.
#[tokio::test]
async fn unary_requests_get_their_codes() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    assert_code(
        c.read_pages(read("nope", vec![range(0, 1)])).await,
        Code::NotFound,
        "does not exist",
    );
    assert_code(
        c.get_manifest(pb::GetManifestRequest {
            snapshot: "nope".into(),
        })
        .await,
        Code::NotFound,
        "nope",
    );
    assert_code(
        c.read_pages(read(SNAPSHOT, vec![range(PAGES - 1, 2)]))
            .await,
        Code::OutOfRange,
        "1024 pages",
    );
    assert_code(
        c.read_pages(read(SNAPSHOT, vec![range(u64::MAX, 2)])).await,
        Code::InvalidArgument,
        "overflows",
    );
    assert_code(
        c.read_pages(read(SNAPSHOT, vec![range(0, 0)])).await,
        Code::InvalidArgument,
        "at least one page",
    );
    assert_code(
        c.read_pages(read(SNAPSHOT, vec![])).await,
        Code::InvalidArgument,
        "ranges",
    );
    assert_code(
        c.read_pages(read(SNAPSHOT, vec![range(0, 1); 5000])).await,
        Code::ResourceExhausted,
        "limit of 4096",
    );
    // 16 MiB is the limit: 4097 pages of 4 KiB is one page too many. The
    // snapshot has only 1024 pages, so ask for the same pages repeatedly.
    assert_code(
        c.read_pages(read(SNAPSHOT, vec![range(0, 1024); 5])).await,
        Code::ResourceExhausted,
        "limit of 16777216",
    );
    for bad_name in ["../etc", "a/b", "", &"x".repeat(200)] {
        assert_code(
            c.read_pages(read(bad_name, vec![range(0, 1)])).await,
            Code::InvalidArgument,
            "snapshot",
        );
    }
    let mut bad_codec = read(SNAPSHOT, vec![range(0, 1)]);
    bad_codec.compression = 42;
    assert_code(
        c.read_pages(bad_codec).await,
        Code::InvalidArgument,
        "compression",
    );

    let prefetch = |have: Vec<u8>, order: i32| pb::PrefetchRequest {
        snapshot: SNAPSHOT.into(),
        order,
        have: have.into(),
        ..Default::default()
    };
    assert_code(
        c.prefetch(prefetch(vec![0; 3], 0)).await,
        Code::InvalidArgument,
        "128 bytes",
    );
    assert_code(
        c.prefetch(prefetch(vec![], 9)).await,
        Code::InvalidArgument,
        "order",
    );
    assert_code(
        c.prefetch(prefetch(vec![], pb::PrefetchOrder::WorkingSetOnly as i32))
            .await,
        Code::NotFound,
        "no working set",
    );
    assert_code(
        c.prefetch(prefetch(vec![], pb::PrefetchOrder::Ranges as i32))
            .await,
        Code::InvalidArgument,
        "ranges",
    );
    let record = |name: &str, ranges| pb::RecordWorkingSetRequest {
        snapshot: SNAPSHOT.into(),
        name: name.into(),
        ranges,
    };
    assert_code(
        c.record_working_set(record("", vec![range(PAGES, 1)]))
            .await,
        Code::OutOfRange,
        "past the end",
    );
    assert_code(
        c.record_working_set(record("../x", vec![range(0, 1)]))
            .await,
        Code::InvalidArgument,
        "working_set",
    );
    assert_code(
        c.record_working_set(record("", vec![range(0, PAGES); 2]))
            .await,
        Code::InvalidArgument,
        "each page once",
    );

    // The server still serves correctly.
    let mut out = vec![0u8; f.image.len()];
    apply(
        c.read_pages(read(SNAPSHOT, vec![range(0, PAGES)]))
            .await
            .unwrap()
            .into_inner(),
        &mut out,
        &mut Vec::new(),
    );
    assert!(out == f.image);
}

fn pages(request_id: u64, r: Option<pb::PageRange>) -> pb::FaultRequest {
    pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Pages(pb::FaultPages {
            request_id,
            range: r,
        })),
    }
}

/// On the Fault stream, bad requests get in-band errors and the stream goes
/// on answering good ones.
#[tokio::test]
async fn fault_stream_errors_are_in_band() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let msgs = vec![
        fault_open(SNAPSHOT),
        pages(1, Some(range(PAGES, 1))),
        pages(2, None),
        pages(3, Some(range(0, 5000))),
        fault_open(SNAPSHOT),
        pages(5, Some(range(7, 1))),
    ];
    let mut answers = c
        .fault(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(resp) = answers.next().await {
        got.push(resp.unwrap());
    }
    // Answers may come in any order; the misplaced `open` has id 0.
    got.sort_by_key(|r| r.request_id);
    let code = |i: usize| match &got[i].result {
        Some(pb::fault_response::Result::Error(e)) => e.code,
        other => panic!("answer {i} is not an error: {other:?}"),
    };
    assert_eq!(got.len(), 5);
    assert_eq!(
        (got[0].request_id, code(0)),
        (0, Code::InvalidArgument as i32)
    );
    assert_eq!((got[1].request_id, code(1)), (1, Code::OutOfRange as i32));
    assert_eq!(
        (got[2].request_id, code(2)),
        (2, Code::InvalidArgument as i32)
    );
    assert_eq!(
        (got[3].request_id, code(3)),
        (3, Code::ResourceExhausted as i32)
    );
    assert_eq!(got[4].request_id, 5);
    let Some(pb::fault_response::Result::Pages(batch)) = got[4].result.clone() else {
        panic!("good request after bad ones not answered");
    };
    let mut out = vec![0u8; f.image.len()];
    apply(batch, &mut out, &mut Vec::new());
    assert_eq!(&out[7 * 4096..8 * 4096], f.pages(7, 1));

    // A stream that does not start with `open`, or opens an unknown snapshot,
    // fails as a whole.
    assert_code(
        c.fault(tokio_stream::iter(vec![pages(1, Some(range(0, 1)))]))
            .await,
        Code::InvalidArgument,
        "must be `open`",
    );
    assert_code(
        c.fault(tokio_stream::iter(vec![fault_open("nope")])).await,
        Code::NotFound,
        "nope",
    );
}

fn chunk(offset: u64, len: usize) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        kind: Some(pb::create_snapshot_request::Kind::Chunk(
            pb::SnapshotChunk {
                offset,
                data: vec![1u8; len].into(),
            },
        )),
    }
}

/// Uploads that end early, overrun, arrive out of order, or are malformed
/// are refused, and leave no snapshot and no partial files behind.
#[tokio::test]
async fn bad_uploads_leave_nothing() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let cases: Vec<(Vec<pb::CreateSnapshotRequest>, Code, &str)> = vec![
        (
            vec![header("u", 8192), chunk(0, 4096)],
            Code::InvalidArgument,
            "ended after 4096",
        ),
        (
            vec![header("u", 8192), chunk(0, 9000)],
            Code::InvalidArgument,
            "larger than",
        ),
        (
            vec![header("u", 8192), chunk(4096, 4096)],
            Code::InvalidArgument,
            "in order",
        ),
        (
            vec![header("u", 1000)],
            Code::InvalidArgument,
            "multiple of the page size",
        ),
        (
            vec![header("u", 0)],
            Code::InvalidArgument,
            "multiple of the page size",
        ),
        (vec![chunk(0, 4096)], Code::InvalidArgument, "header"),
        (
            vec![header("u", 4096), header("u", 4096)],
            Code::InvalidArgument,
            "chunk",
        ),
        (vec![header("a/b", 4096)], Code::InvalidArgument, "snapshot"),
        (
            vec![header(SNAPSHOT, 4096), chunk(0, 4096)],
            Code::AlreadyExists,
            "already exists",
        ),
    ];
    for (msgs, code, needle) in cases {
        assert_code(
            c.create_snapshot(tokio_stream::iter(msgs)).await,
            code,
            needle,
        );
    }
    // An upload whose client goes away mid-stream is discarded too.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header("v", 1 << 20)).await.unwrap();
    tx.send(chunk(0, 4096)).await.unwrap();
    let mut c2 = f.client().await;
    let call = tokio::spawn(async move {
        c2.create_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    call.abort();
    let _ = call.await;
    drop(tx);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let names: Vec<String> = std::fs::read_dir(f.store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![SNAPSHOT.to_owned()], "leftovers in the store");
    let list = c
        .list_snapshots(pb::ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.snapshots.len(), 1);
}

/// A snapshot whose files were damaged is reported as DataLoss, not served.
#[tokio::test]
async fn corrupt_snapshot_files_are_refused() {
    let f = Fixture::start().await;
    let root = f.store.root().to_owned();
    for (name, damage) in [
        ("truncated", "memory"),
        ("nodigests", "digests"),
        ("badjson", "manifest.json"),
    ] {
        std::fs::create_dir(root.join(name)).unwrap();
        for file in ["memory", "digests", "manifest.json"] {
            std::fs::copy(root.join(SNAPSHOT).join(file), root.join(name).join(file)).unwrap();
        }
        let manifest = root.join(name).join("manifest.json");
        let text = std::fs::read_to_string(&manifest)
            .unwrap()
            .replace(&format!("\"{SNAPSHOT}\""), &format!("\"{name}\""));
        std::fs::write(&manifest, text).unwrap();
        let target = root.join(name).join(damage);
        match damage {
            "memory" => std::fs::File::options()
                .write(true)
                .open(&target)
                .unwrap()
                .set_len(4096)
                .unwrap(),
            "digests" => std::fs::write(&target, [0u8; 10]).unwrap(),
            _ => std::fs::write(&target, b"{ not json").unwrap(),
        }
        let mut c = f.client().await;
        assert_code(
            c.get_manifest(pb::GetManifestRequest {
                snapshot: name.into(),
            })
            .await,
            Code::DataLoss,
            "corrupt",
        );
    }
}

/// Messages above the server's 32 MiB decoding limit get ResourceExhausted,
/// on unary calls and on streams, with the limit in the message.
#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let huge_name = "x".repeat(33 << 20);
    assert_code(
        c.read_pages(read(&huge_name, vec![range(0, 1)])).await,
        Code::ResourceExhausted,
        "the limit is",
    );
    assert_code(
        c.create_snapshot(tokio_stream::iter(vec![
            header("big", 64 << 20),
            chunk(0, 33 << 20),
        ]))
        .await,
        Code::ResourceExhausted,
        "the limit is",
    );
    // Still serving.
    c.read_pages(read(SNAPSHOT, vec![range(0, 1)]))
        .await
        .unwrap();
}
