//! Receiving Firecracker's handshake from its socket: the JSON regions, possibly split over
//! several reads (a stream socket keeps no message boundaries), with the uffd as `SCM_RIGHTS`
//! ancillary data, within a deadline and a size bound. Firecracker keeps the socket open after
//! the message; bytes after the JSON array are left unread here.
//!
//! The fd is checked to be a userfaultfd (`/proc/self/fd` names it `anon_inode:[userfaultfd]`)
//! before anything uses it. Whenever one came, it is handed back even when the message is bad
//! ([`Refused::uffd`]): the VM's memory must then be poisoned, not left to hang.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use thiserror::Error;

use super::handshake::{Handshake, MAX_HANDSHAKE_BYTES, ParseError, parse_prefix};

/// How long a connection may take to send its whole handshake. Firecracker sends it right after
/// connecting, in one `sendmsg`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// fds accepted in one handshake's ancillary data (Firecracker sends one; its secret-hiding
/// branch three); more are closed by the kernel and the handshake refused.
const MAX_FDS: usize = 8;

/// Bytes read per `recvmsg`: Firecracker's message (about 110 bytes per region) fits in one.
const READ_CHUNK: usize = 4096;

/// How often a wait for the peer looks at the handler's stop flag.
const POLL_INTERVAL_MS: u16 = 100;

/// What `/proc/self/fd/N` links to for a userfaultfd (from `userfaultfd(2)` or
/// `/dev/userfaultfd`).
const USERFAULTFD_LINK: &str = "anon_inode:[userfaultfd]";

/// Receiving the handshake failed.
#[derive(Debug, Error)]
pub enum ReceiveError {
    /// `recvmsg` or `poll` failed.
    #[error("reading the handshake failed: {0}")]
    Read(#[source] io::Error),
    /// The whole message did not arrive in time.
    #[error(
        "the handshake did not arrive within {HANDSHAKE_TIMEOUT:?} of connecting ({received} bytes \
         received); send the JSON regions with the uffd right after connecting"
    )]
    Timeout {
        /// Bytes received by then.
        received: usize,
    },
    /// The handler was stopped while the peer was still sending.
    #[error("the handler is stopping")]
    Stopped,
    /// The peer hung up before sending anything.
    #[error("the peer closed the connection without sending a handshake")]
    Closed,
    /// The peer hung up in the middle of the message.
    #[error(
        "the peer closed the connection after {received} bytes, inside the JSON array; send the \
         whole array"
    )]
    ClosedEarly {
        /// Bytes received.
        received: usize,
    },
    /// The message is longer than the bound.
    #[error(
        "the handshake is longer than {MAX_HANDSHAKE_BYTES} bytes without a complete JSON array; \
         Firecracker sends about 110 bytes per memory region"
    )]
    TooLarge,
    /// More fds came than fit (the kernel closed the rest).
    #[error("more than {MAX_FDS} fds came with the handshake; send exactly one, the userfaultfd")]
    TooManyFds,
    /// The message is malformed.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// No fd came with the message.
    #[error(
        "no userfaultfd came with the memory regions; attach it to the message as SCM_RIGHTS \
         ancillary data"
    )]
    NoFd,
    /// More than one fd came.
    #[error(
        "{0} fds came with the memory regions; send exactly one, the userfaultfd (guest_memfd \
         handshakes of Firecracker's secret-hiding branch are not supported)"
    )]
    ExtraFds(usize),
    /// The fd is something else than a userfaultfd.
    #[error("the fd that came with the memory regions is {link}, not a userfaultfd; send the uffd")]
    NotUffd {
        /// What `/proc/self/fd` says it is.
        link: String,
    },
    /// The fd could not be identified.
    #[error(
        "cannot check that the received fd is a userfaultfd: reading {path} failed: {source}; the \
         handler needs /proc mounted"
    )]
    Identify {
        /// `/proc/self/fd/N`.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// A well-formed handshake with its userfaultfd.
#[derive(Debug)]
pub struct Received {
    /// The regions.
    pub handshake: Handshake,
    /// The peer's uffd, checked to be one.
    pub uffd: OwnedFd,
}

/// A handshake that was refused, with what did arrive.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: ReceiveError,
    /// A userfaultfd that came with it: the VM's memory is registered on it, so it must be
    /// poisoned rather than closed.
    pub uffd: Option<OwnedFd>,
    /// The regions, if the message itself was well-formed (they tell where to poison).
    pub handshake: Option<Handshake>,
}

