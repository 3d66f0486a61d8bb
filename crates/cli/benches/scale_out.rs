//! Scale-out throughput: tasks/s through the real binaries on three set-ups in one run —
//! SQLite with the embedded runner (the single-node baseline), PostgreSQL with one remote
//! runner, and PostgreSQL with three remote runners behind two servers — each runner with the
//! same capacity, all on this machine's one Docker engine. Prints tasks/s and the ratio to the
//! baseline. Asserts nothing about speed; fails loudly when a task does not complete.
//!
//! `cargo bench -p stevedore --bench scale_out` (`STEVEDORE_BENCH_TASKS`, default 150 per
//! set-up). Needs a Docker engine and PostgreSQL's binaries (a throwaway cluster is started);
//! skips with a message without them.
//!
//! With one engine on one machine, more runners add lease capacity, not container capacity:
//! the figures show what the distributed path costs next to the embedded one, not how far it
//! scales across machines.

// A benchmark fails loudly: every `expect` says what went wrong.
#![allow(clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::process::{Child, Command};

const DEFAULT_TASKS: usize = 150;
const CAPACITY: usize = 4;
const RUN_DEADLINE: Duration = Duration::from_secs(900);

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// A `stevedore serve` and what it wrote to its iron.json.
struct Server {
    _process: Process,
    base: String,
    project_id: String,
    token: String,
}

