//! PostgreSQL: the store for several `stevedore serve` processes sharing one database.
//!
//! A pool of connections; every method is one transaction at READ COMMITTED. What must hold
//! across servers is held by PostgreSQL's locks, not by the process:
//!
//! * a change to one task (heartbeat, log, progress, start, completion, requeue, cancel) locks
//!   its row first (`SELECT … FOR UPDATE`), so the second of two writers reads what the first
//!   wrote: a second completion finds the lease cleared and is `StaleLease`, and the user retry
//!   a completion calls for is queued in the same transaction;
//! * leasing takes due tasks with `FOR UPDATE SKIP LOCKED`, so concurrent leasers never wait
//!   for each other and never hand out one task twice, and decides `max_concurrency` under a
//!   per-code advisory lock (see `tasks::ConcurrencySlots`);
//! * lease tokens come from a sequence, which only grows, whoever asks;
//! * firing a schedule locks the schedule's row and checks its due time under the lock;
//! * a log read with its size and status comes from one REPEATABLE READ snapshot;
//! * renaming or deleting a cluster locks its row, which every insertion of its tasks
//!   share-locks (`clusters`);
//! * the leader holds a session-level advisory lock on a connection of its own (`lead`).
//!
//! Every commit that makes work available (`enqueue`, a requeue, a retry, a rescue, a fired
//! schedule, a resumed code) also sends `NOTIFY stevedore_work`; `work_signal` hands out a
//! signal fed by one `LISTEN`ing connection per store (`listen`), which reconnects on its own
//! and, while it cannot, signals on a timer so that waiters fall back to polling.
//!
//! The representations are the SQLite store's (`crate::convert`); what a state change does to
//! a task is decided in `crate::record`, shared with it.

mod clusters;
mod credentials;
mod gauges;
mod lead;
mod listen;
mod rows;
mod tasks;
mod usage;

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Row, Transaction};
use stevedore_model::{
    CodeRevision, CodeSpec, NewTask, Schedule, ScheduleSpec, ScheduleStatus, Task, TaskOutcome,
    TaskStatus, Timestamp, new_id,
};

use self::rows::{revision_columns, schedule_columns, task_columns};
use crate::convert::{micros, opt_micros, opt_signed, role_text, signed, timestamp, to_json};
use crate::record::{TaskRecord, normalize, plan_log_append};
use crate::{
    Cluster, ClusterLoad, ClusterSpec, CodeCancellation, CodeStats, HeartbeatReply, Leadership,
    LeaseRequest, LeasedTask, LogSlice, Package, Page, Project, QueueWait, Requeue, RescuedTask,
    Result, RunReport, RunnerSeen, SealedSecret, StatsWindow, Store, StoreError, StoreGauges,
    StoredCredential, TaskFilter, TokenRecord, TokenRole, UsageQuery, UsageRow, WorkSignal,
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
    connect: PgConnectOptions,
    /// The `LISTEN` task and its signal, started by the first `work_signal`.
    listener: Mutex<Option<listen::Listener>>,
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
        let connect = PgConnectOptions::from_str(&options.url)?.application_name("stevedore");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(PgStore {
            pool,
            connect,
            listener: Mutex::new(None),
        })
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

    /// Changes one task under its row lock: loads it, lets `change` alter it, writes it back;
    /// with `retry` (a runner's completion) the user retry it calls for is queued in the same
    /// transaction. Wakes the lease loops when the task or its retry is queued.
    async fn change_task<T>(
        &self,
        project_id: Option<&str>,
        task_id: &str,
        retry: Option<RetryCheck<'_>>,
        change: impl FnOnce(&mut TaskRecord) -> Result<T>,
    ) -> Result<(TaskRecord, T)> {
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            let mut record = tasks::load_for_update(&mut tx, project_id, task_id).await?;
            let was = record.task.status;
            let value = change(&mut record)?;
            let follow_up = match retry {
                Some(RetryCheck { outcome, now }) => {
                    tasks::plan_retry(&mut tx, &record, outcome, now).await?
                }
                None => None,
            };
            tasks::write(&mut tx, &mut record).await?;
            let requeued = was != TaskStatus::Queued && record.task.status == TaskStatus::Queued;
            if let Some(retry) = &follow_up {
                tasks::insert_rows(&mut tx, std::slice::from_ref(retry)).await?;
            }
            if requeued || follow_up.is_some() {
                tasks::notify_work(&mut tx).await?;
            }
            Ok((record, value))
        }
        .await;
        finish(tx, result).await
    }

    /// `change_task` for a runner holding a lease: refused unless `token` is current.
    async fn change_leased_task<T>(
        &self,
        task_id: &str,
        token: i64,
        retry: Option<RetryCheck<'_>>,
        change: impl FnOnce(&mut TaskRecord) -> Result<T>,
    ) -> Result<(TaskRecord, T)> {
        self.change_task(None, task_id, retry, |record| {
            record.check_lease(token)?;
            change(record)
        })
        .await
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(listener) = self.take_listener() {
            listener.abort();
        }
    }
}

