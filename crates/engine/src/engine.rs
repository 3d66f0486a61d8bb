//! The [`ContainerEngine`] trait and the values that cross it.
//!
//! The trait knows containers, images and limits, not tasks: the runner maps a task onto a
//! [`ContainerSpec`](crate::ContainerSpec) and reads an [`ExitStatus`] back.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::build::{BuildProgress, BuildRequest, BuiltImage};
use crate::error::EngineError;
use crate::network::{EgressPolicy, NetworkInfo, NetworkSpec};
use crate::spec::{ContainerId, ContainerSpec};

/// Timestamps the engine reports (container start and finish), in UTC.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// A container's output as it is produced: ends when the container stops.
pub type LogChunkStream = BoxStream<'static, Result<LogChunk, EngineError>>;

/// A container's resource samples, about one a second while it runs: ends when it stops.
pub type ResourceSampleStream = BoxStream<'static, Result<ResourceSample, EngineError>>;

/// Where [`ImageStore::ensure_image`] reports pull progress. Unbounded, so a slow reader
/// (a progress bar) never holds up a pull that other tasks wait for.
pub type PullProgressSender = tokio::sync::mpsc::UnboundedSender<PullProgress>;

/// The container runtime a runner drives: Docker today, perhaps Kubernetes Jobs or Podman
/// later.
///
/// It knows containers and the limits it can enforce; images reach it through an
/// [`ImageStore`]. Every method classifies its failures into [`EngineError`] from the
/// runtime's structured answers, never from message text; see
/// [`EngineError::is_infrastructure`] for which failures are the user's.
///
/// The lifecycle of one task container is `create` (files in place) → `attach` → `start` →
/// its output and `wait` (and `kill` on timeout or cancel) → `remove`. A second implementation proves itself
/// by passing the conformance suite (`conformance`, cargo feature `test-support`) that the
/// Docker implementation and the fake pass.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// What the runtime can enforce (memory, swap, CPU and process limits) and runs on; a
    /// runner refuses to start on a runtime that would silently ignore a limit it needs
    /// ([`check_required`]).
    async fn capabilities(&self) -> Result<EngineCapabilities, EngineError>;

    /// Creates a container with the spec's directories and files in place and its package
    /// unpacked (how they get there is the runtime's business: Docker uploads one archive,
    /// streamed as it is written, never a bind mount; a package is read entry by entry, never
    /// held whole). The container is not started. When the files cannot be put in place the
    /// container is removed again and the error returned ([`EngineError::InvalidPackage`]
    /// for a package whose entry holds another size than it declares).
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, EngineError>;

    /// Starts a created container.
    async fn start(&self, id: &ContainerId) -> Result<(), EngineError>;

    /// Attaches to the container's stdout and stderr, kept apart: call it after `create` and
    /// before `start`. The stream delivers everything the container writes from its start and
    /// ends when the container stopped and its output is delivered. Failures (the container
    /// does not exist) are the call's error.
    ///
    /// The runtime keeps only a bounded copy of the output ([`Self::kept_output`]), so a task
    /// that prints without end fills no disk: the attached reader is what ships it. A reader
    /// slower than the container holds the container's writes back instead of losing
    /// output; dropping the stream detaches, and later output is discarded.
    async fn attach(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError>;

    /// The output the runtime kept of the container, stdout and stderr in the order they were
    /// written, from the oldest it still holds, following it until the container stops: what
    /// a runner whose attachment broke (the engine went away and came back) reads to ship the
    /// rest. The runtime keeps only a bounded tail (Docker: its `local` log driver, one file
    /// of [`KEPT_OUTPUT_BYTES`](crate::KEPT_OUTPUT_BYTES)), so the caller compares what it
    /// gets with what it had read. What the container printed while the engine was away and
    /// nobody read its pipe is not there.
    async fn kept_output(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError>;

    /// Waits until the container stops, then reports how it ended.
    async fn wait(&self, id: &ContainerId) -> Result<ExitStatus, EngineError>;

    /// Kills the container (SIGKILL). Killing a container that already stopped succeeds.
    async fn kill(&self, id: &ContainerId) -> Result<(), EngineError>;

    /// One resource sample now; `None` when the container is not running.
    async fn stats_snapshot(&self, id: &ContainerId)
    -> Result<Option<ResourceSample>, EngineError>;

    /// Whether [`ContainerRuntime::wait`] reports what the container used over its whole
    /// life ([`ExitStatus::usage`]), asked right after `start`. When it does, nothing needs
    /// to sample the container while it runs; when it does not, the caller follows
    /// [`ContainerRuntime::stats`]. Docker on the engine's own host keeps an account of each
    /// container (a cgroup that outlives it); by default a runtime keeps none.
    async fn usage_accounted(&self, _id: &ContainerId) -> bool {
        false
    }

    /// Resource samples while the container runs; the stream ends when it stops.
    fn stats(&self, id: &ContainerId) -> ResourceSampleStream;

    /// Follows [`ContainerRuntime::stats`] until the container stops and returns the peaks.
    /// Start it right after `start` and await it after `wait`.
    async fn resource_peak(&self, id: &ContainerId) -> Result<ResourceUsage, EngineError> {
        let mut usage = ResourceUsage::default();
        let mut samples = self.stats(id);
        while let Some(sample) = samples.next().await {
            usage.record(&sample?);
        }
        Ok(usage)
    }

    /// Removes the container, forcefully (killing it if it runs) and with its anonymous
    /// volumes. Returns how long the engine took, because slow deletes are worth watching.
    async fn remove(&self, id: &ContainerId) -> Result<Duration, EngineError>;

    /// Removes what the runtime keeps ready for the next tasks and no task uses now (Docker's
    /// idle network holders): called by a runner as it stops, before it reaps what is left.
    async fn release_idle(&self) {}

    /// Every container, running or not, that carries the label `key=value`: how a runner
    /// finds the leftovers of an earlier life at start-up.
    async fn list_labeled(&self, key: &str, value: &str) -> Result<Vec<ContainerId>, EngineError>;

    /// Every container that carries the label `key` (with the value `value` when given), with
    /// its labels and whether it is running: what a watchdog needs to match the containers of
    /// a runner to the leases they run under, and a runner to find other runners' containers.
    async fn list_labeled_containers(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<ListedContainer>, EngineError>;

    /// Makes sure of the CPU group `name`: the containers created with it as their
    /// [`ContainerSpec::cpu_group`](crate::ContainerSpec::cpu_group) use at most `nano_cpus`
    /// (billionths of a CPU) together, so that whatever runs beside them on the runtime's
    /// host (the API and the store of `serve`) keeps the rest however many are busy. Each
    /// container keeps its own limit inside the group's. Idempotent; asking again changes the
    /// cap. When the runtime cannot cap a group (it runs on another host, no permission, a
    /// cgroup manager it does not drive) the answer is [`EngineError::LimitUnenforceable`],
    /// never a silent success; a bad name is [`EngineError::InvalidSpec`].
    async fn ensure_cpu_group(&self, name: &str, nano_cpus: u64) -> Result<(), EngineError>;

    /// Removes the CPU group `name` once no container is in it (a runner that stops); a group
    /// that does not exist, or still holds containers, is left as it is.
    async fn remove_cpu_group(&self, name: &str) -> Result<(), EngineError>;

    /// The network `name`, or `None` when the runtime has none of that name.
    async fn inspect_network(&self, name: &str) -> Result<Option<NetworkInfo>, EngineError>;

    /// Makes sure the network `spec` describes exists, with containers on it cut off from
    /// each other and without IPv6, and returns it. Idempotent, also when several callers
    /// ask at once: an existing network is reused when it matches the spec, and refused
    /// ([`EngineError::Conflict`]) when it does not. A spec with a bad name is
    /// [`EngineError::InvalidSpec`].
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkInfo, EngineError>;

    /// Holds the containers on `network` to `policy` from now on, replacing the policy this
    /// runtime applied to it before: no traffic to the runtime's host nor between them, no
    /// blocked range, except the allowed destinations. When the runtime cannot enforce it
    /// (no host firewall it may change, the network's host is another machine) the answer
    /// is [`EngineError::LimitUnenforceable`], never a silent success.
    async fn isolate_network(
        &self,
        network: &NetworkInfo,
        policy: &EgressPolicy,
    ) -> Result<(), EngineError>;
}

/// The images a runtime runs containers from, as a runner needs them: whether one is
/// present (and what it is), pulling one that is missing, and asking a registry whether given
/// credentials may pull it.
///
/// Kept apart from [`ContainerRuntime`] because it answers to registries and credentials, not
/// to containers: a runtime that pulls for itself (a cluster's nodes) pairs with a store that
/// only asks the registry, and the runtime's conformance does not depend on a registry being
/// reachable. The runner holds both, as one [`ContainerEngine`].
#[async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// The id of `image` when it is present locally, `None` when it is not.
    async fn image_id(&self, image: &str) -> Result<Option<String>, EngineError> {
        Ok(self.local_image(image).await?.map(|local| local.id))
    }

    /// Whether `image` is present locally.
    async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        Ok(self.image_id(image).await?.is_some())
    }

    /// The local image's id, repository digests and labels, `None` when it is not present.
    async fn local_image(&self, image: &str) -> Result<Option<LocalImage>, EngineError>;

    /// Every local image with its references and size: what a janitor keeping the images
    /// under a disk budget weighs.
    async fn list_images(&self) -> Result<Vec<ImageEntry>, EngineError>;

    /// Removes a local image (by reference or id), without force: an image a container still
    /// uses (running or not) is refused with [`EngineError::Conflict`]. Removing one of
    /// several references of an image only removes that reference.
    async fn remove_image(&self, image: &str) -> Result<(), EngineError>;

    /// Asks `image`'s registry, through the engine, whether `registry_auth` (or no
    /// credentials at all) may pull it: the engine fetches the manifest's descriptor, no
    /// layers. `Ok` when it may; [`EngineError::RegistryDenied`] when the registry refuses
    /// the credentials, or demands some and none were given; [`EngineError::ImageNotFound`]
    /// when the registry does not have it; an infrastructure error when the registry cannot
    /// be reached.
    async fn check_registry_access(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError>;

    /// Makes sure `image` is present locally: done at once when it is, pulled otherwise.
    ///
    /// Concurrent calls for the same image with the same credentials share one pull (a
    /// caller with other credentials pulls on its own, so nobody gets an image through
    /// someone else's access). A caller that drops its call (a deadline of its own, a size
    /// limit) leaves the pull to the others; when the last one does, the pull is stopped.
    /// Each caller gets the pull's result
    /// and, when it passed a `progress` sender, the progress events from the moment it joined.
    /// A reference without a tag or digest means `:latest` (never "every tag"). A pull the
    /// engine fails without saying why (Docker answers 500 for refused credentials and
    /// unreachable registries alike) is classified by asking the registry
    /// ([`ImageStore::check_registry_access`]).
    async fn ensure_image(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
        progress: Option<PullProgressSender>,
    ) -> Result<ImagePresence, EngineError>;

    /// [`ImageStore::ensure_image`] with its progress handed to `on_progress` as it
    /// happens, for a progress display: `Started`, then layer and message events, then
    /// `Finished` when a pull was needed; nothing when the image was present.
    async fn ensure_image_with_progress(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
        on_progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<ImagePresence, EngineError> {
        let (sink, mut events) = tokio::sync::mpsc::unbounded_channel();
        let ensure = self.ensure_image(image, registry_auth, Some(sink));
        let mut ensure = std::pin::pin!(ensure);
        loop {
            tokio::select! {
                result = &mut ensure => {
                    while let Ok(event) = events.try_recv() {
                        on_progress(event);
                    }
                    return result;
                }
                Some(event) = events.recv() => on_progress(event),
            }
        }
    }
}

/// Making images rather than running them: what `code push --dockerfile` and
/// `stack build-local` need, and no runner does. A builder works on an [`ImageStore`] (it
/// pulls base images and reuses an image whose recipe is unchanged), hence the supertrait.
#[async_trait]
pub trait ImageBuilder: ImageStore {
    /// Builds an image from a Dockerfile (`docker build`) and tags it.
    ///
    /// The context directory is read and checked first (Dockerfile present, `.dockerignore`
    /// applied, size within [`BuildRequest::max_context_bytes`]), then streamed to the
    /// engine. Progress arrives on `on_progress` while the build runs: the context's size,
    /// each step, the output lines, base-image pulls and the image id. A failing build is
    /// [`EngineError::BuildFailed`] with the engine's message, an unusable context
    /// [`EngineError::InvalidBuildContext`]; both are the user's. Intermediate containers are
    /// removed, also when a step fails. Dropping the future cancels the build.
    async fn build_image(
        &self,
        request: &BuildRequest,
        on_progress: &mut (dyn FnMut(BuildProgress) + Send),
    ) -> Result<BuiltImage, EngineError>;

    /// Imports a root filesystem tar as the image `reference` (`docker import`), applying
    /// Dockerfile-style `changes` such as `CMD ["sh"]`. Returns the new image's id.
    async fn import_image(
        &self,
        rootfs_tar: Bytes,
        reference: &str,
        changes: &[String],
    ) -> Result<String, EngineError>;

    /// Pushes the local image `image` to its registry with `registry_auth`.
    async fn push_image(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError>;
}

/// What a runner holds: a [`ContainerRuntime`] and the [`ImageStore`] its containers come
/// from, as one `Arc<dyn ContainerEngine>`. Implemented for everything that is both.
pub trait ContainerEngine: ContainerRuntime + ImageStore {}

impl<T: ContainerRuntime + ImageStore + ?Sized> ContainerEngine for T {}

/// What an engine says it can enforce and what it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineCapabilities {
    /// Memory limits are enforced (cgroup memory controller).
    pub memory_limit: bool,
    /// Memory+swap limits are enforced (swap accounting).
    pub swap_limit: bool,
    /// CPU quotas are enforced (CFS quota).
    pub cpu_cfs_quota: bool,
    /// Process count limits are enforced (pids controller).
    pub pids_limit: bool,
    /// The engine's version, e.g. `20.10.24+dfsg1`.
    pub server_version: String,
    /// The newest API version the engine speaks, e.g. `1.41`.
    pub api_version: String,
    /// The API version this client uses after negotiation.
    pub negotiated_api_version: String,
    /// CPUs the engine's machine has.
    pub ncpu: u64,
    /// Memory the engine's machine has, in bytes.
    pub mem_total: u64,
    /// `1` or `2`, when the engine says.
    pub cgroup_version: Option<String>,
    /// The engine host's operating system, for logs.
    pub operating_system: Option<String>,
    /// The engine's own warnings (e.g. about missing swap accounting), for logs.
    pub warnings: Vec<String>,
}

/// Which limits the configuration needs the engine to enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirements {
    /// Memory limits are needed (stevedore always sets one; default true).
    pub memory_limit: bool,
    /// Swap accounting is needed so memory+swap is capped too (default false: on a host
    /// without swap the memory limit alone holds).
    pub swap_limit: bool,
    /// CPU quotas are needed (some code sets `cpus`).
    pub cpu_quota: bool,
    /// Process limits are needed.
    pub pids_limit: bool,
    /// The operator's explicit permission to run although memory limits cannot be enforced.
    /// The check then passes with a warning; nothing else is relaxed.
    pub allow_unenforced_memory_limit: bool,
}

/// What the engine holds of a local image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// The image's id.
    pub id: String,
    /// `RepoDigests`: the `repository@digest` names it has in registries it was pulled from or
    /// pushed to. Empty for an image built or imported here and never pushed.
    pub repo_digests: Vec<String>,
    /// The image's labels (`stevedore.recipe` on the local stack images).
    pub labels: BTreeMap<String, String>,
    /// Its size on disk, unpacked, when the runtime says.
    pub size_bytes: Option<u64>,
}

