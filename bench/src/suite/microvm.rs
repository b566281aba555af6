//! Scenario 6: the micro-VM's page walk on memory restored through faultline
//! vs on local memory.
//!
//! Each run snapshots the KVM micro-VM of [`crate::vm`] after a first walk,
//! then resumes it either on fresh memory filled by the pager as the vCPU
//! faults (prefetch none, or the recorded working set), or on local memory
//! the memory file was copied into first. The figure is the time from the
//! vCPU's resume to its checksum (and, next to it, that plus the pager's
//! start or the local copy).

use anyhow::Context;
use faultline_client::backing::BackingKind;
use faultline_client::pager::PrefetchPolicy;

use super::report::{Bar, Plot, ratio};
use super::{Ctx, ScenarioReport, Summary, Table};
use crate::vm::restore::{self as vm_restore, VmRestoreConfig, VmRestoreReport, WalkOrder};

/// Backing of the guest memory: shmem, what a VMM hands a UFFD handler in
/// Firecracker's protocol (the pager resolves it with CONTINUE).
const BACKING: BackingKind = BackingKind::Shmem;

/// The ways the guest's memory is filled, as (label, local, prefetch).
const MODES: [(&str, bool, PrefetchPolicy); 3] = [
    ("faultline, demand", false, PrefetchPolicy::None),
    ("faultline, working set", false, PrefetchPolicy::WorkingSet),
    ("local memory", true, PrefetchPolicy::None),
];

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport {
        id: "vm".into(),
        title: "Micro-VM page walk".into(),
        ..Default::default()
    };
    if !std::path::Path::new("/dev/kvm").exists() {
        report.skipped = Some("no /dev/kvm on this machine".into());
        return Ok(report);
    }
    let size = ctx.pick(64u64 << 20, 256 << 20);
    let pages = ctx.pick(2048u64, 4096);
    let repeats = ctx.pick(2, 3);
    report.method = format!(
        "A KVM micro-VM ({} MiB, one vCPU, long mode) walks {pages} pages (one 8-byte read \
         each) and reports a checksum by port I/O. It is snapshotted after a first walk and \
         resumed on {} memory filled by faultline as the vCPU faults (prefetch none, or the \
         recorded working set: the walk's pages), or on local memory the memory file was \
         copied into first. Time from the vCPU's resume to its checksum, {repeats} repeats; \
         every checksum must match the original's.",
        size >> 20,
        BACKING.as_str()
    );

    let mut table = Table::new(
        "",
        &[
            "walk",
            "memory",
            "guest s",
            "vs local",
            "incl. start s",
            "faults",
            "fault p50 µs",
        ],
    );
    let mut bars = Vec::new();
    let mut data = Vec::new();
    let bar = ctx.bar("micro-VM walks", (2 * MODES.len() * repeats) as u64);
    for walk in [WalkOrder::Seq, WalkOrder::Random] {
        let mut runs: Vec<Vec<VmRestoreReport>> = vec![Vec::new(); MODES.len()];
        for _ in 0..repeats {
            // Interleaved, so that a noisy neighbour hits every mode alike.
            for (i, (label, local, prefetch)) in MODES.iter().enumerate() {
                let config = VmRestoreConfig {
                    walk,
                    pages,
                    prefetch: *prefetch,
                    local: *local,
                    ..VmRestoreConfig::new(BACKING, size)
                };
                let r =
                    vm_restore::run(&config).with_context(|| format!("{walk} walk, {label}"))?;
                anyhow::ensure!(
                    r.matches,
                    "{walk} walk, {label}: the guest's checksum {:#x} differs from the \
                     original's {:#x}",
                    r.checksum,
                    r.expected
                );
                runs[i].push(r);
                bar.inc(1);
            }
        }
        let local = Summary::of(
            &runs[MODES.len() - 1]
                .iter()
                .map(|r| r.elapsed_s)
                .collect::<Vec<_>>(),
        );
        for ((label, _, _), rs) in MODES.iter().zip(&runs) {
            let guest = Summary::of(&rs.iter().map(|r| r.elapsed_s).collect::<Vec<_>>());
            let total = Summary::of(
                &rs.iter()
                    .map(|r| r.elapsed_s + r.pager_start_s)
                    .collect::<Vec<_>>(),
            );
            let last = rs.last().expect("repeats >= 1");
            table.row(vec![
                walk.to_string(),
                label.to_string(),
                guest.fmt(3),
                ratio(guest.median, local.median),
                total.fmt(3),
                last.faults.to_string(),
                last.fault_latency_us.p50.to_string(),
            ]);
            bars.push(Bar {
                label: format!("{walk}, {label}"),
                value: guest,
            });
            data.push(serde_json::json!({
                "walk": walk.to_string(),
                "memory": label,
                "guest_s": guest,
                "with_start_s": total,
                "runs": rs,
            }));
        }
    }
    bar.finish_and_clear();
    report.tables.push(table);
    report.plots.push(Plot::Bars {
        file: "vm-walk.png".into(),
        title: "Micro-VM walk: time to the guest's checksum".into(),
        y_label: "seconds".into(),
        bars,
    });
    if super::machine().kvm.as_deref() == Some("kvm_pvm") {
        report.notes.push(
            "KVM here is kvm_pvm (no VMX/SVM): guest code runs at roughly 1 µs per \
             instruction, so the walk itself is slow and each fault's cost is diluted by it; on \
             hardware virtualization the walk is far faster and the fault path dominates."
                .into(),
        );
    }
    report.notes.push(
        "\"incl. start\" adds the pager's start (connect, manifest, register) or, for local \
         memory, copying the whole memory file in: what a restore costs before the guest runs."
            .into(),
    );
    report.data = serde_json::json!({
        "backing": BACKING.as_str(),
        "size": size,
        "pages": pages,
        "results": data,
    });
    Ok(report)
}
