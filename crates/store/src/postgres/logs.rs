//! Task logs: appends up to the cap, and reads from any offset with the task's state from
//! one snapshot.

use sqlx::postgres::PgConnection;
use stevedore_model::Timestamp;

use super::batch::LeasedChange;
use super::rows;
use super::{BEGIN_SNAPSHOT, PgStore, finish};
use crate::convert::signed;
use crate::record::normalize;
use crate::rows::log_bytes;
use crate::{LogSlice, Result, StoreError};

pub(super) async fn get(store: &PgStore, project_id: &str, task_id: &str) -> Result<Vec<u8>> {
    let mut tx = store.pool.begin_with(BEGIN_SNAPSHOT).await?;
    let result: Result<_> = async {
        if log_state(&mut tx, project_id, task_id).await?.size == 0 {
            return Err(StoreError::not_found(format!("log of task {task_id}")));
        }
        let chunks: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT bytes FROM task_logs WHERE task_id = $1 ORDER BY seq")
                .bind(task_id)
                .fetch_all(&mut *tx)
                .await?;
        Ok(chunks.concat())
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn get_since(
    store: &PgStore,
    project_id: &str,
    task_id: &str,
    offset: u64,
    max_bytes: u32,
) -> Result<LogSlice> {
    // The state and the bytes come from one snapshot: a log cut back for its truncation
    // marker between two separate reads would otherwise mix old and new bytes, and bytes
    // written after a terminal status was read would pass the final size.
    let mut tx = store.pool.begin_with(BEGIN_SNAPSHOT).await?;
    let result: Result<_> = async {
        let mut slice = log_state(&mut tx, project_id, task_id).await?;
        let end = slice.size.min(offset.saturating_add(u64::from(max_bytes)));
        if offset < end {
            slice.bytes = read_log(&mut tx, task_id, offset, end).await?;
        }
        Ok(slice)
    }
    .await;
    finish(tx, result).await
}

/// Appends through the store's batches of runner writes (`batch`): the bytes are inserted
/// in the statement or the transaction that writes the task's new log size.
pub(super) async fn append(
    store: &PgStore,
    task_id: &str,
    token: i64,
    bytes: &[u8],
    cap: u64,
    now: Timestamp,
) -> Result<u64> {
    let change = LeasedChange::AppendLog {
        bytes: bytes.to_vec(),
        cap,
    };
    let changed = store
        .change_leased(task_id, token, change, normalize(now))
        .await?;
    Ok(changed.task.log_size)
}

/// The log size and state of a task in `project_id`, as a slice without bytes.
async fn log_state(
    conn: &mut PgConnection,
    project_id: &str,
    task_id: &str,
) -> Result<crate::LogSlice> {
    let row = sqlx::query(
        "SELECT id, status, percent::bigint AS percent, msg, log_size, log_truncated, \
         log_removed_at FROM tasks WHERE id = $1 AND project_id = $2",
    )
    .bind(task_id)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("task {task_id}")))?;
    rows::log_state(&row)
}

/// Bytes `start..end` of a task's log, which must be stored: from the chunk holding `start` to
/// `end`, one range of the primary key.
async fn read_log(conn: &mut PgConnection, task_id: &str, start: u64, end: u64) -> Result<Vec<u8>> {
    let chunks = sqlx::query(
        "SELECT seq, bytes FROM task_logs WHERE task_id = $1 \
         AND seq >= (SELECT coalesce(max(seq), 0) FROM task_logs WHERE task_id = $1 AND seq <= $2) \
         AND seq < $3 ORDER BY seq",
    )
    .bind(task_id)
    .bind(signed(start))
    .bind(signed(end))
    .fetch_all(&mut *conn)
    .await?;
    log_bytes(&chunks, task_id, start, end)
}
