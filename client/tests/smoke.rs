//! Quick end-to-end check of the pager on anonymous memory.

use std::sync::Arc;

use faultline_client::backing::GuestMemory;
use faultline_client::pager::{Pager, PagerConfig, PrefetchPolicy, Region};
use faultline_proto::{PageSize, SnapshotId};
use faultline_server::store::SnapshotStore;
use faultline_server::testing::synthetic_image;
use faultline_server::{LocalStore, import::import_file};

/// Demand faults from 4 threads restore an anonymous region byte for byte.
#[test]
fn anon_demand_restore() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().join("s")).unwrap());
    let pages = 2048u64;
    let image = synthetic_image(3, pages, 4096);
    std::fs::write(dir.path().join("img"), &image).unwrap();
    import_file(
        &*store,
        SnapshotId::new("img").unwrap(),
        PageSize::Size4K,
        &[],
        &dir.path().join("img"),
        |_| {},
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(faultline_server::spawn(
            "127.0.0.1:0".parse().unwrap(),
            store as Arc<dyn SnapshotStore>,
        ))
        .unwrap();
    let mut cfg = PagerConfig::new(server.url(), SnapshotId::new("img").unwrap());
    cfg.prefetch = PrefetchPolicy::None;
    let mem = GuestMemory::anonymous(image.len()).unwrap();
    let pager = Pager::start(
        cfg,
        vec![Region {
            memory: mem,
            snapshot_offset: 0,
        }],
    )
    .unwrap();
    let base = pager.memory(0).host_addr();
    let len = image.len();
    std::thread::scope(|s| {
        for t in 0..4 {
            let image = &image;
            s.spawn(move || {
                for off in (t * 4096..len).step_by(4 * 4096) {
                    // SAFETY: reading the pager's mapped region.
                    let page =
                        unsafe { std::slice::from_raw_parts((base + off) as *const u8, 4096) };
                    assert_eq!(page, &image[off..off + 4096], "page {}", off / 4096);
                }
            });
        }
    });
    let stats = pager
        .wait_complete(std::time::Duration::from_secs(10))
        .expect("completes");
    eprintln!("{stats:#?}");
    assert!(pager.is_complete());
}
