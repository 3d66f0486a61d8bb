//! `GET usage`: finished tasks per bucket, by code and by stack, with queue waits.

use reqwest::Method;
use serde_json::json;
use stevedore_model::{TaskOutcome, Timestamp};
use stevedore_store::RunReport;
use stevedore_store::testsuite::{at, lease_request};

use crate::support::{TestServer, code_form, redactions, zip_of};

/// Queues a task of `code_name` through the API, then plays the runner's part against the
/// store with fixed times: due at `due`, started at `start`, ended at `end` with `outcome`.
async fn run_task(
    server: &TestServer,
    code_name: &str,
    outcome: TaskOutcome,
    (due, start, end): (Timestamp, Timestamp, Timestamp),
) {
    let task = server
        .store
        .enqueue(
            &server.project_id,
            &[stevedore_store::testsuite::new_task(code_name)],
            due,
        )
        .await
        .unwrap()
        .remove(0);
    let leased = server
        .store
        .lease(&lease_request("runner-1", 1), start)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(leased.task.id, task.id);
    let token = leased.lease.token;
    server
        .store
        .mark_running(&task.id, token, start, start)
        .await
        .unwrap();
    let report = RunReport {
        start_time: Some(start),
        end_time: Some(end),
        ..RunReport::default()
    };
    server
        .store
        .complete(&task.id, token, &outcome, &report, end)
        .await
        .unwrap();
}

#[tokio::test]
async fn usage_by_bucket_code_and_stack() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let zip = zip_of(&[("run.sh", b"echo hi\n", 0o755)]);
    let uploaded = server
        .send(server.request(Method::POST, "codes").multipart(code_form(
            json!({"name": "script", "runtime": "sh", "file_name": "run.sh"}),
            Some(zip),
        )))
        .await;
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());

    let ok = TaskOutcome::Exited { exit_code: 0 };
    run_task(&server, "hello", ok.clone(), (at(0), at(2), at(12))).await;
    run_task(
        &server,
        "hello",
        TaskOutcome::Exited { exit_code: 1 },
        (at(10), at(15), at(20)),
    )
    .await;
    run_task(&server, "script", ok.clone(), (at(60), at(61), at(91))).await;
    run_task(
        &server,
        "hello",
        TaskOutcome::TimedOut { timeout_secs: 30 },
        (at(130), at(150), at(180)),
    )
    .await;

    let reply = server
        .get("usage?from=2030-01-01T00:00:00Z&to=1893456240&bucket=minute")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    redactions().bind(|| insta::assert_json_snapshot!("usage_report", reply.json()));

    // Another project sees none of it.
    let (other_id, other_token) = server.other_project("other").await;
    let theirs = server
        .send(server.root(
            Method::GET,
            &format!("/2/projects/{other_id}/usage?from=1893456000&to=1893456240"),
            &other_token,
        ))
        .await
        .json();
    assert_eq!(theirs["totals"]["tasks"], 0);
    assert_eq!(theirs["buckets"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn bad_usage_windows_are_400_with_a_message() {
    let server = TestServer::start().await;
    let cases = [
        ("usage?from=1893456240&to=1893456000", "must be after from"),
        ("usage?from=1893456000&to=1893456000", "must be after from"),
        ("usage?from=last-week", "from"),
        ("usage?bucket=week", "bucket"),
        ("usage?bucket=1", "more than 2000"),
        ("usage?from=0&to=1893456000&bucket=hour", "more than 2000"),
    ];
    for (path, naming) in cases {
        let message = server.get(path).await.error(400);
        assert!(message.contains(naming), "{path}: {message}");
    }
    // The default window answers with one bucket per hour of the last day.
    let reply = server.get("usage").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["bucket_secs"], 3600);
}
