use reqwest::Method;
use serde_json::json;

use crate::support::TestServer;

#[tokio::test]
async fn requests_without_a_valid_token_are_refused() {
    let server = TestServer::start().await;
    let reply = server.send(server.http.get(server.url("tasks"))).await;
    assert!(reply.error(401).contains("Authorization: OAuth"));
    let reply = server
        .send(
            server
                .http
                .get(server.url("tasks"))
                .header("Authorization", "OAuth not-a-token"),
        )
        .await;
    assert_eq!(reply.error(401), "invalid token");
}

#[tokio::test]
async fn bearer_and_query_tokens_work_too() {
    let server = TestServer::start().await;
    let reply = server
        .send(
            server
                .http
                .get(server.url("codes"))
                .header("Authorization", format!("Bearer {}", server.token)),
        )
        .await;
    assert_eq!(reply.status, 200);
    let reply = server
        .send(
            server
                .http
                .get(format!("{}?oauth={}", server.url("codes"), server.token)),
        )
        .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_project_token_never_sees_another_project() {
    let server = TestServer::start().await;
    server.image_code("mine", json!({})).await;
    let ids = server
        .queue(json!([{"code_name": "mine", "payload": "secret", "delay": 60}]))
        .await;
    let (other_id, other_token) = server.other_project("other").await;

    // The other project's token on our project's path is refused.
    let reply = server
        .send(
            server
                .http
                .get(server.url("tasks"))
                .header("Authorization", format!("OAuth {other_token}")),
        )
        .await;
    assert!(reply.error(403).contains("does not belong"));

    // On its own path, our task does not exist.
    let other_url = |path: &str| format!("{}/2/projects/{other_id}/{path}", server.base);
    let as_other = |method: Method, path: &str| {
        server
            .http
            .request(method, other_url(path))
            .header("Authorization", format!("OAuth {other_token}"))
    };
    let reply = server
        .send(as_other(Method::GET, &format!("tasks/{}", ids[0])))
        .await;
    reply.error(404);
    let reply = server
        .send(as_other(Method::POST, &format!("tasks/{}/cancel", ids[0])))
        .await;
    reply.error(404);
    let reply = server.send(as_other(Method::GET, "tasks")).await;
    assert_eq!(reply.json()["tasks"], json!([]));
    let reply = server.send(as_other(Method::GET, "codes")).await;
    assert_eq!(reply.json()["codes"], json!([]));
    // Queueing our code by name from the other project finds nothing.
    let reply = server
        .send(as_other(Method::POST, "tasks").json(&json!({"tasks": [{"code_name": "mine"}]})))
        .await;
    reply.error(404);

    // Our task is untouched.
    let task = server.get(&format!("tasks/{}", ids[0])).await.json();
    assert_eq!(task["status"], "queued");
}
