//! A fixed-length bitmap over the pages of a snapshot.
//!
//! Wire and disk layout: bit `i` is bit `i % 8` (least significant first) of
//! byte `i / 8`; exactly `ceil(len / 8)` bytes, unused high bits zero.

use crate::ProtocolError;

/// One bit per page.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    len: u64,
}

impl std::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBitmap")
            .field("len", &self.len)
            .field("ones", &self.count_ones())
            .finish()
    }
}

impl PageBitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; usize::try_from(len.div_ceil(64)).expect("bitmap fits in memory")],
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a bitmap of no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes in the wire layout for `len` bits.
    pub fn byte_len(len: u64) -> u64 {
        len.div_ceil(8)
    }

    /// Whether bit `i` is set. Panics if `i >= len`.
    pub fn get(&self, i: u64) -> bool {
        assert!(i < self.len, "bit {i} out of a bitmap of {}", self.len);
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`. Panics if `i >= len`.
    pub fn set(&mut self, i: u64) {
        assert!(i < self.len, "bit {i} out of a bitmap of {}", self.len);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Clears bit `i`. Panics if `i >= len`.
    pub fn clear(&mut self, i: u64) {
        assert!(i < self.len, "bit {i} out of a bitmap of {}", self.len);
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }

    /// Bits `64 * w..64 * w + 64` as one word: bit `i` of the bitmap is bit
    /// `i % 64` of word `i / 64`, and the bits past `len` are clear. Panics
    /// past the last word. For loops over every page, a word at a time.
    pub fn word(&self, w: usize) -> u64 {
        self.words[w]
    }

    /// Sets bits `start..start + count`, a word at a time. Panics if the
    /// range reaches past `len`.
    pub fn set_range(&mut self, start: u64, count: u64) {
        let end = start.checked_add(count).expect("range overflows");
        assert!(
            end <= self.len,
            "bits {start}..{end} out of a bitmap of {}",
            self.len
        );
        let mut i = start;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[(i / 64) as usize] |= mask;
            i += n;
        }
    }

    /// The first clear bit in `from..end`, or `end` if there is none;
    /// scans a word at a time. `end` is capped at `len`.
    pub fn next_clear(&self, from: u64, end: u64) -> u64 {
        self.scan(from, end, true)
    }

    /// The first set bit in `from..end`, or `end` if there is none.
    pub fn next_set(&self, from: u64, end: u64) -> u64 {
        self.scan(from, end, false)
    }

    /// The first bit in `from..end` that is clear (`want_clear`) or set.
    fn scan(&self, from: u64, end: u64, want_clear: bool) -> u64 {
        let end = end.min(self.len);
        let mut i = from;
        while i < end {
            let word = self.words[(i / 64) as usize];
            let word = if want_clear { !word } else { word };
            let bits = word >> (i % 64);
            if bits != 0 {
                return (i + u64::from(bits.trailing_zeros())).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Number of set bits in `start..end`, a word at a time. Panics if the
    /// range reaches past `len`.
    pub fn count_ones_in(&self, start: u64, end: u64) -> u64 {
        assert!(
            start <= end && end <= self.len,
            "bits {start}..{end} out of a bitmap of {}",
            self.len
        );
        let mut ones = 0;
        let mut i = start;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let word = self.words[(i / 64) as usize] >> bit;
            let word = if n == 64 {
                word
            } else {
                word & ((1u64 << n) - 1)
            };
            ones += u64::from(word.count_ones());
            i += n;
        }
        ones
    }

    /// Maximal runs of set bits, as `(start, count)`, ascending.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut i = 0;
        std::iter::from_fn(move || {
            while i < self.len && !self.get(i) {
                // Skip whole clear words quickly.
                if i % 64 == 0 && self.words[(i / 64) as usize] == 0 {
                    i += 64;
                } else {
                    i += 1;
                }
            }
            if i >= self.len {
                return None;
            }
            let start = i;
            while i < self.len && self.get(i) {
                i += 1;
            }
            Some((start, i - start))
        })
    }

    /// The wire layout.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = Self::byte_len(self.len) as usize;
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(n);
        out
    }

    /// Parses the wire layout of a bitmap of `len` bits. `field` names the
    /// message field in errors.
    pub fn from_bytes(field: &'static str, bytes: &[u8], len: u64) -> Result<Self, ProtocolError> {
        let want = Self::byte_len(len);
        if bytes.len() as u64 != want {
            return Err(ProtocolError::invalid(
                field,
                format!(
                    "a bitmap of {len} pages takes {want} bytes, this one has {}",
                    bytes.len()
                ),
            ));
        }
        let mut map = Self::new(len);
        for (w, chunk) in map.words.iter_mut().zip(bytes.chunks(8)) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(buf);
        }
        if !len.is_multiple_of(64) {
            let last = map.words.len() - 1;
            if map.words[last] >> (len % 64) != 0 {
                return Err(ProtocolError::invalid(
                    field,
                    format!("bits beyond page {len} are set; they must be zero"),
                ));
            }
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counting the set bits of a range agrees with testing each bit, across
    /// word boundaries and for empty ranges.
    #[test]
    fn count_ones_in_agrees_with_get() {
        let mut m = PageBitmap::new(200);
        for i in [0, 1, 63, 64, 65, 127, 128, 150, 199] {
            m.set(i);
        }
        m.set_range(70, 20);
        for (start, end) in [
            (0, 200),
            (0, 0),
            (1, 64),
            (63, 65),
            (64, 128),
            (66, 199),
            (199, 200),
        ] {
            let want = (start..end).filter(|&i| m.get(i)).count() as u64;
            assert_eq!(m.count_ones_in(start, end), want, "{start}..{end}");
        }
    }

    /// The byte layout is LSB-first and round-trips.
    #[test]
    fn bytes_round_trip() {
        let mut m = PageBitmap::new(70);
        m.set(0);
        m.set(9);
        m.set(69);
        let b = m.to_bytes();
        assert_eq!(b.len(), 9);
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 2);
        assert_eq!(b[8], 1 << 5);
        assert_eq!(PageBitmap::from_bytes("x", &b, 70).unwrap(), m);
    }

    /// Wrong lengths and stray high bits are rejected.
    #[test]
    fn rejects_bad_bytes() {
        assert!(PageBitmap::from_bytes("x", &[0; 3], 70).is_err());
        let mut b = vec![0; 9];
        b[8] = 0x80;
        assert!(PageBitmap::from_bytes("x", &b, 70).is_err());
    }

    /// Range sets and word-wise scans find the first clear or set bit,
    /// across word boundaries and capped at the end.
    #[test]
    fn scans_and_ranges() {
        let mut b = PageBitmap::new(300);
        b.set_range(3, 200);
        assert_eq!(b.count_ones(), 200);
        assert!(!b.get(2) && b.get(3) && b.get(202) && !b.get(203));
        assert_eq!(b.next_set(0, 300), 3);
        assert_eq!(b.next_clear(3, 300), 203);
        assert_eq!(b.next_clear(3, 100), 100);
        assert_eq!(b.next_set(203, 300), 300);
        assert_eq!(b.next_clear(0, 1000), 0);
        let mut full = PageBitmap::new(128);
        full.set_range(0, 128);
        assert_eq!(full.next_clear(0, 128), 128);
    }

    /// Runs are maximal and ascending, across word boundaries.
    #[test]
    fn runs() {
        let mut m = PageBitmap::new(200);
        m.set_range(3, 2);
        m.set_range(60, 10);
        m.set(199);
        let r: Vec<_> = m.runs().collect();
        assert_eq!(r, vec![(3, 2), (60, 10), (199, 1)]);
        assert_eq!(m.count_ones(), 13);
    }
}
