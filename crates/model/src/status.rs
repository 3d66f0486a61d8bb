//! The task lifecycle: one closed status enum and the one function allowed to move a task
//! from one status to another.
//!
//! ```text
//! queued ──Leased──▶ preparing ──Started──▶ running ──▶ complete | error | timeout | cancelled
//!    ▲                   │                     │
//!    └──── Requeued (infrastructure failure, lease expiry) ◀┘
//! ```
//!
//! Retries of failed tasks are new tasks, not transitions: a finished task never changes again.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a task is in its life. The string forms are IronWorker's, plus `preparing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Waiting to be leased, possibly not yet due (`delay`).
    Queued,
    /// Leased by a runner that is checking or pulling the image and creating the container.
    Preparing,
    /// The container has started.
    Running,
    /// The container exited 0.
    Complete,
    /// The container exited non-zero, ran out of memory, could not be set up because of the
    /// user's configuration, or the infrastructure failed too often.
    Error,
    /// The task ran past its timeout and was killed.
    Timeout,
    /// A user cancelled the task.
    Cancelled,
}

/// Something that happened to a task. The store and the runner express every change as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A runner took the task.
    Leased,
    /// Its container started.
    Started,
    /// Its container exited with this code.
    Exited { exit_code: i64 },
    /// The engine killed the container at its memory limit.
    OutOfMemory,
    /// The task reached its deadline and was killed.
    DeadlineReached,
    /// A user cancelled it.
    Cancelled,
    /// The task cannot run for a reason that is the user's to fix (a bad image reference, an
    /// invalid configuration); it never started.
    SetupFailed,
    /// The infrastructure failed or the lease expired: run it again, without spending the
    /// user's retries.
    Requeued,
    /// The infrastructure failed more often than the cap allows.
    InfrastructureGaveUp,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a task that is {from} cannot take the event {event:?}")]
pub struct TransitionError {
    pub from: TaskStatus,
    pub event: Event,
}

/// The one place where a task's status changes.
pub fn transition(from: TaskStatus, event: &Event) -> Result<TaskStatus, TransitionError> {
    use TaskStatus::*;
    let to = match (from, event) {
        (Queued, Event::Leased) => Preparing,
        (Preparing, Event::Started) => Running,
        (Running, Event::Exited { exit_code: 0 }) => Complete,
        (Running, Event::Exited { .. }) | (Running, Event::OutOfMemory) => Error,
        (Running, Event::DeadlineReached) => Timeout,
        (Preparing, Event::SetupFailed) => Error,
        (Queued | Preparing | Running, Event::Cancelled) => Cancelled,
        (Preparing | Running, Event::Requeued) => Queued,
        (Queued | Preparing | Running, Event::InfrastructureGaveUp) => Error,
        _ => {
            return Err(TransitionError {
                from,
                event: event.clone(),
            });
        }
    };
    Ok(to)
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Preparing,
        TaskStatus::Running,
        TaskStatus::Complete,
        TaskStatus::Error,
        TaskStatus::Timeout,
        TaskStatus::Cancelled,
    ];

    /// A finished task never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Complete | TaskStatus::Error | TaskStatus::Timeout | TaskStatus::Cancelled
        )
    }

    /// Leased by a runner: counts against the code's `max_concurrency`.
    pub fn is_active(self) -> bool {
        matches!(self, TaskStatus::Preparing | TaskStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Preparing => "preparing",
            TaskStatus::Running => "running",
            TaskStatus::Complete => "complete",
            TaskStatus::Error => "error",
            TaskStatus::Timeout => "timeout",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not a task status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for TaskStatus {
    type Err = UnknownStatus;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
            .ok_or_else(|| UnknownStatus(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path() {
        let preparing = transition(TaskStatus::Queued, &Event::Leased).unwrap();
        let running = transition(preparing, &Event::Started).unwrap();
        assert_eq!(
            transition(running, &Event::Exited { exit_code: 0 }),
            Ok(TaskStatus::Complete)
        );
        assert_eq!(
            transition(running, &Event::Exited { exit_code: 3 }),
            Ok(TaskStatus::Error)
        );
        assert_eq!(
            transition(running, &Event::OutOfMemory),
            Ok(TaskStatus::Error)
        );
        assert_eq!(
            transition(running, &Event::DeadlineReached),
            Ok(TaskStatus::Timeout)
        );
    }

    #[test]
    fn terminal_statuses_never_change() {
        let events = [
            Event::Leased,
            Event::Started,
            Event::Exited { exit_code: 0 },
            Event::OutOfMemory,
            Event::DeadlineReached,
            Event::Cancelled,
            Event::SetupFailed,
            Event::Requeued,
            Event::InfrastructureGaveUp,
        ];
        for status in TaskStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in &events {
                assert!(
                    transition(status, event).is_err(),
                    "{status} took {event:?}"
                );
            }
        }
    }

    #[test]
    fn a_queued_task_cannot_finish_without_running() {
        assert!(transition(TaskStatus::Queued, &Event::Exited { exit_code: 0 }).is_err());
        assert!(transition(TaskStatus::Queued, &Event::Requeued).is_err());
    }

    #[test]
    fn status_text_round_trips() {
        for status in TaskStatus::ALL {
            assert_eq!(status.as_str().parse::<TaskStatus>(), Ok(status));
        }
        assert!("killed".parse::<TaskStatus>().is_err());
    }
}
