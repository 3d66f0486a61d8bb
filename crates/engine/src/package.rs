//! [`ZipPackage`]: a code's zip package, unpacked under [`TASK_DIR`] when its container is
//! created, read from a file one entry at a time and never held whole.
//!
//! The server checked the package completely when it was pushed (relative paths, no `..`, no
//! links, a bounded unpacked size), so nothing new is refused here; entries that are not
//! plain files or directories, or have no safe path, are skipped with a warning rather than
//! trusted. What can still be wrong shows while the package is read: a zip that cannot be
//! read, or an entry whose contents are shorter or longer than the size its directory
//! declares. The archive a runtime is sent announces each file's size before its bytes, so
//! such an entry stops the upload with [`EngineError::InvalidPackage`] instead of corrupting
//! the archive.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::EngineError;
use crate::spec::{DirectoryToCreate, TASK_DIR};

/// A zip package on the runner's machine to unpack under [`TASK_DIR`]: modes kept, the
/// parent directories an entry implies created writable by any user (0777), the entry point
/// made executable.
///
/// [`ZipPackage::open`] reads the zip's directory only (names, modes, sizes), so the spec can
/// be checked before anything is created; the contents are read when the runtime puts the
/// files in place, from the same file, which must stay until the container is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipPackage {
    path: PathBuf,
    /// Every directory that holds something, explicit or implied, parents first.
    directories: Vec<DirectoryToCreate>,
    /// The plain files, in the zip's order.
    files: Vec<PackageFile>,
}

/// One plain file of a package, as its zip declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageFile {
    /// The entry's index in the zip.
    index: usize,
    /// The entry's path relative to `TASK_DIR`, for messages.
    name: String,
    /// Where it goes in the container.
    pub(crate) path: String,
    /// Unix permission bits.
    pub(crate) mode: u32,
    /// Its size as the zip declares it: what the archive announces.
    pub(crate) size: u64,
}

/// Reads exactly the size an entry declares, and says so when the entry holds fewer or more
/// bytes: the archive announced the declared size, so anything else would corrupt it.
struct DeclaredSize<R> {
    inner: R,
    name: String,
    declared: u64,
    remaining: u64,
    /// What was wrong with the entry, once reading it failed.
    failure: Option<String>,
}

/// The package's file with the OS errors of reading it kept aside, so that a disk that fails
/// (the runner's, an infrastructure failure) is told from a zip that is broken (the user's).
struct Watched<R> {
    inner: R,
    failure: LocalFailure,
}

/// The first OS error reading a package's file, once there is one.
type LocalFailure = Rc<RefCell<Option<String>>>;

/// A package's zip, read through its watched file.
type PackageArchive = zip::ZipArchive<Watched<BufReader<File>>>;

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// Files without a recorded unix mode (zips made on Windows) get this one.
const DEFAULT_FILE_MODE: u32 = 0o644;
/// Directories without a recorded mode are writable by any user, like `TASK_DIR` itself.
const DEFAULT_DIRECTORY_MODE: u32 = 0o777;

// === impl ZipPackage ===

