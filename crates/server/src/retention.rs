//! Retention: what finished work leaves behind is removed after an age the operator sets, so
//! the store stops growing with the tasks it has run. One pass walks its steps in order:
//!
//! ```text
//! sizes before ─▶ task logs ─▶ task payloads ─▶ code packages ─▶ sizes after
//!                 (ended before now - log age)   (all but each code's latest revisions)
//! ```
//!
//! Each step removes in chunks of `Pace::chunk_rows`, each chunk one short transaction of the
//! store's, with a pause between chunks (at least as long as the chunk took) so that a pass
//! never holds SQLite's one writer for long: other writes wait for one chunk at most. Task rows stay (history, usage, stats); a
//! removed log answers 410 and a removed payload reads empty.
//!
//! The leader runs a pass every `RetentionConfig::interval` ([`run`]); `stevedore gc` runs one
//! now ([`run_pass`]). Both record the same metrics: what each chunk removed as it commits,
//! and the sizes before and after the pass. A pass stopped half-way (shutdown, lost
//! leadership) has removed what it removed; the next one goes on from there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stevedore_metrics::{StoredBytes, StoredKind};
use stevedore_model::{Clock, Timestamp};
use stevedore_store::{PruneCursor, Store, StoreError, TaskData};
use tokio_util::sync::CancellationToken;

/// What is kept, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// A finished task's log is kept this long after the task ended.
    pub log_age: chrono::TimeDelta,
    /// A finished task's payload is kept this long after the task ended.
    pub payload_age: chrono::TimeDelta,
    /// The packages of each code's latest revisions that are kept; older revisions lose
    /// theirs.
    pub keep_revisions: u32,
}

/// How a pass spreads its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The most tasks (or revisions) one chunk touches.
    pub chunk_rows: u32,
    /// The least pause between two chunks, for the writes that waited. A chunk that took
    /// longer (a busy disk, a checkpoint) is followed by a pause as long as it took, so a pass
    /// never takes more than half of SQLite's writer.
    pub pause: Duration,
}

/// The leader's duty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    pub policy: RetentionPolicy,
    /// From the start of one pass to the start of the next.
    pub interval: Duration,
    pub pace: Pace,
}

/// What a step removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Tasks whose log (or payload) is gone.
    pub tasks: u64,
    pub bytes: u64,
}

/// What the packages step removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackagesRemoved {
    pub revisions: u64,
    pub packages: u64,
    pub bytes: u64,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    pub before: StoredBytes,
    pub after: StoredBytes,
    pub logs: Removed,
    pub payloads: Removed,
    pub packages: PackagesRemoved,
    /// Every step ran to its end; `false` when the pass was stopped between two chunks.
    pub finished: bool,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepEnd {
    Done,
    Stopped,
}

// === impl RetentionPolicy ===

impl RetentionPolicy {
    /// Tasks that ended before this lose their logs.
    pub fn logs_before(&self, now: Timestamp) -> Timestamp {
        before(now, self.log_age)
    }

    /// Tasks that ended before this lose their payloads.
    pub fn payloads_before(&self, now: Timestamp) -> Timestamp {
        before(now, self.payload_age)
    }
}

impl Default for RetentionPolicy {
    /// Thirty days of logs and payloads, ten revisions' packages per code.
    fn default() -> Self {
        RetentionPolicy {
            log_age: chrono::TimeDelta::days(30),
            payload_age: chrono::TimeDelta::days(30),
            keep_revisions: 10,
        }
    }
}

// === impl Pace ===

impl Default for Pace {
    /// 500 tasks a chunk (a few milliseconds of SQLite's writer), 20 ms apart.
    fn default() -> Self {
        Pace {
            chunk_rows: 500,
            pause: Duration::from_millis(20),
        }
    }
}

impl Pace {
    /// Waits after a chunk that took `took`; `false` when `stop` came first.
    async fn pause(&self, took: Duration, stop: &CancellationToken) -> bool {
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(self.pause.max(took)) => true,
        }
    }
}

// === impl RetentionReport ===

impl RetentionReport {
    /// Whether the pass removed anything at all.
    pub fn removed_anything(&self) -> bool {
        self.logs.tasks + self.payloads.tasks + self.packages.revisions > 0
            || self.logs.bytes + self.payloads.bytes + self.packages.bytes > 0
    }
}

/// Runs a pass every `config.interval`, the first at once, until `shutdown`.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: RetentionConfig,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match run_pass(
            store.as_ref(),
            &config.policy,
            &config.pace,
            clock.now(),
            &shutdown,
        )
        .await
        {
            Ok(report) if report.removed_anything() => tracing::info!(
                logs = report.logs.tasks,
                log_bytes = report.logs.bytes,
                payloads = report.payloads.tasks,
                payload_bytes = report.payloads.bytes,
                package_revisions = report.packages.revisions,
                package_bytes = report.packages.bytes,
                stored_before = ?report.before,
                stored_after = ?report.after,
                finished = report.finished,
                "retention removed finished work's data"
            ),
            Ok(report) => {
                tracing::debug!(stored = ?report.after, "retention found nothing to remove")
            }
            Err(error) => tracing::error!(%error, "a retention pass failed; the next one goes on"),
        }
    }
}

