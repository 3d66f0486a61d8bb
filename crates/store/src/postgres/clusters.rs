//! Clusters and the runners that serve them.
//!
//! A cluster's name may only change, and the cluster only go, while no task of it is queued or
//! running and no schedule still firing names it. Renaming and deleting lock the cluster's row (`FOR UPDATE`) before they count its
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
use crate::record::Users;
use crate::record::normalize;
use crate::rows::{cluster, select_clusters};
use crate::{Cluster, ClusterLoad, ClusterSpec, Result, RunnerSeen, RunnerStatus, StoreError};

fn taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("a cluster named {name:?} already exists"))
}

fn shared_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!(
        "{name:?} is the name of a shared cluster: a project's cluster may not take it; choose another name"
    ))
}

/// Whether a shared cluster is named `name` (a project's cluster may not take the name). The
/// shared row, if any, is held until the transaction ends, so it cannot be renamed meanwhile.
async fn shared_exists(conn: &mut PgConnection, name: &str) -> Result<bool> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM clusters WHERE name = $1 AND project_id IS NULL FOR KEY SHARE",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

/// Tasks queued or active, and schedules still firing, of the cluster named `name` owned by
/// `owner` (`None`: the shared one, which serves the tasks of every project that has no
/// cluster of its own by that name). What keeps a cluster's name and the cluster itself.
async fn users(conn: &mut PgConnection, name: &str, owner: Option<&str>) -> Result<Users> {
    let tasks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks AS t WHERE t.cluster = $1 \
         AND t.status IN ('queued', 'preparing', 'running') \
         AND (CASE WHEN $2::text IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
              WHERE k.project_id = t.project_id AND k.name = t.cluster) \
              ELSE t.project_id = $2 END)",
    )
    .bind(name)
    .bind(owner)
    .fetch_one(&mut *conn)
    .await?;
    let schedules: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM schedules AS s WHERE s.status = 'scheduled' \
         AND s.spec::jsonb ->> 'cluster' = $1 \
         AND (CASE WHEN $2::text IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
              WHERE k.project_id = s.project_id AND k.name = $1) \
              ELSE s.project_id = $2 END)",
    )
    .bind(name)
    .bind(owner)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Users { tasks, schedules })
}

/// Whether `project_id` may queue tasks in the cluster named `name`: `default`, one of its
/// own, or a shared one.
pub(super) async fn usable(conn: &mut PgConnection, project_id: &str, name: &str) -> Result<bool> {
    if name == DEFAULT_CLUSTER {
        return Ok(true);
    }
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM clusters WHERE name = $1 AND (project_id IS NULL OR project_id = $2) \
         LIMIT 1",
    )
    .bind(name)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
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
            if shared_exists(&mut tx, &spec.name).await? {
                return Err(shared_taken(&spec.name));
            }
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
    // A project's own cluster comes before the shared one of the same name; an admin (no
    // project) finds the shared one first.
    let row = sqlx::query(select_clusters!(
        "WHERE name = $1 AND ($2::text IS NULL OR project_id IS NULL OR project_id = $2) \
         ORDER BY (project_id IS NULL) = ($2::text IS NOT NULL) LIMIT 1"
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
            users(&mut tx, &found.spec.name, found.project_id.as_deref())
                .await?
                .check(&found.spec.name, "it keeps its name until")?;
            if found.project_id.is_some() && shared_exists(&mut tx, &spec.name).await? {
                return Err(shared_taken(&spec.name));
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
        users(&mut tx, &found.spec.name, found.project_id.as_deref())
            .await?
            .check(&found.spec.name, "it stays until")?;
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
        "INSERT INTO runners (id, clusters, capacity, last_seen, owner) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO UPDATE SET clusters = excluded.clusters, \
         capacity = excluded.capacity, last_seen = excluded.last_seen, owner = excluded.owner",
    )
    .bind(&runner.id)
    .bind(&runner.clusters)
    .bind(i64::from(runner.capacity))
    .bind(micros(normalize(now)))
    .bind(runner.owner.as_deref())
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn load(
    store: &PgStore,
    name: &str,
    owner: Option<&str>,
    project_id: Option<&str>,
    online_since: Timestamp,
    now: Timestamp,
) -> Result<ClusterLoad> {
    let mut tx = store.pool.begin_with(BEGIN_SNAPSHOT).await?;
    let result: Result<_> = async {
        let counts = sqlx::query(
            "SELECT count(*) FILTER (WHERE status = 'queued') AS queued, \
             count(*) FILTER (WHERE status IN ('preparing', 'running')) AS running \
             FROM tasks AS t WHERE t.cluster = $1 \
             AND t.status IN ('queued', 'preparing', 'running') \
             AND ($2::text IS NULL OR t.project_id = $2) \
             AND (CASE WHEN $3::text IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
                  WHERE k.project_id = t.project_id AND k.name = t.cluster) \
                  ELSE t.project_id = $3 END)",
        )
        .bind(name)
        .bind(project_id)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT r.id, r.clusters, r.capacity, r.last_seen, l.in_use \
             FROM runners AS r CROSS JOIN LATERAL \
             (SELECT count(*) AS in_use FROM tasks AS t WHERE t.runner_id = r.id \
              AND t.status IN ('preparing', 'running') AND t.lease_expires_at > $3) AS l \
             WHERE r.clusters @> ARRAY[$1::text] AND r.owner IS NOT DISTINCT FROM $4 \
             AND (r.last_seen >= $2 OR l.in_use > 0) ORDER BY r.id",
        )
        .bind(name)
        .bind(micros(online_since))
        .bind(micros(now))
        .bind(owner)
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

pub(super) async fn gone_runners(
    store: &PgStore,
    runner_ids: &[String],
    owner: Option<&str>,
    seen_before: Timestamp,
    now: Timestamp,
) -> Result<Vec<String>> {
    if runner_ids.is_empty() {
        return Ok(Vec::new());
    }
    let gone = sqlx::query_scalar(
        "SELECT r.id FROM runners AS r \
         WHERE r.id = ANY($1) AND r.owner IS NOT DISTINCT FROM $2 AND r.last_seen < $3 \
         AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.runner_id = r.id \
              AND t.status IN ('preparing', 'running') AND t.lease_expires_at > $4) \
         ORDER BY r.id",
    )
    .bind(runner_ids)
    .bind(owner)
    .bind(micros(normalize(seen_before)))
    .bind(micros(normalize(now)))
    .fetch_all(&store.pool)
    .await?;
    Ok(gone)
}
