//! Snapshots of the micro-VM: a raw memory file holding exactly the slot's bytes (like a
//! Firecracker memory file; zero pages are left as holes, so the file is sparse) and, next to
//! it, a JSON file with the vCPU registers and the image's layout: the VMM's own business, which
//! the page server never sees.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::image::{GuestImage, ImageError, ImageSpec, build_image};
use crate::layout::{Layout, LayoutError, PAGE_SIZE};
use crate::memory::{AnonMemory, HostView};
use crate::state::VcpuState;
use crate::vmm::{MicroVm, RunError, RunOptions, RunResult};

/// Version of the vCPU file's format; bumped when a field changes meaning.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// What the vCPU file's name adds to the memory file's.
pub const VCPU_FILE_SUFFIX: &str = ".vcpu.json";

/// Bytes copied per read or write when dumping or loading memory: large enough that the system
/// call overhead vanishes, small enough to stay in cache.
const COPY_CHUNK: usize = 1 << 20;

/// The two files of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The raw memory file.
    pub memory: PathBuf,
    /// The vCPU file (JSON).
    pub vcpu: PathBuf,
}

impl SnapshotFiles {
    /// `memory` and, next to it, `memory` + [`VCPU_FILE_SUFFIX`].
    pub fn next_to(memory: impl Into<PathBuf>) -> Self {
        let memory = memory.into();
        let mut vcpu = memory.clone().into_os_string();
        vcpu.push(VCPU_FILE_SUFFIX);
        Self {
            memory,
            vcpu: vcpu.into(),
        }
    }
}

/// The vCPU file: everything besides memory that a restore needs, and what tests need to know
/// about the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`SNAPSHOT_FORMAT`].
    pub format: u32,
    /// Where things are in the memory file.
    pub layout: Layout,
    /// Seed of the data pattern.
    pub seed: u64,
    /// Walks in the walk table.
    pub walks: u32,
    /// The program's entry point.
    pub entry: u64,
    /// The vCPU.
    pub vcpu: VcpuState,
}

/// Writing or reading snapshot files, or making a snapshot, failed.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Mapping the VM's memory failed.
    #[error(
        "mapping {len} bytes of anonymous memory for the VM failed: {source}; a smaller slot \
         needs less (the mapping reserves no swap, so this is the address space or a limit)"
    )]
    Memory {
        /// Bytes asked for.
        len: usize,
        /// The kernel's error.
        source: io::Error,
    },
    /// Building the image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Running the guest before the snapshot failed.
    #[error("running the guest before taking the snapshot failed: {0}")]
    Run(#[from] RunError),
    /// A file operation failed.
    #[error("{what} {path} failed: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The vCPU file is not valid JSON of the expected shape.
    #[error("the vCPU file {path} is not a snapshot of this harness: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The vCPU file has another format version.
    #[error(
        "the vCPU file {path} has format {found}, this harness reads format {SNAPSHOT_FORMAT}; \
         make the snapshot again"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
    /// Memory and file sizes disagree.
    #[error(
        "the memory file {path} holds {file_len} bytes but the memory is {mem_len} bytes; \
         restore into memory of the snapshot's size"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// File size.
        file_len: u64,
        /// Memory size.
        mem_len: u64,
    },
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes the first `len` bytes of `memory` to a new raw file at `path`, leaving zero pages as
/// holes. Returns the number of non-zero pages written.
///
/// `memory` must not be registered with a userfaultfd with pages still missing (the reads would
/// wait for a pager); dump local memory, or memory a pager has filled completely.
pub fn dump_memory(memory: &HostView<'_>, len: u64, path: &Path) -> Result<u64, SnapshotError> {
    let file = File::create(path).map_err(io_error("creating", path))?;
    file.set_len(len).map_err(io_error("sizing", path))?;
    let mut chunk = vec![0u8; COPY_CHUNK];
    let mut written = 0;
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(COPY_CHUNK as u64) as usize;
        memory
            .read(offset as usize, &mut chunk[..n])
            .map_err(|e| SnapshotError::SizeMismatch {
                path: path.to_owned(),
                file_len: len,
                mem_len: e.size as u64,
            })?;
        for (i, page) in chunk[..n].chunks(PAGE_SIZE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let at = offset + i as u64 * PAGE_SIZE;
                file.write_all_at(page, at)
                    .map_err(io_error("writing", path))?;
                written += 1;
            }
        }
        offset += n as u64;
    }
    file.sync_all().map_err(io_error("syncing", path))?;
    Ok(written)
}

