//! The `faultline.v1.Faultline` gRPC service.
//!
//! Every request is validated here, at the edge, into domain types before it
//! touches the store. Unary RPCs fail with a status; the `Fault` stream
//! answers errors in-band, per request, and stays open.

use std::sync::Arc;
use std::time::Instant;

use faultline_proto::codec::encode_run;
use faultline_proto::{
    Compression, Manifest, PageBitmap, PageIndex, PageRange, SnapshotId, WorkingSetName, pb,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, Right};
use crate::error::Error;
use crate::metrics;
use crate::store::{Snapshot, SnapshotSpec, SnapshotStore};

/// Most page bytes one `ReadPages` call or one `Fault` request may ask for:
/// 4096 pages of 4 KiB, or 8 huge pages. A fault's read-ahead window is far
/// smaller (the pager caps it at 1 MiB); this bounds the memory one request
/// can make the server hold.
pub const MAX_READ_BYTES: u64 = 16 << 20;

/// Most ranges in one `ReadPages` call.
pub const MAX_READ_RANGES: usize = 4096;

/// Page bytes per `Prefetch` batch when the client leaves it to the server.
/// Large enough that per-message costs (HTTP/2 framing, a channel hop, one
/// install call per run on the client) vanish against the copy, small
/// enough to keep a few batches in flight without much memory. Measured with
/// `faultline-bench wire` (docs/protocol.md): 1 MiB and 4 MiB perform the
/// same on loopback; 256 KiB is about 15% slower.
pub const DEFAULT_PREFETCH_BATCH_BYTES: u64 = 1 << 20;

/// Largest `Prefetch` batch a client may ask for.
pub const MAX_PREFETCH_BATCH_BYTES: u64 = 16 << 20;

/// Prefetch batches read ahead of the network per stream. Two keep the
/// reader busy while one is on the wire; more only hold memory.
pub const PREFETCH_QUEUE_DEPTH: usize = 4;

/// The answers of one `Fault` stream, produced as they are polled.
pub type FaultAnswers =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::FaultResponse, Status>> + Send>>;

/// One open `Fault` stream: its requests and what answers them.
struct FaultSession {
    inbound: Streaming<pb::FaultRequest>,
    snapshot: Arc<dyn Snapshot>,
    manifest: Arc<Manifest>,
    codec: Compression,
    _active: metrics::ActiveStream,
}

impl FaultSession {
    /// Answers one request (errors in-band).
    fn answer(&self, msg: pb::FaultRequest) -> pb::FaultResponse {
        let started = Instant::now();
        let (request_id, result) = match msg.kind {
            Some(pb::fault_request::Kind::Pages(p)) => (
                p.request_id,
                serve_fault(&*self.snapshot, &self.manifest, self.codec, p),
            ),
            Some(pb::fault_request::Kind::Open(_)) => (
                0,
                Err(Error::Sequence(
                    "`open` may only be the first message of a Fault stream",
                )),
            ),
            None => (
                0,
                Err(faultline_proto::ProtocolError::Missing("kind").into()),
            ),
        };
        let result = match result {
            Ok((batch, stats)) => {
                count_served("fault", stats);
                pb::fault_response::Result::Pages(batch)
            }
            Err(e) => {
                metrics::request_failed("fault", e.code());
                pb::fault_response::Result::Error(e.to_pb())
            }
        };
        metrics::request_done("fault", started);
        pb::FaultResponse {
            request_id,
            result: Some(result),
        }
    }
}

/// The service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FaultlineService {
    store: Arc<dyn SnapshotStore>,
}

impl FaultlineService {
    /// A service exporting the snapshots of `store`.
    pub fn new(store: Arc<dyn SnapshotStore>) -> Self {
        Self { store }
    }

    /// Opens a snapshot off the async workers (the first open reads its
    /// manifest and digests).
    async fn open(&self, name: String) -> Result<Arc<dyn Snapshot>, Error> {
        let id = SnapshotId::new(name)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.open(&id))
            .await
            .map_err(|_| Error::Unavailable)?
            .map_err(Error::from)
    }
}

