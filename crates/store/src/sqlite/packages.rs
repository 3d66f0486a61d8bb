//! Packages: their blobs, chunks and pruning, in SQLite's SQL (the shared steps are in
//! `crate::package`). Every write here is one statement or one short transaction on the
//! writer; a package's chunks go in one statement each, so other writes pass between them.

use async_trait::async_trait;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use stevedore_model::Timestamp;

use super::rows::micros;
use super::{BEGIN_WRITE, SqliteStore, quotas};
use crate::package::prune::{HeldPackage, PruneTables};
use crate::package::{BlobTables, HeldRow, WRITE_GRACE_MICROS};
use crate::{PackagePrune, PackageStream, Result, RevisionPackage, StoreError};

/// The database's clock in microseconds since the epoch: loose blobs are timed by it alone.
macro_rules! db_now {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)"
    };
}

/// Statuses of a task that still needs its revision's package.
macro_rules! unfinished {
    () => {
        "('queued', 'preparing', 'running')"
    };
}

/// The revision's package in a push's transaction: the stored package of its checksum, or
/// the blob written for it published as that package. `None` when neither is there (the
/// package was pruned since the push looked): the caller rolls back and writes it.
pub(super) async fn attach(
    conn: &mut SqliteConnection,
    project_id: &str,
    package: RevisionPackage<'_>,
    blob: Option<i64>,
    now: Timestamp,
) -> Result<Option<(String, u64)>> {
    let file = match package {
        RevisionPackage::Stored { sha256 } => {
            let size: Option<i64> = sqlx::query_scalar(
                "SELECT p.size FROM packages AS p WHERE p.sha256 = ?1 AND EXISTS (\
                 SELECT 1 FROM code_revisions AS r JOIN codes AS c ON c.id = r.code_id \
                 WHERE r.stored_package = p.sha256 AND c.project_id = ?2 AND c.deleted_at IS NULL)",
            )
            .bind(sha256)
            .bind(project_id)
            .fetch_optional(&mut *conn)
            .await?;
            let size = size.ok_or_else(|| StoreError::not_found(format!("package {sha256}")))?;
            return Ok(Some((sha256.to_owned(), unsigned_size(size)?)));
        }
        RevisionPackage::File(file) => file,
    };
    let stored: Option<i64> = sqlx::query_scalar("SELECT size FROM packages WHERE sha256 = ?1")
        .bind(&file.sha256)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(size) = stored {
        // Stored already (by another push meanwhile, when this one wrote a blob): this
        // push's blob is not needed.
        if let Some(blob) = blob {
            give_up(&mut *conn, blob).await?;
        }
        return Ok(Some((file.sha256.clone(), unsigned_size(size)?)));
    }
    let Some(blob) = blob else {
        return Ok(None);
    };
    sqlx::query("INSERT INTO packages (sha256, size, blob, created_at) VALUES (?1, ?2, ?3, ?4)")
        .bind(&file.sha256)
        .bind(super::rows::signed(file.size))
        .bind(blob)
        .bind(micros(now))
        .execute(&mut *conn)
        .await?;
    publish(conn, blob).await?;
    Ok(Some((file.sha256.clone(), file.size)))
}

/// Refuses a task that pins `rev` explicitly (a user's retry of an old task) when the
/// revision's package was pruned: it could never run.
pub(super) async fn check_pinnable(
    conn: &mut SqliteConnection,
    code_name: &str,
    code_id: &str,
    rev: u32,
) -> Result<()> {
    let removed: Option<bool> = sqlx::query_scalar(
        "SELECT package_sha256 IS NOT NULL AND stored_package IS NULL FROM code_revisions \
         WHERE code_id = ?1 AND rev = ?2",
    )
    .bind(code_id)
    .bind(i64::from(rev))
    .fetch_optional(&mut *conn)
    .await?;
    if removed == Some(true) {
        return Err(StoreError::PackageRemoved {
            code: code_name.to_owned(),
            rev,
        });
    }
    Ok(())
}

/// Whether a live revision of the project holds the package: then a revision more adds
/// nothing to the project's package bytes.
pub(super) async fn held_by_project(
    conn: &mut SqliteConnection,
    project_id: &str,
    sha256: &str,
) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM code_revisions AS r JOIN codes AS c ON c.id = r.code_id \
         WHERE r.stored_package = ?1 AND c.project_id = ?2 AND c.deleted_at IS NULL)",
    )
    .bind(sha256)
    .bind(project_id)
    .fetch_one(&mut *conn)
    .await?)
}

