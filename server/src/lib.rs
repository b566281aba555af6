//! faultline's snapshot server: exports immutable memory snapshots over gRPC
//! (`faultline.v1.Faultline`), with health, reflection and Prometheus metrics.
//!
//! # Layout
//! - [`store`]: where snapshots live. The async [`store::SnapshotStore`],
//!   [`store::Snapshot`] and [`store::SnapshotWrite`] traits, the local
//!   directory store, and its one-pass [`store::SnapshotWriter`] that both
//!   import and upload use; [`store::layers`]: diff snapshots and writable
//!   volumes as chains of layers (journaled writes, seal, diff import,
//!   flatten); [`store::object`], the S3 object store (content-addressed
//!   chunks, a manifest written last).
//! - [`chunk_cache`]: the bounded in-memory chunk cache with single-flight
//!   misses that object-store reads go through.
//! - [`limits`]: [`limits::Limits`], every limit on what a request, a client
//!   or a snapshot may make the server hold, with its default and flag.
//! - [`import`]: importing a raw memory file (Firecracker, Cloud Hypervisor)
//!   into a store, with progress.
//! - [`service`]: the gRPC service: validation at the edge, batches of pages,
//!   the fault and prefetch streams, uploads.
//! - [`lean`]: the lean fault transport: a `Fault` stream as
//!   length-delimited frames on a raw connection (no HTTP/2), answered by
//!   the service's own fault code on the connection's task.
//! - [`error`]: the service's error and its one mapping to gRPC codes.
//! - [`metrics`]: metric names and the Prometheus endpoint.
//! - [`server`]: [`server::Server`], the transport with its tuning and
//!   connection limits, its own accept loop (TLS handshakes, `TCP_NODELAY`),
//!   health, reflection, reloading and graceful shutdown; [`server::spawn`]
//!   runs one on a background task; [`server::spawn_unix`] one on a Unix
//!   socket (for a server on the VM's own host).
//! - [`page_file`]: the page-file handover on the Unix socket: a snapshot's
//!   image passed to a client on this host as a file descriptor.
//! - [`tls`]: the server's certificate, key and client CA from PEM files,
//!   reloadable.
//! - [`auth`]: bearer tokens (the tokens file, hashed), their rights on
//!   snapshot patterns, the interceptor that authenticates, and the caller's
//!   identity.
//! - [`readiness`]: liveness and readiness (`/livez`, `/readyz`, gRPC
//!   health NOT_SERVING until the store answers).
//! - [`garage`]: a single-node Garage (a real S3 server) for tests and
//!   benchmarks, through `scripts/garage.sh`.
//! - [`testing`]: deterministic synthetic memory images for tests, benchmarks
//!   and the demo (feature `synthetic`: the micro-VM harness's page pattern).
//!
//! The binary `faultline-server` (`src/main.rs`) only parses arguments and
//! calls into these.

pub mod auth;
pub mod chunk_cache;
pub mod error;
pub mod garage;
pub mod import;
pub mod lean;
pub mod limits;
pub mod metrics;
pub mod page_file;
pub mod readiness;
pub mod server;
pub mod service;
pub mod store;
pub mod testing;
pub mod tls;

pub use error::Error;
pub use limits::Limits;
pub use server::{
    ServeOptions, Server, ServerHandle, run, spawn, spawn_unix, spawn_with, spawn_with_limits,
};
pub use service::FaultlineService;
pub use store::{LocalStore, SnapshotStore};
