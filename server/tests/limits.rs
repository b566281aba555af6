//! The server's limits and its behaviour under hostile input: each bad or
//! oversized request is answered with its code, nothing is lost (the store
//! is unchanged, other streams go on), and memory and threads stay bounded.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use common::{
    Fixture, PAGE, PAGES, SNAPSHOT, apply, assert_code, client, fault_open, fault_pages, header,
    range,
};
use faultline_proto::{PageRange, SnapshotId, WorkingSetName, pb};
use faultline_server::store::{
    CreateError, ListError, OpenError, ReadError, RecordError, Snapshot, SnapshotSpec,
    SnapshotStore, SnapshotSummary, SnapshotWrite,
};
use faultline_server::{Limits, LocalStore};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(10);

fn chunk(offset: u64, data: Vec<u8>) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        kind: Some(pb::create_snapshot_request::Kind::Chunk(
            pb::SnapshotChunk {
                offset,
                data: data.into(),
            },
        )),
    }
}

fn prefetch_all(batch: u64) -> pb::PrefetchRequest {
    pb::PrefetchRequest {
        snapshot: SNAPSHOT.into(),
        order: pb::PrefetchOrder::Ranges as i32,
        ranges: vec![range(0, PAGES)],
        max_batch_bytes: batch,
        ..Default::default()
    }
}

/// Entries of the store directory (snapshots and anything else, such as
/// temporary directories).
fn store_entries(f: &Fixture) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(f.store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Waits until the store holds only the fixture's snapshot: an
/// unfinished writer's files are removed off the async workers, just after
/// its request ends.
async fn wait_until_only_the_snapshot(f: &Fixture) {
    let deadline = Instant::now() + PATIENCE;
    while store_entries(f) != vec![SNAPSHOT.to_owned()] {
        assert!(Instant::now() < deadline, "{:?}", store_entries(f));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A field of /proc/self/status, in its unit (kB for sizes).
fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Sends raw bytes as messages and decodes answers as `T`: for messages a
/// typed client cannot produce.
#[derive(Debug)]
struct RawCodec<T>(std::marker::PhantomData<T>);

impl<T> Default for RawCodec<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct ProstDecoder<T>(std::marker::PhantomData<T>);

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl<T: prost::Message + Default> Decoder for ProstDecoder<T> {
    type Item = T;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<T>, tonic::Status> {
        let msg = T::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(Some(msg))
    }
}

impl<T: prost::Message + Default + Send + 'static> Codec for RawCodec<T> {
    type Encode = Bytes;
    type Decode = T;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<T>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<T> {
        ProstDecoder(std::marker::PhantomData)
    }
}

async fn raw_grpc(url: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready().await.unwrap();
    grpc
}

fn encoded(msg: &impl prost::Message) -> Bytes {
    msg.encode_to_vec().into()
}

/// Not a protobuf message: a length-delimited field 1 claiming more bytes
/// than follow.
const GARBAGE: &[u8] = &[0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01];

/// A header declaring 2^63 bytes is refused with ResourceExhausted before
/// anything is allocated or created: the server lives on, and the store
/// holds no temporary directory.
#[tokio::test]
async fn huge_declared_image_is_refused_before_allocation() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let before = store_entries(&f);
    for (size, needle) in [(1u64 << 63, "size in bytes"), (1 << 42, "size in bytes")] {
        assert_code(
            c.create_snapshot(tokio_stream::iter(vec![header("huge", size)]))
                .await,
            Code::ResourceExhausted,
            needle,
        );
    }
    // The page-count limit is separate from the byte limit.
    let f2 = Fixture::start_with(Limits {
        max_image_pages: 16,
        ..Limits::default()
    })
    .await;
    assert_code(
        f2.client()
            .await
            .create_snapshot(tokio_stream::iter(vec![header("pages", 17 * 4096)]))
            .await,
        Code::ResourceExhausted,
        "max-image-pages",
    );
    assert_eq!(store_entries(&f), before);
    c.read_pages(pb::ReadPagesRequest {
        snapshot: SNAPSHOT.into(),
        ranges: vec![range(0, 1)],
        compression: 0,
    })
    .await
    .expect("still serving");
}

/// Temporary files of writers that died (a snapshot directory, a working
/// set) are removed when the store is opened; a live writer's are kept.
#[test]
fn leftovers_of_dead_writers_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    LocalStore::new(&root).unwrap();
    let image = faultline_server::testing::synthetic_image(1, 8, PAGE);
    let file = dir.path().join("img");
    std::fs::write(&file, &image).unwrap();
    let store = LocalStore::new(&root).unwrap();
    faultline_server::import::import_file(
        &store,
        SnapshotId::new("s").unwrap(),
        faultline_proto::PageSize::Size4K,
        &[],
        &file,
        |_| {},
    )
    .unwrap();
    // No process has a PID above pid_max.
    let dead: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        + 1;
    let live = std::process::id();
    let dead_dir = root.join(format!(".tmp-big-{dead}-0"));
    let live_dir = root.join(format!(".tmp-other-{live}-3"));
    let dead_set = root.join("s").join(format!(".tmp-workingset-x-{dead}-1"));
    std::fs::create_dir(&dead_dir).unwrap();
    std::fs::write(dead_dir.join("memory"), b"partial").unwrap();
    std::fs::create_dir(&live_dir).unwrap();
    std::fs::write(&dead_set, b"partial").unwrap();
    drop(store);
    let store = LocalStore::new(&root).unwrap();
    assert!(
        !dead_dir.exists(),
        "a dead writer's snapshot directory is kept"
    );
    assert!(!dead_set.exists(), "a dead writer's working set is kept");
    assert!(live_dir.exists(), "a live writer's directory was removed");
    assert_eq!(store.list_blocking().unwrap().len(), 1);
}

