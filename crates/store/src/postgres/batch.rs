//! The runner's writes about leased tasks, batched: heartbeats, starts, progress, log appends,
//! completions and requeues that arrive while earlier ones are being written share one
//! transaction, so a busy server pays one `BEGIN`, one locking read, one `UPDATE` (and its
//! statement-level count trigger) and one `COMMIT` for many tasks instead of for each.
//!
//! ```text
//! caller ──LeasedWrite──▶ channel ──▶ dispatcher: once a batch slot is free, what waits
//!                                     (one write per task, none about a task in flight)
//!                                          │
//!                       batch transaction ◀┘  BEGIN
//!                                             SELECT … WHERE id = ANY(…) ORDER BY id FOR UPDATE
//!                                             each write checked and applied to its own row
//!                                             UPDATE tasks … FROM unnest(…)   (the changed rows)
//!                                             INSERT the user retries          (if any)
//!                                             NOTIFY                           (if work came back)
//!                                             COMMIT ──▶ each caller its own answer
//! ```
//!
//! Nothing is promised less than a write alone promises: each write's lease token is checked
//! against its task's locked row, so a stale one is refused alone while the others commit; a
//! task appears at most once in a batch (a second write about it waits for the next), so every
//! status change is a change of its own row and the attempt trigger sees each, and writes about
//! one task are written in the order they arrived; a caller hears back only after the commit
//! that holds its write. Rows are locked in id order, so two batches (of this server and
//! another) never wait for each other in a circle. When the batch as a whole
//! fails (a database error, a deadlock with another kind of write), nothing of it was written
//! and each write is done again alone, so one write's trouble is never another's answer.
//!
//! The dispatcher adds no wait of its own: an idle server writes the first write at once, and
//! batches form from what arrives while up to `BATCHES_IN_FLIGHT` earlier ones are written.
//! A write about a task that a batch in flight holds waits for that batch, so writes about
//! one task keep their order whichever batches carry them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use sqlx::postgres::{PgConnection, PgPool};
use stevedore_model::{HeartbeatReply, Task, TaskOutcome, TaskStatus, Timestamp};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use super::rows::{self, task_columns};
use super::{PgStore, finish, tasks};
use crate::convert::{micros, opt_micros, opt_signed, signed};
use crate::record::{LogAppendPlan, TaskRecord, plan_log_append};
use crate::{Requeue, Result, RunReport, StoreError};

/// The most writes one batch holds, so that one transaction's locks and statements stay short.
const MAX_BATCH: usize = 256;

/// How many batches one store writes at once, each on a connection of its own: runner loops
/// that wait for each write before the next still write side by side. More in flight means
/// smaller batches: with four, four runner loops' writes went out in batches of eight on
/// average and cost the database a fifth more CPU per task than with two (`lease_throughput`),
/// whose batches were twice as large. The fixed cost of a statement (its triggers among it)
/// is paid per batch.
const BATCHES_IN_FLIGHT: usize = 2;

/// The most tasks `WrittenTasks` holds. Copies of tasks whose runner never wrote again (it died
/// and the rescuer took them back) would pile up: past this, the copies are dropped and the
/// next writes read their rows.
const MAX_WRITTEN_TASKS: usize = 4096;

/// A task with a larger payload is not copied (its writes read its row), so that the copies
/// stay small whatever the payloads: at most `MAX_WRITTEN_TASKS` times this.
const MAX_COPIED_PAYLOAD: usize = 16 * 1024;

/// What a runner asks to change about a task it leased.
#[derive(Debug, Clone)]
pub(super) enum LeasedChange {
    /// Extend the lease by `lease_secs` from now (`TaskRecord::extend_lease`).
    Heartbeat { lease_secs: u32 },
    /// The container started (`TaskRecord::start`).
    Start { start_time: Timestamp },
    /// The task's progress, reported by its runner (`TaskRecord::set_progress`).
    Progress {
        percent: Option<u8>,
        msg: Option<String>,
    },
    /// The run ended (`TaskRecord::finish`); may queue a user retry.
    Complete {
        outcome: TaskOutcome,
        report: RunReport,
    },
    /// Give the task back (`TaskRecord::requeue`).
    Requeue(Requeue),
    /// Append to the task's log, which may hold at most `cap` bytes (`plan_log_append`).
    AppendLog { bytes: Vec<u8>, cap: u64 },
}

