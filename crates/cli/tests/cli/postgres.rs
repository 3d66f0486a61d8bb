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
