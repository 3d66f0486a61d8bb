//! Pruning packages: the shared steps of `Store::prune_packages`, over each backend's SQL.
//!
//! ```text
//! find    revisions holding a package, older than their code's newest `keep`     (a read)
//!         or of a deleted code, pinned by no unfinished task
//! drop    their references, rechecked under the write lock, and delete the        (a transaction
//!         packages among theirs that no revision holds any more: blobs loose now    per batch)
//! sweep   packages no revision holds for another reason                           (the same)
//! delete  the chunks of given-up blobs, a few per transaction, then the blob      (many short ones)
//! ```
//!
//! Every write is a short transaction of its own (`BATCH` revisions or packages, or
//! `CHUNKS_PER_DELETE` chunks), so no other write waits long behind a pruning, and a pruning
//! stopped anywhere leaves nothing half-done that the next call does not finish.
//!
//! Why a task always finds its package: a task pins its code's latest revision when it is
//! queued, and `keep` is at least 1, so the latest revision of a live code is never pruned; a
//! revision an unfinished (queued, preparing or running) task pins is never pruned either,
//! checked in the same statement that drops it, under the same lock a queueing takes; and a
//! queueing that pins an older revision explicitly (a user's retry of an old task) checks that
//! the revision still holds its package, or fails with `StoreError::PackageRemoved`.

use async_trait::async_trait;

use super::PackagePrune;
use crate::Result;

/// A revision that holds a package, as pruning finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldPackage {
    pub(crate) code_id: String,
    pub(crate) rev: i64,
    pub(crate) sha256: String,
}

/// What pruning asks of a backend.
#[async_trait]
pub(crate) trait PruneTables: Send + Sync {
    /// Up to `limit` revisions holding a package that are older than their code's newest
    /// `keep` revisions or belong to a deleted code, and that no unfinished task pins. A read:
    /// `drop_packages` checks each again.
    async fn prunable_revisions(&self, keep: u32, limit: u32) -> Result<Vec<HeldPackage>>;
    /// One transaction: drops the package reference of each of `revisions` that is still
    /// prunable, then deletes those of their packages no revision holds any more (their blobs
    /// given up now). The revisions dropped, the packages deleted and their bytes.
    async fn drop_packages(&self, revisions: &[HeldPackage], keep: u32) -> Result<PackagePrune>;
    /// Up to `limit` packages no revision holds. A read.
    async fn unheld_packages(&self, limit: u32) -> Result<Vec<String>>;
    /// One transaction: deletes those of `packages` that no revision holds.
    async fn delete_unheld(&self, packages: &[String]) -> Result<PackagePrune>;
    /// Up to `limit` blobs given up: a write that took too long, a pruned package's. A read.
    async fn given_up_blobs(&self, limit: u32) -> Result<Vec<i64>>;
    /// Deletes up to `limit` chunks of a given-up blob; returns how many it deleted.
    async fn delete_chunks(&self, blob: i64, limit: u32) -> Result<u64>;
    /// Deletes a given-up blob that has no chunks left.
    async fn delete_blob(&self, blob: i64) -> Result<()>;
}

/// Revisions or packages changed in one transaction.
const BATCH: usize = 100;

/// Chunks (about 1 MiB each) deleted in one transaction: SQLite walks each chunk's pages to
/// free them, a few milliseconds a chunk.
const CHUNKS_PER_DELETE: u32 = 8;

/// `Store::prune_packages`: at most `max_rows` revisions dropped, packages deleted and blobs
/// emptied in one call. The caller calls again until it reports nothing done.
pub(crate) async fn prune(
    tables: &impl PruneTables,
    keep_revisions: u32,
    max_rows: u32,
) -> Result<PackagePrune> {
    let keep = keep_revisions.max(1);
    let mut done = PackagePrune::default();
    if max_rows == 0 {
        return Ok(done);
    }
    let held = tables.prunable_revisions(keep, max_rows).await?;
    for batch in held.chunks(BATCH) {
        done.add(tables.drop_packages(batch, keep).await?);
    }
    // A package a push held for a moment while its last revision was pruned is skipped then,
    // and found here once nothing holds it.
    let room = u64::from(max_rows).saturating_sub(done.packages);
    if room > 0 {
        let unheld = tables
            .unheld_packages(u32::try_from(room).unwrap_or(max_rows))
            .await?;
        for batch in unheld.chunks(BATCH) {
            done.add(tables.delete_unheld(batch).await?);
        }
    }
    for blob in tables.given_up_blobs(max_rows).await? {
        while tables.delete_chunks(blob, CHUNKS_PER_DELETE).await? > 0 {}
        tables.delete_blob(blob).await?;
    }
    Ok(done)
}

// === impl PackagePrune ===

impl PackagePrune {
    fn add(&mut self, other: PackagePrune) {
        self.revisions += other.revisions;
        self.packages += other.packages;
        self.bytes += other.bytes;
    }
}