/// What applying a change to a task's record left to write beside its row.
#[derive(Debug, Default)]
struct Applied {
    /// A heartbeat's answer.
    heartbeat: Option<HeartbeatReply>,
    /// A log append's plan: the chunks to insert (and the log to cut back first).
    log: Option<LogAppendPlan>,
    /// The change changed nothing (an append to a log already at its cap): the row is not
    /// written.
    unchanged: bool,
}

/// A change written: the task as it is now, and the heartbeat's answer for a heartbeat.
#[derive(Debug)]
pub(super) struct Changed {
    pub(super) task: Task,
    pub(super) heartbeat: Option<HeartbeatReply>,
}

/// The batching front of one store: hands writes to its dispatcher and waits for the answers.
pub(super) struct LeasedWrites {
    sender: mpsc::UnboundedSender<LeasedWrite>,
    /// The tasks this store leased or wrote last, as it wrote them.
    written: Arc<WrittenTasks>,
}

/// The leased tasks as this store last wrote them, each with the version its write gave the
/// row: a write about one of them is applied to this copy and written in one guarded
/// statement, without reading the row first. The version guard makes the copy safe to use
/// whatever happened meanwhile: every write of a task's row bumps its version (another
/// server's, a user's cancel, the rescuer's, a log append), and a row whose version moved is
/// not written; its write is done again on the row read afresh and locked. A copy only spares
/// a read: a refusal, a retry or a requeue always goes the locked way.
#[derive(Default)]
struct WrittenTasks {
    records: Mutex<HashMap<String, TaskRecord>>,
}

/// One caller's write, waiting for its batch.
struct LeasedWrite {
    task_id: String,
    token: i64,
    change: LeasedChange,
    now: Timestamp,
    answer: oneshot::Sender<Result<Changed>>,
}

// === impl LeasedChange ===

impl LeasedChange {
    /// Checks the token against the loaded task and applies the change to it.
    fn apply(&self, record: &mut TaskRecord, token: i64, now: Timestamp) -> Result<Applied> {
        record.check_lease(token)?;
        match self {
            LeasedChange::Heartbeat { lease_secs } => {
                return Ok(Applied {
                    heartbeat: Some(record.extend_lease(*lease_secs, now)),
                    ..Applied::default()
                });
            }
            LeasedChange::Start { start_time } => record.start(*start_time, now)?,
            LeasedChange::Progress { percent, msg } => {
                record.set_progress(*percent, msg.as_deref(), now);
            }
            LeasedChange::Complete { outcome, report } => record.finish(outcome, report, now)?,
            LeasedChange::Requeue(requeue) => record.requeue(requeue, now)?,
            LeasedChange::AppendLog { bytes, cap } => {
                let plan = plan_log_append(record.task.log_size, record.log_truncated, bytes, *cap);
                let Some(plan) = plan else {
                    return Ok(Applied {
                        unchanged: true,
                        ..Applied::default()
                    });
                };
                record.apply_log_plan(&plan, now);
                return Ok(Applied {
                    log: Some(plan),
                    ..Applied::default()
                });
            }
        }
        Ok(Applied::default())
    }

    /// Whether this change may be written from the store's copy of the task
    /// (`WrittenTasks`): one that neither queues a user retry nor gives the task back nor cuts
    /// a log back, so that it is one guarded `UPDATE` of its own row (and, for a log append,
    /// the insert of its bytes in the same statement). An append that would change nothing
    /// goes the locked way too: the row itself confirms the lease before it is answered.
    fn is_plain(&self, record: &TaskRecord) -> bool {
        match self {
            LeasedChange::Heartbeat { .. }
            | LeasedChange::Start { .. }
            | LeasedChange::Progress { .. } => true,
            LeasedChange::Complete { outcome, .. } => !record.may_retry(outcome),
            LeasedChange::Requeue(_) => false,
            LeasedChange::AppendLog { bytes, cap } => {
                let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                !record.log_truncated
                    && !bytes.is_empty()
                    && record.task.log_size.saturating_add(len) <= *cap
            }
        }
    }

