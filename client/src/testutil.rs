//! Helpers for tests that need kernel facilities: fail where the machine lacks them (the
//! default), or skip with a message when `FAULTLINE_ALLOW_SKIP=1` opts out; count skips in a
//! log file for `make test`'s summary; check the refusal instead where the host's KVM has no
//! guest_memfd ([`guest_memfd_available`]); reserve huge pages and put the old pool size back.
//!
//! Compiled for this crate's tests and, with the `testutil` feature, for other crates' tests.

use std::fmt::Display;
use std::io::Write;
use std::sync::Mutex;

use crate::backing::{self, KvmVm};
use crate::uffd::Uffd;

/// The environment variable that lets tests skip (`=1`) where the kernel lacks a facility,
/// instead of failing.
pub const ALLOW_SKIP_ENV: &str = "FAULTLINE_ALLOW_SKIP";

/// The environment variable naming a file each skip appends one line to (`TEST: REASON`);
/// `make test` sets it and prints how many tests skipped.
pub const SKIP_LOG_ENV: &str = "FAULTLINE_SKIP_LOG";

/// The former opt-in to failing (`=1`), which is now the default. Still accepted: with it
/// set, skips fail even where [`ALLOW_SKIP_ENV`] allows them.
pub const REQUIRE_KERNEL_ENV: &str = "FAULTLINE_REQUIRE_KERNEL";

fn env_is_one(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Whether missing kernel facilities must fail tests: unless `FAULTLINE_ALLOW_SKIP=1` (and
/// `FAULTLINE_REQUIRE_KERNEL=1` is not set).
pub fn kernel_required() -> bool {
    !env_is_one(ALLOW_SKIP_ENV) || env_is_one(REQUIRE_KERNEL_ENV)
}

/// Fails the current test with `reason` (say what is missing and how to provide it), or, when
/// skipping is allowed, skips it: says so on stderr and appends a line to the skip log.
pub fn skip(reason: impl Display) {
    let test = test_name();
    if kernel_required() {
        panic!(
            "{test}: {reason} (this machine lacks what the test needs; provide it, or set \
             {ALLOW_SKIP_ENV}=1 to skip such tests)"
        );
    }
    log(&test, "skipped", &reason.to_string());
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}

/// Says `what` (skipped, narrowed) of `test` on stderr, and in a line of the skip log if there
/// is one.
fn log(test: &str, what: &str, reason: &str) {
    // Straight to stderr rather than `eprintln!`, which the test harness captures and shows
    // only for failing tests: a skip must be visible.
    let _ = writeln!(std::io::stderr(), "{what} {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        // One short append per skip: concurrent tests' lines do not interleave.
        let line = format!("{what} {test}: {}\n", reason.replace('\n', " "));
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// Notes on stderr and in the skip log that a test checked less than it is written for because
/// of what this host is, not of anything the project could install: the test still passes on
/// what it did check, and `make test` lists the line with the skips.
pub fn narrowed(reason: impl Display) {
    log(&test_name(), "narrowed", &reason.to_string());
}

/// Whether this host's KVM offers guest_memfd, for a test of guest_memfd memory.
///
/// Some hosts' KVM has none: `/dev/kvm` works but `KVM_CAP_GUEST_MEMFD` is 0 (seen on a
/// `kvm_pvm` host with AMD CPUs; docs/BENCHMARKS.md, "Session 10"). That is the hypervisor's
/// KVM, which no package or setting provides, so it is not a skip: there the test checks what
/// a user on such a host gets instead (creating guest_memfd memory is refused, and the message
/// names the backings to use), says so with [`narrowed`], and returns false. No KVM at all is
/// a skip (a failure unless skipping is allowed).
pub fn guest_memfd_available() -> bool {
    match backing::GuestMemory::guest_memfd(2 << 20) {
        Ok(_) => true,
        Err(err @ backing::BackingError::Kvm(backing::KvmError::NoGuestMemfd)) => {
            assert!(
                err.to_string().contains("use a shmem or hugetlb backing"),
                "{err}"
            );
            narrowed(format!(
                "{err}; checked that guest_memfd memory is refused with the fix in the message \
                 instead"
            ));
            false
        }
        Err(err) => {
            skip(format!("cannot create guest_memfd memory: {err}"));
            false
        }
    }
}

/// Whether the process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A uffd with faultline's features, or a skip.
pub fn require_uffd() -> Option<Uffd> {
    match Uffd::open() {
        Ok(uffd) => Some(uffd),
        Err(err) => {
            skip(format!("no userfaultfd: {err}"));
            None
        }
    }
}

/// A KVM VM, or a skip.
pub fn require_kvm() -> Option<KvmVm> {
    match KvmVm::create() {
        Ok(vm) => Some(vm),
        Err(err) => {
            skip(format!("no KVM: {err}"));
            None
        }
    }
}

/// Process-wide bookkeeping of huge-page reservations made by tests running in parallel.
#[derive(Debug)]
struct Pool {
    /// Live reservations.
    users: usize,
    /// `nr_hugepages` before the first reservation; written back when the last one ends.
    original: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    users: 0,
    original: 0,
});

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Huge pages added to the pool for one test; removed again on drop (the pool goes back to its
/// original size when the last reservation ends). Create it before the memory that uses it so
/// that it is dropped after.
#[derive(Debug)]
pub struct HugePages {
    /// Pages this reservation added.
    count: usize,
}

/// Adds `count` 2 MiB pages to the huge page pool (as root), or skips.
pub fn reserve_huge_pages(count: usize) -> Option<HugePages> {
    if !is_root() {
        skip(format!(
            "reserving {count} huge pages needs root (writes {NR_HUGEPAGES})"
        ));
        return None;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(current) = backing::nr_huge_pages() else {
        skip(format!(
            "{NR_HUGEPAGES} is unreadable: no hugetlbfs in this kernel"
        ));
        return None;
    };
    if pool.users == 0 {
        pool.original = current;
    }
    let target = current + count;
    if let Err(err) = std::fs::write(NR_HUGEPAGES, target.to_string()) {
        skip(format!("writing {target} to {NR_HUGEPAGES} failed: {err}"));
        return None;
    }
    let got = backing::nr_huge_pages().unwrap_or(0);
    if got < target {
        // Memory too fragmented to find contiguous 2 MiB pages; give back what came.
        let back = if pool.users == 0 {
            pool.original
        } else {
            current
        };
        let _ = std::fs::write(NR_HUGEPAGES, back.to_string());
        skip(format!(
            "the kernel found only {} of {count} huge pages to reserve",
            got.saturating_sub(current)
        ));
        return None;
    }
    pool.users += 1;
    Some(HugePages { count })
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.users -= 1;
        let value = if pool.users == 0 {
            pool.original
        } else {
            backing::nr_huge_pages()
                .unwrap_or(0)
                .saturating_sub(self.count)
        };
        let _ = std::fs::write(NR_HUGEPAGES, value.to_string());
    }
}
