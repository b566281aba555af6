//! Where a far-memory region's pages live when they are not resident: a [`FarStore`].
//!
//! [`RemoteStore`] is a volume on a faultline server: pages fetched with `ReadPages` (each
//! verified against the digest of what this client last wrote, or the volume's manifest for a
//! page it never wrote) and written back on one `WritePages` stream whose acknowledgements say
//! the pages are durable on the server. [`FileStore`] is a local file, synced before a write
//! returns: the same contract on one host, without a server.
//!
//! Calls are blocking: the far-memory pager calls them from its fault thread and from
//! `flush`, never from an async task.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use faultline_proto::backoff::Backoff;
use faultline_proto::codec::{PageBatch, encode_run};
use faultline_proto::model::DigestAlgorithm;
use faultline_proto::{Compression, PageIndex, SnapshotId, pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::pager::DEFAULT_DEADLINE;
use crate::remote::{ConnectOptions, Remote, RemoteError};

/// Runs in flight on the write-back stream's channel before `send` waits: a flush of many
/// runs then streams them without waiting for each ack, and a stalled server still bounds
/// what the client buffers.
const WRITE_QUEUE: usize = 64;

/// Pause bounds between retries of a failed read or write-back (the pager's backoff).
const RETRY_INITIAL: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Where a far-memory region's pages are kept.
pub trait FarStore: Send + Sync + fmt::Debug {
    /// Bytes per page.
    fn page_size(&self) -> u64;
    /// Pages the store holds.
    fn page_count(&self) -> u64;
    /// Reads `page` into `out` (one page): the newest bytes written to it, zeros if never.
    fn read(&self, page: u64, out: &mut [u8]) -> Result<(), StoreError>;
    /// Reads the consecutive pages from `start` into `out` (whole pages): the far pager's
    /// read-ahead, one call for a run. The default reads them one by one.
    fn read_run(&self, start: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let ps = self.page_size() as usize;
        for (i, page) in out.chunks_mut(ps).enumerate() {
            self.read(start + i as u64, page)?;
        }
        Ok(())
    }
    /// Writes runs of consecutive pages (first page, their bytes) and returns only once every
    /// one of them is durable: after this, dropping the pages locally loses nothing.
    fn write(&self, runs: &[(u64, &[u8])]) -> Result<(), StoreError>;
}

/// A far-memory store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connecting, or fetching the volume's manifest.
    #[error("cannot open volume {volume}: {source}")]
    Open {
        /// The volume.
        volume: String,
        /// Why.
        source: RemoteError,
    },
    /// The volume does not have the shape the region needs.
    #[error("volume {volume} holds {pages} pages of {page_size} bytes; {wanted}")]
    Shape {
        /// The volume.
        volume: String,
        /// Its pages.
        pages: u64,
        /// Its page size.
        page_size: u64,
        /// What was wanted instead.
        wanted: String,
    },
    /// A read failed.
    #[error("reading page {page} failed: {source}")]
    Read {
        /// The page.
        page: u64,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A fetched page is not what was written.
    #[error(
        "page {page} from the server does not match the digest of what was written to it; the \
         volume on the server is corrupt"
    )]
    Corrupt {
        /// The page.
        page: u64,
    },
    /// A write-back failed; nothing of it may be taken as durable.
    #[error("writing back {pages} pages from page {start} failed: {source}")]
    Write {
        /// First page of the first run.
        start: u64,
        /// Pages in all the runs.
        pages: u64,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The local file.
    #[error("the far-memory file: {0}")]
    File(#[from] std::io::Error),
}

impl StoreError {
    /// Whether retrying may help (the server restarting, a broken connection).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Read { source, .. } | Self::Write { source, .. } => source
                .downcast_ref::<RemoteError>()
                .is_some_and(RemoteError::is_transient),
            _ => false,
        }
    }
}

/// A far-memory store in a local file (sparse: pages never written are holes, and read as
/// zeros), each write synced before it returns.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    page_size: u64,
    page_count: u64,
}

impl FileStore {
    /// Creates (or truncates) `path` to hold `page_count` pages of `page_size` bytes.
    pub fn create(path: &Path, page_size: u64, page_count: u64) -> Result<Self, StoreError> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(page_size * page_count)?;
        Ok(Self {
            file,
            page_size,
            page_count,
        })
    }
}

impl FarStore for FileStore {
    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn page_count(&self) -> u64 {
        self.page_count
    }

    fn read(&self, page: u64, out: &mut [u8]) -> Result<(), StoreError> {
        self.file
            .read_exact_at(out, page * self.page_size)
            .map_err(|e| StoreError::Read {
                page,
                source: e.into(),
            })
    }

    fn read_run(&self, start: u64, out: &mut [u8]) -> Result<(), StoreError> {
        self.read(start, out)
    }

