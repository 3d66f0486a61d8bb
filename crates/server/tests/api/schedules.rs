use serde_json::json;

use crate::support::{TestServer, redactions};

#[tokio::test]
async fn create_show_list_cancel() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let reply = server
        .post(
            "schedules",
            json!({"schedules": [
                {"code_name": "hello", "payload": "p", "run_every": 3600, "start_at": "2099-01-01T00:00:00+01:00", "run_times": 5, "label": "hourly"},
                {"code_name": "hello", "cron": "30 9 * * 1-5", "timezone": "Europe/Berlin", "priority": 2},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let created = reply.json();
    assert_eq!(created["msg"], "Scheduled");
    let ids: Vec<String> = created["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();

    let first = server.get(&format!("schedules/{}", ids[0])).await.json();
    assert_eq!(
        first["next_start"], "2098-12-31T23:00:00.000Z",
        "start_at is the first fire time"
    );
    redactions().bind(|| insta::assert_json_snapshot!("run_every_schedule", first));
    let second = server.get(&format!("schedules/{}", ids[1])).await.json();
    assert_eq!(second["cron"], "30 9 * * 1-5");
    assert!(second["next_start"].is_string());

    let list = server.get("schedules").await.json();
    assert_eq!(list["schedules"].as_array().unwrap().len(), 2);

    let reply = server
        .post(&format!("schedules/{}/cancel", ids[0]), json!({}))
        .await;
    assert_eq!(reply.json()["msg"], "Cancelled");
    let cancelled = server.get(&format!("schedules/{}", ids[0])).await.json();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["next_start"].is_null());
}

#[tokio::test]
async fn invalid_schedules_are_refused_whole() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let cases = [
        (
            json!({"code_name": "hello", "run_every": 10}),
            400,
            "run_every",
        ),
        (
            json!({"code_name": "hello", "cron": "61 * * * *"}),
            400,
            "cron",
        ),
        (
            json!({"code_name": "hello", "cron": "* * * * *", "timezone": "Mars/Base"}),
            400,
            "timezone",
        ),
        (
            json!({"code_name": "hello", "run_every": 60, "cron": "* * * * *"}),
            400,
            "not both",
        ),
        (
            json!({"code_name": "hello", "start_at": "yesterday"}),
            400,
            "start_at",
        ),
        (
            json!({"code_name": "hello", "run_every": 60, "start_at": "2030-01-02T00:00:00Z", "end_at": "2030-01-01T00:00:00Z"}),
            400,
            "end_at",
        ),
        (json!({"code_name": "nope", "run_every": 60}), 404, "nope"),
    ];
    for (schedule, status, needle) in cases {
        let reply = server
            .post(
                "schedules",
                json!({"schedules": [{"code_name": "hello", "run_every": 60}, schedule]}),
            )
            .await;
        let msg = reply.error(status);
        assert!(msg.contains(needle), "{msg:?} should mention {needle}");
        assert!(
            msg.contains("schedules[1]"),
            "{msg:?} should name the schedule"
        );
    }
    let list = server.get("schedules").await.json();
    assert_eq!(list["schedules"], json!([]), "nothing half-written");
}
