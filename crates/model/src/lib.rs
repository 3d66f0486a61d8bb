//! stevedore's domain: what a project, a code, a task and a schedule are, the closed task
//! status enum with the one transition function allowed to change it, and the validation and
//! time math that turn wire input into trusted values.
//!
//! This crate does no IO. Time comes in as an argument (`now`), never from the wall clock, so
//! everything here is testable with plain values. The `store`, `server` and `runner` crates
//! depend on it; it depends on none of them.

#![forbid(unsafe_code)]

pub mod clock;
pub mod code;
pub mod ids;
pub mod lease;
pub mod limits;
pub mod log;
pub mod quota;
pub mod registry;
pub mod retry;
pub mod schedule;
pub mod stack;
pub mod status;
pub mod task;
pub mod validation;

pub use clock::{Clock, ManualClock, SystemClock};
pub use code::{CodeKind, CodeRevision, CodeSpec, Limits};
pub use ids::new_id;
pub use lease::{HeartbeatReply, Lease, LeaseRequest, LeasedTask, RunReport, WorkSignal};
pub use quota::{Quota, QuotaExceeded, QuotaLimits};
pub use registry::{CodeImages, RegistryCredential};
pub use retry::{RetriesBackoff, automatic_retry, retry_delay_secs};
pub use schedule::{Schedule, ScheduleSpec, ScheduleStatus, ScheduleTiming};
pub use stack::{Runtime, Stack, StackImages, StackTable};
pub use status::{Event, TaskStatus, TransitionError, transition};
pub use task::{NewTask, Task, TaskAttempt, TaskOutcome};
pub use validation::ValidationError;

/// Timestamps are UTC everywhere inside stevedore; time zones only matter for cron schedules.
pub type Timestamp = chrono::DateTime<chrono::Utc>;
