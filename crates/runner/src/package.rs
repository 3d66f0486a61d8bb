//! Unpacking a code's zip package into the files and directories uploaded into its
//! container under `TASK_DIR`.
//!
//! The server checked the package completely when it was pushed (relative paths, no `..`, no
//! links, a bounded unpacked size), so nothing new is refused here; entries that are not
//! plain files or directories are skipped with a warning rather than trusted.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use stevedore_engine::{DirectoryToCreate, FileToUpload, TASK_DIR};

/// A package unpacked for upload.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct UnpackedPackage {
    pub directories: Vec<DirectoryToCreate>,
    pub files: Vec<FileToUpload>,
}

/// Why a package could not be unpacked: the zip itself is unreadable.
#[derive(Debug, thiserror::Error)]
#[error("the code package cannot be read as a zip: {0}")]
pub(crate) struct PackageError(String);

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// Files without a recorded unix mode (zips made on Windows) get this one.
const DEFAULT_FILE_MODE: u32 = 0o644;
/// Directories without a recorded mode are writable by any user, like `TASK_DIR` itself.
const DEFAULT_DIRECTORY_MODE: u32 = 0o777;

/// Unpacks `zip` under `TASK_DIR`. `entry_point` (a runtime code's `file_name`) is made
/// executable whatever the zip recorded, so a `#!/bin/sh` script zipped without modes still
/// runs.
pub(crate) fn unpack(
    zip: &[u8],
    entry_point: Option<&str>,
) -> Result<UnpackedPackage, PackageError> {
    let mut archive =
        zip::ZipArchive::new(Cursor::new(zip)).map_err(|error| PackageError(error.to_string()))?;
    // Every directory that holds something, explicit or implied, with its mode: listing the
    // implied ones too keeps them writable instead of the engine's root-owned 0755.
    let mut directories: BTreeMap<String, u32> = BTreeMap::new();
    let mut files = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|error| PackageError(error.to_string()))?;
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
        let mut contents = Vec::new();
        entry
            .read_to_end(&mut contents)
            .map_err(|error| PackageError(error.to_string()))?;
        let mut mode = permissions.unwrap_or(DEFAULT_FILE_MODE);
        if entry_point.is_some_and(|entry_point| relative == entry_point.trim_start_matches("./")) {
            mode |= 0o755;
        }
        files.push(FileToUpload {
            path: format!("{TASK_DIR}/{relative}"),
            contents,
            mode,
        });
    }
    Ok(UnpackedPackage {
        directories: directories
            .into_iter()
            .map(|(path, mode)| DirectoryToCreate {
                path: format!("{TASK_DIR}/{path}"),
                mode,
            })
            .collect(),
        files,
    })
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

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use zip::write::SimpleFileOptions;

    use super::*;

    /// A zip with the given `(path, contents, unix mode)` entries; a path ending in `/` is a
    /// directory.
    pub(crate) fn zip_of(entries: &[(&str, &str, Option<u32>)]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (path, contents, mode) in entries {
            let mut options = SimpleFileOptions::default();
            if let Some(mode) = mode {
                options = options.unix_permissions(*mode);
            }
            if path.ends_with('/') {
                writer.add_directory(*path, options).unwrap();
            } else {
                writer.start_file(*path, options).unwrap();
                writer.write_all(contents.as_bytes()).unwrap();
            }
        }
        writer.finish().unwrap().into_inner()
    }

    #[test]
    fn modes_are_kept_and_the_entry_point_is_executable() {
        let zip = zip_of(&[
            ("hello.sh", "#!/bin/sh\necho hi\n", None),
            ("bin/", "", Some(0o750)),
            ("bin/tool", "x", Some(0o700)),
            ("lib/deep/data.txt", "d", Some(0o600)),
        ]);
        let unpacked = unpack(&zip, Some("hello.sh")).unwrap();
        let file = |path: &str| {
            unpacked
                .files
                .iter()
                .find(|file| file.path == path)
                .unwrap()
        };
        assert_eq!(file("/mnt/task/hello.sh").mode & 0o755, 0o755);
        assert_eq!(file("/mnt/task/hello.sh").contents, b"#!/bin/sh\necho hi\n");
        assert_eq!(file("/mnt/task/bin/tool").mode, 0o700);
        assert_eq!(file("/mnt/task/lib/deep/data.txt").mode, 0o600);
        let directories: Vec<(&str, u32)> = unpacked
            .directories
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
    }

    #[test]
    fn a_broken_zip_is_an_error() {
        assert!(unpack(b"not a zip", Some("x")).is_err());
    }
}
