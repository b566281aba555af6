//! The demand link: one `Fault` stream to the server, carrying the read-ahead
//! windows of faults and installing the answers. The stream runs on the
//! lean transport ([`super::lean`]) where the server offers it, else on
//! gRPC; the link below is the same for both.
//!
//! Every way the server can fail is a failed request, retried with backoff
//! and jitter ([`faultline_proto::backoff`]): a refused connection, a server
//! that accepts and never answers (a request unanswered for
//! [`STALL_TIMEOUT`] drops the connection and tries the next server), an
//! in-band error, a broken stream, pages failing their digest. Faulting
//! threads keep waiting meanwhile. Once a request has been failing for the
//! deadline (measured from when it was first asked), or its pages failed
//! their digest [`CORRUPT_RETRIES`] times, the failure policy decides
//! ([`OnFailure`]): `wait` goes on retrying (at the longest backoff), never
//! aborts; `poison` poisons its pages; `abort` aborts the process. Unknown
//! content is never installed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_proto::backoff::Backoff;
use faultline_proto::codec::PageBatch;
use faultline_proto::{PageIndex, PageRange, pb};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::config::StreamTransport;
use super::error::InstallError;
use super::lean::{self, LeanSession};
use super::pages::PageState;
use super::region::Caller;
use super::stats::Source;
use super::{OnFailure, Shared};
use crate::remote::{Remote, decode_batch};

/// First pause before retrying (a connection or a request); doubled per
/// failure up to [`MAX_BACKOFF`], with jitter. Short, because faulting vCPUs
/// are stalled meanwhile.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(20);

/// Longest pause between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Times a page that fails its digest is fetched again before the failure
/// policy applies: a flipped bit in transit goes away on retry, a corrupt
/// snapshot does not.
pub const CORRUPT_RETRIES: u32 = 2;

/// A request unanswered this long on a working connection means the server
/// has stalled (it accepts and never answers): the link drops the
/// connection and tries the next server. A loopback answer takes well under
/// a millisecond and a 1 MiB window a few; 5 s is far past any honest load.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening the `Fault` stream may take (TCP, HTTP/2, the stream's
/// headers) before the attempt counts as failed: a server that accepts and
/// never answers must not hang the link. Bounded by the deadline too.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the link looks at its requests for retries due, stalls and
/// deadlines: the shortest backoff, so a retry is not late by more than one.
const TICK: Duration = INITIAL_BACKOFF;

/// Pause before installing again an answer refused with EAGAIN (a
/// memory-map event pending on the uffd). The refusal ends once this
/// thread's fault loop has read the event and the thread that caused it
/// (in `madvise`) has resumed, so the pause must let both happen: the link
/// sleeps (tokio's timer rounds it up to a millisecond) instead of
/// spinning. Short, because the faulting thread waits meanwhile.
const AGAIN_PAUSE: Duration = Duration::from_micros(50);

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

/// A request not yet answered with every claimed page.
#[derive(Debug)]
struct Pending {
    demand: Demand,
    /// When it was sent on the current connection; `None`: not sent there.
    sent: Option<Instant>,
    /// Fetches of this request that came back with corrupt pages.
    corrupt: u32,
    /// Backoff between this request's retries, once it has failed.
    backoff: Option<Backoff>,
    /// Not to be sent again before this.
    retry_at: Option<Instant>,
    /// Why it last failed.
    last_error: Option<String>,
    /// The policy `wait` was applied (logged once).
    waiting_past_deadline: bool,
}

impl Pending {
    fn new(demand: Demand) -> Self {
        Self {
            demand,
            sent: None,
            corrupt: 0,
            backoff: None,
            retry_at: None,
            last_error: None,
            waiting_past_deadline: false,
        }
    }

    /// Failing for longer than `deadline` (from when the fault was read).
    fn past(&self, deadline: Duration) -> bool {
        self.demand.started.elapsed() >= deadline
    }

