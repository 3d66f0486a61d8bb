use serde_json::json;

use crate::support::{TestServer, redactions};

#[tokio::test]
async fn queue_show_list_and_cancel() {
    let server = TestServer::start().await;
    server
        .image_code("hello", json!({"default_priority": 1}))
        .await;
    let ids = server
        .queue(json!([
            {"code_name": "hello", "payload": "{\"n\":1}", "label": "first", "timeout": 60},
            {"code_name": "hello", "payload": {"n": 2}, "priority": 2, "delay": 30, "cluster": null, "label": null},
        ]))
        .await;
    assert_eq!(ids.len(), 2);

    let task = server.get(&format!("tasks/{}", ids[0])).await.json();
    redactions().bind(|| insta::assert_json_snapshot!("queued_task", task));
    let second = server.get(&format!("tasks/{}", ids[1])).await.json();
    assert_eq!(
        second["payload"], r#"{"n":2}"#,
        "a JSON payload is passed as its text"
    );
    assert_eq!(second["priority"], 2);
    assert_eq!(second["delay"], 30);
    assert_eq!(second["cluster"], "default");
    assert_eq!(task["priority"], 1, "the code's default priority applies");
    // Task JSON must not carry schedule keys: IronWorker's Python client tells tasks from
    // schedules by them.
    for key in [
        "start_at",
        "end_at",
        "next_start",
        "last_run_time",
        "run_count",
        "run_every",
    ] {
        assert!(task.get(key).is_none(), "{key}");
    }

    let list = server.get("tasks").await.json();
    let listed: Vec<_> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, [ids[1].clone(), ids[0].clone()], "newest first");
    let page = server.get("tasks?per_page=1&page=1").await.json();
    assert_eq!(page["tasks"][0]["id"], ids[0].as_str());
    let filtered = server.get("tasks?code_name=hello&queued=1").await.json();
    assert_eq!(filtered["tasks"].as_array().unwrap().len(), 2);
    let none = server.get("tasks?complete=1").await.json();
    assert_eq!(none["tasks"], json!([]));
    let future = server.get("tasks?from_time=4102444800").await.json();
    assert_eq!(future["tasks"], json!([]));

    let reply = server
        .post(&format!("tasks/{}/cancel", ids[0]), json!({}))
        .await;
    assert_eq!(reply.json()["msg"], "Cancelled");
    let task = server.get(&format!("tasks/{}", ids[0])).await.json();
    assert_eq!(task["status"], "cancelled");
    assert!(task["end_time"].is_string());
    let reply = server
        .post(&format!("tasks/{}/cancel", ids[0]), json!({}))
        .await;
    assert!(reply.error(409).contains("cancelled"));
    let cancelled = server.get("tasks?cancelled=1").await.json();
    assert_eq!(cancelled["tasks"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn progress_retry_and_logs() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let ids = server
        .queue(json!([{"code_name": "hello", "payload": "p"}]))
        .await;
    let id = &ids[0];

    let reply = server
        .post(
            &format!("tasks/{id}/progress"),
            json!({"percent": 42, "msg": "halfway"}),
        )
        .await;
    assert_eq!(reply.json()["msg"], "Progress set");
    let task = server.get(&format!("tasks/{id}")).await.json();
    assert_eq!(task["percent"], 42);
    assert_eq!(task["msg"], "halfway");
    server
        .post(&format!("tasks/{id}/progress"), json!({"percent": 101}))
        .await
        .error(400);

    // No log yet: 404, as IronWorker's clients expect while a task has not run.
    server.get(&format!("tasks/{id}/log")).await.error(404);

    // A queued task can be retried too, as IronWorker allowed: the copy is queued beside it.
    let reply = server.post(&format!("tasks/{id}/retry"), json!({})).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let copy_id = reply.json()["tasks"][0]["id"].as_str().unwrap().to_owned();
    let copy = server.get(&format!("tasks/{copy_id}")).await.json();
    assert_eq!(
        (copy["status"].as_str(), copy["payload"].as_str()),
        (Some("queued"), Some("p"))
    );
    let original = server.get(&format!("tasks/{id}")).await.json();
    assert_eq!(original["status"], "queued");
    server
        .post(&format!("tasks/{copy_id}/cancel"), json!({}))
        .await;
    server.post(&format!("tasks/{id}/cancel"), json!({})).await;
    let reply = server.post_raw(&format!("tasks/{id}/retry"), "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let retry_id = reply.json()["tasks"][0]["id"].as_str().unwrap().to_owned();
    let retry = server.get(&format!("tasks/{retry_id}")).await.json();
    assert_eq!(retry["status"], "queued");
    assert_eq!(retry["retry_count"], 1);
    assert_eq!(retry["original_task_id"], id.as_str());
    assert_eq!(retry["payload"], "p");
}

#[tokio::test]
async fn webhook_queues_the_raw_body() {
    let server = TestServer::start().await;
    server.image_code("hook", json!({})).await;
    let url = format!(
        "{}?code_name=hook&oauth={}",
        server.url("tasks/webhook"),
        server.token
    );
    let reply = server
        .send(server.http.post(url).body("raw <body> & more"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let task = server.get(&format!("tasks/{id}")).await.json();
    assert_eq!(task["payload"], "raw <body> & more");
    assert_eq!(task["code_name"], "hook");

    let url = format!(
        "{}?code_name=nope&oauth={}",
        server.url("tasks/webhook"),
        server.token
    );
    server
        .send(server.http.post(url).body("x"))
        .await
        .error(404);
}

#[tokio::test]
async fn stacks_and_openapi_are_served() {
    let server = TestServer::start().await;
    let stacks = server
        .send(server.http.get(format!("{}/2/stacks", server.base)))
        .await
        .json();
    let names: Vec<_> = stacks
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_str()
                .expect("IronWorker documents stacks as an array of names")
        })
        .collect();
    assert!(
        names.contains(&"busybox") && names.contains(&"default"),
        "{names:?}"
    );
    let document = server
        .send(server.http.get(format!("{}/openapi.json", server.base)))
        .await
        .json();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let paths = document["paths"].as_object().unwrap();
    for path in [
        "/2/projects/{project_id}/codes",
        "/2/projects/{project_id}/tasks",
        "/2/projects/{project_id}/tasks/{task_id}/log",
        "/2/projects/{project_id}/tasks/{task_id}/log/stream",
        "/2/projects/{project_id}/schedules/{schedule_id}/cancel",
        "/2/projects/{project_id}",
        "/2/stacks",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    let schedule = &paths["/2/projects/{project_id}/schedules/{schedule_id}"];
    assert!(
        schedule["put"].is_object(),
        "PUT schedules/{{id}} is documented"
    );
}

#[tokio::test]
async fn tasks_and_schedules_take_their_codes_timeout_unless_they_name_one() {
    let server = TestServer::start().await;
    server.image_code("short", json!({"timeout": 45})).await;
    let ids = server
        .queue(json!([
            {"code_name": "short", "payload": "{}"},
            {"code_name": "short", "payload": "{}", "timeout": 600},
        ]))
        .await;
    let first = server.get(&format!("tasks/{}", ids[0])).await.json();
    let second = server.get(&format!("tasks/{}", ids[1])).await.json();
    assert_eq!(
        (first["timeout"].as_u64(), second["timeout"].as_u64()),
        (Some(45), Some(600))
    );

    let reply = server
        .post(
            "schedules",
            json!({"schedules": [{"code_name": "short", "payload": "{}", "run_every": 3600}]}),
        )
        .await
        .json();
    let schedule_id = reply["schedules"][0]["id"].as_str().unwrap();
    let schedule = server.get(&format!("schedules/{schedule_id}")).await.json();
    assert_eq!(schedule["timeout"], 45);
}
