//! Stack images built on this machine from Debian's archive, without any container registry
//! (`stevedore stack build-local`).
//!
//! ```text
//! mmdebstrap (or debootstrap) ─▶ rootfs tar ─▶ import ─▶ the Debian base image
//!   └─▶ per stack: a generated Dockerfile `FROM` the base, `apt-get install` ─▶ build ─▶ tag
//! ```
//!
//! Every image records the recipe it was made from as the label [`RECIPE_LABEL`]: a digest of
//! the bootstrap command, or of the Dockerfile and the base image's id. A build whose tag
//! exists with the same recipe is skipped, so repeated runs reuse what is built, and a new
//! base rebuilds the stacks on it.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::build::{BuildProgress, BuildRequest};
use crate::engine::ImageBuilder;
use crate::error::EngineError;
use crate::spec::TASK_DIR;

/// The image label holding the digest of the recipe an image was made from.
pub const RECIPE_LABEL: &str = "stevedore.recipe";

/// Where Debian's packages come from, for the base image and for `apt-get` in the stacks.
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// Files no task needs, left out of every package installed in the local images (the
/// copyright files stay).
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
];

/// The Dockerfile-style settings of the imported base image.
const BASE_CHANGES: &[&str] = &[
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "WORKDIR /mnt/task",
    "CMD [\"sh\"]",
];

/// What a local image build did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildOutcome {
    /// The tag existed with the same recipe: nothing was built.
    Reused {
        id: String,
    },
    Built {
        id: String,
    },
}

/// Which tool made the base image's root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bootstrapper {
    Mmdebstrap,
    Debootstrap,
}

// === impl BuildOutcome ===

impl BuildOutcome {
    pub fn id(&self) -> &str {
        match self {
            BuildOutcome::Reused { id } | BuildOutcome::Built { id } => id,
        }
    }

    pub fn was_built(&self) -> bool {
        matches!(self, BuildOutcome::Built { .. })
    }
}

/// Builds the Debian `suite` base image as `reference` with `mmdebstrap` (or `debootstrap`
/// when mmdebstrap is missing), unless it exists from the same recipe. The root filesystem is
/// a minimal Debian with `ca-certificates`, documentation left out (also of what is installed
/// later), and a world-writable `/mnt/task`.
pub async fn build_debian_base(
    engine: &dyn ImageBuilder,
    reference: &str,
    suite: &str,
) -> Result<BuildOutcome, EngineError> {
    let tool = bootstrapper()?;
    let arguments = bootstrap_arguments(tool, suite);
    let recipe = digest([
        format!("{tool:?}"),
        arguments.join("\n"),
        BASE_CHANGES.join("\n"),
    ]);
    if let Some(id) = reused(engine, reference, &recipe).await? {
        return Ok(BuildOutcome::Reused { id });
    }
    let suite = suite.to_owned();
    let rootfs = tokio::task::spawn_blocking(move || bootstrap(tool, &suite))
        .await
        .map_err(|error| EngineError::protocol(format!("bootstrapping failed: {error}")))??;
    let mut changes: Vec<String> = BASE_CHANGES.iter().map(|c| (*c).to_owned()).collect();
    changes.push(format!("LABEL {RECIPE_LABEL}={recipe}"));
    let replaced = engine.image_id(reference).await?;
    let id = engine
        .import_image(Bytes::from(rootfs), reference, &changes)
        .await?;
    remove_replaced(engine, replaced, &id).await;
    tracing::info!(image = reference, %id, "built the Debian base image");
    Ok(BuildOutcome::Built { id })
}

/// Builds `reference` from `base` with Debian's `packages` installed, unless it exists from
/// the same recipe (the same packages on the same base image).
pub async fn build_debian_stack(
    engine: &dyn ImageBuilder,
    reference: &str,
    base: &str,
    packages: &[&str],
    on_progress: &mut (dyn FnMut(BuildProgress) + Send),
) -> Result<BuildOutcome, EngineError> {
    let base_id = engine
        .image_id(base)
        .await?
        .ok_or_else(|| EngineError::ImageNotFound {
            image: base.to_owned(),
        })?;
    let dockerfile = stack_dockerfile(base, packages);
    let recipe = digest([dockerfile.clone(), base_id]);
    if let Some(id) = reused(engine, reference, &recipe).await? {
        return Ok(BuildOutcome::Reused { id });
    }
    let context = tempfile::tempdir().map_err(|error| local_io("a temporary directory", error))?;
    let dockerfile_path = context.path().join("Dockerfile");
    std::fs::write(&dockerfile_path, &dockerfile)
        .map_err(|error| local_io(&dockerfile_path.display().to_string(), error))?;
    let mut request = BuildRequest::new(context.path()).tag(reference);
    request
        .labels
        .insert(RECIPE_LABEL.to_owned(), recipe.clone());
    let replaced = engine.image_id(reference).await?;
    let built = engine.build_image(&request, on_progress).await?;
    remove_replaced(engine, replaced, &built.id).await;
    tracing::info!(image = reference, id = %built.id, "built a local stack image");
    Ok(BuildOutcome::Built { id: built.id })
}

