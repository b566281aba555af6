//! The handler: an accept loop on the Unix socket, one thread per connected VM, and each
//! connection's life: receive the handshake, fetch the manifest, validate, serve with a pager
//! until the VM hangs up (or its memory goes away, or the handler stops), or, where that cannot
//! be done once the VM's uffd is held, poison the VM's memory so that it fails loudly.
//!
//! Isolation: everything about one VM happens on its connection's thread and its pager's
//! threads; no error on one VM's socket or uffd ends the accept loop or another VM's pager.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use faultline_proto::backoff::Backoff;
use faultline_proto::{Manifest, SnapshotId};
use thiserror::Error;

use super::handshake::{Handshake, UffdRegion};
use super::poison::{PoisonEnd, peer_hung_up, poison_vm};
use super::receive::{ReceiveError, Received, Refused, readable, receive};
use super::socket::HandlerSocket;
use super::validate::{ValidateError, validate};
use crate::backing::{BackingError, GuestMemory, PeerMemory};
use crate::pager::{OnFailure, Outcome, Pager, PagerConfig, Region, StartError, Stats};
use crate::remote::{Remote, RemoteError};
use crate::uffd::{Features, OpenError, Uffd};

/// How often blocked waits (accept, a peer's socket) look at the stop flag, in milliseconds.
const POLL_INTERVAL_MS: u16 = 100;

/// Longest one attempt to fetch the manifest may take: a server that accepts and never answers
/// counts against the deadline in steps of this.
const MANIFEST_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// First pause between rounds of manifest attempts; doubled (with jitter, so that many VMs do
/// not retry in lockstep) up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Longest pause between rounds of manifest attempts.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Connections served at once, at most (each has a thread, and a pager once its handshake is
/// good). Far above what one host runs (Firecracker VMs of a few hundred MiB each); it bounds
/// what a misbehaving local peer opening connections in a loop can make the handler hold.
pub const MAX_CONNECTIONS: usize = 4096;

/// Pause after an accept error that may pass (out of fds, memory): the loop keeps serving.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serving one connection failed once the handshake arrived; the VM's memory is poisoned.
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// The handshake was malformed, or its fd is not a userfaultfd.
    #[error("bad handshake: {0}")]
    Handshake(#[from] ReceiveError),
    /// The runtime used to fetch the manifest could not start.
    #[error("cannot start a runtime to fetch the manifest: {0}")]
    Runtime(#[source] io::Error),
    /// A server answered that it cannot give the manifest (the snapshot is not there).
    #[error(
        "cannot fetch the manifest of {snapshot}: {source}; check --snapshot and that the \
         snapshot is imported on the server"
    )]
    Manifest {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The server's answer.
        source: RemoteError,
    },
    /// No server could be reached within the deadline.
    #[error(
        "no server gave the manifest of {snapshot} within --deadline {deadline:?}: {last}; check \
         --server and that faultline-server is running"
    )]
    Unreachable {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The deadline.
        deadline: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// The handler was stopped first.
    #[error("the handler is stopping")]
    Stopped,
    /// The regions do not fit the snapshot.
    #[error("the memory regions do not fit the snapshot: {0}")]
    Validate(#[from] ValidateError),
    /// A region could not be wrapped.
    #[error("region {region}: {source}")]
    Memory {
        /// Region index.
        region: usize,
        /// Why.
        source: BackingError,
    },
    /// The uffd could not be duplicated (kept to poison the memory if the pager fails to start).
    #[error("cannot duplicate the VM's uffd: {0}; raise the handler's fd limit")]
    Duplicate(#[source] io::Error),
    /// The peer's uffd could not be taken over.
    #[error("cannot use the VM's userfaultfd: {0}")]
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
    /// Accepting failed in a way that will not pass (the socket is broken).
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] io::Error),
}

/// Why a connection's pager stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// The peer closed its socket (Firecracker exited).
    PeerClosed,
    /// The handler was stopped ([`Handler::stop`]).
    HandlerStopped,
    /// The pager found the VM's memory gone (its process exited, killed) before the socket
    /// closed.
    VmGone,
    /// The pager failed on the VM's uffd and poisoned what it had not filled.
    PagerFailed,
}

