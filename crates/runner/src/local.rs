//! Running one task locally, without a server or a database: what `stevedore run` is built
//! on.
//!
//! [`run_local`] runs the real [`Runner`] with an in-memory [`TaskSource`] that holds exactly
//! one task, so a local run takes the very code path a leased task takes in production:
//! the same container plan (image, command, environment, files, the unpacked zip), the same
//! limits (memory, CPU, pids, timeout, log cap), the same supervision, progress lines and
//! teardown. What differs is only what a single local task needs:
//!
//! * the runner id is `local-<fresh id>`, so its start-up reaper never touches the
//!   containers of a `stevedore serve` runner on the same engine;
//! * output reaches a callback as it is shipped, besides being kept for the result;
//! * the run ends when its one task has a result: the container is removed, and
//!   [`run_local`] waits for the removal before it returns;
//! * an infrastructure failure (the engine failing mid-run) or a setup failure (a missing
//!   image, an unknown runtime, a package without its entry point) is returned as
//!   [`RunnerError::TaskNotRun`] instead of requeueing the task;
//! * user retries (`retries` of the code) are not applied: one local run is one attempt.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use stevedore_engine::ContainerEngine;
use stevedore_model::limits::{DEFAULT_MAX_PAYLOAD_BYTES, MAX_TIMEOUT_SECS};
use stevedore_model::log::plan_log_append;
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_model::{
    Clock, CodeKind, CodeRevision, CodeSpec, Event, NewTask, RegistryCredential, Task, TaskOutcome,
    TaskStatus, Timestamp, ValidationError, new_id, transition,
};
use stevedore_model::{HeartbeatReply, Lease, LeaseRequest, LeasedTask, RunReport};
use tokio_util::sync::CancellationToken;

use crate::config::RunnerConfig;
use crate::error::{RunnerError, SourceError};
use crate::registry::local_run_credential;
use crate::runner::Runner;
use crate::source::{PackageDownload, RequeueRequest, TaskSource};

/// Receives a local task's output as it is shipped (stdout and stderr together, as the log
/// stores them), up to the log cap and its truncation marker.
pub type LogSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// One task to run locally: the task as if it had just been queued, the code revision it
/// runs, and the code's zip package for runtime codes. [`LocalRun::new`] builds it from a
/// code spec and a payload.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRun {
    pub task: Task,
    pub code: CodeRevision,
    pub package: Option<Vec<u8>>,
}

/// How a local run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalResult {
    pub task_id: String,
    /// The runner id the run used: the `stevedore.runner` label its container carried.
    pub runner_id: String,
    /// `complete`, `error` (a non-zero exit, out of memory), `timeout` or `cancelled`.
    pub status: TaskStatus,
    /// The container's exit code (137 when it was killed at its memory limit); `None` when
    /// it was killed for its timeout or a cancel.
    pub exit_code: Option<i64>,
    /// The task's message: why it failed, or else the last progress message.
    pub msg: Option<String>,
    /// The last progress percent the task reported.
    pub percent: Option<u8>,
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_time_ms: Option<u64>,
    /// The whole log, as a server would store it (capped, with the truncation marker).
    pub log: Vec<u8>,
}

/// The project id local tasks and codes carry.
const LOCAL_PROJECT: &str = "local";
/// The one lease token of a local task.
const LOCAL_TOKEN: i64 = 1;
/// Bookkeeping is in memory, so heartbeats are cheap: frequent ones make a cancel quick.
const LOCAL_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// How often output reaches the log callback, at most.
const LOCAL_LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

// === impl LocalRun ===

