//! Where the documented IronWorker v2 API and its official clients expect something the
//! server once did differently. Each test names the incompatibility it pins down; the list
//! with symptoms is in tests/compat/IRON_WORKER_PYTHON.md and IRON_WORKER_NODE.md.

use chrono::{Duration, Utc};
use reqwest::Method;
use serde_json::json;
use stevedore_model::TaskOutcome;
use stevedore_store::{LeaseRequest, RunReport};

use crate::support::{TestServer, code_form, zip_of};

/// `outlog` (the clients' `stdout()`, polled by `run()`) of a task that finished without
/// printing was 404 forever, so `run()` waited for output that never came.
#[tokio::test]
async fn outlog_of_a_finished_silent_task_is_empty_text() {
    let server = TestServer::start().await;
    server.image_code("quiet", json!({})).await;
    let id = server
        .queue(json!([{"code_name": "quiet"}]))
        .await
        .remove(0);

    // Not finished, nothing printed yet: 404, which the clients' wait loops retry.
    let reply = server.get(&format!("tasks/{id}/outlog")).await;
    assert!(
        reply.error(404).contains("log"),
        "the Node client retries on /log/"
    );

    server.post(&format!("tasks/{id}/cancel"), json!({})).await;
    let reply = server.get(&format!("tasks/{id}/outlog")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.content_type, "text/plain; charset=utf-8");
    assert!(reply.body.is_empty());

    server
        .get("tasks/000000000000000000000000/outlog")
        .await
        .error(404);
}

/// IronWorker lists revisions with their own `id` and the code's as `code_id`; the server
/// gave every revision the code's id and no `code_id`.
#[tokio::test]
async fn revisions_carry_their_own_id_and_the_code_id() {
    let server = TestServer::start().await;
    let id = server.image_code("hello", json!({})).await;
    server
        .image_code("hello", json!({"command": "echo two"}))
        .await;
    let code = server.get(&format!("codes/{id}")).await.json();
    assert_eq!(code["id"], id.as_str());
    assert_eq!(code["code_id"], id.as_str());
    let revisions = server.get(&format!("codes/{id}/revisions")).await.json();
    let revisions = revisions["revisions"].as_array().unwrap();
    assert_eq!(revisions.len(), 2);
    for revision in revisions {
        assert_eq!(revision["code_id"], id.as_str());
        assert_eq!(
            revision["id"],
            format!("{id}/{}", revision["rev"]),
            "a revision's id is its history id"
        );
    }
}

/// `GET codes/{id}/stats` ignored IronWorker's `start_date`/`end_date` and always counted
/// every task.
#[tokio::test]
async fn code_stats_honour_start_and_end_date() {
    let server = TestServer::start().await;
    let id = server.image_code("hello", json!({})).await;
    server
        .queue(json!([{"code_name": "hello", "delay": 600}, {"code_name": "hello", "delay": 600}]))
        .await;
    let now = Utc::now().timestamp();
    let stats = server
        .get(&format!("codes/{id}/stats?start_date={}", now - 600))
        .await
        .json();
    assert_eq!(stats["queued"], 2);
    let stats = server
        .get(&format!("codes/{id}/stats?start_date={}", now + 600))
        .await
        .json();
    assert_eq!(stats["queued"], 0);
    let stats = server
        .get(&format!("codes/{id}/stats?end_date={}", now - 600))
        .await
        .json();
    assert_eq!(stats["queued"], 0);
    let stats = server
        .get(&format!(
            "codes/{id}/stats?start_date={}&end_date={}",
            now - 600,
            now + 600
        ))
        .await
        .json();
    assert_eq!(stats["queued"], 2);
    let message = server
        .get(&format!("codes/{id}/stats?start_date=yesterday"))
        .await
        .error(400);
    assert!(message.contains("start_date"), "{message}");
    let message = server
        .get(&format!("codes/{id}/stats?end_date=99999999999999999"))
        .await
        .error(400);
    assert!(message.contains("end_date"), "{message}");
}

/// IronWorker documents `GET /stacks` as an array of names; the server sent objects.
#[tokio::test]
async fn stacks_are_a_list_of_names() {
    let server = TestServer::start().await;
    let stacks = server
        .send(server.http.get(format!("{}/2/stacks", server.base)))
        .await
        .json();
    let stacks = stacks.as_array().unwrap();
    assert!(
        stacks.iter().all(serde_json::Value::is_string),
        "{stacks:?}"
    );
    for name in ["busybox", "default", "python-3.11", "node-18", "ruby-3.1"] {
        assert!(
            stacks.contains(&json!(name)),
            "{name} missing from {stacks:?}"
        );
    }
}

/// IronWorker names a download `yourworker_rev.zip`; the server used a dash.
#[tokio::test]
async fn download_is_named_like_ironworker_names_it() {
    let server = TestServer::start().await;
    let zip = zip_of(&[("hello.sh", b"#!/bin/sh\necho hi\n", 0o755)]);
    let data = json!({"name": "my worker", "runtime": "binary", "file_name": "hello.sh"});
    let reply = server
        .send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip))),
        )
        .await;
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let response = server
        .request(Method::GET, &format!("codes/{id}/download"))
        .send()
        .await
        .unwrap();
    let disposition = response.headers()["content-disposition"].to_str().unwrap();
    assert_eq!(disposition, "attachment; filename=\"my_worker_1.zip\"");
}

