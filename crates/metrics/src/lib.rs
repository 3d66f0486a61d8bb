//! stevedore's Prometheus metrics: the one list of every metric's name, its help text and
//! histogram buckets, the helpers that record them, and the process-wide recorder.
//!
//! Both the runner and the server record through the helpers here, so a metric's name and
//! labels are written down once. Recording is cheap and never fails: before [`install`] is
//! called (or in a process that never calls it, such as `stevedore run`) every helper is a
//! no-op.
//!
//! **Every label value is bounded.** Statuses, priorities, container operations, engine
//! error kinds and HTTP methods come from closed sets; routes are axum's route templates;
//! code and cluster names, which users choose, pass through a [`LabelCap`] that lets the
//! first [`MAX_NAMED_LABELS`] distinct names through and folds every later one into
//! [`OTHER_LABEL`]. Task ids, project ids and messages are never labels.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use stevedore_model::{TaskStatus, Timestamp};

/// Every metric's name. Counters end in `_total`, durations are in seconds and say so.
pub mod names {
    /// Counter `{status, code}`: tasks that reached a final status through this process.
    pub const TASKS_FINISHED: &str = "stevedore_tasks_finished_total";
    /// Gauge `{status}`: tasks queued, preparing and running in the whole store.
    pub const TASKS: &str = "stevedore_tasks";
    /// Gauge `{priority}`: queued tasks that are due now, per priority.
    pub const QUEUE_DEPTH: &str = "stevedore_queue_depth";
    /// Histogram: how long one lease call to the store takes.
    pub const LEASE_DURATION: &str = "stevedore_lease_duration_seconds";
    /// Histogram: from a task's due time to its lease.
    pub const QUEUE_WAIT: &str = "stevedore_queue_wait_seconds";
    /// Histogram `{operation}`: how long the engine takes for one container operation.
    pub const CONTAINER_OPERATION_DURATION: &str = "stevedore_container_operation_duration_seconds";
    /// Histogram `{request}`: how long the engine takes for one request of its API about a
    /// task's container (`inspect_image`, `create`, `upload`, `attach`, `start`, `wait`,
    /// `inspect`, `stats`, `kill`, `remove`): the parts of a container operation.
    pub const ENGINE_REQUEST_DURATION: &str = "stevedore_engine_request_duration_seconds";
    /// Counter `{operation, kind}`: failed engine calls by the kind of failure.
    pub const ENGINE_ERRORS: &str = "stevedore_engine_errors_total";
    /// Gauge: the most tasks the runner in this process runs at once.
    pub const RUNNER_CAPACITY: &str = "stevedore_runner_capacity";
    /// Gauge: the runner's slots in use.
    pub const RUNNER_BUSY: &str = "stevedore_runner_busy";
    /// Counter: bytes of task output the runner in this process shipped.
    pub const LOG_BYTES: &str = "stevedore_log_bytes_total";
    /// Counter: bytes of task output remote runners appended through `/runner/v1`.
    pub const RUNNER_API_LOG_BYTES: &str = "stevedore_runner_api_log_bytes_total";
    /// Gauge `{cluster}`: runners online per cluster (remote and embedded).
    pub const CLUSTER_RUNNERS: &str = "stevedore_cluster_runners";
    /// Gauge `{cluster}`: the summed capacity of a cluster's online runners.
    pub const CLUSTER_CAPACITY: &str = "stevedore_cluster_capacity";
    /// Gauge `{cluster}`: the live leases a cluster's online runners hold.
    pub const CLUSTER_BUSY: &str = "stevedore_cluster_busy";
    /// Counter `{method, route, status}`: HTTP requests answered.
    pub const HTTP_REQUESTS: &str = "stevedore_http_requests_total";
    /// Histogram `{method, route}`: how long answering an HTTP request took.
    pub const HTTP_REQUEST_DURATION: &str = "stevedore_http_request_duration_seconds";
    /// Gauge `{kind}`: bytes of task logs, task payloads and code packages the store holds.
    pub const STORED_BYTES: &str = "stevedore_stored_bytes";
    /// Gauge `{kind, point}`: the stored bytes right `before` and `after` the last retention
    /// run of this process.
    pub const RETENTION_RUN_STORED_BYTES: &str = "stevedore_retention_run_stored_bytes";
    /// Gauge: the time the last retention run of this process counted its ages from (when it
    /// started), seconds since the epoch.
    pub const RETENTION_LAST_RUN: &str = "stevedore_retention_last_run_timestamp_seconds";
    /// Counter `{kind}`: what retention removed: tasks' logs, tasks' payloads, package
    /// revisions.
    pub const RETENTION_REMOVED: &str = "stevedore_retention_removed_total";
    /// Counter `{kind}`: the bytes retention removed.
    pub const RETENTION_REMOVED_BYTES: &str = "stevedore_retention_removed_bytes_total";
}

