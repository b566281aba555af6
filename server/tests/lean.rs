//! The lean fault transport against a real server on 127.0.0.1:0, spoken
//! by hand (`faultline_proto::frame`): pages answered right, in-band errors
//! as on gRPC, malformed frames refused with a clear error and the
//! connection closed while others are served, the handshake timeout, and
//! lean connections counted against the connection limit.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_proto::frame::{self, FrameStream};
use faultline_proto::pb;
use faultline_proto::pb::fault_response::Result as R;
use faultline_server::server::{ServeOptions, TransportLimits};
use faultline_server::store::SnapshotStore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::{Fixture, SNAPSHOT, fault_open, fault_pages};

/// How long a test waits for something that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(10);

type Lean = FrameStream<TcpStream>;

/// A lean connection to `addr` that has sent the magic, an empty hello and
/// `first`.
async fn connect(addr: std::net::SocketAddr, first: &pb::FaultRequest) -> Lean {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut io = FrameStream::new(tcp, frame::MAX_ANSWER_FRAME_BYTES);
    io.write_all_of(&frame::MAGIC, &[&pb::FaultHello::default(), first])
        .await
        .unwrap();
    io
}

/// The next answer, within [`PROMPTLY`].
async fn answer(io: &mut Lean) -> Option<pb::FaultResponse> {
    tokio::time::timeout(PROMPTLY, io.read::<pb::FaultResponse>("a FaultResponse"))
        .await
        .expect("an answer in time")
        .expect("a well-formed answer")
}

/// The in-band error of `r`: its code and message.
fn error(r: Option<pb::FaultResponse>) -> (i32, String) {
    match r.and_then(|r| r.result) {
        Some(R::Error(e)) => (e.code, e.message),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Whether the server closes `io` within [`PROMPTLY`].
async fn closes(io: &mut Lean) -> bool {
    matches!(
        tokio::time::timeout(PROMPTLY, io.read::<pb::FaultResponse>("a FaultResponse")).await,
        Ok(Ok(None) | Err(_))
    )
}

/// Opened, then a request answered with the image's bytes, and an out-of-range one with an in-band error on the same open connection.
#[tokio::test]
async fn lean_answers_pages_and_in_band_errors() {
    let f = Fixture::start().await;
    let mut io = connect(f.server.addr(), &fault_open(SNAPSHOT)).await;
    assert_eq!(answer(&mut io).await, Some(frame::opened()));
    io.write(&fault_pages(7, 10, 4)).await.unwrap();
    let r = answer(&mut io).await.unwrap();
    assert_eq!(r.request_id, 7);
    let Some(R::Pages(batch)) = r.result else {
        panic!("{r:?}")
    };
    let mut out = vec![0u8; f.image.len()];
    let mut seen = Vec::new();
    common::apply(batch, &mut out, &mut seen);
    assert_eq!(seen.len(), 4);
    for p in seen {
        let p = p as usize;
        assert_eq!(
            &out[p * common::PAGE..(p + 1) * common::PAGE],
            f.pages(p as u64, 1)
        );
    }
    io.write(&fault_pages(8, common::PAGES, 1)).await.unwrap();
    let r = answer(&mut io).await.unwrap();
    assert_eq!(r.request_id, 8);
    let (code, msg) = error(Some(r));
    assert_eq!(code, tonic::Code::OutOfRange as i32, "{msg}");
    // Still open: the next request is answered.
    io.write(&fault_pages(9, 0, 1)).await.unwrap();
    assert_eq!(answer(&mut io).await.unwrap().request_id, 9);
}

/// An unknown snapshot, and pages asked before `open`, are refused with the gRPC stream's errors and the connection closed.
#[tokio::test]
async fn lean_bad_open_refused() {
    let f = Fixture::start().await;
    let mut io = connect(f.server.addr(), &fault_open("no-such")).await;
    let (code, msg) = error(answer(&mut io).await);
    assert_eq!(code, tonic::Code::NotFound as i32, "{msg}");
    assert!(closes(&mut io).await);
    let mut io = connect(f.server.addr(), &fault_pages(1, 0, 1)).await;
    let (code, msg) = error(answer(&mut io).await);
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "{msg}");
    assert!(msg.contains("must be `open`"), "{msg}");
    assert!(closes(&mut io).await);
}

/// Malformed frames (garbage bytes, an oversized length) get a clear InvalidArgument and a closed connection; the server goes on serving another lean connection and gRPC.
#[tokio::test]
async fn lean_malformed_frames_refused_server_keeps_serving() {
    let f = Fixture::start().await;
    let mut good = connect(f.server.addr(), &fault_open(SNAPSHOT)).await;
    assert_eq!(answer(&mut good).await, Some(frame::opened()));

    // Garbage where a FaultRequest should be, after a good open.
    let mut bad = connect(f.server.addr(), &fault_open(SNAPSHOT)).await;
    assert_eq!(answer(&mut bad).await, Some(frame::opened()));
    bad.write_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let (code, msg) = error(answer(&mut bad).await);
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "{msg}");
    assert!(msg.contains("does not decode as a FaultRequest"), "{msg}");
    assert!(closes(&mut bad).await);

    // A length far over the limit, in place of the hello: refused from the
    // header, nothing buffered.
    let tcp = TcpStream::connect(f.server.addr()).await.unwrap();
    let mut huge = FrameStream::new(tcp, frame::MAX_ANSWER_FRAME_BYTES);
    let mut bytes = frame::MAGIC.to_vec();
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.write_raw(&bytes).await.unwrap();
    let (code, msg) = error(answer(&mut huge).await);
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "{msg}");
    assert!(msg.contains("over the limit"), "{msg}");
    assert!(closes(&mut huge).await);

    // The first connection and gRPC are still served.
    good.write(&fault_pages(3, 0, 1)).await.unwrap();
    assert_eq!(answer(&mut good).await.unwrap().request_id, 3);
    let mut c = f.client().await;
    assert_eq!(
        c.list_snapshots(pb::ListSnapshotsRequest {})
            .await
            .unwrap()
            .into_inner()
            .snapshots
            .len(),
        1
    );
}

