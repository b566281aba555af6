//! Unix-domain sockets shared by both sides: binding one path per process
//! ([`bind`]: a stale socket replaced, a live one refused, mode 0600), the
//! `unix://` URL form, and the page-file handover, the message exchange by
//! which a client on the server's host receives a snapshot's image as a file
//! descriptor (`SCM_RIGHTS`) instead of its bytes.
//!
//! # Binding
//! Liveness is told by an advisory lock (`flock`) on `PATH.lock`, held for as
//! long as the socket listens: the kernel drops it when the process dies,
//! however it dies, and two processes started at the same moment cannot both
//! win it (checking whether the socket answers, then removing and binding,
//! would let both remove each other's socket). A socket that answers although
//! nobody holds the lock (a program that does not take it) is refused too. The
//! lock file is left in place when the socket closes: removing it would race
//! with a successor. The socket file is created with mode 0600 (owner only):
//! on a Unix socket the file's permissions are who may connect.
//!
//! # The page-file handover
//! On a connection to a server's Unix socket, a client sends
//! [`PAGE_FILE_PREFACE`] where a gRPC client would send HTTP/2's preface,
//! then one framed [`PageFileRequest`] (a little-endian `u32` length, then
//! JSON); the server answers one framed [`PageFileResponse`], with the image's
//! file descriptor attached (`SCM_RIGHTS`) when the answer is OK (and after
//! it, when the answer says so, the working set's page file), and closes
//! the connection. The token and the right are those of `ReadPages` (`read`
//! on the snapshot); the client still checks every page it takes from the
//! file against the manifest's digest. docs/protocol.md has the reasoning.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::{FlockArg, flock};
use serde::{Deserialize, Serialize};

/// The URL scheme of a server on a Unix socket: `unix:///run/faultline.sock`.
pub const UNIX_SCHEME: &str = "unix://";

/// The socket path of a `unix://PATH` URL; `None` for any other URL. The
/// path must be absolute (`unix:///run/x.sock`: three slashes).
pub fn unix_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix(UNIX_SCHEME).map(PathBuf::from)
}

/// What a client sends first on a Unix connection to ask for a page file
/// instead of speaking gRPC: 24 bytes, as long as HTTP/2's preface, so the
/// server tells the two apart with one read.
pub const PAGE_FILE_PREFACE: &[u8; 24] = b"FAULTLINE-PAGEFILE/1\r\n\r\n";

/// Largest framed request: a snapshot name, a working set's name and a
/// token fit in far less.
pub const MAX_PAGE_FILE_MESSAGE_BYTES: usize = 16 << 10;

/// Largest framed answer: it carries the working set asked for as runs, at
/// most the server's `--max-working-set-pages` (4 Mi by default) of them,
/// about 20 bytes of JSON each.
pub const MAX_PAGE_FILE_ANSWER_BYTES: usize = 128 << 20;

/// A client's request for a snapshot's image file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageFileRequest {
    /// The snapshot.
    pub snapshot: String,
    /// The `authorization` value a gRPC call would carry (`Bearer TOKEN`).
    pub authorization: Option<String>,
    /// A recorded working set whose pages to send with the answer (the
    /// order a `Prefetch` of it would stream), if any.
    pub working_set: Option<String>,
}

impl std::fmt::Debug for PageFileRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageFileRequest")
            .field("snapshot", &self.snapshot)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("working_set", &self.working_set)
            .finish()
    }
}

/// The server's answer. `code` is a gRPC status code (0: OK, the file
/// descriptor is attached; 12, Unimplemented: this store cannot hand out a
/// file, use the byte stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageFileResponse {
    /// The gRPC status code.
    pub code: i32,
    /// What went wrong, when not OK.
    pub message: String,
    /// The snapshot's page size, in bytes (OK only).
    pub page_size: u64,
    /// Its pages (OK only).
    pub page_count: u64,
    /// The working set asked for, in first-touch order, as runs of
    /// consecutive pages: `(first page, count)`; empty if there is none of
    /// that name (OK only).
    #[serde(default)]
    pub working_set: Vec<(u64, u64)>,
    /// A second descriptor is attached after the image's: the working set's
    /// non-zero pages one after another in that order (the server's
    /// `wspages-` file), so that a replay reads it front to back (OK only).
    #[serde(default)]
    pub working_set_file: bool,
}

/// Frames `msg`: its JSON, after its length as a little-endian `u32`.
pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("these messages always serialize");
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// The length of a frame from its 4-byte header; refused past `max`
/// ([`MAX_PAGE_FILE_MESSAGE_BYTES`] for a request,
/// [`MAX_PAGE_FILE_ANSWER_BYTES`] for an answer).
pub fn frame_len(header: [u8; 4], max: usize) -> io::Result<usize> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a page-file message of {len} bytes (at most {max})"),
        ));
    }
    Ok(len)
}

/// Parses a frame's body.
pub fn unframe<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a page-file message: {e}"),
        )
    })
}

