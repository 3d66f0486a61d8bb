//! Codes and their revisions, packages, deletion and task counts.

use stevedore_model::{ScheduleStatus, TaskOutcome, TaskStatus};

use super::{
    ALL, assert_not_found, assert_stale, at, code_cancellation, enqueue_one, exited, image_spec,
    lease_one, new_task, page, project, project_with_code, rescued_one, schedule_spec, spool,
};
use crate::{CodeStats, Requeue, Result, RunReport, StatsWindow, Store};

pub async fn codes_and_revisions(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let bytes = b"PK\x03\x04 zip bytes".to_vec();
    let package = spool(&bytes).await?;
    let first = store
        .push_code(&acme.id, &image_spec("hello"), package.revision(), at(10))
        .await?;
    assert_eq!(first.rev, 1);
    assert_eq!(first.project_id, acme.id);
    assert_eq!(
        first.package_sha256.as_deref(),
        Some(package.file.sha256.as_str())
    );
    assert_eq!(first.package_size, Some(bytes.len() as u64));
    assert_eq!((first.created_at, first.updated_at), (at(10), at(10)));
    assert!(!first.paused);

    let mut changed = image_spec("hello");
    changed.max_concurrency = Some(3);
    changed
        .env_vars
        .insert("GREETING".to_owned(), "hi".to_owned());
    let second = store.push_code(&acme.id, &changed, None, at(20)).await?;
    assert_eq!((second.id.as_str(), second.rev), (first.id.as_str(), 2));
    assert_eq!((second.created_at, second.updated_at), (at(10), at(20)));
    assert_eq!(second.spec, changed);
    assert_eq!(second.package_sha256, None);

    assert_eq!(store.get_code(&acme.id, &first.id).await?, second);
    assert_eq!(store.get_code_by_name(&acme.id, "hello").await?, second);
    assert_eq!(store.get_revision(&acme.id, &first.id, 1).await?, first);
    assert_not_found(
        store.get_revision(&acme.id, &first.id, 3).await,
        "revision 3",
    );
    let revisions = store.list_revisions(&acme.id, &first.id, ALL).await?;
    assert_eq!(
        revisions.iter().map(|r| r.rev).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(
        store
            .list_revisions(&acme.id, &first.id, page(2, 1))
            .await?,
        vec![first.clone()]
    );

    assert_eq!(
        store
            .get_package(&acme.id, &first.id, Some(1))
            .await?
            .into_bytes()
            .await?,
        bytes
    );
    assert_not_found(
        store.get_package(&acme.id, &first.id, None).await,
        "package",
    );
    assert_not_found(store.get_code_by_name(&acme.id, "nope").await, "nope");
    assert_not_found(store.get_code(&acme.id, "nope").await, "nope");

    // Newest-updated first: pushing to `hello` again moves it ahead of `other`.
    let other = store
        .push_code(&acme.id, &image_spec("other"), None, at(30))
        .await?;
    let names = |codes: Vec<stevedore_model::CodeRevision>| {
        codes.into_iter().map(|c| c.spec.name).collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.list_codes(&acme.id, ALL).await?),
        vec!["other", "hello"]
    );
    let third = store
        .push_code(&acme.id, &image_spec("hello"), package.revision(), at(40))
        .await?;
    assert_eq!(third.rev, 3);
    assert_eq!(
        names(store.list_codes(&acme.id, ALL).await?),
        vec!["hello", "other"]
    );
    assert_eq!(
        names(store.list_codes(&acme.id, page(2, 1)).await?),
        vec!["other"]
    );
    assert_eq!(
        store
            .get_package(&acme.id, &first.id, None)
            .await?
            .into_bytes()
            .await?,
        bytes
    );

    let paused = store
        .set_code_paused(&acme.id, &other.id, true, at(50))
        .await?;
    assert!(paused.paused);
    assert!(store.get_code(&acme.id, &other.id).await?.paused);
    assert!(
        !store
            .set_code_paused(&acme.id, &other.id, false, at(51))
            .await?
            .paused
    );
    assert_not_found(
        store
            .push_code("ghost", &image_spec("x"), None, at(60))
            .await,
        "ghost",
    );
    Ok(())
}

