//! Where things live in guest physical memory, and the bytes of the two x86 structures the
//! harness builds there: the GDT and the identity-mapping page tables.
//!
//! The memory slot starts at guest physical address 0, so a guest physical address is also the
//! byte offset in the slot, in the raw memory file, and (divided by 4 KiB) the page index a
//! snapshot and its pager use. See the table in [the crate documentation](crate).

use std::ops::Range;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The page size the guest walks in (and the granule of the page list): x86's base page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of one guest large page: the page tables map the slot with 2 MiB pages (PD entries with
/// PS set), which every x86-64 CPU supports; 1 GiB pages would need `pdpe1gb` in the guest's
/// CPUID and save only a few page-table pages.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// One page directory maps this much (512 entries of 2 MiB).
const PD_SPAN: u64 = 1 << 30;

/// GDT: null, 64-bit code, data, and a 16-byte TSS descriptor (KVM wants a usable TR).
pub const GDT_ADDR: u64 = 0x1000;
/// Walk table: [`crate::program::MAX_WALKS`] descriptors of
/// [`crate::program::DESCRIPTOR_SIZE`] bytes; the guest writes each walk's result here.
pub const WALK_TABLE_ADDR: u64 = 0x2000;
/// The guest program (one page).
pub const CODE_ADDR: u64 = 0x3000;
/// Top of the stack page `0x4000..0x5000`. The program pushes nothing and runs with interrupts
/// off; `rsp` points here so that any push lands in a page of its own.
pub const STACK_TOP: u64 = 0x5000;
/// Page map level 4: one entry, for the first 512 GiB.
pub const PML4_ADDR: u64 = 0x5000;
/// Page directory pointer table: one entry per GiB of the slot.
pub const PDPT_ADDR: u64 = 0x6000;
/// First page directory; one page directory per GiB of the slot follows.
pub const PD_ADDR: u64 = 0x7000;

/// Offset in every data page of the 8-byte word the guest reads (the *probe word*). Not 0: the
/// synthetic content marks byte 0 of non-zero pages, and an offset inside the page shows that
/// the whole page, not just its first cache line, came back.
pub const PROBE_OFFSET: u64 = 0x7f8;
/// Offset of the word a writing walk stores (the running checksum after this page): next to
/// the probe word, so the reads of later walks are unaffected.
pub const WRITE_OFFSET: u64 = 0x800;

/// Smallest slot: the fixed pages, one page directory, and room for data.
pub const MIN_MEM_SIZE: u64 = 4 << 20;
/// Largest slot: the single PML4 entry maps 512 GiB; 64 GiB keeps the page directories to 64
/// pages and is far beyond what this 24 GiB machine can back.
pub const MAX_MEM_SIZE: u64 = 64 << 30;

/// GDT selectors.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector (ds, es, fs, gs, ss).
pub const DATA_SELECTOR: u16 = 0x10;
/// TSS selector (its descriptor takes two GDT slots in long mode).
pub const TSS_SELECTOR: u16 = 0x18;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_LARGE: u64 = 1 << 7;

/// The slot size does not fit the layout.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Not a multiple of 2 MiB, or out of range.
    #[error(
        "a guest memory slot of {mem_size} bytes cannot be laid out: it must be a multiple of \
         2 MiB between {MIN_MEM_SIZE} and {MAX_MEM_SIZE} bytes"
    )]
    Size {
        /// Size asked for.
        mem_size: u64,
    },
    /// The page lists leave no room for data.
    #[error(
        "the page lists ({list_bytes} bytes) leave no data pages in a {mem_size}-byte slot; use \
         a larger slot or shorter lists"
    )]
    NoRoom {
        /// Size of the slot.
        mem_size: u64,
        /// Bytes of page lists asked for.
        list_bytes: u64,
    },
}

/// Where the variable parts of guest memory are, for one slot size and one amount of page
/// list. Saved with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Size of the memory slot in bytes (a multiple of 2 MiB).
    pub mem_size: u64,
    /// Page directories (one per GiB, rounded up), at [`PD_ADDR`].
    pub pd_pages: u64,
    /// Guest physical address of the page-list area (page-aligned, right after the PDs).
    pub lists_addr: u64,
    /// Bytes reserved for page lists (a multiple of 4 KiB).
    pub lists_len: u64,
    /// First data page (index); data pages run from here to the end of the slot.
    pub data_start: u64,
}

impl Layout {
    /// The layout of a `mem_size`-byte slot holding `list_entries` page-list entries in all.
    pub fn new(mem_size: u64, list_entries: u64) -> Result<Self, LayoutError> {
        if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size)
            || !mem_size.is_multiple_of(LARGE_PAGE_SIZE)
        {
            return Err(LayoutError::Size { mem_size });
        }
        let pd_pages = mem_size.div_ceil(PD_SPAN);
        let lists_addr = PD_ADDR + pd_pages * PAGE_SIZE;
        let list_bytes = list_entries.saturating_mul(4);
        let lists_len = list_bytes.next_multiple_of(PAGE_SIZE);
        let data_addr = lists_addr.saturating_add(lists_len);
        if data_addr >= mem_size {
            return Err(LayoutError::NoRoom {
                mem_size,
                list_bytes,
            });
        }
        Ok(Self {
            mem_size,
            pd_pages,
            lists_addr,
            lists_len,
            data_start: data_addr / PAGE_SIZE,
        })
    }

    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.mem_size / PAGE_SIZE
    }

    /// The page indices walks may visit.
    pub fn data_pages(&self) -> Range<u64> {
        self.data_start..self.pages()
    }

    /// Bytes of the header: everything before the first data page.
    pub fn header_len(&self) -> u64 {
        self.data_start * PAGE_SIZE
    }

    /// PML4, PDPT and page directories, contiguous from [`PML4_ADDR`]: an identity map of the
    /// slot in 2 MiB pages, writable, supervisor-only.
    pub fn page_tables(&self) -> Vec<u8> {
        let mut tables = vec![0u8; ((2 + self.pd_pages) * PAGE_SIZE) as usize];
        let mut put = |addr: u64, entry: u64| {
            let at = (addr - PML4_ADDR) as usize;
            tables[at..at + 8].copy_from_slice(&entry.to_le_bytes());
        };
        put(PML4_ADDR, PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE);
        for pd in 0..self.pd_pages {
            let pd_addr = PD_ADDR + pd * PAGE_SIZE;
            put(PDPT_ADDR + pd * 8, pd_addr | PTE_PRESENT | PTE_WRITABLE);
        }
        for large in 0..self.mem_size / LARGE_PAGE_SIZE {
            let entry = (large * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PDE_LARGE;
            put(PD_ADDR + large * 8, entry);
        }
        tables
    }
}

