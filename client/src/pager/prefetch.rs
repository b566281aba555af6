//! The prefetcher: streams the recorded working set, then everything else,
//! on connections of its own, installing in large runs the pages nobody has
//! claimed yet. It also fills regions that have no lazy method (EAGER)
//! before the guest runs.
//!
//! The bulk (everything after the working set) is split into
//! [`super::Bulk::streams`] contiguous parts of the snapshot, each streamed
//! on its own connection by a task of its own, so that on two cores one
//! stream receives while another verifies and installs, and the server
//! reads and sends on as many threads. The working set goes first, in its
//! recorded order: a replay needs its order more than its speed. Over a
//! socket it goes on one stream; from the server's page file the streams
//! take its groups of pages in turn from a queue they share
//! (`WorkingSetQueue`), so that all of them work just ahead of the guest.
//! On shmem, bulk runs are installed by `UFFDIO_COPY`
//! ([`super::Bulk::shmem_copy`]). docs/BENCHMARKS.md has the measurements
//! behind each choice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;

use faultline_proto::backoff::Backoff;
use faultline_proto::codec::{PageBatch, PageRun};
use faultline_proto::{PageIndex, PageRange, pb};
use futures::StreamExt;

use super::config::StreamTransport;
use super::error::InstallError;
use super::faults::Caller;
use super::link::{INITIAL_BACKOFF, MAX_BACKOFF, STALL_TIMEOUT};
use super::region::RegionState;
use super::source::Slotted;
use super::stats::Source;
use super::units::Assembler;
use super::{PrefetchPolicy, Shared, lean};
use crate::remote::{Remote, RemoteError, decode_batch};

/// Prefetching a stream failed (the pager retries).
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// Talking to the server failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// Installing failed (the run was released: its pages are missing
    /// again, their waiters woken).
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The server does not serve the manifest in use, or could not say.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::CheckError),
    /// The server sent nothing for this long.
    #[error("the server sent no prefetch batch for {0:?}")]
    Stalled(Duration),
    /// The lean prefetch connection failed.
    #[error("the lean prefetch stream failed: {0}")]
    Lean(String),
    /// Reading the page file failed (the stream is used instead).
    #[error("reading the page file failed: {0}")]
    PageFile(std::io::Error),
}

/// Batches received ahead of the installer when [`super::Bulk::overlap`] is
/// on: one being installed, up to this many waiting. Two keep the receiver
/// going across an install's hiccup while holding little memory (2 x 1 MiB
/// batches, or two 2 MiB hugetlbfs pages).
const OVERLAP_DEPTH: usize = 2;

/// Streams `req` and installs every page it brings that is still missing,
/// counting them as `source`. Returns when the stream ends.
pub(crate) async fn stream_into(
    shared: &Arc<Shared>,
    url: &str,
    req: pb::PrefetchRequest,
    source: Source,
) -> Result<(), PrefetchError> {
    stream_units_into(shared, url, req, source, &mut Assembler::default()).await
}

