//! Validated domain types.
//!
//! Everything that arrives over the wire goes through `TryFrom<pb::X>` here
//! before the rest of the code sees it; past this point a [`SnapshotId`] is a
//! safe file name and a [`PageRange`] is non-empty. Sending is infallible
//! (`From<domain> for pb::X`).

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::{MANIFEST_FORMAT_VERSION, PageBitmap, ProtocolError, pb};

/// Longest snapshot or working-set name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Checks the character rules shared by snapshot and working-set names: they
/// become file names, so no separators, no `..`, no leading dot.
fn validate_name(field: &'static str, name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() {
        return Err(ProtocolError::Missing(field));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ProtocolError::invalid(
            field,
            format!(
                "{} characters is longer than the limit of {MAX_NAME_LEN}",
                name.len()
            ),
        ));
    }
    if name.starts_with('.') {
        return Err(ProtocolError::invalid(
            field,
            format!("{name:?} starts with '.'"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ProtocolError::invalid(
            field,
            format!("{name:?} contains {c:?}; use only letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `name`.
            pub fn new(name: impl Into<String>) -> Result<Self, ProtocolError> {
                let name = name.into();
                validate_name($field, &name)?;
                Ok(Self(name))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A snapshot's name, which is its id: 1 to 128 characters from
    /// `[A-Za-z0-9._-]`, not starting with '.'.
    SnapshotId,
    "snapshot"
);

name_type!(
    /// The name of a recorded working set; same rules as [`SnapshotId`].
    WorkingSetName,
    "working_set"
);

impl WorkingSetName {
    /// The working set used when none is named.
    pub fn default_name() -> Self {
        Self("default".to_owned())
    }

    /// Parses an optional wire name: empty means [`Self::default_name`].
    pub fn from_wire(name: &str) -> Result<Self, ProtocolError> {
        if name.is_empty() {
            Ok(Self::default_name())
        } else {
            Self::new(name)
        }
    }
}

/// The index of a page in a snapshot's flat address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageIndex(pub u64);

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// A guest physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestAddress(pub u64);

impl fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A snapshot's page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB, the base page size of x86-64.
    Size4K,
    /// 2 MiB, for guests backed by hugetlbfs.
    Size2M,
}

impl PageSize {
    /// Bytes in one page.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 4096,
            Self::Size2M => 2 << 20,
        }
    }

    /// [`Self::bytes`] as a `usize`.
    pub const fn bytes_usize(self) -> usize {
        self.bytes() as usize
    }
}

impl TryFrom<u64> for PageSize {
    type Error = ProtocolError;
    fn try_from(v: u64) -> Result<Self, ProtocolError> {
        match v {
            4096 => Ok(Self::Size4K),
            0x20_0000 => Ok(Self::Size2M),
            _ => Err(ProtocolError::invalid(
                "page_size",
                format!("{v} is not a supported page size; use 4096 (4K) or 2097152 (2M)"),
            )),
        }
    }
}

impl FromStr for PageSize {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        match s.to_ascii_uppercase().as_str() {
            "4K" | "4KIB" | "4096" => Ok(Self::Size4K),
            "2M" | "2MIB" | "2097152" => Ok(Self::Size2M),
            _ => Err(ProtocolError::invalid(
                "page_size",
                format!("{s:?} is not a supported page size; use 4K or 2M"),
            )),
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Size4K => "4K",
            Self::Size2M => "2M",
        })
    }
}

/// A non-empty run of consecutive pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    start: PageIndex,
    count: u64,
}

impl PageRange {
    /// `count` pages from `start`; `None` if `count` is 0 or the end
    /// overflows.
    pub fn new(start: PageIndex, count: u64) -> Option<Self> {
        (count > 0 && start.0.checked_add(count).is_some()).then_some(Self { start, count })
    }

    /// First page.
    pub fn start(&self) -> PageIndex {
        self.start
    }

