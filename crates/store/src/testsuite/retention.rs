//! Retention: finished tasks' logs and payloads removed in bounded chunks, the task rows kept,
//! unfinished tasks never touched, and the kept byte totals right throughout.

use chrono::Duration;
use stevedore_model::{NewTask, Task, TaskOutcome, TaskStatus, Timestamp};

use super::{ALL, at, enqueue_one, exited, lease_one, new_task, project_with_code};
use crate::{
    DataSizes, PruneCursor, Result, RunReport, Store, StoreError, TaskData, TaskDataPrune,
    TaskFilter, UsageQuery,
};

/// The log cap the tasks here are appended with: far above what they print.
const CAP: u64 = 1 << 20;

/// Runs one queued task of `payload` to `outcome`, printing `log`, its container ending at
/// `end`. Only this task may be queued meanwhile.
async fn finish(
    store: &dyn Store,
    project_id: &str,
    payload: &str,
    log: &[u8],
    outcome: &TaskOutcome,
    end: Timestamp,
) -> Result<Task> {
    let new = NewTask {
        payload: payload.to_owned(),
        ..new_task("hello")
    };
    let queued_at = end - Duration::seconds(2);
    let id = enqueue_one(store, project_id, new, queued_at).await?;
    let leased = lease_one(store, queued_at).await?;
    let token = leased.lease.token;
    store.mark_running(&id, token, queued_at, queued_at).await?;
    store.append_log(&id, token, log, CAP, queued_at).await?;
    let report = RunReport {
        end_time: Some(end),
        ..RunReport::default()
    };
    store.complete(&id, token, outcome, &report, end).await
}

/// Every call of a walk until it is done, with `max_rows` per call: the calls' results.
async fn walk(
    store: &dyn Store,
    data: TaskData,
    finished_before: Timestamp,
    max_rows: u32,
    now: Timestamp,
) -> Result<Vec<TaskDataPrune>> {
    let mut calls = Vec::new();
    let mut after: Option<PruneCursor> = None;
    loop {
        let call = store
            .prune_task_data(data, finished_before, after.as_ref(), max_rows, now)
            .await?;
        assert!(call.passed <= u64::from(max_rows), "{call:?}");
        after = call.next.clone();
        calls.push(call);
        if after.is_none() {
            return Ok(calls);
        }
    }
}

fn sizes(log_bytes: u64, payload_bytes: u64) -> DataSizes {
    DataSizes {
        log_bytes,
        payload_bytes,
    }
}

fn assert_removed<T: std::fmt::Debug>(result: Result<T>, task_id: &str, at: Timestamp) {
    match result {
        Err(StoreError::Removed { what, at: removed }) => {
            assert!(what.contains(task_id), "{what:?} should name {task_id}");
            assert_eq!(removed, at);
        }
        other => panic!("expected the log of {task_id} removed, got {other:?}"),
    }
}

