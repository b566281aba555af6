//! The lean prefetch transport against a real server on 127.0.0.1:0, spoken
//! by hand (`faultline_proto::frame`): the same batches as the gRPC stream
//! and then its end, the gRPC call's errors in-band, malformed frames
//! refused while the server goes on serving, the prefetch slots per client
//! shared with gRPC, and peers that go silent or away costing only
//! themselves.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_proto::frame::{self, FrameStream};
use faultline_proto::pb;
use faultline_proto::pb::prefetch_frame::Kind;
use faultline_server::Limits;
use faultline_server::server::{ServeOptions, TransportLimits};
use faultline_server::store::SnapshotStore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::{Fixture, PAGES, SNAPSHOT, range};

/// How long a test waits for something that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(10);

type Lean = FrameStream<TcpStream>;

/// A request for every page of `snapshot`, in batches of `batch_pages`
/// pages.
fn all_pages(snapshot: &str, batch_pages: u64) -> pb::PrefetchRequest {
    pb::PrefetchRequest {
        snapshot: snapshot.into(),
        order: pb::PrefetchOrder::Ranges as i32,
        ranges: vec![range(0, PAGES)],
        max_batch_bytes: batch_pages * common::PAGE as u64,
        ..Default::default()
    }
}

/// A lean prefetch connection to `addr` that has sent the magic, an empty
/// hello and `req`.
async fn open(addr: std::net::SocketAddr, req: &pb::PrefetchRequest) -> Lean {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut io = FrameStream::new(tcp, frame::MAX_ANSWER_FRAME_BYTES).reserving_whole_frames();
    io.write_all_of(&frame::PREFETCH_MAGIC, &[&pb::FaultHello::default(), req])
        .await
        .unwrap();
    io
}

/// The next frame, within [`PROMPTLY`]; `None` if the server closed.
async fn next(io: &mut Lean) -> Option<Kind> {
    tokio::time::timeout(PROMPTLY, io.read::<pb::PrefetchFrame>("a PrefetchFrame"))
        .await
        .expect("a frame in time")
        .expect("a well-formed frame")
        .map(|f| f.kind.expect("a frame with a kind"))
}

/// The batches up to the end frame, and whether the server closed after it.
async fn batches_to_end(io: &mut Lean) -> Vec<pb::PageBatch> {
    let mut out = Vec::new();
    loop {
        match next(io).await {
            Some(Kind::Batch(b)) => out.push(b),
            Some(Kind::End(_)) => break,
            other => panic!("expected a batch or the end, got {other:?}"),
        }
    }
    assert!(next(io).await.is_none(), "the server closes after the end");
    out
}

/// The in-band error that ends `io`: its code and message; the server closes after it.
async fn refused(io: &mut Lean) -> (i32, String) {
    let (code, message) = match next(io).await {
        Some(Kind::Error(e)) => (e.code, e.message),
        other => panic!("expected an error, got {other:?}"),
    };
    let end = tokio::time::timeout(PROMPTLY, io.read::<pb::PrefetchFrame>("a frame")).await;
    assert!(matches!(end, Ok(Ok(None) | Err(_))), "{end:?}");
    (code, message)
}

/// Every page of the image arrives once, byte for byte, in the same batches as the gRPC stream sends, then the end.
#[tokio::test]
async fn lean_prefetch_sends_the_grpc_streams_batches_then_end() {
    let f = Fixture::start().await;
    let req = all_pages(SNAPSHOT, 37);
    let mut io = open(f.server.addr(), &req).await;
    let lean = batches_to_end(&mut io).await;

    let mut c = f.client().await;
    let mut stream = c.prefetch(req).await.unwrap().into_inner();
    let mut grpc = Vec::new();
    while let Some(b) = stream.message().await.unwrap() {
        grpc.push(b);
    }
    assert_eq!(lean, grpc);
    assert!(lean.len() > 1, "several batches: {}", lean.len());

    let mut out = vec![0xa5u8; f.image.len()];
    let mut seen = Vec::new();
    for b in lean {
        common::apply(b, &mut out, &mut seen);
    }
    assert_eq!(seen.len() as u64, PAGES);
    assert!(out == f.image, "the pages differ from the image");
}

/// A request gRPC refuses is refused in-band with the same code and the connection closed: an unknown snapshot, a range past the end, an unknown order, ranges missing.
#[tokio::test]
async fn lean_prefetch_bad_requests_refused_like_grpc() {
    let f = Fixture::start().await;
    let cases = [
        (all_pages("no-such", 1), tonic::Code::NotFound, "no-such"),
        (
            pb::PrefetchRequest {
                ranges: vec![range(PAGES - 1, 2)],
                ..all_pages(SNAPSHOT, 1)
            },
            tonic::Code::OutOfRange,
            "",
        ),
        (
            pb::PrefetchRequest {
                order: 99,
                ..all_pages(SNAPSHOT, 1)
            },
            tonic::Code::InvalidArgument,
            "not a known prefetch order",
        ),
        (
            pb::PrefetchRequest {
                ranges: Vec::new(),
                ..all_pages(SNAPSHOT, 1)
            },
            tonic::Code::InvalidArgument,
            "ranges",
        ),
    ];
    let mut c = f.client().await;
    for (req, code, needle) in cases {
        let mut io = open(f.server.addr(), &req).await;
        let (got, msg) = refused(&mut io).await;
        assert_eq!(got, code as i32, "{msg}");
        assert!(msg.contains(needle), "{msg}");
        let status = c.prefetch(req).await.map(|_| ()).unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(status.message(), msg, "the same error on both transports");
    }
}

