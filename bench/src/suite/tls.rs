//! The TLS server for the scenarios that measure what encryption costs: a
//! third in-process server on the suite's store, on 127.0.0.1 with TLS (a
//! server certificate from a CA made for the run, no client certificates
//! and no tokens: only the encryption is measured), with the same worker
//! count as the plaintext one. Its pagers run the same transports over it
//! (the lean fault and prefetch transports on rustls).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use faultline_client::pager::PagerConfig;
use faultline_client::remote::ConnectOptions;
use faultline_server::store::SnapshotStore;
use faultline_server::testing::certs::{TestCa, Usage};
use faultline_server::tls::TlsFiles;
use faultline_server::{ServeOptions, ServerHandle};

use super::{Ctx, SERVER_THREADS};

/// The server over TLS; stopped when dropped.
#[derive(Debug)]
pub struct TlsServer {
    runtime: Option<tokio::runtime::Runtime>,
    handle: Option<ServerHandle>,
    url: String,
    connect: ConnectOptions,
}

impl TlsServer {
    /// Serves the suite's store over TLS, its certificates in a scratch
    /// directory.
    pub fn start(ctx: &Ctx) -> anyhow::Result<Self> {
        let dir = ctx.scratch("tls")?;
        let ca = TestCa::new("faultline-bench CA");
        let (cert, key) = ca
            .issue(Usage::Server, "faultline-bench")
            .write(&dir, "server");
        let ca_path = ca.write_cert(&dir, "ca");
        let connect = ConnectOptions::from_files(Some(&ca_path), None, None, None)
            .context("the TLS client options")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_THREADS)
            .thread_name("faultline-server-tls")
            .enable_all()
            .build()
            .context("starting the TLS server's runtime")?;
        let opts = ServeOptions {
            tls: Some(TlsFiles {
                cert,
                key,
                client_ca: None,
            }),
            ..ServeOptions::default()
        };
        let handle = runtime
            .block_on(faultline_server::spawn_with(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                ctx.store.clone() as Arc<dyn SnapshotStore>,
                opts,
            ))
            .context("serving over TLS on 127.0.0.1")?;
        let url = handle.url();
        anyhow::ensure!(
            url.starts_with("https://"),
            "the TLS server serves {url}, not https://"
        );
        Ok(Self {
            runtime: Some(runtime),
            handle: Some(handle),
            url,
            connect,
        })
    }

    /// Points `config` at this server, trusting its CA.
    pub fn configure(&self, config: &mut PagerConfig) {
        config.servers = vec![self.url.clone()];
        config.connect.tls = self.connect.tls.clone();
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(mut h) = self.handle.take() {
            h.begin_shutdown();
        }
        // Streams of dropped pagers may linger: do not wait for them.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
