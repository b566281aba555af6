//! The page file: where a pager on the server's own host takes pages from
//! when the server hands it the snapshot's image as a file descriptor
//! (`unix://` servers; the exchange is `faultline_proto::unix`'s). The
//! prefetcher and the demand link read page runs from it with `pread`
//! instead of receiving them on their gRPC streams; everything after the
//! read is the same: every page is checked against the manifest's digest
//! before it is installed (a page failing it goes the way of a corrupt page
//! from the network: fetched again, then the failure policy), zero pages
//! come from the manifest and are never read.
//!
//! Why `pread` and not a mapping of the file: a mapping of a file that
//! shrinks under it (truncated by hand, a disk error) is a SIGBUS in the
//! pager's process, which would take every VM it serves with it (the server
//! stopped mapping the same file for that reason: docs/store.md); a sealed
//! memfd copy would make the server hold a second copy of every image a
//! client restores. A `pread` of the page cache costs one copy into a
//! buffer, which the install then copies into guest memory: measured in
//! docs/BENCHMARKS.md ("Same-host transport").
//!
//! Where there is no file (a TCP server, a store that cannot hand one out,
//! a refusal) the pager uses its streams unchanged: this module only ever
//! adds a faster way to the same pages.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::Bytes;
use faultline_proto::codec::{PageBatch, PageRun};
use faultline_proto::unix::{
    MAX_PAGE_FILE_ANSWER_BYTES, PAGE_FILE_PREFACE, PageFileRequest, PageFileResponse, frame,
    frame_len, unframe,
};
use faultline_proto::{Manifest, PageIndex, PageRange, pb};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::pages::PageState;
use super::prefetch::{PrefetchError, install_pages};
use super::stats::Source;
use super::units::Assembler;
use super::{PagerConfig, Shared};

/// How long the handover may take (connect, request, answer). A local
/// server answers in well under a millisecond; past this the pager goes on
/// with its streams.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(2);

/// A snapshot's image, handed over by the server: page `i` at byte
/// `i * page_size`.
#[derive(Debug)]
pub(crate) struct PageFile {
    file: File,
    page_bytes: usize,
    /// The recorded working set asked for, as runs in first-touch order
    /// (empty if the snapshot has none of that name), each with its slot in
    /// `ws_file`: where its first non-zero page is there, in pages.
    working_set: Vec<Slotted>,
    /// The working set's non-zero pages one after another in its order (the
    /// server's `wspages-` file), if it has one: a replay reads it front to
    /// back, where the image would be read scattered (the reason, measured:
    /// the server's `store::ws_pages`).
    ws_file: Option<File>,
}

/// A range of pages and, if it is read from the working set's page file,
/// the slot of its first non-zero page there (carried with the range, as
/// it is dealt out to streams and cut into batches, rather than looked up).
pub(crate) type Slotted = (PageRange, Option<u64>);

/// The working set's `runs` with their slots in `file`, which holds their
/// non-zero pages in order; `None` slots if the file is absent or too short
/// for them.
fn slotted(runs: Vec<PageRange>, file: Option<&File>, manifest: &Manifest) -> Vec<Slotted> {
    let mut out = Vec::with_capacity(runs.len());
    let mut slot = 0;
    for r in runs {
        out.push((r, Some(slot)));
        slot += nonzero_pages(manifest, r);
    }
    let len = file.and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
    if len < slot * manifest.page_size.bytes() {
        if file.is_some() {
            tracing::warn!(
                "the working set's page file of {} is too short ({len} bytes for {slot} pages); \
                 reading the set from the image",
                manifest.id
            );
        }
        out.iter_mut().for_each(|(_, s)| *s = None);
    }
    out
}

/// The non-zero pages of `range`.
pub(crate) fn nonzero_pages(manifest: &Manifest, range: PageRange) -> u64 {
    range.count()
        - manifest
            .zero_map
            .count_ones_in(range.start().0, range.end())
}

