//! Integration tests of the direct OCI runtime against the real `crun` and `runc`: no mocks.
//!
//! The conformance suite runs once per runtime binary, on the busybox image unpacked from
//! the host's static busybox as one layer; the other tests cover what the suite does not:
//! nothing left behind after a removal, a later process finding and removing what a killed
//! one left, OOM kills, CPU time and peak memory counted, limits and privileges.
//!
//! They need root, the static busybox and the runtime binary; without them they skip, saying
//! why, unless `CI` is set, where they fail instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stevedore_engine::conformance::{Harness, Program, RUNNER_LABEL, run_to_end};
use stevedore_engine::oci::{
    ImageRunConfig, NetnsSource, OciRuntime, OciRuntimeKind, OciSettings, TaskNetns, UnpackedImage,
    UnpackedImages,
};
use stevedore_engine::{
    ContainerId, ContainerRuntime, ContainerSpec, EngineError, HOST_BUSYBOX, LOCAL_BUSYBOX_IMAGE,
    NetworkSpec, busybox_rootfs_tar,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Says why a test skips, or fails it under CI.
fn skip(why: &str) {
    if ci() {
        panic!("CI is set and {why}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {why}; set CI=true to make this a failure"
    );
}

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The busybox image, unpacked once per machine as one layer (shared by the test processes:
/// unpacked beside and renamed into place).
struct BusyboxImage {
    layer: PathBuf,
}

#[async_trait]
impl UnpackedImages for BusyboxImage {
    async fn unpacked(&self, reference: &str) -> Result<Option<UnpackedImage>, EngineError> {
        if reference != LOCAL_BUSYBOX_IMAGE {
            return Ok(None);
        }
        Ok(Some(UnpackedImage {
            id: "sha256:busybox-test".to_owned(),
            layers: vec![self.layer.clone()],
            config: ImageRunConfig {
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
                ],
                entrypoint: None,
                cmd: Some(vec!["sh".to_owned()]),
                working_dir: Some("/mnt/task".to_owned()),
                user: None,
            },
        }))
    }
}

fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("stevedore-oci-test")
}

/// The busybox layer, unpacked from the host's busybox when missing.
fn busybox_layer() -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    let layer = scratch_root().join("busybox-layer");
    if layer.join("bin/busybox").exists() {
        return Ok(layer);
    }
    std::fs::create_dir_all(scratch_root())?;
    let unpacking = scratch_root().join(format!("busybox-layer-{}", std::process::id()));
    let tar = busybox_rootfs_tar(Path::new(HOST_BUSYBOX), 0)?;
    let mut archive = tar::Archive::new(&tar[..]);
    archive.set_preserve_permissions(true);
    archive.unpack(&unpacking)?;
    if std::fs::rename(&unpacking, &layer).is_err() {
        // Another test process was first.
        let _ = std::fs::remove_dir_all(&unpacking);
    }
    Ok(layer)
}

/// A runtime over `binary` (`crun` or `runc`), or `None` (skipping) when this machine cannot
/// run it outside CI.
async fn runtime(binary: &str) -> Option<OciRuntime> {
    if !root() {
        skip("the OCI runtime needs root (mounts, cgroups, namespaces)");
        return None;
    }
    if !Path::new(HOST_BUSYBOX).exists() {
        skip(&format!(
            "{HOST_BUSYBOX} is not installed (scripts/ensure-docker.sh)"
        ));
        return None;
    }
    let installed = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(binary))
        .find(|path| path.is_file());
    let Some(program) = installed else {
        skip(&format!(
            "{binary} is not installed (scripts/ensure-docker.sh)"
        ));
        return None;
    };
    let layer = match busybox_layer() {
        Ok(layer) => layer,
        Err(error) => panic!("cannot unpack the busybox image: {error}"),
    };
    let settings = OciSettings {
        state_root: scratch_root().join("state"),
        runtime: Some(program),
    };
    match OciRuntime::new(Arc::new(BusyboxImage { layer }), None, settings).await {
        Ok(runtime) => Some(runtime),
        Err(error) => panic!("cannot set up the OCI runtime {binary}: {error}"),
    }
}

