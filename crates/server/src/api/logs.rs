//! Task logs: the whole log so far, the same log followed live as plain text
//! (`log?follow=true`, for `curl -N`), and as Server-Sent Events (`log/stream`).
//!
//! Both live forms are driven by `follow::LogFollower`, which polls the store. A stream ends
//! when its task has finished and every byte was sent; it is cut short, without an `end` event,
//! when the client goes away, when it reaches `LogStreamConfig::max_lifetime`, or when the
//! server shuts down. A client resumes from the last offset it received.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use serde::Deserialize;
use stevedore_api_types::v2;
use stevedore_model::Quota;
use stevedore_store::StoreError;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::auth::ProjectAccess;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, parse_flag};
use crate::follow::{Followed, LogFollower, LogText, TextDecoder};
use crate::streams::StreamSlot;
use crate::wire;

/// Asks reverse proxies (nginx and those that copy it) to pass a live stream on as it comes.
const NO_PROXY_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Cancelled when the server starts shutting down, so live streams end and let it finish.
#[derive(Debug, Clone, Default)]
pub struct StreamShutdown(pub CancellationToken);

/// `?follow=true&offset=N`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// `true` (or `1`): stream the log as it grows, as chunked plain text, until the task
    /// ends. Without it, the log so far (404 while there is none).
    #[param(value_type = Option<bool>)]
    pub follow: Option<String>,
    /// With `follow`: start at this byte offset of the log.
    #[param(value_type = Option<u64>)]
    pub offset: Option<String>,
}

/// `?offset=N`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct LogStreamQuery {
    /// Start at this byte offset of the log; `Last-Event-ID` takes precedence.
    #[param(value_type = Option<u64>)]
    pub offset: Option<String>,
}

/// A task's log (stdout and stderr) as text: the log so far (404 while it has none), or with
/// `follow=true` the log streamed as it grows until the task ends. 410 once retention removed
/// the log of the finished task, with when.
#[utoipa::path(get, path = "/2/projects/{project_id}/tasks/{task_id}/log", tag = "tasks",
    params(("project_id" = String, Path), ("task_id" = String, Path), LogQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 400, body = v2::Message),
        (status = 404, body = v2::Message), (status = 410, body = v2::Message)))]
pub async fn log(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, task_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<LogQuery>,
    shutdown: Option<Extension<StreamShutdown>>,
) -> ApiResult<Response> {
    let follow = query
        .follow
        .as_deref()
        .map(|value| parse_flag("follow", value))
        .transpose()?;
    let offset = query
        .offset
        .as_deref()
        .map(|offset| parse_offset("offset", offset))
        .transpose()?;
    if follow != Some(true) {
        if offset.is_some() {
            return Err(ApiError::BadRequest(
                "offset applies only with follow=true".into(),
            ));
        }
        let log = match state.store.get_log(&access.project_id, &task_id).await {
            Ok(log) => log,
            // A finished task that printed nothing has an empty log, so that clients waiting
            // for a log stop waiting; 404 stays the answer while a task may still print.
            Err(StoreError::NotFound { .. })
                if state
                    .store
                    .get_task(&access.project_id, &task_id)
                    .await?
                    .status
                    .is_terminal() =>
            {
                Vec::new()
            }
            Err(error) => return Err(error.into()),
        };
        return Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], log).into_response());
    }
    let (follower, slot) = open(
        &state,
        &access.project_id,
        &access.token.id,
        &task_id,
        offset.unwrap_or(0),
    )
    .await?;
    let bytes = followed(follower, slot).filter_map(|item| async move {
        match item {
            Followed::Log { bytes, .. } => Some(Ok::<_, Infallible>(Bytes::from(bytes))),
            Followed::Status(_) | Followed::End(_) => None,
        }
    });
    let bytes = cut_short(bytes, &state, shutdown);
    Ok((
        [
            (CONTENT_TYPE, "text/plain; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
            (NO_PROXY_BUFFERING, "no"),
        ],
        Body::from_stream(bytes),
    )
        .into_response())
}

/// The task's output as IronWorker's `outlog` serves it (the clients' `stdout()`, which their
/// `run()` polls): the log, 404 while a task that may still print has none, and an empty
/// text once the task finished without printing anything, so a client waiting for the
/// output of a silent task stops waiting. 410 once retention removed the log.
#[utoipa::path(get, path = "/2/projects/{project_id}/tasks/{task_id}/outlog", tag = "tasks",
    params(("project_id" = String, Path), ("task_id" = String, Path)),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = v2::Message),
        (status = 410, body = v2::Message)))]
pub async fn outlog(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, task_id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let task = state.store.get_task(&access.project_id, &task_id).await?;
    let output = if task.status.is_terminal() && task.log_size == 0 {
        Vec::new()
    } else {
        state.store.get_log(&access.project_id, &task_id).await?
    };
    Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], output))
}

/// A task's log as Server-Sent Events, live until the task ends. `log`: `id` is the byte
/// offset after it, data `{"offset": N, "text": "..."}` (where the text begins; characters are
/// never split, invalid bytes are U+FFFD). `status`, on a change of status or progress:
/// `{"id", "status", "percent", "msg"}`. `end`, last: the finished task. A stream closed
/// without `end` was cut short (time limit, shutdown): reconnect with `Last-Event-ID`. 410
/// once retention removed the log.
#[utoipa::path(get, path = "/2/projects/{project_id}/tasks/{task_id}/log/stream", tag = "tasks",
    params(("project_id" = String, Path), ("task_id" = String, Path), LogStreamQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this byte offset (the `id` of the last `log` event).")),
    responses((status = 200, content_type = "text/event-stream", body = String), (status = 400, body = v2::Message),
        (status = 404, body = v2::Message), (status = 410, body = v2::Message)))]
