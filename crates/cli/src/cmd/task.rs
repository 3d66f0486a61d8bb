//! `stevedore task queue|ls|show|log|cancel|retry`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use reqwest::Method;
use stevedore_api_types::v2;

use super::{Ctx, TaskFailed, read_payload};
use crate::client::Client;
use crate::client::sse::Parser;
use crate::output::{self, Table};

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Queue a task of a code.
    Queue(QueueArgs),
    /// List tasks, newest first.
    Ls(ListArgs),
    /// Show one task.
    Show { task_id: String },
    /// Print a task's log.
    Log {
        task_id: String,
        /// Keep printing while the task runs; end when it ends (exit 3 unless it completed).
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a queued or running task.
    Cancel { task_id: String },
    /// Queue a finished task again, as a new task.
    Retry {
        task_id: String,
        /// Seconds to wait before it may run.
        #[arg(long)]
        delay: Option<i64>,
    },
}

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// The code to run (its name).
    pub code: String,
    /// The payload string (often JSON), handed to the task in PAYLOAD_FILE.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from a file (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// 0, 1 or 2 (highest); default: the code's.
    #[arg(long)]
    pub priority: Option<i64>,
    /// Seconds before the task may run.
    #[arg(long)]
    pub delay: Option<i64>,
    /// Seconds the task may run; default: the code's.
    #[arg(long)]
    pub timeout: Option<i64>,
    /// Run only on the runners of this cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// A free-form label to find the task by.
    #[arg(long)]
    pub label: Option<String>,
    /// Wait for the task to end, printing its log live; exit 3 unless it completed.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tasks of this code (name).
    #[arg(long)]
    pub code: Option<String>,
    /// Only these statuses, comma-separated: queued,preparing,running,complete,error,timeout,cancelled.
    #[arg(long, value_delimiter = ',')]
    pub status: Vec<String>,
    /// Only tasks with this label.
    #[arg(long)]
    pub label: Option<String>,
    /// The page, from 0.
    #[arg(long, default_value_t = 0)]
    pub page: u32,
    #[arg(long, default_value_t = 30)]
    pub per_page: u32,
}

const STATUSES: [&str; 7] = [
    "queued",
    "preparing",
    "running",
    "complete",
    "error",
    "timeout",
    "cancelled",
];

pub async fn run(ctx: &Ctx, command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Queue(args) => queue(ctx, args).await,
        TaskCommand::Ls(args) => list(ctx, args).await,
        TaskCommand::Show { task_id } => {
            let task: v2::TaskInfo = ctx.client.get_json(&format!("tasks/{task_id}")).await?;
            if ctx.json() {
                return output::print_json(&task);
            }
            output::print(&describe(&task))
        }
        TaskCommand::Log { task_id, follow } => {
            if follow {
                let task = follow_log(&ctx.client, &task_id, true).await?;
                return finish(ctx, &task);
            }
            let response = ctx
                .client
                .send(
                    ctx.client
                        .project_request(Method::GET, &format!("tasks/{task_id}/log"))
                        .header("Accept", "text/plain"),
                )
                .await;
            match response {
                Ok(response) => {
                    let bytes = response.bytes().await?;
                    std::io::stdout().lock().write_all(&bytes)?;
                    Ok(())
                }
                // The log is 404 until the task wrote something; tell a task that does not
                // exist from one that has no log yet.
                Err(error) if crate::client::is_not_found(&error) => {
                    let task: v2::TaskInfo =
                        ctx.client.get_json(&format!("tasks/{task_id}")).await?;
                    eprintln!("task {} ({}) has no log yet", task.id, task.status);
                    Ok(())
                }
                Err(error) => Err(error),
            }
        }
        TaskCommand::Cancel { task_id } => {
            let reply: serde_json::Value = ctx
                .client
                .post_json(&format!("tasks/{task_id}/cancel"), &serde_json::json!({}))
                .await?;
            if ctx.json() {
                return output::print_json(&reply);
            }
            let task: v2::TaskInfo = ctx.client.get_json(&format!("tasks/{task_id}")).await?;
            output::print(&format!("task {} is {}\n", task.id, task.status))
        }
        TaskCommand::Retry { task_id, delay } => {
            let queued: v2::TasksQueued = ctx
                .client
                .post_json(
                    &format!("tasks/{task_id}/retry"),
                    &v2::Retry { delay, wait: None },
                )
                .await?;
            if ctx.json() {
                return output::print_json(&queued);
            }
            for task in &queued.tasks {
                println!("{}", task.id);
            }
            Ok(())
        }
    }
}

