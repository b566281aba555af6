//! The VMM: one VM, one memory slot at guest physical address 0, one vCPU, and a run loop that
//! collects the guest program's checksum from its port I/O.
//!
//! The slot's memory is the caller's, given as [`GuestRam`]: a host mapping (anonymous, shmem,
//! hugetlbfs; local or filled lazily by a userfaultfd pager) or a guest_memfd with its VM. The
//! harness never touches that memory itself: every access during a run is the vCPU's, so on
//! lazily filled memory the vCPU's faults are the ones the pager serves.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_GUEST_MEMFD, kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use crate::program::{PORT_CHECKSUM_HI, PORT_CHECKSUM_LO, PORT_ERROR};
use crate::state::{Regs, VcpuState};

/// How long a run may take before the harness stops it. A 50,000-page walk takes under half a
/// second on local memory here; over a remote pager each page can add a fault round trip (~50 us
/// at best, milliseconds under load), so two minutes leaves room for slow restores while a guest
/// that loops still fails a test instead of hanging it (but see [`MicroVm::run`] about a vCPU
/// waiting for a page that never comes).
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the watchdog re-sends its signal once the deadline has passed: a signal that
/// lands while the vCPU thread is outside `KVM_RUN` does not stop it, the next one will.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// Which real-time signal (from `SIGRTMIN`) kicks a vCPU thread out of `KVM_RUN`. Not 0, which
/// rust-vmm VMMs (Firecracker, Cloud Hypervisor) use for their own vCPU kicks.
const KICK_SIGNAL_OFFSET: libc::c_int = 2;

/// The memory slot's number.
const SLOT: u32 = 0;

/// The vCPU's id.
const VCPU_ID: u64 = 0;

/// The memory behind the guest's one slot, borrowed for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct GuestRam<'a> {
    /// What backs the slot.
    kind: RamKind<'a>,
}

#[derive(Debug, Clone, Copy)]
enum RamKind<'a> {
    /// A host mapping: `KVM_SET_USER_MEMORY_REGION`.
    Host {
        /// Start of the mapping.
        addr: usize,
        /// Its length.
        len: usize,
        /// Ties the mapping's validity to `'a`.
        _memory: PhantomData<&'a ()>,
    },
    /// A guest_memfd: `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`, on the VM that
    /// created it.
    GuestMemfd {
        /// The VM the guest_memfd belongs to.
        vm: BorrowedFd<'a>,
        /// The guest_memfd.
        gmem: BorrowedFd<'a>,
        /// Offset of the slot in the guest_memfd.
        offset: u64,
        /// Slot size.
        len: usize,
        /// A host mapping of the same memory (the slot's `userspace_addr`).
        addr: usize,
    },
}

impl<'a> GuestRam<'a> {
    /// A host mapping of `len` bytes at `addr`: anonymous, shmem or hugetlbfs, local or
    /// registered with a userfaultfd whose pager fills it.
    ///
    /// # Safety
    ///
    /// `addr..addr+len` must be a page-aligned read-write mapping that stays mapped for `'a`,
    /// that is while any [`MicroVm`] made from this value lives (the vCPU reads and writes it
    /// through KVM), and no Rust object may live in it.
    pub unsafe fn host(addr: usize, len: usize) -> Self {
        Self {
            kind: RamKind::Host {
                addr,
                len,
                _memory: PhantomData,
            },
        }
    }

    /// `len` bytes of guest_memfd `gmem` from `offset`, on the VM `vm` that created it; `addr`
    /// is a host mapping of the same range (`GUEST_MEMFD_FLAG_MMAP`).
    ///
    /// # Safety
    ///
    /// `gmem` must be a guest_memfd created on `vm` with `offset + len` within its size, and
    /// `addr..addr+len` a read-write mapping of it, mapped for `'a`; no Rust object may live in
    /// it.
    pub unsafe fn guest_memfd(
        vm: BorrowedFd<'a>,
        gmem: BorrowedFd<'a>,
        offset: u64,
        len: usize,
        addr: usize,
    ) -> Self {
        Self {
            kind: RamKind::GuestMemfd {
                vm,
                gmem,
                offset,
                len,
                addr,
            },
        }
    }

