//! Page batches on the wire: per-run compression, and decoding a received
//! [`pb::PageBatch`] into checked runs of page bytes.

use bytes::Bytes;

use crate::model::{PageIndex, PageRange, PageSize};
use crate::{ProtocolError, pb};

/// zstd level for page runs. Level 1 is zstd's fastest standard level; higher
/// levels cost several times the CPU for a few percent on memory images,
/// and on the prefetch path CPU is the bottleneck (docs/protocol.md has the
/// measurement).
pub const ZSTD_LEVEL: i32 = 1;

/// Most page bytes one batch may hold once decoded: 16 MiB, the most a
/// server sends in one answer (a `ReadPages` call, a `Fault` request or a
/// `Prefetch` batch). Decoding checks it before decompressing anything, so
/// a batch whose runs claim more pages than they carry cannot make the
/// receiver allocate them (a decompression bomb).
pub const MAX_BATCH_BYTES: u64 = 16 << 20;

/// Compression of a page run's data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Raw bytes.
    #[default]
    None,
    /// LZ4 block format, uncompressed size implied by the page count.
    Lz4,
    /// zstd frame.
    Zstd,
}

impl Compression {
    /// Compresses `data`; `None` when it would not shrink (or the codec is
    /// `None`), so the run goes out raw.
    pub fn compress(self, data: &[u8]) -> Option<Vec<u8>> {
        let out = match self {
            Self::None => return None,
            Self::Lz4 => lz4_flex::block::compress(data),
            Self::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL).ok()?,
        };
        (out.len() < data.len()).then_some(out)
    }

    /// Decompresses `data` into exactly `len` bytes.
    pub fn decompress(self, data: Bytes, len: usize) -> Result<Bytes, ProtocolError> {
        let out = match self {
            Self::None => data,
            Self::Lz4 => lz4_flex::block::decompress(&data, len)
                .map_err(|e| ProtocolError::invalid("runs.data", format!("bad lz4 data: {e}")))?
                .into(),
            Self::Zstd => zstd::bulk::decompress(&data, len)
                .map_err(|e| ProtocolError::invalid("runs.data", format!("bad zstd data: {e}")))?
                .into(),
        };
        if out.len() != len {
            return Err(ProtocolError::invalid(
                "runs.data",
                format!("expected {len} bytes of pages, got {}", out.len()),
            ));
        }
        Ok(out)
    }
}

impl TryFrom<i32> for Compression {
    type Error = ProtocolError;
    fn try_from(v: i32) -> Result<Self, ProtocolError> {
        match pb::Compression::try_from(v) {
            Ok(pb::Compression::None) => Ok(Self::None),
            Ok(pb::Compression::Lz4) => Ok(Self::Lz4),
            Ok(pb::Compression::Zstd) => Ok(Self::Zstd),
            Err(_) => Err(ProtocolError::invalid(
                "compression",
                format!("{v} is not a known codec; use 0 (none), 1 (lz4) or 2 (zstd)"),
            )),
        }
    }
}

impl From<Compression> for i32 {
    fn from(c: Compression) -> i32 {
        match c {
            Compression::None => pb::Compression::None as i32,
            Compression::Lz4 => pb::Compression::Lz4 as i32,
            Compression::Zstd => pb::Compression::Zstd as i32,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd),
            _ => Err(format!("unknown compression {s:?}; use none, lz4 or zstd")),
        }
    }
}

/// Builds the wire form of a run of non-zero pages, compressed with `codec`
/// where that shrinks it.
pub fn encode_run(start: PageIndex, count: u64, data: Bytes, codec: Compression) -> pb::PageRun {
    match codec.compress(&data) {
        Some(packed) => pb::PageRun {
            start: start.0,
            count,
            data: packed.into(),
            compression: codec.into(),
        },
        None => pb::PageRun {
            start: start.0,
            count,
            data,
            compression: Compression::None.into(),
        },
    }
}

/// A run of non-zero pages, decompressed and bounds-checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// The pages.
    pub range: PageRange,
    /// `range.count() * page_size` bytes.
    pub data: Bytes,
}

impl PageRun {
    /// Decodes one run sent by the other side (a page written back to a
    /// volume): inside `page_count` pages of `page_size`, holding exactly
    /// its pages' bytes, at most [`MAX_BATCH_BYTES`] of them. The size is
    /// checked before anything is decompressed.
    pub fn decode(
        run: pb::PageRun,
        page_size: PageSize,
        page_count: u64,
    ) -> Result<Self, ProtocolError> {
        let range = PageRange::try_from(pb::PageRange {
            start: run.start,
            count: run.count,
        })?;
        range
            .check_within(page_count)
            .map_err(|e| ProtocolError::invalid("range", e.to_string()))?;
        let bytes = range.count().saturating_mul(page_size.bytes());
        if bytes > MAX_BATCH_BYTES {
            return Err(ProtocolError::invalid(
                "count",
                format!(
                    "a run of {} pages holds {bytes} bytes, more than the {MAX_BATCH_BYTES} one \
                     message may carry; split it",
                    range.count()
                ),
            ));
        }
        let len =
            usize::try_from(bytes).map_err(|_| ProtocolError::invalid("count", "run too large"))?;
        let data = Compression::try_from(run.compression)?.decompress(run.data, len)?;
        Ok(Self { range, data })
    }

