//! The soak behind "run each task once, as far as a machine can tell": tasks of three
//! projects queued for minutes through two `serve` processes sharing one PostgreSQL (no
//! embedded runners), run by two remote runners, while a runner, a server and the Docker
//! daemon are killed with SIGKILL at random moments and each started again a few seconds later
//! (a runner under the same id and data directory, a server on the same port).
//!
//! ```text
//! queuer ──POST tasks──▶ server A | server B (whichever answers) ──▶ PostgreSQL
//! runner 1 ─▶ server A      runner 2 ─▶ server B      (capacity each, one Docker engine)
//! chaos:   sleep ~kill_every ─▶ SIGKILL one of {runner, server, dockerd} ─▶ 2–6 s ─▶ start it
//! sampler: every 200 ms one `docker ps` of running task containers, duplicates per task id
//! ```
//!
//! Once queueing stops and every process is back, it waits for every task to finish, reads
//! each task's `GET tasks/{id}` (its `attempts`), stops runners and servers and counts what
//! they left. The [`Report`] says: queued; completed once; lost; ran twice with overlap (two
//! containers of one task running at the same moment, seen by the sampler); ran twice in
//! sequence, by the reason its earlier attempt ended; containers left after everything stopped
//! (and runners' watchdogs that did not end by themselves).
//!
//! Shared by the `soak` bench (minutes, figures) and the `soak` test (about a minute, asserts).
//! Both read the same knobs (`STEVEDORE_SOAK_*`, see [`Settings::with_env_knobs`]).

// The parts are named by path so that they resolve alike when the bench includes this file
// with `#[path]` (a file included so looks for its modules beside itself).
#[path = "client.rs"]
mod client;
#[path = "containers.rs"]
mod containers;
#[path = "fleet.rs"]
mod fleet;
#[path = "report.rs"]
mod report;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use stevedore_store::testcluster::fresh_database;

use crate::support::{docker_available, ensure_local_image};

use client::Client;
use containers::{Sampler, remove_leftovers};
use fleet::{Fleet, Victim, chaos};
pub use report::Report;

/// What a soak runs and how hard it shakes it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long tasks are queued and processes killed; the drain comes after.
    pub queue_for: Duration,
    /// Tasks queued per second over all projects; `None` keeps `backlog` tasks queued.
    pub rate: Option<f64>,
    /// How many tasks are kept queued when no rate is given.
    pub backlog: usize,
    /// How long a task sleeps: whole seconds, drawn between the two by the task.
    pub task_secs: (Duration, Duration),
    /// Task slots per runner.
    pub capacity: u32,
    /// The runners' lease, seconds.
    pub lease_secs: u32,
    pub kill_runner: bool,
    pub kill_server: bool,
    /// Kills the Docker daemon every task shares (and starts it with
    /// `scripts/ensure-docker.sh`): only where nothing else uses it.
    pub kill_dockerd: bool,
    /// The mean pause between two kills; each is drawn between half and one and a half of it.
    pub kill_every: Duration,
    /// How long a killed process stays down, drawn between the two.
    pub down_for: (Duration, Duration),
    /// How long the tasks may take to finish once queueing stopped.
    pub drain_timeout: Duration,
    /// Seeds the choice of victims and moments; printed, so a run can be repeated.
    pub seed: u64,
}

/// Runs the soak. `None` when it cannot run here (no Docker engine or no PostgreSQL) outside
/// CI, where their absence fails instead.
pub async fn run(settings: &Settings) -> Option<Report> {
    if !docker_available() {
        return None;
    }
    let database = fresh_database().await?;
    ensure_local_image();
    let began = Instant::now();
    let fleet = Fleet::start(&database.url, settings);
    let client = Client::new(&fleet, settings).await;
    let runner_ids = fleet.runner_ids.clone();
    let prefix = fleet.prefix.clone();

    let sampling = Sampler::start(prefix.clone());
    let (stop_chaos, stopped) = mpsc::channel();
    let chaos = {
        let settings = settings.clone();
        std::thread::spawn(move || chaos(fleet, &settings, &stopped, began))
    };

    let acknowledged = client.queue_for(settings).await;
    let _ = stop_chaos.send(());
    let (fleet, kills) = chaos.join().expect("the chaos thread panicked");
    eprintln!(
        "soak: queued {} tasks in {:?} through {} kills; draining",
        acknowledged.len(),
        settings.queue_for,
        kills.len()
    );
    client.drain(settings.drain_timeout).await;
    let took = began.elapsed();
    let tasks = client.every_task().await;

    let leftovers = fleet.stop();
    let sampling = sampling.stop();
    remove_leftovers(&prefix);
    Some(Report::new(
        settings,
        took,
        kills,
        &acknowledged,
        &tasks,
        &sampling,
        leftovers,
        &runner_ids,
    ))
}

// === impl Settings ===

