//! Guest memory of each backing type, created here or wrapped from an embedding VMM.
//!
//! A [`GuestMemory`] owns (or borrows) the guest mapping the uffd is registered on, the fd behind
//! it, and, for file-backed memory, a *fill view*: a second, unregistered `MAP_SHARED` mapping of
//! the same fd through which pages are written into the page cache before `UFFDIO_CONTINUE` maps
//! them in the guest mapping. Owned parts are unmapped / closed on drop.
//!
//! | kind | created with | fill view |
//! |---|---|---|
//! | anonymous | `mmap(MAP_PRIVATE\|MAP_ANONYMOUS\|MAP_NORESERVE)` | none: resolve with COPY |
//! | shmem | `memfd_create` + `ftruncate` + `mmap(MAP_SHARED)` | second mapping of the memfd |
//! | hugetlb | as shmem with `MFD_HUGETLB\|MFD_HUGE_2MB`, 2 MiB pages | second mapping |
//! | guest-memfd | `KVM_CREATE_GUEST_MEMFD` (MMAP\|INIT_SHARED) + `mmap(MAP_SHARED)` | second mapping of the guest_memfd |
//!
//! The KVM calls guest_memfd needs are fenced in [`kvm`].

pub mod kvm;
mod mapping;

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::str::FromStr;

use serde::Serialize;
use thiserror::Error;

pub use kvm::{KvmCaps, KvmError, KvmVm};
pub use mapping::{AccessError, Mapping};

/// Size of a hugetlbfs page as faultline uses it (`MFD_HUGE_2MB`).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// The base page size of this machine (4 KiB on x86-64).
pub fn base_page_size() -> usize {
    // SAFETY: sysconf takes an integer and returns an integer; it touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// What kind of memory backs a guest region; it decides what userfaultfd can do there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackingKind {
    /// Private anonymous memory.
    #[serde(rename = "anon")]
    Anonymous,
    /// A shmem memfd mapped shared.
    Shmem,
    /// A hugetlbfs memfd (2 MiB pages) mapped shared.
    Hugetlb,
    /// A KVM guest_memfd mapped shared.
    GuestMemfd,
}

impl BackingKind {
    /// Every kind, in the order the probe reports them.
    pub const ALL: [BackingKind; 4] = [
        BackingKind::Anonymous,
        BackingKind::Shmem,
        BackingKind::Hugetlb,
        BackingKind::GuestMemfd,
    ];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anonymous => "anon",
            Self::Shmem => "shmem",
            Self::Hugetlb => "hugetlb",
            Self::GuestMemfd => "guest-memfd",
        }
    }

    /// Whether the memory is a file whose page cache can be filled through a second mapping
    /// (so that MINOR registration and CONTINUE can apply).
    pub fn is_file_backed(self) -> bool {
        !matches!(self, Self::Anonymous)
    }

    /// The page size faults are resolved in.
    pub fn page_size(self) -> usize {
        match self {
            Self::Hugetlb => HUGE_PAGE_SIZE,
            _ => base_page_size(),
        }
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown backing name.
#[derive(Debug, Error)]
#[error("unknown backing type {0:?}; expected one of: anon, shmem, hugetlb, guest-memfd")]
pub struct UnknownBackingKind(pub String);

impl FromStr for BackingKind {
    type Err = UnknownBackingKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackingKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownBackingKind(s.to_owned()))
    }
}

