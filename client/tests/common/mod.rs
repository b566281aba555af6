//! Shared set-up for the pager's integration tests: a snapshot server
//! running in-process on 127.0.0.1 (on a runtime the test owns, so it can be
//! killed and restarted), synthetic snapshots, guest memory of each backing,
//! and touching memory from threads under a deadline, so that a hung pager
//! fails the test instead of hanging it.

#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use faultline_client::backing::{BackingKind, GuestMemory, HUGE_PAGE_SIZE};
use faultline_client::pager::{Pager, PagerConfig, PrefetchPolicy, Region, Stats};
use faultline_client::testutil;
use faultline_proto::{PageSize, SnapshotId};
use faultline_server::import::import_file;
use faultline_server::store::SnapshotStore;
use faultline_server::testing::synthetic_image;
use faultline_server::{LocalStore, ServerHandle};

/// The base page size.
pub const PAGE: usize = 4096;

/// Longest a batch of touches, a completion or a server restart may take
/// before the test fails. Generous for a debug build on 2 busy cores;
/// everything here normally takes well under a second.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A snapshot stored on the test server, with the image it was made from.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Its name.
    pub id: SnapshotId,
    /// The image, byte for byte.
    pub image: Arc<Vec<u8>>,
    /// Bytes per page.
    pub page_size: usize,
}

impl Snapshot {
    /// Pages in the image.
    pub fn pages(&self) -> usize {
        self.image.len() / self.page_size
    }

    /// The bytes of page `i`.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.image[i * self.page_size..(i + 1) * self.page_size]
    }

    /// A page in the second half with content, whose neighbours have
    /// content too (a page to corrupt: its read-ahead window brings good
    /// pages with it).
    pub fn page_between_data(&self) -> usize {
        (self.pages() / 2..self.pages() - 1)
            .find(|&p| !self.is_zero(p - 1) && !self.is_zero(p) && !self.is_zero(p + 1))
            .expect("three adjacent pages with content")
    }

    /// Whether page `i` is all zeros (the server's zero map says the same).
    pub fn is_zero(&self, i: usize) -> bool {
        self.page(i).iter().all(|&b| b == 0)
    }

    /// Indices of the zero pages.
    pub fn zero_pages(&self) -> Vec<usize> {
        (0..self.pages()).filter(|&i| self.is_zero(i)).collect()
    }

    /// Indices of the pages with content.
    pub fn data_pages(&self) -> Vec<usize> {
        (0..self.pages()).filter(|&i| !self.is_zero(i)).collect()
    }
}

/// A 4 KiB-page synthetic image (about 40% zero pages, in runs of 8).
pub fn image_4k(seed: u64, pages: u64) -> Vec<u8> {
    synthetic_image(seed, pages, PAGE)
}

/// A 2 MiB-page image: synthetic content, with huge pages `zero` made all
/// zeros so that zero huge pages are exercised too.
pub fn image_2m(seed: u64, huge_pages: usize, zero: &[usize]) -> Vec<u8> {
    let mut image = synthetic_image(seed, (huge_pages * HUGE_PAGE_SIZE / PAGE) as u64, PAGE);
    for &z in zero {
        image[z * HUGE_PAGE_SIZE..(z + 1) * HUGE_PAGE_SIZE].fill(0);
    }
    image
}

/// A faultline server on a runtime of its own, so that killing it (dropping
/// the runtime) cuts every connection at once, the way a crash does.
#[derive(Debug)]
pub struct Server {
    dir: tempfile::TempDir,
    store: Arc<LocalStore>,
    runtime: Option<tokio::runtime::Runtime>,
    handle: Option<ServerHandle>,
    addr: SocketAddr,
    /// `unix://PATH` for a server on a Unix socket.
    unix_url: Option<String>,
}

fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime")
}