    fn write(&self, runs: &[(u64, &[u8])]) -> Result<(), StoreError> {
        let fail = |e: std::io::Error| StoreError::Write {
            start: runs.first().map_or(0, |r| r.0),
            pages: runs.iter().map(|r| r.1.len() as u64).sum::<u64>() / self.page_size,
            source: e.into(),
        };
        for (start, data) in runs {
            self.file
                .write_all_at(data, start * self.page_size)
                .map_err(fail)?;
        }
        self.file.sync_data().map_err(fail)
    }
}

/// What a reader must find in each page: the digest of its bytes, or "zero".
#[derive(Debug)]
struct Expected {
    digests: Vec<u32>,
    zero: Vec<bool>,
}

/// The open `WritePages` stream.
#[derive(Debug)]
struct Writer {
    tx: mpsc::Sender<pb::WritePagesRequest>,
    acks: tonic::Streaming<pb::WritePagesResponse>,
    next_id: u64,
}

/// A volume on a faultline server (see the module's documentation).
#[derive(Debug)]
pub struct RemoteStore {
    runtime: tokio::runtime::Runtime,
    remote: Remote,
    volume: SnapshotId,
    page_size: u64,
    page_count: u64,
    algorithm: DigestAlgorithm,
    expected: Mutex<Expected>,
    writer: Mutex<Option<Writer>>,
    /// How long a read or write-back keeps retrying a server that is down.
    deadline: Duration,
}