    /// The completion's outcome, for the user retry it may call for.
    fn outcome(&self) -> Option<&TaskOutcome> {
        match self {
            LeasedChange::Complete { outcome, .. } => Some(outcome),
            _ => None,
        }
    }
}

// === impl WrittenTasks ===

impl WrittenTasks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskRecord>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps copies of tasks as just written (and committed); a finished task's copy is let
    /// go, no write about it can succeed.
    fn remember(&self, records: Vec<TaskRecord>) {
        let mut copies = self.lock();
        for record in records {
            if record.task.status.is_terminal()
                || record.lease_token.is_none()
                || record.task.payload.len() > MAX_COPIED_PAYLOAD
            {
                copies.remove(&record.task.id);
                continue;
            }
            if copies.len() >= MAX_WRITTEN_TASKS {
                copies.clear();
            }
            copies.insert(record.task.id.clone(), record);
        }
    }
}

// === impl LeasedWrites ===

impl LeasedWrites {
    /// Starts the dispatcher over `pool`; it ends when this front is dropped and every write
    /// handed to it is answered.
    pub(super) fn start(pool: PgPool) -> LeasedWrites {
        let (sender, receiver) = mpsc::unbounded_channel();
        let written = Arc::new(WrittenTasks::default());
        tokio::spawn(dispatch(pool, Arc::clone(&written), receiver));
        LeasedWrites { sender, written }
    }

    /// Keeps copies of tasks just leased and committed, for the writes about them to come.
    pub(super) fn leased(&self, records: Vec<TaskRecord>) {
        self.written.remember(records);
    }

    /// Writes `change` about `task_id` if `token` is its current lease, in the next batch.
    /// Dropping the returned future before the write's batch is formed withdraws the write;
    /// after that, the batch commits or rolls back whatever becomes of the caller.
    pub(super) async fn write(
        &self,
        task_id: &str,
        token: i64,
        change: LeasedChange,
        now: Timestamp,
    ) -> Result<Changed> {
        let (answer, answered) = oneshot::channel();
        self.sender
            .send(LeasedWrite {
                task_id: task_id.to_owned(),
                token,
                change,
                now,
                answer,
            })
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?;
        answered.await.map_err(|_| {
            StoreError::Database(sqlx::Error::Io(std::io::Error::other(
                "the batch holding this write was stopped before it answered",
            )))
        })?
    }
}

/// Forms batches from the waiting writes and writes each on a task of its own, at most
/// `BATCHES_IN_FLIGHT` at once. A write about a task that a batch in flight holds waits for
/// that batch to end, so that writes about one task are written in the order they came.
async fn dispatch(
    pool: PgPool,
    written: Arc<WrittenTasks>,
    mut receiver: mpsc::UnboundedReceiver<LeasedWrite>,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let ended = Arc::new(Notify::new());
    // Writes put off (their task was in a batch), in arrival order; they came before anything
    // still in the channel.
    let mut deferred: VecDeque<LeasedWrite> = VecDeque::new();
    let mut open = true;
    loop {
        if deferred.is_empty() {
            match receiver.recv().await {
                Some(write) => deferred.push_back(write),
                None => return,
            }
        }
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut pending = std::mem::take(&mut deferred);
        let mut batch = Vec::new();
        let mut later = VecDeque::new();
        {
            let mut busy = lock(&in_flight);
            while batch.len() < MAX_BATCH {
                let next = match pending.pop_front() {
                    Some(write) => Some(write),
                    None if open => receiver.try_recv().ok(),
                    None => None,
                };
                let Some(write) = next else {
                    break;
                };
                if write.answer.is_closed() {
                    // Its caller went away before the write began: withdrawn, as a
                    // transaction dropped before its commit would be.
                    continue;
                }
                if busy.insert(write.task_id.clone()) {
                    batch.push(write);
                } else {
                    later.push_back(write);
                }
            }
        }
        // What was left of the put-off writes came after those put off just now.
        later.extend(pending);
        deferred = later;
        if batch.is_empty() {
            drop(slot);
            // Everything waiting is about tasks in flight: wait for a batch to end, or for a
            // new write.
            tokio::select! {
                () = ended.notified() => {}
                write = receiver.recv(), if open => match write {
                    Some(write) => deferred.push_back(write),
                    None => open = false,
                },
            }
            continue;
        }
        let (pool, in_flight, ended) = (pool.clone(), Arc::clone(&in_flight), Arc::clone(&ended));
        let written = Arc::clone(&written);
        tokio::spawn(async move {
            let ids: Vec<String> = batch.iter().map(|write| write.task_id.clone()).collect();
            let answers = write_batch(&pool, &written, &batch).await;
            {
                let mut busy = lock(&in_flight);
                for id in &ids {
                    busy.remove(id);
                }
            }
            drop(slot);
            ended.notify_one();
            for (write, answer) in batch.into_iter().zip(answers) {
                // A caller that went away meanwhile has no use for its answer.
                drop(write.answer.send(answer));
            }
        });
    }
}

