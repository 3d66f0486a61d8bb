//! The task queries: load and write one task, queue a batch, cancel a code's tasks, the lease
//! transaction, and the writer's cache of leased tasks.

use std::collections::HashMap;

use chrono::Duration;
use sqlx::Row;
use sqlx::sqlite::SqliteConnection;
use stevedore_model::limits::MAX_PRIORITY;
use stevedore_model::{
    CodeRevision, Event, NewTask, Task, TaskOutcome, TaskStatus, Timestamp, automatic_retry,
    transition,
};

use super::rows::{
    self, micros, opt_micros, opt_signed, revision_columns, signed, task_columns, to_json,
};
use crate::record::{TaskRecord, queued_task};
use crate::{CodeCancellation, Lease, LeaseRequest, LeasedTask, LogSlice, Result, StoreError};

/// The least number of candidates the lease query fetches per priority, so that a few tasks of
/// a full code do not cost a query each.
const MIN_CANDIDATES: usize = 16;

/// Due queued tasks of runnable codes in the runner's clusters, best first: up to `?5` of each
/// priority, each walked through the partial index `tasks_queued` by due time (one range per
/// priority, so tasks that are not due yet are never read). `?3` lists codes at their
/// `max_concurrency`, `?4` tasks already picked in this call.
macro_rules! lease_candidates_of_priority {
    ($priority:literal) => {
        concat!(
            "SELECT * FROM (SELECT ",
            task_columns!(),
            ", t.priority, t.due_at, t.id, c.max_concurrency AS code_max_concurrency \
             FROM tasks AS t CROSS JOIN codes AS c \
             WHERE t.status = 'queued' AND t.priority = ",
            $priority,
            " AND t.due_at <= ?1 AND c.id = t.code_id AND c.paused = 0 AND c.deleted_at IS NULL \
             AND t.cluster IN (SELECT value FROM json_each(?2)) \
             AND t.code_id NOT IN (SELECT value FROM json_each(?3)) \
             AND t.id NOT IN (SELECT value FROM json_each(?4)) \
             ORDER BY t.due_at, t.id LIMIT ?5)"
        )
    };
}

/// The priorities are `0..=MAX_PRIORITY`; validation keeps tasks inside them. The caller sorts
/// the few rows (sorting them in SQL copied every task's JSON into a temporary b-tree).
const LEASE_CANDIDATES: &str = concat!(
    lease_candidates_of_priority!("2"),
    " UNION ALL ",
    lease_candidates_of_priority!("1"),
    " UNION ALL ",
    lease_candidates_of_priority!("0"),
);
const _: () = assert!(MAX_PRIORITY == 2, "LEASE_CANDIDATES lists every priority");

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

