//! One attempt at one leased task, from lease to teardown.
//!
//! ```text
//! leased ─▶ memory reserved ─▶ image present ─▶ package spooled ─▶ created ─▶ output attached
//!                                                                 └ lease confirmed meanwhile ┘
//!        (leased ahead: memory reserved only here, once a slot is given back to the task)
//!        ─▶ started ─▶ mark_running ─▶ supervised (exit | deadline | cancel | lease lost | shutdown)
//!        ─▶ logs drained ─▶ result recorded (complete | requeue | abandoned) ─▶ slot freed
//!        ─▶ container removed in the background
//! ```
//!
//! The container's usage (peak memory, CPU time) comes with its exit when the engine keeps
//! its own account of it ([`stevedore_engine::ContainerRuntime::usage_accounted`]); otherwise
//! its stats are sampled while it runs.
//!
//! Heartbeats run beside all of it: they keep the lease, bring a user's cancellation in, and
//! notice a lost lease. Every failure of the engine is classified by
//! [`EngineError::is_infrastructure`] alone.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use stevedore_engine::{
    ContainerEngine, ContainerId, EngineError, ExitStatus, ImagePresence, LogChunkStream,
    PullProgress, ResourceSampleStream, ResourceUsage, Timestamp, ZipPackage,
};
use stevedore_metrics::ContainerOperation;
use stevedore_model::TaskOutcome;
use stevedore_model::{LeasedTask, RunReport};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::Slot;
use crate::backoff::requeue_delay;
use crate::config::RunnerConfig;
use crate::container::{ContainerPlan, PackagePlan};
use crate::error::SourceError;
use crate::images::{ImageInUse, ImageUses};
use crate::ledger::LeaseLedger;
use crate::logs::{LogShipper, ShippedLogs, skip_output};
use crate::progress::ProgressReporter;
use crate::registry::{ImageAccess, ImageOwner, PublicImages};
use crate::source::{RequeueRequest, TaskSource};
use crate::spool::{PackageSpool, SpoolError, SpooledPackage};

/// What every attempt shares with the runner.
pub(crate) struct TaskContext {
    pub config: RunnerConfig,
    pub source: Arc<dyn TaskSource>,
    pub engine: Arc<dyn ContainerEngine>,
    /// Tracks attempts, their helpers and background removals, so shutdown waits for all.
    pub tracker: TaskTracker,
    /// Shutdown was asked for: tasks that have not started give their lease back.
    pub shutdown: CancellationToken,
    /// The shutdown grace period is over: running containers are killed and requeued.
    pub hard_stop: CancellationToken,
    /// Set when the engine failed in an infrastructure way; the lease loop then checks the
    /// engine answers before it leases more work.
    pub engine_suspect: AtomicBool,
    /// Images found pullable without credentials, whose cached copies need no check.
    pub public_images: PublicImages,
    /// The CPU group every task container goes into (the reserve), when there is one.
    pub cpu_group: Option<String>,
    /// The images tasks used, for the image janitor.
    pub image_uses: Arc<ImageUses>,
    /// Where each attempt writes down until when its lease surely holds, for the watchdog.
    pub ledger: Option<Arc<LeaseLedger>>,
    /// Where code packages are spooled on their way into containers.
    pub spool: PackageSpool,
}

/// How an attempt ended, to be recorded.
#[derive(Debug)]
enum Ending {
    /// The task has a terminal result.
    Finished {
        outcome: TaskOutcome,
        report: RunReport,
    },
    /// The task goes back to the queue: the infrastructure failed, or the runner shuts down.
    Requeue { reason: String, delay: Duration },
    /// The lease is no longer ours: someone else owns the task now. Record nothing.
    Abandon { why: String },
}

/// What supervision of a started container reacts to.
enum Supervision {
    Exited(Result<ExitStatus, EngineError>),
    DeadlineReached,
    CancelRequested,
    LeaseLost,
    ShutdownKill,
}

/// Signals from the heartbeat loop to the attempt.
#[derive(Clone, Default)]
struct Signals {
    /// A user asked to cancel the task.
    cancel: CancellationToken,
    /// The lease is stale.
    lease_lost: CancellationToken,
    /// The attempt is over: heartbeats stop.
    done: CancellationToken,
}

/// Shipping of the engine's kept output after an engine loss; stopped if dropped unfinished
/// (the attempt gave up on the container), so nothing is sent about the task after that.
struct Resumed {
    live: Option<JoinHandle<ShippedLogs>>,
    /// Bytes of what the attachment had read that the kept output did not hold.
    unmatched: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Resumed {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            live.abort();
        }
    }
}

/// How long an attempt waits for an engine that went away, and how long it pauses before
/// asking again.
struct EngineAway {
    give_up: Instant,
    pause: Duration,
}

impl EngineAway {
    fn new() -> Self {
        EngineAway {
            give_up: Instant::now() + ENGINE_RETURN_TIMEOUT,
            pause: Duration::from_millis(250),
        }
    }
}

/// How much of a container's output survived an engine loss, for the note in its log.
#[derive(Debug)]
struct Recovered {
    /// When the engine answered again.
    back_at: Timestamp,
    /// Output bytes the attachment had read before it broke; `None`: unknown.
    read_before: Option<u64>,
    /// The log had reached its cap before: nothing more was to be shipped anyway.
    capped: bool,
    /// The engine's kept output was shorter than what had been read (it rolled over).
    kept_short: bool,
}

impl Recovered {
    /// Why output may be missing from the task's log, if it may.
    fn output_missing(&self, lost_at: Timestamp, status: &ExitStatus) -> Option<&'static str> {
        if self.capped {
            return None;
        }
        if self.read_before.is_none() {
            return Some("what had been shipped is unknown, so the engine's copy was not used");
        }
        if self.kept_short {
            return Some("the engine's copy of the output had rolled over");
        }
        let ended_while_away = status
            .finished_at
            .is_some_and(|finished| finished > lost_at && finished < self.back_at);
        ended_while_away.then_some(
            "the container ended while the engine was away, and what it printed then reached nobody",
        )
    }
}

