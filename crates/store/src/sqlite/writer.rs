//! The writer: the one connection that writes, behind its lock, and the group commits that let
//! many small writes share one transaction: changes to one task (a runner's heartbeat, start or
//! completion, a user's cancel) and queueings of tasks. A write in a group, once it holds the
//! writer, runs on a task of its own (`detached`), so that it is whole whatever becomes of its
//! caller.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::SqliteConnection;
use stevedore_model::{Task, TaskOutcome, Timestamp};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard, watch};

use super::codes::RevisionCache;
use super::leases::LeaseCache;
use super::queueing::Queueings;
use super::{BEGIN_WRITE, SqliteStore, tasks};
use crate::Result;
use crate::StoreError;
use crate::record::TaskRecord;

/// The writer connection behind its lock, and the state of its group commits.
pub(super) struct Writing {
    /// The one connection that writes; holding the lock is the write lock. `None` once closed.
    /// Its own `Arc` so that a detached unit of work can own the lock.
    writer: Arc<Mutex<Option<Writer>>>,
    /// Callers waiting for the writer. A small write that sees others waiting leaves its
    /// transaction open for them, and the last of them commits (group commit).
    waiting: AtomicUsize,
    /// How the latest group commit ended, for the callers whose writes it held.
    commits: watch::Sender<GroupCommits>,
    /// Requests to queue tasks, waiting to be written together.
    pub(super) queueings: Queueings,
}

/// The writer, held: the write lock.
pub(super) type WriterGuard = OwnedMappedMutexGuard<Option<Writer>, Writer>;

/// The writer connection and what only the writer touches.
pub(super) struct Writer {
    pub(super) conn: SqliteConnection,
    pub(super) leases: LeaseCache,
    pub(super) revisions: RevisionCache,
    /// The group transaction left open for waiting writers, if any.
    pub(super) group: Option<OpenGroup>,
    /// The last group's number; groups are numbered in order.
    last_group: u64,
}

/// A transaction that small writes share so that they pay for one commit.
pub(super) struct OpenGroup {
    number: u64,
    writes: usize,
}

/// The outcome of group commits, as waiting writers read it.
#[derive(Debug, Clone, Default)]
struct GroupCommits {
    /// The last group that ended (committed or rolled back).
    last_ended: u64,
    /// Recent groups that failed, with why; any other ended group committed.
    failed: VecDeque<(u64, Arc<str>)>,
}

/// The most writes one group commit holds, so that its first writer's wait stays short.
const MAX_GROUP_WRITES: usize = 64;

/// How long a writer waits for its group to commit before committing it itself: only when the
/// group was left open for a waiter that went away before it held the writer.
const GROUP_COMMIT_PATIENCE: Duration = Duration::from_millis(100);

/// How many failed groups `GroupCommits` remembers.
const FAILED_GROUPS_KEPT: usize = 16;

impl SqliteStore {
    /// Commits the group transaction, if one is open, and closes the writer's connection.
    pub(super) async fn close_writer(&self) {
        drop(self.writer().await);
        if let Some(writer) = self.writing.writer.lock().await.take()
            && let Err(error) = writer.conn.close().await
        {
            tracing::warn!(%error, "closing the SQLite writer connection failed");
        }
    }

    /// The writer for a caller that needs it alone: an open group is committed first, on a
    /// task of its own so that the group's end is told to its writers whatever becomes of this
    /// caller. What the caller then does must be cancel-safe by itself: a sqlx transaction
    /// (rolled back when dropped) or a single statement.
    pub(super) async fn writer(&self) -> Result<WriterGuard> {
        let writer = self.writing.lock_writer().await?;
        if writer.group.is_none() {
            return Ok(writer);
        }
        let writing = Arc::clone(&self.writing);
        detached(async move {
            let mut writer = writer;
            if let Err(error) = writing.end_group(&mut writer, true).await {
                // The group's own writers learn of it; this caller's work is not affected.
                tracing::warn!(%error, "a group commit failed");
            }
            Ok(writer)
        })
        .await
    }

