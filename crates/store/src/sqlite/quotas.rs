//! Quotas: a project's own limits, and the counts that writes check against them.
//!
//! A check runs on the writer inside the transaction of the write it guards (`BEGIN
//! IMMEDIATE`), so the count it reads cannot change before that write commits: two requests
//! can never pass a limit together. Queued tasks are a counter that triggers keep (one row
//! read per enqueue, whatever the backlog); the other counts read indexes.

use sqlx::Connection;
use sqlx::sqlite::SqliteConnection;
use stevedore_model::{Quota, QuotaLimits, Timestamp};

use super::rows::{micros, signed};
use super::{BEGIN_WRITE, SqliteStore, packages, projects};
use crate::record::normalize;
use crate::{QuotaUse, Result};

/// The project's limits: its own where it has them, else the operator's `defaults`.
pub(super) async fn limits(
    conn: &mut SqliteConnection,
    defaults: &QuotaLimits,
    project_id: &str,
) -> Result<QuotaLimits> {
    Ok(defaults.with_overrides(&own_limits(conn, project_id).await?))
}

/// Refuses (`StoreError::QuotaExceeded`) adding `adding` to what the project holds of
/// `quota`. Call it inside the write transaction, before the write.
pub(super) async fn check(
    conn: &mut SqliteConnection,
    limits: &QuotaLimits,
    quota: Quota,
    project_id: &str,
    adding: u64,
) -> Result<()> {
    if adding == 0 {
        return Ok(());
    }
    let used = used(conn, quota, project_id).await?;
    Ok(limits.check(quota, used, adding)?)
}

/// What the project holds of `quota` (0 for what the store does not count).
pub(super) async fn used(
    conn: &mut SqliteConnection,
    quota: Quota,
    project_id: &str,
) -> Result<u64> {
    Ok(count(conn, quota, project_id).await?.unwrap_or(0))
}

/// Refuses a package the project has no room for before its bytes are written, on a read
/// connection: the push's transaction checks again (`check`), this only spares writing a
/// package that would be refused.
pub(super) async fn check_package_room(
    store: &SqliteStore,
    project_id: &str,
    sha256: &str,
    size: u64,
) -> Result<()> {
    let mut conn = store.readers.acquire().await?;
    projects::ensure(&mut conn, project_id).await?;
    let limits = limits(&mut conn, &store.quota_defaults, project_id).await?;
    let adding = if packages::held_by_project(&mut conn, project_id, sha256).await? {
        0
    } else {
        size
    };
    check(&mut conn, &limits, Quota::PackageBytes, project_id, adding).await
}

pub(super) async fn project_quotas(store: &SqliteStore, project_id: &str) -> Result<Vec<QuotaUse>> {
    let mut conn = store.readers.acquire().await?;
    // One snapshot for the limits and every count.
    let mut tx = conn.begin().await?;
    projects::ensure(&mut tx, project_id).await?;
    let own = own_limits(&mut tx, project_id).await?;
    let mut counts = Vec::with_capacity(Quota::ALL.len());
    for quota in Quota::ALL {
        counts.push((quota, count(&mut tx, quota, project_id).await?));
    }
    tx.rollback().await?;
    Ok(QuotaUse::list(&store.quota_defaults, &own, |quota| {
        counts
            .iter()
            .find(|(counted, _)| *counted == quota)
            .and_then(|(_, used)| *used)
    }))
}

pub(super) async fn quota_limits(store: &SqliteStore, project_id: &str) -> Result<QuotaLimits> {
    let mut conn = store.readers.acquire().await?;
    projects::ensure(&mut conn, project_id).await?;
    limits(&mut conn, &store.quota_defaults, project_id).await
}

pub(super) async fn set(
    store: &SqliteStore,
    project_id: &str,
    quota: Quota,
    limit: Option<u64>,
    now: Timestamp,
) -> Result<()> {
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    projects::ensure(&mut tx, project_id).await?;
    match limit {
        Some(limit) => {
            sqlx::query(
                "INSERT INTO project_quotas (project_id, quota, \"limit\", updated_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (project_id, quota) DO UPDATE SET \"limit\" = ?3, updated_at = ?4",
            )
            .bind(project_id)
            .bind(quota.as_str())
            .bind(signed(limit))
            .bind(micros(normalize(now)))
            .execute(&mut *tx)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM project_quotas WHERE project_id = ?1 AND quota = ?2")
                .bind(project_id)
                .bind(quota.as_str())
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn own_limits(conn: &mut SqliteConnection, project_id: &str) -> Result<Vec<(Quota, u64)>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT quota, \"limit\" FROM project_quotas WHERE project_id = ?1")
            .bind(project_id)
            .fetch_all(&mut *conn)
            .await?;
    crate::convert::own_quota_limits(rows)
}

/// What the project holds of `quota`; `None` for what the store does not count.
async fn count(conn: &mut SqliteConnection, quota: Quota, project_id: &str) -> Result<Option<u64>> {
    let sql = match quota {
        Quota::RunningTasks => {
            "SELECT COUNT(*) FROM tasks WHERE project_id = ?1 AND status IN ('preparing', 'running')"
        }
        // Kept by triggers on `tasks` (`0007_quotas.sql`): one row, whatever the backlog.
        Quota::QueuedTasks => {
            "SELECT COALESCE((SELECT queued FROM project_queued_tasks WHERE project_id = ?1), 0)"
        }
        Quota::Schedules => {
            "SELECT COUNT(*) FROM schedules WHERE project_id = ?1 AND status = 'scheduled'"
        }
        Quota::Codes => "SELECT COUNT(*) FROM codes WHERE project_id = ?1 AND deleted_at IS NULL",
        // Revisions are never removed, so a code's latest is its count.
        Quota::RevisionsPerCode => {
            "SELECT COALESCE(MAX(latest_rev), 0) FROM codes \
             WHERE project_id = ?1 AND deleted_at IS NULL"
        }
        // Each package the project's live revisions hold, once however many hold it.
        Quota::PackageBytes => {
            "SELECT COALESCE(SUM(p.size), 0) FROM packages AS p WHERE p.sha256 IN (\
             SELECT r.stored_package FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
             WHERE c.project_id = ?1 AND c.deleted_at IS NULL AND r.stored_package IS NOT NULL)"
        }
        Quota::LogStreamsPerToken => return Ok(None),
    };
    let used: i64 = sqlx::query_scalar(sql)
        .bind(project_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Some(u64::try_from(used).unwrap_or(0)))
}
