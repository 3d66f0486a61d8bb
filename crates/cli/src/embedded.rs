//! The task source of the runner embedded in `stevedore serve`: the runner's [`TaskSource`]
//! over the server's [`LeaseDesk`], the very desk the runner protocol's handlers call for
//! remote runners, so both kinds of runner share one lease logic.
//!
//! What is the embedded runner's own is how it is recorded for cluster statistics: a remote
//! runner is recorded with each lease request it sends; the embedded one records itself when
//! told to announce itself ([`DeskTaskSource::announcing`]), throttled so that an idle poll
//! loop does not write to the database on every poll.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use stevedore_model::{
    HeartbeatReply, LeaseRequest, LeasedTask, RunReport, TaskOutcome, Timestamp, WorkSignal,
};
use stevedore_runner::{PackageDownload, RequeueRequest, SourceError, TaskSource};
use stevedore_server::{DeskError, GiveBack, LeaseDesk, RunnerApiConfig};
use stevedore_store::{RunnerSeen, StoreError};

/// [`TaskSource`] over the server's [`LeaseDesk`].
#[derive(Clone)]
pub struct DeskTaskSource {
    desk: LeaseDesk,
    /// Set when the runner is a member of its clusters and records itself as one; `None`
    /// for a runner nobody should count.
    announce: Option<Arc<Announce>>,
    /// How long a runner goes unseen, holding no live lease, before it counts as gone: the
    /// server's online window, as for runners leasing over HTTP.
    online_window: Duration,
}

/// How a [`DeskTaskSource`] records its runner for cluster statistics, as the server does
/// for a runner leasing over HTTP.
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

/// What the runner acts on, from what the desk answered.
fn source_error(error: DeskError) -> SourceError {
    match error {
        DeskError::Store(StoreError::StaleLease { task_id }) => SourceError::StaleLease { task_id },
        DeskError::Store(StoreError::NotFound { what }) => SourceError::NotFound { what },
        DeskError::Store(error @ (StoreError::Database(_) | StoreError::Migration(_))) => {
            SourceError::Unavailable {
                message: error.to_string(),
            }
        }
        error @ (DeskError::Store(_) | DeskError::Invalid(_)) => SourceError::Refused {
            message: error.to_string(),
        },
    }
}

// === impl DeskTaskSource ===

impl DeskTaskSource {
    pub fn new(desk: LeaseDesk) -> Self {
        DeskTaskSource {
            desk,
            announce: None,
            online_window: RunnerApiConfig::default().online_window,
        }
    }

    /// Counts runners as gone after `window` unseen (the server's online window).
    pub fn online_window(mut self, window: Duration) -> Self {
        self.online_window = window;
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
    async fn announce(&self, request: &LeaseRequest) -> Result<(), SourceError> {
        let Some(announce) = &self.announce else {
            return Ok(());
        };
        let now = self.desk.now();
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
            owner: request.owner.clone(),
        };
        self.desk
            .record_runner(&runner)
            .await
            .map_err(source_error)?;
        announce.recorded(now);
        Ok(())
    }
}

impl std::fmt::Debug for DeskTaskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeskTaskSource").finish_non_exhaustive()
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

