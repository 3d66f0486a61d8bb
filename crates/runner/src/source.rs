//! The runner's side of the lease protocol: [`TaskSource`], and [`StoreTaskSource`], which
//! implements it over the store for the runner embedded in `stevedore serve`.
//!
//! A runner leasing over HTTP is recorded for cluster statistics by the server's lease
//! handler; the embedded runner is recorded by its `StoreTaskSource` when it is told to
//! announce itself ([`StoreTaskSource::announcing`]), throttled so that an idle poll loop
//! does not write to the database on every poll.
//!
//! A remote runner implements the same trait over the server's `/runner/v1/...` protocol, so
//! the trait speaks only in the shared domain types and never in time stamps of the runner's
//! own clock: the source decides what "now" is (the store's clock, or the server's).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stevedore_model::{Clock, TaskOutcome, Timestamp};
use stevedore_store::{
    CredentialVault, HeartbeatReply, LeaseRequest, LeasedTask, Requeue, RunReport, RunnerSeen,
    Store, WorkSignal, attach_registry_credentials,
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
    /// Set when the runner is a member of its clusters and records itself as one; `None`
    /// for a runner nobody should count.
    announce: Option<Arc<Announce>>,
    /// Opens projects' registry credentials for the leases of their tasks, as the runner
    /// protocol's lease handler does for remote runners; `None` leases without them.
    credentials: Option<Arc<CredentialVault>>,
}

/// How a [`StoreTaskSource`] records its runner (`Store::record_runner`) for cluster
/// statistics, as the server does for a runner leasing over HTTP.
#[derive(Debug)]
struct Announce {
    /// The least time between two records. Below the server's online window, so a runner
    /// that keeps polling never drops out of the statistics.
    every: chrono::Duration,
    /// The runner's capacity once known; 0 until then, when a lease's `max_tasks` stands in
    /// (as the server does for a runner that sends none).
    capacity: AtomicU32,
    /// When the runner was last recorded.
    last_recorded: Mutex<Option<Timestamp>>,
}

// === impl StoreTaskSource ===

impl StoreTaskSource {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        StoreTaskSource {
            store,
            clock,
            announce: None,
            credentials: None,
        }
    }

    /// Gives leased tasks their projects' registry credentials, opened with `vault` (the
    /// server's credential key), through the same function the runner protocol uses.
    pub fn with_credentials(mut self, vault: Arc<CredentialVault>) -> Self {
        self.credentials = Some(vault);
        self
    }

    /// Records the runner (its id, clusters and capacity) with its lease calls, at most once
    /// per `every`, so that cluster statistics list it. `every` should be well below the
    /// online window of the statistics.
    pub fn announcing(mut self, every: Duration) -> Self {
        // Only a duration of centuries is out of chrono's range; a day is as good as that.
        let every = chrono::Duration::from_std(every).unwrap_or_else(|_| chrono::Duration::days(1));
        self.announce = Some(Arc::new(Announce {
            every,
            capacity: AtomicU32::new(0),
            last_recorded: Mutex::new(None),
        }));
        self
    }

    /// The runner's capacity, recorded from now on; known only once the runner has started.
    pub fn set_capacity(&self, capacity: u32) {
        if let Some(announce) = &self.announce {
            announce.capacity.store(capacity, Ordering::Relaxed);
        }
    }

    /// Records the runner if it is announced and was not recorded within the last `every`.
    async fn announce(&self, request: &LeaseRequest, now: Timestamp) -> Result<(), SourceError> {
        let Some(announce) = &self.announce else {
            return Ok(());
        };
        if !announce.due(now) {
            return Ok(());
        }
        let capacity = match announce.capacity.load(Ordering::Relaxed) {
            0 => request.max_tasks,
            known => known,
        };
        let runner = RunnerSeen {
            id: request.runner_id.clone(),
            clusters: request.clusters.clone(),
            capacity,
        };
        self.store.record_runner(&runner, now).await?;
        announce.recorded(now);
        Ok(())
    }
}

