//! Code packages: the zip files uploaded with runtime codes.
//!
//! An upload's `file` part is spooled to a temporary file as it arrives (`UploadSpool`),
//! refused as soon as it passes the package limit, and decoded on the way when it is the
//! Python client's bytes repr (`ReprDecoder`): no upload is ever held whole in memory. The
//! spooled file is then checked completely, on a blocking thread, before anything is stored:
//! that it is a zip, that it declares no more entries than allowed (read from its end record,
//! before the entries are parsed), that every entry is a regular file or directory (no link,
//! FIFO, device or socket) at a relative path without `..`, each path once, and that it
//! unpacks to no more than a configured total — measured by really decompressing every
//! entry, because the sizes a zip declares can lie (a zip bomb).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};
use stevedore_store::PackageFile;
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;

/// Bounds on one package.
#[derive(Debug, Clone, Copy)]
pub struct PackageLimits {
    /// The zip file itself, as sent.
    pub max_bytes: usize,
    /// All entries unpacked.
    pub max_unpacked_bytes: u64,
    pub max_entries: usize,
}

/// A package that passed every check, in its temporary file (removed when this is dropped).
#[derive(Debug)]
pub struct CheckedPackage {
    /// The file as the store takes it: path, size and SHA-256.
    pub file: PackageFile,
    /// The regular files it holds, by path.
    pub files: Vec<String>,
    _path: tempfile::TempPath,
}

/// What checking a zip found: its checksum, size and regular files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageCheck {
    pub sha256: String,
    pub size: u64,
    pub files: Vec<String>,
}

/// An upload's `file` part on its way into a temporary file.
pub struct UploadSpool {
    file: tokio::fs::File,
    path: tempfile::TempPath,
    decoder: ReprDecoder,
    /// Decoded bytes of the chunk being written.
    decoded: Vec<u8>,
    /// Bytes received so far, as sent.
    received: u64,
    limits: PackageLimits,
}

/// Undoes a quirk of the official Python client as the bytes arrive: under Python 3 it sends
/// the text of the zip's `bytes` repr (`b'PK\x03\x04...'`) instead of the zip. A part that
/// begins with `b'` or `b"` is taken for one (no zip begins so) and decoded; anything else
/// passes unchanged.
#[derive(Debug, Default)]
pub struct ReprDecoder {
    state: ReprState,
    /// The first bytes, until there are two to tell a repr by.
    head: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ReprState {
    #[default]
    Undecided,
    Raw,
    /// Inside the quotes; `escape` is how far an escape sequence has come.
    Repr {
        quote: u8,
        escape: Escape,
    },
    /// After the closing quote: nothing may follow.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// `\x` seen; waiting for the high hex digit.
    Hex,
    /// `\x` and the high digit seen.
    HexLow(u8),
}

// === impl CheckedPackage ===

impl CheckedPackage {
    /// A runtime code's package must hold the file it runs.
    pub fn check_entry_point(&self, kind: &stevedore_model::CodeKind) -> Result<(), ApiError> {
        check_entry_point(&self.files, kind)
    }
}

// === impl PackageCheck ===

impl PackageCheck {
    /// A runtime code's package must hold the file it runs.
    pub fn check_entry_point(&self, kind: &stevedore_model::CodeKind) -> Result<(), ApiError> {
        check_entry_point(&self.files, kind)
    }
}

fn check_entry_point(files: &[String], kind: &stevedore_model::CodeKind) -> Result<(), ApiError> {
    match kind {
        stevedore_model::CodeKind::Runtime { file_name, .. }
            if !files.iter().any(|file| file == file_name) =>
        {
            Err(ApiError::BadRequest(format!(
                "file_name: the zip package holds no file {file_name:?}; it holds {:?}",
                files.iter().take(20).collect::<Vec<_>>()
            )))
        }
        _ => Ok(()),
    }
}

// === impl UploadSpool ===

impl UploadSpool {
    /// A new temporary file in `dir` (named `upload-*`, the directory made when missing),
    /// removed when the spool, or the checked package it becomes, is dropped.
    pub async fn create(dir: &Path, limits: PackageLimits) -> Result<UploadSpool, ApiError> {
        let dir = dir.to_owned();
        let created = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            tempfile::Builder::new().prefix("upload-").tempfile_in(&dir)
        })
        .await
        .map_err(|error| ApiError::Internal(format!("spooling an upload: {error}")))?
        .map_err(spool_error)?;
        let (file, path) = created.into_parts();
        Ok(UploadSpool {
            file: tokio::fs::File::from_std(file),
            path,
            decoder: ReprDecoder::default(),
            decoded: Vec::new(),
            received: 0,
            limits,
        })
    }

    /// Appends a chunk of the part as it arrived. Refused (413) as soon as the part passes the
    /// package limit.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        self.received += chunk.len() as u64;
        let limit = self.limits.max_bytes;
        if self.received > limit as u64 {
            return Err(ApiError::PayloadTooLarge(if self.decoder.is_repr() {
                format!(
                    "the code package, as the bytes repr the Python client sends, is larger than the limit of {limit} bytes"
                )
            } else {
                format!("the code package is larger than the limit of {limit} bytes")
            }));
        }
        self.decoded.clear();
        self.decoder.push(chunk, &mut self.decoded)?;
        self.file
            .write_all(&self.decoded)
            .await
            .map_err(spool_error)
    }

    /// The whole part received: checks the package, on a blocking thread.
    pub async fn finish(mut self) -> Result<CheckedPackage, ApiError> {
        self.decoded.clear();
        self.decoder.finish(&mut self.decoded)?;
        self.file
            .write_all(&self.decoded)
            .await
            .map_err(spool_error)?;
        self.file.flush().await.map_err(spool_error)?;
        drop(self.file);
        let limits = self.limits;
        let path = self.path;
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).map_err(spool_error)?;
            let check = check_package(std::io::BufReader::new(file), limits)?;
            Ok(CheckedPackage {
                file: PackageFile {
                    path: path.to_path_buf(),
                    sha256: check.sha256,
                    size: check.size,
                },
                files: check.files,
                _path: path,
            })
        })
        .await
        .map_err(|error| ApiError::Internal(format!("checking a package: {error}")))?
    }
}

