//! The runner's side: the lease transaction, heartbeats, starts, progress, completions,
//! requeues and rescues, and the writer's cache of leased tasks.

use std::collections::HashMap;

use chrono::Duration;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use stevedore_model::limits::MAX_PRIORITY;
use stevedore_model::{Quota, QuotaLimits, Task, TaskOutcome, TaskStatus, Timestamp};

use crate::convert::signed;

use super::codes::RevisionCache;
use super::rows::{self, micros, task_columns, to_json};
use super::tasks;
use super::writer::{RetryCheck, Writer};
use super::{BEGIN_WRITE, SqliteStore};
use crate::record::{
    FairShare, FreeSlots, LeaseSlots, Next, ProjectTurn, Rescue, Slot, TaskRecord, normalize,
    normalize_report, served_turns,
};
use crate::{
    HeartbeatReply, Lease, LeaseRequest, LeasedTask, Requeue, RescuedTask, Result, RunReport,
    StoreError,
};

/// The filter every lease candidate `t` (of code `c`) passes, whatever its priority and
/// project: due by `$now`, of a runnable code, in one of the clusters of the JSON array
/// `$clusters`, and visible to the request's owner `$owner`: a project's runner gets only that
/// project's tasks; the operator's runners get none of a project that owns a cluster of the
/// task's cluster name (scoped names: see `clusters`).
macro_rules! runnable_due_task {
    ($now:literal, $clusters:literal, $owner:literal) => {
        concat!(
            "t.due_at <= ",
            $now,
            " AND c.id = t.code_id AND c.paused = 0 AND c.deleted_at IS NULL \
             AND t.cluster IN (SELECT value FROM json_each(",
            $clusters,
            ")) AND (CASE WHEN ",
            $owner,
            " IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
             WHERE k.project_id = t.project_id AND k.name = t.cluster) ELSE t.project_id = ",
            $owner,
            " END)"
        )
    };
}

/// The projects with queued tasks of one priority, one seek each through the partial index
/// `tasks_queued_by_project` (a loose index scan: each step asks for the next project id);
/// only the owner's with `?3`.
macro_rules! projects_queued_at_priority {
    ($priority:literal) => {
        concat!(
            "waiting_",
            $priority,
            " (project_id) AS (SELECT COALESCE(?3, (SELECT t.project_id FROM tasks AS t \
             WHERE t.status = 'queued' AND t.priority = ",
            $priority,
            " ORDER BY t.project_id LIMIT 1)) UNION ALL SELECT (SELECT t.project_id FROM tasks AS t \
             WHERE t.status = 'queued' AND t.priority = ",
            $priority,
            " AND t.project_id > w.project_id ORDER BY t.project_id LIMIT 1) FROM waiting_",
            $priority,
            " AS w WHERE w.project_id IS NOT NULL AND ?3 IS NULL)"
        )
    };
}

/// Of those projects, the ones with a runnable due task, with their last turn and when their
/// earliest such task became due.
macro_rules! projects_with_due_work_of_priority {
    ($priority:literal) => {
        concat!(
            "SELECT * FROM (SELECT ",
            $priority,
            " AS priority, w.project_id, COALESCE(l.turn, 0) AS turn, \
             (SELECT t.due_at FROM tasks AS t CROSS JOIN codes AS c WHERE t.status = 'queued' \
             AND t.priority = ",
            $priority,
            " AND t.project_id = w.project_id AND ",
            runnable_due_task!("?1", "?2", "?3"),
            " ORDER BY t.due_at LIMIT 1) AS first_due FROM waiting_",
            $priority,
            " AS w LEFT JOIN project_lease_turns AS l ON l.project_id = w.project_id \
             WHERE w.project_id IS NOT NULL) WHERE first_due IS NOT NULL"
        )
    };
}

/// The projects with runnable due tasks at each priority (`record::ProjectTurn`): `?1` is now,
/// `?2` the runner's clusters, `?3` the request's owner. The priorities are `0..=MAX_PRIORITY`;
/// validation keeps tasks inside them.
const PROJECTS_WITH_DUE_WORK: &str = concat!(
    "WITH RECURSIVE ",
    projects_queued_at_priority!("2"),
    ", ",
    projects_queued_at_priority!("1"),
    ", ",
    projects_queued_at_priority!("0"),
    " ",
    projects_with_due_work_of_priority!("2"),
    " UNION ALL ",
    projects_with_due_work_of_priority!("1"),
    " UNION ALL ",
    projects_with_due_work_of_priority!("0"),
);

const _: () = assert!(
    MAX_PRIORITY == 2,
    "PROJECTS_WITH_DUE_WORK lists every priority"
);

