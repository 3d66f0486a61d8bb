//! A task container's root filesystem: an overlay whose lower layers are the image's unpacked
//! layers and whose upper and work directories are the container's own, discarded at its
//! removal; and the spec's directories, files and package put into it before the start.
//!
//! Everything written into the root goes through descriptors opened with
//! `RESOLVE_IN_ROOT` (Linux 5.6): a symbolic link in the image (`/mnt -> /`, `/etc ->
//! ../../host`) resolves inside the container's root as it would in the container, never onto
//! the host.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::EngineError;
use crate::spec::{ContainerSpec, normalized};

/// Where a container's root is mounted and what it is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Overlay {
    /// The image's layers, the base first.
    pub(crate) layers: Vec<PathBuf>,
    pub(crate) upper: PathBuf,
    pub(crate) work: PathBuf,
    /// The mount point: the bundle's `rootfs`.
    pub(crate) target: PathBuf,
}

// === impl Overlay ===

impl Overlay {
    /// The overlay's mount options: the top layer leftmost, as overlayfs reads `lowerdir`.
    pub(crate) fn options(&self) -> Result<String, EngineError> {
        let mut lower = Vec::with_capacity(self.layers.len());
        for layer in self.layers.iter().rev() {
            let layer = layer.to_str().filter(|path| !path.contains([',', ':']));
            let Some(layer) = layer else {
                return Err(EngineError::Failed {
                    message: format!(
                        "the image layer {layer:?} has a path overlayfs cannot take (',' or ':')"
                    ),
                });
            };
            lower.push(layer);
        }
        if lower.is_empty() {
            return Err(EngineError::Failed {
                message: "the image has no layers".to_owned(),
            });
        }
        Ok(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            self.upper.display(),
            self.work.display()
        ))
    }

    /// Makes the upper, work and mount directories and mounts the overlay. Blocking.
    pub(crate) fn mount(&self) -> Result<(), EngineError> {
        for directory in [&self.upper, &self.work, &self.target] {
            std::fs::create_dir_all(directory).map_err(|error| EngineError::Failed {
                message: format!("cannot make {}: {error}", directory.display()),
            })?;
        }
        let options = CString::new(self.options()?).map_err(|error| EngineError::Failed {
            message: format!("overlay options: {error}"),
        })?;
        rustix::mount::mount(
            "overlay",
            &self.target,
            "overlay",
            MountFlags::NODEV,
            options.as_c_str(),
        )
        .map_err(|error| EngineError::Failed {
            message: format!(
                "cannot mount the container's root overlay on {}: {error}",
                self.target.display()
            ),
        })
    }
}

/// Unmounts the root at `target` when it is mounted (detached: a process still holding it
/// keeps it alive until it lets go, nobody new can reach it). Blocking.
pub(crate) fn unmount(target: &Path) -> Result<(), EngineError> {
    match rustix::mount::unmount(target, UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        // Not a mount point (never mounted, or unmounted already), or no directory at all.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => Ok(()),
        Err(error) => Err(EngineError::Failed {
            message: format!("cannot unmount {}: {error}", target.display()),
        }),
    }
}

/// Whether `path` is a mount point of this process's mount namespace.
pub(crate) fn is_mounted(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

/// Puts the spec's directories (the task directory included), files and package into the
/// container's root at `root`, owned by root, with their modes: directories first, so a file
/// inside one lands in a directory with the requested mode, then files, then the package read
/// one entry at a time. Blocking file IO.
pub(crate) fn put_files(root: &Path, spec: &ContainerSpec) -> Result<(), EngineError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|error| failed(&root.display().to_string(), error.into()))?;
    put_files_under(root_fd, spec)
}

/// [`put_files`] into the root that `root_fd`, a directory descriptor, opens: a mount that is
/// attached nowhere (`fsmount`) has no path.
pub(crate) fn put_files_under(root_fd: OwnedFd, spec: &ContainerSpec) -> Result<(), EngineError> {
    let root = Root { fd: root_fd };
    for directory in spec.effective_directories() {
        root.directory(&directory.path, directory.mode)
            .map_err(|error| failed(&directory.path, error))?;
    }
    for file in &spec.files {
        root.file(&file.path, file.mode, &mut &file.contents[..])
            .map_err(|error| failed(&file.path, error))?;
    }
    if let Some(package) = &spec.package {
        package.read_files(|file, contents| root.file(&file.path, file.mode, contents))?;
    }
    Ok(())
}

/// Who a container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageUser {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The groups `/etc/group` lists the user's name in, as Docker gives them (not with an
    /// explicit group, `name:group`).
    pub(crate) additional_gids: Vec<u32>,
    /// Its home directory (for `HOME`), `/` without a `/etc/passwd` entry.
    pub(crate) home: String,
}

