//! The queue across several runners on one store, against the real Docker engine and a real
//! SQLite store: priorities and delays, a code's `max_concurrency` observed through the
//! engine, pause/resume and `cancel_all`, and many tasks over several runners running once.
//!
//! Like `docker.rs`, the tests skip, saying why, when the engine is not reachable and `CI` is
//! not set; with `CI` set a missing engine fails them. Every runner has an id of its own test,
//! the tests look only at containers of their own runners and tasks (other tests share the
//! daemon), and a guard removes leftovers of their runners should a test panic. They build
//! their own tag of the local busybox image, so they never race other test binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/harness.rs"]
mod harness;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use harness::{Background, Harness, ObservedSource};
use stevedore_engine::{ContainerRuntime, DockerEngine};
use stevedore_model::task::DEFAULT_CLUSTER;
use stevedore_model::{CodeRevision, NewTask, StackTable, SystemClock, Task, TaskStatus};
use stevedore_runner::{LABEL_RUNNER, LABEL_TASK, Runner, RunnerConfig};
use stevedore_store::{Page, TaskFilter};
use tokio::sync::OnceCell;

/// The image every test runs: the host's static busybox, imported under a tag of our own.
const TEST_IMAGE: &str = "stevedore/busybox:queue-tests";
const WITHIN: Duration = Duration::from_secs(60);
/// Prints the task's id, so a log shows how often the task ran.
const ECHO_ID: &str = "echo \"ran $TASK_ID\"";

static IMAGE_BUILT: OnceCell<()> = OnceCell::const_new();

/// One test's world: the engine, a store, and the ids its runners get.
struct QueueTest {
    engine: Arc<DockerEngine>,
    harness: Harness,
    name: String,
    _cleanup: Cleanup,
}

/// One runner running in the background, with what its source saw.
struct Started {
    runner_id: String,
    background: Background,
    source: Arc<ObservedSource>,
}

/// Removes every container of the test's runners when dropped, even after a panic.
struct Cleanup {
    runner_ids: Vec<String>,
}

/// At most this many runners per test (the cleanup guard knows their ids up front).
const MAX_RUNNERS: usize = 3;

fn runner_id(name: &str, index: usize) -> String {
    format!("queue-test-{name}-{}-{index}", std::process::id())
}

/// The test's world, or `None` (the test then skips) when the engine is unreachable
/// outside CI.
async fn queue_test(name: &str) -> Option<QueueTest> {
    let engine = harness::docker_engine(name, TEST_IMAGE, &IMAGE_BUILT).await?;
    Some(QueueTest {
        engine: Arc::new(engine),
        harness: Harness::new(Arc::new(SystemClock)).await,
        name: name.to_owned(),
        _cleanup: Cleanup {
            runner_ids: (0..MAX_RUNNERS).map(|i| runner_id(name, i)).collect(),
        },
    })
}

macro_rules! docker_or_skip {
    ($name:expr) => {
        match queue_test($name).await {
            Some(test) => test,
            None => return,
        }
    };
}

// === impl QueueTest ===

impl QueueTest {
    fn config(&self, index: usize, capacity: u32) -> RunnerConfig {
        assert!(index < MAX_RUNNERS);
        RunnerConfig {
            runner_id: runner_id(&self.name, index),
            capacity: Some(capacity),
            memory_budget_mib: Some(2048),
            heartbeat_interval: Duration::from_millis(300),
            idle_poll_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(10),
            stacks: StackTable::default()
                .with_image("default", TEST_IMAGE)
                .unwrap(),
            ..RunnerConfig::default()
        }
    }

    /// Starts `count` runners, each with its own id and `capacity`, on the one store.
    fn start_runners(&self, count: usize, capacity: u32) -> Vec<Started> {
        (0..count)
            .map(|index| {
                let config = self.config(index, capacity);
                let runner_id = config.runner_id.clone();
                let source = self.harness.source();
                let runner = Runner::new(config, source.clone(), self.engine.clone());
                Started {
                    runner_id,
                    background: Background::start(runner),
                    source,
                }
            })
            .collect()
    }

    /// Pushes an image code running `command` in the test image.
    async fn shell_code(
        &self,
        name: &str,
        command: &str,
        adjust: impl FnOnce(&mut stevedore_model::CodeSpec),
    ) -> CodeRevision {
        self.harness
            .push_image_code(name, TEST_IMAGE, Some(command), adjust)
            .await
    }

