//! The official IronWorker Node client (`iron_worker` from npm) against the real server.
//! The test set-up (`scripts/test.sh`) installs it with `npm ci` into `tests/compat/node` and
//! names that directory in `STEVEDORE_NODE_COMPAT`.

use std::path::PathBuf;
use std::process::Command;

use crate::support::{ServerProcess, docker_available, ensure_local_image, required_env};

#[test]
fn the_official_node_client_works_unmodified() {
    let Some(compat) = required_env(
        "STEVEDORE_NODE_COMPAT",
        "tests/compat/node with its packages installed",
    )
    .map(PathBuf::from) else {
        return;
    };
    assert!(
        compat.join("node_modules/iron_worker").is_dir(),
        "{} has no node_modules/iron_worker: run `npm ci` there",
        compat.display()
    );
    let data = tempfile::tempdir().unwrap();
    // With a Docker engine the tasks really run, and the suite checks their results too.
    let runs_tasks = docker_available();
    let server = if runs_tasks {
        ensure_local_image();
        ServerProcess::start_running(data.path(), &format!("node-{}", std::process::id()), &[])
    } else {
        ServerProcess::start(data.path())
    };
    let status = Command::new("node")
        .args(["--test", "iron_worker_node.test.js"])
        .env("STEVEDORE_IRON_JSON", server.data_dir.join("iron.json"))
        .env("STEVEDORE_RUNS_TASKS", if runs_tasks { "1" } else { "0" })
        .current_dir(&compat)
        .status()
        .expect("run node (Node.js 18 or later)");
    assert!(status.success(), "the Node client tests failed: {status:?}");
}
