//! The OCI runtime's image store: images unpacked once into a content-addressed directory,
//! their layers shared by every image that has them, ready to be the lower layers of a task's
//! overlay.
//!
//! ```text
//! <root>/                      (the setting, e.g. <data_dir>/oci/images)
//!   lock                       held (flock) by the one process that owns the store
//!   index.json                 the images: references → id, layers, run config (`index`)
//!   layers/sha256/<diff id>/   one unpacked layer, whiteouts in overlayfs's form (`unpack`)
//!   tmp/                       layers being unpacked or deleted; emptied at open
//! ```
//!
//! Images come from the local Docker engine when it has them (`docker_import`: the engine's
//! export, `docker save`'s tar, streamed and unpacked as it arrives, each layer checked
//! against the config's diff ids) and from their registry otherwise (`registry_pull`, over
//! `registry`, a client of the distribution API: manifest lists resolved to linux/amd64,
//! every blob checked against its digest as it streams). A layer is keyed by its diff id (the digest of its uncompressed
//! tar), so an image imported from Docker and the same image pulled from a registry share
//! their layers.
//!
//! A layer is unpacked into `tmp/` and renamed into place, so `layers/` only ever holds whole
//! layers; the index is rewritten atomically after the layers it names are in place (and
//! after a `syncfs`, so a power loss never leaves it naming lost files). Pulls of one
//! reference with the same credentials are shared however many tasks ask (`PullCoalescer`,
//! as on the Docker path), and a layer is fetched once however many pulls want it.
//!
//! A layer is removed with the last image that names it, never while a container runs on it:
//! the runtime holds a [`PinnedImage`] (from [`OciImages::pin`]) for a container's whole life,
//! and [`ImageStore::remove_image`] refuses a pinned image with [`EngineError::Conflict`], as
//! Docker refuses an image a container uses.
//!
//! How a runtime uses it:
//!
//! ```text
//! let images = OciImages::open_with_local_docker(OciImagesSettings::new(data_dir.join("oci/images"))).await?;
//! images.ensure_image(&spec.image, auth, progress).await?;     // the runner, as on Docker
//! let pinned = images.pin(&spec.image)                          // create: pinned atomically
//!     .ok_or_else(|| EngineError::ImageNotFound { image: spec.image.clone() })?;
//! // lowerdir = pinned.layers reversed, joined by ':' (overlayfs names the top layer first);
//! // the run config (env, entrypoint, cmd, working dir, user) is `pinned.config`.
//! // Keep `pinned` with the container's record; drop it when the container is removed.
//! ```
//!
//! Pins live in memory: after a restart, the runtime removes its earlier life's containers
//! before anything removes images, as the runner's start-up reaper does.

mod docker_import;
mod index;
mod registry;
mod registry_pull;
mod unpack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::broadcast;

use self::index::{ImageRecord, ImageSource, Index, LayerRecord, RunConfigRecord, local_io};
use self::registry::RegistrySession;
use self::unpack::UnpackError;
use crate::engine::{
    ImageEntry, ImagePresence, ImageStore, LocalImage, PullProgress, PullProgressSender,
    RegistryAuth,
};
use crate::error::{EngineError, Subject};
use crate::oci::{UnpackedImage, UnpackedImages};
use crate::pull::{PullCoalescer, normalize_reference, pull_key};

/// Layers of one image fetched from a registry at once.
const PARALLEL_LAYER_DOWNLOADS: usize = 3;
/// A transfer that delivers nothing for this long has stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Chunks of a streamed layer in flight between the network and the unpacking thread.
const STREAM_CHUNKS: usize = 16;
/// Download progress is reported at most once per this many bytes of a layer.
const PROGRESS_STEP: u64 = 1 << 20;