impl Server {
    /// An empty store, served on an ephemeral loopback port.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LocalStore::new(dir.path().join("store")).expect("store"));
        let runtime = server_runtime();
        let handle = runtime
            .block_on(faultline_server::spawn(
                "127.0.0.1:0".parse().expect("addr"),
                store.clone() as Arc<dyn SnapshotStore>,
            ))
            .expect("server starts");
        let addr = handle.addr();
        Self {
            dir,
            store,
            runtime: Some(runtime),
            handle: Some(handle),
            addr,
            unix_url: None,
        }
    }

    /// An empty store, served with `opts` on a Unix socket in the test's
    /// temporary directory (`url()` is `unix://...`).
    pub fn start_unix(opts: faultline_server::ServeOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LocalStore::new(dir.path().join("store")).expect("store"));
        let runtime = server_runtime();
        let path = dir.path().join("faultline.sock");
        let handle = runtime
            .block_on(faultline_server::spawn_unix(
                &path,
                store.clone() as Arc<dyn SnapshotStore>,
                opts,
            ))
            .expect("server starts");
        Self {
            dir,
            store,
            runtime: Some(runtime),
            unix_url: Some(handle.url()),
            handle: Some(handle),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    /// The test's temporary directory (the store and the socket are in it).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stops the server gracefully and waits (a Unix server removes its
    /// socket file). Pagers must be gone first.
    pub fn shutdown(&mut self) {
        if let (Some(h), Some(rt)) = (self.handle.take(), self.runtime.as_ref()) {
            rt.block_on(h.shutdown()).expect("server stops");
        }
    }

    /// Imports `image` as snapshot `name` with `page_size` pages.
    pub fn import(&self, name: &str, page_size: PageSize, image: Vec<u8>) -> Snapshot {
        let id = SnapshotId::new(name).expect("snapshot name");
        let file = self.dir.path().join(format!("{name}.img"));
        std::fs::write(&file, &image).expect("write image");
        import_file(&*self.store, id.clone(), page_size, &[], &file, |_| {}).expect("import");
        std::fs::remove_file(&file).expect("remove image file");
        Snapshot {
            id,
            image: Arc::new(image),
            page_size: page_size.bytes() as usize,
        }
    }

    /// The store the server serves.
    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The directory holding snapshot `id` (`manifest.json`, `memory`, ...).
    pub fn snapshot_dir(&self, id: &SnapshotId) -> PathBuf {
        self.store.root().join(id.as_str())
    }

    /// Flips 16 bytes of page `page` of `snap` in the store's `memory` file
    /// (call it before the server opens the snapshot): the page then fails
    /// its digest on every read.
    pub fn corrupt_page(&self, snap: &Snapshot, page: usize) {
        self.corrupt_file_page(snap, "memory", page, page);
    }

    /// Flips 16 bytes of the `slot`th page of the snapshot's file `name`, which
    /// holds page `page` of `snap` there.
    pub fn corrupt_file_page(&self, snap: &Snapshot, name: &str, slot: usize, page: usize) {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.snapshot_dir(&snap.id).join(name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the snapshot's file");
        let at = (slot * snap.page_size + 100) as u64;
        let mut bytes = [0u8; 16];
        file.seek(SeekFrom::Start(at)).expect("seek");
        file.read_exact(&mut bytes).expect("read");
        assert_eq!(&bytes, &snap.page(page)[100..116]);
        for b in &mut bytes {
            *b ^= 0x5a;
        }
        file.seek(SeekFrom::Start(at)).expect("seek");
        file.write_all(&bytes).expect("corrupt");
        file.sync_all().expect("sync");
    }

    /// `http://127.0.0.1:PORT`, or `unix://PATH`.
    pub fn url(&self) -> String {
        match &self.unix_url {
            Some(u) => u.clone(),
            None => format!("http://{}", self.addr),
        }
    }

    /// Kills the server: its runtime is shut down, which drops the listener
    /// and every connection with its streams in flight. (A graceful
    /// `ServerHandle::shutdown` would wait for the pager's Fault stream,
    /// which never ends on its own.)
    pub fn kill(&mut self) {
        drop(self.handle.take());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the server again on the same port with a store opened afresh
    /// on the same directory, so that it reads the snapshot files as they
    /// are now (the store keeps snapshots it has opened).
    pub fn restart_fresh(&mut self) {
        self.store = Arc::new(LocalStore::new(self.dir.path().join("store")).expect("store"));
        self.restart();
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        assert!(
            self.runtime.is_none(),
            "kill the server before restarting it"
        );
        let runtime = server_runtime();
        let started = Instant::now();
        let handle = loop {
            match runtime.block_on(faultline_server::spawn(
                self.addr,
                self.store.clone() as Arc<dyn SnapshotStore>,
            )) {
                Ok(h) => break h,
                Err(e) if started.elapsed() < DEADLINE => {
                    eprintln!("rebinding {} failed ({e}); retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot restart the server on {}: {e}", self.addr),
            }
        };
        self.handle = Some(handle);
        self.runtime = Some(runtime);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.handle.take());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A pager configuration for `snap` on `server`.
pub fn config(server: &Server, snap: &Snapshot, prefetch: PrefetchPolicy) -> PagerConfig {
    let mut cfg = PagerConfig::new(server.url(), snap.id.clone());
    cfg.prefetch = prefetch;
    cfg
}

/// Starts a pager filling `memory` with the whole of the snapshot.
pub fn start(cfg: PagerConfig, memory: GuestMemory) -> TestPager {
    TestPager::new(
        Pager::start(
            cfg,
            vec![Region {
                memory,
                snapshot_offset: 0,
            }],
        )
        .unwrap_or_else(|e| panic!("the pager does not start: {e}")),
    )
}

/// A pager that a failing test leaks instead of dropping: dropping it would
/// poison the pages it has not filled, and a test thread stuck in a fault
/// there would take the whole test binary down with SIGBUS, hiding which
/// test failed and why.
#[derive(Debug)]
pub struct TestPager(std::mem::ManuallyDrop<Pager>);

impl TestPager {
    /// Wraps `pager`.
    pub fn new(pager: Pager) -> Self {
        Self(std::mem::ManuallyDrop::new(pager))
    }

    /// The pager itself (to shut it down).
    pub fn into_inner(self) -> Pager {
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the pager is taken out once.
        unsafe { std::mem::ManuallyDrop::take(&mut this.0) }
    }
}

impl std::ops::Deref for TestPager {
    type Target = Pager;
    fn deref(&self) -> &Pager {
        &self.0
    }
}

impl Drop for TestPager {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: dropped once, here; `self.0` is not used afterwards.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.0) };
        }
    }
}

