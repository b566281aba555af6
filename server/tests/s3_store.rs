//! The object-store backend against a real S3 server (a single-node Garage on
//! 127.0.0.1, see `faultline_server::garage`): writing, listing, reading
//! verified pages, shared chunks, single-flight reads, corruption and
//! outages.

use std::sync::Arc;
use std::time::Duration;

use faultline_proto::{PageIndex, PageRange, PageSize, SnapshotId};
use faultline_server::garage::Garage;
use faultline_server::store::SnapshotSpec;
use faultline_server::store::object::{
    ChunkStats, DiskCache, ObjectError, ObjectListError, ObjectOpenError, ObjectSnapshotStore,
    ObjectStoreOptions, ObjectWriteError, RetryPolicy,
};
use faultline_server::testing::synthetic_image;

const PAGE: usize = 4096;
/// 10 MiB: five 2 MiB chunks, the last one partly zero.
const PAGES: u64 = 2560;

fn id(s: &str) -> SnapshotId {
    SnapshotId::new(s).unwrap()
}

async fn write(store: &ObjectSnapshotStore, name: &str, image: &[u8]) -> ChunkStats {
    let spec =
        SnapshotSpec::new(id(name), PageSize::Size4K, image.len() as u64, Vec::new()).unwrap();
    let mut w = store.create(spec).await.unwrap();
    // Odd-sized pieces, as an upload delivers them.
    for piece in image.chunks(700_001) {
        w.write(piece).await.unwrap();
    }
    w.finish().await.unwrap().1
}

/// Reads every page of `name` and compares it with `image` and its digest.
async fn verify(store: &ObjectSnapshotStore, name: &str, image: &[u8]) {
    let s = store.open(&id(name)).await.unwrap();
    let m = s.manifest();
    assert_eq!(m.page_count, image.len() as u64 / PAGE as u64);
    // Reads of several shapes: inside a chunk, across chunk boundaries.
    let mut start = 0;
    for count in [1u64, 7, 600, 513, 1000].iter().cycle() {
        if start >= m.page_count {
            break;
        }
        let count = (*count).min(m.page_count - start);
        let data = s
            .read(PageRange::new(PageIndex(start), count).unwrap())
            .await
            .unwrap();
        let want = &image[start as usize * PAGE..(start + count) as usize * PAGE];
        assert!(data == want, "pages {start}+{count} differ");
        for (i, page) in data.chunks(PAGE).enumerate() {
            assert!(m.verify(PageIndex(start + i as u64), page));
        }
        start += count;
    }
}

fn image(seed: u64) -> Vec<u8> {
    let mut img = synthetic_image(seed, PAGES, PAGE);
    // A whole chunk of zeros (chunk 3), never stored.
    img[6 << 20..8 << 20].fill(0);
    img
}

/// A snapshot written to S3 is listed, reads back byte for byte, and its zero chunk is not stored.
#[tokio::test]
async fn write_list_read() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let store = garage.store("t", ObjectStoreOptions::default()).unwrap();
    assert!(store.list().await.unwrap().is_empty());
    let img = image(1);
    let stats = write(&store, "one", &img).await;
    assert_eq!(stats.chunks, 5);
    assert_eq!(stats.zero, 1);
    assert_eq!(stats.uploaded, 4);
    let list = store.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name.as_str(), "one");
    assert_eq!(list[0].page_count, PAGES);
    verify(&store, "one", &img).await;
    // A second server (a fresh store on the same prefix) sees it too.
    let other = garage.store("t", ObjectStoreOptions::default()).unwrap();
    verify(&other, "one", &img).await;
    // The name is taken now.
    let spec = SnapshotSpec::new(id("one"), PageSize::Size4K, 4096, Vec::new()).unwrap();
    assert!(matches!(
        store.create(spec).await.unwrap_err(),
        ObjectWriteError::AlreadyExists(_)
    ));
}

/// Two snapshots of one base share its chunks: the second uploads only the chunks that changed.
#[tokio::test]
async fn shared_chunks_are_not_uploaded_twice() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let store = garage.store("t", ObjectStoreOptions::default()).unwrap();
    let base = image(2);
    write(&store, "base", &base).await;
    let mut child = base.clone();
    // One page changed in chunk 1.
    child[(2 << 20) + 5 * PAGE] ^= 0xff;
    let before = store.io_counts();
    let stats = write(&store, "child", &child).await;
    assert_eq!(
        (stats.chunks, stats.uploaded, stats.reused, stats.zero),
        (5, 1, 3, 1)
    );
    assert_eq!(
        store.io_counts().put_bytes - before.put_bytes - manifest_and_digest_bytes(&store).await,
        2 << 20
    );
    verify(&store, "child", &child).await;
    verify(&store, "base", &base).await;
}

