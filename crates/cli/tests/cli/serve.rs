use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Api, ServerProcess, binary, docker_available, run_ok, unique};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(server: &ServerProcess, path: &str, body: Value) -> Value {
    let response = client()
        .post(server.url(path))
        .header("Authorization", format!("OAuth {}", server.token()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

async fn get(server: &ServerProcess, path: &str) -> Value {
    let response = client()
        .get(server.url(path))
        .header("Authorization", format!("OAuth {}", server.token()))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

#[tokio::test]
async fn first_start_writes_iron_json_and_later_starts_reuse_it() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path());
    let iron = server.iron.clone();
    for key in [
        "project_id",
        "token",
        "host",
        "port",
        "protocol",
        "scheme",
        "api_version",
    ] {
        assert!(iron.get(key).is_some(), "iron.json lacks {key}: {iron}");
    }
    assert_eq!(iron["protocol"], "http");
    assert_eq!(
        iron["scheme"], "http",
        "IronWorker's Node client reads `scheme`"
    );
    // IronWorker's Go client (under the `iron` CLI) reads every setting but `port` as a
    // string, and `port` as a number.
    assert_eq!(iron["api_version"], "2");
    assert!(iron["port"].is_u64(), "{iron}");
    let status = server.terminate();
    assert!(
        status.success(),
        "SIGTERM should stop the server cleanly: {status:?}"
    );

    // A file written by an earlier version, with the number, is still read and reused.
    let path = data.path().join("iron.json");
    let mut old = iron.clone();
    old["api_version"] = serde_json::json!(2);
    std::fs::write(&path, old.to_string()).unwrap();
    let server = ServerProcess::start(data.path());
    assert_eq!(server.iron["project_id"], iron["project_id"]);
    assert_eq!(server.iron["token"], iron["token"]);
    assert_eq!(server.iron["api_version"], "2");
}

/// Every acknowledged write survives `kill -9` of the server.
#[tokio::test]
async fn acknowledged_tasks_survive_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path());
    post(
        &server,
        "codes",
        json!({"name": "durable", "image": "stevedore/busybox:local"}),
    )
    .await;
    let mut acknowledged = Vec::new();
    for batch in 0..20 {
        let tasks: Vec<Value> = (0..25).map(|i| json!({"code_name": "durable", "payload": format!("{batch}-{i}"), "delay": 3600})).collect();
        let reply = post(&server, "tasks", json!({ "tasks": tasks })).await;
        acknowledged.extend(
            reply["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_owned()),
        );
    }
    server.kill_hard();

    let server = ServerProcess::start(data.path());
    for id in &acknowledged {
        let task = get(&server, &format!("tasks/{id}")).await;
        assert_eq!(task["status"], "queued", "{id}");
    }
    assert_eq!(acknowledged.len(), 500);
}

#[tokio::test]
async fn admin_commands_print_json() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let project: Value =
        serde_json::from_str(&run_ok(&["--data-dir", dir, "project", "create", "acme"])).unwrap();
    assert_eq!(project["name"], "acme");
    assert_eq!(project["token"].as_str().unwrap().len(), 40);
    let id = project["id"].as_str().unwrap();
    let token: Value = serde_json::from_str(&run_ok(&[
        "--data-dir",
        dir,
        "token",
        "create",
        "--project",
        id,
    ]))
    .unwrap();
    assert_eq!(token["project_id"], id);
    assert_eq!(token["role"], "project");

    // The new project's token works against a running server, and only for that project.
    let server = ServerProcess::start(data.path());
    let url = format!("{}/2/projects/{id}/codes", server.base);
    for secret in [&project["token"], &token["token"]] {
        let response = client()
            .get(&url)
            .header(
                "Authorization",
                format!("OAuth {}", secret.as_str().unwrap()),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let response = client()
        .get(server.url("codes"))
        .header(
            "Authorization",
            format!("OAuth {}", project["token"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    let duplicate = Command::new(binary())
        .args(["--data-dir", dir, "project", "create", "acme"])
        .output()
        .unwrap();
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already exists"));
    let orphan = Command::new(binary())
        .args(["--data-dir", dir, "token", "create"])
        .output()
        .unwrap();
    assert!(!orphan.status.success());
    assert!(String::from_utf8_lossy(&orphan.stderr).contains("--project"));
}

/// The runner embedded in `serve` leases from the store, not over HTTP, and is still listed in
/// the default cluster's statistics with its id and capacity.
#[tokio::test]
async fn the_embedded_runner_is_listed_in_cluster_stats() {
    if !docker_available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let runner_id = unique("embedded-stats");
    let mut server = ServerProcess::start_running(
        data.path(),
        &runner_id,
        &[("STEVEDORE_RUNNER__CAPACITY", "3")],
    );
    let api = Api::new(&server);
    // Its first lease comes right after start-up; wait for it rather than race it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let stats = api.get("../../clusters/default/stats").await;
        if stats["runners_online"] != 0 {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "the embedded runner never showed up: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats["runners_online"], 1, "{stats}");
    assert_eq!(stats["capacity"], 3, "{stats}");
    assert_eq!(stats["runners"][0]["id"], runner_id.as_str(), "{stats}");
    assert_eq!(stats["runners"][0]["capacity"], 3, "{stats}");
    assert_eq!(
        stats["runners"][0]["clusters"],
        json!(["default"]),
        "{stats}"
    );
    assert_eq!(stats["runners"][0]["in_use"], 0, "{stats}");
    assert!(server.terminate().success());
}

/// `serve`'s log written to a file or a pipe is plain text: no terminal colour codes (they
/// were written whatever the output was).
#[test]
fn the_log_written_to_a_file_has_no_colour_codes() {
    let data = tempfile::tempdir().unwrap();
    let log_path = data.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("STEVEDORE_LOG", "info")
        .env("STEVEDORE_RUNNER__ENABLED", "false")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("INFO") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("INFO"),
        "serve logged nothing at info: {text:?}"
    );
    assert!(!text.contains('\u{1b}'), "colour codes in {text:?}");
}
