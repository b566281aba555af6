//! Writing a new snapshot in one pass over its image.
//!
//! Import (from a file) and upload (`CreateSnapshot`) both feed the image,
//! in order, into a [`SnapshotWriter`]. For each page it records whether the
//! page is all zeros and its digest; non-zero pages are written to the sparse
//! `memory` file, zero pages stay holes. Everything is written under a
//! temporary name in the store and renamed into place by
//! [`SnapshotWriter::finish`], so a partial snapshot is never visible; a writer
//! dropped before that removes its files.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use faultline_proto::PageBitmap;
use faultline_proto::model::DigestAlgorithm;

use super::local::{DIGESTS_FILE, MANIFEST_FILE, MEMORY_FILE, ManifestFile};
use super::{CreateError, OrderError, SnapshotSpec, SnapshotSummary};

/// Distinguishes temporary directories of concurrent writers in one process.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Prefix of a snapshot directory still being written. Such directories are
/// never listed or opened.
pub const TMP_PREFIX: &str = ".tmp-";

/// A snapshot being written; see the module docs.
#[derive(Debug)]
pub struct SnapshotWriter {
    spec: SnapshotSpec,
    /// Where the files are written.
    tmp: PathBuf,
    /// Where they go when complete.
    dest: PathBuf,
    /// The sparse image.
    memory: File,
    /// One little-endian CRC32C per page, in page order.
    digests: BufWriter<File>,
    zero_map: PageBitmap,
    /// Bytes of the image received so far.
    received: u64,
    /// The start of a page whose end has not arrived yet.
    partial: Vec<u8>,
    /// Set by `finish`: the directory is no longer ours to remove.
    committed: bool,
    /// Free bytes to leave on the disk.
    min_free_disk_bytes: u64,
}

