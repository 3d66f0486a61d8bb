//! Code packages: stored once per checksum, in chunks, read and written chunk by chunk so that
//! nobody holds a whole package.
//!
//! ```text
//! packages        sha256 → size, blob        a package, once per checksum, whole
//! package_blobs   id → loose_until           the bytes of one write; loose (no package names it)
//!                                            while being written and after being pruned
//! package_chunks  (blob, seq) → bytes        about 1 MiB each, in order
//! code_revisions  stored_package → packages  what a revision holds now (NULL once pruned);
//!                                            package_sha256 and package_size keep what was pushed
//! ```
//!
//! A write ([`write_blob`]) goes into a blob of its own, one chunk per statement, before the
//! revision's transaction: content-addressed bytes are harmless until referenced, and on
//! SQLite the one writer is never held longer than one chunk's insert. The revision's
//! transaction then publishes the blob as the package of its checksum (or finds that package
//! already stored and lets its own blob go) and references it: a half-written package is
//! never any revision's. A blob still loose an hour after its write began is given up: its
//! write can no longer publish it nor add to it, and pruning deletes its chunks. The hour is
//! the database's clock, written and compared by the database alike, so servers whose clocks
//! disagree still agree on it.
//!
//! Pruning ([`prune`]) drops the packages of old revisions, deletes the packages no revision
//! holds any more and then the chunks of loose blobs whose time has come, each step in short
//! transactions of its own.

pub(crate) mod prune;

use std::fmt;
use std::io::Read;
use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::{Result, StoreError};

pub(crate) use prune::prune;

/// A package read chunk by chunk, in order. The stream ends after `size` bytes; a store that
/// finds fewer or more ends it with an error instead.
pub struct PackageStream {
    /// The package's length in bytes, as recorded when it was pushed.
    pub size: u64,
    /// The package's bytes.
    pub chunks: BoxStream<'static, Result<Bytes>>,
}

/// A package spooled in a file by the caller, to be stored with a new revision. The store
/// reads it chunk by chunk, checks it against `sha256` and `size` as it goes, and stores it
/// under `sha256` unless a package with that checksum is stored already (then it reads
/// nothing). The file must stay as it is until `push_code` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageFile {
    pub path: PathBuf,
    /// The file's SHA-256, lowercase hex.
    pub sha256: String,
    pub size: u64,
}

/// The package a new revision holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevisionPackage<'a> {
    /// A package in a file: stored unless its checksum is stored already.
    File(&'a PackageFile),
    /// A package a live revision of the same project holds already, by checksum: an options
    /// update keeps its code's package this way, storing and reading nothing.
    /// `StoreError::NotFound` when the project holds no such package.
    Stored { sha256: &'a str },
}

/// What one `Store::prune_packages` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackagePrune {
    /// Revisions whose package reference was dropped.
    pub revisions: u64,
    /// Packages deleted because no revision held them any more.
    pub packages: u64,
    /// The deleted packages' bytes.
    pub bytes: u64,
}

/// The size of the chunks a package is stored in (the last one may be shorter).
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

/// How long a blob may take to be written before it is given up, in microseconds.
pub(crate) const WRITE_GRACE_MICROS: i64 = 60 * 60 * 1_000_000;

/// What the shared package logic asks of a backend. Every method is one short transaction
/// (or a read), so that a package's bytes never hold a writer for long.
#[async_trait]
pub(crate) trait BlobTables: Send + Sync {
    /// A new blob, loose: given up `WRITE_GRACE_MICROS` from now unless published before.
    async fn begin_blob(&self) -> Result<i64>;
    /// Adds chunk `seq` to a blob being written; `StoreError::PackageFile` when the blob was
    /// given up (its write took too long).
    async fn put_chunk(&self, blob: i64, seq: i64, bytes: Vec<u8>) -> Result<()>;
    /// Gives a loose blob up now: pruning deletes its chunks.
    async fn give_up_blob(&self, blob: i64) -> Result<()>;
    /// Whether a package with this checksum is stored. A read: the revision's transaction
    /// looks again.
    async fn is_stored(&self, sha256: &str) -> Result<bool>;
    /// Refuses (`StoreError::QuotaExceeded`, `NotFound` for an unknown project) a package the
    /// project's package-bytes quota has no room for, before its bytes are written. A read:
    /// the revision's transaction checks again.
    async fn check_room(&self, project_id: &str, sha256: &str, size: u64) -> Result<()>;
}

/// The columns of the package a revision holds, for a query that joins `packages AS p` on
/// `r.stored_package` (read back into a `HeldRow`).
macro_rules! held_columns {
    () => {
        "p.size AS held_size, p.blob AS held_blob"
    };
}
pub(crate) use held_columns;

