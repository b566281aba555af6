//! The harness end to end under real KVM: every backing type of faultline-client (a
//! dev-dependency: the library itself never sees the client), snapshots, eager and lazy
//! restores. Each test fails (or skips under `FAULTLINE_ALLOW_SKIP=1`) without `/dev/kvm`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultline_client::backing::{BackingError, BackingKind, GuestMemory, HUGE_PAGE_SIZE, Mapping};
use faultline_client::testutil;
use faultline_client::uffd::{Event, Readiness, RegisterModes, ResolveError, StopSignal, Uffd};

use super::layout::PAGE_SIZE;
use super::program::WalkKind;
use super::*;

/// The slot size of most tests: 16,384 pages.
const MEM: u64 = 64 << 20;
/// Pages a test walk visits.
const WALK_PAGES: usize = 8192;

/// The slot of a [`MicroVm`] on the client's `memory`: its guest mapping, or for guest_memfd its
/// guest_memfd on its own VM.
fn ram(memory: &GuestMemory) -> GuestRam<'_> {
    if memory.kind() != BackingKind::GuestMemfd {
        // SAFETY: `memory` keeps its guest mapping (page-aligned, read-write) mapped while the
        // borrow lasts, and no Rust object lives in it.
        return unsafe { GuestRam::host(memory.host_addr(), memory.len()) };
    }
    let (vm, gmem) = (
        memory.vm().expect("the guest_memfd's VM"),
        memory.fd().expect("fd"),
    );
    // SAFETY: `GuestMemory::guest_memfd` created `gmem` on `vm` with the memory's size and maps
    // it at `host_addr()`; all three live as long as `memory`, borrowed for the result's life.
    unsafe {
        GuestRam::guest_memfd(
            vm.vm_fd(),
            gmem,
            memory.fd_offset(),
            memory.len(),
            memory.host_addr(),
        )
    }
}

/// The host's view of the client's `mapping`.
fn view(mapping: &Mapping) -> HostView<'_> {
    // SAFETY: a `Mapping` is mapped read-write while it lives (borrowed for the view's life) and
    // holds no Rust object.
    unsafe { HostView::new(mapping.addr(), mapping.len()) }
}

/// A VM can be made here, or the test is skipped (with a message).
fn have_kvm() -> bool {
    testutil::require_kvm().is_some()
}

/// Walks 0..=3 of the standard test image: sequential, random, random writing, strided down.
fn test_spec(seed: u64) -> ImageSpec {
    let layout = Layout::new(MEM, 2 * WALK_PAGES as u64).unwrap();
    let data = layout.data_pages();
    ImageSpec::new(MEM, seed)
        .walk(Walk::sequential(data.start, WALK_PAGES as u64))
        .walk(Walk::random(seed, data.clone(), WALK_PAGES))
        .walk(Walk::random(seed + 1, data.clone(), WALK_PAGES).writing())
        .walk(Walk::strided(data.end - 1, -3, 1000))
}

/// Builds the test image in `memory` (through `fill` when given), runs every walk on one
/// MicroVm, and checks each checksum against both host oracles and the writes of writing
/// walks. Returns the run results.
fn build_and_walk(memory: &GuestMemory, fill: &Mapping, seed: u64) -> Vec<RunResult> {
    let spec = test_spec(seed);
    let fill = &view(fill);
    let image = build_image(fill, &spec).unwrap();
    let mut vm = MicroVm::new(ram(memory)).unwrap();
    vm.set_state(&image.boot_state(0)).unwrap();
    let mut results = Vec::new();
    for (n, walk) in spec.walks.iter().enumerate() {
        let n = n as u32;
        let result = vm.run(&RunOptions::walk(n)).unwrap();
        let from_memory = expected_checksum(fill, walk).unwrap();
        assert_eq!(result.checksum, from_memory, "walk {n}");
        assert_eq!(
            Some(result.checksum),
            image.expected_checksum(n),
            "walk {n}"
        );
        let d = read_descriptor(fill, n).unwrap();
        assert_eq!((d.result, d.runs), (result.checksum, 1), "walk {n}");
        if walk.write {
            check_writes(fill, walk).unwrap();
        }
        eprintln!(
            "{} walk {n} ({:?}, {} pages): {:?}, {} exits, {:.0} pages/s",
            memory.kind(),
            walk.kind(),
            walk.len(),
            result.elapsed,
            result.exits,
            walk.len() as f64 / result.elapsed.as_secs_f64()
        );
        results.push(result);
    }
    // Walks differ, so do their checksums.
    assert_ne!(results[0].checksum, results[1].checksum);
    // The vCPU resumed after a hlt walks again, with the same result.
    assert_eq!(
        vm.run(&RunOptions::walk(1)).unwrap().checksum,
        results[1].checksum
    );
    results
}

