//! [`OciRuntime`]: task containers run by an OCI runtime binary (`crun` or `runc`, through
//! the CLI both speak) from bundles of stevedore's own, without a container engine daemon.
//!
//! ```text
//! <state root>/containers/<id>/   one bundle per container, removed with it
//!     config.json                 the OCI configuration (bundle.rs)
//!     meta.json                   labels, cgroup, network: what a later process needs to
//!                                 list and remove it
//!     rootfs/                     the overlay: the image's layers under upper/ (work/)
//!     hosts hostname resolv.conf  bound read-only into the container
//!     pid output exit.json        the init's pid, the kept output, how it ended
//! <state root>/runtime/           the runtime's own state (`--root`)
//! ```
//!
//! `create` makes the bundle, mounts the overlay, puts the spec's directories, files and
//! package into it (rootfs.rs), and makes the task's own cgroup with its limits (cgroup.rs);
//! nothing runs yet. `start` runs `<runtime> run` in the foreground with stdout and stderr on
//! pipes (without a terminal the runtime hands its stdio to the container's process): the
//! runtime process lives as long as the container, reaps it, exits with its status (128 +
//! the signal for a killed one) and deletes its own state and cgroup. Stevedore's cgroup
//! outlives it, so OOM kills, CPU time and peak memory are read exactly after the exit.
//!
//! A runner killed with `-9` leaves its containers running under their runtime processes;
//! the next runner finds their bundles by label ([`ContainerRuntime::list_labeled`]) and
//! removes them: kill, the runtime's state, the mount, the cgroup, the bundle.
//!
//! `crun` refuses hosts whose cgroup v2 hierarchy beside the v1 controllers holds a
//! controller ("hybrid mode"); there it runs in a mount namespace of its own without the v2
//! mount, which leaves it the v1 controllers the task groups are made on. The namespace is
//! made by a short-lived thread of this process that then starts the runtime
//! ([`spawn_without_unified`]): no `unshare`, shell and `umount` processes before each
//! runtime call.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::cpu_group::{self, Hierarchy};
use crate::engine::{
    ContainerRuntime, EngineCapabilities, ExitStatus, ListedContainer, LogChunk, LogChunkStream,
    OutputStream, ResourceSample, ResourceSampleStream, Timestamp,
};
use crate::error::EngineError;
use crate::network::{EgressPolicy, NetworkInfo, NetworkSpec};
use crate::oci::cgroup::{self, Limits, TaskGroup};
use crate::oci::{ImagePin, NetnsSource, TaskNetns, UnpackedImages, bundle, rootfs};
use crate::spec::{ContainerId, ContainerSpec, KEPT_OUTPUT_BYTES};

/// The OCI specification version the configurations are written for.
const OCI_VERSION: &str = "1.0.2";
/// The network a spec without a network mode is put on (what Docker calls its default).
const DEFAULT_NETWORK: &str = "bridge";
/// Chunks of output read ahead of a slow attached reader before the container's writes are
/// held back.
const ATTACH_CHUNKS: usize = 16;
/// The most read from a pipe at once.
const READ_BYTES: usize = 64 << 10;
/// How long a start waits for the runtime to have made the container.
const START_PATIENCE: Duration = Duration::from_secs(30);
/// How long a removal waits for a killed container's runtime to end.
const STOP_PATIENCE: Duration = Duration::from_secs(10);
/// How often a resource sample is taken while a container runs.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// How [`OciRuntime`] is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciSettings {
    /// Where bundles and the runtime's state live: a directory of its own on a local file
    /// system that can hold overlayfs upper directories (not itself on overlayfs), e.g.
    /// `<data dir>/oci`. Made when missing.
    ///
    /// Every task's writes land here (its overlay's upper directory), and each task makes and
    /// removes a dozen small files: on a tmpfs (`/run/...`) a `true` task costs about half
    /// the time it does on a busy ext4 disk, but what tasks write, and the files and packages
    /// put into them, are then held in memory until their removal.
    pub state_root: PathBuf,
    /// The runtime binary (`crun`, `runc`, or a path to either); `None` picks `crun` when it
    /// is installed, `runc` otherwise.
    pub runtime: Option<PathBuf>,
}

/// Which OCI runtime drives the containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OciRuntimeKind {
    /// `crun` (C, the faster to start a container).
    Crun,
    /// `runc` (Go, what Docker itself runs).
    Runc,
}

/// Task containers run by `crun` or `runc` from stevedore's own bundles, on images from an
/// [`UnpackedImages`], in network namespaces from a [`NetnsSource`]. See the module's
/// documentation for how.
#[derive(Clone)]
pub struct OciRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    images: Arc<dyn UnpackedImages>,
    netns: Option<Arc<dyn NetnsSource>>,
    command: RuntimeCommand,
    /// The bundles.
    containers: PathBuf,
    hierarchy: Hierarchy,
    /// `crun 1.8.1`, `runc 1.1.5`.
    version: String,
    /// The containers this process created and has not removed.
    live: Mutex<HashMap<String, Arc<Live>>>,
}

/// How the runtime binary is invoked.
#[derive(Debug, Clone)]
struct RuntimeCommand {
    program: PathBuf,
    kind: OciRuntimeKind,
    /// The runtime's state directory (`--root`).
    root: PathBuf,
    /// Run it in a mount namespace without the host's cgroup v2 mount (crun on a hybrid
    /// host).
    hide_unified: bool,
}

/// A container this process created.
struct Live {
    id: String,
    bundle: PathBuf,
    group: TaskGroup,
    /// The memory limit of its task group, which tells an OOM kill on cgroup v1 when there
    /// is no notification.
    memory_limit: Option<u64>,
    /// The task group's OOM notification (cgroup v1).
    oom_watch: Option<cgroup::OomWatch>,
    netns: Mutex<Option<TaskNetns>>,
    /// Keeps the image's layers while the container lives.
    _image_pin: Option<ImagePin>,
    /// Where the output goes while a reader is attached.
    attached: Mutex<Option<mpsc::Sender<Result<LogChunk, EngineError>>>>,
    phase: watch::Sender<Phase>,
    /// True once both pipes reached their end and the kept output is written.
    output_done: watch::Sender<bool>,
}

