//! faultline's wire protocol and the domain types both sides agree on.
//!
//! # Layout
//! - [`pb`]: the code generated from `faultline/v1/faultline.proto` (messages,
//!   tonic client and server), and [`FILE_DESCRIPTOR_SET`] for gRPC reflection.
//! - [`model`]: validated domain types ([`SnapshotId`], [`PageIndex`],
//!   [`PageRange`], [`Manifest`], [`Region`] ...). Wire messages become domain
//!   types through `TryFrom` on receive (the edge where input is validated) and
//!   wire messages again through `From` on send.
//! - [`backoff`]: exponential backoff with jitter, for every retry loop on
//!   either side.
//! - [`bitmap`]: the page bitmap used for zero maps and "pages I have" sets.
//! - [`codec`]: page batches on the wire: per-run compression and the decoded,
//!   validated [`codec::PageBatch`].
//! - [`error`]: [`ProtocolError`], what is wrong with a message, mapped to
//!   `InvalidArgument`.
//! - [`frame`]: the lean fault transport's length-delimited frames of the
//!   `Fault` stream's messages on a raw byte stream (no HTTP/2).
//! - [`unix`]: Unix-domain sockets for both sides: binding one path per
//!   process (stale replaced, live refused, mode 0600), `unix://` URLs, and
//!   the page-file handover (a snapshot's image passed as a descriptor).

pub mod backoff;
pub mod bitmap;
pub mod codec;
pub mod error;
pub mod frame;
pub mod model;
pub mod unix;

pub use bitmap::PageBitmap;
pub use codec::Compression;
pub use error::ProtocolError;
pub use model::{
    ChainDepth, CreateVolume, GuestAddress, LayerKind, Manifest, PageIndex, PageRange, PageSize,
    Region, RequestId, SealVolume, SnapshotId, VolumeSource, WorkingSetName, WriteRun,
};

/// Generated protocol code, package `faultline.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("faultline.v1");
}

/// The encoded `FileDescriptorSet` of `faultline.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("faultline_descriptor");

/// Format version of manifests written by this code.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