pub async fn stream(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, task_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<LogStreamQuery>,
    headers: HeaderMap,
    shutdown: Option<Extension<StreamShutdown>>,
) -> ApiResult<Response> {
    let offset = resume_offset(&headers, query.offset.as_deref())?;
    event_stream(
        &state,
        &access.project_id,
        &access.token.id,
        &task_id,
        offset,
        shutdown,
    )
    .await
}

/// A task's log and status as Server-Sent Events from byte `offset` (see `stream`), counted
/// against the quota of `token_id`'s open streams: the API's stream and the dashboard's task
/// page both read this.
pub async fn event_stream(
    state: &AppState,
    project_id: &str,
    token_id: &str,
    task_id: &str,
    offset: u64,
    shutdown: Option<Extension<StreamShutdown>>,
) -> ApiResult<Response> {
    let (follower, slot) = open(state, project_id, token_id, task_id, offset).await?;
    let task_id = task_id.to_owned();
    let mut decoder = TextDecoder::starting_at(offset);
    let events = followed(follower, slot)
        .flat_map(move |item| stream::iter(events_of(item, &task_id, &mut decoder)));
    let events = cut_short(events, state, shutdown);
    let events = Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(state.config.log_stream.keep_alive)
            .text("keep-alive"),
    );
    Ok(([(NO_PROXY_BUFFERING, "no")], events).into_response())
}

/// The offset to start at: `Last-Event-ID` (a reconnecting client's progress) before
/// `?offset`, else 0.
pub fn resume_offset(headers: &HeaderMap, query_offset: Option<&str>) -> ApiResult<u64> {
    if let Some(value) = headers.get("last-event-id") {
        let value = value
            .to_str()
            .map_err(|_| ApiError::BadRequest("Last-Event-ID must be a byte offset".into()))?;
        if !value.trim().is_empty() {
            return parse_offset("Last-Event-ID", value);
        }
    }
    query_offset.map_or(Ok(0), |offset| parse_offset("offset", offset))
}

/// The events that tell a client about `item`.
fn events_of(
    item: Followed,
    task_id: &str,
    decoder: &mut TextDecoder,
) -> Vec<Result<Event, axum::Error>> {
    match item {
        Followed::Log { offset, bytes } => decoder
            .push(offset, &bytes)
            .map(log_event)
            .into_iter()
            .collect(),
        Followed::Status(state) => {
            vec![
                Event::default()
                    .event("status")
                    .json_data(serde_json::json!({
                        "id": task_id,
                        "status": state.status.as_str(),
                        "percent": state.percent,
                        "msg": state.msg,
                    })),
            ]
        }
        Followed::End(task) => {
            let end = Event::default()
                .event("end")
                .json_data(wire::task_info(&task));
            decoder
                .finish()
                .map(log_event)
                .into_iter()
                .chain([end])
                .collect()
        }
    }
}

fn log_event(text: LogText) -> Result<Event, axum::Error> {
    Event::default()
        .event("log")
        .id(text.end.to_string())
        .json_data(serde_json::json!({"offset": text.offset, "text": text.text}))
}

/// Opens a live stream for `token_id`: refused (429) when the token already holds its
/// project's `log_streams_per_token` open on this server.
async fn open(
    state: &AppState,
    project_id: &str,
    token_id: &str,
    task_id: &str,
    offset: u64,
) -> ApiResult<(LogFollower, StreamSlot)> {
    let limits = state.store.quota_limits(project_id).await?;
    let slot = state
        .streams
        .open(token_id, limits.get(Quota::LogStreamsPerToken))?;
    let follower = LogFollower::open(
        state.store.clone(),
        project_id,
        task_id,
        offset,
        state.config.log_stream.poll_interval,
    )
    .await?;
    Ok((follower, slot))
}

/// Everything the follower hands out, in order; ends after the task's end, or early (logged)
/// when the store fails. The stream holds `slot` until it is dropped.
fn followed(
    follower: LogFollower,
    slot: StreamSlot,
) -> impl Stream<Item = Followed> + Send + 'static {
    stream::unfold(Some((follower, slot)), |open| async move {
        let (mut follower, slot) = open?;
        match follower.next().await {
            Ok(Some(items)) => Some((stream::iter(items), Some((follower, slot)))),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "a log stream ended early: the store failed");
                None
            }
        }
    })
    .flatten()
}

/// Ends `items` at the server's limit on a stream's life, or when the server shuts down.
fn cut_short<S: Stream + Send + 'static>(
    items: S,
    state: &AppState,
    shutdown: Option<Extension<StreamShutdown>>,
) -> impl Stream<Item = S::Item> + Send + 'static {
    let lifetime: Duration = state.config.log_stream.max_lifetime;
    let shutdown = shutdown
        .map(|Extension(StreamShutdown(token))| token)
        .unwrap_or_default();
    items.take_until(async move {
        tokio::select! {
            () = tokio::time::sleep(lifetime) => {}
            () = shutdown.cancelled_owned() => {}
        }
    })
}

fn parse_offset(name: &str, value: &str) -> ApiResult<u64> {
    value.trim().parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "{name} must be a byte offset (a whole number, 0 or more), got {value:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values() {
        assert!(matches!(parse_flag("follow", "TRUE"), Ok(true)));
        assert!(matches!(parse_flag("follow", "0"), Ok(false)));
        assert!(parse_flag("follow", "maybe").is_err());
        assert!(matches!(parse_offset("offset", "42"), Ok(42)));
        for bad in ["-1", "1.5", "x", ""] {
            assert!(parse_offset("offset", bad).is_err(), "{bad}");
        }
    }
}
