//! Schedules: created all or nothing, fired once per due time, changed and cancelled.

use stevedore_model::{ScheduleSpec, ScheduleStatus, ScheduleTiming, TaskStatus};

use super::{ALL, assert_not_found, at, page, project_with_code, schedule_spec};
use crate::{Result, Store, StoreError, TaskFilter};

pub async fn schedules_are_created_all_or_nothing_and_cancelled(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let bad = [
        (schedule_spec("hello", 60), Some(at(60))),
        (schedule_spec("missing", 60), Some(at(60))),
    ];
    assert_not_found(
        store.create_schedules(&acme.id, &bad, at(1)).await,
        "missing",
    );
    assert!(store.list_schedules(&acme.id, ALL).await?.is_empty());

    let cron = ScheduleSpec {
        timing: ScheduleTiming::Cron {
            expression: "*/5 * * * *".to_owned(),
            timezone: "Europe/Berlin".to_owned(),
        },
        ..schedule_spec("hello", 60)
    };
    let created = store
        .create_schedules(
            &acme.id,
            &[
                (schedule_spec("hello", 60), Some(at(60))),
                (cron.clone(), None),
            ],
            at(2),
        )
        .await?;
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    let every = &created[0];
    assert_eq!(
        (every.status, every.next_start, every.run_count),
        (ScheduleStatus::Scheduled, Some(at(60)), 0)
    );
    assert_eq!(
        (every.code_id.as_str(), every.project_id.as_str()),
        (code.id.as_str(), acme.id.as_str())
    );
    assert_eq!(every.spec, schedule_spec("hello", 60));
    assert_eq!(
        (created[1].status, created[1].next_start),
        (ScheduleStatus::Complete, None)
    );
    assert_eq!(created[1].spec, cron);
    assert_eq!(&store.get_schedule(&acme.id, &every.id).await?, every);
    let later = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 120), Some(at(120)))],
            at(3),
        )
        .await?
        .remove(0);
    let listed: Vec<String> = store
        .list_schedules(&acme.id, ALL)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed[0], later.id, "newest first");
    assert_eq!(listed.len(), 3);
    assert_eq!(store.list_schedules(&acme.id, page(2, 2)).await?.len(), 1);

    let cancelled = store.cancel_schedule(&acme.id, &every.id, at(4)).await?;
    assert_eq!(
        (cancelled.status, cancelled.next_start),
        (ScheduleStatus::Cancelled, None)
    );
    assert_eq!(store.get_schedule(&acme.id, &every.id).await?, cancelled);
    // Cancelling again is not an error and changes nothing.
    assert_eq!(
        store.cancel_schedule(&acme.id, &every.id, at(5)).await?,
        cancelled
    );
    assert_not_found(store.cancel_schedule(&acme.id, "nope", at(5)).await, "nope");
    assert!(
        store
            .due_schedules(at(1000), 10)
            .await?
            .iter()
            .all(|s| s.id != every.id)
    );
    Ok(())
}

