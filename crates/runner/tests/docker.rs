//! The runner against the real Docker engine and a real SQLite store: no mocks.
//!
//! They skip, saying why, when the engine is not reachable and `CI` is not set; with `CI` set
//! a missing engine fails them (`scripts/ensure-docker.sh` starts one). Each test runs its own
//! runner id, checks after shutdown that no container of its runner or its tasks is left
//! (`docker ps -a --filter label=stevedore.task=<id>` is empty), and removes leftovers in a
//! guard should it panic. Local runs (`run_local`) are checked the same way by their task's
//! label and the runner id they report. The tests build their own tag of the local busybox image, so they
//! never race other tests that rebuild `stevedore/busybox:local`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/harness.rs"]
mod harness;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{Background, Harness, zip_of};
use stevedore_engine::{ContainerEngine, ContainerRuntime, DockerEngine, ImageStore};
use stevedore_model::{CodeKind, CodeSpec, StackTable, SystemClock, TaskStatus};
use stevedore_runner::{
    LABEL_RUNNER, LABEL_TASK, LocalResult, LocalRun, Runner, RunnerConfig, RunnerError, run_local,
};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// The image every test runs: the host's static busybox, imported under a tag of our own.
const TEST_IMAGE: &str = "stevedore/busybox:runner-tests";
const WITHIN: Duration = Duration::from_secs(60);

static IMAGE_BUILT: OnceCell<()> = OnceCell::const_new();

/// One test's world: the engine, a store, and the runner's id.
struct DockerTest {
    engine: Arc<DockerEngine>,
    harness: Harness,
    runner_id: String,
    _cleanup: Cleanup,
}

/// Removes every container carrying one label when dropped, even after a panic.
struct Cleanup {
    label: &'static str,
    value: String,
}

/// The test's world, or `None` (the test then skips) when the engine is unreachable
/// outside CI.
async fn docker_test(name: &str) -> Option<DockerTest> {
    let engine = harness::docker_engine(name, TEST_IMAGE, &IMAGE_BUILT).await?;
    let runner_id = format!("runner-test-{name}-{}", std::process::id());
    Some(DockerTest {
        engine: Arc::new(engine),
        harness: Harness::new(Arc::new(SystemClock)).await,
        _cleanup: Cleanup {
            label: LABEL_RUNNER,
            value: runner_id.clone(),
        },
        runner_id,
    })
}

macro_rules! docker_or_skip {
    ($name:expr) => {
        match docker_test($name).await {
            Some(test) => test,
            None => return,
        }
    };
}

// === impl DockerTest ===

impl DockerTest {
    fn config(&self) -> RunnerConfig {
        RunnerConfig {
            runner_id: self.runner_id.clone(),
            capacity: Some(4),
            memory_budget_mib: Some(2048),
            heartbeat_interval: Duration::from_millis(300),
            idle_poll_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(10),
            stacks: StackTable::default()
                .with_image("busybox", TEST_IMAGE)
                .and_then(|table| table.with_image("default", TEST_IMAGE))
                .unwrap(),
            ..RunnerConfig::default()
        }
    }

    fn start(&self, config: RunnerConfig) -> Background {
        let runner = Runner::new(config, self.harness.source(), self.engine.clone());
        Background::start(runner)
    }

    /// Pushes an image code running `command` in the test image.
    async fn shell_code(&self, name: &str, command: &str) {
        self.harness
            .push_image_code(name, TEST_IMAGE, Some(command), |_| {})
            .await;
    }

