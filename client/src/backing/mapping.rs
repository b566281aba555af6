//! [`Mapping`]: one range of guest memory: `mmap`ed here (unmapped on drop), borrowed from an
//! embedding VMM, or mapped in another process (only its addresses are known here).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use thiserror::Error;

/// Largest access copied with volatile word accesses; larger ones are one `memcpy`. The same
/// split as vm-memory's `copy_slice`: a volatile access must not be torn or elided, which a
/// word-sized volatile load or store guarantees; a large copy is an opaque call to `memcpy`,
/// which the compiler can neither elide nor merge with other accesses, and a word-by-word
/// volatile loop would make installing a 1 MiB batch several times slower.
const VOLATILE_MAX: usize = std::mem::size_of::<usize>();

/// An access to a mapping that cannot be done.
#[derive(Debug, Error)]
pub enum AccessError {
    /// Outside the mapping.
    #[error(
        "an access of {len} bytes at offset {offset:#x} falls outside the {size}-byte mapping; \
         check the page index against the region's size"
    )]
    OutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Bytes asked for.
        len: usize,
        /// Size of the mapping.
        size: usize,
    },
    /// The memory is mapped in another process: its addresses mean nothing here.
    #[error(
        "the memory at {addr:#x}+{len:#x} is mapped in another process (it came with a peer's \
         uffd); it can only be filled through that uffd, never read or written from here"
    )]
    InPeer {
        /// Start address, in the other process.
        addr: usize,
        /// Length.
        len: usize,
    },
}

/// Who owns the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Mapped by faultline; unmapped on drop.
    Owned,
    /// A mapping of this process owned by someone else (a VMM); left alone on drop.
    Borrowed,
    /// A mapping in another process (Firecracker's guest memory): no access from here.
    Peer,
}

/// One range of the address space holding guest memory.
///
/// No Rust reference into it is ever handed out: the memory is shared with a guest (and, for
/// `MAP_SHARED` views, with other mappings of the same file) that writes it concurrently, so it
/// is accessed only through raw pointers ([`Mapping::write`], [`Mapping::read`],
/// [`Mapping::as_ptr`]), word-sized accesses volatile (see [`VOLATILE_MAX`]). Concurrent
/// accesses to the same bytes give unspecified contents, never undefined behaviour in this
/// program. A mapping of another process ([`Mapping::in_peer`]) refuses every access.
#[derive(Debug)]
pub struct Mapping {
    /// Start address (page-aligned).
    addr: usize,
    /// Length in bytes.
    len: usize,
    /// Whether drop unmaps it, and whether it is in this address space.
    place: Place,
}