/// Guest memory of `kind` and `len` bytes, or a skip (with the reason) where
/// this machine cannot provide it. Returns the huge page reservation too,
/// which must outlive the memory.
pub fn memory(kind: BackingKind, len: usize) -> Option<(GuestMemory, Option<testutil::HugePages>)> {
    testutil::require_uffd()?;
    let pages = match kind {
        BackingKind::Hugetlb => Some(testutil::reserve_huge_pages(len / HUGE_PAGE_SIZE)?),
        BackingKind::GuestMemfd if !testutil::guest_memfd_available() => return None,
        _ => None,
    };
    match GuestMemory::new(kind, len) {
        Ok(m) => Some((m, pages)),
        Err(e) => {
            testutil::skip(format!("cannot create {kind} memory: {e}"));
            None
        }
    }
}

/// Guest memory seen from test threads: a raw address range, copyable into
/// `'static` threads. The pager owning the mapping must outlive every use.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    base: usize,
    len: usize,
}

impl Mem {
    /// Region `index` of `pager`.
    pub fn of(pager: &Pager, index: usize) -> Self {
        let m = pager.memory(index);
        Self {
            base: m.host_addr(),
            len: m.len(),
        }
    }

    /// `len` bytes at `base`: memory the test mapped itself (playing a VMM)
    /// and keeps mapped while its threads touch it.
    pub fn new(base: usize, len: usize) -> Self {
        Self { base, len }
    }

    /// Start address.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Copies `buf.len()` bytes at `offset` out of guest memory, faulting
    /// them in like a guest would.
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= self.len, "read past the region");
        // SAFETY: the range is inside a read-write guest mapping that the
        // test's pager keeps mapped while its threads touch it; no Rust
        // object lives there, and copying through raw pointers never forms
        // a reference to bytes the kernel may change concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + offset) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
    }
}

/// Runs `f` on a new thread and waits up to `limit` for it. A panic in `f`
/// is re-raised here; a timeout fails the test (and is reported straight to
/// stderr too, in case the process does not survive it). The thread, stuck
/// in a fault, is left behind; [`TestPager`] keeps its memory mapped.
pub fn within<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("touch: {what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .expect("spawn a thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => hung(what, limit),
    }
}

/// Fails the test for something that did not finish in time.
pub fn hung(what: &str, limit: Duration) -> ! {
    let msg = format!("{what} did not finish within {limit:?}: the pager hung");
    let _ = writeln!(std::io::stderr(), "{msg}");
    panic!("{msg}");
}

/// Reads `pages` (one thread, as [`touch_and_check`]) and fails the test if
/// any of them differs from the image.
#[track_caller]
pub fn assert_touched_right(mem: Mem, snap: &Snapshot, pages: Vec<usize>) {
    let bad = touch_and_check(mem, snap, vec![pages]);
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
}