/// The Dockerfile of a stack on `base`: the packages without their recommendations, apt's
/// lists and caches removed in the same layer. OpenJDK's post-install script links its man
/// page into `/usr/share/man/man1` and fails when that directory is missing, as it is with
/// the man pages left out, so it is created first.
pub fn stack_dockerfile(base: &str, packages: &[&str]) -> String {
    format!(
        "FROM {base}\n\
         RUN mkdir -p /usr/share/man/man1 \\\n \
         && apt-get update \\\n \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {} \\\n \
         && apt-get clean \\\n \
         && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log\n\
         WORKDIR {TASK_DIR}\n",
        packages.join(" ")
    )
}

/// The id of `reference` when it exists and was made from `recipe`.
pub(crate) async fn reused(
    engine: &dyn ImageBuilder,
    reference: &str,
    recipe: &str,
) -> Result<Option<String>, EngineError> {
    let image = engine.local_image(reference).await?;
    Ok(image
        .filter(|image| image.labels.get(RECIPE_LABEL).is_some_and(|r| r == recipe))
        .map(|image| image.id))
}

/// Removes the image a rebuild replaced, unless a container still uses it (then it stays,
/// untagged, until pruned).
pub(crate) async fn remove_replaced(
    engine: &dyn ImageBuilder,
    replaced: Option<String>,
    new_id: &str,
) {
    if let Some(old) = replaced.filter(|old| old != new_id)
        && let Err(error) = engine.remove_image(&old).await
    {
        tracing::info!(image = %old, %error, "keeping the replaced image");
    }
}

/// A hex SHA-256 over the parts, each ended by a NUL.
pub(crate) fn digest<I: IntoIterator<Item = impl AsRef<[u8]>>>(parts: I) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_ref());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

fn bootstrapper() -> Result<Bootstrapper, EngineError> {
    let found = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if found("mmdebstrap") {
        Ok(Bootstrapper::Mmdebstrap)
    } else if found("debootstrap") {
        Ok(Bootstrapper::Debootstrap)
    } else {
        Err(EngineError::LocalIo {
            path: "mmdebstrap".to_owned(),
            message: "neither mmdebstrap nor debootstrap is installed (apt-get install mmdebstrap)"
                .to_owned(),
        })
    }
}

/// The bootstrapper's arguments before its output path (and, for debootstrap, the mirror).
fn bootstrap_arguments(tool: Bootstrapper, suite: &str) -> Vec<String> {
    match tool {
        Bootstrapper::Mmdebstrap => {
            let mut arguments = vec![
                "--quiet".to_owned(),
                "--variant=minbase".to_owned(),
                "--include=ca-certificates".to_owned(),
            ];
            arguments.extend(DPKG_EXCLUDES.iter().map(|rule| format!("--dpkgopt={rule}")));
            arguments.push(format!(
                "--customize-hook=mkdir -p -m 1777 \"$1{TASK_DIR}\""
            ));
            arguments.push(suite.to_owned());
            arguments
        }
        Bootstrapper::Debootstrap => vec![
            "--variant=minbase".to_owned(),
            "--include=ca-certificates".to_owned(),
            suite.to_owned(),
        ],
    }
}