    /// Number of pages.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start.0 + self.count
    }

    /// The page indices, ascending.
    pub fn iter(&self) -> impl Iterator<Item = PageIndex> + use<> {
        (self.start.0..self.end()).map(PageIndex)
    }

    /// Checks that the range lies inside a snapshot of `page_count` pages.
    /// The error says where the snapshot ends.
    pub fn check_within(&self, page_count: u64) -> Result<(), OutOfRange> {
        if self.end() > page_count {
            Err(OutOfRange {
                range: *self,
                page_count,
            })
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pages {}..{}", self.start.0, self.end())
    }
}

/// A [`PageRange`] that reaches past the end of its snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{range} reach past the end of the snapshot, which has {page_count} pages")]
pub struct OutOfRange {
    /// The range asked for.
    pub range: PageRange,
    /// Pages in the snapshot.
    pub page_count: u64,
}

impl TryFrom<pb::PageRange> for PageRange {
    type Error = ProtocolError;
    fn try_from(r: pb::PageRange) -> Result<Self, ProtocolError> {
        if r.count == 0 {
            return Err(ProtocolError::invalid(
                "range.count",
                "a range must hold at least one page",
            ));
        }
        Self::new(PageIndex(r.start), r.count).ok_or_else(|| {
            ProtocolError::invalid(
                "range",
                format!("start {} + count {} overflows", r.start, r.count),
            )
        })
    }
}

impl From<PageRange> for pb::PageRange {
    fn from(r: PageRange) -> Self {
        Self {
            start: r.start.0,
            count: r.count,
        }
    }
}

/// One guest memory region of a snapshot: `size` bytes at guest physical
/// address `guest_address`, held at byte `offset` of the flat image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Region {
    /// A label ("mem", "below_4g" ...), for people.
    pub name: String,
    /// Where the guest sees it.
    pub guest_address: u64,
    /// Where it is in the snapshot image; page aligned.
    pub offset: u64,
    /// Bytes; a multiple of the page size.
    pub size: u64,
}

impl Region {
    /// The guest address as a typed value.
    pub fn guest(&self) -> GuestAddress {
        GuestAddress(self.guest_address)
    }
}

impl From<pb::Region> for Region {
    fn from(r: pb::Region) -> Self {
        Self {
            name: r.name,
            guest_address: r.guest_address,
            offset: r.offset,
            size: r.size,
        }
    }
}

impl From<Region> for pb::Region {
    fn from(r: Region) -> Self {
        Self {
            name: r.name,
            guest_address: r.guest_address,
            offset: r.offset,
            size: r.size,
        }
    }
}

/// Checks a region layout against an image of `image_size` bytes: every
/// region page aligned, inside the image, and not overlapping another.
pub fn validate_regions(
    regions: &[Region],
    page_size: PageSize,
    image_size: u64,
) -> Result<(), ProtocolError> {
    let ps = page_size.bytes();
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(regions.len());
    for r in regions {
        if r.size == 0 || r.size % ps != 0 || r.offset % ps != 0 || r.guest_address % ps != 0 {
            return Err(ProtocolError::invalid(
                "regions",
                format!(
                    "region {:?} (offset {:#x}, size {:#x}, guest address {:#x}) must be non-empty \
                     and aligned to the page size {page_size}",
                    r.name, r.offset, r.size, r.guest_address
                ),
            ));
        }
        let end = r
            .offset
            .checked_add(r.size)
            .filter(|&e| e <= image_size)
            .ok_or_else(|| {
                ProtocolError::invalid(
                    "regions",
                    format!(
                        "region {:?} ends past the image, which has {image_size} bytes",
                        r.name
                    ),
                )
            })?;
        spans.push((r.offset, end, &r.name));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(ProtocolError::invalid(
                "regions",
                format!("regions {:?} and {:?} overlap in the image", w[0].2, w[1].2),
            ));
        }
    }
    Ok(())
}

/// How each page's digest is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    /// CRC32C (Castagnoli) of the whole page.
    Crc32c,
}

