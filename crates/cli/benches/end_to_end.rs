//! End-to-end task throughput: the real `stevedore serve` binary (queued over HTTP until
//! complete) next to a raw Engine API loop (create, start, wait, remove) in the same process
//! and the same run, at concurrency 1 and 4. Prints tasks/s and p50/p99 queue-to-start
//! latency, and stevedore's throughput as a fraction of the raw loop's (target: at least 1.0).
//! Asserts nothing about speed; fails loudly when a task does not complete.
//!
//! Where the time goes, per task and per run: the CPU the engine's processes spent (`dockerd`,
//! `containerd`, the shims, read from `/proc`), the CPU of the client (`serve` for stevedore,
//! this process for the raw loop), and every Engine API request about a task's container,
//! with how many a task made and how long each took on average (the raw loop's from its own
//! engine's observer, stevedore's from `serve`'s `stevedore_engine_request_duration_seconds`).
//!
//! Beside them, in the same rounds, the same tasks through `serve --engine oci` (the direct OCI
//! runtime, "stevedore oci"), with its throughput as a multiple of the Docker path's and of
//! the raw loop's (target: at least 40 tasks/s, queue-to-start p50 under 20 ms). Its engine
//! is the runtime processes `serve` starts, so its engine CPU column stays empty and its
//! client CPU holds `serve` with the runtime processes it reaped.
//! `STEVEDORE_BENCH_OCI=0` leaves it out.
//!
//! `cargo bench -p stevedore --bench end_to_end` (`STEVEDORE_BENCH_TASKS` sets the number of
//! tasks per run, default 200). Needs a Docker engine; skips with a message without one.
//!
//! The two are measured as alike as their interfaces allow:
//!
//! * each concurrency level runs in rounds (`STEVEDORE_BENCH_ROUNDS`, default 4): a batch of
//!   the raw loop and a batch of stevedore (one `serve` for the level), each going first in
//!   turn, added up, so that noise from the rest of a shared machine hits both alike;
//! * a batch's tasks are submitted at once at t0 (one `POST tasks` for stevedore; a shared
//!   counter for the raw loop's workers);
//! * throughput is tasks / (t0 to the last completion): for stevedore the latest `updated_at`
//!   of its tasks once a listing (every 500 ms, so that listings cost `serve` little) sees
//!   every task `complete`, which is when the store recorded the last one, for the raw loop the
//!   last `wait` to return (the raw loop removes each container inline before taking the next;
//!   stevedore removes in the background);
//! * latency is queue-to-start: stevedore's `start_time - created_at` (the container's own
//!   start as the engine recorded it), the raw loop's "`start` returned" - t0;
//! * the raw loop's containers join the network stevedore's tasks join (the runner's managed
//!   task network, `stevedore-tasks`), as the in-container contract has every task on an
//!   isolated network: on Docker a network of one's own costs the engine more per container
//!   than its default bridge (Docker sets up its embedded DNS in each container of such a
//!   network). Set `STEVEDORE_BENCH_RAW_NETWORK` to run the raw loop on another (`bridge`:
//!   Docker's default, the yardstick of the first measurements);
//! * the raw loop's containers get a network namespace each, as a bare Engine API loop's do,
//!   where `serve`'s tasks join network holders (containers already on the network, one task
//!   at a time). `STEVEDORE_BENCH_RAW_HOLDERS=1` has the raw loop join holders too (through
//!   the same engine code), to compare the rest of the path alone.

// A benchmark fails loudly: every `expect` says what went wrong.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stevedore_engine::{
    ContainerId, ContainerRuntime, ContainerSpec, DockerEngine, EngineError, EngineRequest,
    HOST_BUSYBOX, ImageStore, LABEL_NETWORK_HOLDER, LOCAL_BUSYBOX_IMAGE,
};

#[path = "support/engine_cpu.rs"]
mod engine_cpu;
#[path = "support/server.rs"]
mod server;
#[path = "support/stats.rs"]
mod stats;

use engine_cpu::{EngineCpu, EngineCpuMeter, process_cpu};
use server::Server;
use stats::percentile;

