//! Importing a raw memory file into a store.
//!
//! A Firecracker or Cloud Hypervisor memory snapshot is the guest's regions
//! back to back; so is QEMU's file-backed RAM. Import reads the file once, in
//! large chunks (on a blocking thread), and feeds it to the store's
//! [`SnapshotWrite`](crate::store::SnapshotWrite), which computes the zero
//! map and digests and stores the image. [`import`] is async, for any store;
//! [`import_file`] is the same for callers without a runtime of their own.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use bytes::BytesMut;
use faultline_proto::{PageSize, ProtocolError, Region, SnapshotId};

use crate::limits::Limits;
use crate::store::{CreateError, SnapshotSpec, SnapshotStore, SnapshotSummary};

/// Bytes read from the file at a time. Large enough that syscalls and
/// per-chunk bookkeeping vanish against hashing; small enough to stay in the
/// L2/L3 caches while each page is checked, hashed and written.
pub const IMPORT_CHUNK_BYTES: usize = 8 << 20;

/// A region given on the command line: `NAME:SIZE[@GPA]`, sizes and addresses
/// in bytes with an optional K, M, G or T suffix (powers of 1024) or in hex
/// with `0x`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionArg {
    /// The region's name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its guest physical address; by default it follows the previous region.
    pub guest_address: Option<u64>,
}

impl FromStr for RegionArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || {
            format!("{s:?} is not NAME:SIZE[@GPA] (for example mem:512M or high:1G@0x100000000)")
        };
        let (name, rest) = s.split_once(':').ok_or_else(usage)?;
        if name.is_empty() {
            return Err(usage());
        }
        let (size, gpa) = match rest.split_once('@') {
            Some((size, gpa)) => (size, Some(parse_size(gpa)?)),
            None => (rest, None),
        };
        Ok(Self {
            name: name.to_owned(),
            size: parse_size(size)?,
            guest_address: gpa,
        })
    }
}

/// Parses `4096`, `0x1000`, `4K`, `512M`, `2G`, `1T`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size; use bytes, 0x-hex, or a K/M/G/T suffix");
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let (digits, shift) = match s.trim_end_matches(['B', 'b', 'i']).chars().last() {
        Some('K' | 'k') => (&s[..s.find(['K', 'k']).expect("found")], 10),
        Some('M' | 'm') => (&s[..s.find(['M', 'm']).expect("found")], 20),
        Some('G' | 'g') => (&s[..s.find(['G', 'g']).expect("found")], 30),
        Some('T' | 't') => (&s[..s.find(['T', 't']).expect("found")], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Lays out `regions` back to back from offset 0, each at its given guest
/// address or right after the previous region's.
pub fn layout(regions: &[RegionArg]) -> Vec<Region> {
    let mut offset = 0;
    let mut next_gpa = 0;
    regions
        .iter()
        .map(|r| {
            let gpa = r.guest_address.unwrap_or(next_gpa);
            let region = Region {
                name: r.name.clone(),
                guest_address: gpa,
                offset,
                size: r.size,
            };
            offset += r.size;
            next_gpa = gpa + r.size;
            region
        })
        .collect()
}

/// Importing a memory file failed; nothing was kept in the store.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The memory file could not be opened or read.
    #[error("cannot read the memory file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The regions do not cover the file exactly.
    #[error(
        "the regions cover {covered} bytes but {path} has {size}; give regions whose sizes add \
         up to the file's size (or none, for one region covering it)"
    )]
    Layout {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The regions' total.
        covered: u64,
    },
    /// The layout or name is invalid.
    #[error("{0}")]
    Invalid(#[from] ProtocolError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// The runtime driving the import could not be started, or a reading
    /// thread failed.
    #[error("the import could not run: {0}")]
    Runtime(String),
}

/// Imports the raw memory file `path` into `store` as snapshot `name`,
/// calling `progress` with the bytes done so far. Refuses images over
/// `limits` before anything is written.
pub async fn import(
    store: &dyn SnapshotStore,
    limits: &Limits,
    name: SnapshotId,
    page_size: PageSize,
    regions: &[RegionArg],
    path: &Path,
    mut progress: impl FnMut(u64) + Send,
) -> Result<SnapshotSummary, ImportError> {
    let read_err = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let regions = layout(regions);
    let covered: u64 = regions.iter().map(|r| r.size).sum();
    if !regions.is_empty() && covered != size {
        return Err(ImportError::Layout {
            path: path.to_owned(),
            size,
            covered,
        });
    }
    let spec = SnapshotSpec::new(name, page_size, size, regions)?;
    limits.check_spec(&spec)?;
    let mut writer = store.create(spec).await?;
    loop {
        let (back, chunk) = tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(IMPORT_CHUNK_BYTES);
            let r = loop {
                match file.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    r => break r,
                }
            };
            (file, r.map(|n| buf.split_to(n).freeze()))
        })
        .await
        .map_err(|e| ImportError::Runtime(e.to_string()))?;
        file = back;
        let chunk = chunk.map_err(read_err)?;
        if chunk.is_empty() {
            break;
        }
        writer.write(chunk).await?;
        progress(writer.received());
    }
    Ok(writer.finish().await?)
}

/// [`import`] with the default [`Limits`], for callers that are not async:
/// it runs on a runtime of its own, on a thread of its own, so it may be
/// called from inside another runtime too (tests, benchmarks).
pub fn import_file(
    store: &dyn SnapshotStore,
    name: SnapshotId,
    page_size: PageSize,
    regions: &[RegionArg],
    path: &Path,
    progress: impl FnMut(u64) + Send,
) -> Result<SnapshotSummary, ImportError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ImportError::Runtime(e.to_string()))?;
                rt.block_on(import(
                    store,
                    &Limits::default(),
                    name,
                    page_size,
                    regions,
                    path,
                    progress,
                ))
            })
            .join()
            .unwrap_or_else(|_| Err(ImportError::Runtime("the import thread panicked".into())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes parse in every accepted spelling; nonsense is refused.
    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    /// Regions parse and lay out back to back, with explicit addresses kept.
    #[test]
    fn regions() {
        let a: RegionArg = "low:1G".parse().unwrap();
        let b: RegionArg = "high:1G@0x100000000".parse().unwrap();
        let c: RegionArg = "tail:4K".parse().unwrap();
        assert!("nocolon".parse::<RegionArg>().is_err());
        let l = layout(&[a, b, c]);
        assert_eq!((l[1].offset, l[1].guest_address), (1 << 30, 1 << 32));
        assert_eq!(
            (l[2].offset, l[2].guest_address),
            (2 << 30, (1 << 32) + (1 << 30))
        );
    }
}
