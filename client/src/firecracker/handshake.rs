//! Firecracker's UFFD handshake message: the JSON array of [`GuestRegionUffdMapping`] it sends,
//! decoded into [`UffdRegion`]s by a pure function ([`parse`]: bytes in, regions or an error
//! out), which the socket side ([`super::receive()`]) and fuzz targets call.
//!
//! What Firecracker really sends (`GuestRegionUffdMapping` and `send_uffd_handshake` in its
//! `src/vmm/src/persist.rs`; the bytes v1.16.1 sent are in `client/tests/fixtures/`):
//!
//! ```json
//! [{"base_host_virt_addr":140235916705792,"size":536870912,"offset":0,"page_size":4096,"page_size_kib":4096}]
//! ```
//!
//! - `page_size` (v1.12 and later) holds the page size **in bytes**, and so does the deprecated
//!   `page_size_kib`, whose name is wrong: Firecracker keeps it, with bytes in it, for
//!   compatibility until 2.0. v1.7 to v1.11 sent only `page_size_kib` (bytes too). Releases before
//!   v1.7 sent neither, and had no huge pages: no field means 4 KiB.
//! - `offset` is the region's offset in the snapshot's memory file; Firecracker lays regions out
//!   back to back.
//! - Feature branches add fields (`gpa_start`, `is_guest_memfd` on `feature/secret-hiding`):
//!   fields this parser does not know are listed in [`Handshake::ignored`], not refused.

use std::collections::BTreeSet;

use faultline_proto::PageSize;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Largest handshake accepted, in bytes. Firecracker sends about 110 bytes per memory region
/// and has a handful of regions; this bounds the buffer a peer can make the handler hold.
pub const MAX_HANDSHAKE_BYTES: usize = 64 << 10;

/// The fields of [`GuestRegionUffdMapping`]; any other field is ignored.
const KNOWN_FIELDS: [&str; 5] = [
    "base_host_virt_addr",
    "size",
    "offset",
    "page_size",
    "page_size_kib",
];

/// One guest memory region as Firecracker describes it on the wire (`GuestRegionUffdMapping` in
/// Firecracker's `persist.rs`). Both page size fields hold **bytes**.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct GuestRegionUffdMapping {
    /// Start of the region in the peer's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: usize,
    /// Offset of the region in the snapshot's memory file (and so in the faultline image).
    pub offset: u64,
    /// Page size in bytes (Firecracker 1.12 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    /// Page size, **in bytes** despite its name (deprecated; Firecracker 1.7 to 1.11 send only
    /// this one, 1.12 and later send it beside `page_size`, equal to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<usize>,
}

impl GuestRegionUffdMapping {
    /// The page size in bytes: `page_size`, `page_size_kib` (also bytes), both (which must
    /// agree), or neither (Firecracker before 1.7: 4 KiB). `region` is the region's index, for
    /// the error.
    pub fn page_size_bytes(&self, region: usize) -> Result<usize, ParseError> {
        match (self.page_size, self.page_size_kib) {
            (Some(bytes), Some(kib)) if bytes != kib => Err(ParseError::PageSizeDisagree {
                region,
                page_size: bytes,
                page_size_kib: kib,
            }),
            (Some(bytes), _) | (None, Some(bytes)) => Ok(bytes),
            (None, None) => Ok(PageSize::Size4K.bytes_usize()),
        }
    }
}

/// An address in the peer's (Firecracker's) address space. This process never dereferences it:
/// pages reach it only through the peer's uffd, whose ioctls act on the registering process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerAddr(pub u64);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A region of a well-formed handshake: page size known, everything aligned to it, non-empty,
/// no arithmetic overflow, no overlap with another region of the same handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdRegion {
    /// Where the region starts in the peer's address space.
    pub peer_addr: PeerAddr,
    /// Length in bytes (a non-zero multiple of `page_size`).
    pub size: u64,
    /// Offset in the snapshot's image (a multiple of `page_size`).
    pub offset: u64,
    /// The memory's page size: 4 KiB (anonymous) or 2 MiB (anonymous hugetlb).
    pub page_size: PageSize,
}

impl UffdRegion {
    /// Whether `addr` (in the peer's address space) is inside this region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.peer_addr.0 && addr - self.peer_addr.0 < self.size
    }
}

/// A field the parser does not know, ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredField {
    /// Index of the region that carried it.
    pub region: usize,
    /// The field's name.
    pub name: String,
}

/// A decoded handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The regions, in the order sent.
    pub regions: Vec<UffdRegion>,
    /// Fields that were ignored (Firecracker feature branches add some); worth a debug log.
    pub ignored: Vec<IgnoredField>,
    /// Bytes of the input the message took; anything after it is not part of the handshake.
    pub consumed: usize,
}

