//! Chains of layers in the local store: diff snapshots and writable volumes.
//!
//! A *layer* holds some pages of an image; the pages it does not hold are
//! its parent's. A standalone snapshot (format 1, `manifest.json` plus
//! `memory` and `digests`) holds every page and ends a chain. A diff
//! snapshot or a volume (format [`LAYER_FORMAT_VERSION`]) is a directory:
//!
//! ```text
//! NAME/
//!   manifest.json   format 2: kind (snapshot | volume), parent, layout
//!   memory          the full-size image, sparse: only held pages are written
//!   digests         one little-endian CRC32C per page (held pages only)
//!   pages           one byte per page: 0 not held, 1 held, 2 held and zero
//!   journal         volumes only: the run being written (empty at rest)
//! ```
//!
//! A server of format 1 refuses a format-2 manifest (Corrupt, "format
//! version 2"), so an older server never serves a diff snapshot's holes as
//! zeros.
//!
//! Reading a chain resolves each page to the newest layer holding it
//! ([`Chain`]); its manifest is the resolved one. A chain is at most
//! [`MAX_CHAIN_DEPTH`] layers deep.
//!
//! # Writes
//! A run written to a volume is first appended to `journal` with its
//! digests and a checksum and made durable (`fdatasync`); then its bytes,
//! digests and page states are written in place and made durable; then the
//! run is acknowledged and the journal emptied. A crash before the journal
//! is durable loses the unacknowledged run and nothing else; a crash after
//! it is repaired when the volume is next opened, by applying the journal
//! again (applying is idempotent). So no page is ever left with a digest
//! that does not match its bytes, whatever the moment of the crash.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use faultline_proto::codec::PageRun;
use faultline_proto::model::DigestAlgorithm;
use faultline_proto::{
    ChainDepth, LayerKind, MANIFEST_FORMAT_VERSION, Manifest, PageBitmap, PageIndex, PageRange,
    PageSize, Region, SnapshotId, WorkingSetName,
};

use super::local::{DIGESTS_FILE, MANIFEST_FILE, MEMORY_FILE};
use super::writer::{TMP_PREFIX, is_zero};
use super::{
    LayerInfo, OpenError, ReadError, Snapshot, SnapshotSpec, SnapshotSummary, Volume, VolumeError,
    WriteError,
};

/// Longest chain of layers (a diff snapshot over a diff snapshot ... over a
/// standalone one), the top included. Every read of a page not held by the
/// top consults the layers under it, and every layer costs an open file and
/// 5 bytes a page of memory when opened: 16 keeps a deep chain's overhead
/// within a standalone copy's while leaving room for a day of hourly diffs
/// between flattens (`faultline-server flatten`).
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// Format version of a layer's `manifest.json`.
pub const LAYER_FORMAT_VERSION: u32 = 2;

/// The per-page state file of a layer.
pub const PAGES_FILE: &str = "pages";
/// A volume's journal.
pub const JOURNAL_FILE: &str = "journal";

/// The page is not held by this layer (its parent's, or zero).
const NOT_HELD: u8 = 0;
/// The page is held, with the bytes in `memory`.
const HELD: u8 = 1;
/// The page is held and all zeros.
const HELD_ZERO: u8 = 2;

/// Marks a journal record.
const JOURNAL_MAGIC: u64 = 0x4c41_4e52_554f_4a46; // "FJOURNAL"
/// Journal header: magic, start, count (u64 each), checksum (u32).
const JOURNAL_HEADER: usize = 28;

/// Owner of a page held by no layer: it reads as zeros.
const NO_OWNER: u8 = u8::MAX;

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// `manifest.json` of a layer. It carries empty `zero_pages`/`zero_ranges`
/// so that it parses as a format-1 [`ManifestFile`] too, which is then
/// refused by its version.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LayerFile {
    /// [`LAYER_FORMAT_VERSION`].
    pub format_version: u32,
    /// Its name; must match the directory.
    pub name: SnapshotId,
    /// Snapshot or volume.
    pub kind: LayerKind,
    /// The layer under this one.
    pub parent: Option<SnapshotId>,
    /// Bytes per page.
    pub page_size: u64,
    /// Pages in the image.
    pub page_count: u64,
    /// How digests are computed.
    pub digest_algorithm: DigestAlgorithm,
    /// Guest memory layout.
    pub regions: Vec<Region>,
    /// Always 0 (format-1 readers only).
    #[serde(default)]
    pub zero_pages: u64,
    /// Always empty (format-1 readers only).
    #[serde(default)]
    pub zero_ranges: Vec<[u64; 2]>,
}

/// The format version a `manifest.json` declares, whatever its format.
pub fn format_version(text: &[u8]) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Probe {
        format_version: u32,
    }
    serde_json::from_slice::<Probe>(text)
        .ok()
        .map(|p| p.format_version)
}

/// One layer, opened.
#[derive(Debug)]
struct Layer {
    id: SnapshotId,
    memory: Arc<File>,
    /// Per page: [`NOT_HELD`], [`HELD`] or [`HELD_ZERO`].
    state: Vec<u8>,
    digests: Vec<u32>,
}

/// A chain of layers read as one image: a diff snapshot or a volume.
#[derive(Clone, Debug)]
pub struct Chain {
    inner: Arc<ChainInner>,
}

/// A [`Chain`] that is not kept open by this handle.
#[derive(Clone, Debug)]
pub(crate) struct WeakChain(std::sync::Weak<ChainInner>);

