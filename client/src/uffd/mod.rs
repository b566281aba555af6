//! userfaultfd: the only place in this crate that issues userfaultfd calls.
//!
//! [`Uffd`] owns one userfaultfd (closed on drop, which also unregisters every range). It is
//! opened with [`Uffd::open`]: the `userfaultfd(2)` syscall without `UFFD_USER_MODE_ONLY`
//! (faults raised by KVM on guest memory are kernel-mode faults), falling back to
//! `/dev/userfaultfd` when the syscall is refused, then a `UFFDIO_API` handshake that asks for
//! [`Features::FAULTLINE`] minus whatever the kernel does not offer.
//!
//! Registering a range ([`Uffd::register`]) returns the [`ResolveOps`] the kernel allows on it;
//! that answer, not the kernel version, decides how faults are resolved (see
//! [`crate::strategy`]). Resolve operations return [`ResolveError::Exists`] when another path
//! won a race and [`ResolveError::Again`] when a memory-map event must be read first.
//!
//! Most calls go through the `userfaultfd` crate; the private `sys` module holds the few it lacks.

mod error;
mod event;
mod flags;
mod sys;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;
use std::{fmt, io};

use serde::Serialize;

pub use error::{
    OpenError, ReadError, RegisterError, ResolveError, ResolveOp, UnregisterError, WaitError,
};
pub use event::{Event, EventBuffer, FaultKind, Readable, Readiness, StopSignal, readable};
pub use flags::{Features, RegisterModes, ResolveOps};
pub use sys::{PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PageRegion};

/// Flags for every uffd faultline opens: close on exec, and non-blocking, because `poll(2)` on a
/// blocking uffd reports POLLERR and a pager thread must be able to wait on its uffd and a stop
/// signal together. Never `UFFD_USER_MODE_ONLY` (see [`sys::UFFD_USER_MODE_ONLY`]).
const OPEN_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK;

/// How a uffd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpenedVia {
    /// The `userfaultfd(2)` syscall.
    Syscall,
    /// `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW`.
    Device,
    /// Received from another process (Firecracker's UFFD handshake).
    Peer,
}

impl fmt::Display for OpenedVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syscall => "the userfaultfd(2) syscall",
            Self::Device => "/dev/userfaultfd",
            Self::Peer => "another process (received over a Unix socket)",
        })
    }
}

/// What to ask of `UFFDIO_API`.
#[derive(Debug, Clone, Copy)]
pub struct UffdOptions {
    /// Features to request where the kernel offers them.
    pub wanted: Features,
    /// Features without which opening fails.
    pub required: Features,
}

impl Default for UffdOptions {
    fn default() -> Self {
        Self {
            wanted: Features::FAULTLINE,
            required: Features::empty(),
        }
    }
}

/// Creates a bare userfaultfd (no handshake): the syscall, then `/dev/userfaultfd` if the
/// syscall is refused (EPERM: `vm.unprivileged_userfaultfd = 0` and no CAP_SYS_PTRACE).
fn create_fd() -> Result<(OwnedFd, OpenedVia), OpenError> {
    match sys::userfaultfd(OPEN_FLAGS) {
        Ok(fd) => Ok((fd, OpenedVia::Syscall)),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Err(OpenError::NotSupported),
        Err(syscall) if syscall.raw_os_error() == Some(libc::EPERM) => {
            match sys::userfaultfd_from_device(OPEN_FLAGS) {
                Ok(fd) => Ok((fd, OpenedVia::Device)),
                Err(device) => Err(OpenError::NotPermitted { syscall, device }),
            }
        }
        Err(e) => Err(OpenError::Create(e)),
    }
}

/// Asks the kernel which features it offers, on a throwaway uffd: `UFFDIO_API` may be done only
/// once per fd, so the real fd cannot first ask and then request.
pub fn offered_features() -> Result<(Features, OpenedVia), OpenError> {
    let (fd, via) = create_fd()?;
    let answer = sys::api(fd.as_fd(), 0).map_err(|source| OpenError::Handshake {
        stage: "querying the features the kernel offers",
        requested: Features::empty(),
        source,
    })?;
    Ok((Features::from_bits(answer.features), via))
}

