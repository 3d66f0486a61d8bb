//! `GET /metrics` of `serve` and of `stevedore runner --metrics-listen`: real tasks in real
//! containers, then the scraped exposition parsed as Prometheus would parse it.

use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::{Value, json};

use crate::support::{
    Api, RunnerProcess, ServerProcess, docker_available, ensure_local_image, run_ok, runner_token,
    unique,
};

/// The exposition at `url`, parsed; asserts the answer is Prometheus text.
async fn scrape(http: &reqwest::Client, url: &str) -> Scrape {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "text/plain; version=0.0.4");
    parse(&response.text().await.unwrap())
}

/// Parses an exposition. prometheus-parse 0.2 reads a sample's labels up to the first `}`,
/// so it would silently drop every sample whose label value holds a brace, as route
/// templates do (`/2/projects/{project_id}/tasks`, which Prometheus itself reads fine).
/// Braces inside quoted values become `<` and `>` first, so those samples are checked too.
fn parse(text: &str) -> Scrape {
    let lines = text.lines().map(|line| {
        let mut quoted = false;
        let mut escaped = false;
        let rewritten: String = line
            .chars()
            .map(|c| {
                let out = match c {
                    '{' if quoted => '<',
                    '}' if quoted => '>',
                    _ => c,
                };
                if c == '"' && !escaped {
                    quoted = !quoted;
                }
                escaped = c == '\\' && !escaped;
                out
            })
            .collect();
        Ok(rewritten)
    });
    Scrape::parse(lines).unwrap()
}

/// The samples of `name` whose labels include every one of `labels`.
fn samples<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .collect()
}

/// The one value of a counter or gauge; panics when there is not exactly one.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(scrape, name, labels);
    assert_eq!(
        found.len(),
        1,
        "{name} {labels:?} among {:?}",
        samples(scrape, name, &[])
    );
    match &found[0].value {
        Metric::Counter(value) | Metric::Gauge(value) | Metric::Untyped(value) => *value,
        other => panic!("{name} is not a counter or gauge: {other:?}"),
    }
}

