//! Starting and stopping the real binary.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_stevedore")
}

/// A `stevedore serve` process on a free loopback port.
pub struct ServerProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub iron: Value,
    pub base: String,
}

impl ServerProcess {
    /// The API alone: no runner, so no Docker needed.
    pub fn start(data_dir: &Path) -> ServerProcess {
        Self::start_with_env(data_dir, &[("STEVEDORE_RUNNER__ENABLED", "false")])
    }

    /// The API with its embedded runner on the real Docker engine, tuned for tests: short
    /// leases and grace, and a runner id of its own so its reaper touches only its containers.
    pub fn start_running(
        data_dir: &Path,
        runner_id: &str,
        extra: &[(&str, &str)],
    ) -> ServerProcess {
        let mut env = vec![
            ("STEVEDORE_RUNNER__ID", runner_id),
            ("STEVEDORE_RUNNER__LEASE_SECS", "3"),
            ("STEVEDORE_RUNNER__SHUTDOWN_GRACE_SECS", "5"),
        ];
        env.extend_from_slice(extra);
        Self::start_with_env(data_dir, &env)
    }

    pub fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> ServerProcess {
        Self::start_with(data_dir, &[], env)
    }

    /// `serve` with more arguments and environment variables.
    pub fn start_with(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        Self::start_listening(data_dir, "127.0.0.1:0", args, env)
    }

    /// `serve` whose log (standard error) goes to the file `log`.
    pub fn start_logging(data_dir: &Path, env: &[(&str, &str)], log: &Path) -> ServerProcess {
        let file = std::fs::File::create(log).expect("create the server's log file");
        Self::spawn(data_dir, "127.0.0.1:0", &[], env, Stdio::from(file))
    }

