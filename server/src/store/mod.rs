//! Where snapshots live.
//!
//! [`SnapshotStore`] is the boundary between the service and storage: list,
//! open, create, and record working sets. [`local::LocalStore`] keeps one
//! directory per snapshot; an object-store backend (S3 API) sits beside it
//! behind the same traits.
//!
//! # The boundary
//! ```text
//! SnapshotStore   list() / open(id) / create(spec) / record_working_set(..)
//!    | open                     | create
//!    v                          v
//! Arc<dyn Snapshot>         Box<dyn SnapshotWrite>
//!   manifest()  (cached)      write(bytes) ... in order
//!   read(range) -> Bytes      finish() -> SnapshotSummary
//!   working_set(name)         (dropped before finish: nothing is kept)
//! ```
//! Everything that may touch a disk or a network is `async` and fallible,
//! so that:
//! - no store I/O runs on the service's async workers (a local store reads
//!   with `pread` on blocking threads, an object store awaits its client);
//! - a failed read is an error for that request, never a crash. An image
//!   read through a memory mapping would turn an I/O error or a file
//!   truncated under the server into SIGBUS for the whole process, which is
//!   why no backend maps its files. [`ReadError::Io`] and
//!   [`ReadError::Corrupt`] become DataLoss, [`ReadError::Unavailable`]
//!   (an object store that does not answer) Unavailable.
//!
//! `manifest()` and `working_set()` stay synchronous: a snapshot holds them
//! in memory once opened, and the fault path reads them per request.
//!
//! Error messages name snapshots and files relative to the store, never the
//! server's paths: they travel to clients.
//!
//! Volumes (writable memory) and diff snapshots are chains of layers
//! ([`layers`]), a feature of the local store; the [`SnapshotStore`]
//! methods for them refuse by default ([`VolumeError::Unsupported`]).
//!
//! A snapshot, once created, is immutable except for its recorded working
//! sets. Creating one (by import or upload) goes through a
//! [`SnapshotWrite`]; the local one, [`SnapshotWriter`](writer::SnapshotWriter),
//! computes the zero map and per-page digests in one pass and makes the
//! snapshot visible only when it is complete.

pub mod layers;
pub mod local;
pub mod object;
pub mod writer;
pub mod ws_pages;

use std::sync::Arc;

use bytes::Bytes;
use faultline_proto::model::OutOfRange;
use faultline_proto::{
    ChainDepth, LayerKind, Manifest, PageIndex, PageRange, PageSize, ProtocolError, Region,
    SnapshotId, WorkingSetName, pb,
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
    /// What it is in a chain of layers.
    pub layer: LayerInfo,
}

/// Where a snapshot or volume sits in a chain of layers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LayerInfo {
    /// Snapshot or volume.
    pub kind: LayerKind,
    /// The layer under this one, if any.
    pub parent: Option<SnapshotId>,
    /// Layers in the chain, this one included.
    pub depth: ChainDepth,
    /// Pages this layer holds itself; the rest are its parent's.
    pub own_pages: u64,
}

impl LayerInfo {
    /// A standalone snapshot of `page_count` pages.
    pub fn standalone(page_count: u64) -> Self {
        Self {
            kind: LayerKind::Snapshot,
            parent: None,
            depth: ChainDepth(1),
            own_pages: page_count,
        }
    }
}

