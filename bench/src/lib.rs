//! faultline's benchmarks, their baselines, and tools to make test inputs.
//!
//! # Layout
//! - [`image`]: synthetic guest memory images (zero pages, text, random data).
//! - [`wire`]: the transport: prefetch throughput over loopback by codec and
//!   HTTP/2 window, the measurements behind the protocol's defaults.
//!
//! The binary `faultline-bench` parses arguments and calls these.

pub mod image;
pub mod wire;
