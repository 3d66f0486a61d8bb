//! IronWorker API v2.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error and most acknowledgements: `{"msg": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    pub msg: String,
}

// === projects ===

/// `GET /2/projects/{project_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectInfo {
    pub id: String,
    pub name: String,
    pub created_at: String,
    /// Every quota by name (`queued_tasks`, `schedules`, `codes`, `revisions_per_code`,
    /// `package_bytes`, `log_streams_per_token`): its limit and what the project holds.
    #[serde(default)]
    pub quotas: BTreeMap<String, QuotaInfo>,
}

/// One quota of a project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuotaInfo {
    /// The project's own limit, or the operator's default.
    pub limit: u64,
    /// What the project holds now: for `revisions_per_code` the most revisions of any one
    /// code, for `log_streams_per_token` the streams the asking token holds open on the
    /// server that answered.
    pub used: u64,
    /// Whether `limit` is the project's own, set by an admin, rather than the default.
    pub own_limit: bool,
}

/// `PUT /2/projects/{project_id}/quotas` (admin tokens only): the project's own limits by
/// quota name; `null` returns a quota to the operator's default, a quota not named stays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct QuotasUpdate(pub BTreeMap<String, Option<u64>>);

// === codes ===

/// The `data` part of a code upload (`POST codes`, multipart). A field not listed here is
/// refused with 400 rather than ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeUpload {
    pub name: Option<String>,
    /// How a zip package's `file_name` is launched: `binary`, `sh`, `python`, `node`, `ruby`,
    /// `php`, `java` (`java -jar`).
    pub runtime: Option<String>,
    /// The stack (image) a zip package runs on: `python-3.11`, an alias such as `python`,
    /// or one of IronWorker's old names (`ruby-2.1`); absent, the runtime's default stack.
    pub stack: Option<String>,
    /// The entry point inside the zip package.
    pub file_name: Option<String>,
    /// A Docker image to run instead of a zip package.
    pub image: Option<String>,
    /// With `image`: run `sh -c command` instead of the image's entrypoint.
    pub command: Option<String>,
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Handed to each task as the file behind `CONFIG_FILE`. A JSON object is stored as its
    /// JSON text.
    #[schema(value_type = Option<Object>)]
    pub config: Option<serde_json::Value>,
    /// The most tasks of this code running at once; absent, 0 or -1 mean unlimited.
    pub max_concurrency: Option<i64>,
    pub retries: Option<i64>,
    /// Seconds between a failed task and its retry.
    pub retries_delay: Option<i64>,
    /// stevedore: `fixed` (default, IronWorker's) waits `retries_delay` before every retry;
    /// `exponential` doubles it with each retry, up to one day.
    pub retries_backoff: Option<String>,
    pub default_priority: Option<i64>,
    /// stevedore: seconds a task may run, counted from container start.
    pub timeout: Option<i64>,
    /// stevedore: the container's memory limit, MiB.
    pub memory: Option<i64>,
    /// stevedore: the container's CPU quota, in cores.
    pub cpus: Option<f64>,
    /// stevedore: the container's network, `bridge` (default) or `none`.
    pub network: Option<String>,
    /// Sent by IronWorker's Node client (`"text/plain"`); it describes nothing stevedore
    /// uses: accepted and not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// IronWorker's hosted-service address (its Go and Ruby CLIs' `--host`). stevedore hosts
    /// no services: anything but empty is a 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A code, as its latest revision describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CodeInfo {
    /// The code's id; in a revision list, the revision's own id (its `latest_history_id`),
    /// as IronWorker documents revisions.
    pub id: String,
    /// The code's id, in code and revision lists alike.
    pub code_id: String,
    pub project_id: String,
    pub name: String,
    pub rev: u32,
    /// `image`, or how a zip package is launched.
    pub runtime: Option<String>,
    /// The stack a zip package runs on, as resolved when it was uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    pub file_name: Option<String>,
    pub image: Option<String>,
    pub command: Option<String>,
    /// SHA-256 of the zip package.
    pub latest_checksum: Option<String>,
    pub package_size: Option<u64>,
    /// The latest revision's id (`code_id` + `/` + `rev`).
    pub latest_history_id: String,
    /// When the latest revision was pushed (RFC 3339). IronWorker's Python client parses it
    /// as a date, so it is a string.
    pub latest_change: String,
    pub env_vars: BTreeMap<String, String>,
    pub config: Option<String>,
    /// The most tasks of this code running at once as IronWorker reported it: `null` for no
    /// limit, and `-1` while the code's task queue is paused (its own limit is kept, in
    /// `concurrency_limit`, and applies again on resume).
    pub max_concurrency: Option<i64>,
    /// stevedore: the code's own limit, paused or not; `null` for no limit.
    pub concurrency_limit: Option<u32>,
    pub retries: u32,
    pub retries_delay: u32,
    /// `fixed` or `exponential`.
    pub retries_backoff: String,
    pub default_priority: u8,
    pub timeout: u32,
    pub memory: u32,
    pub cpus: Option<f64>,
    pub network: String,
    /// Whether its task queue is paused.
    pub paused: bool,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CodeList {
    pub codes: Vec<CodeInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RevisionList {
    pub revisions: Vec<CodeInfo>,
}

/// The answer to a code upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CodeUploaded {
    pub id: String,
    pub rev: u32,
    pub msg: String,
}

