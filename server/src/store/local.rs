//! A store in a local directory: one directory per snapshot.
//!
//! ```text
//! STORE/
//!   NAME/
//!     manifest.json         format version, layout, page size, zero-page ranges
//!     memory                the image; sparse: zero pages are holes
//!     digests               one little-endian CRC32C per page
//!     workingset-WSNAME     recorded working set: little-endian u64 page
//!                           indices in first-touch order
//!     wspages-WSNAME        its non-zero pages in that order, for sequential
//!                           replays (`ws_pages`; optional, checked on open)
//!     .tmp-workingset-...   a working set being written (renamed into
//!                           place: a reader sees the old set or the new one)
//!   .tmp-NAME-PID-N         a snapshot being written (never listed)
//! ```
//!
//! Pages are read with `pread` into buffers, never through a memory
//! mapping: an I/O error on a mapped file, or a file truncated under the
//! server, is a SIGBUS that would end every restore the server serves,
//! where a `pread` error fails one request with DataLoss. A read that the
//! page cache can answer is copied on the calling worker (`preadv2` with
//! `RWF_NOWAIT`, which fails instead of waiting for the disk); anything
//! else, a cold read, runs on a blocking thread. A store in memory (tmpfs,
//! ramfs) has no disk to wait for but refuses `RWF_NOWAIT` (EOPNOTSUPP):
//! there every read is a plain `pread` on the calling worker
//! ([`InlineRead`]).
//!
//! Leftover temporary files of a process that died (`.tmp-*` whose PID is
//! not running) are removed when a store is opened.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use faultline_proto::model::DigestAlgorithm;
use faultline_proto::{
    MANIFEST_FORMAT_VERSION, Manifest, PageBitmap, PageIndex, PageRange, PageSize, Region,
    SnapshotId, WorkingSetName,
};

use super::layers::{self, Chain, LAYER_FORMAT_VERSION, LayerFile, MAX_CHAIN_DEPTH, WeakChain};
use super::writer::TMP_PREFIX;
use super::ws_pages::{self, WORKING_SET_PAGES_PREFIX};
use super::{
    CreateError, ListError, OpenError, ReadError, RecordError, Snapshot, SnapshotSpec,
    SnapshotStore, SnapshotSummary, SnapshotWrite, SnapshotWriter, Volume, VolumeError,
    WorkingSetPages, first_touch_order,
};
use crate::limits::Limits;
use faultline_proto::{CreateVolume, LayerKind, SealVolume, VolumeSource};

/// Largest read tried on the calling async worker when the page cache holds
/// it (`RWF_NOWAIT`): 1 MiB, a pager's largest read-ahead window and the
/// default prefetch batch. Copying it takes tens of microseconds; larger
/// reads go to a blocking thread whatever the cache holds.
pub const INLINE_READ_MAX_BYTES: usize = 1 << 20;

/// `statfs` magic numbers of the file systems that keep every page in
/// memory (`linux/magic.h`): reading them never waits for a disk (a page
/// swapped out is read back from swap, as any anonymous page would be).
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// How a read small enough to copy on the calling async worker
/// ([`INLINE_READ_MAX_BYTES`]) is tried there, by the image's file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InlineRead {
    /// `preadv2` with `RWF_NOWAIT`: what the page cache holds, falling back
    /// to a blocking thread for the rest.
    NoWait,
    /// A plain `pread`: the file system keeps the file in memory and
    /// refuses `RWF_NOWAIT`. Sending each read to a blocking thread there
    /// cost two thread wake-ups per demand fault (the bench's stores are
    /// on tmpfs whenever TMPDIR is; docs/BENCHMARKS.md, "Session 6").
    Plain,
}

impl InlineRead {
    /// The mode for `file`, from its file system.
    fn of(file: &File) -> Self {
        let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: fstatfs writes one `statfs` into the buffer passed, which
        // is exactly that large; the fd is open (borrowed from `file`).
        if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return Self::NoWait;
        }
        // SAFETY: fstatfs succeeded, so it initialised the whole struct.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)] // f_type's width differs by libc.
        match st.f_type as i64 {
            TMPFS_MAGIC | RAMFS_MAGIC => Self::Plain,
            _ => Self::NoWait,
        }
    }

    /// The `preadv2` flags of an inline read.
    fn flags(self) -> libc::c_int {
        match self {
            Self::NoWait => libc::RWF_NOWAIT,
            Self::Plain => 0,
        }
    }
}

/// Distinguishes temporary working-set files of concurrent writers.
static NEXT_TMP_SET: AtomicU64 = AtomicU64::new(0);

/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The image's file name.
pub const MEMORY_FILE: &str = "memory";
/// The digests' file name.
pub const DIGESTS_FILE: &str = "digests";
/// Prefix of working-set files.
pub const WORKING_SET_PREFIX: &str = "workingset-";

/// `manifest.json`. Digests live in their own binary file (4 bytes a page
/// would make the JSON huge); the zero map is stored as ranges, which is
/// compact for real memory images and readable.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ManifestFile {
    /// [`MANIFEST_FORMAT_VERSION`].
    pub format_version: u32,
    /// The snapshot's name; must match its directory.
    pub name: SnapshotId,
    /// Bytes per page.
    pub page_size: u64,
    /// Pages in the image.
    pub page_count: u64,
    /// How the digests were computed.
    pub digest_algorithm: DigestAlgorithm,
    /// Guest memory layout.
    pub regions: Vec<Region>,
    /// Number of zero pages.
    pub zero_pages: u64,
    /// Zero pages as `[start, count]` ranges, ascending.
    pub zero_ranges: Vec<[u64; 2]>,
}

impl ManifestFile {
    /// The manifest of a snapshot written from `spec`.
    pub fn new(spec: &SnapshotSpec, zero_map: &PageBitmap) -> Self {
        Self {
            format_version: MANIFEST_FORMAT_VERSION,
            name: spec.name.clone(),
            page_size: spec.page_size.bytes(),
            page_count: spec.page_count(),
            digest_algorithm: DigestAlgorithm::Crc32c,
            regions: spec.regions.clone(),
            zero_pages: zero_map.count_ones(),
            zero_ranges: zero_map.runs().map(|(s, c)| [s, c]).collect(),
        }
    }
}