/// One local image, as [`ImageStore::list_images`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// The image's id.
    pub id: String,
    /// Its references (`repository:tag`); empty for an untagged image.
    pub references: Vec<String>,
    /// Its size on disk, unpacked, layers it shares with other images included.
    pub size_bytes: u64,
}

/// Credentials for a private registry, sent with a pull.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct RegistryAuth {
    /// The registry's user name.
    pub username: Option<String>,
    /// The password or access token.
    pub password: Option<String>,
    /// An identity token from a previous login, instead of user name and password.
    pub identity_token: Option<String>,
    /// The registry's address, e.g. `registry.example.com`.
    pub server_address: Option<String>,
}

/// Whether [`ImageStore::ensure_image`] had to pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePresence {
    /// The image was there already.
    AlreadyPresent,
    /// The image was pulled (by this call or by a concurrent one it joined).
    Pulled,
}

/// One step of an image pull, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    /// The pull began (or this caller joined one that was under way).
    Started {
        /// The image being pulled.
        image: String,
    },
    /// A layer moved on: `status` is the engine's word ("Downloading", "Extracting",
    /// "Pull complete"), for display only.
    Layer {
        /// The layer's id.
        layer: String,
        /// The engine's status line, for display.
        status: String,
        /// Bytes done, when known.
        current: Option<u64>,
        /// Bytes in all, when known.
        total: Option<u64>,
    },
    /// A message that is not about one layer (digest, "Status: Downloaded newer image").
    Message {
        /// The engine's status line, for display.
        status: String,
    },
    /// The pull ended, successfully or not.
    Finished {
        /// The image that was pulled.
        image: String,
        /// Whether it succeeded.
        ok: bool,
    },
}

