//! [`FakeEngine`]: an in-memory [`ContainerRuntime`], [`ImageStore`] and [`ImageBuilder`]
//! for other crates' fast unit tests.
//!
//! Nothing runs: a "container" is a record that moves from created to running to exited on
//! tokio's clock (so `tokio::time::pause` makes long tasks instant). What a container does is
//! scripted with a [`FakeRun`] chosen by label, by image or by default; failures are injected
//! per operation with [`FakeEngine::fail_next`] or for everything with
//! [`FakeEngine::set_unreachable`]. What a container holds when it is created (its
//! directories, files and unpacked package) is recorded as a runtime would have put it in
//! place ([`FakeEngine::filesystem`]), but for the contents of files over
//! [`FAKE_KEPT_FILE_BYTES`], of which only the size is kept: a test can put a package larger
//! than memory through the fake.
//!
//! Available with the `fake` cargo feature, and in this crate's own tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::build::{BuildProgress, BuildRequest, BuiltImage};
use crate::context::plan_context;
use crate::engine::{
    ContainerRuntime, EngineCapabilities, ExitStatus, ImageBuilder, ImageEntry, ImagePresence,
    ImageStore, ListedContainer, LocalImage, LogChunk, LogChunkStream, OutputStream, PullProgress,
    PullProgressSender, RegistryAuth, ResourceSample, ResourceSampleStream, Timestamp,
};
use crate::error::EngineError;
use crate::network::{EgressPolicy, NetworkInfo, NetworkSpec};
use crate::pull::{PullCoalescer, normalize_reference};
use crate::spec::{ContainerId, ContainerSpec};

/// The exit code of a killed container (128 + SIGKILL), as Docker reports it.
pub const KILLED_EXIT_CODE: i64 = 137;

/// The size of a fake image unless set otherwise ([`FakeEngine::set_image_size`]).
pub const FAKE_IMAGE_BYTES: u64 = 1 << 20;

/// The largest file whose contents a fake container keeps; of larger ones it keeps the size.
pub const FAKE_KEPT_FILE_BYTES: u64 = 1 << 20;

/// The in-memory engine. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct FakeEngine {
    state: Arc<Mutex<FakeState>>,
    pulls: Arc<PullCoalescer>,
}

/// What one fake container does once started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRun {
    /// The exit code it ends with (unless killed).
    pub exit_code: i64,
    /// Whether it ends OOM-killed.
    pub oom_killed: bool,
    /// How long it runs before it exits by itself; [`FakeRun::forever`] never does.
    pub run_for: Duration,
    /// Output it produces right after it starts.
    pub logs: Vec<LogChunk>,
    /// The peak memory its stats report.
    pub peak_memory_bytes: u64,
    /// The CPU time its stats report.
    pub cpu_total_ns: u64,
    /// `State.Error` it reports (e.g. "executable file not found").
    pub engine_error: Option<String>,
    /// Where its stdout also comes from, read from the container as created (after `logs`):
    /// what a program that prints one of its files or variables would print.
    pub echoes: Vec<FakeEcho>,
    /// The attachment breaks (the engine went away) after delivering this many chunks of its
    /// output; what follows is only in `kept_output`.
    pub attachment_breaks_after: Option<usize>,
}

/// Something of its own container a fake run prints on stdout, so a test sees that files and
/// environment reached the container the way a real program would see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeEcho {
    /// The contents of the file at this path (nothing when there is none, or when only its
    /// size was kept).
    File(String),
    /// The value of this environment variable (nothing when it is unset).
    Env(String),
    /// The size of the file at this path in bytes, in decimal with a newline, as `wc -c <`
    /// prints it (nothing when there is none).
    Size(String),
    /// A line `<octal mode> <path>` for every directory and file below this directory (a
    /// directory's path ending in `/`), in path order.
    Listing(String),
}

/// One directory or file a fake container holds from its creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeEntry {
    /// Unix permission bits.
    pub mode: u32,
    /// What it is.
    pub kind: FakeEntryKind,
}

/// A directory, or a file with its size and (up to [`FAKE_KEPT_FILE_BYTES`]) its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeEntryKind {
    /// A directory.
    Directory,
    /// A file of `size` bytes; `contents` when it is no larger than [`FAKE_KEPT_FILE_BYTES`].
    File {
        /// Its size in bytes.
        size: u64,
        /// Its bytes, when kept.
        contents: Option<Vec<u8>>,
    },
}

/// What a fake container holds from its creation, by absolute path.
pub type FakeFilesystem = BTreeMap<String, FakeEntry>;

/// The engine operations a failure can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FakeOperation {
    /// `capabilities`.
    Capabilities,
    /// `image_id`/`image_present`, and the presence check inside `ensure_image`.
    ImagePresent,
    /// `remove_image`.
    RemoveImage,
    /// The pull inside `ensure_image` (after the presence check).
    Pull,
    /// `import_image`.
    Import,
    /// `build_image` (after the context was read).
    Build,
    /// `create`.
    Create,
    /// `start`.
    Start,
    /// `attach`.
    Attach,
    /// `kept_output`.
    KeptOutput,
    /// `wait`.
    Wait,
    /// `kill`.
    Kill,
    /// `stats_snapshot` and `stats`.
    Stats,
    /// `remove`.
    Remove,
    /// `list_labeled`.
    List,
    /// `inspect_network` and `ensure_network`.
    Network,
    /// `isolate_network`.
    Isolate,
    /// `ensure_cpu_group` and `remove_cpu_group`.
    CpuGroup,
}

/// How a fake container's run is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Label(String, String),
    Image(String),
}

#[derive(Debug, Clone)]
enum Phase {
    Created,
    Running,
    Exited(ExitStatus),
}

struct FakeContainer {
    spec: ContainerSpec,
    run: FakeRun,
    phase: watch::Sender<Phase>,
    kill: Arc<Notify>,
}

struct FakeState {
    capabilities: EngineCapabilities,
    /// Images present locally: normalized reference → id.
    images: BTreeMap<String, String>,
    /// Sizes of images that are not [`FAKE_IMAGE_BYTES`], by id.
    image_sizes: BTreeMap<String, u64>,
    /// The labels of built and imported images, by id.
    image_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Images a pull can fetch, with how long the pull takes.
    registry: BTreeMap<String, Duration>,
    pull_counts: BTreeMap<String, usize>,
    builds: Vec<BuildRequest>,
    containers: BTreeMap<String, FakeContainer>,
    created: Vec<(ContainerId, ContainerSpec)>,
    /// What each created container held, by id (kept after its removal).
    filesystems: HashMap<String, Arc<FakeFilesystem>>,
    removed: Vec<ContainerId>,
    kills: Vec<ContainerId>,
    scripts: Vec<(Selector, FakeRun)>,
    default_run: FakeRun,
    failures: HashMap<FakeOperation, VecDeque<EngineError>>,
    unreachable: bool,
    remove_takes: Duration,
    /// Networks by name.
    networks: BTreeMap<String, NetworkInfo>,
    /// The policy each network was last isolated with, by name.
    isolations: BTreeMap<String, EgressPolicy>,
    /// CPU groups and their caps in billionths of a CPU, by name.
    cpu_groups: BTreeMap<String, u64>,
    next_id: u64,
    /// The wall-clock time the fake's clock starts at, for `started_at`/`finished_at`.
    epoch: Timestamp,
    epoch_instant: Instant,
}

