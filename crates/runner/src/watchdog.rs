//! The watchdog: what stops a task's container once the lease it runs under surely ended, when
//! its runner cannot any more.
//!
//! A runner stops its own containers when it cannot confirm their leases in time (the
//! heartbeat loop). A runner process that is gone (killed with SIGKILL, crashed) stops
//! nothing, and its containers would run on while the rescued tasks run again elsewhere. So a
//! runner that keeps a lease ledger ([`crate::ledger`]) has a watchdog process beside it, on
//! the same host, that outlives it. While the runner lives the watchdog leaves everything to
//! it. Once the runner is gone, every `interval` it lists the containers of the runner's
//! ledger and stops and removes each one whose lease, as the ledger last recorded it, ends
//! within `lead` (or that the ledger does not account for): before the server's end of the
//! lease, which is never earlier than the runner's record of it, so the rescued task never
//! runs twice at once. It ends when nothing of the runner remains, also when the ledger's
//! directory was removed after the runner stopped. One watchdog per ledger
//! (`watchdog.lock`); a runner that starts again finds it still there or starts a new one.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stevedore_engine::{ContainerRuntime, EngineError, LABEL_NETWORK_HOLDER};
use tokio_util::sync::CancellationToken;

use crate::container::{LABEL_LEDGER, LABEL_RUNNER, LABEL_TASK};
use crate::ledger;

const WATCHDOG_LOCK: &str = "watchdog.lock";

/// What the watchdog watches and how closely.
#[derive(Debug, Clone)]
pub struct Watchdog {
    /// The runner whose containers (label `stevedore.runner`) are watched.
    pub runner_id: String,
    /// The runner's lease ledger.
    pub ledger_dir: PathBuf,
    /// How often it looks.
    pub interval: Duration,
    /// How long before a lease's recorded end the container of a runner that is gone is
    /// stopped: more than `interval`, so it is stopped before the lease ends.
    pub lead: Duration,
}

/// Why a round could not look or act.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("cannot read the lease ledger: {0}")]
    Ledger(io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What one round saw and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// The runner process holds its ledger.
    pub runner_alive: bool,
    /// Containers stopped because their lease ended.
    pub stopped: Vec<String>,
    /// Containers of the runner still there after the round.
    pub left: usize,
}

// === impl Watchdog ===

