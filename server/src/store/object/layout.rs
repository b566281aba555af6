//! Where a snapshot's objects live under the store's prefix, and the manifest
//! that ties them together (docs/store.md).
//!
//! ```text
//! PREFIX/
//!   chunks/HASH                     page data: one aligned chunk of an image,
//!                                   named by the BLAKE3 of its bytes; shared
//!                                   by every snapshot that holds those bytes
//!   digests/HASH                    a snapshot's per-page CRC32C table, named
//!                                   by its BLAKE3
//!   snapshots/NAME/manifest.json    written last: the snapshot exists once it
//!                                   does; lists the chunks in image order
//!   snapshots/NAME/workingsets/WS   a recorded working set (u64 LE indices)
//! ```
//!
//! Chunks and digests are immutable and content-addressed: a name says what
//! the bytes are, so a reader checks them, and two snapshots of one template
//! share the chunks that did not change. A manifest is written once (create
//! only). A working set is replaced whole by one PUT: a reader sees the old
//! or the new one, never a mix, and a working set is an order of pages, not
//! their content.

use std::fmt;
use std::str::FromStr;

use faultline_proto::{PageSize, SnapshotId, WorkingSetName};
use object_store::path::Path;

use crate::store::local::ManifestFile;

/// Bytes of image per chunk for new snapshots (each snapshot's manifest says
/// its own). Measured against Garage on loopback (`server/examples/
/// chunk_size.rs`, table in docs/store.md): a cold demand fault waits for a
/// whole chunk, 2.4-3.5 ms at 2 MiB against 4.6-7.5 ms at 4 MiB; a child of a
/// template with 0.5% of its pages changed in 64 KiB runs uploads 17% of its
/// image at 2 MiB, 31% at 4 MiB; 4 MiB moved 1.3-1.5x the bytes per second of
/// a cold sequential restore with 4 GETs in flight, which more GETs in flight
/// recover at any chunk size, while latency and dedup are fixed by it. Below
/// 1 MiB a request's fixed cost halves throughput. 2 MiB is also one huge
/// page.
pub const CHUNK_BYTES: u64 = 2 << 20;

/// The manifest's format version for object-store snapshots.
pub const OBJECT_FORMAT_VERSION: u32 = 1;

/// A BLAKE3 hash naming a chunk or a digest table.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl FromStr for ChunkId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a BLAKE3 hash (64 hex digits)");
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How chunks are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkHash {
    /// BLAKE3-256, hex.
    Blake3,
}

/// `snapshots/NAME/manifest.json`: the local store's manifest plus where the
/// page data and digests are.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ObjectManifest {
    /// Name, layout, page size, zero pages (as in a local store).
    #[serde(flatten)]
    pub base: ManifestFile,
    /// [`OBJECT_FORMAT_VERSION`].
    pub object_format_version: u32,
    /// Bytes of image per chunk; a multiple of the page size. The last chunk
    /// holds what is left.
    pub chunk_bytes: u64,
    /// How chunks and the digest table are named.
    pub chunk_hash: ChunkHash,
    /// The digest table's object: one little-endian CRC32C per page.
    pub digests: ChunkId,
    /// The chunks in image order; `null` for a chunk whose pages are all
    /// zero (never stored).
    pub chunks: Vec<Option<ChunkId>>,
}

/// The chunk size for a snapshot of `page_size` pages: [`CHUNK_BYTES`], or
/// one page if pages are larger.
pub fn chunk_bytes_for(page_size: PageSize) -> u64 {
    CHUNK_BYTES.max(page_size.bytes())
}

/// Number of chunks of `chunk_bytes` in an image of `image_bytes`.
pub fn chunk_count(image_bytes: u64, chunk_bytes: u64) -> u64 {
    image_bytes.div_ceil(chunk_bytes)
}

/// Object names under a store's prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: Path,
}

impl Keys {
    /// Names under `prefix` (may be empty: the bucket's root).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: Path::from(prefix),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    fn join(&self, parts: &[&str]) -> Path {
        let mut p = self.prefix.clone();
        for part in parts {
            p = p.clone().join(*part);
        }
        p
    }

    /// A chunk's object.
    pub fn chunk(&self, id: &ChunkId) -> Path {
        self.join(&["chunks", &id.to_string()])
    }

    /// A digest table's object.
    pub fn digests(&self, id: &ChunkId) -> Path {
        self.join(&["digests", &id.to_string()])
    }

    /// The folder of all snapshots.
    pub fn snapshots(&self) -> Path {
        self.join(&["snapshots"])
    }

    /// A snapshot's manifest.
    pub fn manifest(&self, name: &SnapshotId) -> Path {
        self.join(&["snapshots", name.as_str(), "manifest.json"])
    }

    /// The folder of a snapshot's working sets.
    pub fn working_sets(&self, name: &SnapshotId) -> Path {
        self.join(&["snapshots", name.as_str(), "workingsets"])
    }

    /// One working set.
    pub fn working_set(&self, name: &SnapshotId, ws: &WorkingSetName) -> Path {
        self.join(&["snapshots", name.as_str(), "workingsets", ws.as_str()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk ids print as 64 hex digits and parse back; anything else is refused.
    #[test]
    fn chunk_id_round_trip() {
        let id = ChunkId::of(b"page data");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkId>(), Ok(id));
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!("g".repeat(64).parse::<ChunkId>().is_err());
        let json = serde_json::to_string(&Some(id)).unwrap();
        assert_eq!(
            serde_json::from_str::<Option<ChunkId>>(&json).unwrap(),
            Some(id)
        );
    }

    /// Keys sit under the prefix, snapshots apart from the shared chunks.
    #[test]
    fn keys() {
        let k = Keys::new("fleet/a");
        let name = SnapshotId::new("vm-1").unwrap();
        let id = ChunkId::of(b"x");
        assert_eq!(k.chunk(&id).as_ref(), format!("fleet/a/chunks/{id}"));
        assert_eq!(
            k.manifest(&name).as_ref(),
            "fleet/a/snapshots/vm-1/manifest.json"
        );
        let ws = WorkingSetName::new("boot").unwrap();
        assert_eq!(
            k.working_set(&name, &ws).as_ref(),
            "fleet/a/snapshots/vm-1/workingsets/boot"
        );
        assert_eq!(Keys::new("").snapshots().as_ref(), "snapshots");
    }

    /// Huge pages get chunks of at least one page.
    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_bytes_for(PageSize::Size4K), CHUNK_BYTES);
        assert!(chunk_bytes_for(PageSize::Size2M) >= 2 << 20);
        assert_eq!(chunk_count(5 << 20, 2 << 20), 3);
    }
}
