//! The dashboard (`/ui`) in a real headless browser: `tests/dashboard/dashboard.test.mjs` drives
//! Debian's Chromium with playwright-core against `serve` with its embedded runner on Docker.
//! The test set-up (`scripts/test.sh`) installs both and names them in `STEVEDORE_CHROMIUM` and
//! `STEVEDORE_DASHBOARD_TESTS`. The screenshots are kept as test output in
//! `dashboard-screenshots/` of the target directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::support::{
    Api, ServerProcess, docker_available, ensure_local_image, required_env, run_ok,
};

/// The code the page queues a task of. It sleeps before printing its payload so that the task
/// page is seen before the task ends and must show the status and the log change live.
const CODE_NAME: &str = "dashboard-echo";
const CODE_COMMAND: &str = "echo task started; sleep 4; cat \"$PAYLOAD_FILE\"; echo";

#[tokio::test]
async fn the_dashboard_works_in_a_real_browser() {
    let Some(tests) = required_env(
        "STEVEDORE_DASHBOARD_TESTS",
        "tests/dashboard with its packages installed",
    )
    .map(PathBuf::from) else {
        return;
    };
    let Some(chromium) = required_env("STEVEDORE_CHROMIUM", "Chromium's executable") else {
        return;
    };
    assert!(
        tests.join("node_modules/playwright-core").is_dir(),
        "{} has no node_modules/playwright-core: run `npm ci` there",
        tests.display()
    );
    if !docker_available() {
        return;
    }
    ensure_local_image();

    let data = tempfile::tempdir().unwrap();
    // A second project, made before the server starts (which makes the first, `default`).
    let other: Value = serde_json::from_str(&run_ok(&[
        "--data-dir",
        data.path().to_str().unwrap(),
        "project",
        "create",
        "elsewhere",
    ]))
    .unwrap();
    let other_token = other["token"].as_str().unwrap().to_owned();
    let server = ServerProcess::start_running(
        data.path(),
        &format!("dashboard-{}", std::process::id()),
        &[],
    );
    Api::new(&server)
        .post(
            "codes",
            json!({"name": CODE_NAME, "image": "stevedore/busybox:local", "command": CODE_COMMAND}),
        )
        .await;
    let greeting = format!("hello from the dashboard test {}", std::process::id());
    let payload = json!({ "greeting": greeting }).to_string();

    let screenshots = screenshot_dir();
    if screenshots.exists() {
        std::fs::remove_dir_all(&screenshots).unwrap();
    }
    std::fs::create_dir_all(&screenshots).unwrap();
    eprintln!("dashboard screenshots: {}", screenshots.display());

    // The browser test's output goes straight to this test's, step by step.
    let status = Command::new("node")
        .arg("dashboard.test.mjs")
        .current_dir(&tests)
        .env("STEVEDORE_URL", &server.base)
        .env("STEVEDORE_TOKEN", server.token())
        .env("STEVEDORE_OTHER_TOKEN", &other_token)
        .env("STEVEDORE_CODE", CODE_NAME)
        .env("STEVEDORE_PAYLOAD", &payload)
        .env("STEVEDORE_EXPECTED_LOG", &greeting)
        .env("STEVEDORE_SCREENSHOTS", &screenshots)
        .env("STEVEDORE_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .expect("run node (Node.js 18 or later)");
    assert!(
        status.success(),
        "the dashboard's browser test failed ({status}); its output is above, and the \
         screenshots (failure-*.png and the page's HTML among them) are in {}",
        screenshots.display()
    );
}

/// `dashboard-screenshots/` in the target directory this test binary was built into
/// (`<target>/<profile>/deps/<binary>`), where CI keeps it as test output.
fn screenshot_dir() -> PathBuf {
    let binary = std::env::current_exe().unwrap();
    let target = binary
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .expect("the test binary lives in <target>/<profile>/deps");
    target.join("dashboard-screenshots")
}
