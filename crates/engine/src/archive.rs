//! Tar archives for the engine's archive APIs: the files uploaded into a created container,
//! and the root filesystem of an imported image.
//!
//! Everything is built in memory: task files are small (payload, config, a code package), and
//! the local busybox rootfs is about 2 MB.

use crate::error::EngineError;
use crate::spec::{ContainerSpec, normalized};

/// Builds archives entry by entry. Entry paths are given as absolute container paths and
/// stored relative to `/`, which is where the archive is extracted.
pub(crate) struct ArchiveBuilder {
    builder: tar::Builder<Vec<u8>>,
    mtime: u64,
}

// === impl ArchiveBuilder ===

impl ArchiveBuilder {
    /// An empty archive whose entries carry `mtime` (seconds since the epoch).
    pub(crate) fn new(mtime: u64) -> Self {
        ArchiveBuilder {
            builder: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    /// A directory owned by root with `mode`.
    pub(crate) fn directory(&mut self, path: &str, mode: u32) -> Result<(), EngineError> {
        let mut header = self.header(tar::EntryType::Directory, mode, 0);
        self.append(&mut header, &format!("{}/", normalized(path)), &[][..])
    }

    /// A regular file owned by root with `mode`.
    pub(crate) fn file(
        &mut self,
        path: &str,
        mode: u32,
        contents: &[u8],
    ) -> Result<(), EngineError> {
        let size = u64::try_from(contents.len()).map_err(EngineError::invalid_spec)?;
        let mut header = self.header(tar::EntryType::Regular, mode, size);
        self.append(&mut header, &normalized(path), contents)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> Result<(), EngineError> {
        let mut header = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut header, normalized(path), target)
            .map_err(archive_error)
    }

    /// The finished archive.
    pub(crate) fn finish(self) -> Result<Vec<u8>, EngineError> {
        self.builder.into_inner().map_err(archive_error)
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.mtime);
        header
    }

    fn append(
        &mut self,
        header: &mut tar::Header,
        path: &str,
        contents: &[u8],
    ) -> Result<(), EngineError> {
        self.builder
            .append_data(header, path, contents)
            .map_err(archive_error)
    }
}

/// The archive uploaded into a created container: its directories first (so a file inside one
/// lands in a directory with the requested mode), then its files.
pub(crate) fn task_files_archive(spec: &ContainerSpec, mtime: u64) -> Result<Vec<u8>, EngineError> {
    let mut archive = ArchiveBuilder::new(mtime);
    for directory in spec.effective_directories() {
        archive.directory(&directory.path, directory.mode)?;
    }
    for file in &spec.files {
        archive.file(&file.path, file.mode, &file.contents)?;
    }
    archive.finish()
}

fn archive_error(error: std::io::Error) -> EngineError {
    // Writing into a Vec cannot fail for IO reasons; what fails is an entry the tar format
    // cannot hold (a path too long even for GNU long names), which is the spec's fault.
    EngineError::invalid_spec(format!("cannot build the upload archive: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DirectoryToCreate, FileToUpload};
    use std::io::Read;

    #[test]
    fn the_task_archive_holds_directories_then_files_with_modes()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut spec = ContainerSpec::new("img");
        spec.directories.push(DirectoryToCreate {
            path: "/srv/data".into(),
            mode: 0o750,
        });
        spec.files.push(FileToUpload {
            path: "/mnt/.task_payload".into(),
            contents: b"{\"n\":1}".to_vec(),
            mode: 0o644,
        });
        let bytes = task_files_archive(&spec, 1_700_000_000)?;

        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            let mode = entry.header().mode()?;
            let mut contents = String::new();
            entry.read_to_string(&mut contents)?;
            seen.push((path, mode, contents));
        }
        assert_eq!(
            seen,
            vec![
                ("mnt/task/".to_owned(), 0o777, String::new()),
                ("srv/data/".to_owned(), 0o750, String::new()),
                (
                    "mnt/.task_payload".to_owned(),
                    0o644,
                    "{\"n\":1}".to_owned()
                ),
            ]
        );
        Ok(())
    }
}
