//! Clusters and the runners seen leasing for them.

use stevedore_model::NewTask;

use super::{
    assert_not_found, at, enqueue_one, lease_request, new_task, project, project_with_code,
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

    // Names are unique across projects; `default` is built in.
    assert_conflict(
        store
            .create_cluster(Some(&other.id), &cluster_spec("gpu"), at(3))
            .await,
        "a taken name",
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

    let load = store.cluster_load("gpu", None, at(1), at(3)).await?;
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
    let load = store.cluster_load("gpu", None, at(100), at(11)).await?;
    assert_eq!(load.runners.len(), 1);
    assert_eq!(load.runners[0].capacity, 6);
    assert_eq!(load.runners[0].last_seen, at(10));
    // Past the lease it is gone.
    let load = store.cluster_load("gpu", None, at(100), at(1000)).await?;
    assert!(load.runners.is_empty(), "{load:?}");

    // Counts can be limited to one project.
    let other = project(store, "other").await?;
    let load = store
        .cluster_load("gpu", Some(&other.id), at(0), at(3))
        .await?;
    assert_eq!((load.queued, load.running), (0, 0));
    let load = store
        .cluster_load("default", Some(&acme.id), at(0), at(3))
        .await?;
    assert_eq!((load.queued, load.running), (1, 0));
    Ok(())
}
