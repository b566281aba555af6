//! Transport-level limits against a real server on 127.0.0.1:0: the
//! connection cap, the handshake (and HTTP/2 preface) timeout, and the cap
//! on concurrent streams per connection. Each test sets a small limit and
//! checks both sides of it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_proto::pb;
use faultline_server::server::{ServeOptions, TransportLimits};
use faultline_server::store::SnapshotStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::Fixture;

/// How long a test waits for something that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(10);

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

/// Whether the server closes `conn` (EOF or reset) within `limit`.
async fn closed_within(conn: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // The server's SETTINGS frame, if it got that far: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

async fn list(url: &str) -> Result<usize, String> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut c = pb::faultline_client::FaultlineClient::new(ch);
    c.list_snapshots(pb::ListSnapshotsRequest {})
        .await
        .map(|r| r.into_inner().snapshots.len())
        .map_err(|s| s.to_string())
}

/// With a cap of 2 connections, a third is closed at once while two are
/// open, and accepted again once one of them has gone.
#[tokio::test]
async fn connection_limit() {
    let f = Fixture::start().await;
    let server = serve_with(
        &f,
        TransportLimits {
            max_connections: 2,
            ..TransportLimits::default()
        },
    )
    .await;
    let url = server.url();
    let mut held = Vec::new();
    for _ in 0..2 {
        let ch = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::faultline_client::FaultlineClient::new(ch.clone());
        c.list_snapshots(pb::ListSnapshotsRequest {}).await.unwrap();
        held.push(ch);
    }
    let mut third = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    third
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .ok();
    assert!(
        closed_within(&mut third, PROMPTLY).await,
        "a third connection was kept"
    );

    held.pop();
    let deadline = Instant::now() + PROMPTLY;
    loop {
        match list(&url).await {
            Ok(n) => {
                assert_eq!(n, 1);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no connection accepted after one closed: {e}"),
        }
    }
    drop(held);
    server.shutdown().await.unwrap();
}

/// A connection that sends nothing is closed after the handshake timeout
/// (not before), one that sends something other than HTTP/2 at once, and
/// neither holds up other clients.
#[tokio::test]
async fn handshake_timeout_and_non_http2_clients() {
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
    let mut silent = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let mut garbage = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut garbage, PROMPTLY).await);
    // Served while the silent connection waits.
    assert_eq!(list(&server.url()).await.unwrap(), 1);
    assert!(closed_within(&mut silent, PROMPTLY).await);
    assert!(
        started.elapsed() >= timeout,
        "closed after {:?}, before the timeout",
        started.elapsed()
    );
    server.shutdown().await.unwrap();
}

/// With a cap of 2 streams per connection, a third stream on the same
/// connection waits until one of the two ends.
#[tokio::test]
async fn streams_per_connection_limit() {
    let f = Fixture::start().await;
    let server = serve_with(
        &f,
        TransportLimits {
            max_streams_per_connection: 2,
            ..TransportLimits::default()
        },
    )
    .await;
    let ch = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let c = pb::faultline_client::FaultlineClient::new(ch);
    let open = || {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(common::fault_open(common::SNAPSHOT)).unwrap();
        let mut c = c.clone();
        async move {
            let answers = c
                .fault(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            (tx, answers)
        }
    };
    let first = open().await;
    let second = open().await;
    let third = tokio::spawn(open());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third stream opened past the limit");
    drop(first);
    let third = tokio::time::timeout(PROMPTLY, third)
        .await
        .expect("the third stream opened once one ended")
        .unwrap();
    // Streams still open would hold up the graceful shutdown.
    drop((second, third));
    server.shutdown().await.unwrap();
}
