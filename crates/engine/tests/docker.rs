//! Integration tests against the real Docker engine: no mocks.
//!
//! They skip, saying why, when the engine is not reachable and `CI` is not set; with `CI` set
//! a missing engine fails them. `scripts/ensure-docker.sh` starts one. Every container carries
//! `stevedore.task=<test>-<pid>` and `stevedore.test=1` and is removed by the test (and, should
//! it panic, by its [`Cleanup`] guard), so `docker ps -a --filter label=stevedore.task` is empty
//! after a run. The tests build `stevedore/busybox:local` once per run from `/bin/busybox`;
//! images they build from Dockerfiles are tagged `stevedore-test/...:<pid>` and removed by
//! tag at the end (and, should a test panic, by its [`ImageCleanup`] guard).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stevedore_engine::conformance::{Harness, Program};
use stevedore_engine::{
    BuildProgress, BuildRequest, ContainerId, ContainerRuntime, ContainerSpec, DockerEngine,
    EngineError, ExitStatus, FileToUpload, HOST_BUSYBOX, ImageBuilder, ImagePresence, ImageStore,
    LOCAL_BUSYBOX_IMAGE, LogChunkStream, OutputStream, PullProgress, Requirements,
    build_local_busybox_image, check_required,
};
use tokio::sync::OnceCell;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A container's collected output.
#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
}

/// Removes every container of one test when dropped, even when the test panicked.
struct Cleanup {
    task: String,
}

/// Removes images by tag when dropped, even when the test panicked.
struct ImageCleanup {
    tags: Vec<String>,
}

static LOCAL_IMAGE: OnceCell<()> = OnceCell::const_new();

/// The longest a build or pull in these tests may take before the test fails instead of
/// hanging: a safety net, far above what they need.
const SAFETY_NET: Duration = Duration::from_secs(120);

fn ci_requires_docker() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The engine, or `None` (the test then skips) when it is unreachable outside CI.
async fn engine() -> Option<DockerEngine> {
    match DockerEngine::connect().await {
        Ok(engine) => Some(engine),
        Err(error) if ci_requires_docker() => {
            panic!("CI is set and the Docker engine is not reachable: {error}")
        }
        Err(error) => {
            // Straight to stderr: the test harness swallows `eprintln!` of passing tests, and
            // a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: the Docker engine is not reachable ({error}); run \
                 scripts/ensure-docker.sh, or set CI=true to make this a failure"
            );
            None
        }
    }
}

macro_rules! engine_or_skip {
    () => {
        match engine().await {
            Some(engine) => engine,
            None => return Ok(()),
        }
    };
}

/// Builds `stevedore/busybox:local` once per test run.
async fn local_image(engine: &DockerEngine) -> Result<(), EngineError> {
    LOCAL_IMAGE
        .get_or_try_init(|| async {
            build_local_busybox_image(engine, Path::new(HOST_BUSYBOX), LOCAL_BUSYBOX_IMAGE)
                .await
                .map(|_| ())
        })
        .await
        .map(|_| ())
}

/// The real engine under the runtime conformance suite: every program is a busybox shell,
/// labelled for its check so its [`Cleanup`] removes whatever a failed check left.
struct DockerHarness {
    engine: DockerEngine,
    task: String,
    _cleanup: Cleanup,
}

async fn docker_harness(check: &'static str) -> Option<DockerHarness> {
    Some(harness_on(engine().await?, &format!("conformance-{check}")).await)
}

/// The harness on `engine`, its containers labelled for `label`.
async fn harness_on(engine: DockerEngine, label: &str) -> DockerHarness {
    if let Err(error) = local_image(&engine).await {
        panic!("cannot build {LOCAL_BUSYBOX_IMAGE}: {error}");
    }
    let task = task_label(label);
    DockerHarness {
        engine,
        _cleanup: Cleanup::new(&task),
        task,
    }
}

impl Harness for DockerHarness {
    fn runtime(&self) -> &dyn ContainerRuntime {
        &self.engine
    }

    fn spec(&self, program: &Program) -> ContainerSpec {
        match program {
            Program::Exit(code) => shell(&self.task, &format!("exit {code}")),
            Program::Print { stdout, stderr } => {
                let mut spec = shell(
                    &self.task,
                    "printf '%s' \"$CONFORMANCE_STDOUT\"; printf '%s' \"$CONFORMANCE_STDERR\" >&2",
                );
                spec.env.push(("CONFORMANCE_STDOUT".into(), stdout.clone()));
                spec.env.push(("CONFORMANCE_STDERR".into(), stderr.clone()));
                spec
            }
            Program::CatFiles(paths) => {
                let mut spec = shell(&self.task, "");
                spec.cmd = Some(
                    std::iter::once("cat".to_owned())
                        .chain(paths.iter().cloned())
                        .collect(),
                );
                spec
            }
            Program::PrintEnv(name) => shell(&self.task, &format!("printf '%s' \"${name}\"")),
            Program::ListFiles(directory) => {
                let mut spec = shell(
                    &self.task,
                    "find \"$CONFORMANCE_DIR\" -mindepth 1 | while read -r path; do \
                     if [ -d \"$path\" ]; then stat -c '%a %n/' \"$path\"; \
                     else stat -c '%a %n' \"$path\"; fi; done",
                );
                spec.env.push(("CONFORMANCE_DIR".into(), directory.clone()));
                spec
            }
            Program::CountBytes(path) => {
                let mut spec = shell(&self.task, "wc -c < \"$CONFORMANCE_FILE\"");
                spec.env.push(("CONFORMANCE_FILE".into(), path.clone()));
                spec
            }
            Program::ExceedMemory => {
                // The shell itself (PID 1) holds 64 MiB in a variable against an 8 MiB limit.
                let mut spec = shell(
                    &self.task,
                    "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}",
                );
                spec.memory_bytes = Some(8 << 20);
                spec
            }
            Program::PrintGroups => shell(&self.task, "id -G"),
            Program::Forever => shell(&self.task, "sleep 3600"),
        }
    }
}

stevedore_engine::runtime_conformance_tests!(docker_harness);

/// The label of everything one test made for its tasks, network holders included (which
/// carry a task's labels but its `stevedore.task`).
const TEST_RUN_LABEL: &str = "stevedore.test-run";

