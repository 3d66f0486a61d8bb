//! `stevedore code push|ls|show|rm|revisions|download`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::TryStreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use stevedore_api_types::v2;

use super::Ctx;
use crate::client::{Client, is_not_found};
use crate::output::{self, Table};
use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub enum CodeCommand {
    /// Register a code, or a new revision of it: a Docker image, a zip package for a runtime,
    /// or an image built here from a Dockerfile.
    Push(Box<PushArgs>),
    /// List the project's codes.
    Ls,
    /// Show one code (by name or id).
    Show { code: String },
    /// Delete a code (by name or id); its tasks stay readable.
    Rm { code: String },
    /// List a code's revisions, newest first.
    Revisions { code: String },
    /// Download a code's zip package.
    Download {
        code: String,
        /// The revision (default: the latest).
        #[arg(long)]
        revision: Option<u32>,
        /// Where to write it (default: NAME.zip; `-` for standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The code's name.
    pub name: String,
    #[command(flatten)]
    pub definition: CodeDefinition,
}

/// What a code is and how it runs: shared by `code push` and `run`.
#[derive(Debug, Clone, Default, Args)]
pub struct CodeDefinition {
    /// A Docker image to run.
    #[arg(long, conflicts_with_all = ["runtime", "dockerfile"])]
    pub image: Option<String>,
    /// With --image or --dockerfile: run `sh -c COMMAND` instead of the image's own command.
    #[arg(long)]
    pub command: Option<String>,
    /// How the zip package's --file is launched: binary, sh, python, node, ruby, php, java.
    #[arg(long, requires = "file")]
    pub runtime: Option<String>,
    /// With --runtime: the stack (image) it runs on, e.g. python-3.11, an alias such as
    /// python, or an IronWorker name such as ruby-2.1 (default: the runtime's own;
    /// `stevedore stack ls`).
    #[arg(long, requires = "runtime")]
    pub stack: Option<String>,
    /// With --runtime: the file in the package to run.
    #[arg(long, requires = "runtime")]
    pub file: Option<String>,
    /// The package, a directory or a .zip file, unpacked into /mnt/task for each task: with
    /// --runtime (default: just --file), or with --image or --dockerfile to ship code beside
    /// the image, as `iron worker upload --zip` did.
    #[arg(long, value_name = "DIR|ZIP")]
    pub zip: Option<PathBuf>,
    /// Build the image from DIR/Dockerfile with the local Docker engine, then use it.
    #[arg(long, value_name = "DIR", conflicts_with = "runtime")]
    pub dockerfile: Option<PathBuf>,
    /// An environment variable for the code's tasks (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The code's config string, handed to every task in CONFIG_FILE.
    #[arg(long, value_name = "STRING", conflicts_with = "code_config_file")]
    pub code_config: Option<String>,
    /// Read the code's config string from a file.
    #[arg(long, value_name = "FILE")]
    pub code_config_file: Option<PathBuf>,
    /// The most tasks of this code running at once (default: unlimited).
    #[arg(long)]
    pub max_concurrency: Option<i64>,
    /// How often a failed task is retried.
    #[arg(long)]
    pub retries: Option<i64>,
    /// Seconds between retries.
    #[arg(long)]
    pub retries_delay: Option<i64>,
    /// `fixed` or `exponential`.
    #[arg(long)]
    pub retries_backoff: Option<String>,
    /// The priority of tasks queued without one: 0, 1 or 2.
    #[arg(long)]
    pub default_priority: Option<i64>,
    /// The default task timeout, seconds.
    #[arg(long)]
    pub timeout: Option<i64>,
    /// The memory limit of a task, MiB.
    #[arg(long)]
    pub memory: Option<i64>,
    /// CPUs a task may use, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// The container network: bridge (the default: the isolated task network), none, or a
    /// network the operator lists in task_network.named_networks.
    #[arg(long)]
    pub network: Option<String>,
}

impl CodeDefinition {
    /// Whether any flag defines the code (otherwise `run` fetches it from the server).
    pub fn defines_code(&self) -> bool {
        self.image.is_some() || self.runtime.is_some() || self.dockerfile.is_some()
    }

    /// The upload document for the code named `name`, the image set by the caller for
    /// Dockerfile builds.
    pub fn upload(&self, name: &str) -> anyhow::Result<v2::CodeUpload> {
        let env_vars = self
            .env
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(key, value)| (key.to_owned(), value.to_owned()))
                    .with_context(|| format!("--env {pair:?} must look like KEY=VALUE"))
            })
            .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
        let config = match (&self.code_config, &self.code_config_file) {
            (Some(config), _) => Some(config.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the config file {}", path.display()))?,
            ),
            (None, None) => None,
        };
        Ok(v2::CodeUpload {
            name: Some(name.to_owned()),
            runtime: self.runtime.clone(),
            stack: self.stack.clone(),
            file_name: self.file.clone(),
            image: self.image.clone(),
            command: self.command.clone(),
            env_vars: (!env_vars.is_empty()).then_some(env_vars),
            config: config.map(serde_json::Value::String),
            max_concurrency: self.max_concurrency,
            retries: self.retries,
            retries_delay: self.retries_delay,
            retries_backoff: self.retries_backoff.clone(),
            default_priority: self.default_priority,
            timeout: self.timeout,
            memory: self.memory,
            cpus: self.cpus,
            network: self.network.clone(),
            content_type: None,
            host: None,
        })
    }

    /// The zip package: the --zip file as it is, the --zip directory zipped, or a runtime
    /// code's single --file.
    pub fn package(&self) -> anyhow::Result<Option<Vec<u8>>> {
        if self.runtime.is_none() && self.zip.is_none() {
            return Ok(None);
        }
        anyhow::ensure!(
            self.defines_code(),
            "--zip goes with --runtime, --image or --dockerfile"
        );
        match (&self.zip, &self.file) {
            (Some(path), _) if path.is_dir() => zip_directory(path).map(Some),
            (Some(path), _) => std::fs::read(path)
                .map(Some)
                .with_context(|| format!("cannot read the package {}", path.display())),
            (None, Some(file)) => zip_files(Path::new("."), &[PathBuf::from(file)]).map(Some),
            (None, None) => anyhow::bail!("--runtime needs --file"),
        }
    }
}