    /// Schedules the next attempt after a backoff; returns the pause.
    fn retry_later(&mut self, why: String) -> Duration {
        let backoff = self
            .backoff
            .get_or_insert_with(|| Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF));
        let pause = backoff.next_delay();
        self.retry_at = Some(Instant::now() + pause);
        self.sent = None;
        self.last_error = Some(why);
        pause
    }

    fn due(&self, now: Instant) -> bool {
        self.sent.is_none() && self.retry_at.is_none_or(|t| t <= now)
    }
}

fn fault_request(id: u64, range: PageRange) -> pb::FaultRequest {
    pb::FaultRequest {
        kind: Some(pb::fault_request::Kind::Pages(pb::FaultPages {
            request_id: id,
            range: Some(range.into()),
        })),
    }
}

/// An open `Fault` stream, on either transport: the link is one state
/// machine over both (docs/protocol.md, "The lean fault transport").
pub(crate) enum Session {
    /// gRPC over HTTP/2.
    Grpc {
        tx: mpsc::UnboundedSender<pb::FaultRequest>,
        answers: tonic::Streaming<pb::FaultResponse>,
    },
    /// Length-delimited frames on a connection of its own.
    Lean(LeanSession),
}

impl Session {
    /// Sends one request.
    async fn send(&mut self, req: pb::FaultRequest) -> Result<(), String> {
        match self {
            // The stream's task sends it; a broken stream shows as an answer.
            Self::Grpc { tx, .. } => {
                let _ = tx.send(req);
                Ok(())
            }
            Self::Lean(s) => s.send(&req).await,
        }
    }

    /// The next answer; `None` once the server closed the stream.
    /// Cancel-safe.
    async fn next(&mut self) -> Option<Result<pb::FaultResponse, String>> {
        match self {
            Self::Grpc { answers, .. } => answers
                .next()
                .await
                .map(|a| a.map_err(|status| status.message().to_owned())),
            Self::Lean(s) => s.next().await,
        }
    }
}

/// Opens the `Fault` stream on `url` (a new connection, whose tasks run on
/// the calling runtime): on the lean transport where the server offers it
/// and the configuration allows it, else over gRPC.
pub(crate) async fn open_session(shared: &Shared, url: &str) -> Result<Session, String> {
    if shared.config.fault_transport != StreamTransport::Grpc {
        match lean::open(shared, url).await? {
            lean::Opened::Session(s) => return Ok(Session::Lean(s)),
            lean::Opened::Unsupported(why)
                if shared.config.fault_transport == StreamTransport::Lean =>
            {
                return Err(format!("{why}, and --fault-transport lean was asked for"));
            }
            lean::Opened::Unsupported(why) => {
                tracing::debug!("demand link: {why}; using gRPC");
            }
        }
    }
    let remote = Remote::connect_with(url, &shared.config.connect)
        .await
        .map_err(|e| e.to_string())?;
    // A fail-over server must serve the manifest in use (crate::fleet).
    shared
        .fleet
        .check(&remote, &shared.manifest)
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
    Ok(Session::Grpc { tx, answers })
}

/// The link's state across connections.
struct Link {
    shared: Arc<Shared>,
    /// Requests by the id they were last sent with.
    pending: HashMap<u64, Pending>,
    next_id: u64,
    /// Index into the server list of the next connection attempt.
    server: usize,
    /// Backoff between connection attempts; reset once a connection answers.
    connect: Backoff,
    /// Since when no connection has answered (for the log).
    down_since: Option<Instant>,
    /// Answers whose install met EAGAIN, kept to install again (see
    /// [`Link::settle`]).
    again: Vec<(Pending, PageBatch)>,
}