// === impl FakeState ===

impl FakeState {
    /// Adds (or re-tags) an image under a new id and returns the id.
    fn insert_image(&mut self, reference: String) -> String {
        let id = format!("sha256:{:064x}", self.next_id);
        self.next_id += 1;
        self.images.insert(reference, id.clone());
        id
    }

    /// An image by reference or by id: its reference and id.
    fn find_image(&self, image: &str) -> Option<(&String, &String)> {
        let reference = normalize_reference(image);
        self.images
            .iter()
            .find(|(known, id)| **known == reference || *id == image)
    }
}

// === impl FakeRun ===

impl FakeRun {
    /// Exits 0 at once, printing nothing.
    pub fn success() -> Self {
        FakeRun::exits(0)
    }

    /// Exits with `exit_code` at once.
    pub fn exits(exit_code: i64) -> Self {
        FakeRun {
            exit_code,
            oom_killed: false,
            run_for: Duration::ZERO,
            logs: Vec::new(),
            peak_memory_bytes: 4 << 20,
            cpu_total_ns: 1_000_000,
            engine_error: None,
            echoes: Vec::new(),
            attachment_breaks_after: None,
        }
    }

    /// Gets OOM-killed (exit 137, `OOMKilled`), as a task over its memory limit does.
    pub fn oom_killed() -> Self {
        FakeRun {
            oom_killed: true,
            ..FakeRun::exits(KILLED_EXIT_CODE)
        }
    }

    /// Runs until killed: a task that would hit its timeout.
    pub fn forever() -> Self {
        FakeRun {
            run_for: Duration::MAX,
            ..FakeRun::success()
        }
    }

    /// Runs for `duration` before exiting.
    pub fn running_for(mut self, duration: Duration) -> Self {
        self.run_for = duration;
        self
    }

    /// Prints `text` on stdout.
    pub fn stdout(mut self, text: impl Into<Bytes>) -> Self {
        self.logs.push(LogChunk {
            stream: OutputStream::Stdout,
            bytes: text.into(),
        });
        self
    }

    /// Prints `text` on stderr.
    pub fn stderr(mut self, text: impl Into<Bytes>) -> Self {
        self.logs.push(LogChunk {
            stream: OutputStream::Stderr,
            bytes: text.into(),
        });
        self
    }

    /// Prints the contents of its container's file at `path` on stdout.
    pub fn echo_file(mut self, path: impl Into<String>) -> Self {
        self.echoes.push(FakeEcho::File(path.into()));
        self
    }

    /// Prints the value of its container's environment variable `name` on stdout.
    pub fn echo_env(mut self, name: impl Into<String>) -> Self {
        self.echoes.push(FakeEcho::Env(name.into()));
        self
    }

    /// Prints the size of its container's file at `path` on stdout ([`FakeEcho::Size`]).
    pub fn echo_size(mut self, path: impl Into<String>) -> Self {
        self.echoes.push(FakeEcho::Size(path.into()));
        self
    }

    /// Lists what its container holds below `directory` on stdout ([`FakeEcho::Listing`]).
    pub fn echo_listing(mut self, directory: impl Into<String>) -> Self {
        self.echoes.push(FakeEcho::Listing(directory.into()));
        self
    }

    /// Its attachment breaks, as when the engine goes away, after `chunks` chunks of output.
    pub fn attachment_breaks_after(mut self, chunks: usize) -> Self {
        self.attachment_breaks_after = Some(chunks);
        self
    }

    /// Reports this peak memory in its stats.
    pub fn peak_memory(mut self, bytes: u64) -> Self {
        self.peak_memory_bytes = bytes;
        self
    }
}

// === impl FakeEngine ===

impl Default for FakeEngine {
    fn default() -> Self {
        FakeEngine::new()
    }
}

impl FakeEngine {
    /// An engine that enforces every limit, has no images and runs every container as
    /// [`FakeRun::success`].
    pub fn new() -> Self {
        let epoch = chrono::DateTime::from_timestamp(1_704_067_200, 0).unwrap_or_default();
        FakeEngine {
            state: Arc::new(Mutex::new(FakeState {
                capabilities: EngineCapabilities {
                    memory_limit: true,
                    swap_limit: true,
                    cpu_cfs_quota: true,
                    pids_limit: true,
                    server_version: "fake".to_owned(),
                    api_version: "1.41".to_owned(),
                    negotiated_api_version: "1.41".to_owned(),
                    ncpu: 2,
                    mem_total: 8 << 30,
                    cgroup_version: Some("2".to_owned()),
                    operating_system: Some("fake".to_owned()),
                    warnings: Vec::new(),
                },
                images: BTreeMap::new(),
                image_labels: BTreeMap::new(),
                image_sizes: BTreeMap::new(),
                registry: BTreeMap::new(),
                pull_counts: BTreeMap::new(),
                builds: Vec::new(),
                containers: BTreeMap::new(),
                created: Vec::new(),
                filesystems: HashMap::new(),
                removed: Vec::new(),
                kills: Vec::new(),
                scripts: Vec::new(),
                default_run: FakeRun::success(),
                failures: HashMap::new(),
                unreachable: false,
                remove_takes: Duration::ZERO,
                networks: BTreeMap::new(),
                isolations: BTreeMap::new(),
                cpu_groups: BTreeMap::new(),
                next_id: 1,
                epoch,
                epoch_instant: Instant::now(),
            })),
            pulls: Arc::new(PullCoalescer::default()),
        }
    }

    /// Makes `image` present locally.
    pub fn add_image(&self, image: &str) -> &Self {
        self.lock().insert_image(normalize_reference(image));
        self
    }

    /// Makes `image` pullable; a pull takes `pull_takes`. Pulls of images not added here fail
    /// with [`EngineError::ImageNotFound`], as a registry's 404 does.
    pub fn add_registry_image(&self, image: &str, pull_takes: Duration) -> &Self {
        self.lock()
            .registry
            .insert(normalize_reference(image), pull_takes);
        self
    }

    /// What the engine says it can enforce.
    pub fn set_capabilities(&self, capabilities: EngineCapabilities) -> &Self {
        self.lock().capabilities = capabilities;
        self
    }

    /// What containers do when no script matches.
    pub fn set_default_run(&self, run: FakeRun) -> &Self {
        self.lock().default_run = run;
        self
    }