pub async fn a_leased_tasks_package_goes_only_to_its_lease_holder(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let pinned_bytes = b"PK first".to_vec();
    let pinned = spool(&pinned_bytes).await?;
    store
        .push_code(&acme.id, &image_spec("zipped"), pinned.revision(), at(0))
        .await?;
    let id = enqueue_one(store, &acme.id, new_task("zipped"), at(1)).await?;
    // A later revision changes nothing for the task: it runs the revision it pinned.
    store
        .push_code(
            &acme.id,
            &image_spec("zipped"),
            spool(b"PK second").await?.revision(),
            at(2),
        )
        .await?;

    // Queued, the task is nobody's: no token gets its package.
    assert_stale(
        store.leased_package(&id, 1).await,
        "a queued task's package",
    );
    assert_not_found(store.leased_package("nope", 1).await, "nope");

    let old = lease_one(store, at(3)).await?;
    assert_eq!(
        store
            .leased_package(&id, old.lease.token)
            .await?
            .into_bytes()
            .await?,
        pinned_bytes
    );
    assert_stale(
        store.leased_package(&id, old.lease.token + 1).await,
        "another token's package",
    );
    store
        .mark_running(&id, old.lease.token, at(4), at(4))
        .await?;
    assert_eq!(
        store
            .leased_package(&id, old.lease.token)
            .await?
            .into_bytes()
            .await?,
        pinned_bytes
    );

    // Rescued and leased again: only the new lease's token gets the package.
    assert_eq!(
        store.rescue_expired(at(70), 5).await?,
        rescued_one(&id, "zipped", TaskStatus::Queued)
    );
    assert_stale(
        store.leased_package(&id, old.lease.token).await,
        "a rescued lease's package",
    );
    let new = lease_one(store, at(71)).await?;
    assert_stale(
        store.leased_package(&id, old.lease.token).await,
        "a stale lease's package",
    );
    assert_eq!(
        store
            .leased_package(&id, new.lease.token)
            .await?
            .into_bytes()
            .await?,
        pinned_bytes
    );

    // Given back, the task is nobody's again; finished, its last lease gets nothing either.
    let requeue = Requeue {
        reason: "engine down".to_owned(),
        due_at: at(72),
        max_infra_attempts: 5,
    };
    store
        .requeue(&id, new.lease.token, &requeue, at(72))
        .await?;
    assert_stale(
        store.leased_package(&id, new.lease.token).await,
        "a requeued task's package",
    );
    let last = lease_one(store, at(73)).await?;
    store
        .complete(
            &id,
            last.lease.token,
            &TaskOutcome::SetupFailed {
                message: "no".to_owned(),
            },
            &RunReport::default(),
            at(74),
        )
        .await?;
    assert_stale(
        store.leased_package(&id, last.lease.token).await,
        "a finished task's package",
    );

    // An image code's task has no package to hand out.
    store
        .push_code(&acme.id, &image_spec("plain"), None, at(80))
        .await?;
    let plain = enqueue_one(store, &acme.id, new_task("plain"), at(80)).await?;
    let leased = lease_one(store, at(81)).await?;
    assert_eq!(leased.task.id, plain);
    assert_not_found(
        store.leased_package(&plain, leased.lease.token).await,
        "package",
    );
    Ok(())
}

