//! The synthetic content of data pages: about 40% zero pages in runs of 8 (like memory a guest
//! never touched), 30% text-like pages (they compress well), 30% pseudo-random pages (they do
//! not), deterministic in the seed and the page index.
//!
//! The one generator of synthetic pages: `faultline_server::testing` (feature `synthetic`)
//! re-exports it, so the micro-VM's pages and the benchmarks' synthetic images have the same
//! mix and the same bytes. It lives here because this crate depends on no faultline crate.

/// What a data page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// All zeros.
    Zero,
    /// Text-like bytes (kernel strings, logs).
    Text,
    /// Pseudo-random bytes (encrypted or compressed data).
    Random,
}

/// The words text pages are made of.
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

/// SplitMix64: a fast, well-mixed function of its input.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The kind of page `index` (independent of the seed).
pub fn page_kind(index: u64) -> PageKind {
    // Zero pages come in runs of 8, like untouched memory.
    match mix(index / 8) % 10 {
        0..=3 => PageKind::Zero,
        4..=6 => PageKind::Text,
        _ => PageKind::Random,
    }
}

/// Fills `page` with the content of page `index` in a pattern seeded by `seed`. A page that is
/// not a zero page is never all zeros.
pub fn fill_page(seed: u64, index: u64, page: &mut [u8]) {
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
            if let Some(first) = page.first_mut() {
                *first = b'#';
            }
        }
        PageKind::Random => {
            let mut state = mix(seed ^ index ^ 0x5555);
            for chunk in page.chunks_mut(8) {
                state = mix(state);
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            if let Some(first) = page.first_mut() {
                *first |= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mix is about 40/30/30, zero pages come in aligned runs of 8, and only zero pages are
    /// all zeros.
    #[test]
    fn kinds_mix_and_zero_runs() {
        let mut counts = [0u32; 3];
        let mut page = [0u8; 4096];
        for index in 0..8000 {
            let kind = page_kind(index);
            counts[kind as usize] += 1;
            assert_eq!(kind, page_kind(index & !7), "page {index}");
            fill_page(9, index, &mut page);
            assert_eq!(kind == PageKind::Zero, page.iter().all(|&b| b == 0));
        }
        assert!((2800..3600).contains(&counts[0]), "{counts:?}");
        assert!((2000..2800).contains(&counts[1]), "{counts:?}");
        assert!((2000..2800).contains(&counts[2]), "{counts:?}");
    }

    /// Content depends on the seed for non-zero pages, and repeats for the same seed.
    #[test]
    fn content_is_deterministic_in_the_seed() {
        let index = (0..).find(|&i| page_kind(i) == PageKind::Random).unwrap();
        let (mut a, mut b, mut c) = ([0u8; 64], [0u8; 64], [0u8; 64]);
        fill_page(1, index, &mut a);
        fill_page(1, index, &mut b);
        fill_page(2, index, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
