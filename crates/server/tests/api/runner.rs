//! The runner protocol over real HTTP: lease, heartbeat, log, progress, complete, requeue,
//! package; fencing by the lease token; token roles; the long-poll; cluster routing.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use stevedore_model::{Clock, SystemClock};
use stevedore_server::ServerConfig;
use stevedore_store::{NewToken, TokenRole};

use crate::support::{Reply, TestServer, code_form, zip_of};

struct Runner<'a> {
    server: &'a TestServer,
    token: String,
}

impl<'a> Runner<'a> {
    async fn new(server: &'a TestServer) -> Runner<'a> {
        let token = server.token_of(TokenRole::Runner).await;
        Runner { server, token }
    }

    /// A runner whose token serves only `clusters` (all of them when `None`), and only
    /// `project`'s own clusters when given.
    async fn scoped(
        server: &'a TestServer,
        project: Option<&str>,
        clusters: Option<&[&str]>,
    ) -> Runner<'a> {
        let token = server
            .token(NewToken {
                project_id: project.map(str::to_owned),
                role: TokenRole::Runner,
                clusters: clusters
                    .map(|names| names.iter().map(|name| (*name).to_owned()).collect()),
            })
            .await;
        Runner { server, token }
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.server
            .send(
                self.server
                    .root(Method::POST, &format!("/runner/v1/{path}"), &self.token)
                    .json(&body),
            )
            .await
    }

