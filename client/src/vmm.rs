//! rust-vmm adapter (feature `vm-memory`): pager [`Region`]s from a
//! [`vm_memory::GuestMemoryMmap`].
//!
//! Each region of the guest memory becomes one [`Region`] wrapping the VMM's mapping (never
//! taking it over): anonymous regions as [`BackingKind::Anonymous`], memfd-backed regions as
//! shmem or hugetlb (from the file system the fd lives on), with the fd and its offset so the
//! pager can fill them through a second mapping and `UFFDIO_CONTINUE`. A region's place in the
//! snapshot is its guest physical address by default ([`regions_from_guest_memory`]), or
//! whatever a caller's function says ([`regions_from_guest_memory_with`]).
//!
//! ```no_run
//! use faultline_client::pager::{Pager, PagerConfig};
//! use faultline_client::vmm::regions_from_guest_memory;
//! use faultline_proto::SnapshotId;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let guest: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
//!     (GuestAddress(0), 512 << 20),
//!     (GuestAddress(1 << 32), 512 << 20),
//! ])?;
//! // SAFETY: `guest` outlives the pager, and no Rust object lives in guest memory.
//! let regions = unsafe { regions_from_guest_memory(&guest) }?;
//! let config = PagerConfig::new("http://127.0.0.1:7070", SnapshotId::new("vm1")?);
//! let pager = Pager::start(config, regions)?; // blocking: call it before the vCPUs run
//! // ... run the vCPUs; the pager fills memory as they touch it ...
//! # drop(pager);
//! # Ok(())
//! # }
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use thiserror::Error;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::backing::{
    BackingError, BackingKind, ExternalMemory, GuestMemory, HUGE_PAGE_SIZE, base_page_size,
};
use crate::pager::Region;

/// `f_type` of a hugetlbfs file (memfd created with `MFD_HUGETLB` included).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
/// `f_type` of a tmpfs / shmem file (a plain memfd).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Building pager regions from a `GuestMemoryMmap` failed.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The region is anonymous hugetlb memory (`MAP_HUGETLB` without a file).
    #[error(
        "guest region {region} at {gpa:#x} is anonymous hugetlb memory, which faultline cannot \
         fill through a second mapping; back it with memfd_create(MFD_HUGETLB) instead"
    )]
    AnonymousHugetlb {
        /// Region index.
        region: usize,
        /// Its guest physical address.
        gpa: u64,
    },
    /// The region's file system could not be asked (`fstatfs`).
    #[error(
        "guest region {region} at {gpa:#x}: cannot inspect its backing file (fstatfs): {source}"
    )]
    Inspect {
        /// Region index.
        region: usize,
        /// Its guest physical address.
        gpa: u64,
        /// The kernel's error.
        source: io::Error,
    },
    /// The region maps a file that is neither a memfd nor on hugetlbfs.
    #[error(
        "guest region {region} at {gpa:#x} maps a file on a file system faultline cannot fill \
         (f_type {f_type:#x}); back guest memory with anonymous memory or a memfd"
    )]
    UnsupportedFile {
        /// Region index.
        region: usize,
        /// Its guest physical address.
        gpa: u64,
        /// The file system's magic number.
        f_type: i64,
    },
    /// Wrapping the mapping failed.
    #[error("guest region {region} at {gpa:#x}: {source}")]
    Memory {
        /// Region index.
        region: usize,
        /// Its guest physical address.
        gpa: u64,
        /// Why.
        source: BackingError,
    },
}

/// Pager regions for every region of `guest`, each at snapshot offset = its guest physical
/// address (the layout of a flat memory image with holes).
///
/// # Safety
///
/// `guest` must outlive the returned regions and any pager started with them, and no Rust object
/// may live in guest memory: the pager registers it with userfaultfd and installs pages there.
pub unsafe fn regions_from_guest_memory<B: Bitmap>(
    guest: &GuestMemoryMmap<B>,
) -> Result<Vec<Region>, VmmError> {
    // SAFETY: the caller's guarantees are passed on unchanged.
    unsafe { regions_from_guest_memory_with(guest, |gpa, _len| gpa.0) }
}

