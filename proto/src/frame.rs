//! The lean transports' framing: the `Fault` stream's messages
//! ([`pb::FaultRequest`], [`pb::FaultResponse`]), and a `Prefetch` stream's
//! ([`pb::PrefetchRequest`], [`pb::PrefetchFrame`]), as length-delimited
//! frames on a raw byte stream, without HTTP/2 (docs/protocol.md, "The lean
//! fault transport" and "The lean prefetch transport").
//!
//! A connection starts with [`MAGIC`] (where HTTP/2 starts with its
//! preface), then frames: each a 4-byte big-endian length and that many
//! bytes of one protobuf message. The client sends a [`pb::FaultHello`],
//! then the `FaultRequest`s of a `Fault` stream (`open` first); the server
//! answers the `open` with a `FaultResponse` of `request_id` 0 and no result
//! (opened) or an error (refused, and the connection closes), then one
//! `FaultResponse` per request. A fixed-size length, unlike protobuf's
//! varint delimiter, lets a reader refuse an oversized frame from its first
//! four bytes, before it buffers any of it.
//!
//! A prefetch connection starts with [`PREFETCH_MAGIC`], then the client's
//! `FaultHello` and `PrefetchRequest`; the server answers with
//! `PrefetchFrame`s: one per batch, then an end or an error. A batch goes
//! out as a [`BatchFrame`], the protobuf framing in a small buffer and the
//! page bytes written from where the server read them, by one vectored
//! write: no copy in user space (the bytes on the wire are prost's encoding
//! of the same message).
//!
//! [`FrameStream`] works on any `AsyncRead + AsyncWrite` stream (TCP, TLS, a
//! Unix socket); its reads are cancel-safe, so it can sit in a `select!`.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::pb;

/// What a lean fault connection starts with, instead of HTTP/2's preface
/// (`PRI * HTTP/2.0...`). It is as long as the preface (24 bytes), so a
/// server without the transport, which reads exactly a preface's worth
/// before it checks it, refuses the connection at once instead of waiting
/// out its handshake timeout for bytes that never come; the client then
/// falls back to gRPC. The digit is the transport's version.
pub const MAGIC: [u8; 24] = *b"FAULTLINE-LEAN-FAULT/1\r\n";

/// What a lean prefetch connection starts with: one `Prefetch` stream as
/// frames. As long as HTTP/2's preface, for the reason [`MAGIC`] is.
pub const PREFETCH_MAGIC: [u8; 24] = *b"FAULTLINE-LEAN-FETCH/1\r\n";

/// Bytes of a frame's length header.
pub const HEADER_BYTES: usize = 4;

/// Largest frame a server reads: a `FaultHello` (a token of at most 256
/// bytes) or a `FaultRequest` (a snapshot name and a range) is far smaller;
/// this bounds what one client can make the server buffer per connection.
pub const MAX_REQUEST_FRAME_BYTES: usize = 64 << 10;

/// Largest frame a server reads on a prefetch connection: a
/// `PrefetchRequest` carries the bitmap of the pages the client has (16 KiB
/// per GiB of 4 KiB pages) and up to `--max-prefetch-ranges` ranges; gRPC's
/// limit for it is the server's 32 MiB message limit, and this is the same.
/// The receive buffer grows with what arrives, not with what a header
/// announces ([`FrameStream::new`]), so a header alone does not make the
/// server allocate this much.
pub const MAX_PREFETCH_REQUEST_FRAME_BYTES: usize = 32 << 20;

/// Largest frame a client reads: an answer carries at most the server's
/// 16 MiB per request (`MAX_READ_BYTES`), plus its framing and whatever a
/// compressor adds to incompressible data (well under 1 MiB).
pub const MAX_ANSWER_FRAME_BYTES: usize = 17 << 20;

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length header announces more than the reader accepts.
    #[error("a frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame's bytes are not the message expected.
    #[error("a frame does not decode as {what}: {source}")]
    Decode {
        /// The message expected.
        what: &'static str,
        /// Why.
        source: prost::DecodeError,
    },
    /// The stream ended inside a frame.
    #[error("the connection closed in the middle of a frame ({have} bytes of {want})")]
    Truncated {
        /// Bytes received of the frame (header included).
        have: usize,
        /// Bytes the frame needs (header included, if known).
        want: usize,
    },
    /// Reading or writing the stream failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the peer sent something that is not a frame of this
    /// protocol (as against the connection failing).
    pub fn is_malformed(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::Decode { .. })
    }
}