impl Settings {
    /// `self` with the knobs set in the environment:
    ///
    /// | knob | meaning |
    /// |---|---|
    /// | `STEVEDORE_SOAK_SECS` | how long tasks are queued and processes killed |
    /// | `STEVEDORE_SOAK_RATE` | tasks queued per second (default: keep a backlog) |
    /// | `STEVEDORE_SOAK_BACKLOG` | tasks kept queued without a rate |
    /// | `STEVEDORE_SOAK_TASK_SECS` | how long a task sleeps: `1-3` (whole seconds) |
    /// | `STEVEDORE_SOAK_CAPACITY` | task slots per runner |
    /// | `STEVEDORE_SOAK_LEASE_SECS` | the runners' lease |
    /// | `STEVEDORE_SOAK_KILL_RUNNER`, `_KILL_SERVER`, `_KILL_DOCKERD` | 1 or 0 |
    /// | `STEVEDORE_SOAK_KILL_EVERY_SECS` | the mean pause between kills |
    /// | `STEVEDORE_SOAK_DOWN_SECS` | how long a killed process stays down: `2-6`, or `4` |
    /// | `STEVEDORE_SOAK_DRAIN_SECS` | how long the tasks may take to finish after |
    /// | `STEVEDORE_SOAK_SEED` | the seed of victims and moments |
    pub fn with_env_knobs(self) -> Settings {
        let seconds = |name: &str, default: Duration| {
            knob::<f64>(name).map_or(default, Duration::from_secs_f64)
        };
        let capacity = knob("STEVEDORE_SOAK_CAPACITY").unwrap_or(self.capacity);
        Settings {
            queue_for: seconds("STEVEDORE_SOAK_SECS", self.queue_for),
            rate: knob("STEVEDORE_SOAK_RATE")
                .filter(|rate: &f64| *rate > 0.0)
                .or(self.rate),
            backlog: knob("STEVEDORE_SOAK_BACKLOG").unwrap_or(self.backlog),
            task_secs: knob::<SecondsRange>("STEVEDORE_SOAK_TASK_SECS")
                .map_or(self.task_secs, |range| range.0),
            capacity,
            lease_secs: knob("STEVEDORE_SOAK_LEASE_SECS").unwrap_or(self.lease_secs),
            kill_runner: flag("STEVEDORE_SOAK_KILL_RUNNER").unwrap_or(self.kill_runner),
            kill_server: flag("STEVEDORE_SOAK_KILL_SERVER").unwrap_or(self.kill_server),
            kill_dockerd: flag("STEVEDORE_SOAK_KILL_DOCKERD").unwrap_or(self.kill_dockerd),
            kill_every: seconds("STEVEDORE_SOAK_KILL_EVERY_SECS", self.kill_every),
            down_for: knob::<SecondsRange>("STEVEDORE_SOAK_DOWN_SECS")
                .map_or(self.down_for, |range| range.0),
            drain_timeout: seconds("STEVEDORE_SOAK_DRAIN_SECS", self.drain_timeout),
            seed: knob("STEVEDORE_SOAK_SEED").unwrap_or(self.seed),
        }
    }

    /// A seed that differs from run to run.
    pub fn fresh_seed() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
    }

    /// What may be killed, by kind: the chaos takes one of each kind in turn, so even a short
    /// soak kills each kind once.
    pub(super) fn victims(&self) -> Vec<Vec<Victim>> {
        let mut kinds = Vec::new();
        if self.kill_runner {
            kinds.push(vec![Victim::Runner(0), Victim::Runner(1)]);
        }
        if self.kill_server {
            kinds.push(vec![Victim::Server(0), Victim::Server(1)]);
        }
        if self.kill_dockerd {
            kinds.push(vec![Victim::Dockerd]);
        }
        kinds
    }

    fn describe(&self) -> String {
        let load = match self.rate {
            Some(rate) => format!("{rate} tasks/s"),
            None => format!("a backlog of {} tasks", self.backlog),
        };
        let killed: Vec<&str> = [
            (self.kill_runner, "a runner"),
            (self.kill_server, "a server"),
            (self.kill_dockerd, "dockerd"),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect();
        let kills = if killed.is_empty() {
            "no kills".to_owned()
        } else {
            format!(
                "SIGKILL to {} about every {} s, back after {:.0}–{:.0} s",
                killed.join(", "),
                self.kill_every.as_secs(),
                self.down_for.0.as_secs_f64(),
                self.down_for.1.as_secs_f64()
            )
        };
        format!(
            "{} s of queueing ({load}) of {}–{} s tasks into 3 projects; 2 servers on \
             PostgreSQL, 2 runners × {} slots, {} s leases; {kills}; seed {}",
            self.queue_for.as_secs(),
            self.task_secs.0.as_secs(),
            self.task_secs.1.as_secs(),
            self.capacity,
            self.lease_secs,
            self.seed
        )
    }
}

/// `low-high` seconds, or one number for both.
struct SecondsRange((Duration, Duration));

impl std::str::FromStr for SecondsRange {
    type Err = std::num::ParseFloatError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (low, high) = text.split_once('-').unwrap_or((text, text));
        let low = Duration::from_secs_f64(low.trim().parse()?);
        let high = Duration::from_secs_f64(high.trim().parse()?);
        Ok(SecondsRange((low, high.max(low))))
    }
}

fn knob<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    let parsed = value.trim().parse().ok();
    assert!(parsed.is_some(), "{name}={value:?} is not a valid value");
    parsed
}

fn flag(name: &str) -> Option<bool> {
    let value = std::env::var(name).ok()?;
    match value.trim() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        other => panic!("{name}={other:?}: say 1 or 0"),
    }
}