/// The OCI runtime under the conformance suite: every program is a busybox shell.
struct OciHarness {
    runtime: OciRuntime,
}

impl Harness for OciHarness {
    fn runtime(&self) -> &dyn ContainerRuntime {
        &self.runtime
    }

    fn spec(&self, program: &Program) -> ContainerSpec {
        match program {
            Program::Exit(code) => shell(&format!("exit {code}")),
            Program::Print { stdout, stderr } => {
                let mut spec = shell(
                    "printf '%s' \"$CONFORMANCE_STDOUT\"; printf '%s' \"$CONFORMANCE_STDERR\" >&2",
                );
                spec.env.push(("CONFORMANCE_STDOUT".into(), stdout.clone()));
                spec.env.push(("CONFORMANCE_STDERR".into(), stderr.clone()));
                spec
            }
            Program::CatFiles(paths) => {
                let mut spec = shell("");
                spec.cmd = Some(
                    std::iter::once("cat".to_owned())
                        .chain(paths.iter().cloned())
                        .collect(),
                );
                spec
            }
            Program::PrintEnv(name) => shell(&format!("printf '%s' \"${name}\"")),
            Program::ListFiles(directory) => {
                let mut spec = shell(
                    "find \"$CONFORMANCE_DIR\" -mindepth 1 | while read -r path; do \
                     if [ -d \"$path\" ]; then stat -c '%a %n/' \"$path\"; \
                     else stat -c '%a %n' \"$path\"; fi; done",
                );
                spec.env.push(("CONFORMANCE_DIR".into(), directory.clone()));
                spec
            }
            Program::CountBytes(path) => {
                let mut spec = shell("wc -c < \"$CONFORMANCE_FILE\"");
                spec.env.push(("CONFORMANCE_FILE".into(), path.clone()));
                spec
            }
            Program::ExceedMemory => {
                // The shell itself (PID 1) holds 64 MiB in a variable against an 8 MiB limit.
                let mut spec =
                    shell("x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}");
                spec.memory_bytes = Some(8 << 20);
                spec
            }
            Program::PrintGroups => shell("id -G"),
            Program::Forever => shell("sleep 3600"),
        }
    }
}

/// A busybox container running `script` with `sh -c`, without a network.
fn shell(script: &str) -> ContainerSpec {
    let mut spec = ContainerSpec::new(LOCAL_BUSYBOX_IMAGE);
    spec.cmd = Some(vec!["sh".into(), "-c".into(), script.into()]);
    spec.labels = BTreeMap::from([("stevedore.test".to_owned(), "1".to_owned())]);
    spec.memory_bytes = Some(64 << 20);
    spec.pids_limit = Some(64);
    spec.network_mode = Some("none".to_owned());
    spec
}

/// One conformance module per runtime binary. The suite's network check is left out: the
/// OCI engine manages no networks (its pool does), which
/// `managed_networks_are_refused_clearly` checks instead.
macro_rules! conformance_with {
    ($module:ident, $binary:literal) => {
        mod $module {
            async fn harness(_check: &'static str) -> Option<super::OciHarness> {
                super::runtime($binary)
                    .await
                    .map(|runtime| super::OciHarness { runtime })
            }

            stevedore_engine::runtime_conformance_tests!(containers harness);
        }
    };
}

conformance_with!(crun, "crun");
conformance_with!(runc, "runc");

/// The runtime binaries the other tests run under.
const BINARIES: [&str; 2] = ["crun", "runc"];

fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "oci-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Asserts that nothing of container `id` is left on the host: no bundle, no mount, no
/// runtime state, no cgroup.
fn assert_nothing_left(runtime: &OciRuntime, id: &ContainerId) {
    let bundle = runtime.bundle_dir(id);
    assert!(!bundle.exists(), "the bundle {} stays", bundle.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mountinfo.contains(&bundle.to_string_lossy().to_string()),
        "a mount of {} stays",
        bundle.display()
    );
    let state = runtime.runtime_state_dir(id);
    assert!(
        !state.exists(),
        "the runtime's state {} stays",
        state.display()
    );
    for group in runtime.cgroup_dirs(id) {
        assert!(!group.exists(), "the cgroup {} stays", group.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_container_leaves_nothing_behind() -> TestResult {
    for binary in BINARIES {
        let Some(runtime) = runtime(binary).await else {
            return Ok(());
        };
        // One that ran to its end, and one removed while it runs.
        let finished = runtime.create(&shell("echo done")).await?;
        runtime.start(&finished).await?;
        runtime.wait(&finished).await?;
        let running = runtime.create(&shell("sleep 3600")).await?;
        runtime.start(&running).await?;
        // One created and never started.
        let created = runtime.create(&shell("true")).await?;
        for id in [&finished, &running, &created] {
            assert!(runtime.bundle_dir(id).exists());
            runtime.remove(id).await?;
            assert_nothing_left(&runtime, id);
            assert!(matches!(
                runtime.remove(id).await,
                Err(EngineError::ContainerNotFound { .. })
            ));
        }
    }
    Ok(())
}

/// A runner killed with `-9` leaves its containers; the next process (another runtime over
/// the same state root, which never saw them) finds them by label and removes them, running
/// or not, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_process_finds_and_removes_what_an_earlier_one_left() -> TestResult {
    for binary in BINARIES {
        let Some(earlier) = runtime(binary).await else {
            return Ok(());
        };
        let runner = unique("reap");
        let mut spec = shell("sleep 3600");
        spec.labels.insert(RUNNER_LABEL.to_owned(), runner.clone());
        let running = earlier.create(&spec).await?;
        earlier.start(&running).await?;
        let mut spec = shell("exit 0");
        spec.labels.insert(RUNNER_LABEL.to_owned(), runner.clone());
        let stopped = earlier.create(&spec).await?;
        earlier.start(&stopped).await?;
        earlier.wait(&stopped).await?;
        let never_started = earlier.create(&spec).await?;

        let Some(later) = runtime(binary).await else {
            return Ok(());
        };
        let mut listed = later.list_labeled(RUNNER_LABEL, &runner).await?;
        listed.sort();
        let mut expected = vec![running.clone(), stopped.clone(), never_started.clone()];
        expected.sort();
        assert_eq!(listed, expected);
        let detailed = later
            .list_labeled_containers(RUNNER_LABEL, Some(&runner))
            .await?;
        let running_now: Vec<&ContainerId> = detailed
            .iter()
            .filter(|listed| listed.running)
            .map(|listed| &listed.id)
            .collect();
        assert_eq!(running_now, [&running]);
        for id in &listed {
            later.remove(id).await?;
            assert_nothing_left(&later, id);
        }
        assert!(later.list_labeled(RUNNER_LABEL, &runner).await?.is_empty());
        // The earlier process sees its container gone: killed, not OOM-killed.
        let status = tokio::time::timeout(Duration::from_secs(30), earlier.wait(&running)).await?;
        match status {
            Ok(status) => assert_eq!(status.exit_code, 137, "{status:?}"),
            Err(error) => panic!("{error}"),
        }
        let _ = earlier.remove(&running).await;
    }
    Ok(())
}

/// An OOM kill is named from the task group's own counter, with the peak at the limit; CPU
/// time and peak memory are counted over the whole life, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kills_cpu_time_and_peak_memory_are_counted() -> TestResult {
    for binary in BINARIES {
        let Some(runtime) = runtime(binary).await else {
            return Ok(());
        };
        let mut hungry = shell("x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}");
        hungry.memory_bytes = Some(16 << 20);
        let finished = run_to_end(&runtime, &hungry).await;
        assert!(finished.status.oom_killed, "{finished:?}");
        assert_eq!(finished.status.exit_code, 137, "{finished:?}");
        let usage = finished.status.usage.ok_or("no usage")?;
        assert!(
            usage.peak_memory_bytes.is_some_and(|peak| peak >= 15 << 20),
            "{usage:?}"
        );

        // A child killed for memory while the shell survives and exits 0: still named, from
        // the group's own notification (v1) or count (v2), as Docker names it.
        let mut child =
            shell("(x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}); echo after");
        child.memory_bytes = Some(16 << 20);
        let finished = run_to_end(&runtime, &child).await;
        assert_eq!(finished.status.exit_code, 0, "{finished:?}");
        assert_eq!(String::from_utf8_lossy(&finished.stdout), "after\n");
        assert!(finished.status.oom_killed, "{finished:?}");

        // Some CPU (hashing 16 MiB of random bytes, about 100 ms here), and 32 MiB held at once.
        let mut busy = shell(
            "x=$(head -c 33554432 /dev/zero | tr '\\0' a); \
             head -c 16777216 /dev/urandom | md5sum >/dev/null; echo ${#x}",
        );
        busy.memory_bytes = Some(512 << 20);
        let finished = run_to_end(&runtime, &busy).await;
        assert_eq!(finished.status.exit_code, 0, "{finished:?}");
        assert!(!finished.status.oom_killed);
        assert_eq!(String::from_utf8_lossy(&finished.stdout), "33554432\n");
        let usage = finished.status.usage.ok_or("no usage")?;
        assert!(
            usage.cpu_total_ns.is_some_and(|ns| ns >= 20_000_000),
            "{usage:?}"
        );
        assert!(
            usage.peak_memory_bytes.is_some_and(|peak| peak >= 32 << 20),
            "{usage:?}"
        );
        assert!(usage.peak_pids.is_none_or(|pids| pids >= 2), "{usage:?}");
    }
    Ok(())
}

/// The process limit holds a fork bomb; the task runs without new privileges, with the
/// default capabilities only, as the image's user or the spec's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_privileges_hold() -> TestResult {
    for binary in BINARIES {
        let Some(runtime) = runtime(binary).await else {
            return Ok(());
        };
        // Forty sleepers against a limit of ten: the shell cannot fork the eleventh process.
        let mut forks = shell("i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo all");
        forks.pids_limit = Some(10);
        let finished = run_to_end(&runtime, &forks).await;
        assert_ne!(finished.status.exit_code, 0, "{finished:?}");
        assert!(finished.stdout.is_empty(), "{finished:?}");
        let peak = finished.status.usage.and_then(|usage| usage.peak_pids);
        assert!(peak.is_none_or(|peak| peak <= 10), "{finished:?}");

        // No way into a user namespace (which would hand back the capabilities), no mounts.
        let escapes = shell(
            "unshare -U true && echo unshared; unshare -r true && echo mapped; \
             mount -t tmpfs none /tmp && echo mounted; echo tried",
        );
        let finished = run_to_end(&runtime, &escapes).await;
        assert_eq!(
            String::from_utf8_lossy(&finished.stdout),
            "tried\n",
            "{finished:?}"
        );

        let mut status = shell("cat /proc/self/status");
        status.user = Some("nobody".to_owned());
        let finished = run_to_end(&runtime, &status).await;
        let text = String::from_utf8_lossy(&finished.stdout).to_string();
        let field = |name: &str| -> String {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(field("NoNewPrivs:"), "1", "{text}");
        // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID NET_BIND_SERVICE SETFCAP.
        assert_eq!(field("CapBnd:"), "00000000800004fb", "{text}");
        assert!(field("Uid:").starts_with("65534"), "{text}");
        assert_eq!(field("Seccomp:"), "2", "{text}");
    }
    Ok(())
}

/// Both runtimes load the seccomp filter as written: ordinary programs run under it (forks,
/// pipes, files, timers, the 32-bit personality `linux32` asks for), while the calls into new
/// namespaces answer `EPERM`. `unshare -U` needs no capability, so only the filter stands
/// between a task and a user namespace of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seccomp_filter_refuses_new_namespaces_and_lets_programs_run() -> TestResult {
    for binary in BINARIES {
        let Some(runtime) = runtime(binary).await else {
            return Ok(());
        };
        let ordinary = shell(
            "echo ok; seq 3 | sort -r | tr '\\n' ' '; echo; sleep 0.1; \
             date +%s >/dev/null && ls -l / >/dev/null && echo listed; \
             (cd /tmp && echo x >f && mv f g && cat g && rm g); \
             linux32 true && echo personality",
        );
        let finished = run_to_end(&runtime, &ordinary).await;
        assert_eq!(finished.status.exit_code, 0, "{binary}: {finished:?}");
        assert_eq!(
            String::from_utf8_lossy(&finished.stdout),
            "ok\n3 2 1 \nlisted\nx\npersonality\n",
            "{binary}: {finished:?}"
        );

        let refused =
            shell("unshare -U true || echo refused; nsenter -t 1 -m true || echo refused");
        let finished = run_to_end(&runtime, &refused).await;
        assert_eq!(
            String::from_utf8_lossy(&finished.stdout),
            "refused\nrefused\n",
            "{binary}: {finished:?}"
        );
        let stderr = String::from_utf8_lossy(&finished.stderr);
        assert_eq!(
            stderr.matches("Operation not permitted").count(),
            2,
            "{binary}: {stderr}"
        );
    }
    Ok(())
}

