//! SQLite: the embedded default store.
//!
//! One database file in WAL mode. Every write goes through a single writer connection behind
//! an async mutex, so writes serialize inside the process and never meet `SQLITE_BUSY`; reads
//! use a small pool of read-only connections that WAL lets run beside the writer. The writer
//! is not a sqlx pool of one because a pool pings a connection each time it is returned: one
//! more round trip to SQLite's worker thread per write. Migrations are embedded in the binary
//! and run on open. Timestamps are integer microseconds since the epoch; code specs and
//! schedule specs are JSON; logs are BLOBs, and packages are BLOBs of about 1 MiB each, one
//! chunk a row (`packages`, over the shared steps of `crate::package`).
//!
//! Throughput comes from counting statements, since each one is a round trip to the
//! connection's worker thread: a lease batch is a handful of statements whatever its size, a
//! queue batch is one `INSERT`, and a runner's heartbeat, start or completion is one guarded
//! `UPDATE` on a record the writer remembers from the lease (`leases::LeaseCache`). WAL
//! checkpoints run on their own connection in the background, off the commit path: at the next
//! 100 ms tick after 64 commits, else once a second while anything was committed (the writer
//! counts its commits in a commit hook).
//!
//! A bound `LIMIT` is written `LIMIT +?N`. Since SQLite 3.47 the planner reads the value bound
//! to a bare `LIMIT ?N`, so rebinding it expires the statement and every run prepares it again
//! (the lease statement's recompiling was about 4% of `serve`'s CPU); the unary plus keeps the
//! value out of the plan and the prepared statement reusable. A test keeps bare ones out.
//!
//! A write in a group transaction (from the group's `BEGIN`, through a completion and its
//! retry, to the group's `COMMIT` and the telling of its writers) runs on a task of its own that
//! holds the writer (`detached`): a caller dropped half-way (a client that disconnects, a
//! runner's request timeout) never leaves a completion without its retry, nor the writer in a
//! transaction nobody tracks. The other writes use sqlx transactions, which roll back when
//! dropped, or single statements, whole wherever their caller stops.
//!
//! The SQL lives in one module per concern (`projects`, `codes`, `packages`, `tasks`, `logs`, `leases`,
//! `schedules`, `clusters`, `usage`, `credentials`, `gauges`, `quotas`, `retention`), the writer and its group commits
//! in `writer`; what a state change does to a task is decided in `crate::record`, shared with
//! every backend.

#[cfg(test)]
mod cancellation_tests;
mod clusters;
mod codes;
mod credentials;
mod gauges;
mod leases;
mod logs;
mod packages;
mod projects;
mod queueing;
mod quotas;
mod retention;
mod rows;
mod schedules;
mod tasks;
mod usage;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use stevedore_model::TaskAttempt;
use stevedore_model::{
    CodeRevision, CodeSpec, NewTask, Quota, QuotaLimits, Schedule, ScheduleSpec, Task, TaskOutcome,
    Timestamp,
};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use self::writer::Writing;
use crate::{
    Cluster, ClusterLoad, ClusterSpec, CodeCancellation, CodeStats, DataSizes, HeartbeatReply,
    Leadership, LeaseRequest, LeasedTask, LogSlice, NewToken, PackagePrune, PackageStream, Page,
    Project, PruneCursor, QueueWait, QuotaUse, Requeue, RescuedTask, Result, RevisionPackage,
    RunReport, RunnerSeen, SealedSecret, StatsWindow, Store, StoreError, StoreGauges,
    StoredCredential, TaskData, TaskDataPrune, TaskFilter, TokenRecord, UsageQuery, UsageRow,
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
    /// The operator's quota limits, for projects without limits of their own.
    quota_defaults: QuotaLimits,
}