/// The fixture's store served again with `limits`.
async fn serve_with(f: &Fixture, limits: TransportLimits) -> faultline_server::ServerHandle {
    faultline_server::spawn_with(
        "127.0.0.1:0".parse().unwrap(),
        f.store.clone() as Arc<dyn SnapshotStore>,
        ServeOptions {
            limits,
            ..ServeOptions::default()
        },
    )
    .await
    .unwrap()
}

/// A lean connection that sends the magic and then nothing is closed after the handshake timeout, not before.
#[tokio::test]
async fn lean_silent_after_magic_times_out() {
    let f = Fixture::start().await;
    let timeout = Duration::from_millis(600);
    let server = serve_with(
        &f,
        TransportLimits {
            handshake_timeout: timeout,
            ..TransportLimits::default()
        },
    )
    .await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(&frame::MAGIC).await.unwrap();
    let mut io = FrameStream::new(tcp, frame::MAX_ANSWER_FRAME_BYTES);
    assert!(closes(&mut io).await);
    assert!(
        started.elapsed() >= timeout,
        "closed after {:?}",
        started.elapsed()
    );
}

/// Lean connections count against the connection limit: with a cap of 1, a second connection is closed while a lean one is open, and accepted once it has gone.
#[tokio::test]
async fn lean_connections_count_against_the_limit() {
    let f = Fixture::start().await;
    let server = serve_with(
        &f,
        TransportLimits {
            max_connections: 1,
            ..TransportLimits::default()
        },
    )
    .await;
    let mut first = connect(server.addr(), &fault_open(SNAPSHOT)).await;
    assert_eq!(answer(&mut first).await, Some(frame::opened()));
    let mut second = connect(server.addr(), &fault_open(SNAPSHOT)).await;
    assert!(closes(&mut second).await);
    drop(first);
    let started = Instant::now();
    loop {
        let mut again = connect(server.addr(), &fault_open(SNAPSHOT)).await;
        let opened = tokio::time::timeout(PROMPTLY, again.read::<pb::FaultResponse>("answer"))
            .await
            .ok()
            .and_then(|r| r.ok().flatten());
        if opened == Some(frame::opened()) {
            break;
        }
        assert!(started.elapsed() < PROMPTLY, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
