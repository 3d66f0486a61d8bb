//! Schedules: created, changed, cancelled, and fired once per due time.

use sqlx::Connection;
use sqlx::sqlite::SqliteConnection;
use stevedore_model::{Quota, Schedule, ScheduleSpec, ScheduleStatus, Task, Timestamp};

use super::rows::{self, micros, opt_micros, schedule_columns, to_json};
use super::{BEGIN_WRITE, SqliteStore};
use super::{quotas, tasks};
use crate::convert::limit_offset;
use crate::record::{
    change_schedule, check_due, fired_task, firing, new_schedule, next_start_after_pass, normalize,
    schedule_status,
};
use crate::{Page, Result, StoreError};

pub(super) async fn create(
    store: &SqliteStore,
    project_id: &str,
    specs: &[(ScheduleSpec, Option<Timestamp>)],
    now: Timestamp,
) -> Result<Vec<Schedule>> {
    let now = normalize(now);
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    let limits = quotas::limits(&mut tx, &store.quota_defaults, project_id).await?;
    quotas::check(
        &mut tx,
        &limits,
        Quota::Schedules,
        project_id,
        firing(specs),
    )
    .await?;
    let mut created = Vec::with_capacity(specs.len());
    for (spec, first_fire) in specs {
        let code_id: String = sqlx::query_scalar(
            "SELECT id FROM codes WHERE project_id = ?1 AND name = ?2 AND deleted_at IS NULL",
        )
        .bind(project_id)
        .bind(&spec.code_name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("code {}", spec.code_name)))?;
        let schedule = new_schedule(project_id, code_id, spec, *first_fire, now);
        sqlx::query(
            "INSERT INTO schedules (id, project_id, code_id, spec, status, next_start, \
             last_run_time, run_count, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, 0, ?7, ?7)",
        )
        .bind(&schedule.id)
        .bind(project_id)
        .bind(&schedule.code_id)
        .bind(to_json(spec)?)
        .bind(schedule.status.as_str())
        .bind(opt_micros(schedule.next_start))
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        created.push(schedule);
    }
    tx.commit().await?;
    Ok(created)
}

pub(super) async fn get(
    store: &SqliteStore,
    project_id: &str,
    schedule_id: &str,
) -> Result<Schedule> {
    let mut conn = store.readers.acquire().await?;
    load(&mut conn, Some(project_id), schedule_id).await
}

pub(super) async fn list(
    store: &SqliteStore,
    project_id: &str,
    page: Page,
) -> Result<Vec<Schedule>> {
    let (limit, offset) = limit_offset(page);
    let rows = sqlx::query(concat!(
        "SELECT ",
        schedule_columns!(),
        " FROM schedules AS s WHERE s.project_id = ?1 \
         ORDER BY s.created_at DESC, s.id DESC LIMIT +?2 OFFSET ?3"
    ))
    .bind(project_id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&store.readers)
    .await?;
    rows.iter().map(rows::schedule).collect()
}

pub(super) async fn cancel(
    store: &SqliteStore,
    project_id: &str,
    schedule_id: &str,
    now: Timestamp,
) -> Result<Schedule> {
    let now = normalize(now);
    let mut writer = store.writer().await?;
    let conn = &mut writer.conn;
    let mut schedule = load(conn, Some(project_id), schedule_id).await?;
    if schedule.status != ScheduleStatus::Scheduled {
        return Ok(schedule);
    }
    sqlx::query(
        "UPDATE schedules SET status = ?1, next_start = NULL, updated_at = ?2 WHERE id = ?3 AND status = ?4",
    )
    .bind(ScheduleStatus::Cancelled.as_str())
    .bind(micros(now))
    .bind(schedule_id)
    .bind(ScheduleStatus::Scheduled.as_str())
    .execute(&mut *conn)
    .await?;
    schedule.status = ScheduleStatus::Cancelled;
    schedule.next_start = None;
    schedule.updated_at = now;
    Ok(schedule)
}

pub(super) async fn update(
    store: &SqliteStore,
    project_id: &str,
    schedule_id: &str,
    spec: &ScheduleSpec,
    next_start: Option<Timestamp>,
    now: Timestamp,
) -> Result<Schedule> {
    let (now, next_start) = (normalize(now), next_start.map(normalize));
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    let mut schedule = load(&mut tx, Some(project_id), schedule_id).await?;
    change_schedule(&mut schedule, spec, next_start, now)?;
    sqlx::query(
        "UPDATE schedules SET spec = ?1, status = ?2, next_start = ?3, updated_at = ?4 \
         WHERE id = ?5",
    )
    .bind(to_json(spec)?)
    .bind(schedule.status.as_str())
    .bind(opt_micros(next_start))
    .bind(micros(now))
    .bind(schedule_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(schedule)
}

pub(super) async fn due(store: &SqliteStore, now: Timestamp, limit: u32) -> Result<Vec<Schedule>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        schedule_columns!(),
        " FROM schedules AS s WHERE s.status = 'scheduled' AND s.next_start <= ?1 \
         ORDER BY s.next_start, s.id LIMIT +?2"
    ))
    .bind(micros(now))
    .bind(i64::from(limit))
    .fetch_all(&store.readers)
    .await?;
    rows.iter().map(rows::schedule).collect()
}

