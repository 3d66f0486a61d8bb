//! The `Store`: everything stevedore keeps — projects, tokens, codes and their packages,
//! tasks with their logs and leases, schedules — behind one async trait with one
//! implementation per database.
//!
//! This is the only crate that holds SQL. Callers speak in domain types from
//! `stevedore-model` and never see a row, a connection or a transaction. The lease operation
//! lives here because priorities, `max_concurrency`, paused queues, clusters and lease fencing
//! must be decided inside one transaction to hold across every runner.
//!
//! Projects' registry credentials are kept with their passwords sealed (`credentials`); the
//! store never sees a password in clear, and [`attach_registry_credentials`] is the one place
//! a lease gets its project's credential, for every kind of runner.
//!
//! Time is an argument: every method that compares or stamps time takes `now`, so tests drive
//! it with a fake clock.
//!
//! `testsuite` (cargo feature `test-support`) is the suite every `Store` must pass;
//! `testcluster` (the same feature) is a throwaway PostgreSQL for tests and benchmarks.

#![forbid(unsafe_code)]

mod convert;
pub mod credentials;
mod error;
mod package;
mod postgres;
mod record;
mod rows;
mod sqlite;
#[cfg(feature = "test-support")]
pub mod testcluster;
#[cfg(any(test, feature = "test-support"))]
pub mod testsuite;

use async_trait::async_trait;
use stevedore_model::{
    CodeKind, CodeRevision, CodeSpec, NewTask, Quota, QuotaLimits, Schedule, ScheduleSpec, Task,
    TaskAttempt, TaskOutcome, TaskStatus, Timestamp,
};

pub use credentials::{
    CredentialKey, CredentialVault, SealedSecret, SecretError, StoredCredential,
    attach_registry_credentials,
};
pub use error::StoreError;
pub use package::{PackageFile, PackagePrune, PackageStream, RevisionPackage};
pub use postgres::{PgOptions, PgStore};
pub use sqlite::{SqliteOptions, SqliteStore, SyncMode};
pub use stevedore_model::lease::{
    HeartbeatReply, Lease, LeaseRequest, LeasedTask, RunReport, WorkSignal,
};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    /// Everything within one project.
    Project,
    /// Only the runner protocol.
    Runner,
    /// Everything, in every project.
    Admin,
}

/// A stored token. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    /// The project the token belongs to: a project token's, or a runner token's that serves
    /// only that project's own clusters; `None` for admin and operator runner tokens.
    pub project_id: Option<String>,
    pub role: TokenRole,
    /// A runner token's clusters: it leases from these only. `None`: every shared cluster
    /// (an operator's runner token made without `--cluster`).
    pub clusters: Option<Vec<String>>,
    pub created_at: Timestamp,
}

/// A token to create: whose, what it may do, and for a runner token, which clusters.
#[derive(Debug, Clone, PartialEq)]
pub struct NewToken {
    pub project_id: Option<String>,
    pub role: TokenRole,
    pub clusters: Option<Vec<String>>,
}

/// A page of a list: 1-based page number and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub page: u32,
    pub per_page: u32,
}

/// Which tasks `list_tasks` returns. Empty `statuses` means every status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFilter {
    pub code_name: Option<String>,
    /// Only tasks with this label.
    pub label: Option<String>,
    pub statuses: Vec<TaskStatus>,
    /// Only tasks created at or after this time.
    pub from_time: Option<Timestamp>,
    /// Only tasks created at or before this time.
    pub to_time: Option<Timestamp>,
}

/// Which of a code's tasks `code_stats` counts, by when each last changed. Open bounds count
/// every task.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsWindow {
    /// Only tasks last changed at or after this time.
    pub updated_from: Option<Timestamp>,
    /// Only tasks last changed at or before this time.
    pub updated_to: Option<Timestamp>,
}

/// Counts of a code's tasks by status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CodeStats {
    pub by_status: Vec<(TaskStatus, u64)>,
}

/// Which finished tasks `Store::usage` sums, and into which buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageQuery {
    /// Tasks that ended at or after this time…
    pub from: Timestamp,
    /// …and before this one.
    pub to: Timestamp,
    /// The width of a bucket. Buckets are aligned to multiples of it since the Unix epoch,
    /// not to `from`, so a bucket holds the same tasks whichever window asks for it (a chart
    /// that slides with the clock keeps its past bars); the first and last bucket of a window
    /// may be cut by `from` and `to`.
    pub bucket_secs: u32,
}

