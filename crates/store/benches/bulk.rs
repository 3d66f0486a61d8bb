//! Big operations at a million queued tasks (issue 15, "big operations stall everything").
//!
//! `cargo bench -p stevedore-store --bench bulk` queues `STEVEDORE_BENCH_TASKS` tasks of one
//! code (1,000,000 by default) and prints:
//!
//! * the time of `Store::gauges` (what every `/metrics` scrape reads), the median of 20 calls;
//! * `cancel_all` of that code: its total time, and the longest a concurrent small write
//!   waited meanwhile (a loop of heartbeats of a leased task of another code, and a loop
//!   queueing one task at a time), with how many of each went through during the cancel;
//! * the process's resident memory (`VmRSS`) with the tasks queued and after the cancel;
//! * retention ("nothing fills up"): `STEVEDORE_BENCH_LOGGED_TASKS` more tasks (as many as
//!   queued, by default) run to their end, each printing `STEVEDORE_BENCH_LOG_BYTES` (512)
//!   bytes; then every finished task's log and payload pruned as the leader's pass prunes
//!   them (`prune_task_data`, 500 tasks a call, then a pause of 20 ms or as long as the call
//!   took), with how long the calls took
//!   and how long a concurrent small write waited meanwhile (the same two loops: median, p99,
//!   longest, how many over 100 ms), and the stored bytes (`data_sizes`) before and after.
//!
//! SQLite on this machine's disk, and PostgreSQL in the throwaway test cluster
//! (`stevedore_store::testcluster`; skipped when PostgreSQL is not installed, or with
//! `STEVEDORE_BENCH_POSTGRES=0`; `STEVEDORE_BENCH_SQLITE=0` skips SQLite).

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use stevedore_model::{QuotaLimits, TaskOutcome};
use stevedore_store::testsuite::{image_spec, lease_request, new_task};
use stevedore_store::{
    LeasedTask, PgOptions, PgStore, PruneCursor, RunReport, SqliteOptions, SqliteStore, Store,
    SyncMode, TaskData, testcluster,
};

type BenchResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

const ENQUEUE_BATCH: usize = 1000;
/// Room for the whole backlog in one project: the default quota of queued tasks is 100,000.
const BACKLOG_QUOTAS: QuotaLimits = QuotaLimits {
    queued_tasks: u64::MAX,
    running_tasks: 1_000,
    schedules: 1_000,
    codes: 1_000,
    revisions_per_code: 1_000,
    package_bytes: 10 << 30,
    log_streams_per_token: 10,
};
/// Retention's pace, as `server::retention::Pace::default()` sets it: 500 tasks a call, and
/// between two calls 20 ms or as long as the last call took.
const PRUNE_ROWS: u32 = 500;
const PRUNE_PAUSE: Duration = Duration::from_millis(20);
/// Logged tasks written at once while filling: enough for SQLite's group commits and
/// PostgreSQL's connections.
const FILL_CONCURRENCY: usize = 16;

fn main() -> BenchResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let total = env_number("STEVEDORE_BENCH_TASKS").unwrap_or(1_000_000);
        println!("{total} queued tasks of one code");
        let sqlite_dir = tempfile::tempdir()?;
        let sqlite = SqliteStore::open(SqliteOptions {
            path: sqlite_dir.path().join("bench.db"),
            sync: SyncMode::Normal,
        })
        .await?
        .with_quota_defaults(BACKLOG_QUOTAS);
        if std::env::var("STEVEDORE_BENCH_SQLITE").as_deref() != Ok("0") {
            bench("SQLite", Arc::new(sqlite), total).await?;
        }
        let postgres_wanted = std::env::var("STEVEDORE_BENCH_POSTGRES").as_deref() != Ok("0");
        match testcluster::fresh_database().await {
            Some(database) if postgres_wanted => {
                let store = PgStore::connect(PgOptions::new(&database.url))
                    .await?
                    .with_quota_defaults(BACKLOG_QUOTAS);
                bench("PostgreSQL", Arc::new(store), total).await?;
            }
            _ => println!("(PostgreSQL skipped)"),
        }
        Ok(())
    })
}

