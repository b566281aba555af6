//! `faultline-server serve --listen unix:///PATH`, the binary itself: the socket's mode, one
//! server per path (a killed server's socket replaced, a live one refused), the socket removed
//! on shutdown, TLS refused, and a page-file request answered on the socket.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faultline_proto::unix::PageFileResponse;

const BIN: &str = env!("CARGO_BIN_EXE_faultline-server");

/// Longest a server may take to start listening or to stop.
const WAIT: Duration = Duration::from_secs(20);

fn serve(sock: &Path, store: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--listen"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--store")
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server")
}

/// Waits until `sock` accepts connections.
fn wait_listening(sock: &Path, child: &mut Child) {
    let started = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(started.elapsed() < WAIT, "no socket at {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a page-file request for `snapshot` and reads the answer.
fn ask(sock: &Path, snapshot: &str) -> PageFileResponse {
    faultline_server::testing::ask_page_file(sock, snapshot, None)
}

/// The socket is mode 0600 and answers a page-file request (NotFound for a missing snapshot);
/// a second server on the path is refused; a killed server's socket is replaced by the next;
/// SIGTERM removes the socket; `--tls-cert` with unix:// is refused with the reason.
#[test]
fn serve_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let sock = dir.path().join("fl.sock");

    let mut first = serve(&sock, &store);
    wait_listening(&sock, &mut first);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let answer = ask(&sock, "missing");
    assert_eq!(answer.code, 5, "NotFound: {answer:?}");

    let second = Command::new(BIN)
        .args(["serve", "--listen"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--store")
        .arg(&store)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("is in use"), "{stderr}");

    // Killed: the socket file stays behind, stale, and the next server replaces it.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(sock.exists());
    let mut next = serve(&sock, &store);
    wait_listening(&sock, &mut next);
    let status = Command::new("kill")
        .args(["-TERM", &next.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    while next.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < WAIT, "the server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "the socket is removed on shutdown");

    let tls = Command::new(BIN)
        .args(["serve", "--listen"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--store")
        .arg(&store)
        .args(["--tls-cert", "c.pem", "--tls-key", "k.pem"])
        .output()
        .unwrap();
    assert!(!tls.status.success());
    let stderr = String::from_utf8_lossy(&tls.stderr);
    assert!(
        stderr.contains("TLS is not served on a Unix socket"),
        "{stderr}"
    );
}