/// The set of tasks in flight, whatever a panicking holder left.
fn lock(in_flight: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A write's result before it is answered: the task as written, and a heartbeat's reply.
type Written = Result<(TaskRecord, Option<HeartbeatReply>)>;

/// A chunk of a task's log to insert with its row's write: the task, the chunk's offset, its
/// bytes.
type LogChunk<'a> = (&'a str, i64, &'a [u8]);

/// Writes one batch: the writes the store's copies serve in one guarded statement, the others
/// (and those whose copy turned out stale) in one locked transaction, done again write by
/// write if that fails. An answer per write; the tasks written are remembered for the next.
async fn write_batch(
    pool: &PgPool,
    written: &WrittenTasks,
    batch: &[LeasedWrite],
) -> Vec<Result<Changed>> {
    let mut results: Vec<Option<Written>> = write_from_copies(pool, written, batch).await;
    let rest: Vec<&LeasedWrite> = batch
        .iter()
        .zip(&results)
        .filter(|(_, result)| result.is_none())
        .map(|(write, _)| write)
        .collect();
    if !rest.is_empty() {
        let mut locked = match write_together(pool, &rest).await {
            Ok(locked) => locked,
            Err(error) => {
                tracing::debug!(%error, writes = rest.len(), "a batch failed; writing alone");
                let mut locked = Vec::with_capacity(rest.len());
                for write in &rest {
                    locked.push(write_alone(pool, write).await);
                }
                locked
            }
        }
        .into_iter();
        for result in results.iter_mut().filter(|result| result.is_none()) {
            *result = locked.next();
        }
    }
    let mut answers = Vec::with_capacity(batch.len());
    let mut remembered = Vec::with_capacity(batch.len());
    for result in results {
        answers.push(match result {
            Some(Ok((record, heartbeat))) => {
                let task = record.task.clone();
                remembered.push(record);
                Ok(Changed { task, heartbeat })
            }
            Some(Err(error)) => Err(error),
            None => Err(StoreError::Corrupt(
                "a write in a batch was not answered".to_owned(),
            )),
        });
    }
    written.remember(remembered);
    answers
}

/// The writes of the batch that the store's copies serve, applied to the copies and written in
/// one statement that commits by itself: `Some` answer for each written, `None` for each left
/// to the locked way (no copy, a change that is not plain, a refusal, which the row itself must
/// confirm, or a copy whose version the row no longer has). A failure of the statement wrote
/// nothing and leaves every write to the locked way.
async fn write_from_copies(
    pool: &PgPool,
    written: &WrittenTasks,
    batch: &[LeasedWrite],
) -> Vec<Option<Written>> {
    let mut results: Vec<Option<Written>> = batch.iter().map(|_| None).collect();
    let mut applied: Vec<(usize, TaskRecord, Option<HeartbeatReply>)> = Vec::new();
    let mut logs: Vec<(String, LogAppendPlan)> = Vec::new();
    {
        let mut copies = written.lock();
        for (index, write) in batch.iter().enumerate() {
            let Some(mut record) = copies.remove(&write.task_id) else {
                continue;
            };
            if !write.change.is_plain(&record) {
                continue;
            }
            if let Ok(done) = write.change.apply(&mut record, write.token, write.now) {
                if let Some(plan) = done.log {
                    logs.push((record.task.id.clone(), plan));
                }
                applied.push((index, record, done.heartbeat));
            }
        }
    }
    if applied.is_empty() {
        return results;
    }
    let records: Vec<&TaskRecord> = applied.iter().map(|(_, record, _)| record).collect();
    let matched = match pool.acquire().await {
        Ok(mut conn) => update_rows(&mut conn, &records, &log_chunks(&logs)).await,
        Err(error) => Err(error.into()),
    };
    let matched = match matched {
        Ok(matched) => matched,
        Err(error) => {
            tracing::debug!(%error, writes = applied.len(), "writing from copies failed; writing locked");
            return results;
        }
    };
    for (index, mut record, heartbeat) in applied {
        if matched.contains(&record.task.id) {
            record.version += 1;
            results[index] = Some(Ok((record, heartbeat)));
        }
    }
    results
}

/// The chunks of the log appends' plans, each with its task.
fn log_chunks(logs: &[(String, LogAppendPlan)]) -> Vec<LogChunk<'_>> {
    logs.iter()
        .flat_map(|(task_id, plan)| {
            plan.chunks
                .iter()
                .map(move |(seq, bytes)| (task_id.as_str(), signed(*seq), bytes.as_slice()))
        })
        .collect()
}