// === impl Announce ===

impl Announce {
    /// Whether the runner should be recorded again at `now`. A clock that stepped back
    /// counts as due, so a runner is never left unrecorded for long.
    fn due(&self, now: Timestamp) -> bool {
        let last = *self
            .last_recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match last {
            None => true,
            Some(last) => now < last || now - last >= self.every,
        }
    }

    fn recorded(&self, now: Timestamp) {
        *self
            .last_recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(now);
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
        self.announce(request, now).await?;
        let began = Instant::now();
        let mut leased = self.store.lease(request, now).await?;
        if let Some(vault) = &self.credentials {
            attach_registry_credentials(self.store.as_ref(), vault, &mut leased).await?;
        }
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

#[cfg(test)]
mod tests {
    use stevedore_model::ManualClock;
    use stevedore_store::{RunnerStatus, SqliteOptions, SqliteStore, SyncMode};

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        clock: Arc<ManualClock>,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteOptions {
            path: dir.path().join("stevedore.db"),
            sync: SyncMode::Normal,
        })
        .await
        .unwrap();
        Fixture {
            _dir: dir,
            store: Arc::new(store),
            // Whole seconds, so times read back from the store compare equal.
            clock: Arc::new(ManualClock::new(
                chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            )),
        }
    }

    fn request() -> LeaseRequest {
        LeaseRequest {
            runner_id: "embedded-test".into(),
            clusters: vec!["default".into()],
            max_tasks: 3,
            lease_secs: 30,
        }
    }

    async fn runners(fixture: &Fixture) -> Vec<RunnerStatus> {
        let now = fixture.clock.now();
        fixture
            .store
            .cluster_load("default", None, now - chrono::Duration::hours(1), now)
            .await
            .unwrap()
            .runners
    }

    #[tokio::test]
    async fn an_announcing_source_records_its_runner_at_most_once_per_interval() {
        let fixture = fixture().await;
        let source = StoreTaskSource::new(fixture.store.clone(), fixture.clock.clone())
            .announcing(Duration::from_secs(20));
        let start = fixture.clock.now();

        // Before the runner knows its capacity, the lease size stands in for it.
        assert!(source.lease(&request()).await.unwrap().is_empty());
        let seen = runners(&fixture).await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].id, "embedded-test");
        assert_eq!(seen[0].clusters, vec!["default".to_owned()]);
        assert_eq!(seen[0].capacity, 3);
        assert_eq!(seen[0].last_seen, start);

        // Polls within the interval write nothing.
        source.set_capacity(7);
        for _ in 0..5 {
            fixture.clock.advance(chrono::Duration::seconds(3));
            source.lease(&request()).await.unwrap();
        }
        let seen = runners(&fixture).await;
        assert_eq!(seen[0].last_seen, start, "{seen:?}");
        assert_eq!(seen[0].capacity, 3, "{seen:?}");

        // Once the interval has passed, the next poll records it again, with its capacity.
        fixture.clock.advance(chrono::Duration::seconds(5));
        source.lease(&request()).await.unwrap();
        let seen = runners(&fixture).await;
        assert_eq!(seen[0].last_seen, fixture.clock.now(), "{seen:?}");
        assert_eq!(seen[0].capacity, 7, "{seen:?}");

        // A clock stepped back does not silence it.
        fixture.clock.advance(chrono::Duration::seconds(-60));
        source.lease(&request()).await.unwrap();
        let seen = runners(&fixture).await;
        assert_eq!(seen[0].last_seen, fixture.clock.now(), "{seen:?}");
    }

    #[tokio::test]
    async fn a_source_not_announcing_records_no_runner() {
        let fixture = fixture().await;
        let source = StoreTaskSource::new(fixture.store.clone(), fixture.clock.clone());
        source.set_capacity(4);
        source.lease(&request()).await.unwrap();
        assert_eq!(runners(&fixture).await, Vec::new());
    }
}
