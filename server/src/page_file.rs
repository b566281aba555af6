//! The page-file handover: on the server's Unix socket, a client on the same
//! host may ask for a snapshot's image as a file descriptor instead of its
//! bytes (the exchange is [`faultline_proto::unix`]'s), so that a restore
//! reads pages from the page cache at memcpy speed, with no socket between.
//!
//! - **What is handed over.** The local store's `memory` file, the
//!   descriptor the server reads it through (opened read-only, so the
//!   client can neither write nor truncate through it). Zero pages are holes
//!   the client never reads (the manifest says which). Only a standalone
//!   snapshot of the local store has such a file ([`Snapshot::page_file`]):
//!   the object store's chunks live in memory, a layered snapshot or a
//!   volume resolves each page through its chain. Those answer
//!   Unimplemented, and the client uses the byte stream on the same socket.
//!   When the request names a working set that has a page file of its own
//!   ([`Snapshot::working_set_pages`]), that file's descriptor follows the
//!   image's, read-only as well, and the runs sent are its order.
//! - **Authorization** is `ReadPages`'s: the same `authorization` value,
//!   checked by the same [`Authenticator`], and the `read` right on the
//!   snapshot, decided before the snapshot is looked up.
//! - **Checks stay the client's.** Every page read from the file is checked
//!   against the manifest's digest before it is installed, as a page from
//!   the stream is: a file that is not the manifest's snapshot (re-imported
//!   under its name meanwhile) or a corrupt page is never installed.
//!
//! One request per connection; the connection is closed after the answer.
//!
//! [`Snapshot::page_file`]: crate::store::Snapshot::page_file
//! [`Snapshot::working_set_pages`]: crate::store::Snapshot::working_set_pages

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use faultline_proto::unix::{
    MAX_PAGE_FILE_MESSAGE_BYTES, PageFileRequest, PageFileResponse, frame, frame_len, unframe,
};
use faultline_proto::{SnapshotId, WorkingSetName};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::auth::{Authenticator, Right};
use crate::store::SnapshotStore;

/// Page files handed out, by `outcome`: `ok`, `fallback` (the store has no
/// file for the snapshot), `refused` (token, right, name, or not found).
pub const PAGE_FILES: &str = "faultline_server_page_files_total";

/// What answering a page-file request needs.
#[derive(Debug, Clone)]
pub(crate) struct PageFiles {
    pub(crate) store: Arc<dyn SnapshotStore>,
    pub(crate) auth: Arc<Authenticator>,
}

impl PageFiles {
    /// Reads one request from `stream` (its preface already read), answers
    /// it, and closes the connection. `peer` names the client in logs.
    pub(crate) async fn serve(&self, mut stream: UnixStream, peer: &str) -> std::io::Result<()> {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await?;
        let mut body = vec![0u8; frame_len(header, MAX_PAGE_FILE_MESSAGE_BYTES)?];
        stream.read_exact(&mut body).await?;
        let req: PageFileRequest = unframe(&body)?;
        let (answer, files) = match self.open(&req).await {
            Ok((answer, files)) => (answer, files),
            Err(status) => {
                let outcome = if status.code() == tonic::Code::Unimplemented {
                    "fallback"
                } else {
                    "refused"
                };
                metrics::counter!(PAGE_FILES, "outcome" => outcome).increment(1);
                tracing::debug!(
                    "{peer}: page file of {:?} not handed over: {}",
                    req.snapshot,
                    status.message()
                );
                let answer = PageFileResponse {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    page_size: 0,
                    page_count: 0,
                    working_set: Vec::new(),
                    working_set_file: false,
                };
                stream.write_all(&frame(&answer)).await?;
                return Ok(());
            }
        };
        let bytes = frame(&answer);
        let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
        // The whole answer goes in one sendmsg with the descriptor on its
        // first byte; a fresh connection's send buffer holds it, so
        // WouldBlock is waited out only in theory.
        let mut sent = 0;
        while sent == 0 {
            stream.writable().await?;
            match stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(&bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        stream.write_all(&bytes[sent..]).await?;
        metrics::counter!(PAGE_FILES, "outcome" => "ok").increment(1);
        tracing::info!("{peer}: handed over the page file of {:?}", req.snapshot);
        Ok(())
    }

    /// Checks the request as `ReadPages` would and opens the snapshot's file,
    /// and the working set's page file after it if the store has one.
    async fn open(
        &self,
        req: &PageFileRequest,
    ) -> Result<(PageFileResponse, Vec<Arc<std::fs::File>>), tonic::Status> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(value) = &req.authorization {
            let value = value.parse().map_err(|_| {
                tonic::Status::unauthenticated("the `authorization` value is not valid metadata")
            })?;
            metadata.insert("authorization", value);
        }
        let access = self.auth.authenticate(&metadata)?;
        access.check(Right::Read, &req.snapshot)?;
        let id = SnapshotId::new(req.snapshot.clone())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let snapshot = self
            .store
            .open(&id)
            .await
            .map_err(|e| tonic::Status::from(crate::Error::from(e)))?;
        let Some(file) = snapshot.page_file() else {
            return Err(tonic::Status::unimplemented(format!(
                "{} store cannot hand out snapshot {id}'s pages as a file (object store, diff \
                 snapshot or volume); use the byte stream",
                self.store.backend()
            )));
        };
        let manifest = snapshot.manifest();
        let mut files = vec![file];
        let mut working_set = Vec::new();
        if let Some(name) = &req.working_set {
            let name = WorkingSetName::new(name.clone())
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            // The runs of the order the page file was written for, so that
            // the two agree even while the set is being recorded again.
            if let Some(pages) = snapshot.working_set_pages(&name) {
                working_set = runs(&pages.order);
                files.push(pages.file);
            } else if let Some(order) = snapshot.working_set(&name) {
                working_set = runs(&order);
            }
        }
        let answer = PageFileResponse {
            code: 0,
            message: String::new(),
            page_size: manifest.page_size.bytes(),
            page_count: manifest.page_count,
            working_set,
            working_set_file: files.len() == 2,
        };
        Ok((answer, files))
    }
}

/// A working set's pages, in their order, as runs of consecutive pages.
fn runs(pages: &[faultline_proto::PageIndex]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some((start, count)) if *start + *count == p.0 => *count += 1,
            _ => out.push((p.0, 1)),
        }
    }
    out
}