/// A runner's completion, for `change_task` to queue the user retry it calls for.
#[derive(Debug, Clone, Copy)]
struct RetryCheck<'a> {
    outcome: &'a TaskOutcome,
    now: Timestamp,
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
        let project = Project {
            id: new_id(),
            name: name.to_owned(),
            created_at: normalize(now),
        };
        sqlx::query("INSERT INTO projects (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&project.id)
            .bind(&project.name)
            .bind(micros(project.created_at))
            .execute(&self.pool)
            .await
            .map_err(|error| {
                unique_violation(error, || format!("a project named {name:?} already exists"))
            })?;
        Ok(project)
    }

    async fn get_project(&self, project_id: &str) -> Result<Project> {
        let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("project {project_id}")))?;
        rows::project(&row)
    }

    async fn find_project_by_name(&self, name: &str) -> Result<Option<Project>> {
        let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            if let Some(project_id) = project_id {
                ensure_project(&mut tx, project_id).await?;
            }
            sqlx::query(
                "INSERT INTO tokens (id, project_id, role, secret_sha256, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
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
            Ok(record)
        }
        .await;
        finish(tx, result).await
    }

    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(
            "SELECT id, project_id, role, created_at FROM tokens WHERE secret_sha256 = $1",
        )
        .bind(secret_sha256)
        .fetch_optional(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            ensure_project(&mut tx, project_id).await?;
            // The code row is locked while its next revision is written, so two pushes of one code
            // number their revisions one after the other. Two pushes creating one new name meet
            // at the unique index: the second inserts nothing and takes the revision path.
            let mut created = None;
            let existing = loop {
                let existing = sqlx::query(
                    "SELECT id, latest_rev, paused, created_at FROM codes \
                     WHERE project_id = $1 AND name = $2 AND deleted_at IS NULL FOR UPDATE",
                )
                .bind(project_id)
                .bind(&spec.name)
                .fetch_optional(&mut *tx)
                .await?;
                if existing.is_some() {
                    break existing;
                }
                let code_id = new_id();
                let inserted = sqlx::query(
                    "INSERT INTO codes (id, project_id, name, latest_rev, max_concurrency, paused, \
                     created_at, updated_at) VALUES ($1, $2, $3, 1, $4, FALSE, $5, $5) \
                     ON CONFLICT (project_id, name) WHERE deleted_at IS NULL DO NOTHING",
                )
                .bind(&code_id)
                .bind(project_id)
                .bind(&spec.name)
                .bind(max_concurrency)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
                if inserted.rows_affected() == 1 {
                    created = Some(code_id);
                    break None;
                }
            };
            let (code_id, rev, paused, created_at) = match (existing, created) {
                (Some(row), _) => {
                    let code_id: String = row.try_get("id")?;
                    let rev = row.try_get::<i64, _>("latest_rev")? + 1;
                    sqlx::query(
                        "UPDATE codes SET latest_rev = $1, max_concurrency = $2, updated_at = $3 \
                         WHERE id = $4",
                    )
                    .bind(rev)
                    .bind(max_concurrency)
                    .bind(micros(now))
                    .bind(&code_id)
                    .execute(&mut *tx)
                    .await?;
                    let created_at = timestamp(row.try_get("created_at")?)?;
                    (code_id, rev, row.try_get::<bool, _>("paused")?, created_at)
                }
                (None, Some(code_id)) => (code_id, 1, false, now),
                (None, None) => {
                    return Err(StoreError::Corrupt(
                        "pushing a code found neither an old code nor a new one".to_owned(),
                    ));
                }
            };
            sqlx::query(
                "INSERT INTO code_revisions (code_id, rev, spec, package_sha256, package_size, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6)",
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
                sqlx::query("INSERT INTO code_packages (code_id, rev, bytes) VALUES ($1, $2, $3)")
                    .bind(&code_id)
                    .bind(rev)
                    .bind(package.bytes.as_slice())
                    .execute(&mut *tx)
                    .await?;
            }
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
        .await;
        finish(tx, result).await
    }

    async fn get_code(&self, project_id: &str, code_id: &str) -> Result<CodeRevision> {
        let row = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
             WHERE c.id = $1 AND c.project_id = $2 AND c.deleted_at IS NULL"
        ))
        .bind(code_id)
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("code {code_id}")))?;
        rows::revision(&row)
    }

    async fn get_code_by_name(&self, project_id: &str, name: &str) -> Result<CodeRevision> {
        let row = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
             WHERE c.project_id = $1 AND c.name = $2 AND c.deleted_at IS NULL"
        ))
        .bind(project_id)
        .bind(name)
        .fetch_optional(&self.pool)
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
             WHERE c.project_id = $1 AND c.deleted_at IS NULL \
             ORDER BY c.updated_at DESC, c.id DESC LIMIT $2 OFFSET $3"
        ))
        .bind(project_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::revision).collect()
    }

    async fn list_revisions(
        &self,
        project_id: &str,
        code_id: &str,
        page: Page,
    ) -> Result<Vec<CodeRevision>> {
        let mut conn = self.pool.acquire().await?;
        ensure_code(&mut conn, project_id, code_id).await?;
        let (limit, offset) = limit_offset(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            revision_columns!(),
            " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
             WHERE c.id = $1 AND c.project_id = $2 AND c.deleted_at IS NULL \
             ORDER BY r.rev DESC LIMIT $3 OFFSET $4"
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
             WHERE c.id = $1 AND c.project_id = $2 AND c.deleted_at IS NULL AND r.rev = $3"
        ))
        .bind(code_id)
        .bind(project_id)
        .bind(i64::from(rev))
        .fetch_optional(&self.pool)
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
        let mut conn = self.pool.acquire().await?;
        let latest = ensure_code(&mut conn, project_id, code_id).await?;
        let rev = rev.map_or(latest, i64::from);
        let bytes: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT bytes FROM code_packages WHERE code_id = $1 AND rev = $2")
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            let deleted = sqlx::query(
                "UPDATE codes SET deleted_at = $1 \
                 WHERE id = $2 AND project_id = $3 AND deleted_at IS NULL",
            )
            .bind(micros(now))
            .bind(code_id)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
            if deleted.rows_affected() == 0 {
                return Err(StoreError::not_found(format!("code {code_id}")));
            }
            let cancellation = tasks::cancel_code_tasks(&mut tx, code_id, now).await?;
            // A schedule of a deleted code could only ever fail to fire.
            sqlx::query(
                "UPDATE schedules SET status = $1, next_start = NULL, updated_at = $2 \
                 WHERE code_id = $3 AND status = $4",
            )
            .bind(ScheduleStatus::Cancelled.as_str())
            .bind(micros(now))
            .bind(code_id)
            .bind(ScheduleStatus::Scheduled.as_str())
            .execute(&mut *tx)
            .await?;
            Ok(cancellation)
        }
        .await;
        finish(tx, result).await
    }

    async fn set_code_paused(
        &self,
        project_id: &str,
        code_id: &str,
        paused: bool,
        _now: Timestamp,
    ) -> Result<CodeRevision> {
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            let changed = sqlx::query(
                "UPDATE codes SET paused = $1 WHERE id = $2 AND project_id = $3 AND deleted_at IS NULL",
            )
            .bind(paused)
            .bind(code_id)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
            if changed.rows_affected() == 0 {
                return Err(StoreError::not_found(format!("code {code_id}")));
            }
            let row = sqlx::query(concat!(
                "SELECT ",
                revision_columns!(),
                " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
                 WHERE c.id = $1"
            ))
            .bind(code_id)
            .fetch_one(&mut *tx)
            .await?;
            if !paused {
                tasks::notify_work(&mut tx).await?;
            }
            rows::revision(&row)
        }
        .await;
        finish(tx, result).await
    }

    async fn code_stats(
        &self,
        project_id: &str,
        code_id: &str,
        window: StatsWindow,
    ) -> Result<CodeStats> {
        let mut conn = self.pool.acquire().await?;
        ensure_code(&mut conn, project_id, code_id).await?;
        let rows = sqlx::query(
            "SELECT status, count(*) AS n FROM tasks WHERE code_id = $1 \
             AND ($2::bigint IS NULL OR updated_at >= $2) \
             AND ($3::bigint IS NULL OR updated_at <= $3) GROUP BY status",
        )
        .bind(code_id)
        .bind(opt_micros(window.updated_from))
        .bind(opt_micros(window.updated_to))
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            let queued = tasks::insert(&mut tx, project_id, new_tasks, now).await?;
            if !queued.is_empty() {
                tasks::notify_work(&mut tx).await?;
            }
            Ok(queued)
        }
        .await;
        finish(tx, result).await
    }

    async fn get_task(&self, project_id: &str, task_id: &str) -> Result<Task> {
        let mut conn = self.pool.acquire().await?;
        Ok(tasks::load(&mut conn, project_id, task_id).await?.task)
    }

    async fn list_tasks(
        &self,
        project_id: &str,
        filter: &TaskFilter,
        page: Page,
    ) -> Result<Vec<Task>> {
        let (limit, offset) = limit_offset(page);
        let mut query = QueryBuilder::<Postgres>::new(concat!(
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
            let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
            query
                .push(" AND t.status = ANY(")
                .push_bind(statuses)
                .push(")");
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
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| Ok(rows::task_record(row)?.task))
            .collect()
    }

    async fn cancel_task(&self, project_id: &str, task_id: &str, now: Timestamp) -> Result<Task> {
        let now = normalize(now);
        let (record, _) = self
            .change_task(Some(project_id), task_id, None, |record| record.cancel(now))
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            ensure_code(&mut tx, project_id, code_id).await?;
            tasks::cancel_code_tasks(&mut tx, code_id, now).await
        }
        .await;
        finish(tx, result).await
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
        let (record, ()) = self
            .change_task(Some(project_id), task_id, None, |record| {
                if record.task.status.is_terminal() {
                    return Err(StoreError::Conflict(format!(
                        "task {task_id} is already finished: it is {}",
                        record.task.status
                    )));
                }
                record.set_progress(percent, msg, now);
                Ok(())
            })
            .await?;
        Ok(record.task)
    }

    async fn get_log(&self, project_id: &str, task_id: &str) -> Result<Vec<u8>> {
        let mut tx = self.pool.begin_with(BEGIN_SNAPSHOT).await?;
        let result: Result<_> = async {
            let log_size: Option<i64> =
                sqlx::query_scalar("SELECT log_size FROM tasks WHERE id = $1 AND project_id = $2")
                    .bind(task_id)
                    .bind(project_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let log_size =
                log_size.ok_or_else(|| StoreError::not_found(format!("task {task_id}")))?;
            if log_size == 0 {
                return Err(StoreError::not_found(format!("log of task {task_id}")));
            }
            let chunks: Vec<Vec<u8>> =
                sqlx::query_scalar("SELECT bytes FROM task_logs WHERE task_id = $1 ORDER BY seq")
                    .bind(task_id)
                    .fetch_all(&mut *tx)
                    .await?;
            Ok(chunks.concat())
        }
        .await;
        finish(tx, result).await
    }

    async fn get_log_since(
        &self,
        project_id: &str,
        task_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogSlice> {
        // The state and the bytes come from one snapshot: a log cut back for its truncation
        // marker between two separate reads would otherwise mix old and new bytes, and bytes
        // written after a terminal status was read would pass the final size.
        let mut tx = self.pool.begin_with(BEGIN_SNAPSHOT).await?;
        let result: Result<_> = async {
            let mut slice = tasks::log_state(&mut tx, project_id, task_id).await?;
            let end = slice.size.min(offset.saturating_add(u64::from(max_bytes)));
            if offset < end {
                slice.bytes = tasks::read_log(&mut tx, task_id, offset, end).await?;
            }
            Ok(slice)
        }
        .await;
        finish(tx, result).await
    }

    // === leases (the runner's side) ===

    async fn lease(&self, request: &LeaseRequest, now: Timestamp) -> Result<Vec<LeasedTask>> {
        if request.max_tasks == 0 || request.clusters.is_empty() {
            return Ok(Vec::new());
        }
        let now = normalize(now);
        let mut tx = self.pool.begin().await?;
        let leased = tasks::lease(&mut tx, request, now).await;
        finish(tx, leased).await
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
            .change_leased_task(task_id, token, None, |record| {
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
            .change_leased_task(task_id, token, None, |record| record.start(start_time, now))
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            let mut record = tasks::load_for_update(&mut tx, None, task_id).await?;
            record.check_lease(token)?;
            let Some(plan) =
                plan_log_append(record.task.log_size, record.log_truncated, bytes, cap)
            else {
                return Ok(record.task.log_size);
            };
            record.apply_log_plan(&plan, now);
            if let Some(keep) = plan.truncate_to {
                let keep = signed(keep);
                sqlx::query("DELETE FROM task_logs WHERE task_id = $1 AND seq >= $2")
                    .bind(task_id)
                    .bind(keep)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE task_logs SET bytes = substring(bytes FROM 1 FOR ($2 - seq)::int) \
                     WHERE task_id = $1 AND seq < $2 AND seq + length(bytes) > $2",
                )
                .bind(task_id)
                .bind(keep)
                .execute(&mut *tx)
                .await?;
            }
            for (seq, chunk) in &plan.chunks {
                sqlx::query("INSERT INTO task_logs (task_id, seq, bytes) VALUES ($1, $2, $3)")
                    .bind(task_id)
                    .bind(signed(*seq))
                    .bind(chunk.as_slice())
                    .execute(&mut *tx)
                    .await?;
            }
            tasks::write(&mut tx, &mut record).await?;
            Ok(record.task.log_size)
        }
        .await;
        finish(tx, result).await
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
        self.change_leased_task(task_id, token, None, |record| {
            record.set_progress(percent, msg, now);
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
        let (record, ()) = self
            .change_leased_task(
                task_id,
                token,
                Some(RetryCheck { outcome, now }),
                |record| record.finish(outcome, &report, now),
            )
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
        let (record, ()) = self
            .change_leased_task(task_id, token, None, |record| {
                record.give_back(&requeue.reason, due_at, requeue.max_infra_attempts, now)
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            // SKIP LOCKED: a task whose runner is writing about it right now (a heartbeat) is not
            // expired for long; two rescuers each take the ones the other does not hold.
            let expired = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks AS t WHERE t.status IN ($1, $2) AND t.lease_expires_at < $3 \
                 ORDER BY t.lease_expires_at, t.id FOR UPDATE SKIP LOCKED"
            ))
            .bind(TaskStatus::Preparing.as_str())
            .bind(TaskStatus::Running.as_str())
            .bind(micros(now))
            .fetch_all(&mut *tx)
            .await?;
            let mut rescued = Vec::with_capacity(expired.len());
            let mut requeued = false;
            for row in &expired {
                let mut record = rows::task_record(row)?;
                let reason = format!(
                    "the lease of runner {} expired",
                    record.task.runner_id.as_deref().unwrap_or("(unknown)")
                );
                record.give_back(&reason, now, max_infra_attempts, now)?;
                tasks::write(&mut tx, &mut record).await?;
                requeued |= record.task.status == TaskStatus::Queued;
                rescued.push(RescuedTask::from(&record.task));
            }
            if requeued {
                tasks::notify_work(&mut tx).await?;
            }
            Ok(rescued)
        }
        .await;
        finish(tx, result).await
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            let mut created = Vec::with_capacity(specs.len());
            for (spec, first_fire) in specs {
                // Share-locked so that a code deleted at the same moment cancels this schedule.
                let code_id: String = sqlx::query_scalar(
                    "SELECT id FROM codes WHERE project_id = $1 AND name = $2 AND deleted_at IS NULL \
                     FOR SHARE",
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
                     VALUES ($1, $2, $3, $4, $5, $6, NULL, 0, $7, $7)",
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
            Ok(created)
        }
        .await;
        finish(tx, result).await
    }

    async fn get_schedule(&self, project_id: &str, schedule_id: &str) -> Result<Schedule> {
        let mut conn = self.pool.acquire().await?;
        load_schedule(&mut conn, Some(project_id), schedule_id, false).await
    }

    async fn list_schedules(&self, project_id: &str, page: Page) -> Result<Vec<Schedule>> {
        let (limit, offset) = limit_offset(page);
        let rows = sqlx::query(concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules AS s WHERE s.project_id = $1 \
             ORDER BY s.created_at DESC, s.id DESC LIMIT $2 OFFSET $3"
        ))
        .bind(project_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
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
        let cancelled = sqlx::query(concat!(
            "UPDATE schedules AS s SET status = $1, next_start = NULL, updated_at = $2 \
             WHERE s.id = $3 AND s.project_id = $4 AND s.status = $5 RETURNING ",
            schedule_columns!()
        ))
        .bind(ScheduleStatus::Cancelled.as_str())
        .bind(micros(now))
        .bind(schedule_id)
        .bind(project_id)
        .bind(ScheduleStatus::Scheduled.as_str())
        .fetch_optional(&self.pool)
        .await?;
        match cancelled {
            Some(row) => rows::schedule(&row),
            None => self.get_schedule(project_id, schedule_id).await,
        }
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            // The row lock orders the change with a fire of the schedule.
            let mut schedule = load_schedule(&mut tx, Some(project_id), schedule_id, true).await?;
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
                "UPDATE schedules SET spec = $1, status = $2, next_start = $3, updated_at = $4 \
                 WHERE id = $5",
            )
            .bind(to_json(spec)?)
            .bind(schedule.status.as_str())
            .bind(opt_micros(next_start))
            .bind(micros(now))
            .bind(schedule_id)
            .execute(&mut *tx)
            .await?;
            Ok(schedule)
        }
        .await;
        finish(tx, result).await
    }

    async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules AS s WHERE s.status = 'scheduled' AND s.next_start <= $1 \
             ORDER BY s.next_start, s.id LIMIT $2"
        ))
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let result: Result<_> = async {
            // The row lock makes a second scheduler wait and then see the new `next_start`.
            let schedule = load_schedule(&mut tx, None, schedule_id, true).await?;
            if schedule.status != ScheduleStatus::Scheduled || schedule.next_start != Some(fired_at) {
                return Err(StoreError::Conflict(format!(
                    "schedule {schedule_id} is not due at {fired_at}: it already fired or was cancelled"
                )));
            }
            let spec = &schedule.spec;
            if let Some(limit) = spec.max_concurrency {
                // The schedule's row lock (taken above) orders this count with every other
                // fire of the schedule.
                let unfinished: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM tasks WHERE schedule_id = $1 \
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
                "UPDATE schedules SET status = $1, next_start = $2, last_run_time = $3, \
                 run_count = run_count + 1, updated_at = $3 WHERE id = $4",
            )
            .bind(status.as_str())
            .bind(opt_micros(next_start))
            .bind(micros(now))
            .bind(schedule_id)
            .execute(&mut *tx)
            .await?;
            tasks::notify_work(&mut tx).await?;
            queued
                .pop()
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt("firing a schedule queued no task".to_owned()))
        }
        .await;
        finish(tx, result).await
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

    // === gauges ===

    async fn gauges(&self, now: Timestamp) -> Result<StoreGauges> {
        gauges::gauges(self, now).await
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

async fn ensure_project(conn: &mut PgConnection, project_id: &str) -> Result<()> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM projects WHERE id = $1")
        .bind(project_id)
        .fetch_optional(&mut *conn)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found(format!("project {project_id}")))
}