impl From<SnapshotSummary> for pb::SnapshotSummary {
    fn from(s: SnapshotSummary) -> Self {
        Self {
            name: s.name.to_string(),
            page_size: s.page_size,
            page_count: s.page_count,
            zero_pages: s.zero_pages,
            working_sets: s.working_sets.iter().map(ToString::to_string).collect(),
            kind: pb::LayerKind::from(s.layer.kind).into(),
            parent: s.layer.parent.map(|p| p.to_string()).unwrap_or_default(),
            depth: s.layer.depth.0,
            own_pages: s.layer.own_pages,
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

/// A working set's page file and the order it holds the set's pages in
/// ([`Snapshot::working_set_pages`]).
#[derive(Debug, Clone)]
pub struct WorkingSetPages {
    /// The order.
    pub order: Arc<Vec<PageIndex>>,
    /// The file: the order's non-zero pages one after another.
    pub file: Arc<std::fs::File>,
}

/// An open, immutable snapshot whose pages can be read.
#[async_trait::async_trait]
pub trait Snapshot: Send + Sync + std::fmt::Debug {
    /// The manifest, with the working sets recorded so far.
    fn manifest(&self) -> Arc<Manifest>;

    /// The bytes of `range`, `range.count() * page_size` of them. Zero pages
    /// read as zeros. The caller has checked the range against the manifest.
    /// Never blocks the calling async worker on storage.
    async fn read(&self, range: PageRange) -> Result<Bytes, ReadError>;

    /// A recorded working set, in first-touch order; `None` if there is no
    /// working set of that name.
    fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<PageIndex>>>;

    /// `range` split into runs of zero and non-zero pages, as the snapshot
    /// is now: for an immutable snapshot its manifest's zero map; a volume,
    /// whose pages change, answers from its current state without
    /// rebuilding a manifest.
    fn zero_runs(&self, range: PageRange) -> Vec<(PageRange, bool)> {
        let manifest = self.manifest();
        split_by(range, |p| manifest.zero_map.get(p))
    }

    /// The image as one read-only file (page `i` at `i * page_size`, zero
    /// pages possibly holes) that never changes while the snapshot exists,
    /// for handing to a client on this host (`crate::page_file`); `None`
    /// where pages are not laid out so (object store, layers, volumes).
    fn page_file(&self) -> Option<Arc<std::fs::File>> {
        None
    }

    /// Working set `name`'s non-zero pages one after another in its order
    /// ([`ws_pages`]), read-only and never changed, with the order they are
    /// in; `None` where the store keeps no such file (then the set is read
    /// from the image).
    fn working_set_pages(&self, _name: &WorkingSetName) -> Option<WorkingSetPages> {
        None
    }

    /// The bytes of `count` pages of `pages`' file from page `at` (their
    /// slots, not page indices); `first` is the first of those pages, for
    /// errors. Never blocks the calling async worker on storage.
    async fn read_working_set(
        &self,
        _pages: &WorkingSetPages,
        _at: u64,
        _count: u64,
        first: PageRange,
    ) -> Result<Bytes, ReadError> {
        Err(ReadError::Unavailable {
            snapshot: self.manifest().id.clone(),
            reason: format!("this store keeps no working-set page file (reading {first})"),
        })
    }
}

/// `range` split into runs of pages for which `is_zero` agrees.
pub fn split_by(range: PageRange, is_zero: impl Fn(u64) -> bool) -> Vec<(PageRange, bool)> {
    let mut out = Vec::new();
    let mut start = range.start().0;
    while start < range.end() {
        let z = is_zero(start);
        let mut end = start + 1;
        while end < range.end() && is_zero(end) == z {
            end += 1;
        }
        out.push((
            PageRange::new(PageIndex(start), end - start).expect("non-empty"),
            z,
        ));
        start = end;
    }
    out
}

/// A snapshot being written: the image arrives in order, in pieces of any
/// size. Nothing is visible under its name until [`SnapshotWrite::finish`]
/// succeeds; dropping the writer before that discards everything written.
#[async_trait::async_trait]
pub trait SnapshotWrite: Send + std::fmt::Debug {
    /// The snapshot being written.
    fn spec(&self) -> &SnapshotSpec;

    /// Bytes of the image received so far.
    fn received(&self) -> u64;

    /// Appends `data` to the image.
    async fn write(&mut self, data: Bytes) -> Result<(), CreateError>;

    /// Appends `data`, which must start at byte `offset` of the image (the
    /// number of bytes received so far).
    async fn write_at(&mut self, offset: u64, data: Bytes) -> Result<(), CreateError> {
        OrderError::check_offset(self.received(), offset)?;
        self.write(data).await
    }

    /// Completes the snapshot: checks that the whole image arrived, makes
    /// it durable and visible.
    async fn finish(self: Box<Self>) -> Result<SnapshotSummary, CreateError>;
}

/// A writable volume: a [`Snapshot`] whose pages can be written.
#[async_trait::async_trait]
pub trait Volume: Snapshot {
    /// Bytes per page.
    fn page_size(&self) -> PageSize;

    /// Pages in the image.
    fn page_count(&self) -> u64;

    /// Writes a run of pages; returns once the pages and their digests are
    /// durable. A run that fails leaves every page as it was.
    async fn write(&self, run: faultline_proto::codec::PageRun) -> Result<(), WriteError>;
}

/// A place snapshots are kept.
///
/// Volumes (writable memory) and diff snapshots are a feature of a store:
/// the provided methods refuse them with [`VolumeError::Unsupported`], and
/// a store that keeps them overrides them.
#[async_trait::async_trait]
pub trait SnapshotStore: Send + Sync + std::fmt::Debug + 'static {
    /// The store's kind, for messages ("local", "object").
    fn backend(&self) -> &'static str {
        "this"
    }

    /// Creates a volume, empty or a copy-on-write child of a snapshot.
    async fn create_volume(
        &self,
        _request: faultline_proto::CreateVolume,
    ) -> Result<SnapshotSummary, VolumeError> {
        Err(VolumeError::Unsupported {
            backend: self.backend(),
        })
    }

    /// Opens a volume for writing.
    async fn open_volume(&self, _id: &SnapshotId) -> Result<Arc<dyn Volume>, VolumeError> {
        Err(VolumeError::Unsupported {
            backend: self.backend(),
        })
    }

    /// Seals a volume into an immutable diff snapshot under a new name.
    async fn seal_volume(
        &self,
        _request: faultline_proto::SealVolume,
    ) -> Result<SnapshotSummary, VolumeError> {
        Err(VolumeError::Unsupported {
            backend: self.backend(),
        })
    }

    /// Every complete snapshot, sorted by name.
    async fn list(&self) -> Result<Vec<SnapshotSummary>, ListError>;

    /// Opens a snapshot for reading. Cheap after the first call: opened
    /// snapshots are shared (in a bounded cache that notices a snapshot
    /// replaced under the same name).
    async fn open(&self, id: &SnapshotId) -> Result<Arc<dyn Snapshot>, OpenError>;

    /// Starts writing a new snapshot. The caller has checked `spec` against
    /// the server's [`Limits`](crate::limits::Limits) (image size, page
    /// count); the store checks its own room (free disk).
    async fn create(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWrite>, CreateError>;

    /// Stores a working set of `id` (pages in first-touch order), replacing
    /// one of the same name, atomically: concurrent calls leave one of them
    /// stored, and that one is the one served. Returns the number of
    /// distinct pages stored.
    async fn record_working_set(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, RecordError>;
}

/// Reading pages of an open snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The storage returned an error, or the image ended early.
    #[error(
        "cannot read {range} of snapshot \"{snapshot}\": {source}; the store may be damaged \
         (check it with `faultline-server inspect --verify`)"
    )]
    Io {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The pages.
        range: PageRange,
        /// Why.
        source: std::io::Error,
    },
    /// The storage did not answer (an object store that is down).
    #[error("the storage of snapshot \"{snapshot}\" is unavailable: {reason}; retry later")]
    Unavailable {
        /// The snapshot.
        snapshot: SnapshotId,
        /// Why.
        reason: String,
    },
    /// The storage answered with something that cannot be the snapshot.
    #[error("snapshot \"{snapshot}\" is corrupt: {reason}; re-import it")]
    Corrupt {
        /// The snapshot.
        snapshot: SnapshotId,
        /// What does not add up.
        reason: String,
    },
}

