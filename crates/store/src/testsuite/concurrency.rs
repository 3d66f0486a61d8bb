//! Several callers at once, each on its own connection where the store has several: what the
//! trait promises must hold however their statements interleave. And the leadership of a
//! process alone on the store.

use futures::FutureExt;
use futures::future::join_all;
use stevedore_model::{Quota, RetriesBackoff, TaskOutcome, TaskStatus};

use super::retries::{project_with_retrying_code, retries_of};
use super::{
    ALL, assert_stale, at, enqueue_one, exited, image_spec, lease_one, lease_request, new_task,
    project, project_with_code, schedule_spec,
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

    let seen = lease_in_rounds(store, |task| task.task.code_name == "limited", "a code").await?;
    assert_eq!(seen, limited_total + free_total, "every task ran once");
    Ok(())
}

/// Leasers at once never hold more of a project's tasks than its `running_tasks` quota, however
/// their counts interleave (each may count the same free slots before the others' leases
/// commit), while another project's tasks go on; every task runs once.
pub async fn concurrent_leasers_never_pass_a_projects_running_tasks_quota(
    store: &dyn Store,
) -> Result<()> {
    let acme = project(store, "acme").await?;
    for name in ["first", "second"] {
        store
            .push_code(&acme.id, &image_spec(name), None, at(0))
            .await?;
    }
    store
        .set_project_quota(&acme.id, Quota::RunningTasks, Some(3), at(0))
        .await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("other"), None, at(0))
        .await?;
    for name in ["first", "second"] {
        store
            .enqueue(&acme.id, &vec![new_task(name); 12], at(1))
            .await?;
    }
    store
        .enqueue(&other.id, &vec![new_task("other"); 16], at(1))
        .await?;

    let seen = lease_in_rounds(store, |task| task.task.project_id == acme.id, "a project").await?;
    assert_eq!(seen, 24 + 16, "every task ran once");
    Ok(())
}

/// Four leasers at once, round after round, until nothing is left: no task is handed out
/// twice, and at most 3 of the tasks `limited` picks out are active at a time (the limit of
/// `what`, a code or a project). Every other task is finished at once; two of the limited
/// ones each round, so its slots turn over. How many tasks ran.
async fn lease_in_rounds(
    store: &dyn Store,
    limited: impl Fn(&LeasedTask) -> bool,
    what: &str,
) -> Result<usize> {
    let mut seen: Vec<String> = Vec::new();
    let mut active: Vec<LeasedTask> = Vec::new();
    for round in 0..200 {
        let now = at(2 + round);
        let lease =
            |name: &'static str| async move { store.lease(&lease_request(name, 4), now).await };
        let (a, b, c, d) = tokio::join!(lease("r1"), lease("r2"), lease("r3"), lease("r4"));
        let leased: Vec<LeasedTask> = [a?, b?, c?, d?].concat();
        if leased.is_empty() && active.is_empty() {
            break;
        }
        for task in leased {
            assert!(
                !seen.contains(&task.task.id),
                "task {} was handed out twice",
                task.task.id
            );
            seen.push(task.task.id.clone());
            if limited(&task) {
                active.push(task);
            } else {
                cancel_leased(store, &task, now).await?;
            }
        }
        assert!(
            active.len() <= 3,
            "round {round}: {} tasks of {what} limited to 3 were active",
            active.len()
        );
        for task in active.drain(..active.len().min(2)) {
            cancel_leased(store, &task, now).await?;
        }
    }
    Ok(seen.len())
}

