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
use stevedore_engine::ContainerEngine;
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
    let payload = read_payload(args.payload.clone(), args.payload_file.as_deref())?;
    let engine: Arc<dyn ContainerEngine> = Arc::new(crate::connect_engine().await?);
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
                &args.code,
                context,
                format == Format::Human,
            )
            .await?,
        );
    }
    // The same checks as the server's, so what runs here would also be accepted there.
    let server_config = settings.server_config();
    let package = package
        .map(|bytes| {
            stevedore_server::package::check_package(bytes, server_config.package)
                .map_err(|error| anyhow::anyhow!("the package: {error}"))
        })
        .transpose()?;
    let spec = stevedore_server::wire::code_spec(upload, package.is_some(), &server_config)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    if let (stevedore_model::CodeKind::Runtime { file_name, .. }, Some(package)) =
        (&spec.kind, &package)
    {
        anyhow::ensure!(
            package.files.iter().any(|file| file == file_name),
            "the package holds no file {file_name:?}"
        );
    }
    let package = package.map(|package| package.bytes);
    let _ = (
        spec,
        package,
        engine,
        TaskFailed {
            task_id: String::new(),
            status: String::new(),
            msg: None,
        },
        CancellationToken::new(),
    );
    anyhow::bail!("PENDING")
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