/// Runs the demand link until the pager stops. `opened`: the stream opened
/// by `Pager::start` (before the first fault), with the index of its server
/// in the list.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Demand>,
    opened: Option<(Session, usize)>,
) {
    let mut link = Link {
        shared,
        pending: HashMap::new(),
        next_id: 1,
        server: 0,
        connect: Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF),
        down_since: None,
        again: Vec::new(),
    };
    if let Some((session, server)) = opened {
        let servers = &link.shared.config.servers;
        let url = servers[server % servers.len()].clone();
        link.server = server + 1;
        if !link.serve(session, &mut rx, &url).await {
            return;
        }
    }
    loop {
        let servers = &link.shared.config.servers;
        let url = servers[link.server % servers.len()].clone();
        link.server += 1;
        let limit = OPEN_TIMEOUT.min(link.shared.config.deadline.max(TICK));
        let opened = tokio::time::timeout(limit, open_session(&link.shared, &url)).await;
        let session = match opened {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                link.connection_failed(&e);
                None
            }
            Err(_) => {
                link.connection_failed(&format!(
                    "{url} accepted the connection but did not open the Fault stream within \
                     {limit:?}"
                ));
                None
            }
        };
        match session {
            Some(session) => {
                if !link.serve(session, &mut rx, &url).await {
                    return;
                }
            }
            None => {
                if !link.wait_out(&mut rx).await {
                    return;
                }
            }
        }
    }
}

impl Link {
    fn connection_failed(&mut self, why: &str) {
        let since = *self.down_since.get_or_insert_with(Instant::now);
        tracing::warn!(
            "demand link: {why} (no answer for {:.1}s; {} request(s) waiting)",
            since.elapsed().as_secs_f64(),
            self.pending.len()
        );
        for p in self.pending.values_mut() {
            p.sent = None;
            p.last_error = Some(why.to_owned());
        }
    }

    /// Waits out the connection backoff, taking new requests meanwhile (they
    /// wait, and count toward the deadline, like the others) and applying
    /// the deadline. False once the pager is stopping.
    async fn wait_out(&mut self, rx: &mut mpsc::UnboundedReceiver<Demand>) -> bool {
        let pause = self.connect.next_delay();
        let until = tokio::time::Instant::now() + pause;
        loop {
            self.check_deadlines();
            tokio::select! {
                d = rx.recv() => match d {
                    Some(d) => self.add(d),
                    None => return false,
                },
                () = tokio::time::sleep_until(until) => return true,
                () = tokio::time::sleep(AGAIN_PAUSE), if !self.again.is_empty() => {
                    self.retry_installs();
                }
            }
        }
    }

