//! Clusters and the runners that serve them.
//!
//! A cluster's name may only change, and the cluster only go, while no task of it is queued or
//! running. Renaming and deleting lock the cluster's row (`FOR UPDATE`) before they count its
//! tasks, and every insertion of tasks holds the rows of the clusters it names (`FOR KEY
//! SHARE`, see `hold_for_tasks`) until it commits. So the count always sees the tasks an
//! insertion that came first committed, and an insertion that comes second waits for the
//! rename or deletion to commit: the check and the write are one step, as on SQLite, whose
//! writes are serialized anyway.

use sqlx::{PgConnection, Row};
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_model::{Timestamp, new_id};

use super::{BEGIN_SNAPSHOT, PgStore, finish, projects};
use crate::convert::{micros, timestamp, unique_violation, unsigned};
use crate::record::normalize;
use crate::rows::{cluster, select_clusters};
use crate::{Cluster, ClusterLoad, ClusterSpec, Result, RunnerSeen, RunnerStatus, StoreError};

fn taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("a cluster named {name:?} already exists"))
}

/// Tasks of the cluster named `name` that are queued or active.
async fn live_tasks(conn: &mut PgConnection, name: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE cluster = $1 \
         AND status IN ('queued', 'preparing', 'running')",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await?)
}

/// Loads a cluster and locks its row until the transaction ends.
async fn load_for_update(conn: &mut PgConnection, cluster_id: &str) -> Result<Cluster> {
    let row = sqlx::query(select_clusters!("WHERE id = $1 FOR UPDATE"))
        .bind(cluster_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("cluster {cluster_id}")))?;
    cluster(&row)
}

/// Holds the rows of the clusters that new tasks name until the inserting transaction ends,
/// so that none of them is renamed or deleted from under the tasks (see the module notes). A
/// name without a cluster (`default`, or one never created) holds nothing.
pub(super) async fn hold_for_tasks(conn: &mut PgConnection, names: &[&str]) -> Result<()> {
    let mut names: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| *name != DEFAULT_CLUSTER)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort_unstable();
    names.dedup();
    sqlx::query("SELECT 1 FROM clusters WHERE name = ANY($1) ORDER BY name FOR KEY SHARE")
        .bind(&names)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn create(
    store: &PgStore,
    project_id: Option<&str>,
    spec: &ClusterSpec,
    now: Timestamp,
) -> Result<Cluster> {
    if spec.name == DEFAULT_CLUSTER {
        return Err(taken(&spec.name));
    }
    let now = normalize(now);
    let cluster = Cluster {
        id: new_id(),
        project_id: project_id.map(str::to_owned),
        spec: spec.clone(),
        created_at: now,
        updated_at: now,
    };
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        if let Some(project_id) = project_id {
            projects::ensure(&mut tx, project_id).await?;
        }
        sqlx::query(
            "INSERT INTO clusters (id, project_id, name, memory_mib, disk_mib, runners, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(&cluster.id)
        .bind(project_id)
        .bind(&spec.name)
        .bind(spec.memory_mib.map(i64::from))
        .bind(spec.disk_mib.map(i64::from))
        .bind(spec.runners.map(i64::from))
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(|error| unique_violation(error, || taken(&spec.name).to_string()))?;
        Ok(cluster)
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn get(
    store: &PgStore,
    project_id: Option<&str>,
    cluster_id: &str,
) -> Result<Cluster> {
    let row = sqlx::query(select_clusters!(
        "WHERE id = $1 AND ($2::text IS NULL OR project_id IS NULL OR project_id = $2)"
    ))
    .bind(cluster_id)
    .bind(project_id)
    .fetch_optional(&store.pool)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("cluster {cluster_id}")))?;
    cluster(&row)
}

pub(super) async fn find_by_name(
    store: &PgStore,
    project_id: Option<&str>,
    name: &str,
) -> Result<Option<Cluster>> {
    let row = sqlx::query(select_clusters!(
        "WHERE name = $1 AND ($2::text IS NULL OR project_id IS NULL OR project_id = $2)"
    ))
    .bind(name)
    .bind(project_id)
    .fetch_optional(&store.pool)
    .await?;
    row.as_ref().map(cluster).transpose()
}

pub(super) async fn list(store: &PgStore, project_id: Option<&str>) -> Result<Vec<Cluster>> {
    let rows = sqlx::query(select_clusters!(
        "WHERE $1::text IS NULL OR project_id IS NULL OR project_id = $1 ORDER BY name"
    ))
    .bind(project_id)
    .fetch_all(&store.pool)
    .await?;
    rows.iter().map(cluster).collect()
}