async fn bench(name: &str, store: Arc<dyn Store>, total: usize) -> BenchResult {
    let project = store.create_project("bench", Utc::now()).await?;
    let bulk = store
        .push_code(&project.id, &image_spec("bulk"), None, Utc::now())
        .await?;
    store
        .push_code(&project.id, &image_spec("small"), None, Utc::now())
        .await?;

    // A leased task of another code, for the heartbeat loop, queued first so it is leased first.
    store
        .enqueue(&project.id, &[new_task("small")], Utc::now())
        .await?;
    let small = store
        .lease(&lease_request("runner", 1), Utc::now())
        .await?
        .pop()
        .ok_or("the small task was not leased")?;

    let started = Instant::now();
    let batch = vec![new_task("bulk"); ENQUEUE_BATCH];
    let mut left = total;
    while left > 0 {
        let n = left.min(ENQUEUE_BATCH);
        store.enqueue(&project.id, &batch[..n], Utc::now()).await?;
        left -= n;
    }
    println!(
        "{name}: queued {total} in {:.1} s; RSS {} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib()
    );

    let mut gauge_times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let gauges = store.gauges(Utc::now()).await?;
        gauge_times.push(started.elapsed());
        assert!(
            gauges
                .queue_depth
                .iter()
                .any(|(_, depth)| *depth as usize >= total)
        );
    }
    gauge_times.sort();
    println!(
        "{name}: gauges (each /metrics scrape): median {:.2} ms, longest {:.2} ms",
        millis(gauge_times[gauge_times.len() / 2]),
        millis(gauge_times[gauge_times.len() - 1]),
    );

    // Small writes in loops while the cancel runs: each records how long it took.
    let writers = Writers::start(&store, &project.id, &small);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let cancellation = store.cancel_all(&project.id, &bulk.id, Utc::now()).await?;
    let cancel_time = started.elapsed();
    let (heartbeats, enqueues) = writers.stop().await?;
    assert_eq!(cancellation.cancelled as usize, total);
    println!(
        "{name}: cancel_all of {} tasks: {:.2} s; meanwhile {} heartbeats (longest {:.1} ms) \
         and {} single-task enqueues (longest {:.1} ms)",
        cancellation.cancelled,
        cancel_time.as_secs_f64(),
        heartbeats.len(),
        millis(longest(&heartbeats)),
        enqueues.len(),
        millis(longest(&enqueues)),
    );
    let started = Instant::now();
    store.gauges(Utc::now()).await?;
    println!(
        "{name}: gauges after the cancel {:.2} ms; RSS {} MiB",
        millis(started.elapsed()),
        rss_mib()
    );
    retention(name, &store, &project.id, &small, total).await
}

/// Fills the store with finished tasks that printed a log, then prunes every finished task's
/// log and payload as the leader's retention pass does, with small writes going on.
async fn retention(
    name: &str,
    store: &Arc<dyn Store>,
    project_id: &str,
    small: &LeasedTask,
    total: usize,
) -> BenchResult {
    let logged = env_number("STEVEDORE_BENCH_LOGGED_TASKS").unwrap_or(total);
    let log_bytes = env_number("STEVEDORE_BENCH_LOG_BYTES").unwrap_or(512);
    let started = Instant::now();
    fill_logged(store, project_id, logged, log_bytes).await?;
    let sizes = store.data_sizes().await?;
    println!(
        "{name}: {logged} more tasks ran, each printing {log_bytes} bytes, in {:.1} s; \
         stored: {} MiB of logs, {} KiB of payloads",
        started.elapsed().as_secs_f64(),
        sizes.log_bytes >> 20,
        sizes.payload_bytes >> 10,
    );
    for data in [TaskData::Log, TaskData::Payload] {
        let writers = Writers::start(store, project_id, small);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let (mut calls, mut passed, mut bytes) = (Vec::new(), 0, 0);
        let mut after: Option<PruneCursor> = None;
        loop {
            let call_started = Instant::now();
            let chunk = store
                .prune_task_data(data, Utc::now(), after.as_ref(), PRUNE_ROWS, Utc::now())
                .await?;
            let took = call_started.elapsed();
            calls.push(took);
            passed += chunk.passed;
            bytes += chunk.bytes;
            after = chunk.next;
            if after.is_none() {
                break;
            }
            tokio::time::sleep(PRUNE_PAUSE.max(took)).await;
        }
        let took = started.elapsed();
        let (heartbeats, enqueues) = writers.stop().await?;
        println!(
            "{name}: pruning the {data:?}s of {passed} finished tasks ({} MiB): {:.1} s in {} \
             calls ({}); meanwhile {} heartbeats ({}) and {} single-task enqueues ({})",
            bytes >> 20,
            took.as_secs_f64(),
            calls.len(),
            spread(&calls),
            heartbeats.len(),
            spread(&heartbeats),
            enqueues.len(),
            spread(&enqueues),
        );
    }
    let sizes = store.data_sizes().await?;
    println!(
        "{name}: stored after retention: {} bytes of logs, {} bytes of payloads (the small \
         tasks still queued); RSS {} MiB",
        sizes.log_bytes,
        sizes.payload_bytes,
        rss_mib()
    );
    Ok(())
}

