//! The API's latency while every slot of `serve`'s runner runs a CPU-bound task: the real
//! `stevedore serve` binary, its slots filled with busy loops, and `GET tasks` asked over and
//! over meanwhile. Three runs, in one process and one sitting so machine noise hits all alike:
//!
//! * `idle`: no task runs (the baseline);
//! * `unlimited`: tasks without a CPU limit and no reserve (`runner.default_cpus = 0`,
//!   `runner.reserve_cpus = 0`: stevedore before engine hygiene);
//! * `reserve`: the defaults of `serve` (a task gets 1 CPU, all tasks together the cores less
//!   half a core).
//!
//! Prints p50/p99/max of the API's answers and the `unlimited`/`reserve` ratio of the p99.
//! Asserts nothing about speed; fails loudly when the server or a task misbehaves.
//!
//! `cargo bench -p stevedore --bench cpu_reserve` (`STEVEDORE_BENCH_REQUESTS` sets the
//! requests per run, default 400; `STEVEDORE_BENCH_SLOTS` the tasks, default 4 per core).
//! Needs a Docker engine; skips with a message without one. The reserve needs root on the
//! engine's host (a cgroup of its own); without it `serve` warns and the run shows no reserve.

// A benchmark fails loudly: every `expect` says what went wrong.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stevedore_engine::{ContainerRuntime, DockerEngine, ImageStore, LOCAL_BUSYBOX_IMAGE};

#[path = "support/server.rs"]
mod server;
#[path = "support/stats.rs"]
mod stats;

use server::Server;
use stats::percentile;

const DEFAULT_REQUESTS: usize = 400;
const REQUEST_PAUSE: Duration = Duration::from_millis(10);
const TASK_TIMEOUT_SECS: u64 = 600;

/// One run's settings for `serve`'s runner.
struct Run {
    name: &'static str,
    busy: bool,
    env: &'static [(&'static str, &'static str)],
}

/// Each busy configuration runs twice, alternating, so that load from outside that comes and
/// goes hits both alike; their answers are pooled.
const RUNS: [Run; 5] = [
    Run {
        name: "idle",
        busy: false,
        env: &[],
    },
    Run {
        name: "unlimited",
        busy: true,
        env: &[
            ("STEVEDORE_RUNNER__DEFAULT_CPUS", "0"),
            ("STEVEDORE_RUNNER__RESERVE_CPUS", "0"),
        ],
    },
    Run {
        name: "reserve",
        busy: true,
        env: &[],
    },
    Run {
        name: "unlimited",
        busy: true,
        env: &[
            ("STEVEDORE_RUNNER__DEFAULT_CPUS", "0"),
            ("STEVEDORE_RUNNER__RESERVE_CPUS", "0"),
        ],
    },
    Run {
        name: "reserve",
        busy: true,
        env: &[],
    },
];

