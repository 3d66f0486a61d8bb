//! Projects and their tokens.

use sqlx::postgres::PgConnection;
use stevedore_model::{Timestamp, new_id};

use super::rows;
use super::{PgStore, finish};
use crate::convert::to_json;
use crate::convert::{micros, role_text, unique_violation};
use crate::record::normalize;
use crate::{NewToken, Project, Result, StoreError, TokenRecord};

pub(super) async fn create(store: &PgStore, name: &str, now: Timestamp) -> Result<Project> {
    let project = Project {
        id: new_id(),
        name: name.to_owned(),
        created_at: normalize(now),
    };
    sqlx::query("INSERT INTO projects (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(&project.id)
        .bind(&project.name)
        .bind(micros(project.created_at))
        .execute(&store.pool)
        .await
        .map_err(|error| {
            unique_violation(error, || format!("a project named {name:?} already exists"))
        })?;
    Ok(project)
}

pub(super) async fn get(store: &PgStore, project_id: &str) -> Result<Project> {
    let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE id = $1")
        .bind(project_id)
        .fetch_optional(&store.pool)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("project {project_id}")))?;
    rows::project(&row)
}

pub(super) async fn find_by_name(store: &PgStore, name: &str) -> Result<Option<Project>> {
    let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE name = $1")
        .bind(name)
        .fetch_optional(&store.pool)
        .await?;
    row.as_ref().map(rows::project).transpose()
}

pub(super) async fn create_token(
    store: &PgStore,
    token: &NewToken,
    secret_sha256: &str,
    now: Timestamp,
) -> Result<TokenRecord> {
    let project_id = token.project_id.as_deref();
    let role = token.role;
    let clusters = token.clusters.as_ref().map(to_json).transpose()?;
    let record = TokenRecord {
        id: new_id(),
        project_id: project_id.map(str::to_owned),
        role,
        clusters: token.clusters.clone(),
        created_at: normalize(now),
    };
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        if let Some(project_id) = project_id {
            ensure(&mut tx, project_id).await?;
        }
        sqlx::query(
            "INSERT INTO tokens (id, project_id, role, secret_sha256, created_at, clusters) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&record.id)
        .bind(project_id)
        .bind(role_text(role))
        .bind(secret_sha256)
        .bind(micros(record.created_at))
        .bind(&clusters)
        .execute(&mut *tx)
        .await
        .map_err(|error| {
            unique_violation(error, || {
                "a token with this secret already exists".to_owned()
            })
        })?;
        Ok(record)
    }
    .await;
    finish(tx, result).await
}

pub(super) async fn find_token(
    store: &PgStore,
    secret_sha256: &str,
) -> Result<Option<TokenRecord>> {
    let row = sqlx::query(
        "SELECT id, project_id, role, created_at, clusters FROM tokens WHERE secret_sha256 = $1",
    )
    .bind(secret_sha256)
    .fetch_optional(&store.pool)
    .await?;
    row.as_ref().map(rows::token).transpose()
}

pub(super) async fn ensure(conn: &mut PgConnection, project_id: &str) -> Result<()> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM projects WHERE id = $1")
        .bind(project_id)
        .fetch_optional(&mut *conn)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found(format!("project {project_id}")))
}