/// Asks the server at `url` for the page file of the snapshot whose
/// `manifest` the pager holds. `None` (with the reason logged) wherever the
/// streams are to be used: not a Unix socket, turned off, the store cannot
/// hand one out, the server refused, or the file does not match the
/// manifest's size.
pub(crate) fn open(config: &PagerConfig, manifest: &Manifest, url: &str) -> Option<PageFile> {
    let path = faultline_proto::unix::unix_path(url)?;
    if config.connect.no_page_file {
        return None;
    }
    match handover(config, &path) {
        Ok((answer, mut files)) if answer.code == 0 && !files.is_empty() => {
            let ws_file = (answer.working_set_file && files.len() == 2).then(|| files.remove(1));
            let file = files.swap_remove(0);
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            if answer.page_size != manifest.page_size.bytes()
                || answer.page_count != manifest.page_count
                || size < manifest.image_size()
            {
                tracing::warn!(
                    "{url}: the page file of {} does not match its manifest ({} pages of {} \
                     bytes, {size} bytes; the manifest says {} of {}); using the streams",
                    manifest.id,
                    answer.page_count,
                    answer.page_size,
                    manifest.page_count,
                    manifest.page_size.bytes()
                );
                return None;
            }
            let working_set = slotted(
                read_working_set(&answer, manifest),
                ws_file.as_ref(),
                manifest,
            );
            let ws_file = ws_file.filter(|_| working_set.first().is_some_and(|w| w.1.is_some()));
            tracing::info!(
                "{url}: reading pages of {} from the server's page file{}",
                manifest.id,
                if ws_file.is_some() {
                    " (the working set from its own, in order)"
                } else {
                    ""
                }
            );
            Some(PageFile {
                file,
                page_bytes: manifest.page_size.bytes_usize(),
                working_set,
                ws_file,
            })
        }
        Ok((answer, _)) if answer.code == tonic::Code::Unimplemented as i32 => {
            tracing::info!("{url}: {}", answer.message);
            None
        }
        Ok((answer, _)) => {
            tracing::warn!(
                "{url}: no page file ({:?}: {}); using the streams",
                tonic::Code::from(answer.code),
                answer.message
            );
            None
        }
        Err(e) => {
            tracing::warn!("{url}: asking for the page file failed: {e}; using the streams");
            None
        }
    }
}

/// The working set's runs, sent in the answer (see [`PageFileResponse`]);
/// runs outside the snapshot are dropped.
fn read_working_set(answer: &PageFileResponse, manifest: &Manifest) -> Vec<PageRange> {
    answer
        .working_set
        .iter()
        .filter(|&&(start, count)| {
            start
                .checked_add(count)
                .is_some_and(|e| e <= manifest.page_count)
        })
        .filter_map(|&(start, count)| PageRange::new(PageIndex(start), count))
        .collect()
}

/// The exchange itself: connect, send the preface and the request, receive
/// the answer and the descriptors (the image's, then the working set's).
fn handover(
    config: &PagerConfig,
    path: &std::path::Path,
) -> io::Result<(PageFileResponse, Vec<File>)> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDOVER_TIMEOUT))?;
    let req = PageFileRequest {
        snapshot: config.snapshot.to_string(),
        authorization: config
            .connect
            .token
            .as_ref()
            .map(|t| t.header_value().to_owned()),
        working_set: Some(config.working_set.to_string()),
    };
    let mut out = PAGE_FILE_PREFACE.to_vec();
    out.extend_from_slice(&frame(&req));
    io::Write::write_all(&mut stream, &out)?;
    // The descriptor rides on the answer's first bytes: read them with
    // recvmsg, the rest with plain reads.
    let mut head = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut head)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs() {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS installed this descriptor in our table
                // for us; nothing else owns it, and wrapping it at once closes
                // it on every path.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let n = msg.bytes;
    let mut got = head[..n].to_vec();
    while got.len() < 4 {
        got.push(read_byte(&mut stream)?);
    }
    let len = frame_len(
        got[..4].try_into().expect("4 bytes"),
        MAX_PAGE_FILE_ANSWER_BYTES,
    )?;
    let mut body = got.split_off(4);
    if body.len() < len {
        let mut rest = vec![0u8; len - body.len()];
        io::Read::read_exact(&mut stream, &mut rest)?;
        body.extend_from_slice(&rest);
    }
    body.truncate(len);
    let answer: PageFileResponse = unframe(&body)?;
    Ok((answer, fds.into_iter().map(File::from).collect()))
}