impl ZipPackage {
    /// Reads the directory of the zip at `path` (not its contents) and plans its unpacking
    /// under [`TASK_DIR`], with `entry_point` (a path relative to it, `./` allowed) made
    /// executable whatever the zip recorded, so a `#!/bin/sh` script zipped without modes
    /// still runs.
    ///
    /// Blocking file IO: call it off the async executor. Fails with
    /// [`EngineError::InvalidPackage`] when the file is no readable zip, and with
    /// [`EngineError::LocalIo`] when the file itself cannot be read.
    pub fn open(path: impl Into<PathBuf>, entry_point: Option<&str>) -> Result<Self, EngineError> {
        let path = path.into();
        let entry_point = entry_point.map(|entry_point| entry_point.trim_start_matches("./"));
        let (mut archive, local_failure) = open_archive(&path)?;
        let unreadable = |error: zip::result::ZipError| {
            package_error(
                &path,
                &local_failure,
                format!("the zip cannot be read: {error}"),
            )
        };
        // Listing the implied directories too keeps them writable instead of the runtime's
        // root-owned 0755.
        let mut directories: BTreeMap<String, u32> = BTreeMap::new();
        let mut files = Vec::new();
        for index in 0..archive.len() {
            let entry = archive.by_index(index).map_err(unreadable)?;
            let Some(relative) = entry
                .enclosed_name()
                .and_then(|path| path.to_str().map(|p| p.trim_end_matches('/').to_owned()))
                .filter(|path| !path.is_empty())
            else {
                tracing::warn!(index, "skipping a package entry without a safe path");
                continue;
            };
            let unix_mode = entry.unix_mode();
            let kind = unix_mode
                .map(|mode| mode & S_IFMT)
                .filter(|kind| *kind != 0);
            let is_dir = entry.is_dir() || kind == Some(S_IFDIR);
            if !is_dir && kind.is_some_and(|kind| kind != S_IFREG) {
                tracing::warn!(
                    entry = relative,
                    "skipping a package entry that is not a plain file"
                );
                continue;
            }
            let permissions = unix_mode
                .map(|mode| mode & 0o7777)
                .filter(|mode| *mode != 0);
            add_parents(&mut directories, &relative);
            if is_dir {
                directories.insert(relative, permissions.unwrap_or(DEFAULT_DIRECTORY_MODE));
                continue;
            }
            let mut mode = permissions.unwrap_or(DEFAULT_FILE_MODE);
            if entry_point == Some(relative.as_str()) {
                mode |= 0o755;
            }
            files.push(PackageFile {
                index,
                path: format!("{TASK_DIR}/{relative}"),
                name: relative,
                mode,
                size: entry.size(),
            });
        }
        Ok(ZipPackage {
            directories: directories
                .into_iter()
                .map(|(relative, mode)| DirectoryToCreate {
                    path: format!("{TASK_DIR}/{relative}"),
                    mode,
                })
                .collect(),
            files,
            path,
        })
    }

    /// Where the zip is on the runner's machine.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directories the package creates, explicit or implied, parents first.
    pub fn directories(&self) -> &[DirectoryToCreate] {
        &self.directories
    }

    /// Whether the package has a plain file at `relative` (a path relative to [`TASK_DIR`],
    /// `./` allowed).
    pub fn contains_file(&self, relative: &str) -> bool {
        let path = format!("{TASK_DIR}/{}", relative.trim_start_matches("./"));
        self.files.iter().any(|file| file.path == path)
    }

    /// How many plain files the package puts in place.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The bytes its files hold together, as the zip declares them.
    pub fn unpacked_bytes(&self) -> u64 {
        self.files
            .iter()
            .fold(0, |sum, file| sum.saturating_add(file.size))
    }

    /// Hands every plain file to `put`, in the zip's order, with a reader that gives exactly
    /// its declared size. Blocking file IO.
    ///
    /// Fails with [`EngineError::InvalidPackage`] when an entry cannot be read or holds
    /// another size than it declares, with [`EngineError::LocalIo`] when the file cannot be
    /// read, and with [`EngineError::Failed`] when `put` itself failed.
    pub(crate) fn read_files(
        &self,
        mut put: impl FnMut(&PackageFile, &mut dyn Read) -> io::Result<()>,
    ) -> Result<(), EngineError> {
        let (mut archive, local_failure) = open_archive(&self.path)?;
        for file in &self.files {
            let entry = archive.by_index(file.index).map_err(|error| {
                package_error(
                    &self.path,
                    &local_failure,
                    format!("the entry {} cannot be read: {error}", file.name),
                )
            })?;
            if entry.size() != file.size {
                return Err(EngineError::InvalidPackage {
                    reason: format!("the zip changed since it was opened ({})", file.name),
                });
            }
            let mut contents = DeclaredSize::new(entry, &file.name, file.size);
            if let Err(error) = put(file, &mut contents) {
                if let Some(reason) = contents.failure.take() {
                    return Err(package_error(&self.path, &local_failure, reason));
                }
                return Err(EngineError::Failed {
                    message: format!("cannot put {} in place: {error}", file.path),
                });
            }
        }
        Ok(())
    }
}

/// Opens the zip at `path` with its OS errors watched.
fn open_archive(path: &Path) -> Result<(PackageArchive, LocalFailure), EngineError> {
    let file = File::open(path).map_err(|error| local_io(path, &error.to_string()))?;
    let local_failure = Rc::new(RefCell::new(None));
    let watched = Watched {
        inner: BufReader::new(file),
        failure: Rc::clone(&local_failure),
    };
    let archive = zip::ZipArchive::new(watched).map_err(|error| {
        package_error(
            path,
            &local_failure,
            format!("the zip cannot be read: {error}"),
        )
    })?;
    Ok((archive, local_failure))
}

