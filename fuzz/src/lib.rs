//! faultline's fuzz targets, as plain functions over bytes so that the
//! libFuzzer binaries (`fuzz_targets/`) stay one line each.
//!
//! # Layout
//! - [`batch_decode`]: a page batch from a server (`PageBatch::decode`).
//! - [`manifest`]: a manifest from a server (`Manifest::try_from`) and the
//!   model's other validated types (names, ranges, bitmaps, regions).
//! - [`handshake`]: the Firecracker UFFD handshake's JSON and its
//!   validation against a snapshot.
//! - [`frame_decode`]: the lean fault transport's frames
//!   (`faultline_proto::frame`), as a server reads them from a client.
//!
//! Each target checks, beyond "does not panic", that what validation
//! accepts keeps the promises the rest of the code relies on.
//!
//! Run: `make fuzz` (stable Rust; see the Makefile), or with cargo-fuzz,
//! `cargo fuzz run batch_decode -s none`.

use faultline_proto::codec::{Compression, MAX_BATCH_BYTES, PageBatch, encode_run};
use faultline_proto::model::{DigestAlgorithm, validate_regions};
use faultline_proto::{
    MANIFEST_FORMAT_VERSION, Manifest, PageBitmap, PageIndex, PageRange, PageSize, Region,
    SnapshotId, WorkingSetName, pb,
};
use prost::Message;

/// Splits off a page size (from one byte) and a little-endian page count of
/// `N` bytes.
fn header<const N: usize>(data: &[u8]) -> Option<(PageSize, u64, &[u8])> {
    let (&ps, rest) = data.split_first()?;
    if rest.len() < N {
        return None;
    }
    let (count, rest) = rest.split_at(N);
    let mut buf = [0u8; 8];
    buf[..N].copy_from_slice(count);
    let page_size = if ps % 2 == 0 {
        PageSize::Size4K
    } else {
        PageSize::Size2M
    };
    Some((page_size, u64::from_le_bytes(buf), rest))
}

/// Input: one byte of page size, a 4-byte page count, an encoded
/// `PageBatch`.
pub fn batch_decode(data: &[u8]) {
    let Some((page_size, page_count, rest)) = header::<4>(data) else {
        return;
    };
    let Ok(wire) = pb::PageBatch::decode(rest) else {
        return;
    };
    let Ok(batch) = PageBatch::decode(wire, page_size, page_count) else {
        return;
    };
    let mut bytes = 0u64;
    for run in &batch.runs {
        assert!(run.range.end() <= page_count);
        assert_eq!(run.data.len() as u64, run.range.count() * page_size.bytes());
        assert_eq!(run.pages(page_size).count() as u64, run.range.count());
        bytes += run.data.len() as u64;
    }
    assert!(bytes <= MAX_BATCH_BYTES);
    for z in &batch.zero {
        assert!(z.end() <= page_count);
    }
    // What was accepted survives a round trip through each codec.
    for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let wire = pb::PageBatch {
            runs: batch
                .runs
                .iter()
                .map(|r| encode_run(r.range.start(), r.range.count(), r.data.clone(), codec))
                .collect(),
            zero: batch.zero.iter().copied().map(Into::into).collect(),
        };
        let again = PageBatch::decode(wire, page_size, page_count).expect("re-encoded batch");
        assert_eq!(again, batch);
    }
}

/// Input: an encoded `Manifest`; the same bytes also feed the model's other
/// validating constructors.
pub fn manifest(data: &[u8]) {
    if let Ok(wire) = pb::Manifest::decode(data)
        && let Ok(m) = Manifest::try_from(wire)
    {
        assert_eq!(m.format_version, MANIFEST_FORMAT_VERSION);
        assert_eq!(m.digests.len() as u64, m.page_count);
        assert_eq!(m.zero_map.len(), m.page_count);
        assert!(validate_regions(&m.regions, m.page_size, m.image_size()).is_ok());
        assert_eq!(m.digest_algorithm, DigestAlgorithm::Crc32c);
        let again = Manifest::try_from(pb::Manifest::from(&m)).expect("re-encoded manifest");
        assert_eq!(again, m);
        if m.page_count > 0 {
            let last = PageIndex(m.page_count - 1);
            let _ = m.is_zero(last);
            let _ = m.verify(last, &[0u8; 4096]);
        }
    }
    model(data);
}

