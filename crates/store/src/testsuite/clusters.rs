//! Clusters and the runners seen leasing for them.

use stevedore_model::NewTask;

use super::{
    assert_not_found, at, enqueue_one, image_spec, lease_request, new_task, project,
    project_with_code,
};
use crate::{ClusterSpec, LeaseRequest, Result, RunnerSeen, Store, StoreError};

fn cluster_spec(name: &str) -> ClusterSpec {
    ClusterSpec {
        name: name.to_owned(),
        memory_mib: Some(2048),
        disk_mib: None,
        runners: Some(2),
    }
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T>, operation: &str) {
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "{operation}: expected Conflict, got {result:?}"
    );
}

pub async fn clusters_are_owned_visible_and_unique(store: &dyn Store) -> Result<()> {
    let acme = project(store, "acme").await?;
    let other = project(store, "other").await?;
    let gpu = store
        .create_cluster(Some(&acme.id), &cluster_spec("gpu"), at(1))
        .await?;
    assert_eq!(gpu.project_id.as_deref(), Some(acme.id.as_str()));
    assert_eq!(gpu.spec, cluster_spec("gpu"));
    assert_eq!(gpu.created_at, at(1));
    let shared = store
        .create_cluster(None, &cluster_spec("big"), at(2))
        .await?;
    assert_eq!(shared.project_id, None);

    // Names are unique within a project and among shared clusters, and no project takes a
    // shared one's; `default` is built in.
    assert_conflict(
        store
            .create_cluster(Some(&acme.id), &cluster_spec("gpu"), at(3))
            .await,
        "a taken name",
    );
    assert_conflict(
        store
            .create_cluster(Some(&other.id), &cluster_spec("big"), at(3))
            .await,
        "a shared name",
    );
    assert_conflict(
        store
            .create_cluster(Some(&other.id), &cluster_spec("default"), at(3))
            .await,
        "the default name",
    );
    assert_not_found(
        store
            .create_cluster(Some("no-such-project"), &cluster_spec("x"), at(3))
            .await,
        "no-such-project",
    );

    // A project sees its own and the shared ones; nobody else's.
    assert_eq!(store.get_cluster(Some(&acme.id), &gpu.id).await?, gpu);
    assert_eq!(store.get_cluster(None, &gpu.id).await?, gpu);
    assert_not_found(store.get_cluster(Some(&other.id), &gpu.id).await, &gpu.id);
    assert_eq!(
        store.get_cluster(Some(&other.id), &shared.id).await?,
        shared
    );
    let names = |clusters: Vec<crate::Cluster>| -> Vec<String> {
        clusters
            .into_iter()
            .map(|cluster| cluster.spec.name)
            .collect()
    };
    assert_eq!(
        names(store.list_clusters(Some(&acme.id)).await?),
        ["big", "gpu"]
    );
    assert_eq!(names(store.list_clusters(Some(&other.id)).await?), ["big"]);
    assert_eq!(names(store.list_clusters(None).await?), ["big", "gpu"]);
    assert_eq!(
        store.find_cluster_by_name(Some(&acme.id), "gpu").await?,
        Some(gpu.clone())
    );
    assert_eq!(
        store.find_cluster_by_name(Some(&other.id), "gpu").await?,
        None
    );
    assert_eq!(store.find_cluster_by_name(None, "nope").await?, None);

    // Update and delete.
    let spec = ClusterSpec {
        memory_mib: Some(4096),
        ..cluster_spec("gpu-2")
    };
    let updated = store.update_cluster(&gpu.id, &spec, at(5)).await?;
    assert_eq!(updated.spec, spec);
    assert_eq!(updated.created_at, at(1));
    assert_eq!(updated.updated_at, at(5));
    assert_eq!(store.get_cluster(None, &gpu.id).await?, updated);
    assert_conflict(
        store
            .update_cluster(&gpu.id, &cluster_spec("big"), at(6))
            .await,
        "renaming onto a taken name",
    );
    store.delete_cluster(&gpu.id).await?;
    assert_not_found(store.get_cluster(None, &gpu.id).await, &gpu.id);
    assert_not_found(store.delete_cluster(&gpu.id).await, &gpu.id);
    assert_not_found(store.update_cluster(&gpu.id, &spec, at(7)).await, &gpu.id);
    Ok(())
}