/// [`stream_into`], assembling the install units of mixed regions (a 4 KiB
/// snapshot in hugetlbfs memory, `units.rs`) in `units`; those left
/// incomplete are in [`Assembler::take_dropped`] afterwards.
///
/// With [`super::Bulk::overlap`], batches are verified and installed on a
/// thread of their own (tokio's blocking pool) while this task receives the
/// next ones: receive and install overlap, where otherwise the task does
/// one, then the other.
async fn stream_units_into(
    shared: &Arc<Shared>,
    url: &str,
    req: pb::PrefetchRequest,
    source: Source,
    units: &mut Assembler,
) -> Result<(), PrefetchError> {
    // On the server's host, the pages come from its page file instead.
    if let Some(file) = &shared.page_file {
        match super::source::prefetch(shared, file, &req, source, units).await {
            Err(PrefetchError::PageFile(e)) => {
                tracing::warn!("prefetch: {e}; streaming instead");
            }
            done => return done,
        }
    }
    let stalled = || PrefetchError::Stalled(STALL_TIMEOUT);
    let mut stream = tokio::time::timeout(STALL_TIMEOUT, Batches::open(shared, url, req))
        .await
        .map_err(|_| stalled())??;
    let mut next_batch = async || -> Result<Option<PageBatch>, PrefetchError> {
        let next = tokio::time::timeout(STALL_TIMEOUT, stream.next())
            .await
            .map_err(|_| stalled())?;
        let Some(batch) = next else { return Ok(None) };
        Ok(Some(decode_batch(batch?, &shared.manifest)?))
    };
    if !shared.config.bulk.overlap {
        while let Some(batch) = next_batch().await? {
            install_batch(shared, &batch, source, units)?;
            if shared.is_stopping() {
                break;
            }
        }
        return Ok(());
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PageBatch>(OVERLAP_DEPTH);
    let installer = {
        let shared = shared.clone();
        let mut units = std::mem::take(units);
        tokio::task::spawn_blocking(move || {
            let mut result = Ok(());
            while let Some(batch) = rx.blocking_recv() {
                result = install_batch(&shared, &batch, source, &mut units);
                if result.is_err() || shared.is_stopping() {
                    break;
                }
            }
            (result, units)
        })
    };
    let received = async {
        while let Some(batch) = next_batch().await? {
            // The installer ended early (an install failed): its result
            // says why.
            if tx.send(batch).await.is_err() || shared.is_stopping() {
                break;
            }
        }
        Ok::<_, PrefetchError>(())
    }
    .await;
    drop(tx);
    let (installed, back) = match installer.await {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    *units = back;
    installed?;
    received
}

/// A prefetch stream's batches, on the transport it opened on.
enum Batches {
    /// gRPC's `Prefetch` stream.
    Grpc(tonic::Streaming<pb::PageBatch>),
    /// The lean prefetch transport (`lean.rs`).
    Lean(lean::PrefetchSession),
}

impl Batches {
    /// Opens `req` on `url`: on the lean transport where the server offers
    /// it and the configuration allows it, else over gRPC.
    async fn open(
        shared: &Shared,
        url: &str,
        req: pb::PrefetchRequest,
    ) -> Result<Self, PrefetchError> {
        let transport = shared.config.prefetch_transport;
        if transport != StreamTransport::Grpc {
            match lean::open_prefetch(shared, url, &req).await {
                Ok(lean::Opened::Session(s)) => return Ok(Self::Lean(s)),
                Ok(lean::Opened::Unsupported(why)) if transport == StreamTransport::Lean => {
                    return Err(PrefetchError::Lean(format!(
                        "{why}, and --prefetch-transport lean was asked for"
                    )));
                }
                Ok(lean::Opened::Unsupported(why)) => {
                    tracing::debug!("prefetch: {why}; using gRPC");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let remote = Remote::connect_with(url, &shared.config.connect).await?;
        // A fail-over server must serve the manifest in use (crate::fleet).
        shared.fleet.check(&remote, &shared.manifest).await?;
        Ok(Self::Grpc(remote.prefetch(req).await?))
    }

    /// The next batch; `None` at the stream's end.
    async fn next(&mut self) -> Option<Result<pb::PageBatch, PrefetchError>> {
        match self {
            Self::Grpc(s) => s
                .next()
                .await
                .map(|b| b.map_err(|e| RemoteError::rpc("Prefetch")(e).into())),
            Self::Lean(s) => s.next().await.map(|b| b.map_err(PrefetchError::from)),
        }
    }
}

impl From<lean::PrefetchFailure> for PrefetchError {
    fn from(e: lean::PrefetchFailure) -> Self {
        match e {
            lean::PrefetchFailure::Server(status) => RemoteError::rpc("Prefetch")(status).into(),
            lean::PrefetchFailure::Broken(why) => Self::Lean(why),
        }
    }
}

/// Installs what one batch brought ([`install_pages`]), then tells
/// waiters.
fn install_batch(
    shared: &Shared,
    batch: &PageBatch,
    source: Source,
    units: &mut Assembler,
) -> Result<(), InstallError> {
    install_pages(shared, batch, source, units)?;
    shared.progress.notify_waiters();
    Ok(())
}

/// Installs a batch's pages, from a stream or the page file: its zero
/// ranges first, then its runs (pages nobody has claimed). Zero pages first
/// because a batch does not keep the recorded order between its two lists,
/// and a guest replaying a working set right behind the prefetcher faulted
/// on the batch's zero pages while its data went in: mapped first, they
/// cost a `UFFDIO_ZEROPAGE` each and no fault (TCP replay: 328-2,447 faults
/// against 990-8,922, docs/BENCHMARKS.md "Session 9").
pub(super) fn install_pages(
    shared: &Shared,
    batch: &PageBatch,
    source: Source,
    units: &mut Assembler,
) -> Result<(), InstallError> {
    for zero in &batch.zero {
        for region in shared.regions.iter() {
            shared.install_zero_pages(region, *zero, Caller::Other);
        }
    }
    for run in &batch.runs {
        install_unclaimed(shared, run, source, units)?;
    }
    Ok(())
}

/// Installs the pages of `run` that nobody else has claimed, in runs of
/// consecutive pages, each page verified first. A page failing its digest
/// is given back (Missing): a fault on it goes through the demand link,
/// whose retries and failure policy apply. If an install fails, its run is
/// released ([`Shared::install_claimed`]): the only pages this call holds
/// claimed at any time are that run's, so none stays claimed.
pub(super) fn install_unclaimed(
    shared: &Shared,
    run: &PageRun,
    source: Source,
    units: &mut Assembler,
) -> Result<(), InstallError> {
    let ps = shared.manifest.page_size.bytes_usize();
    // Claimed, verified pages not installed yet: their region and first page.
    let mut pending: Option<(&RegionState, u64)> = None;
    let flush = |pending: &mut Option<(&RegionState, u64)>, to: u64| {
        let Some((region, from)) = pending.take() else {
            return Ok(());
        };
        let off = (from - run.range.start().0) as usize * ps;
        let data = &run.data[off..off + (to - from) as usize * ps];
        let installed = shared.install_claimed_bulk(region, PageIndex(from), data, source);
        if installed.is_err() {
            // No page stays claimed: a fault on one now goes through the
            // demand link, with its retries and failure policy.
            shared.release_claimed(region, PageIndex(from), to - from);
        }
        installed
    };
    // Whether any region installs whole huge pages (units.rs): only then is
    // each page's region looked up first.
    let mixed = shared.regions.iter().any(RegionState::is_mixed);
    for (p, data) in run.pages(shared.manifest.page_size) {
        // One install never crosses the end of a region.
        if pending.is_some_and(|(r, _)| p.0 >= r.first_page + r.pages) {
            flush(&mut pending, p.0)?;
        }
        if mixed && let Some(region) = shared.region_of(p).filter(|r| r.is_mixed()) {
            // Installed by whole huge pages, once assembled (units.rs).
            flush(&mut pending, p.0)?;
            units.add(shared, region, p, &data, source)?;
            continue;
        }
        if !shared.claim(p) {
            flush(&mut pending, p.0)?;
            continue;
        }
        let region = shared
            .region_of(p)
            .expect("only pages inside a region can be claimed");
        if !shared.manifest.verify(p, &data) {
            shared.counters.corrupt();
            tracing::warn!(
                "prefetched page {} does not match its digest; not installed",
                p.0
            );
            // A thread that faulted on the page while it was claimed here
            // joined this install and sleeps: the release wakes it, so that
            // its retry faults again and goes through the demand link.
            shared.release_claimed(region, p, 1);
            flush(&mut pending, p.0)?;
            continue;
        }
        pending.get_or_insert((region, p.0));
    }
    flush(&mut pending, run.range.end())
}

/// Pages of the recorded working set a stream takes at a time when it is
/// read from the server's page file on several streams
/// ([`WorkingSetQueue`]): each stream takes the next group of this many
/// pages in the recorded order from a queue they share, so that together
/// they work on the next few groups at once and a guest replaying the set
/// finds its pages installed at their combined speed. Dealt out by turns in
/// chunks of 256 pages instead, each chunk went at one stream's speed, and
/// the guest overtook the stream in it and faulted on the rest of the chunk:
/// up to 9,000 faults in a replay, against about 150 (docs/BENCHMARKS.md,
/// "Session 9"). A group is read from the set's page file in one `pread`.
const WORKING_SET_GROUP_PAGES: u64 = 64;

/// Times a stream is followed by one over the install units it left
/// half-assembled (units.rs): the follow-up streams whole units in snapshot
/// order, which completes them, so a second round is needed only if faults
/// raced it; a bound keeps a pathological server from looping us.
const UNIT_ROUNDS: u32 = 3;

/// Runs the background prefetcher until every page is settled, the streams
/// end, or the pager stops. Connection failures are retried with backoff,
/// stream by stream; the demand path works regardless.
pub(crate) async fn run(shared: Arc<Shared>) {
    let has_working_set = shared
        .manifest
        .working_sets
        .contains(&shared.config.working_set);
    let bulk = &shared.config.bulk;
    let streams = if shared.page_file.is_some() {
        bulk.page_file_streams
    } else {
        bulk.streams
    }
    .max(1);
    match shared.config.prefetch {
        PrefetchPolicy::None => {}
        PrefetchPolicy::WorkingSet if !has_working_set => {
            tracing::info!(
                "prefetch: snapshot {} has no working set {:?}; nothing to prefetch",
                shared.manifest.id,
                shared.config.working_set.as_str()
            );
        }
        PrefetchPolicy::WorkingSet => {
            working_set(&shared, streams).await;
        }
        PrefetchPolicy::All if streams == 1 => {
            retrying(&shared, pb::PrefetchOrder::WorkingSetThenRest, Vec::new()).await;
        }
        PrefetchPolicy::All => {
            if has_working_set && !working_set(&shared, streams).await {
                return;
            }
            let mut tasks = JoinSet::new();
            for part in split(shared.manifest.page_count, streams) {
                let shared = shared.clone();
                tasks.spawn(async move {
                    retrying(&shared, pb::PrefetchOrder::Ranges, vec![part]).await;
                });
            }
            // Dropping the set (the prefetcher aborted at the end) aborts
            // the streams; a stream's panic is this task's, which ends the
            // pager.
            while let Some(done) = tasks.join_next().await {
                if let Err(e) = done
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }
}

/// Prefetches the recorded working set, in its order. From the server's
/// page file it is read on `streams` tasks at once, each taking the next
/// group of its pages from a queue they share ([`WorkingSetQueue`]):
/// there every page costs the client a read, a check and an install, and
/// one stream kept one core busy while the other mostly waited for the
/// guest's faults. Then (and over a socket or into a mixed region, only)
/// one stream of the whole set, which settles what the streams left (the
/// pages of a group that failed). False if the pager should stop
/// prefetching.
async fn working_set(shared: &Arc<Shared>, streams: usize) -> bool {
    // Mixed regions assemble whole huge pages, whose pages the parts would
    // deal out to different streams: one stream there.
    let mixed = shared.regions.iter().any(RegionState::is_mixed);
    if let Some(file) = &shared.page_file
        && streams > 1
        && !mixed
        && !file.working_set().is_empty()
    {
        let queue = Arc::new(WorkingSetQueue::new(
            file.working_set(),
            WORKING_SET_GROUP_PAGES,
            |r| super::source::nonzero_pages(&shared.manifest, r),
        ));
        let mut tasks = JoinSet::new();
        for _ in 0..streams {
            let (shared, queue) = (shared.clone(), queue.clone());
            tasks.spawn(async move {
                let file = shared
                    .page_file
                    .as_ref()
                    .expect("the queue comes from the page file");
                // No region is mixed here, so nothing is assembled.
                let mut units = Assembler::default();
                while let Some(group) = queue.next_group() {
                    super::source::prefetch_ranges(
                        &shared,
                        file,
                        group,
                        Source::Prefetch,
                        &mut units,
                    )
                    .await?;
                    if shared.is_stopping() {
                        break;
                    }
                    // Between groups, the runtime's other tasks (the other
                    // streams, the watcher) get their turn.
                    tokio::task::yield_now().await;
                }
                Ok::<(), PrefetchError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(PrefetchError::Install(e @ InstallError::OwnerGone { .. }))) => {
                    shared.on_install_error(&e);
                    return false;
                }
                Ok(Err(e)) => tracing::warn!("prefetch: the working set's page-file stream: {e}"),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
    }
    retrying(shared, pb::PrefetchOrder::WorkingSetOnly, Vec::new()).await
}

/// The recorded working set cut into groups of pages, in its order, for
/// the streams that read it from the page file to take one at a time
/// ([`WORKING_SET_GROUP_PAGES`]).
struct WorkingSetQueue {
    /// The set's runs, with their slots, cut where a group ends.
    pieces: Vec<Slotted>,
    /// Where each group starts in `pieces`, and then `pieces.len()`.
    bounds: Vec<usize>,
    /// The next group to take.
    next: AtomicUsize,
}

impl WorkingSetQueue {
    /// `runs` (first-touch order, with their slots) in groups of `group`
    /// pages (the last one shorter; a run crossing a group's end is cut
    /// there, the rest's slot moved past the `nonzero` pages cut off).
    fn new(runs: &[Slotted], group: u64, nonzero: impl Fn(PageRange) -> u64) -> Self {
        let group = group.max(1);
        let mut pieces = Vec::with_capacity(runs.len());
        let mut bounds = vec![0];
        let mut filled = 0;
        for &(run, mut slot) in runs {
            let mut start = run.start().0;
            while start < run.end() {
                let take = (group - filled).min(run.end() - start);
                let piece = PageRange::new(PageIndex(start), take).expect("non-empty");
                pieces.push((piece, slot));
                if let Some(s) = slot.as_mut() {
                    *s += nonzero(piece);
                }
                start += take;
                filled += take;
                if filled == group {
                    bounds.push(pieces.len());
                    filled = 0;
                }
            }
        }
        if filled > 0 {
            bounds.push(pieces.len());
        }
        Self {
            pieces,
            bounds,
            next: AtomicUsize::new(0),
        }
    }

    /// The next group no stream has taken yet, in the recorded order.
    fn next_group(&self) -> Option<&[Slotted]> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let (&start, &end) = (self.bounds.get(i)?, self.bounds.get(i + 1)?);
        Some(&self.pieces[start..end])
    }
}

/// `count` pages split into at most `parts` contiguous ranges of nearly
/// equal size.
fn split(count: u64, parts: usize) -> Vec<PageRange> {
    let parts = (parts as u64).clamp(1, count.max(1));
    let mut ranges = Vec::new();
    let mut start = 0;
    for i in 0..parts {
        let end = count * (i + 1) / parts;
        if let Some(r) = PageRange::new(PageIndex(start), end - start) {
            ranges.push(r);
        }
        start = end;
    }
    ranges
}

/// Streams one prefetch request (`order` over `ranges`) to its end,
/// retrying on failures with backoff through the listed servers, each
/// retry naming the pages settled since. False if the pager should stop
/// prefetching (it is stopping, or the memory's owner is gone).
async fn retrying(
    shared: &Arc<Shared>,
    mut order: pb::PrefetchOrder,
    mut ranges: Vec<PageRange>,
) -> bool {
    let servers = &shared.config.servers;
    let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
    let mut rounds = 0;
    for attempt in 0.. {
        if shared.table.unsettled() == 0 || shared.is_stopping() {
            return !shared.is_stopping();
        }
        let req = pb::PrefetchRequest {
            snapshot: shared.config.snapshot.to_string(),
            order: order as i32,
            working_set: shared.config.working_set.to_string(),
            ranges: ranges.iter().map(|&r| r.into()).collect(),
            have: shared.table.fetched_bitmap().to_bytes().into(),
            compression: shared.config.compression.into(),
            max_batch_bytes: shared.config.bulk.batch_bytes,
        };
        let url = &servers[attempt % servers.len()];
        let mut units = Assembler::default();
        match stream_units_into(shared, url, req, Source::Prefetch, &mut units).await {
            Ok(()) => {
                // Units of a mixed region whose pages the stream brought too
                // far apart to assemble (a working set recorded on other
                // memory): streamed again, whole, in snapshot order.
                let again = units.take_dropped(shared);
                if again.is_empty() || rounds >= UNIT_ROUNDS {
                    return true;
                }
                rounds += 1;
                tracing::debug!(
                    "prefetch: streaming {} partial huge pages again",
                    again.len()
                );
                order = pb::PrefetchOrder::Ranges;
                ranges = again;
            }
            Err(PrefetchError::Install(e @ InstallError::OwnerGone { .. })) => {
                shared.on_install_error(&e);
                return false;
            }
            Err(e) => {
                if shared.is_stopping() {
                    return false;
                }
                let pause = backoff.next_delay();
                tracing::warn!("prefetch: {e}; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
            }
        }
    }
    unreachable!("the loop returns")
}

/// Fills `ranges` (pages of EAGER regions) before the guest runs: streams
/// them and writes them through the region's own mapping. Retries until
/// `deadline`.
pub(crate) async fn fill_eager(
    shared: &Arc<Shared>,
    ranges: Vec<PageRange>,
    deadline: Duration,
) -> Result<(), PrefetchError> {
    let started = std::time::Instant::now();
    let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
    for attempt in 0.. {
        let req = pb::PrefetchRequest {
            snapshot: shared.config.snapshot.to_string(),
            order: pb::PrefetchOrder::Ranges as i32,
            ranges: ranges.iter().map(|&r| r.into()).collect(),
            have: shared.table.fetched_bitmap().to_bytes().into(),
            compression: shared.config.compression.into(),
            max_batch_bytes: shared.config.bulk.batch_bytes,
            ..Default::default()
        };
        let url = &shared.config.servers[attempt % shared.config.servers.len()];
        match stream_into(shared, url, req, Source::Eager).await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() < deadline => {
                let pause = backoff.next_delay();
                tracing::warn!("filling eager regions: {e}; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The working set is queued in groups of whole pages, in the recorded
    /// order, every page once, each taken by one stream.
    #[test]
    fn working_set_is_queued_in_groups() {
        let r = |s, n| PageRange::new(PageIndex(s), n).unwrap();
        // Runs in first-touch order: 3 pages, 1, 6 (cut at the group's end), 1;
        // as if page 41 were zero (the slots count the others).
        let runs = [
            (r(10, 3), Some(0)),
            (r(2, 1), Some(3)),
            (r(40, 6), Some(4)),
            (r(7, 1), Some(9)),
        ];
        let nonzero = |p: PageRange| p.iter().filter(|p| p.0 != 41).count() as u64;
        let queue = WorkingSetQueue::new(&runs, 4, nonzero);
        let groups: Vec<Vec<Slotted>> =
            std::iter::from_fn(|| queue.next_group().map(<[_]>::to_vec)).collect();
        assert_eq!(
            groups,
            vec![
                vec![(r(10, 3), Some(0)), (r(2, 1), Some(3))],
                vec![(r(40, 4), Some(4))],
                vec![(r(44, 2), Some(7)), (r(7, 1), Some(9))],
            ]
        );
        assert!(queue.next_group().is_none(), "every group taken once");
        let one = WorkingSetQueue::new(&runs[..1], 4, nonzero);
        assert_eq!(one.next_group().map(<[_]>::len), Some(1));
        assert!(one.next_group().is_none());
        assert!(WorkingSetQueue::new(&[], 4, nonzero).next_group().is_none());
    }

    /// The bulk is split into contiguous parts covering every page once.
    #[test]
    fn split_covers_every_page_once() {
        for (count, parts) in [(10, 1), (10, 3), (524_288, 4), (3, 8), (1, 2)] {
            let ranges = split(count, parts);
            assert!(ranges.len() <= parts && !ranges.is_empty());
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start().0, next);
                next = r.end();
            }
            assert_eq!(next, count, "{count} pages in {parts} parts");
        }
    }
}