/// A directory of snapshots. Cheap to clone: clones share the store.
#[derive(Clone, Debug)]
pub struct LocalStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    root: PathBuf,
    /// Snapshots opened so far, shared by every request that reads them.
    open: Mutex<OpenCache>,
    /// Serializes working-set recordings, so that the set served after
    /// concurrent recordings is the one whose rename came last.
    recording: Mutex<()>,
    /// Diff snapshots and volumes opened so far: one [`Chain`] per name
    /// while any request holds it (a volume's writes are serialized by its
    /// one `Chain`), the most recent kept open.
    chains: Mutex<ChainCache>,
    /// Serializes creating and sealing volumes, which claim names.
    naming: Mutex<()>,
    /// Free bytes a new snapshot must leave on the disk.
    min_free_disk_bytes: u64,
    max_working_sets: usize,
    max_working_set_pages: u64,
}

/// What identifies one version of a snapshot on disk: its manifest file.
/// A snapshot removed and imported again under its name has a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// A bounded cache of open snapshots, least recently used evicted first.
#[derive(Debug)]
struct OpenCache {
    entries: HashMap<SnapshotId, Cached>,
    capacity: usize,
    clock: u64,
}

#[derive(Debug)]
struct Cached {
    snapshot: Arc<LocalSnapshot>,
    identity: FileIdentity,
    last_used: u64,
}

impl OpenCache {
    fn get(&mut self, id: &SnapshotId, identity: FileIdentity) -> Option<Arc<LocalSnapshot>> {
        self.clock += 1;
        let clock = self.clock;
        match self.entries.get_mut(id) {
            Some(c) if c.identity == identity => {
                c.last_used = clock;
                Some(c.snapshot.clone())
            }
            Some(_) => {
                self.remove(id);
                None
            }
            None => None,
        }
    }

    fn remove(&mut self, id: &SnapshotId) {
        self.entries.remove(id);
        crate::metrics::limit_use("max_open_snapshots", self.entries.len() as u64);
    }

    fn insert(&mut self, id: SnapshotId, snapshot: Arc<LocalSnapshot>, identity: FileIdentity) {
        self.clock += 1;
        while self.entries.len() >= self.capacity.max(1) && !self.entries.contains_key(&id) {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.entries.insert(
            id,
            Cached {
                snapshot,
                identity,
                last_used: self.clock,
            },
        );
        crate::metrics::limit_use("max_open_snapshots", self.entries.len() as u64);
    }
}

impl LocalStore {
    /// A store in `root`, created if missing, with the default [`Limits`].
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        Self::with_limits(root, &Limits::default())
    }

