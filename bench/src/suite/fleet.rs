//! Scenario 8: Fleet.
//!
//! One Garage (a real S3 server, single node on 127.0.0.1), 1 and 3
//! `faultline-server serve` processes in front of it, and [`RESTORES`]
//! client restores of [`SNAPSHOTS`] snapshots that share a base image; next
//! to the same restores from a local-directory store, served by the same
//! binary in the same run. Arms are interleaved per repeat.
//!
//! The images: a base image ([`crate::image`]'s realistic pattern) and
//! [`SNAPSHOTS`] variants of it, each rewriting every [`DIRTY_PAGE_EVERY`]th
//! page of one in [`DIRTY_CHUNK_EVERY`] of its 2 MiB chunks (a different
//! chunk set per variant). A guest's dirty pages cluster like that (by
//! allocation), which is what lets content-addressed chunks dedup; pages
//! changed uniformly at random would touch every chunk. All five images are
//! imported into both stores (base first); the object store reports the
//! chunks it did not upload.
//!
//! Each run starts fresh server processes (cold chunk caches), waits until
//! every one is ready (`/readyz`), then runs the restores as client
//! processes (`faultline-bench fleet-client`), at most [`CONCURRENCY`] at
//! once, each given every server: the fleet client homes each snapshot on
//! one server by rendezvous hashing. Each client restores into fresh
//! anonymous memory with a full prefetch, then checks the whole image
//! against the checksum of the generated file (outside its timed part).
//! Store GETs, bytes and the chunk cache's hits are read from the servers'
//! Prometheus metrics before and after the restores.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use faultline_client::backing::{BackingKind, GuestMemory};
use faultline_client::fleet::rendezvous;
use faultline_client::pager::{PagerConfig, PrefetchPolicy};
use faultline_microvm::pattern::fill_page;
use faultline_proto::{PageSize, SnapshotId};
use faultline_server::LocalStore;
use faultline_server::garage::Garage;
use faultline_server::import::import;
use faultline_server::store::object::{CHUNK_BYTES, ChunkStats, ObjectStoreOptions};
use faultline_server::{Limits, chunk_cache, store::object::metrics as store_metrics};
use serde::{Deserialize, Serialize};

use super::fanout::{REAP_INTERVAL, Reaped, children_cpu, json_line, read_machine_ticks, tail};
use super::report::{Bar, Percentiles, Plot, ratio};
use super::working_set::fold_page;
use super::{Ctx, ScenarioReport, Summary, Table, Target};

/// Snapshot size with `--quick`: 16 chunks, one rewritten per snapshot.
/// The four arms take about 15 s in release on 2 busy cores, and about a
/// minute in the debug build that `bench/tests/suite.rs` runs (64 MiB took
/// twice that).
const QUICK_IMAGE_BYTES: u64 = 32 << 20;

/// Snapshot size in a full run: 64 restores of it are 17 GB per arm, and
/// the five images (base and variants) fit twice on a small disk (both
/// stores) next to everything else.
const FULL_IMAGE_BYTES: u64 = 256 << 20;

/// Snapshots restored (variants of one base image): the four.
const SNAPSHOTS: usize = 4;

/// Restores per run, spread evenly over the snapshots: the 64.
const RESTORES: usize = 64;

/// Client processes at once: enough to keep 2 cores busy and to make
/// restores of one snapshot overlap on its server (its cache's single
/// flight), few enough that their memory (8 × 256 MiB) stays small.
const CONCURRENCY: usize = 8;

/// Variant `v` rewrites the chunks whose index is `v` modulo this: one in 16
/// chunks per variant (6%), disjoint between variants (it exceeds
/// [`SNAPSHOTS`]).
const DIRTY_CHUNK_EVERY: u64 = 16;

/// In a rewritten chunk, every 8th page changes: 0.8% of a variant's pages
/// differ from the base, clustered in its rewritten chunks.
const DIRTY_PAGE_EVERY: u64 = 8;

/// Seed of the base image's pattern.
const BASE_SEED: u64 = 1;

/// Page size of the images.
const PAGE: u64 = 4096;

/// Server processes per arm: one, and the fleet of three.
const SERVER_COUNTS: [usize; 2] = [1, 3];

/// Each server's chunk cache (`--chunk-cache`): the server's default, far
/// above the distinct chunks of the four snapshots (about 1.3x one image),
/// so that a miss is a first read, never an eviction.
const CHUNK_CACHE: &str = "1G";

/// Prefix of the snapshots in the bucket.
const S3_PREFIX: &str = "fleet";

/// Longest wait for a server process to be ready.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often readiness is polled while servers start.
const READY_POLL: Duration = Duration::from_millis(50);

/// Longest a run's restores may take before the stragglers are killed and
/// the scenario fails: about 10x a full run measured on 2 busy cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(400);

/// Longest one client waits for its restore to complete.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest wait for a server to stop after SIGTERM (its streams have all
/// ended by then).
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a metrics scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the snapshots are served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum StoreKind {
    /// A store directory on local disk (the page cache holds it).
    Local,
    /// The S3 bucket in Garage.
    S3,
}

impl StoreKind {
    fn label(self) -> &'static str {
        match self {
            Self::Local => "local dir",
            Self::S3 => "S3 (Garage)",
        }
    }
}

/// One configuration of the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
struct Arm {
    store: StoreKind,
    servers: usize,
}

impl Arm {
    fn label(self) -> String {
        let s = if self.servers == 1 { "" } else { "s" };
        format!("{}, {} server{s}", self.store.label(), self.servers)
    }
}