/// One write in a transaction of its own, as if it had come alone.
async fn write_alone(pool: &PgPool, write: &LeasedWrite) -> Written {
    let mut tx = pool.begin().await?;
    let result = async {
        let record = tasks::load_for_update(&mut tx, None, &write.task_id).await?;
        let mut answers = apply_all(&mut tx, vec![(write, Ok(record))]).await?;
        answers.pop().unwrap_or_else(|| {
            Err(StoreError::Corrupt(
                "a write alone was not answered".to_owned(),
            ))
        })
    }
    .await;
    // A write refused (a stale token, a finished task) wrote nothing: rolled back alike.
    finish(tx, result).await
}

/// The writes in one transaction, each task's row read and locked: each write's own result,
/// or the failure of the whole (nothing written).
async fn write_together(pool: &PgPool, batch: &[&LeasedWrite]) -> Result<Vec<Written>> {
    let mut tx = pool.begin().await?;
    let result = async {
        let ids: Vec<&str> = batch.iter().map(|write| write.task_id.as_str()).collect();
        let locked = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.id = ANY($1) ORDER BY t.id FOR UPDATE"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut records: HashMap<String, TaskRecord> = HashMap::with_capacity(locked.len());
        for row in &locked {
            let record = rows::task_record(row)?;
            records.insert(record.task.id.clone(), record);
        }
        let loaded = batch
            .iter()
            .map(|write| {
                let record = records
                    .remove(&write.task_id)
                    .ok_or_else(|| StoreError::not_found(format!("task {}", write.task_id)));
                (*write, record)
            })
            .collect();
        apply_all(&mut tx, loaded).await
    }
    .await;
    finish(tx, result).await
}

