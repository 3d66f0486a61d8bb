//! Clusters and the runners that serve them.

use sqlx::{Connection, Row, SqliteConnection};
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_model::{Timestamp, new_id};

use super::rows::{micros, timestamp, to_json, unsigned};
use super::{BEGIN_WRITE, SqliteStore};
use crate::convert::unique_violation;
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

/// Whether a shared cluster is named `name` (a project's cluster may not take the name).
async fn shared_exists(conn: &mut SqliteConnection, name: &str) -> Result<bool> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM clusters WHERE name = ?1 AND project_id IS NULL")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(found.is_some())
}

/// Tasks queued or active, and schedules still firing, of the cluster named `name` owned by
/// `owner` (`None`: the shared one, which serves the tasks of every project that has no
/// cluster of its own by that name). What keeps a cluster's name and the cluster itself.
async fn users(conn: &mut SqliteConnection, name: &str, owner: Option<&str>) -> Result<Users> {
    let tasks: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM tasks AS t WHERE t.cluster = ?1 \
         AND t.status IN ('queued', 'preparing', 'running') \
         AND (CASE WHEN ?2 IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
              WHERE k.project_id = t.project_id AND k.name = t.cluster) \
              ELSE t.project_id = ?2 END)",
    )
    .bind(name)
    .bind(owner)
    .fetch_one(&mut *conn)
    .await?;
    let schedules: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM schedules AS s WHERE s.status = 'scheduled' \
         AND json_extract(s.spec, '$.cluster') = ?1 \
         AND (CASE WHEN ?2 IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
              WHERE k.project_id = s.project_id AND k.name = ?1) \
              ELSE s.project_id = ?2 END)",
    )
    .bind(name)
    .bind(owner)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Users { tasks, schedules })
}

/// Whether `project_id` may queue tasks in the cluster named `name`: `default`, one of its
/// own, or a shared one.
pub(super) async fn usable(
    conn: &mut SqliteConnection,
    project_id: &str,
    name: &str,
) -> Result<bool> {
    if name == DEFAULT_CLUSTER {
        return Ok(true);
    }
    let found: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM clusters WHERE name = ?1 AND (project_id IS NULL OR project_id = ?2) \
         LIMIT 1",
    )
    .bind(name)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

pub(super) async fn create(
    store: &SqliteStore,
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
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    if let Some(project_id) = project_id {
        super::projects::ensure(&mut tx, project_id).await?;
        if shared_exists(&mut tx, &spec.name).await? {
            return Err(shared_taken(&spec.name));
        }
    }
    sqlx::query(
        "INSERT INTO clusters (id, project_id, name, memory_mib, disk_mib, runners, created_at, \
         updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
    )
    .bind(&cluster.id)
    .bind(project_id)
    .bind(&spec.name)
    .bind(spec.memory_mib)
    .bind(spec.disk_mib)
    .bind(spec.runners)
    .bind(micros(now))
    .execute(&mut *tx)
    .await
    .map_err(|error| unique_violation(error, || taken(&spec.name).to_string()))?;
    tx.commit().await?;
    Ok(cluster)
}

pub(super) async fn get(
    store: &SqliteStore,
    project_id: Option<&str>,
    cluster_id: &str,
) -> Result<Cluster> {
    let row = sqlx::query(select_clusters!(
        "WHERE id = ?1 \
         AND (?2 IS NULL OR project_id IS NULL OR project_id = ?2)"
    ))
    .bind(cluster_id)
    .bind(project_id)
    .fetch_optional(&store.readers)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("cluster {cluster_id}")))?;
    cluster(&row)
}

pub(super) async fn find_by_name(
    store: &SqliteStore,
    project_id: Option<&str>,
    name: &str,
) -> Result<Option<Cluster>> {
    // A project's own cluster comes before the shared one of the same name; an admin (no
    // project) finds the shared one first.
    let row = sqlx::query(select_clusters!(
        "WHERE name = ?1 \
         AND (?2 IS NULL OR project_id IS NULL OR project_id = ?2) \
         ORDER BY (project_id IS NULL) = (?2 IS NOT NULL) LIMIT 1"
    ))
    .bind(name)
    .bind(project_id)
    .fetch_optional(&store.readers)
    .await?;
    row.as_ref().map(cluster).transpose()
}

pub(super) async fn list(store: &SqliteStore, project_id: Option<&str>) -> Result<Vec<Cluster>> {
    let rows = sqlx::query(select_clusters!(
        "\
         WHERE ?1 IS NULL OR project_id IS NULL OR project_id = ?1 ORDER BY name"
    ))
    .bind(project_id)
    .fetch_all(&store.readers)
    .await?;
    rows.iter().map(cluster).collect()
}

