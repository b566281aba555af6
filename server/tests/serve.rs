//! The server end to end over gRPC on 127.0.0.1: data paths, ordering,
//! concurrency, uploads, health, reflection, metrics and shutdown.

mod common;

use common::{Fixture, PAGE, PAGES, SNAPSHOT, apply, client, fault_open, fault_pages, range};
use faultline_proto::pb;
use faultline_server::testing::{PageKind, page_kind};
use tokio_stream::StreamExt;

fn read_req(ranges: Vec<pb::PageRange>, compression: i32) -> pb::ReadPagesRequest {
    pb::ReadPagesRequest {
        snapshot: SNAPSHOT.into(),
        ranges,
        compression,
    }
}

/// ReadPages returns every page byte for byte, with each codec.
#[tokio::test]
async fn read_pages_round_trip() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    for compression in [0, 1, 2] {
        let mut out = vec![0xAAu8; f.image.len()];
        let mut seen = Vec::new();
        for start in (0..PAGES).step_by(256) {
            let batch = c
                .read_pages(read_req(
                    vec![range(start, 128), range(start + 128, 128)],
                    compression,
                ))
                .await
                .unwrap()
                .into_inner();
            apply(batch, &mut out, &mut seen);
        }
        assert_eq!(seen.len() as u64, PAGES);
        assert!(
            out == f.image,
            "image differs with compression {compression}"
        );
    }
}

/// Zero pages are flagged in `zero` and never travel as bytes.
#[tokio::test]
async fn zero_pages_are_flagged_not_sent() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let batch = c
        .read_pages(read_req(vec![range(0, PAGES)], 0))
        .await
        .unwrap()
        .into_inner();
    let zero_pages: u64 = batch.zero.iter().map(|z| z.count).sum();
    let expected_zero = (0..PAGES)
        .filter(|&i| page_kind(i) == PageKind::Zero)
        .count() as u64;
    assert!(expected_zero > 0);
    assert_eq!(zero_pages, expected_zero);
    let data_bytes: usize = batch.runs.iter().map(|r| r.data.len()).sum();
    assert_eq!(data_bytes as u64, (PAGES - expected_zero) * PAGE as u64);
    for run in &batch.runs {
        for i in run.start..run.start + run.count {
            assert_ne!(page_kind(i), PageKind::Zero, "zero page {i} sent as data");
        }
    }
}

/// The Fault stream answers every request by id, byte for byte.
#[tokio::test]
async fn fault_stream_round_trip() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(fault_open(SNAPSHOT)).await.unwrap();
    let mut answers = c
        .fault(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Ask in a scattered order; ids are the start pages.
    let starts: Vec<u64> = (0..PAGES / 16)
        .map(|i| (i * 37) % (PAGES / 16) * 16)
        .collect();
    let sender = tokio::spawn(async move {
        for &s in &starts {
            tx.send(fault_pages(s, s, 16)).await.unwrap();
        }
        tx
    });
    let mut out = vec![0xAAu8; f.image.len()];
    let mut seen = Vec::new();
    for _ in 0..PAGES / 16 {
        let resp = answers.next().await.unwrap().unwrap();
        let Some(pb::fault_response::Result::Pages(batch)) = resp.result else {
            panic!("error answer {resp:?}");
        };
        let before = seen.len();
        apply(batch, &mut out, &mut seen);
        assert!(seen[before..].contains(&resp.request_id));
    }
    drop(sender.await.unwrap());
    assert!(
        answers.next().await.is_none(),
        "stream ends when the client closes"
    );
    assert!(out == f.image);
}

