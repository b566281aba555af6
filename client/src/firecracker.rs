//! A page-fault handler for Firecracker's UFFD snapshot restore (`faultline fc-handler`).
//!
//! Firecracker, loading a snapshot with `mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`,
//! maps guest memory (anonymous, or anonymous hugetlb with 2 MiB pages), creates a userfaultfd
//! with `UFFD_FEATURE_EVENT_REMOVE`, registers every region in MISSING mode, connects to `SOCKET`
//! and sends, in one message, a JSON array of [`GuestRegionUffdMapping`] with the uffd attached as
//! `SCM_RIGHTS` ancillary data. From then on every page the guest touches faults to whoever holds
//! that uffd.
//!
//! [`Handler::serve`] accepts such connections on a Unix socket ([`bind`]), each on its own
//! thread: it receives and validates the handshake against the snapshot's manifest, wraps each
//! region ([`GuestMemory::from_external`]) and serves them with
//! [`Pager::start_on_peer_uffd`] until the peer hangs up (Firecracker exited), then shuts that
//! pager down. A bad handshake closes its connection only, with the reason logged; the handler
//! keeps accepting, and serves any number of VMs at once. What happened to each connection is
//! counted ([`Handler::stats`]) and reported to subscribers ([`Handler::subscribe`]).
//!
//! REMOVE events (the balloon) are the pager's business: the pages read as zeros afterwards.
//!
//! The addresses in the handshake are the *peer's*: the handler never touches that memory
//! itself. Every page goes in through `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` on the peer's uffd, whose
//! destination addresses are resolved in the address space of the process that registered them.

use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use faultline_proto::{Manifest, SnapshotId};
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde::Deserialize;
use thiserror::Error;

use crate::backing::{BackingError, BackingKind, ExternalMemory, GuestMemory, HUGE_PAGE_SIZE};
use crate::pager::{Pager, PagerConfig, Region, StartError, Stats};
use crate::remote::{Remote, RemoteError};
use crate::uffd::{Features, OpenError, Uffd};

/// Largest handshake accepted, in bytes: Firecracker sends a few dozen bytes per memory region.
pub const MAX_HANDSHAKE_BYTES: usize = 64 << 10;

/// How long a connection may take to send its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often blocked waits (accept, a peer's socket) look at the stop flag.
const POLL_INTERVAL_MS: u16 = 100;

/// fds accepted in one handshake's ancillary data (Firecracker sends one); more are closed and
/// the handshake refused.
const MAX_FDS: usize = 8;

/// The 4 KiB base page size Firecracker's anonymous memory uses.
const BASE_PAGE: usize = 4096;

/// One guest memory region as Firecracker describes it in the handshake
/// (`GuestRegionUffdMapping` in Firecracker's `persist.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct GuestRegionUffdMapping {
    /// Start of the region in the peer's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: usize,
    /// Offset of the region in the snapshot's memory file (and so in the faultline image).
    pub offset: u64,
    /// Page size in bytes (Firecracker 1.7 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    /// Page size in KiB (deprecated; older Firecracker sends only this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<usize>,
}

impl GuestRegionUffdMapping {
    /// The page size in bytes, from `page_size` or `page_size_kib` (which must agree when both
    /// are present). `region` is the region's index, for the error.
    pub fn page_size_bytes(&self, region: usize) -> Result<usize, HandshakeError> {
        let kib = self.page_size_kib.map(|k| k.saturating_mul(1024));
        match (self.page_size, kib) {
            (Some(b), Some(k)) if b != k => Err(HandshakeError::PageSizeDisagree {
                region,
                page_size: b,
                page_size_kib: self.page_size_kib.unwrap_or_default(),
            }),
            (Some(b), _) => Ok(b),
            (None, Some(k)) => Ok(k),
            (None, None) => Err(HandshakeError::NoPageSize { region }),
        }
    }
}

/// A region that passed validation: its page size and backing kind are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRegion {
    /// As received.
    pub mapping: GuestRegionUffdMapping,
    /// Page size in bytes (4 KiB or 2 MiB).
    pub page_size: usize,
    /// Anonymous for 4 KiB pages, hugetlb for 2 MiB pages.
    pub kind: BackingKind,
}

