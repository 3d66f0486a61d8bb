//! The runner protocol, `/runner/v1/...`: remote runners lease tasks and report on them over
//! HTTP. Every handler checks its request and hands it to the server's [`LeaseDesk`], which
//! the embedded runner's task source calls too, so both kinds of runner share one lease
//! logic; the server's clock is "now" for all of them.
//!
//! Wire formats are in `stevedore_api_types::runner`. A stale lease token is the store's
//! `StaleLease`, answered 409 by the error table; what the desk refuses is a 400.
//!
//! [`LeaseDesk`]: crate::lease_desk::LeaseDesk

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use stevedore_api_types::runner as wire;
use stevedore_api_types::v2::Message;
use stevedore_model::LeaseRequest;
use stevedore_store::RunnerSeen;

use crate::api::logs::StreamShutdown;
use crate::auth::RunnerAccess;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, read_body};
use crate::lease_desk::GiveBack;
use crate::{AppState, ServerConfig};

/// The routes under `/runner/v1`.
pub fn routes(_config: &ServerConfig) -> Router<AppState> {
    Router::new()
        .route("/lease", post(lease))
        .route("/tasks/{task_id}/heartbeat", post(heartbeat))
        .route("/tasks/{task_id}/running", post(running))
        .route("/tasks/{task_id}/log", post(append_log))
        .route("/tasks/{task_id}/progress", post(progress))
        .route("/tasks/{task_id}/complete", post(complete))
        .route("/tasks/{task_id}/requeue", post(requeue))
        .route("/tasks/{task_id}/package", get(task_package))
        .route("/runners/{runner_id}/release", post(release))
        .route("/runners/gone", post(gone_runners))
}

