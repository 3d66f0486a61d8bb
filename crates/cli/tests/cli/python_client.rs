//! The official IronWorker Python client (`iron-worker` from PyPI) against the real server.
//! The test set-up (`scripts/test.sh`) installs it into a virtual environment and names that
//! environment's interpreter in `STEVEDORE_PYTHON`.

use std::path::PathBuf;
use std::process::Command;

use crate::support::{ServerProcess, docker_available, ensure_local_image, required_env};

#[test]
fn the_official_python_client_works_unmodified() {
    let Some(python) = required_env("STEVEDORE_PYTHON", "a Python with iron-worker and pytest")
    else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    // With a Docker engine the tasks really run, and the suite checks their results too.
    let runs_tasks = docker_available();
    let server = if runs_tasks {
        ensure_local_image();
        ServerProcess::start_running(data.path(), &format!("python-{}", std::process::id()), &[])
    } else {
        ServerProcess::start(data.path())
    };
    let compat = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat");
    let status = Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&compat)
        .env("STEVEDORE_IRON_JSON", server.data_dir.join("iron.json"))
        .env("STEVEDORE_RUNS_TASKS", if runs_tasks { "1" } else { "0" })
        .current_dir(data.path())
        .status()
        .expect("run pytest");
    assert!(
        status.success(),
        "the Python client tests failed: {status:?}"
    );
}
