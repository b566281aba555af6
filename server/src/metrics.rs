//! The server's metrics, all in one place, and the Prometheus endpoint.
//!
//! Names follow `faultline_server_<thing>_<unit>`; labels are the RPC, the
//! status code on errors, the reason of a rejection and the name of a
//! limit, so cardinality is bounded. Every series is registered, with its
//! `# HELP` text and a zero value, when the recorder is installed (and the
//! limits' series when a service is built), so that a fresh server
//! scraped by Prometheus shows them all.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::Error;

/// Requests received, by RPC.
pub const REQUESTS: &str = "faultline_server_requests_total";
/// Requests that failed, by RPC and gRPC code.
pub const REQUEST_ERRORS: &str = "faultline_server_request_errors_total";
/// Time to answer a request (for streams: one fault answer; the set-up of a
/// prefetch stream), by RPC.
pub const REQUEST_SECONDS: &str = "faultline_server_request_duration_seconds";
/// Pages answered, zero or not, by RPC.
pub const PAGES_SERVED: &str = "faultline_server_pages_served_total";
/// Zero pages answered with a flag instead of bytes, by RPC.
pub const ZERO_PAGES_SKIPPED: &str = "faultline_server_zero_pages_skipped_total";
/// Page bytes sent (before compression), by RPC.
pub const BYTES_SERVED: &str = "faultline_server_bytes_served_total";
/// Page bytes on the wire (after compression), by RPC.
pub const WIRE_BYTES: &str = "faultline_server_wire_bytes_total";
/// Streams open now, by RPC.
pub const ACTIVE_STREAMS: &str = "faultline_server_active_streams";
/// Requests refused because they are over a limit, by reason.
pub const REJECTED: &str = "faultline_server_rejected_total";
/// Snapshots in the store (as of the last listing or upload).
pub const SNAPSHOTS: &str = "faultline_server_snapshots";
/// Each limit's configured value, by limit.
pub const LIMIT: &str = "faultline_server_limit";
/// How much of a limit is in use now, by limit (for the limits on things
/// held at once).
pub const LIMIT_USE: &str = "faultline_server_limit_use";

/// The RPCs (and stream parts) that label series.
pub const RPCS: &[&str] = &[
    "list_snapshots",
    "get_manifest",
    "read_pages",
    "fault_open",
    "fault",
    "prefetch",
    "record_working_set",
    "create_snapshot",
    "create_volume",
    "write_pages_open",
    "write_pages",
    "seal_volume",
];

/// The streaming RPCs, for the open-streams gauge.
pub const STREAMS: &[&str] = &["fault", "prefetch", "write_pages"];

/// The codes errors are labelled with (the ones docs/protocol.md lists).
pub const CODES: &[tonic::Code] = &[
    tonic::Code::InvalidArgument,
    tonic::Code::Unauthenticated,
    tonic::Code::PermissionDenied,
    tonic::Code::NotFound,
    tonic::Code::AlreadyExists,
    tonic::Code::OutOfRange,
    tonic::Code::FailedPrecondition,
    tonic::Code::Unimplemented,
    tonic::Code::ResourceExhausted,
    tonic::Code::DeadlineExceeded,
    tonic::Code::DataLoss,
    tonic::Code::Unavailable,
    tonic::Code::Internal,
];

/// Latency buckets, in seconds: 10 us (a page-cache read) to 10 s (a huge
/// upload chunk on a slow disk), about three per decade.
pub const LATENCY_BUCKETS: &[f64] = &[
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram summaries are refreshed in the background.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder
/// (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("latency buckets are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed already, in which
            // case metrics go there and this endpoint shows none of them.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was installed already; /metrics will be empty");
            }
            register();
            handle
        })
        .clone()
}