/// Runs the bootstrapper and returns the root filesystem as a tar.
fn bootstrap(tool: Bootstrapper, suite: &str) -> Result<Vec<u8>, EngineError> {
    let scratch = tempfile::tempdir().map_err(|error| local_io("a temporary directory", error))?;
    let sources = [
        format!("deb {DEBIAN_MIRROR} {suite} main"),
        format!("deb {DEBIAN_MIRROR} {suite}-updates main"),
        format!("deb {DEBIAN_MIRROR}-security {suite}-security main"),
    ];
    let tar_path = scratch.path().join("rootfs.tar");
    match tool {
        Bootstrapper::Mmdebstrap => {
            let mut command = Command::new("mmdebstrap");
            command
                .args(bootstrap_arguments(tool, suite))
                .arg(&tar_path)
                .args(&sources);
            run(&mut command, "mmdebstrap")?;
        }
        Bootstrapper::Debootstrap => {
            let root = scratch.path().join("root");
            let mut command = Command::new("debootstrap");
            command
                .args(bootstrap_arguments(tool, suite))
                .arg(&root)
                .arg(DEBIAN_MIRROR);
            run(&mut command, "debootstrap")?;
            let task_dir = root.join(TASK_DIR.trim_start_matches('/'));
            std::fs::create_dir_all(&task_dir).map_err(|error| local_io(TASK_DIR, error))?;
            set_mode(&task_dir);
            let apt = root.join("etc/apt/sources.list");
            std::fs::write(&apt, sources.join("\n") + "\n")
                .map_err(|error| local_io(&apt.display().to_string(), error))?;
            let excludes = root.join("etc/dpkg/dpkg.cfg.d/stevedore-excludes");
            std::fs::write(&excludes, DPKG_EXCLUDES.join("\n") + "\n")
                .map_err(|error| local_io(&excludes.display().to_string(), error))?;
            for cached in ["var/lib/apt/lists", "var/cache/apt/archives"] {
                clear_directory(&root.join(cached));
            }
            let mut tar = Command::new("tar");
            tar.arg("-C")
                .arg(&root)
                .args(["--numeric-owner", "-cf"])
                .arg(&tar_path)
                .arg(".");
            run(&mut tar, "tar")?;
        }
    }
    std::fs::read(&tar_path).map_err(|error| local_io(&tar_path.display().to_string(), error))
}

fn run(command: &mut Command, what: &str) -> Result<(), EngineError> {
    let output = command.output().map_err(|error| local_io(what, error))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
    Err(EngineError::LocalIo {
        path: what.to_owned(),
        message: format!(
            "{what} failed ({}): {}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ),
    })
}

/// Empties a directory of cached files, keeping the directory (best effort: a leftover only
/// costs space).
fn clear_directory(directory: &Path) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn set_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o1777));
}

fn local_io(path: &str, error: std::io::Error) -> EngineError {
    EngineError::LocalIo {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ImageStore;
    use crate::fake::FakeEngine;

    #[test]
    fn a_stack_dockerfile_installs_lean() {
        let dockerfile = stack_dockerfile("stevedore/debian:bookworm-local", &["python3"]);
        assert!(dockerfile.starts_with("FROM stevedore/debian:bookworm-local\n"));
        assert!(dockerfile.contains("--no-install-recommends python3"));
        assert!(dockerfile.contains("rm -rf /var/lib/apt/lists/*"));
    }

    #[tokio::test]
    async fn a_stack_is_rebuilt_only_when_its_recipe_or_base_changes()
    -> Result<(), Box<dyn std::error::Error>> {
        let engine = FakeEngine::new();
        let base = "stevedore/debian:test";
        engine
            .import_image(Bytes::new(), base, &["LABEL a=b".to_owned()])
            .await?;
        let mut ignore = |_: BuildProgress| {};
        let first = build_debian_stack(&engine, "s/py:1", base, &["python3"], &mut ignore).await?;
        assert!(first.was_built());
        let again = build_debian_stack(&engine, "s/py:1", base, &["python3"], &mut ignore).await?;
        assert_eq!(
            again,
            BuildOutcome::Reused {
                id: first.id().to_owned()
            }
        );
        let more =
            build_debian_stack(&engine, "s/py:1", base, &["python3", "ruby"], &mut ignore).await?;
        assert!(more.was_built());
        // A new base image makes every stack on it stale.
        engine.import_image(Bytes::new(), base, &[]).await?;
        let rebased =
            build_debian_stack(&engine, "s/py:1", base, &["python3", "ruby"], &mut ignore).await?;
        assert!(rebased.was_built());
        assert_eq!(
            engine.image_id("s/py:1").await?.as_deref(),
            Some(rebased.id())
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_base_is_refused() {
        let engine = FakeEngine::new();
        let mut ignore = |_: BuildProgress| {};
        let result =
            build_debian_stack(&engine, "s/x:1", "no/base:1", &["ruby"], &mut ignore).await;
        assert!(matches!(result, Err(EngineError::ImageNotFound { .. })));
    }
}
