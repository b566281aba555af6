//! A store in an S3-compatible object store (`--store s3://BUCKET/PREFIX`).
//!
//! Snapshots are content-addressed chunks plus a manifest written last
//! ([`layout`]); every request goes through [`io::ObjectIo`] (retries,
//! counts); page data is read through a bounded [`ChunkCache`] with
//! single-flight misses, so many restores of one snapshot read each chunk
//! from the store once. Servers keep no state of their own: any number of
//! them can serve one prefix.
//!
//! Credentials, region and endpoint come from the usual `AWS_*` environment
//! variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT` for a store other than AWS, `AWS_ALLOW_HTTP=true` for a
//! plain-HTTP local one; requests are path-style unless
//! `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`), read by object_store's
//! `AmazonS3Builder::from_env`.

mod backend;
pub mod disk_cache;
pub mod io;
pub mod layout;
pub mod metrics;
pub mod snapshot;
pub mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use faultline_proto::{
    MANIFEST_FORMAT_VERSION, Manifest, PageBitmap, PageIndex, PageRange, PageSize, SnapshotId,
    WorkingSetName,
};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientConfigKey, ObjectStore, RetryConfig};

pub use disk_cache::DiskCache;
pub use io::{IoCounts, ObjectError, ObjectIo, RetryPolicy};
pub use layout::{CHUNK_BYTES, ChunkId};
pub use snapshot::{ChunkLayout, ObjectSnapshot};
pub use writer::{ChunkStats, ObjectWriteError, ObjectWriter};

use crate::chunk_cache::{CacheCounts, ChunkCache};
use crate::limits::Limits;
use crate::readiness::Probe;
use crate::store::{LayerInfo, RecordError, SnapshotSpec, SnapshotSummary, first_touch_order};
use crate::store::{LocalStore, SnapshotStore};
use layout::{Keys, OBJECT_FORMAT_VERSION, ObjectManifest, chunk_count};
use snapshot::{Cache, WorkingSets};

/// Chunk cache per server unless configured: 1 GiB holds the distinct chunks
/// of a few typical microVM snapshots of one template at once, and is small
/// next to a page server's memory.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// How long one try of a request may take. A 2 MiB chunk takes milliseconds
/// on a LAN and about 10 ms at 2 Gbit/s (1.6 s even at 10 Mbit/s); a try
/// that takes seconds is stuck and is better abandoned and retried, within
/// the read deadline (`io::RETRY_DEADLINE`, 4 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long connecting to the store may take before the try is retried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How old the list of a snapshot's working sets may be before an open
/// lists them again: a working set recorded through another server of the
/// fleet shows up here within this time.
pub const WORKING_SET_REFRESH: Duration = Duration::from_secs(30);

/// Where snapshots are kept: a local directory or an object store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A directory.
    Local(PathBuf),
    /// `s3://BUCKET/PREFIX`.
    S3 {
        /// The bucket.
        bucket: String,
        /// Key prefix inside it, without leading or trailing `/` (may be empty).
        prefix: String,
    },
}

impl FromStr for StoreLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{s:?} names no bucket; use s3://BUCKET/PREFIX"));
            }
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "{scheme}:// stores are not supported; use a directory or s3://BUCKET/PREFIX"
            ));
        }
        if s.is_empty() {
            return Err("the store is empty; give a directory or s3://BUCKET/PREFIX".into());
        }
        Ok(Self::Local(PathBuf::from(s)))
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// A store opened from a [`StoreLocation`].
#[derive(Clone, Debug)]
pub struct OpenedStore {
    /// The store.
    pub store: Arc<dyn SnapshotStore>,
    /// The same store, if it is an object store.
    pub object: Option<Arc<ObjectSnapshotStore>>,
    local: Option<LocalStore>,
}

