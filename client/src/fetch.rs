//! Downloading a whole snapshot into a file, every page verified: a raw
//! memory file again, as `faultline-server import` took it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultline_proto::{Compression, PageIndex, SnapshotId, pb};
use futures::StreamExt;

use crate::remote::{Remote, RemoteError, decode_batch};

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
    let write_err = |source| FetchError::Write {
        path: out.to_owned(),
        source,
    };
    let manifest = remote.manifest(id).await?;
    let file = File::create(out).map_err(write_err)?;
    file.set_len(manifest.image_size()).map_err(write_err)?;
    let mut stream = remote
        .prefetch(pb::PrefetchRequest {
            snapshot: id.to_string(),
            order: pb::PrefetchOrder::WorkingSetThenRest as i32,
            compression: compression.into(),
            ..Default::default()
        })
        .await?;
    let mut stats = FetchStats {
        pages: manifest.page_count,
        ..Default::default()
    };
    let page_bytes = manifest.page_size.bytes();
    let mut done = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(RemoteError::rpc("Prefetch"))?;
        stats.batches += 1;
        stats.wire_bytes += batch.runs.iter().map(|r| r.data.len() as u64).sum::<u64>();
        let batch = decode_batch(batch, &manifest)?;
        for run in &batch.runs {
            for (page, data) in run.pages(manifest.page_size) {
                if !manifest.verify(page, &data) {
                    return Err(FetchError::Corrupt(page));
                }
            }
            file.write_all_at(&run.data, run.range.start().0 * page_bytes)
                .map_err(write_err)?;
            stats.bytes += run.data.len() as u64;
        }
        for z in &batch.zero {
            // The file is sparse already; a zero page the manifest does not
            // call zero would be a server bug worth stopping for.
            if let Some(p) = z.iter().find(|&p| !manifest.is_zero(p)) {
                return Err(FetchError::Corrupt(p));
            }
            stats.zero_pages += z.count();
        }
        done += batch.page_count();
        progress(done, manifest.page_count);
    }
    if done != manifest.page_count {
        return Err(FetchError::Incomplete {
            got: done,
            pages: manifest.page_count,
        });
    }
    file.sync_all().map_err(write_err)?;
    stats.elapsed = started.elapsed();
    Ok(stats)
}
