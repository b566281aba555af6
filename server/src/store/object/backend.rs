//! The object store behind the store traits ([`SnapshotStore`],
//! [`Snapshot`], [`SnapshotWrite`]): the object backend's errors become the
//! store's, whose codes the service answers with. A store that does not
//! answer (after retries) is Unavailable; bytes that do not match their
//! name, or a chunk a manifest names that is not there, are corrupt
//! (DataLoss); never wrong bytes.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use faultline_proto::{Manifest, PageIndex, PageRange, SnapshotId, WorkingSetName};

use super::io::ObjectError;
use super::writer::{ChunkStats, ObjectWriteError, ObjectWriter};
use super::{
    ObjectListError, ObjectOpenError, ObjectRecordError, ObjectSnapshot, ObjectSnapshotStore,
};
use crate::store::{
    CreateError, ListError, OpenError, ReadError, RecordError, Snapshot, SnapshotSpec,
    SnapshotStore, SnapshotSummary, SnapshotWrite,
};

impl From<ObjectOpenError> for OpenError {
    fn from(e: ObjectOpenError) -> Self {
        match e {
            ObjectOpenError::NotFound(id) => Self::NotFound(id),
            ObjectOpenError::Corrupt { snapshot, reason } => Self::Corrupt { snapshot, reason },
            ObjectOpenError::Store { snapshot, source } => match source {
                ObjectError::Corrupt { .. } | ObjectError::NotFound { .. } => Self::Corrupt {
                    snapshot,
                    reason: source.to_string(),
                },
                other => Self::Unavailable {
                    snapshot,
                    reason: other.to_string(),
                },
            },
        }
    }
}

impl From<ObjectWriteError> for CreateError {
    fn from(e: ObjectWriteError) -> Self {
        match e {
            ObjectWriteError::AlreadyExists(id) => Self::AlreadyExists(id),
            ObjectWriteError::Order(e) => Self::Order(e),
            e @ ObjectWriteError::Store { .. } => Self::Unavailable {
                reason: e.to_string(),
            },
        }
    }
}

impl From<ObjectRecordError> for RecordError {
    fn from(e: ObjectRecordError) -> Self {
        match e {
            ObjectRecordError::Open(e) => Self::Open(e.into()),
            ObjectRecordError::Invalid(e) => e,
            ObjectRecordError::Store(e) => Self::Unavailable {
                reason: e.to_string(),
            },
        }
    }
}

#[async_trait::async_trait]
impl SnapshotStore for ObjectSnapshotStore {
    async fn list(&self) -> Result<Vec<SnapshotSummary>, ListError> {
        ObjectSnapshotStore::list(self).await.map_err(|e| match e {
            ObjectListError::Store(source) => ListError::Unavailable {
                reason: source.to_string(),
            },
            ObjectListError::Open(e) => ListError::Open(e.into()),
        })
    }

    async fn open(&self, id: &SnapshotId) -> Result<Arc<dyn Snapshot>, OpenError> {
        Ok(ObjectSnapshotStore::open(self, id).await?)
    }

    async fn create(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWrite>, CreateError> {
        let writer = ObjectSnapshotStore::create(self, spec).await?;
        Ok(Box::new(ObjectWrite {
            writer,
            report: self.last_write.clone(),
        }))
    }

    async fn record_working_set(
        &self,
        id: &SnapshotId,
        name: &WorkingSetName,
        ranges: &[PageRange],
    ) -> Result<u64, RecordError> {
        Ok(ObjectSnapshotStore::record_working_set(self, id, name, ranges).await?)
    }
}

#[async_trait::async_trait]
impl Snapshot for ObjectSnapshot {
    fn manifest(&self) -> Arc<Manifest> {
        ObjectSnapshot::manifest(self)
    }

    async fn read(&self, range: PageRange) -> Result<Bytes, ReadError> {
        ObjectSnapshot::read(self, range)
            .await
            .map_err(|e| read_error(self.id(), e))
    }

    fn working_set(&self, name: &WorkingSetName) -> Option<Arc<Vec<PageIndex>>> {
        ObjectSnapshot::working_set(self, name)
    }
}

/// A chunk that does not match its name, or is missing, is data lost; a
/// store that does not answer is unavailable.
fn read_error(snapshot: &SnapshotId, e: ObjectError) -> ReadError {
    match e {
        ObjectError::Corrupt { .. } | ObjectError::NotFound { .. } => ReadError::Corrupt {
            snapshot: snapshot.clone(),
            reason: e.to_string(),
        },
        other => ReadError::Unavailable {
            snapshot: snapshot.clone(),
            reason: other.to_string(),
        },
    }
}

/// An [`ObjectWriter`] behind [`SnapshotWrite`].
#[derive(Debug)]
struct ObjectWrite {
    writer: ObjectWriter,
    report: Arc<Mutex<Option<(SnapshotId, ChunkStats)>>>,
}

#[async_trait::async_trait]
impl SnapshotWrite for ObjectWrite {
    fn spec(&self) -> &SnapshotSpec {
        self.writer.spec()
    }

    fn received(&self) -> u64 {
        self.writer.received()
    }

    async fn write(&mut self, data: Bytes) -> Result<(), CreateError> {
        Ok(self.writer.write(&data).await?)
    }

    async fn finish(self: Box<Self>) -> Result<SnapshotSummary, CreateError> {
        let (summary, stats) = self.writer.finish().await?;
        *self.report.lock().expect("store lock poisoned") = Some((summary.name.clone(), stats));
        Ok(summary)
    }
}
