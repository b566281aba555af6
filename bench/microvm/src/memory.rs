//! Memory the harness reads and writes: its own anonymous mappings ([`AnonMemory`]), views of
//! memory mapped by someone else ([`HostView`]), and raw memory files or byte slices
//! ([`GuestBytes`]).
//!
//! The harness hands out no Rust reference into guest memory: the vCPU (through KVM) and, on
//! lazily filled memory, the kernel write it behind the program's back. The host copies bytes
//! in and out through raw pointers, and only while no vCPU runs on that memory.

use std::io;
use std::marker::PhantomData;

use thiserror::Error;

use crate::vmm::GuestRam;

/// An access outside a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "an access of {len} bytes at offset {offset:#x} falls outside the {size}-byte memory; is \
     this the memory the image was built for?"
)]
pub struct OutOfRange {
    /// Offset asked for.
    pub offset: usize,
    /// Bytes asked for.
    pub len: usize,
    /// Size of the memory.
    pub size: usize,
}

/// Guest memory the host can read: a raw memory file's bytes, or a mapping that is not (or no
/// longer) registered with a userfaultfd.
pub trait GuestBytes {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Copies the bytes at guest address `gpa` into `buf`; false when out of range.
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> bool;
}

impl GuestBytes for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Ok(start) = usize::try_from(gpa) else {
            return false;
        };
        match self.get(start..start.saturating_add(buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

/// The host's view of a mapping of guest memory, borrowed for `'a`: bounds-checked copies in and
/// out, never a reference.
#[derive(Debug, Clone, Copy)]
pub struct HostView<'a> {
    /// Start of the mapping.
    addr: usize,
    /// Its length.
    len: usize,
    /// Ties the mapping's validity to `'a`.
    _memory: PhantomData<&'a ()>,
}

impl HostView<'_> {
    /// The `len` bytes mapped at `addr`.
    ///
    /// # Safety
    ///
    /// `addr..addr+len` must be mapped readable and writable for as long as the view (and any
    /// copy of it) lives, and no Rust object may live in it. Reads and writes through the view
    /// fault like any access: on a range registered with a userfaultfd they wait for its
    /// handler, so use a fill view (a second mapping of the same file) there.
    pub unsafe fn new(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            _memory: PhantomData,
        }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8, OutOfRange> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok((self.addr + offset) as *mut u8),
            _ => Err(OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `data` into the memory at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfRange> {
        let dst = self.check(offset, data.len())?;
        // SAFETY: `dst..dst+len` is inside the mapping (checked), which `new`'s contract keeps
        // mapped read-write while the view lives; `data` is a Rust slice, so it cannot overlap
        // guest memory, in which no Rust object lives.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies the bytes at `offset` into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let src = self.check(offset, buf.len())?;
        // SAFETY: as in `write`, with the roles of the two buffers swapped.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

impl GuestBytes for HostView<'_> {
    fn size(&self) -> u64 {
        self.len as u64
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> bool {
        usize::try_from(gpa).is_ok_and(|offset| self.read(offset, buf).is_ok())
    }
}

/// Private anonymous memory of the harness's own (zero-filled, allocated on first touch),
/// unmapped on drop: where [`create_snapshot`](crate::create_snapshot) builds and runs the
/// original VM, and memory for tests.
#[derive(Debug)]
pub struct AnonMemory {
    /// Start of the mapping.
    addr: usize,
    /// Its length.
    len: usize,
}

impl AnonMemory {
    /// Maps `len` bytes (`MAP_NORESERVE`: a large slot costs only the pages a guest touches).
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "guest memory of 0 bytes",
            ));
        }
        // SAFETY: a new mapping at an address the kernel picks (NULL hint, no MAP_FIXED), so no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: ptr as usize,
            len,
        })
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host's view of it.
    pub fn view(&self) -> HostView<'_> {
        // SAFETY: this mapping is ours, read-write, unmapped only when `self` drops, which the
        // view's borrow of `self` prevents while it lives; it holds no Rust object.
        unsafe { HostView::new(self.addr, self.len) }
    }

    /// It as the slot of a [`MicroVm`](crate::MicroVm).
    pub fn ram(&self) -> GuestRam<'_> {
        // SAFETY: as in `view`: page-aligned (mmap's result), read-write, mapped while the
        // borrow lasts, no Rust object in it.
        unsafe { GuestRam::host(self.addr, self.len) }
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping, made in `new`, unmapped once, here; every view and slot of it
        // borrowed `self` and is gone, and no Rust object lives in it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fresh memory reads zeros, writes read back, and accesses past the end are refused.
    #[test]
    fn anonymous_memory_reads_back_and_checks_bounds() {
        let memory = AnonMemory::new(2 << 20).unwrap();
        let view = memory.view();
        let mut buf = [0xffu8; 16];
        view.read(4096, &mut buf).unwrap();
        assert_eq!(buf, [0; 16]);
        view.write(4096, b"faultline").unwrap();
        view.read(4096, &mut buf[..9]).unwrap();
        assert_eq!(&buf[..9], b"faultline");
        let err = view.write((2 << 20) - 4, &[0; 8]).unwrap_err();
        assert_eq!(
            err,
            OutOfRange {
                offset: (2 << 20) - 4,
                len: 8,
                size: 2 << 20
            }
        );
        assert!(!view.read_at(u64::MAX, &mut buf));
        assert!(AnonMemory::new(0).is_err());
    }
}
