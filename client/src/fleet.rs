//! A fleet of identical servers: which one a client asks for a snapshot,
//! in which order it fails over, and the check that a fail-over server
//! serves the same snapshot.
//!
//! - [`expand`]: `--server` URLs whose host is a DNS name resolving to
//!   several addresses become one URL per address (a headless Kubernetes
//!   Service is such a name).
//! - [`rendezvous`]: the servers ordered by highest random weight over
//!   (server, snapshot). The first is the snapshot's home: every client of a
//!   fleet picks the same home for a snapshot, so each server's chunk cache
//!   holds the snapshots homed on it rather than every snapshot, and when a
//!   server leaves only its snapshots move (to their second choice, the
//!   next in the same order, which is also the fail-over order).
//! - [`plan`]: both, then the gRPC health service asked of every server at
//!   once: servers not SERVING (a server whose store does not answer yet is
//!   NOT_SERVING) or not answering go to the end of the order, kept only as
//!   a last resort.
//! - [`Consistency`]: every server a pager moves to must give the manifest
//!   in use (same layout, same digests), or it is refused loudly and never
//!   used: pages are verified against the manifest in use, so a server with
//!   another snapshot of the same name would only fail every page.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use faultline_proto::{Manifest, SnapshotId};
use tonic::codegen::http::Uri;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::remote::{ConnectOptions, Remote, RemoteError};

/// How long a server may take to connect and answer its health check
/// before it counts as down for the plan. A loopback or LAN answer takes
/// milliseconds; this only bounds a server that accepts and never answers,
/// which would otherwise hold up the start of every restore.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The gRPC service whose health is asked (the health service reports
/// NOT_SERVING for it until the server's store answers).
pub const SERVICE: &str = faultline_proto::pb::faultline_server::SERVICE_NAME;

/// Making a plan failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// No server was given.
    #[error("no server given; pass --server (repeat it, or give a DNS name, for a fleet)")]
    NoServer,
    /// A URL cannot be parsed.
    #[error("{url:?} is not a server URL; use http://HOST:PORT or https://HOST:PORT")]
    BadUrl {
        /// The URL given.
        url: String,
    },
    /// A name did not resolve.
    #[error("cannot resolve {host:?} (from {url}): {source}; check the name or give addresses")]
    Resolve {
        /// The name.
        host: String,
        /// The URL it came from.
        url: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A fail-over server does not serve the snapshot in use.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "{url} serves another snapshot under the name {snapshot} ({what} differ from the manifest \
     in use); refusing it: every server of a fleet must serve the same snapshots (import them \
     into one store, or the same files)"
)]
pub struct MismatchError {
    /// The server refused.
    pub url: String,
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// What differs.
    pub what: &'static str,
}

/// What [`plan`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The servers, home first, then the fail-over order.
    pub servers: Vec<String>,
    /// The servers left at the end because they were not SERVING or did
    /// not answer (for the log).
    pub unhealthy: Vec<String>,
}

/// The servers for `snapshot`: names expanded ([`expand`]), ordered by
/// [`rendezvous`], the ones not SERVING moved last. With one server there
/// is nothing to choose and its health is not asked. `opts` gets the TLS
/// name of an `https://` name expanded into addresses.
pub async fn plan(
    servers: &[String],
    opts: &mut ConnectOptions,
    snapshot: &SnapshotId,
) -> Result<Plan, PlanError> {
    let expanded = expand(servers, opts).await?;
    let ordered = rendezvous(&expanded, snapshot);
    if ordered.len() < 2 {
        return Ok(Plan {
            servers: ordered,
            unhealthy: Vec::new(),
        });
    }
    let checks = ordered.iter().map(|url| health(url, opts));
    let states = futures::future::join_all(checks).await;
    let (mut servers, mut unhealthy) = (Vec::new(), Vec::new());
    for (url, state) in ordered.into_iter().zip(states) {
        match state {
            Health::Serving => servers.push(url),
            Health::Not(why) => {
                tracing::warn!("{url} is not ready ({why}); it is used only if the others fail");
                unhealthy.push(url);
            }
        }
    }
    tracing::debug!(
        "servers for {snapshot}: {} (home first), then {}",
        servers.join(", "),
        if unhealthy.is_empty() {
            "none not ready".to_owned()
        } else {
            unhealthy.join(", ")
        }
    );
    servers.extend(unhealthy.iter().cloned());
    Ok(Plan { servers, unhealthy })
}

/// A server's health, for the plan.
enum Health {
    Serving,
    Not(String),
}

