//! Codes, their revisions and packages, and the writer's cache of revisions handed out with
//! leases.

use std::collections::HashMap;

use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use stevedore_model::{CodeRevision, CodeSpec, Quota, ScheduleStatus, Timestamp, new_id};

use super::rows::{self, micros, opt_signed, revision_columns, task_columns, to_json};
use super::{BEGIN_WRITE, SqliteStore};
use super::{packages, projects, quotas, tasks};
use crate::convert::limit_offset;
use crate::package::{self, held_columns};
use crate::record::normalize;
use crate::{
    CodeCancellation, CodeStats, PackageStream, Page, Result, RevisionPackage, StatsWindow,
    StoreError,
};

pub(super) async fn push(
    store: &SqliteStore,
    project_id: &str,
    spec: &CodeSpec,
    package: Option<RevisionPackage<'_>>,
    now: Timestamp,
) -> Result<CodeRevision> {
    package::push_with(store, project_id, package, |blob| {
        Box::pin(push_revision(store, project_id, spec, package, blob, now))
    })
    .await
}

/// The revision's transaction: `None` (rolled back) when its package is neither stored nor
/// written (`packages::attach`).
async fn push_revision(
    store: &SqliteStore,
    project_id: &str,
    spec: &CodeSpec,
    package: Option<RevisionPackage<'_>>,
    blob: Option<i64>,
    now: Timestamp,
) -> Result<Option<CodeRevision>> {
    let now = normalize(now);
    let spec_json = to_json(spec)?;
    let max_concurrency = spec.max_concurrency.map(i64::from);
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    projects::ensure(&mut tx, project_id).await?;
    let limits = quotas::limits(&mut tx, &store.quota_defaults, project_id).await?;
    let existing = sqlx::query(
        "SELECT id, latest_rev, paused, created_at FROM codes \
         WHERE project_id = ?1 AND name = ?2 AND deleted_at IS NULL",
    )
    .bind(project_id)
    .bind(&spec.name)
    .fetch_optional(&mut *tx)
    .await?;
    let held = match package {
        None => None,
        Some(package) => match packages::attach(&mut tx, project_id, package, blob, now).await? {
            Some(held) => Some(held),
            None => return Ok(None),
        },
    };
    // A package the project's live revisions hold already adds nothing.
    let adding = match &held {
        Some((sha256, size)) if !packages::held_by_project(&mut tx, project_id, sha256).await? => {
            *size
        }
        _ => 0,
    };
    quotas::check(&mut tx, &limits, Quota::PackageBytes, project_id, adding).await?;
    let (code_id, rev, paused, created_at) = match existing {
        Some(row) => {
            let code_id: String = row.try_get("id")?;
            let latest: i64 = row.try_get("latest_rev")?;
            limits.check(
                Quota::RevisionsPerCode,
                u64::try_from(latest).unwrap_or(0),
                1,
            )?;
            let rev = latest + 1;
            sqlx::query(
                "UPDATE codes SET latest_rev = ?1, max_concurrency = ?2, updated_at = ?3 WHERE id = ?4",
            )
            .bind(rev)
            .bind(max_concurrency)
            .bind(micros(now))
            .bind(&code_id)
            .execute(&mut *tx)
            .await?;
            let created_at = rows::timestamp(row.try_get("created_at")?)?;
            (code_id, rev, row.try_get::<bool, _>("paused")?, created_at)
        }
        None => {
            quotas::check(&mut tx, &limits, Quota::Codes, project_id, 1).await?;
            let code_id = new_id();
            sqlx::query(
                "INSERT INTO codes (id, project_id, name, latest_rev, max_concurrency, paused, \
                 created_at, updated_at) VALUES (?1, ?2, ?3, 1, ?4, 0, ?5, ?5)",
            )
            .bind(&code_id)
            .bind(project_id)
            .bind(&spec.name)
            .bind(max_concurrency)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
            (code_id, 1, false, now)
        }
    };
    let (package_sha256, package_size) = held.unzip();
    sqlx::query(
        "INSERT INTO code_revisions (code_id, rev, spec, package_sha256, package_size, \
         stored_package, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?4, ?6)",
    )
    .bind(&code_id)
    .bind(rev)
    .bind(&spec_json)
    .bind(package_sha256.as_deref())
    .bind(opt_signed(package_size))
    .bind(micros(now))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(CodeRevision {
        id: code_id,
        project_id: project_id.to_owned(),
        rev: u32::try_from(rev)
            .map_err(|_| StoreError::Corrupt(format!("revision {rev} out of range")))?,
        spec: spec.clone(),
        package_sha256,
        package_size,
        created_at,
        updated_at: now,
        paused,
    }))
}