    fn add(&mut self, d: Demand) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, Pending::new(d));
    }

    /// Sends every request due on `session` (a new id for each send).
    async fn send_due(&mut self, session: &mut Session) -> Result<(), String> {
        let now = Instant::now();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due(now))
            .map(|(id, _)| *id)
            .collect();
        for old in due {
            let p = self.pending.remove(&old).expect("listed");
            let Some(mut p) = self.answer_from_page_file(p) else {
                continue;
            };
            let id = self.next_id;
            self.next_id += 1;
            p.sent = Some(now);
            p.retry_at = None;
            let req = fault_request(id, p.demand.range);
            self.pending.insert(id, p);
            session.send(req).await?;
        }
        Ok(())
    }

    /// Serves one connection until it breaks or stalls; false once the
    /// pager is stopping.
    async fn serve(
        &mut self,
        mut session: Session,
        rx: &mut mpsc::UnboundedReceiver<Demand>,
        url: &str,
    ) -> bool {
        for p in self.pending.values_mut() {
            p.sent = None;
        }
        if let Err(e) = self.send_due(&mut session).await {
            self.connection_failed(&format!("sending to {url} failed: {e}"));
            return self.wait_out(rx).await;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                d = rx.recv() => {
                    let Some(d) = d else { return false };
                    // On the server's host: from its page file, here.
                    let Some(mut p) = self.answer_from_page_file(Pending::new(d)) else {
                        continue;
                    };
                    // The fault path: straight onto the wire.
                    let id = self.next_id;
                    self.next_id += 1;
                    let range = p.demand.range;
                    p.sent = Some(Instant::now());
                    self.pending.insert(id, p);
                    if let Err(e) = session.send(fault_request(id, range)).await {
                        self.connection_failed(&format!("sending to {url} failed: {e}"));
                        return self.wait_out(rx).await;
                    }
                }
                answer = session.next() => match answer {
                    Some(Ok(resp)) => {
                        if self.down_since.take().is_some() {
                            self.shared.counters.reconnect();
                            tracing::info!("demand link: {url} answers again");
                        }
                        self.connect.reset();
                        // Retries it schedules go out on a later tick.
                        self.answer(resp);
                    }
                    Some(Err(why)) => {
                        self.connection_failed(&format!(
                            "the Fault stream on {url} failed: {why}"
                        ));
                        return self.wait_out(rx).await;
                    }
                    None => {
                        self.connection_failed(&format!("{url} closed the Fault stream"));
                        return self.wait_out(rx).await;
                    }
                },
                () = tokio::time::sleep(AGAIN_PAUSE), if !self.again.is_empty() => {
                    self.retry_installs();
                }
                // Only while requests wait: an idle link sleeps.
                _ = tick.tick(), if !self.pending.is_empty() => {
                    self.check_deadlines();
                    let stalled = self
                        .pending
                        .values()
                        .filter_map(|p| p.sent)
                        .min()
                        .is_some_and(|t| t.elapsed() >= STALL_TIMEOUT);
                    if stalled {
                        self.connection_failed(&format!(
                            "{url} has not answered a request for {STALL_TIMEOUT:?}; trying \
                             the next server"
                        ));
                        return self.wait_out(rx).await;
                    }
                    if let Err(e) = self.send_due(&mut session).await {
                        self.connection_failed(&format!("sending to {url} failed: {e}"));
                        return self.wait_out(rx).await;
                    }
                }
            }
        }
    }

    /// Answers `p` from the page file of a server on this host, if there is
    /// one and the page cache holds the pages (never waiting for a disk on
    /// this thread): settled as an answer from the stream would be (digests
    /// checked, retries, policy). Gives `p` back to go on the stream
    /// otherwise.
    fn answer_from_page_file(&mut self, p: Pending) -> Option<Pending> {
        let Some(file) = &self.shared.page_file else {
            return Some(p);
        };
        match file.read(&self.shared.manifest, p.demand.range, |_| true, true) {
            Ok(Some(batch)) => {
                self.settle(p, batch);
                None
            }
            Ok(None) => Some(p),
            Err(e) => {
                tracing::warn!("demand link: reading the page file failed: {e}; asking the server");
                Some(p)
            }
        }
    }

    /// Installs again the answers set aside for EAGAIN.
    fn retry_installs(&mut self) {
        for (p, batch) in std::mem::take(&mut self.again) {
            self.settle(p, batch);
        }
    }

    /// Applies the failure policy to requests failing past the deadline.
    fn check_deadlines(&mut self) {
        let deadline = self.shared.config.deadline;
        let policy = self.shared.config.on_failure;
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.past(deadline))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let p = self.pending.get_mut(&id).expect("listed");
            let why = p
                .last_error
                .clone()
                .unwrap_or_else(|| "the server did not answer".into());
            if policy == OnFailure::Wait {
                if !p.waiting_past_deadline {
                    p.waiting_past_deadline = true;
                    tracing::error!(
                        "cannot fill {} of region {} for {deadline:?} ({why}); still trying \
                         (--on-failure wait)",
                        p.demand.range,
                        p.demand.region
                    );
                }
                continue;
            }
            let p = self.pending.remove(&id).expect("listed");
            self.give_up(p, &why);
        }
    }

    /// Applies the failure policy to `p` (not `wait`). If some of its pages
    /// could not be poisoned yet (EAGAIN: this thread has an event to read
    /// first), it is kept and tried again on a later tick.
    fn give_up(&mut self, mut p: Pending, why: &str) {
        if !give_up(&self.shared, &p.demand, &p.demand.claimed, why) {
            p.retry_later(why.to_owned());
            self.insert_retry(p);
        }
    }

    /// Handles one answer.
    fn answer(&mut self, resp: pb::FaultResponse) {
        let shared = self.shared.clone();
        let Some(p) = self.pending.remove(&resp.request_id) else {
            return;
        };
        let batch = match resp.result {
            Some(pb::fault_response::Result::Pages(batch)) => {
                match decode_batch(batch, &shared.manifest) {
                    Ok(b) => b,
                    Err(e) => return self.failed(p, e.to_string()),
                }
            }
            Some(pb::fault_response::Result::Error(e)) => {
                return self.failed(p, format!("the server refused: {}", e.message));
            }
            None => return self.failed(p, "the server sent an empty answer".into()),
        };
        self.settle(p, batch);
    }

    /// Installs the verified pages of an answer and settles the request:
    /// done, retried (corrupt or failed pages), given up (the policy), or
    /// set aside with its batch while a memory-map event is pending.
    fn settle(&mut self, mut p: Pending, batch: PageBatch) {
        let shared = self.shared.clone();
        let installed = install_batch(&shared, &p.demand, &batch);
        shared.demand_progress();
        if installed.again {
            // A memory-map event is pending on the uffd, and this thread is
            // the one that reads it (the fault loop, a task beside this
            // one): the pages stay claimed, the batch is kept (verified), and
            // the install is tried again after `AGAIN_PAUSE`, once the event
            // is read and its thread resumed.
            p.demand.claimed = installed.left;
            if p.past(shared.config.deadline) && shared.config.on_failure != OnFailure::Wait {
                return self.failed(p, "memory-map events kept the install refused".into());
            }
            self.again.push((p, batch));
            return;
        }
        if installed.left.iter().all(|c| !c) {
            if p.demand.fault.is_some() {
                shared.counters.latency(p.demand.started.elapsed());
            }
            return;
        }
        p.demand.claimed = installed.left;
        if let Some(why) = installed.failed {
            if shared.is_stopping() {
                return;
            }
            return self.failed(p, why);
        }
        p.corrupt += 1;
        if p.corrupt > CORRUPT_RETRIES && shared.config.on_failure != OnFailure::Wait {
            self.give_up(
                p,
                "pages keep failing their digest: the snapshot on the server is corrupt",
            );
            return;
        }
        let why = format!(
            "pages of {} failed their digest {} time(s)",
            p.demand.range, p.corrupt
        );
        let pause = p.retry_later(why.clone());
        tracing::warn!("{why}; fetching them again in {pause:?}");
        self.insert_retry(p);
    }

    /// A request failed: retry it after its backoff, or, past the deadline,
    /// apply the policy (`wait`: retry all the same).
    fn failed(&mut self, mut p: Pending, why: String) {
        let policy = self.shared.config.on_failure;
        if p.past(self.shared.config.deadline) && policy != OnFailure::Wait {
            self.give_up(p, &why);
            return;
        }
        let pause = p.retry_later(why.clone());
        tracing::warn!(
            "demand link: {} of region {}: {why}; retrying in {pause:?}",
            p.demand.range,
            p.demand.region
        );
        self.insert_retry(p);
    }

    fn insert_retry(&mut self, p: Pending) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, p);
    }
}