/// The tasks of one code revision that ended in one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    /// The start of the bucket, a multiple of `bucket_secs` since the epoch.
    pub bucket_start: Timestamp,
    pub code_id: String,
    pub code_name: String,
    pub code_rev: u32,
    /// What the revision runs (a stack's runtime or an image), read from the revision even
    /// when its code has been deleted since, so usage can be told apart by stack.
    pub kind: CodeKind,
    pub complete: u64,
    pub error: u64,
    pub timeout: u64,
    pub cancelled: u64,
    /// Time in containers: the sum of `end_time - start_time` over the tasks that started.
    /// A task cancelled or failed before its container started adds nothing.
    pub compute_ms: u64,
}

/// How long one task waited between being due and its container starting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueWait {
    pub started_at: Timestamp,
    /// `start_time - due_at`, never below zero (the start comes from the container's clock).
    pub wait_ms: u64,
}

/// Why a runner gives a task back.
#[derive(Debug, Clone, PartialEq)]
pub struct Requeue {
    /// What went wrong, for the task's message and the logs.
    pub reason: String,
    /// When the task may be leased again.
    pub due_at: Timestamp,
    /// After this many infrastructure failures the task ends `error` instead.
    pub max_infra_attempts: u32,
}

/// A task whose lease expired, as `rescue_expired` left it.
#[derive(Debug, Clone, PartialEq)]
pub struct RescuedTask {
    pub task_id: String,
    pub code_name: String,
    /// `queued` again, or final: `error` once its infrastructure attempts ran out,
    /// `cancelled` when a user had asked to cancel it.
    pub status: TaskStatus,
}

/// What cancelling a code's tasks (`cancel_all`, `delete_code`) did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CodeCancellation {
    /// The code's name, as its tasks carry it.
    pub code_name: String,
    /// Queued tasks that are `cancelled` now.
    pub cancelled: u64,
    /// Leased tasks asked to cancel: their runners kill them and complete them `cancelled`.
    pub cancel_requested: u64,
}

/// A piece of a task's log read together with the task's state, so that a follower knows
/// whether more can come: once `status` is terminal, `size` is final.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSlice {
    /// The log from the offset asked for: at most `max_bytes`, empty at or past the end.
    pub bytes: Vec<u8>,
    /// Bytes stored in all (the task's `log_size`).
    pub size: u64,
    /// Where the truncation marker begins once the log reached its cap. After that the log
    /// never changes; bytes past this offset read before may have been replaced by the marker.
    pub truncated_at: Option<u64>,
    pub status: TaskStatus,
    pub percent: Option<u8>,
    pub msg: Option<String>,
}

/// What a cluster is made of, as a project asked for it. Only `name` routes tasks; the rest is
/// the operator's record of what the pool should look like.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSpec {
    pub name: String,
    pub memory_mib: Option<u32>,
    pub disk_mib: Option<u32>,
    pub runners: Option<u32>,
}

/// A named pool of runners. Its name is unique across the store, so a runner serving it only
/// ever gets the owning project's tasks (or every project's, for a shared cluster).
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub id: String,
    /// The owning project; `None` for a shared cluster.
    pub project_id: Option<String>,
    pub spec: ClusterSpec,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A runner as it introduced itself when it last asked for work.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerSeen {
    pub id: String,
    pub clusters: Vec<String>,
    pub capacity: u32,
    /// Whose clusters `clusters` names: `None`, the shared ones; else that project's own.
    pub owner: Option<String>,
}

/// A runner of a cluster, as `cluster_load` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerStatus {
    pub id: String,
    pub clusters: Vec<String>,
    pub capacity: u32,
    /// Tasks it holds live leases on now.
    pub in_use: u64,
    pub last_seen: Timestamp,
}

/// What a cluster is doing now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterLoad {
    /// Its tasks waiting to run.
    pub queued: u64,
    /// Its tasks preparing or running.
    pub running: u64,
    /// Runners serving it that are online: seen since the given time, or holding a live lease.
    pub runners: Vec<RunnerStatus>,
}

impl ClusterLoad {
    /// The online runners' slots, summed.
    pub fn capacity(&self) -> u64 {
        self.runners
            .iter()
            .map(|runner| u64::from(runner.capacity))
            .sum()
    }

