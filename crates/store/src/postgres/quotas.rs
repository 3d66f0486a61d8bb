//! Quotas: a project's own limits, and the counts that writes check against them.
//!
//! A write a quota limits first locks its project's row (`hold`, `FOR NO KEY UPDATE`), then
//! counts and writes: a second such write of the project, on any server, waits for the first
//! to commit and then counts what it wrote (READ COMMITTED reads a new snapshot per
//! statement). `NO KEY UPDATE` does not conflict with the `KEY SHARE` locks that foreign keys
//! take, so inserting other rows of the project never waits for it. Every such transaction
//! takes the project's lock before any other, so the lock adds no deadlock.

use sqlx::postgres::PgConnection;
use stevedore_model::{Quota, QuotaLimits, Timestamp};

use super::{BEGIN_SNAPSHOT, PgStore, finish, packages, projects};
use crate::convert::{micros, signed};
use crate::record::normalize;
use crate::{QuotaUse, Result, StoreError};

/// Locks the project's row for the rest of the transaction and returns its limits: its own
/// where it has them, else the operator's `defaults`. `StoreError::NotFound` for an unknown
/// project.
pub(super) async fn hold(
    conn: &mut PgConnection,
    defaults: &QuotaLimits,
    project_id: &str,
) -> Result<QuotaLimits> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM projects WHERE id = $1 FOR NO KEY UPDATE")
            .bind(project_id)
            .fetch_optional(&mut *conn)
            .await?;
    if found.is_none() {
        return Err(StoreError::not_found(format!("project {project_id}")));
    }
    Ok(defaults.with_overrides(&own_limits(conn, project_id).await?))
}

/// Refuses (`StoreError::QuotaExceeded`) adding `adding` to what the project holds of
/// `quota`. Call it after `hold`, in the same transaction, before the write.
pub(super) async fn check(
    conn: &mut PgConnection,
    limits: &QuotaLimits,
    quota: Quota,
    project_id: &str,
    adding: u64,
) -> Result<()> {
    if adding == 0 {
        return Ok(());
    }
    let used = count(conn, quota, project_id).await?.unwrap_or(0);
    Ok(limits.check(quota, used, adding)?)
}

/// Refuses a package the project has no room for before its bytes are written, without
/// locking: the push's transaction checks again (`check`, under `hold`), this only spares
/// writing a package that would be refused.
pub(super) async fn check_package_room(
    store: &PgStore,
    project_id: &str,
    sha256: &str,
    size: u64,
) -> Result<()> {
    let mut conn = store.pool.acquire().await?;
    projects::ensure(&mut conn, project_id).await?;
    let limits = store
        .quota_defaults
        .with_overrides(&own_limits(&mut conn, project_id).await?);
    let adding = if packages::held_by_project(&mut conn, project_id, sha256).await? {
        0
    } else {
        size
    };
    check(&mut conn, &limits, Quota::PackageBytes, project_id, adding).await
}

pub(super) async fn project_quotas(store: &PgStore, project_id: &str) -> Result<Vec<QuotaUse>> {
    // One snapshot for the limits and every count.
    let mut tx = store.pool.begin_with(BEGIN_SNAPSHOT).await?;
    let result: Result<_> = async {
        projects::ensure(&mut tx, project_id).await?;
        let own = own_limits(&mut tx, project_id).await?;
        let mut counts = Vec::with_capacity(Quota::ALL.len());
        for quota in Quota::ALL {
            counts.push((quota, count(&mut tx, quota, project_id).await?));
        }
        Ok(QuotaUse::list(&store.quota_defaults, &own, |quota| {
            counts
                .iter()
                .find(|(counted, _)| *counted == quota)
                .and_then(|(_, used)| *used)
        }))
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn quota_limits(store: &PgStore, project_id: &str) -> Result<QuotaLimits> {
    let mut conn = store.pool.acquire().await?;
    projects::ensure(&mut conn, project_id).await?;
    Ok(store
        .quota_defaults
        .with_overrides(&own_limits(&mut conn, project_id).await?))
}

pub(super) async fn set(
    store: &PgStore,
    project_id: &str,
    quota: Quota,
    limit: Option<u64>,
    now: Timestamp,
) -> Result<()> {
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        projects::ensure(&mut tx, project_id).await?;
        match limit {
            Some(limit) => {
                sqlx::query(
                    "INSERT INTO project_quotas (project_id, quota, \"limit\", updated_at) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (project_id, quota) DO UPDATE SET \"limit\" = $3, updated_at = $4",
                )
                .bind(project_id)
                .bind(quota.as_str())
                .bind(signed(limit))
                .bind(micros(normalize(now)))
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM project_quotas WHERE project_id = $1 AND quota = $2")
                    .bind(project_id)
                    .bind(quota.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(())
    }
    .await;
    finish(tx, result).await
}

async fn own_limits(conn: &mut PgConnection, project_id: &str) -> Result<Vec<(Quota, u64)>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT quota, \"limit\" FROM project_quotas WHERE project_id = $1")
            .bind(project_id)
            .fetch_all(&mut *conn)
            .await?;
    crate::convert::own_quota_limits(rows)
}

/// What the project holds of `quota`; `None` for what the store does not count.
async fn count(conn: &mut PgConnection, quota: Quota, project_id: &str) -> Result<Option<u64>> {
    let sql = match quota {
        Quota::RunningTasks => {
            "SELECT COUNT(*) FROM tasks WHERE project_id = $1 AND status IN ('preparing', 'running')"
        }
        Quota::QueuedTasks => {
            "SELECT COUNT(*) FROM tasks WHERE project_id = $1 AND status = 'queued'"
        }
        Quota::Schedules => {
            "SELECT COUNT(*) FROM schedules WHERE project_id = $1 AND status = 'scheduled'"
        }
        Quota::Codes => "SELECT COUNT(*) FROM codes WHERE project_id = $1 AND deleted_at IS NULL",
        // Revisions are never removed, so a code's latest is its count.
        Quota::RevisionsPerCode => {
            "SELECT COALESCE(MAX(latest_rev), 0)::BIGINT FROM codes \
             WHERE project_id = $1 AND deleted_at IS NULL"
        }
        // Each package the project's live revisions hold, once however many hold it.
        Quota::PackageBytes => {
            "SELECT COALESCE(SUM(p.size), 0)::BIGINT FROM packages AS p WHERE p.sha256 IN (\
             SELECT r.stored_package FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
             WHERE c.project_id = $1 AND c.deleted_at IS NULL AND r.stored_package IS NOT NULL)"
        }
        Quota::LogStreamsPerToken => return Ok(None),
    };
    let used: i64 = sqlx::query_scalar(sql)
        .bind(project_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Some(u64::try_from(used).unwrap_or(0)))
}
