//! PostgreSQL: the store for several `stevedore serve` processes sharing one database.
//!
//! A pool of connections; every method is one transaction at READ COMMITTED. What must hold
//! across servers is held by PostgreSQL's locks, not by the process:
//!
//! * a change to one task (heartbeat, log, progress, start, completion, requeue, cancel) locks
//!   its row first (`SELECT … FOR UPDATE`), so the second of two writers reads what the first
//!   wrote: a second completion finds the lease cleared and is `StaleLease`, and the user retry
//!   a completion calls for is queued in the same transaction. A runner's writes about its
//!   leased tasks (heartbeats, starts, progress, completions, requeues) that arrive together
//!   share such a transaction, their rows locked in id order and each checked alone (`batch`);
//! * leasing takes due tasks with `FOR UPDATE SKIP LOCKED`, so concurrent leasers never wait
//!   for each other and never hand out one task twice, and decides `max_concurrency` under a
//!   per-code advisory lock (see `leases::free_slots`);
//! * lease tokens come from a sequence, which only grows, whoever asks;
//! * firing a schedule locks the schedule's row and checks its due time under the lock;
//! * a log read with its size and status comes from one REPEATABLE READ snapshot;
//! * renaming or deleting a cluster locks its row, which every insertion of its tasks
//!   share-locks (`clusters`);
//! * the leader holds a session-level advisory lock on a connection of its own (`lead`);
//! * a push holds the package it references `FOR KEY SHARE`, and pruning locks what it drops
//!   `FOR UPDATE SKIP LOCKED` and checks it again in a statement of its own (`packages`);
//! * a write that a quota limits locks its project's row first (`FOR NO KEY UPDATE`, which
//!   leaves foreign-key checks alone) and counts under that lock (`quotas`).
//!
//! Every commit that makes work available (`enqueue`, a requeue, a retry, a rescue, a fired
//! schedule, a resumed code) also sends `NOTIFY stevedore_work`; `work_signal` hands out a
//! signal fed by one `LISTEN`ing connection per store (`listen`), which reconnects on its own
//! and, while it cannot, signals on a timer so that waiters fall back to polling.
//!
//! The SQL lives in one module per concern (`projects`, `codes`, `packages`, `tasks`, `logs`, `leases`,
//! `schedules`, `clusters`, `usage`, `credentials`, `gauges`, `quotas`, `retention`), as in the SQLite store;
//! the batches of runners' writes in `batch`. The
//! representations are the SQLite store's (`crate::convert`); what a state change does to a
//! task is decided in `crate::record`, shared with it.

mod batch;
mod clusters;
mod codes;
mod credentials;
mod gauges;
mod lead;
mod leases;
mod listen;
mod logs;
mod packages;
mod projects;
mod quotas;
mod retention;
mod rows;
mod schedules;
mod tasks;
mod usage;

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use stevedore_model::TaskAttempt;
use stevedore_model::{
    CodeRevision, CodeSpec, NewTask, Quota, QuotaLimits, Schedule, ScheduleSpec, Task, TaskOutcome,
    TaskStatus, Timestamp,
};

use crate::record::TaskRecord;
use crate::{
    Cluster, ClusterLoad, ClusterSpec, CodeCancellation, CodeStats, DataSizes, HeartbeatReply,
    Leadership, LeaseRequest, LeasedTask, LogSlice, NewToken, PackagePrune, PackageStream, Page,
    Project, PruneCursor, QueueWait, QuotaUse, Requeue, RescuedTask, Result, RevisionPackage,
    RunReport, RunnerSeen, SealedSecret, StatsWindow, Store, StoreGauges, StoredCredential,
    TaskData, TaskDataPrune, TaskFilter, TokenRecord, UsageQuery, UsageRow, WorkSignal,
};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A `postgres://` URL. A Unix socket directory goes in `host`:
    /// `postgres://user@/db?host=/run/postgresql`.
    pub url: String,
    /// The most connections this store opens (the `LISTEN` connection is one more).
    pub max_connections: u32,
    /// How long a call waits for a free connection before it fails.
    pub acquire_timeout: Duration,
}