fn task_label(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// A busybox container running `script` with `sh -c`, labelled for `task`.
fn shell(task: &str, script: &str) -> ContainerSpec {
    let mut spec = ContainerSpec::new(LOCAL_BUSYBOX_IMAGE);
    spec.cmd = Some(vec!["sh".into(), "-c".into(), script.into()]);
    spec.labels = BTreeMap::from([
        ("stevedore.task".to_owned(), task.to_owned()),
        (TEST_RUN_LABEL.to_owned(), task.to_owned()),
        ("stevedore.test".to_owned(), "1".to_owned()),
    ]);
    spec.memory_bytes = Some(64 << 20);
    spec.pids_limit = Some(64);
    spec.network_mode = Some("none".to_owned());
    spec
}

async fn collect(mut logs: LogChunkStream) -> Result<Output, EngineError> {
    let mut output = Output::default();
    while let Some(chunk) = logs.next().await {
        let chunk = chunk?;
        let text = String::from_utf8_lossy(&chunk.bytes);
        match chunk.stream {
            OutputStream::Stdout => output.stdout.push_str(&text),
            OutputStream::Stderr => output.stderr.push_str(&text),
        }
    }
    Ok(output)
}

/// Creates, starts, collects output, waits and removes.
async fn run(
    engine: &DockerEngine,
    spec: &ContainerSpec,
) -> Result<(ExitStatus, Output), EngineError> {
    let id = engine.create(spec).await?;
    let result = async {
        let attached = engine.attach(&id).await?;
        engine.start(&id).await?;
        let output = collect(attached).await?;
        let status = engine.wait(&id).await?;
        Ok((status, output))
    }
    .await;
    engine.remove(&id).await?;
    result
}

// === impl Cleanup ===

impl Cleanup {
    fn new(task: &str) -> Self {
        Cleanup {
            task: task.to_owned(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let task = self.task.clone();
        // Drop cannot await; a thread with its own runtime can, whatever runtime (if any) is
        // dropping us.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok(engine) = DockerEngine::connect().await else {
                    return;
                };
                // Network holders carry the run's label, not the task's.
                for label in ["stevedore.task", TEST_RUN_LABEL] {
                    if let Ok(ids) = engine.list_labeled(label, &task).await {
                        for id in ids {
                            let _ = engine.remove(&id).await;
                        }
                    }
                }
            });
        })
        .join();
    }
}

// === impl ImageCleanup ===

impl ImageCleanup {
    fn new(tags: &[&str]) -> Self {
        ImageCleanup {
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
        }
    }
}

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        let tags = std::mem::take(&mut self.tags);
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok(engine) = DockerEngine::connect().await else {
                    return;
                };
                for tag in tags {
                    // Already removed by the test itself, or never built: fine.
                    let _ = engine.remove_image(&tag).await;
                }
            });
        })
        .join();
    }
}

/// An image tag only this test process uses.
fn test_tag(name: &str) -> String {
    format!("stevedore-test/{name}:{}", std::process::id())
}

/// Writes `files` (path, contents) into a fresh directory.
fn context_with(files: &[(&str, &str)]) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for (path, contents) in files {
        let path = dir.path().join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, contents)?;
    }
    Ok(dir)
}

/// Builds within the safety net, collecting the progress events.
async fn build(
    engine: &DockerEngine,
    request: &BuildRequest,
) -> Result<
    (
        Result<stevedore_engine::BuiltImage, EngineError>,
        Vec<BuildProgress>,
    ),
    EngineError,
> {
    let mut events = Vec::new();
    let built = tokio::time::timeout(
        SAFETY_NET,
        engine.build_image(request, &mut |event| events.push(event)),
    )
    .await
    .map_err(|_| EngineError::Timeout)?;
    Ok((built, events))
}

fn output_lines(events: &[BuildProgress]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|event| match event {
            BuildProgress::Output { line } => Some(line.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn capabilities_report_enforceable_limits_and_a_negotiated_version() -> TestResult {
    let engine = engine_or_skip!();
    let capabilities = engine.capabilities().await?;
    eprintln!("{capabilities:?}");
    assert!(
        capabilities.memory_limit,
        "memory limits must be enforceable here"
    );
    assert!(capabilities.pids_limit);
    assert!(capabilities.cpu_cfs_quota);
    assert!(capabilities.ncpu >= 1);
    assert!(capabilities.mem_total > 0);
    assert!(!capabilities.server_version.is_empty());
    assert!(!capabilities.api_version.is_empty());
    // Never newer than what the engine speaks (Debian's 20.10 speaks 1.41).
    let version = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    assert!(version(&capabilities.negotiated_api_version) <= version(&capabilities.api_version));
    check_required(&capabilities, &Requirements::default())?;
    Ok(())
}

#[tokio::test]
async fn the_local_busybox_image_runs_applets_and_nobody_can_write_the_task_dir() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    assert!(engine.image_present(LOCAL_BUSYBOX_IMAGE).await?);

    let task = task_label("busybox-image");
    let _cleanup = Cleanup::new(&task);
    let (status, output) = run(
        &engine,
        &shell(
            &task,
            "id -un; grep -c nobody /etc/passwd; pwd; echo hi | sha256sum | head -c 8; echo; \
             seq 3 | wc -l; printf '%s\\n' ok; test -d /tmp && echo tmp",
        ),
    )
    .await?;
    assert_eq!(status.exit_code, 0, "{output:?}");
    assert_eq!(
        output.stdout, "root\n1\n/mnt/task\n98ea6e4f\n3\nok\ntmp\n",
        "{output:?}"
    );

    let mut as_nobody = shell(
        &task,
        "id -u; echo written > /mnt/task/f && cat /mnt/task/f",
    );
    as_nobody.user = Some("65534:65534".to_owned());
    let (status, output) = run(&engine, &as_nobody).await?;
    assert_eq!(status.exit_code, 0, "{output:?}");
    assert_eq!(output.stdout, "65534\nwritten\n");

    let mut entrypoint = shell(&task, "");
    entrypoint.entrypoint = Some(vec!["echo".to_owned()]);
    entrypoint.cmd = Some(vec!["from".to_owned(), "entrypoint".to_owned()]);
    let (_, output) = run(&engine, &entrypoint).await?;
    assert_eq!(output.stdout, "from entrypoint\n");

    assert!(
        engine
            .list_labeled("stevedore.task", &task)
            .await?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn uploaded_files_and_env_are_there_when_the_task_starts() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("uploads");
    let _cleanup = Cleanup::new(&task);

    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut spec = shell(
        &task,
        "echo \"$TASK_ID|$PAYLOAD_FILE|$WITH_SPACES\"; cat \"$PAYLOAD_FILE\"; echo; \
         cat /mnt/.task_config; echo; /mnt/task/hello.sh; wc -c < /mnt/task/big.bin; \
         ls -ld /mnt/task | cut -c1-10; touch /mnt/task/new && echo writable",
    );
    spec.env = vec![
        ("TASK_ID".into(), "t-123".into()),
        ("PAYLOAD_FILE".into(), "/mnt/.task_payload".into()),
        ("WITH_SPACES".into(), "a b  c".into()),
    ];
    spec.files = vec![
        FileToUpload::readable("/mnt/.task_payload", r#"{"n":1}"#),
        FileToUpload::readable("/mnt/.task_config", "config-text"),
        FileToUpload {
            path: "/mnt/task/hello.sh".into(),
            contents: b"#!/bin/sh\necho hello from script\n".to_vec(),
            mode: 0o755,
        },
        FileToUpload::readable("/mnt/task/big.bin", big),
    ];
    spec.user = Some("65534".to_owned());
    let (status, output) = run(&engine, &spec).await?;
    assert_eq!(status.exit_code, 0, "{output:?}");
    assert_eq!(
        output.stdout,
        "t-123|/mnt/.task_payload|a b  c\n{\"n\":1}\nconfig-text\nhello from script\n1000000\n\
         drwxrwxrwx\nwritable\n"
    );
    Ok(())
}

#[tokio::test]
async fn exit_codes_and_times_come_from_the_container_state() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("exit-codes");
    let _cleanup = Cleanup::new(&task);

    for code in [0, 1, 3, 42] {
        let (status, _) = run(&engine, &shell(&task, &format!("exit {code}"))).await?;
        assert_eq!(status.exit_code, code);
        assert!(!status.oom_killed);
        assert_eq!(status.success(), code == 0);
        assert!(
            status.started_at.is_some() && status.finished_at.is_some(),
            "{status:?}"
        );
        assert!(
            status.run_time() < Some(Duration::from_secs(10)),
            "{status:?}"
        );
    }

    // A command that does not exist: the engine fails the start (400/404 class), the user's.
    let mut missing = shell(&task, "");
    missing.cmd = Some(vec!["/no/such/binary".to_owned()]);
    let id = engine.create(&missing).await?;
    let started = engine.start(&id).await;
    engine.remove(&id).await?;
    match started {
        Err(error) => assert!(!error.is_infrastructure(), "{error:?}"),
        Ok(()) => panic!("starting a missing binary succeeded"),
    }
    Ok(())
}

#[tokio::test]
async fn the_memory_limit_kills_and_state_says_oom_killed() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("oom");
    let _cleanup = Cleanup::new(&task);

    // The shell itself (PID 1) holds 64 MiB in a variable against an 8 MiB limit.
    let mut spec = shell(
        &task,
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}",
    );
    spec.memory_bytes = Some(8 << 20);
    let (status, output) = run(&engine, &spec).await?;
    eprintln!("oom: {status:?} {output:?}");
    assert!(
        status.oom_killed,
        "expected OOMKilled: {status:?} {output:?}"
    );
    assert_ne!(status.exit_code, 0);
    assert!(!output.stdout.contains("survived"));

    // The same work under a large enough limit is fine: the limit, not the script, killed it.
    spec.memory_bytes = Some(512 << 20);
    let (status, output) = run(&engine, &spec).await?;
    assert_eq!(status.exit_code, 0, "{output:?}");
    assert!(!status.oom_killed);
    assert_eq!(output.stdout, "survived 67108864\n");
    Ok(())
}

#[tokio::test]
async fn kill_stops_a_running_task_at_once() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("kill");
    let _cleanup = Cleanup::new(&task);

    let id = engine
        .create(&shell(&task, "echo started; sleep 300"))
        .await?;
    let mut logs = engine.attach(&id).await?;
    engine.start(&id).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), logs.next()).await?;
    assert!(matches!(first, Some(Ok(ref chunk)) if &chunk.bytes[..] == b"started\n"));

    let killed_at = Instant::now();
    engine.kill(&id).await?;
    let status = tokio::time::timeout(Duration::from_secs(10), engine.wait(&id)).await??;
    assert!(killed_at.elapsed() < Duration::from_secs(5));
    assert_eq!(status.exit_code, 137);
    assert!(!status.oom_killed);
    // The log stream ends with the container.
    let rest = tokio::time::timeout(Duration::from_secs(10), logs.next()).await?;
    assert!(rest.is_none());
    // Killing a stopped container is not an error.
    engine.kill(&id).await?;
    engine.remove(&id).await?;
    Ok(())
}

