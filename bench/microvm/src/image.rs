//! Guest memory images: the content the host writes before a snapshot (data pattern, program,
//! page tables, walks), and the host's side of the checksum.
//!
//! Data page `p` holds the synthetic content of [`pattern::fill_page`](crate::pattern::fill_page)
//! (about 40% zero pages in runs of 8, 30% text, 30% random) with, in every non-zero page, the *probe
//! word* [`probe_word`]`(seed, p)` at [`PROBE_OFFSET`]. Zero pages stay all zero, probe word
//! included, so zero-page handling is exercised by every walk.

use std::collections::HashSet;
use std::ops::Range;

use thiserror::Error;

use crate::layout::{
    CODE_ADDR, GDT_ADDR, Layout, LayoutError, PAGE_SIZE, PML4_ADDR, PROBE_OFFSET, WRITE_OFFSET, gdt,
};
use crate::memory::{GuestBytes, HostView, OutOfRange};
use crate::pattern::{PageKind, fill_page, mix, page_kind};
use crate::program::{
    AssembleError, CHECKSUM_INIT, DESCRIPTOR_SIZE, Descriptor, MAX_WALKS, Program, WalkKind,
    assemble, descriptor_addr, fold,
};
use crate::state::VcpuState;

/// How a walk orders its pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageOrder {
    /// Pages `first + i * stride` for `i` in `0..count` (a negative stride walks downwards).
    Strided {
        /// First page index.
        first: u64,
        /// Pages from one visit to the next.
        stride: i64,
        /// Pages visited.
        count: u64,
    },
    /// These page indices, in this order (stored in guest memory as u32s).
    List(Vec<u32>),
}

/// One walk of the guest program over data pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    /// Which pages, in which order.
    pub order: PageOrder,
    /// Whether the guest also writes the running checksum into each page it visits, at
    /// [`WRITE_OFFSET`] (dirtying every page, for write-fault and dirty-tracking scenarios).
    pub write: bool,
}

impl Walk {
    /// `count` consecutive pages from `first`.
    pub fn sequential(first: u64, count: u64) -> Self {
        Self::strided(first, 1, count)
    }

    /// `count` pages from `first`, `stride` pages apart.
    pub fn strided(first: u64, stride: i64, count: u64) -> Self {
        Self {
            order: PageOrder::Strided {
                first,
                stride,
                count,
            },
            write: false,
        }
    }

    /// These pages in this order.
    pub fn list(pages: Vec<u32>) -> Self {
        Self {
            order: PageOrder::List(pages),
            write: false,
        }
    }