/// The arms, in run order: each server count from local then S3, so that
/// a noisy neighbour hits the pair alike.
fn arms() -> Vec<Arm> {
    SERVER_COUNTS
        .iter()
        .flat_map(|&servers| [StoreKind::Local, StoreKind::S3].map(|store| Arm { store, servers }))
        .collect()
}

// ---------------------------------------------------------------------------
// Images

/// The chunk (of the object store's [`CHUNK_BYTES`]) that 4 KiB page `page`
/// lies in.
fn chunk_of(page: u64) -> u64 {
    page * PAGE / CHUNK_BYTES
}

/// Whether snapshot `variant` (1..=[`SNAPSHOTS`]; 0 is the base) rewrites
/// `page`.
fn rewritten(variant: usize, page: u64) -> bool {
    variant != 0
        && chunk_of(page) % DIRTY_CHUNK_EVERY == variant as u64
        && page.is_multiple_of(DIRTY_PAGE_EVERY)
}

/// Writes page `page` of image `variant` into `buf` (one page): the base
/// pattern, or for a rewritten page random bytes (never all zeros).
fn fill(variant: usize, page: u64, buf: &mut [u8]) {
    if !rewritten(variant, page) {
        fill_page(BASE_SEED, page, buf);
        return;
    }
    let mut state = ((variant as u64) << 48 ^ page).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in buf.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
}

/// A generated image: what the restores must reproduce.
#[derive(Clone, Debug)]
struct GenImage {
    /// Snapshot name.
    name: String,
    /// The raw file (deleted after the imports).
    path: PathBuf,
    /// [`fold_page`] over every page in order.
    checksum: u64,
    /// A 64-bit hash of each chunk's bytes; `None` for a chunk of zeros
    /// (never stored).
    chunks: Vec<Option<u64>>,
}

/// Snapshot name of image `variant`.
fn image_name(variant: usize) -> String {
    if variant == 0 {
        "fleet-base".into()
    } else {
        format!("fleet-{variant}")
    }
}

/// Writes image `variant` of `size` bytes (a multiple of [`CHUNK_BYTES`])
/// to `path`.
fn write_image(variant: usize, size: u64, path: &Path) -> anyhow::Result<GenImage> {
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let pages_per_chunk = CHUNK_BYTES / PAGE;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    let mut checksum = 0u64;
    let mut chunks = Vec::new();
    for chunk in 0..size / CHUNK_BYTES {
        for (i, page) in buf.chunks_exact_mut(PAGE as usize).enumerate() {
            fill(variant, chunk * pages_per_chunk + i as u64, page);
            checksum = fold_page(checksum, page);
        }
        chunks.push(if buf.iter().all(|&b| b == 0) {
            None
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            buf.hash(&mut h);
            Some(h.finish())
        });
        file.write_all(&buf)?;
    }
    file.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(GenImage {
        name: image_name(variant),
        path: path.to_path_buf(),
        checksum,
        chunks,
    })
}

/// Chunk bytes the servers must read at least in one run: for each server,
/// the distinct non-zero chunks of the snapshots homed on it.
fn needed_chunk_bytes(images: &[GenImage], homes: &[usize]) -> u64 {
    let mut per_server: HashMap<usize, HashSet<u64>> = HashMap::new();
    for (image, &home) in images.iter().zip(homes) {
        per_server
            .entry(home)
            .or_default()
            .extend(image.chunks.iter().flatten());
    }
    per_server.values().map(|s| s.len() as u64).sum::<u64>() * CHUNK_BYTES
}

// ---------------------------------------------------------------------------
// Metrics

/// The sum of the samples of `name` in a Prometheus text exposition, over
/// the samples whose labels include `label` (e.g. `op="get"`), or all.
fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            if let Some(want) = label
                && !labels.split(',').any(|l| l.trim() == want)
            {
                return None;
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// What one server's metrics say about its store and chunk cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
struct StoreCounters {
    /// GET requests to the object store (each try).
    gets: u64,
    /// Bytes read from the object store.
    read_bytes: u64,
    /// Chunk lookups served from memory.
    hits: u64,
    /// Chunk lookups that fetched from the store.
    misses: u64,
    /// Chunk lookups that waited for another's fetch.
    coalesced: u64,
}

impl StoreCounters {
    /// The counters in a `/metrics` text.
    fn parse(text: &str) -> Self {
        let get = |name, label| metric_sum(text, name, label).round() as u64;
        Self {
            gets: get(store_metrics::STORE_REQUESTS, Some("op=\"get\"")),
            read_bytes: get(store_metrics::STORE_READ_BYTES, None),
            hits: get(chunk_cache::CACHE_HITS, None),
            misses: get(chunk_cache::CACHE_MISSES, None),
            coalesced: get(chunk_cache::CACHE_COALESCED, None),
        }
    }

    /// What changed from `before` to `self`.
    fn since(self, before: Self) -> Self {
        Self {
            gets: self.gets.saturating_sub(before.gets),
            read_bytes: self.read_bytes.saturating_sub(before.read_bytes),
            hits: self.hits.saturating_sub(before.hits),
            misses: self.misses.saturating_sub(before.misses),
            coalesced: self.coalesced.saturating_sub(before.coalesced),
        }
    }

    /// The sum of `self` and `other`.
    fn plus(self, other: Self) -> Self {
        Self {
            gets: self.gets + other.gets,
            read_bytes: self.read_bytes + other.read_bytes,
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            coalesced: self.coalesced + other.coalesced,
        }
    }

    /// Share of chunk lookups that cost no store read: (hits + coalesced) /
    /// all lookups (docs/deploy.md, "Sizing the cache"); 0 with none.
    fn hit_ratio(self) -> f64 {
        let all = self.hits + self.misses + self.coalesced;
        if all == 0 {
            0.0
        } else {
            (self.hits + self.coalesced) as f64 / all as f64
        }
    }
}

/// `GET path` over HTTP/1.0 (so the body is not chunked); the body of a
/// 200 answer, `None` otherwise.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).ok()?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1)? == "200").then(|| body.to_owned())
}