impl LocalRun {
    /// A run of `spec` with `payload`, as if `spec` had just been pushed as revision 1 of a
    /// new code (with `package` for a runtime code) and a task queued for it with the code's
    /// defaults: its priority, its timeout (`limits.timeout_secs`), the default cluster, no
    /// delay. Refuses what the server would refuse: an invalid spec, a payload over the
    /// default limit, a runtime code without a package. An image code's package, like the
    /// server's, is unpacked into `TASK_DIR`.
    pub fn new(
        spec: CodeSpec,
        payload: String,
        package: Option<Vec<u8>>,
        now: Timestamp,
    ) -> Result<LocalRun, ValidationError> {
        spec.validate()?;
        if matches!(spec.kind, CodeKind::Runtime { .. }) && package.is_none() {
            return Err(ValidationError::new(
                "package",
                "a code with a runtime needs a zip package",
            ));
        }
        let new_task = NewTask {
            code_name: spec.name.clone(),
            payload,
            priority: spec.default_priority,
            timeout_secs: spec.limits.timeout_secs,
            delay_secs: 0,
            label: None,
            cluster: DEFAULT_CLUSTER.to_owned(),
            retry_count: 0,
            original_task_id: None,
            schedule_id: None,
            code_rev: Some(1),
        };
        new_task.validate(DEFAULT_MAX_PAYLOAD_BYTES)?;
        let code_id = new_id();
        let code = CodeRevision {
            id: code_id.clone(),
            project_id: LOCAL_PROJECT.to_owned(),
            rev: 1,
            spec,
            package_sha256: None,
            package_size: package.as_ref().map(|zip| zip.len() as u64),
            created_at: now,
            updated_at: now,
            paused: false,
        };
        let task = Task::queued(LOCAL_PROJECT, &code_id, 1, &new_task, now);
        Ok(LocalRun {
            task,
            code,
            package,
        })
    }

    /// The same run with another timeout, seconds from container start (1 to a day).
    pub fn with_timeout(mut self, timeout_secs: u32) -> Result<LocalRun, ValidationError> {
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
            return Err(ValidationError::new(
                "timeout",
                format!("must be between 1 and {MAX_TIMEOUT_SECS} seconds, got {timeout_secs}"),
            ));
        }
        self.task.timeout_secs = timeout_secs;
        Ok(self)
    }
}

/// Runs one task to its end in a container on `engine`, as a runner configured by `config`
/// would, and returns how it ended once its container is removed.
///
/// From `config` come the stacks, registry credentials, pids limit, log cap and
/// `allow_unlimited_memory`; the runner id (`local-<id>`), cluster, capacity (1), memory
/// budget (the task's limit), heartbeat and log flush intervals are the local run's own.
/// `clock` stamps the task's bookkeeping; the container's own times are the engine's.
///
/// `on_log` gets the output while the task runs. Cancelling `cancel` kills the container
/// (within about a fifth of a second once it runs) and the run ends `cancelled`.
///
/// Returns once the container is removed. When the engine refuses the removal, it is
/// retried for about a minute, as in production, and then left with a logged error.
///
/// Errors: the runner's start-up refusals ([`RunnerError::EngineUnavailable`],
/// [`RunnerError::EngineCannotEnforceLimits`], [`RunnerError::InvalidConfig`]), and
/// [`RunnerError::TaskNotRun`] when the task could not be set up or the infrastructure failed
/// it; the task is not tried again. A code's `retries` are not applied locally.
pub async fn run_local(
    engine: Arc<dyn ContainerEngine>,
    config: RunnerConfig,
    run: LocalRun,
    clock: Arc<dyn Clock>,
    on_log: LogSink,
    cancel: CancellationToken,
) -> Result<LocalResult, RunnerError> {
    let runner_id = format!("local-{}", new_id());
    let config = RunnerConfig {
        runner_id: runner_id.clone(),
        clusters: vec![run.task.cluster.clone()],
        capacity: Some(1),
        memory_budget_mib: Some(u64::from(run.code.spec.limits.memory_mib)),
        heartbeat_interval: config.heartbeat_interval.min(LOCAL_HEARTBEAT_INTERVAL),
        log_flush_interval: config.log_flush_interval.min(LOCAL_LOG_FLUSH_INTERVAL),
        ..config
    };
    // Whoever runs a task locally runs it as its project: the configured credentials for the
    // image's registry are that project's own.
    let credential = local_run_credential(&run.code, &config.registry_auth);
    let source = Arc::new(LocalTaskSource::new(run, credential, clock, on_log));
    let runner = Runner::new(config, Arc::clone(&source) as Arc<dyn TaskSource>, engine);
    let started = runner.start().await?;

    let shutdown = CancellationToken::new();
    let running = runner.run_started(started, shutdown.clone());
    tokio::pin!(running);
    let mut cancel_forwarded = false;
    loop {
        tokio::select! {
            () = &mut running => break,
            () = source.ended.cancelled() => {
                // The result is recorded: stop leasing, and let the runner finish its
                // teardown (it waits for the container's removal).
                shutdown.cancel();
                (&mut running).await;
                break;
            }
            () = cancel.cancelled(), if !cancel_forwarded => {
                cancel_forwarded = true;
                source.request_cancel();
            }
        }
    }
    source.result(runner_id)
}

