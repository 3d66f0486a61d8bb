//! What the runner's tests share: a real SQLite store in a temporary directory with one
//! project, helpers to push codes and queue tasks, a [`TaskSource`] wrapper that observes
//! the runner and can cut it off, and a runner running in the background.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use stevedore_model::limits::DEFAULT_RETRIES_DELAY_SECS;
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_model::{
    Clock, CodeKind, CodeRevision, CodeSpec, Limits, NewTask, Task, TaskOutcome,
};
use stevedore_runner::{
    PackageDownload, RequeueRequest, Runner, RunnerError, SourceError, TaskSource,
};
use stevedore_store::{
    HeartbeatReply, LeaseRequest, LeasedTask, PackageFile, Requeue, RevisionPackage, RunReport,
    SqliteOptions, SqliteStore, Store, StoreError, SyncMode,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A store with one project.
pub struct Harness {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub project_id: String,
    _dir: tempfile::TempDir,
}

/// A [`TaskSource`] over the store that counts what the runner does and can pretend the
/// network to the store is cut (heartbeats fail as unavailable).
pub struct ObservedSource {
    inner: StoreSource,
    pub heartbeats_cut: AtomicBool,
    /// Heartbeats never answer, as over a link that silently drops every packet.
    pub heartbeats_hang: AtomicBool,
    /// The source goes away when the runner marks a task running: that call never answers
    /// and heartbeats fail from then on, as when the server dies right after a start.
    gone_at_mark_running: AtomicBool,
    progress_failing: AtomicBool,
    packages_cut_short: AtomicBool,
    counts: Mutex<Counts>,
    pub outcomes: Mutex<Vec<(String, TaskOutcome, RunReport)>>,
    pub requeues: Mutex<Vec<(String, RequeueRequest)>>,
    pub log_appends: Mutex<Vec<(String, usize)>>,
    pub progress_messages: Mutex<Vec<String>>,
    pub progress_calls: Mutex<Vec<ProgressCall>>,
}

/// One progress call the runner made: task id, percent, message.
pub type ProgressCall = (String, Option<u8>, Option<String>);

/// Tasks leased and not yet given back, and tasks running, with their peaks.
#[derive(Default)]
struct Counts {
    leased: HashSet<String>,
    running: HashSet<String>,
    max_leased: usize,
    max_running: usize,
}

/// The store's lease calls, plainly, with the clock's "now": the runner's side of what the
/// server's lease desk does (which the runner cannot depend on), for these tests only.
struct StoreSource {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

/// A runner running in the background until [`Background::stop`].
pub struct Background {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), RunnerError>>,
}

// === impl Harness ===

impl Harness {
    pub async fn new(clock: Arc<dyn Clock>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteOptions {
            path: dir.path().join("stevedore.db"),
            sync: SyncMode::Normal,
        })
        .await
        .unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        let project = store
            .create_project("runner-tests", clock.now())
            .await
            .unwrap();
        Harness {
            store,
            clock,
            project_id: project.id,
            _dir: dir,
        }
    }

    pub fn source(&self) -> Arc<ObservedSource> {
        Arc::new(ObservedSource::new(StoreSource {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
        }))
    }

    /// Pushes an image code; `adjust` changes the spec before it is pushed.
    pub async fn push_image_code(
        &self,
        name: &str,
        image: &str,
        command: Option<&str>,
        adjust: impl FnOnce(&mut CodeSpec),
    ) -> CodeRevision {
        let mut spec = code_spec(
            name,
            CodeKind::Image {
                image: image.to_owned(),
                command: command.map(str::to_owned),
            },
        );
        adjust(&mut spec);
        spec.validate().unwrap();
        self.store
            .push_code(&self.project_id, &spec, None, self.clock.now())
            .await
            .unwrap()
    }

    /// Pushes a runtime code with a zip package.
    pub async fn push_runtime_code(
        &self,
        name: &str,
        runtime: &str,
        file_name: &str,
        zip: Vec<u8>,
        adjust: impl FnOnce(&mut CodeSpec),
    ) -> CodeRevision {
        let mut spec = code_spec(
            name,
            CodeKind::Runtime {
                runtime: runtime.to_owned(),
                file_name: file_name.to_owned(),
                stack: None,
            },
        );
        adjust(&mut spec);
        spec.validate().unwrap();
        // The store reads a package from a file, as the server spools an upload.
        let mut spooled = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut spooled, &zip).unwrap();
        let package = PackageFile::describe(spooled.path()).await.unwrap();
        self.store
            .push_code(
                &self.project_id,
                &spec,
                Some(RevisionPackage::File(&package)),
                self.clock.now(),
            )
            .await
            .unwrap()
    }

    pub async fn queue(&self, code_name: &str, payload: &str, timeout_secs: u32) -> Task {
        let task = NewTask {
            code_name: code_name.to_owned(),
            payload: payload.to_owned(),
            priority: 0,
            timeout_secs,
            delay_secs: 0,
            label: None,
            cluster: DEFAULT_CLUSTER.to_owned(),
            retry_count: 0,
            original_task_id: None,
            schedule_id: None,
            code_rev: None,
        };
        let mut queued = self
            .store
            .enqueue(&self.project_id, &[task], self.clock.now())
            .await
            .unwrap();
        queued.remove(0)
    }

    pub async fn task(&self, task_id: &str) -> Task {
        self.store
            .get_task(&self.project_id, task_id)
            .await
            .unwrap()
    }

    pub async fn log(&self, task_id: &str) -> String {
        match self.store.get_log(&self.project_id, task_id).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// Polls the task until `done` holds, or fails the test after `within`.
    pub async fn wait_for(
        &self,
        task_id: &str,
        within: Duration,
        done: impl Fn(&Task) -> bool,
    ) -> Task {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let task = self.task(task_id).await;
            if done(&task) {
                return task;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("the task did not get there within {within:?}: {task:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the task to reach a terminal status.
    pub async fn finished(&self, task_id: &str, within: Duration) -> Task {
        self.wait_for(task_id, within, |task| task.status.is_terminal())
            .await
    }
}

/// A valid code spec with small limits.
pub fn code_spec(name: &str, kind: CodeKind) -> CodeSpec {
    CodeSpec {
        name: name.to_owned(),
        kind,
        env_vars: BTreeMap::new(),
        config: None,
        max_concurrency: None,
        retries: 0,
        retries_delay_secs: DEFAULT_RETRIES_DELAY_SECS,
        default_priority: 0,
        limits: Limits {
            timeout_secs: 60,
            memory_mib: 64,
            cpus: None,
        },
        network: "none".to_owned(),
        retries_backoff: stevedore_model::RetriesBackoff::Fixed,
    }
}

/// A log callback for local runs that keeps what it is given, and what it kept.
pub fn collecting_sink() -> (stevedore_runner::LogSink, Arc<Mutex<Vec<u8>>>) {
    let printed = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&printed);
    let on_log: stevedore_runner::LogSink =
        Arc::new(move |bytes: &[u8]| sink.lock().unwrap().extend_from_slice(bytes));
    (on_log, printed)
}

/// A zip with the given `(path, contents, unix mode)` files.
pub fn zip_of(files: &[(&str, &str, u32)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (path, contents, mode) in files {
        let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        writer.start_file(*path, options).unwrap();
        writer.write_all(contents.as_bytes()).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

// === impl ObservedSource ===

impl ObservedSource {
    fn new(inner: StoreSource) -> Self {
        ObservedSource {
            inner,
            heartbeats_cut: AtomicBool::new(false),
            heartbeats_hang: AtomicBool::new(false),
            gone_at_mark_running: AtomicBool::new(false),
            progress_failing: AtomicBool::new(false),
            packages_cut_short: AtomicBool::new(false),
            counts: Mutex::new(Counts::default()),
            outcomes: Mutex::new(Vec::new()),
            requeues: Mutex::new(Vec::new()),
            log_appends: Mutex::new(Vec::new()),
            progress_messages: Mutex::new(Vec::new()),
            progress_calls: Mutex::new(Vec::new()),
        }
    }

    /// The most tasks this runner held leased at once.
    pub fn max_leased(&self) -> usize {
        self.counts.lock().unwrap().max_leased
    }

    /// The most tasks whose containers ran at once.
    pub fn max_running(&self) -> usize {
        self.counts.lock().unwrap().max_running
    }

    /// While set, progress reports fail as unavailable.
    pub fn fail_progress(&self, fail: bool) {
        self.progress_failing.store(fail, Ordering::SeqCst);
    }

    /// While set, package downloads announce one byte more than they bring, as a download
    /// cut off at its end would.
    pub fn cut_packages_short(&self, cut: bool) {
        self.packages_cut_short.store(cut, Ordering::SeqCst);
    }

    pub fn cut_heartbeats(&self, cut: bool) {
        self.heartbeats_cut.store(cut, Ordering::SeqCst);
    }

    /// From now on heartbeats hang instead of failing, until the caller gives up on them.
    pub fn hang_heartbeats(&self, hang: bool) {
        self.heartbeats_hang.store(hang, Ordering::SeqCst);
    }

    /// While set, the source goes away when the runner marks a task running: that call
    /// never answers, and heartbeats fail until `cut_heartbeats(false)`.
    pub fn go_away_at_mark_running(&self, gone: bool) {
        self.gone_at_mark_running.store(gone, Ordering::SeqCst);
    }

    /// The progress calls about one task: percent and message.
    pub fn progress_of(&self, task_id: &str) -> Vec<(Option<u8>, Option<String>)> {
        self.progress_calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _, _)| id == task_id)
            .map(|(_, percent, msg)| (*percent, msg.clone()))
            .collect()
    }

    pub fn outcome_of(&self, task_id: &str) -> Option<(TaskOutcome, RunReport)> {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _, _)| id == task_id)
            .map(|(_, outcome, report)| (outcome.clone(), report.clone()))
    }

    fn ended(&self, task_id: &str) {
        let mut counts = self.counts.lock().unwrap();
        counts.leased.remove(task_id);
        counts.running.remove(task_id);
    }
}

#[async_trait]
impl TaskSource for ObservedSource {
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError> {
        let leased = self.inner.lease(request).await?;
        let mut counts = self.counts.lock().unwrap();
        counts
            .leased
            .extend(leased.iter().map(|leased| leased.task.id.clone()));
        counts.max_leased = counts.max_leased.max(counts.leased.len());
        drop(counts);
        Ok(leased)
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, SourceError> {
        if self.heartbeats_cut.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable {
                message: "the test cut the network".to_owned(),
            });
        }
        if self.heartbeats_hang.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        self.inner.heartbeat(task_id, token, lease_secs).await
    }

    async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), SourceError> {
        if self.gone_at_mark_running.load(Ordering::SeqCst) {
            self.heartbeats_cut.store(true, Ordering::SeqCst);
            return std::future::pending().await;
        }
        self.inner.mark_running(task_id, token).await?;
        let mut counts = self.counts.lock().unwrap();
        counts.running.insert(task_id.to_owned());
        counts.max_running = counts.max_running.max(counts.running.len());
        Ok(())
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, SourceError> {
        self.log_appends
            .lock()
            .unwrap()
            .push((task_id.to_owned(), bytes.len()));
        self.inner.append_log(task_id, token, bytes, cap).await
    }

    async fn progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
    ) -> Result<(), SourceError> {
        if let Some(msg) = msg {
            self.progress_messages.lock().unwrap().push(msg.to_owned());
        }
        self.progress_calls.lock().unwrap().push((
            task_id.to_owned(),
            percent,
            msg.map(str::to_owned),
        ));
        if self.progress_failing.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable {
                message: "the test fails progress reports".to_owned(),
            });
        }
        self.inner.progress(task_id, token, percent, msg).await
    }

    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
    ) -> Result<(), SourceError> {
        self.ended(task_id);
        self.outcomes
            .lock()
            .unwrap()
            .push((task_id.to_owned(), outcome.clone(), report.clone()));
        self.inner.complete(task_id, token, outcome, report).await
    }

    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        request: &RequeueRequest,
    ) -> Result<(), SourceError> {
        self.ended(task_id);
        self.requeues
            .lock()
            .unwrap()
            .push((task_id.to_owned(), request.clone()));
        self.inner.requeue(task_id, token, request).await
    }

    async fn task_package(
        &self,
        task_id: &str,
        token: i64,
    ) -> Result<PackageDownload, SourceError> {
        let mut download = self.inner.task_package(task_id, token).await?;
        if self.packages_cut_short.load(Ordering::SeqCst) {
            download.size += 1;
        }
        Ok(download)
    }

    async fn release_held(
        &self,
        runner_id: &str,
        max_infra_attempts: u32,
    ) -> Result<u32, SourceError> {
        self.inner.release_held(runner_id, max_infra_attempts).await
    }

    async fn gone_runners(&self, runner_ids: &[String]) -> Result<Vec<String>, SourceError> {
        self.inner.gone_runners(runner_ids).await
    }
}