pub async fn run(ctx: &Ctx, settings: &Settings, command: CodeCommand) -> anyhow::Result<()> {
    match command {
        CodeCommand::Push(args) => push(ctx, settings, *args).await,
        CodeCommand::Ls => list(ctx).await,
        CodeCommand::Show { code } => {
            let code = find_code(&ctx.client, &code).await?;
            if ctx.json() {
                return output::print_json(&code);
            }
            output::print(&describe(&code))
        }
        CodeCommand::Rm { code } => {
            let code = find_code(&ctx.client, &code).await?;
            ctx.client
                .send(
                    ctx.client
                        .project_request(Method::DELETE, &format!("codes/{}", code.id)),
                )
                .await?;
            if ctx.json() {
                return output::print_json(&serde_json::json!({"id": code.id, "deleted": true}));
            }
            output::print(&format!("deleted code {} ({})\n", code.name, code.id))
        }
        CodeCommand::Revisions { code } => {
            let code = find_code(&ctx.client, &code).await?;
            let list: v2::RevisionList = ctx
                .client
                .get_json(&format!("codes/{}/revisions?per_page=100", code.id))
                .await?;
            if ctx.json() {
                return output::print_json(&list);
            }
            let mut table = Table::new(&["REV", "PUSHED", "RUNS", "CHECKSUM"]);
            for revision in &list.revisions {
                table.row(vec![
                    revision.rev.to_string(),
                    output::time(&revision.latest_change),
                    runs(revision),
                    output::opt(revision.latest_checksum.as_deref()),
                ]);
            }
            output::print(&table.render())
        }
        CodeCommand::Download {
            code,
            revision,
            output: destination,
        } => {
            let code = find_code(&ctx.client, &code).await?;
            let path = match revision {
                Some(revision) => format!("codes/{}/download?revision={revision}", code.id),
                None => format!("codes/{}/download", code.id),
            };
            let bytes = ctx
                .client
                .send(ctx.client.project_request(Method::GET, &path))
                .await?
                .bytes()
                .await?;
            match destination.as_deref() {
                Some(path) if path == Path::new("-") => {
                    std::io::stdout().lock().write_all(&bytes)?;
                }
                destination => {
                    let path = destination
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from(format!("{}.zip", code.name)));
                    std::fs::write(&path, &bytes)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote {} ({})",
                        path.display(),
                        output::bytes(bytes.len() as u64)
                    );
                }
            }
            Ok(())
        }
    }
}