    /// `count` distinct pages of `pages` in a random order fixed by `seed` (all of them when
    /// `count` exceeds the range).
    pub fn random(seed: u64, pages: Range<u64>, count: usize) -> Self {
        let mut all: Vec<u32> = pages
            .map(|p| u32::try_from(p).unwrap_or(u32::MAX))
            .collect();
        let count = count.min(all.len());
        // A partial Fisher-Yates shuffle: the first `count` slots end up a uniform sample in
        // random order.
        let mut state = mix(seed);
        for i in 0..count {
            state = mix(state);
            let j = i + (state % (all.len() - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(count);
        Self::list(all)
    }

    /// The same walk, writing into each page it visits.
    pub fn writing(mut self) -> Self {
        self.write = true;
        self
    }

    /// Pages visited.
    pub fn len(&self) -> u64 {
        match &self.order {
            PageOrder::Strided { count, .. } => *count,
            PageOrder::List(pages) => pages.len() as u64,
        }
    }

    /// Whether the walk visits no page.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The page indices in visiting order.
    pub fn pages(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match &self.order {
            &PageOrder::Strided {
                first,
                stride,
                count,
            } => Box::new(
                (0..count).map(move |i| first.wrapping_add_signed(stride.wrapping_mul(i as i64))),
            ),
            PageOrder::List(pages) => Box::new(pages.iter().map(|&p| u64::from(p))),
        }
    }

    /// The guest's dispatch value for this walk.
    pub fn kind(&self) -> WalkKind {
        match (&self.order, self.write) {
            (PageOrder::Strided { .. }, false) => WalkKind::Strided,
            (PageOrder::Strided { .. }, true) => WalkKind::StridedWrite,
            (PageOrder::List(_), false) => WalkKind::List,
            (PageOrder::List(_), true) => WalkKind::ListWrite,
        }
    }

    /// Page-list entries this walk stores in guest memory.
    fn list_entries(&self) -> u64 {
        match &self.order {
            PageOrder::Strided { .. } => 0,
            PageOrder::List(pages) => pages.len() as u64,
        }
    }

    /// The first page outside `data`, if any.
    fn stray_page(&self, data: &Range<u64>) -> Option<u64> {
        match &self.order {
            PageOrder::Strided { count: 0, .. } => None,
            // Linear: checking both ends checks every page (unless the walk wraps around the
            // address space, which then puts an end outside `data`).
            &PageOrder::Strided {
                first,
                stride,
                count,
            } => {
                let last = first.wrapping_add_signed(stride.wrapping_mul(count as i64 - 1));
                [first, last].into_iter().find(|p| !data.contains(p))
            }
            PageOrder::List(pages) => pages
                .iter()
                .map(|&p| u64::from(p))
                .find(|p| !data.contains(p)),
        }
    }
}

/// What to put in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Size of the memory slot (a multiple of 2 MiB; see [`Layout::new`]).
    pub mem_size: u64,
    /// Seed of the data pattern.
    pub seed: u64,
    /// The walks, numbered from 0 in this order (at most [`MAX_WALKS`]).
    pub walks: Vec<Walk>,
}

impl ImageSpec {
    /// An image of `mem_size` bytes with content seeded by `seed` and no walk yet.
    pub fn new(mem_size: u64, seed: u64) -> Self {
        Self {
            mem_size,
            seed,
            walks: Vec::new(),
        }
    }

    /// Adds a walk (number `self.walks.len()`).
    pub fn walk(mut self, walk: Walk) -> Self {
        self.walks.push(walk);
        self
    }

    /// The layout this spec needs.
    pub fn layout(&self) -> Result<Layout, LayoutError> {
        Layout::new(
            self.mem_size,
            self.walks.iter().map(Walk::list_entries).sum(),
        )
    }
}

/// Building an image failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The slot size or the lists do not fit the layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// More walks than the walk table holds.
    #[error("{count} walks asked for, but the walk table holds at most {MAX_WALKS}")]
    TooManyWalks {
        /// Walks asked for.
        count: usize,
    },
    /// A walk visits a page outside the data pages.
    #[error(
        "walk {walk} visits page {page}, outside the data pages {first}..{end} of this layout; \
         choose pages in that range (the ones before it hold the program and its tables)"
    )]
    PageOutOfRange {
        /// Walk number.
        walk: usize,
        /// The stray page.
        page: u64,
        /// First data page.
        first: u64,
        /// One past the last data page.
        end: u64,
    },
    /// The mapping is smaller than the slot.
    #[error(
        "the memory given is {len} bytes but the image needs {mem_size}; map at least the \
         slot's size"
    )]
    MemoryTooSmall {
        /// Bytes mapped.
        len: usize,
        /// Slot size.
        mem_size: u64,
    },
    /// The guest program did not assemble.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
}

/// An image written into guest memory: where things are, what the walks are, and how the vCPU
/// starts.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Where things are.
    pub layout: Layout,
    /// Seed of the data pattern.
    pub seed: u64,
    /// The walks, by number.
    pub walks: Vec<Walk>,
    /// The guest program.
    pub program: Program,
}

impl GuestImage {
    /// The vCPU state that starts walk `walk` from the program's entry.
    pub fn boot_state(&self, walk: u32) -> VcpuState {
        VcpuState::long_mode(self.program.entry, walk)
    }

    /// The checksum walk `walk` gives on this image, computed from the pattern alone (a second
    /// oracle besides [`expected_checksum`], which reads memory). Walks only write at
    /// [`WRITE_OFFSET`], so it holds however often walks have run. `None` for an unknown walk.
    pub fn expected_checksum(&self, walk: u32) -> Option<u64> {
        let walk = self.walks.get(walk as usize)?;
        Some(walk.pages().fold(CHECKSUM_INIT, |sum, p| {
            fold(sum, data_probe_word(self.seed, p))
        }))
    }
}

/// Whether data page `page` is an all-zero page.
pub fn is_zero_page(page: u64) -> bool {
    page_kind(page) == PageKind::Zero
}

/// The probe word of non-zero data page `page` in an image seeded by `seed` (never zero, and
/// different for every page).
pub fn probe_word(seed: u64, page: u64) -> u64 {
    mix(mix(seed) ^ page) | 1
}

