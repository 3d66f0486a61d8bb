//! [`Runner`]: start-up checks, the reaper, the lease loop and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use stevedore_engine::{ContainerEngine, EngineCapabilities, Requirements, check_required};
use stevedore_metrics::ContainerOperation;
use stevedore_model::{LeaseRequest, LeasedTask, WorkSignal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::Admission;
use crate::attempt::{self, TaskContext, engine_call};
use crate::config::{ResolvedLimits, RunnerConfig};
use crate::container::LABEL_RUNNER;
use crate::error::RunnerError;
use crate::images::ImageUses;
use crate::ledger::LeaseLedger;
use crate::registry::PublicImages;
use crate::source::TaskSource;
use crate::spool::PackageSpool;

/// Leases tasks from a [`TaskSource`] and runs each in its own container on a
/// [`ContainerEngine`]. One runner per engine; [`Runner::run`] until shutdown.
pub struct Runner {
    config: RunnerConfig,
    source: Arc<dyn TaskSource>,
    engine: Arc<dyn ContainerEngine>,
    work: Arc<Notify>,
}

/// Tells a runner that work may be waiting, so it leases now instead of at its next poll.
/// The server calls it after queueing tasks; a lost or extra notification is harmless.
#[derive(Debug, Clone)]
pub struct WorkNotifier(Arc<Notify>);

/// The lease loop's growing pause while there is no work.
#[derive(Debug)]
struct IdleBackoff {
    max: Duration,
    next: Duration,
}

/// A runner that passed its start-up checks: proof for [`Runner::run_started`].
#[derive(Debug)]
pub struct StartedRunner {
    limits: ResolvedLimits,
    ledger: Option<Arc<LeaseLedger>>,
    spool: PackageSpool,
}

/// How many containers left by an earlier life are removed at once at start-up.
const REAP_CONCURRENCY: usize = 8;

/// Waits for the source's work signal; forever when it has none.
async fn notified(signal: &mut Option<WorkSignal>) {
    match signal {
        Some(signal) => signal.notified().await,
        None => std::future::pending().await,
    }
}

// === impl Runner ===

impl Runner {
    pub fn new(
        config: RunnerConfig,
        source: Arc<dyn TaskSource>,
        engine: Arc<dyn ContainerEngine>,
    ) -> Self {
        Runner {
            config,
            source,
            engine,
            work: Arc::new(Notify::new()),
        }
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// A handle that wakes the lease loop.
    pub fn work_notifier(&self) -> WorkNotifier {
        WorkNotifier(Arc::clone(&self.work))
    }

    /// Checks the configuration and the engine, then removes what an earlier life of this
    /// runner left behind (containers, spooled packages). Separate from
    /// [`Runner::run_started`] so that a caller can refuse to start (with the error) before
    /// it serves anything.
    ///
    /// Refuses when the configuration is invalid, the engine does not answer, the engine
    /// cannot enforce memory limits (unless `allow_unlimited_memory`), the task network
    /// cannot be set up and isolated (unless its `unguarded` is set), or the work directory
    /// cannot be used.
    pub async fn start(&self) -> Result<StartedRunner, RunnerError> {
        let config = &self.config;
        config.validate()?;
        let capabilities = self
            .engine
            .capabilities()
            .await
            .map_err(RunnerError::EngineUnavailable)?;
        let requirements = Requirements {
            memory_limit: true,
            swap_limit: false,
            cpu_quota: config.default_cpus.is_some(),
            pids_limit: config.pids_limit.is_some(),
            allow_unenforced_memory_limit: config.allow_unlimited_memory,
        };
        check_required(&capabilities, &requirements)
            .map_err(RunnerError::EngineCannotEnforceLimits)?;
        let mut limits = config.resolve(capabilities.ncpu, capabilities.mem_total);
        log_engine(&capabilities);
        limits.cpu_group = self.cpu_group(capabilities.ncpu).await?;
        crate::network::prepare(self.engine.as_ref(), &config.network).await?;
        tracing::info!(
            runner_id = %config.runner_id,
            clusters = ?config.clusters,
            capacity = limits.capacity,
            memory_budget_mib = limits.memory_budget_mib,
            default_cpus = ?config.default_cpus,
            cpu_group = ?limits.cpu_group,
            "runner starting"
        );
        let ledger = match &config.lease_ledger {
            Some(dir) => Some(Arc::new(
                LeaseLedger::open(dir).map_err(RunnerError::LeaseLedger)?,
            )),
            None => None,
        };
        let spool = PackageSpool::open(&config.work_dir, &config.runner_id)
            .await
            .map_err(|source| RunnerError::WorkDir {
                path: config.work_dir.display().to_string(),
                source,
            })?;
        self.reap().await;
        self.release_held().await;
        Ok(StartedRunner {
            limits,
            ledger,
            spool,
        })
    }

    /// Makes sure of the CPU group that holds the reserve, when there is one. An engine that
    /// cannot cap a group (another host, not root, systemd's cgroups) runs tasks without the
    /// reserve, loudly: refusing would stop `serve` for a safeguard of its own API.
    async fn cpu_group(&self, ncpu: u64) -> Result<Option<String>, RunnerError> {
        let Some(task_cpus) = self.config.task_cpus(ncpu)? else {
            return Ok(None);
        };
        let name = self.config.cpu_group_name();
        match self.engine.ensure_cpu_group(&name, task_cpus).await {
            Ok(()) => Ok(Some(name)),
            Err(error @ stevedore_engine::EngineError::LimitUnenforceable { .. }) => {
                tracing::warn!(
                    %error,
                    reserve_cpus = self.config.reserve_cpus,
                    "the CPU reserve cannot be held: tasks may take every core"
                );
                Ok(None)
            }
            Err(error) => Err(RunnerError::EngineUnavailable(error)),
        }
    }

    /// [`Runner::start`], then [`Runner::run_started`].
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), RunnerError> {
        let started = self.start().await?;
        self.run_started(started, shutdown).await;
        Ok(())
    }

    /// Runs until `shutdown` is cancelled, then stops leasing at once, lets running tasks
    /// finish within the grace period, kills and requeues the rest, and returns once every
    /// container it created is removed.
    pub async fn run_started(&self, started: StartedRunner, shutdown: CancellationToken) {
        let config = &self.config;
        let StartedRunner {
            limits,
            spool,
            ledger,
        } = started;
        let cpu_group = limits.cpu_group.clone();
        let admission = Admission::new(
            limits.capacity,
            limits.memory_budget_mib,
            self.config.prepare_ahead,
        );
        let context = Arc::new(TaskContext {
            config: config.clone(),
            source: Arc::clone(&self.source),
            engine: Arc::clone(&self.engine),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            hard_stop: CancellationToken::new(),
            engine_suspect: AtomicBool::new(false),
            public_images: PublicImages::default(),
            cpu_group,
            image_uses: Arc::new(match &config.lease_ledger {
                Some(dir) => ImageUses::kept_in(dir),
                None => ImageUses::default(),
            }),
            ledger,
            spool: spool.clone(),
        });
        if let Some(budget_mib) = config.image_disk_budget_mib {
            context.tracker.spawn(
                crate::images::janitor(
                    Arc::clone(&self.engine),
                    Arc::clone(&context.image_uses),
                    budget_mib << 20,
                    stack_images(config),
                    config.image_janitor_interval,
                    shutdown.clone(),
                )
                .in_current_span(),
            );
        }
        if let Some(interval) = config.reap_gone_interval {
            context.tracker.spawn(
                crate::gone::reap_gone_runners(
                    Arc::clone(&self.engine),
                    Arc::clone(&self.source),
                    config.runner_id.clone(),
                    interval,
                    shutdown.clone(),
                )
                .in_current_span(),
            );
        }
        self.lease_loop(&context, &admission, &shutdown).await;

        let running = context.tracker.len();
        tracing::info!(
            running,
            grace_ms = config.shutdown_grace.as_millis(),
            "runner shutting down: no more leases"
        );
        context.tracker.close();
        if tokio::time::timeout(config.shutdown_grace, context.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = context.tracker.len(),
                "the grace period is over: killing and requeueing the remaining tasks"
            );
            context.hard_stop.cancel();
            context.tracker.wait().await;
        }
        // Every task is over: what the engine kept ready for the next ones goes, and whatever
        // still carries this runner's label is garbage that a failed removal left (the engine
        // was down at the time).
        self.engine.release_idle().await;
        self.reap().await;
        spool.close();
        if let Some(group) = &limits.cpu_group
            && let Err(error) = self.engine.remove_cpu_group(group).await
        {
            tracing::debug!(%error, group, "the CPU group stays");
        }
        tracing::info!("runner stopped");
    }

    /// Gives back what an earlier life of this runner id still holds: its containers were
    /// just reaped, so those tasks run nowhere. A source that cannot be reached now leaves
    /// them to the rescuer, which requeues them when their leases expire.
    async fn release_held(&self) {
        let config = &self.config;
        match self
            .source
            .release_held(&config.runner_id, config.max_infra_attempts)
            .await
        {
            Ok(0) => {}
            Ok(released) => tracing::info!(
                released,
                "gave back the tasks an earlier life of this runner held"
            ),
            Err(error) => tracing::warn!(
                %error,
                "cannot give back the tasks an earlier life of this runner held; they are \
                 requeued when their leases expire"
            ),
        }
    }

    /// Removes every container with this runner's label: at start-up what an earlier life
    /// left behind, at shutdown what a failed removal left.
    async fn reap(&self) {
        let runner_id = &self.config.runner_id;
        let leftovers = match self.engine.list_labeled(LABEL_RUNNER, runner_id).await {
            Ok(leftovers) => leftovers,
            Err(error) => {
                tracing::warn!(%error, "cannot list leftover containers to reap them");
                return;
            }
        };
        if leftovers.is_empty() {
            return;
        }
        let count = remove_containers(
            self.engine.as_ref(),
            leftovers,
            "reaped a leftover container",
        )
        .await;
        tracing::info!(count, "reaped leftover containers");
    }

    async fn lease_loop(
        &self,
        context: &Arc<TaskContext>,
        admission: &Arc<Admission>,
        shutdown: &CancellationToken,
    ) {
        let config = &self.config;
        let mut idle = IdleBackoff::new(config.idle_poll_interval);
        let mut released = admission.subscribe();
        // Work queued through another server on the same database.
        let mut shared_work = self.source.work_signal();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if context.engine_suspect.swap(false, Ordering::Relaxed)
                && !self.wait_for_engine(shutdown).await
            {
                return;
            }
            // Every slot taken: perhaps a task to prepare ahead (see `admission`).
            let (wanted, ahead) = match admission.lease_size() {
                0 => (admission.ahead_size(), true),
                free => (free, false),
            };
            if wanted == 0 {
                // Wakes as soon as a running task gives its slot or memory back.
                tokio::select! {
                    _ = released.changed() => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            released.mark_unchanged();
            let request = LeaseRequest {
                runner_id: config.runner_id.clone(),
                clusters: config.clusters.clone(),
                max_tasks: wanted,
                lease_secs: config.lease_secs,
                owner: None,
            };
            // Not raced against shutdown: a lease granted and then dropped unseen would sit
            // until it expired. Tasks leased after shutdown give themselves back at once.
            let pause = match self.source.lease(&request).await {
                Ok(tasks) if tasks.is_empty() => idle.next_pause(),
                Ok(tasks) => {
                    idle.reset();
                    for leased in tasks {
                        self.spawn_attempt(context, admission, leased, ahead);
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "leasing failed");
                    config.idle_poll_interval
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.work.notified() => idle.reset(),
                () = notified(&mut shared_work) => idle.reset(),
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn spawn_attempt(
        &self,
        context: &Arc<TaskContext>,
        admission: &Arc<Admission>,
        leased: LeasedTask,
        ahead: bool,
    ) {
        let slot = if ahead {
            admission.take_ahead()
        } else {
            admission.take()
        };
        tracing::debug!(
            task_id = %leased.task.id,
            ahead,
            used = admission.capacity().saturating_sub(admission.lease_size()),
            capacity = admission.capacity(),
            memory_budget_mib = admission.memory_budget_mib(),
            "task leased"
        );
        context
            .tracker
            .spawn(attempt::run(Arc::clone(context), leased, slot).in_current_span());
    }

    /// After an infrastructure failure: waits until the engine answers again before leasing
    /// more work, so an engine that is down does not burn through the queue's infrastructure
    /// attempts. Returns false when shutdown came first.
    async fn wait_for_engine(&self, shutdown: &CancellationToken) -> bool {
        let mut pause = Duration::from_millis(200);
        loop {
            match self.engine.capabilities().await {
                Ok(_) => return true,
                Err(error) => {
                    tracing::warn!(%error, "the container engine does not answer; not leasing");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return false,
            }
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The images the janitor never removes: every stack's (the local ones cannot be pulled
/// again, the others are what most tasks run on).
/// Removes the containers `ids`, a few at a time, logging each with `what`; how many went.
/// Failures are logged and left for the next look.
pub(crate) async fn remove_containers(
    engine: &dyn ContainerEngine,
    ids: Vec<stevedore_engine::ContainerId>,
    what: &'static str,
) -> usize {
    let removed = std::sync::atomic::AtomicUsize::new(0);
    futures::stream::iter(ids)
        .for_each_concurrent(REAP_CONCURRENCY, |id| {
            let removed = &removed;
            async move {
                match engine_call(ContainerOperation::Remove, engine.remove(&id)).await {
                    Ok(took) => {
                        removed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(container = %id, took_ms = took.as_millis(), "{what}");
                    }
                    Err(error) => {
                        tracing::warn!(container = %id, %error, "cannot remove a container: {what}");
                    }
                }
            }
        })
        .await;
    removed.into_inner()
}

fn stack_images(config: &RunnerConfig) -> std::collections::HashSet<String> {
    config
        .stacks
        .stacks()
        .iter()
        .map(|stack| stack.image.clone())
        .chain(
            stevedore_model::StackTable::local_builds()
                .into_iter()
                .map(|build| build.image.to_owned()),
        )
        .collect()
}

fn log_engine(capabilities: &EngineCapabilities) {
    tracing::info!(
        server_version = %capabilities.server_version,
        api_version = %capabilities.negotiated_api_version,
        ncpu = capabilities.ncpu,
        mem_total_mib = capabilities.mem_total >> 20,
        cgroup_version = ?capabilities.cgroup_version,
        memory_limit = capabilities.memory_limit,
        swap_limit = capabilities.swap_limit,
        pids_limit = capabilities.pids_limit,
        "container engine"
    );
    for warning in &capabilities.warnings {
        tracing::warn!(warning, "container engine warning");
    }
}

// === impl StartedRunner ===

impl StartedRunner {
    /// The most tasks the runner runs at once, as configured or derived from the engine.
    pub fn capacity(&self) -> u32 {
        self.limits.capacity
    }
}

// === impl WorkNotifier ===

impl WorkNotifier {
    pub fn notify(&self) {
        self.0.notify_one();
    }
}

// === impl IdleBackoff ===

impl IdleBackoff {
    fn new(max: Duration) -> Self {
        IdleBackoff { max, next: max / 8 }
    }

    /// The pause after one more lease that found nothing: an eighth of the maximum after
    /// work was seen, doubling up to the maximum.
    fn next_pause(&mut self) -> Duration {
        let pause = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.next = self.max / 8;
    }
}
