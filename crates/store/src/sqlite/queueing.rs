//! Queueing, combined: every `enqueue` hands its request to one queue, and whoever drains the
//! queue writes all the requests waiting in it with one quota read and one code lookup per
//! project and one `INSERT`, in one transaction (or the open group commit).
//!
//! ```text
//! enqueue ──request──▶ waiting requests ──▶ drainer (one at a time, a task of its own):
//!    ▲                                       take every waiting request
//!    │                                       the writer: alone BEGIN … COMMIT, or in the group
//!    │                                         quota limits and count, once per project
//!    │                                         code id and revision, once per (project, name)
//!    │                                         each request checked in arrival order
//!    │                                         one INSERT of every accepted task
//!    └──────── its own answer, after the commit that holds its tasks
//! ```
//!
//! Nothing is promised less than a request alone promises: a request is all or nothing (a
//! quota, a missing code or revision refuses it alone and writes none of its tasks), the
//! queued-tasks quota counts the tasks of the requests accepted before it in the same batch,
//! and a caller hears back only after the commit that holds its tasks. When the batch as a
//! whole fails (a database error), nothing of it was written and each request is written again
//! alone, so one request's trouble is never another's answer.
//!
//! A request whose caller went away before its batch was formed is withdrawn, as a transaction
//! dropped before its commit would be; once in a batch it is written whatever becomes of its
//! caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::Connection;
use sqlx::sqlite::SqliteConnection;
use stevedore_model::{NewTask, Quota, QuotaLimits, Task, Timestamp};
use tokio::sync::oneshot;

use super::writer::Writing;
use super::{BEGIN_WRITE, quotas, tasks};
use crate::{Result, StoreError};

/// The most tasks one batch writes (a request larger than this is a batch of its own), so
/// that one transaction, and the wait of its first request, stays short.
const MAX_BATCH_TASKS: usize = 2048;

/// The requests waiting to be written, and whether a drainer is at work on them.
#[derive(Default)]
pub(super) struct Queueings {
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    requests: Vec<QueueRequest>,
    /// A drainer is running: it takes what is waiting before it stops.
    draining: bool,
}

/// One caller's `enqueue`, waiting for its batch.
struct QueueRequest {
    queueing: Queueing,
    answer: oneshot::Sender<Result<Vec<Task>>>,
}

/// What one `enqueue` asks for.
#[derive(Clone)]
struct Queueing {
    project_id: String,
    new_tasks: Vec<NewTask>,
    now: Timestamp,
}

/// Queues `new_tasks` for `project_id` with whatever other requests are waiting, and returns
/// after the commit that holds them.
pub(super) async fn enqueue(
    writing: &Arc<Writing>,
    quota_defaults: QuotaLimits,
    project_id: &str,
    new_tasks: &[NewTask],
    now: Timestamp,
) -> Result<Vec<Task>> {
    let (answer, answered) = oneshot::channel();
    let request = QueueRequest {
        queueing: Queueing {
            project_id: project_id.to_owned(),
            new_tasks: new_tasks.to_vec(),
            now,
        },
        answer,
    };
    let start_drainer = {
        let mut pending = lock(&writing.queueings.pending);
        pending.requests.push(request);
        !std::mem::replace(&mut pending.draining, true)
    };
    if start_drainer {
        tokio::spawn(drain(Arc::clone(writing), quota_defaults));
    }
    answered.await.map_err(|_| {
        StoreError::Database(sqlx::Error::Io(std::io::Error::other(
            "the batch holding this enqueue was stopped before it answered",
        )))
    })?
}

/// Writes batches of the waiting requests until none waits.
async fn drain(writing: Arc<Writing>, quota_defaults: QuotaLimits) {
    let mut draining = Draining {
        writing: &writing,
        ended: false,
    };
    loop {
        let batch: Vec<QueueRequest> = {
            let mut pending = lock(&writing.queueings.pending);
            if pending.requests.is_empty() {
                pending.draining = false;
                draining.ended = true;
                return;
            }
            // Whole requests, at least one, up to `MAX_BATCH_TASKS` tasks.
            let mut tasks = 0;
            let taken = pending
                .requests
                .iter()
                .take_while(|request| {
                    let first = tasks == 0;
                    tasks += request.queueing.new_tasks.len().max(1);
                    first || tasks <= MAX_BATCH_TASKS
                })
                .count();
            pending.requests.drain(..taken).collect()
        };
        let (queueings, answers): (Vec<Queueing>, Vec<_>) = batch
            .into_iter()
            // Withdrawn: its caller went away before the batch began.
            .filter(|request| !request.answer.is_closed())
            .map(|request| (request.queueing, request.answer))
            .unzip();
        if queueings.is_empty() {
            continue;
        }
        let queueings: Arc<[Queueing]> = queueings.into();
        let results = match write_batch(&writing, quota_defaults, Arc::clone(&queueings)).await {
            Ok(results) => results,
            Err(error) if queueings.len() > 1 => {
                tracing::debug!(%error, requests = queueings.len(), "a queueing batch failed; writing alone");
                let mut results = Vec::with_capacity(queueings.len());
                for queueing in queueings.iter() {
                    let alone: Arc<[Queueing]> = Arc::new([queueing.clone()]);
                    results.push(match write_batch(&writing, quota_defaults, alone).await {
                        Ok(mut result) => result.pop().unwrap_or_else(|| {
                            Err(StoreError::Corrupt(
                                "a queueing alone was not answered".to_owned(),
                            ))
                        }),
                        Err(error) => Err(error),
                    });
                }
                results
            }
            Err(error) => vec![Err(error)],
        };
        for (answer, result) in answers.into_iter().zip(results) {
            // A caller that went away meanwhile has no use for its answer.
            drop(answer.send(result));
        }
    }
}