const CONCURRENCY_LEVELS: [usize; 2] = [1, 4];
const DEFAULT_TASKS: usize = 200;
const DEFAULT_ROUNDS: usize = 4;
const MEMORY_BYTES: u64 = 256 << 20;
const PER_PAGE: usize = 100;
/// How often stevedore's tasks are listed: seldom, as each listing costs `serve` CPU that the
/// raw loop does not spend (a listing every 50 ms was a third of `serve`'s CPU per task), and
/// the end of the run is read from the tasks' own times, not from when a listing saw it.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
const RUN_DEADLINE: Duration = Duration::from_secs(900);
const RAW_RUNNER_LABEL: &str = "bench-raw";
const TARGET_RATIO: f64 = 1.0;
/// What the OCI path aims at: tasks/s, and queue-to-start p50 in ms.
const OCI_TARGET_THROUGHPUT: f64 = 40.0;
const OCI_TARGET_P50_MS: f64 = 20.0;
const ENGINE_REQUEST_METRIC: &str = "stevedore_engine_request_duration_seconds";

/// One measured run.
struct Measurement {
    run: &'static str,
    concurrency: usize,
    tasks: usize,
    elapsed: Duration,
    /// Queue-to-start latency of every task, in milliseconds.
    latencies_ms: Vec<f64>,
    /// What the engine's processes spent during the run.
    engine_cpu: EngineCpu,
    /// What the client spent: `serve` for stevedore, this process for the raw loop.
    client_cpu: f64,
    /// Every Engine API request about a task's container: how many, and their summed seconds.
    requests: RequestTally,
}

/// Engine API requests by kind: (count, summed seconds).
type RequestTally = BTreeMap<EngineRequest, (u64, f64)>;

impl Measurement {
    /// A measurement of nothing yet, for rounds to add to.
    fn none(run: &'static str, concurrency: usize) -> Measurement {
        Measurement {
            run,
            concurrency,
            tasks: 0,
            elapsed: Duration::ZERO,
            latencies_ms: Vec::new(),
            engine_cpu: EngineCpu::default(),
            client_cpu: 0.0,
            requests: RequestTally::new(),
        }
    }

    /// Adds a round's measurement.
    fn add(&mut self, round: Measurement) {
        self.tasks += round.tasks;
        self.elapsed += round.elapsed;
        self.latencies_ms.extend(round.latencies_ms);
        self.engine_cpu = self.engine_cpu.plus(&round.engine_cpu);
        self.client_cpu += round.client_cpu;
        for (request, (count, seconds)) in round.requests {
            let entry = self.requests.entry(request).or_default();
            entry.0 += count;
            entry.1 += seconds;
        }
    }

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
    let tally: Arc<Mutex<RequestTally>> = Arc::default();
    let observed = tally.clone();
    let engine = match DockerEngine::connect().await {
        Ok(engine) => Arc::new(raw_network_namespaces(engine).observe_requests(Arc::new(
            move |request, took| {
                let mut tally = observed.lock().unwrap_or_else(PoisonError::into_inner);
                let entry = tally.entry(request).or_default();
                entry.0 += 1;
                entry.1 += took.as_secs_f64();
            },
        ))),
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

    let raw_network = match std::env::var("STEVEDORE_BENCH_RAW_NETWORK") {
        Ok(network) => network,
        Err(_) => {
            let spec = stevedore_runner::TaskNetworkConfig::default().spec;
            engine
                .ensure_network(&spec)
                .await
                .expect("make sure of the task network");
            spec.name
        }
    };
    eprintln!("the raw loop runs on the network {raw_network}");
    let rounds = match std::env::var("STEVEDORE_BENCH_ROUNDS") {
        Ok(value) => value
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=tasks).contains(n))
            .expect("STEVEDORE_BENCH_ROUNDS must be between 1 and the number of tasks"),
        Err(_) => DEFAULT_ROUNDS.min(tasks),
    };
    let with_oci = std::env::var("STEVEDORE_BENCH_OCI").map_or(true, |value| value != "0");
    let meter = EngineCpuMeter::start();
    let mut measurements = Vec::new();
    let mut idle_starts: Vec<(&str, Vec<f64>)> = Vec::new();
    for (run, concurrency) in CONCURRENCY_LEVELS.into_iter().enumerate() {
        let runner_id = format!("bench-{}-{run}", std::process::id());
        let mut stevedore = Stevedore::start(concurrency, &runner_id, "docker").await;
        let mut oci = match with_oci {
            true => Some(Stevedore::start(concurrency, &format!("{runner_id}-oci"), "oci").await),
            false => None,
        };
        let mut raw_total = Measurement::none("raw engine", concurrency);
        let mut stevedore_total = Measurement::none("stevedore", concurrency);
        let mut oci_total = Measurement::none("stevedore oci", concurrency);
        // Rounds rotate the runs, each going first in turn, so that noise from the rest of
        // the machine (other builds, other users of the engine) hits them alike.
        for round in 0..rounds {
            let batch = tasks / rounds + usize::from(round < tasks % rounds);
            let mut turns = vec![Turn::Raw, Turn::Docker];
            if oci.is_some() {
                turns.push(Turn::Oci);
            }
            let first = round % turns.len();
            turns.rotate_left(first);
            for turn in turns {
                if turn == Turn::Oci {
                    if let Some(oci) = &mut oci {
                        eprintln!("stevedore oci: {batch} tasks at concurrency {concurrency}");
                        let mut measured = oci.batch(&meter, concurrency, batch).await;
                        measured.run = "stevedore oci";
                        measured.engine_cpu = EngineCpu::default();
                        oci_total.add(measured);
                    }
                } else if turn == Turn::Raw {
                    eprintln!("raw engine loop: {batch} tasks at concurrency {concurrency}");
                    tally.lock().unwrap_or_else(PoisonError::into_inner).clear();
                    let mut raw =
                        raw_run(engine.clone(), &meter, &raw_network, concurrency, batch).await;
                    raw.requests =
                        std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner));
                    raw_total.add(raw);
                } else {
                    eprintln!(
                        "stevedore ({runner_id}): {batch} tasks at concurrency {concurrency}"
                    );
                    stevedore_total.add(stevedore.batch(&meter, concurrency, batch).await);
                }
            }
        }
        if concurrency == 1 {
            // Queue-to-start of a task alone on an idle runner: what a batch's latencies,
            // which include the wait behind the batch's other tasks, do not show.
            idle_starts.push(("stevedore", stevedore.idle_starts(&meter).await));
            if let Some(oci) = &mut oci {
                idle_starts.push(("stevedore oci", oci.idle_starts(&meter).await));
            }
        }
        stevedore.stop(engine.as_ref()).await;
        measurements.push(raw_total);
        measurements.push(stevedore_total);
        if let Some(oci) = oci {
            oci.stop(engine.as_ref()).await;
            measurements.push(oci_total);
        }
    }
    engine.remove_idle_network_holders().await;
    print_table(&measurements);
    print_idle_starts(&idle_starts);
    print_breakdown(&measurements);
}

