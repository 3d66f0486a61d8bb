//! The runner's side of the lease protocol: [`TaskSource`].
//!
//! The runner embedded in `stevedore serve` implements it over the server's lease desk, a
//! remote runner over the server's `/runner/v1/...` protocol (which goes through the same
//! desk), a local run over its one task in memory. So the trait speaks only in the lease
//! vocabulary of `stevedore-model` and never in time stamps of the runner's own clock: the
//! source decides what "now" is (the server's clock).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use stevedore_model::{
    HeartbeatReply, LeaseRequest, LeasedTask, RunReport, TaskOutcome, WorkSignal,
};

use crate::error::SourceError;

/// Where a runner gets its tasks and reports on them. Held as `Arc<dyn TaskSource>`.
///
/// Every call about a leased task carries the lease token; a stale token is answered with
/// [`SourceError::StaleLease`], after which the runner drops the task.
#[async_trait]
pub trait TaskSource: Send + Sync + 'static {
    /// A signal that work may be waiting, when the source has one beyond its caller's own
    /// `WorkNotifier` (a store shared by several servers). The lease loop still polls.
    fn work_signal(&self) -> Option<WorkSignal> {
        None
    }

    /// Claims up to `request.max_tasks` due tasks for this runner.
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError>;

    /// Extends the lease by `lease_secs` and says whether a user asked to cancel the task.
    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, SourceError>;

    /// The task's container started: the task is `running` from now.
    async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), SourceError>;

    /// Appends log bytes, keeping at most `cap` bytes in all (the source writes the
    /// truncation marker). Returns the size stored so far.
    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, SourceError>;

    /// Progress of the task, reported on its behalf.
    async fn progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
    ) -> Result<(), SourceError>;

    /// Records the task's terminal result, exactly once.
    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
    ) -> Result<(), SourceError>;

    /// Gives the task back after an infrastructure failure (or at shutdown).
    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        request: &RequeueRequest,
    ) -> Result<(), SourceError>;

    /// The zip package of the code revision the leased task pinned. Only the holder of the
    /// lease gets it: a package is the project's code, never handed out by id alone.
    async fn task_package(&self, task_id: &str, token: i64)
    -> Result<PackageDownload, SourceError>;

    /// Gives back every task runner `runner_id` still holds from an earlier life, at start-up
    /// after its leftover containers are gone: they run nowhere, so they need not wait for
    /// their leases to expire. How many. A source whose runners never outlive one process
    /// (a local run) holds nothing to give back.
    async fn release_held(
        &self,
        runner_id: &str,
        max_infra_attempts: u32,
    ) -> Result<u32, SourceError> {
        let _ = (runner_id, max_infra_attempts);
        Ok(0)
    }

    /// Which of `runner_ids` are gone, as far as the server can tell: runners it saw leasing
    /// that have not asked for work for longer than their leases last and hold no live lease.
    /// Their containers outlived their leases; a runner sharing their engine removes them. A
    /// runner the server never saw is not gone (it may lease from another server). A source
    /// without other runners (a local run) knows of none.
    async fn gone_runners(&self, runner_ids: &[String]) -> Result<Vec<String>, SourceError> {
        let _ = runner_ids;
        Ok(Vec::new())
    }
}

/// A code package on its way to the runner: its length up front, its bytes in chunks, so the
/// runner never holds a whole package in memory to pass it on (it spools them to a file and
/// checks them against the length).
pub struct PackageDownload {
    /// The package's length in bytes, as the source announced it.
    pub size: u64,
    /// The package's bytes, in order.
    pub chunks: BoxStream<'static, Result<Bytes, SourceError>>,
}

// === impl PackageDownload ===

impl PackageDownload {
    /// A package already in memory, as one chunk.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let bytes: Bytes = bytes.into();
        PackageDownload {
            size: bytes.len() as u64,
            chunks: futures::stream::once(async move { Ok(bytes) }).boxed(),
        }
    }
}

impl std::fmt::Debug for PackageDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageDownload")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Why and for how long a runner gives a task back. The delay is relative, so a remote
/// runner's clock never has to agree with the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequeueRequest {
    /// What went wrong, for the task's message and the logs.
    pub reason: String,
    /// How long the task waits before it may be leased again.
    pub delay: Duration,
    /// After this many infrastructure failures the task ends `error` instead.
    pub max_infra_attempts: u32,
}