pub(super) async fn get(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
) -> Result<CodeRevision> {
    let row = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
         WHERE c.id = ?1 AND c.project_id = ?2 AND c.deleted_at IS NULL"
    ))
    .bind(code_id)
    .bind(project_id)
    .fetch_optional(&store.readers)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("code {code_id}")))?;
    rows::revision(&row)
}

pub(super) async fn get_by_name(
    store: &SqliteStore,
    project_id: &str,
    name: &str,
) -> Result<CodeRevision> {
    let row = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
         WHERE c.project_id = ?1 AND c.name = ?2 AND c.deleted_at IS NULL"
    ))
    .bind(project_id)
    .bind(name)
    .fetch_optional(&store.readers)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("code {name}")))?;
    rows::revision(&row)
}

pub(super) async fn list(
    store: &SqliteStore,
    project_id: &str,
    page: Page,
) -> Result<Vec<CodeRevision>> {
    let (limit, offset) = limit_offset(page);
    let rows = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
         WHERE c.project_id = ?1 AND c.deleted_at IS NULL \
         ORDER BY c.updated_at DESC, c.id DESC LIMIT +?2 OFFSET ?3"
    ))
    .bind(project_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&store.readers)
    .await?;
    rows.iter().map(rows::revision).collect()
}

pub(super) async fn list_revisions(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    page: Page,
) -> Result<Vec<CodeRevision>> {
    let mut conn = store.readers.acquire().await?;
    ensure(&mut conn, project_id, code_id).await?;
    let (limit, offset) = limit_offset(page);
    let rows = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
         WHERE c.id = ?1 AND c.project_id = ?2 AND c.deleted_at IS NULL \
         ORDER BY r.rev DESC LIMIT +?3 OFFSET ?4"
    ))
    .bind(code_id)
    .bind(project_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(rows::revision).collect()
}

pub(super) async fn get_revision(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    rev: u32,
) -> Result<CodeRevision> {
    let row = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
         WHERE c.id = ?1 AND c.project_id = ?2 AND c.deleted_at IS NULL AND r.rev = ?3"
    ))
    .bind(code_id)
    .bind(project_id)
    .bind(i64::from(rev))
    .fetch_optional(&store.readers)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("revision {rev} of code {code_id}")))?;
    rows::revision(&row)
}

pub(super) async fn get_package(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    rev: Option<u32>,
) -> Result<PackageStream> {
    let mut conn = store.readers.acquire().await?;
    let latest = ensure(&mut conn, project_id, code_id).await?;
    let rev = rev.map_or(latest, i64::from);
    let row = sqlx::query(concat!(
        "SELECT c.name, r.package_sha256, ",
        held_columns!(),
        " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id \
         LEFT JOIN packages AS p ON p.sha256 = r.stored_package \
         WHERE c.id = ?1 AND r.rev = ?2"
    ))
    .bind(code_id)
    .bind(rev)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("package of code {code_id} revision {rev}")))?;
    let held = packages::held_row(&row, row.try_get("name")?, rev)?;
    packages::stream(store, held)
}

/// The package of the revision a leased task pinned, looked up with the task in one query and
/// refused, as every runner's call about a leased task is, unless `token` is its current lease.
pub(super) async fn leased_package(
    store: &SqliteStore,
    task_id: &str,
    token: i64,
) -> Result<PackageStream> {
    let row = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        ", r.package_sha256, ",
        held_columns!(),
        " FROM tasks AS t \
         JOIN code_revisions AS r ON r.code_id = t.code_id AND r.rev = t.code_rev \
         LEFT JOIN packages AS p ON p.sha256 = r.stored_package \
         WHERE t.id = ?1"
    ))
    .bind(task_id)
    .fetch_optional(&store.readers)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("task {task_id}")))?;
    let record = rows::task_record(&row)?;
    record.check_lease(token)?;
    let task = record.task;
    let held = packages::held_row(&row, task.code_name, i64::from(task.code_rev))?;
    packages::stream(store, held)
}