/// Where the store lives and what it accepts.
#[derive(Debug, Clone)]
pub struct OciImagesSettings {
    /// The store's directory (`<data_dir>/oci/images`). It must be on a file system that
    /// holds device nodes and `trusted.*` attributes (ext4, xfs; not overlayfs), and the
    /// process must be root, as an OCI runtime is.
    pub root: PathBuf,
    /// The most one image may weigh, its layers' download sizes added up: a larger image is
    /// refused ([`EngineError::Refused`]) before its layers are fetched. `None`: no limit.
    pub max_image_bytes: Option<u64>,
    /// The longest one pull or import may take before it fails as the infrastructure's
    /// ([`EngineError::PullFailed`]); a runner's own, shorter deadline drops its wait first.
    pub pull_timeout: Duration,
    /// Registries (`host:port`) that may be reached over plain HTTP, as Docker's
    /// `insecure-registries`: HTTPS is tried first, and plain HTTP when the registry does not
    /// speak TLS. Loopback registries always may; every other registry is HTTPS only.
    pub insecure_registries: Vec<String>,
    /// A PEM file of CA certificates trusted for registries' HTTPS besides the system's
    /// roots: the authority of private registries with certificates of their own. Read when
    /// the store opens; a file that cannot be read or holds no certificate fails the open.
    pub extra_ca_file: Option<PathBuf>,
}

/// The image store (see the module's documentation). Cheap to clone: clones share the store.
#[derive(Clone)]
pub struct OciImages {
    inner: Arc<Inner>,
}

/// An image held unpacked for a container's life: while any [`PinnedImage`] of it lives, the
/// image cannot be removed and its layers stay. Dropping it lets go.
#[derive(Debug)]
pub struct PinnedImage {
    image: UnpackedImage,
    inner: Arc<Inner>,
}

struct Inner {
    settings: OciImagesSettings,
    state: Mutex<State>,
    pulls: PullCoalescer,
    /// The local Docker engine images are imported from, when there is one.
    docker: Option<Docker>,
    http: reqwest::Client,
    /// One lock per layer being fetched from a registry, so concurrent pulls of images
    /// sharing it fetch it once.
    layer_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    temporaries: AtomicU64,
    /// Holds the store's `lock` (flock) for the process's life.
    _lock: std::fs::File,
}

/// What the store knows in memory; the index part is written to `index.json` on change.
struct State {
    index: Index,
    /// Pins per image id.
    pins: HashMap<String, usize>,
    /// Layers an import or pull under way needs, which a removal must leave alone although
    /// no image in the index names them yet.
    busy: HashMap<String, usize>,
}

/// Marks layers busy while an import or pull uses them.
struct BusyLayers {
    inner: Arc<Inner>,
    layers: Vec<String>,
}

/// An image config's parts the store keeps.
#[derive(Deserialize)]
struct ImageConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// A parsed image config.
struct ImageConfig {
    diff_ids: Vec<String>,
    run: RunConfigRecord,
    labels: BTreeMap<String, String>,
}

/// A blocking reader of the chunks an async task forwards (a Docker export, a registry
/// blob): the bridge from a stream to `tar`, which reads synchronously.
struct ChannelReader {
    chunks: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

// === impl OciImagesSettings ===

impl OciImagesSettings {
    /// A store at `root`, without a size limit, pulls bounded by 10 minutes.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        OciImagesSettings {
            root: root.into(),
            max_image_bytes: None,
            pull_timeout: Duration::from_secs(600),
            insecure_registries: Vec::new(),
            extra_ca_file: None,
        }
    }
}

// === impl OciImages ===

impl OciImages {
    /// Opens (or makes) the store at `settings.root`, with registries as its only source
    /// (a machine without Docker). Takes the store's lock (a second process opening the same
    /// root is refused with [`EngineError::Conflict`]), empties `tmp/` of a crashed run's
    /// leftovers, removes layers no image names and forgets images whose layers are gone.
    pub async fn open(settings: OciImagesSettings) -> Result<OciImages, EngineError> {
        Self::open_with(settings, None).await
    }

    /// [`Self::open`] with the local Docker engine as the first source, connected the way
    /// the `docker` CLI does (`DOCKER_HOST`, or the local socket) with its API version
    /// negotiated: an image the engine has is imported from it, any other pulled from its
    /// registry.
    pub async fn open_with_local_docker(
        settings: OciImagesSettings,
    ) -> Result<OciImages, EngineError> {
        let docker = Docker::connect_with_defaults()
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?
            .negotiate_version()
            .await
            .map_err(|error| EngineError::from_bollard(error, Subject::Engine))?;
        Self::open_with(settings, Some(docker)).await
    }

