//! Tasks: queue a batch, read and list them, cancel them, set their progress; and the queries
//! every change to a task goes through (load one under its row lock, write it back, queue its
//! retry, wake the lease loops).
//!
//! Every change to a task runs in a transaction that first locks its row (`FOR UPDATE`), so
//! two servers acting on one task take turns, and the second sees what the first wrote: that
//! is what makes a completion happen once and refuses a stale lease token.

use std::collections::HashMap;

use sqlx::postgres::PgConnection;
use sqlx::{Postgres, QueryBuilder, Row};
use stevedore_model::TaskAttempt;
use stevedore_model::{
    Event, NewTask, Quota, Task, TaskOutcome, TaskStatus, Timestamp, transition,
};

use super::codes;
use super::quotas;
use super::rows::{self, task_columns};
use super::{PgStore, finish};
use crate::convert::{limit_offset, micros, opt_micros, opt_signed, signed, unsigned};
use crate::record::{BULK_CHUNK, TaskRecord, normalize, queued_task_of_code};
use crate::{CodeCancellation, Page, Result, StoreError, TaskFilter};

/// The channel `LISTEN`ed to for wake-ups.
pub(super) const WORK_CHANNEL: &str = "stevedore_work";

pub(super) async fn enqueue(
    store: &PgStore,
    project_id: &str,
    new_tasks: &[NewTask],
    now: Timestamp,
) -> Result<Vec<Task>> {
    let now = normalize(now);
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        let limits = quotas::hold(&mut tx, &store.quota_defaults, project_id).await?;
        quotas::check(
            &mut tx,
            &limits,
            Quota::QueuedTasks,
            project_id,
            new_tasks.len() as u64,
        )
        .await?;
        let queued = insert(&mut tx, project_id, new_tasks, now).await?;
        if !queued.is_empty() {
            notify_work(&mut tx).await?;
        }
        Ok(queued)
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn get(store: &PgStore, project_id: &str, task_id: &str) -> Result<Task> {
    let mut conn = store.pool.acquire().await?;
    Ok(load(&mut conn, project_id, task_id).await?.task)
}

pub(super) async fn list(
    store: &PgStore,
    project_id: &str,
    filter: &TaskFilter,
    page: Page,
) -> Result<Vec<Task>> {
    let (limit, offset) = limit_offset(page);
    let mut query = QueryBuilder::<Postgres>::new(concat!(
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
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        query
            .push(" AND t.status = ANY(")
            .push_bind(statuses)
            .push(")");
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
        .push(" ORDER BY t.created_at DESC, t.id DESC LIMIT ")
        .push_bind(limit)
        .push(" OFFSET ")
        .push_bind(offset);
    let rows = query.build().fetch_all(&store.pool).await?;
    rows.iter()
        .map(|row| Ok(rows::task_record(row)?.task))
        .collect()
}

pub(super) async fn cancel(
    store: &PgStore,
    project_id: &str,
    task_id: &str,
    now: Timestamp,
) -> Result<Task> {
    let now = normalize(now);
    let (record, _) = store
        .change_task(Some(project_id), task_id, |record| record.cancel(now))
        .await?;
    Ok(record.task)
}

pub(super) async fn cancel_all(
    store: &PgStore,
    project_id: &str,
    code_id: &str,
    now: Timestamp,
) -> Result<CodeCancellation> {
    let now = normalize(now);
    let chunked = cancel_queued_in_chunks(store, project_id, code_id, now).await?;
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        codes::ensure(&mut tx, project_id, code_id).await?;
        let mut cancellation = cancel_code_tasks(&mut tx, code_id, now).await?;
        cancellation.cancelled += chunked;
        Ok(cancellation)
    }
    .await;
    finish(tx, result).await
}

/// Cancels a live code's queued tasks `BULK_CHUNK` at a time, each chunk a transaction of its
/// own, so that no transaction holds the locks of a whole backlog's rows (nor bloats one
/// snapshot's work). Stops when a chunk finds fewer than that; the caller's last transaction
/// (`cancel_code_tasks`) cancels what was queued meanwhile. Returns how many it cancelled.
pub(super) async fn cancel_queued_in_chunks(
    store: &PgStore,
    project_id: &str,
    code_id: &str,
    now: Timestamp,
) -> Result<u64> {
    let mut cancelled = 0;
    loop {
        let mut tx = store.pool.begin().await?;
        let result: Result<_> = async {
            codes::ensure(&mut tx, project_id, code_id).await?;
            cancel_queued(&mut tx, code_id, now, Some(BULK_CHUNK)).await
        }
        .await;
        let chunk = finish(tx, result).await?;
        cancelled += chunk;
        if chunk < BULK_CHUNK.unsigned_abs() {
            return Ok(cancelled);
        }
    }
}

pub(super) async fn set_progress(
    store: &PgStore,
    project_id: &str,
    task_id: &str,
    percent: Option<u8>,
    msg: Option<&str>,
    now: Timestamp,
) -> Result<Task> {
    let now = normalize(now);
    let (record, ()) = store
        .change_task(Some(project_id), task_id, |record| {
            record.set_user_progress(percent, msg, now)
        })
        .await?;
    Ok(record.task)
}

/// Loads a task and locks its row until the transaction ends; with `project_id`, only from
/// that project.
pub(super) async fn load_for_update(
    conn: &mut PgConnection,
    project_id: Option<&str>,
    task_id: &str,
) -> Result<TaskRecord> {
    const SQL: &str = concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.id = $1 AND ($2::text IS NULL OR t.project_id = $2) FOR UPDATE"
    );
    fetch_task(conn, SQL, project_id, task_id).await
}

/// Loads a task without locking it.
pub(super) async fn load(
    conn: &mut PgConnection,
    project_id: &str,
    task_id: &str,
) -> Result<TaskRecord> {
    const SQL: &str = concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.id = $1 AND t.project_id = $2"
    );
    fetch_task(conn, SQL, Some(project_id), task_id).await
}

