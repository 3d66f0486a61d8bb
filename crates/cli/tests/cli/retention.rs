//! `stevedore gc` against a running server's data directory: a finished task's log and
//! payload go, its row stays and says so, and tasks still running or queued keep everything.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    Api, ServerProcess, binary, docker_available, ensure_local_image, run_ok, unique,
};

/// `stevedore gc` on `data_dir` with `args` and the environment `env`.
fn gc(data_dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command.arg("gc").arg("--data-dir").arg(data_dir).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run stevedore gc")
}

#[tokio::test]
async fn gc_removes_finished_tasks_logs_and_payloads_and_nothing_else() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_running(
        data.path(),
        &unique("gc"),
        &[("STEVEDORE_METRICS__TOKEN_REQUIRED", "false")],
    );
    let api = Api::new(&server);
    api.post(
        "codes",
        json!({"name": "talk", "image": "stevedore/busybox:local",
               "command": "echo \"said: $(cat \"$PAYLOAD_FILE\")\"; [ \"$(cat \"$PAYLOAD_FILE\")\" != slow ] || sleep 60"}),
    )
    .await;
    let done = api
        .queue(json!([{"code_name": "talk", "payload": "finished"}]))
        .await
        .remove(0);
    let done_task = api.wait_finished(&done, Duration::from_secs(60)).await;
    assert_eq!(done_task["status"], "complete", "{done_task}");
    let running = api
        .queue(json!([{"code_name": "talk", "payload": "slow"}]))
        .await
        .remove(0);
    api.wait_for(&running, Duration::from_secs(60), |task| {
        task["status"] == "running" && task["log_size"].as_u64() > Some(0)
    })
    .await;
    let queued = api
        .queue(json!([{"code_name": "talk", "payload": "later", "delay": 3600}]))
        .await
        .remove(0);

    // Zero settings are refused at start-up, the environment's too, naming the setting.
    let refused = gc(data.path(), &[], &[("STEVEDORE_RETENTION__LOG_DAYS", "0")]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("retention.log_days"), "{stderr}");

    // The defaults keep thirty days: nothing goes.
    let dir = data.path().to_str().unwrap();
    let kept: Value = serde_json::from_str(&run_ok(&["gc", "--data-dir", dir, "--json"])).unwrap();
    assert_eq!(kept["removed"]["logs"]["tasks"], 0, "{kept}");
    assert_eq!(kept["before"], kept["after"], "{kept}");

    let logs_stored = stored_logs(&api).await;
    assert!(logs_stored > 0.0);

    // Everything that finished before now.
    let output = gc(
        data.path(),
        &["--log-days", "0", "--payload-days", "0", "--json"],
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let log_size = done_task["log_size"].as_u64().unwrap();
    assert_eq!(report["removed"]["logs"]["tasks"], 1, "{report}");
    assert_eq!(report["removed"]["logs"]["bytes"], log_size, "{report}");
    assert_eq!(report["removed"]["payloads"]["tasks"], 1, "{report}");
    assert_eq!(report["removed"]["payloads"]["bytes"], 8, "{report}");
    assert_eq!(report["finished"], true);
    let logs_before = report["before"]["logs"].as_u64().unwrap();
    assert_eq!(
        report["after"]["logs"].as_u64().unwrap(),
        logs_before - log_size,
        "{report}"
    );

    // The server's gauge reads the store: the removed bytes are gone from it.
    assert_eq!(stored_logs(&api).await, logs_stored - log_size as f64);

    // The finished task's row stays and says what went.
    let task = api.get(&format!("tasks/{done}")).await;
    assert_eq!(task["status"], "complete");
    assert_eq!(task["payload"], "");
    assert_eq!(task["log_size"], log_size);
    assert!(task["log_removed_at"].is_string(), "{task}");
    assert!(task["payload_removed_at"].is_string(), "{task}");
    let response = api
        .http
        .get(server.url(&format!("tasks/{done}/log")))
        .header("Authorization", format!("OAuth {}", server.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 410);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .contains("removed by retention"),
        "{body}"
    );
    // The CLI says so too, and fails.
    let log = Command::new(binary())
        .args(["task", "log", &done, "--data-dir", dir])
        .output()
        .unwrap();
    assert!(!log.status.success());
    let stderr = String::from_utf8_lossy(&log.stderr);
    assert!(stderr.contains("removed by retention"), "{stderr}");
    let shown = run_ok(&["task", "show", &done, "--data-dir", dir]);
    assert!(shown.contains("removed by retention"), "{shown}");

    // The running and the queued task keep their logs and payloads.
    let task = api.get(&format!("tasks/{running}")).await;
    assert_eq!(task["payload"], "slow");
    assert!(task.get("log_removed_at").is_none(), "{task}");
    assert!(api.log(&running).await.unwrap().contains("said: slow"));
    let task = api.get(&format!("tasks/{queued}")).await;
    assert_eq!(
        (task["status"].as_str(), task["payload"].as_str()),
        (Some("queued"), Some("later"))
    );

    // People get a table.
    let table = run_ok(&["gc", "--data-dir", dir, "--log-days", "0"]);
    assert!(table.contains("KIND") && table.contains("logs"), "{table}");

    api.post(&format!("tasks/{running}/cancel"), json!({}))
        .await;
    api.post(&format!("tasks/{queued}/cancel"), json!({})).await;
    api.wait_finished(&running, Duration::from_secs(60)).await;
    assert!(server.terminate().success());
}

/// `stevedore_stored_bytes{kind="logs"}` in the server's exposition, and the server's own
/// retention pass (run at start, with nothing old enough to remove) seen in its gauges.
async fn stored_logs(api: &Api<'_>) -> f64 {
    let text = api
        .http
        .get(format!("{}/metrics", api.server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("stevedore_retention_run_stored_bytes{kind=\"logs\",point=\"before\"}")
            && text.contains("stevedore_retention_last_run_timestamp_seconds "),
        "{text}"
    );
    text.lines()
        .find_map(|line| line.strip_prefix("stevedore_stored_bytes{kind=\"logs\"} "))
        .unwrap_or_else(|| panic!("no stored logs in {text}"))
        .parse()
        .unwrap()
}
