//! What the observability reads cost on a store full of finished tasks: the usage report
//! behind `GET usage` and the dashboard's charts (24 hours in hour buckets, and the last hour
//! in minute buckets), and the store gauges every `/metrics` scrape reads. Each is printed
//! beside two baselines measured in the same run on the same data: one page of the task list
//! (`list_tasks`, the 30 newest, what `GET tasks` costs) and one code's counts by status
//! (`code_stats`, what `GET codes/{id}/stats` costs). Prints figures; asserts nothing about
//! speed.
//!
//! `cargo bench -p stevedore-server --bench usage_report`. `STEVEDORE_BENCH_TASKS` sets how
//! many finished tasks the store holds (default 20000), spread over 23 of the last 24 hours and four
//! codes. PostgreSQL runs too when its binaries are found (`STEVEDORE_PG_BIN`, else the
//! newest /usr/lib/postgresql): the throwaway test cluster, without fsync.

// A benchmark binary: failing loudly on a broken set-up is what it should do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use stevedore_model::{SystemClock, TaskOutcome, Timestamp};
use stevedore_server::usage::{self, UsageParams};
use stevedore_server::{AppState, ServerConfig};
use stevedore_store::testsuite::{image_spec, lease_request, new_task};
use stevedore_store::{
    Page, PgOptions, PgStore, RunReport, SqliteOptions, SqliteStore, StatsWindow, Store, SyncMode,
    TaskFilter, testcluster,
};

const CODES: [&str; 4] = ["resize", "email", "report", "sync"];
const BATCH: usize = 100;
/// Timed repetitions of each read; the median is printed.
const RUNS: usize = 15;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let total: usize = std::env::var("STEVEDORE_BENCH_TASKS")
            .ok()
            .and_then(|total| total.parse().ok())
            .unwrap_or(20_000);
        println!(
            "{total} finished tasks over 24 h and {} codes; median of {RUNS} runs",
            CODES.len()
        );

        let dir = tempfile::tempdir().unwrap();
        let sqlite: Arc<dyn Store> = Arc::new(
            SqliteStore::open(SqliteOptions {
                path: dir.path().join("bench.db"),
                sync: SyncMode::Normal,
            })
            .await
            .unwrap(),
        );
        measure("SQLite (normal)", sqlite, total).await;

        match testcluster::fresh_database().await {
            Some(database) => {
                let postgres: Arc<dyn Store> = Arc::new(
                    PgStore::connect(PgOptions::new(&database.url))
                        .await
                        .unwrap(),
                );
                measure("PostgreSQL", postgres, total).await;
                drop(database);
            }
            None => println!("\nPostgreSQL: skipped (no PostgreSQL binaries found)"),
        }
    });
}

