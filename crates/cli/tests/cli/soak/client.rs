//! The API side of a soak: projects, queueing, draining and reading every task back.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::run_ok_with_env;

use super::Settings;
use super::fleet::Fleet;

// === the API side ===

/// One project, with its token.
#[derive(Debug, Clone)]
struct Project {
    id: String,
    token: String,
}

/// Queues and reads tasks through whichever server answers.
pub(super) struct Client {
    http: reqwest::Client,
    bases: [String; 2],
    projects: Vec<Project>,
    /// Which server a call tries first, in turn.
    turn: AtomicUsize,
}

impl Client {
    /// The default project and two more, each with the soak's code: a task prints, sleeps
    /// whole seconds between `settings.task_secs`, and prints again.
    pub(super) async fn new(fleet: &Fleet, settings: &Settings) -> Client {
        let first = fleet.servers[0].as_ref().expect("started");
        let mut projects = vec![Project {
            id: first.iron["project_id"]
                .as_str()
                .expect("project_id")
                .to_owned(),
            token: first.token(),
        }];
        let dir = fleet.server_dirs[0].path().to_str().expect("a UTF-8 path");
        for name in ["soak-b", "soak-c"] {
            let created: Value = serde_json::from_str(&run_ok_with_env(
                &["--data-dir", dir, "project", "create", name],
                &fleet.store_env(),
            ))
            .expect("project create prints JSON");
            projects.push(Project {
                id: created["id"].as_str().expect("id").to_owned(),
                token: created["token"].as_str().expect("token").to_owned(),
            });
        }
        let client = Client {
            http: reqwest::Client::new(),
            bases: [0, 1].map(|n| fleet.servers[n].as_ref().expect("started").base.clone()),
            projects,
            turn: AtomicUsize::new(0),
        };
        let (shortest, longest) = (
            settings.task_secs.0.as_secs(),
            settings.task_secs.1.as_secs(),
        );
        let command = format!(
            "echo start; sleep $((RANDOM%{}+{shortest})); echo end",
            longest - shortest + 1
        );
        for project in &client.projects {
            client
                .call(
                    project,
                    reqwest::Method::POST,
                    "codes",
                    Some(json!({
                        "name": "soak", "image": "stevedore/busybox:local", "command": command,
                    })),
                )
                .await;
        }
        client
    }

    /// Calls a project's path on whichever server answers, trying for up to a minute (a
    /// server may be down, the database busy).
    async fn call(
        &self,
        project: &Project,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let turn = self.turn.fetch_add(1, Ordering::Relaxed);
            for base in [&self.bases[turn % 2], &self.bases[(turn + 1) % 2]] {
                let mut request = self
                    .http
                    .request(
                        method.clone(),
                        format!("{base}/2/projects/{}/{path}", project.id),
                    )
                    .header("Authorization", format!("OAuth {}", project.token))
                    .timeout(Duration::from_secs(20));
                if let Some(body) = &body {
                    request = request.json(body);
                }
                match request.send().await {
                    Ok(response) if response.status().is_success() => match response.json().await {
                        Ok(value) => return value,
                        Err(error) => last_error = format!("{base}: {error}"),
                    },
                    Ok(response) if response.status().is_server_error() => {
                        last_error = format!("{base}: {}", response.status());
                    }
                    Ok(response) => panic!(
                        "{method} {path}: {} {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    ),
                    Err(error) => last_error = format!("{base}: {error}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("{method} {path}: no server answered within a minute: {last_error}");
    }

    /// Queues tasks for `settings.queue_for`, round robin over the projects, at the rate or
    /// keeping the backlog. Returns the ids the API acknowledged.
    pub(super) async fn queue_for(&self, settings: &Settings) -> Vec<String> {
        let began = Instant::now();
        let mut acknowledged = Vec::new();
        let mut next_payload = 0;
        while began.elapsed() < settings.queue_for {
            let wanted = match settings.rate {
                Some(rate) => {
                    ((began.elapsed().as_secs_f64() * rate) as usize).saturating_sub(next_payload)
                }
                None => settings.backlog.saturating_sub(self.count("queued").await),
            };
            let per_project = wanted.div_ceil(self.projects.len());
            for project in &self.projects {
                if per_project == 0 {
                    break;
                }
                let payloads: Vec<usize> = (next_payload..next_payload + per_project).collect();
                next_payload += per_project;
                let tasks: Vec<Value> = payloads
                    .iter()
                    .map(|payload| json!({"code_name": "soak", "payload": payload.to_string()}))
                    .collect();
                let reply = self
                    .call(
                        project,
                        reqwest::Method::POST,
                        "tasks",
                        Some(json!({ "tasks": tasks })),
                    )
                    .await;
                let ids = reply["tasks"].as_array().expect("queued tasks");
                assert_eq!(ids.len(), payloads.len(), "{reply}");
                acknowledged.extend(
                    ids.iter()
                        .map(|id| id["id"].as_str().expect("id").to_owned()),
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        acknowledged
    }

    /// How many tasks of every project have one of `statuses` (comma-separated).
    async fn count(&self, statuses: &str) -> usize {
        let mut count = 0;
        for project in &self.projects {
            count += self
                .list(project, &format!("status={statuses}"))
                .await
                .len();
        }
        count
    }

    /// Every task of a project that `filter` selects, page by page.
    async fn list(&self, project: &Project, filter: &str) -> Vec<Value> {
        let mut tasks = Vec::new();
        for page in 0.. {
            let list = self
                .call(
                    project,
                    reqwest::Method::GET,
                    &format!("tasks?{filter}&per_page=100&page={page}"),
                    None,
                )
                .await;
            let items = list["tasks"].as_array().cloned().unwrap_or_default();
            let done = items.len() < 100;
            tasks.extend(items);
            if done {
                break;
            }
        }
        tasks
    }

    /// Waits until no task is queued, preparing or running, or `timeout` passed.
    pub(super) async fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count("queued,preparing,running").await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// `GET tasks/{id}` of every task of every project, with its attempts.
    pub(super) async fn every_task(&self) -> Vec<Value> {
        let mut listed = Vec::new();
        for project in &self.projects {
            for task in self.list(project, "code_name=soak").await {
                let id = task["id"].as_str().expect("id").to_owned();
                listed.push((project, id));
            }
        }
        let mut seen = HashSet::new();
        listed.retain(|(_, id)| seen.insert(id.clone()));
        let tasks: Vec<Value> = futures::stream::iter(listed)
            .map(|(project, id)| async move {
                self.call(project, reqwest::Method::GET, &format!("tasks/{id}"), None)
                    .await
            })
            .buffer_unordered(8)
            .collect()
            .await;
        tasks
    }
}