/// On local anonymous memory, sequential, random, writing and strided walks of 8192 pages give
/// the checksums the host computes.
#[test]
fn anonymous_memory_walks_match_the_host() {
    if !have_kvm() {
        return;
    }
    let memory = GuestMemory::anonymous(MEM as usize).unwrap();
    build_and_walk(&memory, memory.guest(), 11);
}

/// The same walks on a shmem memfd mapping.
#[test]
fn shmem_memory_walks_match_the_host() {
    if !have_kvm() {
        return;
    }
    let memory = GuestMemory::shmem(MEM as usize).unwrap();
    build_and_walk(&memory, memory.fill_view().unwrap(), 12);
}

/// The same walks on a hugetlbfs memfd mapping (2 MiB host pages).
#[test]
fn hugetlb_memory_walks_match_the_host() {
    if !have_kvm() {
        return;
    }
    let Some(_pages) = testutil::reserve_huge_pages(MEM as usize / HUGE_PAGE_SIZE) else {
        return;
    };
    let memory = match GuestMemory::hugetlb(MEM as usize) {
        Ok(memory) => memory,
        // Another process's tests can shrink the pool between the reservation and the mapping.
        Err(err @ BackingError::HugePages { .. }) => {
            testutil::skip(format!("the huge page pool shrank under this test: {err}"));
            return;
        }
        Err(err) => panic!("{err}"),
    };
    build_and_walk(&memory, memory.fill_view().unwrap(), 13);
}

/// The same walks on a guest_memfd memslot of the guest_memfd's own VM, filled through its
/// mapping before the vCPU runs.
#[test]
fn guest_memfd_walks_match_the_host() {
    if !have_kvm() || !testutil::guest_memfd_available() {
        return;
    }
    let memory = match GuestMemory::guest_memfd(MEM as usize) {
        Ok(memory) => memory,
        Err(err) => {
            testutil::skip(format!("no mappable guest_memfd: {err}"));
            return;
        }
    };
    build_and_walk(&memory, memory.fill_view().unwrap(), 14);
    // The VM holds the harness's slot and vCPU for good: a second harness is refused clearly.
    let err = MicroVm::new(ram(&memory)).unwrap_err();
    assert!(matches!(err, VmError::Memslot { .. }), "{err}");
}

