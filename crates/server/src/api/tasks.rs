//! Tasks: queue (batch and webhook), list with IronWorker's filters, show, cancel, retry,
//! progress. Logs are in `logs`.

use std::collections::HashMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use serde::Deserialize;
use stevedore_api_types::v2;
use stevedore_model::limits::MAX_TASKS_PER_REQUEST;
use stevedore_model::{NewTask, Task, TaskStatus};
use stevedore_store::TaskFilter;

use super::{Paging, code_defaults, message, prefix_error};
use crate::AppState;
use crate::auth::ProjectAccess;
use crate::error::{ApiError, ApiResult};
use crate::extract::parse_flag;
use crate::extract::{ApiJson, ApiQuery, read_body};
use crate::wire;

/// Queue tasks. All or nothing: one invalid task refuses the whole batch.
#[utoipa::path(post, path = "/2/projects/{project_id}/tasks", tag = "tasks",
    params(("project_id" = String, Path)),
    request_body = v2::TasksCreate,
    responses((status = 200, body = v2::TasksQueued), (status = 400, body = v2::Message),
        (status = 404, body = v2::Message), (status = 413, body = v2::Message)))]
pub async fn queue(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiJson(request): ApiJson<v2::TasksCreate>,
) -> ApiResult<Json<v2::TasksQueued>> {
    let queued = queue_tasks(&state, &access.project_id, request.tasks).await?;
    Ok(queued_reply(queued))
}

/// Validates and queues a batch of tasks for a project, then wakes the runners: the API's
/// `POST tasks` and the dashboard's queue form both end here. A bad task fails the whole
/// batch with its index in the message.
pub async fn queue_tasks(
    state: &AppState,
    project_id: &str,
    requests: Vec<v2::TaskCreate>,
) -> ApiResult<Vec<Task>> {
    if requests.is_empty() {
        return Err(ApiError::BadRequest(
            "tasks must hold at least one task".into(),
        ));
    }
    if requests.len() > MAX_TASKS_PER_REQUEST {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_TASKS_PER_REQUEST} tasks may be queued in one request, got {}",
            requests.len()
        )));
    }
    let mut code_cache: HashMap<String, wire::CodeDefaults> = HashMap::new();
    let mut tasks = Vec::with_capacity(requests.len());
    for (index, task) in requests.into_iter().enumerate() {
        let at = |error: ApiError| prefix_error(error, &format!("tasks[{index}]"));
        let defaults = match task.code_name.as_deref() {
            Some(name) => code_defaults(state, project_id, name, &mut code_cache)
                .await
                .map_err(at)?,
            None => wire::CodeDefaults::default(),
        };
        tasks.push(wire::new_task(task, defaults, &state.config).map_err(at)?);
    }
    super::clusters::check_task_clusters(
        state,
        project_id,
        tasks.iter().map(|task| task.cluster.as_str()),
    )
    .await?;
    let queued = state
        .store
        .enqueue(project_id, &tasks, state.clock.now())
        .await?;
    state.tasks_queued();
    Ok(queued)
}

/// A parameter not listed here is refused with 400 rather than ignored.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WebhookQuery {
    /// The code to run.
    pub code_name: Option<String>,
    pub priority: Option<i64>,
    pub timeout: Option<i64>,
    pub delay: Option<i64>,
    pub cluster: Option<String>,
    pub label: Option<String>,
    /// The token, for senders that cannot set headers.
    pub oauth: Option<String>,
}

/// Queue one task whose payload is the raw request body.
#[utoipa::path(post, path = "/2/projects/{project_id}/tasks/webhook", tag = "tasks",
    params(("project_id" = String, Path), WebhookQuery),
    request_body(content = String, description = "the payload, verbatim"),
    responses((status = 200, body = v2::WebhookQueued), (status = 404, body = v2::Message), (status = 413, body = v2::Message)))]
pub async fn webhook(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiQuery(query): ApiQuery<WebhookQuery>,
    body: Body,
) -> ApiResult<Json<v2::WebhookQueued>> {
    let code_name = query.code_name.ok_or_else(|| {
        ApiError::BadRequest("code_name: the query parameter code_name is required".into())
    })?;
    let body = read_body(body, state.config.max_payload_bytes).await?;
    let payload = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::BadRequest("payload: a webhook body must be UTF-8 text".into()))?;
    let mut cache = HashMap::new();
    let defaults = code_defaults(&state, &access.project_id, &code_name, &mut cache).await?;
    let request = v2::TaskCreate {
        code_name: Some(code_name),
        payload: Some(serde_json::Value::String(payload)),
        priority: query.priority,
        timeout: query.timeout,
        delay: query.delay,
        label: query.label,
        cluster: query.cluster,
        ..v2::TaskCreate::default()
    };
    let task = wire::new_task(request, defaults, &state.config)?;
    super::clusters::check_task_clusters(&state, &access.project_id, [task.cluster.as_str()])
        .await?;
    let mut queued = state
        .store
        .enqueue(&access.project_id, &[task], state.clock.now())
        .await?;
    state.tasks_queued();
    let task = queued
        .pop()
        .ok_or_else(|| ApiError::Internal("enqueue returned no task".into()))?;
    Ok(Json(v2::WebhookQueued {
        id: task.id,
        msg: "Queued up".to_owned(),
    }))
}