async fn measure(name: &str, store: Arc<dyn Store>, total: usize) {
    let seeding = Instant::now();
    let (project_id, code_id) = seed(store.as_ref(), total).await;
    println!(
        "\n{name}: seeded in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let state = AppState::new(
        store.clone(),
        Arc::new(SystemClock),
        Arc::new(ServerConfig::default()),
        None,
        Arc::new(stevedore_store::CredentialVault::new(
            &stevedore_store::CredentialKey::generate().expect("a key"),
        )),
    );

    let list = median(|| async {
        store
            .list_tasks(
                &project_id,
                &TaskFilter::default(),
                Page {
                    page: 1,
                    per_page: 30,
                },
            )
            .await
            .unwrap();
    })
    .await;
    let stats = median(|| async {
        store
            .code_stats(&project_id, &code_id, StatsWindow::default())
            .await
            .unwrap();
    })
    .await;
    let day = median(|| async {
        let params = UsageParams {
            bucket: Some("hour".into()),
            ..UsageParams::default()
        };
        let report = usage::report(&state, &project_id, &params).await.unwrap();
        assert_eq!(report.totals.tasks as usize, total, "every task is counted");
    })
    .await;
    // The report's three store reads on their own, for the 24-hour window.
    let window = usage::UsageWindow::parse(
        &UsageParams {
            bucket: Some("hour".into()),
            ..UsageParams::default()
        },
        Utc::now(),
    )
    .unwrap();
    let sums = median(|| async {
        store.usage(&project_id, &window.query()).await.unwrap();
    })
    .await;
    let waits = median(|| async {
        store
            .queue_waits(
                &project_id,
                window.from,
                window.to,
                usage::QUEUE_WAIT_SAMPLES,
            )
            .await
            .unwrap();
    })
    .await;
    let mix = median(|| async {
        store
            .project_counts(
                &project_id,
                StatsWindow {
                    updated_from: Some(window.from),
                    updated_to: Some(window.to),
                },
            )
            .await
            .unwrap();
    })
    .await;
    let hour = median(|| async {
        let params = UsageParams {
            from: Some((Utc::now().timestamp() - 3600).to_string()),
            bucket: Some("minute".into()),
            ..UsageParams::default()
        };
        usage::report(&state, &project_id, &params).await.unwrap();
    })
    .await;
    let gauges = median(|| async {
        store.gauges(Utc::now()).await.unwrap();
    })
    .await;

    println!(
        "{:<44} {:>10} {:>14} {:>14}",
        "read", "ms", "× task list", "× code stats"
    );
    for (read, took) in [
        ("task list page (baseline)", list),
        ("code stats (baseline)", stats),
        ("usage report, 24 h in hours", day),
        ("  of which: sums per bucket and code", sums),
        ("  of which: queue-wait samples", waits),
        ("  of which: status mix", mix),
        ("usage report, last hour in minutes", hour),
        ("store gauges (each /metrics scrape)", gauges),
    ] {
        println!(
            "{read:<44} {:>10.2} {:>14.1} {:>14.1}",
            took.as_secs_f64() * 1000.0,
            took.as_secs_f64() / list.as_secs_f64(),
            took.as_secs_f64() / stats.as_secs_f64(),
        );
    }
}

/// Fills a project with `total` finished tasks whose times spread over the last 24 hours:
/// each waited a little in the queue, ran a few seconds, and most completed (one in ten
/// failed, one in thirty timed out). Returns the project's id and the first code's id.
async fn seed(store: &dyn Store, total: usize) -> (String, String) {
    let project = store.create_project("bench", Utc::now()).await.unwrap();
    let mut first_code = None;
    for name in CODES {
        let code = store
            .push_code(&project.id, &image_spec(name), None, Utc::now())
            .await
            .unwrap();
        first_code.get_or_insert(code.id);
    }
    // 23 hours from 23.5 hours ago, so every task ends inside a 24-hour window ending now.
    let start = Utc::now() - chrono::Duration::minutes(23 * 60 + 30);
    let step = chrono::Duration::milliseconds((23 * 3600 * 1000 / total.max(1)) as i64);
    let request = lease_request("bench", BATCH as u32);
    let report = RunReport::default();
    let mut queued = 0;
    while queued < total {
        let count = BATCH.min(total - queued);
        let at: Timestamp = start + step * queued as i32;
        let batch: Vec<_> = (0..count)
            .map(|index| new_task(CODES[(queued + index) % CODES.len()]))
            .collect();
        store.enqueue(&project.id, &batch, at).await.unwrap();
        let wait = chrono::Duration::milliseconds(50 + (queued % 450) as i64);
        let leased = store.lease(&request, at + wait).await.unwrap();
        assert_eq!(leased.len(), count);
        for (index, leased) in leased.into_iter().enumerate() {
            let (id, token) = (&leased.task.id, leased.lease.token);
            let began = at + wait;
            store.mark_running(id, token, began, began).await.unwrap();
            let n = queued + index;
            let outcome = if n % 30 == 0 {
                TaskOutcome::TimedOut { timeout_secs: 3 }
            } else if n % 10 == 0 {
                TaskOutcome::Exited { exit_code: 1 }
            } else {
                TaskOutcome::Exited { exit_code: 0 }
            };
            let ran = chrono::Duration::milliseconds(500 + (n % 2500) as i64);
            store
                .complete(id, token, &outcome, &report, began + ran)
                .await
                .unwrap();
        }
        queued += count;
    }
    (project.id, first_code.unwrap())
}

/// The median time of `RUNS` calls of `read`, after one untimed call that warms caches.
async fn median<F, Fut>(read: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    read().await;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let began = Instant::now();
        read().await;
        times.push(began.elapsed());
    }
    times.sort();
    times[RUNS / 2]
}
