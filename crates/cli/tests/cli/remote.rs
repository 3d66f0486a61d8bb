//! `stevedore runner`: a separate runner process, leasing over the runner protocol from a
//! `stevedore serve` whose embedded runner is off, runs real containers to completion, zip
//! codes' packages included.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::{
    Api, RunnerProcess, ServerProcess, binary, containers_labelled, docker_available,
    ensure_local_image, project_runner_token, remove_containers, runner_token, unique, zip_of,
};

#[tokio::test]
async fn a_remote_runner_runs_tasks_survives_kill_9_and_cancels() {
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
        json!({"name": "hello", "image": "stevedore/busybox:local",
               "command": "echo \"hello from $TASK_ID\"; cat \"$PAYLOAD_FILE\"; echo; echo '::stevedore-progress::100 all done'"}),
    )
    .await;
    api.post(
        "codes",
        json!({"name": "slow", "image": "stevedore/busybox:local",
               "command": "echo started; sleep 5; echo finished"}),
    )
    .await;
    api.post(
        "codes",
        json!({"name": "forever", "image": "stevedore/busybox:local", "command": "echo waiting; sleep 300"}),
    )
    .await;

    // A project token cannot run a runner: it stops at start-up with the server's reason.
    let refused = Command::new(binary())
        .args(["runner", "--api", &server.base, "--token", &server.token()])
        .env("STEVEDORE_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("runner token"), "{stderr}");

    let mut first = RunnerProcess::start(&server, &token, &unique("remote-a"), &[]);

    // A task runs to completion, with its log and progress.
    let ids = api
        .queue(json!([{"code_name": "hello", "payload": "{\"n\":1}"}]))
        .await;
    let task = api.wait_finished(&ids[0], Duration::from_secs(60)).await;
    assert_eq!(task["status"], "complete", "{task}");
    assert_eq!(task["percent"], 100, "{task}");
    assert_eq!(task["msg"], "all done", "{task}");
    let log = api.log(&ids[0]).await.unwrap();
    assert!(log.contains(&format!("hello from {}", ids[0])), "{log}");
    assert!(log.contains("{\"n\":1}"), "{log}");

    // A zip code's package reaches the runner through its task's lease.
    let zip = zip_of(&[("run.sh", b"echo \"unpacked in $(pwd)\"\n", 0o644)]);
    api.upload(
        json!({"name": "zipped", "image": "stevedore/busybox:local", "command": "sh run.sh"}),
        zip,
    )
    .await;
    let ids = api.queue(json!([{"code_name": "zipped"}])).await;
    let task = api.wait_finished(&ids[0], Duration::from_secs(60)).await;
    let log = api.log(&ids[0]).await.unwrap_or_default();
    assert_eq!(task["status"], "complete", "{task}\n{log}");
    assert!(log.contains("unpacked in /mnt/task"), "{log}");

    // A cancel reaches the container through the heartbeat.
    let ids = api.queue(json!([{"code_name": "forever"}])).await;
    api.wait_for(&ids[0], Duration::from_secs(60), |task| {
        task["status"] == "running"
    })
    .await;
    api.post(&format!("tasks/{}/cancel", ids[0]), json!({}))
        .await;
    let task = api.wait_finished(&ids[0], Duration::from_secs(30)).await;
    assert_eq!(task["status"], "cancelled", "{task}");

    // The runner dies mid-task; the lease expires, the server rescues the task and a second
    // runner completes it.
    let slow = api.queue(json!([{"code_name": "slow"}])).await;
    api.wait_for(&slow[0], Duration::from_secs(60), |task| {
        task["status"] == "running"
    })
    .await;
    first.kill_hard();
    remove_containers(&first.label());
    let mut second = RunnerProcess::start(&server, &token, &unique("remote-b"), &[]);
    let task = api.wait_finished(&slow[0], Duration::from_secs(90)).await;
    assert_eq!(task["status"], "complete", "{task}");
    assert_eq!(task["infra_attempts"], 1, "one rescue: {task}");
    let log = api.log(&slow[0]).await.unwrap();
    assert!(log.contains("finished"), "{log}");

    // Every task ended exactly once, none was duplicated.
    let listed = api.get("tasks?per_page=100").await;
    let tasks = listed["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 4, "{listed}");
    for task in tasks {
        assert!(
            matches!(task["status"].as_str(), Some("complete" | "cancelled")),
            "{task}"
        );
        assert_eq!(task["retry_count"], 0);
    }

    // SIGTERM stops the runner cleanly and it leaves no container behind.
    assert!(second.terminate().success());
    assert_eq!(containers_labelled(&second.label()), Vec::<String>::new());
    assert!(server.terminate().success());
}

/// A task queued for a cluster runs only on a runner serving it.
#[tokio::test]
async fn cluster_tasks_run_only_on_their_clusters_runners() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path());
    let token = runner_token(data.path());
    let api = Api::new(&server);
    let cluster = unique("gpu");
    let created = api.post("../../clusters", json!({"name": cluster})).await;
    assert_eq!(created["cluster"]["name"], cluster.as_str());
    api.post(
        "codes",
        json!({"name": "where", "image": "stevedore/busybox:local", "command": "echo ran"}),
    )
    .await;

    let mut plain = RunnerProcess::start(&server, &token, &unique("remote-plain"), &[]);
    let ids = api
        .queue(json!([{"code_name": "where", "cluster": cluster}]))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let task = api.get(&format!("tasks/{}", ids[0])).await;
    assert_eq!(
        task["status"], "queued",
        "the default runner left it: {task}"
    );

    // The project's own cluster is served by a runner token of the project's.
    let project_id = server.iron["project_id"].as_str().unwrap().to_owned();
    let own = project_runner_token(data.path(), &project_id, &[cluster.as_str()]);
    let mut special =
        RunnerProcess::start(&server, &own, &unique("remote-gpu"), &[cluster.as_str()]);
    let task = api.wait_finished(&ids[0], Duration::from_secs(60)).await;
    assert_eq!(task["status"], "complete", "{task}");
    let stats = api
        .get(&format!(
            "../../clusters/{}/stats",
            created["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(stats["runners_online"], 1, "{stats}");
    assert_eq!(stats["runners"][0]["id"], special.id.as_str(), "{stats}");
    assert_eq!(stats["capacity"], 2, "{stats}");

    assert!(special.terminate().success());
    assert!(plain.terminate().success());
    assert!(server.terminate().success());
}
