//! Packages: their blobs, chunks and pruning, in PostgreSQL's SQL (the shared steps are in
//! `crate::package`). A package's chunks go in one statement each, in no transaction of the
//! push's.
//!
//! Locks keep pushes and pruning apart without either waiting long: a push takes the package
//! row it references `FOR KEY SHARE` (as its revision's foreign key will), and pruning locks
//! what it changes `FOR UPDATE SKIP LOCKED`, skipping what a push or a queueing holds, before
//! it checks, in a statement of its own (a fresh snapshot), that nothing holds it. A queueing
//! that pins an older revision takes the revision's row `FOR KEY SHARE` and checks that it
//! still holds its package.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgConnection;
use stevedore_model::Timestamp;

use super::{PgStore, finish, quotas};
use crate::convert::{micros, signed, unsigned};
use crate::package::prune::{HeldPackage, PruneTables};
use crate::package::{BlobTables, HeldRow, WRITE_GRACE_MICROS};
use crate::{PackagePrune, PackageStream, Result, RevisionPackage, StoreError};

/// The database's clock in microseconds since the epoch: loose blobs are timed by it alone.
macro_rules! db_now {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT"
    };
}

/// Statuses of a task that still needs its revision's package.
macro_rules! unfinished {
    () => {
        "('queued', 'preparing', 'running')"
    };
}

/// How often a push looks again for a package another push stored as it tried to.
const ATTACH_ATTEMPTS: usize = 3;

/// The revision's package in a push's transaction: the stored package of its checksum (held
/// `FOR KEY SHARE` until the transaction ends, so pruning passes it by), or the blob written
/// for it published as that package. `None` when neither is there (the package was pruned
/// since the push looked): the caller rolls back and writes it.
pub(super) async fn attach(
    conn: &mut PgConnection,
    project_id: &str,
    package: RevisionPackage<'_>,
    blob: Option<i64>,
    now: Timestamp,
) -> Result<Option<(String, u64)>> {
    let file = match package {
        RevisionPackage::Stored { sha256 } => {
            let size: Option<i64> = sqlx::query_scalar(
                "SELECT p.size FROM packages AS p WHERE p.sha256 = $1 AND EXISTS (\
                 SELECT 1 FROM code_revisions AS r JOIN codes AS c ON c.id = r.code_id \
                 WHERE r.stored_package = p.sha256 AND c.project_id = $2 AND c.deleted_at IS NULL) \
                 FOR KEY SHARE OF p",
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
    for _ in 0..ATTACH_ATTEMPTS {
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT size FROM packages WHERE sha256 = $1 FOR KEY SHARE")
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
        let inserted = sqlx::query(
            "INSERT INTO packages (sha256, size, blob, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(&file.sha256)
        .bind(signed(file.size))
        .bind(blob)
        .bind(micros(now))
        .execute(&mut *conn)
        .await?;
        if inserted.rows_affected() == 1 {
            publish(conn, blob).await?;
            return Ok(Some((file.sha256.clone(), file.size)));
        }
        // Another push stored the same package as this one tried: take theirs.
    }
    Err(StoreError::Conflict(format!(
        "the package {} was stored and removed while this push stored it; push again",
        file.sha256
    )))
}

/// Refuses a task that pins `rev` explicitly (a user's retry of an old task) when the
/// revision's package was pruned: it could never run. Holds the revision's row until the
/// transaction ends, so pruning passes it by.
pub(super) async fn check_pinnable(
    conn: &mut PgConnection,
    code_name: &str,
    code_id: &str,
    rev: u32,
) -> Result<()> {
    let row = sqlx::query(
        "SELECT package_sha256, stored_package FROM code_revisions \
         WHERE code_id = $1 AND rev = $2 FOR KEY SHARE",
    )
    .bind(code_id)
    .bind(i64::from(rev))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = row {
        let recorded: Option<String> = row.try_get("package_sha256")?;
        let stored: Option<String> = row.try_get("stored_package")?;
        if recorded.is_some() && stored.is_none() {
            return Err(StoreError::PackageRemoved {
                code: code_name.to_owned(),
                rev,
            });
        }
    }
    Ok(())
}

/// Whether a live revision of the project holds the package: then a revision more adds
/// nothing to the project's package bytes.
pub(super) async fn held_by_project(
    conn: &mut PgConnection,
    project_id: &str,
    sha256: &str,
) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM code_revisions AS r JOIN codes AS c ON c.id = r.code_id \
         WHERE r.stored_package = $1 AND c.project_id = $2 AND c.deleted_at IS NULL)",
    )
    .bind(sha256)
    .bind(project_id)
    .fetch_one(&mut *conn)
    .await?)
}