/// Which of a container's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A container as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedContainer {
    pub id: ContainerId,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Started and not stopped yet.
    pub running: bool,
}

/// A piece of a container's output, as the engine delivered it (not split into lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The stream it came from.
    pub stream: OutputStream,
    /// The bytes, unchanged.
    pub bytes: Bytes,
}

/// How a container ended, from the engine's `State` after the wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// `State.ExitCode`: the main process's exit code (137 after SIGKILL).
    pub exit_code: i64,
    /// `State.OOMKilled`: the memory limit was hit and the kernel killed a process.
    pub oom_killed: bool,
    /// `State.StartedAt`; `None` if the container never started.
    pub started_at: Option<Timestamp>,
    /// `State.FinishedAt`; `None` if the engine did not record it.
    pub finished_at: Option<Timestamp>,
    /// `State.Error`: the engine's own failure to run the container (e.g. the command does
    /// not exist), for logs and messages only.
    pub engine_error: Option<String>,
    /// What the container used over its whole life, exactly, when the runtime keeps its own
    /// account ([`ContainerRuntime::usage_accounted`]); `None` otherwise.
    pub usage: Option<ResourceUsage>,
}

/// One resource sample of a running container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceSample {
    /// Memory in use now, in bytes.
    pub memory_bytes: u64,
    /// The cgroup's own peak memory so far, when the engine reports it (cgroup v1).
    pub memory_peak_bytes: Option<u64>,
    /// CPU time used since start, in nanoseconds.
    pub cpu_total_ns: u64,
    /// Processes and threads in the container now, when the engine reports it.
    pub pids: Option<u64>,
}

