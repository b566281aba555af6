//! faultline's client: fills guest memory lazily from a faultline server through userfaultfd.
//!
//! This crate is embedded in a VMM or run as the `faultline` page-fault handler. It registers
//! the memory regions that should hold a snapshot with userfaultfd and installs pages with the
//! resolve operation the region's backing type advertises.
//!
//! # Layout
//!
//! - [`uffd`]: the only module with userfaultfd calls: open (syscall or `/dev/userfaultfd`),
//!   the `UFFDIO_API` handshake ([`uffd::Features`]), register ([`uffd::ResolveOps`]), resolve
//!   (COPY, ZEROPAGE, CONTINUE, WAKE, POISON, WRITEPROTECT), typed [`uffd::Event`]s, waiting
//!   with a stop signal; `PAGEMAP_SCAN` ([`uffd::Pagemap`]).
//! - [`backing`]: guest memory of each [`backing::BackingKind`] (anonymous, shmem, hugetlbfs,
//!   guest_memfd) with its fd and fill view, or a VMM's mapping wrapped; KVM calls fenced in
//!   [`backing::kvm`].
//! - [`strategy`]: registering a region and choosing CONTINUE, COPY or eager filling from the
//!   kernel's answer, honouring a forced [`strategy::Mode`].
//! - [`pager`]: the engine: fault threads, page states, the demand link with read-ahead and
//!   reconnection, the prefetcher, installation, completion, failure policy, statistics, and
//!   the page file of a server on this host (pages read from its image, handed over on its
//!   Unix socket);
//!   [`pager::far`]: far memory, a region larger than its local budget backed by a volume
//!   (write-protect dirty tracking, CLOCK eviction, write-back, flush).
//! - [`remote`]: connections to a faultline server ([`remote::ConnectOptions`]: TLS for
//!   `https://`, a client certificate, the bearer token; `unix:///PATH` for a server on this
//!   host), the manifest, verified page batches.
//! - [`restore`]: a whole restore in one process (`faultline restore`): memory, pager, touching
//!   threads, verification, summary; and its far-memory form (`--volume --budget`).
//! - [`firecracker`]: `faultline fc-handler`: Firecracker's UFFD snapshot-restore handshake on a
//!   Unix socket (the pure parser in `handshake`, the socket side in `receive`, `validate`
//!   against the manifest, one handler per path in `socket`), one pager per connected VM on the
//!   uffd Firecracker registered (`serve`), and a VM that cannot be served poisoned so it fails
//!   loudly.
//! - [`fleet`]: several servers: DNS names expanded, the home server of a snapshot by
//!   rendezvous hashing and the fail-over order, health checks, and the check that a
//!   fail-over server serves the same snapshot.
//! - [`fetch`]: downloading a whole snapshot into a raw memory file.
//! - [`probe`]: what this kernel offers, per backing type, as a report (`faultline probe`).
//! - `vmm` (feature `vm-memory`): pager regions from a rust-vmm `vm_memory::GuestMemoryMmap`
//!   (anonymous or memfd-backed regions), with an example.
//! - `testutil` (tests, or feature `testutil`): skip-or-fail for missing kernel facilities, and
//!   huge page reservations.

pub mod backing;
pub mod fetch;
pub mod firecracker;
pub mod fleet;
pub mod pager;
pub mod probe;
pub mod remote;
pub mod restore;
pub mod strategy;
#[cfg(any(test, feature = "testutil"))]
#[doc(hidden)]
pub mod testutil;
pub mod uffd;
#[cfg(feature = "vm-memory")]
pub mod vmm;
