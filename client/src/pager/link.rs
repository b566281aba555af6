//! The demand link: one `Fault` stream to the server, carrying the read-ahead
//! windows of faults and installing the answers.
//!
//! If the connection breaks, the link reconnects with backoff, trying each
//! listed server in turn, and re-sends every request still unanswered;
//! faulting threads simply keep waiting. If the server stays unreachable
//! past the deadline, or a page keeps failing its digest, the failure policy
//! decides (`OnFailure`). Unknown content is never installed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_proto::codec::PageBatch;
use faultline_proto::{PageIndex, PageRange, pb};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::faults::fatal;
use super::pages::IN_FLIGHT;
use super::stats::Source;
use super::{OnFailure, Shared};
use crate::remote::{Remote, decode_batch};

/// First pause before reconnecting; doubled per failure up to
/// [`MAX_BACKOFF`]. Short, because faulting vCPUs are stalled meanwhile.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(20);

/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Times a page that fails its digest is fetched again before the failure
/// policy applies: a flipped bit in transit goes away on retry, a corrupt
/// snapshot does not.
pub const CORRUPT_RETRIES: u32 = 2;

/// A request for pages, from a fault (or `Pager::fault`).
#[derive(Debug, Clone)]
pub struct Demand {
    /// Region index.
    pub region: usize,
    /// The pages asked for.
    pub range: PageRange,
    /// Which pages of `range` the requester claimed (the others are zero
    /// pages inside the window, resolved locally if ever faulted).
    pub claimed: Vec<bool>,
    /// The page that faulted, if any (its latency is measured).
    pub fault: Option<PageIndex>,
    /// When the fault was read.
    pub started: Instant,
}

/// A request sent and not yet answered.
#[derive(Debug)]
struct Pending {
    demand: Demand,
    /// Fetches of this request that came back corrupt.
    corrupt: u32,
}

fn fault_request(id: u64, range: PageRange) -> pb::FaultRequest {
    pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Pages(pb::FaultPages {
            request_id: id,
            range: Some(range.into()),
        })),
    }
}

/// An open `Fault` stream.
struct Session {
    tx: mpsc::UnboundedSender<pb::FaultRequest>,
    answers: tonic::Streaming<pb::FaultResponse>,
}

async fn open_session(shared: &Shared, url: &str) -> Result<Session, String> {
    let remote = Remote::connect_with(url, &shared.config.connect)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Open(pb::FaultOpen {
            snapshot: shared.config.snapshot.to_string(),
            compression: shared.config.compression.into(),
        })),
    })
    .expect("receiver alive");
    let answers = remote
        .client()
        .fault(UnboundedReceiverStream::new(rx))
        .await
        .map_err(|s| format!("opening the Fault stream on {url} failed: {}", s.message()))?
        .into_inner();
    Ok(Session { tx, answers })
}

