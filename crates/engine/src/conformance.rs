//! The conformance suite of [`ContainerRuntime`]: what every runtime must do for a runner,
//! written once and run against each implementation.
//!
//! The Docker implementation passes it in `tests/docker.rs` (against the real engine), the
//! fake in its unit tests; a second implementation proves itself by passing it too. A
//! [`Harness`] turns the suite's [`Program`]s into specs its runtime runs (a shell in a small
//! image for Docker, a scripted run for the fake); everything else (creating with files and
//! a zip package, environment, starting, waiting, attached output, stats, usage with the
//! exit, kill, remove, listing by label, the errors) is asked through the trait alone.
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
use crate::package::ZipPackage;
use crate::spec::{ContainerId, ContainerSpec, DirectoryToCreate, FileToUpload, TASK_DIR};

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
    /// Prints a line `<octal mode> <path>` for every directory and file below this directory
    /// of its own container (a directory's path ending in `/`), in any order, then exits 0.
    ListFiles(String),
    /// Prints the size in bytes of this file of its own container, as `wc -c <` does, then
    /// exits 0.
    CountBytes(String),
    /// Prints the ids of its groups, its own first (as `id -G` does), then exits 0.
    PrintGroups,
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

/// A zip package is unpacked under [`TASK_DIR`] in the same create as the spec's files:
/// modes kept, implied directories writable by any user, the entry point executable,
/// links and entries without a safe path left out, the bytes as zipped.
pub async fn package_files_arrive_with_their_modes(harness: &dyn Harness) {
    let scratch = ok_io(tempfile::tempdir(), "a temporary directory");
    let zip = scratch.path().join("package.zip");
    ok_io(
        write_package(&zip, |writer| {
            use std::io::Write;
            use zip::write::SimpleFileOptions;
            let mode = |mode| SimpleFileOptions::default().unix_permissions(mode);
            writer.start_file("run.sh", SimpleFileOptions::default())?;
            writer.write_all(b"#!/bin/sh\necho hi\n")?;
            writer.add_directory("bin/", mode(0o750))?;
            writer.start_file("bin/tool", mode(0o700))?;
            writer.write_all(b"tool")?;
            writer.start_file("lib/deep/data.txt", mode(0o640))?;
            writer.write_all(b"data")?;
            writer.add_symlink("link", "run.sh", SimpleFileOptions::default())?;
            writer.start_file("../escape.txt", SimpleFileOptions::default())?;
            writer.write_all(b"outside")?;
            Ok(())
        }),
        "write the package",
    );
    let package = ok(ZipPackage::open(&zip, Some("run.sh")), "open the package");

    let mut spec = labelled(
        harness,
        &Program::ListFiles(TASK_DIR.to_owned()),
        &unique("package"),
    );
    spec.files.push(FileToUpload::readable(
        format!("{TASK_DIR}/from-spec.txt"),
        "spec",
    ));
    spec.package = Some(package.clone());
    let finished = run_to_end(harness.runtime(), &spec).await;
    assert_eq!(finished.status.exit_code, 0, "{finished:?}");
    let listing = String::from_utf8_lossy(&finished.stdout);
    let listed: BTreeMap<&str, u32> = listing
        .lines()
        .filter_map(|line| {
            let (mode, path) = line.split_once(' ')?;
            Some((path, u32::from_str_radix(mode, 8).ok()?))
        })
        .collect();
    let expected = BTreeMap::from([
        ("/mnt/task/bin/", 0o750),
        ("/mnt/task/bin/tool", 0o700),
        ("/mnt/task/from-spec.txt", 0o644),
        ("/mnt/task/lib/", 0o777),
        ("/mnt/task/lib/deep/", 0o777),
        ("/mnt/task/lib/deep/data.txt", 0o640),
        ("/mnt/task/run.sh", 0o755),
    ]);
    assert_eq!(listed, expected, "the listing: {listing}");

    let mut spec = labelled(
        harness,
        &Program::CatFiles(vec![
            format!("{TASK_DIR}/run.sh"),
            format!("{TASK_DIR}/lib/deep/data.txt"),
        ]),
        &unique("package"),
    );
    spec.package = Some(package);
    let finished = run_to_end(harness.runtime(), &spec).await;
    assert_eq!(finished.status.exit_code, 0, "{finished:?}");
    assert_eq!(
        String::from_utf8_lossy(&finished.stdout),
        "#!/bin/sh\necho hi\ndata"
    );
}

/// The size of the file in [`a_package_larger_than_memory_arrives_whole`].
pub const LARGE_PACKAGE_FILE_BYTES: u64 = 200 << 20;

