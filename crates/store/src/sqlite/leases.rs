//! The runner's side: the lease transaction, heartbeats, starts, progress, completions,
//! requeues and rescues, and the writer's cache of leased tasks.

use std::collections::HashMap;

use chrono::Duration;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use stevedore_model::limits::MAX_PRIORITY;
use stevedore_model::{Task, TaskOutcome, TaskStatus, Timestamp};

use super::codes::RevisionCache;
use super::rows::{self, micros, task_columns, to_json};
use super::tasks;
use super::writer::{RetryCheck, Writer};
use super::{BEGIN_WRITE, SqliteStore};
use crate::record::{ConcurrencySlots, TaskRecord, normalize, normalize_report};
use crate::{
    HeartbeatReply, Lease, LeaseRequest, LeasedTask, Requeue, RescuedTask, Result, RunReport,
    StoreError,
};

/// The least number of candidates the lease query fetches per priority, so that a few tasks of
/// a full code do not cost a query each.
const MIN_CANDIDATES: usize = 16;

/// Due queued tasks of runnable codes in the runner's clusters, best first: up to `?5` of each
/// priority, each walked through the partial index `tasks_queued` by due time (one range per
/// priority, so tasks that are not due yet are never read). `?3` lists codes at their
/// `max_concurrency`, `?4` tasks already picked in this call. `?6` is the request's owner: a
/// project's runner gets only that project's tasks; the operator's runners get none of a
/// project that owns a cluster of the task's cluster name (scoped names: see `clusters`).
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
             AND (CASE WHEN ?6 IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
                  WHERE k.project_id = t.project_id AND k.name = t.cluster) \
                  ELSE t.project_id = ?6 END) \
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
    let (leased, records) = lease_due_tasks(&mut tx, revisions, request, now).await?;
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
    let mut writer = store.writer().await?;
    let Writer { conn, leases, .. } = &mut *writer;
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let expired = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.status IN (?1, ?2) AND t.lease_expires_at < ?3 \
         ORDER BY t.lease_expires_at"
    ))
    .bind(TaskStatus::Preparing.as_str())
    .bind(TaskStatus::Running.as_str())
    .bind(micros(now))
    .fetch_all(&mut *tx)
    .await?;
    let mut rescued = Vec::with_capacity(expired.len());
    for row in &expired {
        let mut record = rows::task_record(row)?;
        record.rescue(max_infra_attempts, now)?;
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
/// Walks the due queued tasks one priority at a time (highest first), earliest due first,
/// through the partial index `tasks_queued`, skipping paused and deleted codes and other
/// clusters in SQL. `max_concurrency` is counted here: a code's active tasks are counted once
/// per call, the tasks picked in this call are added, and a code that is full is excluded
/// from the next query. Each task gets a random token (`TaskRecord::grant_leases`).
/// Returns the leased tasks and their records as written, for the lease cache.
async fn lease_due_tasks(
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
            .bind(to_json(&slots.full())?)
            .bind(to_json(&picked_ids)?)
            .bind(i64::try_from(fetch).unwrap_or(i64::MAX))
            .bind(request.owner.as_deref())
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
            let code_id = record.task.code_id.as_str();
            let free = async |limit| free_slots(conn, code_id, limit).await;
            if slots.take(code_id, limit, free).await? {
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
