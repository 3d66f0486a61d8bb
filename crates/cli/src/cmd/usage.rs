//! `stevedore usage`: the project's finished tasks per bucket, by code or by stack, from
//! `GET usage`.

use clap::{Args, ValueEnum};
use stevedore_api_types::v2;

use super::Ctx;
use super::task::encode;
use crate::output::{Table, duration_ms, print, print_json, time};

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Start of the window: RFC 3339 or seconds since the epoch (default: a day before --to).
    #[arg(long)]
    pub from: Option<String>,
    /// End of the window, exclusive: RFC 3339 or seconds since the epoch (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// `minute`, `hour`, `day` or seconds (default: chosen by the server for the window).
    #[arg(long)]
    pub bucket: Option<String>,
    /// Break each bucket down by code or by stack.
    #[arg(long, value_enum, default_value_t = By::Code)]
    pub by: By,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum By {
    Code,
    Stack,
}

pub async fn run(ctx: &Ctx, args: UsageArgs) -> anyhow::Result<()> {
    let query: Vec<String> = [
        ("from", &args.from),
        ("to", &args.to),
        ("bucket", &args.bucket),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        value
            .as_deref()
            .map(|value| format!("{name}={}", encode(value)))
    })
    .collect();
    let report: v2::UsageReport = ctx
        .client
        .get_json(&format!("usage?{}", query.join("&")))
        .await?;
    if ctx.json() {
        return print_json(&report);
    }
    print(&render(&report, args.by))
}

/// One row per bucket and code (or stack) that finished tasks, then the totals, then the
/// queue waits: the chart's numbers as text.
fn render(report: &v2::UsageReport, by: By) -> String {
    let name_header = match by {
        By::Code => "CODE",
        By::Stack => "STACK",
    };
    let mut table = Table::new(&[
        "BUCKET",
        name_header,
        "TASKS",
        "COMPLETE",
        "FAILURES",
        "CANCELLED",
        "COMPUTE",
    ]);
    let mut add = |bucket: String, parts: Vec<(String, &v2::UsageCounts)>| {
        for (name, counts) in parts {
            table.row(vec![
                bucket.clone(),
                name,
                counts.tasks.to_string(),
                counts.complete.to_string(),
                counts.failures.to_string(),
                counts.cancelled.to_string(),
                duration_ms((counts.compute_seconds * 1000.0).round() as i64),
            ]);
        }
    };
    for bucket in &report.buckets {
        add(
            time(&bucket.start),
            parts(by, &bucket.codes, &bucket.stacks),
        );
    }
    add("total".to_owned(), parts(by, &report.codes, &report.stacks));
    let wait = &report.queue_wait.stats;
    let waits = match (wait.p50_ms, wait.p99_ms) {
        (Some(p50), Some(p99)) => format!(
            "queue wait: p50 {}, p99 {} over {} starts{}",
            duration_ms(i64::try_from(p50).unwrap_or(i64::MAX)),
            duration_ms(i64::try_from(p99).unwrap_or(i64::MAX)),
            wait.samples,
            report
                .queue_wait
                .sampled_since
                .as_deref()
                .map(|since| format!(" (the latest, since {})", time(since)))
                .unwrap_or_default()
        ),
        _ => "queue wait: no task started in the window".to_owned(),
    };
    format!(
        "{} to {}, {} s buckets\n{}{waits}\n",
        time(&report.from),
        time(&report.to),
        report.bucket_secs,
        table.render()
    )
}

/// The rows of one bucket (or of the totals): its codes or its stacks, with their counts.
fn parts<'a>(
    by: By,
    codes: &'a [v2::UsageByCode],
    stacks: &'a [v2::UsageByStack],
) -> Vec<(String, &'a v2::UsageCounts)> {
    match by {
        By::Code => codes
            .iter()
            .map(|code| (code.code_name.clone(), &code.counts))
            .collect(),
        By::Stack => stacks
            .iter()
            .map(|stack| (stack.stack.clone(), &stack.counts))
            .collect(),
    }
}