/// Who `user` (`uid`, `uid:gid`, `name`, `name:group`) is, its names looked up in the
/// image's `/etc/passwd` and `/etc/group`. Blocking file IO.
pub(crate) fn resolve_user(root: &Path, user: &str) -> Result<ImageUser, EngineError> {
    let read = |file: &str| -> String {
        let opened = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .and_then(|dir| {
                rustix::fs::openat2(
                    dir,
                    file,
                    OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::IN_ROOT,
                )
            });
        let mut text = String::new();
        if let Ok(fd) = opened {
            let _ = std::fs::File::from(fd).read_to_string(&mut text);
        }
        text
    };
    let passwd = read("etc/passwd");
    parse_user(user, &passwd, &read("etc/group"))
}

/// [`resolve_user`] over the text of `/etc/passwd` and `/etc/group`.
fn parse_user(user: &str, passwd: &str, group: &str) -> Result<ImageUser, EngineError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (user, None),
    };
    // name:password:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 6)
        .collect();
    let entry = entries.iter().find(|fields| {
        fields[0] == user_part || (user_part.parse::<u32>().is_ok() && fields[2] == user_part)
    });
    let uid = match user_part.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry
            .and_then(|fields| fields[2].parse().ok())
            .ok_or_else(|| {
                EngineError::invalid_spec(format!("the user {user_part:?} is not in the image"))
            })?,
    };
    let home = entry.map_or("/", |fields| fields[5]).to_owned();
    // name:password:gid:member,member,...
    let groups = || {
        group
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .filter(|fields| fields.len() >= 3)
    };
    let gid = match group_part {
        None => entry.and_then(|fields| fields[3].parse().ok()).unwrap_or(0),
        Some(group_name) => match group_name.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups()
                .find(|fields| fields[0] == group_name)
                .and_then(|fields| fields[2].parse().ok())
                .ok_or_else(|| {
                    EngineError::invalid_spec(format!(
                        "the group {group_name:?} is not in the image"
                    ))
                })?,
        },
    };
    let mut additional_gids: Vec<u32> = Vec::new();
    if let (None, Some(entry)) = (group_part, entry) {
        let name = entry[0];
        let memberships = groups()
            .filter(|fields| {
                fields
                    .get(3)
                    .is_some_and(|members| members.split(',').any(|member| member.trim() == name))
            })
            .filter_map(|fields| fields[2].parse::<u32>().ok());
        for member_of in memberships {
            if member_of != gid && !additional_gids.contains(&member_of) {
                additional_gids.push(member_of);
            }
        }
    }
    Ok(ImageUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// The container's root, as a directory descriptor every path is resolved under.
struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Makes the directory at `path` (and its missing parents, root's and 0755) with `mode`,
    /// which an existing one gets too.
    fn directory(&self, path: &str, mode: u32) -> io::Result<()> {
        let relative = normalized(path);
        if relative.is_empty() {
            return Ok(());
        }
        let directory = self.make_parents(&relative)?;
        rustix::fs::fchmod(&directory, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// Writes the file at `path` with `mode` from `contents` (its missing parent directories
    /// root's and 0755), replacing what was there; a link at `path` is not followed.
    fn file(&self, path: &str, mode: u32, contents: &mut dyn Read) -> io::Result<()> {
        let relative = normalized(path);
        let (parent, name) = match relative.rsplit_once('/') {
            Some((parent, name)) => (Some(parent), name),
            None => (None, relative.as_str()),
        };
        let parent = match parent {
            Some(parent) => self.make_parents(parent)?,
            None => rustix::io::dup(&self.fd)?,
        };
        // Whatever was there (a link or a file of the image) goes; a directory stays and
        // fails the open below.
        match rustix::fs::unlinkat(&parent, name, rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT | rustix::io::Errno::ISDIR) => {}
            Err(error) => return Err(error.into()),
        }
        let fd = rustix::fs::openat(
            &parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        let mut file = std::fs::File::from(fd);
        io::copy(contents, &mut file)?;
        file.flush()
    }

    /// Opens the directory `relative`, making each missing component (0755) on the way,
    /// every step resolved inside the root.
    fn make_parents(&self, relative: &str) -> io::Result<OwnedFd> {
        let mut prefix = String::new();
        let mut current = rustix::io::dup(&self.fd)?;
        for component in relative.split('/').filter(|c| !c.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            match rustix::fs::mkdirat(&current, component, Mode::from_raw_mode(0o755)) {
                Ok(()) => {
                    // The umask took bits away; the parents are 0755 whatever it is.
                    let made = self.open_dir(&prefix)?;
                    rustix::fs::fchmod(&made, Mode::from_raw_mode(0o755))?;
                }
                Err(rustix::io::Errno::EXIST) => {}
                Err(error) => return Err(error.into()),
            }
            current = self.open_dir(&prefix)?;
        }
        Ok(current)
    }

    fn open_dir(&self, relative: &str) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat2(
            &self.fd,
            relative,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?)
    }
}

fn failed(path: &str, error: io::Error) -> EngineError {
    EngineError::Failed {
        message: format!("cannot put {path} in the container's root: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DirectoryToCreate, FileToUpload};
    use std::os::unix::fs::PermissionsExt;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn lower_layers_are_given_top_first() -> TestResult {
        let overlay = Overlay {
            layers: vec!["/l/base".into(), "/l/top".into()],
            upper: "/b/upper".into(),
            work: "/b/work".into(),
            target: "/b/rootfs".into(),
        };
        assert_eq!(
            overlay.options()?,
            "lowerdir=/l/top:/l/base,upperdir=/b/upper,workdir=/b/work"
        );
        let bad = Overlay {
            layers: vec!["/l/a:b".into()],
            ..overlay
        };
        assert!(bad.options().is_err());
        Ok(())
    }

    #[test]
    fn files_land_with_their_modes_and_links_stay_inside_the_root() -> TestResult {
        let scratch = tempfile::tempdir()?;
        let root = scratch.path().join("root");
        let outside = scratch.path().join("outside");
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::create_dir_all(&outside)?;
        // The image's links point out of the root; they must resolve inside it.
        std::os::unix::fs::symlink("/", root.join("mnt"))?;
        std::os::unix::fs::symlink(&outside, root.join("escape"))?;
        std::os::unix::fs::symlink(outside.join("file"), root.join("etc/linked"))?;

        let mut spec = ContainerSpec::new("img");
        spec.directories.push(DirectoryToCreate {
            path: "/data/private".into(),
            mode: 0o700,
        });
        spec.files.push(FileToUpload {
            path: "/data/private/secret".into(),
            contents: b"s".to_vec(),
            mode: 0o600,
        });
        spec.files
            .push(FileToUpload::readable("/etc/linked", "replaced"));
        put_files(&root, &spec)?;

        let mode = |path: &Path| -> u32 {
            std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o7777)
        };
        // /mnt -> / resolves to the root's own /, so the task directory is there (and not
        // at the host's /task).
        assert_eq!(mode(&root.join("task")), 0o777);
        assert_eq!(mode(&root.join("data/private")), 0o700);
        assert_eq!(mode(&root.join("data")), 0o755);
        assert_eq!(std::fs::read(root.join("data/private/secret"))?, b"s");
        assert_eq!(mode(&root.join("data/private/secret")), 0o600);
        // A link to a directory outside resolves inside the root, where there is none: the
        // file cannot go there, and the host's directory is untouched.
        let mut escaping = ContainerSpec::new("img");
        escaping
            .files
            .push(FileToUpload::readable("/escape/payload", "inside"));
        assert!(put_files(&root, &escaping).is_err());
        assert!(std::fs::read_dir(&outside)?.next().is_none());
        // A link at a file's path is replaced, not followed.
        assert!(!outside.join("file").exists());
        assert_eq!(std::fs::read(root.join("etc/linked"))?, b"replaced");
        Ok(())
    }

    #[test]
    fn users_are_looked_up_in_the_image() -> TestResult {
        let passwd =
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
        let group = "root:x:0:\nstaff:x:50:\naudio:x:29:other,nobody\nnogroup:x:65534:nobody\n";
        let user = |uid, gid, additional_gids: &[u32], home: &str| ImageUser {
            uid,
            gid,
            additional_gids: additional_gids.to_vec(),
            home: home.to_owned(),
        };
        assert_eq!(parse_user("0", passwd, group)?, user(0, 0, &[], "/root"));
        // Its own group is not repeated among the others.
        assert_eq!(
            parse_user("nobody", passwd, group)?,
            user(65534, 65534, &[29], "/nonexistent")
        );
        assert_eq!(
            parse_user("65534", passwd, group)?,
            user(65534, 65534, &[29], "/nonexistent")
        );
        assert_eq!(
            parse_user("1000:50", passwd, group)?,
            user(1000, 50, &[], "/")
        );
        // An explicit group is the only one, as with Docker.
        assert_eq!(
            parse_user("nobody:staff", passwd, group)?,
            user(65534, 50, &[], "/nonexistent")
        );
        assert!(parse_user("ghost", passwd, group).is_err());
        assert!(parse_user("0:ghosts", passwd, group).is_err());
        Ok(())
    }
}