/// Gives up on the `which` pages of `demand`, per policy: poison them (the
/// faulting thread gets SIGBUS) or abort the process. Never called for
/// `wait`. False if some pages could not be poisoned yet (EAGAIN).
fn give_up(shared: &Shared, demand: &Demand, which: &[bool], why: &str) -> bool {
    let region = &shared.regions[demand.region];
    match shared.config.on_failure {
        OnFailure::Wait => true,
        OnFailure::Abort => abort_process(&format!(
            "cannot fill {} of region {}: {why}",
            demand.range, demand.region
        )),
        OnFailure::Poison => {
            tracing::error!(
                "cannot fill {} of region {}: {why}; poisoning them (touching them raises SIGBUS)",
                demand.range,
                demand.region
            );
            let pages = demand.range.iter().zip(which).filter(|(_, c)| **c);
            shared.poison_claimed(region, pages.map(|(p, _)| p), Caller::FaultThread)
        }
    }
}

/// The failure policy `abort`: the server could not fill the guest's memory
/// within the deadline, and the user asked for the process to end then.
fn abort_process(msg: &str) -> ! {
    tracing::error!("{msg}; aborting (--on-failure abort)");
    eprintln!("faultline: fatal: {msg}; aborting (--on-failure abort)");
    std::process::abort();
}