pub(super) async fn update(
    store: &PgStore,
    cluster_id: &str,
    spec: &ClusterSpec,
    now: Timestamp,
) -> Result<Cluster> {
    if spec.name == DEFAULT_CLUSTER {
        return Err(taken(&spec.name));
    }
    let now = normalize(now);
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        let mut found = load_for_update(&mut tx, cluster_id).await?;
        if found.spec.name != spec.name {
            let live = live_tasks(&mut tx, &found.spec.name).await?;
            if live > 0 {
                return Err(StoreError::Conflict(format!(
                    "cluster {:?} has {live} tasks queued or running; it keeps its name until \
                     they finish",
                    found.spec.name
                )));
            }
        }
        sqlx::query(
            "UPDATE clusters SET name = $1, memory_mib = $2, disk_mib = $3, runners = $4, \
             updated_at = $5 WHERE id = $6",
        )
        .bind(&spec.name)
        .bind(spec.memory_mib.map(i64::from))
        .bind(spec.disk_mib.map(i64::from))
        .bind(spec.runners.map(i64::from))
        .bind(micros(now))
        .bind(cluster_id)
        .execute(&mut *tx)
        .await
        .map_err(|error| unique_violation(error, || taken(&spec.name).to_string()))?;
        found.spec = spec.clone();
        found.updated_at = now;
        Ok(found)
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn delete(store: &PgStore, cluster_id: &str) -> Result<()> {
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        let found = load_for_update(&mut tx, cluster_id).await?;
        let name = &found.spec.name;
        let live = live_tasks(&mut tx, name).await?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "cluster {name:?} has {live} tasks queued or running; cancel them or let them \
                 finish first"
            )));
        }
        sqlx::query("DELETE FROM clusters WHERE id = $1")
            .bind(cluster_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn record_runner(
    store: &PgStore,
    runner: &RunnerSeen,
    now: Timestamp,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO runners (id, clusters, capacity, last_seen) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO UPDATE SET clusters = excluded.clusters, \
         capacity = excluded.capacity, last_seen = excluded.last_seen",
    )
    .bind(&runner.id)
    .bind(&runner.clusters)
    .bind(i64::from(runner.capacity))
    .bind(micros(normalize(now)))
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn load(
    store: &PgStore,
    name: &str,
    project_id: Option<&str>,
    online_since: Timestamp,
    now: Timestamp,
) -> Result<ClusterLoad> {
    let mut tx = store.pool.begin_with(BEGIN_SNAPSHOT).await?;
    let result: Result<_> = async {
        let counts = sqlx::query(
            "SELECT count(*) FILTER (WHERE status = 'queued') AS queued, \
             count(*) FILTER (WHERE status IN ('preparing', 'running')) AS running \
             FROM tasks WHERE cluster = $1 AND status IN ('queued', 'preparing', 'running') \
             AND ($2::text IS NULL OR project_id = $2)",
        )
        .bind(name)
        .bind(project_id)
        .fetch_one(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT r.id, r.clusters, r.capacity, r.last_seen, l.in_use \
             FROM runners AS r CROSS JOIN LATERAL \
             (SELECT count(*) AS in_use FROM tasks AS t WHERE t.runner_id = r.id \
              AND t.status IN ('preparing', 'running') AND t.lease_expires_at > $3) AS l \
             WHERE r.clusters @> ARRAY[$1::text] AND (r.last_seen >= $2 OR l.in_use > 0) \
             ORDER BY r.id",
        )
        .bind(name)
        .bind(micros(online_since))
        .bind(micros(now))
        .fetch_all(&mut *tx)
        .await?;
        let mut runners = Vec::with_capacity(rows.len());
        for row in &rows {
            runners.push(RunnerStatus {
                id: row.try_get("id")?,
                clusters: row.try_get("clusters")?,
                capacity: unsigned("capacity", row.try_get("capacity")?)?,
                in_use: unsigned("in_use", row.try_get("in_use")?)?,
                last_seen: timestamp(row.try_get("last_seen")?)?,
            });
        }
        Ok(ClusterLoad {
            queued: unsigned("queued", counts.try_get("queued")?)?,
            running: unsigned("running", counts.try_get("running")?)?,
            runners,
        })
    }
    .await;
    finish(tx, result).await
}
