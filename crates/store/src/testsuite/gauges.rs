//! The task counts behind the metrics gauges.

use stevedore_model::{NewTask, TaskStatus};

use super::{at, enqueue_one, exited, image_spec, lease_one, new_task, project, project_with_code};
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