#[tokio::test]
async fn logs_stream_live_with_stdout_and_stderr_apart() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("logs");
    let _cleanup = Cleanup::new(&task);

    let id = engine
        .create(&shell(
            &task,
            "echo out1; echo err1 >&2; sleep 2; echo out2; echo err2 >&2",
        ))
        .await?;
    let mut logs = engine.attach(&id).await?;
    engine.start(&id).await?;
    let started = Instant::now();
    let mut chunks = Vec::new();
    while let Some(chunk) = logs.next().await {
        chunks.push((started.elapsed(), chunk?));
    }
    let status = engine.wait(&id).await?;
    engine.remove(&id).await?;
    assert_eq!(status.exit_code, 0);

    let text = |stream: OutputStream| -> String {
        chunks
            .iter()
            .filter(|(_, c)| c.stream == stream)
            .map(|(_, c)| String::from_utf8_lossy(&c.bytes).into_owned())
            .collect()
    };
    assert_eq!(text(OutputStream::Stdout), "out1\nout2\n");
    assert_eq!(text(OutputStream::Stderr), "err1\nerr2\n");
    // The first lines arrived while the task still ran, not at its end.
    let first_at = chunks.first().map(|(at, _)| *at).unwrap_or_default();
    let last_at = chunks.last().map(|(at, _)| *at).unwrap_or_default();
    assert!(
        last_at - first_at >= Duration::from_millis(1500),
        "not streamed: {chunks:?}"
    );
    Ok(())
}

/// Regression (disks filled by the engine's own log of a task): a task printing as fast as
/// it can leaves no log file with the engine, and a reader slower than the task still gets
/// every byte in order, because the task's writes wait for it.
#[tokio::test]
async fn fast_output_reaches_a_slow_reader_whole_and_the_engine_keeps_no_log_file() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("flood");
    let _cleanup = Cleanup::new(&task);

    // About 20 MB in 2.5 million short lines: with the json-file driver that is about
    // 200 MB on disk, and a follower of a rotated file loses most of it.
    let lines = 2_500_000u32;
    let id = engine
        .create(&shell(&task, &format!("seq 1 {lines}")))
        .await?;
    let log_path = docker_inspect(&id, "{{.LogPath}}")?;
    assert_eq!(log_path, "", "the engine keeps a log file: {log_path}");
    let mut output = engine.attach(&id).await?;
    engine.start(&id).await?;
    let mut stdout = Vec::new();
    let mut chunks = 0u32;
    while let Some(chunk) = tokio::time::timeout(SAFETY_NET, output.next()).await? {
        stdout.extend_from_slice(&chunk?.bytes);
        chunks += 1;
        // A reader slower than the task: the task waits for it.
        if chunks.is_multiple_of(64) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let status = engine.wait(&id).await?;
    engine.remove(&id).await?;
    assert_eq!(status.exit_code, 0);
    let expected: String = (1..=lines).map(|n| format!("{n}\n")).collect();
    assert_eq!(stdout.len(), expected.len());
    assert!(
        stdout == expected.as_bytes(),
        "the output arrived out of order"
    );
    Ok(())
}