/// How long to wait for the rest of a container's output to be shipped after it stopped.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long resource sampling may go on after the container stopped (and the log drained).
const USAGE_GRACE: Duration = Duration::from_millis(50);
/// How long to wait for a killed container to be reported stopped.
const KILL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at recording a result while the source is unavailable (about 25 s in all, within
/// the lease that the last heartbeat extended).
const RECORD_ATTEMPTS: u32 = 8;
/// Attempts at removing a container.
const REMOVE_ATTEMPTS: u32 = 8;
/// How long a running task's attempt waits for an engine that went away to come back and
/// say how its container ended, before giving the task back.
const ENGINE_RETURN_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one leased task to its end. The slot is given back once the result is recorded.
pub(crate) async fn run(context: Arc<TaskContext>, leased: LeasedTask, slot: Slot) {
    let span = tracing::info_span!(
        "task",
        task_id = %leased.task.id,
        project_id = %leased.task.project_id,
        code = %leased.task.code_name,
        attempt = leased.task.infra_attempts + 1,
        lease = leased.lease.token,
    );
    Attempt {
        context,
        leased,
        slot,
        signals: Signals::default(),
        container: None,
        started: false,
        image: None,
        package: None,
    }
    .run()
    .instrument(span)
    .await;
}

struct Attempt {
    context: Arc<TaskContext>,
    leased: LeasedTask,
    slot: Slot,
    signals: Signals,
    /// The container, once created: removed at the end whatever happened.
    container: Option<ContainerId>,
    /// Whether the container was started (and so may be running).
    started: bool,
    /// The task's image, kept from the image janitor until the attempt ends.
    image: Option<ImageInUse>,
    /// The spooled code package, until the container is created (or the attempt ends).
    package: Option<SpooledPackage>,
}

// === impl Attempt ===

impl Attempt {
    async fn run(mut self) {
        let ledger = self.context.ledger.clone();
        let task_id = self.leased.task.id.clone();
        let lease = Duration::from_secs(u64::from(self.context.config.lease_secs));
        // Written before any container exists, so the watchdog never meets one without it.
        if let Some(ledger) = &ledger {
            ledger.promise(&task_id, Instant::now() + lease);
        }
        let heartbeats = self.context.tracker.spawn(
            heartbeat_loop(
                Arc::clone(&self.context.source),
                Heartbeat {
                    task_id: task_id.clone(),
                    token: self.leased.lease.token,
                    lease_secs: self.context.config.lease_secs,
                    interval: self.context.config.heartbeat_interval,
                    ledger: ledger.clone(),
                },
                self.signals.clone(),
            )
            .in_current_span(),
        );
        self.mark_retried_attempt().await;
        let ending = self.execute().await;
        if let Some(id) = &self.container
            && self.started
            && matches!(ending, Ending::Abandon { .. } | Ending::Requeue { .. })
        {
            // The task is someone else's or goes back to the queue: its process must stop
            // now, not whenever the background removal gets to it.
            if let Err(error) =
                engine_call(ContainerOperation::Kill, self.context.engine.kill(id)).await
            {
                tracing::debug!(%error, "kill before giving the task up failed");
            }
        }
        self.record(ending).await;
        self.signals.done.cancel();
        let _ = heartbeats.await;
        let Attempt {
            context,
            slot,
            container,
            ..
        } = self;
        drop(slot);
        match container {
            Some(id) => {
                let engine = Arc::clone(&context.engine);
                context.tracker.spawn(
                    async move {
                        remove_container(engine, id).await;
                        if let Some(ledger) = ledger {
                            ledger.release(&task_id);
                        }
                    }
                    .in_current_span(),
                );
            }
            None => {
                if let Some(ledger) = ledger {
                    ledger.release(&task_id);
                }
            }
        }
    }

    /// Starts the log of an attempt after the first with a line saying which attempt this is
    /// and why the last one ended, so that a second run's output is never glued to the first
    /// one's. Best effort: a log that cannot take it now still gets the task's output.
    async fn mark_retried_attempt(&mut self) {
        let task = &self.leased.task;
        if task.infra_attempts == 0 {
            return;
        }
        let line = attempt_line(
            task.infra_attempts + 1,
            task.msg.as_deref().unwrap_or("unknown"),
            task.log_size > 0,
        );
        if let Some(stored) = self.append_note(&line).await {
            self.leased.task.log_size = stored;
        }
    }

    /// Appends a line of stevedore's own to the task's log; the size stored so far. Best
    /// effort: a log that cannot take it now still gets the task's output.
    async fn append_note(&self, line: &str) -> Option<u64> {
        let appended = self
            .context
            .source
            .append_log(
                &self.leased.task.id,
                self.leased.lease.token,
                line.as_bytes(),
                self.context.config.log_cap_bytes,
            )
            .await;
        appended
            .inspect_err(|error| tracing::debug!(%error, line, "a note was not logged"))
            .ok()
    }

    /// The task's outcome from how its container ended.
    fn outcome_of(&self, status: &ExitStatus) -> TaskOutcome {
        if status.oom_killed {
            TaskOutcome::OutOfMemory {
                limit_mib: self.leased.code.spec.limits.memory_mib,
            }
        } else {
            TaskOutcome::Exited {
                exit_code: status.exit_code,
            }
        }
    }

    async fn execute(&mut self) -> Ending {
        let signals = self.signals.clone();
        let shutdown = self.context.shutdown.clone();
        let prepared = tokio::select! {
            biased;
            () = signals.lease_lost.cancelled() => return lease_lost(),
            () = signals.cancel.cancelled() => return cancelled(RunReport::default()),
            () = shutdown.cancelled() => return shutdown_before_start(),
            prepared = self.prepare() => prepared,
        };
        let spec = match prepared {
            Ok(spec) => spec,
            Err(ending) => return ending,
        };
        // Not raced against anything: a create in flight that was dropped could leave a
        // container behind whose id we never learnt. The lease is confirmed meanwhile: the
        // source's answer and the engine's work overlap, and the start still follows the
        // confirmation by no more than a create takes, far within the lease it confirmed (a
        // task leased ahead then waits for a slot, its lease kept by answered heartbeats).
        let (created, confirmed) = tokio::join!(self.create_attached(&spec), self.confirm_lease());
        // The package is in the container now (or never will be): its file goes.
        self.package = None;
        let (id, attached) = match created {
            Ok(created) => created,
            Err(error) => {
                return confirmed
                    .unwrap_or_else(|| self.engine_failed("creating the container", error));
            }
        };
        self.container = Some(id.clone());
        if let Some(ending) = confirmed {
            return ending;
        }
        let output = match attached {
            Ok(output) => output,
            Err(error) => return self.engine_failed("attaching to the container", error),
        };
        if let Some(ending) = self.interrupted_before_start() {
            return ending;
        }
        if !self.slot.is_held()
            && let Some(ending) = self.wait_for_slot().await
        {
            return ending;
        }
        if let Err(error) =
            engine_call(ContainerOperation::Start, self.context.engine.start(&id)).await
        {
            return self.engine_failed("starting the container", error);
        }
        self.started = true;
        // The timeout counts from here: pulling and creating were not the task's time.
        let started_at = Instant::now();
        let deadline = started_at + Duration::from_secs(u64::from(self.leased.task.timeout_secs));
        let (task_id, token) = (self.leased.task.id.clone(), self.leased.lease.token);
        let source = Arc::clone(&self.context.source);
        // Raced against the lease: the container runs while this is retried, and a source
        // gone right after the start (a server killed) would keep it running past the lease,
        // beside the rescued task's next run.
        let marked = tokio::select! {
            biased;
            () = self.signals.lease_lost.cancelled() => return lease_lost(),
            () = self.context.hard_stop.cancelled() => return shutdown_while_running(),
            marked = with_retries("mark the task running", || {
                source.mark_running(&task_id, token)
            }) => marked,
        };
        match marked {
            Ok(()) => {}
            Err(SourceError::StaleLease { .. }) => return lease_lost(),
            Err(error) => {
                return Ending::Requeue {
                    reason: format!("the task could not be marked running: {error}"),
                    delay: self.backoff(),
                };
            }
        }
        tracing::debug!("container started");
        let ending = self.supervise(id, output, deadline).await;
        self.slot.record_run(started_at.elapsed());
        ending
    }

    /// For a task leased ahead, its container created and attached: waits for a slot given
    /// back and then for the task's memory. The lease is kept meanwhile by the heartbeats,
    /// which also bring a cancel or a lost lease in; either ends the wait, and so does a
    /// shutdown, which gives the task back like any task that has not started.
    async fn wait_for_slot(&mut self) -> Option<Ending> {
        let signals = self.signals.clone();
        let shutdown = self.context.shutdown.clone();
        let memory_mib = u64::from(self.leased.code.spec.limits.memory_mib);
        let slot = &mut self.slot;
        tokio::select! {
            biased;
            () = signals.lease_lost.cancelled() => Some(lease_lost()),
            () = signals.cancel.cancelled() => Some(cancelled(RunReport::default())),
            () = shutdown.cancelled() => Some(shutdown_before_start()),
            () = async {
                slot.hold().await;
                slot.reserve_memory(memory_mib).await;
            } => None,
        }
    }

    /// Creates the container. When the engine refuses a container on the managed task
    /// network, the network may have been removed behind the runner's back (a `docker
    /// network prune` while no task ran): it is made sure of again and the create tried once
    /// more. The firewall rules match the bridge by name, so they hold for the new network.
    async fn create(
        &self,
        spec: &stevedore_engine::ContainerSpec,
    ) -> Result<ContainerId, EngineError> {
        let engine = &self.context.engine;
        let managed = &self.context.config.network.spec;
        match engine_call(ContainerOperation::Create, engine.create(spec)).await {
            Err(EngineError::Refused { message })
                if spec.network_mode.as_deref() == Some(managed.name.as_str()) =>
            {
                let missing = matches!(engine.inspect_network(&managed.name).await, Ok(None));
                if !missing {
                    return Err(EngineError::Refused { message });
                }
                tracing::warn!(network = %managed.name, "the task network is gone: creating it again");
                engine.ensure_network(managed).await?;
                engine_call(ContainerOperation::Create, engine.create(spec)).await
            }
            other => other,
        }
    }

    /// Creates the container and attaches to its output, before the start, so the output is
    /// whole from the first byte (the engine's own copy is bounded and read only after an
    /// engine loss). The attach's
    /// failure comes with the container, which exists and must be removed.
    async fn create_attached(
        &self,
        spec: &stevedore_engine::ContainerSpec,
    ) -> Result<(ContainerId, Result<LogChunkStream, EngineError>), EngineError> {
        let id = self.create(spec).await?;
        let output = self.context.engine.attach(&id).await;
        Ok((id, output))
    }

    /// Reserves memory, makes the image present, fetches the package and builds the spec.
    async fn prepare(&mut self) -> Result<stevedore_engine::ContainerSpec, Ending> {
        let memory_mib = u64::from(self.leased.code.spec.limits.memory_mib);
        if !self.slot.fits_budget(memory_mib) {
            return Err(Ending::Requeue {
                reason: format!(
                    "the task needs {memory_mib} MiB of memory, more than this runner's whole \
                     budget of {} MiB",
                    self.slot.budget_mib()
                ),
                delay: self.backoff(),
            });
        }
        // A task leased ahead reserves its memory with its slot, right before its start.
        if self.slot.is_held() {
            self.slot.reserve_memory(memory_mib).await;
        }

        let context = Arc::clone(&self.context);
        let config = &context.config;
        let plan = ContainerPlan::new(&self.leased, &config.stacks).map_err(setup_failed)?;
        // In use before it is made present, so the janitor never takes it in between.
        self.image = Some(self.context.image_uses.acquire(&plan.image));
        self.ensure_image(&plan.image).await?;
        let package = match &plan.package {
            PackagePlan::None => None,
            PackagePlan::Unpack | PackagePlan::UnpackWithEntryPoint(_) => {
                Some(self.fetch_package(plan.package.entry_point()).await?)
            }
        };
        let mut spec = plan
            .spec(&self.leased, config, package)
            .map_err(setup_failed)?;
        spec.cpu_group = self.context.cpu_group.clone();
        Ok(spec)
    }

    /// Makes the image present with the credentials its owner allows (see the `registry`
    /// module), telling the task's progress when it has to be pulled.
    async fn ensure_image(&self, image: &str) -> Result<(), Ending> {
        let access =
            ImageAccess::decide(&self.leased, image, &self.context.config).map_err(setup_failed)?;
        if self.cached_copy_usable(&access, image).await? {
            return Ok(());
        }
        let engine = self.context.engine.as_ref();
        let public = &self.context.public_images;
        let (progress, mut pull_events) = tokio::sync::mpsc::unbounded_channel();
        let ensure = engine_call(
            ContainerOperation::EnsureImage,
            engine.ensure_image(image, access.auth.clone(), Some(progress)),
        );
        tokio::pin!(ensure);
        let config = &self.context.config;
        let deadline = tokio::time::sleep(config.pull_timeout);
        tokio::pin!(deadline);
        let mut pull_started: Option<Instant> = None;
        let mut layers = LayerSizes::default();
        // Dropping `ensure` leaves a pull shared with other tasks to them; the engine stops
        // it when nobody waits any more.
        let presence = loop {
            tokio::select! {
                presence = &mut ensure => break presence,
                () = &mut deadline => {
                    return Err(Ending::Requeue {
                        reason: format!(
                            "infrastructure failure while preparing the image {image}: it was not \
                             pulled within {} s (runner.pull_timeout_secs): the registry is slow \
                             or unreachable",
                            config.pull_timeout.as_secs()
                        ),
                        delay: self.backoff(),
                    });
                }
                Some(event) = pull_events.recv() => {
                    if matches!(event, PullProgress::Started { .. }) && pull_started.is_none() {
                        pull_started = Some(Instant::now());
                        self.report_progress(format!("pulling image {image}")).await;
                    }
                    layers.record(&event);
                    if let Some(max) = config.max_image_bytes
                        && layers.total() > max
                    {
                        return Err(image_too_large(image, max, layers.total(), "its layers' downloads add up to"));
                    }
                }
            }
        };
        if let (Ok(ImagePresence::Pulled), Some(max)) = (&presence, config.max_image_bytes) {
            // Pulled within the download limit, but layers unpack to more than they download.
            let size = engine
                .local_image(image)
                .await
                .ok()
                .flatten()
                .and_then(|local| local.size_bytes);
            if let Some(size) = size.filter(|size| *size > max) {
                return Err(image_too_large(image, max, size, "it takes"));
            }
        }
        match presence {
            // Another task's pull finished in between: this task has not shown access yet.
            Ok(ImagePresence::AlreadyPresent) if access.owner == ImageOwner::Project => {
                self.cached_copy_usable(&access, image).await.map(drop)
            }
            Ok(presence) => {
                access.usable(image, public);
                if presence == ImagePresence::Pulled {
                    self.context.image_uses.pulled();
                }
                if let Some(started) = pull_started {
                    let took = started.elapsed();
                    tracing::info!(image, took_ms = took.as_millis(), "image pulled");
                    self.report_progress(format!(
                        "pulled image {image} in {:.1} s",
                        took.as_secs_f64()
                    ))
                    .await;
                }
                Ok(())
            }
            Err(error) => {
                // A local stack image is never in a registry: say how it is made.
                let local = stevedore_model::StackTable::local_builds()
                    .iter()
                    .any(|build| build.image == image);
                let what = if local {
                    format!(
                        "preparing the image {image} (a local stack image: build it on the runner's machine with `stevedore stack build-local`)"
                    )
                } else {
                    format!("preparing the image {image}")
                };
                Err(self.engine_failed(&what, error))
            }
        }
    }

    /// Whether the image is cached and this task may use that copy (see the `registry`
    /// module); a refusal by the registry ends the task.
    async fn cached_copy_usable(&self, access: &ImageAccess, image: &str) -> Result<bool, Ending> {
        let check = access.cached_copy_usable(
            self.context.engine.as_ref(),
            image,
            &self.context.public_images,
        );
        engine_call(ContainerOperation::EnsureImage, check)
            .await
            .map_err(|error| {
                self.engine_failed(&format!("checking access to the image {image}"), error)
            })
    }

    /// Downloads the code package to the spool and reads its directory, with `entry_point`
    /// to be made executable. The spooled file stays with the attempt until the container is
    /// created. A download that breaks off or does not match its announced size is the
    /// infrastructure's (the task is requeued); a zip that cannot be read is the user's.
    async fn fetch_package(&mut self, entry_point: Option<&str>) -> Result<ZipPackage, Ending> {
        let task = &self.leased.task;
        let token = self.leased.lease.token;
        let source = &self.context.source;
        let fetch_failed = |error: &dyn std::fmt::Display| Ending::Requeue {
            reason: format!("the code package could not be fetched: {error}"),
            delay: self.backoff(),
        };
        let download = match with_retries("fetch the code package", || {
            source.task_package(&task.id, token)
        })
        .await
        {
            Ok(download) => download,
            Err(SourceError::NotFound { .. }) => {
                return Err(setup_failed(format!(
                    "revision {} of code {:?} has no package",
                    task.code_rev, task.code_name
                )));
            }
            Err(SourceError::StaleLease { .. }) => return Err(lease_lost()),
            Err(error) => return Err(fetch_failed(&error)),
        };
        let spooled = match self.context.spool.receive(download, &task.id).await {
            Ok(spooled) => spooled,
            Err(SpoolError::Download(SourceError::StaleLease { .. })) => return Err(lease_lost()),
            Err(error) => return Err(fetch_failed(&error)),
        };
        let path = spooled.path().to_owned();
        self.package = Some(spooled);
        let (opening, entry_point) = (path.clone(), entry_point.map(str::to_owned));
        let opened =
            tokio::task::spawn_blocking(move || ZipPackage::open(opening, entry_point.as_deref()))
                .await
                .unwrap_or_else(|error| {
                    Err(EngineError::LocalIo {
                        path: path.display().to_string(),
                        message: error.to_string(),
                    })
                });
        match opened {
            Ok(package) => {
                tracing::debug!(
                    files = package.file_count(),
                    unpacked_bytes = package.unpacked_bytes(),
                    "code package spooled"
                );
                Ok(package)
            }
            Err(error) => Err(self.engine_failed("reading the code package", error)),
        }
    }

    /// Whether the task was cancelled, lost or shut down while its container was created.
    /// Asks the source whether the lease still holds, while the container is created, right
    /// before it starts. A runner that was cut off while it prepared may hold a lease that
    /// expired meanwhile — the task rescued and perhaps completed by another runner — and
    /// must then not run it again. A confirmed lease lasts `lease_secs` from now, longer than
    /// a create and a start take, and the heartbeat loop keeps extending it.
    async fn confirm_lease(&self) -> Option<Ending> {
        let (task_id, token) = (self.leased.task.id.clone(), self.leased.lease.token);
        let lease_secs = self.context.config.lease_secs;
        let source = Arc::clone(&self.context.source);
        match with_retries("confirm the lease", || {
            source.heartbeat(&task_id, token, lease_secs)
        })
        .await
        {
            Ok(reply) if reply.cancel_requested => Some(cancelled(RunReport::default())),
            Ok(_) => self.interrupted_before_start(),
            Err(SourceError::StaleLease { .. }) => Some(lease_lost()),
            // Nothing answers: the lease cannot be shown to hold, so the task is left to the
            // rescuer rather than run on a lease that may be gone.
            Err(error) => Some(Ending::Abandon {
                why: format!("the lease could not be confirmed before the start: {error}"),
            }),
        }
    }

    fn interrupted_before_start(&self) -> Option<Ending> {
        if self.signals.lease_lost.is_cancelled() {
            Some(lease_lost())
        } else if self.signals.cancel.is_cancelled() {
            Some(cancelled(RunReport::default()))
        } else if self.context.shutdown.is_cancelled() {
            Some(shutdown_before_start())
        } else {
            None
        }
    }

    /// Follows a started container to its end.
    async fn supervise(
        &self,
        id: ContainerId,
        output: LogChunkStream,
        deadline: Instant,
    ) -> Ending {
        let engine = Arc::clone(&self.context.engine);
        let logs = self.ship_logs(output, self.leased.task.log_size);
        // An engine that keeps its own account of the container reports its usage with the
        // exit; otherwise its stats are sampled while it runs.
        let usage = Arc::new(std::sync::Mutex::new(ResourceUsage::default()));
        let sampling = if engine.usage_accounted(&id).await {
            None
        } else {
            Some(
                self.context
                    .tracker
                    .spawn(follow_usage(engine.stats(&id), Arc::clone(&usage)).in_current_span()),
            )
        };
        let stop_sampling = || {
            if let Some(sampling) = &sampling {
                sampling.abort();
            }
        };

        let wait = engine.wait(&id);
        tokio::pin!(wait);
        let event = tokio::select! {
            biased;
            status = &mut wait => Supervision::Exited(status),
            () = self.signals.lease_lost.cancelled() => Supervision::LeaseLost,
            () = self.signals.cancel.cancelled() => Supervision::CancelRequested,
            () = tokio::time::sleep_until(deadline) => Supervision::DeadlineReached,
            () = self.context.hard_stop.cancelled() => Supervision::ShutdownKill,
        };

        let timeout_secs = self.leased.task.timeout_secs;
        let (outcome, status) = match event {
            Supervision::Exited(Ok(status)) => {
                let outcome = self.outcome_of(&status);
                if let Some(engine_error) = &status.engine_error {
                    tracing::info!(
                        engine_error,
                        "the engine reported an error running the task"
                    );
                }
                (outcome, Some(status))
            }
            Supervision::Exited(Err(error)) => {
                let lost_at = chrono::Utc::now();
                stop_sampling();
                // The attachment broke with the engine: what it delivered is shipped, and how
                // much it read is where the engine's kept output takes over.
                let shipped = self.drain_logs(logs).await;
                // After a start there is no user error left to make: whatever broke the wait
                // is the infrastructure's (the engine went away, the container vanished).
                self.suspect_engine(&error);
                match self
                    .exit_across_engine_loss(&id, &error, lost_at, shipped)
                    .await
                {
                    Ok((status, recovered)) => {
                        if let Some(why) = recovered.output_missing(lost_at, &status) {
                            self.note_lost_output(lost_at, why).await;
                        }
                        let outcome = self.outcome_of(&status);
                        let report = RunReport {
                            start_time: status.started_at,
                            end_time: status.finished_at,
                            ..RunReport::default()
                        };
                        return Ending::Finished { outcome, report };
                    }
                    Err(why) => {
                        return Ending::Requeue {
                            reason: format!(
                                "infrastructure failure while waiting for the container: {error}; {why}"
                            ),
                            delay: self.backoff(),
                        };
                    }
                }
            }
            Supervision::LeaseLost => {
                logs.abort();
                stop_sampling();
                return lease_lost();
            }
            Supervision::ShutdownKill => {
                logs.abort();
                stop_sampling();
                return shutdown_while_running();
            }
            Supervision::DeadlineReached => {
                tracing::info!(timeout_secs, "the task reached its timeout; killing it");
                let status = self.kill_and_wait(&id, wait).await;
                (TaskOutcome::TimedOut { timeout_secs }, status)
            }
            Supervision::CancelRequested => {
                tracing::info!("the task was cancelled; killing it");
                let status = self.kill_and_wait(&id, wait).await;
                (TaskOutcome::Cancelled, status)
            }
        };

        self.drain_logs(logs).await;
        // The engine samples about once a second and may take that long to notice the
        // container stopped; the peaks seen so far are what there is.
        if let Some(sampling) = sampling
            && tokio::time::timeout(USAGE_GRACE, sampling).await.is_err()
        {
            tracing::trace!("resource sampling cut off after the container stopped");
        }
        let sampled = *usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let usage = status
            .as_ref()
            .and_then(|status| status.usage)
            .unwrap_or(sampled);
        let report = RunReport {
            start_time: status.as_ref().and_then(|status| status.started_at),
            end_time: status.as_ref().and_then(|status| status.finished_at),
            peak_memory_bytes: usage.peak_memory_bytes,
            cpu_time_ms: usage.cpu_total_ns.map(|ns| ns / 1_000_000),
        };
        Ending::Finished { outcome, report }
    }

    /// How a container ended that the runner lost sight of when its engine went away (killed,
    /// restarted), asked again once the engine answers. A container that exited before the
    /// engine went away, or on its own while it was away, ran to its end: that end is the
    /// task's, and running the task again would repeat work already done. One that the
    /// engine's going took with it (killed by a signal after the engine was lost), or that is
    /// gone, or an engine that stays away for as long as the lease holds: the task is tried
    /// again (the `Err` says why).
    ///
    /// Once the engine answers, the output it kept and the runner had not read is shipped
    /// (what the broken attachment had delivered, `shipped`, is skipped), following the
    /// container while it still runs (an engine restarted with live restore keeps it).
    async fn exit_across_engine_loss(
        &self,
        id: &ContainerId,
        error: &EngineError,
        lost_at: Timestamp,
        shipped: Option<ShippedLogs>,
    ) -> Result<(ExitStatus, Recovered), String> {
        if matches!(error, EngineError::ContainerNotFound { .. }) {
            return Err("the container is gone".to_owned());
        }
        let engine = &self.context.engine;
        let mut away = EngineAway::new();
        // First the engine back: its kept output is the proof, and is shipped from now on.
        let (back_at, resumed) = loop {
            match engine.kept_output(id).await {
                Ok(kept) => break (chrono::Utc::now(), self.resume_logs(kept, shipped.as_ref())),
                Err(EngineError::ContainerNotFound { .. }) => {
                    return Err("the container was gone when the engine came back".to_owned());
                }
                Err(error) => {
                    tracing::debug!(%error, "the engine is still away");
                    self.pause_while_away(&mut away).await?;
                }
            }
        };
        // Then how the container ended.
        loop {
            let waited = tokio::select! {
                biased;
                () = self.signals.lease_lost.cancelled() => return Err("the lease was lost meanwhile".to_owned()),
                () = self.context.hard_stop.cancelled() => return Err("the runner shut down meanwhile".to_owned()),
                () = tokio::time::sleep_until(away.give_up) => return Err("the engine did not come back in time".to_owned()),
                waited = engine.wait(id) => waited,
            };
            match waited {
                Ok(status) => {
                    let ended_before_loss = status
                        .finished_at
                        .is_some_and(|finished| finished <= lost_at);
                    // 137 and 143: SIGKILL and SIGTERM, what an engine going down sends; 255:
                    // what Docker records for a container whose process it found gone when it
                    // came back (seen in the soak). A program of the user's that exits 255 in
                    // that very window is run again rather than blamed on the user.
                    let killed = !status.oom_killed && matches!(status.exit_code, 137 | 143 | 255);
                    if ended_before_loss || !killed {
                        tracing::info!(
                            exit_code = status.exit_code,
                            ended_before_loss,
                            "the engine came back: the container had ended on its own"
                        );
                        let recovered = Recovered {
                            back_at,
                            read_before: shipped.as_ref().map(|shipped| shipped.read),
                            capped: shipped.as_ref().is_some_and(|shipped| shipped.capped),
                            kept_short: self.finish_resumed(resumed).await,
                        };
                        return Ok((status, recovered));
                    }
                    return Err(format!(
                        "the container died with the engine (exit code {})",
                        status.exit_code
                    ));
                }
                Err(EngineError::ContainerNotFound { .. }) => {
                    return Err("the container was gone when the engine came back".to_owned());
                }
                Err(error) => {
                    tracing::debug!(%error, "the engine is still away");
                    self.pause_while_away(&mut away).await?;
                }
            }
        }
    }

    /// Waits before asking an engine that is away again, the pause doubling up to 5 s; the
    /// `Err` says why the attempt stops waiting instead.
    async fn pause_while_away(&self, away: &mut EngineAway) -> Result<(), String> {
        tokio::select! {
            biased;
            () = self.signals.lease_lost.cancelled() => return Err("the lease was lost meanwhile".to_owned()),
            () = self.context.hard_stop.cancelled() => return Err("the runner shut down meanwhile".to_owned()),
            () = tokio::time::sleep_until(away.give_up) => return Err("the engine did not come back in time".to_owned()),
            () = tokio::time::sleep(away.pause) => {}
        }
        away.pause = (away.pause * 2).min(Duration::from_secs(5));
        Ok(())
    }

    /// Says in the task's log that output may be missing, and why.
    async fn note_lost_output(&self, lost_at: Timestamp, why: &str) {
        let line = format!(
            "\n--- stevedore: the container engine went away at {}; output may be missing: {why} ---\n",
            lost_at.format("%Y-%m-%dT%H:%M:%SZ")
        );
        self.append_note(&line).await;
    }

    /// Ships `output` to the source in the background, `stored` bytes being there already.
    fn ship_logs(&self, output: LogChunkStream, stored: u64) -> JoinHandle<ShippedLogs> {
        let config = &self.context.config;
        let shipper = LogShipper {
            source: Arc::clone(&self.context.source),
            task_id: self.leased.task.id.clone(),
            token: self.leased.lease.token,
            cap: config.log_cap_bytes,
            flush_interval: config.log_flush_interval,
            flush_bytes: config.log_flush_bytes,
            stored,
            progress: ProgressReporter::new(config.progress_interval),
        };
        self.context
            .tracker
            .spawn(shipper.ship(output).in_current_span())
    }

    /// Ships the engine's kept output past what the broken attachment had read (`shipped`;
    /// `None`: how much is unknown, so nothing is shipped twice and nothing more either).
    fn resume_logs(&self, kept: LogChunkStream, shipped: Option<&ShippedLogs>) -> Resumed {
        match shipped {
            Some(shipped) if !shipped.capped => {
                let (rest, unmatched) = skip_output(kept, shipped.read);
                Resumed {
                    live: Some(self.ship_logs(rest, shipped.stored)),
                    unmatched,
                }
            }
            _ => Resumed {
                live: None,
                unmatched: Arc::default(),
            },
        }
    }

    /// Waits (bounded) for the resumed shipping to end; whether the kept output was shorter
    /// than what had been read (the engine's bounded file rolled over), so some is missing.
    async fn finish_resumed(&self, mut resumed: Resumed) -> bool {
        if let Some(live) = resumed.live.take() {
            self.drain_logs(live).await;
        }
        resumed.unmatched.load(Ordering::Relaxed) > 0
    }

    /// Waits (bounded) for the output of the stopped container to be shipped; how it ended,
    /// when it did in time.
    async fn drain_logs(&self, live: JoinHandle<ShippedLogs>) -> Option<ShippedLogs> {
        let abort = live.abort_handle();
        match tokio::time::timeout(LOG_DRAIN_TIMEOUT, live).await {
            Ok(Ok(shipped)) => {
                if shipped.capped {
                    tracing::info!(
                        stored = shipped.stored,
                        read = shipped.read,
                        "the task's log reached its cap"
                    );
                }
                Some(shipped)
            }
            Ok(Err(_)) | Err(_) => {
                // Stopped, so that nothing about the task is sent after its result.
                abort.abort();
                tracing::warn!("the container's output did not end; some of it may be lost");
                None
            }
        }
    }

    /// Kills the container and waits (bounded) for the engine's account of its end.
    async fn kill_and_wait(
        &self,
        id: &ContainerId,
        wait: std::pin::Pin<&mut impl Future<Output = Result<ExitStatus, EngineError>>>,
    ) -> Option<ExitStatus> {
        if let Err(error) =
            engine_call(ContainerOperation::Kill, self.context.engine.kill(id)).await
        {
            tracing::warn!(%error, "killing the container failed");
            self.suspect_engine(&error);
        }
        match tokio::time::timeout(KILL_WAIT_TIMEOUT, wait).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(error)) => {
                tracing::warn!(%error, "no exit status for the killed container");
                None
            }
            Err(_) => {
                tracing::warn!("the killed container was not reported stopped in time");
                None
            }
        }
    }

    /// Records the ending with the source, retrying while it is unavailable.
    async fn record(&self, ending: Ending) {
        let source = &self.context.source;
        let (task_id, token) = (self.leased.task.id.as_str(), self.leased.lease.token);
        let recorded = match &ending {
            Ending::Finished { outcome, report } => {
                tracing::info!(?outcome, "task finished");
                with_retries("record the task's result", || {
                    source.complete(task_id, token, outcome, report)
                })
                .await
            }
            Ending::Requeue { reason, delay } => {
                tracing::warn!(reason, delay_ms = delay.as_millis(), "giving the task back");
                let request = RequeueRequest {
                    reason: reason.clone(),
                    delay: *delay,
                    max_infra_attempts: self.context.config.max_infra_attempts,
                };
                with_retries("requeue the task", || {
                    source.requeue(task_id, token, &request)
                })
                .await
            }
            Ending::Abandon { why } => {
                tracing::warn!(why, "abandoning the task");
                Ok(())
            }
        };
        match recorded {
            Ok(()) => {}
            Err(SourceError::StaleLease { .. }) => {
                tracing::warn!("the lease went stale before the result was recorded; dropped");
            }
            Err(error) => {
                // The lease expires and the rescuer requeues the task: at-least-once holds.
                tracing::error!(%error, "the task's result could not be recorded");
            }
        }
    }

    /// Classifies an engine failure: the infrastructure's requeues, the user's ends the task.
    fn engine_failed(&self, doing: &str, error: EngineError) -> Ending {
        if error.is_infrastructure() {
            self.suspect_engine(&error);
            Ending::Requeue {
                reason: format!("infrastructure failure while {doing}: {error}"),
                delay: self.backoff(),
            }
        } else {
            setup_failed(format!("{doing} failed: {error}"))
        }
    }

    fn suspect_engine(&self, error: &EngineError) {
        if error.is_infrastructure() {
            self.context.engine_suspect.store(true, Ordering::Relaxed);
        }
    }

    fn backoff(&self) -> Duration {
        let config = &self.context.config;
        requeue_delay(
            self.leased.task.infra_attempts,
            config.requeue_backoff_base,
            config.requeue_backoff_max,
        )
    }

    async fn report_progress(&self, message: String) {
        let (task_id, token) = (self.leased.task.id.as_str(), self.leased.lease.token);
        if let Err(error) = self
            .context
            .source
            .progress(task_id, token, None, Some(&message))
            .await
        {
            tracing::debug!(%error, "progress not reported");
        }
    }
}