/// IronWorker's task list filters. A status flag such as `queued=1` selects that status, as
/// does `status=queued,running`; with neither every status is listed. Times are seconds since
/// the epoch. A parameter not listed here, a status that does not exist and a flag value that
/// is neither yes nor no are refused with 400 rather than ignored, so a filter stevedore does
/// not understand never silently widens the list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TaskListQuery {
    pub code_name: Option<String>,
    /// Only tasks with this label.
    pub label: Option<String>,
    pub page: Option<i64>,
    pub per_page: Option<i64>,
    pub from_time: Option<i64>,
    pub to_time: Option<i64>,
    /// Only tasks of these statuses, comma-separated (`killed` is `cancelled`).
    pub status: Option<String>,
    pub queued: Option<String>,
    pub preparing: Option<String>,
    pub running: Option<String>,
    pub complete: Option<String>,
    pub error: Option<String>,
    pub cancelled: Option<String>,
    pub killed: Option<String>,
    pub timeout: Option<String>,
    /// The token, for clients that cannot set headers (read by the authentication).
    #[param(ignore)]
    pub oauth: Option<String>,
}

/// Whether a status flag selects its status: absent or a "no" does not, a "yes" (or a bare
/// `queued`) does, anything else is a 400.
fn flag(name: &str, value: &Option<String>) -> ApiResult<bool> {
    value
        .as_deref()
        .map_or(Ok(false), |value| parse_flag(name, value))
}

/// The statuses `status=` names, comma-separated.
fn parse_statuses(text: &str) -> ApiResult<Vec<TaskStatus>> {
    text.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| match name {
            // IronWorker's `killed` has no status of its own here: a killed task is cancelled.
            "killed" => Ok(TaskStatus::Cancelled),
            name => name.parse::<TaskStatus>().map_err(|_| {
                let known: Vec<&str> = TaskStatus::ALL
                    .iter()
                    .map(|status| status.as_str())
                    .collect();
                ApiError::BadRequest(format!(
                    "status: {name:?} is not a task status; the statuses are {}",
                    known.join(", ")
                ))
            }),
        })
        .collect()
}

impl TaskListQuery {
    fn filter(&self) -> ApiResult<TaskFilter> {
        let flags = [
            ("queued", &self.queued, TaskStatus::Queued),
            ("preparing", &self.preparing, TaskStatus::Preparing),
            ("running", &self.running, TaskStatus::Running),
            ("complete", &self.complete, TaskStatus::Complete),
            ("error", &self.error, TaskStatus::Error),
            ("cancelled", &self.cancelled, TaskStatus::Cancelled),
            // IronWorker's `killed` has no status of its own here: a killed task is cancelled.
            ("killed", &self.killed, TaskStatus::Cancelled),
            ("timeout", &self.timeout, TaskStatus::Timeout),
        ];
        let mut statuses = match &self.status {
            Some(text) => parse_statuses(text)?,
            None => Vec::new(),
        };
        for (name, value, status) in flags {
            if flag(name, value)? {
                statuses.push(status);
            }
        }
        statuses.sort();
        statuses.dedup();
        let time = |field: &str, seconds: Option<i64>| {
            seconds
                .map(|seconds| wire::parse_time(field, &serde_json::Value::from(seconds)))
                .transpose()
        };
        Ok(TaskFilter {
            code_name: self.code_name.clone().filter(|name| !name.is_empty()),
            label: self.label.clone().filter(|label| !label.is_empty()),
            statuses,
            from_time: time("from_time", self.from_time)?,
            to_time: time("to_time", self.to_time)?,
        })
    }
}

/// List tasks, newest first.
#[utoipa::path(get, path = "/2/projects/{project_id}/tasks", tag = "tasks",
    params(("project_id" = String, Path), TaskListQuery),
    responses((status = 200, body = v2::TaskList), (status = 400, body = v2::Message)))]
pub async fn list(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiQuery(query): ApiQuery<TaskListQuery>,
) -> ApiResult<Json<v2::TaskList>> {
    let page = Paging {
        page: query.page,
        per_page: query.per_page,
        oauth: None,
    }
    .page()?;
    let tasks = state
        .store
        .list_tasks(&access.project_id, &query.filter()?, page)
        .await?;
    Ok(Json(v2::TaskList {
        tasks: tasks.iter().map(wire::task_info).collect(),
    }))
}