/// A revision's package as a read finds it: what was pushed, and what it holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldRow {
    /// The code's name, for the message of a pruned package.
    pub(crate) code: String,
    pub(crate) rev: i64,
    /// `package_sha256`: the revision was pushed with a package.
    pub(crate) recorded: Option<String>,
    /// The package's size and blob, while the revision holds it.
    pub(crate) stored: Option<(i64, i64)>,
}

// === impl PackageStream ===

impl PackageStream {
    /// The package of `size` bytes whose chunks `read` fetches by number, one at a time as the
    /// stream is polled: the memory held is one chunk. A chunk missing before `size` bytes,
    /// an empty one, one that goes past `size`, or one more after it, ends the stream with
    /// `StoreError::Corrupt`.
    pub(crate) fn chunked<F, Fut>(size: u64, read: F) -> Self
    where
        F: FnMut(i64) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<Vec<u8>>>> + Send + 'static,
    {
        let corrupt = move |what: String| {
            StoreError::Corrupt(format!("a package recorded as {size} bytes: {what}"))
        };
        let chunks = stream::try_unfold(
            (0_i64, 0_u64, read),
            move |(seq, read_so_far, mut read)| async move {
                if read_so_far == size {
                    // The total is right only if nothing follows.
                    return match read(seq).await? {
                        None => Ok(None),
                        Some(_) => Err(corrupt(format!("chunk {seq} follows its last byte"))),
                    };
                }
                let bytes = read(seq)
                    .await?
                    .ok_or_else(|| corrupt(format!("chunk {seq} is missing")))?;
                let read_now = read_so_far + bytes.len() as u64;
                if bytes.is_empty() || read_now > size {
                    return Err(corrupt(format!(
                        "chunk {seq} of {} bytes ends at byte {read_now}",
                        bytes.len()
                    )));
                }
                Ok(Some((Bytes::from(bytes), (seq + 1, read_now, read))))
            },
        );
        PackageStream {
            size,
            chunks: chunks.boxed(),
        }
    }