pub(super) async fn fire(
    store: &SqliteStore,
    schedule_id: &str,
    fired_at: Timestamp,
    next_start: Option<Timestamp>,
    now: Timestamp,
) -> Result<Option<Task>> {
    let (now, fired_at, next_start) = (
        normalize(now),
        normalize(fired_at),
        next_start.map(normalize),
    );
    let mut writer = store.writer().await?;
    let mut tx = writer.conn.begin_with(BEGIN_WRITE).await?;
    let schedule = load(&mut tx, None, schedule_id).await?;
    check_due(&schedule, fired_at)?;
    let spec = &schedule.spec;
    if !super::clusters::usable(&mut tx, &schedule.project_id, &spec.cluster).await? {
        // Its cluster is gone (it cannot go while the schedule names it; older stores allowed
        // that): a task queued there could reach whoever took the name since.
        let next_start = next_start_after_pass(&schedule, fired_at, now);
        pass_fire(&mut tx, schedule_id, next_start, now).await?;
        tx.commit().await?;
        return Ok(None);
    }
    if let Some(limit) = spec.max_concurrency {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks WHERE schedule_id = ?1 \
             AND status IN ('queued', 'preparing', 'running')",
        )
        .bind(schedule_id)
        .fetch_one(&mut *tx)
        .await?;
        if unfinished >= i64::from(limit) {
            let next_start = next_start_after_pass(&schedule, fired_at, now);
            pass_fire(&mut tx, schedule_id, next_start, now).await?;
            tx.commit().await?;
            return Ok(None);
        }
    }
    let limits = quotas::limits(&mut tx, &store.quota_defaults, &schedule.project_id).await?;
    match quotas::check(
        &mut tx,
        &limits,
        Quota::QueuedTasks,
        &schedule.project_id,
        1,
    )
    .await
    {
        Err(StoreError::QuotaExceeded(exceeded)) => {
            // As at its `max_concurrency`: this fire time passes and the next one may find room.
            tracing::info!(schedule_id, %exceeded, "a schedule's fire passed at its project's quota");
            let next_start = next_start_after_pass(&schedule, fired_at, now);
            pass_fire(&mut tx, schedule_id, next_start, now).await?;
            tx.commit().await?;
            return Ok(None);
        }
        other => other?,
    }
    let new_task = spec.task(&schedule.id);
    let queued = tasks::insert(
        &mut tx,
        &schedule.project_id,
        std::slice::from_ref(&new_task),
        now,
    )
    .await?;
    let status = schedule_status(next_start);
    sqlx::query(
        "UPDATE schedules SET status = ?1, next_start = ?2, last_run_time = ?3, \
         run_count = run_count + 1, updated_at = ?3 WHERE id = ?4",
    )
    .bind(status.as_str())
    .bind(opt_micros(next_start))
    .bind(micros(now))
    .bind(schedule_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    fired_task(queued)
}

async fn load(
    conn: &mut SqliteConnection,
    project_id: Option<&str>,
    schedule_id: &str,
) -> Result<Schedule> {
    let row = sqlx::query(concat!(
        "SELECT ",
        schedule_columns!(),
        " FROM schedules AS s WHERE s.id = ?1 AND (?2 IS NULL OR s.project_id = ?2)"
    ))
    .bind(schedule_id)
    .bind(project_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found(format!("schedule {schedule_id}")))?;
    rows::schedule(&row)
}

/// Moves a schedule past a fire time without queueing a task (its `max_concurrency` was
/// reached): to `next_start`, or complete when there is none. The run is not counted.
async fn pass_fire(
    conn: &mut SqliteConnection,
    schedule_id: &str,
    next_start: Option<Timestamp>,
    now: Timestamp,
) -> Result<()> {
    let status = schedule_status(next_start);
    sqlx::query("UPDATE schedules SET status = ?1, next_start = ?2, updated_at = ?3 WHERE id = ?4")
        .bind(status.as_str())
        .bind(opt_micros(next_start))
        .bind(micros(now))
        .bind(schedule_id)
        .execute(conn)
        .await?;
    Ok(())
}
