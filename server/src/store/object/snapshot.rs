//! An open object-store snapshot: its manifest and chunk table in memory,
//! page data read chunk by chunk through the server's chunk cache, each
//! chunk checked against its name before any byte of it is served.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use faultline_proto::{Manifest, PageIndex, PageRange, SnapshotId, WorkingSetName};

use super::disk_cache::DiskCache;
use super::io::{ObjectError, ObjectIo};
use super::layout::{ChunkId, Keys};
use crate::chunk_cache::ChunkCache;

/// Chunks fetched ahead of a sequential reader (a Prefetch stream walking
/// the image): with the chunk being read, four GETs are in flight, which
/// moves 1.3-1.5x the bytes per second of one at a time from Garage on
/// loopback (docs/store.md) and hides a store's latency behind sending.
/// Reads that are not sequential fetch nothing ahead.
pub const READ_AHEAD_CHUNKS: usize = 3;

/// The cache every snapshot of a store reads through: chunks by name, so
/// snapshots that share chunks share their cache entries too.
pub type Cache = ChunkCache<ChunkId, ObjectError>;

/// An open snapshot of an [`ObjectStore`](super::ObjectSnapshotStore).
#[derive(Debug)]
pub struct ObjectSnapshot {
    pub(super) id: SnapshotId,
    pub(super) io: Arc<ObjectIo>,
    pub(super) keys: Keys,
    pub(super) cache: Cache,
    /// The disk tier below `cache`, if configured.
    pub(super) disk: Option<DiskCache>,
    /// Replaced (not mutated) when the working sets change.
    pub(super) manifest: RwLock<Arc<Manifest>>,
    pub(super) chunk_bytes: u64,
    pub(super) chunks: Vec<Option<ChunkId>>,
    pub(super) working_sets: RwLock<WorkingSets>,
    /// The last chunk a read ended in, to notice sequential readers.
    pub(super) last_chunk: std::sync::atomic::AtomicUsize,
}

/// The working sets known, and when they were last listed.
#[derive(Debug)]
pub(super) struct WorkingSets {
    pub(super) sets: HashMap<WorkingSetName, Arc<Vec<PageIndex>>>,
    pub(super) listed: Instant,
}

impl ObjectSnapshot {
    /// The manifest, with the working sets known so far.
    pub fn manifest(&self) -> Arc<Manifest> {
        self.manifest
            .read()
            .expect("manifest lock poisoned")
            .clone()
    }

    /// A working set, if one of that name is known.
    pub fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<PageIndex>>> {
        self.working_sets
            .read()
            .expect("working set lock poisoned")
            .sets
            .get(name)
            .cloned()
    }

    /// Makes a set of working sets the known ones.
    pub(super) fn set_working_sets(&self, sets: HashMap<WorkingSetName, Arc<Vec<PageIndex>>>) {
        let mut names: Vec<_> = sets.keys().cloned().collect();
        names.sort();
        *self
            .working_sets
            .write()
            .expect("working set lock poisoned") = WorkingSets {
            sets,
            listed: Instant::now(),
        };
        let mut manifest = self.manifest.write().expect("manifest lock poisoned");
        let mut updated = Manifest::clone(&manifest);
        updated.working_sets = names;
        *manifest = Arc::new(updated);
    }

    /// Adds one working set.
    pub(super) fn add_working_set(&self, name: WorkingSetName, order: Vec<PageIndex>) {
        let mut sets = self
            .working_sets
            .read()
            .expect("working set lock poisoned")
            .sets
            .clone();
        sets.insert(name, Arc::new(order));
        self.set_working_sets(sets);
    }

    /// Bytes in chunk `i` (the last one may be short).
    fn chunk_len(&self, i: usize) -> u64 {
        let size = self.manifest().image_size();
        (size - i as u64 * self.chunk_bytes).min(self.chunk_bytes)
    }

    /// Chunk `i`, from the cache or the store; zeros for a zero chunk.
    async fn chunk(&self, i: usize) -> Result<Bytes, ObjectError> {
        let len = self.chunk_len(i);
        let Some(id) = self.chunks[i] else {
            return Ok(Bytes::from(vec![0u8; len as usize]));
        };
        let io = self.io.clone();
        let key = self.keys.chunk(&id);
        let disk = self.disk.clone();
        self.cache
            .get(id, move || fetch_chunk(io, disk, key, id, len))
            .await
    }