pub(super) async fn delete(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    now: Timestamp,
) -> Result<CodeCancellation> {
    let now = normalize(now);
    // The backlog first, in chunks, while the code is live; then, in one transaction, the
    // code, what was queued meanwhile, its leased tasks and schedules. Stopped half-way, the
    // code is still there, with fewer queued tasks, and a second delete finishes it.
    let chunked = tasks::cancel_queued_in_chunks(store, project_id, code_id, now).await?;
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    ensure(&mut tx, project_id, code_id).await?;
    sqlx::query("UPDATE codes SET deleted_at = ?1 WHERE id = ?2")
        .bind(micros(now))
        .bind(code_id)
        .execute(&mut *tx)
        .await?;
    let mut cancellation = tasks::cancel_code_tasks(&mut tx, code_id, now).await?;
    cancellation.cancelled += chunked;
    // A schedule of a deleted code could only ever fail to fire.
    sqlx::query(
        "UPDATE schedules SET status = ?1, next_start = NULL, updated_at = ?2 \
         WHERE code_id = ?3 AND status = ?4",
    )
    .bind(ScheduleStatus::Cancelled.as_str())
    .bind(micros(now))
    .bind(code_id)
    .bind(ScheduleStatus::Scheduled.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(cancellation)
}

pub(super) async fn set_paused(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    paused: bool,
    _now: Timestamp,
) -> Result<CodeRevision> {
    let mut writer = store.writer().await?;
    let conn = &mut writer.conn;
    let changed = sqlx::query(
        "UPDATE codes SET paused = ?1 WHERE id = ?2 AND project_id = ?3 AND deleted_at IS NULL",
    )
    .bind(paused)
    .bind(code_id)
    .bind(project_id)
    .execute(&mut *conn)
    .await?;
    if changed.rows_affected() == 0 {
        return Err(StoreError::not_found(format!("code {code_id}")));
    }
    let row = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM codes AS c JOIN code_revisions AS r ON r.code_id = c.id AND r.rev = c.latest_rev \
         WHERE c.id = ?1"
    ))
    .bind(code_id)
    .fetch_one(&mut *conn)
    .await?;
    rows::revision(&row)
}

pub(super) async fn stats(
    store: &SqliteStore,
    project_id: &str,
    code_id: &str,
    window: StatsWindow,
) -> Result<CodeStats> {
    let mut conn = store.readers.acquire().await?;
    ensure(&mut conn, project_id, code_id).await?;
    // Every status listed, so the count seeks the (status, code_id) index once per status.
    let rows = sqlx::query(
        "SELECT status, COUNT(*) AS n FROM tasks WHERE code_id = ?1 AND status IN \
         ('queued', 'preparing', 'running', 'complete', 'error', 'timeout', 'cancelled') \
         AND (?2 IS NULL OR updated_at >= ?2) AND (?3 IS NULL OR updated_at <= ?3) \
         GROUP BY status",
    )
    .bind(code_id)
    .bind(window.updated_from.map(micros))
    .bind(window.updated_to.map(micros))
    .fetch_all(&mut *conn)
    .await?;
    crate::convert::status_counts(
        rows.iter()
            .map(|row| Ok((row.try_get("status")?, row.try_get("n")?)))
            .collect::<Result<Vec<_>>>()?,
    )
}

/// Checks that a live code exists in the project; returns its latest revision number.
pub(super) async fn ensure(
    conn: &mut SqliteConnection,
    project_id: &str,
    code_id: &str,
) -> Result<i64> {
    let latest: Option<i64> = sqlx::query_scalar(
        "SELECT latest_rev FROM codes WHERE id = ?1 AND project_id = ?2 AND deleted_at IS NULL",
    )
    .bind(code_id)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?;
    latest.ok_or_else(|| StoreError::not_found(format!("code {code_id}")))
}

/// Code revisions handed out with leases. A revision never changes once pushed, and a leased
/// task's code is by definition not paused, so a cached copy stays true; only the writer
/// touches it.
#[derive(Default)]
pub(super) struct RevisionCache {
    revisions: HashMap<(String, u32), CodeRevision>,
}

impl RevisionCache {
    const MAX_REVISIONS: usize = 1024;

    pub(super) async fn get(
        &mut self,
        conn: &mut SqliteConnection,
        code_id: &str,
        rev: u32,
    ) -> Result<CodeRevision> {
        if let Some(code) = self.revisions.get(&(code_id.to_owned(), rev)) {
            return Ok(code.clone());
        }
        let mut code = load_revision(conn, code_id, rev).await?;
        code.paused = false;
        if self.revisions.len() >= Self::MAX_REVISIONS {
            self.revisions.clear();
        }
        self.revisions
            .insert((code_id.to_owned(), rev), code.clone());
        Ok(code)
    }
}

/// A code revision by id and number, whatever the project (the task already names it).
async fn load_revision(
    conn: &mut SqliteConnection,
    code_id: &str,
    rev: u32,
) -> Result<CodeRevision> {
    let row = sqlx::query(concat!(
        "SELECT ",
        revision_columns!(),
        " FROM code_revisions AS r JOIN codes AS c ON c.id = r.code_id WHERE r.code_id = ?1 AND r.rev = ?2"
    ))
    .bind(code_id)
    .bind(i64::from(rev))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::Corrupt(format!("revision {rev} of code {code_id} is missing")))?;
    rows::revision(&row)
}
