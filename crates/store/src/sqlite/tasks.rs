//! Tasks: queue a batch, read and list them, cancel them, set their progress; and the queries
//! every change to a task goes through (load one, write it back, queue its retry).

use std::collections::HashMap;

use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, QueryBuilder, Row, Sqlite};
use stevedore_model::TaskAttempt;
use stevedore_model::{Event, NewTask, Task, TaskOutcome, TaskStatus, Timestamp, transition};

use super::codes;
use super::codes::RevisionCache;
use super::rows::{self, micros, opt_micros, opt_signed, signed, task_columns, to_json};
use super::{BEGIN_WRITE, SqliteStore};
use crate::convert::limit_offset;
use crate::record::{BULK_CHUNK, TaskRecord, normalize, queued_task_of_code};
use crate::{CodeCancellation, Page, Result, StoreError, TaskFilter};

/// Queues a batch, or nothing, with the other requests waiting to be queued
/// (`queueing`): concurrent single-task requests share one `INSERT` and one commit. Returns
/// after the commit that holds its tasks; a refusal (a quota, a missing code) writes nothing
/// of this request and leaves the others to theirs.
pub(super) async fn enqueue(
    store: &SqliteStore,
    project_id: &str,
    new_tasks: &[NewTask],
    now: Timestamp,
) -> Result<Vec<Task>> {
    super::queueing::enqueue(
        &store.writing,
        store.quota_defaults,
        project_id,
        new_tasks,
        normalize(now),
    )
    .await
}

pub(super) async fn get(store: &SqliteStore, project_id: &str, task_id: &str) -> Result<Task> {
    let mut conn = store.readers.acquire().await?;
    Ok(load(&mut conn, Some(project_id), task_id).await?.task)
}

pub(super) async fn list(
    store: &SqliteStore,
    project_id: &str,
    filter: &TaskFilter,
    page: Page,
) -> Result<Vec<Task>> {
    let (limit, offset) = limit_offset(page);
    let mut query = QueryBuilder::<Sqlite>::new(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.project_id = "
    ));
    query.push_bind(project_id);
    if let Some(code_name) = &filter.code_name {
        query
            .push(" AND t.code_name = ")
            .push_bind(code_name.as_str());
    }
    if let Some(label) = &filter.label {
        query.push(" AND t.label = ").push_bind(label.as_str());
    }
    if !filter.statuses.is_empty() {
        query.push(" AND t.status IN (");
        let mut list = query.separated(", ");
        for status in &filter.statuses {
            list.push_bind(status.as_str());
        }
        query.push(")");
    }
    if let Some(from_time) = filter.from_time {
        query
            .push(" AND t.created_at >= ")
            .push_bind(micros(from_time));
    }
    if let Some(to_time) = filter.to_time {
        query
            .push(" AND t.created_at <= ")
            .push_bind(micros(to_time));
    }
    query
        .push(" ORDER BY t.created_at DESC, t.id DESC LIMIT +")
        .push_bind(limit)
        .push(" OFFSET ")
        .push_bind(offset);
    let rows = query.build().fetch_all(&store.readers).await?;
    rows.iter()
        .map(|row| Ok(rows::task_record(row)?.task))
        .collect()
}

pub(super) async fn cancel(
    store: &SqliteStore,
    project_id: &str,
    task_id: &str,
    now: Timestamp,
) -> Result<Task> {
    let now = normalize(now);
    let (record, _) = store
        .change_task(Some(project_id), task_id, None, move |record| {
            record.cancel(now)
        })
        .await?;
    Ok(record.task)
}

pub(super) async fn cancel_all(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    now: Timestamp,
) -> Result<CodeCancellation> {
    let now = normalize(now);
    let chunked = cancel_queued_in_chunks(store, project_id, code_id, now).await?;
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    codes::ensure(&mut tx, project_id, code_id).await?;
    let mut cancellation = cancel_code_tasks(&mut tx, code_id, now).await?;
    tx.commit().await?;
    cancellation.cancelled += chunked;
    Ok(cancellation)
}