/// A snapshot taken after a writing walk, restored from its raw memory file into fresh memory,
/// resumes after the hlt and gives the checksum the host computes from the file; another walk
/// can be chosen on restore.
#[test]
fn restore_from_the_memory_file_gives_the_same_checksum() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = SnapshotFiles::next_to(dir.path().join("memory"));
    let created = create_snapshot(&test_spec(21), Some(2), &files).unwrap();
    let first = created.first_run.unwrap();
    assert_eq!(Some(first.checksum), created.image.expected_checksum(2));

    let bytes = std::fs::read(&files.memory).unwrap();
    assert_eq!(bytes.len() as u64, MEM);
    let snapshot = load_state(&files.vcpu).unwrap();
    assert_eq!(snapshot, created.snapshot);
    assert_eq!(snapshot.vcpu.regs.rdi, 2);
    assert_eq!(snapshot.vcpu.regs.rip, created.image.program.restart);
    // The file holds what the guest wrote: its result, its run count, and its page writes.
    let d = read_descriptor(&bytes[..], 2).unwrap();
    assert_eq!(
        (d.kind, d.result, d.runs),
        (WalkKind::ListWrite, first.checksum, 1)
    );
    let walk = read_walk(&bytes[..], 2).unwrap();
    check_writes(&bytes[..], &walk).unwrap();

    let memory = AnonMemory::new(MEM as usize).unwrap();
    let copied = load_memory(&files.memory, &memory.view()).unwrap();
    assert!(copied < MEM / PAGE_SIZE, "zero pages are not copied");
    let again = run_guest(memory.ram(), &snapshot.vcpu, &RunOptions::default()).unwrap();
    assert_eq!(
        again.checksum,
        expected_checksum(&bytes[..], &walk).unwrap()
    );
    assert_eq!(again.checksum, first.checksum);

    let other = read_walk(&bytes[..], 1).unwrap();
    let fresh = AnonMemory::new(MEM as usize).unwrap();
    load_memory(&files.memory, &fresh.view()).unwrap();
    let result = run_guest(fresh.ram(), &snapshot.vcpu, &RunOptions::walk(1)).unwrap();
    assert_eq!(
        result.checksum,
        expected_checksum(&bytes[..], &other).unwrap()
    );
}

/// Serves the missing-page faults of `base..base+file.len()` from `file` (COPY, or ZEROPAGE for
/// zero pages) until `stop`; counts them in `faults`.
fn serve_from_file(uffd: &Uffd, stop: &StopSignal, base: usize, file: &[u8], faults: &AtomicU64) {
    let page = PAGE_SIZE as usize;
    loop {
        match uffd
            .wait(Some(Duration::from_millis(100)), Some(stop))
            .unwrap()
        {
            Readiness::Stopped => return,
            Readiness::TimedOut => continue,
            Readiness::Events => {}
        }
        while let Some(event) = uffd.read_event().unwrap() {
            let Event::Pagefault { address, .. } = event else {
                continue;
            };
            let offset = (address - base) & !(page - 1);
            let src = &file[offset..offset + page];
            let result = if src.iter().all(|&b| b == 0) {
                uffd.zeropage(base + offset, page, false).map(drop)
            } else {
                uffd.copy(base + offset, src, false).map(drop)
            };
            match result {
                Ok(()) => {}
                Err(ResolveError::Exists { .. }) => uffd.wake(base + offset, page).unwrap(),
                Err(err) => panic!("{err}"),
            }
            faults.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Restored into anonymous memory registered with userfaultfd and filled only on demand, the
/// vCPU's own accesses raise the faults (at least one per visited page) and the checksum is
/// right: the restore path never touches guest memory itself.
#[test]
fn lazy_restore_through_userfaultfd_faults_from_the_vcpu() {
    if !have_kvm() {
        return;
    }
    let Some(uffd) = testutil::require_uffd() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let files = SnapshotFiles::next_to(dir.path().join("memory"));
    let created = create_snapshot(&test_spec(31), Some(1), &files).unwrap();
    let bytes = std::fs::read(&files.memory).unwrap();
    let snapshot = load_state(&files.vcpu).unwrap();

    let memory = GuestMemory::anonymous(MEM as usize).unwrap();
    let base = memory.host_addr();
    // SAFETY: `memory` is guest memory holding no Rust object; it outlives the registration
    // (the uffd is dropped explicitly below, after the handler has stopped).
    unsafe { uffd.register(base, memory.len(), RegisterModes::MISSING) }.unwrap();
    let stop = StopSignal::new().unwrap();
    let faults = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| serve_from_file(&uffd, &stop, base, &bytes, &faults));
        let result = run_guest(ram(&memory), &snapshot.vcpu, &RunOptions::default());
        stop.stop();
        result
    })
    .unwrap();
    // Before `memory`: with EVENT_UNMAP granted, unmapping a registered range would wait for a
    // reader of the UNMAP message, and the handler has stopped.
    drop(uffd);
    let walk = read_walk(&bytes[..], 1).unwrap();
    assert_eq!(
        result.checksum,
        expected_checksum(&bytes[..], &walk).unwrap()
    );
    assert_eq!(Some(result.checksum), created.image.expected_checksum(1));
    let faults = faults.load(Ordering::Relaxed);
    assert!(
        faults >= walk.len(),
        "{faults} faults for {} pages",
        walk.len()
    );
    eprintln!(
        "lazy restore: {} pages in {:?}, {faults} uffd faults, {:.0} pages/s",
        walk.len(),
        result.elapsed,
        walk.len() as f64 / result.elapsed.as_secs_f64()
    );
}

