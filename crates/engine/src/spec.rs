//! What a caller asks the engine to create: [`ContainerSpec`] and the files that go into the
//! container before it starts.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::EngineError;
use crate::package::ZipPackage;

/// The working directory every task container gets, writable by whatever user the image runs
/// as (IronWorker's `TASK_DIR`).
pub const TASK_DIR: &str = "/mnt/task";

/// The most output a runtime keeps of a task container, beside what the runner reads as it
/// comes (`ContainerRuntime::kept_output`): enough to ship what a runner had not read when
/// its engine went away, bounded so that a task printing without end fills no disk.
pub const KEPT_OUTPUT_BYTES: u64 = 8 << 20;

/// The capabilities a task keeps after `cap_drop: ALL`: enough for ordinary programs that
/// change file ownership, switch users or bind a low port inside their own container, and
/// nothing that reaches the host (no `NET_RAW`, `SYS_ADMIN`, `MKNOD`, `SYS_CHROOT`...).
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "KILL",
    "NET_BIND_SERVICE",
];

/// The label that names a container's task. Everything the engine makes for a task and keeps
/// beyond it (a network holder) carries the task's other labels, never this one.
pub const LABEL_TASK: &str = "stevedore.task";
/// The label that names the project a task container runs for: a network holder carries it
/// too, so that a holder serves the tasks of one project only.
pub const LABEL_PROJECT: &str = "stevedore.project";
/// The label that names the runner that created a container; start-up reaps by it.
pub const LABEL_RUNNER: &str = "stevedore.runner";
/// The label naming the lease ledger a container's lease is written in (its directory), so a
/// watchdog touches only the containers its own ledger accounts for.
pub const LABEL_LEDGER: &str = "stevedore.ledger";

/// The id the engine gave a container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(String);

/// Everything needed to create one task container.
///
/// The spec is independent of stevedore's task types: the runner translates a task into it.
/// Limits left at `None` are not set at all (the engine's defaults apply); the runner is the
/// one that applies stevedore's defaults (256 MiB and so on).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerSpec {
    /// The container's name; `None` lets the engine pick one.
    pub name: Option<String>,
    /// The image reference, e.g. `stevedore/busybox:local`. Must be present locally: see
    /// `ImageStore::ensure_image`.
    pub image: String,
    /// The command; `None` runs the image's own `CMD`.
    pub cmd: Option<Vec<String>>,
    /// Overrides the image's `ENTRYPOINT`; `None` keeps it, `Some(vec![])` clears it.
    pub entrypoint: Option<Vec<String>>,
    /// Environment variables, in order. Names must be non-empty and free of `=` and NUL.
    pub env: Vec<(String, String)>,
    /// The working directory; `None` keeps the image's.
    pub working_dir: Option<String>,
    /// The user to run as (`uid`, `uid:gid` or a name); `None` keeps the image's.
    pub user: Option<String>,
    /// Labels, e.g. `stevedore.task` and `stevedore.runner`, used to find leftovers later.
    pub labels: BTreeMap<String, String>,
    /// The memory limit in bytes. Memory and memory+swap are both set to it, so a task can
    /// never swap past its limit.
    pub memory_bytes: Option<u64>,
    /// The CPU limit in billionths of a CPU (`1_500_000_000` = 1.5 CPUs).
    pub nano_cpus: Option<u64>,
    /// The maximum number of processes/threads in the container; holds a fork bomb.
    pub pids_limit: Option<u64>,
    /// The CPU group whose cap this container shares with the others in it (made sure of
    /// with `ContainerRuntime::ensure_cpu_group` first); `None`: the runtime's default place.
    pub cpu_group: Option<String>,
    /// The network mode (`bridge`, `none`, `host`, a network name); `None` = the engine's
    /// default (bridge).
    pub network_mode: Option<String>,
    /// Capabilities added after dropping all; [`DEFAULT_CAPABILITIES`] when `None`.
    pub capabilities: Option<Vec<String>>,
    /// Directories to create before the container starts, with their modes.
    pub directories: Vec<DirectoryToCreate>,
    /// Files the container has when it starts.
    pub files: Vec<FileToUpload>,
    /// A zip package unpacked under [`TASK_DIR`] before the container starts, after the
    /// directories and files above. Its file must stay until `create` returned.
    pub package: Option<ZipPackage>,
}

/// One file a container has when it starts. The runtime puts it there without a host bind
/// mount, so it works with a remote runtime and with a runner that itself runs in a container
/// (Docker: an archive upload into the created container).
#[derive(Clone, PartialEq, Eq)]
pub struct FileToUpload {
    /// Absolute path inside the container. Missing parent directories are created (root,
    /// 0755) unless listed in [`ContainerSpec::directories`].
    pub path: String,
    /// The file's bytes.
    pub contents: Vec<u8>,
    /// Unix permission bits, e.g. `0o644` (readable by any user the image runs as).
    pub mode: u32,
}

/// One directory created in a container before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryToCreate {
    /// Absolute path inside the container.
    pub path: String,
    /// Unix permission bits; `0o777` makes it writable whatever user the image runs as.
    pub mode: u32,
}

// === impl ContainerId ===

impl ContainerId {
    /// Wraps an id the engine returned (or a container name, which the engine also accepts).
    pub fn new(id: impl Into<String>) -> Self {
        ContainerId(id.into())
    }

    /// The id as the engine knows it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for ContainerId {
    fn from(id: String) -> Self {
        ContainerId(id)
    }
}

// === impl ContainerSpec ===