/// On its own host the engine keeps each container's account in a cgroup of its own that
/// outlives the container: the usage it reports with the exit is exact (this program's
/// memory is more than one sample could have seen, as it exits at once), and the cgroup goes
/// with the container.
#[tokio::test]
async fn a_containers_usage_group_holds_its_usage_and_goes_with_it() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("usage-group");
    let _cleanup = Cleanup::new(&task);

    // 16 MiB held in a shell variable for an instant, then the program exits.
    let id = engine
        .create(&shell(
            &task,
            "x=$(head -c 16777216 /dev/zero | tr '\\0' a); echo ${#x}",
        ))
        .await?;
    let group = docker_inspect(&id, "{{.HostConfig.CgroupParent}}")?;
    assert!(
        group.starts_with("/stevedore-usage/usage-"),
        "not in a usage group: {group:?}"
    );
    let mut output = engine.attach(&id).await?;
    engine.start(&id).await?;
    assert!(
        engine.usage_accounted(&id).await,
        "the usage group is not here"
    );
    let status = engine.wait(&id).await?;
    let mut stdout = Vec::new();
    while let Some(chunk) = output.next().await {
        stdout.extend_from_slice(&chunk?.bytes);
    }
    assert_eq!(String::from_utf8_lossy(&stdout), "16777216\n");
    let usage = status.usage.ok_or("no usage with the exit")?;
    assert!(
        usage
            .peak_memory_bytes
            .is_some_and(|bytes| bytes > 16 << 20),
        "{usage:?}"
    );
    assert!(usage.cpu_total_ns.is_some_and(|ns| ns > 0), "{usage:?}");

    let cgroups = Path::new("/sys/fs/cgroup");
    let memory_group = if cgroups.join("cgroup.controllers").exists() {
        cgroups.join(group.trim_start_matches('/'))
    } else {
        cgroups.join("memory").join(group.trim_start_matches('/'))
    };
    assert!(
        memory_group.is_dir(),
        "{} is missing",
        memory_group.display()
    );
    engine.remove(&id).await?;
    assert!(
        !memory_group.exists(),
        "{} outlived its container",
        memory_group.display()
    );
    Ok(())
}

/// One field of `docker inspect` of a container, through the docker CLI (what an operator
/// would look at).
fn docker_inspect(
    id: &ContainerId,
    format: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let inspected = std::process::Command::new("docker")
        .args(["inspect", "--format", format, id.as_str()])
        .output()?;
    if !inspected.status.success() {
        return Err(String::from_utf8_lossy(&inspected.stderr)
            .into_owned()
            .into());
    }
    Ok(String::from_utf8_lossy(&inspected.stdout).trim().to_owned())
}

#[tokio::test]
async fn the_pids_limit_holds_a_fork_bomb() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    assert!(engine.capabilities().await?.pids_limit);
    let task = task_label("fork-bomb");
    let _cleanup = Cleanup::new(&task);

    // PID 1 forks once, before the bomb grows, then `exec`s: the bomb cannot starve it.
    let mut spec = shell(&task, "(bomb() { bomb | bomb & }; bomb) & exec sleep 30");
    spec.pids_limit = Some(32);
    let id = engine.create(&spec).await?;
    engine.start(&id).await?;
    // At least three seconds of samples; on a loaded machine the engine may need longer to
    // answer with a first one.
    let mut peak = 0;
    for round in 0..30 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(sample) = engine.stats_snapshot(&id).await? {
            peak = peak.max(sample.pids.unwrap_or(0));
        }
        if round >= 5 && peak > 1 {
            break;
        }
    }
    eprintln!("fork bomb peak pids: {peak}");
    assert!(peak > 1, "the bomb did not run");
    assert!(peak <= 32, "the pids limit did not hold: {peak}");
    // The engine still answers while the bomb runs.
    engine.capabilities().await?;
    let took = engine.remove(&id).await?;
    eprintln!("removing the fork bomb took {took:?}");
    assert!(
        engine
            .list_labeled("stevedore.task", &task)
            .await?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn resource_peaks_are_recorded_while_the_task_runs() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("stats");
    let _cleanup = Cleanup::new(&task);

    let mut spec = shell(
        &task,
        "x=$(head -c 16777216 /dev/zero | tr '\\0' a); sleep 3; echo ${#x}",
    );
    spec.memory_bytes = Some(256 << 20);
    let id = engine.create(&spec).await?;
    engine.start(&id).await?;
    let peak = {
        let engine = engine.clone();
        let id = id.clone();
        tokio::spawn(async move { engine.resource_peak(&id).await })
    };
    let status = engine.wait(&id).await?;
    let usage = tokio::time::timeout(Duration::from_secs(10), peak).await???;
    engine.remove(&id).await?;
    eprintln!("usage: {usage:?}");
    assert_eq!(status.exit_code, 0);
    assert!(usage.samples >= 1);
    assert!(
        usage.peak_memory_bytes.unwrap_or(0) >= 32 << 20,
        "{usage:?}"
    );
    assert!(usage.cpu_total_ns.unwrap_or(0) > 0);
    // A stopped container has no snapshot.
    Ok(())
}