// === impl Background ===

impl Background {
    pub fn start(runner: Runner) -> Background {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move { runner.run(token).await });
        Background { shutdown, handle }
    }

    /// Asks for shutdown and waits until the runner returned.
    pub async fn stop(self) -> Result<(), RunnerError> {
        self.shutdown.cancel();
        self.handle.await.unwrap()
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Whether CI runs these tests, where an unreachable Docker engine is a failure, not a skip.
pub fn ci_requires_docker() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The real Docker engine with `image` built once per test binary (`built` remembers it), or
/// `None` — the test then skips — when the engine is unreachable outside CI.
pub async fn docker_engine(
    test: &str,
    image: &str,
    built: &tokio::sync::OnceCell<()>,
) -> Option<stevedore_engine::DockerEngine> {
    let engine = match stevedore_engine::DockerEngine::connect().await {
        Ok(engine) => engine,
        Err(error) if ci_requires_docker() => {
            panic!("CI is set and the Docker engine is not reachable: {error}")
        }
        Err(error) => {
            // Straight to stderr: the harness swallows the output of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: the Docker engine is not reachable ({error}); run \
                 scripts/ensure-docker.sh, or set CI=true to make this a failure"
            );
            return None;
        }
    };
    built
        .get_or_try_init(|| async {
            stevedore_engine::build_local_busybox_image(
                &engine,
                std::path::Path::new(stevedore_engine::HOST_BUSYBOX),
                image,
            )
            .await
            .map(|_| ())
        })
        .await
        .unwrap();
    Some(engine)
}