    async fn lease(&self, clusters: &[&str], max_tasks: u32, wait_ms: u64) -> Vec<Value> {
        let reply = self
            .post(
                "lease",
                json!({"runner_id": "runner-1", "clusters": clusters, "max_tasks": max_tasks,
                       "lease_secs": 30, "wait_ms": wait_ms, "capacity": 4}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()["tasks"].as_array().unwrap().clone()
    }

    /// `GET tasks/{id}/package`, with `token` in the lease token header if there is one.
    async fn package(&self, task_id: &str, token: Option<i64>) -> Reply {
        let mut request = self.server.root(
            Method::GET,
            &format!("/runner/v1/tasks/{task_id}/package"),
            &self.token,
        );
        if let Some(token) = token {
            request = request.header("stevedore-lease-token", token);
        }
        self.server.send(request).await
    }

    async fn log(&self, task_id: &str, token: i64, bytes: &'static [u8]) -> Reply {
        self.server
            .send(
                self.server
                    .root(
                        Method::POST,
                        &format!("/runner/v1/tasks/{task_id}/log"),
                        &self.token,
                    )
                    .header("stevedore-lease-token", token)
                    .header("stevedore-log-cap", 1_000_000)
                    .body(bytes),
            )
            .await
    }
}

fn lease_of(leased: &Value) -> (String, i64) {
    (
        leased["task"]["id"].as_str().unwrap().to_owned(),
        leased["lease_token"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn lease_heartbeat_log_progress_complete() {
    let server = TestServer::start().await;
    let code_id = server.image_code("hello", json!({})).await;
    let ids = server
        .queue(json!([{"code_name": "hello", "payload": "p"}]))
        .await;
    let runner = Runner::new(&server).await;

    let leased = runner.lease(&["default"], 5, 0).await;
    assert_eq!(leased.len(), 1);
    let (task_id, token) = lease_of(&leased[0]);
    assert_eq!(task_id, ids[0]);
    assert_eq!(leased[0]["task"]["status"], "preparing");
    assert_eq!(leased[0]["task"]["payload"], "p");
    assert_eq!(leased[0]["code"]["id"], code_id.as_str());
    assert_eq!(leased[0]["code"]["spec"]["name"], "hello");
    assert!(leased[0]["expires_at"].is_string());
    // Nothing more to lease.
    assert!(runner.lease(&["default"], 5, 0).await.is_empty());

    let reply = runner
        .post(
            &format!("tasks/{task_id}/heartbeat"),
            json!({"token": token, "lease_secs": 30}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["cancel_requested"], false);
    assert!(reply.json()["expires_at"].is_string());

    let reply = runner
        .post(&format!("tasks/{task_id}/running"), json!({"token": token}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        server.get(&format!("tasks/{task_id}")).await.json()["status"],
        "running"
    );

    // Log bytes go raw, byte for byte, invalid UTF-8 included.
    let reply = runner.log(&task_id, token, b"hello\n\xff\xfe raw\n").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["size"], 13);
    let reply = runner.log(&task_id, token, b"more\n").await;
    assert_eq!(reply.json()["size"], 18);

    let reply = runner
        .post(
            &format!("tasks/{task_id}/progress"),
            json!({"token": token, "percent": 40, "msg": "halfway"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let task = server.get(&format!("tasks/{task_id}")).await.json();
    assert_eq!(
        (task["percent"].clone(), task["msg"].clone()),
        (json!(40), json!("halfway"))
    );

    let reply = runner
        .post(
            &format!("tasks/{task_id}/complete"),
            json!({"token": token, "outcome": {"outcome": "exited", "exit_code": 0},
                   "report": {"peak_memory_bytes": 1024, "cpu_time_ms": 5}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let task = server.get(&format!("tasks/{task_id}")).await.json();
    assert_eq!(task["status"], "complete");
    assert_eq!(task["exit_code"], 0);
    assert_eq!(task["peak_memory_bytes"], 1024);
    assert_eq!(task["log_size"], 18);
    let log = server.get(&format!("tasks/{task_id}/log")).await;
    assert_eq!(log.body, b"hello\n\xff\xfe raw\nmore\n");

    // A second completion is refused: the result is recorded once.
    let msg = runner
        .post(
            &format!("tasks/{task_id}/complete"),
            json!({"token": token, "outcome": {"outcome": "exited", "exit_code": 1}}),
        )
        .await
        .error(409);
    assert!(msg.contains("stale"), "{msg}");
    assert_eq!(
        server.get(&format!("tasks/{task_id}")).await.json()["exit_code"],
        0
    );
}

#[tokio::test]
async fn a_rescued_tasks_old_token_is_refused_with_409() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    server.queue(json!([{"code_name": "hello"}])).await;
    let runner = Runner::new(&server).await;
    let reply = runner
        .post(
            "lease",
            json!({"runner_id": "dies", "clusters": ["default"], "max_tasks": 1, "lease_secs": 1}),
        )
        .await;
    let (task_id, old) = lease_of(&reply.json()["tasks"][0]);

    // The lease expires; the rescuer gives the task back; another lease takes it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rescued = server
        .store
        .rescue_expired(SystemClock.now(), 5)
        .await
        .unwrap();
    let rescued: Vec<&str> = rescued.iter().map(|task| task.task_id.as_str()).collect();
    assert_eq!(rescued, vec![task_id.as_str()]);
    let leased = runner.lease(&["default"], 1, 0).await;
    let (again, new) = lease_of(&leased[0]);
    assert_eq!(again, task_id);
    assert_ne!(new, old);

    for (action, body) in [
        ("heartbeat", json!({"token": old, "lease_secs": 30})),
        ("running", json!({"token": old})),
        ("progress", json!({"token": old, "percent": 1})),
        (
            "requeue",
            json!({"token": old, "reason": "x", "delay_ms": 0, "max_infra_attempts": 5}),
        ),
        (
            "complete",
            json!({"token": old, "outcome": {"outcome": "exited", "exit_code": 0}}),
        ),
    ] {
        runner
            .post(&format!("tasks/{task_id}/{action}"), body)
            .await
            .error(409);
    }
    runner.log(&task_id, old, b"late\n").await.error(409);

    // The new lease's holder goes on; a requeue puts the task back in the queue.
    let reply = runner
        .post(
            &format!("tasks/{task_id}/requeue"),
            json!({"token": new, "reason": "engine went away", "delay_ms": 0, "max_infra_attempts": 5}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let task = server.get(&format!("tasks/{task_id}")).await.json();
    assert_eq!(task["status"], "queued");
    assert_eq!(task["infra_attempts"], 2);
    assert_eq!(task["msg"], "engine went away");
}

#[tokio::test]
async fn only_runner_and_admin_tokens_use_the_runner_protocol() {
    let server = TestServer::start().await;
    let runner_token = server.token_of(TokenRole::Runner).await;
    let admin_token = server.token_of(TokenRole::Admin).await;
    let lease =
        json!({"runner_id": "r", "clusters": ["default"], "max_tasks": 1, "lease_secs": 30});

    let reply = server
        .send(
            server
                .http
                .post(format!("{}/runner/v1/lease", server.base))
                .json(&lease),
        )
        .await;
    reply.error(401);
    server
        .send(
            server
                .root(Method::POST, "/runner/v1/lease", "not-a-token")
                .json(&lease),
        )
        .await
        .error(401);
    let msg = server
        .send(
            server
                .root(Method::POST, "/runner/v1/lease", &server.token)
                .json(&lease),
        )
        .await
        .error(403);
    assert!(msg.contains("runner token"), "{msg}");
    for token in [&runner_token, &admin_token] {
        let reply = server
            .send(
                server
                    .root(Method::POST, "/runner/v1/lease", token)
                    .json(&lease),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    // A runner token may do nothing else.
    let project_tasks = format!("/2/projects/{}/tasks", server.project_id);
    for path in [project_tasks.as_str(), "/2/clusters"] {
        server
            .send(server.root(Method::GET, path, &runner_token))
            .await
            .error(403);
    }
    let package = "/runner/v1/tasks/x/package";
    server
        .send(
            server
                .root(Method::GET, package, &server.token)
                .header("stevedore-lease-token", 1),
        )
        .await
        .error(403);
    server
        .send(
            server
                .root(Method::GET, package, &runner_token)
                .header("stevedore-lease-token", 1),
        )
        .await
        .error(404);
}

#[tokio::test]
async fn a_package_goes_only_to_the_runner_holding_its_tasks_lease() {
    let server = TestServer::start().await;
    let upload = |zip: Vec<u8>| {
        let data = json!({"name": "zipped", "runtime": "binary", "file_name": "hello.sh"});
        server.send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip))),
        )
    };
    let pinned = zip_of(&[("hello.sh", b"#!/bin/sh\necho first\n", 0o755)]);
    let reply = upload(pinned.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let code_id = reply.json()["id"].as_str().unwrap().to_owned();
    server.queue(json!([{"code_name": "zipped"}])).await;
    // A later revision changes nothing for the queued task: it runs the revision it pinned.
    let reply = upload(zip_of(&[("hello.sh", b"#!/bin/sh\necho second\n", 0o755)])).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let holder = Runner::new(&server).await;
    let leased = holder.lease(&["default"], 1, 0).await;
    let (task_id, token) = lease_of(&leased[0]);
    let reply = holder.package(&task_id, Some(token)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.content_type, "application/zip");
    assert_eq!(reply.body, pinned);

    // A wrong token is a stale lease; an unknown task is not found.
    let msg = holder.package(&task_id, Some(token + 1)).await.error(409);
    assert!(msg.contains("stale"), "{msg}");
    holder.package("nope", Some(token)).await.error(404);

    // Another runner's token, without the lease's, gets nothing: it must send a token, and a
    // guessed one is refused.
    let other = Runner::new(&server).await;
    let msg = other.package(&task_id, None).await.error(400);
    assert!(msg.contains("stevedore-lease-token"), "{msg}");
    for guess in (token - 3..=token + 3).filter(|guess| *guess != token) {
        other.package(&task_id, Some(guess)).await.error(409);
    }

    // Once the task is finished, its last lease opens nothing either.
    let reply = holder
        .post(
            &format!("tasks/{task_id}/complete"),
            json!({"token": token, "outcome": {"outcome": "cancelled"}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    holder.package(&task_id, Some(token)).await.error(409);

    // The download by code id and revision is gone.
    let old = format!(
        "/runner/v1/codes/{code_id}/revisions/1/package?project_id={}",
        server.project_id
    );
    server
        .send(server.root(Method::GET, &old, &holder.token))
        .await
        .error(404);
}

#[tokio::test]
async fn bad_runner_requests_are_400() {
    let server = TestServer::start().await;
    let runner = Runner::new(&server).await;
    for (body, naming) in [
        (
            json!({"runner_id": "r", "clusters": [], "max_tasks": 1, "lease_secs": 30}),
            "clusters",
        ),
        (
            json!({"runner_id": "r", "clusters": ["default"], "max_tasks": 1, "lease_secs": 0}),
            "lease_secs",
        ),
        (
            json!({"runner_id": "", "clusters": ["default"], "max_tasks": 1, "lease_secs": 30}),
            "runner_id",
        ),
        (
            json!({"runner_id": "r", "clusters": ["default"], "max_tasks": 100000, "lease_secs": 30}),
            "max_tasks",
        ),
        (json!({"clusters": ["default"]}), "runner_id"),
    ] {
        let msg = runner.post("lease", body).await.error(400);
        assert!(msg.contains(naming), "{msg}");
    }
    let reply = server
        .send(
            server
                .root(Method::POST, "/runner/v1/tasks/x/log", &runner.token)
                .body("bytes"),
        )
        .await;
    assert!(reply.error(400).contains("stevedore-lease-token"));
    let msg = runner
        .post("tasks/x/progress", json!({"token": 1, "percent": 101}))
        .await
        .error(400);
    assert!(msg.contains("percent"), "{msg}");
    // A requeue delay over a day is refused (the embedded runner gets the same answer from
    // the lease desk), as are zero infrastructure attempts, before the task is looked at.
    for (body, naming) in [
        (
            json!({"token": 1, "reason": "x", "delay_ms": 86_400_001u64, "max_infra_attempts": 5}),
            "delay",
        ),
        (
            json!({"token": 1, "reason": "x", "delay_ms": u64::MAX, "max_infra_attempts": 5}),
            "delay",
        ),
        (
            json!({"token": 1, "reason": "x", "delay_ms": 0, "max_infra_attempts": 0}),
            "max_infra_attempts",
        ),
    ] {
        let msg = runner.post("tasks/x/requeue", body).await.error(400);
        assert!(msg.contains(naming), "{msg}");
    }
    // A lease's length is checked on every heartbeat too, before the task is looked at.
    let msg = runner
        .post("tasks/nope/heartbeat", json!({"token": 1, "lease_secs": 0}))
        .await
        .error(400);
    assert!(msg.contains("lease_secs"), "{msg}");
    // An unknown task is not found.
    runner
        .post(
            "tasks/nope/heartbeat",
            json!({"token": 1, "lease_secs": 30}),
        )
        .await
        .error(404);
}

#[tokio::test]
async fn a_waiting_lease_wakes_when_a_task_is_queued() {
    let mut config = ServerConfig::default();
    // Far longer than the test: only the wake-up can end the wait in time.
    config.runner_api.poll_interval = Duration::from_secs(60);
    let server = TestServer::start_with(config).await;
    server.image_code("hello", json!({})).await;
    let runner = Runner::new(&server).await;

    // With nothing to do, the request is held for wait_ms and answers empty.
    let started = Instant::now();
    assert!(runner.lease(&["default"], 1, 300).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));

    let started = Instant::now();
    let (leased, queued_at) = tokio::join!(runner.lease(&["default"], 1, 20_000), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.queue(json!([{"code_name": "hello"}])).await;
        Instant::now()
    });
    assert_eq!(leased.len(), 1);
    let woke_after = started.elapsed();
    assert!(woke_after >= Duration::from_millis(500));
    assert!(
        woke_after < Duration::from_secs(5),
        "woke {:?} after the queue",
        Instant::now() - queued_at
    );
}

#[tokio::test]
async fn a_cluster_task_is_leased_only_by_its_clusters_runners() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let reply = server
        .send(
            server
                .root(Method::POST, "/2/clusters", &server.token)
                .json(&json!({"name": "gpu"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let ids = server
        .queue(json!([{"code_name": "hello", "cluster": "gpu"}, {"code_name": "hello"}]))
        .await;
    let runner = Runner::new(&server).await;
    let plain = runner.lease(&["default"], 10, 0).await;
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0]["task"]["id"], ids[1].as_str());
    assert!(runner.lease(&["default", "arm"], 10, 0).await.is_empty());
    // The project's own cluster is not the operator's: an operator runner serving a `gpu`
    // gets nothing of it; the project's own runner token does.
    assert!(runner.lease(&["gpu"], 10, 0).await.is_empty());
    let own = Runner::scoped(&server, Some(&server.project_id), Some(&["gpu"])).await;
    let gpu = own.lease(&["gpu"], 10, 0).await;
    assert_eq!(gpu.len(), 1);
    assert_eq!(gpu[0]["task"]["id"], ids[0].as_str());
    assert_eq!(gpu[0]["task"]["cluster"], "gpu");

    // A scoped token is refused (403, naming the cluster) for any cluster outside its scope.
    for (scoped, clusters) in [
        (&own, &["default"][..]),
        (&own, &["gpu", "default"][..]),
        (
            &Runner::scoped(&server, None, Some(&["arm"])).await,
            &["gpu"][..],
        ),
    ] {
        let body =
            json!({"runner_id": "r", "clusters": clusters, "max_tasks": 1, "lease_secs": 30});
        let msg = scoped.post("lease", body).await.error(403);
        assert!(msg.contains("default") || msg.contains("gpu"), "{msg}");
    }
    // A project's runner token serves only clusters that project owns now.
    let (other_id, _) = server.other_project("squatter").await;
    let theirs = Runner::scoped(&server, Some(&other_id), None).await;
    let body = json!({"runner_id": "r", "clusters": ["gpu"], "max_tasks": 1, "lease_secs": 30});
    assert!(theirs.post("lease", body).await.error(403).contains("gpu"));

    // A cluster that does not exist (or is another project's) is refused when queueing.
    let msg = server
        .post(
            "tasks",
            json!({"tasks": [{"code_name": "hello", "cluster": "nope"}]}),
        )
        .await
        .error(400);
    assert!(msg.contains("nope"), "{msg}");
    let (_, other_token) = server.other_project("other").await;
    let other = server
        .send(server.root(Method::GET, "/2/clusters", &other_token))
        .await;
    assert_eq!(
        other.json()["clusters"].as_array().unwrap().len(),
        1,
        "only default"
    );
}

#[tokio::test]
async fn a_restarted_runner_gives_back_what_its_id_held_and_bad_releases_are_400() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    server
        .queue(json!([{"code_name": "hello"}, {"code_name": "hello"}]))
        .await;
    let runner = Runner::new(&server).await;
    let leased = runner.lease(&["default"], 2, 0).await;
    assert_eq!(leased.len(), 2);

    // A project's runner token gives back only its project's tasks: none of these.
    let other = server
        .store
        .create_project("other", SystemClock.now())
        .await
        .unwrap();
    let theirs = Runner::scoped(&server, Some(&other.id), None).await;
    let reply = theirs
        .post("runners/runner-1/release", json!({"max_infra_attempts": 5}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["released"], 0);

    let reply = runner
        .post("runners/runner-1/release", json!({"max_infra_attempts": 5}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["released"], 2);
    for leased in &leased {
        let (task_id, token) = lease_of(leased);
        let task = server.get(&format!("tasks/{task_id}")).await.json();
        assert_eq!(task["status"], "queued", "{task}");
        assert_eq!(task["infra_attempts"], 1, "{task}");
        runner
            .post(
                &format!("tasks/{task_id}/heartbeat"),
                json!({"token": token, "lease_secs": 30}),
            )
            .await
            .error(409);
    }
    runner
        .post("runners/runner-1/release", json!({"max_infra_attempts": 0}))
        .await
        .error(400);
    runner
        .post("runners/runner-1/release", json!({}))
        .await
        .error(400);
    runner
        .post("runners/%20/release", json!({"max_infra_attempts": 5}))
        .await
        .error(400);
}

#[tokio::test]
async fn runners_long_unseen_without_live_leases_are_reported_gone_and_bad_questions_are_400() {
    let server = TestServer::start().await;
    let now = SystemClock.now();
    let seen = |id: &str| stevedore_store::RunnerSeen {
        id: id.to_owned(),
        clusters: vec!["default".to_owned()],
        capacity: 2,
        owner: None,
    };
    server
        .store
        .record_runner(&seen("r-old"), now - chrono::Duration::minutes(5))
        .await
        .unwrap();
    let runner = Runner::new(&server).await;
    // Seen now: it asked for work.
    runner.lease(&["default"], 1, 0).await;

    let ask = json!({"runner_ids": ["r-old", "runner-1", "r-never-seen"]});
    let reply = runner.post("runners/gone", ask.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["gone"], json!(["r-old"]));

    // A project's runner token is answered about that project's runners only.
    let other = server
        .store
        .create_project("other", SystemClock.now())
        .await
        .unwrap();
    let theirs = Runner::scoped(&server, Some(&other.id), None).await;
    let reply = theirs.post("runners/gone", ask).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["gone"], json!([]));

    let too_many: Vec<String> = (0..1001).map(|n| format!("r-{n}")).collect();
    let msg = runner
        .post("runners/gone", json!({ "runner_ids": too_many }))
        .await
        .error(400);
    assert!(msg.contains("at most 1000"), "{msg}");
    runner
        .post("runners/gone", json!({"runner_ids": [" "]}))
        .await
        .error(400);
    runner.post("runners/gone", json!({})).await.error(400);
}