/// Reads one handshake from `stream` within [`HANDSHAKE_TIMEOUT`], giving up early when
/// `stopping` says so. Bytes that came after the JSON array in the same read are dropped; later
/// ones stay on the socket (Firecracker sends none).
pub fn receive(stream: &UnixStream, stopping: impl Fn() -> bool) -> Result<Received, Refused> {
    receive_within(stream, HANDSHAKE_TIMEOUT, stopping)
}

/// [`receive`] with another time limit than [`HANDSHAKE_TIMEOUT`].
fn receive_within(
    stream: &UnixStream,
    timeout: Duration,
    stopping: impl Fn() -> bool,
) -> Result<Received, Refused> {
    let mut fds = Vec::new();
    let mut truncated = false;
    let message = read_message(stream, timeout, &stopping, &mut fds, &mut truncated);
    // Identify every fd that came: the first userfaultfd among them is the VM's.
    let mut uffd = None;
    let mut first_other = None;
    let count = fds.len();
    for fd in fds {
        match identify(&fd) {
            Ok(()) if uffd.is_none() => uffd = Some(fd),
            Ok(()) => {}
            Err(e) => {
                first_other.get_or_insert(e);
            }
        }
    }
    let refused = |error, uffd, handshake| {
        Err(Refused {
            error,
            uffd,
            handshake,
        })
    };
    let handshake = match message {
        Ok(h) => h,
        Err(error) => return refused(error, uffd, None),
    };
    if truncated {
        return refused(ReceiveError::TooManyFds, uffd, Some(handshake));
    }
    match (uffd, count) {
        (_, 0) => refused(ReceiveError::NoFd, None, Some(handshake)),
        (Some(uffd), 1) => Ok(Received { handshake, uffd }),
        (uffd, n) if n > 1 => refused(ReceiveError::ExtraFds(n), uffd, Some(handshake)),
        (_, _) => refused(
            first_other.unwrap_or(ReceiveError::NoFd),
            None,
            Some(handshake),
        ),
    }
}

