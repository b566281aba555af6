//! Helpers for tests, benchmarks and the demo: (feature `synthetic`)
//! deterministic synthetic memory images, and (feature `test-certs`) TLS
//! certificates made on the spot.

/// The synthetic page generator is the micro-VM harness's, so that its
/// guests' pages and these images have the same mix and the same bytes.
#[cfg(feature = "synthetic")]
pub use faultline_microvm::pattern::{PageKind, fill_page, page_kind};

/// A whole synthetic image of `pages` pages of `page_size` bytes.
#[cfg(feature = "synthetic")]
pub fn synthetic_image(seed: u64, pages: u64, page_size: usize) -> Vec<u8> {
    let mut image = vec![0u8; pages as usize * page_size];
    for (i, page) in image.chunks_mut(page_size).enumerate() {
        fill_page(seed, i as u64, page);
    }
    image
}

#[cfg(feature = "test-certs")]
pub mod certs;
