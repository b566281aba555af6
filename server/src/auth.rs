//! Who may do what: bearer tokens, their rights on snapshot name patterns, and
//! the identity of each caller.
//!
//! A client sends `authorization: Bearer TOKEN` in its gRPC metadata. The
//! tokens file (JSON, written by `faultline-server token new`) holds, for
//! each token, only the SHA-256 of it, a name, snapshot name patterns (`*`
//! and `?` globs) and rights ([`Right`]). Enforcement is in two steps:
//! - [`AuthInterceptor`], on the Faultline service only (health and
//!   reflection are separate services and stay open), authenticates: no token
//!   where one is required, or an unknown one, is UNAUTHENTICATED before any
//!   handler runs. It puts the caller's [`Access`] and [`Identity`] into the
//!   request's extensions.
//! - Each RPC then calls [`Access::check`] with the right it needs and the
//!   snapshot it names, before it looks the snapshot up, so PERMISSION_DENIED
//!   says nothing about whether the snapshot exists. `ListSnapshots` lists
//!   only what [`Access::allows`] to read.
//!
//! Presented tokens are hashed and compared with every stored hash in
//! constant time; tokens are never logged (only a token's name and id, the
//! first hex digits of its hash).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in a new token: 256 bits, beyond guessing, so one unsalted
/// SHA-256 is a sound way to store it (nothing to brute-force).
pub const TOKEN_BYTES: usize = 32;

/// What every token starts with, so a leaked one is easy to recognise in a
/// log or a repository scan.
pub const TOKEN_PREFIX: &str = "fl_";

/// Hex digits of a token's hash that name it in logs and `token list`.
pub const TOKEN_ID_HEX: usize = 12;

/// Longest token accepted in metadata; anything longer is not one of ours
/// and is refused without hashing.
pub const MAX_TOKEN_BYTES: usize = 256;

/// What a token may do with the snapshots its patterns match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Manifests, pages, faults, prefetch; listing.
    Read,
    /// Recording working sets.
    Record,
    /// Creating snapshots (and any later write RPC).
    Write,
}

impl Right {
    /// Its name in the tokens file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Record => "record",
            Self::Write => "write",
        }
    }
}

impl std::fmt::Display for Right {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Right {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "read" => Ok(Self::Read),
            "record" => Ok(Self::Record),
            "write" => Ok(Self::Write),
            other => Err(format!(
                "{other:?} is not a right; use read, record or write"
            )),
        }
    }
}

/// A comma-separated list of rights, as `--rights read,record` takes it.
pub fn parse_rights(s: &str) -> Result<Vec<Right>, String> {
    let mut rights = Vec::new();
    for r in s.split(',').filter(|r| !r.trim().is_empty()) {
        let r: Right = r.parse()?;
        if !rights.contains(&r) {
            rights.push(r);
        }
    }
    if rights.is_empty() {
        return Err("no rights given; use read, record or write, comma-separated".into());
    }
    Ok(rights)
}

/// Whether `name` matches the glob `pattern`: `*` is any run of characters
/// (also none), `?` one character, anything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Checks a snapshot name pattern: snapshot name characters and globs.
fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("an empty snapshot pattern matches nothing; use `*` for every snapshot".into());
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*' | '?')))
    {
        return Err(format!(
            "snapshot pattern {p:?} has {c:?}; use letters, digits, '.', '_', '-' and the globs '*' and '?'"
        ));
    }
    Ok(())
}

/// One token of the tokens file, as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenEntry {
    /// Who it is for, shown in logs (not secret).
    pub name: String,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// Snapshot name patterns it applies to.
    pub snapshots: Vec<String>,
    /// What it may do with them.
    pub rights: Vec<Right>,
}

impl TokenEntry {
    /// Its id: the first hex digits of its hash.
    pub fn id(&self) -> &str {
        &self.sha256[..TOKEN_ID_HEX.min(self.sha256.len())]
    }
}

/// The tokens file's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokensFile {
    /// Every token.
    pub tokens: Vec<TokenEntry>,
}

/// Reading, checking or writing a tokens file failed.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read.
    #[error("cannot read the tokens file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("the tokens file {} is not valid: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// An entry is not valid.
    #[error("the tokens file {}, token {index} ({name:?}): {why}", path.display())]
    Entry {
        /// The file.
        path: PathBuf,
        /// Its position, from 0.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The file could not be written.
    #[error("cannot write the tokens file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The system's random source failed.
    #[error("cannot draw random bytes for a token: {0}")]
    Random(getrandom::Error),
}