#[tokio::test]
async fn remove_leaves_nothing_and_is_timed() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("remove");
    let _cleanup = Cleanup::new(&task);

    let created = engine.create(&shell(&task, "true")).await?;
    let exited = engine.create(&shell(&task, "true")).await?;
    engine.start(&exited).await?;
    engine.wait(&exited).await?;
    let running = engine.create(&shell(&task, "sleep 300")).await?;
    engine.start(&running).await?;

    let mut listed = engine.list_labeled("stevedore.task", &task).await?;
    listed.sort();
    let mut expected = vec![created.clone(), exited.clone(), running.clone()];
    expected.sort();
    assert_eq!(listed, expected);

    for (what, id) in [
        ("created", &created),
        ("exited", &exited),
        ("running", &running),
    ] {
        let took = engine.remove(id).await?;
        eprintln!("removing the {what} container took {took:?}");
        assert!(took < Duration::from_secs(30));
    }
    assert!(
        engine
            .list_labeled("stevedore.task", &task)
            .await?
            .is_empty()
    );
    assert!(matches!(
        engine.remove(&created).await,
        Err(EngineError::ContainerNotFound { .. })
    ));
    assert!(matches!(
        engine.wait(&created).await,
        Err(EngineError::ContainerNotFound { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn image_failures_are_classified_from_the_engines_answers() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("image-errors");
    let _cleanup = Cleanup::new(&task);

    // Present: concurrent callers all see it present, nothing is pulled.
    let checks = (0..5).map(|_| engine.ensure_image(LOCAL_BUSYBOX_IMAGE, None, None));
    for presence in futures::future::join_all(checks).await {
        assert_eq!(presence?, ImagePresence::AlreadyPresent);
    }

    // A registry that cannot be reached: the engine answers 5xx, the infrastructure's.
    let (sink, mut progress) = tokio::sync::mpsc::unbounded_channel();
    let unreachable = engine
        .ensure_image("registry.invalid/stevedore/none:1", None, Some(sink))
        .await;
    match unreachable {
        Err(error @ EngineError::PullFailed { .. }) => assert!(error.is_infrastructure()),
        other => panic!("expected PullFailed, got {other:?}"),
    }
    let mut events = Vec::new();
    while let Ok(event) = progress.try_recv() {
        events.push(event);
    }
    assert!(matches!(
        events.last(),
        Some(stevedore_engine::PullProgress::Finished { ok: false, .. })
    ));

    // A malformed reference: 400, the user's.
    let malformed = engine.ensure_image("Not//Valid", None, None).await;
    assert!(
        matches!(malformed, Err(ref e) if !e.is_infrastructure()),
        "{malformed:?}"
    );

    // Creating from an image that is not there: 404 on create, the user's missing image.
    let missing = engine
        .create(&ContainerSpec {
            image: "stevedore/not-built:never".into(),
            ..shell(&task, "true")
        })
        .await;
    assert!(
        matches!(missing, Err(EngineError::ImageNotFound { .. })),
        "{missing:?}"
    );

    // A 404 for a missing network is not mistaken for a missing image.
    let mut bad_network = shell(&task, "true");
    bad_network.network_mode = Some("stevedore-no-such-network".into());
    let result = engine.create(&bad_network).await;
    match result {
        Err(error) => {
            assert!(
                !matches!(error, EngineError::ImageNotFound { .. }),
                "{error:?}"
            );
            assert!(!error.is_infrastructure(), "{error:?}");
        }
        Ok(id) => {
            // Engine 20.10 checks the network only on start, and answers 404 there too.
            let started = engine.start(&id).await;
            engine.remove(&id).await?;
            assert!(
                matches!(started, Err(EngineError::Refused { .. })),
                "{started:?}"
            );
        }
    }
    assert!(
        engine
            .list_labeled("stevedore.task", &task)
            .await?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn containers_run_without_new_privileges_and_with_few_capabilities() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("security");
    let _cleanup = Cleanup::new(&task);

    let (status, output) = run(
        &engine,
        &shell(&task, "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"),
    )
    .await?;
    assert_eq!(status.exit_code, 0, "{output:?}");
    // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID NET_BIND_SERVICE SETFCAP.
    assert!(
        output.stdout.contains("CapEff:\t00000000800004fb"),
        "{output:?}"
    );
    assert!(output.stdout.contains("NoNewPrivs:\t1"), "{output:?}");
    Ok(())
}

#[tokio::test]
async fn waits_and_log_follows_outlast_the_clients_request_timeout() -> TestResult {
    // bollard's timeout bounds the wait for an answer's headers; the engine sends those at
    // once for wait, logs and stats, so a task may run far longer than the timeout.
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("long-wait");
    let _cleanup = Cleanup::new(&task);

    // Short, but not so short that a create on a loaded machine runs into it.
    let client = bollard::Docker::connect_with_defaults()?.with_timeout(Duration::from_secs(3));
    let short = DockerEngine::with_client(client).await?;
    let (status, output) = run(&short, &shell(&task, "sleep 7; echo done")).await?;
    assert_eq!(status.exit_code, 0);
    assert_eq!(output.stdout, "done\n");
    Ok(())
}

#[tokio::test]
async fn a_dockerfile_builds_an_image_with_its_copies_and_runs() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("build");
    let _cleanup = Cleanup::new(&task);
    let tag = test_tag("built");
    let second_tag = format!("{tag}-second");
    let _images = ImageCleanup::new(&[&tag, &second_tag]);

    let files = [
        (
            "Dockerfile",
            "FROM stevedore/busybox:local\n\
             ARG GREETING=hello\n\
             COPY app/ /app/\n\
             RUN echo \"$GREETING from RUN\" > /app/built.txt && echo output of the step\n\
             CMD [\"/app/run.sh\"]\n",
        ),
        (".dockerignore", "app/secret.txt\n*/*.log\n!app/keep.log\n"),
        (
            "app/run.sh",
            "#!/bin/sh\ncat /app/data.txt /app/built.txt\nls /app\n\
             [ -L /app/link ] && echo \"link: $(cat /app/link)\"\n",
        ),
        ("app/data.txt", "data\n"),
        ("app/secret.txt", "hunter2\n"),
        ("app/debug.log", "noise\n"),
        ("app/keep.log", "kept\n"),
    ];
    let dir = context_with(&files)?;
    let sent_bytes: usize = files
        .iter()
        .filter(|(path, _)| !["app/secret.txt", "app/debug.log"].contains(path))
        .map(|(_, contents)| contents.len())
        .sum();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("app/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        std::os::unix::fs::symlink("data.txt", dir.path().join("app/link"))?;
    }
    let mut request = BuildRequest::new(dir.path())
        .tag(tag.as_str())
        .tag(second_tag.as_str());
    request.build_args.insert("GREETING".into(), "hi".into());
    request.labels.insert("stevedore.test".into(), "1".into());

    let (built, events) = build(&engine, &request).await?;
    let built = built?;
    assert_eq!(built.tags, vec![tag.clone(), second_tag.clone()]);
    assert_eq!(engine.image_id(&tag).await?, Some(built.id.clone()));
    assert_eq!(engine.image_id(&second_tag).await?, Some(built.id.clone()));

    // Progress: the context's size first, then every step in order, the RUN's output, the id.
    assert_eq!(
        events.first(),
        Some(&BuildProgress::Context {
            files: 5,
            bytes: sent_bytes as u64
        }),
        "Dockerfile, .dockerignore, run.sh, data.txt and keep.log: {events:?}"
    );
    let steps: Vec<(u32, u32, &str)> = events
        .iter()
        .filter_map(|event| match event {
            BuildProgress::Step {
                number,
                total,
                instruction,
            } => Some((*number, *total, instruction.as_str())),
            _ => None,
        })
        .collect();
    eprintln!("steps: {steps:?}");
    // Five instructions, and the engine counts one more for the labels.
    assert!(steps.len() >= 5, "{steps:?}");
    for (index, (number, total, _)) in steps.iter().enumerate() {
        assert_eq!(*number as usize, index + 1, "{steps:?}");
        assert_eq!(*total as usize, steps.len(), "{steps:?}");
    }
    assert_eq!(steps[0].2, "FROM stevedore/busybox:local");
    assert!(steps[3].2.starts_with("RUN echo"), "{steps:?}");
    assert!(
        output_lines(&events).contains(&"output of the step"),
        "{events:?}"
    );
    assert!(events.contains(&BuildProgress::ImageId {
        id: built.id.clone()
    }));

    // The image runs its CMD: the copied files are there, the RUN's file too, the link is
    // a link, and what .dockerignore left out is not.
    let mut spec = shell(&task, "");
    spec.image = tag.clone();
    spec.cmd = None;
    let (status, output) = run(&engine, &spec).await?;
    assert_eq!(status.exit_code, 0, "{output:?}");
    let expected = if cfg!(unix) {
        "data\nhi from RUN\nbuilt.txt\ndata.txt\nkeep.log\nlink\nrun.sh\nlink: data\n"
    } else {
        "data\nhi from RUN\nbuilt.txt\ndata.txt\nkeep.log\nrun.sh\n"
    };
    assert_eq!(output.stdout, expected, "{output:?}");

    engine.remove_image(&second_tag).await?;
    engine.remove_image(&tag).await?;
    assert_eq!(engine.image_id(&built.id).await?, None);
    Ok(())
}

#[tokio::test]
async fn a_failing_run_step_is_the_users_error_with_the_engines_message() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let tag = test_tag("fails");
    let _images = ImageCleanup::new(&[&tag]);
    let dir = context_with(&[(
        "Dockerfile",
        "FROM stevedore/busybox:local\nRUN echo about to fail && exit 3\n",
    )])?;

    let (built, events) = build(&engine, &BuildRequest::new(dir.path()).tag(tag.as_str())).await?;
    match built {
        Err(ref error @ EngineError::BuildFailed { ref message }) => {
            assert!(!error.is_infrastructure());
            // The engine's own words reach the user, the step's exit code included.
            assert!(message.contains("code: 3"), "{message}");
        }
        other => panic!("expected BuildFailed, got {other:?}"),
    }
    assert!(
        output_lines(&events).contains(&"about to fail"),
        "{events:?}"
    );
    assert_eq!(engine.image_id(&tag).await?, None);
    Ok(())
}

#[tokio::test]
async fn a_missing_base_image_a_bad_dockerfile_and_a_bad_context_are_the_users() -> TestResult {
    let engine = engine_or_skip!();
    let tag = test_tag("refused");
    let _images = ImageCleanup::new(&[&tag]);

    // No registry answers here and pull is off: the engine still tries to fetch a missing
    // base image, fails, and says so.
    let dir = context_with(&[("Dockerfile", "FROM stevedore/not-built:never\nRUN true\n")])?;
    let started = Instant::now();
    let (built, _) = build(&engine, &BuildRequest::new(dir.path()).tag(tag.as_str())).await?;
    eprintln!(
        "missing base image: {built:?} after {:?}",
        started.elapsed()
    );
    match built {
        Err(ref error @ EngineError::BuildFailed { ref message, .. }) => {
            assert!(!error.is_infrastructure());
            assert!(!message.is_empty());
        }
        other => panic!("expected BuildFailed, got {other:?}"),
    }

    // An instruction the engine does not know: refused outright with 400.
    let dir = context_with(&[(
        "Dockerfile",
        "FROM stevedore/busybox:local\nNOT_AN_INSTRUCTION here\n",
    )])?;
    let (built, _) = build(&engine, &BuildRequest::new(dir.path()).tag(tag.as_str())).await?;
    match built {
        Err(ref error @ EngineError::BuildFailed { ref message }) => {
            assert!(!error.is_infrastructure(), "{message}");
        }
        other => panic!("expected BuildFailed, got {other:?}"),
    }

    // No Dockerfile, or too much context: refused before the engine hears of it.
    let dir = context_with(&[("Containerfile", "FROM scratch\n"), ("blob", "0123456789")])?;
    let (built, events) = build(&engine, &BuildRequest::new(dir.path())).await?;
    assert!(
        matches!(built, Err(EngineError::InvalidBuildContext { .. })),
        "{built:?}"
    );
    assert!(events.is_empty());
    let mut request = BuildRequest::new(dir.path());
    request.dockerfile = "Containerfile".into();
    request.max_context_bytes = 8;
    let (built, _) = build(&engine, &request).await?;
    match built {
        Err(ref error @ EngineError::InvalidBuildContext { .. }) => {
            assert!(!error.is_infrastructure())
        }
        other => panic!("expected InvalidBuildContext, got {other:?}"),
    }
    assert_eq!(engine.image_id(&tag).await?, None);
    Ok(())
}

#[tokio::test]
async fn pull_progress_reaches_a_callback_and_a_dead_registry_fails_as_before() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;

    let mut events = Vec::new();
    let pulled = tokio::time::timeout(
        SAFETY_NET,
        engine.ensure_image_with_progress("registry.invalid/stevedore/none:2", None, &mut |e| {
            events.push(e)
        }),
    )
    .await?;
    match pulled {
        Err(error @ EngineError::PullFailed { .. }) => assert!(error.is_infrastructure()),
        other => panic!("expected PullFailed, got {other:?}"),
    }
    assert_eq!(
        events.first(),
        Some(&PullProgress::Started {
            image: "registry.invalid/stevedore/none:2".into()
        })
    );
    assert_eq!(
        events.last(),
        Some(&PullProgress::Finished {
            image: "registry.invalid/stevedore/none:2".into(),
            ok: false
        })
    );

    // A present image needs no pull and reports nothing.
    events.clear();
    let present = engine
        .ensure_image_with_progress(LOCAL_BUSYBOX_IMAGE, None, &mut |e| events.push(e))
        .await?;
    assert_eq!(present, ImagePresence::AlreadyPresent);
    assert!(events.is_empty(), "{events:?}");
    Ok(())
}

#[tokio::test]
async fn dropping_a_build_cancels_it_and_leaves_no_container() -> TestResult {
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    // A command only this test runs, to find its intermediate container by.
    let marker = format!("sleep {}", 1000 + std::process::id() % 1000);
    let dir = context_with(&[(
        "Dockerfile",
        &format!("FROM stevedore/busybox:local\nRUN echo started && {marker}\n"),
    )])?;
    let request = BuildRequest::new(dir.path());
    let started = tokio::sync::Notify::new();
    let mut on_progress = |event: BuildProgress| {
        if matches!(event, BuildProgress::Output { ref line } if line == "started") {
            started.notify_one();
        }
    };
    let building = engine.build_image(&request, &mut on_progress);
    tokio::time::timeout(SAFETY_NET, async {
        tokio::select! {
            built = building => panic!("the build ended by itself: {built:?}"),
            () = started.notified() => {}
        }
    })
    .await?;

    // The build future is gone: the engine stops the build and removes its container.
    let docker = bollard::Docker::connect_with_defaults()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let options = bollard::query_parameters::ListContainersOptionsBuilder::new()
            .all(true)
            .build();
        let leftovers: Vec<_> = docker
            .list_containers(Some(options))
            .await?
            .into_iter()
            .filter(|c| c.command.as_deref().is_some_and(|c| c.contains(&marker)))
            .collect();
        if leftovers.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled build left {leftovers:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The network the isolation test runs on; like a runner's, it stays for the next run.
const ISOLATION_NETWORK: &str = "stevedore-isolation-test";
const ISOLATION_BRIDGE: &str = "stvd-isotest";

/// Whether this process may change the host's firewall: the isolation tests need root, and
/// skip without it (saying so) unless `CI` is set.
fn root_or_ci() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false);
    if !root && !ci_requires_docker() {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: isolating a network needs root (iptables); set CI=true to make this a failure"
        );
    }
    root || ci_requires_docker()
}