/// Ends a leased task as cancelled.
async fn cancel_leased(
    store: &dyn Store,
    task: &LeasedTask,
    now: stevedore_model::Timestamp,
) -> Result<()> {
    store
        .complete(
            &task.task.id,
            task.lease.token,
            &TaskOutcome::Cancelled,
            &RunReport::default(),
            now,
        )
        .await?;
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

/// Many writes about leased tasks at once, as a runner's slots send them: each gets its own
/// answer, however a store groups them. A stale token among them is refused alone, each
/// completion is recorded once with the one retry it calls for, and the counts and attempt
/// records follow every task.
pub async fn many_concurrent_runner_writes_each_get_their_own_answer(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_retrying_code(store, 1, 0, RetriesBackoff::Fixed).await?;
    store
        .push_code(&acme.id, &image_spec("hello"), None, at(0))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 24], at(0))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("flaky"); 8], at(0))
        .await?;
    let leased = store.lease(&lease_request("runner-1", 32), at(1)).await?;
    assert_eq!(leased.len(), 32);
    // The first task is finished already (cancelled, which calls for no retry), so its token
    // is stale from here on.
    let (done, live) = leased.split_first().expect("32 tasks");
    store
        .complete(
            &done.task.id,
            done.lease.token,
            &TaskOutcome::Cancelled,
            &RunReport::default(),
            at(2),
        )
        .await?;
    let wrong_token = |leased: &LeasedTask| leased.lease.token ^ 1;

    // Heartbeats: each live task's own, the finished task's, and one with a wrong token.
    let mut heartbeats: Vec<_> = leased
        .iter()
        .map(|task| store.heartbeat(&task.task.id, task.lease.token, 120, at(3)))
        .collect();
    heartbeats.push(store.heartbeat(&live[0].task.id, wrong_token(&live[0]), 120, at(3)));
    let mut answers = join_all(heartbeats).await.into_iter();
    assert_stale(
        answers.next_back().expect("an answer"),
        "a heartbeat with a wrong token",
    );
    assert_stale(
        answers.next().expect("an answer"),
        "a heartbeat of a finished task",
    );
    for answer in answers {
        assert_eq!(answer?.expires_at, at(123));
    }

    // Starts, then completions: every hello task exits 0, every flaky one 1; a second
    // completion of one task with a wrong token is refused while its own is recorded.
    let starts = join_all(
        live.iter()
            .map(|task| store.mark_running(&task.task.id, task.lease.token, at(4), at(4))),
    )
    .await;
    for started in starts {
        assert_eq!(started?.status, TaskStatus::Running);
    }

    // Log appends: one per live task at once, beside one with a wrong token and one of the
    // finished task, then a second per live task: each task gets its own bytes in order, the
    // refused ones none.
    let line = |task: &LeasedTask, part: &str| format!("{} {part}\n", task.task.id);
    let (firsts, seconds): (Vec<String>, Vec<String>) = live
        .iter()
        .map(|task| (line(task, "one"), line(task, "two")))
        .unzip();
    let mut appends: Vec<_> = live
        .iter()
        .zip(&firsts)
        .map(|(task, bytes)| {
            store.append_log(
                &task.task.id,
                task.lease.token,
                bytes.as_bytes(),
                4096,
                at(4),
            )
        })
        .collect();
    appends.push(store.append_log(&done.task.id, done.lease.token, b"late\n", 4096, at(4)));
    appends.push(store.append_log(
        &live[0].task.id,
        wrong_token(&live[0]),
        b"stray\n",
        4096,
        at(4),
    ));
    let mut answers = join_all(appends).await.into_iter();
    assert_stale(
        answers.next_back().expect("an answer"),
        "an append with a wrong token",
    );
    assert_stale(
        answers.next_back().expect("an answer"),
        "an append to a finished task",
    );
    for (answer, bytes) in answers.zip(&firsts) {
        assert_eq!(answer?, bytes.len() as u64);
    }
    let seconds_appended = join_all(live.iter().zip(&seconds).map(|(task, bytes)| {
        store.append_log(
            &task.task.id,
            task.lease.token,
            bytes.as_bytes(),
            4096,
            at(4),
        )
    }))
    .await;
    for ((answer, first), second) in seconds_appended.into_iter().zip(&firsts).zip(&seconds) {
        assert_eq!(answer?, (first.len() + second.len()) as u64);
    }
    for ((task, first), second) in live.iter().zip(&firsts).zip(&seconds) {
        let log = store.get_log(&acme.id, &task.task.id).await?;
        assert_eq!(String::from_utf8_lossy(&log), format!("{first}{second}"));
    }
    let outcome = |task: &LeasedTask| exited(i64::from(task.task.code_name == "flaky"));
    let mut completions: Vec<_> = live
        .iter()
        .map(|task| {
            let outcome = outcome(task);
            async move {
                store
                    .complete(
                        &task.task.id,
                        task.lease.token,
                        &outcome,
                        &RunReport::default(),
                        at(5),
                    )
                    .await
            }
            .boxed()
        })
        .collect();
    let twice = &live[1];
    completions.push(
        async move {
            store
                .complete(
                    &twice.task.id,
                    wrong_token(twice),
                    &exited(0),
                    &RunReport::default(),
                    at(5),
                )
                .await
        }
        .boxed(),
    );
    let mut answers = join_all(completions).await;
    assert_stale(
        answers.pop().expect("an answer"),
        "a completion with a wrong token",
    );
    for (task, answer) in live.iter().zip(answers) {
        let expected = if task.task.code_name == "flaky" {
            TaskStatus::Error
        } else {
            TaskStatus::Complete
        };
        let answered = answer?;
        assert_eq!(answered.status, expected, "{}", task.task.id);
        assert_eq!(store.get_task(&acme.id, &task.task.id).await?, answered);
        let attempts = store.task_attempts(&acme.id, &task.task.id).await?;
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        assert_eq!(
            (
                attempts[0].started_at,
                attempts[0].ended_at,
                attempts[0].ending.as_deref()
            ),
            (Some(at(4)), Some(at(5)), Some(expected.as_str())),
            "{}",
            task.task.id
        );
    }
    // Each failed flaky task queued its one retry; nothing is leased any more.
    let failed = live
        .iter()
        .filter(|task| task.task.code_name == "flaky")
        .count();
    let retries = retries_of(store, &acme.id).await?;
    assert_eq!(retries.len(), failed, "{retries:?}");
    let mut originals: Vec<_> = retries
        .iter()
        .filter_map(|retry| retry.original_task_id.clone())
        .collect();
    originals.sort();
    originals.dedup();
    assert_eq!(originals.len(), failed, "one retry per failed task");
    let gauges = store.gauges(at(6)).await?;
    assert_eq!(
        gauges.by_status,
        vec![
            (TaskStatus::Queued, failed as u64),
            (TaskStatus::Preparing, 0),
            (TaskStatus::Running, 0)
        ]
    );
    Ok(())
}

