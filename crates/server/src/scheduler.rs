//! The scheduler: turns due schedules into tasks. Every tick it asks the store for schedules
//! whose `next_start` has come, and fires each one for exactly that time: the store queues the
//! task, counts the run and moves `next_start` in one transaction, and refuses a second firing
//! for the same time. So a restart, or a second scheduler on the same store, cannot fire a time
//! twice, and a schedule is never fired before its time.
//!
//! After an outage a schedule fires once for the time it missed, and its next time is the next
//! one after now (`ScheduleSpec::next_fire` skips the rest): no burst of catch-up tasks.

use std::sync::Arc;
use std::time::Duration;

use stevedore_model::{Clock, Schedule, Timestamp};
use stevedore_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::EnqueueHook;

/// How the scheduler runs.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// How often it looks for due schedules: a task starts at most this late.
    pub interval: Duration,
    /// The most schedules fired in one store round trip; a tick keeps going while rounds are
    /// full.
    pub batch: u32,
}

/// What one pass over the due schedules did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FireReport {
    /// Schedules fired, one task each.
    pub fired: u32,
    /// Schedules that passed a fire time without a task: their `max_concurrency` of tasks
    /// were still unfinished.
    pub passed: u32,
    /// Schedules another scheduler fired (or a user cancelled) first.
    pub lost: u32,
    /// Schedules whose firing failed; they are tried again at the next tick.
    pub failed: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            batch: 100,
        }
    }
}

/// Runs until `shutdown` is cancelled. `on_enqueue` is called after a pass that queued tasks.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: SchedulerConfig,
    on_enqueue: Option<EnqueueHook>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match fire_due(store.as_ref(), clock.as_ref(), config.batch).await {
            Ok(report) => {
                if report.fired > 0
                    && let Some(hook) = &on_enqueue
                {
                    hook();
                }
            }
            Err(error) => tracing::error!(%error, "looking for due schedules failed"),
        }
    }
}

/// Fires every schedule due at the clock's time, `batch` at a time.
pub async fn fire_due(
    store: &dyn Store,
    clock: &dyn Clock,
    batch: u32,
) -> Result<FireReport, StoreError> {
    let batch = batch.max(1);
    let mut report = FireReport::default();
    loop {
        let now = clock.now();
        let due = store.due_schedules(now, batch).await?;
        let full = due.len() >= batch as usize;
        let before = report;
        for schedule in &due {
            fire_one(store, schedule, now, &mut report).await;
        }
        // A full round that fired nothing would find the same schedules again: stop there.
        if !full || (report.fired, report.passed) == (before.fired, before.passed) {
            return Ok(report);
        }
    }
}

// === helpers ===

