//! Code packages on their way into a container, spooled to the runner's work directory
//! ([`RunnerConfig::work_dir`](crate::RunnerConfig::work_dir)): a download is written to a
//! file chunk by chunk, never held whole, and checked against the size its source announced;
//! the engine then reads the zip from that file one entry at a time.
//!
//! A spooled file goes when its attempt ends, however it ends (it is deleted when dropped),
//! and at the runner's start what an earlier life left (a killed process) is removed. Each
//! runner spools into a directory of its own, named after its id, and every spooled file is
//! locked while it is in use, so the start-up cleanup never takes a file that a live process
//! holds (two runners of one id on one machine, as tests run them).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::error::SourceError;
use crate::source::PackageDownload;

/// A runner's directory of spooled packages.
#[derive(Debug, Clone)]
pub(crate) struct PackageSpool {
    dir: PathBuf,
}

/// One package spooled to a file, locked while it exists and deleted when dropped.
#[derive(Debug)]
pub(crate) struct SpooledPackage {
    file: tempfile::NamedTempFile,
}

/// Why a download could not be spooled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    /// The source failed while the package arrived.
    #[error("{0}")]
    Download(#[source] SourceError),
    /// More or fewer bytes arrived than the source announced.
    #[error("the package was announced as {announced} bytes but {arrived} arrived")]
    Size { announced: u64, arrived: String },
    /// The work directory cannot take the package.
    #[error("cannot write the package to {dir}: {source}")]
    Write {
        dir: String,
        #[source]
        source: io::Error,
    },
}

/// How spooled files start and end, so the start-up cleanup takes nothing else.
const FILE_PREFIX: &str = "package-";
const FILE_SUFFIX: &str = ".zip";

// === impl PackageSpool ===

impl PackageSpool {
    /// The spool of the runner `runner_id` under `work_dir`, created if need be, with what an
    /// earlier life of the runner left in it removed.
    pub(crate) async fn open(work_dir: &Path, runner_id: &str) -> io::Result<Self> {
        let dir = work_dir.join(format!("runner-{}", crate::container::name_safe(runner_id)));
        let spool = PackageSpool { dir };
        let cleaning = spool.clone();
        let removed = tokio::task::spawn_blocking(move || cleaning.remove_leftovers())
            .await
            .map_err(io::Error::other)??;
        if removed > 0 {
            tracing::info!(removed, dir = %spool.dir.display(), "removed packages an earlier life of the runner left");
        }
        Ok(spool)
    }

    /// Writes `download` to a file of its own, checking it against its announced size; never
    /// more than a chunk of it is held.
    pub(crate) async fn receive(
        &self,
        download: PackageDownload,
        task_id: &str,
    ) -> Result<SpooledPackage, SpoolError> {
        let write_failed = |source: io::Error| SpoolError::Write {
            dir: self.dir.display().to_string(),
            source,
        };
        // Made sure of every time: the runner's stop removes the directory when it is empty.
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(write_failed)?;
        let file = tempfile::Builder::new()
            .prefix(&format!(
                "{FILE_PREFIX}{}-",
                crate::container::name_safe(task_id)
            ))
            .suffix(FILE_SUFFIX)
            .tempfile_in(&self.dir)
            .map_err(write_failed)?;
        file.as_file()
            .try_lock()
            .map_err(io::Error::from)
            .map_err(write_failed)?;
        let spooled = SpooledPackage { file };
        let mut writer =
            tokio::fs::File::from_std(spooled.file.as_file().try_clone().map_err(write_failed)?);
        let announced = download.size;
        let mut arrived: u64 = 0;
        let mut chunks = download.chunks;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(SpoolError::Download)?;
            arrived = arrived.saturating_add(chunk.len() as u64);
            if arrived > announced {
                return Err(SpoolError::Size {
                    announced,
                    arrived: format!("more than {announced}"),
                });
            }
            writer.write_all(&chunk).await.map_err(write_failed)?;
        }
        if arrived != announced {
            return Err(SpoolError::Size {
                announced,
                arrived: arrived.to_string(),
            });
        }
        // Waits for the last write: the engine reads the file next.
        writer.flush().await.map_err(write_failed)?;
        Ok(spooled)
    }

    /// Removes the spool's directory when it is empty: a runner that stops leaves nothing.
    pub(crate) fn close(&self) {
        if let Err(error) = std::fs::remove_dir(&self.dir)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::debug!(%error, dir = %self.dir.display(), "the package spool stays");
        }
    }

    /// Creates the directory and removes the spooled files no live process holds. Blocking.
    fn remove_leftovers(&self) -> io::Result<usize> {
        std::fs::create_dir_all(&self.dir)?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !is_spooled_name(&name) || !entry.file_type()?.is_file() {
                continue;
            }
            let path = entry.path();
            let Ok(file) = File::open(&path) else {
                continue;
            };
            // Held by a live attempt (of another runner of the same id): not a leftover.
            if file.try_lock().is_err() {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        Ok(removed)
    }
}

