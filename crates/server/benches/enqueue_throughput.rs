//! Enqueue throughput through the HTTP API, next to the store's own enqueue measured in the
//! same run as the baseline. Prints figures; asserts nothing about speed.
//!
//! `cargo bench -p stevedore-server --bench enqueue_throughput` (STEVEDORE_BENCH_TASKS sets
//! the number of tasks per batched run, default 100000).

// A benchmark binary: failing loudly on a broken set-up is what it should do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use stevedore_model::{Clock, NewTask, SystemClock};
use stevedore_server::{AppState, ServerConfig, bootstrap};
use stevedore_store::{SqliteOptions, SqliteStore, Store, SyncMode};

const CLIENTS: usize = 4;

struct Setup {
    store: Arc<dyn Store>,
    base: String,
    token: String,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(SqliteOptions {
            path: dir.path().join("bench.db"),
            sync: SyncMode::Normal,
        })
        .await
        .expect("open store"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let iron = bootstrap::ensure_default_project(
        store.as_ref(),
        dir.path(),
        "127.0.0.1",
        port,
        SystemClock.now(),
    )
    .await
    .expect("bootstrap");
    let state = AppState::new(
        store.clone(),
        Arc::new(SystemClock),
        Arc::new(ServerConfig::default()),
        None,
        Arc::new(stevedore_store::CredentialVault::new(
            &stevedore_store::CredentialKey::generate().expect("a key"),
        )),
    );
    tokio::spawn(stevedore_server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    let base = format!("http://127.0.0.1:{port}/2/projects/{}", iron.project_id);
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/codes"))
        .header("Authorization", format!("OAuth {}", iron.token))
        .json(&json!({"name": "bench", "image": "stevedore/busybox:local", "command": "true"}))
        .send()
        .await
        .expect("create code");
    assert!(response.status().is_success());
    Setup {
        store,
        base,
        token: iron.token,
        _dir: dir,
    }
}

/// Queues `total` tasks over HTTP in batches of `batch` from `CLIENTS` concurrent clients.
async fn http_enqueue(setup: &Setup, total: usize, batch: usize) -> f64 {
    let started = Instant::now();
    let per_client = total / CLIENTS;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let url = format!("{}/tasks", setup.base);
        let auth = format!("OAuth {}", setup.token);
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let tasks: Vec<_> = (0..batch)
                .map(|i| json!({"code_name": "bench", "payload": format!("{{\"n\":{i}}}")}))
                .collect();
            let body = json!({ "tasks": tasks }).to_string();
            for _ in 0..per_client / batch {
                let response = client
                    .post(&url)
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("enqueue");
                assert!(response.status().is_success(), "{}", response.status());
            }
        }));
    }
    for client in clients {
        client.await.expect("client");
    }
    (per_client / batch * batch * CLIENTS) as f64 / started.elapsed().as_secs_f64()
}

/// The same through the store directly: the ceiling HTTP can approach.
async fn store_enqueue(setup: &Setup, project_id: &str, total: usize, batch: usize) -> f64 {
    let tasks: Vec<NewTask> = (0..batch)
        .map(|i| NewTask {
            code_name: "bench".into(),
            payload: format!("{{\"n\":{i}}}"),
            priority: 0,
            timeout_secs: 3600,
            delay_secs: 0,
            label: None,
            cluster: "default".into(),
            retry_count: 0,
            original_task_id: None,
            schedule_id: None,
            code_rev: None,
        })
        .collect();
    let started = Instant::now();
    for _ in 0..total / batch {
        setup
            .store
            .enqueue(project_id, &tasks, SystemClock.now())
            .await
            .expect("enqueue");
    }
    (total / batch * batch) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::var("STEVEDORE_BENCH_TASKS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100_000);
    let setup = setup().await;
    let project_id = setup.base.rsplit('/').next().unwrap_or_default().to_owned();

    println!("enqueue throughput, SQLite (synchronous=NORMAL), {CLIENTS} HTTP clients");
    println!(
        "{:<34} {:>10} {:>12} {:>8}",
        "run", "tasks", "tasks/s", "ratio"
    );
    let store_100 = store_enqueue(&setup, &project_id, total, 100).await;
    println!(
        "{:<34} {:>10} {:>12.0} {:>8}",
        "store, batches of 100 (baseline)", total, store_100, "1.00"
    );
    let http_100 = http_enqueue(&setup, total, 100).await;
    println!(
        "{:<34} {:>10} {:>12.0} {:>8.2}",
        "HTTP, batches of 100",
        total,
        http_100,
        http_100 / store_100
    );
    let singles = (total / 10).max(CLIENTS);
    let store_1 = store_enqueue(&setup, &project_id, singles, 1).await;
    println!(
        "{:<34} {:>10} {:>12.0} {:>8}",
        "store, batches of 1 (baseline)", singles, store_1, "1.00"
    );
    let http_1 = http_enqueue(&setup, singles, 1).await;
    println!(
        "{:<34} {:>10} {:>12.0} {:>8.2}",
        "HTTP, batches of 1",
        singles,
        http_1,
        http_1 / store_1
    );
}