/// Appends `msg` as one frame to `out`.
pub fn encode<M: Message>(msg: &M, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(HEADER_BYTES + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(out).expect("a Vec grows as needed");
}

/// The length of the frame at the front of `buf`, if its header is there;
/// refused if over `max`.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Takes one whole frame off the front of `buf` and decodes it as `M`;
/// `None` (and `buf` untouched) if the frame is not all there yet. Page
/// data decodes as slices of `buf`'s memory, without a copy.
pub fn decode<M: Message + Default>(
    buf: &mut BytesMut,
    max: usize,
    what: &'static str,
) -> Result<Option<M>, FrameError> {
    let Some(len) = frame_len(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < HEADER_BYTES + len {
        return Ok(None);
    }
    buf.advance(HEADER_BYTES);
    let body = buf.split_to(len).freeze();
    M::decode(body)
        .map(Some)
        .map_err(|source| FrameError::Decode { what, source })
}

/// A byte stream carrying frames.
#[derive(Debug)]
pub struct FrameStream<S> {
    io: S,
    /// Received bytes not yet taken as frames.
    buf: BytesMut,
    /// Largest frame read.
    max_in: usize,
    /// Whether a frame's whole length is reserved from its header (a client
    /// reading its server's answers), or the buffer grows with what arrives
    /// (a server reading what any client may send).
    reserve_whole: bool,
    /// Encoding buffer, reused.
    out: Vec<u8>,
}

/// Receive buffer to start with: a few single-page answers.
const INITIAL_BUFFER: usize = 64 << 10;

impl<S: AsyncRead + AsyncWrite + Unpin> FrameStream<S> {
    /// Frames on `io`, reading frames of at most `max_in` bytes. The
    /// receive buffer at most doubles per read, up to the frame's length,
    /// so that a peer must send the bytes it makes this side hold.
    pub fn new(io: S, max_in: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            max_in,
            reserve_whole: false,
            out: Vec::new(),
        }
    }

    /// Reserves each frame's whole length as soon as its header arrives,
    /// so that a large frame (a batch of pages) lands in one buffer in as
    /// few reads as the socket allows, with no copy as it grows: for a
    /// client, whose server's frames are bounded by `max_in`.
    pub fn reserving_whole_frames(mut self) -> Self {
        self.reserve_whole = true;
        self
    }

    /// Frames on `io` whose first `already` bytes were read from it before
    /// (by whoever looked at the magic).
    pub fn with_read(io: S, max_in: usize, already: &[u8]) -> Self {
        let mut s = Self::new(io, max_in);
        s.buf.extend_from_slice(already);
        s
    }

    /// The next frame, as `M`; `None` if the stream ended cleanly between
    /// frames. Cancel-safe: bytes read stay buffered for the next call.
    pub async fn read<M: Message + Default>(
        &mut self,
        what: &'static str,
    ) -> Result<Option<M>, FrameError> {
        loop {
            if let Some(m) = decode(&mut self.buf, self.max_in, what)? {
                return Ok(Some(m));
            }
            // Room for the whole frame, so that a large answer arrives in
            // few reads (its header says how large); or, from an untrusted
            // peer, twice what has arrived.
            let want =
                frame_len(&self.buf, self.max_in)?.map_or(INITIAL_BUFFER, |len| HEADER_BYTES + len);
            let room = if self.reserve_whole {
                want
            } else {
                want.min(self.buf.len().max(INITIAL_BUFFER) * 2)
            };
            self.buf.reserve(room.saturating_sub(self.buf.len()));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(FrameError::Truncated {
                    have: self.buf.len(),
                    want,
                });
            }
        }
    }

    /// Writes `msg` as one frame and flushes it.
    pub async fn write<M: Message>(&mut self, msg: &M) -> Result<(), FrameError> {
        self.out.clear();
        encode(msg, &mut self.out);
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Writes bytes as they are (the magic) and flushes them.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Writes several messages, each as a frame, with one write and flush
    /// (the magic, the hello and the `open`, in one packet).
    pub async fn write_all_of(
        &mut self,
        prefix: &[u8],
        msgs: &[&(dyn Encode + Sync)],
    ) -> Result<(), FrameError> {
        self.out.clear();
        self.out.extend_from_slice(prefix);
        for m in msgs {
            m.encode_frame(&mut self.out);
        }
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Writes a batch's frame ([`BatchFrame`]) by vectored writes, its page
    /// bytes straight from their buffers, and flushes it.
    pub async fn write_batch(&mut self, frame: &BatchFrame) -> Result<(), FrameError> {
        let mut slices = frame.io_slices();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = rest.len().min(MAX_IO_SLICES);
            let written = self.io.write_vectored(&rest[..n]).await?;
            if written == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            IoSlice::advance_slices(&mut rest, written);
        }
        self.io.flush().await?;
        Ok(())
    }

    /// The stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

/// Slices given to one `writev`: the kernel refuses more than `IOV_MAX`
/// (1024 on Linux); a 1 MiB batch of scattered single pages needs about 513.
const MAX_IO_SLICES: usize = 1024;

/// A `PrefetchFrame` carrying one batch, encoded for a vectored write: the
/// length header and every protobuf key, length and small field in one
/// buffer, and each run's page bytes as the batch holds them (a slice of
/// what the server read), in order. Its bytes are exactly prost's encoding
/// of the frame (a test checks it), so the client decodes it as any other.
#[derive(Debug)]
pub struct BatchFrame {
    /// The framing.
    meta: Vec<u8>,
    /// The frame's bytes in order: spans of `meta`, and page data.
    parts: Vec<Part>,
}

#[derive(Debug)]
enum Part {
    Meta(std::ops::Range<usize>),
    Data(Bytes),
}

impl BatchFrame {
    /// The frame of `PrefetchFrame { batch }`.
    pub fn new(batch: pb::PageBatch) -> Self {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
        let batch_len = batch.encoded_len();
        // The oneof's key (one byte for field 1), its length, the batch.
        let body_len = 1 + encoded_len_varint(batch_len as u64) + batch_len;
        let mut f = Self {
            meta: Vec::with_capacity(16 + 24 * batch.runs.len() + 16 * batch.zero.len()),
            parts: Vec::with_capacity(2 * batch.runs.len() + 1),
        };
        f.meta.extend_from_slice(&(body_len as u32).to_be_bytes());
        encode_key(1, WireType::LengthDelimited, &mut f.meta);
        encode_varint(batch_len as u64, &mut f.meta);
        // Fields as prost writes them: in field order, a scalar at its
        // default (page 0, no compression) left out.
        for run in batch.runs {
            encode_key(1, WireType::LengthDelimited, &mut f.meta);
            encode_varint(run.encoded_len() as u64, &mut f.meta);
            if run.start != 0 {
                prost::encoding::uint64::encode(1, &run.start, &mut f.meta);
            }
            if run.count != 0 {
                prost::encoding::uint64::encode(2, &run.count, &mut f.meta);
            }
            if !run.data.is_empty() {
                encode_key(3, WireType::LengthDelimited, &mut f.meta);
                encode_varint(run.data.len() as u64, &mut f.meta);
                f.push_data(run.data);
            }
            if run.compression != 0 {
                prost::encoding::int32::encode(4, &run.compression, &mut f.meta);
            }
        }
        for zero in &batch.zero {
            prost::encoding::message::encode(2, zero, &mut f.meta);
        }
        f.close_meta();
        f
    }

    /// Ends the current span of framing, then adds `data`.
    fn push_data(&mut self, data: Bytes) {
        self.close_meta();
        self.parts.push(Part::Data(data));
    }

    /// Adds the bytes of `meta` written since the last span as a span.
    fn close_meta(&mut self) {
        let from = self
            .parts
            .iter()
            .rev()
            .find_map(|p| match p {
                Part::Meta(r) => Some(r.end),
                Part::Data(_) => None,
            })
            .unwrap_or(0);
        if from < self.meta.len() {
            self.parts.push(Part::Meta(from..self.meta.len()));
        }
    }

    /// Its bytes in order, for a vectored write.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Meta(r) => IoSlice::new(&self.meta[r.clone()]),
                Part::Data(d) => IoSlice::new(d),
            })
            .collect()
    }
}

