//! Scale-out under failure: two `stevedore serve` processes on one PostgreSQL, three
//! `stevedore runner` processes leasing over HTTP, 500 real container tasks — and, mid-run, one
//! runner and the leading server killed with SIGKILL. Every task must end exactly once,
//! `complete`; none may be lost; and no task's container may start after the task completed.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stevedore_store::testcluster::fresh_database;

use crate::support::{
    RunnerProcess, ServerProcess, docker_available, ensure_local_image, remove_containers,
    runner_token_with_env, task_containers_labelled,
};

const TASKS: usize = 500;
const LEASE_SECS: u32 = 10;

/// A child process that does not outlive the test, however it ends.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Talks to whichever server is up, with the project token both share.
struct Cluster {
    http: reqwest::Client,
    project_id: String,
    token: String,
}

impl Cluster {
    async fn call(
        &self,
        base: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<Value> {
        let mut request = self
            .http
            .request(
                method,
                format!("{base}/2/projects/{}/{path}", self.project_id),
            )
            .header("Authorization", format!("OAuth {}", self.token))
            .timeout(Duration::from_secs(20));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.ok()?;
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.ok()
    }

    /// Every task of the code, newest first, page by page.
    async fn all_tasks(&self, base: &str) -> Vec<Value> {
        let mut tasks = Vec::new();
        for page in 0.. {
            let list = self
                .call(
                    base,
                    reqwest::Method::GET,
                    &format!("tasks?code_name=echo&per_page=100&page={page}"),
                    None,
                )
                .await
                .expect("list tasks");
            let items = list["tasks"].as_array().unwrap().clone();
            let done = items.len() < 100;
            tasks.extend(items);
            if done {
                break;
            }
        }
        tasks
    }
}

fn status_counts(tasks: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for task in tasks {
        *counts
            .entry(task["status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_and_three_runners_lose_no_task_when_a_runner_and_a_server_die() {
    if !docker_available() {
        return;
    }
    let Some(database) = fresh_database().await else {
        return;
    };
    ensure_local_image();
    // The engine keeps only its last few hundred events, so they are watched from the start.
    let events_file = tempfile::NamedTempFile::new().unwrap();
    let mut watcher = KillOnDrop(Command::new("docker")
        .args([
            "events",
            "--filter",
            "type=container",
            "--filter",
            "event=start",
            "--format",
            "{{index .Actor.Attributes \"stevedore.task\"}} {{index .Actor.Attributes \"stevedore.runner\"}} {{.TimeNano}}",
        ])
        .stdout(events_file.reopen().unwrap())
        .spawn()
        .unwrap());
    let database_args = ["--database", database.url.as_str()];
    let server_env = [
        ("STEVEDORE_RUNNER__ENABLED", "false"),
        ("STEVEDORE_DATABASE", database.url.as_str()),
    ];
    // The first server leads (scheduler and rescuer); it is the one that dies.
    let data_a = tempfile::tempdir().unwrap();
    let mut server_a = ServerProcess::start_with(data_a.path(), &database_args, &server_env);
    let data_b = tempfile::tempdir().unwrap();
    let server_b = ServerProcess::start_with(data_b.path(), &database_args, &server_env);
    let cluster = Cluster {
        http: reqwest::Client::new(),
        project_id: server_a.iron["project_id"].as_str().unwrap().to_owned(),
        token: server_a.token(),
    };
    assert_eq!(
        server_b.iron["project_id"], server_a.iron["project_id"],
        "one default project"
    );

    let runner_token = runner_token_with_env(
        data_a.path(),
        &[
            ("STEVEDORE_DATABASE", database.url.as_str()),
            ("STEVEDORE_CONFIG", "/dev/null"),
        ],
    );
    let prefix = format!("multi-{}", std::process::id());
    let ids = [1, 2, 3].map(|n| format!("{prefix}-{n}"));
    // Leases long enough that a container start on a loaded machine fits well inside one,
    // short enough that the dead runner's tasks are rescued soon.
    let mut runner_1 =
        RunnerProcess::start_with_lease(&server_a, &runner_token, &ids[0], &[], LEASE_SECS);
    let _runner_2 =
        RunnerProcess::start_with_lease(&server_a, &runner_token, &ids[1], &[], LEASE_SECS);
    let _runner_3 =
        RunnerProcess::start_with_lease(&server_b, &runner_token, &ids[2], &[], LEASE_SECS);

    cluster
        .call(
            &server_b.base,
            reqwest::Method::POST,
            "codes",
            Some(json!({
                "name": "echo", "image": "stevedore/busybox:local",
                "command": "echo \"ran $TASK_ID\"; sleep 0.2",
            })),
        )
        .await
        .expect("push the code");
    for batch in 0..TASKS / 100 {
        let base = if batch % 2 == 0 {
            &server_a.base
        } else {
            &server_b.base
        };
        let tasks: Vec<Value> = (0..100)
            .map(|n| json!({"code_name": "echo", "payload": format!("{}", batch * 100 + n)}))
            .collect();
        cluster
            .call(
                base,
                reqwest::Method::POST,
                "tasks",
                Some(json!({"tasks": tasks})),
            )
            .await
            .expect("queue a batch");
    }

    // Let the run get going, then kill a busy runner and the leading server.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let counts = status_counts(&cluster.all_tasks(&server_b.base).await);
        if counts.get("complete").copied().unwrap_or(0) >= 80 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run does not get going: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    runner_1.kill_hard();
    let listen_a = server_a.base.trim_start_matches("http://").to_owned();
    server_a.kill_hard();
    // The survivors go on: runner 2 waits for its server, which a supervisor restarts; the
    // other server takes over the rescuer, which requeues what the dead runner held.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let server_a =
        ServerProcess::start_listening(data_a.path(), &listen_a, &database_args, &server_env);
    // Runner 1 comes back under its id and removes the containers its earlier life left.
    let _runner_1 =
        RunnerProcess::start_with_lease(&server_b, &runner_token, &ids[0], &[], LEASE_SECS);

    let deadline = Instant::now() + Duration::from_secs(900);
    let tasks = loop {
        let tasks = cluster.all_tasks(&server_a.base).await;
        let counts = status_counts(&tasks);
        let finished: usize = ["complete", "error", "timeout", "cancelled"]
            .iter()
            .map(|status| counts.get(*status).copied().unwrap_or(0))
            .sum();
        if finished == TASKS {
            break tasks;
        }
        assert!(
            Instant::now() < deadline,
            "not every task ended: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Every task is there once, and ended complete, once.
    assert_eq!(tasks.len(), TASKS, "no task lost, none made twice");
    let mut payloads: Vec<usize> = tasks
        .iter()
        .map(|task| task["payload"].as_str().unwrap().parse().unwrap())
        .collect();
    payloads.sort_unstable();
    assert_eq!(payloads, (0..TASKS).collect::<Vec<_>>());
    let not_complete: Vec<&Value> = tasks
        .iter()
        .filter(|task| task["status"] != "complete")
        .collect();
    assert!(not_complete.is_empty(), "{not_complete:#?}");
    let rescued = tasks
        .iter()
        .filter(|task| task["infra_attempts"].as_u64() > Some(0))
        .count();
    assert!(
        rescued >= 1,
        "the killed runner held tasks, so some were rescued"
    );

    // No task ran again after it completed. Each lease starts at most one container (the
    // runner confirms the lease right before `start`), and every lease after the first is an
    // infrastructure attempt: so a task's containers started at most 1 + infra_attempts
    // times. And none started after the task ended — give or take the engine's bookkeeping:
    // the `start` event is stamped when the engine finished handling the start, which on a
    // loaded machine can come after a short task already exited.
    const EVENT_SLACK_NANOS: i64 = 1_000_000_000;
    // Give the watcher a moment to write the last starts out, then stop it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    watcher.stop();
    let events = std::fs::read(events_file.path()).unwrap();
    let events = String::from_utf8_lossy(&events);
    let by_id: HashMap<&str, &Value> = tasks
        .iter()
        .map(|task| (task["id"].as_str().unwrap(), task))
        .collect();
    let mut starts: HashMap<&str, Vec<(String, i64)>> = HashMap::new();
    for line in events.lines() {
        let mut fields = line.split_whitespace();
        let (Some(task), Some(runner), Some(time)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !runner.starts_with(&prefix) {
            continue;
        }
        let Some((&id, _)) = by_id.get_key_value(task) else {
            continue;
        };
        starts
            .entry(id)
            .or_default()
            .push((runner.to_owned(), time.parse().unwrap()));
    }
    assert_eq!(starts.len(), TASKS, "every task's container started");
    for (id, seen) in &starts {
        let task = by_id[id];
        let attempts = 1 + task["infra_attempts"].as_u64().unwrap() as usize;
        assert!(
            seen.len() <= attempts,
            "task {id} started {} containers on {attempts} leases: {seen:?}\n{task:#}",
            seen.len()
        );
        let end = chrono::DateTime::parse_from_rfc3339(task["end_time"].as_str().unwrap())
            .unwrap()
            .timestamp_nanos_opt()
            .unwrap();
        for (runner, time) in seen {
            assert!(
                *time <= end + EVENT_SLACK_NANOS,
                "task {id}'s container started on {runner} {} ms after the task ended: {seen:?}\n{task:#}",
                (time - end) / 1_000_000
            );
        }
    }

    // No task container is left behind by the runners that are still alive or came back
    // (their network holders wait for the next tasks).
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        let label = format!("stevedore.runner={id}");
        while !task_containers_labelled(&label).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let left = task_containers_labelled(&label);
        remove_containers(&label);
        assert!(left.is_empty(), "{id} left {left:?}");
    }
}
