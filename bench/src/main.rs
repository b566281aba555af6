//! `faultline-bench`: benchmarks and test inputs for faultline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use faultline_bench::{image, wire};
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
    }
}