/// The peaks over a container's life, folded from its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceUsage {
    /// The highest memory use seen (the cgroup's own peak where the engine reports one,
    /// otherwise the highest sample, which can miss a spike between samples).
    pub peak_memory_bytes: Option<u64>,
    /// The CPU time used, from the last sample.
    pub cpu_total_ns: Option<u64>,
    /// The most processes and threads seen at once.
    pub peak_pids: Option<u64>,
    /// How many samples were seen; 0 for a container that stopped before the first.
    pub samples: u32,
}

// === impl ExitStatus ===

impl ExitStatus {
    /// True for exit code 0 without an OOM kill.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.oom_killed
    }

    /// How long the container ran, when the engine recorded both ends.
    ///
    /// The engine stamps `StartedAt` after the process is already running, so a process that
    /// exits at once can finish "before" it started; that counts as zero.
    pub fn run_time(&self) -> Option<Duration> {
        let (Some(started), Some(finished)) = (self.started_at, self.finished_at) else {
            return None;
        };
        Some((finished - started).to_std().unwrap_or(Duration::ZERO))
    }
}

// === impl ResourceUsage ===

impl ResourceUsage {
    /// Folds one sample into the peaks.
    pub fn record(&mut self, sample: &ResourceSample) {
        let seen = sample
            .memory_peak_bytes
            .unwrap_or(0)
            .max(sample.memory_bytes);
        self.peak_memory_bytes = Some(self.peak_memory_bytes.unwrap_or(0).max(seen));
        self.cpu_total_ns = Some(self.cpu_total_ns.unwrap_or(0).max(sample.cpu_total_ns));
        if let Some(pids) = sample.pids {
            self.peak_pids = Some(self.peak_pids.unwrap_or(0).max(pids));
        }
        self.samples = self.samples.saturating_add(1);
    }
}