/// A guest that never halts is stopped at the deadline with a Timeout error, not a hang.
#[test]
fn a_spinning_guest_times_out() {
    if !have_kvm() {
        return;
    }
    let memory = AnonMemory::new(4 << 20).unwrap();
    let image = build_image(
        &memory.view(),
        &ImageSpec::new(4 << 20, 1).walk(Walk::sequential(20, 10)),
    )
    .unwrap();
    // `jmp $` at the entry: the vCPU loops forever.
    memory
        .view()
        .write(image.program.entry as usize, &[0xeb, 0xfe])
        .unwrap();
    let options = RunOptions {
        walk: None,
        timeout: Duration::from_millis(300),
    };
    let started = Instant::now();
    let err = run_guest(memory.ram(), &image.boot_state(0), &options).unwrap_err();
    assert!(matches!(err, RunError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A walk number that names no walk makes the guest report the bad kind instead of walking
/// garbage.
#[test]
fn an_unknown_walk_kind_is_reported() {
    if !have_kvm() {
        return;
    }
    let memory = AnonMemory::new(4 << 20).unwrap();
    let image = build_image(
        &memory.view(),
        &ImageSpec::new(4 << 20, 1).walk(Walk::sequential(20, 10)),
    )
    .unwrap();
    // Walk 5 is an empty slot (an empty walk, reporting the initial checksum); corrupt it.
    let empty = run_guest(memory.ram(), &image.boot_state(5), &RunOptions::default()).unwrap();
    assert_eq!(empty.checksum, program::CHECKSUM_INIT);
    let fresh = AnonMemory::new(4 << 20).unwrap();
    build_image(&fresh.view(), &ImageSpec::new(4 << 20, 1)).unwrap();
    fresh
        .view()
        .write(program::descriptor_addr(5) as usize, &9u32.to_le_bytes())
        .unwrap();
    let err = run_guest(fresh.ram(), &image.boot_state(5), &RunOptions::default()).unwrap_err();
    assert!(matches!(err, RunError::BadWalk { kind: 9 }), "{err}");
}

/// A random walk of 50,000 pages of a 256 MiB slot finishes in seconds (guest instructions
/// cost ~1.4 us here, so the loop must stay a handful of instructions per page).
#[test]
fn a_walk_of_50000_pages_takes_seconds() {
    if !have_kvm() {
        return;
    }
    let mem = 256u64 << 20;
    let pages = 50_000;
    let layout = Layout::new(mem, pages as u64).unwrap();
    let spec = ImageSpec::new(mem, 41).walk(Walk::random(41, layout.data_pages(), pages));
    let memory = AnonMemory::new(mem as usize).unwrap();
    let started = Instant::now();
    let image = build_image(&memory.view(), &spec).unwrap();
    let built = started.elapsed();
    let result = run_guest(memory.ram(), &image.boot_state(0), &RunOptions::default()).unwrap();
    assert_eq!(Some(result.checksum), image.expected_checksum(0));
    eprintln!(
        "50,000-page random walk: image built in {built:?}, walk {:?} ({:.0} pages/s)",
        result.elapsed,
        pages as f64 / result.elapsed.as_secs_f64()
    );
    assert!(
        result.elapsed < Duration::from_secs(30),
        "{:?}",
        result.elapsed
    );
}