/// Tasks queued one at a time, each once the last completed.
const IDLE_STARTS: usize = 20;

/// Queue-to-start of single tasks on an idle runner, per run.
fn print_idle_starts(idle_starts: &[(&str, Vec<f64>)]) {
    println!();
    println!(
        "{:<14} {:>6} {:>9} {:>9}   (queue-to-start of one task at a time, idle runner)",
        "run", "tasks", "p50 ms", "p99 ms"
    );
    for (run, latencies) in idle_starts {
        let mut sorted = latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = percentile(&sorted, 50.0);
        let verdict = match *run {
            "stevedore oci" if p50 < OCI_TARGET_P50_MS => " (meets the OCI target)",
            "stevedore oci" => " (MISSES the OCI target)",
            _ => "",
        };
        println!(
            "{:<14} {:>6} {:>9.1} {:>9.1}{verdict}",
            run,
            sorted.len(),
            p50,
            percentile(&sorted, 99.0)
        );
    }
}

/// Which run a round's turn is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Raw,
    Docker,
    Oci,
}

// === the raw Engine API loop ===

async fn raw_run(
    engine: Arc<DockerEngine>,
    meter: &EngineCpuMeter,
    network: &str,
    concurrency: usize,
    tasks: usize,
) -> Measurement {
    let next = Arc::new(AtomicUsize::new(0));
    let own_pid = std::process::id();
    let (engine_before, client_before) = (meter.read(), process_cpu(own_pid).unwrap_or(0.0));
    let t0 = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let engine = engine.clone();
        let next = next.clone();
        let network = network.to_owned();
        workers.spawn(async move {
            // (latency since t0 at start, time since t0 when the wait returned)
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    return Ok::<_, String>(done);
                }
                done.push(raw_task(engine.as_ref(), &network, t0, i).await?);
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
    let engine_cpu = meter.read().since(&engine_before);
    let client_cpu = process_cpu(own_pid).unwrap_or(0.0) - client_before;
    // Network holders, where the raw loop joins them, wait for its next batch.
    let leftovers = engine
        .list_labeled_containers("stevedore.runner", Some(RAW_RUNNER_LABEL))
        .await
        .expect("list the raw loop's containers")
        .into_iter()
        .filter(|container| !container.labels.contains_key(LABEL_NETWORK_HOLDER))
        .map(|container| container.id)
        .collect::<Vec<_>>();
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
        engine_cpu,
        client_cpu,
        requests: RequestTally::new(),
    }
}

