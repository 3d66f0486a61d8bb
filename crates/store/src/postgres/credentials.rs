//! Projects' registry credentials (their passwords sealed; see `crate::credentials`).

use stevedore_model::Timestamp;

use super::{PgStore, finish, projects};
use crate::convert::micros;
use crate::record::normalize;
use crate::rows::{credential, select_credentials};
use crate::{Result, SealedSecret, StoreError, StoredCredential};

pub(super) async fn put(
    store: &PgStore,
    project_id: &str,
    registry: &str,
    username: &str,
    sealed: &SealedSecret,
    now: Timestamp,
) -> Result<StoredCredential> {
    let now = normalize(now);
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        projects::ensure(&mut tx, project_id).await?;
        let row = sqlx::query(
            "INSERT INTO registry_credentials (project_id, registry, username, sealed, key_id, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
             ON CONFLICT (project_id, registry) DO UPDATE SET username = excluded.username, \
             sealed = excluded.sealed, key_id = excluded.key_id, \
             updated_at = excluded.updated_at \
             RETURNING project_id, registry, username, sealed, key_id, created_at, updated_at",
        )
        .bind(project_id)
        .bind(registry)
        .bind(username)
        .bind(&sealed.bytes)
        .bind(&sealed.key_id)
        .bind(micros(now))
        .fetch_one(&mut *tx)
        .await?;
        credential(&row)
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn get(
    store: &PgStore,
    project_id: &str,
    registry: &str,
) -> Result<Option<StoredCredential>> {
    let row = sqlx::query(select_credentials!(
        "WHERE project_id = $1 AND registry = $2"
    ))
    .bind(project_id)
    .bind(registry)
    .fetch_optional(&store.pool)
    .await?;
    row.as_ref().map(credential).transpose()
}

pub(super) async fn list(store: &PgStore, project_id: &str) -> Result<Vec<StoredCredential>> {
    let rows = sqlx::query(select_credentials!(
        "WHERE project_id = $1 ORDER BY registry"
    ))
    .bind(project_id)
    .fetch_all(&store.pool)
    .await?;
    rows.iter().map(credential).collect()
}

pub(super) async fn delete(store: &PgStore, project_id: &str, registry: &str) -> Result<()> {
    let deleted =
        sqlx::query("DELETE FROM registry_credentials WHERE project_id = $1 AND registry = $2")
            .bind(project_id)
            .bind(registry)
            .execute(&store.pool)
            .await?
            .rows_affected();
    if deleted == 0 {
        return Err(StoreError::not_found(format!(
            "registry credentials for {registry}"
        )));
    }
    Ok(())
}
