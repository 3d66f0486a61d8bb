//! How long one project's task waits behind another project's backlog (issue 15, "one
//! tenant's backlog starves the rest").
//!
//! `cargo bench -p stevedore-store --bench fair_share` queues a backlog of project A's tasks
//! (100,000 by default, `STEVEDORE_BENCH_BACKLOG`), all at one priority, and lets a simulated
//! runner work through it: it leases up to `SLOTS` tasks at a time, "runs" each for
//! `TASK_SECS`, completes them and leases again. Time is simulated (the store takes `now` as an
//! argument), so a task's duration costs nothing; only the store's own work takes real time.
//! After a few rounds project B queues a single task at the same priority; the bench prints
//! how many tasks were leased before it and its queue wait in simulated time, beside the same
//! run with B's task queued alone (the baseline, the least it can wait). With fair share it
//! waits about as long as the baseline (the next free slot); without, the whole backlog.
//!
//! It also prints the median real time of a lease call while the backlog was queued (over at
//! least 200 calls), and the same with `STEVEDORE_BENCH_PROJECTS` other projects (200 by default) each holding
//! due tasks, so that the cost of sharing between many projects shows.
//!
//! SQLite on this machine's disk, and PostgreSQL in the throwaway test cluster
//! (`stevedore_store::testcluster`; skipped when PostgreSQL is not installed).

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use chrono::Duration;
use stevedore_model::{TaskOutcome, Timestamp};
use stevedore_store::testsuite::{at, image_spec, lease_request, new_task};
use stevedore_store::{
    PgOptions, PgStore, RunReport, SqliteOptions, SqliteStore, Store, SyncMode, testcluster,
};

type BenchResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

/// The runner's slots: it leases up to this many tasks at a time.
const SLOTS: u32 = 4;
/// How long each task "runs", in simulated seconds.
const TASK_SECS: i64 = 10;
/// When B queues its task: after this many of the runner's rounds, mid-way through one.
const ROUNDS_BEFORE_B: i64 = 3;
const ENQUEUE_BATCH: usize = 1000;
/// The runner goes on for at least this many rounds, for the lease call's median time.
const MIN_ROUNDS: usize = 200;

fn main() -> BenchResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let backlog = env_count("STEVEDORE_BENCH_BACKLOG", 100_000);
        let projects = env_count("STEVEDORE_BENCH_PROJECTS", 200);
        println!(
            "project A: {backlog} queued tasks; one runner leasing {SLOTS} at a time, each task \
             running {TASK_SECS} s (simulated time); project B queues one task at the same \
             priority mid-way through round {}",
            ROUNDS_BEFORE_B + 1
        );
        println!(
            "{:<12} {:<34} {:>14} {:>16} {:>12}",
            "store", "run", "leased before", "B's wait (ms)", "lease (µs)"
        );
        for backend in backends().await {
            let name = backend.name();
            let runs = [
                ("B alone (baseline)".to_owned(), 0, 0),
                ("A's backlog, then B".to_owned(), backlog, 0),
                (
                    format!("A's backlog, {projects} others, B"),
                    backlog,
                    projects,
                ),
            ];
            for (run, backlog, others) in runs {
                let opened = backend.open().await?;
                let wait = measure(&opened, backlog, others).await?;
                println!(
                    "{name:<12} {run:<34} {:>14} {:>16} {:>12.0}",
                    wait.leased_before,
                    wait.wait.num_milliseconds(),
                    wait.lease_micros,
                );
            }
        }
        Ok(())
    })
}

/// What became of B's task.
struct Wait {
    /// Tasks leased after B queued its task and before (or with, ahead of) it.
    leased_before: usize,
    /// From B's enqueue to its lease, in simulated time.
    wait: Duration,
    /// The median real time of a lease call (over at least `MIN_ROUNDS` calls).
    lease_micros: f64,
}