#[derive(Debug, Clone)]
enum Phase {
    Created,
    Running,
    Stopped(ExitStatus),
}

/// What a bundle records for a later process: enough to list and remove its container.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: String,
    labels: BTreeMap<String, String>,
    /// The task group's path (cgroup.rs).
    cgroup: String,
    netns: Option<NetnsRecord>,
}

/// A [`TaskNetns`], as a bundle records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NetnsRecord {
    path: PathBuf,
    address: Ipv4Addr,
    gateway: Ipv4Addr,
    nameservers: Vec<Ipv4Addr>,
}

/// How a container ended, as its bundle records it for a later process.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExitRecord {
    exit_code: i64,
    oom_killed: bool,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
}

// === impl OciRuntime ===

impl OciRuntime {
    /// A runtime over `images`, with task networks from `netns` (without one only specs with
    /// the network mode `none` are run). Finds the runtime binary (see
    /// [`OciSettings::runtime`]), asks its version and logs which it is, and makes the state
    /// root.
    pub async fn new(
        images: Arc<dyn UnpackedImages>,
        netns: Option<Arc<dyn NetnsSource>>,
        settings: OciSettings,
    ) -> Result<Self, EngineError> {
        let program = match settings.runtime {
            Some(program) => program,
            None => find_runtime().ok_or_else(|| EngineError::Unreachable {
                message: "no OCI runtime: neither crun nor runc is installed \
                          (apt-get install crun)"
                    .to_owned(),
            })?,
        };
        let version_output = tokio::process::Command::new(&program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|error| EngineError::Unreachable {
                message: format!("cannot run {}: {error}", program.display()),
            })?;
        let first_line = String::from_utf8_lossy(&version_output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let kind = if first_line.starts_with("crun") {
            OciRuntimeKind::Crun
        } else if first_line.starts_with("runc") {
            OciRuntimeKind::Runc
        } else {
            return Err(EngineError::Unreachable {
                message: format!(
                    "{} is neither crun nor runc (it says {first_line:?})",
                    program.display()
                ),
            });
        };
        let version = first_line.replace(" version ", " ");
        let hierarchy = cgroup::detect_hierarchy();
        let hide_unified = kind == OciRuntimeKind::Crun
            && hierarchy == Hierarchy::V1
            && std::fs::read_to_string(
                Path::new(cpu_group::CGROUP_ROOT).join("unified/cgroup.controllers"),
            )
            .is_ok_and(|controllers| !controllers.trim().is_empty());
        let containers = settings.state_root.join("containers");
        let root = settings.state_root.join("runtime");
        for directory in [&containers, &root] {
            tokio::fs::create_dir_all(directory)
                .await
                .map_err(|error| EngineError::LocalIo {
                    path: directory.display().to_string(),
                    message: error.to_string(),
                })?;
        }
        let sweeping = containers.clone();
        let swept = blocking(move || Ok(sweep_cut_off_creates(&sweeping, hierarchy))).await?;
        if swept > 0 {
            tracing::info!(bundles = swept, "removed what cut-off creates left");
        }
        tracing::info!(
            runtime = %program.display(),
            %version,
            ?hierarchy,
            hide_unified,
            state_root = %settings.state_root.display(),
            "task containers run by an OCI runtime"
        );
        Ok(OciRuntime {
            inner: Arc::new(Inner {
                images,
                netns,
                command: RuntimeCommand {
                    program,
                    kind,
                    root,
                    hide_unified,
                },
                containers,
                hierarchy,
                version,
                live: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Which runtime drives the containers.
    pub fn kind(&self) -> OciRuntimeKind {
        self.inner.command.kind
    }

    /// The bundle directory of container `id` (whether or not it exists).
    pub fn bundle_dir(&self, id: &ContainerId) -> PathBuf {
        self.inner.containers.join(id.as_str())
    }

    /// The runtime's state directory of container `id` (there while the runtime knows it).
    pub fn runtime_state_dir(&self, id: &ContainerId) -> PathBuf {
        self.inner.command.root.join(id.as_str())
    }

    /// The cgroup directories of container `id` (every controller's on cgroup v1), whether or
    /// not they exist: what must be gone after its removal.
    pub fn cgroup_dirs(&self, id: &ContainerId) -> Vec<PathBuf> {
        match self.inner.meta(id.as_str()) {
            Some(meta) => TaskGroup::at(meta.cgroup, self.inner.hierarchy).directories(),
            None => TaskGroup::new(id.as_str(), None, self.inner.hierarchy).directories(),
        }
    }
}

impl std::fmt::Debug for OciRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciRuntime")
            .field("runtime", &self.inner.command.program)
            .field("version", &self.inner.version)
            .field("containers", &self.inner.containers)
            .finish_non_exhaustive()
    }
}

/// `crun` when it is installed, `runc` otherwise.
fn find_runtime() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/sbin:/usr/bin"));
    ["crun", "runc"].into_iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A container id no other container of this host has.
fn new_id() -> String {
    use sha2::Digest;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seed = format!(
        "{}-{}-{}",
        std::process::id(),
        now.as_nanos(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..16])
}

/// A name given in a spec is the container's id: plain characters only.
fn check_name(name: &str) -> Result<(), EngineError> {
    let plain = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if plain {
        Ok(())
    } else {
        Err(EngineError::invalid_spec(format!(
            "the container name {name:?} must be letters, digits, '-', '_' or '.'"
        )))
    }
}

fn not_found(id: &str) -> EngineError {
    EngineError::ContainerNotFound { id: id.to_owned() }
}

fn local_io(path: &Path, error: impl std::fmt::Display) -> EngineError {
    EngineError::LocalIo {
        path: path.display().to_string(),
        message: error.to_string(),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| EngineError::Failed {
            message: format!("a blocking step stopped: {error}"),
        })?
}

// === impl RuntimeCommand ===

impl RuntimeCommand {
    /// The runtime with its global options, then `args`.
    fn command(&self, args: &[&std::ffi::OsStr]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.program);
        command.arg("--root").arg(&self.root);
        command.args(args);
        command.stdin(Stdio::null());
        command
    }

    /// Starts `command` (made by [`RuntimeCommand::command`]), in a mount namespace without
    /// the host's cgroup v2 mount when the runtime needs that.
    async fn spawn(
        &self,
        command: tokio::process::Command,
    ) -> std::io::Result<tokio::process::Child> {
        if self.hide_unified {
            spawn_without_unified(command).await
        } else {
            let mut command = command;
            command.spawn()
        }
    }

    /// Runs a short command (`kill`, `delete`); its stderr when it fails.
    async fn run(&self, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let mut command = self.command(args);
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let output = self
            .spawn(command)
            .await
            .map_err(|error| error.to_string())?
            .wait_with_output()
            .await
            .map_err(|error| error.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }

    async fn kill(&self, id: &str) -> Result<(), String> {
        self.run(&["kill".as_ref(), id.as_ref(), "KILL".as_ref()])
            .await
    }

    async fn delete(&self, id: &str) -> Result<(), String> {
        self.run(&["delete".as_ref(), "--force".as_ref(), id.as_ref()])
            .await
    }
}

/// Starts `command` from a thread of its own that first leaves this process's mount
/// namespace for a private copy of it without the cgroup v2 mount (`unshare --mount
/// --propagation private` and `umount -l <cgroup root>/unified`, in process). The child
/// inherits the thread's namespace; the copy is made at each call, so the child sees every
/// mount made until then (the task's overlay). A thread of tokio's pools must never change
/// namespace, hence the thread; the child is registered with this runtime all the same.
async fn spawn_without_unified(
    mut command: tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let runtime = tokio::runtime::Handle::current();
    let (answer, answered) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stevedore-runtime-ns".to_owned())
        .spawn(move || {
            let spawned = leave_unified().and_then(|()| {
                let _entered = runtime.enter();
                command.spawn()
            });
            let _ = answer.send(spawned);
        })?;
    answered
        .await
        .map_err(|_| std::io::Error::other("the thread starting the runtime ended silently"))?
}

/// Moves the calling thread into a private copy of the mount namespace and detaches the
/// cgroup v2 mount there.
fn leave_unified() -> std::io::Result<()> {
    use rustix::mount::{MountPropagationFlags, UnmountFlags};
    use rustix::thread::UnshareFlags;
    // `unshare_unsafe` is unsafe because of `UnshareFlags::FILES`, which could make file
    // descriptors of other threads unusable in this one; a private filesystem context and
    // mount namespace for this thread alone have no such effect.
    #[allow(deprecated)]
    rustix::thread::unshare(UnshareFlags::FS | UnshareFlags::NEWNS)?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )?;
    rustix::mount::unmount(
        Path::new(cpu_group::CGROUP_ROOT).join("unified"),
        UnmountFlags::DETACH,
    )?;
    Ok(())
}

// === impl Inner ===

impl Inner {
    fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.containers.join(id)
    }

    /// Whether a bundle of that id exists (an id with a path in it never does).
    fn known(&self, id: &str) -> bool {
        check_name(id).is_ok() && self.bundle(id).join("meta.json").exists()
    }

    fn meta(&self, id: &str) -> Option<Meta> {
        if check_name(id).is_err() {
            return None;
        }
        let text = std::fs::read(self.bundle(id).join("meta.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Whether the container of a bundle from another process still runs: its init's pid is
    /// alive and the runtime still knows it.
    fn running_elsewhere(&self, id: &str) -> bool {
        let pid = std::fs::read_to_string(self.bundle(id).join("pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            && self.command.root.join(id).exists()
    }

    fn running(&self, id: &str) -> bool {
        match self.live(id) {
            Some(live) => matches!(*live.phase.borrow(), Phase::Running),
            None => self.running_elsewhere(id),
        }
    }

    /// Takes the task's network namespace: none of its own for `none`, one of the pool for
    /// any other network.
    async fn take_netns(&self, spec: &ContainerSpec) -> Result<Option<TaskNetns>, EngineError> {
        let network = match spec.network_mode.as_deref() {
            Some("none") => return Ok(None),
            Some("host") => {
                return Err(EngineError::invalid_spec(
                    "a task container cannot use the host's network",
                ));
            }
            Some(network) => network,
            None => DEFAULT_NETWORK,
        };
        match &self.netns {
            Some(pool) => Ok(Some(pool.take(network).await?)),
            None => Err(EngineError::LimitUnenforceable {
                capability: "task networks".to_owned(),
                hint: format!(
                    "the OCI engine has no network namespace pool, so it runs only tasks \
                     without a network (network mode none), not on {network:?}"
                ),
            }),
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        spec.validate()?;
        let id = match &spec.name {
            Some(name) => {
                check_name(name)?;
                name.clone()
            }
            None => new_id(),
        };
        // Held from here to the removal, so that the layers under the overlay stay.
        let (image, image_pin) = match self.images.pin(&spec.image) {
            Some((image, pin)) => (image, Some(pin)),
            None => (
                self.images.unpacked(&spec.image).await?.ok_or_else(|| {
                    EngineError::ImageNotFound {
                        image: spec.image.clone(),
                    }
                })?,
                None,
            ),
        };
        let bundle_dir = self.bundle(&id);
        match tokio::fs::create_dir(&bundle_dir).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(EngineError::Conflict {
                    message: format!("a container named {id} exists"),
                });
            }
            Err(error) => return Err(local_io(&bundle_dir, error)),
        }
        let netns = match self.take_netns(spec).await {
            Ok(netns) => netns,
            Err(error) => {
                let _ = tokio::fs::remove_dir_all(&bundle_dir).await;
                return Err(error);
            }
        };
        let group = TaskGroup::new(&id, spec.cpu_group.as_deref(), self.hierarchy);
        let prepared = {
            let (spec, id, group, netns) = (spec.clone(), id.clone(), group.clone(), netns.clone());
            let bundle_dir = bundle_dir.clone();
            let hierarchy = self.hierarchy;
            blocking(move || {
                prepare(
                    &bundle_dir,
                    &id,
                    &spec,
                    image,
                    &group,
                    netns.as_ref(),
                    hierarchy,
                )?;
                // Without a limit the group never runs out.
                Ok(spec.memory_bytes.and_then(|_| group.watch_oom()))
            })
            .await
        };
        let oom_watch = match prepared {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(container = %id, %error, "the container could not be created");
                let group = group.clone();
                let _ = blocking(move || {
                    let _ = rootfs::unmount(&bundle_dir.join("rootfs"));
                    group.remove();
                    remove_bundle(&bundle_dir)
                })
                .await;
                if let (Some(netns), Some(pool)) = (netns, &self.netns) {
                    pool.give_back(netns).await;
                }
                return Err(error);
            }
        };
        let live = Arc::new(Live {
            id: id.clone(),
            bundle: bundle_dir,
            group,
            memory_limit: spec.memory_bytes,
            oom_watch,
            netns: Mutex::new(netns),
            _image_pin: image_pin,
            attached: Mutex::new(None),
            phase: watch::Sender::new(Phase::Created),
            output_done: watch::Sender::new(false),
        });
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), live);
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        let Some(live) = self.live(id) else {
            if self.known(id) {
                return Err(EngineError::Conflict {
                    message: format!("{id} was created by an earlier process and cannot start"),
                });
            }
            return Err(not_found(id));
        };
        let mut allowed = false;
        live.phase.send_if_modified(|phase| {
            allowed = matches!(phase, Phase::Created);
            if allowed {
                *phase = Phase::Running;
            }
            allowed
        });
        if !allowed {
            return Err(EngineError::Conflict {
                message: format!("{id} was started already"),
            });
        }
        let pid_file = live.bundle.join("pid");
        let mut command = self.command.command(&[
            "run".as_ref(),
            "--bundle".as_ref(),
            live.bundle.as_os_str(),
            "--pid-file".as_ref(),
            pid_file.as_os_str(),
            id.as_ref(),
        ]);
        // Its own process group: a terminal's ^C to the runner is not the task's.
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let started_at = chrono::Utc::now();
        let mut child = match self.command.spawn(command).await {
            Ok(child) => child,
            Err(error) => {
                live.phase.send_replace(Phase::Created);
                return Err(EngineError::Unreachable {
                    message: format!(
                        "cannot run the OCI runtime {}: {error}",
                        self.command.program.display()
                    ),
                });
            }
        };
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        tokio::spawn(pump(live.clone(), stdout, stderr));
        tokio::spawn(reap(live.clone(), child, started_at));
        // Started once the runtime made the container (and wrote its pid), or it ended.
        let deadline = Instant::now() + START_PATIENCE;
        let mut phase = live.phase.subscribe();
        loop {
            if tokio::fs::try_exists(&pid_file).await.unwrap_or(false)
                || matches!(*phase.borrow_and_update(), Phase::Stopped(_))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::Timeout);
            }
            let _ = tokio::time::timeout(Duration::from_millis(1), phase.changed()).await;
        }
    }

    async fn wait(&self, id: &str) -> Result<ExitStatus, EngineError> {
        if let Some(live) = self.live(id) {
            let mut phase = live.phase.subscribe();
            loop {
                if let Phase::Stopped(status) = &*phase.borrow_and_update() {
                    return Ok(status.clone());
                }
                if phase.changed().await.is_err() {
                    return Err(not_found(id));
                }
            }
        }
        if !self.known(id) {
            return Err(not_found(id));
        }
        // A container of an earlier process: its runtime process (not this process's child)
        // records how it ended in the bundle only when this process saw it, so wait for it
        // to stop and read what is there.
        while self.running_elsewhere(id) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let record = tokio::fs::read(self.bundle(id).join("exit.json"))
            .await
            .ok()
            .and_then(|text| serde_json::from_slice::<ExitRecord>(&text).ok());
        match record {
            Some(record) => Ok(ExitStatus {
                exit_code: record.exit_code,
                oom_killed: record.oom_killed,
                started_at: record.started_at,
                finished_at: record.finished_at,
                engine_error: None,
                usage: None,
            }),
            None => Err(EngineError::Failed {
                message: format!(
                    "{id} was run by an earlier process, which did not see how it ended"
                ),
            }),
        }
    }

    async fn kill(&self, id: &str) -> Result<(), EngineError> {
        let Some(live) = self.live(id) else {
            if !self.known(id) {
                return Err(not_found(id));
            }
            if self.running_elsewhere(id)
                && let Err(message) = self.command.kill(id).await
                && self.running_elsewhere(id)
            {
                return Err(EngineError::Failed { message });
            }
            return Ok(());
        };
        if !matches!(*live.phase.borrow(), Phase::Running) {
            return Ok(());
        }
        if let Err(message) = self.command.kill(id).await {
            // It may have ended on its own meanwhile: then the kill is done.
            let mut phase = live.phase.subscribe();
            let stopped = tokio::time::timeout(
                Duration::from_secs(2),
                phase.wait_for(|phase| matches!(phase, Phase::Stopped(_))),
            )
            .await;
            if !matches!(stopped, Ok(Ok(_))) {
                return Err(EngineError::Failed {
                    message: format!("killing {id}: {message}"),
                });
            }
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<Duration, EngineError> {
        let began = Instant::now();
        let live = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        let meta = self.meta(id);
        if live.is_none() && meta.is_none() {
            if self.known(id) || (check_name(id).is_ok() && self.bundle(id).exists()) {
                // A bundle whose meta.json is unreadable (a create cut off): only files.
                let bundle = self.bundle(id);
                blocking(move || {
                    rootfs::unmount(&bundle.join("rootfs"))?;
                    remove_bundle(&bundle)
                })
                .await?;
                return Ok(began.elapsed());
            }
            return Err(not_found(id));
        }
        let (group, netns) = match &live {
            Some(live) => {
                // Detached: the reader's stream ends.
                live.attached
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if matches!(*live.phase.borrow(), Phase::Running) {
                    if let Err(error) = self.kill(id).await {
                        // Back in the table, so a later removal can try again.
                        self.live
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(id.to_owned(), live.clone());
                        return Err(error);
                    }
                    let mut phase = live.phase.subscribe();
                    let stopped = tokio::time::timeout(
                        STOP_PATIENCE,
                        phase.wait_for(|phase| matches!(phase, Phase::Stopped(_))),
                    )
                    .await;
                    if !matches!(stopped, Ok(Ok(_))) {
                        tracing::warn!(
                            container = id,
                            "the killed container's runtime did not end"
                        );
                    }
                }
                let netns = live
                    .netns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                (live.group.clone(), netns)
            }
            None => {
                let meta = meta.clone().ok_or_else(|| not_found(id))?;
                if self.running_elsewhere(id) {
                    let _ = self.command.kill(id).await;
                }
                let netns = meta.netns.map(|record| TaskNetns {
                    path: record.path,
                    address: record.address,
                    gateway: record.gateway,
                    nameservers: record.nameservers,
                });
                (TaskGroup::at(meta.cgroup, self.hierarchy), netns)
            }
        };
        // The runtime deletes its state when its foreground process ends; what a killed
        // process left, or a runtime still tearing down, is deleted here.
        if self.command.root.join(id).exists()
            && let Err(message) = self.command.delete(id).await
            && self.command.root.join(id).exists()
        {
            tracing::warn!(container = id, %message, "the runtime's state of the container stays");
        }
        let bundle = self.bundle(id);
        blocking(move || {
            rootfs::unmount(&bundle.join("rootfs"))?;
            group.remove();
            remove_bundle(&bundle)
        })
        .await?;
        if let Some(netns) = netns {
            match &self.netns {
                Some(pool) => pool.give_back(netns).await,
                None => tracing::warn!(
                    netns = %netns.path.display(),
                    "a removed container had a network namespace, and no pool takes it back"
                ),
            }
        }
        Ok(began.elapsed())
    }

    async fn list(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<ListedContainer>, EngineError> {
        let mut entries = match tokio::fs::read_dir(&self.containers).await {
            Ok(entries) => entries,
            // The state root is gone (its data directory was removed): no bundle is left, so
            // nothing of ours is, and a watchdog looking for a dead runner's containers ends.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(local_io(&self.containers, error)),
        };
        let mut listed = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|error| local_io(&self.containers, error))?
        {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(meta) = self.meta(&id) else {
                continue;
            };
            let matches = match (meta.labels.get(key), value) {
                (Some(found), Some(value)) => found == value,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if matches {
                listed.push(ListedContainer {
                    running: self.running(&id),
                    id: ContainerId::new(id),
                    labels: meta.labels,
                });
            }
        }
        Ok(listed)
    }

    async fn snapshot(&self, id: &str) -> Result<Option<ResourceSample>, EngineError> {
        let group = match self.live(id) {
            Some(live) => {
                if !matches!(*live.phase.borrow(), Phase::Running) {
                    return Ok(None);
                }
                live.group.clone()
            }
            None => {
                let meta = self.meta(id).ok_or_else(|| not_found(id))?;
                if !self.running_elsewhere(id) {
                    return Ok(None);
                }
                TaskGroup::at(meta.cgroup, self.hierarchy)
            }
        };
        blocking(move || Ok(group.sample())).await
    }
}

/// Makes the bundle of a container in `bundle_dir`: the overlay mounted, the spec's files in
/// it, the task group with its limits, `config.json`, and `meta.json` last (a bundle without
/// one is a create that was cut off). Blocking.
fn prepare(
    bundle_dir: &Path,
    id: &str,
    spec: &ContainerSpec,
    image: crate::oci::UnpackedImage,
    group: &TaskGroup,
    netns: Option<&TaskNetns>,
    hierarchy: Hierarchy,
) -> Result<(), EngineError> {
    let rootfs = bundle_dir.join("rootfs");
    let overlay = rootfs::Overlay {
        layers: image.layers.clone(),
        upper: bundle_dir.join("upper"),
        work: bundle_dir.join("work"),
        target: rootfs.clone(),
    };
    overlay.mount()?;
    rootfs::put_files(&rootfs, spec)?;
    let user = spec
        .user
        .clone()
        .or_else(|| image.config.user.clone())
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| "0".to_owned());
    let user = rootfs::resolve_user(&rootfs, &user)?;
    let hostname: String = id.chars().take(12).collect();
    let write = |name: &str, contents: &[u8]| {
        let path = bundle_dir.join(name);
        std::fs::write(&path, contents).map_err(|error| local_io(&path, error))
    };
    write(
        "hosts",
        bundle::hosts(&hostname, netns.map(|netns| netns.address)).as_bytes(),
    )?;
    write("hostname", format!("{hostname}\n").as_bytes())?;
    write(
        "resolv.conf",
        bundle::resolv_conf(netns.map_or(&[][..], |netns| &netns.nameservers)).as_bytes(),
    )?;
    group.create(&Limits {
        memory_bytes: spec.memory_bytes,
        nano_cpus: spec.nano_cpus,
        pids: spec.pids_limit,
    })?;
    let cgroups_path = group.runtime_path();
    let config = bundle::config(&bundle::Bundle {
        spec,
        image: &image.config,
        rootfs: &rootfs,
        etc_dir: bundle_dir,
        hostname: &hostname,
        uid: user.uid,
        gid: user.gid,
        additional_gids: &user.additional_gids,
        home: &user.home,
        netns: netns.map(|netns| netns.path.as_path()),
        cgroups_path: &cgroups_path,
        cgroup_namespace: hierarchy == Hierarchy::V2,
        nofile: bundle::nofile_limit(),
    })?;
    let config = serde_json::to_vec(&config).map_err(|error| EngineError::Failed {
        message: format!("cannot write config.json: {error}"),
    })?;
    write("config.json", &config)?;
    let meta = Meta {
        id: id.to_owned(),
        labels: spec.labels.clone(),
        cgroup: group.path.clone(),
        netns: netns.map(|netns| NetnsRecord {
            path: netns.path.clone(),
            address: netns.address,
            gateway: netns.gateway,
            nameservers: netns.nameservers.clone(),
        }),
    };
    let meta = serde_json::to_vec(&meta).map_err(|error| EngineError::Failed {
        message: format!("cannot write meta.json: {error}"),
    })?;
    write("meta.json", &meta)
}

/// Bundles without a `meta.json` older than this are creates that a killed process cut off
/// (a create takes milliseconds); younger ones may be another process's, under way.
const CUT_OFF_AGE: Duration = Duration::from_secs(600);

/// Removes what creates cut off by a killed process left in `containers` (a bundle without
/// its `meta.json`, which no listing finds): its mount, the task group it may have made
/// outside any CPU group, the bundle. Blocking. How many it removed.
fn sweep_cut_off_creates(containers: &Path, hierarchy: Hierarchy) -> usize {
    let Ok(entries) = std::fs::read_dir(containers) else {
        return 0;
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let bundle = entry.path();
        let old = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > CUT_OFF_AGE);
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !old || bundle.join("meta.json").exists() || check_name(&id).is_err() {
            continue;
        }
        let _ = rootfs::unmount(&bundle.join("rootfs"));
        TaskGroup::new(&id, None, hierarchy).remove();
        if remove_bundle(&bundle).is_ok() {
            swept += 1;
        }
    }
    swept
}

/// Removes a bundle directory whose root is unmounted; refuses one whose root is still
/// mounted (removing it would reach into the container's files). Blocking.
fn remove_bundle(bundle: &Path) -> Result<(), EngineError> {
    let rootfs = bundle.join("rootfs");
    if rootfs::is_mounted(&rootfs) {
        return Err(EngineError::Failed {
            message: format!("{} is still mounted", rootfs.display()),
        });
    }
    // The container's runtime process, still ending, or the process that ran it, recording
    // how it ended, can add a file while the directory goes: then it is gone over again.
    let mut attempts = 0;
    loop {
        match std::fs::remove_dir_all(bundle) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error)
                if error.kind() == std::io::ErrorKind::DirectoryNotEmpty && attempts < 10 =>
            {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(local_io(bundle, error)),
        }
    }
}

/// Reads the container's stdout and stderr until both end (every process holding them
/// exited): each chunk to the attached reader, if any (waiting for it when it is behind), and
/// into the bundle's kept output while that is under [`KEPT_OUTPUT_BYTES`].
async fn pump(
    live: Arc<Live>,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
) {
    let mut kept = KeptWriter::new(live.bundle.join("output"));
    let (mut stdout, mut stderr) = (stdout, stderr);
    let (mut out_buffer, mut err_buffer) = (vec![0u8; READ_BYTES], vec![0u8; READ_BYTES]);
    while stdout.is_some() || stderr.is_some() {
        let (stream, read) = tokio::select! {
            read = read_some(&mut stdout, &mut out_buffer), if stdout.is_some() => (OutputStream::Stdout, read),
            read = read_some(&mut stderr, &mut err_buffer), if stderr.is_some() => (OutputStream::Stderr, read),
        };
        let bytes = match read {
            Some(bytes) => bytes,
            None => {
                match stream {
                    OutputStream::Stdout => stdout = None,
                    OutputStream::Stderr => stderr = None,
                }
                continue;
            }
        };
        kept.keep(stream, &bytes).await;
        let sender = live
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(sender) = sender {
            let chunk = LogChunk { stream, bytes };
            if sender.send(Ok(chunk)).await.is_err() {
                // The reader went away: detached, later output is only kept.
                live.attached
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
            }
        }
    }
    kept.finish().await;
    live.attached
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    live.output_done.send_replace(true);
}

/// Some bytes of `pipe`; `None` at its end (or when it broke).
async fn read_some<R: AsyncRead + Unpin>(pipe: &mut Option<R>, buffer: &mut [u8]) -> Option<Bytes> {
    let pipe = pipe.as_mut()?;
    match pipe.read(buffer).await {
        Ok(0) | Err(_) => None,
        Ok(read) => Some(Bytes::copy_from_slice(&buffer[..read])),
    }
}

/// Waits for the runtime's foreground process, then records how the container ended with
/// what its task group counted.
async fn reap(live: Arc<Live>, mut child: tokio::process::Child, started_at: Timestamp) {
    let status = child.wait().await;
    let finished_at = chrono::Utc::now();
    let exit_code = match &status {
        Ok(status) => status
            .code()
            .map(i64::from)
            .or_else(|| status.signal().map(|signal| 128 + i64::from(signal)))
            .unwrap_or(255),
        Err(_) => 255,
    };
    let group = live.group.clone();
    let account = tokio::task::spawn_blocking(move || group.account())
        .await
        .ok()
        .flatten();
    let oom_event = live.oom_watch.as_ref().map(cgroup::OomWatch::fired);
    let oom_killed = account.as_ref().is_some_and(|account| {
        cgroup::oom_killed(account, live.memory_limit, exit_code, oom_event)
    });
    if oom_event == Some(true) && !oom_killed {
        tracing::debug!(
            container = %live.id,
            exit_code,
            peak = ?account.as_ref().and_then(|account| account.usage.peak_memory_bytes),
            "the OOM notification fired without the group reaching its limit"
        );
    }
    let engine_error = match status {
        // No pid: the runtime failed before the container's process existed (a command that
        // is not in the image, a bad working directory); it said why on the stderr pipe.
        Ok(_) if !live.bundle.join("pid").exists() => Some(
            "the OCI runtime could not start the container (its message is on the \
             container's stderr)"
                .to_owned(),
        ),
        Ok(_) => None,
        Err(error) => Some(format!("waiting for the OCI runtime failed: {error}")),
    };
    let record = ExitRecord {
        exit_code,
        oom_killed,
        started_at: Some(started_at),
        finished_at: Some(finished_at),
    };
    if let Ok(record) = serde_json::to_vec(&record) {
        let _ = tokio::fs::write(live.bundle.join("exit.json"), record).await;
    }
    tracing::debug!(container = %live.id, exit_code, oom_killed, "the container stopped");
    live.phase.send_replace(Phase::Stopped(ExitStatus {
        exit_code,
        oom_killed,
        started_at: Some(started_at),
        finished_at: Some(finished_at),
        engine_error,
        usage: account.map(|account| account.usage),
    }));
}

/// The kept output: frames of one byte for the stream (1 stdout, 2 stderr), four for the
/// length (little-endian), then the bytes; the first [`KEPT_OUTPUT_BYTES`] of output only.
/// The file is made with the first output: a silent task costs no file.
struct KeptWriter {
    path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    kept: u64,
    /// The file could not be made or written: nothing more is kept.
    broken: bool,
}

impl KeptWriter {
    fn new(path: PathBuf) -> Self {
        KeptWriter {
            path,
            file: None,
            kept: 0,
            broken: false,
        }
    }

