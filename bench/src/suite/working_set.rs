//! Scenario 3: Working set.

use super::{Ctx, ScenarioReport};

/// Runs the scenario.
pub fn run(_ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    anyhow::bail!("not written yet")
}
