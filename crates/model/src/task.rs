//! Tasks: one run of one code revision with one payload.

use serde::{Deserialize, Serialize};

use crate::lease::RunReport;
use crate::limits::*;
use crate::status::{TaskStatus, TransitionError, transition};
use crate::validation::{ValidationError, check_name, check_range};
use crate::{Timestamp, new_id};

/// One attempt at running a task: one lease of it, from the lease to its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAttempt {
    /// 1 for the first.
    pub attempt: u32,
    pub runner_id: Option<String>,
    pub leased_at: Timestamp,
    /// When its container started, if it did.
    pub started_at: Option<Timestamp>,
    /// When the attempt ended; `None` while it goes on.
    pub ended_at: Option<Timestamp>,
    /// `requeued` (the task was given back to the queue: a runner lost, an engine restart, an
    /// expired lease), or the status the task ended with.
    pub ending: Option<String>,
    pub exit_code: Option<i64>,
    /// Why it ended: a requeue's reason, a final status's message.
    pub reason: Option<String>,
}

/// A task as stored. Timestamps are UTC; `start_time` and `end_time` come from the container's
/// own run, not from the runner's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub project_id: String,
    pub code_id: String,
    pub code_name: String,
    /// The code revision this task runs; pinned when the task was queued.
    pub code_rev: u32,
    pub status: TaskStatus,
    pub priority: u8,
    /// The payload string exactly as given; empty once retention removed it
    /// (`payload_removed_at`).
    pub payload: String,
    pub label: Option<String>,
    pub cluster: String,
    pub timeout_secs: u32,
    pub delay_secs: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When the task becomes eligible for leasing: `created_at + delay`, later after an
    /// infrastructure requeue with backoff.
    pub due_at: Timestamp,
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    /// Progress reported by the task itself, 0..=100.
    pub percent: Option<u8>,
    /// A human-readable message: the progress message while running, the reason after an
    /// error (for example "out of memory (limit 256 MiB)").
    pub msg: Option<String>,
    /// How many user retries preceded this task (0 for an original task).
    pub retry_count: u32,
    /// The first task of a retry chain, for retries.
    pub original_task_id: Option<String>,
    /// The schedule that made this task, if one did.
    pub schedule_id: Option<String>,
    pub exit_code: Option<i64>,
    /// Bytes of log stored so far. Once retention removed the log (`log_removed_at`) this is
    /// the size it had, and none of it is stored any more.
    pub log_size: u64,
    /// Times the infrastructure failed this task and it was queued again. Not user retries.
    pub infra_attempts: u32,
    /// A user asked to cancel the task while a runner held it; the runner kills it.
    pub cancel_requested: bool,
    /// Peak memory use of the container, bytes, when the engine reported it.
    pub peak_memory_bytes: Option<u64>,
    /// CPU time the container used, milliseconds, when the engine reported it.
    pub cpu_time_ms: Option<u64>,
    /// The runner holding the task's lease, while it is leased.
    pub runner_id: Option<String>,
    /// When retention removed the log of this finished task (`Store::prune_task_data`): its
    /// bytes are gone, and reading it says so instead of answering an empty log. Set on a
    /// task that printed nothing too, whose log still reads as empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_removed_at: Option<Timestamp>,
    /// When retention removed the payload of this finished task: `payload` is empty from then
    /// on, and the task can no longer be retried with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_removed_at: Option<Timestamp>,
}

/// A validated request to queue a task. Defaults are already applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    pub code_name: String,
    pub payload: String,
    pub priority: u8,
    pub timeout_secs: u32,
    pub delay_secs: u32,
    pub label: Option<String>,
    pub cluster: String,
    pub retry_count: u32,
    pub original_task_id: Option<String>,
    pub schedule_id: Option<String>,
    /// Pin this revision of the code instead of its latest (retries run what failed).
    pub code_rev: Option<u32>,
}

