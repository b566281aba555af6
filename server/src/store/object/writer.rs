//! Writing a new snapshot into an object store in one pass over its image.
//!
//! The image arrives in order and is cut into aligned chunks. For each page
//! the writer records its digest and whether it is all zeros; a chunk whose
//! pages are all zeros is never stored; any other chunk is named by its
//! BLAKE3 and uploaded unless the store has it already (another snapshot
//! holds the same bytes), a few uploads at a time. When every chunk is in
//! the store, the digest table goes up, and the manifest last: until then the
//! snapshot does not exist. An abandoned writer leaves only chunks that no
//! manifest names (harmless; see docs/store.md on garbage).

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use faultline_proto::PageBitmap;
use faultline_proto::model::DigestAlgorithm;
use tokio::task::JoinSet;

use super::io::{ObjectError, ObjectIo};
use super::layout::{
    ChunkHash, ChunkId, Keys, OBJECT_FORMAT_VERSION, ObjectManifest, chunk_bytes_for, chunk_count,
};
use super::metrics;
use crate::store::local::ManifestFile;
use crate::store::writer::is_zero;
use crate::store::{LayerInfo, OrderError, SnapshotSpec, SnapshotSummary};

/// Chunk uploads in flight per writer. Four keep a store's request latency
/// hidden behind hashing on loopback and on a LAN; each holds one chunk of
/// memory, so a writer holds at most this many plus one chunks.
pub const UPLOAD_CONCURRENCY: usize = 4;

/// What a new snapshot's chunks cost the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    /// Chunks in the image.
    pub chunks: u64,
    /// Chunks uploaded.
    pub uploaded: u64,
    /// Chunks the store had already (shared with another snapshot, or
    /// repeated in this one): not uploaded.
    pub reused: u64,
    /// Chunks of zeros: never stored.
    pub zero: u64,
    /// Bytes uploaded for chunks.
    pub uploaded_bytes: u64,
}

/// Writing a snapshot into an object store failed; no manifest was written.
#[derive(Debug, thiserror::Error)]
pub enum ObjectWriteError {
    /// The name is taken.
    #[error("snapshot \"{0}\" already exists; choose another name")]
    AlreadyExists(faultline_proto::SnapshotId),
    /// The image's bytes did not arrive in order, or not all of them.
    #[error(transparent)]
    Order(#[from] OrderError),
    /// The store failed.
    #[error("cannot {stage} for snapshot \"{snapshot}\": {source}")]
    Store {
        /// The snapshot.
        snapshot: faultline_proto::SnapshotId,
        /// What was being done.
        stage: &'static str,
        /// Why.
        source: ObjectError,
    },
}

/// A snapshot being written to an object store; see the module docs.
#[derive(Debug)]
pub struct ObjectWriter {
    io: Arc<ObjectIo>,
    keys: Keys,
    spec: SnapshotSpec,
    chunk_bytes: u64,
    /// The chunk being filled.
    buf: BytesMut,
    received: u64,
    digests: Vec<u8>,
    zero_map: PageBitmap,
    chunks: Vec<Option<ChunkId>>,
    /// Chunks of this image already handled (uploaded or found).
    seen: HashSet<ChunkId>,
    uploads: JoinSet<Result<(bool, u64), ObjectError>>,
    stats: ChunkStats,
}

impl ObjectWriter {
    /// Starts writing `spec`; fails at once if the name is taken.
    pub async fn create(
        io: Arc<ObjectIo>,
        keys: Keys,
        spec: SnapshotSpec,
    ) -> Result<Self, ObjectWriteError> {
        let exists = io
            .exists(&keys.manifest(&spec.name))
            .await
            .map_err(|source| ObjectWriteError::Store {
                snapshot: spec.name.clone(),
                stage: "check the name",
                source,
            })?;
        if exists {
            return Err(ObjectWriteError::AlreadyExists(spec.name));
        }
        let chunk_bytes = chunk_bytes_for(spec.page_size);
        let pages = spec.page_count();
        Ok(Self {
            io,
            keys,
            chunk_bytes,
            buf: BytesMut::with_capacity(chunk_bytes as usize),
            received: 0,
            digests: Vec::with_capacity(pages as usize * 4),
            zero_map: PageBitmap::new(pages),
            chunks: Vec::with_capacity(chunk_count(spec.size, chunk_bytes) as usize),
            seen: HashSet::new(),
            uploads: JoinSet::new(),
            stats: ChunkStats::default(),
            spec,
        })
    }

    /// The snapshot being written.
    pub fn spec(&self) -> &SnapshotSpec {
        &self.spec
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    fn store_err(&self, stage: &'static str) -> impl FnOnce(ObjectError) -> ObjectWriteError {
        let snapshot = self.spec.name.clone();
        move |source| ObjectWriteError::Store {
            snapshot,
            stage,
            source,
        }
    }

    /// Appends `data`, which must start at byte `offset` of the image.
    pub async fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ObjectWriteError> {
        OrderError::check_offset(self.received, offset)?;
        self.write(data).await
    }

    /// Appends `data` to the image.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), ObjectWriteError> {
        OrderError::check_room(self.spec.size, self.received, data.len())?;
        while !data.is_empty() {
            let room = self.chunk_bytes as usize - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.received += take as u64;
            if self.buf.len() as u64 == self.chunk_bytes || self.received == self.spec.size {
                self.seal().await?;
            }
        }
        Ok(())
    }