/// Reads until the bytes hold a complete JSON value, collecting fds into `fds`.
fn read_message(
    stream: &UnixStream,
    timeout: Duration,
    stopping: &impl Fn() -> bool,
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> Result<Handshake, ReceiveError> {
    let deadline = Instant::now() + timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        if stopping() {
            return Err(ReceiveError::Stopped);
        }
        if Instant::now() >= deadline {
            return Err(ReceiveError::Timeout {
                received: buf.len(),
            });
        }
        if !readable(stream, POLL_INTERVAL_MS).map_err(ReceiveError::Read)? {
            continue;
        }
        let room = (MAX_HANDSHAKE_BYTES - buf.len()).min(READ_CHUNK);
        let mut iov = [IoSliceMut::new(&mut chunk[..room])];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(ReceiveError::Read(io::Error::from(e))),
        };
        for c in msg.cmsgs() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS installed this fd in our table for us; nothing else
                    // owns it, and wrapping it at once closes it on every path.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        *truncated |= msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let n = msg.bytes;
        if n == 0 {
            return Err(if buf.is_empty() && fds.is_empty() {
                ReceiveError::Closed
            } else {
                ReceiveError::ClosedEarly {
                    received: buf.len(),
                }
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        // A JSON array can only be complete once a `]` has arrived: parse only then, so that a
        // peer sending one byte at a time costs one scan per read, not one parse.
        if chunk[..n].contains(&b']')
            && let Some(handshake) = parse_prefix(&buf)?
        {
            return Ok(handshake);
        }
        if buf.len() >= MAX_HANDSHAKE_BYTES {
            return Err(ReceiveError::TooLarge);
        }
    }
}

/// Waits up to `timeout_ms` for `fd` to be readable (or hung up); EINTR counts as "not yet".
pub(super) fn readable(fd: &impl AsFd, timeout_ms: u16) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, i32::from(timeout_ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Checks that `fd` is a userfaultfd, by what `/proc/self/fd` links it to. (No ioctl tells a
/// uffd apart without side effects: `UFFDIO_API` on an initialised uffd fails with EINVAL, the
/// same answer as on most other fds.)
fn identify(fd: &OwnedFd) -> Result<(), ReceiveError> {
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    match std::fs::read_link(&path) {
        Ok(link) if link.as_os_str() == USERFAULTFD_LINK => Ok(()),
        Ok(link) => Err(ReceiveError::NotUffd {
            link: link.display().to_string(),
        }),
        Err(source) => Err(ReceiveError::Identify { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{IoSlice, Write};

    use nix::sys::socket::{ControlMessage, sendmsg};

    use super::*;

    const BODY: &[u8] = include_bytes!("../../tests/fixtures/firecracker-1.16.1-handshake-4k.json");

    fn send(stream: &UnixStream, body: &[u8], fds: &[RawFd]) {
        let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(fds)]
        };
        let sent = sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(body)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(sent, body.len());
    }

    fn refused(r: Result<Received, Refused>) -> Refused {
        match r {
            Ok(_) => panic!("accepted"),
            Err(r) => r,
        }
    }

    /// An fd that is not a userfaultfd (here a pipe) is refused, and not kept for poisoning.
    #[test]
    fn refuses_fds_that_are_not_userfaultfds() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (r, _w) = std::io::pipe().expect("pipe");
        send(&a, BODY, &[r.as_raw_fd()]);
        let got = refused(receive(&b, || false));
        assert!(
            matches!(&got.error, ReceiveError::NotUffd { link } if link.starts_with("pipe:")),
            "{}",
            got.error
        );
        assert!(got.uffd.is_none());
        assert!(got.handshake.is_some(), "the message itself was fine");
    }

    /// A message split over several writes is put back together; a message cut short by a
    /// hang-up, or one without an fd, is refused with what arrived.
    #[test]
    fn split_and_cut_messages() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (r, _w) = std::io::pipe().expect("pipe");
        send(&a, &BODY[..7], &[r.as_raw_fd()]);
        let writer = std::thread::spawn(move || {
            for part in BODY[7..].chunks(10) {
                std::thread::sleep(Duration::from_millis(5));
                (&a).write_all(part).expect("write");
            }
            a
        });
        // The pipe is no uffd, but the message must be whole to say so.
        let got = refused(receive(&b, || false));
        assert!(matches!(got.error, ReceiveError::NotUffd { .. }));
        assert_eq!(got.handshake.expect("parsed").consumed, BODY.len());
        drop(writer.join().expect("writer"));

        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(&BODY[..40]).expect("write");
        drop(a);
        let got = refused(receive(&b, || false));
        assert!(
            matches!(got.error, ReceiveError::ClosedEarly { received: 40 }),
            "{}",
            got.error
        );

        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(BODY).expect("write");
        let got = refused(receive(&b, || false));
        assert!(matches!(got.error, ReceiveError::NoFd), "{}", got.error);

        let (a, b) = UnixStream::pair().expect("pair");
        drop(a);
        assert!(matches!(
            refused(receive(&b, || false)).error,
            ReceiveError::Closed
        ));
    }

    /// An endless message is cut at the size bound; a stop request ends the wait.
    #[test]
    fn bounded_size_and_stop() {
        let (a, b) = UnixStream::pair().expect("pair");
        let writer = std::thread::spawn(move || {
            let junk = vec![b'['; 4096];
            // Stops when the reader hangs up.
            while (&a).write_all(&junk).is_ok() {}
        });
        // `[[[[`... is a JSON prefix that never completes (nor exceeds the nesting limit
        // before the size bound, since no `]` ever triggers a parse).
        let got = refused(receive(&b, || false));
        assert!(matches!(got.error, ReceiveError::TooLarge), "{}", got.error);
        drop(b);
        writer.join().expect("writer");

        let (_a, b) = UnixStream::pair().expect("pair");
        let got = refused(receive(&b, || true));
        assert!(matches!(got.error, ReceiveError::Stopped));
    }

    /// A peer that sends part of the message and then nothing more is given up on at the time
    /// limit, with what it sent.
    #[test]
    fn stalled_peer_times_out() {
        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(&BODY[..20]).expect("write");
        let started = Instant::now();
        let got = refused(receive_within(&b, Duration::from_millis(300), || false));
        assert!(
            matches!(got.error, ReceiveError::Timeout { received: 20 }),
            "{}",
            got.error
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
