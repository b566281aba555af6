//! The client against a server with TLS and tokens (127.0.0.1:0, test
//! certificates generated here): the library's connection options, a whole
//! restore through the pager over mutual TLS with a token (faults, prefetch,
//! and recording a working set), and `faultline fetch` with --ca/--token.

use std::path::PathBuf;
use std::sync::Arc;

use faultline_client::backing::BackingKind;
use faultline_client::pager::{OnFailure, PrefetchPolicy, StreamTransport};
use faultline_client::remote::{ConnectOptions, Remote, RemoteError, Token};
use faultline_client::restore::{RestoreOptions, Touch};
use faultline_client::strategy::Mode;
use faultline_client::testutil;
use faultline_proto::{PageSize, SnapshotId};
use faultline_server::auth::{Right, TokensFile};
use faultline_server::import::import_file;
use faultline_server::server::ServeOptions;
use faultline_server::store::SnapshotStore;
use faultline_server::testing::certs::{TestCa, Usage};
use faultline_server::testing::synthetic_image;
use faultline_server::tls::TlsFiles;
use faultline_server::{LocalStore, ServerHandle};

const PAGES: u64 = 256;
const PAGE: usize = 4096;

/// A TLS server requiring client certificates and tokens, on its own runtime.
struct Secure {
    dir: tempfile::TempDir,
    image: Vec<u8>,
    runtime: tokio::runtime::Runtime,
    server: Option<ServerHandle>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// read and record on `vm-*`.
    token: String,
}

impl Secure {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path().join("store")).unwrap());
        let image = synthetic_image(5, PAGES, PAGE);
        let file = dir.path().join("mem.img");
        std::fs::write(&file, &image).unwrap();
        let id = SnapshotId::new("vm-1").unwrap();
        import_file(&*store, id, PageSize::Size4K, &[], &file, |_| {}).unwrap();

        let ca = TestCa::new("test CA");
        let (server_cert, server_key) = ca
            .issue(Usage::Server, "server")
            .write(dir.path(), "server");
        let ca_path = ca.write_cert(dir.path(), "ca");
        let (cert, key) = ca.issue(Usage::Client, "vmm").write(dir.path(), "client");
        let tokens = dir.path().join("tokens.json");
        let mut file = TokensFile::default();
        let (token, _) = file
            .add_new(
                "vmm".into(),
                vec!["vm-*".into()],
                vec![Right::Read, Right::Record],
            )
            .unwrap();
        file.save(&tokens).unwrap();

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let opts = ServeOptions {
            tls: Some(TlsFiles {
                cert: server_cert,
                key: server_key,
                client_ca: Some(ca_path.clone()),
            }),
            tokens: Some(tokens),
            ..ServeOptions::default()
        };
        let server = runtime
            .block_on(faultline_server::spawn_with(
                "127.0.0.1:0".parse().unwrap(),
                store as Arc<dyn SnapshotStore>,
                opts,
            ))
            .unwrap();
        Self {
            dir,
            image,
            runtime,
            server: Some(server),
            ca: ca_path,
            cert,
            key,
            token,
        }
    }

    fn url(&self) -> String {
        self.server.as_ref().unwrap().url()
    }

    fn options(&self, token: Option<&str>) -> ConnectOptions {
        ConnectOptions::from_files(Some(&self.ca), Some(&self.cert), Some(&self.key), token)
            .unwrap()
    }
}

impl Drop for Secure {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = self.runtime.block_on(s.shutdown());
        }
    }
}

