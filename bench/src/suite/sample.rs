//! Deterministic page choices: the same pages in the same order on every
//! run, so that runs (and the methods inside one) compare like with like.

/// SplitMix64: a small, seeded, well-mixed generator.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`; the modulo bias is negligible for page
    /// counts).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Up to `count` distinct pages of `0..page_count` that `keep` accepts, in
/// a scattered order fixed by `seed` (a partial Fisher–Yates shuffle).
pub(crate) fn sample_pages(
    page_count: u64,
    count: usize,
    seed: u64,
    keep: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let mut pool: Vec<u64> = (0..page_count).filter(|&p| keep(p)).collect();
    let n = count.min(pool.len());
    let mut rng = SplitMix64::new(seed);
    for i in 0..n {
        let j = i + rng.below((pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(n);
    pool
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample is deterministic, distinct, filtered, scattered and bounded by what exists.
    #[test]
    fn sample_is_fixed_distinct_and_filtered() {
        let a = sample_pages(1000, 100, 7, |p| p % 3 != 0);
        assert_eq!(a, sample_pages(1000, 100, 7, |p| p % 3 != 0));
        assert_eq!(a.len(), 100);
        assert!(a.iter().all(|p| p % 3 != 0 && *p < 1000));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 100);
        assert_ne!(a, sorted, "not in address order");
        assert_ne!(a, sample_pages(1000, 100, 8, |p| p % 3 != 0));
        assert_eq!(sample_pages(10, 100, 7, |p| p < 4).len(), 4);
    }
}