/// The label value that stands for every name past a [`LabelCap`]'s limit.
pub const OTHER_LABEL: &str = "_other";
/// How many distinct code names (and, separately, cluster names) get a label of their own.
pub const MAX_NAMED_LABELS: usize = 100;
/// The content type of the Prometheus text exposition format that [`render`] produces.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// What the runner asks the container engine to do, as the `operation` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerOperation {
    /// Make the image present, pulling it when needed.
    EnsureImage,
    Create,
    Start,
    Kill,
    Remove,
}

/// What the store holds that retention removes, as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    /// Finished and running tasks' logs.
    Logs,
    /// Tasks' payloads.
    Payloads,
    /// Code revisions' zip packages.
    Packages,
}

/// Bytes stored of every [`StoredKind`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredBytes {
    pub logs: u64,
    pub payloads: u64,
    pub packages: u64,
}

/// The recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another recorder was installed in this process first, or the buckets were invalid.
    /// The cause is kept as text: the first failure is reported to every later caller too.
    #[error("cannot install the Prometheus recorder: {message}")]
    Install { message: String },
}

/// Lets the first `limit` distinct values through as labels and folds every later one into
/// [`OTHER_LABEL`], so a label fed by user-chosen names stays bounded however many names
/// there are. The set lives as long as the process: a name keeps its label once it has one.
#[derive(Debug)]
pub struct LabelCap {
    limit: usize,
    seen: Mutex<BTreeSet<String>>,
}

/// The online runners of one cluster at scrape time, for [`cluster_gauges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterGauge {
    pub cluster: String,
    pub runners: u64,
    pub capacity: u64,
    pub busy: u64,
}

/// Code names as the `code` label of [`names::TASKS_FINISHED`].
static CODE_LABELS: LazyLock<LabelCap> = LazyLock::new(|| LabelCap::new(MAX_NAMED_LABELS));
/// Cluster names as the `cluster` label of the cluster gauges.
static CLUSTER_LABELS: LazyLock<LabelCap> = LazyLock::new(|| LabelCap::new(MAX_NAMED_LABELS));
/// The process's recorder, once installed.
static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// How often the recorder folds recorded histogram samples into its buckets when nobody
/// scrapes, so that memory stays bounded between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

const LEASE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Creates and starts take tens of milliseconds; a pull may take minutes.
const CONTAINER_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Most requests take milliseconds; lease requests and live logs are held for seconds.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide Prometheus recorder on the first call and returns its handle;
/// later calls return the same handle. Metrics recorded before the first call are lost, so
/// a process that exports metrics calls it at start-up.
pub fn install() -> Result<&'static PrometheusHandle, MetricsError> {
    let installed = HANDLE.get_or_init(|| match build_and_install() {
        Ok(handle) => Ok(handle),
        Err(error) => Err(error.to_string()),
    });
    match installed {
        Ok(handle) => Ok(handle),
        Err(message) => Err(MetricsError::Install {
            message: message.clone(),
        }),
    }
}

/// Everything recorded in this process, in the Prometheus text format ([`CONTENT_TYPE`]).
pub fn render() -> Result<String, MetricsError> {
    Ok(install()?.render())
}

/// A task reached a final status. Statuses that are not final are ignored.
pub fn task_finished(status: TaskStatus, code_name: &str) {
    tasks_finished(status, code_name, 1);
}

