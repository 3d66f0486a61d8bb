//! Queueing tasks, reading and listing them, cancelling them, and their progress.

use chrono::{Duration, SubsecRound};
use stevedore_model::{CodeKind, NewTask, TaskOutcome, TaskStatus};

use super::{
    ALL, assert_not_found, at, code_cancellation, enqueue_one, exited, ids, image_spec, lease_one,
    lease_request, new_task, page, project, project_with_code, rescued_one,
};
use crate::{Page, Requeue, Result, RunReport, Store, StoreError, TaskFilter};

pub async fn enqueue_pins_the_latest_revision(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let first = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let mut v2 = image_spec("hello");
    v2.kind = CodeKind::Image {
        image: "stevedore/busybox:v2".to_owned(),
        command: None,
    };
    store.push_code(&acme.id, &v2, None, at(2)).await?;
    let second = enqueue_one(store, &acme.id, new_task("hello"), at(3)).await?;
    assert_eq!(store.get_task(&acme.id, &first).await?.code_rev, 1);
    assert_eq!(store.get_task(&acme.id, &second).await?.code_rev, 2);

    let leased = store.lease(&lease_request("runner-1", 10), at(4)).await?;
    assert_eq!(ids(&leased), vec![first, second]);
    assert_eq!(leased[0].code.rev, 1);
    assert_eq!(leased[0].code.spec, image_spec("hello"));
    assert_eq!(leased[1].code.rev, 2);
    assert_eq!(leased[1].code.spec, v2);
    Ok(())
}

pub async fn enqueue_can_pin_an_earlier_revision(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let mut v2 = image_spec("hello");
    v2.config = Some("second".to_owned());
    store.push_code(&acme.id, &v2, None, at(1)).await?;
    // A retry runs the revision that failed, not whatever was pushed since.
    let retry = NewTask {
        code_rev: Some(1),
        retry_count: 1,
        original_task_id: Some("first-try".to_owned()),
        ..new_task("hello")
    };
    let task = store.enqueue(&acme.id, &[retry], at(2)).await?.remove(0);
    assert_eq!((task.code_rev, task.retry_count), (1, 1));
    assert_eq!(task.original_task_id.as_deref(), Some("first-try"));
    let leased = lease_one(store, at(3)).await?;
    assert_eq!(
        (leased.code.rev, &leased.code.spec),
        (1, &image_spec("hello"))
    );

    for missing in [0, 3] {
        let pinned = NewTask {
            code_rev: Some(missing),
            ..new_task("hello")
        };
        assert_not_found(
            store
                .enqueue(&acme.id, &[new_task("hello"), pinned], at(4))
                .await,
            "revision",
        );
    }
    assert_eq!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .len(),
        1
    );
    Ok(())
}

pub async fn enqueue_is_all_or_nothing(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let batch = [new_task("hello"), new_task("missing"), new_task("hello")];
    assert_not_found(store.enqueue(&acme.id, &batch, at(1)).await, "missing");
    assert!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .is_empty()
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 10), at(2))
            .await?
            .is_empty()
    );

    let queued = store
        .enqueue(&acme.id, &[new_task("hello"), new_task("hello")], at(3))
        .await?;
    assert_eq!(queued.len(), 2);
    for task in &queued {
        assert_eq!(task.status, TaskStatus::Queued);
        assert_eq!(&store.get_task(&acme.id, &task.id).await?, task);
    }
    assert!(store.enqueue(&acme.id, &[], at(4)).await?.is_empty());
    Ok(())
}

pub async fn enqueue_delay_sets_the_due_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let mut delayed = new_task("hello");
    delayed.delay_secs = 30;
    delayed.label = Some("later".to_owned());
    let task = store
        .enqueue(&acme.id, &[delayed], at(100))
        .await?
        .remove(0);
    assert_eq!((task.created_at, task.due_at), (at(100), at(130)));
    assert_eq!(
        (task.delay_secs, task.label.as_deref()),
        (30, Some("later"))
    );
    assert!(
        store
            .lease(&lease_request("runner-1", 1), at(129))
            .await?
            .is_empty()
    );
    assert_eq!(lease_one(store, at(130)).await?.task.id, task.id);
    Ok(())
}

pub async fn timestamps_round_trip(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    // Nanoseconds are more than any database keeps; what comes back must equal what is read.
    let now = at(5) + Duration::nanoseconds(123_456_789);
    let task = store
        .enqueue(&acme.id, &[new_task("hello")], now)
        .await?
        .remove(0);
    assert_eq!(store.get_task(&acme.id, &task.id).await?, task);
    assert_eq!(task.created_at, now.trunc_subsecs(6));
    let leased = lease_one(store, now).await?;
    let started = store
        .mark_running(&task.id, leased.lease.token, now, now)
        .await?;
    assert_eq!(store.get_task(&acme.id, &task.id).await?, started);
    let report = RunReport {
        start_time: Some(now),
        end_time: Some(now + Duration::nanoseconds(5)),
        peak_memory_bytes: Some(1 << 40),
        cpu_time_ms: Some(12),
    };
    let done = store
        .complete(&task.id, leased.lease.token, &exited(0), &report, now)
        .await?;
    assert_eq!(store.get_task(&acme.id, &task.id).await?, done);
    Ok(())
}

