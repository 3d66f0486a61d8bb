//! Code packages: the zip files uploaded with runtime codes.
//!
//! A package is checked completely before anything is stored: its size, that it is a zip,
//! that every entry is a regular file or directory (no link, FIFO, device or socket) at a
//! relative path without `..`, each path once, and that it unpacks to no more than a
//! configured total — measured by really decompressing every entry, because the sizes a zip
//! declares can lie (a zip bomb).

use std::io::{Cursor, Read};

use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Bounds on one package.
#[derive(Debug, Clone, Copy)]
pub struct PackageLimits {
    /// The zip file itself.
    pub max_bytes: usize,
    /// All entries unpacked.
    pub max_unpacked_bytes: u64,
    pub max_entries: usize,
}

/// A package that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedPackage {
    pub bytes: Vec<u8>,
    pub sha256: String,
    /// The regular files it holds, by path.
    pub files: Vec<String>,
}

impl CheckedPackage {
    /// A runtime code's package must hold the file it runs.
    pub fn check_entry_point(&self, kind: &stevedore_model::CodeKind) -> Result<(), ApiError> {
        match kind {
            stevedore_model::CodeKind::Runtime { file_name, .. }
                if !self.files.iter().any(|file| file == file_name) =>
            {
                Err(ApiError::BadRequest(format!(
                    "file_name: the zip package holds no file {file_name:?}; it holds {:?}",
                    self.files.iter().take(20).collect::<Vec<_>>()
                )))
            }
            _ => Ok(()),
        }
    }
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

/// Undoes a quirk of the official Python client: under Python 3 it sends the text of the
/// zip's `bytes` repr (`b'PK\x03\x04...'`) instead of the zip. Anything else is returned as is.
pub fn decode_upload(raw: Vec<u8>) -> Vec<u8> {
    match decode_python_bytes_repr(&raw) {
        Some(decoded) if decoded.starts_with(b"PK") => decoded,
        _ => raw,
    }
}

fn decode_python_bytes_repr(raw: &[u8]) -> Option<Vec<u8>> {
    let quote = match raw {
        [b'b', quote @ (b'\'' | b'"'), .., last] if last == quote && raw.len() >= 3 => *quote,
        _ => return None,
    };
    let inner = &raw[2..raw.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter().copied();
    while let Some(byte) = bytes.next() {
        if byte == quote {
            return None;
        }
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        match bytes.next()? {
            b'\\' => out.push(b'\\'),
            b'\'' => out.push(b'\''),
            b'"' => out.push(b'"'),
            b't' => out.push(b'\t'),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b'x' => {
                let high = hex_digit(bytes.next()?)?;
                let low = hex_digit(bytes.next()?)?;
                out.push(high << 4 | low);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn hex_digit(byte: u8) -> Option<u8> {
    (byte as char)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

/// Checks a zip package against `limits`.
pub fn check_package(bytes: Vec<u8>, limits: PackageLimits) -> Result<CheckedPackage, ApiError> {
    if bytes.len() > limits.max_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the code package is {} bytes, more than the limit of {} bytes",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let not_a_zip = |error: zip::result::ZipError| {
        ApiError::BadRequest(format!("the code package is not a valid zip file: {error}"))
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).map_err(not_a_zip)?;
    if archive.len() > limits.max_entries {
        return Err(ApiError::PayloadTooLarge(format!(
            "the code package holds {} entries, more than the limit of {}",
            archive.len(),
            limits.max_entries
        )));
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
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(CheckedPackage {
        bytes,
        sha256,
        files,
    })
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
    use std::io::Write;

    use super::*;

    const LIMITS: PackageLimits = PackageLimits {
        max_bytes: 1 << 20,
        max_unpacked_bytes: 1 << 20,
        max_entries: 100,
    };

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
        let package =
            check_package(zip_of(&[("hello.sh", b"echo hi"), ("lib/x", b"")]), LIMITS).unwrap();
        assert_eq!(package.files, ["hello.sh", "lib/x"]);
        assert_eq!(package.sha256.len(), 64);
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        for name in ["../evil", "/etc/passwd", "a/../../b"] {
            let error = check_package(zip_of(&[(name, b"x")]), LIMITS).unwrap_err();
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
        assert!(matches!(
            check_package(bytes, LIMITS),
            Err(ApiError::BadRequest(_))
        ));
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
            let error = check_package(zip_with_mode("run.sh", mode), LIMITS).unwrap_err();
            let ApiError::BadRequest(message) = error else {
                panic!("{what}: {error:?}")
            };
            assert!(message.contains(what), "{message}");
        }
        // A regular file's and a directory's modes pass.
        let package = check_package(zip_with_mode("run.sh", 0o100_755), LIMITS).unwrap();
        assert_eq!(package.files, ["run.sh"]);
        let package = check_package(zip_with_mode("lib", 0o040_755), LIMITS).unwrap();
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
        let error = check_package(twice, LIMITS).unwrap_err();
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
            check_package(bytes, LIMITS),
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
            check_package(bytes, LIMITS),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn garbage_is_not_a_zip() {
        assert!(matches!(
            check_package(b"hello".to_vec(), LIMITS),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn python_bytes_repr_is_decoded() {
        let zip = zip_of(&[("a", b"it's \\ \"quoted\"\n")]);
        let mut repr = b"b'".to_vec();
        for &byte in &zip {
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
        assert_eq!(decode_upload(repr), zip);
        assert_eq!(decode_upload(zip.clone()), zip);
    }
}