/// `POST /runner/v1/lease`: up to `max_tasks` tasks of the runner's clusters. With nothing to
/// hand out it waits up to `wait_ms` (capped), woken at once by tasks queued through this
/// server and looking again every `poll_interval` for tasks queued elsewhere or become due.
pub async fn lease(
    State(state): State<AppState>,
    access: RunnerAccess,
    shutdown: Option<Extension<StreamShutdown>>,
    ApiJson(request): ApiJson<wire::LeaseRequest>,
) -> ApiResult<Json<wire::LeaseResponse>> {
    let config = &state.config.runner_api;
    let wait = Duration::from_millis(request.wait_ms).min(config.max_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let capacity = request.capacity.unwrap_or(request.max_tasks);
    let mut lease = LeaseRequest {
        runner_id: request.runner_id,
        clusters: request.clusters,
        max_tasks: request.max_tasks,
        lease_secs: request.lease_secs,
        owner: None,
    };
    // Names first (a 400 for what makes no sense), then whether this token may serve them.
    lease.validate()?;
    lease.owner = access.lease_owner(&state, &lease.clusters).await?;
    let mut recorded = false;
    let stopping = shutdown.map(|Extension(StreamShutdown(token))| token);
    loop {
        // Registered before looking, so a task queued in between still wakes this request.
        let woken = state.lease_wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let leased = state.desk.lease(&lease).await?;
        if !recorded {
            // After the first lease, which refused a request that makes no sense.
            state
                .desk
                .record_runner(&RunnerSeen {
                    id: lease.runner_id.clone(),
                    clusters: lease.clusters.clone(),
                    capacity,
                    owner: lease.owner.clone(),
                })
                .await?;
            recorded = true;
        }
        let stopped = stopping.as_ref().is_some_and(|token| token.is_cancelled());
        if !leased.is_empty() || tokio::time::Instant::now() >= deadline || stopped {
            let tasks = leased
                .into_iter()
                .map(|leased| wire::LeasedTask {
                    task: leased.task,
                    code: leased.code,
                    lease_token: leased.lease.token,
                    expires_at: leased.lease.expires_at,
                    registry_credential: leased.registry_credential,
                })
                .collect();
            return Ok(Json(wire::LeaseResponse { tasks }));
        }
        let stop = async {
            match &stopping {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut woken => {}
            () = tokio::time::sleep(config.poll_interval) => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = stop => {}
        }
    }
}

/// `POST /runner/v1/tasks/{id}/heartbeat`: extends the lease, tells of a cancel.
pub async fn heartbeat(
    State(state): State<AppState>,
    _access: RunnerAccess,
    Path(task_id): Path<String>,
    ApiJson(request): ApiJson<wire::Heartbeat>,
) -> ApiResult<Json<wire::HeartbeatReply>> {
    let reply = state
        .desk
        .heartbeat(&task_id, request.token, request.lease_secs)
        .await?;
    Ok(Json(reply))
}

/// `POST /runner/v1/tasks/{id}/running`: the container started.
pub async fn running(
    State(state): State<AppState>,
    _access: RunnerAccess,
    Path(task_id): Path<String>,
    ApiJson(request): ApiJson<wire::Fenced>,
) -> ApiResult<Json<Message>> {
    state.desk.mark_running(&task_id, request.token).await?;
    Ok(ack("running"))
}

fn header_number<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> ApiResult<T> {
    let value = headers
        .get(name)
        .ok_or_else(|| ApiError::BadRequest(format!("the {name} header is required")))?;
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| ApiError::BadRequest(format!("the {name} header must be a number")))
}

/// `POST /runner/v1/tasks/{id}/log`: the body is the log bytes, verbatim.
pub async fn append_log(
    State(state): State<AppState>,
    _access: RunnerAccess,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<wire::LogAppended>> {
    let token: i64 = header_number(&headers, wire::LEASE_TOKEN_HEADER)?;
    let cap: u64 = header_number(&headers, wire::LOG_CAP_HEADER)?;
    let bytes = read_body(body, state.config.runner_api.max_log_chunk_bytes).await?;
    let size = state.desk.append_log(&task_id, token, &bytes, cap).await?;
    stevedore_metrics::runner_api_log_bytes(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    Ok(Json(wire::LogAppended { size }))
}

/// `POST /runner/v1/tasks/{id}/progress`.
pub async fn progress(
    State(state): State<AppState>,
    _access: RunnerAccess,
    Path(task_id): Path<String>,
    ApiJson(request): ApiJson<wire::ProgressReport>,
) -> ApiResult<Json<Message>> {
    if request.percent.is_some_and(|percent| percent > 100) {
        return Err(ApiError::BadRequest(
            "percent must be between 0 and 100".into(),
        ));
    }
    state
        .desk
        .progress(
            &task_id,
            request.token,
            request.percent,
            request.msg.as_deref(),
        )
        .await?;
    Ok(ack("progress recorded"))
}

/// `POST /runner/v1/tasks/{id}/complete`: the terminal result, once.
pub async fn complete(
    State(state): State<AppState>,
    _access: RunnerAccess,
    Path(task_id): Path<String>,
    ApiJson(request): ApiJson<wire::Complete>,
) -> ApiResult<Json<Message>> {
    let status = state
        .desk
        .complete(&task_id, request.token, &request.outcome, &request.report)
        .await?;
    Ok(ack(format!("task is {status}")))
}

/// `POST /runner/v1/tasks/{id}/requeue`: back to the queue after an infrastructure failure.
pub async fn requeue(
    State(state): State<AppState>,
    _access: RunnerAccess,
    Path(task_id): Path<String>,
    ApiJson(request): ApiJson<wire::Requeue>,
) -> ApiResult<Json<Message>> {
    let give_back = GiveBack {
        reason: request.reason,
        delay: Duration::from_millis(request.delay_ms),
        max_infra_attempts: request.max_infra_attempts,
    };
    let status = state
        .desk
        .requeue(&task_id, request.token, &give_back)
        .await?;
    Ok(ack(format!("task is {status}")))
}

/// `POST /runner/v1/runners/{id}/release`: a runner starting again gives back the tasks it
/// held. A project's runner token gives back only that project's.
pub async fn release(
    State(state): State<AppState>,
    access: RunnerAccess,
    Path(runner_id): Path<String>,
    ApiJson(request): ApiJson<wire::Release>,
) -> ApiResult<Json<wire::Released>> {
    let owner = access.project_scope();
    let released = state
        .desk
        .release_runner(&runner_id, owner, request.max_infra_attempts)
        .await?;
    Ok(Json(wire::Released { released }))
}

/// `POST /runner/v1/runners/gone`: which of the runners named are gone (unseen for the online
/// window, no live lease), so that a runner sharing their engine may remove their containers.
/// A project's runner token is answered about that project's runners only.
pub async fn gone_runners(
    State(state): State<AppState>,
    access: RunnerAccess,
    ApiJson(request): ApiJson<wire::GoneQuery>,
) -> ApiResult<Json<wire::Gone>> {
    let gone = state
        .desk
        .gone_runners(
            &request.runner_ids,
            access.project_scope(),
            state.config.runner_api.online_window,
        )
        .await?;
    Ok(Json(wire::Gone { gone }))
}

/// `GET /runner/v1/tasks/{id}/package`: the zip package of the code revision the task pinned,
/// for the holder of its lease only (the token in the `stevedore-lease-token` header): a
/// runner token alone opens no project's code.
pub async fn task_package(
    State(state): State<AppState>,
    _access: RunnerAccess,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let token: i64 = header_number(&headers, wire::LEASE_TOKEN_HEADER)?;
    let package = state.desk.task_package(&task_id, token).await?;
    let (size, body) = crate::package::package_body(package);
    Ok((
        [
            (CONTENT_TYPE, HeaderValue::from_static("application/zip")),
            (CONTENT_LENGTH, HeaderValue::from(size)),
        ],
        body,
    )
        .into_response())
}

fn ack(text: impl Into<String>) -> Json<Message> {
    Json(Message { msg: text.into() })
}