/// Runs `count` tasks of the code `bulk` to their end, each printing `log_bytes` bytes: queued
/// and leased a thousand at a time, then logged and completed `FILL_CONCURRENCY` at once.
async fn fill_logged(
    store: &Arc<dyn Store>,
    project_id: &str,
    count: usize,
    log_bytes: usize,
) -> BenchResult {
    let log = vec![b'x'; log_bytes];
    let batch = vec![new_task("bulk"); ENQUEUE_BATCH];
    let mut left = count;
    while left > 0 {
        let n = left.min(ENQUEUE_BATCH);
        store.enqueue(project_id, &batch[..n], Utc::now()).await?;
        let max_tasks = u32::try_from(n)?;
        let leased = store
            .lease(&lease_request("filler", max_tasks), Utc::now())
            .await?;
        left = left.saturating_sub(leased.len());
        let finished = futures::stream::iter(leased)
            .map(|leased| {
                let (store, log) = (Arc::clone(store), &log);
                async move {
                    let (id, token) = (&leased.task.id, leased.lease.token);
                    store
                        .append_log(id, token, log, 1 << 20, Utc::now())
                        .await?;
                    let outcome = TaskOutcome::Cancelled;
                    store
                        .complete(id, token, &outcome, &RunReport::default(), Utc::now())
                        .await?;
                    BenchResult::Ok(())
                }
            })
            .buffer_unordered(FILL_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        finished.into_iter().collect::<BenchResult>()?;
    }
    Ok(())
}

/// Two loops of small writes, each timing every call: heartbeats of a leased task, and
/// single-task enqueues of the code `small`.
struct Writers {
    going: Arc<AtomicBool>,
    heartbeats: tokio::task::JoinHandle<BenchResult<Vec<Duration>>>,
    enqueues: tokio::task::JoinHandle<BenchResult<Vec<Duration>>>,
}

impl Writers {
    fn start(store: &Arc<dyn Store>, project_id: &str, leased: &LeasedTask) -> Writers {
        let going = Arc::new(AtomicBool::new(true));
        let heartbeats = {
            let (store, going) = (Arc::clone(store), Arc::clone(&going));
            let (id, token) = (leased.task.id.clone(), leased.lease.token);
            tokio::spawn(async move {
                let mut waits = Vec::new();
                while going.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    store.heartbeat(&id, token, 60, Utc::now()).await?;
                    waits.push(started.elapsed());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                BenchResult::Ok(waits)
            })
        };
        let enqueues = {
            let (store, going) = (Arc::clone(store), Arc::clone(&going));
            let project_id = project_id.to_owned();
            tokio::spawn(async move {
                let mut waits = Vec::new();
                while going.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    store
                        .enqueue(&project_id, &[new_task("small")], Utc::now())
                        .await?;
                    waits.push(started.elapsed());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                BenchResult::Ok(waits)
            })
        };
        Writers {
            going,
            heartbeats,
            enqueues,
        }
    }

    /// Stops both loops: the heartbeats' and the enqueues' waits.
    async fn stop(self) -> BenchResult<(Vec<Duration>, Vec<Duration>)> {
        self.going.store(false, Ordering::SeqCst);
        Ok((self.heartbeats.await??, self.enqueues.await??))
    }
}

fn env_number(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

/// The median, the 99th percentile and the longest of `times`, and how many took over 100 ms.
fn spread(times: &[Duration]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort();
    let at = |fraction: f64| {
        let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
        sorted.get(index).copied().map_or(0.0, millis)
    };
    let slow = sorted
        .iter()
        .filter(|time| **time > Duration::from_millis(100))
        .count();
    format!(
        "median {:.1} ms, p99 {:.1} ms, longest {:.1} ms, {slow} over 100 ms",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

fn longest(waits: &[Duration]) -> Duration {
    waits.iter().copied().max().unwrap_or_default()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The process's resident memory, from `/proc/self/status`.
fn rss_mib() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or_else(|| "?".to_owned(), |kib| (kib / 1024).to_string())
}