fn spool_error(error: std::io::Error) -> ApiError {
    ApiError::Internal(format!("spooling an upload: {error}"))
}

// === impl ReprDecoder ===

impl ReprDecoder {
    /// Decodes `input`, the next bytes of the part, onto `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ApiError> {
        if self.state == ReprState::Undecided {
            let take = (2 - self.head.len()).min(input.len());
            self.head.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.head.len() < 2 {
                return Ok(());
            }
            self.state = match self.head[..] {
                [b'b', quote @ (b'\'' | b'"')] => ReprState::Repr {
                    quote,
                    escape: Escape::None,
                },
                _ => {
                    out.extend_from_slice(&self.head);
                    ReprState::Raw
                }
            };
        }
        let (quote, mut escape) = match self.state {
            ReprState::Undecided => return Ok(()),
            ReprState::Raw => {
                out.extend_from_slice(input);
                return Ok(());
            }
            ReprState::Closed if input.is_empty() => return Ok(()),
            ReprState::Closed => return Err(not_a_repr("bytes follow its closing quote")),
            ReprState::Repr { quote, escape } => (quote, escape),
        };
        for (at, &byte) in input.iter().enumerate() {
            escape = match escape {
                Escape::None if byte == quote => {
                    if at + 1 < input.len() {
                        return Err(not_a_repr("bytes follow its closing quote"));
                    }
                    self.state = ReprState::Closed;
                    return Ok(());
                }
                Escape::None if byte == b'\\' => Escape::Backslash,
                Escape::None => {
                    out.push(byte);
                    Escape::None
                }
                Escape::Backslash => match byte {
                    b'\\' | b'\'' | b'"' => {
                        out.push(byte);
                        Escape::None
                    }
                    b't' | b'n' | b'r' => {
                        out.push(match byte {
                            b't' => b'\t',
                            b'n' => b'\n',
                            _ => b'\r',
                        });
                        Escape::None
                    }
                    b'x' => Escape::Hex,
                    _ => return Err(not_a_repr("an unknown escape")),
                },
                Escape::Hex => Escape::HexLow(hex_digit(byte)?),
                Escape::HexLow(high) => {
                    out.push(high << 4 | hex_digit(byte)?);
                    Escape::None
                }
            };
        }
        self.state = ReprState::Repr { quote, escape };
        Ok(())
    }

    /// The part ended: a repr must have been closed.
    pub fn finish(self, out: &mut Vec<u8>) -> Result<(), ApiError> {
        match self.state {
            // Fewer than two bytes: no repr.
            ReprState::Undecided => {
                out.extend_from_slice(&self.head);
                Ok(())
            }
            ReprState::Raw | ReprState::Closed => Ok(()),
            ReprState::Repr { .. } => Err(not_a_repr("it ends before its closing quote")),
        }
    }

    fn is_repr(&self) -> bool {
        matches!(self.state, ReprState::Repr { .. } | ReprState::Closed)
    }
}