/// Describes every series and gives each label set a zero value.
fn register() {
    describe_counter!(
        REQUESTS,
        "Requests received, by RPC (Fault: one per request on the stream)."
    );
    describe_counter!(
        REQUEST_ERRORS,
        "Requests that failed, by RPC and gRPC code."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer a request (a fault answer; a prefetch stream's set-up), by RPC."
    );
    describe_counter!(PAGES_SERVED, "Pages answered, zero or not, by RPC.");
    describe_counter!(
        ZERO_PAGES_SKIPPED,
        "Zero pages answered with a flag instead of bytes, by RPC."
    );
    describe_counter!(
        BYTES_SERVED,
        metrics::Unit::Bytes,
        "Page bytes sent before compression, by RPC."
    );
    describe_counter!(
        WIRE_BYTES,
        metrics::Unit::Bytes,
        "Page bytes on the wire after compression, by RPC."
    );
    describe_gauge!(ACTIVE_STREAMS, "Streams open now, by RPC.");
    describe_counter!(
        REJECTED,
        "Requests refused for being over a limit, by reason."
    );
    describe_gauge!(
        SNAPSHOTS,
        "Snapshots in the store, as of the last listing or upload."
    );
    describe_gauge!(
        LIMIT,
        "Each limit's configured value (see docs/security.md), by limit."
    );
    describe_gauge!(
        LIMIT_USE,
        "How much of a limit on things held at once is in use, by limit."
    );
    for &rpc in RPCS {
        counter!(REQUESTS, "rpc" => rpc).absolute(0);
        for code in CODES {
            counter!(REQUEST_ERRORS, "rpc" => rpc, "code" => format!("{code:?}")).absolute(0);
        }
        let _ = histogram!(REQUEST_SECONDS, "rpc" => rpc);
    }
    for rpc in ["read_pages", "fault", "prefetch"] {
        counter!(PAGES_SERVED, "rpc" => rpc).absolute(0);
        counter!(ZERO_PAGES_SKIPPED, "rpc" => rpc).absolute(0);
        counter!(BYTES_SERVED, "rpc" => rpc).absolute(0);
        counter!(WIRE_BYTES, "rpc" => rpc).absolute(0);
    }
    for &rpc in STREAMS {
        gauge!(ACTIVE_STREAMS, "rpc" => rpc).increment(0.0);
    }
    for &reason in crate::error::REJECTION_REASONS {
        counter!(REJECTED, "reason" => reason).absolute(0);
    }
    gauge!(SNAPSHOTS).increment(0.0);
}

/// Publishes the configured limits, and zero use of the limits on things
/// held at once.
pub fn register_limits(limits: &crate::limits::Limits) {
    install();
    for (name, value) in limits.named() {
        gauge!(LIMIT, "limit" => name).set(value as f64);
    }
    gauge!(LIMIT_USE, "limit" => "max_prefetch_streams").increment(0.0);
    gauge!(LIMIT_USE, "limit" => "max_open_snapshots").increment(0.0);
}

/// Sets how much of limit `name` is in use.
pub fn limit_use(name: &'static str, value: u64) {
    gauge!(LIMIT_USE, "limit" => name).set(value as f64);
}

/// Sets the number of snapshots.
pub fn set_snapshots(n: u64) {
    gauge!(SNAPSHOTS).set(n as f64);
}

/// Counts a new snapshot.
pub fn snapshot_added() {
    gauge!(SNAPSHOTS).increment(1.0);
}

/// Serves `GET /metrics` in Prometheus text format on `listener` until
/// `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, axum::Router::new(), shutdown).await
}

/// [`serve`], with `routes` (such as `/livez` and `/readyz`) beside `/metrics`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    routes: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = install();
    let upkeep = handle.clone();
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .merge(routes);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    upkeep.abort();
    result
}

/// The address a metrics listener is bound to, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

/// Times one request and counts it; records its error, if any.
#[derive(Debug)]
pub struct Request {
    rpc: &'static str,
    started: Instant,
}

