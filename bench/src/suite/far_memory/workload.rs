//! The far-memory workloads: which pages they touch, what they write, and how the expected
//! content of every page follows from the operations done.
//!
//! An operation touches one whole 4 KiB page: a read sums its 512 words, a write fills it with
//! [`fill`]'s pattern for the page's next *version* (0 is the initial content, each write adds
//! one). The operations of a workload are generated before timing from a fixed seed, so every
//! system (all-local memory, far memory, the Linux cgroup baseline in its child process) runs
//! exactly the same sequence, and the content every page must hold afterwards is known from
//! the versions alone.

use std::time::{Duration, Instant};

/// Bytes per page of every workload.
pub const PAGE: usize = 4096;

/// Words per page.
const WORDS: usize = PAGE / 8;

/// Zipf skew of the skewed workload: the 0.99 (YCSB's default).
pub const ZIPF_SKEW: f64 = 0.99;

/// The write bit of an encoded operation (pages are below 2^31).
const WRITE: u32 = 1 << 31;

/// Operations between checks of the time limit: a few hundred microseconds of local work,
/// so the check costs nothing and the limit is kept to well under a millisecond.
const CHECK_EVERY: usize = 256;

/// Which pages a workload touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Every page in order, one pass.
    Sequential,
    /// Pages drawn uniformly at random.
    Uniform,
    /// Pages drawn with Zipf(0.99) popularity, the popular pages scattered over the footprint.
    Zipf,
}

/// A workload: a pattern, read-only or half writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// Which pages.
    pub pattern: Pattern,
    /// Half the operations write (chosen at random), else none.
    pub writes: bool,
}

/// The six workloads, in the order each system runs them.
pub const WORKLOADS: [Workload; 6] = [
    Workload::new(Pattern::Sequential, false),
    Workload::new(Pattern::Sequential, true),
    Workload::new(Pattern::Uniform, false),
    Workload::new(Pattern::Uniform, true),
    Workload::new(Pattern::Zipf, false),
    Workload::new(Pattern::Zipf, true),
];

impl Workload {
    const fn new(pattern: Pattern, writes: bool) -> Self {
        Self { pattern, writes }
    }

    /// Its name in the report: `seq-read`, `zipf-rw`, ...
    pub fn name(&self) -> String {
        let p = match self.pattern {
            Pattern::Sequential => "seq",
            Pattern::Uniform => "uniform",
            Pattern::Zipf => "zipf",
        };
        format!("{p}-{}", if self.writes { "rw" } else { "read" })
    }

    /// Its operations over `pages` pages: one pass for a sequential scan, else `random_ops`.
    /// The seed depends on the workload only, so every system gets the same sequence.
    pub fn ops(&self, pages: u32, random_ops: usize) -> Vec<u32> {
        let mut rng = Rng::new(0xfa12_0000 + self.pattern as u64 * 2 + u64::from(self.writes));
        let write = |rng: &mut Rng| {
            if self.writes && rng.next_u64() & 1 == 1 {
                WRITE
            } else {
                0
            }
        };
        match self.pattern {
            Pattern::Sequential => (0..pages).map(|p| p | write(&mut rng)).collect(),
            Pattern::Uniform => (0..random_ops)
                .map(|_| (rng.next_u64() % u64::from(pages)) as u32 | write(&mut rng))
                .collect(),
            Pattern::Zipf => {
                let zipf = Zipf::new(pages, ZIPF_SKEW);
                (0..random_ops)
                    .map(|_| zipf.page(&mut rng) | write(&mut rng))
                    .collect()
            }
        }
    }
}

/// xorshift64*: fast, deterministic, good enough to choose pages.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(splitmix(seed) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A uniform value in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finaliser: a well-mixed 64-bit value of `x`.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Zipf-distributed ranks over `n` pages by inversion of the cumulative distribution (a table
/// of `n` floats, built once per workload), each rank mapped to a page by a bijection that
/// scatters the popular pages over the whole footprint (so that no read-ahead or locality
/// helps them by accident).
struct Zipf {
    cdf: Vec<f64>,
    multiplier: u64,
}

impl Zipf {
    fn new(n: u32, skew: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / f64::from(k).powf(skew);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        // A multiplier coprime with n makes rank -> rank * m mod n a bijection.
        let mut multiplier = 0x9e37_79b9u64 % u64::from(n).max(1);
        while gcd(multiplier, u64::from(n)) != 1 {
            multiplier += 1;
        }
        Self { cdf, multiplier }
    }

    fn page(&self, rng: &mut Rng) -> u32 {
        let u = rng.unit();
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1);
        ((rank as u64 * self.multiplier) % self.cdf.len() as u64) as u32
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The first word of page `page` at `version`; word i adds i times an odd constant, so that no
/// two words of a page are equal and no page is zeros (which a server would store as a hole).
fn seed(page: u32, version: u32) -> u64 {
    splitmix(u64::from(page) << 32 | u64::from(version)) | 1
}

/// Word `i` of page `page` at `version`.
fn word(base: u64, i: usize) -> u64 {
    base.wrapping_add((i as u64).wrapping_mul(0xd1b5_4a32_d192_ed03))
}

/// Fills `out` (one page) with the content of `page` at `version`.
pub fn fill(out: &mut [u8], page: u32, version: u32) {
    let base = seed(page, version);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(base, i).to_le_bytes());
    }
}

/// Whether `bytes` (one page) hold the content of `page` at `version`.
pub fn holds(bytes: &[u8], page: u32, version: u32) -> bool {
    let base = seed(page, version);
    bytes
        .chunks_exact(8)
        .enumerate()
        .all(|(i, w)| u64::from_le_bytes(w.try_into().expect("8 bytes")) == word(base, i))
}