/// The handshake message is malformed. Each message names the region and the field at fault.
#[derive(Debug, Error)]
pub enum ParseError {
    /// The input ends inside the message (only [`parse`] reports this; [`parse_prefix`] waits
    /// for more).
    #[error(
        "the memory regions end after {received} bytes, before the JSON array is complete; send the whole \
         array"
    )]
    Incomplete {
        /// Bytes received.
        received: usize,
    },
    /// The bytes are not JSON.
    #[error(
        "the memory regions are not valid JSON ({0}); send a JSON array of GuestRegionUffdMapping \
         objects"
    )]
    Json(#[source] serde_json::Error),
    /// The JSON value is not an array.
    #[error(
        "the memory regions must be a JSON array of GuestRegionUffdMapping objects, not {found}"
    )]
    NotAnArray {
        /// What it is instead ("an object", "a number" ...).
        found: &'static str,
    },
    /// The array is empty.
    #[error("the handshake lists no memory regions; send at least one")]
    NoRegions,
    /// An element of the array is not an object.
    #[error("region {region} is {found}, not a GuestRegionUffdMapping object")]
    NotAnObject {
        /// Region index.
        region: usize,
        /// What it is instead.
        found: &'static str,
    },
    /// A required field is missing or has the wrong type.
    #[error(
        "region {region}: {source}; a region needs base_host_virt_addr, size and offset \
         (unsigned integers) and page_size and/or page_size_kib (bytes)"
    )]
    Field {
        /// Region index.
        region: usize,
        /// serde's account of the field.
        source: serde_json::Error,
    },
    /// `page_size` and `page_size_kib` disagree.
    #[error(
        "region {region}: page_size {page_size} and page_size_kib {page_size_kib} disagree; both \
         hold the page size in bytes (page_size_kib's name is wrong; Firecracker sends bytes in \
         it): send one of them, or both equal"
    )]
    PageSizeDisagree {
        /// Region index.
        region: usize,
        /// `page_size`, bytes.
        page_size: usize,
        /// `page_size_kib`, bytes as well.
        page_size_kib: usize,
    },
    /// The page size is neither 4 KiB nor 2 MiB.
    #[error(
        "region {region} has {page_size}-byte pages; only 4096 (anonymous memory) and 2097152 \
         (hugetlbfs) are served, given in bytes{hint}"
    )]
    UnsupportedPageSize {
        /// Region index.
        region: usize,
        /// As sent.
        page_size: usize,
        /// A hint when the value looks like KiB.
        hint: &'static str,
    },
    /// The size is zero.
    #[error("region {region} has size 0; every region must hold at least one page")]
    Empty {
        /// Region index.
        region: usize,
    },
    /// An address, size or offset is not a multiple of the page size.
    #[error(
        "region {region}: {what} {value:#x} is not a multiple of the {page_size}-byte page size"
    )]
    Unaligned {
        /// Region index.
        region: usize,
        /// `base_host_virt_addr`, `size` or `offset`.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The page size.
        page_size: u64,
    },
    /// Start plus size does not fit in 64 bits.
    #[error("region {region}: {what} {start:#x} + size {size:#x} overflows 64 bits")]
    Overflow {
        /// Region index.
        region: usize,
        /// `base_host_virt_addr` or `offset`.
        what: &'static str,
        /// Its value.
        start: u64,
        /// The size.
        size: u64,
    },
    /// Two regions overlap, in the snapshot or in the address space.
    #[error("regions {first} and {second} overlap {space}; each byte must belong to one region")]
    Overlap {
        /// One region.
        first: usize,
        /// The other.
        second: usize,
        /// "in the snapshot" or "in the peer's address space".
        space: &'static str,
    },
}

/// Decodes one complete handshake message. Bytes after the JSON array are not looked at
/// ([`Handshake::consumed`] says where the message ends); an input that ends inside the array is
/// [`ParseError::Incomplete`]. Pure: no I/O, no logging, bounded work for bounded input.
pub fn parse(bytes: &[u8]) -> Result<Handshake, ParseError> {
    parse_prefix(bytes)?.ok_or(ParseError::Incomplete {
        received: bytes.len(),
    })
}

/// Like [`parse`] for a message still arriving: `Ok(None)` while `bytes` are a proper prefix of
/// a JSON value (read more and call again), the handshake once the array is complete.
pub fn parse_prefix(bytes: &[u8]) -> Result<Option<Handshake>, ParseError> {
    let mut values = serde_json::Deserializer::from_slice(bytes).into_iter::<Value>();
    match values.next() {
        None => Ok(None),
        Some(Err(e)) if e.is_eof() => Ok(None),
        Some(Err(e)) => Err(ParseError::Json(e)),
        Some(Ok(value)) => decode(value, values.byte_offset()).map(Some),
    }
}