    /// Queues one task of `code_name` with a priority and a delay.
    async fn queue(&self, code_name: &str, priority: u8, delay_secs: u32, timeout: u32) -> Task {
        let task = NewTask {
            code_name: code_name.to_owned(),
            payload: String::new(),
            priority,
            timeout_secs: timeout,
            delay_secs,
            label: None,
            cluster: DEFAULT_CLUSTER.to_owned(),
            retry_count: 0,
            original_task_id: None,
            schedule_id: None,
            code_rev: None,
        };
        let mut queued = self
            .harness
            .store
            .enqueue(&self.harness.project_id, &[task], self.harness.clock.now())
            .await
            .unwrap();
        queued.remove(0)
    }

    /// Queues `count` tasks of priority 0.
    async fn queue_many(&self, code_name: &str, count: usize, timeout: u32) -> Vec<String> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.queue(code_name, 0, 0, timeout).await.id);
        }
        ids
    }

    /// The code's tasks in the given statuses, as the store sees them.
    async fn tasks_in(&self, code_name: &str, statuses: &[TaskStatus]) -> Vec<Task> {
        let filter = TaskFilter {
            code_name: Some(code_name.to_owned()),
            statuses: statuses.to_vec(),
            ..TaskFilter::default()
        };
        let page = Page {
            page: 1,
            per_page: 100,
        };
        self.harness
            .store
            .list_tasks(&self.harness.project_id, &filter, page)
            .await
            .unwrap()
    }

    /// Waits until every task reached a terminal status; returns them in the given order.
    async fn all_finished(&self, ids: &[String], within: Duration) -> Vec<Task> {
        let mut done = Vec::with_capacity(ids.len());
        for id in ids {
            done.push(self.harness.finished(id, within).await);
        }
        done
    }

    /// Stops every runner and checks that no container of theirs, nor of `tasks`, is left.
    async fn stop_and_check_teardown(&self, runners: Vec<Started>, tasks: &[String]) {
        let mut ids = Vec::new();
        for runner in runners {
            runner.background.stop().await.unwrap();
            ids.push(runner.runner_id);
        }
        for id in &ids {
            let left = self.engine.list_labeled(LABEL_RUNNER, id).await.unwrap();
            assert!(left.is_empty(), "runner {id} left containers: {left:?}");
        }
        for task in tasks {
            let left = self.engine.list_labeled(LABEL_TASK, task).await.unwrap();
            assert!(left.is_empty(), "task {task} left {left:?}");
        }
    }
}