/// How a task's run ended, as the runner reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TaskOutcome {
    Exited {
        exit_code: i64,
    },
    OutOfMemory {
        limit_mib: u32,
    },
    TimedOut {
        timeout_secs: u32,
    },
    Cancelled,
    /// The task could not be set up for a reason that is the user's to fix.
    SetupFailed {
        message: String,
    },
}

/// The default cluster every runner serves unless told otherwise.
pub const DEFAULT_CLUSTER: &str = "default";

impl Task {
    /// A new queued task of a resolved code revision, due at `now + delay`: what the store
    /// writes on enqueue, and what a local run starts from.
    pub fn queued(
        project_id: &str,
        code_id: &str,
        code_rev: u32,
        new_task: &NewTask,
        now: Timestamp,
    ) -> Task {
        Task {
            id: new_id(),
            project_id: project_id.to_owned(),
            code_id: code_id.to_owned(),
            code_name: new_task.code_name.clone(),
            code_rev,
            status: TaskStatus::Queued,
            priority: new_task.priority,
            payload: new_task.payload.clone(),
            label: new_task.label.clone(),
            cluster: new_task.cluster.clone(),
            timeout_secs: new_task.timeout_secs,
            delay_secs: new_task.delay_secs,
            created_at: now,
            updated_at: now,
            due_at: now + chrono::Duration::seconds(i64::from(new_task.delay_secs)),
            start_time: None,
            end_time: None,
            percent: None,
            msg: None,
            retry_count: new_task.retry_count,
            original_task_id: new_task.original_task_id.clone(),
            schedule_id: new_task.schedule_id.clone(),
            exit_code: None,
            log_size: 0,
            infra_attempts: 0,
            cancel_requested: false,
            peak_memory_bytes: None,
            cpu_time_ms: None,
            runner_id: None,
            log_removed_at: None,
            payload_removed_at: None,
        }
    }

    /// Records the end of a run with `outcome` (through [`transition`]) and the container's
    /// own `report`; the outcome's message replaces `msg` when it has one. The runner no
    /// longer holds the task. The caller fences the write with the lease first.
    pub fn finish(
        &mut self,
        outcome: &TaskOutcome,
        report: &RunReport,
        now: Timestamp,
    ) -> Result<(), TransitionError> {
        self.status = transition(self.status, &outcome.event())?;
        self.updated_at = now;
        self.exit_code = outcome.exit_code();
        if let Some(message) = outcome.message() {
            self.msg = Some(message);
        }
        self.start_time = report.start_time.or(self.start_time);
        self.end_time = Some(report.end_time.unwrap_or(now));
        self.peak_memory_bytes = report.peak_memory_bytes.or(self.peak_memory_bytes);
        self.cpu_time_ms = report.cpu_time_ms.or(self.cpu_time_ms);
        self.runner_id = None;
        Ok(())
    }
}

impl NewTask {
    /// Checks what the wire layer could not: ranges, names and the payload size.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), ValidationError> {
        check_name("code_name", &self.code_name)?;
        check_range(
            "priority",
            i64::from(self.priority),
            0,
            i64::from(MAX_PRIORITY),
        )?;
        check_range(
            "timeout",
            i64::from(self.timeout_secs),
            1,
            i64::from(MAX_TIMEOUT_SECS),
        )?;
        check_range(
            "delay",
            i64::from(self.delay_secs),
            0,
            i64::from(MAX_DELAY_SECS),
        )?;
        check_name("cluster", &self.cluster)?;
        if let Some(label) = &self.label {
            check_name("label", label)?;
        }
        if self.payload.len() > max_payload_bytes {
            return Err(ValidationError::new(
                "payload",
                format!(
                    "is {} bytes, more than the limit of {max_payload_bytes} bytes",
                    self.payload.len()
                ),
            ));
        }
        Ok(())
    }

    /// The retry of a task (a finished one, or one a user retries while it is queued or
    /// running): the same code revision, payload, priority, timeout,
    /// label, cluster and schedule, one more retry, and the first task of the chain as its
    /// original. Due `delay_secs` after it is queued.
    pub fn retry_of(failed: &Task, delay_secs: u32) -> NewTask {
        NewTask {
            code_name: failed.code_name.clone(),
            payload: failed.payload.clone(),
            priority: failed.priority,
            timeout_secs: failed.timeout_secs,
            delay_secs,
            label: failed.label.clone(),
            cluster: failed.cluster.clone(),
            retry_count: failed.retry_count.saturating_add(1),
            original_task_id: Some(
                failed
                    .original_task_id
                    .clone()
                    .unwrap_or_else(|| failed.id.clone()),
            ),
            schedule_id: failed.schedule_id.clone(),
            code_rev: Some(failed.code_rev),
        }
    }
}

