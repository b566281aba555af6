//! The handler's Unix socket: one handler per path. A handler restarted by its supervisor comes
//! back on the same path: the socket file a killed handler left is stale (nobody accepts on it)
//! and is replaced; a socket a live handler is using is refused with a message saying so.
//!
//! Liveness is told by an advisory lock (`flock`) on `PATH.lock`, held for as long as the
//! handler listens: the kernel drops it when the process dies, however it dies, and two handlers
//! started at the same moment cannot both win it (checking whether the socket answers, then
//! removing and binding, would let both remove each other's socket). A socket that answers
//! although nobody holds the lock (a program that does not take it) is refused too. The lock file
//! is left in place when the handler stops: removing it would race with a successor.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::{FlockArg, flock};
use thiserror::Error;

/// Binding the handler's Unix socket failed.
#[derive(Debug, Error)]
pub enum BindError {
    /// The lock file could not be opened or locked.
    #[error("cannot lock {lock}: {source}; check that its directory exists and is writable")]
    Lock {
        /// The lock file.
        lock: PathBuf,
        /// The kernel's error.
        source: io::Error,
    },
    /// Another handler is serving on this path.
    #[error(
        "{path} is in use: {how}; stop that handler first (two handlers cannot share a socket), or \
         pass another --socket"
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
        "{path} exists and is not a socket; refusing to replace it: pass another --socket path or \
         remove the file yourself"
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

/// The handler's listening socket, with the lock that says a handler is using it. Dropping it
/// removes the socket file (if it is still this one) and releases the lock.
#[derive(Debug)]
pub struct HandlerSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, so that only our own file is removed on drop.
    file_id: (u64, u64),
    /// Holds the `flock` for as long as the socket lives.
    _lock: File,
    /// Whether a stale socket file was replaced.
    replaced_stale: bool,
}

impl HandlerSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a socket file left by an earlier handler was replaced.
    pub fn replaced_stale(&self) -> bool {
        self.replaced_stale
    }

    /// The listener.
    pub(super) fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl Drop for HandlerSocket {
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

/// Listens on `path`. A stale socket file there (left by a handler that died) is replaced; a
/// socket another handler is serving on is refused ([`BindError::InUse`]); any other kind of
/// file is left alone and refused.
pub fn bind(path: &Path) -> Result<HandlerSocket, BindError> {
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
                how: format!("another faultline fc-handler holds {}", lock_file.display()),
            });
        }
        Err(e) => return Err(lock_err(io::Error::from(e))),
    }
    let mut replaced_stale = false;
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
            Err(source) => {
                return Err(BindError::Inspect {
                    path: path.to_owned(),
                    source,
                });
            }
        },
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BindError::Inspect {
                path: path.to_owned(),
                source,
            });
        }
    }
    let bind_err = |source| BindError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    Ok(HandlerSocket {
        listener,
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
    /// is replaced; a socket in use, by a handler or by any other listener, is refused.
    #[test]
    fn one_handler_per_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").expect("write");
        assert!(matches!(bind(&file), Err(BindError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");

        let sock = dir.path().join("sock");
        let first = bind(&sock).expect("first bind");
        assert!(!first.replaced_stale());
        let e = bind(&sock).expect_err("in use");
        assert!(
            e.to_string().contains("another faultline fc-handler"),
            "{e}"
        );
        drop(first);
        assert!(!sock.exists(), "a stopped handler removes its socket");

        // A handler killed with SIGKILL leaves its socket file behind, and no lock.
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
}