    /// A store in `root`, created if missing, keeping `limits`' free-disk
    /// reserve, open-snapshot cache size and working-set limits. Removes
    /// what dead processes left half-written.
    pub fn with_limits(root: impl Into<PathBuf>, limits: &Limits) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        let store = Self {
            inner: Arc::new(StoreInner {
                root,
                open: Mutex::new(OpenCache {
                    entries: HashMap::new(),
                    capacity: limits.max_open_snapshots,
                    clock: 0,
                }),
                recording: Mutex::new(()),
                chains: Mutex::new(ChainCache {
                    entries: HashMap::new(),
                    recent: std::collections::VecDeque::new(),
                    capacity: limits.max_open_snapshots.max(1),
                }),
                naming: Mutex::new(()),
                min_free_disk_bytes: limits.min_free_disk_bytes,
                max_working_sets: limits.max_working_sets,
                max_working_set_pages: limits.max_working_set_pages,
            }),
        };
        let swept = store.sweep_leftovers();
        if swept > 0 {
            tracing::info!(swept, "removed temporary files left by processes that died");
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Removes `.tmp-*` snapshot directories and working-set files whose
    /// writer process is gone. Returns how many were removed.
    pub fn sweep_leftovers(&self) -> usize {
        let mut swept = 0;
        let Ok(entries) = std::fs::read_dir(&self.inner.root) else {
            return 0;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) {
                if writer_is_gone(name) && std::fs::remove_dir_all(&path).is_ok() {
                    swept += 1;
                }
            } else if let Ok(id) = SnapshotId::new(name)
                && path.is_dir()
            {
                if self.finish_interrupted_seal(&id) {
                    swept += 1;
                }
                for inner in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    let inner_name = inner.file_name();
                    if inner_name
                        .to_str()
                        .is_some_and(|n| n.starts_with(TMP_PREFIX) && writer_is_gone(n))
                        && std::fs::remove_file(inner.path()).is_ok()
                    {
                        swept += 1;
                    }
                }
            }
        }
        swept
    }

    /// Opens snapshot `id`, from the cache if the snapshot on disk is the
    /// one cached. Blocking: runs on a blocking thread in the service.
    pub fn open_blocking(&self, id: &SnapshotId) -> Result<Arc<LocalSnapshot>, OpenError> {
        let dir = self.inner.root.join(id.as_str());
        let identity = match std::fs::metadata(dir.join(MANIFEST_FILE)) {
            Ok(meta) => FileIdentity::of(&meta),
            Err(source) => {
                let e = manifest_unreadable(id, source);
                if matches!(e, OpenError::NotFound(_)) {
                    self.cache().remove(id);
                }
                return Err(e);
            }
        };
        if let Some(s) = self.cache().get(id, identity) {
            return Ok(s);
        }
        let snapshot = Arc::new(LocalSnapshot::open(&dir, id)?);
        self.cache().insert(id.clone(), snapshot.clone(), identity);
        Ok(snapshot)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, OpenCache> {
        self.inner.open.lock().expect("store lock poisoned")
    }

    /// Snapshots held open now.
    pub fn open_count(&self) -> usize {
        self.cache().entries.len()
    }

    /// [`SnapshotStore::list`], blocking. Reads each snapshot's manifest
    /// file only (not its digests); a snapshot whose manifest does not
    /// parse is left out with a warning (opening it says why).
    pub fn list_blocking(&self) -> Result<Vec<SnapshotSummary>, ListError> {
        let read_dir = |source| ListError::ReadDir { source };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.inner.root).map_err(read_dir)? {
            let entry = entry.map_err(read_dir)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Skips snapshots being written (".tmp-...") and anything else
            // that is not a snapshot directory.
            let Ok(id) = SnapshotId::new(name) else {
                continue;
            };
            let dir = entry.path();
            let Ok(text) = std::fs::read(dir.join(MANIFEST_FILE)) else {
                continue;
            };
            if layers::format_version(&text) == Some(LAYER_FORMAT_VERSION) {
                match self.open_chain_blocking(&id) {
                    Ok(c) => out.push(c.summary()),
                    Err(e) => tracing::warn!(snapshot = %id, "not listed: {e}"),
                }
                continue;
            }
            let file: ManifestFile = match serde_json::from_slice(&text) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(snapshot = %id, "{MANIFEST_FILE} does not parse ({e}); not listed");
                    continue;
                }
            };
            let mut working_sets: Vec<WorkingSetName> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix(WORKING_SET_PREFIX))
                        .and_then(|n| WorkingSetName::new(n).ok())
                })
                .collect();
            working_sets.sort();
            out.push(SnapshotSummary {
                name: id,
                page_size: file.page_size,
                page_count: file.page_count,
                zero_pages: file.zero_pages,
                working_sets,
                layer: super::LayerInfo::standalone(file.page_count),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Starts writing a snapshot, blocking; see [`SnapshotStore::create`].
    pub fn create_blocking(&self, spec: SnapshotSpec) -> Result<SnapshotWriter, CreateError> {
        SnapshotWriter::create(
            self.inner.root.clone(),
            spec,
            self.inner.min_free_disk_bytes,
        )
    }

    /// [`SnapshotStore::record_working_set`], blocking.
    pub fn record_working_set_blocking(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, RecordError> {
        let listed: u64 = ranges
            .iter()
            .map(PageRange::count)
            .fold(0, u64::saturating_add);
        if listed > self.inner.max_working_set_pages {
            return Err(RecordError::TooLarge {
                listed,
                limit: self.inner.max_working_set_pages,
            });
        }
        let snapshot = self.recordable(id)?;
        let order = first_touch_order(ranges, snapshot.manifest().page_count)?;
        let bytes: Vec<u8> = order.iter().flat_map(|p| p.0.to_le_bytes()).collect();
        let write_err = |source| RecordError::Write {
            snapshot: id.clone(),
            name: name.clone(),
            source,
        };
        let _serial = self
            .inner
            .recording
            .lock()
            .expect("recording lock poisoned");
        // Under the lock: the snapshot as it is now (it may have been
        // replaced or evicted since it was opened above).
        let snapshot = self.recordable(id)?;
        let manifest = snapshot.manifest();
        if !manifest.working_sets.contains(name)
            && manifest.working_sets.len() >= self.inner.max_working_sets
        {
            return Err(RecordError::TooManySets {
                snapshot: id.clone(),
                limit: self.inner.max_working_sets,
            });
        }
        // The page file first: until the order file is renamed over the old
        // one, the new page file does not match it and is not used.
        let ws_file = match &snapshot {
            Recordable::Standalone(s) => self.write_ws_pages(s, name, &order, &bytes),
            Recordable::Layered(_) => None,
        };
        let path = snapshot.dir().join(format!("{WORKING_SET_PREFIX}{name}"));
        let tmp = snapshot.dir().join(format!(
            "{TMP_PREFIX}{WORKING_SET_PREFIX}{name}-{}-{}",
            std::process::id(),
            NEXT_TMP_SET.fetch_add(1, Ordering::Relaxed)
        ));
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        // Make the rename durable; failing that only risks the old set
        // coming back after a crash.
        let _ = File::open(snapshot.dir()).and_then(|d| d.sync_all());
        let pages = order.len() as u64;
        snapshot.add_working_set(name.clone(), order, ws_file);
        Ok(pages)
    }

    /// Writes the page file of `s`'s working set `name` ([`ws_pages`]) and
    /// opens it; `None` (logged, and any older file removed) if it cannot
    /// be written, which leaves the set to be read from the image.
    fn write_ws_pages(
        &self,
        s: &LocalSnapshot,
        name: &WorkingSetName,
        order: &[PageIndex],
        order_bytes: &[u8],
    ) -> Option<File> {
        let manifest = s.manifest();
        let need = ws_pages::data_pages(order, &manifest).count() as u64
            * manifest.page_size.bytes()
            + ws_pages::TRAILER_BYTES;
        let reserve = self.inner.min_free_disk_bytes;
        let path = s.dir.join(format!("{WORKING_SET_PAGES_PREFIX}{name}"));
        let tmp = s.dir.join(format!(
            "{TMP_PREFIX}{WORKING_SET_PAGES_PREFIX}{name}-{}-{}",
            std::process::id(),
            NEXT_TMP_SET.fetch_add(1, Ordering::Relaxed)
        ));
        let written = super::writer::free_bytes(&s.dir)
            .and_then(|free| {
                if free < reserve.saturating_add(need) {
                    Err(std::io::Error::other(format!(
                        "{need} bytes are needed and {free} are free, above a reserve of \
                         {reserve} (`--min-free-disk`)"
                    )))
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                ws_pages::write(&s.dir, &tmp, name, order, order_bytes, &manifest, &s.memory)
            })
            .and_then(|()| File::open(&path));
        match written {
            Ok(file) => Some(file),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&path);
                tracing::warn!(
                    snapshot = %manifest.id,
                    "working set {name}: its pages were not copied for sequential replays \
                     ({e}); replays read them from the image"
                );
                None
            }
        }
    }
}

/// Diff snapshots and volumes opened so far.
#[derive(Debug)]
struct ChainCache {
    /// Every chain opened and still held somewhere, by name.
    entries: HashMap<SnapshotId, (FileIdentity, WeakChain)>,
    /// The most recently opened, kept open.
    recent: std::collections::VecDeque<Chain>,
    capacity: usize,
}

impl ChainCache {
    /// The chain `id`, if it is still held somewhere and was opened from the
    /// manifest file that has `identity` now.
    fn get(&self, id: &SnapshotId, identity: FileIdentity) -> Option<Chain> {
        let (ident, weak) = self.entries.get(id)?;
        (*ident == identity).then(|| Chain::upgrade(weak)).flatten()
    }
}

/// Bytes read at a time when flattening or importing.
const COPY_CHUNK_BYTES: u64 = 1 << 20;

impl LocalStore {
    fn chain_cache(&self) -> std::sync::MutexGuard<'_, ChainCache> {
        self.inner.chains.lock().expect("store lock poisoned")
    }

    /// Opens any snapshot or volume: a standalone snapshot as a
    /// [`LocalSnapshot`], a diff snapshot or a volume as a [`Chain`].
    pub fn open_any_blocking(&self, id: &SnapshotId) -> Result<Arc<dyn Snapshot>, OpenError> {
        let path = self.inner.root.join(id.as_str()).join(MANIFEST_FILE);
        // A snapshot held open, whose manifest file is the one it was opened
        // from, is answered from its cache without reading that file again:
        // a realistic image's manifest lists its zero pages as ranges, and
        // reading and parsing it for its format took about 1 ms per request
        // for 2 GiB (docs/BENCHMARKS.md, "Session 13").
        if let Ok(meta) = std::fs::metadata(&path) {
            let identity = FileIdentity::of(&meta);
            if let Some(s) = self.cache().get(id, identity) {
                return Ok(s);
            }
            if let Some(chain) = self.chain_cache().get(id, identity) {
                return Ok(Arc::new(chain));
            }
        }
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(source) => {
                let e = manifest_unreadable(id, source);
                if matches!(e, OpenError::NotFound(_)) {
                    self.forget(id);
                }
                return Err(e);
            }
        };
        if layers::format_version(&text) == Some(LAYER_FORMAT_VERSION) {
            Ok(Arc::new(self.open_chain_blocking(id)?))
        } else {
            Ok(self.open_blocking(id)?)
        }
    }

    fn forget(&self, id: &SnapshotId) {
        self.cache().remove(id);
        let mut c = self.chain_cache();
        c.entries.remove(id);
        c.recent.retain(|ch| ch.id() != id);
    }

    /// Opens a diff snapshot or a volume (format 2).
    pub fn open_chain_blocking(&self, id: &SnapshotId) -> Result<Chain, OpenError> {
        let dir = self.inner.root.join(id.as_str());
        let path = dir.join(MANIFEST_FILE);
        // The cache lock is held while opening, so that two requests never
        // open two `Chain`s of one volume (whose writes it serializes).
        let mut cache = self.chain_cache();
        let identity = match std::fs::metadata(&path) {
            Ok(m) => FileIdentity::of(&m),
            Err(source) => {
                let e = manifest_unreadable(id, source);
                if matches!(e, OpenError::NotFound(_)) {
                    cache.entries.remove(id);
                }
                return Err(e);
            }
        };
        if let Some(chain) = cache.get(id, identity) {
            return Ok(chain);
        }
        let text = std::fs::read(&path).map_err(|source| OpenError::Read {
            snapshot: id.clone(),
            file: MANIFEST_FILE.into(),
            source,
        })?;
        let chain = Chain::open(&self.inner.root, id, &text, self.inner.min_free_disk_bytes)?;
        cache
            .entries
            .insert(id.clone(), (identity, chain.downgrade()));
        cache.recent.retain(|c| c.id() != id);
        cache.recent.push_back(chain.clone());
        while cache.recent.len() > cache.capacity {
            cache.recent.pop_front();
        }
        cache
            .entries
            .retain(|_, (_, w)| Chain::upgrade(w).is_some());
        Ok(chain)
    }

    /// Where `id` sits in its chain: a diff snapshot's or a volume's layer,
    /// or a standalone snapshot.
    pub fn layer_info_blocking(&self, id: &SnapshotId) -> Result<super::LayerInfo, OpenError> {
        let snap = self.open_any_blocking(id)?;
        match self.open_chain_blocking(id) {
            Ok(c) => Ok(c.layer_info()),
            Err(_) => Ok(super::LayerInfo::standalone(snap.manifest().page_count)),
        }
    }

    /// Opens a volume for writing.
    pub fn open_volume_blocking(&self, id: &SnapshotId) -> Result<Chain, VolumeError> {
        let open_err = |e| match e {
            OpenError::NotFound(id) => VolumeError::NotFound(id),
            e => VolumeError::Open(e),
        };
        let path = self.inner.root.join(id.as_str()).join(MANIFEST_FILE);
        let text =
            std::fs::read(&path).map_err(|source| open_err(manifest_unreadable(id, source)))?;
        // A standalone snapshot (format 1) is never a volume.
        if layers::format_version(&text) != Some(LAYER_FORMAT_VERSION) {
            return Err(VolumeError::NotAVolume(id.clone()));
        }
        let chain = self.open_chain_blocking(id).map_err(open_err)?;
        if chain.kind() != LayerKind::Volume {
            return Err(VolumeError::NotAVolume(id.clone()));
        }
        Ok(chain)
    }

    /// A parent for a new layer: its manifest and depth.
    fn parent_of(&self, parent: &SnapshotId) -> Result<(Arc<Manifest>, u32), VolumeError> {
        let snap = self
            .open_any_blocking(parent)
            .map_err(VolumeError::Parent)?;
        let manifest = snap.manifest();
        let depth = match self.open_chain_blocking(parent) {
            Ok(c) if c.kind() == LayerKind::Volume => {
                return Err(VolumeError::Mismatch(format!(
                    "\"{parent}\" is a volume, which cannot be a parent; seal it into a \
                     snapshot first (`faultline-server volume seal --name {parent} --as NAME`)"
                )));
            }
            Ok(c) => c.depth().0,
            Err(_) => 1,
        };
        if depth + 1 > MAX_CHAIN_DEPTH {
            return Err(VolumeError::TooDeep {
                parent: parent.clone(),
                depth,
                max: MAX_CHAIN_DEPTH,
            });
        }
        Ok((manifest, depth))
    }

    /// Creates a volume.
    pub fn create_volume_blocking(
        &self,
        request: CreateVolume,
    ) -> Result<SnapshotSummary, VolumeError> {
        let _naming = self.inner.naming.lock().expect("naming lock poisoned");
        let (parent, page_size, page_count, regions) = match &request.source {
            VolumeSource::Snapshot(p) => {
                let (m, _) = self.parent_of(p)?;
                (
                    Some(p.clone()),
                    m.page_size,
                    m.page_count,
                    m.regions.clone(),
                )
            }
            VolumeSource::Empty { page_size, size } => {
                let spec = SnapshotSpec::new(request.name.clone(), *page_size, *size, Vec::new())?;
                (None, *page_size, spec.page_count(), spec.regions)
            }
        };
        let file = LayerFile {
            format_version: LAYER_FORMAT_VERSION,
            name: request.name.clone(),
            kind: LayerKind::Volume,
            parent,
            page_size: page_size.bytes(),
            page_count,
            digest_algorithm: DigestAlgorithm::Crc32c,
            regions,
            zero_pages: 0,
            zero_ranges: Vec::new(),
        };
        layers::NewLayer::create(&self.inner.root, file)?.commit()?;
        Ok(self
            .open_chain_blocking(&request.name)
            .map_err(VolumeError::Open)?
            .summary())
    }

    /// Seals a volume into a snapshot: the volume's directory is renamed to
    /// the snapshot's, then its manifest rewritten as a snapshot's. A crash
    /// between the two is finished when the store is next opened
    /// ([`Self::finish_interrupted_seal`]).
    pub fn seal_blocking(&self, request: &SealVolume) -> Result<SnapshotSummary, VolumeError> {
        let _naming = self.inner.naming.lock().expect("naming lock poisoned");
        let chain = self.open_volume_blocking(&request.volume)?;
        let dest = self.inner.root.join(request.snapshot.as_str());
        if dest.exists() {
            return Err(VolumeError::AlreadyExists(request.snapshot.clone()));
        }
        let io = |stage| {
            let name = request.volume.clone();
            move |source| VolumeError::Io {
                name: name.clone(),
                stage,
                source,
            }
        };
        chain.seal_with(|| {
            std::fs::rename(chain.dir(), &dest).map_err(io("move it to its snapshot name"))?;
            // From here the seal is done: a crash before the manifest is
            // rewritten is finished when the store is next opened.
            if let Err(e) = self.rewrite_as_snapshot(&request.snapshot) {
                tracing::warn!(snapshot = %request.snapshot, "sealed, but: {e}; finished when the store is next opened");
            }
            Ok(())
        })?;
        self.forget(&request.volume);
        self.open_chain_blocking(&request.snapshot)
            .map(|c| c.summary())
            .map_err(VolumeError::Open)
    }

    /// Rewrites the manifest of the volume moved to `id` as a snapshot's.
    fn rewrite_as_snapshot(&self, id: &SnapshotId) -> std::io::Result<()> {
        let dir = self.inner.root.join(id.as_str());
        let text = std::fs::read(dir.join(MANIFEST_FILE))?;
        let mut file: LayerFile = serde_json::from_slice(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        file.name = id.clone();
        file.kind = LayerKind::Snapshot;
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{MANIFEST_FILE}-{}-0",
            std::process::id()
        ));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&file).expect("a manifest serializes"))?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(MANIFEST_FILE))?;
        let _ = std::fs::remove_file(dir.join(layers::JOURNAL_FILE));
        layers::sync_dir(&dir)
    }

    /// A layer whose manifest names a volume other than its directory is
    /// a seal a crash interrupted after the rename: finishes it.
    fn finish_interrupted_seal(&self, id: &SnapshotId) -> bool {
        let dir = self.inner.root.join(id.as_str());
        let Ok(text) = std::fs::read(dir.join(MANIFEST_FILE)) else {
            return false;
        };
        if layers::format_version(&text) != Some(LAYER_FORMAT_VERSION) {
            return false;
        }
        let Ok(file) = serde_json::from_slice::<LayerFile>(&text) else {
            return false;
        };
        if file.kind != LayerKind::Volume || &file.name == id {
            return false;
        }
        match self.rewrite_as_snapshot(id) {
            Ok(()) => {
                tracing::info!(snapshot = %id, "finished sealing a volume interrupted by a crash");
                true
            }
            Err(e) => {
                tracing::warn!(snapshot = %id, "cannot finish an interrupted seal: {e}");
                false
            }
        }
    }

    /// Imports a diff memory file (a sparse file whose holes are the pages
    /// unchanged from `parent`) as snapshot `name`, a child of `parent`.
    /// `progress` is called with bytes copied so far.
    pub fn import_diff_blocking(
        &self,
        name: &SnapshotId,
        parent: &SnapshotId,
        mem_file: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<SnapshotSummary, VolumeError> {
        let (m, _) = self.parent_of(parent)?;
        let io = |stage| {
            let name = name.clone();
            move |source| VolumeError::Io {
                name: name.clone(),
                stage,
                source,
            }
        };
        let src = File::open(mem_file).map_err(io("open the diff memory file"))?;
        let len = src
            .metadata()
            .map_err(io("read the diff memory file"))?
            .len();
        if len != m.image_size() {
            return Err(VolumeError::Mismatch(format!(
                "the diff memory file has {len} bytes, but parent \"{parent}\" has {}; a diff \
                 snapshot has the size of the memory it was taken of",
                m.image_size()
            )));
        }
        let ranges = layers::data_pages(&src, m.page_size).map_err(io("find the data extents"))?;
        let file = LayerFile {
            format_version: LAYER_FORMAT_VERSION,
            name: name.clone(),
            kind: LayerKind::Snapshot,
            parent: Some(parent.clone()),
            page_size: m.page_size.bytes(),
            page_count: m.page_count,
            digest_algorithm: DigestAlgorithm::Crc32c,
            regions: m.regions.clone(),
            zero_pages: 0,
            zero_ranges: Vec::new(),
        };
        let mut layer = layers::NewLayer::create(&self.inner.root, file)?;
        let ps = m.page_size.bytes();
        let per_chunk = (COPY_CHUNK_BYTES / ps).max(1);
        let total: u64 = ranges.iter().map(|r| r.count() * ps).sum();
        let mut done = 0;
        for r in &ranges {
            let mut p = r.start().0;
            while p < r.end() {
                let n = per_chunk.min(r.end() - p);
                let mut buf = vec![0u8; (n * ps) as usize];
                src.read_exact_at(&mut buf, p * ps)
                    .map_err(io("read the diff memory file"))?;
                layer.put(p, &buf)?;
                p += n;
                done += n * ps;
                progress(done, total);
            }
        }
        layer.commit()?;
        Ok(self
            .open_chain_blocking(name)
            .map_err(VolumeError::Open)?
            .summary())
    }

    /// Writes the resolved image of the chain `name` as a standalone
    /// snapshot `new`.
    pub fn flatten_blocking(
        &self,
        name: &SnapshotId,
        new: &SnapshotId,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<SnapshotSummary, VolumeError> {
        let snap = self.open_any_blocking(name).map_err(VolumeError::Open)?;
        let m = snap.manifest();
        let spec = SnapshotSpec::new(new.clone(), m.page_size, m.image_size(), m.regions.clone())?;
        let mut writer = self.create_blocking(spec).map_err(VolumeError::Limit)?;
        let chain = self.open_chain_blocking(name).ok();
        let ps = m.page_size.bytes();
        let per_chunk = (COPY_CHUNK_BYTES / ps).max(1);
        let mut p = 0;
        while p < m.page_count {
            let n = per_chunk.min(m.page_count - p);
            let range = PageRange::new(PageIndex(p), n).expect("non-empty");
            let data = match &chain {
                Some(c) => c.read_blocking(range)?,
                None => {
                    // A standalone snapshot: a plain copy.
                    let s = self.open_blocking(name).map_err(VolumeError::Open)?;
                    let mut buf = vec![0u8; (n * ps) as usize];
                    s.memory
                        .read_exact_at(&mut buf, p * ps)
                        .map_err(|source| ReadError::Io {
                            snapshot: name.clone(),
                            range,
                            source,
                        })?;
                    buf
                }
            };
            writer.write(&data).map_err(VolumeError::Limit)?;
            p += n;
            progress(p * ps, m.image_size());
        }
        writer.finish().map_err(VolumeError::Limit)
    }
}

/// A snapshot whose working sets can be recorded.
enum Recordable {
    Standalone(Arc<LocalSnapshot>),
    Layered(Chain),
}

impl Recordable {
    fn manifest(&self) -> Arc<Manifest> {
        match self {
            Self::Standalone(s) => s.manifest(),
            Self::Layered(c) => c.manifest(),
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Self::Standalone(s) => &s.dir,
            Self::Layered(c) => c.dir(),
        }
    }

    fn add_working_set(&self, name: WorkingSetName, order: Vec<PageIndex>, pages: Option<File>) {
        match self {
            Self::Standalone(s) => s.add_working_set(name, order, pages),
            Self::Layered(c) => c.add_working_set(name, order),
        }
    }
}

impl LocalStore {
    fn recordable(&self, id: &SnapshotId) -> Result<Recordable, OpenError> {
        let text = std::fs::read(self.inner.root.join(id.as_str()).join(MANIFEST_FILE));
        if let Ok(text) = text
            && layers::format_version(&text) == Some(LAYER_FORMAT_VERSION)
        {
            Ok(Recordable::Layered(self.open_chain_blocking(id)?))
        } else {
            Ok(Recordable::Standalone(self.open_blocking(id)?))
        }
    }
}

fn writer_is_gone(name: &str) -> bool {
    let mut parts = name.rsplitn(3, '-');
    let (Some(n), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(_), Ok(pid)) = (n.parse::<u64>(), pid.parse::<u32>()) else {
        return false;
    };
    pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
}

/// Runs store work on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a storage thread failed: {e}"))
}