impl TokensFile {
    /// Reads and checks `path`; a missing file is an empty one (so `token
    /// new` can create it).
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(TokensError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let file: Self = serde_json::from_str(&text).map_err(|source| TokensError::Parse {
            path: path.to_owned(),
            source,
        })?;
        for (index, t) in file.tokens.iter().enumerate() {
            let bad = |why: String| TokensError::Entry {
                path: path.to_owned(),
                index,
                name: t.name.clone(),
                why,
            };
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                return Err(bad("`sha256` must be 64 hex digits".into()));
            }
            if t.snapshots.is_empty() {
                return Err(bad("`snapshots` lists no pattern".into()));
            }
            for p in &t.snapshots {
                check_pattern(p).map_err(bad)?;
            }
            if t.rights.is_empty() {
                return Err(bad("`rights` lists no right".into()));
            }
        }
        Ok(file)
    }

    /// Writes the file atomically (a temporary file renamed over it). A new
    /// file is readable by its owner only; a file that exists keeps its
    /// group and its owner and group permissions (never any for others), so
    /// a server running as another user of that group can still read it.
    pub fn save(&self, path: &Path) -> Result<(), TokensError> {
        use std::io::Write;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        let existing = std::fs::metadata(path).ok();
        let mode = existing.as_ref().map_or(0o600, |m| m.mode() & 0o660);
        let write_err = |source| TokensError::Write {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut text = serde_json::to_string_pretty(self).expect("tokens serialise");
        text.push('\n');
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                if let Some(m) = &existing {
                    std::os::unix::fs::fchown(&f, None, Some(m.gid()))?;
                }
                f.set_permissions(std::fs::Permissions::from_mode(mode))?;
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        Ok(())
    }

    /// Makes a new token for `snapshots` with `rights`, adds its hash, and
    /// returns the token itself: the only time it exists outside the client.
    pub fn add_new(
        &mut self,
        name: String,
        snapshots: Vec<String>,
        rights: Vec<Right>,
    ) -> Result<(String, TokenEntry), TokensError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes).map_err(TokensError::Random)?;
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
        let entry = TokenEntry {
            name,
            sha256: hex::encode(Sha256::digest(token.as_bytes())),
            snapshots,
            rights,
        };
        self.tokens.push(entry.clone());
        Ok((token, entry))
    }
}

/// Checks a pattern list given on the command line.
pub fn parse_patterns(list: &[String]) -> Result<Vec<String>, String> {
    let patterns: Vec<String> = list
        .iter()
        .flat_map(|p| p.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if patterns.is_empty() {
        return Err("no snapshot pattern given; use e.g. --snapshots 'vm-*'".into());
    }
    for p in &patterns {
        check_pattern(p)?;
    }
    Ok(patterns)
}

/// A token the server knows, ready to match.
#[derive(Debug)]
pub struct Grant {
    hash: [u8; 32],
    id: String,
    name: String,
    snapshots: Vec<String>,
    rights: Vec<Right>,
}

impl Grant {
    fn from_entry(e: &TokenEntry) -> Self {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&e.sha256, &mut hash).expect("checked when loaded");
        Self {
            hash,
            id: e.id().to_owned(),
            name: e.name.clone(),
            snapshots: e.snapshots.clone(),
            rights: e.rights.clone(),
        }
    }

    /// Its name from the tokens file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its id (hash prefix).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn allows(&self, right: Right, snapshot: &str) -> bool {
        self.rights.contains(&right) && self.snapshots.iter().any(|p| glob_match(p, snapshot))
    }
}

/// What the caller of a request may do: put into the request's extensions
/// by [`AuthInterceptor`].
#[derive(Clone, Debug)]
pub enum Access {
    /// No tokens are configured (loopback, or `--insecure-no-auth`).
    Unrestricted,
    /// What this token grants.
    Token(Arc<Grant>),
}

/// A request that its token does not allow.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// The token lacks the right or no pattern matches the snapshot.
    #[error(
        "token {token:?} does not grant {right} on snapshot {snapshot:?}; ask for one made with \
         `faultline-server token new --snapshots PATTERN --rights {right}` that matches it"
    )]
    Token {
        /// The token's name.
        token: String,
        /// The right needed.
        right: Right,
        /// The snapshot named.
        snapshot: String,
    },
    /// The request did not pass through [`AuthInterceptor`]: a server put
    /// together without it.
    #[error("the request was not authenticated by this server; refused")]
    NotAuthenticated,
}

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        tonic::Status::permission_denied(d.to_string())
    }
}