/// Networks are the pool's: the OCI engine refuses to manage one, and a task that needs one
/// without a pool is refused before anything is made.
#[tokio::test]
async fn managed_networks_are_refused_clearly() -> TestResult {
    let Some(runtime) = runtime("runc").await else {
        return Ok(());
    };
    let refused = runtime
        .ensure_network(&NetworkSpec {
            name: "stevedore-oci-test".to_owned(),
            bridge: "stvd-ocitest".to_owned(),
            subnet: None,
        })
        .await;
    assert!(
        matches!(refused, Err(EngineError::LimitUnenforceable { .. })),
        "{refused:?}"
    );
    let runner = unique("network");
    let mut spec = shell("true");
    spec.network_mode = Some("stevedore-tasks".to_owned());
    spec.labels.insert(RUNNER_LABEL.to_owned(), runner.clone());
    let refused = runtime.create(&spec).await;
    assert!(
        matches!(refused, Err(EngineError::LimitUnenforceable { .. })),
        "{refused:?}"
    );
    assert!(
        runtime
            .list_labeled(RUNNER_LABEL, &runner)
            .await?
            .is_empty()
    );
    Ok(())
}

/// The runtime is told apart from its version answer.
#[tokio::test]
async fn the_runtime_binary_is_recognised() -> TestResult {
    for (binary, kind) in [
        ("crun", OciRuntimeKind::Crun),
        ("runc", OciRuntimeKind::Runc),
    ] {
        let Some(runtime) = runtime(binary).await else {
            return Ok(());
        };
        assert_eq!(runtime.kind(), kind);
        let capabilities = runtime.capabilities().await?;
        assert!(capabilities.server_version.starts_with(binary));
        assert!(capabilities.memory_limit && capabilities.pids_limit);
    }
    Ok(())
}