/// Checks that a live code exists in the project; returns its latest revision number.
async fn ensure_code(conn: &mut PgConnection, project_id: &str, code_id: &str) -> Result<i64> {
    let latest: Option<i64> = sqlx::query_scalar(
        "SELECT latest_rev FROM codes WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL",
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
    conn: &mut PgConnection,
    schedule_id: &str,
    next_start: Option<Timestamp>,
    now: Timestamp,
) -> Result<()> {
    let status = if next_start.is_some() {
        ScheduleStatus::Scheduled
    } else {
        ScheduleStatus::Complete
    };
    sqlx::query("UPDATE schedules SET status = $1, next_start = $2, updated_at = $3 WHERE id = $4")
        .bind(status.as_str())
        .bind(opt_micros(next_start))
        .bind(micros(now))
        .bind(schedule_id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn load_schedule(
    conn: &mut PgConnection,
    project_id: Option<&str>,
    schedule_id: &str,
    for_update: bool,
) -> Result<Schedule> {
    let query = if for_update {
        concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules AS s WHERE s.id = $1 AND ($2::text IS NULL OR s.project_id = $2) \
             FOR UPDATE"
        )
    } else {
        concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules AS s WHERE s.id = $1 AND ($2::text IS NULL OR s.project_id = $2)"
        )
    };
    let row = sqlx::query(query)
        .bind(schedule_id)
        .bind(project_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("schedule {schedule_id}")))?;
    rows::schedule(&row)
}
