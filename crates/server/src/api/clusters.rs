//! Clusters: `/2/clusters`, as IronWorker had them. A cluster is a named pool of runners; a
//! task queued with `cluster: NAME` runs only on runners started with `--cluster NAME`.
//!
//! A cluster belongs to the project whose token created it, or is shared when an admin token
//! created it; `default` is built in, shared, and cannot be changed. Names are unique across
//! the server, so a runner serving a project's cluster only ever gets that project's tasks.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use stevedore_api_types::v2;
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_model::validation::check_name;
use stevedore_store::{Cluster, ClusterSpec, NewToken, TokenRole};

use super::message;
use crate::AppState;
use crate::auth::{TenantAccess, new_token_secret, token_digest};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::wire::format_time;

fn default_info() -> v2::ClusterInfo {
    v2::ClusterInfo {
        id: DEFAULT_CLUSTER.to_owned(),
        name: DEFAULT_CLUSTER.to_owned(),
        project_id: None,
        shared: true,
        memory: None,
        disk: None,
        disk_space: None,
        runners: None,
        created_at: None,
        updated_at: None,
    }
}

fn info(cluster: Cluster) -> v2::ClusterInfo {
    v2::ClusterInfo {
        id: cluster.id,
        name: cluster.spec.name,
        shared: cluster.project_id.is_none(),
        project_id: cluster.project_id,
        memory: cluster.spec.memory_mib,
        disk: cluster.spec.disk_mib,
        disk_space: cluster.spec.disk_mib,
        runners: cluster.spec.runners,
        created_at: Some(format_time(cluster.created_at)),
        updated_at: Some(format_time(cluster.updated_at)),
    }
}

fn size(field: &str, value: Option<i64>) -> ApiResult<Option<u32>> {
    value
        .map(|value| {
            u32::try_from(value).map_err(|_| {
                ApiError::BadRequest(format!(
                    "{field}: must be between 0 and {}, got {value}",
                    u32::MAX
                ))
            })
        })
        .transpose()
}

/// The spec a request asks for, on top of `current` (an update changes what it names).
fn spec(request: v2::ClusterCreate, current: Option<&ClusterSpec>) -> ApiResult<ClusterSpec> {
    let name = match (request.name.or(request.cluster), current) {
        (Some(name), _) => name,
        (None, Some(current)) => current.name.clone(),
        (None, None) => {
            return Err(ApiError::BadRequest(
                "name: a cluster needs a name (`name`, or IronWorker's `cluster`)".into(),
            ));
        }
    };
    check_name("name", &name)?;
    if request.cpu_share.is_some() {
        return Err(ApiError::BadRequest(
            "cpu_share: a cluster has no CPU share here; each task's CPU comes from its code's `cpus`".into(),
        ));
    }
    if name == DEFAULT_CLUSTER {
        return Err(ApiError::BadRequest(format!(
            "name: {DEFAULT_CLUSTER:?} is the built-in cluster; choose another name"
        )));
    }
    let keep =
        |new: Option<u32>, old: fn(&ClusterSpec) -> Option<u32>| new.or(current.and_then(old));
    Ok(ClusterSpec {
        name,
        memory_mib: keep(size("memory", request.memory)?, |spec| spec.memory_mib),
        disk_mib: keep(size("disk", request.disk)?, |spec| spec.disk_mib),
        runners: keep(size("runners", request.runners)?, |spec| spec.runners),
    })
}

fn refuse_default(cluster_id: &str) -> ApiResult<()> {
    if cluster_id == DEFAULT_CLUSTER {
        return Err(ApiError::Conflict(format!(
            "{DEFAULT_CLUSTER:?} is the built-in cluster; it cannot be changed or deleted"
        )));
    }
    Ok(())
}

/// A cluster the caller may change: its project's own, or any for an admin.
async fn owned(state: &AppState, access: &TenantAccess, cluster_id: &str) -> ApiResult<Cluster> {
    refuse_default(cluster_id)?;
    let cluster = state
        .store
        .get_cluster(access.project_id.as_deref(), cluster_id)
        .await?;
    if access.project_id.is_some() && cluster.project_id.is_none() {
        return Err(ApiError::Forbidden(format!(
            "cluster {cluster_id} is shared; only an admin token may change it"
        )));
    }
    Ok(cluster)
}

/// `GET /2/clusters`: `default` and the clusters the caller may use.
#[utoipa::path(get, path = "/2/clusters", tag = "clusters",
    responses((status = 200, body = v2::ClusterList), (status = 401, body = v2::Message),
        (status = 403, body = v2::Message)))]
