//! One error type per userfaultfd operation; each message says what happened and what to do.

use std::fmt;
use std::io;

use thiserror::Error;

use super::flags::{Features, RegisterModes};

/// Opening a userfaultfd and doing the `UFFDIO_API` handshake failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// Neither way of creating a userfaultfd is permitted to this process.
    #[error(
        "userfaultfd is not permitted to this process: the userfaultfd(2) syscall was refused \
         ({syscall}) and /dev/userfaultfd could not be used ({device}); run as root (or with \
         CAP_SYS_PTRACE), set the sysctl `vm.unprivileged_userfaultfd=1`, or give this user \
         read-write access to /dev/userfaultfd (for example a group and mode 0660 on the device)"
    )]
    NotPermitted {
        /// Why the syscall failed (EPERM).
        syscall: io::Error,
        /// Why the device failed (absent, or no permission).
        device: io::Error,
    },
    /// The kernel was built without userfaultfd.
    #[error(
        "this kernel has no userfaultfd (the syscall returned ENOSYS); faultline needs a kernel \
         built with CONFIG_USERFAULTFD"
    )]
    NotSupported,
    /// The syscall failed for another reason (for example the fd limit).
    #[error("creating a userfaultfd failed: {0}")]
    Create(#[source] io::Error),
    /// `UFFDIO_API` failed.
    #[error(
        "the userfaultfd API handshake (UFFDIO_API) failed while {stage}: {source}; the kernel \
         refused the API version or the features {requested}"
    )]
    Handshake {
        /// `querying the features the kernel offers` or `requesting features`.
        stage: &'static str,
        /// The features asked for.
        requested: Features,
        /// The kernel's error.
        source: io::Error,
    },
    /// The kernel lacks features the caller declared required.
    #[error(
        "this kernel's userfaultfd lacks required features {missing} (it offers {offered}); use a \
         newer kernel or drop the requirement"
    )]
    MissingFeatures {
        /// Required but not offered.
        missing: Features,
        /// What the kernel offers.
        offered: Features,
    },
}

/// `UFFDIO_REGISTER` failed.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// EINVAL: this kind of memory cannot be registered in these modes, or the range is not
    /// aligned.
    #[error(
        "registering {start:#x}+{len:#x} for {modes} faults was refused (EINVAL): this kernel \
         cannot report {modes} faults on this kind of memory, or the range is not aligned to its \
         page size (2 MiB for hugetlbfs)"
    )]
    Unsupported {
        /// Start address.
        start: usize,
        /// Length in bytes.
        len: usize,
        /// Modes asked for.
        modes: RegisterModes,
    },
    /// Any other failure (EBUSY: registered on another uffd; ENOMEM: no mapping there; EPERM:
    /// the mapping is read-only).
    #[error("registering {start:#x}+{len:#x} for {modes} faults failed: {source}")]
    Failed {
        /// Start address.
        start: usize,
        /// Length in bytes.
        len: usize,
        /// Modes asked for.
        modes: RegisterModes,
        /// The kernel's error.
        source: io::Error,
    },
}

impl RegisterError {
    /// The errno the kernel answered.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Unsupported { .. } => libc::EINVAL,
            Self::Failed { source, .. } => source.raw_os_error().unwrap_or(0),
        }
    }
}

/// `UFFDIO_UNREGISTER` failed.
#[derive(Debug, Error)]
#[error("unregistering {start:#x}+{len:#x} from the userfaultfd failed: {source}")]
pub struct UnregisterError {
    /// Start address.
    pub start: usize,
    /// Length in bytes.
    pub len: usize,
    /// The kernel's error.
    pub source: io::Error,
}

/// Which resolve operation an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveOp {
    /// `UFFDIO_COPY`.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    Zeropage,
    /// `UFFDIO_CONTINUE`.
    Continue,
    /// `UFFDIO_WAKE`.
    Wake,
    /// `UFFDIO_POISON`.
    Poison,
    /// `UFFDIO_WRITEPROTECT`.
    Writeprotect,
}

impl fmt::Display for ResolveOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Copy => "UFFDIO_COPY",
            Self::Zeropage => "UFFDIO_ZEROPAGE",
            Self::Continue => "UFFDIO_CONTINUE",
            Self::Wake => "UFFDIO_WAKE",
            Self::Poison => "UFFDIO_POISON",
            Self::Writeprotect => "UFFDIO_WRITEPROTECT",
        })
    }
}