fn not_a_repr(why: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "the code package begins like the bytes repr the Python client sends, but is none: {why}"
    ))
}

fn hex_digit(byte: u8) -> Result<u8, ApiError> {
    (byte as char)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
        .ok_or_else(|| not_a_repr("a \\x escape without two hex digits"))
}

const S_IFMT: u32 = 0o170_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// What a unix mode's file type bits name, for a message that says why an entry is refused.
fn file_kind(kind: u32) -> &'static str {
    match kind {
        0o010_000 => "a FIFO",
        0o020_000 => "a character device",
        0o060_000 => "a block device",
        0o140_000 => "a socket",
        _ => "an entry of an unknown file type",
    }
}

/// Checks a zip package against `limits`: blocking work (it reads the whole package and
/// decompresses every entry), for a blocking thread.
pub fn check_package<R: Read + Seek>(
    mut reader: R,
    limits: PackageLimits,
) -> Result<PackageCheck, ApiError> {
    let unreadable =
        |error: std::io::Error| ApiError::Internal(format!("reading a package: {error}"));
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = reader.read(&mut buffer).map_err(unreadable)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    if size > limits.max_bytes as u64 {
        return Err(ApiError::PayloadTooLarge(format!(
            "the code package is {size} bytes, more than the limit of {} bytes",
            limits.max_bytes
        )));
    }
    let sha256 = hex::encode(hasher.finalize());
    // The zip reader parses every entry of the central directory up front: refuse a zip that
    // declares too many before it does.
    if let Some(declared) = declared_entries(&mut reader, size).map_err(unreadable)?
        && declared > limits.max_entries as u64
    {
        return Err(too_many_entries(declared, limits));
    }
    reader.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    let not_a_zip = |error: zip::result::ZipError| {
        ApiError::BadRequest(format!("the code package is not a valid zip file: {error}"))
    };
    let mut archive = zip::ZipArchive::new(reader).map_err(not_a_zip)?;
    if archive.len() > limits.max_entries {
        return Err(too_many_entries(archive.len() as u64, limits));
    }
    // The reader keeps one entry per name, so two entries of one name never reach the loop
    // below; the runner would unpack one of them, not what a reader of the zip's listing
    // (or of its first entry) expects to run.
    if archive.has_duplicate_names() {
        return Err(ApiError::BadRequest(
            "the code package holds an entry name twice; each path may appear once".into(),
        ));
    }
    let mut files = Vec::new();
    let mut paths = std::collections::HashSet::new();
    let mut unpacked: u64 = 0;
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(not_a_zip)?;
        let name = entry.name().map_err(not_a_zip)?.into_owned();
        let path = name.trim_end_matches('/');
        stevedore_model::code::check_package_path("file", path).map_err(|_| {
            ApiError::BadRequest(format!(
                "the code package holds {name:?}: entries must be relative paths without '..'"
            ))
        })?;
        // A directory `lib/` and a file `lib` are one path too.
        if !paths.insert(path.to_owned()) {
            return Err(ApiError::BadRequest(format!(
                "the code package holds {path:?} twice; each path may appear once"
            )));
        }
        // The type bits, when the zip records them; zero when only permissions were recorded.
        let kind = entry
            .unix_mode()
            .map(|mode| mode & S_IFMT)
            .filter(|kind| *kind != 0);
        if entry.is_symlink() || kind == Some(S_IFLNK) {
            return Err(ApiError::BadRequest(format!(
                "the code package holds a symbolic link {name:?}; only regular files and directories are allowed"
            )));
        }
        // Read as the runner reads it: a name ending in '/' or a directory's mode is a
        // directory; anything else must be a regular file.
        let is_dir = entry.is_dir() || kind == Some(S_IFDIR);
        if let Some(kind) = kind
            && kind != S_IFREG
            && kind != S_IFDIR
        {
            return Err(ApiError::BadRequest(format!(
                "the code package holds {} {name:?}; only regular files and directories are allowed",
                file_kind(kind)
            )));
        }
        if is_dir {
            continue;
        }
        let budget = limits.max_unpacked_bytes - unpacked;
        let read = std::io::copy(&mut (&mut entry).take(budget + 1), &mut std::io::sink())
            .map_err(|error| {
                ApiError::BadRequest(format!(
                    "the code package entry {name:?} does not unpack: {error}"
                ))
            })?;
        if read > budget {
            return Err(ApiError::PayloadTooLarge(format!(
                "the code package unpacks to more than the limit of {} bytes",
                limits.max_unpacked_bytes
            )));
        }
        unpacked += read;
        files.push(name);
    }
    Ok(PackageCheck {
        sha256,
        size,
        files,
    })
}

