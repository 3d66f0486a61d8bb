//! The lease desk: the one place where "lease / heartbeat / report on / complete / requeue a
//! leased task, and hand its holder the task's code package" is done, for every runner that
//! goes through a server. The runner protocol's handlers (`runner_api`, remote runners) and the
//! embedded runner's task source (in the binary) both call it, so the two kinds of runner share
//! one lease logic and cannot drift.
//!
//! Besides the store call, the desk owns what belongs to every such call:
//!
//! * "now" comes from the server's clock; a runner sends durations, and the desk turns a
//!   requeue delay into a due time (refusing one over [`MAX_REQUEUE_DELAY`]);
//! * a lease gets its project's registry credential (`attach_registry_credentials`, called
//!   here and nowhere else);
//! * the lease metrics: lease calls and queue waits, and tasks the store reports final after
//!   a completion or a requeue;
//! * wake-ups: a completion (which may have queued a user retry) and a requeue wake waiting
//!   lease requests and the embedded runner through the server's wake hook;
//! * recording a runner for cluster statistics ([`LeaseDesk::record_runner`]).
//!
//! It also refuses what makes no sense whatever the store holds (a lease request's limits, a
//! lease's length, a requeue delay), so every kind of runner gets the same answer. What it
//! does not own: the wire format of a remote runner's request (the handlers, which answer
//! 400 for what the desk refuses) and how often the embedded runner records itself (its task
//! source throttles that).

use std::sync::Arc;
use std::time::{Duration, Instant};

use stevedore_model::lease::check_lease_secs;
use stevedore_model::validation::ValidationError;
use stevedore_model::{
    Clock, HeartbeatReply, LeaseRequest, LeasedTask, RunReport, TaskOutcome, TaskStatus, Timestamp,
    WorkSignal,
};
use stevedore_store::{
    CredentialVault, Requeue, RunnerSeen, Store, StoreError, attach_registry_credentials,
};

use crate::EnqueueHook;

/// The longest a task may be given back for before it is due again. Runners ask for seconds
/// to minutes (their infrastructure backoff); anything longer is a mistake, refused.
pub const MAX_REQUEUE_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The most runners one question about gone runners may name: a runner asks about the
/// runner labels it finds on its engine's containers, a handful in practice.
pub const MAX_GONE_QUERY: usize = 1000;

/// Why the desk did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DeskError {
    /// The store refused or failed the call (a stale lease, a missing task, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request makes no sense whatever the task's state; trying again will not help.
    #[error("{0}")]
    Invalid(String),
}

/// Why and for how long a runner gives a task back; relative, so no runner's clock has to
/// agree with the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiveBack {
    /// What went wrong, for the task's message and the logs.
    pub reason: String,
    /// How long the task waits before it may be leased again; at most [`MAX_REQUEUE_DELAY`].
    pub delay: Duration,
    /// After this many infrastructure failures the task ends `error` instead.
    pub max_infra_attempts: u32,
}

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct LeaseDesk {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    credentials: Arc<CredentialVault>,
    wake: EnqueueHook,
}

impl std::fmt::Debug for LeaseDesk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseDesk").finish_non_exhaustive()
    }
}

// === impl LeaseDesk ===