/// Runs one of the task queries above: `$1` is the task id, `$2` the project.
async fn fetch_task(
    conn: &mut PgConnection,
    sql: &'static str,
    project_id: Option<&str>,
    task_id: &str,
) -> Result<TaskRecord> {
    let row = sqlx::query(sql)
        .bind(task_id)
        .bind(project_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("task {task_id}")))?;
    rows::task_record(&row)
}

/// Writes back every column a task's life changes, guarded by the version it was loaded with
/// (which cannot have moved while the caller holds the row lock), and bumps the version.
pub(super) async fn write(conn: &mut PgConnection, record: &mut TaskRecord) -> Result<()> {
    let task = &record.task;
    let written = sqlx::query(
        "UPDATE tasks SET status = $1, updated_at = $2, due_at = $3, start_time = $4, end_time = $5, \
         percent = $6, msg = $7, exit_code = $8, log_size = $9, log_truncated = $10, \
         infra_attempts = $11, cancel_requested = $12, peak_memory_bytes = $13, cpu_time_ms = $14, \
         runner_id = $15, lease_token = $16, lease_expires_at = $17, version = version + 1 \
         WHERE id = $18 AND version = $19",
    )
    .bind(task.status.as_str())
    .bind(micros(task.updated_at))
    .bind(micros(task.due_at))
    .bind(opt_micros(task.start_time))
    .bind(opt_micros(task.end_time))
    .bind(task.percent.map(i16::from))
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
        return Err(StoreError::Conflict(format!(
            "task {} changed while it was being updated; try again",
            record.task.id
        )));
    }
    record.version += 1;
    Ok(())
}

