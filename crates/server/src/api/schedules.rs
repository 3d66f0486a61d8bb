//! Schedules: create (batch), list, show, update, cancel. Firing them is the scheduler's job.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use stevedore_api_types::v2;
use stevedore_model::ScheduleStatus;
use stevedore_model::limits::MAX_TASKS_PER_REQUEST;

use super::{Paging, code_defaults, message, prefix_error};
use crate::AppState;
use crate::auth::ProjectAccess;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery};
use crate::wire;

/// Create schedules. All or nothing.
#[utoipa::path(post, path = "/2/projects/{project_id}/schedules", tag = "schedules",
    params(("project_id" = String, Path)),
    request_body = v2::SchedulesCreate,
    responses((status = 200, body = v2::SchedulesCreated), (status = 400, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn create(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiJson(request): ApiJson<v2::SchedulesCreate>,
) -> ApiResult<Json<v2::SchedulesCreated>> {
    if request.schedules.is_empty() {
        return Err(ApiError::BadRequest(
            "schedules must hold at least one schedule".into(),
        ));
    }
    if request.schedules.len() > MAX_TASKS_PER_REQUEST {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_TASKS_PER_REQUEST} schedules may be created in one request"
        )));
    }
    let now = state.clock.now();
    let mut code_cache: HashMap<String, wire::CodeDefaults> = HashMap::new();
    let mut specs = Vec::with_capacity(request.schedules.len());
    for (index, schedule) in request.schedules.into_iter().enumerate() {
        let prefix = format!("schedules[{index}]");
        let defaults = match schedule.code_name.as_deref() {
            Some(name) => code_defaults(&state, &access.project_id, name, &mut code_cache)
                .await
                .map_err(|error| prefix_error(error, &prefix))?,
            None => wire::CodeDefaults::default(),
        };
        let spec = wire::schedule_spec(schedule, defaults, &state.config)
            .map_err(|error| prefix_error(error, &prefix))?;
        let first = spec.first_fire(now);
        if first.is_none() {
            return Err(ApiError::BadRequest(format!(
                "{prefix}.end_at: the schedule would never fire: end_at is before its first time"
            )));
        }
        specs.push((spec, first));
    }
    super::clusters::check_task_clusters(
        &state,
        &access.project_id,
        specs.iter().map(|(spec, _)| spec.cluster.as_str()),
    )
    .await?;
    let schedules = state
        .store
        .create_schedules(&access.project_id, &specs, now)
        .await?;
    Ok(Json(v2::SchedulesCreated {
        msg: "Scheduled".to_owned(),
        schedules: schedules
            .into_iter()
            .map(|schedule| v2::IdOnly { id: schedule.id })
            .collect(),
    }))
}

/// List schedules, newest first.
#[utoipa::path(get, path = "/2/projects/{project_id}/schedules", tag = "schedules",
    params(("project_id" = String, Path), Paging),
    responses((status = 200, body = v2::ScheduleList)))]
pub async fn list(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiQuery(paging): ApiQuery<Paging>,
) -> ApiResult<Json<v2::ScheduleList>> {
    let schedules = state
        .store
        .list_schedules(&access.project_id, paging.page()?)
        .await?;
    Ok(Json(v2::ScheduleList {
        schedules: schedules.iter().map(wire::schedule_info).collect(),
    }))
}

/// Show a schedule.
#[utoipa::path(get, path = "/2/projects/{project_id}/schedules/{schedule_id}", tag = "schedules",
    params(("project_id" = String, Path), ("schedule_id" = String, Path)),
    responses((status = 200, body = v2::ScheduleInfo), (status = 404, body = v2::Message)))]
pub async fn show(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, schedule_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::ScheduleInfo>> {
    let schedule = state
        .store
        .get_schedule(&access.project_id, &schedule_id)
        .await?;
    Ok(Json(wire::schedule_info(&schedule)))
}

/// Change a schedule: the fields given replace the schedule's, the others stay (a negative
/// `priority` is the code's default, `run_times: 0` no limit). Its runs so far stay counted;
/// its next fire time follows from the new timing and its last run. Its code cannot change.
#[utoipa::path(put, path = "/2/projects/{project_id}/schedules/{schedule_id}", tag = "schedules",
    params(("project_id" = String, Path), ("schedule_id" = String, Path)),
    request_body = v2::ScheduleCreate,
    responses((status = 200, body = v2::ScheduleInfo), (status = 400, body = v2::Message),
        (status = 404, body = v2::Message), (status = 409, body = v2::Message)))]
pub async fn update(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, schedule_id)): Path<(String, String)>,
    ApiJson(request): ApiJson<v2::ScheduleCreate>,
) -> ApiResult<Json<v2::ScheduleInfo>> {
    let now = state.clock.now();
    let current = state
        .store
        .get_schedule(&access.project_id, &schedule_id)
        .await?;
    if current.status != ScheduleStatus::Scheduled {
        return Err(ApiError::Conflict(format!(
            "schedule {schedule_id} is {}; only a scheduled one can be changed",
            current.status.as_str()
        )));
    }
    let merged = wire::schedule_over(request, &current.spec)?;
    let mut cache = HashMap::new();
    let defaults = code_defaults(
        &state,
        &access.project_id,
        &current.spec.code_name,
        &mut cache,
    )
    .await?;
    let spec = wire::schedule_spec(merged, defaults, &state.config)?;
    super::clusters::check_task_clusters(&state, &access.project_id, [spec.cluster.as_str()])
        .await?;
    let next_start = match current.last_run_time {
        Some(last_run) => spec.next_fire(last_run, current.run_count, now),
        None => spec.first_fire(now),
    };
    let updated = state
        .store
        .update_schedule(&access.project_id, &schedule_id, &spec, next_start, now)
        .await?;
    let mut info = wire::schedule_info(&updated);
    info.msg = Some("Updated".to_owned());
    Ok(Json(info))
}

/// Cancel a schedule: it makes no more tasks.
#[utoipa::path(post, path = "/2/projects/{project_id}/schedules/{schedule_id}/cancel", tag = "schedules",
    params(("project_id" = String, Path), ("schedule_id" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn cancel(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, schedule_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::Message>> {
    state
        .store
        .cancel_schedule(&access.project_id, &schedule_id, state.clock.now())
        .await?;
    Ok(message("Cancelled"))
}
