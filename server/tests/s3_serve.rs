//! `faultline-server` on an S3 object store (a real single-node Garage on
//! 127.0.0.1): the CLI's import, list and inspect on `--store s3://...`,
//! restores through ReadPages, Fault and Prefetch with verified pages,
//! uploads, shared chunks, one store read per chunk for many restores, and
//! the codes of a corrupt chunk and of an outage; readiness.

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use faultline_proto::pb::faultline_client::FaultlineClient;
use faultline_proto::{PageSize, pb};
use faultline_server::ServerHandle;
use faultline_server::garage::Garage;
use faultline_server::store::SnapshotStore;
use faultline_server::store::object::{
    ChunkId, ObjectSnapshotStore, ObjectStoreOptions, RetryPolicy,
};
use faultline_server::testing::{PageKind, page_kind, synthetic_image};
use futures::StreamExt;
use tonic::transport::Channel;

const PAGE: usize = 4096;
/// 10 MiB: five 2 MiB chunks, chunk 3 all zeros.
const PAGES: u64 = 2560;
const BIN: &str = env!("CARGO_BIN_EXE_faultline-server");

fn image(seed: u64) -> Vec<u8> {
    image_of(seed, PAGES)
}

/// A synthetic image of `pages` pages whose chunk 3 is all zeros.
fn image_of(seed: u64, pages: u64) -> Vec<u8> {
    let mut img = synthetic_image(seed, pages, PAGE);
    img[6 << 20..8 << 20].fill(0);
    img
}

