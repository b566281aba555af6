//! Where snapshots live.
//!
//! [`SnapshotStore`] is the boundary between the service and storage: list,
//! open, create, and record working sets. [`local::LocalStore`] keeps one
//! directory per snapshot; an object-store backend (S3 API) is meant to sit
//! beside it behind the same trait.
//!
//! A snapshot, once created, is immutable except for its recorded working
//! sets. Creating one (by import or upload) goes through a
//! [`SnapshotWriter`](writer::SnapshotWriter), which computes the zero map and
//! per-page digests in one pass and makes the snapshot visible only when it
//! is complete.

pub mod local;
pub mod object;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use faultline_proto::model::OutOfRange;
use faultline_proto::{
    Manifest, PageIndex, PageRange, PageSize, ProtocolError, Region, SnapshotId, WorkingSetName, pb,
};

pub use local::LocalStore;
pub use writer::SnapshotWriter;

/// A short description of a stored snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSummary {
    /// The snapshot.
    pub name: SnapshotId,
    /// Bytes per page.
    pub page_size: u64,
    /// Pages in the image.
    pub page_count: u64,
    /// Pages that are all zeros.
    pub zero_pages: u64,
    /// Recorded working sets.
    pub working_sets: Vec<WorkingSetName>,
}

impl From<SnapshotSummary> for pb::SnapshotSummary {
    fn from(s: SnapshotSummary) -> Self {
        Self {
            name: s.name.to_string(),
            page_size: s.page_size,
            page_count: s.page_count,
            zero_pages: s.zero_pages,
            working_sets: s.working_sets.iter().map(ToString::to_string).collect(),
        }
    }
}

/// What a new snapshot will look like: the header of an upload, or the
/// arguments of an import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// Its name.
    pub name: SnapshotId,
    /// Its page size.
    pub page_size: PageSize,
    /// Bytes in the image; a positive multiple of the page size.
    pub size: u64,
    /// Guest memory layout; validated against `size`.
    pub regions: Vec<Region>,
}

impl SnapshotSpec {
    /// Validates a layout. With no regions, one region "mem" covers the
    /// whole image at guest address 0.
    pub fn new(
        name: SnapshotId,
        page_size: PageSize,
        size: u64,
        mut regions: Vec<Region>,
    ) -> Result<Self, ProtocolError> {
        if size == 0 || !size.is_multiple_of(page_size.bytes()) {
            return Err(ProtocolError::invalid(
                "size",
                format!(
                    "an image of {size} bytes is not a positive multiple of the page size \
                     {page_size} ({} bytes)",
                    page_size.bytes()
                ),
            ));
        }
        if regions.is_empty() {
            regions.push(Region {
                name: "mem".into(),
                guest_address: 0,
                offset: 0,
                size,
            });
        }
        faultline_proto::model::validate_regions(&regions, page_size, size)?;
        Ok(Self {
            name,
            page_size,
            size,
            regions,
        })
    }

    /// Pages in the image.
    pub fn page_count(&self) -> u64 {
        self.size / self.page_size.bytes()
    }
}

impl TryFrom<pb::SnapshotHeader> for SnapshotSpec {
    type Error = ProtocolError;
    fn try_from(h: pb::SnapshotHeader) -> Result<Self, ProtocolError> {
        Self::new(
            SnapshotId::new(h.name)?,
            PageSize::try_from(h.page_size)?,
            h.size,
            h.regions.into_iter().map(Region::from).collect(),
        )
    }
}

/// An open, immutable snapshot whose pages can be read.
pub trait Snapshot: Send + Sync + std::fmt::Debug {
    /// The manifest, with the working sets recorded so far.
    fn manifest(&self) -> Arc<Manifest>;

    /// The bytes of `range`, `range.count() * page_size` of them. Zero pages
    /// read as zeros. The caller has checked the range against the manifest.
    fn read(&self, range: PageRange) -> Bytes;

    /// A recorded working set, in first-touch order; `None` if there is no
    /// working set of that name.
    fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<PageIndex>>>;
}

