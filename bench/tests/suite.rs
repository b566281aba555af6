//! The benchmark suite end to end: `faultline-bench all --quick` on this
//! machine, as `make bench-quick` runs it (smaller large snapshots, so that
//! the debug build stays within a few minutes). Performance is not asserted
//! here (that is what the report is for); that every scenario runs, checks
//! its memory, and reports, is.

use std::process::Command;

use faultline_client::testutil;

/// `all --quick` runs all nine scenarios and writes report.json, BENCHMARKS.md and every plot.
#[test]
fn quick_suite_runs_every_scenario_and_writes_the_report() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_faultline-bench"))
        .args(["all", "--quick", "--size", "64M", "--out"])
        .arg(out.path())
        .status()
        .expect("faultline-bench runs");
    assert!(status.success(), "faultline-bench all --quick: {status}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    let scenarios = report["scenarios"].as_array().unwrap();
    let ids: Vec<&str> = scenarios
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "latency",
            "restore",
            "working-set",
            "fanout",
            "copy-continue",
            "vm",
            "compression",
            "fleet",
            "far-memory"
        ]
    );
    for s in scenarios {
        let id = s["id"].as_str().unwrap();
        if let Some(why) = s["skipped"].as_str() {
            // A missing facility (no KVM, no userfaultfd) skips a scenario;
            // anything else, or a skip where the kernel is required, fails.
            assert!(
                !testutil::kernel_required() && !why.starts_with("failed"),
                "{id} did not run: {why}"
            );
            testutil::skip(format!("{id}: {why}"));
            continue;
        }
        assert!(
            !s["tables"].as_array().unwrap().is_empty(),
            "{id} reported no table"
        );
    }

    let md = std::fs::read_to_string(out.path().join("BENCHMARKS.md")).unwrap();
    assert!(md.contains("## Targets"), "{md}");
    assert!(
        !md.contains("Plots not drawn"),
        "plots missing (is fonts-dejavu-core installed? `make deps`):\n{md}"
    );
    for s in scenarios.iter().filter(|s| s["skipped"].is_null()) {
        for plot in s["plots"].as_array().unwrap() {
            let file = plot["file"].as_str().unwrap();
            let png =
                std::fs::read(out.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(&png[1..4], b"PNG", "{file}");
        }
    }
}
