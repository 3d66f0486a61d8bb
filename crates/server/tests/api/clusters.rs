//! `/2/clusters`: IronWorker's cluster API, mapped to pools of runners.

use reqwest::Method;
use serde_json::{Value, json};
use stevedore_store::{NewToken, TokenRole};

use crate::support::{Reply, TestServer, redactions};

async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Reply {
    let mut request = server.root(method, &format!("/2/clusters{path}"), token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    server.send(request).await
}

#[tokio::test]
async fn clusters_crud_and_stats() {
    let server = TestServer::start().await;
    let token = server.token.clone();

    let list = call(&server, Method::GET, "", &token, None).await;
    assert_eq!(list.status, 200);
    insta::assert_json_snapshot!("only_default", list.json());

    // IronWorker's clients send `cluster` for the name; unknown fields are refused by name.
    let refused = call(
        &server,
        Method::POST,
        "",
        &token,
        Some(json!({"cluster": "gpu", "type": "whatever"})),
    )
    .await;
    assert!(refused.error(400).contains("type"));
    let created = call(
        &server,
        Method::POST,
        "",
        &token,
        Some(json!({"cluster": "gpu", "memory": 4096, "disk": 20480, "runners": 2})),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text());
    let created = created.json();
    redactions().bind(|| insta::assert_json_snapshot!("created", created));
    let id = created["id"].as_str().unwrap().to_owned();

    let shown = call(&server, Method::GET, &format!("/{id}"), &token, None).await;
    assert_eq!(shown.json()["cluster"], created["cluster"]);
    let default = call(&server, Method::GET, "/default", &token, None).await;
    assert_eq!(default.json()["cluster"]["shared"], true);

    let updated = call(
        &server,
        Method::PUT,
        &format!("/{id}"),
        &token,
        Some(json!({"runners": 5})),
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let updated = updated.json();
    assert_eq!(updated["cluster"]["runners"], 5);
    assert_eq!(
        updated["cluster"]["memory"], 4096,
        "unnamed fields are kept"
    );
    assert_eq!(updated["cluster"]["name"], "gpu");

    let list = call(&server, Method::GET, "", &token, None).await.json();
    let names: Vec<&str> = list["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cluster| cluster["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "gpu"]);

    // Stats: tasks of the cluster, and the runners that asked for its work.
    server.image_code("hello", json!({})).await;
    server
        .queue(json!([{"code_name": "hello", "cluster": "gpu"}, {"code_name": "hello", "cluster": "gpu"}]))
        .await;
    // The project's own cluster is served by a runner token of the project's.
    let runner_token = server
        .token(NewToken {
            project_id: Some(server.project_id.clone()),
            role: TokenRole::Runner,
            clusters: Some(vec!["gpu".into()]),
        })
        .await;
    let reply = server
        .send(server.root(Method::POST, "/runner/v1/lease", &runner_token).json(&json!(
            {"runner_id": "gpu-box", "clusters": ["gpu"], "max_tasks": 1, "lease_secs": 30, "capacity": 3}
        )))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let stats = call(&server, Method::GET, &format!("/{id}/stats"), &token, None).await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    let mut settings = redactions();
    settings.add_redaction(".runners[].last_seen", "[last_seen]");
    settings.bind(|| insta::assert_json_snapshot!("stats", stats.json()));

    // A cluster in use keeps its name and cannot be deleted.
    call(
        &server,
        Method::PUT,
        &format!("/{id}"),
        &token,
        Some(json!({"name": "gpu2"})),
    )
    .await
    .error(409);
    call(&server, Method::DELETE, &format!("/{id}"), &token, None)
        .await
        .error(409);
    let listed = server.get("tasks").await.json();
    for task in listed["tasks"].as_array().unwrap() {
        let id = task["id"].as_str().unwrap();
        if task["status"] == "queued" {
            server.post(&format!("tasks/{id}/cancel"), json!({})).await;
        } else {
            server
                .store
                .rescue_expired(chrono::Utc::now() + chrono::Duration::hours(1), 1)
                .await
                .unwrap();
        }
    }
    let deleted = call(&server, Method::DELETE, &format!("/{id}"), &token, None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(deleted.json(), json!({"msg": "Cluster deleted"}));
    // A retry is a queueing like any other: into a cluster that is gone, it is refused.
    let finished = listed["tasks"][0]["id"].as_str().unwrap();
    let msg = server
        .post(&format!("tasks/{finished}/retry"), json!({}))
        .await
        .error(400);
    assert!(msg.contains("gpu"), "{msg}");
    call(&server, Method::GET, &format!("/{id}"), &token, None)
        .await
        .error(404);
}

#[tokio::test]
async fn clusters_belong_to_their_project() {
    let server = TestServer::start().await;
    let (_, other) = server.other_project("other").await;
    let admin = server.token_of(TokenRole::Admin).await;
    let mine = call(
        &server,
        Method::POST,
        "",
        &server.token,
        Some(json!({"name": "mine"})),
    )
    .await
    .json();
    let mine_id = mine["id"].as_str().unwrap();
    assert_eq!(mine["cluster"]["project_id"], server.project_id.as_str());

    // Another project neither sees nor changes it, nor queues onto it. Names are scoped: its
    // own cluster of the same name is another cluster.
    call(&server, Method::GET, &format!("/{mine_id}"), &other, None)
        .await
        .error(404);
    call(
        &server,
        Method::DELETE,
        &format!("/{mine_id}"),
        &other,
        None,
    )
    .await
    .error(404);
    let theirs = call(
        &server,
        Method::POST,
        "",
        &other,
        Some(json!({"name": "mine"})),
    )
    .await
    .json();
    assert_ne!(theirs["id"], mine["id"]);
    call(
        &server,
        Method::POST,
        "",
        &server.token,
        Some(json!({"name": "mine"})),
    )
    .await
    .error(409);

    // An admin's cluster is shared: everyone sees it, only an admin changes it.
    let shared = call(
        &server,
        Method::POST,
        "",
        &admin,
        Some(json!({"name": "big"})),
    )
    .await
    .json();
    let shared_id = shared["id"].as_str().unwrap();
    assert_eq!(shared["cluster"]["shared"], true);
    let seen = call(&server, Method::GET, &format!("/{shared_id}"), &other, None).await;
    assert_eq!(seen.status, 200);
    call(
        &server,
        Method::PUT,
        &format!("/{shared_id}"),
        &other,
        Some(json!({"runners": 1})),
    )
    .await
    .error(403);
    let changed = call(
        &server,
        Method::PUT,
        &format!("/{shared_id}"),
        &admin,
        Some(json!({"runners": 1})),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    // A shared name is the operator's: no project's cluster takes it, by creation or rename;
    // the operator may still create a shared cluster of a name projects use.
    let refused = call(
        &server,
        Method::POST,
        "",
        &other,
        Some(json!({"name": "big"})),
    )
    .await
    .error(409);
    assert!(refused.contains("shared"), "{refused}");
    let refused = call(
        &server,
        Method::PUT,
        &format!("/{mine_id}"),
        &server.token,
        Some(json!({"name": "big"})),
    )
    .await
    .error(409);
    assert!(refused.contains("shared"), "{refused}");
    let operators = call(
        &server,
        Method::POST,
        "",
        &admin,
        Some(json!({"name": "mine"})),
    )
    .await;
    assert_eq!(operators.status, 200, "{}", operators.text());

    // The built-in cluster is not to be changed.
    call(&server, Method::DELETE, "/default", &server.token, None)
        .await
        .error(409);
    call(
        &server,
        Method::PUT,
        "/default",
        &admin,
        Some(json!({"runners": 1})),
    )
    .await
    .error(409);
}

#[tokio::test]
async fn bad_cluster_input_is_400() {
    let server = TestServer::start().await;
    let token = server.token.clone();
    for (body, naming) in [
        (json!({}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": "default"}), "built-in"),
        (json!({"name": "x", "memory": -1}), "memory"),
        (
            json!({"name": "x", "runners": 5_000_000_000_i64}),
            "runners",
        ),
    ] {
        let msg = call(&server, Method::POST, "", &token, Some(body.clone()))
            .await
            .error(400);
        assert!(msg.contains(naming), "{body}: {msg}");
    }
    let reply = server
        .send(
            server
                .root(Method::POST, "/2/clusters", &token)
                .header("Content-Type", "application/json")
                .body("{not json"),
        )
        .await;
    reply.error(400);
    server
        .send(server.http.get(format!("{}/2/clusters", server.base)))
        .await
        .error(401);
}

/// A project mints runner tokens for its own clusters, for runners of its own: such a token
/// leases that project's tasks of that cluster and nothing else. Nobody mints one for a cluster
/// that is not theirs; an admin mints one for a shared cluster.
#[tokio::test]
async fn runner_tokens_are_minted_per_cluster_by_its_owner() {
    let server = TestServer::start().await;
    let (_, other) = server.other_project("other").await;
    let admin = server.token_of(TokenRole::Admin).await;
    server.image_code("hello", json!({})).await;
    let pool = call(
        &server,
        Method::POST,
        "",
        &server.token,
        Some(json!({"name": "pool"})),
    )
    .await
    .json();
    let pool_id = pool["id"].as_str().unwrap();
    let ids = server
        .queue(json!([{"code_name": "hello", "cluster": "pool"}, {"code_name": "hello"}]))
        .await;

    let minted = call(
        &server,
        Method::POST,
        &format!("/{pool_id}/runner_tokens"),
        &server.token,
        None,
    )
    .await;
    assert_eq!(minted.status, 200, "{}", minted.text());
    let minted = minted.json();
    assert_eq!(minted["cluster"], "pool");
    assert_eq!(minted["project_id"], server.project_id.as_str());
    let runner_token = minted["token"].as_str().unwrap();
    let lease = |clusters: Value| {
        server.send(server.root(Method::POST, "/runner/v1/lease", runner_token).json(
            &json!({"runner_id": "own-box", "clusters": clusters, "max_tasks": 10, "lease_secs": 30}),
        ))
    };
    assert!(lease(json!(["default"])).await.error(403).contains("pool"));
    let leased = lease(json!(["pool"])).await.json();
    let leased: Vec<&str> = leased["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["task"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(leased, [ids[0].as_str()]);

    // Not for another project's cluster (it does not see it), nor a project for a shared one.
    call(
        &server,
        Method::POST,
        &format!("/{pool_id}/runner_tokens"),
        &other,
        None,
    )
    .await
    .error(404);
    let big = call(
        &server,
        Method::POST,
        "",
        &admin,
        Some(json!({"name": "big"})),
    )
    .await
    .json();
    let big_id = big["id"].as_str().unwrap();
    call(
        &server,
        Method::POST,
        &format!("/{big_id}/runner_tokens"),
        &server.token,
        None,
    )
    .await
    .error(403);
    let shared = call(
        &server,
        Method::POST,
        &format!("/{big_id}/runner_tokens"),
        &admin,
        None,
    )
    .await;
    assert_eq!(shared.status, 200, "{}", shared.text());
    assert_eq!(shared.json().get("project_id"), None);
    call(
        &server,
        Method::POST,
        "/default/runner_tokens",
        &admin,
        None,
    )
    .await
    .error(409);
}