/// Queues a batch: every task or none. Each pins its code's latest revision, or the one it asks
/// for (`NewTask::code_rev`, a retry). The code rows are share-locked, so a code deleted at the
/// same moment either gets these tasks cancelled with it or refuses them.
pub(super) async fn insert(
    conn: &mut PgConnection,
    project_id: &str,
    new_tasks: &[NewTask],
    now: Timestamp,
) -> Result<Vec<Task>> {
    let mut codes: HashMap<&str, (String, u32)> = HashMap::new();
    let mut queued = Vec::with_capacity(new_tasks.len());
    for new_task in new_tasks {
        let (code_id, code_rev) = match codes.get(new_task.code_name.as_str()) {
            Some(code) => code.clone(),
            None => {
                let row = sqlx::query(
                    "SELECT id, latest_rev FROM codes \
                     WHERE project_id = $1 AND name = $2 AND deleted_at IS NULL FOR SHARE",
                )
                .bind(project_id)
                .bind(&new_task.code_name)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| StoreError::not_found(format!("code {}", new_task.code_name)))?;
                let code = (
                    row.try_get::<String, _>("id")?,
                    unsigned("codes.latest_rev", row.try_get("latest_rev")?)?,
                );
                codes.insert(&new_task.code_name, code.clone());
                code
            }
        };
        let task = queued_task_of_code(project_id, &code_id, code_rev, new_task, now)?;
        if task.code_rev != code_rev {
            super::packages::check_pinnable(conn, &task.code_name, &code_id, task.code_rev).await?;
        }
        queued.push(task);
    }
    insert_rows(conn, &queued).await?;
    Ok(queued)
}

