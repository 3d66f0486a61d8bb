//! One layer tar unpacked into a directory of its own, in the form overlayfs reads as a lower
//! layer: OCI/Docker whiteouts (`.wh.<name>`, `.wh..wh..opq`) become a 0/0 character device
//! and the `trusted.overlay.opaque=y` attribute; ownership, modes, times, symlinks, hard
//! links, devices, fifos and extended attributes are kept.
//!
//! The archive is read once, as it streams (through [`Digesting`], which hashes what passes),
//! on a blocking thread. An entry whose path or hard-link target leaves the layer (`..`, or a
//! parent that is a symlink) is refused, and so is the whole layer.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use sha2::{Digest, Sha256};

/// The prefix of a whiteout entry's file name.
const WHITEOUT_PREFIX: &str = ".wh.";
/// The name of the entry that makes its directory opaque.
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// What overlayfs reads to hide a lower directory's contents.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// How PAX headers carry extended attributes.
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// The size of the writes a file's contents are copied in.
const COPY_BUFFER: usize = 256 << 10;

/// Why a layer could not be unpacked.
#[derive(Debug)]
pub(crate) enum UnpackError {
    /// The archive is not one we unpack: an entry escapes the layer, an unknown entry type, a
    /// broken tar. The image's fault.
    Invalid(String),
    /// Writing the layer failed on this machine.
    Io { path: PathBuf, error: io::Error },
}

/// What one unpacked layer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LayerStats {
    /// Bytes of regular files written.
    pub(crate) bytes: u64,
    /// Entries unpacked.
    pub(crate) entries: u64,
}

/// A reader that hashes (SHA-256) and counts everything read through it.
pub(crate) struct Digesting<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

// === impl Digesting ===

impl<R: Read> Digesting<R> {
    pub(crate) fn new(inner: R) -> Self {
        Digesting {
            inner,
            hasher: Sha256::new(),
            read: 0,
        }
    }

    /// Reads what is left (a tar's padding after its end marker counts in its digest), then
    /// returns the digest (`sha256:<hex>`), the bytes read and the inner reader.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64, R)> {
        io::copy(&mut self, &mut io::sink())?;
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        Ok((digest, self.read, self.inner))
    }
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        self.read += read as u64;
        Ok(read)
    }
}

/// Unpacks the layer tar `archive` into `dest`, an empty directory of its own.
pub(crate) fn unpack_layer(archive: impl Read, dest: &Path) -> Result<LayerStats, UnpackError> {
    let mut unpacker = Unpacker {
        dest,
        safe_dirs: HashSet::new(),
        dir_times: Vec::new(),
        stats: LayerStats::default(),
        buffer: vec![0; COPY_BUFFER],
    };
    let mut archive = tar::Archive::new(archive);
    let entries = archive
        .entries()
        .map_err(|error| UnpackError::Invalid(format!("not a tar archive: {error}")))?;
    for entry in entries {
        let entry =
            entry.map_err(|error| UnpackError::Invalid(format!("a broken tar entry: {error}")))?;
        unpacker.entry(entry)?;
    }
    // A directory's time last: writing into it changed it.
    for (path, mtime) in std::mem::take(&mut unpacker.dir_times).into_iter().rev() {
        set_mtime(&path, mtime)?;
    }
    Ok(unpacker.stats)
}