    /// Every chunk gathered into one buffer: for tests and small packages only.
    pub async fn into_bytes(self) -> Result<Vec<u8>> {
        let expected = self.size;
        let bytes: Vec<u8> = self
            .chunks
            .try_fold(Vec::new(), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await?;
        if bytes.len() as u64 != expected {
            return Err(StoreError::Corrupt(format!(
                "a package recorded as {expected} bytes has {}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

impl fmt::Debug for PackageStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackageStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

// === impl HeldRow ===

impl HeldRow {
    /// The package's size and blob: `NotFound` for a revision pushed without one,
    /// `PackageRemoved` for one whose package was pruned.
    pub(crate) fn package(self) -> Result<(u64, i64)> {
        let rev = crate::convert::unsigned::<u32>("code_revisions.rev", self.rev)?;
        if self.recorded.is_none() {
            return Err(StoreError::not_found(format!(
                "package of code {} revision {rev}",
                self.code
            )));
        }
        let (size, blob) = self.stored.ok_or(StoreError::PackageRemoved {
            code: self.code,
            rev,
        })?;
        Ok((crate::convert::unsigned("packages.size", size)?, blob))
    }
}

// === impl PackageFile ===

impl PackageFile {
    /// Describes the file at `path`: its size and SHA-256, read on a blocking thread.
    pub async fn describe(path: impl Into<PathBuf>) -> Result<PackageFile> {
        let path = path.into();
        tokio::task::spawn_blocking(move || {
            let unreadable = |error: std::io::Error| {
                StoreError::PackageFile(format!("{}: {error}", path.display()))
            };
            let mut file = std::fs::File::open(&path).map_err(unreadable)?;
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            let mut buffer = vec![0; 64 * 1024];
            loop {
                let read = file.read(&mut buffer).map_err(unreadable)?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
                size += read as u64;
            }
            Ok(PackageFile {
                sha256: hex::encode(hasher.finalize()),
                size,
                path,
            })
        })
        .await
        .map_err(|error| StoreError::PackageFile(format!("describing a package failed: {error}")))?
    }
}

/// `Store::push_code` around a backend's revision transaction (`revision`, handed the blob
/// written for it, if any): a new package's bytes are written first, unless its checksum is
/// stored already, and written after all when the transaction finds that package pruned
/// meanwhile (`revision` answers `None`). A blob left unused by a failed push is given up.
pub(crate) async fn push_with<'a, T>(
    tables: &impl BlobTables,
    project_id: &str,
    package: Option<RevisionPackage<'_>>,
    mut revision: impl FnMut(Option<i64>) -> BoxFuture<'a, Result<Option<T>>> + Send,
) -> Result<T> {
    let file = match package {
        Some(RevisionPackage::File(file)) => Some(file),
        _ => None,
    };
    let mut blob = None;
    if let Some(file) = file
        && !tables.is_stored(&file.sha256).await?
    {
        tables
            .check_room(project_id, &file.sha256, file.size)
            .await?;
        blob = Some(write_blob(tables, file).await?);
    }
    loop {
        match revision(blob).await {
            Ok(Some(pushed)) => return Ok(pushed),
            Ok(None) => match (file, blob) {
                (Some(file), None) => blob = Some(write_blob(tables, file).await?),
                (_, blob) => {
                    if let Some(blob) = blob {
                        give_up(tables, blob).await;
                    }
                    return Err(StoreError::Corrupt(
                        "a push found its package neither stored nor written".to_owned(),
                    ));
                }
            },
            Err(error) => {
                if let Some(blob) = blob {
                    give_up(tables, blob).await;
                }
                return Err(error);
            }
        }
    }
}

/// Writes `file` into a new blob, chunk by chunk, checking its size and checksum as it goes;
/// returns the blob, loose until the revision's transaction publishes it. A failed write gives
/// its blob up; one interrupted (a caller dropped, a crash) leaves it to be given up after
/// `WRITE_GRACE_MICROS`.
pub(crate) async fn write_blob(tables: &impl BlobTables, file: &PackageFile) -> Result<i64> {
    let blob = tables.begin_blob().await?;
    match copy_chunks(tables, blob, file).await {
        Ok(()) => Ok(blob),
        Err(error) => {
            give_up(tables, blob).await;
            Err(error)
        }
    }
}

/// Gives a blob up, logging rather than failing: what is left over is pruned in time anyway.
pub(crate) async fn give_up(tables: &impl BlobTables, blob: i64) {
    if let Err(error) = tables.give_up_blob(blob).await {
        tracing::warn!(%error, blob, "giving up an unused package blob failed; pruning removes it later");
    }
}

async fn copy_chunks(tables: &impl BlobTables, blob: i64, file: &PackageFile) -> Result<()> {
    let unreadable = |error: std::io::Error| {
        StoreError::PackageFile(format!("{}: {error}", file.path.display()))
    };
    let path = file.path.clone();
    let mut source = blocking(move || std::fs::File::open(path))
        .await?
        .map_err(unreadable)?;
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let mut seq = 0_i64;
    loop {
        // Reading and hashing a chunk is blocking work: off the async executor.
        let chunk;
        (source, hasher, chunk) = blocking(move || {
            let mut chunk = Vec::with_capacity(CHUNK_BYTES);
            (&mut source)
                .take(CHUNK_BYTES as u64)
                .read_to_end(&mut chunk)?;
            hasher.update(&chunk);
            Ok((source, hasher, chunk))
        })
        .await?
        .map_err(unreadable)?;
        if chunk.is_empty() {
            break;
        }
        written += chunk.len() as u64;
        if written > file.size {
            return Err(StoreError::PackageFile(format!(
                "{} holds more than the {} bytes it was described with",
                file.path.display(),
                file.size
            )));
        }
        tables.put_chunk(blob, seq, chunk).await?;
        seq += 1;
    }
    let sha256 = hex::encode(hasher.finalize());
    if written != file.size || sha256 != file.sha256 {
        return Err(StoreError::PackageFile(format!(
            "{} holds {written} bytes with SHA-256 {sha256}, not {} bytes with {}",
            file.path.display(),
            file.size,
            file.sha256
        )));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StoreError::PackageFile(format!("reading a package failed: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream over `chunks` as a store would read them, by number.
    fn stream_of(size: u64, chunks: &[&[u8]]) -> PackageStream {
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|chunk| chunk.to_vec()).collect();
        PackageStream::chunked(size, move |seq| {
            let chunk = usize::try_from(seq)
                .ok()
                .and_then(|at| chunks.get(at).cloned());
            async move { Ok(chunk) }
        })
    }

    #[tokio::test]
    async fn chunks_are_read_one_at_a_time_and_checked_against_the_size() {
        let read = stream_of(5, &[b"abc", b"de"]);
        let chunks: Vec<Bytes> = read.chunks.try_collect().await.unwrap();
        assert_eq!(chunks, [Bytes::from("abc"), Bytes::from("de")]);
        assert!(stream_of(0, &[]).into_bytes().await.unwrap().is_empty());

        for (size, chunks, why) in [
            (6, &[&b"abc"[..], b"de"][..], "chunk 2 is missing"),
            (4, &[&b"abc"[..], b"de"][..], "ends at byte 5"),
            (3, &[&b"abc"[..], b"de"][..], "chunk 1 follows"),
            (3, &[&b""[..], b"abc"][..], "chunk 0 of 0 bytes"),
        ] {
            match stream_of(size, chunks).into_bytes().await {
                Err(StoreError::Corrupt(message)) => assert!(message.contains(why), "{message}"),
                other => panic!("{size} bytes of {chunks:?}: {other:?}"),
            }
        }
    }
}