impl DigestAlgorithm {
    /// The digest of one page.
    pub fn digest(self, page: &[u8]) -> u32 {
        match self {
            Self::Crc32c => crc32c::crc32c(page),
        }
    }
}

/// Everything a client needs to restore a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Format version of the manifest.
    pub format_version: u32,
    /// The snapshot.
    pub id: SnapshotId,
    /// Page size of the snapshot.
    pub page_size: PageSize,
    /// Pages in the flat image.
    pub page_count: u64,
    /// Guest memory layout.
    pub regions: Vec<Region>,
    /// Bit set: the page is all zeros and never travels.
    pub zero_map: PageBitmap,
    /// How digests are computed.
    pub digest_algorithm: DigestAlgorithm,
    /// One digest per page.
    pub digests: Vec<u32>,
    /// Names of recorded working sets.
    pub working_sets: Vec<WorkingSetName>,
}

impl Manifest {
    /// Bytes in the image.
    pub fn image_size(&self) -> u64 {
        self.page_count * self.page_size.bytes()
    }

    /// Whether `page` is known to be all zeros.
    pub fn is_zero(&self, page: PageIndex) -> bool {
        self.zero_map.get(page.0)
    }

    /// Checks `data` (exactly one page) against the digest of `page`.
    pub fn verify(&self, page: PageIndex, data: &[u8]) -> bool {
        data.len() == self.page_size.bytes_usize()
            && self.digest_algorithm.digest(data) == self.digests[page.0 as usize]
    }
}

impl TryFrom<pb::Manifest> for Manifest {
    type Error = ProtocolError;
    fn try_from(m: pb::Manifest) -> Result<Self, ProtocolError> {
        if m.format_version != MANIFEST_FORMAT_VERSION {
            return Err(ProtocolError::invalid(
                "format_version",
                format!(
                    "version {} is not understood by this client, which reads version \
                     {MANIFEST_FORMAT_VERSION}; upgrade the client",
                    m.format_version
                ),
            ));
        }
        let id = SnapshotId::new(m.name)?;
        let page_size = PageSize::try_from(m.page_size)?;
        let image_size = m.page_count.checked_mul(page_size.bytes()).ok_or_else(|| {
            ProtocolError::invalid("page_count", format!("{} pages overflow", m.page_count))
        })?;
        let regions: Vec<Region> = m.regions.into_iter().map(Region::from).collect();
        validate_regions(&regions, page_size, image_size)?;
        let zero_map = PageBitmap::from_bytes("zero_map", &m.zero_map, m.page_count)?;
        let digest_algorithm = match pb::DigestAlgorithm::try_from(m.digest_algorithm) {
            Ok(pb::DigestAlgorithm::Crc32c) => DigestAlgorithm::Crc32c,
            _ => {
                return Err(ProtocolError::invalid(
                    "digest_algorithm",
                    format!("{} is not a known digest algorithm", m.digest_algorithm),
                ));
            }
        };
        if m.digests.len() as u64 != m.page_count * 4 {
            return Err(ProtocolError::invalid(
                "digests",
                format!(
                    "{} pages need {} bytes of digests, got {}",
                    m.page_count,
                    m.page_count * 4,
                    m.digests.len()
                ),
            ));
        }
        let digests = m
            .digests
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let working_sets = m
            .working_sets
            .into_iter()
            .map(WorkingSetName::new)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            format_version: m.format_version,
            id,
            page_size,
            page_count: m.page_count,
            regions,
            zero_map,
            digest_algorithm,
            digests,
            working_sets,
        })
    }
}