/// Binding the handler's Unix socket failed.
#[derive(Debug, Error)]
pub enum BindError {
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

/// Listens on `path`: a stale socket file there (left by an earlier handler) is removed first;
/// any other kind of file is left alone and refused.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| BindError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
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
    UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// A handshake was malformed or does not fit the snapshot; the connection is closed.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// `recvmsg` failed (or timed out).
    #[error(
        "receiving the memory regions failed: {0}; the peer must send them within {HANDSHAKE_TIMEOUT:?} \
         of connecting"
    )]
    Receive(#[source] io::Error),
    /// The peer hung up before sending anything.
    #[error("the peer closed the connection before sending its memory regions")]
    Closed,
    /// The message or its ancillary data was cut short.
    #[error(
        "the handshake was truncated (more than {MAX_HANDSHAKE_BYTES} bytes, or more than \
         {MAX_FDS} fds); send one JSON array and one fd"
    )]
    Truncated,
    /// No fd came with the message.
    #[error(
        "no userfaultfd came with the memory regions; attach it to the same message as SCM_RIGHTS \
         ancillary data"
    )]
    NoFd,
    /// More than one fd came with the message.
    #[error("{0} fds came with the memory regions; send exactly one, the userfaultfd")]
    ExtraFds(usize),
    /// The message is not a JSON array of regions.
    #[error(
        "the memory regions are not a JSON array of GuestRegionUffdMapping objects \
         (base_host_virt_addr, size, offset, page_size or page_size_kib): {0}"
    )]
    Json(#[source] serde_json::Error),
    /// The array is empty.
    #[error("the handshake lists no memory regions; send at least one")]
    NoRegions,
    /// A region gives neither page size field.
    #[error("region {region} gives neither page_size nor page_size_kib")]
    NoPageSize {
        /// Region index.
        region: usize,
    },
    /// `page_size` and `page_size_kib` disagree.
    #[error(
        "region {region}: page_size {page_size} and page_size_kib {page_size_kib} disagree; send \
         one of them, or both consistent"
    )]
    PageSizeDisagree {
        /// Region index.
        region: usize,
        /// In bytes.
        page_size: usize,
        /// In KiB.
        page_size_kib: usize,
    },
    /// The page size is neither 4 KiB nor 2 MiB.
    #[error(
        "region {region} has {page_size}-byte pages; only 4096 (anonymous memory) and 2097152 \
         (hugetlbfs) are supported"
    )]
    UnsupportedPageSize {
        /// Region index.
        region: usize,
        /// In bytes.
        page_size: usize,
    },
    /// The memory's page size is not the snapshot's.
    #[error(
        "region {region} has {page_size}-byte pages but snapshot {snapshot} has {snapshot_page_size}-byte \
         pages; import the memory file with `--page-size {hint}` for this VM"
    )]
    PageSizeMismatch {
        /// Region index.
        region: usize,
        /// The region's page size.
        page_size: usize,
        /// The snapshot.
        snapshot: SnapshotId,
        /// The snapshot's page size.
        snapshot_page_size: u64,
        /// The `--page-size` that would fit.
        hint: &'static str,
    },
    /// An address, size or offset is not a multiple of the page size, or the size is zero.
    #[error(
        "region {region}: {what} {value:#x} is not a non-zero multiple of the {page_size}-byte page \
         size"
    )]
    Unaligned {
        /// Region index.
        region: usize,
        /// `base_host_virt_addr`, `size` or `offset`.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The page size.
        page_size: usize,
    },
    /// A region reaches past the end of the snapshot's image.
    #[error(
        "region {region}: offset {offset:#x} + size {size:#x} is past the end of snapshot {snapshot} \
         ({image_size:#x} bytes); is this the snapshot of this VM's memory file?"
    )]
    OutsideSnapshot {
        /// Region index.
        region: usize,
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// The snapshot.
        snapshot: SnapshotId,
        /// The image's size.
        image_size: u64,
    },
    /// Two regions overlap, in the snapshot or in the address space.
    #[error("regions {first} and {second} overlap ({space}); each byte must belong to one region")]
    Overlap {
        /// One region.
        first: usize,
        /// The other.
        second: usize,
        /// "in the snapshot" or "in the peer's address space".
        space: &'static str,
    },
}

