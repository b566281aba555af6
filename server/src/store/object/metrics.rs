//! Metrics of the object store: requests, retries, bytes, and what imports
//! stored. Names follow `faultline_server_<thing>_<unit>` like
//! `crate::metrics`; the only label is the operation (get, put, head, list)
//! or a chunk's outcome, so cardinality is bounded. The chunk cache's series
//! are in `crate::chunk_cache`.
//!
//! What the fleet benchmark reads from them: store GETs and bytes per restore
//! (`STORE_REQUESTS{op="get"}`, `STORE_READ_BYTES`), and the dedup ratio of
//! imports (`STORE_CHUNKS{outcome}`).

use std::time::Duration;

use metrics::{counter, histogram};

/// Requests made to the object store (each try counts), by operation.
pub const STORE_REQUESTS: &str = "faultline_server_store_requests_total";
/// Tries that failed, by operation (retried or not).
pub const STORE_REQUEST_ERRORS: &str = "faultline_server_store_request_errors_total";
/// Failed tries that were retried, by operation.
pub const STORE_RETRIES: &str = "faultline_server_store_retries_total";
/// Time of one try, by operation.
pub const STORE_REQUEST_SECONDS: &str = "faultline_server_store_request_duration_seconds";
/// Bytes read from the object store (chunks, manifests, digests, working sets).
pub const STORE_READ_BYTES: &str = "faultline_server_store_read_bytes_total";
/// Bytes written to the object store.
pub const STORE_WRITTEN_BYTES: &str = "faultline_server_store_written_bytes_total";
/// Chunks of imported or uploaded images, by outcome: `uploaded`, `reused`
/// (the store had it: another snapshot shares those bytes), `zero` (all
/// zeros, never stored).
pub const STORE_CHUNKS: &str = "faultline_server_store_chunks_total";

/// Records one try of `op`.
pub fn request(op: &'static str, took: Duration, ok: bool) {
    counter!(STORE_REQUESTS, "op" => op).increment(1);
    if !ok {
        counter!(STORE_REQUEST_ERRORS, "op" => op).increment(1);
    }
    histogram!(STORE_REQUEST_SECONDS, "op" => op).record(took.as_secs_f64());
}

/// Records a retry of `op`.
pub fn retry(op: &'static str) {
    counter!(STORE_RETRIES, "op" => op).increment(1);
}

/// Records bytes read.
pub fn read_bytes(n: u64) {
    counter!(STORE_READ_BYTES).increment(n);
}

/// Records bytes written.
pub fn written_bytes(n: u64) {
    counter!(STORE_WRITTEN_BYTES).increment(n);
}

/// Records the chunks of one new snapshot.
pub fn chunks(uploaded: u64, reused: u64, zero: u64) {
    counter!(STORE_CHUNKS, "outcome" => "uploaded").increment(uploaded);
    counter!(STORE_CHUNKS, "outcome" => "reused").increment(reused);
    counter!(STORE_CHUNKS, "outcome" => "zero").increment(zero);
}
