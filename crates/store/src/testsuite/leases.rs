//! The runner's side: leases, their order and limits, heartbeats, completions, requeues and
//! rescues.

use chrono::Duration;
use stevedore_model::{NewTask, TaskOutcome, TaskStatus};

use super::{
    assert_not_found, assert_stale, at, enqueue_one, exited, ids, image_spec, lease_one,
    lease_request, new_task, page, project, project_with_code, rescued_one,
};
use crate::{
    LeaseRequest, LeasedTask, Requeue, Result, RunReport, StatsWindow, Store, StoreError,
    TaskFilter,
};

pub async fn lease_orders_by_priority_then_due_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let task = |priority: u8, delay_secs: u32| NewTask {
        priority,
        delay_secs,
        ..new_task("hello")
    };
    let queued = store
        .enqueue(
            &acme.id,
            &[
                task(0, 0),
                task(1, 10),
                task(2, 20),
                task(1, 5),
                task(0, 15),
                task(2, 50),
            ],
            at(0),
        )
        .await?;
    let id = |index: usize| queued[index].id.clone();
    // At 30 s the second priority-2 task is not due yet.
    let leased = store.lease(&lease_request("runner-1", 10), at(30)).await?;
    assert_eq!(ids(&leased), vec![id(2), id(3), id(1), id(0), id(4)]);
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 10), at(50)).await?),
        vec![id(5)]
    );

    // One at a time gives the same order.
    let again = store
        .enqueue(
            &acme.id,
            &[task(0, 0), task(2, 3), task(1, 1), task(2, 2)],
            at(100),
        )
        .await?;
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(lease_one(store, at(200)).await?.task.id);
    }
    assert_eq!(
        order,
        vec![
            again[3].id.clone(),
            again[1].id.clone(),
            again[2].id.clone(),
            again[0].id.clone()
        ]
    );
    Ok(())
}

pub async fn max_concurrency_holds_within_one_lease_call(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let mut limited = image_spec("limited");
    limited.max_concurrency = Some(2);
    store.push_code(&acme.id, &limited, None, at(0)).await?;
    store
        .push_code(&acme.id, &image_spec("free"), None, at(0))
        .await?;
    // The limited code's tasks come first in the queue; they must not block the free code's.
    let limited_tasks = store
        .enqueue(&acme.id, &vec![new_task("limited"); 40], at(1))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("free"); 3], at(2))
        .await?;
    let leased = store.lease(&lease_request("runner-1", 10), at(3)).await?;
    let count = |name: &str| leased.iter().filter(|l| l.task.code_name == name).count();
    assert_eq!((count("limited"), count("free")), (2, 3));
    assert_eq!(
        ids(&leased)[..2],
        [limited_tasks[0].id.clone(), limited_tasks[1].id.clone()]
    );
    Ok(())
}

pub async fn max_concurrency_holds_across_lease_calls(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let mut limited = image_spec("limited");
    limited.max_concurrency = Some(2);
    store.push_code(&acme.id, &limited, None, at(0)).await?;
    store
        .enqueue(&acme.id, &vec![new_task("limited"); 5], at(1))
        .await?;
    let first = lease_one(store, at(2)).await?;
    let second = lease_one(store, at(2)).await?;
    assert!(
        store
            .lease(&lease_request("runner-2", 5), at(3))
            .await?
            .is_empty()
    );
    // A running task still counts; a finished one frees its slot.
    store
        .mark_running(&first.task.id, first.lease.token, at(3), at(3))
        .await?;
    assert!(
        store
            .lease(&lease_request("runner-2", 5), at(4))
            .await?
            .is_empty()
    );
    store
        .mark_running(&second.task.id, second.lease.token, at(5), at(5))
        .await?;
    store
        .complete(
            &second.task.id,
            second.lease.token,
            &exited(0),
            &RunReport::default(),
            at(5),
        )
        .await?;
    assert_eq!(
        store
            .lease(&lease_request("runner-2", 5), at(6))
            .await?
            .len(),
        1
    );
    assert!(
        store
            .lease(&lease_request("runner-2", 5), at(7))
            .await?
            .is_empty()
    );
    // A requeued task frees its slot too.
    store
        .requeue(
            &first.task.id,
            first.lease.token,
            &Requeue {
                reason: "engine down".to_owned(),
                due_at: at(8),
                max_infra_attempts: 5,
            },
            at(8),
        )
        .await?;
    assert_eq!(
        store
            .lease(&lease_request("runner-2", 5), at(9))
            .await?
            .len(),
        1
    );
    Ok(())
}

