//! The task queries: load a task under its row lock and write it back, queue a batch, cancel a
//! code's tasks, read a log, and the lease transaction.
//!
//! Every change to a task runs in a transaction that first locks its row (`FOR UPDATE`), so
//! two servers acting on one task take turns, and the second sees what the first wrote: that
//! is what makes a completion happen once and refuses a stale lease token.

use std::collections::HashMap;

use chrono::Duration;
use sqlx::Row;
use sqlx::postgres::PgConnection;
use stevedore_model::{
    CodeRevision, Event, NewTask, Task, TaskOutcome, TaskStatus, Timestamp, automatic_retry,
    transition,
};

use super::rows::{self, revision_columns, task_columns};
use crate::convert::{micros, opt_micros, opt_signed, signed, unsigned};
use crate::record::{TaskRecord, queued_task};
use crate::{CodeCancellation, Lease, LeaseRequest, LeasedTask, Result, StoreError};

/// The channel `LISTEN`ed to for wake-ups.
pub(super) const WORK_CHANNEL: &str = "stevedore_work";

/// The first key of the advisory locks that serialize leasing per code (the second is a hash
/// of the code id): an arbitrary constant, so stevedore's locks stay apart from any other
/// application's on the same database.
const CODE_LOCK_CLASS: i32 = 0x5374_6476;

/// The least number of candidates the lease query fetches, so that a few tasks of a full code
/// do not cost a query each.
const MIN_CANDIDATES: usize = 16;

/// Due queued tasks of runnable codes in the runner's clusters, best first (the partial index
/// `tasks_queued` holds exactly this order), locked for this transaction. `SKIP LOCKED` passes
/// over tasks another server is leasing right now instead of waiting for it; a row that another
/// transaction changed and committed after this statement's snapshot is checked again against
/// the `WHERE` clause before it is returned, so a task leased elsewhere in the meantime is not
/// returned. `$3` lists codes that are full, `$4` tasks already picked in this call.
const LEASE_CANDIDATES: &str = concat!(
    "SELECT ",
    task_columns!(),
    ", c.max_concurrency AS code_max_concurrency \
     FROM tasks AS t JOIN codes AS c ON c.id = t.code_id \
     WHERE t.status = 'queued' AND t.due_at <= $1 AND NOT c.paused AND c.deleted_at IS NULL \
     AND t.cluster = ANY($2) AND t.code_id <> ALL($3) AND t.id <> ALL($4) \
     ORDER BY t.priority DESC, t.due_at, t.id LIMIT $5 \
     FOR UPDATE OF t SKIP LOCKED"
);

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