/// What kind of JSON value `v` is, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The regions of a complete JSON value.
fn decode(value: Value, consumed: usize) -> Result<Handshake, ParseError> {
    let items = match value {
        Value::Array(items) => items,
        other => {
            return Err(ParseError::NotAnArray {
                found: kind(&other),
            });
        }
    };
    if items.is_empty() {
        return Err(ParseError::NoRegions);
    }
    let mut regions: Vec<UffdRegion> = Vec::with_capacity(items.len());
    let mut ignored = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let Value::Object(fields) = item else {
            return Err(ParseError::NotAnObject {
                region: index,
                found: kind(&item),
            });
        };
        let unknown: BTreeSet<&String> = fields
            .keys()
            .filter(|k| !KNOWN_FIELDS.contains(&k.as_str()))
            .collect();
        ignored.extend(unknown.into_iter().map(|name| IgnoredField {
            region: index,
            name: name.clone(),
        }));
        let mapping: GuestRegionUffdMapping = serde_json::from_value(Value::Object(fields))
            .map_err(|source| ParseError::Field {
                region: index,
                source,
            })?;
        let region = region_of(index, &mapping)?;
        for (other, o) in regions.iter().enumerate() {
            let overlaps = |a: u64, b: u64| a < b + o.size && b < a + region.size;
            if overlaps(region.offset, o.offset) {
                return Err(ParseError::Overlap {
                    first: other,
                    second: index,
                    space: "in the snapshot",
                });
            }
            if overlaps(region.peer_addr.0, o.peer_addr.0) {
                return Err(ParseError::Overlap {
                    first: other,
                    second: index,
                    space: "in the peer's address space",
                });
            }
        }
        regions.push(region);
    }
    Ok(Handshake {
        regions,
        ignored,
        consumed,
    })
}