/// How many read connections to keep. Reads are short; a few cover a 2-core machine.
const READ_CONNECTIONS: u32 = 4;
/// How long a connection waits on a lock held by another process before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the background checkpointer looks at what the writer committed.
const CHECKPOINT_TICK: Duration = Duration::from_millis(100);
/// Commits since the last checkpoint that make the next tick copy the WAL into the database
/// file, so that a busy writer's WAL stays short.
const CHECKPOINT_AFTER_COMMITS: u64 = 64;
/// Fewer commits wait this long: a checkpoint that copies pages syncs the WAL and the
/// database file, and the WAL's restart after it syncs its header, so a trickle of commits
/// checkpointed every tick paid thirty fsyncs a second.
const CHECKPOINT_AT_MOST_EVERY: Duration = Duration::from_secs(1);
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
        let commits = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&commits);
        writer.lock_handle().await?.set_commit_hook(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            true
        });
        let readers = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect.clone().read_only(true))
            .await?;
        let checkpointer =
            tokio::spawn(checkpoint_in_background(connect.connect().await?, commits));
        Ok(SqliteStore {
            writing: Arc::new(Writing::new(writer)),
            readers,
            checkpointer,
            quota_defaults: QuotaLimits::default(),
        })
    }

    /// The operator's quota limits, for every project without limits of its own (by default
    /// `QuotaLimits::default()`).
    pub fn with_quota_defaults(mut self, defaults: QuotaLimits) -> Self {
        self.quota_defaults = defaults;
        self
    }

    /// Closes every connection, waiting for them to finish. Dropping the store without this
    /// is safe (every commit is already in the WAL); closing lets SQLite checkpoint cleanly.
    /// Later calls fail with a closed-pool database error.
    pub async fn close(&self) {
        self.checkpointer.abort();
        self.readers.close().await;
        self.close_writer().await;
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
}

/// Runs passive checkpoints on their own connection, off the writer's path, when
/// [`checkpoint_due`] says so from the writer's count of `commits`. A passive checkpoint never
/// blocks the writer or a reader; it copies what it can and the next one continues.
async fn checkpoint_in_background(mut conn: SqliteConnection, commits: Arc<AtomicU64>) {
    let mut ticks = tokio::time::interval(CHECKPOINT_TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut seen, mut last) = (0, tokio::time::Instant::now());
    // Whether the last checkpoint left pages behind (readers held them), to be tried again.
    let mut behind = false;
    loop {
        ticks.tick().await;
        let now_committed = commits.load(Ordering::Relaxed);
        if !checkpoint_due(now_committed.wrapping_sub(seen), behind, last.elapsed()) {
            continue;
        }
        (seen, last) = (now_committed, tokio::time::Instant::now());
        // (busy, frames in the WAL, frames copied)
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut conn)
            .await
        {
            Ok((_, frames, copied)) => behind = copied < frames,
            Err(error) => {
                behind = true;
                tracing::warn!(%error, "background WAL checkpoint failed");
            }
        }
    }
}

/// Whether to checkpoint now, `commits` commits and `since` after the last checkpoint, which
/// left pages behind or not: at once past [`CHECKPOINT_AFTER_COMMITS`], else once a second
/// while there is anything to copy.
fn checkpoint_due(commits: u64, behind: bool, since: Duration) -> bool {
    commits >= CHECKPOINT_AFTER_COMMITS
        || ((commits > 0 || behind) && since >= CHECKPOINT_AT_MOST_EVERY)
}

#[async_trait]
impl Store for SqliteStore {
    // === projects and tokens ===

    async fn create_project(&self, name: &str, now: Timestamp) -> Result<Project> {
        projects::create(self, name, now).await
    }

    async fn get_project(&self, project_id: &str) -> Result<Project> {
        projects::get(self, project_id).await
    }

    async fn find_project_by_name(&self, name: &str) -> Result<Option<Project>> {
        projects::find_by_name(self, name).await
    }

    async fn create_token(
        &self,
        token: &NewToken,
        secret_sha256: &str,
        now: Timestamp,
    ) -> Result<TokenRecord> {
        projects::create_token(self, token, secret_sha256, now).await
    }

    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>> {
        projects::find_token(self, secret_sha256).await
    }

    // === codes ===

    async fn push_code(
        &self,
        project_id: &str,
        spec: &CodeSpec,
        package: Option<RevisionPackage<'_>>,
        now: Timestamp,
    ) -> Result<CodeRevision> {
        codes::push(self, project_id, spec, package, now).await
    }

    async fn get_code(&self, project_id: &str, code_id: &str) -> Result<CodeRevision> {
        codes::get(self, project_id, code_id).await
    }

    async fn get_code_by_name(&self, project_id: &str, name: &str) -> Result<CodeRevision> {
        codes::get_by_name(self, project_id, name).await
    }

    async fn list_codes(&self, project_id: &str, page: Page) -> Result<Vec<CodeRevision>> {
        codes::list(self, project_id, page).await
    }

    async fn list_revisions(
        &self,
        project_id: &str,
        code_id: &str,
        page: Page,
    ) -> Result<Vec<CodeRevision>> {
        codes::list_revisions(self, project_id, code_id, page).await
    }

    async fn get_revision(
        &self,
        project_id: &str,
        code_id: &str,
        rev: u32,
    ) -> Result<CodeRevision> {
        codes::get_revision(self, project_id, code_id, rev).await
    }

    async fn get_package(
        &self,
        project_id: &str,
        code_id: &str,
        rev: Option<u32>,
    ) -> Result<PackageStream> {
        codes::get_package(self, project_id, code_id, rev).await
    }

