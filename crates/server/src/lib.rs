//! stevedore's HTTP server: the IronWorker v2 API (`/2/...`) with token auth, the OpenAPI
//! document, and start-up bootstrapping of the first project.
//!
//! The server owns HTTP and nothing below it: every request is parsed and validated into
//! domain values (`wire`), handed to the `Store`, and answered from the result. Errors of every
//! layer meet in one table (`error`) that decides status codes and messages. `GET /metrics`
//! (`metrics`) exposes the process's Prometheus metrics. The leader (`leader`) runs the
//! scheduler, the rescuer and retention (`retention`), which `stevedore gc` also runs once.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod follow;
pub mod leader;
pub mod lease_desk;
pub mod metrics;
pub mod openapi;
pub mod package;
pub mod recent;
pub mod rescuer;
pub mod retention;
pub mod runner_api;
pub mod scheduler;
pub mod streams;
pub mod usage;
pub mod wire;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::{Extension, Router};
use stevedore_model::Clock;
use stevedore_store::{CredentialVault, Store};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower_http::trace::TraceLayer;

pub use config::{RunnerApiConfig, ServerConfig};
pub use lease_desk::{DeskError, GiveBack, LeaseDesk};

/// Called after tasks were queued, so an embedded runner leases at once instead of at its
/// next poll. A missed or extra call is harmless.
pub type EnqueueHook = Arc<dyn Fn() + Send + Sync>;

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<ServerConfig>,
    pub on_enqueue: Option<EnqueueHook>,
    /// Wakes the runner protocol's waiting lease requests when tasks are queued. Share it
    /// with the scheduler's hook (see [`AppState::lease_wake_hook`]) so scheduled tasks wake
    /// them too.
    pub lease_wake: Arc<Notify>,
    /// Seals projects' registry passwords before they are stored and opens them for the
    /// leases of their tasks. Every server sharing a database needs the same key.
    pub credentials: Arc<CredentialVault>,
    /// Every runner protocol call goes through it, as the embedded runner's do; its wake
    /// hook should be [`AppState::lease_wake_hook`] over `lease_wake` and `on_enqueue`.
    pub desk: LeaseDesk,
    /// Live log streams open in this process, per token (the `log_streams_per_token` quota).
    pub streams: streams::OpenStreams,
    /// Tokens and codes' task defaults found recently, reused for a bounded time.
    pub recent: recent::RecentAnswers,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: Arc<ServerConfig>,
        on_enqueue: Option<EnqueueHook>,
        credentials: Arc<CredentialVault>,
    ) -> Self {
        let lease_wake = Arc::new(Notify::new());
        let desk = LeaseDesk::new(
            store.clone(),
            clock.clone(),
            credentials.clone(),
            AppState::lease_wake_hook(lease_wake.clone(), on_enqueue.clone()),
        );
        AppState {
            store,
            clock,
            config,
            on_enqueue,
            lease_wake,
            credentials,
            desk,
            streams: streams::OpenStreams::default(),
            recent: recent::RecentAnswers::default(),
        }
    }

    /// Tells whoever listens that tasks were queued.
    pub fn tasks_queued(&self) {
        self.lease_wake.notify_waiters();
        if let Some(hook) = &self.on_enqueue {
            hook();
        }
    }

    /// A hook that wakes waiting lease requests and then calls `then`, for enqueuers outside
    /// the HTTP layer (the scheduler).
    pub fn lease_wake_hook(wake: Arc<Notify>, then: Option<EnqueueHook>) -> EnqueueHook {
        Arc::new(move || {
            wake.notify_waiters();
            if let Some(then) = &then {
                then();
            }
        })
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    use api::{clusters, codes, credentials, logs, projects, schedules, stacks, tasks, usage};

    let upload_limit = state.config.max_upload_bytes();
    let project = Router::new()
        .route(
            "/codes",
            get(codes::list)
                .post(codes::upload)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/codes/{code_id}", get(codes::show).delete(codes::delete))
        .route("/codes/{code_id}/revisions", get(codes::revisions))
        .route("/codes/{code_id}/download", get(codes::download))
        .route("/codes/{code_id}/cancel_all", post(codes::cancel_all))
        .route("/codes/{code_id}/pause_task_queue", post(codes::pause))
        .route("/codes/{code_id}/resume_task_queue", post(codes::resume))
        .route("/codes/{code_id}/stats", get(codes::stats))
        .route("/tasks", get(tasks::list).post(tasks::queue))
        .route("/tasks/webhook", post(tasks::webhook))
        .route("/tasks/{task_id}", get(tasks::show))
        .route("/tasks/{task_id}/log", get(logs::log))
        .route("/tasks/{task_id}/log/stream", get(logs::stream))
        .route("/tasks/{task_id}/outlog", get(logs::outlog))
        .route("/tasks/{task_id}/cancel", post(tasks::cancel))
        .route("/tasks/{task_id}/retry", post(tasks::retry))
        .route("/tasks/{task_id}/progress", post(tasks::progress))
        .route("/schedules", get(schedules::list).post(schedules::create))
        .route(
            "/schedules/{schedule_id}",
            get(schedules::show).put(schedules::update),
        )
        .route("/schedules/{schedule_id}/cancel", post(schedules::cancel))
        .route("/usage", get(usage::usage))
        .route(
            "/credentials",
            get(credentials::list).post(credentials::store),
        )
        .route("/credentials/{registry}", delete(credentials::delete));

    Router::new()
        .route("/2/projects/{project_id}", get(projects::show))
        .route("/2/projects/{project_id}/quotas", put(projects::set_quotas))
        .nest("/2/projects/{project_id}", project)
        .route("/2/stacks", get(stacks::list))
        .route("/2/clusters", get(clusters::list).post(clusters::create))
        .route(
            "/2/clusters/{cluster_id}",
            get(clusters::show)
                .put(clusters::update)
                .delete(clusters::delete),
        )
        .route("/2/clusters/{cluster_id}/stats", get(clusters::stats))
        .route(
            "/2/clusters/{cluster_id}/runner_tokens",
            post(clusters::runner_token),
        )
        .nest("/runner/v1", runner_api::routes(&state.config))
        .merge(dashboard::routes())
        .route("/", get(front_door))
        .route("/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::scrape))
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(|| async {
            error::ApiError::NotFound("no such endpoint; see /openapi.json".into())
        })
        .layer(axum::middleware::from_fn(metrics::track_requests))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                tracing::debug_span!(
                    "request",
                    method = %request.method(),
                    uri = %auth::loggable_uri(request.uri()),
                    version = ?request.version(),
                )
            }),
        )
        .with_state(state)
}

/// `GET /`: a browser is sent to the dashboard; any other client gets a JSON note of where
/// things are, so that a first `curl` of the server's address says more than "not found".
async fn front_door(headers: axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let wants_html = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        return axum::response::Redirect::to("/ui/").into_response();
    }
    axum::Json(serde_json::json!({
        "name": "stevedore",
        "version": env!("CARGO_PKG_VERSION"),
        "api": "/2",
        "openapi": "/openapi.json",
        "dashboard": "/ui/",
        "metrics": "/metrics",
    }))
    .into_response()
}

/// Serves `router` on `listener` until `shutdown` resolves, then finishes the requests in
/// flight and returns. Live log streams end when shutdown begins (their clients resume
/// elsewhere or later); without that the server would wait for their tasks to finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let streams = api::logs::StreamShutdown::default();
    let app = router(state).layer(Extension(streams.clone()));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            streams.0.cancel();
        })
        .await
}