/// Writes new queued tasks in one statement, a column per array, holding the rows of their
/// clusters until the transaction ends (`clusters::hold_for_tasks`).
pub(super) async fn insert_rows(conn: &mut PgConnection, queued: &[Task]) -> Result<()> {
    if queued.is_empty() {
        return Ok(());
    }
    let clusters: Vec<&str> = queued.iter().map(|task| task.cluster.as_str()).collect();
    super::clusters::hold_for_tasks(conn, &clusters).await?;
    let column = |get: fn(&Task) -> String| queued.iter().map(get).collect::<Vec<String>>();
    let optional = |get: fn(&Task) -> Option<String>| queued.iter().map(get).collect::<Vec<_>>();
    let number = |get: fn(&Task) -> i64| queued.iter().map(get).collect::<Vec<i64>>();
    sqlx::query(
        "INSERT INTO tasks (id, project_id, code_id, code_name, code_rev, status, priority, \
         payload, label, cluster, timeout_secs, delay_secs, created_at, updated_at, due_at, \
         retry_count, original_task_id, schedule_id) \
         SELECT id, project_id, code_id, code_name, code_rev, status, priority, payload, label, \
         cluster, timeout_secs, delay_secs, created_at, created_at, due_at, retry_count, \
         original_task_id, schedule_id \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], \
         $7::smallint[], $8::bytea[], $9::text[], $10::text[], $11::bigint[], $12::bigint[], \
         $13::bigint[], $14::bigint[], $15::bigint[], $16::text[], $17::text[]) \
         AS r(id, project_id, code_id, code_name, code_rev, status, priority, payload, label, \
         cluster, timeout_secs, delay_secs, created_at, due_at, retry_count, original_task_id, \
         schedule_id)",
    )
    .bind(column(|t| t.id.clone()))
    .bind(column(|t| t.project_id.clone()))
    .bind(column(|t| t.code_id.clone()))
    .bind(column(|t| t.code_name.clone()))
    .bind(number(|t| i64::from(t.code_rev)))
    .bind(column(|t| t.status.as_str().to_owned()))
    .bind(
        queued
            .iter()
            .map(|t| i16::from(t.priority))
            .collect::<Vec<i16>>(),
    )
    .bind(
        queued
            .iter()
            .map(|t| t.payload.as_bytes().to_vec())
            .collect::<Vec<Vec<u8>>>(),
    )
    .bind(optional(|t| t.label.clone()))
    .bind(column(|t| t.cluster.clone()))
    .bind(number(|t| i64::from(t.timeout_secs)))
    .bind(number(|t| i64::from(t.delay_secs)))
    .bind(number(|t| micros(t.created_at)))
    .bind(number(|t| micros(t.due_at)))
    .bind(number(|t| i64::from(t.retry_count)))
    .bind(optional(|t| t.original_task_id.clone()))
    .bind(optional(|t| t.schedule_id.clone()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The user retry of a task a runner just completed with `outcome`, when its pinned code
/// revision has retries left. Reads only; the caller writes the completion and the retry in one
/// transaction. A code deleted in the meantime gets none.
pub(super) async fn plan_retry(
    conn: &mut PgConnection,
    failed: &TaskRecord,
    outcome: &TaskOutcome,
    now: Timestamp,
) -> Result<Option<Task>> {
    let task = &failed.task;
    if !failed.may_retry(outcome) {
        return Ok(None);
    }
    let code = codes::load_revision(conn, &task.code_id, task.code_rev).await?;
    let Some(retry) = failed.retry(outcome, &code.spec, now) else {
        return Ok(None);
    };
    // Share-locked like `insert`, so a concurrent delete cannot miss the retry.
    let live: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM codes WHERE id = $1 AND deleted_at IS NULL FOR SHARE")
            .bind(&task.code_id)
            .fetch_optional(&mut *conn)
            .await?;
    if live.is_none() {
        return Ok(None);
    }
    Ok(Some(retry))
}

/// Cancels a code's queued tasks and asks the runners of its leased ones to cancel them.
/// Two statements, each on a fresh snapshot: a task a lease takes between them is flagged by
/// the second.
pub(super) async fn cancel_code_tasks(
    conn: &mut PgConnection,
    code_id: &str,
    now: Timestamp,
) -> Result<CodeCancellation> {
    let code_name: String = sqlx::query_scalar("SELECT name FROM codes WHERE id = $1")
        .bind(code_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("code {code_id}")))?;
    let queued = cancel_queued(&mut *conn, code_id, now, None).await?;
    let leased = sqlx::query(
        "UPDATE tasks SET cancel_requested = TRUE, updated_at = $1, version = version + 1 \
         WHERE code_id = $2 AND status IN ($3, $4) AND NOT cancel_requested",
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

/// Cancels up to `limit` queued tasks of a code (all without one); returns how many.
async fn cancel_queued(
    conn: &mut PgConnection,
    code_id: &str,
    now: Timestamp,
    limit: Option<i64>,
) -> Result<u64> {
    let cancelled = transition(TaskStatus::Queued, &Event::Cancelled)?;
    let written = sqlx::query(
        "UPDATE tasks SET status = $1, end_time = $2, updated_at = $2, msg = $3, \
         version = version + 1 WHERE status = $5 AND id IN (SELECT id FROM tasks \
         WHERE code_id = $4 AND status = $5 LIMIT $6)",
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

/// Wakes every listening server's lease loop once this transaction commits (PostgreSQL
/// delivers a notification at commit, and not at all on rollback).
pub(super) async fn notify_work(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WORK_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The task's attempts, kept by the trigger of `0012_task_attempts.sql`.
pub(super) async fn attempts(
    store: &PgStore,
    project_id: &str,
    task_id: &str,
) -> Result<Vec<TaskAttempt>> {
    let mut tx = store.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let record = load(&mut tx, project_id, task_id).await?;
    let rows: Vec<crate::rows::AttemptRow> = sqlx::query_as(
        "SELECT attempt, runner_id, leased_at, started_at, ended_at, ending, exit_code, reason \
         FROM task_attempts WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(task_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.rollback().await?;
    let mut attempts = rows
        .into_iter()
        .map(crate::rows::attempt)
        .collect::<Result<Vec<_>>>()?;
    // The open attempt's start is the task's own until the attempt ends (`0014`).
    if let Some(open) = attempts.last_mut()
        && open.ended_at.is_none()
        && open.started_at.is_none()
    {
        open.started_at = record.task.start_time;
    }
    Ok(attempts)
}
