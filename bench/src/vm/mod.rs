//! The micro-VM of [`faultline_microvm`] restored through faultline: [`restore`] is
//! `faultline-bench vm` and the suite's `vm` scenario. This module also joins the two crates'
//! memory types: [`ram`] and [`view`] give the harness a client [`GuestMemory`] or [`Mapping`]
//! (the harness depends on no faultline crate, so that faultline-client's tests can use it).

pub mod restore;

use faultline_client::backing::{BackingKind, GuestMemory, Mapping};
use faultline_microvm::{GuestRam, HostView};
use thiserror::Error;

/// A client memory the harness cannot run a guest on.
#[derive(Debug, Error)]
pub enum RamError {
    /// A guest_memfd memory without its VM.
    #[error(
        "this guest_memfd memory has no VM attached (it was wrapped from outside); create it \
         with GuestMemory::guest_memfd, whose VM then runs the guest"
    )]
    GuestMemfdWithoutVm,
}

/// The slot of a micro-VM on `memory`: its guest mapping for anonymous, shmem and hugetlb
/// memory; its guest_memfd on its own VM for guest_memfd memory (which must then have been
/// created here, with its VM, rather than wrapped from outside).
pub fn ram(memory: &GuestMemory) -> Result<GuestRam<'_>, RamError> {
    if memory.kind() != BackingKind::GuestMemfd {
        // SAFETY: `memory` owns (or borrows for longer than itself) its guest mapping, page-
        // aligned and read-write, and keeps it mapped while the borrow lasts; it is guest
        // memory, holding no Rust object.
        return Ok(unsafe { GuestRam::host(memory.host_addr(), memory.len()) });
    }
    let (Some(vm), Some(gmem)) = (memory.vm(), memory.fd()) else {
        return Err(RamError::GuestMemfdWithoutVm);
    };
    // SAFETY: `GuestMemory::guest_memfd*` created `gmem` on `vm` with the memory's size and maps
    // it at `host_addr()`; all three live as long as `memory`, borrowed for the result's life.
    Ok(unsafe {
        GuestRam::guest_memfd(
            vm.vm_fd(),
            gmem,
            memory.fd_offset(),
            memory.len(),
            memory.host_addr(),
        )
    })
}

/// The harness's view of `mapping`, for building images and loading memory files (not of a
/// range registered with a userfaultfd: write through its fill view).
pub fn view(mapping: &Mapping) -> HostView<'_> {
    // SAFETY: a `Mapping` is mapped read-write while it lives (borrowed for the view's life) and
    // holds no Rust object (its own contract).
    unsafe { HostView::new(mapping.addr(), mapping.len()) }
}
