//! User retries: a failed task with retries left queues exactly one, with its delay.

use chrono::Duration;
use stevedore_model::{
    CodeSpec, NewTask, RetriesBackoff, Task, TaskOutcome, TaskStatus, Timestamp,
};

use super::{
    ALL, assert_stale, at, enqueue_one, exited, image_spec, lease_one, lease_request, new_task,
    project, rescued_one,
};
use crate::{Project, Requeue, Result, RunReport, Store, TaskFilter};

/// A project with a code `flaky` that retries `retries` times, `delay_secs` apart.
pub(super) async fn project_with_retrying_code(
    store: &dyn Store,
    retries: u32,
    delay_secs: u32,
    backoff: RetriesBackoff,
) -> Result<Project> {
    let project = project(store, "acme").await?;
    let spec = CodeSpec {
        retries,
        retries_delay_secs: delay_secs,
        retries_backoff: backoff,
        ..image_spec("flaky")
    };
    store.push_code(&project.id, &spec, None, at(0)).await?;
    Ok(project)
}

/// Leases the one due task at `now`, starts it (unless the outcome is a setup failure) and
/// completes it with `outcome` a second later.
async fn run_and_end(store: &dyn Store, outcome: &TaskOutcome, now: Timestamp) -> Result<Task> {
    let leased = lease_one(store, now).await?;
    let (id, token) = (leased.task.id.as_str(), leased.lease.token);
    if !matches!(outcome, TaskOutcome::SetupFailed { .. }) {
        store.mark_running(id, token, now, now).await?;
    }
    let end = now + Duration::seconds(1);
    store
        .complete(id, token, outcome, &RunReport::default(), end)
        .await
}

/// The project's tasks that are retries, oldest first.
pub(super) async fn retries_of(store: &dyn Store, project_id: &str) -> Result<Vec<Task>> {
    let mut tasks = store
        .list_tasks(project_id, &TaskFilter::default(), ALL)
        .await?;
    tasks.retain(|task| task.original_task_id.is_some());
    tasks.sort_by_key(|task| task.retry_count);
    Ok(tasks)
}

pub async fn a_failed_task_with_retries_left_queues_one_retry(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 2, 30, RetriesBackoff::Fixed).await?;
    let task = NewTask {
        payload: "{\"n\":7}".to_owned(),
        priority: 1,
        timeout_secs: 120,
        label: Some("nightly".to_owned()),
        ..new_task("flaky")
    };
    let id = enqueue_one(store, &acme.id, task, at(0)).await?;
    // A newer revision without retries changes nothing for the task that pinned revision 1.
    store
        .push_code(&acme.id, &image_spec("flaky"), None, at(1))
        .await?;

    let failed = run_and_end(store, &exited(1), at(10)).await?;
    assert_eq!(failed.status, TaskStatus::Error);
    assert_eq!(failed.msg.as_deref(), Some("exited with code 1"));
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 1, "{retries:#?}");
    let retry = &retries[0];
    assert_ne!(retry.id, id);
    assert_eq!(
        (
            retry.status,
            retry.retry_count,
            retry.original_task_id.as_deref()
        ),
        (TaskStatus::Queued, 1, Some(id.as_str()))
    );
    assert_eq!(
        (
            retry.code_id.as_str(),
            retry.code_rev,
            retry.payload.as_str(),
            retry.priority,
            retry.timeout_secs,
            retry.label.as_deref(),
            retry.cluster.as_str(),
            retry.schedule_id.as_deref(),
        ),
        (
            failed.code_id.as_str(),
            1,
            "{\"n\":7}",
            1,
            120,
            Some("nightly"),
            "default",
            None,
        )
    );
    assert_eq!(
        (retry.created_at, retry.due_at, retry.delay_secs),
        (at(11), at(41), 30),
        "due retries_delay after the failure was recorded"
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(40))
            .await?
            .is_empty()
    );

    // The retry fails too (out of memory): the chain goes on, pointing at the first task.
    let failed_again =
        run_and_end(store, &TaskOutcome::OutOfMemory { limit_mib: 256 }, at(41)).await?;
    assert_eq!(failed_again.id, retry.id);
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 2, "{retries:#?}");
    assert_eq!(
        (
            retries[1].retry_count,
            retries[1].original_task_id.as_deref()
        ),
        (2, Some(id.as_str()))
    );
    assert_eq!(retries[1].due_at, at(72));

    // Retries exhausted: the last failure queues nothing.
    let last = run_and_end(store, &exited(2), at(72)).await?;
    assert_eq!((last.status, last.retry_count), (TaskStatus::Error, 2));
    assert_eq!(retries_of(store, &acme.id).await?.len(), 2);
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(10_000))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn timeouts_and_setup_failures_retry_but_cancels_and_successes_do_not(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_retrying_code(store, 5, 0, RetriesBackoff::Fixed).await?;
    let retried = [
        TaskOutcome::TimedOut { timeout_secs: 5 },
        TaskOutcome::SetupFailed {
            message: "image not found: nope:latest".to_owned(),
        },
    ];
    for outcome in retried {
        let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
        run_and_end(store, &outcome, at(1)).await?;
        let mut retries = retries_of(store, &acme.id).await?;
        retries.retain(|retry| retry.original_task_id.as_deref() == Some(id.as_str()));
        assert_eq!(retries.len(), 1, "{outcome:?}");
        // Out of the way of the next case.
        store.cancel_task(&acme.id, &retries[0].id, at(2)).await?;
    }
    let count = |tasks: Vec<Task>| tasks.len();
    let before = count(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?,
    );
    // Success and cancellation never retry.
    for outcome in [exited(0), TaskOutcome::Cancelled] {
        enqueue_one(store, &acme.id, new_task("flaky"), at(3)).await?;
        run_and_end(store, &outcome, at(4)).await?;
    }
    // A task whose user asked to cancel it does not retry, even if it exits non-zero first.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(5)).await?;
    let leased = lease_one(store, at(6)).await?;
    store
        .mark_running(&id, leased.lease.token, at(6), at(6))
        .await?;
    store.cancel_task(&acme.id, &id, at(7)).await?;
    let failed = store
        .complete(
            &id,
            leased.lease.token,
            &exited(137),
            &RunReport::default(),
            at(8),
        )
        .await?;
    assert_eq!(failed.status, TaskStatus::Error);
    // A cancelled queued task never ran; nothing retries it either.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(9)).await?;
    store.cancel_task(&acme.id, &id, at(9)).await?;
    let after = count(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?,
    );
    assert_eq!(after, before + 4, "no retries were queued");

    // A deleted code's failures are not retried: its queued tasks were cancelled with it.
    enqueue_one(store, &acme.id, new_task("flaky"), at(10)).await?;
    let leased = lease_one(store, at(11)).await?;
    let token = leased.lease.token;
    store
        .mark_running(&leased.task.id, token, at(11), at(11))
        .await?;
    store
        .delete_code(&acme.id, &leased.task.code_id, at(12))
        .await?;
    store
        .complete(
            &leased.task.id,
            token,
            &exited(1),
            &RunReport::default(),
            at(13),
        )
        .await?;
    let queued = store
        .list_tasks(
            &acme.id,
            &TaskFilter {
                statuses: vec![TaskStatus::Queued],
                ..TaskFilter::default()
            },
            ALL,
        )
        .await?;
    assert!(queued.is_empty(), "{queued:#?}");
    Ok(())
}