/// Cancels a live code's queued tasks `BULK_CHUNK` at a time, each chunk a write transaction
/// of its own that takes the writer anew, so that other writes wait for one chunk at most,
/// never for the whole backlog. Stops when a chunk finds fewer than that; the caller's last
/// transaction (`cancel_code_tasks`) cancels what was queued meanwhile. Returns how many it
/// cancelled.
pub(super) async fn cancel_queued_in_chunks(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    now: Timestamp,
) -> Result<u64> {
    let mut cancelled = 0;
    loop {
        let mut writer = store.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        codes::ensure(&mut tx, project_id, code_id).await?;
        let chunk = cancel_queued(&mut tx, code_id, now, BULK_CHUNK).await?;
        tx.commit().await?;
        drop(writer);
        cancelled += chunk;
        if chunk < BULK_CHUNK.unsigned_abs() {
            return Ok(cancelled);
        }
    }
}

pub(super) async fn set_progress(
    store: &SqliteStore,
    project_id: &str,
    task_id: &str,
    percent: Option<u8>,
    msg: Option<&str>,
    now: Timestamp,
) -> Result<Task> {
    let now = normalize(now);
    let msg = msg.map(str::to_owned);
    let (record, ()) = store
        .change_task(Some(project_id), task_id, None, move |record| {
            record.set_user_progress(percent, msg.as_deref(), now)
        })
        .await?;
    Ok(record.task)
}

/// Loads a task; with `project_id`, only from that project.
pub(super) async fn load(
    conn: &mut SqliteConnection,
    project_id: Option<&str>,
    task_id: &str,
) -> Result<TaskRecord> {
    let row = match project_id {
        Some(project_id) => {
            sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks AS t WHERE t.id = ?1 AND t.project_id = ?2"
            ))
            .bind(task_id)
            .bind(project_id)
            .fetch_optional(&mut *conn)
            .await?
        }
        None => {
            sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks AS t WHERE t.id = ?1"
            ))
            .bind(task_id)
            .fetch_optional(&mut *conn)
            .await?
        }
    };
    let row = row.ok_or_else(|| StoreError::not_found(format!("task {task_id}")))?;
    rows::task_record(&row)
}

/// Writes back every column a task's life changes, provided the stored row still has the
/// version the record was loaded with; bumps the version. Returns whether the row matched.
pub(super) async fn write(conn: &mut SqliteConnection, record: &mut TaskRecord) -> Result<bool> {
    let task = &record.task;
    let written = sqlx::query(
        "UPDATE tasks SET status = ?1, updated_at = ?2, due_at = ?3, start_time = ?4, end_time = ?5, \
         percent = ?6, msg = ?7, exit_code = ?8, log_size = ?9, log_truncated = ?10, \
         infra_attempts = ?11, cancel_requested = ?12, peak_memory_bytes = ?13, cpu_time_ms = ?14, \
         runner_id = ?15, lease_token = ?16, lease_expires_at = ?17, version = ?19 + 1 \
         WHERE id = ?18 AND version = ?19",
    )
    .bind(task.status.as_str())
    .bind(micros(task.updated_at))
    .bind(micros(task.due_at))
    .bind(opt_micros(task.start_time))
    .bind(opt_micros(task.end_time))
    .bind(task.percent.map(i64::from))
    .bind(task.msg.as_deref())
    .bind(task.exit_code)
    .bind(signed(task.log_size))
    .bind(record.log_truncated)
    .bind(i64::from(task.infra_attempts))
    .bind(task.cancel_requested)
    .bind(opt_signed(task.peak_memory_bytes))
    .bind(opt_signed(task.cpu_time_ms))
    .bind(task.runner_id.as_deref())
    .bind(record.lease_token)
    .bind(opt_micros(record.lease_expires_at))
    .bind(&task.id)
    .bind(record.version)
    .execute(&mut *conn)
    .await?;
    if written.rows_affected() != 1 {
        return Ok(false);
    }
    record.version += 1;
    Ok(true)
}

/// Writes a record that was loaded under the current write lock: the row cannot have changed
/// unless a second process writes to the database.
pub(super) async fn write_loaded(
    conn: &mut SqliteConnection,
    record: &mut TaskRecord,
) -> Result<()> {
    if write(conn, record).await? {
        Ok(())
    } else {
        Err(StoreError::Conflict(format!(
            "task {} changed while it was being updated; try again",
            record.task.id
        )))
    }
}

/// Queues a batch: every task or none. Each pins its code's latest revision, or the one it asks
/// for (`NewTask::code_rev`, a retry).
pub(super) async fn insert(
    conn: &mut SqliteConnection,
    project_id: &str,
    new_tasks: &[NewTask],
    now: Timestamp,
) -> Result<Vec<Task>> {
    let queued = plan_tasks(
        conn,
        &mut CodeLookups::default(),
        project_id,
        new_tasks,
        now,
    )
    .await?;
    insert_rows(conn, &queued).await?;
    Ok(queued)
}