/// Applies each write to its loaded task, then writes every changed task in one statement
/// (with the bytes of the log appends among them, after cutting back the logs that reached
/// their cap), the retries their completions call for in another, and wakes the lease loops
/// when work came back. An `Err` of the whole is a failure of the transaction; a write refused
/// is its own `Err` in the list, with nothing of it written.
async fn apply_all(
    conn: &mut PgConnection,
    loaded: Vec<(&LeasedWrite, Result<TaskRecord>)>,
) -> Result<Vec<Written>> {
    let mut answers: Vec<Result<(TaskRecord, Option<HeartbeatReply>)>> =
        Vec::with_capacity(loaded.len());
    let mut unchanged: HashSet<String> = HashSet::new();
    let mut logs: Vec<(String, LogAppendPlan)> = Vec::new();
    let mut retries: Vec<Task> = Vec::new();
    let mut work_came_back = false;
    for (write, record) in loaded {
        let mut record = match record {
            Ok(record) => record,
            Err(error) => {
                answers.push(Err(error));
                continue;
            }
        };
        let was = record.task.status;
        let done = match write.change.apply(&mut record, write.token, write.now) {
            Ok(done) => done,
            Err(error) => {
                answers.push(Err(error));
                continue;
            }
        };
        if done.unchanged {
            unchanged.insert(record.task.id.clone());
        }
        if let Some(plan) = done.log {
            logs.push((record.task.id.clone(), plan));
        }
        if let Some(outcome) = write.change.outcome()
            && let Some(retry) = tasks::plan_retry(conn, &record, outcome, write.now).await?
        {
            retries.push(retry);
        }
        work_came_back |= was != TaskStatus::Queued && record.task.status == TaskStatus::Queued;
        answers.push(Ok((record, done.heartbeat)));
    }
    for (task_id, plan) in &logs {
        if let Some(keep) = plan.truncate_to {
            cut_log(conn, task_id, signed(keep)).await?;
        }
    }
    let mut changed: Vec<&mut TaskRecord> = answers
        .iter_mut()
        .filter_map(|answer| answer.as_mut().ok().map(|(record, _)| record))
        .filter(|record| !unchanged.contains(&record.task.id))
        .collect();
    write_many(conn, &mut changed, &log_chunks(&logs)).await?;
    if !retries.is_empty() {
        tasks::insert_rows(conn, &retries).await?;
        work_came_back = true;
    }
    if work_came_back {
        tasks::notify_work(conn).await?;
    }
    Ok(answers)
}

/// Cuts a task's stored log back to `keep` bytes, to make room for its truncation marker.
async fn cut_log(conn: &mut PgConnection, task_id: &str, keep: i64) -> Result<()> {
    sqlx::query("DELETE FROM task_logs WHERE task_id = $1 AND seq >= $2")
        .bind(task_id)
        .bind(keep)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE task_logs SET bytes = substring(bytes FROM 1 FOR ($2 - seq)::int) \
         WHERE task_id = $1 AND seq < $2 AND seq + length(bytes) > $2",
    )
    .bind(task_id)
    .bind(keep)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `tasks::write` for many records in one statement: every column a task's life changes,
/// each row guarded by the version it was loaded with (which cannot have moved while this
/// transaction holds the row locks); bumps each version. The rows are named by `id = ANY(…)`
/// as well as joined, so that the planner probes the primary key instead of scanning the
/// table (see `leases::write_leases`).
async fn write_many(
    conn: &mut PgConnection,
    records: &mut [&mut TaskRecord],
    logs: &[LogChunk<'_>],
) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let matched = {
        let rows: Vec<&TaskRecord> = records.iter().map(|record| &**record).collect();
        update_rows(conn, &rows, logs).await?
    };
    if matched.len() != records.len() {
        return Err(StoreError::Conflict(
            "tasks changed while a batch of writes held them; try again".to_owned(),
        ));
    }
    for record in records.iter_mut() {
        record.version += 1;
    }
    Ok(())
}

