//! The API fuzzed from its own OpenAPI document by Schemathesis (PyPI), with a valid token and
//! the ids of a real code, task and schedule: no generated request may get a 5xx or go
//! unanswered. The number of examples is bounded and the seed fixed, so the run is repeatable
//! and short. The test set-up (`scripts/test.sh`) installs Schemathesis into a virtual
//! environment of its own and names its command in `STEVEDORE_SCHEMATHESIS`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::support::{Api, ServerProcess, required_env};

/// Examples per operation and phase: enough to reach every handler with odd input, few enough
/// for a CI run of about a minute.
const MAX_EXAMPLES: &str = "30";
const SEED: &str = "20261204";

#[tokio::test]
async fn fuzzed_requests_never_get_a_server_error_or_hang() {
    let Some(schemathesis) = required_env("STEVEDORE_SCHEMATHESIS", "Schemathesis' command") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    // The API alone: tasks the fuzzer queues stay queued.
    let server = ServerProcess::start(data.path());
    let api = Api::new(&server);
    let code = api
        .post(
            "codes",
            json!({"name": "fuzzed", "image": "stevedore/busybox:local", "command": "true"}),
        )
        .await;
    let task = api.queue(json!([{"code_name": "fuzzed"}])).await.remove(0);
    let schedule = api
        .post(
            "schedules",
            json!({"schedules": [{"code_name": "fuzzed", "run_every": 3600}]}),
        )
        .await;
    let config =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fuzz/schemathesis.toml");
    let output = Command::new(schemathesis)
        .arg("--config-file")
        .arg(&config)
        .args([
            "run",
            &format!("{}/openapi.json", server.base),
            "--checks",
            "not_a_server_error",
            "--max-examples",
            MAX_EXAMPLES,
            "--seed",
            SEED,
            "--request-timeout",
            "10",
            "--workers",
            "2",
            "--no-color",
        ])
        .env("STEVEDORE_FUZZ_TOKEN", server.token())
        .env(
            "STEVEDORE_FUZZ_PROJECT",
            server.iron["project_id"].as_str().unwrap(),
        )
        .env("STEVEDORE_FUZZ_CODE", code["id"].as_str().unwrap())
        .env("STEVEDORE_FUZZ_TASK", &task)
        .env(
            "STEVEDORE_FUZZ_SCHEDULE",
            schedule["schedules"][0]["id"].as_str().unwrap(),
        )
        .current_dir(data.path())
        .output()
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    // The summary, for whoever reads the test's output.
    let summary = report.lines().skip_while(|line| !line.contains("SUMMARY"));
    eprintln!("{}", summary.collect::<Vec<_>>().join("\n"));
    assert!(
        output.status.success(),
        "Schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // It really ran: every operation was tested, and many cases passed.
    assert!(report.contains("passed"), "{report}");
    assert!(!report.contains("Tested: 0"), "{report}");
}