    /// Size of the slot in bytes.
    pub fn len(&self) -> usize {
        match self.kind {
            RamKind::Host { len, .. } | RamKind::GuestMemfd { len, .. } => len,
        }
    }

    /// Whether the slot is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A name for messages.
    fn describe(&self) -> &'static str {
        match self.kind {
            RamKind::Host { .. } => "host memory",
            RamKind::GuestMemfd { .. } => "guest_memfd",
        }
    }
}

/// Creating the VM, its memory slot or its vCPU, or moving vCPU state in or out, failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` did not open.
    #[error(
        "opening /dev/kvm failed: {0}; load kvm_intel or kvm_amd (nested virtualisation in a \
         guest) and give this user read-write access to /dev/kvm"
    )]
    OpenKvm(#[source] io::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("creating the VM (KVM_CREATE_VM) failed: {0}")]
    CreateVm(#[source] io::Error),
    /// Duplicating the VM fd of a guest_memfd's VM failed.
    #[error("duplicating the fd of the guest_memfd's VM failed: {0}")]
    DupVm(#[source] io::Error),
    /// The memory slot was refused.
    #[error(
        "creating the {len}-byte memory slot on {what} at {addr:#x} failed: {source}; the \
         memory must be page-aligned, and a guest_memfd VM can hold only one harness slot"
    )]
    Memslot {
        /// Host memory or guest_memfd.
        what: &'static str,
        /// Host address of the slot.
        addr: usize,
        /// Its size.
        len: usize,
        /// The kernel's error.
        source: io::Error,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error(
        "creating vCPU {VCPU_ID} (KVM_CREATE_VCPU) failed: {0}; a VM has room for one harness \
         vCPU, so run a guest_memfd VM through one MicroVm"
    )]
    CreateVcpu(#[source] io::Error),
    /// Giving the vCPU the host's supported CPUID failed.
    #[error("setting the vCPU's CPUID ({stage}) failed: {source}")]
    Cpuid {
        /// Which ioctl.
        stage: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
    /// Reading or writing registers failed.
    #[error("{op} failed: {source}")]
    Registers {
        /// Which ioctl.
        op: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
}

/// A run of the guest program failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// Preparing the VM or the vCPU failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed after {exits} exits: {source}")]
    Run {
        /// Exits before the failure.
        exits: u64,
        /// The kernel's error.
        source: io::Error,
    },
    /// The deadline passed.
    #[error(
        "the guest did not finish within {timeout:?} ({exits} exits so far): a guest that \
         loops, or a walk too long for the deadline"
    )]
    Timeout {
        /// The deadline.
        timeout: Duration,
        /// Exits before it.
        exits: u64,
    },
    /// The vCPU stopped for a reason the program never causes.
    #[error(
        "the guest stopped unexpectedly: {exit} at rip {rip:#x}; an access outside the slot \
         shows as MMIO, a fault (no IDT) as a shutdown"
    )]
    UnexpectedExit {
        /// The exit, as kvm-ioctls describes it.
        exit: String,
        /// Where the vCPU was.
        rip: u64,
    },
    /// The program found an unknown walk kind in its descriptor.
    #[error(
        "the guest found walk kind {kind} in its descriptor: the walk number (rdi) names no walk \
         of this image, or the walk table is corrupt"
    )]
    BadWalk {
        /// The kind it read.
        kind: u32,
    },
    /// The program halted without reporting both halves of its checksum.
    #[error("the guest halted without reporting its checksum (low half {lo:?}, high half {hi:?})")]
    NoChecksum {
        /// Low half, if reported.
        lo: Option<u32>,
        /// High half, if reported.
        hi: Option<u32>,
    },
}

/// What one run of the guest program gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunResult {
    /// The walk's checksum, as the guest reported it.
    pub checksum: u64,
    /// Exits to this process during the run (port I/O, the final `hlt`, signals).
    pub exits: u64,
    /// Wall time from the first `KVM_RUN` to the `hlt`.
    pub elapsed: Duration,
}