/// Prefetch takes at most `max_prefetch_ranges` ranges (ResourceExhausted
/// above), and a Prefetch of 4096 ranges over pages the client has ends at
/// once with nothing sent.
#[tokio::test]
async fn prefetch_ranges_are_capped() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let many = |n: usize| pb::PrefetchRequest {
        snapshot: SNAPSHOT.into(),
        order: pb::PrefetchOrder::Ranges as i32,
        ranges: (0..n).map(|_| range(0, PAGES)).collect(),
        have: vec![0xff; PAGES as usize / 8].into(),
        ..Default::default()
    };
    assert_code(
        c.prefetch(many(4097)).await,
        Code::ResourceExhausted,
        "4096",
    );
    let mut s = c.prefetch(many(4096)).await.unwrap().into_inner();
    let ended = tokio::time::timeout(PATIENCE, s.next())
        .await
        .expect("a scan over pages the client has ends");
    assert!(ended.is_none(), "pages the client has were sent: {ended:?}");
}

/// Prefetch streams are limited server-wide and per client; a stream whose
/// client has gone gives its slot back within a second, even while its
/// reader had stalled it.
#[tokio::test]
async fn prefetch_streams_are_limited_and_cancellation_is_noticed() {
    let f = Fixture::start_with(Limits {
        max_prefetch_streams_per_client: 2,
        ..Limits::default()
    })
    .await;
    let mut c = f.client().await;
    // Two stalled streams: small batches, never read.
    let a = c.prefetch(prefetch_all(4096)).await.unwrap();
    let b = c.prefetch(prefetch_all(4096)).await.unwrap();
    assert_code(
        c.prefetch(prefetch_all(4096)).await,
        Code::ResourceExhausted,
        "max-prefetch-streams-per-client",
    );
    // Other RPCs are unaffected.
    c.read_pages(pb::ReadPagesRequest {
        snapshot: SNAPSHOT.into(),
        ranges: vec![range(5, 3)],
        compression: 0,
    })
    .await
    .unwrap();
    drop(a);
    let dropped = Instant::now();
    let third = loop {
        match c.prefetch(prefetch_all(1 << 20)).await {
            Ok(s) => break s,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    dropped.elapsed() < Duration::from_secs(1),
                    "a dropped stream still held its slot after {:?}",
                    dropped.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    // The new stream delivers the whole image.
    let mut out = vec![0u8; f.image.len()];
    let mut seen = Vec::new();
    let mut third = third.into_inner();
    while let Some(batch) = third.next().await {
        apply(batch.unwrap(), &mut out, &mut seen);
    }
    assert_eq!(out, f.image);
    drop(b);

    // The server-wide limit.
    let f = Fixture::start_with(Limits {
        max_prefetch_streams: 1,
        ..Limits::default()
    })
    .await;
    let mut c = f.client().await;
    let _held = c.prefetch(prefetch_all(4096)).await.unwrap();
    assert_code(
        c.prefetch(prefetch_all(4096)).await,
        Code::ResourceExhausted,
        "max-prefetch-streams",
    );
}

/// Three hundred stalled Prefetch streams hold no thread and bounded
/// memory, and every other RPC is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_prefetch_readers_hold_no_threads() {
    let f = Fixture::start_with(Limits {
        max_prefetch_streams: 1000,
        max_prefetch_streams_per_client: 1000,
        ..Limits::default()
    })
    .await;
    let url = f.server.url();
    let mut c = f.client().await;
    // Warm up the blocking pool and the page cache.
    c.read_pages(pb::ReadPagesRequest {
        snapshot: SNAPSHOT.into(),
        ranges: vec![range(0, PAGES)],
        compression: 0,
    })
    .await
    .unwrap();
    let threads_before = proc_status("Threads");
    let rss_before = proc_status("VmRSS");
    let mut held = Vec::new();
    for _ in 0..3 {
        // Separate connections: HTTP/2 caps the streams of one.
        let mut c = client(&url).await;
        for _ in 0..100 {
            held.push(c.prefetch(prefetch_all(4096)).await.unwrap());
        }
    }
    // Let every producer fill its queue and park.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let threads = proc_status("Threads");
    let rss = proc_status("VmRSS");
    assert!(
        threads < threads_before + 32,
        "300 stalled streams took {} threads",
        threads - threads_before
    );
    // Each stream may hold its queue (4 batches of 4 KiB) and what HTTP/2
    // buffers; far less than the 4 MiB image each would be.
    assert!(
        rss < rss_before + 300 * 1024,
        "300 stalled streams grew RSS by {} kB",
        rss - rss_before
    );
    let started = Instant::now();
    let batch = c
        .read_pages(pb::ReadPagesRequest {
            snapshot: SNAPSHOT.into(),
            ranges: vec![range(9, 2)],
            compression: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(started.elapsed() < PATIENCE);
    let mut out = vec![0u8; f.image.len()];
    apply(batch, &mut out, &mut Vec::new());
    assert_eq!(&out[9 * PAGE..11 * PAGE], f.pages(9, 2));
    drop(held);
}

/// A Fault stream whose reader stalls holds bounded memory: the server
/// answers at most `fault_concurrency` requests ahead of what the transport
/// takes (2000 unread answers of 256 KiB would be 500 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_fault_reader_holds_bounded_memory() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(fault_open(SNAPSHOT)).await.unwrap();
    let answers = c
        .fault(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let rss_before = proc_status("VmRSS");
    for id in 0..2000 {
        // Requests are small: HTTP/2 takes them all into the server's
        // 16 MiB receive window whether or not anything answers them.
        tokio::time::timeout(PATIENCE, tx.send(fault_pages(id, 0, 64)))
            .await
            .expect("the request queue stalled")
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = proc_status("VmRSS");
    assert!(
        rss < rss_before + 200 * 1024,
        "a stalled Fault stream grew RSS by {} kB after 2000 requests",
        rss - rss_before
    );
    // The stream still works once read: the first answers are there.
    let mut answers = answers;
    let first = answers.next().await.unwrap().unwrap();
    assert!(matches!(
        first.result,
        Some(pb::fault_response::Result::Pages(_))
    ));
}

/// A message that does not decode, or is over the size limit, ends a Fault
/// stream with InvalidArgument or ResourceExhausted (never OK), after the
/// answers before it; an oversized first message gets ResourceExhausted.
#[tokio::test]
async fn broken_fault_streams_never_end_ok() {
    let f = Fixture::start().await;
    let path = http::uri::PathAndQuery::from_static("/faultline.v1.Faultline/Fault");
    for (bad, code) in [
        (Bytes::from_static(GARBAGE), Code::InvalidArgument),
        (Bytes::from(vec![0u8; 33 << 20]), Code::ResourceExhausted),
    ] {
        let mut grpc = raw_grpc(&f.server.url()).await;
        let msgs = vec![
            encoded(&fault_open(SNAPSHOT)),
            encoded(&fault_pages(1, 3, 1)),
            bad,
        ];
        let mut answers = grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(msgs)),
                path.clone(),
                RawCodec::<pb::FaultResponse>::default(),
            )
            .await
            .unwrap()
            .into_inner();
        let first = answers.message().await.unwrap().expect("an answer");
        assert_eq!(first.request_id, 1);
        let end = answers.message().await;
        let status = end.expect_err("a broken stream ended with OK");
        assert_eq!(status.code(), code, "{status:?}");
    }
    // Oversized first message.
    let mut grpc = raw_grpc(&f.server.url()).await;
    let r = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![Bytes::from(vec![0u8; 33 << 20])])),
            path.clone(),
            RawCodec::<pb::FaultResponse>::default(),
        )
        .await;
    let status = match r {
        Err(s) => s,
        Ok(resp) => resp
            .into_inner()
            .message()
            .await
            .expect_err("an oversized open was accepted"),
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

/// An undecodable unary request gets InvalidArgument (tonic would say
/// Internal), and an undecodable upload message too.
#[tokio::test]
async fn undecodable_requests_are_invalid_argument() {
    let f = Fixture::start().await;
    let mut grpc = raw_grpc(&f.server.url()).await;
    for rpc in [
        "/faultline.v1.Faultline/ReadPages",
        "/faultline.v1.Faultline/GetManifest",
        "/faultline.v1.Faultline/RecordWorkingSet",
    ] {
        let r = grpc
            .unary(
                tonic::Request::new(Bytes::from_static(GARBAGE)),
                http::uri::PathAndQuery::from_static(rpc),
                RawCodec::<pb::PageBatch>::default(),
            )
            .await;
        assert_code(r, Code::InvalidArgument, "decode");
        grpc.ready().await.unwrap();
    }
    let r = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(vec![
                encoded(&header("x", 4096)),
                Bytes::from_static(GARBAGE),
            ])),
            http::uri::PathAndQuery::from_static("/faultline.v1.Faultline/CreateSnapshot"),
            RawCodec::<pb::CreateSnapshotResponse>::default(),
        )
        .await;
    assert_code(r, Code::InvalidArgument, "decode");
    wait_until_only_the_snapshot(&f).await;
}