pub async fn schedules_fire_once_per_due_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let schedule = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(0),
        )
        .await?
        .remove(0);
    assert!(store.due_schedules(at(59), 10).await?.is_empty());
    let due = store.due_schedules(at(61), 10).await?;
    assert_eq!(due, vec![schedule.clone()]);

    let task = store
        .fire_schedule(&schedule.id, at(60), Some(at(120)), at(61))
        .await?
        .ok_or_else(|| StoreError::Corrupt("the schedule queued no task".to_owned()))?;
    assert_eq!(task.schedule_id.as_deref(), Some(schedule.id.as_str()));
    assert_eq!(
        (task.status, task.priority, task.timeout_secs),
        (TaskStatus::Queued, 1, 60)
    );
    assert_eq!(
        (task.payload.as_str(), task.label.as_deref()),
        (r#"{"from":"schedule"}"#, Some("nightly"))
    );
    assert_eq!(store.get_task(&acme.id, &task.id).await?, task);
    let fired = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!(
        (fired.run_count, fired.next_start, fired.last_run_time),
        (1, Some(at(120)), Some(at(61)))
    );
    assert!(store.due_schedules(at(61), 10).await?.is_empty());

    // A second scheduler that saw the same due time cannot fire it again.
    assert!(matches!(
        store
            .fire_schedule(&schedule.id, at(60), Some(at(120)), at(62))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .len(),
        1
    );

    store
        .fire_schedule(&schedule.id, at(120), None, at(121))
        .await?;
    let complete = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!(
        (complete.status, complete.next_start, complete.run_count),
        (ScheduleStatus::Complete, None, 2)
    );
    assert!(store.due_schedules(at(10_000), 10).await?.is_empty());
    assert!(matches!(
        store
            .fire_schedule(&schedule.id, at(120), None, at(122))
            .await,
        Err(StoreError::Conflict(_))
    ));
    Ok(())
}

pub async fn a_schedule_at_its_max_concurrency_passes_a_fire_time(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let spec = ScheduleSpec {
        delay_secs: 30,
        max_concurrency: Some(1),
        run_times: Some(3),
        ..schedule_spec("hello", 60)
    };
    let schedule = store
        .create_schedules(&acme.id, &[(spec, Some(at(60)))], at(0))
        .await?
        .remove(0);
    let first = store
        .fire_schedule(&schedule.id, at(60), Some(at(120)), at(60))
        .await?
        .ok_or_else(|| StoreError::Corrupt("the first fire queued no task".to_owned()))?;
    // The schedule's delay is its tasks' delay.
    assert_eq!((first.delay_secs, first.due_at), (30, at(90)));

    // Its one task is still queued: the next fire time passes without a task, uncounted.
    let passed = store
        .fire_schedule(&schedule.id, at(120), Some(at(180)), at(120))
        .await?;
    assert_eq!(passed, None);
    let after = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!(
        (after.status, after.run_count, after.next_start),
        (ScheduleStatus::Scheduled, 1, Some(at(180)))
    );
    assert_eq!(
        store
            .list_tasks(&acme.id, &TaskFilter::default(), ALL)
            .await?
            .len(),
        1
    );

    // Once its task is finished, it fires again.
    store.cancel_task(&acme.id, &first.id, at(150)).await?;
    let second = store
        .fire_schedule(&schedule.id, at(180), Some(at(240)), at(180))
        .await?;
    assert!(second.is_some());
    let after = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!((after.run_count, after.next_start), (2, Some(at(240))));
    Ok(())
}

pub async fn a_scheduled_schedule_can_be_changed(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let schedule = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(0),
        )
        .await?
        .remove(0);
    let changed_spec = ScheduleSpec {
        payload: "new".to_owned(),
        delay_secs: 5,
        max_concurrency: Some(2),
        ..schedule_spec("hello", 120)
    };
    let changed = store
        .update_schedule(&acme.id, &schedule.id, &changed_spec, Some(at(120)), at(10))
        .await?;
    assert_eq!(
        (&changed.spec, changed.next_start, changed.updated_at),
        (&changed_spec, Some(at(120)), at(10))
    );
    assert_eq!(store.get_schedule(&acme.id, &schedule.id).await?, changed);
    assert!(store.due_schedules(at(61), 10).await?.is_empty());

    // Another project's token cannot reach it; a cancelled one cannot change.
    let other = store.create_project("other", at(0)).await?;
    assert_not_found(
        store
            .update_schedule(&other.id, &schedule.id, &changed_spec, None, at(11))
            .await,
        &schedule.id,
    );
    store
        .cancel_schedule(&acme.id, &schedule.id, at(12))
        .await?;
    assert!(matches!(
        store
            .update_schedule(&acme.id, &schedule.id, &changed_spec, Some(at(120)), at(13))
            .await,
        Err(StoreError::Conflict(_))
    ));
    Ok(())
}