    /// The bytes of each page, with its index.
    pub fn pages(&self, page_size: PageSize) -> impl Iterator<Item = (PageIndex, Bytes)> + '_ {
        let ps = page_size.bytes_usize();
        self.range
            .iter()
            .enumerate()
            .map(move |(i, p)| (p, self.data.slice(i * ps..(i + 1) * ps)))
    }
}

/// A received batch, checked against the snapshot it belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBatch {
    /// Non-zero pages with their bytes.
    pub runs: Vec<PageRun>,
    /// Pages that are all zeros.
    pub zero: Vec<PageRange>,
}

impl PageBatch {
    /// Decodes a batch of a snapshot with `page_count` pages of `page_size`:
    /// every run inside the snapshot and holding exactly its pages' bytes,
    /// at most [`MAX_BATCH_BYTES`] of them in all.
    pub fn decode(
        batch: pb::PageBatch,
        page_size: PageSize,
        page_count: u64,
    ) -> Result<Self, ProtocolError> {
        let check = |r: pb::PageRange| -> Result<PageRange, ProtocolError> {
            let range = PageRange::try_from(r)?;
            range
                .check_within(page_count)
                .map_err(|e| ProtocolError::invalid("range", e.to_string()))?;
            Ok(range)
        };
        let mut runs = Vec::with_capacity(batch.runs.len());
        let mut total = 0u64;
        for run in batch.runs {
            let range = check(pb::PageRange {
                start: run.start,
                count: run.count,
            })?;
            total = total.saturating_add(range.count().saturating_mul(page_size.bytes()));
            if total > MAX_BATCH_BYTES {
                return Err(ProtocolError::invalid(
                    "runs",
                    format!(
                        "the batch's runs hold more than {MAX_BATCH_BYTES} bytes of pages, the \
                         most one answer carries"
                    ),
                ));
            }
            let len = usize::try_from(range.count() * page_size.bytes())
                .map_err(|_| ProtocolError::invalid("runs.count", "run too large"))?;
            let data = Compression::try_from(run.compression)?.decompress(run.data, len)?;
            runs.push(PageRun { range, data });
        }
        let zero = batch
            .zero
            .into_iter()
            .map(check)
            .collect::<Result<_, _>>()?;
        Ok(Self { runs, zero })
    }

    /// Pages in the batch, zero or not.
    pub fn page_count(&self) -> u64 {
        self.runs.iter().map(|r| r.range.count()).sum::<u64>()
            + self.zero.iter().map(PageRange::count).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each codec round-trips a compressible run; an incompressible run goes raw.
    #[test]
    fn codecs_round_trip() {
        let data: Bytes = (0..8192u32)
            .map(|i| (i % 7) as u8)
            .collect::<Vec<_>>()
            .into();
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let run = encode_run(PageIndex(2), 2, data.clone(), codec);
            let batch = pb::PageBatch {
                runs: vec![run],
                zero: vec![pb::PageRange { start: 0, count: 2 }],
            };
            let got = PageBatch::decode(batch, PageSize::Size4K, 4).unwrap();
            assert_eq!(got.runs[0].data, data);
            assert_eq!(got.page_count(), 4);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let run = encode_run(PageIndex(0), 1, noise.into(), Compression::Zstd);
        assert_eq!(run.compression, i32::from(Compression::None));
    }

    /// Runs past the end, short data and garbage compressed data are refused.
    #[test]
    fn decode_rejects_bad_batches() {
        let run = |start, count, len, compression| pb::PageBatch {
            runs: vec![pb::PageRun {
                start,
                count,
                data: vec![1u8; len].into(),
                compression,
            }],
            zero: vec![],
        };
        assert!(PageBatch::decode(run(3, 2, 8192, 0), PageSize::Size4K, 4).is_err());
        assert!(PageBatch::decode(run(0, 2, 4096, 0), PageSize::Size4K, 4).is_err());
        assert!(PageBatch::decode(run(0, 1, 100, 2), PageSize::Size4K, 4).is_err());
        assert!(PageBatch::decode(run(0, 1, 100, 9), PageSize::Size4K, 4).is_err());
        // A run claiming a terabyte of pages is refused before anything is
        // allocated for it.
        assert!(PageBatch::decode(run(0, 1 << 28, 100, 1), PageSize::Size4K, 1 << 30).is_err());
    }
}