// ---------------------------------------------------------------------------
// Processes

/// What a `fleet-client` prints: one line of JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientLine {
    /// Seconds from the pager's start (plan, connect, manifest) to
    /// completion, inside the client process.
    pub elapsed_s: f64,
    /// Seconds the checksum of the restored memory took (after `elapsed_s`).
    pub verify_s: f64,
    /// Page bytes received.
    pub bytes_received: u64,
    /// The snapshot's home server (rendezvous hashing over the servers).
    pub home: String,
    /// Times the pager reconnected or moved to another server.
    pub reconnects: u64,
}

/// Arguments of the hidden `fleet-client` subcommand.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// A server URL of the fleet (repeated).
    #[arg(long = "server", required = true)]
    pub servers: Vec<String>,
    /// Snapshot to restore.
    #[arg(long)]
    pub snapshot: String,
    /// The image's size in bytes.
    #[arg(long)]
    pub size: u64,
    /// The image's checksum (hex): the restored memory must fold to it.
    #[arg(long, value_parser = parse_hex)]
    pub checksum: u64,
}

fn parse_hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| format!("{s:?}: {e}"))
}

/// `faultline-bench fleet-client`: one restore of `args.snapshot` from the
/// fleet `args.servers` into fresh anonymous memory (full prefetch, nothing
/// touched), then the whole memory checked against `args.checksum`; prints
/// a [`ClientLine`].
pub fn client_main(args: &ClientArgs) -> anyhow::Result<()> {
    let id = SnapshotId::new(&args.snapshot)?;
    let home = rendezvous(&args.servers, &id)
        .into_iter()
        .next()
        .context("no server given")?;
    let mut config = PagerConfig::new(home.clone(), id.clone());
    config.servers = args.servers.clone();
    config.prefetch = PrefetchPolicy::All;
    let len = usize::try_from(args.size).context("the image does not fit in memory")?;
    let memory = GuestMemory::new(BackingKind::Anonymous, len)?;
    let started = Instant::now();
    let pager = super::start_pager(config, memory).context("starting the pager")?;
    let stats = pager
        .wait_complete(RESTORE_TIMEOUT)
        .with_context(|| format!("the restore did not complete within {RESTORE_TIMEOUT:?}"))?;
    let elapsed_s = started.elapsed().as_secs_f64();
    ensure!(
        pager.manifest().image_size() == args.size,
        "the snapshot has {} bytes, not {}",
        pager.manifest().image_size(),
        args.size
    );
    let verifying = Instant::now();
    let mut page = vec![0u8; PAGE as usize];
    let mut checksum = 0u64;
    for p in 0..args.size / PAGE {
        pager
            .memory(0)
            .guest()
            .read((p * PAGE) as usize, &mut page)
            .context("reading the restored memory")?;
        checksum = fold_page(checksum, &page);
    }
    ensure!(
        checksum == args.checksum,
        "the restored memory's checksum {checksum:#018x} differs from the image's {:#018x}",
        args.checksum
    );
    let line = ClientLine {
        elapsed_s,
        verify_s: verifying.elapsed().as_secs_f64(),
        bytes_received: stats.bytes_received,
        home,
        reconnects: stats.reconnects,
    };
    println!("{}", serde_json::to_string(&line)?);
    Ok(())
}

/// A `faultline-server serve` process.
struct Server {
    process: Reaped,
    url: String,
    metrics: SocketAddr,
    log: PathBuf,
}

/// Starts `n` servers of `store` (a directory or `s3://...`, reached with
/// `env`) and waits until all are ready.
fn start_servers(
    bin: &Path,
    store: &str,
    env: &[(String, String)],
    n: usize,
    scratch: &Path,
) -> anyhow::Result<Vec<Server>> {
    let mut servers = Vec::with_capacity(n);
    // A gRPC and a metrics port for each server, all distinct.
    let ports = faultline_server::testing::free_ports(2 * n)?;
    for (i, pair) in ports.chunks_exact(2).enumerate() {
        let grpc = format!("127.0.0.1:{}", pair[0]);
        let metrics = SocketAddr::from(([127, 0, 0, 1], pair[1]));
        let log = scratch.join(format!("server-{i}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(["serve", "--store", store, "--listen", &grpc])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--chunk-cache", CHUNK_CACHE])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        servers.push(Server {
            process: Reaped::new(child),
            url: format!("http://{grpc}"),
            metrics,
            log,
        });
    }
    let started = Instant::now();
    for s in &mut servers {
        loop {
            if http_get(s.metrics, "/readyz").is_some() {
                break;
            }
            if let Some(status) = s.process.poll()? {
                bail!("server {} exited ({status}): {}", s.url, tail(&s.log));
            }
            if started.elapsed() > SERVER_START_TIMEOUT {
                bail!(
                    "server {} was not ready within {SERVER_START_TIMEOUT:?}: {}",
                    s.url,
                    tail(&s.log)
                );
            }
            std::thread::sleep(READY_POLL);
        }
    }
    Ok(servers)
}

