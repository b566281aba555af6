//! Every request to the object store goes through [`ObjectIo`]: it retries
//! what may succeed on a second try (timeouts, refused connections, 5xx,
//! throttling) with exponential backoff and jitter until a deadline, counts
//! requests and bytes (for tests, in [`IoStats`], and as metrics), and turns
//! what is left into an [`ObjectError`] that says which object and why.
//!
//! object_store's own retries are switched off (see
//! [`super::ObjectStoreOptions`]) so that one policy, this one, decides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use faultline_proto::backoff::Backoff;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::metrics;

/// How requests are retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Wait before the first retry.
    pub first_backoff: Duration,
    /// Longest wait between two tries.
    pub max_backoff: Duration,
    /// No try of a read (GET, LIST) starts later than this after the first.
    pub deadline: Duration,
    /// No try of a write (PUT, HEAD: imports and uploads) starts later than
    /// this after the first.
    pub write_deadline: Duration,
}

/// First wait after a failure: long enough for a restarting store's port to
/// come back without hammering it, short enough that one lost packet costs
/// a fault little.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Longest wait between tries: a store that is down is probed every couple
/// of seconds, so service resumes soon after it is back.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long one read may keep retrying before the request is answered
/// UNAVAILABLE: under the client's stall timeout (5 s,
/// `faultline_client::pager::link::STALL_TIMEOUT`), so the client hears why
/// and retries (here or on another server) instead of taking the server for
/// stuck; the pager retries within its own deadline (30 s), and chunks
/// already cached serve on meanwhile.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(4);

/// How long a write of an import or upload may keep retrying: a long import
/// should ride out a store's restart (tens of seconds) rather than start
/// over; no guest waits on it.
pub const WRITE_RETRY_DEADLINE: Duration = Duration::from_secs(60);

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_backoff: FIRST_BACKOFF,
            max_backoff: MAX_BACKOFF,
            deadline: RETRY_DEADLINE,
            write_deadline: WRITE_RETRY_DEADLINE,
        }
    }
}

impl RetryPolicy {
    /// The waits between tries: exponential from `first_backoff` to
    /// `max_backoff`, with jitter (`faultline_proto::backoff`, shared with
    /// the client's retries), so that many servers retrying one store do not
    /// march in step.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.first_backoff, self.max_backoff)
    }
}

/// What an object-store request failed with, after retries.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ObjectError {
    /// The store did not answer, or answered with errors, until the deadline.
    #[error(
        "the object store did not complete {op} {key} after {attempts} tries in {secs:.1}s: \
         {source}; check that the store is up and reachable (AWS_ENDPOINT) and retry"
    )]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The object.
        key: String,
        /// Tries made.
        attempts: u32,
        /// Seconds spent.
        secs: f64,
        /// The last error.
        source: Arc<object_store::Error>,
    },
    /// The store refused the request in a way a retry will not change
    /// (credentials, permissions, a missing bucket).
    #[error(
        "the object store refused {op} {key}: {source}; check the bucket and the AWS_* \
         credentials"
    )]
    Refused {
        /// The operation.
        op: &'static str,
        /// The object.
        key: String,
        /// Why.
        source: Arc<object_store::Error>,
    },
    /// The object does not exist.
    #[error("object {key} does not exist")]
    NotFound {
        /// The object.
        key: String,
    },
    /// A create-only write found the object there already.
    #[error("object {key} exists already")]
    AlreadyExists {
        /// The object.
        key: String,
    },
    /// The object's bytes are not what its name or its manifest says.
    #[error("object {key} is corrupt: {reason}")]
    Corrupt {
        /// The object.
        key: String,
        /// What does not match.
        reason: String,
    },
}

/// Counts of requests made by one store, for tests (the metrics are
/// process-wide).
#[derive(Debug, Default)]
pub struct IoStats {
    gets: AtomicU64,
    get_bytes: AtomicU64,
    puts: AtomicU64,
    put_bytes: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    retries: AtomicU64,
}

