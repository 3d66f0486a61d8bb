//! [`DockerEngine`]: the [`ContainerRuntime`], [`ImageStore`] and [`ImageBuilder`] over the
//! Docker Engine API, through bollard.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, ContainerStatsResponse, ContainerSummaryStateEnum, HostConfig,
    HostConfigLogConfig, Ipam, IpamConfig, NetworkCreateRequest, NetworkInspect, ProgressDetail,
    SystemInfo, SystemInfoCgroupVersionEnum, SystemVersion,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, BuildImageOptions, BuildImageOptionsBuilder,
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder,
    LogsOptionsBuilder, PushImageOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptions,
    StartContainerOptions, StatsOptionsBuilder, TagImageOptionsBuilder,
    UploadToContainerOptionsBuilder, WaitContainerOptions,
};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::ready;
use tokio::sync::broadcast;

use crate::archive::{stream_archive, write_task_archive};
use crate::build::{BuildProgress, BuildRequest, BuiltImage, OutputLines};
use crate::context::{ContextPlan, plan_context, stream_context};
use crate::cpu_group;
use crate::direct_files::{self, DirectFiles, NotDirect, OverlayDirs};
use crate::engine::{
    ContainerRuntime, EngineCapabilities, ExitStatus, ImageBuilder, ImageEntry, ImagePresence,
    ImageStore, ListedContainer, LocalImage, LogChunk, LogChunkStream, OutputStream, PullProgress,
    PullProgressSender, RegistryAuth, ResourceSample, ResourceSampleStream, Timestamp,
};
use crate::error::{EngineError, Subject};
use crate::firewall;
use crate::network::{EgressPolicy, NETWORK_LABEL, NetworkInfo, NetworkSpec};
use crate::network_holders::{self, Holder, HolderKey, NetworkHolders, NoHolder};
use crate::pull::{PullCoalescer, normalize_reference, pull_key};
use crate::spec::{ContainerId, ContainerSpec};
use crate::usage_group::UsageGroups;

/// Docker's bridge driver options a task network is created with, and checked for.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

/// The log driver of task containers, see `create_body`: Docker's own binary format,
/// uncompressed (it is read back only after an engine loss), in files of half
/// `KEPT_OUTPUT_BYTES`: with `max-file` 1 the driver still keeps the file it rotated last
/// beside the one it writes, so the two stay within `KEPT_OUTPUT_BYTES`.
const TASK_LOG_DRIVER: &str = "local";

/// A piece of a container's output as the engine sent it (attached or from its log), in the
/// runtime's terms; `None` for what is not output (stdin echoed back).
fn output_chunk(
    item: Result<LogOutput, bollard::errors::Error>,
    container: &str,
) -> Option<Result<LogChunk, EngineError>> {
    match item {
        Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => Some(Ok(LogChunk {
            stream: OutputStream::Stdout,
            bytes: message,
        })),
        Ok(LogOutput::StdErr { message }) => Some(Ok(LogChunk {
            stream: OutputStream::Stderr,
            bytes: message,
        })),
        Ok(LogOutput::StdIn { .. }) => None,
        Err(error) => Some(Err(EngineError::from_bollard(
            error,
            Subject::Container(container),
        ))),
    }
}

/// The exit code of a process killed by SIGKILL, as an OOM kill leaves it.
const SIGKILL_EXIT_CODE: i64 = 137;
/// How often a SIGKILLed container's state is asked again for a late OOM mark, and how long
/// apart: at most five seconds, paid only by tasks that died of SIGKILL without the mark (a
/// quarter of a second, and on a machine busy with three builds two seconds, were seen to be
/// too short).
const OOM_RECHECKS: u32 = 50;
const OOM_RECHECK_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The Docker engine behind the engine traits. Cheap to clone; clones share the
/// connection pool and the table of pulls under way.
#[derive(Clone)]
pub struct DockerEngine {
    docker: Docker,
    pulls: Arc<PullCoalescer>,
    /// Containers this engine was asked to kill, until they are removed: their SIGKILL is
    /// ours, so their exit is never waited on for a late OOM mark.
    killed: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Told how long each Engine API request of a task's container took, when someone
    /// watches (the runner's metrics, a benchmark's breakdown).
    observer: Option<RequestObserver>,
    /// The containers' usage groups, decided at the first create: `None` when the engine's
    /// cgroups cannot be read here (`usage_group`).
    usage_groups: Arc<tokio::sync::OnceCell<Option<UsageGroups>>>,
    /// The usage group of each container created under one, until it is removed.
    usage_paths: Arc<std::sync::Mutex<HashMap<String, String>>>,
    /// Whether a container's files go straight into its root rather than through an archive
    /// upload (`direct_files`).
    direct_files: Arc<DirectFiles>,
    /// The network holders tasks on a task network join (`network_holders`).
    holders: Arc<NetworkHolders>,
}

/// The Engine API requests a task's container costs, one name per kind: what
/// [`DockerEngine::observe_requests`] reports. A task takes an image inspection, a create and
/// an upload (an inspection where its files go straight into its root), an attach, a start, a
/// wait and an inspection, and a remove; a kill when it is stopped; a stats stream when its
/// usage is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineRequest {
    /// `GET /images/{name}/json`.
    InspectImage,
    /// `POST /containers/create`.
    Create,
    /// `PUT /containers/{id}/archive`: the task's files and package.
    Upload,
    /// `POST /containers/{id}/attach`, until the connection is taken over for the output.
    Attach,
    /// `POST /containers/{id}/start`.
    Start,
    /// `POST /containers/{id}/wait`, until the container stopped.
    Wait,
    /// `GET /containers/{id}/json`: after the create where the files go straight into the
    /// container's root (its overlay's directories), after the wait (and again for a late OOM
    /// mark).
    Inspect,
    /// `GET /containers/{id}/stats`, a stream, from the request to its end.
    Stats,
    /// `POST /containers/{id}/kill`.
    Kill,
    /// `DELETE /containers/{id}`.
    Remove,
}

/// Told of every [`EngineRequest`] with how long it took, successful or not.
pub type RequestObserver = Arc<dyn Fn(EngineRequest, Duration) + Send + Sync>;

/// Times a streamed request from its start until its stream is dropped.
struct StreamTiming {
    observer: Option<RequestObserver>,
    request: EngineRequest,
    began: Instant,
}

// === impl DockerEngine ===

impl DockerEngine {
    /// The containers this engine killed, whatever a panicking holder left of the set.
    fn killed(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.killed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The usage group of the container `id`, when it was created under one.
    fn usage_path(&self, id: &ContainerId) -> Option<String> {
        self.usage_paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id.as_str())
            .cloned()
    }

