//! A created Docker container's files put straight into its root, where the engine is on this
//! machine: the container's own overlay (the image's layers under the container's upper
//! directory, as the engine's `overlay2` driver reports them) mounted for a moment, attached
//! nowhere, and the files written through it as the OCI runtime writes its own
//! (`oci::rootfs::put_files`, every path resolved inside the root).
//!
//! The archive upload does the same through the engine, which unpacks every archive in a
//! process of its own (a fresh `dockerd` started for it): measured on 2 cores with Docker
//! 20.10, 40 to 65 ms of the machine's CPU per task, a sixth of what a task costs it. The
//! result is the same container: the files in its upper directory, owned by root with their
//! modes, parents copied up with the image's own attributes, gone with the container.
//!
//! Where the upper directory is not reachable from here (another host, a runner in a container
//! without the engine's data root, no privilege to mount, another storage driver) the first
//! mount cannot be made, and an engine under user namespace remapping or SELinux is not asked
//! to take files written from outside ([`engine_refuses`]): the engine goes back to the upload
//! for good ([`DirectFiles`]). Once a mount was made, a failed one sends only its own
//! container's files through the upload.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};

use crate::error::EngineError;
use crate::oci::rootfs;
use crate::spec::ContainerSpec;

/// The storage driver whose layout this module knows.
const OVERLAY2: &str = "overlay2";

/// Whether a container's files go straight into its root, decided by the first try.
#[derive(Debug)]
pub(crate) struct DirectFiles {
    state: AtomicU8,
}

const UNTRIED: u8 = 0;
const WORKS: u8 = 1;
const OFF: u8 = 2;

/// The directories of a created container's overlay, as the engine reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OverlayDirs {
    /// Top first, as overlayfs and the engine list them.
    pub(crate) lower: Vec<String>,
    pub(crate) upper: String,
    pub(crate) work: String,
}

/// Why the files did not go straight in.
#[derive(Debug)]
pub(crate) enum NotDirect {
    /// The root cannot be reached from here: the upload puts them in instead.
    Unreachable(String),
    /// Reached, but a file could not be put (a package lying about a size, a path the image
    /// has a directory at): the create fails as an upload's would.
    Failed(EngineError),
}

// === impl DirectFiles ===

impl DirectFiles {
    /// Tried at the next create.
    pub(crate) fn new() -> Self {
        DirectFiles {
            state: AtomicU8::new(UNTRIED),
        }
    }

    /// Never tried: every container's files go through the engine's archive upload.
    pub(crate) fn off() -> Self {
        DirectFiles {
            state: AtomicU8::new(OFF),
        }
    }

    /// Whether the next create should try.
    pub(crate) fn worth_trying(&self) -> bool {
        self.state.load(Ordering::Relaxed) != OFF
    }

