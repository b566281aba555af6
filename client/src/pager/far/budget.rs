//! The local memory budget of a far-memory region: how many of its pages may be resident.

use std::fmt;
use std::str::FromStr;

/// Fewest pages a budget may hold: eviction works in batches of up to a quarter of the budget
/// (see [`super::evict::EVICT_BATCH`]), and with fewer than 16 pages the touching threads'
/// working pages would evict one another on every fault.
pub const MIN_BUDGET_PAGES: u64 = 16;

/// A local memory budget, in bytes (rounded down to whole pages) or pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// At most this many bytes resident.
    Bytes(u64),
    /// At most this many pages resident.
    Pages(u64),
}

/// A budget that does not fit the region.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a budget of {pages} pages is too small: give at least {MIN_BUDGET_PAGES} pages \
     ({} bytes of {page_size}-byte pages)",
    MIN_BUDGET_PAGES * page_size
)]
pub struct BudgetTooSmall {
    /// The budget, in pages.
    pub pages: u64,
    /// The region's page size.
    pub page_size: u64,
}

impl Budget {
    /// The budget in pages of `page_size` bytes, at least [`MIN_BUDGET_PAGES`].
    pub fn pages(self, page_size: u64) -> Result<u64, BudgetTooSmall> {
        let pages = match self {
            Self::Bytes(b) => b / page_size,
            Self::Pages(p) => p,
        };
        if pages < MIN_BUDGET_PAGES {
            return Err(BudgetTooSmall { pages, page_size });
        }
        Ok(pages)
    }
}

impl FromStr for Budget {
    type Err = String;

    /// `N` bytes, `N` with a binary suffix (`K`, `M`, `G`, with or without `iB`), or `Npages`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("bad budget {s:?}: give bytes (4096, 64M, 1GiB) or pages (16384pages)");
        let t = s.trim();
        if let Some(n) = t.strip_suffix("pages") {
            return n.trim().parse().map(Self::Pages).map_err(|_| bad());
        }
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let (digits, shift) = match t.as_bytes().last() {
            Some(b'K' | b'k') => (&t[..t.len() - 1], 10),
            Some(b'M' | b'm') => (&t[..t.len() - 1], 20),
            Some(b'G' | b'g') => (&t[..t.len() - 1], 30),
            _ => (t, 0),
        };
        let n: u64 = digits.trim().parse().map_err(|_| bad())?;
        n.checked_mul(1 << shift).map(Self::Bytes).ok_or_else(bad)
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "{b} bytes"),
            Self::Pages(p) => write!(f, "{p} pages"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes with suffixes and page counts parse; nonsense is refused with the accepted forms.
    #[test]
    fn parses_bytes_and_pages() {
        assert_eq!("4096".parse(), Ok(Budget::Bytes(4096)));
        assert_eq!("64M".parse(), Ok(Budget::Bytes(64 << 20)));
        assert_eq!("1GiB".parse(), Ok(Budget::Bytes(1 << 30)));
        assert_eq!("16k".parse(), Ok(Budget::Bytes(16 << 10)));
        assert_eq!("100pages".parse(), Ok(Budget::Pages(100)));
        let err = "lots".parse::<Budget>().unwrap_err();
        assert!(err.contains("64M"), "{err}");
    }

    /// A budget converts to whole pages and is refused below the minimum.
    #[test]
    fn pages_and_minimum() {
        assert_eq!(Budget::Bytes(1 << 20).pages(4096), Ok(256));
        assert_eq!(Budget::Bytes((1 << 20) + 100).pages(4096), Ok(256));
        let err = Budget::Pages(3).pages(4096).unwrap_err();
        assert!(err.to_string().contains("at least 16 pages"), "{err}");
    }
}
