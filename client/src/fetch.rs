//! Downloading a whole snapshot into a file, every page verified: a raw
//! memory file again, as `faultline-server import` took it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultline_proto::backoff::Backoff;
use faultline_proto::{Compression, Manifest, PageBitmap, PageIndex, SnapshotId, pb};
use futures::StreamExt;

use crate::fleet;
use crate::remote::{ConnectOptions, Remote, RemoteError, decode_batch};

/// What a fetch did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct FetchStats {
    /// Pages in the snapshot.
    pub pages: u64,
    /// Of those, zero pages (flagged by the server, never sent).
    pub zero_pages: u64,
    /// Page bytes received, after decompression.
    pub bytes: u64,
    /// Page bytes on the wire, before decompression.
    pub wire_bytes: u64,
    /// Batches received.
    pub batches: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl FetchError {
    /// Whether another server (or a later attempt) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Remote(e) => e.is_transient(),
            Self::Incomplete { .. } => true,
            _ => false,
        }
    }
}

/// Fetching failed; the output file is incomplete and should be discarded.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Talking to the server failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// A page did not match its digest. It was not written.
    #[error(
        "page {0} does not match its digest in the manifest; the snapshot on the server is \
         corrupt (check it with `faultline-server inspect --verify`)"
    )]
    Corrupt(PageIndex),
    /// The stream ended without every page.
    #[error("the server sent {got} of {pages} pages before the stream ended")]
    Incomplete {
        /// Pages received.
        got: u64,
        /// Pages in the snapshot.
        pages: u64,
    },
    /// The server list cannot be used.
    #[error(transparent)]
    Plan(#[from] fleet::PlanError),
    /// A fail-over server serves another snapshot.
    #[error(transparent)]
    Mismatch(fleet::MismatchError),
    /// Writing the output failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Fetches snapshot `id` from `remote` into `out` (created or truncated; zero
/// pages become holes), verifying every page, calling `progress` with pages
/// done so far.
pub async fn fetch_to_file(
    remote: &Remote,
    id: &SnapshotId,
    out: &Path,
    compression: Compression,
    mut progress: impl FnMut(u64, u64),
) -> Result<FetchStats, FetchError> {
    let started = Instant::now();
    let manifest = remote.manifest(id).await?;
    let mut into = Output::create(out, &manifest)?;
    into.stream(remote, &manifest, compression, &mut progress)
        .await?;
    into.finish(started)
}

/// Fetches snapshot `id` from a fleet: `servers` in the order of
/// [`fleet::plan`] (the snapshot's home first). When a server fails
/// mid-stream the fetch goes on from the next one, asking only for the pages
/// it does not have yet; a server whose manifest differs from the first one's
/// is refused ([`fleet::differs`]). Gives up after [`MAX_ROUNDS`] passes over
/// the list.
pub async fn fetch_from_servers(
    servers: &[String],
    connect: &ConnectOptions,
    id: &SnapshotId,
    out: &Path,
    compression: Compression,
    mut progress: impl FnMut(u64, u64),
) -> Result<FetchStats, FetchError> {
    let started = Instant::now();
    let mut connect = connect.clone();
    let plan = fleet::plan(servers, &mut connect, id).await?;
    let mut into: Option<(Output, Manifest)> = None;
    let mut backoff = Backoff::new(RETRY_PAUSE, MAX_RETRY_PAUSE);
    let mut last = None;
    for url in plan
        .servers
        .iter()
        .cycle()
        .take(plan.servers.len() * MAX_ROUNDS)
    {
        let attempt = async {
            let remote = Remote::connect_with(url, &connect).await?;
            let theirs = remote.manifest(id).await?;
            let (output, ours) = match &mut into {
                Some((o, m)) => (o, &*m),
                None => {
                    let o = Output::create(out, &theirs)?;
                    let (o, m) = into.insert((o, theirs.clone()));
                    (o, &*m)
                }
            };
            if let Some(what) = fleet::differs(ours, &theirs) {
                return Err(FetchError::Mismatch(fleet::MismatchError {
                    url: url.clone(),
                    snapshot: id.clone(),
                    what,
                }));
            }
            output
                .stream(&remote, ours, compression, &mut progress)
                .await
        };
        match attempt.await {
            Ok(()) => {
                let (output, _) = into.expect("created before streaming");
                return output.finish(started);
            }
            Err(e) if e.is_transient() || matches!(e, FetchError::Mismatch(_)) => {
                let pause = backoff.next_delay();
                tracing::warn!("{e}; going on from the next server in {pause:?}");
                tokio::time::sleep(pause).await;
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Passes over the server list before a fleet fetch gives up.
pub const MAX_ROUNDS: usize = 3;

/// First pause between a fleet fetch's attempts; doubled up to
/// [`MAX_RETRY_PAUSE`], with jitter.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Longest pause between a fleet fetch's attempts.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// The file being written and which pages it has.
struct Output {
    file: File,
    path: PathBuf,
    /// Pages written (or zero, left as holes).
    have: PageBitmap,
    stats: FetchStats,
}

impl Output {
    fn create(out: &Path, manifest: &Manifest) -> Result<Self, FetchError> {
        let write_err = |source| FetchError::Write {
            path: out.to_owned(),
            source,
        };
        let file = File::create(out).map_err(write_err)?;
        file.set_len(manifest.image_size()).map_err(write_err)?;
        Ok(Self {
            file,
            path: out.to_owned(),
            have: PageBitmap::new(manifest.page_count),
            stats: FetchStats {
                pages: manifest.page_count,
                ..Default::default()
            },
        })
    }

    /// Streams the pages not had yet from `remote`, verified against its
    /// manifest (which callers checked is the one in use).
    async fn stream(
        &mut self,
        remote: &Remote,
        manifest: &Manifest,
        compression: Compression,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), FetchError> {
        let id = &manifest.id;
        let write_err = |source| FetchError::Write {
            path: self.path.clone(),
            source,
        };
        let mut stream = remote
            .prefetch(pb::PrefetchRequest {
                snapshot: id.to_string(),
                order: pb::PrefetchOrder::WorkingSetThenRest as i32,
                compression: compression.into(),
                have: self.have.to_bytes().into(),
                ..Default::default()
            })
            .await?;
        let page_bytes = manifest.page_size.bytes();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(RemoteError::rpc("Prefetch"))?;
            self.stats.batches += 1;
            self.stats.wire_bytes += batch.runs.iter().map(|r| r.data.len() as u64).sum::<u64>();
            let batch = decode_batch(batch, manifest)?;
            for run in &batch.runs {
                for (page, data) in run.pages(manifest.page_size) {
                    if !manifest.verify(page, &data) {
                        return Err(FetchError::Corrupt(page));
                    }
                }
                self.file
                    .write_all_at(&run.data, run.range.start().0 * page_bytes)
                    .map_err(write_err)?;
                self.stats.bytes += run.data.len() as u64;
                self.have.set_range(run.range.start().0, run.range.count());
            }
            for z in &batch.zero {
                // The file is sparse already; a zero page the manifest does
                // not call zero would be a server bug worth stopping for.
                if let Some(p) = z.iter().find(|&p| !manifest.is_zero(p)) {
                    return Err(FetchError::Corrupt(p));
                }
                self.stats.zero_pages += z.count();
                self.have.set_range(z.start().0, z.count());
            }
            progress(self.have.count_ones(), manifest.page_count);
        }
        let got = self.have.count_ones();
        if got != manifest.page_count {
            return Err(FetchError::Incomplete {
                got,
                pages: manifest.page_count,
            });
        }
        Ok(())
    }

    fn finish(self, started: Instant) -> Result<FetchStats, FetchError> {
        self.file.sync_all().map_err(|source| FetchError::Write {
            path: self.path.clone(),
            source,
        })?;
        let mut stats = self.stats;
        stats.elapsed = started.elapsed();
        Ok(stats)
    }
}