impl RemoteStore {
    /// Connects to the server at `url` and opens `volume` (its manifest: size, page size and
    /// the digests of its pages).
    pub fn open(url: &str, opts: &ConnectOptions, volume: SnapshotId) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            volume: volume.to_string(),
            source,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("faultline-far-store")
            .build()
            .map_err(StoreError::File)?;
        let (remote, manifest) = runtime.block_on(async {
            let remote = Remote::connect_with(url, opts).await.map_err(open_err)?;
            let manifest = remote.manifest(&volume).await.map_err(open_err)?;
            Ok::<_, StoreError>((remote, manifest))
        })?;
        let zero = (0..manifest.page_count)
            .map(|p| manifest.is_zero(PageIndex(p)))
            .collect();
        Ok(Self {
            runtime,
            remote,
            page_size: manifest.page_size.bytes(),
            page_count: manifest.page_count,
            algorithm: manifest.digest_algorithm,
            expected: Mutex::new(Expected {
                digests: manifest.digests,
                zero,
            }),
            writer: Mutex::new(None),
            volume,
            deadline: DEFAULT_DEADLINE,
        })
    }

    /// The volume.
    pub fn volume(&self) -> &SnapshotId {
        &self.volume
    }

    /// Retries `f` while its error is transient, for at most the deadline.
    fn retrying<T>(&self, mut f: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        loop {
            match f() {
                Err(e) if e.is_transient() && started.elapsed() < self.deadline => {
                    tracing::warn!("far-memory store: {e}; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
                other => return other,
            }
        }
    }

    /// Reads the pages from `page` into `out` (whole pages) with one `ReadPages` call,
    /// checking each against what it must hold.
    fn read_once(&self, page: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let ps = self.page_size as usize;
        let count = (out.len() / ps) as u64;
        let fail = |source: RemoteError| StoreError::Read {
            page,
            source: source.into(),
        };
        let batch = self.runtime.block_on(async {
            self.remote
                .client()
                .read_pages(pb::ReadPagesRequest {
                    snapshot: self.volume.to_string(),
                    ranges: vec![pb::PageRange { start: page, count }],
                    compression: Compression::None.into(),
                })
                .await
                .map_err(RemoteError::rpc("ReadPages"))
        });
        let batch = batch.map_err(fail)?.into_inner();
        let page_size = faultline_proto::PageSize::try_from(self.page_size).map_err(|source| {
            fail(RemoteError::Protocol {
                what: "page size",
                source,
            })
        })?;
        let batch = PageBatch::decode(batch, page_size, self.page_count).map_err(|source| {
            fail(RemoteError::Protocol {
                what: "page batch",
                source,
            })
        })?;
        let expected = self.expected.lock().unwrap_or_else(|e| e.into_inner());
        for (i, out) in out.chunks_mut(ps).enumerate() {
            let page = page + i as u64;
            let idx = page as usize;
            if batch.zero.iter().any(|z| holds(z, page)) {
                if !expected.zero[idx] {
                    return Err(StoreError::Corrupt { page });
                }
                out.fill(0);
                continue;
            }
            let run = batch
                .runs
                .iter()
                .find(|r| holds(&r.range, page))
                .ok_or_else(|| StoreError::Read {
                    page,
                    source: "the server's answer does not hold the page".into(),
                })?;
            let at = (page - run.range.start().0) as usize * ps;
            let data = &run.data[at..at + ps];
            let zero_ok = expected.zero[idx] && data.iter().all(|&b| b == 0);
            if !zero_ok && self.algorithm.digest(data) != expected.digests[idx] {
                return Err(StoreError::Corrupt { page });
            }
            out.copy_from_slice(data);
        }
        Ok(())
    }

    fn write_once(&self, runs: &[(u64, &[u8])]) -> Result<(), StoreError> {
        let pages = runs.iter().map(|r| r.1.len() as u64).sum::<u64>() / self.page_size;
        let fail = |source: RemoteError| StoreError::Write {
            start: runs.first().map_or(0, |r| r.0),
            pages,
            source: source.into(),
        };
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.runtime.block_on(async {
            if writer.is_none() {
                *writer = Some(self.open_writer().await?);
            }
            let w = writer.as_mut().expect("opened above");
            let first = w.next_id;
            for (start, data) in runs {
                let id = w.next_id;
                w.next_id += 1;
                let count = data.len() as u64 / self.page_size;
                let run = encode_run(
                    PageIndex(*start),
                    count,
                    Bytes::copy_from_slice(data),
                    Compression::None,
                );
                let req = pb::WritePagesRequest {
                    kind: Some(pb::write_pages_request::Kind::Run(pb::WriteRun {
                        request_id: id,
                        pages: Some(run),
                    })),
                };
                if w.tx.send(req).await.is_err() {
                    return Err(RemoteError::Rpc {
                        call: "WritePages",
                        status: tonic::Status::unavailable("the write-back stream closed"),
                    });
                }
            }
            // Acks come in request order: one per run.
            for want in first..w.next_id {
                let answer = w
                    .acks
                    .message()
                    .await
                    .map_err(RemoteError::rpc("WritePages"))?
                    .ok_or_else(|| RemoteError::Rpc {
                        call: "WritePages",
                        status: tonic::Status::unavailable("the server ended the stream"),
                    })?;
                match answer.result {
                    Some(pb::write_pages_response::Result::Ack(_)) if answer.request_id == want => {
                    }
                    Some(pb::write_pages_response::Result::Error(e)) => {
                        return Err(RemoteError::Rpc {
                            call: "WritePages",
                            status: tonic::Status::new(tonic::Code::from(e.code), e.message),
                        });
                    }
                    _ => {
                        return Err(RemoteError::Protocol {
                            what: "write acknowledgement",
                            source: faultline_proto::ProtocolError::invalid(
                                "request_id",
                                format!("expected an ack of {want}, got {}", answer.request_id),
                            ),
                        });
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            // The stream's state is unknown: the next write opens a new one and re-sends.
            *writer = None;
            return Err(fail(e));
        }
        let mut expected = self.expected.lock().unwrap_or_else(|e| e.into_inner());
        for (start, data) in runs {
            for (i, page) in data.chunks(self.page_size as usize).enumerate() {
                let idx = *start as usize + i;
                expected.digests[idx] = self.algorithm.digest(page);
                expected.zero[idx] = page.iter().all(|&b| b == 0);
            }
        }
        Ok(())
    }

    async fn open_writer(&self) -> Result<Writer, RemoteError> {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let open = pb::WritePagesRequest {
            kind: Some(pb::write_pages_request::Kind::Open(pb::WriteOpen {
                volume: self.volume.to_string(),
            })),
        };
        tx.send(open).await.map_err(|_| RemoteError::Rpc {
            call: "WritePages",
            status: tonic::Status::internal("the write-back channel closed"),
        })?;
        let acks = self
            .remote
            .client()
            .write_pages(ReceiverStream::new(rx))
            .await
            .map_err(RemoteError::rpc("WritePages"))?
            .into_inner();
        Ok(Writer {
            tx,
            acks,
            next_id: 0,
        })
    }
}

/// Whether `range` holds `page`.
fn holds(range: &faultline_proto::PageRange, page: u64) -> bool {
    (range.start().0..range.start().0 + range.count()).contains(&page)
}

impl FarStore for RemoteStore {
    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn page_count(&self) -> u64 {
        self.page_count
    }

    fn read(&self, page: u64, out: &mut [u8]) -> Result<(), StoreError> {
        self.retrying(|| self.read_once(page, out))
    }

    fn read_run(&self, start: u64, out: &mut [u8]) -> Result<(), StoreError> {
        self.retrying(|| self.read_once(start, out))
    }

    fn write(&self, runs: &[(u64, &[u8])]) -> Result<(), StoreError> {
        self.retrying(|| self.write_once(runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file store reads zeros where nothing was written and the newest bytes elsewhere.
    #[test]
    fn file_store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::create(&dir.path().join("far"), 4096, 4).unwrap();
        let mut page = vec![1u8; 4096];
        s.read(2, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        let a = vec![7u8; 8192];
        s.write(&[(1, &a)]).unwrap();
        s.read(2, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 7));
    }
}