async fn health(url: &str, opts: &ConnectOptions) -> Health {
    let check = async {
        let remote = Remote::connect_with(url, opts)
            .await
            .map_err(|e| e.to_string())?;
        let answer = HealthClient::new(remote.channel())
            .check(HealthCheckRequest {
                service: SERVICE.to_owned(),
            })
            .await;
        match answer {
            Ok(r) => match r.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                other => Err(format!("health: {}", other.as_str_name())),
            },
            // A server without the health service is judged by its answers.
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
            Err(s) => Err(RemoteError::rpc("Health.Check")(s).to_string()),
        }
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
        Ok(Ok(())) => Health::Serving,
        Ok(Err(why)) => Health::Not(why),
        Err(_) => Health::Not(format!("no health answer within {HEALTH_TIMEOUT:?}")),
    }
}

/// Each URL whose host is a DNS name resolving to several addresses
/// becomes one URL per address (in the resolver's order, duplicates
/// dropped); addresses and names with one address stay as given. An
/// `https://` name expanded keeps its name for TLS (`opts.tls.domain`, if
/// not set): servers behind one name carry a certificate for it. Names of
/// `https://` URLs are expanded only while they are all one name, since one
/// connection option carries the TLS name.
pub async fn expand(urls: &[String], opts: &mut ConnectOptions) -> Result<Vec<String>, PlanError> {
    expand_with(urls, opts, |host, port| async move {
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(Iterator::collect)
    })
    .await
}

/// [`expand`] with the resolver given (the system's, or a table in tests).
async fn expand_with<F, Fut>(
    urls: &[String],
    opts: &mut ConnectOptions,
    mut resolve: F,
) -> Result<Vec<String>, PlanError>
where
    F: FnMut(String, u16) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    if urls.is_empty() {
        return Err(PlanError::NoServer);
    }
    let mut tls_names: Vec<String> = Vec::new();
    let mut parsed = Vec::new();
    let mut out: Vec<String> = Vec::new();
    for url in urls {
        // A Unix socket names one server on this host: nothing to resolve.
        if faultline_proto::unix::unix_path(url).is_some() {
            if !out.contains(url) {
                out.push(url.clone());
            }
            continue;
        }
        let p = parse(url)?;
        if p.scheme == "https" && p.ip.is_none() && !tls_names.contains(&p.host) {
            tls_names.push(p.host.clone());
        }
        parsed.push((url, p));
    }
    let tls_expandable = tls_names.len() == 1
        && opts
            .tls
            .domain
            .as_ref()
            .is_none_or(|d| d.eq_ignore_ascii_case(&tls_names[0]));
    let push = |u: String, out: &mut Vec<String>| {
        if !out.contains(&u) {
            out.push(u);
        }
    };
    for (url, p) in parsed {
        if p.ip.is_some() || (p.scheme == "https" && !tls_expandable) {
            push(url.clone(), &mut out);
            continue;
        }
        let addrs = resolve(p.host.clone(), p.port)
            .await
            .map_err(|source| PlanError::Resolve {
                host: p.host.clone(),
                url: url.clone(),
                source,
            })?;
        let mut unique: Vec<SocketAddr> = Vec::new();
        for a in addrs {
            if !unique.contains(&a) {
                unique.push(a);
            }
        }
        if unique.len() < 2 {
            push(url.clone(), &mut out);
            continue;
        }
        tracing::debug!("{} resolves to {unique:?}", p.host);
        if p.scheme == "https" && opts.tls.domain.is_none() {
            opts.tls.domain = Some(p.host.clone());
        }
        for a in unique {
            push(format!("{}://{a}", p.scheme), &mut out);
        }
    }
    Ok(out)
}

/// A server URL's parts.
struct Parsed {
    scheme: String,
    host: String,
    ip: Option<IpAddr>,
    port: u16,
}

fn parse(url: &str) -> Result<Parsed, PlanError> {
    let bad = || PlanError::BadUrl {
        url: url.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| bad())?;
    let scheme = uri.scheme_str().ok_or_else(bad)?.to_ascii_lowercase();
    let port = match (uri.port_u16(), scheme.as_str()) {
        (Some(p), _) => p,
        (None, "http") => 80,
        (None, "https") => 443,
        _ => return Err(bad()),
    };
    let host = uri.host().ok_or_else(bad)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok(Parsed {
        scheme,
        host: bare.to_ascii_lowercase(),
        ip: bare.parse().ok(),
        port,
    })
}

/// `servers` ordered by highest random weight for `snapshot`, highest
/// first (ties, which need equal hashes, by URL). The weight hashes the URL
/// as given, so clients of one fleet must name its servers alike (DNS
/// expansion does: it gives addresses).
pub fn rendezvous(servers: &[String], snapshot: &SnapshotId) -> Vec<String> {
    let mut weighted: Vec<(u64, &String)> = servers
        .iter()
        .map(|s| (weight(s, snapshot.as_str()), s))
        .collect();
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.into_iter().map(|(_, s)| s.clone()).collect()
}