/// A pool of one kind of network namespace, made with `ip netns` when taken and deleted
/// when given back: each holds a veth pair `probe0`, `probe1`, so a task can tell it runs in it.
struct ProbeNetns {
    prefix: String,
    taken: std::sync::Mutex<Vec<(String, PathBuf)>>,
    given_back: std::sync::Mutex<Vec<PathBuf>>,
}

fn ip(args: &[&str]) -> Result<(), EngineError> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| EngineError::Failed {
            message: format!("ip: {error}"),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(EngineError::Failed {
            message: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

#[async_trait]
impl NetnsSource for ProbeNetns {
    async fn take(&self, network: &str) -> Result<TaskNetns, EngineError> {
        assert_eq!(network, "stevedore-tasks");
        let name = {
            let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
            let name = format!("{}-{}", self.prefix, taken.len());
            taken.push((name.clone(), PathBuf::from(format!("/run/netns/{name}"))));
            name
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "-n", &name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
        ])?;
        Ok(TaskNetns {
            path: PathBuf::from(format!("/run/netns/{name}")),
            address: std::net::Ipv4Addr::new(10, 213, 0, 2),
            gateway: std::net::Ipv4Addr::new(10, 213, 0, 1),
            nameservers: vec![std::net::Ipv4Addr::new(10, 213, 0, 1)],
        })
    }

    async fn give_back(&self, netns: TaskNetns) {
        if let Some(name) = netns.path.file_name().and_then(|name| name.to_str()) {
            let _ = ip(&["netns", "delete", name]);
        }
        self.given_back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(netns.path);
    }
}

/// A task on a network runs in the namespace the pool hands out, with its address and
/// nameserver in `/etc/hosts` and `/etc/resolv.conf`; the namespace goes back to the pool
/// with the removal. A task without a network gets an empty namespace of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_network_is_the_pools_namespace() -> TestResult {
    for binary in BINARIES {
        let Some(plain) = runtime(binary).await else {
            return Ok(());
        };
        let pool = Arc::new(ProbeNetns {
            prefix: unique("netns"),
            taken: std::sync::Mutex::new(Vec::new()),
            given_back: std::sync::Mutex::new(Vec::new()),
        });
        let settings = OciSettings {
            state_root: scratch_root().join("state"),
            runtime: Some(PathBuf::from(binary)),
        };
        let runtime = OciRuntime::new(
            Arc::new(BusyboxImage {
                layer: busybox_layer()?,
            }),
            Some(pool.clone()),
            settings,
        )
        .await?;
        let mut spec = shell("ls /sys/class/net; cat /etc/hosts /etc/resolv.conf");
        spec.network_mode = Some("stevedore-tasks".to_owned());
        let finished = run_to_end(&runtime, &spec).await;
        assert_eq!(finished.status.exit_code, 0, "{finished:?}");
        let output = String::from_utf8_lossy(&finished.stdout);
        assert!(output.contains("probe0"), "{output}");
        assert!(output.contains("10.213.0.2\t"), "{output}");
        assert!(output.contains("nameserver 10.213.0.1"), "{output}");
        let taken: Vec<PathBuf> = pool
            .taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, path)| path.clone())
            .collect();
        assert_eq!(
            *pool.given_back.lock().unwrap_or_else(|e| e.into_inner()),
            taken
        );

        let finished = run_to_end(&plain, &shell("ls /sys/class/net")).await;
        assert_eq!(String::from_utf8_lossy(&finished.stdout), "lo\n");
    }
    Ok(())
}