pub async fn paused_code_is_skipped_until_resumed(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let paused = store
        .push_code(&acme.id, &image_spec("paused"), None, at(0))
        .await?;
    store
        .push_code(&acme.id, &image_spec("busy"), None, at(0))
        .await?;
    let waiting = enqueue_one(store, &acme.id, new_task("paused"), at(1)).await?;
    let busy = enqueue_one(store, &acme.id, new_task("busy"), at(2)).await?;
    store
        .set_code_paused(&acme.id, &paused.id, true, at(3))
        .await?;
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 10), at(4)).await?),
        vec![busy]
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 10), at(5))
            .await?
            .is_empty()
    );
    assert_eq!(
        store.get_task(&acme.id, &waiting).await?.status,
        TaskStatus::Queued
    );
    store
        .set_code_paused(&acme.id, &paused.id, false, at(6))
        .await?;
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 10), at(7)).await?),
        vec![waiting]
    );
    Ok(())
}

pub async fn lease_matches_clusters(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let in_cluster = |cluster: &str| NewTask {
        cluster: cluster.to_owned(),
        ..new_task("hello")
    };
    let default = enqueue_one(store, &acme.id, in_cluster("default"), at(1)).await?;
    let gpu = enqueue_one(store, &acme.id, in_cluster("gpu"), at(2)).await?;
    let request = |clusters: &[&str]| LeaseRequest {
        clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
        ..lease_request("runner-1", 10)
    };
    assert!(store.lease(&request(&[]), at(3)).await?.is_empty());
    assert!(store.lease(&request(&["arm"]), at(3)).await?.is_empty());
    assert_eq!(
        ids(&store.lease(&request(&["arm", "gpu"]), at(3)).await?),
        vec![gpu]
    );
    assert_eq!(
        ids(&store.lease(&request(&["default"]), at(3)).await?),
        vec![default]
    );
    Ok(())
}

pub async fn lease_tokens_are_random_and_distinct(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 7], at(0))
        .await?;
    let mut tokens = Vec::new();
    for round in 0..4 {
        let now = at(10 + round);
        let leased = store.lease(&lease_request("runner-1", 2), now).await?;
        for leased in &leased {
            assert_eq!(leased.lease.expires_at, now + Duration::seconds(60));
            assert_eq!(leased.task.status, TaskStatus::Preparing);
            assert_eq!(leased.task.runner_id.as_deref(), Some("runner-1"));
            assert_eq!(
                store.get_task(&acme.id, &leased.task.id).await?,
                leased.task
            );
            tokens.push(leased.lease.token);
        }
    }
    assert_eq!(tokens.len(), 7);
    // A runner cannot tell another task's token from its own: no two are equal, they are
    // positive, and they are not a count (63 random bits: a run of neighbours is all but
    // impossible).
    let mut distinct = tokens.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 7, "{tokens:?}");
    assert!(tokens.iter().all(|token| *token > 0), "{tokens:?}");
    assert!(
        tokens
            .windows(2)
            .any(|pair| pair[1].abs_diff(pair[0]) > 1_000_000),
        "{tokens:?}"
    );
    Ok(())
}