/// A copy of [`IoStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounts {
    /// GET requests that returned data (chunks, manifests, digests, working sets).
    pub gets: u64,
    /// Bytes those GETs returned.
    pub get_bytes: u64,
    /// PUT requests that succeeded.
    pub puts: u64,
    /// Bytes those PUTs sent.
    pub put_bytes: u64,
    /// HEAD requests (existence checks before uploading a chunk).
    pub heads: u64,
    /// LIST requests.
    pub lists: u64,
    /// Tries that failed and were retried.
    pub retries: u64,
}

impl IoStats {
    /// The counts now.
    pub fn snapshot(&self) -> IoCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoCounts {
            gets: l(&self.gets),
            get_bytes: l(&self.get_bytes),
            puts: l(&self.puts),
            put_bytes: l(&self.put_bytes),
            heads: l(&self.heads),
            lists: l(&self.lists),
            retries: l(&self.retries),
        }
    }
}

/// Whether a retry may help.
fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::UnknownConfigurationKey { .. } => false,
        // Generic covers transport errors and HTTP statuses that have no
        // variant of their own. object_store keeps its error types private,
        // so the status is read from the message ("non-2xx status code:
        // 503 Service Unavailable"): 4xx are refusals, except timeouts and
        // throttling.
        other => http_status(&other.to_string())
            .is_none_or(|s| !(400..500).contains(&s) || s == 408 || s == 429),
    }
}

/// The HTTP status in one of object_store's error messages, if any.
fn http_status(msg: &str) -> Option<u16> {
    let at = msg.find("status code: ")? + "status code: ".len();
    msg.get(at..at + 3)?.parse().ok()
}

/// The object store, with retries and counts.
#[derive(Debug)]
pub struct ObjectIo {
    store: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    stats: IoStats,
}

impl ObjectIo {
    /// Requests to `store`, retried by `policy`.
    pub fn new(store: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        Self {
            store,
            policy,
            stats: IoStats::default(),
        }
    }

    /// Counts so far.
    pub fn stats(&self) -> IoCounts {
        self.stats.snapshot()
    }

