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
        owner: None,
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

fn is_iron_id(id: &str) -> bool {
    id.len() == 24 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// IronWorker's Ruby client (`iron_worker_ng` over `iron_core`) refuses any project, code,
/// task or schedule id that is not 24 characters long; stevedore's were 32.
#[tokio::test]
async fn ids_are_24_hex_digits_as_ironworker_made_them() {
    let server = TestServer::start().await;
    let code_id = server.image_code("hello", json!({})).await;
    let task_id = server
        .queue(json!([{"code_name": "hello"}]))
        .await
        .remove(0);
    let schedule = server
        .post(
            "schedules",
            json!({"schedules": [{"code_name": "hello", "run_every": 3600}]}),
        )
        .await
        .json();
    let schedule_id = schedule["schedules"][0]["id"].as_str().unwrap().to_owned();
    let cluster = server
        .send(
            server
                .root(Method::POST, "/2/clusters", &server.token)
                .json(&json!({"name": "ids"})),
        )
        .await
        .json();
    let cluster_id = cluster["id"].as_str().unwrap().to_owned();
    for id in [
        &server.project_id,
        &code_id,
        &task_id,
        &schedule_id,
        &cluster_id,
    ] {
        assert!(is_iron_id(id), "{id:?} is not 24 lowercase hex digits");
    }
    let task = server.get(&format!("tasks/{task_id}")).await.json();
    assert!(is_iron_id(task["code_id"].as_str().unwrap()));
}

/// The `iron` CLI (over iron_go3) queues with `priority: -3`, `timeout: 0`, `delay: 0`,
/// `cluster: ""` and `label: ""` when none is given, registers codes with
/// `default_priority: -1000`, and schedules with `run_times: 0` and `name: ""`: each means
/// "not given". All were refused with 400. Its Go client decodes `code_rev` as a string.
#[tokio::test]
async fn the_iron_cli_not_given_values_mean_the_defaults() {
    let server = TestServer::start().await;
    let code_id = server
        .image_code("cli", json!({"default_priority": 2, "timeout": 120}))
        .await;
    let id = server
        .queue(
            json!([{"code_name": "cli", "payload": "{}", "priority": -3, "timeout": 0,
            "delay": 0, "cluster": "", "label": ""}]),
        )
        .await
        .remove(0);
    let task = server.get(&format!("tasks/{id}")).await.json();
    assert_eq!(
        (&task["priority"], &task["timeout"], &task["code_rev"]),
        (&json!(2), &json!(120), &json!("1"))
    );
    // Above the highest priority is still refused.
    for priority in [3, 7] {
        let reply = server
            .post(
                "tasks",
                json!({"tasks": [{"code_name": "cli", "priority": priority}]}),
            )
            .await;
        assert!(reply.error(400).contains("priority"));
    }

    // `iron worker register` sends default_priority -1000: unset, so an options update keeps
    // the code's and a new code gets 0.
    let reply = server
        .post("codes", json!({"name": "cli", "default_priority": -1000}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let code = server.get(&format!("codes/{code_id}")).await.json();
    assert_eq!(
        (&code["default_priority"], &code["rev"]),
        (&json!(2), &json!(2))
    );
    server
        .image_code("fresh", json!({"default_priority": -1000}))
        .await;
    let fresh = server.get("codes").await.json();
    let fresh = fresh["codes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|code| code["name"] == "fresh")
        .unwrap()
        .clone();
    assert_eq!(fresh["default_priority"], 0);
    let reply = server
        .post(
            "codes",
            json!({"name": "bad", "image": "busybox", "default_priority": 3}),
        )
        .await;
    assert!(reply.error(400).contains("default_priority"));

    let reply = server
        .post(
            "schedules",
            json!({"schedules": [{"code_name": "cli", "name": "", "payload": "{}", "delay": 0,
                "timeout": 0, "run_times": 0, "run_every": 3600, "label": "", "cluster": ""}]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let schedule_id = reply.json()["schedules"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let schedule = server.get(&format!("schedules/{schedule_id}")).await.json();
    assert_eq!(
        (
            &schedule["priority"],
            &schedule["timeout"],
            &schedule["run_times"]
        ),
        (&json!(2), &json!(120), &json!(null))
    );
}

/// `GET tasks?label=` (sent by iron_go3's `FilteredTaskList`) was ignored, listing every
/// task; a parameter the server does not know is refused now rather than ignored.
#[tokio::test]
async fn the_task_list_filters_by_label_and_refuses_unknown_parameters() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let nightly = server
        .queue(json!([{"code_name": "hello", "label": "nightly"}, {"code_name": "hello", "label": "nightly"}]))
        .await;
    server
        .queue(json!([{"code_name": "hello", "label": "hourly"}, {"code_name": "hello"}]))
        .await;
    let listed = server
        .get("tasks?label=nightly&code_name=hello")
        .await
        .json();
    let mut ids: Vec<&str> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut expected: Vec<&str> = nightly.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);

    let reply = server.get("tasks?labels=nightly").await;
    assert!(reply.error(400).contains("labels"));
    let reply = server.get("schedules?status=scheduled").await;
    assert!(reply.error(400).contains("status"));
    // The token as a query parameter is still understood.
    let url = format!(
        "{}?oauth={}&label=hourly",
        server.url("tasks"),
        server.token
    );
    let reply = reqwest::get(url).await.unwrap();
    assert_eq!(reply.status(), 200);
    let listed: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1);
}

/// IronWorker reported a paused code's `max_concurrency` as -1 (the Ruby client's own tests
/// read it so); the server left it unchanged, and used -1 for "no limit".
#[tokio::test]
async fn a_paused_code_reports_max_concurrency_minus_one_and_keeps_its_limit() {
    let server = TestServer::start().await;
    for (name, limit) in [("limited", json!(3)), ("open", json!(null))] {
        let id = server
            .image_code(name, json!({"max_concurrency": limit}))
            .await;
        let code = server.get(&format!("codes/{id}")).await.json();
        assert_eq!(
            (&code["max_concurrency"], &code["concurrency_limit"]),
            (&limit, &limit)
        );
        let reply = server
            .post(&format!("codes/{id}/pause_task_queue"), json!({}))
            .await;
        assert_eq!(reply.json()["msg"], "Paused");
        let paused = server.get(&format!("codes/{id}")).await.json();
        assert_eq!(
            (
                &paused["max_concurrency"],
                &paused["concurrency_limit"],
                &paused["paused"]
            ),
            (&json!(-1), &limit, &json!(true))
        );
        server
            .post(&format!("codes/{id}/resume_task_queue"), json!({}))
            .await;
        let resumed = server.get(&format!("codes/{id}")).await.json();
        assert_eq!(resumed["max_concurrency"], limit);
    }
}

/// A schedule's `delay`, `max_concurrency`, `label` and `timeout` as the clients send them
/// were dropped (`delay`, `max_concurrency`) or not returned, and there was no
/// `PUT schedules/{id}` (the Ruby client's `schedules.update`).
#[tokio::test]
async fn schedules_keep_their_task_settings_and_can_be_updated() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let start_at = (Utc::now() + Duration::hours(1)).to_rfc3339();
    let reply = server
        .post(
            "schedules",
            json!({"schedules": [{"code_name": "hello", "payload": "p", "run_every": 3600,
                "start_at": start_at, "delay": 30, "max_concurrency": 2, "label": "nightly",
                "timeout": 90, "priority": 1}]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let id = reply.json()["schedules"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let schedule = server.get(&format!("schedules/{id}")).await.json();
    assert_eq!(
        (
            &schedule["delay"],
            &schedule["max_concurrency"],
            &schedule["label"],
            &schedule["timeout"],
            &schedule["priority"],
        ),
        (
            &json!(30),
            &json!(2),
            &json!("nightly"),
            &json!(90),
            &json!(1)
        )
    );

    let put = |body: serde_json::Value| {
        let request = server
            .request(Method::PUT, &format!("schedules/{id}"))
            .json(&body);
        server.send(request)
    };
    let reply = put(
        json!({"run_every": 7200, "payload": "q", "max_concurrency": -1,
        "priority": -3}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let updated = reply.json();
    assert_eq!(updated["msg"], "Updated");
    let shown = server.get(&format!("schedules/{id}")).await.json();
    assert_eq!(
        (
            &shown["run_every"],
            &shown["payload"],
            &shown["max_concurrency"],
            &shown["priority"],
            &shown["delay"],
            &shown["label"],
            &shown["start_at"],
        ),
        (
            &json!(7200),
            &json!("q"),
            &json!(null),
            &json!(0),
            &json!(30),
            &json!("nightly"),
            &schedule["start_at"],
        )
    );
    assert_eq!(shown["next_start"], schedule["next_start"]);

    // Bad input is refused and changes nothing.
    for (body, needle) in [
        (json!({"priority": 3}), "priority"),
        (json!({"run_every": 1}), "run_every"),
        (json!({"code_name": "other"}), "code_name"),
        (json!({"timeout": -1}), "timeout"),
        (json!({"colour": "red"}), "colour"),
        (json!({"run_every": 3600, "cron": "* * * * *"}), "cron"),
    ] {
        let reply = put(body).await;
        assert!(reply.error(400).contains(needle), "{needle}");
    }
    assert_eq!(server.get(&format!("schedules/{id}")).await.json(), shown);

    let request = server
        .request(Method::PUT, "schedules/000000000000000000000000")
        .json(&json!({"payload": "x"}));
    server.send(request).await.error(404);
    server
        .post(&format!("schedules/{id}/cancel"), json!({}))
        .await;
    assert!(
        put(json!({"payload": "x"}))
            .await
            .error(409)
            .contains("cancelled")
    );
}

/// `GET /2/projects/{id}` (the Ruby client's `projects.get`, which prints `name` and `id`)
/// was a 404.
#[tokio::test]
async fn the_project_itself_can_be_read() {
    let server = TestServer::start().await;
    let reply = server
        .send(server.root(
            Method::GET,
            &format!("/2/projects/{}", server.project_id),
            &server.token,
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let project = reply.json();
    crate::support::redactions().bind(|| insta::assert_json_snapshot!("project", project));
    assert_eq!(project["id"], server.project_id.as_str());
    assert_eq!(project["name"], "default");
    assert!(project["created_at"].is_string());
    let (other, _) = server.other_project("other").await;
    server
        .send(server.root(Method::GET, &format!("/2/projects/{other}"), &server.token))
        .await
        .error(403);
}

/// Fields the server did not know were dropped without a word. What the official clients send
/// is honoured or accepted as the naming it is (`name`, `sync`, `wait`, Node's `content_type`,
/// Go's `disk_space`); anything else, or what stevedore cannot honour (`host`, `cpu_share`),
/// is a 400 that names it.
#[tokio::test]
async fn fields_the_clients_send_are_honoured_or_refused_by_name() {
    let server = TestServer::start().await;
    server
        .image_code("hello", json!({"content_type": "text/plain", "host": ""}))
        .await;
    for (upload, needle) in [
        (
            json!({"name": "x", "image": "busybox", "host": "x.example"}),
            "host",
        ),
        (
            json!({"name": "x", "image": "busybox", "stak": "node"}),
            "stak",
        ),
    ] {
        let reply = server.post("codes", upload).await;
        assert!(reply.error(400).contains(needle), "{needle}");
    }

    // Python sends name and sync, the Ruby CLI wait, with every task.
    let id = server
        .queue(json!([{"code_name": "hello", "name": "hello", "sync": false, "wait": true}]))
        .await
        .remove(0);
    let reply = server
        .post(
            &format!("tasks/{id}/retry"),
            json!({"delay": 0, "wait": true}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = server
        .post(&format!("tasks/{id}/retry"), json!({"delai": 5}))
        .await;
    assert!(reply.error(400).contains("delai"));
    let reply = server
        .post(
            &format!("tasks/{id}/progress"),
            json!({"percent": 5, "message": "x"}),
        )
        .await;
    assert!(reply.error(400).contains("message"));
    let url = format!(
        "{}?code_name=hello&oauth={}&priorty=1",
        server.url("tasks/webhook"),
        server.token
    );
    let reply = reqwest::Client::new()
        .post(url)
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    assert!(reply.text().await.unwrap().contains("priorty"));

    let create = |body: serde_json::Value| {
        server.send(
            server
                .root(Method::POST, "/2/clusters", &server.token)
                .json(&body),
        )
    };
    let created = create(json!({"name": "go-made", "memory": 1024, "disk_space": 2048})).await;
    assert_eq!(created.status, 200, "{}", created.text());
    assert_eq!(created.json()["cluster"]["disk"], 2048);
    for (body, needle) in [
        (json!({"name": "cpu", "cpu_share": 2}), "cpu_share"),
        (json!({"name": "typo", "runnerz": 2}), "runnerz"),
    ] {
        assert!(create(body).await.error(400).contains(needle), "{needle}");
    }
}