    async fn open_with(
        settings: OciImagesSettings,
        docker: Option<Docker>,
    ) -> Result<OciImages, EngineError> {
        let extra_roots = match settings.extra_ca_file.clone() {
            Some(path) => blocking(move || registry::extra_roots(&path)).await??,
            None => Vec::new(),
        };
        let http = registry::http_client(STALL_TIMEOUT, extra_roots)?;
        let opened = blocking(move || open_blocking(settings, docker, http)).await??;
        Ok(OciImages {
            inner: Arc::new(opened),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.settings.root
    }

    /// The image `image` (a reference or an id) unpacked, pinned until the returned value is
    /// dropped: what the runtime holds from a container's create to its removal, so the
    /// layers under its overlay stay. `None` when the image is not in the store.
    pub fn pin(&self, image: &str) -> Option<PinnedImage> {
        let mut state = self.inner.state();
        let unpacked = self.inner.unpacked_of(&state.index, image)?;
        *state.pins.entry(unpacked.id.clone()).or_default() += 1;
        Some(PinnedImage {
            image: unpacked,
            inner: Arc::clone(&self.inner),
        })
    }

    /// The bytes the store's layers hold on disk (each layer once, as it is stored).
    pub fn disk_bytes(&self) -> u64 {
        self.inner
            .state()
            .index
            .layers
            .values()
            .map(|layer| layer.bytes)
            .sum()
    }
}

#[async_trait]
impl UnpackedImages for OciImages {
    async fn unpacked(&self, reference: &str) -> Result<Option<UnpackedImage>, EngineError> {
        let state = self.inner.state();
        Ok(self.inner.unpacked_of(&state.index, reference))
    }

    fn pin(&self, reference: &str) -> Option<(UnpackedImage, crate::oci::ImagePin)> {
        let pinned = OciImages::pin(self, reference)?;
        Some((pinned.image().clone(), Box::new(pinned)))
    }
}

#[async_trait]
impl ImageStore for OciImages {
    async fn local_image(&self, image: &str) -> Result<Option<LocalImage>, EngineError> {
        let state = self.inner.state();
        Ok(find(&state.index, image).map(|record| LocalImage {
            id: record.id.clone(),
            repo_digests: record.repo_digests.clone(),
            labels: record.labels.clone(),
            size_bytes: Some(record.size_bytes),
        }))
    }

    async fn list_images(&self) -> Result<Vec<ImageEntry>, EngineError> {
        let state = self.inner.state();
        Ok(state
            .index
            .images
            .values()
            .map(|record| ImageEntry {
                id: record.id.clone(),
                references: record.references.clone(),
                size_bytes: record.size_bytes,
            })
            .collect())
    }

    async fn remove_image(&self, image: &str) -> Result<(), EngineError> {
        let inner = Arc::clone(&self.inner);
        let image = image.to_owned();
        let removed = blocking(move || inner.remove_blocking(&image)).await??;
        if !removed.is_empty() {
            let inner = Arc::clone(&self.inner);
            blocking(move || inner.delete_layers(&removed)).await?;
        }
        Ok(())
    }

    async fn check_registry_access(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
    ) -> Result<(), EngineError> {
        let reference = normalize_reference(image);
        let session = self.inner.session(&reference, registry_auth)?;
        session.check().await
    }

    async fn ensure_image(
        &self,
        image: &str,
        registry_auth: Option<RegistryAuth>,
        progress: Option<PullProgressSender>,
    ) -> Result<ImagePresence, EngineError> {
        let reference = if image.starts_with("sha256:") {
            image.to_owned()
        } else {
            normalize_reference(image)
        };
        if self.inner.present_and_current(&reference).await? {
            return Ok(ImagePresence::AlreadyPresent);
        }
        let key = pull_key(&reference, registry_auth.as_ref());
        let inner = Arc::clone(&self.inner);
        let brought = reference.clone();
        self.inner
            .pulls
            .pull(&key, &reference, progress, move |events| async move {
                let deadline = inner.settings.pull_timeout;
                match tokio::time::timeout(deadline, inner.bring(&brought, registry_auth, events))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(EngineError::PullFailed {
                        image: brought.clone(),
                        message: format!("not brought within {} s", deadline.as_secs()),
                    }),
                }
            })
            .await?;
        Ok(ImagePresence::Pulled)
    }
}

// === impl PinnedImage ===

impl PinnedImage {
    /// The pinned image.
    pub fn image(&self) -> &UnpackedImage {
        &self.image
    }
}

impl std::ops::Deref for PinnedImage {
    type Target = UnpackedImage;

