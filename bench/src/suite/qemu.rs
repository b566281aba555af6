//! The QEMU postcopy baseline of the restore scenario: QEMU's own lazy
//! restore of the same memory, measured in the same run.
//!
//! Two guest-less QEMU processes (`-machine none`, no vCPU, so nothing but
//! the migration runs): a source whose RAM is a private mapping of the
//! snapshot's raw image (`memory-backend-file`, `share=off`), and a
//! destination with anonymous RAM of the same id waiting with `-incoming
//! defer`. Both get the `postcopy-ram` and `events` capabilities; the
//! source's bandwidth limit is lifted, it is told to `migrate` over
//! 127.0.0.1 and, at once, `migrate-start-postcopy`, so (as the source's
//! `query-migrate` confirms: `precopy-bytes` 0) every page travels in the
//! postcopy phase: the destination runs at once and its RAM is filled by the
//! source's background stream, which is what faultline's prefetch does.
//! QEMU sends zero pages as a flag, as faultline does.
//!
//! The time is read from the QMP events' own timestamps: from the source's
//! `MIGRATION` `setup` to the destination's `MIGRATION` `completed`. Then a
//! few pages of the destination's RAM are saved (`pmemsave`) and compared
//! with the image, so the baseline is known to have really moved the data.
//!
//! QMP commands and events are those of QEMU 7.2 (`qapi/migration.json`,
//! `docs/devel/migration.rst`, "Postcopy").

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The binary run, looked up in `PATH`.
pub const QEMU: &str = "qemu-system-x86_64";

/// Longest wait for a QEMU process's QMP socket to appear.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest a migration may take before the baseline gives up: far beyond
/// the ~5 s that 2 GiB take at the 0.4-0.5 GB/s measured here.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// The source's bandwidth limit, bytes per second: 100 GB/s, i.e. none
/// (QEMU's default of 32 MiB/s would measure the limit, not QEMU).
const MAX_BANDWIDTH: u64 = 100_000_000_000;

/// Pages of the destination's RAM compared with the image after a
/// migration, each a 4 KiB `pmemsave`.
const CHECK_PAGES: u64 = 16;

/// The RAM block's id on both sides: migration matches blocks by id.
const RAM_ID: &str = "ram0";

/// One QEMU postcopy migration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Migration {
    /// Seconds from the source's `setup` to the destination's `completed`.
    pub secs: f64,
    /// Bytes on the wire, by the source's `query-migrate` (`ram.transferred`).
    pub transferred: u64,
    /// Bytes sent before the switch to postcopy (`ram.precopy-bytes`).
    pub precopy_bytes: u64,
    /// Zero pages sent as a flag (`ram.duplicate`).
    pub zero_pages: u64,
}

/// Why QEMU cannot be run here, if it cannot: the text of the "not run"
/// note.
pub fn unavailable() -> Option<String> {
    match Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`{QEMU} --version` failed ({s})")),
        Err(e) => Some(format!(
            "{QEMU} is not installed ({e}); `make bench` installs it (Debian package \
             qemu-system-x86)"
        )),
    }
}

/// A QEMU process, killed when dropped.
struct Qemu {
    child: Child,
    qmp: Qmp,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.qmp.execute("quit", None);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Starts QEMU with `ram` as its memory backend (`-object` text without
    /// the id and size) and `extra` arguments, and connects to its QMP.
    fn start(dir: &Path, name: &str, size: u64, ram: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let socket = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(QEMU)
            .args(["-nodefaults", "-display", "none", "-machine"])
            .arg(format!("none,memory-backend={RAM_ID}"))
            .arg("-m")
            .arg(format!("{}M", size >> 20))
            .arg("-object")
            .arg(format!("{ram},id={RAM_ID},size={size}"))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {QEMU}"))?;
        let mut child = child;
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < START_TIMEOUT => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let log = std::fs::read_to_string(dir.join(format!("{name}.log")))
                            .unwrap_or_default();
                        bail!("{QEMU} ({name}) exited with {status}: {}", log.trim());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e).context(format!("connecting to {name}'s QMP socket"));
                }
            }
        };
        let qmp = Qmp::new(stream, name).inspect_err(|_| {
            let _ = child.kill();
            let _ = child.wait();
        })?;
        Ok(Self { child, qmp })
    }
}