/// One batch on the writer: in a transaction of its own when the writer is free, else in the
/// open group (`Writing::in_group`; this runs on the drainer's task of its own). An answer per
/// request, or the failure of the whole (nothing written).
async fn write_batch(
    writing: &Writing,
    quota_defaults: QuotaLimits,
    batch: Arc<[Queueing]>,
) -> Result<Vec<Result<Vec<Task>>>> {
    let writer = writing.lock_writer().await?;
    match writing.alone(writer) {
        Ok(mut writer) => {
            let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
            let results = queue_requests(&mut tx, &quota_defaults, &batch).await?;
            tx.commit().await?;
            Ok(results)
        }
        Err(writer) => {
            writing
                .in_group(writer, move |writer| {
                    Box::pin(async move {
                        // Reads, then one `INSERT`: a failure of the `INSERT` is a database
                        // error, which ends the group.
                        Ok(queue_requests(&mut writer.conn, &quota_defaults, &batch).await?)
                    })
                })
                .await
        }
    }
}

/// The batch's work inside whatever transaction the writer is in: each request checked in
/// order (its project's queued-tasks quota, counting the requests accepted before it; its
/// codes), then every accepted task inserted in one statement. A refused request is its own
/// `Err`; an `Err` of the whole is a database error, after which the transaction must not
/// commit.
async fn queue_requests(
    conn: &mut SqliteConnection,
    quota_defaults: &QuotaLimits,
    batch: &[Queueing],
) -> Result<Vec<Result<Vec<Task>>>> {
    // Per project: its limits and what it holds queued, with the batch's accepted tasks.
    let mut projects: HashMap<&str, (QuotaLimits, u64)> = HashMap::new();
    let mut codes = tasks::CodeLookups::default();
    let mut accepted: Vec<Task> = Vec::new();
    // Per request: how many of `accepted` are its, or why it was refused.
    let mut outcomes: Vec<Result<usize>> = Vec::with_capacity(batch.len());
    for queueing in batch {
        let project_id = queueing.project_id.as_str();
        let (limits, queued) = match projects.get(project_id) {
            Some(known) => *known,
            None => {
                let limits = quotas::limits(conn, quota_defaults, project_id).await?;
                let queued = quotas::used(conn, Quota::QueuedTasks, project_id).await?;
                (limits, queued)
            }
        };
        let adding = queueing.new_tasks.len() as u64;
        if adding > 0
            && let Err(exceeded) = limits.check(Quota::QueuedTasks, queued, adding)
        {
            projects.insert(project_id, (limits, queued));
            outcomes.push(Err(exceeded.into()));
            continue;
        }
        match tasks::plan_tasks(
            conn,
            &mut codes,
            project_id,
            &queueing.new_tasks,
            queueing.now,
        )
        .await
        {
            Ok(planned) => {
                projects.insert(project_id, (limits, queued + adding));
                outcomes.push(Ok(planned.len()));
                accepted.extend(planned);
            }
            Err(error @ StoreError::Database(_)) => return Err(error),
            Err(refused) => {
                projects.insert(project_id, (limits, queued));
                outcomes.push(Err(refused));
            }
        }
    }
    tasks::insert_rows(conn, &accepted).await?;
    let mut accepted = accepted.into_iter();
    Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.map(|count| accepted.by_ref().take(count).collect()))
        .collect())
}

/// Marks the drainer stopped if it ends other than by finding nothing to do (a panic, the
/// runtime shutting down), so that the next request starts another instead of waiting for it.
struct Draining<'a> {
    writing: &'a Writing,
    /// It ended by finding nothing to do, and said so itself.
    ended: bool,
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        if !self.ended {
            lock(&self.writing.queueings.pending).draining = false;
        }
    }
}

/// The waiting requests, whatever a panicking holder left.
fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
