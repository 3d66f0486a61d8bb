//! A runner's identity. Its id names the containers it creates, and at start-up the runner
//! removes every container of its id and gives back every task its id held: two runners on
//! one engine with the same id would kill each other's tasks. So unless the operator names a
//! runner, its id is made unique once (`embedded-<random>`, `remote-<host>-<random>`), kept
//! in the data directory so that a restart finds its earlier life's containers and tasks, and
//! held by one process at a time: a second runner started on the same data directory is
//! refused instead of taking the first one's id.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Which kind of runner, for the file names and the id's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerKind {
    /// The runner in `serve`.
    Embedded,
    /// `stevedore runner`.
    Remote,
}

/// A runner's id, and the lock that keeps it this process's while the value lives.
#[derive(Debug)]
pub struct RunnerIdentity {
    pub id: String,
    /// Held until the process ends (the operating system drops it with the process, also
    /// after kill -9); `None` for an id the operator named.
    _lock: Option<File>,
}

// === impl RunnerKind ===

impl RunnerKind {
    fn file_stem(self) -> &'static str {
        match self {
            RunnerKind::Embedded => "runner",
            RunnerKind::Remote => "remote-runner",
        }
    }

    fn fresh_id(self) -> anyhow::Result<String> {
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).context("no randomness for a runner id")?;
        let random = hex::encode(bytes);
        Ok(match self {
            RunnerKind::Embedded => format!("embedded-{random}"),
            RunnerKind::Remote => format!("remote-{}-{random}", crate::host_name()),
        })
    }
}

/// The id of this process's runner of `kind`: `named` when the operator gave one (nothing
/// is kept or locked: the operator answers for its uniqueness), else the one kept in
/// `data_dir`, made now if there is none yet.
pub fn runner_identity(
    data_dir: &Path,
    kind: RunnerKind,
    named: Option<String>,
) -> anyhow::Result<RunnerIdentity> {
    if let Some(id) = named {
        return Ok(RunnerIdentity { id, _lock: None });
    }
    std::fs::create_dir_all(data_dir).with_context(|| {
        format!(
            "cannot create the data directory {} for the runner's id",
            data_dir.display()
        )
    })?;
    let lock_path = data_dir.join(format!("{}.lock", kind.file_stem()));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another runner already uses the data directory {} and its runner id; give this \
             one a data directory of its own (--data-dir, STEVEDORE_DATA_DIR) or an id of its \
             own",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    }
    let id_path = data_dir.join(format!("{}-id", kind.file_stem()));
    let id = match read_id(&id_path)? {
        Some(id) => id,
        None => {
            let id = kind.fresh_id()?;
            write_id(&id_path, &id)?;
            tracing::info!(runner_id = %id, file = %id_path.display(), "made this runner's id");
            id
        }
    };
    Ok(RunnerIdentity {
        id,
        _lock: Some(lock),
    })
}

fn read_id(path: &PathBuf) -> anyhow::Result<Option<String>> {
    let mut text = String::new();
    match File::open(path) {
        Ok(mut file) => file
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read the runner id in {}", path.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error)
                .with_context(|| format!("cannot read the runner id in {}", path.display()));
        }
    };
    let id = text.trim();
    if id.is_empty() {
        return Ok(None);
    }
    stevedore_model::validation::check_name("runner id", id)
        .with_context(|| format!("the runner id in {} is not usable", path.display()))?;
    Ok(Some(id.to_owned()))
}

/// Writes the id whole or not at all: a crash half-way leaves no half an id.
fn write_id(path: &Path, id: &str) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = File::create(&partial)
        .with_context(|| format!("cannot write the runner id to {}", partial.display()))?;
    file.write_all(format!("{id}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot write the runner id to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn an_id_is_made_once_kept_and_held_by_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let first = runner_identity(dir.path(), RunnerKind::Embedded, None).unwrap();
        assert!(first.id.starts_with("embedded-"), "{}", first.id);

        let error = runner_identity(dir.path(), RunnerKind::Embedded, None).unwrap_err();
        assert!(error.to_string().contains("another runner"), "{error:#}");
        // Another kind keeps its own id in the same directory.
        let remote = runner_identity(dir.path(), RunnerKind::Remote, None).unwrap();
        assert!(remote.id.starts_with("remote-"), "{}", remote.id);
        assert_ne!(remote.id, first.id);

        let kept = first.id.clone();
        drop(first);
        let again = runner_identity(dir.path(), RunnerKind::Embedded, None).unwrap();
        assert_eq!(again.id, kept, "a restart keeps the id");

        // A named runner keeps nothing and locks nothing.
        let named = runner_identity(dir.path(), RunnerKind::Embedded, Some("mine".into())).unwrap();
        assert_eq!(named.id, "mine");
    }

    #[test]
    fn a_damaged_id_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("runner-id"), "bad/id\n").unwrap();
        let error = runner_identity(dir.path(), RunnerKind::Embedded, None).unwrap_err();
        assert!(format!("{error:#}").contains("runner-id"), "{error:#}");
    }
}