pub(super) async fn update(
    store: &SqliteStore,
    cluster_id: &str,
    spec: &ClusterSpec,
    now: Timestamp,
) -> Result<Cluster> {
    if spec.name == DEFAULT_CLUSTER {
        return Err(taken(&spec.name));
    }
    let now = normalize(now);
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    let row = sqlx::query(select_clusters!("WHERE id = ?1"))
        .bind(cluster_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("cluster {cluster_id}")))?;
    let mut found = cluster(&row)?;
    if found.spec.name != spec.name {
        users(&mut tx, &found.spec.name, found.project_id.as_deref())
            .await?
            .check(&found.spec.name, "it keeps its name until")?;
        if found.project_id.is_some() && shared_exists(&mut tx, &spec.name).await? {
            return Err(shared_taken(&spec.name));
        }
    }
    sqlx::query(
        "UPDATE clusters SET name = ?1, memory_mib = ?2, disk_mib = ?3, runners = ?4, \
         updated_at = ?5 WHERE id = ?6",
    )
    .bind(&spec.name)
    .bind(spec.memory_mib)
    .bind(spec.disk_mib)
    .bind(spec.runners)
    .bind(micros(now))
    .bind(cluster_id)
    .execute(&mut *tx)
    .await
    .map_err(|error| unique_violation(error, || taken(&spec.name).to_string()))?;
    tx.commit().await?;
    found.spec = spec.clone();
    found.updated_at = now;
    Ok(found)
}

pub(super) async fn delete(store: &SqliteStore, cluster_id: &str) -> Result<()> {
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    let row = sqlx::query("SELECT name, project_id FROM clusters WHERE id = ?1")
        .bind(cluster_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("cluster {cluster_id}")))?;
    let (name, owner): (String, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
    users(&mut tx, &name, owner.as_deref())
        .await?
        .check(&name, "it stays until")?;
    sqlx::query("DELETE FROM clusters WHERE id = ?1")
        .bind(cluster_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn record_runner(
    store: &SqliteStore,
    runner: &RunnerSeen,
    now: Timestamp,
) -> Result<()> {
    let clusters = to_json(&runner.clusters)?;
    let mut writer = store.writer().await?;
    sqlx::query(
        "INSERT INTO runners (id, clusters, capacity, last_seen, owner) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (id) DO UPDATE SET clusters = excluded.clusters, \
         capacity = excluded.capacity, last_seen = excluded.last_seen, owner = excluded.owner",
    )
    .bind(&runner.id)
    .bind(&clusters)
    .bind(runner.capacity)
    .bind(micros(normalize(now)))
    .bind(runner.owner.as_deref())
    .execute(&mut writer.conn)
    .await?;
    Ok(())
}

pub(super) async fn load(
    store: &SqliteStore,
    name: &str,
    owner: Option<&str>,
    project_id: Option<&str>,
    online_since: Timestamp,
    now: Timestamp,
) -> Result<ClusterLoad> {
    let mut conn = store.readers.acquire().await?;
    let counts = sqlx::query(
        "SELECT COALESCE(SUM(status = 'queued'), 0) AS queued, \
         COALESCE(SUM(status IN ('preparing', 'running')), 0) AS running \
         FROM tasks AS t WHERE t.cluster = ?1 AND t.status IN ('queued', 'preparing', 'running') \
         AND (?2 IS NULL OR t.project_id = ?2) \
         AND (CASE WHEN ?3 IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
              WHERE k.project_id = t.project_id AND k.name = t.cluster) \
              ELSE t.project_id = ?3 END)",
    )
    .bind(name)
    .bind(project_id)
    .bind(owner)
    .fetch_one(&mut *conn)
    .await?;
    let rows = sqlx::query(
        "SELECT r.id, r.clusters, r.capacity, r.last_seen, \
         (SELECT COUNT(*) FROM tasks AS t WHERE t.runner_id = r.id \
          AND t.status IN ('preparing', 'running') AND t.lease_expires_at > ?3) AS in_use \
         FROM runners AS r \
         WHERE EXISTS (SELECT 1 FROM json_each(r.clusters) WHERE value = ?1) \
         AND r.owner IS ?4 AND (r.last_seen >= ?2 OR in_use > 0) ORDER BY r.id",
    )
    .bind(name)
    .bind(micros(online_since))
    .bind(micros(now))
    .bind(owner)
    .fetch_all(&mut *conn)
    .await?;
    let mut runners = Vec::with_capacity(rows.len());
    for row in &rows {
        let clusters: String = row.try_get("clusters")?;
        runners.push(RunnerStatus {
            id: row.try_get("id")?,
            clusters: serde_json::from_str(&clusters)
                .map_err(|error| StoreError::Corrupt(format!("runners.clusters: {error}")))?,
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

pub(super) async fn gone_runners(
    store: &SqliteStore,
    runner_ids: &[String],
    owner: Option<&str>,
    seen_before: Timestamp,
    now: Timestamp,
) -> Result<Vec<String>> {
    if runner_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = store.readers.acquire().await?;
    let gone = sqlx::query_scalar(
        "SELECT r.id FROM runners AS r \
         WHERE r.id IN (SELECT value FROM json_each(?1)) AND r.owner IS ?2 \
         AND r.last_seen < ?3 \
         AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.runner_id = r.id \
              AND t.status IN ('preparing', 'running') AND t.lease_expires_at > ?4) \
         ORDER BY r.id",
    )
    .bind(to_json(&runner_ids)?)
    .bind(owner)
    .bind(micros(normalize(seen_before)))
    .bind(micros(normalize(now)))
    .fetch_all(&mut *conn)
    .await?;
    Ok(gone)
}