pub async fn clusters_keep_their_name_while_tasks_use_it(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let gpu = store
        .create_cluster(Some(&acme.id), &cluster_spec("gpu"), at(1))
        .await?;
    let task = NewTask {
        cluster: "gpu".to_owned(),
        ..new_task("hello")
    };
    let id = enqueue_one(store, &acme.id, task, at(2)).await?;
    assert_conflict(
        store.delete_cluster(&gpu.id).await,
        "delete with a queued task",
    );
    assert_conflict(
        store
            .update_cluster(&gpu.id, &cluster_spec("gpu-2"), at(3))
            .await,
        "rename with a queued task",
    );
    // Changing the other fields is fine.
    let spec = ClusterSpec {
        runners: Some(9),
        ..cluster_spec("gpu")
    };
    assert_eq!(
        store.update_cluster(&gpu.id, &spec, at(3)).await?.spec,
        spec
    );
    store.cancel_task(&acme.id, &id, at(4)).await?;
    store.delete_cluster(&gpu.id).await?;
    Ok(())
}

pub async fn cluster_load_counts_tasks_and_online_runners(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let in_cluster = |cluster: &str| NewTask {
        cluster: cluster.to_owned(),
        ..new_task("hello")
    };
    for cluster in ["gpu", "gpu", "gpu", "default"] {
        enqueue_one(store, &acme.id, in_cluster(cluster), at(1)).await?;
    }
    let runner = |id: &str, clusters: &[&str], capacity| RunnerSeen {
        id: id.to_owned(),
        clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
        capacity,
        owner: None,
    };
    store
        .record_runner(&runner("r-gpu", &["gpu", "default"], 4), at(2))
        .await?;
    store
        .record_runner(&runner("r-old", &["gpu"], 8), at(0))
        .await?;
    store
        .record_runner(&runner("r-other", &["arm"], 2), at(2))
        .await?;
    let leased = store
        .lease(
            &LeaseRequest {
                clusters: vec!["gpu".to_owned()],
                ..lease_request("r-gpu", 2)
            },
            at(2),
        )
        .await?;
    assert_eq!(leased.len(), 2);

    let load = store.cluster_load("gpu", None, None, at(1), at(3)).await?;
    assert_eq!((load.queued, load.running), (1, 2));
    assert_eq!(load.runners.len(), 1, "{load:?}");
    let seen = &load.runners[0];
    assert_eq!(seen.id, "r-gpu");
    assert_eq!(seen.clusters, ["gpu", "default"]);
    assert_eq!((seen.capacity, seen.in_use), (4, 2));
    assert_eq!(seen.last_seen, at(2));

    // Seen again: the record is replaced.
    store
        .record_runner(&runner("r-gpu", &["gpu"], 6), at(10))
        .await?;
    // Long unseen, but a live lease keeps a runner online.
    let load = store
        .cluster_load("gpu", None, None, at(100), at(11))
        .await?;
    assert_eq!(load.runners.len(), 1);
    assert_eq!(load.runners[0].capacity, 6);
    assert_eq!(load.runners[0].last_seen, at(10));
    // Past the lease it is gone.
    let load = store
        .cluster_load("gpu", None, None, at(100), at(1000))
        .await?;
    assert!(load.runners.is_empty(), "{load:?}");

    // Counts can be limited to one project.
    let other = project(store, "other").await?;
    let load = store
        .cluster_load("gpu", None, Some(&other.id), at(0), at(3))
        .await?;
    assert_eq!((load.queued, load.running), (0, 0));
    let load = store
        .cluster_load("default", None, Some(&acme.id), at(0), at(3))
        .await?;
    assert_eq!((load.queued, load.running), (1, 0));
    Ok(())
}

