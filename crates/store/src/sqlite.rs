//! SQLite: the embedded default store.
//!
//! One database file in WAL mode. Every write goes through a single writer connection behind
//! an async mutex, so writes serialize inside the process and never meet `SQLITE_BUSY`; reads
//! use a small pool of read-only connections that WAL lets run beside the writer. The writer
//! is not a sqlx pool of one because a pool pings a connection each time it is returned: one
//! more round trip to SQLite's worker thread per write. Migrations are embedded in the binary
//! and run on open. Timestamps are integer microseconds since the epoch; code specs and
//! schedule specs are JSON; packages and logs are BLOBs.
//!
//! Throughput comes from counting statements, since each one is a round trip to the
//! connection's worker thread: a lease batch is a handful of statements whatever its size, a
//! queue batch is one `INSERT`, and a runner's heartbeat, start or completion is one guarded
//! `UPDATE` on a record the writer remembers from the lease (`tasks::LeaseCache`). WAL
//! checkpoints run on their own connection in the background, off the commit path.
//!
//! A write in a group transaction (from the group's `BEGIN`, through a completion and its
//! retry, to the group's `COMMIT` and the telling of its writers) runs on a task of its own that
//! holds the writer (`detached`): a caller dropped half-way (a client that disconnects, a
//! runner's request timeout) never leaves a completion without its retry, nor the writer in a
//! transaction nobody tracks. The other writes use sqlx transactions, which roll back when
//! dropped, or single statements, whole wherever their caller stops.
//!
//! The SQL lives here and in `sqlite/tasks.rs` (the task and lease queries); what a state
//! change does to a task is decided in `crate::record`, shared with every backend.

#[cfg(test)]
mod cancellation_tests;
mod clusters;
mod credentials;
mod gauges;
mod rows;
mod tasks;
mod usage;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, QueryBuilder, Row, Sqlite};
use stevedore_model::{
    CodeRevision, CodeSpec, NewTask, Schedule, ScheduleSpec, ScheduleStatus, Task, TaskOutcome,
    TaskStatus, Timestamp, new_id,
};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use self::rows::{
    micros, opt_micros, opt_signed, revision_columns, role_text, schedule_columns, signed,
    task_columns, to_json,
};
use crate::record::{TaskRecord, normalize, plan_log_append};
use crate::{
    Cluster, ClusterLoad, ClusterSpec, CodeCancellation, CodeStats, HeartbeatReply, Leadership,
    LeaseRequest, LeasedTask, LogSlice, Package, Page, Project, QueueWait, Requeue, RescuedTask,
    Result, RunReport, RunnerSeen, SealedSecret, StatsWindow, Store, StoreError, StoreGauges,
    StoredCredential, TaskFilter, TokenRecord, TokenRole, UsageQuery, UsageRow,
};

/// The leadership of the one process that uses a SQLite database.
struct SoleProcess;

#[async_trait]
impl Leadership for SoleProcess {
    async fn is_held(&self) -> bool {
        true
    }
}

/// How hard SQLite works to make a commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// WAL with `synchronous=NORMAL`: a commit survives a crash of the process (kill -9) but
    /// may be lost to a power failure. The default.
    #[default]
    Normal,
    /// `synchronous=FULL`: a commit also survives a power failure, at the cost of an fsync
    /// per transaction.
    Full,
}

/// Where and how to open the database.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file; created with its directory when missing.
    pub path: PathBuf,
    pub sync: SyncMode,
}

/// The SQLite store. Cheap to share behind an `Arc`; every method is safe to call
/// concurrently.
pub struct SqliteStore {
    /// The writer and its group commits, shared with the tasks that finish units of write work
    /// for callers that may be gone.
    writing: Arc<Writing>,
    /// Read-only connections for queries that change nothing.
    readers: SqlitePool,
    /// Copies the WAL back into the database file in the background; stopped on close and drop.
    checkpointer: JoinHandle<()>,
}

/// The writer connection behind its lock, and the state of its group commits.
struct Writing {
    /// The one connection that writes; holding the lock is the write lock. `None` once closed.
    /// Its own `Arc` so that a detached unit of work can own the lock.
    writer: Arc<Mutex<Option<Writer>>>,
    /// Callers waiting for the writer. A single-task write that sees others waiting leaves
    /// its transaction open for them, and the last of them commits (group commit).
    waiting: AtomicUsize,
    /// How the latest group commit ended, for the callers whose writes it held.
    commits: watch::Sender<GroupCommits>,
}

/// The writer, held: the write lock.
type WriterGuard = OwnedMappedMutexGuard<Option<Writer>, Writer>;

/// The writer connection and what only the writer touches.
struct Writer {
    conn: SqliteConnection,
    leases: tasks::LeaseCache,
    revisions: tasks::RevisionCache,
    /// The group transaction left open for waiting writers, if any.
    group: Option<OpenGroup>,
    /// The last group's number; groups are numbered in order.
    last_group: u64,
}