/// Task counts of a code by status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CodeStats {
    pub queued: u64,
    pub preparing: u64,
    pub running: u64,
    pub complete: u64,
    pub error: u64,
    pub cancelled: u64,
    pub killed: u64,
    pub timeout: u64,
}

// === tasks ===

/// One task in `POST tasks`. Every optional field may be absent or `null`. A field not listed
/// here is refused with 400 rather than ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskCreate {
    pub code_name: Option<String>,
    /// The payload handed to the task. A string is passed as is; any other JSON value is
    /// passed as its JSON text.
    #[schema(value_type = Option<String>)]
    pub payload: Option<serde_json::Value>,
    pub priority: Option<i64>,
    pub timeout: Option<i64>,
    pub delay: Option<i64>,
    pub label: Option<String>,
    pub cluster: Option<String>,
    /// IronWorker's Ruby CLI sends its own `--wait` along (it then waits by polling): accepted
    /// and not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    /// IronWorker's legacy task name, which its Python client sends as the code's name. Only
    /// a name: accepted and not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// IronWorker's Python client sends `sync` (true from its `run`, which then waits for the
    /// task by polling). A stevedore task runs the same either way: accepted and not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TasksCreate {
    pub tasks: Vec<TaskCreate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IdOnly {
    pub id: String,
}

/// The answer to `POST tasks` and `POST tasks/{id}/retry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TasksQueued {
    pub msg: String,
    pub tasks: Vec<IdOnly>,
}

/// The answer to a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookQueued {
    pub id: String,
    pub msg: String,
}

/// A task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskInfo {
    pub id: String,
    pub project_id: String,
    pub code_id: String,
    /// The pinned revision's id (`code_id` + `/` + `code_rev`).
    pub code_history_id: String,
    pub code_name: String,
    /// The pinned revision's number, as a string: IronWorker's API reference and its Go
    /// client type it so (`"1"`).
    pub code_rev: String,
    pub status: String,
    pub priority: u8,
    pub payload: String,
    pub label: Option<String>,
    pub cluster: String,
    pub timeout: u32,
    pub delay: u32,
    pub created_at: String,
    pub updated_at: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    /// Milliseconds between start and end.
    pub duration: Option<i64>,
    /// IronWorker's count of runs: 1 once the task has started, 0 before. A stevedore task
    /// runs once; a retry is a new task, and the infrastructure's re-runs are
    /// `infra_attempts`.
    pub run_times: u32,
    pub percent: Option<u8>,
    pub msg: Option<String>,
    pub retry_count: u32,
    pub original_task_id: Option<String>,
    pub schedule_id: Option<String>,
    pub exit_code: Option<i64>,
    pub log_size: u64,
    /// Times the infrastructure failed this task and stevedore ran it again.
    pub infra_attempts: u32,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_time_ms: Option<u64>,
    /// When retention removed this finished task's log (its `log_size` bytes): `log` answers
    /// 410 from then on. Absent while the log is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_removed_at: Option<String>,
    /// When retention removed this finished task's payload: `payload` is empty from then on
    /// and the task can no longer be retried. Absent while the payload is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_removed_at: Option<String>,
    /// stevedore: every attempt at running the task, first first (`GET tasks/{id}` only; a
    /// list leaves it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<TaskAttemptInfo>>,
}

/// One attempt at running a task: one lease of it, from the lease to its end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskAttemptInfo {
    /// 1 for the first.
    pub attempt: u32,
    pub runner_id: Option<String>,
    pub leased_at: String,
    /// When its container started, if it did.
    pub started_at: Option<String>,
    /// When it ended; absent while it goes on.
    pub ended_at: Option<String>,
    /// `requeued` (given back to the queue: a runner lost or restarted, an engine restart, an
    /// expired lease), or the status the task ended with.
    pub ending: Option<String>,
    pub exit_code: Option<i64>,
    /// Why it ended: a requeue's reason, a final status's message.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskInfo>,
}

/// `POST tasks/{id}/progress`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub percent: Option<i64>,
    pub msg: Option<String>,
}

/// `POST tasks/{id}/retry`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    pub delay: Option<i64>,
    /// IronWorker's Ruby CLI sends its own `--wait` along: accepted and not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
}