/// Prefetch sends the recorded working set first, in first-touch order, then
/// the rest ascending, skipping pages the client has, each page once.
#[tokio::test]
async fn prefetch_order_working_set_then_rest_minus_have() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let ws = vec![range(500, 1), range(10, 1), range(300, 3), range(10, 1)];
    let recorded = c
        .record_working_set(pb::RecordWorkingSetRequest {
            snapshot: SNAPSHOT.into(),
            name: String::new(),
            ranges: ws,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.pages, 5, "repeats are stored once");
    let mut have = vec![0u8; (PAGES / 8) as usize];
    for p in [10u64, 40, 41] {
        have[(p / 8) as usize] |= 1 << (p % 8);
    }
    let mut stream = c
        .prefetch(pb::PrefetchRequest {
            snapshot: SNAPSHOT.into(),
            order: pb::PrefetchOrder::WorkingSetThenRest as i32,
            working_set: String::new(),
            ranges: vec![],
            have: have.into(),
            compression: 0,
            // One page per batch, so the order within the stream is exact.
            max_batch_bytes: PAGE as u64,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = vec![0xAAu8; f.image.len()];
    let mut seen = Vec::new();
    while let Some(batch) = stream.next().await {
        apply(batch.unwrap(), &mut out, &mut seen);
    }
    let mut expected = vec![500, 300, 301, 302];
    expected.extend((0..PAGES).filter(|p| ![10, 40, 41, 500, 300, 301, 302].contains(p)));
    assert_eq!(seen, expected);
    for p in expected {
        assert_eq!(&out[p as usize * PAGE..][..PAGE], f.pages(p, 1));
    }
    // The manifest names the working set now.
    let m = c
        .get_manifest(pb::GetManifestRequest {
            snapshot: SNAPSHOT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.working_sets, vec!["default".to_owned()]);
}

/// A recorded working set is streamed from its own page file (`wspages-`), which holds its
/// non-zero pages in order: a page of the image damaged after recording is still sent as
/// recorded; a store opened again with that file torn ignores it and reads the image.
#[tokio::test]
async fn prefetch_reads_the_working_set_from_its_page_file() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    // Zero pages, long runs and one-page runs, some pages listed twice.
    let mut ws = vec![range(700, 40), range(10, 1), range(300, 3), range(10, 1)];
    ws.extend((0..60).map(|i| range((i * 131) % PAGES, 1)));
    c.record_working_set(pb::RecordWorkingSetRequest {
        snapshot: SNAPSHOT.into(),
        name: "boot".into(),
        ranges: ws,
    })
    .await
    .unwrap();
    let id = faultline_proto::SnapshotId::new(SNAPSHOT).unwrap();
    let name = faultline_proto::WorkingSetName::new("boot").unwrap();
    let dir = f.store.root().join(SNAPSHOT);
    let opened = f.store.open_blocking(&id).unwrap();
    let order = opened.working_set(&name).unwrap();
    let data: Vec<u64> = order
        .iter()
        .map(|p| p.0)
        .filter(|&p| page_kind(p) != PageKind::Zero)
        .collect();
    assert!(
        data.len() > 40 && data.len() < order.len(),
        "{} of {}",
        data.len(),
        order.len()
    );
    let pages_file = dir.join("wspages-boot");
    let len = std::fs::metadata(&pages_file).unwrap().len();
    assert_eq!(
        len,
        data.len() as u64 * PAGE as u64 + 32,
        "the set's data pages and a trailer"
    );

    // Damage the image's copy of one of the set's pages.
    let victim = data[data.len() / 2];
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&memory, &[0x5a; 64], victim * PAGE as u64).unwrap();
    let prefetch = |batch: u64| pb::PrefetchRequest {
        snapshot: SNAPSHOT.into(),
        order: pb::PrefetchOrder::WorkingSetOnly as i32,
        working_set: "boot".into(),
        max_batch_bytes: batch,
        ..Default::default()
    };
    for batch in [PAGE as u64, 0] {
        let mut stream = c.prefetch(prefetch(batch)).await.unwrap().into_inner();
        let mut out = vec![0xAAu8; f.image.len()];
        let mut seen = Vec::new();
        while let Some(b) = stream.next().await {
            apply(b.unwrap(), &mut out, &mut seen);
        }
        let want: Vec<u64> = order.iter().map(|p| p.0).collect();
        if batch == PAGE as u64 {
            assert_eq!(seen, want, "one page a batch: the recorded order");
        }
        for p in want {
            assert_eq!(&out[p as usize * PAGE..][..PAGE], f.pages(p, 1), "page {p}");
        }
    }

    // Torn: a store opened now serves the set from the image (which has the damage).
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&pages_file)
        .unwrap();
    file.set_len(len - 1).unwrap();
    let again = faultline_server::LocalStore::new(f.store.root().to_owned()).unwrap();
    let reopened = again.open_blocking(&id).unwrap();
    assert!(reopened.working_set(&name).is_some());
    use faultline_server::store::Snapshot;
    assert!(
        reopened.working_set_pages(&name).is_none(),
        "a torn page file is not used"
    );
}

/// Prefetch of everything in default-sized batches reproduces the image;
/// explicit ranges send exactly those pages.
#[tokio::test]
async fn prefetch_all_and_ranges() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let mut req = pb::PrefetchRequest {
        snapshot: SNAPSHOT.into(),
        compression: 1,
        ..Default::default()
    };
    let mut stream = c.prefetch(req.clone()).await.unwrap().into_inner();
    let mut out = vec![0xAAu8; f.image.len()];
    let mut seen = Vec::new();
    while let Some(batch) = stream.next().await {
        apply(batch.unwrap(), &mut out, &mut seen);
    }
    assert!(out == f.image);

    req.order = pb::PrefetchOrder::Ranges as i32;
    req.ranges = vec![range(900, 5), range(3, 2)];
    let mut stream = c.prefetch(req).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while let Some(batch) = stream.next().await {
        apply(batch.unwrap(), &mut out, &mut seen);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![3, 4, 900, 901, 902, 903, 904]);
}