    /// The usage groups, once the engine said which cgroups it uses; `None` when they cannot
    /// be read here. An engine that does not answer is asked again at the next create. The
    /// same answer tells whether the engine takes files written straight into a container's
    /// root (`direct_files::engine_refuses`).
    async fn usage_groups(&self) -> Option<&UsageGroups> {
        let decided = self
            .usage_groups
            .get_or_try_init(|| async {
                let info = self
                    .docker
                    .info()
                    .await
                    .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
                let security_options = info.security_options.as_deref().unwrap_or_default();
                if let Some(reason) = direct_files::engine_refuses(security_options) {
                    self.direct_files.out_of_reach(&reason);
                }
                let driver = info
                    .cgroup_driver
                    .map(|driver| driver.to_string())
                    .unwrap_or_default();
                Ok::<_, EngineError>(UsageGroups::new(hierarchy_of(&info), &driver).await)
            })
            .await;
        match decided {
            Ok(groups) => groups.as_ref(),
            Err(error) => {
                tracing::debug!(%error, "usage groups undecided");
                None
            }
        }
    }

    /// The container's `State` as the engine reports it now.
    async fn container_state(
        &self,
        id: &ContainerId,
        subject: Subject<'_>,
    ) -> Result<bollard::models::ContainerState, EngineError> {
        self.inspect(id, subject)
            .await?
            .state
            .ok_or_else(|| EngineError::protocol("the container has no State"))
    }

    async fn inspect(
        &self,
        id: &ContainerId,
        subject: Subject<'_>,
    ) -> Result<bollard::models::ContainerInspectResponse, EngineError> {
        self.timed(
            EngineRequest::Inspect,
            self.docker
                .inspect_container(id.as_str(), None::<InspectContainerOptions>),
        )
        .await
        .map_err(|error| EngineError::from_bollard(error, subject))
    }

    /// Connects the way the `docker` CLI does: `DOCKER_HOST` when set, the local socket
    /// otherwise. Then negotiates the API version down to what the engine speaks (Debian's
    /// engine 20.10 answers 1.41 and refuses newer clients), which also proves it answers.
    pub async fn connect() -> Result<Self, EngineError> {
        let docker = Docker::connect_with_defaults()
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        Self::with_client(docker).await
    }

    /// Connects to the engine listening on the Unix socket at `path` (a second engine on the
    /// same host, say), as [`Self::connect`] does.
    pub async fn connect_unix(path: &std::path::Path) -> Result<Self, EngineError> {
        let docker = Docker::connect_with_unix(
            &path.display().to_string(),
            120,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        Self::with_client(docker).await
    }

    /// Uses an already configured bollard client (another host, another timeout), after
    /// negotiating its API version.
    pub async fn with_client(docker: Docker) -> Result<Self, EngineError> {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        tracing::debug!(api_version = %docker.client_version(), "connected to the docker engine");
        Ok(DockerEngine {
            docker,
            pulls: Arc::new(PullCoalescer::default()),
            killed: Arc::default(),
            observer: None,
            usage_groups: Arc::default(),
            usage_paths: Arc::default(),
            direct_files: Arc::new(DirectFiles::new()),
            holders: Arc::new(NetworkHolders::new()),
        })
    }

    /// Puts every container's files in through the engine's archive upload, never straight
    /// into its root: what an engine on another machine gets anyway.
    #[must_use]
    pub fn upload_files_always(mut self) -> Self {
        self.direct_files = Arc::new(DirectFiles::off());
        self
    }

    /// Whether containers' files go straight into their roots: `false` once the first create
    /// found the root out of reach, or when [`Self::upload_files_always`] asked for the upload.
    pub fn puts_files_directly(&self) -> bool {
        self.direct_files.worth_trying()
    }

    /// Gives every task container on a task network a network namespace of its own, never
    /// one of a network holder's (`network_holders`): what a bare Engine API loop does.
    #[must_use]
    pub fn without_network_holders(mut self) -> Self {
        self.holders = Arc::new(NetworkHolders::off());
        self
    }

    /// Whether task containers on a task network join network holders: `false` once the first
    /// holder could not be made or watched from here, or after
    /// [`Self::without_network_holders`].
    pub fn joins_network_holders(&self) -> bool {
        self.holders.worth_trying()
    }

    /// Removes the network holders no task uses now (a lent one stays until given back): what
    /// a runner asks for as it stops (`ContainerRuntime::release_idle`). Holders carry their
    /// first task's labels but the task's own, so the runner's reaping by its label would get
    /// them too, as it gets those an earlier life left.
    pub async fn remove_idle_network_holders(&self) {
        for holder in self.holders.drain_idle() {
            self.remove_holder(&holder.id).await;
        }
    }

    /// Tells `observer` how long each Engine API request of a task's container takes
    /// ([`EngineRequest`]), for metrics: which of a task's requests cost what.
    #[must_use]
    pub fn observe_requests(mut self, observer: RequestObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Runs `call`, telling the observer how long it took.
    async fn timed<T>(&self, request: EngineRequest, call: impl Future<Output = T>) -> T {
        let Some(observer) = &self.observer else {
            return call.await;
        };
        let began = Instant::now();
        let result = call.await;
        observer(request, began.elapsed());
        result
    }

    /// The API version in use after negotiation, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    /// Puts the spec's directories, files and package in place: straight into the container's
    /// root where it is on this machine (`direct_files`), through the engine otherwise.
    async fn put_files(&self, id: &ContainerId, spec: &ContainerSpec) -> Result<(), EngineError> {
        // Only once the engine's settings were read (with the usage groups, at the create).
        if self.direct_files.worth_trying() && self.usage_groups.initialized() {
            match self.put_files_directly(id, spec).await {
                Ok(()) => {
                    self.direct_files.worked();
                    return Ok(());
                }
                Err(NotDirect::Failed(error)) => return Err(error),
                Err(NotDirect::Unreachable(reason)) => self.direct_files.out_of_reach(&reason),
            }
        }
        self.upload_files(id, spec).await
    }

    /// The container's overlay, as the engine reports it, with the files written into it.
    async fn put_files_directly(
        &self,
        id: &ContainerId,
        spec: &ContainerSpec,
    ) -> Result<(), NotDirect> {
        let inspected = self
            .inspect(id, Subject::Container(id.as_str()))
            .await
            .map_err(NotDirect::Failed)?;
        let dirs = inspected
            .graph_driver
            .and_then(|driver| OverlayDirs::of(&driver.name, &driver.data))
            .ok_or_else(|| {
                NotDirect::Unreachable("the engine's storage driver is not overlay2".to_owned())
            })?;
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || direct_files::put_files(&dirs, &spec))
            .await
            .map_err(|error| {
                NotDirect::Failed(EngineError::Failed {
                    message: format!("putting the task's files in place stopped: {error}"),
                })
            })?
    }

    /// Puts the spec's directories, files and package in place with one archive upload,
    /// streamed as it is written: the package is read entry by entry on a blocking thread, so
    /// what is held is a few chunks, never the package.
    async fn upload_files(
        &self,
        id: &ContainerId,
        spec: &ContainerSpec,
    ) -> Result<(), EngineError> {
        let mtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_secs())
            .unwrap_or(0);
        let spec = spec.clone();
        let (body, failure) = stream_archive(move |out| write_task_archive(&spec, mtime, out));
        let options = UploadToContainerOptionsBuilder::new().path("/").build();
        let uploaded = self
            .timed(
                EngineRequest::Upload,
                self.docker.upload_to_container(
                    id.as_str(),
                    Some(options),
                    bollard::body_try_stream(body),
                ),
            )
            .await;
        // A package that could not be read broke the upload off: its reason is the one to
        // report, not the broken request.
        if let Some(error) = failure.take() {
            return Err(error);
        }
        uploaded.map_err(|error| EngineError::from_bollard(error, Subject::Container(id.as_str())))
    }