/// Like [`regions_from_guest_memory`], with each region's snapshot offset given by
/// `offset_of(guest physical address, length)` (for images laid out without holes, say).
///
/// # Safety
///
/// As for [`regions_from_guest_memory`].
pub unsafe fn regions_from_guest_memory_with<B: Bitmap>(
    guest: &GuestMemoryMmap<B>,
    mut offset_of: impl FnMut(GuestAddress, u64) -> u64,
) -> Result<Vec<Region>, VmmError> {
    let mut out = Vec::with_capacity(guest.num_regions());
    for (index, r) in guest.iter().enumerate() {
        let gpa = r.start_addr().0;
        let len = r.len();
        let (kind, fd, fd_offset) = match r.file_offset() {
            None if r.is_hugetlbfs() == Some(true) => {
                return Err(VmmError::AnonymousHugetlb { region: index, gpa });
            }
            None => (BackingKind::Anonymous, None, 0),
            Some(file) => {
                let kind = file_kind(file.file().as_fd(), index, gpa)?;
                (kind, Some(file.file().as_fd()), file.start())
            }
        };
        let page_size = match kind {
            BackingKind::Hugetlb => HUGE_PAGE_SIZE,
            _ => base_page_size(),
        };
        let external = ExternalMemory {
            addr: r.as_ptr() as usize,
            len: len as usize,
            kind,
            page_size,
            fd,
            fd_offset,
        };
        // SAFETY: the mapping belongs to `guest`, which the caller keeps alive for as long as
        // the region (and its pager) lives, holding no Rust object; `fd` is the file it maps,
        // at `fd_offset`.
        let memory =
            unsafe { GuestMemory::from_external(external) }.map_err(|source| VmmError::Memory {
                region: index,
                gpa,
                source,
            })?;
        out.push(Region {
            memory,
            snapshot_offset: offset_of(r.start_addr(), len),
        });
    }
    Ok(out)
}

/// Shmem or hugetlb, from the file system the fd lives on.
fn file_kind(
    fd: std::os::fd::BorrowedFd<'_>,
    region: usize,
    gpa: u64,
) -> Result<BackingKind, VmmError> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes one `statfs` into the buffer we pass, which is large enough; the fd
    // is open for the call.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(VmmError::Inspect {
            region,
            gpa,
            source: io::Error::last_os_error(),
        });
    }
    // `f_type` is an i64 on x86-64 but narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    // SAFETY: fstatfs succeeded, so it initialised the whole struct.
    let f_type = unsafe { st.assume_init() }.f_type as i64;
    match f_type {
        HUGETLBFS_MAGIC => Ok(BackingKind::Hugetlb),
        TMPFS_MAGIC => Ok(BackingKind::Shmem),
        _ => Err(VmmError::UnsupportedFile {
            region,
            gpa,
            f_type,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use vm_memory::{FileOffset, GuestMemoryMmap};

    use super::*;

    /// Two anonymous regions become two anonymous pager regions at their guest addresses (or
    /// where the mapping function puts them), wrapping the VMM's own mappings.
    #[test]
    fn anonymous_regions() {
        let guest: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 128 << 10),
        ])
        .expect("guest memory");
        // SAFETY: `guest` outlives `regions`; nothing registers or fills them here.
        let regions = unsafe { regions_from_guest_memory(&guest) }.expect("regions");
        assert_eq!(regions.len(), 2);
        for (region, r) in regions.iter().zip(guest.iter()) {
            assert_eq!(region.memory.kind(), BackingKind::Anonymous);
            assert_eq!(region.memory.host_addr(), r.as_ptr() as usize);
            assert_eq!(region.memory.len() as u64, r.len());
            assert_eq!(region.snapshot_offset, r.start_addr().0);
            assert!(region.memory.fd().is_none());
        }
        assert_eq!(regions[1].snapshot_offset, 1 << 20);

        // Packed without holes: the second region right after the first.
        let mut next = 0;
        // SAFETY: as above.
        let packed = unsafe {
            regions_from_guest_memory_with(&guest, |_, len| {
                let at = next;
                next += len;
                at
            })
        }
        .expect("regions");
        assert_eq!(packed[1].snapshot_offset, 64 << 10);
    }

    /// A memfd-backed region is shmem, with its fd and offset.
    #[test]
    fn memfd_region() {
        // SAFETY: the name is NUL-terminated; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"vmm-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: the kernel just gave us this fd; the File owns it from here.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(2 << 20).expect("size the memfd");
        let guest: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(1 << 30),
            1 << 20,
            Some(FileOffset::new(file, 1 << 20)),
        )])
        .expect("guest memory");
        // SAFETY: `guest` outlives `regions`; nothing registers or fills them here.
        let regions = unsafe { regions_from_guest_memory(&guest) }.expect("regions");
        assert_eq!(regions[0].memory.kind(), BackingKind::Shmem);
        assert_eq!(regions[0].memory.fd_offset(), 1 << 20);
        assert!(regions[0].memory.fill_view().is_some());
        assert_eq!(regions[0].snapshot_offset, 1 << 30);
    }
}