/// The download sizes of a pull's layers, from its progress events: each layer's `total`
/// is known once it starts downloading (layers already present report none).
#[derive(Debug, Default)]
struct LayerSizes(std::collections::HashMap<String, u64>);

impl LayerSizes {
    fn record(&mut self, event: &PullProgress) {
        if let PullProgress::Layer {
            layer,
            total: Some(total),
            ..
        } = event
        {
            self.0.insert(layer.clone(), *total);
        }
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// An image over the runner's size limit: the user's choice of image, so the task ends.
fn image_too_large(image: &str, max: u64, size: u64, measured: &str) -> Ending {
    setup_failed(format!(
        "the image {image} is larger than this runner allows ({max} bytes, \
         runner.max_image_bytes): {measured} {size} bytes"
    ))
}

fn setup_failed(message: String) -> Ending {
    Ending::Finished {
        outcome: TaskOutcome::SetupFailed { message },
        report: RunReport::default(),
    }
}

fn cancelled(report: RunReport) -> Ending {
    Ending::Finished {
        outcome: TaskOutcome::Cancelled,
        report,
    }
}

fn lease_lost() -> Ending {
    Ending::Abandon {
        why: "the lease is stale: the task was rescued or finished elsewhere".to_owned(),
    }
}

fn shutdown_before_start() -> Ending {
    Ending::Requeue {
        reason: "the runner shut down before the task started".to_owned(),
        delay: Duration::ZERO,
    }
}

fn shutdown_while_running() -> Ending {
    Ending::Requeue {
        reason: "the runner shut down while the task ran".to_owned(),
        delay: Duration::ZERO,
    }
}

/// What the heartbeat loop of one attempt extends, and how often.
struct Heartbeat {
    task_id: String,
    token: i64,
    lease_secs: u32,
    interval: Duration,
    /// Told each new end of the lease, for the watchdog.
    ledger: Option<Arc<LeaseLedger>>,
}

/// The line that opens the log of attempt `attempt` (the second or later): which attempt and
/// why the last one ended; on a line of its own after an earlier attempt's output.
fn attempt_line(attempt: u32, last_ended: &str, after_output: bool) -> String {
    let last_ended: String = last_ended
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let separator = if after_output { "\n" } else { "" };
    format!("{separator}--- stevedore: attempt {attempt}; the last one ended: {last_ended} ---\n")
}

/// Extends the lease every `interval` until the attempt is done; raises `cancel` when a user
/// cancelled the task and `lease_lost` when the lease is no longer ours.
async fn heartbeat_loop(source: Arc<dyn TaskSource>, heartbeat: Heartbeat, signals: Signals) {
    let Heartbeat {
        task_id,
        token,
        lease_secs,
        interval,
        ledger,
    } = heartbeat;
    let lease = Duration::from_secs(u64::from(lease_secs));
    // When the lease surely ended if no heartbeat gets through: counted on this runner's own
    // monotonic clock from the last answered heartbeat, so a runner cut off from its source
    // stops its container instead of running a task that someone else may run by now.
    let mut lease_surely_until = Instant::now() + lease;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The lease was granted just now; the first heartbeat is due one interval later.
    ticks.reset();
    loop {
        tokio::select! {
            () = signals.done.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let asked = Instant::now();
        // A heartbeat that has not answered when the lease surely ended is as good as failed:
        // over a link that drops packets silently, the source's own retries would take
        // minutes while the task is rescued and run elsewhere.
        let beat = tokio::select! {
            () = signals.done.cancelled() => return,
            beat = source.heartbeat(&task_id, token, lease_secs) => beat,
            () = tokio::time::sleep_until(lease_surely_until) => {
                tracing::warn!("no heartbeat was answered for a whole lease");
                signals.lease_lost.cancel();
                return;
            }
        };
        match beat {
            Ok(reply) => {
                lease_surely_until = asked + lease;
                if let Some(ledger) = &ledger {
                    ledger.promise(&task_id, lease_surely_until);
                }
                if reply.cancel_requested && !signals.cancel.is_cancelled() {
                    tracing::info!("cancellation requested");
                    signals.cancel.cancel();
                }
            }
            Err(SourceError::Unavailable { message }) if Instant::now() < lease_surely_until => {
                // The lease is still ours; if it expires meanwhile, the next answer says so.
                tracing::warn!(message, "heartbeat failed; trying again");
            }
            Err(SourceError::Unavailable { message }) => {
                tracing::warn!(message, "no heartbeat got through for a whole lease");
                signals.lease_lost.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "the lease is lost");
                signals.lease_lost.cancel();
                return;
            }
        }
    }
}

/// Calls `operation` until it succeeds or fails for a reason that is not transient, waiting
/// longer between tries.
async fn with_retries<T, F, Fut>(what: &str, mut operation: F) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SourceError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match operation().await {
            Err(error) if error.is_transient() && attempt < RECORD_ATTEMPTS => {
                tracing::warn!(%error, attempt, "could not {what}; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Folds the container's resource samples into `usage` until the stream ends.
async fn follow_usage(
    mut samples: ResourceSampleStream,
    usage: Arc<std::sync::Mutex<ResourceUsage>>,
) {
    while let Some(sample) = samples.next().await {
        match sample {
            Ok(sample) => usage
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .record(&sample),
            Err(error) => {
                tracing::debug!(%error, "resource sampling failed");
                return;
            }
        }
    }
}

/// Calls the engine, recording how long the operation took and, when it failed, the kind of
/// failure: the runner's every container operation goes through here, so the metrics see
/// all of them.
pub(crate) async fn engine_call<T>(
    operation: ContainerOperation,
    call: impl Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    let began = Instant::now();
    let result = call.await;
    stevedore_metrics::container_operation(operation, began.elapsed());
    if let Err(error) = &result {
        stevedore_metrics::engine_error(operation, error.kind());
    }
    result
}

/// Removes a finished task's container, measuring how long the engine takes.
async fn remove_container(engine: Arc<dyn ContainerEngine>, id: ContainerId) {
    // Waits grow to about a minute in all, enough for an engine that restarts to come back.
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=REMOVE_ATTEMPTS {
        match engine_call(ContainerOperation::Remove, engine.remove(&id)).await {
            Ok(took) => {
                tracing::info!(container = %id, took_ms = took.as_millis(), "container removed");
                return;
            }
            Err(EngineError::ContainerNotFound { .. }) => return,
            Err(error) if attempt < REMOVE_ATTEMPTS => {
                tracing::warn!(container = %id, %error, "removing the container failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(16));
            }
            Err(error) => {
                tracing::error!(
                    container = %id, %error,
                    "the container could not be removed; the runner reaps it when it stops or starts"
                );
            }
        }
    }
}