impl From<&Manifest> for pb::Manifest {
    fn from(m: &Manifest) -> Self {
        let mut digests = Vec::with_capacity(m.digests.len() * 4);
        for d in &m.digests {
            digests.extend_from_slice(&d.to_le_bytes());
        }
        Self {
            format_version: m.format_version,
            name: m.id.to_string(),
            page_size: m.page_size.bytes(),
            page_count: m.page_count,
            regions: m.regions.iter().cloned().map(Into::into).collect(),
            zero_map: Bytes::from(m.zero_map.to_bytes()),
            digest_algorithm: match m.digest_algorithm {
                DigestAlgorithm::Crc32c => pb::DigestAlgorithm::Crc32c as i32,
            },
            digests: Bytes::from(digests),
            working_sets: m.working_sets.iter().map(ToString::to_string).collect(),
        }
    }
}

/// What a name in the store is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// Immutable: standalone, or a diff over a parent snapshot.
    Snapshot,
    /// Writable memory.
    Volume,
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Snapshot => "snapshot",
            Self::Volume => "volume",
        })
    }
}

impl From<LayerKind> for pb::LayerKind {
    fn from(k: LayerKind) -> Self {
        match k {
            LayerKind::Snapshot => Self::Snapshot,
            LayerKind::Volume => Self::Volume,
        }
    }
}

impl From<pb::LayerKind> for LayerKind {
    fn from(k: pb::LayerKind) -> Self {
        match k {
            pb::LayerKind::Snapshot => Self::Snapshot,
            pb::LayerKind::Volume => Self::Volume,
        }
    }
}

/// Layers in a chain, the layer itself included: 1 for a standalone
/// snapshot or an empty volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ChainDepth(pub u32);

impl fmt::Display for ChainDepth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a new volume starts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource {
    /// A copy-on-write child of a snapshot.
    Snapshot(SnapshotId),
    /// Every page zero.
    Empty {
        /// Its page size.
        page_size: PageSize,
        /// Bytes; a positive multiple of the page size.
        size: u64,
    },
}

/// A validated `CreateVolumeRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateVolume {
    /// The new volume.
    pub name: SnapshotId,
    /// What it starts as.
    pub source: VolumeSource,
}

/// Checks that `size` is a positive multiple of `page_size`.
pub fn check_image_size(size: u64, page_size: PageSize) -> Result<(), ProtocolError> {
    if size == 0 || !size.is_multiple_of(page_size.bytes()) {
        return Err(ProtocolError::invalid(
            "size",
            format!(
                "{size} bytes is not a positive multiple of the page size {page_size} ({} bytes)",
                page_size.bytes()
            ),
        ));
    }
    Ok(())
}

impl TryFrom<pb::CreateVolumeRequest> for CreateVolume {
    type Error = ProtocolError;
    fn try_from(r: pb::CreateVolumeRequest) -> Result<Self, ProtocolError> {
        let name = SnapshotId::new(r.name)?;
        let source = match r.source {
            None => return Err(ProtocolError::Missing("source")),
            Some(pb::create_volume_request::Source::FromSnapshot(s)) => {
                VolumeSource::Snapshot(SnapshotId::new(s)?)
            }
            Some(pb::create_volume_request::Source::Empty(e)) => {
                let page_size = PageSize::try_from(e.page_size)?;
                check_image_size(e.size, page_size)?;
                VolumeSource::Empty {
                    page_size,
                    size: e.size,
                }
            }
        };
        Ok(Self { name, source })
    }
}

impl From<CreateVolume> for pb::CreateVolumeRequest {
    fn from(c: CreateVolume) -> Self {
        Self {
            name: c.name.to_string(),
            source: Some(match c.source {
                VolumeSource::Snapshot(s) => {
                    pb::create_volume_request::Source::FromSnapshot(s.to_string())
                }
                VolumeSource::Empty { page_size, size } => {
                    pb::create_volume_request::Source::Empty(pb::EmptyVolume {
                        page_size: page_size.bytes(),
                        size,
                    })
                }
            }),
        }
    }
}

/// A validated `SealVolumeRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealVolume {
    /// The volume to seal.
    pub volume: SnapshotId,
    /// The snapshot it becomes.
    pub snapshot: SnapshotId,
}