    /// Changes one task: loads it (from the lease cache when it is there), lets `change` alter
    /// it, writes it back guarded by its version. `change` may run twice: on a cached record
    /// and, if that turns out stale, on the row read afresh. With `retry`, a runner's
    /// completion, the user retry it calls for is queued in the same transaction.
    ///
    /// Alone, the write commits by itself (in a transaction of its own when it may queue a
    /// retry, so the completion and its retry commit together). When other writers are
    /// waiting, it opens (or joins) a group transaction, leaves it open for them and returns
    /// once the last of them has committed it: under load, many single-task writes share one
    /// commit. A write in a group runs, once this caller holds the writer, on a task of its own
    /// (`detached`): a caller dropped after that point leaves it to run to its commit or
    /// rollback.
    pub(super) async fn change_task<T: Send + 'static>(
        &self,
        project_id: Option<&str>,
        task_id: &str,
        retry: Option<RetryCheck>,
        change: impl FnMut(&mut TaskRecord) -> Result<T> + Send + 'static,
    ) -> Result<(TaskRecord, T)> {
        let writer = self.writing.lock_writer().await?;
        let mut writer = match self.writing.alone(writer) {
            Ok(writer) => writer,
            Err(writer) => {
                let (project_id, task_id) = (project_id.map(str::to_owned), task_id.to_owned());
                return self
                    .write_in_group(writer, move |writer| {
                        Box::pin(async move {
                            let Writer {
                                conn,
                                leases,
                                revisions,
                                ..
                            } = writer;
                            change_one_task(
                                conn,
                                leases,
                                revisions,
                                project_id.as_deref(),
                                &task_id,
                                retry.as_ref(),
                                change,
                            )
                            .await
                        })
                    })
                    .await;
            }
        };
        // Alone, the write is whole wherever this caller stops, without a task of its own: one
        // guarded `UPDATE` after reads or, with a retry to queue, a sqlx transaction (rolled
        // back when dropped; a `BEGIN` it never saw acknowledged is rolled back by sqlx too).
        let Writer {
            conn,
            leases,
            revisions,
            ..
        } = &mut *writer;
        if retry.is_none() {
            return change_one_task(conn, leases, revisions, project_id, task_id, None, change)
                .await
                .map_err(|failed| failed.error);
        }
        let mut tx = conn.begin_with(BEGIN_WRITE).await?;
        let changed = change_one_task(
            &mut tx,
            leases,
            revisions,
            project_id,
            task_id,
            retry.as_ref(),
            change,
        )
        .await
        .map_err(|failed| failed.error)?;
        tx.commit().await?;
        Ok(changed)
    }

    /// `change_task` for a runner holding a lease: refused unless `token` is current.
    pub(super) async fn change_leased_task<T: Send + 'static>(
        &self,
        task_id: &str,
        token: i64,
        retry: Option<RetryCheck>,
        mut change: impl FnMut(&mut TaskRecord) -> Result<T> + Send + 'static,
    ) -> Result<(TaskRecord, T)> {
        self.change_task(None, task_id, retry, move |record| {
            record.check_lease(token)?;
            change(record)
        })
        .await
    }

    /// Runs `work` in the group transaction, opening one if none is open, on a task of its own
    /// (`detached`), and returns once the group that holds the work has committed. For a caller
    /// that holds the writer and found others waiting for it (`Writing::alone`). `work` must
    /// say, when it fails, whether it had written anything (`ChangeFailed::wrote`): a refusal
    /// before any write leaves the group to the others, anything else rolls it back.
    pub(super) async fn write_in_group<T: Send + 'static>(
        &self,
        writer: WriterGuard,
        work: impl for<'a> FnOnce(&'a mut Writer) -> GroupWork<'a, T> + Send + 'static,
    ) -> Result<T> {
        let writing = Arc::clone(&self.writing);
        detached(async move { writing.in_group(writer, work).await }).await
    }
}

/// A unit of write work in a group transaction, borrowing the writer while it runs.
pub(super) type GroupWork<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, ChangeFailed>> + Send + 'a>>;

impl Writing {
    /// The writer over `conn`, with empty caches and no group open.
    pub(super) fn new(conn: SqliteConnection) -> Writing {
        Writing {
            writer: Arc::new(Mutex::new(Some(Writer {
                conn,
                leases: LeaseCache::default(),
                revisions: RevisionCache::default(),
                group: None,
                last_group: 0,
            }))),
            waiting: AtomicUsize::new(0),
            commits: watch::Sender::new(GroupCommits::default()),
            queueings: Queueings::default(),
        }
    }

