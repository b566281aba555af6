//! The same-host transport's server for the scenarios that compare it with
//! TCP: a second in-process server on the suite's store, on a Unix socket
//! in the work directory (`unix://...`), with the same worker count as the
//! TCP one. A pager on it takes pages from the page file (the snapshot's
//! image handed over as a descriptor) unless told to use the byte stream
//! (`ConnectOptions::no_page_file`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use faultline_server::store::SnapshotStore;
use faultline_server::{ServeOptions, ServerHandle};

use super::{Ctx, SERVER_THREADS};

/// How the pager reaches the server, for the rows that compare them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Loopback TCP (the suite's server), on the default transports (the
    /// lean ones).
    Tcp,
    /// Loopback TCP with the prefetch streams on gRPC, as before the lean
    /// prefetch transport.
    TcpGrpcPrefetch,
    /// gRPC over the Unix socket, pages as bytes on the streams.
    UnixStream,
    /// The Unix socket, pages read from the handed-over page file.
    UnixFile,
}

impl Transport {
    /// Its label in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "TCP (loopback)",
            Self::TcpGrpcPrefetch => "TCP, prefetch on gRPC",
            Self::UnixStream => "unix:// (byte stream)",
            Self::UnixFile => "unix:// + page file",
        }
    }

    /// Points `config` at `server` the way this transport needs.
    pub fn configure(self, config: &mut faultline_client::pager::PagerConfig, server: &UnixServer) {
        match self {
            Self::Tcp => {}
            Self::TcpGrpcPrefetch => {
                config.prefetch_transport = faultline_client::pager::StreamTransport::Grpc;
            }
            Self::UnixStream | Self::UnixFile => {
                config.servers = vec![server.url()];
                config.connect.no_page_file = self == Self::UnixStream;
            }
        }
    }
}

/// The server on the Unix socket; stopped when dropped.
#[derive(Debug)]
pub struct UnixServer {
    runtime: Option<tokio::runtime::Runtime>,
    handle: Option<ServerHandle>,
    url: String,
}

impl UnixServer {
    /// Serves the suite's store on `faultline.sock` in a scratch directory.
    pub fn start(ctx: &Ctx) -> anyhow::Result<Self> {
        let path = ctx.scratch("unix")?.join("faultline.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_THREADS)
            .thread_name("faultline-server-unix")
            .enable_all()
            .build()
            .context("starting the Unix server's runtime")?;
        let handle = runtime
            .block_on(faultline_server::spawn_unix(
                &path,
                ctx.store.clone() as Arc<dyn SnapshotStore>,
                ServeOptions::default(),
            ))
            .with_context(|| format!("serving on {}", path.display()))?;
        let url = handle.url();
        Ok(Self {
            runtime: Some(runtime),
            handle: Some(handle),
            url,
        })
    }

    /// `unix://PATH`.
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        if let Some(mut h) = self.handle.take() {
            h.begin_shutdown();
        }
        // Streams of dropped pagers may linger: do not wait for them (the
        // socket file goes with the server's task).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