/// A place snapshots are kept.
pub trait SnapshotStore: Send + Sync + std::fmt::Debug + 'static {
    /// Every complete snapshot, sorted by name.
    fn list(&self) -> Result<Vec<SnapshotSummary>, ListError>;

    /// Opens a snapshot for reading. Cheap after the first call: opened
    /// snapshots are shared.
    fn open(&self, id: &SnapshotId) -> Result<Arc<dyn Snapshot>, OpenError>;

    /// Starts writing a new snapshot. Nothing is visible under its name until
    /// [`SnapshotWriter::finish`] succeeds; dropping the writer discards it.
    fn create(&self, spec: SnapshotSpec) -> Result<SnapshotWriter, CreateError>;

    /// Stores a working set of `id` (pages in first-touch order), replacing
    /// one of the same name. Returns the number of distinct pages stored.
    fn record_working_set(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, RecordError>;
}

/// Listing the store failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The store's directory could not be read.
    #[error("cannot read the snapshot store {path}: {source}")]
    ReadDir {
        /// The store.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A snapshot in the store could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// Opening a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// There is no snapshot of that name.
    #[error("snapshot \"{0}\" does not exist; list the snapshots with `faultline-server list`")]
    NotFound(SnapshotId),
    /// A file of the snapshot could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The snapshot's files do not agree with each other.
    #[error(
        "snapshot \"{snapshot}\" is corrupt: {reason}; re-import it (its files were changed or \
         truncated)"
    )]
    Corrupt {
        /// The snapshot.
        snapshot: SnapshotId,
        /// What does not add up.
        reason: String,
    },
}

/// Creating a snapshot (import or upload) failed; nothing was kept.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The name is taken.
    #[error("snapshot \"{0}\" already exists; choose another name")]
    AlreadyExists(SnapshotId),
    /// The description of the new snapshot is not valid.
    #[error("invalid snapshot: {0}")]
    Invalid(#[from] ProtocolError),
    /// Data arrived at an offset other than the next one expected.
    #[error(
        "data for offset {got} arrived, but the next byte expected is {expected}; send the image in order"
    )]
    OutOfOrder {
        /// Bytes received so far.
        expected: u64,
        /// Offset the data claimed.
        got: u64,
    },
    /// More data arrived than the declared size.
    #[error("the image is larger than its declared size of {size} bytes")]
    TooLong {
        /// Declared size.
        size: u64,
    },
    /// The data ended before the declared size.
    #[error("the image ended after {got} of its declared {size} bytes; nothing was kept")]
    Incomplete {
        /// Declared size.
        size: u64,
        /// Bytes received.
        got: u64,
    },
    /// Writing to the store failed.
    #[error("cannot {stage} for snapshot \"{snapshot}\": {source}")]
    Io {
        /// The snapshot.
        snapshot: SnapshotId,
        /// What was being done.
        stage: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Recording a working set failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The snapshot could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A range is outside the snapshot.
    #[error(transparent)]
    OutOfRange(#[from] OutOfRange),
    /// The ranges list more pages than the snapshot has.
    #[error(
        "the working set lists {listed} pages, more than the snapshot's {page_count}; a \
         first-touch order names each page once"
    )]
    TooManyPages {
        /// Pages listed.
        listed: u64,
        /// Pages in the snapshot.
        page_count: u64,
    },
    /// Writing the working set failed.
    #[error("cannot write working set {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The distinct pages of `ranges` in first-touch order, checked against a
/// snapshot of `page_count` pages.
pub fn first_touch_order(
    ranges: &[PageRange],
    page_count: u64,
) -> Result<Vec<PageIndex>, RecordError> {
    let mut listed = 0u64;
    for r in ranges {
        r.check_within(page_count)?;
        listed += r.count();
        if listed > page_count {
            return Err(RecordError::TooManyPages { listed, page_count });
        }
    }
    let mut seen = faultline_proto::PageBitmap::new(page_count);
    let mut order = Vec::with_capacity(listed as usize);
    for p in ranges.iter().flat_map(PageRange::iter) {
        if !seen.get(p.0) {
            seen.set(p.0);
            order.push(p);
        }
    }
    Ok(order)
}