/// Show a task.
#[utoipa::path(get, path = "/2/projects/{project_id}/tasks/{task_id}", tag = "tasks",
    params(("project_id" = String, Path), ("task_id" = String, Path)),
    responses((status = 200, body = v2::TaskInfo), (status = 404, body = v2::Message)))]
pub async fn show(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, task_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::TaskInfo>> {
    let task = state.store.get_task(&access.project_id, &task_id).await?;
    let attempts = state
        .store
        .task_attempts(&access.project_id, &task_id)
        .await?;
    let mut info = wire::task_info(&task);
    info.attempts = Some(attempts.iter().map(wire::task_attempt_info).collect());
    Ok(Json(info))
}

/// Cancel a task: a queued one at once, a running one is killed by its runner.
#[utoipa::path(post, path = "/2/projects/{project_id}/tasks/{task_id}/cancel", tag = "tasks",
    params(("project_id" = String, Path), ("task_id" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 404, body = v2::Message), (status = 409, body = v2::Message)))]
pub async fn cancel(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, task_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::Message>> {
    let task = state
        .store
        .cancel_task(&access.project_id, &task_id, state.clock.now())
        .await?;
    // A queued task is cancelled at once; a leased one when its runner completes it.
    stevedore_metrics::task_finished(task.status, &task.code_name);
    Ok(message("Cancelled"))
}

/// Queue a task again as a new task (same code revision, payload and settings), whatever its
/// status; 409 once retention removed its payload.
#[utoipa::path(post, path = "/2/projects/{project_id}/tasks/{task_id}/retry", tag = "tasks",
    params(("project_id" = String, Path), ("task_id" = String, Path)),
    request_body = v2::Retry,
    responses((status = 200, body = v2::TasksQueued), (status = 404, body = v2::Message),
        (status = 409, body = v2::Message)))]
pub async fn retry(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, task_id)): Path<(String, String)>,
    ApiJson(request): ApiJson<v2::Retry>,
) -> ApiResult<Json<v2::TasksQueued>> {
    let delay_secs = wire::bounded(
        "delay",
        request.delay,
        0,
        0,
        stevedore_model::limits::MAX_DELAY_SECS,
    )?;
    let queued = retry_task(&state, &access.project_id, &task_id, delay_secs).await?;
    Ok(queued_reply(queued))
}

/// Queues a copy of a task as a new task after `delay_secs`, whatever the task's status: as
/// IronWorker did, a retry of a task still queued or running runs the same code revision and
/// payload again beside it (the original is left alone). The API's `retry` and the
/// dashboard's retry button both end here.
pub async fn retry_task(
    state: &AppState,
    project_id: &str,
    task_id: &str,
    delay_secs: u32,
) -> ApiResult<Vec<Task>> {
    let task = state.store.get_task(project_id, task_id).await?;
    // Its payload is what a retry runs again: without it the retry would run something else.
    if task.payload_removed_at.is_some() {
        return Err(ApiError::Conflict(format!(
            "task {task_id} cannot be retried: retention removed its payload; queue a new task \
             with the payload"
        )));
    }
    // The task's cluster may have gone since it ran: checked again, as at every queueing.
    super::clusters::check_task_clusters(state, project_id, [task.cluster.as_str()]).await?;
    let retry = NewTask::retry_of(&task, delay_secs);
    let queued = state
        .store
        .enqueue(project_id, &[retry], state.clock.now())
        .await?;
    state.tasks_queued();
    Ok(queued)
}

/// Set a task's progress: a percentage and a message.
#[utoipa::path(post, path = "/2/projects/{project_id}/tasks/{task_id}/progress", tag = "tasks",
    params(("project_id" = String, Path), ("task_id" = String, Path)),
    request_body = v2::Progress,
    responses((status = 200, body = v2::Message), (status = 400, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn progress(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, task_id)): Path<(String, String)>,
    ApiJson(request): ApiJson<v2::Progress>,
) -> ApiResult<Json<v2::Message>> {
    let percent = request
        .percent
        .map(|percent| {
            stevedore_model::validation::check_range("percent", percent, 0, 100)?;
            u8::try_from(percent)
                .map_err(|_| stevedore_model::ValidationError::new("percent", "out of range"))
        })
        .transpose()?;
    if request.msg.as_ref().is_some_and(|msg| msg.len() > 4096) {
        return Err(ApiError::BadRequest(
            "msg: must be at most 4096 bytes".into(),
        ));
    }
    state
        .store
        .set_progress(
            &access.project_id,
            &task_id,
            percent,
            request.msg.as_deref(),
            state.clock.now(),
        )
        .await?;
    Ok(message("Progress set"))
}

/// IronWorker's answer to queueing: the new tasks' ids.
fn queued_reply(queued: Vec<stevedore_model::Task>) -> Json<v2::TasksQueued> {
    Json(v2::TasksQueued {
        msg: "Queued up".to_owned(),
        tasks: queued
            .into_iter()
            .map(|task| v2::IdOnly { id: task.id })
            .collect(),
    })
}