    /// The online runners' slots in use (live leases), summed.
    pub fn in_use(&self) -> u64 {
        self.runners.iter().map(|runner| runner.in_use).sum()
    }
}

/// The store's task counts at one moment, for metrics read at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreGauges {
    /// Tasks queued, preparing and running, in that order, zeros included.
    pub by_status: Vec<(TaskStatus, u64)>,
    /// Queued tasks due at the time asked about (paused codes' included), for every priority
    /// from 0 to `MAX_PRIORITY`, zeros included.
    pub queue_depth: Vec<(u8, u64)>,
}

/// What retention removes of a finished task, kept apart because each has an age of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskData {
    /// The task's log: its bytes go, `log_size` stays as the size it had.
    Log,
    /// The task's payload: it reads as empty from then on.
    Payload,
}

/// Where a walk of `Store::prune_task_data` goes on: the last task a call passed, by end time
/// and id (the walk's order).
#[derive(Debug, Clone, PartialEq)]
pub struct PruneCursor {
    pub end_time: Timestamp,
    pub task_id: String,
}

/// What one call of `Store::prune_task_data` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskDataPrune {
    /// Finished tasks it passed over, each marked as pruned (`log_removed_at` or
    /// `payload_removed_at`), those with nothing stored included: at most `max_rows`.
    pub passed: u64,
    /// Of them, the tasks that held bytes, which are gone now.
    pub removed: u64,
    /// The bytes removed: the logs' sizes, or the payloads' UTF-8 bytes.
    pub bytes: u64,
    /// Where the next call goes on; `None` once nothing before the cutoff was left.
    pub next: Option<PruneCursor>,
}

/// The bytes of task data the store holds, from totals kept in the transactions that change
/// them (no scan): logs as stored (truncation markers included) and payloads as UTF-8.
/// Logical sizes: what the database takes on disk for them differs by its pages and
/// compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataSizes {
    pub log_bytes: u64,
    pub payload_bytes: u64,
}

/// One quota of a project, as `Store::project_quotas` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUse {
    pub quota: Quota,
    /// The project's own limit, or the operator's default.
    pub limit: u64,
    /// Whether `limit` is the project's own (set by an admin) rather than the default.
    pub own_limit: bool,
    /// What the project holds now; `None` for what the store does not count (live log
    /// streams, which exist in a server's process). For `revisions_per_code`, the most
    /// revisions any one of its codes has.
    pub used: Option<u64>,
}

// === impl QuotaUse ===

impl QuotaUse {
    /// Every quota in `Quota::ALL` order, from the operator's `defaults`, the project's own
    /// limits and the counts a backend made (`count` answers `None` for what it does not
    /// count).
    pub(crate) fn list(
        defaults: &QuotaLimits,
        own: &[(Quota, u64)],
        count: impl Fn(Quota) -> Option<u64>,
    ) -> Vec<QuotaUse> {
        let limits = defaults.with_overrides(own);
        Quota::ALL
            .into_iter()
            .map(|quota| QuotaUse {
                quota,
                limit: limits.get(quota),
                own_limit: own.iter().any(|(overridden, _)| *overridden == quota),
                used: count(quota),
            })
            .collect()
    }
}

// === impl RescuedTask ===

impl From<&Task> for RescuedTask {
    fn from(task: &Task) -> Self {
        RescuedTask {
            task_id: task.id.clone(),
            code_name: task.code_name.clone(),
            status: task.status,
        }
    }
}

// === impl CodeCancellation ===

impl CodeCancellation {
    /// Every task it touched: cancelled now or asked to cancel.
    pub fn touched(&self) -> u64 {
        self.cancelled + self.cancel_requested
    }
}

// === impl StoreGauges ===

impl StoreGauges {
    /// The statuses `by_status` reports: those a task leaves again.
    pub const STATUSES: [TaskStatus; 3] = [
        TaskStatus::Queued,
        TaskStatus::Preparing,
        TaskStatus::Running,
    ];

