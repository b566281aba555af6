//! Readiness, apart from liveness: a server is live while its process
//! answers, and ready while its store answers too.
//!
//! A background task probes the store (for an object store, one LIST of its
//! prefix; for a directory, that it can be read) at once, then every
//! [`PROBE_INTERVAL`] (every [`RETRY_INTERVAL`] while not ready). Its state
//! is served as `GET /livez` (200 while the process runs) and `GET /readyz`
//! (200 when ready, 503 with the reason otherwise) on the metrics listener,
//! and as the gRPC health status of `faultline.v1.Faultline` and of the
//! whole server (`""`): NOT_SERVING until the first probe succeeds. So an
//! orchestrator sends no restore to a server whose store is not there yet
//! (or has gone), and restarts only one that stopped answering at all.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Time between probes of a ready store: frequent enough that a store
/// outage shows within seconds, rare enough to cost the store nothing.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Time between probes while not ready, so service starts soon after the
/// store does.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A check that the store answers: `Err` says why not.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Where the server stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// No probe has finished yet.
    Starting,
    /// The last probe succeeded.
    Ready,
    /// The last probe failed, for this reason.
    NotReady(String),
}

/// The server's readiness; cheap to clone.
#[derive(Clone, Debug)]
pub struct Readiness {
    rx: watch::Receiver<Status>,
}

impl Readiness {
    /// Always ready: for servers whose store needs no probe (tests, embedding).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(Status::Ready);
        // The receiver keeps the last value after the sender is gone.
        drop(tx);
        Self { rx }
    }

    /// Probes with `probe` on a background task until the returned
    /// readiness and all its clones are dropped.
    pub fn spawn(probe: Probe) -> Self {
        Self::spawn_every(probe, PROBE_INTERVAL, RETRY_INTERVAL)
    }

    /// [`Self::spawn`], probing every `interval` while ready and every
    /// `retry` while not.
    pub fn spawn_every(probe: Probe, interval: Duration, retry: Duration) -> Self {
        let (tx, rx) = watch::channel(Status::Starting);
        tokio::spawn(async move {
            loop {
                let status = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                    Ok(Ok(())) => Status::Ready,
                    Ok(Err(reason)) => Status::NotReady(reason),
                    Err(_) => Status::NotReady(format!(
                        "the store did not answer within {}s",
                        PROBE_TIMEOUT.as_secs()
                    )),
                };
                let ready = status == Status::Ready;
                // Logged when readiness flips, not at every failed probe.
                let changed = (*tx.borrow() == Status::Ready) != ready;
                if changed || *tx.borrow() == Status::Starting {
                    match &status {
                        Status::Ready => tracing::info!("ready: the store answers"),
                        Status::NotReady(r) => tracing::warn!("not ready: {r}"),
                        Status::Starting => {}
                    }
                }
                if tx.send(status).is_err() {
                    return;
                }
                let wait = if ready { interval } else { retry };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Self { rx }
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.rx.borrow().clone()
    }

    /// Whether the server is ready now.
    pub fn is_ready(&self) -> bool {
        *self.rx.borrow() == Status::Ready
    }

    /// Keeps the gRPC health status of service `S` and of the whole server
    /// in step with readiness, until the readiness is dropped.
    pub fn drive_health<S: NamedService>(&self, health: HealthReporter) {
        let mut rx = self.rx.clone();
        tokio::spawn(async move {
            loop {
                let status = if *rx.borrow_and_update() == Status::Ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health.set_service_status(S::NAME, status).await;
                health.set_service_status("", status).await;
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// `GET /livez` and `GET /readyz`, to merge into the metrics endpoint.
    pub fn routes(&self) -> axum::Router {
        let rx = self.rx.clone();
        axum::Router::new()
            .route("/livez", axum::routing::get(|| async { "live\n" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let status = rx.borrow().clone();
                    async move {
                        use http::StatusCode;
                        match status {
                            Status::Ready => (StatusCode::OK, "ready\n".to_owned()),
                            Status::Starting => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "not ready: the store has not answered yet\n".to_owned(),
                            ),
                            Status::NotReady(r) => {
                                (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n"))
                            }
                        }
                    }
                }),
            )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Readiness follows the probe: not ready while it fails, ready once it succeeds.
    #[tokio::test]
    async fn follows_the_probe() {
        let up = Arc::new(AtomicBool::new(false));
        let probe: Probe = {
            let up = up.clone();
            Arc::new(move || {
                let ok = up.load(Ordering::SeqCst);
                Box::pin(async move { if ok { Ok(()) } else { Err("store down".into()) } })
            })
        };
        let ms = Duration::from_millis;
        let r = Readiness::spawn_every(probe, ms(20), ms(10));
        let wait_for = |want: bool| {
            let r = r.clone();
            async move {
                for _ in 0..500 {
                    if r.is_ready() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("readiness never became {want}");
            }
        };
        tokio::time::sleep(ms(50)).await;
        assert_eq!(r.status(), Status::NotReady("store down".into()));
        up.store(true, Ordering::SeqCst);
        wait_for(true).await;
        up.store(false, Ordering::SeqCst);
        wait_for(false).await;
        assert!(Readiness::always().is_ready());
    }
}