/// Runs the `faultline-server` binary with Garage's `AWS_*` variables.
fn cli(garage: &Garage, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .envs(garage.aws_env())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "faultline-server {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Writes `img` into `store` as snapshot "vm" of 4 KiB pages.
async fn put_vm(store: &ObjectSnapshotStore, img: &[u8]) {
    let spec = faultline_server::store::SnapshotSpec::new(
        faultline_proto::SnapshotId::new("vm").unwrap(),
        PageSize::Size4K,
        img.len() as u64,
        vec![],
    )
    .unwrap();
    let mut w = store.create(spec).await.unwrap();
    w.write(img).await.unwrap();
    w.finish().await.unwrap();
}

async fn serve(store: Arc<ObjectSnapshotStore>) -> ServerHandle {
    faultline_server::spawn(
        "127.0.0.1:0".parse().unwrap(),
        store as Arc<dyn SnapshotStore>,
    )
    .await
    .unwrap()
}

async fn client(server: &ServerHandle) -> FaultlineClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    FaultlineClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Writes a batch's pages into `out`, checking each against the manifest's digest.
fn apply(batch: pb::PageBatch, m: &faultline_proto::Manifest, out: &mut [u8], pages: &mut u64) {
    let decoded =
        faultline_proto::codec::PageBatch::decode(batch, PageSize::Size4K, m.page_count).unwrap();
    for run in decoded.runs {
        for (p, data) in run.pages(PageSize::Size4K) {
            assert!(m.verify(p, &data), "page {} does not match its digest", p.0);
            out[p.0 as usize * PAGE..][..PAGE].copy_from_slice(&data);
            *pages += 1;
        }
    }
    for z in decoded.zero {
        for p in z.iter() {
            out[p.0 as usize * PAGE..][..PAGE].fill(0);
            *pages += 1;
        }
    }
}

async fn manifest(c: &mut FaultlineClient<Channel>, name: &str) -> faultline_proto::Manifest {
    let m = c
        .get_manifest(pb::GetManifestRequest {
            snapshot: name.into(),
        })
        .await
        .unwrap()
        .into_inner();
    faultline_proto::Manifest::try_from(m).unwrap()
}

fn prefetch_all(name: &str) -> pb::PrefetchRequest {
    pb::PrefetchRequest {
        snapshot: name.into(),
        order: pb::PrefetchOrder::WorkingSetThenRest as i32,
        ..Default::default()
    }
}

/// Restores `name` in full with one Prefetch stream.
async fn restore(c: &mut FaultlineClient<Channel>, name: &str) -> Vec<u8> {
    let m = manifest(c, name).await;
    let mut stream = c.prefetch(prefetch_all(name)).await.unwrap().into_inner();
    let mut out = vec![0xAAu8; m.image_size() as usize];
    let mut pages = 0;
    while let Some(batch) = stream.next().await {
        apply(batch.unwrap(), &m, &mut out, &mut pages);
    }
    assert_eq!(pages, m.page_count);
    out
}

/// The CLI imports into S3 (reporting the chunks a second snapshot of the same base did not
/// upload), lists and verifies; a server on the store restores through ReadPages, Fault and
/// Prefetch, every page checked.
#[tokio::test]
async fn cli_import_list_inspect_then_restore() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = garage.url("cli");
    let base = image(11);
    let mut child = base.clone();
    child[(4 << 20) + 3] ^= 0x5a;
    std::fs::write(dir.path().join("base.img"), &base).unwrap();
    std::fs::write(dir.path().join("child.img"), &child).unwrap();
    let mem = |n: &str| dir.path().join(n).to_string_lossy().into_owned();

    let out = stdout(&cli(
        &garage,
        &[
            "import",
            "--store",
            &url,
            "--name",
            "base",
            "--mem-file",
            &mem("base.img"),
        ],
    ));
    assert!(out.contains("4 uploaded"), "{out}");
    assert!(out.contains("1 zero"), "{out}");
    let out = stdout(&cli(
        &garage,
        &[
            "import",
            "--store",
            &url,
            "--name",
            "child",
            "--mem-file",
            &mem("child.img"),
        ],
    ));
    assert!(out.contains("1 uploaded"), "{out}");
    assert!(out.contains("3 already in"), "{out}");

    let list: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&garage, &["list", "--store", &url, "--json"]))).unwrap();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["base", "child"]);
    let inspect: serde_json::Value = serde_json::from_str(&stdout(&cli(
        &garage,
        &[
            "inspect", "--store", &url, "--name", "child", "--verify", "--json",
        ],
    )))
    .unwrap();
    assert_eq!(inspect["verified"], true);
    assert_eq!(inspect["page_count"], PAGES);
    assert_eq!(inspect["chunks"]["chunks"], 5);
    assert_eq!(inspect["chunks"]["stored"], 4);
    let text = stdout(&cli(
        &garage,
        &["inspect", "--store", &url, "--name", "base"],
    ));
    assert!(text.contains("4 stored (1 all zeros"), "{text}");

    let store = Arc::new(garage.store("cli", ObjectStoreOptions::default()).unwrap());
    let server = serve(store).await;
    let mut c = client(&server).await;
    // Prefetch.
    assert!(restore(&mut c, "child").await == child);
    assert!(restore(&mut c, "base").await == base);
    // ReadPages across chunk boundaries.
    let m = manifest(&mut c, "child").await;
    let batch = c
        .read_pages(pb::ReadPagesRequest {
            snapshot: "child".into(),
            ranges: vec![
                pb::PageRange {
                    start: 500,
                    count: 30,
                },
                pb::PageRange {
                    start: 2000,
                    count: 100,
                },
            ],
            compression: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = child.clone();
    out[500 * PAGE..530 * PAGE].fill(0xAA);
    out[2000 * PAGE..2100 * PAGE].fill(0xAA);
    let mut pages = 0;
    apply(batch, &m, &mut out, &mut pages);
    assert_eq!(pages, 130);
    assert!(out == child);
    // Fault.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Open(pb::FaultOpen {
            snapshot: "child".into(),
            compression: 0,
        })),
    })
    .await
    .unwrap();
    let mut answers = c
        .fault(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut out = vec![0xAAu8; child.len()];
    for (id, start) in [(1u64, 1024u64), (2, 0), (3, 2559), (4, 1536)] {
        tx.send(pb::FaultRequest {
            kind: Some(pb::fault_request::Kind::Pages(pb::FaultPages {
                request_id: id,
                range: Some(pb::PageRange { start, count: 1 }),
            })),
        })
        .await
        .unwrap();
        let resp = answers.next().await.unwrap().unwrap();
        assert_eq!(resp.request_id, id);
        let Some(pb::fault_response::Result::Pages(batch)) = resp.result else {
            panic!("fault {id} failed: {resp:?}");
        };
        let mut pages = 0;
        apply(batch, &m, &mut out, &mut pages);
        assert_eq!(pages, 1);
        let p = start as usize * PAGE;
        assert!(out[p..p + PAGE] == child[p..p + PAGE]);
    }
}

/// An upload through CreateSnapshot lands in S3: another server on the same prefix serves it.
#[tokio::test]
async fn upload_lands_in_s3() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let store = Arc::new(garage.store("up", ObjectStoreOptions::default()).unwrap());
    let server = serve(store.clone()).await;
    let mut c = client(&server).await;
    let img = image(12);
    let mut msgs = vec![pb::CreateSnapshotRequest {
        kind: Some(pb::create_snapshot_request::Kind::Header(
            pb::SnapshotHeader {
                name: "uploaded".into(),
                page_size: PAGE as u64,
                size: img.len() as u64,
                regions: vec![],
            },
        )),
    }];
    for (i, piece) in img.chunks(1 << 20).enumerate() {
        msgs.push(pb::CreateSnapshotRequest {
            kind: Some(pb::create_snapshot_request::Kind::Chunk(
                pb::SnapshotChunk {
                    offset: (i << 20) as u64,
                    data: piece.to_vec().into(),
                },
            )),
        });
    }
    let summary = c
        .create_snapshot(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(summary.page_count, PAGES);
    let (_, stats) = store.last_write().unwrap();
    assert_eq!((stats.uploaded, stats.zero), (4, 1));
    let other = Arc::new(garage.store("up", ObjectStoreOptions::default()).unwrap());
    let server2 = serve(other).await;
    let mut c2 = client(&server2).await;
    assert!(restore(&mut c2, "uploaded").await == img);
}

