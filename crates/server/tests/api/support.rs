//! A real server on a loopback port over a fresh SQLite store, and a client for it.

use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use stevedore_model::{Clock, SystemClock};
use stevedore_server::{AppState, ServerConfig, bootstrap};
use stevedore_store::{NewToken, SqliteOptions, SqliteStore, Store, SyncMode, TokenRole};
use tokio::net::TcpListener;

pub struct TestServer {
    pub base: String,
    pub project_id: String,
    pub token: String,
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    _data_dir: tempfile::TempDir,
    /// The PostgreSQL database behind a server started on one, dropped after the server.
    _database: Option<stevedore_store::testcluster::TestDatabase>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the status and that an error body is `{"msg": "..."}`; returns the message.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert!(
            self.content_type.starts_with("application/json"),
            "{}",
            self.content_type
        );
        let body = self.json();
        let msg = body["msg"]
            .as_str()
            .unwrap_or_else(|| panic!("no msg in {body}"));
        assert!(!msg.is_empty());
        msg.to_owned()
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> TestServer {
        let data_dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(SqliteOptions {
                path: data_dir.path().join("stevedore.db"),
                sync: SyncMode::Normal,
            })
            .await
            .unwrap(),
        );
        Self::start_on(config, store, data_dir, None).await
    }

    /// The server on a fresh PostgreSQL database of the test cluster; `None` (the test then
    /// skips) when PostgreSQL is not installed, except in CI, where that fails.
    pub async fn start_on_postgres() -> Option<TestServer> {
        let database = stevedore_store::testcluster::fresh_database().await?;
        let store: Arc<dyn Store> = Arc::new(
            stevedore_store::PgStore::connect(stevedore_store::PgOptions::new(&database.url))
                .await
                .unwrap(),
        );
        let data_dir = tempfile::tempdir().unwrap();
        Some(Self::start_on(ServerConfig::default(), store, data_dir, Some(database)).await)
    }

    async fn start_on(
        config: ServerConfig,
        store: Arc<dyn Store>,
        data_dir: tempfile::TempDir,
        database: Option<stevedore_store::testcluster::TestDatabase>,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let iron = bootstrap::ensure_default_project(
            store.as_ref(),
            data_dir.path(),
            "127.0.0.1",
            port,
            SystemClock.now(),
        )
        .await
        .unwrap();
        let state = AppState::new(
            store.clone(),
            Arc::new(SystemClock),
            Arc::new(config),
            None,
            Arc::new(stevedore_store::CredentialVault::new(
                &stevedore_store::CredentialKey::generate().unwrap(),
            )),
        );
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(stevedore_server::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        TestServer {
            base: format!("http://127.0.0.1:{port}"),
            project_id: iron.project_id,
            token: iron.token,
            store,
            http: reqwest::Client::new(),
            _data_dir: data_dir,
            _database: database,
            shutdown: Some(shutdown),
            served: Some(served),
        }
    }

    /// Shuts the server down as a signal would, and waits until it has stopped.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap().unwrap();
        }
    }

    /// A second project with its own token.
    pub async fn other_project(&self, name: &str) -> (String, String) {
        let now = SystemClock.now();
        let project = self.store.create_project(name, now).await.unwrap();
        let token = self
            .token(NewToken {
                project_id: Some(project.id.clone()),
                role: TokenRole::Project,
                clusters: None,
            })
            .await;
        (project.id, token)
    }

    /// A token of `role` without a project (runner or admin).
    pub async fn token_of(&self, role: TokenRole) -> String {
        self.token(NewToken {
            project_id: None,
            role,
            clusters: None,
        })
        .await
    }

    /// A token as `token` says; its secret.
    pub async fn token(&self, token: NewToken) -> String {
        let secret = stevedore_server::auth::new_token_secret();
        self.store
            .create_token(
                &token,
                &stevedore_server::auth::token_digest(&secret),
                SystemClock.now(),
            )
            .await
            .unwrap();
        secret
    }

    /// A request to a path from the server's root, with `token`.
    pub fn root(&self, method: Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("OAuth {token}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/2/projects/{}/{}", self.base, self.project_id, path)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.bytes().await.unwrap().to_vec();
        Reply {
            status,
            content_type,
            body,
        }
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("Authorization", format!("OAuth {}", self.token))
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.request(Method::POST, path).json(&body))
            .await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> Reply {
        self.send(
            self.request(Method::POST, path)
                .header("Content-Type", "application/json")
                .body(body),
        )
        .await
    }

    /// Registers an image code by plain JSON and returns its id.
    pub async fn image_code(&self, name: &str, extra: Value) -> String {
        let mut data = serde_json::json!({"name": name, "image": "stevedore/busybox:local", "command": "echo hi"});
        if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object()) {
            data.extend(extra.clone());
        }
        let reply = self.post("codes", data).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_owned()
    }

    /// Queues tasks and returns their ids.
    pub async fn queue(&self, tasks: Value) -> Vec<String> {
        let reply = self
            .post("tasks", serde_json::json!({ "tasks": tasks }))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// Builds a zip from `(name, contents, unix mode)` entries.
pub fn zip_of(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, contents, mode) in entries {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .unix_permissions(*mode);
        writer.start_file(*name, options).unwrap();
        writer.write_all(contents).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// A multipart code upload.
pub fn code_form(data: Value, zip: Option<Vec<u8>>) -> reqwest::multipart::Form {
    let form = reqwest::multipart::Form::new().text("data", data.to_string());
    match zip {
        Some(zip) => form.part(
            "file",
            reqwest::multipart::Part::bytes(zip)
                .file_name("code.zip")
                .mime_str("application/zip")
                .unwrap(),
        ),
        None => form,
    }
}

/// Redactions for snapshots: ids and times change every run.
pub fn redactions() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    for field in [
        "id",
        "project_id",
        "code_id",
        "code_history_id",
        "latest_history_id",
        "created_at",
        "updated_at",
        "latest_change",
        "start_at",
        "next_start",
    ] {
        settings.add_redaction(&format!(".**.{field}"), format!("[{field}]"));
        settings.add_redaction(&format!(".{field}"), format!("[{field}]"));
    }
    settings
}
