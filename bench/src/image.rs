//! Synthetic guest memory images, written to a file.

use std::io::Write;
use std::path::Path;

use faultline_microvm::pattern::fill_page;

/// Pages generated per write.
const CHUNK_PAGES: usize = 2048;

/// An image size must be a positive multiple of 4096.
fn check_size(size: u64) -> std::io::Result<()> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("size {size} is not a positive multiple of 4096"),
        ));
    }
    Ok(())
}

/// Writes an image of `size` bytes (a multiple of 4096) with `seed` to `out`.
/// Page content follows [`faultline_microvm::pattern::page_kind`] (the micro-VM's pages
/// and the server tests' synthetic images are the same): about 40%
/// zero pages in runs, 30% text, 30% random.
pub fn write_image(out: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    check_size(size)?;
    let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(out)?);
    let pages = size / 4096;
    let mut buf = vec![0u8; CHUNK_PAGES * 4096];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(CHUNK_PAGES as u64) as usize;
        for (i, p) in buf[..n * 4096].chunks_mut(4096).enumerate() {
            fill_page(seed, page + i as u64, p);
        }
        file.write_all(&buf[..n * 4096])?;
        page += n as u64;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Writes an image of `size` bytes (a multiple of 4096) of random bytes
/// (xorshift from `seed`): incompressible, no zero pages.
pub fn write_random_image(out: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    write_random_then_zero_image(out, size, size, seed)
}

/// Writes an image of `size` bytes (a multiple of 4096) whose first `random`
/// bytes are random (as [`write_random_image`]) and the rest zeros: the
/// issue's restore image, 1.5 GiB random and 0.5 GiB zero of 2 GiB.
pub fn write_random_then_zero_image(
    out: &Path,
    size: u64,
    random: u64,
    seed: u64,
) -> std::io::Result<()> {
    check_size(size)?;
    let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(out)?);
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut buf = vec![0u8; CHUNK_PAGES * 4096];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let written = size - left;
        for (i, word) in buf[..n].chunks_mut(8).enumerate() {
            if written + (i * 8) as u64 >= random {
                word.fill(0);
                continue;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The restore image is random up to the given byte and zeros after it.
    #[test]
    fn random_then_zero_image_is_random_then_zero() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("img");
        write_random_then_zero_image(&path, 64 << 10, 48 << 10, 3).expect("writing the image");
        let bytes = std::fs::read(&path).expect("reading it back");
        assert_eq!(bytes.len(), 64 << 10);
        assert!(bytes[48 << 10..].iter().all(|&b| b == 0));
        // Every 4 KiB page of the random part has content.
        assert!(
            bytes[..48 << 10]
                .chunks(4096)
                .all(|p| p.iter().any(|&b| b != 0))
        );
        // The random part is what write_random_image writes.
        let full = dir.path().join("full");
        write_random_image(&full, 64 << 10, 3).expect("writing the random image");
        assert_eq!(
            bytes[..48 << 10],
            std::fs::read(&full).expect("reading")[..48 << 10]
        );
    }
}