/// Lease candidates of priority `?7`: up to `?5` runnable due tasks of each project of the
/// JSON array `?8`, each project's walked by due time through `tasks_queued_by_project`, in
/// the order of `?8`. `?3` lists codes at their `max_concurrency`, `?4` tasks already picked
/// in this call.
const LEASE_CANDIDATES: &str = concat!(
    "SELECT ",
    task_columns!(),
    ", c.max_concurrency AS code_max_concurrency FROM json_each(?8) AS w \
     JOIN tasks AS t ON t.id IN (SELECT t.id FROM tasks AS t CROSS JOIN codes AS c \
     WHERE t.status = 'queued' AND t.priority = ?7 AND t.project_id = w.value AND ",
    runnable_due_task!("?1", "?2", "?6"),
    " AND t.code_id NOT IN (SELECT value FROM json_each(?3)) \
     AND t.id NOT IN (SELECT value FROM json_each(?4)) ORDER BY t.due_at, t.id LIMIT +?5) \
     JOIN codes AS c ON c.id = t.code_id ORDER BY w.key, t.due_at, t.id"
);

/// Records the turns of the projects a lease served: the JSON array `?1`, in order, each a
/// turn later than every turn before.
const RECORD_TURNS: &str = "INSERT INTO project_lease_turns (project_id, turn) \
     SELECT value, (SELECT COALESCE(MAX(turn), 0) FROM project_lease_turns) + key + 1 \
     FROM json_each(?1) WHERE true \
     ON CONFLICT (project_id) DO UPDATE SET turn = excluded.turn";

pub(super) async fn lease(
    store: &SqliteStore,
    request: &LeaseRequest,
    now: Timestamp,
) -> Result<Vec<LeasedTask>> {
    if request.max_tasks == 0 || request.clusters.is_empty() {
        return Ok(Vec::new());
    }
    let now = normalize(now);
    let mut writer = store.writer().await?;
    let Writer {
        conn,
        leases,
        revisions,
        ..
    } = &mut *writer;
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let (leased, records) =
        lease_due_tasks(&mut tx, revisions, &store.quota_defaults, request, now).await?;
    if leased.is_empty() {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    for record in &records {
        leases.remember(record);
    }
    Ok(leased)
}

pub(super) async fn heartbeat(
    store: &SqliteStore,
    task_id: &str,
    token: i64,
    lease_secs: u32,
    now: Timestamp,
) -> Result<HeartbeatReply> {
    let now = normalize(now);
    let (_, reply) = store
        .change_leased_task(task_id, token, None, move |record| {
            Ok(record.extend_lease(lease_secs, now))
        })
        .await?;
    Ok(reply)
}

pub(super) async fn mark_running(
    store: &SqliteStore,
    task_id: &str,
    token: i64,
    start_time: Timestamp,
    now: Timestamp,
) -> Result<Task> {
    let (now, start_time) = (normalize(now), normalize(start_time));
    let (record, ()) = store
        .change_leased_task(task_id, token, None, move |record| {
            record.start(start_time, now)
        })
        .await?;
    Ok(record.task)
}

pub(super) async fn progress(
    store: &SqliteStore,
    task_id: &str,
    token: i64,
    percent: Option<u8>,
    msg: Option<&str>,
    now: Timestamp,
) -> Result<()> {
    let now = normalize(now);
    let msg = msg.map(str::to_owned);
    store
        .change_leased_task(task_id, token, None, move |record| {
            record.set_progress(percent, msg.as_deref(), now);
            Ok(())
        })
        .await?;
    Ok(())
}

pub(super) async fn complete(
    store: &SqliteStore,
    task_id: &str,
    token: i64,
    outcome: &TaskOutcome,
    report: &RunReport,
    now: Timestamp,
) -> Result<Task> {
    let now = normalize(now);
    let report = normalize_report(report);
    let retry = RetryCheck {
        outcome: outcome.clone(),
        now,
    };
    let outcome = outcome.clone();
    let (record, ()) = store
        .change_leased_task(task_id, token, Some(retry), move |record| {
            record.finish(&outcome, &report, now)
        })
        .await?;
    Ok(record.task)
}

pub(super) async fn requeue(
    store: &SqliteStore,
    task_id: &str,
    token: i64,
    requeue: &Requeue,
    now: Timestamp,
) -> Result<Task> {
    let (now, requeue) = (normalize(now), requeue.clone());
    let (record, ()) = store
        .change_leased_task(task_id, token, None, move |record| {
            record.requeue(&requeue, now)
        })
        .await?;
    Ok(record.task)
}

pub(super) async fn rescue_expired(
    store: &SqliteStore,
    now: Timestamp,
    max_infra_attempts: u32,
) -> Result<Vec<RescuedTask>> {
    let now = normalize(now);
    let held = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.status IN (?1, ?2) AND t.lease_expires_at < ?3 \
         ORDER BY t.lease_expires_at"
    ))
    .bind(TaskStatus::Preparing.as_str())
    .bind(TaskStatus::Running.as_str())
    .bind(micros(now));
    rescue(store, held, Rescue::LeaseExpired, max_infra_attempts, now).await
}

