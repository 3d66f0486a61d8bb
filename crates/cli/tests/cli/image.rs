//! stevedore's own container image (`scripts/build-image.sh`): built here without a registry,
//! it serves the API and, with the engine's socket mounted, runs tasks in sibling containers.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{binary, docker_available, ensure_local_image};

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().expect("docker");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Removes the test's container and image tags however the test ends.
struct Cleanup {
    container: Option<String>,
    repository: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(container) = &self.container {
            let _ = Command::new("docker")
                .args(["rm", "-f", container])
                .output();
        }
        for tag in ["latest", env!("CARGO_PKG_VERSION")] {
            let _ = Command::new("docker")
                .args(["image", "rm", &format!("{}:{tag}", self.repository)])
                .output();
        }
    }
}

#[tokio::test]
async fn the_image_builds_offline_serves_and_runs_tasks_beside_the_engine() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let repository = format!("stevedore-test/stevedore-{}", std::process::id());
    let mut cleanup = Cleanup {
        container: None,
        repository: repository.clone(),
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-image.sh");
    let built = Command::new("bash")
        .arg(&script)
        .args(["--binary", binary(), "--name", &repository])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "build-image.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let image = format!("{repository}:latest");
    assert_eq!(
        docker(&["run", "--rm", &image, "--version"]),
        format!("stevedore {}", env!("CARGO_PKG_VERSION"))
    );

    // The default command serves; with the engine's socket the embedded runner starts the
    // task containers beside this one.
    let container = docker(&[
        "run",
        "-d",
        "-p",
        "127.0.0.1::8080",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-e",
        &format!("STEVEDORE_RUNNER__ID=image-{}", std::process::id()),
        // Inside a container the runner has neither the host's network nor iptables: the
        // operator says so explicitly, or it refuses to start.
        "-e",
        "STEVEDORE_TASK_NETWORK__UNGUARDED=true",
        &image,
    ]);
    cleanup.container = Some(container.clone());
    let port = docker(&["port", &container, "8080/tcp"]);
    let base = format!("http://{}", port.lines().next().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let iron: Value = loop {
        let read = Command::new("docker")
            .args(["exec", &container, "cat", "/var/lib/stevedore/iron.json"])
            .output()
            .unwrap();
        if read.status.success()
            && let Ok(iron) = serde_json::from_slice(&read.stdout)
        {
            break iron;
        }
        assert!(
            Instant::now() < deadline,
            "the server in the container did not get ready: {}",
            docker(&["logs", &container])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let http = reqwest::Client::new();
    let api = format!("{base}/2/projects/{}", iron["project_id"].as_str().unwrap());
    let auth = format!("OAuth {}", iron["token"].as_str().unwrap());
    let health: Value = http
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let pushed = http
        .post(format!("{api}/codes"))
        .header("Authorization", &auth)
        .json(&json!({"name": "hello", "image": "stevedore/busybox:local", "command": "echo from a sibling; cat $PAYLOAD_FILE"}))
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let queued: Value = http
        .post(format!("{api}/tasks"))
        .header("Authorization", &auth)
        .json(&json!({"tasks": [{"code_name": "hello", "payload": "p"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task_id = queued["tasks"][0]["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task: Value = http
            .get(format!("{api}/tasks/{task_id}"))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if task["status"] == "complete" {
            break;
        }
        assert!(
            Instant::now() < deadline && task["status"] != "error",
            "{task}\n{}",
            docker(&["logs", &container])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = http
        .get(format!("{api}/tasks/{task_id}/log"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(log, "from a sibling\np");
}
