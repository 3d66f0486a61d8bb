//! Retention: removing finished tasks' logs and payloads in chunks, each a short transaction
//! of its own.
//!
//! A chunk locks the next finished tasks that still hold a log (or a payload) from the partial
//! index `tasks_log_kept` (`tasks_payload_kept`), keyset by end time and id, `FOR UPDATE SKIP
//! LOCKED`: two walks at once (the leader's and a `stevedore gc`) never remove one task's bytes
//! twice nor wait for each other, and a task someone else holds is left for the next walk. The
//! task counts' trigger appends the bytes removed with the counts' changes. PostgreSQL reuses
//! the space once autovacuum has passed; the files do not shrink by themselves.

use sqlx::Row;
use stevedore_model::Timestamp;

use super::{PgStore, finish};
use crate::convert::{micros, unsigned};
use crate::record::{PruneCandidate, normalize, plan_prune, walk_start};
use crate::{PruneCursor, Result, TaskData, TaskDataPrune};

/// The next finished tasks (`$1`: ended before; `$2`, `$3`: after this end time and id; `$4`:
/// how many) that still hold a log, with its size, locked.
const LOGS_KEPT: &str = "SELECT id, end_time, log_size AS bytes FROM tasks \
     WHERE end_time < $1 AND end_time IS NOT NULL AND log_removed_at IS NULL \
     AND (end_time, id) > ($2, $3) AND status IN ('complete', 'error', 'timeout', 'cancelled') \
     ORDER BY end_time, id LIMIT $4 FOR UPDATE SKIP LOCKED";

/// The same for payloads, with their bytes.
const PAYLOADS_KEPT: &str = "SELECT id, end_time, octet_length(payload)::bigint AS bytes \
     FROM tasks \
     WHERE end_time < $1 AND end_time IS NOT NULL AND payload_removed_at IS NULL \
     AND (end_time, id) > ($2, $3) AND status IN ('complete', 'error', 'timeout', 'cancelled') \
     ORDER BY end_time, id LIMIT $4 FOR UPDATE SKIP LOCKED";

pub(super) async fn prune_task_data(
    store: &PgStore,
    data: TaskData,
    finished_before: Timestamp,
    after: Option<&PruneCursor>,
    max_rows: u32,
    now: Timestamp,
) -> Result<TaskDataPrune> {
    let now = normalize(now);
    let (after_end, after_id) = walk_start(after);
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
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
        match data {
            TaskData::Log => {
                sqlx::query("DELETE FROM task_logs WHERE task_id = ANY($1)")
                    .bind(&plan.task_ids)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE tasks SET log_removed_at = $2, version = version + 1 \
                     WHERE id = ANY($1)",
                )
                .bind(&plan.task_ids)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
            }
            TaskData::Payload => {
                sqlx::query(
                    "UPDATE tasks SET payload = ''::bytea, payload_removed_at = $2, \
                     version = version + 1 WHERE id = ANY($1)",
                )
                .bind(&plan.task_ids)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
            }
        }
        Ok(plan.prune)
    }
    .await;
    finish(tx, result).await
}