impl TaskOutcome {
    /// The task failed for a reason that is the user's: it exited non-zero, ran out of
    /// memory, timed out, or could not be set up because of its code (a bad image, a missing
    /// package file). These spend user retries. `SetupFailed` counts because IronWorker
    /// retries every `error`, and a setup failure may be transient on the user's side (an
    /// image pushed a moment too late); infrastructure failures never reach a `TaskOutcome`.
    pub fn is_user_failure(&self) -> bool {
        match self {
            TaskOutcome::Exited { exit_code } => *exit_code != 0,
            TaskOutcome::OutOfMemory { .. }
            | TaskOutcome::TimedOut { .. }
            | TaskOutcome::SetupFailed { .. } => true,
            TaskOutcome::Cancelled => false,
        }
    }

    /// The lifecycle event this outcome is.
    pub fn event(&self) -> crate::Event {
        match self {
            TaskOutcome::Exited { exit_code } => crate::Event::Exited {
                exit_code: *exit_code,
            },
            TaskOutcome::OutOfMemory { .. } => crate::Event::OutOfMemory,
            TaskOutcome::TimedOut { .. } => crate::Event::DeadlineReached,
            TaskOutcome::Cancelled => crate::Event::Cancelled,
            TaskOutcome::SetupFailed { .. } => crate::Event::SetupFailed,
        }
    }

    /// The message stored on the task, when the outcome deserves one.
    pub fn message(&self) -> Option<String> {
        match self {
            TaskOutcome::Exited { exit_code: 0 } => None,
            TaskOutcome::Exited { exit_code } => Some(format!("exited with code {exit_code}")),
            TaskOutcome::OutOfMemory { limit_mib } => {
                Some(format!("out of memory (limit {limit_mib} MiB)"))
            }
            TaskOutcome::TimedOut { timeout_secs } => {
                Some(format!("timed out after {timeout_secs} s"))
            }
            TaskOutcome::Cancelled => Some("cancelled".to_owned()),
            TaskOutcome::SetupFailed { message } => Some(message.clone()),
        }
    }

    pub fn exit_code(&self) -> Option<i64> {
        match self {
            TaskOutcome::Exited { exit_code } => Some(*exit_code),
            TaskOutcome::OutOfMemory { .. } => Some(137),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_task() -> NewTask {
        NewTask {
            code_name: "hello".into(),
            payload: "{}".into(),
            priority: 0,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            delay_secs: 0,
            label: None,
            cluster: DEFAULT_CLUSTER.into(),
            retry_count: 0,
            original_task_id: None,
            schedule_id: None,
            code_rev: None,
        }
    }

    #[test]
    fn bounds() {
        assert!(new_task().validate(10).is_ok());
        let mut task = new_task();
        task.payload = "x".repeat(11);
        assert_eq!(task.validate(10).unwrap_err().field, "payload");
        let mut task = new_task();
        task.delay_secs = MAX_DELAY_SECS + 1;
        assert_eq!(task.validate(10).unwrap_err().field, "delay");
        let mut task = new_task();
        task.timeout_secs = 0;
        assert_eq!(task.validate(10).unwrap_err().field, "timeout");
    }

    #[test]
    fn outcome_messages() {
        assert_eq!(
            TaskOutcome::OutOfMemory { limit_mib: 256 }
                .message()
                .as_deref(),
            Some("out of memory (limit 256 MiB)")
        );
        assert_eq!(TaskOutcome::Exited { exit_code: 0 }.message(), None);
    }
}