impl LeaseDesk {
    /// A desk over `store` with `clock` as "now", opening projects' registry credentials with
    /// `credentials`, and calling `wake` when work may have become available.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        credentials: Arc<CredentialVault>,
        wake: EnqueueHook,
    ) -> Self {
        LeaseDesk {
            store,
            clock,
            credentials,
            wake,
        }
    }

    /// The store's signal of work queued by any process sharing it, if it has one.
    pub fn work_signal(&self) -> Option<WorkSignal> {
        self.store.work_signal()
    }

    /// The desk's "now".
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Records a runner (id, clusters, capacity) as seen now, for cluster statistics.
    pub async fn record_runner(&self, runner: &RunnerSeen) -> Result<(), DeskError> {
        self.store.record_runner(runner, self.clock.now()).await?;
        Ok(())
    }

    /// Claims up to `request.max_tasks` due tasks, each with its project's registry
    /// credential, and records the call and the queue wait of each task. A request that makes
    /// no sense ([`LeaseRequest::validate`]) is refused before the store is asked.
    pub async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, DeskError> {
        request.validate().map_err(invalid)?;
        let now = self.clock.now();
        let began = Instant::now();
        let mut leased = self.store.lease(request, now).await?;
        attach_registry_credentials(self.store.as_ref(), &self.credentials, &mut leased).await?;
        stevedore_metrics::lease_call(
            began.elapsed(),
            now,
            leased.iter().map(|leased| leased.task.due_at),
        );
        Ok(leased)
    }

    /// Extends the lease by `lease_secs` from now; says whether a user asked to cancel.
    pub async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, DeskError> {
        check_lease_secs(lease_secs).map_err(invalid)?;
        Ok(self
            .store
            .heartbeat(task_id, token, lease_secs, self.clock.now())
            .await?)
    }

    /// The task's container started: the task is `running` from now.
    pub async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), DeskError> {
        let now = self.clock.now();
        self.store.mark_running(task_id, token, now, now).await?;
        Ok(())
    }

    /// Appends log bytes up to `cap` in all; the size stored so far.
    pub async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, DeskError> {
        Ok(self
            .store
            .append_log(task_id, token, bytes, cap, self.clock.now())
            .await?)
    }

    /// The task's progress, reported on its behalf.
    pub async fn progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
    ) -> Result<(), DeskError> {
        Ok(self
            .store
            .runner_progress(task_id, token, percent, msg, self.clock.now())
            .await?)
    }

    /// Records the task's terminal result, once, counts it, and wakes runners: a user retry
    /// may have been queued with it. Returns the task's status.
    pub async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
    ) -> Result<TaskStatus, DeskError> {
        let task = self
            .store
            .complete(task_id, token, outcome, report, self.clock.now())
            .await?;
        stevedore_metrics::task_finished(task.status, &task.code_name);
        (self.wake)();
        Ok(task.status)
    }

    /// Gives the task back, due again after `give_back.delay`, and wakes runners. Past its
    /// infrastructure attempts (or cancelled meanwhile) the task is final now, and counted.
    /// Returns the task's status.
    pub async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        give_back: &GiveBack,
    ) -> Result<TaskStatus, DeskError> {
        let delay = requeue_delay(give_back.delay)?;
        if give_back.max_infra_attempts == 0 {
            return Err(DeskError::Invalid(
                "max_infra_attempts must be at least 1".into(),
            ));
        }
        let now = self.clock.now();
        let requeue = Requeue {
            reason: give_back.reason.clone(),
            due_at: now + delay,
            max_infra_attempts: give_back.max_infra_attempts,
        };
        let task = self.store.requeue(task_id, token, &requeue, now).await?;
        stevedore_metrics::task_finished(task.status, &task.code_name);
        (self.wake)();
        Ok(task.status)
    }

    /// Gives back at once every task runner `runner_id` held (only `owner`'s when given), for
    /// a runner that starts again; how many.
    pub async fn release_runner(
        &self,
        runner_id: &str,
        owner: Option<&str>,
        max_infra_attempts: u32,
    ) -> Result<u32, DeskError> {
        stevedore_model::validation::check_name("runner_id", runner_id).map_err(invalid)?;
        if max_infra_attempts == 0 {
            return Err(DeskError::Invalid(
                "max_infra_attempts must be at least 1".into(),
            ));
        }
        let released = self
            .store
            .release_runner(runner_id, owner, self.clock.now(), max_infra_attempts)
            .await?;
        for task in &released {
            stevedore_metrics::task_finished(task.status, &task.code_name);
        }
        if !released.is_empty() {
            tracing::info!(
                runner_id,
                released = released.len(),
                "a runner that started again gave back the tasks it held"
            );
            (self.wake)();
        }
        Ok(u32::try_from(released.len()).unwrap_or(u32::MAX))
    }

    /// Which of `runner_ids` (runners of `owner`: of the shared clusters when `None`) are
    /// gone: not seen asking for work for `unseen_for` and holding no live lease. A runner
    /// sharing their engine removes their containers, which outlived their leases.
    pub async fn gone_runners(
        &self,
        runner_ids: &[String],
        owner: Option<&str>,
        unseen_for: Duration,
    ) -> Result<Vec<String>, DeskError> {
        if runner_ids.len() > MAX_GONE_QUERY {
            return Err(DeskError::Invalid(format!(
                "ask about at most {MAX_GONE_QUERY} runners at once, not {}",
                runner_ids.len()
            )));
        }
        for runner_id in runner_ids {
            stevedore_model::validation::check_name("runner_ids", runner_id).map_err(invalid)?;
        }
        let now = self.clock.now();
        let unseen_for = chrono::Duration::from_std(unseen_for)
            .map_err(|_| DeskError::Invalid("the unseen period is too long".into()))?;
        Ok(self
            .store
            .gone_runners(runner_ids, owner, now - unseen_for, now)
            .await?)
    }

    /// The zip package of the code revision the leased task pinned, for the holder of the
    /// lease only: a stale token is refused like any other write about the task.
    pub async fn task_package(
        &self,
        task_id: &str,
        token: i64,
    ) -> Result<stevedore_store::PackageStream, DeskError> {
        Ok(self.store.leased_package(task_id, token).await?)
    }
}