#[tokio::main]
async fn main() {
    let requests = env_count("STEVEDORE_BENCH_REQUESTS").unwrap_or(DEFAULT_REQUESTS);
    let engine = match DockerEngine::connect().await {
        Ok(engine) => engine,
        Err(error) => {
            println!("cpu_reserve: skipped, the Docker engine is unreachable ({error})");
            return;
        }
    };
    assert!(
        engine
            .image_present(LOCAL_BUSYBOX_IMAGE)
            .await
            .expect("ask the engine for the local busybox image"),
        "{LOCAL_BUSYBOX_IMAGE} is missing: `stevedore stack build-local busybox` makes it"
    );
    let ncpu = engine
        .capabilities()
        .await
        .expect("the engine's capabilities")
        .ncpu;
    let slots = env_count("STEVEDORE_BENCH_SLOTS").unwrap_or(4 * ncpu as usize);
    eprintln!("{ncpu} cores, {slots} slots, {requests} requests per run");

    let mut results: Vec<(&str, Vec<f64>)> = Vec::new();
    for (index, run) in RUNS.iter().enumerate() {
        let runner_id = format!("bench-cpu-{}-{index}", std::process::id());
        eprintln!("{}: starting", run.name);
        let latencies = measure(run, slots, requests, &runner_id).await;
        let leftovers = engine
            .list_labeled("stevedore.runner", &runner_id)
            .await
            .expect("list the runner's containers");
        for id in leftovers {
            let _ = engine.remove(&id).await;
        }
        match results.iter_mut().find(|(name, _)| *name == run.name) {
            Some((_, pooled)) => pooled.extend(latencies),
            None => results.push((run.name, latencies)),
        }
    }

    println!();
    println!(
        "{:<10} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "run", "slots", "answers", "p50 ms", "p99 ms", "max ms"
    );
    let mut p99 = std::collections::HashMap::new();
    for (name, mut latencies) in results {
        latencies.sort_by(f64::total_cmp);
        let busy = if name == "idle" { 0 } else { slots };
        println!(
            "{name:<10} {busy:>6} {:>9} {:>9.2} {:>9.2} {:>9.2}",
            latencies.len(),
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            latencies.last().copied().unwrap_or_default()
        );
        p99.insert(name, percentile(&latencies, 99.0));
    }
    if let (Some(unlimited), Some(reserve)) = (p99.get("unlimited"), p99.get("reserve")) {
        println!();
        println!(
            "API p99 with every slot busy: {unlimited:.2} ms unlimited, {reserve:.2} ms with the \
             reserve ({:.1}x)",
            unlimited / reserve
        );
    }
}

/// Starts `serve` for `run`, fills its slots (when the run is busy), and times `requests`
/// answers of `GET tasks`, in milliseconds.
async fn measure(run: &Run, slots: usize, requests: usize, runner_id: &str) -> Vec<f64> {
    let data_dir = tempfile::tempdir().expect("a temporary data directory");
    // The running tasks are killed at once when the run ends.
    let mut env = vec![("STEVEDORE_RUNNER__SHUTDOWN_GRACE_SECS", "0")];
    env.extend_from_slice(run.env);
    let mut server = Server::start(data_dir.path(), slots, runner_id, &env).await;
    let client = reqwest::Client::new();
    let uploaded = client
        .post(server.url("codes"))
        .header("Authorization", server.authorization())
        .json(&json!({
            "name": "spin",
            "image": LOCAL_BUSYBOX_IMAGE,
            "command": "while :; do :; done",
            "network": "none",
        }))
        .send()
        .await
        .expect("POST codes");
    assert!(uploaded.status().is_success(), "POST codes: {uploaded:?}");

    if run.busy {
        let batch: Vec<Value> = (0..slots)
            .map(|_| json!({"code_name": "spin", "timeout": TASK_TIMEOUT_SECS}))
            .collect();
        let queued = client
            .post(server.url("tasks"))
            .header("Authorization", server.authorization())
            .json(&json!({ "tasks": batch }))
            .send()
            .await
            .expect("POST tasks");
        assert!(queued.status().is_success(), "POST tasks: {queued:?}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while running(&client, &server).await < slots {
            server.assert_running();
            assert!(
                Instant::now() < deadline,
                "the slots did not fill in 2 minutes"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let the busy loops settle on the cores.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let asked = Instant::now();
        client
            .get(server.url("tasks?per_page=30"))
            .header("Authorization", server.authorization())
            .send()
            .await
            .expect("GET tasks")
            .error_for_status()
            .expect("GET tasks succeeds")
            .bytes()
            .await
            .expect("GET tasks answers");
        latencies.push(asked.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(REQUEST_PAUSE).await;
    }
    server.terminate().await;
    latencies
}

/// How many of the project's tasks run now.
async fn running(client: &reqwest::Client, server: &Server) -> usize {
    let listed: Value = client
        .get(server.url("tasks?per_page=100&running=1"))
        .header("Authorization", server.authorization())
        .send()
        .await
        .expect("GET tasks")
        .json()
        .await
        .expect("GET tasks answers JSON");
    listed["tasks"]
        .as_array()
        .map(|tasks| {
            tasks
                .iter()
                .filter(|task| task["status"] == "running")
                .count()
        })
        .unwrap_or(0)
}

fn env_count(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|value| {
        value
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name} must be a positive integer"))
    })
}
