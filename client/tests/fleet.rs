//! A fleet of servers: two real `faultline-server serve` processes with the
//! same snapshot, a restore on real userfaultfd that loses its home server
//! (SIGKILL) mid-restore and completes, every page verified, from the other;
//! and a fail-over server with another snapshot under the same name refused.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{DEADLINE, Mem, Server, check_all, complete, hung, image_4k, memory, start};
use faultline_client::backing::BackingKind;
use faultline_client::fleet::{self, CheckError, Consistency};
use faultline_client::pager::{OnFailure, PagerConfig, PrefetchPolicy};
use faultline_client::remote::Remote;
use faultline_proto::{PageSize, SnapshotId};

/// Pages of the restored image: 128 MiB, so that the prefetch is still
/// streaming when the home server is stopped a few faults in.
const PAGES: u64 = 32 * 1024;

/// How long a server process may take to start listening.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// The `faultline-server` binary of this target directory (built by `cargo
/// test --workspace`; built here when only this crate's tests were built).
fn server_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/fleet-HASH -> target/debug/faultline-server
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in a target directory");
    let bin = profile_dir.join("faultline-server");
    if !bin.exists() {
        let target_dir = profile_dir.parent().expect("a target directory");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "faultline-server",
                "--bin",
                "faultline-server",
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(
            status.success() && bin.exists(),
            "cannot build faultline-server; run `cargo build -p faultline-server` first"
        );
    }
    bin
}

/// A `faultline-server serve` process on an ephemeral loopback port,
/// SIGKILLed when dropped.
struct ServeProcess {
    child: Child,
    url: String,
}

impl ServeProcess {
    fn start(store: &Path) -> Self {
        Self::start_with(store.as_os_str(), &[])
    }

    /// `serve --store STORE` (a directory or `s3://...`) with `env` set.
    fn start_with(store: &std::ffi::OsStr, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(server_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(store)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline-server serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                // "serving N snapshot(s) of STORE on 127.0.0.1:PORT (...)"
                if let Some((_, rest)) = line
                    .contains("snapshot(s)")
                    .then(|| line.split_once(" on 127.0.0.1:"))
                    .flatten()
                {
                    let port = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(format!("http://127.0.0.1:{port}"));
                }
                eprintln!("[server] {line}");
            }
        });
        let url = rx
            .recv_timeout(START_PATIENCE)
            .unwrap_or_else(|_| panic!("faultline-server serve did not log its address"));
        Self { child, url }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Restoring from two server processes: the home server (by rendezvous) SIGKILLed mid-restore,