impl ContainerSpec {
    /// A spec for `image` with nothing else set.
    pub fn new(image: impl Into<String>) -> Self {
        ContainerSpec {
            image: image.into(),
            ..ContainerSpec::default()
        }
    }

    /// The capabilities to add after dropping all of them.
    pub fn effective_capabilities(&self) -> Vec<String> {
        match &self.capabilities {
            Some(capabilities) => capabilities.clone(),
            None => DEFAULT_CAPABILITIES
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        }
    }

    /// The directories to create: the listed ones, plus [`TASK_DIR`] (mode 0777) when the
    /// spec does not list it, so every task container has a writable task directory, then
    /// those of the package.
    pub fn effective_directories(&self) -> Vec<DirectoryToCreate> {
        let mut directories = self.directories.clone();
        if !directories
            .iter()
            .any(|d| normalized(&d.path) == normalized(TASK_DIR))
        {
            directories.insert(
                0,
                DirectoryToCreate {
                    path: TASK_DIR.to_owned(),
                    mode: 0o777,
                },
            );
        }
        if let Some(package) = &self.package {
            directories.extend_from_slice(package.directories());
        }
        directories
    }

    /// The environment in the engine's `NAME=value` form.
    pub fn env_strings(&self) -> Vec<String> {
        self.env
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect()
    }

    /// Checks what the engine would otherwise reject late or misread: empty image, bad
    /// environment names, relative or escaping paths, modes beyond permission bits, limits
    /// that do not fit the engine's signed integers.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.image.trim().is_empty() {
            return Err(EngineError::invalid_spec("the image is empty"));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(EngineError::invalid_spec(format!(
                    "environment variable name {name:?} is empty or contains '=' or NUL"
                )));
            }
            if value.contains('\0') {
                return Err(EngineError::invalid_spec(format!(
                    "environment variable {name} contains NUL"
                )));
            }
        }
        for directory in &self.directories {
            check_container_path(&directory.path)?;
            check_mode(&directory.path, directory.mode)?;
        }
        for file in &self.files {
            check_container_path(&file.path)?;
            check_mode(&file.path, file.mode)?;
            if normalized(&file.path).is_empty() {
                return Err(EngineError::invalid_spec("a file cannot be uploaded to /"));
            }
        }
        if let Some(group) = &self.cpu_group {
            crate::cpu_group::check_name(group)?;
        }
        for (what, value) in [
            ("memory_bytes", self.memory_bytes),
            ("nano_cpus", self.nano_cpus),
            ("pids_limit", self.pids_limit),
        ] {
            if value.is_some_and(|v| i64::try_from(v).is_err() || v == 0) {
                return Err(EngineError::invalid_spec(format!(
                    "{what} must be between 1 and {}",
                    i64::MAX
                )));
            }
        }
        Ok(())
    }
}

// === impl FileToUpload ===

impl FileToUpload {
    /// A file readable by every user (mode 0644).
    pub fn readable(path: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        FileToUpload {
            path: path.into(),
            contents: contents.into(),
            mode: 0o644,
        }
    }
}

impl fmt::Debug for FileToUpload {
    // Payloads can be large and secret: show their size, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileToUpload")
            .field("path", &self.path)
            .field("len", &self.contents.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// The path relative to `/`, without empty or `.` components: the form archive entries use.
pub(crate) fn normalized(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn check_container_path(path: &str) -> Result<(), EngineError> {
    if !path.starts_with('/') {
        return Err(EngineError::invalid_spec(format!(
            "container path {path:?} is not absolute"
        )));
    }
    if path.contains('\0') || path.split('/').any(|c| c == "..") {
        return Err(EngineError::invalid_spec(format!(
            "container path {path:?} contains NUL or '..'"
        )));
    }
    Ok(())
}

fn check_mode(path: &str, mode: u32) -> Result<(), EngineError> {
    if mode > 0o7777 {
        return Err(EngineError::invalid_spec(format!(
            "mode {mode:o} of {path:?} is more than permission bits"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_dir_is_always_created_writable() {
        let spec = ContainerSpec::new("img");
        let directories = spec.effective_directories();
        assert_eq!(
            directories,
            vec![DirectoryToCreate {
                path: TASK_DIR.into(),
                mode: 0o777
            }]
        );
    }

    #[test]
    fn a_listed_task_dir_is_not_duplicated() {
        let mut spec = ContainerSpec::new("img");
        spec.directories.push(DirectoryToCreate {
            path: "/mnt/task/".into(),
            mode: 0o700,
        });
        assert_eq!(spec.effective_directories().len(), 1);
    }

    #[test]
    fn validation_refuses_relative_and_escaping_paths_and_bad_env() {
        let mut spec = ContainerSpec::new("img");
        spec.files.push(FileToUpload::readable("relative", "x"));
        assert!(spec.validate().is_err());

        spec.files = vec![FileToUpload::readable("/mnt/../etc/passwd", "x")];
        assert!(spec.validate().is_err());

        spec.files = vec![FileToUpload::readable("/mnt/.task_payload", "x")];
        assert!(spec.validate().is_ok());

        spec.env.push(("A=B".into(), "c".into()));
        let error = spec.validate().err();
        assert!(matches!(error, Some(EngineError::InvalidSpec { .. })));
    }

    #[test]
    fn limits_must_fit_the_engines_integers() {
        let mut spec = ContainerSpec::new("img");
        spec.memory_bytes = Some(u64::MAX);
        assert!(spec.validate().is_err());
        spec.memory_bytes = Some(0);
        assert!(spec.validate().is_err());
        spec.memory_bytes = Some(8 << 20);
        assert!(spec.validate().is_ok());
    }
}