/// A transaction that single-task writes share so that they pay for one commit.
struct OpenGroup {
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

/// How many read connections to keep. Reads are short; a few cover a 2-core machine.
const READ_CONNECTIONS: u32 = 4;
/// How long a connection waits on a lock held by another process before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most writes one group commit holds, so that its first writer's wait stays short.
const MAX_GROUP_WRITES: usize = 64;
/// How long a writer waits for its group to commit before committing it itself: only when the
/// group was left open for a waiter that went away before it held the writer.
const GROUP_COMMIT_PATIENCE: Duration = Duration::from_millis(100);
/// How many failed groups `GroupCommits` remembers.
const FAILED_GROUPS_KEPT: usize = 16;
/// How often the background checkpointer copies committed WAL pages into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// The WAL size, in pages, past which the writer checkpoints by itself. SQLite's default
/// (1000) makes every few hundred commits pay for a checkpoint and its fsyncs; with the
/// background checkpointer doing the copying, the writer's own checkpoint only has to find the
/// WAL fully copied so the file can start over.
const WRITER_AUTOCHECKPOINT_PAGES: &str = "8000";

/// IMMEDIATE takes the write lock up front, so a transaction that reads before it writes can
/// never fail to upgrade its lock half-way through (only possible with a second process).
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

// === impl SqliteOptions ===

impl SqliteOptions {
    /// A database at `path` with the default (`Normal`) durability.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sync: SyncMode::default(),
        }
    }
}

// === impl SqliteStore ===

impl SqliteStore {
    /// Opens (creating when missing) the database and brings its schema up to date.
    pub async fn open(options: SqliteOptions) -> Result<SqliteStore> {
        if let Some(dir) = options
            .path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
        {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|error| StoreError::Database(sqlx::Error::Io(error)))?;
        }
        let synchronous = match options.sync {
            SyncMode::Normal => SqliteSynchronous::Normal,
            SyncMode::Full => SqliteSynchronous::Full,
        };
        let connect = SqliteConnectOptions::new()
            .filename(&options.path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("temp_store", "memory");
        let mut writer = connect
            .clone()
            .create_if_missing(true)
            .pragma("cache_size", "-32768")
            .pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            // Keep the WAL file from staying huge after a burst of writes.
            .pragma("journal_size_limit", "67108864")
            .connect()
            .await?;
        MIGRATOR.run(&mut writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect.clone().read_only(true))
            .await?;
        let checkpointer = tokio::spawn(checkpoint_in_background(connect.connect().await?));
        Ok(SqliteStore {
            writing: Arc::new(Writing {
                writer: Arc::new(Mutex::new(Some(Writer {
                    conn: writer,
                    leases: tasks::LeaseCache::default(),
                    revisions: tasks::RevisionCache::default(),
                    group: None,
                    last_group: 0,
                }))),
                waiting: AtomicUsize::new(0),
                commits: watch::Sender::new(GroupCommits::default()),
            }),
            readers,
            checkpointer,
        })
    }

