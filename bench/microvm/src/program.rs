//! The guest program, written with iced-x86's `code_asm` assembler, and the walk descriptors it
//! reads.
//!
//! Guest instructions are expensive on this machine (about 1.4 us each under nested KVM, see
//! `docs/platform.md`), so the inner loops do four (strided) to seven (list, writing) instructions per page and nothing per
//! byte:
//!
//! ```text
//! entry:                          ; rdi = walk number, kept across runs
//!     rbx = WALK_TABLE + rdi * 64 ; this walk's descriptor
//!     rax = CHECKSUM_INIT
//!     rcx = count, rsi = first, r9 = stride, edx = kind
//!     unknown kind: out PORT_ERROR, kind; hlt
//!     empty walk: done; else dispatch on kind
//! strided:                        ; rsi = address of the current page
//!     rol rax, 13 ; xor rax, [rsi + PROBE] ; (mov [rsi + WRITE], rax) ; add rsi, r9 ; loop
//! list:                           ; rsi = address of the current u32 page index
//!     mov edx, [rsi] ; shl rdx, 12 ; rol rax, 13 ; xor rax, [rdx + PROBE] ; (mov [rdx + WRITE], rax)
//!     add rsi, 4 ; loop
//! done:
//!     [desc + RESULT] = rax ; [desc + RUNS] += 1
//!     out PORT_CHECKSUM_LO, eax ; out PORT_CHECKSUM_HI, rax >> 32
//!     hlt
//!     jmp entry                   ; a vCPU resumed after the hlt walks again
//! ```
//!
//! The checksum is `fold(sum, word) = sum.rotate_left(13) ^ word` over the probe words of the
//! walk's pages in walk order, starting from [`CHECKSUM_INIT`]; [`fold`] is the host's copy.

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::{
    CodeAssembler, IcedError, dword_ptr, dx, eax, edx, qword_ptr, r9, rax, rbx, rcx, rdi, rdx, rsi,
};
use thiserror::Error;

use crate::layout::{CODE_ADDR, PAGE_SIZE, PROBE_OFFSET, WALK_TABLE_ADDR, WRITE_OFFSET};

/// Port the guest writes the low 32 bits of the checksum to.
pub const PORT_CHECKSUM_LO: u16 = 0x0500;
/// Port the guest writes the high 32 bits of the checksum to (after the low half).
pub const PORT_CHECKSUM_HI: u16 = 0x0501;
/// Port the guest writes an unknown walk kind to before halting (a corrupt descriptor, or a
/// walk number beyond the table).
pub const PORT_ERROR: u16 = 0x0502;

/// Initial value of the checksum ("faultlin" in ASCII): a walk over zero pages still gives a
/// non-zero, order-dependent result.
pub const CHECKSUM_INIT: u64 = 0x6661_756c_746c_696e;
/// Rotation of the fold: odd and not a divisor of 64, so that the order of the pages matters.
pub const CHECKSUM_ROTATE: u32 = 13;

/// Bytes per walk descriptor.
pub const DESCRIPTOR_SIZE: u64 = 64;
/// Walk descriptors in the walk table (one page).
pub const MAX_WALKS: u32 = (PAGE_SIZE / DESCRIPTOR_SIZE) as u32;

/// Field offsets in a walk descriptor (all little-endian).
pub mod field {
    /// u32: the [`super::WalkKind`].
    pub const KIND: u64 = 0;
    /// u64: pages to visit.
    pub const COUNT: u64 = 8;
    /// u64: strided: guest address of the first page; list: guest address of the u32 array.
    pub const FIRST: u64 = 16;
    /// u64: strided: bytes from one page to the next (may wrap to walk downwards).
    pub const STRIDE: u64 = 24;
    /// u64, written by the guest: the checksum of the last completed walk.
    pub const RESULT: u64 = 32;
    /// u64, written by the guest: walks completed with this descriptor.
    pub const RUNS: u64 = 40;
}

/// How a walk finds its pages, and whether it writes. The values are what the guest dispatches
/// on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WalkKind {
    /// `first + i * stride`, read only.
    Strided = 0,
    /// `first + i * stride`, writing the running checksum into each page.
    StridedWrite = 1,
    /// Page indices from a u32 array, read only.
    List = 2,
    /// Page indices from a u32 array, writing the running checksum into each page.
    ListWrite = 3,
}

impl WalkKind {
    /// The kind with this number.
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Strided,
            1 => Self::StridedWrite,
            2 => Self::List,
            3 => Self::ListWrite,
            _ => return None,
        })
    }

    /// Whether the walk writes into the pages it visits.
    pub fn writes(self) -> bool {
        matches!(self, Self::StridedWrite | Self::ListWrite)
    }
}