/// A message that can be written as a frame (object-safe, for
/// [`FrameStream::write_all_of`]).
pub trait Encode {
    /// Appends `self` as one frame to `out`.
    fn encode_frame(&self, out: &mut Vec<u8>);
}

impl<M: Message> Encode for M {
    fn encode_frame(&self, out: &mut Vec<u8>) {
        encode(self, out);
    }
}

/// The server's answer to an `open` that succeeded: request id 0, no result.
pub fn opened() -> pb::FaultResponse {
    pb::FaultResponse {
        request_id: 0,
        result: None,
    }
}

/// An in-band error for the connection as a whole (request id 0): a refused
/// `open` or token, a malformed frame. The connection closes after it.
pub fn refused(code: i32, message: impl Into<String>) -> pb::FaultResponse {
    pb::FaultResponse {
        request_id: 0,
        result: Some(pb::fault_response::Result::Error(pb::Error {
            code,
            message: message.into(),
        })),
    }
}

/// The last frame of a prefetch that sent everything.
pub fn prefetch_end() -> pb::PrefetchFrame {
    pb::PrefetchFrame {
        kind: Some(pb::prefetch_frame::Kind::End(pb::PrefetchEnd {})),
    }
}

/// The frame ending a prefetch that failed or was refused.
pub fn prefetch_error(code: i32, message: impl Into<String>) -> pb::PrefetchFrame {
    pb::PrefetchFrame {
        kind: Some(pb::prefetch_frame::Kind::Error(pb::Error {
            code,
            message: message.into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64) -> pb::FaultRequest {
        pb::FaultRequest {
            kind: Some(pb::fault_request::Kind::Pages(pb::FaultPages {
                request_id: id,
                range: Some(pb::PageRange {
                    start: id,
                    count: 1,
                }),
            })),
        }
    }

    /// Frames split at every byte decode to the messages sent, in order.
    #[test]
    fn frames_round_trip_across_any_split() {
        let mut wire = Vec::new();
        for id in 1..4 {
            encode(&request(id), &mut wire);
        }
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(m) =
                decode::<pb::FaultRequest>(&mut buf, MAX_REQUEST_FRAME_BYTES, "a request").unwrap()
            {
                got.push(m);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(m) =
                decode::<pb::FaultRequest>(&mut buf, MAX_REQUEST_FRAME_BYTES, "a request").unwrap()
            {
                got.push(m);
            }
            assert_eq!(got, (1..4).map(request).collect::<Vec<_>>(), "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    /// An oversized length is refused from the header alone, before any body arrives.
    #[test]
    fn oversized_frame_refused_from_its_header() {
        let mut buf = BytesMut::from(&(1u32 << 30).to_be_bytes()[..]);
        let e =
            decode::<pb::FaultRequest>(&mut buf, MAX_REQUEST_FRAME_BYTES, "a request").unwrap_err();
        assert!(
            matches!(e, FrameError::TooLarge { .. }) && e.is_malformed(),
            "{e}"
        );
    }

    /// Bytes that are not the message expected are a decode error naming it.
    #[test]
    fn garbage_is_a_decode_error() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&3u32.to_be_bytes());
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        let e = decode::<pb::FaultRequest>(&mut buf, MAX_REQUEST_FRAME_BYTES, "a FaultRequest")
            .unwrap_err();
        assert!(e.to_string().contains("a FaultRequest"), "{e}");
    }

    /// A stream read frame by frame; a stream ending inside a frame is Truncated, between frames None.
    #[tokio::test]
    async fn stream_reads_frames_and_ends() {
        let (a, b) = tokio::io::duplex(64);
        let mut tx = FrameStream::new(a, MAX_REQUEST_FRAME_BYTES);
        let mut rx = FrameStream::new(b, MAX_REQUEST_FRAME_BYTES);
        let writer = tokio::spawn(async move {
            for id in 1..50 {
                tx.write(&request(id)).await.unwrap();
            }
            tx.write_raw(&[0, 0, 0, 9, 1]).await.unwrap();
        });
        for id in 1..50 {
            let m: pb::FaultRequest = rx.read("a request").await.unwrap().unwrap();
            assert_eq!(m, request(id));
        }
        writer.await.unwrap();
        let e = rx.read::<pb::FaultRequest>("a request").await.unwrap_err();
        assert!(
            matches!(e, FrameError::Truncated { have: 5, want: 13 }),
            "{e}"
        );
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        let mut rx = FrameStream::new(b, MAX_REQUEST_FRAME_BYTES);
        assert!(
            rx.read::<pb::FaultRequest>("a request")
                .await
                .unwrap()
                .is_none()
        );
    }

    fn batch() -> pb::PageBatch {
        let run = |start, count, fill: u8, compression| pb::PageRun {
            start,
            count,
            data: Bytes::from(vec![fill; (count as usize) * 4096]),
            compression,
        };
        pb::PageBatch {
            runs: vec![
                run(0, 1, 1, 0),
                run(7, 3, 2, 0),
                run(1 << 40, 1, 3, 2),
                pb::PageRun {
                    start: 9,
                    count: 2,
                    data: Bytes::new(),
                    compression: 1,
                },
            ],
            zero: vec![
                pb::PageRange { start: 0, count: 0 },
                pb::PageRange {
                    start: 300,
                    count: 1 << 33,
                },
            ],
        }
    }

    /// A batch's vectored frame is byte for byte prost's encoding of its `PrefetchFrame`
    /// (defaults left out, large varints, empty data), its page bytes not copied.
    #[test]
    fn batch_frame_is_prosts_encoding() {
        for b in [batch(), pb::PageBatch::default()] {
            let frame = BatchFrame::new(b.clone());
            let got: Vec<u8> = frame.io_slices().iter().flat_map(|s| s.to_vec()).collect();
            let mut want = Vec::new();
            encode(
                &pb::PrefetchFrame {
                    kind: Some(pb::prefetch_frame::Kind::Batch(b.clone())),
                },
                &mut want,
            );
            assert_eq!(got, want);
            // Each non-empty run's data is one slice of its own, at its address.
            let slices = frame.io_slices();
            for run in b.runs.iter().filter(|r| !r.data.is_empty()) {
                assert!(slices.iter().any(|s| s.as_ptr() == run.data.as_ptr()));
            }
        }
    }

    /// Batches written by vectored writes over a narrow pipe decode on the other end,
    /// followed by the end frame.
    #[tokio::test]
    async fn batch_frames_stream_and_end() {
        let (a, b) = tokio::io::duplex(1000);
        let mut tx = FrameStream::new(a, MAX_PREFETCH_REQUEST_FRAME_BYTES);
        let mut rx = FrameStream::new(b, MAX_ANSWER_FRAME_BYTES).reserving_whole_frames();
        let writer = tokio::spawn(async move {
            for _ in 0..3 {
                tx.write_batch(&BatchFrame::new(batch())).await.unwrap();
            }
            tx.write(&prefetch_end()).await.unwrap();
        });
        for _ in 0..3 {
            let f: pb::PrefetchFrame = rx.read("a PrefetchFrame").await.unwrap().unwrap();
            assert_eq!(f.kind, Some(pb::prefetch_frame::Kind::Batch(batch())));
        }
        let f: pb::PrefetchFrame = rx.read("a PrefetchFrame").await.unwrap().unwrap();
        assert_eq!(f, prefetch_end());
        writer.await.unwrap();
    }

    /// A header announcing a large frame does not make an untrusting reader reserve it:
    /// its buffer grows with the bytes that arrive.
    #[tokio::test]
    async fn untrusted_header_reserves_only_what_arrives() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut rx = FrameStream::new(b, MAX_PREFETCH_REQUEST_FRAME_BYTES);
        a.write_all(&(30u32 << 20).to_be_bytes()).await.unwrap();
        drop(a);
        let e = rx
            .read::<pb::PrefetchRequest>("a request")
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Truncated { have: 4, .. }), "{e}");
        assert!(
            rx.buf.capacity() <= 2 * INITIAL_BUFFER,
            "{}",
            rx.buf.capacity()
        );
    }
}
