//! Quotas over HTTP: an admin sets a project's own limits, each quota refuses with its status
//! (429 for what frees itself, 403 for what the project must remove) and a message naming the
//! quota, its limit and the use, and nothing is stored; `GET /2/projects/{id}` shows them.

use reqwest::Method;
use serde_json::{Value, json};
use stevedore_store::TokenRole;

use crate::support::{TestServer, code_form, zip_of};

async fn set_quotas(server: &TestServer, admin: &str, quotas: Value) -> Value {
    let reply = server
        .send(
            server
                .root(
                    Method::PUT,
                    &format!("/2/projects/{}/quotas", server.project_id),
                    admin,
                )
                .json(&quotas),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

#[tokio::test]
async fn each_quota_is_refused_with_its_status_and_message_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let admin = server.token_of(TokenRole::Admin).await;
    server.image_code("hello", json!({})).await;
    set_quotas(
        &server,
        &admin,
        json!({"queued_tasks": 2, "codes": 2, "schedules": 1, "revisions_per_code": 2,
               "package_bytes": 2000, "log_streams_per_token": 1}),
    )
    .await;

    // Queued tasks: 429, the whole batch refused.
    let msg = server
        .post("tasks", json!({"tasks": [{"code_name": "hello"}, {"code_name": "hello"}, {"code_name": "hello"}]}))
        .await
        .error(429);
    assert_eq!(
        msg,
        "quota exceeded: queued_tasks 0 of 2; wait for tasks to run, or cancel some, or ask \
         the operator to raise it"
    );
    let listed = server.get("tasks").await.json();
    assert_eq!(listed["tasks"], json!([]), "nothing of the batch");
    server.queue(json!([{"code_name": "hello"}])).await;
    let msg = server
        .post(
            "tasks",
            json!({"tasks": [{"code_name": "hello"}, {"code_name": "hello"}]}),
        )
        .await
        .error(429);
    assert!(msg.contains("queued_tasks 1 of 2"), "{msg}");

    // Schedules: 403.
    let schedule = json!({"schedules": [{"code_name": "hello", "run_every": 3600}]});
    server.post("schedules", schedule.clone()).await.json();
    let msg = server.post("schedules", schedule).await.error(403);
    assert!(msg.contains("quota exceeded: schedules 1 of 1"), "{msg}");
    let schedules = server.get("schedules").await.json();
    assert_eq!(schedules["schedules"].as_array().unwrap().len(), 1);

    // Revisions of one code: 403.
    server.image_code("hello", json!({})).await;
    let msg = server
        .post(
            "codes",
            json!({"name": "hello", "image": "stevedore/busybox:local"}),
        )
        .await
        .error(403);
    assert!(msg.contains("revisions_per_code 2 of 2"), "{msg}");

    // Package bytes: 403, for a zip that alone is within the package size limit.
    let data = json!({"name": "zipped", "runtime": "binary", "file_name": "run.sh"});
    let noise: Vec<u8> = (0u64..3000).map(|i| (i * 7919 % 251) as u8).collect();
    let msg = server
        .send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip_of(&[("run.sh", &noise, 0o755)])))),
        )
        .await
        .error(403);
    assert!(msg.contains("package_bytes 0 of 2000"), "{msg}");

    // Codes: 403.
    server.image_code("second", json!({})).await;
    let msg = server
        .post(
            "codes",
            json!({"name": "third", "image": "stevedore/busybox:local"}),
        )
        .await
        .error(403);
    assert!(msg.contains("quota exceeded: codes 2 of 2"), "{msg}");
    let codes = server.get("codes").await.json();
    assert_eq!(codes["codes"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn live_log_streams_are_capped_per_token_and_freed_when_they_end() {
    let server = TestServer::start().await;
    let admin = server.token_of(TokenRole::Admin).await;
    server.image_code("hello", json!({})).await;
    set_quotas(&server, &admin, json!({"log_streams_per_token": 1})).await;
    // No runner: the task stays queued and its stream stays open.
    let task = server
        .queue(json!([{"code_name": "hello"}]))
        .await
        .remove(0);
    let open = || {
        server
            .request(Method::GET, &format!("tasks/{task}/log/stream"))
            .send()
    };
    let first = open().await.unwrap();
    assert_eq!(first.status(), 200);
    let refused = server
        .get(&format!("tasks/{task}/log?follow=true"))
        .await
        .error(429);
    assert!(
        refused.contains("quota exceeded: log_streams_per_token 1 of 1"),
        "{refused}"
    );
    let project = server
        .send(server.root(
            Method::GET,
            &format!("/2/projects/{}", server.project_id),
            &server.token,
        ))
        .await
        .json();
    assert_eq!(project["quotas"]["log_streams_per_token"]["used"], 1);

    // Another token of the project has streams of its own.
    let other = server
        .token(stevedore_store::NewToken {
            project_id: Some(server.project_id.clone()),
            role: TokenRole::Project,
            clusters: None,
        })
        .await;
    let second = server
        .root(
            Method::GET,
            &format!("/2/projects/{}/tasks/{task}/log/stream", server.project_id),
            &other,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);

    // A closed stream gives its place back.
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        let reply = open().await.unwrap();
        if reply.status() == 200 {
            reopened = Some(reply);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        reopened.is_some(),
        "the stream's place was never given back"
    );
}

#[tokio::test]
async fn the_project_shows_its_quotas_and_only_an_admin_sets_them() {
    let server = TestServer::start().await;
    let admin = server.token_of(TokenRole::Admin).await;
    server.image_code("hello", json!({})).await;
    server.image_code("hello", json!({})).await;
    server
        .queue(json!([{"code_name": "hello"}, {"code_name": "hello"}]))
        .await;
    let path = format!("/2/projects/{}", server.project_id);
    let project = server
        .send(server.root(Method::GET, &path, &server.token))
        .await
        .json();
    let quotas = &project["quotas"];
    assert_eq!(
        quotas["queued_tasks"],
        json!({"limit": 100_000, "used": 2, "own_limit": false})
    );
    assert_eq!(quotas["codes"]["used"], 1);
    assert_eq!(quotas["revisions_per_code"]["used"], 2);
    assert_eq!(quotas["schedules"]["used"], 0);

    // A project token may read its quotas, not set them.
    let quotas_path = format!("{path}/quotas");
    let msg = server
        .send(
            server
                .root(Method::PUT, &quotas_path, &server.token)
                .json(&json!({"codes": 5})),
        )
        .await
        .error(403);
    assert!(msg.contains("admin"), "{msg}");
    let msg = server
        .send(
            server
                .root(Method::PUT, &quotas_path, &admin)
                .json(&json!({"codes": 5, "tasks": 3})),
        )
        .await
        .error(400);
    assert!(msg.contains("\"tasks\" is not a quota"), "{msg}");
    assert_eq!(
        server
            .send(server.root(Method::GET, &path, &server.token))
            .await
            .json()["quotas"]["codes"]["limit"],
        1000,
        "a refused update changes nothing"
    );

    let updated = set_quotas(&server, &admin, json!({"codes": 5, "queued_tasks": 1})).await;
    assert_eq!(
        updated["quotas"]["codes"],
        json!({"limit": 5, "used": 1, "own_limit": true})
    );
    // A limit below the use removes nothing and refuses more.
    assert_eq!(updated["quotas"]["queued_tasks"]["used"], 2);
    server
        .post("tasks", json!({"tasks": [{"code_name": "hello"}]}))
        .await
        .error(429);
    let reset = set_quotas(&server, &admin, json!({"codes": null})).await;
    assert_eq!(
        reset["quotas"]["codes"],
        json!({"limit": 1000, "used": 1, "own_limit": false})
    );
}

/// The same enforcement on PostgreSQL, where two servers could race: a batch over the limit
/// is refused whole.
#[tokio::test]
async fn queued_tasks_quota_on_postgres() {
    let Some(server) = TestServer::start_on_postgres().await else {
        return;
    };
    let admin = server.token_of(TokenRole::Admin).await;
    server.image_code("hello", json!({})).await;
    set_quotas(&server, &admin, json!({"queued_tasks": 1})).await;
    server.queue(json!([{"code_name": "hello"}])).await;
    let msg = server
        .post("tasks", json!({"tasks": [{"code_name": "hello"}]}))
        .await
        .error(429);
    assert!(msg.contains("queued_tasks 1 of 1"), "{msg}");
}