/// One userfaultfd, owned; closing it (on drop) unregisters all its ranges and wakes any thread
/// still waiting on them, whose fault is then handled as if no uffd existed: missing anonymous
/// pages read as zeros, missing shmem pages as holes. Close it only once every page is filled
/// (or poisoned): a pager that ends early poisons what it has not filled first, and keeps the
/// fd open for good if it cannot.
///
/// All methods take `&self`; share it between a fault thread and installers with `Arc`.
///
/// Drop order matters: while a range is registered on a uffd that has `EVENT_UNMAP`, `munmap` of
/// that range sleeps until someone reads the UNMAP message. Drop the `Uffd` (or unregister) before
/// unmapping its memory, or keep a reader running.
#[derive(Debug)]
pub struct Uffd {
    /// The fd, owned through the `userfaultfd` crate's type.
    inner: userfaultfd::Uffd,
    /// Features granted by the handshake.
    features: Features,
    /// Features the kernel offered.
    offered: Features,
    /// How the fd was obtained.
    via: OpenedVia,
}

impl Uffd {
    /// Opens a uffd with [`UffdOptions::default`].
    pub fn open() -> Result<Self, OpenError> {
        Self::open_with(UffdOptions::default())
    }

    /// Opens a uffd and requests `options.wanted` ∩ what the kernel offers.
    pub fn open_with(options: UffdOptions) -> Result<Self, OpenError> {
        let (offered, _) = offered_features()?;
        let missing = options.required.difference(offered);
        if !missing.is_empty() {
            return Err(OpenError::MissingFeatures { missing, offered });
        }
        let requested = options.wanted.intersection(offered) | options.required;
        let (fd, via) = create_fd()?;
        // On success the kernel writes back everything it supports, not what it enabled; what is
        // enabled is exactly what was requested.
        sys::api(fd.as_fd(), requested.bits()).map_err(|source| OpenError::Handshake {
            stage: "requesting features",
            requested,
            source,
        })?;
        // SAFETY: `fd` is an open uffd we own; ownership moves into the crate's type, which closes
        // it on drop.
        let inner = unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) };
        Ok(Self {
            inner,
            features: requested,
            offered,
            via,
        })
    }

    /// Takes over a uffd created, handshaken and registered by another process (Firecracker
    /// sends its guest memory's uffd over a Unix socket). `features` are the ones that process
    /// requested, as far as the caller knows (Firecracker requests `EVENT_REMOVE`); they only
    /// decide how messages are decoded. The fd is made non-blocking, which the fault loop needs.
    ///
    /// Resolve operations on the result act on the memory of the process that created the uffd,
    /// at addresses of *that* process: when it exits they fail with ESRCH
    /// ([`ResolveError::is_owner_gone`]), which ends the pager serving it and nothing else.
    ///
    /// # Safety
    ///
    /// `fd` must be a userfaultfd on which the `UFFDIO_API` handshake was done (check it with
    /// `fstat` or `/proc/self/fdinfo` before trusting a peer's word), and every range registered
    /// on it must be memory in which no Rust object of this process lives: another process's
    /// memory (Firecracker's guest memory), or guest memory of this process registered for
    /// that purpose. COPY, ZEROPAGE, CONTINUE and POISON through the returned value install
    /// content in those ranges behind the compiler's back, and a uffd created by this process
    /// could have registered any of its memory.
    pub unsafe fn from_peer(fd: OwnedFd, features: Features) -> Result<Self, OpenError> {
        let raw = fd.as_raw_fd();
        // SAFETY: F_GETFL on an fd we own only reads its status flags.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: F_SETFL on an fd we own only changes its status flags.
        let set =
            flags >= 0 && unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } >= 0;
        if !set {
            return Err(OpenError::Handshake {
                stage: "making the peer's uffd non-blocking",
                requested: features,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is an open uffd we own; ownership moves into the crate's type, which closes
        // it on drop.
        let inner = unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) };
        Ok(Self {
            inner,
            features,
            offered: features,
            via: OpenedVia::Peer,
        })
    }

    /// Features this uffd was granted.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Features the kernel offered.
    pub fn offered_features(&self) -> Features {
        self.offered
    }

    /// How this uffd was obtained.
    pub fn opened_via(&self) -> OpenedVia {
        self.via
    }

    /// Registers `start..start+len` for `modes` faults and returns the resolve operations the
    /// kernel allows there.
    ///
    /// EINVAL ([`RegisterError::Unsupported`]) is the kernel's way of saying "not on this kind
    /// of memory" (MINOR on anonymous memory; anything on guest_memfd in Linux 6.18) as well as
    /// "misaligned".
    ///
    /// # Safety
    ///
    /// The range must be memory the caller controls that no Rust object lives in (guest
    /// memory): after registration, threads touching a page that is not present sleep until it
    /// is resolved, and the resolve operations of this uffd may then install content there.
    pub unsafe fn register(
        &self,
        start: usize,
        len: usize,
        modes: RegisterModes,
    ) -> Result<ResolveOps, RegisterError> {
        let mode = userfaultfd::RegisterMode::from_bits_retain(modes.bits());
        match self.inner.register_with_mode(start as *mut _, len, mode) {
            Ok(ioctls) => Ok(ResolveOps::from_bits(ioctls.bits())),
            Err(err) => {
                let source = crate_errno(err);
                if source.raw_os_error() == Some(libc::EINVAL) {
                    Err(RegisterError::Unsupported { start, len, modes })
                } else {
                    Err(RegisterError::Failed {
                        start,
                        len,
                        modes,
                        source,
                    })
                }
            }
        }
    }

    /// Unregisters `start..start+len`; threads still waiting there are woken and retry the fault
    /// without the uffd.
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), UnregisterError> {
        self.inner
            .unregister(start as *mut _, len)
            .map_err(|err| UnregisterError {
                start,
                len,
                source: crate_errno(err),
            })
    }

    /// `UFFDIO_COPY`: atomically copies `src` into the missing pages at `dst` (aligned to the
    /// range's page size, 2 MiB for hugetlbfs, and `src.len()` a multiple of it) and, unless
    /// `dontwake`, wakes the threads waiting there. Returns `src.len()`.
    ///
    /// On a partial copy the kernel reports EAGAIN with the bytes done, whatever stopped it:
    /// a pending memory-map event, or the next page being present (a retry of the rest then
    /// reports EEXIST). Copying into a page that another path installed first fails with EEXIST.
    pub fn copy(&self, dst: usize, src: &[u8], dontwake: bool) -> Result<usize, ResolveError> {
        let len = src.len();
        // SAFETY: `src` is a live slice of `len` bytes, read by the kernel during the call. The
        // kernel writes only into pages of ranges registered with userfaultfd, and only where no
        // page is present (else EEXIST); `register`'s contract makes those guest memory.
        let result = unsafe {
            self.inner
                .copy(src.as_ptr().cast(), dst as *mut _, len, !dontwake)
        };
        match result {
            Ok(n) if n == len => Ok(n),
            // The kernel never returns success with a short count; treat it as EAGAIN anyway.
            Ok(n) => Err(ResolveError::Again {
                op: ResolveOp::Copy,
                addr: dst,
                len,
                done: n,
            }),
            // The crate turns EAGAIN into `PartiallyCopied(copy.copy as usize)`, but when nothing
            // was copied (`mmap_changing`: a REMOVE/UNMAP/REMAP message is unread) `copy.copy` is
            // -EAGAIN, which the cast turns into a huge count; `from_kernel` clamps it to 0.
            Err(userfaultfd::Error::PartiallyCopied(n)) => Err(ResolveError::from_kernel(
                ResolveOp::Copy,
                dst,
                len,
                libc::EAGAIN,
                i64::try_from(n).unwrap_or(-1),
            )),
            Err(err) => {
                let errno = crate_errno(err).raw_os_error().unwrap_or(libc::EIO);
                Err(ResolveError::from_kernel(
                    ResolveOp::Copy,
                    dst,
                    len,
                    errno,
                    -1,
                ))
            }
        }
    }

    /// `UFFDIO_ZEROPAGE`: maps zero pages at `dst..dst+len` and, unless `dontwake`, wakes the
    /// waiters. Returns `len`.
    ///
    /// hugetlbfs ranges do not advertise ZEROPAGE (EINVAL): resolve their zero pages with
    /// [`Uffd::copy`] from a zero buffer, or by CONTINUE after the page cache was filled.
    pub fn zeropage(&self, dst: usize, len: usize, dontwake: bool) -> Result<usize, ResolveError> {
        let mode = if dontwake { sys::MODE_DONTWAKE } else { 0 };
        let (result, done) = sys::zeropage(self.as_fd(), dst as u64, len as u64, mode);
        finish(ResolveOp::Zeropage, dst, len, result, done)
    }

    /// `UFFDIO_CONTINUE`: maps the pages the page cache already holds at `start..start+len`
    /// (filled through the fill view, see [`crate::backing`]) and, unless `dontwake`, wakes the
    /// waiters. Needs a MINOR registration. Returns `len`.
    ///
    /// Always resolve a shmem fault by CONTINUE on the faulting mapping after filling, rather
    /// than filling and only waking: the PTE of the registered mapping is not installed by a
    /// write through another mapping, and where shmem transparent huge pages are on, one 4 KiB
    /// fill can allocate a whole 2 MiB folio.
    pub fn continue_(
        &self,
        start: usize,
        len: usize,
        dontwake: bool,
    ) -> Result<usize, ResolveError> {
        match self.inner.r#continue(start as *mut _, len, !dontwake) {
            Ok(n) if n == len as u64 => Ok(len),
            // The crate returns Ok with the short count when the kernel answered EAGAIN after
            // mapping part of the range.
            Ok(n) => Err(ResolveError::Again {
                op: ResolveOp::Continue,
                addr: start,
                len,
                done: usize::try_from(n).unwrap_or(0).min(len),
            }),
            Err(err) => {
                let errno = crate_errno(err).raw_os_error().unwrap_or(libc::EIO);
                Err(ResolveError::from_kernel(
                    ResolveOp::Continue,
                    start,
                    len,
                    errno,
                    -1,
                ))
            }
        }
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on `start..start+len`, after operations done with
    /// `dontwake` (one wake for a batch) or after [`ResolveError::Exists`].
    pub fn wake(&self, start: usize, len: usize) -> Result<(), ResolveError> {
        self.inner.wake(start as *mut _, len).map_err(|err| {
            let errno = crate_errno(err).raw_os_error().unwrap_or(libc::EIO);
            ResolveError::from_kernel(ResolveOp::Wake, start, len, errno, -1)
        })
    }

    /// `UFFDIO_POISON`: makes `start..start+len` raise SIGBUS when touched (the failure policy's
    /// "poison" outcome: never run on with unknown content) and, unless `dontwake`, wakes the
    /// waiters, who then take the SIGBUS. Returns `len`.
    pub fn poison(&self, start: usize, len: usize, dontwake: bool) -> Result<usize, ResolveError> {
        let mode = if dontwake { sys::MODE_DONTWAKE } else { 0 };
        let (result, done) = sys::poison(self.as_fd(), start as u64, len as u64, mode);
        finish(ResolveOp::Poison, start, len, result, done)
    }

    /// `UFFDIO_COPY` with a mode: as [`Uffd::copy`], and with `protect` the pages are mapped
    /// write-protected in the same step (`UFFDIO_COPY_MODE_WP`), so the first write to them
    /// raises a WP fault: far memory's dirty tracking, where no write may slip in between
    /// mapping a page and protecting it. `protect` needs a WP registration. Returns `src.len()`.
    pub fn copy_mode(
        &self,
        dst: usize,
        src: &[u8],
        dontwake: bool,
        protect: bool,
    ) -> Result<usize, ResolveError> {
        let mut mode = 0;
        if protect {
            mode |= sys::COPY_MODE_WP;
        }
        if dontwake {
            mode |= sys::COPY_MODE_DONTWAKE;
        }
        // SAFETY: `src` is a live slice, readable for the duration of the call.
        let (result, done) = unsafe {
            sys::copy(
                self.as_fd(),
                dst as u64,
                src.as_ptr(),
                src.len() as u64,
                mode,
            )
        };
        finish(ResolveOp::Copy, dst, src.len(), result, done)
    }

    /// `UFFDIO_WRITEPROTECT`: `protect` write-protects the present pages of `start..start+len`
    /// (a thread writing there then sleeps in a WP fault until unprotected); `!protect` removes
    /// the protection and, unless `dontwake`, wakes the threads waiting in WP faults there.
    /// Needs a WP registration. The kernel refuses `protect` with `dontwake` (EINVAL): waking
    /// means nothing when protecting.
    pub fn writeprotect(
        &self,
        start: usize,
        len: usize,
        protect: bool,
        dontwake: bool,
    ) -> Result<(), ResolveError> {
        let mut mode = 0;
        if protect {
            mode |= sys::WRITEPROTECT_MODE_WP;
        } else if dontwake {
            mode |= sys::WRITEPROTECT_MODE_DONTWAKE;
        }
        sys::writeprotect(self.as_fd(), start as u64, len as u64, mode).map_err(|err| {
            let errno = err.raw_os_error().unwrap_or(libc::EIO);
            ResolveError::from_kernel(ResolveOp::Writeprotect, start, len, errno, -1)
        })
    }

    /// Reads at most one message without blocking; `None` when there is none.
    pub fn read_event(&self) -> Result<Option<Event>, ReadError> {
        match self.inner.read_event() {
            Ok(event) => Ok(event.map(|e| self.convert(e))),
            Err(userfaultfd::Error::SystemError(errno)) if errno as i32 == libc::EINTR => Ok(None),
            Err(err) => Err(event::read_error(err)),
        }
    }

    /// Reads as many messages as are pending (up to the buffer's capacity) with one `read(2)`,
    /// without blocking, appending them to `out`. Returns how many were appended.
    pub fn read_events(
        &self,
        buf: &mut EventBuffer,
        out: &mut Vec<Event>,
    ) -> Result<usize, ReadError> {
        let events = match self.inner.read_events(&mut buf.0) {
            Ok(events) => events,
            Err(userfaultfd::Error::SystemError(errno)) if errno as i32 == libc::EINTR => {
                return Ok(0);
            }
            Err(err) => return Err(event::read_error(err)),
        };
        let before = out.len();
        for event in events {
            out.push(self.convert(event.map_err(event::read_error)?));
        }
        Ok(out.len() - before)
    }

    /// Sleeps until messages are ready, `stop` is raised, or `timeout` (None: forever) passes.
    pub fn wait(
        &self,
        timeout: Option<Duration>,
        stop: Option<&StopSignal>,
    ) -> Result<Readiness, WaitError> {
        event::wait(self.as_fd(), timeout, stop)
    }

    fn convert(&self, event: userfaultfd::Event) -> Event {
        Event::from_crate(event, self.features.contains(Features::THREAD_ID))
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> i32 {
        self.inner.as_raw_fd()
    }
}

