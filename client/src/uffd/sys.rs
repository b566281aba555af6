//! The userfaultfd calls the `userfaultfd` crate does not provide, declared in one place.
//!
//! The crate (0.9, feature `linux5_13`) covers REGISTER (with the raw `ioctls` mask), UNREGISTER,
//! WAKE, COPY, CONTINUE and reading messages. What is here, and why:
//! - the `userfaultfd(2)` syscall and `/dev/userfaultfd`'s `USERFAULTFD_IOC_NEW`: the crate's
//!   builder tries the device first, falls back to the syscall only when the device is absent,
//!   and does the `UFFDIO_API` handshake itself without reporting the features the kernel has;
//! - `UFFDIO_API`: to learn and request features;
//! - `UFFDIO_ZEROPAGE`: the crate's version drops the number of bytes zeroed when the kernel
//!   stops part-way (EAGAIN), which the caller needs to resume;
//! - `UFFDIO_POISON` (Linux 6.6): not in the crate;
//! - `UFFDIO_COPY` with `UFFDIO_COPY_MODE_WP` (the crate's copy has no mode argument) and
//!   `UFFDIO_WRITEPROTECT`: far memory's dirty tracking;
//! - `PAGEMAP_SCAN` (Linux 6.7), an ioctl on `/proc/self/pagemap`: the written bits that
//!   `UFFD_FEATURE_WP_ASYNC` keeps, measured against synchronous WP faults.
//!
//! Layouts follow `include/uapi/linux/userfaultfd.h`; the size of each struct is part of its
//! ioctl number, and the unit tests check both against the header's values.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`: the only API version there is.
pub(crate) const UFFD_API: u64 = 0xaa;
/// The ioctl type byte of userfaultfd (`UFFDIO`).
const UFFDIO: u32 = 0xaa;
/// `_UFFDIO_*` numbers.
const NR_COPY: u32 = 0x03;
const NR_ZEROPAGE: u32 = 0x04;
const NR_WRITEPROTECT: u32 = 0x06;
const NR_POISON: u32 = 0x08;
const NR_API: u32 = 0x3f;

/// `UFFDIO_ZEROPAGE_MODE_DONTWAKE` / `UFFDIO_POISON_MODE_DONTWAKE`: both are bit 0.
pub(crate) const MODE_DONTWAKE: u64 = 1;
/// `UFFDIO_COPY_MODE_DONTWAKE`.
pub(crate) const COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_WP`: the copied pages are mapped write-protected.
pub(crate) const COPY_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (absent: unprotect, which also wakes unless DONTWAKE).
pub(crate) const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub(crate) const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `_IOC(dir, type, nr, size)` as in `include/uapi/asm-generic/ioctl.h`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    // The size field is 14 bits wide; every struct here is far smaller.
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}
const IOC_READ_WRITE: u32 = 3;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_zeropage`; `zeropage` is bytes zeroed or a negated errno.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffdio_poison`; `updated` is bytes poisoned or a negated errno.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioPoison {
    pub range: UffdioRange,
    pub mode: u64,
    pub updated: i64,
}

/// `struct uffdio_copy`; `copy` is bytes copied or a negated errno.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct pm_scan_arg` (`include/uapi/linux/fs.h`).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`: `start..end` whose pages all have `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The `PAGE_IS_*` bits (of the scan's return mask) every page here has.
    pub categories: u64,
}

/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported (async WP: re-arm tracking).
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail unless the range is registered with WP_ASYNC.
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected (async WP).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;

const UFFDIO_COPY: u32 = ioc(IOC_READ_WRITE, UFFDIO, NR_COPY, size_of::<UffdioCopy>());
const UFFDIO_WRITEPROTECT: u32 = ioc(
    IOC_READ_WRITE,
    UFFDIO,
    NR_WRITEPROTECT,
    size_of::<UffdioWriteprotect>(),
);
/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u32 = ioc(IOC_READ_WRITE, b'f' as u32, 16, size_of::<PmScanArg>());

