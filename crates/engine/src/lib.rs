//! stevedore's container engine: three seams and their Docker implementation, [`DockerEngine`].
//! This is the only crate that knows Docker (and bollard); everything above it talks to the
//! traits:
//!
//! * [`ContainerRuntime`]: what a runner drives (capabilities, create with files, start, logs,
//!   wait, kill, stats, remove, list its own containers, its task network and its isolation);
//! * [`ImageStore`]: the images the runtime runs from (presence, pulls, registry checks,
//!   listing and removing them);
//! * [`ImageBuilder`]: building, importing and pushing images, for the CLI alone.
//!
//! A runner holds `Arc<dyn ContainerEngine>`, which is [`ContainerRuntime`] + [`ImageStore`].
//!
//! What this crate owns:
//!
//! * **Connecting** to the engine the way the `docker` CLI does (`DOCKER_HOST` or the local
//!   socket) and negotiating the API version down to what the engine speaks.
//! * **Capabilities**: which limits the engine can enforce ([`EngineCapabilities`]), and
//!   [`check_required`], which refuses an engine that would silently ignore a limit.
//! * **Images**: [`ImageStore::ensure_image`] pulls what is missing, one pull per image
//!   however many tasks wait for it, with observable progress; [`build_local_busybox_image`]
//!   imports `stevedore/busybox:local` from the host's static busybox for machines that reach
//!   no registry; [`build_debian_base`] and [`build_debian_stack`] build the other local stack
//!   images from Debian's archive (mmdebstrap, then `apt-get` in a generated Dockerfile),
//!   reusing an image whose recorded recipe is unchanged; [`ImageBuilder::build_image`]
//!   builds an image from a Dockerfile and a context directory, honouring its `.dockerignore`,
//!   with structured progress; [`ImageBuilder::push_image`] pushes one;
//!   [`ImageStore::check_registry_access`] asks an image's registry, through the engine's
//!   distribution endpoint, whether given credentials (or none) may pull it, classified by
//!   status alone; pulls are shared only between callers with the same credentials.
//! * **Containers**: create from a [`ContainerSpec`] with limits, dropped capabilities and
//!   `no-new-privileges`, with files and a code's zip package ([`ZipPackage`], unpacked under
//!   [`TASK_DIR`] entry by entry, never held whole) uploaded through the archive API as one
//!   streamed archive (never bind mounts);
//!   start, logs (stdout and stderr apart), wait (exit code, `OOMKilled`, times), kill, stats,
//!   remove (timed), and listing by label for the start-up reaper. The engine keeps no copy
//!   of a container's output (the `none` log driver): [`ContainerRuntime::attach`], made
//!   before the start, is its only reader, and holds a fast writer back instead of losing
//!   output.
//! * **CPU groups**: [`ContainerRuntime::ensure_cpu_group`] caps the CPU of all task
//!   containers together, so the API and store beside them keep a reserve (Docker: a cgroup
//!   of stevedore's own as the containers' `CgroupParent`, `cpu_group`).
//! * **Task networks**: [`ContainerRuntime::ensure_network`] makes sure of a network whose
//!   containers cannot talk to each other, on a bridge of a fixed name, without IPv6;
//!   [`ContainerRuntime::isolate_network`] holds its containers to an [`EgressPolicy`] (no
//!   host, no other container, no blocked range, except allowed destinations). On Docker that
//!   is the host firewall (`firewall`: iptables chains of stevedore's own, rebuilt atomically),
//!   refused as [`EngineError::LimitUnenforceable`] when it cannot be set up.
//! * **Errors**: one [`EngineError`], in the runtime's terms (unreachable, timeout, failed,
//!   container or image not found, refused, conflict, limit unenforceable, ...) with no
//!   transport detail in its variants; the Docker implementation decides them from the
//!   engine's structured answers (HTTP status, transport failure, timeout), never from message
//!   text. [`EngineError::is_infrastructure`] tells the runner whose failure it was.
//!
//! What it does not own: tasks, retries, timeouts (the runner counts a task's timeout and
//! calls [`ContainerRuntime::kill`]), and when to remove (the runner removes in the background).
//!
//! [`fake::FakeEngine`] (cargo feature `fake`) is an in-memory engine for other crates' fast
//! tests. [`conformance`] (cargo feature `test-support`) is the suite every
//! [`ContainerRuntime`] must pass: `tests/docker.rs` runs it against the real Docker engine,
//! the fake's unit tests against the fake; the other integration tests in `tests/docker.rs`
//! cover what is Docker's own (image builds, pulls, registries, limits).

#![forbid(unsafe_code)]

mod archive;
mod build;
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
mod context;
mod cpu_group;
mod direct_files;
mod docker;
mod engine;
mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod firewall;
mod local_image;
mod local_stacks;
mod network;
mod network_holders;
pub mod oci;
mod package;
mod pull;
mod spec;
mod usage_group;

pub use build::{
    BuildProgress, BuildRequest, BuiltImage, DEFAULT_DOCKERFILE, DEFAULT_MAX_BUILD_CONTEXT_BYTES,
};
pub use docker::{DockerEngine, EngineRequest, RequestObserver};
pub use engine::{
    ContainerEngine, ContainerRuntime, EngineCapabilities, ExitStatus, ImageBuilder, ImageEntry,
    ImagePresence, ImageStore, ListedContainer, LocalImage, LogChunk, LogChunkStream, OutputStream,
    PullProgress, PullProgressSender, RegistryAuth, Requirements, ResourceSample,
    ResourceSampleStream, ResourceUsage, Timestamp, check_required,
};
pub use error::EngineError;
pub use local_image::{
    HOST_BUSYBOX, LOCAL_BUSYBOX_IMAGE, build_local_busybox_image, busybox_rootfs_tar,
};
pub use local_stacks::{
    BuildOutcome, DEBIAN_MIRROR, RECIPE_LABEL, build_debian_base, build_debian_stack,
    stack_dockerfile,
};
pub use network::{
    DEFAULT_BLOCKED_RANGES, Destination, EgressPolicy, Ipv4Net, MAX_BRIDGE_NAME_LEN, NETWORK_LABEL,
    NetworkInfo, NetworkSpec, parse_ipv4_net,
};
pub use network_holders::LABEL_NETWORK_HOLDER;
pub use package::ZipPackage;
pub use spec::{
    ContainerId, ContainerSpec, DEFAULT_CAPABILITIES, DirectoryToCreate, FileToUpload,
    KEPT_OUTPUT_BYTES, LABEL_LEDGER, LABEL_PROJECT, LABEL_RUNNER, LABEL_TASK, TASK_DIR,
};
