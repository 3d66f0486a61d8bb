//! A direct OCI runtime beside Docker (`serve --engine oci`): task containers run by an OCI
//! runtime binary (`crun`, or `runc`) from bundles of stevedore's own, on images unpacked once
//! into a content-addressed local store, each task on a fresh overlay, in a cgroup and network
//! namespace of its own.
//!
//! The parts meet at the values below: the image store hands the runtime an
//! [`UnpackedImage`] (through [`UnpackedImages`]), the network pool a [`TaskNetns`] (through
//! [`NetnsSource`]).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::EngineError;

mod bundle;
mod cgroup;
mod engine;
mod images;
pub(crate) mod netns;
pub(crate) mod rootfs;
mod runtime;

pub use engine::{OciEngine, OciEngineSettings};
pub use images::{OciImages, OciImagesSettings, PinnedImage};
pub use netns::{DEFAULT_TASK_BRIDGE, DEFAULT_TASK_SUBNET, NetnsPool, NetnsPoolSettings};
pub use runtime::{OciRuntime, OciRuntimeKind, OciSettings};

/// An image unpacked in the local layer store, ready to be the lower layers of a task's
/// overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackedImage {
    /// The image's id: the digest of its config, `sha256:<hex>` (what Docker calls its id).
    pub id: String,
    /// The unpacked layer directories, the base layer first. Whiteouts are in overlayfs's
    /// form (a 0/0 character device; an opaque directory has `trusted.overlay.opaque=y`), so
    /// they serve as `lowerdir`s as they are.
    pub layers: Vec<PathBuf>,
    /// How the image runs a container unless the spec says otherwise.
    pub config: ImageRunConfig,
}

/// What an image's config says about running it (the OCI image config's `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRunConfig {
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Where a runtime finds the unpacked image a container runs from.
#[async_trait]
pub trait UnpackedImages: Send + Sync + 'static {
    /// The image `reference` (a name with tag or digest, or an id) as unpacked here; `None`
    /// when it is not (the runner's `ensure_image` brings it first).
    async fn unpacked(&self, reference: &str) -> Result<Option<UnpackedImage>, EngineError>;

    /// The image `reference` unpacked and held for a container's life: its layers stay until
    /// the returned guard is dropped (the store refuses to remove it meanwhile). `None` when
    /// the store holds nothing for a container, as a fixed test image does; the runtime then
    /// asks [`UnpackedImages::unpacked`].
    fn pin(&self, _reference: &str) -> Option<(UnpackedImage, ImagePin)> {
        None
    }
}

/// What keeps an image's layers while a container runs on them: dropped at its removal.
pub type ImagePin = Box<dyn std::any::Any + Send + Sync>;

/// A network namespace prepared ahead of time for one task, with the same isolation rules as
/// the Docker path's task network (no host, no link-local, no other tasks, the operator's
/// blocked ranges and allowed destinations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskNetns {
    /// The namespace's bind mount (`/run/netns/<name>` or the pool's own directory), what an
    /// OCI config's `linux.namespaces` network `path` names.
    pub path: PathBuf,
    /// The task's address inside it.
    pub address: Ipv4Addr,
    /// Its default gateway, on the host side.
    pub gateway: Ipv4Addr,
    /// What the task's `/etc/resolv.conf` names.
    pub nameservers: Vec<Ipv4Addr>,
}

/// The pool a runtime takes a task's network namespace from.
#[async_trait]
pub trait NetnsSource: Send + Sync + 'static {
    /// A fresh namespace for a task on `network` (the runner's managed network name), at once
    /// when the pool has one ready.
    async fn take(&self, network: &str) -> Result<TaskNetns, EngineError>;
    /// The namespace of a task that ended: reset (or replaced) before another task gets it.
    async fn give_back(&self, netns: TaskNetns);
}