/// What happened on one connection, as reported to [`Handler::subscribe`]rs.
#[derive(Debug, Clone)]
pub enum ConnectionEvent {
    /// Refused before the handler held any VM memory (no userfaultfd came); closed.
    Rejected {
        /// Why, as logged.
        reason: String,
    },
    /// The handler holds the VM's uffd but cannot serve it: its memory is poisoned, so the VM
    /// gets SIGBUS at its next access instead of hanging.
    Failed {
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
    /// Connections refused before any VM memory was held (no userfaultfd came).
    pub rejected: u64,
    /// VMs that could not be served and whose memory was poisoned.
    pub failed: u64,
    /// Pagers serving now.
    pub serving: u64,
    /// Pagers stopped because their VM exited (hung up, or its memory went away).
    pub peer_closed: u64,
    /// Pagers stopped because the handler stopped.
    pub stopped: u64,
    /// Pagers that failed on their VM's uffd (and poisoned what they had not filled).
    pub pager_failed: u64,
    /// Pagers that had filled every page when they stopped.
    pub completed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    serving: AtomicU64,
    peer_closed: AtomicU64,
    stopped: AtomicU64,
    pager_failed: AtomicU64,
    completed: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    config: PagerConfig,
    stop: AtomicBool,
    next_id: AtomicU64,
    counters: Counters,
    subscribers: Mutex<Vec<mpsc::Sender<ConnectionReport>>>,
    /// The snapshot's manifest once a server gave it (snapshots are immutable), so that later
    /// VMs do not wait for it.
    manifest: Mutex<Option<Arc<Manifest>>>,
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

    fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
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
    /// A handler serving `config.snapshot` from `config.servers`. The config's `mode` is ignored
    /// (the peer's MISSING registration means COPY), and `on_failure: Abort` means "poison": one
    /// VM's trouble must never abort the process that serves the others; the VM touching a
    /// poisoned page dies of SIGBUS, which is what aborting would have done to it.
    pub fn new(mut config: PagerConfig) -> Self {
        if config.on_failure == OnFailure::Abort {
            tracing::info!(
                "--on-failure abort means poison in the Firecracker handler: a VM whose pages \
                 cannot be fetched dies of SIGBUS; the handler serving the others never aborts"
            );
            config.on_failure = OnFailure::Poison;
        }
        Self {
            inner: Arc::new(Inner {
                config,
                stop: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
                subscribers: Mutex::new(Vec::new()),
                manifest: Mutex::new(None),
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
            failed: c.failed.load(Ordering::Relaxed),
            serving: c.serving.load(Ordering::Relaxed),
            peer_closed: c.peer_closed.load(Ordering::Relaxed),
            stopped: c.stopped.load(Ordering::Relaxed),
            pager_failed: c.pager_failed.load(Ordering::Relaxed),
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
        self.inner.is_stopped()
    }

    /// Accepts connections on `socket` until [`Handler::stop`], each served on its own thread.
    /// Blocking; returns once every connection thread has finished, and removes the socket file.
    pub fn serve(&self, socket: HandlerSocket) -> Result<(), ServeError> {
        let listener = socket.listener();
        listener
            .set_nonblocking(true)
            .map_err(ServeError::Listener)?;
        if socket.replaced_stale() {
            tracing::warn!(
                "replaced the stale socket {} left by a handler that did not stop cleanly (killed?); \
                 VMs it was still restoring cannot be served by this one (Firecracker does not \
                 reconnect): they hang at their next missing page, stop them",
                socket.path().display()
            );
        }
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        let result = self.accept_loop(&socket, &mut threads);
        // On an accept error too: stop the pagers rather than leave them without an owner.
        self.stop();
        let serving = self.inner.counters.serving.load(Ordering::Relaxed);
        if serving > 0 {
            tracing::warn!(
                "stopping {serving} pager(s): the unfilled pages of VMs still restoring are \
                 poisoned, so those VMs get SIGBUS (and Firecracker exits) at their next access to \
                 one, instead of hanging; VMs whose restore is complete are not affected"
            );
        }
        for t in threads {
            let _ = t.join();
        }
        result
    }

    fn accept_loop(
        &self,
        socket: &HandlerSocket,
        threads: &mut Vec<std::thread::JoinHandle<()>>,
    ) -> Result<(), ServeError> {
        let listener = socket.listener();
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
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK)
                    ) =>
                {
                    return Err(ServeError::Accept(e));
                }
                Err(e) => {
                    // Out of fds or memory: the VMs being served go on; try again shortly.
                    tracing::error!("accepting a connection failed: {e}; retrying");
                    std::thread::sleep(ACCEPT_ERROR_PAUSE);
                    continue;
                }
            };
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            self.inner.counters.accepted.fetch_add(1, Ordering::Relaxed);
            if threads.len() >= MAX_CONNECTIONS {
                self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    conn = id,
                    "{MAX_CONNECTIONS} connections are being served already; closing this one \
                     (is a process connecting in a loop?)"
                );
                drop(stream);
                continue;
            }
            let inner = self.inner.clone();
            match std::thread::Builder::new()
                .name(format!("fc-conn-{id}"))
                .spawn(move || connection(&inner, id, stream))
            {
                Ok(handle) => threads.push(handle),
                Err(e) => tracing::error!(
                    conn = id,
                    "cannot start a thread for the connection: {e}; closing it (raise the \
                     handler's thread limit)"
                ),
            }
        }
        Ok(())
    }
}

