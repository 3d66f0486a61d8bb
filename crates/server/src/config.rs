//! The server's settings, with the defaults a fresh installation runs with.

use std::path::PathBuf;
use std::time::Duration;

use stevedore_model::{CodeImages, StackTable, Timestamp, limits};

pub use crate::metrics::MetricsConfig;
use crate::package::PackageLimits;

/// Everything the HTTP layer needs to know beyond the store.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The largest task payload, bytes.
    pub max_payload_bytes: usize,
    pub package: PackageLimits,
    /// Where uploaded packages are spooled while they arrive and are checked (`upload-*`
    /// files, removed once the upload is done).
    pub upload_dir: PathBuf,
    /// The shortest `run_every` a schedule may ask for.
    pub min_run_every_secs: u32,
    /// The stacks runtime codes are resolved against when they are uploaded.
    pub stacks: StackTable,
    pub log_stream: LogStreamConfig,
    pub runner_api: RunnerApiConfig,
    pub metrics: MetricsConfig,
    /// Where `code push --dockerfile` puts built images: a code may name another project's
    /// only to be refused (400).
    pub code_images: CodeImages,
    /// The networks a code may name besides `bridge` (the isolated task network) and `none`:
    /// the operator's `task_network.named_networks`. Any other is a 400 at upload.
    pub named_networks: Vec<String>,
}

/// The runner protocol (`/runner/v1/...`).
#[derive(Debug, Clone)]
pub struct RunnerApiConfig {
    /// While a lease request waits for work, how often it looks again in case tasks were
    /// queued through another server (or became due). Tasks queued through this server wake
    /// it at once.
    pub poll_interval: Duration,
    /// The longest a lease request is held (a runner's `wait_ms` is capped to it).
    pub max_wait: Duration,
    /// A runner counts as online in cluster statistics this long after it last asked for
    /// work (or while it holds a live lease).
    pub online_window: Duration,
    /// The largest log chunk one append may carry.
    pub max_log_chunk_bytes: usize,
}

impl Default for RunnerApiConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
            online_window: Duration::from_secs(60),
            max_log_chunk_bytes: 8 << 20,
        }
    }
}

impl RunnerApiConfig {
    /// The earliest last sighting at `now` of a runner that still counts as online.
    pub fn online_since(&self, now: Timestamp) -> Timestamp {
        let window = chrono::Duration::from_std(self.online_window)
            .unwrap_or_else(|_| chrono::Duration::minutes(1));
        now - window
    }
}

/// Live log streams (`log/stream`, `log?follow=true`). Each one polls the store, so any server
/// sharing the database can serve it.
#[derive(Debug, Clone)]
pub struct LogStreamConfig {
    /// How often a stream asks the store for new log bytes and the task's status.
    pub poll_interval: Duration,
    /// How often an event stream with nothing to say sends a comment, so that proxies and
    /// clients keep it open.
    pub keep_alive: Duration,
    /// The longest one stream lives; the client resumes from its last offset after it.
    pub max_lifetime: Duration,
}

impl Default for LogStreamConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(200),
            keep_alive: Duration::from_secs(15),
            max_lifetime: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: limits::DEFAULT_MAX_PAYLOAD_BYTES,
            package: PackageLimits {
                max_bytes: 64 * 1024 * 1024,
                max_unpacked_bytes: 512 * 1024 * 1024,
                max_entries: 20_000,
            },
            upload_dir: std::env::temp_dir(),
            min_run_every_secs: limits::DEFAULT_MIN_RUN_EVERY_SECS,
            stacks: StackTable::default(),
            log_stream: LogStreamConfig::default(),
            runner_api: RunnerApiConfig::default(),
            metrics: MetricsConfig::default(),
            code_images: CodeImages::local(),
            named_networks: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// The largest part of a code upload's form other than the package: the `data` part's
    /// JSON (limited so also when sent alone) and any part the server ignores.
    pub const MAX_FORM_PART_BYTES: usize = 1 << 20;

    /// Room in a code upload for what surrounds the package: the `data` part's JSON and the
    /// multipart framing.
    pub const UPLOAD_FORM_OVERHEAD_BYTES: usize = 1 << 20;

    /// The request body limit of a code upload, the number its 413 names: the package limit
    /// and the form around it. The server stops reading a body there; each part has a limit
    /// of its own too, the package's `package.max_bytes` as sent (the official Python client
    /// sends the text of the zip's bytes repr, up to four times the zip's size, so through that
    /// client a package passes only while its repr fits).
    pub fn max_upload_bytes(&self) -> usize {
        self.package
            .max_bytes
            .saturating_add(Self::UPLOAD_FORM_OVERHEAD_BYTES)
    }

    /// The request body limit of `POST tasks`: a full batch of maximal payloads and room for
    /// the JSON around them. Larger bodies are refused before they are read.
    pub fn max_tasks_body_bytes(&self) -> usize {
        (self.max_payload_bytes + 1024)
            .saturating_mul(limits::MAX_TASKS_PER_REQUEST.min(256))
            .max(1 << 20)
    }
}