/// Writes about one task that arrive together take turns: each sees the task as the one
/// before left it, so the task ends once and its one attempt is recorded whole.
pub async fn concurrent_writes_about_one_task_take_turns(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let token = lease_one(store, at(1)).await?.lease.token;
    let id = id.as_str();
    let (success, failure, report) = (exited(0), exited(1), RunReport::default());
    let (heartbeat, started, progress, completed, again) = tokio::join!(
        store.heartbeat(id, token, 120, at(2)),
        store.mark_running(id, token, at(2), at(2)),
        store.runner_progress(id, token, Some(50), Some("half"), at(2)),
        store.complete(id, token, &success, &report, at(3)),
        store.complete(id, token, &failure, &report, at(3)),
    );
    let refused = |result: &Result<()>| match result {
        Ok(()) => Ok(false),
        Err(StoreError::StaleLease { .. }) => Ok(true),
        Err(other) => Err(format!("{other:?}")),
    };
    let outcomes = [
        refused(&heartbeat.map(drop)),
        refused(&started.map(drop)),
        refused(&progress),
        refused(&completed.map(drop)),
        refused(&again.map(drop)),
    ];
    for outcome in &outcomes {
        assert!(
            outcome.is_ok(),
            "only stale tokens may be refused: {outcomes:?}"
        );
    }
    let finished = outcomes[3..]
        .iter()
        .filter(|outcome| **outcome == Ok(false))
        .count();
    assert_eq!(finished, 1, "exactly one completion wins: {outcomes:?}");
    let task = store.get_task(&acme.id, id).await?;
    assert!(task.status.is_terminal(), "{task:?}");
    let attempts = store.task_attempts(&acme.id, id).await?;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].ended_at, Some(at(3)));
    assert_eq!(attempts[0].ending.as_deref(), Some(task.status.as_str()));
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
