//! Usage reports: finished tasks per bucket and revision, queue waits, a project's counts.

use chrono::Duration;
use stevedore_model::{CodeKind, CodeSpec, Task, TaskOutcome, TaskStatus, Timestamp};

use super::{at, enqueue_one, exited, image_spec, lease_one, new_task, project, project_with_code};
use crate::{CodeStats, QueueWait, Result, RunReport, StatsWindow, Store, UsageQuery, UsageRow};

/// Runs one task of `code_name` to `outcome`: queued and leased a second before `start`, its
/// container up from `start` to `end`. Only this task may be queued meanwhile.
async fn run_task(
    store: &dyn Store,
    project_id: &str,
    code_name: &str,
    outcome: &TaskOutcome,
    start: Timestamp,
    end: Timestamp,
) -> Result<Task> {
    let queued_at = start - Duration::seconds(1);
    let id = enqueue_one(store, project_id, new_task(code_name), queued_at).await?;
    let leased = lease_one(store, queued_at).await?;
    store
        .mark_running(&id, leased.lease.token, start, start)
        .await?;
    let report = RunReport {
        start_time: Some(start),
        end_time: Some(end),
        ..RunReport::default()
    };
    store
        .complete(&id, leased.lease.token, outcome, &report, end)
        .await
}

fn runtime_spec(name: &str, runtime: &str) -> CodeSpec {
    CodeSpec {
        kind: CodeKind::Runtime {
            runtime: runtime.to_owned(),
            file_name: "main.py".to_owned(),
            stack: None,
        },
        ..image_spec(name)
    }
}

fn millis(secs: i64, millis: i64) -> Timestamp {
    at(secs) + Duration::milliseconds(millis)
}

/// `(bucket second, code, rev, [complete, error, timeout, cancelled], compute_ms)` of a row.
type UsageSummary = (i64, String, u32, [u64; 4], u64);

fn summarize(rows: &[UsageRow]) -> Vec<UsageSummary> {
    rows.iter()
        .map(|row| {
            (
                (row.bucket_start - at(0)).num_seconds(),
                row.code_name.clone(),
                row.code_rev,
                [row.complete, row.error, row.timeout, row.cancelled],
                row.compute_ms,
            )
        })
        .collect()
}

pub async fn usage_sums_finished_tasks_per_bucket_and_revision(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .push_code(&acme.id, &runtime_spec("py", "python"), None, at(0))
        .await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;

    let ok = exited(0);
    // Ended a moment before the window opens: left out.
    run_task(store, &acme.id, "hello", &ok, at(5), millis(19, 999)).await?;
    // Ended as the window opens: counted, in the bucket of second 0 (buckets follow the epoch,
    // not `from`).
    run_task(store, &acme.id, "hello", &ok, at(10), at(20)).await?;
    run_task(
        store,
        &acme.id,
        "hello",
        &exited(1),
        at(45),
        millis(50, 250),
    )
    .await?;
    // Another project's task in the same window: never counted.
    run_task(store, &other.id, "hello", &ok, at(30), at(40)).await?;
    let timed_out = TaskOutcome::TimedOut { timeout_secs: 4 };
    run_task(store, &acme.id, "hello", &timed_out, at(61), at(65)).await?;
    run_task(store, &acme.id, "py", &ok, at(62), at(70)).await?;
    // Cancelled while queued: a failure-free end with no compute time.
    let cancelled = enqueue_one(store, &acme.id, new_task("hello"), at(74)).await?;
    store.cancel_task(&acme.id, &cancelled, at(75)).await?;
    // A new revision is counted apart from the first.
    store
        .push_code(&acme.id, &image_spec("hello"), None, at(76))
        .await?;
    run_task(store, &acme.id, "hello", &ok, at(78), at(80)).await?;
    // Ended as the window closes: left out.
    run_task(store, &acme.id, "hello", &ok, at(100), at(120)).await?;
    // Still running: not finished, not counted.
    enqueue_one(store, &acme.id, new_task("hello"), at(110)).await?;
    let running = lease_one(store, at(110)).await?;
    store
        .mark_running(&running.task.id, running.lease.token, at(111), at(111))
        .await?;

    let per_minute = UsageQuery {
        from: at(20),
        to: at(120),
        bucket_secs: 60,
    };
    let rows = store.usage(&acme.id, &per_minute).await?;
    let expected: Vec<UsageSummary> = vec![
        (0, "hello".to_owned(), 1, [1, 1, 0, 0], 10_000 + 5_250),
        (60, "hello".to_owned(), 1, [0, 0, 1, 1], 4_000),
        (60, "hello".to_owned(), 2, [1, 0, 0, 0], 2_000),
        (60, "py".to_owned(), 1, [1, 0, 0, 0], 8_000),
    ];
    assert_eq!(summarize(&rows), expected);
    let py = rows
        .iter()
        .find(|row| row.code_name == "py")
        .expect("a py row");
    assert_eq!(
        py.kind,
        CodeKind::Runtime {
            runtime: "python".to_owned(),
            file_name: "main.py".to_owned(),
            stack: None,
        }
    );
    assert!(matches!(rows[0].kind, CodeKind::Image { .. }));
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    assert!(
        rows.iter()
            .filter(|row| row.code_name == "hello")
            .all(|row| row.code_id == code.id)
    );

    // One hour-wide bucket holds the whole window.
    let per_hour = UsageQuery {
        bucket_secs: 3600,
        ..per_minute
    };
    assert_eq!(
        summarize(&store.usage(&acme.id, &per_hour).await?),
        vec![
            (0, "hello".to_owned(), 1, [1, 1, 1, 1], 19_250),
            (0, "hello".to_owned(), 2, [1, 0, 0, 0], 2_000),
            (0, "py".to_owned(), 1, [1, 0, 0, 0], 8_000),
        ]
    );

    // A deleted code's finished tasks still count, with their revision's kind.
    let py_code = store.get_code_by_name(&acme.id, "py").await?;
    store.delete_code(&acme.id, &py_code.id, at(130)).await?;
    let after_delete = store.usage(&acme.id, &per_minute).await?;
    assert_eq!(summarize(&after_delete), expected);

    // The other project sees only its own task; an empty window has no rows.
    assert_eq!(
        summarize(&store.usage(&other.id, &per_minute).await?),
        vec![(0, "hello".to_owned(), 1, [1, 0, 0, 0], 10_000)]
    );
    let empty = UsageQuery {
        from: at(200),
        to: at(300),
        bucket_secs: 60,
    };
    assert!(store.usage(&acme.id, &empty).await?.is_empty());
    Ok(())
}