/// Memory the workloads run on: `pages` pages from `base`.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    base: usize,
    pages: u32,
}

impl Region {
    /// # Safety
    ///
    /// `base` must be the start of `pages` pages of memory mapped readable and writable for
    /// as long as the region is used, holding no Rust object, and touched by nothing else
    /// while a workload runs (a pager may fault pages in and evict them: that is invisible).
    pub unsafe fn new(base: usize, pages: u32) -> Self {
        Self { base, pages }
    }

    /// Pages.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    fn ptr(&self, page: u32) -> *mut u64 {
        debug_assert!(page < self.pages);
        (self.base + page as usize * PAGE) as *mut u64
    }

    /// Writes `page` at `version`.
    fn write(&self, page: u32, version: u32) {
        let base = seed(page, version);
        let p = self.ptr(page);
        for i in 0..WORDS {
            // SAFETY: `p` is a page of the region (mapped writable, no Rust object: `new`'s
            // contract); volatile so that each store touches the memory (and may fault).
            unsafe { p.add(i).write_volatile(word(base, i)) };
        }
    }

    /// The wrapping sum of `page`'s words.
    fn sum(&self, page: u32) -> u64 {
        let p = self.ptr(page);
        (0..WORDS).fold(0u64, |s, i| {
            // SAFETY: as in `write`, a read.
            s.wrapping_add(unsafe { p.add(i).read_volatile() })
        })
    }

    /// Whether `page` holds its content at `version`.
    fn holds(&self, page: u32, version: u32) -> bool {
        let base = seed(page, version);
        let p = self.ptr(page);
        (0..WORDS).all(|i| {
            // SAFETY: as in `write`, a read.
            unsafe { p.add(i).read_volatile() == word(base, i) }
        })
    }

    /// Writes every page at version 0 (the initial content).
    pub fn populate(&self) {
        for p in 0..self.pages {
            self.write(p, 0);
        }
    }

    /// Reads every page once, in order (warms a budget with the footprint's last pages).
    pub fn scan(&self) -> u64 {
        (0..self.pages).fold(0, |s, p| s.wrapping_add(self.sum(p)))
    }

    /// Runs `ops` (see [`Workload::ops`]) until done or `limit` has passed, keeping
    /// `versions` (one per page); returns how many ran.
    pub fn run(&self, ops: &[u32], versions: &mut [u32], limit: Duration) -> usize {
        let started = Instant::now();
        let mut sink = 0u64;
        for (n, chunk) in ops.chunks(CHECK_EVERY).enumerate() {
            if n > 0 && started.elapsed() > limit {
                std::hint::black_box(sink);
                return n * CHECK_EVERY;
            }
            for &op in chunk {
                let page = op & !WRITE;
                if op & WRITE != 0 {
                    versions[page as usize] += 1;
                    self.write(page, versions[page as usize]);
                } else {
                    sink = sink.wrapping_add(self.sum(page));
                }
            }
        }
        std::hint::black_box(sink);
        ops.len()
    }

    /// The first page that does not hold its content at `versions`, if any.
    pub fn first_wrong(&self, versions: &[u32]) -> Option<u32> {
        (0..self.pages).find(|&p| !self.holds(p, versions[p as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operations are the same on every call, stay inside the footprint, write about half
    /// the time in the write workloads and never in the others; Zipf favours a few pages.
    #[test]
    fn ops_are_deterministic_and_shaped() {
        for w in WORKLOADS {
            let a = w.ops(1000, 5000);
            assert_eq!(a, w.ops(1000, 5000), "{}", w.name());
            assert!(a.iter().all(|&op| op & !WRITE < 1000));
            let writes = a.iter().filter(|&&op| op & WRITE != 0).count();
            if w.writes {
                assert!(
                    (a.len() * 2 / 5..a.len() * 3 / 5).contains(&writes),
                    "{writes}"
                );
            } else {
                assert_eq!(writes, 0);
            }
        }
        let zipf = Workload::new(Pattern::Zipf, false).ops(1 << 14, 100_000);
        let mut counts = vec![0u32; 1 << 14];
        for op in zipf {
            counts[op as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top: u32 = counts[..(1 << 14) / 10].iter().sum();
        // Zipf(0.99) over 16384 pages: the top 10% take most of the accesses.
        assert!(top > 60_000, "{top}");
    }

    /// Page content follows the version, and runs on real memory keep the versions right.
    #[test]
    fn content_follows_versions() {
        let mut page = vec![0u8; PAGE];
        fill(&mut page, 7, 3);
        assert!(holds(&page, 7, 3));
        assert!(!holds(&page, 7, 2) && !holds(&page, 6, 3));
        assert!(page.iter().any(|&b| b != 0));
        let pages = 64u32;
        let mut mem = vec![0u64; pages as usize * WORDS];
        // SAFETY: `mem` is pages * 4 KiB of writable memory owned by this test, used only here.
        let region = unsafe { Region::new(mem.as_mut_ptr() as usize, pages) };
        region.populate();
        let mut versions = vec![0u32; pages as usize];
        assert_eq!(region.first_wrong(&versions), None);
        let ops = Workload::new(Pattern::Uniform, true).ops(pages, 500);
        assert_eq!(region.run(&ops, &mut versions, Duration::MAX), 500);
        assert!(versions.iter().any(|&v| v > 1));
        assert_eq!(region.first_wrong(&versions), None);
        versions[5] += 1;
        assert_eq!(region.first_wrong(&versions), Some(5));
    }
}