/// Containers of a CPU group run in a capped cgroup of its own, and the group goes once
/// they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_group_caps_its_containers() -> TestResult {
    for binary in BINARIES {
        let Some(runtime) = runtime(binary).await else {
            return Ok(());
        };
        let group = unique("cpu");
        runtime.ensure_cpu_group(&group, 500_000_000).await?;
        let mut spec = shell("cat /proc/self/cgroup");
        spec.cpu_group = Some(group.clone());
        spec.nano_cpus = Some(250_000_000);
        let id = runtime.create(&spec).await?;
        let dirs = runtime.cgroup_dirs(&id);
        assert!(
            dirs.iter()
                .any(|dir| dir.starts_with(format!("/sys/fs/cgroup/cpu/{group}"))
                    || dir.starts_with(format!("/sys/fs/cgroup/{group}"))),
            "{dirs:?}"
        );
        let v1_quota = Path::new("/sys/fs/cgroup/cpu")
            .join(&group)
            .join(id.as_str())
            .join("cpu.cfs_quota_us");
        if v1_quota.exists() {
            assert_eq!(std::fs::read_to_string(&v1_quota)?.trim(), "25000");
            let group_quota = Path::new("/sys/fs/cgroup/cpu")
                .join(&group)
                .join("cpu.cfs_quota_us");
            assert_eq!(std::fs::read_to_string(&group_quota)?.trim(), "50000");
        }
        let mut output = runtime.attach(&id).await?;
        runtime.start(&id).await?;
        let mut text = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut output).await {
            text.extend_from_slice(&chunk?.bytes);
        }
        runtime.wait(&id).await?;
        runtime.remove(&id).await?;
        assert_nothing_left(&runtime, &id);
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains(&format!("/{group}/{id}/")), "{text}");
        runtime.remove_cpu_group(&group).await?;
        assert!(!Path::new("/sys/fs/cgroup/cpu").join(&group).exists());
        assert!(!Path::new("/sys/fs/cgroup/memory").join(&group).exists());
    }
    Ok(())
}

