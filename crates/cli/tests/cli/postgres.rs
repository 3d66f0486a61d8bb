//! `serve --database postgres://…`: the server on PostgreSQL, against the throwaway test
//! cluster (skipped without PostgreSQL unless `CI` is set).

use serde_json::{Value, json};
use stevedore_store::testcluster::fresh_database;

use crate::support::ServerProcess;

async fn call(server: &ServerProcess, request: reqwest::RequestBuilder) -> Value {
    let response = request
        .header("Authorization", format!("OAuth {}", server.token()))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap()
}

#[tokio::test]
async fn serve_on_postgres_queues_and_reads_back_tasks() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_with(
        data.path(),
        &["--database", &database.url],
        &[("STEVEDORE_RUNNER__ENABLED", "false")],
    );
    let client = reqwest::Client::new();
    call(
        &server,
        client
            .post(server.url("codes"))
            .json(&json!({"name": "hello", "image": "stevedore/busybox:local"})),
    )
    .await;
    let queued = call(
        &server,
        client.post(server.url("tasks")).json(&json!({"tasks": [
            {"code_name": "hello", "payload": "{\"n\": 1}", "priority": 2},
            {"code_name": "hello", "payload": "nul \u{0} and 🚢"},
        ]})),
    )
    .await;
    let ids: Vec<&str> = queued["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let task = call(
        &server,
        client.get(server.url(&format!("tasks/{}", ids[1]))),
    )
    .await;
    assert_eq!(task["status"], "queued");
    assert_eq!(task["payload"], "nul \u{0} and 🚢");
    let listed = call(&server, client.get(server.url("tasks?code_name=hello"))).await;
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 2, "{listed}");
    assert!(server.terminate().success());

    // Started again, configured through the environment this time: the tasks are still there.
    let restarted = ServerProcess::start_with(
        data.path(),
        &[],
        &[
            ("STEVEDORE_RUNNER__ENABLED", "false"),
            ("STEVEDORE_DATABASE", &database.url),
        ],
    );
    let task = call(
        &restarted,
        client.get(restarted.url(&format!("tasks/{}", ids[0]))),
    )
    .await;
    assert_eq!(
        (task["status"].as_str(), task["priority"].as_i64()),
        (Some("queued"), Some(2))
    );
}

/// A lease as a runner token gets it from `server`.
async fn lease(server: &ServerProcess, runner_token: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .post(format!("{}/runner/v1/lease", server.base))
        .header("Authorization", format!("OAuth {runner_token}"))
        .json(
            &json!({"runner_id": "pg-test", "clusters": ["default"], "max_tasks": 10,
                      "lease_secs": 30}),
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let answer: Value = response.json().await.unwrap();
    answer["tasks"].as_array().unwrap().clone()
}

/// Servers on one PostgreSQL database read each other's registry credentials when they share
/// the credential key, and a server with another key leases without them instead of failing.
#[tokio::test]
async fn servers_sharing_a_database_and_a_key_share_registry_credentials() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let shared_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let other_key = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
    let start = |dir: &std::path::Path, key: &str| {
        ServerProcess::start_with(
            dir,
            &["--database", &database.url],
            &[
                ("STEVEDORE_RUNNER__ENABLED", "false"),
                ("STEVEDORE_CREDENTIAL_KEY", key),
            ],
        )
    };
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = start(dir_a.path(), shared_key);
    let b = start(dir_b.path(), shared_key);
    let c = start(dir_c.path(), other_key);
    assert_eq!(a.iron["project_id"], b.iron["project_id"]);
    let client = reqwest::Client::new();
    let stored = call(
        &a,
        client.post(a.url("credentials")).json(&json!({
            "username": "alice", "password": "pg-Passw0rd", "serveraddress": "127.0.0.1:5999"})),
    )
    .await;
    assert_eq!(stored["registry"], "127.0.0.1:5999");
    call(
        &b,
        client.post(b.url("codes")).json(
            &json!({"name": "private", "image": "127.0.0.1:5999/team/app:1", "command": "true"}),
        ),
    )
    .await;

    let output = std::process::Command::new(crate::support::binary())
        .args(["token", "create", "--role", "runner"])
        .env("STEVEDORE_DATABASE", &database.url)
        .env("STEVEDORE_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let runner_token: Value = serde_json::from_slice(&output.stdout).unwrap();
    let runner_token = runner_token["token"].as_str().unwrap();

    // Server B opens what server A sealed.
    call(
        &b,
        client
            .post(b.url("tasks"))
            .json(&json!({"tasks": [{"code_name": "private"}]})),
    )
    .await;
    let leased = lease(&b, runner_token).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(
        leased[0]["registry_credential"],
        json!({"registry": "127.0.0.1:5999", "username": "alice", "password": "pg-Passw0rd"})
    );

    // Server C holds another key: the task is leased, without a credential it cannot open.
    call(
        &c,
        client
            .post(c.url("tasks"))
            .json(&json!({"tasks": [{"code_name": "private"}]})),
    )
    .await;
    let leased = lease(&c, runner_token).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0]["registry_credential"], Value::Null);
}
