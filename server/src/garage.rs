//! A real S3 server for tests and benchmarks: a single-node Garage on
//! 127.0.0.1, started and stopped through `scripts/garage.sh` (which builds
//! and caches the binary; `make test` and `.ci/run` build it first).
//!
//! Each [`Garage`] has its own directory, ports, access key and bucket, so
//! tests running in parallel do not see each other's objects; it is stopped
//! and its directory removed when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::object::{ConnectError, ObjectSnapshotStore, ObjectStoreOptions};

/// The script that builds, starts and stops Garage.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/garage.sh");

/// Lets a test that cannot start Garage skip (`=1`) instead of failing.
pub const ALLOW_SKIP_ENV: &str = "FAULTLINE_ALLOW_SKIP";

/// The former opt-in to failing; with it `=1`, a missing Garage fails even
/// where [`ALLOW_SKIP_ENV`] allows skipping.
pub const REQUIRE_ENV: &str = "FAULTLINE_REQUIRE_KERNEL";

/// A file each skip appends a line to; `make test` counts them.
pub const SKIP_LOG_ENV: &str = "FAULTLINE_SKIP_LOG";

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// Starts tried before giving up (see [`Garage::start`]).
const START_TRIES: u32 = 3;

/// Starting Garage failed.
#[derive(Debug, thiserror::Error)]
pub enum GarageError {
    /// The binary is not in the cache.
    #[error("Garage is not built; run `scripts/garage.sh install` (or `make test`, which does)")]
    NotBuilt,
    /// The script failed.
    #[error("scripts/garage.sh {command} failed: {output}")]
    Script {
        /// Its arguments.
        command: String,
        /// What it printed.
        output: String,
    },
    /// Files or ports.
    #[error("cannot set up Garage: {0}")]
    Io(#[from] std::io::Error),
}

/// A running single-node Garage; see the module docs.
#[derive(Debug)]
pub struct Garage {
    dir: PathBuf,
    env: Vec<(String, String)>,
    bucket: String,
    running: bool,
}

fn script(args: &[&str], env: &[(&str, String)]) -> Result<String, GarageError> {
    let out = Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    if !out.status.success() {
        return Err(GarageError::Script {
            command: args.join(" "),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Garage {
    /// Whether the binary is built.
    pub fn available() -> bool {
        script(&["bin"], &[]).is_ok()
    }

    /// For tests: a new Garage; if it cannot start, the test fails, unless
    /// `FAULTLINE_ALLOW_SKIP=1` lets it skip (then `None`, after saying why
    /// on stderr and in `FAULTLINE_SKIP_LOG`), as the client's kernel-
    /// dependent tests do (`faultline_client::testutil`).
    pub fn start_or_skip() -> Option<Self> {
        let e = match Self::start() {
            Ok(g) => return Some(g),
            Err(e) => e,
        };
        let test = std::thread::current()
            .name()
            .unwrap_or("<unnamed test>")
            .to_owned();
        let is_one = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        if !is_one(ALLOW_SKIP_ENV) || is_one(REQUIRE_ENV) {
            panic!(
                "{test}: {e} (the S3 tests need Garage; build it, or set {ALLOW_SKIP_ENV}=1 to \
                 skip them)"
            );
        }
        // Straight to stderr: the harness hides captured output of passing
        // tests, and a skip must be visible.
        let _ = writeln!(std::io::stderr(), "skipping {test}: {e}");
        if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
            let line = format!("skipped {test}: {e}\n");
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
        }
        None
    }

    /// Starts a new Garage in a fresh directory under the system's temporary
    /// directory.
    pub fn start() -> Result<Self, GarageError> {
        if !Self::available() {
            return Err(GarageError::NotBuilt);
        }
        // A port found free may be taken by another process before Garage
        // binds it: try again with new ones.
        let mut tries = 0;
        let mut garage = loop {
            tries += 1;
            let dir = std::env::temp_dir().join(format!(
                "faultline-garage-{}-{}",
                std::process::id(),
                NEXT_DIR.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let names = ["GARAGE_S3_PORT", "GARAGE_RPC_PORT", "GARAGE_ADMIN_PORT"];
            let ports: Vec<(&str, String)> = names
                .into_iter()
                .zip(crate::testing::free_ports(names.len())?)
                .map(|(name, port)| (name, port.to_string()))
                .collect();
            let mut garage = Self {
                dir,
                env: Vec::new(),
                bucket: String::new(),
                running: false,
            };
            match garage.launch(&ports) {
                Ok(()) => break garage,
                Err(e) if tries >= START_TRIES => return Err(e),
                // Dropping it removes its directory.
                Err(_) => continue,
            }
        };
        let text = std::fs::read_to_string(garage.dir.join("env"))?;
        garage.env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        garage.bucket = garage
            .var("FAULTLINE_S3_BUCKET")
            .unwrap_or_default()
            .to_owned();
        Ok(garage)
    }

    fn launch(&mut self, env: &[(&str, String)]) -> Result<(), GarageError> {
        script(&["start", &self.dir.to_string_lossy()], env)?;
        self.running = true;
        Ok(())
    }

    /// Stops the server, keeping its data (see [`Self::restart`]).
    pub fn stop(&mut self) -> Result<(), GarageError> {
        if self.running {
            script(&["stop", &self.dir.to_string_lossy()], &[])?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts the server again on its data, ports and key.
    pub fn restart(&mut self) -> Result<(), GarageError> {
        self.stop()?;
        self.launch(&[])
    }

    /// Its directory (config, data, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `AWS_*` variables that reach it, as `(name, value)`.
    pub fn aws_env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env
            .iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Its bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://BUCKET/PREFIX`, for `--store`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// A store under `prefix` of its bucket.
    pub fn store(
        &self,
        prefix: &str,
        options: ObjectStoreOptions,
    ) -> Result<ObjectSnapshotStore, ConnectError> {
        ObjectSnapshotStore::with_settings(
            &self.bucket,
            prefix,
            self.aws_env().map(|(k, v)| (k.to_owned(), v.to_owned())),
            options,
        )
    }
}

impl Garage {
    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) -> Result<(), GarageError> {
        if self.running {
            script(&["stop", &self.dir.to_string_lossy(), "--now"], &[])?;
            self.running = false;
        }
        Ok(())
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        // Its data is about to be removed: no need for a graceful stop.
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
