//! Usage reports: a project's finished tasks over a window, in buckets, by code and by stack,
//! with queue-wait percentiles and the status mix.
//!
//! One entry point, [`report`], serves both `GET /2/projects/{p}/usage` and the dashboard's
//! charts, and one parser, [`UsageWindow::parse`], reads the same query strings for both. The
//! store sums in SQL; this module only folds those sums into series and computes percentiles
//! (which SQLite cannot), in [`build_report`], a pure function.

use std::collections::BTreeMap;

use chrono::{Duration, TimeZone, Utc};
use serde::Deserialize;
use stevedore_api_types::v2;
use stevedore_model::{CodeKind, Timestamp};
use stevedore_store::{CodeStats, QueueWait, StatsWindow, UsageQuery, UsageRow};

use crate::AppState;
use crate::error::ApiError;
use crate::wire;

/// The most buckets one report may have: more would not fit a chart anyway.
pub const MAX_BUCKETS: i64 = 2000;
/// The most queue-wait samples one report reads: the latest starts of the window.
pub const QUEUE_WAIT_SAMPLES: u32 = 10_000;
/// The window when `from` and `to` are both left out.
pub const DEFAULT_WINDOW: Duration = Duration::hours(24);
/// What a default bucket aims at: the finest of a minute, an hour and a day that splits the
/// window into at most this many buckets.
const DEFAULT_BUCKETS: i64 = 200;

const MINUTE: u32 = 60;
const HOUR: u32 = 3600;
const DAY: u32 = 86_400;

/// The query string of a usage report, as the API and the dashboard receive it.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct UsageParams {
    /// Start of the window: RFC 3339 or seconds since the epoch. Default: 24 hours before `to`.
    pub from: Option<String>,
    /// End of the window (exclusive): RFC 3339 or seconds since the epoch. Default: now.
    pub to: Option<String>,
    /// `minute`, `hour`, `day` or a number of seconds. Default: the finest of those three
    /// that gives at most 200 buckets.
    pub bucket: Option<String>,
}

/// A validated window: `from < to`, and at most [`MAX_BUCKETS`] buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWindow {
    pub from: Timestamp,
    pub to: Timestamp,
    pub bucket_secs: u32,
}

impl UsageWindow {
    /// Reads `params`, filling what they leave out relative to `now`. Bad input is a
    /// `BadRequest` that names the parameter.
    pub fn parse(params: &UsageParams, now: Timestamp) -> Result<UsageWindow, ApiError> {
        let to = params
            .to
            .as_deref()
            .map(|text| query_time("to", text))
            .transpose()?;
        let from = params
            .from
            .as_deref()
            .map(|text| query_time("from", text))
            .transpose()?;
        let (from, to) = match (from, to) {
            (Some(from), Some(to)) => (from, to),
            (Some(from), None) => (from, now),
            (None, Some(to)) => (to - DEFAULT_WINDOW, to),
            (None, None) => (now - DEFAULT_WINDOW, now),
        };
        if to <= from {
            return Err(ApiError::BadRequest(format!(
                "to ({}) must be after from ({})",
                wire::format_time(to),
                wire::format_time(from)
            )));
        }
        let bucket_secs = match params.bucket.as_deref().map(str::trim) {
            None | Some("") => default_bucket(from, to),
            Some(text) => parse_bucket(text)?,
        };
        let window = UsageWindow {
            from,
            to,
            bucket_secs,
        };
        let count = window.bucket_count();
        if count > MAX_BUCKETS {
            return Err(ApiError::BadRequest(format!(
                "bucket: {bucket_secs} s buckets split this window into {count} buckets, more \
                 than {MAX_BUCKETS}; choose a larger bucket or a shorter window"
            )));
        }
        Ok(window)
    }

    /// The store's query for this window.
    pub fn query(&self) -> UsageQuery {
        UsageQuery {
            from: self.from,
            to: self.to,
            bucket_secs: self.bucket_secs,
        }
    }

    /// The start of the bucket holding `time`: a multiple of the bucket width since the epoch.
    fn bucket_of(&self, time: Timestamp) -> i64 {
        let width = self.width_micros();
        time.timestamp_micros().div_euclid(width) * width
    }