impl SnapshotWriter {
    /// Starts writing `spec` into a temporary directory of `root`, to be
    /// renamed to `root/<name>` when complete.
    /// Refuses to start if the disk has less than `min_free_disk_bytes`
    /// free, and later writes that would eat into that reserve.
    pub(crate) fn create(
        root: PathBuf,
        spec: SnapshotSpec,
        min_free_disk_bytes: u64,
    ) -> Result<Self, CreateError> {
        let dest = root.join(spec.name.as_str());
        if dest.exists() {
            return Err(CreateError::AlreadyExists(spec.name));
        }
        check_free(&root, 0, min_free_disk_bytes).map_err(|e| match e {
            Ok(full) => full,
            Err(source) => CreateError::Io {
                snapshot: spec.name.clone(),
                stage: "check the store's free space",
                source,
            },
        })?;
        let tmp = root.join(format!(
            "{TMP_PREFIX}{}-{}-{}",
            spec.name,
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |stage| {
            let name = spec.name.clone();
            move |source| CreateError::Io {
                snapshot: name,
                stage,
                source,
            }
        };
        std::fs::create_dir_all(&tmp).map_err(io("create the snapshot directory"))?;
        // From here on, `Drop` removes `tmp` on any failure.
        let open = |name: &str| File::create(tmp.join(name));
        let (memory, digests) = match (open(MEMORY_FILE), open(DIGESTS_FILE)) {
            (Ok(m), Ok(d)) => (m, d),
            (Err(e), _) | (_, Err(e)) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(io("create the image files")(e));
            }
        };
        let page_count = spec.page_count();
        Ok(Self {
            zero_map: PageBitmap::new(page_count),
            partial: Vec::with_capacity(spec.page_size.bytes_usize()),
            digests: BufWriter::with_capacity(1 << 20, digests),
            spec,
            tmp,
            dest,
            memory,
            received: 0,
            committed: false,
            min_free_disk_bytes,
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

    /// Appends `data`, which must start at byte `offset` of the image (the
    /// number of bytes received so far).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), CreateError> {
        OrderError::check_offset(self.received, offset)?;
        self.write(data)
    }

    /// Appends `data` to the image.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), CreateError> {
        OrderError::check_room(self.spec.size, self.received, data.len())?;
        check_free(&self.tmp, data.len() as u64, self.min_free_disk_bytes).map_err(|e| {
            e.unwrap_or_else(|source| self.io("check the store's free space", source))
        })?;
        let ps = self.spec.page_size.bytes_usize();
        if !self.partial.is_empty() {
            let take = (ps - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.received += take as u64;
            if self.partial.len() == ps {
                let page = std::mem::take(&mut self.partial);
                self.pages(self.received - ps as u64, &page)?;
                self.partial = page;
                self.partial.clear();
            }
        }
        let whole = data.len() / ps * ps;
        if whole > 0 {
            self.pages(self.received, &data[..whole])?;
            self.received += whole as u64;
        }
        self.partial.extend_from_slice(&data[whole..]);
        self.received += (data.len() - whole) as u64;
        Ok(())
    }

    /// Records whole pages starting at byte `offset`: digests, zero map, and
    /// the non-zero runs written to the image in one write each.
    fn pages(&mut self, offset: u64, data: &[u8]) -> Result<(), CreateError> {
        let ps = self.spec.page_size.bytes_usize();
        let first = offset / ps as u64;
        let mut run_start: Option<usize> = None;
        for (i, page) in data.chunks_exact(ps).enumerate() {
            let digest = DigestAlgorithm::Crc32c.digest(page);
            self.digests
                .write_all(&digest.to_le_bytes())
                .map_err(|e| self.io("write digests", e))?;
            if is_zero(page) {
                self.zero_map.set(first + i as u64);
                if let Some(s) = run_start.take() {
                    self.write_run(offset, s, &data[s * ps..i * ps])?;
                }
            } else if run_start.is_none() {
                run_start = Some(i);
            }
        }
        if let Some(s) = run_start {
            self.write_run(offset, s, &data[s * ps..])?;
        }
        Ok(())
    }

    fn write_run(&self, offset: u64, page: usize, bytes: &[u8]) -> Result<(), CreateError> {
        let at = offset + (page * self.spec.page_size.bytes_usize()) as u64;
        self.memory
            .write_all_at(bytes, at)
            .map_err(|e| self.io("write the image", e))
    }

    fn io(&self, stage: &'static str, source: std::io::Error) -> CreateError {
        CreateError::Io {
            snapshot: self.spec.name.clone(),
            stage,
            source,
        }
    }

    /// Completes the snapshot: checks that the whole image arrived, writes
    /// the manifest, makes everything durable and renames the directory into
    /// place.
    pub fn finish(mut self) -> Result<SnapshotSummary, CreateError> {
        OrderError::check_complete(self.spec.size, self.received)?;
        // Trailing zero pages are holes too: extend the file to its full size.
        self.memory
            .set_len(self.spec.size)
            .map_err(|e| self.io("size the image", e))?;
        self.memory
            .sync_all()
            .map_err(|e| self.io("sync the image", e))?;
        self.digests
            .flush()
            .and_then(|()| self.digests.get_ref().sync_all())
            .map_err(|e| self.io("sync the digests", e))?;
        let manifest = ManifestFile::new(&self.spec, &self.zero_map);
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let path = self.tmp.join(MANIFEST_FILE);
        File::create(&path)
            .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()))
            .map_err(|e| self.io("write the manifest", e))?;
        // rename(2) of a directory onto an existing non-empty one fails, so a
        // concurrent writer of the same name cannot be overwritten.
        if self.dest.exists() {
            return Err(CreateError::AlreadyExists(self.spec.name.clone()));
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) {
                CreateError::AlreadyExists(self.spec.name.clone())
            } else {
                self.io("move the snapshot into place", e)
            }
        })?;
        self.committed = true;
        if let Some(root) = self.dest.parent() {
            // Make the rename durable; failure here only risks the rename
            // being lost in a crash, which leaves no partial snapshot.
            let _ = File::open(root).and_then(|d| d.sync_all());
        }
        Ok(SnapshotSummary {
            name: self.spec.name.clone(),
            page_size: self.spec.page_size.bytes(),
            page_count: self.spec.page_count(),
            zero_pages: self.zero_map.count_ones(),
            working_sets: Vec::new(),
            layer: super::LayerInfo::standalone(self.spec.page_count()),
        })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Checks that writing `more` bytes under `dir` leaves `reserve` bytes
/// free: `Err(Ok(DiskFull))` if not, `Err(Err(io))` if the file system
/// cannot say.
fn check_free(
    dir: &Path,
    more: u64,
    reserve: u64,
) -> Result<(), Result<CreateError, std::io::Error>> {
    if reserve == 0 {
        return Ok(());
    }
    let free = free_bytes(dir).map_err(Err)?;
    if free < reserve.saturating_add(more) {
        return Err(Ok(CreateError::DiskFull { free, reserve }));
    }
    Ok(())
}

/// Bytes available to unprivileged writers on the file system of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st`
    // points to writable memory of the size of a `statvfs`, which the call
    // fills on success.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether `page` is all zeros. Folding 64-byte blocks lets the compiler use
/// wide vector loads; an early exit per byte would not vectorize.
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The zero test finds a single set byte anywhere in a page.
    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[100] = 0x80;
        assert!(!is_zero(&page));
    }
}