fn is_spooled_name(name: &OsStr) -> bool {
    name.to_str()
        .is_some_and(|name| name.starts_with(FILE_PREFIX) && name.ends_with(FILE_SUFFIX))
}

// === impl SpooledPackage ===

impl SpooledPackage {
    /// Where the package is.
    pub(crate) fn path(&self) -> &Path {
        self.file.path()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::stream;

    use super::*;

    fn download(size: u64, chunks: &[&'static [u8]]) -> PackageDownload {
        let chunks: Vec<Result<Bytes, SourceError>> = chunks
            .iter()
            .map(|chunk| Ok(Bytes::from_static(chunk)))
            .collect();
        PackageDownload {
            size,
            chunks: stream::iter(chunks).boxed(),
        }
    }

    #[tokio::test]
    async fn a_download_is_spooled_whole_and_removed_when_dropped() {
        let work = tempfile::tempdir().unwrap();
        let spool = PackageSpool::open(work.path(), "r/1").await.unwrap();
        let spooled = spool
            .receive(download(6, &[b"abc", b"def"]), "t1")
            .await
            .unwrap();
        let path = spooled.path().to_owned();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
        assert!(path.starts_with(work.path().join("runner-r-1")));
        drop(spooled);
        assert!(!path.exists());
        spool.close();
        assert!(!work.path().join("runner-r-1").exists());
    }

    #[tokio::test]
    async fn too_few_or_too_many_bytes_fail_the_download_and_leave_nothing() {
        let work = tempfile::tempdir().unwrap();
        let spool = PackageSpool::open(work.path(), "r1").await.unwrap();
        let chunks: &[&'static [u8]] = &[b"abc", b"def"];
        for size in [7, 5] {
            match spool.receive(download(size, chunks), "t1").await {
                Err(SpoolError::Size { announced, .. }) => assert_eq!(announced, size),
                other => panic!("{size}: {other:?}"),
            }
        }
        let broken = PackageDownload {
            size: 6,
            chunks: stream::iter(vec![
                Ok(Bytes::from_static(b"abc")),
                Err(SourceError::Unavailable {
                    message: "cut off".into(),
                }),
            ])
            .boxed(),
        };
        assert!(matches!(
            spool.receive(broken, "t1").await,
            Err(SpoolError::Download(_))
        ));
        let left: Vec<_> = std::fs::read_dir(work.path().join("runner-r1"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn leftovers_are_removed_at_start_but_not_a_package_in_use() {
        let work = tempfile::tempdir().unwrap();
        let spool = PackageSpool::open(work.path(), "r1").await.unwrap();
        let in_use = spool.receive(download(3, &[b"abc"]), "t1").await.unwrap();
        let dir = work.path().join("runner-r1");
        let leftover = dir.join("package-t0-abc.zip");
        std::fs::write(&leftover, b"from a killed life").unwrap();
        let not_ours = dir.join("notes.txt");
        std::fs::write(&not_ours, b"keep").unwrap();

        PackageSpool::open(work.path(), "r1").await.unwrap();
        assert!(!leftover.exists());
        assert!(in_use.path().exists(), "a package in use was removed");
        assert!(not_ours.exists());
    }
}