#[async_trait::async_trait]
impl SnapshotStore for LocalStore {
    async fn list(&self) -> Result<Vec<SnapshotSummary>, ListError> {
        let store = self.clone();
        blocking(move || store.list_blocking())
            .await
            .map_err(|reason| ListError::Unavailable { reason })?
    }

    async fn open(&self, id: &SnapshotId) -> Result<Arc<dyn Snapshot>, OpenError> {
        let store = self.clone();
        let id2 = id.clone();
        blocking(move || store.open_any_blocking(&id2))
            .await
            .map_err(|reason| OpenError::Unavailable {
                snapshot: id.clone(),
                reason,
            })?
    }

    fn backend(&self) -> &'static str {
        "the local"
    }

    async fn create_volume(&self, request: CreateVolume) -> Result<SnapshotSummary, VolumeError> {
        let store = self.clone();
        blocking(move || store.create_volume_blocking(request))
            .await
            .map_err(|reason| VolumeError::Unavailable { reason })?
    }

    async fn open_volume(&self, id: &SnapshotId) -> Result<Arc<dyn Volume>, VolumeError> {
        let store = self.clone();
        let id = id.clone();
        let chain = blocking(move || store.open_volume_blocking(&id))
            .await
            .map_err(|reason| VolumeError::Unavailable { reason })??;
        Ok(Arc::new(chain))
    }

    async fn seal_volume(&self, request: SealVolume) -> Result<SnapshotSummary, VolumeError> {
        let store = self.clone();
        blocking(move || store.seal_blocking(&request))
            .await
            .map_err(|reason| VolumeError::Unavailable { reason })?
    }

    async fn create(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWrite>, CreateError> {
        let store = self.clone();
        let writer = blocking(move || store.create_blocking(spec))
            .await
            .map_err(|reason| CreateError::Unavailable { reason })??;
        Ok(Box::new(LocalWrite {
            spec: writer.spec().clone(),
            received: 0,
            inner: Some(writer),
        }))
    }

    async fn record_working_set(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, RecordError> {
        let store = self.clone();
        let (id, name, ranges) = (id.clone(), name.clone(), ranges.to_vec());
        blocking(move || store.record_working_set_blocking(&id, &name, &ranges))
            .await
            .map_err(|reason| RecordError::Unavailable { reason })?
    }
}

/// A [`SnapshotWriter`] driven from async code: each piece is scanned and
/// written on a blocking thread.
#[derive(Debug)]
struct LocalWrite {
    spec: SnapshotSpec,
    received: u64,
    /// `None` only while a piece is being written, or after a failure.
    inner: Option<SnapshotWriter>,
}

impl LocalWrite {
    fn take(&mut self) -> Result<SnapshotWriter, CreateError> {
        self.inner.take().ok_or_else(|| CreateError::Unavailable {
            reason: "an earlier write of this upload failed".into(),
        })
    }
}

#[async_trait::async_trait]
impl SnapshotWrite for LocalWrite {
    fn spec(&self) -> &SnapshotSpec {
        &self.spec
    }

    fn received(&self) -> u64 {
        self.received
    }

    async fn write(&mut self, data: Bytes) -> Result<(), CreateError> {
        let mut writer = self.take()?;
        let (writer, result) = blocking(move || {
            let r = writer.write(&data);
            (writer, r)
        })
        .await
        .map_err(|reason| CreateError::Unavailable { reason })?;
        self.received = writer.received();
        // A failed write leaves the writer unusable: dropping it removes
        // the partial snapshot.
        if result.is_ok() {
            self.inner = Some(writer);
        } else {
            discard(writer);
        }
        result
    }

    async fn finish(mut self: Box<Self>) -> Result<SnapshotSummary, CreateError> {
        let writer = self.take()?;
        blocking(move || writer.finish())
            .await
            .map_err(|reason| CreateError::Unavailable { reason })?
    }
}

impl Drop for LocalWrite {
    fn drop(&mut self) {
        if let Some(w) = self.inner.take() {
            discard(w);
        }
    }
}

/// Drops an unfinished writer (removing its files) off the async workers
/// when there is a runtime.
fn discard(writer: SnapshotWriter) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(writer))),
        Err(_) => drop(writer),
    }
}