#[derive(Debug)]
struct ChainInner {
    id: SnapshotId,
    dir: PathBuf,
    kind: LayerKind,
    parent: Option<SnapshotId>,
    page_size: PageSize,
    page_count: u64,
    regions: Vec<Region>,
    /// Newest first.
    layers: Vec<Layer>,
    resolved: RwLock<Resolved>,
    /// Held for reading while a read copies pages of the top layer, and for
    /// writing while a write changes them: a reader never sees a torn page.
    apply: RwLock<()>,
    /// A volume's files, open for writing; `None` for a snapshot.
    writer: Option<Mutex<WriteState>>,
    /// Inode of `manifest.json` when opened.
    manifest_ino: u64,
    /// Recorded working sets (in the top layer's directory).
    working_sets: RwLock<std::collections::HashMap<WorkingSetName, Arc<Vec<PageIndex>>>>,
    /// Bytes a write must leave free on the disk.
    min_free_disk: u64,
}

#[derive(Debug)]
struct Resolved {
    /// Per page: index into `layers` of the layer serving it, or
    /// [`NO_OWNER`].
    owner: Vec<u8>,
    digests: Vec<u32>,
    zero: PageBitmap,
    own_pages: u64,
    /// Built on demand, dropped by every write.
    manifest: Option<Arc<Manifest>>,
}

#[derive(Debug)]
struct WriteState {
    sealed: bool,
    memory: File,
    digests: File,
    pages: File,
    journal: File,
}

fn io_open(id: &SnapshotId, file: &str) -> impl Fn(std::io::Error) -> OpenError {
    let (id, file) = (id.clone(), file.to_owned());
    move |source| OpenError::Read {
        snapshot: id.clone(),
        file: file.clone(),
        source,
    }
}

fn corrupt(id: &SnapshotId, reason: impl Into<String>) -> OpenError {
    OpenError::Corrupt {
        snapshot: id.clone(),
        reason: reason.into(),
    }
}

/// Reads `manifest.json` of `id` under `root`.
fn read_manifest(root: &Path, id: &SnapshotId) -> Result<Vec<u8>, OpenError> {
    let path = root.join(id.as_str()).join(MANIFEST_FILE);
    std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            OpenError::NotFound(id.clone())
        } else {
            io_open(id, MANIFEST_FILE)(e)
        }
    })
}

/// Parses a format-2 manifest of `id`.
fn parse_layer_file(id: &SnapshotId, text: &[u8]) -> Result<LayerFile, OpenError> {
    let file: LayerFile = serde_json::from_slice(text)
        .map_err(|e| corrupt(id, format!("{MANIFEST_FILE} does not parse: {e}")))?;
    if &file.name != id {
        return Err(corrupt(
            id,
            format!("{MANIFEST_FILE} names {:?}", file.name.as_str()),
        ));
    }
    Ok(file)
}

impl Layer {
    /// A format-2 layer.
    fn open_layered(dir: &Path, file: &LayerFile) -> Result<Self, OpenError> {
        let id = &file.name;
        let n = file.page_count;
        let state = std::fs::read(dir.join(PAGES_FILE)).map_err(io_open(id, PAGES_FILE))?;
        if state.len() as u64 != n || state.iter().any(|&s| s > HELD_ZERO) {
            return Err(corrupt(
                id,
                format!("{PAGES_FILE} does not hold one valid state for each of {n} pages"),
            ));
        }
        let digest_bytes =
            std::fs::read(dir.join(DIGESTS_FILE)).map_err(io_open(id, DIGESTS_FILE))?;
        if digest_bytes.len() as u64 != n * 4 {
            return Err(corrupt(
                id,
                format!(
                    "{DIGESTS_FILE} has {} bytes, {n} pages need {}",
                    digest_bytes.len(),
                    n * 4
                ),
            ));
        }
        let digests = digest_bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let memory = File::open(dir.join(MEMORY_FILE)).map_err(io_open(id, MEMORY_FILE))?;
        let len = memory.metadata().map_err(io_open(id, MEMORY_FILE))?.len();
        if len != n * file.page_size {
            return Err(corrupt(
                id,
                format!(
                    "{MEMORY_FILE} has {len} bytes, the manifest says {}",
                    n * file.page_size
                ),
            ));
        }
        Ok(Self {
            id: id.clone(),
            memory: Arc::new(memory),
            state,
            digests,
        })
    }

    /// A standalone (format-1) snapshot as the bottom of a chain.
    fn open_standalone(root: &Path, id: &SnapshotId) -> Result<(Self, Arc<Manifest>), OpenError> {
        let dir = root.join(id.as_str());
        let (manifest, memory) = super::local::open_parts(&dir, id)?;
        let state = (0..manifest.page_count)
            .map(|p| {
                if manifest.zero_map.get(p) {
                    HELD_ZERO
                } else {
                    HELD
                }
            })
            .collect();
        Ok((
            Self {
                id: id.clone(),
                memory,
                state,
                digests: manifest.digests.clone(),
            },
            manifest,
        ))
    }
}

/// What a chain looks like before it is opened: each layer's manifest,
/// newest first, checked for depth.
struct ChainPlan {
    top: LayerFile,
    /// Parents' format-2 manifests, newest first.
    parents: Vec<LayerFile>,
    /// The standalone snapshot at the bottom, if the chain ends in one.
    root: Option<SnapshotId>,
}