/// Bytes of the child's manifest and digest table (what a write sends besides chunks).
async fn manifest_and_digest_bytes(store: &ObjectSnapshotStore) -> u64 {
    let (io, keys) = store.io();
    let m = io.get(&keys.manifest(&id("child"))).await.unwrap();
    m.len() as u64 + PAGES * 4
}

/// Eight concurrent restores of one snapshot read each of its stored chunks from S3 exactly once.
#[tokio::test]
async fn concurrent_restores_read_each_chunk_once() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let img = image(3);
    write(
        &garage.store("t", ObjectStoreOptions::default()).unwrap(),
        "shared",
        &img,
    )
    .await;
    // A fresh server: nothing cached.
    let store = Arc::new(garage.store("t", ObjectStoreOptions::default()).unwrap());
    let snapshot = store.open(&id("shared")).await.unwrap();
    let before = store.io_counts();
    let restores = (0..8).map(|r| {
        let s = snapshot.clone();
        tokio::spawn(async move {
            // Each restore walks the image in its own order of 64-page reads
            // (multipliers coprime to the 40 batches: permutations).
            let batches = PAGES / 64;
            let step = [1, 3, 7, 9, 11, 13, 17, 19][r];
            let mut out = vec![0u8; PAGES as usize * PAGE];
            for k in 0..batches {
                let b = (k * step) % batches;
                let data = s
                    .read(PageRange::new(PageIndex(b * 64), 64).unwrap())
                    .await
                    .unwrap();
                out[(b * 64) as usize * PAGE..((b + 1) * 64) as usize * PAGE]
                    .copy_from_slice(&data);
            }
            out
        })
    });
    for r in futures::future::join_all(restores).await {
        assert!(r.unwrap() == img, "a restore read wrong bytes");
    }
    let after = store.io_counts();
    // Four stored chunks (one is zeros): four GETs, 8 MiB, for 8 restores.
    assert_eq!(after.gets - before.gets, 4);
    assert_eq!(after.get_bytes - before.get_bytes, 8 << 20);
    let c = store.cache_counts();
    assert_eq!(c.misses, 4);
    assert!(c.hits + c.coalesced > 0);
}

/// A sequential reader gets the next chunks fetched ahead; a random one does not.
#[tokio::test]
async fn sequential_reads_fetch_ahead() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let img = image(6);
    write(
        &garage.store("t", ObjectStoreOptions::default()).unwrap(),
        "seq",
        &img,
    )
    .await;
    let store = garage.store("t", ObjectStoreOptions::default()).unwrap();
    let s = store.open(&id("seq")).await.unwrap();
    let read = |p: u64| s.read(PageRange::new(PageIndex(p), 1).unwrap());
    // Chunk 4, then chunk 1: not in order, nothing ahead.
    read(2100).await.unwrap();
    read(600).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.cache_counts().misses, 2);
    // Chunk 1 again: a reader in order. The chunks after it are fetched
    // ahead: 2 (3 is zeros, never stored; 4 is held already).
    read(601).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.cache_counts().misses, 3);
    let before = store.io_counts().gets;
    read(1100).await.unwrap();
    assert_eq!(
        store.io_counts().gets,
        before,
        "chunk 2 came from the read-ahead"
    );
}

/// A chunk whose bytes were changed in S3 is refused as corrupt, never served.
#[tokio::test]
async fn corrupt_chunk_is_data_loss() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let store = garage.store("t", ObjectStoreOptions::default()).unwrap();
    let img = image(4);
    write(&store, "c", &img).await;
    // Flip one byte of chunk 0 in the store.
    let mut bad = img[..2 << 20].to_vec();
    bad[12345] ^= 1;
    let (io, keys) = store.io();
    let chunk0 = faultline_server::store::object::ChunkId::of(&img[..2 << 20]);
    io.put_raw(&keys.chunk(&chunk0), bad.into()).await.unwrap();
    let fresh = garage.store("t", ObjectStoreOptions::default()).unwrap();
    let s = fresh.open(&id("c")).await.unwrap();
    let err = s
        .read(PageRange::new(PageIndex(3), 1).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, ObjectError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    // Other chunks still read.
    let ok = s
        .read(PageRange::new(PageIndex(600), 1).unwrap())
        .await
        .unwrap();
    assert!(ok == img[600 * PAGE..601 * PAGE]);
}