    /// Closes every connection, waiting for them to finish. Dropping the store without this
    /// is safe (every commit is already in the WAL); closing lets SQLite checkpoint cleanly.
    /// Later calls fail with a closed-pool database error.
    pub async fn close(&self) {
        self.checkpointer.abort();
        self.readers.close().await;
        // Taking the writer commits the group transaction, if one is open.
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
    async fn writer(&self) -> Result<WriterGuard> {
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
    async fn change_task<T: Send + 'static>(
        &self,
        project_id: Option<&str>,
        task_id: &str,
        retry: Option<RetryCheck>,
        change: impl FnMut(&mut TaskRecord) -> Result<T> + Send + 'static,
    ) -> Result<(TaskRecord, T)> {
        let mut writer = self.writing.lock_writer().await?;
        if writer.group.is_some() || self.writing.waiting.load(Ordering::SeqCst) > 0 {
            let writing = Arc::clone(&self.writing);
            let (project_id, task_id) = (project_id.map(str::to_owned), task_id.to_owned());
            return detached(async move {
                writing
                    .change_in_group(writer, project_id.as_deref(), &task_id, retry, change)
                    .await
            })
            .await;
        }
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
    async fn change_leased_task<T: Send + 'static>(
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
}

// === impl Writing ===

impl Writing {
    /// The writer as it is, an open group included; counted in `waiting` until it is ours.
    async fn lock_writer(&self) -> Result<WriterGuard> {
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

    /// `SqliteStore::change_task`'s unit of work in a group transaction, from the held writer
    /// to the end of the group. Not cancel-safe by itself (a drop between the completion and
    /// its retry would leave the group with half a change, a drop right after `BEGIN` a
    /// transaction nobody tracks): only ever run through `detached`.
    async fn change_in_group<T>(
        &self,
        mut writer: WriterGuard,
        project_id: Option<&str>,
        task_id: &str,
        retry: Option<RetryCheck>,
        change: impl FnMut(&mut TaskRecord) -> Result<T>,
    ) -> Result<(TaskRecord, T)> {
        if writer.group.is_none() {
            sqlx::query(BEGIN_WRITE).execute(&mut writer.conn).await?;
            writer.last_group += 1;
            writer.group = Some(OpenGroup {
                number: writer.last_group,
                writes: 0,
            });
        }
        let Writer {
            conn,
            leases,
            revisions,
            ..
        } = &mut *writer;
        let changed = change_one_task(
            conn,
            leases,
            revisions,
            project_id,
            task_id,
            retry.as_ref(),
            change,
        )
        .await;
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
struct RetryCheck {
    outcome: TaskOutcome,
    now: Timestamp,
}

/// Why `change_one_task` failed, and whether it had written anything by then.
struct ChangeFailed {
    error: StoreError,
    wrote: bool,
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
    leases: &mut tasks::LeaseCache,
    revisions: &mut tasks::RevisionCache,
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
    revisions: &mut tasks::RevisionCache,
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

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
}

/// Runs passive checkpoints on their own connection, off the writer's path. A passive
/// checkpoint never blocks the writer or a reader; it copies what it can and the next one
/// continues.
async fn checkpoint_in_background(mut conn: SqliteConnection) {
    let mut ticks = tokio::time::interval(CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(%error, "background WAL checkpoint failed");
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    // === projects and tokens ===

    async fn create_project(&self, name: &str, now: Timestamp) -> Result<Project> {
        let project = Project {
            id: new_id(),
            name: name.to_owned(),
            created_at: normalize(now),
        };
        sqlx::query("INSERT INTO projects (id, name, created_at) VALUES (?1, ?2, ?3)")
            .bind(&project.id)
            .bind(&project.name)
            .bind(micros(project.created_at))
            .execute(&mut self.writer().await?.conn)
            .await
            .map_err(|error| {
                unique_violation(error, || format!("a project named {name:?} already exists"))
            })?;
        Ok(project)
    }

    async fn get_project(&self, project_id: &str) -> Result<Project> {
        let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE id = ?1")
            .bind(project_id)
            .fetch_optional(&self.readers)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("project {project_id}")))?;
        rows::project(&row)
    }

    async fn find_project_by_name(&self, name: &str) -> Result<Option<Project>> {
        let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.readers)
            .await?;
        row.as_ref().map(rows::project).transpose()
    }

    async fn create_token(
        &self,
        project_id: Option<&str>,
        role: TokenRole,
        secret_sha256: &str,
        now: Timestamp,
    ) -> Result<TokenRecord> {
        let record = TokenRecord {
            id: new_id(),
            project_id: project_id.map(str::to_owned),
            role,
            created_at: normalize(now),
        };
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        if let Some(project_id) = project_id {
            ensure_project(&mut tx, project_id).await?;
        }
        sqlx::query(
            "INSERT INTO tokens (id, project_id, role, secret_sha256, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&record.id)
        .bind(project_id)
        .bind(role_text(role))
        .bind(secret_sha256)
        .bind(micros(record.created_at))
        .execute(&mut *tx)
        .await
        .map_err(|error| {
            unique_violation(error, || {
                "a token with this secret already exists".to_owned()
            })
        })?;
        tx.commit().await?;
        Ok(record)
    }

    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(
            "SELECT id, project_id, role, created_at FROM tokens WHERE secret_sha256 = ?1",
        )
        .bind(secret_sha256)
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(rows::token).transpose()
    }

    // === codes ===

    async fn push_code(
        &self,
        project_id: &str,
        spec: &CodeSpec,
        package: Option<&Package>,
        now: Timestamp,
    ) -> Result<CodeRevision> {
        let now = normalize(now);
        let spec_json = to_json(spec)?;
        let max_concurrency = spec.max_concurrency.map(i64::from);
        let package_size =
            package.map(|package| u64::try_from(package.bytes.len()).unwrap_or(u64::MAX));
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        ensure_project(&mut tx, project_id).await?;
        let existing = sqlx::query(
            "SELECT id, latest_rev, paused, created_at FROM codes \
             WHERE project_id = ?1 AND name = ?2 AND deleted_at IS NULL",
        )
        .bind(project_id)
        .bind(&spec.name)
        .fetch_optional(&mut *tx)
        .await?;
        let (code_id, rev, paused, created_at) = match existing {
            Some(row) => {
                let code_id: String = row.try_get("id")?;
                let latest: i64 = row.try_get("latest_rev")?;
                let rev = latest + 1;
                sqlx::query(
                    "UPDATE codes SET latest_rev = ?1, max_concurrency = ?2, updated_at = ?3 WHERE id = ?4",
                )
                .bind(rev)
                .bind(max_concurrency)
                .bind(micros(now))
                .bind(&code_id)
                .execute(&mut *tx)
                .await?;
                let created_at = rows::timestamp(row.try_get("created_at")?)?;
                (code_id, rev, row.try_get::<bool, _>("paused")?, created_at)
            }
            None => {
                let code_id = new_id();
                sqlx::query(
                    "INSERT INTO codes (id, project_id, name, latest_rev, max_concurrency, paused, \
                     created_at, updated_at) VALUES (?1, ?2, ?3, 1, ?4, 0, ?5, ?5)",
                )
                .bind(&code_id)
                .bind(project_id)
                .bind(&spec.name)
                .bind(max_concurrency)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
                (code_id, 1, false, now)
            }
        };
        sqlx::query(
            "INSERT INTO code_revisions (code_id, rev, spec, package_sha256, package_size, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&code_id)
        .bind(rev)
        .bind(&spec_json)
        .bind(package.map(|package| package.sha256.as_str()))
        .bind(opt_signed(package_size))
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        if let Some(package) = package {
            sqlx::query("INSERT INTO code_packages (code_id, rev, bytes) VALUES (?1, ?2, ?3)")
                .bind(&code_id)
                .bind(rev)
                .bind(package.bytes.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(CodeRevision {
            id: code_id,
            project_id: project_id.to_owned(),
            rev: u32::try_from(rev)
                .map_err(|_| StoreError::Corrupt(format!("revision {rev} out of range")))?,
            spec: spec.clone(),
            package_sha256: package.map(|package| package.sha256.clone()),
            package_size,
            created_at,
            updated_at: now,
            paused,
        })
    }

    async fn get_code(&self, project_id: &str, code_id: &str) -> Result<CodeRevision> {
        let row = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
             WHERE c.id = ?1 AND c.project_id = ?2 AND c.deleted_at IS NULL"
        ))
        .bind(code_id)
        .bind(project_id)
        .fetch_optional(&self.readers)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("code {code_id}")))?;
        rows::revision(&row)
    }

    async fn get_code_by_name(&self, project_id: &str, name: &str) -> Result<CodeRevision> {
        let row = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
             WHERE c.project_id = ?1 AND c.name = ?2 AND c.deleted_at IS NULL"
        ))
        .bind(project_id)
        .bind(name)
        .fetch_optional(&self.readers)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("code {name}")))?;
        rows::revision(&row)
    }

    async fn list_codes(&self, project_id: &str, page: Page) -> Result<Vec<CodeRevision>> {
        let (limit, offset) = limit_offset(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
             WHERE c.project_id = ?1 AND c.deleted_at IS NULL \
             ORDER BY c.updated_at DESC, c.id DESC LIMIT ?2 OFFSET ?3"
        ))
        .bind(project_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(rows::revision).collect()
    }

    async fn list_revisions(
        &self,
        project_id: &str,
        code_id: &str,
        page: Page,
    ) -> Result<Vec<CodeRevision>> {
        let mut conn = self.readers.acquire().await?;
        ensure_code(&mut conn, project_id, code_id).await?;
        let (limit, offset) = limit_offset(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
             WHERE c.id = ?1 AND c.project_id = ?2 AND c.deleted_at IS NULL \
             ORDER BY r.rev DESC LIMIT ?3 OFFSET ?4"
        ))
        .bind(code_id)
        .bind(project_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(rows::revision).collect()
    }

    async fn get_revision(
        &self,
        project_id: &str,
        code_id: &str,
        rev: u32,
    ) -> Result<CodeRevision> {
        let row = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
             WHERE c.id = ?1 AND c.project_id = ?2 AND c.deleted_at IS NULL AND r.rev = ?3"
        ))
        .bind(code_id)
        .bind(project_id)
        .bind(i64::from(rev))
        .fetch_optional(&self.readers)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("revision {rev} of code {code_id}")))?;
        rows::revision(&row)
    }

    async fn get_package(
        &self,
        project_id: &str,
        code_id: &str,
        rev: Option<u32>,
    ) -> Result<Vec<u8>> {
        let mut conn = self.readers.acquire().await?;
        let latest = ensure_code(&mut conn, project_id, code_id).await?;
        let rev = rev.map_or(latest, i64::from);
        let bytes: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT bytes FROM code_packages WHERE code_id = ?1 AND rev = ?2")
                .bind(code_id)
                .bind(rev)
                .fetch_optional(&mut *conn)
                .await?;
        bytes.ok_or_else(|| {
            StoreError::not_found(format!("package of code {code_id} revision {rev}"))
        })
    }

    async fn delete_code(
        &self,
        project_id: &str,
        code_id: &str,
        now: Timestamp,
    ) -> Result<CodeCancellation> {
        let now = normalize(now);
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        ensure_code(&mut tx, project_id, code_id).await?;
        sqlx::query("UPDATE codes SET deleted_at = ?1 WHERE id = ?2")
            .bind(micros(now))
            .bind(code_id)
            .execute(&mut *tx)
            .await?;
        let cancellation = tasks::cancel_code_tasks(&mut tx, code_id, now).await?;
        // A schedule of a deleted code could only ever fail to fire.
        sqlx::query(
            "UPDATE schedules SET status = ?1, next_start = NULL, updated_at = ?2 \
             WHERE code_id = ?3 AND status = ?4",
        )
        .bind(ScheduleStatus::Cancelled.as_str())
        .bind(micros(now))
        .bind(code_id)
        .bind(ScheduleStatus::Scheduled.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(cancellation)
    }

    async fn set_code_paused(
        &self,
        project_id: &str,
        code_id: &str,
        paused: bool,
        _now: Timestamp,
    ) -> Result<CodeRevision> {
        let mut writer = self.writer().await?;
        let conn = &mut writer.conn;
        let changed = sqlx::query(
            "UPDATE codes SET paused = ?1 WHERE id = ?2 AND project_id = ?3 AND deleted_at IS NULL",
        )
        .bind(paused)
        .bind(code_id)
        .bind(project_id)
        .execute(&mut *conn)
        .await?;
        if changed.rows_affected() == 0 {
            return Err(StoreError::not_found(format!("code {code_id}")));
        }
        let row = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
             WHERE c.id = ?1"
        ))
        .bind(code_id)
        .fetch_one(&mut *conn)
        .await?;
        rows::revision(&row)
    }

    async fn code_stats(
        &self,
        project_id: &str,
        code_id: &str,
        window: StatsWindow,
    ) -> Result<CodeStats> {
        let mut conn = self.readers.acquire().await?;
        ensure_code(&mut conn, project_id, code_id).await?;
        // Every status listed, so the count seeks the (status, code_id) index once per status.
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM tasks WHERE code_id = ?1 AND status IN \
             ('queued', 'preparing', 'running', 'complete', 'error', 'timeout', 'cancelled') \
             AND (?2 IS NULL OR updated_at >= ?2) AND (?3 IS NULL OR updated_at <= ?3) \
             GROUP BY status",
        )
        .bind(code_id)
        .bind(window.updated_from.map(micros))
        .bind(window.updated_to.map(micros))
        .fetch_all(&mut *conn)
        .await?;
        crate::convert::status_counts(
            rows.iter()
                .map(|row| Ok((row.try_get("status")?, row.try_get("n")?)))
                .collect::<Result<Vec<_>>>()?,
        )
    }

    // === tasks ===

    async fn enqueue(
        &self,
        project_id: &str,
        new_tasks: &[NewTask],
        now: Timestamp,
    ) -> Result<Vec<Task>> {
        let now = normalize(now);
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        let queued = tasks::insert(&mut tx, project_id, new_tasks, now).await?;
        tx.commit().await?;
        Ok(queued)
    }

    async fn get_task(&self, project_id: &str, task_id: &str) -> Result<Task> {
        let mut conn = self.readers.acquire().await?;
        Ok(tasks::load(&mut conn, Some(project_id), task_id)
            .await?
            .task)
    }

    async fn list_tasks(
        &self,
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
            .push(" ORDER BY t.created_at DESC, t.id DESC LIMIT ")
            .push_bind(limit)
            .push(" OFFSET ")
            .push_bind(offset);
        let rows = query.build().fetch_all(&self.readers).await?;
        rows.iter()
            .map(|row| Ok(rows::task_record(row)?.task))
            .collect()
    }

    async fn cancel_task(&self, project_id: &str, task_id: &str, now: Timestamp) -> Result<Task> {
        let now = normalize(now);
        let (record, _) = self
            .change_task(Some(project_id), task_id, None, move |record| {
                record.cancel(now)
            })
            .await?;
        Ok(record.task)
    }

    async fn cancel_all(
        &self,
        project_id: &str,
        code_id: &str,
        now: Timestamp,
    ) -> Result<CodeCancellation> {
        let now = normalize(now);
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        ensure_code(&mut tx, project_id, code_id).await?;
        let cancellation = tasks::cancel_code_tasks(&mut tx, code_id, now).await?;
        tx.commit().await?;
        Ok(cancellation)
    }

    async fn set_progress(
        &self,
        project_id: &str,
        task_id: &str,
        percent: Option<u8>,
        msg: Option<&str>,
        now: Timestamp,
    ) -> Result<Task> {
        let now = normalize(now);
        let (id, msg) = (task_id.to_owned(), msg.map(str::to_owned));
        let (record, ()) = self
            .change_task(Some(project_id), task_id, None, move |record| {
                if record.task.status.is_terminal() {
                    return Err(StoreError::Conflict(format!(
                        "task {id} is already finished: it is {}",
                        record.task.status
                    )));
                }
                record.set_progress(percent, msg.as_deref(), now);
                Ok(())
            })
            .await?;
        Ok(record.task)
    }

    async fn get_log(&self, project_id: &str, task_id: &str) -> Result<Vec<u8>> {
        let mut conn = self.readers.acquire().await?;
        let log_size: Option<i64> =
            sqlx::query_scalar("SELECT log_size FROM tasks WHERE id = ?1 AND project_id = ?2")
                .bind(task_id)
                .bind(project_id)
                .fetch_optional(&mut *conn)
                .await?;
        let log_size = log_size.ok_or_else(|| StoreError::not_found(format!("task {task_id}")))?;
        if log_size == 0 {
            return Err(StoreError::not_found(format!("log of task {task_id}")));
        }
        let chunks: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT bytes FROM task_logs WHERE task_id = ?1 ORDER BY seq")
                .bind(task_id)
                .fetch_all(&mut *conn)
                .await?;
        Ok(chunks.concat())
    }

    async fn get_log_since(
        &self,
        project_id: &str,
        task_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogSlice> {
        let mut conn = self.readers.acquire().await?;
        let state = tasks::log_state(&mut conn, project_id, task_id).await?;
        if offset >= state.size || max_bytes == 0 {
            return Ok(state);
        }
        // The state and the bytes come from one snapshot: a log cut back for its truncation
        // marker between two separate reads would otherwise mix old and new bytes.
        let mut tx = conn.begin().await?;
        let mut slice = tasks::log_state(&mut tx, project_id, task_id).await?;
        let end = slice.size.min(offset.saturating_add(u64::from(max_bytes)));
        if offset < end {
            slice.bytes = tasks::read_log(&mut tx, task_id, offset, end).await?;
        }
        tx.commit().await?;
        Ok(slice)
    }

    // === leases (the runner's side) ===

    async fn lease(&self, request: &LeaseRequest, now: Timestamp) -> Result<Vec<LeasedTask>> {
        if request.max_tasks == 0 || request.clusters.is_empty() {
            return Ok(Vec::new());
        }
        let now = normalize(now);
        let mut writer = self.writer().await?;
        let Writer {
            conn,
            leases,
            revisions,
            ..
        } = &mut *writer;
        let mut tx = conn.begin_with(BEGIN_WRITE).await?;
        let (leased, records) = tasks::lease(&mut tx, revisions, request, now).await?;
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

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
        now: Timestamp,
    ) -> Result<HeartbeatReply> {
        let now = normalize(now);
        let (record, expires_at) = self
            .change_leased_task(task_id, token, None, move |record| {
                Ok(record.extend_lease(lease_secs, now))
            })
            .await?;
        Ok(HeartbeatReply {
            expires_at,
            cancel_requested: record.task.cancel_requested,
        })
    }

    async fn mark_running(
        &self,
        task_id: &str,
        token: i64,
        start_time: Timestamp,
        now: Timestamp,
    ) -> Result<Task> {
        let (now, start_time) = (normalize(now), normalize(start_time));
        let (record, ()) = self
            .change_leased_task(task_id, token, None, move |record| {
                record.start(start_time, now)
            })
            .await?;
        Ok(record.task)
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
        now: Timestamp,
    ) -> Result<u64> {
        let now = normalize(now);
        let mut writer = self.writer().await?;
        let Writer { conn, leases, .. } = &mut *writer;
        let mut tx = conn.begin_with(BEGIN_WRITE).await?;
        let mut record = tasks::load(&mut tx, None, task_id).await?;
        record.check_lease(token)?;
        let Some(plan) = plan_log_append(record.task.log_size, record.log_truncated, bytes, cap)
        else {
            return Ok(record.task.log_size);
        };
        record.apply_log_plan(&plan, now);
        if let Some(keep) = plan.truncate_to {
            let keep = signed(keep);
            sqlx::query("DELETE FROM task_logs WHERE task_id = ?1 AND seq >= ?2")
                .bind(task_id)
                .bind(keep)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE task_logs SET bytes = substr(bytes, 1, ?2 - seq) \
                 WHERE task_id = ?1 AND seq < ?2 AND seq + length(bytes) > ?2",
            )
            .bind(task_id)
            .bind(keep)
            .execute(&mut *tx)
            .await?;
        }
        for (seq, chunk) in &plan.chunks {
            sqlx::query("INSERT INTO task_logs (task_id, seq, bytes) VALUES (?1, ?2, ?3)")
                .bind(task_id)
                .bind(signed(*seq))
                .bind(chunk.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        tasks::write_loaded(&mut tx, &mut record).await?;
        tx.commit().await?;
        leases.remember(&record);
        Ok(record.task.log_size)
    }

    async fn runner_progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
        now: Timestamp,
    ) -> Result<()> {
        let now = normalize(now);
        let msg = msg.map(str::to_owned);
        self.change_leased_task(task_id, token, None, move |record| {
            record.set_progress(percent, msg.as_deref(), now);
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
        now: Timestamp,
    ) -> Result<Task> {
        let now = normalize(now);
        let report = RunReport {
            start_time: report.start_time.map(normalize),
            end_time: report.end_time.map(normalize),
            ..report.clone()
        };
        let retry = RetryCheck {
            outcome: outcome.clone(),
            now,
        };
        let outcome = outcome.clone();
        let (record, ()) = self
            .change_leased_task(task_id, token, Some(retry), move |record| {
                record.finish(&outcome, &report, now)
            })
            .await?;
        Ok(record.task)
    }

    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        requeue: &Requeue,
        now: Timestamp,
    ) -> Result<Task> {
        let (now, due_at) = (normalize(now), normalize(requeue.due_at));
        let (reason, max_infra_attempts) = (requeue.reason.clone(), requeue.max_infra_attempts);
        let (record, ()) = self
            .change_leased_task(task_id, token, None, move |record| {
                record.give_back(&reason, due_at, max_infra_attempts, now)
            })
            .await?;
        Ok(record.task)
    }

    async fn rescue_expired(
        &self,
        now: Timestamp,
        max_infra_attempts: u32,
    ) -> Result<Vec<RescuedTask>> {
        let now = normalize(now);
        let mut writer = self.writer().await?;
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
            let reason = format!(
                "the lease of runner {} expired",
                record.task.runner_id.as_deref().unwrap_or("(unknown)")
            );
            record.give_back(&reason, now, max_infra_attempts, now)?;
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

    // === clusters and runners ===

    async fn create_cluster(
        &self,
        project_id: Option<&str>,
        spec: &ClusterSpec,
        now: Timestamp,
    ) -> Result<Cluster> {
        clusters::create(self, project_id, spec, now).await
    }

    async fn get_cluster(&self, project_id: Option<&str>, cluster_id: &str) -> Result<Cluster> {
        clusters::get(self, project_id, cluster_id).await
    }

    async fn find_cluster_by_name(
        &self,
        project_id: Option<&str>,
        name: &str,
    ) -> Result<Option<Cluster>> {
        clusters::find_by_name(self, project_id, name).await
    }

    async fn list_clusters(&self, project_id: Option<&str>) -> Result<Vec<Cluster>> {
        clusters::list(self, project_id).await
    }

    async fn update_cluster(
        &self,
        cluster_id: &str,
        spec: &ClusterSpec,
        now: Timestamp,
    ) -> Result<Cluster> {
        clusters::update(self, cluster_id, spec, now).await
    }

    async fn delete_cluster(&self, cluster_id: &str) -> Result<()> {
        clusters::delete(self, cluster_id).await
    }

    async fn record_runner(&self, runner: &RunnerSeen, now: Timestamp) -> Result<()> {
        clusters::record_runner(self, runner, now).await
    }

    async fn cluster_load(
        &self,
        name: &str,
        project_id: Option<&str>,
        online_since: Timestamp,
        now: Timestamp,
    ) -> Result<ClusterLoad> {
        clusters::load(self, name, project_id, online_since, now).await
    }

    // === schedules ===

    async fn create_schedules(
        &self,
        project_id: &str,
        specs: &[(ScheduleSpec, Option<Timestamp>)],
        now: Timestamp,
    ) -> Result<Vec<Schedule>> {
        let now = normalize(now);
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        let mut created = Vec::with_capacity(specs.len());
        for (spec, first_fire) in specs {
            let code_id: String = sqlx::query_scalar(
                "SELECT id FROM codes WHERE project_id = ?1 AND name = ?2 AND deleted_at IS NULL",
            )
            .bind(project_id)
            .bind(&spec.code_name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("code {}", spec.code_name)))?;
            let next_start = first_fire.map(normalize);
            let schedule = Schedule {
                id: new_id(),
                project_id: project_id.to_owned(),
                code_id,
                spec: spec.clone(),
                status: if next_start.is_some() {
                    ScheduleStatus::Scheduled
                } else {
                    ScheduleStatus::Complete
                },
                next_start,
                last_run_time: None,
                run_count: 0,
                created_at: now,
                updated_at: now,
            };
            sqlx::query(
                "INSERT INTO schedules (id, project_id, code_id, spec, status, next_start, \
                 last_run_time, run_count, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, 0, ?7, ?7)",
            )
            .bind(&schedule.id)
            .bind(project_id)
            .bind(&schedule.code_id)
            .bind(to_json(spec)?)
            .bind(schedule.status.as_str())
            .bind(opt_micros(schedule.next_start))
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
            created.push(schedule);
        }
        tx.commit().await?;
        Ok(created)
    }

    async fn get_schedule(&self, project_id: &str, schedule_id: &str) -> Result<Schedule> {
        let mut conn = self.readers.acquire().await?;
        load_schedule(&mut conn, Some(project_id), schedule_id).await
    }

    async fn list_schedules(&self, project_id: &str, page: Page) -> Result<Vec<Schedule>> {
        let (limit, offset) = limit_offset(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules AS s WHERE s.project_id = ?1 \
             ORDER BY s.created_at DESC, s.id DESC LIMIT ?2 OFFSET ?3"
        ))
        .bind(project_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(rows::schedule).collect()
    }

    async fn cancel_schedule(
        &self,
        project_id: &str,
        schedule_id: &str,
        now: Timestamp,
    ) -> Result<Schedule> {
        let now = normalize(now);
        let mut writer = self.writer().await?;
        let conn = &mut writer.conn;
        let mut schedule = load_schedule(conn, Some(project_id), schedule_id).await?;
        if schedule.status != ScheduleStatus::Scheduled {
            return Ok(schedule);
        }
        sqlx::query(
            "UPDATE schedules SET status = ?1, next_start = NULL, updated_at = ?2 WHERE id = ?3 AND status = ?4",
        )
        .bind(ScheduleStatus::Cancelled.as_str())
        .bind(micros(now))
        .bind(schedule_id)
        .bind(ScheduleStatus::Scheduled.as_str())
        .execute(&mut *conn)
        .await?;
        schedule.status = ScheduleStatus::Cancelled;
        schedule.next_start = None;
        schedule.updated_at = now;
        Ok(schedule)
    }

    async fn update_schedule(
        &self,
        project_id: &str,
        schedule_id: &str,
        spec: &ScheduleSpec,
        next_start: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Schedule> {
        let (now, next_start) = (normalize(now), next_start.map(normalize));
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        let mut schedule = load_schedule(&mut tx, Some(project_id), schedule_id).await?;
        if schedule.status != ScheduleStatus::Scheduled {
            return Err(StoreError::Conflict(format!(
                "schedule {schedule_id} is {}; only a scheduled one can be changed",
                schedule.status.as_str()
            )));
        }
        schedule.spec = spec.clone();
        schedule.next_start = next_start;
        schedule.status = if next_start.is_some() {
            ScheduleStatus::Scheduled
        } else {
            ScheduleStatus::Complete
        };
        schedule.updated_at = now;
        sqlx::query(
            "UPDATE schedules SET spec = ?1, status = ?2, next_start = ?3, updated_at = ?4 \
             WHERE id = ?5",
        )
        .bind(to_json(spec)?)
        .bind(schedule.status.as_str())
        .bind(opt_micros(next_start))
        .bind(micros(now))
        .bind(schedule_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(schedule)
    }

    async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules AS s WHERE s.status = 'scheduled' AND s.next_start <= ?1 \
             ORDER BY s.next_start, s.id LIMIT ?2"
        ))
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(rows::schedule).collect()
    }

    async fn fire_schedule(
        &self,
        schedule_id: &str,
        fired_at: Timestamp,
        next_start: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Option<Task>> {
        let (now, fired_at, next_start) = (
            normalize(now),
            normalize(fired_at),
            next_start.map(normalize),
        );
        let mut writer = self.writer().await?;
        let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
        let schedule = load_schedule(&mut tx, None, schedule_id).await?;
        if schedule.status != ScheduleStatus::Scheduled || schedule.next_start != Some(fired_at) {
            return Err(StoreError::Conflict(format!(
                "schedule {schedule_id} is not due at {fired_at}: it already fired or was cancelled"
            )));
        }
        let spec = &schedule.spec;
        if let Some(limit) = spec.max_concurrency {
            let unfinished: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM tasks WHERE schedule_id = ?1 \
                 AND status IN ('queued', 'preparing', 'running')",
            )
            .bind(schedule_id)
            .fetch_one(&mut *tx)
            .await?;
            if unfinished >= i64::from(limit) {
                let next_start = spec
                    .next_fire(fired_at, schedule.run_count, now)
                    .map(normalize);
                pass_fire(&mut tx, schedule_id, next_start, now).await?;
                tx.commit().await?;
                return Ok(None);
            }
        }
        let new_task = spec.task(&schedule.id);
        let mut queued = tasks::insert(
            &mut tx,
            &schedule.project_id,
            std::slice::from_ref(&new_task),
            now,
        )
        .await?;
        let status = if next_start.is_some() {
            ScheduleStatus::Scheduled
        } else {
            ScheduleStatus::Complete
        };
        sqlx::query(
            "UPDATE schedules SET status = ?1, next_start = ?2, last_run_time = ?3, \
             run_count = run_count + 1, updated_at = ?3 WHERE id = ?4",
        )
        .bind(status.as_str())
        .bind(opt_micros(next_start))
        .bind(micros(now))
        .bind(schedule_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        queued
            .pop()
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt("firing a schedule queued no task".to_owned()))
    }

    // === registry credentials ===

    async fn put_registry_credential(
        &self,
        project_id: &str,
        registry: &str,
        username: &str,
        sealed: &SealedSecret,
        now: Timestamp,
    ) -> Result<StoredCredential> {
        credentials::put(self, project_id, registry, username, sealed, now).await
    }

    async fn get_registry_credential(
        &self,
        project_id: &str,
        registry: &str,
    ) -> Result<Option<StoredCredential>> {
        credentials::get(self, project_id, registry).await
    }

    async fn list_registry_credentials(&self, project_id: &str) -> Result<Vec<StoredCredential>> {
        credentials::list(self, project_id).await
    }

    async fn delete_registry_credential(&self, project_id: &str, registry: &str) -> Result<()> {
        credentials::delete(self, project_id, registry).await
    }

    async fn try_lead(&self) -> Result<Option<Box<dyn Leadership>>> {
        // One process owns a SQLite database, so it always leads.
        Ok(Some(Box::new(SoleProcess)))
    }

    // === usage ===

    async fn usage(&self, project_id: &str, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        usage::usage(self, project_id, query).await
    }

    async fn queue_waits(
        &self,
        project_id: &str,
        from: Timestamp,
        to: Timestamp,
        limit: u32,
    ) -> Result<Vec<QueueWait>> {
        usage::queue_waits(self, project_id, from, to, limit).await
    }

    async fn project_counts(&self, project_id: &str, window: StatsWindow) -> Result<CodeStats> {
        usage::project_counts(self, project_id, window).await
    }

    // === gauges ===

    async fn gauges(&self, now: Timestamp) -> Result<StoreGauges> {
        gauges::gauges(self, now).await
    }
}