async fn fire_one(store: &dyn Store, schedule: &Schedule, now: Timestamp, report: &mut FireReport) {
    // The store only returns schedules with a `next_start` at or before `now`; anything else
    // is not ours to fire.
    let Some(fired_at) = schedule.next_start.filter(|due| *due <= now) else {
        return;
    };
    let next_start = schedule
        .spec
        .next_fire(fired_at, schedule.run_count.saturating_add(1), now);
    match store
        .fire_schedule(&schedule.id, fired_at, next_start, now)
        .await
    {
        Ok(None) => {
            report.passed += 1;
            tracing::info!(
                schedule_id = %schedule.id,
                project_id = %schedule.project_id,
                %fired_at,
                "schedule passed a fire time: its max_concurrency of tasks are still unfinished"
            );
        }
        Ok(Some(task)) => {
            report.fired += 1;
            tracing::info!(
                schedule_id = %schedule.id,
                project_id = %schedule.project_id,
                task_id = %task.id,
                %fired_at,
                next_start = ?next_start,
                "schedule fired"
            );
        }
        Err(StoreError::Conflict(reason)) => {
            report.lost += 1;
            tracing::debug!(schedule_id = %schedule.id, %reason, "schedule already fired");
        }
        Err(error) => {
            report.failed += 1;
            tracing::error!(schedule_id = %schedule.id, %error, "firing a schedule failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration as TimeDelta;
    use stevedore_model::{ManualClock, ScheduleSpec, ScheduleStatus, ScheduleTiming};
    use stevedore_store::testsuite::image_spec;
    use stevedore_store::{Page, SqliteOptions, SqliteStore, SyncMode, TaskFilter};

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn every(seconds: u32, start_at: Timestamp, run_times: Option<u32>) -> ScheduleSpec {
        ScheduleSpec {
            code_name: "hello".into(),
            payload: "{}".into(),
            timing: ScheduleTiming::Every { seconds },
            start_at: Some(start_at),
            end_at: None,
            run_times,
            priority: 0,
            timeout_secs: 60,
            cluster: "default".into(),
            label: None,
            delay_secs: 0,
            max_concurrency: None,
        }
    }

    async fn store(dir: &tempfile::TempDir) -> (SqliteStore, String) {
        let store = SqliteStore::open(SqliteOptions {
            path: dir.path().join("stevedore.db"),
            sync: SyncMode::Normal,
        })
        .await
        .unwrap();
        let now = at("2026-01-01T00:00:00Z");
        let project = store.create_project("p", now).await.unwrap();
        store
            .push_code(&project.id, &image_spec("hello"), None, now)
            .await
            .unwrap();
        (store, project.id)
    }

    async fn task_count(store: &SqliteStore, project_id: &str) -> usize {
        store
            .list_tasks(
                project_id,
                &TaskFilter::default(),
                Page {
                    page: 1,
                    per_page: 100,
                },
            )
            .await
            .unwrap()
            .len()
    }

    #[tokio::test]
    async fn a_schedule_at_its_max_concurrency_passes_fire_times_until_a_task_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (store, project_id) = store(&dir).await;
        let start = at("2026-01-01T00:01:00Z");
        let spec = ScheduleSpec {
            max_concurrency: Some(1),
            delay_secs: 5,
            ..every(60, start, Some(2))
        };
        let created = store
            .create_schedules(&project_id, &[(spec, Some(start))], start)
            .await
            .unwrap();
        let id = created[0].id.clone();
        let clock = ManualClock::new(start);
        let report = fire_due(&store, &clock, 10).await.unwrap();
        assert_eq!((report.fired, report.passed), (1, 0));
        let all = Page {
            page: 1,
            per_page: 100,
        };
        let tasks = store
            .list_tasks(&project_id, &TaskFilter::default(), all)
            .await
            .unwrap();
        assert_eq!(tasks[0].due_at, start + TimeDelta::seconds(5));

        // Its task has not run yet: the next time passes, and is not one of its two runs.
        clock.set(at("2026-01-01T00:02:00Z"));
        let report = fire_due(&store, &clock, 10).await.unwrap();
        assert_eq!((report.fired, report.passed), (0, 1));
        let schedule = store.get_schedule(&project_id, &id).await.unwrap();
        assert_eq!(
            (schedule.status, schedule.run_count, schedule.next_start),
            (
                ScheduleStatus::Scheduled,
                1,
                Some(at("2026-01-01T00:03:00Z"))
            )
        );

        store
            .cancel_task(&project_id, &tasks[0].id, at("2026-01-01T00:02:30Z"))
            .await
            .unwrap();
        clock.set(at("2026-01-01T00:03:00Z"));
        assert_eq!(fire_due(&store, &clock, 10).await.unwrap().fired, 1);
        let schedule = store.get_schedule(&project_id, &id).await.unwrap();
        assert_eq!(
            (schedule.status, schedule.run_count),
            (ScheduleStatus::Complete, 2)
        );
        assert_eq!(task_count(&store, &project_id).await, 2);
    }

    #[tokio::test]
    async fn fires_on_time_never_early_and_skips_a_missed_window() {
        let dir = tempfile::tempdir().unwrap();
        let (store, project_id) = store(&dir).await;
        let start = at("2026-01-01T00:01:00Z");
        let spec = every(60, start, None);
        let first = spec.first_fire(at("2026-01-01T00:00:00Z"));
        let created = store
            .create_schedules(&project_id, &[(spec, first)], at("2026-01-01T00:00:00Z"))
            .await
            .unwrap();
        let id = created[0].id.clone();
        let clock = ManualClock::new(start - TimeDelta::milliseconds(1));

        // A millisecond early: nothing.
        assert_eq!(fire_due(&store, &clock, 10).await.unwrap().fired, 0);
        assert_eq!(task_count(&store, &project_id).await, 0);

        clock.set(start);
        assert_eq!(fire_due(&store, &clock, 10).await.unwrap().fired, 1);
        // The same instant again: the time already fired.
        assert_eq!(fire_due(&store, &clock, 10).await.unwrap().fired, 0);
        let schedule = store.get_schedule(&project_id, &id).await.unwrap();
        assert_eq!(schedule.run_count, 1);
        assert_eq!(schedule.next_start, Some(at("2026-01-01T00:02:00Z")));

        // Down for an hour: one task, then the next slot after now.
        clock.set(at("2026-01-01T01:02:30Z"));
        assert_eq!(fire_due(&store, &clock, 10).await.unwrap().fired, 1);
        assert_eq!(fire_due(&store, &clock, 10).await.unwrap().fired, 0);
        let schedule = store.get_schedule(&project_id, &id).await.unwrap();
        assert_eq!(schedule.run_count, 2);
        assert_eq!(schedule.last_run_time, Some(at("2026-01-01T01:02:30Z")));
        assert_eq!(schedule.next_start, Some(at("2026-01-01T01:03:00Z")));
        assert_eq!(task_count(&store, &project_id).await, 2);
    }

    #[tokio::test]
    async fn run_times_completes_and_cancelled_schedules_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (store, project_id) = store(&dir).await;
        let start = at("2026-01-01T00:01:00Z");
        let limited = every(10, start, Some(2));
        let cancelled = every(10, start, None);
        let first = limited.first_fire(start);
        let created = store
            .create_schedules(
                &project_id,
                &[(limited, first), (cancelled, first)],
                at("2026-01-01T00:00:00Z"),
            )
            .await
            .unwrap();
        store
            .cancel_schedule(&project_id, &created[1].id, start)
            .await
            .unwrap();
        let clock = ManualClock::new(start);
        for _ in 0..5 {
            fire_due(&store, &clock, 1).await.unwrap();
            clock.advance(TimeDelta::seconds(10));
        }
        let limited = store
            .get_schedule(&project_id, &created[0].id)
            .await
            .unwrap();
        assert_eq!(limited.status, ScheduleStatus::Complete);
        assert_eq!(limited.run_count, 2);
        assert_eq!(limited.next_start, None);
        let cancelled = store
            .get_schedule(&project_id, &created[1].id)
            .await
            .unwrap();
        assert_eq!(cancelled.status, ScheduleStatus::Cancelled);
        assert_eq!(cancelled.run_count, 0);
        assert_eq!(task_count(&store, &project_id).await, 2);
    }
}