// === impl StoreSource ===

fn source_error(error: StoreError) -> SourceError {
    match error {
        StoreError::StaleLease { task_id } => SourceError::StaleLease { task_id },
        StoreError::NotFound { what } => SourceError::NotFound { what },
        error @ (StoreError::Database(_) | StoreError::Migration(_)) => SourceError::Unavailable {
            message: error.to_string(),
        },
        error => SourceError::Refused {
            message: error.to_string(),
        },
    }
}

impl StoreSource {
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError> {
        self.store
            .lease(request, self.clock.now())
            .await
            .map_err(source_error)
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, SourceError> {
        self.store
            .heartbeat(task_id, token, lease_secs, self.clock.now())
            .await
            .map_err(source_error)
    }

    async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), SourceError> {
        let now = self.clock.now();
        self.store
            .mark_running(task_id, token, now, now)
            .await
            .map_err(source_error)?;
        Ok(())
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, SourceError> {
        self.store
            .append_log(task_id, token, bytes, cap, self.clock.now())
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
        self.store
            .runner_progress(task_id, token, percent, msg, self.clock.now())
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
        self.store
            .complete(task_id, token, outcome, report, self.clock.now())
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
        let now = self.clock.now();
        let requeue = Requeue {
            reason: request.reason.clone(),
            due_at: now + chrono::Duration::from_std(request.delay).unwrap(),
            max_infra_attempts: request.max_infra_attempts,
        };
        self.store
            .requeue(task_id, token, &requeue, now)
            .await
            .map_err(source_error)?;
        Ok(())
    }

    async fn release_held(
        &self,
        runner_id: &str,
        max_infra_attempts: u32,
    ) -> Result<u32, SourceError> {
        let released = self
            .store
            .release_runner(runner_id, None, self.clock.now(), max_infra_attempts)
            .await
            .map_err(source_error)?;
        Ok(u32::try_from(released.len()).unwrap_or(u32::MAX))
    }

    /// Gone after a minute unseen, the server's default online window.
    async fn gone_runners(&self, runner_ids: &[String]) -> Result<Vec<String>, SourceError> {
        let now = self.clock.now();
        self.store
            .gone_runners(runner_ids, None, now - chrono::Duration::minutes(1), now)
            .await
            .map_err(source_error)
    }

    async fn task_package(
        &self,
        task_id: &str,
        token: i64,
    ) -> Result<PackageDownload, SourceError> {
        let package = self
            .store
            .leased_package(task_id, token)
            .await
            .map_err(source_error)?;
        Ok(PackageDownload {
            size: package.size,
            chunks: package.chunks.map_err(source_error).boxed(),
        })
    }
}
