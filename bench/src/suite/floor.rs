//! What the latency scenario needs around its measurements: pinning every
//! thread of the process to one CPU, and counting the context switches of
//! the client's and the in-process server's threads from `/proc`.
//!
//! Why pin: on these 2-vCPU machines a wake-up that crosses to the other
//! (idle, halted) vCPU costs 35-80 µs in the hypervisor and swamps the
//! software path being measured; on one CPU a wake-up is a plain context
//! switch. Pinned figures measure the path, unpinned ones what a user sees;
//! the scenario reports both, each against the floor measured the same way.

use std::collections::HashMap;
use std::fs;

use anyhow::Context;

/// The CPU a pinned measurement runs on.
pub const PINNED_CPU: usize = 0;

/// Where the threads of a measurement run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Every thread of the process (client, in-process server, floor
    /// probes) on CPU [`PINNED_CPU`].
    Pinned,
    /// Wherever the scheduler puts them.
    Unpinned,
}

impl Placement {
    /// Both, in the order each repeat runs them.
    pub const ALL: [Placement; 2] = [Self::Pinned, Self::Unpinned];

    /// Label in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pinned => "pinned to one CPU",
            Self::Unpinned => "unpinned",
        }
    }

    /// Key in the report's data.
    pub fn key(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Unpinned => "unpinned",
        }
    }

    /// Applies the placement to every thread of the process until the guard
    /// is dropped. Threads started meanwhile inherit it from the thread that
    /// starts them (the pager's threads from the one calling `Pager::start`).
    pub fn apply(self) -> anyhow::Result<PinGuard> {
        match self {
            Self::Pinned => pin_process(PINNED_CPU),
            Self::Unpinned => Ok(PinGuard { restore: None }),
        }
    }
}

/// Puts every thread of the process back on the CPUs it was allowed before
/// (see [`Placement::apply`]).
#[must_use]
pub struct PinGuard {
    restore: Option<libc::cpu_set_t>,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard")
            .field("pinned", &self.restore.is_some())
            .finish()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(set) = self.restore {
            for tid in threads().unwrap_or_default() {
                // Best effort: a thread that exited meanwhile is gone anyway.
                let _ = set_affinity(tid, &set);
            }
        }
    }
}

/// The thread ids of this process.
fn threads() -> anyhow::Result<Vec<libc::pid_t>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    Ok(out)
}

fn set_affinity(tid: libc::pid_t, set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the call only
    // reads it.
    let r = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pins every thread of the process to `cpu`; the guard restores the mask
/// the calling thread had.
fn pin_process(cpu: usize) -> anyhow::Result<PinGuard> {
    // SAFETY: cpu_set_t is plain data; all zeros is the empty set.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `old` is a writable cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // CPU_SET checks no bound.
    anyhow::ensure!(cpu < libc::CPU_SETSIZE as usize, "no CPU {cpu}");
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above); `one` is writable.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    let guard = PinGuard { restore: Some(old) };
    for tid in threads()? {
        match set_affinity(tid, &one) {
            Ok(()) => {}
            // Exited since the listing.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e).with_context(|| format!("pinning thread {tid} to CPU {cpu}")),
        }
    }
    Ok(guard)
}

/// Which side of the measurement a thread is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The touching thread and the pager's threads.
    Client,
    /// The in-process server's runtime (threads named `faultline-server`).
    Server,
}

/// Context switches (voluntary + involuntary) per thread, by side, at one
/// moment.
#[derive(Clone, Debug, Default)]
pub struct Switches(HashMap<libc::pid_t, (Side, u64)>);

impl Switches {
    /// Reads `/proc/self/task/*/status` for the calling thread, every
    /// `faultline-*` thread (the pager's: fault, demand, net) and the
    /// server's. Other threads (a progress bar's) are left out.
    pub fn now() -> anyhow::Result<Self> {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        let mut out = HashMap::new();
        for tid in threads()? {
            let dir = format!("/proc/self/task/{tid}");
            // A thread may exit between the listing and the read: skip it.
            let (Ok(comm), Ok(status)) = (
                fs::read_to_string(format!("{dir}/comm")),
                fs::read_to_string(format!("{dir}/status")),
            ) else {
                continue;
            };
            // `comm` is the thread name cut to 15 bytes.
            let side = if comm.starts_with("faultline-serv") {
                Side::Server
            } else if tid == me || comm.starts_with("faultline-") {
                Side::Client
            } else {
                continue;
            };
            out.insert(tid, (side, switches_in(&status)));
        }
        Ok(Self(out))
    }

    /// Switches per side from `before` to `self` (threads started since count
    /// from zero; threads that ended since are lost, so take both readings
    /// while the threads of interest live).
    pub fn since(&self, before: &Switches) -> HashMap<Side, u64> {
        let mut out = HashMap::new();
        for (tid, (side, n)) in &self.0 {
            let was = before.0.get(tid).map_or(0, |(_, b)| *b);
            *out.entry(*side).or_insert(0) += n.saturating_sub(was);
        }
        out
    }
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of a
/// `/proc/.../status` text.
fn switches_in(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kinds of context switch are added up from a status text.
    #[test]
    fn switches_add_both_kinds() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(switches_in(status), 15);
    }

    /// Pinning moves every thread (an existing one included) to one CPU, and
    /// the guard gives the old mask back.
    #[test]
    fn pinning_covers_existing_threads_and_is_undone() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            rx.recv().ok();
        });
        let tid = tid_rx.recv().unwrap();
        let count = |tid| {
            // SAFETY: cpu_set_t is plain data; all zeros is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is a writable cpu_set_t of the size passed.
            let r = unsafe { libc::sched_getaffinity(tid, size_of::<libc::cpu_set_t>(), &mut set) };
            assert_eq!(r, 0);
            // SAFETY: reads the set, which is initialised.
            unsafe { libc::CPU_COUNT(&set) }
        };
        let before = count(tid);
        {
            let _guard = Placement::Pinned.apply().unwrap();
            assert_eq!(count(tid), 1);
            assert_eq!(count(0), 1);
        }
        assert_eq!(count(tid), before);
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}