    /// What containers carrying the label `key=value` do (checked before image scripts).
    pub fn script_label(&self, key: &str, value: &str, run: FakeRun) -> &Self {
        self.lock()
            .scripts
            .insert(0, (Selector::Label(key.to_owned(), value.to_owned()), run));
        self
    }

    /// What containers of `image` do.
    pub fn script_image(&self, image: &str, run: FakeRun) -> &Self {
        self.lock()
            .scripts
            .push((Selector::Image(normalize_reference(image)), run));
        self
    }

    /// Makes the next call of `operation` fail with `error` (queued: call again for more).
    pub fn fail_next(&self, operation: FakeOperation, error: EngineError) -> &Self {
        self.lock()
            .failures
            .entry(operation)
            .or_default()
            .push_back(error);
        self
    }

    /// From now on `started_at` and `finished_at` count from `now` instead of the fixed
    /// epoch: for callers that compare them with their own wall clock.
    pub fn set_clock(&self, now: Timestamp) -> &Self {
        let mut state = self.lock();
        state.epoch = now;
        state.epoch_instant = Instant::now();
        drop(state);
        self
    }

    /// While set, every operation fails with [`EngineError::Unreachable`].
    pub fn set_unreachable(&self, unreachable: bool) -> &Self {
        self.lock().unreachable = unreachable;
        self
    }

    /// How long `remove` takes (and reports).
    pub fn set_remove_takes(&self, duration: Duration) -> &Self {
        self.lock().remove_takes = duration;
        self
    }

    /// How many pulls of `image` actually ran (coalesced callers count once).
    pub fn pull_count(&self, image: &str) -> usize {
        self.lock()
            .pull_counts
            .get(&normalize_reference(image))
            .copied()
            .unwrap_or(0)
    }

    /// Every image build asked for so far, in order (failed ones too).
    pub fn builds(&self) -> Vec<BuildRequest> {
        self.lock().builds.clone()
    }

    /// Every container created so far, with its spec, in order (removed ones too).
    pub fn created(&self) -> Vec<(ContainerId, ContainerSpec)> {
        self.lock().created.clone()
    }

    /// The containers that exist now (created and not removed).
    pub fn existing(&self) -> Vec<ContainerId> {
        self.lock()
            .containers
            .keys()
            .cloned()
            .map(ContainerId::new)
            .collect()
    }

    /// The containers removed so far, in order.
    pub fn removed(&self) -> Vec<ContainerId> {
        self.lock().removed.clone()
    }

    /// The containers killed so far, in order.
    pub fn kills(&self) -> Vec<ContainerId> {
        self.lock().kills.clone()
    }

    /// The bytes put at `path` in container `id` when it was created, while the container
    /// exists and has such a file whose contents were kept.
    pub fn uploaded_file(&self, id: &ContainerId, path: &str) -> Option<Vec<u8>> {
        if !self.lock().containers.contains_key(id.as_str()) {
            return None;
        }
        match self.filesystem(id)?.get(path)? {
            FakeEntry {
                kind: FakeEntryKind::File { contents, .. },
                ..
            } => contents.clone(),
            FakeEntry { .. } => None,
        }
    }

    /// What container `id` held when it was created: the spec's directories and files and
    /// its unpacked package, as a runtime puts them in place. Kept after the container is
    /// removed.
    pub fn filesystem(&self, id: &ContainerId) -> Option<Arc<FakeFilesystem>> {
        self.lock().filesystems.get(id.as_str()).cloned()
    }

    /// The policy `network` was last isolated with, if it was.
    pub fn isolation(&self, network: &str) -> Option<EgressPolicy> {
        self.lock().isolations.get(network).cloned()
    }

    /// Removes a network, as `docker network prune` would behind a runner's back.
    pub fn remove_network(&self, name: &str) -> &Self {
        self.lock().networks.remove(name);
        self
    }

    /// Sets the size of the local image `image` (by reference), as `local_image` reports it.
    pub fn set_image_size(&self, image: &str, bytes: u64) -> &Self {
        let mut state = self.lock();
        if let Some(id) = state.find_image(image).map(|(_, id)| id.clone()) {
            state.image_sizes.insert(id, bytes);
        }
        self
    }

    /// The cap of the CPU group `name`, in billionths of a CPU, once it was made sure of.
    pub fn cpu_group(&self, name: &str) -> Option<u64> {
        self.lock().cpu_groups.get(name).copied()
    }