fn read_byte(stream: &mut UnixStream) -> io::Result<u8> {
    let mut b = [0u8; 1];
    io::Read::read_exact(stream, &mut b)?;
    Ok(b[0])
}

impl PageFile {
    /// The working set's runs, in first-touch order, with their slots.
    pub(crate) fn working_set(&self) -> &[Slotted] {
        &self.working_set
    }

    /// The pages of `range` as a batch, as the server would send it: runs of
    /// non-zero pages with their bytes (read from the file), zero pages as
    /// ranges. `keep` says which non-zero pages to read (the others are
    /// skipped: already installed or claimed by another path). With
    /// `nowait`, a read the page cache cannot serve at once gives `None`
    /// (the caller asks the server instead) rather than waiting for the
    /// disk.
    pub(crate) fn read(
        &self,
        manifest: &Manifest,
        range: PageRange,
        keep: impl Fn(PageIndex) -> bool,
        nowait: bool,
    ) -> io::Result<Option<PageBatch>> {
        self.read_from(manifest, range, keep, nowait, None)
    }

    /// [`Self::read`], from the working set's page file at slot `ws` (where
    /// `range`'s first non-zero page is there) if given, else from the
    /// image.
    fn read_from(
        &self,
        manifest: &Manifest,
        range: PageRange,
        keep: impl Fn(PageIndex) -> bool,
        nowait: bool,
        mut ws: Option<u64>,
    ) -> io::Result<Option<PageBatch>> {
        let mut batch = PageBatch {
            runs: Vec::new(),
            zero: Vec::new(),
        };
        let mut p = range.start().0;
        while p < range.end() {
            let zero = manifest.zero_map.get(p);
            let wanted = zero || keep(PageIndex(p));
            let mut end = p + 1;
            while end < range.end()
                && manifest.zero_map.get(end) == zero
                && (zero || keep(PageIndex(end))) == wanted
            {
                end += 1;
            }
            let run = PageRange::new(PageIndex(p), end - p).expect("non-empty");
            if zero {
                batch.zero.push(run);
            } else {
                let (file, at) = match (&self.ws_file, ws.as_mut()) {
                    (Some(ws_file), Some(slot)) => {
                        let at = *slot;
                        *slot += run.count();
                        (ws_file, at)
                    }
                    _ => (&self.file, run.start().0),
                };
                if wanted {
                    match self.read_run(file, at, run.count(), nowait)? {
                        Some(data) => batch.runs.push(PageRun { range: run, data }),
                        None => return Ok(None),
                    }
                }
            }
            p = end;
        }
        Ok(Some(batch))
    }