/// Checks a requested range against the snapshot.
fn check_range(r: pb::PageRange, manifest: &Manifest) -> Result<PageRange, Error> {
    let range = PageRange::try_from(r)?;
    range.check_within(manifest.page_count)?;
    Ok(range)
}

/// Checks the ranges of a read: well formed, not too large in total (checked
/// before the bounds, so an oversized request says so whatever its range),
/// inside the snapshot.
fn check_read(ranges: Vec<pb::PageRange>, manifest: &Manifest) -> Result<Vec<PageRange>, Error> {
    let ranges = ranges
        .into_iter()
        .map(PageRange::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    check_read_size(ranges.iter().map(PageRange::count).sum(), manifest)?;
    for r in &ranges {
        r.check_within(manifest.page_count)?;
    }
    Ok(ranges)
}

/// Checks the page bytes asked for against [`MAX_READ_BYTES`].
fn check_read_size(pages: u64, manifest: &Manifest) -> Result<(), Error> {
    let bytes = pages.saturating_mul(manifest.page_size.bytes());
    if bytes > MAX_READ_BYTES {
        return Err(Error::TooLarge {
            what: "bytes of pages in one request",
            got: bytes,
            limit: MAX_READ_BYTES,
        });
    }
    Ok(())
}

/// Counts of what a batch holds, for metrics.
#[derive(Default, Clone, Copy, Debug)]
struct BatchStats {
    pages: u64,
    zero_pages: u64,
    bytes: u64,
    wire_bytes: u64,
}

/// Builds batches: splits ranges into runs of non-zero pages (read from the
/// snapshot, compressed where asked and useful) and ranges of zero pages
/// (flagged, not read).
struct BatchBuilder<'a> {
    snapshot: &'a dyn Snapshot,
    manifest: &'a Manifest,
    codec: Compression,
    batch: pb::PageBatch,
    stats: BatchStats,
}

impl<'a> BatchBuilder<'a> {
    fn new(snapshot: &'a dyn Snapshot, manifest: &'a Manifest, codec: Compression) -> Self {
        Self {
            snapshot,
            manifest,
            codec,
            batch: pb::PageBatch::default(),
            stats: BatchStats::default(),
        }
    }

    /// Adds every page of `range`.
    fn add(&mut self, range: PageRange) {
        let mut start = range.start().0;
        while start < range.end() {
            let zero = self.manifest.zero_map.get(start);
            let mut end = start + 1;
            while end < range.end() && self.manifest.zero_map.get(end) == zero {
                end += 1;
            }
            let part = PageRange::new(PageIndex(start), end - start).expect("non-empty");
            self.stats.pages += part.count();
            if zero {
                self.stats.zero_pages += part.count();
                self.batch.zero.push(part.into());
            } else {
                let data = self.snapshot.read(part);
                self.stats.bytes += data.len() as u64;
                let run = encode_run(part.start(), part.count(), data, self.codec);
                self.stats.wire_bytes += run.data.len() as u64;
                self.batch.runs.push(run);
            }
            start = end;
        }
    }

    /// Page bytes added so far (zero pages count nothing).
    fn bytes(&self) -> u64 {
        self.stats.bytes
    }

    fn is_empty(&self) -> bool {
        self.stats.pages == 0
    }

    fn finish(self) -> (pb::PageBatch, BatchStats) {
        (self.batch, self.stats)
    }
}

/// Records a served batch.
fn count_served(rpc: &'static str, stats: BatchStats) {
    metrics::pages_served(
        rpc,
        stats.pages,
        stats.zero_pages,
        stats.bytes,
        stats.wire_bytes,
    );
}

/// Answers one `Fault` request.
fn serve_fault(
    snapshot: &dyn Snapshot,
    manifest: &Manifest,
    codec: Compression,
    req: pb::FaultPages,
) -> Result<(pb::PageBatch, BatchStats), Error> {
    let range = req
        .range
        .ok_or(faultline_proto::ProtocolError::Missing("range"))?;
    let mut builder = BatchBuilder::new(snapshot, manifest, codec);
    for range in check_read(vec![range], manifest)? {
        builder.add(range);
    }
    Ok(builder.finish())
}