/// The probe word data page `page` holds: [`probe_word`], or 0 in a zero page.
pub fn data_probe_word(seed: u64, page: u64) -> u64 {
    if is_zero_page(page) {
        0
    } else {
        probe_word(seed, page)
    }
}

/// Fills `buf` (one page) with data page `page`'s content.
pub fn fill_data_page(seed: u64, page: u64, buf: &mut [u8]) {
    fill_page(seed, page, buf);
    if !is_zero_page(page) {
        let at = PROBE_OFFSET as usize;
        buf[at..at + 8].copy_from_slice(&probe_word(seed, page).to_le_bytes());
    }
}

/// The header bytes (everything before the first data page) and the assembled program.
fn header(spec: &ImageSpec, layout: &Layout) -> Result<(Vec<u8>, Program), ImageError> {
    let program = assemble()?;
    let mut header = vec![0u8; layout.header_len() as usize];
    let mut put = |addr: u64, bytes: &[u8]| {
        header[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
    };
    put(GDT_ADDR, &gdt());
    put(CODE_ADDR, &program.code);
    put(PML4_ADDR, &layout.page_tables());
    let mut list_addr = layout.lists_addr;
    for (n, walk) in spec.walks.iter().enumerate() {
        let (first, stride) = match &walk.order {
            PageOrder::Strided { first, stride, .. } => (
                first.wrapping_mul(PAGE_SIZE),
                stride.wrapping_mul(PAGE_SIZE as i64) as u64,
            ),
            PageOrder::List(pages) => {
                let at = list_addr;
                let bytes: Vec<u8> = pages.iter().flat_map(|p| p.to_le_bytes()).collect();
                put(at, &bytes);
                list_addr += bytes.len() as u64;
                (at, 0)
            }
        };
        let descriptor = Descriptor {
            kind: walk.kind(),
            count: walk.len(),
            first,
            stride,
            result: 0,
            runs: 0,
        };
        put(descriptor_addr(n as u32), &descriptor.to_bytes());
    }
    Ok((header, program))
}

/// Writes the image `spec` describes into `memory` (from its start, `spec.mem_size` bytes):
/// every byte of the slot ends up as the image says, whatever `memory` held before. Reads zero
/// pages first and writes them only where they are not zero already, so fresh memory stays
/// unallocated there.
///
/// `memory` must not be registered with a userfaultfd (write through a fill view instead): the
/// host's accesses would fault and wait for a pager.
pub fn build_image(memory: &HostView<'_>, spec: &ImageSpec) -> Result<GuestImage, ImageError> {
    if spec.walks.len() > MAX_WALKS as usize {
        return Err(ImageError::TooManyWalks {
            count: spec.walks.len(),
        });
    }
    let layout = spec.layout()?;
    if (memory.len() as u64) < layout.mem_size {
        return Err(ImageError::MemoryTooSmall {
            len: memory.len(),
            mem_size: layout.mem_size,
        });
    }
    let data = layout.data_pages();
    for (walk, w) in spec.walks.iter().enumerate() {
        if let Some(page) = w.stray_page(&data) {
            return Err(ImageError::PageOutOfRange {
                walk,
                page,
                first: data.start,
                end: data.end,
            });
        }
    }
    let (header, program) = header(spec, &layout)?;
    let too_small = |_: OutOfRange| ImageError::MemoryTooSmall {
        len: memory.len(),
        mem_size: layout.mem_size,
    };
    memory.write(0, &header).map_err(too_small)?;
    let mut page_buf = vec![0u8; PAGE_SIZE as usize];
    for page in data {
        let offset = (page * PAGE_SIZE) as usize;
        if is_zero_page(page) {
            memory.read(offset, &mut page_buf).map_err(too_small)?;
            if page_buf.iter().any(|&b| b != 0) {
                page_buf.fill(0);
                memory.write(offset, &page_buf).map_err(too_small)?;
            }
        } else {
            fill_data_page(spec.seed, page, &mut page_buf);
            memory.write(offset, &page_buf).map_err(too_small)?;
        }
    }
    Ok(GuestImage {
        layout,
        seed: spec.seed,
        walks: spec.walks.clone(),
        program,
    })
}

/// Reading walks or checksums out of guest memory failed.
#[derive(Debug, Error)]
pub enum InspectError {
    /// An address outside the memory.
    #[error(
        "reading {len} bytes at guest address {gpa:#x} falls outside the {size}-byte memory; is \
         this the memory the walk was built for?"
    )]
    OutOfRange {
        /// Address read.
        gpa: u64,
        /// Bytes read.
        len: u64,
        /// Size of the memory.
        size: u64,
    },
    /// The walk number is beyond the table.
    #[error("walk {walk} does not exist: the walk table holds {MAX_WALKS}")]
    NoSuchWalk {
        /// Walk number.
        walk: u32,
    },
    /// A descriptor this harness would not have written.
    #[error("the descriptor of walk {walk} is not one this harness writes: {reason}")]
    BadDescriptor {
        /// Walk number.
        walk: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A written word differs from what the walk should have left.
    #[error(
        "page {page} holds {found:#x} at offset {WRITE_OFFSET:#x} but the walk should have \
         written {expected:#x} there"
    )]
    WriteMismatch {
        /// The page.
        page: u64,
        /// Expected word.
        expected: u64,
        /// Word found.
        found: u64,
    },
}