/// `count` tasks of one code reached the same final status at once (a code's queued tasks
/// cancelled together). Statuses that are not final are ignored, and so is a count of 0.
pub fn tasks_finished(status: TaskStatus, code_name: &str, count: u64) {
    if !status.is_terminal() || count == 0 {
        return;
    }
    counter!(
        names::TASKS_FINISHED,
        "status" => status.as_str(),
        "code" => CODE_LABELS.label(code_name),
    )
    .increment(count);
}

/// One lease call to the store took `took` at `now` and handed out tasks due at `due`.
pub fn lease_call(took: Duration, now: Timestamp, due: impl IntoIterator<Item = Timestamp>) {
    metrics::histogram!(names::LEASE_DURATION).record(took.as_secs_f64());
    let waits = metrics::histogram!(names::QUEUE_WAIT);
    for due_at in due {
        // A task leased the instant it became due (or a clock step back) waited nothing.
        let waited = (now - due_at).to_std().unwrap_or_default();
        waits.record(waited.as_secs_f64());
    }
}

/// One container operation took `took`, successful or not.
pub fn container_operation(operation: ContainerOperation, took: Duration) {
    metrics::histogram!(
        names::CONTAINER_OPERATION_DURATION,
        "operation" => operation.as_str(),
    )
    .record(took.as_secs_f64());
}

/// One request of the engine's API took `took`; `request` is its fixed name (the engine
/// crate's closed list).
pub fn engine_request(request: &'static str, took: Duration) {
    metrics::histogram!(names::ENGINE_REQUEST_DURATION, "request" => request)
        .record(took.as_secs_f64());
}

/// A container operation failed; `kind` is the engine error's fixed name.
pub fn engine_error(operation: ContainerOperation, kind: &'static str) {
    counter!(
        names::ENGINE_ERRORS,
        "operation" => operation.as_str(),
        "kind" => kind,
    )
    .increment(1);
}

/// The runner in this process has `capacity` slots, `busy` of them in use.
pub fn runner_slots(capacity: u32, busy: u32) {
    gauge!(names::RUNNER_CAPACITY).set(f64::from(capacity));
    gauge!(names::RUNNER_BUSY).set(f64::from(busy));
}

/// The runner shipped `bytes` of a task's output.
pub fn log_bytes_shipped(bytes: u64) {
    counter!(names::LOG_BYTES).increment(bytes);
}

/// A remote runner appended `bytes` of a task's output through `/runner/v1`.
pub fn runner_api_log_bytes(bytes: u64) {
    counter!(names::RUNNER_API_LOG_BYTES).increment(bytes);
}

/// An HTTP request to `route` (a route template, or `unmatched`) was answered with `status`
/// after `took`.
pub fn http_request(method: &str, route: &str, status: u16, took: Duration) {
    let method = http_method_label(method);
    counter!(
        names::HTTP_REQUESTS,
        "method" => method,
        "route" => route.to_owned(),
        "status" => status.to_string(),
    )
    .increment(1);
    metrics::histogram!(
        names::HTTP_REQUEST_DURATION,
        "method" => method,
        "route" => route.to_owned(),
    )
    .record(took.as_secs_f64());
}

/// The store's task counts at scrape time: `by_status` for the statuses that are not final,
/// `queue_depth` of due queued tasks per priority.
pub fn store_gauges(by_status: &[(TaskStatus, u64)], queue_depth: &[(u8, u64)]) {
    for (status, count) in by_status {
        gauge!(names::TASKS, "status" => status.as_str()).set(*count as f64);
    }
    for (priority, count) in queue_depth {
        gauge!(names::QUEUE_DEPTH, "priority" => priority.to_string()).set(*count as f64);
    }
}

/// Online runners per cluster at scrape time. Clusters past the label cap are summed into
/// [`OTHER_LABEL`]; a cluster seen before and gone now reads zero rather than its last value.
pub fn cluster_gauges(clusters: &[ClusterGauge]) {
    let mut by_label: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for cluster in clusters {
        let entry = by_label
            .entry(CLUSTER_LABELS.label(&cluster.cluster))
            .or_default();
        entry.0 += cluster.runners;
        entry.1 += cluster.capacity;
        entry.2 += cluster.busy;
    }
    for label in CLUSTER_LABELS.labels_in_use() {
        by_label.entry(label).or_default();
    }
    for (label, (runners, capacity, busy)) in by_label {
        gauge!(names::CLUSTER_RUNNERS, "cluster" => label.clone()).set(runners as f64);
        gauge!(names::CLUSTER_CAPACITY, "cluster" => label.clone()).set(capacity as f64);
        gauge!(names::CLUSTER_BUSY, "cluster" => label).set(busy as f64);
    }
}

