//! Scenario 6: Micro-VM.

use super::{Ctx, ScenarioReport};

/// Runs the scenario.
pub fn run(_ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    anyhow::bail!("not written yet")
}