fn read_u64(memory: &(impl GuestBytes + ?Sized), gpa: u64) -> Result<u64, InspectError> {
    let mut word = [0u8; 8];
    if memory.read_at(gpa, &mut word) {
        Ok(u64::from_le_bytes(word))
    } else {
        Err(InspectError::OutOfRange {
            gpa,
            len: 8,
            size: memory.size(),
        })
    }
}

/// Walk `walk`'s descriptor as it is in `memory` (with the result and run count the guest
/// wrote there).
pub fn read_descriptor(
    memory: &(impl GuestBytes + ?Sized),
    walk: u32,
) -> Result<Descriptor, InspectError> {
    if walk >= MAX_WALKS {
        return Err(InspectError::NoSuchWalk { walk });
    }
    let gpa = descriptor_addr(walk);
    let mut bytes = [0u8; DESCRIPTOR_SIZE as usize];
    if !memory.read_at(gpa, &mut bytes) {
        return Err(InspectError::OutOfRange {
            gpa,
            len: DESCRIPTOR_SIZE,
            size: memory.size(),
        });
    }
    Descriptor::from_bytes(&bytes).ok_or(InspectError::BadDescriptor {
        walk,
        reason: "unknown walk kind",
    })
}

/// Walk `walk` as the guest will see it in `memory` (a raw memory file, say): its descriptor in
/// the walk table at [`WALK_TABLE_ADDR`](crate::layout::WALK_TABLE_ADDR) and, for a list walk, its page list.
pub fn read_walk(memory: &(impl GuestBytes + ?Sized), walk: u32) -> Result<Walk, InspectError> {
    let d = read_descriptor(memory, walk)?;
    let bad = |reason| InspectError::BadDescriptor { walk, reason };
    let write = d.kind.writes();
    let order = match d.kind {
        WalkKind::Strided | WalkKind::StridedWrite => {
            if !d.first.is_multiple_of(PAGE_SIZE) || !d.stride.is_multiple_of(PAGE_SIZE) {
                return Err(bad("first page or stride is not page-aligned"));
            }
            PageOrder::Strided {
                first: d.first / PAGE_SIZE,
                stride: (d.stride as i64) / PAGE_SIZE as i64,
                count: d.count,
            }
        }
        WalkKind::List | WalkKind::ListWrite => {
            let len = d.count.checked_mul(4).ok_or(bad("count overflows"))?;
            let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| bad("list too long"))?];
            if !memory.read_at(d.first, &mut bytes) {
                return Err(InspectError::OutOfRange {
                    gpa: d.first,
                    len,
                    size: memory.size(),
                });
            }
            PageOrder::List(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
    };
    Ok(Walk { order, write })
}

/// The checksum the guest computes for `walk` on `memory`, computed on the host the same way:
/// the probe words of the walk's pages folded in order.
pub fn expected_checksum(
    memory: &(impl GuestBytes + ?Sized),
    walk: &Walk,
) -> Result<u64, InspectError> {
    walk.pages().try_fold(CHECKSUM_INIT, |sum, page| {
        let word = read_u64(
            memory,
            page.wrapping_mul(PAGE_SIZE).wrapping_add(PROBE_OFFSET),
        )?;
        Ok(fold(sum, word))
    })
}