// === impl Requirements ===

impl Default for Requirements {
    fn default() -> Self {
        Requirements {
            memory_limit: true,
            swap_limit: false,
            cpu_quota: false,
            pids_limit: false,
            allow_unenforced_memory_limit: false,
        }
    }
}

// === impl RegistryAuth ===

impl std::fmt::Debug for RegistryAuth {
    // Never print secrets, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "identity_token",
                &self.identity_token.as_ref().map(|_| "<redacted>"),
            )
            .field("server_address", &self.server_address)
            .finish()
    }
}

/// Refuses an engine that cannot enforce a limit the configuration needs, with a message an
/// operator can act on. Missing memory limits pass only with
/// [`Requirements::allow_unenforced_memory_limit`], and then with a logged warning.
pub fn check_required(
    capabilities: &EngineCapabilities,
    requirements: &Requirements,
) -> Result<(), EngineError> {
    if requirements.memory_limit && !capabilities.memory_limit {
        if requirements.allow_unenforced_memory_limit {
            tracing::warn!(
                server_version = %capabilities.server_version,
                "the container engine cannot enforce memory limits; running anyway because \
                 this was explicitly allowed: a task can exhaust this machine's memory"
            );
        } else {
            return Err(EngineError::LimitUnenforceable {
                capability: "memory limits".to_owned(),
                hint: "the engine reports MemoryLimit=false (no cgroup memory controller); \
                       enable it (cgroup_enable=memory on the kernel command line, or cgroup v2), \
                       or explicitly allow unenforced memory limits"
                    .to_owned(),
            });
        }
    }
    if requirements.swap_limit && !capabilities.swap_limit {
        return Err(EngineError::LimitUnenforceable {
            capability: "swap limits".to_owned(),
            hint: "the engine reports SwapLimit=false; enable swap accounting \
                   (swapaccount=1 on the kernel command line, or cgroup v2) or run without swap"
                .to_owned(),
        });
    }
    if requirements.cpu_quota && !capabilities.cpu_cfs_quota {
        return Err(EngineError::LimitUnenforceable {
            capability: "CPU quotas".to_owned(),
            hint: "the engine reports CpuCfsQuota=false; enable CFS bandwidth control in the \
                   kernel, or configure no CPU limits"
                .to_owned(),
        });
    }
    if requirements.pids_limit && !capabilities.pids_limit {
        return Err(EngineError::LimitUnenforceable {
            capability: "process limits".to_owned(),
            hint: "the engine reports PidsLimit=false; enable the cgroup pids controller, \
                   or configure no pids limit"
                .to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn everything() -> EngineCapabilities {
        EngineCapabilities {
            memory_limit: true,
            swap_limit: true,
            cpu_cfs_quota: true,
            pids_limit: true,
            ..EngineCapabilities::default()
        }
    }

    #[test]
    fn an_engine_without_memory_limits_is_refused_unless_allowed() {
        let capabilities = EngineCapabilities {
            memory_limit: false,
            ..everything()
        };
        let refused = check_required(&capabilities, &Requirements::default());
        assert!(matches!(
            refused,
            Err(EngineError::LimitUnenforceable { ref capability, .. }) if capability == "memory limits"
        ));

        let allowed = Requirements {
            allow_unenforced_memory_limit: true,
            ..Requirements::default()
        };
        assert_eq!(check_required(&capabilities, &allowed), Ok(()));
    }

    #[test]
    fn other_missing_limits_are_refused_only_when_needed() {
        let capabilities = EngineCapabilities {
            swap_limit: false,
            cpu_cfs_quota: false,
            pids_limit: false,
            ..everything()
        };
        assert_eq!(
            check_required(&capabilities, &Requirements::default()),
            Ok(())
        );
        for requirements in [
            Requirements {
                swap_limit: true,
                ..Requirements::default()
            },
            Requirements {
                cpu_quota: true,
                ..Requirements::default()
            },
            Requirements {
                pids_limit: true,
                ..Requirements::default()
            },
        ] {
            assert!(check_required(&capabilities, &requirements).is_err());
        }
    }

    #[test]
    fn usage_keeps_the_peaks() {
        let mut usage = ResourceUsage::default();
        usage.record(&ResourceSample {
            memory_bytes: 10,
            memory_peak_bytes: None,
            cpu_total_ns: 5,
            pids: Some(3),
        });
        usage.record(&ResourceSample {
            memory_bytes: 4,
            memory_peak_bytes: Some(12),
            cpu_total_ns: 9,
            pids: None,
        });
        usage.record(&ResourceSample {
            memory_bytes: 3,
            memory_peak_bytes: None,
            cpu_total_ns: 11,
            pids: Some(2),
        });
        assert_eq!(
            usage,
            ResourceUsage {
                peak_memory_bytes: Some(12),
                cpu_total_ns: Some(11),
                peak_pids: Some(3),
                samples: 3
            }
        );
    }

    #[test]
    fn registry_secrets_never_print() {
        let auth = RegistryAuth {
            username: Some("me".into()),
            password: Some("hunter2".into()),
            identity_token: Some("tok".into()),
            server_address: None,
        };
        let printed = format!("{auth:?}");
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains("tok\""));
    }
}