/// A QMP connection: commands in, answers and events out.
struct Qmp {
    name: String,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events read while waiting for an answer, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    fn new(stream: UnixStream, name: &str) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(MIGRATION_TIMEOUT))?;
        let mut qmp = Self {
            name: name.to_string(),
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("{}: not a QMP greeting: {greeting}", qmp.name);
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}'s QMP socket", self.name))?;
        if n == 0 {
            bail!("{} closed its QMP socket", self.name);
        }
        serde_json::from_str(&line).with_context(|| format!("{}: bad QMP line {line:?}", self.name))
    }

    /// Runs `command`, keeping the events that arrive before its answer.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        writeln!(self.writer, "{msg}")?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(e) = v.get("error") {
                bail!("{}: {command} failed: {e}", self.name);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    /// The first `MIGRATION` event with one of `statuses`, waiting for it
    /// (until `deadline`): its status and timestamp in seconds.
    fn migration_event(
        &mut self,
        statuses: &[&str],
        deadline: Instant,
    ) -> anyhow::Result<(String, f64)> {
        loop {
            let found = self.events.iter().position(|e| {
                e["event"] == "MIGRATION" && statuses.iter().any(|s| e["data"]["status"] == **s)
            });
            if let Some(i) = found {
                let e = self.events.remove(i);
                let ts = &e["timestamp"];
                let secs = ts["seconds"].as_f64().unwrap_or(0.0)
                    + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                return Ok((e["data"]["status"].as_str().unwrap_or("").to_string(), secs));
            }
            if Instant::now() > deadline {
                bail!("{}: no migration event {statuses:?} in time", self.name);
            }
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

/// A free port on 127.0.0.1 (bound, read, released: QEMU binds it next).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// Migrates `size` bytes of `image` (a raw memory image, page-cache warm)
/// from a source QEMU to a destination QEMU on this host by postcopy, and
/// checks [`CHECK_PAGES`] pages of the result against the image. `dir` holds
/// the QMP sockets and logs.
pub fn migrate_once(dir: &Path, image: &Path, size: u64) -> anyhow::Result<Migration> {
    std::fs::create_dir_all(dir)?;
    let mut dst = Qemu::start(
        dir,
        "dst",
        size,
        "memory-backend-ram",
        &["-incoming", "defer"],
    )?;
    let mut src = Qemu::start(
        dir,
        "src",
        size,
        &format!("memory-backend-file,mem-path={},share=off", image.display()),
        &[],
    )?;
    let caps = json!({ "capabilities": [
        { "capability": "postcopy-ram", "state": true },
        { "capability": "events", "state": true },
    ]});
    dst.qmp
        .execute("migrate-set-capabilities", Some(caps.clone()))?;
    src.qmp.execute("migrate-set-capabilities", Some(caps))?;
    src.qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": MAX_BANDWIDTH })),
    )?;
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    dst.qmp
        .execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    // Drop the destination's own `setup` event: the clock starts at the
    // source's.
    dst.qmp.events.clear();
    src.qmp.events.clear();
    src.qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    src.qmp.execute("migrate-start-postcopy", None)?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let (_, started) = src.qmp.migration_event(&["setup"], deadline)?;
    let (status, ended) = dst
        .qmp
        .migration_event(&["completed", "failed"], deadline)?;
    if status != "completed" {
        bail!(
            "the QEMU migration failed (destination status {status:?}); see the logs in {}",
            dir.display()
        );
    }
    // The source may report completion a moment after the destination.
    src.qmp
        .migration_event(&["completed", "failed"], deadline)?;
    let info = src.qmp.execute("query-migrate", None)?;
    let ram = &info["ram"];
    let field = |k: &str| ram[k].as_u64().unwrap_or(0);
    let migration = Migration {
        secs: ended - started,
        transferred: field("transferred"),
        precopy_bytes: field("precopy-bytes"),
        zero_pages: field("duplicate"),
    };
    check_pages(&mut dst.qmp, dir, image, size)?;
    Ok(migration)
}

/// Saves [`CHECK_PAGES`] pages spread over the destination's RAM and
/// compares them with the image.
fn check_pages(qmp: &mut Qmp, dir: &Path, image: &Path, size: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let image = std::fs::File::open(image)?;
    let out: PathBuf = dir.join("page");
    let pages = size / 4096;
    let (mut want, step) = (vec![0u8; 4096], (pages / CHECK_PAGES).max(1));
    for i in 0..CHECK_PAGES.min(pages) {
        // Spread, and off the 2 MiB grid, so the zero tail is checked too.
        let page = (i * step + i * 7) % pages;
        qmp.execute(
            "pmemsave",
            Some(
                json!({ "val": page * 4096, "size": 4096, "filename": out.display().to_string() }),
            ),
        )?;
        let got = std::fs::read(&out)?;
        image.read_exact_at(&mut want, page * 4096)?;
        if got != want {
            bail!("QEMU's migrated memory differs from the image at page {page}");
        }
    }
    Ok(())
}