fn too_many_entries(entries: u64, limits: PackageLimits) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the code package holds {entries} entries, more than the limit of {}",
        limits.max_entries
    ))
}

/// The number of entries a zip of `size` bytes declares in its end of central directory
/// record (or the ZIP64 one it points to); `None` when there is no such record (then it is no
/// zip, which the zip reader says).
fn declared_entries<R: Read + Seek>(reader: &mut R, size: u64) -> std::io::Result<Option<u64>> {
    const END: [u8; 4] = *b"PK\x05\x06";
    const END_LEN: u64 = 22;
    const ZIP64_LOCATOR: [u8; 4] = *b"PK\x06\x07";
    const ZIP64_END: [u8; 4] = *b"PK\x06\x06";
    if size < END_LEN {
        return Ok(None);
    }
    // The record ends the file but for a comment of up to 65535 bytes.
    let tail_len = size.min(END_LEN + 65_535);
    let tail_start = size - tail_len;
    reader.seek(SeekFrom::Start(tail_start))?;
    let mut tail = vec![0; usize::try_from(tail_len).unwrap_or(0)];
    reader.read_exact(&mut tail)?;
    let Some(at) = (0..=tail.len() - END_LEN as usize)
        .rev()
        .find(|&at| tail[at..at + 4] == END)
    else {
        return Ok(None);
    };
    let entries = u16::from_le_bytes([tail[at + 10], tail[at + 11]]);
    if entries != u16::MAX {
        return Ok(Some(u64::from(entries)));
    }
    // ZIP64: a locator just before the record points at the ZIP64 end record.
    let Some(locator) = at.checked_sub(20).map(|start| &tail[start..at]) else {
        return Ok(Some(u64::from(entries)));
    };
    if locator[..4] != ZIP64_LOCATOR {
        return Ok(Some(u64::from(entries)));
    }
    let mut offset = [0; 8];
    offset.copy_from_slice(&locator[8..16]);
    let offset = u64::from_le_bytes(offset);
    if offset.checked_add(56).is_none_or(|end| end > size) {
        return Ok(None);
    }
    let mut record = [0; 56];
    reader.seek(SeekFrom::Start(offset))?;
    reader.read_exact(&mut record)?;
    if record[..4] != ZIP64_END {
        return Ok(None);
    }
    let mut total = [0; 8];
    total.copy_from_slice(&record[32..40]);
    Ok(Some(u64::from_le_bytes(total)))
}