pub async fn infrastructure_give_ups_spend_no_user_retry(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 3, 0, RetriesBackoff::Fixed).await?;
    // The runner gives up on the infrastructure.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let requeue = Requeue {
        reason: "engine down".to_owned(),
        due_at: at(2),
        max_infra_attempts: 1,
    };
    let gave_up = store
        .requeue(&id, leased.lease.token, &requeue, at(2))
        .await?;
    assert_eq!(gave_up.status, TaskStatus::Error);
    // The rescuer gives up on an expired lease.
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(3)).await?;
    lease_one(store, at(4)).await?;
    assert_eq!(
        store.rescue_expired(at(1000), 1).await?,
        rescued_one(&id, "flaky", TaskStatus::Error)
    );
    assert_eq!(
        store.get_task(&acme.id, &id).await?.status,
        TaskStatus::Error
    );
    // Infrastructure failures are the infrastructure's: the user's retries stay untouched.
    assert!(retries_of(store, &acme.id).await?.is_empty());
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(10_000))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn a_stale_completion_queues_no_retry(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 3, 0, RetriesBackoff::Fixed).await?;
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let dead = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, dead.lease.token, at(1), at(1))
        .await?;
    // The runner vanishes; its lease expires and the task is rescued.
    assert_eq!(
        store.rescue_expired(at(100), 5).await?,
        rescued_one(&id, "flaky", TaskStatus::Queued)
    );
    assert_stale(
        store
            .complete(
                &id,
                dead.lease.token,
                &exited(1),
                &RunReport::default(),
                at(101),
            )
            .await,
        "complete",
    );
    assert!(
        retries_of(store, &acme.id).await?.is_empty(),
        "a refused completion queues no retry"
    );
    // The rescued run fails for real: exactly one retry, however often it is reported.
    let alive = lease_one(store, at(102)).await?;
    store
        .mark_running(&id, alive.lease.token, at(102), at(102))
        .await?;
    store
        .complete(
            &id,
            alive.lease.token,
            &exited(1),
            &RunReport::default(),
            at(103),
        )
        .await?;
    for token in [dead.lease.token, alive.lease.token] {
        assert_stale(
            store
                .complete(&id, token, &exited(1), &RunReport::default(), at(104))
                .await,
            "a second complete",
        );
    }
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), 1, "{retries:#?}");
    assert_eq!(retries[0].retry_count, 1);
    Ok(())
}

pub async fn exponential_backoff_doubles_the_retry_delay(store: &dyn Store) -> Result<()> {
    let acme = project_with_retrying_code(store, 4, 10, RetriesBackoff::Exponential).await?;
    let code = store.get_code_by_name(&acme.id, "flaky").await?;
    assert_eq!(code.spec.retries_backoff, RetriesBackoff::Exponential);
    let id = enqueue_one(store, &acme.id, new_task("flaky"), at(0)).await?;
    let mut now = at(1);
    let mut delays = Vec::new();
    for _ in 0..5 {
        let failed = run_and_end(store, &exited(1), now).await?;
        let retries = retries_of(store, &acme.id).await?;
        match retries
            .iter()
            .find(|task| task.retry_count == failed.retry_count + 1)
        {
            Some(retry) => {
                assert_eq!(retry.original_task_id.as_deref(), Some(id.as_str()));
                let ended = failed.end_time.expect("a finished task has an end time");
                delays.push((retry.due_at - ended).num_seconds());
                now = retry.due_at;
            }
            None => break,
        }
    }
    assert_eq!(
        delays,
        [10, 20, 40, 80],
        "four retries, each waiting twice as long"
    );
    Ok(())
}
