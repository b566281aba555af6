//! What can go wrong starting a pager, feeding it a fault, or installing pages.

use faultline_proto::{PageIndex, SnapshotId};

use super::region::EAGAIN_TIMEOUT;
use crate::remote::RemoteError;
use crate::strategy::StrategyError;
use crate::uffd::{OpenError, ResolveError, WaitError};

/// Starting the pager failed; nothing is registered.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No server listed.
    #[error("no server given; pass at least one http://HOST:PORT")]
    NoServer,
    /// The server list cannot be used (a bad URL, a name that does not
    /// resolve).
    #[error(transparent)]
    Plan(#[from] crate::fleet::PlanError),
    /// The runtime could not start.
    #[error("cannot start the pager's runtime: {0}")]
    Runtime(std::io::Error),
    /// The manifest could not be fetched.
    #[error("cannot fetch the manifest of {snapshot}: {source}")]
    Manifest {
        /// The snapshot.
        snapshot: SnapshotId,
        /// Why.
        source: RemoteError,
    },
    /// A server accepted the connection but did not send the manifest in time.
    #[error(
        "{url} did not send the manifest of {snapshot} within {after:?} (the deadline); is the \
         server overloaded or stuck? Check it, or list another server"
    )]
    ManifestTimeout {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The server.
        url: String,
        /// How long it was given.
        after: std::time::Duration,
    },
    /// A region does not fit the snapshot.
    #[error("region {region} does not fit snapshot {snapshot}: {reason}")]
    Layout {
        /// Region index.
        region: usize,
        /// The snapshot.
        snapshot: SnapshotId,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// A uffd could not be opened.
    #[error(transparent)]
    Uffd(#[from] OpenError),
    /// Registering a region or choosing its strategy failed.
    #[error("region {region}: {source}")]
    Strategy {
        /// Region index.
        region: usize,
        /// Why.
        source: StrategyError,
    },
    /// The stop signal could not be created.
    #[error("cannot create the pager's stop signal: {0}")]
    Stop(#[from] WaitError),
    /// An EAGER region could not be filled before the guest runs.
    #[error("filling region(s) without a lazy method failed: {0}")]
    Eager(String),
}

/// Waiting for a fault fed through [`Pager::fault`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The address range is not in any region.
    #[error("{addr:#x}+{len:#x} is not inside a region of this pager")]
    Outside {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// A page could not be filled (failure policy "poison").
    #[error("page {0} could not be filled and was poisoned")]
    Poisoned(PageIndex),
    /// Resolving failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The pager ended before the pages were filled.
    #[error("the pager ended before the pages were filled: {0}")]
    Ended(super::Outcome),
}

/// Installing pages failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The process owning the memory is gone (ESRCH; ENOENT on a peer's memory): nothing can
    /// be installed there any more. Ends the pager serving it (only it).
    #[error(
        "the process owning region {region}'s memory has exited ({source}); nothing more can be \
         installed there"
    )]
    OwnerGone {
        /// Region index.
        region: usize,
        /// What the kernel said.
        source: ResolveError,
    },
    /// The kernel refused.
    #[error("installing pages of region {region} failed: {source}")]
    Resolve {
        /// Region index.
        region: usize,
        /// What the kernel said.
        source: ResolveError,
    },
    /// EAGAIN on a region's fault thread: a memory-map event is pending that
    /// only that thread reads. The fault loop reads it, then retries.
    #[error(
        "installing pages of region {region} must wait for a memory-map event (EAGAIN) that \
         the region's fault thread has not read yet"
    )]
    Again {
        /// Region index.
        region: usize,
    },
    /// EAGAIN did not clear.
    #[error(
        "installing pages of region {region} kept failing with EAGAIN for {EAGAIN_TIMEOUT:?}: \
         the fault thread is not reading memory-map events"
    )]
    Stuck {
        /// Region index.
        region: usize,
    },
    /// The region's uffd was closed (the pager is stopping) or never opened.
    #[error("region {region} is no longer registered")]
    Closed {
        /// Region index.
        region: usize,
    },
    /// Writing through the fill view failed (outside the mapping).
    #[error("writing pages into region {region} failed: {reason}")]
    Write {
        /// Region index.
        region: usize,
        /// Why.
        reason: String,
    },
}