impl Access {
    /// The access the interceptor granted `req`; refused if there is none
    /// (the service was served without the interceptor).
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Self, Denied> {
        req.extensions()
            .get::<Self>()
            .cloned()
            .ok_or(Denied::NotAuthenticated)
    }

    /// Who the caller with this access is, for per-client limits: its
    /// token, or without one the address it called from (`peer`).
    pub fn identity(&self, peer: Option<IpAddr>) -> Identity {
        match self {
            Self::Token(g) => Identity::Token {
                id: g.id.clone(),
                name: g.name.clone(),
            },
            Self::Unrestricted => peer.map_or(Identity::Unknown, Identity::Peer),
        }
    }

    /// Whether it allows `right` on `snapshot`.
    pub fn allows(&self, right: Right, snapshot: &str) -> bool {
        match self {
            Self::Unrestricted => true,
            Self::Token(g) => g.allows(right, snapshot),
        }
    }

    /// Ok if it allows `right` on `snapshot`; call it before looking the
    /// snapshot up, so a refusal says nothing about whether it exists.
    pub fn check(&self, right: Right, snapshot: &str) -> Result<(), Denied> {
        match self {
            Self::Unrestricted => Ok(()),
            Self::Token(g) if g.allows(right, snapshot) => Ok(()),
            Self::Token(g) => {
                tracing::debug!(token = %g.name, id = %g.id, %right, snapshot, "denied");
                Err(Denied::Token {
                    token: g.name.clone(),
                    right,
                    snapshot: snapshot.to_owned(),
                })
            }
        }
    }
}

/// Who is calling: the key for per-client limits and the name in logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A caller with a token (its id and name from the tokens file).
    Token {
        /// The hash prefix.
        id: String,
        /// The name.
        name: String,
    },
    /// A caller without a token (tokens are not required), by IP address:
    /// every connection from one host is one client.
    Peer(IpAddr),
    /// Neither is known (a transport without addresses).
    Unknown,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { id, name } => write!(f, "token {name} ({id})"),
            Self::Peer(a) => write!(f, "{a}"),
            Self::Unknown => f.write_str("unknown peer"),
        }
    }
}

/// The identity of `req`'s caller, as the interceptor recorded it (or the
/// peer address where it did not run).
pub fn identity<T>(req: &tonic::Request<T>) -> Identity {
    if let Some(id) = req.extensions().get::<Identity>() {
        return id.clone();
    }
    peer(req)
}

fn peer<T>(req: &tonic::Request<T>) -> Identity {
    req.remote_addr()
        .map_or(Identity::Unknown, |a| Identity::Peer(a.ip()))
}

/// The tokens a server accepts, and where they come from.
#[derive(Debug)]
pub struct Authenticator {
    /// None: tokens are not required.
    path: Option<PathBuf>,
    grants: RwLock<Arc<Vec<Arc<Grant>>>>,
}