    /// The pages of `group`, consecutive runs of the working set whose
    /// non-zero pages are `nonzero` pages from `slot` in its page file, as a
    /// batch. The file is read once for all of them (a set is mostly
    /// one-page runs, and a read per run cost a system call and a buffer
    /// each); pages already installed are read too, and the install skips
    /// them.
    fn read_group(
        &self,
        manifest: &Manifest,
        group: &[Slotted],
        slot: u64,
        nonzero: u64,
    ) -> io::Result<PageBatch> {
        let ws_file = self
            .ws_file
            .as_ref()
            .expect("runs have slots only where the set has a page file");
        let data = match nonzero {
            0 => Bytes::new(),
            n => self
                .read_run(ws_file, slot, n, false)?
                .expect("a blocking read always reads"),
        };
        let mut batch = PageBatch {
            runs: Vec::with_capacity(group.len()),
            zero: Vec::new(),
        };
        let mut at = 0;
        for (range, _) in group {
            let mut p = range.start().0;
            while p < range.end() {
                let zero = manifest.zero_map.get(p);
                let end = if zero {
                    manifest.zero_map.next_clear(p, range.end())
                } else {
                    manifest.zero_map.next_set(p, range.end())
                };
                let run = PageRange::new(PageIndex(p), end - p).expect("non-empty");
                if zero {
                    batch.zero.push(run);
                } else {
                    let len = run.count() as usize * self.page_bytes;
                    batch.runs.push(PageRun {
                        range: run,
                        data: data.slice(at..at + len),
                    });
                    at += len;
                }
                p = end;
            }
        }
        Ok(batch)
    }

    /// The bytes of `count` pages of `file` from page `at`; `None` if
    /// `nowait` and the page cache does not hold them.
    fn read_run(
        &self,
        file: &File,
        at: u64,
        count: u64,
        nowait: bool,
    ) -> io::Result<Option<Bytes>> {
        let len = count as usize * self.page_bytes;
        let offset = at * self.page_bytes as u64;
        // Not zeroed first: the read fills all of it or fails (a memset of
        // every batch measured as a tenth of the path's time).
        let mut buf = Vec::with_capacity(len);
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        match read_uninit(file, buf.spare_capacity_mut(), offset, flags) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            // The file system does not do RWF_NOWAIT: a plain read.
            Err(e) if nowait && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if !read_uninit(file, buf.spare_capacity_mut(), offset, 0)? {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
        // SAFETY: `read_uninit` returned true: all `len` bytes of the spare
        // capacity were written by the kernel.
        unsafe { buf.set_len(len) };
        Ok(Some(Bytes::from(buf)))
    }
}

/// Reads all of `buf` at `offset` with `preadv2(flags)`: true once every
/// byte is written; false if `flags` has `RWF_NOWAIT` and some of it is not
/// in the page cache.
fn read_uninit(
    file: &File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    offset: u64,
    flags: libc::c_int,
) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: `iov` describes `rest`, memory valid for writes of its
        // length (uninitialized bytes are fine to write) that outlives the
        // call; the descriptor is open (owned by `file`).
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                flags,
            )
        };
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the page file ends early (truncated?)",
                ));
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock if flags & libc::RWF_NOWAIT != 0 => {
                        return Ok(false);
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(true)
}

/// What a `Prefetch` of `req` would stream, as ranges in its order: the
/// working set (runs in first-touch order), then (`WorkingSetThenRest`) the
/// whole snapshot; or the ranges named.
fn plan(file: &PageFile, manifest: &Manifest, req: &pb::PrefetchRequest) -> Vec<Slotted> {
    let all = PageRange::new(PageIndex(0), manifest.page_count).map(|r| (r, None));
    match pb::PrefetchOrder::try_from(req.order).unwrap_or(pb::PrefetchOrder::WorkingSetThenRest) {
        pb::PrefetchOrder::WorkingSetOnly => file.working_set().to_vec(),
        pb::PrefetchOrder::Ranges => req
            .ranges
            .iter()
            .filter_map(|r| PageRange::try_from(*r).ok())
            .filter(|r| r.end() <= manifest.page_count)
            .map(|r| (r, None))
            .collect(),
        _ => file.working_set().iter().copied().chain(all).collect(),
    }
}

/// Does what [`super::prefetch::stream_into`] does for `req`, reading the
/// pages from the page file instead of a stream ([`prefetch_ranges`] over
/// the ranges the request names, in its order).
pub(crate) async fn prefetch(
    shared: &Shared,
    file: &PageFile,
    req: &pb::PrefetchRequest,
    source: Source,
    units: &mut Assembler,
) -> Result<(), PrefetchError> {
    prefetch_ranges(
        shared,
        file,
        &plan(file, &shared.manifest, req),
        source,
        units,
    )
    .await
}