/// One walk descriptor as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// How pages are found.
    pub kind: WalkKind,
    /// Pages to visit.
    pub count: u64,
    /// Address of the first page (strided) or of the page list (list).
    pub first: u64,
    /// Byte stride (strided).
    pub stride: u64,
    /// Checksum of the last completed walk (written by the guest; 0 before).
    pub result: u64,
    /// Walks completed (written by the guest).
    pub runs: u64,
}

impl Descriptor {
    /// Its bytes in the walk table.
    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_SIZE as usize] {
        let mut out = [0u8; DESCRIPTOR_SIZE as usize];
        let mut put = |at: u64, bytes: &[u8]| {
            out[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        put(field::KIND, &(self.kind as u32).to_le_bytes());
        put(field::COUNT, &self.count.to_le_bytes());
        put(field::FIRST, &self.first.to_le_bytes());
        put(field::STRIDE, &self.stride.to_le_bytes());
        put(field::RESULT, &self.result.to_le_bytes());
        put(field::RUNS, &self.runs.to_le_bytes());
        out
    }

    /// Decodes a descriptor; `None` for an unknown kind (an empty table slot is all zeros,
    /// which decodes as an empty strided walk).
    pub fn from_bytes(bytes: &[u8; DESCRIPTOR_SIZE as usize]) -> Option<Self> {
        let u64_at = |at: u64| {
            let at = at as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]))
        };
        let kind = u32::from_le_bytes(bytes[..4].try_into().unwrap_or([0xff; 4]));
        Some(Self {
            kind: WalkKind::from_u32(kind)?,
            count: u64_at(field::COUNT),
            first: u64_at(field::FIRST),
            stride: u64_at(field::STRIDE),
            result: u64_at(field::RESULT),
            runs: u64_at(field::RUNS),
        })
    }
}

/// Guest address of walk `walk`'s descriptor.
pub fn descriptor_addr(walk: u32) -> u64 {
    WALK_TABLE_ADDR + u64::from(walk) * DESCRIPTOR_SIZE
}

/// One step of the checksum, as the guest does it.
pub fn fold(sum: u64, word: u64) -> u64 {
    sum.rotate_left(CHECKSUM_ROTATE) ^ word
}

