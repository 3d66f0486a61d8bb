//! The dashboard's pages and the forms they post. Each handler reads or acts for the
//! session's project through the store and the API's own functions, then renders a template
//! from `templates/dashboard`.

use askama::Template;
use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{Redirect, Response};
use serde::Deserialize;
use stevedore_api_types::v2;
use stevedore_model::TaskStatus;
use stevedore_store::{Page, StatsWindow, TaskFilter};

use super::{PageForm, PageQuery, PageResult, Session, render};
use crate::AppState;
use crate::api::logs::{StreamShutdown, event_stream, resume_offset};
use crate::api::{clusters, tasks as task_api};
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::usage::{self, UsageParams};
use crate::wire;

/// Tasks on one page of the task list.
const TASKS_PER_PAGE: u32 = 50;
/// Codes and schedules listed (newest first); a project with more sees the newest.
const LIST_LIMIT: u32 = 100;

/// What every page's layout shows: the signed-in project and which nav entry is current.
struct Chrome {
    project_name: String,
    project_id: String,
    current: &'static str,
}

impl Chrome {
    fn new(session: &Session, current: &'static str) -> Chrome {
        Chrome {
            project_name: session.project.name.clone(),
            project_id: session.project.id.clone(),
            current,
        }
    }
}

// === overview ===

#[derive(Template)]
#[template(path = "dashboard/overview.html")]
struct OverviewPage {
    chrome: Chrome,
}

pub async fn overview(session: Session) -> Response {
    render(&OverviewPage {
        chrome: Chrome::new(&session, "overview"),
    })
}

/// The overview's chart data: the project's usage report for the window the page asks for
/// (the API's `GET usage` parameters), as JSON.
pub async fn usage_json(
    State(state): State<AppState>,
    session: Session,
    ApiQuery(params): ApiQuery<UsageParams>,
) -> Result<Json<v2::UsageReport>, ApiError> {
    Ok(Json(
        usage::report(&state, &session.project.id, &params).await?,
    ))
}

// === codes ===

#[derive(Template)]
#[template(path = "dashboard/codes.html")]
struct CodesPage {
    chrome: Chrome,
    codes: Vec<v2::CodeInfo>,
}

pub async fn codes(State(state): State<AppState>, session: Session) -> PageResult<Response> {
    let codes = list_codes(&state, &session).await?;
    Ok(render(&CodesPage {
        chrome: Chrome::new(&session, "codes"),
        codes,
    }))
}

#[derive(Template)]
#[template(path = "dashboard/code.html")]
struct CodePage {
    chrome: Chrome,
    code: v2::CodeInfo,
    counts: Vec<(&'static str, u64)>,
    revisions: Vec<v2::CodeInfo>,
    tasks: Vec<v2::TaskInfo>,
    code_names: Vec<String>,
}

pub async fn code(
    State(state): State<AppState>,
    session: Session,
    Path(code_id): Path<String>,
) -> PageResult<Response> {
    let project_id = &session.project.id;
    let code = state.store.get_code(project_id, &code_id).await?;
    let stats = state
        .store
        .code_stats(project_id, &code_id, StatsWindow::default())
        .await?;
    let revisions = state
        .store
        .list_revisions(project_id, &code_id, first_page(10))
        .await?;
    let filter = TaskFilter {
        code_name: Some(code.spec.name.clone()),
        ..TaskFilter::default()
    };
    let tasks = state
        .store
        .list_tasks(project_id, &filter, first_page(20))
        .await?;
    Ok(render(&CodePage {
        chrome: Chrome::new(&session, "codes"),
        code_names: vec![code.spec.name.clone()],
        code: wire::code_info(&code),
        counts: stats
            .by_status
            .into_iter()
            .map(|(status, count)| (status.as_str(), count))
            .collect(),
        revisions: revisions.iter().map(wire::revision_info).collect(),
        tasks: tasks.iter().map(wire::task_info).collect(),
    }))
}

pub async fn pause_code(
    State(state): State<AppState>,
    session: Session,
    Path(code_id): Path<String>,
) -> PageResult<Redirect> {
    set_paused(&state, &session, &code_id, true).await
}

pub async fn resume_code(
    State(state): State<AppState>,
    session: Session,
    Path(code_id): Path<String>,
) -> PageResult<Redirect> {
    set_paused(&state, &session, &code_id, false).await
}

async fn set_paused(
    state: &AppState,
    session: &Session,
    code_id: &str,
    paused: bool,
) -> PageResult<Redirect> {
    state
        .store
        .set_code_paused(&session.project.id, code_id, paused, state.clock.now())
        .await?;
    if !paused {
        // Tasks that waited on the pause can be leased now.
        state.tasks_queued();
    }
    Ok(Redirect::to(&format!("/ui/codes/{code_id}")))
}

// === tasks ===

/// `/ui/tasks?status=&code=&page=`: one status (empty for all), one code name, a page from 0.
#[derive(Debug, Default, Deserialize)]
pub struct TaskListQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    page: u32,
}