/// Copies the raw memory file at `path` into `memory` (the eager, local restore: the baseline a
/// lazy restore is compared with). Zero pages are skipped, so `memory` must be fresh (all
/// zero) and at least as large as the file. Returns the number of non-zero pages copied.
pub fn load_memory(path: &Path, memory: &HostView<'_>) -> Result<u64, SnapshotError> {
    let mut file = File::open(path).map_err(io_error("opening", path))?;
    let file_len = file
        .metadata()
        .map_err(io_error("reading the size of", path))?
        .len();
    if file_len > memory.len() as u64 || !file_len.is_multiple_of(PAGE_SIZE) {
        return Err(SnapshotError::SizeMismatch {
            path: path.to_owned(),
            file_len,
            mem_len: memory.len() as u64,
        });
    }
    let mut chunk = vec![0u8; COPY_CHUNK];
    let mut copied = 0;
    let mut offset = 0usize;
    while (offset as u64) < file_len {
        let n = (file_len - offset as u64).min(COPY_CHUNK as u64) as usize;
        file.read_exact(&mut chunk[..n])
            .map_err(io_error("reading", path))?;
        for (i, page) in chunk[..n].chunks(PAGE_SIZE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                // In bounds: the file is no larger than the mapping (checked above).
                let at = offset + i * PAGE_SIZE as usize;
                memory
                    .write(at, page)
                    .map_err(|e| SnapshotError::SizeMismatch {
                        path: path.to_owned(),
                        file_len,
                        mem_len: e.size as u64,
                    })?;
                copied += 1;
            }
        }
        offset += n;
    }
    Ok(copied)
}

/// Writes the vCPU file.
pub fn save_state(path: &Path, snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let json = serde_json::to_vec_pretty(snapshot).map_err(|source| SnapshotError::Json {
        path: path.to_owned(),
        source,
    })?;
    std::fs::write(path, json).map_err(io_error("writing", path))
}

/// Reads a vCPU file.
pub fn load_state(path: &Path) -> Result<VmSnapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_error("reading", path))?;
    let snapshot: VmSnapshot =
        serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Json {
            path: path.to_owned(),
            source,
        })?;
    if snapshot.format != SNAPSHOT_FORMAT {
        return Err(SnapshotError::Format {
            path: path.to_owned(),
            found: snapshot.format,
        });
    }
    Ok(snapshot)
}

/// Writes both files of a snapshot of `memory` (the slot's first `snapshot.layout.mem_size`
/// bytes).
pub fn save_snapshot(
    files: &SnapshotFiles,
    memory: &HostView<'_>,
    snapshot: &VmSnapshot,
) -> Result<(), SnapshotError> {
    dump_memory(memory, snapshot.layout.mem_size, &files.memory)?;
    save_state(&files.vcpu, snapshot)
}

/// A snapshot made by [`create_snapshot`].
#[derive(Debug, Clone)]
pub struct CreatedSnapshot {
    /// What the vCPU file holds.
    pub snapshot: VmSnapshot,
    /// The image as built (before the first run).
    pub image: GuestImage,
    /// The run before the snapshot, if one was asked for.
    pub first_run: Option<RunResult>,
}

/// Makes a snapshot from scratch: builds `spec`'s image in fresh anonymous memory, optionally
/// runs walk `first_run` once (the snapshot then holds what the guest wrote: the walk's result
/// and run count in its descriptor, and for a writing walk every page it visited, and the vCPU
/// stopped after the walk's `hlt`, where a restore resumes and walks again), and writes
/// `files`. Without a first run the vCPU file holds the boot state of walk 0.
pub fn create_snapshot(
    spec: &ImageSpec,
    first_run: Option<u32>,
    files: &SnapshotFiles,
) -> Result<CreatedSnapshot, SnapshotError> {
    let len = usize::try_from(spec.mem_size).map_err(|_| {
        ImageError::Layout(LayoutError::Size {
            mem_size: spec.mem_size,
        })
    })?;
    let memory = AnonMemory::new(len).map_err(|source| SnapshotError::Memory { len, source })?;
    let image = build_image(&memory.view(), spec)?;
    let (vcpu, run) = match first_run {
        None => (image.boot_state(0), None),
        Some(walk) => {
            let mut vm = MicroVm::new(memory.ram()).map_err(RunError::from)?;
            vm.set_state(&image.boot_state(walk))
                .map_err(RunError::from)?;
            let run = vm.run(&RunOptions::walk(walk))?;
            (vm.state().map_err(RunError::from)?, Some(run))
        }
    };
    let snapshot = VmSnapshot {
        format: SNAPSHOT_FORMAT,
        layout: image.layout,
        seed: image.seed,
        walks: image.walks.len() as u32,
        entry: image.program.entry,
        vcpu,
    };
    save_snapshot(files, &memory.view(), &snapshot)?;
    Ok(CreatedSnapshot {
        snapshot,
        image,
        first_run: run,
    })
}