/// `Remote::connect_with` over mutual TLS with a token reads the manifest;
/// without the token the error says a token is needed; TLS options on an
/// `http://` URL and a lone --cert are refused; a token never shows in Debug.
#[test]
fn remote_with_connect_options() {
    let s = Secure::start();
    let url = s.url();
    let id = SnapshotId::new("vm-1").unwrap();
    let manifest = s.runtime.block_on(async {
        let remote = Remote::connect_with(&url, &s.options(Some(&s.token)))
            .await
            .unwrap();
        remote.manifest(&id).await.unwrap()
    });
    assert_eq!(manifest.page_count, PAGES);

    // FAULTLINE_TOKEN is not set in this test; no token at all.
    let e = s.runtime.block_on(async {
        let remote = Remote::connect_with(&url, &s.options(None)).await.unwrap();
        remote.manifest(&id).await.unwrap_err()
    });
    let msg = e.to_string();
    assert!(
        matches!(&e, RemoteError::Rpc { status, .. } if status.code() == tonic::Code::Unauthenticated),
        "{msg}"
    );
    assert!(msg.contains("--token"), "{msg}");
    assert!(!e.is_transient());

    let plain = url.replace("https://", "http://");
    let e = s
        .runtime
        .block_on(Remote::connect_with(&plain, &s.options(None)))
        .unwrap_err();
    assert!(matches!(e, RemoteError::TlsOptionsWithoutTls { .. }), "{e}");
    let e = ConnectOptions::from_files(None, Some(&s.cert), None, None).unwrap_err();
    assert!(matches!(e, RemoteError::IncompleteIdentity), "{e}");
    let e = ConnectOptions::from_files(Some(&s.dir.path().join("nope.crt")), None, None, None)
        .unwrap_err();
    assert!(e.to_string().contains("nope.crt"), "{e}");

    let opts = s.options(Some(&s.token));
    let debug = format!("{opts:?}");
    assert!(!debug.contains(&s.token[3..]), "{debug}");
    assert!(Token::new("bad\ntoken").is_err());
}

/// Whole restores through the pager over mutual TLS with a token: demand
/// faults on the lean fault transport (forced) with the working-set upload,
/// then a full prefetch on the lean prefetch transport (forced), all
/// authenticate; every touched page matches.
#[test]
fn restore_over_mutual_tls_with_token() {
    if testutil::require_uffd().is_none() {
        return;
    }
    let s = Secure::start();
    let opts = RestoreOptions {
        servers: vec![s.url()],
        connect: s.options(Some(&s.token)),
        snapshot: SnapshotId::new("vm-1").unwrap(),
        backing: BackingKind::Anonymous,
        mode: Mode::Auto,
        // No prefetch while recording: a prefetcher may fill every page
        // before the touching threads run, leaving no fault to record.
        prefetch: PrefetchPolicy::None,
        touch: Touch::Random(64),
        threads: 2,
        record: true,
        verify: true,
        on_failure: OnFailure::Abort,
        deadline: std::time::Duration::from_secs(20),
        fault_transport: StreamTransport::Lean,
        prefetch_transport: StreamTransport::Lean,
    };
    let summary = faultline_client::restore::run(&opts).unwrap();
    eprintln!("{summary}");
    assert!(summary.pages_touched > 0 && summary.bytes_received > 0);
    assert_eq!(summary.mismatches, 0);
    assert_eq!(summary.verified, Some(true));
    assert!(summary.recorded_pages.is_some_and(|n| n > 0), "{summary:?}");

    let prefetched = faultline_client::restore::run(&RestoreOptions {
        prefetch: PrefetchPolicy::All,
        record: false,
        ..opts
    })
    .unwrap();
    assert!(prefetched.bytes_received > 0, "{prefetched:?}");
    assert_eq!(prefetched.mismatches, 0);
    assert_eq!(prefetched.verified, Some(true));
}

/// `faultline fetch` with --ca, --cert, --key and the token from
/// FAULTLINE_TOKEN writes the image byte for byte; a wrong token fails with
/// the server's reason.
#[test]
fn fetch_cli_over_tls() {
    let s = Secure::start();
    let out = s.dir.path().join("fetched.img");
    let run = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_faultline"))
            .args(["fetch", "--snapshot", "vm-1", "--server", &s.url()])
            .arg("--ca")
            .arg(&s.ca)
            .arg("--cert")
            .arg(&s.cert)
            .arg("--key")
            .arg(&s.key)
            .arg("--out")
            .arg(&out)
            .env("FAULTLINE_TOKEN", token)
            .output()
            .unwrap()
    };
    let ok = run(&s.token);
    assert!(ok.status.success(), "{ok:?}");
    assert!(std::fs::read(&out).unwrap() == s.image);
    let bad = run("fl_wrong");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("not valid on this server"), "{stderr}");
    assert!(!stderr.contains("fl_wrong"), "{stderr}");
}