/// Codes looked up by (project, name) for the tasks being queued: their id and latest
/// revision, valid for the transaction that looked them up.
#[derive(Default)]
pub(super) struct CodeLookups {
    found: HashMap<(String, String), (String, u32)>,
}

/// The queued tasks `new_tasks` become, each of its code's latest revision or the one it
/// pins; reads only. A missing code or revision refuses the whole list.
pub(super) async fn plan_tasks(
    conn: &mut SqliteConnection,
    codes: &mut CodeLookups,
    project_id: &str,
    new_tasks: &[NewTask],
    now: Timestamp,
) -> Result<Vec<Task>> {
    let mut queued = Vec::with_capacity(new_tasks.len());
    for new_task in new_tasks {
        let key = (project_id.to_owned(), new_task.code_name.clone());
        let (code_id, code_rev) = match codes.found.get(&key) {
            Some(code) => code.clone(),
            None => {
                let row = sqlx::query(
                    "SELECT id, latest_rev FROM codes WHERE project_id = ?1 AND name = ?2 AND deleted_at IS NULL",
                )
                .bind(project_id)
                .bind(&new_task.code_name)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| StoreError::not_found(format!("code {}", new_task.code_name)))?;
                let latest: i64 = row.try_get("latest_rev")?;
                let code = (
                    row.try_get::<String, _>("id")?,
                    u32::try_from(latest)
                        .map_err(|_| StoreError::Corrupt(format!("revision {latest}")))?,
                );
                codes.found.insert(key, code.clone());
                code
            }
        };
        let task = queued_task_of_code(project_id, &code_id, code_rev, new_task, now)?;
        if task.code_rev != code_rev {
            super::packages::check_pinnable(conn, &task.code_name, &code_id, task.code_rev).await?;
        }
        queued.push(task);
    }
    Ok(queued)
}

/// The user retry of a task a runner just completed with `outcome`, when its pinned code
/// revision has retries left (`stevedore_model::automatic_retry` decides). Reads only: the
/// caller writes the completion and then the retry (`insert_rows`) in one transaction. The
/// retry keeps the failed task's code id, so a code deleted in the meantime gets none (its
/// queued tasks were cancelled with it), and a new code that took its name is never run.
pub(super) async fn plan_retry(
    conn: &mut SqliteConnection,
    revisions: &mut RevisionCache,
    failed: &TaskRecord,
    outcome: &TaskOutcome,
    now: Timestamp,
) -> Result<Option<Task>> {
    let task = &failed.task;
    if !failed.may_retry(outcome) {
        return Ok(None);
    }
    let code = revisions.get(conn, &task.code_id, task.code_rev).await?;
    let Some(retry) = failed.retry(outcome, &code.spec, now) else {
        return Ok(None);
    };
    let live: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM codes WHERE id = ?1 AND deleted_at IS NULL")
            .bind(&task.code_id)
            .fetch_optional(&mut *conn)
            .await?;
    if live.is_none() {
        return Ok(None);
    }
    Ok(Some(retry))
}

/// Writes new queued tasks.
pub(super) async fn insert_rows(conn: &mut SqliteConnection, queued: &[Task]) -> Result<()> {
    if queued.is_empty() {
        return Ok(());
    }
    // One statement for the whole batch: a round trip per task to SQLite's worker thread cost
    // more than SQLite reading the rows back out of JSON.
    let rows: Vec<InsertRow<'_>> = queued.iter().map(InsertRow::from).collect();
    sqlx::query(
        "INSERT INTO tasks (id, project_id, code_id, code_name, code_rev, status, priority, payload, \
         label, cluster, timeout_secs, delay_secs, created_at, updated_at, due_at, retry_count, \
         original_task_id, schedule_id) \
         SELECT value ->> 'id', value ->> 'project_id', value ->> 'code_id', value ->> 'code_name', \
         value ->> 'code_rev', value ->> 'status', value ->> 'priority', value ->> 'payload', \
         value ->> 'label', value ->> 'cluster', value ->> 'timeout_secs', value ->> 'delay_secs', \
         value ->> 'created_at', value ->> 'created_at', value ->> 'due_at', value ->> 'retry_count', \
         value ->> 'original_task_id', value ->> 'schedule_id' \
         FROM json_each(?1)",
    )
    .bind(to_json(&rows)?)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A new task's row, as `insert` hands it to SQLite.
#[derive(serde::Serialize)]
struct InsertRow<'a> {
    id: &'a str,
    project_id: &'a str,
    code_id: &'a str,
    code_name: &'a str,
    code_rev: u32,
    status: &'static str,
    priority: u8,
    payload: &'a str,
    label: Option<&'a str>,
    cluster: &'a str,
    timeout_secs: u32,
    delay_secs: u32,
    created_at: i64,
    due_at: i64,
    retry_count: u32,
    original_task_id: Option<&'a str>,
    schedule_id: Option<&'a str>,
}