pub(super) async fn release_runner(
    store: &SqliteStore,
    runner_id: &str,
    project_id: Option<&str>,
    now: Timestamp,
    max_infra_attempts: u32,
) -> Result<Vec<RescuedTask>> {
    let now = normalize(now);
    let held = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.runner_id = ?3 AND t.status IN (?1, ?2) \
         AND (?4 IS NULL OR t.project_id = ?4) ORDER BY t.id"
    ))
    .bind(TaskStatus::Preparing.as_str())
    .bind(TaskStatus::Running.as_str())
    .bind(runner_id.to_owned())
    .bind(project_id.map(str::to_owned));
    rescue(
        store,
        held,
        Rescue::RunnerRestarted,
        max_infra_attempts,
        now,
    )
    .await
}

/// Takes back the leased tasks `held` selects, in one write transaction.
async fn rescue(
    store: &SqliteStore,
    held: sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    why: Rescue,
    max_infra_attempts: u32,
    now: Timestamp,
) -> Result<Vec<RescuedTask>> {
    let mut writer = store.writer().await?;
    let Writer { conn, leases, .. } = &mut *writer;
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let held = held.fetch_all(&mut *tx).await?;
    let mut rescued = Vec::with_capacity(held.len());
    for row in &held {
        let mut record = rows::task_record(row)?;
        record.rescue(why, max_infra_attempts, now)?;
        tasks::write_loaded(&mut tx, &mut record).await?;
        rescued.push(record);
    }
    tx.commit().await?;
    for record in &rescued {
        leases.remember(record);
    }
    Ok(rescued
        .iter()
        .map(|record| RescuedTask::from(&record.task))
        .collect())
}

/// The lease transaction's body; the caller holds the write transaction.
///
/// Hands out due queued tasks priority by priority (highest first) and, within a priority,
/// in turns between the projects with due work (`record::FairShare`), each project's tasks
/// earliest due first, through the partial index `tasks_queued_by_project`, skipping paused
/// and deleted codes and other clusters in SQL. `max_concurrency` is counted here: a code's
/// active tasks are counted once per call, the tasks picked in this call are added, and a code
/// that is full is excluded from the next query. Each task gets a random token
/// (`TaskRecord::grant_leases`); each project served gets a new turn.
/// Returns the leased tasks and their records as written, for the lease cache.
async fn lease_due_tasks(
    conn: &mut SqliteConnection,
    revisions: &mut RevisionCache,
    quotas: &QuotaLimits,
    request: &LeaseRequest,
    now: Timestamp,
) -> Result<(Vec<LeasedTask>, Vec<TaskRecord>)> {
    let max_tasks = usize::try_from(request.max_tasks).unwrap_or(usize::MAX);
    let clusters = to_json(&request.clusters)?;
    let owner = request.owner.as_deref();
    let projects = projects_with_due_work(conn, &clusters, owner, now).await?;
    let mut share = FairShare::new(projects);
    let mut picked: Vec<TaskRecord> = Vec::with_capacity(max_tasks.min(1024));
    let mut slots = LeaseSlots::default();
    while picked.len() < max_tasks {
        match share.next(max_tasks - picked.len()) {
            Next::Done => break,
            Next::Fetch(plan) => {
                let picked_ids: Vec<&str> = picked
                    .iter()
                    .map(|record| record.task.id.as_str())
                    .collect();
                let candidates = sqlx::query(LEASE_CANDIDATES)
                    .bind(micros(now))
                    .bind(&clusters)
                    .bind(to_json(&slots.full_codes())?)
                    .bind(to_json(&picked_ids)?)
                    .bind(i64::try_from(plan.per_project).unwrap_or(i64::MAX))
                    .bind(owner)
                    .bind(i64::from(plan.priority))
                    .bind(to_json(&plan.projects)?)
                    .fetch_all(&mut *conn)
                    .await?;
                let candidates = candidates
                    .iter()
                    .map(|row| {
                        Ok((
                            rows::task_record(row)?,
                            row.try_get::<Option<i64>, _>("code_max_concurrency")?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                share.refill(&plan, candidates)?;
            }
            Next::Candidate(candidate) => {
                let (record, limit) = *candidate;
                while let Some(what) = slots.uncounted(&record, limit) {
                    let free = match what {
                        FreeSlots::OfProject => {
                            free_project_slots(conn, quotas, &record.task.project_id).await?
                        }
                        FreeSlots::OfCode { limit } => {
                            free_slots(conn, &record.task.code_id, limit).await?
                        }
                    };
                    slots.counted(&record, what, free);
                }
                match slots.take(&record, limit) {
                    Slot::Taken => picked.push(record),
                    Slot::CodeFull => {}
                    Slot::ProjectFull => share.drop_project(&record.task.project_id),
                }
            }
        }
    }
    if picked.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    sqlx::query(RECORD_TURNS)
        .bind(to_json(&served_turns(&picked))?)
        .execute(&mut *conn)
        .await?;

    let expires_at = now + Duration::seconds(i64::from(request.lease_secs));
    TaskRecord::grant_leases(&mut picked, &request.runner_id, expires_at, now)?;
    write_leases(conn, &picked, expires_at, now).await?;
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
                token: record.lease_token.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "task {} was leased without a token",
                        record.task.id
                    ))
                })?,
                expires_at,
            },
            registry_credential: None,
        });
    }
    Ok((leased, picked))
}