const UFFDIO_API: u32 = ioc(IOC_READ_WRITE, UFFDIO, NR_API, size_of::<UffdioApi>());
const UFFDIO_ZEROPAGE: u32 = ioc(
    IOC_READ_WRITE,
    UFFDIO,
    NR_ZEROPAGE,
    size_of::<UffdioZeropage>(),
);
const UFFDIO_POISON: u32 = ioc(IOC_READ_WRITE, UFFDIO, NR_POISON, size_of::<UffdioPoison>());
/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)` on `/dev/userfaultfd`; its argument is the same
/// flags word as the syscall's.
const USERFAULTFD_IOC_NEW: u32 = ioc(0, UFFDIO, 0x00, 0);

/// `UFFD_USER_MODE_ONLY`: never passed (KVM's faults on guest memory are kernel-mode faults and
/// would not be reported), named here so that the reason is findable.
#[allow(dead_code)]
pub(crate) const UFFD_USER_MODE_ONLY: i32 = 1;

/// Turns `-1` into the thread's errno.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Makes a new userfaultfd with the `userfaultfd(2)` syscall.
pub(crate) fn userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes one integer and returns a new fd or -1; no memory is passed.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::c_long::from(flags)) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes a new userfaultfd through `/dev/userfaultfd` (Linux 6.1+), whose access is governed by
/// the device's file permissions instead of `vm.unprivileged_userfaultfd`.
pub(crate) fn userfaultfd_from_device(flags: i32) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument (not a pointer) and
    // returns a new fd or -1; `dev` is an open file for the duration of the call.
    let fd = check(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as _,
            libc::c_long::from(flags),
        )
    })?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API`: asks for `features`, returns the kernel's answer (features granted, or offered
/// when `features` is 0, and the fd-wide ioctls). Allowed once per fd.
pub(crate) fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `api` is a live, correctly laid out `struct uffdio_api` that the kernel reads and
    // writes for the duration of the call; the request number encodes its size.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &raw mut api) })?;
    Ok(api)
}

/// `UFFDIO_ZEROPAGE`. Returns the ioctl's result and the `zeropage` field, which holds the bytes
/// done (possibly short of `len` on EAGAIN) or a negated errno.
pub(crate) fn zeropage(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    mode: u64,
) -> (io::Result<()>, i64) {
    let mut arg = UffdioZeropage {
        range: UffdioRange { start, len },
        mode,
        zeropage: 0,
    };
    // SAFETY: `arg` is a live `struct uffdio_zeropage` the kernel reads and writes during the
    // call. The kernel maps zero pages only into ranges registered on this uffd and only where no
    // page is present, so no memory the program can already see changes.
    let ret = check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &raw mut arg) });
    (ret.map(drop), arg.zeropage)
}

/// `UFFDIO_POISON`. Returns the ioctl's result and the `updated` field (bytes done or a negated
/// errno).
pub(crate) fn poison(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> (io::Result<()>, i64) {
    let mut arg = UffdioPoison {
        range: UffdioRange { start, len },
        mode,
        updated: 0,
    };
    // SAFETY: `arg` is a live `struct uffdio_poison` the kernel reads and writes during the
    // call. Poison markers go only into ranges registered on this uffd where no page is present.
    let ret = check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_POISON as _, &raw mut arg) });
    (ret.map(drop), arg.updated)
}

/// `UFFDIO_COPY` with `mode` (DONTWAKE, WP). Returns the ioctl's result and the `copy` field.
///
/// # Safety
///
/// `src..src+len` must be readable memory of this process for the duration of the call.
pub(crate) unsafe fn copy(
    fd: BorrowedFd<'_>,
    dst: u64,
    src: *const u8,
    len: u64,
    mode: u64,
) -> (io::Result<()>, i64) {
    let mut arg = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode,
        copy: 0,
    };
    // SAFETY: `arg` is a live `struct uffdio_copy`; the caller vouches for `src`. The kernel
    // writes only into pages of ranges registered on this uffd where no page is present.
    let ret = check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, &raw mut arg) });
    (ret.map(drop), arg.copy)
}

/// `UFFDIO_WRITEPROTECT` of `start..start+len` with `mode`.
pub(crate) fn writeprotect(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut arg = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode,
    };
    // SAFETY: `arg` is a live `struct uffdio_writeprotect` the kernel reads during the call;
    // changing protection of registered ranges changes no byte of memory.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &raw mut arg) }).map(drop)
}

/// `PAGEMAP_SCAN` on an open `/proc/self/pagemap`: fills `out` with regions of
/// `start..end` whose pages have every category of `mask`, reports `return_mask` of their
/// categories, and with `wp` write-protects them again. Returns the regions filled and where
/// the walk stopped.
pub(crate) fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    mask: u64,
    return_mask: u64,
    wp: bool,
    out: &mut [PageRegion],
) -> io::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: size_of::<PmScanArg>() as u64,
        flags: if wp {
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        } else {
            0
        },
        start,
        end,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.len() as u64,
        category_mask: mask,
        return_mask,
        ..PmScanArg::default()
    };
    // SAFETY: `arg` is a live `struct pm_scan_arg` and `vec` points at `out`, `vec_len` entries
    // of `struct page_region` the kernel writes during the call.
    let n = check(unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &raw mut arg) })?;
    Ok((n as usize, arg.walk_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers match `linux/userfaultfd.h` (values from the C header on 6.18).
    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }
}