impl ChainPlan {
    fn load(root_dir: &Path, top: LayerFile) -> Result<Self, OpenError> {
        let mut parents = Vec::new();
        let mut next = top.parent.clone();
        let mut root = None;
        while let Some(p) = next.take() {
            if 2 + parents.len() as u32 > MAX_CHAIN_DEPTH {
                return Err(corrupt(
                    &top.name,
                    format!("its chain is deeper than the limit of {MAX_CHAIN_DEPTH} layers"),
                ));
            }
            let text = read_manifest(root_dir, &p).map_err(|e| match e {
                OpenError::NotFound(p) => corrupt(
                    &top.name,
                    format!("its parent snapshot \"{p}\" is missing (it was removed?)"),
                ),
                e => e,
            })?;
            if format_version(&text) == Some(LAYER_FORMAT_VERSION) {
                let f = parse_layer_file(&p, &text)?;
                if f.kind != LayerKind::Snapshot {
                    return Err(corrupt(
                        &top.name,
                        format!("its parent \"{p}\" is a volume"),
                    ));
                }
                if f.page_count != top.page_count || f.page_size != top.page_size {
                    return Err(corrupt(
                        &top.name,
                        format!("its parent \"{p}\" has another size"),
                    ));
                }
                next = f.parent.clone();
                parents.push(f);
            } else {
                root = Some(p);
            }
        }
        Ok(Self { top, parents, root })
    }
}