/// Eight concurrent Prefetch restores of one snapshot through one server read each stored chunk
/// from S3 once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_restores_one_get_per_chunk() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let img = image(13);
    let writer = garage.store("sf", ObjectStoreOptions::default()).unwrap();
    put_vm(&writer, &img).await;

    let store = Arc::new(garage.store("sf", ObjectStoreOptions::default()).unwrap());
    let server = serve(store.clone()).await;
    let mut c = client(&server).await;
    manifest(&mut c, "vm").await;
    let before = store.io_counts();
    let restores = (0..8).map(|_| {
        let url = server.url();
        tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut c = FaultlineClient::new(channel).max_decoding_message_size(64 << 20);
            restore(&mut c, "vm").await
        })
    });
    for r in futures::future::join_all(restores).await {
        assert!(r.unwrap() == img);
    }
    let after = store.io_counts();
    assert_eq!(after.gets - before.gets, 4, "one GET per stored chunk");
    assert_eq!(after.get_bytes - before.get_bytes, 8 << 20);
}

/// A chunk corrupted in S3 is answered DATA_LOSS (ReadPages, and in-band on a Fault stream),
/// never as wrong bytes.
#[tokio::test]
async fn corrupt_chunk_is_data_loss() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let img = image(14);
    let store = Arc::new(garage.store("bad", ObjectStoreOptions::default()).unwrap());
    put_vm(&store, &img).await;
    let chunk1 = &img[2 << 20..4 << 20];
    let mut bad = chunk1.to_vec();
    bad[100_000] ^= 0x80;
    let (io, keys) = store.io();
    io.put_raw(&keys.chunk(&ChunkId::of(chunk1)), bad.into())
        .await
        .unwrap();

    // Non-zero pages of the corrupt chunk (zero pages are never read).
    let mut in_chunk1 = (512..1024).filter(|&p| page_kind(p) != PageKind::Zero);
    let (p1, p2) = (in_chunk1.next().unwrap(), in_chunk1.next().unwrap());
    let server = serve(store.clone()).await;
    let mut c = client(&server).await;
    let err = c
        .read_pages(pb::ReadPagesRequest {
            snapshot: "vm".into(),
            ranges: vec![pb::PageRange {
                start: p1,
                count: 1,
            }],
            compression: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    assert!(err.message().contains("corrupt"), "{}", err.message());

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Open(pb::FaultOpen {
            snapshot: "vm".into(),
            compression: 0,
        })),
    })
    .await
    .unwrap();
    tx.send(pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Pages(pb::FaultPages {
            request_id: 9,
            range: Some(pb::PageRange {
                start: p2,
                count: 1,
            }),
        })),
    })
    .await
    .unwrap();
    let mut answers = c
        .fault(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let resp = answers.next().await.unwrap().unwrap();
    let Some(pb::fault_response::Result::Error(e)) = resp.result else {
        panic!("a corrupt chunk was served: {resp:?}");
    };
    assert_eq!(e.code, tonic::Code::DataLoss as i32);
    // The other chunks still serve.
    let ok = c
        .read_pages(pb::ReadPagesRequest {
            snapshot: "vm".into(),
            ranges: vec![pb::PageRange {
                start: 10,
                count: 1,
            }],
            compression: 0,
        })
        .await;
    assert!(ok.is_ok());
}

