//! The short soak of "run each task once, as far as a machine can tell", for CI: about a
//! minute of tasks from three projects through two servers on PostgreSQL and two remote
//! runners while a runner, a server and the Docker daemon are killed with SIGKILL and started
//! again. No task may be lost, none may run twice at once, every one must complete, and
//! nothing may be left behind. The long form with figures is the `soak` bench; both run
//! `harness`.
//!
//! It kills the Docker daemon every other test shares, so it is ignored by default and
//! `scripts/test.sh` runs it alone, after the rest. `STEVEDORE_SOAK_KILL_DOCKERD=0` spares
//! the daemon (and the other knobs of `harness::Settings::with_env_knobs` apply too).

pub mod harness;

use std::time::Duration;

use harness::Settings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the shared Docker daemon: scripts/test.sh runs it alone"]
async fn every_task_runs_once_while_a_runner_a_server_and_dockerd_are_killed() {
    let settings = Settings {
        queue_for: Duration::from_secs(50),
        rate: None,
        backlog: 12,
        task_secs: (Duration::from_secs(1), Duration::from_secs(3)),
        capacity: 3,
        lease_secs: 10,
        kill_runner: true,
        kill_server: true,
        kill_dockerd: true,
        kill_every: Duration::from_secs(12),
        down_for: (Duration::from_secs(2), Duration::from_secs(5)),
        drain_timeout: Duration::from_secs(240),
        seed: Settings::fresh_seed(),
    }
    .with_env_knobs();
    let Some(report) = harness::run(&settings).await else {
        return;
    };
    report.print();
    assert!(report.completed > 0, "no task completed");
    // Each kind switched on was killed at least once (the chaos takes the kinds in turn).
    for kind in settings.victims() {
        assert!(
            report.kills.iter().any(|kill| kind.contains(&kill.victim)),
            "the soak never killed any of {kind:?}: {:?}",
            report.kills
        );
    }
    let missed = report.missed();
    assert!(missed.is_empty(), "targets missed: {missed:#?}");
}
