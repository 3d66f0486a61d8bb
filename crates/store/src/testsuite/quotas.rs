//! Quotas: a project's own limits over the defaults, each enforced by the write it guards with
//! nothing written when refused, and counts that hold when writers race.

use stevedore_model::{Quota, QuotaExceeded, QuotaLimits, TaskOutcome, TaskStatus};

use super::{
    ALL, SpooledPackage, at, image_spec, lease_one, lease_request, new_task, project,
    project_with_code, schedule_spec, spool,
};
use crate::{LeasedTask, Result, RunReport, Store, StoreError, TaskFilter};

fn assert_exceeded<T: std::fmt::Debug>(result: Result<T>, quota: Quota, limit: u64, used: u64) {
    match result {
        Err(StoreError::QuotaExceeded(exceeded)) => {
            assert_eq!(exceeded, QuotaExceeded { quota, limit, used }, "{exceeded}")
        }
        other => panic!("expected {quota} exceeded at {used} of {limit}, got {other:?}"),
    }
}

async fn queued(store: &dyn Store, project_id: &str) -> Result<usize> {
    let filter = TaskFilter {
        statuses: vec![TaskStatus::Queued],
        ..TaskFilter::default()
    };
    Ok(store.list_tasks(project_id, &filter, ALL).await?.len())
}

/// A package of `size` bytes, different for each `seed`.
async fn package(size: usize, seed: u8) -> Result<SpooledPackage> {
    spool(&vec![seed; size]).await
}

pub async fn quotas_default_and_are_overridden_per_project(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    let quotas = store.project_quotas(&acme.id).await?;
    let order: Vec<Quota> = quotas.iter().map(|quota| quota.quota).collect();
    assert_eq!(order, Quota::ALL);
    let defaults = QuotaLimits::default();
    for quota in &quotas {
        assert_eq!(quota.limit, defaults.get(quota.quota), "{}", quota.quota);
        assert!(!quota.own_limit);
    }
    let used = |quota: Quota| {
        quotas
            .iter()
            .find(|seen| seen.quota == quota)
            .and_then(|seen| seen.used)
    };
    assert_eq!(used(Quota::Codes), Some(1));
    assert_eq!(used(Quota::RevisionsPerCode), Some(1));
    assert_eq!(used(Quota::QueuedTasks), Some(0));
    assert_eq!(
        used(Quota::LogStreamsPerToken),
        None,
        "the server counts those"
    );

    store
        .set_project_quota(&acme.id, Quota::Codes, Some(7), at(1))
        .await?;
    store
        .set_project_quota(&acme.id, Quota::Codes, Some(5), at(2))
        .await?;
    let limits = store.quota_limits(&acme.id).await?;
    assert_eq!(limits.codes, 5, "the last limit set holds");
    assert_eq!(limits.schedules, defaults.schedules);
    let own = store.project_quotas(&acme.id).await?;
    assert!(
        own.iter()
            .any(|quota| quota.quota == Quota::Codes && quota.own_limit)
    );
    assert_eq!(
        store.quota_limits(&other.id).await?,
        defaults,
        "per project"
    );

    store
        .set_project_quota(&acme.id, Quota::Codes, None, at(3))
        .await?;
    assert_eq!(store.quota_limits(&acme.id).await?, defaults);
    assert!(matches!(
        store
            .set_project_quota("nope", Quota::Codes, Some(1), at(3))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.project_quotas("nope").await,
        Err(StoreError::NotFound { .. })
    ));
    Ok(())
}

