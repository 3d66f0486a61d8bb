//! The runner's lifecycle against the in-memory `FakeEngine` and a real SQLite store: fast,
//! and exact about what the runner records and asks the engine to do. The same behaviours
//! against the real Docker engine are in `docker.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::{Background, Harness, zip_of};
use stevedore_engine::fake::{FakeEngine, FakeEntryKind, FakeOperation, FakeRun};
use stevedore_engine::{ContainerRuntime, ContainerSpec, EngineCapabilities, EngineError};
use stevedore_model::{
    Clock, CodeKind, ManualClock, StackTable, SystemClock, TaskOutcome, TaskStatus,
};
use stevedore_runner::{
    LABEL_RUNNER, LABEL_TASK, LocalResult, LocalRun, Runner, RunnerConfig, RunnerError, run_local,
};
use tokio_util::sync::CancellationToken;

const WITHIN: Duration = Duration::from_secs(10);

/// Short intervals, so the tests take milliseconds.
fn test_config(runner_id: &str) -> RunnerConfig {
    RunnerConfig {
        runner_id: runner_id.to_owned(),
        capacity: Some(4),
        memory_budget_mib: Some(4096),
        lease_secs: 30,
        heartbeat_interval: Duration::from_millis(50),
        idle_poll_interval: Duration::from_millis(40),
        log_flush_interval: Duration::from_millis(20),
        shutdown_grace: Duration::from_secs(5),
        requeue_backoff_base: Duration::from_millis(10),
        requeue_backoff_max: Duration::from_millis(40),
        ..RunnerConfig::default()
    }
}

fn engine_with(image: &str, run: FakeRun) -> FakeEngine {
    let engine = FakeEngine::new();
    engine.add_image(image);
    engine.script_image(image, run);
    engine
}

fn start(
    harness: &Harness,
    config: RunnerConfig,
    engine: &FakeEngine,
) -> (Background, Arc<harness::ObservedSource>) {
    let source = harness.source();
    let runner = Runner::new(config, source.clone(), Arc::new(engine.clone()));
    (Background::start(runner), source)
}

async fn system_harness() -> Harness {
    Harness::new(Arc::new(SystemClock)).await
}