/// with demand faults waiting and the prefetch streaming; the restore completes from the other
/// server, every page verified, none corrupt or poisoned.
#[test]
fn home_server_killed_mid_restore_fails_over() {
    let mut importer = Server::start();
    let snap = importer.import("fleet-img", PageSize::Size4K, image_4k(71, PAGES));
    importer.kill();
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let store = importer.store().root().to_owned();
    let mut a = ServeProcess::start(&store);
    let mut b = ServeProcess::start(&store);
    let urls = vec![a.url.clone(), b.url.clone()];
    let order = fleet::rendezvous(&urls, &snap.id);
    // The home server last in the list given: the pager's plan puts it first.
    let mut cfg = PagerConfig::new(order[1].clone(), snap.id.clone());
    cfg.servers = vec![order[1].clone(), order[0].clone()];
    cfg.prefetch = PrefetchPolicy::All;
    cfg.on_failure = OnFailure::Wait;
    cfg.deadline = Duration::from_secs(60);
    let (home, other) = if a.url == order[0] {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);

    // A few demand faults from the home server, then it freezes and dies.
    let early: Vec<usize> = (0..snap.pages()).step_by(4099).take(8).collect();
    let bad = common::touch_and_check(mem, &snap, vec![early]);
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
    home.signal(libc::SIGSTOP);
    let before = pager.stats();
    assert!(
        before.completed_s.is_none(),
        "the restore finished before the home server was stopped: {before:#?}"
    );
    // Faults in flight to the frozen server, then SIGKILL under them.
    let (tx, rx) = mpsc::channel();
    let waiting = {
        let snap = snap.clone();
        std::thread::spawn(move || {
            let pages: Vec<usize> = (1..snap.pages()).step_by(997).collect();
            let _ = tx.send(common::touch_and_check(mem, &snap, vec![pages]));
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    home.sigkill();
    let bad = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| hung("faults after the home server died", DEADLINE));
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
    waiting.join().expect("toucher");

    check_all(mem, &snap, 2);
    let s = complete(&pager);
    assert_eq!(s.poisoned_pages + s.corrupt_pages, 0, "{s:#?}");
    assert!(s.pages_by_source.prefetch > 0, "{s:#?}");
    // The other server still serves; it did the rest.
    let rt = common::runtime();
    let alive = common::block_on(&rt, "connecting", async {
        Remote::connect(&other.url).await.is_ok()
    });
    assert!(alive, "the fail-over server is up");
}

/// A fail-over server whose snapshot of the same name has other digests is refused, loudly and
/// for good, and nothing of it is installed; a server with the same snapshot passes.
#[test]
fn fail_over_server_with_another_snapshot_is_refused() {
    let same_a = Server::start();
    let snap = same_a.import("shared", PageSize::Size4K, image_4k(5, 256));
    let same_b = Server::start();
    same_b.import("shared", PageSize::Size4K, image_4k(5, 256));
    let other = Server::start();
    other.import("shared", PageSize::Size4K, image_4k(6, 256));
    let rt = common::runtime();
    common::block_on(&rt, "checking manifests", async {
        let a = Remote::connect(&same_a.url()).await.expect("connect");
        let manifest = a.manifest(&snap.id).await.expect("manifest");
        let check = Consistency::new(&same_a.url());
        let b = Remote::connect(&same_b.url()).await.expect("connect");
        check.check(&b, &manifest).await.expect("same snapshot");
        let o = Remote::connect(&other.url()).await.expect("connect");
        for _ in 0..2 {
            match check.check(&o, &manifest).await {
                Err(CheckError::Mismatch(e)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("digests") && msg.contains(&other.url()),
                        "{msg}"
                    );
                }
                r => panic!("another snapshot accepted: {r:?}"),
            }
        }
    });
}

/// A pager whose home server dies, with only a server of another snapshot left, installs
/// nothing from it: its faults wait, and complete right once the home server is back.
#[test]
fn pager_never_fails_over_to_another_snapshot() {
    let mut home = Server::start();
    let wrong = Server::start();
    let urls = vec![home.url(), wrong.url()];
    // A name whose home is `home`.
    let name = (0..)
        .map(|i| format!("pick-{i}"))
        .find(|n| fleet::rendezvous(&urls, &SnapshotId::new(n.clone()).expect("id"))[0] == urls[0])
        .expect("some name");
    let snap = home.import(&name, PageSize::Size4K, image_4k(8, 1024));
    wrong.import(&name, PageSize::Size4K, image_4k(9, 1024));
    let Some((mem, _)) = memory(BackingKind::Anonymous, snap.image.len()) else {
        return;
    };
    let mut cfg = PagerConfig::new(urls[0].clone(), snap.id.clone());
    cfg.servers = urls.clone();
    cfg.prefetch = PrefetchPolicy::None;
    cfg.deadline = Duration::from_secs(60);
    let pager = start(cfg, mem);
    let mem = Mem::of(&pager, 0);
    let bad = common::touch_and_check(mem, &snap, vec![vec![0, 1]]);
    assert!(bad.is_empty(), "{bad:?}");
    home.kill();
    let (tx, rx) = mpsc::channel();
    let snap2 = snap.clone();
    std::thread::spawn(move || {
        let _ = tx.send(common::touch_and_check(mem, &snap2, vec![vec![512, 900]]));
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "pages were filled from the server with another snapshot"
    );
    home.restart();
    let started = Instant::now();
    let bad = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| hung("faults after the home server came back", DEADLINE));
    assert!(bad.is_empty(), "pages differ from the image: {bad:?}");
    assert!(started.elapsed() < DEADLINE);
    let s = pager.stats();
    assert_eq!(s.corrupt_pages + s.poisoned_pages, 0, "{s:#?}");
    check_all(mem, &snap, 2);
    complete(&pager);
}

/// A `faultline-server serve` process whose object store does not answer (its S3 endpoint
/// is a closed port on 127.0.0.1): live, but its gRPC health says NOT_SERVING.
fn not_ready_server() -> ServeProcess {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    ServeProcess::start_with(
        std::ffi::OsStr::new("s3://fleet-nowhere/snapshots"),
        &[
            ("AWS_ENDPOINT", &endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "fleet-test"),
            ("AWS_SECRET_ACCESS_KEY", "fleet-test"),
            ("AWS_REGION", "garage"),
        ],
    )
}

/// The plan orders by rendezvous and moves the servers that are NOT_SERVING or down to the end.
#[test]
fn plan_puts_servers_not_ready_last() {
    let good = [Server::start(), Server::start()];
    let not_serving = not_ready_server();
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let rt = common::runtime();
    let mut seen_unready_home = false;
    for i in 0..8 {
        let id = SnapshotId::new(format!("s-{i}")).expect("id");
        let all = vec![
            down.clone(),
            good[0].url(),
            not_serving.url.clone(),
            good[1].url(),
        ];
        let order = fleet::rendezvous(&all, &id);
        seen_unready_home |= order[0] == down || order[0] == not_serving.url;
        let mut opts = faultline_client::remote::ConnectOptions::default();
        let plan =
            common::block_on(&rt, "planning", fleet::plan(&all, &mut opts, &id)).expect("plan");
        let ready: Vec<String> = order
            .iter()
            .filter(|u| **u != down && **u != not_serving.url)
            .cloned()
            .collect();
        let unready: Vec<String> = order
            .iter()
            .filter(|u| **u == down || **u == not_serving.url)
            .cloned()
            .collect();
        assert_eq!(plan.servers[..2], ready[..], "{plan:?}");
        assert_eq!(plan.servers[2..], unready[..], "{plan:?}");
        assert_eq!(plan.unhealthy, unready);
    }
    assert!(
        seen_unready_home,
        "some snapshot's first choice was not ready"
    );
}

/// `faultline fetch` with a fleet of two: the file is the image, every page verified.
#[test]
fn fetch_command_takes_several_servers() {
    let a = Server::start();
    let snap = a.import("fetched", PageSize::Size4K, image_4k(12, 512));
    let b = Server::start();
    b.import("fetched", PageSize::Size4K, image_4k(12, 512));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("copy.raw");
    let status = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["fetch", "--server", &a.url(), "--server", &b.url()])
        .args(["--snapshot", "fetched", "--out"])
        .arg(&out)
        .status()
        .expect("run faultline fetch");
    assert!(status.success());
    assert_eq!(std::fs::read(&out).expect("read copy"), *snap.image);
}

/// `faultline restore` with two servers restores from the snapshot's home server first, every
/// touched page verified, and says which servers it used.
#[test]
fn restore_command_uses_the_home_server_first() {
    let a = Server::start();
    let snap = a.import("cli-fleet", PageSize::Size4K, image_4k(14, 512));
    let b = Server::start();
    b.import("cli-fleet", PageSize::Size4K, image_4k(14, 512));
    let out = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["restore", "--server", &a.url(), "--server", &b.url()])
        .args([
            "--snapshot",
            "cli-fleet",
            "--verify",
            "--json",
            "--threads",
            "2",
        ])
        .output()
        .expect("run faultline restore");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("userfaultfd") && std::env::var_os("FAULTLINE_REQUIRE_KERNEL").is_none() {
            eprintln!("skipped: {err}");
            return;
        }
        panic!("faultline restore failed: {err}");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let servers: Vec<String> = v["servers"]
        .as_array()
        .expect("servers listed")
        .iter()
        .map(|s| s.as_str().expect("a URL").to_owned())
        .collect();
    assert_eq!(servers, fleet::rendezvous(&[a.url(), b.url()], &snap.id));
    assert_eq!(v["verified"], serde_json::Value::Bool(true), "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
}