/// This host's address on its way out (the interface of its default route), found without
/// sending anything: a UDP socket's source address once "connected".
fn host_address() -> std::io::Result<std::net::Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect("198.51.100.1:9")?;
    match socket.local_addr()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() => Ok(ip),
        other => Err(std::io::Error::other(format!(
            "no IPv4 host address: {other}"
        ))),
    }
}

/// A task container on the isolated network reaches neither a listener on the host (on the
/// network's gateway and on the host's own address), nor another container on the network,
/// nor a blocked range; it does reach an allowed host address and port. IPv6 is off inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_network_keeps_tasks_from_the_host_and_each_other() -> TestResult {
    use stevedore_engine::{Destination, EgressPolicy, NetworkSpec};
    let engine = engine_or_skip!();
    if !root_or_ci() {
        return Ok(());
    }
    local_image(&engine).await?;
    let task = task_label("isolation");
    let _cleanup = Cleanup::new(&task);
    let network = engine
        .ensure_network(&NetworkSpec {
            name: ISOLATION_NETWORK.to_owned(),
            bridge: ISOLATION_BRIDGE.to_owned(),
            subnet: None,
        })
        .await?;
    let gateway = *network
        .gateways
        .first()
        .ok_or("the network has no gateway")?;
    let host = host_address()?;
    // Listening is enough: the kernel completes a connection into the backlog unaccepted.
    let everywhere = std::net::TcpListener::bind("0.0.0.0:0")?;
    let closed_port = everywhere.local_addr()?.port();
    let allowed = std::net::TcpListener::bind((host, 0))?;
    let allowed_port = allowed.local_addr()?.port();
    engine
        .isolate_network(
            &network,
            &EgressPolicy {
                blocked: EgressPolicy::default_blocked(),
                allowed: vec![Destination::address(host, allowed_port)],
            },
        )
        .await?;
    // Applying the same policy again changes nothing (and fails nothing).
    engine
        .isolate_network(
            &network,
            &EgressPolicy {
                blocked: EgressPolicy::default_blocked(),
                allowed: vec![Destination::address(host, allowed_port)],
            },
        )
        .await?;

    // Another task, listening, that tells its address.
    let mut listener = shell(
        &task,
        "ip -4 -o addr show eth0 | sed 's/.*inet \\([0-9.]*\\).*/\\1/'; nc -l -p 7000 >/dev/null",
    );
    listener.network_mode = Some(ISOLATION_NETWORK.to_owned());
    let listening = engine.create(&listener).await?;
    let mut logs = engine.attach(&listening).await?;
    engine.start(&listening).await?;
    let mut neighbour = String::new();
    while neighbour.trim().is_empty() {
        match tokio::time::timeout(SAFETY_NET, logs.next()).await? {
            Some(chunk) => neighbour.push_str(&String::from_utf8_lossy(&chunk?.bytes)),
            None => return Err("the listening task ended without its address".into()),
        }
    }
    let neighbour = neighbour.trim().to_owned();

    let targets = [
        ("gateway", gateway.to_string(), closed_port),
        ("host", host.to_string(), closed_port),
        ("neighbour", neighbour.clone(), 7000),
        ("allowed", host.to_string(), allowed_port),
    ];
    let script: String = targets
        .iter()
        .map(|(name, ip, port)| {
            // nc exits 1 when it cannot connect; once connected it waits for the other side,
            // which never closes, so `timeout` ends it (143).
            format!(
                "timeout 3 nc -w 2 {ip} {port} </dev/null 2>/dev/null; \
                 if [ $? -eq 1 ]; then echo {name}=closed; else echo {name}=open; fi; "
            )
        })
        .chain(["echo ipv6=$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6)".to_owned()])
        .collect();
    let mut prober = shell(&task, &script);
    prober.network_mode = Some(ISOLATION_NETWORK.to_owned());
    let (status, output) = tokio::time::timeout(SAFETY_NET, run(&engine, &prober)).await??;
    engine.remove(&listening).await?;
    assert_eq!(status.exit_code, 0, "{output:?}");
    assert_eq!(
        output.stdout.lines().collect::<Vec<_>>(),
        [
            "gateway=closed",
            "host=closed",
            "neighbour=closed",
            "allowed=open",
            "ipv6=1"
        ],
        "gateway {gateway}, host {host}, neighbour {neighbour}: {output:?}"
    );
    // The listener outside the network is there: the host itself reaches it.
    std::net::TcpStream::connect((host, closed_port))?;
    Ok(())
}