/// How much more memory than before this process may have held while a package of
/// [`LARGE_PACKAGE_FILE_BYTES`] was put in place: half the file. A runtime that held the
/// unpacked file (or the archive of it) needs more.
pub const LARGE_PACKAGE_MEMORY_BUDGET: u64 = LARGE_PACKAGE_FILE_BYTES / 2;

/// A package that unpacks to more than a runtime could hold in memory budget-wise (a small zip
/// of a file of [`LARGE_PACKAGE_FILE_BYTES`] zeros) arrives whole, and the runtime's process
/// does not hold it on the way: its peak memory grows by less than
/// [`LARGE_PACKAGE_MEMORY_BUDGET`] (checked where `/proc/self/status` tells it).
pub async fn a_package_larger_than_memory_arrives_whole(harness: &dyn Harness) {
    let scratch = ok_io(tempfile::tempdir(), "a temporary directory");
    let zip = scratch.path().join("large.zip");
    let writing = zip.clone();
    let written = tokio::task::spawn_blocking(move || {
        write_package(&writing, |writer| {
            use std::io::Write;
            // The fastest level: zeros shrink anyway, and a test build deflates slowly.
            let deflated = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .compression_level(Some(1));
            writer.start_file("zeros.bin", deflated)?;
            let block = vec![0u8; 1 << 20];
            for _ in 0..LARGE_PACKAGE_FILE_BYTES / (1 << 20) {
                writer.write_all(&block)?;
            }
            Ok(())
        })
    });
    ok_io(
        within("writing the package", written)
            .await
            .unwrap_or_else(|error| panic!("writing the package: {error}")),
        "write the package",
    );
    let package = ok(ZipPackage::open(&zip, None), "open the package");
    assert_eq!(package.unpacked_bytes(), LARGE_PACKAGE_FILE_BYTES);

    let before = process_memory();
    let mut spec = labelled(
        harness,
        &Program::CountBytes(format!("{TASK_DIR}/zeros.bin")),
        &unique("large-package"),
    );
    spec.package = Some(package);
    let finished = run_to_end(harness.runtime(), &spec).await;
    let after = process_memory();
    assert_eq!(finished.status.exit_code, 0, "{finished:?}");
    assert_eq!(
        String::from_utf8_lossy(&finished.stdout).trim(),
        LARGE_PACKAGE_FILE_BYTES.to_string()
    );
    if let (Some(before), Some(after)) = (before, after) {
        // The peak only tells when it rose above an earlier one.
        let allowed = before
            .peak
            .max(before.resident + LARGE_PACKAGE_MEMORY_BUDGET);
        assert!(
            after.peak <= allowed,
            "the process peaked at {} MiB while the package went in, {} MiB over the {} MiB it \
             held before",
            after.peak >> 20,
            after.peak.saturating_sub(before.resident) >> 20,
            before.resident >> 20
        );
    }
}