// === schedules ===

/// One schedule in `POST schedules`, and the body of `PUT schedules/{id}` (there, the fields
/// given replace the schedule's). A field not listed here is refused with 400 rather than
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleCreate {
    pub code_name: Option<String>,
    #[schema(value_type = Option<String>)]
    pub payload: Option<serde_json::Value>,
    /// Seconds between runs.
    pub run_every: Option<i64>,
    /// stevedore: a five-field cron expression, instead of `run_every`.
    pub cron: Option<String>,
    /// stevedore: the IANA time zone the cron expression is read in (default UTC).
    pub timezone: Option<String>,
    /// RFC 3339 time or seconds since the epoch.
    #[schema(value_type = Option<String>)]
    pub start_at: Option<serde_json::Value>,
    #[schema(value_type = Option<String>)]
    pub end_at: Option<serde_json::Value>,
    /// At most this many runs; absent or 0 (what IronWorker's `iron` CLI sends when none is
    /// given) for no limit.
    pub run_times: Option<i64>,
    /// The priority of its tasks; absent or negative for the code's default.
    pub priority: Option<i64>,
    /// Its tasks' timeout, seconds; absent or 0 for the code's.
    pub timeout: Option<i64>,
    pub cluster: Option<String>,
    pub label: Option<String>,
    /// Seconds each of its tasks waits after the schedule fires before it may run.
    pub delay: Option<i64>,
    /// The most of its tasks queued or running at once: a fire that finds that many still
    /// unfinished queues no task and waits for the next fire time. Absent, 0 or -1: no limit.
    pub max_concurrency: Option<i64>,
    /// IronWorker's legacy schedule name (its clients send the code's name or ""). Only a
    /// name: accepted and not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Sent by IronWorker's Python client; a schedule's tasks run the same either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SchedulesCreate {
    pub schedules: Vec<ScheduleCreate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SchedulesCreated {
    pub msg: String,
    pub schedules: Vec<IdOnly>,
}

/// A schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleInfo {
    pub id: String,
    pub project_id: String,
    pub code_id: String,
    pub code_name: String,
    pub status: String,
    pub payload: String,
    pub run_every: Option<u32>,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub start_at: Option<String>,
    pub end_at: Option<String>,
    pub next_start: Option<String>,
    pub last_run_time: Option<String>,
    pub run_times: Option<u32>,
    pub run_count: u32,
    pub priority: u8,
    pub timeout: u32,
    pub cluster: String,
    pub label: Option<String>,
    /// Seconds each of its tasks waits before it may run.
    pub delay: u32,
    /// The most of its tasks queued or running at once; `null` for no limit.
    pub max_concurrency: Option<u32>,
    pub msg: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleInfo>,
}

// === stacks ===

// `GET /2/stacks` answers a JSON array of the stack names, as IronWorker documents it.

/// A stack with its aliases, the runtimes it launches and its image
/// (`GET /2/stacks?details=true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StackInfo {
    pub name: String,
    pub aliases: Vec<String>,
    pub runtimes: Vec<String>,
    pub image: String,
}

// === clusters ===

/// `POST /2/clusters` and `PUT /2/clusters/{id}`. IronWorker's clients name the cluster
/// `cluster` or `name`; a field not listed here is refused with 400.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterCreate {
    pub name: Option<String>,
    /// IronWorker's form of `name`.
    pub cluster: Option<String>,
    /// Memory per runner, MiB (informational: runners enforce their own limits).
    pub memory: Option<i64>,
    /// Disk per runner, MiB (informational). IronWorker's Go client names it `disk_space`.
    #[serde(alias = "disk_space")]
    pub disk: Option<i64>,
    /// How many runners the operator intends to run for it (informational).
    pub runners: Option<i64>,
    /// IronWorker's CPU share per task (sent by its Go client). stevedore sets each task's
    /// CPU from its code's `cpus`: a value here is a 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_share: Option<i64>,
}

/// A cluster: a named pool of runners. `default` is built in and shared by every project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterInfo {
    pub id: String,
    pub name: String,
    /// The owning project; `null` for shared clusters.
    pub project_id: Option<String>,
    pub shared: bool,
    pub memory: Option<u32>,
    pub disk: Option<u32>,
    /// `disk` again, under the name IronWorker's Go client (iron_go3) reads.
    pub disk_space: Option<u32>,
    pub runners: Option<u32>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterList {
    pub clusters: Vec<ClusterInfo>,
}

/// `GET /2/clusters/{id}`: `{"cluster": {...}}`, as IronWorker answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterGet {
    pub cluster: ClusterInfo,
}

/// The answer to a create or an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSaved {
    pub id: String,
    pub msg: String,
    pub cluster: ClusterInfo,
}