impl Watchdog {
    /// The lock that makes this the ledger's one watchdog; `None` when another holds it.
    pub fn claim(ledger_dir: &Path) -> io::Result<Option<File>> {
        std::fs::create_dir_all(ledger_dir)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(ledger_dir.join(WATCHDOG_LOCK))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(error)) => Err(error),
        }
    }

    /// Whether a watchdog holds the ledger now.
    pub fn is_watched(ledger_dir: &Path) -> io::Result<bool> {
        Ok(Self::claim(ledger_dir)?.is_none())
    }

    /// Rounds every `interval` until the runner is gone and none of its containers is left,
    /// or `shutdown`.
    pub async fn run(&self, engine: Arc<dyn ContainerRuntime>, shutdown: CancellationToken) {
        loop {
            // While the runner lives it stops its own containers: the watchdog only checks its
            // lock, and asks the engine nothing.
            if matches!(ledger::runner_alive(&self.ledger_dir), Ok(true)) {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(self.interval) => continue,
                }
            }
            match self.round(engine.as_ref()).await {
                Ok(round) if !round.runner_alive && round.left == 0 => {
                    tracing::info!(runner_id = %self.runner_id, "the runner is gone and nothing of it is left");
                    return;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "the watchdog cannot look at the runner's containers")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One look: with the runner gone, stops and removes every container of its ledger whose
    /// lease ends within `lead`, or that the ledger does not account for.
    pub async fn round(&self, engine: &dyn ContainerRuntime) -> Result<Round, WatchdogError> {
        let dir = &self.ledger_dir;
        // Only the containers this ledger accounts for: another life of the same runner id
        // may keep its ledger elsewhere.
        let ours = dir.display().to_string();
        let containers: Vec<_> = engine
            .list_labeled_containers(LABEL_RUNNER, Some(&self.runner_id))
            .await?
            .into_iter()
            .filter(|container| container.labels.get(LABEL_LEDGER) == Some(&ours))
            .collect();
        let runner_alive = match ledger::runner_alive(dir) {
            Ok(alive) => alive,
            // The ledger's directory is gone (the runner's data directory was removed): the
            // runner is gone for good, what is left of it is stopped and removed like any dead
            // runner's, and the watchdog ends instead of looking for ever.
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(error) => return Err(WatchdogError::Ledger(error)),
        };
        let mut round = Round {
            runner_alive,
            left: containers.len(),
            ..Round::default()
        };
        if runner_alive {
            // The runner stops its own containers when it cannot confirm their leases.
            return Ok(round);
        }
        let deadlines = ledger::deadlines(dir).unwrap_or_default();
        let now = SystemTime::now();
        // Network holders last, and only once no task container of the runner stays: a task
        // left to run until its lease nears its end keeps its holder's network.
        let (holders, task_containers): (Vec<_>, Vec<_>) = containers
            .iter()
            .partition(|container| container.labels.contains_key(LABEL_NETWORK_HOLDER));
        let mut tasks_stay = false;
        for container in task_containers.into_iter().chain(holders) {
            let task_id = container.labels.get(LABEL_TASK);
            let deadline = task_id.and_then(|task_id| deadlines.get(task_id));
            if deadline.is_some_and(|deadline| now + self.lead < *deadline) {
                tasks_stay = true;
                continue;
            }
            if tasks_stay && container.labels.contains_key(LABEL_NETWORK_HOLDER) {
                continue;
            }
            if container.running {
                tracing::warn!(
                    container = %container.id,
                    task_id = task_id.map_or("", String::as_str),
                    "the runner is gone: stopping its container before the lease ends"
                );
                engine.kill(&container.id).await?;
                round.stopped.push(container.id.to_string());
            }
            match engine.remove(&container.id).await {
                Ok(_) => {
                    round.left -= 1;
                    if let Some(task_id) = task_id {
                        ledger::forget(dir, task_id);
                    }
                }
                Err(error) => {
                    tracing::warn!(container = %container.id, %error, "cannot remove a container");
                }
            }
        }
        if round.left == 0 {
            // Entries of tasks whose containers are gone.
            for task_id in deadlines.keys() {
                ledger::forget(dir, task_id);
            }
        }
        Ok(round)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use stevedore_engine::ContainerSpec;
    use stevedore_engine::fake::{FakeEngine, FakeRun};
    use tokio::time::Instant;

    use super::*;
    use crate::ledger::LeaseLedger;

    async fn running(engine: &FakeEngine, runner: &str, task: &str, ledger: &Path) -> String {
        let mut spec = ContainerSpec::new("test/forever");
        spec.labels = BTreeMap::from([
            (LABEL_RUNNER.to_owned(), runner.to_owned()),
            (LABEL_TASK.to_owned(), task.to_owned()),
            (LABEL_LEDGER.to_owned(), ledger.display().to_string()),
        ]);
        let id = engine.create(&spec).await.unwrap();
        engine.start(&id).await.unwrap();
        id.to_string()
    }

    #[tokio::test]
    async fn a_gone_runners_containers_are_stopped_before_their_leases_end() {
        let engine = FakeEngine::new();
        engine.add_image("test/forever");
        engine.set_default_run(FakeRun::forever());
        let dir = tempfile::tempdir().unwrap();
        let watchdog = Watchdog {
            runner_id: "r1".into(),
            ledger_dir: dir.path().to_owned(),
            interval: Duration::from_millis(10),
            lead: Duration::from_secs(2),
        };
        let ledger = LeaseLedger::open(dir.path()).unwrap();
        let ending = running(&engine, "r1", "ending", dir.path()).await;
        let holds = running(&engine, "r1", "holds", dir.path()).await;
        let unrecorded = running(&engine, "r1", "unrecorded", dir.path()).await;
        let theirs = running(&engine, "r2", "ending", dir.path()).await;
        // The same runner id's container of another ledger (another life elsewhere).
        let elsewhere = tempfile::tempdir().unwrap();
        let other_life = running(&engine, "r1", "unrecorded", elsewhere.path()).await;
        let holder = {
            let mut spec = ContainerSpec::new("test/forever");
            spec.labels = BTreeMap::from([
                (LABEL_RUNNER.to_owned(), "r1".to_owned()),
                (LABEL_LEDGER.to_owned(), dir.path().display().to_string()),
                (LABEL_NETWORK_HOLDER.to_owned(), "tasks".to_owned()),
            ]);
            let id = engine.create(&spec).await.unwrap();
            engine.start(&id).await.unwrap();
            id.to_string()
        };
        ledger.promise("ending", Instant::now() + Duration::from_secs(1));
        ledger.promise("holds", Instant::now() + Duration::from_secs(60));

        // The runner lives: nothing is the watchdog's business.
        let round = watchdog.round(&engine).await.unwrap();
        assert!(round.runner_alive);
        assert!(round.stopped.is_empty());
        assert_eq!(
            round.left, 4,
            "this ledger's containers, its network holder's too"
        );
        assert!(engine.kills().is_empty());

        // The runner is gone: a lease ending within the lead goes now (a second before it
        // ends), so does a container the ledger does not account for; one holding a longer
        // lease stays until then, and so does the network holder it may have joined; another
        // runner's and another ledger's are not touched.
        drop(ledger);
        let round = watchdog.round(&engine).await.unwrap();
        assert!(!round.runner_alive);
        let mut stopped = round.stopped.clone();
        stopped.sort();
        let mut expected = vec![ending.clone(), unrecorded.clone()];
        expected.sort();
        assert_eq!(stopped, expected);
        assert_eq!(round.left, 2);
        let existing: Vec<String> = engine.existing().iter().map(ToString::to_string).collect();
        assert!(existing.contains(&holds) && existing.contains(&theirs));
        assert!(existing.contains(&other_life) && existing.contains(&holder));
        assert!(!existing.contains(&ending) && !existing.contains(&unrecorded));

        // Once the last task container goes, the holder goes with it.
        let later = Watchdog {
            lead: Duration::from_secs(120),
            ..watchdog
        };
        let round = later.round(&engine).await.unwrap();
        assert_eq!(round.left, 0);
        let existing: Vec<String> = engine.existing().iter().map(ToString::to_string).collect();
        assert!(!existing.contains(&holds) && !existing.contains(&holder));
    }

    /// Found by the soak: a watchdog whose runner stopped cleanly and whose data directory
    /// was then removed kept looking for ever, failing to open its ledger's lock.
    #[tokio::test]
    async fn a_watchdog_whose_ledger_was_removed_stops_what_is_left_and_ends() {
        let engine = FakeEngine::new();
        engine.add_image("test/forever");
        engine.set_default_run(FakeRun::forever());
        let data_dir = tempfile::tempdir().unwrap();
        let ledger_dir = data_dir.path().join("leases").join("r1");
        let watchdog = Watchdog {
            runner_id: "r1".into(),
            ledger_dir: ledger_dir.clone(),
            interval: Duration::from_millis(10),
            lead: Duration::from_secs(2),
        };
        drop(LeaseLedger::open(&ledger_dir).unwrap());
        let left = running(&engine, "r1", "orphan", &ledger_dir).await;
        std::fs::remove_dir_all(data_dir.path()).unwrap();

        // The runner is gone for good: its container still running is stopped and removed.
        let round = watchdog.round(&engine).await.unwrap();
        assert!(!round.runner_alive);
        assert_eq!(round.stopped, vec![left.clone()]);
        assert_eq!(round.left, 0);
        assert!(engine.existing().is_empty());
        tokio::time::timeout(
            Duration::from_secs(5),
            watchdog.run(Arc::new(engine), CancellationToken::new()),
        )
        .await
        .expect("the watchdog ends");
    }

    #[tokio::test]
    async fn a_watchdog_whose_ledger_is_gone_ends() {
        let engine = Arc::new(FakeEngine::new());
        let dir = tempfile::tempdir().unwrap();
        let watchdog = Watchdog {
            runner_id: "r1".into(),
            ledger_dir: dir.path().join("gone"),
            interval: Duration::from_millis(10),
            lead: Duration::from_secs(2),
        };
        tokio::time::timeout(
            Duration::from_secs(5),
            watchdog.run(engine, CancellationToken::new()),
        )
        .await
        .expect("the watchdog ended");
    }

    #[tokio::test]
    async fn only_one_watchdog_claims_a_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let first = Watchdog::claim(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(Watchdog::claim(dir.path()).unwrap().is_none());
        assert!(Watchdog::is_watched(dir.path()).unwrap());
        drop(first);
        assert!(!Watchdog::is_watched(dir.path()).unwrap());
    }
}