/// A package whose entry holds more or fewer bytes than it declares fails the create with
/// [`EngineError::InvalidPackage`] (the user's error, named), and leaves no container: the
/// archive announced the declared size, and a runtime must not take a cut-off or overlong
/// entry for a whole one.
pub async fn a_package_lying_about_a_size_fails_the_create(harness: &dyn Harness) {
    let scratch = ok_io(tempfile::tempdir(), "a temporary directory");
    for declared in [10, 1000] {
        let zip = scratch.path().join(format!("lying-{declared}.zip"));
        ok_io(write_lying_zip(&zip, declared), "write the package");
        let package = ok(ZipPackage::open(&zip, None), "open the package");
        let runner = unique("lying-package");
        let mut spec = labelled(harness, &Program::Exit(0), &runner);
        spec.package = Some(package);
        let runtime = harness.runtime();
        match within("create", runtime.create(&spec)).await {
            Err(error @ EngineError::InvalidPackage { .. }) => {
                assert!(!error.is_infrastructure());
                assert!(error.to_string().contains("data.bin"), "{error}");
            }
            Ok(id) => {
                let _ = runtime.remove(&id).await;
                panic!("a package whose entry declares {declared} of its 100 bytes was accepted");
            }
            Err(other) => panic!("declared {declared} of 100 bytes: {other:?}"),
        }
        let left = ok(
            within("list", runtime.list_labeled(RUNNER_LABEL, &runner)).await,
            "list_labeled",
        );
        assert!(left.is_empty(), "the failed create left {left:?}");
    }
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

/// A user named by the spec runs with its own group and those the image's `/etc/group` lists
/// it in, as Docker gives them; with an explicit group, with that one alone.
pub async fn a_named_user_gets_the_groups_it_is_listed_in(harness: &dyn Harness) {
    let etc = |path: &str, contents: &str| FileToUpload {
        path: path.to_owned(),
        contents: contents.as_bytes().to_vec(),
        mode: 0o644,
    };
    for (user, expected) in [
        ("worker", "1500 29 50"),
        ("1500", "1500 29 50"),
        ("worker:staff", "50"),
    ] {
        let mut spec = labelled(harness, &Program::PrintGroups, &unique("groups"));
        spec.files.push(etc(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nworker:x:1500:1500:worker:/home/worker:/bin/sh\n",
        ));
        spec.files.push(etc(
            "/etc/group",
            "root:x:0:\nworker:x:1500:\naudio:x:29:worker\nstaff:x:50:other,worker\n\
             video:x:44:other\n",
        ));
        spec.user = Some(user.to_owned());
        let finished = run_to_end(harness.runtime(), &spec).await;
        assert_eq!(finished.status.exit_code, 0, "{user}: {finished:?}");
        assert_eq!(
            String::from_utf8_lossy(&finished.stdout).trim(),
            expected,
            "the groups of {user}"
        );
    }
}

/// `wait` reports the program's exit code, not OOM-killed, with start and finish times.
pub async fn wait_reports_the_exit_code(harness: &dyn Harness) {
    // 137 is what a SIGKILL leaves: a program that exits with it was not OOM-killed.
    for code in [0, 3, 125, 137] {
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

/// `kept_output` gives back what a container printed, also when nobody attached and after its
/// end; it follows a running container until it stops.
pub async fn kept_output_gives_back_what_was_printed(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let program = Program::Print {
        stdout: "kept on stdout\n".to_owned(),
        stderr: "kept on stderr\n".to_owned(),
    };
    let spec = labelled(harness, &program, &unique("kept"));
    let id = ok(within("create", runtime.create(&spec)).await, "create");
    ok(within("start", runtime.start(&id)).await, "start");
    let status = ok(within("wait", runtime.wait(&id)).await, "wait");
    let kept = ok(
        within("kept_output", runtime.kept_output(&id)).await,
        "kept_output",
    );
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    within("kept output", async {
        let mut kept = kept;
        while let Some(chunk) = kept.next().await {
            let chunk = ok(chunk, "kept output");
            match chunk.stream {
                OutputStream::Stdout => stdout.extend_from_slice(&chunk.bytes),
                OutputStream::Stderr => stderr.extend_from_slice(&chunk.bytes),
            }
        }
    })
    .await;
    ok(within("remove", runtime.remove(&id)).await, "remove");
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(String::from_utf8_lossy(&stdout), "kept on stdout\n");
    assert_eq!(String::from_utf8_lossy(&stderr), "kept on stderr\n");

    // A running container is followed: the stream ends once it is killed.
    let spec = labelled(harness, &Program::Forever, &unique("kept"));
    let id = ok(within("create", runtime.create(&spec)).await, "create");
    ok(within("start", runtime.start(&id)).await, "start");
    let mut kept = ok(
        within("kept_output", runtime.kept_output(&id)).await,
        "kept_output",
    );
    ok(within("kill", runtime.kill(&id)).await, "kill");
    within("the end of the kept output", async {
        while let Some(chunk) = kept.next().await {
            ok(chunk, "kept output");
        }
    })
    .await;
    ok(within("remove", runtime.remove(&id)).await, "remove");
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

/// A runtime that keeps its own account of a container says so once it started, and reports
/// with the exit what the container used over its life: some CPU time and some memory, even
/// for a program that ends at once, before any sample could be taken. A runtime that keeps
/// none reports nothing with the exit (its caller samples the stats instead).
pub async fn usage_comes_with_the_exit_when_accounted(harness: &dyn Harness) {
    let runtime = harness.runtime();
    let spec = labelled(
        harness,
        &Program::Print {
            stdout: "counted\n".to_owned(),
            stderr: String::new(),
        },
        &unique("usage"),
    );
    let id = ok(within("create", runtime.create(&spec)).await, "create");
    ok(within("start", runtime.start(&id)).await, "start");
    let accounted = within("usage_accounted", runtime.usage_accounted(&id)).await;
    let status = ok(within("wait", runtime.wait(&id)).await, "wait");
    assert_eq!(status.exit_code, 0, "{status:?}");
    if accounted {
        let usage = status
            .usage
            .unwrap_or_else(|| panic!("accounted, but no usage with the exit: {status:?}"));
        assert!(
            usage.cpu_total_ns.is_some_and(|ns| ns > 0),
            "no CPU time: {usage:?}"
        );
        assert!(
            usage.peak_memory_bytes.is_some_and(|bytes| bytes > 0),
            "no peak memory: {usage:?}"
        );
    } else {
        assert_eq!(
            status.usage, None,
            "usage from a runtime that keeps no account"
        );
    }
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

/// `list_labeled` finds exactly one runner's containers, created or stopped, and no others;
/// by the label's key alone, every runner's.
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
        within(
            "list",
            runtime.list_labeled_containers(RUNNER_LABEL, Some(&mine)),
        )
        .await,
        "list_labeled_containers",
    );
    let mut detailed_ids: Vec<ContainerId> =
        detailed.iter().map(|listed| listed.id.clone()).collect();
    detailed_ids.sort();
    // By the label alone, every runner's containers are listed (other tests' too, so only
    // these three are looked for).
    let everyone = ok(
        within("list", runtime.list_labeled_containers(RUNNER_LABEL, None)).await,
        "list_labeled_containers",
    );
    let everyone: BTreeMap<ContainerId, String> = everyone
        .into_iter()
        .filter(|listed| created.contains_key(&listed.id))
        .map(|listed| {
            let runner = listed.labels.get(RUNNER_LABEL).cloned().unwrap_or_default();
            (listed.id, runner)
        })
        .collect();
    for id in created.keys() {
        ok(within("remove", runtime.remove(id)).await, "remove");
    }
    assert_eq!(listed, expected);
    assert_eq!(detailed_ids, expected);
    assert_eq!(everyone, created);
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
    assert_not_found(
        within("kept_output", runtime.kept_output(&id))
            .await
            .map(|_| ()),
        &id,
        "kept_output",
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

/// This process's memory, in bytes.
#[derive(Debug, Clone, Copy)]
struct ProcessMemory {
    /// Resident now (`VmRSS`).
    resident: u64,
    /// The peak so far (`VmHWM`).
    peak: u64,
}

/// What `/proc/self/status` says, where there is one.
fn process_memory() -> Option<ProcessMemory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|kib| kib << 10)
    };
    Some(ProcessMemory {
        resident: kib("VmRSS:")?,
        peak: kib("VmHWM:")?,
    })
}

/// Writes a zip to `path` with what `entries` adds.
fn write_package(
    path: &std::path::Path,
    entries: impl FnOnce(&mut zip::ZipWriter<std::fs::File>) -> zip::result::ZipResult<()>,
) -> zip::result::ZipResult<()> {
    let mut writer = zip::ZipWriter::new(std::fs::File::create(path)?);
    entries(&mut writer)?;
    writer.finish()?;
    Ok(())
}

/// Writes a zip whose one entry, `data.bin`, holds 100 bytes stored but declares `declared`
/// (its uncompressed size rewritten in the central directory).
pub(crate) fn write_lying_zip(path: &std::path::Path, declared: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    writer.start_file("data.bin", stored)?;
    writer.write_all(&[b'x'; 100])?;
    let mut bytes = writer.finish()?.into_inner();
    let central = bytes
        .windows(4)
        .position(|window| window == b"PK\x01\x02")
        .ok_or_else(|| std::io::Error::other("no central directory"))?;
    // A central directory header holds the uncompressed size at offset 24.
    bytes[central + 24..central + 28].copy_from_slice(&declared.to_le_bytes());
    std::fs::write(path, bytes)
}

fn ok_io<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{what}: {error}"),
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
        $crate::runtime_conformance_tests!(@containers_and $make;
            networks_are_ensured_once, a_named_user_gets_the_groups_it_is_listed_in);
    };
    // Every check but the managed networks', for a runtime whose networks another part
    // serves (the OCI runtime's come from its engine's pool).
    (containers $make:ident) => {
        $crate::runtime_conformance_tests!(@containers_and $make;
            a_named_user_gets_the_groups_it_is_listed_in);
    };
    // Every check but the users', for a model of the contract without an image's files to
    // look users up in (the fake engine).
    (model $make:ident) => {
        $crate::runtime_conformance_tests!(@containers_and $make; networks_are_ensured_once);
    };
    (@containers_and $make:ident; $($extra:ident),*) => {
        $crate::runtime_conformance_tests!(@checks $make;
            capabilities_answer,
            files_are_in_place_when_it_starts,
            package_files_arrive_with_their_modes,
            a_package_larger_than_memory_arrives_whole,
            a_package_lying_about_a_size_fails_the_create,
            environment_reaches_the_program,
            wait_reports_the_exit_code,
            memory_limit_kill_is_named_oom,
            logs_keep_stdout_and_stderr_apart,
            kept_output_gives_back_what_was_printed,
            stats_sample_a_running_container,
            usage_comes_with_the_exit_when_accounted,
            kill_stops_a_running_container,
            remove_forgets_the_container,
            list_finds_own_containers_by_runner_label,
            unknown_containers_are_not_found
            $(, $extra)*
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