/// The package's fault (`reason`), unless reading its file failed first: then the machine's.
fn package_error(path: &Path, local_failure: &LocalFailure, reason: String) -> EngineError {
    match local_failure.borrow_mut().take() {
        Some(message) => local_io(path, &message),
        None => EngineError::InvalidPackage { reason },
    }
}

fn local_io(path: &Path, message: &str) -> EngineError {
    EngineError::LocalIo {
        path: path.display().to_string(),
        message: message.to_owned(),
    }
}

/// Records every parent directory of `relative` that is not recorded yet.
fn add_parents(directories: &mut BTreeMap<String, u32>, relative: &str) {
    let mut end = 0;
    while let Some(slash) = relative[end..].find('/') {
        end += slash;
        directories
            .entry(relative[..end].to_owned())
            .or_insert(DEFAULT_DIRECTORY_MODE);
        end += 1;
    }
}

// === impl DeclaredSize ===

impl<R: Read> DeclaredSize<R> {
    fn new(inner: R, name: &str, declared: u64) -> Self {
        DeclaredSize {
            inner,
            name: name.to_owned(),
            declared,
            remaining: declared,
            failure: None,
        }
    }

    fn fail(&mut self, kind: io::ErrorKind, reason: String) -> io::Error {
        let error = io::Error::new(kind, reason.clone());
        self.failure = Some(reason);
        error
    }
}

impl<R: Read> Read for DeclaredSize<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        if self.remaining == 0 {
            // The declared size is all the archive announced: one byte more is a lie.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe) {
                Ok(0) => Ok(0),
                Ok(_) => Err(self.fail(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the entry {} holds more than the {} bytes it declares",
                        self.name, self.declared
                    ),
                )),
                Err(error) => Err(self.fail(
                    error.kind(),
                    format!("the entry {} cannot be read: {error}", self.name),
                )),
            };
        }
        let wanted = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        match self.inner.read(&mut buffer[..wanted]) {
            Ok(0) => Err(self.fail(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the entry {} holds {} bytes, fewer than the {} it declares",
                    self.name,
                    self.declared - self.remaining,
                    self.declared
                ),
            )),
            Ok(read) => {
                self.remaining -= read as u64;
                Ok(read)
            }
            Err(error) => Err(self.fail(
                error.kind(),
                format!("the entry {} cannot be read: {error}", self.name),
            )),
        }
    }
}

// === impl Watched ===

impl<R> Watched<R> {
    fn watch<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if let Err(error) = &result {
            self.failure
                .borrow_mut()
                .get_or_insert_with(|| error.to_string());
        }
        result
    }
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let result = self.inner.read(buffer);
        self.watch(result)
    }
}

