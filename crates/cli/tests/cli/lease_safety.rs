//! No task runs twice at once: a remote runner killed with SIGKILL leaves its container to
//! the watchdog beside it, which stops it before the lease ends, so the task rescued and run
//! by another runner never has two containers running.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    Api, RunnerProcess, ServerProcess, docker_available, ensure_local_image, runner_token, unique,
};

/// The task's containers running now.
fn running_containers(task_id: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args([
            "ps",
            "-q",
            "--filter",
            &format!("label=stevedore.task={task_id}"),
            "--filter",
            "status=running",
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_killed_runners_container_stops_before_the_task_runs_again() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path());
    let token = runner_token(data.path());
    let api = Api::new(&server);
    api.post(
        "codes",
        json!({"name": "long", "image": "stevedore/busybox:local",
               "command": "echo started; sleep 25; echo finished"}),
    )
    .await;
    let lease_secs = 6;
    let first_id = unique("doomed");
    let mut first =
        RunnerProcess::start_with_lease(&server, &token, &first_id, &["default"], lease_secs);
    let ids = api.queue(json!([{"code_name": "long"}])).await;
    let task_id = ids[0].clone();
    api.wait_for(&task_id, Duration::from_secs(60), |task| {
        task["status"] == "running"
    })
    .await;
    let doomed = running_containers(&task_id);
    assert_eq!(doomed.len(), 1);

    first.kill_hard();
    let killed = Instant::now();
    let second_id = unique("heir");
    let mut second =
        RunnerProcess::start_with_lease(&server, &token, &second_id, &["default"], lease_secs);

    // Sampled until the task ran again and ended: never two containers at once; the killed
    // runner's stops within its lease.
    let mut most = 0;
    let mut doomed_stopped = None;
    let mut ran_again = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = running_containers(&task_id);
        most = most.max(running.len());
        if doomed_stopped.is_none() && !running.contains(&doomed[0]) {
            doomed_stopped = Some(killed.elapsed());
        }
        ran_again |= running.iter().any(|id| !doomed.contains(id));
        let task = api.get(&format!("tasks/{task_id}")).await;
        if task["status"] == "complete" {
            assert_eq!(task["infra_attempts"], 1, "{task}");
            break;
        }
        assert!(Instant::now() < deadline, "the task never ended: {task}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ran_again, "the task ran again on the second runner");
    assert_eq!(most, 1, "two containers of one task ran at once");
    let stopped = doomed_stopped.expect("the killed runner's container stopped");
    assert!(
        stopped <= Duration::from_secs(u64::from(lease_secs)),
        "the killed runner's container outlived its lease: {stopped:?}"
    );
    eprintln!("the killed runner's container stopped {stopped:?} after the kill");

    assert!(second.terminate().success());
    assert!(server.terminate().success());
    let left = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=stevedore.task={task_id}"),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "containers left behind"
    );
}
