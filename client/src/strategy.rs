//! Choosing how a region's faults are resolved, from what the kernel answers.
//!
//! [`register_for_strategy`] registers a [`GuestMemory`] on a uffd the way the chosen
//! [`Mode`] needs, recording each attempt; [`decide`] (a pure function of the backing kind and
//! those attempts) picks the [`Strategy`] and says why. Nothing here looks at the kernel
//! version: a kernel that advertises CONTINUE on guest_memfd gets CONTINUE there.

use std::fmt;
use std::str::FromStr;

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use thiserror::Error;

use crate::backing::{BackingKind, GuestMemory};
use crate::uffd::{RegisterError, RegisterModes, ResolveOps, Uffd, UnregisterError};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Whatever the kernel advertises, CONTINUE first.
    #[default]
    Auto,
    /// `UFFDIO_COPY` only (MISSING registration).
    Copy,
    /// Fill view + `UFFDIO_CONTINUE` (MISSING|MINOR registration).
    Continue,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Copy => "copy",
            Self::Continue => "continue",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown mode name.
#[derive(Debug, Error)]
#[error("unknown resolve mode {0:?}; expected one of: auto, copy, continue")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Mode::Auto, Mode::Copy, Mode::Continue]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_owned()))
    }
}

/// How the pager fills a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case", tag = "method")]
pub enum Strategy {
    /// Write pages through the fill view, then `UFFDIO_CONTINUE` the faulting range (serves
    /// both MISSING and MINOR faults).
    Continue,
    /// `UFFDIO_COPY` pages in; zero pages with `UFFDIO_ZEROPAGE` when `zeropage`, else by
    /// copying a zero buffer (hugetlbfs).
    Copy {
        /// Whether ZEROPAGE is advertised.
        zeropage: bool,
    },
    /// No lazy restore possible: write every page through the fill view before the guest
    /// runs.
    Eager,
}

impl Strategy {
    /// The strategy's short name: `continue`, `copy` or `eager`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Continue => "continue",
            Self::Copy { .. } => "copy",
            Self::Eager => "eager",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Continue => "continue",
            Self::Copy { zeropage: true } => "copy (zero pages by ZEROPAGE)",
            Self::Copy { zeropage: false } => "copy (zero pages by copying zeros)",
            Self::Eager => "eager",
        })
    }
}

/// One `UFFDIO_REGISTER` attempt and the kernel's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterAttempt {
    /// Modes asked for.
    pub modes: RegisterModes,
    /// The ops advertised, or the errno.
    pub result: Result<ResolveOps, i32>,
}

impl RegisterAttempt {
    /// The ops advertised, if the registration succeeded.
    pub fn ops(&self) -> Option<ResolveOps> {
        self.result.ok()
    }
}

impl fmt::Display for RegisterAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.result {
            Ok(ops) => write!(f, "{} advertised {} ({:#x})", self.modes, ops, ops),
            Err(errno) => write!(f, "{} refused ({})", self.modes, errno_name(errno)),
        }
    }
}

/// `{"modes": [...], "ops": [...] | null, "ioctls": "0x13c" | null, "error": "EINVAL" | null}`.
impl Serialize for RegisterAttempt {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("RegisterAttempt", 4)?;
        st.serialize_field("modes", &self.modes)?;
        st.serialize_field("ops", &self.ops())?;
        st.serialize_field("ioctls", &self.ops().map(|o| format!("{o:#x}")))?;
        st.serialize_field("error", &self.result.err().map(errno_name))?;
        st.end()
    }
}

/// A short name for the errnos registration answers with.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::EBUSY => "EBUSY",
        libc::ENOMEM => "ENOMEM",
        libc::EEXIST => "EEXIST",
        libc::EAGAIN => "EAGAIN",
        libc::ENOENT => "ENOENT",
        libc::ENODEV => "ENODEV",
        libc::ENOSYS => "ENOSYS",
        libc::EFAULT => "EFAULT",
        libc::ENOTTY => "ENOTTY",
        _ => return format!("errno {errno}"),
    };
    name.to_owned()
}