async fn serve(data_dir: &Path, env: &[(&str, String)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stevedore"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .current_dir(data_dir)
        .env("STEVEDORE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let process = Process(command.spawn().expect("start stevedore serve"));
    let iron_path = data_dir.join("iron.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let iron: Value = loop {
        if let Ok(text) = std::fs::read_to_string(&iron_path)
            && let Ok(iron) = serde_json::from_str::<Value>(&text)
        {
            break iron;
        }
        assert!(Instant::now() < deadline, "the server did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Server {
        _process: process,
        base: format!(
            "http://{}:{}",
            iron["host"].as_str().expect("host"),
            iron["port"]
        ),
        project_id: iron["project_id"].as_str().expect("project_id").to_owned(),
        token: iron["token"].as_str().expect("token").to_owned(),
    }
}

fn runner(server: &Server, token: &str, id: &str) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .args(["runner", "--api", &server.base, "--id", id])
        .args(["--capacity", &CAPACITY.to_string()])
        .env("STEVEDORE_RUNNER_TOKEN", token)
        .env("STEVEDORE_CONFIG", "/dev/null")
        .env("STEVEDORE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start stevedore runner");
    Process(child)
}

async fn runner_token(database: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .args(["token", "create", "--role", "runner"])
        .env("STEVEDORE_DATABASE", database)
        .env("STEVEDORE_CONFIG", "/dev/null")
        .output()
        .await
        .expect("token create");
    assert!(output.status.success(), "token create failed");
    let created: Value = serde_json::from_slice(&output.stdout).expect("token JSON");
    created["token"].as_str().expect("token").to_owned()
}

/// Queues `tasks` tasks (through `servers` in turn) and returns tasks/s from the first queue
/// request to the poll that sees every one complete.
async fn measure(servers: &[&Server], tasks: usize) -> f64 {
    let http = reqwest::Client::new();
    let first = servers[0];
    let api = |server: &Server, path: &str| {
        format!("{}/2/projects/{}/{path}", server.base, server.project_id)
    };
    let auth = format!("OAuth {}", first.token);
    let pushed = http
        .post(api(first, "codes"))
        .header("Authorization", &auth)
        .json(&json!({"name": "bench", "image": "stevedore/busybox:local", "command": "true"}))
        .send()
        .await
        .expect("push the code");
    assert!(pushed.status().is_success(), "push: {}", pushed.status());
    let started = Instant::now();
    let mut queued = 0;
    let mut turn = 0;
    while queued < tasks {
        let batch = (tasks - queued).min(100);
        let body: Vec<Value> = (0..batch).map(|_| json!({"code_name": "bench"})).collect();
        let server = servers[turn % servers.len()];
        let reply = http
            .post(api(server, "tasks"))
            .header("Authorization", &auth)
            .json(&json!({"tasks": body}))
            .send()
            .await
            .expect("queue");
        assert!(reply.status().is_success(), "queue: {}", reply.status());
        queued += batch;
        turn += 1;
    }
    loop {
        let mut complete = 0;
        for page in 0.. {
            let list: Value = http
                .get(api(
                    first,
                    &format!("tasks?code_name=bench&complete=1&per_page=100&page={page}"),
                ))
                .header("Authorization", &auth)
                .send()
                .await
                .expect("list")
                .json()
                .await
                .expect("list JSON");
            let count = list["tasks"].as_array().expect("tasks").len();
            complete += count;
            if count < 100 {
                break;
            }
        }
        if complete >= tasks {
            return tasks as f64 / started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < RUN_DEADLINE,
            "tasks did not complete in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let tasks = std::env::var("STEVEDORE_BENCH_TASKS")
        .ok()
        .map(|value| {
            value
                .parse::<usize>()
                .expect("STEVEDORE_BENCH_TASKS must be a number")
        })
        .unwrap_or(DEFAULT_TASKS);
    if std::process::Command::new("docker")
        .args(["image", "inspect", "stevedore/busybox:local"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |status| !status.success())
    {
        println!(
            "skipped: no Docker engine with stevedore/busybox:local (stevedore stack build-local)"
        );
        return;
    }
    let id = std::process::id();
    let mut results = Vec::new();

    let sqlite_dir = tempfile::tempdir().expect("a data directory");
    {
        let server = serve(
            sqlite_dir.path(),
            &[
                ("STEVEDORE_RUNNER__CAPACITY", CAPACITY.to_string()),
                ("STEVEDORE_RUNNER__ID", format!("bench-sqlite-{id}")),
            ],
        )
        .await;
        results.push(("SQLite, embedded runner", measure(&[&server], tasks).await));
    }

    for (label, servers_wanted, runners_wanted) in [
        ("PostgreSQL, 1 server, 1 remote runner", 1, 1),
        ("PostgreSQL, 2 servers, 3 remote runners", 2, 3),
    ] {
        let Some(database) = stevedore_store::testcluster::fresh_database().await else {
            println!("skipped the PostgreSQL set-ups: no PostgreSQL binaries (STEVEDORE_PG_BIN)");
            break;
        };
        let env = [
            ("STEVEDORE_RUNNER__ENABLED", "false".to_owned()),
            ("STEVEDORE_DATABASE", database.url.clone()),
        ];
        let dirs: Vec<tempfile::TempDir> = (0..servers_wanted)
            .map(|_| tempfile::tempdir().expect("a data directory"))
            .collect();
        let mut servers = Vec::new();
        for dir in &dirs {
            servers.push(serve(dir.path(), &env).await);
        }
        let token = runner_token(&database.url).await;
        let runners: Vec<Process> = (0..runners_wanted)
            .map(|n| {
                runner(
                    &servers[n % servers.len()],
                    &token,
                    &format!("bench-pg-{id}-{runners_wanted}-{n}"),
                )
            })
            .collect();
        let server_refs: Vec<&Server> = servers.iter().collect();
        results.push((label, measure(&server_refs, tasks).await));
        drop(runners);
    }

    let baseline = results[0].1;
    println!();
    println!(
        "{tasks} tasks per set-up, `true` in stevedore/busybox:local, capacity {CAPACITY} per runner"
    );
    println!("{:<42} {:>10} {:>10}", "set-up", "tasks/s", "vs SQLite");
    for (label, rate) in &results {
        println!("{label:<42} {rate:>10.2} {:>9.2}x", rate / baseline);
    }
}