/// IronWorker documents `run_times` on a task; the server left it out.
#[tokio::test]
async fn a_task_counts_its_runs() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let id = server
        .queue(json!([{"code_name": "hello"}]))
        .await
        .remove(0);
    let task = server.get(&format!("tasks/{id}")).await.json();
    assert_eq!(task["run_times"], 0, "not started yet");
}

/// IronWorker: `POST codes` with a known name and no image, runtime or package updates the
/// code's options ("not required if just updating code options"). The server refused it.
#[tokio::test]
async fn posting_options_alone_updates_an_image_code() {
    let server = TestServer::start().await;
    let id = server
        .image_code(
            "hello",
            json!({"env_vars": {"A": "1"}, "retries": 2, "memory": 64}),
        )
        .await;
    let reply = server
        .post(
            "codes",
            json!({"name": "hello", "max_concurrency": 5, "retries": 4}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["id"], id.as_str());
    let code = server.get(&format!("codes/{id}")).await.json();
    assert_eq!(code["rev"], 2);
    assert_eq!(code["image"], "stevedore/busybox:local");
    assert_eq!(code["command"], "echo hi");
    assert_eq!(code["max_concurrency"], 5);
    assert_eq!(code["retries"], 4);
    assert_eq!(code["memory"], 64, "options not given keep their value");
    assert_eq!(code["env_vars"], json!({"A": "1"}));

    // An unknown name still needs to say what it runs.
    let message = server
        .post("codes", json!({"name": "nobody", "max_concurrency": 5}))
        .await
        .error(400);
    assert!(message.contains("image"), "{message}");
}

#[tokio::test]
async fn posting_options_alone_keeps_a_zip_codes_package() {
    let server = TestServer::start().await;
    let zip = zip_of(&[("hello.sh", b"#!/bin/sh\necho hi\n", 0o755)]);
    let data = json!({"name": "zipped", "runtime": "binary", "file_name": "hello.sh"});
    let reply = server
        .send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip.clone()))),
        )
        .await;
    let id = reply.json()["id"].as_str().unwrap().to_owned();

    // As JSON, and as a multipart `data` part without a `file` part.
    let reply = server
        .post("codes", json!({"name": "zipped", "env_vars": {"B": "2"}}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let form = code_form(json!({"name": "zipped", "timeout": 30}), None);
    let reply = server
        .send(server.request(Method::POST, "codes").multipart(form))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let code = server.get(&format!("codes/{id}")).await.json();
    assert_eq!(code["rev"], 3);
    assert_eq!(code["runtime"], "binary");
    assert_eq!(code["file_name"], "hello.sh");
    assert_eq!(code["env_vars"], json!({"B": "2"}));
    assert_eq!(code["timeout"], 30);
    let download = server.get(&format!("codes/{id}/download")).await;
    assert_eq!(download.body, zip, "the package carries over");

    let message = server
        .post("codes", json!({"name": "zipped", "file_name": "other.sh"}))
        .await
        .error(400);
    assert!(message.contains("file_name"), "{message}");
}

/// Other clients send the multipart parts in another order, the `data` part typed as JSON
/// and the zip as a plain octet stream.
#[tokio::test]
async fn multipart_upload_with_typed_parts_in_any_order() {
    let server = TestServer::start().await;
    let zip = zip_of(&[("run.sh", b"#!/bin/sh\necho hi\n", 0o755)]);
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(zip.clone())
                .file_name("run.zip")
                .mime_str("application/octet-stream")
                .unwrap(),
        )
        .part(
            "data",
            reqwest::multipart::Part::text(
                json!({"name": "typed", "runtime": "sh", "file_name": "run.sh"}).to_string(),
            )
            .mime_str("application/json")
            .unwrap(),
        );
    let reply = server
        .send(server.request(Method::POST, "codes").multipart(form))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(server.get(&format!("codes/{id}/download")).await.body, zip);
}

/// The engine stamps a container's start after its process runs, so a task that exits at
/// once could show a negative `duration` (seen in the real-container tests now and then).
#[tokio::test]
async fn duration_is_never_negative() {
    let server = TestServer::start().await;
    server.image_code("fast", json!({})).await;
    let id = server.queue(json!([{"code_name": "fast"}])).await.remove(0);
    let now = Utc::now();
    let request = LeaseRequest {
        runner_id: "runner".into(),
        clusters: vec!["default".into()],
        max_tasks: 1,
        lease_secs: 60,
    };
    let leased = server.store.lease(&request, now).await.unwrap().remove(0);
    let token = leased.lease.token;
    server
        .store
        .mark_running(&id, token, now, now)
        .await
        .unwrap();
    let report = RunReport {
        start_time: Some(now),
        end_time: Some(now - Duration::milliseconds(3)),
        ..RunReport::default()
    };
    server
        .store
        .complete(
            &id,
            token,
            &TaskOutcome::Exited { exit_code: 0 },
            &report,
            now,
        )
        .await
        .unwrap();
    let task = server.get(&format!("tasks/{id}")).await.json();
    assert_eq!(task["status"], "complete");
    assert_eq!(task["duration"], 0);
    assert_eq!(task["run_times"], 1);
}