pub async fn retention_removes_only_what_finished_before_the_cutoff(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    // Finished before the cutoff (100): a success, a failure, and a queued task cancelled
    // with nothing logged.
    let old = finish(
        store,
        &acme.id,
        "{\"n\":1}",
        b"old log\n",
        &exited(0),
        at(10),
    )
    .await?;
    let failed = finish(
        store,
        &acme.id,
        "{\"n\":2}",
        b"failed\n",
        &exited(1),
        at(20),
    )
    .await?;
    let cancelled = enqueue_one(store, &acme.id, new_task("hello"), at(25)).await?;
    store.cancel_task(&acme.id, &cancelled, at(30)).await?;
    // Finished after it.
    let recent = finish(
        store,
        &acme.id,
        "{\"n\":3}",
        b"recent\n",
        &exited(0),
        at(150),
    )
    .await?;
    // Still running, with a log, and queued, both since long before the cutoff.
    let running = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let leased = lease_one(store, at(1)).await?;
    assert_eq!(leased.task.id, running);
    store
        .mark_running(&running, leased.lease.token, at(2), at(2))
        .await?;
    store
        .append_log(&running, leased.lease.token, b"still going\n", CAP, at(3))
        .await?;
    let queued = enqueue_one(store, &acme.id, new_task("hello"), at(4)).await?;

    // Three `{"n":N}` and three `{}`; four logs.
    let payloads = 3 * 7 + 3 * 2;
    let logs = 8 + 7 + 7 + 12;
    assert_eq!(store.data_sizes().await?, sizes(logs, payloads));

    let pruned_at = at(1000);
    let calls = walk(store, TaskData::Log, at(100), 100, pruned_at).await?;
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].passed, calls[0].removed, calls[0].bytes),
        (3, 2, 8 + 7)
    );
    assert_eq!(store.data_sizes().await?, sizes(logs - 15, payloads));

    // The rows stay, with their sizes and history; the logs are gone and say so.
    let task = store.get_task(&acme.id, &old.id).await?;
    assert_eq!(task.log_removed_at, Some(pruned_at));
    assert_eq!(task.log_size, 8);
    assert_eq!(task.status, TaskStatus::Complete);
    assert_eq!(
        task.payload, "{\"n\":1}",
        "the payload has an age of its own"
    );
    assert_removed(store.get_log(&acme.id, &old.id).await, &old.id, pruned_at);
    assert_removed(
        store.get_log_since(&acme.id, &failed.id, 0, 100).await,
        &failed.id,
        pruned_at,
    );
    // A task that printed nothing still reads as one without a log.
    super::assert_not_found(store.get_log(&acme.id, &cancelled).await, "log");
    assert_eq!(
        store
            .get_log_since(&acme.id, &cancelled, 0, 100)
            .await?
            .size,
        0
    );
    // What finished later, and what has not finished, keep everything.
    assert_eq!(store.get_log(&acme.id, &recent.id).await?, b"recent\n");
    assert_eq!(store.get_log(&acme.id, &running).await?, b"still going\n");
    for id in [&recent.id, &running, &queued] {
        let task = store.get_task(&acme.id, id).await?;
        assert_eq!(task.log_removed_at, None);
        assert_eq!(task.payload_removed_at, None);
    }

    let calls = walk(store, TaskData::Payload, at(100), 100, pruned_at).await?;
    assert_eq!(
        (calls[0].passed, calls[0].removed, calls[0].bytes),
        (3, 3, 7 + 7 + 2)
    );
    assert_eq!(store.data_sizes().await?, sizes(logs - 15, payloads - 16));
    let task = store.get_task(&acme.id, &failed.id).await?;
    assert_eq!(
        (task.payload.as_str(), task.payload_removed_at),
        ("", Some(pruned_at))
    );
    assert_eq!(
        store.get_task(&acme.id, &recent.id).await?.payload,
        "{\"n\":3}"
    );
    assert_eq!(store.get_task(&acme.id, &running).await?.payload, "{}");
    assert_eq!(store.get_task(&acme.id, &queued).await?.payload, "{}");

    // Nothing is left before the cutoff: a second walk passes nothing.
    for data in [TaskData::Log, TaskData::Payload] {
        assert_eq!(
            walk(store, data, at(100), 100, at(1001)).await?,
            vec![TaskDataPrune::default()]
        );
    }
    // The running task keeps its log while it goes on and after it finishes.
    store
        .append_log(&running, leased.lease.token, b"done\n", CAP, at(1002))
        .await?;
    let report = RunReport::default();
    store
        .complete(&running, leased.lease.token, &exited(0), &report, at(1003))
        .await?;
    assert_eq!(
        store.get_log(&acme.id, &running).await?,
        b"still going\ndone\n"
    );

    // History and usage still see every task.
    let listed = store
        .list_tasks(&acme.id, &TaskFilter::default(), ALL)
        .await?;
    assert_eq!(listed.len(), 6);
    let usage = store
        .usage(
            &acme.id,
            &UsageQuery {
                from: at(0),
                to: at(100),
                bucket_secs: 3600,
            },
        )
        .await?;
    let finished: u64 = usage
        .iter()
        .map(|row| row.complete + row.error + row.cancelled)
        .sum();
    assert_eq!(finished, 3);
    Ok(())
}