/// Creating or wrapping guest memory failed.
#[derive(Debug, Error)]
pub enum BackingError {
    /// The size is zero or not a multiple of the page size.
    #[error(
        "{kind} memory of {len} bytes cannot be created: the size must be a non-zero multiple of \
         its {page_size}-byte page size"
    )]
    InvalidSize {
        /// Backing kind.
        kind: BackingKind,
        /// Size asked for.
        len: usize,
        /// Its page size.
        page_size: usize,
    },
    /// `memfd_create` failed.
    #[error("creating the memfd for {kind} memory (memfd_create) failed: {source}")]
    Memfd {
        /// Backing kind.
        kind: BackingKind,
        /// The kernel's error.
        source: io::Error,
    },
    /// `ftruncate` failed.
    #[error("sizing the {kind} memfd to {len} bytes (ftruncate) failed: {source}")]
    Truncate {
        /// Backing kind.
        kind: BackingKind,
        /// Size asked for.
        len: usize,
        /// The kernel's error.
        source: io::Error,
    },
    /// `mmap` failed.
    #[error("mapping {len} bytes of {kind} memory ({view}) failed: {source}")]
    Map {
        /// Backing kind.
        kind: BackingKind,
        /// Which mapping: "guest mapping" or "fill view".
        view: &'static str,
        /// Size asked for.
        len: usize,
        /// The kernel's error.
        source: io::Error,
    },
    /// hugetlbfs had too few free huge pages (mmap reserves them and fails with ENOMEM).
    #[error(
        "not enough huge pages: {len} bytes of hugetlb memory need {needed} free 2 MiB pages but \
         {free} are free; reserve them as root with `echo {suggest} > /proc/sys/vm/nr_hugepages` \
         (and put the old value back when done)"
    )]
    HugePages {
        /// Size asked for.
        len: usize,
        /// Huge pages needed.
        needed: usize,
        /// Huge pages free and not reserved by other mappings.
        free: usize,
        /// A value of `nr_hugepages` that would do.
        suggest: usize,
    },
    /// A KVM call failed (guest_memfd).
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// An external or peer region is not aligned to its page size.
    #[error(
        "the external {kind} region {addr:#x}+{len:#x} is not aligned to its {page_size}-byte \
         page size; pass the mapping's exact start and length"
    )]
    Misaligned {
        /// Backing kind.
        kind: BackingKind,
        /// Start address.
        addr: usize,
        /// Length.
        len: usize,
        /// Page size given.
        page_size: usize,
    },
    /// Duplicating an external region's fd failed.
    #[error("duplicating the fd of the external {kind} region failed: {source}")]
    DupFd {
        /// Backing kind.
        kind: BackingKind,
        /// The kernel's error.
        source: io::Error,
    },
}

/// An existing mapping handed over by an embedding VMM (see [`GuestMemory::from_external`]).
#[derive(Debug, Clone, Copy)]
pub struct ExternalMemory<'a> {
    /// Start of the VMM's guest mapping.
    pub addr: usize,
    /// Its length.
    pub len: usize,
    /// What backs it.
    pub kind: BackingKind,
    /// Its page size (2 MiB for hugetlb, else the base page size).
    pub page_size: usize,
    /// The fd it maps, for shmem / hugetlb / guest_memfd; faultline duplicates it and maps a fill
    /// view of it. Without it, the memory can only be resolved by COPY.
    pub fd: Option<BorrowedFd<'a>>,
    /// Offset of the guest mapping in the fd.
    pub fd_offset: u64,
}

/// Guest memory mapped in another process, named by its addresses there (see
/// [`GuestMemory::in_peer`]): what Firecracker's UFFD handshake describes.
#[derive(Debug, Clone, Copy)]
pub struct PeerMemory {
    /// Start of the guest mapping, in the other process.
    pub addr: usize,
    /// Its length.
    pub len: usize,
    /// What backs it.
    pub kind: BackingKind,
    /// Its page size (2 MiB for hugetlb, else the base page size).
    pub page_size: usize,
}

/// One region of guest memory with everything needed to fill it.
#[derive(Debug)]
pub struct GuestMemory {
    /// What backs it.
    kind: BackingKind,
    /// Page size faults are resolved in.
    page_size: usize,
    /// The mapping the guest uses and the uffd is registered on.
    guest: Mapping,
    /// Unregistered second mapping of `fd` for writing pages (file-backed kinds).
    fill: Option<Mapping>,
    /// The memfd / guest_memfd (owned, or a duplicate of the VMM's).
    fd: Option<OwnedFd>,
    /// Offset of `guest` in `fd`.
    fd_offset: u64,
    /// The VM a guest_memfd belongs to (declared last: closed after the guest_memfd).
    vm: Option<KvmVm>,
}

