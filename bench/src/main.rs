//! `faultline-bench`: benchmarks and test inputs for faultline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
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

#[derive(Subcommand, Debug)]
enum Command {
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

fn run(command: Command) -> anyhow::Result<()> {
    match command {
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
            json,
        } => {
            let config = VmRestoreConfig {
                walk,
                pages,
                prefetch,
                seed,
                first_run: !no_first_run,
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