pub async fn retention_walks_in_bounded_chunks(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    // 25 tasks whose containers ended in 3 distinct seconds: chunks end inside runs of equal
    // end times, and the walk goes on by id.
    let mut ids = Vec::new();
    for n in 0..25 {
        let end = at(10 + n % 3);
        let log = format!("task {n}\n");
        ids.push(
            finish(store, &acme.id, "{}", log.as_bytes(), &exited(0), end)
                .await?
                .id,
        );
    }
    let logs = store.data_sizes().await?.log_bytes;
    assert_eq!(logs, 10 * 7 + 15 * 8);

    // A first call, then a task that ends before the cursor: this walk does not go back for
    // it, the next one finds it.
    let first = store
        .prune_task_data(TaskData::Log, at(100), None, 10, at(200))
        .await?;
    assert_eq!(first.passed, 10);
    // The nine that ended at 10 s and the first of those that ended at 11 s.
    let cursor = first.next.clone().expect("more to walk");
    assert_eq!(cursor.end_time, at(11));
    let late = finish(store, &acme.id, "{}", b"late\n", &exited(0), at(5)).await?;

    let mut calls = vec![first];
    let mut after = Some(cursor);
    while let Some(cursor) = after {
        let call = store
            .prune_task_data(TaskData::Log, at(100), Some(&cursor), 10, at(200))
            .await?;
        assert!(call.passed <= 10);
        after = call.next.clone();
        calls.push(call);
    }
    let passed: Vec<u64> = calls.iter().map(|call| call.passed).collect();
    assert_eq!(passed, [10, 10, 5]);
    assert_eq!(calls.iter().map(|call| call.bytes).sum::<u64>(), logs);
    for id in &ids {
        assert!(store.get_task(&acme.id, id).await?.log_removed_at.is_some());
    }
    assert_eq!(store.get_log(&acme.id, &late.id).await?, b"late\n");
    assert_eq!(store.data_sizes().await?.log_bytes, 5);

    let again = walk(store, TaskData::Log, at(100), 10, at(300)).await?;
    assert_eq!((again[0].passed, again[0].bytes, again.len()), (1, 5, 1));
    assert_eq!(store.data_sizes().await?.log_bytes, 0);
    Ok(())
}

pub async fn data_sizes_follow_logs_payloads_and_truncation(store: &dyn Store) -> Result<()> {
    assert_eq!(store.data_sizes().await?, DataSizes::default());
    let acme = project_with_code(store, "hello").await?;
    // Payloads count in UTF-8 bytes: "é" is two.
    let new = NewTask {
        payload: "é".to_owned(),
        ..new_task("hello")
    };
    let id = enqueue_one(store, &acme.id, new, at(0)).await?;
    enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    assert_eq!(store.data_sizes().await?, sizes(0, 4));

    let leased = lease_one(store, at(1)).await?;
    assert_eq!(leased.task.id, id);
    let token = leased.lease.token;
    store.mark_running(&id, token, at(1), at(1)).await?;
    store
        .append_log(&id, token, b"0123456789", 64, at(2))
        .await?;
    assert_eq!(store.data_sizes().await?, sizes(10, 4));
    // A log cut at its cap counts as stored: the cap, marker included.
    let size = store
        .append_log(&id, token, &[b'x'; 100], 64, at(3))
        .await?;
    assert_eq!(size, 64);
    assert_eq!(store.data_sizes().await?, sizes(64, 4));
    // Finishing moves the task between counts and keeps its bytes.
    store
        .complete(&id, token, &exited(0), &RunReport::default(), at(4))
        .await?;
    assert_eq!(store.data_sizes().await?, sizes(64, 4));
    let calls = walk(store, TaskData::Log, at(5), 10, at(6)).await?;
    assert_eq!(calls[0].bytes, 64);
    assert_eq!(store.data_sizes().await?, sizes(0, 4));
    let calls = walk(store, TaskData::Payload, at(5), 10, at(6)).await?;
    assert_eq!(calls[0].bytes, 2);
    assert_eq!(store.data_sizes().await?, sizes(0, 2));
    Ok(())
}