impl TaskListQuery {
    fn filter(&self) -> PageResult<TaskFilter> {
        let statuses = if self.status.is_empty() {
            Vec::new()
        } else {
            let status: TaskStatus = self.status.parse().map_err(|_| {
                ApiError::BadRequest(format!(
                    "status must be one of {}, got {:?}",
                    TaskStatus::ALL
                        .iter()
                        .map(|status| status.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.status
                ))
            })?;
            vec![status]
        };
        Ok(TaskFilter {
            code_name: Some(self.code.clone()).filter(|name| !name.is_empty()),
            statuses,
            ..TaskFilter::default()
        })
    }

    /// This list's query string with another page.
    fn with_page(&self, page: u32) -> String {
        format!(
            "status={}&code={}&page={page}",
            urlencode(&self.status),
            urlencode(&self.code)
        )
    }
}

#[derive(Template)]
#[template(path = "dashboard/tasks.html")]
struct TasksPage {
    chrome: Chrome,
    tasks: Vec<v2::TaskInfo>,
    /// Each status with whether the filter selects it.
    statuses: Vec<(&'static str, bool)>,
    /// Each code name with whether the filter selects it.
    code_filter: Vec<(String, bool)>,
    code_names: Vec<String>,
    page: u32,
    rows_query: String,
    newer_query: Option<String>,
    older_query: Option<String>,
}

#[derive(Template)]
#[template(path = "dashboard/task_rows.html")]
struct TaskRows {
    tasks: Vec<v2::TaskInfo>,
}

pub async fn tasks(
    State(state): State<AppState>,
    session: Session,
    PageQuery(query): PageQuery<TaskListQuery>,
) -> PageResult<Response> {
    let tasks = list_tasks(&state, &session, &query).await?;
    let code_names: Vec<String> = list_codes(&state, &session)
        .await?
        .into_iter()
        .map(|code| code.name)
        .collect();
    let full = u32::try_from(tasks.len()).unwrap_or(u32::MAX) >= TASKS_PER_PAGE;
    Ok(render(&TasksPage {
        chrome: Chrome::new(&session, "tasks"),
        statuses: TaskStatus::ALL
            .iter()
            .map(|status| (status.as_str(), status.as_str() == query.status))
            .collect(),
        code_filter: code_names
            .iter()
            .map(|name| (name.clone(), *name == query.code))
            .collect(),
        code_names,
        page: query.page,
        rows_query: query.with_page(query.page),
        newer_query: query.page.checked_sub(1).map(|page| query.with_page(page)),
        older_query: full.then(|| query.with_page(query.page + 1)),
        tasks,
    }))
}

/// The task list's rows alone, which the list page reloads every few seconds.
pub async fn task_rows(
    State(state): State<AppState>,
    session: Session,
    PageQuery(query): PageQuery<TaskListQuery>,
) -> PageResult<Response> {
    let tasks = list_tasks(&state, &session, &query).await?;
    Ok(render(&TaskRows { tasks }))
}

/// The queue form: a code, a payload, and optionally what the API's task fields set.
#[derive(Debug, Deserialize)]
pub struct QueueForm {
    #[serde(default)]
    code: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    priority: String,
    #[serde(default)]
    delay: String,
    #[serde(default)]
    label: String,
}

/// Queues one task through the API's own path and goes to its page.
pub async fn queue_task(
    State(state): State<AppState>,
    session: Session,
    PageForm(form): PageForm<QueueForm>,
) -> PageResult<Redirect> {
    if form.code.trim().is_empty() {
        return Err(ApiError::BadRequest("choose a code to run".into()).into());
    }
    let number = |field: &str, value: &str| -> PageResult<Option<i64>> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(None);
        }
        value.parse().map(Some).map_err(|_| {
            ApiError::BadRequest(format!("{field} must be a whole number, got {value:?}")).into()
        })
    };
    let request = v2::TaskCreate {
        code_name: Some(form.code.trim().to_owned()),
        payload: Some(serde_json::Value::String(form.payload)),
        priority: number("priority", &form.priority)?,
        timeout: None,
        delay: number("delay", &form.delay)?,
        label: Some(form.label.trim().to_owned()).filter(|label| !label.is_empty()),
        cluster: None,
        ..v2::TaskCreate::default()
    };
    let queued = task_api::queue_tasks(&state, &session.project.id, vec![request]).await?;
    let task = queued
        .first()
        .ok_or_else(|| ApiError::Internal("queuing one task returned none".into()))?;
    Ok(Redirect::to(&format!("/ui/tasks/{}", task.id)))
}

#[derive(Template)]
#[template(path = "dashboard/task.html")]
struct TaskPage {
    chrome: Chrome,
    task: v2::TaskInfo,
    finished: bool,
}

pub async fn task(
    State(state): State<AppState>,
    session: Session,
    Path(task_id): Path<String>,
) -> PageResult<Response> {
    let task = state.store.get_task(&session.project.id, &task_id).await?;
    Ok(render(&TaskPage {
        chrome: Chrome::new(&session, "tasks"),
        finished: task.status.is_terminal(),
        task: wire::task_info(&task),
    }))
}

