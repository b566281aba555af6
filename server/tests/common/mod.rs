//! Shared set-up: a store with an imported synthetic image, served
//! in-process on 127.0.0.1:0.

#![allow(dead_code)]

use std::sync::Arc;

use faultline_proto::pb::faultline_client::FaultlineClient;
use faultline_proto::{PageSize, SnapshotId, pb};
use faultline_server::import::import_file;
use faultline_server::store::SnapshotStore;
use faultline_server::testing::synthetic_image;
use faultline_server::{Limits, LocalStore, ServerHandle};
use tonic::Code;
use tonic::transport::Channel;

/// Pages in the test image: 4 MiB of 4 KiB pages.
pub const PAGES: u64 = 1024;
pub const PAGE: usize = 4096;
pub const SNAPSHOT: &str = "img";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: Arc<LocalStore>,
    pub image: Vec<u8>,
    pub server: ServerHandle,
}

impl Fixture {
    /// A store holding snapshot `img` (the synthetic image with seed 7),
    /// served on an ephemeral loopback port.
    pub async fn start() -> Self {
        Self::start_with(Limits::default()).await
    }

    /// [`Fixture::start`] with the server (and store) within `limits`.
    pub async fn start_with(limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::with_limits(dir.path().join("store"), &limits).unwrap());
        let image = synthetic_image(7, PAGES, PAGE);
        let file = dir.path().join("mem.img");
        std::fs::write(&file, &image).unwrap();
        import_file(
            &*store,
            SnapshotId::new(SNAPSHOT).unwrap(),
            PageSize::Size4K,
            &[],
            &file,
            |_| {},
        )
        .unwrap();
        let server = faultline_server::spawn_with_limits(
            "127.0.0.1:0".parse().unwrap(),
            store.clone() as Arc<dyn SnapshotStore>,
            limits,
        )
        .await
        .unwrap();
        Self {
            dir,
            store,
            image,
            server,
        }
    }

    pub async fn client(&self) -> FaultlineClient<Channel> {
        client(&self.server.url()).await
    }

    /// The bytes of pages `start..start + count` of the image.
    pub fn pages(&self, start: u64, count: u64) -> &[u8] {
        &self.image[start as usize * PAGE..(start + count) as usize * PAGE]
    }
}

pub async fn client(url: &str) -> FaultlineClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    FaultlineClient::new(channel)
        .max_decoding_message_size(128 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Writes a decoded batch into `out` (an image-sized buffer) and marks the
/// pages it held in `seen`, in the order they came; panics on a page sent
/// twice.
pub fn apply(batch: pb::PageBatch, out: &mut [u8], seen: &mut Vec<u64>) {
    let decoded =
        faultline_proto::codec::PageBatch::decode(batch, PageSize::Size4K, PAGES).unwrap();
    for run in decoded.runs {
        for (p, data) in run.pages(PageSize::Size4K) {
            assert!(!seen.contains(&p.0), "page {} sent twice", p.0);
            seen.push(p.0);
            out[p.0 as usize * PAGE..(p.0 as usize + 1) * PAGE].copy_from_slice(&data);
        }
    }
    for z in decoded.zero {
        for p in z.iter() {
            assert!(!seen.contains(&p.0), "page {} sent twice", p.0);
            seen.push(p.0);
            out[p.0 as usize * PAGE..(p.0 as usize + 1) * PAGE].fill(0);
        }
    }
}

/// The `open` message of a Fault stream on `snapshot`, uncompressed.
pub fn fault_open(snapshot: &str) -> pb::FaultRequest {
    pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Open(pb::FaultOpen {
            snapshot: snapshot.into(),
            compression: 0,
        })),
    }
}

/// A Fault request `request_id` for `count` pages from `start`.
pub fn fault_pages(request_id: u64, start: u64, count: u64) -> pb::FaultRequest {
    pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Pages(pb::FaultPages {
            request_id,
            range: Some(range(start, count)),
        })),
    }
}

/// Asserts that `r` failed with `code` and a message mentioning `needle`.
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = r.expect_err("request should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} does not mention {needle:?}",
        status.message()
    );
}

/// The header of an upload of `size` bytes of 4 KiB pages named `name`.
pub fn header(name: &str, size: u64) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        kind: Some(pb::create_snapshot_request::Kind::Header(
            pb::SnapshotHeader {
                name: name.into(),
                page_size: 4096,
                size,
                regions: vec![],
            },
        )),
    }
}

pub fn range(start: u64, count: u64) -> pb::PageRange {
    pb::PageRange { start, count }
}