/// The bytes the store holds, by kind (read at scrape time and by retention runs).
pub fn stored_bytes(stored: &StoredBytes) {
    for (kind, bytes) in stored.by_kind() {
        gauge!(names::STORED_BYTES, "kind" => kind.as_str()).set(bytes as f64);
    }
}

/// A retention run that counted its ages from `now` is over, the store holding `before` and
/// `after` it.
pub fn retention_run(before: &StoredBytes, after: &StoredBytes, now: Timestamp) {
    for (point, stored) in [("before", before), ("after", after)] {
        for (kind, bytes) in stored.by_kind() {
            gauge!(
                names::RETENTION_RUN_STORED_BYTES,
                "kind" => kind.as_str(),
                "point" => point,
            )
            .set(bytes as f64);
        }
    }
    stored_bytes(after);
    gauge!(names::RETENTION_LAST_RUN).set(now.timestamp_millis() as f64 / 1000.0);
}

/// Retention removed `items` (tasks' logs or payloads, package revisions) of `kind`, `bytes`
/// in all. Counted as each chunk commits, so a run stopped half-way is counted as far as it
/// went.
pub fn retention_removed(kind: StoredKind, items: u64, bytes: u64) {
    counter!(names::RETENTION_REMOVED, "kind" => kind.as_str()).increment(items);
    counter!(names::RETENTION_REMOVED_BYTES, "kind" => kind.as_str()).increment(bytes);
}

fn build_and_install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(names::LEASE_DURATION.into()), LEASE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(names::QUEUE_WAIT.into()), QUEUE_WAIT_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(names::CONTAINER_OPERATION_DURATION.into()),
            CONTAINER_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::ENGINE_REQUEST_DURATION.into()),
            CONTAINER_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::HTTP_REQUEST_DURATION.into()),
            HTTP_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    // A plain thread, so the recorder needs no particular runtime; it lives as long as the
    // process, like the recorder.
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        // Rendering folds samples in too, so metrics stay right; only memory between
        // scrapes is no longer bounded.
        eprintln!("cannot start the metrics upkeep thread: {error}");
    }
    Ok(handle)
}