/// The in-memory [`TaskSource`] of a local run: one task, leased once, never requeued.
struct LocalTaskSource {
    state: Mutex<LocalState>,
    clock: Arc<dyn Clock>,
    on_log: LogSink,
    /// Cancelled once the task has its ending.
    ended: CancellationToken,
}

struct LocalState {
    task: Task,
    code: CodeRevision,
    package: Option<Vec<u8>>,
    /// The credential the task's lease carries for its image's registry.
    registry_credential: Option<RegistryCredential>,
    leased: bool,
    log: Vec<u8>,
    log_truncated: bool,
    ending: Option<LocalEnding>,
}

/// How the local task ended, as the runner reported it.
#[derive(Debug, Clone)]
enum LocalEnding {
    Completed(TaskOutcome),
    /// The runner gave the task back: the infrastructure failed it.
    GaveBack(String),
    /// Cancelled before it was leased.
    CancelledQueued,
}

// === impl LocalTaskSource ===

impl LocalTaskSource {
    fn new(
        run: LocalRun,
        registry_credential: Option<RegistryCredential>,
        clock: Arc<dyn Clock>,
        on_log: LogSink,
    ) -> Self {
        LocalTaskSource {
            state: Mutex::new(LocalState {
                task: run.task,
                code: run.code,
                package: run.package,
                registry_credential,
                leased: false,
                log: Vec::new(),
                log_truncated: false,
                ending: None,
            }),
            clock,
            on_log,
            ended: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LocalState> {
        // Every update leaves the state consistent, so a panic elsewhere does not matter.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A user's cancel, as the store applies it: a task not yet leased ends at once, a leased
    /// one is flagged for the runner, which learns it from its next heartbeat.
    fn request_cancel(&self) {
        let now = self.clock.now();
        let mut state = self.lock();
        if state.task.status.is_terminal() {
            return;
        }
        if state.leased {
            state.task.cancel_requested = true;
            state.task.updated_at = now;
            return;
        }
        if state.apply(&Event::Cancelled, now).is_ok() {
            state.task.end_time = Some(now);
            state.task.msg = TaskOutcome::Cancelled.message();
            state.ending = Some(LocalEnding::CancelledQueued);
            drop(state);
            self.ended.cancel();
        }
    }

    /// The result of the run, once it is over.
    fn result(&self, runner_id: String) -> Result<LocalResult, RunnerError> {
        let state = self.lock();
        let task = &state.task;
        match &state.ending {
            Some(LocalEnding::Completed(TaskOutcome::SetupFailed { message })) => {
                Err(RunnerError::TaskNotRun {
                    reason: message.clone(),
                    infrastructure: false,
                })
            }
            Some(LocalEnding::GaveBack(reason)) => Err(RunnerError::TaskNotRun {
                reason: reason.clone(),
                infrastructure: true,
            }),
            Some(LocalEnding::Completed(_) | LocalEnding::CancelledQueued) => Ok(LocalResult {
                task_id: task.id.clone(),
                runner_id,
                status: task.status,
                exit_code: task.exit_code,
                msg: task.msg.clone(),
                percent: task.percent,
                start_time: task.start_time,
                end_time: task.end_time,
                peak_memory_bytes: task.peak_memory_bytes,
                cpu_time_ms: task.cpu_time_ms,
                log: state.log.clone(),
            }),
            None => Err(RunnerError::TaskNotRun {
                reason: "the runner stopped before the task had a result".to_owned(),
                infrastructure: true,
            }),
        }
    }

    /// The lease check every write about the task goes through, as the store's.
    fn leased(&self, task_id: &str, token: i64) -> Result<MutexGuard<'_, LocalState>, SourceError> {
        let state = self.lock();
        if !state.leased
            || token != LOCAL_TOKEN
            || task_id != state.task.id
            || state.task.status.is_terminal()
        {
            return Err(SourceError::StaleLease {
                task_id: task_id.to_owned(),
            });
        }
        Ok(state)
    }

    fn end(&self, mut state: MutexGuard<'_, LocalState>, ending: LocalEnding) {
        state.ending = Some(ending);
        drop(state);
        self.ended.cancel();
    }
}

// === impl LocalState ===

impl LocalState {
    /// The one place the local task's status changes, through the model's transition.
    fn apply(&mut self, event: &Event, now: Timestamp) -> Result<(), SourceError> {
        self.task.status =
            transition(self.task.status, event).map_err(|error| SourceError::Refused {
                message: error.to_string(),
            })?;
        self.task.updated_at = now;
        Ok(())
    }

    /// Appends to the log with the store's plan (`model::log`): at most `cap` bytes in all,
    /// the last of them the truncation marker. Returns what was added to the end, for the
    /// log callback.
    fn append_log(&mut self, bytes: &[u8], cap: u64) -> Vec<u8> {
        let size = u64::try_from(self.log.len()).unwrap_or(u64::MAX);
        let Some(plan) = plan_log_append(size, self.log_truncated, bytes, cap) else {
            return Vec::new();
        };
        let at = |offset: u64| usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(kept) = plan.truncate_to {
            self.log.truncate(at(kept));
        }
        let mut added = Vec::new();
        for (offset, chunk) in &plan.chunks {
            self.log.truncate(at(*offset));
            self.log.extend_from_slice(chunk);
            added.extend_from_slice(chunk);
        }
        self.log_truncated = plan.truncated;
        added
    }
}

#[async_trait]
impl TaskSource for LocalTaskSource {
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError> {
        let now = self.clock.now();
        let mut state = self.lock();
        if state.leased
            || request.max_tasks == 0
            || !request.clusters.contains(&state.task.cluster)
            || state.apply(&Event::Leased, now).is_err()
        {
            return Ok(Vec::new());
        }
        state.leased = true;
        state.task.runner_id = Some(request.runner_id.clone());
        Ok(vec![LeasedTask {
            task: state.task.clone(),
            code: state.code.clone(),
            lease: Lease {
                token: LOCAL_TOKEN,
                expires_at: now + chrono::Duration::seconds(i64::from(request.lease_secs)),
            },
            registry_credential: state.registry_credential.clone(),
        }])
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, SourceError> {
        let now = self.clock.now();
        let state = self.leased(task_id, token)?;
        Ok(HeartbeatReply {
            expires_at: now + chrono::Duration::seconds(i64::from(lease_secs)),
            cancel_requested: state.task.cancel_requested,
        })
    }

    async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), SourceError> {
        let now = self.clock.now();
        let mut state = self.leased(task_id, token)?;
        state.apply(&Event::Started, now)?;
        state.task.start_time = Some(now);
        state.task.msg = None;
        Ok(())
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, SourceError> {
        let (added, stored) = {
            let mut state = self.leased(task_id, token)?;
            let added = state.append_log(bytes, cap);
            state.task.log_size = state.log.len() as u64;
            (added, state.task.log_size)
        };
        // Outside the lock: the callback may write to a slow terminal.
        if !added.is_empty() {
            (self.on_log)(&added);
        }
        Ok(stored)
    }

    async fn progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
    ) -> Result<(), SourceError> {
        let now = self.clock.now();
        let mut state = self.leased(task_id, token)?;
        if let Some(percent) = percent {
            state.task.percent = Some(percent.min(100));
        }
        if let Some(msg) = msg {
            state.task.msg = Some(msg.to_owned());
        }
        state.task.updated_at = now;
        Ok(())
    }

    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
    ) -> Result<(), SourceError> {
        let now = self.clock.now();
        let mut state = self.leased(task_id, token)?;
        state
            .task
            .finish(outcome, report, now)
            .map_err(|error| SourceError::Refused {
                message: error.to_string(),
            })?;
        self.end(state, LocalEnding::Completed(outcome.clone()));
        Ok(())
    }

    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        request: &RequeueRequest,
    ) -> Result<(), SourceError> {
        let now = self.clock.now();
        let mut state = self.leased(task_id, token)?;
        state.task.infra_attempts = state.task.infra_attempts.saturating_add(1);
        // Not queued again: a local run is one attempt, and a failure is reported at once.
        let ending = if state.task.cancel_requested {
            state.apply(&Event::Cancelled, now)?;
            state.task.msg = TaskOutcome::Cancelled.message();
            LocalEnding::Completed(TaskOutcome::Cancelled)
        } else {
            state.apply(&Event::InfrastructureGaveUp, now)?;
            state.task.msg = Some(request.reason.clone());
            LocalEnding::GaveBack(request.reason.clone())
        };
        state.task.end_time = Some(now);
        state.task.runner_id = None;
        self.end(state, ending);
        Ok(())
    }

