//! What one client, one request or one snapshot may make the server hold.
//!
//! Every limit is a named default here, documented with why it has its value,
//! a field of [`Limits`], and a flag of `faultline-server serve` (the struct
//! is a `clap::Args`, flattened into the commands that take it). Requests
//! over a limit get ResourceExhausted (an idle upload DeadlineExceeded) with
//! the limit and the flag that raises it in the message; every rejection is
//! counted in `faultline_server_rejected_total{reason}`. docs/security.md
//! lists them all.

use std::time::Duration;

use faultline_proto::PageSize;

use crate::store::{CreateError, SnapshotSpec};

/// Largest image accepted by upload or import: 1 TiB. Larger than any VM
/// this project restores; large enough that no real snapshot meets it, small
/// enough that a header declaring 2^63 bytes is refused before anything is
/// allocated.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 1 << 40;

/// Most pages in one snapshot: 16 Mi (64 GiB of 4 KiB pages). A manifest
/// carries 4.125 bytes per page, so this keeps every manifest (~69 MiB)
/// under the server's 96 MiB encoded message limit: a larger snapshot could
/// be stored but never served. Writing one holds a bitmap of 2 MiB.
pub const DEFAULT_MAX_IMAGE_PAGES: u64 = 1 << 24;

/// Free bytes an upload or import leaves on the store's file system: 1 GiB,
/// so that a large upload cannot fill the disk the server's logs and
/// working sets live on. Checked when an upload starts and as it is
/// written; zero pages are holes and take no room.
pub const DEFAULT_MIN_FREE_DISK_BYTES: u64 = 1 << 30;

/// How long an upload may go without a message before it is dropped (and
/// its partial snapshot removed): a client that went silent holds a
/// temporary directory and a writer's buffers. A minute survives any pause a
/// working uploader makes.
pub const DEFAULT_UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Prefetch streams served at once, server-wide. Each holds up to
/// [`crate::service::PREFETCH_QUEUE_DEPTH`] batches of up to 16 MiB and a
/// bitmap of the snapshot; 256 of them bound that to a few GiB in the worst
/// case, far above what a host restores at once.
pub const DEFAULT_MAX_PREFETCH_STREAMS: usize = 256;

/// Prefetch streams one client (token identity, or peer address) may hold
/// at once: a pager uses one per restore; 32 leave room for many VMs behind
/// one address without letting one client take every slot.
pub const DEFAULT_MAX_PREFETCH_STREAMS_PER_CLIENT: usize = 32;

/// Ranges in one `Prefetch` request: the same as `ReadPages`' 4096. A pager
/// names a few ranges; a million of them is an attack on the CPU.
pub const DEFAULT_MAX_PREFETCH_RANGES: usize = 4096;

/// Working sets kept per snapshot: a handful of workloads per image is the
/// real use; the cap stops a client from filling the store with names.
pub const DEFAULT_MAX_WORKING_SETS: usize = 16;

/// Pages in one working set: 4 Mi (16 GiB of 4 KiB pages, a 32 MiB file).
/// A working set is what a restore touches, a fraction of the image.
pub const DEFAULT_MAX_WORKING_SET_PAGES: u64 = 1 << 22;

/// Snapshots kept open (manifest, digests, working sets in memory, one file
/// handle). A 64 GiB snapshot's digests are 64 MiB, so the cache is bounded
/// in count; streams holding an evicted snapshot keep it until they end.
pub const DEFAULT_MAX_OPEN_SNAPSHOTS: usize = 64;

/// Fault requests of one stream answered at once. A pager's vCPUs fault
/// independently: answering in order would hold every vCPU behind one cold
/// page. Each answer is at most 16 MiB, so this bounds a stream's memory to
/// 128 MiB in the worst case (a pager's windows are 1 MiB or less).
pub const DEFAULT_FAULT_CONCURRENCY: usize = 8;

