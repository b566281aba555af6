//! faultline's benchmarks, their baselines, and tools to make test inputs.
//!
//! # Layout
//! - [`image`]: synthetic guest memory images (zero pages, text, random data).
//! - [`suite`]: `faultline-bench all`: every scenario against its baselines, and the
//!   report (JSON, Markdown, PNG plots).
//! - [`vm`]: the KVM micro-VM of `faultline-microvm` (bench/microvm: the VMM, its guest,
//!   snapshots) restored through faultline (`faultline-bench vm`), and the adaptors that give
//!   the harness the client's memory.
//! - [`wire`]: the transport: prefetch throughput over loopback by codec and
//!   HTTP/2 window, the measurements behind the protocol's defaults.
//!
//! The binary `faultline-bench` parses arguments and calls these.

pub mod image;
pub mod suite;
pub mod vm;
pub mod wire;