// === helpers ===

/// `LIMIT` and `OFFSET` of a 1-based page; page 0 reads as page 1.
fn limit_offset(page: Page) -> (i64, i64) {
    let per_page = i64::from(page.per_page);
    (per_page, i64::from(page.page.max(1) - 1) * per_page)
}

/// Turns a unique-key violation into a `Conflict` with a message for the user.
fn unique_violation(error: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &error {
        sqlx::Error::Database(database) if database.is_unique_violation() => {
            StoreError::Conflict(message())
        }
        _ => StoreError::Database(error),
    }
}

async fn ensure_project(conn: &mut SqliteConnection, project_id: &str) -> Result<()> {
    let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM projects WHERE id = ?1")
        .bind(project_id)
        .fetch_optional(&mut *conn)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found(format!("project {project_id}")))
}

/// Checks that a live code exists in the project; returns its latest revision number.
async fn ensure_code(conn: &mut SqliteConnection, project_id: &str, code_id: &str) -> Result<i64> {
    let latest: Option<i64> = sqlx::query_scalar(
        "SELECT latest_rev FROM codes WHERE id = ?1 AND project_id = ?2 AND deleted_at IS NULL",
    )
    .bind(code_id)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?;
    latest.ok_or_else(|| StoreError::not_found(format!("code {code_id}")))
}

/// Moves a schedule past a fire time without queueing a task (its `max_concurrency` was
/// reached): to `next_start`, or complete when there is none. The run is not counted.
async fn pass_fire(
    conn: &mut SqliteConnection,
    schedule_id: &str,
    next_start: Option<Timestamp>,
    now: Timestamp,
) -> Result<()> {
    let status = if next_start.is_some() {
        ScheduleStatus::Scheduled
    } else {
        ScheduleStatus::Complete
    };
    sqlx::query("UPDATE schedules SET status = ?1, next_start = ?2, updated_at = ?3 WHERE id = ?4")
        .bind(status.as_str())
        .bind(opt_micros(next_start))
        .bind(micros(now))
        .bind(schedule_id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn load_schedule(
    conn: &mut SqliteConnection,
    project_id: Option<&str>,
    schedule_id: &str,
) -> Result<Schedule> {
    let row = sqlx::query(concat!(
        "SELECT ",
        schedule_columns!(),
        " FROM schedules AS s WHERE s.id = ?1 AND (?2 IS NULL OR s.project_id = ?2)"
    ))
    .bind(schedule_id)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("schedule {schedule_id}")))?;
    rows::schedule(&row)
}