    /// Scans, names and uploads the chunk in `buf`.
    async fn seal(&mut self) -> Result<(), ObjectWriteError> {
        let chunk = std::mem::replace(
            &mut self.buf,
            BytesMut::with_capacity(self.chunk_bytes as usize),
        )
        .freeze();
        let ps = self.spec.page_size.bytes_usize();
        let first_page = (self.chunks.len() as u64 * self.chunk_bytes) / ps as u64;
        // Digests, zero test and hash are CPU work: off the async workers.
        let scan = {
            let chunk = chunk.clone();
            tokio::task::spawn_blocking(move || {
                let mut digests = Vec::with_capacity(chunk.len() / ps * 4);
                let mut zeros = Vec::new();
                for (i, page) in chunk.chunks(ps).enumerate() {
                    digests.extend_from_slice(&DigestAlgorithm::Crc32c.digest(page).to_le_bytes());
                    if is_zero(page) {
                        zeros.push(i as u64);
                    }
                }
                let all_zero = zeros.len() == chunk.len() / ps;
                let id = (!all_zero).then(|| ChunkId::of(&chunk));
                (digests, zeros, id)
            })
        };
        let (digests, zeros, id) = scan.await.expect("chunk scan panicked");
        self.digests.extend_from_slice(&digests);
        for z in zeros {
            self.zero_map.set(first_page + z);
        }
        self.stats.chunks += 1;
        self.chunks.push(id);
        let Some(id) = id else {
            self.stats.zero += 1;
            return Ok(());
        };
        if !self.seen.insert(id) {
            self.stats.reused += 1;
            return Ok(());
        }
        while self.uploads.len() >= UPLOAD_CONCURRENCY {
            self.join_one().await?;
        }
        let io = self.io.clone();
        let key = self.keys.chunk(&id);
        self.uploads.spawn(async move {
            if io.exists(&key).await? {
                return Ok((false, 0));
            }
            let len = chunk.len() as u64;
            io.put(&key, chunk, false).await?;
            Ok((true, len))
        });
        Ok(())
    }

    /// Waits for one upload.
    async fn join_one(&mut self) -> Result<(), ObjectWriteError> {
        if let Some(done) = self.uploads.join_next().await {
            let (uploaded, bytes) = done
                .expect("chunk upload panicked")
                .map_err(self.store_err("upload a chunk"))?;
            if uploaded {
                self.stats.uploaded += 1;
                self.stats.uploaded_bytes += bytes;
            } else {
                self.stats.reused += 1;
            }
        }
        Ok(())
    }

    /// Completes the snapshot: waits for the chunks, writes the digest table,
    /// then the manifest (create-only), which makes it visible.
    pub async fn finish(mut self) -> Result<(SnapshotSummary, ChunkStats), ObjectWriteError> {
        OrderError::check_complete(self.spec.size, self.received)?;
        while !self.uploads.is_empty() {
            self.join_one().await?;
        }
        let digests = Bytes::from(std::mem::take(&mut self.digests));
        let digests_id = ChunkId::of(&digests);
        let key = self.keys.digests(&digests_id);
        let have = self
            .io
            .exists(&key)
            .await
            .map_err(self.store_err("check the digests"))?;
        if !have {
            self.io
                .put(&key, digests, false)
                .await
                .map_err(self.store_err("write the digests"))?;
        }
        let manifest = ObjectManifest {
            base: ManifestFile::new(&self.spec, &self.zero_map),
            object_format_version: OBJECT_FORMAT_VERSION,
            chunk_bytes: self.chunk_bytes,
            chunk_hash: ChunkHash::Blake3,
            digests: digests_id,
            chunks: std::mem::take(&mut self.chunks),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        // The create-only PUT below is enforced by stores that honour
        // If-None-Match (Garage 2.5 does not): check the name once more.
        let taken = self
            .io
            .exists(&self.keys.manifest(&self.spec.name))
            .await
            .map_err(self.store_err("check the name"))?;
        if taken {
            return Err(ObjectWriteError::AlreadyExists(self.spec.name.clone()));
        }
        match self
            .io
            .put(&self.keys.manifest(&self.spec.name), json.into(), true)
            .await
        {
            Ok(()) => {}
            Err(ObjectError::AlreadyExists { .. }) => {
                return Err(ObjectWriteError::AlreadyExists(self.spec.name.clone()));
            }
            Err(e) => return Err(self.store_err("write the manifest")(e)),
        }
        let s = self.stats;
        metrics::chunks(s.uploaded, s.reused, s.zero);
        tracing::info!(
            snapshot = %self.spec.name,
            chunks = s.chunks,
            uploaded = s.uploaded,
            reused = s.reused,
            zero = s.zero,
            "snapshot written to the object store"
        );
        Ok((
            SnapshotSummary {
                name: self.spec.name.clone(),
                page_size: self.spec.page_size.bytes(),
                page_count: self.spec.page_count(),
                zero_pages: self.zero_map.count_ones(),
                working_sets: Vec::new(),
                layer: LayerInfo::standalone(self.spec.page_count()),
            },
            s,
        ))
    }
}
