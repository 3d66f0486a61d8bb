//! No task runs twice at once: a remote runner killed with SIGKILL leaves its container to
//! the watchdog beside it, and a runner cut off from the server without a word stops its
//! container itself, both before the lease ends, so the task rescued and run by another
//! runner never has two containers running.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    Api, RunnerProcess, ServerProcess, containers_labelled, docker_available, ensure_local_image,
    remove_containers, runner_token, running_containers_labelled, unique,
};

/// The task's containers running now.
fn running_containers(task_id: &str) -> Vec<String> {
    running_containers_labelled(&format!("stevedore.task={task_id}"))
}

/// What sampling a task's running containers until it completed saw.
struct Takeover {
    /// The most containers of the task running at one moment.
    most: usize,
    /// How long after `since` the first runner's container was seen stopped.
    first_stopped: Duration,
    /// Whether another container of the task ran.
    ran_again: bool,
    /// The task as it ended.
    task: serde_json::Value,
}

/// Samples the task's running containers every 100 ms until it is complete (at most two
/// minutes), after its first runner's container `first` was lost at `since`.
async fn follow_takeover(api: &Api<'_>, task_id: &str, first: &str, since: Instant) -> Takeover {
    let (mut most, mut first_stopped, mut ran_again) = (0, None, false);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = running_containers(task_id);
        most = most.max(running.len());
        if first_stopped.is_none() && !running.iter().any(|id| id == first) {
            first_stopped = Some(since.elapsed());
        }
        ran_again |= running.iter().any(|id| id != first);
        let task = api.get(&format!("tasks/{task_id}")).await;
        if task["status"] == "complete" {
            return Takeover {
                most,
                first_stopped: first_stopped.expect("the first runner's container stopped"),
                ran_again,
                task,
            };
        }
        assert!(Instant::now() < deadline, "the task never ended: {task}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_runners_container_stops_before_the_task_runs_again() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(data.path());
    let token = runner_token(data.path());
    let api = Api::new(&server);
    api.post(
        "codes",
        json!({"name": "long", "image": "stevedore/busybox:local",
               "command": "echo started; sleep 25; echo finished"}),
    )
    .await;
    let lease_secs = 6;
    let first_id = unique("doomed");
    let mut first =
        RunnerProcess::start_with_lease(&server, &token, &first_id, &["default"], lease_secs);
    let ids = api.queue(json!([{"code_name": "long"}])).await;
    let task_id = ids[0].clone();
    api.wait_for(&task_id, Duration::from_secs(60), |task| {
        task["status"] == "running"
    })
    .await;
    let doomed = running_containers(&task_id);
    assert_eq!(doomed.len(), 1);

    first.kill_hard();
    let killed = Instant::now();
    let second_id = unique("heir");
    let mut second =
        RunnerProcess::start_with_lease(&server, &token, &second_id, &["default"], lease_secs);

    // Sampled until the task ran again and ended: never two containers at once; the killed
    // runner's stops within its lease.
    let takeover = follow_takeover(&api, &task_id, &doomed[0], killed).await;
    assert_eq!(takeover.task["infra_attempts"], 1, "{}", takeover.task);
    assert!(
        takeover.ran_again,
        "the task ran again on the second runner"
    );
    assert_eq!(takeover.most, 1, "two containers of one task ran at once");
    let stopped = takeover.first_stopped;
    assert!(
        stopped <= Duration::from_secs(u64::from(lease_secs)),
        "the killed runner's container outlived its lease: {stopped:?}"
    );
    eprintln!("the killed runner's container stopped {stopped:?} after the kill");

    assert!(second.terminate().success());
    assert!(server.terminate().success());
    assert_eq!(
        containers_labelled(&format!("stevedore.task={task_id}")),
        Vec::<String>::new(),
        "containers left behind"
    );
}

#[tokio::test]
async fn a_runner_that_died_with_its_watchdog_has_its_containers_removed_by_a_peer() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    // No runner in the server; runners count as gone 3 s after their last lease call.
    let mut server = ServerProcess::start_with_env(
        data.path(),
        &[
            ("STEVEDORE_RUNNER__ENABLED", "false"),
            ("STEVEDORE_RUNNER_ONLINE_WINDOW_SECS", "3"),
        ],
    );
    let token = runner_token(data.path());
    let api = Api::new(&server);
    api.post(
        "codes",
        json!({"name": "long", "image": "stevedore/busybox:local",
               "command": "echo started; sleep 120"}),
    )
    .await;
    let lease_secs = 6;
    let doomed_id = unique("doomed");
    let mut doomed =
        RunnerProcess::start_with_lease(&server, &token, &doomed_id, &["default"], lease_secs);
    let ids = api.queue(json!([{"code_name": "long"}])).await;
    api.wait_for(&ids[0], Duration::from_secs(60), |task| {
        task["status"] == "running"
    })
    .await;
    let orphan = running_containers(&ids[0]);
    assert_eq!(orphan.len(), 1);
    // A container of a runner this server never saw: another server's, on the same engine.
    let stranger_label = format!("stevedore.runner={}", unique("stranger"));
    let stranger = Command::new("docker")
        .args([
            "run",
            "-d",
            "--network",
            "none",
            "--label",
            &stranger_label,
            "stevedore/busybox:local",
            "sleep",
            "120",
        ])
        .output()
        .unwrap();
    assert!(stranger.status.success(), "{stranger:?}");

    // The runner and its watchdog die together: nothing on this host stops the container.
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &doomed_id])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = doomed.child.wait();
    let killed_at = Instant::now();
    // A peer on the same engine that serves another cluster, so it runs nothing itself.
    let mut peer = RunnerProcess::start_configured(
        &server,
        &token,
        &unique("peer"),
        &["spare"],
        lease_secs,
        &[],
        &[("STEVEDORE_RUNNER__REAP_GONE_INTERVAL_SECS", "1")],
    );
    let deadline = killed_at + Duration::from_secs(60);
    while running_containers(&ids[0]).contains(&orphan[0]) {
        assert!(
            Instant::now() < deadline,
            "the gone runner's container still runs a minute after the kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let removed_after = killed_at.elapsed();
    eprintln!("the gone runner's container was removed {removed_after:?} after the kill");
    // Not before the lease ended: until then the runner may be alive and busy.
    assert!(removed_after >= Duration::from_secs(3), "{removed_after:?}");
    let strangers = containers_labelled(&stranger_label);
    assert_eq!(strangers.len(), 1, "a stranger's container was touched");
    remove_containers(&stranger_label);
    assert!(peer.terminate().success());
    assert!(server.terminate().success());
    remove_containers(&format!("stevedore.task={}", ids[0]));
}

/// A child process that does not outlive the test, however it ends.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A network namespace joined to the host by a veth pair, whose traffic to the host can be
/// dropped without a word: a runner inside it is cut off silently, not refused.
struct CutOffNamespace {
    name: String,
    host_veth: String,
    host_address: String,
}

impl CutOffNamespace {
    /// The namespace, or `None` without the rights to make one (outside CI).
    fn create() -> Option<CutOffNamespace> {
        let suffix = std::process::id() % 10_000;
        let namespace = CutOffNamespace {
            name: format!("stv-cut-{suffix}"),
            host_veth: format!("stvh{suffix}"),
            host_address: format!("10.213.{}.1", suffix % 250),
        };
        let inside = format!("10.213.{}.2/30", suffix % 250);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), namespace.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                namespace.host_veth.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                "stvn0".into(),
                "netns".into(),
                namespace.name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{}/30", namespace.host_address),
                "dev".into(),
                namespace.host_veth.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                namespace.host_veth.clone(),
                "up".into(),
            ],
            namespace.inside(&["ip", "addr", "add", &inside, "dev", "stvn0"]),
            namespace.inside(&["ip", "link", "set", "stvn0", "up"]),
            namespace.inside(&["ip", "link", "set", "lo", "up"]),
        ];
        for step in steps {
            let status = Command::new("ip").args(&step).status();
            if !status.is_ok_and(|status| status.success()) {
                assert!(
                    !crate::support::in_ci(),
                    "cannot set up a network namespace: ip {step:?}"
                );
                return None;
            }
        }
        Some(namespace)
    }

    /// `ip netns exec <namespace>` followed by `command`.
    fn inside(&self, command: &[&str]) -> Vec<String> {
        let mut args = vec!["netns".to_owned(), "exec".to_owned(), self.name.clone()];
        args.extend(command.iter().map(|part| (*part).to_owned()));
        args
    }

    /// From now on every packet from the namespace to the host is dropped.
    fn cut(&self) {
        let status = Command::new("ip")
            .args(self.inside(&[
                "iptables",
                "-A",
                "OUTPUT",
                "-d",
                &self.host_address,
                "-j",
                "DROP",
            ]))
            .status()
            .unwrap();
        assert!(status.success(), "cannot drop the namespace's packets");
    }
}

