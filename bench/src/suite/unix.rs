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
    server: SideServer,
}

impl UnixServer {
    /// Serves the suite's store on `faultline.sock` in a scratch directory.
    pub fn start(ctx: &Ctx) -> anyhow::Result<Self> {
        let path = ctx.scratch("unix")?.join("faultline.sock");
        let store = ctx.store.clone() as Arc<dyn SnapshotStore>;
        let server = SideServer::start("faultline-server-unix", async {
            faultline_server::spawn_unix(&path, store, ServeOptions::default())
                .await
                .with_context(|| format!("serving on {}", path.display()))
        })?;
        Ok(Self { server })
    }

    /// `unix://PATH`.
    pub fn url(&self) -> String {
        self.server.url()
    }
}

/// An in-process server besides the suite's, on a runtime of its own with
/// the same worker count; stopped when dropped.
#[derive(Debug)]
pub struct SideServer {
    runtime: Option<tokio::runtime::Runtime>,
    handle: Option<ServerHandle>,
}

impl SideServer {
    /// Runs `serve` (which starts the server) on a new runtime whose
    /// threads are named `thread_name`.
    pub fn start(
        thread_name: &str,
        serve: impl Future<Output = anyhow::Result<ServerHandle>>,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_THREADS)
            .thread_name(thread_name)
            .enable_all()
            .build()
            .with_context(|| format!("starting the runtime of {thread_name}"))?;
        let handle = runtime.block_on(serve)?;
        Ok(Self {
            runtime: Some(runtime),
            handle: Some(handle),
        })
    }

    /// The URL it serves.
    pub fn url(&self) -> String {
        self.handle
            .as_ref()
            .map(ServerHandle::url)
            .unwrap_or_default()
    }
}

impl Drop for SideServer {
    fn drop(&mut self) {
        if let Some(mut h) = self.handle.take() {
            h.begin_shutdown();
        }
        // Streams of dropped pagers may linger: do not wait for them (a
        // Unix socket's file goes with the server's task).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