    fn deref(&self) -> &UnpackedImage {
        &self.image
    }
}

impl Drop for PinnedImage {
    fn drop(&mut self) {
        let mut state = self.inner.state();
        if let Some(count) = state.pins.get_mut(&self.image.id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.pins.remove(&self.image.id);
            }
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciImages")
            .field("root", &self.settings.root)
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn layer_dir(&self, diff_id: &str) -> PathBuf {
        layer_dir(&self.settings.root, diff_id)
    }

    /// A fresh directory name under `tmp/`.
    fn temporary(&self) -> PathBuf {
        let n = self.temporaries.fetch_add(1, Ordering::Relaxed);
        self.settings
            .root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    fn unpacked_of(&self, index: &Index, image: &str) -> Option<UnpackedImage> {
        let record = find(index, image)?;
        Some(UnpackedImage {
            id: record.id.clone(),
            layers: record
                .layers
                .iter()
                .map(|layer| self.layer_dir(layer))
                .collect(),
            config: (&record.config).into(),
        })
    }

    fn session(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<RegistrySession<'_>, EngineError> {
        let insecure = &self.settings.insecure_registries;
        RegistrySession::new(&self.http, reference, auth, &|host| {
            insecure.iter().any(|registry| registry == host)
        })
    }

    /// Whether `reference` is in the store and, for an image imported from the local Docker
    /// engine, still the engine's image of that name (a rebuilt tag is imported again).
    async fn present_and_current(&self, reference: &str) -> Result<bool, EngineError> {
        let (id, source) = {
            let state = self.state();
            match find(&state.index, reference) {
                Some(record) => (record.id.clone(), record.source),
                None => return Ok(false),
            }
        };
        let (ImageSource::Docker, Some(docker)) = (source, &self.docker) else {
            return Ok(true);
        };
        if reference.starts_with("sha256:") {
            return Ok(true);
        }
        match docker.inspect_image(reference).await {
            Ok(inspected) => Ok(inspected.id.as_deref() == Some(id.as_str())),
            // The engine's copy is gone (or the engine is): the store's stays usable.
            Err(_) => Ok(true),
        }
    }

    /// Brings `reference` into the store: from the local Docker engine when it has it, from
    /// its registry otherwise.
    async fn bring(
        self: &Arc<Self>,
        reference: &str,
        auth: Option<RegistryAuth>,
        events: broadcast::Sender<PullProgress>,
    ) -> Result<(), EngineError> {
        if let Some(docker) = &self.docker {
            match docker.inspect_image(reference).await {
                Ok(inspected) => {
                    return docker_import::import(self, docker, reference, inspected, &events)
                        .await;
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(error) => return Err(EngineError::from_bollard(error, Subject::Engine)),
            }
        }
        if reference.starts_with("sha256:") {
            return Err(EngineError::ImageNotFound {
                image: reference.to_owned(),
            });
        }
        self.pull(reference, auth, &events).await
    }

    /// Moves a checked layer from `temporary` into place; when a concurrent import put the
    /// same layer there first, that one stays.
    fn commit_layer(
        &self,
        temporary: &Path,
        diff_id: &str,
        layer: LayerRecord,
    ) -> Result<(), EngineError> {
        let target = self.layer_dir(diff_id);
        match std::fs::rename(temporary, &target) {
            Ok(()) => {}
            Err(_) if target.is_dir() => remove_quietly(temporary),
            Err(error) => return Err(local_io(&target, &error)),
        }
        self.state()
            .index
            .layers
            .entry(diff_id.to_owned())
            .or_insert(layer);
        Ok(())
    }

    /// Refuses an image whose layers weigh more than the store accepts.
    fn within_limit(&self, reference: &str, bytes: u64) -> Result<(), EngineError> {
        match self.settings.max_image_bytes {
            Some(max) if bytes > max => Err(EngineError::Refused {
                message: format!(
                    "the image {reference} is larger than this store accepts ({max} bytes): \
                     its layers weigh {bytes} bytes"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// When the store has the image `id` already (another reference of it), names it
    /// `reference` too and says so.
    async fn tag_existing(
        self: &Arc<Self>,
        id: &str,
        reference: &str,
        repo_digest: Option<&str>,
    ) -> Result<bool, EngineError> {
        let inner = Arc::clone(self);
        let (id, reference) = (id.to_owned(), reference.to_owned());
        let repo_digest = repo_digest.map(str::to_owned);
        blocking(move || {
            let mut state = inner.state();
            let Some(record) = state.index.images.get_mut(&id) else {
                return Ok(false);
            };
            if let Some(repo_digest) = repo_digest
                && !record.repo_digests.contains(&repo_digest)
            {
                record.repo_digests.push(repo_digest);
            }
            inner.name_and_save(state, &reference, &id)?;
            Ok(true)
        })
        .await?
    }

    /// Records an image whose layers are all in place, under `reference`.
    async fn record(
        self: &Arc<Self>,
        mut record: ImageRecord,
        reference: &str,
    ) -> Result<(), EngineError> {
        let inner = Arc::clone(self);
        let reference = reference.to_owned();
        blocking(move || {
            // The layers' files reach the disk before the index names them: after a power
            // loss the index never names a layer whose files were lost.
            let root = &inner.settings.root;
            std::fs::File::open(root)
                .and_then(|directory| Ok(rustix::fs::syncfs(&directory)?))
                .map_err(|error| local_io(root, &error))?;
            let mut state = inner.state();
            record.size_bytes = record
                .layers
                .iter()
                .filter_map(|layer| state.index.layers.get(layer).map(|layer| layer.bytes))
                .sum();
            let id = record.id.clone();
            match state.index.images.get_mut(&id) {
                Some(existing) => {
                    for digest in record.repo_digests {
                        if !existing.repo_digests.contains(&digest) {
                            existing.repo_digests.push(digest);
                        }
                    }
                }
                None => {
                    record.references.clear();
                    state.index.images.insert(id.clone(), record);
                }
            }
            inner.name_and_save(state, &reference, &id)
        })
        .await?
    }

    /// Names `id` by `reference` and saves the index; the images the reference left without
    /// a name are forgotten, and their layers no other image names deleted.
    fn name_and_save(
        &self,
        mut state: MutexGuard<'_, State>,
        reference: &str,
        id: &str,
    ) -> Result<(), EngineError> {
        let orphans = state.index.retag(reference, id);
        let removed = forget_orphans(&mut state, &orphans);
        state.index.save(&self.settings.root)?;
        drop(state);
        self.delete_layers(&removed);
        Ok(())
    }

    /// Removes `image`'s reference, and the image with its unshared layers' records when it
    /// was the last; returns the layers to delete from disk.
    fn remove_blocking(&self, image: &str) -> Result<Vec<String>, EngineError> {
        let mut state = self.state();
        let reference = if image.starts_with("sha256:") {
            image.to_owned()
        } else {
            normalize_reference(image)
        };
        let Some(record) = find(&state.index, &reference).cloned() else {
            return Err(EngineError::ImageNotFound {
                image: image.to_owned(),
            });
        };
        let by_reference = record.references.contains(&reference);
        if by_reference && record.references.len() > 1 {
            if let Some(record) = state.index.images.get_mut(&record.id) {
                record.references.retain(|name| *name != reference);
            }
            state.index.save(&self.settings.root)?;
            return Ok(Vec::new());
        }
        if !by_reference && record.references.len() > 1 {
            return Err(EngineError::Conflict {
                message: format!(
                    "the image {} has several references ({}); remove them one by one",
                    record.id,
                    record.references.join(", ")
                ),
            });
        }
        if state.pins.get(&record.id).is_some_and(|pins| *pins > 0) {
            return Err(EngineError::Conflict {
                message: format!("the image {image} is used by a container"),
            });
        }
        state.index.images.remove(&record.id);
        let removed = unused_layers(&mut state, &record.layers);
        state.index.save(&self.settings.root)?;
        tracing::info!(image, id = %record.id, layers = removed.len(), "image removed from the OCI store");
        Ok(removed)
    }

    /// Deletes layer directories (already out of the index): each is moved into `tmp/`
    /// first, so a crash mid-way leaves no half layer in `layers/`.
    fn delete_layers(&self, layers: &[String]) {
        for layer in layers {
            let doomed = self.temporary();
            match std::fs::rename(self.layer_dir(layer), &doomed) {
                Ok(()) => remove_quietly(&doomed),
                Err(error) => tracing::warn!(layer, %error, "an unused layer could not be removed"),
            }
        }
    }
}

// === impl BusyLayers ===

impl BusyLayers {
    fn mark(inner: &Arc<Inner>, layers: &[String]) -> BusyLayers {
        let mut state = inner.state();
        for layer in layers {
            *state.busy.entry(layer.clone()).or_default() += 1;
        }
        BusyLayers {
            inner: Arc::clone(inner),
            layers: layers.to_vec(),
        }
    }
}

impl Drop for BusyLayers {
    fn drop(&mut self) {
        let mut state = self.inner.state();
        for layer in &self.layers {
            if let Some(count) = state.busy.get_mut(layer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    state.busy.remove(layer);
                }
            }
        }
    }
}

// === impl ImageConfig ===

impl ImageConfig {
    fn parse(bytes: &[u8]) -> Result<ImageConfig, String> {
        let file: ImageConfigFile = serde_json::from_slice(bytes)
            .map_err(|error| format!("the image config cannot be read: {error}"))?;
        let config = file.config.unwrap_or_default();
        let non_empty = |text: Option<String>| text.filter(|text| !text.is_empty());
        Ok(ImageConfig {
            diff_ids: file.rootfs.diff_ids,
            run: RunConfigRecord {
                env: config.env.unwrap_or_default(),
                entrypoint: config.entrypoint,
                cmd: config.cmd,
                working_dir: non_empty(config.working_dir),
                user: non_empty(config.user),
            },
            labels: config.labels.unwrap_or_default(),
        })
    }
}

// === impl ChannelReader ===

impl ChannelReader {
    fn new(chunks: tokio::sync::mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            chunks,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(error)) => return Err(error),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Opens the store: the lock, the directories, the index, and the sweep of leftovers.
fn open_blocking(
    settings: OciImagesSettings,
    docker: Option<Docker>,
    http: reqwest::Client,
) -> Result<Inner, EngineError> {
    let root = settings.root.clone();
    for directory in [root.join("layers/sha256"), root.join("tmp")] {
        std::fs::create_dir_all(&directory).map_err(|error| local_io(&directory, &error))?;
    }
    let lock_path = root.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|error| local_io(&lock_path, &error))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| EngineError::Conflict {
            message: format!("another process uses the image store at {}", root.display()),
        },
    )?;
    let tmp = root.join("tmp");
    for leftover in std::fs::read_dir(&tmp).map_err(|error| local_io(&tmp, &error))? {
        let leftover = leftover.map_err(|error| local_io(&tmp, &error))?;
        remove_quietly(&leftover.path());
    }

    let mut index = Index::load(&root)?;
    let layers_dir = root.join("layers/sha256");
    let mut on_disk = HashSet::new();
    for layer in std::fs::read_dir(&layers_dir).map_err(|error| local_io(&layers_dir, &error))? {
        let layer = layer.map_err(|error| local_io(&layers_dir, &error))?;
        on_disk.insert(format!("sha256:{}", layer.file_name().to_string_lossy()));
    }
    let broken: Vec<String> = index
        .images
        .values()
        .filter(|record| record.layers.iter().any(|layer| !on_disk.contains(layer)))
        .map(|record| record.id.clone())
        .collect();
    for id in &broken {
        tracing::warn!(%id, "an image whose layers are gone is forgotten");
        index.images.remove(id);
    }
    let named: HashSet<String> = index
        .images
        .values()
        .flat_map(|record| record.layers.iter().cloned())
        .collect();
    index.layers.retain(|layer, _| named.contains(layer));
    index.save(&root)?;
    let inner = Inner {
        settings,
        state: Mutex::new(State {
            index,
            pins: HashMap::new(),
            busy: HashMap::new(),
        }),
        pulls: PullCoalescer::default(),
        docker,
        http,
        layer_locks: Mutex::default(),
        temporaries: AtomicU64::new(0),
        _lock: lock,
    };
    let unnamed: Vec<String> = on_disk.difference(&named).cloned().collect();
    inner.delete_layers(&unnamed);
    Ok(inner)
}

/// The record `image` names: an id, or a reference (normalized: no tag means `latest`).
fn find<'a>(index: &'a Index, image: &str) -> Option<&'a ImageRecord> {
    index.find(image).or_else(|| {
        let normalized = normalize_reference(image);
        (normalized != image)
            .then(|| index.find(&normalized))
            .flatten()
    })
}

/// Forgets the images a retag left without references (unless a container uses them: those
/// stay, without references, until removed by id); returns the layers no image names any
/// more.
fn forget_orphans(state: &mut State, orphans: &[String]) -> Vec<String> {
    let mut layers = Vec::new();
    for id in orphans {
        if state.pins.get(id).is_some_and(|pins| *pins > 0) {
            continue;
        }
        if let Some(record) = state.index.images.remove(id) {
            layers.extend(record.layers);
        }
    }
    unused_layers(state, &layers)
}

/// Of `layers`, those no image names and no import under way needs, taken out of the index.
fn unused_layers(state: &mut State, layers: &[String]) -> Vec<String> {
    let mut unused = Vec::new();
    for layer in layers {
        if state.index.layer_users(layer) == 0
            && !state.busy.contains_key(layer)
            && !unused.contains(layer)
        {
            state.index.layers.remove(layer);
            unused.push(layer.clone());
        }
    }
    unused
}

fn layer_dir(root: &Path, diff_id: &str) -> PathBuf {
    root.join("layers/sha256")
        .join(diff_id.strip_prefix("sha256:").unwrap_or(diff_id))
}

/// The layer's stream uncompressed: gzip and plain tars are told apart by their first bytes
/// (whatever the media type claims); zstd is refused.
fn decompressed<'a>(reader: &'a mut dyn Read) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0_u8; 4];
    let mut filled = 0;
    while filled < magic.len() {
        let read = reader.read(&mut magic[filled..])?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    let head = io::Cursor::new(magic[..filled].to_vec());
    let whole = head.chain(reader);
    match magic {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::MultiGzDecoder::new(whole))),
        [0x28, 0xb5, 0x2f, 0xfd] => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "zstd-compressed layers are not supported by this store",
        )),
        _ => Ok(Box::new(whole)),
    }
}