/// Runs the demand link until the pager stops.
pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Demand>) {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 1u64;
    let mut server = 0usize;
    let mut backoff = INITIAL_BACKOFF;
    let mut down_since: Option<Instant> = None;
    let servers = shared.config.servers.clone();
    loop {
        let url = &servers[server % servers.len()];
        let mut session = match open_session(&shared, url).await {
            Ok(s) => s,
            Err(e) => {
                let since = *down_since.get_or_insert_with(Instant::now);
                tracing::warn!("demand link: {e}; retrying in {backoff:?}");
                // Take new requests while down, so they wait (and count
                // toward the deadline) like the others.
                while let Ok(d) = rx.try_recv() {
                    pending.insert(
                        next_id,
                        Pending {
                            demand: d,
                            corrupt: 0,
                        },
                    );
                    next_id += 1;
                }
                if since.elapsed() >= shared.config.deadline {
                    give_up(&shared, &mut pending, "the server is unreachable");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                server += 1;
                continue;
            }
        };
        if down_since.take().is_some() {
            shared.counters.reconnect();
            tracing::info!(
                "demand link: connected to {url} again; re-sending {} request(s)",
                pending.len()
            );
        }
        backoff = INITIAL_BACKOFF;
        for (id, p) in &pending {
            let _ = session.tx.send(fault_request(*id, p.demand.range));
        }
        loop {
            tokio::select! {
                d = rx.recv() => {
                    let Some(d) = d else { return };
                    let id = next_id;
                    next_id += 1;
                    let _ = session.tx.send(fault_request(id, d.range));
                    pending.insert(id, Pending { demand: d, corrupt: 0 });
                }
                answer = session.answers.next() => match answer {
                    Some(Ok(resp)) => {
                        if let Some(retry) = answer_one(&shared, &mut pending, resp) {
                            let id = next_id;
                            next_id += 1;
                            let _ = session.tx.send(fault_request(id, retry.demand.range));
                            pending.insert(id, retry);
                        }
                    }
                    Some(Err(status)) => {
                        tracing::warn!("demand link: the stream failed: {}", status.message());
                        break;
                    }
                    None => {
                        tracing::warn!("demand link: the server closed the stream");
                        break;
                    }
                }
            }
        }
        down_since = Some(Instant::now());
    }
}

/// Applies the failure policy to every pending request: poison or abort.
/// Waiting means doing nothing (the link keeps trying).
fn give_up(shared: &Shared, pending: &mut HashMap<u64, Pending>, why: &str) {
    if pending.is_empty() {
        return;
    }
    match shared.config.on_failure {
        OnFailure::Wait => {}
        OnFailure::Poison | OnFailure::Abort => {
            for (_, p) in pending.drain() {
                fail(shared, &p.demand, &p.demand.claimed, why);
            }
        }
    }
}

/// Gives up on the `which` pages of `demand`: poison them (the faulting
/// thread gets SIGBUS) or abort, per policy.
fn fail(shared: &Shared, demand: &Demand, which: &[bool], why: &str) {
    let region = &shared.regions[demand.region];
    match shared.config.on_failure {
        OnFailure::Abort | OnFailure::Wait => fatal(&format!(
            "cannot fill {} of region {}: {why}",
            demand.range, demand.region
        )),
        OnFailure::Poison => {
            tracing::error!(
                "cannot fill {} of region {}: {why}; poisoning them (touching them raises SIGBUS)",
                demand.range,
                demand.region
            );
            for (p, _) in demand.range.iter().zip(which).filter(|(_, c)| **c) {
                if shared.table.get(p) == IN_FLIGHT {
                    if let Err(e) = region.poison(p, 1) {
                        tracing::error!("poisoning page {} failed: {e}", p.0);
                    }
                    // Counted first: a waiter sees the page poisoned
                    // only once the statistics say so.
                    shared.counters.poisoned(1);
                    shared.table.poison(p);
                }
            }
            shared.progress.notify_waiters();
        }
    }
}

/// Handles one answer; returns a request to send again (pages that failed
/// their digest, while retries remain).
fn answer_one(
    shared: &Shared,
    pending: &mut HashMap<u64, Pending>,
    resp: pb::FaultResponse,
) -> Option<Pending> {
    let mut p = pending.remove(&resp.request_id)?;
    let batch = match resp.result {
        Some(pb::fault_response::Result::Pages(batch)) => {
            match decode_batch(batch, &shared.manifest) {
                Ok(b) => b,
                Err(e) => {
                    fail(shared, &p.demand, &p.demand.claimed.clone(), &e.to_string());
                    return None;
                }
            }
        }
        Some(pb::fault_response::Result::Error(e)) => {
            let claimed = p.demand.claimed.clone();
            if e.code == tonic::Code::Unavailable as i32
                && shared.config.on_failure == OnFailure::Wait
            {
                return Some(p);
            }
            fail(
                shared,
                &p.demand,
                &claimed,
                &format!("the server refused: {}", e.message),
            );
            return None;
        }
        None => return Some(p),
    };
    let corrupt = install_batch(shared, &p.demand, &batch);
    shared.progress.notify_waiters();
    if corrupt.iter().all(|c| !c) {
        if p.demand.fault.is_some() {
            shared.counters.latency(p.demand.started.elapsed());
        }
        return None;
    }
    p.corrupt += 1;
    if p.corrupt <= CORRUPT_RETRIES || shared.config.on_failure == OnFailure::Wait {
        tracing::warn!(
            "pages of {} failed their digest; fetching them again (attempt {})",
            p.demand.range,
            p.corrupt + 1
        );
        p.demand.claimed = corrupt;
        return Some(p);
    }
    fail(
        shared,
        &p.demand,
        &corrupt,
        "pages keep failing their digest: the snapshot on the server is corrupt",
    );
    None
}

/// Installs the claimed pages of `demand` found in `batch`, each verified
/// against its digest. Returns, per page of the range, whether it was
/// claimed and could not be installed (corrupt or missing from the batch);
/// those stay claimed.
fn install_batch(shared: &Shared, demand: &Demand, batch: &PageBatch) -> Vec<bool> {
    let manifest = &shared.manifest;
    let start = demand.range.start().0;
    let mut left = demand.claimed.clone();
    let ps = manifest.page_size.bytes_usize();
    for run in &batch.runs {
        // Consecutive pages of the run that are ours and verified, installed
        // with one call.
        let mut from: Option<u64> = None;
        let flush = |from: &mut Option<u64>, to: u64| {
            if let Some(f) = from.take() {
                let off = (f - run.range.start().0) as usize * ps;
                let len = (to - f) as usize * ps;
                install_run(shared, demand, PageIndex(f), &run.data[off..off + len]);
            }
        };
        for (p, data) in run.pages(manifest.page_size) {
            let i = p.0.checked_sub(start).map(|i| i as usize);
            let ours = i.is_some_and(|i| i < left.len() && left[i]);
            let ok = ours && shared.table.get(p) == IN_FLIGHT && {
                let good = manifest.verify(p, &data);
                if !good {
                    shared.counters.corrupt();
                    tracing::warn!("page {} does not match its digest; not installed", p.0);
                }
                good
            };
            if ok {
                left[i.expect("ours")] = false;
                from.get_or_insert(p.0);
            } else {
                flush(&mut from, p.0);
            }
        }
        flush(&mut from, run.range.end());
    }
    // Pages the guest discarded while they were being fetched (a REMOVE made
    // them ZERO_ON_FAULT) are no longer this request's to install: drop
    // them (retrying would never end) and wake any thread still waiting on
    // them, whose retry then reads zeros.
    let region = &shared.regions[demand.region];
    for (i, p) in demand.range.iter().enumerate() {
        if left[i] && shared.table.get(p) != IN_FLIGHT {
            left[i] = false;
            region.wake(p);
        }
    }
    // Pages the batch flagged zero were claimed because the manifest says
    // they are not: a server out of step with its manifest. They stay in
    // `left` and are treated as corrupt.
    left
}

/// Installs verified bytes for consecutive claimed pages and settles them.
fn install_run(shared: &Shared, demand: &Demand, start: PageIndex, data: &[u8]) {
    let region = &shared.regions[demand.region];
    let installed = shared.install_claimed(region, start, data, Source::Readahead, demand.fault);
    if let Err(e) = installed
        && !shared.is_stopping()
    {
        fatal(&format!(
            "installing pages of region {} failed: {e}",
            region.index
        ));
    }
}