/// `/proc/self/pagemap`, open for `PAGEMAP_SCAN` (Linux 6.7): which pages of a range were
/// written since they were last write-protected, for ranges registered WP on a uffd with
/// `UFFD_FEATURE_WP_ASYNC` (writes then never fault: the kernel clears the protection itself and
/// the scan reports it).
#[derive(Debug)]
pub struct Pagemap(std::fs::File);

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> io::Result<Self> {
        std::fs::File::open("/proc/self/pagemap").map(Self)
    }

    /// Fills `out` with the regions of `start..end` whose pages are present and written, and
    /// write-protects them again (`PM_SCAN_WP_MATCHING`; the range must be WP_ASYNC, or the
    /// kernel refuses with EPERM). Returns how many regions were filled and the address where the
    /// walk stopped (`end` unless `out` filled up first: call again from there).
    pub fn take_written(
        &self,
        start: usize,
        end: usize,
        out: &mut [PageRegion],
    ) -> io::Result<(usize, usize)> {
        let (n, walk_end) = sys::pagemap_scan(
            self.0.as_fd(),
            start as u64,
            end as u64,
            PAGE_IS_WRITTEN,
            PAGE_IS_WRITTEN,
            true,
            out,
        )?;
        Ok((n, walk_end as usize))
    }
}