/// How many observations a histogram holds.
fn observations(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(scrape, name, labels);
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    match &found[0].value {
        Metric::Histogram(buckets) => buckets
            .iter()
            .find(|bucket| bucket.less_than == f64::INFINITY)
            .map_or(0.0, |bucket| bucket.count),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

/// A free port on loopback: taken by the OS, then handed over to a listener of the test's.
fn free_address() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// Scrapes until `ready` holds (background work such as container removal lands a moment
/// after a task finished), or panics after 30 s.
async fn scrape_until(
    http: &reqwest::Client,
    url: &str,
    ready: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scraped = scrape(http, url).await;
        if ready(&scraped) {
            return scraped;
        }
        assert!(
            Instant::now() < deadline,
            "metrics at {url} never got there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn removals(scrape: &Scrape) -> f64 {
    samples(
        scrape,
        "stevedore_container_operation_duration_seconds",
        &[("operation", "remove")],
    )
    .first()
    .map_or(0.0, |_| {
        observations(
            scrape,
            "stevedore_container_operation_duration_seconds",
            &[("operation", "remove")],
        )
    })
}

async fn push_codes(api: &Api<'_>) {
    api.post(
        "codes",
        json!({"name": "says-hello", "image": "stevedore/busybox:local",
               "command": "echo hello from the task"}),
    )
    .await;
    api.post(
        "codes",
        json!({"name": "fails", "image": "stevedore/busybox:local",
               "command": "echo about to fail; exit 3"}),
    )
    .await;
}

async fn run_one_of_each(api: &Api<'_>) {
    let ids = api
        .queue(json!([{"code_name": "says-hello"}, {"code_name": "fails"}]))
        .await;
    let done = api.wait_finished(&ids[0], Duration::from_secs(60)).await;
    assert_eq!(done["status"], "complete", "{done}");
    let failed = api.wait_finished(&ids[1], Duration::from_secs(60)).await;
    assert_eq!(failed["status"], "error", "{failed}");
}

#[tokio::test]
async fn serve_exports_tasks_containers_queues_and_requests() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    // Scraped without a token on an address of its own, as an operator's Prometheus would be.
    let metrics_address = free_address();
    let server = ServerProcess::start_running(
        data.path(),
        &unique("metrics"),
        &[
            ("STEVEDORE_RUNNER__CAPACITY", "3"),
            ("STEVEDORE_METRICS__LISTEN", &metrics_address),
        ],
    );
    let api = Api::new(&server);
    push_codes(&api).await;
    run_one_of_each(&api).await;
    let http = reqwest::Client::new();
    let nowhere = http
        .get(format!("{}/no/such/path", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);

    let url = format!("http://{metrics_address}/metrics");
    let metrics = scrape_until(&http, &url, |scraped| removals(scraped) >= 2.0).await;

    let finished = "stevedore_tasks_finished_total";
    assert_eq!(
        value(
            &metrics,
            finished,
            &[("status", "complete"), ("code", "says-hello")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            finished,
            &[("status", "error"), ("code", "fails")]
        ),
        1.0
    );
    assert_eq!(samples(&metrics, finished, &[]).len(), 2);

    let operations = "stevedore_container_operation_duration_seconds";
    for operation in ["ensure_image", "create", "start", "remove"] {
        assert_eq!(
            observations(&metrics, operations, &[("operation", operation)]),
            2.0,
            "{operation}"
        );
    }
    assert!(samples(&metrics, "stevedore_engine_errors_total", &[]).is_empty());
    assert!(
        value(&metrics, "stevedore_log_bytes_total", &[]) >= "hello from the task\n".len() as f64
    );

    for priority in ["0", "1", "2"] {
        assert_eq!(
            value(&metrics, "stevedore_queue_depth", &[("priority", priority)]),
            0.0
        );
    }
    for status in ["queued", "preparing", "running"] {
        assert_eq!(
            value(&metrics, "stevedore_tasks", &[("status", status)]),
            0.0
        );
    }
    assert!(observations(&metrics, "stevedore_lease_duration_seconds", &[]) >= 1.0);
    assert_eq!(
        observations(&metrics, "stevedore_queue_wait_seconds", &[]),
        2.0
    );
    assert_eq!(value(&metrics, "stevedore_runner_capacity", &[]), 3.0);
    assert_eq!(value(&metrics, "stevedore_runner_busy", &[]), 0.0);
    // The embedded runner serves the default cluster like a runner leasing over HTTP.
    assert_eq!(
        value(
            &metrics,
            "stevedore_cluster_runners",
            &[("cluster", "default")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "stevedore_cluster_capacity",
            &[("cluster", "default")]
        ),
        3.0
    );

    let requests = "stevedore_http_requests_total";
    assert_eq!(
        value(
            &metrics,
            requests,
            &[
                ("method", "POST"),
                ("route", "/2/projects/<project_id>/tasks"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert!(
        value(
            &metrics,
            requests,
            &[
                ("method", "GET"),
                ("route", "/2/projects/<project_id>/tasks/<task_id>"),
                ("status", "200")
            ]
        ) >= 2.0
    );
    assert_eq!(
        value(
            &metrics,
            requests,
            &[("method", "GET"), ("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    assert!(
        observations(
            &metrics,
            "stevedore_http_request_duration_seconds",
            &[
                ("method", "POST"),
                ("route", "/2/projects/<project_id>/tasks")
            ]
        ) >= 1.0
    );
    // No label carries an id.
    let project_id = server.iron["project_id"].as_str().unwrap();
    assert!(
        metrics
            .samples
            .iter()
            .all(|sample| !format!("{:?}", sample.labels).contains(project_id))
    );
}

/// On the API's address, `/metrics` names every project's codes and clusters: by default only
/// an admin token reads it.
#[tokio::test]
async fn metrics_on_the_api_address_need_an_admin_token() {
    let data = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start_with_env(data.path(), &[("STEVEDORE_RUNNER__ENABLED", "false")]);
    let http = reqwest::Client::new();
    let url = format!("{}/metrics", server.base);
    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert!(body["msg"].as_str().unwrap().contains("token"), "{body}");

    let project = http
        .get(&url)
        .header("Authorization", format!("OAuth {}", server.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(project.status(), 403);
    let body: Value = project.json().await.unwrap();
    assert!(body["msg"].as_str().unwrap().contains("admin"), "{body}");

    let created: Value = serde_json::from_str(&run_ok(&[
        "token",
        "create",
        "--role",
        "admin",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]))
    .unwrap();
    let admin = http
        .get(&url)
        .header(
            "Authorization",
            format!("OAuth {}", created["token"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    let scraped = parse(&admin.text().await.unwrap());
    assert_eq!(
        value(&scraped, "stevedore_tasks", &[("status", "queued")]),
        0.0
    );
}

#[tokio::test]
async fn a_remote_runner_serves_its_own_metrics() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    // The operator opened the API's `/metrics` to anyone who reaches it.
    let server = ServerProcess::start_with_env(
        data.path(),
        &[
            ("STEVEDORE_RUNNER__ENABLED", "false"),
            ("STEVEDORE_METRICS__TOKEN_REQUIRED", "false"),
        ],
    );
    let token = runner_token(data.path());
    let api = Api::new(&server);
    push_codes(&api).await;

    let address = free_address();
    let _runner = RunnerProcess::start_with_args(
        &server,
        &token,
        &unique("remote-metrics"),
        &[],
        3,
        &["--metrics-listen", &address],
    );
    run_one_of_each(&api).await;

    let http = reqwest::Client::new();
    let runner_url = format!("http://{address}/metrics");
    let runner = scrape_until(&http, &runner_url, |scraped| removals(scraped) >= 2.0).await;
    assert_eq!(value(&runner, "stevedore_runner_capacity", &[]), 2.0);
    assert_eq!(value(&runner, "stevedore_runner_busy", &[]), 0.0);
    assert!(value(&runner, "stevedore_log_bytes_total", &[]) > 0.0);
    assert_eq!(
        observations(
            &runner,
            "stevedore_container_operation_duration_seconds",
            &[("operation", "create")]
        ),
        2.0
    );
    // What the store records is the server's to count, not the remote runner's.
    assert!(samples(&runner, "stevedore_tasks_finished_total", &[]).is_empty());
    assert!(samples(&runner, "stevedore_tasks", &[]).is_empty());

    let server_metrics = scrape(&http, &format!("{}/metrics", server.base)).await;
    assert_eq!(
        value(
            &server_metrics,
            "stevedore_tasks_finished_total",
            &[("status", "complete"), ("code", "says-hello")]
        ),
        1.0
    );
    assert!(value(&server_metrics, "stevedore_runner_api_log_bytes_total", &[]) > 0.0);
    assert!(observations(&server_metrics, "stevedore_queue_wait_seconds", &[]) >= 2.0);
    for (gauge, expected) in [
        ("stevedore_cluster_runners", 1.0),
        ("stevedore_cluster_capacity", 2.0),
        ("stevedore_cluster_busy", 0.0),
    ] {
        assert_eq!(
            value(&server_metrics, gauge, &[("cluster", "default")]),
            expected,
            "{gauge}"
        );
    }
}

/// Tasks that no runner completes are counted as finished too: queued ones that `cancel_all`
/// and code deletion cancel, and leased ones the rescuer ends once their runner went silent.
#[tokio::test]
async fn tasks_ended_by_cancel_all_code_deletion_and_the_rescuer_are_counted() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(
        data.path(),
        &[
            ("STEVEDORE_RUNNER__ENABLED", "false"),
            ("STEVEDORE_RUNNER__MAX_INFRA_ATTEMPTS", "1"),
            ("STEVEDORE_METRICS__TOKEN_REQUIRED", "false"),
        ],
    );
    let api = Api::new(&server);
    let mut code_ids = Vec::new();
    for name in ["cancelled-all", "deleted", "abandoned"] {
        let pushed = api
            .post(
                "codes",
                json!({"name": name, "image": "stevedore/busybox:local", "command": "true"}),
            )
            .await;
        code_ids.push(pushed["id"].as_str().unwrap().to_owned());
    }
    api.queue(json!(vec![json!({"code_name": "cancelled-all"}); 3]))
        .await;
    api.queue(json!(vec![json!({"code_name": "deleted"}); 2]))
        .await;
    let abandoned = api.queue(json!([{"code_name": "abandoned"}])).await;

    let cancelled = api
        .post(&format!("codes/{}/cancel_all", code_ids[0]), json!({}))
        .await;
    assert_eq!(cancelled["msg"], "Cancelled 3 tasks", "{cancelled}");
    let response = api
        .http
        .delete(server.url(&format!("codes/{}", code_ids[1])))
        .header("Authorization", format!("OAuth {}", server.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A runner leases the last task over the runner protocol and is never heard of again:
    // past its one infrastructure attempt, the rescuer ends it `error`.
    let http = reqwest::Client::new();
    let leased: Value = http
        .post(format!("{}/runner/v1/lease", server.base))
        .header(
            "Authorization",
            format!("OAuth {}", runner_token(data.path())),
        )
        .json(
            &json!({"runner_id": unique("silent"), "clusters": ["default"],
                      "max_tasks": 1, "lease_secs": 1, "wait_ms": 0}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        leased["tasks"][0]["task"]["id"],
        abandoned[0].as_str(),
        "{leased}"
    );
    let task = api
        .wait_finished(&abandoned[0], Duration::from_secs(30))
        .await;
    assert_eq!(task["status"], "error", "{task}");

    let metrics = scrape(&http, &format!("{}/metrics", server.base)).await;
    let finished = "stevedore_tasks_finished_total";
    for (status, code, count) in [
        ("cancelled", "cancelled-all", 3.0),
        ("cancelled", "deleted", 2.0),
        ("error", "abandoned", 1.0),
    ] {
        assert_eq!(
            value(&metrics, finished, &[("status", status), ("code", code)]),
            count,
            "{status} {code}"
        );
    }
    assert_eq!(samples(&metrics, finished, &[]).len(), 3);
}