impl Chain {
    /// Opens the format-2 layer `id` (parsed from `text`) and the chain
    /// under it; a volume's interrupted write is repaired first.
    ///
    /// Writes keep `min_free_disk` bytes free on the store's disk.
    pub(crate) fn open(
        root: &Path,
        id: &SnapshotId,
        text: &[u8],
        min_free_disk: u64,
    ) -> Result<Self, OpenError> {
        let top = parse_layer_file(id, text)?;
        let page_size =
            PageSize::try_from(top.page_size).map_err(|e| corrupt(id, e.to_string()))?;
        SnapshotSpec::new(
            id.clone(),
            page_size,
            top.page_count.saturating_mul(page_size.bytes()),
            top.regions.clone(),
        )
        .map_err(|e| corrupt(id, e.to_string()))?;
        let dir = root.join(id.as_str());
        let manifest_ino = std::fs::metadata(dir.join(MANIFEST_FILE))
            .map_err(io_open(id, MANIFEST_FILE))?
            .ino();
        let writer = if top.kind == LayerKind::Volume {
            let rw = |name: &str| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join(name))
                    .map_err(io_open(id, name))
            };
            let state = WriteState {
                sealed: false,
                memory: rw(MEMORY_FILE)?,
                digests: rw(DIGESTS_FILE)?,
                pages: rw(PAGES_FILE)?,
                journal: rw(JOURNAL_FILE)?,
            };
            {
                let _locked =
                    JournalLock::take(&state.journal).map_err(io_open(id, JOURNAL_FILE))?;
                replay_journal(&state, page_size, top.page_count)
                    .map_err(io_open(id, JOURNAL_FILE))?;
            }
            Some(Mutex::new(state))
        } else {
            None
        };
        let plan = ChainPlan::load(root, top)?;
        let mut layers = vec![Layer::open_layered(&dir, &plan.top)?];
        for p in &plan.parents {
            layers.push(Layer::open_layered(&root.join(p.name.as_str()), p)?);
        }
        if let Some(r) = &plan.root {
            let (layer, m) = Layer::open_standalone(root, r)?;
            if m.page_count != plan.top.page_count || m.page_size != page_size {
                return Err(corrupt(id, format!("its parent \"{r}\" has another size")));
            }
            layers.push(layer);
        }
        let resolved = resolve(&layers, plan.top.page_count);
        let working_sets = load_working_sets(&dir, id, plan.top.page_count)?;
        Ok(Self {
            inner: Arc::new(ChainInner {
                id: id.clone(),
                dir,
                kind: plan.top.kind,
                parent: plan.top.parent.clone(),
                page_size,
                page_count: plan.top.page_count,
                regions: plan.top.regions.clone(),
                layers,
                resolved: RwLock::new(resolved),
                apply: RwLock::new(()),
                writer,
                manifest_ino,
                min_free_disk,
                working_sets: RwLock::new(working_sets),
            }),
        })
    }

    /// A handle that does not keep the chain open.
    pub(crate) fn downgrade(&self) -> WeakChain {
        WeakChain(Arc::downgrade(&self.inner))
    }

    /// The chain, if it is still open somewhere.
    pub(crate) fn upgrade(weak: &WeakChain) -> Option<Self> {
        weak.0.upgrade().map(|inner| Self { inner })
    }

    /// Its name.
    pub fn id(&self) -> &SnapshotId {
        &self.inner.id
    }

    /// Its directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Snapshot or volume.
    pub fn kind(&self) -> LayerKind {
        self.inner.kind
    }

    /// Bytes per page.
    pub fn page_size(&self) -> PageSize {
        self.inner.page_size
    }

    /// Pages in the image.
    pub fn page_count(&self) -> u64 {
        self.inner.page_count
    }

    /// The layout.
    pub fn regions(&self) -> &[Region] {
        &self.inner.regions
    }

    /// Layers in the chain, this one included.
    pub fn depth(&self) -> ChainDepth {
        ChainDepth(self.inner.layers.len() as u32)
    }

    /// Its place in the chain.
    pub fn layer_info(&self) -> LayerInfo {
        LayerInfo {
            kind: self.inner.kind,
            parent: self.inner.parent.clone(),
            depth: self.depth(),
            own_pages: self.resolved().own_pages,
        }
    }

    /// A summary for `list`.
    pub fn summary(&self) -> SnapshotSummary {
        let r = self.resolved();
        SnapshotSummary {
            name: self.inner.id.clone(),
            page_size: self.inner.page_size.bytes(),
            page_count: self.inner.page_count,
            zero_pages: r.zero.count_ones()
                + r.owner.iter().filter(|&&o| o == NO_OWNER).count() as u64,
            working_sets: self.inner.working_set_names(),
            layer: LayerInfo {
                kind: self.inner.kind,
                parent: self.inner.parent.clone(),
                depth: self.depth(),
                own_pages: r.own_pages,
            },
        }
    }

    fn resolved(&self) -> std::sync::RwLockReadGuard<'_, Resolved> {
        self.inner.resolved.read().expect("chain lock poisoned")
    }

    /// Seals the volume: with its write lock and its journal's lock held
    /// (so that no write of this process or another is in progress), runs
    /// `commit` (which moves the volume to its snapshot name); if that
    /// succeeds, every later write fails.
    pub(crate) fn seal_with<T>(
        &self,
        commit: impl FnOnce() -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        let Some(w) = &self.inner.writer else {
            return Err(VolumeError::NotAVolume(self.inner.id.clone()));
        };
        let mut w = w.lock().expect("volume lock poisoned");
        let _locked = JournalLock::take(&w.journal).map_err(|source| VolumeError::Io {
            name: self.inner.id.clone(),
            stage: "lock its journal",
            source,
        })?;
        if w.sealed || !self.still_in_place() {
            w.sealed = true;
            return Err(VolumeError::NotFound(self.inner.id.clone()));
        }
        let out = commit()?;
        w.sealed = true;
        Ok(out)
    }

    /// Whether the volume is still where it was opened: a seal by another
    /// process (`faultline-server volume seal` beside a running server)
    /// moves it and replaces its manifest.
    fn still_in_place(&self) -> bool {
        std::fs::metadata(self.inner.dir.join(MANIFEST_FILE))
            .is_ok_and(|m| m.ino() == self.inner.manifest_ino)
    }

    /// Serves a working set just recorded in the top layer's directory.
    pub(crate) fn add_working_set(&self, name: WorkingSetName, order: Vec<PageIndex>) {
        self.inner
            .working_sets
            .write()
            .expect("working set lock poisoned")
            .insert(name, Arc::new(order));
        self.inner
            .resolved
            .write()
            .expect("chain lock poisoned")
            .manifest = None;
    }

    /// Reads `range` of the resolved image, blocking.
    pub fn read_blocking(&self, range: PageRange) -> Result<Vec<u8>, ReadError> {
        let ps = self.inner.page_size.bytes();
        let len = usize::try_from(range.count() * ps).expect("a checked range fits in memory");
        let mut buf = vec![0u8; len];
        let _reading = self.inner.apply.read().expect("chain lock poisoned");
        let segments = {
            let r = self.resolved();
            let mut segs: Vec<(u8, u64, u64)> = Vec::new();
            for p in range.iter() {
                let o = r.owner[p.0 as usize];
                match segs.last_mut() {
                    Some((lo, s, c)) if *lo == o && *s + *c == p.0 => *c += 1,
                    _ => segs.push((o, p.0, 1)),
                }
            }
            segs
        };
        for (owner, start, count) in segments {
            if owner == NO_OWNER {
                continue;
            }
            let layer = &self.inner.layers[owner as usize];
            let at = ((start - range.start().0) * ps) as usize;
            let dst = &mut buf[at..at + (count * ps) as usize];
            layer
                .memory
                .read_exact_at(dst, start * ps)
                .map_err(|source| ReadError::Io {
                    snapshot: layer.id.clone(),
                    range: PageRange::new(PageIndex(start), count).expect("non-empty"),
                    source,
                })?;
        }
        Ok(buf)
    }

    /// Writes a run to the volume, durably (see the module's "Writes").
    pub fn write_blocking(&self, run: &PageRun) -> Result<(), WriteError> {
        let id = &self.inner.id;
        let Some(w) = &self.inner.writer else {
            return Err(WriteError::NotAVolume(id.clone()));
        };
        let mut w = w.lock().expect("volume lock poisoned");
        if w.sealed {
            return Err(WriteError::Sealed(id.clone()));
        }
        // Across processes: a seal or a replay by another process holds it.
        let _locked = JournalLock::take(&w.journal).map_err(|source| WriteError::Io {
            volume: id.clone(),
            stage: "lock the journal",
            source,
        })?;
        if !self.still_in_place() {
            w.sealed = true;
            return Err(WriteError::Sealed(id.clone()));
        }
        run.range
            .check_within(self.inner.page_count)
            .map_err(WriteError::OutOfRange)?;
        let ps = self.inner.page_size.bytes_usize();
        if run.data.len() != run.range.count() as usize * ps {
            return Err(WriteError::WrongSize {
                range: run.range,
                got: run.data.len(),
                want: run.range.count() as usize * ps,
            });
        }
        let io = |stage: &'static str| {
            let id = id.clone();
            move |source| WriteError::Io {
                volume: id.clone(),
                stage,
                source,
            }
        };
        let digests: Vec<u32> = run
            .data
            .chunks_exact(ps)
            .map(|p| DigestAlgorithm::Crc32c.digest(p))
            .collect();
        // The journal and the pages in place take up to twice the run.
        let need = 2 * run.data.len() as u64;
        let free =
            super::writer::free_bytes(&self.inner.dir).map_err(io("check the free space"))?;
        if free < self.inner.min_free_disk.saturating_add(need) {
            return Err(WriteError::DiskFull {
                free,
                reserve: self.inner.min_free_disk,
            });
        }
        // 1. The journal, durable: from here on the run survives a crash.
        let record = journal_record(run, &digests);
        w.journal.set_len(0).map_err(io("empty the journal"))?;
        w.journal
            .write_all_at(&record, 0)
            .and_then(|()| w.journal.sync_data())
            .map_err(io("write the journal"))?;
        // 2. In place, under the apply lock so no reader sees a torn page.
        {
            let _applying = self.inner.apply.write().expect("chain lock poisoned");
            apply(&w, run.range, &run.data, &digests, ps).map_err(io("write the pages"))?;
            let mut r = self.inner.resolved.write().expect("chain lock poisoned");
            for (i, p) in run.range.iter().enumerate() {
                let p = p.0 as usize;
                if r.owner[p] != 0 {
                    r.own_pages += 1;
                }
                r.owner[p] = 0;
                r.digests[p] = digests[i];
                if is_zero(&run.data[i * ps..(i + 1) * ps]) {
                    r.zero.set(p as u64);
                } else {
                    r.zero.clear(p as u64);
                }
            }
            r.manifest = None;
        }
        // 3. Emptied; a crash before this applies the run again, harmlessly.
        w.journal.set_len(0).map_err(io("empty the journal"))?;
        Ok(())
    }
}