    /// The files went straight in.
    pub(crate) fn worked(&self) {
        let _ = self
            .state
            .compare_exchange(UNTRIED, WORKS, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The root was out of reach, so this container's files go through the upload. Before
    /// any container's went straight in, that is the answer from now on (said once); after,
    /// it is this container's alone (removed while it was being prepared, say), and the next
    /// one tries again.
    pub(crate) fn out_of_reach(&self, reason: &str) {
        match self
            .state
            .compare_exchange(UNTRIED, OFF, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => tracing::info!(
                reason,
                "task files go through the engine's archive upload: the container's root is out \
                 of this process's reach"
            ),
            Err(WORKS) => tracing::warn!(
                reason,
                "a task's files go through the engine's archive upload: its container's root \
                 was out of reach"
            ),
            Err(_) => {}
        }
    }
}

/// Why an engine with `security_options` (its `docker info` answer) keeps files written from
/// outside from being what an upload makes: under user namespace remapping the container's
/// root is another user than ours, and under SELinux the files need the container's label.
pub(crate) fn engine_refuses(security_options: &[String]) -> Option<String> {
    security_options
        .iter()
        .find(|option| option.contains("name=userns") || option.contains("name=selinux"))
        .map(|option| format!("the engine runs with {option}"))
}

// === impl OverlayDirs ===

impl OverlayDirs {
    /// The overlay of a container whose storage driver is `driver` with `data` (the inspect
    /// answer's `GraphDriver`); `None` for another driver or an answer without the three.
    pub(crate) fn of(driver: &str, data: &HashMap<String, String>) -> Option<OverlayDirs> {
        if driver != OVERLAY2 {
            return None;
        }
        let lower: Vec<String> = data
            .get("LowerDir")?
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(str::to_owned)
            .collect();
        let upper = data.get("UpperDir")?.clone();
        let work = data.get("WorkDir")?.clone();
        (!lower.is_empty()).then_some(OverlayDirs { lower, upper, work })
    }
}

/// Mounts `dirs` attached nowhere and puts `spec`'s directories, files and package into it; the
/// mount goes when this returns. Blocking.
pub(crate) fn put_files(dirs: &OverlayDirs, spec: &ContainerSpec) -> Result<(), NotDirect> {
    let root = mount_detached(dirs).map_err(NotDirect::Unreachable)?;
    rootfs::put_files_under(root, spec).map_err(NotDirect::Failed)
}

/// The overlay of `dirs` as a mount attached nowhere: only the returned descriptor reaches it,
/// and closing it (or this process ending) takes it away. Each layer is given on its own
/// (`lowerdir+`, Linux 6.8), since one option holds at most 256 bytes; a directory that is not
/// on this machine is refused there.
fn mount_detached(dirs: &OverlayDirs) -> Result<OwnedFd, String> {
    let context = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|error| format!("cannot open an overlay file system: {error}"))?;
    let set = |key: &str, value: &str| {
        rustix::mount::fsconfig_set_string(&context, key, value)
            .map_err(|error| format!("the overlay refuses {key}={value}: {error}"))
    };
    for layer in &dirs.lower {
        set("lowerdir+", layer)?;
    }
    set("upperdir", &dirs.upper)?;
    set("workdir", &dirs.work)?;
    // The engine mounts its overlays without an inode index; neither may this one start one
    // (every kernel with `lowerdir+` knows the option).
    set("index", "off")?;
    rustix::mount::fsconfig_create(&context)
        .map_err(|error| format!("cannot make the container's overlay: {error}"))?;
    rustix::mount::fsmount(
        &context,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOSUID,
    )
    .map_err(|error| format!("cannot mount the container's overlay: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_is_read_from_the_engines_answer() {
        let data: HashMap<String, String> = [
            ("LowerDir", "/d/overlay2/a-init/diff:/d/overlay2/b/diff"),
            ("MergedDir", "/d/overlay2/a/merged"),
            ("UpperDir", "/d/overlay2/a/diff"),
            ("WorkDir", "/d/overlay2/a/work"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
        assert_eq!(
            OverlayDirs::of("overlay2", &data),
            Some(OverlayDirs {
                lower: vec![
                    "/d/overlay2/a-init/diff".to_owned(),
                    "/d/overlay2/b/diff".to_owned()
                ],
                upper: "/d/overlay2/a/diff".to_owned(),
                work: "/d/overlay2/a/work".to_owned(),
            })
        );
        assert_eq!(OverlayDirs::of("btrfs", &data), None);
        let mut no_upper = data.clone();
        no_upper.remove("UpperDir");
        assert_eq!(OverlayDirs::of("overlay2", &no_upper), None);
    }

    #[test]
    fn user_namespaces_and_selinux_keep_the_upload() {
        let options = |list: &[&str]| list.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            engine_refuses(&options(&["name=seccomp,profile=default", "name=cgroupns"])),
            None
        );
        assert!(
            engine_refuses(&options(&["name=seccomp,profile=default", "name=userns"])).is_some()
        );
        assert!(engine_refuses(&options(&["name=selinux"])).is_some());
    }

    #[test]
    fn out_of_reach_at_first_means_the_upload_for_good_and_later_for_one_container() {
        let direct = DirectFiles::new();
        assert!(direct.worth_trying());
        direct.out_of_reach("no privilege to mount");
        direct.worked();
        assert!(!direct.worth_trying());

        let direct = DirectFiles::new();
        direct.worked();
        direct.out_of_reach("the container was removed meanwhile");
        assert!(direct.worth_trying());
        assert!(!DirectFiles::off().worth_trying());
    }
}