impl Drop for CutOffNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
    }
}

#[tokio::test]
async fn a_runner_cut_off_silently_stops_its_container_before_the_task_runs_again() {
    if !docker_available() {
        return;
    }
    let Some(namespace) = CutOffNamespace::create() else {
        return;
    };
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    // Reachable from the namespace: the server listens on the host's end of the veth pair.
    let listen = format!("{}:0", namespace.host_address);
    let mut server = ServerProcess::start_listening(
        data.path(),
        &listen,
        &[],
        &[("STEVEDORE_RUNNER__ENABLED", "false")],
    );
    let token = runner_token(data.path());
    let api = Api::new(&server);
    api.post(
        "codes",
        json!({"name": "long", "image": "stevedore/busybox:local",
               "command": "echo started; sleep 25; echo finished"}),
    )
    .await;

    let lease_secs: u32 = 6;
    let cut_id = unique("cut-off");
    let runner_data = tempfile::tempdir().unwrap();
    let mut command = Command::new("ip");
    command
        .args(namespace.inside(&[
            crate::support::binary(),
            "runner",
            "--api",
            &server.base,
            "--id",
            &cut_id,
            "--capacity",
            "2",
        ]))
        .env("STEVEDORE_RUNNER_TOKEN", &token)
        .env("STEVEDORE_LOG", "warn")
        .env("STEVEDORE_DATA_DIR", runner_data.path())
        .env("STEVEDORE_RUNNER__LEASE_SECS", lease_secs.to_string())
        .env("STEVEDORE_STACK_IMAGES", "local")
        .env("STEVEDORE_CONFIG", "/dev/null")
        // Inside the namespace the host's firewall is out of reach; the test's tasks need no
        // network isolation.
        .env("STEVEDORE_TASK_NETWORK__UNGUARDED", "true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut cut_runner = KillOnDrop(command.spawn().expect("start the runner in the namespace"));

    let ids = api.queue(json!([{"code_name": "long"}])).await;
    let task_id = ids[0].clone();
    api.wait_for(&task_id, Duration::from_secs(60), |task| {
        task["status"] == "running"
    })
    .await;
    let first = running_containers(&task_id);
    assert_eq!(first.len(), 1);

    namespace.cut();
    let cut = Instant::now();
    let heir_id = unique("heir");
    let mut heir =
        RunnerProcess::start_with_lease(&server, &token, &heir_id, &["default"], lease_secs);

    let takeover = follow_takeover(&api, &task_id, &first[0], cut).await;
    let task = &takeover.task;
    // The first attempt ran on the cut-off runner; a lease answered to it after the cut may
    // have been lost on the way (an attempt that never started); the last ran on the heir.
    let attempts = task["attempts"].as_array().unwrap();
    let (last, earlier) = attempts.split_last().unwrap();
    assert_eq!(last["runner_id"], heir_id.as_str(), "{task}");
    assert_eq!(last["ending"], "complete", "{task}");
    for attempt in earlier {
        assert_eq!(attempt["ending"], "requeued", "{task}");
        assert_eq!(attempt["runner_id"], cut_id.as_str(), "{task}");
    }
    assert!(earlier[0]["started_at"].is_string(), "{task}");
    assert!(
        earlier[1..]
            .iter()
            .all(|attempt| attempt["started_at"].is_null()),
        "the cut-off runner started nothing after the cut: {task}"
    );
    assert_eq!(takeover.most, 1, "two containers of one task ran at once");
    let stopped = takeover.first_stopped;
    assert!(
        stopped <= Duration::from_secs(u64::from(lease_secs)),
        "the cut-off runner's container outlived its lease: {stopped:?}"
    );
    eprintln!("the cut-off runner's container stopped {stopped:?} after the cut");

    cut_runner.stop();
    assert!(heir.terminate().success());
    assert!(server.terminate().success());
}