/// What installing an answer left to do.
struct Installed {
    /// Per page of the range: claimed and not installed (corrupt, missing
    /// from the batch, or its install failed); those stay claimed.
    left: Vec<bool>,
    /// Why an install failed, if one did (pages of that run are in `left`).
    failed: Option<String>,
    /// An install met EAGAIN (a memory-map event pending; pages of that run
    /// are in `left`).
    again: bool,
}

/// Installs the claimed pages of `demand` found in `batch`, each verified
/// against its digest.
fn install_batch(shared: &Shared, demand: &Demand, batch: &PageBatch) -> Installed {
    if shared.regions[demand.region].is_mixed() {
        // A 4 KiB snapshot in hugetlbfs memory: whole 2 MiB units (units.rs).
        let done = super::units::install_demand(shared, demand, batch);
        return Installed {
            left: done.left,
            failed: done.failed,
            again: done.again,
        };
    }
    let manifest = &shared.manifest;
    let start = demand.range.start().0;
    let mut left = demand.claimed.clone();
    let mut failed = None;
    let mut again = false;
    let ps = manifest.page_size.bytes_usize();
    for run in &batch.runs {
        // Consecutive pages of the run that are ours and verified, installed
        // with one call.
        let mut from: Option<u64> = None;
        let mut flush = |from: &mut Option<u64>, to: u64, left: &mut Vec<bool>| {
            if let Some(f) = from.take() {
                let off = (f - run.range.start().0) as usize * ps;
                let len = (to - f) as usize * ps;
                if let Err(e) = install_run(shared, demand, PageIndex(f), &run.data[off..off + len])
                {
                    for q in f..to {
                        left[(q - start) as usize] = true;
                    }
                    if matches!(e, InstallError::Again { .. }) {
                        again = true;
                    } else {
                        failed = Some(e.to_string());
                    }
                }
            }
        };
        for (p, data) in run.pages(manifest.page_size) {
            let i = p.0.checked_sub(start).map(|i| i as usize);
            let ours = i.is_some_and(|i| i < left.len() && left[i]);
            let ok = ours && shared.table.get(p) == PageState::InFlight && {
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
                flush(&mut from, p.0, &mut left);
            }
        }
        flush(&mut from, run.range.end(), &mut left);
    }
    // Pages the guest discarded while they were being fetched (a REMOVE made
    // them ZeroOnFault) are no longer this request's to install: drop
    // them (retrying would never end) and wake any thread still waiting on
    // them, whose retry then reads zeros.
    let region = &shared.regions[demand.region];
    for (i, p) in demand.range.iter().enumerate() {
        if left[i] && shared.table.get(p) != PageState::InFlight {
            left[i] = false;
            region.wake(p);
        }
    }
    // Pages the batch flagged zero were claimed because the manifest says
    // they are not: a server out of step with its manifest. They stay in
    // `left` and are treated as corrupt.
    Installed {
        left,
        failed,
        again,
    }
}

/// Installs verified bytes for consecutive claimed pages and settles them,
/// on the fault thread (where the link runs): EAGAIN is not waited out but
/// reported, since this thread reads the pending event. If that fails, the
/// pages stay claimed (the request retries them after a backoff), and the
/// pager ends if the error says it must.
fn install_run(
    shared: &Shared,
    demand: &Demand,
    start: PageIndex,
    data: &[u8],
) -> Result<(), InstallError> {
    let region = &shared.regions[demand.region];
    let installed = shared.install_claimed(
        region,
        start,
        data,
        Source::Readahead,
        demand.fault,
        Caller::FaultThread,
    );
    if let Err(e) = &installed {
        shared.on_install_error(e);
    }
    installed
}