    /// The networks that exist, by name.
    pub fn networks(&self) -> Vec<NetworkInfo> {
        self.lock().networks.values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The injected failure for `operation`, if one is due.
    fn injected(&self, operation: FakeOperation) -> Result<(), EngineError> {
        let mut state = self.lock();
        if state.unreachable {
            return Err(EngineError::Unreachable {
                message: "the fake engine was told to be unreachable".to_owned(),
            });
        }
        match state
            .failures
            .get_mut(&operation)
            .and_then(VecDeque::pop_front)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn phase_of(&self, id: &ContainerId) -> Result<watch::Receiver<Phase>, EngineError> {
        self.lock()
            .containers
            .get(id.as_str())
            .map(|container| container.phase.subscribe())
            .ok_or_else(|| container_not_found(id))
    }

    fn now(&self) -> Timestamp {
        let state = self.lock();
        let elapsed = Instant::now().saturating_duration_since(state.epoch_instant);
        state.epoch + chrono::Duration::from_std(elapsed).unwrap_or_default()
    }
}

#[async_trait]
impl ContainerRuntime for FakeEngine {
    async fn capabilities(&self) -> Result<EngineCapabilities, EngineError> {
        self.injected(FakeOperation::Capabilities)?;
        Ok(self.lock().capabilities.clone())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, EngineError> {
        self.injected(FakeOperation::Create)?;
        spec.validate()?;
        // Read inline, not on a blocking thread: a test's paused clock must not run ahead
        // while a package is read. A package that cannot be read fails the create, as it
        // fails a real runtime's upload.
        let filesystem = Arc::new(filesystem_of(spec)?);
        let mut state = self.lock();
        if !state.images.contains_key(&normalize_reference(&spec.image)) {
            return Err(EngineError::ImageNotFound {
                image: spec.image.clone(),
            });
        }
        if let Some(network) = &spec.network_mode
            && !["bridge", "none", "host", "default"].contains(&network.as_str())
            && !state.networks.contains_key(network)
        {
            return Err(EngineError::Refused {
                message: format!("network {network} not found"),
            });
        }
        if let Some(name) = &spec.name
            && state
                .containers
                .values()
                .any(|c| c.spec.name.as_ref() == Some(name))
        {
            return Err(EngineError::Conflict {
                message: format!("the container name {name} is already in use"),
            });
        }
        let run = state
            .scripts
            .iter()
            .find(|(selector, _)| match selector {
                Selector::Label(key, value) => spec.labels.get(key) == Some(value),
                Selector::Image(image) => *image == normalize_reference(&spec.image),
            })
            .map(|(_, run)| run.clone())
            .unwrap_or_else(|| state.default_run.clone());
        let mut run = run;
        for echo in std::mem::take(&mut run.echoes) {
            let bytes = match echo {
                FakeEcho::File(path) => match filesystem.get(&path) {
                    Some(FakeEntry {
                        kind: FakeEntryKind::File { contents, .. },
                        ..
                    }) => contents.clone(),
                    _ => None,
                },
                FakeEcho::Env(name) => spec
                    .env
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.clone().into_bytes()),
                FakeEcho::Size(path) => match filesystem.get(&path) {
                    Some(FakeEntry {
                        kind: FakeEntryKind::File { size, .. },
                        ..
                    }) => Some(format!("{size}\n").into_bytes()),
                    _ => None,
                },
                FakeEcho::Listing(directory) => Some(listing(&filesystem, &directory)),
            };
            if let Some(bytes) = bytes {
                run = run.stdout(bytes);
            }
        }
        let id = ContainerId::new(format!("{:064x}", state.next_id));
        state.next_id += 1;
        state.containers.insert(
            id.as_str().to_owned(),
            FakeContainer {
                spec: spec.clone(),
                run,
                phase: watch::Sender::new(Phase::Created),
                kill: Arc::new(Notify::new()),
            },
        );
        state.created.push((id.clone(), spec.clone()));
        state.filesystems.insert(id.as_str().to_owned(), filesystem);
        Ok(id)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), EngineError> {
        self.injected(FakeOperation::Start)?;
        let (phase, kill, run) = {
            let state = self.lock();
            let container = state
                .containers
                .get(id.as_str())
                .ok_or_else(|| container_not_found(id))?;
            if !matches!(*container.phase.borrow(), Phase::Created) {
                // Docker answers 304 for an already started container: not an error.
                return Ok(());
            }
            (
                container.phase.clone(),
                Arc::clone(&container.kill),
                container.run.clone(),
            )
        };
        let started_at = self.now();
        phase.send_replace(Phase::Running);
        let engine = self.clone();
        tokio::spawn(async move {
            let killed = tokio::select! {
                () = sleep_or_forever(run.run_for) => false,
                () = kill.notified() => true,
            };
            let status = ExitStatus {
                exit_code: if killed {
                    KILLED_EXIT_CODE
                } else {
                    run.exit_code
                },
                oom_killed: !killed && run.oom_killed,
                started_at: Some(started_at),
                finished_at: Some(engine.now()),
                engine_error: run.engine_error.clone(),
                usage: None,
            };
            phase.send_replace(Phase::Exited(status));
        });
        Ok(())
    }

    async fn attach(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        self.injected(FakeOperation::Attach)?;
        let mut phase = self.phase_of(id)?;
        let engine = self.clone();
        let id = id.clone();
        let chunks = async move {
            // The output comes once the container started; a container removed before its
            // start had none.
            if phase
                .wait_for(|phase| !matches!(phase, Phase::Created))
                .await
                .is_err()
            {
                return Vec::new();
            }
            let (logs, breaks_after) = engine
                .lock()
                .containers
                .get(id.as_str())
                .map(|container| {
                    (
                        container.run.logs.clone(),
                        container.run.attachment_breaks_after,
                    )
                })
                .unwrap_or_default();
            match breaks_after {
                // The engine went away while the container runs: the attachment breaks then,
                // not when the container ends.
                Some(delivered) => {
                    let mut items: Vec<Result<LogChunk, EngineError>> =
                        logs.into_iter().take(delivered).map(Ok).collect();
                    items.push(Err(EngineError::Unreachable {
                        message: "the fake engine went away".to_owned(),
                    }));
                    items
                }
                None => {
                    let _ = phase
                        .wait_for(|phase| matches!(phase, Phase::Exited(_)))
                        .await;
                    logs.into_iter().map(Ok).collect()
                }
            }
        };
        Ok(futures::stream::once(chunks)
            .flat_map(futures::stream::iter)
            .boxed())
    }

    async fn kept_output(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        self.injected(FakeOperation::KeptOutput)?;
        let mut phase = self.phase_of(id)?;
        let engine = self.clone();
        let id = id.clone();
        // The whole scripted output, once the container stopped (it keeps printing until
        // then); nothing of a container that never started.
        let chunks = async move {
            let ended = phase
                .wait_for(|phase| !matches!(phase, Phase::Running))
                .await
                .map(|phase| matches!(*phase, Phase::Exited(_)));
            if !matches!(ended, Ok(true)) {
                return Vec::new();
            }
            engine
                .lock()
                .containers
                .get(id.as_str())
                .map(|container| container.run.logs.clone())
                .unwrap_or_default()
        };
        Ok(futures::stream::once(chunks)
            .flat_map(|logs| futures::stream::iter(logs.into_iter().map(Ok)))
            .boxed())
    }

    async fn wait(&self, id: &ContainerId) -> Result<ExitStatus, EngineError> {
        self.injected(FakeOperation::Wait)?;
        let mut phase = self.phase_of(id)?;
        let ended = phase
            .wait_for(|phase| !matches!(phase, Phase::Running))
            .await
            .map(|phase| phase.clone());
        match ended {
            Ok(Phase::Exited(status)) => Ok(status),
            // A container that never started is "not running" already, exit code 0.
            Ok(Phase::Created | Phase::Running) => Ok(ExitStatus {
                exit_code: 0,
                oom_killed: false,
                started_at: None,
                finished_at: None,
                engine_error: None,
                usage: None,
            }),
            // The container was removed while we waited.
            Err(_) => Err(container_not_found(id)),
        }
    }

    async fn kill(&self, id: &ContainerId) -> Result<(), EngineError> {
        self.injected(FakeOperation::Kill)?;
        let mut state = self.lock();
        let container = state
            .containers
            .get(id.as_str())
            .ok_or_else(|| container_not_found(id))?;
        if matches!(*container.phase.borrow(), Phase::Running) {
            container.kill.notify_one();
        }
        state.kills.push(id.clone());
        Ok(())
    }

    async fn stats_snapshot(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ResourceSample>, EngineError> {
        self.injected(FakeOperation::Stats)?;
        let state = self.lock();
        let container = state
            .containers
            .get(id.as_str())
            .ok_or_else(|| container_not_found(id))?;
        Ok(match *container.phase.borrow() {
            Phase::Running => Some(sample_of(&container.run)),
            Phase::Created | Phase::Exited(_) => None,
        })
    }

    fn stats(&self, id: &ContainerId) -> ResourceSampleStream {
        // One sample at once, as the engine streams its first right away; the stream then
        // ends when the container stops.
        let (engine, id) = (self.clone(), id.clone());
        let (follower, followed) = (self.clone(), id.clone());
        let sample =
            futures::stream::once(async move { engine.stats_snapshot(&id).await.transpose() });
        let until_stopped = futures::stream::once(async move {
            if let Ok(mut phase) = follower.phase_of(&followed)
                && matches!(*phase.borrow(), Phase::Running)
            {
                let _ = phase
                    .wait_for(|phase| matches!(phase, Phase::Exited(_)))
                    .await;
            }
            None
        });
        sample
            .chain(until_stopped)
            .filter_map(futures::future::ready)
            .boxed()
    }

    async fn remove(&self, id: &ContainerId) -> Result<Duration, EngineError> {
        self.injected(FakeOperation::Remove)?;
        let takes = {
            let mut state = self.lock();
            let container = state
                .containers
                .remove(id.as_str())
                .ok_or_else(|| container_not_found(id))?;
            // Force: a running container is killed on the way out.
            container.kill.notify_one();
            state.removed.push(id.clone());
            state.remove_takes
        };
        tokio::time::sleep(takes).await;
        Ok(takes)
    }

    async fn list_labeled(&self, key: &str, value: &str) -> Result<Vec<ContainerId>, EngineError> {
        self.injected(FakeOperation::List)?;
        Ok(self
            .lock()
            .containers
            .iter()
            .filter(|(_, container)| {
                container.spec.labels.get(key).map(String::as_str) == Some(value)
            })
            .map(|(id, _)| ContainerId::new(id.clone()))
            .collect())
    }

    async fn list_labeled_containers(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<ListedContainer>, EngineError> {
        self.injected(FakeOperation::List)?;
        Ok(self
            .lock()
            .containers
            .iter()
            .filter(|(_, container)| {
                container
                    .spec
                    .labels
                    .get(key)
                    .is_some_and(|found| value.is_none_or(|value| found == value))
            })
            .map(|(id, container)| ListedContainer {
                id: ContainerId::new(id.clone()),
                labels: container.spec.labels.clone(),
                running: matches!(*container.phase.borrow(), Phase::Running),
            })
            .collect())
    }

    async fn ensure_cpu_group(&self, name: &str, nano_cpus: u64) -> Result<(), EngineError> {
        self.injected(FakeOperation::CpuGroup)?;
        crate::cpu_group::check_name(name)?;
        self.lock().cpu_groups.insert(name.to_owned(), nano_cpus);
        Ok(())
    }

    async fn remove_cpu_group(&self, name: &str) -> Result<(), EngineError> {
        self.injected(FakeOperation::CpuGroup)?;
        let mut state = self.lock();
        let in_use = state
            .containers
            .values()
            .any(|container| container.spec.cpu_group.as_deref() == Some(name));
        if !in_use {
            state.cpu_groups.remove(name);
        }
        Ok(())
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<NetworkInfo>, EngineError> {
        self.injected(FakeOperation::Network)?;
        Ok(self.lock().networks.get(name).cloned())
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkInfo, EngineError> {
        self.injected(FakeOperation::Network)?;
        spec.validate()?;
        let mut state = self.lock();
        if let Some(existing) = state.networks.get(&spec.name) {
            if existing.bridge.as_deref() != Some(spec.bridge.as_str())
                || spec
                    .subnet
                    .is_some_and(|subnet| !existing.subnets.contains(&subnet))
            {
                return Err(EngineError::Conflict {
                    message: format!("the network {} exists with other settings", spec.name),
                });
            }
            return Ok(existing.clone());
        }
        let index = u8::try_from(state.networks.len() % 200).unwrap_or(0);
        let subnet = spec.subnet.unwrap_or_else(|| {
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(172, 30, index, 0), 24).unwrap_or_default()
        });
        let network = NetworkInfo {
            id: format!("{:064x}", state.next_id),
            name: spec.name.clone(),
            bridge: Some(spec.bridge.clone()),
            subnets: vec![subnet],
            gateways: subnet.hosts().next().into_iter().collect(),
            inter_container: false,
            ipv6: false,
        };
        state.next_id += 1;
        state.networks.insert(spec.name.clone(), network.clone());
        Ok(network)
    }

    async fn isolate_network(
        &self,
        network: &NetworkInfo,
        policy: &EgressPolicy,
    ) -> Result<(), EngineError> {
        self.injected(FakeOperation::Isolate)?;
        let mut state = self.lock();
        if !state.networks.contains_key(&network.name) {
            return Err(EngineError::Refused {
                message: format!("network {} not found", network.name),
            });
        }
        state
            .isolations
            .insert(network.name.clone(), policy.clone());
        Ok(())
    }
}

#[async_trait]
impl ImageStore for FakeEngine {
    async fn local_image(&self, image: &str) -> Result<Option<LocalImage>, EngineError> {
        self.injected(FakeOperation::ImagePresent)?;
        let state = self.lock();
        // The fake's images were never in a registry: they carry no repository digests.
        Ok(state.find_image(image).map(|(_, id)| LocalImage {
            id: id.clone(),
            repo_digests: Vec::new(),
            labels: state.image_labels.get(id).cloned().unwrap_or_default(),
            size_bytes: Some(
                state
                    .image_sizes
                    .get(id)
                    .copied()
                    .unwrap_or(FAKE_IMAGE_BYTES),
            ),
        }))
    }

    async fn list_images(&self) -> Result<Vec<ImageEntry>, EngineError> {
        self.injected(FakeOperation::ImagePresent)?;
        let state = self.lock();
        let mut by_id: BTreeMap<&String, ImageEntry> = BTreeMap::new();
        for (reference, id) in &state.images {
            by_id
                .entry(id)
                .or_insert_with(|| ImageEntry {
                    id: id.clone(),
                    references: Vec::new(),
                    size_bytes: state
                        .image_sizes
                        .get(id)
                        .copied()
                        .unwrap_or(FAKE_IMAGE_BYTES),
                })
                .references
                .push(reference.clone());
        }
        Ok(by_id.into_values().collect())
    }

    async fn remove_image(&self, image: &str) -> Result<(), EngineError> {
        self.injected(FakeOperation::RemoveImage)?;
        let mut state = self.lock();
        let Some((reference, _)) = state.find_image(image) else {
            return Err(EngineError::ImageNotFound {
                image: image.to_owned(),
            });
        };
        let reference = reference.clone();
        let in_use = state
            .containers
            .values()
            .any(|c| normalize_reference(&c.spec.image) == reference);
        if in_use {
            return Err(EngineError::Conflict {
                message: format!("the image {image} is used by a container"),
            });
        }
        state.images.remove(&reference);
        Ok(())
    }

    async fn check_registry_access(
        &self,
        image: &str,
        _registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError> {
        self.injected(FakeOperation::Pull)?;
        let reference = normalize_reference(image);
        if self.lock().registry.contains_key(&reference) {
            Ok(())
        } else {
            Err(EngineError::ImageNotFound { image: reference })
        }
    }

    async fn ensure_image(
        &self,
        image: &str,
        _registry_auth: Option<RegistryAuth>,
        progress: Option<PullProgressSender>,
    ) -> Result<ImagePresence, EngineError> {
        if self.image_present(image).await? {
            return Ok(ImagePresence::AlreadyPresent);
        }
        let reference = normalize_reference(image);
        let engine = self.clone();
        let pulled = reference.clone();
        self.pulls
            .pull(&reference, &reference, progress, move |events| async move {
                engine.injected(FakeOperation::Pull)?;
                let takes = engine.lock().registry.get(&pulled).copied();
                *engine.lock().pull_counts.entry(pulled.clone()).or_default() += 1;
                let Some(takes) = takes else {
                    return Err(EngineError::ImageNotFound { image: pulled });
                };
                let _ = events.send(PullProgress::Layer {
                    layer: "fake-layer".to_owned(),
                    status: "Downloading".to_owned(),
                    current: Some(0),
                    total: Some(100),
                });
                tokio::time::sleep(takes).await;
                let _ = events.send(PullProgress::Layer {
                    layer: "fake-layer".to_owned(),
                    status: "Pull complete".to_owned(),
                    current: Some(100),
                    total: Some(100),
                });
                engine.lock().insert_image(pulled);
                Ok(())
            })
            .await?;
        Ok(ImagePresence::Pulled)
    }
}

#[async_trait]
impl ImageBuilder for FakeEngine {
    async fn push_image(
        &self,
        image: &str,
        _registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError> {
        let reference = normalize_reference(image);
        let mut state = self.lock();
        if state.find_image(&reference).is_none() {
            return Err(EngineError::ImageNotFound { image: reference });
        }
        state.registry.insert(reference, Duration::ZERO);
        Ok(())
    }

    async fn import_image(
        &self,
        _rootfs_tar: Bytes,
        reference: &str,
        changes: &[String],
    ) -> Result<String, EngineError> {
        self.injected(FakeOperation::Import)?;
        let mut state = self.lock();
        let id = state.insert_image(normalize_reference(reference));
        // `LABEL key=value` changes, as the engine applies them.
        let labels = changes
            .iter()
            .filter_map(|change| change.strip_prefix("LABEL "))
            .filter_map(|label| label.split_once('='))
            .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
            .collect();
        state.image_labels.insert(id.clone(), labels);
        Ok(id)
    }

    /// Reads the context as the Docker engine does (so a missing Dockerfile, a broken
    /// `.dockerignore` or an oversized context fail the same way), reports one step per
    /// Dockerfile instruction, and adds the image under every tag. Nothing runs.
    async fn build_image(
        &self,
        request: &BuildRequest,
        on_progress: &mut (dyn FnMut(BuildProgress) + Send),
    ) -> Result<BuiltImage, EngineError> {
        self.lock().builds.push(request.clone());
        let plan = plan_context(request)?;
        on_progress(BuildProgress::Context {
            files: plan.files,
            bytes: plan.bytes,
        });
        self.injected(FakeOperation::Build)?;
        let dockerfile = std::fs::read_to_string(plan.dockerfile_path()).map_err(|error| {
            EngineError::InvalidBuildContext {
                reason: format!("cannot read {}: {error}", plan.dockerfile),
            }
        })?;
        let instructions = dockerfile_instructions(&dockerfile);
        if instructions.is_empty() {
            return Err(EngineError::BuildFailed {
                message: "the Dockerfile has no instructions".to_owned(),
            });
        }
        let total = u32::try_from(instructions.len()).unwrap_or(u32::MAX);
        for (number, instruction) in (1..).zip(instructions) {
            on_progress(BuildProgress::Step {
                number,
                total,
                instruction,
            });
        }
        let tags: Vec<String> = request
            .tags
            .iter()
            .map(|tag| normalize_reference(tag))
            .collect();
        let id = {
            let mut state = self.lock();
            let id = format!("sha256:{:064x}", state.next_id);
            state.next_id += 1;
            if tags.is_empty() {
                state.images.insert(id.clone(), id.clone());
            }
            for tag in &tags {
                state.images.insert(tag.clone(), id.clone());
            }
            state
                .image_labels
                .insert(id.clone(), request.labels.clone());
            id
        };
        on_progress(BuildProgress::ImageId { id: id.clone() });
        Ok(BuiltImage { id, tags })
    }
}

/// A Dockerfile's instructions, one a step: comments and blank lines dropped, continued lines
/// joined.
fn dockerfile_instructions(dockerfile: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => {
                current.push_str(continued.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.trim().is_empty() {
        instructions.push(current.trim().to_owned());
    }
    instructions
}

/// What a container created from `spec` holds: its directories, then its files, then its
/// package's files, each later entry replacing an earlier one at the same path as an
/// archive's would.
fn filesystem_of(spec: &ContainerSpec) -> Result<FakeFilesystem, EngineError> {
    let mut filesystem = FakeFilesystem::new();
    for directory in spec.effective_directories() {
        filesystem.insert(
            normalized_path(&directory.path),
            FakeEntry {
                mode: directory.mode,
                kind: FakeEntryKind::Directory,
            },
        );
    }
    for file in &spec.files {
        filesystem.insert(
            normalized_path(&file.path),
            FakeEntry {
                mode: file.mode,
                kind: FakeEntryKind::File {
                    size: file.contents.len() as u64,
                    contents: Some(file.contents.clone()),
                },
            },
        );
    }
    if let Some(package) = &spec.package {
        package.read_files(|file, contents| {
            let kept = if file.size <= FAKE_KEPT_FILE_BYTES {
                let mut bytes = Vec::new();
                contents.read_to_end(&mut bytes)?;
                Some(bytes)
            } else {
                std::io::copy(contents, &mut std::io::sink())?;
                None
            };
            filesystem.insert(
                normalized_path(&file.path),
                FakeEntry {
                    mode: file.mode,
                    kind: FakeEntryKind::File {
                        size: file.size,
                        contents: kept,
                    },
                },
            );
            Ok(())
        })?;
    }
    Ok(filesystem)
}

/// `path` absolute, without empty or `.` components: how the filesystem is keyed.
fn normalized_path(path: &str) -> String {
    format!("/{}", crate::spec::normalized(path))
}

/// [`FakeEcho::Listing`] of `directory`.
fn listing(filesystem: &FakeFilesystem, directory: &str) -> Vec<u8> {
    let prefix = format!("{}/", normalized_path(directory).trim_end_matches('/'));
    let mut lines = String::new();
    for (path, entry) in filesystem.range(prefix.clone()..) {
        if !path.starts_with(&prefix) {
            break;
        }
        if path.len() == prefix.len() {
            continue;
        }
        let slash = if entry.kind == FakeEntryKind::Directory {
            "/"
        } else {
            ""
        };
        lines.push_str(&format!("{:o} {path}{slash}\n", entry.mode));
    }
    lines.into_bytes()
}

fn container_not_found(id: &ContainerId) -> EngineError {
    EngineError::ContainerNotFound {
        id: id.as_str().to_owned(),
    }
}

fn sample_of(run: &FakeRun) -> ResourceSample {
    ResourceSample {
        memory_bytes: run.peak_memory_bytes,
        memory_peak_bytes: Some(run.peak_memory_bytes),
        cpu_total_ns: run.cpu_total_ns,
        pids: Some(1),
    }
}

async fn sleep_or_forever(duration: Duration) {
    match Instant::now().checked_add(duration) {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => futures::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FileToUpload;

    /// The fake under the runtime conformance suite: each program is a scripted run, chosen
    /// by a label of its own; files and environment come back through [`FakeEcho`].
    struct FakeHarness {
        engine: FakeEngine,
        programs: std::sync::atomic::AtomicU64,
    }

    const HARNESS_IMAGE: &str = "conformance/fake:1";

    async fn fake_harness(_check: &'static str) -> Option<FakeHarness> {
        let engine = FakeEngine::new();
        engine.add_image(HARNESS_IMAGE);
        Some(FakeHarness {
            engine,
            programs: std::sync::atomic::AtomicU64::new(0),
        })
    }

    impl crate::conformance::Harness for FakeHarness {
        fn runtime(&self) -> &dyn ContainerRuntime {
            &self.engine
        }

        fn spec(&self, program: &crate::conformance::Program) -> ContainerSpec {
            use crate::conformance::Program;
            let n = self
                .programs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_string();
            let mut spec = ContainerSpec::new(HARNESS_IMAGE);
            spec.labels.insert("conformance.program".into(), n.clone());
            let run = match program {
                Program::Exit(code) => FakeRun::exits(*code),
                Program::Print { stdout, stderr } => FakeRun::success()
                    .stdout(stdout.clone())
                    .stderr(stderr.clone()),
                Program::CatFiles(paths) => paths
                    .iter()
                    .fold(FakeRun::success(), |run, path| run.echo_file(path.clone())),
                Program::PrintEnv(name) => FakeRun::success().echo_env(name.clone()),
                Program::ListFiles(directory) => FakeRun::success().echo_listing(directory.clone()),
                Program::CountBytes(path) => FakeRun::success().echo_size(path.clone()),
                // The fake has no image files to look users up in: its suite leaves the
                // users' check out.
                Program::PrintGroups => FakeRun::success(),
                Program::ExceedMemory => {
                    spec.memory_bytes = Some(8 << 20);
                    FakeRun::oom_killed()
                }
                Program::Forever => FakeRun::forever(),
            };
            self.engine.script_label("conformance.program", &n, run);
            spec
        }
    }

    crate::runtime_conformance_tests!(model fake_harness);

    fn labeled(image: &str, task: &str) -> ContainerSpec {
        let mut spec = ContainerSpec::new(image);
        spec.labels.insert("stevedore.task".into(), task.into());
        spec
    }

    async fn collect_logs(mut logs: LogChunkStream) -> Vec<LogChunk> {
        let mut chunks = Vec::new();
        while let Some(chunk) = logs.next().await {
            match chunk {
                Ok(chunk) => chunks.push(chunk),
                Err(error) => panic!("logs failed: {error}"),
            }
        }
        chunks
    }

    #[tokio::test]
    async fn concurrent_ensure_image_pulls_once() -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_registry_image("team/app:1", Duration::from_millis(50));
        let mut waiters = Vec::new();
        for _ in 0..10 {
            let engine = engine.clone();
            waiters.push(tokio::spawn(async move {
                engine.ensure_image("team/app:1", None, None).await
            }));
        }
        for waiter in waiters {
            let presence = waiter
                .await
                .map_err(|e| EngineError::protocol(e.to_string()))??;
            assert_eq!(presence, ImagePresence::Pulled);
        }
        assert_eq!(engine.pull_count("team/app:1"), 1);
        assert_eq!(
            engine.ensure_image("team/app:1", None, None).await?,
            ImagePresence::AlreadyPresent
        );
        assert_eq!(engine.pull_count("team/app:1"), 1);
        Ok(())
    }

    #[tokio::test]
    async fn pull_progress_reaches_a_callback_and_only_when_pulling() -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_registry_image("team/app:1", Duration::from_millis(20));
        let mut events = Vec::new();
        let presence = engine
            .ensure_image_with_progress("team/app:1", None, &mut |event| events.push(event))
            .await?;
        assert_eq!(presence, ImagePresence::Pulled);
        assert_eq!(
            events.first(),
            Some(&PullProgress::Started {
                image: "team/app:1".into()
            })
        );
        assert!(events.iter().any(|event| matches!(
            event,
            PullProgress::Layer {
                current: Some(100),
                total: Some(100),
                ..
            }
        )));
        assert_eq!(
            events.last(),
            Some(&PullProgress::Finished {
                image: "team/app:1".into(),
                ok: true
            })
        );

        events.clear();
        let presence = engine
            .ensure_image_with_progress("team/app:1", None, &mut |event| events.push(event))
            .await?;
        assert_eq!(presence, ImagePresence::AlreadyPresent);
        assert!(events.is_empty(), "{events:?}");
        Ok(())
    }

    #[tokio::test]
    async fn builds_read_the_context_tag_the_image_and_report_steps()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("Dockerfile"),
            "# built by a test\nFROM stevedore/busybox:local\nRUN echo a \\\n  && echo b\n\nCMD [\"sh\"]\n",
        )?;
        let engine = FakeEngine::new();
        let request = BuildRequest::new(dir.path())
            .tag("team/app")
            .tag("team/app:2");
        let mut events = Vec::new();
        let built = engine
            .build_image(&request, &mut |event| events.push(event))
            .await?;
        assert_eq!(built.tags, vec!["team/app:latest", "team/app:2"]);
        assert_eq!(engine.image_id("team/app").await?, Some(built.id.clone()));
        assert_eq!(engine.image_id("team/app:2").await?, Some(built.id.clone()));
        assert!(matches!(
            events.first(),
            Some(BuildProgress::Context { files: 1, .. })
        ));
        let steps: Vec<(u32, u32, String)> = events
            .iter()
            .filter_map(|event| match event {
                BuildProgress::Step {
                    number,
                    total,
                    instruction,
                } => Some((*number, *total, instruction.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            steps,
            vec![
                (1, 3, "FROM stevedore/busybox:local".to_owned()),
                (2, 3, "RUN echo a && echo b".to_owned()),
                (3, 3, "CMD [\"sh\"]".to_owned()),
            ]
        );
        assert_eq!(
            events.last(),
            Some(&BuildProgress::ImageId {
                id: built.id.clone()
            })
        );

        engine.fail_next(
            FakeOperation::Build,
            EngineError::BuildFailed {
                message: "The command '/bin/sh -c exit 3' returned a non-zero code: 3".into(),
            },
        );
        let failed = engine.build_image(&request, &mut |_| {}).await;
        assert!(
            matches!(failed, Err(ref e @ EngineError::BuildFailed { .. }) if !e.is_infrastructure())
        );

        let missing = engine
            .build_image(&BuildRequest::new(dir.path().join("nope")), &mut |_| {})
            .await;
        assert!(matches!(
            missing,
            Err(EngineError::InvalidBuildContext { .. })
        ));
        assert_eq!(engine.builds().len(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_image_is_the_users_and_a_down_registry_is_not() {
        let engine = FakeEngine::new();
        let missing = engine.ensure_image("nope", None, None).await;
        assert!(matches!(missing, Err(ref e) if !e.is_infrastructure()));

        engine.add_registry_image("team/app:1", Duration::ZERO);
        engine.fail_next(
            FakeOperation::Pull,
            EngineError::PullFailed {
                image: "team/app:1".into(),
                message: "registry down".into(),
            },
        );
        let down = engine.ensure_image("team/app:1", None, None).await;
        assert!(matches!(down, Err(ref e) if e.is_infrastructure()));
        // The injected failure is spent: the next pull works.
        assert!(engine.ensure_image("team/app:1", None, None).await.is_ok());
    }

    #[tokio::test]
    async fn scripted_runs_report_exit_codes_oom_and_logs() -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_image("img");
        engine.script_label("stevedore.task", "fails", FakeRun::exits(3).stderr("bad\n"));
        engine.script_label("stevedore.task", "oom", FakeRun::oom_killed());
        engine.set_default_run(FakeRun::success().stdout("hello\n"));

        let ok = engine.create(&labeled("img", "ok")).await?;
        let output = engine.attach(&ok).await?;
        engine.start(&ok).await?;
        assert_eq!(
            collect_logs(output).await,
            vec![LogChunk {
                stream: OutputStream::Stdout,
                bytes: Bytes::from("hello\n")
            }]
        );
        assert!(engine.wait(&ok).await?.success());

        let fails = engine.create(&labeled("img", "fails")).await?;
        let output = engine.attach(&fails).await?;
        engine.start(&fails).await?;
        let status = engine.wait(&fails).await?;
        assert_eq!((status.exit_code, status.oom_killed), (3, false));
        assert_eq!(collect_logs(output).await[0].stream, OutputStream::Stderr);

        let oom = engine.create(&labeled("img", "oom")).await?;
        engine.start(&oom).await?;
        assert!(engine.wait(&oom).await?.oom_killed);
        Ok(())
    }

    #[tokio::test]
    async fn a_task_that_runs_forever_ends_when_killed() -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_image("img");
        engine.set_default_run(FakeRun::forever());
        let id = engine.create(&labeled("img", "hang")).await?;
        engine.start(&id).await?;
        let waited = tokio::time::timeout(Duration::from_millis(100), engine.wait(&id)).await;
        assert!(waited.is_err(), "a forever run must not end by itself");
        assert!(engine.stats_snapshot(&id).await?.is_some());

        engine.kill(&id).await?;
        let status = engine.wait(&id).await?;
        assert_eq!(status.exit_code, KILLED_EXIT_CODE);
        assert!(!status.oom_killed);
        assert_eq!(engine.stats_snapshot(&id).await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn run_time_follows_the_scripted_duration() -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_image("img");
        engine.set_default_run(
            FakeRun::success()
                .running_for(Duration::from_millis(200))
                .peak_memory(123),
        );
        let id = engine.create(&labeled("img", "slow")).await?;
        engine.start(&id).await?;
        let peak = {
            let engine = engine.clone();
            let id = id.clone();
            tokio::spawn(async move { engine.resource_peak(&id).await })
        };
        let status = engine.wait(&id).await?;
        let run_time = status.run_time().unwrap_or_default();
        assert!(run_time >= Duration::from_millis(200), "ran {run_time:?}");
        let usage = peak
            .await
            .map_err(|e| EngineError::protocol(e.to_string()))??;
        assert_eq!(usage.peak_memory_bytes, Some(123));
        Ok(())
    }

    #[tokio::test]
    async fn injected_failures_and_unreachability() -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_image("img");
        engine.fail_next(
            FakeOperation::Create,
            EngineError::Failed {
                message: "boom".into(),
            },
        );
        let failed = engine.create(&labeled("img", "a")).await;
        assert!(matches!(failed, Err(ref e) if e.is_infrastructure()));
        assert!(engine.create(&labeled("img", "a")).await.is_ok());

        engine.set_unreachable(true);
        assert!(matches!(
            engine.capabilities().await,
            Err(EngineError::Unreachable { .. })
        ));
        engine.set_unreachable(false);
        assert!(engine.capabilities().await.is_ok());
        Ok(())
    }

    #[tokio::test]
    async fn the_local_image_is_reused_while_busybox_is_unchanged() -> Result<(), EngineError> {
        let busybox = std::path::Path::new(crate::HOST_BUSYBOX);
        if !busybox.exists() {
            eprintln!("skipped: {} is not installed", crate::HOST_BUSYBOX);
            return Ok(());
        }
        let engine = FakeEngine::new();
        let first = crate::build_local_busybox_image(&engine, busybox, "local/bb:1").await?;
        assert!(first.was_built());
        let second = crate::build_local_busybox_image(&engine, busybox, "local/bb:1").await?;
        assert_eq!(
            second,
            crate::BuildOutcome::Reused {
                id: first.id().to_owned()
            }
        );
        assert_eq!(
            engine.image_id("local/bb:1").await?.as_deref(),
            Some(first.id())
        );
        Ok(())
    }

    #[tokio::test]
    async fn output_attached_before_the_start_arrives_and_a_removal_ends_it_empty()
    -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_image("img");
        engine.set_default_run(FakeRun::success().stdout("late\n"));
        let id = engine.create(&labeled("img", "early-attach")).await?;
        let output = engine.attach(&id).await?;
        engine.start(&id).await?;
        assert_eq!(collect_logs(output).await.len(), 1);

        let never_started = engine.create(&labeled("img", "never-started")).await?;
        let output = engine.attach(&never_started).await?;
        engine.remove(&never_started).await?;
        assert!(collect_logs(output).await.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn remove_and_list_labeled() -> Result<(), EngineError> {
        let engine = FakeEngine::new();
        engine.add_image("img");
        let mut spec = labeled("img", "t1");
        spec.files
            .push(FileToUpload::readable("/mnt/.task_payload", "{}"));
        let id = engine.create(&spec).await?;
        assert_eq!(
            engine.uploaded_file(&id, "/mnt/.task_payload"),
            Some(b"{}".to_vec())
        );
        assert_eq!(
            engine.list_labeled("stevedore.task", "t1").await?,
            vec![id.clone()]
        );
        engine.remove(&id).await?;
        assert!(
            engine
                .list_labeled("stevedore.task", "t1")
                .await?
                .is_empty()
        );
        assert!(matches!(
            engine.remove(&id).await,
            Err(EngineError::ContainerNotFound { .. })
        ));
        assert!(matches!(
            engine.create(&ContainerSpec::new("missing")).await,
            Err(EngineError::ImageNotFound { .. })
        ));
        Ok(())
    }
}