/// Joins attempts into one phrase, as the kernel answered them.
fn describe(attempts: &[RegisterAttempt]) -> String {
    if attempts.is_empty() {
        return "nothing was tried".to_owned();
    }
    attempts
        .iter()
        .map(|a| format!("registration {a}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The forced mode cannot be honoured, or registration failed outright.
#[derive(Debug, Error)]
pub enum StrategyError {
    /// The kernel does not advertise what the forced mode needs on this memory.
    #[error(
        "resolve mode {mode} was forced for {kind} memory, but the kernel does not advertise \
         {needed} there ({offered}); use mode auto, or a backing type that supports {needed}"
    )]
    NotAdvertised {
        /// Backing kind.
        kind: BackingKind,
        /// The forced mode.
        mode: Mode,
        /// The op it needs.
        needed: &'static str,
        /// What the kernel answered, attempt by attempt.
        offered: String,
    },
    /// CONTINUE was forced on memory without a fill view.
    #[error(
        "resolve mode continue was forced for {kind} memory that has no fill view (anonymous \
         memory, or external memory given without its fd); pass the fd or use mode copy"
    )]
    NoFillView {
        /// Backing kind.
        kind: BackingKind,
    },
    /// Registration failed with something other than EINVAL (EBUSY: already registered on
    /// another uffd; EPERM; ENOMEM).
    #[error("registering {kind} memory failed: {source}")]
    Register {
        /// Backing kind.
        kind: BackingKind,
        /// The failure.
        source: RegisterError,
    },
    /// Undoing a registration that the forced mode could not use failed.
    #[error("undoing the registration of {kind} memory failed: {source}")]
    Unregister {
        /// Backing kind.
        kind: BackingKind,
        /// The failure.
        source: UnregisterError,
    },
}

/// What [`decide`] chose, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    /// The strategy.
    pub strategy: Strategy,
    /// One sentence naming the kernel's answer that led to it.
    pub reason: String,
}

/// Picks a strategy from the kernel's answers to the registration `attempts` (in the order they
/// were made; at most the last succeeded) for memory of `kind`, honouring a forced `mode`.
/// `fill_view` says whether pages can be written without faulting (needed for CONTINUE).
pub fn decide(
    kind: BackingKind,
    fill_view: bool,
    attempts: &[RegisterAttempt],
    mode: Mode,
) -> Result<Choice, StrategyError> {
    let registered = attempts.iter().find_map(|a| a.ops().map(|ops| (a, ops)));
    let can_continue = registered.filter(|(a, ops)| {
        fill_view && a.modes.contains(RegisterModes::MINOR) && ops.contains(ResolveOps::CONTINUE)
    });
    let can_copy = registered.filter(|(_, ops)| ops.contains(ResolveOps::COPY));
    let continue_choice = |(a, _): (&RegisterAttempt, ResolveOps)| Choice {
        strategy: Strategy::Continue,
        reason: format!(
            "registration {a}, which includes CONTINUE: pages are written through the fill view \
             and mapped with UFFDIO_CONTINUE"
        ),
    };
    let copy_choice = |(a, ops): (&RegisterAttempt, ResolveOps)| {
        let zeropage = ops.contains(ResolveOps::ZEROPAGE);
        let why_not_continue = if mode == Mode::Copy {
            "copy was asked for"
        } else if !kind.is_file_backed() {
            "anonymous memory has no page cache to CONTINUE from"
        } else if !fill_view {
            "there is no fill view to write pages through"
        } else {
            "CONTINUE is not advertised"
        };
        let zero = if zeropage {
            "zero pages with UFFDIO_ZEROPAGE"
        } else {
            "no ZEROPAGE, so zero pages are copied from a zero buffer"
        };
        Choice {
            strategy: Strategy::Copy { zeropage },
            reason: format!(
                "registration {a}; {why_not_continue}: pages are installed with UFFDIO_COPY, {zero}"
            ),
        }
    };
    match mode {
        Mode::Auto => Ok(if let Some(r) = can_continue {
            continue_choice(r)
        } else if let Some(r) = can_copy {
            copy_choice(r)
        } else {
            Choice {
                strategy: Strategy::Eager,
                reason: format!(
                    "{}: this kernel cannot report faults on {kind} memory, so every page is \
                     written through the fill view before the guest runs",
                    describe(attempts)
                ),
            }
        }),
        Mode::Copy => can_copy
            .map(copy_choice)
            .ok_or_else(|| StrategyError::NotAdvertised {
                kind,
                mode,
                needed: "COPY",
                offered: describe(attempts),
            }),
        Mode::Continue => {
            if let Some(r) = can_continue {
                Ok(continue_choice(r))
            } else if registered.is_some_and(|(_, ops)| ops.contains(ResolveOps::CONTINUE)) {
                Err(StrategyError::NoFillView { kind })
            } else {
                Err(StrategyError::NotAdvertised {
                    kind,
                    mode,
                    needed: "CONTINUE",
                    offered: describe(attempts),
                })
            }
        }
    }
}

