//! `stevedore schedule create|ls|show|cancel`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use stevedore_api_types::v2;

use super::{Ctx, read_payload};
use crate::output::{self, Table};

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Make tasks of a code on a timetable: every N seconds, or by cron.
    Create(Box<CreateArgs>),
    /// List schedules, newest first.
    Ls {
        #[arg(long, default_value_t = 0)]
        page: u32,
        #[arg(long, default_value_t = 30)]
        per_page: u32,
    },
    /// Show one schedule.
    Show { schedule_id: String },
    /// Stop a schedule; tasks it already queued stay.
    Cancel { schedule_id: String },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("timing").required(true).args(["every", "cron"])))]
pub struct CreateArgs {
    /// The code to run (its name).
    pub code: String,
    /// Run every this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub every: Option<i64>,
    /// Run by a five-field cron expression, e.g. '*/5 * * * *'.
    #[arg(long)]
    pub cron: Option<String>,
    /// The time zone the cron expression is read in (IANA name); default UTC.
    #[arg(long, requires = "cron")]
    pub tz: Option<String>,
    /// The first run, RFC 3339 (default: now).
    #[arg(long)]
    pub start_at: Option<String>,
    /// No run after this time, RFC 3339.
    #[arg(long)]
    pub end_at: Option<String>,
    /// Stop after this many runs.
    #[arg(long)]
    pub run_times: Option<i64>,
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from a file (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    #[arg(long)]
    pub priority: Option<i64>,
    #[arg(long)]
    pub timeout: Option<i64>,
    #[arg(long)]
    pub cluster: Option<String>,
    #[arg(long)]
    pub label: Option<String>,
    /// Seconds each task it makes waits before it may run.
    #[arg(long)]
    pub delay: Option<i64>,
    /// The most of its tasks queued or running at once; a fire that finds that many
    /// unfinished queues nothing.
    #[arg(long)]
    pub max_concurrency: Option<i64>,
}

pub async fn run(ctx: &Ctx, command: ScheduleCommand) -> anyhow::Result<()> {
    match command {
        ScheduleCommand::Create(args) => {
            let args = *args;
            let payload = read_payload(args.payload, args.payload_file.as_deref())?;
            let request = v2::SchedulesCreate {
                schedules: vec![v2::ScheduleCreate {
                    code_name: Some(args.code),
                    payload: Some(serde_json::Value::String(payload)),
                    run_every: args.every,
                    cron: args.cron,
                    timezone: args.tz,
                    start_at: args.start_at.map(serde_json::Value::String),
                    end_at: args.end_at.map(serde_json::Value::String),
                    run_times: args.run_times,
                    priority: args.priority,
                    timeout: args.timeout,
                    cluster: args.cluster,
                    label: args.label,
                    delay: args.delay,
                    max_concurrency: args.max_concurrency,
                    ..v2::ScheduleCreate::default()
                }],
            };
            let created: v2::SchedulesCreated = ctx.client.post_json("schedules", &request).await?;
            if ctx.json() {
                return output::print_json(&created);
            }
            let id = created
                .schedules
                .first()
                .map(|schedule| schedule.id.clone())
                .context("the server created no schedule")?;
            println!("{id}");
            Ok(())
        }
        ScheduleCommand::Ls { page, per_page } => {
            let list: v2::ScheduleList = ctx
                .client
                .get_json(&format!("schedules?page={page}&per_page={per_page}"))
                .await?;
            if ctx.json() {
                return output::print_json(&list);
            }
            let mut table = Table::new(&["ID", "CODE", "STATUS", "WHEN", "NEXT", "RUNS"]);
            for schedule in &list.schedules {
                table.row(vec![
                    schedule.id.clone(),
                    schedule.code_name.clone(),
                    schedule.status.clone(),
                    timing(schedule),
                    schedule
                        .next_start
                        .as_deref()
                        .map(output::time)
                        .unwrap_or_default(),
                    runs(schedule),
                ]);
            }
            output::print(&table.render())
        }
        ScheduleCommand::Show { schedule_id } => {
            let schedule: v2::ScheduleInfo = ctx
                .client
                .get_json(&format!("schedules/{schedule_id}"))
                .await?;
            if ctx.json() {
                return output::print_json(&schedule);
            }
            output::print(&output::fields(&[
                ("id", schedule.id.clone()),
                ("code", schedule.code_name.clone()),
                ("status", schedule.status.clone()),
                ("when", timing(&schedule)),
                (
                    "start at",
                    schedule
                        .start_at
                        .as_deref()
                        .map(output::time)
                        .unwrap_or_default(),
                ),
                (
                    "end at",
                    schedule
                        .end_at
                        .as_deref()
                        .map(output::time)
                        .unwrap_or_default(),
                ),
                (
                    "next",
                    schedule
                        .next_start
                        .as_deref()
                        .map(output::time)
                        .unwrap_or_default(),
                ),
                (
                    "last run",
                    schedule
                        .last_run_time
                        .as_deref()
                        .map(output::time)
                        .unwrap_or_default(),
                ),
                ("runs", runs(&schedule)),
                ("priority", schedule.priority.to_string()),
                ("timeout", format!("{}s", schedule.timeout)),
                ("delay", format!("{}s", schedule.delay)),
                (
                    "max concurrency",
                    schedule
                        .max_concurrency
                        .map_or_else(|| "unlimited".to_owned(), |limit| limit.to_string()),
                ),
                ("cluster", schedule.cluster.clone()),
                ("label", output::opt(schedule.label.as_deref())),
                ("msg", output::opt(schedule.msg.as_deref())),
                ("payload", schedule.payload.clone()),
            ]))
        }
        ScheduleCommand::Cancel { schedule_id } => {
            let reply: serde_json::Value = ctx
                .client
                .post_json(
                    &format!("schedules/{schedule_id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            if ctx.json() {
                return output::print_json(&reply);
            }
            println!("cancelled schedule {schedule_id}");
            Ok(())
        }
    }
}

fn timing(schedule: &v2::ScheduleInfo) -> String {
    match (&schedule.cron, schedule.run_every) {
        (Some(cron), _) => format!(
            "cron {cron} ({})",
            schedule.timezone.as_deref().unwrap_or("UTC")
        ),
        (None, Some(every)) => format!("every {every}s"),
        (None, None) => "once".to_owned(),
    }
}

fn runs(schedule: &v2::ScheduleInfo) -> String {
    match schedule.run_times {
        Some(limit) => format!("{}/{limit}", schedule.run_count),
        None => schedule.run_count.to_string(),
    }
}