    /// The held writer back when its holder may write alone (no group is open and nobody
    /// waits); otherwise it should write in the group (`SqliteStore::write_in_group`), so that
    /// its commit is shared.
    pub(super) fn alone(&self, writer: WriterGuard) -> Result<WriterGuard, WriterGuard> {
        if writer.group.is_some() || self.waiting.load(Ordering::SeqCst) > 0 {
            Err(writer)
        } else {
            Ok(writer)
        }
    }

    /// The writer as it is, an open group included; counted in `waiting` until it is ours.
    pub(super) async fn lock_writer(&self) -> Result<WriterGuard> {
        let waiting = Waiting::new(&self.waiting);
        let writer = Arc::clone(&self.writer).lock_owned().await;
        drop(waiting);
        OwnedMutexGuard::try_map(writer, Option::as_mut)
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))
    }

    /// Commits (or rolls back) the open group, if there is one, and tells its writers.
    async fn end_group(&self, writer: &mut Writer, commit: bool) -> Result<()> {
        let Some(group) = writer.group.take() else {
            return Ok(());
        };
        tracing::trace!(
            group = group.number,
            writes = group.writes,
            commit,
            "ending a group commit"
        );
        let ended = if commit {
            sqlx::query("COMMIT")
                .execute(&mut writer.conn)
                .await
                .map(drop)
        } else {
            Err(sqlx::Error::Io(std::io::Error::other(
                "a write in its group failed",
            )))
        };
        let failure = ended
            .as_ref()
            .err()
            .map(|error| Arc::<str>::from(error.to_string()));
        if failure.is_some() {
            // A failed COMMIT may leave the transaction open; a rolled-back one is gone.
            if let Err(error) = sqlx::query("ROLLBACK").execute(&mut writer.conn).await {
                tracing::debug!(%error, "rolling back a failed group");
            }
        }
        self.commits.send_modify(|commits| {
            commits.last_ended = group.number;
            if let Some(failure) = failure {
                commits.failed.push_back((group.number, failure));
                if commits.failed.len() > FAILED_GROUPS_KEPT {
                    commits.failed.pop_front();
                }
            }
        });
        ended.map_err(StoreError::from)
    }

    /// Waits until group `number` has ended; its failure is this caller's failure.
    async fn wait_for_group(&self, number: u64) -> Result<()> {
        let mut commits = self.commits.subscribe();
        loop {
            {
                let ended = commits.borrow_and_update();
                if ended.last_ended >= number {
                    return match ended.failed.iter().find(|(failed, _)| *failed == number) {
                        Some((_, why)) => Err(StoreError::Database(sqlx::Error::Io(
                            std::io::Error::other(format!(
                                "the group commit holding this write failed: {why}"
                            )),
                        ))),
                        None => Ok(()),
                    };
                }
            }
            if tokio::time::timeout(GROUP_COMMIT_PATIENCE, commits.changed())
                .await
                .is_err()
            {
                // The group was left to a waiter that had no use for it (it was dropped while
                // it waited for the writer, or it only read): commit it ourselves. Whoever
                // holds the writer between two writes may end the open group; the outcome
                // reaches this loop through `commits`.
                let mut writer = self.lock_writer().await?;
                drop(self.end_group(&mut writer, true).await);
            }
        }
    }

    /// A unit of write work in the group transaction, from the held writer to the end of the
    /// group. Not cancel-safe by itself (a drop between a completion and its retry would leave
    /// the group with half a change, a drop right after `BEGIN` a transaction nobody tracks):
    /// only ever run through `detached` or on a task of its own.
    pub(super) async fn in_group<T>(
        &self,
        mut writer: WriterGuard,
        work: impl for<'a> FnOnce(&'a mut Writer) -> GroupWork<'a, T>,
    ) -> Result<T> {
        if writer.group.is_none() {
            sqlx::query(BEGIN_WRITE).execute(&mut writer.conn).await?;
            writer.last_group += 1;
            writer.group = Some(OpenGroup {
                number: writer.last_group,
                writes: 0,
            });
        }
        let changed = work(&mut writer).await;
        let Some(group) = writer.group.as_mut() else {
            return changed.map_err(|failed| failed.error);
        };
        let wrote = match &changed {
            Ok(_) => true,
            // Something was written but not all of it (a completion without its retry), or a
            // statement failed half-way, perhaps with the transaction: end the group.
            Err(failed) if failed.wrote || matches!(failed.error, StoreError::Database(_)) => {
                drop(self.end_group(&mut writer, false).await);
                return changed.map_err(|failed| failed.error);
            }
            // Refused before anything was written.
            Err(_) => false,
        };
        let changed = changed.map_err(|failed| failed.error);
        group.writes += usize::from(wrote);
        let number = group.number;
        if self.waiting.load(Ordering::SeqCst) > 0 && group.writes < MAX_GROUP_WRITES {
            drop(writer);
            if wrote {
                self.wait_for_group(number).await?;
            }
            return changed;
        }
        let committed = self.end_group(&mut writer, true).await;
        if wrote {
            committed?;
        }
        changed
    }
}

