//! A hostile tenant, through the real binary with real containers: project B holds a valid
//! project token and a runner token scoped to its own cluster, and tries to reach project A's
//! tasks, payloads, environment, packages, images, clusters and the operator's metrics. Every
//! attempt is refused with a clear error, and the test asserts on what B actually receives:
//! none of A's secrets, ids it was not given, or work it did not queue.
//!
//! Task networking (a task reaching the host, link-local addresses or another task) has its
//! own real-container test in `network.rs`, and private registry images pulled with one
//! project's credentials in `registry.rs`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::client::Cli;
use crate::support::{
    Api, RunnerProcess, ServerProcess, docker_available, ensure_local_image, run_ok, unique,
};

const A_SECRET: &str = "a-secret-env-value-7f3e";
const A_PAYLOAD: &str = "a-secret-payload-91c2";

/// What the attacker holds: its project, its project token and a runner token for its own
/// cluster `pool`.
struct Attacker {
    project_id: String,
    token: String,
    runner_token: String,
}

/// A request as B makes it, and what B got back.
async fn send(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, String) {
    let mut request = http
        .request(method, url)
        .header("Authorization", format!("OAuth {token}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// Asserts B was refused with `status` and a JSON message naming `naming`, and that nothing of
/// A's came with it.
fn refused(answer: &(StatusCode, String), status: u16, naming: &str, what: &str) {
    let (got, body) = answer;
    assert_eq!(got.as_u16(), status, "{what}: {body}");
    let message: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {body}"));
    let msg = message["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(naming),
        "{what}: {msg:?} should name {naming:?}"
    );
    assert_leaks_nothing(body, what);
}

fn assert_leaks_nothing(text: &str, what: &str) {
    for secret in [A_SECRET, A_PAYLOAD] {
        assert!(!text.contains(secret), "{what} leaked {secret}: {text}");
    }
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|error| panic!("{error}: {out}"))
}

fn data_dir(server: &ServerProcess) -> &str {
    server.data_dir.to_str().unwrap()
}

#[tokio::test]
async fn a_hostile_tenant_reaches_nothing_of_another() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("serve.log");
    let server = ServerProcess::start_logging(
        data.path(),
        &[
            ("STEVEDORE_RUNNER__ENABLED", "false"),
            // Request logs on, to show a token in a query never reaches them.
            (
                "STEVEDORE_LOG",
                "warn,tower_http=debug,stevedore_server=debug",
            ),
        ],
        &log,
    );
    let http = reqwest::Client::new();
    let a = Api::new(&server);
    let a_project = server.iron["project_id"].as_str().unwrap().to_owned();
    let admin = json_of(&run_ok(&[
        "token",
        "create",
        "--role",
        "admin",
        "--data-dir",
        data_dir(&server),
    ]))["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // iron.json holds A's token: readable by its owner only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("iron.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The operator sets up B, and a cluster `pool` each; a shared `big` is the operator's.
    let b = json_of(&run_ok(&[
        "project",
        "create",
        "attacker",
        "--data-dir",
        data_dir(&server),
    ]));
    let b_project = b["id"].as_str().unwrap().to_owned();
    let b_token = b["token"].as_str().unwrap().to_owned();
    let clusters = format!("{}/2/clusters", server.base);
    for token in [&server.token(), &b_token] {
        let (status, body) = send(
            &http,
            Method::POST,
            &clusters,
            token,
            Some(json!({"name": "pool"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = send(
        &http,
        Method::POST,
        &clusters,
        &admin,
        Some(json!({"name": "big"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let runner = json_of(&run_ok(&[
        "token",
        "create",
        "--role",
        "runner",
        "--project",
        &b_project,
        "--cluster",
        "pool",
        "--data-dir",
        data_dir(&server),
    ]));
    assert_eq!(runner["clusters"], json!(["pool"]));
    let attacker = Attacker {
        project_id: b_project,
        token: b_token,
        runner_token: runner["token"].as_str().unwrap().to_owned(),
    };

    // A's secret work: a code with a secret in its environment, a task in A's own `pool`
    // with a secret payload, and an image A built itself.
    a.post(
        "codes",
        json!({"name": "vault", "image": "stevedore/busybox:local", "command": "env",
               "env_vars": {"SECRET": A_SECRET}}),
    )
    .await;
    let a_task = a
        .queue(json!([{"code_name": "vault", "payload": A_PAYLOAD, "cluster": "pool"}]))
        .await
        .remove(0);
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM stevedore/busybox:local\nRUN echo {A_SECRET} > /secret\n"),
    )
    .unwrap();
    let cli = Cli::new(&server);
    cli.json(&[
        "code",
        "push",
        "built",
        "--dockerfile",
        context.path().to_str().unwrap(),
    ]);
    let a_image = a.get("codes").await["codes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|code| code["name"] == "built")
        .map(|code| code["image"].as_str().unwrap().to_owned())
        .unwrap();
    let a_image_id = String::from_utf8(
        std::process::Command::new("docker")
            .args(["image", "inspect", "--format", "{{.Id}}", &a_image])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();

    // B's own work runs on B's remote runner, scoped to B's `pool`.
    let b_codes = format!("{}/2/projects/{}/codes", server.base, attacker.project_id);
    let b_tasks = format!("{}/2/projects/{}/tasks", server.base, attacker.project_id);
    let (status, body) = send(
        &http,
        Method::POST,
        &b_codes,
        &attacker.token,
        Some(
            json!({"name": "probe", "image": "stevedore/busybox:local", "command": "echo probing"}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        &http,
        Method::POST,
        &b_tasks,
        &attacker.token,
        Some(json!({"tasks": [{"code_name": "probe", "cluster": "pool"}]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let b_task = json_of(&body)["tasks"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let runner_id = unique("hostile");
    let _runner = RunnerProcess::start(&server, &attacker.runner_token, &runner_id, &["pool"]);
    let b_task_url = format!("{b_tasks}/{b_task}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = send(&http, Method::GET, &b_task_url, &attacker.token, None).await;
        if json_of(&body)["status"] == "complete" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B's task never ran: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 1. B's runner never got A's task, though both sit in a cluster named `pool`.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let task = a.get(&format!("tasks/{a_task}")).await;
    assert_eq!(task["status"], "queued", "{task}");

    // 2. B's runner token leases from no cluster but B's own.
    let lease = format!("{}/runner/v1/lease", server.base);
    for clusters in [
        json!(["default"]),
        json!(["big"]),
        json!(["pool", "default"]),
    ] {
        let answer = send(
            &http,
            Method::POST,
            &lease,
            &attacker.runner_token,
            Some(json!({"runner_id": "evil", "clusters": clusters, "max_tasks": 10, "lease_secs": 30})),
        )
        .await;
        refused(&answer, 403, "serves only", &format!("lease {clusters}"));
    }
    let (status, body) = send(
        &http,
        Method::POST,
        &lease,
        &attacker.runner_token,
        Some(json!({"runner_id": "evil", "clusters": ["pool"], "max_tasks": 10, "lease_secs": 30})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["tasks"], json!([]), "B leased: {body}");
    assert!(!body.contains(&a_task));

    // 3. Guessing lease tokens for A's task: no write lands, no package comes out.
    for token in [1_i64, 2, 3, 1000, i64::MAX] {
        for (path, body) in [
            ("heartbeat", json!({"token": token, "lease_secs": 30})),
            ("running", json!({"token": token})),
            (
                "complete",
                json!({"token": token, "outcome": {"outcome": "exited", "exit_code": 0}}),
            ),
        ] {
            let url = format!("{}/runner/v1/tasks/{a_task}/{path}", server.base);
            let answer = send(
                &http,
                Method::POST,
                &url,
                &attacker.runner_token,
                Some(body),
            )
            .await;
            refused(&answer, 409, "stale", &format!("{path} with token {token}"));
        }
        let response = http
            .get(format!("{}/runner/v1/tasks/{a_task}/package", server.base))
            .header("Authorization", format!("OAuth {}", attacker.runner_token))
            .header("stevedore-lease-token", token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 409, "package with token {token}");
        assert_leaks_nothing(&response.text().await.unwrap(), "package");
    }
    let task = a.get(&format!("tasks/{a_task}")).await;
    assert_eq!(task["status"], "queued", "{task}");

    // 4. B's project token reads and changes nothing of A's.
    for (method, path) in [
        (Method::GET, format!("tasks/{a_task}")),
        (Method::GET, format!("tasks/{a_task}/log")),
        (Method::GET, "codes".to_owned()),
        (Method::POST, format!("tasks/{a_task}/cancel")),
        (Method::POST, format!("tasks/{a_task}/retry")),
    ] {
        let url = format!("{}/2/projects/{a_project}/{path}", server.base);
        let answer = send(
            &http,
            method.clone(),
            &url,
            &attacker.token,
            Some(json!({})),
        )
        .await;
        refused(&answer, 403, "does not belong", &format!("{method} {path}"));
    }

    // 5. Images: A's built image, by name, by id or by a prefix of its id, is refused to B at
    //    upload, though it is cached on this very engine.
    let short_id = a_image_id.trim_start_matches("sha256:")[..12].to_owned();
    for image in [a_image.clone(), a_image_id.clone(), short_id] {
        let answer = send(
            &http,
            Method::POST,
            &b_codes,
            &attacker.token,
            Some(json!({"name": "thief", "image": image})),
        )
        .await;
        let (status, body) = &answer;
        assert!(
            matches!(status.as_u16(), 400 | 403),
            "B registered A's image {image}: {status} {body}"
        );
        assert!(body.contains("image"), "{body}");
    }

    // 6. Clusters: B takes no shared name, touches no cluster of A's.
    let answer = send(
        &http,
        Method::POST,
        &clusters,
        &attacker.token,
        Some(json!({"name": "big"})),
    )
    .await;
    refused(&answer, 409, "shared", "B taking the operator's name");
    let (_, listed) = send(&http, Method::GET, &clusters, &server.token(), None).await;
    let a_pool = json_of(&listed)["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|cluster| cluster["name"] == "pool")
        .map(|cluster| cluster["id"].as_str().unwrap().to_owned())
        .unwrap();
    for method in [Method::GET, Method::DELETE, Method::PUT] {
        let url = format!("{clusters}/{a_pool}");
        let answer = send(
            &http,
            method.clone(),
            &url,
            &attacker.token,
            Some(json!({"runners": 9})),
        )
        .await;
        refused(&answer, 404, "not found", &format!("{method} A's cluster"));
    }
    // A's own cluster, still used by A's queued task, cannot go either.
    let url = format!("{clusters}/{a_pool}");
    let answer = send(&http, Method::DELETE, &url, &server.token(), None).await;
    refused(&answer, 409, "queued", "deleting a cluster in use");

    // 7. The operator's metrics (every project's names) are not B's to read.
    let answer = send(
        &http,
        Method::GET,
        &format!("{}/metrics", server.base),
        &attacker.token,
        None,
    )
    .await;
    refused(&answer, 403, "admin", "B scraping /metrics");
    let anonymous = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // 8. A token in the query string works, and never reaches the request log.
    let with_query = format!("{b_tasks}?oauth={}", attacker.token);
    let response = http.get(&with_query).send().await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("oauth=redacted"),
        "no request logged:\n{logged}"
    );
    for secret in [&attacker.token, &server.token(), &admin] {
        assert!(!logged.contains(secret.as_str()), "a token reached the log");
    }

    let _ = std::process::Command::new("docker")
        .args(["image", "rm", "-f", &a_image])
        .output();
}