/// Copies `len` bytes from `src` to `dst`: volatile word accesses up to [`VOLATILE_MAX`] bytes,
/// else one `memcpy` (see [`VOLATILE_MAX`] for why that is what vm-memory does too).
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges must
/// not overlap.
unsafe fn copy_guest(dst: *mut u8, src: *const u8, len: usize) {
    if len > VOLATILE_MAX {
        // SAFETY: valid, non-overlapping ranges of `len` bytes (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        return;
    }
    let mut done = 0;
    while done < len {
        let (s, d) = (src as usize + done, dst as usize + done);
        let left = len - done;
        // The widest access both addresses are aligned for and that fits.
        let width = [8usize, 4, 2, 1]
            .into_iter()
            .find(|&w| w <= left && s % w == 0 && d % w == 0)
            .unwrap_or(1);
        // SAFETY: `s..s+width` and `d..d+width` lie inside the caller's valid ranges, aligned
        // for the integer type used; every bit pattern is a valid integer.
        unsafe {
            match width {
                8 => std::ptr::write_volatile(
                    d as *mut u64,
                    std::ptr::read_volatile(s as *const u64),
                ),
                4 => std::ptr::write_volatile(
                    d as *mut u32,
                    std::ptr::read_volatile(s as *const u32),
                ),
                2 => std::ptr::write_volatile(
                    d as *mut u16,
                    std::ptr::read_volatile(s as *const u16),
                ),
                _ => {
                    std::ptr::write_volatile(d as *mut u8, std::ptr::read_volatile(s as *const u8))
                }
            }
        }
        done += width;
    }
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
            place: Place::Owned,
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
            place: Place::Borrowed,
        }
    }

    /// Names a range mapped in another process: only its addresses, for uffd ioctls on that
    /// process's uffd. Every access ([`Mapping::read`], [`Mapping::write`],
    /// [`Mapping::discard`]) fails with [`AccessError::InPeer`]; drop leaves it alone.
    pub(crate) fn in_peer(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            place: Place::Peer,
        }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Start as a pointer, for ioctls and for copying large runs without bounds checks. For a
    /// mapping in another process ([`Mapping::is_in_peer`]) it points at nothing of this one.
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
        self.place == Place::Owned
    }

    /// Whether the range is mapped in another process (no access from here).
    pub fn is_in_peer(&self) -> bool {
        self.place == Place::Peer
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), AccessError> {
        if self.place == Place::Peer {
            return Err(AccessError::InPeer {
                addr: self.addr,
                len: self.len,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(AccessError::OutOfBounds {
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
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), AccessError> {
        self.check(offset, data.len())?;
        // SAFETY: `offset..offset+len` is inside the mapping, which is in this address space
        // (checked) and mapped read-write for the life of `self`; `data` is a Rust slice and
        // cannot overlap guest memory, in which no Rust object lives.
        unsafe { copy_guest(self.as_ptr().add(offset), data.as_ptr(), data.len()) };
        Ok(())
    }

    /// Copies bytes at `offset` out of the mapping into `buf` (same caveat as [`Mapping::write`]).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), AccessError> {
        self.check(offset, buf.len())?;
        // SAFETY: as in `write`, with the roles of the two buffers swapped.
        unsafe { copy_guest(buf.as_mut_ptr(), self.as_ptr().add(offset), buf.len()) };
        Ok(())
    }
}

impl Mapping {
    /// Throws away the contents of `offset..offset+len`, so the next access reads zeros:
    /// `MADV_DONTNEED` on a private mapping, `MADV_REMOVE` (punch a hole in the file) on a shared
    /// one, whose pages would otherwise survive in the page cache. The pager uses it to undo an
    /// install that raced with the guest discarding the same page.
    pub fn discard(&self, offset: usize, len: usize, shared: bool) -> io::Result<()> {
        self.check(offset, len).map_err(io::Error::other)?;
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
        if self.place == Place::Owned {
            // SAFETY: this mapping was created by `map` and is unmapped exactly once, here; no
            // reference into it exists (none is ever handed out).
            unsafe { libc::munmap(self.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small and large copies, aligned or not, move exactly the bytes asked for.
    #[test]
    fn copies_of_every_size_and_alignment() {
        let m = Mapping::map(8192, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0).unwrap();
        for len in [1usize, 2, 3, 7, 8, 9, 100, 4096] {
            for off in [0usize, 1, 3, 8] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + off) as u8).collect();
                m.write(off, &data).unwrap();
                let mut back = vec![0u8; len];
                m.read(off, &mut back).unwrap();
                assert_eq!(back, data, "len {len} at offset {off}");
            }
        }
    }

    /// A mapping in another process refuses every access, and is never unmapped.
    #[test]
    fn peer_mapping_refuses_access() {
        let m = Mapping::in_peer(0x7000_0000_0000, 4096);
        assert!(matches!(m.write(0, b"x"), Err(AccessError::InPeer { .. })));
        assert!(matches!(
            m.read(0, &mut [0u8; 1]),
            Err(AccessError::InPeer { .. })
        ));
        assert!(m.discard(0, 4096, false).is_err());
        assert!(m.is_in_peer() && !m.is_owned());
    }
}