/// The server's limits; see the module docs. `Default` is the documented
/// defaults.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Largest image an upload or import may declare, in bytes (K/M/G/T
    /// suffixes).
    #[arg(long = "max-image-size", value_name = "BYTES", default_value = "1T", value_parser = parse_bytes)]
    pub max_image_bytes: u64,
    /// Most pages in one snapshot.
    #[arg(long = "max-image-pages", value_name = "PAGES", default_value_t = DEFAULT_MAX_IMAGE_PAGES)]
    pub max_image_pages: u64,
    /// Free space an upload or import must leave on the store's disk, in
    /// bytes (K/M/G/T suffixes).
    #[arg(long = "min-free-disk", value_name = "BYTES", default_value = "1G", value_parser = parse_bytes)]
    pub min_free_disk_bytes: u64,
    /// Seconds an upload may go without a message before it is dropped.
    #[arg(long = "upload-idle-timeout", value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub upload_idle_timeout: Duration,
    /// Prefetch streams served at once, server-wide.
    #[arg(long = "max-prefetch-streams", value_name = "N", default_value_t = DEFAULT_MAX_PREFETCH_STREAMS)]
    pub max_prefetch_streams: usize,
    /// Prefetch streams one client may hold at once.
    #[arg(long = "max-prefetch-streams-per-client", value_name = "N", default_value_t = DEFAULT_MAX_PREFETCH_STREAMS_PER_CLIENT)]
    pub max_prefetch_streams_per_client: usize,
    /// Ranges in one Prefetch request.
    #[arg(long = "max-prefetch-ranges", value_name = "N", default_value_t = DEFAULT_MAX_PREFETCH_RANGES)]
    pub max_prefetch_ranges: usize,
    /// Working sets kept per snapshot.
    #[arg(long = "max-working-sets", value_name = "N", default_value_t = DEFAULT_MAX_WORKING_SETS)]
    pub max_working_sets: usize,
    /// Pages in one working set.
    #[arg(long = "max-working-set-pages", value_name = "PAGES", default_value_t = DEFAULT_MAX_WORKING_SET_PAGES)]
    pub max_working_set_pages: u64,
    /// Snapshots kept open in memory.
    #[arg(long = "max-open-snapshots", value_name = "N", default_value_t = DEFAULT_MAX_OPEN_SNAPSHOTS)]
    pub max_open_snapshots: usize,
    /// Fault requests of one stream answered at once.
    #[arg(long = "fault-concurrency", value_name = "N", default_value_t = DEFAULT_FAULT_CONCURRENCY, value_parser = parse_positive)]
    pub fault_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            max_image_pages: DEFAULT_MAX_IMAGE_PAGES,
            min_free_disk_bytes: DEFAULT_MIN_FREE_DISK_BYTES,
            upload_idle_timeout: DEFAULT_UPLOAD_IDLE_TIMEOUT,
            max_prefetch_streams: DEFAULT_MAX_PREFETCH_STREAMS,
            max_prefetch_streams_per_client: DEFAULT_MAX_PREFETCH_STREAMS_PER_CLIENT,
            max_prefetch_ranges: DEFAULT_MAX_PREFETCH_RANGES,
            max_working_sets: DEFAULT_MAX_WORKING_SETS,
            max_working_set_pages: DEFAULT_MAX_WORKING_SET_PAGES,
            max_open_snapshots: DEFAULT_MAX_OPEN_SNAPSHOTS,
            fault_concurrency: DEFAULT_FAULT_CONCURRENCY,
        }
    }
}

impl Limits {
    /// Checks a new snapshot's size against the limits. Runs before the
    /// store allocates or creates anything for it.
    pub fn check_spec(&self, spec: &SnapshotSpec) -> Result<(), CreateError> {
        check_image(self, spec.size, spec.page_size)
    }

    /// The limits as `(name, value)`, for the metrics that show them.
    pub fn named(&self) -> [(&'static str, u64); 11] {
        [
            ("max_image_bytes", self.max_image_bytes),
            ("max_image_pages", self.max_image_pages),
            ("min_free_disk_bytes", self.min_free_disk_bytes),
            (
                "upload_idle_timeout_seconds",
                self.upload_idle_timeout.as_secs(),
            ),
            ("max_prefetch_streams", self.max_prefetch_streams as u64),
            (
                "max_prefetch_streams_per_client",
                self.max_prefetch_streams_per_client as u64,
            ),
            ("max_prefetch_ranges", self.max_prefetch_ranges as u64),
            ("max_working_sets", self.max_working_sets as u64),
            ("max_working_set_pages", self.max_working_set_pages),
            ("max_open_snapshots", self.max_open_snapshots as u64),
            ("fault_concurrency", self.fault_concurrency as u64),
        ]
    }
}

/// Checks an image of `size` bytes of `page_size` pages against `limits`.
pub fn check_image(limits: &Limits, size: u64, page_size: PageSize) -> Result<(), CreateError> {
    if size > limits.max_image_bytes {
        return Err(CreateError::TooLarge {
            what: "size in bytes",
            got: size,
            limit: limits.max_image_bytes,
            flag: "max-image-size",
        });
    }
    let pages = size / page_size.bytes();
    if pages > limits.max_image_pages {
        return Err(CreateError::TooLarge {
            what: "page count",
            got: pages,
            limit: limits.max_image_pages,
            flag: "max-image-pages",
        });
    }
    Ok(())
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    crate::import::parse_size(s)
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive whole number")),
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: Limits,
    }

    /// The flags' defaults are the documented constants.
    #[test]
    fn flag_defaults_are_the_constants() {
        assert_eq!(Cli::parse_from(["x"]).limits, Limits::default());
        let cli = Cli::parse_from(["x", "--max-image-size", "4M", "--upload-idle-timeout", "2"]);
        assert_eq!(cli.limits.max_image_bytes, 4 << 20);
        assert_eq!(cli.limits.upload_idle_timeout, Duration::from_secs(2));
    }

    /// A declared size of 2^63 is refused by the size check, whatever the
    /// page count limit.
    #[test]
    fn huge_images_are_refused() {
        let l = Limits::default();
        assert!(check_image(&l, 1 << 63, PageSize::Size4K).is_err());
        assert!(check_image(&l, 1 << 30, PageSize::Size4K).is_ok());
        assert!(check_image(&l, 128 << 30, PageSize::Size4K).is_err());
    }
}