/// One pass: task logs, task payloads, then packages, each in chunks paced by `pace`, with
/// `now` as the time the ages count back from. Stops between two chunks when `stop` is
/// cancelled. Records the metrics as it goes.
pub async fn run_pass(
    store: &dyn Store,
    policy: &RetentionPolicy,
    pace: &Pace,
    now: Timestamp,
    stop: &CancellationToken,
) -> Result<RetentionReport, StoreError> {
    let before = stored_bytes(store).await?;
    stevedore_metrics::stored_bytes(&before);
    let mut report = RetentionReport {
        before,
        after: before,
        logs: Removed::default(),
        payloads: Removed::default(),
        packages: PackagesRemoved::default(),
        finished: false,
    };
    let mut end = prune_task_data(
        store,
        TaskData::Log,
        policy.logs_before(now),
        pace,
        now,
        stop,
        &mut report.logs,
    )
    .await?;
    if end == StepEnd::Done {
        end = prune_task_data(
            store,
            TaskData::Payload,
            policy.payloads_before(now),
            pace,
            now,
            stop,
            &mut report.payloads,
        )
        .await?;
    }
    if end == StepEnd::Done {
        end = prune_packages(
            store,
            policy.keep_revisions,
            pace,
            stop,
            &mut report.packages,
        )
        .await?;
    }
    report.finished = end == StepEnd::Done;
    report.after = stored_bytes(store).await?;
    stevedore_metrics::retention_run(&report.before, &report.after, now);
    Ok(report)
}

/// The bytes the store holds of each kind: the store's kept totals, so cheap at every scrape.
pub async fn stored_bytes(store: &dyn Store) -> Result<StoredBytes, StoreError> {
    let sizes = store.data_sizes().await?;
    Ok(StoredBytes {
        logs: sizes.log_bytes,
        payloads: sizes.payload_bytes,
        packages: store.package_bytes().await?,
    })
}

// === step: task logs and payloads ===

/// Walks the finished tasks that ended before `finished_before` from the oldest, removing
/// their `data` a chunk at a time, adding to `removed` as each chunk commits.
async fn prune_task_data(
    store: &dyn Store,
    data: TaskData,
    finished_before: Timestamp,
    pace: &Pace,
    now: Timestamp,
    stop: &CancellationToken,
    removed: &mut Removed,
) -> Result<StepEnd, StoreError> {
    let kind = match data {
        TaskData::Log => StoredKind::Logs,
        TaskData::Payload => StoredKind::Payloads,
    };
    let mut after: Option<PruneCursor> = None;
    loop {
        let started = Instant::now();
        let chunk = store
            .prune_task_data(data, finished_before, after.as_ref(), pace.chunk_rows, now)
            .await?;
        removed.tasks += chunk.removed;
        removed.bytes += chunk.bytes;
        stevedore_metrics::retention_removed(kind, chunk.removed, chunk.bytes);
        after = chunk.next;
        if after.is_none() {
            return Ok(StepEnd::Done);
        }
        if !pace.pause(started.elapsed(), stop).await {
            return Ok(StepEnd::Stopped);
        }
    }
}

// === step: packages ===

/// Removes the packages of each code's revisions but its latest `keep_revisions` (and of
/// deleted codes; never one a task not yet finished pinned), then the packages no revision
/// holds, a chunk at a time, adding to `removed` as each chunk commits. Done when a chunk
/// removed nothing.
async fn prune_packages(
    store: &dyn Store,
    keep_revisions: u32,
    pace: &Pace,
    stop: &CancellationToken,
    removed: &mut PackagesRemoved,
) -> Result<StepEnd, StoreError> {
    loop {
        let started = Instant::now();
        let chunk = store
            .prune_packages(keep_revisions, pace.chunk_rows)
            .await?;
        removed.revisions += chunk.revisions;
        removed.packages += chunk.packages;
        removed.bytes += chunk.bytes;
        stevedore_metrics::retention_removed(StoredKind::Packages, chunk.revisions, chunk.bytes);
        if chunk.revisions == 0 && chunk.packages == 0 && chunk.bytes == 0 {
            return Ok(StepEnd::Done);
        }
        if !pace.pause(started.elapsed(), stop).await {
            return Ok(StepEnd::Stopped);
        }
    }
}

