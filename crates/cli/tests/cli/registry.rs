//! Private images against a real registry: Debian's `docker-registry` with htpasswd auth on a
//! loopback port (the engine pulls from 127.0.0.0/8 over plain HTTP), the real binary and the
//! real Docker engine.
//!
//! A private image runs for the project that stored its credentials (`stevedore registry
//! login`); another project naming it is refused, even once it is cached on the runner; a bad
//! password ends the task `error` with the registry's reason; an unreachable registry sends
//! the task back to the queue; and `code push --dockerfile` pushes to the operator's code
//! registry, from which a task runs after the local image is gone.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stevedore_engine::{DockerEngine, ImageBuilder, RegistryAuth};

use crate::support::{
    RunnerProcess, ServerProcess, binary, docker_available, ensure_local_image, required_env,
    runner_token, unique,
};

const USER: &str = "alice";
const PASSWORD: &str = "registry-Passw0rd";

/// A `docker-registry` process serving a temporary directory on a loopback port.
struct TestRegistry {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl TestRegistry {
    fn start(registry_binary: &Path, htpasswd: &Path) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let users = Command::new(htpasswd)
            .args(["-Bbn", USER, PASSWORD])
            .output()
            .expect("htpasswd");
        assert!(users.status.success());
        std::fs::write(dir.path().join("htpasswd"), &users.stdout).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {address}\nauth:\n  htpasswd:\n    realm: stevedore-test\n    path: {}\n",
            dir.path().join("data").display(),
            dir.path().join("htpasswd").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        #[allow(clippy::zombie_processes)]
        let child = Command::new(registry_binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // It logs every refused login at level error, which this test provokes on purpose.
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = TestRegistry {
            child,
            address,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn auth(&self, password: &str) -> RegistryAuth {
        RegistryAuth {
            username: Some(USER.to_owned()),
            password: Some(password.to_owned()),
            identity_token: None,
            server_address: Some(self.address.clone()),
        }
    }

    /// The registry's repositories, asked with the right password.
    async fn catalog(&self) -> Vec<String> {
        let reply: Value = reqwest::Client::new()
            .get(format!("http://{}/v2/_catalog", self.address))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reply["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|name| name.as_str().unwrap().to_owned())
            .collect()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes the images the test made, however it ends.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            remove_image(image);
        }
    }
}

fn remove_image(image: &str) {
    let _ = Command::new("docker")
        .args(["image", "rm", "--force", image])
        .output();
}

fn image_cached(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Builds an image of its own (not sharing its id with the local busybox, which must keep
/// having no registry digests) and pushes it to the registry, then removes the local copy.
async fn push_private_image(registry: &TestRegistry, image: &str) {
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!(
            "FROM stevedore/busybox:local\nLABEL stevedore.test={image}\n\
             RUN echo private-image-ran > /private.txt\n"
        ),
    )
    .unwrap();
    let built = Command::new("docker")
        .args(["build", "-q", "-t", image])
        .arg(context.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let engine = DockerEngine::connect().await.unwrap();
    engine
        .push_image(image, Some(registry.auth(PASSWORD)))
        .await
        .unwrap();
    remove_image(image);
    assert!(!image_cached(image));
}

/// Runs the binary against the server with a project's own id and token.
fn stevedore_as(server: &ServerProcess, project: &Project, args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .arg("--data-dir")
        .arg(&server.data_dir)
        .args(args)
        .args(["--project-id", &project.id, "--token", &project.token])
        .env("STEVEDORE_CONFIG", "/dev/null")
        .output()
        .expect("run stevedore")
}

fn stevedore_ok(server: &ServerProcess, project: &Project, args: &[&str]) -> String {
    let output = stevedore_as(server, project, args);
    assert!(
        output.status.success(),
        "stevedore {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn login(server: &ServerProcess, project: &Project, registry: &str, password: &str) {
    let mut child = Command::new(binary())
        .arg("--data-dir")
        .arg(&server.data_dir)
        .args([
            "registry",
            "login",
            "--server",
            registry,
            "--username",
            USER,
            "--password-stdin",
            "--project-id",
            &project.id,
            "--token",
            &project.token,
        ])
        .env("STEVEDORE_CONFIG", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "registry login: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains(registry), "{said}");
    assert!(!said.contains(password), "{said}");
}

struct Project {
    id: String,
    token: String,
}

impl Project {
    fn default_of(server: &ServerProcess) -> Project {
        Project {
            id: server.iron["project_id"].as_str().unwrap().to_owned(),
            token: server.token(),
        }
    }

    fn create(server: &ServerProcess, name: &str) -> Project {
        let output = Command::new(binary())
            .arg("--data-dir")
            .arg(&server.data_dir)
            .args(["project", "create", name])
            .env("STEVEDORE_CONFIG", "/dev/null")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let created: Value = serde_json::from_slice(&output.stdout).unwrap();
        Project {
            id: created["id"].as_str().unwrap().to_owned(),
            token: created["token"].as_str().unwrap().to_owned(),
        }
    }

    async fn request(
        &self,
        server: &ServerProcess,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let mut request = reqwest::Client::new()
            .request(
                method,
                format!("{}/2/projects/{}/{path}", server.base, self.id),
            )
            .header("Authorization", format!("OAuth {}", self.token));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn queue(&self, server: &ServerProcess, code: &str) -> String {
        let reply = self
            .request(
                server,
                reqwest::Method::POST,
                "tasks",
                Some(json!({"tasks": [{"code_name": code}]})),
            )
            .await;
        reply["tasks"][0]["id"].as_str().unwrap().to_owned()
    }

    async fn wait_for(
        &self,
        server: &ServerProcess,
        task_id: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let task = self
                .request(
                    server,
                    reqwest::Method::GET,
                    &format!("tasks/{task_id}"),
                    None,
                )
                .await;
            if done(&task) {
                return task;
            }
            assert!(Instant::now() < deadline, "task {task_id} stuck: {task}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finished(&self, server: &ServerProcess, task_id: &str) -> Value {
        self.wait_for(server, task_id, |task| {
            matches!(
                task["status"].as_str(),
                Some("complete" | "error" | "timeout" | "cancelled")
            )
        })
        .await
    }

    async fn log(&self, server: &ServerProcess, task_id: &str) -> String {
        reqwest::Client::new()
            .get(format!(
                "{}/2/projects/{}/tasks/{task_id}/log",
                server.base, self.id
            ))
            .header("Authorization", format!("OAuth {}", self.token))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn tools() -> Option<(PathBuf, PathBuf)> {
    let registry = required_env(
        "STEVEDORE_DOCKER_REGISTRY",
        "Debian's docker-registry binary",
    )?;
    let htpasswd = required_env("STEVEDORE_HTPASSWD", "htpasswd from apache2-utils")?;
    if !docker_available() {
        return None;
    }
    Some((PathBuf::from(registry), PathBuf::from(htpasswd)))
}

#[tokio::test(flavor = "multi_thread")]
async fn private_images_run_only_for_projects_that_can_pull_them() {
    let Some((registry_binary, htpasswd)) = tools() else {
        return;
    };
    ensure_local_image();
    let mut registry = TestRegistry::start(&registry_binary, &htpasswd);
    let private = format!("{}/private/hello:{}", registry.address, std::process::id());
    let mut images = Images(vec![private.clone()]);
    push_private_image(&registry, &private).await;

    let data = tempfile::tempdir().unwrap();
    let runner_id = format!("registry-test-{}", std::process::id());
    let server = ServerProcess::start_running(
        data.path(),
        &runner_id,
        &[
            (
                "STEVEDORE_CODE_REGISTRY__SERVER_ADDRESS",
                registry.address.as_str(),
            ),
            ("STEVEDORE_CODE_REGISTRY__USERNAME", USER),
            ("STEVEDORE_CODE_REGISTRY__PASSWORD", PASSWORD),
            ("STEVEDORE_RUNNER__MAX_INFRA_ATTEMPTS", "50"),
        ],
    );
    let owner = Project::default_of(&server);
    let stranger = Project::create(&server, "stranger");
    let wrong = Project::create(&server, "wrong-password");

    // The owner stored its credentials: its private image is pulled with them and runs.
    login(&server, &owner, &registry.address, PASSWORD);
    let listed = stevedore_ok(&server, &owner, &["registry", "ls"]);
    assert!(
        listed.contains(&registry.address) && !listed.contains(PASSWORD),
        "{listed}"
    );
    for project in [&owner, &stranger] {
        stevedore_ok(
            &server,
            project,
            &[
                "code",
                "push",
                "private",
                "--image",
                &private,
                "--command",
                "cat /private.txt",
            ],
        );
    }
    let task = owner.queue(&server, "private").await;
    let done = owner.finished(&server, &task).await;
    assert_eq!(done["status"], "complete", "{done}");
    assert!(
        owner
            .log(&server, &task)
            .await
            .contains("private-image-ran")
    );
    assert!(image_cached(&private), "the pull left the image cached");

    // Another project names the same image, cached right here: refused by the registry,
    // which it must ask with its own (no) credentials.
    let task = stranger.queue(&server, "private").await;
    let refused = stranger.finished(&server, &task).await;
    assert_eq!(refused["status"], "error", "{refused}");
    let msg = refused["msg"].as_str().unwrap();
    assert!(
        msg.contains("registry refused access") && msg.contains("401"),
        "{msg}"
    );
    assert!(
        !stranger
            .log(&server, &task)
            .await
            .contains("private-image-ran")
    );

    // A bad password, with the image no longer cached: the pull is refused, the task ends
    // `error` with the registry's reason and is not retried as the infrastructure's.
    remove_image(&private);
    login(&server, &wrong, &registry.address, "not-the-password");
    stevedore_ok(
        &server,
        &wrong,
        &[
            "code",
            "push",
            "private",
            "--image",
            &private,
            "--command",
            "cat /private.txt",
        ],
    );
    let task = wrong.queue(&server, "private").await;
    let refused = wrong.finished(&server, &task).await;
    assert_eq!(refused["status"], "error", "{refused}");
    let msg = refused["msg"].as_str().unwrap();
    assert!(msg.contains("401") && msg.contains("unauthorized"), "{msg}");
    assert!(!image_cached(&private));

    // `code push --dockerfile` pushes to the operator's code registry, under the project's
    // path; with the local copy gone the task pulls it from there.
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM stevedore/busybox:local\nRUN echo built-and-pushed > /built.txt\n",
    )
    .unwrap();
    let output = Command::new(binary())
        .arg("--data-dir")
        .arg(&server.data_dir)
        .args([
            "--json",
            "code",
            "push",
            "built",
            "--command",
            "cat /built.txt",
            "--dockerfile",
        ])
        .arg(context.path())
        .env("STEVEDORE_CONFIG", "/dev/null")
        .env("STEVEDORE_CODE_REGISTRY__SERVER_ADDRESS", &registry.address)
        .env("STEVEDORE_CODE_REGISTRY__USERNAME", USER)
        .env("STEVEDORE_CODE_REGISTRY__PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let code = stevedore_ok(&server, &owner, &["--json", "code", "show", "built"]);
    let code: Value = serde_json::from_str(&code).unwrap();
    let built = code["image"].as_str().unwrap().to_owned();
    images.0.push(built.clone());
    let repository = format!("stevedore/{}/built", owner.id);
    assert!(
        built.starts_with(&format!("{}/{repository}:", registry.address)),
        "{built}"
    );
    assert!(registry.catalog().await.contains(&repository));
    remove_image(&built);
    let task = owner.queue(&server, "built").await;
    let done = owner.finished(&server, &task).await;
    assert_eq!(done["status"], "complete", "{done}");
    assert!(owner.log(&server, &task).await.contains("built-and-pushed"));

    // Another project cannot even name the owner's built image.
    let refused = stevedore_as(
        &server,
        &stranger,
        &[
            "code",
            "push",
            "borrowed",
            "--image",
            &built,
            "--command",
            "cat /built.txt",
        ],
    );
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("400") && said.contains("another project"),
        "{said}"
    );

    // The registry gone, a pull is the infrastructure's failure: the task goes back to the
    // queue instead of ending.
    registry.stop();
    remove_image(&private);
    let task = owner.queue(&server, "private").await;
    let requeued = owner
        .wait_for(&server, &task, |task| {
            task["status"] == "queued"
                && task["msg"]
                    .as_str()
                    .is_some_and(|msg| msg.starts_with("infrastructure failure"))
        })
        .await;
    assert_eq!(requeued["status"], "queued", "{requeued}");
    owner
        .request(
            &server,
            reqwest::Method::POST,
            &format!("tasks/{task}/cancel"),
            Some(json!({})),
        )
        .await;
    drop(images);
}

/// A remote runner gets the project's credential through its lease, as the embedded runner
/// does, and refuses the cached image to a project without one.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_runner_pulls_with_the_credential_its_lease_carries() {
    let Some((registry_binary, htpasswd)) = tools() else {
        return;
    };
    ensure_local_image();
    let registry = TestRegistry::start(&registry_binary, &htpasswd);
    let private = format!("{}/private/remote:{}", registry.address, std::process::id());
    let _images = Images(vec![private.clone()]);
    push_private_image(&registry, &private).await;

    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path());
    let owner = Project::default_of(&server);
    let stranger = Project::create(&server, "stranger");
    login(&server, &owner, &registry.address, PASSWORD);
    for project in [&owner, &stranger] {
        stevedore_ok(
            &server,
            project,
            &[
                "code",
                "push",
                "private",
                "--image",
                &private,
                "--command",
                "cat /private.txt",
            ],
        );
    }
    let token = runner_token(data.path());
    let _runner = RunnerProcess::start(&server, &token, &unique("remote-registry"), &[]);

    let task = owner.queue(&server, "private").await;
    let done = owner.finished(&server, &task).await;
    assert_eq!(done["status"], "complete", "{done}");
    assert!(
        owner
            .log(&server, &task)
            .await
            .contains("private-image-ran")
    );
    assert!(image_cached(&private));

    let task = stranger.queue(&server, "private").await;
    let refused = stranger.finished(&server, &task).await;
    assert_eq!(refused["status"], "error", "{refused}");
    assert!(
        refused["msg"]
            .as_str()
            .unwrap()
            .contains("registry refused access"),
        "{refused}"
    );
}