/// The errno inside one of the crate's errors.
fn crate_errno(err: userfaultfd::Error) -> io::Error {
    match err {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => io::Error::from_raw_os_error(errno as i32),
        userfaultfd::Error::PartiallyCopied(_) => io::Error::from_raw_os_error(libc::EAGAIN),
        other => io::Error::other(other.to_string()),
    }
}

/// Turns a raw ioctl's result and progress field into the operation's result.
fn finish(
    op: ResolveOp,
    addr: usize,
    len: usize,
    result: io::Result<()>,
    done: i64,
) -> Result<usize, ResolveError> {
    match result {
        Ok(()) => Ok(len),
        Err(err) => {
            let errno = err.raw_os_error().unwrap_or(libc::EIO);
            Err(ResolveError::from_kernel(op, addr, len, errno, done))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread::{self, JoinHandle};

    use super::*;
    use crate::backing::{GuestMemory, HUGE_PAGE_SIZE};
    use crate::testutil;

    const PAGE: usize = 4096;
    const WAIT: Option<Duration> = Some(Duration::from_secs(5));

    /// Reads one byte at `addr` on a new thread (which sleeps in the fault until resolved).
    fn touch(addr: usize) -> JoinHandle<u8> {
        thread::spawn(move || {
            // SAFETY: `addr` is inside guest memory the test keeps mapped until it joins this
            // thread; a volatile read of one byte.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        })
    }

    /// Waits for and reads the next message.
    fn next_event(uffd: &Uffd) -> Event {
        assert_eq!(uffd.wait(WAIT, None).unwrap(), Readiness::Events);
        uffd.read_event()
            .unwrap()
            .expect("a message after readiness")
    }

    fn register(uffd: &Uffd, memory: &GuestMemory, modes: RegisterModes) -> ResolveOps {
        // SAFETY: `memory` is guest memory created by the test; no Rust object lives there.
        unsafe { uffd.register(memory.host_addr(), memory.len(), modes) }.unwrap()
    }

    /// This kernel offers every feature faultline asks for, and opening grants them.
    #[test]
    fn open_grants_faultline_features() {
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        assert!(
            uffd.offered_features().contains(Features::FAULTLINE),
            "{}",
            uffd.offered_features()
        );
        assert_eq!(uffd.features(), Features::FAULTLINE);
        assert!(uffd.read_event().unwrap().is_none());
    }

    /// A read fault on anonymous memory is reported with its address and thread and is resolved
    /// by COPY from this thread; the faulting thread then sees the copied bytes.
    #[test]
    fn anon_fault_resolved_by_copy() {
        let memory = GuestMemory::anonymous(4 * PAGE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        register(&uffd, &memory, RegisterModes::MISSING);
        let target = memory.host_addr() + 2 * PAGE + 123;
        let toucher = touch(target);
        let Event::Pagefault {
            address,
            kind,
            write,
            thread_id,
        } = next_event(&uffd)
        else {
            panic!("expected a page fault");
        };
        assert_eq!(address, target, "EXACT_ADDRESS was granted");
        assert_eq!(kind, FaultKind::Missing);
        assert!(!write);
        assert!(thread_id.is_some_and(|t| t > 0));
        let page = vec![0x5a; PAGE];
        assert_eq!(
            uffd.copy(address & !(PAGE - 1), &page, false).unwrap(),
            PAGE
        );
        assert_eq!(toucher.join().unwrap(), 0x5a);
    }

    /// A second COPY onto a page already installed fails with Exists and zero bytes done.
    #[test]
    fn double_copy_is_exists() {
        let memory = GuestMemory::anonymous(2 * PAGE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        register(&uffd, &memory, RegisterModes::MISSING);
        let page = vec![1; PAGE];
        uffd.copy(memory.host_addr(), &page, true).unwrap();
        let err = uffd.copy(memory.host_addr(), &page, false).unwrap_err();
        assert!(matches!(err, ResolveError::Exists { done: 0, .. }), "{err}");
        assert!(
            err.to_string().contains("another path installed it first"),
            "{err}"
        );
        // Two pages, the first present: the kernel copies nothing and says EEXIST.
        let two = vec![2; 2 * PAGE];
        let err = uffd.copy(memory.host_addr(), &two, false).unwrap_err();
        assert!(matches!(err, ResolveError::Exists { done: 0, .. }), "{err}");
        // Two pages, the second present: one page is copied, and the kernel reports EAGAIN.
        let memory2 = GuestMemory::anonymous(2 * PAGE).unwrap();
        let uffd2 = testutil::require_uffd().unwrap();
        register(&uffd2, &memory2, RegisterModes::MISSING);
        uffd2
            .copy(memory2.host_addr() + PAGE, &page, false)
            .unwrap();
        let err = uffd2.copy(memory2.host_addr(), &two, false).unwrap_err();
        assert!(
            matches!(err, ResolveError::Again { done: PAGE, .. }),
            "{err}"
        );
        assert_eq!(err.done(), PAGE);
    }

    /// A MISSING fault on shmem is served by writing through the fill view and CONTINUE; a page
    /// already in the page cache faults as MINOR and is served by CONTINUE alone.
    #[test]
    fn shmem_fault_resolved_by_fill_and_continue() {
        let memory = GuestMemory::shmem(4 * PAGE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        let ops = register(
            &uffd,
            &memory,
            RegisterModes::MISSING | RegisterModes::MINOR,
        );
        assert!(ops.contains(ResolveOps::CONTINUE), "{ops}");
        let fill = memory.fill_view().unwrap();

        let toucher = touch(memory.host_addr() + PAGE);
        let Event::Pagefault { address, kind, .. } = next_event(&uffd) else {
            panic!("expected a page fault");
        };
        assert_eq!(kind, FaultKind::Missing);
        fill.write(PAGE, &[0x42; PAGE]).unwrap();
        let page = address & !(PAGE - 1);
        assert_eq!(uffd.continue_(page, PAGE, false).unwrap(), PAGE);
        assert_eq!(toucher.join().unwrap(), 0x42);

        fill.write(3 * PAGE, &[0x17; PAGE]).unwrap();
        let toucher = touch(memory.host_addr() + 3 * PAGE);
        let Event::Pagefault { address, kind, .. } = next_event(&uffd) else {
            panic!("expected a page fault");
        };
        assert_eq!(kind, FaultKind::Minor);
        uffd.continue_(address & !(PAGE - 1), PAGE, false).unwrap();
        assert_eq!(toucher.join().unwrap(), 0x17);

        let err = uffd.continue_(page, PAGE, false).unwrap_err();
        assert!(matches!(err, ResolveError::Exists { .. }), "{err}");
    }

    /// MADV_DONTNEED on registered memory delivers REMOVE; until it is read every resolve
    /// operation fails with EAGAIN, and afterwards the removed page can be filled again.
    #[test]
    fn remove_event_and_eagain_while_pending() {
        let memory = GuestMemory::anonymous(2 * PAGE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        register(&uffd, &memory, RegisterModes::MISSING);
        let start = memory.host_addr();
        uffd.copy(start, &[7; PAGE], false).unwrap();
        // madvise sleeps until the REMOVE message is read, so it runs on its own thread.
        let remover = thread::spawn(move || {
            // SAFETY: discards the first page of the test's guest memory, which stays mapped
            // until this thread is joined.
            unsafe { libc::madvise(start as *mut _, PAGE, libc::MADV_DONTNEED) }
        });
        assert_eq!(uffd.wait(WAIT, None).unwrap(), Readiness::Events);
        let err = uffd.copy(start + PAGE, &[8; PAGE], false).unwrap_err();
        assert!(matches!(err, ResolveError::Again { done: 0, .. }), "{err}");
        let err = uffd.zeropage(start + PAGE, PAGE, false).unwrap_err();
        assert!(matches!(err, ResolveError::Again { done: 0, .. }), "{err}");
        assert_eq!(
            uffd.read_event().unwrap(),
            Some(Event::Remove {
                start,
                end: start + PAGE
            })
        );
        assert_eq!(remover.join().unwrap(), 0);
        // The event is read, but `mmap_changing` drops only when madvise resumes: retry briefly.
        let mut tries = 0;
        loop {
            match uffd.copy(start, &[9; PAGE], false) {
                Ok(_) => break,
                Err(ResolveError::Again { .. }) if tries < 100 => tries += 1,
                Err(err) => panic!("{err}"),
            }
            thread::sleep(Duration::from_millis(1));
        }
        let mut byte = [0];
        memory.guest().read(0, &mut byte).unwrap();
        assert_eq!(byte, [9]);
    }

    /// ZEROPAGE and POISON install into missing pages and refuse present ones with Exists.
    #[test]
    fn zeropage_and_poison() {
        let memory = GuestMemory::anonymous(2 * PAGE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        register(&uffd, &memory, RegisterModes::MISSING);
        assert_eq!(
            uffd.zeropage(memory.host_addr(), PAGE, false).unwrap(),
            PAGE
        );
        let err = uffd.zeropage(memory.host_addr(), PAGE, false).unwrap_err();
        assert!(matches!(err, ResolveError::Exists { .. }), "{err}");
        let mut byte = [1];
        memory.guest().read(0, &mut byte).unwrap();
        assert_eq!(byte, [0]);
        let second = memory.host_addr() + PAGE;
        assert_eq!(uffd.poison(second, PAGE, false).unwrap(), PAGE);
        let err = uffd.poison(second, PAGE, false).unwrap_err();
        assert!(matches!(err, ResolveError::Exists { .. }), "{err}");
        uffd.wake(second, PAGE).unwrap();
    }

    /// hugetlbfs resolves whole 2 MiB pages by fill + CONTINUE and has no ZEROPAGE (EINVAL).
    #[test]
    fn hugetlb_fault_resolved_by_continue() {
        let Some(_pages) = testutil::reserve_huge_pages(1) else {
            return;
        };
        let memory = GuestMemory::hugetlb(HUGE_PAGE_SIZE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        let ops = register(
            &uffd,
            &memory,
            RegisterModes::MISSING | RegisterModes::MINOR,
        );
        assert!(!ops.contains(ResolveOps::ZEROPAGE), "{ops}");
        let err = uffd
            .zeropage(memory.host_addr(), HUGE_PAGE_SIZE, false)
            .unwrap_err();
        assert!(
            matches!(&err, ResolveError::Failed { source, .. } if source.raw_os_error() == Some(libc::EINVAL)),
            "{err}"
        );
        let toucher = touch(memory.host_addr() + 5 * PAGE);
        let Event::Pagefault { kind, .. } = next_event(&uffd) else {
            panic!("expected a page fault");
        };
        assert_eq!(kind, FaultKind::Missing);
        memory
            .fill_view()
            .unwrap()
            .write(5 * PAGE, &[0x33; PAGE])
            .unwrap();
        // A 4 KiB CONTINUE is refused: hugetlbfs resolves in huge pages only.
        let err = uffd.continue_(memory.host_addr(), PAGE, false).unwrap_err();
        assert!(matches!(err, ResolveError::Failed { .. }), "{err}");
        uffd.continue_(memory.host_addr(), HUGE_PAGE_SIZE, false)
            .unwrap();
        assert_eq!(toucher.join().unwrap(), 0x33);
    }

    /// Faults from several threads at once are read in batches and each resolved once, with
    /// DONTWAKE installs and one WAKE.
    #[test]
    fn faults_from_many_threads() {
        const THREADS: usize = 8;
        let memory = GuestMemory::anonymous(THREADS * PAGE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        register(&uffd, &memory, RegisterModes::MISSING);
        let touchers: Vec<_> = (0..THREADS)
            .map(|i| touch(memory.host_addr() + i * PAGE))
            .collect();
        let mut buf = EventBuffer::new(4);
        let mut events = Vec::new();
        let mut served = 0;
        while served < THREADS {
            assert_eq!(uffd.wait(WAIT, None).unwrap(), Readiness::Events);
            events.clear();
            uffd.read_events(&mut buf, &mut events).unwrap();
            assert!(events.len() <= 4);
            for event in &events {
                let Event::Pagefault { address, .. } = *event else {
                    panic!("unexpected {event:?}");
                };
                let page = address & !(PAGE - 1);
                let index = (page - memory.host_addr()) / PAGE;
                // Each thread touches its own page, so no copy can race another (no EEXIST).
                uffd.copy(page, &[index as u8 + 1; PAGE], true).unwrap();
                served += 1;
            }
            uffd.wake(memory.host_addr(), memory.len()).unwrap();
        }
        for (i, t) in touchers.into_iter().enumerate() {
            assert_eq!(t.join().unwrap(), i as u8 + 1);
        }
    }

    /// `wait` returns TimedOut when idle and Stopped once the stop signal is raised.
    #[test]
    fn wait_times_out_and_stops() {
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        let stop = std::sync::Arc::new(StopSignal::new().unwrap());
        let short = Some(Duration::from_millis(20));
        assert_eq!(uffd.wait(short, Some(&stop)).unwrap(), Readiness::TimedOut);
        assert!(!stop.is_stopped());
        let raiser = {
            let stop = stop.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                stop.stop();
            })
        };
        assert_eq!(uffd.wait(WAIT, Some(&stop)).unwrap(), Readiness::Stopped);
        raiser.join().unwrap();
        // Level-triggered: later waits see it too.
        assert_eq!(uffd.wait(short, Some(&stop)).unwrap(), Readiness::Stopped);
        assert!(stop.is_stopped());
    }

    /// The handles a pager shares between threads are Send + Sync.
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Uffd>();
        check::<StopSignal>();
        check::<GuestMemory>();
    }

    /// Registering anonymous memory for MINOR faults is refused with EINVAL, as Unsupported.
    #[test]
    fn anon_minor_is_unsupported() {
        let memory = GuestMemory::anonymous(PAGE).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        // SAFETY: `memory` is guest memory created by the test.
        let err =
            unsafe { uffd.register(memory.host_addr(), PAGE, RegisterModes::MINOR) }.unwrap_err();
        assert!(matches!(err, RegisterError::Unsupported { .. }), "{err}");
        assert_eq!(err.errno(), libc::EINVAL);
    }
}