/// The error for the manifest of `id` that cannot be read: `NotFound` when
/// there is none, else the I/O error.
fn manifest_unreadable(id: &SnapshotId, source: std::io::Error) -> OpenError {
    if source.kind() == std::io::ErrorKind::NotFound {
        OpenError::NotFound(id.clone())
    } else {
        OpenError::Read {
            snapshot: id.clone(),
            file: MANIFEST_FILE.into(),
            source,
        }
    }
}

/// Opens the standalone snapshot in `dir`, for the bottom of a chain: its
/// manifest and image.
pub(crate) fn open_parts(
    dir: &Path,
    id: &SnapshotId,
) -> Result<(Arc<Manifest>, Arc<File>), OpenError> {
    let s = LocalSnapshot::open(dir, id)?;
    Ok((s.manifest(), s.memory))
}

/// An open snapshot of a [`LocalStore`].
#[derive(Debug)]
pub struct LocalSnapshot {
    dir: PathBuf,
    /// The manifest, replaced (not mutated) when a working set is recorded,
    /// so readers hold a consistent copy without copying the digests.
    manifest: RwLock<Arc<Manifest>>,
    /// Cached from the manifest for the read path.
    page_size: PageSize,
    /// The image, read with `pread` (never mapped: see the module docs).
    memory: Arc<File>,
    /// How small reads of `memory` are tried on the calling worker.
    inline: InlineRead,
    working_sets: RwLock<HashMap<WorkingSetName, Arc<Vec<PageIndex>>>>,
    /// The working sets' page files that match their orders, each with the
    /// order it was written for.
    ws_pages: RwLock<HashMap<WorkingSetName, WorkingSetPages>>,
}