/// Binding a Unix socket failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The lock file could not be opened or locked.
    #[error("cannot lock {lock}: {source}; check that its directory exists and is writable")]
    Lock {
        /// The lock file.
        lock: PathBuf,
        /// The kernel's error.
        source: io::Error,
    },
    /// Another process is serving on this path.
    #[error(
        "{path} is in use: {how}; stop that process first (two cannot share a socket), or pass \
         another path"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
        /// How that was found out.
        how: String,
    },
    /// The path exists but could not be inspected.
    #[error("cannot inspect {path}: {source}; check the directory's permissions")]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The kernel's error.
        source: io::Error,
    },
    /// The path exists and is not a socket: refusing to delete it.
    #[error(
        "{path} exists and is not a socket; refusing to replace it: pass another path or remove \
         the file yourself"
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// The kernel's error.
        source: io::Error,
    },
    /// `bind` failed.
    #[error("cannot listen on {path}: {source}; check that its directory exists and is writable")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The kernel's error.
        source: io::Error,
    },
}

/// A listening Unix socket, with the lock that says a process is using it.
/// Dropping it removes the socket file (if it is still this one) and
/// releases the lock.
#[derive(Debug)]
pub struct UnixSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// Device and inode of the socket file, so that only our own file is
    /// removed on drop.
    file_id: (u64, u64),
    /// Holds the `flock` for as long as the socket lives.
    _lock: File,
    /// Whether a stale socket file was replaced.
    replaced_stale: bool,
}

impl UnixSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a socket file left by an earlier process was replaced.
    pub fn replaced_stale(&self) -> bool {
        self.replaced_stale
    }

    /// The listener (`None` once taken by [`UnixSocket::take_listener`]).
    pub fn listener(&self) -> &UnixListener {
        self.listener.as_ref().expect("the listener was taken")
    }

    /// Takes the listener out (to hand it to an async runtime), keeping the
    /// lock and the removal on drop.
    pub fn take_listener(&mut self) -> UnixListener {
        self.listener.take().expect("the listener was taken")
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The lock file of socket `path`: `PATH.lock`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".lock");
    PathBuf::from(name)
}

/// Listens on `path`, mode 0600. A stale socket file there (left by a
/// process that died) is replaced; a socket another process is serving on is
/// refused ([`BindError::InUse`]); any other kind of file is left alone and
/// refused.
pub fn bind(path: &Path) -> Result<UnixSocket, BindError> {
    let lock_file = lock_path(path);
    let lock_err = |source| BindError::Lock {
        lock: lock_file.clone(),
        source,
    };
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_file)
        .map_err(lock_err)?;
    match flock(lock.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
        Ok(()) => {}
        Err(nix::errno::Errno::EWOULDBLOCK) => {
            return Err(BindError::InUse {
                path: path.to_owned(),
                how: format!("another faultline process holds {}", lock_file.display()),
            });
        }
        Err(e) => return Err(lock_err(io::Error::from(e))),
    }
    let mut replaced_stale = false;
    let inspect_err = |source| BindError::Inspect {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(BindError::InUse {
                    path: path.to_owned(),
                    how: "a process is accepting connections on it".into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| BindError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })?;
                replaced_stale = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(inspect_err(source)),
        },
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(inspect_err(source)),
    }
    let bind_err = |source| BindError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // bind(2) creates the file under the umask; narrow it to the owner
    // before anyone can be told the path. (Between the two calls only a
    // process that already knew the path and the umask allowed could
    // connect; a server that must never allow that runs under umask 077.)
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    Ok(UnixSocket {
        listener: Some(listener),
        path: path.to_owned(),
        file_id: (meta.dev(), meta.ino()),
        _lock: lock,
        replaced_stale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A regular file at the path is refused and left alone; a stale socket (nobody listening)
    /// is replaced; a socket in use, by a faultline process or any other listener, is refused;
    /// the socket is the owner's only, and removed when dropped.
    #[test]
    fn one_process_per_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").expect("write");
        assert!(matches!(bind(&file), Err(BindError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");

        let sock = dir.path().join("sock");
        let first = bind(&sock).expect("first bind");
        assert!(!first.replaced_stale());
        let mode = std::fs::metadata(&sock)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let e = bind(&sock).expect_err("in use");
        assert!(e.to_string().contains("another faultline process"), "{e}");
        drop(first);
        assert!(!sock.exists(), "a closed socket is removed");

        // A process killed with SIGKILL leaves its socket file behind, and no lock.
        drop(UnixListener::bind(&sock).expect("a stale socket"));
        let again = bind(&sock).expect("a stale socket is replaced");
        assert!(again.replaced_stale());
        drop(again);

        // Something that listens without taking the lock.
        let other = UnixListener::bind(&sock).expect("another listener");
        let e = bind(&sock).expect_err("answering socket");
        assert!(e.to_string().contains("accepting connections"), "{e}");
        drop(other);
    }

    /// `unix://` URLs give their path; others none; frames round-trip and oversized ones are
    /// refused.
    #[test]
    fn urls_and_frames() {
        assert_eq!(
            unix_path("unix:///run/fl.sock"),
            Some(PathBuf::from("/run/fl.sock"))
        );
        assert_eq!(unix_path("http://127.0.0.1:7070"), None);
        let req = PageFileRequest {
            snapshot: "vm".into(),
            authorization: Some("Bearer fl_x".into()),
            working_set: Some("default".into()),
        };
        assert!(!format!("{req:?}").contains("fl_x"));
        let f = frame(&req);
        let len = frame_len(f[..4].try_into().unwrap(), MAX_PAGE_FILE_MESSAGE_BYTES).unwrap();
        assert_eq!(unframe::<PageFileRequest>(&f[4..4 + len]).unwrap(), req);
        assert!(frame_len((1u32 << 20).to_le_bytes(), MAX_PAGE_FILE_MESSAGE_BYTES).is_err());
    }
}
