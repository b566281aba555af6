//! The `faultline.v1.Faultline` gRPC service.
//!
//! Every request is validated here, at the edge, into domain types before it
//! touches the store, and checked against the server's [`Limits`]. Unary
//! RPCs fail with a status; the `Fault` stream answers errors in-band, per
//! request, and stays open, except for a message that cannot be read at all
//! (it does not decode, or is over the size limit), which ends the stream
//! with that error's status: a broken stream never ends with OK.
//!
//! No request holds a thread while it waits: store reads are async (cold
//! reads on blocking threads inside the store), compression runs on
//! blocking threads, and a stream whose reader stalls is parked on its
//! bounded queue. A stream whose client has gone is dropped by the
//! transport, which aborts its producer at its next await point; long scans
//! yield every [`SCAN_YIELD_PAGES`] pages so that there is one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use faultline_proto::codec::encode_run;
use faultline_proto::{
    Compression, CreateVolume, Manifest, PageBitmap, PageIndex, PageRange, SealVolume, SnapshotId,
    VolumeSource, WorkingSetName, WriteRun, pb,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, Right};
use crate::error::Error;
use crate::limits::Limits;
use crate::metrics;
use crate::store::{Snapshot, SnapshotSpec, SnapshotStore, Volume, WorkingSetPages};

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

/// Pages a prefetch scan looks at between yields to the runtime: a scan
/// over pages the client has sends nothing, so without yields it would
/// neither share its worker nor notice that its client has gone. 64 Ki
/// pages take well under a millisecond.
pub const SCAN_YIELD_PAGES: u64 = 1 << 16;

/// The answers of one `Fault` stream, produced as they are polled.
pub type FaultAnswers =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::FaultResponse, Status>> + Send>>;

/// The batches of one `Prefetch` stream.
pub type PrefetchBatches =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::PageBatch, Status>> + Send>>;

/// Who is asking, for per-client limits: the [`crate::auth::Identity`] the
/// authentication layer put in the request's extensions (a token), else the
/// peer's IP address (one client per host).
pub fn client_identity<T>(req: &Request<T>) -> String {
    crate::auth::identity(req).to_string()
}

/// One open `Fault` stream: what answers its requests.
pub(crate) struct FaultSession {
    snapshot: Arc<dyn Snapshot>,
    manifest: Arc<Manifest>,
    codec: Compression,
    counters: metrics::FaultCounters,
    _active: metrics::ActiveStream,
}

impl FaultSession {
    /// Answers one request (errors in-band).
    pub(crate) async fn answer(&self, msg: pb::FaultRequest) -> pb::FaultResponse {
        let started = Instant::now();
        let (request_id, result) = match msg.kind {
            Some(pb::fault_request::Kind::Pages(p)) => (
                p.request_id,
                serve_fault(&*self.snapshot, &self.manifest, self.codec, p).await,
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
                self.counters
                    .served(stats.pages, stats.zero_pages, stats.bytes, stats.wire_bytes);
                pb::fault_response::Result::Pages(batch)
            }
            Err(e) => {
                metrics::request_failed("fault", &e);
                pb::fault_response::Result::Error(e.to_pb())
            }
        };
        self.counters.done(started);
        pb::FaultResponse {
            request_id,
            result: Some(result),
        }
    }
}

/// Counts streams open at once, server-wide and per client.
#[derive(Debug)]
struct StreamSlots {
    total_limit: usize,
    per_client_limit: usize,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    total: usize,
    per_client: HashMap<String, usize>,
}

/// One taken slot; given back when dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<StreamSlots>,
    client: String,
}