/// How many containers of `tasks` the engine runs right now (`docker ps`, running only).
async fn alive_containers(tasks: &HashSet<String>) -> usize {
    let output = tokio::process::Command::new("docker")
        .args([
            "ps",
            "--filter",
            &format!("label={LABEL_TASK}"),
            "--format",
            &format!("{{{{.Label \"{LABEL_TASK}\"}}}}"),
        ])
        .output()
        .await
        .expect("the docker CLI runs");
    assert!(
        output.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|task| tasks.contains(task.trim()))
        .count()
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let runner_ids = self.runner_ids.clone();
        // Drop cannot await; a thread with its own runtime can.
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
                for runner_id in runner_ids {
                    if let Ok(ids) = engine.list_labeled(LABEL_RUNNER, &runner_id).await {
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

#[tokio::test]
async fn tasks_start_by_priority_then_fifo_and_a_delayed_task_waits_for_its_due_time() {
    let test = docker_or_skip!("priority");
    test.shell_code("prio", ECHO_ID, |_| {}).await;
    // The highest priority and queued first, but not due for 2 s.
    let delayed = test.queue("prio", 2, 2, 60).await;
    let mut queued = Vec::new();
    for priority in [0, 1, 2, 0, 2, 1] {
        // Apart in time, so "earliest due first" decides inside a priority, not the ids.
        tokio::time::sleep(Duration::from_millis(5)).await;
        queued.push(test.queue("prio", priority, 0, 60).await);
    }
    let expected: Vec<(u8, String)> = [2, 4, 1, 5, 0, 3]
        .iter()
        .map(|&i| (queued[i].priority, queued[i].id.clone()))
        .collect();
    let runners = test.start_runners(1, 1);

    // Until its due time the delayed task stays queued; polled often enough to see an early
    // lease.
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let task = test.harness.task(&delayed.id).await;
        let now = test.harness.clock.now();
        if task.status != TaskStatus::Queued {
            assert!(
                now >= delayed.due_at,
                "the delayed task left the queue at {now}, before its due time {}: {task:#?}",
                delayed.due_at
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{task:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delayed_done = test.harness.finished(&delayed.id, WITHIN).await;
    assert_eq!(
        delayed_done.status,
        TaskStatus::Complete,
        "{delayed_done:#?}"
    );
    let delayed_start = delayed_done.start_time.unwrap();
    assert!(
        delayed_start >= delayed.due_at,
        "started at {delayed_start}, due at {}",
        delayed.due_at
    );
    assert_eq!(
        (delayed.due_at - delayed.created_at).num_milliseconds(),
        2000
    );

    let ids: Vec<String> = queued.iter().map(|task| task.id.clone()).collect();
    let mut done = test.all_finished(&ids, WITHIN).await;
    for task in &done {
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
        assert_eq!(
            test.harness.log(&task.id).await,
            format!("ran {}\n", task.id)
        );
    }
    // By the containers' own start times.
    done.sort_by_key(|task| task.start_time.unwrap());
    let started: Vec<(u8, String)> = done
        .iter()
        .map(|task| (task.priority, task.id.clone()))
        .collect();
    assert_eq!(started, expected, "start order (priority, id)");
    // By the order the one runner (capacity 1: one task at a time) reported them.
    let reported: Vec<String> = runners[0]
        .source
        .outcomes
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _, _)| id.clone())
        .filter(|id| *id != delayed.id)
        .collect();
    let expected_ids: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    assert_eq!(reported, expected_ids, "completion order");
    assert_eq!(runners[0].source.max_running(), 1);

    let mut all = ids;
    all.push(delayed.id);
    test.stop_and_check_teardown(runners, &all).await;
}

#[tokio::test]
async fn max_concurrency_holds_across_runners_as_the_engine_sees_it() {
    let test = docker_or_skip!("max-concurrency");
    test.shell_code("capped", "sleep 2", |spec| spec.max_concurrency = Some(2))
        .await;
    let ids = test.queue_many("capped", 8, 60).await;
    let watched: HashSet<String> = ids.iter().cloned().collect();
    let runners = test.start_runners(3, 3);

    let deadline = tokio::time::Instant::now() + WITHIN;
    let (mut most_alive, mut most_held, mut samples) = (0, 0, 0);
    loop {
        let alive = alive_containers(&watched).await;
        let held = test
            .tasks_in("capped", &[TaskStatus::Preparing, TaskStatus::Running])
            .await;
        samples += 1;
        most_alive = most_alive.max(alive);
        most_held = most_held.max(held.len());
        assert!(
            alive <= 2,
            "{alive} containers of the capped code alive at once"
        );
        assert!(
            held.len() <= 2,
            "the store holds {} of the capped code's tasks at once: {held:#?}",
            held.len()
        );
        let finished = test
            .tasks_in(
                "capped",
                &[
                    TaskStatus::Complete,
                    TaskStatus::Error,
                    TaskStatus::Timeout,
                    TaskStatus::Cancelled,
                ],
            )
            .await;
        if finished.len() == ids.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 8 finished",
            finished.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in test.all_finished(&ids, WITHIN).await {
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
    }
    // The cap was reached, so the check above had something to hold against.
    assert_eq!(most_alive, 2, "over {samples} samples");
    assert!(most_held <= 2);
    let ran: usize = runners
        .iter()
        .map(|runner| runner.source.outcomes.lock().unwrap().len())
        .sum();
    assert_eq!(ran, 8);
    test.stop_and_check_teardown(runners, &ids).await;
}

#[tokio::test]
async fn a_paused_queue_leases_nothing_until_resumed() {
    let test = docker_or_skip!("pause");
    let code = test.shell_code("pausable", ECHO_ID, |_| {}).await;
    let store = &test.harness.store;
    let project = &test.harness.project_id;
    let clock = &test.harness.clock;
    store
        .set_code_paused(project, &code.id, true, clock.now())
        .await
        .unwrap();
    let ids = test.queue_many("pausable", 4, 60).await;
    let watched: HashSet<String> = ids.iter().cloned().collect();
    let runners = test.start_runners(2, 2);

    let paused_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < paused_until {
        for id in &ids {
            let task = test.harness.task(id).await;
            assert_eq!(task.status, TaskStatus::Queued, "{task:#?}");
            assert_eq!(task.runner_id, None);
        }
        assert_eq!(alive_containers(&watched).await, 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for runner in &runners {
        assert!(runner.source.outcomes.lock().unwrap().is_empty());
    }

    store
        .set_code_paused(project, &code.id, false, clock.now())
        .await
        .unwrap();
    for task in test.all_finished(&ids, Duration::from_secs(30)).await {
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
        assert_eq!(
            test.harness.log(&task.id).await,
            format!("ran {}\n", task.id)
        );
    }
    test.stop_and_check_teardown(runners, &ids).await;
}

#[tokio::test]
async fn cancel_all_cancels_queued_tasks_at_once_and_kills_running_ones() {
    let test = docker_or_skip!("cancel-all");
    let code = test.shell_code("long", "sleep 60", |_| {}).await;
    let ids = test.queue_many("long", 5, 3600).await;
    // Two runners with one slot each: two tasks run, three stay queued.
    let runners = test.start_runners(2, 1);

    let deadline = tokio::time::Instant::now() + WITHIN;
    let running = loop {
        let running = test.tasks_in("long", &[TaskStatus::Running]).await;
        if running.len() == 2 {
            break running;
        }
        assert!(tokio::time::Instant::now() < deadline, "{running:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let running_ids: HashSet<String> = running.iter().map(|task| task.id.clone()).collect();
    let holders: HashSet<Option<String>> = running.iter().map(|t| t.runner_id.clone()).collect();
    assert_eq!(holders.len(), 2, "each runner runs one: {running:#?}");
    assert_eq!(alive_containers(&running_ids).await, 2);
    let queued: Vec<&String> = ids.iter().filter(|id| !running_ids.contains(*id)).collect();
    assert_eq!(queued.len(), 3);

    let asked = tokio::time::Instant::now();
    let touched = test
        .harness
        .store
        .cancel_all(&test.harness.project_id, &code.id, test.harness.clock.now())
        .await
        .unwrap();
    assert_eq!(touched.touched(), 5);
    for id in &queued {
        let task = test.harness.task(id).await;
        assert_eq!(task.status, TaskStatus::Cancelled, "at once: {task:#?}");
        assert!(task.end_time.is_some(), "{task:#?}");
        assert_eq!(task.start_time, None, "{task:#?}");
    }
    for id in &running_ids {
        let task = test.harness.finished(id, WITHIN).await;
        assert_eq!(task.status, TaskStatus::Cancelled, "{task:#?}");
    }
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(2), "cancelling took {took:?}");
    // Nothing else runs in their place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &ids {
        assert_eq!(test.harness.task(id).await.status, TaskStatus::Cancelled);
    }
    test.stop_and_check_teardown(runners, &ids).await;
}

#[tokio::test]
async fn many_tasks_over_several_runners_each_run_exactly_once() {
    let test = docker_or_skip!("many");
    test.shell_code("quick", ECHO_ID, |_| {}).await;
    let ids = test.queue_many("quick", 30, 60).await;
    let runners = test.start_runners(3, 4);

    for task in test.all_finished(&ids, Duration::from_secs(75)).await {
        assert_eq!(task.status, TaskStatus::Complete, "{task:#?}");
        assert_eq!(task.infra_attempts, 0, "{task:#?}");
        let log = test.harness.log(&task.id).await;
        assert_eq!(log, format!("ran {}\n", task.id), "task {}", task.id);
    }
    // Every task reported once, by one runner, over all runners together.
    let mut reports: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for runner in &runners {
        for (id, _, _) in runner.source.outcomes.lock().unwrap().iter() {
            reports
                .entry(id.clone())
                .or_default()
                .push(runner.runner_id.clone());
        }
        assert!(runner.source.requeues.lock().unwrap().is_empty());
    }
    assert_eq!(reports.len(), ids.len());
    for id in &ids {
        assert_eq!(
            reports[id].len(),
            1,
            "task {id} reported by {:?}",
            reports[id]
        );
    }
    let per_runner: Vec<usize> = runners
        .iter()
        .map(|runner| runner.source.outcomes.lock().unwrap().len())
        .collect();
    eprintln!("tasks per runner: {per_runner:?}");
    assert!(
        per_runner.iter().filter(|&&n| n > 0).count() >= 2,
        "the work was shared: {per_runner:?}"
    );
    test.stop_and_check_teardown(runners, &ids).await;
}
