//! faultline's micro-VM harness: a minimal VMM on `kvm-ioctls` whose one vCPU walks guest pages
//! and reports a checksum, to measure (and test) a guest running on memory that a faultline pager
//! fills lazily against the same guest on local memory.
//!
//! It depends on no faultline crate: guest memory comes in as a [`GuestRam`] (a host mapping or a
//! guest_memfd, given by address and fd) and, for the host's own reads and writes, a
//! [`HostView`]; the harness maps memory of its own ([`AnonMemory`]) only to build snapshots.
//! So faultline-client's tests can use it as a dev-dependency without a second copy of the
//! client's types; the restore through faultline lives in faultline-bench (`faultline-bench vm`).
//!
//! # What runs
//!
//! One VM, one memory slot at guest physical address 0 (hundreds of MiB to a few GiB, host
//! memory given by the caller, or a guest_memfd), one vCPU in 64-bit long mode. The guest
//! program ([`program`]) reads a walk descriptor, visits the walk's pages reading one 8-byte
//! word from each (and optionally writing one), folds the words into a checksum, reports it by
//! port I/O and halts. The host computes the same checksum ([`image::expected_checksum`]) from
//! the memory or from a dumped memory file.
//!
//! # Guest physical memory
//!
//! Everything, including the page tables and the GDT, lives in guest memory and is restored
//! like any other page (lazily, under a pager). Addresses are offsets in the slot and in the
//! raw memory file; page `p` is at `p * 4096`.
//!
//! | guest address | page(s) | content |
//! |---|---|---|
//! | `0x0000` | 0 | zero (a stray null access reads zeros; also the never-used TSS) |
//! | `0x1000` | 1 | GDT: null, 64-bit code (`0x08`), data (`0x10`), TSS (`0x18`, 16 bytes) |
//! | `0x2000` | 2 | walk table: 64 descriptors of 64 bytes (kind, count, first, stride; result and run count written by the guest) |
//! | `0x3000` | 3 | the guest program (entry at `0x3000`) |
//! | `0x4000` | 4 | stack page (`rsp = 0x5000`; the program pushes nothing) |
//! | `0x5000` | 5 | PML4 (one entry) |
//! | `0x6000` | 6 | PDPT (one entry per GiB of slot) |
//! | `0x7000` | 7 .. 7+G | page directories, one per GiB (rounded up): the slot identity-mapped in 2 MiB pages |
//! | [`Layout::lists_addr`] | .. | page lists of list walks, u32 page indices, packed; area rounded up to 4 KiB |
//! | [`Layout::data_start`] `* 4096` | .. end | data pages |
//!
//! Data page `p` holds synthetic content (zero, text or random pages, see [`pattern`]) and, unless
//! it is a zero page, its *probe word* at offset [`PROBE_OFFSET`] (`0x7f8`), derived from the
//! seed and `p`. A writing walk stores the running checksum at [`WRITE_OFFSET`] (`0x800`).
//!
//! # Use
//!
//! - Build: [`build_image`] writes an [`ImageSpec`] (slot size, seed, walks) into memory and
//!   returns a [`GuestImage`] with the boot state of each walk.
//! - Memory: [`AnonMemory`] maps anonymous memory; memory mapped by someone else (a pager's,
//!   a VMM's) comes in through [`GuestRam::host`] or [`GuestRam::guest_memfd`] for the slot
//!   and [`HostView::new`] for the host's accesses (both `unsafe`: the caller vouches for the
//!   mapping).
//! - Run: [`MicroVm::new`] on a [`GuestRam`] (a host mapping or a guest_memfd), then
//!   [`MicroVm::set_state`] and [`MicroVm::run`]; or [`run_guest`] for both at once.
//! - Snapshot: [`create_snapshot`] builds, optionally runs one walk, and writes the raw memory
//!   file and the vCPU file ([`SnapshotFiles`]).
//! - Restore: [`load_state`] reads the vCPU file; fill fresh memory (eagerly with
//!   [`load_memory`], or start a pager on it), then [`run_guest`]. The harness never touches
//!   the memory on this path: the vCPU's accesses do the faulting.
//! - Restore through faultline: `faultline_bench::vm::restore` does all of it in one process
//!   (snapshot, import, an in-process server, the pager on fresh memory of a chosen backing, the
//!   run, the checksum check); `faultline-bench vm` is its command line.
//!
//! # Layout
//! - [`layout`]: where things are in guest memory (the table above), the GDT and page tables.
//! - [`program`]: the guest program, assembled with iced-x86, and its walk descriptors.
//! - [`pattern`]: the synthetic content of data pages (zero, text, random).
//! - [`image`]: building an image in memory; reading walks and checksums back out.
//! - [`state`]: the vCPU's registers, serialisable, and the long-mode boot state.
//! - [`memory`]: the harness's own anonymous memory, and views of memory mapped by others.
//! - [`vmm`]: the VM, its one slot and vCPU, the run loop with its watchdog.
//! - [`snapshot`]: the raw memory file and the vCPU file; making and loading snapshots.

pub mod image;
pub mod layout;
pub mod memory;
pub mod pattern;
pub mod program;
pub mod snapshot;
pub mod state;
pub mod vmm;

pub use image::{
    GuestImage, ImageError, ImageSpec, InspectError, PageOrder, Walk, build_image, check_writes,
    expected_checksum, read_descriptor, read_walk,
};
pub use layout::{Layout, LayoutError, PAGE_SIZE, PROBE_OFFSET, WRITE_OFFSET};
pub use memory::{AnonMemory, GuestBytes, HostView, OutOfRange};
pub use snapshot::{
    CreatedSnapshot, SnapshotError, SnapshotFiles, VmSnapshot, create_snapshot, dump_memory,
    load_memory, load_state, save_snapshot, save_state,
};
pub use state::VcpuState;
pub use vmm::{
    DEFAULT_RUN_TIMEOUT, GuestRam, MicroVm, RunError, RunOptions, RunResult, VmError, run_guest,
};

#[cfg(test)]
mod tests;