/// The log size and state of a task in `project_id`, as a slice without bytes.
pub(super) async fn log_state(
    conn: &mut PgConnection,
    project_id: &str,
    task_id: &str,
) -> Result<crate::LogSlice> {
    let row = sqlx::query(
        "SELECT status, percent, msg, log_size, log_truncated FROM tasks \
         WHERE id = $1 AND project_id = $2",
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
pub(super) async fn read_log(
    conn: &mut PgConnection,
    task_id: &str,
    start: u64,
    end: u64,
) -> Result<Vec<u8>> {
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
    let wanted = usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(wanted);
    let mut next: Option<u64> = None;
    for chunk in &chunks {
        let seq: u64 = unsigned("task_logs.seq", chunk.try_get("seq")?)?;
        let data: &[u8] = chunk.try_get("bytes")?;
        if next.is_some_and(|next| next != seq) {
            break;
        }
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let (from, to) = (start.max(seq), end.min(seq.saturating_add(len)));
        if from < to {
            let range = usize::try_from(from - seq).unwrap_or(usize::MAX)
                ..usize::try_from(to - seq).unwrap_or(usize::MAX);
            bytes.extend_from_slice(&data[range]);
        }
        next = Some(seq.saturating_add(len));
    }
    if bytes.len() != wanted {
        return Err(StoreError::Corrupt(format!(
            "the log of task {task_id} lacks bytes between {start} and {end}"
        )));
    }
    Ok(bytes)
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
        let code_rev = match new_task.code_rev {
            Some(pinned) if pinned == 0 || pinned > code_rev => {
                return Err(StoreError::not_found(format!(
                    "revision {pinned} of code {}",
                    new_task.code_name
                )));
            }
            Some(pinned) => pinned,
            None => code_rev,
        };
        queued.push(queued_task(project_id, &code_id, code_rev, new_task, now));
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
    if !outcome.is_user_failure() || task.cancel_requested {
        return Ok(None);
    }
    let code = load_revision(conn, &task.code_id, task.code_rev).await?;
    let Some(retry) = automatic_retry(task, outcome, &code.spec) else {
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
    Ok(Some(queued_task(
        &task.project_id,
        &task.code_id,
        task.code_rev,
        &retry,
        now,
    )))
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
    let cancelled = transition(TaskStatus::Queued, &Event::Cancelled)?;
    let queued = sqlx::query(
        "UPDATE tasks SET status = $1, end_time = $2, updated_at = $2, msg = $3, \
         version = version + 1 WHERE code_id = $4 AND status = $5",
    )
    .bind(cancelled.as_str())
    .bind(micros(now))
    .bind(TaskOutcome::Cancelled.message())
    .bind(code_id)
    .bind(TaskStatus::Queued.as_str())
    .execute(&mut *conn)
    .await?;
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
        cancelled: queued.rows_affected(),
        cancel_requested: leased.rows_affected(),
    })
}

/// The lease transaction's body; the caller holds the transaction and commits it.
///
/// Candidates come best first and locked (`LEASE_CANDIDATES`). `max_concurrency` is decided
/// under a per-code advisory lock (`ConcurrencySlots`). Tokens come from the sequence
/// `lease_tokens`, one per task, in the order the tasks were picked.
pub(super) async fn lease(
    conn: &mut PgConnection,
    request: &LeaseRequest,
    now: Timestamp,
) -> Result<Vec<LeasedTask>> {
    let max_tasks = usize::try_from(request.max_tasks).unwrap_or(usize::MAX);
    let mut picked: Vec<TaskRecord> = Vec::with_capacity(max_tasks.min(1024));
    let mut slots = ConcurrencySlots::default();
    loop {
        let wanted = max_tasks - picked.len();
        let fetch = wanted.max(MIN_CANDIDATES);
        let picked_ids: Vec<&str> = picked
            .iter()
            .map(|record| record.task.id.as_str())
            .collect();
        let candidates = sqlx::query(LEASE_CANDIDATES)
            .bind(micros(now))
            .bind(&request.clusters)
            .bind(&slots.full)
            .bind(&picked_ids)
            .bind(i64::try_from(fetch).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await?;
        let fetched = candidates.len();
        for row in &candidates {
            let record = rows::task_record(row)?;
            let limit: Option<i64> = row.try_get("code_max_concurrency")?;
            if slots.take(conn, &record.task.code_id, limit).await? {
                picked.push(record);
                if picked.len() == max_tasks {
                    break;
                }
            }
        }
        // Every candidate was picked or belongs to a code that is full now and excluded from
        // the next query, so each round makes progress; a short answer means no more are due.
        if picked.len() == max_tasks || fetched < fetch {
            break;
        }
    }
    if picked.is_empty() {
        return Ok(Vec::new());
    }

    let count = i64::try_from(picked.len()).unwrap_or(i64::MAX);
    let mut tokens: Vec<i64> =
        sqlx::query_scalar("SELECT nextval('lease_tokens') FROM generate_series(1, $1)")
            .bind(count)
            .fetch_all(&mut *conn)
            .await?;
    tokens.sort_unstable();
    let expires_at = now + Duration::seconds(i64::from(request.lease_secs));
    for (record, token) in picked.iter_mut().zip(&tokens) {
        record.grant_lease(&request.runner_id, *token, expires_at, now)?;
    }
    write_leases(conn, &picked, expires_at, now).await?;

    let mut codes: HashMap<(String, u32), CodeRevision> = HashMap::new();
    let mut leased = Vec::with_capacity(picked.len());
    for mut record in picked {
        record.version += 1;
        let key = (record.task.code_id.clone(), record.task.code_rev);
        let code = match codes.get(&key) {
            Some(code) => code.clone(),
            None => {
                let mut code = load_revision(conn, &key.0, key.1).await?;
                // Leased means the code was running, whatever a concurrent pause says.
                code.paused = false;
                codes.insert(key, code.clone());
                code
            }
        };
        let token = record.lease_token.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "task {} was leased without a token",
                record.task.id
            ))
        })?;
        leased.push(LeasedTask {
            task: record.task,
            code,
            lease: Lease { token, expires_at },
            registry_credential: None,
        });
    }
    Ok(leased)
}