/// With S3 stopped, reads retry and then fail as unavailable; once it is back they succeed.
#[tokio::test]
async fn outage_is_unavailable_then_recovers() {
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
    let img = image(5);
    write(&garage.store("t", options).unwrap(), "o", &img).await;
    let store = garage.store("t", options).unwrap();
    let s = store.open(&id("o")).await.unwrap();
    // The first chunk is cached before the outage.
    s.read(PageRange::new(PageIndex(0), 1).unwrap())
        .await
        .unwrap();
    garage.stop().unwrap();
    let err = s
        .read(PageRange::new(PageIndex(600), 1).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, ObjectError::Unavailable { .. }), "{err}");
    assert!(store.io_counts().retries > 0);
    // Cached chunks are still served during the outage.
    s.read(PageRange::new(PageIndex(1), 1).unwrap())
        .await
        .unwrap();
    // Opening an uncached snapshot fails the same way.
    let other = garage.store("t", options).unwrap();
    assert!(matches!(
        other.open(&id("o")).await.unwrap_err(),
        ObjectOpenError::Store {
            source: ObjectError::Unavailable { .. },
            ..
        }
    ));
    garage.restart().unwrap();
    let data = s
        .read(PageRange::new(PageIndex(600), 1).unwrap())
        .await
        .unwrap();
    assert!(data == img[600 * PAGE..601 * PAGE]);
    verify(&store, "o", &img).await;
}

/// A store that accepts connections but never answers: each try times out, and after the retry
/// deadline the read is unavailable, in bounded time.
#[tokio::test]
async fn stalled_store_times_out_as_unavailable() {
    // Not an object store: a listener on 127.0.0.1 that reads and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let options = ObjectStoreOptions {
        request_timeout: Duration::from_millis(200),
        retry: RetryPolicy {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            deadline: Duration::from_secs(1),
            write_deadline: Duration::from_secs(1),
        },
        ..ObjectStoreOptions::default()
    };
    let settings = [
        ("AWS_ENDPOINT", format!("http://{addr}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "garage".into()),
        ("AWS_ACCESS_KEY_ID", "GK000000000000000000000000".into()),
        ("AWS_SECRET_ACCESS_KEY", "0".repeat(64)),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let store = ObjectSnapshotStore::with_settings("b", "p", settings, options).unwrap();
    let started = std::time::Instant::now();
    let err = store.open(&id("x")).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            ObjectOpenError::Store {
                source: ObjectError::Unavailable { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(store.io_counts().retries >= 2, "{:?}", store.io_counts());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(store.ping().await.is_err());
    assert!(matches!(
        store.list().await.unwrap_err(),
        ObjectListError::Store(ObjectError::Unavailable { .. })
    ));
    hold.abort();
}

/// With a disk cache, a restarted server (fresh memory cache, same directory) restores without
/// reading any chunk from S3; a chunk file damaged on the disk is fetched again, not served.
#[tokio::test]
async fn disk_cache_serves_a_restarted_server() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let img = image(7);
    write(
        &garage.store("t", ObjectStoreOptions::default()).unwrap(),
        "d",
        &img,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let with_disk = || {
        garage
            .store("t", ObjectStoreOptions::default())
            .unwrap()
            .with_disk_cache(DiskCache::open(dir.path(), 1 << 30).unwrap())
    };
    let first = with_disk();
    verify(&first, "d", &img).await;
    // Chunk files are written in the background.
    let files = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
    };
    for _ in 0..200 {
        if files() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(files(), 4, "the four stored chunks are on the disk");
    drop(first);
    let second = with_disk();
    second.open(&id("d")).await.unwrap();
    let before = second.io_counts();
    verify(&second, "d", &img).await;
    assert_eq!(
        second.io_counts().gets,
        before.gets,
        "no chunk came from S3"
    );
    // Damage chunk 0's file: a third server fetches that one chunk again.
    let chunk0 = faultline_server::store::object::ChunkId::of(&img[..2 << 20]);
    std::fs::write(dir.path().join(chunk0.to_string()), vec![1u8; 2 << 20]).unwrap();
    let third = with_disk();
    third.open(&id("d")).await.unwrap();
    let before = third.io_counts();
    verify(&third, "d", &img).await;
    assert_eq!(third.io_counts().gets - before.gets, 1);
}
