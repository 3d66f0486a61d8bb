//! [`RemoteTaskSource`]: the runner's [`TaskSource`] over the server's runner protocol
//! (`/runner/v1/...`, wire types in `stevedore_api_types::runner`), for `stevedore runner`.
//!
//! Transport failures and 5xx answers are tried again with backoff; what still fails comes
//! back as `SourceError::Unavailable`, which the runner treats as transient. 409 is a stale
//! lease, 404 a missing thing, any other 4xx a refusal. Retrying a write whose answer was lost
//! is safe: the lease token fences it, so a second completion is refused as stale and the
//! runner drops the task it already finished (a log chunk may then be stored twice).
//!
//! A lease request long-polls: the server holds it until work arrives or `wait` passes. It is
//! abandoned when shutdown begins, so a runner stops at once; the server then leases nothing
//! for it (it only leases while the request is alive), or, in the rare race, the lease simply
//! expires and the rescuer gives the task to another runner.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use stevedore_api_types::runner as wire;
use stevedore_model::TaskOutcome;
use stevedore_model::{HeartbeatReply, Lease, LeaseRequest, LeasedTask, RunReport};
use stevedore_runner::{PackageDownload, RequeueRequest, SourceError, TaskSource};
use tokio_util::sync::CancellationToken;

/// How a [`RemoteTaskSource`] reaches its server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The server's base URL, e.g. `http://host:8080`.
    pub api: String,
    /// A runner token.
    pub token: String,
    /// How long a lease request may wait for work on the server.
    pub lease_wait: Duration,
    /// Attempts of one call before it is given up as unavailable.
    pub attempts: u32,
    /// The first pause between attempts; it doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl RemoteOptions {
    pub fn new(api: &str, token: &str) -> Self {
        RemoteOptions {
            api: api.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            lease_wait: Duration::from_secs(20),
            attempts: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The runner protocol's client side.
#[derive(Debug)]
pub struct RemoteTaskSource {
    http: reqwest::Client,
    options: RemoteOptions,
    /// The runner's capacity once known (0 until then), reported with each lease.
    capacity: AtomicU32,
    /// Ends a waiting lease request at once.
    shutdown: CancellationToken,
}

/// A failed call, before it becomes a `SourceError`.
enum CallError {
    /// Worth another try: no answer, or a 5xx.
    Transient(String),
    /// The server's answer: status and its message.
    Answer(StatusCode, String),
}

impl RemoteTaskSource {
    pub fn new(options: RemoteOptions, shutdown: CancellationToken) -> anyhow::Result<Self> {
        anyhow::ensure!(
            options.api.starts_with("http://") || options.api.starts_with("https://"),
            "--api must be an http:// URL, got {:?}",
            options.api
        );
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("stevedore-runner/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(RemoteTaskSource {
            http,
            options,
            capacity: AtomicU32::new(0),
            shutdown,
        })
    }

    /// Reports the runner's capacity with later leases.
    pub fn set_capacity(&self, capacity: u32) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    /// Checks the URL and the token with a lease that asks for nothing, so that a wrong token
    /// stops `stevedore runner` at start-up with the server's own words.
    pub async fn probe(&self, runner_id: &str, clusters: &[String]) -> anyhow::Result<()> {
        let request = wire::LeaseRequest {
            runner_id: runner_id.to_owned(),
            clusters: clusters.to_vec(),
            max_tasks: 0,
            lease_secs: 30,
            wait_ms: 0,
            capacity: None,
        };
        let url = self.url("lease");
        match self
            .call::<wire::LeaseResponse>(|| self.request(Method::POST, &url).json(&request))
            .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Transient(message)) => {
                anyhow::bail!("cannot reach the server at {}: {message}", self.options.api)
            }
            Err(CallError::Answer(status, message)) => {
                anyhow::bail!(
                    "the server at {} refused: {status}: {message}",
                    self.options.api
                )
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/runner/v1/{path}", self.options.api)
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.http
            .request(method, url)
            .header("Authorization", format!("OAuth {}", self.options.token))
    }

    /// Sends the request `build` makes, again after transport failures and 5xx answers.
    async fn call<T: DeserializeOwned>(
        &self,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, CallError> {
        let mut pause = self.options.backoff;
        let mut attempt = 1;
        loop {
            match self.send_once(build()).await {
                Ok(response) => {
                    return response.json::<T>().await.map_err(|error| {
                        CallError::Transient(format!("unreadable answer: {error}"))
                    });
                }
                Err(CallError::Transient(message)) if attempt < self.options.attempts => {
                    tracing::debug!(attempt, %message, "runner protocol call failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.options.max_backoff);
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn send_once(&self, request: RequestBuilder) -> Result<reqwest::Response, CallError> {
        let response = request
            .send()
            .await
            .map_err(|error| CallError::Transient(error.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|body| {
                body.get("msg")
                    .and_then(|msg| msg.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| text.trim().chars().take(300).collect());
        if status.is_server_error() {
            return Err(CallError::Transient(format!("{status}: {message}")));
        }
        Err(CallError::Answer(status, message))
    }

    /// A JSON call about one task.
    async fn task_call<T: DeserializeOwned>(
        &self,
        task_id: &str,
        action: &str,
        body: &impl Serialize,
    ) -> Result<T, SourceError> {
        let url = self.url(&format!("tasks/{task_id}/{action}"));
        self.call(|| self.request(Method::POST, &url).json(body))
            .await
            .map_err(|error| source_error(error, task_id))
    }
}

fn source_error(error: CallError, task_id: &str) -> SourceError {
    match error {
        CallError::Transient(message) => SourceError::Unavailable { message },
        CallError::Answer(StatusCode::CONFLICT, _) => SourceError::StaleLease {
            task_id: task_id.to_owned(),
        },
        CallError::Answer(StatusCode::NOT_FOUND, message) => {
            SourceError::NotFound { what: message }
        }
        CallError::Answer(status, message) => SourceError::Refused {
            message: format!("{status}: {message}"),
        },
    }
}

#[async_trait]
impl TaskSource for RemoteTaskSource {
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError> {
        let capacity = self.capacity.load(Ordering::Relaxed);
        let body = wire::LeaseRequest {
            runner_id: request.runner_id.clone(),
            clusters: request.clusters.clone(),
            max_tasks: request.max_tasks,
            lease_secs: request.lease_secs,
            wait_ms: u64::try_from(self.options.lease_wait.as_millis()).unwrap_or(u64::MAX),
            capacity: (capacity > 0).then_some(capacity),
        };
        let url = self.url("lease");
        let call = self.call::<wire::LeaseResponse>(|| {
            self.request(Method::POST, &url)
                .timeout(self.options.lease_wait + Duration::from_secs(30))
                .json(&body)
        });
        let response = tokio::select! {
            response = call => response,
            () = self.shutdown.cancelled() => return Ok(Vec::new()),
        };
        let response = response.map_err(|error| match error {
            CallError::Transient(message) => SourceError::Unavailable { message },
            CallError::Answer(status, message) => SourceError::Refused {
                message: format!("{status}: {message}"),
            },
        })?;
        Ok(response
            .tasks
            .into_iter()
            .map(|leased| LeasedTask {
                task: leased.task,
                code: leased.code,
                lease: Lease {
                    token: leased.lease_token,
                    expires_at: leased.expires_at,
                },
                registry_credential: leased.registry_credential,
            })
            .collect())
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        token: i64,
        lease_secs: u32,
    ) -> Result<HeartbeatReply, SourceError> {
        self.task_call(task_id, "heartbeat", &wire::Heartbeat { token, lease_secs })
            .await
    }

    async fn mark_running(&self, task_id: &str, token: i64) -> Result<(), SourceError> {
        self.task_call::<serde_json::Value>(task_id, "running", &wire::Fenced { token })
            .await
            .map(drop)
    }

    async fn append_log(
        &self,
        task_id: &str,
        token: i64,
        bytes: &[u8],
        cap: u64,
    ) -> Result<u64, SourceError> {
        let url = self.url(&format!("tasks/{task_id}/log"));
        let body = bytes::Bytes::copy_from_slice(bytes);
        let reply: wire::LogAppended = self
            .call(|| {
                self.request(Method::POST, &url)
                    .header(wire::LEASE_TOKEN_HEADER, token)
                    .header(wire::LOG_CAP_HEADER, cap)
                    .header("Content-Type", "application/octet-stream")
                    .body(body.clone())
            })
            .await
            .map_err(|error| source_error(error, task_id))?;
        Ok(reply.size)
    }

    async fn progress(
        &self,
        task_id: &str,
        token: i64,
        percent: Option<u8>,
        msg: Option<&str>,
    ) -> Result<(), SourceError> {
        let body = wire::ProgressReport {
            token,
            percent,
            msg: msg.map(str::to_owned),
        };
        self.task_call::<serde_json::Value>(task_id, "progress", &body)
            .await
            .map(drop)
    }

    async fn complete(
        &self,
        task_id: &str,
        token: i64,
        outcome: &TaskOutcome,
        report: &RunReport,
    ) -> Result<(), SourceError> {
        let body = wire::Complete {
            token,
            outcome: outcome.clone(),
            report: report.clone(),
        };
        self.task_call::<serde_json::Value>(task_id, "complete", &body)
            .await
            .map(drop)
    }

    async fn requeue(
        &self,
        task_id: &str,
        token: i64,
        request: &RequeueRequest,
    ) -> Result<(), SourceError> {
        let body = wire::Requeue {
            token,
            reason: request.reason.clone(),
            delay_ms: u64::try_from(request.delay.as_millis()).unwrap_or(u64::MAX),
            max_infra_attempts: request.max_infra_attempts,
        };
        self.task_call::<serde_json::Value>(task_id, "requeue", &body)
            .await
            .map(drop)
    }

    async fn release_held(
        &self,
        runner_id: &str,
        max_infra_attempts: u32,
    ) -> Result<u32, SourceError> {
        let mut url =
            reqwest::Url::parse(&self.url("runners")).map_err(|error| SourceError::Refused {
                message: format!("the server's address makes no URL: {error}"),
            })?;
        url.path_segments_mut()
            .map_err(|()| SourceError::Refused {
                message: "the server's address cannot take a path".to_owned(),
            })?
            .push(runner_id)
            .push("release");
        let body = wire::Release { max_infra_attempts };
        let released: wire::Released = self
            .call(|| self.request(Method::POST, url.as_str()).json(&body))
            .await
            .map_err(|error| source_error(error, runner_id))?;
        Ok(released.released)
    }

    async fn gone_runners(&self, runner_ids: &[String]) -> Result<Vec<String>, SourceError> {
        let body = wire::GoneQuery {
            runner_ids: runner_ids.to_vec(),
        };
        let url = self.url("runners/gone");
        let gone: wire::Gone = self
            .call(|| self.request(Method::POST, &url).json(&body))
            .await
            .map_err(|error| source_error(error, "runners/gone"))?;
        Ok(gone.gone)
    }

    async fn task_package(
        &self,
        task_id: &str,
        token: i64,
    ) -> Result<PackageDownload, SourceError> {
        let url = self.url(&format!("tasks/{task_id}/package"));
        let mut pause = self.options.backoff;
        let mut attempt = 1;
        loop {
            let request = self
                .request(Method::GET, &url)
                .header(wire::LEASE_TOKEN_HEADER, token);
            match self.send_once(request).await {
                Ok(response) => {
                    // The server always announces the length; without it the download could
                    // not be checked for a cut-off end.
                    let Some(size) = response.content_length() else {
                        return Err(SourceError::Unavailable {
                            message: "the server sent a package without its length".to_owned(),
                        });
                    };
                    let chunks = response
                        .bytes_stream()
                        .map_err(|error| SourceError::Unavailable {
                            message: format!("the package download broke off: {error}"),
                        })
                        .boxed();
                    return Ok(PackageDownload { size, chunks });
                }
                Err(CallError::Transient(_)) if attempt < self.options.attempts => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.options.max_backoff);
                    attempt += 1;
                }
                Err(other) => return Err(source_error(other, task_id)),
            }
        }
    }
}