/// The task page's live feed: the API's log stream, under the session instead of a token.
pub async fn task_events(
    State(state): State<AppState>,
    session: Session,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    shutdown: Option<Extension<StreamShutdown>>,
) -> PageResult<Response> {
    let offset = resume_offset(&headers, None)?;
    Ok(event_stream(
        &state,
        &session.project.id,
        &session.token_id,
        &task_id,
        offset,
        shutdown,
    )
    .await?)
}

pub async fn cancel_task(
    State(state): State<AppState>,
    session: Session,
    Path(task_id): Path<String>,
) -> PageResult<Redirect> {
    state
        .store
        .cancel_task(&session.project.id, &task_id, state.clock.now())
        .await?;
    Ok(Redirect::to(&format!("/ui/tasks/{task_id}")))
}

pub async fn retry_task(
    State(state): State<AppState>,
    session: Session,
    Path(task_id): Path<String>,
) -> PageResult<Redirect> {
    let queued = task_api::retry_task(&state, &session.project.id, &task_id, 0).await?;
    let task = queued
        .first()
        .ok_or_else(|| ApiError::Internal("a retry queued no task".into()))?;
    Ok(Redirect::to(&format!("/ui/tasks/{}", task.id)))
}

// === schedules ===

#[derive(Template)]
#[template(path = "dashboard/schedules.html")]
struct SchedulesPage {
    chrome: Chrome,
    schedules: Vec<v2::ScheduleInfo>,
}

pub async fn schedules(State(state): State<AppState>, session: Session) -> PageResult<Response> {
    let schedules = state
        .store
        .list_schedules(&session.project.id, first_page(LIST_LIMIT))
        .await?;
    Ok(render(&SchedulesPage {
        chrome: Chrome::new(&session, "schedules"),
        schedules: schedules.iter().map(wire::schedule_info).collect(),
    }))
}

pub async fn cancel_schedule(
    State(state): State<AppState>,
    session: Session,
    Path(schedule_id): Path<String>,
) -> PageResult<Redirect> {
    state
        .store
        .cancel_schedule(&session.project.id, &schedule_id, state.clock.now())
        .await?;
    Ok(Redirect::to("/ui/schedules"))
}

// === runners and clusters ===

#[derive(Template)]
#[template(path = "dashboard/runners.html")]
struct RunnersPage {
    chrome: Chrome,
    clusters: Vec<ClusterView>,
}

struct ClusterView {
    info: v2::ClusterInfo,
    stats: v2::ClusterStats,
    /// Slots in use as a share of capacity, 0 to 100, for the bar.
    use_percent: u64,
}

pub async fn runners(State(state): State<AppState>, session: Session) -> PageResult<Response> {
    let project_id = session.project.id.as_str();
    let mut views = Vec::new();
    for info in clusters::visible_clusters(&state, Some(project_id)).await? {
        let stats = clusters::cluster_stats(&state, Some(project_id), &info.id).await?;
        let use_percent = (stats.in_use * 100)
            .checked_div(stats.capacity)
            .unwrap_or(0)
            .min(100);
        views.push(ClusterView {
            info,
            stats,
            use_percent,
        });
    }
    Ok(render(&RunnersPage {
        chrome: Chrome::new(&session, "runners"),
        clusters: views,
    }))
}

// === helpers ===

fn first_page(per_page: u32) -> Page {
    Page { page: 1, per_page }
}

async fn list_codes(state: &AppState, session: &Session) -> PageResult<Vec<v2::CodeInfo>> {
    let codes = state
        .store
        .list_codes(&session.project.id, first_page(LIST_LIMIT))
        .await?;
    Ok(codes.iter().map(wire::code_info).collect())
}

async fn list_tasks(
    state: &AppState,
    session: &Session,
    query: &TaskListQuery,
) -> PageResult<Vec<v2::TaskInfo>> {
    let page = Page {
        page: query.page.saturating_add(1),
        per_page: TASKS_PER_PAGE,
    };
    let tasks = state
        .store
        .list_tasks(&session.project.id, &query.filter()?, page)
        .await?;
    Ok(tasks.iter().map(wire::task_info).collect())
}

/// Percent-encodes a query-string value.
fn urlencode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_keep_their_filters_across_pages() {
        let query = TaskListQuery {
            status: "complete".into(),
            code: "hello world".into(),
            page: 2,
        };
        assert_eq!(
            query.with_page(3),
            "status=complete&code=hello%20world&page=3"
        );
        assert!(query.filter().is_ok());
        let bad = TaskListQuery {
            status: "finished".into(),
            ..TaskListQuery::default()
        };
        let Err(crate::dashboard::PageError(ApiError::BadRequest(message))) = bad.filter() else {
            panic!("an unknown status is a bad request");
        };
        assert!(message.contains("complete"), "{message}");
    }
}
