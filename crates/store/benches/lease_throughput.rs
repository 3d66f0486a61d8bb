//! How fast the SQLite store queues and hands out tasks, on this machine's disk.
//!
//! `cargo bench -p stevedore-store --bench lease_throughput` queues tasks in batches of 100
//! (tasks/s), then drains the queue with runner loops that lease batches of 32 and finish each
//! task, and prints tasks finished per second for two call patterns:
//!
//! * `lease+complete`: the least a task costs, two store calls (`complete` with a setup
//!   failure, which is valid straight from `preparing`);
//! * `lease+running+complete`: what the runner really does for a task that ran, three calls.
//!
//! With several runner loops the writes still serialize on the one writer connection; the
//! loops only overlap their round trips.

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use stevedore_model::TaskOutcome;
use stevedore_store::testsuite::{image_spec, lease_request, new_task};
use stevedore_store::{RunReport, SqliteOptions, SqliteStore, Store, SyncMode};

type BenchResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

const ENQUEUE_BATCH: usize = 100;
const LEASE_BATCH: u32 = 32;

/// Which store calls a runner loop makes per task.
#[derive(Debug, Clone, Copy)]
enum Calls {
    LeaseComplete,
    LeaseRunningComplete,
}

fn main() -> BenchResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!(
            "SQLite store: enqueue batches of {ENQUEUE_BATCH}, lease batches of {LEASE_BATCH}"
        );
        bench(SyncMode::Normal, 100_000, 1, Calls::LeaseComplete).await?;
        bench(SyncMode::Normal, 100_000, 1, Calls::LeaseRunningComplete).await?;
        bench(SyncMode::Normal, 100_000, 4, Calls::LeaseRunningComplete).await?;
        bench(SyncMode::Full, 10_000, 1, Calls::LeaseComplete).await?;
        bench(SyncMode::Full, 10_000, 4, Calls::LeaseRunningComplete).await
    })
}

async fn bench(sync: SyncMode, total: usize, runners: usize, calls: Calls) -> BenchResult {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(
        SqliteStore::open(SqliteOptions {
            path: dir.path().join("bench.db"),
            sync,
        })
        .await?,
    );
    let project = store.create_project("bench", Utc::now()).await?;
    store
        .push_code(&project.id, &image_spec("hello"), None, Utc::now())
        .await?;

    let batch = vec![new_task("hello"); ENQUEUE_BATCH];
    let started = Instant::now();
    for _ in 0..total / ENQUEUE_BATCH {
        store.enqueue(&project.id, &batch, Utc::now()).await?;
    }
    let enqueue_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    for runner in 0..runners {
        let store = Arc::clone(&store);
        loops.spawn(async move { run_tasks(&*store, &format!("runner-{runner}"), calls).await });
    }
    let mut done = 0;
    while let Some(finished) = loops.join_next().await {
        done += finished??;
    }
    let run_secs = started.elapsed().as_secs_f64();
    assert_eq!(done, total, "every queued task ran once");

    let calls_name = match calls {
        Calls::LeaseComplete => "lease+complete",
        Calls::LeaseRunningComplete => "lease+running+complete",
    };
    println!(
        "{sync:?} sync, {total} tasks: enqueue {:>6.0} tasks/s | {runners} runner loop(s), \
         {calls_name}: {:>5.0} tasks/s ({run_secs:.1} s)",
        total as f64 / enqueue_secs,
        total as f64 / run_secs,
    );
    store.close().await;
    Ok(())
}

/// One runner's store traffic until the queue is empty. Returns how many tasks it finished.
async fn run_tasks(store: &dyn Store, runner_id: &str, calls: Calls) -> BenchResult<usize> {
    let request = lease_request(runner_id, LEASE_BATCH);
    let exited = TaskOutcome::Exited { exit_code: 0 };
    let setup_failed = TaskOutcome::SetupFailed {
        message: "image not found".to_owned(),
    };
    let report = RunReport::default();
    let mut done = 0;
    loop {
        let leased = store.lease(&request, Utc::now()).await?;
        if leased.is_empty() {
            return Ok(done);
        }
        for leased in leased {
            let (id, token) = (&leased.task.id, leased.lease.token);
            let outcome = match calls {
                Calls::LeaseComplete => &setup_failed,
                Calls::LeaseRunningComplete => {
                    let now = Utc::now();
                    store.mark_running(id, token, now, now).await?;
                    &exited
                }
            };
            store
                .complete(id, token, outcome, &report, Utc::now())
                .await?;
            done += 1;
        }
    }
}
