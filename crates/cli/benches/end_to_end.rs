//! End-to-end task throughput: the real `stevedore serve` binary (queued over HTTP until
//! complete) next to a raw Engine API loop (create, start, wait, remove) in the same process
//! and the same run, at concurrency 1 and 4. Prints tasks/s and p50/p99 queue-to-start
//! latency, and stevedore's throughput as a fraction of the raw loop's (target: at least 0.9).
//! Asserts nothing about speed; fails loudly when a task does not complete.
//!
//! `cargo bench -p stevedore --bench end_to_end` (`STEVEDORE_BENCH_TASKS` sets the number of
//! tasks per run, default 200). Needs a Docker engine; skips with a message without one.
//!
//! The two are measured as alike as their interfaces allow:
//!
//! * all tasks are submitted at once at t0 (one `POST tasks` for stevedore; a shared counter
//!   for the raw loop's workers);
//! * throughput is tasks / (t0 to the last completion seen): for stevedore the poll that first
//!   sees every task `complete`, for the raw loop the last `wait` to return (the raw loop
//!   removes each container inline before taking the next; stevedore removes in the
//!   background);
//! * latency is queue-to-start: stevedore's `start_time - created_at` (the container's own
//!   start as the engine recorded it), the raw loop's "`start` returned" - t0.

// A benchmark fails loudly: every `expect` says what went wrong.
#![allow(clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stevedore_engine::{
    ContainerId, ContainerRuntime, ContainerSpec, DockerEngine, EngineError, HOST_BUSYBOX,
    ImageStore, LOCAL_BUSYBOX_IMAGE,
};

#[path = "support/server.rs"]
mod server;
#[path = "support/stats.rs"]
mod stats;

use server::Server;
use stats::percentile;

const CONCURRENCY_LEVELS: [usize; 2] = [1, 4];
const DEFAULT_TASKS: usize = 200;
const MEMORY_BYTES: u64 = 256 << 20;
const PER_PAGE: usize = 100;
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const RUN_DEADLINE: Duration = Duration::from_secs(900);
const RAW_RUNNER_LABEL: &str = "bench-raw";
const TARGET_RATIO: f64 = 0.9;

/// One measured run.
struct Measurement {
    run: &'static str,
    concurrency: usize,
    tasks: usize,
    elapsed: Duration,
    /// Queue-to-start latency of every task, in milliseconds.
    latencies_ms: Vec<f64>,
}

impl Measurement {
    fn throughput(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64()
    }
}

#[tokio::main]
async fn main() {
    let tasks = match std::env::var("STEVEDORE_BENCH_TASKS") {
        Ok(value) => value
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .expect("STEVEDORE_BENCH_TASKS must be a positive integer"),
        Err(_) => DEFAULT_TASKS,
    };
    let engine = match DockerEngine::connect().await {
        Ok(engine) => Arc::new(engine),
        Err(error) => {
            println!(
                "end_to_end: skipped, the Docker engine is unreachable ({error}); \
                 scripts/ensure-docker.sh installs and starts one"
            );
            return;
        }
    };
    let present = engine
        .image_present(LOCAL_BUSYBOX_IMAGE)
        .await
        .expect("ask the engine for the local busybox image");
    if !present {
        eprintln!("building {LOCAL_BUSYBOX_IMAGE} from {HOST_BUSYBOX}");
        stevedore_engine::build_local_busybox_image(
            engine.as_ref(),
            Path::new(HOST_BUSYBOX),
            LOCAL_BUSYBOX_IMAGE,
        )
        .await
        .expect("build the local busybox image (is busybox-static installed?)");
    }

    let mut measurements = Vec::new();
    for (run, concurrency) in CONCURRENCY_LEVELS.into_iter().enumerate() {
        // Alternate per level, so machine noise hits both alike.
        eprintln!("raw engine loop: {tasks} tasks at concurrency {concurrency}");
        measurements.push(raw_run(engine.clone(), concurrency, tasks).await);
        let runner_id = format!("bench-{}-{run}", std::process::id());
        eprintln!("stevedore ({runner_id}): {tasks} tasks at concurrency {concurrency}");
        measurements.push(stevedore_run(engine.as_ref(), concurrency, tasks, &runner_id).await);
    }
    print_table(&measurements);
}