const HOLDER_NETWORK: &str = "stevedore-holder-test";
const HOLDER_BRIDGE: &str = "stvd-holdtest";

/// Tasks on a task network join network holders. One after another they share one (the same
/// address and host name); each finds the holder's hosts file read-only and naming it, and
/// nothing the one before left (its listening port is free again). A holder killed meanwhile
/// is replaced and removed; another project's task gets a holder of its own. Holders carry the tasks' labels but the task's own, and go with
/// `remove_idle_network_holders`; an engine without them makes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_a_network_take_turns_in_network_holders() -> TestResult {
    use stevedore_engine::{LABEL_NETWORK_HOLDER, LABEL_PROJECT, NetworkSpec};
    let engine = engine_or_skip!();
    local_image(&engine).await?;
    let task = task_label("holders");
    let _cleanup = Cleanup::new(&task);
    engine
        .ensure_network(&NetworkSpec {
            name: HOLDER_NETWORK.to_owned(),
            bridge: HOLDER_BRIDGE.to_owned(),
            subnet: None,
        })
        .await?;
    // Its address, its host name, whether the hosts file names it, whether it can be
    // written; then a listener on a port, alive after a moment if the port was free, and
    // left running when the task ends.
    let spec = {
        let mut spec = shell(
            &task,
            "ip -4 -o addr show eth0 | sed 's/.*inet \\([0-9.]*\\).*/\\1/'; hostname; \
             grep -c \"$(hostname)\" /etc/hosts; \
             if echo 192.0.2.1 intruder >> /etc/hosts 2>/dev/null; then echo hosts=writable; \
             else echo hosts=read-only; fi; \
             nc -l -p 7000 >/dev/null 2>&1 & sleep 0.3; \
             if kill -0 $! 2>/dev/null; then echo port=free; else echo port=taken; fi",
        );
        spec.network_mode = Some(HOLDER_NETWORK.to_owned());
        spec
    };
    let holders = || async {
        let listed = engine
            .list_labeled_containers(TEST_RUN_LABEL, Some(&task))
            .await?;
        Ok::<_, EngineError>(
            listed
                .into_iter()
                .filter(|c| {
                    c.labels.get(LABEL_NETWORK_HOLDER).map(String::as_str) == Some(HOLDER_NETWORK)
                })
                .inspect(|c| assert!(!c.labels.contains_key("stevedore.task"), "{c:?}"))
                .map(|c| c.id)
                .collect::<Vec<_>>(),
        )
    };
    // The first tasks at once, each making a holder: every one joins its own.
    let first_tasks = futures::future::join_all((0..4).map(|_| run(&engine, &spec))).await;
    let mut addresses = Vec::new();
    for ran in first_tasks {
        let (status, output) = ran?;
        assert_eq!(status.exit_code, 0, "{output:?}");
        addresses.push(output.stdout.lines().next().unwrap_or_default().to_owned());
    }
    addresses.sort();
    addresses.dedup();
    assert_eq!(
        addresses.len(),
        4,
        "four tasks at once, four holders: {addresses:?}"
    );
    assert!(engine.joins_network_holders());
    engine.remove_idle_network_holders().await;

    let mut outputs = Vec::new();
    for _ in 0..2 {
        let (status, output) = tokio::time::timeout(SAFETY_NET, run(&engine, &spec)).await??;
        assert_eq!(status.exit_code, 0, "{output:?}");
        outputs.push(output.stdout);
    }
    let lines: Vec<Vec<&str>> = outputs.iter().map(|o| o.lines().collect()).collect();
    assert_eq!(lines[0].len(), 5, "{outputs:?}");
    assert_eq!(lines[0], lines[1], "two tasks in turn, one holder");
    assert_eq!(
        &lines[0][2..],
        ["1", "hosts=read-only", "port=free"],
        "{outputs:?}"
    );
    assert!(engine.joins_network_holders());
    let first = holders().await?;
    assert_eq!(first.len(), 1, "{first:?}");

    // Killed, as by an engine restart without live restore: replaced, and removed.
    engine.kill(&first[0]).await?;
    let (status, output) = tokio::time::timeout(SAFETY_NET, run(&engine, &spec)).await??;
    assert_eq!(status.exit_code, 0, "{output:?}");
    assert_eq!(
        &output.stdout.lines().collect::<Vec<_>>()[2..],
        ["1", "hosts=read-only", "port=free"]
    );
    let second = holders().await?;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);

    // Another project's task never joins this project's holder.
    let mut other_project = spec.clone();
    other_project
        .labels
        .insert(LABEL_PROJECT.to_owned(), format!("other-{task}"));
    let (status, other) = tokio::time::timeout(SAFETY_NET, run(&engine, &other_project)).await??;
    assert_eq!(status.exit_code, 0, "{other:?}");
    assert_ne!(other.stdout.lines().next(), output.stdout.lines().next());
    assert_eq!(holders().await?.len(), 2);

    engine.remove_idle_network_holders().await;
    assert_eq!(holders().await?, Vec::new());

    let own_namespaces = DockerEngine::connect().await?.without_network_holders();
    assert!(!own_namespaces.joins_network_holders());
    let (status, output) = tokio::time::timeout(SAFETY_NET, run(&own_namespaces, &spec)).await??;
    assert_eq!(status.exit_code, 0, "{output:?}");
    assert!(output.stdout.contains("hosts=writable"), "{output:?}");
    assert_eq!(holders().await?, Vec::new());
    Ok(())
}