impl TryFrom<pb::SealVolumeRequest> for SealVolume {
    type Error = ProtocolError;
    fn try_from(r: pb::SealVolumeRequest) -> Result<Self, ProtocolError> {
        let volume = SnapshotId::new(r.volume).map_err(|e| rename(e, "volume"))?;
        let snapshot = SnapshotId::new(r.snapshot)?;
        Ok(Self { volume, snapshot })
    }
}

impl From<SealVolume> for pb::SealVolumeRequest {
    fn from(s: SealVolume) -> Self {
        Self {
            volume: s.volume.to_string(),
            snapshot: s.snapshot.to_string(),
        }
    }
}

/// Names the right field in an error of a name validated as a snapshot.
fn rename(e: ProtocolError, field: &'static str) -> ProtocolError {
    match e {
        ProtocolError::Missing(_) => ProtocolError::Missing(field),
        ProtocolError::Invalid { reason, .. } => ProtocolError::Invalid { field, reason },
    }
}

/// The id a client gives a request on a stream (`Fault`, `WritePages`),
/// echoed in the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}", self.0)
    }
}

/// A validated `WriteRun`: pages of a volume and their bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRun {
    /// The client's id, echoed in the ack.
    pub id: RequestId,
    /// The pages, decompressed and checked against the volume.
    pub run: crate::codec::PageRun,
}

impl WriteRun {
    /// Validates a run for a volume of `page_count` pages of `page_size`.
    pub fn decode(
        r: pb::WriteRun,
        page_size: PageSize,
        page_count: u64,
    ) -> Result<Self, ProtocolError> {
        let pages = r.pages.ok_or(ProtocolError::Missing("pages"))?;
        Ok(Self {
            id: RequestId(r.request_id),
            run: crate::codec::PageRun::decode(pages, page_size, page_count)?,
        })
    }
}

/// Builds the wire form of a write of `data` (whole pages from `start`),
/// compressed with `codec` where that shrinks it.
pub fn write_run(
    id: RequestId,
    start: PageIndex,
    count: u64,
    data: Bytes,
    codec: crate::Compression,
) -> pb::WriteRun {
    pb::WriteRun {
        request_id: id.0,
        pages: Some(crate::codec::encode_run(start, count, data, codec)),
    }
}

/// A validated `WritePagesResponse`, as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteAnswer {
    /// The pages of `id` are durable.
    Ack {
        /// The request.
        id: RequestId,
        /// Its pages.
        range: PageRange,
    },
    /// Nothing of request `id` was written.
    Error {
        /// The request.
        id: RequestId,
        /// A google.rpc.Code value.
        code: i32,
        /// Why.
        message: String,
    },
}