    /// Starts on a given address, e.g. the port of an earlier life of the same server.
    pub fn start_listening(
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ServerProcess {
        Self::spawn(data_dir, listen, args, env, Stdio::inherit())
    }

    fn spawn(
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> ServerProcess {
        let iron_path = data_dir.join("iron.json");
        let before = std::fs::metadata(&iron_path)
            .and_then(|meta| meta.modified())
            .ok();
        let mut command = Command::new(binary());
        command
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("STEVEDORE_LOG", "warn")
            // The stacks run on the images `stack build-local` made (`ensure_local_image`).
            .env("STEVEDORE_STACK_IMAGES", "local")
            .env(
                "STEVEDORE_ENGINE",
                test_engine().unwrap_or_else(|| "docker".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        // Reaped by `Drop`, or right here when it exits early.
        #[allow(clippy::zombie_processes)]
        let mut child = command.spawn().expect("start stevedore serve");
        // The server rewrites iron.json with its real port once it is ready.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("poll the server") {
                panic!("stevedore serve exited before it was ready: {status}");
            }
            let modified = std::fs::metadata(&iron_path)
                .and_then(|meta| meta.modified())
                .ok();
            if modified.is_some()
                && modified != before
                && let Ok(text) = std::fs::read_to_string(&iron_path)
                && let Ok(iron) = serde_json::from_str::<Value>(&text)
            {
                let base = format!("http://{}:{}", iron["host"].as_str().unwrap(), iron["port"]);
                return ServerProcess {
                    child,
                    data_dir: data_dir.to_owned(),
                    iron,
                    base,
                };
            }
            assert!(
                Instant::now() < deadline,
                "the server did not write iron.json within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}/2/projects/{}/{}",
            self.base,
            self.iron["project_id"].as_str().unwrap(),
            path
        )
    }

    pub fn token(&self) -> String {
        self.iron["token"].as_str().unwrap().to_owned()
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill_hard(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with arguments and returns its stdout, asserting success.
pub fn run_ok(args: &[&str]) -> String {
    run_ok_with_env(args, &[])
}

/// [`run_ok`] with more environment variables, e.g. `STEVEDORE_DATABASE`.
pub fn run_ok_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run stevedore");
    assert!(
        output.status.success(),
        "stevedore {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Whether the tests are running in CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0")
}

/// The value of `name`, which `scripts/test.sh` sets to `what` for a test that needs a tool
/// installed outside cargo. Unset, the test is skipped (`None`, with the reason printed), except
/// in CI, where nothing may be skipped: there it fails.
pub fn required_env(name: &str, what: &str) -> Option<OsString> {
    let value = std::env::var_os(name).filter(|value| !value.is_empty());
    if value.is_none() {
        assert!(
            !in_ci(),
            "{name} must name {what} in CI (scripts/test.sh sets it)"
        );
        eprintln!("skipped: {name} is not set (scripts/test.sh sets it)");
    }
    value
}

/// Whether the host has `program` (a JDK's `javac`, say); in CI it must.
pub fn host_has(program: &str, installed_by: &str) -> bool {
    let found = Command::new(program)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found || !in_ci(),
        "CI must have {program} ({installed_by} installs it)"
    );
    if !found {
        eprintln!("skipped: {program} is missing ({installed_by} installs it)");
    }
    found
}

/// A zip of `(path, contents, unix mode)` entries, as a client would build it.
pub fn zip_of(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (path, contents, mode) in entries {
        let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        writer.start_file(*path, options).unwrap();
        writer.write_all(contents).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// Whether a Docker engine answers. In CI it must: a missing engine fails the test there.
pub fn docker_available() -> bool {
    let answers = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        answers || !in_ci(),
        "CI must have a Docker engine (scripts/ensure-docker.sh starts one)"
    );
    if !answers {
        eprintln!("skipped: no Docker engine answers (scripts/ensure-docker.sh starts one)");
    }
    answers
}

/// Builds every stack's local image with the binary, or reuses it (`scripts/test.sh` has
/// built them all before the tests start, so this only checks).
pub fn ensure_local_image() {
    run_ok(&["stack", "build-local"]);
}

/// The engine the servers and runners the tests start run their tasks on: Docker unless
/// `STEVEDORE_TEST_ENGINE=oci` (`scripts/test.sh` runs the end-to-end tests on both).
pub fn test_engine() -> Option<String> {
    std::env::var("STEVEDORE_TEST_ENGINE")
        .ok()
        .filter(|engine| !engine.is_empty())
}

/// The ids of containers that carry `label` (`key=value`), running or not: on Docker as
/// `docker ps` lists them, on the OCI engine the bundles of the tests' data directories
/// (temporary directories, each with its engine's root `oci/` inside).
pub fn containers_labelled(label: &str) -> Vec<String> {
    if test_engine().as_deref() == Some("oci") {
        return oci_containers_labelled(label);
    }
    docker_ps(&["-a", "--filter", &format!("label={label}")])
}

/// The task containers (not a runner's network holders, which outlive tasks while their
/// runner lives) that carry `label`, running or not.
pub fn task_containers_labelled(label: &str) -> Vec<String> {
    if test_engine().as_deref() == Some("oci") {
        return oci_containers_labelled(label);
    }
    docker_ps(&[
        "-a",
        "--filter",
        &format!("label={label}"),
        "--filter",
        "label=stevedore.task",
    ])
}

/// The ids `docker ps -q` lists with `args`.
fn docker_ps(args: &[&str]) -> Vec<String> {
    let output = Command::new("docker")
        .args(["ps", "-q"])
        .args(args)
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The ids of the running containers that carry `label`: on the OCI engine those whose
/// bundle names a live init process and no exit yet.
pub fn running_containers_labelled(label: &str) -> Vec<String> {
    if test_engine().as_deref() == Some("oci") {
        return oci_bundles_labelled(label)
            .into_iter()
            .filter(|bundle| {
                !bundle.join("exit.json").exists()
                    && std::fs::read_to_string(bundle.join("pid"))
                        .is_ok_and(|pid| Path::new("/proc").join(pid.trim()).join("stat").exists())
            })
            .map(|bundle| bundle.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
    }
    docker_ps(&[
        "--filter",
        &format!("label={label}"),
        "--filter",
        "status=running",
    ])
}

fn oci_containers_labelled(label: &str) -> Vec<String> {
    oci_bundles_labelled(label)
        .into_iter()
        .map(|bundle| bundle.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn oci_bundles_labelled(label: &str) -> Vec<PathBuf> {
    let (key, value) = label.split_once('=').unwrap_or((label, ""));
    let mut ids = Vec::new();
    let Ok(data_dirs) = std::fs::read_dir(std::env::temp_dir()) else {
        return ids;
    };
    for data_dir in data_dirs.flatten() {
        let Ok(bundles) = std::fs::read_dir(data_dir.path().join("oci/containers")) else {
            continue;
        };
        for bundle in bundles.flatten() {
            let Ok(text) = std::fs::read_to_string(bundle.path().join("meta.json")) else {
                continue;
            };
            let Ok(meta) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if meta["labels"][key].as_str() == Some(value) {
                ids.push(bundle.path());
            }
        }
    }
    ids
}

/// A small HTTP client for one server.
pub struct Api<'a> {
    pub server: &'a ServerProcess,
    pub http: reqwest::Client,
}

impl<'a> Api<'a> {
    pub fn new(server: &'a ServerProcess) -> Self {
        Api {
            server,
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(self.server.url(path))
            .header("Authorization", format!("OAuth {}", self.server.token()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.server.url(path))
            .header("Authorization", format!("OAuth {}", self.server.token()))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Uploads a code as IronWorker's clients do: a multipart `data` document and the zip
    /// in `file`. Returns the answer.
    pub async fn upload(&self, data: Value, zip: Vec<u8>) -> Value {
        let form = reqwest::multipart::Form::new()
            .text("data", data.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(zip)
                    .file_name("code.zip")
                    .mime_str("application/zip")
                    .unwrap(),
            );
        let response = self
            .http
            .post(self.server.url("codes"))
            .header("Authorization", format!("OAuth {}", self.server.token()))
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "POST codes {data}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub async fn log(&self, task_id: &str) -> Option<String> {
        let response = self
            .http
            .get(self.server.url(&format!("tasks/{task_id}/log")))
            .header("Authorization", format!("OAuth {}", self.server.token()))
            .send()
            .await
            .unwrap();
        if response.status() == 404 {
            return None;
        }
        assert!(response.status().is_success());
        Some(response.text().await.unwrap())
    }

    /// Queues tasks and returns their ids.
    pub async fn queue(&self, tasks: Value) -> Vec<String> {
        let reply = self
            .post("tasks", serde_json::json!({ "tasks": tasks }))
            .await;
        reply["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Polls a task until `done` holds of it, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        task_id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let task = self.get(&format!("tasks/{task_id}")).await;
            if done(&task) {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} did not get there in {timeout:?}: {task}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls a task until it is finished.
    pub async fn wait_finished(&self, task_id: &str, timeout: Duration) -> Value {
        self.wait_for(task_id, timeout, |task| {
            matches!(
                task["status"].as_str(),
                Some("complete" | "error" | "timeout" | "cancelled")
            )
        })
        .await
    }
}

/// A `stevedore runner` process.
pub struct RunnerProcess {
    pub child: Child,
    pub id: String,
}

impl RunnerProcess {
    /// A runner with short leases (3 s), so that a killed one's tasks are rescued quickly.
    pub fn start(
        server: &ServerProcess,
        token: &str,
        id: &str,
        clusters: &[&str],
    ) -> RunnerProcess {
        Self::start_with_lease(server, token, id, clusters, 3)
    }

    pub fn start_with_lease(
        server: &ServerProcess,
        token: &str,
        id: &str,
        clusters: &[&str],
        lease_secs: u32,
    ) -> RunnerProcess {
        Self::start_with_args(server, token, id, clusters, lease_secs, &[])
    }

    /// A runner with more command-line arguments.
    pub fn start_with_args(
        server: &ServerProcess,
        token: &str,
        id: &str,
        clusters: &[&str],
        lease_secs: u32,
        args: &[&str],
    ) -> RunnerProcess {
        Self::start_configured(server, token, id, clusters, lease_secs, args, &[])
    }

    /// A runner with more command-line arguments and environment variables.
    pub fn start_configured(
        server: &ServerProcess,
        token: &str,
        id: &str,
        clusters: &[&str],
        lease_secs: u32,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> RunnerProcess {
        let lease_secs = lease_secs.to_string();
        let mut command = Command::new(binary());
        command
            .args(["runner", "--api", &server.base, "--id", id])
            .env("STEVEDORE_RUNNER_TOKEN", token)
            // Two slots unless `args` holds a `--capacity` of its own, which wins.
            .env("STEVEDORE_RUNNER__CAPACITY", "2")
            .env("STEVEDORE_LOG", "warn")
            .env("STEVEDORE_DATA_DIR", Self::data_dir(id))
            .env("STEVEDORE_RUNNER__LEASE_SECS", &lease_secs)
            .env("STEVEDORE_RUNNER__SHUTDOWN_GRACE_SECS", "5")
            .env("STEVEDORE_STACK_IMAGES", "local")
            .env(
                "STEVEDORE_ENGINE",
                test_engine().unwrap_or_else(|| "docker".to_owned()),
            )
            // No stevedore.toml of the working directory.
            .env("STEVEDORE_CONFIG", "/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for cluster in clusters {
            command.args(["--cluster", cluster]);
        }
        command.args(args);
        for (key, value) in env {
            command.env(key, value);
        }
        #[allow(clippy::zombie_processes)]
        let child = command.spawn().expect("start stevedore runner");
        RunnerProcess {
            child,
            id: id.to_owned(),
        }
    }

    /// The data directory of runner `id` (its lease ledger, its spool): the same for every
    /// life of one id, outside the tree.
    pub fn data_dir(id: &str) -> PathBuf {
        std::env::temp_dir().join(format!("stevedore-runner-{id}"))
    }

    pub fn label(&self) -> String {
        format!("stevedore.runner={}", self.id)
    }

    pub fn kill_hard(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the runner did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn remove_containers(label: &str) {
    for id in containers_labelled(label) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &id])
            .stdout(Stdio::null())
            .status();
    }
}

/// A new runner token of the server whose data directory is `data_dir`.
pub fn runner_token(data_dir: &Path) -> String {
    runner_token_with_env(data_dir, &[])
}

/// [`runner_token`] with more environment variables, e.g. the `STEVEDORE_DATABASE` the
/// servers share.
pub fn runner_token_with_env(data_dir: &Path, env: &[(&str, &str)]) -> String {
    let out = run_ok_with_env(
        &[
            "token",
            "create",
            "--role",
            "runner",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        env,
    );
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["role"], "runner");
    assert_eq!(created["project_id"], Value::Null);
    created["token"].as_str().unwrap().to_owned()
}

/// A new runner token of the server whose data directory is `data_dir`, serving only
/// `project`'s own `clusters`.
pub fn project_runner_token(data_dir: &Path, project: &str, clusters: &[&str]) -> String {
    let mut args = vec![
        "token",
        "create",
        "--role",
        "runner",
        "--project",
        project,
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    for cluster in clusters {
        args.extend(["--cluster", cluster]);
    }
    let created: Value = serde_json::from_str(&run_ok(&args)).unwrap();
    assert_eq!(created["project_id"], project);
    assert_eq!(created["clusters"], serde_json::json!(clusters));
    created["token"].as_str().unwrap().to_owned()
}

/// `prefix` and a suffix no other test run shares, for runner ids and labels.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{:x}{nanos:x}", std::process::id())
}