/// Names, ranges, bitmaps and regions from raw bytes.
fn model(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for name in [&text[..], text.split('\0').next().unwrap_or("")] {
        if let Ok(id) = SnapshotId::new(name) {
            let s = id.as_str();
            assert!(!s.is_empty() && s.len() <= faultline_proto::model::MAX_NAME_LEN);
            assert!(!s.starts_with('.') && !s.contains('/') && !s.contains('\0'));
            assert_eq!(s.parse::<SnapshotId>().ok(), Some(id.clone()));
        }
        let _ = WorkingSetName::from_wire(name);
    }
    if data.len() >= 16 {
        let start = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        if let Ok(r) = PageRange::try_from(pb::PageRange { start, count }) {
            assert!(r.count() > 0);
            assert_eq!(r.end(), start + count);
            let _ = r.check_within(start.wrapping_add(count / 2));
        }
        // A bitmap of up to 2^16 bits from the rest.
        let bits = u64::from(u16::from_le_bytes([data[0], data[1]]));
        if let Ok(map) = PageBitmap::from_bytes("fuzz", &data[16..], bits) {
            assert_eq!(map.to_bytes(), &data[16..]);
            let ones: u64 = map.runs().map(|(_, c)| c).sum();
            assert_eq!(ones, map.count_ones());
            let from = start % (bits + 1);
            let clear = map.next_clear(from, bits);
            assert!(clear == bits || !map.get(clear));
            let set = map.next_set(from, bits);
            assert!(set == bits || map.get(set));
        }
        // Regions from the remaining words.
        let words: Vec<u64> = data[16..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let regions: Vec<Region> = words
            .chunks_exact(3)
            .map(|w| Region {
                name: "r".into(),
                guest_address: w[0],
                offset: w[1],
                size: w[2],
            })
            .collect();
        let image = start.saturating_mul(4096);
        if validate_regions(&regions, PageSize::Size4K, image).is_ok() {
            for r in &regions {
                assert!(r.offset + r.size <= image && r.size > 0);
            }
        }
    }
}

/// Input: one byte of page size, a 3-byte page count for the snapshot, and
/// the handshake's bytes as Firecracker sends them: parsed by the pure
/// `faultline_client::firecracker::handshake::parse` (and its prefix form),
/// then validated against the snapshot.
pub fn handshake(data: &[u8]) {
    use faultline_client::firecracker::handshake;
    let Some((page_size, page_count, bytes)) = header::<3>(data) else {
        return;
    };
    // The prefix parser agrees with the whole-message parser.
    let prefix = handshake::parse_prefix(bytes);
    let Ok(parsed) = handshake::parse(bytes) else {
        assert!(
            !matches!(prefix, Ok(Some(_))),
            "parse failed where parse_prefix succeeded"
        );
        return;
    };
    assert_eq!(prefix.ok().flatten().as_ref(), Some(&parsed));
    assert!(parsed.consumed <= bytes.len());
    // A well-formed handshake's promises: aligned, non-empty, no overlap.
    for (i, r) in parsed.regions.iter().enumerate() {
        let ps = r.page_size.bytes();
        assert!(r.size > 0 && r.size.is_multiple_of(ps));
        assert!(r.offset.is_multiple_of(ps) && r.peer_addr.0.is_multiple_of(ps));
        assert!(r.offset.checked_add(r.size).is_some());
        assert!(r.peer_addr.0.checked_add(r.size).is_some());
        for o in &parsed.regions[..i] {
            assert!(r.offset >= o.offset + o.size || o.offset >= r.offset + r.size);
            assert!(!o.contains(r.peer_addr.0) && !r.contains(o.peer_addr.0));
        }
    }
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        id: SnapshotId::new("fuzz").expect("a valid name"),
        page_size,
        page_count,
        regions: Vec::new(),
        // Validation looks at the image's size and page size only; a zero
        // map and digests of 16 Mi pages would cost every run 66 MiB.
        zero_map: PageBitmap::new(0),
        digest_algorithm: DigestAlgorithm::Crc32c,
        digests: Vec::new(),
        working_sets: Vec::new(),
    };
    let Ok(valid) = faultline_client::firecracker::validate(&parsed.regions, &manifest) else {
        return;
    };
    // Served regions fit the image and are aligned to the snapshot's pages
    // as well as the memory's (a 4 KiB snapshot in 2 MiB memory and the
    // reverse are served a larger page at a time).
    for v in &valid {
        let unit = v.region.page_size.bytes().max(page_size.bytes());
        assert!(v.region.offset.is_multiple_of(unit) && v.region.size.is_multiple_of(unit));
        assert!(v.region.offset + v.region.size <= manifest.image_size());
    }
}

