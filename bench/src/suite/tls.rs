//! The TLS server for the scenarios that measure what encryption costs: a
//! third in-process server on the suite's store, on 127.0.0.1 with TLS (a
//! server certificate from a CA made for the run, no client certificates
//! and no tokens: only the encryption is measured), with the same worker
//! count as the plaintext one. Its pagers run the same transports over it
//! (the lean fault and prefetch transports on rustls).

use std::sync::Arc;

use anyhow::Context;
use faultline_client::pager::PagerConfig;
use faultline_client::remote::ConnectOptions;
use faultline_server::ServeOptions;
use faultline_server::store::SnapshotStore;
use faultline_server::testing::certs::{TestCa, Usage};
use faultline_server::tls::TlsFiles;

use super::Ctx;
use super::unix::SideServer;

/// The server over TLS; stopped when dropped.
#[derive(Debug)]
pub struct TlsServer {
    server: SideServer,
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
        let opts = ServeOptions {
            tls: Some(TlsFiles {
                cert,
                key,
                client_ca: None,
            }),
            ..ServeOptions::default()
        };
        let store = ctx.store.clone() as Arc<dyn SnapshotStore>;
        let server = SideServer::start("faultline-server-tls", async {
            faultline_server::spawn_with(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                store,
                opts,
            )
            .await
            .context("serving over TLS on 127.0.0.1")
        })?;
        let url = server.url();
        anyhow::ensure!(
            url.starts_with("https://"),
            "the TLS server serves {url}, not https://"
        );
        Ok(Self { server, connect })
    }

    /// Points `config` at this server, trusting its CA.
    pub fn configure(&self, config: &mut PagerConfig) {
        config.servers = vec![self.server.url()];
        config.connect.tls = self.connect.tls.clone();
    }
}
