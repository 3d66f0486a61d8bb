//! Usage reports: finished tasks summed per bucket and code revision, queue waits, a
//! project's status mix. Everything is aggregated by the database; only the sums come back.

use sqlx::Row;
use stevedore_model::Timestamp;

use super::SqliteStore;
use super::rows::{micros, timestamp, unsigned};
use crate::convert::{status_counts, usage_rows};
use crate::{CodeStats, QueueWait, Result, StatsWindow, UsageQuery, UsageRow};

pub(super) async fn usage(
    store: &SqliteStore,
    project_id: &str,
    query: &UsageQuery,
) -> Result<Vec<UsageRow>> {
    let bucket_micros = i64::from(query.bucket_secs.max(1)) * 1_000_000;
    // Aggregated first, then joined to the revisions, so each spec is read once per row of
    // sums rather than once per task. `end_time` is positive, so the integer division floors.
    let rows = sqlx::query(
        "SELECT a.bucket, a.code_id, a.code_name, a.code_rev, a.complete, a.error, a.timeout, \
         a.cancelled, a.compute_micros, r.spec FROM ( \
           SELECT (t.end_time / ?4) * ?4 AS bucket, t.code_id, t.code_name, t.code_rev, \
             SUM(t.status = 'complete') AS complete, SUM(t.status = 'error') AS error, \
             SUM(t.status = 'timeout') AS timeout, SUM(t.status = 'cancelled') AS cancelled, \
             SUM(CASE WHEN t.start_time IS NULL THEN 0 \
                 ELSE MAX(0, t.end_time - t.start_time) END) AS compute_micros \
           FROM tasks AS t \
           WHERE t.project_id = ?1 AND t.end_time IS NOT NULL \
             AND t.end_time >= ?2 AND t.end_time < ?3 \
             AND t.status IN ('complete', 'error', 'timeout', 'cancelled') \
           GROUP BY bucket, t.code_id, t.code_name, t.code_rev \
         ) AS a JOIN code_revisions AS r ON r.code_id = a.code_id AND r.rev = a.code_rev \
         ORDER BY a.bucket, a.code_name, a.code_id, a.code_rev",
    )
    .bind(project_id)
    .bind(micros(query.from))
    .bind(micros(query.to))
    .bind(bucket_micros)
    .fetch_all(&store.readers)
    .await?;
    usage_rows(&rows)
}

pub(super) async fn queue_waits(
    store: &SqliteStore,
    project_id: &str,
    from: Timestamp,
    to: Timestamp,
    limit: u32,
) -> Result<Vec<QueueWait>> {
    let rows = sqlx::query(
        "SELECT start_time, MAX(0, start_time - due_at) AS wait_micros FROM tasks \
         WHERE project_id = ?1 AND start_time IS NOT NULL AND start_time >= ?2 AND start_time < ?3 \
         ORDER BY start_time DESC LIMIT +?4",
    )
    .bind(project_id)
    .bind(micros(from))
    .bind(micros(to))
    .bind(i64::from(limit))
    .fetch_all(&store.readers)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(QueueWait {
                started_at: timestamp(row.try_get("start_time")?)?,
                wait_ms: unsigned::<u64>("wait", row.try_get("wait_micros")?)? / 1000,
            })
        })
        .collect()
}

pub(super) async fn project_counts(
    store: &SqliteStore,
    project_id: &str,
    window: StatsWindow,
) -> Result<CodeStats> {
    // Every status listed, so the count seeks the (project_id, status) index once per status.
    let rows = sqlx::query(
        "SELECT status, COUNT(*) AS n FROM tasks WHERE project_id = ?1 AND status IN \
         ('queued', 'preparing', 'running', 'complete', 'error', 'timeout', 'cancelled') \
         AND (?2 IS NULL OR updated_at >= ?2) AND (?3 IS NULL OR updated_at <= ?3) \
         GROUP BY status",
    )
    .bind(project_id)
    .bind(window.updated_from.map(micros))
    .bind(window.updated_to.map(micros))
    .fetch_all(&store.readers)
    .await?;
    status_counts(
        rows.iter()
            .map(|row| Ok((row.try_get("status")?, row.try_get("n")?)))
            .collect::<Result<Vec<_>>>()?,
    )
}