/// 32 clients at once, each on its own connection, all get correct data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients() {
    let f = Fixture::start().await;
    let url = f.server.url();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client(&url).await;
            let mut out = vec![0xAAu8; PAGES as usize * PAGE];
            let mut seen = Vec::new();
            if i % 2 == 0 {
                let req = pb::PrefetchRequest {
                    snapshot: SNAPSHOT.into(),
                    max_batch_bytes: 64 << 10,
                    ..Default::default()
                };
                let mut stream = c.prefetch(req).await.unwrap().into_inner();
                while let Some(batch) = stream.next().await {
                    apply(batch.unwrap(), &mut out, &mut seen);
                }
            } else {
                for start in (0..PAGES).step_by(64) {
                    let s = (start + i * 64) % PAGES;
                    let batch = c
                        .read_pages(read_req(vec![range(s, 64)], 0))
                        .await
                        .unwrap()
                        .into_inner();
                    apply(batch, &mut out, &mut seen);
                }
            }
            out
        }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        assert!(out == f.image);
    }
}

/// An upload through CreateSnapshot, in chunks that split pages, produces
/// exactly the files an import of the same bytes does.
#[tokio::test]
async fn upload_equals_import() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let mut msgs = vec![pb::CreateSnapshotRequest {
        kind: Some(pb::create_snapshot_request::Kind::Header(
            pb::SnapshotHeader {
                name: "uploaded".into(),
                page_size: PAGE as u64,
                size: f.image.len() as u64,
                regions: vec![],
            },
        )),
    }];
    let mut offset = 0;
    for chunk in f.image.chunks(10_000) {
        msgs.push(pb::CreateSnapshotRequest {
            kind: Some(pb::create_snapshot_request::Kind::Chunk(
                pb::SnapshotChunk {
                    offset,
                    data: chunk.to_vec().into(),
                },
            )),
        });
        offset += chunk.len() as u64;
    }
    let resp = c
        .create_snapshot(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let summary = resp.snapshot.unwrap();
    assert_eq!(summary.page_count, PAGES);
    let root = f.store.root();
    for file in ["memory", "digests"] {
        let a = std::fs::read(root.join(SNAPSHOT).join(file)).unwrap();
        let b = std::fs::read(root.join("uploaded").join(file)).unwrap();
        assert!(a == b, "{file} differs between import and upload");
    }
    let strip = |name: &str| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join(name).join("manifest.json")).unwrap())
                .unwrap();
        v.as_object_mut().unwrap().remove("name");
        v
    };
    assert_eq!(strip(SNAPSHOT), strip("uploaded"));
    // And it serves.
    let mut req = read_req(vec![range(0, PAGES)], 0);
    req.snapshot = "uploaded".into();
    let mut out = vec![0u8; f.image.len()];
    apply(
        c.read_pages(req).await.unwrap().into_inner(),
        &mut out,
        &mut Vec::new(),
    );
    assert!(out == f.image);
}

/// Health reports SERVING for the service, and reflection lists it.
#[tokio::test]
async fn health_and_reflection() {
    let f = Fixture::start().await;
    let channel = tonic::transport::Endpoint::from_shared(f.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "faultline.v1.Faultline".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"faultline.v1.Faultline".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

/// The metrics endpoint reports pages and zero pages served.
#[tokio::test]
async fn metrics_endpoint_reports_what_was_served() {
    let f = Fixture::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    faultline_server::metrics::install();
    tokio::spawn(faultline_server::metrics::serve(
        listener,
        std::future::pending(),
    ));
    let mut c = f.client().await;
    c.read_pages(read_req(vec![range(0, PAGES)], 0))
        .await
        .unwrap();
    let _ = c
        .read_pages(read_req(vec![range(PAGES, 1)], 0))
        .await
        .unwrap_err();

    let body = http_get(addr, "/metrics").await;
    let value = |line_start: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{body}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // Other tests in this process may have been served too: at least.
    assert!(value("faultline_server_pages_served_total{rpc=\"read_pages\"}") >= PAGES as f64);
    assert!(value("faultline_server_zero_pages_skipped_total{rpc=\"read_pages\"}") > 0.0);
    assert!(
        value("faultline_server_request_errors_total{rpc=\"read_pages\",code=\"OutOfRange\"}")
            >= 1.0
    );
    assert!(body.contains("faultline_server_request_duration_seconds_bucket"));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// On shutdown the server stops accepting, but a prefetch stream in flight
/// runs to its end.
#[tokio::test]
async fn shutdown_lets_streams_finish() {
    let mut f = Fixture::start().await;
    let mut c = f.client().await;
    let req = pb::PrefetchRequest {
        snapshot: SNAPSHOT.into(),
        max_batch_bytes: PAGE as u64,
        ..Default::default()
    };
    let mut stream = c.prefetch(req).await.unwrap().into_inner();
    let mut out = vec![0xAAu8; f.image.len()];
    let mut seen = Vec::new();
    apply(stream.next().await.unwrap().unwrap(), &mut out, &mut seen);
    f.server.begin_shutdown();
    while let Some(batch) = stream.next().await {
        apply(batch.unwrap(), &mut out, &mut seen);
    }
    assert!(out == f.image);
    let Fixture { server, .. } = f;
    tokio::time::timeout(std::time::Duration::from_secs(10), server.join())
        .await
        .expect("server stops once the stream is done")
        .unwrap();
}