pub async fn each_quota_refuses_the_write_that_passes_it_and_writes_nothing(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let set = |quota, limit| store.set_project_quota(&acme.id, quota, Some(limit), at(1));

    // Queued tasks: a batch counts whole; leasing one makes room.
    set(Quota::QueuedTasks, 3).await?;
    store
        .enqueue(&acme.id, &[new_task("hello"), new_task("hello")], at(2))
        .await?;
    assert_exceeded(
        store
            .enqueue(&acme.id, &[new_task("hello"), new_task("hello")], at(2))
            .await,
        Quota::QueuedTasks,
        3,
        2,
    );
    assert_eq!(queued(store, &acme.id).await?, 2, "nothing of the batch");
    store.enqueue(&acme.id, &[new_task("hello")], at(2)).await?;
    lease_one(store, at(3)).await?;
    store.enqueue(&acme.id, &[new_task("hello")], at(4)).await?;

    // Schedules: only those that still fire count.
    set(Quota::Schedules, 1).await?;
    store
        .create_schedules(&acme.id, &[(schedule_spec("hello", 60), None)], at(5))
        .await?;
    store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(60)))],
            at(5),
        )
        .await?;
    assert_exceeded(
        store
            .create_schedules(
                &acme.id,
                &[(schedule_spec("hello", 60), Some(at(60)))],
                at(5),
            )
            .await,
        Quota::Schedules,
        1,
        1,
    );
    assert_eq!(store.list_schedules(&acme.id, ALL).await?.len(), 2);

    // Codes: a new name is refused, a revision of a known one is not.
    set(Quota::Codes, 1).await?;
    assert_exceeded(
        store
            .push_code(&acme.id, &image_spec("second"), None, at(6))
            .await,
        Quota::Codes,
        1,
        1,
    );
    assert!(store.get_code_by_name(&acme.id, "second").await.is_err());

    // Revisions per code.
    set(Quota::RevisionsPerCode, 2).await?;
    store
        .push_code(&acme.id, &image_spec("hello"), None, at(7))
        .await?;
    assert_exceeded(
        store
            .push_code(&acme.id, &image_spec("hello"), None, at(8))
            .await,
        Quota::RevisionsPerCode,
        2,
        2,
    );
    assert_eq!(store.get_code_by_name(&acme.id, "hello").await?.rev, 2);

    // Package bytes: each package the project's revisions hold counts once.
    set(Quota::RevisionsPerCode, 100).await?;
    set(Quota::PackageBytes, 1000).await?;
    let first = package(600, 1).await?;
    store
        .push_code(&acme.id, &image_spec("hello"), first.revision(), at(9))
        .await?;
    assert_exceeded(
        store
            .push_code(
                &acme.id,
                &image_spec("hello"),
                package(600, 2).await?.revision(),
                at(10),
            )
            .await,
        Quota::PackageBytes,
        1000,
        600,
    );
    assert_eq!(store.get_code_by_name(&acme.id, "hello").await?.rev, 3);
    // The same package again adds nothing.
    store
        .push_code(&acme.id, &image_spec("hello"), first.revision(), at(10))
        .await?;
    assert_eq!(store.get_code_by_name(&acme.id, "hello").await?.rev, 4);
    // Deleting the code frees its codes and package bytes.
    let code = store.get_code_by_name(&acme.id, "hello").await?;
    store.delete_code(&acme.id, &code.id, at(11)).await?;
    store
        .push_code(
            &acme.id,
            &image_spec("again"),
            package(900, 3).await?.revision(),
            at(12),
        )
        .await?;

    // A limit lowered below what the project holds removes nothing and refuses more.
    set(Quota::QueuedTasks, 0).await?;
    let quotas = store.project_quotas(&acme.id).await?;
    let queued_tasks = quotas
        .iter()
        .find(|quota| quota.quota == Quota::QueuedTasks)
        .unwrap();
    assert_eq!((queued_tasks.limit, queued_tasks.used), (0, Some(0)));
    Ok(())
}

pub async fn a_schedule_at_its_projects_queued_quota_passes_a_fire_time(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .set_project_quota(&acme.id, Quota::QueuedTasks, Some(1), at(0))
        .await?;
    store.enqueue(&acme.id, &[new_task("hello")], at(0)).await?;
    let schedule = store
        .create_schedules(
            &acme.id,
            &[(schedule_spec("hello", 60), Some(at(10)))],
            at(0),
        )
        .await?
        .remove(0);
    let fired = store
        .fire_schedule(&schedule.id, at(10), Some(at(70)), at(10))
        .await?;
    assert!(fired.is_none(), "no room: the fire passes");
    let schedule = store.get_schedule(&acme.id, &schedule.id).await?;
    assert_eq!(schedule.run_count, 0);
    assert_eq!(schedule.next_start, Some(at(70)));
    assert_eq!(queued(store, &acme.id).await?, 1);
    Ok(())
}

/// Writers racing to the last places of a quota: exactly as many succeed as there is room
/// for, however their transactions interleave.
pub async fn concurrent_writers_never_pass_a_quota(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    store
        .set_project_quota(&acme.id, Quota::QueuedTasks, Some(5), at(0))
        .await?;
    store
        .set_project_quota(&acme.id, Quota::Codes, Some(4), at(0))
        .await?;
    let batch = [new_task("hello"), new_task("hello")];
    let enqueue = || store.enqueue(&acme.id, &batch, at(1));
    let (a, b, c, d, e, f) = tokio::join!(
        enqueue(),
        enqueue(),
        enqueue(),
        enqueue(),
        enqueue(),
        enqueue()
    );
    let results = [a, b, c, d, e, f];
    let queued_ok = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(queued_ok, 2, "two batches of two fit under five");
    for result in results {
        if let Err(error) = result {
            assert!(matches!(error, StoreError::QuotaExceeded(_)), "{error:?}");
        }
    }
    assert_eq!(queued(store, &acme.id).await?, 4);

    let specs: Vec<_> = ["a", "b", "c", "d", "e"].map(image_spec).into();
    let push = |index: usize| store.push_code(&acme.id, &specs[index], None, at(2));
    let (a, b, c, d, e) = tokio::join!(push(0), push(1), push(2), push(3), push(4));
    let pushed = [a, b, c, d, e]
        .into_iter()
        .filter(|result| result.is_ok())
        .count();
    assert_eq!(pushed, 3, "three new codes beside the first fit under four");
    assert_eq!(store.list_codes(&acme.id, ALL).await?.len(), 4);
    Ok(())
}