/// Help texts and units, shown by the exposition as `# HELP`.
fn describe() {
    describe_counter!(
        names::TASKS_FINISHED,
        Unit::Count,
        "Tasks that reached a final status through this process, by status and code name."
    );
    describe_gauge!(
        names::TASKS,
        Unit::Count,
        "Tasks queued, preparing and running in the store, read at scrape time."
    );
    describe_gauge!(
        names::QUEUE_DEPTH,
        Unit::Count,
        "Queued tasks due now, per priority, read at scrape time."
    );
    describe_histogram!(
        names::LEASE_DURATION,
        Unit::Seconds,
        "How long one lease call to the store takes."
    );
    describe_histogram!(
        names::QUEUE_WAIT,
        Unit::Seconds,
        "From a task's due time to its lease."
    );
    describe_histogram!(
        names::CONTAINER_OPERATION_DURATION,
        Unit::Seconds,
        "How long the container engine takes for one operation of the runner."
    );
    describe_histogram!(
        names::ENGINE_REQUEST_DURATION,
        Unit::Seconds,
        "How long the container engine takes for one request of its API about a task's container."
    );
    describe_counter!(
        names::ENGINE_ERRORS,
        Unit::Count,
        "Failed container engine calls by operation and kind of failure."
    );
    describe_gauge!(
        names::RUNNER_CAPACITY,
        Unit::Count,
        "The most tasks the runner in this process runs at once."
    );
    describe_gauge!(
        names::RUNNER_BUSY,
        Unit::Count,
        "Slots of the runner in this process that hold a task."
    );
    describe_counter!(
        names::LOG_BYTES,
        Unit::Bytes,
        "Bytes of task output the runner in this process shipped."
    );
    describe_counter!(
        names::RUNNER_API_LOG_BYTES,
        Unit::Bytes,
        "Bytes of task output remote runners appended through the runner protocol."
    );
    describe_gauge!(
        names::CLUSTER_RUNNERS,
        Unit::Count,
        "Runners online per cluster, read at scrape time."
    );
    describe_gauge!(
        names::CLUSTER_CAPACITY,
        Unit::Count,
        "Summed capacity of a cluster's online runners, read at scrape time."
    );
    describe_gauge!(
        names::CLUSTER_BUSY,
        Unit::Count,
        "Live leases held by a cluster's online runners, read at scrape time."
    );
    describe_counter!(
        names::HTTP_REQUESTS,
        Unit::Count,
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        names::HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "How long answering an HTTP request took, by method and route template."
    );
    describe_gauge!(
        names::STORED_BYTES,
        Unit::Bytes,
        "Bytes of task logs, task payloads and code packages the store holds."
    );
    describe_gauge!(
        names::RETENTION_RUN_STORED_BYTES,
        Unit::Bytes,
        "Bytes stored by kind right before and after the last retention run of this process."
    );
    describe_gauge!(
        names::RETENTION_LAST_RUN,
        Unit::Seconds,
        "When the last retention run of this process started, seconds since the epoch."
    );
    describe_counter!(
        names::RETENTION_REMOVED,
        Unit::Count,
        "Task logs, task payloads and package revisions retention removed."
    );
    describe_counter!(
        names::RETENTION_REMOVED_BYTES,
        Unit::Bytes,
        "Bytes retention removed, by kind."
    );
}

/// Methods outside the standard set (HTTP allows any token) share one label.
fn http_method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

// === impl ContainerOperation ===

impl ContainerOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerOperation::EnsureImage => "ensure_image",
            ContainerOperation::Create => "create",
            ContainerOperation::Start => "start",
            ContainerOperation::Kill => "kill",
            ContainerOperation::Remove => "remove",
        }
    }
}

// === impl StoredKind ===

impl StoredKind {
    pub const ALL: [StoredKind; 3] = [StoredKind::Logs, StoredKind::Payloads, StoredKind::Packages];

    pub fn as_str(self) -> &'static str {
        match self {
            StoredKind::Logs => "logs",
            StoredKind::Payloads => "payloads",
            StoredKind::Packages => "packages",
        }
    }
}

// === impl StoredBytes ===

impl StoredBytes {
    pub fn get(&self, kind: StoredKind) -> u64 {
        match kind {
            StoredKind::Logs => self.logs,
            StoredKind::Payloads => self.payloads,
            StoredKind::Packages => self.packages,
        }
    }

    /// Every kind with its bytes.
    pub fn by_kind(&self) -> [(StoredKind, u64); 3] {
        StoredKind::ALL.map(|kind| (kind, self.get(kind)))
    }
}

// === impl LabelCap ===