    /// The starts of every bucket that overlaps `[from, to)`, in microseconds since the epoch.
    fn bucket_starts(&self) -> impl Iterator<Item = i64> + use<> {
        let width = self.width_micros();
        let first = self.bucket_of(self.from);
        let last = self.bucket_of(self.to - Duration::microseconds(1));
        (0..=(last - first) / width).map(move |index| first + index * width)
    }

    fn bucket_count(&self) -> i64 {
        let width = self.width_micros();
        (self.bucket_of(self.to - Duration::microseconds(1)) - self.bucket_of(self.from)) / width
            + 1
    }

    fn width_micros(&self) -> i64 {
        i64::from(self.bucket_secs.max(1)) * 1_000_000
    }
}

/// The usage report of `project_id` for the window `params` describe. The caller has checked
/// that the project may be read.
pub async fn report(
    state: &AppState,
    project_id: &str,
    params: &UsageParams,
) -> Result<v2::UsageReport, ApiError> {
    let window = UsageWindow::parse(params, state.clock.now())?;
    let rows = state.store.usage(project_id, &window.query()).await?;
    let waits = state
        .store
        .queue_waits(project_id, window.from, window.to, QUEUE_WAIT_SAMPLES)
        .await?;
    let status_mix = state
        .store
        .project_counts(
            project_id,
            StatsWindow {
                updated_from: Some(window.from),
                updated_to: Some(window.to),
            },
        )
        .await?;
    Ok(build_report(
        &window,
        &rows,
        &waits,
        QUEUE_WAIT_SAMPLES,
        status_mix,
    ))
}

/// Folds the store's sums into the report. `waits` are the store's samples, latest first, of
/// which it returns at most `wait_limit`.
pub fn build_report(
    window: &UsageWindow,
    rows: &[UsageRow],
    waits: &[QueueWait],
    wait_limit: u32,
    status_mix: CodeStats,
) -> v2::UsageReport {
    let mut buckets: BTreeMap<i64, Tally> = window
        .bucket_starts()
        .map(|start| (start, Tally::default()))
        .collect();
    let mut totals = Tally::default();
    for row in rows {
        let start = row.bucket_start.timestamp_micros();
        if let Some(bucket) = buckets.get_mut(&start) {
            bucket.add(row);
        }
        totals.add(row);
    }
    let mut bucket_waits: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    for wait in waits {
        bucket_waits
            .entry(window.bucket_of(wait.started_at))
            .or_default()
            .push(wait.wait_ms);
    }
    let mut all_waits: Vec<u64> = waits.iter().map(|wait| wait.wait_ms).collect();
    let limited = u32::try_from(waits.len()).is_ok_and(|count| count >= wait_limit);
    v2::UsageReport {
        from: wire::format_time(window.from),
        to: wire::format_time(window.to),
        bucket_secs: window.bucket_secs,
        buckets: buckets
            .into_iter()
            .map(|(start, tally)| {
                let mut waits = bucket_waits.remove(&start).unwrap_or_default();
                v2::UsageBucket {
                    start: wire::format_time(micros_time(start)),
                    totals: tally.totals.counts(),
                    codes: tally.codes(),
                    stacks: tally.stacks(),
                    queue_wait: wait_stats(&mut waits),
                }
            })
            .collect(),
        totals: totals.totals.counts(),
        codes: totals.codes(),
        stacks: totals.stacks(),
        queue_wait: v2::QueueWaitSummary {
            stats: wait_stats(&mut all_waits),
            sampled_since: waits
                .iter()
                .map(|wait| wait.started_at)
                .min()
                .filter(|_| limited)
                .map(wire::format_time),
        },
        status_mix: wire::code_stats(status_mix),
    }
}

/// The stack a revision runs on: the stack it was resolved to (its runtime for revisions
/// stored before stacks were resolved), or `image` for an image code, whose image is its own
/// and would make every code a stack of one.
pub fn stack_of(kind: &CodeKind) -> &str {
    match kind {
        CodeKind::Runtime { runtime, stack, .. } => stack.as_deref().unwrap_or(runtime),
        CodeKind::Image { .. } => "image",
    }
}

/// The nearest-rank percentile of sorted samples: the smallest sample with at least
/// `percent` % of the samples at or below it. `None` without samples.
pub fn percentile(sorted: &[u64], percent: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let count = sorted.len();
    let rank = (count * percent.min(100) as usize).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

// === helpers ===

/// Sums of finished tasks, before they become wire counts.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    complete: u64,
    failures: u64,
    cancelled: u64,
    compute_ms: u64,
}

