//! The task counts behind the metrics gauges, and the bytes of task data stored.
//!
//! They are read from `task_counts` plus `task_count_changes`, the net changes (counts, and
//! bytes of logs and payloads since 0011) each statement that changed tasks appended in its
//! own transaction (migration 0009): a scrape reads a few
//! rows whatever the number of tasks, and no write waits for another to count. The changes are
//! folded into `task_counts` at each scrape and by the rescuer's rounds, so they stay few. Only
//! the queued tasks that are not due yet are counted, apart (through `tasks_queued`): usually
//! few.

use sqlx::Row;
use sqlx::postgres::PgConnection;
use stevedore_model::Timestamp;

use super::PgStore;
use crate::convert::{micros, status, unsigned};
use crate::{DataSizes, Result, StoreGauges};

/// The first key of the advisory lock that lets one folder at a time move the changes (the
/// second is 0); an arbitrary constant like `leases::CODE_LOCK_CLASS`.
const FOLD_LOCK_CLASS: i32 = 0x5374_6463;

pub(super) async fn gauges(store: &PgStore, now: Timestamp) -> Result<StoreGauges> {
    let mut conn = store.pool.acquire().await?;
    fold_task_counts(&mut conn).await?;
    // One statement, one snapshot: a fold commits its delete and insert together, so each
    // change is read once, from one table or the other.
    let rows = sqlx::query(
        "SELECT 'count' AS kind, status, priority, sum(n)::bigint AS n FROM ( \
            SELECT status, priority, n FROM task_counts \
            UNION ALL SELECT status, priority, n FROM task_count_changes) AS c \
         WHERE status IN ('queued', 'preparing', 'running') GROUP BY status, priority \
         UNION ALL \
         SELECT 'later', 'queued', p.priority, (SELECT count(*) FROM tasks AS t \
            WHERE t.status = 'queued' AND t.priority = p.priority AND t.due_at > $1) \
         FROM (VALUES (0::smallint), (1::smallint), (2::smallint)) AS p (priority)",
    )
    .bind(micros(now))
    .fetch_all(&mut *conn)
    .await?;
    let (mut counts, mut queued_later) = (Vec::new(), Vec::new());
    for row in &rows {
        let kind: String = row.try_get("kind")?;
        let priority: u8 = unsigned("priority", i64::from(row.try_get::<i16, _>("priority")?))?;
        let n: u64 = unsigned("n", row.try_get("n")?)?;
        if kind == "later" {
            queued_later.push((priority, n));
        } else {
            let text: String = row.try_get("status")?;
            counts.push((status(&text)?, priority, n));
        }
    }
    Ok(StoreGauges::from_task_counts(&counts, &queued_later))
}

pub(super) async fn data_sizes(store: &PgStore) -> Result<DataSizes> {
    let mut conn = store.pool.acquire().await?;
    fold_task_counts(&mut conn).await?;
    // One statement, one snapshot, as for the gauges.
    let row = sqlx::query(
        "SELECT coalesce(sum(log_bytes), 0)::bigint AS log_bytes, \
         coalesce(sum(payload_bytes), 0)::bigint AS payload_bytes FROM ( \
            SELECT log_bytes, payload_bytes FROM task_counts \
            UNION ALL SELECT log_bytes, payload_bytes FROM task_count_changes) AS c",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(DataSizes {
        log_bytes: unsigned("log_bytes", row.try_get("log_bytes")?)?,
        payload_bytes: unsigned("payload_bytes", row.try_get("payload_bytes")?)?,
    })
}

/// Moves the changes appended so far (counts and bytes) into `task_counts`, in one
/// transaction. Only one server
/// folds at a time (an advisory lock, only tried: another server folding right now does it).
pub(super) async fn fold_task_counts(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(
        "WITH folder AS (SELECT pg_try_advisory_xact_lock($1, 0) AS locked), \
         moved AS (DELETE FROM task_count_changes WHERE (SELECT locked FROM folder) \
            RETURNING status, priority, n, log_bytes, payload_bytes) \
         INSERT INTO task_counts (status, priority, n, log_bytes, payload_bytes) \
         SELECT status, priority, sum(n), sum(log_bytes), sum(payload_bytes) FROM moved \
         GROUP BY status, priority \
         ON CONFLICT (status, priority) DO UPDATE SET n = task_counts.n + excluded.n, \
            log_bytes = task_counts.log_bytes + excluded.log_bytes, \
            payload_bytes = task_counts.payload_bytes + excluded.payload_bytes",
    )
    .bind(FOLD_LOCK_CLASS)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