/// A revision's package read chunk by chunk from the pool, one query a chunk.
pub(super) fn stream(store: &PgStore, held: HeldRow) -> Result<PackageStream> {
    let (size, blob) = held.package()?;
    let pool = store.pool.clone();
    Ok(PackageStream::chunked(size, move |seq| {
        let pool = pool.clone();
        async move {
            Ok(
                sqlx::query_scalar("SELECT bytes FROM package_chunks WHERE blob = $1 AND seq = $2")
                    .bind(blob)
                    .bind(i32::try_from(seq).unwrap_or(i32::MAX))
                    .fetch_optional(&pool)
                    .await?,
            )
        }
    }))
}

/// A row's columns of a revision's package, as `held_columns!` selects them.
pub(super) fn held_row(row: &sqlx::postgres::PgRow, code: String, rev: i64) -> Result<HeldRow> {
    let size: Option<i64> = row.try_get("held_size")?;
    let blob: Option<i64> = row.try_get("held_blob")?;
    Ok(HeldRow {
        code,
        rev,
        recorded: row.try_get("package_sha256")?,
        stored: size.zip(blob),
    })
}

pub(super) async fn package_bytes(store: &PgStore) -> Result<u64> {
    let bytes: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(size), 0)::BIGINT FROM packages")
        .fetch_one(&store.pool)
        .await?;
    unsigned_size(bytes)
}

/// Makes a blob being written no longer loose, refused once its write was given up.
async fn publish(conn: &mut PgConnection, blob: i64) -> Result<()> {
    let published = sqlx::query(concat!(
        "UPDATE package_blobs SET loose_until = NULL WHERE id = $1 AND loose_until > ",
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

async fn give_up(conn: &mut PgConnection, blob: i64) -> Result<()> {
    sqlx::query(concat!(
        "UPDATE package_blobs SET loose_until = ",
        db_now!(),
        " WHERE id = $1 AND loose_until IS NOT NULL"
    ))
    .bind(blob)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes those of `packages` no revision holds, their blobs given up now. Skips a package
/// a push holds (`FOR KEY SHARE`) at the moment; `unheld_packages` finds it later.
async fn delete_unheld_in(conn: &mut PgConnection, packages: &[String]) -> Result<PackagePrune> {
    let locked: Vec<String> = sqlx::query_scalar(
        "SELECT sha256 FROM packages WHERE sha256 = ANY($1) FOR UPDATE SKIP LOCKED",
    )
    .bind(packages)
    .fetch_all(&mut *conn)
    .await?;
    let deleted = sqlx::query(
        "DELETE FROM packages AS p WHERE p.sha256 = ANY($1) \
         AND NOT EXISTS (SELECT 1 FROM code_revisions AS r WHERE r.stored_package = p.sha256) \
         RETURNING p.size, p.blob",
    )
    .bind(&locked)
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
        " WHERE id = ANY($1)"
    ))
    .bind(&blobs)
    .execute(&mut *conn)
    .await?;
    Ok(done)
}

fn unsigned_size(size: i64) -> Result<u64> {
    unsigned("packages.size", size)
}

fn given_up_write() -> StoreError {
    StoreError::PackageFile(
        "writing the package took longer than an hour and was given up; push it again".to_owned(),
    )
}

// === impl BlobTables for PgStore ===

#[async_trait]
impl BlobTables for PgStore {
    async fn begin_blob(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(concat!(
            "INSERT INTO package_blobs (loose_until) VALUES (",
            db_now!(),
            " + $1) RETURNING id"
        ))
        .bind(WRITE_GRACE_MICROS)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn put_chunk(&self, blob: i64, seq: i64, bytes: Vec<u8>) -> Result<()> {
        let inserted = sqlx::query(concat!(
            "INSERT INTO package_chunks (blob, seq, bytes) SELECT $1, $2, $3 WHERE EXISTS (\
             SELECT 1 FROM package_blobs WHERE id = $1 AND loose_until > ",
            db_now!(),
            ")"
        ))
        .bind(blob)
        .bind(i32::try_from(seq).map_err(|_| {
            StoreError::PackageFile(format!("a package of more than {} chunks", i32::MAX))
        })?)
        .bind(bytes)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(given_up_write());
        }
        Ok(())
    }

    async fn give_up_blob(&self, blob: i64) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        give_up(&mut conn, blob).await
    }

    async fn is_stored(&self, sha256: &str) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM packages WHERE sha256 = $1)")
                .bind(sha256)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn check_room(&self, project_id: &str, sha256: &str, size: u64) -> Result<()> {
        quotas::check_package_room(self, project_id, sha256, size).await
    }
}

