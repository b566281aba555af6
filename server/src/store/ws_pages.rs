//! A working set's pages in its first-touch order, one after another in a
//! file of their own (`wspages-WSNAME` beside `workingset-WSNAME`), so that
//! replaying the set reads one file front to back instead of the image
//! scattered.
//!
//! Why: a working set is mostly one-page runs spread over the image, and a
//! scattered 4 KiB read from the page cache costs about twice a sequential
//! one here (tmpfs, pinned: 1.85 µs against 0.90 µs a page read 256 KiB at
//! a time; docs/BENCHMARKS.md, "Session 8"). Every replayed page is read
//! once per restore, by the server (TCP) or by the client (page file), so
//! that difference is paid per page of every replay. Recording the set
//! copies its pages once. This is the layout REAP (Ustiugov et al.,
//! ASPLOS '21) gives a function's working set.
//!
//! Layout: the set's non-zero pages, in its order, each `page_size` bytes
//! (zero pages take no room: the manifest says which they are), then a
//! [`TRAILER_BYTES`] trailer tying the file to its order file:
//!
//! ```text
//! magic "FLWSPG01" | CRC32C of workingset-WSNAME's bytes (u32 LE) | 0u32
//!   | pages (u64 LE) | page size (u64 LE)
//! ```
//!
//! The file is an optimisation, never the truth: a set whose file is
//! missing, torn, or of another order (a crash between the two renames, a
//! store from before this file existed) is served from the image as before,
//! and a failure to write it does not fail the recording. Every page read
//! from it is still checked against the manifest's digest by the client.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use faultline_proto::{Manifest, PageIndex, WorkingSetName};

/// Prefix of a working set's page file (not `workingset-`: names after
/// that prefix are working sets).
pub const WORKING_SET_PAGES_PREFIX: &str = "wspages-";

const MAGIC: [u8; 8] = *b"FLWSPG01";

/// Bytes of the trailer after the pages.
pub const TRAILER_BYTES: u64 = 32;

/// Buffer of the writer: large enough that writing a set costs a few
/// system calls per MiB.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// The non-zero pages of `order`: those the file holds, in its order.
pub fn data_pages<'a>(
    order: &'a [PageIndex],
    manifest: &'a Manifest,
) -> impl Iterator<Item = PageIndex> + 'a {
    order
        .iter()
        .copied()
        .filter(|p| !manifest.zero_map.get(p.0))
}

fn trailer(order_bytes: &[u8], pages: u64, page_size: u64) -> [u8; TRAILER_BYTES as usize] {
    let mut t = [0u8; TRAILER_BYTES as usize];
    t[..8].copy_from_slice(&MAGIC);
    t[8..12].copy_from_slice(&crc32c::crc32c(order_bytes).to_le_bytes());
    t[16..24].copy_from_slice(&pages.to_le_bytes());
    t[24..32].copy_from_slice(&page_size.to_le_bytes());
    t
}

/// Writes the page file of the set whose order file holds `order_bytes`
/// (`order` decoded) to `tmp`, reading its pages from `memory`, then
/// renames it to `WORKING_SET_PAGES_PREFIX + name` in `dir`. The caller
/// removes `tmp` on failure.
pub fn write(
    dir: &Path,
    tmp: &Path,
    name: &WorkingSetName,
    order: &[PageIndex],
    order_bytes: &[u8],
    manifest: &Manifest,
    memory: &File,
) -> std::io::Result<()> {
    let ps = manifest.page_size.bytes();
    let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, File::create(tmp)?);
    let mut page = vec![0u8; ps as usize];
    let mut pages = 0u64;
    for p in data_pages(order, manifest) {
        memory.read_exact_at(&mut page, p.0 * ps)?;
        out.write_all(&page)?;
        pages += 1;
    }
    out.write_all(&trailer(order_bytes, pages, ps))?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(tmp, dir.join(format!("{WORKING_SET_PAGES_PREFIX}{name}")))
}

/// Opens the page file of set `name` if there is one that matches the
/// order file's `order_bytes` (`order` decoded); `None` otherwise (logged
/// when a file is there but does not match).
pub fn open(
    dir: &Path,
    name: &WorkingSetName,
    order: &[PageIndex],
    order_bytes: &[u8],
    manifest: &Manifest,
) -> Option<File> {
    let file = File::open(dir.join(format!("{WORKING_SET_PAGES_PREFIX}{name}"))).ok()?;
    let ps = manifest.page_size.bytes();
    let pages = data_pages(order, manifest).count() as u64;
    let len = file.metadata().ok()?.len();
    let mut found = [0u8; TRAILER_BYTES as usize];
    let matches = len == pages * ps + TRAILER_BYTES
        && file.read_exact_at(&mut found, pages * ps).is_ok()
        && found == trailer(order_bytes, pages, ps);
    if !matches {
        tracing::warn!(
            snapshot = %manifest.id,
            "the page file of working set {name} does not match its order (a crash while \
             recording?); the set is read from the image until it is recorded again"
        );
        return None;
    }
    Some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trailer ties the file to one order: another order's bytes, page
    /// count or page size give another trailer.
    #[test]
    fn trailer_names_its_order() {
        let t = trailer(b"abcdefgh", 3, 4096);
        assert_eq!(&t[..8], b"FLWSPG01");
        assert_ne!(t, trailer(b"abcdefgi", 3, 4096));
        assert_ne!(t, trailer(b"abcdefgh", 4, 4096));
        assert_ne!(t, trailer(b"abcdefgh", 3, 2 << 20));
    }
}