// === the raw Engine API loop ===

async fn raw_run(engine: Arc<DockerEngine>, concurrency: usize, tasks: usize) -> Measurement {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let engine = engine.clone();
        let next = next.clone();
        workers.spawn(async move {
            // (latency since t0 at start, time since t0 when the wait returned)
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    return Ok::<_, String>(done);
                }
                done.push(raw_task(engine.as_ref(), t0, i).await?);
            }
        });
    }
    let mut latencies_ms = Vec::with_capacity(tasks);
    let mut last_completion = Duration::ZERO;
    while let Some(joined) = workers.join_next().await {
        let done = joined
            .expect("a raw worker panicked")
            .unwrap_or_else(|error| panic!("the raw engine loop failed: {error}"));
        for (started, completed) in done {
            latencies_ms.push(started.as_secs_f64() * 1000.0);
            last_completion = last_completion.max(completed);
        }
    }
    let leftovers = engine
        .list_labeled("stevedore.runner", RAW_RUNNER_LABEL)
        .await
        .expect("list the raw loop's containers");
    assert!(
        leftovers.is_empty(),
        "the raw loop left containers behind: {leftovers:?}"
    );
    Measurement {
        run: "raw engine",
        concurrency,
        tasks,
        elapsed: last_completion,
        latencies_ms,
    }
}

/// Create, start, wait, remove: returns when the container started and when it finished,
/// both measured from t0.
async fn raw_task(
    engine: &DockerEngine,
    t0: Instant,
    i: usize,
) -> Result<(Duration, Duration), String> {
    let mut spec = ContainerSpec::new(LOCAL_BUSYBOX_IMAGE);
    spec.cmd = Some(vec!["true".to_owned()]);
    spec.memory_bytes = Some(MEMORY_BYTES);
    spec.labels
        .insert("stevedore.task".to_owned(), format!("bench-raw-{i}"));
    spec.labels
        .insert("stevedore.runner".to_owned(), RAW_RUNNER_LABEL.to_owned());
    let id = engine
        .create(&spec)
        .await
        .map_err(|error| format!("create {i}: {error}"))?;
    let ran = run_created(engine, &id, t0).await;
    let removed = engine.remove(&id).await;
    let (started, completed, status) = ran.map_err(|error| format!("task {i}: {error}"))?;
    removed.map_err(|error| format!("remove {i}: {error}"))?;
    if !status.success() {
        return Err(format!("task {i} ended {status:?}"));
    }
    Ok((started, completed))
}

async fn run_created(
    engine: &DockerEngine,
    id: &ContainerId,
    t0: Instant,
) -> Result<(Duration, Duration, stevedore_engine::ExitStatus), EngineError> {
    engine.start(id).await?;
    let started = t0.elapsed();
    let status = engine.wait(id).await?;
    Ok((started, t0.elapsed(), status))
}

// === stevedore end to end ===