/// The walk through one archive.
struct Unpacker<'a> {
    dest: &'a Path,
    /// Directories inside `dest` known to be real directories (no symlink on the way).
    safe_dirs: HashSet<PathBuf>,
    /// Directories whose time is set at the end.
    dir_times: Vec<(PathBuf, u64)>,
    stats: LayerStats,
    /// Files' contents pass through here, in writes larger than `io::copy`'s.
    buffer: Vec<u8>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry
            .path()
            .map_err(|error| UnpackError::Invalid(format!("an unreadable path: {error}")))?
            .into_owned();
        let Some(relative) = inside_layer(&raw_path)? else {
            // The layer's root itself (`./`): its directory is ours.
            return Ok(());
        };
        let header = entry.header().clone();
        let kind = header.entry_type();
        let name = relative.file_name().unwrap_or_default().to_owned();
        let parent = relative.parent().unwrap_or(Path::new("")).to_owned();

        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let parent = self.directory(&parent)?;
            if name == OPAQUE_WHITEOUT {
                rustix::fs::lsetxattr(&parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                    .map_err(|error| io_error(&parent, error.into()))?;
            } else if !hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                // Other `.wh..wh.` names are aufs's own bookkeeping, not whiteouts.
                let path = parent.join(OsStr::from_bytes(hidden));
                remove_existing(&path)?;
                rustix::fs::mknodat(
                    CWD,
                    &path,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|error| io_error(&path, error.into()))?;
            }
            self.stats.entries += 1;
            return Ok(());
        }

        let parent = self.directory(&parent)?;
        let path = parent.join(&name);
        if kind != tar::EntryType::Directory {
            // A directory this entry replaces no longer holds what follows under its name.
            self.safe_dirs.retain(|dir| !dir.starts_with(&relative));
        }
        let mode = header.mode().map_err(invalid_header)? & 0o7777;
        let mtime = header.mtime().map_err(invalid_header)?;
        match kind {
            tar::EntryType::Directory => {
                let existing = std::fs::symlink_metadata(&path).ok();
                if !existing.is_some_and(|metadata| metadata.is_dir()) {
                    remove_existing(&path)?;
                    std::fs::create_dir(&path).map_err(|error| io_error(&path, error))?;
                }
                self.safe_dirs.insert(relative.clone());
                self.dir_times.push((path.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_existing(&path)?;
                let mut file = std::fs::File::create_new(&path).map_err(|e| io_error(&path, e))?;
                let copied = copy(&mut entry, &mut file, &mut self.buffer).map_err(|error| {
                    match error.kind() {
                        // The archive ended inside the entry, or a read of the stream failed.
                        io::ErrorKind::UnexpectedEof => {
                            UnpackError::Invalid(format!("{} is cut short", raw_path.display()))
                        }
                        _ => io_error(&path, error),
                    }
                })?;
                self.stats.bytes += copied;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(invalid_header)?
                    .ok_or_else(|| UnpackError::Invalid("a symlink without target".into()))?;
                remove_existing(&path)?;
                // A symlink may point anywhere: it is resolved inside the container's root.
                std::os::unix::fs::symlink(&target, &path).map_err(|e| io_error(&path, e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(invalid_header)?
                    .ok_or_else(|| UnpackError::Invalid("a hard link without target".into()))?;
                let target = inside_layer(&target)?.ok_or_else(|| {
                    UnpackError::Invalid(format!("{} links to the root", raw_path.display()))
                })?;
                let target_parent = self.directory_existing(target.parent())?;
                let target = target_parent.join(target.file_name().unwrap_or_default());
                let linked = std::fs::symlink_metadata(&target).map_err(|_| {
                    UnpackError::Invalid(format!(
                        "{} links to {}, which the layer does not hold",
                        raw_path.display(),
                        target.display()
                    ))
                })?;
                if linked.is_dir() {
                    return Err(UnpackError::Invalid(format!(
                        "{} is a hard link to a directory",
                        raw_path.display()
                    )));
                }
                remove_existing(&path)?;
                std::fs::hard_link(&target, &path).map_err(|e| io_error(&path, e))?;
                // A hard link shares its target's owner, mode and times.
                self.stats.entries += 1;
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = header.device_major().map_err(invalid_header)?.unwrap_or(0);
                let minor = header.device_minor().map_err(invalid_header)?.unwrap_or(0);
                remove_existing(&path)?;
                rustix::fs::mknodat(
                    CWD,
                    &path,
                    file_type,
                    Mode::empty(),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(|error| io_error(&path, error.into()))?;
            }
            // PAX and GNU long-name headers are read by `tar` into the entry they precede.
            tar::EntryType::XGlobalHeader => return Ok(()),
            other => {
                return Err(UnpackError::Invalid(format!(
                    "{} has an entry type this store does not unpack ({other:?})",
                    raw_path.display()
                )));
            }
        }

        if let Some(extensions) = entry.pax_extensions().map_err(invalid_header)? {
            for extension in extensions {
                let extension = extension.map_err(invalid_header)?;
                let Ok(key) = extension.key() else { continue };
                if let Some(attribute) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    rustix::fs::lsetxattr(
                        &path,
                        attribute,
                        extension.value_bytes(),
                        XattrFlags::empty(),
                    )
                    .map_err(|error| io_error(&path, error.into()))?;
                }
            }
        }
        let uid = header.uid().map_err(invalid_header)?;
        let gid = header.gid().map_err(invalid_header)?;
        let owner = |id: u64| u32::try_from(id).map_err(invalid_header);
        std::os::unix::fs::lchown(&path, Some(owner(uid)?), Some(owner(gid)?))
            .map_err(|error| io_error(&path, error))?;
        if kind != tar::EntryType::Symlink {
            // After the owner: a change of owner clears the set-user-id bits.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|error| io_error(&path, error))?;
        }
        if kind != tar::EntryType::Directory {
            set_mtime(&path, mtime)?;
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// The directory `relative` inside the layer as a path, made (with the usual 0755 root
    /// directories on the way) where the archive did not make it first.
    fn directory(&mut self, relative: &Path) -> Result<PathBuf, UnpackError> {
        self.walk(relative, |path, _| {
            std::fs::create_dir(path).map_err(|error| io_error(path, error))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .map_err(|error| io_error(path, error))
        })
    }

    /// Like [`Self::directory`], for a hard link's target: nothing is made.
    fn directory_existing(&mut self, relative: Option<&Path>) -> Result<PathBuf, UnpackError> {
        self.walk(relative.unwrap_or(Path::new("")), |_, walked| {
            Err(UnpackError::Invalid(format!(
                "a hard link's target under {} is not in the layer",
                walked.display()
            )))
        })
    }

    /// Walks `relative` down from the layer's root, calling `missing` for a component that
    /// does not exist; refused when a component is a symlink or a file, which would put
    /// entries elsewhere (outside the layer, through a symlink).
    fn walk(
        &mut self,
        relative: &Path,
        missing: impl Fn(&Path, &Path) -> Result<(), UnpackError>,
    ) -> Result<PathBuf, UnpackError> {
        let mut walked = PathBuf::new();
        for component in relative.components() {
            walked.push(component);
            if self.safe_dirs.contains(&walked) {
                continue;
            }
            let path = self.dest.join(&walked);
            match std::fs::symlink_metadata(&path) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Invalid(format!(
                        "{} is not a directory, yet the layer puts entries under it",
                        walked.display()
                    )));
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => missing(&path, &walked)?,
                Err(error) => return Err(io_error(&path, error)),
            }
            self.safe_dirs.insert(walked.clone());
        }
        Ok(self.dest.join(relative))
    }
}

/// The entry's path relative to the layer's root, `None` for the root itself; refused when
/// it climbs out (`..`). A leading `/` or `./` is dropped, as every unpacker does.
fn inside_layer(path: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::Invalid(format!(
                    "{} escapes the layer",
                    path.display()
                )));
            }
        }
    }
    Ok((!relative.as_os_str().is_empty()).then_some(relative))
}