impl Authenticator {
    /// No tokens required: every caller may do everything.
    pub fn open() -> Self {
        Self {
            path: None,
            grants: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// Tokens from `path`, required on every Faultline RPC. A missing file is
    /// an error here (a server that requires tokens and knows none is a
    /// mistake).
    pub fn from_file(path: PathBuf) -> Result<Self, TokensError> {
        if !path.exists() {
            return Err(TokensError::Read {
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file; create it with `faultline-server token new --tokens FILE ...`",
                ),
                path,
            });
        }
        let auth = Self {
            path: Some(path),
            grants: RwLock::new(Arc::new(Vec::new())),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// Whether tokens are required.
    pub fn required(&self) -> bool {
        self.path.is_some()
    }

    /// How many tokens are accepted now.
    pub fn count(&self) -> usize {
        self.grants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Reads the tokens file again; on an error the old tokens stay. Returns
    /// how many tokens are now accepted.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let file = TokensFile::load(path)?;
        let grants: Vec<_> = file
            .tokens
            .iter()
            .map(|e| Arc::new(Grant::from_entry(e)))
            .collect();
        let n = grants.len();
        *self
            .grants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(grants);
        Ok(n)
    }

    /// The grant of a presented token, comparing its hash with every stored
    /// one in constant time (no early exit, so the time taken says nothing
    /// about which or how many bytes matched).
    fn find(&self, token: &str) -> Option<Arc<Grant>> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let grants = self
            .grants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut found = None;
        for g in grants.iter() {
            if bool::from(g.hash.ct_eq(&hash)) {
                found = Some(g.clone());
            }
        }
        found
    }

    /// Authenticates a request's metadata.
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Access, tonic::Status> {
        if !self.required() {
            return Ok(Access::Unrestricted);
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(tonic::Status::unauthenticated(
                "this server requires a token: pass --token TOKEN (or set FAULTLINE_TOKEN), or \
                 send the metadata `authorization: Bearer TOKEN`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
            .ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "the `authorization` metadata must be `Bearer TOKEN`",
                )
            })?;
        match self.find(token) {
            Some(g) => Ok(Access::Token(g)),
            None => Err(tonic::Status::unauthenticated(
                "the token is not valid on this server (revoked, mistyped, or from another \
                 server's tokens file)",
            )),
        }
    }
}

/// The interceptor on the Faultline service: authenticates each request and
/// records its [`Access`] and [`Identity`] in the request's extensions.
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    auth: Arc<Authenticator>,
}

impl AuthInterceptor {
    /// Authenticates with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let access = self.auth.authenticate(req.metadata())?;
        let identity = access.identity(req.remote_addr().map(|a| a.ip()));
        req.extensions_mut().insert(access);
        req.extensions_mut().insert(identity);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Globs: `*` spans any run (also empty), `?` one character, the rest literally.
    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("vm-*", "vm-"));
        assert!(glob_match("vm-*", "vm-web-1"));
        assert!(!glob_match("vm-*", "xvm-1"));
        assert!(glob_match("*-base", "ubuntu-base"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("img?", "img1"));
        assert!(!glob_match("img?", "img"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exact2"));
        assert!(glob_match("**a", "bba"));
    }

    /// A new token is stored only as its hash, and authenticates as that entry.
    #[test]
    fn new_token_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mut file = TokensFile::load(&path).unwrap();
        let (token, entry) = file
            .add_new("ci".into(), vec!["vm-*".into()], vec![Right::Read])
            .unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == 3 + 64);
        file.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token[3..]), "the token itself is stored");
        assert!(text.contains(&entry.sha256));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "tokens file readable by others: {mode:o}");
        // A file made group-readable stays so (and never others-readable).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        file.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{mode:o}");

        let auth = Authenticator::from_file(path).unwrap();
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let Access::Token(g) = auth.authenticate(&md).unwrap() else {
            panic!("unrestricted")
        };
        assert_eq!(g.name(), "ci");
        assert!(g.allows(Right::Read, "vm-1"));
        assert!(!g.allows(Right::Record, "vm-1"));
        assert!(!g.allows(Right::Read, "db-1"));
        md.insert("authorization", "Bearer fl_nope".parse().unwrap());
        assert_eq!(
            auth.authenticate(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    /// The interceptor records the caller: its token's id and name, or its
    /// address where tokens are not required; `identity` reads it back.
    #[test]
    fn interceptor_records_identity() {
        use tonic::service::Interceptor;
        let peer: std::net::SocketAddr = "127.0.0.1:4242".parse().unwrap();
        let request = |token: Option<&str>| {
            let mut req = tonic::Request::new(());
            req.extensions_mut()
                .insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: Some(peer),
                });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            req
        };
        let mut open = AuthInterceptor::new(Arc::new(Authenticator::open()));
        let req = open.call(request(None)).unwrap();
        assert_eq!(identity(&req), Identity::Peer(peer.ip()));
        assert!(Access::of(&req).unwrap().allows(Right::Write, "x"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mut file = TokensFile::default();
        let (token, entry) = file
            .add_new("ci".into(), vec!["*".into()], vec![Right::Read])
            .unwrap();
        file.save(&path).unwrap();
        let mut with_tokens =
            AuthInterceptor::new(Arc::new(Authenticator::from_file(path).unwrap()));
        let req = with_tokens.call(request(Some(&token))).unwrap();
        assert_eq!(
            identity(&req),
            Identity::Token {
                id: entry.id().to_owned(),
                name: "ci".into()
            }
        );
        let e = with_tokens.call(request(None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Without the interceptor there is no access at all.
        assert!(Access::of(&tonic::Request::new(())).is_err());
    }

    /// Malformed entries are refused with the entry and what to fix.
    #[test]
    fn bad_entries_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(
            &path,
            r#"{"tokens":[{"name":"x","sha256":"zz","snapshots":["*"],"rights":["read"]}]}"#,
        )
        .unwrap();
        let e = TokensFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("sha256") && e.contains("\"x\""), "{e}");
        assert!(parse_rights("read,delete").is_err());
        assert_eq!(
            parse_rights("read,record,read").unwrap(),
            vec![Right::Read, Right::Record]
        );
        assert!(parse_patterns(&["vm/../x".into()]).is_err());
    }
}