/// Garbage where the PrefetchRequest should be is refused with InvalidArgument naming it; the server goes on serving lean prefetches.
#[tokio::test]
async fn lean_prefetch_malformed_request_refused_server_keeps_serving() {
    let f = Fixture::start().await;
    let tcp = TcpStream::connect(f.server.addr()).await.unwrap();
    let mut bad = FrameStream::new(tcp, frame::MAX_ANSWER_FRAME_BYTES);
    let mut bytes = frame::PREFETCH_MAGIC.to_vec();
    frame::encode(&pb::FaultHello::default(), &mut bytes);
    bytes.extend_from_slice(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    bad.write_raw(&bytes).await.unwrap();
    let (code, msg) = refused(&mut bad).await;
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "{msg}");
    assert!(
        msg.contains("does not decode as a PrefetchRequest"),
        "{msg}"
    );

    let mut good = open(f.server.addr(), &all_pages(SNAPSHOT, 256)).await;
    assert_eq!(batches_to_end(&mut good).await.len(), 4);
}

/// The prefetch slots per client are shared with gRPC: while a gRPC stream holds the one slot, a lean prefetch is refused with ResourceExhausted naming the flag; once it is gone, the lean one runs.
#[tokio::test]
async fn lean_prefetch_counts_against_the_slots_per_client() {
    let f = Fixture::start_with(Limits {
        max_prefetch_streams_per_client: 1,
        ..Limits::default()
    })
    .await;
    let mut c = f.client().await;
    // One page per batch: the producer is far from done while unread.
    let held = c
        .prefetch(all_pages(SNAPSHOT, 1))
        .await
        .unwrap()
        .into_inner();
    let mut io = open(f.server.addr(), &all_pages(SNAPSHOT, 256)).await;
    let (code, msg) = refused(&mut io).await;
    assert_eq!(code, tonic::Code::ResourceExhausted as i32, "{msg}");
    assert!(msg.contains("max-prefetch-streams-per-client"), "{msg}");
    drop(held);
    // The slot is given back when the server notices the stream is gone.
    streams_once_the_slot_is_back(f.server.addr()).await;
}

/// Opens lean prefetches of every page until one streams (the client's slot is free again),
/// each refusal before it being ResourceExhausted; then reads that one to its end.
async fn streams_once_the_slot_is_back(addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let mut io = open(addr, &all_pages(SNAPSHOT, 256)).await;
        match next(&mut io).await {
            Some(Kind::Batch(_)) => {
                assert_eq!(batches_to_end(&mut io).await.len(), 3);
                return;
            }
            Some(Kind::Error(e)) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.code, tonic::Code::ResourceExhausted as i32, "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("the slot was not given back: {other:?}"),
        }
    }
}

/// A lean prefetch client that goes away mid-stream costs only itself: its prefetch slot comes back and the same client's next prefetch streams to its end.
#[tokio::test]
async fn lean_prefetch_client_gone_mid_stream_gives_its_slot_back() {
    let f = Fixture::start_with(Limits {
        max_prefetch_streams_per_client: 1,
        ..Limits::default()
    })
    .await;
    let mut io = open(f.server.addr(), &all_pages(SNAPSHOT, 1)).await;
    assert!(matches!(next(&mut io).await, Some(Kind::Batch(_))));
    drop(io);
    streams_once_the_slot_is_back(f.server.addr()).await;
}

/// A lean prefetch connection that sends its magic and hello and then nothing is closed after the handshake timeout, not before, and holds no slot.
#[tokio::test]
async fn lean_prefetch_silent_after_hello_times_out() {
    let f = Fixture::start().await;
    let timeout = Duration::from_millis(600);
    let server = faultline_server::spawn_with(
        "127.0.0.1:0".parse().unwrap(),
        f.store.clone() as Arc<dyn SnapshotStore>,
        ServeOptions {
            limits: TransportLimits {
                handshake_timeout: timeout,
                ..TransportLimits::default()
            },
            service_limits: Limits {
                max_prefetch_streams_per_client: 1,
                ..Limits::default()
            },
            ..ServeOptions::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    let mut greeting = frame::PREFETCH_MAGIC.to_vec();
    frame::encode(&pb::FaultHello::default(), &mut greeting);
    tcp.write_all(&greeting).await.unwrap();
    // While it waits, the same host's prefetch streams: the silent one holds no slot.
    streams_once_the_slot_is_back(server.addr()).await;
    let mut io = FrameStream::new(tcp, frame::MAX_ANSWER_FRAME_BYTES);
    let end = tokio::time::timeout(PROMPTLY, io.read::<pb::PrefetchFrame>("a frame")).await;
    assert!(matches!(end, Ok(Ok(None) | Err(_))), "{end:?}");
    assert!(
        started.elapsed() >= timeout,
        "closed after {:?}",
        started.elapsed()
    );
}