fn check_size(kind: BackingKind, len: usize) -> Result<(), BackingError> {
    let page_size = kind.page_size();
    if len == 0 || !len.is_multiple_of(page_size) {
        return Err(BackingError::InvalidSize {
            kind,
            len,
            page_size,
        });
    }
    Ok(())
}

/// `memfd_create` + `ftruncate`.
fn memfd(
    kind: BackingKind,
    name: &CStr,
    flags: libc::c_uint,
    len: usize,
) -> Result<OwnedFd, BackingError> {
    // SAFETY: `name` is a NUL-terminated string live for the call; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BackingError::Memfd {
            kind,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(len).map_err(|_| BackingError::InvalidSize {
        kind,
        len,
        page_size: kind.page_size(),
    })?;
    // SAFETY: ftruncate on an fd we own; no memory is passed.
    if unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), size) } < 0 {
        return Err(BackingError::Truncate {
            kind,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// An external or peer region must start and end on its page size.
fn check_alignment(
    kind: BackingKind,
    addr: usize,
    len: usize,
    page_size: usize,
) -> Result<(), BackingError> {
    if page_size == 0
        || !page_size.is_power_of_two()
        || !addr.is_multiple_of(page_size)
        || !len.is_multiple_of(page_size)
        || len == 0
    {
        return Err(BackingError::Misaligned {
            kind,
            addr,
            len,
            page_size,
        });
    }
    Ok(())
}

/// Reads a number from a sysfs / procfs file.
fn read_number(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// 2 MiB huge pages that a new hugetlb mapping could still reserve: free pages minus those
/// already reserved by existing mappings (sysfs `free_hugepages - resv_hugepages`).
pub fn available_huge_pages() -> Option<usize> {
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let free = read_number(&format!("{dir}/free_hugepages"))?;
    let reserved = read_number(&format!("{dir}/resv_hugepages"))?;
    Some(free.saturating_sub(reserved))
}

/// The size of the persistent huge page pool (`/proc/sys/vm/nr_hugepages`).
pub fn nr_huge_pages() -> Option<usize> {
    read_number("/proc/sys/vm/nr_hugepages")
}

/// Maps `len` bytes of a memfd shared, translating hugetlbfs' ENOMEM into advice.
fn map_shared(
    kind: BackingKind,
    view: &'static str,
    fd: BorrowedFd<'_>,
    len: usize,
    offset: u64,
) -> Result<Mapping, BackingError> {
    Mapping::map(len, libc::MAP_SHARED, Some(fd), offset).map_err(|source| {
        if kind == BackingKind::Hugetlb && source.raw_os_error() == Some(libc::ENOMEM) {
            let needed = len / HUGE_PAGE_SIZE;
            let free = available_huge_pages().unwrap_or(0);
            let total = nr_huge_pages().unwrap_or(0);
            BackingError::HugePages {
                len,
                needed,
                free,
                suggest: total + needed.saturating_sub(free),
            }
        } else {
            BackingError::Map {
                kind,
                view,
                len,
                source,
            }
        }
    })
}

impl GuestMemory {
    /// Creates `len` bytes of guest memory of `kind` (guest_memfd on a new VM).
    pub fn new(kind: BackingKind, len: usize) -> Result<Self, BackingError> {
        match kind {
            BackingKind::Anonymous => Self::anonymous(len),
            BackingKind::Shmem => Self::shmem(len),
            BackingKind::Hugetlb => Self::hugetlb(len),
            BackingKind::GuestMemfd => Self::guest_memfd(len),
        }
    }

    /// Private anonymous memory, not reserved against overcommit (a lazily restored guest
    /// rarely touches all of it).
    pub fn anonymous(len: usize) -> Result<Self, BackingError> {
        let kind = BackingKind::Anonymous;
        check_size(kind, len)?;
        let guest = Mapping::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        )
        .map_err(|source| BackingError::Map {
            kind,
            view: "guest mapping",
            len,
            source,
        })?;
        Ok(Self {
            kind,
            page_size: kind.page_size(),
            guest,
            fill: None,
            fd: None,
            fd_offset: 0,
            vm: None,
        })
    }

    /// A shmem memfd mapped twice: the guest mapping and the fill view.
    pub fn shmem(len: usize) -> Result<Self, BackingError> {
        Self::memfd_backed(BackingKind::Shmem, c"faultline-shmem", 0, len)
    }

    /// A hugetlbfs memfd of 2 MiB pages mapped twice. Needs `len / 2 MiB` free huge pages
    /// (`/proc/sys/vm/nr_hugepages`); both mappings share one reservation.
    pub fn hugetlb(len: usize) -> Result<Self, BackingError> {
        Self::memfd_backed(
            BackingKind::Hugetlb,
            c"faultline-hugetlb",
            libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            len,
        )
    }

    fn memfd_backed(
        kind: BackingKind,
        name: &CStr,
        flags: libc::c_uint,
        len: usize,
    ) -> Result<Self, BackingError> {
        check_size(kind, len)?;
        let fd = memfd(kind, name, flags, len)?;
        Self::fd_backed(kind, fd, len, None)
    }

    /// `len` bytes of `fd` from its start, mapped shared twice: the guest
    /// mapping and the fill view (an unregistered mapping to write through).
    fn fd_backed(
        kind: BackingKind,
        fd: OwnedFd,
        len: usize,
        vm: Option<KvmVm>,
    ) -> Result<Self, BackingError> {
        let guest = map_shared(kind, "guest mapping", fd.as_fd(), len, 0)?;
        let fill = map_shared(kind, "fill view", fd.as_fd(), len, 0)?;
        Ok(Self {
            kind,
            page_size: kind.page_size(),
            guest,
            fill: Some(fill),
            fd: Some(fd),
            fd_offset: 0,
            vm,
        })
    }

    /// A guest_memfd on a new KVM VM, created mappable and shared
    /// (`GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`) and mapped shared.
    pub fn guest_memfd(len: usize) -> Result<Self, BackingError> {
        Self::guest_memfd_in(KvmVm::create()?, len)
    }

    /// A guest_memfd on `vm` (whose memslots the VMM will point at it).
    pub fn guest_memfd_in(vm: KvmVm, len: usize) -> Result<Self, BackingError> {
        let kind = BackingKind::GuestMemfd;
        check_size(kind, len)?;
        let caps = vm.caps()?;
        if caps.guest_memfd <= 0 {
            return Err(KvmError::NoGuestMemfd.into());
        }
        if !caps.guest_memfd_mappable() {
            return Err(KvmError::NoMmap {
                flags: caps.guest_memfd_flags,
            }
            .into());
        }
        let flags = kvm::GUEST_MEMFD_FLAG_MMAP | kvm::GUEST_MEMFD_FLAG_INIT_SHARED;
        let fd = vm.create_guest_memfd(len as u64, flags)?;
        // A fill view even though nothing registers guest_memfd on this kernel: where a kernel
        // does advertise MINOR there, the guest mapping gets registered and writing through it
        // would fault.
        Self::fd_backed(kind, fd, len, Some(vm))
    }

    /// Wraps a VMM's existing mapping *in this process* without taking it over: drop leaves
    /// the mapping and the VMM's fd alone (faultline keeps a duplicate of the fd and its own
    /// fill view). For memory mapped in another process use [`GuestMemory::in_peer`].
    ///
    /// # Safety
    ///
    /// `memory.addr..addr+len` must be a read-write mapping of this process, of `memory.kind`
    /// (of `memory.fd` at `fd_offset` when given), that stays mapped while the returned value
    /// lives, and no Rust object may live in it: faultline registers it with userfaultfd,
    /// installs pages there, and [`GuestMemory::guest`] reads and writes it.
    pub unsafe fn from_external(memory: ExternalMemory<'_>) -> Result<Self, BackingError> {
        let ExternalMemory {
            addr,
            len,
            kind,
            page_size,
            fd,
            fd_offset,
        } = memory;
        check_alignment(kind, addr, len, page_size)?;
        let fd = match (kind, fd) {
            (BackingKind::Anonymous, _) | (_, None) => None,
            (_, Some(fd)) => Some(
                fd.try_clone_to_owned()
                    .map_err(|source| BackingError::DupFd { kind, source })?,
            ),
        };
        let fill = match &fd {
            Some(fd) => Some(map_shared(kind, "fill view", fd.as_fd(), len, fd_offset)?),
            None => None,
        };
        Ok(Self {
            kind,
            page_size,
            // SAFETY: the caller guarantees the range stays mapped read-write while `self`
            // lives and holds no Rust object.
            guest: unsafe { Mapping::borrowed(addr, len) },
            fill,
            fd,
            fd_offset,
            vm: None,
        })
    }

    /// Names guest memory that another process mapped (and registered on the uffd it hands
    /// over, as Firecracker does): its addresses are the other process's. Safe, because nothing
    /// here ever touches it: [`GuestMemory::guest`] is a mapping whose reads and writes fail
    /// with [`AccessError::InPeer`], there is no fill view, and the pager fills it only with
    /// ioctls on the peer's uffd (COPY, ZEROPAGE, POISON, WAKE), which act on the peer's memory.
    pub fn in_peer(memory: PeerMemory) -> Result<Self, BackingError> {
        let PeerMemory {
            addr,
            len,
            kind,
            page_size,
        } = memory;
        check_alignment(kind, addr, len, page_size)?;
        Ok(Self {
            kind,
            page_size,
            guest: Mapping::in_peer(addr, len),
            fill: None,
            fd: None,
            fd_offset: 0,
            vm: None,
        })
    }

    /// Whether the memory is mapped in another process ([`GuestMemory::in_peer`]).
    pub fn is_in_peer(&self) -> bool {
        self.guest.is_in_peer()
    }

    /// What backs this memory.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Page size faults are resolved in (2 MiB for hugetlb).
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.guest.len()
    }

    /// Whether it is empty (never, for memory created here).
    pub fn is_empty(&self) -> bool {
        self.guest.is_empty()
    }

    /// Start of the guest mapping.
    pub fn host_addr(&self) -> usize {
        self.guest.addr()
    }

    /// The guest mapping: the one the guest uses and the uffd is registered on. For memory in
    /// another process, a mapping that refuses every access.
    pub fn guest(&self) -> &Mapping {
        &self.guest
    }

    /// Where to write page contents without faulting: a second, never registered `MAP_SHARED`
    /// mapping of the fd (shmem, hugetlb, guest_memfd). None for anonymous memory, and for
    /// external memory given without its fd: resolve those with COPY.
    pub fn fill_view(&self) -> Option<&Mapping> {
        self.fill.as_ref()
    }

    /// The memfd / guest_memfd behind the guest mapping.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd())
    }

    /// Offset of the guest mapping in [`GuestMemory::fd`].
    pub fn fd_offset(&self) -> u64 {
        self.fd_offset
    }

    /// The KVM VM a guest_memfd created here belongs to.
    pub fn vm(&self) -> Option<&KvmVm> {
        self.vm.as_ref()
    }

    /// The offset of `addr..addr+len` in this region, if it lies inside it.
    pub fn offset_of(&self, addr: usize, len: usize) -> Option<usize> {
        let offset = addr.checked_sub(self.host_addr())?;
        (offset.checked_add(len)? <= self.len()).then_some(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;

    /// Names round-trip through FromStr and Display, and unknown names are refused with the list.
    #[test]
    fn backing_kind_names() {
        for kind in BackingKind::ALL {
            assert_eq!(kind.to_string().parse::<BackingKind>().unwrap(), kind);
        }
        let err = "tmpfs".parse::<BackingKind>().unwrap_err().to_string();
        assert!(err.contains("anon, shmem, hugetlb, guest-memfd"), "{err}");
        assert_eq!(
            serde_json::to_string(&BackingKind::GuestMemfd).unwrap(),
            "\"guest-memfd\""
        );
        assert_eq!(
            serde_json::to_string(&BackingKind::Anonymous).unwrap(),
            "\"anon\""
        );
    }

    /// Bytes written through a shmem fill view are visible through the guest mapping.
    #[test]
    fn shmem_fill_view_shares_pages() {
        let mem = GuestMemory::shmem(4 * 4096).unwrap();
        let fill = mem.fill_view().unwrap();
        assert_ne!(fill.addr(), mem.host_addr());
        fill.write(4096 + 8, b"faultline").unwrap();
        let mut buf = [0; 9];
        mem.guest().read(4096 + 8, &mut buf).unwrap();
        assert_eq!(&buf, b"faultline");
        assert!(fill.write(4 * 4096 - 1, b"xx").is_err());
    }

    /// Sizes that are not page multiples are refused with the page size in the message.
    #[test]
    fn invalid_size_is_refused() {
        let err = GuestMemory::hugetlb(4096).unwrap_err().to_string();
        assert!(err.contains("2097152-byte page size"), "{err}");
        assert!(GuestMemory::anonymous(0).is_err());
    }

    /// A VMM's mapping wrapped by faultline is left mapped when the wrapper is dropped.
    #[test]
    fn external_memory_is_not_unmapped() {
        let owner = GuestMemory::shmem(2 * 4096).unwrap();
        owner.guest().write(0, b"vmm").unwrap();
        // SAFETY: `owner` keeps the mapping alive past `wrapped`, and it holds no Rust object.
        let wrapped = unsafe {
            GuestMemory::from_external(ExternalMemory {
                addr: owner.host_addr(),
                len: owner.len(),
                kind: BackingKind::Shmem,
                page_size: 4096,
                fd: owner.fd(),
                fd_offset: 0,
            })
        }
        .unwrap();
        let mut buf = [0; 3];
        wrapped.fill_view().unwrap().read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"vmm");
        drop(wrapped);
        owner.guest().read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"vmm");
    }

    /// hugetlb memory can be created once pages are reserved, and its two views share pages.
    #[test]
    fn hugetlb_memory_with_reserved_pages() {
        let Some(_pages) = testutil::reserve_huge_pages(2) else {
            return;
        };
        let mem = GuestMemory::hugetlb(2 * HUGE_PAGE_SIZE).unwrap();
        assert_eq!(mem.page_size(), HUGE_PAGE_SIZE);
        mem.fill_view()
            .unwrap()
            .write(HUGE_PAGE_SIZE, b"huge")
            .unwrap();
        let mut buf = [0; 4];
        mem.guest().read(HUGE_PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(&buf, b"huge");
    }

    /// Asking for more huge pages than exist gives an error that says how to reserve them.
    #[test]
    fn hugetlb_shortage_says_how_to_reserve() {
        let err = GuestMemory::hugetlb(1 << 40).unwrap_err();
        assert!(matches!(err, BackingError::HugePages { .. }), "{err}");
        assert!(
            err.to_string().contains("> /proc/sys/vm/nr_hugepages"),
            "{err}"
        );
    }

    /// guest_memfd memory is created on its own VM and writable through its mapping.
    #[test]
    fn guest_memfd_memory() {
        if !testutil::guest_memfd_available() {
            return;
        }
        let mem = GuestMemory::guest_memfd(1 << 20).unwrap();
        assert!(mem.vm().is_some() && mem.fd().is_some());
        assert_ne!(mem.fill_view().unwrap().addr(), mem.host_addr());
        mem.fill_view().unwrap().write(0, b"gmem").unwrap();
        let mut buf = [0; 4];
        mem.guest().read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"gmem");
    }
}