/// Queues `backlog` tasks of project A (and 100 of each of `others` projects, queued later
/// than A's), runs the simulated runner until B's task is leased, and says how long it waited.
async fn measure(opened: &Opened, backlog: usize, others: usize) -> BenchResult<Wait> {
    let store = &*opened.store;
    let start = at(0);
    let a = store.create_project("a", start).await?;
    let b = store.create_project("b", start).await?;
    for project in [&a, &b] {
        store
            .push_code(&project.id, &image_spec("work"), None, start)
            .await?;
    }
    let batch = vec![new_task("work"); ENQUEUE_BATCH];
    let mut left = backlog;
    while left > 0 {
        let n = left.min(ENQUEUE_BATCH);
        store.enqueue(&a.id, &batch[..n], start).await?;
        left -= n;
    }
    for other in 0..others {
        let project = store
            .create_project(&format!("other-{other}"), start)
            .await?;
        store
            .push_code(&project.id, &image_spec("work"), None, start)
            .await?;
        store
            .enqueue(&project.id, &batch[..100], start + Duration::seconds(1))
            .await?;
    }

    opened.analyze().await?;

    let b_queued_at = start + Duration::seconds(ROUNDS_BEFORE_B * TASK_SECS + TASK_SECS / 2);
    let mut b_task = None;
    let request = lease_request("runner", SLOTS);
    // A completion straight from `preparing` (valid for a setup failure): the fewest store
    // calls a task can cost, as in `lease_throughput`.
    let outcome = TaskOutcome::SetupFailed {
        message: "simulated".to_owned(),
    };
    let report = RunReport::default();
    let mut lease_times: Vec<StdDuration> = Vec::new();
    let mut b_leased: Option<(usize, Duration)> = None;
    let mut leased_before = 0;
    let mut round = 0;
    loop {
        let now: Timestamp = start + Duration::seconds(round * TASK_SECS);
        if b_task.is_none() && now >= b_queued_at {
            // B queued its task while the runner's slots were busy; it is leased at the next
            // round at the earliest.
            let queued = store
                .enqueue(&b.id, &[new_task("work")], b_queued_at)
                .await?;
            b_task = queued.into_iter().next();
        }
        let started = Instant::now();
        let leased = store.lease(&request, now).await?;
        lease_times.push(started.elapsed());
        if leased.is_empty() && b_task.is_some() && b_leased.is_none() {
            return Err("the queue ran dry before B's task was leased".into());
        }
        if let Some(b_task) = &b_task
            && b_leased.is_none()
        {
            match leased.iter().position(|task| task.task.id == b_task.id) {
                Some(position) => b_leased = Some((leased_before + position, now - b_queued_at)),
                None => leased_before += leased.len(),
            }
        }
        if let Some((leased_before, wait)) = b_leased
            && lease_times.len() >= MIN_ROUNDS
        {
            lease_times.sort();
            return Ok(Wait {
                leased_before,
                wait,
                lease_micros: lease_times[lease_times.len() / 2].as_secs_f64() * 1e6,
            });
        }
        let done = now + Duration::seconds(TASK_SECS);
        for task in &leased {
            store
                .complete(&task.task.id, task.lease.token, &outcome, &report, done)
                .await?;
        }
        round += 1;
    }
}

/// A store and what must live as long as it.
struct Opened {
    store: Arc<dyn Store>,
    /// PostgreSQL's URL, to gather statistics as autovacuum would.
    postgres_url: Option<String>,
    _guard: Box<dyn std::any::Any>,
}

impl Opened {
    /// Gathers PostgreSQL's statistics on the tables just filled, as autovacuum does within
    /// its first minute: planned blind (a table that was empty when its indexes were made),
    /// PostgreSQL reads a backlog through the wrong index until then.
    async fn analyze(&self) -> BenchResult {
        if let Some(url) = &self.postgres_url {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::query("ANALYZE").execute(&mut conn).await?;
            conn.close().await?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }

    /// A fresh, empty store.
    async fn open(self) -> BenchResult<Opened> {
        match self {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let store = SqliteStore::open(SqliteOptions {
                    path: dir.path().join("bench.db"),
                    sync: SyncMode::Normal,
                })
                .await?;
                Ok(Opened {
                    store: Arc::new(store),
                    postgres_url: None,
                    _guard: Box::new(dir),
                })
            }
            Backend::Postgres => {
                let database = testcluster::fresh_database()
                    .await
                    .ok_or("PostgreSQL went away")?;
                let store = PgStore::connect(PgOptions::new(&database.url)).await?;
                Ok(Opened {
                    store: Arc::new(store),
                    postgres_url: Some(database.url.clone()),
                    _guard: Box::new(database),
                })
            }
        }
    }
}

/// SQLite, and PostgreSQL when it is installed.
async fn backends() -> Vec<Backend> {
    if testcluster::fresh_database().await.is_some() {
        vec![Backend::Sqlite, Backend::Postgres]
    } else {
        println!("(no PostgreSQL: its runs are skipped)");
        vec![Backend::Sqlite]
    }
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}
