//! [`Mapping`]: one `mmap`ed range, unmapped on drop when owned.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use thiserror::Error;

/// An access outside a mapping.
#[derive(Debug, Error)]
#[error(
    "an access of {len} bytes at offset {offset:#x} falls outside the {size}-byte mapping; \
     check the page index against the region's size"
)]
pub struct OutOfBounds {
    /// Offset asked for.
    pub offset: usize,
    /// Bytes asked for.
    pub len: usize,
    /// Size of the mapping.
    pub size: usize,
}

/// One range of the address space holding guest memory.
///
/// No Rust reference into it is ever handed out: the memory is shared with a guest (and, for
/// `MAP_SHARED` views, with other mappings of the same file), so it is accessed only through raw
/// pointers ([`Mapping::write`], [`Mapping::read`], [`Mapping::as_ptr`]). Concurrent accesses to
/// the same bytes give unspecified contents, never undefined behaviour in this program.
#[derive(Debug)]
pub struct Mapping {
    /// Start address (page-aligned).
    addr: usize,
    /// Length in bytes.
    len: usize,
    /// Whether drop unmaps it (false for a VMM's mapping wrapped by faultline).
    owned: bool,
}

impl Mapping {
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, flags, fd, offset)`.
    pub(crate) fn map(
        len: usize,
        flags: libc::c_int,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
    ) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a new mapping at an address the kernel chooses (NULL hint, no MAP_FIXED), so no
        // existing memory is affected; `fd` is open for the duration of the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.map_or(-1, |fd| fd.as_raw_fd()),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: ptr as usize,
            len,
            owned: true,
        })
    }

    /// Wraps a mapping owned by someone else; drop leaves it alone.
    ///
    /// # Safety
    ///
    /// `addr..addr+len` must be mapped readable and writable for as long as the returned value
    /// (and anything derived from it) lives, and no Rust object may live in it.
    pub(crate) unsafe fn borrowed(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            owned: false,
        }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Start as a pointer, for ioctls and for copying large runs without bounds checks.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for mappings faultline creates).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether drop unmaps it.
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `data` into the mapping at `offset`.
    ///
    /// On a registered mapping this faults and sleeps until the uffd resolves the pages: write
    /// through the fill view (or use COPY), never through a registered mapping from the thread
    /// that serves its faults.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, data.len())?;
        // SAFETY: `offset..offset+len` is inside the mapping, which is mapped read-write for the
        // life of `self`; `data` is a Rust slice and cannot overlap guest memory, in which no
        // Rust object lives.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len());
        }
        Ok(())
    }

    /// Copies bytes at `offset` out of the mapping into `buf` (same caveat as [`Mapping::write`]).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, buf.len())?;
        // SAFETY: as in `write`, with the roles of the two buffers swapped.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }
}

impl Mapping {
    /// Throws away the contents of `offset..offset+len`, so the next access reads zeros:
    /// `MADV_DONTNEED` on a private mapping, `MADV_REMOVE` (punch a hole in the file) on a shared
    /// one, whose pages would otherwise survive in the page cache. The pager uses it to undo an
    /// install that raced with the guest discarding the same page.
    pub fn discard(&self, offset: usize, len: usize, shared: bool) -> io::Result<()> {
        self.check(offset, len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let advice = if shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: the range is inside this mapping (checked above), which holds no Rust object;
        // discarding its contents only changes what the guest will read there next.
        let rc = unsafe { libc::madvise(self.as_ptr().add(offset).cast(), len, advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: this mapping was created by `map` and is unmapped exactly once, here; no
            // reference into it exists (none is ever handed out).
            unsafe { libc::munmap(self.as_ptr().cast(), self.len) };
        }
    }
}
