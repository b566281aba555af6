//! Messages read from a uffd, and waiting for them (or for a stop request).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::error::{ReadError, WaitError};

/// What kind of fault a page-fault message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// No page at all (MISSING registration): resolve with COPY / ZEROPAGE, or fill the page
    /// cache through the fill view and CONTINUE.
    Missing,
    /// The page cache holds the page but this mapping does not map it (MINOR registration):
    /// resolve with CONTINUE.
    Minor,
    /// Write to a write-protected page (WP registration).
    WriteProtect,
}

/// One message from a uffd.
///
/// Memory-map events (REMOVE, UNMAP, REMAP) are synchronous: the thread that caused them
/// (`madvise`, `munmap`, `mremap`) sleeps until the message is read, and while one is unread every
/// resolve operation fails with EAGAIN. Read and handle them before resolving faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a registered page that is not mapped; it sleeps until the page is
    /// resolved and woken.
    Pagefault {
        /// The faulting address. Exact (not page-aligned) when `Features::EXACT_ADDRESS` was
        /// granted; round it down to the region's page size (2 MiB for hugetlbfs) either way.
        address: usize,
        /// Which registration mode reported it.
        kind: FaultKind,
        /// Whether the access was a write.
        write: bool,
        /// The faulting thread, when `Features::THREAD_ID` was granted.
        thread_id: Option<u32>,
    },
    /// `MADV_DONTNEED` / `MADV_REMOVE` drops `start..end`: the next access faults again (as
    /// MISSING for anonymous memory; shmem's page cache may still hold the pages after
    /// `MADV_DONTNEED`, giving MINOR faults). The pages are zapped only after this message is
    /// read, when the `madvise` caller resumes.
    Remove {
        /// First byte removed.
        start: usize,
        /// One past the last byte removed.
        end: usize,
    },
    /// `munmap` (or an `mmap`/`mremap` over it) removed `start..end` from the address space.
    Unmap {
        /// First byte unmapped.
        start: usize,
        /// One past the last byte unmapped.
        end: usize,
    },
    /// `mremap` moved `len` bytes from `from` to `to`; the registration moved with them.
    Remap {
        /// Old start address.
        from: usize,
        /// New start address.
        to: usize,
        /// Old length.
        len: usize,
    },
    /// The process forked and the child got its own uffd. faultline never asks for
    /// `EVENT_FORK`, so this is unexpected; the child's uffd has already been closed.
    Fork,
}

impl Event {
    /// Converts the `userfaultfd` crate's event. `thread_ids` says whether THREAD_ID was granted
    /// (otherwise the crate's thread id is garbage).
    pub(crate) fn from_crate(event: userfaultfd::Event, thread_ids: bool) -> Self {
        match event {
            userfaultfd::Event::Pagefault {
                kind,
                rw,
                addr,
                thread_id,
            } => Event::Pagefault {
                address: addr as usize,
                kind: match kind {
                    userfaultfd::FaultKind::Missing => FaultKind::Missing,
                    userfaultfd::FaultKind::Minor => FaultKind::Minor,
                    userfaultfd::FaultKind::WriteProtected => FaultKind::WriteProtect,
                },
                write: rw == userfaultfd::ReadWrite::Write,
                thread_id: thread_ids
                    .then(|| u32::try_from(thread_id.as_raw()).ok())
                    .flatten(),
            },
            userfaultfd::Event::Remove { start, end } => Event::Remove {
                start: start as usize,
                end: end as usize,
            },
            userfaultfd::Event::Unmap { start, end } => Event::Unmap {
                start: start as usize,
                end: end as usize,
            },
            userfaultfd::Event::Remap { from, to, len } => Event::Remap {
                from: from as usize,
                to: to as usize,
                len,
            },
            // The crate wrapped the child's uffd in an owning value; dropping it closes it.
            userfaultfd::Event::Fork { uffd } => {
                drop(uffd);
                Event::Fork
            }
        }
    }
}