impl<R: Seek> Seek for Watched<R> {
    fn seek(&mut self, position: SeekFrom) -> io::Result<u64> {
        let result = self.inner.seek(position);
        self.watch(result)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use zip::write::SimpleFileOptions;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Writes a zip with the given `(path, contents, unix mode)` entries to `path`; a path
    /// ending in `/` is a directory.
    pub(crate) fn write_zip(path: &Path, entries: &[(&str, &str, Option<u32>)]) -> io::Result<()> {
        let mut writer = zip::ZipWriter::new(File::create(path)?);
        for (name, contents, mode) in entries {
            let mut options = SimpleFileOptions::default();
            if let Some(mode) = mode {
                options = options.unix_permissions(*mode);
            }
            if name.ends_with('/') {
                writer.add_directory(*name, options)?;
            } else {
                writer.start_file(*name, options)?;
                writer.write_all(contents.as_bytes())?;
            }
        }
        writer.finish()?;
        Ok(())
    }

    /// The contents of every file `read_files` hands out, by container path.
    fn contents_of(package: &ZipPackage) -> Result<BTreeMap<String, Vec<u8>>, EngineError> {
        let mut seen = BTreeMap::new();
        package.read_files(|file, contents| {
            let mut bytes = Vec::new();
            contents.read_to_end(&mut bytes)?;
            seen.insert(file.path.clone(), bytes);
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn modes_are_kept_and_the_entry_point_is_executable() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("code.zip");
        write_zip(
            &path,
            &[
                ("hello.sh", "#!/bin/sh\necho hi\n", None),
                ("bin/", "", Some(0o750)),
                ("bin/tool", "x", Some(0o700)),
                ("lib/deep/data.txt", "d", Some(0o600)),
            ],
        )?;
        let package = ZipPackage::open(&path, Some("./hello.sh"))?;
        let modes: Vec<(&str, u32)> = package
            .files
            .iter()
            .map(|file| (file.path.as_str(), file.mode))
            .collect();
        assert_eq!(
            modes,
            vec![
                ("/mnt/task/hello.sh", 0o755),
                ("/mnt/task/bin/tool", 0o700),
                ("/mnt/task/lib/deep/data.txt", 0o600),
            ]
        );
        let directories: Vec<(&str, u32)> = package
            .directories()
            .iter()
            .map(|d| (d.path.as_str(), d.mode))
            .collect();
        assert_eq!(
            directories,
            vec![
                ("/mnt/task/bin", 0o750),
                ("/mnt/task/lib", 0o777),
                ("/mnt/task/lib/deep", 0o777)
            ]
        );
        assert!(package.contains_file("hello.sh") && package.contains_file("./bin/tool"));
        assert!(!package.contains_file("bin"));
        assert_eq!(package.unpacked_bytes(), 20);
        let contents = contents_of(&package)?;
        assert_eq!(contents["/mnt/task/hello.sh"], b"#!/bin/sh\necho hi\n");
        assert_eq!(contents["/mnt/task/lib/deep/data.txt"], b"d");
        Ok(())
    }

    #[test]
    fn links_and_unsafe_paths_are_skipped() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("code.zip");
        let mut writer = zip::ZipWriter::new(File::create(&path)?);
        writer.start_file("../escape.txt", SimpleFileOptions::default())?;
        writer.write_all(b"out")?;
        writer.add_symlink("link", "/etc/passwd", SimpleFileOptions::default())?;
        writer.start_file("kept.txt", SimpleFileOptions::default())?;
        writer.write_all(b"in")?;
        writer.finish()?;
        let package = ZipPackage::open(&path, None)?;
        assert_eq!(
            contents_of(&package)?.into_keys().collect::<Vec<_>>(),
            vec!["/mnt/task/kept.txt"]
        );
        Ok(())
    }

    #[test]
    fn a_file_that_is_no_zip_is_the_packages_fault_and_a_missing_one_the_machines() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("code.zip");
        std::fs::write(&path, "not a zip")?;
        assert!(matches!(
            ZipPackage::open(&path, None),
            Err(EngineError::InvalidPackage { .. })
        ));
        assert!(matches!(
            ZipPackage::open(dir.path().join("gone.zip"), None),
            Err(EngineError::LocalIo { .. })
        ));
        Ok(())
    }

    #[test]
    fn an_entry_longer_or_shorter_than_it_declares_stops_the_reading() -> TestResult {
        let dir = tempfile::tempdir()?;
        for declared in [10, 1000] {
            let path = dir.path().join(format!("lying-{declared}.zip"));
            crate::conformance::write_lying_zip(&path, declared)?;
            let package = ZipPackage::open(&path, None)?;
            assert_eq!(package.unpacked_bytes(), u64::from(declared));
            // The zip reader may notice first, or the declared size: either way it stops.
            match contents_of(&package) {
                Err(EngineError::InvalidPackage { reason }) => {
                    assert!(reason.contains("data.bin"), "{declared}: {reason}")
                }
                other => panic!("{declared}: expected an invalid package, got {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn the_declared_size_is_read_exactly_or_not_at_all() {
        let read = |declared: u64| {
            let mut reader = DeclaredSize::new(&b"0123456789"[..], "data.bin", declared);
            let copied = io::copy(&mut reader, &mut io::sink());
            (copied.ok(), reader.failure)
        };
        assert_eq!(read(10), (Some(10), None));
        let (copied, failure) = read(4);
        assert_eq!(copied, None);
        assert!(failure.is_some_and(|why| why.contains("more than the 4 bytes")));
        let (copied, failure) = read(12);
        assert_eq!(copied, None);
        assert!(failure.is_some_and(|why| why.contains("holds 10 bytes, fewer than the 12")));
    }
}