pub async fn deleting_a_code_hides_it_and_cancels_its_queued_tasks(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let running = enqueue_one(store, &acme.id, new_task("hello"), at(1)).await?;
    let queued = enqueue_one(store, &acme.id, new_task("hello"), at(2)).await?;
    let leased = lease_one(store, at(3)).await?;
    assert_eq!(leased.task.id, running);
    let schedule_spec = schedule_spec("hello", 60);
    let schedules = store
        .create_schedules(&acme.id, &[(schedule_spec, Some(at(60)))], at(3))
        .await?;

    assert_eq!(
        store.delete_code(&acme.id, &code.id, at(4)).await?,
        code_cancellation("hello", 1, 1)
    );
    assert_not_found(store.get_code(&acme.id, &code.id).await, &code.id);
    assert_not_found(store.get_code_by_name(&acme.id, "hello").await, "hello");
    assert!(store.list_codes(&acme.id, ALL).await?.is_empty());
    assert_not_found(
        store.enqueue(&acme.id, &[new_task("hello")], at(5)).await,
        "hello",
    );
    assert_not_found(store.delete_code(&acme.id, &code.id, at(5)).await, &code.id);

    let queued = store.get_task(&acme.id, &queued).await?;
    assert_eq!(
        (queued.status, queued.end_time),
        (TaskStatus::Cancelled, Some(at(4)))
    );
    let running = store.get_task(&acme.id, &running).await?;
    assert_eq!(running.status, TaskStatus::Preparing);
    assert!(running.cancel_requested);
    let schedule = store.get_schedule(&acme.id, &schedules[0].id).await?;
    assert_eq!(
        (schedule.status, schedule.next_start),
        (ScheduleStatus::Cancelled, None)
    );
    // The leased task can still finish, and a new code may take the name.
    store
        .complete(
            &running.id,
            leased.lease.token,
            &TaskOutcome::Cancelled,
            &RunReport::default(),
            at(6),
        )
        .await?;
    let reborn = store
        .push_code(&acme.id, &image_spec("hello"), None, at(7))
        .await?;
    assert_ne!(reborn.id, code.id);
    assert_eq!(reborn.rev, 1);
    Ok(())
}

pub async fn code_stats_count_by_status(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let empty = store
        .code_stats(&acme.id, &code.id, StatsWindow::default())
        .await?;
    assert!(empty.by_status.iter().all(|(_, count)| *count == 0));
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 5], at(0))
        .await?;
    let first = lease_one(store, at(1)).await?;
    let second = lease_one(store, at(1)).await?;
    store
        .mark_running(&second.task.id, second.lease.token, at(2), at(2))
        .await?;
    store
        .complete(
            &second.task.id,
            second.lease.token,
            &exited(1),
            &RunReport::default(),
            at(3),
        )
        .await?;
    let third = lease_one(store, at(4)).await?;
    store
        .mark_running(&third.task.id, third.lease.token, at(4), at(4))
        .await?;
    let stats = store
        .code_stats(&acme.id, &code.id, StatsWindow::default())
        .await?;
    let count = |status: TaskStatus| {
        stats
            .by_status
            .iter()
            .find(|(known, _)| *known == status)
            .map_or(0, |(_, count)| *count)
    };
    assert_eq!(count(TaskStatus::Queued), 2);
    assert_eq!(count(TaskStatus::Preparing), 1);
    assert_eq!(count(TaskStatus::Running), 1);
    assert_eq!(count(TaskStatus::Error), 1);
    assert_eq!(count(TaskStatus::Complete), 0);
    assert_eq!(first.task.status, TaskStatus::Preparing);

    // IronWorker's start_date/end_date: only tasks last changed inside the window count.
    let counts = |stats: CodeStats| -> Vec<(TaskStatus, u64)> {
        stats
            .by_status
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .collect()
    };
    let late = StatsWindow {
        updated_from: Some(at(3)),
        updated_to: None,
    };
    assert_eq!(
        counts(store.code_stats(&acme.id, &code.id, late).await?),
        vec![(TaskStatus::Running, 1), (TaskStatus::Error, 1)]
    );
    let early = StatsWindow {
        updated_from: None,
        updated_to: Some(at(1)),
    };
    assert_eq!(
        counts(store.code_stats(&acme.id, &code.id, early).await?),
        vec![(TaskStatus::Queued, 2), (TaskStatus::Preparing, 1)]
    );
    Ok(())
}