/// Removes what a later entry of the same archive replaces (a directory only when the new
/// entry is not one, which the caller decides).
fn remove_existing(path: &Path) -> Result<(), UnpackError> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => {
            std::fs::remove_dir_all(path).map_err(|error| io_error(path, error))
        }
        Ok(_) => std::fs::remove_file(path).map_err(|error| io_error(path, error)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_error(path, error)),
    }
}

/// Copies `reader` to `writer` through `buffer`; returns the bytes copied.
fn copy(reader: &mut impl Read, writer: &mut impl io::Write, buffer: &mut [u8]) -> io::Result<u64> {
    let mut copied = 0;
    loop {
        let mut filled = 0;
        // Fill the buffer before writing: the stream arrives in small chunks.
        while filled < buffer.len() {
            match reader.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if filled == 0 {
            return Ok(copied);
        }
        writer.write_all(&buffer[..filled])?;
        copied += filled as u64;
    }
}

/// Sets a path's access and modification times to `mtime`, not following a symlink.
fn set_mtime(path: &Path, mtime: u64) -> Result<(), UnpackError> {
    let time = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|error| io_error(path, error.into()))
}

fn io_error(path: &Path, error: io::Error) -> UnpackError {
    UnpackError::Io {
        path: path.to_owned(),
        error,
    }
}