/// Checks that a writing walk left in each page it visited the running checksum after that
/// page (the last visit's, for a page visited twice).
pub fn check_writes(memory: &(impl GuestBytes + ?Sized), walk: &Walk) -> Result<(), InspectError> {
    let mut sum = CHECKSUM_INIT;
    let mut expected = Vec::with_capacity(walk.len() as usize);
    for page in walk.pages() {
        let word = read_u64(
            memory,
            page.wrapping_mul(PAGE_SIZE).wrapping_add(PROBE_OFFSET),
        )?;
        sum = fold(sum, word);
        expected.push((page, sum));
    }
    let mut seen = HashSet::new();
    for &(page, value) in expected.iter().rev() {
        if seen.insert(page) {
            let found = read_u64(memory, page * PAGE_SIZE + WRITE_OFFSET)?;
            if found != value {
                return Err(InspectError::WriteMismatch {
                    page,
                    expected: value,
                    found,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::AnonMemory;

    /// A random walk visits distinct data pages, deterministically in its seed.
    #[test]
    fn random_walks_are_distinct_and_deterministic() {
        let walk = Walk::random(7, 16..1016, 500);
        assert_eq!(walk.len(), 500);
        let pages: HashSet<u64> = walk.pages().collect();
        assert_eq!(pages.len(), 500);
        assert!(pages.iter().all(|p| (16..1016).contains(p)));
        assert_eq!(walk, Walk::random(7, 16..1016, 500));
        assert_ne!(walk, Walk::random(8, 16..1016, 500));
        assert_eq!(Walk::random(1, 16..20, 99).len(), 4);
    }

    /// Strided walks go both ways.
    #[test]
    fn strided_pages() {
        let up: Vec<u64> = Walk::strided(100, 3, 4).pages().collect();
        assert_eq!(up, [100, 103, 106, 109]);
        let down: Vec<u64> = Walk::strided(100, -10, 3).pages().collect();
        assert_eq!(down, [100, 90, 80]);
    }

    /// The image holds the header, the pattern and the lists where the layout says, and the
    /// checksum read from memory equals the one computed from the pattern.
    #[test]
    fn image_content_and_checksums_agree() {
        let mem = AnonMemory::new(8 << 20).unwrap();
        // Dirty a zero page beforehand: building must clear it.
        let zero = (16..2048).find(|&p| is_zero_page(p)).unwrap();
        mem.view()
            .write((zero * PAGE_SIZE) as usize + 5, b"x")
            .unwrap();
        let spec = ImageSpec::new(8 << 20, 3)
            .walk(Walk::sequential(16, 100))
            .walk(Walk::random(5, 16..2048, 300).writing())
            .walk(Walk::strided(2047, -2, 50));
        let image = build_image(&mem.view(), &spec).unwrap();
        assert_eq!(image.layout.data_start, 9);
        let memory = &mem.view();
        let mut page = vec![0u8; 4096];
        memory.read((zero * PAGE_SIZE) as usize, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        for (n, walk) in spec.walks.iter().enumerate() {
            assert_eq!(&read_walk(memory, n as u32).unwrap(), walk);
            assert_eq!(
                expected_checksum(memory, walk).unwrap(),
                image.expected_checksum(n as u32).unwrap()
            );
        }
        let d = read_descriptor(memory, 1).unwrap();
        assert_eq!((d.kind, d.count, d.runs), (WalkKind::ListWrite, 300, 0));
        let mut expect = vec![0u8; 4096];
        fill_data_page(3, 100, &mut expect);
        memory.read(100 * 4096, &mut page).unwrap();
        assert_eq!(page, expect);
    }

    /// Walks outside the data pages, and too many walks, are refused before anything is written.
    #[test]
    fn bad_walks_are_refused() {
        let mem = AnonMemory::new(4 << 20).unwrap();
        let err = build_image(
            &mem.view(),
            &ImageSpec::new(4 << 20, 1).walk(Walk::sequential(0, 10)),
        )
        .unwrap_err();
        assert!(
            matches!(err, ImageError::PageOutOfRange { page: 0, .. }),
            "{err}"
        );
        let err = build_image(
            &mem.view(),
            &ImageSpec::new(4 << 20, 1).walk(Walk::sequential(1000, 100)),
        )
        .unwrap_err();
        assert!(
            matches!(err, ImageError::PageOutOfRange { page: 1099, .. }),
            "{err}"
        );
        let mut spec = ImageSpec::new(4 << 20, 1);
        spec.walks = vec![Walk::sequential(20, 1); 65];
        assert!(matches!(
            build_image(&mem.view(), &spec),
            Err(ImageError::TooManyWalks { count: 65 })
        ));
        let err = build_image(&mem.view(), &ImageSpec::new(8 << 20, 1)).unwrap_err();
        assert!(matches!(err, ImageError::MemoryTooSmall { .. }), "{err}");
    }
}
