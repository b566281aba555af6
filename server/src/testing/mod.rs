//! Helpers for tests, benchmarks and the demo: deterministic synthetic
//! memory images, and (feature `test-certs`) TLS certificates made on the
//! spot.

/// One page of a synthetic image: what kind of content it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// All zeros (never-touched guest memory).
    Zero,
    /// Text-like bytes (kernel strings, logs): compresses well.
    Text,
    /// Pseudo-random bytes (encrypted or compressed data): does not compress.
    Random,
}

/// The kind of page `index` in a synthetic image: about 40% zero pages in
/// runs, 30% text, 30% random, deterministic in `index`.
pub fn page_kind(index: u64) -> PageKind {
    // Zero pages come in runs of 8, like untouched memory.
    match mix(index / 8) % 10 {
        0..=3 => PageKind::Zero,
        4..=6 => PageKind::Text,
        _ => PageKind::Random,
    }
}

/// SplitMix64: a fast, well-mixed function of its input.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `page` with the content of page `index` of the synthetic image
/// seeded by `seed`.
pub fn fill_page(seed: u64, index: u64, page: &mut [u8]) {
    const WORDS: &[&[u8]] = &[
        b"kernel ",
        b"page ",
        b"fault ",
        b"memory ",
        b"snapshot ",
        b"restore ",
        b"vcpu ",
        b"0x7f3a ",
        b"ok\n",
        b"guest ",
        b"[    1.234] ",
        b"virtio ",
    ];
    match page_kind(index) {
        PageKind::Zero => page.fill(0),
        PageKind::Text => {
            let mut state = mix(seed ^ index);
            let mut pos = 0;
            while pos < page.len() {
                state = mix(state);
                let word = WORDS[(state % WORDS.len() as u64) as usize];
                let n = word.len().min(page.len() - pos);
                page[pos..pos + n].copy_from_slice(&word[..n]);
                pos += n;
            }
            // Never all zeros, whatever the words.
            page[0] = b'#';
        }
        PageKind::Random => {
            let mut state = mix(seed ^ index ^ 0x5555);
            for chunk in page.chunks_mut(8) {
                state = mix(state);
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            page[0] |= 1;
        }
    }
}

/// A whole synthetic image of `pages` pages of `page_size` bytes.
pub fn synthetic_image(seed: u64, pages: u64, page_size: usize) -> Vec<u8> {
    let mut image = vec![0u8; pages as usize * page_size];
    for (i, page) in image.chunks_mut(page_size).enumerate() {
        fill_page(seed, i as u64, page);
    }
    image
}

#[cfg(feature = "test-certs")]
pub mod certs;