pub async fn payloads_round_trip_exactly(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let payloads = [
        String::new(),
        "not json at all".to_owned(),
        "{\"quote\":\"\\\"\",\"ship\":\"🚢\",\"umlaut\":\"ü\"}".to_owned(),
        "line one\nline two\r\n\ttabbed \u{0} nul \u{1f} unit separator".to_owned(),
        "x".repeat(64 * 1024),
    ];
    let batch: Vec<NewTask> = payloads
        .iter()
        .map(|payload| NewTask {
            payload: payload.clone(),
            label: Some("label with 'quotes'".to_owned()),
            ..new_task("hello")
        })
        .collect();
    let queued = store.enqueue(&acme.id, &batch, at(1)).await?;
    for (task, payload) in queued.iter().zip(&payloads) {
        assert_eq!(&task.payload, payload);
        assert_eq!(&store.get_task(&acme.id, &task.id).await?, task);
    }
    let leased = store.lease(&lease_request("runner-1", 10), at(2)).await?;
    let leased_payloads: Vec<&String> = leased.iter().map(|leased| &leased.task.payload).collect();
    assert_eq!(leased_payloads, payloads.iter().collect::<Vec<_>>());
    Ok(())
}

pub async fn cancel_queued_leased_and_finished_tasks(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let running = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let queued = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let leased = lease_one(store, at(2)).await?;
    assert_eq!(leased.task.id, running);
    store
        .mark_running(&running, leased.lease.token, at(3), at(3))
        .await?;

    let cancelled = store.cancel_task(&acme.id, &queued, at(4)).await?;
    assert_eq!(
        (cancelled.status, cancelled.end_time),
        (TaskStatus::Cancelled, Some(at(4)))
    );
    assert_eq!(store.get_task(&acme.id, &queued).await?, cancelled);
    assert!(
        store
            .lease(&lease_request("runner-1", 5), at(5))
            .await?
            .is_empty()
    );

    let flagged = store.cancel_task(&acme.id, &running, at(5)).await?;
    assert_eq!(
        (flagged.status, flagged.cancel_requested),
        (TaskStatus::Running, true)
    );
    let reply = store
        .heartbeat(&running, leased.lease.token, 60, at(6))
        .await?;
    assert!(reply.cancel_requested);
    let done = store
        .complete(
            &running,
            leased.lease.token,
            &TaskOutcome::Cancelled,
            &RunReport::default(),
            at(7),
        )
        .await?;
    assert_eq!(done.status, TaskStatus::Cancelled);

    for finished in [&queued, &running] {
        match store.cancel_task(&acme.id, finished, at(8)).await {
            Err(StoreError::Conflict(message)) => {
                assert!(
                    message.contains(finished.as_str()) && message.contains("already"),
                    "{message}"
                );
            }
            other => panic!("cancelling a finished task: expected Conflict, got {other:?}"),
        }
    }
    assert_not_found(store.cancel_task(&acme.id, "nope", at(8)).await, "nope");

    // A task flagged for cancellation that its runner gives back is cancelled, not requeued.
    let flagged = enqueue_one(store, &acme.id, new_task("hello"), at(9)).await?;
    let leased = lease_one(store, at(9)).await?;
    store.cancel_task(&acme.id, &flagged, at(10)).await?;
    let requeue = Requeue {
        reason: "engine down".to_owned(),
        due_at: at(11),
        max_infra_attempts: 5,
    };
    let given_back = store
        .requeue(&flagged, leased.lease.token, &requeue, at(11))
        .await?;
    assert_eq!(given_back.status, TaskStatus::Cancelled);
    Ok(())
}

pub async fn cancel_all_cancels_a_codes_tasks(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let code = store
        .push_code(&acme.id, &image_spec("hello"), None, at(0))
        .await?;
    store
        .push_code(&acme.id, &image_spec("other"), None, at(0))
        .await?;
    let done = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let leased = lease_one(store, at(2)).await?;
    assert_eq!(leased.task.id, done);
    store
        .mark_running(&done, leased.lease.token, at(2), at(2))
        .await?;
    store
        .complete(
            &done,
            leased.lease.token,
            &exited(0),
            &RunReport::default(),
            at(3),
        )
        .await?;
    let running = enqueue_one(store, &acme.id, new_task("hello"), at(4)).await?;
    let leased = lease_one(store, at(5)).await?;
    assert_eq!(leased.task.id, running);
    let queued = store
        .enqueue(&acme.id, &vec![new_task("hello"); 2], at(6))
        .await?;
    let untouched = enqueue_one(store, &acme.id, new_task("other"), at(6)).await?;

    assert_eq!(
        store.cancel_all(&acme.id, &code.id, at(7)).await?,
        code_cancellation("hello", 2, 1)
    );
    for task in &queued {
        let task = store.get_task(&acme.id, &task.id).await?;
        assert_eq!(
            (task.status, task.end_time),
            (TaskStatus::Cancelled, Some(at(7)))
        );
    }
    assert!(store.get_task(&acme.id, &running).await?.cancel_requested);
    let reply = store
        .heartbeat(&running, leased.lease.token, 60, at(7))
        .await?;
    assert!(
        reply.cancel_requested,
        "the runner learns of the cancel on its next heartbeat"
    );
    assert_eq!(
        store.get_task(&acme.id, &done).await?.status,
        TaskStatus::Complete
    );
    assert_eq!(
        store.get_task(&acme.id, &untouched).await?.status,
        TaskStatus::Queued
    );
    assert_eq!(
        store.cancel_all(&acme.id, &code.id, at(8)).await?,
        code_cancellation("hello", 0, 0)
    );
    assert_not_found(store.cancel_all(&acme.id, "nope", at(8)).await, "nope");
    // A task asked to cancel whose runner went silent ends `cancelled` when rescued.
    assert_eq!(
        store.rescue_expired(at(68), 5).await?,
        rescued_one(&running, "hello", TaskStatus::Cancelled)
    );
    Ok(())
}

