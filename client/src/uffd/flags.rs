//! Typed bit sets for what the kernel says: `UFFDIO_API` features, the resolve ioctls that
//! `UFFDIO_REGISTER` advertises for a range, and registration modes.
//!
//! Each set keeps unknown bits (a newer kernel may set bits this code does not name) and prints
//! them in hex rather than dropping them.

use std::fmt;

use serde::{Serialize, Serializer};

/// Declares a `u64` bit set with named constants, set operations, names and `Display`.
macro_rules! bitset {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$cmeta:meta])* $konst:ident = $bit:expr ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            $( $(#[$cmeta])* pub const $konst: Self = Self(1 << $bit); )*

            /// Every bit name this code knows, in bit order.
            const NAMES: &'static [(&'static str, u64)] = &[ $( (stringify!($konst), 1 << $bit) ),* ];

            /// The empty set.
            pub const fn empty() -> Self {
                Self(0)
            }

            /// A set from the kernel's raw bits; unknown bits are kept.
            pub const fn from_bits(bits: u64) -> Self {
                Self(bits)
            }

            /// The raw bits, as the kernel uses them.
            pub const fn bits(self) -> u64 {
                self.0
            }

            /// Whether every bit of `other` is in `self`.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// Whether no bit is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// The bits in both sets.
            pub const fn intersection(self, other: Self) -> Self {
                Self(self.0 & other.0)
            }

            /// The bits of `self` that are not in `other`.
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }

            /// The names of the set bits in bit order; unknown bits appear as one hex entry.
            pub fn names(self) -> Vec<String> {
                let mut out = Vec::new();
                let mut known = 0;
                for (name, bit) in Self::NAMES {
                    known |= bit;
                    if self.0 & bit != 0 {
                        out.push((*name).to_owned());
                    }
                }
                if self.0 & !known != 0 {
                    out.push(format!("{:#x}", self.0 & !known));
                }
                out
            }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                Self(self.0 | rhs.0)
            }
        }

        impl std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0;
            }
        }

        impl std::ops::BitAnd for $name {
            type Output = Self;
            fn bitand(self, rhs: Self) -> Self {
                Self(self.0 & rhs.0)
            }
        }

        /// `A|B|C`, or `none` for the empty set.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.0 == 0 {
                    return f.write_str("none");
                }
                f.write_str(&self.names().join("|"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({} = {:#x})", stringify!($name), self, self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        /// Serialized as the list of names (unknown bits as one hex string).
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.names().serialize(s)
            }
        }
    };
}

bitset! {
    /// `UFFD_FEATURE_*` bits: what `UFFDIO_API` offers (asked with features = 0) or granted.
    Features {
        /// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
        PAGEFAULT_FLAG_WP = 0,
        /// `fork(2)` of the registered process is reported with a new uffd for the child.
        EVENT_FORK = 1,
        /// `mremap(2)` of a registered range is reported.
        EVENT_REMAP = 2,
        /// `MADV_DONTNEED` / `MADV_REMOVE` on a registered range is reported.
        EVENT_REMOVE = 3,
        /// MISSING registration of hugetlbfs mappings.
        MISSING_HUGETLBFS = 4,
        /// MISSING registration of shmem mappings.
        MISSING_SHMEM = 5,
        /// `munmap(2)` of a registered range is reported.
        EVENT_UNMAP = 6,
        /// Faults raise SIGBUS instead of being reported.
        SIGBUS = 7,
        /// Page-fault messages carry the faulting thread's id.
        THREAD_ID = 8,
        /// MINOR registration of hugetlbfs mappings (`UFFDIO_CONTINUE`).
        MINOR_HUGETLBFS = 9,
        /// MINOR registration of shmem mappings (`UFFDIO_CONTINUE`).
        MINOR_SHMEM = 10,
        /// Page-fault addresses are exact, not rounded down to a page.
        EXACT_ADDRESS = 11,
        /// Write-protect on hugetlbfs and shmem.
        WP_HUGETLBFS_SHMEM = 12,
        /// Write-protect also covers unpopulated pages.
        WP_UNPOPULATED = 13,
        /// `UFFDIO_POISON`.
        POISON = 14,
        /// Asynchronous write-protect (dirty tracking without messages).
        WP_ASYNC = 15,
        /// `UFFDIO_MOVE`.
        MOVE = 16,
    }
}