/// Converts the crate's read error.
pub(crate) fn read_error(err: userfaultfd::Error) -> ReadError {
    match err {
        userfaultfd::Error::IncompleteMsg { read, expected } => {
            ReadError::Truncated { read, expected }
        }
        userfaultfd::Error::ReadEof => ReadError::Eof,
        userfaultfd::Error::UnrecognizedEvent(kind) => ReadError::UnknownEvent(kind),
        userfaultfd::Error::SystemError(errno) => {
            ReadError::Read(io::Error::from_raw_os_error(errno as i32))
        }
        other => ReadError::Read(io::Error::other(other.to_string())),
    }
}

/// A reusable buffer for reading many messages with one `read(2)`.
pub struct EventBuffer(pub(crate) userfaultfd::EventBuffer, pub(crate) usize);

impl EventBuffer {
    /// A buffer for up to `capacity` messages per read (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self(userfaultfd::EventBuffer::new(capacity), capacity)
    }
}

impl std::fmt::Debug for EventBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBuffer")
            .field("capacity", &self.1)
            .finish()
    }
}

/// What [`crate::uffd::Uffd::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Messages are ready to read.
    Events,
    /// The stop signal was raised (reported even when messages are also ready).
    Stopped,
    /// The timeout passed with nothing to do.
    TimedOut,
}

/// A level-triggered "stop" flag a pager thread can sleep on together with its uffd.
///
/// Backed by an eventfd that is written once and never read, so it stays readable: every
/// thread waiting on it, now or later, sees the stop. Share it with `Arc`.
#[derive(Debug)]
pub struct StopSignal {
    /// The eventfd; readable once stopped.
    fd: OwnedFd,
}

impl StopSignal {
    /// A new, unraised stop signal.
    pub fn new() -> Result<Self, WaitError> {
        // SAFETY: eventfd takes two integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(WaitError::CreateStopSignal(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Raises the signal: wakes every waiter. Idempotent.
    pub fn stop(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. It can only fail with EAGAIN
        // when the counter would overflow, which means it is already raised.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Whether the signal has been raised.
    pub fn is_stopped(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, zero timeout.
        let n = unsafe { libc::poll(&raw mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }
}

impl AsRawFd for StopSignal {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for StopSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Polls `uffd` and, if given, `stop`, until one is ready or `timeout` passes.
pub(crate) fn wait(
    uffd: BorrowedFd<'_>,
    timeout: Option<Duration>,
    stop: Option<&StopSignal>,
) -> Result<Readiness, WaitError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.map_or(-1, |s| s.fd.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up so that a short timeout does not become a busy loop.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        // SAFETY: `fds` is a live array of two pollfds (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(WaitError::Poll(err));
        }
        if fds[1].revents & libc::POLLIN != 0 {
            return Ok(Readiness::Stopped);
        }
        // The kernel answers POLLERR for a uffd opened without O_NONBLOCK ("poll() never
        // guarantees that read won't block"), and before its UFFDIO_API handshake.
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(WaitError::UffdError {
                revents: fds[0].revents,
            });
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(Readiness::Events);
        }
        if n == 0 {
            return Ok(Readiness::TimedOut);
        }
    }
}

/// A uffd or a stop signal watched for readability by the current tokio runtime (its epoll,
/// edge-triggered): for a pager thread that runs async code beside its uffd.
pub type Readable<T> = AsyncFd<Arc<T>>;

/// Registers `fd` (a [`super::Uffd`] or a [`StopSignal`]) with the current tokio runtime for
/// readability. Must be called within a runtime. The registration holds a reference, so the fd
/// stays open while it is registered. An fd can be registered once per runtime (EEXIST
/// otherwise): share the result among the tasks that wait on it.
pub fn readable<T: AsRawFd>(fd: Arc<T>) -> io::Result<Readable<T>> {
    // SAFETY: the `Arc` owns the object whose fd is registered (a `Uffd` or a `StopSignal`,
    // both closing their fd only on drop), so the fd stays open and names the same file for as
    // long as the `AsyncFd` holds it, and `as_raw_fd` returns that same fd every time.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}
