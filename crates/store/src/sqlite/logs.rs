//! Task logs: appends up to the cap, and reads from any offset with the task's state.

use sqlx::Connection;
use sqlx::sqlite::SqliteConnection;
use stevedore_model::Timestamp;

use super::leases::LeaseCache;
use super::rows::{self, signed};
use super::tasks;
use super::writer::{ChangeFailed, Writer};
use super::{BEGIN_WRITE, SqliteStore};
use crate::record::{LogAppendPlan, normalize, plan_log_append};
use crate::rows::log_bytes;
use crate::{LogSlice, Result, StoreError};

pub(super) async fn get(store: &SqliteStore, project_id: &str, task_id: &str) -> Result<Vec<u8>> {
    let mut conn = store.readers.acquire().await?;
    // One snapshot: the size and the chunks of a log cut back for its marker meanwhile would
    // not match, nor those of a log removed meanwhile.
    let mut tx = conn.begin().await?;
    if log_state(&mut tx, project_id, task_id).await?.size == 0 {
        return Err(StoreError::not_found(format!("log of task {task_id}")));
    }
    let chunks: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT bytes FROM task_logs WHERE task_id = ?1 ORDER BY seq")
            .bind(task_id)
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(chunks.concat())
}

pub(super) async fn get_since(
    store: &SqliteStore,
    project_id: &str,
    task_id: &str,
    offset: u64,
    max_bytes: u32,
) -> Result<LogSlice> {
    let mut conn = store.readers.acquire().await?;
    let state = log_state(&mut conn, project_id, task_id).await?;
    if offset >= state.size || max_bytes == 0 {
        return Ok(state);
    }
    // The state and the bytes come from one snapshot: a log cut back for its truncation
    // marker between two separate reads would otherwise mix old and new bytes.
    let mut tx = conn.begin().await?;
    let mut slice = log_state(&mut tx, project_id, task_id).await?;
    let end = slice.size.min(offset.saturating_add(u64::from(max_bytes)));
    if offset < end {
        slice.bytes = read_log(&mut tx, task_id, offset, end).await?;
    }
    tx.commit().await?;
    Ok(slice)
}

/// Appends in a transaction of its own when the writer is free; when other writers wait for it,
/// in the group transaction they share (`SqliteStore::write_in_group`), so that a busy runner's
/// log appends share commits with its heartbeats, starts and completions.
pub(super) async fn append(
    store: &SqliteStore,
    task_id: &str,
    token: i64,
    bytes: &[u8],
    cap: u64,
    now: Timestamp,
) -> Result<u64> {
    let now = normalize(now);
    let writer = store.writing.lock_writer().await?;
    let mut writer = match store.writing.alone(writer) {
        Ok(writer) => writer,
        Err(writer) => {
            let (task_id, bytes) = (task_id.to_owned(), bytes.to_vec());
            return store
                .write_in_group(writer, move |writer| {
                    Box::pin(async move {
                        let Writer { conn, leases, .. } = writer;
                        append_in(conn, leases, &task_id, token, &bytes, cap, now).await
                    })
                })
                .await;
        }
    };
    let Writer { conn, leases, .. } = &mut *writer;
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let size = append_in(&mut tx, leases, task_id, token, bytes, cap, now)
        .await
        .map_err(|failed| failed.error)?;
    tx.commit().await?;
    Ok(size)
}

/// The append inside whatever transaction the writer is in: the task taken from the lease
/// cache (written guarded by its version) or else read, its lease checked, the log cut back
/// when it reaches its cap, the chunks inserted. Returns the log's size.
async fn append_in(
    conn: &mut SqliteConnection,
    leases: &mut LeaseCache,
    task_id: &str,
    token: i64,
    bytes: &[u8],
    cap: u64,
    now: Timestamp,
) -> Result<u64, ChangeFailed> {
    let wrote = |error: StoreError| ChangeFailed { error, wrote: true };
    // An append that changes nothing is answered from the row, which confirms the lease.
    if let Some(mut record) = leases.take(task_id)
        && record.check_lease(token).is_ok()
        && let Some(plan) = plan_log_append(record.task.log_size, record.log_truncated, bytes, cap)
    {
        record.apply_log_plan(&plan, now);
        if tasks::write(conn, &mut record).await? {
            write_chunks(conn, task_id, &plan).await.map_err(wrote)?;
            leases.remember(&record);
            return Ok(record.task.log_size);
        }
    }
    let mut record = tasks::load(conn, None, task_id).await?;
    record.check_lease(token)?;
    let Some(plan) = plan_log_append(record.task.log_size, record.log_truncated, bytes, cap) else {
        return Ok(record.task.log_size);
    };
    record.apply_log_plan(&plan, now);
    tasks::write_loaded(conn, &mut record)
        .await
        .map_err(wrote)?;
    write_chunks(conn, task_id, &plan).await.map_err(wrote)?;
    leases.remember(&record);
    Ok(record.task.log_size)
}

/// A planned append's rows: the log cut back first when it reached its cap, then its chunks.
async fn write_chunks(
    conn: &mut SqliteConnection,
    task_id: &str,
    plan: &LogAppendPlan,
) -> Result<()> {
    if let Some(keep) = plan.truncate_to {
        let keep = signed(keep);
        sqlx::query("DELETE FROM task_logs WHERE task_id = ?1 AND seq >= ?2")
            .bind(task_id)
            .bind(keep)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "UPDATE task_logs SET bytes = substr(bytes, 1, ?2 - seq) \
             WHERE task_id = ?1 AND seq < ?2 AND seq + length(bytes) > ?2",
        )
        .bind(task_id)
        .bind(keep)
        .execute(&mut *conn)
        .await?;
    }
    for (seq, chunk) in &plan.chunks {
        sqlx::query("INSERT INTO task_logs (task_id, seq, bytes) VALUES (?1, ?2, ?3)")
            .bind(task_id)
            .bind(signed(*seq))
            .bind(chunk.as_slice())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The log size and state of a task in `project_id`, as a slice without bytes: one lookup by
/// primary key, so a follower that finds nothing new pays for nothing more.
async fn log_state(
    conn: &mut SqliteConnection,
    project_id: &str,
    task_id: &str,
) -> Result<LogSlice> {
    let row = sqlx::query(
        "SELECT id, status, percent, msg, log_size, log_truncated, log_removed_at FROM tasks \
         WHERE id = ?1 AND project_id = ?2",
    )
    .bind(task_id)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("task {task_id}")))?;
    rows::log_state(&row)
}

/// Bytes `start..end` of a task's log, which must be stored. One range of the primary key: from
/// the chunk holding `start` (the last one at or before it, found by a seek) to `end`.
async fn read_log(
    conn: &mut SqliteConnection,
    task_id: &str,
    start: u64,
    end: u64,
) -> Result<Vec<u8>> {
    let chunks = sqlx::query(
        "SELECT seq, bytes FROM task_logs WHERE task_id = ?1 \
         AND seq >= (SELECT coalesce(max(seq), 0) FROM task_logs WHERE task_id = ?1 AND seq <= ?2) \
         AND seq < ?3 ORDER BY seq",
    )
    .bind(task_id)
    .bind(signed(start))
    .bind(signed(end))
    .fetch_all(&mut *conn)
    .await?;
    log_bytes(&chunks, task_id, start, end)
}
