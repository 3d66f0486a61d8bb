//! The lease vocabulary: what a runner asks for, what it is handed, and what it reports. Every
//! kind of runner speaks it (the embedded one, a remote one over `/runner/v1` in these types'
//! serde form, a local run), and the store decides it; defined here once so no copy can drift.

use serde::{Deserialize, Serialize};

use crate::validation::{ValidationError, check_name};
use crate::{CodeRevision, RegistryCredential, Task, Timestamp};

/// The most tasks one lease hands out.
pub const MAX_TASKS_PER_LEASE: u32 = 256;
/// The longest lease a runner may ask for, in seconds.
pub const MAX_LEASE_SECS: u32 = 3600;

/// A runner's request for work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub runner_id: String,
    /// Clusters this runner serves; a task is only handed to a runner of its cluster.
    pub clusters: Vec<String>,
    /// The most tasks to hand out.
    pub max_tasks: u32,
    /// How long the lease lasts without a heartbeat.
    pub lease_secs: u32,
    /// Whose clusters `clusters` names: `None`, the operator's (shared) clusters, leasing any
    /// project's tasks there but none of a project that owns a cluster of the same name;
    /// `Some(project)`, that project's own clusters, leasing only its tasks. Set by the server
    /// from the runner's token, never by the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl LeaseRequest {
    /// Checks what makes no sense whatever the store holds: the runner's id and cluster
    /// names, at least one cluster, at most [`MAX_TASKS_PER_LEASE`] tasks, and a lease of
    /// 1 to [`MAX_LEASE_SECS`] seconds.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("runner_id", &self.runner_id)?;
        if self.clusters.is_empty() {
            return Err(ValidationError::new(
                "clusters",
                "must name at least one cluster",
            ));
        }
        for cluster in &self.clusters {
            check_name("clusters", cluster)?;
        }
        if self.max_tasks > MAX_TASKS_PER_LEASE {
            return Err(ValidationError::new(
                "max_tasks",
                format!(
                    "must be at most {MAX_TASKS_PER_LEASE}, got {}",
                    self.max_tasks
                ),
            ));
        }
        check_lease_secs(self.lease_secs)
    }
}

/// Checks a lease's length (on a lease and on every heartbeat): 1 to [`MAX_LEASE_SECS`].
pub fn check_lease_secs(lease_secs: u32) -> Result<(), ValidationError> {
    if !(1..=MAX_LEASE_SECS).contains(&lease_secs) {
        return Err(ValidationError::new(
            "lease_secs",
            format!("must be between 1 and {MAX_LEASE_SECS}, got {lease_secs}"),
        ));
    }
    Ok(())
}

/// A task handed to a runner with the lease that fences every later write about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeasedTask {
    pub task: Task,
    /// The code revision the task pinned.
    pub code: CodeRevision,
    pub lease: Lease,
    /// The project's credential for the registry of the code's image, when it stored one:
    /// filled in after the lease (by the server's lease desk), never by the lease itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_credential: Option<RegistryCredential>,
}

/// The right to act on one task. `token` only grows across the whole store, so a rescued
/// task's new lease always outranks the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub token: i64,
    pub expires_at: Timestamp,
}

/// What a heartbeat tells the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub expires_at: Timestamp,
    /// A user cancelled the task: kill it and complete it as cancelled.
    pub cancel_requested: bool,
}

/// The container's own account of a run, recorded on completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_time_ms: Option<u64>,
}

/// Wakes a lease loop when work may have been queued by any process sharing the database: a
/// task queued, requeued or retried, a schedule fired, a code resumed. A hint, not a promise:
/// a signal may come without new work, and the loop must still poll now and then, because a
/// signal can be lost while the store reconnects. Cheap to clone; each clone keeps its own
/// place, so a signal sent while its holder was busy is seen by its next `notified`.
#[derive(Debug, Clone)]
pub struct WorkSignal(tokio::sync::watch::Receiver<u64>);

impl WorkSignal {
    /// A signal fed by `receiver`: each change of its value is one signal.
    pub fn new(receiver: tokio::sync::watch::Receiver<u64>) -> Self {
        WorkSignal(receiver)
    }

    /// Returns at the first signal after the last one this handle saw. Never returns once the
    /// store that sends them is gone.
    pub async fn notified(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