fn invalid_header(error: impl std::fmt::Display) -> UnpackError {
    UnpackError::Invalid(format!("a bad tar header: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A tar of `entries`, each `(path, kind, contents or link target)`.
    fn archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(if *kind == tar::EntryType::Directory {
                0o750
            } else {
                0o640
            });
            header.set_uid(1234);
            header.set_gid(4321);
            header.set_mtime(1_000_000);
            let body: &[u8] = match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let _ = header.set_link_name(std::str::from_utf8(data).unwrap_or_default());
                    &[]
                }
                _ => data,
            };
            header.set_size(body.len() as u64);
            if *kind == tar::EntryType::Char {
                let _ = header.set_device_major(1);
                let _ = header.set_device_minor(3);
            }
            // `set_path` refuses `..`: write the raw name, as a hostile archive would.
            let name = path.as_bytes();
            if let Some(gnu) = header.as_gnu_mut() {
                gnu.name[..name.len()].copy_from_slice(name);
            }
            header.set_cksum();
            let _ = builder.append(&header, body);
        }
        builder.into_inner().unwrap_or_default()
    }

    fn root_only() -> bool {
        // Device nodes, ownership and `trusted.*` attributes need root.
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts_and_the_rest_is_kept()
    -> Result<(), Box<dyn std::error::Error>> {
        if !root_only() {
            eprintln!("skipped: unpacking a layer needs root");
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let layer = archive(&[
            ("etc/", tar::EntryType::Directory, b""),
            ("etc/.wh.group", tar::EntryType::Regular, b""),
            ("home/.wh..wh..opq", tar::EntryType::Regular, b""),
            ("home/file", tar::EntryType::Regular, b"hello"),
            ("home/link", tar::EntryType::Symlink, b"/etc/passwd"),
            ("home/hard", tar::EntryType::Link, b"home/file"),
            ("dev/null", tar::EntryType::Char, b""),
            ("x/.wh..wh.plnk", tar::EntryType::Regular, b""),
        ]);
        let mut digesting = Digesting::new(&layer[..]);
        let stats = unpack_layer(&mut digesting, dir.path()).map_err(|e| format!("{e:?}"))?;
        let (digest, read, _) = digesting.finish()?;
        assert_eq!(read, layer.len() as u64);
        assert_eq!(
            digest,
            format!("sha256:{}", hex::encode(Sha256::digest(&layer)))
        );
        assert_eq!(stats.bytes, 5);

        let group = std::fs::symlink_metadata(dir.path().join("etc/group"))?;
        assert!(group.file_type().is_char_device() && group.rdev() == 0);
        let mut value = [0_u8; 4];
        let length = rustix::fs::lgetxattr(dir.path().join("home"), OPAQUE_XATTR, &mut value)?;
        assert_eq!(&value[..length], b"y");
        let file = std::fs::symlink_metadata(dir.path().join("home/file"))?;
        assert_eq!(
            (file.mode() & 0o7777, file.uid(), file.gid()),
            (0o640, 1234, 4321)
        );
        assert_eq!(file.mtime(), 1_000_000);
        assert_eq!(
            std::fs::metadata(dir.path().join("home/hard"))?.ino(),
            file.ino()
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("home/link"))?,
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::symlink_metadata(dir.path().join("home/link"))?.uid(),
            1234
        );
        let etc = std::fs::symlink_metadata(dir.path().join("etc"))?;
        assert_eq!((etc.mode() & 0o7777, etc.mtime()), (0o750, 1_000_000));
        assert!(
            std::fs::symlink_metadata(dir.path().join("dev/null"))?
                .file_type()
                .is_char_device()
        );
        assert!(
            !dir.path().join("x/plnk").exists(),
            "aufs bookkeeping is no whiteout"
        );
        Ok(())
    }

    #[test]
    fn entries_that_leave_the_layer_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        if !root_only() {
            eprintln!("skipped: unpacking a layer needs root");
            return Ok(());
        }
        let outside = tempfile::tempdir()?;
        let target = outside.path().display().to_string();
        for (what, layer) in [
            (
                "a parent directory",
                archive(&[("../escaped", tar::EntryType::Regular, b"x")]),
            ),
            (
                "through a symlink",
                archive(&[
                    ("up", tar::EntryType::Symlink, target.as_bytes()),
                    ("up/escaped", tar::EntryType::Regular, b"x"),
                ]),
            ),
            (
                "a whiteout through a symlink",
                archive(&[
                    ("up", tar::EntryType::Symlink, target.as_bytes()),
                    ("up/.wh.escaped", tar::EntryType::Regular, b""),
                ]),
            ),
            (
                "a hard link out",
                archive(&[("hard", tar::EntryType::Link, b"../../etc/passwd")]),
            ),
            (
                "a hard link through a symlink",
                archive(&[
                    ("up", tar::EntryType::Symlink, b"/etc"),
                    ("hard", tar::EntryType::Link, b"up/passwd"),
                ]),
            ),
        ] {
            let dir = tempfile::tempdir()?;
            let result = unpack_layer(&layer[..], dir.path());
            assert!(
                matches!(result, Err(UnpackError::Invalid(_))),
                "{what}: {result:?}"
            );
            assert_eq!(std::fs::read_dir(outside.path())?.count(), 0, "{what}");
        }
        Ok(())
    }
}