/// What a validated `Prefetch` asks for.
struct PrefetchPlan {
    snapshot: Arc<dyn Snapshot>,
    manifest: Arc<Manifest>,
    /// Pages not to send: what the client has, and then what was sent.
    skip: PageBitmap,
    /// A working set to send first, if any.
    first: Option<Arc<Vec<PageIndex>>>,
    /// Explicit ranges, in order.
    ranges: Vec<PageRange>,
    /// Then every page, ascending.
    then_all: bool,
    codec: Compression,
    batch_bytes: u64,
}

impl PrefetchPlan {
    /// Streams batches into `tx` until done or the client goes away. Runs on
    /// a blocking thread: it reads (and possibly compresses) every page.
    fn run(self, tx: mpsc::Sender<Result<pb::PageBatch, Status>>) {
        let Self {
            snapshot,
            manifest,
            mut skip,
            first,
            ranges,
            then_all,
            codec,
            batch_bytes,
        } = self;
        let page_bytes = manifest.page_size.bytes();
        let all = if then_all {
            0..manifest.page_count
        } else {
            0..0
        };
        let order = first
            .iter()
            .flat_map(|ws| ws.iter().copied())
            .chain(ranges.iter().flat_map(PageRange::iter))
            .chain(all.map(PageIndex));
        let new_builder = || BatchBuilder::new(&*snapshot, &manifest, codec);
        let mut builder = new_builder();
        // Consecutive pages not yet added to the builder.
        let mut run: Option<PageRange> = None;
        for page in order {
            if skip.get(page.0) {
                continue;
            }
            skip.set(page.0);
            run = match run {
                Some(r) if r.end() == page.0 => PageRange::new(r.start(), r.count() + 1),
                pending => {
                    if let Some(r) = pending {
                        builder.add(r);
                    }
                    PageRange::new(page, 1)
                }
            };
            // Zero pages count as full pages here, which bounds the pages
            // (and runs) of a batch as well as its bytes.
            let pending = run.map_or(0, |r| r.count() * page_bytes);
            if builder.bytes() + pending >= batch_bytes {
                if let Some(r) = run.take() {
                    builder.add(r);
                }
                let (batch, stats) = std::mem::replace(&mut builder, new_builder()).finish();
                count_served("prefetch", stats);
                if tx.blocking_send(Ok(batch)).is_err() {
                    return;
                }
            }
        }
        if let Some(r) = run {
            builder.add(r);
        }
        if !builder.is_empty() {
            let (batch, stats) = builder.finish();
            count_served("prefetch", stats);
            let _ = tx.blocking_send(Ok(batch));
        }
    }
}

