//! stevedore's runner: it leases tasks and runs each in its own short-lived container.
//!
//! What this crate owns:
//!
//! * **The lease loop** ([`Runner::run`]): lease up to the free capacity from a
//!   [`TaskSource`], wake at once when a slot frees, back off when there is no work, and stop
//!   leasing the moment shutdown is asked for. Every task runs in its own tokio task, tracked
//!   so that shutdown can wait for it.
//! * **Admission**: at most `capacity` tasks at once, and never more memory handed to
//!   containers than the runner's memory budget (a task waits, still leased and heartbeating,
//!   until its memory is free).
//! * **Supervision of one task**: heartbeats that extend the lease and carry cancellation
//!   back; the timeout, counted from container start; cancellation (kill within a second);
//!   a lost lease (stop and abandon the task to whoever holds it now).
//! * **The in-container contract** (DESIGN.md section 5): the container spec built from a
//!   task, its code revision and the stacks ([`ContainerPlan`]): environment, files by
//!   archive upload, the zip package to unpack, limits and labels.
//! * **Code packages on their way** (`spool`): a task's package is downloaded to a file of
//!   the runner's work directory chunk by chunk, checked against its announced size, and
//!   handed to the engine as a [`stevedore_engine::ZipPackage`] that it unpacks entry by
//!   entry; the file goes when the attempt ends, and leftovers of a killed runner at its
//!   start.
//! * **Whose credentials pull an image** (`registry`): the operator's for stack images and a
//!   project's own built images, the project's own (from the lease) for what its code names;
//!   a cached image from a registry is used by a project only after its registry said that
//!   project may pull it.
//! * **The task network** (`network`): `bridge` codes run on a network the runner manages,
//!   made sure of at start-up and isolated by the engine (no host, no other task, no blocked
//!   range, except allowed destinations and the published API); other networks only where
//!   the operator lists them. Without isolation the runner refuses to start, unless the
//!   operator opted for an unguarded network.
//! * **Log shipping**: stdout and stderr into the task source in chunks while the task runs,
//!   up to the log cap.
//! * **Progress from inside the container**: lines `::stevedore-progress::<percent> <msg>`
//!   in the task's output set its `percent` and `msg` ([`parse_progress_line`] has the
//!   rules); forwarded coalesced, and kept in the log like any other line.
//! * **Local runs** ([`run_local`]): one task run by the real runner over an in-memory
//!   source, without a server or a database, for `stevedore run`.
//! * **Failure classification**: only by [`stevedore_engine::EngineError::is_infrastructure`];
//!   infrastructure failures requeue the task with exponential backoff without spending the
//!   user's retries, the user's failures end the task `error` with a clear message.
//! * **Metrics** of its side (through `stevedore_metrics`): every engine call timed and its
//!   failures counted by kind, the capacity and slots in use, log bytes shipped. Lease calls,
//!   queue waits and tasks finished are counted by the server's lease desk.
//! * **Engine hygiene**: no engine log of a task (its output is attached before the start),
//!   a default CPU limit per task and a CPU reserve for what runs beside the tasks, pulls
//!   bounded by a deadline and a size, and an image janitor (`images`) that keeps the engine's
//!   images under a disk budget, least recently used first.
//! * **Teardown**: every container is removed (force, with volumes) in the background after
//!   the result is recorded, and containers left by an earlier life of this runner are
//!   reaped at start-up.
//!
//! What it does not own: the status transitions (the store applies `model::transition`),
//! retries of failed tasks (the store queues them on completion), rescuing expired leases
//! (the server's rescuer), and anything Docker-specific (the `engine` crate).
//!
//! The runner talks to its tasks only through the [`TaskSource`] trait, in the lease
//! vocabulary of `stevedore-model`: one over the server's lease desk for the runner embedded
//! in `stevedore serve`, an in-memory one holding a single task for [`run_local`], and an
//! HTTP implementation for remote runners, so all of them share this crate unchanged. It
//! does not depend on the store.

#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed test with a clear location.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod admission;
mod attempt;
mod backoff;
mod config;
mod container;
mod error;
mod gone;
mod images;
mod ledger;
mod local;
mod logs;
mod network;
mod progress;
mod registry;
mod runner;
mod source;
mod spool;
pub mod watchdog;

pub use backoff::requeue_delay;
pub use config::{RunnerConfig, default_capacity, default_memory_budget_mib};
pub use container::{
    CONFIG_FILE, ContainerPlan, LABEL_LEDGER, LABEL_RUNNER, LABEL_TASK, PAYLOAD_FILE, PackagePlan,
    registry_auth_for,
};
pub use error::{RunnerError, SourceError};
pub use local::{LocalResult, LocalRun, LogSink, run_local};
pub use network::{PublishedApi, TaskNetworkConfig};
pub use progress::{
    MAX_PROGRESS_LINE_BYTES, MAX_PROGRESS_MESSAGE_BYTES, PROGRESS_MARKER, ProgressUpdate,
    parse_progress_line,
};
pub use runner::{Runner, StartedRunner, WorkNotifier};
pub use source::{PackageDownload, RequeueRequest, TaskSource};
pub use stevedore_engine::TASK_DIR;