    /// The gauges from the stored task counts (`task_counts`: tasks by status and priority,
    /// kept in the same transactions as every change of a status) and the queued tasks not due
    /// yet by priority, counted apart: the queue depth is what is due. Fills in the zeros
    /// around what the database reported (`GROUP BY` leaves out what it did not see).
    pub(crate) fn from_task_counts(
        counts: &[(TaskStatus, u8, u64)],
        queued_later: &[(u8, u64)],
    ) -> StoreGauges {
        let count_of = |status: TaskStatus| {
            counts
                .iter()
                .filter(|(seen, _, _)| *seen == status)
                .map(|(_, _, count)| count)
                .sum()
        };
        let depth_of = |priority: u8| {
            let queued: u64 = counts
                .iter()
                .filter(|(seen, at, _)| *seen == TaskStatus::Queued && *at == priority)
                .map(|(_, _, count)| count)
                .sum();
            let later: u64 = queued_later
                .iter()
                .filter(|(at, _)| *at == priority)
                .map(|(_, count)| count)
                .sum();
            queued.saturating_sub(later)
        };
        StoreGauges {
            by_status: Self::STATUSES
                .iter()
                .map(|status| (*status, count_of(*status)))
                .collect(),
            queue_depth: (0..=stevedore_model::limits::MAX_PRIORITY)
                .map(|priority| (priority, depth_of(priority)))
                .collect(),
        }
    }
}