/// Sixteen concurrent recordings of one working set all succeed; the set
/// served is the one stored, also after a restart; no temporary file is
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_recordings_are_atomic() {
    let f = Fixture::start().await;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let mut c = f.client().await;
        tasks.push(tokio::spawn(async move {
            c.record_working_set(pb::RecordWorkingSetRequest {
                snapshot: SNAPSHOT.into(),
                name: "boot".into(),
                ranges: vec![range(i * 10, 5 + i), range(900, 3)],
            })
            .await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    let id = SnapshotId::new(SNAPSHOT).unwrap();
    let name = WorkingSetName::new("boot").unwrap();
    let served = f
        .store
        .open_blocking(&id)
        .unwrap()
        .working_set(&name)
        .unwrap();
    let dir = f.store.root().join(SNAPSHOT);
    let on_disk: Vec<u64> = std::fs::read(dir.join("workingset-boot"))
        .unwrap()
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(served.iter().map(|p| p.0).collect::<Vec<_>>(), on_disk);
    // What a client prefetching the set gets is the same.
    let mut c = f.client().await;
    let mut s = c
        .prefetch(pb::PrefetchRequest {
            snapshot: SNAPSHOT.into(),
            order: pb::PrefetchOrder::WorkingSetOnly as i32,
            working_set: "boot".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let mut out = vec![0u8; f.image.len()];
    while let Some(b) = s.next().await {
        apply(b.unwrap(), &mut out, &mut seen);
    }
    seen.sort_unstable();
    let mut want = on_disk.clone();
    want.sort_unstable();
    assert_eq!(seen, want);
    // A restarted server serves the same set.
    let again = LocalStore::new(f.store.root()).unwrap();
    let reopened = again
        .open_blocking(&id)
        .unwrap()
        .working_set(&name)
        .unwrap();
    assert_eq!(reopened.iter().map(|p| p.0).collect::<Vec<_>>(), on_disk);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(".tmp").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Working sets are limited in number per snapshot and in size; refused
/// recordings leave the stored sets as they were.
#[tokio::test]
async fn working_sets_are_limited() {
    let f = Fixture::start_with(Limits {
        max_working_sets: 2,
        max_working_set_pages: 100,
        ..Limits::default()
    })
    .await;
    let mut c = f.client().await;
    let record = |name: &str, count: u64| pb::RecordWorkingSetRequest {
        snapshot: SNAPSHOT.into(),
        name: name.into(),
        ranges: vec![range(0, count)],
    };
    c.record_working_set(record("a", 10)).await.unwrap();
    c.record_working_set(record("b", 10)).await.unwrap();
    assert_code(
        c.record_working_set(record("c", 10)).await,
        Code::ResourceExhausted,
        "working sets already",
    );
    // Replacing one is allowed.
    c.record_working_set(record("a", 20)).await.unwrap();
    assert_code(
        c.record_working_set(record("b", 101)).await,
        Code::ResourceExhausted,
        "100",
    );
    let list = c
        .list_snapshots(pb::ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.snapshots[0].working_sets, vec!["a", "b"]);
    let id = SnapshotId::new(SNAPSHOT).unwrap();
    let s = f.store.open_blocking(&id).unwrap();
    assert_eq!(
        s.working_set(&WorkingSetName::new("a").unwrap())
            .unwrap()
            .len(),
        20
    );
    assert_eq!(
        s.working_set(&WorkingSetName::new("b").unwrap())
            .unwrap()
            .len(),
        10
    );
}

/// An upload that goes silent is dropped with DeadlineExceeded after the
/// idle timeout, and its partial snapshot removed.
#[tokio::test]
async fn idle_uploads_are_dropped() {
    let f = Fixture::start_with(Limits {
        upload_idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let mut c = f.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header("slow", 8 * 4096)).await.unwrap();
    tx.send(chunk(0, vec![1; 4096])).await.unwrap();
    let r = c
        .create_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    assert_code(r, Code::DeadlineExceeded, "upload-idle-timeout");
    drop(tx);
    wait_until_only_the_snapshot(&f).await;
}

/// An upload that would eat into the free-disk reserve is refused with
/// ResourceExhausted; nothing is kept.
#[tokio::test]
async fn disk_reserve_is_kept() {
    let f = Fixture::start().await;
    let limits = Limits {
        min_free_disk_bytes: u64::MAX / 2,
        ..Limits::default()
    };
    let store = Arc::new(LocalStore::with_limits(f.store.root(), &limits).unwrap());
    let server = faultline_server::spawn_with_limits("127.0.0.1:0".parse().unwrap(), store, limits)
        .await
        .unwrap();
    let mut c = client(&server.url()).await;
    assert_code(
        c.create_snapshot(tokio_stream::iter(vec![
            header("full", 4096),
            chunk(0, vec![1; 4096]),
        ]))
        .await,
        Code::ResourceExhausted,
        "min-free-disk",
    );
    wait_until_only_the_snapshot(&f).await;
}

/// A snapshot removed and imported again under its name is served afresh,
/// and the open-snapshot cache holds at most `max_open_snapshots`.
#[tokio::test]
async fn replaced_snapshots_are_served_afresh_and_the_cache_is_bounded() {
    let f = Fixture::start_with(Limits {
        max_open_snapshots: 2,
        ..Limits::default()
    })
    .await;
    let mut c = f.client().await;
    let import = |name: &str, seed: u64| {
        let image = faultline_server::testing::synthetic_image(seed, 16, PAGE);
        let file = f.dir.path().join(format!("{name}-{seed}.img"));
        std::fs::write(&file, &image).unwrap();
        faultline_server::import::import_file(
            &*f.store,
            SnapshotId::new(name).unwrap(),
            faultline_proto::PageSize::Size4K,
            &[],
            &file,
            |_| {},
        )
        .unwrap();
        image
    };
    let read_all = |c: &mut faultline_proto::pb::faultline_client::FaultlineClient<_>| {
        let mut c = c.clone();
        async move {
            let batch = c
                .read_pages(pb::ReadPagesRequest {
                    snapshot: "re".into(),
                    ranges: vec![range(0, 16)],
                    compression: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let decoded = faultline_proto::codec::PageBatch::decode(
                batch,
                faultline_proto::PageSize::Size4K,
                16,
            )
            .unwrap();
            let mut out = vec![0u8; 16 * PAGE];
            for run in decoded.runs {
                let at = run.range.start().0 as usize * PAGE;
                out[at..at + run.data.len()].copy_from_slice(&run.data);
            }
            out
        }
    };
    let first = import("re", 1);
    assert_eq!(read_all(&mut c).await, first);
    std::fs::remove_dir_all(f.store.root().join("re")).unwrap();
    assert_code(
        c.get_manifest(pb::GetManifestRequest {
            snapshot: "re".into(),
        })
        .await,
        Code::NotFound,
        "re",
    );
    let second = import("re", 2);
    assert_ne!(first, second);
    assert_eq!(read_all(&mut c).await, second);

    import("other", 3);
    for name in [SNAPSHOT, "re", "other", SNAPSHOT] {
        c.get_manifest(pb::GetManifestRequest {
            snapshot: name.into(),
        })
        .await
        .unwrap();
        assert!(f.store.open_count() <= 2, "{} open", f.store.open_count());
    }
}

/// A read that fails on disk (the image truncated under a served
/// snapshot) is DataLoss for that request; the server and other requests
/// go on (through a memory mapping this was a SIGBUS for the process).
#[tokio::test]
async fn failed_reads_are_data_loss_not_a_crash() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let read = |start, count| pb::ReadPagesRequest {
        snapshot: SNAPSHOT.into(),
        ranges: vec![range(start, count)],
        compression: 0,
    };
    c.read_pages(read(0, PAGES)).await.unwrap();
    // Truncate the image under the open snapshot, then evict it from the
    // page cache.
    let memory = f.store.root().join(SNAPSHOT).join("memory");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    file.set_len(4 * 4096).unwrap();
    drop(file);
    // Find a non-zero page past the new end.
    let m = f
        .store
        .open_blocking(&SnapshotId::new(SNAPSHOT).unwrap())
        .unwrap()
        .manifest();
    let page = (8..PAGES).find(|&p| !m.zero_map.get(p)).unwrap();
    let status = c.read_pages(read(page, 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        !status
            .message()
            .contains(&*f.store.root().to_string_lossy()),
        "the message shows the server's path: {}",
        status.message()
    );
    // Pages before the end are still served, on a Fault stream too.
    let mut answers = c
        .fault(tokio_stream::iter(vec![
            fault_open(SNAPSHOT),
            fault_pages(1, 0, 4),
            fault_pages(2, page, 1),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.next().await {
        got.push(a.unwrap());
    }
    got.sort_by_key(|a| a.request_id);
    assert!(matches!(
        got[0].result,
        Some(pb::fault_response::Result::Pages(_))
    ));
    match &got[1].result {
        Some(pb::fault_response::Result::Error(e)) => assert_eq!(e.code, Code::DataLoss as i32),
        other => panic!("{other:?}"),
    }
}

/// Error messages that involve the store's files never show the server's
/// paths.
#[tokio::test]
async fn errors_never_reveal_server_paths() {
    let f = Fixture::start().await;
    let root = f.store.root().to_owned();
    std::fs::create_dir(root.join("broken")).unwrap();
    std::fs::copy(
        root.join(SNAPSHOT).join("manifest.json"),
        root.join("broken").join("manifest.json"),
    )
    .unwrap();
    let manifest = root.join("broken").join("manifest.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace(&format!("\"{SNAPSHOT}\""), "\"broken\"");
    std::fs::write(&manifest, text).unwrap();
    // Digests that cannot be read: a directory.
    std::fs::create_dir(root.join("broken").join("digests")).unwrap();
    let mut c = f.client().await;
    let status = c
        .get_manifest(pb::GetManifestRequest {
            snapshot: "broken".into(),
        })
        .await
        .unwrap_err();
    assert!(
        !status.message().contains(&*root.to_string_lossy()),
        "{}",
        status.message()
    );
    assert!(status.message().contains("digests"), "{}", status.message());
}

/// A store whose reads of one page wait for a signal: a cold read.
#[derive(Debug)]
struct SlowStore {
    inner: LocalStore,
    slow_page: u64,
    gate: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug)]
struct SlowSnapshot {
    inner: Arc<dyn Snapshot>,
    slow_page: u64,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl Snapshot for SlowSnapshot {
    fn manifest(&self) -> Arc<faultline_proto::Manifest> {
        self.inner.manifest()
    }
    async fn read(&self, range: PageRange) -> Result<Bytes, ReadError> {
        if range.start().0 <= self.slow_page && self.slow_page < range.end() {
            let _ = self.gate.acquire().await;
        }
        self.inner.read(range).await
    }
    fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<faultline_proto::PageIndex>>> {
        self.inner.working_set(name)
    }
}

#[async_trait::async_trait]
impl SnapshotStore for SlowStore {
    async fn list(&self) -> Result<Vec<SnapshotSummary>, ListError> {
        self.inner.list().await
    }
    async fn open(&self, id: &SnapshotId) -> Result<Arc<dyn Snapshot>, OpenError> {
        Ok(Arc::new(SlowSnapshot {
            inner: self.inner.open(id).await?,
            slow_page: self.slow_page,
            gate: self.gate.clone(),
        }))
    }
    async fn create(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWrite>, CreateError> {
        self.inner.create(spec).await
    }
    async fn record_working_set(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, RecordError> {
        self.inner.record_working_set(id, name, ranges).await
    }
}

/// On one Fault stream, a request whose read is slow does not hold up the
/// answers to the requests behind it.
#[tokio::test]
async fn fault_answers_do_not_wait_for_a_cold_page() {
    let f = Fixture::start().await;
    let m = f
        .store
        .open_blocking(&SnapshotId::new(SNAPSHOT).unwrap())
        .unwrap()
        .manifest();
    let mut nonzero = (0..PAGES).filter(|&p| !m.zero_map.get(p));
    let (slow, fast) = (nonzero.next().unwrap(), nonzero.next().unwrap());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let store = Arc::new(SlowStore {
        inner: (*f.store).clone(),
        slow_page: slow,
        gate: gate.clone(),
    });
    let server = faultline_server::spawn("127.0.0.1:0".parse().unwrap(), store)
        .await
        .unwrap();
    let mut c = client(&server.url()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(fault_open(SNAPSHOT)).await.unwrap();
    tx.send(fault_pages(1, slow, 1)).await.unwrap();
    tx.send(fault_pages(2, fast, 1)).await.unwrap();
    let mut answers = c
        .fault(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, answers.next())
        .await
        .expect("the fast page waited for the slow one")
        .unwrap()
        .unwrap();
    assert_eq!(first.request_id, 2);
    gate.add_permits(1);
    let second = answers.next().await.unwrap().unwrap();
    assert_eq!(second.request_id, 1);
    let Some(pb::fault_response::Result::Pages(batch)) = second.result else {
        panic!("{second:?}");
    };
    let mut out = vec![0u8; f.image.len()];
    apply(batch, &mut out, &mut Vec::new());
    let at = slow as usize * PAGE;
    assert_eq!(&out[at..at + PAGE], f.pages(slow, 1));
}

/// A fresh server's /metrics shows every series (with help text) before any
/// traffic, the limits' values, and counts a rejection by its reason.
#[tokio::test]
async fn metrics_are_registered_at_start() {
    let handle = faultline_server::metrics::install();
    let f = Fixture::start().await;
    let text = handle.render();
    for series in [
        "# HELP faultline_server_requests_total",
        "faultline_server_requests_total{rpc=\"prefetch\"}",
        "faultline_server_request_errors_total{rpc=\"fault\",code=\"DataLoss\"}",
        "faultline_server_active_streams{rpc=\"fault\"}",
        "# HELP faultline_server_rejected_total",
        "faultline_server_rejected_total{reason=\"image_size\"}",
        "faultline_server_snapshots",
        "faultline_server_limit{limit=\"max_prefetch_ranges\"} 4096",
        "faultline_server_limit_use{limit=\"max_prefetch_streams\"}",
        "faultline_server_pages_served_total{rpc=\"read_pages\"}",
    ] {
        assert!(text.contains(series), "no {series} in\n{text}");
    }
    let count = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("faultline_server_rejected_total{reason=\"image_size\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before = count(&text);
    let mut c = f.client().await;
    let _ = c
        .create_snapshot(tokio_stream::iter(vec![header("huge", 1 << 62)]))
        .await;
    assert!(count(&handle.render()) >= before + 1.0);
}

/// A fresh `faultline-server serve` process, scraped before any request,
/// shows every series with its help text and zero values.
#[tokio::test]
async fn fresh_server_process_exports_every_series() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_faultline-server"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--store")
        .arg(dir.path().join("store"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.split("metrics at http://").nth(1) {
                let _ = tx.send(url.trim_end_matches("/metrics").to_owned());
            }
        }
    });
    let addr: std::net::SocketAddr = rx
        .recv_timeout(PATIENCE)
        .expect("the server logs its metrics address")
        .parse()
        .unwrap();
    let body = loop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        break out;
    };
    for series in [
        "# HELP faultline_server_requests_total",
        "faultline_server_requests_total{rpc=\"fault\"} 0",
        "faultline_server_request_errors_total{rpc=\"create_snapshot\",code=\"ResourceExhausted\"} 0",
        "# HELP faultline_server_active_streams",
        "faultline_server_active_streams{rpc=\"prefetch\"} 0",
        "faultline_server_rejected_total{reason=\"prefetch_streams_per_client\"} 0",
        "faultline_server_snapshots 0",
        "faultline_server_limit{limit=\"max_image_bytes\"} 1099511627776",
        "faultline_server_limit_use{limit=\"max_open_snapshots\"} 0",
        "faultline_server_wire_bytes_total{rpc=\"prefetch\"} 0",
    ] {
        assert!(body.contains(series), "no {series} in\n{body}");
    }
    drop(child);
}