/// Create, start, wait, remove: returns when the container started and when it finished,
/// both measured from t0.
async fn raw_task(
    engine: &DockerEngine,
    network: &str,
    t0: Instant,
    i: usize,
) -> Result<(Duration, Duration), String> {
    let mut spec = ContainerSpec::new(LOCAL_BUSYBOX_IMAGE);
    spec.cmd = Some(vec!["true".to_owned()]);
    spec.memory_bytes = Some(MEMORY_BYTES);
    spec.network_mode = Some(network.to_owned());
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

/// The raw loop's engine: a network namespace of its own for every container, unless
/// `STEVEDORE_BENCH_RAW_HOLDERS=1` has it join network holders as `serve`'s tasks do.
fn raw_network_namespaces(engine: DockerEngine) -> DockerEngine {
    let holders = std::env::var("STEVEDORE_BENCH_RAW_HOLDERS").is_ok_and(|value| value == "1");
    if holders {
        println!("the raw loop's containers join network holders");
        engine
    } else {
        engine.without_network_holders()
    }
}

// === stevedore end to end ===

/// `serve` with the benchmark's code registered, for batches of tasks.
struct Stevedore {
    server: Server,
    client: reqwest::Client,
    metrics_address: String,
    runner_id: String,
    _data_dir: tempfile::TempDir,
}

impl Stevedore {
    /// `serve` on `engine` (`docker` or `oci`).
    async fn start(concurrency: usize, runner_id: &str, engine: &str) -> Stevedore {
        let data_dir = tempfile::tempdir().expect("a temporary data directory");
        let metrics_address = free_loopback_address();
        let server = Server::start(
            data_dir.path(),
            concurrency,
            runner_id,
            &[
                ("STEVEDORE_METRICS__LISTEN", &metrics_address),
                ("STEVEDORE_ENGINE", engine),
            ],
        )
        .await;
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
        Stevedore {
            server,
            client,
            metrics_address,
            runner_id: runner_id.to_owned(),
            _data_dir: data_dir,
        }
    }

    /// Queues `tasks` at once and waits until every one completed.
    async fn batch(
        &mut self,
        meter: &EngineCpuMeter,
        concurrency: usize,
        tasks: usize,
    ) -> Measurement {
        let (server, client) = (&mut self.server, &self.client);
        let batch: Vec<Value> = (0..tasks).map(|_| json!({"code_name": "bench"})).collect();
        let requests_before = scrape_requests(client, &self.metrics_address).await;
        let (engine_before, client_before) =
            (meter.read(), process_cpu(server.pid()).expect("serve runs"));
        let t0 = Instant::now();
        let t0_wall = chrono::Utc::now();
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
                // When the last task was recorded complete (`updated_at`, the server's clock on
                // this machine), not when this listing saw it.
                let last = ids
                    .iter()
                    .map(|id| {
                        let text = seen[id]["updated_at"]
                            .as_str()
                            .expect("a task has updated_at");
                        chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|error| {
                            panic!("task {id}: updated_at {text:?}: {error}")
                        })
                    })
                    .max()
                    .expect("the run has tasks");
                break (last.with_timezone(&chrono::Utc) - t0_wall)
                    .to_std()
                    .expect("the last completion follows t0");
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

        let engine_cpu = meter.read().since(&engine_before);
        let client_cpu = process_cpu(server.pid()).expect("serve runs") - client_before;
        let requests_after = scrape_requests(client, &self.metrics_address).await;
        let requests = requests_after
            .into_iter()
            .map(|(request, (count, seconds))| {
                let (count_before, seconds_before) =
                    requests_before.get(&request).copied().unwrap_or_default();
                (request, (count - count_before, seconds - seconds_before))
            })
            .collect();
        Measurement {
            run: "stevedore",
            concurrency,
            tasks,
            elapsed,
            latencies_ms,
            engine_cpu,
            client_cpu,
            requests,
        }
    }

    /// Queue-to-start latencies of [`IDLE_STARTS`] tasks queued one at a time.
    async fn idle_starts(&mut self, meter: &EngineCpuMeter) -> Vec<f64> {
        let mut latencies = Vec::with_capacity(IDLE_STARTS);
        for _ in 0..IDLE_STARTS {
            latencies.extend(self.batch(meter, 1, 1).await.latencies_ms);
        }
        latencies
    }

    /// SIGTERM, then a look for containers the runner left.
    async fn stop(mut self, engine: &DockerEngine) {
        self.server.terminate().await;
        let runner_id = &self.runner_id;
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
    }
}