impl LocalSnapshot {
    /// Opens and cross-checks the files of snapshot `id` in `dir`.
    fn open(dir: &Path, id: &SnapshotId) -> Result<Self, OpenError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound && path == manifest_path {
                    OpenError::NotFound(id.clone())
                } else {
                    OpenError::Read {
                        snapshot: id.clone(),
                        file: relative(path),
                        source,
                    }
                }
            })
        };
        let corrupt = |reason: String| OpenError::Corrupt {
            snapshot: id.clone(),
            reason,
        };
        if !dir.is_dir() {
            return Err(OpenError::NotFound(id.clone()));
        }
        let file: ManifestFile = serde_json::from_slice(&read(&manifest_path)?)
            .map_err(|e| corrupt(format!("{MANIFEST_FILE} does not parse: {e}")))?;
        if file.format_version != MANIFEST_FORMAT_VERSION {
            return Err(corrupt(format!(
                "{MANIFEST_FILE} has format version {}, this server reads {MANIFEST_FORMAT_VERSION}",
                file.format_version
            )));
        }
        if &file.name != id {
            return Err(corrupt(format!(
                "{MANIFEST_FILE} names snapshot {:?}",
                file.name.as_str()
            )));
        }
        let page_size = PageSize::try_from(file.page_size).map_err(|e| corrupt(e.to_string()))?;
        let spec = SnapshotSpec::new(
            id.clone(),
            page_size,
            file.page_count.saturating_mul(page_size.bytes()),
            file.regions,
        )
        .map_err(|e| corrupt(e.to_string()))?;
        let digest_bytes = read(&dir.join(DIGESTS_FILE))?;
        // Checked before the zero map is allocated: a manifest claiming
        // more pages than its digests hold must not size an allocation.
        let need = file.page_count.saturating_mul(4);
        if digest_bytes.len() as u64 != need {
            return Err(corrupt(format!(
                "{DIGESTS_FILE} has {} bytes, {} pages need {need}",
                digest_bytes.len(),
                file.page_count,
            )));
        }
        let digests = digest_bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let mut zero_map = PageBitmap::new(file.page_count);
        for [start, count] in file.zero_ranges {
            if start
                .checked_add(count)
                .is_none_or(|end| end > file.page_count)
            {
                return Err(corrupt(format!(
                    "zero range {start}+{count} is past the end"
                )));
            }
            zero_map.set_range(start, count);
        }

        let memory_path = dir.join(MEMORY_FILE);
        let read_err = |source| OpenError::Read {
            snapshot: id.clone(),
            file: MEMORY_FILE.into(),
            source,
        };
        let memory = File::open(&memory_path).map_err(read_err)?;
        let len = memory.metadata().map_err(read_err)?.len();
        // A shorter file would fail reads past its end with DataLoss; say
        // so when opening instead.
        if len != spec.size {
            return Err(corrupt(format!(
                "{MEMORY_FILE} has {len} bytes, the manifest says {}",
                spec.size
            )));
        }
        let mut working_sets = HashMap::new();
        let mut order_bytes = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let Some(ws) = file_name
                    .to_str()
                    .and_then(|n| n.strip_prefix(WORKING_SET_PREFIX))
                    .and_then(|n| WorkingSetName::new(n).ok())
                else {
                    continue;
                };
                let bytes = read(&entry.path())?;
                let pages: Vec<PageIndex> = bytes
                    .chunks_exact(8)
                    .map(|c| PageIndex(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
                    .collect();
                if bytes.len() % 8 != 0 || pages.iter().any(|p| p.0 >= file.page_count) {
                    return Err(corrupt(format!(
                        "working set {ws} lists pages past the end"
                    )));
                }
                working_sets.insert(ws.clone(), Arc::new(pages));
                order_bytes.push((ws, bytes));
            }
        }

        let mut ws_names: Vec<_> = working_sets.keys().cloned().collect();
        ws_names.sort();
        let manifest = Arc::new(Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            id: id.clone(),
            page_size,
            page_count: file.page_count,
            regions: spec.regions,
            zero_map,
            digest_algorithm: file.digest_algorithm,
            digests,
            working_sets: ws_names,
        });
        let ws_pages = order_bytes
            .iter()
            .filter_map(|(ws, bytes)| {
                let order = &working_sets[ws];
                let file = ws_pages::open(dir, ws, order, bytes, &manifest)?;
                let pages = WorkingSetPages {
                    order: order.clone(),
                    file: Arc::new(file),
                };
                Some((ws.clone(), pages))
            })
            .collect();
        Ok(Self {
            dir: dir.to_owned(),
            page_size,
            manifest: RwLock::new(manifest),
            inline: InlineRead::of(&memory),
            memory: Arc::new(memory),
            working_sets: RwLock::new(working_sets),
            ws_pages: RwLock::new(ws_pages),
        })
    }
}

