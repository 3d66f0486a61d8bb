//! The conformance suite of [`ContainerRuntime`]: what every runtime must do for a runner,
//! written once and run against each implementation.
//!
//! The Docker implementation passes it in `tests/docker.rs` (against the real engine), the
//! fake in its unit tests; a second implementation proves itself by passing it too. A
//! [`Harness`] turns the suite's [`Program`]s into specs its runtime runs (a shell in a small
//! image for Docker, a scripted run for the fake); everything else (creating with files,
//! environment, starting, waiting, attached output, stats, kill, remove, listing by label, the errors) is
//! asked through the trait alone.
//!
//! [`runtime_conformance_tests!`](crate::runtime_conformance_tests) writes one `#[tokio::test]`
//! per check. Each check removes what it created; it panics on a failed expectation, as a
//! test does.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;

use crate::engine::{ContainerRuntime, ExitStatus, OutputStream};
use crate::error::EngineError;
use crate::network::NetworkSpec;
use crate::spec::{ContainerId, ContainerSpec, DirectoryToCreate, FileToUpload};

/// The label a runner puts on its containers to find them again (its value: the runner's id).
pub const RUNNER_LABEL: &str = "stevedore.runner";

/// How long any one step may take before a check fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);

/// What a container of the suite does; a [`Harness`] makes a spec that does it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// Exits with this code at once, printing nothing.
    Exit(i64),
    /// Prints `stdout` on stdout and `stderr` on stderr, then exits 0.
    Print {
        /// What goes to stdout.
        stdout: String,
        /// What goes to stderr.
        stderr: String,
    },
    /// Prints the contents of these files of its own container, in order, then exits 0.
    CatFiles(Vec<String>),
    /// Prints the value of this environment variable (no newline), then exits 0.
    PrintEnv(String),
    /// Uses more memory than its spec's limit allows, and is killed for it.
    ExceedMemory,
    /// Runs until killed.
    Forever,
}

/// A runtime under test and how it runs the suite's [`Program`]s.
pub trait Harness: Send + Sync {
    /// The runtime under test.
    fn runtime(&self) -> &dyn ContainerRuntime;

    /// A spec whose container runs `program`. The suite adds its own labels, files,
    /// directories and environment; the harness sets the image, the command and whatever
    /// limits the program needs (a memory limit for [`Program::ExceedMemory`]).
    fn spec(&self, program: &Program) -> ContainerSpec;
}

/// What one container did, collected by [`run_to_end`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// How it ended.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

fn ok<T>(result: Result<T, EngineError>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{what}: {error} ({error:?})"),
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} took longer than {PATIENCE:?}"),
    }
}