/// A loopback address with a port free now, for `serve`'s metrics listener.
fn free_loopback_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .to_string()
}

/// `serve`'s Engine API request tally, from its metrics.
async fn scrape_requests(client: &reqwest::Client, address: &str) -> RequestTally {
    let text = client
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .error_for_status()
        .expect("GET /metrics succeeds")
        .text()
        .await
        .expect("GET /metrics answers text");
    let mut tally = RequestTally::new();
    for request in EngineRequest::ALL {
        let series = |suffix: &str| {
            let prefix = format!(
                "{ENGINE_REQUEST_METRIC}_{suffix}{{request=\"{}\"}} ",
                request.as_str()
            );
            text.lines()
                .find_map(|line| line.strip_prefix(prefix.as_str()))
                .and_then(|value| value.trim().parse::<f64>().ok())
        };
        if let (Some(count), Some(seconds)) = (series("count"), series("sum")) {
            tally.insert(request, (count as u64, seconds));
        }
    }
    tally
}

// === the report ===

/// Per run: the engine's and the client's CPU per task, then each Engine API request's
/// calls per task and mean duration.
fn print_breakdown(measurements: &[Measurement]) {
    println!();
    println!(
        "{:<14} {:>11} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "run", "concurrency", "engine ms/t", "dockerd", "containerd", "shims", "client ms/t"
    );
    for m in measurements {
        let per_task = |seconds: f64| seconds * 1000.0 / m.tasks as f64;
        println!(
            "{:<14} {:>11} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
            m.run,
            m.concurrency,
            per_task(m.engine_cpu.total()),
            per_task(m.engine_cpu.dockerd),
            per_task(m.engine_cpu.containerd),
            per_task(m.engine_cpu.shims),
            per_task(m.client_cpu)
        );
    }
    println!();
    println!("Engine API requests per task: calls/task x mean ms");
    print!("{:<14} {:>11}", "run", "concurrency");
    for request in EngineRequest::ALL {
        print!(" {:>14}", request.as_str());
    }
    println!();
    for m in measurements {
        print!("{:<14} {:>11}", m.run, m.concurrency);
        for request in EngineRequest::ALL {
            match m.requests.get(&request) {
                Some((count, seconds)) if *count > 0 => {
                    let calls = *count as f64 / m.tasks as f64;
                    let mean_ms = seconds * 1000.0 / *count as f64;
                    print!(" {:>14}", format!("{calls:.2}x{mean_ms:.1}"));
                }
                _ => print!(" {:>14}", "-"),
            }
        }
        println!();
    }
}

fn print_table(measurements: &[Measurement]) {
    println!();
    println!(
        "{:<14} {:>11} {:>6} {:>9} {:>9} {:>9}",
        "run", "concurrency", "tasks", "tasks/s", "p50 ms", "p99 ms"
    );
    for m in measurements {
        let mut sorted = m.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{:<14} {:>11} {:>6} {:>9.2} {:>9.1} {:>9.1}",
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
        if let Some(oci) = measurements
            .iter()
            .find(|m| m.run == "stevedore oci" && m.concurrency == concurrency)
        {
            let mut sorted = oci.latencies_ms.clone();
            sorted.sort_by(f64::total_cmp);
            let (tasks_per_s, p50) = (oci.throughput(), percentile(&sorted, 50.0));
            let times = |run: &str| {
                throughput(run).map_or("-".to_owned(), |other| {
                    format!("{:.1}x", tasks_per_s / other)
                })
            };
            let verdict = |met: bool| if met { "meets" } else { "MISSES" };
            // A batch's queue-to-start counts the wait behind the tasks queued before it; the
            // latency target is judged one task at a time on an idle runner, below.
            println!(
                "concurrency {concurrency}: stevedore oci {tasks_per_s:.1} tasks/s ({} the \
                 target of {OCI_TARGET_THROUGHPUT}), {} the Docker path, {} the raw loop; \
                 queue-to-start p50 {p50:.1} ms in a batch queued at once",
                verdict(tasks_per_s >= OCI_TARGET_THROUGHPUT),
                times("stevedore"),
                times("raw engine"),
            );
        }
    }
}