pub async fn concurrent_runners_finish_every_task_once(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let total = 120;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); total], at(0))
        .await?;

    // Four runners at once, each doing a runner's whole traffic per task, interleaved at every
    // await; a fifth caller reads and reports progress in between.
    let runner = |name: &'static str| async move {
        let mut finished = Vec::new();
        loop {
            let leased = store.lease(&lease_request(name, 4), at(1)).await?;
            if leased.is_empty() {
                return Ok::<_, StoreError>(finished);
            }
            for leased in leased {
                let (id, token) = (leased.task.id.as_str(), leased.lease.token);
                store.heartbeat(id, token, 60, at(2)).await?;
                store.mark_running(id, token, at(2), at(2)).await?;
                store
                    .runner_progress(id, token, Some(50), Some("halfway"), at(3))
                    .await?;
                store
                    .append_log(id, token, b"output\n", 1024, at(3))
                    .await?;
                let done = store
                    .complete(id, token, &exited(0), &RunReport::default(), at(4))
                    .await?;
                assert_eq!(done.status, TaskStatus::Complete);
                finished.push((done.id, token));
            }
        }
    };
    let reader = async {
        for _ in 0..20 {
            store
                .list_tasks(&acme.id, &TaskFilter::default(), page(1, 10))
                .await?;
            store
                .code_stats(&acme.id, &code.id, StatsWindow::default())
                .await?;
        }
        Ok::<_, StoreError>(())
    };
    let (a, b, c, d, read) = tokio::join!(
        runner("r1"),
        runner("r2"),
        runner("r3"),
        runner("r4"),
        reader
    );
    read?;
    let mut finished: Vec<(String, i64)> = [a?, b?, c?, d?].concat();
    assert_eq!(finished.len(), total);
    finished.sort();
    finished.dedup_by(|x, y| x.0 == y.0);
    assert_eq!(finished.len(), total, "a task was finished twice");
    let mut tokens: Vec<i64> = finished.iter().map(|(_, token)| *token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), total, "a lease token was handed out twice");

    let stats = store
        .code_stats(&acme.id, &code.id, StatsWindow::default())
        .await?;
    assert!(
        stats
            .by_status
            .contains(&(TaskStatus::Complete, total as u64)),
        "{stats:?}"
    );
    for (id, token) in finished.iter().take(5) {
        let task = store.get_task(&acme.id, id).await?;
        assert_eq!(
            (task.percent, task.log_size, task.runner_id.as_deref()),
            (Some(50), 7, None)
        );
        assert_stale(
            store.heartbeat(id, *token, 60, at(5)).await,
            "heartbeat after completion",
        );
    }
    Ok(())
}

pub async fn stale_token_is_refused_after_rescue(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let old = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, old.lease.token, at(2), at(2))
        .await?;
    // The runner goes silent; its lease expires at 61 s and the rescuer requeues the task.
    assert_eq!(
        store.rescue_expired(at(62), 5).await?,
        rescued_one(&id, "hello", TaskStatus::Queued)
    );
    let new = lease_one(store, at(63)).await?;
    assert_eq!(new.task.id, id);
    assert_ne!(new.lease.token, old.lease.token);

    let stale = old.lease.token;
    assert_stale(store.heartbeat(&id, stale, 60, at(64)).await, "heartbeat");
    assert_stale(
        store.mark_running(&id, stale, at(64), at(64)).await,
        "mark_running",
    );
    assert_stale(
        store.append_log(&id, stale, b"late", 1024, at(64)).await,
        "append_log",
    );
    assert_stale(
        store
            .runner_progress(&id, stale, Some(50), None, at(64))
            .await,
        "runner_progress",
    );
    assert_stale(
        store
            .complete(&id, stale, &exited(0), &RunReport::default(), at(64))
            .await,
        "complete",
    );
    let requeue = Requeue {
        reason: "engine down".to_owned(),
        due_at: at(64),
        max_infra_attempts: 5,
    };
    assert_stale(store.requeue(&id, stale, &requeue, at(64)).await, "requeue");
    assert_not_found(store.get_log(&acme.id, &id).await, "log");

    // The new lease works and the stale writes changed nothing.
    let task = store.get_task(&acme.id, &id).await?;
    assert_eq!(
        (task.status, task.infra_attempts, task.percent),
        (TaskStatus::Preparing, 1, None)
    );
    store
        .mark_running(&id, new.lease.token, at(65), at(65))
        .await?;
    let done = store
        .complete(
            &id,
            new.lease.token,
            &exited(0),
            &RunReport::default(),
            at(66),
        )
        .await?;
    assert_eq!(done.status, TaskStatus::Complete);
    Ok(())
}