/// A resolve operation (COPY, ZEROPAGE, CONTINUE, WAKE, POISON) did not install the whole range.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// EEXIST: a page is already present at the start of what was left. Another path (the
    /// prefetcher, another fault handler) won the race; the content there is already right.
    /// The waiter may still be asleep if the winner used DONTWAKE: wake the range.
    #[error(
        "{op} at {addr:#x}+{len:#x} found a page already present after {done} bytes: another \
         path installed it first; treat those pages as done and wake the range"
    )]
    Exists {
        /// The operation.
        op: ResolveOp,
        /// Start of the range asked for.
        addr: usize,
        /// Length asked for.
        len: usize,
        /// Bytes installed before the present page.
        done: usize,
    },
    /// EAGAIN: the kernel stopped after `done` bytes. Either a memory-map event (REMOVE, UNMAP,
    /// REMAP) is pending on the uffd and the kernel refuses to fill until it has been read, or
    /// the range was partly done and the next page failed for another reason (EEXIST, ENOMEM)
    /// that a retry of the rest will report.
    ///
    /// Measured here: the refusal lasts until the thread that caused the event (the one in
    /// `madvise` / `munmap` / `mremap`) has resumed after the message was read, so a retry right
    /// after reading the event can still see EAGAIN; retry with a short pause.
    #[error(
        "{op} at {addr:#x}+{len:#x} stopped after {done} bytes (EAGAIN): a memory-map event is \
         pending or the rest failed; read and handle the uffd's pending events, then retry the \
         remaining {remaining} bytes (briefly, EAGAIN can outlast the read)",
        remaining = len - done
    )]
    Again {
        /// The operation.
        op: ResolveOp,
        /// Start of the range asked for.
        addr: usize,
        /// Length asked for.
        len: usize,
        /// Bytes installed (and woken unless DONTWAKE) before the kernel stopped.
        done: usize,
    },
    /// Any other failure: ENOENT (range not registered or unmapped), EINVAL (misaligned, or the
    /// range's registration does not allow this operation), ENOMEM, ESRCH (the faulting process
    /// is gone), EFAULT (bad source buffer).
    #[error("{op} at {addr:#x}+{len:#x} failed: {source}")]
    Failed {
        /// The operation.
        op: ResolveOp,
        /// Start of the range asked for.
        addr: usize,
        /// Length asked for.
        len: usize,
        /// The kernel's error.
        source: io::Error,
    },
}

impl ResolveError {
    /// Builds the error from what the kernel answered: `errno` and, when the kernel reports
    /// progress in the argument struct, the number of bytes it had installed (a negative
    /// progress value is a negated errno, meaning nothing was done).
    pub(crate) fn from_kernel(
        op: ResolveOp,
        addr: usize,
        len: usize,
        errno: i32,
        done: i64,
    ) -> Self {
        let done = usize::try_from(done).unwrap_or(0).min(len);
        match errno {
            libc::EEXIST => Self::Exists {
                op,
                addr,
                len,
                done,
            },
            libc::EAGAIN => Self::Again {
                op,
                addr,
                len,
                done,
            },
            _ => Self::Failed {
                op,
                addr,
                len,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    /// Whether the kernel said the memory's owner is gone: ESRCH (the process that registered
    /// the range has exited: its mm has no users left) or ENOENT (the range is no longer mapped
    /// or registered, which is what an exiting owner's torn-down address space answers).
    /// A peer killed with SIGKILL mid-restore makes COPY answer ESRCH (tests/pager.rs).
    /// Nothing more can be installed there; the pager serving that memory must end, and only it.
    pub fn is_owner_gone(&self) -> bool {
        matches!(
            self,
            Self::Failed { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ESRCH | libc::ENOENT))
        )
    }

    /// Bytes installed before the operation stopped.
    pub fn done(&self) -> usize {
        match self {
            Self::Exists { done, .. } | Self::Again { done, .. } => *done,
            Self::Failed { .. } => 0,
        }
    }
}

/// Reading messages from the uffd failed.
#[derive(Debug, Error)]
pub enum ReadError {
    /// `read(2)` failed.
    #[error("reading userfaultfd messages failed: {0}")]
    Read(#[source] io::Error),
    /// `read(2)` returned a partial message, which the kernel never does for a userfaultfd.
    #[error(
        "reading userfaultfd messages returned {read} bytes, not a multiple of the {expected}-byte \
         message: the fd is not a userfaultfd"
    )]
    Truncated {
        /// Bytes left over.
        read: usize,
        /// Size of `struct uffd_msg`.
        expected: usize,
    },
    /// End of file: the uffd's context is gone.
    #[error("the userfaultfd returned end-of-file: its context has been released")]
    Eof,
    /// A message type this code does not know (a newer kernel with a feature never asked for).
    #[error("the userfaultfd delivered an unknown message type {0}; this is a bug in faultline")]
    UnknownEvent(u8),
}

/// Waiting for the uffd (or a stop signal) failed.
#[derive(Debug, Error)]
pub enum WaitError {
    /// Creating the stop signal's eventfd failed.
    #[error("creating the pager's stop signal (eventfd) failed: {0}")]
    CreateStopSignal(#[source] io::Error),
    /// `poll(2)` failed.
    #[error("polling the userfaultfd failed: {0}")]
    Poll(#[source] io::Error),
    /// The uffd reported an error condition: it is blocking (poll is meaningless on a blocking
    /// uffd: the kernel reports POLLERR) or its API handshake was never done.
    #[error(
        "the userfaultfd reported an error condition to poll (revents {revents:#x}); it must be \
         non-blocking and have completed its UFFDIO_API handshake"
    )]
    UffdError {
        /// The `revents` seen.
        revents: i16,
    },
}