    /// A 404 on create means a missing image or a missing network; asking whether the image
    /// is there tells which, without reading the message.
    async fn classify_create_failure(
        &self,
        error: bollard::errors::Error,
        image: &str,
    ) -> EngineError {
        match error {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            } => match self.image_present(image).await {
                Ok(true) => EngineError::Refused {
                    message: EngineError::answered(404, &message),
                },
                Ok(false) => EngineError::ImageNotFound {
                    image: image.to_owned(),
                },
                Err(error) => error,
            },
            other => EngineError::from_bollard(other, Subject::ImageForCreate(image)),
        }
    }

    /// A running holder of `key` for a task to join: an idle one, else a new one; `None`
    /// when none can be had (the task gets a network namespace of its own).
    async fn lend_holder(&self, key: &HolderKey) -> Option<Holder> {
        let (idle, dead) = self.holders.take_idle(key);
        for holder in dead {
            tracing::info!(holder = %holder.id, "a network holder is gone: replacing it");
            self.remove_holder(&holder.id).await;
        }
        if idle.is_some() {
            return idle;
        }
        match self.start_holder(key).await {
            Ok(holder) => {
                self.holders.worked();
                Some(holder)
            }
            Err(why) => {
                self.holders.not_lent(why);
                None
            }
        }
    }

    /// Makes, starts and inspects a holder of `key`, its image first if need be.
    async fn start_holder(&self, key: &HolderKey) -> Result<Holder, NoHolder> {
        self.holders.conntrack()?;
        self.ensure_holder_image().await?;
        let created = self
            .docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                network_holders::holder_body(key),
            )
            .await
            .map_err(|error| match error {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => NoHolder::NotNow(format!("creating a network holder: {error}")),
                error => NoHolder::Failed(format!("creating a network holder: {error}")),
            })?;
        let id = created.id;
        let started = async {
            self.docker
                .start_container(&id, None::<StartContainerOptions>)
                .await?;
            self.docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
        }
        .await;
        let holder = match started {
            Ok(inspected) => match holder_of(&id, key, inspected) {
                Ok(holder) => network_holders::running_its_program(holder).await,
                Err(why) => Err(why),
            },
            Err(error) => Err(NoHolder::Failed(format!(
                "starting a network holder: {error}"
            ))),
        };
        if holder.is_err() {
            self.remove_holder(&id).await;
        }
        let holder = holder?;
        tracing::debug!(holder = %holder.id, network = %key.network, "network holder started");
        Ok(holder)
    }

    /// The holder image, imported unless the engine has it as this build makes it.
    async fn ensure_holder_image(&self) -> Result<(), NoHolder> {
        let _one_at_a_time = self.holders.image_guard.lock().await;
        let failed = |error: EngineError| NoHolder::Failed(format!("the holder image: {error}"));
        let program = network_holders::holder_program().ok_or_else(|| {
            NoHolder::Unusable(format!(
                "no network holder program for this machine's architecture ({})",
                std::env::consts::ARCH
            ))
        })?;
        let recipe = crate::local_stacks::digest([program.as_slice()]);
        let image = network_holders::HOLDER_IMAGE;
        if crate::local_stacks::reused(self, image, &recipe)
            .await
            .map_err(failed)?
            .is_some()
        {
            return Ok(());
        }
        let mtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_secs())
            .unwrap_or(0);
        let rootfs = network_holders::holder_rootfs_tar(&program, mtime).map_err(failed)?;
        let replaced = self.image_id(image).await.map_err(failed)?;
        let changes = [format!(
            "LABEL {}={recipe}",
            crate::local_stacks::RECIPE_LABEL
        )];
        let id = self
            .import_image(Bytes::from(rootfs), image, &changes)
            .await
            .map_err(failed)?;
        tracing::info!(image, %id, "imported the network holder image");
        crate::local_stacks::remove_replaced(self, replaced, &id).await;
        Ok(())
    }

    /// The holder `container` joined, now that the container is gone: its connections
    /// forgotten, then idle again (removed when enough wait already, or when it died).
    async fn give_back_holder(&self, container: &ContainerId) {
        let Some(holder) = self.holders.given_back(container.as_str()) else {
            return;
        };
        if let Ok(conntrack) = self.holders.conntrack() {
            network_holders::forget_connections(&conntrack, &holder).await;
        }
        if !holder.alive() {
            tracing::info!(holder = %holder.id, "a network holder died: removing it");
            self.remove_holder(&holder.id).await;
            return;
        }
        self.idle_again(holder).await;
    }

    /// `holder` among the idle ones again, or removed when enough of its kind wait already.
    async fn idle_again(&self, holder: Holder) {
        if let Some(holder) = self.holders.keep_idle(holder) {
            self.remove_holder(&holder.id).await;
        }
    }

    /// Removes a holder container, whatever state it is in; a failure is only logged (the
    /// runner's reaping gets it later, by its labels).
    async fn remove_holder(&self, id: &str) {
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(error) => tracing::warn!(holder = %id, %error, "cannot remove a network holder"),
        }
    }
}

/// The holder `id` of `key` as the engine reports it once started: its process (which must
/// be the holder program's, seen from here), its address and its shared files.
fn holder_of(
    id: &str,
    key: &HolderKey,
    inspected: bollard::models::ContainerInspectResponse,
) -> Result<Holder, NoHolder> {
    let pid = inspected
        .state
        .as_ref()
        .and_then(|state| state.pid)
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| NoHolder::Failed("the started network holder has no process".to_owned()))?;
    let address = inspected
        .network_settings
        .as_ref()
        .and_then(|settings| settings.networks.as_ref())
        .and_then(|networks| networks.get(&key.network))
        .and_then(|network| network.ip_address.as_deref())
        .and_then(|address| address.parse().ok());
    let file = |path: Option<String>, name: &str| {
        path.filter(|path| !path.is_empty()).ok_or_else(|| {
            NoHolder::Failed(format!(
                "the engine reports no {name} file for the network holder"
            ))
        })
    };
    Ok(Holder {
        id: id.to_owned(),
        key: key.clone(),
        pid,
        address,
        shared_files: [
            file(inspected.hosts_path, "hosts")?,
            file(inspected.resolv_conf_path, "resolv.conf")?,
            file(inspected.hostname_path, "hostname")?,
        ],
    })
}

// === impl EngineRequest ===

impl EngineRequest {
    /// Every request, in the order a task makes them.
    pub const ALL: [EngineRequest; 10] = [
        EngineRequest::InspectImage,
        EngineRequest::Create,
        EngineRequest::Upload,
        EngineRequest::Attach,
        EngineRequest::Start,
        EngineRequest::Wait,
        EngineRequest::Inspect,
        EngineRequest::Stats,
        EngineRequest::Kill,
        EngineRequest::Remove,
    ];

