//! How fast the stores queue and hand out tasks, SQLite on this machine's disk beside
//! PostgreSQL in the throwaway test cluster (`stevedore_store::testcluster`; skipped when
//! PostgreSQL is not installed).
//!
//! `cargo bench -p stevedore-store --bench lease_throughput` queues tasks in batches of 100
//! (tasks/s), then drains the queue with runner loops that lease batches of 32 and finish each
//! task, and prints tasks finished per second for two call patterns:
//!
//! * `lease+complete`: the least a task costs, two store calls (`complete` with a setup
//!   failure, which is valid straight from `preparing`);
//! * `lease+running+complete`: what the runner really does for a task that ran, three calls;
//! * `lease+running+log+complete`: the same for a task that printed a line, whose runner ships
//!   it before the completion (four calls).
//!
//! Each pattern runs twice: one task at a time per loop (every call waits for the one before),
//! and with each leased task on a task of its own, as a runner's slots run them, so that a
//! loop's calls about its batch arrive together and a store may write them together.
//!
//! With several runner loops SQLite's writes still serialize on its one writer connection;
//! the loops only overlap their round trips. PostgreSQL runs them on as many connections, but
//! the test cluster runs without fsync, so its figures are what the store's statements cost,
//! not what a durable server's disk allows. `STEVEDORE_BENCH_TASKS` sets how many tasks the
//! side-by-side runs queue (default 20000).

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use stevedore_model::TaskOutcome;
use stevedore_store::testsuite::{image_spec, lease_request, new_task};
use stevedore_store::{
    PgOptions, PgStore, RunReport, SqliteOptions, SqliteStore, Store, SyncMode, testcluster,
};

type BenchResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

const ENQUEUE_BATCH: usize = 100;
const LEASE_BATCH: u32 = 32;

/// Which store calls a runner loop makes per task, after the lease that handed it out.
#[derive(Debug, Clone, Copy)]
enum Calls {
    Complete,
    RunningComplete,
    RunningLogComplete,
}

/// How a runner loop goes through the tasks of a lease.
#[derive(Debug, Clone, Copy)]
enum Slots {
    /// One task after the other.
    OneAtATime,
    /// Every leased task on a task of its own, the lease's batch finished before the next
    /// lease.
    Concurrent,
}

fn main() -> BenchResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let total: usize = std::env::var("STEVEDORE_BENCH_TASKS")
            .ok()
            .and_then(|total| total.parse().ok())
            .unwrap_or(20_000);
        println!(
            "{total} tasks, enqueue batches of {ENQUEUE_BATCH}, lease batches of {LEASE_BATCH}; \
             tasks/s"
        );
        println!(
            "{:<56} {:>16} {:>16}",
            "", "SQLite (normal)", "PostgreSQL"
        );
        let patterns = [
            (1, Calls::Complete, Slots::OneAtATime),
            (4, Calls::Complete, Slots::OneAtATime),
            (1, Calls::RunningComplete, Slots::OneAtATime),
            (4, Calls::RunningComplete, Slots::OneAtATime),
            (4, Calls::Complete, Slots::Concurrent),
            (4, Calls::RunningComplete, Slots::Concurrent),
            (4, Calls::RunningLogComplete, Slots::Concurrent),
        ];
        let mut enqueue = (0.0, None);
        for (runners, calls, slots) in patterns {
            let sqlite = bench(
                &open_sqlite(SyncMode::Normal).await?,
                total,
                runners,
                calls,
                slots,
            )
            .await?;
            let postgres = match open_postgres().await? {
                Some(store) => Some(bench(&store, total, runners, calls, slots).await?),
                None => None,
            };
            enqueue = (sqlite.0, postgres.map(|(enqueue, _)| enqueue));
            println!(
                "{:<56} {:>16.0} {:>16}",
                format!("{runners} runner loop(s), {}, {}", calls.name(), slots.name()),
                sqlite.1,
                shown(postgres.map(|(_, run)| run)),
            );
        }
        println!(
            "{:<56} {:>16.0} {:>16}",
            "enqueue",
            enqueue.0,
            shown(enqueue.1)
        );
        let full = bench(
            &open_sqlite(SyncMode::Full).await?,
            10_000,
            1,
            Calls::Complete,
            Slots::OneAtATime,
        )
        .await?;
        println!(
            "SQLite with sync = full, 10000 tasks: enqueue {:.0}, 1 runner loop lease+complete {:.0}",
            full.0, full.1
        );
        Ok(())
    })
}

