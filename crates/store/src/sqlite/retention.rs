//! Retention: removing finished tasks' logs and payloads in chunks, each a short write
//! transaction of its own, so that other writes go in between.
//!
//! A chunk reads the next finished tasks that still hold a log (or a payload) from the partial
//! index `tasks_log_kept` (`tasks_payload_kept`), keyset by end time and id, removes what they
//! hold and marks them, which takes them out of that index. The task counts' triggers take the
//! bytes off `task_counts` in the same transaction.
//!
//! The database keeps the pages it frees on its free list and reuses them for what is written
//! next; the file does not shrink (`auto_vacuum` is off, as SQLite creates a database, and
//! turning it on for an existing one needs a full `VACUUM`). Retention keeps the file from
//! growing; making it smaller is an offline `VACUUM`.

use sqlx::{Connection, Row};
use stevedore_model::Timestamp;

use super::BEGIN_WRITE;
use super::SqliteStore;
use super::writer::Writer;
use crate::convert::{micros, to_json, unsigned};
use crate::record::{PruneCandidate, normalize, plan_prune, walk_start};
use crate::{PruneCursor, Result, TaskData, TaskDataPrune};

/// The next finished tasks (`?1`: ended before; `?2`, `?3`: after this end time and id; `?4`:
/// how many) that still hold a log, with its size. A finished task is one with an end time;
/// the statuses are checked all the same, behind a unary `+` that keeps the planner on the
/// walk's index (the status index would read every finished task and sort them).
const LOGS_KEPT: &str = "SELECT id, end_time, log_size AS bytes FROM tasks \
     WHERE end_time < ?1 AND log_removed_at IS NULL AND (end_time, id) > (?2, ?3) \
     AND +status IN ('complete', 'error', 'timeout', 'cancelled') \
     ORDER BY end_time, id LIMIT +?4";

/// The same for payloads, with their bytes.
const PAYLOADS_KEPT: &str = "SELECT id, end_time, octet_length(payload) AS bytes FROM tasks \
     WHERE end_time < ?1 AND payload_removed_at IS NULL AND (end_time, id) > (?2, ?3) \
     AND +status IN ('complete', 'error', 'timeout', 'cancelled') \
     ORDER BY end_time, id LIMIT +?4";

pub(super) async fn prune_task_data(
    store: &SqliteStore,
    data: TaskData,
    finished_before: Timestamp,
    after: Option<&PruneCursor>,
    max_rows: u32,
    now: Timestamp,
) -> Result<TaskDataPrune> {
    let now = normalize(now);
    let (after_end, after_id) = walk_start(after);
    let mut writer = store.writer().await?;
    let Writer { conn, .. } = &mut *writer;
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let rows = sqlx::query(match data {
        TaskData::Log => LOGS_KEPT,
        TaskData::Payload => PAYLOADS_KEPT,
    })
    .bind(micros(finished_before))
    .bind(after_end)
    .bind(after_id)
    .bind(i64::from(max_rows))
    .fetch_all(&mut *tx)
    .await?;
    let mut candidates = Vec::with_capacity(rows.len());
    for row in &rows {
        candidates.push(PruneCandidate {
            task_id: row.try_get("id")?,
            end_time: row.try_get("end_time")?,
            bytes: unsigned("bytes", row.try_get("bytes")?)?,
        });
    }
    let plan = plan_prune(candidates, max_rows)?;
    if plan.task_ids.is_empty() {
        return Ok(plan.prune);
    }
    let ids = to_json(&plan.task_ids)?;
    match data {
        TaskData::Log => {
            sqlx::query("DELETE FROM task_logs WHERE task_id IN (SELECT value FROM json_each(?1))")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE tasks SET log_removed_at = ?2, version = version + 1 \
                 WHERE id IN (SELECT value FROM json_each(?1))",
            )
            .bind(&ids)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        }
        TaskData::Payload => {
            sqlx::query(
                "UPDATE tasks SET payload = '', payload_removed_at = ?2, version = version + 1 \
                 WHERE id IN (SELECT value FROM json_each(?1))",
            )
            .bind(&ids)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(plan.prune)
}