/// How to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Walk number to run (the program reads it from `rdi` when it starts a walk); `None`
    /// keeps the number in the vCPU's registers.
    pub walk: Option<u32>,
    /// Deadline of the run.
    pub timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            walk: None,
            timeout: DEFAULT_RUN_TIMEOUT,
        }
    }
}

impl RunOptions {
    /// Runs walk `walk`.
    pub fn walk(walk: u32) -> Self {
        Self {
            walk: Some(walk),
            ..Self::default()
        }
    }
}

fn os_error(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// A VM with one memory slot and one vCPU.
#[derive(Debug)]
pub struct MicroVm<'a> {
    /// The vCPU (declared first: closed before the VM).
    vcpu: VcpuFd,
    /// The VM (for guest_memfd, a duplicate of the fd of the VM that owns it).
    vm: VmFd,
    /// Slot size.
    mem_size: usize,
    /// The slot's memory must outlive the VM.
    _ram: PhantomData<GuestRam<'a>>,
}

impl<'a> MicroVm<'a> {
    /// A VM whose slot 0 at guest address 0 is `ram`, with vCPU 0 given the host's supported
    /// CPUID. For guest_memfd, the VM is the guest_memfd's own, which then holds this slot and
    /// this vCPU for good: make one `MicroVm` per such VM and run it as often as needed.
    pub fn new(ram: GuestRam<'a>) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| VmError::OpenKvm(os_error(e)))?;
        let vm = match ram.kind {
            RamKind::Host { .. } => kvm
                .create_vm()
                .map_err(|e| VmError::CreateVm(os_error(e)))?,
            RamKind::GuestMemfd { vm, .. } => {
                let fd = vm.try_clone_to_owned().map_err(VmError::DupVm)?;
                // SAFETY: `fd` is a fresh duplicate of a VM fd that we own and hand over; the
                // returned VmFd is its only owner and closes it.
                unsafe { kvm.create_vmfd_from_rawfd(fd.into_raw_fd()) }
                    .map_err(|e| VmError::CreateVm(os_error(e)))?
            }
        };
        let memslot_error = |addr, source| VmError::Memslot {
            what: ram.describe(),
            addr,
            len: ram.len(),
            source,
        };
        match ram.kind {
            RamKind::Host { addr, len, .. } => {
                let region = kvm_userspace_memory_region {
                    slot: SLOT,
                    flags: 0,
                    guest_phys_addr: 0,
                    memory_size: len as u64,
                    userspace_addr: addr as u64,
                };
                // SAFETY: `GuestRam::host`'s contract: the range is a read-write mapping that
                // outlives this MicroVm (and so the VM, which is this MicroVm's alone) and holds
                // no Rust object. It is the VM's only slot, so nothing overlaps.
                unsafe { vm.set_user_memory_region(region) }
                    .map_err(|e| memslot_error(addr, os_error(e)))?;
            }
            RamKind::GuestMemfd {
                gmem,
                offset,
                len,
                addr,
                ..
            } => {
                let region = kvm_userspace_memory_region2 {
                    slot: SLOT,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: 0,
                    memory_size: len as u64,
                    userspace_addr: addr as u64,
                    guest_memfd_offset: offset,
                    guest_memfd: u32::try_from(gmem.as_raw_fd()).unwrap_or(u32::MAX),
                    pad1: 0,
                    pad2: [0; 14],
                };
                // SAFETY: `GuestRam::guest_memfd`'s contract: `gmem` belongs to this VM and
                // covers the range, `addr` maps it read-write for as long as the borrow lasts.
                // The VM outlives this MicroVm (its owner holds the original fd), but the slot
                // is used only by vCPU runs, which need `&mut self` of this MicroVm.
                unsafe { vm.set_user_memory_region2(region) }
                    .map_err(|e| memslot_error(addr, os_error(e)))?;
            }
        }
        let vcpu = vm
            .create_vcpu(VCPU_ID)
            .map_err(|e| VmError::CreateVcpu(os_error(e)))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Cpuid {
                stage: "KVM_GET_SUPPORTED_CPUID",
                source: os_error(e),
            })?;
        vcpu.set_cpuid2(&cpuid).map_err(|e| VmError::Cpuid {
            stage: "KVM_SET_CPUID2",
            source: os_error(e),
        })?;
        Ok(Self {
            vcpu,
            vm,
            mem_size: ram.len(),
            _ram: PhantomData,
        })
    }

    /// Size of the memory slot.
    pub fn mem_size(&self) -> usize {
        self.mem_size
    }

    /// The VM fd, for a VMM that adds devices or slots of its own.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The vCPU's registers.
    pub fn state(&self) -> Result<VcpuState, VmError> {
        let regs = self.vcpu.get_regs().map_err(|e| VmError::Registers {
            op: "KVM_GET_REGS",
            source: os_error(e),
        })?;
        let sregs = self.vcpu.get_sregs().map_err(|e| VmError::Registers {
            op: "KVM_GET_SREGS",
            source: os_error(e),
        })?;
        Ok(VcpuState {
            regs: regs.into(),
            sregs: sregs.into(),
        })
    }

    /// Loads `state` into the vCPU (special registers first: they decide how the rest is read).
    pub fn set_state(&self, state: &VcpuState) -> Result<(), VmError> {
        let current = self.vcpu.get_sregs().map_err(|e| VmError::Registers {
            op: "KVM_GET_SREGS",
            source: os_error(e),
        })?;
        self.vcpu
            .set_sregs(&state.sregs.apply_to(current))
            .map_err(|e| VmError::Registers {
                op: "KVM_SET_SREGS",
                source: os_error(e),
            })?;
        self.set_regs(state.regs)
    }

    fn set_regs(&self, regs: Regs) -> Result<(), VmError> {
        self.vcpu
            .set_regs(&regs.into())
            .map_err(|e| VmError::Registers {
                op: "KVM_SET_REGS",
                source: os_error(e),
            })
    }

    /// Makes the program run walk `walk` the next time it starts a walk.
    pub fn select_walk(&self, walk: u32) -> Result<(), VmError> {
        let mut regs = self.state()?.regs;
        regs.rdi = u64::from(walk);
        self.set_regs(regs)
    }

    /// Runs the vCPU until the program halts after reporting its checksum.
    ///
    /// A watchdog thread interrupts `KVM_RUN` with a signal once `options.timeout` has passed,
    /// so a guest that runs forever gives [`RunError::Timeout`] rather than a hang.
    ///
    /// Not so a vCPU waiting for a page that nobody fills. Measured here: KVM is `kvm_pvm`
    /// (no hardware virtualisation; guest instructions are emulated, page-table walks read guest
    /// memory with `get_user`). A vCPU waiting in a userfaultfd fault sleeps; once the signal is
    /// pending the fault returns at once, the emulator retries it, and the thread spins in the
    /// kernel without ever returning EINTR, until the page is filled. A run on lazily filled
    /// memory therefore ends only when its pager serves every fault (or the process dies).
    pub fn run(&mut self, options: &RunOptions) -> Result<RunResult, RunError> {
        if let Some(walk) = options.walk {
            self.select_walk(walk)?;
        }
        install_kick_handler().map_err(|source| RunError::Run { exits: 0, source })?;
        let expired = AtomicBool::new(false);
        // SAFETY: pthread_self has no preconditions.
        let this_thread = unsafe { libc::pthread_self() };
        let timeout = options.timeout;
        std::thread::scope(|scope| {
            let (finished, watch) = mpsc::channel::<()>();
            let expired = &expired;
            scope.spawn(move || watchdog(&watch, this_thread, timeout, expired));
            let result = self.run_loop(expired, timeout);
            // Disconnects the channel: the watchdog stops (and stops signalling) before the
            // scope, and so this thread's run, ends.
            drop(finished);
            result
        })
    }

    fn run_loop(&mut self, expired: &AtomicBool, timeout: Duration) -> Result<RunResult, RunError> {
        let started = Instant::now();
        let mut exits = 0u64;
        let (mut lo, mut hi) = (None, None);
        loop {
            let unexpected = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    exits += 1;
                    let mut word = [0u8; 4];
                    let n = data.len().min(4);
                    word[..n].copy_from_slice(&data[..n]);
                    let value = u32::from_le_bytes(word);
                    match port {
                        PORT_CHECKSUM_LO => lo = Some(value),
                        PORT_CHECKSUM_HI => hi = Some(value),
                        PORT_ERROR => return Err(RunError::BadWalk { kind: value }),
                        _ => {}
                    }
                    if matches!(port, PORT_CHECKSUM_LO | PORT_CHECKSUM_HI | PORT_ERROR) {
                        continue;
                    }
                    format!("write of {value:#x} to port {port:#x}")
                }
                Ok(VcpuExit::Hlt) => {
                    exits += 1;
                    let elapsed = started.elapsed();
                    return match (lo, hi) {
                        (Some(lo), Some(hi)) => Ok(RunResult {
                            checksum: (u64::from(hi) << 32) | u64::from(lo),
                            exits,
                            elapsed,
                        }),
                        _ => Err(RunError::NoChecksum { lo, hi }),
                    };
                }
                Ok(VcpuExit::MmioRead(addr, _)) => format!("MMIO read at {addr:#x}"),
                Ok(VcpuExit::MmioWrite(addr, _)) => format!("MMIO write at {addr:#x}"),
                Ok(VcpuExit::Shutdown) => "shutdown (triple fault)".to_owned(),
                Ok(other) => format!("{other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    exits += 1;
                    if expired.load(Ordering::Acquire) {
                        return Err(RunError::Timeout { timeout, exits });
                    }
                    continue;
                }
                Err(e) => {
                    return Err(RunError::Run {
                        exits,
                        source: os_error(e),
                    });
                }
            };
            let rip = self.state().map(|s| s.regs.rip).unwrap_or(u64::MAX);
            return Err(RunError::UnexpectedExit {
                exit: unexpected,
                rip,
            });
        }
    }
}