pub async fn progress_from_the_task_and_the_runner(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let id = enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let leased = lease_one(store, at(1)).await?;
    store
        .mark_running(&id, leased.lease.token, at(2), at(2))
        .await?;
    let task = store
        .set_progress(&acme.id, &id, Some(10), Some("warming up"), at(3))
        .await?;
    assert_eq!(
        (task.percent, task.msg.as_deref()),
        (Some(10), Some("warming up"))
    );
    store
        .runner_progress(&id, leased.lease.token, Some(55), None, at(4))
        .await?;
    let task = store.get_task(&acme.id, &id).await?;
    assert_eq!(
        (task.percent, task.msg.as_deref(), task.updated_at),
        (Some(55), Some("warming up"), at(4))
    );
    store
        .complete(
            &id,
            leased.lease.token,
            &exited(0),
            &RunReport::default(),
            at(5),
        )
        .await?;
    assert!(matches!(
        store
            .set_progress(&acme.id, &id, Some(99), None, at(6))
            .await,
        Err(StoreError::Conflict(_))
    ));
    Ok(())
}

pub async fn list_tasks_filters_and_pages(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    store
        .push_code(&acme.id, &image_spec("x"), None, at(0))
        .await?;
    store
        .push_code(&acme.id, &image_spec("y"), None, at(0))
        .await?;
    let x1 = enqueue_one(store, &acme.id, new_task("x"), at(1)).await?;
    let x2 = enqueue_one(store, &acme.id, new_task("x"), at(2)).await?;
    let labelled = NewTask {
        label: Some("nightly".to_owned()),
        ..new_task("x")
    };
    let x3 = enqueue_one(store, &acme.id, labelled, at(3)).await?;
    let y4 = enqueue_one(store, &acme.id, new_task("y"), at(4)).await?;
    let leased = lease_one(store, at(5)).await?;
    assert_eq!(leased.task.id, x1);
    store.cancel_task(&acme.id, &x2, at(6)).await?;

    let project_id = acme.id.as_str();
    let list = |filter: TaskFilter, page: Page| async move {
        let tasks = store.list_tasks(project_id, &filter, page).await?;
        Ok::<_, StoreError>(tasks.into_iter().map(|task| task.id).collect::<Vec<_>>())
    };
    let all = TaskFilter::default();
    assert_eq!(
        list(all.clone(), ALL).await?,
        vec![y4.clone(), x3.clone(), x2.clone(), x1.clone()]
    );
    assert_eq!(
        list(all.clone(), page(1, 3)).await?,
        vec![y4.clone(), x3.clone(), x2.clone()]
    );
    assert_eq!(list(all.clone(), page(2, 3)).await?, vec![x1.clone()]);
    assert!(list(all.clone(), page(3, 3)).await?.is_empty());
    let by_code = TaskFilter {
        code_name: Some("x".to_owned()),
        ..TaskFilter::default()
    };
    assert_eq!(
        list(by_code, ALL).await?,
        vec![x3.clone(), x2.clone(), x1.clone()]
    );
    let by_status = TaskFilter {
        statuses: vec![TaskStatus::Queued, TaskStatus::Cancelled],
        ..TaskFilter::default()
    };
    assert_eq!(
        list(by_status, ALL).await?,
        vec![y4.clone(), x3.clone(), x2.clone()]
    );
    let by_time = TaskFilter {
        from_time: Some(at(2)),
        to_time: Some(at(3)),
        ..TaskFilter::default()
    };
    assert_eq!(list(by_time, ALL).await?, vec![x3.clone(), x2.clone()]);
    let by_label = TaskFilter {
        label: Some("nightly".to_owned()),
        ..TaskFilter::default()
    };
    assert_eq!(list(by_label, ALL).await?, vec![x3.clone()]);
    let everything = TaskFilter {
        code_name: Some("x".to_owned()),
        label: None,
        statuses: vec![TaskStatus::Preparing],
        from_time: Some(at(1)),
        to_time: Some(at(1)),
    };
    assert_eq!(list(everything, ALL).await?, vec![x1]);
    Ok(())
}