    /// The request's name, as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineRequest::InspectImage => "inspect_image",
            EngineRequest::Create => "create",
            EngineRequest::Upload => "upload",
            EngineRequest::Attach => "attach",
            EngineRequest::Start => "start",
            EngineRequest::Wait => "wait",
            EngineRequest::Inspect => "inspect",
            EngineRequest::Stats => "stats",
            EngineRequest::Kill => "kill",
            EngineRequest::Remove => "remove",
        }
    }
}

// === impl StreamTiming ===

impl StreamTiming {
    fn new(observer: Option<RequestObserver>, request: EngineRequest) -> Self {
        StreamTiming {
            observer,
            request,
            began: Instant::now(),
        }
    }
}

impl Drop for StreamTiming {
    fn drop(&mut self) {
        if let Some(observer) = &self.observer {
            observer(self.request, self.began.elapsed());
        }
    }
}

#[async_trait]
impl ContainerRuntime for DockerEngine {
    async fn capabilities(&self) -> Result<EngineCapabilities, EngineError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        let version = self
            .docker
            .version()
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        Ok(capabilities_of(info, version, self.api_version()))
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, EngineError> {
        spec.validate()?;
        let usage_group = match self.usage_groups().await {
            Some(groups) => groups.allocate(spec.cpu_group.as_deref()),
            None => None,
        };
        let mut body = create_body(spec, usage_group.as_deref())?;
        let holder = match self.holders.key_for(spec) {
            Some(key) => self.lend_holder(&key).await,
            None => None,
        };
        if let (Some(holder), Some(host_config)) = (&holder, body.host_config.as_mut()) {
            network_holders::join(host_config, holder);
        }
        let options = spec
            .name
            .as_deref()
            .map(|name| CreateContainerOptionsBuilder::new().name(name).build());
        let created = match self
            .timed(
                EngineRequest::Create,
                self.docker.create_container(options, body),
            )
            .await
        {
            Ok(created) => created,
            Err(error) => {
                // Nothing ran in the holder: it is idle again as it was.
                if let Some(holder) = holder {
                    self.idle_again(holder).await;
                }
                return Err(self.classify_create_failure(error, &spec.image).await);
            }
        };
        for warning in created.warnings.iter().filter(|w| !w.is_empty()) {
            tracing::warn!(container = %created.id, warning, "engine warning on create");
        }
        let id = ContainerId::new(created.id);
        if let Some(holder) = holder {
            self.holders.lend(id.as_str(), holder);
        }
        if let Some(group) = usage_group {
            self.usage_paths
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id.as_str().to_owned(), group);
        }
        if let Err(error) = self.put_files(&id, spec).await {
            // A half-prepared container must not linger; the upload's error is the one to
            // report, so a failed removal is only logged (the start-up reaper gets it later).
            if let Err(remove_error) = self.remove(&id).await {
                tracing::warn!(container = %id, %remove_error, "cannot remove a container whose upload failed");
            }
            return Err(error);
        }
        Ok(id)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), EngineError> {
        match self
            .timed(
                EngineRequest::Start,
                self.docker
                    .start_container(id.as_str(), None::<StartContainerOptions>),
            )
            .await
        {
            Ok(()) => Ok(()),
            // A 404 on start means a missing container or something the container refers
            // to (its network); asking for the container tells which.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            }) => match self
                .docker
                .inspect_container(id.as_str(), None::<InspectContainerOptions>)
                .await
            {
                Ok(_) => Err(EngineError::Refused {
                    message: EngineError::answered(404, &message),
                }),
                Err(error) => Err(EngineError::from_bollard(
                    error,
                    Subject::Container(id.as_str()),
                )),
            },
            Err(error) => Err(EngineError::from_bollard(
                error,
                Subject::Container(id.as_str()),
            )),
        }
    }

    async fn attach(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        let options = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .logs(false)
            .build();
        let container = id.as_str().to_owned();
        let attached = self
            .timed(
                EngineRequest::Attach,
                self.docker.attach_container(id.as_str(), Some(options)),
            )
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Container(&container)))?;
        // The connection's writing half stays open with the stream: the engine reads no
        // input (stdin is not attached), but the attachment lasts as long as the reader.
        let input = attached.input;
        Ok(attached
            .output
            .filter_map(move |item| {
                let _attached = &input;
                ready(output_chunk(item, &container))
            })
            .boxed())
    }

    async fn kept_output(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        let container = id.as_str().to_owned();
        // Asked once up front, so that a container that does not exist (or an engine still
        // away) is the call's error rather than the stream's.
        self.container_state(id, Subject::Container(&container))
            .await?;
        let options = LogsOptionsBuilder::new()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .tail("all")
            .build();
        Ok(self
            .docker
            .logs(id.as_str(), Some(options))
            .filter_map(move |item| ready(output_chunk(item, &container)))
            .boxed())
    }

    async fn wait(&self, id: &ContainerId) -> Result<ExitStatus, EngineError> {
        let subject = Subject::Container(id.as_str());
        let mut answers = self
            .docker
            .wait_container(id.as_str(), None::<WaitContainerOptions>);
        match self.timed(EngineRequest::Wait, answers.next()).await {
            // bollard reports a non-zero exit as an error; either way the container stopped,
            // and its State below is the authority on how.
            Some(Ok(_)) | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => {}
            Some(Err(error)) => return Err(EngineError::from_bollard(error, subject)),
            None => return Err(EngineError::protocol("the wait ended without an answer")),
        }
        let inspected = self.inspect(id, subject).await?;
        let limit = inspected
            .host_config
            .and_then(|config| config.memory)
            .and_then(|bytes| u64::try_from(bytes).ok());
        let mut state = inspected
            .state
            .ok_or_else(|| EngineError::protocol("the container has no State"))?;
        // Read once it stopped: the group holds the container's whole life.
        let account = match (self.usage_path(id), self.usage_groups.get()) {
            (Some(path), Some(Some(groups))) => groups.read(&path).await,
            _ => None,
        };
        let mut oom_killed = state.oom_killed == Some(true);
        // A SIGKILL this engine sent (a cancel, a timeout) is not the kernel's.
        if !oom_killed && !self.killed().contains(id.as_str()) {
            let sigkilled = state.exit_code == Some(SIGKILL_EXIT_CODE);
            let counted = account
                .as_ref()
                .is_some_and(|account| account.hierarchy == cpu_group::Hierarchy::V2);
            match account
                .as_ref()
                .and_then(|account| account.oom_killed(limit))
            {
                // The container's usage group tells: on cgroup v2 its count of OOM kills
                // (whatever the exit code, as a killed child counts too), on v1 its peak.
                Some(verdict) if counted || sigkilled => oom_killed = verdict,
                Some(_) => {}
                // Otherwise the engine's word: it learns of an OOM kill from a separate
                // event that may be handled just after the exit (or, rarely, lost), so a
                // container killed by SIGKILL that is not (yet) marked OOMKilled is asked
                // again a few times before the answer stands.
                None if sigkilled => {
                    for _ in 0..OOM_RECHECKS {
                        tokio::time::sleep(OOM_RECHECK_DELAY).await;
                        state = self.container_state(id, subject).await?;
                        if state.oom_killed == Some(true)
                            || state.exit_code != Some(SIGKILL_EXIT_CODE)
                        {
                            break;
                        }
                    }
                    oom_killed = state.oom_killed == Some(true);
                }
                None => {}
            }
        }
        let exit_code = state
            .exit_code
            .ok_or_else(|| EngineError::protocol("the container's State has no ExitCode"))?;
        Ok(ExitStatus {
            exit_code,
            oom_killed,
            started_at: state.started_at.as_deref().and_then(parse_engine_time),
            finished_at: state.finished_at.as_deref().and_then(parse_engine_time),
            engine_error: state.error.filter(|e| !e.is_empty()),
            usage: account.map(|account| account.usage),
        })
    }

    async fn kill(&self, id: &ContainerId) -> Result<(), EngineError> {
        self.killed().insert(id.as_str().to_owned());
        let options = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
        match self
            .timed(
                EngineRequest::Kill,
                self.docker.kill_container(id.as_str(), Some(options)),
            )
            .await
        {
            Ok(()) => Ok(()),
            // 409: the container is not running; it is as dead as a kill would make it.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(error) => Err(EngineError::from_bollard(
                error,
                Subject::Container(id.as_str()),
            )),
        }
    }

    async fn usage_accounted(&self, id: &ContainerId) -> bool {
        match (self.usage_path(id), self.usage_groups.get()) {
            (Some(path), Some(Some(groups))) => groups.present(&path).await,
            _ => false,
        }
    }

    async fn stats_snapshot(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ResourceSample>, EngineError> {
        let options = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let mut answers = self.docker.stats(id.as_str(), Some(options));
        match answers.next().await {
            Some(Ok(stats)) => Ok(sample_of(&stats)),
            Some(Err(error)) => Err(EngineError::from_bollard(
                error,
                Subject::Container(id.as_str()),
            )),
            None => Ok(None),
        }
    }

    fn stats(&self, id: &ContainerId) -> ResourceSampleStream {
        let options = StatsOptionsBuilder::new().stream(true).build();
        let container = id.as_str().to_owned();
        // The stream's whole life is the request's: timed until it is dropped.
        let timing = StreamTiming::new(self.observer.clone(), EngineRequest::Stats);
        self.docker
            .stats(id.as_str(), Some(options))
            .map(move |answer| {
                let _timing = &timing;
                answer.map(|stats| sample_of(&stats)).map_err(|error| {
                    EngineError::from_bollard(error, Subject::Container(&container))
                })
            })
            // The engine keeps sending empty samples for a stopped container: the first one
            // ends the stream.
            .take_while(|answer| ready(!matches!(answer, Ok(None))))
            .filter_map(|answer| ready(answer.transpose()))
            .boxed()
    }

    async fn remove(&self, id: &ContainerId) -> Result<Duration, EngineError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        let started = Instant::now();
        self.killed().remove(id.as_str());
        let removed = self
            .timed(
                EngineRequest::Remove,
                self.docker.remove_container(id.as_str(), Some(options)),
            )
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Container(id.as_str())));
        if let Ok(()) | Err(EngineError::ContainerNotFound { .. }) = removed {
            let path = self
                .usage_paths
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(id.as_str());
            if let (Some(path), Some(Some(groups))) = (path, self.usage_groups.get()) {
                groups.remove(&path).await;
            }
            self.give_back_holder(id).await;
        }
        removed?;
        let took = started.elapsed();
        tracing::debug!(container = %id, took_ms = took.as_millis(), "container removed");
        Ok(took)
    }

    async fn release_idle(&self) {
        self.remove_idle_network_holders().await;
    }

    async fn list_labeled(&self, key: &str, value: &str) -> Result<Vec<ContainerId>, EngineError> {
        let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        Ok(containers
            .into_iter()
            .filter_map(|container| container.id.map(ContainerId::new))
            .collect())
    }

    async fn list_labeled_containers(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<ListedContainer>, EngineError> {
        let label = match value {
            Some(value) => format!("{key}={value}"),
            None => key.to_owned(),
        };
        let filters = HashMap::from([("label", vec![label])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        Ok(containers
            .into_iter()
            .filter_map(|container| {
                let running = matches!(
                    container.state,
                    Some(
                        ContainerSummaryStateEnum::RUNNING
                            | ContainerSummaryStateEnum::PAUSED
                            | ContainerSummaryStateEnum::RESTARTING
                            | ContainerSummaryStateEnum::STOPPING
                    )
                );
                Some(ListedContainer {
                    id: ContainerId::new(container.id?),
                    labels: container.labels.unwrap_or_default().into_iter().collect(),
                    running,
                })
            })
            .collect())
    }

    async fn ensure_cpu_group(&self, name: &str, nano_cpus: u64) -> Result<(), EngineError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        let hierarchy = hierarchy_of(&info);
        let driver = info
            .cgroup_driver
            .map(|driver| driver.to_string())
            .unwrap_or_default();
        cpu_group::ensure(name, nano_cpus, hierarchy, &driver).await
    }

    async fn remove_cpu_group(&self, name: &str) -> Result<(), EngineError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        cpu_group::remove(name, hierarchy_of(&info)).await
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<NetworkInfo>, EngineError> {
        match self.docker.inspect_network(name, None).await {
            Ok(inspected) => network_info_of(inspected).map(Some),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(error) => Err(EngineError::from_bollard(error, Subject::Engine)),
        }
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkInfo, EngineError> {
        spec.validate()?;
        if let Some(existing) = self.inspect_network(&spec.name).await? {
            return matching(spec, existing);
        }
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some("bridge".to_owned()),
            internal: Some(false),
            attachable: Some(false),
            enable_ipv6: Some(false),
            ipam: spec.subnet.map(|subnet| Ipam {
                driver: Some("default".to_owned()),
                config: Some(vec![IpamConfig {
                    subnet: Some(subnet.trunc().to_string()),
                    ..IpamConfig::default()
                }]),
                options: None,
            }),
            options: Some(HashMap::from([
                (BRIDGE_NAME_OPTION.to_owned(), spec.bridge.clone()),
                (ICC_OPTION.to_owned(), "false".to_owned()),
            ])),
            labels: Some(HashMap::from([(
                NETWORK_LABEL.to_owned(),
                "tasks".to_owned(),
            )])),
            ..NetworkCreateRequest::default()
        };
        let created = self.docker.create_network(request).await;
        // Another runner may have created it meanwhile: Docker then refuses the second
        // bridge of the same name, and the name finds the first.
        match (created, self.inspect_network(&spec.name).await?) {
            (Ok(_), Some(network)) => {
                tracing::info!(network = %network.name, bridge = %spec.bridge, subnets = ?network.subnets, "task network created");
                matching(spec, network)
            }
            (Err(_), Some(network)) => matching(spec, network),
            (Ok(_), None) => Err(EngineError::protocol(format!(
                "the network {} was created but is not found",
                spec.name
            ))),
            (Err(error), None) => Err(EngineError::from_bollard(error, Subject::Engine)),
        }
    }

    async fn isolate_network(
        &self,
        network: &NetworkInfo,
        policy: &EgressPolicy,
    ) -> Result<(), EngineError> {
        firewall::isolate(network, policy).await
    }
}

#[async_trait]
impl ImageStore for DockerEngine {
    async fn local_image(&self, image: &str) -> Result<Option<LocalImage>, EngineError> {
        // An image id is asked for as it is; a name gets its registry and tag written out.
        let reference = if image.starts_with("sha256:") {
            image.to_owned()
        } else {
            normalize_reference(image)
        };
        match self
            .timed(
                EngineRequest::InspectImage,
                self.docker.inspect_image(&reference),
            )
            .await
        {
            Ok(inspected) => Ok(Some(LocalImage {
                id: inspected.id.ok_or_else(|| {
                    EngineError::protocol(format!("the image {reference} has no id"))
                })?,
                repo_digests: inspected.repo_digests.unwrap_or_default(),
                labels: inspected
                    .config
                    .and_then(|config| config.labels)
                    .map(|labels| labels.into_iter().collect())
                    .unwrap_or_default(),
                size_bytes: inspected.size.and_then(|size| u64::try_from(size).ok()),
            })),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(error) => Err(EngineError::from_bollard(error, Subject::Engine)),
        }
    }

    async fn list_images(&self) -> Result<Vec<ImageEntry>, EngineError> {
        let options = ListImagesOptionsBuilder::new().all(false).build();
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        Ok(images
            .into_iter()
            .map(|image| ImageEntry {
                id: image.id,
                references: image
                    .repo_tags
                    .into_iter()
                    .filter(|tag| tag != "<none>:<none>")
                    .collect(),
                size_bytes: u64::try_from(image.size).unwrap_or(0),
            })
            .collect())
    }

    async fn remove_image(&self, image: &str) -> Result<(), EngineError> {
        self.docker
            .remove_image(image, None::<RemoveImageOptions>, None)
            .await
            .map(|_| ())
            .map_err(|error| match error {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => EngineError::ImageNotFound {
                    image: image.to_owned(),
                },
                other => EngineError::from_bollard(other, Subject::Engine),
            })
    }

    async fn check_registry_access(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError> {
        let reference = normalize_reference(image);
        let anonymous = registry_auth.is_none();
        let asked = self
            .docker
            .inspect_registry_image(&reference, registry_auth.map(credentials_of))
            .await;
        let error = match asked {
            Ok(_) => return Ok(()),
            Err(error) => EngineError::from_bollard(error, Subject::Pull(&reference)),
        };
        if !(anonymous && matches!(error, EngineError::PullFailed { .. })) {
            return Err(error);
        }
        // Without credentials the engine answers 500 both when the registry is unreachable
        // and when it demands basic auth (the engine gives up before asking); with
        // credentials the registry's 401 comes through as 401. So a placeholder credential,
        // which no registry accepts, tells the two apart by status alone.
        let placeholder = DockerCredentials {
            username: Some(PLACEHOLDER_USERNAME.to_owned()),
            password: Some(PLACEHOLDER_USERNAME.to_owned()),
            ..DockerCredentials::default()
        };
        let again = self
            .docker
            .inspect_registry_image(&reference, Some(placeholder))
            .await;
        let status = match &again {
            Err(bollard::errors::Error::DockerResponseServerError { status_code, .. }) => {
                *status_code
            }
            _ => 0,
        };
        match again.map_err(|again| EngineError::from_bollard(again, Subject::Pull(&reference))) {
            Err(EngineError::RegistryDenied { .. }) => Err(EngineError::RegistryDenied {
                image: reference.clone(),
                message: EngineError::answered(
                    status,
                    "the registry requires credentials, and none were given for it",
                ),
            }),
            // Still unreachable, or something odd: the first answer stands.
            _ => Err(error),
        }
    }

    async fn ensure_image(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
        progress: Option<PullProgressSender>,
    ) -> Result<ImagePresence, EngineError> {
        let reference = normalize_reference(image);
        if self.image_present(&reference).await? {
            return Ok(ImagePresence::AlreadyPresent);
        }
        let docker = self.docker.clone();
        let key = pull_key(&reference, registry_auth.as_ref());
        let credentials = registry_auth.clone().map(credentials_of);
        let pulled = reference.clone();
        let result = self
            .pulls
            .pull(&key, &reference, progress, move |events| {
                pull_image(docker, pulled, credentials, events)
            })
            .await;
        match result {
            Ok(()) => Ok(ImagePresence::Pulled),
            // The engine says only "it failed": the registry says whose failure it was.
            Err(error @ EngineError::PullFailed { .. }) => {
                match self.check_registry_access(&reference, registry_auth).await {
                    Err(refusal) if !refusal.is_infrastructure() => Err(refusal),
                    _ => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }
}

#[async_trait]
impl ImageBuilder for DockerEngine {
    async fn push_image(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError> {
        let reference = normalize_reference(image);
        let (repository, tag) = split_tag(&reference);
        let options = PushImageOptionsBuilder::new().tag(tag).build();
        // The engine wants the auth header on every push, even an empty one.
        let credentials = registry_auth.map(credentials_of).unwrap_or_default();
        tracing::info!(image = %reference, "pushing image");
        let mut answers = self
            .docker
            .push_image(repository, Some(options), Some(credentials));
        while let Some(answer) = answers.next().await {
            let info = answer
                .map_err(|error| EngineError::from_bollard(error, Subject::Push(&reference)))?;
            if let Some(detail) = info.error_detail {
                return Err(EngineError::PushFailed {
                    image: reference.clone(),
                    message: detail.message.unwrap_or_default(),
                });
            }
        }
        tracing::info!(image = %reference, "image pushed");
        Ok(())
    }

    async fn import_image(
        &self,
        rootfs_tar: Bytes,
        reference: &str,
        changes: &[String],
    ) -> Result<String, EngineError> {
        let reference = normalize_reference(reference);
        let (repository, tag) = split_tag(&reference);
        let options = CreateImageOptionsBuilder::new()
            .from_src("-")
            .repo(repository)
            .tag(tag)
            .changes(changes.to_vec())
            .build();
        let mut answers =
            self.docker
                .create_image(Some(options), Some(bollard::body_full(rootfs_tar)), None);
        while let Some(answer) = answers.next().await {
            answer.map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        }
        self.image_id(&reference).await?.ok_or_else(|| {
            EngineError::protocol(format!("the imported image {reference} is missing"))
        })
    }

    async fn build_image(
        &self,
        request: &BuildRequest,
        on_progress: &mut (dyn FnMut(BuildProgress) + Send),
    ) -> Result<BuiltImage, EngineError> {
        let tags: Vec<String> = request
            .tags
            .iter()
            .map(|tag| normalize_reference(tag))
            .collect();
        let plan = plan_in_background(request).await?;
        on_progress(BuildProgress::Context {
            files: plan.files,
            bytes: plan.bytes,
        });
        let options = build_options(request, &plan, tags.first().map(String::as_str));
        let (body, context_failure) = stream_context(plan);
        tracing::info!(context = %request.context_dir.display(), ?tags, "building image");

        let mut answers =
            self.docker
                .build_image(options, None, Some(bollard::body_try_stream(body)));
        let mut lines = OutputLines::default();
        let mut reported_id = None;
        while let Some(answer) = answers.next().await {
            let info = match answer {
                Ok(info) => info,
                Err(error) => {
                    lines.finish(on_progress);
                    return Err(context_failure
                        .take()
                        .unwrap_or_else(|| EngineError::from_bollard(error, Subject::Build)));
                }
            };
            if let Some(text) = info.stream {
                lines.push(&text, on_progress);
            }
            if let Some(event) = pull_progress_of(info.id, info.status, info.progress_detail) {
                on_progress(BuildProgress::Pull(event));
            }
            if let Some(id) = info.aux.and_then(|aux| aux.id) {
                on_progress(BuildProgress::ImageId { id: id.clone() });
                reported_id = Some(id);
            }
        }
        lines.finish(on_progress);
        if let Some(error) = context_failure.take() {
            return Err(error);
        }

        let id = match (reported_id, tags.first()) {
            (Some(id), _) => id,
            // An engine that does not report the id still tagged the image.
            (None, Some(tag)) => self.image_id(tag).await?.ok_or_else(|| {
                EngineError::protocol(format!("the build ended but {tag} is missing"))
            })?,
            (None, None) => {
                return Err(EngineError::protocol(
                    "the build ended without reporting the image id",
                ));
            }
        };
        for tag in tags.iter().skip(1) {
            let (repository, tag) = split_tag(tag);
            let options = TagImageOptionsBuilder::new()
                .repo(repository)
                .tag(tag)
                .build();
            self.docker
                .tag_image(&id, Some(options))
                .await
                .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        }
        tracing::info!(%id, ?tags, "image built");
        Ok(BuiltImage { id, tags })
    }
}

/// Runs one pull to its end, sending its progress on `events`.
async fn pull_image(
    docker: Docker,
    reference: String,
    credentials: Option<DockerCredentials>,
    events: broadcast::Sender<PullProgress>,
) -> Result<(), EngineError> {
    tracing::info!(image = %reference, "pulling image");
    let options = CreateImageOptionsBuilder::new()
        .from_image(&reference)
        .build();
    let mut answers = docker.create_image(Some(options), None, credentials);
    while let Some(answer) = answers.next().await {
        let info =
            answer.map_err(|error| EngineError::from_bollard(error, Subject::Pull(&reference)))?;
        if let Some(event) = pull_progress_of(info.id, info.status, info.progress_detail) {
            // Nobody listening is fine: progress is optional.
            let _ = events.send(event);
        }
    }
    tracing::info!(image = %reference, "image pulled");
    Ok(())
}

/// A pull's progress from the engine's status line, whether a pull or a build reported it.
fn pull_progress_of(
    id: Option<String>,
    status: Option<String>,
    detail: Option<ProgressDetail>,
) -> Option<PullProgress> {
    let status = status?;
    let (current, total) = detail
        .map(|detail| {
            (
                detail.current.and_then(|c| u64::try_from(c).ok()),
                detail.total.and_then(|t| u64::try_from(t).ok()),
            )
        })
        .unwrap_or((None, None));
    Some(match id {
        Some(layer) if !layer.is_empty() => PullProgress::Layer {
            layer,
            status,
            current,
            total,
        },
        _ => PullProgress::Message { status },
    })
}

/// Walks the build context on a blocking thread.
async fn plan_in_background(request: &BuildRequest) -> Result<ContextPlan, EngineError> {
    let request = request.clone();
    tokio::task::spawn_blocking(move || plan_context(&request))
        .await
        .map_err(|error| {
            EngineError::protocol(format!("reading the build context failed: {error}"))
        })?
}

/// The build's query: the classic builder, intermediate containers always removed, the first
/// tag (the others are added after the build).
fn build_options(
    request: &BuildRequest,
    plan: &ContextPlan,
    tag: Option<&str>,
) -> BuildImageOptions {
    let mut options = BuildImageOptionsBuilder::new()
        .dockerfile(&plan.dockerfile)
        .rm(true)
        .forcerm(true)
        .nocache(request.no_cache);
    if let Some(tag) = tag {
        options = options.t(tag);
    }
    if request.pull {
        options = options.pull("1");
    }
    if !request.build_args.is_empty() {
        options = options.buildargs(&request.build_args.clone().into_iter().collect());
    }
    if !request.labels.is_empty() {
        options = options.labels(&request.labels.clone().into_iter().collect());
    }
    options.build()
}

/// The user name of the credential that [`DockerEngine::check_registry_access`] sends to learn
/// whether a registry demands credentials; it never names a real account.
const PLACEHOLDER_USERNAME: &str = "stevedore-no-credentials";

fn credentials_of(auth: RegistryAuth) -> DockerCredentials {
    DockerCredentials {
        username: auth.username,
        password: auth.password,
        identitytoken: auth.identity_token,
        serveraddress: auth.server_address,
        ..DockerCredentials::default()
    }
}

/// The create request for `spec`, the container under `usage_group` (`usage_group`) when it
/// has one, else in its CPU group, if any.
fn create_body(
    spec: &ContainerSpec,
    usage_group: Option<&str>,
) -> Result<ContainerCreateBody, EngineError> {
    let as_engine_integer = |value: Option<u64>| -> Result<Option<i64>, EngineError> {
        value
            .map(|v| i64::try_from(v).map_err(EngineError::invalid_spec))
            .transpose()
    };
    let memory = as_engine_integer(spec.memory_bytes)?;
    let host_config = HostConfig {
        memory,
        // Memory+swap equal to memory: no swap beyond the limit.
        memory_swap: memory,
        nano_cpus: as_engine_integer(spec.nano_cpus)?,
        pids_limit: as_engine_integer(spec.pids_limit)?,
        cgroup_parent: usage_group
            .or(spec.cpu_group.as_deref())
            .map(|group| format!("/{group}")),
        network_mode: spec.network_mode.clone(),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(spec.effective_capabilities()),
        // The runner reads the output through `attach` and stores it capped. The engine keeps
        // one bounded file beside that, for `kept_output` after an engine loss: an unbounded
        // one of a task printing without end would grow until the disk is full (tens of MB a
        // second), and a rotated one is only read back once, so nothing is lost to rotation
        // while a follower lags.
        log_config: Some(HostConfigLogConfig {
            typ: Some(TASK_LOG_DRIVER.to_owned()),
            config: Some(HashMap::from([
                (
                    "max-size".to_owned(),
                    (crate::spec::KEPT_OUTPUT_BYTES / 2).to_string(),
                ),
                ("max-file".to_owned(), "1".to_owned()),
                ("compress".to_owned(), "false".to_owned()),
            ])),
        }),
        ..HostConfig::default()
    };
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.cmd.clone(),
        entrypoint: spec.entrypoint.clone(),
        env: Some(spec.env_strings()),
        working_dir: spec.working_dir.clone(),
        user: spec.user.clone(),
        labels: Some(
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
    })
}

/// The engine's cgroup hierarchy, v1 unless it says v2.
fn hierarchy_of(info: &SystemInfo) -> cpu_group::Hierarchy {
    match info.cgroup_version {
        Some(SystemInfoCgroupVersionEnum::_2) => cpu_group::Hierarchy::V2,
        _ => cpu_group::Hierarchy::V1,
    }
}

/// What Docker says of a network, in the trait's terms.
fn network_info_of(inspected: NetworkInspect) -> Result<NetworkInfo, EngineError> {
    let options = inspected.options.unwrap_or_default();
    let configs = inspected
        .ipam
        .and_then(|ipam| ipam.config)
        .unwrap_or_default();
    Ok(NetworkInfo {
        id: inspected
            .id
            .ok_or_else(|| EngineError::protocol("a network without an id"))?,
        name: inspected.name.unwrap_or_default(),
        bridge: options
            .get(BRIDGE_NAME_OPTION)
            .cloned()
            .filter(|_| inspected.driver.as_deref() == Some("bridge")),
        subnets: configs
            .iter()
            .filter_map(|config| config.subnet.as_deref()?.parse().ok())
            .collect(),
        gateways: configs
            .iter()
            .filter_map(|config| config.gateway.as_deref()?.parse().ok())
            .collect(),
        inter_container: options.get(ICC_OPTION).map(String::as_str) != Some("false"),
        ipv6: inspected.enable_ipv6.unwrap_or(false),
    })
}

/// `network` when it is what `spec` asks for; a conflict naming the difference otherwise.
fn matching(spec: &NetworkSpec, network: NetworkInfo) -> Result<NetworkInfo, EngineError> {
    let mut differences = Vec::new();
    if network.bridge.as_deref() != Some(spec.bridge.as_str()) {
        differences.push(format!(
            "its bridge is {:?}, not {:?}",
            network.bridge.as_deref().unwrap_or("Docker's choice"),
            spec.bridge
        ));
    }
    if network.inter_container {
        differences.push("its containers may talk to each other (enable_icc)".to_owned());
    }
    if network.ipv6 {
        differences.push("it has IPv6".to_owned());
    }
    if let Some(subnet) = spec.subnet
        && !network.subnets.contains(&subnet.trunc())
    {
        differences.push(format!(
            "its subnets are {:?}, not {subnet}",
            network
                .subnets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        ));
    }
    if differences.is_empty() {
        Ok(network)
    } else {
        Err(EngineError::Conflict {
            message: format!(
                "the network {} exists with other settings ({}); remove it (docker network rm {}) \
                 or choose another name",
                spec.name,
                differences.join("; "),
                spec.name
            ),
        })
    }
}

fn capabilities_of(
    info: SystemInfo,
    version: SystemVersion,
    negotiated: String,
) -> EngineCapabilities {
    EngineCapabilities {
        memory_limit: info.memory_limit.unwrap_or(false),
        swap_limit: info.swap_limit.unwrap_or(false),
        cpu_cfs_quota: info.cpu_cfs_quota.unwrap_or(false),
        pids_limit: info.pids_limit.unwrap_or(false),
        server_version: info.server_version.or(version.version).unwrap_or_default(),
        api_version: version.api_version.unwrap_or_default(),
        negotiated_api_version: negotiated,
        ncpu: info.ncpu.and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
        mem_total: info
            .mem_total
            .and_then(|m| u64::try_from(m).ok())
            .unwrap_or(0),
        cgroup_version: info
            .cgroup_version
            .map(|v| v.to_string())
            .filter(|v| !v.is_empty()),
        operating_system: info.operating_system,
        warnings: info.warnings.unwrap_or_default(),
    }
}

/// A sample, or `None` for the empty answer the engine gives about a stopped container.
fn sample_of(stats: &ContainerStatsResponse) -> Option<ResourceSample> {
    let memory = stats.memory_stats.as_ref();
    let memory_bytes = memory.and_then(|m| m.usage);
    let cpu_total_ns = stats
        .cpu_stats
        .as_ref()
        .and_then(|c| c.cpu_usage.as_ref())
        .and_then(|u| u.total_usage);
    if memory_bytes.is_none() && cpu_total_ns.unwrap_or(0) == 0 {
        return None;
    }
    Some(ResourceSample {
        memory_bytes: memory_bytes.unwrap_or(0),
        memory_peak_bytes: memory.and_then(|m| m.max_usage),
        cpu_total_ns: cpu_total_ns.unwrap_or(0),
        pids: stats.pids_stats.as_ref().and_then(|p| p.current),
    })
}

/// Parses the engine's RFC 3339 times; its "never" is year 1 (`0001-01-01T00:00:00Z`).
fn parse_engine_time(text: &str) -> Option<Timestamp> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    let utc = parsed.with_timezone(&chrono::Utc);
    (utc.timestamp() > 0).then_some(utc)
}

/// Splits `repo:tag` at the tag's colon (not a registry port's).
fn split_tag(reference: &str) -> (&str, &str) {
    let name_start = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_start..].rfind(':') {
        Some(colon) => (
            &reference[..name_start + colon],
            &reference[name_start + colon + 1..],
        ),
        None => (reference, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn tags_split_at_the_last_components_colon() {
        assert_eq!(
            split_tag("stevedore/busybox:local"),
            ("stevedore/busybox", "local")
        );
        assert_eq!(
            split_tag("localhost:5000/app:2"),
            ("localhost:5000/app", "2")
        );
        assert_eq!(
            split_tag("localhost:5000/app"),
            ("localhost:5000/app", "latest")
        );
    }

    #[test]
    fn engine_times_parse_and_year_one_means_never() {
        assert!(parse_engine_time("0001-01-01T00:00:00Z").is_none());
        let parsed = parse_engine_time("2024-05-01T10:11:12.123456789Z");
        assert_eq!(parsed.map(|t| t.timestamp()), Some(1_714_558_272));
    }

    #[test]
    fn the_create_body_sets_limits_and_drops_privileges() -> Result<(), EngineError> {
        let mut spec = ContainerSpec::new("img:1");
        spec.memory_bytes = Some(64 << 20);
        spec.pids_limit = Some(32);
        spec.labels = BTreeMap::from([("stevedore.task".to_owned(), "t1".to_owned())]);
        let body = create_body(&spec, None)?;
        let host = body.host_config.unwrap_or_default();
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.pids_limit, Some(32));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_owned()])
        );
        assert!(
            host.cap_add
                .unwrap_or_default()
                .contains(&"SETUID".to_owned())
        );
        assert_eq!(body.cmd, None);
        let log = host.log_config.unwrap_or_default();
        assert_eq!(log.typ.as_deref(), Some("local"));
        let options = log.config.unwrap_or_default();
        assert_eq!(options["max-size"], (4u64 << 20).to_string());
        assert_eq!(options["max-file"], "1");
        Ok(())
    }

    #[test]
    fn pulls_are_shared_only_under_the_same_credentials() {
        let auth = |password: &str| RegistryAuth {
            username: Some("alice".into()),
            password: Some(password.into()),
            identity_token: None,
            server_address: Some("r:5000".into()),
        };
        let image = "r:5000/app:1";
        assert_eq!(
            pull_key(image, Some(&auth("a"))),
            pull_key(image, Some(&auth("a")))
        );
        assert_ne!(
            pull_key(image, Some(&auth("a"))),
            pull_key(image, Some(&auth("b")))
        );
        assert_ne!(pull_key(image, Some(&auth("a"))), pull_key(image, None));
        assert!(!pull_key(image, Some(&auth("hunter2"))).contains("hunter2"));
    }

    #[test]
    fn an_empty_stats_answer_is_no_sample() {
        assert_eq!(sample_of(&ContainerStatsResponse::default()), None);
    }
}