/// A runner token for one cluster (`POST /2/clusters/{id}/runner_tokens`): the secret is shown
/// only in this answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterRunnerToken {
    pub msg: String,
    /// The secret, for `stevedore runner --token`.
    pub token: String,
    /// The one cluster the token serves.
    pub cluster: String,
    /// The project whose tasks alone the token's runner gets; absent for a shared cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
}

/// A runner seen serving a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterRunner {
    pub id: String,
    pub clusters: Vec<String>,
    pub capacity: u32,
    /// Tasks it holds leases on now.
    pub in_use: u64,
    pub last_seen: String,
}

/// `GET /2/clusters/{id}/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStats {
    pub id: String,
    pub name: String,
    /// Runners online: seen leasing recently, or holding a live lease.
    pub runners_online: u64,
    /// Their capacity together.
    pub capacity: u64,
    /// Tasks they run now together.
    pub in_use: u64,
    /// Tasks of this cluster waiting to run (of the caller's project for `default`).
    pub queued: u64,
    /// Tasks of this cluster preparing or running (of the caller's project for `default`).
    pub running: u64,
    pub runners: Vec<ClusterRunner>,
}

// === usage ===

/// `GET usage`: a project's finished tasks over a window, in buckets, by code and by stack,
/// with queue waits and the status mix. Built for charts: `buckets` lists every bucket of the
/// window in order, empty ones included, so a series has one point per bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    /// The window, RFC 3339: tasks that ended at or after `from` and before `to`.
    pub from: String,
    pub to: String,
    /// The width of a bucket. Buckets are aligned to multiples of it since the Unix epoch, so
    /// the first and last bucket may reach outside the window; only tasks inside it count.
    pub bucket_secs: u32,
    pub buckets: Vec<UsageBucket>,
    /// Everything in the window.
    pub totals: UsageCounts,
    /// Totals per code, by name (then id: a deleted code's name may have been reused).
    pub codes: Vec<UsageByCode>,
    /// Totals per stack, by name.
    pub stacks: Vec<UsageByStack>,
    /// Queue waits of the tasks whose container started in the window.
    pub queue_wait: QueueWaitSummary,
    /// The project's tasks last changed in the window, by status.
    pub status_mix: CodeStats,
}

/// Finished tasks, counted by how they ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageCounts {
    /// Tasks that finished: the throughput.
    pub tasks: u64,
    pub complete: u64,
    /// Tasks that ended `error` or `timeout`.
    pub failures: u64,
    pub cancelled: u64,
    /// Time spent in containers: the sum of each started task's end minus start.
    pub compute_seconds: f64,
}

/// One bucket of the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageBucket {
    /// The bucket's start, RFC 3339.
    pub start: String,
    /// Every task that finished in the bucket.
    pub totals: UsageCounts,
    /// Only the codes that finished tasks in the bucket.
    pub codes: Vec<UsageByCode>,
    /// Only the stacks that finished tasks in the bucket.
    pub stacks: Vec<UsageByStack>,
    /// Waits of the tasks whose container started in the bucket.
    pub queue_wait: QueueWaitStats,
}

/// A code's share of the usage, across its revisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageByCode {
    pub code_id: String,
    pub code_name: String,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

/// A stack's share of the usage: the runtime of a zip code's revision, or `image` for image
/// codes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageByStack {
    pub stack: String,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

/// Queue-wait percentiles (nearest rank) of a set of samples; `null` without samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueWaitStats {
    pub samples: u64,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
}

/// Queue waits over the whole window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueWaitSummary {
    #[serde(flatten)]
    pub stats: QueueWaitStats,
    /// The samples are the latest starts, at most a fixed number of them. When that number
    /// was reached, this is the earliest sample's start: buckets before it have no samples.
    pub sampled_since: Option<String>,
}

// === registry credentials ===

/// `POST /2/projects/{id}/credentials`: a project's credentials for a private registry, as
/// `iron docker login` sends them: `auth` holds the base64 of a JSON object with `username`,
/// `password`, `serveraddress` (empty or absent for Docker Hub) and `email` (ignored, as
/// Docker ignores it). The same fields may also be sent directly instead of `auth`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CredentialsUpload {
    pub auth: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub serveraddress: Option<String>,
    pub email: Option<String>,
}

/// The answer to a stored credential. Never carries the password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CredentialStored {
    /// What `iron docker login` prints after "Added docker repo credentials: ".
    pub msg: String,
    /// The registry, normalized (`docker.io` for Docker Hub).
    pub registry: String,
    pub username: String,
}

/// One stored credential, without its password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Credential {
    pub registry: String,
    pub username: String,
    pub created_at: String,
    pub updated_at: String,
}

/// `GET /2/projects/{id}/credentials`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CredentialList {
    pub credentials: Vec<Credential>,
}