/// A revision's package read chunk by chunk from the read connections, one query a chunk.
pub(super) fn stream(store: &SqliteStore, held: HeldRow) -> Result<PackageStream> {
    let (size, blob) = held.package()?;
    let readers = store.readers.clone();
    Ok(PackageStream::chunked(size, move |seq| {
        let readers = readers.clone();
        async move {
            Ok(
                sqlx::query_scalar("SELECT bytes FROM package_chunks WHERE blob = ?1 AND seq = ?2")
                    .bind(blob)
                    .bind(seq)
                    .fetch_optional(&readers)
                    .await?,
            )
        }
    }))
}

/// A row's columns of a revision's package, as `held_columns!` selects them.
pub(super) fn held_row(row: &sqlx::sqlite::SqliteRow, code: String, rev: i64) -> Result<HeldRow> {
    let size: Option<i64> = row.try_get("held_size")?;
    let blob: Option<i64> = row.try_get("held_blob")?;
    Ok(HeldRow {
        code,
        rev,
        recorded: row.try_get("package_sha256")?,
        stored: size.zip(blob),
    })
}

pub(super) async fn package_bytes(store: &SqliteStore) -> Result<u64> {
    let bytes: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(size), 0) FROM packages")
        .fetch_one(&store.readers)
        .await?;
    unsigned_size(bytes)
}

/// Makes a blob being written no longer loose, refused once its write was given up.
async fn publish(conn: &mut SqliteConnection, blob: i64) -> Result<()> {
    let published = sqlx::query(concat!(
        "UPDATE package_blobs SET loose_until = NULL WHERE id = ?1 AND loose_until > ",
        db_now!()
    ))
    .bind(blob)
    .execute(&mut *conn)
    .await?;
    if published.rows_affected() == 0 {
        return Err(given_up_write());
    }
    Ok(())
}

async fn give_up(conn: &mut SqliteConnection, blob: i64) -> Result<()> {
    sqlx::query(concat!(
        "UPDATE package_blobs SET loose_until = ",
        db_now!(),
        " WHERE id = ?1 AND loose_until IS NOT NULL"
    ))
    .bind(blob)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes those of `packages` no revision holds, their blobs given up now.
async fn delete_unheld_in(
    conn: &mut SqliteConnection,
    packages: &[String],
) -> Result<PackagePrune> {
    let deleted = sqlx::query(
        "DELETE FROM packages WHERE sha256 IN (SELECT value FROM json_each(?1)) \
         AND NOT EXISTS (SELECT 1 FROM code_revisions AS r WHERE r.stored_package = packages.sha256) \
         RETURNING size, blob",
    )
    .bind(json_list(packages)?)
    .fetch_all(&mut *conn)
    .await?;
    let mut done = PackagePrune::default();
    let mut blobs = Vec::with_capacity(deleted.len());
    for row in &deleted {
        done.packages += 1;
        done.bytes += unsigned_size(row.try_get("size")?)?;
        blobs.push(row.try_get::<i64, _>("blob")?);
    }
    sqlx::query(concat!(
        "UPDATE package_blobs SET loose_until = ",
        db_now!(),
        " WHERE id IN (SELECT value FROM json_each(?1))"
    ))
    .bind(json_list(&blobs)?)
    .execute(&mut *conn)
    .await?;
    Ok(done)
}

fn json_list<T: serde::Serialize>(values: &[T]) -> Result<String> {
    serde_json::to_string(values)
        .map_err(|error| StoreError::Corrupt(format!("a list of keys: {error}")))
}

fn unsigned_size(size: i64) -> Result<u64> {
    crate::convert::unsigned("packages.size", size)
}

fn given_up_write() -> StoreError {
    StoreError::PackageFile(
        "writing the package took longer than an hour and was given up; push it again".to_owned(),
    )
}

// === impl BlobTables for SqliteStore ===

#[async_trait]
impl BlobTables for SqliteStore {
    async fn begin_blob(&self) -> Result<i64> {
        let mut writer = self.writer().await?;
        Ok(sqlx::query_scalar(concat!(
            "INSERT INTO package_blobs (loose_until) VALUES (",
            db_now!(),
            " + ?1) RETURNING id"
        ))
        .bind(WRITE_GRACE_MICROS)
        .fetch_one(&mut writer.conn)
        .await?)
    }

    async fn put_chunk(&self, blob: i64, seq: i64, bytes: Vec<u8>) -> Result<()> {
        let mut writer = self.writer().await?;
        let inserted = sqlx::query(concat!(
            "INSERT INTO package_chunks (blob, seq, bytes) SELECT ?1, ?2, ?3 WHERE EXISTS (\
             SELECT 1 FROM package_blobs WHERE id = ?1 AND loose_until > ",
            db_now!(),
            ")"
        ))
        .bind(blob)
        .bind(seq)
        .bind(bytes)
        .execute(&mut writer.conn)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(given_up_write());
        }
        Ok(())
    }

    async fn give_up_blob(&self, blob: i64) -> Result<()> {
        let mut writer = self.writer().await?;
        give_up(&mut writer.conn, blob).await
    }

    async fn is_stored(&self, sha256: &str) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM packages WHERE sha256 = ?1)")
                .bind(sha256)
                .fetch_one(&self.readers)
                .await?,
        )
    }

    async fn check_room(&self, project_id: &str, sha256: &str, size: u64) -> Result<()> {
        quotas::check_package_room(self, project_id, sha256, size).await
    }
}