/// Reads the pages listed in each of `orders` (one thread per list, all at
/// once, starting together) and compares each with the image. Returns the
/// pages that differed. Fails the test if the threads do not finish within
/// [`DEADLINE`].
pub fn touch_and_check(mem: Mem, snap: &Snapshot, orders: Vec<Vec<usize>>) -> Vec<usize> {
    let threads = orders.len();
    let (tx, rx) = mpsc::channel();
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    for (t, order) in orders.into_iter().enumerate() {
        let (tx, snap, barrier) = (tx.clone(), snap.clone(), barrier.clone());
        std::thread::Builder::new()
            .name(format!("toucher-{t}"))
            .spawn(move || {
                let mut buf = vec![0u8; snap.page_size];
                let mut bad = Vec::new();
                barrier.wait();
                for i in order {
                    mem.read(i * snap.page_size, &mut buf);
                    if buf != snap.page(i) {
                        bad.push(i);
                    }
                }
                let _ = tx.send(bad);
            })
            .expect("spawn a toucher");
    }
    drop(tx);
    let started = Instant::now();
    let mut bad = Vec::new();
    for _ in 0..threads {
        let left = DEADLINE.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(b) => bad.extend(b),
            Err(_) => hung(&format!("{threads} threads touching pages"), DEADLINE),
        }
    }
    bad.sort_unstable();
    bad.dedup();
    bad
}

/// Checks every page of `mem` against the image from `threads` threads
/// (thread t reads pages t, t + threads, ...), and panics on a difference.
pub fn check_all(mem: Mem, snap: &Snapshot, threads: usize) {
    let orders = (0..threads)
        .map(|t| (t..snap.pages()).step_by(threads).collect())
        .collect();
    let bad = touch_and_check(mem, snap, orders);
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
}

/// Statistics once `done` holds for them. Counters are updated just after
/// the install that wakes a faulting thread, so a test that has just read
/// its pages polls for them; fails the test after [`DEADLINE`].
pub fn settle(pager: &Pager, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let started = Instant::now();
    loop {
        let s = pager.stats();
        if done(&s) {
            return s;
        }
        if started.elapsed() > DEADLINE {
            panic!("{what}: not reached within {DEADLINE:?}: {s:#?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for the pager to complete, failing the test after [`DEADLINE`].
pub fn complete(pager: &Pager) -> Stats {
    pager
        .wait_complete(DEADLINE)
        .unwrap_or_else(|| hung("completion", DEADLINE))
}

/// A small deterministic generator (SplitMix64) for page orders.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `items`, shuffled.
    pub fn shuffle<T>(&mut self, mut items: Vec<T>) -> Vec<T> {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
        items
    }
}

/// A tokio runtime of the test's own, for the pager's async API
/// (`Pager::fault`, `completion`), which must not run on the pager's runtime.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
}

/// Runs `fut` on `rt` (a runtime of the test's own), failing the test if it
/// takes longer than [`DEADLINE`].
pub fn block_on<F: Future>(rt: &tokio::runtime::Runtime, what: &str, fut: F) -> F::Output {
    rt.block_on(async { tokio::time::timeout(DEADLINE, fut).await })
        .unwrap_or_else(|_| hung(what, DEADLINE))
}

/// A TCP listener on 127.0.0.1 that accepts connections and never answers
/// them: a stalled server. It holds every connection open until dropped.
#[derive(Debug)]
pub struct StalledServer {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StalledServer {
    /// Listens on `addr` (`127.0.0.1:0` for any port), retrying a bind that
    /// fails because a killed server's port is not free yet.
    pub fn bind(addr: SocketAddr) -> Self {
        let started = Instant::now();
        let listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if started.elapsed() < DEADLINE => {
                    eprintln!("binding {addr} failed ({e}); retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        };
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                // Bounded by the test: it drops the listener when done.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => held.push(conn),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for StalledServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Faults on page `bad` of region 0 through `Pager::fault` (nothing here
/// touches it: it would raise SIGBUS) and asserts that, corrupt on the
/// server, it was fetched again, then poisoned, never installed, and that
/// every page from `bad - 1` on except it is right. Returns the statistics.
pub fn assert_corrupt_page_poisoned(
    pager: &Pager,
    snap: &Snapshot,
    bad: usize,
    rt: &tokio::runtime::Runtime,
) -> Stats {
    use faultline_client::pager::{CORRUPT_RETRIES, FaultError};
    let mem = Mem::of(pager, 0);
    let page = snap.page_size;
    let r = block_on(
        rt,
        "Pager::fault on the corrupt page",
        pager.fault(mem.base() + bad * page, page),
    );
    assert!(
        matches!(r, Err(FaultError::Poisoned(p)) if p.0 == bad as u64),
        "{r:?}"
    );
    let s = pager.stats();
    assert_eq!(s.corrupt_pages, u64::from(CORRUPT_RETRIES) + 1, "{s:#?}");
    assert_eq!(s.poisoned_pages, 1, "{s:#?}");
    // The pages fetched with it (its read-ahead window) are fine.
    let good: Vec<usize> = (bad - 1..snap.pages()).filter(|&p| p != bad).collect();
    assert_touched_right(mem, snap, good);
    s
}