/// The projects with runnable due tasks at each priority, for `FairShare`.
async fn projects_with_due_work(
    conn: &mut SqliteConnection,
    clusters: &str,
    owner: Option<&str>,
    now: Timestamp,
) -> Result<Vec<ProjectTurn>> {
    let rows = sqlx::query(PROJECTS_WITH_DUE_WORK)
        .bind(micros(now))
        .bind(clusters)
        .bind(owner)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            let priority: i64 = row.try_get("priority")?;
            Ok(ProjectTurn {
                priority: u8::try_from(priority)
                    .map_err(|_| StoreError::Corrupt(format!("priority {priority}")))?,
                project_id: row.try_get("project_id")?,
                turn: row.try_get("turn")?,
                first_due: row.try_get("first_due")?,
            })
        })
        .collect()
}

/// Writes a batch of fresh leases in one statement: the fields `TaskRecord::grant_lease`
/// changes, each task with its own token. Every record was queued when it was picked and took
/// the same transition, so one status serves them all.
async fn write_leases(
    conn: &mut SqliteConnection,
    leased: &[TaskRecord],
    expires_at: Timestamp,
    now: Timestamp,
) -> Result<()> {
    let Some(status) = leased.first().map(|record| record.task.status) else {
        return Ok(());
    };
    let runner_id = leased
        .first()
        .and_then(|record| record.task.runner_id.as_deref());
    let consistent = leased.iter().all(|record| {
        record.task.status == status
            && record.task.runner_id.as_deref() == runner_id
            && record.lease_token.is_some()
    });
    if !consistent {
        return Err(StoreError::Corrupt(
            "a lease batch must share its status and runner".to_owned(),
        ));
    }
    let picked: Vec<(&str, Option<i64>)> = leased
        .iter()
        .map(|record| (record.task.id.as_str(), record.lease_token))
        .collect();
    // `picked` is a JSON array of `[id, token]`. `+status` keeps the planner on the primary
    // key: with a plain `status = ?` it walks the (status, code_id) index over every queued
    // task instead.
    let written = sqlx::query(
        "UPDATE tasks SET status = ?1, updated_at = ?2, runner_id = ?3, lease_expires_at = ?4, \
         lease_token = picked.token, version = version + 1 \
         FROM (SELECT value ->> 0 AS id, value ->> 1 AS token FROM json_each(?5)) AS picked \
         WHERE tasks.id = picked.id AND +tasks.status = ?6 AND tasks.lease_token IS NULL",
    )
    .bind(status.as_str())
    .bind(micros(now))
    .bind(runner_id)
    .bind(micros(expires_at))
    .bind(to_json(&picked)?)
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

/// How many of a code's `limit` slots are free: its tasks preparing and running take one each.
async fn free_slots(conn: &mut SqliteConnection, code_id: &str, limit: i64) -> Result<i64> {
    let active: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE code_id = ?1 AND status IN (?2, ?3)")
            .bind(code_id)
            .bind(TaskStatus::Preparing.as_str())
            .bind(TaskStatus::Running.as_str())
            .fetch_one(&mut *conn)
            .await?;
    Ok(limit - active)
}

/// How many more tasks of the project may start under its `running_tasks` quota (its own
/// limit, else `defaults`); the writer's transaction keeps the count true until the lease
/// commits.
async fn free_project_slots(
    conn: &mut SqliteConnection,
    defaults: &QuotaLimits,
    project_id: &str,
) -> Result<i64> {
    let (active, own): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM tasks WHERE project_id = ?1 AND status IN (?2, ?3)), \
         (SELECT \"limit\" FROM project_quotas WHERE project_id = ?1 AND quota = ?4)",
    )
    .bind(project_id)
    .bind(TaskStatus::Preparing.as_str())
    .bind(TaskStatus::Running.as_str())
    .bind(Quota::RunningTasks.as_str())
    .fetch_one(&mut *conn)
    .await?;
    let limit = own.unwrap_or_else(|| signed(defaults.running_tasks));
    Ok(limit - active)
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