    /// Stops the runner and checks that none of its containers, nor any of `tasks`', is left.
    async fn stop_and_check_teardown(&self, runner: Background, tasks: &[&str]) {
        runner.stop().await.unwrap();
        let left = self
            .engine
            .list_labeled(LABEL_RUNNER, &self.runner_id)
            .await
            .unwrap();
        assert!(left.is_empty(), "containers left behind: {left:?}");
        for task in tasks {
            let left = self.engine.list_labeled(LABEL_TASK, task).await.unwrap();
            assert!(left.is_empty(), "task {task} left {left:?}");
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (label, value) = (self.label, self.value.clone());
        // Drop cannot await; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok(engine) = DockerEngine::connect().await else {
                    return;
                };
                if let Ok(ids) = engine.list_labeled(label, &value).await {
                    for id in ids {
                        let _ = engine.remove(&id).await;
                    }
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn a_runtime_task_sees_the_ironworker_contract() {
    let test = docker_or_skip!("contract");
    let script = r#"#!/bin/sh
echo "args=$*"
echo "TASK_ID=$TASK_ID"
echo "TASK_DIR=$TASK_DIR"
echo "PAYLOAD_FILE=$PAYLOAD_FILE"
echo "CONFIG_FILE=$CONFIG_FILE"
echo "GREETING=$GREETING"
echo "pwd=$(pwd)"
echo "payload=$(cat "$PAYLOAD_FILE")"
echo "config=$(cat "$CONFIG_FILE")"
echo "data=$(cat lib/data.txt)"
echo written > "$TASK_DIR/out.txt" && echo "wrote=$(cat out.txt)"
"#;
    let zip = zip_of(&[
        ("hello.sh", script, 0o755),
        ("lib/data.txt", "from the zip", 0o644),
    ]);
    test.harness
        .push_runtime_code("contract", "binary", "hello.sh", zip, |spec| {
            spec.env_vars
                .insert("GREETING".into(), "hello there".into());
            spec.config = Some("{\"db\":\"x\"}".into());
        })
        .await;
    let task = test.harness.queue("contract", "{\"n\":42}", 60).await;
    let runner = test.start(test.config());

    let done = test.harness.finished(&task.id, WITHIN).await;
    let log = test.harness.log(&task.id).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}\n{log}");
    let id = &task.id;
    for expected in [
        format!("args=-id {id} -d /mnt/task -payload /mnt/.task_payload -config /mnt/.task_config"),
        format!("TASK_ID={id}"),
        "TASK_DIR=/mnt/task".to_owned(),
        "PAYLOAD_FILE=/mnt/.task_payload".to_owned(),
        "CONFIG_FILE=/mnt/.task_config".to_owned(),
        "GREETING=hello there".to_owned(),
        "pwd=/mnt/task".to_owned(),
        "payload={\"n\":42}".to_owned(),
        "config={\"db\":\"x\"}".to_owned(),
        "data=from the zip".to_owned(),
        "wrote=written".to_owned(),
    ] {
        assert!(
            log.lines().any(|line| line == expected),
            "missing {expected:?} in\n{log}"
        );
    }
    // The times are the container's own (the engine may stamp a quick exit a hair before
    // its start, so only their distance from now is checked).
    let now = test.harness.clock.now();
    for at in [done.start_time.unwrap(), done.end_time.unwrap()] {
        assert!((now - at).num_seconds().abs() < 60, "{at} vs {now}");
    }
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

/// A task too short for a single sample of the engine's stats still reports what it used:
/// the engine's own account of the container is read once it stopped.
#[tokio::test]
async fn a_task_that_ends_at_once_reports_its_usage() {
    let test = docker_or_skip!("usage");
    test.shell_code("brief", "head -c 8388608 /dev/zero | wc -c")
        .await;
    let task = test.harness.queue("brief", "", 60).await;
    let runner = test.start(test.config());

    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(test.harness.log(&task.id).await.trim(), "8388608");
    assert!(
        done.peak_memory_bytes.is_some_and(|bytes| bytes > 0),
        "{done:#?}"
    );
    assert!(done.cpu_time_ms.is_some(), "{done:#?}");
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn the_payload_round_trips_byte_for_byte() {
    let test = docker_or_skip!("payload");
    test.shell_code("echo-payload", "cat \"$PAYLOAD_FILE\"")
        .await;
    let payload =
        r#"{"text":"quotes \" and 'single', unicode ✓ ü, $HOME not expanded","n":[1,2,3]}"#;
    let task = test.harness.queue("echo-payload", payload, 60).await;
    let runner = test.start(test.config());

    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(test.harness.log(&task.id).await, payload);
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn exit_codes_decide_complete_and_error() {
    let test = docker_or_skip!("exit-codes");
    test.shell_code("exit-0", "echo fine").await;
    test.shell_code("exit-7", "echo failing >&2; exit 7").await;
    let ok = test.harness.queue("exit-0", "", 60).await;
    let failed = test.harness.queue("exit-7", "", 60).await;
    let runner = test.start(test.config());

    let ok_done = test.harness.finished(&ok.id, WITHIN).await;
    assert_eq!(ok_done.status, TaskStatus::Complete);
    assert_eq!(ok_done.exit_code, Some(0));
    let failed_done = test.harness.finished(&failed.id, WITHIN).await;
    assert_eq!(failed_done.status, TaskStatus::Error);
    assert_eq!(failed_done.exit_code, Some(7));
    assert_eq!(failed_done.msg.as_deref(), Some("exited with code 7"));
    assert_eq!(test.harness.log(&failed.id).await, "failing\n");
    test.stop_and_check_teardown(runner, &[&ok.id, &failed.id])
        .await;
}

#[tokio::test]
async fn a_task_past_its_timeout_is_killed_and_ends_timeout() {
    let test = docker_or_skip!("timeout");
    test.shell_code("sleeper", "echo sleeping; sleep 60").await;
    let task = test.harness.queue("sleeper", "", 2).await;
    let runner = test.start(test.config());

    test.harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let running_since = tokio::time::Instant::now();
    let done = test.harness.finished(&task.id, WITHIN).await;
    let took = running_since.elapsed();
    assert_eq!(done.status, TaskStatus::Timeout, "{done:#?}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(test.harness.log(&task.id).await, "sleeping\n");
    let ran = done.end_time.unwrap() - done.start_time.unwrap();
    assert!(ran >= chrono::Duration::milliseconds(1900), "ran {ran}");
    // Two seconds of running give the engine's stats time for samples.
    assert!(
        done.peak_memory_bytes.is_some_and(|bytes| bytes > 0),
        "{done:#?}"
    );
    assert!(done.cpu_time_ms.is_some(), "{done:#?}");
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn cancelling_a_running_task_ends_it_within_about_a_second() {
    let test = docker_or_skip!("cancel");
    test.shell_code("long", "sleep 60").await;
    let task = test.harness.queue("long", "", 3600).await;
    let runner = test.start(test.config());

    test.harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let asked = tokio::time::Instant::now();
    test.harness
        .store
        .cancel_task(&test.harness.project_id, &task.id, test.harness.clock.now())
        .await
        .unwrap();
    let done = test.harness.finished(&task.id, WITHIN).await;
    let took = asked.elapsed();
    assert_eq!(done.status, TaskStatus::Cancelled);
    assert!(
        took < Duration::from_millis(1500),
        "cancelling took {took:?}"
    );
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn a_task_over_its_memory_limit_ends_error_out_of_memory() {
    let test = docker_or_skip!("oom");
    test.harness
        .push_image_code(
            "hungry",
            TEST_IMAGE,
            Some("x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}"),
            |spec| spec.limits.memory_mib = 16,
        )
        .await;
    let task = test.harness.queue("hungry", "", 60).await;
    let runner = test.start(test.config());

    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error, "{done:#?}");
    assert_eq!(done.msg.as_deref(), Some("out of memory (limit 16 MiB)"));
    assert!(!test.harness.log(&task.id).await.contains("survived"));
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn the_pids_limit_holds_a_fork_bomb_and_the_runner_stays_responsive() {
    let test = docker_or_skip!("fork-bomb");
    // PID 1 forks once, before the bomb grows, and then `exec`s: it never needs a fork the
    // bomb could starve it of (a pipeline forked by PID 1 itself could fail halfway).
    test.shell_code("bomb", "(bomb() { bomb | bomb & }; bomb) & exec sleep 60")
        .await;
    test.shell_code("bystander", "echo still here").await;
    let bomb = test.harness.queue("bomb", "", 5).await;
    let config = RunnerConfig {
        pids_limit: Some(64),
        ..test.config()
    };
    let runner = test.start(config);

    test.harness
        .wait_for(&bomb.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    // While the bomb runs, other tasks still run.
    let bystander = test.harness.queue("bystander", "", 60).await;
    let bystander_done = test
        .harness
        .finished(&bystander.id, Duration::from_secs(20))
        .await;
    assert_eq!(bystander_done.status, TaskStatus::Complete);
    assert_eq!(test.harness.log(&bystander.id).await, "still here\n");
    let bomb_done = test.harness.finished(&bomb.id, WITHIN).await;
    assert_eq!(bomb_done.status, TaskStatus::Timeout, "{bomb_done:#?}");
    test.stop_and_check_teardown(runner, &[&bomb.id, &bystander.id])
        .await;
}

#[tokio::test]
async fn logs_are_readable_while_the_task_still_runs() {
    let test = docker_or_skip!("live-logs");
    test.shell_code("chatty", "echo first; sleep 3; echo second")
        .await;
    let task = test.harness.queue("chatty", "", 60).await;
    let runner = test.start(test.config());

    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let log = test.harness.log(&task.id).await;
        let status = test.harness.task(&task.id).await.status;
        if log == "first\n" {
            assert_eq!(
                status,
                TaskStatus::Running,
                "the log arrived only at the end"
            );
            break;
        }
        assert!(
            !status.is_terminal(),
            "finished before its first line was readable: {log:?}"
        );
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete);
    assert_eq!(test.harness.log(&task.id).await, "first\nsecond\n");
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn the_log_cap_truncates_with_a_visible_marker() {
    let test = docker_or_skip!("log-cap");
    test.shell_code("flood", "yes 0123456789 | head -c 2000000; echo; echo done")
        .await;
    let task = test.harness.queue("flood", "", 60).await;
    let config = RunnerConfig {
        log_cap_bytes: 64 << 10,
        ..test.config()
    };
    let runner = test.start(config);

    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete);
    let log = test.harness.log(&task.id).await;
    let cap = 64 << 10;
    assert_eq!(log.len(), cap, "the cap holds the marker too");
    assert!(log.starts_with("0123456789\n0123456789\n"));
    assert!(
        log.ends_with(&format!("\n[stevedore: log truncated at {cap} bytes]\n")),
        "{:?}",
        &log[cap - 100..]
    );
    assert!(!log.contains("done"));
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

/// Regression (disks filled by the engine's own log of a task): a task printing as fast as it
/// can leaves the engine one bounded log file, and the stored log still holds the first 10 MiB
/// of its output, in order, and the marker.
#[tokio::test]
async fn a_flood_of_output_keeps_its_first_ten_mib_whole_and_the_marker() {
    let test = docker_or_skip!("flood-cap");
    // About 23 MB of short lines: far more than the cap, and a worst case for a log file
    // (the json-file driver made 200 MB of it on disk).
    let lines = 3_000_000u32;
    test.shell_code("flood", &format!("seq 1 {lines}")).await;
    let task = test.harness.queue("flood", "", 120).await;
    let runner = test.start(test.config());

    let running = test
        .harness
        .wait_for(&task.id, WITHIN, |task| {
            task.status != TaskStatus::Queued && task.status != TaskStatus::Preparing
        })
        .await;
    if running.status == TaskStatus::Running {
        let containers = test
            .engine
            .list_labeled(LABEL_TASK, &task.id)
            .await
            .unwrap();
        let root = std::process::Command::new("docker")
            .args(["info", "--format", "{{.DockerRootDir}}"])
            .output()
            .unwrap();
        let root = String::from_utf8_lossy(&root.stdout).trim().to_owned();
        for id in containers {
            let driver = docker_inspect(id.as_str(), "{{.HostConfig.LogConfig.Type}}");
            assert_eq!(
                driver.trim(),
                "local",
                "the engine's log is its bounded one"
            );
            // Sampled while the flood runs: one file, never much above its bound.
            let dir = std::path::Path::new(&root)
                .join("containers")
                .join(id.as_str())
                .join("local-logs");
            let mut largest = 0;
            for _ in 0..20 {
                let size: u64 = std::fs::read_dir(&dir)
                    .map(|entries| {
                        entries
                            .filter_map(|entry| entry.ok()?.metadata().ok())
                            .map(|meta| meta.len())
                            .sum()
                    })
                    .unwrap_or(0);
                largest = largest.max(size);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                largest <= stevedore_engine::KEPT_OUTPUT_BYTES + (1 << 20),
                "the engine's log grew to {largest} bytes"
            );
        }
    }
    let done = test
        .harness
        .finished(&task.id, Duration::from_secs(120))
        .await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    let log = test.harness.log(&task.id).await;
    let cap = 10 << 20;
    let marker = format!("\n[stevedore: log truncated at {cap} bytes]\n");
    assert_eq!(log.len(), cap, "the cap holds the marker too");
    assert!(log.ends_with(&marker), "{:?}", &log[cap - 100..]);
    let expected: String = (1..=lines).map(|n| format!("{n}\n")).collect();
    let kept = cap - marker.len();
    assert!(
        log.as_bytes()[..kept] == expected.as_bytes()[..kept],
        "the stored log is not the first {kept} bytes of the output"
    );
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

/// A code without `cpus` runs under the runner's default CPU limit, and with a reserve its
/// container sits in the runner's CPU group, capped at the cores less the reserve.
#[tokio::test]
async fn a_task_gets_the_default_cpu_limit_and_the_reserve_caps_all_tasks() {
    let test = docker_or_skip!("cpu-limits");
    test.shell_code("busy", "sleep 30").await;
    let task = test.harness.queue("busy", "", 60).await;
    let config = RunnerConfig {
        reserve_cpus: 0.5,
        ..test.config()
    };
    let group = format!("stevedore-{}", test.runner_id);
    let runner = test.start(config);
    test.harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    let containers = test
        .engine
        .list_labeled(LABEL_TASK, &task.id)
        .await
        .unwrap();
    assert_eq!(containers.len(), 1);
    let inspected = docker_inspect(
        containers[0].as_str(),
        "{{.HostConfig.NanoCpus}} {{.HostConfig.CgroupParent}}",
    );
    // Its parent is its usage group, inside the CPU group.
    let (nano_cpus, parent) = inspected.trim().split_once(' ').unwrap();
    assert_eq!(nano_cpus, "1000000000");
    assert!(parent.starts_with(&format!("/{group}/usage-")), "{parent}");

    let ncpu: f64 = test.engine.capabilities().await.unwrap().ncpu as f64;
    let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/{group}/cpu.cfs_quota_us"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{group}/cpu.max")))
        .unwrap();
    let quota: u64 = quota.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(quota, ((ncpu - 0.5) * 100_000.0).round() as u64);
    // The container's own cgroup is inside the group.
    let id = docker_inspect(containers[0].as_str(), "{{.Id}}");
    assert!(
        std::path::Path::new(&format!("/sys/fs/cgroup/cpu{parent}/{}", id.trim())).exists()
            || std::path::Path::new(&format!("/sys/fs/cgroup{parent}/{}", id.trim())).exists()
    );

    test.harness
        .store
        .cancel_task(&test.harness.project_id, &task.id, test.harness.clock.now())
        .await
        .unwrap();
    test.harness.finished(&task.id, WITHIN).await;
    test.stop_and_check_teardown(runner, &[&task.id]).await;
    // The runner removed its group on the way out: the host is as it was.
    assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/cpu/{group}")).exists());
    assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/memory/{group}")).exists());
    assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/{group}")).exists());
}

/// Debian's `docker-registry` on a loopback port, without auth, serving a temporary
/// directory; the engine pulls from 127.0.0.0/8 over plain HTTP. Killed when dropped.
struct LocalRegistry {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// `None` (the test skips) when `docker-registry` is not installed and `CI` is not set
    /// (`scripts/ensure-registry.sh` installs it).
    fn start() -> Option<LocalRegistry> {
        let Ok(binary) = which("docker-registry") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "docker-registry is missing"
            );
            eprintln!("skipped: docker-registry is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {address}\n",
            dir.path().join("data").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = std::process::Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let registry = LocalRegistry {
            child,
            address,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.address).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(registry)
    }

    /// Pushes an image of one layer of `bytes` random bytes (so no layer of it is on this
    /// machine already) as `<registry>/hygiene/<name>` and removes it here, so a task has to
    /// pull it whole; returns the repository path and tag after the registry address.
    fn push_random_image(&self, name: &str, bytes: usize) -> String {
        let path = format!("hygiene/{name}:{}", std::process::id());
        let image = format!("{}/{path}", self.address);
        let dir = tempfile::tempdir().unwrap();
        let noise: Vec<u8> = {
            let mut state = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(std::process::id());
            (0..bytes)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        };
        std::fs::write(dir.path().join("noise"), noise).unwrap();
        let tar = dir.path().join("layer.tar");
        let packed = std::process::Command::new("tar")
            .args([
                "-cf",
                tar.to_str().unwrap(),
                "-C",
                dir.path().to_str().unwrap(),
                "noise",
            ])
            .status()
            .unwrap();
        assert!(packed.success());
        docker(&["import", tar.to_str().unwrap(), &image]);
        docker(&["push", &image]);
        docker(&["rmi", &image]);
        path
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to `upstream` that passes its answers on at about `bytes_per_second`: a slow
/// registry. Runs until the test's runtime ends.
async fn slow_proxy(upstream: String, bytes_per_second: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            tokio::spawn(async move {
                let mut buffer = vec![0u8; bytes_per_second / 10];
                loop {
                    let Ok(read) = server_read.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 || client_write.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    address
}

fn docker(args: &[&str]) {
    let output = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "docker {args:?}: {output:?}");
}

fn which(binary: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(binary))
                .find(|path| path.is_file())
        })
        .ok_or(())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pull from a registry too slow to finish within the deadline ends the attempt in about
/// the deadline, as the infrastructure's failure, with the reason in the task's message; the
/// pull is stopped, not left running for nobody.
#[tokio::test]
async fn a_pull_past_its_deadline_gives_the_slot_back_as_an_infrastructure_failure() {
    let test = docker_or_skip!("pull-deadline");
    let Some(registry) = LocalRegistry::start() else {
        return;
    };
    let path = registry.push_random_image("slow", 1_000_000);
    // About 20 KB/s: the image (1 MB) would take most of a minute.
    let proxy = slow_proxy(registry.address.clone(), 20_000).await;
    let image = format!("{proxy}/{path}");
    test.harness
        .push_image_code("slow-pull", &image, Some("true"), |_| {})
        .await;
    let task = test.harness.queue("slow-pull", "", 60).await;
    let config = RunnerConfig {
        pull_timeout: Duration::from_secs(2),
        max_infra_attempts: 1,
        ..test.config()
    };
    let began = std::time::Instant::now();
    let runner = test.start(config);
    let done = test.harness.finished(&task.id, WITHIN).await;
    let took = began.elapsed();
    assert_eq!(done.status, TaskStatus::Error, "{done:#?}");
    assert_eq!(done.infra_attempts, 1);
    let msg = done.msg.clone().unwrap_or_default();
    assert!(
        msg.contains("pull_timeout_secs") && msg.contains(&image),
        "{msg}"
    );
    assert!(took < Duration::from_secs(15), "the deadline took {took:?}");
    test.stop_and_check_teardown(runner, &[&task.id]).await;
    assert!(!test.engine.image_present(&image).await.unwrap());
}

/// An image larger than the runner's limit ends its task `error` (the user chose it), saying
/// so, and runs nothing.
#[tokio::test]
async fn an_image_over_the_size_limit_ends_error_with_the_sizes() {
    let test = docker_or_skip!("pull-size");
    let Some(registry) = LocalRegistry::start() else {
        return;
    };
    let path = registry.push_random_image("big", 1_000_000);
    let image = format!("{}/{path}", registry.address);
    test.harness
        .push_image_code("big-image", &image, Some("true"), |_| {})
        .await;
    let task = test.harness.queue("big-image", "", 60).await;
    let config = RunnerConfig {
        max_image_bytes: Some(100_000),
        ..test.config()
    };
    let runner = test.start(config);
    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Error, "{done:#?}");
    assert_eq!(done.infra_attempts, 0);
    let msg = done.msg.clone().unwrap_or_default();
    eprintln!("an image over the limit: {msg}");
    assert!(
        msg.contains("max_image_bytes") && msg.contains(&image),
        "{msg}"
    );
    test.stop_and_check_teardown(runner, &[&task.id]).await;
    let _ = std::process::Command::new("docker")
        .args(["rmi", &image])
        .output();
}

/// Builds `image` from the test image with a layer of `bytes` random bytes of its own, so
/// it takes disk of its own.
fn build_image_with_noise(image: &str, bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ image.len() as u64 ^ u64::from(std::process::id());
    let noise: Vec<u8> = image
        .bytes()
        .chain((0..bytes).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        }))
        .collect();
    std::fs::write(dir.path().join("noise"), noise).unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {TEST_IMAGE}\nCOPY noise /noise\n"),
    )
    .unwrap();
    docker(&["build", "-q", "-t", image, dir.path().to_str().unwrap()]);
}

/// Over the disk budget, the janitor removes the images the runner's tasks used and no task
/// uses now; the image of a running task stays, and so do the stack images and images the
/// runner never used.
#[tokio::test]
async fn images_over_the_disk_budget_go_least_recently_used_first_never_one_in_use() {
    let test = docker_or_skip!("image-gc");
    let repository = format!("stevedore/hygiene-gc-{}", std::process::id());
    let images: Vec<String> = ["a", "b", "c", "busy", "foreign"]
        .iter()
        .map(|tag| format!("{repository}:{tag}"))
        .collect();
    for image in &images {
        build_image_with_noise(image, 1 << 20);
    }
    let _remove = RemoveImagesOnDrop(images.clone());
    for (code, image) in ["a", "b", "c"].iter().zip(&images) {
        test.harness
            .push_image_code(code, image, Some("true"), |_| {})
            .await;
    }
    test.harness
        .push_image_code("busy", &images[3], Some("sleep 30"), |_| {})
        .await;
    let config = RunnerConfig {
        // Far below what the engine holds: everything that may go, goes.
        image_disk_budget_mib: Some(1),
        image_janitor_interval: Duration::from_millis(300),
        ..test.config()
    };
    let runner = test.start(config);
    let busy = test.harness.queue("busy", "", 60).await;
    test.harness
        .wait_for(&busy.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    for code in ["a", "b", "c"] {
        let task = test.harness.queue(code, "", 60).await;
        let done = test.harness.finished(&task.id, WITHIN).await;
        assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut gone = true;
        for image in &images[..3] {
            gone &= !test.engine.image_present(image).await.unwrap();
        }
        if gone {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the used images were not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        test.engine.image_present(&images[3]).await.unwrap(),
        "the busy task's image went"
    );
    assert!(
        test.engine.image_present(&images[4]).await.unwrap(),
        "a foreign image went"
    );
    assert!(
        test.engine.image_present(TEST_IMAGE).await.unwrap(),
        "the stack image went"
    );
    test.harness
        .store
        .cancel_task(&test.harness.project_id, &busy.id, test.harness.clock.now())
        .await
        .unwrap();
    test.harness.finished(&busy.id, WITHIN).await;
    test.stop_and_check_teardown(runner, &[&busy.id]).await;
}

/// Removes the images a test made, also when it fails.
struct RemoveImagesOnDrop(Vec<String>);

impl Drop for RemoveImagesOnDrop {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = std::process::Command::new("docker")
                .args(["rmi", image])
                .output();
        }
    }
}

/// A field of `docker inspect`, through the docker CLI, as an operator would look.
fn docker_inspect(id: &str, format: &str) -> String {
    let output = std::process::Command::new("docker")
        .args(["inspect", "--format", format, id])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn an_image_code_without_a_command_runs_the_images_own_cmd() {
    let test = docker_or_skip!("image-cmd");
    // The test image's CMD is `sh`, which reads an empty stdin and exits 0.
    test.harness
        .push_image_code("own-cmd", TEST_IMAGE, None, |_| {})
        .await;
    let task = test.harness.queue("own-cmd", "", 60).await;
    let runner = test.start(test.config());
    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn an_entry_point_that_cannot_execute_ends_error_without_a_requeue() {
    let test = docker_or_skip!("not-executable");
    let zip = zip_of(&[("readme.txt", "no script here", 0o644)]);
    test.harness
        .push_runtime_code("broken", "binary", "readme.txt", zip, |_| {})
        .await;
    let task = test.harness.queue("broken", "", 60).await;
    let runner = test.start(test.config());
    let done = test.harness.finished(&task.id, WITHIN).await;
    // A text file made executable fails to exec: either the engine refuses the start (the
    // user's error) or the process exits non-zero; never an infrastructure retry.
    eprintln!(
        "a text file as the entry point: {:?} {:?}",
        done.exit_code, done.msg
    );
    assert_eq!(done.status, TaskStatus::Error, "{done:#?}");
    assert_eq!(done.infra_attempts, 0);
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

#[tokio::test]
async fn quick_exits_never_lose_their_output() {
    // Regression: Docker 20.10's followed logs of a container that exits right after its
    // start sometimes ended empty; the runner now attaches to the output before the start.
    let test = docker_or_skip!("quick-output");
    test.shell_code("quick", "echo \"out $TASK_ID\"; echo \"err $TASK_ID\" >&2")
        .await;
    let mut tasks = Vec::new();
    for _ in 0..24 {
        tasks.push(test.harness.queue("quick", "", 60).await.id);
    }
    let runner = test.start(test.config());
    for id in &tasks {
        let done = test.harness.finished(id, WITHIN).await;
        assert_eq!(done.status, TaskStatus::Complete);
        let log = test.harness.log(id).await;
        assert!(
            log.contains(&format!("out {id}\n")) && log.contains(&format!("err {id}\n")),
            "task {id} logged {log:?}"
        );
        assert_eq!(log.len(), 2 * (id.len() + 5), "{log:?}");
    }
    let ids: Vec<&str> = tasks.iter().map(String::as_str).collect();
    test.stop_and_check_teardown(runner, &ids).await;
}

#[tokio::test]
async fn progress_lines_from_a_real_container_reach_the_source() {
    let test = docker_or_skip!("progress");
    // `network: none` (the harness's default): progress needs nothing but stdout.
    let script = r#"
echo '::stevedore-progress::10 starting'
printf '::stevedore-progress::2'; sleep 0.4; printf '5 split across writes\n'
sleep 0.6
i=0
while [ $i -lt 3000 ]; do echo "::stevedore-progress::$((i % 100)) item $i"; i=$((i+1)); done
echo '::stevedore-progress::100'
# stdout and stderr reach the runner on separate pipes: give stdout time to drain first.
sleep 0.5
echo '::stevedore-progress:: all done' >&2
"#;
    test.shell_code("progress", script).await;
    let task = test.harness.queue("progress", "", 60).await;
    let source = test.harness.source();
    let runner = Background::start(Runner::new(
        test.config(),
        source.clone(),
        test.engine.clone(),
    ));

    let done = test.harness.finished(&task.id, WITHIN).await;
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.percent, Some(100));
    assert_eq!(done.msg.as_deref(), Some("all done"));
    let calls = source.progress_of(&task.id);
    assert_eq!(
        calls.first(),
        Some(&(Some(10), Some("starting".to_owned()))),
        "{calls:?}"
    );
    assert!(
        calls.contains(&(Some(25), Some("split across writes".to_owned()))),
        "{calls:?}"
    );
    assert!(
        calls.len() <= 20,
        "3000 lines were not coalesced: {} calls",
        calls.len()
    );
    let log = test.harness.log(&task.id).await;
    assert!(log.contains("::stevedore-progress::25 split across writes\n"));
    assert!(log.contains("::stevedore-progress::99 item 2999\n"));
    test.stop_and_check_teardown(runner, &[&task.id]).await;
}

// === local runs (`stevedore run`) ===

/// A local run in progress: its task id, what its callback got so far, and the guard that
/// removes its container should the test panic.
struct LocalRunning {
    task_id: String,
    printed: Arc<Mutex<Vec<u8>>>,
    handle: tokio::task::JoinHandle<Result<LocalResult, RunnerError>>,
    _cleanup: Cleanup,
}

impl DockerTest {
    /// Starts `run` locally in the background.
    fn run_local(&self, run: LocalRun, cancel: CancellationToken) -> LocalRunning {
        let task_id = run.task.id.clone();
        let (on_log, printed) = harness::collecting_sink();
        let engine: Arc<dyn ContainerEngine> = self.engine.clone();
        let config = self.config();
        let handle = tokio::spawn(run_local(
            engine,
            config,
            run,
            Arc::new(SystemClock),
            on_log,
            cancel,
        ));
        LocalRunning {
            _cleanup: Cleanup {
                label: LABEL_TASK,
                value: task_id.clone(),
            },
            task_id,
            printed,
            handle,
        }
    }
}

impl LocalRunning {
    fn printed(&self) -> String {
        String::from_utf8_lossy(&self.printed.lock().unwrap()).into_owned()
    }

    /// Waits until the callback got `text`.
    async fn wait_for_output(&self, text: &str) {
        let deadline = tokio::time::Instant::now() + WITHIN;
        while !self.printed().contains(text) {
            assert!(
                !self.handle.is_finished(),
                "the run ended before printing {text:?}: {:?}",
                self.printed()
            );
            assert!(tokio::time::Instant::now() < deadline, "no {text:?} yet");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the run's end and checks that it left no container behind.
    async fn finish(self, engine: &DockerEngine) -> Result<LocalResult, RunnerError> {
        let result = tokio::time::timeout(WITHIN, self.handle)
            .await
            .expect("the local run did not end")
            .unwrap();
        let left = engine
            .list_labeled(LABEL_TASK, &self.task_id)
            .await
            .unwrap();
        assert!(left.is_empty(), "the local run left {left:?}");
        if let Ok(result) = &result {
            assert!(result.runner_id.starts_with("local-"));
            let left = engine
                .list_labeled(LABEL_RUNNER, &result.runner_id)
                .await
                .unwrap();
            assert!(left.is_empty(), "the local runner left {left:?}");
        }
        result
    }
}

fn local_spec(name: &str, kind: CodeKind) -> CodeSpec {
    harness::code_spec(name, kind)
}

fn local_shell(name: &str, command: &str, adjust: impl FnOnce(&mut CodeSpec)) -> LocalRun {
    let mut spec = local_spec(
        name,
        CodeKind::Image {
            image: TEST_IMAGE.to_owned(),
            command: Some(command.to_owned()),
        },
    );
    adjust(&mut spec);
    LocalRun::new(spec, String::new(), None, chrono::Utc::now()).unwrap()
}

#[tokio::test]
async fn a_local_run_sees_the_contract_and_streams_its_log_live() {
    let test = docker_or_skip!("local-contract");
    let script = r#"#!/bin/sh
echo "args=$*"
echo "TASK_ID=$TASK_ID"
echo "TASK_DIR=$TASK_DIR"
echo "PAYLOAD_FILE=$PAYLOAD_FILE"
echo "CONFIG_FILE=$CONFIG_FILE"
echo "GREETING=$GREETING"
echo "pwd=$(pwd)"
echo "payload=$(cat "$PAYLOAD_FILE")"
echo "config=$(cat "$CONFIG_FILE")"
echo "data=$(cat lib/data.txt)"
echo '::stevedore-progress::50 halfway'
sleep 2
echo second
"#;
    let zip = zip_of(&[
        ("hello.sh", script, 0o644),
        ("lib/data.txt", "from the zip", 0o644),
    ]);
    let mut spec = local_spec(
        "local-contract",
        CodeKind::Runtime {
            runtime: "sh".into(),
            file_name: "hello.sh".into(),
            stack: None,
        },
    );
    spec.env_vars
        .insert("GREETING".into(), "hello there".into());
    spec.config = Some("{\"db\":\"x\"}".into());
    let run = LocalRun::new(spec, "{\"n\":42}".into(), Some(zip), chrono::Utc::now()).unwrap();
    let running = test.run_local(run, CancellationToken::new());
    let id = running.task_id.clone();

    // Live: the first lines arrive while the task still sleeps.
    running.wait_for_output("data=from the zip\n").await;
    assert!(!running.printed().contains("second"));
    let printed = running.printed.clone();
    let result = running.finish(&test.engine).await.unwrap();
    let log = String::from_utf8(result.log.clone()).unwrap();
    assert_eq!(result.status, TaskStatus::Complete, "{result:#?}\n{log}");
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(
        (result.percent, result.msg.as_deref()),
        (Some(50), Some("halfway"))
    );
    for expected in [
        format!("args=-id {id} -d /mnt/task -payload /mnt/.task_payload -config /mnt/.task_config"),
        format!("TASK_ID={id}"),
        "TASK_DIR=/mnt/task".to_owned(),
        "PAYLOAD_FILE=/mnt/.task_payload".to_owned(),
        "CONFIG_FILE=/mnt/.task_config".to_owned(),
        "GREETING=hello there".to_owned(),
        "pwd=/mnt/task".to_owned(),
        "payload={\"n\":42}".to_owned(),
        "config={\"db\":\"x\"}".to_owned(),
        "data=from the zip".to_owned(),
        "second".to_owned(),
    ] {
        assert!(
            log.lines().any(|line| line == expected),
            "missing {expected:?} in\n{log}"
        );
    }
    assert_eq!(*printed.lock().unwrap(), result.log);
    let ran = result.end_time.unwrap() - result.start_time.unwrap();
    assert!(ran >= chrono::Duration::milliseconds(1900), "ran {ran}");
    assert!(result.peak_memory_bytes.is_some_and(|bytes| bytes > 0));
}

#[tokio::test]
async fn a_local_binary_run_ends_with_its_exit_code() {
    let test = docker_or_skip!("local-exit");
    let zip = zip_of(&[(
        "bin/run",
        "#!/bin/sh\necho \"failing on purpose\" >&2\nexit 7\n",
        0o644,
    )]);
    let spec = local_spec(
        "local-exit",
        CodeKind::Runtime {
            runtime: "binary".into(),
            file_name: "bin/run".into(),
            stack: None,
        },
    );
    let run = LocalRun::new(spec, String::new(), Some(zip), chrono::Utc::now()).unwrap();
    let result = test
        .run_local(run, CancellationToken::new())
        .finish(&test.engine)
        .await
        .unwrap();
    assert_eq!(result.status, TaskStatus::Error, "{result:#?}");
    assert_eq!(result.exit_code, Some(7));
    assert_eq!(result.msg.as_deref(), Some("exited with code 7"));
    assert_eq!(result.log, b"failing on purpose\n");
}

#[tokio::test]
async fn a_local_run_over_its_memory_limit_ends_out_of_memory() {
    let test = docker_or_skip!("local-oom");
    let run = local_shell(
        "local-oom",
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}",
        |spec| spec.limits.memory_mib = 16,
    );
    let result = test
        .run_local(run, CancellationToken::new())
        .finish(&test.engine)
        .await
        .unwrap();
    assert_eq!(result.status, TaskStatus::Error, "{result:#?}");
    assert_eq!(result.msg.as_deref(), Some("out of memory (limit 16 MiB)"));
    assert_eq!(result.exit_code, Some(137));
    assert!(!String::from_utf8_lossy(&result.log).contains("survived"));
}

#[tokio::test]
async fn cancelling_a_local_run_kills_its_container_at_once() {
    let test = docker_or_skip!("local-cancel");
    let run = local_shell("local-cancel", "echo started; sleep 60", |_| {});
    let cancel = CancellationToken::new();
    let running = test.run_local(run, cancel.clone());
    running.wait_for_output("started\n").await;
    let asked = tokio::time::Instant::now();
    cancel.cancel();
    let result = running.finish(&test.engine).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(result.status, TaskStatus::Cancelled, "{result:#?}");
    assert_eq!(result.log, b"started\n");
    // Killed, reported and removed: all within a couple of seconds.
    assert!(took < Duration::from_secs(3), "cancelling took {took:?}");
}

#[tokio::test]
async fn a_local_run_of_a_missing_image_is_an_error_naming_it() {
    let test = docker_or_skip!("local-missing-image");
    let mut spec = local_spec(
        "local-missing",
        CodeKind::Image {
            image: "stevedore/no-such-image:runner-tests".into(),
            command: Some("true".into()),
        },
    );
    spec.retries = 3;
    let run = LocalRun::new(spec, String::new(), None, chrono::Utc::now()).unwrap();
    let error = test
        .run_local(run, CancellationToken::new())
        .finish(&test.engine)
        .await
        .unwrap_err();
    // Without a registry the pull fails (the infrastructure's); with one, the registry says
    // the image does not exist (the user's). Either way: one clear error, no retry loop.
    assert!(matches!(error, RunnerError::TaskNotRun { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("stevedore/no-such-image:runner-tests"),
        "{message}"
    );
}

// === an engine restarted under running tasks ===

/// A Docker engine of the test's own beside the shared one, on its own socket, state, bridge
/// and `live-restore`: killing and restarting it touches no other test.
struct PrivateDockerd {
    dir: tempfile::TempDir,
    exec_root: std::path::PathBuf,
    bridge: String,
    child: Option<std::process::Child>,
}

impl PrivateDockerd {
    /// Started and answering, or `None` (the test skips) without root or dockerd outside CI.
    fn start() -> Option<PrivateDockerd> {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
        if !root || which("dockerd").is_err() {
            assert!(
                !harness::ci_requires_docker(),
                "CI needs root and dockerd for a private engine"
            );
            eprintln!("skipped: a private dockerd needs root and dockerd");
            return None;
        }
        let id = std::process::id();
        let dockerd = PrivateDockerd {
            dir: tempfile::tempdir().unwrap(),
            // Short: containerd's socket lives below it, and socket paths are short.
            exec_root: std::path::PathBuf::from(format!("/tmp/stv-lr-{id}")),
            // Its own bridge: with `--bridge none` dockerd would delete the shared docker0.
            bridge: format!("stvlr{}", id % 100_000),
            child: None,
        };
        let subnet = format!("10.219.{}.1/24", id % 250);
        for args in [
            vec!["link", "add", &dockerd.bridge, "type", "bridge"],
            vec!["addr", "add", &subnet, "dev", &dockerd.bridge],
            vec!["link", "set", &dockerd.bridge, "up"],
        ] {
            let status = std::process::Command::new("ip")
                .args(&args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        }
        let mut dockerd = dockerd;
        dockerd.launch();
        Some(dockerd)
    }

    /// The bridge of the task network the runner makes on this engine.
    fn task_bridge(&self) -> String {
        format!("stvlrt{}", std::process::id() % 100_000)
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// Starts dockerd and waits until it answers.
    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("dockerd.log"))
            .unwrap();
        let child = std::process::Command::new("dockerd")
            .arg("--host")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--data-root")
            .arg(self.dir.path().join("data"))
            .arg("--exec-root")
            .arg(&self.exec_root)
            .arg("--pidfile")
            .arg(self.dir.path().join("docker.pid"))
            .args([
                "--bridge",
                &self.bridge,
                "--iptables=false",
                "--ip-masq=false",
            ])
            .arg("--live-restore")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let answered = std::process::Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", self.socket().display()))
                .arg("version")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if answered {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the private dockerd did not answer: {}",
                std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, as a crash or an OOM kill does; the containers live on (live restore).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let _ = std::fs::remove_file(self.dir.path().join("docker.pid"));
        // Its containerd dies with it (the shims, and so the containers, live on). Without an
        // init that reaps it, it lingers as a zombie whose pid file would make the next
        // dockerd wait for it in vain.
        let _ = std::fs::remove_file(self.exec_root.join("containerd/containerd.pid"));
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        // Its containerd and whatever it mounted go with its directories.
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &self.exec_root.display().to_string()])
            .status();
        for dir in [self.exec_root.clone(), self.dir.path().join("data")] {
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "grep -o ' {0}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                    dir.display()
                ))
                .status();
            let _ = std::fs::remove_dir_all(&dir);
        }
        // Its own bridge, and the task network's that it made.
        for bridge in [self.bridge.clone(), self.task_bridge()] {
            let _ = std::process::Command::new("ip")
                .args(["link", "delete", &bridge])
                .status();
        }
        // The host firewall's chains that isolated the task network, and the jumps to them.
        let bridge = self.task_bridge();
        let (input, forward) = (
            format!("STEVEDORE-IN-{bridge}"),
            format!("STEVEDORE-FWD-{bridge}"),
        );
        for tool in ["iptables", "ip6tables"] {
            let iptables = |args: &[&str]| {
                std::process::Command::new(tool)
                    .args(["-w", "10"])
                    .args(args)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            };
            for from in ["INPUT", "FORWARD", "DOCKER-USER"] {
                let to = if from == "INPUT" { &input } else { &forward };
                while iptables(&["-D", from, "-i", &bridge, "-j", to]) {}
            }
            for chain in [&input, &forward] {
                iptables(&["-F", chain]);
                iptables(&["-X", chain]);
            }
        }
    }
}

/// With dockerd's `live-restore`, a task running while the engine is killed and started again
/// carries on, and everything it printed reaches its log once, in order: what the attachment
/// delivered before the kill, then the engine's kept copy past it (what the task printed while
/// the engine was down waited in its pipe).
#[tokio::test]
async fn a_task_runs_on_through_an_engine_restart_with_its_whole_output() {
    let Some(mut dockerd) = PrivateDockerd::start() else {
        return;
    };
    let engine = DockerEngine::connect_unix(&dockerd.socket()).await.unwrap();
    stevedore_engine::build_local_busybox_image(
        &engine,
        std::path::Path::new(stevedore_engine::HOST_BUSYBOX),
        TEST_IMAGE,
    )
    .await
    .unwrap();
    let engine = Arc::new(engine);
    let harness = Harness::new(Arc::new(SystemClock)).await;
    harness
        .push_image_code(
            "steady",
            TEST_IMAGE,
            Some("for i in $(seq 1 40); do echo line $i; sleep 0.1; done"),
            |_| {},
        )
        .await;
    let task = harness.queue("steady", "", 120).await;
    let mut network = stevedore_runner::TaskNetworkConfig::default();
    network.spec.name = format!("stevedore-lr-{}", std::process::id());
    network.spec.bridge = dockerd.task_bridge();
    network.unguarded = true;
    let config = RunnerConfig {
        runner_id: format!("runner-test-live-restore-{}", std::process::id()),
        capacity: Some(2),
        memory_budget_mib: Some(1024),
        heartbeat_interval: Duration::from_millis(300),
        idle_poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(10),
        stacks: StackTable::default()
            .with_image("busybox", TEST_IMAGE)
            .unwrap(),
        network,
        reserve_cpus: 0.0,
        ..RunnerConfig::default()
    };
    let runner = Background::start(Runner::new(config, harness.source(), engine.clone()));
    harness
        .wait_for(&task.id, WITHIN, |task| task.status == TaskStatus::Running)
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    dockerd.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    dockerd.launch();

    let done = harness.finished(&task.id, WITHIN).await;
    runner.stop().await.unwrap();
    assert_eq!(done.status, TaskStatus::Complete, "{done:#?}");
    assert_eq!(done.infra_attempts, 0, "it ran once: {done:#?}");
    let log = harness.log(&task.id).await;
    let expected: String = (1..=40).map(|n| format!("line {n}\n")).collect();
    assert_eq!(log, expected);
}
