//! `faultline probe`: what this kernel offers faultline, asked of the kernel itself.
//!
//! For each backing type, [`run`] creates a small region, registers it in each mode on a fresh
//! uffd, records the resolve operations advertised, and reports the strategy faultline would
//! choose and why. For guest_memfd it adds what KVM says and what lazy restore would need. It
//! changes no system setting: hugetlb is skipped (with advice) when no huge pages are free.

use std::fmt;

use serde::Serialize;

use crate::backing::{self, BackingKind, GuestMemory, HUGE_PAGE_SIZE, KvmCaps, kvm};
use crate::strategy::{self, Choice, Mode, RegisterAttempt, errno_name};
use crate::uffd::{self, Features, OpenedVia, RegisterModes, Uffd};

/// Size of the region probed for kinds with 4 KiB pages.
const PROBE_LEN: usize = 1 << 20;

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// userfaultfd itself.
    pub uffd: UffdReport,
    /// One entry per backing type.
    pub backings: Vec<BackingReport>,
}

/// What the kernel says about userfaultfd as a whole.
#[derive(Debug, Clone, Serialize)]
pub struct UffdReport {
    /// Whether a uffd could be opened.
    pub available: bool,
    /// How it was opened.
    pub opened_via: Option<OpenedVia>,
    /// Features `UFFDIO_API` offers (asked with features = 0).
    pub features_offered: Features,
    /// The same, as the raw mask.
    pub features_offered_mask: String,
    /// Features faultline asks for that the kernel lacks.
    pub features_missing: Features,
    /// Why userfaultfd is unavailable, and which setting to change.
    pub error: Option<String>,
}

/// Whether a backing type was probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeStatus {
    /// Probed.
    Ok,
    /// Not probed; the message says why and what to do.
    Skipped,
    /// Probing failed; the message says how.
    Failed,
}

/// What the kernel says about one backing type.
#[derive(Debug, Clone, Serialize)]
pub struct BackingReport {
    /// The backing type.
    pub backing: BackingKind,
    /// Whether it was probed.
    pub status: ProbeStatus,
    /// Why it was skipped or failed.
    pub message: Option<String>,
    /// Registration in each mode (MISSING, MINOR, MISSING|MINOR) and the ops advertised.
    pub registrations: Vec<RegisterAttempt>,
    /// What faultline would do in auto mode, and why.
    pub choice: Option<Choice>,
    /// What KVM says (guest_memfd only).
    pub kvm: Option<KvmCaps>,
    /// What this kernel lacks for serving this backing lazily (empty when it can).
    pub lazy_restore_missing: Vec<String>,
}

impl BackingReport {
    fn new(backing: BackingKind) -> Self {
        Self {
            backing,
            status: ProbeStatus::Ok,
            message: None,
            registrations: Vec::new(),
            choice: None,
            kvm: None,
            lazy_restore_missing: Vec::new(),
        }
    }

    fn with(mut self, status: ProbeStatus, message: String) -> Self {
        self.status = status;
        self.message = Some(message);
        self
    }
}

/// Probes everything. Never fails: what cannot be probed is reported as such.
pub fn run() -> ProbeReport {
    let (uffd, usable) = probe_uffd();
    let backings = BackingKind::ALL
        .into_iter()
        .map(|kind| {
            if usable {
                probe_backing(kind)
            } else {
                BackingReport::new(kind).with(
                    ProbeStatus::Skipped,
                    "userfaultfd is unavailable (see above)".to_owned(),
                )
            }
        })
        .collect();
    ProbeReport { uffd, backings }
}

fn probe_uffd() -> (UffdReport, bool) {
    match uffd::offered_features() {
        Ok((offered, via)) => (
            UffdReport {
                available: true,
                opened_via: Some(via),
                features_offered: offered,
                features_offered_mask: format!("{offered:#x}"),
                features_missing: Features::FAULTLINE.difference(offered),
                error: None,
            },
            true,
        ),
        Err(err) => (
            UffdReport {
                available: false,
                opened_via: None,
                features_offered: Features::empty(),
                features_offered_mask: "0x0".to_owned(),
                features_missing: Features::FAULTLINE,
                error: Some(err.to_string()),
            },
            false,
        ),
    }
}

