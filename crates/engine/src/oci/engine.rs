//! [`OciEngine`]: the direct OCI runtime as a runner holds it, a [`ContainerRuntime`] and an
//! [`ImageStore`] in one: containers from [`OciRuntime`], images from [`OciImages`], the task
//! network from a [`NetnsPool`] started when the runner isolates its network.
//!
//! ```text
//! runner ─ensure_image──────────▶ OciImages (import from the local Docker, or pull)
//!        ─ensure/isolate_network─▶ TaskNetworks ─start / isolate─▶ NetnsPool
//!        ─create … remove────────▶ OciRuntime ─pin─▶ OciImages, ─take/give_back─▶ TaskNetworks
//! ```
//!
//! The task network is the runner's managed network by name only: its bridge and subnet are
//! the OCI engine's own settings (by default `stvoci0` on `10.213.0.0/16`), never the Docker
//! network's bridge, so both engines can serve runners of one host.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use crate::engine::{
    ContainerRuntime, EngineCapabilities, ExitStatus, ImageEntry, ImagePresence, ImageStore,
    ListedContainer, LocalImage, LogChunkStream, PullProgressSender, RegistryAuth, ResourceSample,
    ResourceSampleStream, ResourceUsage,
};
use crate::error::EngineError;
use crate::network::{EgressPolicy, NetworkInfo, NetworkSpec};
use crate::oci::{
    NetnsPool, NetnsPoolSettings, NetnsSource, OciImages, OciImagesSettings, OciRuntime,
    OciSettings, TaskNetns,
};
use crate::spec::{ContainerId, ContainerSpec};

/// How an [`OciEngine`] is set up.
#[derive(Debug, Clone)]
pub struct OciEngineSettings {
    /// Bundles and the runtime binary.
    pub runtime: OciSettings,
    /// The image store.
    pub images: OciImagesSettings,
    /// The task network's bridge, subnet and pool size; its name and policy come from the
    /// runner ([`ContainerRuntime::ensure_network`], [`ContainerRuntime::isolate_network`]).
    pub network: NetnsPoolSettings,
    /// Import images from the local Docker engine when it has them (pull from their
    /// registry otherwise). Without a reachable engine, registries are the only source.
    pub import_from_docker: bool,
}

/// The direct OCI runtime with its image store and task network (see the module's
/// documentation).
#[derive(Clone)]
pub struct OciEngine {
    runtime: OciRuntime,
    images: OciImages,
    networks: Arc<TaskNetworks>,
}

/// The task network: its settings until the runner names it, then its pool.
#[derive(Debug)]
struct TaskNetworks {
    settings: Mutex<NetnsPoolSettings>,
    pool: OnceCell<NetnsPool>,
}

// === impl OciEngine ===

impl std::fmt::Debug for OciEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciEngine")
            .field("runtime", &self.runtime)
            .field("images", &self.images.root())
            .finish_non_exhaustive()
    }
}

impl OciEngine {
    /// Opens the image store, finds the runtime binary and makes the state root. The task
    /// network's pool starts when the runner isolates the network.
    pub async fn start(settings: OciEngineSettings) -> Result<OciEngine, EngineError> {
        settings.network.validate()?;
        let images = if settings.import_from_docker {
            match OciImages::open_with_local_docker(settings.images.clone()).await {
                Ok(images) => images,
                Err(error @ EngineError::Unreachable { .. }) => {
                    tracing::info!(
                        %error,
                        "no local Docker engine: the OCI engine's images come from registries"
                    );
                    OciImages::open(settings.images).await?
                }
                Err(error) => return Err(error),
            }
        } else {
            OciImages::open(settings.images).await?
        };
        let networks = Arc::new(TaskNetworks {
            settings: Mutex::new(settings.network),
            pool: OnceCell::new(),
        });
        let runtime = OciRuntime::new(
            Arc::new(images.clone()),
            Some(Arc::clone(&networks) as Arc<dyn NetnsSource>),
            settings.runtime,
        )
        .await?;
        Ok(OciEngine {
            runtime,
            images,
            networks,
        })
    }

    /// The container runtime.
    pub fn runtime(&self) -> &OciRuntime {
        &self.runtime
    }

    /// The image store.
    pub fn images(&self) -> &OciImages {
        &self.images
    }

    /// Removes the task network's namespaces (after the runner removed its containers).
    pub async fn shutdown(&self) {
        if let Some(pool) = self.networks.pool.get() {
            pool.shutdown().await;
        }
    }
}

// === impl TaskNetworks ===