/// Opening a store failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// The directory could not be created or read.
    #[error("cannot open the snapshot store {path}: {source}")]
    Local {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The object store is not configured right.
    #[error(transparent)]
    Object(#[from] ConnectError),
}

impl StoreLocation {
    /// Opens the store: a directory within `limits`, or an object store
    /// configured from the `AWS_*` environment with `options`. An object
    /// store is not contacted yet (see [`OpenedStore::probe`]).
    pub fn open(
        &self,
        limits: &Limits,
        options: ObjectStoreOptions,
    ) -> Result<OpenedStore, OpenStoreError> {
        self.open_with(limits, options, None)
    }

    /// [`Self::open`], an object store keeping chunks in `disk` too.
    pub fn open_with(
        &self,
        limits: &Limits,
        options: ObjectStoreOptions,
        disk: Option<DiskCache>,
    ) -> Result<OpenedStore, OpenStoreError> {
        match self {
            Self::Local(path) => {
                let local = LocalStore::with_limits(path, limits).map_err(|source| {
                    OpenStoreError::Local {
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok(OpenedStore {
                    store: Arc::new(local.clone()),
                    object: None,
                    local: Some(local),
                })
            }
            Self::S3 { bucket, prefix } => {
                let mut object = ObjectSnapshotStore::from_env(bucket, prefix, options)?;
                if let Some(disk) = disk {
                    object = object.with_disk_cache(disk);
                }
                let object = Arc::new(object);
                Ok(OpenedStore {
                    store: object.clone(),
                    object: Some(object),
                    local: None,
                })
            }
        }
    }
}

impl OpenedStore {
    /// The same store, if it is a local directory (volumes, diff imports and flattening
    /// are local-store features).
    pub fn local(&self) -> Option<&LocalStore> {
        self.local.as_ref()
    }

    /// The readiness probe of this store: one LIST of an object store's
    /// prefix, or reading a directory.
    pub fn probe(&self) -> Probe {
        if let Some(object) = &self.object {
            let object = object.clone();
            return Arc::new(move || {
                let object = object.clone();
                Box::pin(async move { object.ping().await.map_err(|e| e.to_string()) })
            });
        }
        let root = self.local.as_ref().map(|l| l.root().to_owned());
        Arc::new(move || {
            let root = root.clone();
            Box::pin(async move {
                let Some(root) = root else { return Ok(()) };
                tokio::fs::read_dir(&root)
                    .await
                    .map(drop)
                    .map_err(|e| format!("cannot read the snapshot store: {e}"))
            })
        })
    }
}

/// Tuning of an object store.
#[derive(Clone, Copy, Debug)]
pub struct ObjectStoreOptions {
    /// Chunk cache capacity in bytes.
    pub cache_bytes: u64,
    /// How failed requests are retried.
    pub retry: RetryPolicy,
    /// One try's time limit.
    pub request_timeout: Duration,
    /// Snapshots kept open (manifest, digests and chunk table in memory).
    pub max_open_snapshots: usize,
    /// Working sets kept per snapshot.
    pub max_working_sets: usize,
    /// Pages in one working set.
    pub max_working_set_pages: u64,
}

impl Default for ObjectStoreOptions {
    fn default() -> Self {
        Self::with_limits(&Limits::default())
    }
}

impl ObjectStoreOptions {
    /// The defaults, with the server's limits on what it keeps in memory.
    pub fn with_limits(limits: &Limits) -> Self {
        Self {
            cache_bytes: DEFAULT_CACHE_BYTES,
            retry: RetryPolicy::default(),
            request_timeout: REQUEST_TIMEOUT,
            max_open_snapshots: limits.max_open_snapshots,
            max_working_sets: limits.max_working_sets,
            max_working_set_pages: limits.max_working_set_pages,
        }
    }
}

/// Opening an object store failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration (URL, `AWS_*` variables) is not usable.
    #[error("cannot configure the object store s3://{bucket}: {source}; check the AWS_* variables")]
    Config {
        /// The bucket.
        bucket: String,
        /// Why.
        source: object_store::Error,
    },
}

/// Opening an object-store snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectOpenError {
    /// No manifest of that name.
    #[error("snapshot \"{0}\" does not exist; list the snapshots with `faultline-server list`")]
    NotFound(SnapshotId),
    /// Its objects do not agree with each other or with their names.
    #[error("snapshot \"{snapshot}\" is corrupt: {reason}; re-import it")]
    Corrupt {
        /// The snapshot.
        snapshot: SnapshotId,
        /// What does not add up.
        reason: String,
    },
    /// The store failed.
    #[error("cannot read snapshot \"{snapshot}\": {source}")]
    Store {
        /// The snapshot.
        snapshot: SnapshotId,
        /// Why.
        source: ObjectError,
    },
}

/// Snapshots in an object store; see the module docs.
#[derive(Debug)]
pub struct ObjectSnapshotStore {
    io: Arc<ObjectIo>,
    keys: Keys,
    location: String,
    cache: Cache,
    disk: Option<DiskCache>,
    options: ObjectStoreOptions,
    /// Snapshots open, with their last use; at most
    /// `options.max_open_snapshots`, the least recently used dropped first.
    open: Mutex<HashMap<SnapshotId, (Arc<ObjectSnapshot>, u64)>>,
    clock: std::sync::atomic::AtomicU64,
    /// Serializes first opens, so N restores starting at once read a
    /// manifest once.
    opening: tokio::sync::Mutex<()>,
    /// Serializes working-set recordings, so the set kept after concurrent
    /// recordings of this server is the one written last.
    recording: tokio::sync::Mutex<()>,
    /// What the last snapshot written through the store traits cost.
    pub(crate) last_write: Arc<Mutex<Option<(SnapshotId, ChunkStats)>>>,
}

impl ObjectSnapshotStore {
    /// The S3 bucket `bucket` under `prefix`, configured from the `AWS_*`
    /// environment. Makes no request (see [`Self::ping`]).
    pub fn from_env(
        bucket: &str,
        prefix: &str,
        options: ObjectStoreOptions,
    ) -> Result<Self, ConnectError> {
        Self::with_settings(bucket, prefix, std::env::vars(), options)
    }

    /// Like [`Self::from_env`], with the `AWS_*` settings given instead of
    /// read from the environment (what `AmazonS3Builder::from_env` does with
    /// them: names other than `AWS_*` and unknown ones are ignored).
    pub fn with_settings(
        bucket: &str,
        prefix: &str,
        settings: impl IntoIterator<Item = (String, String)>,
        options: ObjectStoreOptions,
    ) -> Result<Self, ConnectError> {
        let mut builder = AmazonS3Builder::new();
        for (key, value) in settings {
            if key.starts_with("AWS_")
                && let Ok(k) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
            {
                builder = builder.with_config(k, value);
            }
        }
        let s3 = builder
            .with_bucket_name(bucket)
            // One retry policy, ours (io.rs), instead of two stacked.
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", options.request_timeout.as_millis()),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", CONNECT_TIMEOUT.as_millis()),
            )
            .build()
            .map_err(|source| ConnectError::Config {
                bucket: bucket.to_owned(),
                source,
            })?;
        Ok(Self::new(
            Arc::new(s3),
            format!("s3://{bucket}/{prefix}"),
            prefix,
            options,
        ))
    }

    /// Snapshots under `prefix` of any object store.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        location: String,
        prefix: &str,
        options: ObjectStoreOptions,
    ) -> Self {
        Self {
            io: Arc::new(io::ObjectIo::new(store, options.retry)),
            keys: Keys::new(prefix),
            location,
            cache: ChunkCache::new(options.cache_bytes),
            disk: None,
            options,
            open: Mutex::new(HashMap::new()),
            clock: std::sync::atomic::AtomicU64::new(0),
            opening: tokio::sync::Mutex::new(()),
            recording: tokio::sync::Mutex::new(()),
            last_write: Arc::new(Mutex::new(None)),
        }
    }

    /// Keeps chunks in `disk` too, below the memory cache.
    pub fn with_disk_cache(mut self, disk: DiskCache) -> Self {
        self.disk = Some(disk);
        self
    }

    /// `s3://BUCKET/PREFIX`, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Requests made so far.
    pub fn io_counts(&self) -> IoCounts {
        self.io.stats()
    }

    /// The chunk cache's counts.
    pub fn cache_counts(&self) -> CacheCounts {
        self.cache.counts()
    }

    /// The chunks of the last snapshot completed through
    /// [`SnapshotStore::create`](crate::store::SnapshotStore::create) (an
    /// import or an upload): what it uploaded and what it found there.
    pub fn last_write(&self) -> Option<(SnapshotId, ChunkStats)> {
        self.last_write.lock().expect("store lock poisoned").clone()
    }

    /// The object store and names, for tools and tests that look at the
    /// objects themselves.
    pub fn io(&self) -> (&Arc<ObjectIo>, &Keys) {
        (&self.io, &self.keys)
    }

    /// Whether the store answers: one LIST of the prefix, not retried
    /// (which fails on a missing bucket or bad credentials too).
    pub async fn ping(&self) -> Result<(), ObjectError> {
        self.io.probe(self.keys.prefix()).await
    }

    /// Every complete snapshot (those whose manifest is written), by name.
    pub async fn list(&self) -> Result<Vec<SnapshotSummary>, ObjectListError> {
        let (dirs, _) = self
            .io
            .list_dir(&self.keys.snapshots())
            .await
            .map_err(ObjectListError::Store)?;
        let mut out = Vec::new();
        for dir in dirs {
            let Some(id) = dir.filename().and_then(|n| SnapshotId::new(n).ok()) else {
                continue;
            };
            if let Some(s) = self.cached(&id) {
                let m = s.manifest();
                out.push(SnapshotSummary {
                    name: id,
                    page_size: m.page_size.bytes(),
                    page_count: m.page_count,
                    zero_pages: m.zero_map.count_ones(),
                    working_sets: m.working_sets.clone(),
                    layer: LayerInfo::standalone(m.page_count),
                });
                continue;
            }
            // Not open: the manifest and the working-set names suffice (the
            // digests and chunk table wait until someone reads it).
            let store_err = |source| ObjectOpenError::Store {
                snapshot: id.clone(),
                source,
            };
            let json = match self.io.get(&self.keys.manifest(&id)).await {
                Ok(j) => j,
                // A folder without a manifest: a snapshot still being
                // written, or abandoned.
                Err(ObjectError::NotFound { .. }) => continue,
                Err(e) => return Err(store_err(e).into()),
            };
            let file: ObjectManifest =
                serde_json::from_slice(&json).map_err(|e| ObjectOpenError::Corrupt {
                    snapshot: id.clone(),
                    reason: format!("manifest.json does not parse: {e}"),
                })?;
            let (_, sets) = self
                .io
                .list_dir(&self.keys.working_sets(&id))
                .await
                .map_err(store_err)?;
            let mut working_sets: Vec<_> = sets
                .iter()
                .filter_map(|k| k.filename().and_then(|n| WorkingSetName::new(n).ok()))
                .collect();
            working_sets.sort();
            out.push(SnapshotSummary {
                name: id,
                page_size: file.base.page_size,
                page_count: file.base.page_count,
                zero_pages: file.base.zero_pages,
                working_sets,
                layer: LayerInfo::standalone(file.base.page_count),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Opens snapshot `id`: its manifest and digests are read once per
    /// server; its working sets are listed again after
    /// [`WORKING_SET_REFRESH`].
    pub async fn open(&self, id: &SnapshotId) -> Result<Arc<ObjectSnapshot>, ObjectOpenError> {
        if let Some(s) = self.cached(id) {
            self.refresh_working_sets(&s);
            return Ok(s);
        }
        let _one = self.opening.lock().await;
        if let Some(s) = self.cached(id) {
            return Ok(s);
        }
        let snapshot = Arc::new(self.load(id).await?);
        let mut open = self.open.lock().expect("store lock poisoned");
        while open.len() >= self.options.max_open_snapshots.max(1) {
            let Some(oldest) = open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            open.remove(&oldest);
        }
        open.insert(id.clone(), (snapshot.clone(), self.tick()));
        Ok(snapshot)
    }

    fn tick(&self) -> u64 {
        self.clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn cached(&self, id: &SnapshotId) -> Option<Arc<ObjectSnapshot>> {
        let tick = self.tick();
        let mut open = self.open.lock().expect("store lock poisoned");
        let (s, used) = open.get_mut(id)?;
        *used = tick;
        Some(s.clone())
    }

    /// Lists the working sets of `s` again, in the background, if the list
    /// is older than [`WORKING_SET_REFRESH`]: an open never waits for it
    /// (during a store outage the old list and the cached chunks serve on).
    fn refresh_working_sets(&self, s: &Arc<ObjectSnapshot>) {
        {
            let mut sets = s.working_sets.write().expect("working set lock poisoned");
            if sets.listed.elapsed() <= WORKING_SET_REFRESH {
                return;
            }
            // Taken: concurrent opens do not start refreshes of their own.
            sets.listed = Instant::now();
        }
        let (io, keys, options, s) = (self.io.clone(), self.keys.clone(), self.options, s.clone());
        tokio::spawn(async move {
            let page_count = s.manifest().page_count;
            match load_working_sets(&io, &keys, &options, &s.id, page_count).await {
                Ok(sets) => s.set_working_sets(sets),
                // The old list serves on: working sets are an optimization.
                Err(e) => tracing::warn!(snapshot = %s.id, "cannot list working sets: {e}"),
            }
        });
    }

    async fn load(&self, id: &SnapshotId) -> Result<ObjectSnapshot, ObjectOpenError> {
        let store_err = |source| ObjectOpenError::Store {
            snapshot: id.clone(),
            source,
        };
        let corrupt = |reason: String| ObjectOpenError::Corrupt {
            snapshot: id.clone(),
            reason,
        };
        let json = match self.io.get(&self.keys.manifest(id)).await {
            Ok(j) => j,
            Err(ObjectError::NotFound { .. }) => return Err(ObjectOpenError::NotFound(id.clone())),
            Err(e) => return Err(store_err(e)),
        };
        let file: ObjectManifest = serde_json::from_slice(&json)
            .map_err(|e| corrupt(format!("manifest.json does not parse: {e}")))?;
        let base = &file.base;
        if base.format_version != MANIFEST_FORMAT_VERSION
            || file.object_format_version != OBJECT_FORMAT_VERSION
        {
            return Err(corrupt(format!(
                "manifest.json has format version {}/{}, this server reads \
                 {MANIFEST_FORMAT_VERSION}/{OBJECT_FORMAT_VERSION}",
                base.format_version, file.object_format_version
            )));
        }
        if &base.name != id {
            return Err(corrupt(format!(
                "manifest.json names snapshot {:?}",
                base.name.as_str()
            )));
        }
        let page_size = PageSize::try_from(base.page_size).map_err(|e| corrupt(e.to_string()))?;
        let size = base.page_count.saturating_mul(page_size.bytes());
        let spec = SnapshotSpec::new(id.clone(), page_size, size, base.regions.clone())
            .map_err(|e| corrupt(e.to_string()))?;
        if file.chunk_bytes == 0 || !file.chunk_bytes.is_multiple_of(page_size.bytes()) {
            return Err(corrupt(format!(
                "chunk size {} is not a multiple of the page size",
                file.chunk_bytes
            )));
        }
        if file.chunks.len() as u64 != chunk_count(size, file.chunk_bytes) {
            return Err(corrupt(format!(
                "{} chunks listed, the image needs {}",
                file.chunks.len(),
                chunk_count(size, file.chunk_bytes)
            )));
        }
        let mut zero_map = PageBitmap::new(base.page_count);
        for &[start, count] in &base.zero_ranges {
            if start
                .checked_add(count)
                .is_none_or(|end| end > base.page_count)
            {
                return Err(corrupt(format!(
                    "zero range {start}+{count} is past the end"
                )));
            }
            zero_map.set_range(start, count);
        }
        // A chunk that is not stored must hold only zero pages, or its
        // pages would be served as zeros.
        let pages_per_chunk = file.chunk_bytes / page_size.bytes();
        for (i, c) in file.chunks.iter().enumerate() {
            let first = i as u64 * pages_per_chunk;
            let end = (first + pages_per_chunk).min(base.page_count);
            if c.is_none() && (first..end).any(|p| !zero_map.get(p)) {
                return Err(corrupt(format!(
                    "chunk {i} is not stored but holds non-zero pages"
                )));
            }
        }
        let digests_key = self.keys.digests(&file.digests);
        let digest_bytes = self.io.get(&digests_key).await.map_err(store_err)?;
        if digest_bytes.len() as u64 != base.page_count * 4
            || ChunkId::of(&digest_bytes) != file.digests
        {
            return Err(corrupt(format!(
                "the digest table {digests_key} does not match its name or the page count"
            )));
        }
        let digests = digest_bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let working_sets =
            load_working_sets(&self.io, &self.keys, &self.options, id, base.page_count)
                .await
                .map_err(store_err)?;
        let mut ws_names: Vec<_> = working_sets.keys().cloned().collect();
        ws_names.sort();
        Ok(ObjectSnapshot {
            id: id.clone(),
            io: self.io.clone(),
            keys: self.keys.clone(),
            cache: self.cache.clone(),
            disk: self.disk.clone(),
            manifest: RwLock::new(Arc::new(Manifest {
                format_version: MANIFEST_FORMAT_VERSION,
                id: id.clone(),
                page_size,
                page_count: base.page_count,
                regions: spec.regions,
                zero_map,
                digest_algorithm: base.digest_algorithm,
                digests,
                working_sets: ws_names,
            })),
            chunk_bytes: file.chunk_bytes,
            chunks: file.chunks,
            working_sets: RwLock::new(WorkingSets {
                sets: working_sets,
                listed: Instant::now(),
            }),
            // No read yet: the first read is not taken for a sequential one.
            last_chunk: std::sync::atomic::AtomicUsize::new(usize::MAX - 1),
        })
    }

    /// Starts writing a new snapshot.
    pub async fn create(&self, spec: SnapshotSpec) -> Result<ObjectWriter, ObjectWriteError> {
        ObjectWriter::create(self.io.clone(), self.keys.clone(), spec).await
    }

    /// Stores a working set of `id`, replacing one of the same name.
    pub async fn record_working_set(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, ObjectRecordError> {
        let listed: u64 = ranges
            .iter()
            .map(PageRange::count)
            .fold(0, u64::saturating_add);
        if listed > self.options.max_working_set_pages {
            return Err(RecordError::TooLarge {
                listed,
                limit: self.options.max_working_set_pages,
            }
            .into());
        }
        let snapshot = self.open(id).await?;
        let order = first_touch_order(ranges, snapshot.manifest().page_count)?;
        let _serial = self.recording.lock().await;
        let manifest = snapshot.manifest();
        let known = &manifest.working_sets;
        if !known.contains(name) && known.len() >= self.options.max_working_sets {
            return Err(RecordError::TooManySets {
                snapshot: id.clone(),
                limit: self.options.max_working_sets,
            }
            .into());
        }
        let bytes: Vec<u8> = order.iter().flat_map(|p| p.0.to_le_bytes()).collect();
        self.io
            .put(&self.keys.working_set(id, name), bytes.into(), false)
            .await
            .map_err(ObjectRecordError::Store)?;
        let pages = order.len() as u64;
        snapshot.add_working_set(name.clone(), order);
        Ok(pages)
    }
}

/// Reads every working set of `id`. One that lists pages past the end is
/// skipped with a warning (it is an order of pages, not data).
async fn load_working_sets(
    io: &ObjectIo,
    keys: &Keys,
    options: &ObjectStoreOptions,
    id: &SnapshotId,
    page_count: u64,
) -> Result<HashMap<WorkingSetName, Arc<Vec<PageIndex>>>, ObjectError> {
    let (_, objects) = io.list_dir(&keys.working_sets(id)).await?;
    let mut sets = HashMap::new();
    for key in objects {
        let Some(name) = key.filename().and_then(|n| WorkingSetName::new(n).ok()) else {
            continue;
        };
        if sets.len() >= options.max_working_sets {
            tracing::warn!(snapshot = %id, "more working sets than --max-working-sets; the rest are ignored");
            break;
        }
        let bytes = match io.get(&key).await {
            Ok(b) => b,
            Err(ObjectError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let pages: Vec<PageIndex> = bytes
            .chunks_exact(8)
            .map(|c| PageIndex(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        if bytes.len() % 8 != 0
            || pages.len() as u64 > options.max_working_set_pages
            || pages.iter().any(|p| p.0 >= page_count)
        {
            tracing::warn!(snapshot = %id, working_set = %name, "working set is malformed or above --max-working-set-pages; ignored");
            continue;
        }
        sets.insert(name, Arc::new(pages));
    }
    Ok(sets)
}

/// Listing an object store failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectListError {
    /// The LIST of the snapshots failed.
    #[error("cannot list the snapshots: {0}")]
    Store(ObjectError),
    /// A snapshot's manifest could not be read.
    #[error(transparent)]
    Open(#[from] ObjectOpenError),
}

/// Recording a working set in an object store failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectRecordError {
    /// The snapshot could not be opened.
    #[error(transparent)]
    Open(#[from] ObjectOpenError),
    /// The ranges are not a valid working set.
    #[error(transparent)]
    Invalid(#[from] RecordError),
    /// Writing it failed.
    #[error("cannot write the working set: {0}")]
    Store(ObjectError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store arguments: s3:// URLs with and without a prefix, directories, and clear refusals.
    #[test]
    fn store_locations() {
        assert_eq!(
            "s3://snaps/fleet/a/".parse(),
            Ok(StoreLocation::S3 {
                bucket: "snaps".into(),
                prefix: "fleet/a".into()
            })
        );
        assert_eq!(
            "s3://snaps".parse(),
            Ok(StoreLocation::S3 {
                bucket: "snaps".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            "/var/lib/faultline".parse(),
            Ok(StoreLocation::Local("/var/lib/faultline".into()))
        );
        assert!("s3:///x".parse::<StoreLocation>().is_err());
        let gs = "gs://b/p".parse::<StoreLocation>().unwrap_err();
        assert!(gs.contains("not supported"), "{gs}");
    }
}
