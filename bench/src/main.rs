//! `faultline-bench`: benchmarks and test inputs for faultline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use faultline_bench::suite::{self, ScenarioId, SuiteConfig};
use faultline_bench::vm::restore::{self as vm_restore, VmRestoreConfig, WalkOrder};
use faultline_bench::{image, wire};
use faultline_client::backing::BackingKind;
use faultline_client::pager::PrefetchPolicy;
use faultline_server::import::parse_size;

#[derive(Parser, Debug)]
#[command(
    name = "faultline-bench",
    version,
    about = "Benchmarks faultline against its baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by `all` and the one-scenario subcommands.
#[derive(clap::Args, Debug)]
struct SuiteArgs {
    /// Smaller snapshots and fewer repeats: the whole suite in under 5 minutes on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Size of the large snapshots (restore and working-set scenarios) [default: 2G, 256M with
    /// --quick].
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Output directory for report.json, BENCHMARKS.md and the PNG plots.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every scenario against its baselines; writes report.json, BENCHMARKS.md and plots.
    All(SuiteArgs),
    /// Scenario 1: demand-fault latency vs a local UFFDIO_COPY handler, a plain page fault and
    /// a TCP ping-pong.
    Latency(SuiteArgs),
    /// Scenario 2: full restore throughput vs an eager local copy and memcpy, per backing.
    Restore(SuiteArgs),
    /// Scenario 3: a scattered 10% working set: demand only vs recorded replay vs local memory.
    WorkingSet(SuiteArgs),
    /// Scenario 4: 1, 4, 16, 64 client processes restoring from one server.
    Fanout(SuiteArgs),
    /// Scenario 5: UFFDIO_COPY vs UFFDIO_CONTINUE on shmem and hugetlbfs.
    CopyContinue(SuiteArgs),
    /// Scenario 6: the micro-VM's page walk on restored vs local memory.
    VmWalk(SuiteArgs),
    /// Scenario 7: none vs lz4 vs zstd on the prefetch path.
    Compression(SuiteArgs),
    /// Scenario 8: one Garage (S3), 1 and 3 faultline-server processes, 64 restores of 4
    /// snapshots sharing a base image, next to a local store directory (needs Garage:
    /// scripts/garage.sh install, and faultline-server built next to faultline-bench).
    Fleet(SuiteArgs),
    /// Scenario 9: far memory at 100/75/50/25% local budget vs all-local memory and a memory
    /// cgroup swapping to zram (as root), 1 GiB footprint (128 MiB with --quick and in `all`).
    FarMemory(SuiteArgs),
    /// Write a report's BENCHMARKS.md and bar plots again from its report.json (after a change
    /// to the renderer); latency CDFs are kept as drawn, report.json holds no copy of their
    /// samples.
    Render {
        /// The report.json of a run.
        #[arg(long)]
        report: PathBuf,
        /// Output directory [default: the report's own].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Internal (fan-out): serve a store directory; prints the URL on stdout.
    #[command(hide = true)]
    FanoutServer(suite::fanout::ServerArgs),
    /// Internal (fan-out): one client process's restore; prints one JSON line.
    #[command(hide = true)]
    FanoutClient(suite::fanout::ClientArgs),
    /// Internal (fleet): one client process's restore from a fleet; prints one JSON line.
    #[command(hide = true)]
    FleetClient(suite::fleet::ClientArgs),
    /// Internal (far-memory): the Linux baseline's workloads inside a memory cgroup; prints
    /// one JSON line.
    #[command(hide = true)]
    FarMemoryChild(suite::far_memory::linux::ChildArgs),
    /// Write a synthetic guest memory image (zero pages, text, random data).
    Gen {
        /// Size, e.g. 256M or 2G; a multiple of 4 KiB.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the content.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Prefetch throughput over loopback by codec, batch size and HTTP/2 window.
    Wire {
        /// Image size per snapshot.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Repeats per configuration (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Restore a KVM micro-VM through faultline: snapshot, import, serve in-process, start the
    /// pager on fresh memory, let the vCPU fault its pages in, check its checksum.
    Vm {
        /// Backing of the restored memory: anon, shmem, hugetlb or guest-memfd.
        #[arg(long, default_value = "shmem")]
        backing: BackingKind,
        /// Guest memory size, a multiple of 2 MiB, e.g. 64M or 1G.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Page order of the guest's walk: seq or random.
        #[arg(long, default_value = "random")]
        walk: WalkOrder,
        /// Pages the guest visits (one 8-byte read each).
        #[arg(long, default_value_t = 4096)]
        pages: u64,
        /// Background prefetch: none (the vCPU's faults fetch every page), working-set (the
        /// pages the guest touched before the snapshot) or all.
        #[arg(long, default_value = "none")]
        prefetch: PrefetchPolicy,
        /// Seed of the memory content and of the random walk.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Snapshot the VM at boot instead of after a first run of its walk.
        #[arg(long)]
        no_first_run: bool,
        /// The baseline: copy the memory file into local memory and run the guest there,
        /// without faultline.
        #[arg(long)]
        local: bool,
        /// Print one JSON object instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs `scenarios` with `args` and prints where the report went.
fn run_suite(args: SuiteArgs, scenarios: Vec<ScenarioId>) -> anyhow::Result<()> {
    let config = SuiteConfig {
        quick: args.quick,
        size: args.size.unwrap_or(if args.quick {
            suite::QUICK_SIZE
        } else {
            suite::DEFAULT_SIZE
        }),
        out: args.out,
        scenarios,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let report = suite::run(&config)?;
    let failed: Vec<_> = report
        .scenarios
        .iter()
        .filter(|s| s.skipped.is_some())
        .map(|s| s.id.as_str())
        .collect();
    println!(
        "report: {} ({:.0} s)",
        config.out.join("BENCHMARKS.md").display(),
        report.duration_s
    );
    if !failed.is_empty() {
        println!("did not run: {}", failed.join(", "));
    }
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::All(args) => run_suite(args, ScenarioId::ALL.to_vec()),
        Command::Latency(args) => run_suite(args, vec![ScenarioId::Latency]),
        Command::Restore(args) => run_suite(args, vec![ScenarioId::Restore]),
        Command::WorkingSet(args) => run_suite(args, vec![ScenarioId::WorkingSet]),
        Command::Fanout(args) => run_suite(args, vec![ScenarioId::Fanout]),
        Command::CopyContinue(args) => run_suite(args, vec![ScenarioId::CopyContinue]),
        Command::VmWalk(args) => run_suite(args, vec![ScenarioId::Vm]),
        Command::Compression(args) => run_suite(args, vec![ScenarioId::Compression]),
        Command::Fleet(args) => run_suite(args, vec![ScenarioId::Fleet]),
        Command::FarMemory(args) => run_suite(args, vec![ScenarioId::FarMemory]),
        Command::Render { report, out } => {
            let out = out.unwrap_or_else(|| {
                report
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            suite::render::rerender(&report, &out)?;
            println!("report: {}", out.join("BENCHMARKS.md").display());
            Ok(())
        }
        Command::FanoutServer(args) => suite::fanout::server_main(&args),
        Command::FanoutClient(args) => suite::fanout::client_main(&args),
        Command::FleetClient(args) => suite::fleet::client_main(&args),
        Command::FarMemoryChild(args) => suite::far_memory::linux::child_main(&args),
        Command::Gen { size, out, seed } => {
            image::write_image(&out, size, seed)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {} ({} bytes, seed {seed})", out.display(), size);
            Ok(())
        }
        Command::Wire {
            size,
            repeats,
            json,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let cfg = wire::WireConfig { size, repeats };
            if !json {
                println!(
                    "{:<10} {:<6} {:<14} {:>8} {:>8} {:>15} {:>6}",
                    "image", "codec", "transport", "batch", "GB/s", "min..max", "wire"
                );
            }
            let results = rt.block_on(wire::run(&cfg, |r| {
                if !json {
                    println!(
                        "{:<10} {:<6} {:<14} {:>7}K {:>8.2} {:>7.2}..{:<7.2} {:>5.0}%",
                        r.image,
                        r.compression,
                        r.transport,
                        r.batch_bytes >> 10,
                        r.gbps_median,
                        r.gbps_min,
                        r.gbps_max,
                        100.0 * r.wire_ratio
                    );
                }
            }))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            }
            Ok(())
        }
        Command::Vm {
            backing,
            size,
            walk,
            pages,
            prefetch,
            seed,
            no_first_run,
            local,
            json,
        } => {
            let config = VmRestoreConfig {
                walk,
                pages,
                prefetch,
                seed,
                first_run: !no_first_run,
                local,
                ..VmRestoreConfig::new(backing, size)
            };
            let report = vm_restore::run(&config)
                .with_context(|| format!("restoring a micro-VM into {backing} memory"))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
            anyhow::ensure!(
                report.matches,
                "the restored guest's checksum {:#018x} differs from the original's {:#018x}",
                report.checksum,
                report.expected
            );
            Ok(())
        }
    }
}