async fn queue(ctx: &Ctx, args: QueueArgs) -> anyhow::Result<()> {
    let payload = read_payload(args.payload, args.payload_file.as_deref())?;
    let request = v2::TasksCreate {
        tasks: vec![v2::TaskCreate {
            code_name: Some(args.code),
            payload: Some(serde_json::Value::String(payload)),
            priority: args.priority,
            timeout: args.timeout,
            delay: args.delay,
            label: args.label,
            cluster: args.cluster,
            ..v2::TaskCreate::default()
        }],
    };
    let queued: v2::TasksQueued = ctx.client.post_json("tasks", &request).await?;
    let task_id = queued
        .tasks
        .first()
        .map(|task| task.id.clone())
        .context("the server queued no task")?;
    if !args.wait {
        if ctx.json() {
            return output::print_json(&queued);
        }
        println!("{task_id}");
        return Ok(());
    }
    eprintln!("queued task {task_id}");
    let task = follow_log(&ctx.client, &task_id, !ctx.json()).await?;
    finish(ctx, &task)
}

/// Prints how a followed task ended and fails with [`TaskFailed`] unless it completed.
fn finish(ctx: &Ctx, task: &v2::TaskInfo) -> anyhow::Result<()> {
    if ctx.json() {
        output::print_json(task)?;
    } else {
        eprintln!("{}", summary(task));
    }
    if task.status == "complete" {
        return Ok(());
    }
    Err(TaskFailed {
        task_id: task.id.clone(),
        status: task.status.clone(),
        msg: task.msg.clone(),
    }
    .into())
}

/// One line on how a task ended: status, exit code, time and message.
pub fn summary(task: &v2::TaskInfo) -> String {
    let mut line = format!("task {} {}", task.id, task.status);
    if let Some(code) = task.exit_code {
        line.push_str(&format!(" (exit code {code})"));
    }
    if let Some(duration) = task.duration {
        line.push_str(&format!(" in {}", output::duration_ms(duration)));
    }
    if let Some(msg) = task.msg.as_deref().filter(|msg| !msg.is_empty()) {
        line.push_str(&format!(": {msg}"));
    }
    line
}