/// Scrapes each server's store counters.
fn scrape(servers: &[Server]) -> anyhow::Result<Vec<StoreCounters>> {
    servers
        .iter()
        .map(|s| {
            http_get(s.metrics, "/metrics")
                .map(|t| StoreCounters::parse(&t))
                .with_context(|| format!("scraping http://{}/metrics", s.metrics))
        })
        .collect()
}

/// Stops the servers (SIGTERM, as an orchestrator would) and checks that
/// they exit cleanly.
fn stop_servers(servers: Vec<Server>) -> anyhow::Result<()> {
    for s in &servers {
        let pid = libc::pid_t::try_from(s.process.child.id())?;
        // SAFETY: kill(2) on the pid of our own child, which is not reaped
        // yet (Reaped reaps it only below or on drop), so the pid is its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    for mut s in servers {
        let stopping = Instant::now();
        let status = loop {
            if let Some(status) = s.process.poll()? {
                break status;
            }
            if stopping.elapsed() > SERVER_STOP_TIMEOUT {
                bail!(
                    "server {} did not stop within {SERVER_STOP_TIMEOUT:?} of SIGTERM",
                    s.url
                );
            }
            std::thread::sleep(REAP_INTERVAL * 5);
        };
        ensure!(
            status.success(),
            "server {} failed ({status}): {}",
            s.url,
            tail(&s.log)
        );
    }
    Ok(())
}

/// One restore of a run, as the parent saw it and the client reported it.
#[derive(Clone, Debug, Serialize)]
struct RestoreRun {
    /// Index of the snapshot (0-based among the variants).
    snapshot: usize,
    /// Spawn to exit, as the parent saw it (exec, restore, checksum).
    process_s: f64,
    #[serde(flatten)]
    line: ClientLine,
}

/// One run of an arm.
#[derive(Clone, Debug, Serialize)]
struct Run {
    arm: Arm,
    repeat: usize,
    /// First spawn to last exit.
    wall_s: f64,
    /// RESTORES × image bytes / `wall_s`, GB/s.
    aggregate_gbps: f64,
    /// Share of the machine's CPU time that was busy during the run.
    machine_busy: f64,
    /// CPU seconds of the client processes.
    clients_cpu_s: f64,
    /// The machine's 1-minute load average when the restores ended.
    load_average: f64,
    /// Home server (index) of each snapshot.
    homes: Vec<usize>,
    /// Chunk bytes the servers had to read at least (S3 only; 0 for local).
    needed_chunk_bytes: u64,
    /// Each server's counters over the restores.
    per_server: Vec<StoreCounters>,
    restores: Vec<RestoreRun>,
}

impl Run {
    fn total(&self) -> StoreCounters {
        self.per_server
            .iter()
            .fold(StoreCounters::default(), |a, &b| a.plus(b))
    }
}

/// What one run needs to know about the snapshots and where they are.
struct Setup<'a> {
    exe: PathBuf,
    server_bin: PathBuf,
    images: &'a [GenImage],
    image_bytes: u64,
    local_store: String,
    s3_store: String,
    s3_env: Vec<(String, String)>,
    scratch: PathBuf,
}

/// Runs `arm` once: fresh servers, the restores at bounded concurrency.
fn run_arm(setup: &Setup<'_>, arm: Arm, repeat: usize) -> anyhow::Result<Run> {
    let (store, env): (&str, &[(String, String)]) = match arm.store {
        StoreKind::Local => (&setup.local_store, &[]),
        StoreKind::S3 => (&setup.s3_store, &setup.s3_env),
    };
    let servers = start_servers(&setup.server_bin, store, env, arm.servers, &setup.scratch)?;
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let homes: Vec<usize> = setup
        .images
        .iter()
        .map(|img| {
            let id = SnapshotId::new(&img.name)?;
            let home = &rendezvous(&urls, &id)[0];
            Ok(urls.iter().position(|u| u == home).expect("one of them"))
        })
        .collect::<anyhow::Result<_>>()?;
    let before = scrape(&servers)?;

    let children0 = children_cpu();
    let machine0 = read_machine_ticks();
    let started = Instant::now();
    let mut pending: VecDeque<usize> = (0..RESTORES).collect();
    let mut running: Vec<(usize, Reaped, Instant, PathBuf)> = Vec::new();
    let mut restores = Vec::with_capacity(RESTORES);
    let mut wall = Duration::ZERO;
    while !pending.is_empty() || !running.is_empty() {
        if started.elapsed() > RUN_TIMEOUT {
            // Dropping `running` kills the stragglers.
            bail!(
                "{} restores were unfinished after {RUN_TIMEOUT:?}; killed them",
                running.len() + pending.len()
            );
        }
        while running.len() < CONCURRENCY
            && let Some(i) = pending.pop_front()
        {
            let image = &setup.images[i % SNAPSHOTS];
            let log = setup.scratch.join(format!("client-{i}.log"));
            let stderr = std::fs::File::create(&log)?;
            let mut cmd = Command::new(&setup.exe);
            cmd.arg("fleet-client");
            for url in &urls {
                cmd.args(["--server", url]);
            }
            let child = cmd
                .args(["--snapshot", &image.name])
                .args(["--size", &setup.image_bytes.to_string()])
                .args(["--checksum", &format!("{:x}", image.checksum)])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("starting restore {i}"))?;
            running.push((i, Reaped::new(child), Instant::now(), log));
        }
        let mut k = 0;
        while k < running.len() {
            if running[k].1.poll()?.is_none() {
                k += 1;
                continue;
            }
            wall = wall.max(started.elapsed());
            let (i, mut client, spawned, log) = running.swap_remove(k);
            let process_s = spawned.elapsed().as_secs_f64();
            let status = client.child.wait()?;
            ensure!(
                status.success(),
                "restore {i} of {} failed ({status}): {}",
                setup.images[i % SNAPSHOTS].name,
                tail(&log)
            );
            let line: ClientLine = json_line(&mut client.child, &format!("restore {i}"))?;
            restores.push(RestoreRun {
                snapshot: i % SNAPSHOTS,
                process_s,
                line,
            });
        }
        std::thread::sleep(REAP_INTERVAL);
    }
    let clients_cpu_s = children_cpu() - children0;
    let machine1 = read_machine_ticks();
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let after = scrape(&servers)?;
    stop_servers(servers)?;

    let per_server = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.since(*b))
        .collect();
    let needed_chunk_bytes = match arm.store {
        StoreKind::Local => 0,
        StoreKind::S3 => needed_chunk_bytes(setup.images, &homes),
    };
    let wall_s = wall.as_secs_f64();
    Ok(Run {
        arm,
        repeat,
        wall_s,
        aggregate_gbps: (RESTORES as u64 * setup.image_bytes) as f64 / wall_s / 1e9,
        machine_busy: (machine1.0 - machine0.0) as f64 / (machine1.1 - machine0.1).max(1) as f64,
        clients_cpu_s,
        load_average,
        homes,
        needed_chunk_bytes,
        per_server,
        restores,
    })
}