pub async fn complete_records_the_result_once(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let token = leased.lease.token;
    // A container cannot exit before it started.
    assert!(matches!(
        store
            .complete(&id, token, &exited(0), &RunReport::default(), at(2))
            .await,
        Err(StoreError::Transition(_))
    ));
    let running = store.mark_running(&id, token, at(3), at(3)).await?;
    assert_eq!(
        (running.status, running.start_time),
        (TaskStatus::Running, Some(at(3)))
    );
    let report = RunReport {
        start_time: Some(at(4)),
        end_time: Some(at(9)),
        peak_memory_bytes: Some(42 << 20),
        cpu_time_ms: Some(1234),
    };
    let done = store
        .complete(&id, token, &exited(0), &report, at(10))
        .await?;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!((done.start_time, done.end_time), (Some(at(4)), Some(at(9))));
    assert_eq!(
        (done.peak_memory_bytes, done.cpu_time_ms),
        (Some(42 << 20), Some(1234))
    );
    assert_eq!(
        (done.runner_id.as_deref(), done.msg.as_deref()),
        (None, None)
    );
    assert_eq!(done.updated_at, at(10));
    assert_eq!(store.get_task(&acme.id, &id).await?, done.clone());

    // Exactly once: the same token, any outcome, is refused and changes nothing.
    assert_stale(
        store
            .complete(&id, token, &exited(1), &report, at(11))
            .await,
        "complete",
    );
    assert_stale(store.heartbeat(&id, token, 60, at(11)).await, "heartbeat");
    assert_stale(
        store
            .requeue(
                &id,
                token,
                &Requeue {
                    reason: "x".to_owned(),
                    due_at: at(11),
                    max_infra_attempts: 5,
                },
                at(11),
            )
            .await,
        "requeue",
    );
    assert_eq!(store.get_task(&acme.id, &id).await?, done);
    // Nothing is left to rescue or lease.
    assert!(store.rescue_expired(at(1000), 5).await?.is_empty());
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(1000))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn complete_maps_outcomes_to_statuses(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let cases = [
        (
            exited(3),
            TaskStatus::Error,
            Some(3),
            Some("exited with code 3"),
        ),
        (
            TaskOutcome::OutOfMemory { limit_mib: 256 },
            TaskStatus::Error,
            Some(137),
            Some("out of memory (limit 256 MiB)"),
        ),
        (
            TaskOutcome::TimedOut { timeout_secs: 5 },
            TaskStatus::Timeout,
            None,
            Some("timed out after 5 s"),
        ),
        (
            TaskOutcome::Cancelled,
            TaskStatus::Cancelled,
            None,
            Some("cancelled"),
        ),
    ];
    for (outcome, status, exit_code, msg) in cases {
        let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
        let leased = lease_one(store, at(1)).await?;
        store
            .mark_running(&id, leased.lease.token, at(2), at(2))
            .await?;
        let done = store
            .complete(
                &id,
                leased.lease.token,
                &outcome,
                &RunReport::default(),
                at(3),
            )
            .await?;
        assert_eq!(
            (done.status, done.exit_code, done.msg.as_deref()),
            (status, exit_code, msg),
            "{outcome:?}"
        );
        assert_eq!(done.end_time, Some(at(3)), "end time defaults to now");
    }
    // Setup failures end a task that never started.
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    let outcome = TaskOutcome::SetupFailed {
        message: "image not found: nope:latest".to_owned(),
    };
    let done = store
        .complete(
            &id,
            leased.lease.token,
            &outcome,
            &RunReport::default(),
            at(2),
        )
        .await?;
    assert_eq!(
        (done.status, done.msg.as_deref()),
        (TaskStatus::Error, Some("image not found: nope:latest"))
    );
    Ok(())
}

