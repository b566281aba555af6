//! The lean fault transport's framing: the `Fault` stream's messages
//! ([`pb::FaultRequest`], [`pb::FaultResponse`]) as length-delimited frames
//! on a raw byte stream, without HTTP/2 (docs/protocol.md, "The lean fault
//! transport").
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
//! [`FrameStream`] works on any `AsyncRead + AsyncWrite` stream (TCP, TLS, a
//! Unix socket); its reads are cancel-safe, so it can sit in a `select!`.

use bytes::{Buf, BytesMut};
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

/// Bytes of a frame's length header.
pub const HEADER_BYTES: usize = 4;

/// Largest frame a server reads: a `FaultHello` (a token of at most 256
/// bytes) or a `FaultRequest` (a snapshot name and a range) is far smaller;
/// this bounds what one client can make the server buffer per connection.
pub const MAX_REQUEST_FRAME_BYTES: usize = 64 << 10;

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
    /// Encoding buffer, reused.
    out: Vec<u8>,
}

/// Receive buffer to start with: a few single-page answers.
const INITIAL_BUFFER: usize = 64 << 10;

impl<S: AsyncRead + AsyncWrite + Unpin> FrameStream<S> {
    /// Frames on `io`, reading frames of at most `max_in` bytes.
    pub fn new(io: S, max_in: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            max_in,
            out: Vec::new(),
        }
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
            // few reads (its header says how large).
            let want =
                frame_len(&self.buf, self.max_in)?.map_or(INITIAL_BUFFER, |len| HEADER_BYTES + len);
            self.buf.reserve(want.saturating_sub(self.buf.len()));
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

    /// The stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
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
}
