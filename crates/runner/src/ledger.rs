//! The lease ledger: where a runner writes down, for each task it runs, until when its lease
//! surely holds, so that something outliving the runner process can stop the task's container
//! once that time passed (the [`watchdog`](crate::watchdog)).
//!
//! A directory of one small file per task (`<task id>`, holding the deadline in milliseconds
//! since the epoch), rewritten whole (written aside, then renamed) before the container is
//! created and after every answered heartbeat, and removed once the container is. Beside them,
//! `alive.lock`: locked by the runner process for as long as it lives, so the watchdog can tell
//! a runner that is gone (killed with SIGKILL included: the lock goes with the process) from
//! one that is only quiet.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

const ALIVE_LOCK: &str = "alive.lock";
const PARTIAL: &str = ".partial";

/// The runner's side of the ledger.
#[derive(Debug)]
pub(crate) struct LeaseLedger {
    dir: PathBuf,
    /// Held while the runner lives.
    _alive: File,
}

// === impl LeaseLedger ===

impl LeaseLedger {
    /// Opens the ledger in `dir` (made if missing) for this process. Refused when another
    /// process's runner holds it.
    pub(crate) fn open(dir: &Path) -> io::Result<LeaseLedger> {
        std::fs::create_dir_all(dir)?;
        let alive = lock_file(dir)?;
        match alive.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another runner process uses the lease ledger {}",
                        dir.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(error),
        }
        Ok(LeaseLedger {
            dir: dir.to_owned(),
            _alive: alive,
        })
    }

    /// Writes down that the lease of `task_id` surely holds until `until` (this runner's
    /// monotonic clock, turned into wall time for the watchdog). Failing to write is logged:
    /// the watchdog then stops the container at the last deadline it read, which is early,
    /// never late.
    pub(crate) fn promise(&self, task_id: &str, until: Instant) {
        let left = until.saturating_duration_since(Instant::now());
        let deadline = SystemTime::now() + left;
        let millis = deadline
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        let path = self.dir.join(task_id);
        let partial = self.dir.join(format!("{task_id}{PARTIAL}"));
        let written = std::fs::write(&partial, millis.to_string())
            .and_then(|()| std::fs::rename(&partial, &path));
        if let Err(error) = written {
            tracing::warn!(%error, task_id, "cannot write the lease ledger");
        }
    }

    /// Forgets `task_id`: its container is gone.
    pub(crate) fn release(&self, task_id: &str) {
        match std::fs::remove_file(self.dir.join(task_id)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(%error, task_id, "cannot clear the lease ledger"),
        }
    }
}

fn lock_file(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(ALIVE_LOCK))
}

/// Every deadline written in the ledger `dir`, by task id. Unreadable entries are left out.
pub(crate) fn deadlines(dir: &Path) -> io::Result<HashMap<String, SystemTime>> {
    let mut deadlines = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // Task ids have no dot; the locks, logs and partial writes beside them do.
        if name.contains('.') {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Ok(millis) = text.trim().parse::<u64>() {
            deadlines.insert(name, UNIX_EPOCH + Duration::from_millis(millis));
        }
    }
    Ok(deadlines)
}

/// Removes the entry of `task_id`, if any.
pub(crate) fn forget(dir: &Path, task_id: &str) {
    let _ = std::fs::remove_file(dir.join(task_id));
}

/// Whether a runner process holds the ledger `dir` now.
pub(crate) fn runner_alive(dir: &Path) -> io::Result<bool> {
    let file = lock_file(dir)?;
    match file.try_lock() {
        // Nobody held it; dropping the file lets it go again at once.
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn promises_are_read_back_and_the_lock_tells_a_live_runner() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!runner_alive(dir.path()).unwrap());
        let ledger = LeaseLedger::open(dir.path()).unwrap();
        assert!(runner_alive(dir.path()).unwrap());
        assert!(
            LeaseLedger::open(dir.path()).is_err(),
            "one runner per ledger"
        );

        ledger.promise("t1", Instant::now() + Duration::from_secs(30));
        ledger.promise("t2", Instant::now());
        let read = deadlines(dir.path()).unwrap();
        assert_eq!(read.len(), 2);
        let t1 = read["t1"].duration_since(SystemTime::now()).unwrap();
        assert!(t1 > Duration::from_secs(25), "{t1:?}");
        ledger.release("t1");
        assert_eq!(deadlines(dir.path()).unwrap().len(), 1);

        drop(ledger);
        assert!(!runner_alive(dir.path()).unwrap());
    }
}