/// The PostgreSQL store. Cheap to share behind an `Arc`; every method is safe to call
/// concurrently, from any number of processes.
pub struct PgStore {
    pool: PgPool,
    /// The batches that runners' writes about leased tasks share.
    leased_writes: batch::LeasedWrites,
    /// Code revisions handed out with leases.
    revisions: codes::Revisions,
    connect: PgConnectOptions,
    /// The `LISTEN` task and its signal, started by the first `work_signal`.
    listener: Mutex<Option<listen::Listener>>,
    /// The operator's quota limits, for projects without limits of their own.
    quota_defaults: QuotaLimits,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Starts a transaction that reads one snapshot for all its statements and writes nothing.
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";

// === impl PgOptions ===

impl PgOptions {
    /// The database at `url`, with up to 10 connections.
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

// === impl PgStore ===

impl PgStore {
    /// Connects and brings the schema up to date. Migrations take a database-wide advisory
    /// lock, so servers starting together apply each migration once.
    pub async fn connect(options: PgOptions) -> Result<PgStore> {
        // JIT compilation off for every session: the store's statements are short, but the
        // planner's estimate of the lease's projects query passes `jit_above_cost` whenever a
        // backlog is large or not yet analyzed, and compiling it took 450 ms of a lease that
        // runs in a few milliseconds (measured with `lease_throughput`).
        let connect = PgConnectOptions::from_str(&options.url)?
            .application_name("stevedore")
            .options([("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(PgStore {
            leased_writes: batch::LeasedWrites::start(pool.clone()),
            revisions: codes::Revisions::default(),
            pool,
            connect,
            listener: Mutex::new(None),
            quota_defaults: QuotaLimits::default(),
        })
    }

    /// The operator's quota limits, for every project without limits of its own (by default
    /// `QuotaLimits::default()`). Servers sharing a database should all have the same.
    pub fn with_quota_defaults(mut self, defaults: QuotaLimits) -> Self {
        self.quota_defaults = defaults;
        self
    }

    /// Closes every connection and stops listening. Later calls fail with a closed-pool
    /// database error.
    pub async fn close(&self) {
        if let Some(listener) = self.take_listener() {
            listener.stop().await;
        }
        self.pool.close().await;
    }

    fn take_listener(&self) -> Option<listen::Listener> {
        self.listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Changes one task under its row lock: loads it, lets `change` alter it, writes it back.
    /// Wakes the lease loops when the task is queued again. (A runner's writes about a leased
    /// task go through `change_leased`, in batches.)
    pub(super) async fn change_task<T>(
        &self,
        project_id: Option<&str>,
        task_id: &str,
        change: impl FnOnce(&mut TaskRecord) -> Result<T>,
    ) -> Result<(TaskRecord, T)> {
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            let mut record = tasks::load_for_update(&mut tx, project_id, task_id).await?;
            let was = record.task.status;
            let value = change(&mut record)?;
            tasks::write(&mut tx, &mut record).await?;
            if was != TaskStatus::Queued && record.task.status == TaskStatus::Queued {
                tasks::notify_work(&mut tx).await?;
            }
            Ok((record, value))
        }
        .await;
        finish(tx, result).await
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(listener) = self.take_listener() {
            listener.abort();
        }
    }
}

#[async_trait]
impl Store for PgStore {
    fn work_signal(&self) -> Option<WorkSignal> {
        let mut listener = self
            .listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if listener.is_none() {
            *listener = listen::Listener::start(self.connect.clone());
        }
        listener.as_ref().map(listen::Listener::signal)
    }

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

    // === leadership ===

    async fn try_lead(&self) -> Result<Option<Box<dyn Leadership>>> {
        let leadership = lead::try_lead(&self.connect).await?;
        Ok(leadership.map(|held| Box::new(held) as Box<dyn Leadership>))
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

// === helpers ===

/// Ends a transaction: commits it when `result` is `Ok`, rolls it back otherwise. Explicitly,
/// because a transaction merely dropped is rolled back only when its connection is next used,
/// and until then it keeps its row locks, which a lease elsewhere would `SKIP`.
async fn finish<T>(tx: Transaction<'_, Postgres>, result: Result<T>) -> Result<T> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(error) => {
            if let Err(rollback) = tx.rollback().await {
                tracing::warn!(error = %rollback, "rolling back a failed transaction failed");
            }
            Err(error)
        }
    }
}