/// The pid of the process at the other end of `stream`, for logs.
fn peer_pid(stream: &UnixStream) -> Option<i32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.pid())
}

/// One connection from handshake to hang-up.
fn connection(inner: &Inner, id: u64, stream: UnixStream) {
    let pid = peer_pid(&stream).unwrap_or(0);
    let span = tracing::info_span!("vm", conn = id, pid);
    let _entered = span.enter();
    tracing::info!("connection accepted");
    let c = &inner.counters;
    let Received { handshake, uffd } = match receive(&stream, || inner.is_stopped()) {
        Ok(received) => received,
        Err(Refused {
            error,
            uffd: Some(uffd),
            handshake,
        }) => {
            let regions = handshake.map(|h| h.regions).unwrap_or_default();
            fail(inner, id, &stream, uffd, &regions, error.into());
            return;
        }
        Err(Refused {
            error, uffd: None, ..
        }) => {
            c.rejected.fetch_add(1, Ordering::Relaxed);
            if matches!(error, ReceiveError::Closed) {
                tracing::info!("closed without a handshake (a liveness probe?)");
            } else {
                tracing::warn!("closing the connection: {error}");
            }
            inner.report(
                id,
                ConnectionEvent::Rejected {
                    reason: error.to_string(),
                },
            );
            return;
        }
    };
    for f in &handshake.ignored {
        tracing::debug!(
            "ignoring field {:?} of region {} (unknown to this handler; sent by a Firecracker \
             feature branch?)",
            f.name,
            f.region
        );
    }
    let pager = match start(inner, &handshake, uffd) {
        Ok(p) => p,
        Err((error, uffd)) => {
            fail(inner, id, &stream, uffd, &handshake.regions, error);
            return;
        }
    };
    let bytes: u64 = handshake.regions.iter().map(|r| r.size).sum();
    c.serving.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        regions = handshake.regions.len(),
        "serving {:.1} MiB of guest memory from {}",
        bytes as f64 / f64::from(1 << 20),
        inner.config.snapshot
    );
    inner.report(
        id,
        ConnectionEvent::Serving {
            regions: handshake.regions.len(),
            bytes,
        },
    );

    let reason = watch_peer(inner, &stream, &pager);
    let stats = pager.stats();
    let outcome = pager.shutdown();
    let complete = outcome == Outcome::Complete;
    c.serving.fetch_sub(1, Ordering::Relaxed);
    match reason {
        EndReason::PeerClosed | EndReason::VmGone => c.peer_closed.fetch_add(1, Ordering::Relaxed),
        EndReason::HandlerStopped => c.stopped.fetch_add(1, Ordering::Relaxed),
        EndReason::PagerFailed => c.pager_failed.fetch_add(1, Ordering::Relaxed),
    };
    if complete {
        c.completed.fetch_add(1, Ordering::Relaxed);
    }
    let why = match reason {
        EndReason::PeerClosed => "the VM closed its socket".to_owned(),
        EndReason::HandlerStopped => "the handler is stopping".to_owned(),
        EndReason::VmGone | EndReason::PagerFailed => format!("the pager ended: {outcome}"),
    };
    if complete {
        tracing::info!("{why}: pager stopped (every page had been filled)");
    } else if reason == EndReason::VmGone {
        tracing::info!("{why}: that VM's pager stopped; the other VMs are not affected");
    } else {
        let p = &stats.pages_by_source;
        let filled = p.demand + p.readahead + p.prefetch + p.zero + p.local + p.eager;
        tracing::warn!(
            "{why}: pager stopped before completion ({filled} of {} pages filled; the rest were \
             poisoned: the VM gets SIGBUS if it touches one)",
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

/// A VM whose uffd the handler holds but cannot serve: log why, then poison its memory until it
/// hangs up.
fn fail(
    inner: &Inner,
    id: u64,
    stream: &UnixStream,
    uffd: OwnedFd,
    regions: &[UffdRegion],
    error: ConnectionError,
) {
    inner.counters.failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(
        "cannot serve this VM: {error}; poisoning its memory: its next access to guest memory \
         raises SIGBUS and Firecracker exits with an error"
    );
    inner.report(
        id,
        ConnectionEvent::Failed {
            reason: error.to_string(),
        },
    );
    let (end, poisoned) = poison_vm(id, uffd, regions, stream, || inner.is_stopped());
    let (upfront, faults) = (poisoned.upfront, poisoned.faults);
    match end {
        PoisonEnd::PeerClosed | PoisonEnd::VmGone => tracing::info!(
            "the failed VM is gone ({upfront} bytes poisoned up front, {faults} fault(s) answered \
             with SIGBUS)"
        ),
        PoisonEnd::HandlerStopped if regions.is_empty() => tracing::warn!(
            "the handler is stopping while the failed VM still runs; its regions were never \
             known, so its next fault will hang: stop it"
        ),
        PoisonEnd::HandlerStopped => tracing::info!(
            "the handler is stopping; the failed VM's memory stays poisoned ({upfront} bytes)"
        ),
    }
}

/// Fetches the manifest, validates the handshake against it and starts a pager on the VM's
/// uffd. On failure, gives the uffd back so that the VM's memory can be poisoned.
fn start(
    inner: &Inner,
    handshake: &Handshake,
    uffd: OwnedFd,
) -> Result<Pager, (ConnectionError, OwnedFd)> {
    let manifest = match manifest(inner) {
        Ok(m) => m,
        Err(e) => return Err((e, uffd)),
    };
    let valid = match validate(&handshake.regions, &manifest) {
        Ok(v) => v,
        Err(e) => return Err((e.into(), uffd)),
    };
    let mut regions = Vec::with_capacity(valid.len());
    for (index, v) in valid.iter().enumerate() {
        let peer = PeerMemory {
            addr: v.region.peer_addr.0 as usize,
            len: v.region.size as usize,
            kind: v.kind,
            page_size: v.region.page_size.bytes_usize(),
        };
        // The peer mapped the memory and registered it (MISSING) on the uffd it handed over, in
        // *its* address space: it is only ever filled through that uffd.
        match GuestMemory::in_peer(peer) {
            Ok(memory) => regions.push(Region {
                memory,
                snapshot_offset: v.region.offset,
            }),
            Err(source) => {
                return Err((
                    ConnectionError::Memory {
                        region: index,
                        source,
                    },
                    uffd,
                ));
            }
        }
    }
    // Kept until the pager runs: if it does not start, this copy still reaches the VM's memory.
    let keep = match uffd.try_clone() {
        Ok(fd) => fd,
        Err(e) => return Err((ConnectionError::Duplicate(e), uffd)),
    };
    // SAFETY: `receive` checked that the fd is a userfaultfd (`/proc/self/fd` names it so); a
    // uffd acts on the memory of the process that created it, which registered these ranges:
    // the peer's guest memory, in its address space, where no Rust object of this process lives
    // (this process never creates a uffd it hands out). Firecracker does the UFFDIO_API
    // handshake before sending it; without it the ioctls fail with EINVAL, which ends the pager.
    let peer = match unsafe { Uffd::from_peer(uffd, Features::EVENT_REMOVE) } {
        Ok(u) => u,
        Err(e) => return Err((ConnectionError::Uffd(e), keep)),
    };
    Pager::start_on_peer_uffd(inner.config.clone(), regions, peer)
        .map_err(|e| (ConnectionError::Start(e), keep))
}

/// The snapshot's manifest: cached, or from the first server that gives it. Servers that cannot
/// be reached (or do not answer) are retried with backoff until the deadline; then, with
/// `--on-failure wait`, retrying goes on (a warning each deadline), else the VM fails. An answer
/// that will not change (the snapshot is not there) fails at once.
fn manifest(inner: &Inner) -> Result<Arc<Manifest>, ConnectionError> {
    if let Some(m) = inner
        .manifest
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        return Ok(m);
    }
    let config = &inner.config;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ConnectionError::Runtime)?;
    let started = Instant::now();
    let mut warned = Duration::ZERO;
    let mut backoff = Backoff::new(FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE);
    loop {
        let mut last = String::new();
        for url in &config.servers {
            let attempt = rt.block_on(async {
                tokio::time::timeout(MANIFEST_ATTEMPT_TIMEOUT, async {
                    Remote::connect_with(url, &config.connect)
                        .await?
                        .manifest(&config.snapshot)
                        .await
                })
                .await
            });
            match attempt {
                Ok(Ok(m)) => {
                    let m = Arc::new(m);
                    *inner.manifest.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
                    return Ok(m);
                }
                Ok(Err(source)) if !source.is_transient() => {
                    return Err(ConnectionError::Manifest {
                        snapshot: config.snapshot.clone(),
                        source,
                    });
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => {
                    last = format!("{url} did not answer within {MANIFEST_ATTEMPT_TIMEOUT:?}");
                }
            }
        }
        if inner.is_stopped() {
            return Err(ConnectionError::Stopped);
        }
        let waited = started.elapsed();
        if waited >= config.deadline + warned {
            if config.on_failure != OnFailure::Wait {
                return Err(ConnectionError::Unreachable {
                    snapshot: config.snapshot.clone(),
                    deadline: config.deadline,
                    last,
                });
            }
            tracing::warn!(
                "no server has given the manifest of {} for {:.0?} ({last}); still retrying \
                 (--on-failure wait): the VM waits",
                config.snapshot,
                waited
            );
            warned += config.deadline.max(Duration::from_secs(1));
        }
        std::thread::sleep(backoff.next_delay());
    }
}

/// Waits until the peer hangs up (EOF or an error on its socket), its pager ends other than by
/// completing (the VM's memory gone, a uffd failure), or the handler stops. Anything the peer
/// sends after the handshake is read and ignored.
fn watch_peer(inner: &Inner, stream: &UnixStream, pager: &Pager) -> EndReason {
    loop {
        if inner.is_stopped() {
            return EndReason::HandlerStopped;
        }
        match pager.outcome() {
            None | Some(Outcome::Complete) => {}
            Some(Outcome::OwnerGone { .. }) => return EndReason::VmGone,
            Some(Outcome::Failed { .. } | Outcome::Stopped) => return EndReason::PagerFailed,
        }
        match readable(stream, POLL_INTERVAL_MS) {
            Ok(false) => {}
            Ok(true) if peer_hung_up(stream) => return EndReason::PeerClosed,
            Ok(true) => tracing::debug!("ignoring bytes sent after the handshake"),
            Err(e) => {
                tracing::warn!("polling the VM's socket failed: {e}");
                return EndReason::PeerClosed;
            }
        }
    }
}