    /// Runs `f` until it succeeds, fails for good, or the deadline passes.
    async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        key: &Path,
        mut f: F,
    ) -> Result<T, ObjectError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let started = Instant::now();
        let mut backoff = self.policy.backoff();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let t = Instant::now();
            let result = f().await;
            metrics::request(op, t.elapsed(), result.is_ok());
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let key = key.to_string();
            match &err {
                object_store::Error::NotFound { .. } => return Err(ObjectError::NotFound { key }),
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. } => {
                    return Err(ObjectError::AlreadyExists { key });
                }
                e if !transient(e) => {
                    return Err(ObjectError::Refused {
                        op,
                        key,
                        source: Arc::new(err),
                    });
                }
                _ => {}
            }
            let wait = backoff.next_delay();
            let deadline = match op {
                "put" | "head" => self.policy.write_deadline,
                _ => self.policy.deadline,
            };
            if started.elapsed() + wait > deadline {
                tracing::warn!(op, key, attempts, error = %err, "object store unavailable");
                return Err(ObjectError::Unavailable {
                    op,
                    key,
                    attempts,
                    secs: started.elapsed().as_secs_f64(),
                    source: Arc::new(err),
                });
            }
            tracing::debug!(op, key, attempts, error = %err, "object store request failed; retrying");
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            metrics::retry(op);
            tokio::time::sleep(wait).await;
        }
    }

    /// The whole object at `key`.
    pub async fn get(&self, key: &Path) -> Result<Bytes, ObjectError> {
        let bytes = self
            .retry("get", key, || async {
                let r = self.store.get(key).await?;
                r.bytes().await
            })
            .await?;
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        self.stats
            .get_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        metrics::read_bytes(bytes.len() as u64);
        Ok(bytes)
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &Path) -> Result<bool, ObjectError> {
        self.stats.heads.fetch_add(1, Ordering::Relaxed);
        match self.retry("head", key, || self.store.head(key)).await {
            Ok(_) => Ok(true),
            Err(ObjectError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `bytes` at `key`; with `create_only`, fails with
    /// [`ObjectError::AlreadyExists`] if the object exists.
    pub async fn put(
        &self,
        key: &Path,
        bytes: Bytes,
        create_only: bool,
    ) -> Result<(), ObjectError> {
        let len = bytes.len() as u64;
        let opts = || PutOptions {
            mode: if create_only {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..PutOptions::default()
        };
        self.retry("put", key, || {
            self.store
                .put_opts(key, PutPayload::from_bytes(bytes.clone()), opts())
        })
        .await?;
        self.stats.puts.fetch_add(1, Ordering::Relaxed);
        self.stats.put_bytes.fetch_add(len, Ordering::Relaxed);
        metrics::written_bytes(len);
        Ok(())
    }

    /// The names directly under `prefix` that have objects below them
    /// ("folders"), and the objects directly under it.
    pub async fn list_dir(&self, prefix: &Path) -> Result<(Vec<Path>, Vec<Path>), ObjectError> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let r = self
            .retry("list", prefix, || {
                self.store.list_with_delimiter(Some(prefix))
            })
            .await?;
        Ok((
            r.common_prefixes,
            r.objects.into_iter().map(|o| o.location).collect(),
        ))
    }

    /// One LIST of `prefix`, not retried: a readiness probe wants the
    /// store's answer now, and says why not.
    pub async fn probe(&self, prefix: &Path) -> Result<(), ObjectError> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let r = self.store.list_with_delimiter(Some(prefix)).await;
        metrics::request("list", t.elapsed(), r.is_ok());
        r.map(drop).map_err(|e| ObjectError::Unavailable {
            op: "list",
            key: prefix.to_string(),
            attempts: 1,
            secs: t.elapsed().as_secs_f64(),
            source: Arc::new(e),
        })
    }

    /// Every object under `prefix`, recursively.
    pub async fn list_all(&self, prefix: &Path) -> Result<Vec<Path>, ObjectError> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        self.retry("list", prefix, || {
            self.store
                .list(Some(prefix))
                .map_ok(|o| o.location)
                .try_collect::<Vec<_>>()
        })
        .await
    }

    /// Overwrites the object at `key` with `bytes`, bypassing counts: for
    /// tests that corrupt a store on purpose.
    pub async fn put_raw(&self, key: &Path, bytes: Bytes) -> Result<(), object_store::Error> {
        self.store
            .put(key, PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits double from the first up to the cap, jittered within [d/2, d].
    #[test]
    fn backoff_schedule() {
        let p = RetryPolicy {
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
            write_deadline: Duration::from_secs(10),
        };
        let mut b = p.backoff();
        for full in [100, 200, 400, 800, 1000, 1000] {
            let d = b.next_delay().as_millis() as u64;
            assert!((full / 2..=full).contains(&d), "{d} ms, step {full} ms");
        }
    }

    /// Missing objects and refusals are final; transport errors are retried.
    #[test]
    fn what_is_transient() {
        let nf = object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        };
        assert!(!transient(&nf));
        let generic = object_store::Error::Generic {
            store: "S3",
            source: "error sending request: connection refused".into(),
        };
        assert!(transient(&generic));
        let status = |m: &str| object_store::Error::Generic {
            store: "S3",
            source: m.to_owned().into(),
        };
        assert!(transient(&status(
            "Server returned non-2xx status code: 503 Service Unavailable: slow down"
        )));
        assert!(transient(&status(
            "non-2xx status code: 429 Too Many Requests"
        )));
        assert!(!transient(&status(
            "non-2xx status code: 400 Bad Request: region"
        )));
    }
}
