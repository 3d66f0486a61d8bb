//! Code packages: the zip files uploaded with runtime codes.
//!
//! A package is checked completely before anything is stored: its size, that it is a zip,
//! that every entry is a regular file or directory at a relative path without `..`, and that
//! it unpacks to no more than a configured total — measured by really decompressing every
//! entry, because the sizes a zip declares can lie (a zip bomb).

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
    let mut files = Vec::new();
    let mut unpacked: u64 = 0;
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(not_a_zip)?;
        let name = entry.name().map_err(not_a_zip)?.into_owned();
        stevedore_model::code::check_package_path("file", name.trim_end_matches('/')).map_err(
            |_| {
                ApiError::BadRequest(format!(
                    "the code package holds {name:?}: entries must be relative paths without '..'"
                ))
            },
        )?;
        if entry.is_symlink()
            || entry
                .unix_mode()
                .is_some_and(|mode| mode & S_IFMT == S_IFLNK)
        {
            return Err(ApiError::BadRequest(format!(
                "the code package holds a symbolic link {name:?}; only regular files and directories are allowed"
            )));
        }
        if entry.is_dir() {
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