/// One 8-byte segment descriptor (`base` and `limit` split as the CPU wants them).
const fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | (access as u64) << 40
        | ((limit >> 16) & 0xf) << 48
        | (flags as u64 & 0xf) << 52
        | (base >> 24) << 56
}

/// Access byte of the code segment: present, DPL 0, code, execute/read, accessed.
pub const CODE_ACCESS: u8 = 0x9b;
/// Flags of the code segment: 4 KiB granularity, 64-bit (L), D clear.
pub const CODE_FLAGS: u8 = 0xa;
/// Access byte of the data segment: present, DPL 0, data, read/write, accessed.
pub const DATA_ACCESS: u8 = 0x93;
/// Flags of the data segment: 4 KiB granularity, 32-bit default size.
pub const DATA_FLAGS: u8 = 0xc;
/// Access byte of the TSS: present, system, 64-bit TSS (busy).
pub const TSS_ACCESS: u8 = 0x8b;
/// Limit of the TSS (104 bytes, the size of a 64-bit TSS, minus one). Its base is 0: the null
/// page, all zeros; nothing uses it since the guest never changes privilege or takes interrupts.
pub const TSS_LIMIT: u32 = 0x67;

/// The GDT's bytes: null, code, data, TSS (two slots).
pub fn gdt() -> Vec<u8> {
    let entries = [
        0,
        descriptor(0, 0xf_ffff, CODE_ACCESS, CODE_FLAGS),
        descriptor(0, 0xf_ffff, DATA_ACCESS, DATA_FLAGS),
        descriptor(0, TSS_LIMIT, TSS_ACCESS, 0),
        0, // upper half of the 16-byte TSS descriptor: base bits 32..63 = 0
    ];
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: &[u8], addr: u64) -> u64 {
        let at = (addr - PML4_ADDR) as usize;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// The fixed pages come first, then the PDs, the lists and the data, all page-aligned.
    #[test]
    fn layout_of_a_64_mib_slot() {
        let layout = Layout::new(64 << 20, 8192).unwrap();
        assert_eq!(layout.pd_pages, 1);
        assert_eq!(layout.lists_addr, 0x8000);
        assert_eq!(layout.lists_len, 8 * PAGE_SIZE);
        assert_eq!(layout.data_start, 16);
        assert_eq!(layout.data_pages(), 16..16384);
        let big = Layout::new(3 << 30, 0).unwrap();
        assert_eq!(big.pd_pages, 3);
        assert_eq!(big.data_start, 10);
    }

    /// Sizes that are not 2 MiB multiples, too small, too large, or full of lists are refused.
    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            Layout::new((64 << 20) + 4096, 0),
            Err(LayoutError::Size { .. })
        ));
        assert!(Layout::new(2 << 20, 0).is_err());
        assert!(Layout::new(128 << 30, 0).is_err());
        assert!(matches!(
            Layout::new(4 << 20, 1 << 20),
            Err(LayoutError::NoRoom { .. })
        ));
    }

    /// The page tables map every 2 MiB page of the slot to itself, and nothing beyond.
    #[test]
    fn page_tables_identity_map_the_slot() {
        let layout = Layout::new((1 << 30) | (4 << 20), 0).unwrap();
        let t = layout.page_tables();
        assert_eq!(t.len() as u64, 4 * PAGE_SIZE);
        assert_eq!(entry(&t, PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(entry(&t, PDPT_ADDR), PD_ADDR | 3);
        assert_eq!(entry(&t, PDPT_ADDR + 8), (PD_ADDR + PAGE_SIZE) | 3);
        assert_eq!(entry(&t, PDPT_ADDR + 16), 0);
        assert_eq!(entry(&t, PD_ADDR + 8), (2 << 20) | 0x83);
        // Second GiB: PD 1 entry 1 maps 1 GiB + 2 MiB; entry 2 is past the slot.
        let pd1 = PD_ADDR + PAGE_SIZE;
        assert_eq!(entry(&t, pd1 + 8), ((1 << 30) | (2 << 20)) | 0x83);
        assert_eq!(entry(&t, pd1 + 16), 0);
    }

    /// The descriptors encode to the values every long-mode boot loader uses.
    #[test]
    fn gdt_descriptors() {
        let g = gdt();
        let word = |i: usize| u64::from_le_bytes(g[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(word(1), 0x00af_9b00_0000_ffff);
        assert_eq!(word(2), 0x00cf_9300_0000_ffff);
        assert_eq!(word(3), 0x0000_8b00_0000_0067);
        assert_eq!(g.len(), 40);
    }
}