    async fn keep(&mut self, stream: OutputStream, bytes: &[u8]) {
        let room = KEPT_OUTPUT_BYTES.saturating_sub(self.kept);
        let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take == 0 || self.broken {
            return;
        }
        if self.file.is_none() {
            match tokio::fs::File::create(&self.path).await {
                Ok(file) => self.file = Some(tokio::io::BufWriter::new(file)),
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "no output is kept");
                    self.broken = true;
                    return;
                }
            }
        }
        let Some(file) = &mut self.file else {
            return;
        };
        let mut frame = Vec::with_capacity(take + 5);
        frame.push(match stream {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        });
        frame.extend_from_slice(&u32::try_from(take).unwrap_or(u32::MAX).to_le_bytes());
        frame.extend_from_slice(&bytes[..take]);
        if file.write_all(&frame).await.is_err() {
            self.file = None;
            self.broken = true;
            return;
        }
        self.kept += take as u64;
    }

    async fn finish(&mut self) {
        if let Some(file) = &mut self.file {
            let _ = file.flush().await;
        }
    }
}

/// The chunks of a kept output file.
fn kept_chunks(bytes: &[u8]) -> Vec<LogChunk> {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let stream = match rest[0] {
            1 => OutputStream::Stdout,
            _ => OutputStream::Stderr,
        };
        let length = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(chunk) = rest.get(5..5 + length) else {
            break;
        };
        chunks.push(LogChunk {
            stream,
            bytes: Bytes::copy_from_slice(chunk),
        });
        rest = &rest[5 + length..];
    }
    chunks
}

