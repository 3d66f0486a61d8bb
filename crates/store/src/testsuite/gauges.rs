//! The task counts behind the metrics gauges.

use stevedore_model::{NewTask, TaskStatus};

use super::{
    at, code_cancellation, enqueue_one, exited, image_spec, lease_one, lease_request, new_task,
    project, project_with_code,
};
use crate::{Result, RunReport, Store, StoreGauges};

pub async fn gauges_count_live_tasks_and_due_queues_by_priority(store: &dyn Store) -> Result<()> {
    let gauges = |queued, preparing, running, depth: [u64; 3]| StoreGauges {
        by_status: vec![
            (TaskStatus::Queued, queued),
            (TaskStatus::Preparing, preparing),
            (TaskStatus::Running, running),
        ],
        queue_depth: vec![(0, depth[0]), (1, depth[1]), (2, depth[2])],
    };
    // An empty store still reports every status and priority.
    assert_eq!(store.gauges(at(0)).await?, gauges(0, 0, 0, [0, 0, 0]));

    let acme = project_with_code(store, "hello").await?;
    let task = |priority: u8, delay_secs: u32| NewTask {
        priority,
        delay_secs,
        ..new_task("hello")
    };
    for new in [task(2, 0), task(2, 0), task(0, 0), task(1, 60)] {
        enqueue_one(store, &acme.id, new, at(0)).await?;
    }
    let first = lease_one(store, at(1)).await?;
    store
        .mark_running(&first.task.id, first.lease.token, at(1), at(1))
        .await?;
    let second = lease_one(store, at(1)).await?;
    assert_eq!(second.task.priority, 2);

    // The delayed task is queued but not yet due.
    assert_eq!(store.gauges(at(2)).await?, gauges(2, 1, 1, [1, 0, 0]));
    assert_eq!(store.gauges(at(60)).await?, gauges(2, 1, 1, [1, 1, 0]));

    // Finished tasks count nowhere, in every project.
    store
        .complete(
            &first.task.id,
            first.lease.token,
            &exited(0),
            &RunReport::default(),
            at(3),
        )
        .await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    enqueue_one(store, &other.id, task(2, 0), at(3)).await?;
    assert_eq!(store.gauges(at(4)).await?, gauges(3, 1, 0, [1, 0, 1]));
    Ok(())
}

/// Issue 15: `cancel_all` and a code's deletion cancel a backlog in chunks, count every task
/// they touched, and leave the gauges right.
pub async fn bulk_cancels_count_every_task_and_keep_the_gauges(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let busy = store
        .push_code(&acme.id, &image_spec("busy"), None, at(0))
        .await?;
    let later_code = store
        .push_code(&acme.id, &image_spec("later"), None, at(0))
        .await?;
    // More than a few chunks of `busy`, two of them leased.
    store
        .enqueue(&acme.id, &vec![new_task("busy"); 1201], at(1))
        .await?;
    let leased = store.lease(&lease_request("runner-1", 2), at(2)).await?;
    assert_eq!(leased.len(), 2);
    let later = NewTask {
        delay_secs: 600,
        ..new_task("later")
    };
    store.enqueue(&acme.id, &vec![later; 700], at(3)).await?;
    let gauges = |queued, preparing, depth: u64| StoreGauges {
        by_status: vec![
            (TaskStatus::Queued, queued),
            (TaskStatus::Preparing, preparing),
            (TaskStatus::Running, 0),
        ],
        queue_depth: vec![(0, depth), (1, 0), (2, 0)],
    };
    assert_eq!(store.gauges(at(4)).await?, gauges(1899, 2, 1199));

    assert_eq!(
        store.cancel_all(&acme.id, &busy.id, at(5)).await?,
        code_cancellation("busy", 1199, 2)
    );
    assert_eq!(store.gauges(at(6)).await?, gauges(700, 2, 0));
    assert_eq!(
        store.delete_code(&acme.id, &later_code.id, at(7)).await?,
        code_cancellation("later", 700, 0)
    );
    assert_eq!(store.gauges(at(700)).await?, gauges(0, 2, 0));
    Ok(())
}
