//! An optional second tier below the memory chunk cache: chunks kept as
//! files on a local disk (`serve --chunk-cache-dir DIR`), so that a server
//! restarted, or one whose memory cache is smaller than its working set of
//! snapshots, reads the store less.
//!
//! Files are named by the chunk's hash and checked against it when read
//! (a damaged file is removed and the chunk fetched again, never served);
//! written under a temporary name and renamed, so a crash leaves no partial
//! chunk under a real name. The total is bounded; the least recently used
//! files go first. The files hold guest memory: the directory is created
//! mode 0700. One server per directory: the index of what is there lives in
//! the server's memory (rebuilt from the files at start).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use metrics::{counter, gauge};

use super::layout::ChunkId;

/// Chunks read from the disk cache.
pub const DISK_HITS: &str = "faultline_server_chunk_disk_cache_hits_total";
/// Lookups the disk cache could not answer.
pub const DISK_MISSES: &str = "faultline_server_chunk_disk_cache_misses_total";
/// Bytes of chunks on the disk.
pub const DISK_BYTES: &str = "faultline_server_chunk_disk_cache_bytes";

/// Prefix of a chunk file being written.
const TMP_PREFIX: &str = ".tmp-";

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
struct Index {
    /// Size and last use of each file.
    entries: HashMap<ChunkId, (u64, u64)>,
    /// Files by last use, oldest first.
    recency: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: u64,
}

impl Index {
    fn touch(&mut self, id: ChunkId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, used)) = self.entries.get_mut(&id) {
            self.recency.remove(used);
            *used = tick;
            self.recency.insert(tick, id);
        }
    }

    fn insert(&mut self, id: ChunkId, len: u64) {
        if self.entries.contains_key(&id) {
            self.touch(id);
            return;
        }
        self.tick += 1;
        self.entries.insert(id, (len, self.tick));
        self.recency.insert(self.tick, id);
        self.bytes += len;
    }

    fn remove(&mut self, id: &ChunkId) {
        if let Some((len, used)) = self.entries.remove(id) {
            self.recency.remove(&used);
            self.bytes -= len;
        }
    }
}

/// The disk cache; see the module docs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DiskCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
}

impl DiskCache {
    /// A cache of at most `capacity` bytes in `dir` (created if missing),
    /// keeping the chunks a previous run left there (oldest first out),
    /// removing unfinished writes.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let (Ok(id), Ok(meta)) = (name.parse::<ChunkId>(), entry.metadata()) else {
                continue;
            };
            found.push((meta.modified().ok(), id, meta.len()));
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut index = Index::default();
        for (_, id, len) in found {
            index.insert(id, len);
        }
        let cache = Self {
            inner: Arc::new(Inner {
                dir,
                capacity,
                index: Mutex::new(index),
            }),
        };
        cache.evict();
        Ok(cache)
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.inner.dir.join(id.to_string())
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.inner
            .index
            .lock()
            .expect("disk cache lock poisoned")
            .bytes
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Chunk `id` if a file holds it, checked against its hash.
    pub async fn get(&self, id: ChunkId) -> Option<Bytes> {
        let known = self
            .inner
            .index
            .lock()
            .expect("disk cache lock poisoned")
            .entries
            .contains_key(&id);
        if !known {
            counter!(DISK_MISSES).increment(1);
            return None;
        }
        let path = self.path(&id);
        let read = tokio::task::spawn_blocking(move || {
            let data = std::fs::read(&path).ok()?;
            (ChunkId::of(&data) == id).then(|| Bytes::from(data))
        })
        .await
        .ok()
        .flatten();
        let mut index = self.inner.index.lock().expect("disk cache lock poisoned");
        match read {
            Some(data) => {
                index.touch(id);
                counter!(DISK_HITS).increment(1);
                Some(data)
            }
            None => {
                // Missing or damaged: forget it; the store has the chunk.
                index.remove(&id);
                let _ = std::fs::remove_file(self.path(&id));
                tracing::warn!(chunk = %id, "chunk file in the disk cache is damaged; removed");
                counter!(DISK_MISSES).increment(1);
                None
            }
        }
    }

    /// Keeps chunk `data` (already checked against `id`), in the background.
    pub fn put(&self, id: ChunkId, data: Bytes) {
        if data.len() as u64 > self.inner.capacity {
            return;
        }
        let cache = self.clone();
        tokio::task::spawn_blocking(move || {
            let tmp = cache.inner.dir.join(format!(
                "{TMP_PREFIX}{id}-{}-{}",
                std::process::id(),
                NEXT_TMP.fetch_add(1, Ordering::Relaxed)
            ));
            let written =
                std::fs::write(&tmp, &data).and_then(|()| std::fs::rename(&tmp, cache.path(&id)));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(chunk = %id, "cannot write the disk cache: {e}");
                return;
            }
            let mut index = cache.inner.index.lock().expect("disk cache lock poisoned");
            index.insert(id, data.len() as u64);
            // Under the same lock: no one sees the cache above its bound.
            cache.evict_locked(&mut index);
        });
    }

    /// Removes the least recently used files down to the capacity.
    fn evict(&self) {
        let mut index = self.inner.index.lock().expect("disk cache lock poisoned");
        self.evict_locked(&mut index);
    }

    fn evict_locked(&self, index: &mut Index) {
        while index.bytes > self.inner.capacity {
            let Some((_, old)) = index.recency.pop_first() else {
                break;
            };
            if let Some((len, _)) = index.entries.remove(&old) {
                index.bytes -= len;
            }
            let _ = std::fs::remove_file(self.path(&old));
        }
        gauge!(DISK_BYTES).set(index.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn settle(cache: &DiskCache, bytes: u64) {
        for _ in 0..200 {
            if cache.bytes() == bytes {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("disk cache holds {} bytes, not {bytes}", cache.bytes());
    }

    /// Chunks written are read back, survive a reopen, and stay within the capacity.
    #[tokio::test]
    async fn keeps_reopens_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path().join("c"), 2500).unwrap();
        let chunks: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i + 1; 1000])).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        cache.put(ids[0], chunks[0].clone());
        settle(&cache, 1000).await;
        cache.put(ids[1], chunks[1].clone());
        settle(&cache, 2000).await;
        assert_eq!(cache.get(ids[0]).await.unwrap(), chunks[0]);
        // A third exceeds 2500 bytes: the least recently used (1) goes.
        cache.put(ids[2], chunks[2].clone());
        // The total stays 2000 throughout: wait for the third to be there.
        for _ in 0..200 {
            if cache.get(ids[2]).await.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(cache.bytes(), 2000);
        assert!(cache.get(ids[1]).await.is_none());
        drop(cache);
        let reopened = DiskCache::open(dir.path().join("c"), 2500).unwrap();
        assert_eq!(reopened.bytes(), 2000);
        assert_eq!(reopened.get(ids[2]).await.unwrap(), chunks[2]);
    }

    /// A damaged chunk file is never returned, and is removed.
    #[tokio::test]
    async fn damaged_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let data = Bytes::from(vec![7u8; 4096]);
        let id = ChunkId::of(&data);
        cache.put(id, data.clone());
        settle(&cache, 4096).await;
        std::fs::write(dir.path().join(id.to_string()), vec![8u8; 4096]).unwrap();
        assert!(cache.get(id).await.is_none());
        assert_eq!(cache.bytes(), 0);
        assert!(!dir.path().join(id.to_string()).exists());
    }
}