/// An exclusive `flock` on a volume's journal, held while a run is written,
/// a journal replayed or a volume sealed: it orders these between
/// processes sharing a store (a server and `faultline-server volume seal`).
/// Callers drop the guard before the file (it is a local of a function
/// that holds the file's owner locked).
struct JournalLock(std::os::fd::RawFd);

impl JournalLock {
    fn take(file: &File) -> std::io::Result<Self> {
        loop {
            // SAFETY: flock only operates on the fd, which `file` keeps open
            // for the call; it touches no memory.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self(file.as_raw_fd()));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for JournalLock {
    fn drop(&mut self) {
        // SAFETY: the fd is still open (the guard is dropped before the
        // file, see the type's doc); flock touches no memory. Unlocking an
        // fd that was closed and reused would at worst drop another lock of
        // this process early, which the doc above rules out.
        unsafe { libc::flock(self.0, libc::LOCK_UN) };
    }
}

/// The journal record of `run`: header, digests, bytes.
fn journal_record(run: &PageRun, digests: &[u32]) -> Vec<u8> {
    let mut body = Vec::with_capacity(digests.len() * 4 + run.data.len());
    for d in digests {
        body.extend_from_slice(&d.to_le_bytes());
    }
    body.extend_from_slice(&run.data);
    let mut rec = Vec::with_capacity(JOURNAL_HEADER + body.len());
    rec.extend_from_slice(&JOURNAL_MAGIC.to_le_bytes());
    rec.extend_from_slice(&run.range.start().0.to_le_bytes());
    rec.extend_from_slice(&run.range.count().to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// Writes pages, digests and states in place and makes them durable.
fn apply(
    w: &WriteState,
    range: PageRange,
    data: &[u8],
    digests: &[u32],
    ps: usize,
) -> std::io::Result<()> {
    let start = range.start().0;
    w.memory.write_all_at(data, start * ps as u64)?;
    let d: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    w.digests.write_all_at(&d, start * 4)?;
    let states: Vec<u8> = data
        .chunks_exact(ps)
        .map(|p| if is_zero(p) { HELD_ZERO } else { HELD })
        .collect();
    w.pages.write_all_at(&states, start)?;
    w.memory.sync_data()?;
    w.digests.sync_data()?;
    w.pages.sync_data()
}

/// Applies a complete journal record left by a crash; ignores a partial
/// one (that run was never acknowledged).
fn replay_journal(w: &WriteState, page_size: PageSize, page_count: u64) -> std::io::Result<()> {
    let len = w.journal.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let ps = page_size.bytes_usize();
    let mut rec = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(64 << 20)];
    w.journal.read_exact_at(&mut rec, 0)?;
    let u64_at = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().expect("8 bytes"));
    let complete = rec.len() >= JOURNAL_HEADER && u64_at(0) == JOURNAL_MAGIC && {
        let (start, count) = (u64_at(8), u64_at(16));
        let body = &rec[JOURNAL_HEADER..];
        let crc = u32::from_le_bytes(rec[24..28].try_into().expect("4 bytes"));
        PageRange::new(PageIndex(start), count).is_some_and(|r| r.end() <= page_count)
            && body.len() as u64 == count * (4 + ps as u64)
            && crc32c::crc32c(body) == crc
    };
    if complete {
        let (start, count) = (u64_at(8), u64_at(16));
        let body = &rec[JOURNAL_HEADER..];
        let (d, data) = body.split_at(count as usize * 4);
        let digests: Vec<u32> = d
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let range = PageRange::new(PageIndex(start), count).expect("checked");
        apply(w, range, data, &digests, ps)?;
        tracing::info!(pages = count, "applied a volume's journal left by a crash");
    }
    w.journal.set_len(0)?;
    w.journal.sync_data()
}

/// The working sets recorded in a layer's directory.
fn load_working_sets(
    dir: &Path,
    id: &SnapshotId,
    page_count: u64,
) -> Result<std::collections::HashMap<WorkingSetName, Arc<Vec<PageIndex>>>, OpenError> {
    let mut sets = std::collections::HashMap::new();
    let entries = std::fs::read_dir(dir).map_err(io_open(id, "its directory"))?;
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(ws) = file
            .to_str()
            .and_then(|n| n.strip_prefix(super::local::WORKING_SET_PREFIX))
            .and_then(|n| WorkingSetName::new(n).ok())
        else {
            continue;
        };
        let bytes = std::fs::read(entry.path()).map_err(io_open(id, &file.to_string_lossy()))?;
        let pages: Vec<PageIndex> = bytes
            .chunks_exact(8)
            .map(|c| PageIndex(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        if bytes.len() % 8 != 0 || pages.iter().any(|p| p.0 >= page_count) {
            return Err(corrupt(
                id,
                format!("working set {ws} lists pages past the end"),
            ));
        }
        sets.insert(ws, Arc::new(pages));
    }
    Ok(sets)
}

/// Each page's owner, digest and zero bit.
fn resolve(layers: &[Layer], page_count: u64) -> Resolved {
    let n = page_count as usize;
    let mut owner = vec![NO_OWNER; n];
    let mut digests = vec![0u32; n];
    let mut zero = PageBitmap::new(page_count);
    let mut own_pages = 0;
    for (p, o) in owner.iter_mut().enumerate() {
        for (i, l) in layers.iter().enumerate() {
            match l.state[p] {
                NOT_HELD => continue,
                s => {
                    *o = i as u8;
                    digests[p] = l.digests[p];
                    if s == HELD_ZERO {
                        zero.set(p as u64);
                    }
                    if i == 0 {
                        own_pages += 1;
                    }
                    break;
                }
            }
        }
    }
    Resolved {
        owner,
        digests,
        zero,
        own_pages,
        manifest: None,
    }
}

impl ChainInner {
    fn working_set_names(&self) -> Vec<WorkingSetName> {
        let mut names: Vec<_> = self
            .working_sets
            .read()
            .expect("working set lock poisoned")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Fills in the digests of pages held by no layer (zeros).
    fn manifest(&self) -> Arc<Manifest> {
        if let Some(m) = &self.resolved.read().expect("chain lock poisoned").manifest {
            return m.clone();
        }
        let mut r = self.resolved.write().expect("chain lock poisoned");
        if let Some(m) = &r.manifest {
            return m.clone();
        }
        let zero_digest = DigestAlgorithm::Crc32c.digest(&vec![0u8; self.page_size.bytes_usize()]);
        let mut zero = r.zero.clone();
        let mut digests = r.digests.clone();
        for (p, &o) in r.owner.iter().enumerate() {
            if o == NO_OWNER {
                zero.set(p as u64);
                digests[p] = zero_digest;
            }
        }
        let m = Arc::new(Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            id: self.id.clone(),
            page_size: self.page_size,
            page_count: self.page_count,
            regions: self.regions.clone(),
            zero_map: zero,
            digest_algorithm: DigestAlgorithm::Crc32c,
            digests,
            working_sets: self.working_set_names(),
        });
        r.manifest = Some(m.clone());
        m
    }
}

#[async_trait::async_trait]
impl Snapshot for Chain {
    fn manifest(&self) -> Arc<Manifest> {
        self.inner.manifest()
    }

    async fn read(&self, range: PageRange) -> Result<Bytes, ReadError> {
        let chain = self.clone();
        tokio::task::spawn_blocking(move || chain.read_blocking(range))
            .await
            .map_err(|e| ReadError::Unavailable {
                snapshot: self.inner.id.clone(),
                reason: format!("a storage thread failed: {e}"),
            })?
            .map(Bytes::from)
    }

    fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<PageIndex>>> {
        self.inner
            .working_sets
            .read()
            .expect("working set lock poisoned")
            .get(name)
            .cloned()
    }

    fn zero_runs(&self, range: PageRange) -> Vec<(PageRange, bool)> {
        let r = self.resolved();
        super::split_by(range, |p| r.owner[p as usize] == NO_OWNER || r.zero.get(p))
    }
}

#[async_trait::async_trait]
impl Volume for Chain {
    fn page_size(&self) -> PageSize {
        self.inner.page_size
    }

    fn page_count(&self) -> u64 {
        self.inner.page_count
    }

    async fn write(&self, run: PageRun) -> Result<(), WriteError> {
        let chain = self.clone();
        tokio::task::spawn_blocking(move || chain.write_blocking(&run))
            .await
            .map_err(|e| WriteError::Unavailable {
                volume: self.inner.id.clone(),
                reason: format!("a storage thread failed: {e}"),
            })?
    }
}

/// A layer directory being written under a temporary name; dropped before
/// [`NewLayer::commit`], it is removed.
pub(crate) struct NewLayer {
    tmp: PathBuf,
    dest: PathBuf,
    file: LayerFile,
    memory: File,
    digests: Vec<u32>,
    state: Vec<u8>,
    committed: bool,
}

impl NewLayer {
    /// Starts a layer `file.name` under `root`.
    pub(crate) fn create(root: &Path, file: LayerFile) -> Result<Self, VolumeError> {
        let dest = root.join(file.name.as_str());
        if dest.exists() {
            return Err(VolumeError::AlreadyExists(file.name));
        }
        let tmp = root.join(format!(
            "{TMP_PREFIX}{}-{}-{}",
            file.name,
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |source| VolumeError::Io {
            name: file.name.clone(),
            stage: "create its files",
            source,
        };
        std::fs::create_dir(&tmp).map_err(io)?;
        let layer = Self {
            memory: File::create(tmp.join(MEMORY_FILE)).map_err(io)?,
            tmp,
            dest,
            digests: vec![0; file.page_count as usize],
            state: vec![NOT_HELD; file.page_count as usize],
            file,
            committed: false,
        };
        layer
            .memory
            .set_len(layer.file.page_count * layer.file.page_size)
            .map_err(|e| layer.io("size its memory file", e))?;
        Ok(layer)
    }

    fn io(&self, stage: &'static str, source: std::io::Error) -> VolumeError {
        VolumeError::Io {
            name: self.file.name.clone(),
            stage,
            source,
        }
    }

    /// Stores whole pages from `start`: they are held by this layer.
    pub(crate) fn put(&mut self, start: u64, data: &[u8]) -> Result<(), VolumeError> {
        let ps = self.file.page_size as usize;
        for (i, page) in data.chunks_exact(ps).enumerate() {
            let p = start as usize + i;
            self.digests[p] = DigestAlgorithm::Crc32c.digest(page);
            if is_zero(page) {
                self.state[p] = HELD_ZERO;
            } else {
                self.state[p] = HELD;
                self.memory
                    .write_all_at(page, p as u64 * ps as u64)
                    .map_err(|e| self.io("write its memory file", e))?;
            }
        }
        Ok(())
    }

    /// Writes the remaining files, makes everything durable and renames the
    /// layer into place.
    pub(crate) fn commit(mut self) -> Result<(), VolumeError> {
        let write = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
            let f = File::create(self.tmp.join(name))?;
            f.write_all_at(bytes, 0)?;
            f.sync_all()
        };
        let digests: Vec<u8> = self.digests.iter().flat_map(|d| d.to_le_bytes()).collect();
        write(DIGESTS_FILE, &digests).map_err(|e| self.io("write its digests", e))?;
        write(PAGES_FILE, &self.state).map_err(|e| self.io("write its page states", e))?;
        if self.file.kind == LayerKind::Volume {
            write(JOURNAL_FILE, &[]).map_err(|e| self.io("create its journal", e))?;
        }
        let manifest = serde_json::to_vec_pretty(&self.file).expect("a manifest serializes");
        write(MANIFEST_FILE, &manifest).map_err(|e| self.io("write its manifest", e))?;
        self.memory
            .sync_all()
            .map_err(|e| self.io("flush its memory file", e))?;
        sync_dir(&self.tmp).map_err(|e| self.io("flush its directory", e))?;
        if self.dest.exists() {
            return Err(VolumeError::AlreadyExists(self.file.name.clone()));
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) {
                VolumeError::AlreadyExists(self.file.name.clone())
            } else {
                self.io("move it into place", e)
            }
        })?;
        self.committed = true;
        if let Some(root) = self.dest.parent() {
            let _ = sync_dir(root);
        }
        Ok(())
    }
}

impl Drop for NewLayer {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Makes a directory's entries durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The data extents of a sparse file, as page ranges (rounded out to whole
/// pages), found with `SEEK_DATA`/`SEEK_HOLE`: the holes of a Firecracker
/// diff snapshot are the pages that did not change.
pub fn data_pages(file: &File, page_size: PageSize) -> std::io::Result<Vec<PageRange>> {
    let len = file.metadata()?.len();
    let ps = page_size.bytes();
    let mut out: Vec<PageRange> = Vec::new();
    let mut at = 0u64;
    while at < len {
        let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(len);
        let (first, end) = (data / ps, hole.div_ceil(ps));
        match out.last_mut() {
            Some(last) if last.end() >= first => {
                *last = PageRange::new(last.start(), end.max(last.end()) - last.start().0)
                    .expect("non-empty");
            }
            _ => {
                if let Some(r) = PageRange::new(PageIndex(first), end - first) {
                    out.push(r);
                }
            }
        }
        at = hole;
    }
    Ok(out)
}

/// `lseek(fd, offset, whence)`; `None` where there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only reads the fd, which `file` keeps open for the
    // call; it touches no memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holes of a sparse file are skipped and data extents become pages.
    #[test]
    fn sparse_extents_become_page_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        f.set_len(64 * 4096).unwrap();
        f.write_all_at(&[1u8; 4096], 3 * 4096).unwrap();
        f.write_all_at(&[2u8; 8192], 40 * 4096).unwrap();
        f.sync_all().unwrap();
        let ranges = data_pages(&File::open(&path).unwrap(), PageSize::Size4K).unwrap();
        let pages: Vec<u64> = ranges.iter().flat_map(|r| r.iter().map(|p| p.0)).collect();
        // A file system may report data at a coarser granularity than the
        // page; it never reports less than what was written.
        assert!(pages.contains(&3) && pages.contains(&40) && pages.contains(&41));
        assert!(pages.len() < 64, "holes reported as data: {pages:?}");
    }

    fn volume_store() -> (tempfile::TempDir, super::super::LocalStore, SnapshotId) {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::LocalStore::new(dir.path().join("store")).unwrap();
        let id = SnapshotId::new("vol").unwrap();
        store
            .create_volume_blocking(faultline_proto::CreateVolume {
                name: id.clone(),
                source: faultline_proto::VolumeSource::Empty {
                    page_size: PageSize::Size4K,
                    size: 16 * 4096,
                },
            })
            .unwrap();
        (dir, store, id)
    }

    fn page_run(start: u64, count: u64, fill: u8) -> PageRun {
        PageRun {
            range: PageRange::new(PageIndex(start), count).unwrap(),
            data: Bytes::from(vec![fill; count as usize * 4096]),
        }
    }

    fn check_digests(chain: &Chain) {
        let m = chain.inner.manifest();
        let all = chain
            .read_blocking(PageRange::new(PageIndex(0), m.page_count).unwrap())
            .unwrap();
        for (p, page) in all.chunks(4096).enumerate() {
            assert!(m.verify(PageIndex(p as u64), page), "page {p}");
        }
    }

    /// A crash after the journal is durable but before the pages are
    /// written in place is repaired on the next open; a torn journal
    /// record is dropped; either way every digest matches its page.
    #[test]
    fn journal_replay_after_a_crash() {
        let (dir, store, id) = volume_store();
        let chain = store.open_chain_blocking(&id).unwrap();
        chain.write_blocking(&page_run(2, 2, 0x11)).unwrap();
        // The crash: a complete record in the journal, nothing applied.
        let run = page_run(3, 2, 0x22);
        let digests: Vec<u32> = run.data.chunks(4096).map(crc32c::crc32c).collect();
        let record = journal_record(&run, &digests);
        let journal = dir.path().join("store/vol").join(JOURNAL_FILE);
        std::fs::write(&journal, &record).unwrap();
        drop((chain, store));
        let store = super::super::LocalStore::new(dir.path().join("store")).unwrap();
        let chain = store.open_chain_blocking(&id).unwrap();
        let got = chain
            .read_blocking(PageRange::new(PageIndex(2), 3).unwrap())
            .unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0x11));
        assert!(got[4096..].iter().all(|&b| b == 0x22));
        check_digests(&chain);
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
        // A torn record (the crash came while writing the journal).
        let torn = journal_record(&page_run(8, 2, 0x33), &[0, 0]);
        std::fs::write(&journal, &torn[..torn.len() - 100]).unwrap();
        drop((chain, store));
        let store = super::super::LocalStore::new(dir.path().join("store")).unwrap();
        let chain = store.open_chain_blocking(&id).unwrap();
        let got = chain
            .read_blocking(PageRange::new(PageIndex(8), 2).unwrap())
            .unwrap();
        assert!(got.iter().all(|&b| b == 0), "a torn run was applied");
        check_digests(&chain);
    }

    /// A seal interrupted after its rename is finished when the store is
    /// next opened: the snapshot opens as a snapshot with the pages.
    #[test]
    fn interrupted_seal_is_finished() {
        let (dir, store, id) = volume_store();
        store
            .open_chain_blocking(&id)
            .unwrap()
            .write_blocking(&page_run(1, 1, 0x44))
            .unwrap();
        drop(store);
        let root = dir.path().join("store");
        std::fs::rename(root.join("vol"), root.join("snap")).unwrap();
        let store = super::super::LocalStore::new(&root).unwrap();
        let chain = store
            .open_chain_blocking(&SnapshotId::new("snap").unwrap())
            .unwrap();
        assert_eq!(chain.kind(), LayerKind::Snapshot);
        let got = chain
            .read_blocking(PageRange::new(PageIndex(1), 1).unwrap())
            .unwrap();
        assert!(got.iter().all(|&b| b == 0x44));
    }

    /// A volume sealed by another process (another store on the directory)
    /// refuses the writes of a process that still holds it open.
    #[test]
    fn seal_elsewhere_stops_writes_here() {
        let (dir, store, id) = volume_store();
        let held = store.open_chain_blocking(&id).unwrap();
        held.write_blocking(&page_run(0, 1, 0x55)).unwrap();
        let other = super::super::LocalStore::new(dir.path().join("store")).unwrap();
        other
            .seal_blocking(&faultline_proto::SealVolume {
                volume: id.clone(),
                snapshot: SnapshotId::new("snap").unwrap(),
            })
            .unwrap();
        let e = held.write_blocking(&page_run(0, 1, 0x66)).unwrap_err();
        assert!(matches!(e, WriteError::Sealed(_)), "{e}");
        let snap = other
            .open_chain_blocking(&SnapshotId::new("snap").unwrap())
            .unwrap();
        let got = snap
            .read_blocking(PageRange::new(PageIndex(0), 1).unwrap())
            .unwrap();
        assert!(got.iter().all(|&b| b == 0x55));
    }

    /// A write that would eat into the disk reserve is refused and changes
    /// nothing.
    #[test]
    fn writes_keep_the_disk_reserve() {
        let (dir, _store, id) = volume_store();
        let root = dir.path().join("store");
        let text = std::fs::read(root.join("vol").join(MANIFEST_FILE)).unwrap();
        let chain = Chain::open(&root, &id, &text, u64::MAX / 4).unwrap();
        let e = chain.write_blocking(&page_run(0, 1, 9)).unwrap_err();
        assert!(matches!(e, WriteError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("--min-free-disk"), "{e}");
        let got = chain
            .read_blocking(PageRange::new(PageIndex(0), 1).unwrap())
            .unwrap();
        assert!(got.iter().all(|&b| b == 0));
        check_digests(&chain);
    }
}