fn probe_backing(kind: BackingKind) -> BackingReport {
    let mut report = BackingReport::new(kind);
    let len = match kind {
        BackingKind::Hugetlb => HUGE_PAGE_SIZE,
        _ => PROBE_LEN,
    };
    if kind == BackingKind::Hugetlb {
        let available = backing::available_huge_pages().unwrap_or(0);
        if available < 1 {
            let pool = backing::nr_huge_pages().unwrap_or(0);
            return report.with(
                ProbeStatus::Skipped,
                format!(
                    "no free 2 MiB huge pages (nr_hugepages = {pool}); reserve some as root with \
                     `echo {} > /proc/sys/vm/nr_hugepages` and probe again",
                    pool + 1
                ),
            );
        }
    }
    if kind == BackingKind::GuestMemfd {
        match kvm::probe() {
            Ok(caps) => report.kvm = Some(caps),
            Err(err @ backing::KvmError::Open(_)) => {
                return report.with(ProbeStatus::Skipped, err.to_string());
            }
            Err(err) => return report.with(ProbeStatus::Failed, err.to_string()),
        }
    }
    let memory = match GuestMemory::new(kind, len) {
        Ok(memory) => memory,
        // A KVM without guest_memfd (some hypervisors' KVM) is this host's answer, not a failed
        // probe: nothing to register, and the message names the backings to use.
        Err(err @ backing::BackingError::Kvm(backing::KvmError::NoGuestMemfd)) => {
            return report.with(ProbeStatus::Skipped, err.to_string());
        }
        Err(err) => return report.with(ProbeStatus::Failed, err.to_string()),
    };
    // Each mode on its own, on a uffd that is dropped before `memory` (see `Uffd`'s drop note).
    let both = RegisterModes::MISSING | RegisterModes::MINOR;
    for modes in [RegisterModes::MISSING, RegisterModes::MINOR, both] {
        let uffd = match Uffd::open() {
            Ok(uffd) => uffd,
            Err(err) => return report.with(ProbeStatus::Failed, err.to_string()),
        };
        // SAFETY: `memory` was created above as guest memory; no Rust object lives there.
        let result = unsafe { uffd.register(memory.host_addr(), memory.len(), modes) };
        report.registrations.push(RegisterAttempt {
            modes,
            result: result.map_err(|e| e.errno()),
        });
    }
    let uffd = match Uffd::open() {
        Ok(uffd) => uffd,
        Err(err) => return report.with(ProbeStatus::Failed, err.to_string()),
    };
    match strategy::register_for_strategy(&uffd, &memory, Mode::Auto) {
        Ok(decision) => report.choice = Some(decision.choice),
        Err(err) => return report.with(ProbeStatus::Failed, err.to_string()),
    }
    drop(uffd);
    if kind == BackingKind::GuestMemfd {
        report.lazy_restore_missing = guest_memfd_gaps(&report);
    }
    report
}

/// What lazy restore of guest_memfd needs that the kernel's answers show missing: uffd MINOR on
/// the host mapping (host-side accesses and the CONTINUE install path), and KVM userfault (vCPU
/// accesses to a guest_memfd memslot go to guest_memfd directly, never through the host
/// mapping, so only KVM can report them).
fn guest_memfd_gaps(report: &BackingReport) -> Vec<String> {
    let mut gaps = Vec::new();
    let minor = report.registrations.iter().find(|a| {
        a.modes.contains(RegisterModes::MINOR) && !a.modes.contains(RegisterModes::MISSING)
    });
    if minor.is_none_or(|a| a.ops().is_none()) {
        let answer = minor
            .and_then(|a| a.result.err())
            .map_or_else(|| "not tried".to_owned(), errno_name);
        gaps.push(format!(
            "userfaultfd MINOR registration of guest_memfd mappings (for UFFDIO_CONTINUE): the \
             kernel answered {answer}"
        ));
    }
    match report.kvm.and_then(|caps| caps.mem_userfault) {
        Some(true) => {}
        Some(false) => gaps.push(
            "KVM userfault (memslot flag KVM_MEM_USERFAULT) to report vCPU accesses to \
             guest_memfd pages: a guest_memfd memslot with the flag was refused (EINVAL)"
                .to_owned(),
        ),
        None => gaps.push(
            "KVM userfault (memslot flag KVM_MEM_USERFAULT): could not be probed \
             (KVM_CAP_USER_MEMORY2 or a mappable guest_memfd is missing)"
                .to_owned(),
        ),
    }
    gaps
}