impl Request {
    /// Counts a request of `rpc` and starts its timer.
    pub fn start(rpc: &'static str) -> Self {
        counter!(REQUESTS, "rpc" => rpc).increment(1);
        Self {
            rpc,
            started: Instant::now(),
        }
    }

    /// Records `err` and turns it into the status to return.
    pub fn fail(&self, err: Error) -> tonic::Status {
        request_failed(self.rpc, &err);
        tracing::debug!(rpc = self.rpc, error = %err, "request failed");
        err.into()
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        histogram!(REQUEST_SECONDS, "rpc" => self.rpc).record(self.started.elapsed().as_secs_f64());
    }
}

/// Counts a failed request of `rpc`, and its rejection if it was over a
/// limit.
pub fn request_failed(rpc: &'static str, err: &Error) {
    let code = err.code();
    counter!(REQUEST_ERRORS, "rpc" => rpc, "code" => format!("{code:?}")).increment(1);
    if let Some(reason) = err.rejection() {
        counter!(REJECTED, "reason" => reason).increment(1);
    }
}

/// Counts one request of a stream and its latency.
pub fn request_done(rpc: &'static str, started: Instant) {
    counter!(REQUESTS, "rpc" => rpc).increment(1);
    histogram!(REQUEST_SECONDS, "rpc" => rpc).record(started.elapsed().as_secs_f64());
}

/// Counts pages sent.
pub fn pages_served(rpc: &'static str, pages: u64, zero_pages: u64, bytes: u64, wire_bytes: u64) {
    counter!(PAGES_SERVED, "rpc" => rpc).increment(pages);
    counter!(ZERO_PAGES_SKIPPED, "rpc" => rpc).increment(zero_pages);
    counter!(BYTES_SERVED, "rpc" => rpc).increment(bytes);
    counter!(WIRE_BYTES, "rpc" => rpc).increment(wire_bytes);
}

/// The counters of one `Fault` stream's requests, registered once when it
/// opens: [`request_done`] and [`pages_served`] look their counters up by
/// name and labels on every call (hashing and comparing keys), which per
/// demand fault was a visible share of the server's CPU.
#[derive(Debug)]
pub struct FaultCounters {
    requests: metrics::Counter,
    seconds: metrics::Histogram,
    pages: metrics::Counter,
    zero_pages: metrics::Counter,
    bytes: metrics::Counter,
    wire_bytes: metrics::Counter,
}

impl FaultCounters {
    /// The counters of rpc `fault`.
    pub fn new() -> Self {
        let rpc = "fault";
        Self {
            requests: counter!(REQUESTS, "rpc" => rpc),
            seconds: histogram!(REQUEST_SECONDS, "rpc" => rpc),
            pages: counter!(PAGES_SERVED, "rpc" => rpc),
            zero_pages: counter!(ZERO_PAGES_SKIPPED, "rpc" => rpc),
            bytes: counter!(BYTES_SERVED, "rpc" => rpc),
            wire_bytes: counter!(WIRE_BYTES, "rpc" => rpc),
        }
    }

    /// [`pages_served`].
    pub fn served(&self, pages: u64, zero_pages: u64, bytes: u64, wire_bytes: u64) {
        self.pages.increment(pages);
        self.zero_pages.increment(zero_pages);
        self.bytes.increment(bytes);
        self.wire_bytes.increment(wire_bytes);
    }

    /// [`request_done`].
    pub fn done(&self, started: Instant) {
        self.requests.increment(1);
        self.seconds.record(started.elapsed().as_secs_f64());
    }
}

impl Default for FaultCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts an open stream while alive.
#[derive(Debug)]
pub struct ActiveStream(&'static str);

impl ActiveStream {
    /// A stream of `rpc` opened.
    pub fn new(rpc: &'static str) -> Self {
        gauge!(ACTIVE_STREAMS, "rpc" => rpc).increment(1.0);
        Self(rpc)
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        gauge!(ACTIVE_STREAMS, "rpc" => self.0).decrement(1.0);
    }
}