/// Serving one connection failed before its pager ran; the connection is closed.
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// The handshake was malformed or does not fit the snapshot.
    #[error("bad handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The configuration lists no server.
    #[error("no server given; pass at least one --server http://HOST:PORT")]
    NoServer,
    /// The runtime used to fetch the manifest could not start.
    #[error("cannot start a runtime to fetch the manifest: {0}")]
    Runtime(#[source] io::Error),
    /// No server gave the manifest.
    #[error(
        "cannot fetch the manifest of {snapshot}: {source}; check --server and that the snapshot \
         is imported"
    )]
    Manifest {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The last server's error.
        source: RemoteError,
    },
    /// A region could not be wrapped.
    #[error("region {region}: {source}")]
    Memory {
        /// Region index.
        region: usize,
        /// Why.
        source: BackingError,
    },
    /// The peer's uffd could not be taken over.
    #[error("cannot use the peer's userfaultfd: {0}")]
    Uffd(#[source] OpenError),
    /// The pager did not start.
    #[error("the pager did not start: {0}")]
    Start(#[source] StartError),
}

/// The accept loop failed.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The listener could not be made non-blocking.
    #[error("cannot make the listening socket non-blocking: {0}")]
    Listener(#[source] io::Error),
    /// Waiting for or accepting a connection failed.
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] io::Error),
    /// A connection thread could not be started.
    #[error("cannot start a thread for a connection: {0}; raise the process's thread limit")]
    Spawn(#[source] io::Error),
}

/// Why a connection's pager stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// The peer closed its socket (Firecracker exited).
    PeerClosed,
    /// The handler was stopped ([`Handler::stop`]).
    HandlerStopped,
}

/// What happened on one connection, as reported to [`Handler::subscribe`]rs.
#[derive(Debug, Clone)]
pub enum ConnectionEvent {
    /// The handshake (or starting the pager) failed; the connection was closed.
    Rejected {
        /// Why, as logged.
        reason: String,
    },
    /// The pager is serving the peer's memory.
    Serving {
        /// Regions.
        regions: usize,
        /// Bytes of guest memory.
        bytes: u64,
    },
    /// The pager was shut down.
    Ended {
        /// Why.
        reason: EndReason,
        /// Whether every page had been filled by then.
        complete: bool,
        /// The pager's final statistics.
        stats: Box<Stats>,
    },
}

/// One event on connection `id` (numbered from 1 in accept order).
#[derive(Debug, Clone)]
pub struct ConnectionReport {
    /// The connection.
    pub id: u64,
    /// What happened.
    pub event: ConnectionEvent,
}

/// Counters over the handler's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HandlerStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused (bad handshake, or the pager did not start).
    pub rejected: u64,
    /// Pagers serving now.
    pub serving: u64,
    /// Pagers stopped because their peer hung up.
    pub peer_closed: u64,
    /// Pagers stopped because the handler stopped.
    pub stopped: u64,
    /// Pagers that had filled every page when they stopped.
    pub completed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: AtomicU64,
    serving: AtomicU64,
    peer_closed: AtomicU64,
    stopped: AtomicU64,
    completed: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    config: PagerConfig,
    stop: AtomicBool,
    next_id: AtomicU64,
    counters: Counters,
    subscribers: Mutex<Vec<mpsc::Sender<ConnectionReport>>>,
}

impl Inner {
    fn report(&self, id: u64, event: ConnectionEvent) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|tx| {
            tx.send(ConnectionReport {
                id,
                event: event.clone(),
            })
            .is_ok()
        });
    }
}

/// The Firecracker page-fault handler: one pager per connected VM, all from the snapshot and
/// servers of one [`PagerConfig`]. Cheap to clone (shared state); clone it to stop it or read
/// its statistics from another thread while [`Handler::serve`] runs.
#[derive(Debug, Clone)]
pub struct Handler {
    inner: Arc<Inner>,
}

