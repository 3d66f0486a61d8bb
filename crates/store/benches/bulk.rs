//! Big operations at a million queued tasks (issue 15, "big operations stall everything").
//!
//! `cargo bench -p stevedore-store --bench bulk` queues `STEVEDORE_BENCH_TASKS` tasks of one
//! code (1,000,000 by default) and prints:
//!
//! * the time of `Store::gauges` (what every `/metrics` scrape reads), the median of 20 calls;
//! * `cancel_all` of that code: its total time, and the longest a concurrent small write
//!   waited meanwhile (a loop of heartbeats of a leased task of another code, and a loop
//!   queueing one task at a time), with how many of each went through during the cancel;
//! * the process's resident memory (`VmRSS`) with the tasks queued and after the cancel.
//!
//! SQLite on this machine's disk, and PostgreSQL in the throwaway test cluster
//! (`stevedore_store::testcluster`; skipped when PostgreSQL is not installed, or with
//! `STEVEDORE_BENCH_POSTGRES=0`; `STEVEDORE_BENCH_SQLITE=0` skips SQLite).

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use stevedore_store::testsuite::{image_spec, lease_request, new_task};
use stevedore_store::{
    PgOptions, PgStore, SqliteOptions, SqliteStore, Store, SyncMode, testcluster,
};

type BenchResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

const ENQUEUE_BATCH: usize = 1000;

fn main() -> BenchResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let total: usize = std::env::var("STEVEDORE_BENCH_TASKS")
            .ok()
            .and_then(|total| total.parse().ok())
            .unwrap_or(1_000_000);
        println!("{total} queued tasks of one code");
        let sqlite_dir = tempfile::tempdir()?;
        let sqlite = SqliteStore::open(SqliteOptions {
            path: sqlite_dir.path().join("bench.db"),
            sync: SyncMode::Normal,
        })
        .await?;
        if std::env::var("STEVEDORE_BENCH_SQLITE").as_deref() != Ok("0") {
            bench("SQLite", Arc::new(sqlite), total).await?;
        }
        let postgres_wanted = std::env::var("STEVEDORE_BENCH_POSTGRES").as_deref() != Ok("0");
        match testcluster::fresh_database().await {
            Some(database) if postgres_wanted => {
                let store = PgStore::connect(PgOptions::new(&database.url)).await?;
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
    let cancelling = Arc::new(AtomicBool::new(true));
    let heartbeats = {
        let (store, cancelling) = (Arc::clone(&store), Arc::clone(&cancelling));
        let (id, token) = (small.task.id.clone(), small.lease.token);
        tokio::spawn(async move {
            let mut waits = Vec::new();
            while cancelling.load(Ordering::SeqCst) {
                let started = Instant::now();
                store.heartbeat(&id, token, 60, Utc::now()).await?;
                waits.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            BenchResult::Ok(waits)
        })
    };
    let enqueues = {
        let (store, cancelling) = (Arc::clone(&store), Arc::clone(&cancelling));
        let project_id = project.id.clone();
        tokio::spawn(async move {
            let mut waits = Vec::new();
            while cancelling.load(Ordering::SeqCst) {
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
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let cancellation = store.cancel_all(&project.id, &bulk.id, Utc::now()).await?;
    let cancel_time = started.elapsed();
    cancelling.store(false, Ordering::SeqCst);
    let heartbeats = heartbeats.await??;
    let enqueues = enqueues.await??;
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
    Ok(())
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
