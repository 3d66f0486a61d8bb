//! `GET /metrics`: the Prometheus exposition of this process, and the HTTP request metrics.
//!
//! What the server records itself goes through `stevedore_metrics`' helpers (the one list of
//! names): finished tasks in the runner protocol and the API's cancel, lease calls and log
//! bytes of the runner protocol, and every request through [`track_requests`]. The store's
//! task counts, the bytes it holds (`retention::stored_bytes`) and the runners online per
//! cluster are gauges read from the store at each scrape, so any server sharing the database
//! reports the same values.
//!
//! The exposition carries counts and bounded names, never payloads or ids; but those names
//! (codes, clusters) are every project's, so on the API's address it asks for an admin token
//! unless the operator turns `token_required` off. A scraper without a token is served on
//! an address of its own ([`scrape_router`], `metrics.listen`), which the operator binds where
//! only the scraper reaches.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use stevedore_metrics::ClusterGauge;
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_store::TokenRole;

use crate::AppState;
use crate::auth::authenticate;
use crate::error::{ApiError, ApiResult};

/// Who may read `/metrics` on the API's address.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Ask for an admin token (the default); off, anyone who reaches the API may scrape.
    pub token_required: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            token_required: true,
        }
    }
}

/// The route label of requests that matched no route, so that probes of random paths do not
/// grow the label set.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// `GET /metrics`: refreshes the gauges read from the store, then renders everything this
/// process recorded.
pub async fn scrape(State(state): State<AppState>, request: Request) -> ApiResult<Response> {
    if state.config.metrics.token_required {
        let (parts, _) = request.into_parts();
        let token = authenticate(&parts, &state).await?;
        if token.role != TokenRole::Admin {
            return Err(ApiError::Forbidden(
                "/metrics on the API's address needs an admin token (`stevedore token create --role admin`); \
                 or serve it on an address of its own with `metrics.listen`"
                    .into(),
            ));
        }
    }
    open_scrape(State(state)).await
}

/// `GET /metrics` without a token, for the address of its own the operator gave scrapers.
async fn open_scrape(State(state): State<AppState>) -> ApiResult<Response> {
    refresh_store_gauges(&state).await?;
    exposition()
}

/// A router with only `GET /metrics`, open, for `metrics.listen`: the same exposition as the
/// API's, store gauges included.
pub fn scrape_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(open_scrape))
        .with_state(state)
}

/// A router with only `GET /metrics`, for a process without the API (a remote runner): what
/// that process recorded, nothing read from a store.
pub fn exporter_router() -> Router {
    Router::new().route("/metrics", get(|| async { exposition() }))
}

/// Middleware: counts every request by method, route template and status, and times it.
/// The route is axum's template (`/2/projects/{project_id}/tasks`), so ids never become
/// labels.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || UNMATCHED_ROUTE.to_owned(),
        |path| path.as_str().to_owned(),
    );
    let began = Instant::now();
    let response = next.run(request).await;
    stevedore_metrics::http_request(&method, &route, response.status().as_u16(), began.elapsed());
    response
}

/// The store's task counts, the bytes it holds and the runners online in every cluster, as
/// gauges.
async fn refresh_store_gauges(state: &AppState) -> ApiResult<()> {
    let now = state.clock.now();
    let gauges = state.store.gauges(now).await?;
    stevedore_metrics::store_gauges(&gauges.by_status, &gauges.queue_depth);
    stevedore_metrics::stored_bytes(&crate::retention::stored_bytes(state.store.as_ref()).await?);

    // A project's own cluster is labelled `project/name`: its name alone may be a shared
    // cluster's too.
    let mut names = vec![(DEFAULT_CLUSTER.to_owned(), None)];
    names.extend(
        state
            .store
            .list_clusters(None)
            .await?
            .into_iter()
            .map(|cluster| (cluster.spec.name, cluster.project_id)),
    );
    let online_since = state.config.runner_api.online_since(now);
    let mut clusters = Vec::with_capacity(names.len());
    for (name, owner) in names {
        let load = state
            .store
            .cluster_load(&name, owner.as_deref(), None, online_since, now)
            .await?;
        clusters.push(ClusterGauge {
            cluster: match owner {
                Some(project_id) => format!("{project_id}/{name}"),
                None => name,
            },
            runners: u64::try_from(load.runners.len()).unwrap_or(u64::MAX),
            capacity: load.capacity(),
            busy: load.in_use(),
        });
    }
    stevedore_metrics::cluster_gauges(&clusters);
    Ok(())
}

fn exposition() -> ApiResult<Response> {
    let text =
        stevedore_metrics::render().map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok((
        [(
            CONTENT_TYPE,
            HeaderValue::from_static(stevedore_metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response())
}
