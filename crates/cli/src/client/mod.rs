//! The HTTP client of the client commands: one project on one server, IronWorker v2 API.

pub mod config;
pub mod sse;

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use config::{ClientConfig, ClientFlags};

/// An answer of the server that is not a success, with the server's own message.
#[derive(Debug, thiserror::Error)]
#[error("the server answered {status}: {msg}")]
pub struct ApiError {
    pub status: StatusCode,
    pub msg: String,
}

/// Talks to one project of one server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    project_id: String,
    token: String,
}

impl Client {
    pub fn new(config: &ClientConfig) -> anyhow::Result<Self> {
        let (project_id, token) = config.credentials()?;
        anyhow::ensure!(
            config.protocol == "http",
            "this build of stevedore speaks plain http only; put a TLS-terminating proxy's \
             http address in the configuration, or use protocol \"http\""
        );
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("stevedore-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url: config.base_url(),
            project_id: project_id.to_owned(),
            token: token.to_owned(),
        })
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// A request to a path under `/2/projects/{project_id}/`.
    pub fn project_request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!(
            "{}/2/projects/{}/{}",
            self.base_url,
            self.project_id,
            path.trim_start_matches('/')
        );
        self.request(method, &url)
    }

    /// A request to a path from the server's root.
    pub fn root_request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!("{}/{}", self.base_url, path.trim_start_matches('/'));
        self.request(method, &url)
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.http
            .request(method, url)
            .header("Authorization", format!("OAuth {}", self.token))
            .header("Accept", "application/json")
    }

    /// Sends a request and returns the response when it succeeded.
    pub async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request.send().await.map_err(|error| {
            let url = error.url().map(|url| url.to_string()).unwrap_or_default();
            if error.is_connect() {
                anyhow::anyhow!(
                    "cannot reach the stevedore server at {}: is `stevedore serve` running there? ({url})",
                    self.base_url
                )
            } else {
                anyhow::Error::new(error).context(format!("request to {url} failed"))
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|value| {
                value
                    .get("msg")
                    .and_then(|msg| msg.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| text.trim().chars().take(500).collect());
        Err(ApiError { status, msg }.into())
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send(self.project_request(Method::GET, path)).await?;
        Ok(response.json().await?)
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        let response = self
            .send(self.project_request(Method::POST, path).json(body))
            .await?;
        Ok(response.json().await?)
    }
}

/// Whether an error is the server saying "not found".
pub fn is_not_found(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<ApiError>()
        .is_some_and(|error| error.status == StatusCode::NOT_FOUND)
}