async fn stevedore_run(
    engine: &DockerEngine,
    concurrency: usize,
    tasks: usize,
    runner_id: &str,
) -> Measurement {
    let data_dir = tempfile::tempdir().expect("a temporary data directory");
    let mut server = Server::start(data_dir.path(), concurrency, runner_id, &[]).await;
    let client = reqwest::Client::new();

    // Registering the code also waits for the server to serve, which it does only once the
    // embedded runner has started: nothing of the start-up is in the measurement.
    let uploaded = client
        .post(server.url("codes"))
        .header("Authorization", server.authorization())
        .json(&json!({"name": "bench", "image": LOCAL_BUSYBOX_IMAGE, "command": "true"}))
        .send()
        .await
        .expect("POST codes");
    let status = uploaded.status();
    let body = uploaded.text().await.unwrap_or_default();
    assert!(status.is_success(), "POST codes answered {status}: {body}");

    let batch: Vec<Value> = (0..tasks).map(|_| json!({"code_name": "bench"})).collect();
    let t0 = Instant::now();
    let queued = client
        .post(server.url("tasks"))
        .header("Authorization", server.authorization())
        .json(&json!({ "tasks": batch }))
        .send()
        .await
        .expect("POST tasks");
    let status = queued.status();
    let body: Value = queued.json().await.expect("POST tasks answers JSON");
    assert!(status.is_success(), "POST tasks answered {status}: {body}");
    let ids: Vec<String> = body["tasks"]
        .as_array()
        .expect("POST tasks answers a task list")
        .iter()
        .map(|task| {
            task["id"]
                .as_str()
                .expect("a queued task has an id")
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), tasks, "POST tasks queued {} tasks", ids.len());

    let mut seen: HashMap<String, Value> = HashMap::new();
    let mut last_report = Instant::now();
    let elapsed = loop {
        server.assert_running();
        for page in 0.. {
            let listed: Value = client
                .get(server.url(&format!("tasks?per_page={PER_PAGE}&page={page}")))
                .header("Authorization", server.authorization())
                .send()
                .await
                .expect("GET tasks")
                .error_for_status()
                .expect("GET tasks succeeds")
                .json()
                .await
                .expect("GET tasks answers JSON");
            let listed = listed["tasks"]
                .as_array()
                .expect("GET tasks answers a task list");
            for task in listed {
                let id = task["id"].as_str().expect("a listed task has an id");
                seen.insert(id.to_owned(), task.clone());
            }
            if listed.len() < PER_PAGE {
                break;
            }
        }
        let mut complete = 0;
        for id in &ids {
            let Some(task) = seen.get(id) else { continue };
            match task["status"].as_str() {
                Some("complete") => complete += 1,
                Some("error" | "cancelled" | "timeout") => {
                    panic!("task {id} did not complete: {task}")
                }
                _ => {}
            }
        }
        if complete == ids.len() {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < RUN_DEADLINE,
            "only {complete} of {tasks} tasks completed within {RUN_DEADLINE:?}"
        );
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!("  {complete}/{tasks} complete after {:.0?}", t0.elapsed());
            last_report = Instant::now();
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };

    let latencies_ms = ids
        .iter()
        .map(|id| {
            let task = &seen[id];
            let time = |field: &str| {
                let text = task[field]
                    .as_str()
                    .unwrap_or_else(|| panic!("task {id} has no {field}: {task}"));
                chrono::DateTime::parse_from_rfc3339(text)
                    .unwrap_or_else(|error| panic!("task {id}: {field} {text:?}: {error}"))
            };
            let latency = time("start_time") - time("created_at");
            latency.num_microseconds().expect("a latency fits") as f64 / 1000.0
        })
        .collect();

    server.terminate().await;
    let leftovers = engine
        .list_labeled("stevedore.runner", runner_id)
        .await
        .expect("list the runner's containers");
    if !leftovers.is_empty() {
        eprintln!(
            "warning: runner {runner_id} left {} containers after SIGTERM: {leftovers:?}",
            leftovers.len()
        );
    }
    Measurement {
        run: "stevedore",
        concurrency,
        tasks,
        elapsed,
        latencies_ms,
    }
}

// === the report ===

fn print_table(measurements: &[Measurement]) {
    println!();
    println!(
        "{:<12} {:>11} {:>6} {:>9} {:>9} {:>9}",
        "run", "concurrency", "tasks", "tasks/s", "p50 ms", "p99 ms"
    );
    for m in measurements {
        let mut sorted = m.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{:<12} {:>11} {:>6} {:>9.2} {:>9.1} {:>9.1}",
            m.run,
            m.concurrency,
            m.tasks,
            m.throughput(),
            percentile(&sorted, 50.0),
            percentile(&sorted, 99.0)
        );
    }
    println!();
    for concurrency in CONCURRENCY_LEVELS {
        let throughput = |run: &str| {
            measurements
                .iter()
                .find(|m| m.run == run && m.concurrency == concurrency)
                .map(Measurement::throughput)
        };
        if let (Some(stevedore), Some(raw)) = (throughput("stevedore"), throughput("raw engine")) {
            let ratio = stevedore / raw;
            let verdict = if ratio >= TARGET_RATIO {
                "meets"
            } else {
                "MISSES"
            };
            println!(
                "concurrency {concurrency}: stevedore/raw throughput {ratio:.3} \
                 ({verdict} the target of {TARGET_RATIO})"
            );
        }
    }
}