#[async_trait]
impl TaskSource for DeskTaskSource {
    fn work_signal(&self) -> Option<WorkSignal> {
        self.desk.work_signal()
    }

    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError> {
        self.announce(request).await?;
        self.desk.lease(request).await.map_err(source_error)
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, SourceError> {
        self.desk
            .heartbeat(task_id, token, lease_secs)
            .await
            .map_err(source_error)
    }

    async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), SourceError> {
        self.desk
            .mark_running(task_id, token)
            .await
            .map_err(source_error)
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, SourceError> {
        self.desk
            .append_log(task_id, token, bytes, cap)
            .await
            .map_err(source_error)
    }

    async fn progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
    ) -> Result<(), SourceError> {
        self.desk
            .progress(task_id, token, percent, msg)
            .await
            .map_err(source_error)
    }

    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
    ) -> Result<(), SourceError> {
        self.desk
            .complete(task_id, token, outcome, report)
            .await
            .map_err(source_error)?;
        Ok(())
    }

    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        request: &RequeueRequest,
    ) -> Result<(), SourceError> {
        let give_back = GiveBack {
            reason: request.reason.clone(),
            delay: request.delay,
            max_infra_attempts: request.max_infra_attempts,
        };
        self.desk
            .requeue(task_id, token, &give_back)
            .await
            .map_err(source_error)?;
        Ok(())
    }

    async fn release_held(
        &self,
        runner_id: &str,
        max_infra_attempts: u32,
    ) -> Result<u32, SourceError> {
        self.desk
            .release_runner(runner_id, None, max_infra_attempts)
            .await
            .map_err(source_error)
    }

    async fn gone_runners(&self, runner_ids: &[String]) -> Result<Vec<String>, SourceError> {
        self.desk
            .gone_runners(runner_ids, None, self.online_window)
            .await
            .map_err(source_error)
    }

    async fn task_package(
        &self,
        task_id: &str,
        token: i64,
    ) -> Result<PackageDownload, SourceError> {
        let package = self
            .desk
            .task_package(task_id, token)
            .await
            .map_err(source_error)?;
        Ok(PackageDownload {
            size: package.size,
            chunks: package
                .chunks
                .map_err(|error| source_error(DeskError::from(error)))
                .boxed(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use stevedore_model::{Clock, ManualClock};
    use stevedore_server::AppState;
    use stevedore_store::testsuite::{image_spec, new_task};
    use stevedore_store::{
        CredentialKey, CredentialVault, RunnerStatus, SqliteOptions, SqliteStore, Store, SyncMode,
    };

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        clock: Arc<ManualClock>,
        desk: LeaseDesk,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(SqliteOptions {
                path: dir.path().join("stevedore.db"),
                sync: SyncMode::Normal,
            })
            .await
            .unwrap(),
        );
        // Whole seconds, so times read back from the store compare equal.
        let clock = Arc::new(ManualClock::new(
            chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        ));
        let desk = LeaseDesk::new(
            store.clone(),
            clock.clone(),
            Arc::new(CredentialVault::new(&CredentialKey::generate().unwrap())),
            AppState::lease_wake_hook(Arc::default(), None),
        );
        Fixture {
            _dir: dir,
            store,
            clock,
            desk,
        }
    }

    fn request() -> LeaseRequest {
        LeaseRequest {
            runner_id: "embedded-test".into(),
            clusters: vec!["default".into()],
            max_tasks: 3,
            lease_secs: 30,
            owner: None,
        }
    }

    async fn runners(fixture: &Fixture) -> Vec<RunnerStatus> {
        let now = fixture.clock.now();
        fixture
            .store
            .cluster_load("default", None, None, now - chrono::Duration::hours(1), now)
            .await
            .unwrap()
            .runners
    }

    #[tokio::test]
    async fn an_announcing_source_records_its_runner_at_most_once_per_interval() {
        let fixture = fixture().await;
        let source = DeskTaskSource::new(fixture.desk.clone()).announcing(Duration::from_secs(20));
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
        let source = DeskTaskSource::new(fixture.desk.clone());
        source.set_capacity(4);
        source.lease(&request()).await.unwrap();
        assert_eq!(runners(&fixture).await, Vec::new());
    }

    /// The embedded runner gets the answer a remote runner gets (400 there): a requeue delay
    /// over a day is refused, not capped, and the task stays leased.
    #[tokio::test]
    async fn an_oversized_requeue_delay_is_refused_as_over_http() {
        let fixture = fixture().await;
        let now = fixture.clock.now();
        let project = fixture.store.create_project("p", now).await.unwrap();
        fixture
            .store
            .push_code(&project.id, &image_spec("hello"), None, now)
            .await
            .unwrap();
        fixture
            .store
            .enqueue(&project.id, &[new_task("hello")], now)
            .await
            .unwrap();
        let source = DeskTaskSource::new(fixture.desk.clone());
        let leased = source.lease(&request()).await.unwrap();
        assert_eq!(leased.len(), 1);
        let too_long = RequeueRequest {
            reason: "x".into(),
            delay: Duration::from_secs(2 * 24 * 60 * 60),
            max_infra_attempts: 5,
        };
        let refused = source
            .requeue(&leased[0].task.id, leased[0].lease.token, &too_long)
            .await;
        assert!(
            matches!(refused, Err(SourceError::Refused { .. })),
            "{refused:?}"
        );
        // The lease still holds.
        source
            .heartbeat(&leased[0].task.id, leased[0].lease.token, 30)
            .await
            .unwrap();
    }
}