    /// Starts fetching the chunks after `last` if reads walk the image in
    /// order (this read began in the chunk where the previous one ended, or
    /// the next).
    fn read_ahead(&self, first: usize, last: usize) {
        let prev = self
            .last_chunk
            .swap(last, std::sync::atomic::Ordering::Relaxed);
        if first != prev && first != prev.wrapping_add(1) {
            return;
        }
        for i in last + 1..(last + 1 + READ_AHEAD_CHUNKS).min(self.chunks.len()) {
            let Some(id) = self.chunks[i] else { continue };
            let io = self.io.clone();
            let key = self.keys.chunk(&id);
            let len = self.chunk_len(i);
            let disk = self.disk.clone();
            // The cache's single flight makes a later read of the chunk wait
            // for this fetch instead of starting its own.
            self.cache
                .warm(id, move || fetch_chunk(io, disk, key, id, len));
        }
    }

    /// The bytes of `range` (checked by the caller against the manifest).
    pub async fn read(&self, range: PageRange) -> Result<Bytes, ObjectError> {
        let ps = self.manifest().page_size.bytes();
        let start = range.start().0 * ps;
        let len = range.count() * ps;
        let first = (start / self.chunk_bytes) as usize;
        let last = ((start + len - 1) / self.chunk_bytes) as usize;
        self.read_ahead(first, last);
        let offset = start - first as u64 * self.chunk_bytes;
        if first == last {
            // Within one chunk: a slice of the cached chunk, no copy.
            let chunk = self.chunk(first).await?;
            return Ok(chunk.slice(offset as usize..(offset + len) as usize));
        }
        let chunks = futures::future::try_join_all((first..=last).map(|i| self.chunk(i))).await?;
        let mut out = BytesMut::with_capacity(len as usize);
        let mut skip = offset as usize;
        for chunk in chunks {
            let want = (len as usize - out.len()).min(chunk.len() - skip);
            out.extend_from_slice(&chunk[skip..skip + want]);
            skip = 0;
        }
        Ok(out.freeze())
    }

    /// How the image is stored: bytes per chunk, chunks, and chunks stored
    /// (the others are all zeros).
    pub fn chunk_layout(&self) -> ChunkLayout {
        ChunkLayout {
            chunk_bytes: self.chunk_bytes,
            chunks: self.chunks.len() as u64,
            stored: self.chunks.iter().filter(|c| c.is_some()).count() as u64,
        }
    }

    /// The snapshot's name.
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }
}

/// How an object-store snapshot's image is cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChunkLayout {
    /// Bytes per chunk.
    pub chunk_bytes: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// Chunks stored (not all zeros).
    pub stored: u64,
}

/// Reads a chunk from the disk cache, or GETs it and checks its length and
/// hash: a chunk whose bytes do not match its name is corrupt (DATA_LOSS),
/// never served.
async fn fetch_chunk(
    io: Arc<ObjectIo>,
    disk: Option<DiskCache>,
    key: object_store::path::Path,
    id: ChunkId,
    len: u64,
) -> Result<Bytes, ObjectError> {
    if let Some(disk) = &disk
        && let Some(data) = disk.get(id).await
        && data.len() as u64 == len
    {
        return Ok(data);
    }
    let data = io.get(&key).await?;
    if data.len() as u64 != len {
        return Err(ObjectError::Corrupt {
            key: key.to_string(),
            reason: format!("{} bytes, the manifest says {len}", data.len()),
        });
    }
    let check = data.clone();
    let actual = tokio::task::spawn_blocking(move || ChunkId::of(&check))
        .await
        .expect("hashing panicked");
    if actual != id {
        return Err(ObjectError::Corrupt {
            key: key.to_string(),
            reason: format!("its bytes hash to {actual}"),
        });
    }
    if let Some(disk) = disk {
        disk.put(id, data.clone());
    }
    Ok(data)
}