/// Runs a unit of write work on a task of its own and waits for its result. Dropping the
/// caller's future leaves the unit running to its end (a commit or a rollback), so a write is
/// never cut between two of its statements nor leaves the writer in an untracked transaction.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Only a runtime shutting down cancels the task; the writer's connection rolls back
        // whatever it had not committed when it closes.
        Err(error) => Err(StoreError::Database(sqlx::Error::Io(
            std::io::Error::other(format!("a write was stopped before it finished: {error}")),
        ))),
    }
}

/// A runner's completion, for `change_task` to queue the user retry it calls for.
#[derive(Debug, Clone)]
pub(super) struct RetryCheck {
    pub(super) outcome: TaskOutcome,
    pub(super) now: Timestamp,
}

/// Why a unit of write work failed, and whether it had written anything by then.
pub(super) struct ChangeFailed {
    pub(super) error: StoreError,
    pub(super) wrote: bool,
}

impl From<StoreError> for ChangeFailed {
    fn from(error: StoreError) -> Self {
        ChangeFailed {
            error,
            wrote: false,
        }
    }
}

/// `SqliteStore::change_task`'s work inside whatever transaction the writer is in.
async fn change_one_task<T>(
    conn: &mut SqliteConnection,
    leases: &mut LeaseCache,
    revisions: &mut RevisionCache,
    project_id: Option<&str>,
    task_id: &str,
    retry: Option<&RetryCheck>,
    mut change: impl FnMut(&mut TaskRecord) -> Result<T>,
) -> Result<(TaskRecord, T), ChangeFailed> {
    if let Some(mut record) = leases.take(task_id)
        && project_id.is_none_or(|project_id| project_id == record.task.project_id)
        && let Ok(value) = change(&mut record)
    {
        let queued = plan_follow_up(conn, revisions, &record, retry).await?;
        if tasks::write(conn, &mut record).await? {
            write_follow_up(conn, &queued).await?;
            leases.remember(&record);
            return Ok((record, value));
        }
    }
    let mut record = tasks::load(conn, project_id, task_id).await?;
    let value = change(&mut record)?;
    let queued = plan_follow_up(conn, revisions, &record, retry).await?;
    tasks::write_loaded(conn, &mut record).await?;
    write_follow_up(conn, &queued).await?;
    leases.remember(&record);
    Ok((record, value))
}

/// The retry a changed task calls for, read before the task is written so that a failure
/// here leaves nothing written.
async fn plan_follow_up(
    conn: &mut SqliteConnection,
    revisions: &mut RevisionCache,
    record: &TaskRecord,
    retry: Option<&RetryCheck>,
) -> Result<Option<Task>> {
    match retry {
        Some(RetryCheck { outcome, now }) => {
            tasks::plan_retry(conn, revisions, record, outcome, *now).await
        }
        None => Ok(None),
    }
}

/// Queues the planned retry after the task itself was written.
async fn write_follow_up(
    conn: &mut SqliteConnection,
    queued: &Option<Task>,
) -> Result<(), ChangeFailed> {
    tasks::insert_rows(conn, queued.as_slice())
        .await
        .map_err(|error| ChangeFailed { error, wrote: true })
}

/// Counts a caller in `SqliteStore::waiting` for as long as it lives, cancellation included.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
