//! Runtimes and stacks: `GET /2/stacks`, and how an upload's `runtime` and `stack` are
//! resolved and stored on the revision.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{TestServer, code_form, zip_of};

async fn upload(server: &TestServer, data: Value) -> crate::support::Reply {
    let zip = zip_of(&[("main", b"x", 0o755)]);
    server
        .send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip))),
        )
        .await
}

/// The stack a zip code's latest revision was resolved to, with its runtime.
async fn resolved(server: &TestServer, data: Value) -> (String, String) {
    let reply = upload(server, data.clone()).await;
    assert_eq!(reply.status, 200, "{data}: {}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let code = server.get(&format!("codes/{id}")).await.json();
    (
        code["runtime"].as_str().unwrap().to_owned(),
        code["stack"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn stacks_are_listed_with_details_on_request() {
    let server = TestServer::start().await;
    let names = server
        .send(server.http.get(format!("{}/2/stacks", server.base)))
        .await
        .json();
    assert!(names.as_array().unwrap().iter().all(Value::is_string));
    let details = server
        .send(
            server
                .http
                .get(format!("{}/2/stacks?details=true", server.base)),
        )
        .await
        .json();
    let python = details
        .as_array()
        .unwrap()
        .iter()
        .find(|stack| stack["name"] == "python-3.11")
        .unwrap()
        .clone();
    assert_eq!(
        python,
        json!({
            "name": "python-3.11",
            "aliases": ["python", "python3"],
            "runtimes": ["python", "sh", "binary"],
            "image": "python:3.11-slim",
        })
    );
    let default = details
        .as_array()
        .unwrap()
        .iter()
        .find(|stack| stack["name"] == "default")
        .unwrap();
    for runtime in ["sh", "python", "node", "ruby", "php", "java"] {
        assert!(
            default["runtimes"]
                .as_array()
                .unwrap()
                .contains(&json!(runtime)),
            "{runtime}"
        );
    }
}

#[tokio::test]
async fn uploads_resolve_their_stack_once_and_store_it() {
    let server = TestServer::start().await;
    for (data, runtime, stack) in [
        // The official Node and Ruby clients: `sh` and no stack.
        (json!({"runtime": "sh"}), "sh", "default"),
        (json!({"runtime": "binary"}), "binary", "busybox"),
        (json!({"runtime": "python"}), "python", "python-3.11"),
        (json!({"runtime": "java"}), "java", "java-17"),
        // Aliases and IronWorker's old names.
        (
            json!({"runtime": "sh", "stack": "ruby-2.1"}),
            "sh",
            "ruby-3.1",
        ),
        (
            json!({"runtime": "ruby", "stack": "ruby"}),
            "ruby",
            "ruby-3.1",
        ),
        (
            json!({"runtime": "node", "stack": "node-0.10"}),
            "node",
            "node-18",
        ),
        (
            json!({"runtime": "python", "stack": "python-3.5"}),
            "python",
            "python-3.11",
        ),
        (
            json!({"runtime": "php", "stack": "php-5.4"}),
            "php",
            "php-8.2",
        ),
        (
            json!({"runtime": "java", "stack": "java-1.7"}),
            "java",
            "java-17",
        ),
        (json!({"runtime": "go", "stack": "go-1.4"}), "go", "go-1.19"),
        // A stack alone brings its language's runtime.
        (json!({"stack": "node"}), "node", "node-18"),
    ] {
        let mut data = data;
        data["name"] = json!("resolved");
        data["file_name"] = json!("main");
        let got = resolved(&server, data.clone()).await;
        assert_eq!(got, (runtime.to_owned(), stack.to_owned()), "{data}");
    }
    // An options update keeps what the code runs on.
    let reply = server
        .post("codes", json!({"name": "resolved", "retries": 2}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let codes = server.get("codes").await.json();
    let code = &codes["codes"][0];
    assert_eq!(
        (code["runtime"].as_str(), code["stack"].as_str()),
        (Some("node"), Some("node-18"))
    );
}

#[tokio::test]
async fn pairs_that_cannot_work_and_python_2_are_refused_with_the_stacks() {
    let server = TestServer::start().await;
    for (data, needles) in [
        (
            json!({"runtime": "php", "stack": "python-3.11"}),
            &["php", "python-3.11", "php-8.2"][..],
        ),
        (
            json!({"runtime": "python", "stack": "python-2.7"}),
            &["Python 2", "python-3.11"][..],
        ),
        (
            json!({"runtime": "sh", "stack": "cobol-85"}),
            &["cobol-85", "node-18"][..],
        ),
        (json!({"runtime": "fortran"}), &["fortran", "python"][..]),
    ] {
        let mut data = data;
        data["name"] = json!("refused");
        data["file_name"] = json!("main");
        let message = upload(&server, data.clone()).await.error(400);
        for needle in needles {
            assert!(message.contains(needle), "{data}: {message}");
        }
    }
    // Nothing was stored.
    server.get("codes").await.json()["codes"]
        .as_array()
        .unwrap()
        .iter()
        .for_each(|code| assert_ne!(code["name"], "refused"));
}
