//! The OpenAPI document of the whole API, served at `/openapi.json`.

use axum::Json;
use utoipa::OpenApi;

use crate::api::{clusters, codes, credentials, logs, projects, schedules, stacks, tasks, usage};

#[derive(OpenApi)]
#[openapi(
    info(title = "stevedore", description = "IronWorker API v2, served by stevedore. Authenticate with `Authorization: OAuth <token>`."),
    paths(
        projects::show, projects::set_quotas,
        codes::upload, codes::list, codes::show, codes::revisions, codes::download, codes::delete,
        codes::cancel_all, codes::pause, codes::resume, codes::stats,
        tasks::queue, tasks::webhook, tasks::list, tasks::show, logs::log, logs::stream, logs::outlog, tasks::cancel,
        tasks::retry, tasks::progress,
        schedules::create, schedules::list, schedules::show, schedules::update, schedules::cancel,
        stacks::list,
        clusters::list, clusters::show, clusters::create, clusters::update, clusters::delete,
        clusters::stats, clusters::runner_token,
        usage::usage,
        credentials::store, credentials::list, credentials::delete,
    ),
    tags(
        (name = "projects", description = "The project a token belongs to"),
        (name = "codes", description = "Worker code and its revisions"),
        (name = "tasks", description = "Runs of a code with a payload"),
        (name = "schedules", description = "Tasks made on a timetable"),
        (name = "stacks", description = "Runtimes for zip packages"),
        (name = "clusters", description = "Named pools of runners that tasks can be routed to"),
        (name = "usage", description = "Finished tasks, compute time and queue waits over time"),
        (name = "credentials", description = "A project's credentials for private container registries"),
    )
)]
pub struct ApiDoc;

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