/// The outcome of [`register_for_strategy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Backing kind of the region.
    pub kind: BackingKind,
    /// The mode asked for.
    pub mode: Mode,
    /// The strategy and why.
    #[serde(flatten)]
    pub choice: Choice,
    /// Every registration tried, with the kernel's answer.
    pub attempts: Vec<RegisterAttempt>,
    /// The registration left in place: modes and advertised ops (None for [`Strategy::Eager`]).
    #[serde(skip)]
    pub registered: Option<(RegisterModes, ResolveOps)>,
}

impl Decision {
    /// The strategy chosen.
    pub fn strategy(&self) -> Strategy {
        self.choice.strategy
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} memory: {} (mode {}): {}",
            self.kind, self.choice.strategy, self.mode, self.choice.reason
        )
    }
}

/// Registers `memory`'s guest mapping on `uffd` as `mode` needs and decides the strategy.
///
/// Auto on file-backed memory with a fill view tries MISSING|MINOR, then MISSING; anonymous
/// memory tries MISSING; copy tries MISSING; continue tries MISSING|MINOR (then MISSING, to name
/// what is offered in its error). EINVAL moves on to the
/// next attempt; when every attempt is refused the strategy is [`Strategy::Eager`] (guest_memfd
/// on Linux 6.18). A registration that the decision cannot use is undone.
pub fn register_for_strategy(
    uffd: &Uffd,
    memory: &GuestMemory,
    mode: Mode,
) -> Result<Decision, StrategyError> {
    let kind = memory.kind();
    let fill_view = memory.fill_view().is_some();
    let both = RegisterModes::MISSING | RegisterModes::MINOR;
    // Forced continue falls back to MISSING too, only so that its error can say what the kernel
    // does offer on this memory.
    let plan: &[RegisterModes] = match mode {
        Mode::Auto if kind.is_file_backed() && fill_view => &[both, RegisterModes::MISSING],
        Mode::Auto | Mode::Copy => &[RegisterModes::MISSING],
        Mode::Continue => &[both, RegisterModes::MISSING],
    };
    let (start, len) = (memory.host_addr(), memory.len());
    let mut attempts = Vec::new();
    let mut registered = None;
    for &modes in plan {
        // SAFETY: a `GuestMemory`'s guest mapping is guest memory that holds no Rust object:
        // created by `backing` or vouched for by the caller of `GuestMemory::from_external`.
        match unsafe { uffd.register(start, len, modes) } {
            Ok(ops) => {
                attempts.push(RegisterAttempt {
                    modes,
                    result: Ok(ops),
                });
                registered = Some((modes, ops));
                break;
            }
            Err(err @ RegisterError::Unsupported { .. }) => attempts.push(RegisterAttempt {
                modes,
                result: Err(err.errno()),
            }),
            Err(source) => return Err(StrategyError::Register { kind, source }),
        }
    }
    let undo = |registered: Option<(RegisterModes, ResolveOps)>| match registered {
        Some(_) => uffd
            .unregister(start, len)
            .map_err(|source| StrategyError::Unregister { kind, source }),
        None => Ok(()),
    };
    let choice = match decide(kind, fill_view, &attempts, mode) {
        Ok(choice) => choice,
        Err(err) => {
            undo(registered)?;
            return Err(err);
        }
    };
    if choice.strategy == Strategy::Eager {
        // Registered but neither COPY nor CONTINUE usable: faults there could never be served.
        undo(registered)?;
        registered = None;
    }
    Ok(Decision {
        kind,
        mode,
        choice,
        attempts,
        registered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::HUGE_PAGE_SIZE;
    use crate::testutil;

    const MISSING: RegisterModes = RegisterModes::MISSING;

    fn both() -> RegisterModes {
        RegisterModes::MISSING | RegisterModes::MINOR
    }

    fn ok(modes: RegisterModes, mask: u64) -> RegisterAttempt {
        RegisterAttempt {
            modes,
            result: Ok(ResolveOps::from_bits(mask)),
        }
    }

    fn einval(modes: RegisterModes) -> RegisterAttempt {
        RegisterAttempt {
            modes,
            result: Err(libc::EINVAL),
        }
    }

    /// platform.md's hugetlb answer (0x18c) gives CONTINUE, and the reason quotes the mask.
    #[test]
    fn hugetlb_mask_gives_continue() {
        let choice = decide(BackingKind::Hugetlb, true, &[ok(both(), 0x18c)], Mode::Auto).unwrap();
        assert_eq!(choice.strategy, Strategy::Continue);
        assert!(
            choice.reason.starts_with(
                "registration MISSING|MINOR advertised WAKE|COPY|CONTINUE|POISON (0x18c)"
            ),
            "{}",
            choice.reason
        );
    }

    /// Anonymous memory's MISSING answer (0x13c) gives COPY with ZEROPAGE.
    #[test]
    fn anon_mask_gives_copy_with_zeropage() {
        let choice = decide(
            BackingKind::Anonymous,
            false,
            &[ok(MISSING, 0x13c)],
            Mode::Auto,
        );
        assert_eq!(choice.unwrap().strategy, Strategy::Copy { zeropage: true });
    }

    /// hugetlb forced to copy gets COPY without ZEROPAGE (0x10c).
    #[test]
    fn hugetlb_copy_has_no_zeropage() {
        let choice = decide(
            BackingKind::Hugetlb,
            true,
            &[ok(MISSING, 0x10c)],
            Mode::Copy,
        )
        .unwrap();
        assert_eq!(choice.strategy, Strategy::Copy { zeropage: false });
        assert!(
            choice.reason.contains("copied from a zero buffer"),
            "{}",
            choice.reason
        );
    }

    /// Every registration refused gives Eager, naming each refusal.
    #[test]
    fn all_refused_gives_eager() {
        let attempts = [einval(both()), einval(MISSING)];
        let choice = decide(BackingKind::GuestMemfd, true, &attempts, Mode::Auto).unwrap();
        assert_eq!(choice.strategy, Strategy::Eager);
        assert!(
            choice.reason.contains("MISSING|MINOR refused (EINVAL)")
                && choice.reason.contains("MISSING refused (EINVAL)"),
            "{}",
            choice.reason
        );
    }

    /// A kernel advertising CONTINUE on guest_memfd gets CONTINUE: no version check anywhere.
    #[test]
    fn future_guest_memfd_gets_continue() {
        let choice = decide(
            BackingKind::GuestMemfd,
            true,
            &[ok(both(), 0x1bc)],
            Mode::Auto,
        );
        assert_eq!(choice.unwrap().strategy, Strategy::Continue);
    }

    /// Forcing CONTINUE where only MISSING registered is an error naming backing and offer.
    #[test]
    fn forced_continue_not_advertised_is_an_error() {
        let attempts = [einval(both()), ok(MISSING, 0x13c)];
        let err = decide(BackingKind::Anonymous, false, &attempts, Mode::Continue)
            .unwrap_err()
            .to_string();
        assert!(err.contains("anon memory"), "{err}");
        assert!(err.contains("does not advertise CONTINUE"), "{err}");
        assert!(
            err.contains("MISSING advertised WAKE|COPY|ZEROPAGE|MOVE|POISON (0x13c)"),
            "{err}"
        );
        let err = decide(
            BackingKind::Shmem,
            false,
            &[ok(both(), 0x1bc)],
            Mode::Continue,
        );
        assert!(
            matches!(err, Err(StrategyError::NoFillView { .. })),
            "{err:?}"
        );
    }

    /// Modes parse from their names and refuse others.
    #[test]
    fn mode_names() {
        assert_eq!("continue".parse::<Mode>().unwrap(), Mode::Continue);
        assert_eq!(Mode::default(), Mode::Auto);
        assert!("lazy".parse::<Mode>().is_err());
    }

    /// Registers `kind` memory of `len` bytes with `mode` on a fresh uffd (skips if impossible).
    fn register(
        kind: BackingKind,
        len: usize,
        mode: Mode,
    ) -> Option<Result<Decision, StrategyError>> {
        if kind == BackingKind::GuestMemfd && !testutil::guest_memfd_available() {
            return None;
        }
        let memory = GuestMemory::new(kind, len).expect("create memory");
        let uffd = testutil::require_uffd()?;
        Some(register_for_strategy(&uffd, &memory, mode))
    }

    /// Anonymous memory registers MISSING and advertises COPY|ZEROPAGE|WAKE|MOVE|POISON.
    #[test]
    fn anon_registration_matches_platform() {
        let Some(decision) = register(BackingKind::Anonymous, 1 << 20, Mode::Auto) else {
            return;
        };
        let decision = decision.unwrap();
        let (modes, ops) = decision.registered.unwrap();
        assert_eq!(modes, MISSING);
        let expected = ResolveOps::COPY
            | ResolveOps::ZEROPAGE
            | ResolveOps::WAKE
            | ResolveOps::MOVE
            | ResolveOps::POISON;
        assert!(ops.contains(expected), "{ops}");
        assert_eq!(decision.strategy(), Strategy::Copy { zeropage: true });
    }

    /// shmem registers MISSING|MINOR, advertises CONTINUE, and is served by CONTINUE.
    #[test]
    fn shmem_registration_matches_platform() {
        let Some(decision) = register(BackingKind::Shmem, 1 << 20, Mode::Auto) else {
            return;
        };
        let decision = decision.unwrap();
        let (modes, ops) = decision.registered.unwrap();
        assert_eq!(modes, both());
        assert!(
            ops.contains(ResolveOps::CONTINUE | ResolveOps::COPY),
            "{ops}"
        );
        assert_eq!(decision.strategy(), Strategy::Continue);
        assert!(
            decision.to_string().contains("includes CONTINUE"),
            "{decision}"
        );
    }

    /// hugetlb registers MISSING|MINOR with CONTINUE but no ZEROPAGE; forced copy has no zeropage.
    #[test]
    fn hugetlb_registration_matches_platform() {
        let Some(_pages) = testutil::reserve_huge_pages(2) else {
            return;
        };
        let Some(decision) = register(BackingKind::Hugetlb, HUGE_PAGE_SIZE, Mode::Auto) else {
            return;
        };
        let decision = decision.unwrap();
        let (_, ops) = decision.registered.unwrap();
        assert!(ops.contains(ResolveOps::CONTINUE), "{ops}");
        assert!(!ops.contains(ResolveOps::ZEROPAGE), "{ops}");
        assert_eq!(decision.strategy(), Strategy::Continue);
        let Some(forced) = register(BackingKind::Hugetlb, HUGE_PAGE_SIZE, Mode::Copy) else {
            return;
        };
        assert_eq!(
            forced.unwrap().strategy(),
            Strategy::Copy { zeropage: false }
        );
    }

    /// guest_memfd refuses every registration (EINVAL) on this kernel, so the strategy is Eager.
    #[test]
    fn guest_memfd_registration_is_refused() {
        let Some(decision) = register(BackingKind::GuestMemfd, 1 << 21, Mode::Auto) else {
            return;
        };
        let decision = decision.unwrap();
        assert_eq!(decision.strategy(), Strategy::Eager);
        assert!(decision.registered.is_none());
        assert!(
            decision
                .attempts
                .iter()
                .all(|a| a.result == Err(libc::EINVAL)),
            "{:?}",
            decision.attempts
        );
    }

    /// Forcing CONTINUE on anonymous memory (kernel answers) fails, names the backing and what the
    /// kernel offered, and leaves nothing registered.
    #[test]
    fn forced_mode_not_advertised_names_backing_and_offer() {
        let memory = GuestMemory::anonymous(1 << 16).unwrap();
        let Some(uffd) = testutil::require_uffd() else {
            return;
        };
        let err = register_for_strategy(&uffd, &memory, Mode::Continue).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StrategyError::NotAdvertised { .. }), "{msg}");
        assert!(msg.contains("continue was forced for anon memory"), "{msg}");
        assert!(msg.contains("MISSING|MINOR refused (EINVAL)"), "{msg}");
        assert!(
            msg.contains("MISSING advertised WAKE|COPY|ZEROPAGE|MOVE|POISON"),
            "{msg}"
        );
        // Nothing stayed registered: another uffd can register the range (else EBUSY).
        let other = testutil::require_uffd().unwrap();
        let again = register_for_strategy(&other, &memory, Mode::Copy).unwrap();
        assert_eq!(again.strategy(), Strategy::Copy { zeropage: true });
    }
}
