//! Enqueue throughput through the HTTP API, next to the store's own enqueue measured in the
//! same run as the baseline. Prints figures; asserts nothing about speed.
//!
//! Two shapes of traffic: batches of 100 tasks from a few clients (a producer that batches),
//! and single-task `POST tasks` from many concurrent clients (a web application queueing one
//! task per request of its own), where each request pays for its own HTTP exchange, token
//! lookup, code lookup, quota check and commit unless the store shares commits between
//! concurrent requests.
//!
//! `cargo bench -p stevedore-server --bench enqueue_throughput` (STEVEDORE_BENCH_TASKS sets
//! the number of tasks per batched run, default 100000; the single-task runs queue a tenth of
//! that).

// A benchmark binary: failing loudly on a broken set-up is what it should do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use stevedore_model::{Clock, NewTask, QuotaLimits, SystemClock};
use stevedore_server::{AppState, ServerConfig, bootstrap};
use stevedore_store::{SqliteOptions, SqliteStore, Store, SyncMode};

/// Concurrent clients sending batches.
const BATCH_CLIENTS: usize = 4;
/// Concurrent clients sending one task per request.
const SINGLE_CLIENTS: usize = 32;

struct Setup {
    store: Arc<dyn Store>,
    base: String,
    token: String,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every run queues into one project, more tasks than its default queued-tasks quota; the
    // quota is still checked on every enqueue, against a limit the runs do not reach.
    let quotas = QuotaLimits {
        queued_tasks: u64::MAX,
        ..QuotaLimits::default()
    };
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(SqliteOptions {
            path: dir.path().join("bench.db"),
            sync: SyncMode::Normal,
        })
        .await
        .expect("open store")
        .with_quota_defaults(quotas),
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

/// Queues `total` tasks over HTTP in batches of `batch` from `clients` concurrent clients.
async fn http_enqueue(setup: &Setup, total: usize, batch: usize, clients: usize) -> f64 {
    let started = Instant::now();
    let per_client = total / clients;
    let mut running = Vec::new();
    for _ in 0..clients {
        let url = format!("{}/tasks", setup.base);
        let auth = format!("OAuth {}", setup.token);
        running.push(tokio::spawn(async move {
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
    for client in running {
        client.await.expect("client");
    }
    (per_client / batch * batch * clients) as f64 / started.elapsed().as_secs_f64()
}

/// The same through the store directly, from `callers` concurrent callers: the ceiling HTTP
/// can approach.
async fn store_enqueue(
    setup: &Setup,
    project_id: &str,
    total: usize,
    batch: usize,
    callers: usize,
) -> f64 {
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
    let per_caller = total / callers / batch;
    let started = Instant::now();
    let mut running = Vec::new();
    for _ in 0..callers {
        let (store, project_id, tasks) = (
            Arc::clone(&setup.store),
            project_id.to_owned(),
            tasks.clone(),
        );
        running.push(tokio::spawn(async move {
            for _ in 0..per_caller {
                store
                    .enqueue(&project_id, &tasks, SystemClock.now())
                    .await
                    .expect("enqueue");
            }
        }));
    }
    for caller in running {
        caller.await.expect("caller");
    }
    (per_caller * batch * callers) as f64 / started.elapsed().as_secs_f64()
}

/// One line of the table.
fn row(run: &str, tasks: usize, per_sec: f64, baseline: f64) {
    println!(
        "{run:<44} {tasks:>8} {per_sec:>10.0} {:>8.2}",
        per_sec / baseline
    );
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::var("STEVEDORE_BENCH_TASKS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100_000);
    let setup = setup().await;
    let project_id = setup.base.rsplit('/').next().unwrap_or_default().to_owned();

    println!("enqueue throughput, SQLite (synchronous=NORMAL)");
    println!(
        "{:<44} {:>8} {:>10} {:>8}",
        "run", "tasks", "tasks/s", "ratio"
    );
    let store_100 = store_enqueue(&setup, &project_id, total, 100, 1).await;
    row(
        "store, batches of 100, 1 caller (baseline)",
        total,
        store_100,
        store_100,
    );
    let http_100 = http_enqueue(&setup, total, 100, BATCH_CLIENTS).await;
    row(
        &format!("HTTP, batches of 100, {BATCH_CLIENTS} clients"),
        total,
        http_100,
        store_100,
    );
    let singles = (total / 10).max(SINGLE_CLIENTS);
    let store_1 = store_enqueue(&setup, &project_id, singles, 1, 1).await;
    row(
        "store, single tasks, 1 caller (baseline)",
        singles,
        store_1,
        store_1,
    );
    let store_1_concurrent = store_enqueue(&setup, &project_id, singles, 1, SINGLE_CLIENTS).await;
    row(
        &format!("store, single tasks, {SINGLE_CLIENTS} callers"),
        singles,
        store_1_concurrent,
        store_1,
    );
    let http_1 = http_enqueue(&setup, singles, 1, SINGLE_CLIENTS).await;
    row(
        &format!("HTTP, single tasks, {SINGLE_CLIENTS} clients"),
        singles,
        http_1,
        store_1,
    );
}