impl Handler {
    /// A handler serving `config.snapshot` from `config.servers` (the config's `mode` is
    /// ignored: the peer's MISSING registration means COPY).
    pub fn new(config: PagerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                stop: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
                subscribers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A channel receiving every connection event from now on.
    pub fn subscribe(&self) -> mpsc::Receiver<ConnectionReport> {
        let (tx, rx) = mpsc::channel();
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// The counters so far.
    pub fn stats(&self) -> HandlerStats {
        let c = &self.inner.counters;
        HandlerStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            serving: c.serving.load(Ordering::Relaxed),
            peer_closed: c.peer_closed.load(Ordering::Relaxed),
            stopped: c.stopped.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
        }
    }

    /// Asks [`Handler::serve`] to return: it stops accepting, shuts every pager down (pages not
    /// filled yet are poisoned: a guest touching them gets SIGBUS rather than zeros or a hang),
    /// and returns within about 100 ms plus the pagers' shutdown.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
    }

    /// Whether [`Handler::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stop.load(Ordering::Acquire)
    }

    /// Accepts connections on `listener` until [`Handler::stop`], each served on its own thread.
    /// Blocking; returns once every connection thread has finished.
    pub fn serve(&self, listener: UnixListener) -> Result<(), ServeError> {
        listener
            .set_nonblocking(true)
            .map_err(ServeError::Listener)?;
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        let result = self.accept_loop(&listener, &mut threads);
        // On an accept error too: stop the pagers rather than leave them without an owner.
        self.stop();
        for t in threads {
            let _ = t.join();
        }
        result
    }

    fn accept_loop(
        &self,
        listener: &UnixListener,
        threads: &mut Vec<std::thread::JoinHandle<()>>,
    ) -> Result<(), ServeError> {
        while !self.is_stopped() {
            threads.retain(|t| !t.is_finished());
            if !readable(listener, POLL_INTERVAL_MS).map_err(ServeError::Accept)? {
                continue;
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(ServeError::Accept(e)),
            };
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            self.inner.counters.accepted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(conn = id, "connection accepted");
            let inner = self.inner.clone();
            let handle = std::thread::Builder::new()
                .name(format!("fc-conn-{id}"))
                .spawn(move || connection(&inner, id, stream))
                .map_err(ServeError::Spawn)?;
            threads.push(handle);
        }
        Ok(())
    }
}

/// Waits up to `timeout_ms` for `fd` to be readable (or hung up); EINTR counts as "not yet".
fn readable(fd: &impl AsFd, timeout_ms: u16) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, i32::from(timeout_ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// One connection from handshake to hang-up.
fn connection(inner: &Inner, id: u64, stream: UnixStream) {
    let c = &inner.counters;
    let pager = match start_connection(&inner.config, &stream) {
        Ok(p) => p,
        Err(e) => {
            c.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(conn = id, "closing the connection: {e}");
            inner.report(
                id,
                ConnectionEvent::Rejected {
                    reason: e.to_string(),
                },
            );
            return;
        }
    };
    let bytes: u64 = (0..pager.regions().len())
        .map(|i| pager.memory(i).len() as u64)
        .sum();
    c.serving.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        conn = id,
        regions = pager.regions().len(),
        "serving {:.1} MiB of guest memory from {}",
        bytes as f64 / f64::from(1 << 20),
        inner.config.snapshot
    );
    inner.report(
        id,
        ConnectionEvent::Serving {
            regions: pager.regions().len(),
            bytes,
        },
    );

    let reason = watch_peer(inner, id, &stream);
    let complete = pager.is_complete();
    let stats = pager.stats();
    pager.shutdown();
    c.serving.fetch_sub(1, Ordering::Relaxed);
    match reason {
        EndReason::PeerClosed => c.peer_closed.fetch_add(1, Ordering::Relaxed),
        EndReason::HandlerStopped => c.stopped.fetch_add(1, Ordering::Relaxed),
    };
    if complete {
        c.completed.fetch_add(1, Ordering::Relaxed);
    }
    let why = match reason {
        EndReason::PeerClosed => "the peer closed its socket",
        EndReason::HandlerStopped => "the handler is stopping",
    };
    if complete {
        tracing::info!(
            conn = id,
            "{why}: pager stopped (every page had been filled)"
        );
    } else {
        let installed = stats.pages_by_source;
        tracing::warn!(
            conn = id,
            "{why}: pager stopped before completion ({} of {} pages filled; the rest were poisoned)",
            installed.demand
                + installed.readahead
                + installed.prefetch
                + installed.zero
                + installed.local
                + installed.eager,
            stats.pages_total
        );
    }
    inner.report(
        id,
        ConnectionEvent::Ended {
            reason,
            complete,
            stats: Box::new(stats),
        },
    );
}