// ---------------------------------------------------------------------------
// The scenario

const ID: &str = "fleet";
const TITLE: &str = "Fleet: restores from S3 through 1 and 3 servers";

/// The report of a scenario that could not run, and how to make it run.
fn skipped(why: String) -> ScenarioReport {
    ScenarioReport {
        id: ID.into(),
        title: TITLE.into(),
        skipped: Some(why),
        ..Default::default()
    }
}

/// Removes a directory when dropped (the scenario's images and local store).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// MiB, for display.
fn mib(bytes: f64) -> f64 {
    bytes / f64::from(1 << 20)
}

/// Runs the scenario; skipped (with how to enable it) without Garage or the
/// `faultline-server` binary.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    if !Garage::available() {
        return Ok(skipped(
            "Garage (the S3 server) is not built here; run `scripts/garage.sh install` (builds \
             Garage 2.5.0 from crates.io into ~/.cache/faultline once, 8-25 minutes on 2 cores) \
             and run `faultline-bench fleet` again"
                .into(),
        ));
    }
    let exe = std::env::current_exe().context("finding faultline-bench's own executable")?;
    let server_bin = exe.with_file_name("faultline-server");
    if !server_bin.is_file() {
        return Ok(skipped(format!(
            "no faultline-server next to faultline-bench ({}); build both with `cargo build \
             --release -p faultline-bench -p faultline-server`",
            server_bin.display()
        )));
    }
    let image_bytes = ctx.pick(QUICK_IMAGE_BYTES, FULL_IMAGE_BYTES);
    let repeats = ctx.pick(1, 3);
    let scratch = ctx.scratch(ID)?;
    let _cleanup = RemoveOnDrop(scratch.clone());

    // Garage first: a failure to start it fails fast.
    let bar = ctx.bar("fleet: starting Garage", 1);
    let garage = Garage::start().context("starting Garage")?;
    bar.finish_and_clear();

    let bar = ctx.bar(
        "fleet: generating and importing images",
        2 * (SNAPSHOTS as u64 + 1),
    );
    let images_dir = scratch.join("images");
    std::fs::create_dir_all(&images_dir)?;
    let local_dir = scratch.join("store");
    let local = LocalStore::new(&local_dir)?;
    let s3 = garage
        .store(S3_PREFIX, ObjectStoreOptions::default())
        .context("connecting to Garage")?;
    let limits = Limits::default();
    let mut base_and_variants = Vec::new();
    let mut chunk_stats: Vec<ChunkStats> = Vec::new();
    let mut import_s = Vec::new();
    for variant in 0..=SNAPSHOTS {
        let name = image_name(variant);
        let img = write_image(variant, image_bytes, &images_dir.join(&name))?;
        bar.inc(1);
        for (store, kind) in [
            (
                &local as &dyn faultline_server::SnapshotStore,
                StoreKind::Local,
            ),
            (&s3, StoreKind::S3),
        ] {
            let t = Instant::now();
            ctx.runtime()
                .block_on(import(
                    store,
                    &limits,
                    SnapshotId::new(&name)?,
                    PageSize::Size4K,
                    &[],
                    &img.path,
                    |_| {},
                ))
                .with_context(|| format!("importing {name} into the {kind:?} store"))?;
            import_s.push(serde_json::json!({
                "snapshot": name, "store": kind, "seconds": t.elapsed().as_secs_f64(),
            }));
        }
        let (_, stats) = s3
            .last_write()
            .context("the object store reported no chunks for its import")?;
        chunk_stats.push(stats);
        std::fs::remove_file(&img.path)?;
        base_and_variants.push(img);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let variants = &base_and_variants[1..];
    let dedup = dedup_of(&chunk_stats[1..], &base_and_variants);
    ctx.log(&format!(
        "  imported the base and {SNAPSHOTS} snapshots of {} MiB: the snapshots' {} non-zero \
         chunks needed {} uploads ({:.0}% not uploaded; they rewrote {})",
        image_bytes >> 20,
        dedup.stored,
        dedup.uploaded,
        100.0 * dedup.ratio(),
        dedup.new_chunks,
    ));

    let setup = Setup {
        exe,
        server_bin,
        images: variants,
        image_bytes,
        local_store: local_dir.to_string_lossy().into_owned(),
        s3_store: garage.url(S3_PREFIX),
        s3_env: garage
            .aws_env()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        scratch: scratch.clone(),
    };
    let arms = arms();
    let bar = ctx.bar("fleet", (arms.len() * repeats) as u64);
    let mut runs = Vec::new();
    for repeat in 0..repeats {
        for &arm in &arms {
            let run = run_arm(&setup, arm, repeat)
                .with_context(|| format!("{}, repeat {}", arm.label(), repeat + 1))?;
            let total = run.total();
            let times: Vec<f64> = run.restores.iter().map(|r| r.line.elapsed_s).collect();
            let p = Percentiles::of(&times);
            ctx.log(&format!(
                "  {:<24} {:.2} GB/s aggregate, restore p50 {:.2} s p90 {:.2} s max {:.2} s, \
                 hit ratio {:.3}, {} GETs, {:.0} MiB read (needed {:.0}), machine {:.0}% busy",
                arm.label(),
                run.aggregate_gbps,
                p.p50,
                p.p90,
                p.max,
                total.hit_ratio(),
                total.gets,
                mib(total.read_bytes as f64),
                mib(run.needed_chunk_bytes as f64),
                100.0 * run.machine_busy,
            ));
            runs.push(run);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    drop(garage);

    Ok(report(
        &arms,
        &runs,
        &chunk_stats,
        &dedup,
        image_bytes,
        repeats,
        serde_json::json!({
            "image_bytes": image_bytes,
            "snapshots": SNAPSHOTS,
            "restores": RESTORES,
            "concurrency": CONCURRENCY,
            "repeats": repeats,
            "chunk_bytes": CHUNK_BYTES,
            "chunk_cache": CHUNK_CACHE,
            "dirty_chunk_every": DIRTY_CHUNK_EVERY,
            "dirty_page_every": DIRTY_PAGE_EVERY,
            "imports": import_s,
            "chunk_stats": chunk_stats.iter().enumerate().map(|(v, c)| serde_json::json!({
                "snapshot": image_name(v),
                "chunks": c.chunks,
                "uploaded": c.uploaded,
                "reused": c.reused,
                "zero": c.zero,
                "uploaded_bytes": c.uploaded_bytes,
            })).collect::<Vec<_>>(),
            "dedup_ratio": dedup.ratio(),
            "runs": runs,
        }),
    ))
}

/// What the imports of the snapshots (not the base) stored.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Dedup {
    /// Non-zero chunks of the snapshots.
    stored: u64,
    /// Of those, the chunks uploaded (the rest the store had).
    uploaded: u64,
    /// Chunks of the snapshots whose bytes neither the base nor an earlier
    /// snapshot has, by the generator's hashes: what must be uploaded.
    new_chunks: u64,
}

impl Dedup {
    /// Share of the non-zero chunks not uploaded.
    fn ratio(self) -> f64 {
        if self.stored == 0 {
            0.0
        } else {
            1.0 - self.uploaded as f64 / self.stored as f64
        }
    }
}

/// The dedup of the snapshots' imports (`stats`, the base's left out) and
/// what it should be from the images (`images`, the base first).
fn dedup_of(stats: &[ChunkStats], images: &[GenImage]) -> Dedup {
    let mut seen: HashSet<u64> = images
        .first()
        .map(|base| base.chunks.iter().flatten().copied().collect())
        .unwrap_or_default();
    let mut new_chunks = 0;
    for image in images.iter().skip(1) {
        for &h in image.chunks.iter().flatten() {
            new_chunks += u64::from(seen.insert(h));
        }
    }
    let mut d = stats.iter().fold(Dedup::default(), |d, c| Dedup {
        stored: d.stored + c.uploaded + c.reused,
        uploaded: d.uploaded + c.uploaded,
        new_chunks: 0,
    });
    d.new_chunks = new_chunks;
    d
}

/// The scenario's report from its runs.
fn report(
    arms: &[Arm],
    runs: &[Run],
    chunk_stats: &[ChunkStats],
    dedup: &Dedup,
    image_bytes: u64,
    repeats: usize,
    data: serde_json::Value,
) -> ScenarioReport {
    let mut table = Table::new(
        format!(
            "{RESTORES} restores of {SNAPSHOTS} snapshots ({} MiB each, sharing a base image), \
             {CONCURRENCY} at once; {repeats} run(s) per row",
            image_bytes >> 20
        ),
        &[
            "store, servers",
            "aggregate GB/s",
            "vs local dir",
            "restore s p50",
            "p90",
            "max",
            "cache hit ratio",
            "store GETs / restore",
            "store MiB / restore",
            "store read vs distinct chunks",
        ],
    );
    let of = |arm: Arm| runs.iter().filter(move |r| r.arm == arm);
    let median_agg =
        |arm: Arm| Summary::of(&of(arm).map(|r| r.aggregate_gbps).collect::<Vec<_>>()).median;
    let mut agg_bars = Vec::new();
    let mut time_bars = Vec::new();
    let mut read_bars = Vec::new();
    let mut targets = Vec::new();
    for &arm in arms {
        let agg = Summary::of(&of(arm).map(|r| r.aggregate_gbps).collect::<Vec<_>>());
        let times: Vec<f64> = of(arm)
            .flat_map(|r| r.restores.iter().map(|x| x.line.elapsed_s))
            .collect();
        let p = Percentiles::of(&times);
        let total = of(arm).fold(StoreCounters::default(), |a, r| a.plus(r.total()));
        let restores = (of(arm).count() * RESTORES).max(1) as f64;
        let local = Arm {
            store: StoreKind::Local,
            ..arm
        };
        let read_vs_needed = Summary::of(
            &of(arm)
                .filter(|r| r.needed_chunk_bytes > 0)
                .map(|r| r.total().read_bytes as f64 / r.needed_chunk_bytes as f64)
                .collect::<Vec<_>>(),
        );
        let is_s3 = arm.store == StoreKind::S3;
        table.row(vec![
            arm.label(),
            agg.fmt(2),
            if is_s3 {
                ratio(agg.median, median_agg(local))
            } else {
                "1x".into()
            },
            format!("{:.2}", p.p50),
            format!("{:.2}", p.p90),
            format!("{:.2}", p.max),
            if is_s3 {
                format!("{:.3}", total.hit_ratio())
            } else {
                "–".into()
            },
            format!("{:.1}", total.gets as f64 / restores),
            format!("{:.1}", mib(total.read_bytes as f64) / restores),
            if is_s3 {
                format!("{}x", read_vs_needed.fmt(2))
            } else {
                "–".into()
            },
        ]);
        agg_bars.push(Bar {
            label: arm.label(),
            value: agg,
        });
        time_bars.push(Bar {
            label: arm.label(),
            value: Summary::of(&times),
        });
        if is_s3 {
            read_bars.push(Bar {
                label: format!("{}: read", arm.label()),
                value: Summary::of(
                    &of(arm)
                        .map(|r| mib(r.total().read_bytes as f64))
                        .collect::<Vec<_>>(),
                ),
            });
            read_bars.push(Bar {
                label: format!("{}: distinct chunks", arm.label()),
                value: Summary::of(
                    &of(arm)
                        .map(|r| mib(r.needed_chunk_bytes as f64))
                        .collect::<Vec<_>>(),
                ),
            });
            targets.push(Target {
                name: format!(
                    "store bytes read per run vs distinct chunks needed ({})",
                    arm.label()
                ),
                goal: "<= 1.1x (one read of each)".into(),
                value: format!("{:.2}x", read_vs_needed.max),
                met: read_vs_needed.n > 0 && read_vs_needed.max <= 1.1,
            });
        }
    }

    let mut dedup_table = Table::new(
        "What each import stored in the object store (2 MiB content-addressed chunks)",
        &[
            "snapshot",
            "chunks",
            "uploaded",
            "not uploaded (shared)",
            "zero (never stored)",
        ],
    );
    for (v, c) in chunk_stats.iter().enumerate() {
        dedup_table.row(vec![
            image_name(v),
            c.chunks.to_string(),
            c.uploaded.to_string(),
            c.reused.to_string(),
            c.zero.to_string(),
        ]);
    }
    targets.push(Target {
        name: format!(
            "chunks uploaded for the {SNAPSHOTS} snapshots vs the chunks they rewrote \
             ({:.1}% of their non-zero chunks not uploaded)",
            100.0 * dedup.ratio()
        ),
        goal: "1x (every other chunk shared)".into(),
        value: ratio(dedup.uploaded as f64, dedup.new_chunks as f64),
        met: dedup.uploaded == dedup.new_chunks,
    });

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = Summary::of(
        &runs
            .iter()
            .map(|r| 100.0 * r.machine_busy)
            .collect::<Vec<_>>(),
    );
    let load = Summary::of(&runs.iter().map(|r| r.load_average).collect::<Vec<_>>());
    let mut notes = vec![format!(
        "Garage, the servers and {CONCURRENCY} client processes share this machine's {cpus} \
         CPU(s) with whatever else runs here (during the runs the machine was {:.0}% busy at \
         the median, {:.0}% at the least; the 1-minute load average at the end of a run was \
         {} at the median, {:.1} at most), so the aggregate measures the CPU cost of a \
         restore end to end, not a network. Per-restore time is each client's own (pager \
         start to completion); the checksum of the whole restored memory that follows it \
         counts in the aggregate's wall time.",
        busy.median,
        busy.min,
        format_args!("{:.1}", load.median),
        load.max,
    )];
    let s3 = runs
        .iter()
        .filter(|r| r.arm.store == StoreKind::S3)
        .fold(StoreCounters::default(), |a, r| a.plus(r.total()));
    if s3.misses > 0 {
        notes.push(format!(
            "Single flight: over the S3 runs, {} chunk lookups found the chunk's fetch already \
             under way and waited for it instead of reading it again ({} misses, {} hits).",
            s3.coalesced, s3.misses, s3.hits
        ));
    }
    let three: Vec<&Run> = runs
        .iter()
        .filter(|r| r.arm.store == StoreKind::S3 && r.arm.servers == 3)
        .collect();
    if !three.is_empty() {
        let spread: Vec<String> = three
            .iter()
            .map(|r| {
                let mut per = vec![0usize; 3];
                for &h in &r.homes {
                    per[h] += 1;
                }
                format!("{per:?}")
            })
            .collect();
        notes.push(format!(
            "With 3 servers each snapshot has a home server (rendezvous hashing over the \
             servers' URLs, whose ports change every run): snapshots per server in each run \
             {}. A server reads the base image's shared chunks once for all the snapshots homed \
             on it, so the fleet reads them once per server that homes any snapshot: \"distinct \
             chunks\" counts them that way.",
            spread.join(", ")
        ));
    }
    notes.push(
        "Every restore was checked whole against the checksum of its generated image; a \
         mismatch fails the scenario. The images are deleted after the imports and the stores \
         after the run."
            .into(),
    );

    ScenarioReport {
        id: ID.into(),
        title: TITLE.into(),
        method: format!(
            "One single-node Garage on 127.0.0.1; a base image ({} MiB, realistic pattern) and \
             {SNAPSHOTS} snapshots each rewriting every {DIRTY_PAGE_EVERY}th page of 1 in \
             {DIRTY_CHUNK_EVERY} of its 2 MiB chunks (disjoint between snapshots), imported \
             into the bucket and into a local store directory. For each arm (store × 1 or 3 \
             `faultline-server serve` processes, {CHUNK_CACHE} chunk cache each, fresh per \
             run), {RESTORES} client processes (`faultline-bench fleet-client`, {CONCURRENCY} \
             at once) restore the snapshots in turn into fresh anonymous memory (prefetch all), \
             each given every server (the fleet client's rendezvous hashing picks the home), \
             and check the restored memory against the image's checksum. Aggregate GB/s = \
             {RESTORES} × image bytes / wall time (first spawn to last exit); store GETs, bytes \
             and chunk cache hits from the servers' /metrics before and after. {repeats} run(s) \
             per arm, arms interleaved; the aggregate is their median (min–max), restore times \
             over all restores of all runs.",
            image_bytes >> 20
        ),
        skipped: None,
        tables: vec![table, dedup_table],
        targets,
        plots: vec![
            Plot::Bars {
                file: "fleet-aggregate.png".into(),
                title: format!(
                    "Fleet: aggregate throughput of {RESTORES} restores ({} MiB snapshots)",
                    image_bytes >> 20
                ),
                y_label: "GB/s".into(),
                bars: agg_bars,
            },
            Plot::Bars {
                file: "fleet-per-restore.png".into(),
                title: "Fleet: time of each restore (median, min–max)".into(),
                y_label: "seconds".into(),
                bars: time_bars,
            },
            Plot::Bars {
                file: "fleet-store-reads.png".into(),
                title: "Fleet: bytes read from S3 per run vs its distinct chunks".into(),
                y_label: "MiB".into(),
                bars: read_bars,
            },
        ],
        notes,
        data,
        duration_s: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `metric_sum` adds a metric's samples, filtered by one label, and ignores other metrics.
    #[test]
    fn sums_prometheus_samples() {
        let text = "# HELP faultline_server_store_requests_total Requests.\n\
                    # TYPE faultline_server_store_requests_total counter\n\
                    faultline_server_store_requests_total{op=\"get\"} 42\n\
                    faultline_server_store_requests_total{op=\"head\"} 7\n\
                    faultline_server_store_requests_total_x{op=\"get\"} 1000\n\
                    faultline_server_store_read_bytes_total 1.5e3\n\
                    faultline_server_chunk_cache_hits_total 9\n";
        let c = StoreCounters::parse(text);
        assert_eq!(
            c,
            StoreCounters {
                gets: 42,
                read_bytes: 1500,
                hits: 9,
                ..Default::default()
            }
        );
        assert_eq!(
            metric_sum(text, "faultline_server_store_requests_total", None),
            49.0
        );
        let later = StoreCounters {
            gets: 50,
            misses: 3,
            coalesced: 1,
            ..c
        };
        let d = later.since(c);
        assert_eq!((d.gets, d.misses, d.coalesced, d.hits), (8, 3, 1, 0));
        assert_eq!(later.hit_ratio(), 10.0 / 13.0);
    }

    /// Each variant differs from the base only in its own chunks, in 1 of 8 of their pages.
    #[test]
    fn variants_share_all_but_their_own_chunks() {
        let pages_per_chunk = CHUNK_BYTES / PAGE;
        let (mut base, mut page) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
        for chunk in 0..2 * DIRTY_CHUNK_EVERY {
            for variant in 1..=SNAPSHOTS {
                let own = chunk % DIRTY_CHUNK_EVERY == variant as u64;
                let mut changed = 0;
                for p in chunk * pages_per_chunk..(chunk + 1) * pages_per_chunk {
                    fill(0, p, &mut base);
                    fill(variant, p, &mut page);
                    if base != page {
                        changed += 1;
                        assert!(page.iter().any(|&b| b != 0), "a rewritten page is not zero");
                    }
                }
                let want = if own {
                    pages_per_chunk / DIRTY_PAGE_EVERY
                } else {
                    0
                };
                assert_eq!(changed, want, "chunk {chunk} of variant {variant}");
            }
        }
    }

    /// The distinct chunks a fleet must read count shared chunks once per server homing them.
    #[test]
    fn counts_needed_chunks_per_server() {
        let img = |chunks: Vec<Option<u64>>| GenImage {
            name: String::new(),
            path: PathBuf::new(),
            checksum: 0,
            chunks,
        };
        let images = [
            img(vec![Some(1), Some(2), None]),
            img(vec![Some(1), Some(3), None]),
            img(vec![Some(1), Some(2), Some(4)]),
        ];
        // One server: chunks 1, 2, 3, 4.
        assert_eq!(needed_chunk_bytes(&images, &[0, 0, 0]), 4 * CHUNK_BYTES);
        // Two: {1, 2, 3} and {1, 2, 4}.
        assert_eq!(needed_chunk_bytes(&images, &[0, 0, 1]), 6 * CHUNK_BYTES);
    }
}