/// What [`nothing_is_left_after_a_kill_9_of_the_process_that_ran_it`] runs in a process of
/// its own: starts a container labelled `$STEVEDORE_OCI_LEAVE_LABEL` that runs until killed,
/// touches `$STEVEDORE_OCI_LEAVE_MARKER`, and waits to be killed itself. Does nothing
/// without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by nothing_is_left_after_a_kill_9_of_the_process_that_ran_it"]
async fn leaves_a_running_container() -> TestResult {
    let (Ok(binary), Ok(label), Ok(marker)) = (
        std::env::var("STEVEDORE_OCI_LEAVE_BINARY"),
        std::env::var("STEVEDORE_OCI_LEAVE_LABEL"),
        std::env::var("STEVEDORE_OCI_LEAVE_MARKER"),
    ) else {
        return Ok(());
    };
    let binary: &'static str = if binary == "crun" { "crun" } else { "runc" };
    let Some(runtime) = runtime(binary).await else {
        return Ok(());
    };
    let mut spec = shell("echo started; sleep 3600");
    spec.labels.insert(RUNNER_LABEL.to_owned(), label);
    let id = runtime.create(&spec).await?;
    let _output = runtime.attach(&id).await?;
    runtime.start(&id).await?;
    std::fs::write(marker, id.as_str())?;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

/// A process running a container is killed with `-9`; the next one finds the container by
/// its label, still running, and removes it: no process, bundle, mount, runtime state or
/// cgroup of it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_a_kill_9_of_the_process_that_ran_it() -> TestResult {
    for binary in BINARIES {
        let Some(later) = runtime(binary).await else {
            return Ok(());
        };
        let label = unique("kill9");
        let marker = scratch_root().join(format!("{label}.started"));
        let mut earlier = std::process::Command::new(std::env::current_exe()?)
            .args([
                "--ignored",
                "--exact",
                "leaves_a_running_container",
                "--nocapture",
            ])
            .env("STEVEDORE_OCI_LEAVE_BINARY", binary)
            .env("STEVEDORE_OCI_LEAVE_LABEL", &label)
            .env("STEVEDORE_OCI_LEAVE_MARKER", &marker)
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !marker.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the earlier process started no container"
            );
            if let Some(status) = earlier.try_wait()? {
                panic!("the earlier process ended: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let id = ContainerId::new(std::fs::read_to_string(&marker)?);
        std::fs::remove_file(&marker)?;
        earlier.kill()?; // SIGKILL
        earlier.wait()?;

        let listed = later
            .list_labeled_containers(RUNNER_LABEL, Some(&label))
            .await?;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].id, id);
        assert!(listed[0].running, "{listed:?}");
        let pid: u32 = std::fs::read_to_string(later.bundle_dir(&id).join("pid"))?
            .trim()
            .parse()?;
        later.remove(&id).await?;
        assert_nothing_left(&later, &id);
        // The container's process is gone too (a zombie of nobody's for a moment at most).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the container's init {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// A command the image does not have fails the container, not the start, with the runtime's
/// word on its stderr and named as the engine's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_is_told() -> TestResult {
    for binary in BINARIES {
        let Some(runtime) = runtime(binary).await else {
            return Ok(());
        };
        let mut spec = shell("");
        spec.cmd = Some(vec!["/no/such/program".to_owned()]);
        let finished = run_to_end(&runtime, &spec).await;
        assert_ne!(finished.status.exit_code, 0, "{finished:?}");
        assert!(finished.status.engine_error.is_some(), "{finished:?}");
        assert!(
            String::from_utf8_lossy(&finished.stderr).contains("/no/such/program"),
            "{finished:?}"
        );
    }
    Ok(())
}

/// A runtime whose state root was removed (its data directory went) has nothing of its own
/// left to list, so the watchdog of a runner gone with its data directory ends.
#[tokio::test]
async fn a_removed_state_root_lists_no_containers() -> TestResult {
    if runtime("runc").await.is_none() {
        return Ok(());
    }
    let state_root = tempfile::tempdir()?;
    let runtime = OciRuntime::new(
        Arc::new(BusyboxImage {
            layer: busybox_layer()?,
        }),
        None,
        OciSettings {
            state_root: state_root.path().join("oci"),
            runtime: Some(PathBuf::from("runc")),
        },
    )
    .await?;
    drop(state_root);
    assert!(
        runtime
            .list_labeled(RUNNER_LABEL, "anyone")
            .await?
            .is_empty()
    );
    assert!(
        runtime
            .list_labeled_containers(RUNNER_LABEL, None)
            .await?
            .is_empty()
    );
    Ok(())
}