#[async_trait]
impl ContainerRuntime for OciRuntime {
    async fn capabilities(&self) -> Result<EngineCapabilities, EngineError> {
        let hierarchy = self.inner.hierarchy;
        let (memory_limit, swap_limit, cpu_cfs_quota, pids_limit) =
            blocking(move || Ok(cgroup::enforceable(hierarchy))).await?;
        let mem_total = tokio::fs::read_to_string("/proc/meminfo")
            .await
            .ok()
            .and_then(|meminfo| {
                meminfo
                    .lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib << 10);
        Ok(EngineCapabilities {
            memory_limit,
            swap_limit,
            cpu_cfs_quota,
            pids_limit,
            server_version: self.inner.version.clone(),
            api_version: OCI_VERSION.to_owned(),
            negotiated_api_version: OCI_VERSION.to_owned(),
            ncpu: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            mem_total,
            cgroup_version: Some(
                match hierarchy {
                    Hierarchy::V1 => "1",
                    Hierarchy::V2 => "2",
                }
                .to_owned(),
            ),
            operating_system: None,
            warnings: Vec::new(),
        })
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, EngineError> {
        self.inner.create(spec).await.map(ContainerId::new)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), EngineError> {
        self.inner.start(id.as_str()).await
    }

    async fn attach(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        let Some(live) = self.inner.live(id.as_str()) else {
            if self.inner.known(id.as_str()) {
                // An earlier process's container: its pipes went with that process.
                return Ok(futures::stream::empty().boxed());
            }
            return Err(not_found(id.as_str()));
        };
        if *live.output_done.borrow() {
            return Ok(futures::stream::empty().boxed());
        }
        let (sender, mut receiver) = mpsc::channel(ATTACH_CHUNKS);
        *live.attached.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
        Ok(futures::stream::poll_fn(move |context| receiver.poll_recv(context)).boxed())
    }

    /// The first [`KEPT_OUTPUT_BYTES`] of the container's output (not the last: the kept file
    /// stops growing there), given once the container stopped: it follows a running one by
    /// waiting for its end. A container of an earlier process gives what that process kept.
    async fn kept_output(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        let path = self.inner.bundle(id.as_str()).join("output");
        let live = self.inner.live(id.as_str());
        if live.is_none() && !self.inner.known(id.as_str()) {
            return Err(not_found(id.as_str()));
        }
        let stream = async move {
            if let Some(live) = live {
                let mut done = live.output_done.subscribe();
                let _ = done.wait_for(|done| *done).await;
            }
            let bytes = tokio::fs::read(&path).await.unwrap_or_default();
            futures::stream::iter(kept_chunks(&bytes).into_iter().map(Ok))
        };
        Ok(futures::stream::once(stream).flatten().boxed())
    }

    async fn wait(&self, id: &ContainerId) -> Result<ExitStatus, EngineError> {
        self.inner.wait(id.as_str()).await
    }

    async fn kill(&self, id: &ContainerId) -> Result<(), EngineError> {
        self.inner.kill(id.as_str()).await
    }

    async fn stats_snapshot(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ResourceSample>, EngineError> {
        self.inner.snapshot(id.as_str()).await
    }

    /// Always: every container has a cgroup of stevedore's own that outlives it.
    async fn usage_accounted(&self, _id: &ContainerId) -> bool {
        true
    }

    fn stats(&self, id: &ContainerId) -> ResourceSampleStream {
        let inner = self.inner.clone();
        let id = id.as_str().to_owned();
        futures::stream::unfold(Some(true), move |state| {
            let (inner, id) = (inner.clone(), id.clone());
            async move {
                let first = state?;
                if !first {
                    // A sample a second, or the end as soon as the container stops.
                    match inner.live(&id) {
                        Some(live) => {
                            let mut phase = live.phase.subscribe();
                            let _ = tokio::time::timeout(
                                SAMPLE_INTERVAL,
                                phase.wait_for(|phase| matches!(phase, Phase::Stopped(_))),
                            )
                            .await;
                        }
                        None => tokio::time::sleep(SAMPLE_INTERVAL).await,
                    }
                }
                match inner.snapshot(&id).await {
                    Ok(Some(sample)) => Some((Ok(sample), Some(false))),
                    Ok(None) => None,
                    Err(error) => Some((Err(error), None)),
                }
            }
        })
        .boxed()
    }

    async fn remove(&self, id: &ContainerId) -> Result<Duration, EngineError> {
        self.inner.remove(id.as_str()).await
    }

    async fn list_labeled(&self, key: &str, value: &str) -> Result<Vec<ContainerId>, EngineError> {
        Ok(self
            .inner
            .list(key, Some(value))
            .await?
            .into_iter()
            .map(|listed| listed.id)
            .collect())
    }

    async fn list_labeled_containers(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<ListedContainer>, EngineError> {
        self.inner.list(key, value).await
    }

    async fn ensure_cpu_group(&self, name: &str, nano_cpus: u64) -> Result<(), EngineError> {
        cpu_group::ensure(name, nano_cpus, self.inner.hierarchy, "cgroupfs").await
    }

    async fn remove_cpu_group(&self, name: &str) -> Result<(), EngineError> {
        cpu_group::remove(name, self.inner.hierarchy).await
    }

    /// The OCI engine manages no networks of its own: its task networks are the pool's
    /// ([`NetnsSource`]).
    async fn inspect_network(&self, _name: &str) -> Result<Option<NetworkInfo>, EngineError> {
        Err(no_networks())
    }

    async fn ensure_network(&self, _spec: &NetworkSpec) -> Result<NetworkInfo, EngineError> {
        Err(no_networks())
    }

    async fn isolate_network(
        &self,
        _network: &NetworkInfo,
        _policy: &EgressPolicy,
    ) -> Result<(), EngineError> {
        Err(no_networks())
    }
}

fn no_networks() -> EngineError {
    EngineError::LimitUnenforceable {
        capability: "managed networks".to_owned(),
        hint: "the OCI engine does not manage networks itself: its tasks get network \
               namespaces from its pool"
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_output_frames_come_back_in_order() {
        let mut file = Vec::new();
        for (stream, bytes) in [(1u8, &b"out"[..]), (2, b"err"), (1, b"")] {
            file.push(stream);
            file.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            file.extend_from_slice(bytes);
        }
        // A frame cut off at the end (a process that died mid-write) is left out.
        file.extend_from_slice(&[1, 9, 0, 0, 0, b'x']);
        let chunks = kept_chunks(&file);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].stream, OutputStream::Stdout);
        assert_eq!(&chunks[0].bytes[..], b"out");
        assert_eq!(chunks[1].stream, OutputStream::Stderr);
        assert_eq!(&chunks[1].bytes[..], b"err");
    }

    #[test]
    fn only_old_bundles_without_meta_are_swept() -> Result<(), Box<dyn std::error::Error>> {
        let containers = tempfile::tempdir()?;
        let make = |name: &str, meta: bool, age: Duration| -> std::io::Result<()> {
            let bundle = containers.path().join(name);
            std::fs::create_dir_all(bundle.join("upper/mnt"))?;
            if meta {
                std::fs::write(bundle.join("meta.json"), "{}")?;
            }
            let when = std::time::SystemTime::now() - age;
            std::fs::File::open(&bundle)?.set_modified(when)
        };
        let old = CUT_OFF_AGE + Duration::from_secs(60);
        make("cut-off-sweep-test-1", false, old)?;
        make("young-sweep-test-2", false, Duration::ZERO)?;
        make("listed-sweep-test-3", true, old)?;
        assert_eq!(sweep_cut_off_creates(containers.path(), Hierarchy::V1), 1);
        assert!(!containers.path().join("cut-off-sweep-test-1").exists());
        assert!(containers.path().join("young-sweep-test-2").exists());
        assert!(containers.path().join("listed-sweep-test-3").exists());
        Ok(())
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name("task-1.a_b").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(new_id().len(), 32);
        assert_ne!(new_id(), new_id());
    }
}