impl Sums {
    fn add(&mut self, row: &UsageRow) {
        self.complete += row.complete;
        self.failures += row.error + row.timeout;
        self.cancelled += row.cancelled;
        self.compute_ms += row.compute_ms;
    }

    fn counts(&self) -> v2::UsageCounts {
        v2::UsageCounts {
            tasks: self.complete + self.failures + self.cancelled,
            complete: self.complete,
            failures: self.failures,
            cancelled: self.cancelled,
            // Millisecond sums stay exact in an f64 far beyond any real total.
            compute_seconds: self.compute_ms as f64 / 1000.0,
        }
    }
}

/// Sums of a bucket or of the whole window: in all, per code (by name, then id) and per
/// stack (by name).
#[derive(Debug, Default)]
struct Tally {
    totals: Sums,
    codes: BTreeMap<(String, String), Sums>,
    stacks: BTreeMap<String, Sums>,
}

impl Tally {
    fn add(&mut self, row: &UsageRow) {
        self.totals.add(row);
        self.codes
            .entry((row.code_name.clone(), row.code_id.clone()))
            .or_default()
            .add(row);
        self.stacks
            .entry(stack_of(&row.kind).to_owned())
            .or_default()
            .add(row);
    }

    fn codes(&self) -> Vec<v2::UsageByCode> {
        self.codes
            .iter()
            .map(|((code_name, code_id), sums)| v2::UsageByCode {
                code_id: code_id.clone(),
                code_name: code_name.clone(),
                counts: sums.counts(),
            })
            .collect()
    }

    fn stacks(&self) -> Vec<v2::UsageByStack> {
        self.stacks
            .iter()
            .map(|(stack, sums)| v2::UsageByStack {
                stack: stack.clone(),
                counts: sums.counts(),
            })
            .collect()
    }
}

fn wait_stats(samples: &mut [u64]) -> v2::QueueWaitStats {
    samples.sort_unstable();
    v2::QueueWaitStats {
        samples: samples.len() as u64,
        p50_ms: percentile(samples, 50),
        p99_ms: percentile(samples, 99),
    }
}

fn micros_time(micros: i64) -> Timestamp {
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
}

/// A time in a query string: whole seconds since the epoch, or RFC 3339.
fn query_time(field: &str, text: &str) -> Result<Timestamp, ApiError> {
    let text = text.trim();
    let value = match text.parse::<i64>() {
        Ok(seconds) => serde_json::Value::from(seconds),
        Err(_) => serde_json::Value::from(text),
    };
    Ok(wire::parse_time(field, &value)?)
}

fn parse_bucket(text: &str) -> Result<u32, ApiError> {
    match text {
        "minute" => Ok(MINUTE),
        "hour" => Ok(HOUR),
        "day" => Ok(DAY),
        other => other
            .parse::<u32>()
            .ok()
            .filter(|seconds| *seconds > 0)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "bucket: {other:?} is not minute, hour, day or a number of seconds above 0"
                ))
            }),
    }
}