/// Writes a batch of fresh leases in one statement: the fields `TaskRecord::grant_lease`
/// changes. Every record was queued and locked by this transaction, so every row must match.
async fn write_leases(
    conn: &mut PgConnection,
    leased: &[TaskRecord],
    expires_at: Timestamp,
    now: Timestamp,
) -> Result<()> {
    let Some(first) = leased.first() else {
        return Ok(());
    };
    let (status, runner_id) = (first.task.status, first.task.runner_id.as_deref());
    if !leased
        .iter()
        .all(|record| record.task.status == status && record.task.runner_id.as_deref() == runner_id)
    {
        return Err(StoreError::Corrupt(
            "a lease batch must share its status and runner".to_owned(),
        ));
    }
    let ids: Vec<&str> = leased
        .iter()
        .map(|record| record.task.id.as_str())
        .collect();
    let tokens: Vec<Option<i64>> = leased.iter().map(|record| record.lease_token).collect();
    let written = sqlx::query(
        "UPDATE tasks SET status = $1, updated_at = $2, runner_id = $3, lease_expires_at = $4, \
         lease_token = picked.token, version = tasks.version + 1 \
         FROM unnest($5::text[], $6::bigint[]) AS picked (id, token) \
         WHERE tasks.id = picked.id AND tasks.status = $7 AND tasks.lease_token IS NULL",
    )
    .bind(status.as_str())
    .bind(micros(now))
    .bind(runner_id)
    .bind(micros(expires_at))
    .bind(&ids)
    .bind(&tokens)
    .bind(TaskStatus::Queued.as_str())
    .execute(&mut *conn)
    .await?;
    if written.rows_affected() != leased.len() as u64 {
        return Err(StoreError::Conflict(
            "tasks changed while they were being leased; try again".to_owned(),
        ));
    }
    Ok(())
}

/// A code revision by id and number, whatever the project (the task already names it).
pub(super) async fn load_revision(
    conn: &mut PgConnection,
    code_id: &str,
    rev: u32,
) -> Result<CodeRevision> {
    let row = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM code_revisions AS r JOIN codes AS c ON c.id = r.code_id \
         WHERE r.code_id = $1 AND r.rev = $2"
    ))
    .bind(code_id)
    .bind(i64::from(rev))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::Corrupt(format!("revision {rev} of code {code_id} is missing")))?;
    rows::revision(&row)
}

/// Free `max_concurrency` slots of the codes seen in one lease call.
///
/// Two servers leasing at once would each count a code's active tasks, each see room, and
/// together pass the limit: row locks on the tasks cannot prevent that, because the tasks that
/// matter are the ones the other transaction is about to change. So a code with a limit is
/// counted only under a transaction-scoped advisory lock on that code: whoever holds it counts
/// after every earlier holder committed (each statement in READ COMMITTED sees what committed
/// before it began) and keeps it until its own leases commit. The lock is only *tried*: a code
/// that another server is leasing right now counts as full for this call, instead of waiting
/// (which could deadlock two servers taking two codes' locks in opposite orders). The other
/// server hands the code's tasks out meanwhile, and this one sees them at its next lease.
/// A hash collision between two codes only makes one of them wait a turn.
#[derive(Default)]
struct ConcurrencySlots {
    /// Codes with a limit: how many more tasks may start.
    free: HashMap<String, i64>,
    /// Codes that are full (or locked by another server); the lease query skips them.
    full: Vec<String>,
}

impl ConcurrencySlots {
    /// Takes a slot of the code, locking and counting it the first time it is seen.
    async fn take(
        &mut self,
        conn: &mut PgConnection,
        code_id: &str,
        limit: Option<i64>,
    ) -> Result<bool> {
        let Some(limit) = limit else {
            return Ok(true);
        };
        let free = match self.free.get_mut(code_id) {
            Some(free) => free,
            None => {
                let locked: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
                        .bind(CODE_LOCK_CLASS)
                        .bind(code_id)
                        .fetch_one(&mut *conn)
                        .await?;
                let free = if locked {
                    let active: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM tasks WHERE code_id = $1 AND status IN ($2, $3)",
                    )
                    .bind(code_id)
                    .bind(TaskStatus::Preparing.as_str())
                    .bind(TaskStatus::Running.as_str())
                    .fetch_one(&mut *conn)
                    .await?;
                    limit - active
                } else {
                    0
                };
                self.free.entry(code_id.to_owned()).or_insert(free)
            }
        };
        if *free > 0 {
            *free -= 1;
            if *free == 0 {
                self.full.push(code_id.to_owned());
            }
            return Ok(true);
        }
        if !self.full.iter().any(|full| full == code_id) {
            self.full.push(code_id.to_owned());
        }
        Ok(false)
    }
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