/// Waits until the peer hangs up (EOF or an error on its socket) or the handler stops. Anything
/// the peer sends after the handshake is read and ignored.
fn watch_peer(inner: &Inner, id: u64, stream: &UnixStream) -> EndReason {
    let mut buf = [0u8; 4096];
    let mut stream = stream;
    loop {
        if inner.stop.load(Ordering::Acquire) {
            return EndReason::HandlerStopped;
        }
        match readable(stream, POLL_INTERVAL_MS) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(conn = id, "polling the peer's socket failed: {e}");
                return EndReason::PeerClosed;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return EndReason::PeerClosed,
            Ok(n) => tracing::debug!(conn = id, "ignoring {n} bytes sent after the handshake"),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::info!(conn = id, "the peer's socket failed: {e}");
                return EndReason::PeerClosed;
            }
        }
    }
}

/// Receives, validates and starts serving one handshake.
fn start_connection(config: &PagerConfig, stream: &UnixStream) -> Result<Pager, ConnectionError> {
    let (mappings, uffd_fd) = receive_handshake(stream)?;
    let manifest = fetch_manifest(config)?;
    let valid = validate(&mappings, &manifest, &config.snapshot)?;
    let mut regions = Vec::with_capacity(valid.len());
    for (index, r) in valid.iter().enumerate() {
        let external = ExternalMemory {
            addr: r.mapping.base_host_virt_addr as usize,
            len: r.mapping.size,
            kind: r.kind,
            page_size: r.page_size,
            fd: None,
            fd_offset: 0,
        };
        // SAFETY: the range is guest memory the peer mapped read-write and registered (MISSING)
        // on the uffd it handed us, in *its* address space; no Rust object of this process lives
        // there through the peer's mapping. The pager resolves it only with uffd ioctls on that
        // uffd (COPY, ZEROPAGE, POISON, WAKE, UNREGISTER), which act on the registering process's
        // memory. The peer keeps the memory mapped until it exits, and its exit is what stops
        // this pager (the socket hang-up).
        let memory = unsafe { GuestMemory::from_external(external) }.map_err(|source| {
            ConnectionError::Memory {
                region: index,
                source,
            }
        })?;
        regions.push(Region {
            memory,
            snapshot_offset: r.mapping.offset,
        });
    }
    let uffd = Uffd::from_peer(uffd_fd, Features::EVENT_REMOVE).map_err(ConnectionError::Uffd)?;
    Pager::start_on_peer_uffd(config.clone(), regions, uffd).map_err(ConnectionError::Start)
}

/// The manifest, from the first server that gives it.
fn fetch_manifest(config: &PagerConfig) -> Result<Manifest, ConnectionError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ConnectionError::Runtime)?;
    rt.block_on(async {
        let mut last = None;
        for url in &config.servers {
            let got = match Remote::connect_with(url, &config.connect).await {
                Ok(remote) => remote.manifest(&config.snapshot).await,
                Err(e) => Err(e),
            };
            match got {
                Ok(m) => return Ok(m),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(source) => Err(ConnectionError::Manifest {
                snapshot: config.snapshot.clone(),
                source,
            }),
            None => Err(ConnectionError::NoServer),
        }
    })
}