/// Queueings that arrive together (and may be written together) are each all or nothing on
/// their own: one refused for its quota or for a missing code writes none of its tasks and
/// costs the others nothing, the quota counts the requests accepted before it, and another
/// project's request is not held to this project's limit.
pub async fn concurrent_queueings_are_each_all_or_nothing(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    store
        .set_project_quota(&acme.id, Quota::QueuedTasks, Some(5), at(0))
        .await?;
    let single = [new_task("hello")];
    let missing = [new_task("hello"), new_task("nope")];
    let elsewhere = vec![new_task("hello"); 7];
    let mut calls = Vec::new();
    for index in 0..12 {
        calls.push(match index % 4 {
            1 => store.enqueue(&acme.id, &missing, at(1)),
            3 if index == 3 => store.enqueue(&other.id, &elsewhere, at(1)),
            _ => store.enqueue(&acme.id, &single, at(1)),
        });
    }
    let results = futures::future::join_all(calls).await;
    let mut accepted = 0;
    for (index, result) in results.into_iter().enumerate() {
        match (index % 4, result) {
            (1, Err(StoreError::NotFound { .. })) => {}
            (3, Ok(queued)) if index == 3 => {
                assert_eq!(queued.len(), 7);
                assert!(queued.iter().all(|task| task.project_id == other.id));
            }
            (_, Ok(queued)) => {
                assert_eq!(queued.len(), 1);
                assert_eq!(queued[0].project_id, acme.id);
                accepted += 1;
            }
            (_, Err(StoreError::QuotaExceeded(_))) => {}
            (index, other) => panic!("request {index}: unexpected {other:?}"),
        }
    }
    assert_eq!(
        accepted, 5,
        "five single tasks fit under five, whatever came with them"
    );
    assert_eq!(queued(store, &acme.id).await?, 5);
    assert_eq!(queued(store, &other.id).await?, 7);
    Ok(())
}

/// A project at its `running_tasks` quota gets no more leases, within one lease call and
/// across calls, while other projects' tasks go on; a task that ends frees its place.
pub async fn the_running_tasks_quota_holds_leases_back_and_lets_others_run(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("other"), None, at(0))
        .await?;
    store
        .set_project_quota(&acme.id, Quota::RunningTasks, Some(2), at(0))
        .await?;
    store
        .enqueue(&acme.id, &vec![new_task("hello"); 6], at(1))
        .await?;
    store
        .enqueue(&other.id, &vec![new_task("other"); 3], at(1))
        .await?;

    let first = store.lease(&lease_request("runner-1", 10), at(2)).await?;
    let of = |leased: &[LeasedTask], project: &str| {
        leased
            .iter()
            .filter(|leased| leased.task.project_id == project)
            .count()
    };
    assert_eq!((of(&first, &acme.id), of(&first, &other.id)), (2, 3));
    let quotas = store.project_quotas(&acme.id).await?;
    let running = quotas
        .iter()
        .find(|quota| quota.quota == Quota::RunningTasks)
        .expect("listed");
    assert_eq!((running.used, running.limit), (Some(2), 2));

    // Preparing and running both count; nothing more of acme's is handed out.
    let held = first
        .iter()
        .find(|leased| leased.task.project_id == acme.id)
        .expect("one of acme's");
    store
        .mark_running(&held.task.id, held.lease.token, at(3), at(3))
        .await?;
    assert!(
        store
            .lease(&lease_request("runner-2", 10), at(4))
            .await?
            .is_empty()
    );

    // One ends: exactly one more starts.
    store
        .complete(
            &held.task.id,
            held.lease.token,
            &TaskOutcome::Exited { exit_code: 0 },
            &RunReport::default(),
            at(5),
        )
        .await?;
    let next = store.lease(&lease_request("runner-2", 10), at(6)).await?;
    assert_eq!(of(&next, &acme.id), 1);

    // Without its own limit the project is back to the generous default.
    store
        .set_project_quota(&acme.id, Quota::RunningTasks, None, at(7))
        .await?;
    let rest = store.lease(&lease_request("runner-3", 10), at(8)).await?;
    assert_eq!(of(&rest, &acme.id), 3);
    Ok(())
}