pub async fn requeue_below_and_at_the_cap(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let requeue = |due: i64| Requeue {
        reason: "engine down".to_owned(),
        due_at: at(due),
        max_infra_attempts: 3,
    };
    let leased = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, leased.lease.token, at(2), at(2))
        .await?;
    let again = store
        .requeue(&id, leased.lease.token, &requeue(20), at(3))
        .await?;
    assert_eq!(
        (again.status, again.infra_attempts, again.due_at),
        (TaskStatus::Queued, 1, at(20))
    );
    assert_eq!(
        (
            again.runner_id.as_deref(),
            again.msg.as_deref(),
            again.start_time
        ),
        (None, Some("engine down"), None)
    );
    assert_eq!(
        again.retry_count, 0,
        "an infrastructure failure spends no user retry"
    );
    assert_eq!(store.get_task(&acme.id, &id).await?, again);
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(19))
            .await?
            .is_empty()
    );

    let leased = lease_one(store, at(20)).await?;
    let again = store
        .requeue(&id, leased.lease.token, &requeue(30), at(21))
        .await?;
    assert_eq!(
        (again.status, again.infra_attempts),
        (TaskStatus::Queued, 2)
    );
    assert_stale(
        store
            .requeue(&id, leased.lease.token, &requeue(30), at(21))
            .await,
        "requeue",
    );

    let leased = lease_one(store, at(30)).await?;
    let failed = store
        .requeue(&id, leased.lease.token, &requeue(40), at(31))
        .await?;
    assert_eq!(
        (failed.status, failed.infra_attempts),
        (TaskStatus::Error, 3)
    );
    assert_eq!(
        failed.msg.as_deref(),
        Some("infrastructure failure after 3 attempts: engine down")
    );
    assert_eq!((failed.end_time, failed.runner_id), (Some(at(31)), None));
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(100))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn rescue_touches_only_expired_leases(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 4], at(0))
        .await?;
    let silent = lease_one(store, at(1)).await?; // expires at 61
    let alive = lease_one(store, at(1)).await?;
    let late = lease_one(store, at(30)).await?; // expires at 90
    let finished = lease_one(store, at(1)).await?;
    store
        .heartbeat(&alive.task.id, alive.lease.token, 60, at(50))
        .await?; // now 110
    store
        .mark_running(&finished.task.id, finished.lease.token, at(2), at(2))
        .await?;
    store
        .complete(
            &finished.task.id,
            finished.lease.token,
            &exited(0),
            &RunReport::default(),
            at(3),
        )
        .await?;

    assert!(
        store.rescue_expired(at(61), 5).await?.is_empty(),
        "a lease is good until its expiry"
    );
    assert_eq!(
        store.rescue_expired(at(62), 5).await?,
        rescued_one(&silent.task.id, "hello", TaskStatus::Queued)
    );
    let rescued = store.get_task(&acme.id, &silent.task.id).await?;
    assert_eq!(
        (rescued.status, rescued.infra_attempts, rescued.due_at),
        (TaskStatus::Queued, 1, at(62))
    );
    assert_eq!(rescued.runner_id, None);
    assert!(
        rescued
            .msg
            .as_deref()
            .is_some_and(|msg| msg.contains("runner-1")),
        "{:?}",
        rescued.msg
    );
    assert_eq!(
        store.get_task(&acme.id, &alive.task.id).await?.status,
        TaskStatus::Preparing
    );
    assert_eq!(
        store.get_task(&acme.id, &late.task.id).await?.status,
        TaskStatus::Preparing
    );
    assert_eq!(
        store.get_task(&acme.id, &finished.task.id).await?.status,
        TaskStatus::Complete
    );

    // At the cap the rescuer gives up on the task.
    assert_eq!(
        store.rescue_expired(at(91), 1).await?,
        rescued_one(&late.task.id, "hello", TaskStatus::Error)
    );
    let failed = store.get_task(&acme.id, &late.task.id).await?;
    assert_eq!(failed.status, TaskStatus::Error);
    assert!(
        failed
            .msg
            .as_deref()
            .is_some_and(|msg| msg.starts_with("infrastructure failure after 1 attempts"))
    );
    assert!(store.rescue_expired(at(91), 5).await?.is_empty());
    Ok(())
}