fn shown(value: Option<f64>) -> String {
    value.map_or_else(
        || "(no PostgreSQL)".to_owned(),
        |value| format!("{value:.0}"),
    )
}

/// A store and what must live as long as it.
struct Opened {
    store: Arc<dyn Store>,
    _guard: Box<dyn std::any::Any>,
}

async fn open_sqlite(sync: SyncMode) -> BenchResult<Opened> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(SqliteOptions {
        path: dir.path().join("bench.db"),
        sync,
    })
    .await?;
    Ok(Opened {
        store: Arc::new(store),
        _guard: Box::new(dir),
    })
}

async fn open_postgres() -> BenchResult<Option<Opened>> {
    let Some(database) = testcluster::fresh_database().await else {
        return Ok(None);
    };
    let store = PgStore::connect(PgOptions::new(&database.url)).await?;
    Ok(Some(Opened {
        store: Arc::new(store),
        _guard: Box::new(database),
    }))
}

impl Calls {
    fn name(self) -> &'static str {
        match self {
            Calls::Complete => "lease+complete",
            Calls::RunningComplete => "lease+running+complete",
            Calls::RunningLogComplete => "lease+running+log+complete",
        }
    }
}

impl Slots {
    fn name(self) -> &'static str {
        match self {
            Slots::OneAtATime => "one at a time",
            Slots::Concurrent => "concurrent",
        }
    }
}

/// Queues `total` tasks and runs them; tasks per second (enqueue, run).
async fn bench(
    opened: &Opened,
    total: usize,
    runners: usize,
    calls: Calls,
    slots: Slots,
) -> BenchResult<(f64, f64)> {
    let store = &opened.store;
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
        let store = Arc::clone(store);
        loops.spawn(
            async move { run_tasks(&store, &format!("runner-{runner}"), calls, slots).await },
        );
    }
    let mut done = 0;
    while let Some(finished) = loops.join_next().await {
        done += finished??;
    }
    let run_secs = started.elapsed().as_secs_f64();
    assert_eq!(done, total, "every queued task ran once");
    Ok((total as f64 / enqueue_secs, total as f64 / run_secs))
}

/// One runner's store traffic until the queue is empty. Returns how many tasks it finished.
async fn run_tasks(
    store: &Arc<dyn Store>,
    runner_id: &str,
    calls: Calls,
    slots: Slots,
) -> BenchResult<usize> {
    let request = lease_request(runner_id, LEASE_BATCH);
    let mut done = 0;
    loop {
        let leased = store.lease(&request, Utc::now()).await?;
        if leased.is_empty() {
            return Ok(done);
        }
        done += leased.len();
        match slots {
            Slots::OneAtATime => {
                for leased in leased {
                    run_task(&**store, &leased.task.id, leased.lease.token, calls).await?;
                }
            }
            Slots::Concurrent => {
                let mut running = tokio::task::JoinSet::new();
                for leased in leased {
                    let store = Arc::clone(store);
                    running.spawn(async move {
                        run_task(&*store, &leased.task.id, leased.lease.token, calls).await
                    });
                }
                while let Some(finished) = running.join_next().await {
                    finished??;
                }
            }
        }
    }
}

/// The store calls for one leased task after its lease.
async fn run_task(store: &dyn Store, id: &str, token: i64, calls: Calls) -> BenchResult {
    let outcome = match calls {
        Calls::Complete => TaskOutcome::SetupFailed {
            message: "image not found".to_owned(),
        },
        Calls::RunningComplete => {
            let now = Utc::now();
            store.mark_running(id, token, now, now).await?;
            TaskOutcome::Exited { exit_code: 0 }
        }
        Calls::RunningLogComplete => {
            let now = Utc::now();
            store.mark_running(id, token, now, now).await?;
            store
                .append_log(id, token, b"hello from a task\n", 1 << 20, Utc::now())
                .await?;
            TaskOutcome::Exited { exit_code: 0 }
        }
    };
    store
        .complete(id, token, &outcome, &RunReport::default(), Utc::now())
        .await?;
    Ok(())
}
