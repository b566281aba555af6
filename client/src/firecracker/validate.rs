//! Checking a well-formed handshake against the snapshot it is to be served from: every region
//! inside the snapshot's image, and aligned to the snapshot's page size as well as the memory's
//! (the pager installs a 4 KiB snapshot into 2 MiB memory a huge page at a time, and a 2 MiB
//! snapshot into 4 KiB memory 512 pages at a time: docs/pager.md). (What can be
//! checked without the snapshot is done by [`super::handshake::parse`].)

use faultline_proto::{Manifest, PageSize, SnapshotId};
use thiserror::Error;

use super::handshake::UffdRegion;
use crate::backing::BackingKind;

/// A region that fits the snapshot, with the backing kind its page size means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidRegion {
    /// As received.
    pub region: UffdRegion,
    /// Anonymous for 4 KiB pages, hugetlb for 2 MiB pages (Firecracker maps both anonymous,
    /// private).
    pub kind: BackingKind,
}

/// The handshake does not fit the snapshot.
#[derive(Debug, Error)]
pub enum ValidateError {
    /// The memory's page size is not the snapshot's, and the region is not aligned to the
    /// larger of the two.
    #[error(
        "region {region} has {page_size}-byte pages but snapshot {snapshot} has \
         {snapshot_page_size}-byte pages, and the region is not aligned to both; import \
         Firecracker's memory file with `--page-size {hint}` for this VM"
    )]
    PageSizeMismatch {
        /// Region index.
        region: usize,
        /// The region's page size.
        page_size: u64,
        /// The snapshot.
        snapshot: SnapshotId,
        /// The snapshot's page size.
        snapshot_page_size: u64,
        /// The `--page-size` that would fit.
        hint: &'static str,
    },
    /// A region reaches past the end of the snapshot's image.
    #[error(
        "region {region}: offset {offset:#x} + size {size:#x} is past the end of snapshot \
         {snapshot} ({image_size:#x} bytes); is this the snapshot of this VM's memory file?"
    )]
    OutsideSnapshot {
        /// Region index.
        region: usize,
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// The snapshot.
        snapshot: SnapshotId,
        /// The image's size.
        image_size: u64,
    },
}

/// Checks every region of a parsed handshake against `manifest`.
pub fn validate(
    regions: &[UffdRegion],
    manifest: &Manifest,
) -> Result<Vec<ValidRegion>, ValidateError> {
    let image_size = manifest.image_size();
    regions
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let unit = r.page_size.bytes().max(manifest.page_size.bytes());
            if r.page_size != manifest.page_size && (r.offset % unit != 0 || r.size % unit != 0) {
                return Err(ValidateError::PageSizeMismatch {
                    region: index,
                    page_size: r.page_size.bytes(),
                    snapshot: manifest.id.clone(),
                    snapshot_page_size: manifest.page_size.bytes(),
                    hint: match r.page_size {
                        PageSize::Size2M => "2M",
                        PageSize::Size4K => "4K",
                    },
                });
            }
            // `parse` checked that offset + size does not overflow.
            if r.offset + r.size > image_size {
                return Err(ValidateError::OutsideSnapshot {
                    region: index,
                    offset: r.offset,
                    size: r.size,
                    snapshot: manifest.id.clone(),
                    image_size,
                });
            }
            let kind = match r.page_size {
                PageSize::Size4K => BackingKind::Anonymous,
                PageSize::Size2M => BackingKind::Hugetlb,
            };
            Ok(ValidRegion { region: *r, kind })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firecracker::handshake::parse;

    fn manifest(page_size: PageSize, page_count: u64) -> Manifest {
        Manifest {
            format_version: faultline_proto::MANIFEST_FORMAT_VERSION,
            id: SnapshotId::new("s").expect("name"),
            page_size,
            page_count,
            regions: Vec::new(),
            zero_map: faultline_proto::PageBitmap::new(page_count),
            digest_algorithm: faultline_proto::model::DigestAlgorithm::Crc32c,
            digests: vec![0; page_count as usize],
            working_sets: Vec::new(),
        }
    }

    /// The real 4 KiB and 2 MiB handshakes fit 512 MiB snapshots of either page size, as
    /// anonymous and hugetlb memory; a region past the image's end, or not aligned to a
    /// larger snapshot page, is refused.
    #[test]
    fn fits_the_snapshot() {
        let h4 = parse(include_bytes!(
            "../../tests/fixtures/firecracker-1.16.1-handshake-4k.json"
        ))
        .expect("4k");
        let h2 = parse(include_bytes!(
            "../../tests/fixtures/firecracker-1.16.1-handshake-2m.json"
        ))
        .expect("2m");
        let m4 = manifest(PageSize::Size4K, 512 << 8);
        let m2 = manifest(PageSize::Size2M, 256);
        let ok = validate(&h4.regions, &m4).expect("4k fits");
        assert_eq!(ok[0].kind, BackingKind::Anonymous);
        let ok = validate(&h2.regions, &m2).expect("2m fits");
        assert_eq!(ok[0].kind, BackingKind::Hugetlb);
        let ok = validate(&h2.regions, &m4).expect("2M pages on a 4K snapshot");
        assert_eq!(ok[0].kind, BackingKind::Hugetlb);
        let ok = validate(&h4.regions, &m2).expect("4K pages on a 2M snapshot");
        assert_eq!(ok[0].kind, BackingKind::Anonymous);
        let mut odd = h4.regions.clone();
        odd[0].size -= 4096;
        let e = validate(&odd, &m2).expect_err("4K region not 2M aligned on a 2M snapshot");
        assert!(e.to_string().contains("--page-size 4K"), "{e}");
        let small = manifest(PageSize::Size4K, (512 << 8) - 1);
        let e = validate(&h4.regions, &small).expect_err("too small");
        assert!(matches!(e, ValidateError::OutsideSnapshot { .. }), "{e}");
    }
}