/// The `UPDATE` of `write_many`: writes each record whose row still has its version, and
/// returns the ids of those written (their versions in `records` are left as they were). The
/// `logs` chunks of the rows written are inserted by the same statement; those of a row not
/// written are not.
async fn update_rows(
    conn: &mut PgConnection,
    records: &[&TaskRecord],
    logs: &[LogChunk<'_>],
) -> Result<HashSet<String>> {
    let tasks = || records.iter().map(|record| &record.task);
    let written: Vec<(String,)> = sqlx::query_as(
        "WITH written AS (UPDATE tasks SET status = r.status, updated_at = r.updated_at, due_at = r.due_at, \
         start_time = r.start_time, end_time = r.end_time, percent = r.percent, msg = r.msg, \
         exit_code = r.exit_code, log_size = r.log_size, log_truncated = r.log_truncated, \
         infra_attempts = r.infra_attempts, cancel_requested = r.cancel_requested, \
         peak_memory_bytes = r.peak_memory_bytes, cpu_time_ms = r.cpu_time_ms, \
         runner_id = r.runner_id, lease_token = r.lease_token, \
         lease_expires_at = r.lease_expires_at, version = tasks.version + 1 \
         FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
         $6::smallint[], $7::text[], $8::bigint[], $9::bigint[], $10::boolean[], $11::bigint[], \
         $12::boolean[], $13::bigint[], $14::bigint[], $15::text[], $16::bigint[], \
         $17::bigint[], $18::text[], $19::bigint[]) \
         AS r(status, updated_at, due_at, start_time, end_time, percent, msg, exit_code, \
         log_size, log_truncated, infra_attempts, cancel_requested, peak_memory_bytes, \
         cpu_time_ms, runner_id, lease_token, lease_expires_at, id, version) \
         WHERE tasks.id = ANY($18) AND tasks.id = r.id AND tasks.version = r.version \
         RETURNING tasks.id), \
         logged AS (INSERT INTO task_logs (task_id, seq, bytes) \
         SELECT l.task_id, l.seq, l.bytes \
         FROM unnest($20::text[], $21::bigint[], $22::bytea[]) AS l (task_id, seq, bytes) \
         JOIN written AS w ON w.id = l.task_id) \
         SELECT id FROM written",
    )
    .bind(tasks().map(|task| task.status.as_str()).collect::<Vec<_>>())
    .bind(
        tasks()
            .map(|task| micros(task.updated_at))
            .collect::<Vec<_>>(),
    )
    .bind(tasks().map(|task| micros(task.due_at)).collect::<Vec<_>>())
    .bind(
        tasks()
            .map(|task| opt_micros(task.start_time))
            .collect::<Vec<_>>(),
    )
    .bind(
        tasks()
            .map(|task| opt_micros(task.end_time))
            .collect::<Vec<_>>(),
    )
    .bind(
        tasks()
            .map(|task| task.percent.map(i16::from))
            .collect::<Vec<_>>(),
    )
    .bind(tasks().map(|task| task.msg.as_deref()).collect::<Vec<_>>())
    .bind(tasks().map(|task| task.exit_code).collect::<Vec<_>>())
    .bind(
        tasks()
            .map(|task| signed(task.log_size))
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|record| record.log_truncated)
            .collect::<Vec<_>>(),
    )
    .bind(
        tasks()
            .map(|task| i64::from(task.infra_attempts))
            .collect::<Vec<_>>(),
    )
    .bind(
        tasks()
            .map(|task| task.cancel_requested)
            .collect::<Vec<_>>(),
    )
    .bind(
        tasks()
            .map(|task| opt_signed(task.peak_memory_bytes))
            .collect::<Vec<_>>(),
    )
    .bind(
        tasks()
            .map(|task| opt_signed(task.cpu_time_ms))
            .collect::<Vec<_>>(),
    )
    .bind(
        tasks()
            .map(|task| task.runner_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|record| record.lease_token)
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|record| opt_micros(record.lease_expires_at))
            .collect::<Vec<_>>(),
    )
    .bind(tasks().map(|task| task.id.as_str()).collect::<Vec<_>>())
    .bind(
        records
            .iter()
            .map(|record| record.version)
            .collect::<Vec<_>>(),
    )
    .bind(logs.iter().map(|(task_id, _, _)| *task_id).collect::<Vec<_>>())
    .bind(logs.iter().map(|(_, seq, _)| *seq).collect::<Vec<_>>())
    .bind(logs.iter().map(|(_, _, bytes)| *bytes).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    Ok(written.into_iter().map(|(id,)| id).collect())
}

impl PgStore {
    /// Writes a runner's change about a leased task through the store's batches.
    pub(super) async fn change_leased(
        &self,
        task_id: &str,
        token: i64,
        change: LeasedChange,
        now: Timestamp,
    ) -> Result<Changed> {
        self.leased_writes.write(task_id, token, change, now).await
    }
}