/// A stored package as a response body: its length announced, its bytes streamed as the store
/// reads them. A read that fails half-way aborts the response, which the announced length lets
/// every client notice.
pub fn package_body(package: stevedore_store::PackageStream) -> (u64, axum::body::Body) {
    use futures::TryStreamExt;
    let size = package.size;
    (
        size,
        axum::body::Body::from_stream(package.chunks.map_err(std::io::Error::other)),
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};

    use super::*;

    const LIMITS: PackageLimits = PackageLimits {
        max_bytes: 1 << 20,
        max_unpacked_bytes: 1 << 20,
        max_entries: 100,
    };

    fn check(bytes: Vec<u8>, limits: PackageLimits) -> Result<PackageCheck, ApiError> {
        check_package(Cursor::new(bytes), limits)
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, contents) in entries {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(contents).unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    #[test]
    fn a_good_package() {
        let package = check(zip_of(&[("hello.sh", b"echo hi"), ("lib/x", b"")]), LIMITS).unwrap();
        assert_eq!(package.files, ["hello.sh", "lib/x"]);
        assert_eq!(package.sha256.len(), 64);
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        for name in ["../evil", "/etc/passwd", "a/../../b"] {
            let error = check(zip_of(&[(name, b"x")]), LIMITS).unwrap_err();
            assert!(
                matches!(error, ApiError::BadRequest(_)),
                "{name}: {error:?}"
            );
        }
    }

    #[test]
    fn symlinks_are_refused() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer
            .add_symlink(
                "link",
                "/etc/passwd",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
        let bytes = writer.finish().unwrap().into_inner();
        assert!(matches!(check(bytes, LIMITS), Err(ApiError::BadRequest(_))));
    }

    /// A zip of one entry whose external attributes record `mode` (type bits included).
    fn zip_with_mode(name: &str, mode: u32) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer
            .start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        writer.write_all(b"").unwrap();
        let mut bytes = writer.finish().unwrap().into_inner();
        // The central directory's external attributes hold the unix mode in their high half;
        // the writer keeps only permission bits, so set the type bits in place.
        let header = bytes
            .windows(4)
            .rposition(|window| window == b"PK\x01\x02")
            .unwrap();
        let attributes = header + 38;
        bytes[attributes..attributes + 4].copy_from_slice(&(mode << 16).to_le_bytes());
        // "Made by" unix, so the mode is read at all.
        bytes[header + 5] = 3;
        bytes
    }

    #[test]
    fn fifos_devices_and_sockets_are_refused() {
        for (mode, what) in [
            (0o010_644, "FIFO"),
            (0o020_644, "character device"),
            (0o060_644, "block device"),
            (0o140_644, "socket"),
        ] {
            let error = check(zip_with_mode("run.sh", mode), LIMITS).unwrap_err();
            let ApiError::BadRequest(message) = error else {
                panic!("{what}: {error:?}")
            };
            assert!(message.contains(what), "{message}");
        }
        // A regular file's and a directory's modes pass.
        let package = check(zip_with_mode("run.sh", 0o100_755), LIMITS).unwrap();
        assert_eq!(package.files, ["run.sh"]);
        let package = check(zip_with_mode("lib", 0o040_755), LIMITS).unwrap();
        assert!(package.files.is_empty(), "a directory is no file");
    }

    #[test]
    fn duplicate_entry_names_are_refused() {
        // The writer refuses a name twice, so write two names and make them one.
        let renamed = |bytes: Vec<u8>, from: &[u8], to: &[u8]| {
            let mut bytes = bytes;
            let positions: Vec<usize> = (0..bytes.len() - from.len())
                .filter(|&at| &bytes[at..at + from.len()] == from)
                .collect();
            for at in positions {
                bytes[at..at + to.len()].copy_from_slice(to);
            }
            bytes
        };
        let twice = renamed(
            zip_of(&[("run.sh", b"good"), ("run.sX", b"evil")]),
            b"run.sX",
            b"run.sh",
        );
        let error = check(twice, LIMITS).unwrap_err();
        assert!(
            matches!(&error, ApiError::BadRequest(message) if message.contains("twice")),
            "{error:?}"
        );
        // A directory and a file of one path are the same path too.
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        writer.add_directory("lib/", options).unwrap();
        writer.start_file("liX", options).unwrap();
        let bytes = renamed(writer.finish().unwrap().into_inner(), b"liX", b"lib");
        assert!(matches!(
            check(bytes, LIMITS),
            Err(ApiError::BadRequest(message)) if message.contains("twice")
        ));
    }

    #[test]
    fn a_zip_bomb_is_refused_without_unpacking_it_all() {
        let zeros = vec![0u8; 4 << 20];
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        writer.start_file("zeros", options).unwrap();
        writer.write_all(&zeros).unwrap();
        let bytes = writer.finish().unwrap().into_inner();
        assert!(bytes.len() < 64 * 1024, "deflate should shrink zeros");
        assert!(matches!(
            check(bytes, LIMITS),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn garbage_is_not_a_zip() {
        assert!(matches!(
            check(b"hello".to_vec(), LIMITS),
            Err(ApiError::BadRequest(_))
        ));
    }

    /// The Python client's repr of `bytes`, as `repr(bytes)` writes it.
    fn python_repr(bytes: &[u8]) -> Vec<u8> {
        let mut repr = b"b'".to_vec();
        for &byte in bytes {
            match byte {
                b'\\' => repr.extend_from_slice(b"\\\\"),
                b'\'' => repr.extend_from_slice(b"\\'"),
                b'\t' => repr.extend_from_slice(b"\\t"),
                b'\n' => repr.extend_from_slice(b"\\n"),
                b'\r' => repr.extend_from_slice(b"\\r"),
                0x20..=0x7e => repr.push(byte),
                _ => repr.extend_from_slice(format!("\\x{byte:02x}").as_bytes()),
            }
        }
        repr.push(b'\'');
        repr
    }

    /// Decodes `sent` in pieces of `piece` bytes, as a part arrives in chunks.
    fn decode(sent: &[u8], piece: usize) -> Result<Vec<u8>, ApiError> {
        let mut decoder = ReprDecoder::default();
        let mut out = Vec::new();
        for chunk in sent.chunks(piece) {
            decoder.push(chunk, &mut out)?;
        }
        decoder.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn python_bytes_repr_is_decoded_however_it_is_cut() {
        let zip = zip_of(&[("a", b"it's \\ \"quoted\"\n\t\r\x00\xff")]);
        let repr = python_repr(&zip);
        for piece in [1, 2, 3, 7, 64, repr.len()] {
            assert_eq!(decode(&repr, piece).unwrap(), zip, "in pieces of {piece}");
            assert_eq!(decode(&zip, piece).unwrap(), zip, "a zip passes unchanged");
        }
        // A double-quoted repr (Python's choice for bytes holding a single quote).
        assert_eq!(decode(b"b\"it's\"", 1).unwrap(), b"it's");
        // Too short to be a repr, or not one: as sent.
        assert_eq!(decode(b"b", 1).unwrap(), b"b");
        assert_eq!(decode(b"bx'", 1).unwrap(), b"bx'");
    }

    #[test]
    fn a_broken_repr_is_refused() {
        for (sent, why) in [
            (&b"b'PK"[..], "closing quote"),
            (b"b'PK' and more", "follow"),
            (b"b'\\q'", "unknown escape"),
            (b"b'\\xg0'", "hex"),
        ] {
            for piece in [1, 3, sent.len()] {
                let error = decode(sent, piece).unwrap_err();
                assert!(
                    matches!(&error, ApiError::BadRequest(message) if message.contains(why)),
                    "{sent:?} in pieces of {piece}: {error:?}"
                );
            }
        }
    }

    #[test]
    fn too_many_declared_entries_are_refused_before_the_entries_are_read() {
        let names: Vec<String> = (0..5).map(|at| format!("f{at}")).collect();
        let entries: Vec<(&str, &[u8])> =
            names.iter().map(|name| (name.as_str(), &b""[..])).collect();
        let bytes = zip_of(&entries);
        assert_eq!(
            declared_entries(&mut Cursor::new(&bytes), bytes.len() as u64).unwrap(),
            Some(5)
        );
        let limits = PackageLimits {
            max_entries: 4,
            ..LIMITS
        };
        assert!(matches!(
            check(bytes.clone(), limits),
            Err(ApiError::PayloadTooLarge(message)) if message.contains("5 entries")
        ));
        assert_eq!(check(bytes, LIMITS).unwrap().files.len(), 5);
        assert_eq!(
            declared_entries(&mut Cursor::new(b"short"), 5).unwrap(),
            None
        );
    }

    #[test]
    fn a_check_reports_the_checksum_and_size() {
        let bytes = zip_of(&[("run.sh", b"echo hi")]);
        let checked = check(bytes.clone(), LIMITS).unwrap();
        assert_eq!(checked.size, bytes.len() as u64);
        assert_eq!(checked.sha256, hex::encode(Sha256::digest(&bytes)));
    }
}
