//! The runner protocol, `/runner/v1/...`: how a remote runner leases tasks and reports on them.
//!
//! Only runner (and admin) tokens may call it. Every call about a leased task carries the
//! lease token the lease handed out; the server answers a stale one with 409 and `{"msg": ...}`,
//! after which the runner drops the task. The server's clock decides every time: the runner
//! sends durations (`lease_secs`, `delay_ms`), never time stamps of its own clock, except the
//! container's own start and end in a [`RunReport`] as the engine recorded them.
//!
//! Tasks and code revisions travel as the domain types of `stevedore-model` in their serde
//! form: both ends are stevedore, and one definition cannot drift from a copy of it.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `POST /runner/v1/lease` | [`LeaseRequest`] | [`LeaseResponse`] (held up to `wait_ms` while there is no work) |
//! | `POST /runner/v1/tasks/{id}/heartbeat` | [`Heartbeat`] | [`HeartbeatReply`] |
//! | `POST /runner/v1/tasks/{id}/running` | [`Fenced`] | `{"msg"}` |
//! | `POST /runner/v1/tasks/{id}/log` | the raw bytes; token in [`LEASE_TOKEN_HEADER`], cap in [`LOG_CAP_HEADER`] | [`LogAppended`] |
//! | `POST /runner/v1/tasks/{id}/progress` | [`ProgressReport`] | `{"msg"}` |
//! | `POST /runner/v1/tasks/{id}/complete` | [`Complete`] | `{"msg"}` |
//! | `POST /runner/v1/tasks/{id}/requeue` | [`Requeue`] | `{"msg"}` |
//! | `GET /runner/v1/tasks/{id}/package` | token in [`LEASE_TOKEN_HEADER`] | the zip of the revision the task pinned, `application/zip` |
//! | `POST /runner/v1/runners/{id}/release` | [`Release`] | [`Released`] |
//! | `POST /runner/v1/runners/gone` | [`GoneQuery`] | [`Gone`] |
//!
//! Log bytes go as the raw request body rather than base64 in JSON: logs are the largest and
//! most frequent thing a runner sends, raw bytes cost nothing to encode and a third less on
//! the wire, and a task's output reaches the store byte for byte whatever it contains.

use serde::{Deserialize, Serialize};
use stevedore_model::{CodeRevision, RegistryCredential, Task, TaskOutcome, Timestamp};

/// The answer to a heartbeat and the container's own account of a run travel as the domain
/// types themselves, in their serde form.
pub use stevedore_model::lease::{HeartbeatReply, RunReport};

/// The header that carries the lease token of a log append and of a package download.
pub const LEASE_TOKEN_HEADER: &str = "stevedore-lease-token";
/// The header that carries the log cap of a log append, bytes.
pub const LOG_CAP_HEADER: &str = "stevedore-log-cap";

/// `POST /runner/v1/lease`: a runner asks for work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// The runner's stable name; its containers carry it.
    pub runner_id: String,
    /// The clusters whose tasks this runner takes.
    pub clusters: Vec<String>,
    /// The most tasks to hand out now (the runner's free slots).
    pub max_tasks: u32,
    /// How long each lease lasts without a heartbeat.
    pub lease_secs: u32,
    /// How long the server may hold the request while there is no work, milliseconds. 0
    /// answers at once; the server caps it.
    #[serde(default)]
    pub wait_ms: u64,
    /// The runner's whole capacity, for cluster statistics.
    #[serde(default)]
    pub capacity: Option<u32>,
}

/// The answer to a lease: possibly no tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub tasks: Vec<LeasedTask>,
}

/// One leased task with everything needed to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeasedTask {
    pub task: Task,
    /// The code revision the task pinned.
    pub code: CodeRevision,
    /// Fences every later call about the task.
    pub lease_token: i64,
    /// When the lease runs out without a heartbeat (the server's clock).
    pub expires_at: Timestamp,
    /// The task's project's credential for the registry of the code's image, in clear, when
    /// the project stored one (`POST /2/projects/{id}/credentials`). Absent otherwise, and for
    /// stack images, which the runner pulls with the operator's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_credential: Option<RegistryCredential>,
}

/// A call that only needs the lease token (`running`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fenced {
    pub token: i64,
}

/// `POST .../heartbeat`: extend the lease by `lease_secs` from now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub token: i64,
    pub lease_secs: u32,
}

/// The answer to a log append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogAppended {
    /// Bytes stored so far, truncation marker included.
    pub size: u64,
}

/// `POST .../progress`: the task's progress, reported on its behalf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub token: i64,
    pub percent: Option<u8>,
    pub msg: Option<String>,
}

/// `POST .../complete`: the terminal result, recorded exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Complete {
    pub token: i64,
    pub outcome: TaskOutcome,
    #[serde(default)]
    pub report: RunReport,
}

/// `POST /runner/v1/runners/{id}/release`: a runner starting again gives back every task it
/// held in an earlier life (a project's runner token: that project's only), without waiting
/// for their leases to expire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// After this many infrastructure failures a task ends `error` instead.
    pub max_infra_attempts: u32,
}

/// What a release gave back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Released {
    pub released: u32,
}

/// `POST /runner/v1/runners/gone`: which of these runners (the runner labels a runner found
/// on its engine's containers) the server knows and counts as gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoneQuery {
    pub runner_ids: Vec<String>,
}

/// The runners of a [`GoneQuery`] that are gone: seen once, not for the online window since,
/// and holding no live lease. Their containers outlived their leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gone {
    pub gone: Vec<String>,
}

/// `POST .../requeue`: give the task back after an infrastructure failure or at shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requeue {
    pub token: i64,
    pub reason: String,
    /// How long the task waits before it may be leased again, from the server's now.
    pub delay_ms: u64,
    /// After this many infrastructure failures the task ends `error` instead.
    pub max_infra_attempts: u32,
}
