//! Runner identity: every runner has an id of its own by default, kept in its data directory
//! across restarts. Two servers on one Docker engine leave each other's containers alone, and
//! a server killed with SIGKILL gives back the tasks it held as soon as it starts again,
//! without waiting for their leases to expire.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    Api, ServerProcess, containers_labelled, docker_available, ensure_local_image,
};

fn runner_id(data: &std::path::Path) -> String {
    std::fs::read_to_string(data.join("runner-id"))
        .expect("the server keeps its runner id in its data directory")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn two_servers_on_one_engine_never_touch_each_others_tasks() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let (first_data, second_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let env = [("STEVEDORE_RUNNER__LEASE_SECS", "5")];
    let mut first = ServerProcess::start_with_env(first_data.path(), &env);
    let first_id = runner_id(first_data.path());
    assert!(first_id.starts_with("embedded-"), "{first_id}");
    let task_id = {
        let api = Api::new(&first);
        api.post(
            "codes",
            json!({"name": "steady", "image": "stevedore/busybox:local",
                   "command": "echo started; sleep 4; echo finished"}),
        )
        .await;
        let ids = api.queue(json!([{"code_name": "steady"}])).await;
        api.wait_for(&ids[0], Duration::from_secs(60), |task| {
            task["status"] == "running"
        })
        .await;
        ids[0].clone()
    };

    // A second server on the same engine reaps only its own id's leftovers at start-up.
    let mut second = ServerProcess::start_with_env(second_data.path(), &env);
    let second_id = runner_id(second_data.path());
    assert_ne!(first_id, second_id);

    let api = Api::new(&first);
    let task = api.wait_finished(&task_id, Duration::from_secs(60)).await;
    assert_eq!(task["status"], "complete", "{task}");
    assert_eq!(task["infra_attempts"], 0, "{task}");
    let log = api.log(&task_id).await.unwrap();
    assert!(log.contains("finished"), "{log}");

    assert!(second.terminate().success());
    assert!(first.terminate().success());
    for id in [first_id, second_id] {
        assert_eq!(
            containers_labelled(&format!("stevedore.runner={id}")),
            Vec::<String>::new()
        );
    }
}

#[tokio::test]
async fn a_second_server_on_one_data_directory_is_refused() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let mut first = ServerProcess::start_with_env(data.path(), &[]);
    let second = std::process::Command::new(crate::support::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("STEVEDORE_CONFIG", "/dev/null")
        .env("STEVEDORE_STACK_IMAGES", "local")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another runner already uses"), "{stderr}");
    assert!(first.terminate().success());
}

#[tokio::test]
async fn a_restarted_server_gives_back_what_it_held_without_waiting_for_the_lease() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    // Leases far longer than the test: only the release at start-up can free the task.
    let env = [("STEVEDORE_RUNNER__LEASE_SECS", "600")];
    let mut server = ServerProcess::start_with_env(data.path(), &env);
    let id = runner_id(data.path());
    let task_id = {
        let api = Api::new(&server);
        api.post(
            "codes",
            json!({"name": "held", "image": "stevedore/busybox:local",
                   "command": "echo started; sleep 3; echo finished"}),
        )
        .await;
        let ids = api.queue(json!([{"code_name": "held"}])).await;
        api.wait_for(&ids[0], Duration::from_secs(60), |task| {
            task["status"] == "running"
        })
        .await;
        ids[0].clone()
    };
    server.kill_hard();

    let restarted = Instant::now();
    let mut server = ServerProcess::start_with_env(data.path(), &env);
    assert_eq!(runner_id(data.path()), id, "the id survives the restart");
    let api = Api::new(&server);
    let task = api.wait_finished(&task_id, Duration::from_secs(60)).await;
    assert_eq!(task["status"], "complete", "{task}");
    assert_eq!(task["infra_attempts"], 1, "{task}");
    // Each attempt's output apart, the second one's opened by a line saying why.
    let log = api.log(&task_id).await.unwrap();
    let second = format!(
        "--- stevedore: attempt 2; the last one ended: runner {id} restarted while it held \
         the task ---\nstarted\nfinished\n"
    );
    assert!(log.ends_with(&second), "{log}");
    if log.len() > second.len() {
        assert_eq!(&log[..log.len() - second.len()], "started\n\n", "{log}");
    }
    assert!(
        restarted.elapsed() < Duration::from_secs(60),
        "the task waited for its lease"
    );
    assert!(server.terminate().success());
    assert_eq!(
        containers_labelled(&format!("stevedore.runner={id}")),
        Vec::<String>::new()
    );
}