fn layer_event(
    layer: &str,
    status: &str,
    current: Option<u64>,
    total: Option<u64>,
) -> PullProgress {
    PullProgress::Layer {
        layer: layer.to_owned(),
        status: status.to_owned(),
        current,
        total,
    }
}

/// The first 12 hex digits, as Docker shows a layer.
fn short_digest(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}

fn pulled_badly(image: &str, error: &io::Error) -> EngineError {
    if error.kind() == io::ErrorKind::Unsupported {
        return EngineError::Refused {
            message: format!("the image {image} cannot be unpacked here: {error}"),
        };
    }
    EngineError::PullFailed {
        image: image.to_owned(),
        message: format!("a layer could not be read: {error}"),
    }
}

/// A layer that cannot be unpacked: the image's fault when the archive is bad, the
/// machine's when writing failed.
fn unpack_failure(error: UnpackError, diff_id: &str) -> EngineError {
    match error {
        UnpackError::Invalid(reason) => EngineError::Refused {
            message: format!("the layer {diff_id} is refused: {reason}"),
        },
        UnpackError::Io { path, error } => local_io(&path, &error),
    }
}

fn remove_quietly(path: &Path) {
    if let Err(error) = std::fs::remove_dir_all(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "a temporary directory could not be removed");
    }
}

/// Runs blocking file work off the async executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| EngineError::protocol(format!("the image store's work failed: {error}")))
}
