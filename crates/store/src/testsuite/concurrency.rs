//! Several callers at once, each on its own connection where the store has several: what the
//! trait promises must hold however their statements interleave. And the leadership of a
//! process alone on the store.

use stevedore_model::{RetriesBackoff, TaskOutcome, TaskStatus};

use super::retries::{project_with_retrying_code, retries_of};
use super::{
    ALL, at, enqueue_one, exited, image_spec, lease_one, lease_request, new_task, project,
    project_with_code, schedule_spec,
};
use crate::{LeasedTask, Result, RunReport, Store, StoreError, TaskFilter};

pub async fn concurrent_leasers_share_no_task_and_respect_max_concurrency(
    store: &dyn Store,
) -> Result<()> {
    let acme = project(store, "acme").await?;
    let mut limited = image_spec("limited");
    limited.max_concurrency = Some(3);
    store.push_code(&acme.id, &limited, None, at(0)).await?;
    store
        .push_code(&acme.id, &image_spec("free"), None, at(0))
        .await?;
    let limited_total = 24;
    let free_total = 40;
    store
        .enqueue(&acme.id, &vec![new_task("limited"); limited_total], at(1))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("free"); free_total], at(1))
        .await?;

    let mut seen: Vec<String> = Vec::new();
    let mut active_limited: Vec<LeasedTask> = Vec::new();
    for round in 0..200 {
        let now = at(2 + round);
        let lease =
            |name: &'static str| async move { store.lease(&lease_request(name, 4), now).await };
        let (a, b, c, d) = tokio::join!(lease("r1"), lease("r2"), lease("r3"), lease("r4"));
        let leased: Vec<LeasedTask> = [a?, b?, c?, d?].concat();
        if leased.is_empty() && active_limited.is_empty() {
            break;
        }
        for task in leased {
            assert!(
                !seen.contains(&task.task.id),
                "task {} was handed out twice",
                task.task.id
            );
            seen.push(task.task.id.clone());
            if task.task.code_name == "limited" {
                active_limited.push(task);
            } else {
                store
                    .complete(
                        &task.task.id,
                        task.lease.token,
                        &TaskOutcome::Cancelled,
                        &RunReport::default(),
                        now,
                    )
                    .await?;
            }
        }
        assert!(
            active_limited.len() <= 3,
            "round {round}: {} tasks of a code limited to 3 were active",
            active_limited.len()
        );
        // Finish two of the limited code's tasks, so its slots turn over.
        for task in active_limited.drain(..active_limited.len().min(2)) {
            store
                .complete(
                    &task.task.id,
                    task.lease.token,
                    &TaskOutcome::Cancelled,
                    &RunReport::default(),
                    now,
                )
                .await?;
        }
    }
    assert_eq!(
        seen.len(),
        limited_total + free_total,
        "every task ran once"
    );
    Ok(())
}

pub async fn concurrent_completions_record_one_result_and_one_retry(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_retrying_code(store, 1, 0, RetriesBackoff::Fixed).await?;
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let token = leased.lease.token;
    store.mark_running(&id, token, at(2), at(2)).await?;
    let id = id.as_str();
    let complete = |exit_code: i64| async move {
        store
            .complete(id, token, &exited(exit_code), &RunReport::default(), at(3))
            .await
    };
    let (a, b, c, d) = tokio::join!(complete(1), complete(2), complete(3), complete(4));
    let mut winners = Vec::new();
    for result in [a, b, c, d] {
        match result {
            Ok(task) => winners.push(task),
            Err(StoreError::StaleLease { .. }) => {}
            Err(other) => return Err(other),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one completion wins: {winners:?}");
    let stored = store.get_task(&acme.id, id).await?;
    assert_eq!(stored, winners[0]);
    assert_eq!(stored.status, TaskStatus::Error);
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 1, "one failure, one retry: {retries:?}");
    assert_eq!(retries[0].original_task_id.as_deref(), Some(id));
    Ok(())
}

pub async fn concurrent_log_appends_stop_at_the_cap_with_one_marker(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let token = lease_one(store, at(1)).await?.lease.token;
    let cap = 200;
    let task_id = id.as_str();
    let append = |byte: u8| async move {
        store
            .append_log(task_id, token, &[byte; 45], cap, at(2))
            .await
    };
    let (a, b, c, d, e, f) = tokio::join!(
        append(b'a'),
        append(b'b'),
        append(b'c'),
        append(b'd'),
        append(b'e'),
        append(b'f')
    );
    for size in [a?, b?, c?, d?, e?, f?] {
        assert!(size <= cap);
    }
    let log = store.get_log(&acme.id, &id).await?;
    let marker = format!("\n[stevedore: log truncated at {cap} bytes]\n");
    assert_eq!(log.len() as u64, cap);
    assert!(log.ends_with(marker.as_bytes()));
    let text = String::from_utf8_lossy(&log);
    assert_eq!(text.matches("log truncated").count(), 1, "{text}");
    // Each write landed whole or cut at the marker, never interleaved with another.
    let kept = &log[..log.len() - marker.len()];
    for chunk in kept.chunks(45) {
        assert!(chunk.iter().all(|byte| *byte == chunk[0]), "{text}");
    }
    let slice = store.get_log_since(&acme.id, &id, 0, 1000).await?;
    assert_eq!((slice.bytes, slice.size), (log, cap));
    Ok(())
}

pub async fn concurrent_fires_of_a_schedule_queue_one_task(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let schedule = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(0),
        )
        .await?
        .remove(0);
    let fire = || store.fire_schedule(&schedule.id, at(60), Some(at(120)), at(61));
    let (a, b, c, d) = tokio::join!(fire(), fire(), fire(), fire());
    let mut fired = 0;
    for result in [a, b, c, d] {
        match result {
            Ok(_) => fired += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(other) => return Err(other),
        }
    }
    assert_eq!(fired, 1);
    let tasks = store
        .list_tasks(&acme.id, &TaskFilter::default(), ALL)
        .await?;
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        store.get_schedule(&acme.id, &schedule.id).await?.run_count,
        1
    );
    Ok(())
}

/// With nobody else on the store, this process leads, and keeps leading while it holds on.
pub async fn a_lone_process_can_lead(store: &dyn Store) -> Result<()> {
    let leadership = store.try_lead().await?.expect("nobody else leads");
    assert!(leadership.is_held().await);
    assert!(
        leadership.is_held().await,
        "asking again does not give it up"
    );
    Ok(())
}