impl StreamSlots {
    fn new(total_limit: usize, per_client_limit: usize) -> Arc<Self> {
        Arc::new(Self {
            total_limit,
            per_client_limit,
            state: Mutex::new(SlotState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().expect("slot lock poisoned")
    }

    /// Takes a slot for `client`, or says which limit is reached.
    fn take(self: &Arc<Self>, client: String) -> Result<Slot, Error> {
        let mut st = self.lock();
        if st.total >= self.total_limit {
            return Err(Error::Busy {
                what: "Prefetch streams on this server",
                limit: self.total_limit,
                flag: "max-prefetch-streams",
                reason: "prefetch_streams",
            });
        }
        let mine = st.per_client.entry(client.clone()).or_default();
        if *mine >= self.per_client_limit {
            return Err(Error::Busy {
                what: "Prefetch streams of this client",
                limit: self.per_client_limit,
                flag: "max-prefetch-streams-per-client",
                reason: "prefetch_streams_per_client",
            });
        }
        *mine += 1;
        st.total += 1;
        metrics::limit_use("max_prefetch_streams", st.total as u64);
        Ok(Slot {
            slots: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.slots.lock();
        st.total -= 1;
        if let Some(n) = st.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                st.per_client.remove(&self.client);
            }
        }
        metrics::limit_use("max_prefetch_streams", st.total as u64);
    }
}

/// The service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FaultlineService {
    store: Arc<dyn SnapshotStore>,
    limits: Arc<Limits>,
    prefetch_slots: Arc<StreamSlots>,
}

impl FaultlineService {
    /// A service exporting the snapshots of `store`, with the default
    /// [`Limits`].
    pub fn new(store: Arc<dyn SnapshotStore>) -> Self {
        Self::with_limits(store, Limits::default())
    }

    /// A service exporting the snapshots of `store` within `limits`. (The
    /// limits a store enforces itself, such as the free-disk reserve, are
    /// given to the store when it is opened.)
    pub fn with_limits(store: Arc<dyn SnapshotStore>, limits: Limits) -> Self {
        metrics::register_limits(&limits);
        Self {
            store,
            prefetch_slots: StreamSlots::new(
                limits.max_prefetch_streams,
                limits.max_prefetch_streams_per_client,
            ),
            limits: Arc::new(limits),
        }
    }

    /// The limits it serves within.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts the store's snapshots into the snapshots gauge.
    pub async fn count_snapshots(&self) {
        if let Ok(list) = self.store.list().await {
            metrics::set_snapshots(list.len() as u64);
        }
    }

    /// Opens a snapshot (the store keeps storage I/O off the async workers).
    async fn open(&self, name: String) -> Result<Arc<dyn Snapshot>, Error> {
        let id = SnapshotId::new(name)?;
        Ok(self.store.open(&id).await?)
    }

    /// Opens a `Fault` stream's session for `open`, if `access` allows
    /// reading its snapshot: what both transports do with the stream's first
    /// message (gRPC here, the lean transport in [`crate::lean`]).
    pub(crate) async fn open_fault(
        &self,
        access: Access,
        open: pb::FaultOpen,
    ) -> Result<Arc<FaultSession>, Error> {
        access.check(Right::Read, &open.snapshot)?;
        let codec = Compression::try_from(open.compression)?;
        let snapshot = self.open(open.snapshot).await?;
        Ok(Arc::new(FaultSession {
            manifest: snapshot.manifest(),
            snapshot,
            codec,
            counters: metrics::FaultCounters::new(),
            _active: metrics::ActiveStream::new("fault"),
        }))
    }

    /// Validates a `Prefetch` for `client` with `access`, takes one of its
    /// prefetch slots and plans the stream: what both transports do with
    /// the request (gRPC here, the lean transport in [`crate::lean`]).
    pub(crate) async fn open_prefetch(
        &self,
        access: Access,
        client: String,
        req: pb::PrefetchRequest,
    ) -> Result<PrefetchStart, Error> {
        access.check(Right::Read, &req.snapshot)?;
        let codec = Compression::try_from(req.compression)?;
        let order = pb::PrefetchOrder::try_from(req.order).map_err(|_| {
            faultline_proto::ProtocolError::invalid(
                "order",
                format!("{} is not a known prefetch order", req.order),
            )
        })?;
        if req.ranges.len() > self.limits.max_prefetch_ranges {
            return Err(Error::TooLarge {
                what: "ranges in one Prefetch call (`--max-prefetch-ranges`)",
                got: req.ranges.len() as u64,
                limit: self.limits.max_prefetch_ranges as u64,
            });
        }
        let ws_name = WorkingSetName::from_wire(&req.working_set)?;
        let slot = self.prefetch_slots.take(client)?;
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
        // With its page file, the set is read from there in its order;
        // the order is the one the file was written for.
        let ws_pages = match order {
            pb::PrefetchOrder::Ranges => None,
            _ => snapshot.working_set_pages(&ws_name),
        };
        let ws = match &ws_pages {
            Some(p) => Some(p.order.clone()),
            None => snapshot.working_set(&ws_name),
        };
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
        let plan = PrefetchPlan {
            snapshot,
            manifest,
            skip,
            first,
            ws_pages,
            ranges,
            then_all,
            codec,
            batch_bytes,
        };
        Ok(PrefetchStart { plan, slot })
    }

    /// Fault requests of one stream answered at once (`--fault-concurrency`).
    pub(crate) fn fault_concurrency(&self) -> usize {
        self.limits.fault_concurrency.max(1)
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
    check_read_size(
        ranges
            .iter()
            .map(PageRange::count)
            .fold(0, u64::saturating_add),
        manifest,
    )?;
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

/// Builds one batch of `ranges`: runs of non-zero pages (read from the
/// snapshot, compressed where asked and useful, on a blocking thread) and
/// ranges of zero pages (flagged, not read).
///
/// The zero map is the snapshot's current one ([`Snapshot::zero_runs`]),
/// not the one a stream started with: a volume's pages change while a stream is open, and a page
/// written since must never be answered as zeros.
async fn build_batch(
    snapshot: &dyn Snapshot,
    codec: Compression,
    ranges: &[PageRange],
) -> Result<(pb::PageBatch, BatchStats), Error> {
    let source = Source {
        snapshot,
        ws_pages: None,
    };
    build_batch_from(
        source,
        codec,
        ranges.iter().copied().zip(std::iter::repeat(None)),
    )
    .await
}

/// Where a batch's pages are read: the snapshot's image, and for ranges
/// given a slot, a working set's page file.
#[derive(Clone, Copy)]
struct Source<'a> {
    snapshot: &'a dyn Snapshot,
    ws_pages: Option<&'a WorkingSetPages>,
}

/// [`build_batch`] of `ranges`, each with the slot of its first non-zero
/// page in `source`'s working-set page file if it is to be read from there
/// (consecutive slots in one read: the file holds the set in order).
async fn build_batch_from(
    source: Source<'_>,
    codec: Compression,
    ranges: impl IntoIterator<Item = (PageRange, Option<u64>)>,
) -> Result<(pb::PageBatch, BatchStats), Error> {
    let snapshot = source.snapshot;
    let mut stats = BatchStats::default();
    let mut zero = Vec::new();
    let mut raw = Vec::new();
    let mut filed: Vec<(PageRange, u64)> = Vec::new();
    for (range, slot) in ranges {
        let mut slot = slot.filter(|_| source.ws_pages.is_some());
        for (part, is_zero) in snapshot.zero_runs(range) {
            stats.pages += part.count();
            if is_zero {
                stats.zero_pages += part.count();
                zero.push(part.into());
            } else if let Some(s) = slot.as_mut() {
                filed.push((part, *s));
                *s += part.count();
            } else {
                let data = snapshot.read(part).await?;
                stats.bytes += data.len() as u64;
                raw.push((part, data));
            }
        }
    }
    if let Some(pages) = source.ws_pages {
        let ps = snapshot.manifest().page_size.bytes();
        let mut i = 0;
        while i < filed.len() {
            let (first, at) = filed[i];
            let mut end = at + first.count();
            let mut j = i + 1;
            while j < filed.len() && filed[j].1 == end {
                end += filed[j].0.count();
                j += 1;
            }
            let data = snapshot
                .read_working_set(pages, at, end - at, first)
                .await?;
            stats.bytes += data.len() as u64;
            for &(part, slot) in &filed[i..j] {
                let from = ((slot - at) * ps) as usize;
                raw.push((part, data.slice(from..from + (part.count() * ps) as usize)));
            }
            i = j;
        }
    }
    let encode = move || {
        raw.into_iter()
            .map(|(r, data)| encode_run(r.start(), r.count(), data, codec))
            .collect::<Vec<_>>()
    };
    let runs = if codec == Compression::None {
        encode()
    } else {
        tokio::task::spawn_blocking(encode)
            .await
            .map_err(|_| Error::Unavailable)?
    };
    stats.wire_bytes = runs.iter().map(|r| r.data.len() as u64).sum();
    Ok((pb::PageBatch { runs, zero }, stats))
}

/// Answers queued on a `WritePages` stream before the server stops reading
/// runs: a few, so that a client's pipeline of write-backs keeps the disk
/// busy, while a client that does not read its acks holds little.
const WRITE_ACKS_QUEUED: usize = 8;

/// The answers of a `WritePages` stream.
pub type WriteAcks =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WritePagesResponse, Status>> + Send>>;

/// Applies one message of a `WritePages` stream; errors in-band.
async fn write_one(volume: &dyn Volume, msg: pb::WritePagesRequest) -> pb::WritePagesResponse {
    let _timer = metrics::Request::start("write_pages");
    let (request_id, result) = match msg.kind {
        Some(pb::write_pages_request::Kind::Run(r)) => {
            let id = r.request_id;
            let result = async {
                // A range past the end is OutOfRange, as on reads.
                if let Some(p) = &r.pages {
                    PageRange::try_from(pb::PageRange {
                        start: p.start,
                        count: p.count,
                    })?
                    .check_within(volume.page_count())?;
                }
                let run = WriteRun::decode(r, volume.page_size(), volume.page_count())?;
                let range = run.run.range;
                volume.write(run.run).await?;
                Ok::<_, Error>(range)
            }
            .await;
            (id, result)
        }
        Some(pb::write_pages_request::Kind::Open(_)) => (
            0,
            Err(Error::Sequence(
                "a WritePages stream is opened once; `open` may only be its first message",
            )),
        ),
        None => (
            0,
            Err(Error::Sequence("a WritePages message without a kind")),
        ),
    };
    pb::WritePagesResponse {
        request_id,
        result: Some(match result {
            Ok(range) => pb::write_pages_response::Result::Ack(pb::WriteAck {
                range: Some(range.into()),
            }),
            Err(e) => {
                metrics::request_failed("write_pages", &e);
                pb::write_pages_response::Result::Error(e.to_pb())
            }
        }),
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
async fn serve_fault(
    snapshot: &dyn Snapshot,
    manifest: &Manifest,
    codec: Compression,
    req: pb::FaultPages,
) -> Result<(pb::PageBatch, BatchStats), Error> {
    let range = req
        .range
        .ok_or(faultline_proto::ProtocolError::Missing("range"))?;
    let ranges = check_read(vec![range], manifest)?;
    build_batch(snapshot, codec, &ranges).await
}

/// What a validated `Prefetch` asks for.
struct PrefetchPlan {
    snapshot: Arc<dyn Snapshot>,
    manifest: Arc<Manifest>,
    /// Pages not to send: what the client has, and then what was sent.
    skip: PageBitmap,
    /// A working set to send first, if any.
    first: Option<Arc<Vec<PageIndex>>>,
    /// Its page file, if the store has one for it (`first` is its order).
    ws_pages: Option<WorkingSetPages>,
    /// Explicit ranges, in order.
    ranges: Vec<PageRange>,
    /// Then every page, ascending.
    then_all: bool,
    codec: Compression,
    batch_bytes: u64,
}

/// A validated `Prefetch` holding its prefetch slot, not started yet.
pub(crate) struct PrefetchStart {
    plan: PrefetchPlan,
    slot: Slot,
}

/// A running prefetch: its batches (or its error, last) as the producer
/// task makes them, a few ahead of the consumer. Dropped, it aborts the
/// producer (the consumer went away).
pub(crate) struct PrefetchProducer {
    rx: mpsc::Receiver<Result<pb::PageBatch, Error>>,
    /// Set by the producer before it closes the channel: a channel closed
    /// without it is a producer that died.
    ended: Arc<AtomicBool>,
    /// The stream has given its last item.
    finished: bool,
    _abort: AbortOnDrop,
}

impl PrefetchProducer {
    /// The next batch; an error is the stream's last item, and a producer
    /// that died ends the stream with [`Error::PrefetchDied`], never as if
    /// it were complete; `None` once it is. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<Result<pb::PageBatch, Error>> {
        if self.finished {
            return None;
        }
        let next = self.rx.recv().await;
        if next.is_none() {
            self.finished = true;
            if !self.ended.load(Ordering::SeqCst) {
                return Some(Err(Error::PrefetchDied));
            }
        }
        next
    }
}

impl PrefetchStart {
    /// Starts the producer task, which holds the slot while it runs.
    pub(crate) fn start(self) -> PrefetchProducer {
        let Self { plan, slot } = self;
        let (tx, rx) = mpsc::channel(PREFETCH_QUEUE_DEPTH);
        let ended = Arc::new(AtomicBool::new(false));
        let producer_ended = ended.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            let _active = metrics::ActiveStream::new("prefetch");
            plan.run(tx, producer_ended).await;
        });
        PrefetchProducer {
            rx,
            ended,
            finished: false,
            _abort: AbortOnDrop(task.abort_handle()),
        }
    }
}

/// The prefetch stream is over: its client went away, or it failed (and
/// the error was sent).
struct Stopped;

/// Collects ranges into batches of at most `batch_pages` pages and sends
/// each when full.
struct Batcher {
    snapshot: Arc<dyn Snapshot>,
    manifest: Arc<Manifest>,
    ws_pages: Option<WorkingSetPages>,
    codec: Compression,
    batch_pages: u64,
    /// Each range with the slot of its first non-zero page in `ws_pages`'
    /// file, if it is read from there.
    pending: Vec<(PageRange, Option<u64>)>,
    pending_pages: u64,
    tx: mpsc::Sender<Result<pb::PageBatch, Error>>,
}

impl Batcher {
    /// Adds `range`, sending batches as they fill; `slot` is where its first
    /// non-zero page is in the working set's page file, to read it there.
    async fn push(&mut self, range: PageRange, mut slot: Option<u64>) -> Result<(), Stopped> {
        let mut start = range.start().0;
        let end = range.end();
        while start < end {
            let room = self.batch_pages - self.pending_pages;
            let take = room.min(end - start);
            self.pending.push((
                PageRange::new(PageIndex(start), take).expect("non-empty"),
                slot,
            ));
            if let Some(s) = slot.as_mut() {
                *s += take - self.manifest.zero_map.count_ones_in(start, start + take);
            }
            self.pending_pages += take;
            start += take;
            if self.pending_pages >= self.batch_pages {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Sends what is pending.
    async fn flush(&mut self) -> Result<(), Stopped> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let ranges = std::mem::take(&mut self.pending);
        self.pending_pages = 0;
        let source = Source {
            snapshot: &*self.snapshot,
            ws_pages: self.ws_pages.as_ref(),
        };
        match build_batch_from(source, self.codec, ranges).await {
            Ok((batch, stats)) => {
                count_served("prefetch", stats);
                self.tx.send(Ok(batch)).await.map_err(|_| Stopped)
            }
            Err(e) => {
                metrics::request_failed("prefetch", &e);
                let _ = self.tx.send(Err(e)).await;
                Err(Stopped)
            }
        }
    }
}

impl PrefetchPlan {
    /// Streams batches into `tx` until done, failed, or aborted (when the
    /// client goes away, the stream and with it this task are dropped).
    /// Sets `ended` before `tx` is dropped, so that a stream that ends
    /// without it (the producer panicked) is reported as broken.
    async fn run(self, tx: mpsc::Sender<Result<pb::PageBatch, Error>>, ended: Arc<AtomicBool>) {
        let _ = self.stream(tx.clone()).await;
        ended.store(true, Ordering::SeqCst);
        drop(tx);
    }

    async fn stream(self, tx: mpsc::Sender<Result<pb::PageBatch, Error>>) -> Result<(), Stopped> {
        let Self {
            snapshot,
            manifest,
            mut skip,
            first,
            ws_pages,
            ranges,
            then_all,
            codec,
            batch_bytes,
        } = self;
        let page_count = manifest.page_count;
        let from_file = ws_pages.is_some();
        let mut out = Batcher {
            batch_pages: (batch_bytes / manifest.page_size.bytes()).max(1),
            snapshot,
            manifest: manifest.clone(),
            ws_pages,
            codec,
            pending: Vec::new(),
            pending_pages: 0,
            tx,
        };
        // The working set, page by page (first-touch order), in runs, each
        // with its slot in the page file (counted over every non-zero page
        // of the order, sent or not).
        let mut scanned = 0u64;
        let mut slot = 0u64;
        let mut run: Option<(PageRange, u64)> = None;
        for &page in first.iter().flat_map(|ws| ws.iter()) {
            scanned += 1;
            if scanned.is_multiple_of(SCAN_YIELD_PAGES) {
                tokio::task::yield_now().await;
            }
            let at = slot;
            if page.0 < page_count && !manifest.zero_map.get(page.0) {
                slot += 1;
            }
            if page.0 >= page_count || skip.get(page.0) {
                continue;
            }
            skip.set(page.0);
            run = match run {
                Some((r, s)) if r.end() == page.0 => Some((
                    PageRange::new(r.start(), r.count() + 1).expect("non-empty"),
                    s,
                )),
                pending => {
                    if let Some((r, s)) = pending {
                        out.push(r, from_file.then_some(s)).await?;
                    }
                    Some((PageRange::new(page, 1).expect("non-empty"), at))
                }
            };
        }
        if let Some((r, s)) = run {
            out.push(r, from_file.then_some(s)).await?;
        }
        // Then ranges, skipping what was sent or is held a word at a time.
        let all = then_all.then(|| PageRange::new(PageIndex(0), page_count).expect("non-empty"));
        for range in ranges.into_iter().chain(all) {
            let mut pos = range.start().0;
            while pos < range.end() {
                let stop = range.end().min(pos.saturating_add(SCAN_YIELD_PAGES));
                let from = skip.next_clear(pos, stop);
                if from >= stop {
                    pos = stop;
                    tokio::task::yield_now().await;
                    continue;
                }
                let to = skip.next_set(from, stop);
                skip.set_range(from, to - from);
                out.push(
                    PageRange::new(PageIndex(from), to - from).expect("non-empty"),
                    None,
                )
                .await?;
                pos = to;
            }
        }
        out.flush().await
    }
}

/// Aborts a task when dropped: the producer of a stream whose consumer is
/// gone.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The `open` message that must come first on a client stream (Fault,
/// WritePages): `open` picks it out of a message, `not_open` is the error
/// when the first message is something else or the stream ends at once.
async fn first_open<M, O>(
    inbound: &mut Streaming<M>,
    not_open: &'static str,
    open: impl FnOnce(M) -> Option<O>,
) -> Result<O, Error> {
    let first = inbound.message().await.map_err(|status| {
        Error::from_stream(&status, "the stream broke before its `open` message")
    })?;
    first.and_then(open).ok_or(Error::Sequence(not_open))
}

/// A status for a request stream that broke: oversized or undecodable
/// messages get their codes; a client that went away gets InvalidArgument
/// (it is not there to read it).
fn broken_stream(rpc: &'static str, status: &Status, broke: &'static str) -> Status {
    let e = Error::from_stream(status, broke);
    metrics::request_failed(rpc, &e);
    e.into()
}

#[tonic::async_trait]
impl pb::faultline_server::Faultline for FaultlineService {
    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let t = metrics::Request::start("list_snapshots");
        let access = Access::of(&req).map_err(|e| t.fail(e.into()))?;
        let list = self
            .store
            .list()
            .await
            .map_err(|e| t.fail(Error::from(e)))?;
        metrics::set_snapshots(list.len() as u64);
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
            build_batch(&*snapshot, codec, &ranges).await
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
            let open = first_open(
                &mut inbound,
                "the first message of a Fault stream must be `open`",
                |m| match m.kind {
                    Some(pb::fault_request::Kind::Open(open)) => Some(open),
                    _ => None,
                },
            )
            .await?;
            self.open_fault(access?, open).await
        }
        .await;
        let session = opened.map_err(|e| t.fail(e))?;
        drop(t);

        // The answers are produced by the response stream itself, as hyper
        // polls it: no task of our own. Up to `fault_concurrency` requests
        // are answered at once and each answer goes out when ready, so a
        // cold page does not hold up the vCPUs faulting behind it. Requests
        // are read only while there is room, and answers only produced
        // while hyper polls, whose flow control holds back a client that
        // does not read: a stalled stream holds at most that many answers.
        let answers = inbound
            .map(move |msg| {
                let session = session.clone();
                async move {
                    match msg {
                        Ok(m) => Ok(session.answer(m).await),
                        Err(status) => Err(broken_stream(
                            "fault",
                            &status,
                            "the Fault stream broke off",
                        )),
                    }
                }
            })
            .buffer_unordered(self.limits.fault_concurrency.max(1))
            // A broken request stream ends the answers with its error.
            .scan(false, |failed, item| {
                let out = if *failed {
                    None
                } else {
                    *failed = item.is_err();
                    Some(item)
                };
                futures::future::ready(out)
            });
        Ok(Response::new(Box::pin(answers)))
    }

    type PrefetchStream = PrefetchBatches;

    async fn prefetch(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> Result<Response<Self::PrefetchStream>, Status> {
        let t = metrics::Request::start("prefetch");
        let client = client_identity(&req);
        let access = Access::of(&req);
        let req = req.into_inner();
        let plan = async { self.open_prefetch(access?, client, req).await }.await;
        let producer = plan.map_err(|e| t.fail(e))?.start();
        drop(t);
        // The stream owns the producer: dropped with it (the client went
        // away), the producer is aborted.
        let batches = futures::stream::unfold(producer, |mut p| async move {
            let next = p.next().await?;
            Some((next.map_err(Status::from), p))
        });
        Ok(Response::new(Box::pin(batches)))
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
            Ok::<_, Error>(self.store.record_working_set(&id, &name, &ranges).await?)
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
        let idle = self.limits.upload_idle_timeout;
        let next = async |inbound: &mut Streaming<pb::CreateSnapshotRequest>| {
            tokio::time::timeout(idle, inbound.message())
                .await
                .map_err(|_| Error::UploadIdle(idle.as_secs()))
        };
        let result = async {
            let header = match next(&mut inbound).await? {
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
            // Before anything is allocated or created for it.
            self.limits.check_spec(&spec)?;
            let mut writer = self.store.create(spec).await?;
            loop {
                let chunk = match next(&mut inbound).await? {
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
                writer.write_at(chunk.offset, chunk.data).await?;
            }
            Ok(writer.finish().await?)
        }
        .await;
        let summary = result.map_err(|e| t.fail(e))?;
        metrics::snapshot_added();
        tracing::info!(snapshot = %summary.name, pages = summary.page_count, "snapshot uploaded");
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(summary.into()),
        }))
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let t = metrics::Request::start("create_volume");
        let access = Access::of(&req);
        let req = req.into_inner();
        let result = async {
            let access = access?;
            access.check(Right::Write, &req.name)?;
            let request = CreateVolume::try_from(req)?;
            match &request.source {
                VolumeSource::Snapshot(parent) => access.check(Right::Read, parent.as_str())?,
                VolumeSource::Empty { page_size, size } => {
                    // Before anything is created for it.
                    let spec =
                        SnapshotSpec::new(request.name.clone(), *page_size, *size, Vec::new())?;
                    self.limits.check_spec(&spec)?;
                }
            }
            Ok::<_, Error>(self.store.create_volume(request).await?)
        }
        .await;
        let summary = result.map_err(|e| t.fail(e))?;
        tracing::info!(volume = %summary.name, pages = summary.page_count, "volume created");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(summary.into()),
        }))
    }

    type WritePagesStream = WriteAcks;

    async fn write_pages(
        &self,
        req: Request<Streaming<pb::WritePagesRequest>>,
    ) -> Result<Response<Self::WritePagesStream>, Status> {
        let t = metrics::Request::start("write_pages_open");
        let access = Access::of(&req);
        let mut inbound = req.into_inner();
        let opened = async {
            let open = first_open(
                &mut inbound,
                "the first message of a WritePages stream must be `open`",
                |m| match m.kind {
                    Some(pb::write_pages_request::Kind::Open(open)) => Some(open),
                    _ => None,
                },
            )
            .await?;
            access?.check(Right::Write, &open.volume)?;
            let id = SnapshotId::new(open.volume)?;
            Ok(self.store.open_volume(&id).await?)
        }
        .await;
        let volume = opened.map_err(|e| t.fail(e))?;
        drop(t);
        // Runs are applied one at a time, in the order they arrive, and
        // each is answered once durable: acks come in request order. The
        // channel holds a few answers; a client that does not read them
        // stops the loop (and with it the reading of its runs).
        let (tx, rx) = mpsc::channel(WRITE_ACKS_QUEUED);
        tokio::spawn(async move {
            let _active = metrics::ActiveStream::new("write_pages");
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        let status = broken_stream("write_pages", &status, "the stream broke");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let answer = write_one(&*volume, msg).await;
                if tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn seal_volume(
        &self,
        req: Request<pb::SealVolumeRequest>,
    ) -> Result<Response<pb::SealVolumeResponse>, Status> {
        let t = metrics::Request::start("seal_volume");
        let access = Access::of(&req);
        let req = req.into_inner();
        let result = async {
            let access = access?;
            access.check(Right::Write, &req.volume)?;
            access.check(Right::Write, &req.snapshot)?;
            let request = SealVolume::try_from(req)?;
            Ok::<_, Error>(self.store.seal_volume(request).await?)
        }
        .await;
        let summary = result.map_err(|e| t.fail(e))?;
        metrics::snapshot_added();
        tracing::info!(snapshot = %summary.name, own_pages = summary.layer.own_pages, "volume sealed");
        Ok(Response::new(pb::SealVolumeResponse {
            snapshot: Some(summary.into()),
        }))
    }
}
