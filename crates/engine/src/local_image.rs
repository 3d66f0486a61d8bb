//! The local `stevedore/busybox:local` image, built from the host's static busybox without any
//! registry (`stevedore stack build-local`, the quick start and the tests use it).
//!
//! The image is a root filesystem imported through the engine's image import: `/bin/busybox`
//! with a symlink for every applet, `/etc/passwd` and `/etc/group` with root and nobody, a
//! sticky `/tmp` and a world-writable `/mnt/task`.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;

use crate::archive::ArchiveBuilder;
use crate::engine::ImageBuilder;
use crate::error::EngineError;
use crate::local_stacks::{BuildOutcome, RECIPE_LABEL, digest, remove_replaced, reused};
use crate::spec::TASK_DIR;

/// The reference of the local busybox image.
pub const LOCAL_BUSYBOX_IMAGE: &str = "stevedore/busybox:local";

/// Where Debian's `busybox-static` puts its binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Applets linked when `busybox --list-full` cannot be run (a foreign-architecture binary):
/// what shell scripts and the tests need.
const FALLBACK_APPLETS: &[&str] = &[
    "bin/sh",
    "bin/ash",
    "bin/cat",
    "bin/cp",
    "bin/date",
    "bin/dd",
    "bin/echo",
    "bin/false",
    "bin/grep",
    "bin/kill",
    "bin/ln",
    "bin/ls",
    "bin/mkdir",
    "bin/mv",
    "bin/ps",
    "bin/pwd",
    "bin/rm",
    "bin/sleep",
    "bin/true",
    "usr/bin/env",
    "usr/bin/head",
    "usr/bin/id",
    "usr/bin/printf",
    "usr/bin/seq",
    "usr/bin/sha256sum",
    "usr/bin/tail",
    "usr/bin/test",
    "usr/bin/tr",
    "usr/bin/wc",
    "usr/bin/yes",
];

/// The Dockerfile-style settings the imported image gets.
const IMAGE_CHANGES: &[&str] = &[
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "WORKDIR /mnt/task",
    "CMD [\"sh\"]",
];

/// Builds the root filesystem tar of the busybox image from the static busybox at `busybox`.
///
/// Reads the file and runs it once (`busybox --list-full`) to learn its applets, so call it
/// off the async executor (e.g. inside `spawn_blocking`), or use [`build_local_busybox_image`].
pub fn busybox_rootfs_tar(busybox: &Path, mtime: u64) -> Result<Vec<u8>, EngineError> {
    let binary = std::fs::read(busybox).map_err(|error| EngineError::LocalIo {
        path: busybox.display().to_string(),
        message: error.to_string(),
    })?;
    let applets = applets_of(busybox);

    let mut archive = ArchiveBuilder::new(Vec::new(), mtime);
    for (directory, mode) in [
        ("/bin", 0o755),
        ("/sbin", 0o755),
        ("/usr", 0o755),
        ("/usr/bin", 0o755),
        ("/usr/sbin", 0o755),
        ("/etc", 0o755),
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/root", 0o700),
        ("/home", 0o755),
        ("/tmp", 0o1777),
        ("/var", 0o755),
        ("/var/tmp", 0o1777),
        ("/mnt", 0o755),
        (TASK_DIR, 0o777),
    ] {
        archive.directory(directory, mode)?;
    }
    archive.file("/bin/busybox", 0o755, &binary)?;
    for applet in &applets {
        let path = format!("/{applet}");
        if path != "/bin/busybox" {
            archive.symlink(&path, "/bin/busybox")?;
        }
    }
    archive.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    archive.file("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    archive.finish()
}

/// Builds [`LOCAL_BUSYBOX_IMAGE`] (or `reference`) from the host's static busybox and imports
/// it into `engine`, unless it exists from the same busybox (recorded as the image's
/// [`RECIPE_LABEL`]).
///
/// Rebuilding moves the tag to the new image and removes the one it replaced, unless a
/// container still uses it (then it stays, untagged, until pruned).
pub async fn build_local_busybox_image(
    engine: &dyn ImageBuilder,
    busybox: &Path,
    reference: &str,
) -> Result<BuildOutcome, EngineError> {
    let binary = std::fs::read(busybox).map_err(|error| EngineError::LocalIo {
        path: busybox.display().to_string(),
        message: error.to_string(),
    })?;
    let recipe = digest([binary.as_slice(), IMAGE_CHANGES.join("\n").as_bytes()]);
    if let Some(id) = reused(engine, reference, &recipe).await? {
        return Ok(BuildOutcome::Reused { id });
    }
    let busybox = busybox.to_owned();
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0);
    let rootfs = tokio::task::spawn_blocking(move || busybox_rootfs_tar(&busybox, mtime))
        .await
        .map_err(|error| EngineError::protocol(format!("building the rootfs failed: {error}")))??;
    let mut changes: Vec<String> = IMAGE_CHANGES.iter().map(|c| (*c).to_owned()).collect();
    changes.push(format!("LABEL {RECIPE_LABEL}={recipe}"));
    let replaced = engine.image_id(reference).await?;
    let id = engine
        .import_image(Bytes::from(rootfs), reference, &changes)
        .await?;
    tracing::info!(image = reference, %id, "built the local busybox image");
    remove_replaced(engine, replaced, &id).await;
    Ok(BuildOutcome::Built { id })
}

/// The applets' paths relative to `/` (`bin/sh`, `usr/bin/env`...), from the binary itself.
fn applets_of(busybox: &Path) -> Vec<String> {
    let listed = Command::new(busybox)
        .arg("--list-full")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(|line| line.trim().trim_start_matches('/').to_owned())
                .filter(|line| !line.is_empty() && !line.contains(".."))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if listed.is_empty() {
        tracing::warn!(
            busybox = %busybox.display(),
            "cannot list busybox applets; linking a fixed set"
        );
        return FALLBACK_APPLETS.iter().map(|a| (*a).to_owned()).collect();
    }
    listed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rootfs_holds_busybox_its_applets_and_users() -> Result<(), Box<dyn std::error::Error>> {
        let busybox = Path::new(HOST_BUSYBOX);
        if !busybox.exists() {
            eprintln!("skipped: {HOST_BUSYBOX} is not installed (apt-get install busybox-static)");
            return Ok(());
        }
        let bytes = busybox_rootfs_tar(busybox, 0)?;
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut paths = Vec::new();
        for entry in archive.entries()? {
            let entry = entry?;
            paths.push(entry.path()?.to_string_lossy().into_owned());
        }
        for expected in ["bin/busybox", "bin/sh", "etc/passwd", "mnt/task/", "tmp/"] {
            assert!(paths.iter().any(|p| p == expected), "{expected} missing");
        }
        assert!(paths.len() > 50, "only {} entries", paths.len());
        Ok(())
    }

    #[test]
    fn a_missing_busybox_is_a_local_io_error() {
        let result = busybox_rootfs_tar(Path::new("/nonexistent/busybox"), 0);
        assert!(matches!(result, Err(EngineError::LocalIo { .. })));
    }
}