pub async fn heartbeat_extends_the_lease(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(0)).await?;
    assert_eq!(leased.lease.expires_at, at(60));
    let reply = store
        .heartbeat(&id, leased.lease.token, 120, at(50))
        .await?;
    assert_eq!((reply.expires_at, reply.cancel_requested), (at(170), false));
    assert!(store.rescue_expired(at(100), 5).await?.is_empty());
    assert_eq!(
        store.rescue_expired(at(171), 5).await?,
        rescued_one(&id, "hello", TaskStatus::Queued)
    );
    assert_not_found(
        store.heartbeat("no-such-task", 1, 60, at(0)).await,
        "no-such-task",
    );
    Ok(())
}

/// Issue 15: a project's backlog does not hold back another project's task of the same
/// priority. Both projects are new, so the one whose task is due first starts.
pub async fn a_projects_backlog_does_not_starve_another_projects_task(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    let backlog = store
        .enqueue(&acme.id, &vec![new_task("hello"); 50], at(1))
        .await?;
    let single = enqueue_one(store, &other.id, new_task("hello"), at(2)).await?;
    let leased = ids(&store.lease(&lease_request("runner-1", 10), at(3)).await?);
    assert_eq!(leased.len(), 10);
    assert_eq!(leased[..2], [backlog[0].id.clone(), single]);
    // The rest of the lease is the backlog's, by due time.
    let expected: Vec<String> = backlog[1..9].iter().map(|task| task.id.clone()).collect();
    assert_eq!(leased[2..], expected[..]);

    // Once acme was served, a task the other project queues goes first.
    let next = enqueue_one(store, &other.id, new_task("hello"), at(4)).await?;
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 3), at(5)).await?)[0],
        next
    );
    Ok(())
}

pub async fn successive_leases_alternate_between_projects(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 5], at(1))
        .await?;
    store
        .enqueue(&other.id, &vec![new_task("hello"); 2], at(2))
        .await?;
    let mut projects = Vec::new();
    for second in 0..7 {
        let leased = lease_one(store, at(10 + second)).await?;
        projects.push(if leased.task.project_id == acme.id {
            "acme"
        } else {
            "other"
        });
    }
    assert_eq!(
        projects,
        ["acme", "other", "acme", "other", "acme", "acme", "acme"]
    );
    Ok(())
}

pub async fn priorities_win_over_fair_share(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    let urgent = |priority| NewTask {
        priority,
        ..new_task("hello")
    };
    // The other project waits longest and was never served, but its task is of priority 0.
    let low = enqueue_one(store, &other.id, urgent(0), at(1)).await?;
    let high = store.enqueue(&acme.id, &vec![urgent(2); 3], at(2)).await?;
    let middle = enqueue_one(store, &other.id, urgent(1), at(3)).await?;
    let leased = ids(&store.lease(&lease_request("runner-1", 10), at(4)).await?);
    let mut expected: Vec<String> = high.iter().map(|task| task.id.clone()).collect();
    expected.extend([middle, low]);
    assert_eq!(leased, expected);

    // Within priority 2, the projects alternate again.
    let acme_again = store.enqueue(&acme.id, &vec![urgent(2); 2], at(5)).await?;
    let other_again = store.enqueue(&other.id, &vec![urgent(2); 2], at(6)).await?;
    assert_eq!(
        ids(&store.lease(&lease_request("runner-1", 4), at(7)).await?),
        vec![
            acme_again[0].id.clone(),
            other_again[0].id.clone(),
            acme_again[1].id.clone(),
            other_again[1].id.clone(),
        ]
    );
    Ok(())
}