/// Scoped names: a project's cluster and a shared one may share a name; the project's tasks
/// of that name are its own cluster's, leased only by its own runners, and the operator's
/// runners of the shared cluster never see them.
pub async fn gone_runners_are_known_unseen_and_hold_no_live_lease(store: &dyn Store) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    enqueue_one(store, &acme.id, new_task("hello"), at(0)).await?;
    let seen = |id: &str, owner: Option<&str>| RunnerSeen {
        id: id.to_owned(),
        clusters: vec!["default".to_owned()],
        capacity: 2,
        owner: owner.map(str::to_owned),
    };
    for id in ["r-busy", "r-idle", "r-fresh"] {
        store.record_runner(&seen(id, None), at(0)).await?;
    }
    store
        .record_runner(&seen("r-project", Some(&acme.id)), at(0))
        .await?;
    store.record_runner(&seen("r-fresh", None), at(50)).await?;
    // r-busy holds the one task under a 60 s lease (until at(61)).
    let leased = store.lease(&lease_request("r-busy", 1), at(1)).await?;
    assert_eq!(leased.len(), 1);
    let asked: Vec<String> = ["r-busy", "r-idle", "r-fresh", "r-project", "r-stranger"]
        .iter()
        .map(|id| (*id).to_owned())
        .collect();

    // Unseen since at(0), but r-busy's lease is live; r-fresh was seen at(50); r-stranger
    // was never seen here; r-project belongs to a project, not to the shared clusters.
    let gone = store.gone_runners(&asked, None, at(40), at(55)).await?;
    assert_eq!(gone, ["r-idle"]);
    // Once the lease has expired, its holder is gone too.
    let gone = store.gone_runners(&asked, None, at(40), at(62)).await?;
    assert_eq!(gone, ["r-busy", "r-idle"]);
    // A project's runners are answered for that project only.
    let gone = store
        .gone_runners(&asked, Some(&acme.id), at(40), at(62))
        .await?;
    assert_eq!(gone, ["r-project"]);
    // A heartbeat keeps the lease, and so the runner, alive.
    let task = &leased[0];
    store
        .heartbeat(&task.task.id, task.lease.token, 60, at(60))
        .await?;
    let gone = store.gone_runners(&asked, None, at(40), at(62)).await?;
    assert_eq!(gone, ["r-idle"]);
    assert!(
        store
            .gone_runners(&[], None, at(40), at(62))
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn cluster_names_are_scoped_and_leases_follow_their_owner(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let other = project(store, "other").await?;
    store
        .push_code(&other.id, &image_spec("hello"), None, at(0))
        .await?;
    let acme_gpu = store
        .create_cluster(Some(&acme.id), &cluster_spec("gpu"), at(1))
        .await?;
    let other_gpu = store
        .create_cluster(Some(&other.id), &cluster_spec("gpu"), at(1))
        .await?;
    let shared_gpu = store
        .create_cluster(None, &cluster_spec("gpu"), at(1))
        .await?;
    assert_ne!(acme_gpu.id, other_gpu.id);
    assert_eq!(
        store.find_cluster_by_name(Some(&acme.id), "gpu").await?,
        Some(acme_gpu.clone())
    );
    assert_eq!(
        store.find_cluster_by_name(None, "gpu").await?,
        Some(shared_gpu.clone())
    );

    let in_gpu = NewTask {
        cluster: "gpu".to_owned(),
        ..new_task("hello")
    };
    let acme_task = enqueue_one(store, &acme.id, in_gpu.clone(), at(2)).await?;
    let other_task = enqueue_one(store, &other.id, in_gpu.clone(), at(2)).await?;
    let third = project(store, "third").await?;
    store
        .push_code(&third.id, &image_spec("hello"), None, at(0))
        .await?;
    let shared_task = enqueue_one(store, &third.id, in_gpu, at(2)).await?;

    let gpu_runner = |owner: Option<&str>| LeaseRequest {
        clusters: vec!["gpu".to_owned()],
        owner: owner.map(str::to_owned),
        ..lease_request("gpu-runner", 10)
    };
    // The operator's runner gets only the task of the project without a `gpu` of its own.
    let operators = store.lease(&gpu_runner(None), at(3)).await?;
    let ids: Vec<&str> = operators.iter().map(|l| l.task.id.as_str()).collect();
    assert_eq!(ids, [shared_task.as_str()]);
    // Each project's runner gets its own task, never the other's.
    let acmes = store.lease(&gpu_runner(Some(&acme.id)), at(3)).await?;
    let ids: Vec<&str> = acmes.iter().map(|l| l.task.id.as_str()).collect();
    assert_eq!(ids, [acme_task.as_str()]);
    let others = store.lease(&gpu_runner(Some(&other.id)), at(3)).await?;
    let ids: Vec<&str> = others.iter().map(|l| l.task.id.as_str()).collect();
    assert_eq!(ids, [other_task.as_str()]);

    // Each cluster's load counts its own tasks and runners.
    for (runner, owner) in [("acme-box", Some(&acme.id)), ("ops-box", None)] {
        store
            .record_runner(
                &RunnerSeen {
                    id: runner.to_owned(),
                    clusters: vec!["gpu".to_owned()],
                    capacity: 1,
                    owner: owner.cloned(),
                },
                at(3),
            )
            .await?;
    }
    let load = store
        .cluster_load("gpu", Some(&acme.id), Some(&acme.id), at(0), at(4))
        .await?;
    assert_eq!((load.queued, load.running), (0, 1));
    let runners: Vec<&str> = load.runners.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(runners, ["acme-box"]);
    let load = store.cluster_load("gpu", None, None, at(0), at(4)).await?;
    assert_eq!((load.queued, load.running), (0, 1));
    let runners: Vec<&str> = load.runners.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(runners, ["ops-box"]);
    Ok(())
}

/// A cluster named by a schedule that still fires keeps its name and stays; a schedule whose
/// cluster is gone anyway (older stores allowed it) fires nothing rather than queue a task
/// whoever took the name since would get.
pub async fn clusters_named_by_schedules_stay_and_fires_check_them(
    store: &dyn Store,
) -> Result<()> {
    let acme = project_with_code(store, "hello").await?;
    let gpu = store
        .create_cluster(Some(&acme.id), &cluster_spec("gpu"), at(1))
        .await?;
    let mut spec = super::schedule_spec("hello", 10);
    spec.cluster = "gpu".to_owned();
    let schedule = store
        .create_schedules(&acme.id, &[(spec.clone(), Some(at(10)))], at(2))
        .await?
        .remove(0);
    assert_conflict(
        store.delete_cluster(&gpu.id).await,
        "delete with a schedule",
    );
    assert_conflict(
        store
            .update_cluster(&gpu.id, &cluster_spec("gpu-2"), at(3))
            .await,
        "rename with a schedule",
    );
    store.cancel_schedule(&acme.id, &schedule.id, at(4)).await?;
    store.delete_cluster(&gpu.id).await?;

    // A schedule naming a cluster that does not exist: its fire passes, queueing nothing.
    spec.cluster = "gone".to_owned();
    let orphan = store
        .create_schedules(&acme.id, &[(spec, Some(at(10)))], at(5))
        .await?
        .remove(0);
    let fired = store
        .fire_schedule(&orphan.id, at(10), Some(at(20)), at(10))
        .await?;
    assert_eq!(fired, None);
    let after = store.get_schedule(&acme.id, &orphan.id).await?;
    assert_eq!(after.run_count, 0);
    assert_eq!(after.next_start, Some(at(20)));
    Ok(())
}