    async fn leased_package(&self, task_id: &str, token: i64) -> Result<PackageStream> {
        codes::leased_package(self, task_id, token).await
    }

    async fn delete_code(
        &self,
        project_id: &str,
        code_id: &str,
        now: Timestamp,
    ) -> Result<CodeCancellation> {
        codes::delete(self, project_id, code_id, now).await
    }

    async fn set_code_paused(
        &self,
        project_id: &str,
        code_id: &str,
        paused: bool,
        now: Timestamp,
    ) -> Result<CodeRevision> {
        codes::set_paused(self, project_id, code_id, paused, now).await
    }

    async fn code_stats(
        &self,
        project_id: &str,
        code_id: &str,
        window: StatsWindow,
    ) -> Result<CodeStats> {
        codes::stats(self, project_id, code_id, window).await
    }

    // === package retention ===

    async fn prune_packages(&self, keep_revisions: u32, max_rows: u32) -> Result<PackagePrune> {
        crate::package::prune(self, keep_revisions, max_rows).await
    }

    async fn package_bytes(&self) -> Result<u64> {
        packages::package_bytes(self).await
    }

    // === tasks ===

    async fn enqueue(
        &self,
        project_id: &str,
        new_tasks: &[NewTask],
        now: Timestamp,
    ) -> Result<Vec<Task>> {
        tasks::enqueue(self, project_id, new_tasks, now).await
    }

    async fn get_task(&self, project_id: &str, task_id: &str) -> Result<Task> {
        tasks::get(self, project_id, task_id).await
    }

    async fn task_attempts(&self, project_id: &str, task_id: &str) -> Result<Vec<TaskAttempt>> {
        tasks::attempts(self, project_id, task_id).await
    }

    async fn list_tasks(
        &self,
        project_id: &str,
        filter: &TaskFilter,
        page: Page,
    ) -> Result<Vec<Task>> {
        tasks::list(self, project_id, filter, page).await
    }

    async fn cancel_task(&self, project_id: &str, task_id: &str, now: Timestamp) -> Result<Task> {
        tasks::cancel(self, project_id, task_id, now).await
    }

    async fn cancel_all(
        &self,
        project_id: &str,
        code_id: &str,
        now: Timestamp,
    ) -> Result<CodeCancellation> {
        tasks::cancel_all(self, project_id, code_id, now).await
    }

    async fn set_progress(
        &self,
        project_id: &str,
        task_id: &str,
        percent: Option<u8>,
        msg: Option<&str>,
        now: Timestamp,
    ) -> Result<Task> {
        tasks::set_progress(self, project_id, task_id, percent, msg, now).await
    }

    async fn get_log(&self, project_id: &str, task_id: &str) -> Result<Vec<u8>> {
        logs::get(self, project_id, task_id).await
    }