impl TaskNetworks {
    fn settings(&self) -> std::sync::MutexGuard<'_, NetnsPoolSettings> {
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl NetnsSource for TaskNetworks {
    async fn take(&self, network: &str) -> Result<TaskNetns, EngineError> {
        match self.pool.get() {
            Some(pool) => pool.take(network).await,
            None => Err(EngineError::LimitUnenforceable {
                capability: "the task network".to_owned(),
                hint: "the task network is not isolated yet (the runner isolates it when it \
                       starts); only tasks without a network run before"
                    .to_owned(),
            }),
        }
    }

    async fn give_back(&self, netns: TaskNetns) {
        if let Some(pool) = self.pool.get() {
            pool.give_back(netns).await;
        }
    }
}

#[async_trait]
impl ContainerRuntime for OciEngine {
    async fn capabilities(&self) -> Result<EngineCapabilities, EngineError> {
        self.runtime.capabilities().await
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, EngineError> {
        self.runtime.create(spec).await
    }

    async fn start(&self, id: &ContainerId) -> Result<(), EngineError> {
        self.runtime.start(id).await
    }

    async fn attach(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        self.runtime.attach(id).await
    }

    async fn kept_output(&self, id: &ContainerId) -> Result<LogChunkStream, EngineError> {
        self.runtime.kept_output(id).await
    }

    async fn wait(&self, id: &ContainerId) -> Result<ExitStatus, EngineError> {
        self.runtime.wait(id).await
    }

    async fn kill(&self, id: &ContainerId) -> Result<(), EngineError> {
        self.runtime.kill(id).await
    }

    async fn stats_snapshot(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ResourceSample>, EngineError> {
        self.runtime.stats_snapshot(id).await
    }

    async fn usage_accounted(&self, id: &ContainerId) -> bool {
        self.runtime.usage_accounted(id).await
    }

    fn stats(&self, id: &ContainerId) -> ResourceSampleStream {
        self.runtime.stats(id)
    }

    async fn resource_peak(&self, id: &ContainerId) -> Result<ResourceUsage, EngineError> {
        self.runtime.resource_peak(id).await
    }

    async fn remove(&self, id: &ContainerId) -> Result<Duration, EngineError> {
        self.runtime.remove(id).await
    }

    async fn list_labeled(&self, key: &str, value: &str) -> Result<Vec<ContainerId>, EngineError> {
        self.runtime.list_labeled(key, value).await
    }

    async fn list_labeled_containers(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<ListedContainer>, EngineError> {
        self.runtime.list_labeled_containers(key, value).await
    }

    async fn ensure_cpu_group(&self, name: &str, nano_cpus: u64) -> Result<(), EngineError> {
        self.runtime.ensure_cpu_group(name, nano_cpus).await
    }

    async fn remove_cpu_group(&self, name: &str) -> Result<(), EngineError> {
        self.runtime.remove_cpu_group(name).await
    }

    /// The managed network is the one the OCI engine serves; it knows no other.
    async fn inspect_network(&self, name: &str) -> Result<Option<NetworkInfo>, EngineError> {
        let settings = self.networks.settings();
        Ok((settings.network == name).then(|| settings.network_info()))
    }

    /// Names the task network after `spec` (its bridge and subnet stay the OCI engine's
    /// own; see the module's documentation). Nothing is made until it is isolated.
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkInfo, EngineError> {
        let mut settings = self.networks.settings();
        if self.networks.pool.get().is_some() && settings.network != spec.name {
            return Err(EngineError::Conflict {
                message: format!(
                    "the OCI engine's task network is {:?} already, not {:?}",
                    settings.network, spec.name
                ),
            });
        }
        settings.network.clone_from(&spec.name);
        Ok(settings.network_info())
    }

    /// Starts the pool with `policy` the first time, applies it to the running pool after.
    async fn isolate_network(
        &self,
        network: &NetworkInfo,
        policy: &EgressPolicy,
    ) -> Result<(), EngineError> {
        let settings = {
            let settings = self.networks.settings();
            if settings.network != network.name {
                return Err(EngineError::invalid_spec(format!(
                    "the OCI engine serves the task network {:?}, not {:?}",
                    settings.network, network.name
                )));
            }
            NetnsPoolSettings {
                policy: policy.clone(),
                ..settings.clone()
            }
        };
        let mut started_now = false;
        let pool = self
            .networks
            .pool
            .get_or_try_init(|| async {
                started_now = true;
                NetnsPool::start(settings).await
            })
            .await?;
        if !started_now {
            pool.isolate(policy).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ImageStore for OciEngine {
    async fn image_id(&self, image: &str) -> Result<Option<String>, EngineError> {
        self.images.image_id(image).await
    }

    async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        self.images.image_present(image).await
    }

    async fn local_image(&self, image: &str) -> Result<Option<LocalImage>, EngineError> {
        self.images.local_image(image).await
    }

    async fn list_images(&self) -> Result<Vec<ImageEntry>, EngineError> {
        self.images.list_images().await
    }

    async fn remove_image(&self, image: &str) -> Result<(), EngineError> {
        self.images.remove_image(image).await
    }

    async fn check_registry_access(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError> {
        self.images
            .check_registry_access(image, registry_auth)
            .await
    }

    async fn ensure_image(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
        progress: Option<PullProgressSender>,
    ) -> Result<ImagePresence, EngineError> {
        self.images
            .ensure_image(image, registry_auth, progress)
            .await
    }
}