impl TryFrom<pb::WritePagesResponse> for WriteAnswer {
    type Error = ProtocolError;
    fn try_from(r: pb::WritePagesResponse) -> Result<Self, ProtocolError> {
        let id = RequestId(r.request_id);
        match r.result {
            Some(pb::write_pages_response::Result::Ack(a)) => Ok(Self::Ack {
                id,
                range: PageRange::try_from(a.range.ok_or(ProtocolError::Missing("ack.range"))?)?,
            }),
            Some(pb::write_pages_response::Result::Error(e)) => Ok(Self::Error {
                id,
                code: e.code,
                message: e.message,
            }),
            None => Err(ProtocolError::Missing("result")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names that could escape the store directory are refused.
    #[test]
    fn names_are_validated() {
        for bad in [
            "",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(SnapshotId::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vm-1", "ubuntu_24.04", "A", &"x".repeat(128)] {
            assert!(SnapshotId::new(good).is_ok(), "{good:?} refused");
        }
    }

    /// Empty and overflowing ranges are refused at the edge.
    #[test]
    fn ranges_are_validated() {
        assert!(PageRange::try_from(pb::PageRange { start: 0, count: 0 }).is_err());
        assert!(
            PageRange::try_from(pb::PageRange {
                start: u64::MAX,
                count: 2
            })
            .is_err()
        );
        let r = PageRange::try_from(pb::PageRange { start: 5, count: 3 }).unwrap();
        assert_eq!(r.end(), 8);
        assert!(r.check_within(8).is_ok());
        assert!(r.check_within(7).is_err());
    }

    /// Overlapping, unaligned or oversized region layouts are refused.
    #[test]
    fn regions_are_validated() {
        let r = |offset, size| Region {
            name: "r".into(),
            guest_address: 0,
            offset,
            size,
        };
        let ps = PageSize::Size4K;
        assert!(validate_regions(&[r(0, 8192), r(8192, 4096)], ps, 12288).is_ok());
        assert!(validate_regions(&[r(0, 8192), r(4096, 4096)], ps, 12288).is_err());
        assert!(validate_regions(&[r(0, 100)], ps, 12288).is_err());
        assert!(validate_regions(&[r(0, 16384)], ps, 12288).is_err());
    }

    /// Volume requests are validated: a size that is not whole pages, a bad
    /// name or no source is refused; a valid one survives the wire.
    #[test]
    fn volume_requests_are_validated() {
        let ok = CreateVolume {
            name: SnapshotId::new("v").unwrap(),
            source: VolumeSource::Empty {
                page_size: PageSize::Size4K,
                size: 8192,
            },
        };
        assert_eq!(
            CreateVolume::try_from(pb::CreateVolumeRequest::from(ok.clone())).unwrap(),
            ok
        );
        let mut bad = pb::CreateVolumeRequest::from(ok);
        bad.source = Some(pb::create_volume_request::Source::Empty(pb::EmptyVolume {
            page_size: 4096,
            size: 100,
        }));
        assert!(CreateVolume::try_from(bad.clone()).is_err());
        bad.source = None;
        assert!(CreateVolume::try_from(bad).is_err());
        let seal = pb::SealVolumeRequest {
            volume: "a/b".into(),
            snapshot: "s".into(),
        };
        assert!(matches!(
            SealVolume::try_from(seal),
            Err(ProtocolError::Invalid {
                field: "volume",
                ..
            })
        ));
    }

    /// A write run must hold exactly its pages' bytes inside the volume.
    #[test]
    fn write_runs_are_validated() {
        let ps = PageSize::Size4K;
        let run = |start, count, len: usize| {
            write_run(
                RequestId(7),
                PageIndex(start),
                count,
                Bytes::from(vec![1u8; len]),
                crate::Compression::None,
            )
        };
        let w = WriteRun::decode(run(1, 2, 8192), ps, 4).unwrap();
        assert_eq!((w.id, w.run.range.end()), (RequestId(7), 3));
        assert!(WriteRun::decode(run(3, 2, 8192), ps, 4).is_err());
        assert!(WriteRun::decode(run(0, 2, 4096), ps, 4).is_err());
        assert!(WriteRun::decode(run(0, 5000, 5000 * 4096), ps, 1 << 20).is_err());
    }

    /// A manifest survives the wire, and a truncated digest list is refused.
    #[test]
    fn manifest_round_trip() {
        let mut zero_map = PageBitmap::new(3);
        zero_map.set(1);
        let m = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            id: SnapshotId::new("s").unwrap(),
            page_size: PageSize::Size4K,
            page_count: 3,
            regions: vec![Region {
                name: "mem".into(),
                guest_address: 0,
                offset: 0,
                size: 3 * 4096,
            }],
            zero_map,
            digest_algorithm: DigestAlgorithm::Crc32c,
            digests: vec![1, 2, 3],
            working_sets: vec![WorkingSetName::default_name()],
        };
        let wire = pb::Manifest::from(&m);
        assert_eq!(Manifest::try_from(wire.clone()).unwrap(), m);
        let mut bad = wire;
        bad.digests.truncate(8);
        assert!(Manifest::try_from(bad).is_err());
    }
}
