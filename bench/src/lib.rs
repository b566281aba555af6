//! faultline's benchmarks, their baselines, and tools to make test inputs.
//!
//! # Layout
//! - [`image`]: synthetic guest memory images (zero pages, text, random data).
//! - [`suite`]: `faultline-bench all`: every scenario against its baselines, and the
//!   report (JSON, Markdown, PNG plots).
//! - [`vm`]: the micro-VM harness: a minimal KVM VMM whose guest walks pages and reports a
//!   checksum; snapshots of it (raw memory file + vCPU file) and restores.
//! - [`wire`]: the transport: prefetch throughput over loopback by codec and
//!   HTTP/2 window, the measurements behind the protocol's defaults.
//!
//! The binary `faultline-bench` parses arguments and calls these.

pub mod image;
pub mod suite;
pub mod vm;
pub mod wire;
