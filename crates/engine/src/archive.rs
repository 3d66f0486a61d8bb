//! Tar archives for the engine's archive APIs: the files uploaded into a created container,
//! the root filesystem of an imported image, and the machinery that streams an archive to the
//! engine as it is written ([`stream_archive`]).
//!
//! An archive that can be large is never held whole: a task's archive (its code package
//! unpacked entry by entry) and a build context are written on a blocking thread into a
//! bounded channel that a streaming request body reads, so what is held per upload is a few
//! chunks. The local busybox rootfs (about 2 MB) is built in memory.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::error::EngineError;
use crate::spec::{ContainerSpec, normalized};

/// How much of an archive is handed to the engine at once.
const CHUNK_BYTES: usize = 256 << 10;

/// Chunks written ahead of what the engine has read.
const CHANNEL_CHUNKS: usize = 4;

/// Builds archives entry by entry into `W`. Entry paths are given as absolute container paths
/// and stored relative to `/`, which is where the archive is extracted.
pub(crate) struct ArchiveBuilder<W: Write> {
    builder: tar::Builder<W>,
    mtime: u64,
}

/// Writes an archive into a channel, one chunk at a time, for a request body to read.
pub(crate) struct ChannelWriter {
    sender: mpsc::Sender<Result<Bytes, io::Error>>,
    buffer: Vec<u8>,
}

/// Where the thread writing a streamed archive leaves its failure: the request that read the
/// body only sees it broken off.
#[derive(Debug, Clone, Default)]
pub(crate) struct ArchiveFailure(Arc<Mutex<Option<EngineError>>>);

// === impl ArchiveBuilder ===

impl<W: Write> ArchiveBuilder<W> {
    /// An empty archive written into `out`, whose entries carry `mtime` (seconds since the
    /// epoch).
    pub(crate) fn new(out: W, mtime: u64) -> Self {
        ArchiveBuilder {
            builder: tar::Builder::new(out),
            mtime,
        }
    }

    /// A directory owned by root with `mode`.
    pub(crate) fn directory(&mut self, path: &str, mode: u32) -> Result<(), EngineError> {
        let mut header = self.header(tar::EntryType::Directory, mode, 0);
        self.builder
            .append_data(&mut header, format!("{}/", normalized(path)), io::empty())
            .map_err(archive_error)
    }

    /// A regular file owned by root with `mode`.
    pub(crate) fn file(
        &mut self,
        path: &str,
        mode: u32,
        contents: &[u8],
    ) -> Result<(), EngineError> {
        let size = u64::try_from(contents.len()).map_err(EngineError::invalid_spec)?;
        self.file_from(path, mode, size, &mut &contents[..])
            .map_err(archive_error)
    }

    /// A regular file owned by root with `mode`, of `size` bytes read from `contents`, which
    /// must give exactly that many (the header announces them); the IO error is the caller's
    /// to classify, as it may be the reader's or the writer's.
    pub(crate) fn file_from(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()> {
        let mut header = self.header(tar::EntryType::Regular, mode, size);
        self.builder
            .append_data(&mut header, normalized(path), contents)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> Result<(), EngineError> {
        let mut header = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut header, normalized(path), target)
            .map_err(archive_error)
    }

    /// The finished archive's writer, the end-of-archive marker written.
    pub(crate) fn finish(self) -> Result<W, EngineError> {
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
}

/// Writes the archive uploaded into a created container into `out`: its directories first
/// (so a file inside one lands in a directory with the requested mode), then its files, then
/// the files of its code package, read from the zip one entry at a time.
pub(crate) fn write_task_archive<W: Write>(
    spec: &ContainerSpec,
    mtime: u64,
    out: W,
) -> Result<W, EngineError> {
    let mut archive = ArchiveBuilder::new(out, mtime);
    for directory in spec.effective_directories() {
        archive.directory(&directory.path, directory.mode)?;
    }
    for file in &spec.files {
        archive.file(&file.path, file.mode, &file.contents)?;
    }
    if let Some(package) = &spec.package {
        package.read_files(|file, contents| {
            archive.file_from(&file.path, file.mode, file.size, contents)
        })?;
    }
    archive.finish()
}

/// Streams the archive that `write` writes, from a blocking thread, in chunks, as a request
/// body: at most a few chunks are ever held, however large the archive.
///
/// When `write` fails the body ends with an error, which breaks the request off (the engine
/// never sees the archive's end, so it cannot take a cut-off archive for a whole one); the
/// returned [`ArchiveFailure`] then holds the real reason. A body nobody reads any more (the
/// request ended) stops the thread.
pub(crate) fn stream_archive<F>(
    write: F,
) -> (
    impl futures::Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
    ArchiveFailure,
)
where
    F: FnOnce(ChannelWriter) -> Result<ChannelWriter, EngineError> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    let failure = ArchiveFailure::default();
    let slot = failure.clone();
    tokio::task::spawn_blocking(move || {
        let written = write(ChannelWriter::new(sender.clone())).and_then(|mut writer| {
            writer.flush().map_err(|error| EngineError::Failed {
                message: format!("cannot hand the archive's end to the engine: {error}"),
            })
        });
        if let Err(error) = written {
            if sender.is_closed() {
                // The request ended first; its own outcome is the one to report.
                return;
            }
            let message = error.to_string();
            slot.set(error);
            let _ = sender.blocking_send(Err(io::Error::other(message)));
        }
    });
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    (body, failure)
}

fn archive_error(error: io::Error) -> EngineError {
    // Writing into memory cannot fail for IO reasons, and into a channel only when its reader
    // went away (whose own outcome is then reported); what fails is an entry the tar format
    // cannot hold (a path too long even for GNU long names), which is the spec's fault.
    EngineError::invalid_spec(format!("cannot build the upload archive: {error}"))
}

// === impl ArchiveFailure ===

impl ArchiveFailure {
    fn set(&self, error: EngineError) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
    }

    /// The archive's failure, if writing it failed.
    pub(crate) fn take(&self) -> Option<EngineError> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

// === impl ChannelWriter ===

impl ChannelWriter {
    /// A writer that hands chunks to `sender`.
    fn new(sender: mpsc::Sender<Result<Bytes, io::Error>>) -> Self {
        ChannelWriter {
            sender,
            buffer: Vec::with_capacity(CHUNK_BYTES),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        self.sender
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
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
        let bytes = write_task_archive(&spec, 1_700_000_000, Vec::new())?;

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