/// Streams a task's log to standard output (when `print` is set) until the task ends, and
/// returns the finished task. A dropped connection is resumed where it stopped.
pub async fn follow_log(
    client: &Client,
    task_id: &str,
    print: bool,
) -> anyhow::Result<v2::TaskInfo> {
    let mut offset: u64 = 0;
    let mut failures = 0u32;
    let mut last_progress: Option<(Option<u8>, Option<String>)> = None;
    // Whether the log printed so far ends in the middle of a line.
    let mut line_open = false;
    loop {
        let request = client
            .project_request(Method::GET, &format!("tasks/{task_id}/log/stream"))
            .header("Accept", "text/event-stream")
            .header("Last-Event-ID", offset.to_string());
        let response = match client.send(request).await {
            Ok(response) => response,
            Err(error) if error.downcast_ref::<crate::client::ApiError>().is_some() => {
                return Err(error);
            }
            Err(error) => {
                failures += 1;
                if failures > 30 {
                    return Err(error.context("the log stream kept failing"));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut parser = Parser::default();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            failures = 0;
            for event in parser.feed(&chunk) {
                match event.event.as_str() {
                    "log" => {
                        let data: serde_json::Value = serde_json::from_str(&event.data)
                            .context("the server sent a log event that is not JSON")?;
                        let text = data
                            .get("text")
                            .and_then(|text| text.as_str())
                            .unwrap_or("");
                        if print && !text.is_empty() {
                            let mut stdout = std::io::stdout().lock();
                            stdout.write_all(text.as_bytes())?;
                            stdout.flush()?;
                            line_open = !text.ends_with('\n');
                        }
                        if let Some(id) = event.id.as_deref().and_then(|id| id.parse().ok()) {
                            offset = id;
                        }
                    }
                    "status" => {
                        let data: serde_json::Value =
                            serde_json::from_str(&event.data).unwrap_or_default();
                        let percent = data
                            .get("percent")
                            .and_then(|value| value.as_u64())
                            .and_then(|value| u8::try_from(value).ok());
                        let msg = data
                            .get("msg")
                            .and_then(|msg| msg.as_str())
                            .map(str::to_owned);
                        let progress = (percent, msg);
                        if print
                            && progress.0.is_some()
                            && last_progress.as_ref() != Some(&progress)
                        {
                            eprintln!(
                                "[progress {}%{}]",
                                progress.0.unwrap_or(0),
                                progress
                                    .1
                                    .as_deref()
                                    .map(|msg| format!(" {msg}"))
                                    .unwrap_or_default()
                            );
                        }
                        last_progress = Some(progress);
                    }
                    "end" => {
                        // A last line without its newline would leave the status line that
                        // follows on the same terminal line; a redirected log stays byte for
                        // byte what the task wrote.
                        if line_open && std::io::stdout().is_terminal() {
                            println!();
                        }
                        return serde_json::from_str(&event.data)
                            .context("the server sent an end event that is not a task");
                    }
                    _ => {}
                }
            }
        }
        // The stream ended without an end event: the connection dropped. Resume.
        failures += 1;
        if failures > 30 {
            anyhow::bail!("the log stream of task {task_id} kept breaking off");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<()> {
    let mut query = vec![
        format!("page={}", args.page),
        format!("per_page={}", args.per_page),
    ];
    if let Some(code) = &args.code {
        query.push(format!("code_name={}", encode(code)));
    }
    if let Some(label) = &args.label {
        query.push(format!("label={}", encode(label)));
    }
    for status in &args.status {
        anyhow::ensure!(
            STATUSES.contains(&status.as_str()),
            "--status {status:?} is not a status; the statuses are {}",
            STATUSES.join(", ")
        );
        query.push(format!("{status}=1"));
    }
    let list: v2::TaskList = ctx
        .client
        .get_json(&format!("tasks?{}", query.join("&")))
        .await?;
    if ctx.json() {
        return output::print_json(&list);
    }
    let mut table = Table::new(&["ID", "CODE", "STATUS", "CREATED", "DURATION", "MSG"]);
    for task in &list.tasks {
        table.row(vec![
            task.id.clone(),
            task.code_name.clone(),
            task.status.clone(),
            output::time(&task.created_at),
            task.duration.map(output::duration_ms).unwrap_or_default(),
            output::opt(task.msg.as_deref()),
        ]);
    }
    output::print(&table.render())
}

fn describe(task: &v2::TaskInfo) -> String {
    let progress = match (task.percent, task.msg.as_deref()) {
        (Some(percent), _) => format!("{percent}%"),
        _ => String::new(),
    };
    output::fields(&[
        ("id", task.id.clone()),
        (
            "code",
            format!("{} (revision {})", task.code_name, task.code_rev),
        ),
        ("status", task.status.clone()),
        ("exit code", output::opt(task.exit_code)),
        ("msg", output::opt(task.msg.as_deref())),
        ("progress", progress),
        ("priority", task.priority.to_string()),
        ("cluster", task.cluster.clone()),
        ("label", output::opt(task.label.as_deref())),
        ("timeout", format!("{}s", task.timeout)),
        (
            "delay",
            if task.delay > 0 {
                format!("{}s", task.delay)
            } else {
                String::new()
            },
        ),
        ("created", output::time(&task.created_at)),
        (
            "started",
            task.start_time
                .as_deref()
                .map(output::time)
                .unwrap_or_default(),
        ),
        (
            "ended",
            task.end_time
                .as_deref()
                .map(output::time)
                .unwrap_or_default(),
        ),
        (
            "duration",
            task.duration.map(output::duration_ms).unwrap_or_default(),
        ),
        (
            "peak memory",
            task.peak_memory_bytes
                .map(output::bytes)
                .unwrap_or_default(),
        ),
        (
            "cpu time",
            task.cpu_time_ms
                .map(|ms| output::duration_ms(ms as i64))
                .unwrap_or_default(),
        ),
        (
            "log",
            match &task.log_removed_at {
                Some(removed) => format!(
                    "{}, removed by retention at {}",
                    output::bytes(task.log_size),
                    output::time(removed)
                ),
                None => output::bytes(task.log_size),
            },
        ),
        ("retry of", output::opt(task.original_task_id.as_deref())),
        (
            "retry count",
            if task.retry_count > 0 {
                task.retry_count.to_string()
            } else {
                String::new()
            },
        ),
        ("schedule", output::opt(task.schedule_id.as_deref())),
        (
            "payload",
            match &task.payload_removed_at {
                Some(removed) => format!("removed by retention at {}", output::time(removed)),
                None => task.payload.clone(),
            },
        ),
    ])
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}