pub async fn list(
    State(state): State<AppState>,
    access: TenantAccess,
) -> ApiResult<Json<v2::ClusterList>> {
    let clusters = visible_clusters(&state, access.project_id.as_deref()).await?;
    Ok(Json(v2::ClusterList { clusters }))
}

/// `default` and the clusters `project_id` may use (every cluster for `None`, an admin).
pub async fn visible_clusters(
    state: &AppState,
    project_id: Option<&str>,
) -> ApiResult<Vec<v2::ClusterInfo>> {
    let stored = state.store.list_clusters(project_id).await?;
    Ok(std::iter::once(default_info())
        .chain(stored.into_iter().map(info))
        .collect())
}

/// `GET /2/clusters/{cluster_id}`: `{"cluster": {...}}`.
#[utoipa::path(get, path = "/2/clusters/{cluster_id}", tag = "clusters",
    params(("cluster_id" = String, Path)),
    responses((status = 200, body = v2::ClusterGet), (status = 404, body = v2::Message)))]
pub async fn show(
    State(state): State<AppState>,
    access: TenantAccess,
    Path(cluster_id): Path<String>,
) -> ApiResult<Json<v2::ClusterGet>> {
    let cluster = if cluster_id == DEFAULT_CLUSTER {
        default_info()
    } else {
        info(
            state
                .store
                .get_cluster(access.project_id.as_deref(), &cluster_id)
                .await?,
        )
    };
    Ok(Json(v2::ClusterGet { cluster }))
}

/// `POST /2/clusters`: a project token creates its project's cluster, an admin token a shared
/// one.
#[utoipa::path(post, path = "/2/clusters", tag = "clusters",
    request_body = v2::ClusterCreate,
    responses((status = 200, body = v2::ClusterSaved), (status = 400, body = v2::Message),
        (status = 409, body = v2::Message)))]
pub async fn create(
    State(state): State<AppState>,
    access: TenantAccess,
    ApiJson(request): ApiJson<v2::ClusterCreate>,
) -> ApiResult<Json<v2::ClusterSaved>> {
    let spec = spec(request, None)?;
    let cluster = state
        .store
        .create_cluster(access.project_id.as_deref(), &spec, state.clock.now())
        .await?;
    Ok(Json(v2::ClusterSaved {
        id: cluster.id.clone(),
        msg: "Cluster created".to_owned(),
        cluster: info(cluster),
    }))
}

/// `PUT /2/clusters/{cluster_id}`: changes the fields the body names.
#[utoipa::path(put, path = "/2/clusters/{cluster_id}", tag = "clusters",
    params(("cluster_id" = String, Path)),
    request_body = v2::ClusterCreate,
    responses((status = 200, body = v2::ClusterSaved), (status = 400, body = v2::Message),
        (status = 403, body = v2::Message), (status = 404, body = v2::Message),
        (status = 409, body = v2::Message)))]
pub async fn update(
    State(state): State<AppState>,
    access: TenantAccess,
    Path(cluster_id): Path<String>,
    ApiJson(request): ApiJson<v2::ClusterCreate>,
) -> ApiResult<Json<v2::ClusterSaved>> {
    let current = owned(&state, &access, &cluster_id).await?;
    let spec = spec(request, Some(&current.spec))?;
    let cluster = state
        .store
        .update_cluster(&cluster_id, &spec, state.clock.now())
        .await?;
    Ok(Json(v2::ClusterSaved {
        id: cluster.id.clone(),
        msg: "Cluster updated".to_owned(),
        cluster: info(cluster),
    }))
}

/// `DELETE /2/clusters/{cluster_id}`: refused while tasks of it are queued or running.
#[utoipa::path(delete, path = "/2/clusters/{cluster_id}", tag = "clusters",
    params(("cluster_id" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 403, body = v2::Message),
        (status = 404, body = v2::Message), (status = 409, body = v2::Message)))]
pub async fn delete(
    State(state): State<AppState>,
    access: TenantAccess,
    Path(cluster_id): Path<String>,
) -> ApiResult<Json<v2::Message>> {
    owned(&state, &access, &cluster_id).await?;
    state.store.delete_cluster(&cluster_id).await?;
    Ok(message("Cluster deleted"))
}

