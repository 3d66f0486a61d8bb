//! What runs on the engine: the overlap sampler and the soak's containers.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// === overlap sampling ===

/// What the sampler saw.
#[derive(Debug, Default)]
pub(super) struct Sampling {
    pub(super) taken: usize,
    pub(super) failed: usize,
    /// Per task seen running: the most of its containers running in one sample.
    pub(super) most_at_once: HashMap<String, usize>,
}

/// Every 200 ms, one `docker ps` of the running task containers of this soak's runners.
pub(super) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Sampling>,
}

impl Sampler {
    const INTERVAL: Duration = Duration::from_millis(200);

    pub(super) fn start(prefix: String) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut sampling = Sampling::default();
            while !stopped.load(Ordering::Relaxed) {
                let next = Instant::now() + Self::INTERVAL;
                sampling.taken += 1;
                match running_task_containers(&prefix) {
                    Some(tasks) => {
                        let mut now: HashMap<String, usize> = HashMap::new();
                        for task in tasks {
                            *now.entry(task).or_default() += 1;
                        }
                        for (task, count) in now {
                            if count > 1 {
                                eprintln!("soak: task {task} has {count} containers running");
                            }
                            let most = sampling.most_at_once.entry(task).or_default();
                            *most = (*most).max(count);
                        }
                    }
                    None => sampling.failed += 1,
                }
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            sampling
        });
        Sampler { stop, thread }
    }

    pub(super) fn stop(self) -> Sampling {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler panicked")
    }
}

/// The task id of every running container of this soak's runners, once per container; `None`
/// when the engine does not answer.
fn running_task_containers(prefix: &str) -> Option<Vec<String>> {
    let output = Command::new("timeout")
        .args([
            "5",
            "docker",
            "ps",
            "--filter",
            "label=stevedore.task",
            "--filter",
            "status=running",
            "--format",
            "{{.Label \"stevedore.task\"}} {{.Label \"stevedore.runner\"}}",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once(' '))
            .filter(|(_, runner)| runner.starts_with(prefix))
            .map(|(task, _)| task.to_owned())
            .collect(),
    )
}

/// The containers (id, runner) of this soak's runners; `extra` adds to `docker ps`, e.g. `-a`.
pub(super) fn containers_of(prefix: &str, extra: &[&str]) -> Vec<(String, String)> {
    let output = Command::new("docker")
        .arg("ps")
        .args(extra)
        .args([
            "--filter",
            "label=stevedore.runner",
            "--format",
            "{{.ID}} {{.Label \"stevedore.runner\"}}",
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, runner)| runner.starts_with(prefix))
        .map(|(id, runner)| (id.to_owned(), runner.to_owned()))
        .collect()
}

/// Removes what this soak's runners left, once it is counted.
pub(super) fn remove_leftovers(prefix: &str) {
    for (id, _) in containers_of(prefix, &["-a"]) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