/// The same suite with every container's files put in through the engine's archive upload,
/// as on an engine on another machine (here they go straight into the container's root).
mod uploaded {
    use super::{DockerHarness, engine, harness_on};

    async fn upload_harness(check: &'static str) -> Option<DockerHarness> {
        let engine = engine().await?.upload_files_always();
        Some(harness_on(engine, &format!("conformance-upload-{check}")).await)
    }

    stevedore_engine::runtime_conformance_tests!(upload_harness);
}

/// On the engine's own machine, as root, a task's files go straight into the container's root
/// and no archive is uploaded; they land where the upload puts them, links in the image
/// followed inside the container's root (here `/mnt` is a link to `/srv`), and the image's
/// own files beside them stay.
#[tokio::test]
async fn files_go_straight_into_the_root_where_the_upload_would_put_them() -> TestResult {
    let Some(engine) = engine().await else {
        return Ok(());
    };
    local_image(&engine).await?;
    let tag = test_tag("linked-mnt");
    let _images = ImageCleanup::new(&[&tag]);
    let dir = context_with(&[(
        "Dockerfile",
        "FROM stevedore/busybox:local\n\
         RUN rm -rf /mnt /srv && mkdir -p /srv/kept && echo image > /srv/kept/file \
         && ln -s /srv /mnt\n",
    )])?;
    let (built, _) = build(&engine, &BuildRequest::new(dir.path()).tag(tag.as_str())).await?;
    built?;

    let uploads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = uploads.clone();
    let direct = engine.observe_requests(std::sync::Arc::new(move |request, _| {
        if request == stevedore_engine::EngineRequest::Upload {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }));
    let uploaded = DockerEngine::connect().await?.upload_files_always();
    let task = task_label("straight-into-the-root");
    let _cleanup = Cleanup::new(&task);
    let mut spec = shell(
        &task,
        "find /srv /mnt/ -mindepth 1 | sort | while read -r path; do \
         if [ -d \"$path\" ] && [ ! -L \"$path\" ]; then stat -c '%a %U %n/' \"$path\"; \
         else stat -c '%a %U %n' \"$path\"; fi; done; cat /mnt/.task_payload; \
         ls -d /host-escape 2>/dev/null; true",
    );
    spec.image = tag.clone();
    spec.files.push(FileToUpload {
        path: "/mnt/.task_payload".to_owned(),
        contents: b"{\"n\":1}".to_vec(),
        mode: 0o644,
    });
    spec.files.push(FileToUpload {
        path: "/mnt/task/nested/run.sh".to_owned(),
        contents: b"echo hi".to_vec(),
        mode: 0o755,
    });

    let straight = stevedore_engine::conformance::run_to_end(&direct, &spec).await;
    assert!(direct.puts_files_directly(), "the files were uploaded");
    assert_eq!(
        uploads.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "an archive was uploaded"
    );
    let through_the_engine = stevedore_engine::conformance::run_to_end(&uploaded, &spec).await;
    assert!(straight.status.success(), "{straight:?}");
    let listing = String::from_utf8_lossy(&straight.stdout).into_owned();
    assert_eq!(
        listing,
        String::from_utf8_lossy(&through_the_engine.stdout),
        "the upload puts the files elsewhere"
    );
    for expected in [
        "644 root /srv/.task_payload",
        "777 root /srv/task/",
        "755 root /srv/task/nested/",
        "755 root /srv/task/nested/run.sh",
        "644 root /srv/kept/file",
        "{\"n\":1}",
    ] {
        assert!(
            listing.contains(expected),
            "{expected} is not in:\n{listing}"
        );
    }
    // Nothing went to the host's own /srv or /mnt.
    assert!(!Path::new("/srv/.task_payload").exists());
    assert!(!Path::new("/mnt/.task_payload").exists());
    Ok(())
}