fn default_bucket(from: Timestamp, to: Timestamp) -> u32 {
    [MINUTE, HOUR]
        .into_iter()
        .find(|width| {
            let window = UsageWindow {
                from,
                to,
                bucket_secs: *width,
            };
            window.bucket_count() <= DEFAULT_BUCKETS
        })
        .unwrap_or(DAY)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn at(text: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn params(from: Option<&str>, to: Option<&str>, bucket: Option<&str>) -> UsageParams {
        UsageParams {
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
            bucket: bucket.map(str::to_owned),
        }
    }

    fn bad_request(result: Result<UsageWindow, ApiError>) -> String {
        match result {
            Err(ApiError::BadRequest(message)) => message,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 50), Some(7));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 4], 50), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 99), Some(4));
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 50), Some(50));
        assert_eq!(percentile(&hundred, 99), Some(99));
        assert_eq!(percentile(&hundred, 100), Some(100));
        assert_eq!(percentile(&hundred, 0), Some(1));
    }

    #[test]
    fn the_default_window_is_the_last_day_in_hours() {
        let now = at("2030-01-02T12:34:56Z");
        let window = UsageWindow::parse(&UsageParams::default(), now).unwrap();
        assert_eq!(
            window,
            UsageWindow {
                from: at("2030-01-01T12:34:56Z"),
                to: now,
                bucket_secs: HOUR,
            }
        );
        // Twenty-five buckets: the first and the last are cut by the window.
        assert_eq!(window.bucket_count(), 25);
        let only_to = UsageWindow::parse(&params(None, Some("1893456000"), None), now).unwrap();
        assert_eq!(only_to.to, at("2030-01-01T00:00:00Z"));
        assert_eq!(only_to.from, at("2029-12-31T00:00:00Z"));
        let only_from =
            UsageWindow::parse(&params(Some("2030-01-02T12:00:00Z"), None, None), now).unwrap();
        assert_eq!((only_from.to, only_from.bucket_secs), (now, MINUTE));
    }

    #[test]
    fn times_are_rfc3339_or_epoch_seconds_and_buckets_named_or_seconds() {
        let now = at("2030-06-01T00:00:00Z");
        let window = UsageWindow::parse(
            &params(
                Some("1893456000"),
                Some("2030-01-08T00:00:00+00:00"),
                Some("day"),
            ),
            now,
        )
        .unwrap();
        assert_eq!(
            (window.from, window.to, window.bucket_secs),
            (at("2030-01-01T00:00:00Z"), at("2030-01-08T00:00:00Z"), DAY)
        );
        for (text, secs) in [
            ("minute", MINUTE),
            ("hour", HOUR),
            ("day", DAY),
            ("900", 900),
        ] {
            let window = UsageWindow::parse(
                &params(Some("1893456000"), Some("1893459600"), Some(text)),
                now,
            )
            .unwrap();
            assert_eq!(window.bucket_secs, secs, "{text}");
        }
        // A month by default comes in days; an hour in minutes.
        let month = params(
            Some("2030-01-01T00:00:00Z"),
            Some("2030-02-01T00:00:00Z"),
            None,
        );
        assert_eq!(UsageWindow::parse(&month, now).unwrap().bucket_secs, DAY);
    }

    #[test]
    fn bad_windows_are_refused_with_a_reason() {
        let now = at("2030-06-01T00:00:00Z");
        let message = bad_request(UsageWindow::parse(
            &params(Some("1893459600"), Some("1893456000"), None),
            now,
        ));
        assert!(message.contains("must be after from"), "{message}");
        let message = bad_request(UsageWindow::parse(
            &params(Some("1893456000"), Some("1893456000"), None),
            now,
        ));
        assert!(message.contains("must be after from"), "{message}");
        let message = bad_request(UsageWindow::parse(
            &params(Some("yesterday"), None, None),
            now,
        ));
        assert!(message.starts_with("from"), "{message}");
        for bucket in ["week", "0", "-5", "1.5"] {
            let message = bad_request(UsageWindow::parse(&params(None, None, Some(bucket)), now));
            assert!(message.starts_with("bucket"), "{bucket}: {message}");
        }
        // A day in seconds: 86 400 buckets.
        let message = bad_request(UsageWindow::parse(&params(None, None, Some("1")), now));
        assert!(message.contains("86400 buckets"), "{message}");
        // 2000 minutes fit exactly; one more does not.
        let fits = params(Some("1893456000"), Some("1893576000"), Some("minute"));
        assert_eq!(UsageWindow::parse(&fits, now).unwrap().bucket_count(), 2000);
        let over = params(Some("1893456000"), Some("1893576001"), Some("minute"));
        assert!(bad_request(UsageWindow::parse(&over, now)).contains("2001 buckets"));
    }

    #[test]
    fn buckets_align_to_the_epoch_not_to_the_window() {
        let window = UsageWindow {
            from: at("2030-01-01T00:30:30Z"),
            to: at("2030-01-01T02:10:00Z"),
            bucket_secs: HOUR,
        };
        let starts: Vec<Timestamp> = window.bucket_starts().map(micros_time).collect();
        assert_eq!(
            starts,
            [
                at("2030-01-01T00:00:00Z"),
                at("2030-01-01T01:00:00Z"),
                at("2030-01-01T02:00:00Z")
            ]
        );
        // A window ending on a bucket boundary does not open the next bucket.
        let exact = UsageWindow {
            to: at("2030-01-01T02:00:00Z"),
            ..window
        };
        assert_eq!(exact.bucket_count(), 2);
    }

    fn row(
        bucket: &str,
        code: &str,
        kind: CodeKind,
        counts: [u64; 4],
        compute_ms: u64,
    ) -> UsageRow {
        UsageRow {
            bucket_start: at(bucket),
            code_id: format!("id-{code}"),
            code_name: code.to_owned(),
            code_rev: 1,
            kind,
            complete: counts[0],
            error: counts[1],
            timeout: counts[2],
            cancelled: counts[3],
            compute_ms,
        }
    }

    fn image() -> CodeKind {
        CodeKind::Image {
            image: "busybox".to_owned(),
            command: None,
        }
    }

    fn python() -> CodeKind {
        CodeKind::Runtime {
            runtime: "python".to_owned(),
            file_name: "main.py".to_owned(),
            stack: None,
        }
    }

    fn wait(started: &str, wait_ms: u64) -> QueueWait {
        QueueWait {
            started_at: at(started),
            wait_ms,
        }
    }

    #[test]
    fn the_report_folds_rows_into_buckets_codes_and_stacks() {
        let window = UsageWindow {
            from: at("2030-01-01T00:00:00Z"),
            to: at("2030-01-01T00:03:00Z"),
            bucket_secs: MINUTE,
        };
        let rows = [
            row("2030-01-01T00:00:00Z", "a", image(), [2, 1, 0, 0], 1500),
            row("2030-01-01T00:00:00Z", "b", python(), [1, 0, 1, 1], 250),
            row("2030-01-01T00:02:00Z", "c", image(), [1, 0, 0, 0], 1000),
        ];
        let waits = [
            wait("2030-01-01T00:02:10Z", 400),
            wait("2030-01-01T00:00:30Z", 100),
            wait("2030-01-01T00:00:20Z", 300),
        ];
        let mut mix = CodeStats::default();
        mix.by_status
            .push((stevedore_model::TaskStatus::Complete, 4));
        let report = build_report(&window, &rows, &waits, 10, mix);

        assert_eq!(report.bucket_secs, 60);
        let starts: Vec<&str> = report.buckets.iter().map(|b| b.start.as_str()).collect();
        assert_eq!(
            starts,
            [
                "2030-01-01T00:00:00.000Z",
                "2030-01-01T00:01:00.000Z",
                "2030-01-01T00:02:00.000Z"
            ],
            "the empty minute is there too"
        );
        let first = &report.buckets[0];
        assert_eq!(
            first.totals,
            v2::UsageCounts {
                tasks: 6,
                complete: 3,
                failures: 2,
                cancelled: 1,
                compute_seconds: 1.75,
            }
        );
        let codes: Vec<(&str, u64)> = first
            .codes
            .iter()
            .map(|code| (code.code_name.as_str(), code.counts.tasks))
            .collect();
        assert_eq!(codes, [("a", 3), ("b", 3)]);
        assert_eq!(
            first.queue_wait,
            v2::QueueWaitStats {
                samples: 2,
                p50_ms: Some(100),
                p99_ms: Some(300),
            }
        );
        let empty = &report.buckets[1];
        assert_eq!(empty.totals, v2::UsageCounts::default());
        assert!(empty.codes.is_empty() && empty.stacks.is_empty());
        assert_eq!(empty.queue_wait, v2::QueueWaitStats::default());

        let stacks: Vec<(&str, u64, f64)> = report
            .stacks
            .iter()
            .map(|stack| {
                (
                    stack.stack.as_str(),
                    stack.counts.tasks,
                    stack.counts.compute_seconds,
                )
            })
            .collect();
        assert_eq!(stacks, [("image", 4, 2.5), ("python", 3, 0.25)]);
        assert_eq!(report.totals.tasks, 7);
        assert_eq!(report.codes.len(), 3);
        assert_eq!(
            report.queue_wait,
            v2::QueueWaitSummary {
                stats: v2::QueueWaitStats {
                    samples: 3,
                    p50_ms: Some(300),
                    p99_ms: Some(400),
                },
                sampled_since: None,
            }
        );
        assert_eq!(report.status_mix.complete, 4);

        // At the sample limit, the report says since when its samples reach.
        let limited = build_report(&window, &rows, &waits, 3, CodeStats::default());
        assert_eq!(
            limited.queue_wait.sampled_since.as_deref(),
            Some("2030-01-01T00:00:20.000Z")
        );
    }

    #[test]
    fn image_codes_share_one_stack() {
        assert_eq!(stack_of(&image()), "image");
        assert_eq!(stack_of(&python()), "python");
    }
}
