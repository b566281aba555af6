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
//!   .tmp-NAME-...           a snapshot being written (never listed)
//! ```
//!
//! Pages are read from a read-only shared mapping of `memory`: no syscall per
//! read, and every client of a snapshot reads the same page-cache pages.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use faultline_proto::model::DigestAlgorithm;
use faultline_proto::{
    MANIFEST_FORMAT_VERSION, Manifest, PageBitmap, PageIndex, PageRange, PageSize, Region,
    SnapshotId, WorkingSetName,
};
use memmap2::Mmap;

use super::writer::TMP_PREFIX;
use super::{
    CreateError, ListError, OpenError, RecordError, Snapshot, SnapshotSpec, SnapshotStore,
    SnapshotSummary, SnapshotWriter, first_touch_order,
};

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

/// A directory of snapshots.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    /// Snapshots opened so far, shared by every request that reads them.
    open: Mutex<HashMap<SnapshotId, Arc<LocalSnapshot>>>,
}

impl LocalStore {
    /// A store in `root`, created if missing.
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self {
            root,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn open_local(&self, id: &SnapshotId) -> Result<Arc<LocalSnapshot>, OpenError> {
        let mut open = self.open.lock().expect("store lock poisoned");
        if let Some(s) = open.get(id) {
            return Ok(s.clone());
        }
        let snapshot = Arc::new(LocalSnapshot::open(&self.root.join(id.as_str()), id)?);
        open.insert(id.clone(), snapshot.clone());
        Ok(snapshot)
    }
}

impl SnapshotStore for LocalStore {
    fn list(&self) -> Result<Vec<SnapshotSummary>, ListError> {
        let read_dir = |source| ListError::ReadDir {
            path: self.root.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(read_dir)? {
            let entry = entry.map_err(read_dir)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Skips snapshots being written (".tmp-...") and anything else
            // that is not a snapshot directory.
            let Ok(id) = SnapshotId::new(name) else {
                continue;
            };
            if !entry.path().join(MANIFEST_FILE).is_file() {
                continue;
            }
            let m = self.open_local(&id)?.manifest();
            out.push(SnapshotSummary {
                name: id,
                page_size: m.page_size.bytes(),
                page_count: m.page_count,
                zero_pages: m.zero_map.count_ones(),
                working_sets: m.working_sets.clone(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn open(&self, id: &SnapshotId) -> Result<Arc<dyn Snapshot>, OpenError> {
        Ok(self.open_local(id)?)
    }

    fn create(&self, spec: SnapshotSpec) -> Result<SnapshotWriter, CreateError> {
        SnapshotWriter::create(self.root.clone(), spec)
    }

    fn record_working_set(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, RecordError> {
        let snapshot = self.open_local(id)?;
        let order = first_touch_order(ranges, snapshot.manifest().page_count)?;
        let path = snapshot.dir.join(format!("{WORKING_SET_PREFIX}{name}"));
        let tmp = snapshot
            .dir
            .join(format!("{TMP_PREFIX}{WORKING_SET_PREFIX}{name}"));
        let bytes: Vec<u8> = order.iter().flat_map(|p| p.0.to_le_bytes()).collect();
        File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| RecordError::Write {
                path: path.clone(),
                source,
            })?;
        let pages = order.len() as u64;
        snapshot.add_working_set(name.clone(), order);
        Ok(pages)
    }
}

/// Owns a read-only mapping and hands out slices of it as `Bytes` without a
/// copy: each slice keeps the mapping alive.
#[derive(Debug)]
struct MapSlice {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
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
    /// The image. `Arc` so that `Bytes` slices handed out keep it mapped.
    memory: Arc<Mmap>,
    working_sets: RwLock<HashMap<WorkingSetName, Arc<Vec<PageIndex>>>>,
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
                        path: path.to_owned(),
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

        let digest_bytes = read(&dir.join(DIGESTS_FILE))?;
        if digest_bytes.len() as u64 != file.page_count * 4 {
            return Err(corrupt(format!(
                "{DIGESTS_FILE} has {} bytes, {} pages need {}",
                digest_bytes.len(),
                file.page_count,
                file.page_count * 4
            )));
        }
        let digests = digest_bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let memory_path = dir.join(MEMORY_FILE);
        let memory = File::open(&memory_path).map_err(|source| OpenError::Read {
            path: memory_path.clone(),
            source,
        })?;
        let len = memory
            .metadata()
            .map_err(|source| OpenError::Read {
                path: memory_path.clone(),
                source,
            })?
            .len();
        // A shorter file would turn reads past its end into SIGBUS.
        if len != spec.size {
            return Err(corrupt(format!(
                "{MEMORY_FILE} has {len} bytes, the manifest says {}",
                spec.size
            )));
        }
        // SAFETY: the mapping is read-only and private to this process's
        // view of an immutable snapshot file; the store never writes to a
        // complete snapshot's image. Its length was checked above, so reads
        // inside the manifest's bounds stay inside the file. (A third party
        // truncating the file while it is served would raise SIGBUS; the
        // store's directory belongs to the server.)
        let map = unsafe { Mmap::map(&memory) }.map_err(|source| OpenError::Read {
            path: memory_path,
            source,
        })?;

        let mut working_sets = HashMap::new();
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
                working_sets.insert(ws, Arc::new(pages));
            }
        }

        let mut ws_names: Vec<_> = working_sets.keys().cloned().collect();
        ws_names.sort();
        Ok(Self {
            dir: dir.to_owned(),
            page_size,
            manifest: RwLock::new(Arc::new(Manifest {
                format_version: MANIFEST_FORMAT_VERSION,
                id: id.clone(),
                page_size,
                page_count: file.page_count,
                regions: spec.regions,
                zero_map,
                digest_algorithm: file.digest_algorithm,
                digests,
                working_sets: ws_names,
            })),
            memory: Arc::new(map),
            working_sets: RwLock::new(working_sets),
        })
    }
}

impl LocalSnapshot {
    /// Makes a newly recorded working set visible to readers.
    fn add_working_set(&self, name: WorkingSetName, order: Vec<PageIndex>) {
        let mut sets = self
            .working_sets
            .write()
            .expect("working set lock poisoned");
        sets.insert(name, Arc::new(order));
        let mut names: Vec<_> = sets.keys().cloned().collect();
        names.sort();
        let mut manifest = self.manifest.write().expect("manifest lock poisoned");
        let mut updated = Manifest::clone(&manifest);
        updated.working_sets = names;
        *manifest = Arc::new(updated);
    }
}

impl Snapshot for LocalSnapshot {
    fn manifest(&self) -> Arc<Manifest> {
        self.manifest
            .read()
            .expect("manifest lock poisoned")
            .clone()
    }

    fn read(&self, range: PageRange) -> Bytes {
        let ps = self.page_size.bytes_usize();
        Bytes::from_owner(MapSlice {
            map: self.memory.clone(),
            start: range.start().0 as usize * ps,
            len: range.count() as usize * ps,
        })
    }

    fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<PageIndex>>> {
        self.working_sets
            .read()
            .expect("working set lock poisoned")
            .get(name)
            .cloned()
    }
}