/// S3 killed in the middle of a restore: the restore fails UNAVAILABLE (after retries), the
/// server keeps running, and once S3 is back the restore completes with the right bytes.
#[tokio::test]
async fn outage_mid_restore_is_unavailable_then_resumes() {
    let Some(mut garage) = Garage::start_or_skip() else {
        return;
    };
    let options = ObjectStoreOptions {
        retry: RetryPolicy {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            deadline: Duration::from_secs(2),
            write_deadline: Duration::from_secs(2),
        },
        ..ObjectStoreOptions::default()
    };
    // 32 MiB, 16 chunks: far more than the read-ahead fetches before the kill.
    let pages = 8192;
    let img = image_of(15, pages);
    let store = Arc::new(garage.store("out", options).unwrap());
    put_vm(&store, &img).await;
    let server = serve(store.clone()).await;
    let mut c = client(&server).await;
    let m = manifest(&mut c, "vm").await;
    let mut stream = c
        .prefetch(pb::PrefetchRequest {
            max_batch_bytes: 256 << 10,
            ..prefetch_all("vm")
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = vec![0xAAu8; img.len()];
    let mut pages = 0u64;
    apply(
        stream.next().await.unwrap().unwrap(),
        &m,
        &mut out,
        &mut pages,
    );
    garage.kill().unwrap();
    let mut failure = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(batch) => apply(batch, &m, &mut out, &mut pages),
            Err(status) => {
                failure = Some(status);
                break;
            }
        }
    }
    let status = failure.expect("the restore cannot complete with S3 down");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(pages < 8192);
    garage.restart().unwrap();
    // Resume: ask for what is missing.
    let mut have = vec![0u8; 1024];
    for p in 0..8192u64 {
        if out[p as usize * PAGE..][..PAGE] == img[p as usize * PAGE..][..PAGE] {
            have[(p / 8) as usize] |= 1 << (p % 8);
        }
    }
    let mut stream = c
        .prefetch(pb::PrefetchRequest {
            have: have.into(),
            ..prefetch_all("vm")
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(batch) = stream.next().await {
        apply(batch.unwrap(), &m, &mut out, &mut pages);
    }
    assert!(out == img);
}

/// `GET` over plain HTTP/1.1; returns the status code and body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((code, body))
}

/// Kills the child server when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `serve --store s3://...` is live at once, but not ready (/readyz 503, gRPC health
/// NOT_SERVING) until S3 answers; then ready and serving; not ready again when S3 goes away.
#[tokio::test]
async fn readiness_follows_the_store() {
    let Some(mut garage) = Garage::start_or_skip() else {
        return;
    };
    garage.stop().unwrap();
    let ports = faultline_server::testing::free_ports(2).expect("two free ports");
    let grpc = std::net::SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], ports[1]));
    let _server = Child(
        Command::new(BIN)
            .args(["serve", "--store", &garage.url("ready")])
            .args(["--listen", &grpc.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .envs(garage.aws_env())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let until = |want: u16| async move {
        for _ in 0..300 {
            if let Some((code, body)) = http_get(metrics, "/readyz")
                && code == want
            {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/readyz never answered {want}");
    };
    let body = until(503).await;
    assert!(body.contains("not ready"), "{body}");
    assert_eq!(http_get(metrics, "/livez").unwrap().0, 200);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    for service in ["", "faultline.v1.Faultline"] {
        let s = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(s.status(), ServingStatus::NotServing, "{service:?}");
    }
    garage.restart().unwrap();
    until(200).await;
    let s = health
        .check(check("faultline.v1.Faultline"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.status(), ServingStatus::Serving);
    assert!(
        http_get(metrics, "/metrics")
            .unwrap()
            .1
            .contains("faultline_server")
    );
    garage.stop().unwrap();
    // Within a probe interval and a probe timeout.
    until(503).await;
}

/// A working set recorded through one server is stored in S3: another server streams it first.
#[tokio::test]
async fn working_set_recorded_on_one_server_serves_on_another() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let img = image(16);
    let a = Arc::new(garage.store("ws", ObjectStoreOptions::default()).unwrap());
    put_vm(&a, &img).await;
    let server_a = serve(a).await;
    let mut ca = client(&server_a).await;
    let order = [2000u64, 5, 1500, 6];
    let recorded = ca
        .record_working_set(pb::RecordWorkingSetRequest {
            snapshot: "vm".into(),
            name: "boot".into(),
            ranges: order
                .iter()
                .map(|&start| pb::PageRange { start, count: 1 })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.pages, 4);

    let b = Arc::new(garage.store("ws", ObjectStoreOptions::default()).unwrap());
    let server_b = serve(b).await;
    let mut cb = client(&server_b).await;
    let m = manifest(&mut cb, "vm").await;
    assert_eq!(m.working_sets.len(), 1);
    let mut stream = cb
        .prefetch(pb::PrefetchRequest {
            snapshot: "vm".into(),
            order: pb::PrefetchOrder::WorkingSetOnly as i32,
            working_set: "boot".into(),
            max_batch_bytes: PAGE as u64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let mut out = vec![0u8; img.len()];
    while let Some(batch) = stream.next().await {
        let batch = batch.unwrap();
        let first = batch
            .runs
            .first()
            .map(|r| r.start)
            .or(batch.zero.first().map(|z| z.start))
            .unwrap();
        seen.push(first);
        let mut pages = 0;
        apply(batch, &m, &mut out, &mut pages);
    }
    assert_eq!(seen, order);
    for p in order {
        let at = p as usize * PAGE;
        assert!(out[at..at + PAGE] == img[at..at + PAGE]);
    }
}