/// `now - age`, or the earliest time there is for an age past it.
fn before(now: Timestamp, age: chrono::TimeDelta) -> Timestamp {
    now.checked_sub_signed(age)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use stevedore_model::{NewTask, TaskOutcome};
    use stevedore_store::testsuite::{at, image_spec, lease_request, new_task};
    use stevedore_store::{RunReport, SqliteOptions, SqliteStore};

    use super::*;

    /// A store with `count` tasks that finished at `at(10)`, each having printed `log` and
    /// been given `payload`.
    async fn finished_tasks(
        count: usize,
        payload: &str,
        log: &[u8],
    ) -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteOptions::new(dir.path().join("db")))
            .await
            .unwrap();
        let project = store.create_project("acme", at(0)).await.unwrap();
        store
            .push_code(&project.id, &image_spec("hello"), None, at(0))
            .await
            .unwrap();
        let task = NewTask {
            payload: payload.to_owned(),
            ..new_task("hello")
        };
        store
            .enqueue(&project.id, &vec![task; count], at(1))
            .await
            .unwrap();
        let leased = store
            .lease(
                &lease_request("runner", u32::try_from(count).unwrap()),
                at(2),
            )
            .await
            .unwrap();
        for leased in leased {
            let (id, token) = (&leased.task.id, leased.lease.token);
            store.mark_running(id, token, at(3), at(3)).await.unwrap();
            store
                .append_log(id, token, log, 1 << 20, at(4))
                .await
                .unwrap();
            let exited = TaskOutcome::Exited { exit_code: 0 };
            store
                .complete(id, token, &exited, &RunReport::default(), at(10))
                .await
                .unwrap();
        }
        (store, dir)
    }

    const FAST: Pace = Pace {
        chunk_rows: 2,
        pause: Duration::from_millis(1),
    };

    #[tokio::test]
    async fn a_pass_removes_old_logs_and_payloads_in_chunks_and_reports_the_sizes() {
        let (store, _dir) = finished_tasks(5, "{\"n\":1}", b"0123456789").await;
        let policy = RetentionPolicy {
            log_age: chrono::TimeDelta::seconds(60),
            payload_age: chrono::TimeDelta::seconds(600),
            keep_revisions: 1,
        };
        let stop = CancellationToken::new();
        // Both ages still ahead: nothing goes.
        let report = run_pass(&store, &policy, &FAST, at(30), &stop)
            .await
            .unwrap();
        assert!(!report.removed_anything() && report.finished);
        assert_eq!(report.before, report.after);
        assert_eq!(
            report.before,
            StoredBytes {
                logs: 50,
                payloads: 35,
                packages: 0
            }
        );
        // The logs' age passed, the payloads' not yet.
        let report = run_pass(&store, &policy, &FAST, at(100), &stop)
            .await
            .unwrap();
        assert_eq!(
            report.logs,
            Removed {
                tasks: 5,
                bytes: 50
            }
        );
        assert_eq!(report.payloads, Removed::default());
        assert_eq!((report.after.logs, report.after.payloads), (0, 35));
        let report = run_pass(&store, &policy, &FAST, at(1000), &stop)
            .await
            .unwrap();
        assert_eq!(report.logs, Removed::default());
        assert_eq!(
            report.payloads,
            Removed {
                tasks: 5,
                bytes: 35
            }
        );
        assert_eq!(report.after, StoredBytes::default());
    }

    #[tokio::test]
    async fn a_stopped_pass_ends_after_the_chunk_it_was_in() {
        let (store, _dir) = finished_tasks(5, "{}", b"log").await;
        let stop = CancellationToken::new();
        stop.cancel();
        let policy = RetentionPolicy::default();
        let now = at(0) + chrono::TimeDelta::days(365);
        let report = run_pass(&store, &policy, &FAST, now, &stop).await.unwrap();
        assert!(!report.finished);
        assert_eq!(report.logs, Removed { tasks: 2, bytes: 6 });
        assert_eq!(report.payloads, Removed::default());
        assert_eq!(report.after.logs, 9);
        // The next pass goes on from there.
        let report = run_pass(&store, &policy, &FAST, now, &CancellationToken::new())
            .await
            .unwrap();
        assert!(report.finished);
        assert_eq!(report.logs, Removed { tasks: 3, bytes: 9 });
        assert_eq!(
            report.payloads,
            Removed {
                tasks: 5,
                bytes: 10
            }
        );
    }

    #[test]
    fn ages_count_back_from_now_and_never_overflow() {
        let now = chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap();
        let policy = RetentionPolicy {
            log_age: chrono::TimeDelta::days(1),
            payload_age: chrono::TimeDelta::zero(),
            keep_revisions: 1,
        };
        assert_eq!(policy.logs_before(now), now - chrono::TimeDelta::days(1));
        assert_eq!(policy.payloads_before(now), now);
        assert_eq!(
            before(now, chrono::TimeDelta::MAX),
            chrono::DateTime::<chrono::Utc>::MIN_UTC
        );
    }
}