// === impl PruneTables for SqliteStore ===

#[async_trait]
impl PruneTables for SqliteStore {
    async fn prunable_revisions(&self, keep: u32, limit: u32) -> Result<Vec<HeldPackage>> {
        let rows = sqlx::query(concat!(
            "SELECT r.code_id, r.rev, r.stored_package FROM code_revisions AS r \
             JOIN codes AS c ON c.id = r.code_id \
             WHERE r.stored_package IS NOT NULL \
             AND (c.deleted_at IS NOT NULL OR r.rev <= c.latest_rev - ?1) \
             AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.status IN ",
            unfinished!(),
            " AND t.code_id = r.code_id AND t.code_rev = r.rev) LIMIT +?2"
        ))
        .bind(i64::from(keep))
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(HeldPackage {
                    code_id: row.try_get("code_id")?,
                    rev: row.try_get("rev")?,
                    sha256: row.try_get("stored_package")?,
                })
            })
            .collect()
    }

    async fn drop_packages(&self, revisions: &[HeldPackage], keep: u32) -> Result<PackagePrune> {
        let keys: Vec<(&str, i64)> = revisions
            .iter()
            .map(|held| (held.code_id.as_str(), held.rev))
            .collect();
        let mut packages: Vec<String> = revisions.iter().map(|held| held.sha256.clone()).collect();
        packages.sort();
        packages.dedup();
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        // Checked again under the writer: still old (or its code deleted), and pinned by no
        // task that is not finished, whatever was queued since the revisions were found.
        let dropped = sqlx::query(concat!(
            "UPDATE code_revisions SET stored_package = NULL WHERE rowid IN (\
             SELECT r.rowid FROM json_each(?1) AS k JOIN code_revisions AS r \
             ON r.code_id = json_extract(k.value, '$[0]') AND r.rev = json_extract(k.value, '$[1]')) \
             AND stored_package IS NOT NULL \
             AND EXISTS (SELECT 1 FROM codes AS c WHERE c.id = code_revisions.code_id \
             AND (c.deleted_at IS NOT NULL OR code_revisions.rev <= c.latest_rev - ?2)) \
             AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.status IN ",
            unfinished!(),
            " AND t.code_id = code_revisions.code_id AND t.code_rev = code_revisions.rev)"
        ))
        .bind(json_list(&keys)?)
        .bind(i64::from(keep))
        .execute(&mut *tx)
        .await?;
        let mut done = delete_unheld_in(&mut tx, &packages).await?;
        tx.commit().await?;
        done.revisions = dropped.rows_affected();
        Ok(done)
    }

    async fn unheld_packages(&self, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT sha256 FROM packages AS p WHERE NOT EXISTS (\
             SELECT 1 FROM code_revisions AS r WHERE r.stored_package = p.sha256) LIMIT +?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?)
    }

    async fn delete_unheld(&self, packages: &[String]) -> Result<PackagePrune> {
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        let done = delete_unheld_in(&mut tx, packages).await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn given_up_blobs(&self, limit: u32) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(concat!(
            "SELECT id FROM package_blobs WHERE loose_until <= ",
            db_now!(),
            " ORDER BY loose_until LIMIT +?1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?)
    }

    async fn delete_chunks(&self, blob: i64, limit: u32) -> Result<u64> {
        let mut writer = self.writer().await?;
        let deleted = sqlx::query(concat!(
            "DELETE FROM package_chunks WHERE blob = ?1 AND seq IN (\
             SELECT seq FROM package_chunks WHERE blob = ?1 ORDER BY seq LIMIT +?2) \
             AND EXISTS (SELECT 1 FROM package_blobs WHERE id = ?1 AND loose_until <= ",
            db_now!(),
            ")"
        ))
        .bind(blob)
        .bind(i64::from(limit))
        .execute(&mut writer.conn)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn delete_blob(&self, blob: i64) -> Result<()> {
        let mut writer = self.writer().await?;
        sqlx::query(concat!(
            "DELETE FROM package_blobs WHERE id = ?1 AND loose_until <= ",
            db_now!(),
            " AND NOT EXISTS (SELECT 1 FROM package_chunks WHERE blob = ?1)"
        ))
        .bind(blob)
        .execute(&mut writer.conn)
        .await?;
        Ok(())
    }
}
