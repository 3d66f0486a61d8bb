//! A project's registry credentials: stored as `iron docker login` sends them, checked, kept
//! apart per project, never answered with their password, and handed only to the lease of the
//! project's own task whose image lies in that registry.

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};
use stevedore_store::TokenRole;

use crate::support::{Reply, TestServer};

/// Every test here against a server on SQLite and on PostgreSQL.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use crate::support::TestServer;
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(TestServer::start().await).await;
                }
            )*
        }
        mod postgres {
            use crate::support::TestServer;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(server) = TestServer::start_on_postgres().await else {
                        return;
                    };
                    super::$name(server).await;
                }
            )*
        }
    };
}

on_both_stores!(
    iron_docker_login_stores_credentials_that_are_listed_without_their_password,
    bad_logins_get_a_clear_400_that_repeats_no_secret_and_store_nothing,
    projects_never_see_or_touch_each_others_credentials,
    a_lease_carries_the_credential_only_to_the_projects_task_in_that_registry,
    a_code_cannot_name_another_projects_built_image,
);

const PASSWORD: &str = "s3cret-Passw0rd";

/// The body `iron docker login -u alice -p ... -e ... -url ...` posts.
fn iron_login(server_address: &str) -> Value {
    let inner = json!({"email": "alice@example.com", "username": "alice",
                       "password": PASSWORD, "serveraddress": server_address});
    json!({"auth": base64::engine::general_purpose::STANDARD.encode(inner.to_string())})
}

fn assert_no_password(reply: &Reply) {
    assert!(
        !reply.text().contains(PASSWORD),
        "the password came back: {}",
        reply.text()
    );
}