    async fn get_log_since(
        &self,
        project_id: &str,
        task_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogSlice> {
        logs::get_since(self, project_id, task_id, offset, max_bytes).await
    }

    // === leases (the runner's side) ===

    async fn lease(&self, request: &LeaseRequest, now: Timestamp) -> Result<Vec<LeasedTask>> {
        leases::lease(self, request, now).await
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
        now: Timestamp,
    ) -> Result<HeartbeatReply> {
        leases::heartbeat(self, task_id, token, lease_secs, now).await
    }

    async fn mark_running(
        &self,
        task_id: &str,
        token: i64,
        start_time: Timestamp,
        now: Timestamp,
    ) -> Result<Task> {
        leases::mark_running(self, task_id, token, start_time, now).await
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
        now: Timestamp,
    ) -> Result<u64> {
        logs::append(self, task_id, token, bytes, cap, now).await
    }

    async fn runner_progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
        now: Timestamp,
    ) -> Result<()> {
        leases::progress(self, task_id, token, percent, msg, now).await
    }

    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
        now: Timestamp,
    ) -> Result<Task> {
        leases::complete(self, task_id, token, outcome, report, now).await
    }

    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        requeue: &Requeue,
        now: Timestamp,
    ) -> Result<Task> {
        leases::requeue(self, task_id, token, requeue, now).await
    }

    async fn rescue_expired(
        &self,
        now: Timestamp,
        max_infra_attempts: u32,
    ) -> Result<Vec<RescuedTask>> {
        leases::rescue_expired(self, now, max_infra_attempts).await
    }

    async fn release_runner(
        &self,
        runner_id: &str,
        project_id: Option<&str>,
        now: Timestamp,
        max_infra_attempts: u32,
    ) -> Result<Vec<RescuedTask>> {
        leases::release_runner(self, runner_id, project_id, now, max_infra_attempts).await
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
        owner: Option<&str>,
        project_id: Option<&str>,
        online_since: Timestamp,
        now: Timestamp,
    ) -> Result<ClusterLoad> {
        clusters::load(self, name, owner, project_id, online_since, now).await
    }

    async fn gone_runners(
        &self,
        runner_ids: &[String],
        owner: Option<&str>,
        seen_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<String>> {
        clusters::gone_runners(self, runner_ids, owner, seen_before, now).await
    }

    // === schedules ===

    async fn create_schedules(
        &self,
        project_id: &str,
        specs: &[(ScheduleSpec, Option<Timestamp>)],
        now: Timestamp,
    ) -> Result<Vec<Schedule>> {
        schedules::create(self, project_id, specs, now).await
    }

    async fn get_schedule(&self, project_id: &str, schedule_id: &str) -> Result<Schedule> {
        schedules::get(self, project_id, schedule_id).await
    }

    async fn list_schedules(&self, project_id: &str, page: Page) -> Result<Vec<Schedule>> {
        schedules::list(self, project_id, page).await
    }

    async fn cancel_schedule(
        &self,
        project_id: &str,
        schedule_id: &str,
        now: Timestamp,
    ) -> Result<Schedule> {
        schedules::cancel(self, project_id, schedule_id, now).await
    }

    async fn update_schedule(
        &self,
        project_id: &str,
        schedule_id: &str,
        spec: &ScheduleSpec,
        next_start: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Schedule> {
        schedules::update(self, project_id, schedule_id, spec, next_start, now).await
    }

    async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>> {
        schedules::due(self, now, limit).await
    }

    async fn fire_schedule(
        &self,
        schedule_id: &str,
        fired_at: Timestamp,
        next_start: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Option<Task>> {
        schedules::fire(self, schedule_id, fired_at, next_start, now).await
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

    // === quotas ===

    async fn project_quotas(&self, project_id: &str) -> Result<Vec<QuotaUse>> {
        quotas::project_quotas(self, project_id).await
    }

    async fn quota_limits(&self, project_id: &str) -> Result<QuotaLimits> {
        quotas::quota_limits(self, project_id).await
    }

    async fn set_project_quota(
        &self,
        project_id: &str,
        quota: Quota,
        limit: Option<u64>,
        now: Timestamp,
    ) -> Result<()> {
        quotas::set(self, project_id, quota, limit, now).await
    }

    // === gauges ===

    async fn gauges(&self, now: Timestamp) -> Result<StoreGauges> {
        gauges::gauges(self, now).await
    }

    async fn data_sizes(&self) -> Result<DataSizes> {
        gauges::data_sizes(self).await
    }

    // === retention ===

    async fn prune_task_data(
        &self,
        data: TaskData,
        finished_before: Timestamp,
        after: Option<&PruneCursor>,
        max_rows: u32,
        now: Timestamp,
    ) -> Result<TaskDataPrune> {
        retention::prune_task_data(self, data, finished_before, after, max_rows, now).await
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;

    #[test]
    fn a_busy_writer_is_checkpointed_at_once_and_a_trickle_once_a_second() {
        let (tick, second) = (CHECKPOINT_TICK, CHECKPOINT_AT_MOST_EVERY);
        assert!(checkpoint_due(CHECKPOINT_AFTER_COMMITS, false, tick));
        assert!(!checkpoint_due(CHECKPOINT_AFTER_COMMITS - 1, false, tick));
        assert!(checkpoint_due(1, false, second));
        // Nothing committed and nothing left behind: nothing to copy, however long it was.
        assert!(!checkpoint_due(0, false, second * 10));
        // Pages a reader held back are tried again a second later.
        assert!(!checkpoint_due(0, true, tick));
        assert!(checkpoint_due(0, true, second));
    }
}

#[cfg(test)]
mod sql_text_tests {
    /// Every bound `LIMIT` in this backend keeps its value out of the plan (see the module
    /// docs): a bare `LIMIT ?N` would make SQLite prepare its statement again at every run.
    #[test]
    fn no_statement_binds_a_bare_limit() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sqlite");
        let mut bare = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("the sqlite module's directory") {
            let path = entry.expect("a directory entry").path();
            let text = std::fs::read_to_string(&path).expect("a source file");
            for (number, line) in text.lines().enumerate() {
                if line.contains("LIMIT ?") || line.contains("LIMIT \")") {
                    bare.push(format!("{}:{}", path.display(), number + 1));
                }
            }
        }
        assert!(bare.is_empty(), "bare bound LIMITs: {bare:?}");
    }
}