fn invalid(error: ValidationError) -> DeskError {
    DeskError::Invalid(error.to_string())
}

/// A requeue delay as a duration of the clock, refused over [`MAX_REQUEUE_DELAY`].
fn requeue_delay(delay: Duration) -> Result<chrono::Duration, DeskError> {
    let too_long = || {
        DeskError::Invalid(format!(
            "a requeue delay must be at most {} ms",
            MAX_REQUEUE_DELAY.as_millis()
        ))
    };
    if delay > MAX_REQUEUE_DELAY {
        return Err(too_long());
    }
    chrono::Duration::from_std(delay).map_err(|_| too_long())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use stevedore_model::{ManualClock, TaskStatus};
    use stevedore_store::testsuite::{image_spec, lease_request, new_task};
    use stevedore_store::{CredentialKey, SqliteOptions, SqliteStore, SyncMode};

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        desk: LeaseDesk,
        wakes: Arc<AtomicUsize>,
        project_id: String,
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
        let clock = Arc::new(ManualClock::new(
            chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        ));
        let project = store.create_project("desk", clock.now()).await.unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counted = wakes.clone();
        let desk = LeaseDesk::new(
            store.clone(),
            clock,
            Arc::new(CredentialVault::new(&CredentialKey::generate().unwrap())),
            Arc::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
            }),
        );
        Fixture {
            _dir: dir,
            store,
            desk,
            wakes,
            project_id: project.id,
        }
    }

    /// Pushes `hello` with `retries` and leases one task of it.
    async fn leased(fixture: &Fixture, retries: u32) -> LeasedTask {
        let mut spec = image_spec("hello");
        spec.retries = retries;
        spec.retries_delay_secs = 0;
        let now = fixture.desk.now();
        fixture
            .store
            .push_code(&fixture.project_id, &spec, None, now)
            .await
            .unwrap();
        fixture
            .store
            .enqueue(&fixture.project_id, &[new_task("hello")], now)
            .await
            .unwrap();
        let mut leased = fixture
            .desk
            .lease(&lease_request("desk-test", 1))
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        leased.remove(0)
    }

    #[tokio::test]
    async fn a_completion_wakes_runners_for_the_retry_it_may_have_queued() {
        let fixture = fixture().await;
        let leased = leased(&fixture, 1).await;
        fixture
            .desk
            .mark_running(&leased.task.id, leased.lease.token)
            .await
            .unwrap();
        let before = fixture.wakes.load(Ordering::SeqCst);
        let status = fixture
            .desk
            .complete(
                &leased.task.id,
                leased.lease.token,
                &TaskOutcome::Exited { exit_code: 1 },
                &RunReport::default(),
            )
            .await
            .unwrap();
        assert_eq!(status, TaskStatus::Error);
        assert_eq!(fixture.wakes.load(Ordering::SeqCst), before + 1);
        // The retry is there to be leased at once.
        let retry = fixture
            .desk
            .lease(&lease_request("desk-test", 1))
            .await
            .unwrap();
        assert_eq!(retry.len(), 1, "{retry:?}");
        assert_eq!(
            retry[0].task.original_task_id.as_deref(),
            Some(leased.task.id.as_str())
        );
    }

    #[tokio::test]
    async fn a_requeue_turns_its_delay_into_a_due_time_and_wakes_runners() {
        let fixture = fixture().await;
        let leased = leased(&fixture, 0).await;
        let give_back = GiveBack {
            reason: "the engine went away".into(),
            delay: Duration::from_secs(30),
            max_infra_attempts: 5,
        };
        let status = fixture
            .desk
            .requeue(&leased.task.id, leased.lease.token, &give_back)
            .await
            .unwrap();
        assert_eq!(status, TaskStatus::Queued);
        assert_eq!(fixture.wakes.load(Ordering::SeqCst), 1);
        let task = fixture
            .store
            .get_task(&fixture.project_id, &leased.task.id)
            .await
            .unwrap();
        assert_eq!(
            task.due_at,
            fixture.desk.now() + chrono::Duration::seconds(30)
        );
    }

    #[tokio::test]
    async fn a_lease_request_out_of_bounds_is_refused_for_every_runner_and_leases_nothing() {
        let fixture = fixture().await;
        let queued = leased(&fixture, 0).await.task;
        fixture
            .store
            .enqueue(
                &fixture.project_id,
                &[new_task("hello")],
                fixture.desk.now(),
            )
            .await
            .unwrap();
        let good = lease_request("desk-test", 1);
        for (bad, naming) in [
            (
                LeaseRequest {
                    max_tasks: 257,
                    ..good.clone()
                },
                "max_tasks",
            ),
            (
                LeaseRequest {
                    lease_secs: 0,
                    ..good.clone()
                },
                "lease_secs",
            ),
            (
                LeaseRequest {
                    lease_secs: 3601,
                    ..good.clone()
                },
                "lease_secs",
            ),
            (
                LeaseRequest {
                    clusters: vec![],
                    ..good.clone()
                },
                "clusters",
            ),
            (
                LeaseRequest {
                    runner_id: "a/b".into(),
                    ..good.clone()
                },
                "runner_id",
            ),
        ] {
            match fixture.desk.lease(&bad).await {
                Err(DeskError::Invalid(message)) => assert!(message.contains(naming), "{message}"),
                other => panic!("{bad:?} was not refused: {other:?}"),
            }
        }
        let refused = fixture.desk.heartbeat(&queued.id, 1, 0).await;
        assert!(matches!(refused, Err(DeskError::Invalid(_))), "{refused:?}");
        // The second task is still there for a sensible request.
        assert_eq!(fixture.desk.lease(&good).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_requeue_delay_over_a_day_is_refused_and_changes_nothing() {
        let fixture = fixture().await;
        let leased = leased(&fixture, 0).await;
        for delay in [
            MAX_REQUEUE_DELAY + Duration::from_millis(1),
            Duration::from_secs(u64::MAX),
        ] {
            let give_back = GiveBack {
                reason: "x".into(),
                delay,
                max_infra_attempts: 5,
            };
            let refused = fixture
                .desk
                .requeue(&leased.task.id, leased.lease.token, &give_back)
                .await;
            assert!(matches!(refused, Err(DeskError::Invalid(_))), "{refused:?}");
        }
        assert_eq!(fixture.wakes.load(Ordering::SeqCst), 0);
        // Still leased by the same token; a day exactly is fine.
        let give_back = GiveBack {
            reason: "x".into(),
            delay: MAX_REQUEUE_DELAY,
            max_infra_attempts: 5,
        };
        let status = fixture
            .desk
            .requeue(&leased.task.id, leased.lease.token, &give_back)
            .await
            .unwrap();
        assert_eq!(status, TaskStatus::Queued);
    }
}
