//! Failing a VM loudly: when the handler holds a VM's uffd but cannot serve it (a bad handshake,
//! a snapshot that does not fit or is missing, the server unreachable past the deadline), every
//! fault on that VM's memory is answered with `UFFDIO_POISON`. The vCPU or Firecracker thread
//! touching guest memory then gets SIGBUS and Firecracker exits with an error, instead of hanging
//! forever on a fault nobody answers (Firecracker keeps its own copy of the uffd open, so closing
//! ours would not wake it).
//!
//! Where the regions are known they are poisoned whole, at once: they then stay poisoned even if
//! this handler stops before the VM touches them. The uffd is also read until the VM hangs up, so
//! that faults outside them (regions unknown because the message was malformed) are poisoned one
//! page at a time.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use nix::poll::{PollFd, PollFlags, poll};

use super::handshake::UffdRegion;
use crate::uffd::{Event, EventBuffer, Features, ResolveError, Uffd};

/// Messages read from the uffd per `read(2)`.
const EVENTS_PER_READ: usize = 16;

/// How often the poisoning loop looks at the handler's stop flag, in milliseconds.
const POLL_INTERVAL_MS: i32 = 100;

/// EAGAIN answers in a row at one address before a range is given up (a REMOVE event pending
/// while we poison: it is read by the loop afterwards).
const AGAIN_RETRIES: u32 = 3;

/// The page sizes a fault outside the known regions is poisoned with, in order: Firecracker's
/// memory is 4 KiB anonymous or 2 MiB hugetlb, and POISON of a misaligned or partial huge page
/// fails with EINVAL.
const GUESSED_PAGE_SIZES: [usize; 2] = [4096, 2 << 20];

/// How a poisoned VM's connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PoisonEnd {
    /// The VM hung up (it exited, most likely of the SIGBUS).
    PeerClosed,
    /// The handler is stopping.
    HandlerStopped,
    /// The VM's memory is gone (ESRCH): it exited.
    VmGone,
}

/// What was poisoned.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Poisoned {
    /// Bytes poisoned up front, in the known regions.
    pub upfront: u64,
    /// Faults answered with POISON afterwards.
    pub faults: u64,
}

/// Poisons `regions` (where known), then answers every fault on `uffd` with POISON until the
/// VM hangs up or `stopping` says so.
pub(super) fn poison_vm(
    conn: u64,
    uffd: OwnedFd,
    regions: &[UffdRegion],
    stream: &UnixStream,
    stopping: impl Fn() -> bool,
) -> (PoisonEnd, Poisoned) {
    let mut done = Poisoned::default();
    // SAFETY: the fd was checked to be a userfaultfd (`receive`); it acts on the memory of the
    // process that created it, the peer, whose registered ranges are its guest memory, where no
    // Rust object of this process lives. Only POISON and WAKE are issued through it.
    let uffd = match unsafe { Uffd::from_peer(uffd, Features::EVENT_REMOVE) } {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(
                conn,
                "cannot use the VM's uffd to poison its memory: {e}; the VM may hang"
            );
            return (watch_hang_up(stream, &stopping), done);
        }
    };
    for r in regions {
        let (start, len) = (r.peer_addr.0 as usize, r.size as usize);
        match poison_range(&uffd, start, len, r.page_size.bytes_usize()) {
            Ok(n) => done.upfront += n as u64,
            Err(NotPoisoned::VmGone) => return (PoisonEnd::VmGone, done),
            Err(NotPoisoned::Refused) => {}
        }
    }
    let mut buf = EventBuffer::new(EVENTS_PER_READ);
    let mut events = Vec::new();
    loop {
        if stopping() {
            return (PoisonEnd::HandlerStopped, done);
        }
        let (uffd_ready, peer_ready) = {
            let mut fds = [
                PollFd::new(&uffd, PollFlags::POLLIN),
                PollFd::new(stream, PollFlags::POLLIN),
            ];
            match poll(&mut fds, POLL_INTERVAL_MS) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(conn, "polling the VM's uffd failed: {e}");
                    return (watch_hang_up(stream, &stopping), done);
                }
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if peer_ready && peer_hung_up(stream) {
            return (PoisonEnd::PeerClosed, done);
        }
        if !uffd_ready {
            continue;
        }
        events.clear();
        if let Err(e) = uffd.read_events(&mut buf, &mut events) {
            tracing::warn!(conn, "reading the VM's uffd failed: {e}");
            return (watch_hang_up(stream, &stopping), done);
        }
        for event in &events {
            // REMOVE and other events need nothing but being read (a REMOVE blocks the
            // thread that caused it until then).
            let Event::Pagefault { address, .. } = *event else {
                continue;
            };
            let known = regions
                .iter()
                .find(|r| r.contains(address as u64))
                .map(|r| r.page_size.bytes_usize());
            let sizes: &[usize] = match &known {
                Some(ps) => std::slice::from_ref(ps),
                None => &GUESSED_PAGE_SIZES,
            };
            for &ps in sizes {
                match poison_range(&uffd, address & !(ps - 1), ps, ps) {
                    Ok(_) => {
                        done.faults += 1;
                        break;
                    }
                    Err(NotPoisoned::VmGone) => return (PoisonEnd::VmGone, done),
                    Err(NotPoisoned::Refused) => {}
                }
            }
        }
    }
}

/// Why [`poison_range`] did not poison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotPoisoned {
    /// The VM's memory is gone (ESRCH).
    VmGone,
    /// The kernel refused: not registered, misaligned for the range's page size (logged at
    /// debug level).
    Refused,
}

/// Poisons `start..start+len`, skipping pages already present (EEXIST). Returns the bytes
/// poisoned.
fn poison_range(uffd: &Uffd, start: usize, len: usize, page: usize) -> Result<usize, NotPoisoned> {
    let (mut at, end) = (start, start + len);
    let mut poisoned = 0;
    let mut again = 0;
    while at < end {
        match uffd.poison(at, end - at, false) {
            Ok(n) => return Ok(poisoned + n),
            Err(e @ ResolveError::Exists { .. }) => {
                poisoned += e.done();
                at += e.done() + page;
                // The present page's waiters (if any) still need a wake.
                let _ = uffd.wake(at - page, page);
            }
            Err(e @ ResolveError::Again { .. }) => {
                poisoned += e.done();
                at += e.done();
                again = if e.done() > 0 { 0 } else { again + 1 };
                if again > AGAIN_RETRIES {
                    return Ok(poisoned);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(ResolveError::Failed { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) =>
            {
                return Err(NotPoisoned::VmGone);
            }
            Err(e) => {
                tracing::debug!("poisoning {at:#x}+{:#x}: {e}", end - at);
                return Err(NotPoisoned::Refused);
            }
        }
    }
    Ok(poisoned)
}

/// Waits for the peer to hang up or the handler to stop (nothing else can be done for it).
fn watch_hang_up(stream: &UnixStream, stopping: &impl Fn() -> bool) -> PoisonEnd {
    loop {
        if stopping() {
            return PoisonEnd::HandlerStopped;
        }
        let mut fds = [PollFd::new(stream, PollFlags::POLLIN)];
        match poll(&mut fds, POLL_INTERVAL_MS) {
            Ok(n) if n > 0 && peer_hung_up(stream) => return PoisonEnd::PeerClosed,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return PoisonEnd::PeerClosed,
        }
    }
}

/// Reads what the peer sent (ignored); whether it hung up.
pub(super) fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    match nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(stream),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => true,
        Ok(_) => false,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}
