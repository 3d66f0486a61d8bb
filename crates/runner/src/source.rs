//! The runner's side of the lease protocol: [`TaskSource`], and [`StoreTaskSource`], which
//! implements it over the store for the runner embedded in `stevedore serve`.
//!
//! A remote runner implements the same trait over the server's `/runner/v1/...` protocol, so
//! the trait speaks only in the shared domain types and never in time stamps of the runner's
//! own clock: the source decides what "now" is (the store's clock, or the server's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stevedore_model::{Clock, TaskOutcome};
use stevedore_store::{
    HeartbeatReply, LeaseRequest, LeasedTask, Requeue, RunReport, Store, WorkSignal,
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

    /// The zip package of one revision of a code.
    async fn code_package(
        &self,
        project_id: &str,
        code_id: &str,
        rev: u32,
    ) -> Result<Vec<u8>, SourceError>;
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

/// [`TaskSource`] over the store, for the runner embedded in `stevedore serve`. "Now" comes
/// from the clock it is given.
#[derive(Clone)]
pub struct StoreTaskSource {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

// === impl StoreTaskSource ===

impl StoreTaskSource {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        StoreTaskSource { store, clock }
    }
}

impl std::fmt::Debug for StoreTaskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTaskSource").finish_non_exhaustive()
    }
}

#[async_trait]
impl TaskSource for StoreTaskSource {
    fn work_signal(&self) -> Option<WorkSignal> {
        self.store.work_signal()
    }

    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError> {
        let now = self.clock.now();
        let began = Instant::now();
        let leased = self.store.lease(request, now).await?;
        stevedore_metrics::lease_call(
            began.elapsed(),
            now,
            leased.iter().map(|leased| leased.task.due_at),
        );
        Ok(leased)
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, SourceError> {
        Ok(self
            .store
            .heartbeat(task_id, token, lease_secs, self.clock.now())
            .await?)
    }

    async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), SourceError> {
        let now = self.clock.now();
        self.store.mark_running(task_id, token, now, now).await?;
        Ok(())
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, SourceError> {
        Ok(self
            .store
            .append_log(task_id, token, bytes, cap, self.clock.now())
            .await?)
    }

    async fn progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
    ) -> Result<(), SourceError> {
        Ok(self
            .store
            .runner_progress(task_id, token, percent, msg, self.clock.now())
            .await?)
    }

    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
    ) -> Result<(), SourceError> {
        let task = self
            .store
            .complete(task_id, token, outcome, report, self.clock.now())
            .await?;
        stevedore_metrics::task_finished(task.status, &task.code_name);
        Ok(())
    }

    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        request: &RequeueRequest,
    ) -> Result<(), SourceError> {
        let now = self.clock.now();
        // A delay too long for chrono is capped at a day; the runner never asks for that much.
        let delay =
            chrono::Duration::from_std(request.delay).unwrap_or_else(|_| chrono::Duration::days(1));
        let requeue = Requeue {
            reason: request.reason.clone(),
            due_at: now + delay,
            max_infra_attempts: request.max_infra_attempts,
        };
        let task = self.store.requeue(task_id, token, &requeue, now).await?;
        // Past its infrastructure attempts (or cancelled meanwhile) the task is final now.
        stevedore_metrics::task_finished(task.status, &task.code_name);
        Ok(())
    }

    async fn code_package(
        &self,
        project_id: &str,
        code_id: &str,
        rev: u32,
    ) -> Result<Vec<u8>, SourceError> {
        Ok(self
            .store
            .get_package(project_id, code_id, Some(rev))
            .await?)
    }
}