/// Input: one byte saying where to cut the rest, then the bytes a client
/// sent on a lean fault connection after the magic: a `FaultHello` frame and
/// `FaultRequest` frames. The frames must decode the same whether the bytes
/// arrive at once or in two reads cut anywhere, an error must come from a
/// header over the limit or a body that is not the message (never a frame
/// that is merely incomplete), and nothing is taken beyond the input.
pub fn frame_decode(data: &[u8]) {
    use faultline_proto::frame::{self, FrameError, MAX_REQUEST_FRAME_BYTES};

    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    // Everything the decoder makes of `chunks`, fed one after another.
    let run = |chunks: &[&[u8]]| {
        let mut buf = bytes::BytesMut::new();
        let mut out: Vec<Result<pb::FaultRequest, String>> = Vec::new();
        let mut hello = None;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                let step = if hello.is_none() {
                    frame::decode::<pb::FaultHello>(
                        &mut buf,
                        MAX_REQUEST_FRAME_BYTES,
                        "a FaultHello",
                    )
                    .map(|h| h.map(|h| hello = Some(h)).is_some())
                } else {
                    frame::decode::<pb::FaultRequest>(
                        &mut buf,
                        MAX_REQUEST_FRAME_BYTES,
                        "a FaultRequest",
                    )
                    .map(|m| m.map(|m| out.push(Ok(m))).is_some())
                };
                match step {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        assert!(e.is_malformed(), "{e}");
                        if let FrameError::TooLarge { len, max } = e {
                            assert!(len > max);
                        }
                        out.push(Err(e.to_string()));
                        // Where it stopped depends on how much was fed.
                        return (hello, out, None);
                    }
                }
            }
            assert!(buf.len() <= rest.len());
        }
        (hello, out, Some(buf.len()))
    };
    let at = usize::from(cut) * rest.len() / 255;
    let whole = run(&[rest]);
    let split = run(&[&rest[..at], &rest[at..]]);
    assert_eq!(whole, split, "cut at {at}");
    // What decoded encodes back into frames that decode to the same.
    let (hello, msgs, _) = whole;
    if let Some(hello) = hello {
        let mut wire = Vec::new();
        frame::encode(&hello, &mut wire);
        for m in msgs.iter().filter_map(|m| m.as_ref().ok()) {
            frame::encode(m, &mut wire);
        }
        let mut buf = bytes::BytesMut::from(&wire[..]);
        let again: Option<pb::FaultHello> =
            frame::decode(&mut buf, usize::MAX, "a FaultHello").expect("re-encoded");
        assert_eq!(again.as_ref(), Some(&hello));
        for m in msgs.iter().filter_map(|m| m.as_ref().ok()) {
            let again: Option<pb::FaultRequest> =
                frame::decode(&mut buf, usize::MAX, "a FaultRequest").expect("re-encoded");
            assert_eq!(again.as_ref(), Some(m));
        }
        assert!(buf.is_empty());
    }
}