/// Listing the store failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The store's directory could not be read.
    #[error("cannot read the snapshot store: {source}")]
    ReadDir {
        /// Why.
        source: std::io::Error,
    },
    /// The storage did not answer.
    #[error("the snapshot store is unavailable: {reason}; retry later")]
    Unavailable {
        /// Why.
        reason: String,
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
    #[error("cannot read {file} of snapshot \"{snapshot}\": {source}")]
    Read {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The file, relative to the snapshot.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// The storage did not answer.
    #[error("the storage of snapshot \"{snapshot}\" is unavailable: {reason}; retry later")]
    Unavailable {
        /// The snapshot.
        snapshot: SnapshotId,
        /// Why.
        reason: String,
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

/// An image's bytes did not arrive as its spec declares: in order, exactly
/// `size` of them. Every store's writer checks its input with these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
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
    /// More data than the declared size.
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
}

impl OrderError {
    /// Data claiming to start at `offset` after `received` bytes.
    pub fn check_offset(received: u64, offset: u64) -> Result<(), Self> {
        if offset != received {
            return Err(Self::OutOfOrder {
                expected: received,
                got: offset,
            });
        }
        Ok(())
    }

    /// `len` more bytes after `received` of an image of `size`.
    pub fn check_room(size: u64, received: u64, len: usize) -> Result<(), Self> {
        if received + len as u64 > size {
            return Err(Self::TooLong { size });
        }
        Ok(())
    }

    /// The end of an image of `size` after `received` bytes.
    pub fn check_complete(size: u64, received: u64) -> Result<(), Self> {
        if received != size {
            return Err(Self::Incomplete {
                size,
                got: received,
            });
        }
        Ok(())
    }
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
    /// The image is larger than this server accepts.
    #[error(
        "the image's {what} is {got}, more than this server's limit of {limit}; the operator \
         can raise it with `--{flag}` (of `faultline-server serve` or `import`)"
    )]
    TooLarge {
        /// What is too large ("size in bytes", "page count").
        what: &'static str,
        /// The image's.
        got: u64,
        /// The limit.
        limit: u64,
        /// The flag that sets the limit.
        flag: &'static str,
    },
    /// Storing the image would eat into the store's free-space reserve.
    #[error(
        "the store's disk has {free} bytes free, and keeps a reserve of {reserve}; free space \
         or lower `--min-free-disk`; nothing was kept"
    )]
    DiskFull {
        /// Bytes free.
        free: u64,
        /// The reserve.
        reserve: u64,
    },
    /// The image's bytes did not arrive in order, or not all of them.
    #[error(transparent)]
    Order(#[from] OrderError),
    /// The storage did not answer.
    #[error("the snapshot store is unavailable: {reason}; retry later")]
    Unavailable {
        /// Why.
        reason: String,
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

/// Recording a working set failed; the stored set (if any) is unchanged.
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
    /// The working set is larger than the server keeps.
    #[error(
        "the working set lists {listed} pages, more than this server's limit of {limit}; \
         record fewer pages (or the operator raises `--max-working-set-pages`)"
    )]
    TooLarge {
        /// Pages listed.
        listed: u64,
        /// The limit.
        limit: u64,
    },
    /// The snapshot has as many working sets as the server keeps.
    #[error(
        "snapshot \"{snapshot}\" has {limit} working sets already, this server's limit; \
         replace one of them (record under an existing name)"
    )]
    TooManySets {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The limit.
        limit: usize,
    },
    /// The storage did not answer.
    #[error("the snapshot store is unavailable: {reason}; retry later")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// Writing the working set failed.
    #[error("cannot write working set \"{name}\" of snapshot \"{snapshot}\": {source}")]
    Write {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The working set.
        name: WorkingSetName,
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

/// Creating, sealing, importing or flattening a volume or diff snapshot
/// failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The store does not keep volumes.
    #[error(
        "{backend} store does not keep volumes or diff snapshots; serve a local store \
         (`faultline-server serve --store DIR`) for writable memory"
    )]
    Unsupported {
        /// The store's kind.
        backend: &'static str,
    },
    /// The name is taken.
    #[error("\"{0}\" already exists; choose another name")]
    AlreadyExists(SnapshotId),
    /// No volume of that name.
    #[error("volume \"{0}\" does not exist; create it with `faultline-server volume create`")]
    NotFound(SnapshotId),
    /// The name is an immutable snapshot.
    #[error(
        "\"{0}\" is a snapshot, which is immutable; create a volume from it \
         (`faultline-server volume create --from {0}`) and write that"
    )]
    NotAVolume(SnapshotId),
    /// The parent could not be opened.
    #[error("cannot use the parent: {0}")]
    Parent(OpenError),
    /// The chain would be too deep.
    #[error(
        "\"{parent}\" is already {depth} layers deep, and a chain may hold at most {max}; \
         flatten it first (`faultline-server flatten --name {parent} --as NEW`)"
    )]
    TooDeep {
        /// The parent.
        parent: SnapshotId,
        /// Its depth.
        depth: u32,
        /// [`layers::MAX_CHAIN_DEPTH`].
        max: u32,
    },
    /// The request is not valid.
    #[error("invalid request: {0}")]
    Invalid(#[from] ProtocolError),
    /// A diff memory file does not fit its parent.
    #[error("{0}")]
    Mismatch(String),
    /// The new image is larger than the server accepts.
    #[error(transparent)]
    Limit(CreateError),
    /// Reading the chain failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Opening the volume failed.
    #[error(transparent)]
    Open(OpenError),
    /// A storage thread failed.
    #[error("the snapshot store is unavailable: {reason}; retry later")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// Reading or writing files failed.
    #[error("cannot {stage} for \"{name}\": {source}")]
    Io {
        /// The volume or snapshot.
        name: SnapshotId,
        /// What was being done.
        stage: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Writing a run of pages to a volume failed; none of its pages changed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The name is an immutable snapshot.
    #[error("\"{0}\" is a snapshot, which is immutable; create a volume from it and write that")]
    NotAVolume(SnapshotId),
    /// The volume was sealed.
    #[error("volume \"{0}\" was sealed into a snapshot; it takes no more writes")]
    Sealed(SnapshotId),
    /// Pages past the end.
    #[error(transparent)]
    OutOfRange(OutOfRange),
    /// The bytes do not match the pages.
    #[error("{range} need {want} bytes, the run has {got}")]
    WrongSize {
        /// The pages.
        range: PageRange,
        /// Bytes sent.
        got: usize,
        /// Bytes needed.
        want: usize,
    },
    /// Writing would eat into the store's free-space reserve.
    #[error(
        "the store's disk has {free} bytes free, and keeps a reserve of {reserve}; free space \
         or lower `--min-free-disk`; the run was not written"
    )]
    DiskFull {
        /// Bytes free.
        free: u64,
        /// The reserve.
        reserve: u64,
    },
    /// A storage thread failed.
    #[error("the storage of volume \"{volume}\" is unavailable: {reason}; retry later")]
    Unavailable {
        /// The volume.
        volume: SnapshotId,
        /// Why.
        reason: String,
    },
    /// Writing failed; the run was not acknowledged.
    #[error("cannot {stage} of volume \"{volume}\": {source}; the run was not written")]
    Io {
        /// The volume.
        volume: SnapshotId,
        /// What was being done.
        stage: &'static str,
        /// Why.
        source: std::io::Error,
    },
}
