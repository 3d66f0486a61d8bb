//! Schedules fired by the real binary: on time, into real containers, never twice for one
//! time, and never once cancelled.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::support::{Api, ServerProcess, docker_available, ensure_local_image};

/// Lets a test ask for `run_every: 2` and fire within a quarter second of the time.
const FAST_SCHEDULES: &[(&str, &str)] = &[
    ("STEVEDORE_MIN_RUN_EVERY_SECS", "1"),
    ("STEVEDORE_SCHEDULER_INTERVAL_MS", "250"),
];

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"))
        .parse()
        .unwrap()
}

/// A whole second a little in the future, as seconds since the epoch.
fn whole_seconds_from_now(seconds: i64) -> i64 {
    Utc::now().timestamp() + seconds
}

async fn create_schedule(api: &Api<'_>, schedule: Value) -> String {
    let reply = api
        .post("schedules", json!({ "schedules": [schedule] }))
        .await;
    reply["schedules"][0]["id"].as_str().unwrap().to_owned()
}

/// A code's tasks, oldest first.
async fn tasks_of(api: &Api<'_>, code_name: &str) -> Vec<Value> {
    let reply = api
        .get(&format!("tasks?code_name={code_name}&per_page=100"))
        .await;
    let mut tasks = reply["tasks"].as_array().unwrap().clone();
    tasks.sort_by_key(|task| time(&task["created_at"]));
    tasks
}

/// Polls a schedule until `done` holds of it, or panics after `timeout`.
async fn wait_schedule(
    api: &Api<'_>,
    schedule_id: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let schedule = api.get(&format!("schedules/{schedule_id}")).await;
        if done(&schedule) {
            return schedule;
        }
        assert!(
            Instant::now() < deadline,
            "schedule {schedule_id} did not get there in {timeout:?}: {schedule}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_schedule_fires_on_time_into_containers_and_a_cancelled_one_never_fires() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let runner = unique("sched");
    let server = ServerProcess::start_running(data.path(), &runner, FAST_SCHEDULES);
    let api = Api::new(&server);
    for name in ["tick", "never"] {
        api.post(
            "codes",
            json!({"name": name, "image": "stevedore/busybox:local",
                   "command": "echo \"tick $TASK_ID\"; cat \"$PAYLOAD_FILE\""}),
        )
        .await;
    }
    let start_at = whole_seconds_from_now(3);
    let schedule_id = create_schedule(
        &api,
        json!({"code_name": "tick", "payload": "scheduled", "run_every": 2, "run_times": 3,
               "start_at": start_at}),
    )
    .await;
    let cancelled_id = create_schedule(
        &api,
        json!({"code_name": "never", "run_every": 2, "start_at": start_at}),
    )
    .await;
    api.post(&format!("schedules/{cancelled_id}/cancel"), json!({}))
        .await;

    let schedule = wait_schedule(&api, &schedule_id, Duration::from_secs(30), |schedule| {
        schedule["status"] == "complete"
    })
    .await;
    assert_eq!(schedule["run_count"], 3, "{schedule}");
    assert!(schedule["last_run_time"].is_string(), "{schedule}");

    let tasks = tasks_of(&api, "tick").await;
    assert_eq!(tasks.len(), 3, "exactly three tasks: {tasks:?}");
    let start_at = DateTime::from_timestamp(start_at, 0).unwrap();
    for (k, task) in (0i64..).zip(&tasks) {
        assert_eq!(task["schedule_id"], schedule_id.as_str(), "{task}");
        let due = start_at + chrono::Duration::seconds(2 * k);
        let created = time(&task["created_at"]);
        assert!(created >= due, "task {k} made at {created}, before {due}");
        assert!(
            created <= due + chrono::Duration::seconds(2),
            "task {k} made at {created}, more than 2 s after {due}"
        );
    }
    for task in &tasks {
        let id = task["id"].as_str().unwrap();
        let task = api.wait_finished(id, Duration::from_secs(60)).await;
        assert_eq!(task["status"], "complete", "{task}");
        let log = api.log(id).await.expect("a log");
        assert!(log.contains(&format!("tick {id}")), "{log}");
        assert!(log.contains("scheduled"), "{log}");
    }
    assert_eq!(
        time(&schedule["last_run_time"]),
        time(&tasks[2]["created_at"])
    );

    let cancelled = api.get(&format!("schedules/{cancelled_id}")).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["run_count"], 0, "{cancelled}");
    assert!(tasks_of(&api, "never").await.is_empty());
}

/// Killed with SIGKILL between two fires and started again, the server fires the time it
/// missed once, goes on with the next time after now, and never fires a time twice.
#[tokio::test]
async fn a_schedule_survives_kill_9_without_firing_a_time_twice() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let runner = unique("sched-kill");
    let mut server = ServerProcess::start_running(data.path(), &runner, FAST_SCHEDULES);
    let schedule_id = {
        let api = Api::new(&server);
        api.post(
            "codes",
            json!({"name": "tock", "image": "stevedore/busybox:local", "command": "echo tock"}),
        )
        .await;
        let schedule_id = create_schedule(
            &api,
            json!({"code_name": "tock", "run_every": 2, "run_times": 4,
                   "start_at": whole_seconds_from_now(2)}),
        )
        .await;
        wait_schedule(&api, &schedule_id, Duration::from_secs(20), |schedule| {
            schedule["run_count"].as_u64() >= Some(1)
        })
        .await;
        schedule_id
    };
    server.kill_hard();
    // Down across at least one fire time.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let server = ServerProcess::start_running(data.path(), &runner, FAST_SCHEDULES);
    let api = Api::new(&server);
    let schedule = wait_schedule(&api, &schedule_id, Duration::from_secs(30), |schedule| {
        schedule["status"] == "complete"
    })
    .await;
    assert_eq!(schedule["run_count"], 4, "{schedule}");
    let tasks = tasks_of(&api, "tock").await;
    assert_eq!(tasks.len(), 4, "one task per fire, none twice: {tasks:?}");
    for task in &tasks {
        let id = task["id"].as_str().unwrap();
        let task = api.wait_finished(id, Duration::from_secs(60)).await;
        assert_eq!(task["status"], "complete", "{task}");
    }
}