async fn iron_docker_login_stores_credentials_that_are_listed_without_their_password(
    server: TestServer,
) {
    let reply = server
        .post("credentials", iron_login("https://127.0.0.1:5000/v2/"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_no_password(&reply);
    let stored = reply.json();
    assert_eq!(stored["msg"], "127.0.0.1:5000 as alice");
    assert_eq!(stored["registry"], "127.0.0.1:5000");
    assert_eq!(stored["username"], "alice");

    // The same fields directly, for Docker Hub (no server address).
    let reply = server
        .post(
            "credentials",
            json!({"username": "bob", "password": PASSWORD}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["registry"], "docker.io");

    let reply = server.get("credentials").await;
    assert_eq!(reply.status, 200);
    assert_no_password(&reply);
    let listed = reply.json();
    let listed = listed["credentials"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["registry"], "127.0.0.1:5000");
    assert_eq!(listed[0]["username"], "alice");
    assert_eq!(listed[1]["registry"], "docker.io");
    assert_eq!(
        listed[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["created_at", "registry", "updated_at", "username"]
    );

    // At rest the password is sealed: the row holds no trace of it.
    let row = server
        .store
        .get_registry_credential(&server.project_id, "127.0.0.1:5000")
        .await
        .unwrap()
        .unwrap();
    assert!(
        !row.sealed
            .bytes
            .windows(PASSWORD.len())
            .any(|window| window == PASSWORD.as_bytes())
    );

    // Logging out forgets them; a second time there is nothing to forget.
    let delete = |registry: &str| {
        server.send(server.request(Method::DELETE, &format!("credentials/{registry}")))
    };
    assert_eq!(delete("127.0.0.1:5000").await.status, 200);
    delete("127.0.0.1:5000").await.error(404);
    let reply = server.get("credentials").await;
    assert_eq!(reply.json()["credentials"].as_array().unwrap().len(), 1);
}

async fn bad_logins_get_a_clear_400_that_repeats_no_secret_and_store_nothing(server: TestServer) {
    let encoded =
        |value: Value| base64::engine::general_purpose::STANDARD.encode(value.to_string());
    let cases = [
        (json!({"username": "alice"}), "password"),
        (json!({"password": PASSWORD}), "username"),
        (json!({"username": "  ", "password": PASSWORD}), "username"),
        (
            json!({"username": "alice", "password": 12345678}),
            "password must be a string",
        ),
        (
            json!({"username": PASSWORD, "password": ["x"]}),
            "password must be a string",
        ),
        (
            json!({"username": "alice", "password": PASSWORD, "serveraddress": "not a host"}),
            "serveraddress",
        ),
        (json!({"auth": "%%% not base64 %%%"}), "base64"),
        (
            json!({"auth": encoded(json!(["alice", PASSWORD]))}),
            "JSON object",
        ),
        (json!({"auth": 7}), "auth"),
        (
            json!({"auth": encoded(json!({"username": "a", "password": "b"})), "username": "x"}),
            "either",
        ),
        (json!([1, 2]), "JSON object"),
    ];
    for (body, naming) in cases {
        let reply = server.post("credentials", body.clone()).await;
        let msg = reply.error(400);
        assert!(
            msg.contains(naming),
            "{body}: {msg:?} should name {naming:?}"
        );
        assert!(!msg.contains(PASSWORD), "{body}: {msg:?}");
        assert!(!msg.contains("12345678"), "{body}: {msg:?}");
    }
    let reply = server.post_raw("credentials", "{not json").await;
    reply.error(400);
    let listed = server.get("credentials").await.json();
    assert_eq!(listed["credentials"], json!([]));
}

async fn projects_never_see_or_touch_each_others_credentials(server: TestServer) {
    assert_eq!(
        server
            .post("credentials", iron_login("127.0.0.1:5000"))
            .await
            .status,
        200
    );
    let (other_id, other_token) = server.other_project("other").await;
    let as_other = |method: Method, path: &str| {
        server
            .http
            .request(
                method,
                format!("{}/2/projects/{other_id}/{path}", server.base),
            )
            .header("Authorization", format!("OAuth {other_token}"))
    };
    let reply = server.send(as_other(Method::GET, "credentials")).await;
    assert_eq!(reply.json()["credentials"], json!([]));
    server
        .send(as_other(Method::DELETE, "credentials/127.0.0.1:5000"))
        .await
        .error(404);
    // The other project's token on our project's path is refused.
    server
        .send(
            server
                .http
                .get(server.url("credentials"))
                .header("Authorization", format!("OAuth {other_token}")),
        )
        .await
        .error(403);
    // Ours are still there.
    let listed = server.get("credentials").await.json();
    assert_eq!(listed["credentials"].as_array().unwrap().len(), 1);
}

async fn a_lease_carries_the_credential_only_to_the_projects_task_in_that_registry(
    server: TestServer,
) {
    assert_eq!(
        server
            .post("credentials", iron_login("127.0.0.1:5000"))
            .await
            .status,
        200
    );
    server
        .image_code("private", json!({"image": "127.0.0.1:5000/team/app:1"}))
        .await;
    server.image_code("public", json!({})).await;
    let mine = server
        .queue(json!([{"code_name": "private"}, {"code_name": "public"}]))
        .await;
    // Another project naming the same image has no credential for it.
    let (other_id, other_token) = server.other_project("other").await;
    let upload = server
        .send(
            server
                .http
                .post(format!("{}/2/projects/{other_id}/codes", server.base))
                .header("Authorization", format!("OAuth {other_token}"))
                .json(&json!({"name": "borrowed", "image": "127.0.0.1:5000/team/app:1"})),
        )
        .await;
    assert_eq!(upload.status, 200, "{}", upload.text());
    let queued = server
        .send(
            server
                .http
                .post(format!("{}/2/projects/{other_id}/tasks", server.base))
                .header("Authorization", format!("OAuth {other_token}"))
                .json(&json!({"tasks": [{"code_name": "borrowed"}]})),
        )
        .await;
    assert_eq!(queued.status, 200, "{}", queued.text());
    let theirs = queued.json()["tasks"][0]["id"].as_str().unwrap().to_owned();

    let runner_token = server.token_of(TokenRole::Runner).await;
    let reply = server
        .send(
            server
                .root(Method::POST, "/runner/v1/lease", &runner_token)
                .json(
                    &json!({"runner_id": "r1", "clusters": ["default"], "max_tasks": 10,
                              "lease_secs": 30}),
                ),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let leased = reply.json()["tasks"].as_array().unwrap().clone();
    assert_eq!(leased.len(), 3);
    let credential_of = |task_id: &str| {
        leased
            .iter()
            .find(|task| task["task"]["id"] == task_id)
            .map(|task| task["registry_credential"].clone())
            .unwrap()
    };
    assert_eq!(
        credential_of(&mine[0]),
        json!({"registry": "127.0.0.1:5000", "username": "alice", "password": PASSWORD})
    );
    assert_eq!(credential_of(&mine[1]), Value::Null);
    assert_eq!(credential_of(&theirs), Value::Null);
}

async fn a_code_cannot_name_another_projects_built_image(server: TestServer) {
    let (other_id, _) = server.other_project("other").await;
    let reply = server
        .post(
            "codes",
            json!({"name": "borrowed", "image": format!("stevedore-code/{other_id}/hello:1")}),
        )
        .await;
    assert!(reply.error(400).contains("another project"));
    let own = format!("stevedore-code/{}/hello:1", server.project_id);
    let reply = server
        .post("codes", json!({"name": "own", "image": own}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let listed = server.get("codes").await.json();
    assert_eq!(listed["codes"].as_array().unwrap().len(), 1, "{listed}");
}
