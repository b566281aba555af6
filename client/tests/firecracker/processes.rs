//! Real processes: the handler is the `faultline fc-handler` binary, and each VM is a process of
//! its own that does what Firecracker does (creates its guest memory and a uffd with
//! EVENT_REMOVE, registers the memory MISSING, connects to the socket, sends the JSON regions
//! with the uffd as SCM_RIGHTS, keeps the socket open), then touches its pages and checksums
//! them. A VM process is this test binary run again with `FAULTLINE_TEST_VM` set: it runs only
//! [`vm_role`], which plays the VM.
//!
//! Separate processes are what make these tests real: one VM killed with SIGKILL takes its mm
//! with it (the handler's COPY then fails with ESRCH), a poisoned page kills its VM with SIGBUS,
//! and a handler that aborts or is killed does not take the test down.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use faultline_client::firecracker::{GuestRegionUffdMapping, parse};
use faultline_client::testutil;
use faultline_client::uffd::{Features, RegisterModes, Uffd, UffdOptions};
use faultline_proto::PageSize;

use crate::common::{PAGE, Rng, Server, Snapshot, image_4k};
use crate::send;

/// The environment variable that turns this test binary into a VM process.
const VM_ENV: &str = "FAULTLINE_TEST_VM";

/// Longest a VM process or the handler may take for one step (connect, touch every page,
/// exit). Generous: debug builds, two busy cores.
pub const STEP: Duration = Duration::from_secs(60);

/// Pages a VM process touches between two progress lines.
const PROGRESS_EVERY: usize = 512;

/// `MAP_HUGE_2MB`: log2(2 MiB) << MAP_HUGE_SHIFT.
const MAP_HUGE_2MB: libc::c_int = 21 << 26;

/// What a VM process does.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The handler's socket.
    pub socket: PathBuf,
    /// The handshake: a captured Firecracker message sent as it is (the memory is mapped at the
    /// address it names), or generated in Firecracker's format for memory mapped anywhere.
    pub handshake: Body,
    /// Pages to touch, from the first, in order.
    pub touch: usize,
    /// Stop after this many pages and wait for a line on stdin before going on (one vCPU).
    pub pause_after: Option<usize>,
    /// Threads touching pages, each its share in a shuffled order.
    pub vcpus: usize,
}

/// The handshake a VM process sends.
#[derive(Debug, Clone)]
pub enum Body {
    /// The bytes of this file, as they are; memory mapped where they say (2 MiB pages if they
    /// say so).
    Fixture(PathBuf),
    /// One region of `size` bytes at snapshot offset 0 with `page_size` pages, both page size
    /// fields in bytes as Firecracker 1.12+ sends them.
    Generated {
        /// Bytes.
        size: usize,
        /// Bytes.
        page_size: usize,
    },
    /// Memory as for `Generated`, but these bytes sent instead of the regions.
    Raw {
        /// Bytes of memory.
        size: usize,
        /// Its page size.
        page_size: usize,
        /// What to send.
        bytes: String,
    },
}

impl VmSpec {
    fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("FC_VM_SOCKET", self.socket.display().to_string()),
            ("FC_VM_TOUCH", self.touch.to_string()),
            ("FC_VM_VCPUS", self.vcpus.to_string()),
            (
                "FC_VM_PAUSE",
                self.pause_after.map(|p| p.to_string()).unwrap_or_default(),
            ),
        ];
        match &self.handshake {
            Body::Fixture(p) => env.push(("FC_VM_FIXTURE", p.display().to_string())),
            Body::Generated { size, page_size } => {
                env.push(("FC_VM_SIZE", size.to_string()));
                env.push(("FC_VM_PAGE_SIZE", page_size.to_string()));
            }
            Body::Raw {
                size,
                page_size,
                bytes,
            } => {
                env.push(("FC_VM_SIZE", size.to_string()));
                env.push(("FC_VM_PAGE_SIZE", page_size.to_string()));
                env.push(("FC_VM_RAW", bytes.clone()));
            }
        }
        env
    }
}