/// Everything stevedore keeps. One implementation per database; one shared test suite
/// (`testsuite`) that every implementation must pass.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A signal of work queued by any process sharing this store, for lease loops that would
    /// otherwise only poll. `None` (the default) when the store has no such signal of its own:
    /// SQLite is one process's, and the server tells its embedded runner of new work directly.
    /// PostgreSQL's comes from `LISTEN`, shared by every server on the database.
    fn work_signal(&self) -> Option<WorkSignal> {
        None
    }

    // === projects and tokens ===

    async fn create_project(&self, name: &str, now: Timestamp) -> Result<Project>;
    async fn get_project(&self, project_id: &str) -> Result<Project>;
    async fn find_project_by_name(&self, name: &str) -> Result<Option<Project>>;
    /// Stores a token by the SHA-256 of its secret.
    async fn create_token(
        &self,
        token: &NewToken,
        secret_sha256: &str,
        now: Timestamp,
    ) -> Result<TokenRecord>;
    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>>;

    // === codes ===

    /// Adds a revision to the code named `spec.name`, creating the code at revision 1 when
    /// the project has none by that name. A package is stored once per checksum, whoever
    /// pushed it: a file whose checksum is stored already is not read, and
    /// `RevisionPackage::Stored` stores nothing. A new package's bytes are written chunk by
    /// chunk before the revision's transaction, which makes them the revision's package: no
    /// revision ever holds a half-written one.
    async fn push_code(
        &self,
        project_id: &str,
        spec: &CodeSpec,
        package: Option<RevisionPackage<'_>>,
        now: Timestamp,
    ) -> Result<CodeRevision>;
    /// The latest revision of a code.
    async fn get_code(&self, project_id: &str, code_id: &str) -> Result<CodeRevision>;
    async fn get_code_by_name(&self, project_id: &str, name: &str) -> Result<CodeRevision>;
    /// A code's latest revisions, newest code first.
    async fn list_codes(&self, project_id: &str, page: Page) -> Result<Vec<CodeRevision>>;
    /// Every revision of a code, newest first.
    async fn list_revisions(
        &self,
        project_id: &str,
        code_id: &str,
        page: Page,
    ) -> Result<Vec<CodeRevision>>;
    async fn get_revision(&self, project_id: &str, code_id: &str, rev: u32)
    -> Result<CodeRevision>;
    /// The zip package of a revision (the latest when `rev` is `None`), read chunk by chunk as
    /// the stream is polled. `StoreError::NotFound` for a revision without one,
    /// `StoreError::PackageRemoved` for one whose package was pruned.
    async fn get_package(
        &self,
        project_id: &str,
        code_id: &str,
        rev: Option<u32>,
    ) -> Result<PackageStream>;
    /// The zip package of the code revision a leased task pinned, for the runner holding the
    /// lease: `StoreError::StaleLease` unless `token` is the task's current lease (as for
    /// `heartbeat`), `StoreError::NotFound` for an unknown task or a revision without a package.
    async fn leased_package(&self, task_id: &str, token: i64) -> Result<PackageStream>;
    /// Deletes a code; its queued tasks are cancelled, its leased ones asked to cancel, its
    /// schedules cancelled; finished tasks stay readable. The name is free for a new code.
    async fn delete_code(
        &self,
        project_id: &str,
        code_id: &str,
        now: Timestamp,
    ) -> Result<CodeCancellation>;
    async fn set_code_paused(
        &self,
        project_id: &str,
        code_id: &str,
        paused: bool,
        now: Timestamp,
    ) -> Result<CodeRevision>;
    /// Counts of the code's tasks in `window` for every status, in lifecycle order, zeros
    /// included.
    async fn code_stats(
        &self,
        project_id: &str,
        code_id: &str,
        window: StatsWindow,
    ) -> Result<CodeStats>;

    // === package retention ===

    /// Drops the package of every revision older than the newest `keep_revisions` (at least
    /// 1) of its code, and of every revision of a deleted code, except the revisions an
    /// unfinished (queued, preparing or running) task pins; deletes the packages no revision
    /// holds any more; and deletes the chunks of blobs given up (a pruned package's, or a
    /// write not finished within an hour). A revision keeps its record of the package
    /// (`package_sha256`, `package_size`); `get_package` answers it with
    /// `StoreError::PackageRemoved`. At most `max_rows` of each per call, in short
    /// transactions: call again until it reports nothing done.
    async fn prune_packages(&self, keep_revisions: u32, max_rows: u32) -> Result<PackagePrune>;
    /// The bytes of every stored package, each once (shared packages are stored once).
    async fn package_bytes(&self) -> Result<u64>;

    // === tasks ===

    /// Queues every task or none: an unknown code name fails the whole batch with
    /// `StoreError::NotFound`. Each task pins the latest revision of its code (or
    /// `NewTask::code_rev`), is due at `now + delay`, and comes back exactly as stored.
    async fn enqueue(
        &self,
        project_id: &str,
        tasks: &[NewTask],
        now: Timestamp,
    ) -> Result<Vec<Task>>;
    async fn get_task(&self, project_id: &str, task_id: &str) -> Result<Task>;
    /// Every attempt at running the task, first first: each lease, its runner, its start and
    /// how it ended.
    async fn task_attempts(&self, project_id: &str, task_id: &str) -> Result<Vec<TaskAttempt>>;
    /// Tasks matching the filter, newest first.
    async fn list_tasks(
        &self,
        project_id: &str,
        filter: &TaskFilter,
        page: Page,
    ) -> Result<Vec<Task>>;
    /// Cancels a queued task at once (`end_time = now`); marks a leased one
    /// `cancel_requested` so its runner, told by the next heartbeat, kills it and completes it
    /// with `TaskOutcome::Cancelled`. A finished task is `StoreError::Conflict`.
    async fn cancel_task(&self, project_id: &str, task_id: &str, now: Timestamp) -> Result<Task>;
    /// Cancels every queued task of a code and requests cancellation of its leased ones.
    async fn cancel_all(
        &self,
        project_id: &str,
        code_id: &str,
        now: Timestamp,
    ) -> Result<CodeCancellation>;
    async fn set_progress(
        &self,
        project_id: &str,
        task_id: &str,
        percent: Option<u8>,
        msg: Option<&str>,
        now: Timestamp,
    ) -> Result<Task>;
    /// The task's log so far; `StoreError::NotFound` while there is none,
    /// `StoreError::Removed` once retention removed it.
    async fn get_log(&self, project_id: &str, task_id: &str) -> Result<Vec<u8>>;

    /// The task's log from byte `offset`, at most `max_bytes` of it, with the task's status,
    /// progress and log size as of the same moment: everything logged before a terminal status
    /// is within `size`. Unknown tasks (and other projects' tasks) are `StoreError::NotFound`;
    /// an empty log is an empty slice; a log retention removed is `StoreError::Removed`.
    async fn get_log_since(
        &self,
        project_id: &str,
        task_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogSlice>;

    // === leases (the runner's side) ===

    /// Claims up to `max_tasks` due queued tasks: highest priority first, earliest due first
    /// within a priority, then by id; skips paused and deleted codes, other clusters and codes
    /// at `max_concurrency` (counting tasks preparing, running and picked in this call). Each
    /// gets a fresh token, larger than every token handed out before, and is `preparing`.
    async fn lease(&self, request: &LeaseRequest, now: Timestamp) -> Result<Vec<LeasedTask>>;
    /// Extends a lease. `StoreError::StaleLease` when the token is no longer the task's.
    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
        now: Timestamp,
    ) -> Result<HeartbeatReply>;
    /// The container started: `preparing` → `running`. Needed before an `Exited`, `TimedOut`
    /// or `OutOfMemory` completion; a task that never started completes `SetupFailed` or
    /// `Cancelled`.
    async fn mark_running(
        &self,
        task_id: &str,
        token: i64,
        start_time: Timestamp,
        now: Timestamp,
    ) -> Result<Task>;
    /// Appends log bytes, keeping at most `cap` bytes in total: the write that would pass the
    /// cap is cut short and the log ends with one line `[stevedore: log truncated at {cap}
    /// bytes]`; later bytes are dropped. Returns the stored size (the task's `log_size`).
    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
        now: Timestamp,
    ) -> Result<u64>;
    /// Progress reported by the runner on the task's behalf.
    async fn runner_progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
        now: Timestamp,
    ) -> Result<()>;
    /// Records the terminal result exactly once and clears the lease; a stale token (or a
    /// second completion) is `StoreError::StaleLease`.
    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
        now: Timestamp,
    ) -> Result<Task>;
    /// Gives a task back after an infrastructure failure. It becomes `queued` again, due at
    /// `requeue.due_at`, or ends `error` ("infrastructure failure after N attempts: reason")
    /// once it has failed `max_infra_attempts` times. A task whose cancellation was requested
    /// ends `cancelled` instead.
    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        requeue: &Requeue,
        now: Timestamp,
    ) -> Result<Task>;
    /// Requeues every task whose lease expired before `now` (due at `now`), as `requeue`
    /// would. Returns the tasks it rescued with the status each has now (final ones
    /// included). The old token is refused from then on.
    async fn rescue_expired(
        &self,
        now: Timestamp,
        max_infra_attempts: u32,
    ) -> Result<Vec<RescuedTask>>;
    /// Requeues, as `rescue_expired` does, every task runner `runner_id` holds (only those of
    /// `project_id` when given), whatever its lease: the runner started again and runs none of
    /// them, so they need not wait for their leases to expire.
    async fn release_runner(
        &self,
        runner_id: &str,
        project_id: Option<&str>,
        now: Timestamp,
        max_infra_attempts: u32,
    ) -> Result<Vec<RescuedTask>>;

    // === clusters and runners ===

    /// Creates a cluster owned by `project_id` (`None`: shared by every project). Names are
    /// unique across the store; a taken name (or `default`) is `StoreError::Conflict`.
    async fn create_cluster(
        &self,
        project_id: Option<&str>,
        spec: &ClusterSpec,
        now: Timestamp,
    ) -> Result<Cluster>;
    /// A cluster visible to `project_id`: its own or a shared one (`None` sees every cluster).
    async fn get_cluster(&self, project_id: Option<&str>, cluster_id: &str) -> Result<Cluster>;
    /// The cluster named `name` if `project_id` may use it (its own or a shared one; `None`
    /// sees every cluster).
    async fn find_cluster_by_name(
        &self,
        project_id: Option<&str>,
        name: &str,
    ) -> Result<Option<Cluster>>;
    /// The clusters visible to `project_id`, by name.
    async fn list_clusters(&self, project_id: Option<&str>) -> Result<Vec<Cluster>>;
    /// Replaces a cluster's spec. A new name must be free, and a cluster with tasks queued or
    /// running keeps its name (`StoreError::Conflict`), so no task is stranded.
    async fn update_cluster(
        &self,
        cluster_id: &str,
        spec: &ClusterSpec,
        now: Timestamp,
    ) -> Result<Cluster>;
    /// Deletes a cluster; refused (`StoreError::Conflict`) while tasks of it are queued or
    /// running or schedules still firing name it.
    async fn delete_cluster(&self, cluster_id: &str) -> Result<()>;
    /// Notes that a runner asked for work at `now`, with its clusters and capacity.
    async fn record_runner(&self, runner: &RunnerSeen, now: Timestamp) -> Result<()>;
    /// Tasks of the cluster named `name` owned by `owner` (`None`: the shared one; only
    /// `project_id`'s tasks when given) queued and active, and the runners serving it that
    /// were seen at or after `online_since` or hold a lease that has not expired at `now`.
    async fn cluster_load(
        &self,
        name: &str,
        owner: Option<&str>,
        project_id: Option<&str>,
        online_since: Timestamp,
        now: Timestamp,
    ) -> Result<ClusterLoad>;
    /// Which of `runner_ids` (runners of `owner`: of the shared clusters when `None`) are
    /// gone: seen asking for work, but not since `seen_before`, and holding no lease that is
    /// still live at `now`. Whatever such a runner started outlived its leases, so a runner on
    /// the same engine may remove it. A runner this store never saw is not gone: it may lease
    /// from another store whose tasks share the engine.
    async fn gone_runners(
        &self,
        runner_ids: &[String],
        owner: Option<&str>,
        seen_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<String>>;

    // === schedules ===

    /// Stores every schedule or none (an unknown code name fails the batch). Each spec comes
    /// with its first fire time (`ScheduleSpec::first_fire`), which becomes `next_start`; a
    /// schedule without one will never fire and is stored `complete`.
    async fn create_schedules(
        &self,
        project_id: &str,
        specs: &[(ScheduleSpec, Option<Timestamp>)],
        now: Timestamp,
    ) -> Result<Vec<Schedule>>;
    async fn get_schedule(&self, project_id: &str, schedule_id: &str) -> Result<Schedule>;
    /// A project's schedules, newest first.
    async fn list_schedules(&self, project_id: &str, page: Page) -> Result<Vec<Schedule>>;
    /// Cancels a schedule: `cancelled`, `next_start` cleared. Idempotent: a schedule that is
    /// no longer `scheduled` (already cancelled, or complete) is returned unchanged.
    async fn cancel_schedule(
        &self,
        project_id: &str,
        schedule_id: &str,
        now: Timestamp,
    ) -> Result<Schedule>;
    /// Replaces a `scheduled` schedule's spec and its next fire time (`None` completes it);
    /// its runs so far and its code stay. `StoreError::Conflict` once it is complete or
    /// cancelled.
    async fn update_schedule(
        &self,
        project_id: &str,
        schedule_id: &str,
        spec: &ScheduleSpec,
        next_start: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Schedule>;
    /// Schedules of every project that are `scheduled` and due (`next_start <= now`), the
    /// longest-waiting first. For the scheduler loop.
    async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>>;
    /// Fires a schedule that was due at `fired_at` (its current `next_start`), atomically:
    /// queues its task (as `enqueue` would, with `schedule_id` set), counts the run, and moves
    /// `next_start` to `next_start`, or completes the schedule when that is `None`.
    /// `StoreError::Conflict` when the schedule is no longer due at `fired_at` (another
    /// scheduler fired it, or it was cancelled), so a schedule never fires twice for one time.
    /// `None` when the schedule's `max_concurrency` of its tasks are still queued or running,
    /// or its project is at its queued-tasks quota: then it queues nothing, does not count a
    /// run, and moves on to the fire time after `fired_at` (its spec's `next_fire` with the
    /// runs so far), as after a missed time.
    async fn fire_schedule(
        &self,
        schedule_id: &str,
        fired_at: Timestamp,
        next_start: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Option<Task>>;

    // === registry credentials ===

    /// Stores (or replaces) the project's credential for `registry`, its password sealed.
    /// `StoreError::NotFound` for an unknown project.
    async fn put_registry_credential(
        &self,
        project_id: &str,
        registry: &str,
        username: &str,
        sealed: &SealedSecret,
        now: Timestamp,
    ) -> Result<StoredCredential>;
    /// The project's credential for `registry`, if it stored one.
    async fn get_registry_credential(
        &self,
        project_id: &str,
        registry: &str,
    ) -> Result<Option<StoredCredential>>;
    /// The project's credentials, by registry.
    async fn list_registry_credentials(&self, project_id: &str) -> Result<Vec<StoredCredential>>;
    /// Forgets the project's credential for `registry`; `StoreError::NotFound` when it has
    /// none.
    async fn delete_registry_credential(&self, project_id: &str, registry: &str) -> Result<()>;

    // === leadership ===

    /// Tries to make this process the leader: the one among the servers sharing this store
    /// that runs the scheduler and the rescuer. `None` while another process leads. The
    /// leadership lasts while the returned guard lives and [`Leadership::is_held`] says so;
    /// a process that dies loses it by itself, so another takes over.
    async fn try_lead(&self) -> Result<Option<Box<dyn Leadership>>>;

    // === usage ===

    /// The project's tasks that ended in `[query.from, query.to)`, summed per bucket and code
    /// revision in the database, ordered by bucket, code name, code id and revision. Buckets
    /// and revisions without finished tasks have no row.
    async fn usage(&self, project_id: &str, query: &UsageQuery) -> Result<Vec<UsageRow>>;
    /// Queue waits of the project's tasks whose container started in `[from, to)`: at most
    /// `limit` of them, the latest starts first. A window with more starts than `limit` is
    /// sampled by recency: its earliest part has no samples, so callers that compute
    /// percentiles should say how many samples they had and when the limit cut them.
    async fn queue_waits(
        &self,
        project_id: &str,
        from: Timestamp,
        to: Timestamp,
        limit: u32,
    ) -> Result<Vec<QueueWait>>;
    /// Counts of all the project's tasks in `window` for every status, in lifecycle order,
    /// zeros included, as `code_stats` counts one code's. An unknown project counts zero.
    async fn project_counts(&self, project_id: &str, window: StatsWindow) -> Result<CodeStats>;

    // === quotas ===

    /// The project's quotas, each in `Quota::ALL` order with its limit (the project's own or
    /// the operator's default, see `with_quota_defaults` of each store) and what the project
    /// holds. `StoreError::NotFound` for an unknown project.
    ///
    /// The store enforces them where it writes, inside the write's transaction, so that
    /// concurrent requests cannot pass a limit together: `enqueue` (queued tasks), `push_code`
    /// (codes, revisions per code, package bytes) and `create_schedules` (schedules) fail
    /// with `StoreError::QuotaExceeded` and write nothing; `fire_schedule` at the queued-tasks
    /// limit queues nothing and moves on, as at its `max_concurrency`. User retries queued by
    /// `complete` and requeues are not refused: they continue work already admitted.
    async fn project_quotas(&self, project_id: &str) -> Result<Vec<QuotaUse>>;
    /// The project's limits alone, without counting what it holds: its own where it has them,
    /// else the operator's defaults. `StoreError::NotFound` for an unknown project.
    async fn quota_limits(&self, project_id: &str) -> Result<QuotaLimits>;
    /// Sets the project's own limit for `quota`; `None` returns it to the operator's default.
    /// A limit below what the project holds refuses new writes and removes nothing.
    /// `StoreError::NotFound` for an unknown project.
    async fn set_project_quota(
        &self,
        project_id: &str,
        quota: Quota,
        limit: Option<u64>,
        now: Timestamp,
    ) -> Result<()>;

    // === gauges ===

    /// How many tasks are queued, preparing and running across every project, and how many
    /// queued ones are due at `now` per priority: what the metrics endpoint reports at each
    /// scrape. Two reads, not one snapshot; a gauge needs no more.
    async fn gauges(&self, now: Timestamp) -> Result<StoreGauges>;
    /// The bytes of logs and payloads stored, read from totals the store keeps with its task
    /// counts: a few rows whatever the number of tasks.
    async fn data_sizes(&self) -> Result<DataSizes>;

    // === retention ===

    /// Removes the logs (`TaskData::Log`) or the payloads (`TaskData::Payload`) of tasks that
    /// finished (complete, error, timeout, cancelled) before `finished_before`: at most
    /// `max_rows` tasks, the first by end time and id after `after` (from the oldest when
    /// `None`), in one short transaction. A chunk of logs also ends once it holds 32 MiB, so
    /// that no other write waits long behind a chunk of big logs. Each task
    /// passed is marked with `now` (`log_removed_at`, `payload_removed_at`) and leaves the
    /// walk; its row stays, with its history and usage. Unfinished tasks are never touched.
    ///
    /// The caller calls again from `next` until it is `None`; a walk that starts over (`None`)
    /// finds whatever an earlier walk left. Reading a removed log afterwards is
    /// `StoreError::Removed`; a removed payload reads as empty.
    async fn prune_task_data(
        &self,
        data: TaskData,
        finished_before: Timestamp,
        after: Option<&PruneCursor>,
        max_rows: u32,
        now: Timestamp,
    ) -> Result<TaskDataPrune>;
}

/// Held by the leader; dropping it gives the leadership up.
#[async_trait]
pub trait Leadership: Send + Sync {
    /// Whether this process still leads (a lost database connection ends a leadership).
    async fn is_held(&self) -> bool;
}