impl ProbeReport {
    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = &self.uffd;
        match (&u.error, u.opened_via) {
            (Some(err), _) => writeln!(f, "userfaultfd: unavailable: {err}")?,
            (None, Some(via)) => writeln!(f, "userfaultfd: available through {via}")?,
            (None, None) => writeln!(f, "userfaultfd: available")?,
        }
        if u.available {
            writeln!(
                f,
                "  features offered ({}): {}",
                u.features_offered_mask, u.features_offered
            )?;
            if !u.features_missing.is_empty() {
                writeln!(
                    f,
                    "  features faultline would use but the kernel lacks: {}",
                    u.features_missing
                )?;
            }
        }
        for b in &self.backings {
            writeln!(f)?;
            write!(f, "{}:", b.backing)?;
            match b.status {
                ProbeStatus::Ok => writeln!(f)?,
                ProbeStatus::Skipped => writeln!(f, " skipped")?,
                ProbeStatus::Failed => writeln!(f, " probe failed")?,
            }
            if let Some(message) = &b.message {
                writeln!(f, "  {message}")?;
            }
            if let Some(caps) = &b.kvm {
                let userfault = match caps.mem_userfault {
                    Some(true) => "accepted",
                    Some(false) => "refused",
                    None => "not probed",
                };
                writeln!(
                    f,
                    "  KVM: KVM_CAP_GUEST_MEMFD = {}, KVM_CAP_GUEST_MEMFD_FLAGS = {:#x}, \
                     KVM_CAP_USER_MEMORY2 = {}, KVM_MEM_USERFAULT {userfault}",
                    caps.guest_memfd, caps.guest_memfd_flags, caps.user_memory2
                )?;
            }
            for attempt in &b.registrations {
                match attempt.result {
                    Ok(ops) => writeln!(
                        f,
                        "  register {:<14} -> {ops} ({ops:#x})",
                        attempt.modes.to_string()
                    )?,
                    Err(errno) => writeln!(
                        f,
                        "  register {:<14} -> refused: {}",
                        attempt.modes.to_string(),
                        errno_name(errno)
                    )?,
                }
            }
            if let Some(choice) = &b.choice {
                writeln!(f, "  strategy: {}", choice.strategy)?;
                writeln!(f, "    because {}", choice.reason)?;
            }
            if !b.lazy_restore_missing.is_empty() {
                writeln!(f, "  lazy restore would need, missing here:")?;
                for gap in &b.lazy_restore_missing {
                    writeln!(f, "    - {gap}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Strategy;
    use crate::testutil;
    use crate::uffd::ResolveOps;

    /// The probe reports platform.md's answers for every backing type, in text and JSON.
    #[test]
    fn probe_matches_platform() {
        let Some(_pages) = testutil::reserve_huge_pages(1) else {
            return;
        };
        if testutil::require_uffd().is_none() || testutil::require_kvm().is_none() {
            return;
        }
        let report = run();
        let text = report.to_string();
        assert!(report.uffd.available, "{text}");
        assert!(
            report.uffd.features_offered.contains(Features::FAULTLINE),
            "{text}"
        );
        let by_kind = |kind| report.backings.iter().find(|b| b.backing == kind).unwrap();
        let gmem = by_kind(BackingKind::GuestMemfd);
        let with_gmem = gmem.kvm.is_some_and(|caps| caps.guest_memfd > 0);
        for b in report
            .backings
            .iter()
            .filter(|b| with_gmem || b.backing != gmem.backing)
        {
            assert_eq!(b.status, ProbeStatus::Ok, "{text}");
        }
        let anon = by_kind(BackingKind::Anonymous);
        assert_eq!(
            anon.registrations[0].result,
            Ok(ResolveOps::from_bits(0x13c)),
            "{text}"
        );
        assert_eq!(anon.registrations[1].result, Err(libc::EINVAL), "{text}");
        let shmem = by_kind(BackingKind::Shmem);
        assert_eq!(
            shmem.registrations[2].result,
            Ok(ResolveOps::from_bits(0x1bc)),
            "{text}"
        );
        assert_eq!(shmem.choice.as_ref().unwrap().strategy, Strategy::Continue);
        let huge = by_kind(BackingKind::Hugetlb);
        assert_eq!(
            huge.registrations[0].result,
            Ok(ResolveOps::from_bits(0x10c)),
            "{text}"
        );
        assert_eq!(
            huge.registrations[2].result,
            Ok(ResolveOps::from_bits(0x18c)),
            "{text}"
        );
        if with_gmem {
            assert_eq!(
                gmem.choice.as_ref().unwrap().strategy,
                Strategy::Eager,
                "{text}"
            );
            assert_eq!(gmem.kvm.unwrap().guest_memfd_flags, 3, "{text}");
            assert_eq!(gmem.lazy_restore_missing.len(), 2, "{text}");
            assert!(text.contains("KVM_MEM_USERFAULT refused"), "{text}");
        } else {
            // This host's KVM has none: reported as such, with the backings to use.
            assert_eq!(gmem.status, ProbeStatus::Skipped, "{text}");
            assert!(text.contains("KVM_CAP_GUEST_MEMFD = 0"), "{text}");
            assert!(text.contains("use a shmem or hugetlb backing"), "{text}");
            testutil::narrowed("this host's KVM has no guest_memfd; checked its report instead");
        }
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["backings"][1]["backing"], "shmem");
        assert_eq!(json["backings"][1]["registrations"][2]["ioctls"], "0x1bc");
        assert_eq!(
            json["backings"][1]["choice"]["strategy"]["method"],
            "continue"
        );
        if with_gmem {
            assert_eq!(json["backings"][3]["registrations"][0]["error"], "EINVAL");
        } else {
            assert_eq!(json["backings"][3]["status"], "skipped");
        }
    }
}