impl LocalSnapshot {
    /// Makes a newly recorded working set, and its page file if it has one,
    /// visible to readers.
    fn add_working_set(&self, name: WorkingSetName, order: Vec<PageIndex>, pages: Option<File>) {
        let order = Arc::new(order);
        {
            let mut files = self.ws_pages.write().expect("working set lock poisoned");
            match pages {
                Some(f) => files.insert(
                    name.clone(),
                    WorkingSetPages {
                        order: order.clone(),
                        file: Arc::new(f),
                    },
                ),
                None => files.remove(&name),
            };
        }
        let mut sets = self
            .working_sets
            .write()
            .expect("working set lock poisoned");
        sets.insert(name, order);
        let mut names: Vec<_> = sets.keys().cloned().collect();
        names.sort();
        let mut manifest = self.manifest.write().expect("manifest lock poisoned");
        let mut updated = Manifest::clone(&manifest);
        updated.working_sets = names;
        *manifest = Arc::new(updated);
    }
}

#[async_trait::async_trait]
impl Snapshot for LocalSnapshot {
    /// The `memory` file, opened read-only. A standalone snapshot's files are
    /// written once under a temporary name and never changed after the
    /// rename (a snapshot removed and imported again under its name is a
    /// new file: this inode stays as it was for whoever holds it open).
    fn page_file(&self) -> Option<Arc<File>> {
        Some(self.memory.clone())
    }