/// `POST /2/clusters/{cluster_id}/runner_tokens`: a runner token that serves this cluster
/// alone, for a runner of the caller's own (a project's cluster: only that project's tasks). A
/// project mints them for its own clusters, an admin for any.
#[utoipa::path(post, path = "/2/clusters/{cluster_id}/runner_tokens", tag = "clusters",
    params(("cluster_id" = String, Path)),
    responses((status = 200, body = v2::ClusterRunnerToken), (status = 403, body = v2::Message),
        (status = 404, body = v2::Message), (status = 409, body = v2::Message)))]
pub async fn runner_token(
    State(state): State<AppState>,
    access: TenantAccess,
    Path(cluster_id): Path<String>,
) -> ApiResult<Json<v2::ClusterRunnerToken>> {
    let cluster = owned(&state, &access, &cluster_id).await?;
    let secret = new_token_secret();
    state
        .store
        .create_token(
            &NewToken {
                project_id: cluster.project_id.clone(),
                role: TokenRole::Runner,
                clusters: Some(vec![cluster.spec.name.clone()]),
            },
            &token_digest(&secret),
            state.clock.now(),
        )
        .await?;
    Ok(Json(v2::ClusterRunnerToken {
        msg: format!(
            "Runner token created: `stevedore runner --token <token> --cluster {}` serves this cluster alone",
            cluster.spec.name
        ),
        token: secret,
        cluster: cluster.spec.name,
        project_id: cluster.project_id,
    }))
}

/// `GET /2/clusters/{cluster_id}/stats`: runners online with their capacity and load, and the
/// cluster's tasks waiting and running (a project sees only its own tasks counted).
#[utoipa::path(get, path = "/2/clusters/{cluster_id}/stats", tag = "clusters",
    params(("cluster_id" = String, Path)),
    responses((status = 200, body = v2::ClusterStats), (status = 404, body = v2::Message)))]
pub async fn stats(
    State(state): State<AppState>,
    access: TenantAccess,
    Path(cluster_id): Path<String>,
) -> ApiResult<Json<v2::ClusterStats>> {
    Ok(Json(
        cluster_stats(&state, access.project_id.as_deref(), &cluster_id).await?,
    ))
}

/// A cluster's runners online with their capacity and load, and its tasks waiting and running
/// (only `project_id`'s counted when given).
pub async fn cluster_stats(
    state: &AppState,
    project_id: Option<&str>,
    cluster_id: &str,
) -> ApiResult<v2::ClusterStats> {
    let (name, owner) = if cluster_id == DEFAULT_CLUSTER {
        (DEFAULT_CLUSTER.to_owned(), None)
    } else {
        let cluster = state.store.get_cluster(project_id, cluster_id).await?;
        (cluster.spec.name, cluster.project_id)
    };
    let now = state.clock.now();
    let online_since = state.config.runner_api.online_since(now);
    let load = state
        .store
        .cluster_load(&name, owner.as_deref(), project_id, online_since, now)
        .await?;
    let (capacity, in_use) = (load.capacity(), load.in_use());
    let runners: Vec<v2::ClusterRunner> = load
        .runners
        .into_iter()
        .map(|runner| v2::ClusterRunner {
            id: runner.id,
            clusters: runner.clusters,
            capacity: runner.capacity,
            in_use: runner.in_use,
            last_seen: format_time(runner.last_seen),
        })
        .collect();
    Ok(v2::ClusterStats {
        id: cluster_id.to_owned(),
        name,
        runners_online: u64::try_from(runners.len()).unwrap_or(u64::MAX),
        capacity,
        in_use,
        queued: load.queued,
        running: load.running,
        runners,
    })
}

/// Refuses clusters the project may not queue onto: anything but `default`, the project's own
/// clusters and the shared ones. The error names the field as `cluster`.
pub async fn check_task_clusters<'a>(
    state: &AppState,
    project_id: &str,
    clusters: impl IntoIterator<Item = &'a str>,
) -> ApiResult<()> {
    let wanted: BTreeSet<&str> = clusters
        .into_iter()
        .filter(|name| *name != DEFAULT_CLUSTER)
        .collect();
    for name in wanted {
        if state
            .store
            .find_cluster_by_name(Some(project_id), name)
            .await?
            .is_none()
        {
            return Err(ApiError::BadRequest(format!(
                "cluster: there is no cluster named {name:?} for this project; create it with \
                 POST /2/clusters, or leave cluster out to use {DEFAULT_CLUSTER:?}"
            )));
        }
    }
    Ok(())
}
