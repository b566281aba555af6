//! Helpers for tests, benchmarks and the demo: (feature `synthetic`)
//! deterministic synthetic memory images, and (feature `test-certs`) TLS
//! certificates made on the spot.

/// The synthetic page generator is the micro-VM harness's, so that its
/// guests' pages and these images have the same mix and the same bytes.
#[cfg(feature = "synthetic")]
pub use faultline_microvm::pattern::{PageKind, fill_page, page_kind};

/// A whole synthetic image of `pages` pages of `page_size` bytes.
#[cfg(feature = "synthetic")]
pub fn synthetic_image(seed: u64, pages: u64, page_size: usize) -> Vec<u8> {
    let mut image = vec![0u8; pages as usize * page_size];
    for (i, page) in image.chunks_mut(page_size).enumerate() {
        fill_page(seed, i as u64, page);
    }
    image
}

#[cfg(feature = "test-certs")]
pub mod certs;

/// `n` distinct loopback ports nothing listens on now, for servers that
/// bind them a moment later (another process may still take one in
/// between). The listeners that found them stay open until all are found:
/// a port closed at once can come back from the next `bind(:0)`, which once
/// gave a server the same port for gRPC and metrics ("Address already in
/// use").
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Asks the server on the Unix socket `path` for `snapshot`'s page file by
/// hand, as a client would (`authorization`: the header's value, e.g.
/// `Bearer TOKEN`), and returns its answer; a descriptor that comes with it
/// is dropped. For tests of the handover's checks.
pub fn ask_page_file(
    path: &std::path::Path,
    snapshot: &str,
    authorization: Option<String>,
) -> faultline_proto::unix::PageFileResponse {
    use faultline_proto::unix::{self, PAGE_FILE_PREFACE, PageFileRequest};
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("read timeout");
    let req = PageFileRequest {
        snapshot: snapshot.into(),
        authorization,
        working_set: None,
    };
    let mut out = PAGE_FILE_PREFACE.to_vec();
    out.extend_from_slice(&unix::frame(&req));
    s.write_all(&out).expect("send the request");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read the answer");
    let header: [u8; 4] = answer[..4].try_into().expect("a frame header");
    let len = unix::frame_len(header, unix::MAX_PAGE_FILE_ANSWER_BYTES).expect("frame length");
    unix::unframe(&answer[4..4 + len]).expect("an answer")
}