// === impl PruneTables for PgStore ===

#[async_trait]
impl PruneTables for PgStore {
    async fn prunable_revisions(&self, keep: u32, limit: u32) -> Result<Vec<HeldPackage>> {
        let rows = sqlx::query(concat!(
            "SELECT r.code_id, r.rev, r.stored_package FROM code_revisions AS r \
             JOIN codes AS c ON c.id = r.code_id \
             WHERE r.stored_package IS NOT NULL \
             AND (c.deleted_at IS NOT NULL OR r.rev <= c.latest_rev - $1) \
             AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.code_id = r.code_id \
             AND t.status IN ",
            unfinished!(),
            " AND t.code_rev = r.rev) LIMIT $2"
        ))
        .bind(i64::from(keep))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        let code_ids: Vec<&str> = revisions.iter().map(|held| held.code_id.as_str()).collect();
        let revs: Vec<i64> = revisions.iter().map(|held| held.rev).collect();
        let mut packages: Vec<String> = revisions.iter().map(|held| held.sha256.clone()).collect();
        packages.sort();
        packages.dedup();
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            // Rows a queueing holds (`check_pinnable`, a task's foreign key) are skipped; the
            // rest are ours until the commit, and checked again in a statement of their own,
            // which sees every task committed before it.
            let locked = sqlx::query(
                "SELECT code_id, rev FROM code_revisions \
                 WHERE (code_id, rev) IN (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[])) \
                 AND stored_package IS NOT NULL FOR UPDATE SKIP LOCKED",
            )
            .bind(&code_ids)
            .bind(&revs)
            .fetch_all(&mut *tx)
            .await?;
            let locked_ids: Vec<String> = locked
                .iter()
                .map(|row| row.try_get("code_id"))
                .collect::<Result<_, _>>()?;
            let locked_revs: Vec<i64> = locked
                .iter()
                .map(|row| row.try_get("rev"))
                .collect::<Result<_, _>>()?;
            let dropped = sqlx::query(concat!(
                "UPDATE code_revisions AS r SET stored_package = NULL FROM codes AS c \
                 WHERE (r.code_id, r.rev) IN (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[])) \
                 AND c.id = r.code_id AND r.stored_package IS NOT NULL \
                 AND (c.deleted_at IS NOT NULL OR r.rev <= c.latest_rev - $3) \
                 AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.code_id = r.code_id \
                 AND t.status IN ",
                unfinished!(),
                " AND t.code_rev = r.rev)"
            ))
            .bind(&locked_ids)
            .bind(&locked_revs)
            .bind(i64::from(keep))
            .execute(&mut *tx)
            .await?;
            let mut done = delete_unheld_in(&mut tx, &packages).await?;
            done.revisions = dropped.rows_affected();
            Ok(done)
        }
        .await;
        finish(tx, result).await
    }

    async fn unheld_packages(&self, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT sha256 FROM packages AS p WHERE NOT EXISTS (\
             SELECT 1 FROM code_revisions AS r WHERE r.stored_package = p.sha256) LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_unheld(&self, packages: &[String]) -> Result<PackagePrune> {
        let mut tx = self.pool.begin().await?;
        let result = delete_unheld_in(&mut tx, packages).await;
        finish(tx, result).await
    }

    async fn given_up_blobs(&self, limit: u32) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(concat!(
            "SELECT id FROM package_blobs WHERE loose_until <= ",
            db_now!(),
            " ORDER BY loose_until LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_chunks(&self, blob: i64, limit: u32) -> Result<u64> {
        let deleted = sqlx::query(concat!(
            "DELETE FROM package_chunks WHERE blob = $1 AND seq IN (\
             SELECT seq FROM package_chunks WHERE blob = $1 ORDER BY seq LIMIT $2) \
             AND EXISTS (SELECT 1 FROM package_blobs WHERE id = $1 AND loose_until <= ",
            db_now!(),
            ")"
        ))
        .bind(blob)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn delete_blob(&self, blob: i64) -> Result<()> {
        sqlx::query(concat!(
            "DELETE FROM package_blobs WHERE id = $1 AND loose_until <= ",
            db_now!(),
            " AND NOT EXISTS (SELECT 1 FROM package_chunks WHERE blob = $1)"
        ))
        .bind(blob)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
