//! `stevedore run CODE`: one task, here, through the runner's own code path against the local
//! Docker engine — same image, same contract (env vars, files, flags), same limits — and no
//! server or database. The code comes from the flags, or from a server when no flag defines it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use reqwest::Method;
use stevedore_api_types::v2;
use stevedore_model::{Clock, CodeKind, SystemClock, TaskStatus};
use stevedore_runner::{LocalResult, LocalRun, LogSink, run_local};
use tokio_util::sync::CancellationToken;

use super::code::{CodeDefinition, find_code};
use super::{ConnectionArgs, Ctx, TaskFailed, read_payload};
use crate::output::{self, Format};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The code's name. Without --image, --runtime or --dockerfile, its definition and package
    /// are fetched from the server.
    pub code: String,
    #[command(flatten)]
    pub definition: CodeDefinition,
    /// The payload string, handed to the task in PAYLOAD_FILE.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from a file (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

pub async fn run(settings: &Settings, args: RunArgs, format: Format) -> anyhow::Result<()> {
    let human = format == Format::Human;
    let payload = read_payload(args.payload.clone(), args.payload_file.as_deref())?;
    let engine = Arc::new(crate::connect_engine().await?);
    let (mut upload, package) = if args.definition.defines_code() {
        (
            args.definition.upload(&args.code)?,
            args.definition.package()?,
        )
    } else {
        fetch_code(settings, &args, format).await?
    };
    if let Some(context) = &args.definition.dockerfile {
        upload.image = Some(
            crate::build::build_code_image(
                engine.as_ref(),
                None,
                &args.code,
                context,
                format == Format::Human,
            )
            .await?,
        );
    }
    // The same checks as the server's, so what runs here would also be accepted there.
    let server_config = settings.server_config()?;
    let checked = package
        .as_ref()
        .map(|bytes| {
            stevedore_server::package::check_package(
                std::io::Cursor::new(bytes),
                server_config.package,
            )
            .map_err(|error| anyhow::anyhow!("the package: {error}"))
        })
        .transpose()?;
    let spec = stevedore_server::wire::code_spec(upload, package.is_some(), &server_config)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    if let Some(checked) = &checked {
        checked
            .check_entry_point(&spec.kind)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut local = LocalRun::new(spec, payload, package, clock.now())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    if let Some(timeout) = args.definition.timeout {
        let timeout = u32::try_from(timeout).unwrap_or(0);
        local = local
            .with_timeout(timeout)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    let mut config = settings.runner_config(&server_config.stacks)?;
    if settings.runner.work_dir.is_none() {
        // A one-off run is no server: it leaves no data directory where it was started.
        config.work_dir = stevedore_runner::RunnerConfig::default().work_dir;
    }
    let image = match &local.code.spec.kind {
        CodeKind::Image { image, .. } => Some(image.clone()),
        CodeKind::Runtime { runtime, stack, .. } => server_config
            .stacks
            .for_revision(runtime, stack.as_deref())
            .ok()
            .map(|resolved| resolved.stack.image.clone()),
    };
    if let Some(image) = image {
        let auth = stevedore_runner::registry_auth_for(&image, &config.registry_auth);
        crate::build::ensure_image(engine.as_ref(), &image, auth, human).await?;
    }
    let task_id = local.task.id.clone();
    let cancel = CancellationToken::new();
    let on_interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping the task");
            on_interrupt.cancel();
        }
    });
    if human {
        eprintln!("running {} locally as task {task_id}", args.code);
    }
    let on_log: LogSink = Arc::new(move |bytes: &[u8]| {
        if human {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(bytes);
            let _ = stdout.flush();
        }
    });
    let result = run_local(engine, config, local, clock, on_log, cancel)
        .await
        .map_err(|error| anyhow::anyhow!("the task could not run: {error}"))?;
    let status = result.status.as_str().to_owned();
    if human {
        eprintln!("{}", summary(&result));
    } else {
        output::print_json(&to_json(&result))?;
    }
    if result.status == TaskStatus::Complete {
        return Ok(());
    }
    Err(TaskFailed {
        task_id,
        status,
        msg: result.msg.clone(),
    }
    .into())
}

/// One line on how the local run ended, like `task queue --wait` prints.
fn summary(result: &LocalResult) -> String {
    let mut line = format!("task {} {}", result.task_id, result.status.as_str());
    if let Some(code) = result.exit_code {
        line.push_str(&format!(" (exit code {code})"));
    }
    if let (Some(start), Some(end)) = (result.start_time, result.end_time) {
        line.push_str(&format!(
            " in {}",
            output::duration_ms((end - start).num_milliseconds())
        ));
    }
    if let Some(peak) = result.peak_memory_bytes {
        line.push_str(&format!(", peak memory {}", output::bytes(peak)));
    }
    if let Some(msg) = result.msg.as_deref().filter(|msg| !msg.is_empty()) {
        line.push_str(&format!(": {msg}"));
    }
    line
}

fn to_json(result: &LocalResult) -> serde_json::Value {
    serde_json::json!({
        "id": result.task_id,
        "status": result.status.as_str(),
        "exit_code": result.exit_code,
        "msg": result.msg,
        "percent": result.percent,
        "start_time": result.start_time.map(|time| time.to_rfc3339()),
        "end_time": result.end_time.map(|time| time.to_rfc3339()),
        "peak_memory_bytes": result.peak_memory_bytes,
        "cpu_time_ms": result.cpu_time_ms,
        "log": String::from_utf8_lossy(&result.log),
    })
}

/// The code's definition and package from the server, as `code push` would have sent them.
async fn fetch_code(
    settings: &Settings,
    args: &RunArgs,
    format: Format,
) -> anyhow::Result<(v2::CodeUpload, Option<Vec<u8>>)> {
    let ctx = Ctx::connect(&settings.data_dir, &args.connection, format).context(
        "no --image, --runtime or --dockerfile was given, so the code is read from a server",
    )?;
    let code = find_code(&ctx.client, &args.code).await?;
    let package = match code.runtime.as_deref() {
        Some(runtime) if runtime != "image" && code.image.is_none() => {
            let response = ctx
                .client
                .send(
                    ctx.client
                        .project_request(Method::GET, &format!("codes/{}/download", code.id)),
                )
                .await
                .context("cannot download the code's package")?;
            Some(response.bytes().await?.to_vec())
        }
        _ => None,
    };
    let upload = v2::CodeUpload {
        name: Some(code.name),
        runtime: code.runtime,
        file_name: code.file_name,
        image: code.image,
        command: code.command,
        env_vars: Some(code.env_vars),
        config: code.config.map(serde_json::Value::String),
        max_concurrency: None,
        retries: Some(i64::from(code.retries)),
        retries_delay: Some(i64::from(code.retries_delay)),
        retries_backoff: Some(code.retries_backoff),
        default_priority: Some(i64::from(code.default_priority)),
        timeout: Some(i64::from(code.timeout)),
        memory: Some(i64::from(code.memory)),
        cpus: code.cpus,
        network: Some(code.network),
        ..v2::CodeUpload::default()
    };
    Ok((upload, package))
}
