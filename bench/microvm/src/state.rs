//! The vCPU state a snapshot saves: general and special registers, as plain serde structs
//! (readable JSON, independent of the binding crate's layout), and the long-mode state a fresh
//! guest starts in.
//!
//! That is all the guest program needs: it takes no interrupts, uses no FPU/SSE state and no
//! MSR beyond EFER (part of the special registers). A VMM restoring a real guest also saves
//! MSRs, FPU/XSAVE, LAPIC, and pending events.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};

use crate::layout::CODE_SELECTOR;
use crate::layout::{
    CODE_ACCESS, DATA_ACCESS, DATA_SELECTOR, GDT_ADDR, PML4_ADDR, STACK_TOP, TSS_ACCESS, TSS_LIMIT,
    TSS_SELECTOR,
};

/// CR0: protection enable, monitor coprocessor, extension type, numeric error, write protect,
/// paging.
pub const BOOT_CR0: u64 = 0x8005_0033;
/// CR4: physical address extension (required for long mode).
pub const BOOT_CR4: u64 = 0x20;
/// EFER: long mode enable and active.
pub const BOOT_EFER: u64 = 0x500;
/// RFLAGS: only the always-one bit (interrupts off).
pub const BOOT_RFLAGS: u64 = 0x2;
/// The architectural reset value of the APIC base MSR (xAPIC enabled, bootstrap processor).
pub const BOOT_APIC_BASE: u64 = 0xfee0_0900;

/// General-purpose registers, `rip` and `rflags` (`struct kvm_regs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// One segment register with its hidden part (`struct kvm_segment`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field of the access byte.
    #[serde(rename = "type")]
    pub type_: u8,
    /// Present bit.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit).
    pub db: u8,
    /// Code/data (1) or system (0) segment.
    pub s: u8,
    /// 64-bit code segment.
    pub l: u8,
    /// Granularity (limit in 4 KiB units).
    pub g: u8,
    /// Available for software.
    pub avl: u8,
    /// Unusable (a null selector loaded).
    pub unusable: u8,
}

/// GDTR / IDTR (`struct kvm_dtable`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Base address.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// Segment, descriptor-table and control registers (`struct kvm_sregs`, without the pending
/// interrupt bitmap: this guest takes no interrupts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Everything the harness saves of its one vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: Regs,
    /// Special registers.
    pub sregs: Sregs,
}

impl VcpuState {
    /// A vCPU in 64-bit long mode about to start the guest program at `entry` on walk `walk`:
    /// flat segments from the GDT at [`GDT_ADDR`], paging on with the identity map at
    /// [`PML4_ADDR`], interrupts off, no IDT (an exception would shut the VM down, which the
    /// harness reports).
    pub fn long_mode(entry: u64, walk: u32) -> Self {
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: CODE_SELECTOR,
            type_: CODE_ACCESS & 0xf,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
        };
        let data = Segment {
            selector: DATA_SELECTOR,
            type_: DATA_ACCESS & 0xf,
            db: 1,
            l: 0,
            ..code
        };
        let tr = Segment {
            base: 0,
            limit: TSS_LIMIT,
            selector: TSS_SELECTOR,
            type_: TSS_ACCESS & 0xf,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
        };
        let ldt = Segment {
            type_: 2,
            present: 1,
            ..Segment::default()
        };
        Self {
            regs: Regs {
                rip: entry,
                rdi: u64::from(walk),
                rsp: STACK_TOP,
                rflags: BOOT_RFLAGS,
                ..Regs::default()
            },
            sregs: Sregs {
                cs: code,
                ds: data,
                es: data,
                fs: data,
                gs: data,
                ss: data,
                tr,
                ldt,
                gdt: DescriptorTable {
                    base: GDT_ADDR,
                    limit: 5 * 8 - 1,
                },
                idt: DescriptorTable { base: 0, limit: 0 },
                cr0: BOOT_CR0,
                cr2: 0,
                cr3: PML4_ADDR,
                cr4: BOOT_CR4,
                cr8: 0,
                efer: BOOT_EFER,
                apic_base: BOOT_APIC_BASE,
            },
        }
    }
}

impl From<kvm_regs> for Regs {
    fn from(r: kvm_regs) -> Self {
        Self {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<Regs> for kvm_regs {
    fn from(r: Regs) -> Self {
        Self {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<kvm_segment> for Segment {
    fn from(s: kvm_segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }
}

impl From<Segment> for kvm_segment {
    fn from(s: Segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
            padding: 0,
        }
    }
}

impl From<kvm_dtable> for DescriptorTable {
    fn from(t: kvm_dtable) -> Self {
        Self {
            base: t.base,
            limit: t.limit,
        }
    }
}

impl From<DescriptorTable> for kvm_dtable {
    fn from(t: DescriptorTable) -> Self {
        Self {
            base: t.base,
            limit: t.limit,
            padding: [0; 3],
        }
    }
}

impl From<kvm_sregs> for Sregs {
    fn from(s: kvm_sregs) -> Self {
        Self {
            cs: s.cs.into(),
            ds: s.ds.into(),
            es: s.es.into(),
            fs: s.fs.into(),
            gs: s.gs.into(),
            ss: s.ss.into(),
            tr: s.tr.into(),
            ldt: s.ldt.into(),
            gdt: s.gdt.into(),
            idt: s.idt.into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        }
    }
}

impl Sregs {
    /// These registers written over `base` (what the vCPU holds now), keeping its pending
    /// interrupt bitmap.
    pub fn apply_to(&self, base: kvm_sregs) -> kvm_sregs {
        kvm_sregs {
            cs: self.cs.into(),
            ds: self.ds.into(),
            es: self.es.into(),
            fs: self.fs.into(),
            gs: self.gs.into(),
            ss: self.ss.into(),
            tr: self.tr.into(),
            ldt: self.ldt.into(),
            gdt: self.gdt.into(),
            idt: self.idt.into(),
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
            interrupt_bitmap: base.interrupt_bitmap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boot state round-trips through JSON and through the binding structs.
    #[test]
    fn state_round_trips() {
        let state = VcpuState::long_mode(0x3000, 7);
        let json = serde_json::to_string_pretty(&state).unwrap();
        assert!(json.contains("\"rip\": 12288"), "{json}");
        assert_eq!(serde_json::from_str::<VcpuState>(&json).unwrap(), state);
        let regs: kvm_regs = state.regs.into();
        assert_eq!(Regs::from(regs), state.regs);
        let sregs = state.sregs.apply_to(kvm_sregs::default());
        assert_eq!(Sregs::from(sregs), state.sregs);
        assert_eq!(state.regs.rdi, 7);
        assert_eq!(state.sregs.cs.l, 1);
    }
}
