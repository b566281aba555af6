//! Recording a working set: the first-touch order of faults, uploaded to the
//! server (on completion, or on [`super::Pager::record_working_set`]) so that
//! later restores prefetch those pages first.

use faultline_proto::{PageRange, pb};

use super::Shared;
use crate::remote::{Remote, RemoteError};

impl Shared {
    /// Appends `range` to the first-touch order, if recording.
    pub(super) fn record(&self, range: PageRange) {
        if self.config.record {
            self.recorded.lock().expect("record lock").push(range);
        }
    }
}

/// Uploads the recorded first-touch order.
pub(super) async fn upload(shared: &Shared) -> Result<u64, RemoteError> {
    let ranges: Vec<pb::PageRange> = {
        let rec = shared.recorded.lock().expect("record lock");
        rec.iter().map(|&r| r.into()).collect()
    };
    let remote = Remote::connect_with(&shared.config.servers[0], &shared.config.connect).await?;
    let resp = remote
        .client()
        .record_working_set(pb::RecordWorkingSetRequest {
            snapshot: shared.config.snapshot.to_string(),
            name: shared.config.working_set.to_string(),
            ranges: dedup(ranges),
        })
        .await
        .map_err(RemoteError::rpc("RecordWorkingSet"))?;
    Ok(resp.into_inner().pages)
}

/// Drops pages already listed (a joined fault repeats a page of an earlier
/// window), keeping first positions, and merges consecutive pages.
fn dedup(ranges: Vec<pb::PageRange>) -> Vec<pb::PageRange> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<pb::PageRange> = Vec::new();
    for r in ranges {
        for p in r.start..r.start + r.count {
            if !seen.insert(p) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.start + last.count == p => last.count += 1,
                _ => out.push(pb::PageRange { start: p, count: 1 }),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repeated pages keep their first position and consecutive pages merge.
    #[test]
    fn dedup_keeps_first_touch_order() {
        let r = |start, count| pb::PageRange { start, count };
        let out = dedup(vec![r(10, 4), r(12, 4), r(3, 1), r(4, 1), r(10, 1)]);
        assert_eq!(out, vec![r(10, 6), r(3, 2)]);
    }
}