/// Assembling the guest program failed (a bug in this file: a branch out of range or an operand
/// the encoder refuses).
#[derive(Debug, Error)]
#[error("assembling the guest program failed: {0}")]
pub struct AssembleError(#[from] IcedError);

/// The assembled guest program.
#[derive(Debug, Clone)]
pub struct Program {
    /// Machine code, to be placed at [`CODE_ADDR`].
    pub code: Vec<u8>,
    /// Where a fresh vCPU starts (`rip`), with `rdi` = walk number.
    pub entry: u64,
    /// Address of the `jmp entry` after the `hlt`: where a vCPU stopped by the walk's `hlt`
    /// resumes.
    pub restart: u64,
}

/// The immediates of the program, as the encoder wants them.
const PROBE: i32 = PROBE_OFFSET as i32;
const WRITE: i32 = WRITE_OFFSET as i32;
const TABLE: i32 = WALK_TABLE_ADDR as i32;
const DESC_SHIFT: u32 = DESCRIPTOR_SIZE.trailing_zeros();
const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();

/// Assembles the guest program for [`CODE_ADDR`].
pub fn assemble() -> Result<Program, AssembleError> {
    let mut a = CodeAssembler::new(64)?;
    let mut entry = a.create_label();
    let mut strided = a.create_label();
    let mut strided_write = a.create_label();
    let mut list = a.create_label();
    let mut list_write = a.create_label();
    let mut done = a.create_label();
    let mut restart = a.create_label();

    // rbx = this walk's descriptor; rdi (the walk number) is never written, so a vCPU resumed
    // after the hlt repeats the same walk unless the VMM changes rdi.
    a.set_label(&mut entry)?;
    a.mov(rbx, rdi)?;
    a.shl(rbx, DESC_SHIFT)?;
    a.add(rbx, TABLE)?;
    a.mov(rax, CHECKSUM_INIT)?;
    a.mov(rcx, qword_ptr(rbx + field::COUNT as i32))?;
    a.mov(rsi, qword_ptr(rbx + field::FIRST as i32))?;
    a.mov(r9, qword_ptr(rbx + field::STRIDE as i32))?;
    a.mov(edx, dword_ptr(rbx + field::KIND as i32))?;
    let mut bad_kind = a.create_label();
    a.cmp(edx, WalkKind::ListWrite as u32)?;
    a.ja(bad_kind)?;
    // An empty walk reports CHECKSUM_INIT (and `loop` must never start with rcx = 0).
    a.test(rcx, rcx)?;
    a.jz(done)?;
    a.cmp(edx, WalkKind::Strided as u32)?;
    a.je(strided)?;
    a.cmp(edx, WalkKind::StridedWrite as u32)?;
    a.je(strided_write)?;
    a.cmp(edx, WalkKind::List as u32)?;
    a.je(list)?;
    a.jmp(list_write)?;
    // Unknown kind: say which, and stop.
    a.set_label(&mut bad_kind)?;
    a.mov(eax, edx)?;
    a.mov(edx, u32::from(PORT_ERROR))?;
    a.out(dx, eax)?;
    a.hlt()?;
    a.jmp(entry)?;

    // Strided walks: rsi is the current page's address.
    a.set_label(&mut strided)?;
    a.rol(rax, CHECKSUM_ROTATE)?;
    a.xor(rax, qword_ptr(rsi + PROBE))?;
    a.add(rsi, r9)?;
    a.loop_(strided)?;
    a.jmp(done)?;

    a.set_label(&mut strided_write)?;
    a.rol(rax, CHECKSUM_ROTATE)?;
    a.xor(rax, qword_ptr(rsi + PROBE))?;
    a.mov(qword_ptr(rsi + WRITE), rax)?;
    a.add(rsi, r9)?;
    a.loop_(strided_write)?;
    a.jmp(done)?;

    // List walks: rsi points at the current u32 page index (zero-extended into rdx).
    a.set_label(&mut list)?;
    a.mov(edx, dword_ptr(rsi))?;
    a.shl(rdx, PAGE_SHIFT)?;
    a.rol(rax, CHECKSUM_ROTATE)?;
    a.xor(rax, qword_ptr(rdx + PROBE))?;
    a.add(rsi, 4)?;
    a.loop_(list)?;
    a.jmp(done)?;

    a.set_label(&mut list_write)?;
    a.mov(edx, dword_ptr(rsi))?;
    a.shl(rdx, PAGE_SHIFT)?;
    a.rol(rax, CHECKSUM_ROTATE)?;
    a.xor(rax, qword_ptr(rdx + PROBE))?;
    a.mov(qword_ptr(rdx + WRITE), rax)?;
    a.add(rsi, 4)?;
    a.loop_(list_write)?;

    // Report: the result stays in memory (a snapshot taken now holds it), and goes out by port
    // I/O, low half first.
    a.set_label(&mut done)?;
    a.mov(qword_ptr(rbx + field::RESULT as i32), rax)?;
    a.inc(qword_ptr(rbx + field::RUNS as i32))?;
    a.mov(edx, u32::from(PORT_CHECKSUM_LO))?;
    a.out(dx, eax)?;
    a.shr(rax, 32u32)?;
    a.mov(edx, u32::from(PORT_CHECKSUM_HI))?;
    a.out(dx, eax)?;
    a.hlt()?;
    a.set_label(&mut restart)?;
    a.jmp(entry)?;

    let result = a.assemble_options(
        CODE_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    Ok(Program {
        entry: result.label_ip(&entry)?,
        restart: result.label_ip(&restart)?,
        code: result.inner.code_buffer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program assembles into one page, starting at its entry.
    #[test]
    fn program_fits_its_page() {
        let program = assemble().unwrap();
        assert_eq!(program.entry, CODE_ADDR);
        assert!(program.restart > program.entry);
        assert!(
            (program.code.len() as u64) < PAGE_SIZE,
            "{}",
            program.code.len()
        );
        // `jmp entry` is the last instruction.
        assert!(program.restart < CODE_ADDR + program.code.len() as u64);
    }

    /// Descriptors round-trip through their bytes; unknown kinds are refused.
    #[test]
    fn descriptor_round_trip() {
        let d = Descriptor {
            kind: WalkKind::ListWrite,
            count: 8192,
            first: 0x8000,
            stride: 0,
            result: 42,
            runs: 3,
        };
        let bytes = d.to_bytes();
        assert_eq!(Descriptor::from_bytes(&bytes), Some(d));
        let mut bad = bytes;
        bad[0] = 9;
        assert_eq!(Descriptor::from_bytes(&bad), None);
        assert_eq!(descriptor_addr(1), WALK_TABLE_ADDR + 64);
    }

    /// The fold depends on the order of the words.
    #[test]
    fn fold_is_order_dependent() {
        let ab = fold(fold(CHECKSUM_INIT, 1), 2);
        let ba = fold(fold(CHECKSUM_INIT, 2), 1);
        assert_ne!(ab, ba);
    }
}