/// Queues a task of `hello` at `queued` (due at once), leases it at `leased` and starts its
/// container at `started`. Only this task may be queued meanwhile.
async fn start_task(
    store: &dyn Store,
    project_id: &str,
    queued: i64,
    leased: i64,
    started: Timestamp,
) -> Result<()> {
    let id = enqueue_one(store, project_id, new_task("hello"), at(queued)).await?;
    let lease = lease_one(store, at(leased)).await?;
    assert_eq!(lease.task.id, id);
    store
        .mark_running(&id, lease.lease.token, started, started)
        .await?;
    Ok(())
}

pub async fn queue_waits_sample_the_latest_starts(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    // Started before the window.
    start_task(store, &acme.id, 0, 1, at(1)).await?;
    start_task(store, &acme.id, 10, 13, millis(13, 500)).await?;
    start_task(store, &other.id, 20, 25, at(25)).await?;
    // A delayed task waits from its due time, not from when it was queued.
    let mut delayed = new_task("hello");
    delayed.delay_secs = 20;
    let id = enqueue_one(store, &acme.id, delayed, at(10)).await?;
    let lease = lease_one(store, at(31)).await?;
    assert_eq!(lease.task.id, id);
    store
        .mark_running(&id, lease.lease.token, at(32), at(32))
        .await?;
    // The container's clock ran behind: the start precedes the due time, the wait is zero.
    start_task(store, &acme.id, 40, 40, millis(39, 900)).await?;
    // Started as the window closes.
    start_task(store, &acme.id, 50, 60, at(60)).await?;

    let waits = store.queue_waits(&acme.id, at(10), at(60), 100).await?;
    let wait = |secs: i64, millis_part: i64, wait_ms: u64| QueueWait {
        started_at: millis(secs, millis_part),
        wait_ms,
    };
    assert_eq!(
        waits,
        vec![wait(39, 900, 0), wait(32, 0, 2_000), wait(13, 500, 3_500)]
    );
    assert_eq!(
        store.queue_waits(&acme.id, at(10), at(60), 2).await?,
        waits[..2].to_vec(),
        "the limit keeps the latest starts"
    );
    assert_eq!(
        store.queue_waits(&other.id, at(0), at(100), 100).await?,
        vec![wait(25, 0, 5_000)]
    );
    Ok(())
}

pub async fn project_counts_count_every_code_of_the_project(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .push_code(&acme.id, &image_spec("bye"), None, at(0))
        .await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    run_task(store, &acme.id, "hello", &exited(0), at(2), at(3)).await?;
    run_task(store, &acme.id, "bye", &exited(2), at(4), at(5)).await?;
    run_task(store, &other.id, "hello", &exited(2), at(6), at(7)).await?;
    store
        .enqueue(&acme.id, &[new_task("hello"), new_task("bye")], at(8))
        .await?;
    store
        .enqueue(&other.id, &[new_task("hello")], at(8))
        .await?;

    let nonzero = |stats: CodeStats| -> Vec<(TaskStatus, u64)> {
        assert_eq!(
            stats.by_status.len(),
            TaskStatus::ALL.len(),
            "zeros included"
        );
        stats
            .by_status
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .collect()
    };
    assert_eq!(
        nonzero(
            store
                .project_counts(&acme.id, StatsWindow::default())
                .await?
        ),
        vec![
            (TaskStatus::Queued, 2),
            (TaskStatus::Complete, 1),
            (TaskStatus::Error, 1)
        ]
    );
    let early = StatsWindow {
        updated_from: None,
        updated_to: Some(at(4)),
    };
    assert_eq!(
        nonzero(store.project_counts(&acme.id, early).await?),
        vec![(TaskStatus::Complete, 1)]
    );
    assert_eq!(
        nonzero(
            store
                .project_counts("no-such-project", StatsWindow::default())
                .await?
        ),
        vec![]
    );
    Ok(())
}
