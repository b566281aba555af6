//! Scenario 4: Fan-out.

use std::path::PathBuf;

use super::{Ctx, ScenarioReport};

/// Arguments of the hidden `fanout-server` subcommand.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Store directory to serve.
    #[arg(long)]
    pub store: PathBuf,
}

/// Arguments of the hidden `fanout-client` subcommand.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// Server URL.
    #[arg(long)]
    pub server: String,
    /// Snapshot to restore.
    #[arg(long)]
    pub snapshot: String,
}

/// `faultline-bench fanout-server`: serves `args.store` on 127.0.0.1.
pub fn server_main(_args: &ServerArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

/// `faultline-bench fanout-client`: one restore.
pub fn client_main(_args: &ClientArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}

/// Runs the scenario.
pub fn run(_ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    anyhow::bail!("not written yet")
}