/// The weight of `server` for `snapshot`: FNV-1a over both (a zero byte
/// between, so that no two pairs run together alike), then murmur3's
/// finalizer, whose avalanche makes the weights of one snapshot over
/// similar URLs (addresses one digit apart) independent. Stable across
/// builds and machines, unlike std's hasher, which is not promised to be.
fn weight(server: &str, snapshot: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for b in server.bytes().chain([0]).chain(snapshot.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Which servers were checked against the manifest in use, and their
/// verdict: a pager's demand link and prefetcher check every server before
/// using it, once.
#[derive(Debug)]
pub struct Consistency {
    verdicts: Mutex<HashMap<String, Result<(), MismatchError>>>,
}

impl Consistency {
    /// The manifest in use came from `origin`.
    pub fn new(origin: &str) -> Self {
        Self {
            verdicts: Mutex::new(HashMap::from([(origin.to_owned(), Ok(()))])),
        }
    }

    /// Checks that `remote` serves `manifest`: fetches its manifest the
    /// first time, remembers the verdict. A server that could not answer is
    /// asked again next time ([`CheckError::Remote`]); a server with
    /// another snapshot is refused for good, loudly.
    pub async fn check(&self, remote: &Remote, manifest: &Manifest) -> Result<(), CheckError> {
        let url = remote.url();
        if let Some(v) = self.lock().get(url) {
            return v.clone().map_err(CheckError::Mismatch);
        }
        let theirs = remote.manifest(&manifest.id).await?;
        let verdict = match differs(manifest, &theirs) {
            None => Ok(()),
            Some(what) => {
                let e = MismatchError {
                    url: url.to_owned(),
                    snapshot: manifest.id.clone(),
                    what,
                };
                tracing::error!("{e}");
                Err(e)
            }
        };
        if verdict.is_ok() {
            tracing::info!("{url} serves the same {}: failing over to it", manifest.id);
        }
        self.lock().insert(url.to_owned(), verdict.clone());
        verdict.map_err(CheckError::Mismatch)
    }

    /// [`Consistency::check`] for a connection that is not gRPC (the lean
    /// fault transport): connects to `url` over gRPC only if it has not
    /// been checked yet.
    pub async fn check_url(
        &self,
        url: &str,
        opts: &ConnectOptions,
        manifest: &Manifest,
    ) -> Result<(), CheckError> {
        if let Some(v) = self.lock().get(url) {
            return v.clone().map_err(CheckError::Mismatch);
        }
        let remote = Remote::connect_with(url, opts).await?;
        self.check(&remote, manifest).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Result<(), MismatchError>>> {
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Checking a server against the manifest in use failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Its manifest could not be fetched (retried on the next attempt).
    #[error("checking the snapshot of the fail-over server: {0}")]
    Remote(#[from] RemoteError),
    /// It serves another snapshot.
    #[error(transparent)]
    Mismatch(MismatchError),
}

/// What differs between two manifests of one snapshot, if anything that
/// decides the pages (working sets may differ: they are recorded later).
pub fn differs(ours: &Manifest, theirs: &Manifest) -> Option<&'static str> {
    if ours.format_version != theirs.format_version {
        Some("the manifest format versions")
    } else if ours.page_size != theirs.page_size || ours.page_count != theirs.page_count {
        Some("the page sizes or counts")
    } else if ours.regions != theirs.regions {
        Some("the memory regions")
    } else if ours.digest_algorithm != theirs.digest_algorithm || ours.digests != theirs.digests {
        Some("the page digests")
    } else if ours.zero_map != theirs.zero_map {
        Some("the zero pages")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("http://10.0.0.{}:7070", i + 1))
            .collect()
    }

    fn snap(i: usize) -> SnapshotId {
        SnapshotId::new(format!("vm-{i}")).expect("valid id")
    }

    /// A unix:// server is kept as given, never resolved, beside other servers.
    #[tokio::test]
    async fn expand_keeps_unix_sockets() {
        let urls = vec![
            "unix:///run/fl.sock".to_owned(),
            "http://10.0.0.1:7070".to_owned(),
        ];
        let mut opts = ConnectOptions::default();
        let never = |host: String, _| async move {
            Err::<Vec<SocketAddr>, _>(std::io::Error::other(format!("resolved {host}")))
        };
        let out = expand_with(&urls, &mut opts, never).await.expect("expands");
        assert_eq!(out, urls);
    }

    /// The order is a function of (servers, snapshot) alone: the same for any input order.
    #[test]
    fn rendezvous_is_stable() {
        let servers = fleet(5);
        let mut reversed = servers.clone();
        reversed.reverse();
        for i in 0..50 {
            let a = rendezvous(&servers, &snap(i));
            assert_eq!(a, rendezvous(&reversed, &snap(i)));
            assert_eq!(a, rendezvous(&servers, &snap(i)));
            let mut sorted = a.clone();
            sorted.sort();
            let mut all = servers.clone();
            all.sort();
            assert_eq!(sorted, all, "a permutation of the servers");
        }
    }

    /// Homes spread evenly: 3000 snapshots over 3 servers, each home to 1000 +- 15%.
    #[test]
    fn rendezvous_spreads_snapshots() {
        let servers = fleet(3);
        let mut homes: HashMap<String, usize> = HashMap::new();
        for i in 0..3000 {
            *homes
                .entry(rendezvous(&servers, &snap(i))[0].clone())
                .or_default() += 1;
        }
        assert_eq!(homes.len(), 3);
        for (s, n) in &homes {
            assert!((850..=1150).contains(n), "{s} is home to {n} of 3000");
        }
    }

    /// A server leaving moves only its own snapshots, each to its second choice.
    #[test]
    fn rendezvous_moves_only_the_lost_servers_snapshots() {
        let servers = fleet(4);
        let fewer: Vec<String> = servers[1..].to_vec();
        for i in 0..500 {
            let before = rendezvous(&servers, &snap(i));
            let after = rendezvous(&fewer, &snap(i));
            if before[0] == servers[0] {
                assert_eq!(after[0], before[1]);
            } else {
                assert_eq!(after[0], before[0]);
            }
        }
    }

    /// A name resolving to several addresses becomes one URL per address; addresses stay.
    #[tokio::test]
    async fn expand_a_name_with_several_addresses() {
        // `localhost` resolves (through the system's resolver and hosts file) to 127.0.0.1 and,
        // where IPv6 is configured, ::1: the test asks the resolver what it says first.
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", 7070))
            .await
            .expect("localhost resolves")
            .collect();
        let mut opts = ConnectOptions::default();
        let urls = vec![
            "http://localhost:7070".to_owned(),
            "http://127.0.0.1:7071".to_owned(),
        ];
        let out = expand(&urls, &mut opts).await.expect("expands");
        let mut unique = resolved.clone();
        unique.dedup();
        if unique.len() >= 2 {
            let want: Vec<String> = unique.iter().map(|a| format!("http://{a}")).collect();
            assert_eq!(out[..want.len()], want[..]);
            assert_eq!(
                out.last().map(String::as_str),
                Some("http://127.0.0.1:7071")
            );
        } else {
            assert_eq!(out, urls, "one address: the name is kept");
        }
        assert_eq!(opts.tls.domain, None, "plain http sets no TLS name");
    }

    /// A name with several addresses (from a resolver table: this machine's hosts file gives
    /// `localhost` one) becomes a URL per address, duplicates dropped, the TLS name kept.
    #[tokio::test]
    async fn expand_with_a_resolver_of_several_addresses() {
        let table = |host: String, port: u16| async move {
            match host.as_str() {
                "fleet.test" => Ok(vec![
                    SocketAddr::from(([127, 0, 0, 2], port)),
                    SocketAddr::from(([127, 0, 0, 3], port)),
                    SocketAddr::from(([127, 0, 0, 2], port)),
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                ]),
                "one.test" => Ok(vec![SocketAddr::from(([127, 0, 0, 9], port))]),
                _ => Err(std::io::Error::other("no such name")),
            }
        };
        let mut opts = ConnectOptions::default();
        let urls = vec![
            "https://fleet.test:7443".to_owned(),
            "https://127.0.0.3:7443".to_owned(),
            "http://one.test:7070".to_owned(),
        ];
        let out = expand_with(&urls, &mut opts, table).await.expect("expands");
        assert_eq!(
            out,
            [
                "https://127.0.0.2:7443",
                "https://127.0.0.3:7443",
                "https://[::1]:7443",
                "http://one.test:7070",
            ]
        );
        assert_eq!(opts.tls.domain.as_deref(), Some("fleet.test"));
        let err = expand_with(&["http://nowhere.test:1".to_owned()], &mut opts, table)
            .await
            .expect_err("unresolvable");
        assert!(err.to_string().contains("nowhere.test"), "{err}");
    }

    /// An https name expanded keeps the name for TLS; bad URLs are refused with the fix.
    #[tokio::test]
    async fn expand_keeps_the_tls_name_and_refuses_bad_urls() {
        let mut opts = ConnectOptions::default();
        let out = expand(&["https://localhost:7443".to_owned()], &mut opts)
            .await
            .expect("expands");
        if out.len() > 1 {
            assert_eq!(opts.tls.domain.as_deref(), Some("localhost"));
            assert!(out.iter().all(|u| u.starts_with("https://")));
        }
        let err = expand(&["localhost:7070".to_owned()], &mut opts)
            .await
            .expect_err("no scheme");
        assert!(err.to_string().contains("http://HOST:PORT"), "{err}");
        let err = expand(&[], &mut opts).await.expect_err("none");
        assert!(err.to_string().contains("--server"), "{err}");
    }
}
