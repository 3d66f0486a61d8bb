//! `stevedore gc`: one retention pass now, on the store of this machine's settings (the data
//! directory's SQLite, or the `database` PostgreSQL), beside a running server or without one.
//! The same pass as the leader's (`server::retention::run_pass`), with the ages and the
//! revisions kept taken from `[retention]` unless a flag says otherwise.

use clap::Args;
use stevedore_metrics::StoredBytes;
use stevedore_model::{Clock, SystemClock};
use stevedore_server::retention::{self, Pace, RetentionPolicy, RetentionReport};
use stevedore_store::Store;
use tokio_util::sync::CancellationToken;

use crate::output::{self, Format};
use crate::settings::Settings;

#[derive(Debug, Clone, Default, Args)]
pub struct GcArgs {
    /// Remove the logs of tasks that ended more than DAYS days ago (default:
    /// `retention.log_days`); 0 removes every finished task's log.
    #[arg(long, value_name = "DAYS")]
    pub log_days: Option<u32>,
    /// Remove the payloads of tasks that ended more than DAYS days ago (default:
    /// `retention.payload_days`); 0 removes every finished task's payload.
    #[arg(long, value_name = "DAYS")]
    pub payload_days: Option<u32>,
    /// Keep the packages of each code's latest N revisions (default:
    /// `retention.keep_revisions`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_revisions: Option<u32>,
}

/// Runs the pass and prints the sizes before and after it and what it removed. Ctrl-C stops
/// it between two chunks; what was removed until then stays removed and is reported.
pub async fn run(
    store: &dyn Store,
    settings: &Settings,
    args: GcArgs,
    format: Format,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let policy = args.policy(settings.retention.policy()?);
    let report =
        retention::run_pass(store, &policy, &Pace::default(), SystemClock.now(), &stop).await?;
    match format {
        Format::Json => output::print_json(&json(&report)),
        Format::Human => output::print(&human(&report)),
    }
}

impl GcArgs {
    /// The settings' policy with the flags' overrides.
    fn policy(&self, configured: RetentionPolicy) -> RetentionPolicy {
        let days = |days: u32| chrono::TimeDelta::days(i64::from(days));
        RetentionPolicy {
            log_age: self.log_days.map_or(configured.log_age, days),
            payload_age: self.payload_days.map_or(configured.payload_age, days),
            keep_revisions: self.keep_revisions.unwrap_or(configured.keep_revisions),
        }
    }
}

fn human(report: &RetentionReport) -> String {
    let mut table = output::Table::new(&["KIND", "BEFORE", "AFTER", "REMOVED"]);
    let removed = [
        format!(
            "{} task logs, {}",
            report.logs.tasks,
            output::bytes(report.logs.bytes)
        ),
        format!(
            "{} task payloads, {}",
            report.payloads.tasks,
            output::bytes(report.payloads.bytes)
        ),
        format!(
            "{} revisions' packages, {}",
            report.packages.revisions,
            output::bytes(report.packages.bytes)
        ),
    ];
    for ((kind, before), removed) in report.before.by_kind().into_iter().zip(removed) {
        table.row(vec![
            kind.as_str().to_owned(),
            output::bytes(before),
            output::bytes(report.after.get(kind)),
            removed,
        ]);
    }
    let mut text = table.render();
    if !report.finished {
        text.push_str("stopped before the end: run it again to go on\n");
    }
    text
}

fn json(report: &RetentionReport) -> serde_json::Value {
    let sizes = |stored: &StoredBytes| {
        serde_json::json!({
            "logs": stored.logs,
            "payloads": stored.payloads,
            "packages": stored.packages,
        })
    };
    serde_json::json!({
        "before": sizes(&report.before),
        "after": sizes(&report.after),
        "removed": {
            "logs": {"tasks": report.logs.tasks, "bytes": report.logs.bytes},
            "payloads": {"tasks": report.payloads.tasks, "bytes": report.payloads.bytes},
            "packages": {
                "revisions": report.packages.revisions,
                "packages": report.packages.packages,
                "bytes": report.packages.bytes,
            },
        },
        "finished": report.finished,
    })
}