/// A runner that starts again gives back at once every task it held, or only one project's
/// for a project's runner, without waiting for the leases to expire; other runners' tasks
/// and the old tokens' writes are refused as after a rescue.
pub async fn a_restarted_runner_releases_what_it_held_at_once(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("theirs"), None, at(0))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 3], at(0))
        .await?;
    store
        .enqueue(&other.id, &[new_task("theirs")], at(0))
        .await?;
    let held = store.lease(&lease_request("runner-1", 3), at(1)).await?;
    assert_eq!(held.len(), 3);
    let elsewhere = store.lease(&lease_request("runner-2", 5), at(1)).await?;
    assert_eq!(elsewhere.len(), 1);
    store
        .mark_running(&held[0].task.id, held[0].lease.token, at(2), at(2))
        .await?;

    // A project's runner releases only that project's tasks.
    let project_of = |leased: &LeasedTask| leased.task.project_id.clone();
    let theirs: Vec<&LeasedTask> = held
        .iter()
        .filter(|leased| project_of(leased) == other.id)
        .collect();
    let released = store
        .release_runner("runner-1", Some(&other.id), at(3), 5)
        .await?;
    assert_eq!(released.len(), theirs.len());

    let released = store.release_runner("runner-1", None, at(4), 5).await?;
    assert_eq!(released.len(), 3 - theirs.len());
    for leased in &held {
        let task = store
            .get_task(&leased.task.project_id, &leased.task.id)
            .await?;
        assert_eq!(
            (task.status, task.runner_id.as_deref()),
            (TaskStatus::Queued, None)
        );
        assert!(
            task.msg
                .as_deref()
                .is_some_and(|msg| msg.contains("restarted")),
            "{:?}",
            task.msg
        );
        assert_stale(
            store
                .heartbeat(&leased.task.id, leased.lease.token, 30, at(5))
                .await,
            "a released task's heartbeat",
        );
    }
    // Nothing else was touched; a second release finds nothing.
    let kept = &elsewhere[0];
    store
        .heartbeat(&kept.task.id, kept.lease.token, 30, at(5))
        .await?;
    assert!(
        store
            .release_runner("runner-1", None, at(6), 5)
            .await?
            .is_empty()
    );
    Ok(())
}

/// Every attempt is recorded: each lease with its runner, its start and how it ended, the
/// lost ones with why; only the task's project reads them.
pub async fn every_attempt_is_recorded_with_how_it_ended(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    assert!(store.task_attempts(&acme.id, &id).await?.is_empty());

    let first = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, first.lease.token, at(2), at(2))
        .await?;
    let attempts = store.task_attempts(&acme.id, &id).await?;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (attempts[0].attempt, attempts[0].runner_id.as_deref()),
        (1, Some("runner-1"))
    );
    assert_eq!(
        (
            attempts[0].leased_at,
            attempts[0].started_at,
            attempts[0].ended_at
        ),
        (at(1), Some(at(2)), None)
    );

    // The runner is lost: the rescue ends the first attempt; a second runner finishes.
    store.rescue_expired(at(100), 5).await?;
    let second = store.lease(&lease_request("runner-2", 1), at(101)).await?;
    let token = second[0].lease.token;
    store.mark_running(&id, token, at(102), at(102)).await?;
    store
        .complete(&id, token, &exited(3), &RunReport::default(), at(103))
        .await?;

    let attempts = store.task_attempts(&acme.id, &id).await?;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(
        (attempts[0].started_at, attempts[0].ended_at),
        (Some(at(2)), Some(at(100))),
        "an ended attempt keeps its start"
    );
    assert_eq!(attempts[0].ending.as_deref(), Some("requeued"));
    assert!(
        attempts[0]
            .reason
            .as_deref()
            .is_some_and(|reason| reason.contains("lease of runner runner-1 expired")),
        "{attempts:?}"
    );
    assert_eq!(
        (
            attempts[1].attempt,
            attempts[1].runner_id.as_deref(),
            attempts[1].started_at,
            attempts[1].ended_at,
        ),
        (2, Some("runner-2"), Some(at(102)), Some(at(103)))
    );
    assert_eq!(
        (attempts[1].ending.as_deref(), attempts[1].exit_code),
        (Some("error"), Some(3))
    );

    let other = project(store, "other").await?;
    assert_not_found(store.task_attempts(&other.id, &id).await, &id);
    Ok(())
}
