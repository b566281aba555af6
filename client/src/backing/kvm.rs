//! The few KVM calls guest_memfd needs, fenced in this one file: open `/dev/kvm`, create a VM,
//! check capabilities, create a guest_memfd, and probe for KVM userfault.
//!
//! Structure layouts and request numbers follow `include/uapi/linux/kvm.h` (Linux 6.18); Debian
//! 12's headers predate guest_memfd, so they are declared here and checked by the unit tests.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use serde::Serialize;
use thiserror::Error;

use super::mapping::Mapping;

/// `KVMIO`, the ioctl type byte.
const KVMIO: u32 = 0xae;
/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: u32 = KVMIO << 8;
/// `KVM_CREATE_VM` = `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: u32 = (KVMIO << 8) | 0x01;
/// `KVM_CHECK_EXTENSION` = `_IO(KVMIO, 0x03)`.
const KVM_CHECK_EXTENSION: u32 = (KVMIO << 8) | 0x03;
/// `KVM_CREATE_GUEST_MEMFD` = `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
const KVM_CREATE_GUEST_MEMFD: u32 =
    (3 << 30) | ((size_of::<CreateGuestMemfd>() as u32) << 16) | (KVMIO << 8) | 0xd4;
/// `KVM_SET_USER_MEMORY_REGION2` = `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`.
const KVM_SET_USER_MEMORY_REGION2: u32 =
    (1 << 30) | ((size_of::<UserspaceMemoryRegion2>() as u32) << 16) | (KVMIO << 8) | 0x49;

/// `KVM_CAP_USER_MEMORY2`: `KVM_SET_USER_MEMORY_REGION2` exists.
pub const KVM_CAP_USER_MEMORY2: u32 = 231;
/// `KVM_CAP_GUEST_MEMFD`: `KVM_CREATE_GUEST_MEMFD` exists.
pub const KVM_CAP_GUEST_MEMFD: u32 = 234;
/// `KVM_CAP_GUEST_MEMFD_FLAGS`: answers the `GUEST_MEMFD_FLAG_*` bits supported.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`: the host may `mmap` the guest_memfd (else mmap fails with ENODEV).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: the memory starts shared, so the host can fault it in.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;
/// `KVM_MEM_GUEST_MEMFD`: memslot flag, the slot's memory is a guest_memfd.
const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// `KVM_MEM_USERFAULT`, as proposed upstream ("KVM: Introduce KVM Userfault"; not in 6.18's
/// uapi): vCPU accesses to pages marked in a userfault bitmap exit to userspace. A kernel that
/// does not know it rejects the memslot flag with EINVAL.
const KVM_MEM_USERFAULT: u32 = 1 << 3;

/// `struct kvm_create_guest_memfd`.
#[repr(C)]
#[derive(Debug, Default)]
struct CreateGuestMemfd {
    size: u64,
    flags: u64,
    reserved: [u64; 6],
}

/// `struct kvm_userspace_memory_region2`.
#[repr(C)]
#[derive(Debug, Default)]
struct UserspaceMemoryRegion2 {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
    guest_memfd_offset: u64,
    guest_memfd: u32,
    pad1: u32,
    pad2: [u64; 14],
}

/// A KVM call failed.
#[derive(Debug, Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "opening /dev/kvm failed: {0}; load the kvm module (kvm_intel or kvm_amd), enable \
         virtualisation (nested, in a guest), and give this user read-write access to /dev/kvm"
    )]
    Open(#[source] io::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("creating a KVM VM (KVM_CREATE_VM, type 0) failed: {0}")]
    CreateVm(#[source] io::Error),
    /// `KVM_CHECK_EXTENSION` failed.
    #[error("asking KVM about capability {cap} (KVM_CHECK_EXTENSION) failed: {source}")]
    CheckExtension {
        /// The capability number.
        cap: u32,
        /// The kernel's error.
        source: io::Error,
    },
    /// No guest_memfd at all: a kernel before 6.8, or a KVM module without it (seen: `kvm_pvm`
    /// on a 6.18 host with AMD CPUs).
    #[error(
        "this host's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD = 0); use a shmem or hugetlb \
         backing, or a host whose KVM has guest_memfd (Linux 6.8+; some KVM modules, such as \
         kvm_pvm, have none)"
    )]
    NoGuestMemfd,
    /// guest_memfd exists but the host cannot map it.
    #[error(
        "this kernel's guest_memfd cannot be mapped by the host: KVM_CAP_GUEST_MEMFD_FLAGS = \
         {flags:#x} lacks GUEST_MEMFD_FLAG_MMAP (1) or GUEST_MEMFD_FLAG_INIT_SHARED (2), which \
         faultline needs to fill it; use a newer kernel (6.18+) or a shmem backing"
    )]
    NoMmap {
        /// What the kernel answered.
        flags: u64,
    },
    /// `KVM_CREATE_GUEST_MEMFD` failed.
    #[error(
        "creating a guest_memfd of {size} bytes with flags {flags:#x} (KVM_CREATE_GUEST_MEMFD) \
         failed: {source}"
    )]
    CreateGuestMemfd {
        /// Size asked for.
        size: u64,
        /// Flags asked for.
        flags: u64,
        /// The kernel's error.
        source: io::Error,
    },
    /// Setting up the throwaway memslot of the userfault probe failed.
    #[error("probing KVM userfault: {stage} failed: {source}")]
    Probe {
        /// What was being done.
        stage: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
}