async fn push(ctx: &Ctx, settings: &Settings, args: PushArgs) -> anyhow::Result<()> {
    let definition = &args.definition;
    anyhow::ensure!(
        definition.defines_code(),
        "say what the code runs: --image IMAGE, --runtime RUNTIME --file FILE [--zip DIR|ZIP], or --dockerfile DIR"
    );
    let mut upload = definition.upload(&args.name)?;
    if let Some(context) = &definition.dockerfile {
        let engine = crate::connect_engine().await?;
        let images = settings.code_images();
        let project = Some((&images, ctx.client.project_id()));
        let image =
            crate::build::build_code_image(&engine, project, &args.name, context, !ctx.json())
                .await?;
        // With a code registry the image goes there, so runners elsewhere can pull it.
        if let Some(registry) = &settings.code_registry {
            crate::build::push_code_image(&engine, &image, registry.auth(), !ctx.json()).await?;
        }
        upload.image = Some(image);
    }
    let uploaded: v2::CodeUploaded = match definition.package()? {
        Some(package) => upload_package(&ctx.client, &upload, package, !ctx.json()).await?,
        None => ctx.client.post_json("codes", &upload).await?,
    };
    if ctx.json() {
        return output::print_json(&uploaded);
    }
    output::print(&format!(
        "pushed {} revision {} ({})\n",
        args.name, uploaded.rev, uploaded.id
    ))
}

/// Uploads a zip package with its `data` document, drawing a progress bar on a terminal.
async fn upload_package(
    client: &Client,
    upload: &v2::CodeUpload,
    package: Vec<u8>,
    show_progress: bool,
) -> anyhow::Result<v2::CodeUploaded> {
    let total = package.len() as u64;
    let bar = if show_progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let counted = bar.clone();
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = package
        .chunks(64 * 1024)
        .map(|chunk| Ok(bytes::Bytes::copy_from_slice(chunk)))
        .collect();
    let stream =
        futures::stream::iter(chunks).inspect_ok(move |chunk| counted.inc(chunk.len() as u64));
    let file = Part::stream_with_length(reqwest::Body::wrap_stream(stream), total)
        .file_name(format!("{}.zip", upload.name.as_deref().unwrap_or("code")))
        .mime_str("application/zip")?;
    let form = Form::new()
        .text("data", serde_json::to_string(upload)?)
        .part("file", file);
    let response = client
        .send(
            client
                .project_request(Method::POST, "codes")
                .multipart(form),
        )
        .await;
    bar.finish_and_clear();
    Ok(response?.json().await?)
}

async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let codes = all_codes(&ctx.client).await?;
    if ctx.json() {
        return output::print_json(&v2::CodeList { codes });
    }
    let mut table = Table::new(&["NAME", "REV", "RUNS", "PUSHED", "ID"]);
    for code in &codes {
        table.row(vec![
            code.name.clone(),
            code.rev.to_string(),
            runs(code),
            output::time(&code.latest_change),
            code.id.clone(),
        ]);
    }
    output::print(&table.render())
}

/// What a code runs, in a few words.
fn runs(code: &v2::CodeInfo) -> String {
    match (&code.image, &code.runtime, &code.file_name) {
        (Some(image), _, _) => match &code.command {
            Some(command) => format!("{image}: {command}"),
            None => image.clone(),
        },
        (None, Some(runtime), Some(file)) => match &code.stack {
            Some(stack) => format!("{runtime} on {stack}: {file}"),
            None => format!("{runtime}: {file}"),
        },
        (None, Some(runtime), None) => runtime.clone(),
        _ => String::new(),
    }
}