/// The checksum a VM process reports for the first `pages` pages of `page_size` bytes of
/// `image`: the sum of the pages' hashes, so that the order of touching does not matter.
pub fn checksum(image: &[u8], page_size: usize, pages: usize) -> u64 {
    (0..pages)
        .map(|p| {
            let page = &image[p * page_size..(p + 1) * page_size];
            page_hash(p, page_size / 8, |i| {
                u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
            })
        })
        .fold(0u64, u64::wrapping_add)
}

/// FNV-1a over page `index`'s number and its `words` u64 words, read by `word`.
fn page_hash(index: usize, words: usize, word: impl Fn(usize) -> u64) -> u64 {
    let mut h = (0xcbf2_9ce4_8422_2325u64 ^ index as u64).wrapping_mul(0x100_0000_01b3);
    for i in 0..words {
        h = (h ^ word(i)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A VM process.
#[derive(Debug)]
pub struct VmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    name: String,
}

impl VmProcess {
    /// Starts a VM process doing `spec`.
    pub fn start(name: &str, spec: &VmSpec) -> Self {
        let exe = std::env::current_exe().expect("the test binary");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "processes::vm_role",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(VM_ENV, name)
        .envs(spec.to_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        // SAFETY: `personality` only changes how the kernel lays out the address space of the
        // program about to be executed; it is async-signal-safe and touches no memory of ours.
        // Without address randomisation the process's own mappings sit far above the
        // addresses the captured Firecracker handshakes name (0x7f32f8000000, 0x7f8b38000000),
        // so that it can map guest memory exactly there.
        unsafe {
            cmd.pre_exec(|| {
                libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn a VM process");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The test harness may have written "test processes::vm_role ... " first on
                // the same line.
                if let Some(at) = line.find("vm: ")
                    && tx.send(line[at + 4..].to_owned()).is_err()
                {
                    break;
                }
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            name: name.to_owned(),
        }
    }

    /// Waits for a line starting with `prefix`; returns the rest of it.
    pub fn expect(&mut self, prefix: &str) -> String {
        let started = Instant::now();
        loop {
            let left = STEP.saturating_sub(started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l[prefix.len()..].trim().to_owned(),
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "VM {} did not say {prefix:?} within {STEP:?} (exit: {:?})",
                        self.name,
                        self.child.try_wait()
                    );
                }
            }
        }
    }

    /// Lets a paused VM go on.
    pub fn resume(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "go").expect("write to the VM");
        stdin.flush().expect("flush");
    }

    /// Kills the VM with SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the VM");
        let _ = self.child.wait();
    }

    /// Waits for the VM to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > STEP {
                let _ = self.child.kill();
                panic!("VM {} did not exit within {STEP:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the VM to be killed by SIGBUS (a poisoned page).
    pub fn expect_sigbus(&mut self) {
        let status = self.wait();
        assert_eq!(
            status.signal(),
            Some(libc::SIGBUS),
            "VM {} should have died of SIGBUS: {status:?}",
            self.name
        );
    }

    /// Waits for the VM's checksum and a clean exit.
    pub fn checksum(&mut self) -> u64 {
        let sum = self.expect("checksum ");
        let status = self.wait();
        assert!(status.success(), "VM {}: {status:?}", self.name);
        u64::from_str_radix(&sum, 16).expect("a hex checksum")
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `faultline fc-handler` process, its log in a file.
#[derive(Debug)]
pub struct HandlerProcess {
    child: Child,
    log: PathBuf,
}

impl HandlerProcess {
    /// Starts `faultline fc-handler --socket SOCKET ARGS...`, and waits for it to listen, or to
    /// exit (see [`HandlerProcess::wait`]).
    pub fn start(socket: &Path, log: &Path, args: &[&str]) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_faultline"))
            .arg("fc-handler")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn faultline fc-handler");
        let mut h = Self {
            child,
            log: log.to_owned(),
        };
        h.wait_log("waiting for Firecracker");
        h
    }

    /// Starts a handler that is expected to refuse to start; returns its exit status and log.
    pub fn refused(socket: &Path, log: &Path, args: &[&str]) -> (ExitStatus, String) {
        let file = std::fs::File::create(log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_faultline"))
            .arg("fc-handler")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn faultline fc-handler");
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if started.elapsed() > STEP {
                let _ = child.kill();
                panic!("the second handler neither refused nor stopped");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (status, std::fs::read_to_string(log).unwrap_or_default())
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    pub fn wait_log(&mut self, text: &str) -> String {
        self.wait_log_any(&[text])
    }

    /// Waits until the log contains one of `texts`.
    pub fn wait_log_any(&mut self, texts: &[&str]) -> String {
        let started = Instant::now();
        loop {
            let log = self.log();
            if texts.iter().any(|t| log.contains(t)) {
                return log;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("the handler exited ({status:?}) before logging one of {texts:?}:\n{log}");
            }
            if started.elapsed() > STEP {
                panic!("the handler did not log one of {texts:?} within {STEP:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the handler still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Sends `signal` to the handler.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        // SAFETY: `kill` on our own child's pid; it has not been reaped (we hold the `Child`).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the handler to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > STEP {
                let _ = self.child.kill();
                panic!("the handler did not exit within {STEP:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for HandlerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- handler log ---\n{}", self.log());
        }
    }
}

/// Not a test: the VM side of the process tests, run in a VM process (does nothing otherwise).
#[test]
fn vm_role() {
    let Ok(name) = std::env::var(VM_ENV) else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let num = |k: &str| var(k).parse::<usize>().ok();
    // 1. Guest memory, where a captured handshake says or anywhere.
    let fixture = var("FC_VM_FIXTURE");
    let (body, addr, size, page_size) = if fixture.is_empty() {
        let size = num("FC_VM_SIZE").expect("FC_VM_SIZE");
        let page_size = num("FC_VM_PAGE_SIZE").expect("FC_VM_PAGE_SIZE");
        let addr = map(None, size, page_size);
        let raw = var("FC_VM_RAW");
        let body = if raw.is_empty() {
            // Firecracker's own serialisation (serde_json of GuestRegionUffdMapping).
            format!(
                r#"[{{"base_host_virt_addr":{addr},"size":{size},"offset":0,"page_size":{page_size},"page_size_kib":{page_size}}}]"#
            )
            .into_bytes()
        } else {
            raw.into_bytes()
        };
        (body, addr, size, page_size)
    } else {
        let body = std::fs::read(&fixture).expect("read the fixture");
        let region = parse(&body).expect("a valid fixture").regions[0];
        let mapping: Vec<GuestRegionUffdMapping> = serde_json::from_slice(&body).expect("json");
        let page_size = mapping[0].page_size_bytes(0).expect("page size");
        let (addr, size) = (region.peer_addr.0 as usize, region.size as usize);
        assert_eq!(map(Some(addr), size, page_size), addr);
        (body, addr, size, page_size)
    };
    // 2. A uffd as Firecracker creates it, every region registered MISSING.
    let uffd = Uffd::open_with(UffdOptions {
        wanted: Features::EVENT_REMOVE,
        required: Features::EVENT_REMOVE,
    })
    .expect("a uffd with EVENT_REMOVE");
    // SAFETY: this process's own fresh guest mapping, holding no Rust object; only the handler
    // fills it (through the uffd), and only the reads below touch it.
    unsafe { uffd.register(addr, size, RegisterModes::MISSING) }.expect("register MISSING");
    // 3. The handshake, with the uffd; the socket stays open until the process exits.
    let stream = UnixStream::connect(var("FC_VM_SOCKET")).expect("connect to the handler");
    send(&stream, &body, Some(uffd.as_raw_fd()));
    println!("vm: ready {name}");
    // 4. Touch and checksum pages, like a guest: in order, or from several vCPU threads in a
    //    shuffled order each.
    let touch = num("FC_VM_TOUCH").unwrap_or(0).min(size / page_size);
    let pause = num("FC_VM_PAUSE");
    let vcpus = num("FC_VM_VCPUS").unwrap_or(1).max(1);
    let touched = std::sync::atomic::AtomicUsize::new(0);
    let hash = |p: usize| {
        let page = addr + p * page_size;
        let h = page_hash(p, page_size / 8, |i| {
            // SAFETY: inside this process's registered guest mapping; a missing page faults and
            // the handler fills it. Volatile: the handler writes it from outside this program.
            unsafe { std::ptr::read_volatile((page + i * 8) as *const u64) }
        });
        let n = touched.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_multiple_of(PROGRESS_EVERY) {
            println!("vm: touched {n}");
        }
        h
    };
    let sum = if vcpus == 1 {
        let mut sum = 0u64;
        for p in 0..touch {
            if pause == Some(p) {
                println!("vm: paused {p}");
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).expect("stdin");
            }
            sum = sum.wrapping_add(hash(p));
        }
        sum
    } else {
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..vcpus)
                .map(|t| {
                    let hash = &hash;
                    s.spawn(move || {
                        let mut rng = Rng::new(t as u64 + 1);
                        let mine: Vec<usize> = (t..touch).step_by(vcpus).collect();
                        rng.shuffle(mine)
                            .into_iter()
                            .fold(0u64, |sum, p| sum.wrapping_add(hash(p)))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("vCPU thread"))
                .fold(0u64, u64::wrapping_add)
        })
    };
    println!("vm: checksum {sum:x}");
    drop(stream);
    // Exit at once: no test harness output, no unmapping of memory that is still registered.
    std::process::exit(0);
}

/// Maps `size` bytes of private anonymous memory (hugetlb for 2 MiB pages) at `at` exactly, or
/// anywhere; returns the address.
fn map(at: Option<usize>, size: usize, page_size: usize) -> usize {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if page_size == 2 << 20 {
        flags |= libc::MAP_HUGETLB | MAP_HUGE_2MB;
    }
    if at.is_some() {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    // SAFETY: a new mapping; MAP_FIXED_NOREPLACE fails rather than replace an existing one.
    let ptr = unsafe {
        libc::mmap(
            at.unwrap_or(0) as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap of guest memory at {at:x?}: {}",
        std::io::Error::last_os_error()
    );
    ptr as usize
}

/// A captured Firecracker handshake in `client/tests/fixtures/`.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A temporary directory for sockets and logs, the server, and a snapshot of `pages` 4 KiB
/// pages on it.
fn setup(pages: u64, seed: u64) -> Option<(tempfile::TempDir, Server, Snapshot)> {
    testutil::require_uffd()?;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start();
    let snap = server.import("fc", PageSize::Size4K, image_4k(seed, pages));
    Some((dir, server, snap))
}

/// `(name, socket)` for a VM touching every page of `snap` (pausing after `pause` pages).
fn whole(socket: &Path, snap: &Snapshot, pause: Option<usize>) -> VmSpec {
    VmSpec {
        socket: socket.to_owned(),
        handshake: Body::Generated {
            size: snap.image.len(),
            page_size: PAGE,
        },
        touch: snap.pages(),
        pause_after: pause,
        vcpus: 1,
    }
}

/// Three VM processes on one handler, one killed with SIGKILL mid-restore: the two others
/// finish with correct checksums, the handler never aborts, and it serves a fourth VM after.
#[test]
fn one_vm_killed_the_others_go_on() {
    let Some((dir, server, snap)) = setup(16384, 21) else {
        return;
    };
    let socket = dir.path().join("fc.sock");
    let mut handler = HandlerProcess::start(
        &socket,
        &dir.path().join("handler.log"),
        &[
            "--server",
            &server.url(),
            "--snapshot",
            "fc",
            "--prefetch",
            "all",
        ],
    );
    let expected = checksum(&snap.image, PAGE, snap.pages());
    // Random faults from two vCPUs while the prefetch runs: many installs in flight when B
    // dies, so that some of them find its memory gone.
    let spec = VmSpec {
        vcpus: 2,
        ..whole(&socket, &snap, None)
    };
    let mut vms: Vec<VmProcess> = ["a", "b", "c"]
        .iter()
        .map(|n| VmProcess::start(n, &spec))
        .collect();
    for vm in &mut vms {
        vm.expect("ready");
    }
    // B dies while its pages are being faulted in and prefetched.
    vms[1].expect("touched");
    vms[1].kill();
    assert_eq!(vms[0].checksum(), expected, "VM a");
    assert_eq!(vms[2].checksum(), expected, "VM c");
    assert!(handler.is_running(), "the handler died:\n{}", handler.log());
    let mut d = VmProcess::start(
        "d",
        &VmSpec {
            touch: 64,
            ..spec.clone()
        },
    );
    assert_eq!(d.checksum(), checksum(&snap.image, PAGE, 64), "VM d");
    // B's pager ended when B did: by its COPY finding B's memory gone, or by its hang-up. The
    // handler logs that from B's connection thread, which may run after D's restore.
    let log = handler.wait_log_any(&[
        "the memory's owner exited",
        "pager stopped before completion",
    ]);
    assert!(!log.contains("aborting"), "{log}");
    if std::env::var_os("FAULTLINE_TEST_SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    handler.signal(libc::SIGTERM);
    assert!(handler.wait().success(), "{}", handler.log());
}

/// VMs the handler cannot serve die of SIGBUS at their first access instead of hanging, each
/// with a log line saying why: Firecracker's own 2 MiB handshake (512 MiB) on a 1 MiB snapshot, regions
/// that cannot be read (4 KiB and 2 MiB memory), a region past the snapshot's end, a snapshot
/// the server does not have, and a server unreachable past the deadline.
#[test]
fn unservable_vms_get_sigbus() {
    let Some((dir, server, snap)) = setup(256, 22) else {
        return;
    };
    let url = server.url();
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let sock = |n: &str| dir.path().join(format!("{n}.sock"));
    let one_page = |socket: &Path, handshake: Body| VmSpec {
        socket: socket.to_owned(),
        handshake,
        touch: 1,
        pause_after: None,
        vcpus: 1,
    };
    let args = [
        "--server",
        &url,
        "--snapshot",
        "fc",
        "--on-failure",
        "poison",
    ];
    let mut handler = HandlerProcess::start(&sock("h"), &log("h"), &args);
    let cases = [
        (
            Body::Fixture(fixture("firecracker-1.16.1-handshake-2m.json")),
            "past the end of snapshot fc",
        ),
        // Regions that cannot be read: each page faulted on is poisoned, 4 KiB or 2 MiB.
        (
            Body::Raw {
                size: snap.image.len(),
                page_size: PAGE,
                bytes: r#"[{"base_host_virt_addr":"here","size":4096,"offset":0}]"#.into(),
            },
            "invalid type",
        ),
        (
            Body::Raw {
                size: 2 << 20,
                page_size: 2 << 20,
                bytes: r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":8192}]"#
                    .into(),
            },
            "8192-byte pages",
        ),
        (
            Body::Generated {
                size: 2 * snap.image.len(),
                page_size: PAGE,
            },
            "past the end of snapshot fc",
        ),
    ];
    for (i, (body, why)) in cases.into_iter().enumerate() {
        let mut vm = VmProcess::start(&format!("bad{i}"), &one_page(&sock("h"), body));
        vm.expect_sigbus();
        let log = handler.wait_log(why);
        assert!(log.contains("cannot serve this VM"), "{log}");
    }
    assert!(handler.is_running());

    let generated = || Body::Generated {
        size: snap.image.len(),
        page_size: PAGE,
    };
    let mut missing = HandlerProcess::start(
        &sock("m"),
        &log("m"),
        &["--server", &url, "--snapshot", "nosuch"],
    );
    VmProcess::start("missing", &one_page(&sock("m"), generated())).expect_sigbus();
    missing.wait_log("cannot fetch the manifest of nosuch");

    // Port 1 on loopback: nothing listens, every connection is refused.
    let mut down = HandlerProcess::start(
        &sock("d"),
        &log("d"),
        &[
            "--server",
            "http://127.0.0.1:1",
            "--snapshot",
            "fc",
            "--deadline",
            "1",
            "--on-failure",
            "poison",
        ],
    );
    VmProcess::start("down", &one_page(&sock("d"), generated())).expect_sigbus();
    down.wait_log("no server gave the manifest of fc within --deadline 1s");
}

/// A handler stopped by SIGTERM poisons the unfilled pages of a VM still restoring (the VM dies
/// of SIGBUS at its next one instead of hanging) and removes its socket; one killed with
/// SIGKILL leaves a stale socket that the next handler replaces, saying so; a second handler on
/// a socket in use is refused; the restarted handler serves new VMs and stops on SIGINT.
#[test]
fn restart_on_the_same_socket() {
    let Some((dir, server, snap)) = setup(1024, 23) else {
        return;
    };
    let socket = dir.path().join("fc.sock");
    let url = server.url();
    let args = ["--server", &url, "--snapshot", "fc", "--prefetch", "none"];
    let log = |n: &str| dir.path().join(format!("{n}.log"));

    let mut first = HandlerProcess::start(&socket, &log("1"), &args);
    let mut vm = VmProcess::start("a", &whole(&socket, &snap, Some(16)));
    vm.expect("paused");
    first.signal(libc::SIGTERM);
    assert!(first.wait().success(), "{}", first.log());
    let said = first.log();
    assert!(said.contains("poisoned"), "{said}");
    assert!(!socket.exists(), "a stopped handler removes its socket");
    vm.resume();
    vm.expect_sigbus();

    let mut second = HandlerProcess::start(&socket, &log("2"), &args);
    second.signal(libc::SIGKILL);
    second.wait();
    assert!(socket.exists(), "a killed handler leaves its socket file");
    let mut third = HandlerProcess::start(&socket, &log("3"), &args);
    third.wait_log("replaced the stale socket");
    let (status, said) = HandlerProcess::refused(&socket, &log("4"), &args);
    assert!(!status.success());
    assert!(said.contains("is in use"), "{said}");
    let mut vm = VmProcess::start("b", &whole(&socket, &snap, None));
    assert_eq!(vm.checksum(), checksum(&snap.image, PAGE, snap.pages()));
    // Ctrl-C stops it cleanly too.
    third.signal(libc::SIGINT);
    assert!(third.wait().success(), "{}", third.log());
    assert!(!socket.exists());
}

/// Firecracker v1.16.1's 4 KiB handshake, sent byte for byte by a VM whose 512 MiB of memory is
/// where it says, is served from a 512 MiB snapshot (sparse: data in its first pages).
#[test]
fn real_firecracker_handshake_is_served() {
    const DATA_PAGES: usize = 64;
    if testutil::require_uffd().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start();
    let data = image_4k(24, DATA_PAGES as u64);
    let file = dir.path().join("mem");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&file).expect("memory file");
        f.set_len(512 << 20).expect("512 MiB");
        f.write_all_at(&data, 0).expect("data pages");
    }
    let id = faultline_proto::SnapshotId::new("fc").expect("name");
    faultline_server::import::import_file(server.store(), id, PageSize::Size4K, &[], &file, |_| {})
        .expect("import");
    let socket = dir.path().join("fc.sock");
    let mut handler = HandlerProcess::start(
        &socket,
        &dir.path().join("handler.log"),
        &[
            "--server",
            &server.url(),
            "--snapshot",
            "fc",
            "--prefetch",
            "none",
        ],
    );
    let mut vm = VmProcess::start(
        "fixture",
        &VmSpec {
            socket: socket.clone(),
            handshake: Body::Fixture(fixture("firecracker-1.16.1-handshake-4k.json")),
            touch: DATA_PAGES,
            pause_after: None,
            vcpus: 1,
        },
    );
    assert_eq!(vm.checksum(), checksum(&data, PAGE, DATA_PAGES));
    let log = handler.wait_log("serving 512.0 MiB");
    assert!(!log.contains("cannot serve"), "{log}");
    handler.signal(libc::SIGTERM);
    assert!(handler.wait().success(), "{}", handler.log());
}