#[tokio::test]
async fn a_task_that_exits_0_completes_with_its_log_times_and_usage() {
    let harness = system_harness().await;
    let engine = engine_with(
        "test/ok",
        FakeRun::success()
            .stdout("hello\n")
            .stderr("a warning\n")
            .running_for(Duration::from_millis(60))
            .peak_memory(5 << 20),
    );
    harness
        .push_image_code("ok", "test/ok", Some("echo hello"), |spec| {
            spec.env_vars.insert("GREETING".into(), "hi".into());
            spec.config = Some("{\"k\":1}".into());
        })
        .await;
    let task = harness.queue("ok", "{\"n\":1}", 60).await;
    let (runner, source) = start(&harness, test_config("r-complete"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.peak_memory_bytes, Some(5 << 20));
    assert_eq!(done.cpu_time_ms, Some(1));
    let (start, end) = (done.start_time.unwrap(), done.end_time.unwrap());
    assert!(
        end - start >= chrono::Duration::milliseconds(60),
        "{start} .. {end}"
    );
    let log = harness.log(&task.id).await;
    assert!(
        log.contains("hello\n") && log.contains("a warning\n"),
        "{log:?}"
    );

    runner.stop().await.unwrap();
    let (id, spec) = engine.created().remove(0);
    assert_eq!(spec.labels[LABEL_TASK], task.id);
    assert_eq!(spec.labels[LABEL_RUNNER], "r-complete");
    assert_eq!(
        spec.cmd,
        Some(vec!["sh".into(), "-c".into(), "echo hello".into()])
    );
    assert_eq!(spec.working_dir.as_deref(), Some("/mnt/task"));
    assert_eq!(spec.memory_bytes, Some(64 << 20));
    assert!(spec.env.contains(&("TASK_ID".into(), task.id.clone())));
    assert!(spec.env.contains(&("GREETING".into(), "hi".into())));
    let payload = spec
        .files
        .iter()
        .find(|f| f.path == "/mnt/.task_payload")
        .unwrap();
    assert_eq!(payload.contents, b"{\"n\":1}");
    let config_file = spec
        .files
        .iter()
        .find(|f| f.path == "/mnt/.task_config")
        .unwrap();
    assert_eq!(config_file.contents, b"{\"k\":1}");
    assert_eq!(engine.removed(), vec![id]);
    assert!(engine.existing().is_empty());
    assert_eq!(source.max_running(), 1);
}

#[tokio::test]
async fn a_non_zero_exit_ends_error_with_the_exit_code() {
    let harness = system_harness().await;
    let engine = engine_with("test/fails", FakeRun::exits(3).stderr("broken\n"));
    harness
        .push_image_code("fails", "test/fails", Some("exit 3"), |_| {})
        .await;
    let task = harness.queue("fails", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-exit"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error);
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(done.msg.as_deref(), Some("exited with code 3"));
    assert!(harness.log(&task.id).await.contains("broken"));
    runner.stop().await.unwrap();
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn an_oom_kill_ends_error_naming_the_limit() {
    let harness = system_harness().await;
    let engine = engine_with("test/oom", FakeRun::oom_killed());
    harness
        .push_image_code("oom", "test/oom", Some("eat memory"), |spec| {
            spec.limits.memory_mib = 16;
        })
        .await;
    let task = harness.queue("oom", "", 60).await;
    let (runner, source) = start(&harness, test_config("r-oom"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error);
    assert_eq!(done.msg.as_deref(), Some("out of memory (limit 16 MiB)"));
    assert_eq!(
        source.outcome_of(&task.id).unwrap().0,
        TaskOutcome::OutOfMemory { limit_mib: 16 }
    );
    runner.stop().await.unwrap();
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn the_deadline_kills_the_task_and_ends_it_timeout() {
    let harness = system_harness().await;
    // The pull takes longer than the timeout: the timeout counts from container start.
    let engine = FakeEngine::new();
    engine.add_registry_image("test/slow-pull:1", Duration::from_millis(1500));
    engine.script_image("test/slow-pull:1", FakeRun::forever());
    harness
        .push_image_code("hangs", "test/slow-pull:1", Some("sleep 1000"), |_| {})
        .await;
    let task = harness.queue("hangs", "", 1).await;
    let (runner, source) = start(&harness, test_config("r-timeout"), &engine);

    harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let progress = source.progress_messages.lock().unwrap().clone();
    assert_eq!(
        progress[0], "pulling image test/slow-pull:1",
        "{progress:?}"
    );
    let started = tokio::time::Instant::now();
    let done = harness.finished(&task.id, WITHIN).await;
    let took = started.elapsed();
    assert_eq!(done.status, TaskStatus::Timeout, "{done:#?}");
    assert!(
        took >= Duration::from_millis(800),
        "ended {took:?} after start"
    );
    assert_eq!(engine.kills().len(), 1);
    runner.stop().await.unwrap();
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn cancelling_a_running_task_kills_it_within_a_second() {
    let harness = system_harness().await;
    let engine = engine_with("test/forever", FakeRun::forever());
    harness
        .push_image_code("forever", "test/forever", Some("sleep 1000"), |_| {})
        .await;
    let task = harness.queue("forever", "", 3600).await;
    let (runner, _) = start(&harness, test_config("r-cancel"), &engine);

    harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let asked = tokio::time::Instant::now();
    harness
        .store
        .cancel_task(&harness.project_id, &task.id, harness.clock.now())
        .await
        .unwrap();
    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Cancelled);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "took {:?}",
        asked.elapsed()
    );
    assert_eq!(engine.kills().len(), 1);
    runner.stop().await.unwrap();
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn infrastructure_failures_requeue_with_backoff_and_end_error_after_the_cap() {
    let harness = system_harness().await;
    let engine = engine_with("test/infra", FakeRun::success());
    for _ in 0..10 {
        engine.fail_next(
            FakeOperation::Create,
            EngineError::Failed {
                message: "the storage driver broke".into(),
            },
        );
    }
    harness
        .push_image_code("infra", "test/infra", Some("true"), |spec| spec.retries = 3)
        .await;
    let task = harness.queue("infra", "", 60).await;
    let config = RunnerConfig {
        max_infra_attempts: 3,
        ..test_config("r-infra")
    };
    let (runner, source) = start(&harness, config, &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error, "{done:#?}");
    assert_eq!(done.infra_attempts, 3);
    assert!(
        done.msg
            .as_deref()
            .unwrap_or_default()
            .contains("infrastructure"),
        "{done:#?}"
    );
    let requeues = source.requeues.lock().unwrap().clone();
    assert_eq!(requeues.len(), 3);
    let delays: Vec<Duration> = requeues.iter().map(|(_, r)| r.delay).collect();
    assert_eq!(
        delays,
        vec![
            Duration::from_millis(10),
            Duration::from_millis(20),
            Duration::from_millis(40)
        ]
    );
    assert!(requeues[0].1.reason.contains("the storage driver broke"));
    runner.stop().await.unwrap();
    // No user retry was spent on the infrastructure's failures.
    let retries = harness
        .store
        .list_tasks(
            &harness.project_id,
            &stevedore_store::TaskFilter::default(),
            stevedore_store::Page {
                page: 1,
                per_page: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(retries.len(), 1, "{retries:#?}");
}

#[tokio::test]
async fn an_infrastructure_failure_once_then_success_completes() {
    let harness = system_harness().await;
    let engine = engine_with("test/blip", FakeRun::success());
    engine.fail_next(
        FakeOperation::Start,
        EngineError::Unreachable {
            message: "connection reset".into(),
        },
    );
    harness
        .push_image_code("blip", "test/blip", Some("true"), |_| {})
        .await;
    let task = harness.queue("blip", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-blip"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.infra_attempts, 1);
    runner.stop().await.unwrap();
    assert_eq!(engine.created().len(), 2);
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn a_missing_image_is_the_users_error_with_a_clear_message() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    harness
        .push_image_code("typo", "team/no-such-image:1", Some("true"), |_| {})
        .await;
    let task = harness.queue("typo", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-typo"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error);
    assert_eq!(done.infra_attempts, 0);
    let msg = done.msg.unwrap_or_default();
    assert!(
        msg.contains("team/no-such-image:1") && msg.contains("not found"),
        "{msg}"
    );
    runner.stop().await.unwrap();
    assert!(engine.created().is_empty());
}

#[tokio::test]
async fn a_pull_past_its_deadline_requeues_and_an_image_over_the_size_limit_ends_error() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    engine.add_registry_image("team/slow:1", Duration::from_secs(30));
    engine.add_registry_image("team/big:1", Duration::from_millis(10));
    harness
        .push_image_code("slow", "team/slow:1", Some("true"), |_| {})
        .await;
    harness
        .push_image_code("big", "team/big:1", Some("true"), |_| {})
        .await;
    let slow = harness.queue("slow", "", 60).await;
    let big = harness.queue("big", "", 60).await;
    let config = RunnerConfig {
        pull_timeout: Duration::from_millis(300),
        // The fake's layer is 100 bytes to download and its image 1 MiB on disk: the pull
        // passes, the image does not.
        max_image_bytes: Some(150),
        max_infra_attempts: 2,
        ..test_config("r-pull-bounds")
    };
    let (runner, source) = start(&harness, config, &engine);

    let done = harness.finished(&big.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error);
    assert_eq!(done.infra_attempts, 0);
    let msg = done.msg.unwrap_or_default();
    assert!(
        msg.contains("team/big:1") && msg.contains("max_image_bytes"),
        "{msg}"
    );

    // Requeued as the infrastructure's, then ended after the cap, the reason kept.
    let done = harness.finished(&slow.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error);
    assert_eq!(done.infra_attempts, 2);
    let msg = done.msg.unwrap_or_default();
    assert!(msg.contains("pull_timeout_secs"), "{msg}");
    let requeues = source.requeues.lock().unwrap().clone();
    assert!(
        requeues
            .iter()
            .any(|(id, request)| id == &slow.id && request.reason.contains("not pulled within"))
    );
    runner.stop().await.unwrap();
    assert!(engine.created().is_empty());
    // Nobody waited for the slow pull any more: it was stopped, so the second attempt
    // pulled afresh instead of joining a pull left running.
    assert_eq!(engine.pull_count("team/slow:1"), 2);
}

#[tokio::test]
async fn a_stale_lease_is_abandoned_and_its_container_killed_and_removed() {
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let harness = Harness::new(clock.clone()).await;
    let engine = engine_with("test/partitioned", FakeRun::forever());
    harness
        .push_image_code(
            "partitioned",
            "test/partitioned",
            Some("sleep 1000"),
            |_| {},
        )
        .await;
    let task = harness.queue("partitioned", "", 3600).await;
    let config = RunnerConfig {
        shutdown_grace: Duration::from_millis(100),
        ..test_config("r-stale")
    };
    let (runner, source) = start(&harness, config, &engine);
    harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let first = engine.existing();
    assert_eq!(first.len(), 1);

    // The runner loses the store, its lease expires, and the rescuer gives the task back.
    source.cut_heartbeats(true);
    clock.advance(chrono::Duration::seconds(31));
    let rescued = harness.store.rescue_expired(clock.now(), 5).await.unwrap();
    let rescued: Vec<&str> = rescued.iter().map(|task| task.task_id.as_str()).collect();
    assert_eq!(rescued, vec![task.id.as_str()]);
    source.cut_heartbeats(false);

    // The old attempt learns at its next heartbeat and lets go (the rescued task may well be
    // leased again meanwhile, as a new attempt with a new lease and container).
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !engine.removed().contains(&first[0]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stale attempt was not torn down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(engine.kills().contains(&first[0]));
    assert!(
        source.outcomes.lock().unwrap().is_empty(),
        "a stale attempt recorded a result"
    );
    runner.stop().await.unwrap();
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn a_runner_cut_off_for_a_whole_lease_stops_its_container() {
    let harness = system_harness().await;
    let engine = engine_with("test/cut-off", FakeRun::forever());
    harness
        .push_image_code("cut-off", "test/cut-off", Some("sleep 1000"), |_| {})
        .await;
    let task = harness.queue("cut-off", "", 3600).await;
    let config = RunnerConfig {
        lease_secs: 1,
        ..test_config("r-cut-off")
    };
    let (runner, source) = start(&harness, config, &engine);
    harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let container = engine.existing().remove(0);

    source.cut_heartbeats(true);
    let cut = tokio::time::Instant::now();
    while !engine.removed().contains(&container) {
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "the container outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        cut.elapsed() >= Duration::from_millis(800),
        "{:?}",
        cut.elapsed()
    );
    assert!(engine.kills().contains(&container));
    assert!(source.outcomes.lock().unwrap().is_empty());
    // The task is the rescuer's now: still leased in the store until its lease is rescued.
    assert_eq!(harness.task(&task.id).await.status, TaskStatus::Running);
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn a_heartbeat_that_never_answers_stops_the_container_within_the_lease() {
    let harness = system_harness().await;
    let engine = engine_with("test/silent", FakeRun::forever());
    harness
        .push_image_code("silent", "test/silent", Some("sleep 1000"), |_| {})
        .await;
    let task = harness.queue("silent", "", 3600).await;
    let config = RunnerConfig {
        lease_secs: 1,
        ..test_config("r-silent")
    };
    let (runner, source) = start(&harness, config, &engine);
    harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let container = engine.existing().remove(0);

    // Packets dropped without a word: the heartbeat neither answers nor fails.
    source.hang_heartbeats(true);
    let cut = tokio::time::Instant::now();
    while !engine.kills().contains(&container) {
        assert!(
            cut.elapsed() < Duration::from_millis(2500),
            "the container outlived its lease: a hung heartbeat kept it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(source.outcomes.lock().unwrap().is_empty());
    source.hang_heartbeats(false);
    runner.stop().await.unwrap();
}

/// Found by the soak's reading of its runners' warnings: a server killed right after a
/// container started left the runner retrying `mark_running` while the lease ran out, with the
/// container running on; the rescued task could then start elsewhere while it still ran.
#[tokio::test]
async fn a_source_gone_while_the_task_is_marked_running_stops_the_container_within_the_lease() {
    let harness = system_harness().await;
    let engine = engine_with("test/marked", FakeRun::forever());
    harness
        .push_image_code("marked", "test/marked", Some("sleep 1000"), |_| {})
        .await;
    let config = RunnerConfig {
        lease_secs: 1,
        ..test_config("r-marked")
    };
    let (runner, source) = start(&harness, config, &engine);
    source.go_away_at_mark_running(true);
    let task = harness.queue("marked", "", 3600).await;
    let container = loop {
        if let Some(container) = engine.existing().first() {
            break container.clone();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let created = tokio::time::Instant::now();
    while !engine.kills().contains(&container) {
        assert!(
            created.elapsed() < Duration::from_millis(2500),
            "the container outlived its lease: a mark_running that never answered kept it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(source.outcomes.lock().unwrap().is_empty());
    // The task is the rescuer's now: still leased in the store until its lease is rescued.
    assert_eq!(harness.task(&task.id).await.status, TaskStatus::Preparing);
    source.go_away_at_mark_running(false);
    source.cut_heartbeats(false);
    runner.stop().await.unwrap();
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn capacity_and_the_memory_budget_are_never_exceeded() {
    let harness = system_harness().await;
    let engine = engine_with(
        "test/busy",
        FakeRun::success().running_for(Duration::from_millis(100)),
    );
    harness
        .push_image_code("small", "test/busy", Some("work"), |spec| {
            spec.limits.memory_mib = 64
        })
        .await;
    harness
        .push_image_code("big", "test/busy", Some("work"), |spec| {
            spec.limits.memory_mib = 400
        })
        .await;

    // Capacity 2 and nothing leased ahead: never more than two tasks leased at once.
    let mut small = Vec::new();
    for _ in 0..6 {
        small.push(harness.queue("small", "", 60).await.id);
    }
    let config = RunnerConfig {
        capacity: Some(2),
        prepare_ahead: 0,
        ..test_config("r-capacity")
    };
    let (runner, source) = start(&harness, config, &engine);
    for id in &small {
        assert_eq!(
            harness.finished(id, WITHIN).await.status,
            TaskStatus::Complete
        );
    }
    runner.stop().await.unwrap();
    assert_eq!(source.max_leased(), 2);
    assert_eq!(source.max_running(), 2);

    // A 1000 MiB budget holds two 400 MiB containers, never three, whatever the capacity.
    let mut big = Vec::new();
    for _ in 0..5 {
        big.push(harness.queue("big", "", 60).await.id);
    }
    let config = RunnerConfig {
        capacity: Some(8),
        memory_budget_mib: Some(1000),
        ..test_config("r-memory")
    };
    let (runner, source) = start(&harness, config, &engine);
    for id in &big {
        assert_eq!(
            harness.finished(id, WITHIN).await.status,
            TaskStatus::Complete
        );
    }
    runner.stop().await.unwrap();
    assert_eq!(source.max_running(), 2);
    assert!(engine.existing().is_empty());
}

/// The label that names a container's task.
fn task_of(spec: &ContainerSpec) -> Option<&str> {
    spec.labels.get(LABEL_TASK).map(String::as_str)
}

#[tokio::test]
async fn with_every_slot_busy_one_more_task_is_prepared_and_started_when_a_slot_frees() {
    let harness = system_harness().await;
    let engine = engine_with(
        "test/short",
        FakeRun::success().running_for(Duration::from_millis(150)),
    );
    harness
        .push_image_code("short", "test/short", Some("work"), |_| {})
        .await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(harness.queue("short", "", 60).await.id);
    }
    let config = RunnerConfig {
        capacity: Some(1),
        ..test_config("r-ahead")
    };
    let (runner, source) = start(&harness, config, &engine);
    for id in &ids {
        assert_eq!(
            harness.finished(id, WITHIN).await.status,
            TaskStatus::Complete
        );
    }
    runner.stop().await.unwrap();
    // After a few short runs, a second task was leased and its container made ready while
    // the first ran; but one slot never ran two.
    assert_eq!(source.max_leased(), 2);
    assert_eq!(source.max_running(), 1);
    assert_eq!(engine.created().len(), ids.len());
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn a_task_waiting_ahead_for_a_slot_is_cancelled_without_ever_starting() {
    let harness = system_harness().await;
    let engine = engine_with(
        "test/short",
        FakeRun::success().running_for(Duration::from_millis(20)),
    );
    engine.add_image("test/forever");
    engine.script_image("test/forever", FakeRun::forever());
    harness
        .push_image_code("short", "test/short", Some("work"), |_| {})
        .await;
    harness
        .push_image_code("forever", "test/forever", Some("sleep 1000"), |_| {})
        .await;
    let config = RunnerConfig {
        capacity: Some(1),
        ..test_config("r-ahead-cancel")
    };
    let (runner, _) = start(&harness, config, &engine);
    // Short runs first, so that the runner leases ahead.
    for _ in 0..4 {
        let id = harness.queue("short", "", 60).await.id;
        harness.finished(&id, WITHIN).await;
    }
    let long = harness.queue("forever", "", 3600).await;
    harness
        .wait_for(&long.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let ahead = harness.queue("short", "", 60).await;
    let waiting = async {
        loop {
            let created = engine.created();
            if created
                .iter()
                .any(|(_, spec)| task_of(spec) == Some(&ahead.id))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WITHIN, waiting)
        .await
        .expect("the task leased ahead gets its container while the slot is busy");
    assert_eq!(harness.task(&ahead.id).await.status, TaskStatus::Preparing);

    harness
        .store
        .cancel_task(&harness.project_id, &ahead.id, harness.clock.now())
        .await
        .unwrap();
    let done = harness.finished(&ahead.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Cancelled);
    assert_eq!(done.start_time, None, "it never started");
    assert_eq!(harness.task(&long.id).await.status, TaskStatus::Running);

    harness
        .store
        .cancel_task(&harness.project_id, &long.id, harness.clock.now())
        .await
        .unwrap();
    harness.finished(&long.id, WITHIN).await;
    runner.stop().await.unwrap();
    assert!(engine.existing().is_empty(), "both containers are gone");
}

#[tokio::test]
async fn a_freed_slot_is_refilled_at_once_not_at_the_next_poll() {
    let harness = system_harness().await;
    let engine = engine_with(
        "test/quick",
        FakeRun::success().running_for(Duration::from_millis(20)),
    );
    harness
        .push_image_code("quick", "test/quick", Some("true"), |_| {})
        .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(harness.queue("quick", "", 60).await.id);
    }
    let config = RunnerConfig {
        capacity: Some(1),
        // A poll this slow would make 20 tasks take 100 s.
        idle_poll_interval: Duration::from_secs(5),
        ..test_config("r-refill")
    };
    let (runner, _) = start(&harness, config, &engine);
    let started = tokio::time::Instant::now();
    for id in &ids {
        harness.finished(id, WITHIN).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_short_tasks_finish_and_requeues_the_rest() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    engine.add_image("test/short").add_image("test/long");
    engine.script_image(
        "test/short",
        FakeRun::success().running_for(Duration::from_millis(200)),
    );
    engine.script_image("test/long", FakeRun::forever());
    harness
        .push_image_code("short", "test/short", Some("true"), |_| {})
        .await;
    harness
        .push_image_code("long", "test/long", Some("sleep 1000"), |_| {})
        .await;
    let short = harness.queue("short", "", 60).await;
    let long = harness.queue("long", "", 3600).await;
    let config = RunnerConfig {
        capacity: Some(2),
        shutdown_grace: Duration::from_millis(600),
        ..test_config("r-shutdown")
    };
    let (runner, _) = start(&harness, config, &engine);
    for id in [&short.id, &long.id] {
        harness
            .wait_for(id, WITHIN, |task| task.status == TaskStatus::Running)
            .await;
    }
    let queued_later = harness.queue("short", "", 60).await;

    let stopping = tokio::time::Instant::now();
    runner.stop().await.unwrap();
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(harness.task(&short.id).await.status, TaskStatus::Complete);
    let long = harness.task(&long.id).await;
    assert_eq!(long.status, TaskStatus::Queued, "{long:#?}");
    assert_eq!(long.infra_attempts, 1);
    // Nothing was leased after shutdown.
    assert_eq!(
        harness.task(&queued_later.id).await.status,
        TaskStatus::Queued
    );
    assert_eq!(engine.created().len(), 2);
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn a_runtime_code_gets_its_package_and_the_legacy_flags() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    engine.add_image(stevedore_model::stack::LOCAL_BUSYBOX_IMAGE);
    engine.set_default_run(FakeRun::success().stdout("ran\n"));
    let zip = zip_of(&[
        ("hello.sh", "#!/bin/sh\necho \"$@\"\n", 0o755),
        ("lib/data.txt", "data", 0o644),
    ]);
    harness
        .push_runtime_code("legacy", "binary", "hello.sh", zip, |_| {})
        .await;
    let task = harness.queue("legacy", "{\"x\":2}", 60).await;
    let (runner, _) = start(&harness, test_config("r-runtime"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    runner.stop().await.unwrap();
    let (id, spec): (_, ContainerSpec) = engine.created().remove(0);
    assert_eq!(spec.image, stevedore_model::stack::LOCAL_BUSYBOX_IMAGE);
    assert_eq!(
        spec.cmd.unwrap().join(" "),
        format!(
            "/mnt/task/hello.sh -id {} -d /mnt/task -payload /mnt/.task_payload -config \
             /mnt/.task_config",
            task.id
        )
    );
    // The package went in with the create, and its spooled file is gone since.
    let filesystem = engine.filesystem(&id).unwrap();
    assert_eq!(filesystem["/mnt/task/hello.sh"].mode, 0o755);
    assert_eq!(
        filesystem["/mnt/task/lib/data.txt"].kind,
        FakeEntryKind::File {
            size: 4,
            contents: Some(b"data".to_vec())
        }
    );
    let spooled = spec.package.unwrap();
    assert!(!spooled.path().exists(), "{}", spooled.path().display());
}

#[tokio::test]
async fn a_package_download_cut_short_is_requeued_and_leaves_no_file() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    engine.add_image(stevedore_model::stack::LOCAL_BUSYBOX_IMAGE);
    let zip = zip_of(&[("hello.sh", "#!/bin/sh\necho hi\n", 0o755)]);
    harness
        .push_runtime_code("cut-short", "binary", "hello.sh", zip, |_| {})
        .await;
    let work = tempfile::tempdir().unwrap();
    let config = RunnerConfig {
        work_dir: work.path().to_owned(),
        ..test_config("r-cut-short")
    };
    let (runner, source) = start(&harness, config, &engine);
    source.cut_packages_short(true);
    let task = harness.queue("cut-short", "", 60).await;
    let deadline = tokio::time::Instant::now() + WITHIN;
    while source.requeues.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no requeue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, requeue) = source.requeues.lock().unwrap()[0].clone();
    assert!(
        requeue.reason.contains("announced as") && requeue.reason.contains("arrived"),
        "{}",
        requeue.reason
    );
    // The next attempt gets the whole package and runs.
    source.cut_packages_short(false);
    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    runner.stop().await.unwrap();
    assert_eq!(engine.created().len(), 1);
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "the work directory holds {left:?}");
}

#[tokio::test]
async fn a_package_that_is_no_zip_ends_error_for_the_user_without_a_container() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    engine.add_image(stevedore_model::stack::LOCAL_BUSYBOX_IMAGE);
    harness
        .push_runtime_code(
            "not-a-zip",
            "binary",
            "hello.sh",
            b"not a zip".to_vec(),
            |_| {},
        )
        .await;
    let task = harness.queue("not-a-zip", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-not-a-zip"), &engine);
    let done = harness.finished(&task.id, WITHIN).await;
    runner.stop().await.unwrap();
    assert_eq!(done.status, TaskStatus::Error, "{done:#?}");
    let msg = done.msg.unwrap_or_default();
    assert!(msg.contains("invalid code package"), "{msg}");
    assert!(engine.created().is_empty());
}

#[tokio::test]
async fn an_unknown_runtime_ends_error_without_touching_the_engine() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    let zip = zip_of(&[("main.sh", "true", 0o755)]);
    harness
        .push_runtime_code("odd", "cobol", "main.sh", zip, |_| {})
        .await;
    let task = harness.queue("odd", "", 60).await;
    let config = RunnerConfig {
        stacks: StackTable::default()
            .with_image("default", "stevedore/busybox:local")
            .unwrap(),
        ..test_config("r-unknown-runtime")
    };
    let (runner, _) = start(&harness, config, &engine);
    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error);
    assert!(
        done.msg
            .unwrap_or_default()
            .contains("unknown runtime \"cobol\"")
    );
    runner.stop().await.unwrap();
    assert!(engine.created().is_empty());
}

#[tokio::test]
async fn output_is_shipped_in_chunks_up_to_the_cap_with_a_marker() {
    let harness = system_harness().await;
    let line = "0123456789abcdef0123456789abcdef0123456789abcdef012345678\n"; // 58 bytes
    let mut run = FakeRun::success();
    for _ in 0..2000 {
        run = run.stdout(line);
    }
    let engine = engine_with("test/chatty", run);
    harness
        .push_image_code("chatty", "test/chatty", Some("yes"), |_| {})
        .await;
    let task = harness.queue("chatty", "", 60).await;
    let config = RunnerConfig {
        log_cap_bytes: 50_000,
        log_flush_bytes: 8 << 10,
        ..test_config("r-cap")
    };
    let (runner, source) = start(&harness, config, &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete);
    let log = harness.log(&task.id).await;
    assert!(log.starts_with(line));
    // The cap holds the marker too.
    assert_eq!(log.len(), 50_000);
    assert!(
        log.ends_with("\n[stevedore: log truncated at 50000 bytes]\n"),
        "{:?}",
        &log[49_900..]
    );
    // Shipped in chunks, and nothing past the cap went over the wire.
    let appends = source.log_appends.lock().unwrap().clone();
    assert!(appends.len() >= 6, "{appends:?}");
    let shipped: usize = appends.iter().map(|(_, len)| len).sum();
    assert_eq!(shipped, 50_001);
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn an_engine_without_memory_limits_is_refused_unless_allowed() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    engine.set_capabilities(EngineCapabilities {
        memory_limit: false,
        cpu_cfs_quota: true,
        pids_limit: true,
        ncpu: 2,
        mem_total: 4 << 30,
        ..EngineCapabilities::default()
    });
    let source = harness.source();
    let runner = Runner::new(
        test_config("r-nomem"),
        source.clone(),
        Arc::new(engine.clone()),
    );
    let refused = runner.run(tokio_util::sync::CancellationToken::new()).await;
    let error = refused.unwrap_err();
    assert!(matches!(error, RunnerError::EngineCannotEnforceLimits(_)));
    assert!(error.to_string().contains("memory limits"), "{error}");

    let allowed = RunnerConfig {
        allow_unlimited_memory: true,
        ..test_config("r-nomem")
    };
    let runner = Background::start(Runner::new(allowed, source, Arc::new(engine)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!runner.is_finished());
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn the_cpu_reserve_puts_every_task_in_a_capped_group_or_runs_loudly_without() {
    let harness = system_harness().await;
    let engine = engine_with("test/busy", FakeRun::success());
    harness
        .push_image_code("busy", "test/busy", Some("true"), |_| {})
        .await;
    let task = harness.queue("busy", "", 60).await;
    let config = RunnerConfig {
        reserve_cpus: 0.5,
        ..test_config("r-reserve")
    };
    let (runner, _source) = start(&harness, config.clone(), &engine);
    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete);
    // Two cores less half a core, for every task together.
    assert_eq!(engine.cpu_group("stevedore-r-reserve"), Some(1_500_000_000));
    runner.stop().await.unwrap();
    // Removed with the runner, once its containers are gone.
    assert_eq!(engine.cpu_group("stevedore-r-reserve"), None);
    let created = engine.created();
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].1.cpu_group.as_deref(),
        Some("stevedore-r-reserve")
    );
    // The code sets no cpus: the default limit.
    assert_eq!(created[0].1.nano_cpus, Some(1_000_000_000));

    // An engine that cannot cap a group still runs tasks, without one.
    let unenforceable = engine_with("test/busy", FakeRun::success());
    unenforceable.fail_next(
        FakeOperation::CpuGroup,
        EngineError::LimitUnenforceable {
            capability: "a CPU reserve".into(),
            hint: "not root".into(),
        },
    );
    let task = harness.queue("busy", "", 60).await;
    let (runner, _source) = start(&harness, config, &unenforceable);
    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete);
    runner.stop().await.unwrap();
    assert_eq!(unenforceable.created()[0].1.cpu_group, None);

    // A reserve that leaves no CPU is refused before anything runs.
    let greedy = RunnerConfig {
        reserve_cpus: 2.0,
        ..test_config("r-greedy")
    };
    let refused = Runner::new(greedy, harness.source(), Arc::new(engine.clone()))
        .run(CancellationToken::new())
        .await;
    assert!(
        matches!(refused, Err(RunnerError::InvalidConfig(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn start_up_reaps_the_containers_of_an_earlier_life() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    engine.add_image("test/leftover");
    let mut leftover = ContainerSpec::new("test/leftover");
    leftover
        .labels
        .insert(LABEL_RUNNER.into(), "r-reaper".into());
    leftover.labels.insert(LABEL_TASK.into(), "old-task".into());
    let mine = engine.create(&leftover).await.unwrap();
    leftover
        .labels
        .insert(LABEL_RUNNER.into(), "another-runner".into());
    let theirs = engine.create(&leftover).await.unwrap();

    let (runner, _) = start(&harness, test_config("r-reaper"), &engine);
    tokio::time::sleep(Duration::from_millis(100)).await;
    runner.stop().await.unwrap();
    assert_eq!(engine.removed(), vec![mine]);
    assert_eq!(engine.existing(), vec![theirs]);
}

#[tokio::test]
async fn containers_of_runners_the_server_reports_gone_are_removed_and_no_others() {
    let harness = system_harness().await;
    let now = harness.clock.now();
    let seen = |id: &str| stevedore_store::RunnerSeen {
        id: id.to_owned(),
        clusters: vec!["default".to_owned()],
        capacity: 2,
        owner: None,
    };
    // Seen two minutes ago and not since: gone. Seen just now: alive. Never seen here (a
    // runner of another server on the same engine): not this server's to judge.
    harness
        .store
        .record_runner(&seen("r-ghost"), now - chrono::Duration::minutes(2))
        .await
        .unwrap();
    harness
        .store
        .record_runner(&seen("r-alive"), now)
        .await
        .unwrap();
    let engine = FakeEngine::new();
    engine.add_image("test/other");
    let mut created = std::collections::BTreeMap::new();
    for runner in ["r-ghost", "r-ghost", "r-alive", "r-stranger"] {
        let mut spec = ContainerSpec::new("test/other");
        spec.labels.insert(LABEL_RUNNER.into(), runner.into());
        spec.labels
            .insert(LABEL_TASK.into(), format!("task-of-{runner}"));
        let id = engine.create(&spec).await.unwrap();
        engine.start(&id).await.unwrap();
        created.insert(id, runner);
    }

    let config = RunnerConfig {
        reap_gone_interval: Some(Duration::from_millis(50)),
        ..test_config("r-reaper")
    };
    let (runner, _) = start(&harness, config, &engine);
    let deadline = tokio::time::Instant::now() + WITHIN;
    while engine.removed().len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A few more rounds, to see that nothing else goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    runner.stop().await.unwrap();
    let mut removed: Vec<&str> = engine.removed().iter().map(|id| created[id]).collect();
    removed.sort_unstable();
    assert_eq!(removed, ["r-ghost", "r-ghost"]);
    let mut left: Vec<&str> = engine.existing().iter().map(|id| created[id]).collect();
    left.sort_unstable();
    assert_eq!(left, ["r-alive", "r-stranger"]);
}

// === progress reported from inside the container ===

#[tokio::test]
async fn progress_lines_in_the_output_become_the_tasks_percent_and_msg() {
    let harness = system_harness().await;
    // Lines split across chunks and streams, garbage, and a flood to coalesce.
    let mut run = FakeRun::success()
        .stdout("starting\n::stevedore-pro")
        .stderr("::stevedore-progress::5 warming up\n")
        .stdout("gress::10 loading\r\n")
        .stdout("::stevedore-progress::101 not progress\n::stevedore-progress::x\n");
    let mut flood = String::new();
    for n in 0..5000 {
        flood.push_str(&format!("::stevedore-progress::{} item {n}\n", n % 90));
    }
    run = run
        .stdout(flood)
        .stderr("::stevedore-progress:: almost done\n")
        .stdout("::stevedore-progress::100\nbye\n");
    let engine = engine_with("test/progress", run);
    harness
        .push_image_code("progress", "test/progress", Some("work"), |_| {})
        .await;
    let task = harness.queue("progress", "", 60).await;
    let (runner, source) = start(&harness, test_config("r-progress"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.percent, Some(100));
    assert_eq!(done.msg.as_deref(), Some("almost done"));
    let calls = source.progress_of(&task.id);
    assert!(
        !calls.is_empty() && calls.len() <= 5,
        "the flood was not coalesced: {} calls",
        calls.len()
    );
    assert_eq!(
        calls.last().unwrap(),
        &(Some(100), Some("almost done".to_owned()))
    );
    // The lines stay in the log (interleaved as the streams were).
    let log = harness.log(&task.id).await;
    assert!(
        log.starts_with(
            "starting\n::stevedore-pro::stevedore-progress::5 warming up\ngress::10 loading\r\n"
        ),
        "{log:.200}"
    );
    assert!(log.ends_with("::stevedore-progress::100\nbye\n"));
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_progress_report_never_fails_the_task() {
    let harness = system_harness().await;
    let engine = engine_with(
        "test/progress-refused",
        FakeRun::success().stdout("::stevedore-progress::50 half\n"),
    );
    harness
        .push_image_code("refused", "test/progress-refused", Some("work"), |_| {})
        .await;
    let task = harness.queue("refused", "", 60).await;
    let (runner, source) = start(&harness, test_config("r-progress-refused"), &engine);
    source.fail_progress(true);
    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.percent, None);
    assert_eq!(source.progress_of(&task.id).len(), 1);
    runner.stop().await.unwrap();
}

// === local runs ===

fn local_config() -> RunnerConfig {
    RunnerConfig {
        stacks: StackTable::default()
            .with_image("default", "test/local-stack")
            .unwrap(),
        ..RunnerConfig::default()
    }
}

fn local_image_run(image: &str, adjust: impl FnOnce(&mut stevedore_model::CodeSpec)) -> LocalRun {
    let mut spec = harness::code_spec(
        "local",
        CodeKind::Image {
            image: image.to_owned(),
            command: Some("work".to_owned()),
        },
    );
    adjust(&mut spec);
    LocalRun::new(spec, "{\"n\":1}".to_owned(), None, chrono::Utc::now()).unwrap()
}

async fn run_locally(
    engine: &FakeEngine,
    run: LocalRun,
    cancel: CancellationToken,
) -> (Result<LocalResult, RunnerError>, Vec<u8>) {
    let (on_log, printed) = harness::collecting_sink();
    let result = tokio::time::timeout(
        WITHIN,
        run_local(
            Arc::new(engine.clone()),
            local_config(),
            run,
            Arc::new(SystemClock),
            on_log,
            cancel,
        ),
    )
    .await
    .expect("the local run did not end");
    let printed = printed.lock().unwrap().clone();
    (result, printed)
}

#[tokio::test]
async fn a_local_run_completes_with_its_log_progress_and_usage_and_leaves_nothing() {
    let engine = engine_with(
        "test/local-ok",
        FakeRun::success()
            .stdout("hello\n::stevedore-progress::70 nearly\n")
            .stderr("a warning\n")
            .running_for(Duration::from_millis(50))
            .peak_memory(7 << 20),
    );
    let run = local_image_run("test/local-ok", |spec| {
        spec.env_vars.insert("GREETING".into(), "hi".into());
        spec.retries = 3;
    });
    let task_id = run.task.id.clone();
    let (result, printed) = run_locally(&engine, run, CancellationToken::new()).await;
    let result = result.unwrap();
    assert_eq!(result.task_id, task_id);
    assert_eq!(result.status, TaskStatus::Complete);
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(
        (result.percent, result.msg.as_deref()),
        (Some(70), Some("nearly"))
    );
    assert_eq!(result.peak_memory_bytes, Some(7 << 20));
    assert_eq!(result.cpu_time_ms, Some(1));
    let (start, end) = (result.start_time.unwrap(), result.end_time.unwrap());
    assert!(end - start >= chrono::Duration::milliseconds(50));
    let log = String::from_utf8(result.log.clone()).unwrap();
    assert!(
        log.contains("hello\n") && log.contains("a warning\n"),
        "{log}"
    );
    assert_eq!(printed, result.log, "the callback saw the whole log");

    // The production contract, with a runner id of its own, and nothing left behind.
    assert!(
        result.runner_id.starts_with("local-"),
        "{}",
        result.runner_id
    );
    let (id, spec) = engine.created().remove(0);
    assert_eq!(spec.labels[LABEL_RUNNER], result.runner_id);
    assert_eq!(spec.labels[LABEL_TASK], task_id);
    assert!(spec.env.contains(&("TASK_ID".into(), task_id.clone())));
    assert!(spec.env.contains(&("GREETING".into(), "hi".into())));
    assert_eq!(spec.memory_bytes, Some(64 << 20));
    assert_eq!(spec.pids_limit, Some(512));
    assert_eq!(spec.network_mode.as_deref(), Some("none"));
    assert_eq!(
        engine.uploaded_file(&id, "/mnt/.task_payload"),
        None,
        "removed before run_local returned"
    );
    assert_eq!(engine.removed(), vec![id]);
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn a_local_run_that_exits_non_zero_ends_error_without_a_retry() {
    let engine = engine_with("test/local-fails", FakeRun::exits(3).stderr("broken\n"));
    let run = local_image_run("test/local-fails", |spec| spec.retries = 5);
    let (result, printed) = run_locally(&engine, run, CancellationToken::new()).await;
    let result = result.unwrap();
    assert_eq!(result.status, TaskStatus::Error);
    assert_eq!(result.exit_code, Some(3));
    assert_eq!(result.msg.as_deref(), Some("exited with code 3"));
    assert_eq!(printed, b"broken\n");
    // One attempt: the code's retries are not applied locally.
    assert_eq!(engine.created().len(), 1);
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn cancelling_a_local_run_kills_its_container_and_ends_cancelled() {
    let engine = engine_with("test/local-forever", FakeRun::forever());
    let run = local_image_run("test/local-forever", |_| {});
    let cancel = CancellationToken::new();
    let running = {
        let (engine, cancel) = (engine.clone(), cancel.clone());
        tokio::spawn(async move { run_locally(&engine, run, cancel).await })
    };
    let deadline = tokio::time::Instant::now() + WITHIN;
    while engine.created().is_empty() || !engine.kills().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = tokio::time::Instant::now();
    cancel.cancel();
    let (result, _) = running.await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    let result = result.unwrap();
    assert_eq!(result.status, TaskStatus::Cancelled);
    assert_eq!(result.msg.as_deref(), Some("cancelled"));
    assert_eq!(engine.kills().len(), 1);
    assert!(engine.existing().is_empty());
}

#[tokio::test]
async fn a_local_run_reports_infrastructure_and_setup_failures_as_errors_once() {
    // The engine fails mid-way: an error naming the failure, after one attempt.
    let engine = engine_with("test/local-infra", FakeRun::success());
    engine.fail_next(
        FakeOperation::Create,
        EngineError::Failed {
            message: "the storage driver broke".into(),
        },
    );
    let run = local_image_run("test/local-infra", |_| {});
    let (result, _) = run_locally(&engine, run, CancellationToken::new()).await;
    match result {
        Err(RunnerError::TaskNotRun {
            reason,
            infrastructure: true,
        }) => assert!(reason.contains("the storage driver broke"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(engine.created().is_empty());

    // A missing image: the user's, with the image named.
    let engine = FakeEngine::new();
    let run = local_image_run("team/no-such-image:1", |_| {});
    let (result, _) = run_locally(&engine, run, CancellationToken::new()).await;
    match result {
        Err(
            error @ RunnerError::TaskNotRun {
                infrastructure: false,
                ..
            },
        ) => {
            let message = error.to_string();
            assert!(
                message.contains("team/no-such-image:1") && message.contains("not found"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }

    // No engine at all.
    let engine = FakeEngine::new();
    engine.set_unreachable(true);
    let run = local_image_run("test/anything", |_| {});
    let (result, _) = run_locally(&engine, run, CancellationToken::new()).await;
    assert!(
        matches!(result, Err(RunnerError::EngineUnavailable(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_local_run_leaves_the_containers_of_other_runners_alone() {
    let engine = engine_with("test/local-neighbour", FakeRun::success());
    let mut theirs = ContainerSpec::new("test/local-neighbour");
    theirs.labels.insert(LABEL_RUNNER.into(), "embedded".into());
    theirs
        .labels
        .insert(LABEL_TASK.into(), "served-task".into());
    let theirs = engine.create(&theirs).await.unwrap();
    let run = local_image_run("test/local-neighbour", |_| {});
    let (result, _) = run_locally(&engine, run, CancellationToken::new()).await;
    assert_eq!(result.unwrap().status, TaskStatus::Complete);
    assert_eq!(engine.existing(), vec![theirs]);
}

#[tokio::test]
async fn a_local_runtime_run_gets_its_package() {
    let engine = FakeEngine::new();
    engine.add_image("test/local-stack");
    engine.set_default_run(FakeRun::success().stdout("ran\n"));
    let zip = zip_of(&[("run.sh", "echo ran\n", 0o644)]);
    let spec = harness::code_spec(
        "local-runtime",
        CodeKind::Runtime {
            runtime: "sh".into(),
            file_name: "run.sh".into(),
            stack: None,
        },
    );
    let run = LocalRun::new(spec, String::new(), Some(zip), chrono::Utc::now())
        .unwrap()
        .with_timeout(30)
        .unwrap();
    let task_id = run.task.id.clone();
    let (result, printed) = run_locally(&engine, run, CancellationToken::new()).await;
    assert_eq!(result.unwrap().status, TaskStatus::Complete);
    assert_eq!(printed, b"ran\n");
    let (id, spec) = engine.created().remove(0);
    assert_eq!(
        spec.cmd.unwrap().join(" "),
        format!(
            "sh /mnt/task/run.sh -id {task_id} -d /mnt/task -payload /mnt/.task_payload \
             -config /mnt/.task_config"
        )
    );
    let script = &engine.filesystem(&id).unwrap()["/mnt/task/run.sh"];
    assert_eq!(script.mode & 0o755, 0o755);
    // The run's own spool directory went with it: a local run leaves nothing behind.
    let spool = spec.package.unwrap().path().parent().unwrap().to_owned();
    assert!(!spool.exists(), "{} is left", spool.display());
}

#[tokio::test]
async fn bridge_codes_run_on_the_managed_network_isolated_before_the_first_lease() {
    let harness = system_harness().await;
    let engine = engine_with("test/net", FakeRun::success());
    harness
        .push_image_code("net", "test/net", None, |spec| {
            spec.network = "bridge".into();
        })
        .await;
    let task = harness.queue("net", "", 60).await;
    let mut config = test_config("r-network");
    config.network.allowed = vec!["10.1.2.3:5432".parse().unwrap()];
    let (runner, _) = start(&harness, config.clone(), &engine);
    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");

    // The network was gone meanwhile (pruned): the next task creates it again and runs.
    engine.remove_network("stevedore-tasks");
    let again = harness.queue("net", "", 60).await;
    let done = harness.finished(&again.id, WITHIN).await;
    runner.stop().await.unwrap();
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    for (_, spec) in engine.created() {
        assert_eq!(spec.network_mode.as_deref(), Some("stevedore-tasks"));
    }
    let policy = engine.isolation("stevedore-tasks").unwrap();
    assert_eq!(policy.blocked, config.network.blocked);
    assert_eq!(policy.allowed, config.network.allowed);
    assert_eq!(engine.networks().len(), 1);
}

#[tokio::test]
async fn a_runner_whose_network_cannot_be_isolated_refuses_to_start_unless_unguarded() {
    let harness = system_harness().await;
    let engine = FakeEngine::new();
    let refusal = || EngineError::LimitUnenforceable {
        capability: "task network isolation".into(),
        hint: "iptables is not installed".into(),
    };
    engine.fail_next(FakeOperation::Isolate, refusal());
    let runner = Runner::new(
        test_config("r-unguarded"),
        harness.source(),
        Arc::new(engine.clone()),
    );
    let refused = runner.start().await.unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("iptables is not installed") && message.contains("task_network.unguarded"),
        "{message}"
    );

    engine.fail_next(FakeOperation::Isolate, refusal());
    let mut config = test_config("r-unguarded");
    config.network.unguarded = true;
    let runner = Runner::new(config, harness.source(), Arc::new(engine.clone()));
    assert!(runner.start().await.is_ok());
    assert_eq!(engine.isolation("stevedore-tasks"), None);
}

#[tokio::test]
async fn a_restarted_runner_gives_back_what_its_earlier_life_held_at_once() {
    // The store's clock stands still: nothing expires, so only the release can free the task.
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let harness = Harness::new(clock.clone()).await;
    let engine = engine_with("test/reborn", FakeRun::success().stdout("again\n"));
    harness
        .push_image_code("reborn", "test/reborn", Some("true"), |_| {})
        .await;
    let task = harness.queue("reborn", "", 3600).await;
    // An earlier life of runner r-reborn leased it and died.
    let held = harness
        .store
        .lease(
            &stevedore_model::LeaseRequest {
                runner_id: "r-reborn".to_owned(),
                clusters: vec!["default".to_owned()],
                max_tasks: 1,
                lease_secs: 30,
                owner: None,
            },
            clock.now(),
        )
        .await
        .unwrap();
    assert_eq!(held.len(), 1);

    let (runner, _) = start(&harness, test_config("r-reborn"), &engine);
    let done = harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Complete)
        .await;
    assert_eq!(done.infra_attempts, 1, "the lost attempt is counted");
    let log = harness.log(&task.id).await;
    assert_eq!(
        log,
        "--- stevedore: attempt 2; the last one ended: runner r-reborn restarted while it \
         held the task ---\nagain\n"
    );
    runner.stop().await.unwrap();
}

/// The engine goes away (and answers again at once) as the runner starts to wait for the
/// task's container.
fn engine_goes_away_at_the_wait(engine: &FakeEngine) {
    engine.fail_next(
        FakeOperation::Wait,
        EngineError::Unreachable {
            message: "the engine restarted".into(),
        },
    );
}

#[tokio::test]
async fn a_container_that_ended_while_the_engine_was_away_completes_instead_of_running_again() {
    let harness = system_harness().await;
    let engine = engine_with("test/lost-sight", FakeRun::success().stdout("done once\n"));
    // The engine goes away just as the runner starts to wait; it answers again at once.
    engine_goes_away_at_the_wait(&engine);
    harness
        .push_image_code("lost-sight", "test/lost-sight", Some("true"), |_| {})
        .await;
    let task = harness.queue("lost-sight", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-lost-sight"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.infra_attempts, 0, "it ran once: {done:#?}");
    assert_eq!(engine.created().len(), 1, "one container, not a second run");
    // It had printed everything before: nothing is missing, nothing shipped twice.
    assert_eq!(harness.log(&task.id).await, "done once\n");
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn output_the_broken_attachment_missed_is_shipped_from_the_engines_copy() {
    let harness = system_harness().await;
    // The attachment breaks after the first line and the wait with it; the engine answers
    // again at once (as one restarted with live restore does), its container still running.
    let engine = engine_with(
        "test/resumed",
        FakeRun::success()
            .stdout("one\n")
            .stderr("two\n")
            .stdout("three\n")
            .running_for(Duration::from_millis(200))
            .attachment_breaks_after(1),
    );
    engine.set_clock(chrono::Utc::now());
    engine_goes_away_at_the_wait(&engine);
    harness
        .push_image_code("resumed", "test/resumed", Some("true"), |_| {})
        .await;
    let task = harness.queue("resumed", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-resumed"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.infra_attempts, 0, "{done:#?}");
    assert_eq!(engine.created().len(), 1);
    assert_eq!(harness.log(&task.id).await, "one\ntwo\nthree\n");
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn a_container_that_ended_while_the_engine_was_away_says_its_output_may_be_missing() {
    let harness = system_harness().await;
    let engine = engine_with(
        "test/ended-away",
        FakeRun::success()
            .stdout("printed\n")
            .running_for(Duration::from_millis(100)),
    );
    engine.set_clock(chrono::Utc::now());
    engine_goes_away_at_the_wait(&engine);
    // Still away when first asked again: back only after the container ended.
    engine.fail_next(
        FakeOperation::KeptOutput,
        EngineError::Unreachable {
            message: "the engine is restarting".into(),
        },
    );
    harness
        .push_image_code("ended-away", "test/ended-away", Some("true"), |_| {})
        .await;
    let task = harness.queue("ended-away", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-ended-away"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(engine.created().len(), 1);
    let log = harness.log(&task.id).await;
    assert!(log.starts_with("printed\n"), "{log:?}");
    assert!(
        log.contains("the container ended while the engine was away"),
        "{log:?}"
    );
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn a_container_the_engine_found_gone_when_it_came_back_is_run_again() {
    let harness = system_harness().await;
    // Docker records exit code 255 for a container whose process it found gone at its
    // restart; well after the runner lost sight of it, that is the engine's doing.
    let engine = engine_with(
        "test/found-gone",
        FakeRun::exits(255).running_for(Duration::from_millis(300)),
    );
    engine.set_clock(chrono::Utc::now());
    engine_goes_away_at_the_wait(&engine);
    harness
        .push_image_code("found-gone", "test/found-gone", Some("true"), |_| {})
        .await;
    let task = harness.queue("found-gone", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-found-gone"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.infra_attempts, 1, "{done:#?}");
    assert_eq!(engine.created().len(), 2, "{done:#?}");
    let log = harness.log(&task.id).await;
    assert!(
        log.contains("died with the engine (exit code 255)"),
        "{log:?}"
    );
    runner.stop().await.unwrap();
}

#[tokio::test]
async fn a_container_killed_with_the_engine_is_run_again() {
    let harness = system_harness().await;
    // Killed by the engine's going (exit 137, well after the runner lost sight of it) the first
    // time; the second run ends on its own.
    let engine = engine_with(
        "test/died-with",
        FakeRun::exits(137).running_for(Duration::from_millis(300)),
    );
    engine.set_clock(chrono::Utc::now());
    engine_goes_away_at_the_wait(&engine);
    harness
        .push_image_code("died-with", "test/died-with", Some("true"), |_| {})
        .await;
    let task = harness.queue("died-with", "", 60).await;
    let (runner, _) = start(&harness, test_config("r-died-with"), &engine);

    let done = harness.finished(&task.id, WITHIN).await;
    assert_eq!(
        done.infra_attempts, 1,
        "one retry for the engine: {done:#?}"
    );
    assert_eq!(engine.created().len(), 2, "{done:#?}");
    assert_eq!(
        (done.status, done.exit_code),
        (TaskStatus::Error, Some(137))
    );
    let log = harness.log(&task.id).await;
    assert!(log.contains("died with the engine"), "{log:?}");
    runner.stop().await.unwrap();
}