fn describe(code: &v2::CodeInfo) -> String {
    let env = code
        .env_vars
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    let cpus = code.cpus.map(|cpus| cpus.to_string()).unwrap_or_default();
    let concurrency = code
        .concurrency_limit
        .map_or_else(|| "unlimited".to_owned(), |limit| limit.to_string());
    output::fields(&[
        ("id", code.id.clone()),
        ("name", code.name.clone()),
        ("revision", code.rev.to_string()),
        ("runs", runs(code)),
        (
            "package",
            code.package_size.map(output::bytes).unwrap_or_default(),
        ),
        ("checksum", output::opt(code.latest_checksum.as_deref())),
        ("env", env),
        ("config", output::opt(code.config.as_deref())),
        ("max concurrency", concurrency),
        (
            "retries",
            format!(
                "{} (delay {}s, {})",
                code.retries, code.retries_delay, code.retries_backoff
            ),
        ),
        ("default priority", code.default_priority.to_string()),
        ("timeout", format!("{}s", code.timeout)),
        ("memory", format!("{} MiB", code.memory)),
        ("cpus", cpus),
        ("network", code.network.clone()),
        (
            "paused",
            if code.paused {
                "yes".to_owned()
            } else {
                String::new()
            },
        ),
        ("pushed", output::time(&code.latest_change)),
        ("created", output::time(&code.created_at)),
    ])
}

/// Every code of the project, page by page.
pub async fn all_codes(client: &Client) -> anyhow::Result<Vec<v2::CodeInfo>> {
    let mut codes = Vec::new();
    for page in 0.. {
        let list: v2::CodeList = client
            .get_json(&format!("codes?page={page}&per_page=100"))
            .await?;
        let done = list.codes.len() < 100;
        codes.extend(list.codes);
        if done {
            break;
        }
    }
    Ok(codes)
}

/// A code by name, or by id when no code has that name.
pub async fn find_code(client: &Client, name_or_id: &str) -> anyhow::Result<v2::CodeInfo> {
    // What looks like an id is asked for directly, sparing a walk over every code.
    if stevedore_model::ids::is_hex_id(name_or_id)
        && let Ok(code) = client
            .get_json::<v2::CodeInfo>(&format!("codes/{name_or_id}"))
            .await
    {
        return Ok(code);
    }
    if let Some(code) = all_codes(client)
        .await?
        .into_iter()
        .find(|code| code.name == name_or_id)
    {
        return Ok(code);
    }
    match client.get_json(&format!("codes/{name_or_id}")).await {
        Ok(code) => Ok(code),
        Err(error) if is_not_found(&error) => anyhow::bail!(
            "no code named {name_or_id:?} in project {} (`stevedore code ls` lists them)",
            client.project_id()
        ),
        Err(error) => Err(error),
    }
}

/// Zips a directory: every regular file under it, with its Unix mode, paths relative to it.
pub fn zip_directory(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut files = Vec::new();
    collect_files(dir, Path::new(""), &mut files)?;
    files.sort();
    anyhow::ensure!(!files.is_empty(), "{} holds no files", dir.display());
    zip_files(dir, &files)
}

fn collect_files(root: &Path, relative: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let dir = root.join(relative);
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = relative.join(entry.file_name());
        if kind.is_dir() {
            collect_files(root, &path, files)?;
        } else if kind.is_file() {
            files.push(path);
        } else {
            eprintln!(
                "skipping {} (not a regular file)",
                root.join(&path).display()
            );
        }
    }
    Ok(())
}

/// Zips `files` (relative to `root`), keeping their Unix modes.
fn zip_files(root: &Path, files: &[PathBuf]) -> anyhow::Result<Vec<u8>> {
    use zip::write::SimpleFileOptions;

    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for relative in files {
        let path = root.join(relative);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mode = file_mode(&path)?;
        let name = relative
            .components()
            .map(|part| part.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        writer.start_file(
            name,
            SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .unix_permissions(mode),
        )?;
        writer.write_all(&bytes)?;
    }
    Ok(writer.finish()?.into_inner())
}

#[cfg(unix)]
fn file_mode(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn file_mode(_: &Path) -> anyhow::Result<u32> {
    Ok(0o644)
}