/// Checks one mapping on its own: page size, size, alignment, overflow.
fn region_of(index: usize, m: &GuestRegionUffdMapping) -> Result<UffdRegion, ParseError> {
    let bytes = m.page_size_bytes(index)?;
    let page_size = match PageSize::try_from(bytes as u64) {
        Ok(ps) => ps,
        Err(_) => {
            return Err(ParseError::UnsupportedPageSize {
                region: index,
                page_size: bytes,
                hint: if bytes == 4 || bytes == 2048 {
                    " (this looks like KiB: every Firecracker release sends bytes in both fields)"
                } else {
                    ""
                },
            });
        }
    };
    let ps = page_size.bytes();
    let size = m.size as u64;
    if size == 0 {
        return Err(ParseError::Empty { region: index });
    }
    for (what, value) in [
        ("base_host_virt_addr", m.base_host_virt_addr),
        ("size", size),
        ("offset", m.offset),
    ] {
        if !value.is_multiple_of(ps) {
            return Err(ParseError::Unaligned {
                region: index,
                what,
                value,
                page_size: ps,
            });
        }
    }
    for (what, start) in [
        ("base_host_virt_addr", m.base_host_virt_addr),
        ("offset", m.offset),
    ] {
        if start.checked_add(size).is_none() {
            return Err(ParseError::Overflow {
                region: index,
                what,
                start,
                size,
            });
        }
    }
    Ok(UffdRegion {
        peer_addr: PeerAddr(m.base_host_virt_addr),
        size,
        offset: m.offset,
        page_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes a real Firecracker v1.16.1 sent for a 512 MiB guest with 4 KiB pages.
    const FIXTURE_4K: &[u8] =
        include_bytes!("../../tests/fixtures/firecracker-1.16.1-handshake-4k.json");
    /// The same with `"huge_pages": "2M"`.
    const FIXTURE_2M: &[u8] =
        include_bytes!("../../tests/fixtures/firecracker-1.16.1-handshake-2m.json");

    fn one(json: &str) -> Result<UffdRegion, ParseError> {
        parse(json.as_bytes()).map(|h| h.regions[0])
    }

    /// Firecracker v1.16.1's own handshakes (both fields in bytes) parse, 4 KiB and 2 MiB.
    #[test]
    fn real_firecracker_handshakes() {
        let h = parse(FIXTURE_4K).expect("the 4 KiB fixture");
        assert_eq!(h.consumed, FIXTURE_4K.len());
        assert!(h.ignored.is_empty());
        assert_eq!(
            h.regions,
            vec![UffdRegion {
                peer_addr: PeerAddr(140_235_916_705_792),
                size: 512 << 20,
                offset: 0,
                page_size: PageSize::Size4K,
            }]
        );
        let h = parse(FIXTURE_2M).expect("the 2 MiB fixture");
        assert_eq!(h.regions[0].page_size, PageSize::Size2M);
        assert_eq!(h.regions[0].size, 512 << 20);
    }

    /// Either page size field alone (bytes), both agreeing, or neither (4 KiB) is accepted;
    /// disagreeing fields and KiB values are refused with a message saying that both hold bytes.
    #[test]
    fn page_size_fields() {
        let r = |fields: &str| {
            one(&format!(
                r#"[{{"base_host_virt_addr":2097152,"size":2097152,"offset":0{fields}}}]"#
            ))
        };
        assert_eq!(
            r(r#","page_size":4096"#).expect("new").page_size,
            PageSize::Size4K
        );
        assert_eq!(
            r(r#","page_size_kib":2097152"#)
                .expect("1.7-1.11")
                .page_size,
            PageSize::Size2M
        );
        assert_eq!(
            r(r#","page_size":2097152,"page_size_kib":2097152"#)
                .expect("both")
                .page_size,
            PageSize::Size2M
        );
        assert_eq!(r("").expect("before 1.7").page_size, PageSize::Size4K);
        let e = r(r#","page_size":4096,"page_size_kib":2097152"#).expect_err("disagree");
        assert!(matches!(e, ParseError::PageSizeDisagree { .. }), "{e}");
        let e = r(r#","page_size":4096,"page_size_kib":4"#).expect_err("KiB");
        assert!(e.to_string().contains("bytes"), "{e}");
        let e = r(r#","page_size_kib":4"#).expect_err("KiB alone");
        assert!(e.to_string().contains("looks like KiB"), "{e}");
        let e = r(r#","page_size":16384"#).expect_err("16 KiB");
        assert!(matches!(e, ParseError::UnsupportedPageSize { .. }), "{e}");
    }

    /// Unknown fields (Firecracker's feature branches) are reported as ignored, not refused.
    #[test]
    fn unknown_fields_are_ignored() {
        let json = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"gpa_start":0,
            "page_size":4096,"is_guest_memfd":false,"page_size_kib":4096}]"#;
        let h = parse(json).expect("parses");
        let names: Vec<&str> = h.ignored.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["gpa_start", "is_guest_memfd"]);
        assert_eq!(h.regions[0].size, 4096);
    }

    /// Every proper prefix of a real handshake is "incomplete", the whole is complete, and
    /// bytes after the array are left alone.
    #[test]
    fn prefixes_and_trailing_data() {
        for cut in 0..FIXTURE_4K.len() {
            assert!(
                parse_prefix(&FIXTURE_4K[..cut])
                    .expect("a prefix is no error")
                    .is_none(),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            parse(&FIXTURE_4K[..50]),
            Err(ParseError::Incomplete { received: 50 })
        ));
        let mut more = FIXTURE_4K.to_vec();
        more.extend_from_slice(b"\n{\"later\":1}");
        let h = parse(&more).expect("trailing data is not the handshake's");
        assert_eq!(h.consumed, FIXTURE_4K.len());
    }

    /// Malformed messages are refused with the region and field named.
    #[test]
    fn malformed_messages() {
        let cases: [(&str, &str); 10] = [
            ("{}", "not an object"),
            ("[]", "no memory regions"),
            ("[1]", "region 0 is a number"),
            ("nope", "not valid JSON"),
            (r#"[{"size":4096,"offset":0}]"#, "base_host_virt_addr"),
            (
                r#"[{"base_host_virt_addr":-1,"size":4096,"offset":0}]"#,
                "region 0",
            ),
            (
                r#"[{"base_host_virt_addr":4096,"size":0,"offset":0}]"#,
                "size 0",
            ),
            (
                r#"[{"base_host_virt_addr":4097,"size":4096,"offset":0}]"#,
                "base_host_virt_addr 0x1001 is not a multiple",
            ),
            (
                r#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0}]"#,
                "overflows",
            ),
            (
                r#"[{"base_host_virt_addr":0,"size":8192,"offset":0},
                    {"base_host_virt_addr":65536,"size":4096,"offset":4096}]"#,
                "overlap in the snapshot",
            ),
        ];
        for (json, expect) in cases {
            let e = parse(json.as_bytes()).expect_err(json);
            let msg = e.to_string();
            assert!(msg.contains(expect), "{json}: {msg}");
        }
        let e = parse(
            br#"[{"base_host_virt_addr":0,"size":8192,"offset":0},
                 {"base_host_virt_addr":4096,"size":4096,"offset":8192}]"#,
        )
        .expect_err("address overlap");
        assert!(e.to_string().contains("peer's address space"), "{e}");
    }
}