/// Waits for the run to finish; past `timeout`, flags `expired` and signals `thread` until it
/// does.
fn watchdog(
    finished: &mpsc::Receiver<()>,
    thread: libc::pthread_t,
    timeout: Duration,
    expired: &AtomicBool,
) {
    if !matches!(
        finished.recv_timeout(timeout),
        Err(RecvTimeoutError::Timeout)
    ) {
        return;
    }
    expired.store(true, Ordering::Release);
    loop {
        // SAFETY: `thread` is the thread running `MicroVm::run`, which cannot return before
        // this function does (the scope joins it), so the thread id is live. The signal has a
        // no-op handler installed by `install_kick_handler`; its only effect is to interrupt a
        // blocking call with EINTR.
        unsafe { libc::pthread_kill(thread, kick_signal()) };
        if !matches!(
            finished.recv_timeout(KICK_INTERVAL),
            Err(RecvTimeoutError::Timeout)
        ) {
            return;
        }
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_signal: libc::c_int) {}

/// Installs a no-op handler for the kick signal, once per process (without it the signal would
/// kill the process; with it, `KVM_RUN` returns EINTR).
fn install_kick_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero `sigaction` is a valid value (no flags, empty mask), filled in
        // below before use.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_kick as *const () as libc::sighandler_t;
        // SAFETY: `action.sa_mask` is a live sigset_t owned by `action`.
        unsafe { libc::sigemptyset(&raw mut action.sa_mask) };
        // SAFETY: installs an async-signal-safe handler (it does nothing) for a real-time signal
        // nothing else in this process uses; the old action is not asked for.
        let rc = unsafe { libc::sigaction(kick_signal(), &raw const action, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    result.map_err(io::Error::from_raw_os_error)
}

/// Runs the program once on `ram` from `state` in a fresh [`MicroVm`]: the restore side. Start
/// the pager that fills `ram` first; the vCPU's own accesses do the faulting.
pub fn run_guest(
    ram: GuestRam<'_>,
    state: &VcpuState,
    options: &RunOptions,
) -> Result<RunResult, RunError> {
    let mut vm = MicroVm::new(ram)?;
    vm.set_state(state)?;
    vm.run(options)
}