    async fn task_package(
        &self,
        task_id: &str,
        token: i64,
    ) -> Result<PackageDownload, SourceError> {
        let state = self.leased(task_id, token)?;
        state
            .package
            .clone()
            .map(PackageDownload::from_bytes)
            .ok_or_else(|| SourceError::NotFound {
                what: format!("the package of code {}", state.code.id),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use stevedore_model::{Limits, ManualClock, RetriesBackoff};

    use super::*;

    fn spec(kind: CodeKind) -> CodeSpec {
        CodeSpec {
            name: "hello".into(),
            kind,
            env_vars: BTreeMap::new(),
            config: None,
            max_concurrency: None,
            retries: 3,
            retries_delay_secs: 60,
            retries_backoff: RetriesBackoff::Fixed,
            default_priority: 1,
            limits: Limits {
                timeout_secs: 90,
                memory_mib: 64,
                cpus: None,
            },
            network: "none".into(),
        }
    }

    fn image() -> CodeKind {
        CodeKind::Image {
            image: "busybox".into(),
            command: Some("true".into()),
        }
    }

    fn now() -> Timestamp {
        chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn local_source(run: LocalRun) -> (LocalTaskSource, Arc<Mutex<Vec<u8>>>) {
        let printed = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&printed);
        let source = LocalTaskSource::new(
            run,
            None,
            Arc::new(ManualClock::new(now())),
            Arc::new(move |bytes: &[u8]| sink.lock().unwrap().extend_from_slice(bytes)),
        );
        (source, printed)
    }

    fn request() -> LeaseRequest {
        LeaseRequest {
            runner_id: "local-x".into(),
            clusters: vec![DEFAULT_CLUSTER.into()],
            max_tasks: 1,
            lease_secs: 30,
            owner: None,
        }
    }

    #[test]
    fn a_local_run_is_a_queued_task_of_revision_1_with_the_codes_defaults() {
        let run = LocalRun::new(spec(image()), "{\"a\":1}".into(), None, now()).unwrap();
        assert_eq!(run.task.status, TaskStatus::Queued);
        assert_eq!(run.task.timeout_secs, 90);
        assert_eq!(run.task.priority, 1);
        assert_eq!(run.task.payload, "{\"a\":1}");
        assert_eq!(run.task.code_id, run.code.id);
        assert_eq!((run.task.code_rev, run.code.rev), (1, 1));
        assert_eq!(run.task.cluster, DEFAULT_CLUSTER);
        assert_ne!(
            run.task.id,
            LocalRun::new(spec(image()), String::new(), None, now())
                .unwrap()
                .task
                .id
        );
        assert_eq!(run.with_timeout(5).unwrap().task.timeout_secs, 5);
    }

    #[test]
    fn what_the_server_would_refuse_is_refused() {
        let runtime = CodeKind::Runtime {
            runtime: "sh".into(),
            file_name: "run.sh".into(),
            stack: None,
        };
        let refused = |spec: CodeSpec, payload: &str, package: Option<Vec<u8>>| {
            LocalRun::new(spec, payload.into(), package, now())
                .unwrap_err()
                .field
        };
        assert_eq!(refused(spec(runtime.clone()), "", None), "package");
        // An image code may come with a package, unpacked beside the image's command.
        assert!(LocalRun::new(spec(image()), String::new(), Some(vec![1]), now()).is_ok());
        let too_big = "x".repeat(DEFAULT_MAX_PAYLOAD_BYTES + 1);
        assert_eq!(refused(spec(image()), &too_big, None), "payload");
        let mut bad = spec(image());
        bad.limits.memory_mib = 1;
        assert_eq!(refused(bad, "", None), "memory");
        assert!(LocalRun::new(spec(runtime), String::new(), Some(vec![1]), now()).is_ok());
        let run = LocalRun::new(spec(image()), String::new(), None, now()).unwrap();
        assert_eq!(run.with_timeout(0).unwrap_err().field, "timeout");
    }

    #[tokio::test]
    async fn the_task_is_leased_once_and_fenced_like_a_stored_one() {
        let run = LocalRun::new(spec(image()), String::new(), None, now()).unwrap();
        let id = run.task.id.clone();
        let (source, _) = local_source(run);
        let other_cluster = LeaseRequest {
            clusters: vec!["gpu".into()],
            ..request()
        };
        assert!(source.lease(&other_cluster).await.unwrap().is_empty());
        let leased = source.lease(&request()).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].task.status, TaskStatus::Preparing);
        assert!(source.lease(&request()).await.unwrap().is_empty());
        assert!(matches!(
            source.heartbeat(&id, 2, 30).await,
            Err(SourceError::StaleLease { .. })
        ));
        // A task that never started cannot exit.
        assert!(matches!(
            source
                .complete(
                    &id,
                    1,
                    &TaskOutcome::Exited { exit_code: 0 },
                    &RunReport::default()
                )
                .await,
            Err(SourceError::Refused { .. })
        ));
        source.mark_running(&id, 1).await.unwrap();
        source
            .complete(
                &id,
                1,
                &TaskOutcome::Exited { exit_code: 0 },
                &RunReport::default(),
            )
            .await
            .unwrap();
        assert!(source.ended.is_cancelled());
        assert!(matches!(
            source.mark_running(&id, 1).await,
            Err(SourceError::StaleLease { .. })
        ));
    }

    #[tokio::test]
    async fn a_cancel_reaches_the_runner_through_the_heartbeat() {
        let run = LocalRun::new(spec(image()), String::new(), None, now()).unwrap();
        let id = run.task.id.clone();
        let (source, _) = local_source(run);
        source.lease(&request()).await.unwrap();
        assert!(!source.heartbeat(&id, 1, 30).await.unwrap().cancel_requested);
        source.request_cancel();
        assert!(source.heartbeat(&id, 1, 30).await.unwrap().cancel_requested);
        assert!(!source.ended.is_cancelled());

        // Not leased yet: cancelled at once.
        let run = LocalRun::new(spec(image()), String::new(), None, now()).unwrap();
        let (source, _) = local_source(run);
        source.request_cancel();
        assert!(source.ended.is_cancelled());
        assert!(source.lease(&request()).await.unwrap().is_empty());
        let result = source.result("local-x".into()).unwrap();
        assert_eq!(result.status, TaskStatus::Cancelled);
    }

    #[tokio::test]
    async fn an_infrastructure_failure_ends_the_run_instead_of_requeueing() {
        let run = LocalRun::new(spec(image()), String::new(), None, now()).unwrap();
        let id = run.task.id.clone();
        let (source, _) = local_source(run);
        source.lease(&request()).await.unwrap();
        let request = RequeueRequest {
            reason: "infrastructure failure while creating the container: boom".into(),
            delay: Duration::from_secs(2),
            max_infra_attempts: 5,
        };
        source.requeue(&id, 1, &request).await.unwrap();
        assert!(source.ended.is_cancelled());
        assert!(
            source
                .lease(&super::tests::request())
                .await
                .unwrap()
                .is_empty()
        );
        match source.result("local-x".into()) {
            Err(RunnerError::TaskNotRun {
                reason,
                infrastructure: true,
            }) => assert!(reason.contains("boom"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_log_is_capped_like_a_stored_one_and_printed_as_kept() {
        let run = LocalRun::new(spec(image()), String::new(), None, now()).unwrap();
        let id = run.task.id.clone();
        let (source, printed) = local_source(run);
        source.lease(&request()).await.unwrap();
        source.mark_running(&id, 1).await.unwrap();
        let cap = 100;
        assert_eq!(source.append_log(&id, 1, b"hello\n", cap).await.unwrap(), 6);
        let stored = source.append_log(&id, 1, &[b'x'; 500], cap).await.unwrap();
        assert_eq!(stored, cap);
        assert_eq!(source.append_log(&id, 1, b"more", cap).await.unwrap(), cap);
        let log = source.lock().log.clone();
        assert_eq!(log.len(), 100);
        assert!(log.starts_with(b"hello\nxxx"));
        assert!(log.ends_with(b"\n[stevedore: log truncated at 100 bytes]\n"));
        assert_eq!(*printed.lock().unwrap(), log);
    }

    #[tokio::test]
    async fn the_package_is_served_only_to_the_lease_holder() {
        let runtime = CodeKind::Runtime {
            runtime: "sh".into(),
            file_name: "run.sh".into(),
            stack: None,
        };
        let run = LocalRun::new(spec(runtime), String::new(), Some(vec![7, 7]), now()).unwrap();
        let id = run.task.id.clone();
        let (source, _) = local_source(run);
        let stale = |result: Result<PackageDownload, SourceError>| {
            assert!(
                matches!(result, Err(SourceError::StaleLease { .. })),
                "{result:?}"
            );
        };
        stale(source.task_package(&id, LOCAL_TOKEN).await);
        source.lease(&request()).await.unwrap();
        let download = source.task_package(&id, LOCAL_TOKEN).await.unwrap();
        assert_eq!(download.size, 2);
        let chunks: Vec<_> = futures::StreamExt::collect(download.chunks).await;
        let bytes: Vec<u8> = chunks
            .into_iter()
            .flat_map(|chunk| chunk.unwrap().to_vec())
            .collect();
        assert_eq!(bytes, vec![7, 7]);
        stale(source.task_package(&id, LOCAL_TOKEN + 1).await);
        stale(source.task_package("other", LOCAL_TOKEN).await);
    }

    #[tokio::test]
    async fn an_image_codes_run_has_no_package() {
        let run = LocalRun::new(spec(image()), String::new(), None, now()).unwrap();
        let id = run.task.id.clone();
        let (source, _) = local_source(run);
        source.lease(&request()).await.unwrap();
        assert!(matches!(
            source.task_package(&id, LOCAL_TOKEN).await,
            Err(SourceError::NotFound { .. })
        ));
    }
}