impl<'a> From<&'a Task> for InsertRow<'a> {
    fn from(task: &'a Task) -> Self {
        InsertRow {
            id: &task.id,
            project_id: &task.project_id,
            code_id: &task.code_id,
            code_name: &task.code_name,
            code_rev: task.code_rev,
            status: task.status.as_str(),
            priority: task.priority,
            payload: &task.payload,
            label: task.label.as_deref(),
            cluster: &task.cluster,
            timeout_secs: task.timeout_secs,
            delay_secs: task.delay_secs,
            created_at: micros(task.created_at),
            due_at: micros(task.due_at),
            retry_count: task.retry_count,
            original_task_id: task.original_task_id.as_deref(),
            schedule_id: task.schedule_id.as_deref(),
        }
    }
}

/// Cancels a code's queued tasks and asks the runners of its leased ones to cancel them.
/// Returns how many tasks it touched.
pub(super) async fn cancel_code_tasks(
    conn: &mut SqliteConnection,
    code_id: &str,
    now: Timestamp,
) -> Result<CodeCancellation> {
    let code_name: String = sqlx::query_scalar("SELECT name FROM codes WHERE id = ?1")
        .bind(code_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("code {code_id}")))?;
    let queued = cancel_queued(&mut *conn, code_id, now, -1).await?;
    let leased = sqlx::query(
        "UPDATE tasks SET cancel_requested = 1, updated_at = ?1, version = version + 1 \
         WHERE status IN (?3, ?4) AND code_id = ?2 AND cancel_requested = 0",
    )
    .bind(micros(now))
    .bind(code_id)
    .bind(TaskStatus::Preparing.as_str())
    .bind(TaskStatus::Running.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(CodeCancellation {
        code_name,
        cancelled: queued,
        cancel_requested: leased.rows_affected(),
    })
}

/// Cancels up to `limit` queued tasks of a code (all with a negative `limit`), in the order of
/// the index on (status, code); returns how many.
async fn cancel_queued(
    conn: &mut SqliteConnection,
    code_id: &str,
    now: Timestamp,
    limit: i64,
) -> Result<u64> {
    let cancelled = transition(TaskStatus::Queued, &Event::Cancelled)?;
    let written = sqlx::query(
        "UPDATE tasks SET status = ?1, end_time = ?2, updated_at = ?2, msg = ?3, version = version + 1 \
         WHERE id IN (SELECT id FROM tasks WHERE status = ?5 AND code_id = ?4 LIMIT +?6)",
    )
    .bind(cancelled.as_str())
    .bind(micros(now))
    .bind(TaskOutcome::Cancelled.message())
    .bind(code_id)
    .bind(TaskStatus::Queued.as_str())
    .bind(limit)
    .execute(&mut *conn)
    .await?;
    Ok(written.rows_affected())
}

/// The task's attempts, kept by the triggers of `0012_task_attempts.sql`.
pub(super) async fn attempts(
    store: &SqliteStore,
    project_id: &str,
    task_id: &str,
) -> Result<Vec<TaskAttempt>> {
    let mut conn = store.readers.acquire().await?;
    // One snapshot: the task must be the project's.
    let mut tx = conn.begin().await?;
    load(&mut tx, Some(project_id), task_id).await?;
    let rows: Vec<crate::rows::AttemptRow> = sqlx::query_as(
        "SELECT attempt, runner_id, leased_at, started_at, ended_at, ending, exit_code, reason \
         FROM task_attempts WHERE task_id = ?1 ORDER BY attempt",
    )
    .bind(task_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.rollback().await?;
    rows.into_iter().map(crate::rows::attempt).collect()
}