/// Reads `ranges` from the page file in their order, in batches of the
/// configured size (those with a slot from the working set's own file): each
/// page still missing read, verified and installed as a streamed one would
/// be (the install units of mixed regions assembled in `units`, as the
/// stream's are), zero pages mapped. An error reading the file is returned
/// (the caller falls back to the stream).
pub(crate) async fn prefetch_ranges(
    shared: &Shared,
    file: &PageFile,
    ranges: &[Slotted],
    source: Source,
    units: &mut Assembler,
) -> Result<(), PrefetchError> {
    let manifest = &shared.manifest;
    // 0 asks the server for its default: the same size here.
    let batch_bytes = match shared.config.bulk.batch_bytes {
        0 => super::PREFETCH_BATCH_BYTES,
        b => b,
    };
    let batch_pages = (batch_bytes / manifest.page_size.bytes()).max(1);
    // Pages since the last wake-up of waiters and yield: a working set is
    // mostly one-page runs, and doing both per run cost more than the reads.
    let mut since = 0;
    let mut i = 0;
    while let Some(&(range, mut ws)) = ranges.get(i) {
        if let Some(slot) = ws.filter(|_| range.count() <= batch_pages && file.ws_file.is_some()) {
            // The runs from this one whose slots follow on from each other,
            // up to a batch of pages in all: read as one.
            let (mut pages, mut next) = (0, slot);
            let mut end = i;
            while let Some(&(r, Some(s))) = ranges.get(end) {
                if s != next || pages + r.count() > batch_pages {
                    break;
                }
                pages += r.count();
                next += nonzero_pages(manifest, r);
                end += 1;
            }
            let batch = file
                .read_group(manifest, &ranges[i..end], slot, next - slot)
                .map_err(PrefetchError::PageFile)?;
            i = end;
            if !install_batch(
                shared,
                &batch,
                pages,
                &mut since,
                batch_pages,
                source,
                units,
            )
            .await?
            {
                return Ok(());
            }
            continue;
        }
        i += 1;
        let mut start = range.start().0;
        while start < range.end() {
            let count = batch_pages.min(range.end() - start);
            let chunk = PageRange::new(PageIndex(start), count).expect("non-empty");
            start += count;
            let missing = |p: PageIndex| shared.table.get(p) == PageState::Missing;
            let batch = file
                .read_from(manifest, chunk, missing, false, ws)
                .map_err(PrefetchError::PageFile)?
                .expect("a blocking read always reads");
            if let Some(slot) = ws.as_mut() {
                *slot += nonzero_pages(manifest, chunk);
            }
            if !install_batch(
                shared,
                &batch,
                count,
                &mut since,
                batch_pages,
                source,
                units,
            )
            .await?
            {
                return Ok(());
            }
        }
    }
    shared.progress.notify_waiters();
    Ok(())
}

/// Installs `batch` (`count` pages read from the page file) as a stream's
/// batch is installed ([`install_pages`]); every `batch_pages` pages
/// (counted in `since`) wakes the pager's waiters and yields to the
/// runtime. False once the pager is stopping.
async fn install_batch(
    shared: &Shared,
    batch: &PageBatch,
    count: u64,
    since: &mut u64,
    batch_pages: u64,
    source: Source,
    units: &mut Assembler,
) -> Result<bool, PrefetchError> {
    install_pages(shared, batch, source, units)?;
    *since += count;
    if *since >= batch_pages {
        *since = 0;
        shared.progress.notify_waiters();
        if shared.is_stopping() {
            return Ok(false);
        }
        // The reads are blocking: let the runtime's other tasks (the
        // watcher) run between batches.
        tokio::task::yield_now().await;
    }
    Ok(true)
}
