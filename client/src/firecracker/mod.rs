//! A page-fault handler for Firecracker's UFFD snapshot restore (`faultline fc-handler`).
//!
//! Firecracker, loading a snapshot with `mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`,
//! maps guest memory (anonymous, or anonymous hugetlb with 2 MiB pages), creates a userfaultfd
//! with `UFFD_FEATURE_EVENT_REMOVE`, registers every region in MISSING mode, connects to `SOCKET`
//! and sends, in one `sendmsg`, a JSON array of [`GuestRegionUffdMapping`] with the uffd attached
//! as `SCM_RIGHTS` ancillary data; it keeps the socket (and its own copy of the uffd) open until
//! it exits. From then on every page the guest touches faults to whoever holds that uffd.
//!
//! [`Handler::serve`] accepts such connections on a Unix socket ([`bind`]), each on its own
//! thread, through these stages:
//!
//! 1. [`receive()`]: the message, however it is split over reads, bounded in size and time, and
//!    its fd, checked to be a userfaultfd; decoded by [`handshake::parse`], a pure function
//!    (both page size fields hold bytes; unknown fields are ignored).
//! 2. [`validate()`]: against the snapshot's manifest (page size, inside the image).
//! 3. serving: a pager on the peer's uffd ([`Pager::start_on_peer_uffd`]) until the VM hangs up
//!    (Firecracker exited) or the handler stops; then that pager is shut down, which poisons the
//!    pages it had not filled.
//!
//! A connection that brought no userfaultfd is closed with the reason logged. Once the handler
//! holds a VM's uffd, any failure (bad regions, the snapshot missing, the server unreachable past
//! the deadline, the pager not starting) poisons that VM's memory (`poison.rs`): the VM gets SIGBUS
//! at its next access and Firecracker exits with an error, instead of hanging. One VM's trouble
//! ends that VM's connection only; the handler keeps accepting and serving the others. What
//! happened to each connection is counted ([`Handler::stats`]) and reported to subscribers
//! ([`Handler::subscribe`]).
//!
//! The addresses in the handshake are the *peer's*: the handler never touches that memory
//! itself. Every page goes in through `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` / `UFFDIO_POISON` on the
//! peer's uffd, whose destination addresses are resolved in the address space of the process
//! that registered them.
//!
//! [`Pager::start_on_peer_uffd`]: crate::pager::Pager::start_on_peer_uffd

pub mod handshake;
mod poison;
pub mod receive;
pub mod serve;
pub mod socket;
pub mod validate;

pub use handshake::{
    GuestRegionUffdMapping, Handshake, MAX_HANDSHAKE_BYTES, ParseError, PeerAddr, UffdRegion, parse,
};
pub use receive::{HANDSHAKE_TIMEOUT, ReceiveError, receive};
pub use serve::{
    ConnectionError, ConnectionEvent, ConnectionReport, EndReason, Handler, HandlerStats,
    MAX_CONNECTIONS, ServeError,
};
pub use socket::{BindError, HandlerSocket, bind};
pub use validate::{ValidRegion, ValidateError, validate};