/// The log size and state of a task in `project_id`, as a slice without bytes: one lookup by
/// primary key, so a follower that finds nothing new pays for nothing more.
pub(super) async fn log_state(
    conn: &mut SqliteConnection,
    project_id: &str,
    task_id: &str,
) -> Result<LogSlice> {
    let row = sqlx::query(
        "SELECT status, percent, msg, log_size, log_truncated FROM tasks \
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
pub(super) async fn read_log(
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
    let wanted = usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(wanted);
    let mut next: Option<u64> = None;
    for chunk in &chunks {
        let seq: u64 = rows::unsigned("task_logs.seq", chunk.try_get("seq")?)?;
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
    let mut codes: HashMap<&str, (String, u32)> = HashMap::new();
    let mut queued = Vec::with_capacity(new_tasks.len());
    for new_task in new_tasks {
        let (code_id, code_rev) = match codes.get(new_task.code_name.as_str()) {
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
                codes.insert(&new_task.code_name, code.clone());
                code
            }
        };
        // A retry pins the revision that failed; everything else pins the latest.
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
    // Most completions succeed: decide that much without reading anything.
    if !outcome.is_user_failure() || task.cancel_requested {
        return Ok(None);
    }
    let code = revisions.get(conn, &task.code_id, task.code_rev).await?;
    let Some(retry) = automatic_retry(task, outcome, &code.spec) else {
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
    Ok(Some(queued_task(
        &task.project_id,
        &task.code_id,
        task.code_rev,
        &retry,
        now,
    )))
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
    let cancelled = transition(TaskStatus::Queued, &Event::Cancelled)?;
    let queued = sqlx::query(
        "UPDATE tasks SET status = ?1, end_time = ?2, updated_at = ?2, msg = ?3, version = version + 1 \
         WHERE code_id = ?4 AND status = ?5",
    )
    .bind(cancelled.as_str())
    .bind(micros(now))
    .bind(TaskOutcome::Cancelled.message())
    .bind(code_id)
    .bind(TaskStatus::Queued.as_str())
    .execute(&mut *conn)
    .await?;
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
        cancelled: queued.rows_affected(),
        cancel_requested: leased.rows_affected(),
    })
}

/// The lease transaction's body; the caller holds the write transaction.
///
/// Walks the due queued tasks one priority at a time (highest first), earliest due first,
/// through the partial index `tasks_queued`, skipping paused and deleted codes and other
/// clusters in SQL. `max_concurrency` is counted here: a code's active tasks are counted once
/// per call, the tasks picked in this call are added, and a code that is full is excluded
/// from the next query. Tokens come from `lease_counter` in one block for the whole batch.
/// Returns the leased tasks and their records as written, for the lease cache.
pub(super) async fn lease(
    conn: &mut SqliteConnection,
    revisions: &mut RevisionCache,
    request: &LeaseRequest,
    now: Timestamp,
) -> Result<(Vec<LeasedTask>, Vec<TaskRecord>)> {
    let max_tasks = usize::try_from(request.max_tasks).unwrap_or(usize::MAX);
    let clusters = to_json(&request.clusters)?;
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
            .bind(&clusters)
            .bind(to_json(&slots.full)?)
            .bind(to_json(&picked_ids)?)
            .bind(i64::try_from(fetch).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await?;
        let mut candidates = candidates
            .iter()
            .map(|row| {
                Ok((
                    rows::task_record(row)?,
                    row.try_get::<Option<i64>, _>("code_max_concurrency")?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        candidates.sort_by(|(a, _), (b, _)| {
            (b.task.priority, a.task.due_at, &a.task.id).cmp(&(
                a.task.priority,
                b.task.due_at,
                &b.task.id,
            ))
        });
        // A priority that filled its share of the answer may hold more due tasks.
        let mut per_priority = [0_usize; MAX_PRIORITY as usize + 1];
        for (record, limit) in candidates {
            if let Some(count) = per_priority.get_mut(usize::from(record.task.priority)) {
                *count += 1;
            }
            if slots.take(conn, &record.task.code_id, limit).await? {
                picked.push(record);
                if picked.len() == max_tasks {
                    break;
                }
            }
        }
        // Every candidate was either picked or belongs to a code that is full now and excluded
        // from the next query, so each round makes progress.
        if picked.len() == max_tasks || per_priority.iter().all(|count| *count < fetch) {
            break;
        }
    }
    if picked.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }

    let count = i64::try_from(picked.len()).unwrap_or(i64::MAX);
    let last_token: i64 = sqlx::query_scalar(
        "UPDATE lease_counter SET last_token = last_token + ?1 WHERE id = 1 RETURNING last_token",
    )
    .bind(count)
    .fetch_one(&mut *conn)
    .await?;
    let first_token = last_token - count + 1;
    let expires_at = now + Duration::seconds(i64::from(request.lease_secs));
    for (token, record) in (first_token..).zip(picked.iter_mut()) {
        record.grant_lease(&request.runner_id, token, expires_at, now)?;
    }
    write_leases(conn, &picked, first_token, expires_at, now).await?;
    for record in &mut picked {
        record.version += 1;
    }

    let mut leased = Vec::with_capacity(picked.len());
    for record in &picked {
        let code = revisions
            .get(conn, &record.task.code_id, record.task.code_rev)
            .await?;
        leased.push(LeasedTask {
            task: record.task.clone(),
            code,
            lease: Lease {
                token: record.lease_token.unwrap_or(first_token),
                expires_at,
            },
            registry_credential: None,
        });
    }
    Ok((leased, picked))
}

/// Writes a batch of fresh leases in one statement: the fields `TaskRecord::grant_lease`
/// changes, with consecutive tokens from `first_token` in the batch's order. Every record was
/// queued when it was picked and took the same transition, so one status serves them all.
async fn write_leases(
    conn: &mut SqliteConnection,
    leased: &[TaskRecord],
    first_token: i64,
    expires_at: Timestamp,
    now: Timestamp,
) -> Result<()> {
    let Some(status) = leased.first().map(|record| record.task.status) else {
        return Ok(());
    };
    let runner_id = leased
        .first()
        .and_then(|record| record.task.runner_id.as_deref());
    let consistent = leased.iter().zip(first_token..).all(|(record, token)| {
        record.task.status == status
            && record.task.runner_id.as_deref() == runner_id
            && record.lease_token == Some(token)
    });
    if !consistent {
        return Err(StoreError::Corrupt(
            "a lease batch must share its status and runner".to_owned(),
        ));
    }
    let ids: Vec<&str> = leased
        .iter()
        .map(|record| record.task.id.as_str())
        .collect();
    // Each id's token is the first token plus its place in the list. `+status` keeps the
    // planner on the primary key: with a plain `status = ?` it walks the (status, code_id)
    // index over every queued task instead.
    let written = sqlx::query(
        "UPDATE tasks SET status = ?1, updated_at = ?2, runner_id = ?3, lease_expires_at = ?4, \
         lease_token = picked.token, version = version + 1 \
         FROM (SELECT value AS id, ?5 + key AS token FROM json_each(?6)) AS picked \
         WHERE tasks.id = picked.id AND +tasks.status = ?7 AND tasks.lease_token IS NULL",
    )
    .bind(status.as_str())
    .bind(micros(now))
    .bind(runner_id)
    .bind(micros(expires_at))
    .bind(first_token)
    .bind(to_json(&ids)?)
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

/// Code revisions handed out with leases. A revision never changes once pushed, and a leased
/// task's code is by definition not paused, so a cached copy stays true; only the writer
/// touches it.
#[derive(Default)]
pub(super) struct RevisionCache {
    revisions: HashMap<(String, u32), CodeRevision>,
}

impl RevisionCache {
    const MAX_REVISIONS: usize = 1024;

    pub(super) async fn get(
        &mut self,
        conn: &mut SqliteConnection,
        code_id: &str,
        rev: u32,
    ) -> Result<CodeRevision> {
        if let Some(code) = self.revisions.get(&(code_id.to_owned(), rev)) {
            return Ok(code.clone());
        }
        let mut code = load_revision(conn, code_id, rev).await?;
        code.paused = false;
        if self.revisions.len() >= Self::MAX_REVISIONS {
            self.revisions.clear();
        }
        self.revisions
            .insert((code_id.to_owned(), rev), code.clone());
        Ok(code)
    }
}

/// A code revision by id and number, whatever the project (the task already names it).
async fn load_revision(
    conn: &mut SqliteConnection,
    code_id: &str,
    rev: u32,
) -> Result<CodeRevision> {
    let row = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM code_revisions AS r JOIN codes AS c ON c.id = r.code_id WHERE r.code_id = ?1 AND r.rev = ?2"
    ))
    .bind(code_id)
    .bind(i64::from(rev))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::Corrupt(format!("revision {rev} of code {code_id} is missing")))?;
    rows::revision(&row)
}

/// Free `max_concurrency` slots of the codes seen in one lease call.
#[derive(Default)]
struct ConcurrencySlots {
    /// Codes with a limit: how many more tasks may start.
    free: HashMap<String, i64>,
    /// Codes that are full; the lease query skips them.
    full: Vec<String>,
}

impl ConcurrencySlots {
    /// Takes a slot of the code, counting its active tasks the first time it is seen.
    async fn take(
        &mut self,
        conn: &mut SqliteConnection,
        code_id: &str,
        limit: Option<i64>,
    ) -> Result<bool> {
        let Some(limit) = limit else {
            return Ok(true);
        };
        let free = match self.free.get_mut(code_id) {
            Some(free) => free,
            None => {
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM tasks WHERE code_id = ?1 AND status IN (?2, ?3)",
                )
                .bind(code_id)
                .bind(TaskStatus::Preparing.as_str())
                .bind(TaskStatus::Running.as_str())
                .fetch_one(&mut *conn)
                .await?;
                self.free
                    .entry(code_id.to_owned())
                    .or_insert(limit - active)
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

/// The leased tasks as this process last wrote them, so that a runner's heartbeat, start and
/// completion can skip reading the row: the change is computed on the cached record and
/// written with its version as the guard. A stale entry (the row was written some other way,
/// or a transaction rolled back) only fails that guard, and the caller falls back to reading
/// the row. Only the writer touches it, under the write lock.
#[derive(Default)]
pub(super) struct LeaseCache {
    records: HashMap<String, TaskRecord>,
    /// Payload bytes held, to bound the memory a flood of large payloads could take.
    payload_bytes: usize,
}

impl LeaseCache {
    const MAX_RECORDS: usize = 50_000;
    const MAX_PAYLOAD_BYTES: usize = 64 << 20;

    /// Takes a task's record out of the cache; `remember` puts it back after a write.
    pub(super) fn take(&mut self, task_id: &str) -> Option<TaskRecord> {
        let record = self.records.remove(task_id)?;
        self.payload_bytes -= record.task.payload.len();
        Some(record)
    }

    /// Keeps a record just written while it is leased; forgets it otherwise.
    pub(super) fn remember(&mut self, record: &TaskRecord) {
        self.take(&record.task.id);
        if record.lease_token.is_none() || record.task.status.is_terminal() {
            return;
        }
        if self.records.len() >= Self::MAX_RECORDS || self.payload_bytes >= Self::MAX_PAYLOAD_BYTES
        {
            // Only a cache: dropping it costs a read per task until it fills again.
            self.records.clear();
            self.payload_bytes = 0;
        }
        self.payload_bytes += record.task.payload.len();
        self.records.insert(record.task.id.clone(), record.clone());
    }
}