/// Reads the one handshake message: the JSON regions and the uffd.
pub fn receive_handshake(
    stream: &UnixStream,
) -> Result<(Vec<GuestRegionUffdMapping>, OwnedFd), HandshakeError> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(HandshakeError::Receive)?;
    let mut buf = vec![0u8; MAX_HANDSHAKE_BYTES];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, truncated, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(HandshakeError::Receive(io::Error::from(e))),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS installed this fd in our table for us; nothing else
                    // owns it, and wrapping it at once closes it on every path.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        break (msg.bytes, truncated, fds);
    };
    if len == 0 && fds.is_empty() {
        return Err(HandshakeError::Closed);
    }
    if truncated || len >= MAX_HANDSHAKE_BYTES {
        return Err(HandshakeError::Truncated);
    }
    let mut fds = fds.into_iter();
    let fd = match (fds.next(), fds.len()) {
        (None, _) => return Err(HandshakeError::NoFd),
        (Some(fd), 0) => fd,
        (Some(_), extra) => return Err(HandshakeError::ExtraFds(extra + 1)),
    };
    let regions: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(&buf[..len]).map_err(HandshakeError::Json)?;
    Ok((regions, fd))
}

/// Checks `regions` against the snapshot: non-empty, page sizes known and equal to the
/// snapshot's, everything aligned, inside the image, no overlaps.
pub fn validate(
    regions: &[GuestRegionUffdMapping],
    manifest: &Manifest,
    snapshot: &SnapshotId,
) -> Result<Vec<ValidRegion>, HandshakeError> {
    if regions.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    let snap_ps = manifest.page_size.bytes();
    let image_size = manifest.image_size();
    let mut valid: Vec<ValidRegion> = Vec::with_capacity(regions.len());
    for (index, m) in regions.iter().enumerate() {
        let page_size = m.page_size_bytes(index)?;
        let kind = match page_size {
            BASE_PAGE => BackingKind::Anonymous,
            HUGE_PAGE_SIZE => BackingKind::Hugetlb,
            _ => {
                return Err(HandshakeError::UnsupportedPageSize {
                    region: index,
                    page_size,
                });
            }
        };
        if page_size as u64 != snap_ps {
            return Err(HandshakeError::PageSizeMismatch {
                region: index,
                page_size,
                snapshot: snapshot.clone(),
                snapshot_page_size: snap_ps,
                hint: if page_size == HUGE_PAGE_SIZE {
                    "2M"
                } else {
                    "4K"
                },
            });
        }
        let ps = page_size as u64;
        for (what, value) in [
            ("base_host_virt_addr", m.base_host_virt_addr),
            ("size", m.size as u64),
            ("offset", m.offset),
        ] {
            let zero_ok = what != "size";
            if !value.is_multiple_of(ps) || (value == 0 && !zero_ok) {
                return Err(HandshakeError::Unaligned {
                    region: index,
                    what,
                    value,
                    page_size,
                });
            }
        }
        let end = m.offset.checked_add(m.size as u64);
        if end.is_none_or(|end| end > image_size) {
            return Err(HandshakeError::OutsideSnapshot {
                region: index,
                offset: m.offset,
                size: m.size as u64,
                snapshot: snapshot.clone(),
                image_size,
            });
        }
        for (other, o) in valid.iter().enumerate() {
            let o = &o.mapping;
            let overlaps = |a: u64, b: u64, len_a: u64, len_b: u64| {
                a < b.saturating_add(len_b) && b < a.saturating_add(len_a)
            };
            if overlaps(m.offset, o.offset, m.size as u64, o.size as u64) {
                return Err(HandshakeError::Overlap {
                    first: other,
                    second: index,
                    space: "in the snapshot",
                });
            }
            if overlaps(
                m.base_host_virt_addr,
                o.base_host_virt_addr,
                m.size as u64,
                o.size as u64,
            ) {
                return Err(HandshakeError::Overlap {
                    first: other,
                    second: index,
                    space: "in the peer's address space",
                });
            }
        }
        valid.push(ValidRegion {
            mapping: m.clone(),
            page_size,
            kind,
        });
    }
    Ok(valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(addr: u64, size: usize, offset: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: addr,
            size,
            offset,
            page_size: Some(4096),
            page_size_kib: None,
        }
    }

    /// Both page size fields are accepted, alone or agreeing; disagreeing is refused.
    #[test]
    fn page_size_fields() {
        let json = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4},
                       {"base_host_virt_addr":65536,"size":4096,"offset":8192,"page_size":4096,"page_size_kib":4},
                       {"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":2048}]"#;
        let r: Vec<GuestRegionUffdMapping> = serde_json::from_str(json).expect("parses");
        assert_eq!(r[0].page_size_bytes(0).expect("kib"), 4096);
        assert_eq!(r[1].page_size_bytes(1).expect("both"), 4096);
        assert!(matches!(
            r[2].page_size_bytes(2),
            Err(HandshakeError::PageSizeDisagree { .. })
        ));
        let none = GuestRegionUffdMapping {
            page_size: None,
            ..region(0, 4096, 0)
        };
        assert!(matches!(
            none.page_size_bytes(0),
            Err(HandshakeError::NoPageSize { .. })
        ));
    }

    /// A socket path holding a regular file is refused and left alone; a stale socket is replaced.
    #[test]
    fn bind_refuses_non_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").expect("write");
        assert!(matches!(bind(&file), Err(BindError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");
        let sock = dir.path().join("sock");
        drop(bind(&sock).expect("first bind"));
        let _again = bind(&sock).expect("a stale socket is replaced");
    }

    fn manifest(page_size: faultline_proto::PageSize, page_count: u64) -> Manifest {
        Manifest {
            format_version: faultline_proto::MANIFEST_FORMAT_VERSION,
            id: SnapshotId::new("s").expect("name"),
            page_size,
            page_count,
            regions: Vec::new(),
            zero_map: faultline_proto::PageBitmap::new(page_count),
            digest_algorithm: faultline_proto::model::DigestAlgorithm::Crc32c,
            digests: vec![0; page_count as usize],
            working_sets: Vec::new(),
        }
    }

    /// Validation refuses empty lists, misalignment, regions past the image, page size
    /// mismatches and overlaps, and maps page sizes to backing kinds.
    #[test]
    fn validation() {
        let m = manifest(faultline_proto::PageSize::Size4K, 16);
        let id = m.id.clone();
        let ok = validate(
            &[region(0x10000, 8192, 0), region(0x40000, 8192, 8192)],
            &m,
            &id,
        )
        .expect("valid");
        assert_eq!(ok[1].kind, BackingKind::Anonymous);
        let err = |r: &[GuestRegionUffdMapping]| validate(r, &m, &id).expect_err("refused");
        assert!(matches!(err(&[]), HandshakeError::NoRegions));
        assert!(matches!(
            err(&[region(0x10001, 4096, 0)]),
            HandshakeError::Unaligned {
                what: "base_host_virt_addr",
                ..
            }
        ));
        assert!(matches!(
            err(&[region(0x10000, 0, 0)]),
            HandshakeError::Unaligned { what: "size", .. }
        ));
        assert!(matches!(
            err(&[region(0x10000, 8192, 15 * 4096)]),
            HandshakeError::OutsideSnapshot { .. }
        ));
        assert!(matches!(
            err(&[region(0x10000, 8192, 0), region(0x40000, 8192, 4096)]),
            HandshakeError::Overlap {
                space: "in the snapshot",
                ..
            }
        ));
        assert!(matches!(
            err(&[region(0x10000, 8192, 0), region(0x11000, 4096, 8192)]),
            HandshakeError::Overlap {
                space: "in the peer's address space",
                ..
            }
        ));
        let huge = GuestRegionUffdMapping {
            page_size: Some(HUGE_PAGE_SIZE),
            ..region(0x20_0000, HUGE_PAGE_SIZE, 0)
        };
        assert!(matches!(
            err(std::slice::from_ref(&huge)),
            HandshakeError::PageSizeMismatch { hint: "2M", .. }
        ));
        let odd = GuestRegionUffdMapping {
            page_size: Some(16384),
            ..region(0x10000, 16384, 0)
        };
        assert!(matches!(
            err(&[odd]),
            HandshakeError::UnsupportedPageSize { .. }
        ));
        let m2 = manifest(faultline_proto::PageSize::Size2M, 2);
        let ok = validate(std::slice::from_ref(&huge), &m2, &id).expect("2M fits");
        assert_eq!(ok[0].kind, BackingKind::Hugetlb);
    }
}