/// What KVM says about guest_memfd, for the probe report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvmCaps {
    /// `KVM_GET_API_VERSION` (always 12).
    pub api_version: i32,
    /// `KVM_CAP_GUEST_MEMFD` (234): 1 when guest_memfd exists.
    pub guest_memfd: i32,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` (244): supported `GUEST_MEMFD_FLAG_*` bits (3 = MMAP and
    /// INIT_SHARED).
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_USER_MEMORY2` (231): memslots that can name a guest_memfd.
    pub user_memory2: i32,
    /// Whether a guest_memfd memslot accepted the proposed `KVM_MEM_USERFAULT` flag (vCPU faults
    /// delivered to userspace, the way to serve guest_memfd lazily); `None` when not probed.
    pub mem_userfault: Option<bool>,
}

impl KvmCaps {
    /// Whether guest_memfd can be created and filled through a host mapping.
    pub fn guest_memfd_mappable(&self) -> bool {
        let needed = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        self.guest_memfd > 0 && self.guest_memfd_flags & needed == needed
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl(fd, request, arg)` with an integer argument.
fn ioctl_int(fd: BorrowedFd<'_>, request: u32, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: every request passed here (GET_API_VERSION, CREATE_VM, CHECK_EXTENSION) takes an
    // integer argument, not a pointer, so the kernel touches no memory of ours.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) })
}

/// A KVM VM: `/dev/kvm` and the VM fd. A guest_memfd belongs to the VM that created it; the VM
/// fd is exposed so that a VMM harness can create memslots and vCPUs on it.
#[derive(Debug)]
pub struct KvmVm {
    /// The VM (declared first: closed before `/dev/kvm`).
    vm: OwnedFd,
    /// `/dev/kvm`, for system ioctls such as `KVM_GET_VCPU_MMAP_SIZE`.
    kvm: OwnedFd,
}

impl KvmVm {
    /// Opens `/dev/kvm` and creates a VM of type 0 (the only type accepted here).
    pub fn create() -> Result<Self, KvmError> {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(KvmError::Open)?;
        let kvm = OwnedFd::from(kvm);
        let vm = ioctl_int(kvm.as_fd(), KVM_CREATE_VM, 0).map_err(KvmError::CreateVm)?;
        // SAFETY: KVM_CREATE_VM just returned this fd to us; nothing else owns it.
        let vm = unsafe { OwnedFd::from_raw_fd(vm) };
        Ok(Self { vm, kvm })
    }

    /// Wraps a VM made elsewhere (for example with `kvm-ioctls`).
    pub fn from_fds(kvm: OwnedFd, vm: OwnedFd) -> Self {
        Self { vm, kvm }
    }

    /// The `/dev/kvm` fd.
    pub fn kvm_fd(&self) -> BorrowedFd<'_> {
        self.kvm.as_fd()
    }

    /// The VM fd.
    pub fn vm_fd(&self) -> BorrowedFd<'_> {
        self.vm.as_fd()
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd (some answers, such as guest_memfd flags, depend on
    /// the VM type).
    pub fn check_extension(&self, cap: u32) -> Result<i32, KvmError> {
        ioctl_int(self.vm_fd(), KVM_CHECK_EXTENSION, libc::c_ulong::from(cap))
            .map_err(|source| KvmError::CheckExtension { cap, source })
    }

    /// What this VM says about guest_memfd (without the userfault probe, which needs a
    /// memslot; see [`probe`]).
    pub fn caps(&self) -> Result<KvmCaps, KvmError> {
        let api_version = ioctl_int(self.kvm_fd(), KVM_GET_API_VERSION, 0)
            .map_err(|source| KvmError::CheckExtension { cap: 0, source })?;
        let guest_memfd = self.check_extension(KVM_CAP_GUEST_MEMFD)?;
        let guest_memfd_flags = if guest_memfd > 0 {
            // A kernel older than the capability answers 0: no flags.
            u64::try_from(self.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)?).unwrap_or(0)
        } else {
            0
        };
        Ok(KvmCaps {
            api_version,
            guest_memfd,
            guest_memfd_flags,
            user_memory2: self.check_extension(KVM_CAP_USER_MEMORY2)?,
            mem_userfault: None,
        })
    }

    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes with `flags`.
    pub fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd, KvmError> {
        let mut arg = CreateGuestMemfd {
            size,
            flags,
            reserved: [0; 6],
        };
        // SAFETY: `arg` is a live `struct kvm_create_guest_memfd`; the request number encodes its
        // size; the kernel reads it and returns a new fd or -1.
        let fd = check(unsafe {
            libc::ioctl(
                self.vm.as_raw_fd(),
                KVM_CREATE_GUEST_MEMFD as _,
                &raw mut arg,
            )
        })
        .map_err(|source| KvmError::CreateGuestMemfd {
            size,
            flags,
            source,
        })?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// `KVM_SET_USER_MEMORY_REGION2` for one guest_memfd slot.
    fn set_guest_memfd_slot(
        &self,
        slot: u32,
        flags: u32,
        size: u64,
        userspace_addr: u64,
        gmem: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut region = UserspaceMemoryRegion2 {
            slot,
            flags: flags | KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr,
            guest_memfd_offset: 0,
            guest_memfd: u32::try_from(gmem.as_raw_fd()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        // SAFETY: `region` is a live `struct kvm_userspace_memory_region2` the kernel reads.
        // `userspace_addr` is a mapping owned by the caller for as long as the slot exists (the
        // probe deletes the slot, or drops the whole VM, before unmapping it).
        check(unsafe {
            libc::ioctl(
                self.vm.as_raw_fd(),
                KVM_SET_USER_MEMORY_REGION2 as _,
                &raw mut region,
            )
        })
        .map(drop)
    }
}

/// Asks KVM everything the probe reports, on a throwaway VM: capabilities, and whether a
/// guest_memfd memslot accepts `KVM_MEM_USERFAULT` (a slot without the flag is created first, so
/// that an EINVAL can be blamed on the flag alone).
pub fn probe() -> Result<KvmCaps, KvmError> {
    let vm = KvmVm::create()?;
    let mut caps = vm.caps()?;
    if caps.guest_memfd_mappable() && caps.user_memory2 > 0 {
        let size = 1 << 21;
        let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        let gmem = vm.create_guest_memfd(size, flags)?;
        let mapping = Mapping::map(size as usize, libc::MAP_SHARED, Some(gmem.as_fd()), 0)
            .map_err(|source| KvmError::Probe {
                stage: "mapping a guest_memfd",
                source,
            })?;
        let addr = mapping.addr() as u64;
        vm.set_guest_memfd_slot(0, 0, size, addr, gmem.as_fd())
            .map_err(|source| KvmError::Probe {
                stage: "creating a plain guest_memfd memslot",
                source,
            })?;
        // Delete it (size 0), then try again with the userfault flag.
        vm.set_guest_memfd_slot(0, 0, 0, addr, gmem.as_fd())
            .map_err(|source| KvmError::Probe {
                stage: "deleting the plain memslot",
                source,
            })?;
        caps.mem_userfault = Some(
            match vm.set_guest_memfd_slot(1, KVM_MEM_USERFAULT, size, addr, gmem.as_fd()) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
                Err(source) => {
                    return Err(KvmError::Probe {
                        stage: "creating a memslot with KVM_MEM_USERFAULT",
                        source,
                    });
                }
            },
        );
        // The VM (and with it any slot) goes away before `mapping` is unmapped.
        drop(vm);
        drop(mapping);
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;

    /// The request numbers match what the C macros give for the same structs.
    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(KVM_CREATE_GUEST_MEMFD, 0xc040_aed4);
        assert_eq!(KVM_SET_USER_MEMORY_REGION2, 0x40a0_ae49);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_CHECK_EXTENSION, 0xae03);
    }

    /// KVM reports guest_memfd with MMAP and INIT_SHARED, and no KVM userfault (platform.md).
    #[test]
    fn probe_reports_guest_memfd_caps() {
        if !testutil::guest_memfd_available() {
            return;
        }
        let caps = probe().expect("KVM probe");
        assert_eq!(caps.api_version, 12);
        assert!(caps.guest_memfd > 0, "{caps:?}");
        assert!(caps.guest_memfd_mappable(), "{caps:?}");
        assert_eq!(caps.mem_userfault, Some(false), "{caps:?}");
    }
}