impl Features {
    /// What faultline asks for when the kernel offers it: memory-map events (so a balloon or a
    /// VMM's `munmap` does not silently break the region table), MISSING and MINOR for shmem and
    /// hugetlbfs, POISON (failure policy), THREAD_ID (diagnostics) and EXACT_ADDRESS.
    ///
    /// EVENT_FORK is deliberately absent: faultline does not follow forked children, and a VMM
    /// that forks would otherwise block in `fork(2)` until the event is read.
    pub const FAULTLINE: Self = Self(
        Self::EVENT_REMOVE.0
            | Self::EVENT_UNMAP.0
            | Self::EVENT_REMAP.0
            | Self::MISSING_SHMEM.0
            | Self::MISSING_HUGETLBFS.0
            | Self::MINOR_SHMEM.0
            | Self::MINOR_HUGETLBFS.0
            | Self::POISON.0
            | Self::THREAD_ID.0
            | Self::EXACT_ADDRESS.0,
    );
}

impl Features {
    /// What a far-memory region asks for: MISSING on shmem and WP on shmem (anonymous memory
    /// needs no feature for either), THREAD_ID and EXACT_ADDRESS.
    ///
    /// No memory-map events: the far-memory pager drops pages itself (`MADV_DONTNEED`, or
    /// `MADV_REMOVE` on shmem) from the thread that serves faults, and with `EVENT_REMOVE` that
    /// `madvise` would sleep until the same thread read its own REMOVE message. The memory is the
    /// pager's own, mapped and unmapped by it, so no other discard or unmap needs reporting.
    pub const FAR_MEMORY: Self = Self(
        Self::MISSING_SHMEM.0
            | Self::WP_HUGETLBFS_SHMEM.0
            | Self::THREAD_ID.0
            | Self::EXACT_ADDRESS.0,
    );
}

bitset! {
    /// The ioctls `UFFDIO_REGISTER` reports as usable on a range: bit n is `_UFFDIO_*` number n.
    /// This, not the kernel version, says how a range may be resolved.
    ResolveOps {
        /// `UFFDIO_REGISTER` (only in the `UFFDIO_API` answer).
        REGISTER = 0,
        /// `UFFDIO_UNREGISTER` (only in the `UFFDIO_API` answer).
        UNREGISTER = 1,
        /// `UFFDIO_WAKE`: wake threads waiting on a range.
        WAKE = 2,
        /// `UFFDIO_COPY`: atomically copy a buffer into missing pages.
        COPY = 3,
        /// `UFFDIO_ZEROPAGE`: map zero pages.
        ZEROPAGE = 4,
        /// `UFFDIO_MOVE`: move pages from another anonymous range.
        MOVE = 5,
        /// `UFFDIO_WRITEPROTECT`.
        WRITEPROTECT = 6,
        /// `UFFDIO_CONTINUE`: map pages already in the page cache (MINOR registration).
        CONTINUE = 7,
        /// `UFFDIO_POISON`: make accesses raise SIGBUS.
        POISON = 8,
    }
}

bitset! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults a registration reports.
    RegisterModes {
        /// Faults on pages that are not present at all.
        MISSING = 0,
        /// Write faults on write-protected pages.
        WP = 1,
        /// Faults on pages present in the page cache but not mapped.
        MINOR = 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The anonymous MISSING mask from platform.md decodes to the expected names in bit order.
    #[test]
    fn resolve_ops_display_in_bit_order() {
        let ops = ResolveOps::from_bits(0x13c);
        assert_eq!(ops.to_string(), "WAKE|COPY|ZEROPAGE|MOVE|POISON");
        assert_eq!(format!("{ops:#x}"), "0x13c");
    }

    /// Unknown bits survive decoding and are shown in hex, not dropped.
    #[test]
    fn unknown_bits_are_kept() {
        let ops = ResolveOps::from_bits(ResolveOps::COPY.bits() | 1 << 40);
        assert_eq!(ops.to_string(), "COPY|0x10000000000");
        assert!(ops.contains(ResolveOps::COPY));
    }

    /// faultline's wanted features are exactly the documented ten.
    #[test]
    fn faultline_features_names() {
        assert_eq!(
            Features::FAULTLINE.to_string(),
            "EVENT_REMAP|EVENT_REMOVE|MISSING_HUGETLBFS|MISSING_SHMEM|EVENT_UNMAP|THREAD_ID|\
             MINOR_HUGETLBFS|MINOR_SHMEM|EXACT_ADDRESS|POISON"
        );
        assert_eq!(RegisterModes::empty().to_string(), "none");
        assert_eq!(
            (RegisterModes::MISSING | RegisterModes::MINOR).to_string(),
            "MISSING|MINOR"
        );
    }
}