#[tonic::async_trait]
impl pb::faultline_server::Faultline for FaultlineService {
    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let _t = metrics::Request::start("list_snapshots");
        let access = Access::of(&req)?;
        let store = self.store.clone();
        let list = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|_| Error::Unavailable)?
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: list
                .into_iter()
                .filter(|s| access.allows(Right::Read, s.name.as_str()))
                .map(Into::into)
                .collect(),
        }))
    }

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::Manifest>, Status> {
        let t = metrics::Request::start("get_manifest");
        let access = Access::of(&req).map_err(|e| t.fail(e.into()))?;
        let name = req.into_inner().snapshot;
        access
            .check(Right::Read, &name)
            .map_err(|e| t.fail(e.into()))?;
        let snapshot = self.open(name).await.map_err(|e| t.fail(e))?;
        Ok(Response::new(pb::Manifest::from(&*snapshot.manifest())))
    }

    async fn read_pages(
        &self,
        req: Request<pb::ReadPagesRequest>,
    ) -> Result<Response<pb::PageBatch>, Status> {
        let t = metrics::Request::start("read_pages");
        let access = Access::of(&req);
        let req = req.into_inner();
        let result = async {
            access?.check(Right::Read, &req.snapshot)?;
            let codec = Compression::try_from(req.compression)?;
            if req.ranges.len() > MAX_READ_RANGES {
                return Err(Error::TooLarge {
                    what: "ranges in one ReadPages call",
                    got: req.ranges.len() as u64,
                    limit: MAX_READ_RANGES as u64,
                });
            }
            if req.ranges.is_empty() {
                return Err(faultline_proto::ProtocolError::Missing("ranges").into());
            }
            let snapshot = self.open(req.snapshot).await?;
            let manifest = snapshot.manifest();
            let ranges = check_read(req.ranges, &manifest)?;
            let mut builder = BatchBuilder::new(&*snapshot, &manifest, codec);
            for r in ranges {
                builder.add(r);
            }
            Ok(builder.finish())
        }
        .await;
        let (batch, stats) = result.map_err(|e| t.fail(e))?;
        count_served("read_pages", stats);
        Ok(Response::new(batch))
    }

    type FaultStream = FaultAnswers;

    async fn fault(
        &self,
        req: Request<Streaming<pb::FaultRequest>>,
    ) -> Result<Response<Self::FaultStream>, Status> {
        let t = metrics::Request::start("fault_open");
        let access = Access::of(&req);
        let mut inbound = req.into_inner();
        let opened = async {
            let first = inbound
                .message()
                .await
                .map_err(|_| Error::Sequence("the stream broke before its `open` message"))?;
            let Some(pb::FaultRequest {
                kind: Some(pb::fault_request::Kind::Open(open)),
            }) = first
            else {
                return Err(Error::Sequence(
                    "the first message of a Fault stream must be `open`",
                ));
            };
            access?.check(Right::Read, &open.snapshot)?;
            let codec = Compression::try_from(open.compression)?;
            Ok((self.open(open.snapshot).await?, codec))
        }
        .await;
        let (snapshot, codec) = opened.map_err(|e| t.fail(e))?;
        drop(t);

        // The answers are produced by the response stream itself, as hyper
        // polls it for the next message: no task of our own, no channel.
        // A spawned task feeding a channel cost a task wake and a channel
        // wake per request; removing them measured no latency change on a
        // loaded 2-core machine (docs/profile-notes.md), but it is simpler.
        // The next request is read only once the previous answer is handed
        // to HTTP/2, whose flow control holds back a client that does not
        // read.
        let state = FaultSession {
            inbound,
            manifest: snapshot.manifest(),
            snapshot,
            codec,
            _active: metrics::ActiveStream::new("fault"),
        };
        let answers = futures::stream::unfold(state, |mut st| async move {
            // A broken inbound stream ends the answers, as the client has gone.
            let Some(Ok(msg)) = st.inbound.next().await else {
                return None;
            };
            let resp = st.answer(msg);
            Some((Ok(resp), st))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    type PrefetchStream = ReceiverStream<Result<pb::PageBatch, Status>>;

    async fn prefetch(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> Result<Response<Self::PrefetchStream>, Status> {
        let t = metrics::Request::start("prefetch");
        let access = Access::of(&req);
        let req = req.into_inner();
        let plan = async {
            access?.check(Right::Read, &req.snapshot)?;
            let codec = Compression::try_from(req.compression)?;
            let order = pb::PrefetchOrder::try_from(req.order).map_err(|_| {
                faultline_proto::ProtocolError::invalid(
                    "order",
                    format!("{} is not a known prefetch order", req.order),
                )
            })?;
            let ws_name = WorkingSetName::from_wire(&req.working_set)?;
            let snapshot = self.open(req.snapshot).await?;
            let manifest = snapshot.manifest();
            let skip = if req.have.is_empty() {
                PageBitmap::new(manifest.page_count)
            } else {
                PageBitmap::from_bytes("have", &req.have, manifest.page_count)?
            };
            let ranges = req
                .ranges
                .into_iter()
                .map(|r| check_range(r, &manifest))
                .collect::<Result<Vec<_>, _>>()?;
            let ws = snapshot.working_set(&ws_name);
            let (first, ranges, then_all) = match order {
                pb::PrefetchOrder::WorkingSetThenRest => (ws, Vec::new(), true),
                pb::PrefetchOrder::WorkingSetOnly => {
                    if ws.is_none() {
                        return Err(Error::NoWorkingSet {
                            snapshot: manifest.id.clone(),
                            name: ws_name,
                        });
                    }
                    (ws, Vec::new(), false)
                }
                pb::PrefetchOrder::Ranges => {
                    if ranges.is_empty() {
                        return Err(faultline_proto::ProtocolError::Missing("ranges").into());
                    }
                    (None, ranges, false)
                }
            };
            let batch_bytes = match req.max_batch_bytes {
                0 => DEFAULT_PREFETCH_BATCH_BYTES,
                n => n.clamp(manifest.page_size.bytes(), MAX_PREFETCH_BATCH_BYTES),
            };
            Ok(PrefetchPlan {
                snapshot,
                manifest,
                skip,
                first,
                ranges,
                then_all,
                codec,
                batch_bytes,
            })
        }
        .await
        .map_err(|e| t.fail(e))?;
        drop(t);

        let (tx, rx) = mpsc::channel(PREFETCH_QUEUE_DEPTH);
        tokio::task::spawn_blocking(move || {
            let _active = metrics::ActiveStream::new("prefetch");
            plan.run(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn record_working_set(
        &self,
        req: Request<pb::RecordWorkingSetRequest>,
    ) -> Result<Response<pb::RecordWorkingSetResponse>, Status> {
        let t = metrics::Request::start("record_working_set");
        let access = Access::of(&req);
        let req = req.into_inner();
        let result = async {
            access?.check(Right::Record, &req.snapshot)?;
            let id = SnapshotId::new(req.snapshot)?;
            let name = WorkingSetName::from_wire(&req.name)?;
            let ranges = req
                .ranges
                .into_iter()
                .map(PageRange::try_from)
                .collect::<Result<Vec<_>, _>>()?;
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.record_working_set(&id, &name, &ranges))
                .await
                .map_err(|_| Error::Unavailable)?
                .map_err(Error::from)
        }
        .await;
        let pages = result.map_err(|e| t.fail(e))?;
        Ok(Response::new(pb::RecordWorkingSetResponse { pages }))
    }

    async fn create_snapshot(
        &self,
        req: Request<Streaming<pb::CreateSnapshotRequest>>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let t = metrics::Request::start("create_snapshot");
        let access = Access::of(&req);
        let mut inbound = req.into_inner();
        let store = self.store.clone();
        let result = async move {
            let header = match inbound.message().await {
                Ok(Some(pb::CreateSnapshotRequest {
                    kind: Some(pb::create_snapshot_request::Kind::Header(h)),
                })) => h,
                Ok(_) => {
                    return Err(Error::Sequence(
                        "the first message of CreateSnapshot must be the `header`",
                    ));
                }
                Err(status) => {
                    return Err(Error::from_stream(
                        &status,
                        "the upload broke off before its header",
                    ));
                }
            };
            access?.check(Right::Write, &header.name)?;
            let spec = SnapshotSpec::try_from(header)?;
            let mut writer = blocking(move || store.create(spec).map_err(Error::from)).await?;
            loop {
                let chunk = match inbound.message().await {
                    Ok(Some(pb::CreateSnapshotRequest {
                        kind: Some(pb::create_snapshot_request::Kind::Chunk(c)),
                    })) => c,
                    Ok(None) => break,
                    Ok(Some(_)) => {
                        return Err(Error::Sequence(
                            "every message of CreateSnapshot after the header must be a `chunk`",
                        ));
                    }
                    // The client went away: the writer is dropped, and with it
                    // the partial snapshot.
                    Err(status) => {
                        return Err(Error::from_stream(
                            &status,
                            "the upload broke off; nothing was kept",
                        ));
                    }
                };
                writer = blocking(move || {
                    writer.write_at(chunk.offset, &chunk.data)?;
                    Ok(writer)
                })
                .await?;
            }
            blocking(move || writer.finish().map_err(Error::from)).await
        }
        .await;
        let summary = result.map_err(|e| t.fail(e))?;
        tracing::info!(snapshot = %summary.name, pages = summary.page_count, "snapshot uploaded");
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(summary.into()),
        }))
    }
}

/// Runs store I/O on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Unavailable)?
}