/// A label value no other check (or other run of the suite) uses.
fn unique(check: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "conformance-{check}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The harness's spec for `program`, carrying the runner label `runner`.
fn labelled(harness: &dyn Harness, program: &Program, runner: &str) -> ContainerSpec {
    let mut spec = harness.spec(program);
    spec.labels
        .insert(RUNNER_LABEL.to_owned(), runner.to_owned());
    spec
}

/// Creates `spec`, attaches to its output, starts it, reads its whole output (the stream ends
/// once the container stopped), waits for its end, then removes it.
pub async fn run_to_end(runtime: &dyn ContainerRuntime, spec: &ContainerSpec) -> Finished {
    let id = ok(within("create", runtime.create(spec)).await, "create");
    let mut output = ok(within("attach", runtime.attach(&id)).await, "attach");
    ok(within("start", runtime.start(&id)).await, "start");
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    within("output", async {
        while let Some(chunk) = output.next().await {
            let chunk = ok(chunk, "output");
            match chunk.stream {
                OutputStream::Stdout => stdout.extend_from_slice(&chunk.bytes),
                OutputStream::Stderr => stderr.extend_from_slice(&chunk.bytes),
            }
        }
    })
    .await;
    let status = ok(within("wait", runtime.wait(&id)).await, "wait");
    ok(within("remove", runtime.remove(&id)).await, "remove");
    Finished {
        status,
        stdout,
        stderr,
    }
}

/// `capabilities` answers, with the runtime's version.
pub async fn capabilities_answer(harness: &dyn Harness) {
    let capabilities = ok(
        within("capabilities", harness.runtime().capabilities()).await,
        "capabilities",
    );
    assert!(
        !capabilities.server_version.is_empty(),
        "no version: {capabilities:?}"
    );
}

/// The spec's directories and files are in the container when its program starts, byte for
/// byte, nested paths included.
pub async fn files_are_in_place_when_it_starts(harness: &dyn Harness) {
    let greeting = b"hello from the conformance suite\n".to_vec();
    // Large, but printable: logs need not carry bytes that are not UTF-8 unchanged (Docker's
    // json-file driver replaces them), and this checks files, not logs.
    let binary: Vec<u8> = (b' '..=b'~').chain([b'\n']).cycle().take(70_000).collect();
    let program = Program::CatFiles(vec![
        "/conformance/greeting.txt".to_owned(),
        "/conformance/deeper/data.bin".to_owned(),
    ]);
    let mut spec = labelled(harness, &program, &unique("files"));
    spec.directories.push(DirectoryToCreate {
        path: "/conformance".to_owned(),
        mode: 0o755,
    });
    spec.files.push(FileToUpload {
        path: "/conformance/greeting.txt".to_owned(),
        contents: greeting.clone(),
        mode: 0o644,
    });
    spec.files.push(FileToUpload {
        path: "/conformance/deeper/data.bin".to_owned(),
        contents: binary.clone(),
        mode: 0o600,
    });
    let finished = run_to_end(harness.runtime(), &spec).await;
    assert_eq!(finished.status.exit_code, 0, "{finished:?}");
    let mut expected = greeting;
    expected.extend_from_slice(&binary);
    assert!(
        finished.stdout == expected,
        "the files came back different: {} bytes instead of {}",
        finished.stdout.len(),
        expected.len()
    );
}

/// The spec's environment reaches the program, values with spaces and `=` intact.
pub async fn environment_reaches_the_program(harness: &dyn Harness) {
    let program = Program::PrintEnv("CONFORMANCE_VALUE".to_owned());
    let mut spec = labelled(harness, &program, &unique("env"));
    spec.env
        .push(("CONFORMANCE_VALUE".to_owned(), "forty two = 42".to_owned()));
    let finished = run_to_end(harness.runtime(), &spec).await;
    assert_eq!(finished.status.exit_code, 0, "{finished:?}");
    assert_eq!(String::from_utf8_lossy(&finished.stdout), "forty two = 42");
}

/// `wait` reports the program's exit code, not OOM-killed, with start and finish times.
pub async fn wait_reports_the_exit_code(harness: &dyn Harness) {
    for code in [0, 3, 125] {
        let spec = labelled(harness, &Program::Exit(code), &unique("exit"));
        let finished = run_to_end(harness.runtime(), &spec).await;
        assert_eq!(finished.status.exit_code, code, "{finished:?}");
        assert!(!finished.status.oom_killed, "{finished:?}");
        // Both times are there; their order is not checked, since Docker can record a start
        // after the finish of a program that ends at once.
        assert!(
            finished.status.started_at.is_some() && finished.status.finished_at.is_some(),
            "no start or finish time: {finished:?}"
        );
    }
}

/// A program killed for exceeding its memory limit is named OOM-killed, with a non-zero exit.
pub async fn memory_limit_kill_is_named_oom(harness: &dyn Harness) {
    let spec = labelled(harness, &Program::ExceedMemory, &unique("oom"));
    assert!(
        spec.memory_bytes.is_some(),
        "the harness must set a memory limit for ExceedMemory"
    );
    let finished = run_to_end(harness.runtime(), &spec).await;
    assert!(finished.status.oom_killed, "{finished:?}");
    assert_ne!(finished.status.exit_code, 0, "{finished:?}");
}

/// `attach` keeps stdout and stderr apart.
pub async fn logs_keep_stdout_and_stderr_apart(harness: &dyn Harness) {
    let program = Program::Print {
        stdout: "to stdout\n".to_owned(),
        stderr: "to stderr\n".to_owned(),
    };
    let spec = labelled(harness, &program, &unique("logs"));
    let finished = run_to_end(harness.runtime(), &spec).await;
    assert_eq!(finished.status.exit_code, 0, "{finished:?}");
    assert_eq!(String::from_utf8_lossy(&finished.stdout), "to stdout\n");
    assert_eq!(String::from_utf8_lossy(&finished.stderr), "to stderr\n");
}

/// A running container gives resource samples (a snapshot and a stream); a stopped one gives
/// no snapshot, and its stream ends.
pub async fn stats_sample_a_running_container(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let spec = labelled(harness, &Program::Forever, &unique("stats"));
    let id = ok(within("create", runtime.create(&spec)).await, "create");
    ok(within("start", runtime.start(&id)).await, "start");
    let snapshot = ok(
        within("stats_snapshot", runtime.stats_snapshot(&id)).await,
        "stats_snapshot",
    );
    assert!(snapshot.is_some(), "no sample of a running container");
    let mut samples = runtime.stats(&id);
    match within("stats", samples.next()).await {
        Some(Ok(_)) => {}
        other => panic!("expected a sample from the stream, got {other:?}"),
    }
    ok(within("kill", runtime.kill(&id)).await, "kill");
    ok(within("wait", runtime.wait(&id)).await, "wait");
    within("the stats stream to end", async {
        while let Some(sample) = samples.next().await {
            ok(sample, "stats");
        }
    })
    .await;
    let after = ok(
        within("stats_snapshot", runtime.stats_snapshot(&id)).await,
        "stats_snapshot after the stop",
    );
    assert!(
        after.is_none(),
        "a sample of a stopped container: {after:?}"
    );
    ok(within("remove", runtime.remove(&id)).await, "remove");
}

/// `kill` stops a running container at once (not OOM-killed); killing it again succeeds.
pub async fn kill_stops_a_running_container(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let spec = labelled(harness, &Program::Forever, &unique("kill"));
    let id = ok(within("create", runtime.create(&spec)).await, "create");
    ok(within("start", runtime.start(&id)).await, "start");
    ok(within("kill", runtime.kill(&id)).await, "kill");
    let status = ok(within("wait", runtime.wait(&id)).await, "wait");
    assert_ne!(status.exit_code, 0, "{status:?}");
    assert!(!status.oom_killed, "{status:?}");
    ok(
        within("kill again", runtime.kill(&id)).await,
        "killing a stopped container",
    );
    ok(within("remove", runtime.remove(&id)).await, "remove");
}

/// `remove` takes a running container away; afterwards it is not found, nor listed.
pub async fn remove_forgets_the_container(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let runner = unique("remove");
    let spec = labelled(harness, &Program::Forever, &runner);
    let id = ok(within("create", runtime.create(&spec)).await, "create");
    ok(within("start", runtime.start(&id)).await, "start");
    ok(within("remove", runtime.remove(&id)).await, "remove");
    assert_not_found(within("wait", runtime.wait(&id)).await, &id, "wait");
    let listed = ok(
        within("list", runtime.list_labeled(RUNNER_LABEL, &runner)).await,
        "list_labeled",
    );
    assert!(
        listed.is_empty(),
        "a removed container is listed: {listed:?}"
    );
}

/// `list_labeled` finds exactly one runner's containers, created or stopped, and no others.
pub async fn list_finds_own_containers_by_runner_label(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let (mine, theirs) = (unique("mine"), unique("theirs"));
    let mut created = BTreeMap::new();
    for runner in [&mine, &mine, &theirs] {
        let spec = labelled(harness, &Program::Exit(0), runner);
        let id = ok(within("create", runtime.create(&spec)).await, "create");
        created.insert(id, runner.clone());
    }
    // One of mine has run and stopped; it is still listed.
    if let Some(stopped) = created
        .iter()
        .find(|(_, runner)| **runner == mine)
        .map(|(id, _)| id.clone())
    {
        ok(within("start", runtime.start(&stopped)).await, "start");
        ok(within("wait", runtime.wait(&stopped)).await, "wait");
    }
    let mut listed = ok(
        within("list", runtime.list_labeled(RUNNER_LABEL, &mine)).await,
        "list_labeled",
    );
    listed.sort();
    let mut expected: Vec<ContainerId> = created
        .iter()
        .filter(|(_, runner)| **runner == mine)
        .map(|(id, _)| id.clone())
        .collect();
    expected.sort();
    // The detailed listing names the same containers, with their labels; none runs now.
    let detailed = ok(
        within("list", runtime.list_labeled_containers(RUNNER_LABEL, &mine)).await,
        "list_labeled_containers",
    );
    let mut detailed_ids: Vec<ContainerId> =
        detailed.iter().map(|listed| listed.id.clone()).collect();
    detailed_ids.sort();
    for id in created.keys() {
        ok(within("remove", runtime.remove(id)).await, "remove");
    }
    assert_eq!(listed, expected);
    assert_eq!(detailed_ids, expected);
    for listed in &detailed {
        assert_eq!(
            listed.labels.get(RUNNER_LABEL).map(String::as_str),
            Some(mine.as_str()),
            "{listed:?}"
        );
        assert!(!listed.running, "{listed:?}");
    }
    let nobody = ok(
        within(
            "list",
            runtime.list_labeled(RUNNER_LABEL, &unique("nobody")),
        )
        .await,
        "list_labeled",
    );
    assert!(nobody.is_empty(), "{nobody:?}");
}

/// Every call about a container that does not exist fails with
/// [`EngineError::ContainerNotFound`], the infrastructure's kind of failure.
pub async fn unknown_containers_are_not_found(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let id = ContainerId::new(format!(
        "{:064x}",
        u128::from(std::process::id()) << 64 | 0xdead
    ));
    assert_not_found(within("start", runtime.start(&id)).await, &id, "start");
    assert_not_found(within("wait", runtime.wait(&id)).await, &id, "wait");
    assert_not_found(within("kill", runtime.kill(&id)).await, &id, "kill");
    assert_not_found(within("remove", runtime.remove(&id)).await, &id, "remove");
    assert_not_found(
        within("stats_snapshot", runtime.stats_snapshot(&id)).await,
        &id,
        "stats_snapshot",
    );
    assert_not_found(
        within("attach", runtime.attach(&id)).await.map(|_| ()),
        &id,
        "attach",
    );
}

/// The network the suite ensures; it is left in place (a runner's network outlives its
/// runs too), so every run of the suite finds it again.
pub const CONFORMANCE_NETWORK: &str = "stevedore-conformance";

/// `ensure_network` creates a network once, with containers cut off from each other and no
/// IPv6, and finds it again (also when asked twice at once); `inspect_network` reports it
/// and knows no unknown one; a container on it runs; a spec naming the network with another
/// bridge is refused as a conflict, a bad name as invalid.
pub async fn networks_are_ensured_once(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let spec = NetworkSpec {
        name: CONFORMANCE_NETWORK.to_owned(),
        bridge: "stvd-conform".to_owned(),
        subnet: None,
    };
    let (first, second) = within(
        "ensure_network",
        futures::future::join(runtime.ensure_network(&spec), runtime.ensure_network(&spec)),
    )
    .await;
    let (first, second) = (ok(first, "ensure_network"), ok(second, "ensure_network"));
    assert_eq!(first, second, "two ensures found two networks");
    let again = ok(
        within("ensure_network", runtime.ensure_network(&spec)).await,
        "ensure_network again",
    );
    assert_eq!(again.id, first.id);
    assert_eq!(first.name, CONFORMANCE_NETWORK);
    assert_eq!(first.bridge.as_deref(), Some("stvd-conform"));
    assert!(!first.inter_container, "{first:?}");
    assert!(!first.ipv6, "{first:?}");
    assert!(
        first
            .gateways
            .iter()
            .any(|gateway| first.subnets.iter().any(|subnet| subnet.contains(gateway))),
        "no gateway inside the subnet: {first:?}"
    );
    let inspected = ok(
        within(
            "inspect_network",
            runtime.inspect_network(CONFORMANCE_NETWORK),
        )
        .await,
        "inspect_network",
    );
    assert_eq!(inspected.as_ref(), Some(&first));
    let unknown = ok(
        within(
            "inspect_network",
            runtime.inspect_network(&unique("no-such-network")),
        )
        .await,
        "inspect_network of an unknown network",
    );
    assert_eq!(unknown, None);

    let mut on_it = labelled(harness, &Program::Exit(0), &unique("network"));
    on_it.network_mode = Some(CONFORMANCE_NETWORK.to_owned());
    let finished = run_to_end(runtime, &on_it).await;
    assert_eq!(finished.status.exit_code, 0, "{finished:?}");

    let other_bridge = NetworkSpec {
        bridge: "stvd-other".to_owned(),
        ..spec.clone()
    };
    match within("ensure_network", runtime.ensure_network(&other_bridge)).await {
        Err(EngineError::Conflict { .. }) => {}
        other => panic!("a network of the same name with another bridge: {other:?}"),
    }
    let bad_name = NetworkSpec {
        name: "host".to_owned(),
        ..spec
    };
    match within("ensure_network", runtime.ensure_network(&bad_name)).await {
        Err(EngineError::InvalidSpec { .. }) => {}
        other => panic!("a network named host: {other:?}"),
    }
}

fn assert_not_found<T: std::fmt::Debug>(
    result: Result<T, EngineError>,
    id: &ContainerId,
    what: &str,
) {
    match result {
        Err(error @ EngineError::ContainerNotFound { .. }) => {
            assert!(error.is_infrastructure());
            assert_eq!(error.kind(), "no_such_container");
        }
        other => panic!("{what} of the unknown container {id}: expected not found, got {other:?}"),
    }
}

/// One `#[tokio::test]` per check of the suite, each with a harness from `$make`, an
/// `async fn(&'static str) -> Option<H>` given the check's name (`None` skips the check, for
/// a runtime that is not there outside CI).
#[macro_export]
macro_rules! runtime_conformance_tests {
    ($make:ident) => {
        $crate::runtime_conformance_tests!(@checks $make;
            capabilities_answer,
            files_are_in_place_when_it_starts,
            environment_reaches_the_program,
            wait_reports_the_exit_code,
            memory_limit_kill_is_named_oom,
            logs_keep_stdout_and_stderr_apart,
            stats_sample_a_running_container,
            kill_stops_a_running_container,
            remove_forgets_the_container,
            list_finds_own_containers_by_runner_label,
            unknown_containers_are_not_found,
            networks_are_ensured_once
        );
    };
    (@checks $make:ident; $($check:ident),*) => {
        /// The runtime conformance suite (`stevedore_engine::conformance`).
        mod conformance {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    if let Some(harness) = super::$make(stringify!($check)).await {
                        $crate::conformance::$check(&harness).await;
                    }
                }
            )*
        }
    };
}