impl LabelCap {
    pub fn new(limit: usize) -> Self {
        LabelCap {
            limit,
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    /// `value` itself when it has a label already or there is room for one more, else
    /// [`OTHER_LABEL`].
    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.limit && value != OTHER_LABEL {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        OTHER_LABEL.to_owned()
    }

    /// Every label handed out so far; [`OTHER_LABEL`] is not among them.
    pub fn labels_in_use(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_cap_names_the_first_values_and_folds_the_rest() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.label("a"), "a");
        assert_eq!(cap.label("b"), "b");
        assert_eq!(cap.label("c"), OTHER_LABEL);
        // A value that got a label keeps it, however many came after it.
        assert_eq!(cap.label("a"), "a");
        assert_eq!(cap.label("b"), "b");
        assert_eq!(cap.label("d"), OTHER_LABEL);
        assert_eq!(cap.labels_in_use(), vec!["a".to_owned(), "b".to_owned()]);
    }

    #[test]
    fn a_value_named_like_the_fold_never_takes_a_place() {
        let cap = LabelCap::new(1);
        assert_eq!(cap.label(OTHER_LABEL), OTHER_LABEL);
        assert_eq!(cap.label("a"), "a");
    }

    #[test]
    fn unknown_http_methods_share_one_label() {
        assert_eq!(http_method_label("GET"), "GET");
        assert_eq!(http_method_label("BREW"), "other");
    }

    #[test]
    fn the_exposition_parses_with_buckets_help_and_capped_codes() {
        install().unwrap();
        // The second install hands back the same recorder.
        install().unwrap();
        task_finished(TaskStatus::Complete, "hello");
        task_finished(TaskStatus::Complete, "hello");
        task_finished(TaskStatus::Running, "hello");
        for code in 0..MAX_NAMED_LABELS + 5 {
            task_finished(TaskStatus::Error, &format!("code-{code}"));
        }
        let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        lease_call(
            Duration::from_millis(3),
            now,
            [now - chrono::Duration::seconds(2)],
        );
        container_operation(ContainerOperation::Create, Duration::from_millis(40));
        runner_slots(4, 1);
        let before = StoredBytes {
            logs: 100,
            payloads: 10,
            packages: 1000,
        };
        let after = StoredBytes { logs: 40, ..before };
        retention_removed(StoredKind::Logs, 3, 60);
        retention_run(&before, &after, now);

        let text = render().unwrap();
        assert!(
            text.contains("# HELP stevedore_tasks_finished_total Tasks that reached"),
            "{text}"
        );
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let value_of = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|sample| {
                    sample.metric == name
                        && labels
                            .iter()
                            .all(|(key, value)| sample.labels.get(key) == Some(*value))
                })
                .map(|sample| sample.value.clone())
        };
        assert_eq!(
            value_of(
                names::TASKS_FINISHED,
                &[("status", "complete"), ("code", "hello")]
            ),
            Some(prometheus_parse::Value::Counter(2.0))
        );
        assert_eq!(
            value_of(
                names::TASKS_FINISHED,
                &[("status", "running"), ("code", "hello")]
            ),
            None
        );
        // "hello" took one of the hundred places: 99 error codes are named, 6 fold.
        assert_eq!(
            value_of(
                names::TASKS_FINISHED,
                &[("status", "error"), ("code", OTHER_LABEL)]
            ),
            Some(prometheus_parse::Value::Counter(6.0))
        );
        let codes: BTreeSet<&str> = scrape
            .samples
            .iter()
            .filter(|sample| sample.metric == names::TASKS_FINISHED)
            .filter_map(|sample| sample.labels.get("code"))
            .collect();
        assert_eq!(codes.len(), MAX_NAMED_LABELS + 1);
        match value_of(names::QUEUE_WAIT, &[]) {
            Some(prometheus_parse::Value::Histogram(buckets)) => {
                let within_2_5 = buckets
                    .iter()
                    .find(|bucket| bucket.less_than == 2.5)
                    .unwrap();
                assert_eq!(within_2_5.count, 1.0);
                let within_1 = buckets
                    .iter()
                    .find(|bucket| bucket.less_than == 1.0)
                    .unwrap();
                assert_eq!(within_1.count, 0.0);
            }
            other => panic!("queue wait is not a histogram: {other:?}"),
        }
        assert_eq!(
            value_of(names::RUNNER_CAPACITY, &[]),
            Some(prometheus_parse::Value::Gauge(4.0))
        );
        // Retention: what it removed, and the sizes around its last run.
        assert_eq!(
            value_of(names::RETENTION_REMOVED_BYTES, &[("kind", "logs")]),
            Some(prometheus_parse::Value::Counter(60.0))
        );
        assert_eq!(
            value_of(
                names::RETENTION_RUN_STORED_BYTES,
                &[("kind", "logs"), ("point", "before")]
            ),
            Some(prometheus_parse::Value::Gauge(100.0))
        );
        assert_eq!(
            value_of(names::STORED_BYTES, &[("kind", "logs")]),
            Some(prometheus_parse::Value::Gauge(40.0))
        );
        assert_eq!(
            value_of(names::STORED_BYTES, &[("kind", "packages")]),
            Some(prometheus_parse::Value::Gauge(1000.0))
        );
    }
}