    fn manifest(&self) -> Arc<Manifest> {
        self.manifest
            .read()
            .expect("manifest lock poisoned")
            .clone()
    }

    async fn read(&self, range: PageRange) -> Result<Bytes, ReadError> {
        let ps = self.page_size.bytes();
        self.read_file(
            &self.memory,
            range.start().0 * ps,
            range.count() * ps,
            range,
        )
        .await
    }

    fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<PageIndex>>> {
        self.working_sets
            .read()
            .expect("working set lock poisoned")
            .get(name)
            .cloned()
    }

    fn working_set_pages(&self, name: &WorkingSetName) -> Option<WorkingSetPages> {
        self.ws_pages
            .read()
            .expect("working set lock poisoned")
            .get(name)
            .cloned()
    }

    async fn read_working_set(
        &self,
        pages: &WorkingSetPages,
        at: u64,
        count: u64,
        first: PageRange,
    ) -> Result<Bytes, ReadError> {
        let ps = self.page_size.bytes();
        self.read_file(&pages.file, at * ps, count * ps, first)
            .await
    }
}

impl LocalSnapshot {
    /// `len` bytes of `file` (the image or a working set's page file, on the
    /// same file system) from `offset`: inline what the page cache holds,
    /// else on a blocking thread. `range` names the pages in errors.
    async fn read_file(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: u64,
        range: PageRange,
    ) -> Result<Bytes, ReadError> {
        let len = usize::try_from(len).expect("a checked range fits in memory");
        let mut buf = Vec::with_capacity(len);
        if len <= INLINE_READ_MAX_BYTES {
            // What the page cache holds, without waiting for the disk (or,
            // in memory, all of it: `InlineRead`). A short or failed read
            // leaves the rest to the blocking thread, which reports errors.
            while buf.len() < len {
                match pread_append(file, &mut buf, len, offset, self.inline.flags()) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        if buf.len() < len {
            let file = file.clone();
            buf = tokio::task::spawn_blocking(move || {
                while buf.len() < len {
                    match pread_append(&file, &mut buf, len, offset, 0) {
                        Ok(0) => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the file ends early (truncated?)",
                            ));
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(buf)
            })
            .await
            .map_err(|e| ReadError::Unavailable {
                snapshot: self.manifest().id.clone(),
                reason: format!("a storage thread failed: {e}"),
            })?
            .map_err(|source| ReadError::Io {
                snapshot: self.manifest().id.clone(),
                range,
                source,
            })?;
        }
        Ok(Bytes::from(buf))
    }
}

/// A file's name relative to its snapshot, for messages that go to
/// clients (which must not learn the server's paths).
fn relative(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Reads from byte `offset + buf.len()` of `file` into the spare capacity
/// of `buf`, up to `want` bytes in all, with `preadv2` `flags`. Returns the
/// bytes read (0 at the end of the file).
fn pread_append(
    file: &File,
    buf: &mut Vec<u8>,
    want: usize,
    offset: u64,
    flags: libc::c_int,
) -> std::io::Result<usize> {
    let done = buf.len();
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(want.saturating_sub(done));
    if room == 0 {
        return Ok(0);
    }
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: room,
    };
    let at = libc::off_t::try_from(offset + done as u64)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `iov` describes `room` bytes of `buf`'s spare capacity,
    // memory owned by `buf` and borrowed mutably for this call; the kernel
    // writes at most `iov_len` bytes there and nothing else. The fd is
    // open for the call (borrowed from `file`).
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = usize::try_from(n).expect("non-negative");
    // SAFETY: the kernel initialised the first `n <= room` bytes of the
    // spare capacity, so the first `done + n` bytes of `buf` are
    // initialised and within its capacity.
    unsafe { buf.set_len(done + n) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A file in memory (a memfd, as tmpfs) refuses `RWF_NOWAIT`, so its
    /// small reads are plain reads on the calling worker, which succeed.
    #[test]
    fn memory_files_are_read_inline_without_nowait() {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it
        // returns a new descriptor or -1, and nothing else owns it.
        let fd =
            unsafe { libc::memfd_create(c"faultline-inline-read".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created, is open, and is owned only here.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&[7u8; 8192]).unwrap();
        let mode = InlineRead::of(&file);
        assert_eq!(mode, InlineRead::Plain);
        let mut buf = Vec::with_capacity(4096);
        let nowait = pread_append(&file, &mut buf, 4096, 4096, libc::RWF_NOWAIT);
        assert_eq!(
            nowait.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EOPNOTSUPP)),
            "the kernel fact InlineRead::Plain exists for"
        );
        assert_eq!(
            pread_append(&file, &mut buf, 4096, 4096, mode.flags()).unwrap(),
            4096
        );
        assert!(buf.iter().all(|&b| b == 7));
    }
}
