//! The soak of "run each task once, as far as a machine can tell": for minutes, tasks of three
//! projects through two `serve` processes on one PostgreSQL and two remote runners, while a
//! runner, a server and the Docker daemon are killed with SIGKILL at random moments and
//! started again. Prints queued, completed once, lost, ran twice with overlap, ran twice in
//! sequence (by why), containers left, and whether each target holds. Asserts nothing: the
//! `soak` test in `tests/cli` is the short form that does.
//!
//! `cargo bench -p stevedore --bench soak`. Knobs: `STEVEDORE_SOAK_SECS` (default 300),
//! `STEVEDORE_SOAK_RATE` (tasks/s; default: keep a backlog, `STEVEDORE_SOAK_BACKLOG`),
//! `STEVEDORE_SOAK_TASK_SECS` (`1-3`; tasks longer than a lease put the runners' stopping of
//! containers whose lease ran out to the test), `STEVEDORE_SOAK_CAPACITY` (slots per runner, 3), `STEVEDORE_SOAK_LEASE_SECS` (10),
//! `STEVEDORE_SOAK_KILL_RUNNER`, `STEVEDORE_SOAK_KILL_SERVER`, `STEVEDORE_SOAK_KILL_DOCKERD`
//! (1 or 0, all on), `STEVEDORE_SOAK_KILL_EVERY_SECS` (20), `STEVEDORE_SOAK_DOWN_SECS` (`2-6`;
//! longer than a lease lets the watchdog and the rescuer act), `STEVEDORE_SOAK_DRAIN_SECS` (600),
//! `STEVEDORE_SOAK_SEED`. Killing dockerd kills every container of the machine's engine: turn
//! it off where anything else uses that engine. Needs a Docker engine and PostgreSQL's
//! binaries; skips with a message without them.

// A benchmark fails loudly: every `expect` says what went wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[path = "../tests/cli/soak/harness.rs"]
mod harness;
// The test support the harness starts processes with; not all of it is used here.
#[allow(dead_code)]
#[path = "../tests/cli/support.rs"]
mod support;

use harness::Settings;

#[tokio::main]
async fn main() {
    let settings = Settings {
        queue_for: Duration::from_secs(300),
        rate: None,
        backlog: 12,
        task_secs: (Duration::from_secs(1), Duration::from_secs(3)),
        capacity: 3,
        lease_secs: 10,
        kill_runner: true,
        kill_server: true,
        kill_dockerd: true,
        kill_every: Duration::from_secs(20),
        down_for: (Duration::from_secs(2), Duration::from_secs(6)),
        drain_timeout: Duration::from_secs(600),
        seed: Settings::fresh_seed(),
    }
    .with_env_knobs();
    match harness::run(&settings).await {
        Some(report) => report.print(),
        None => println!("skipped: no Docker engine or no PostgreSQL binaries"),
    }
}
