//! The client commands: `code`, `task`, `schedule`, `stack ls`, `usage`, in the spirit of `iron worker`.
//! Each talks to a server over the IronWorker v2 API; `run` needs no server at all, and `gc`
//! works on the store itself, like `token create`.

pub mod code;
pub mod gc;
pub mod registry;
pub mod run;
pub mod schedule;
pub mod task;
pub mod usage;

use std::path::{Path, PathBuf};

use clap::Args;

use crate::client::{Client, ClientConfig, ClientFlags};
use crate::output::Format;

/// Exit status of a command whose task ran but did not complete: `task queue --wait`,
/// `task log --follow` and `run`. 1 is any other failure, 2 a usage error.
pub const EXIT_TASK_FAILED: u8 = 3;

/// The task ran to an end other than `complete`; the CLI exits with [`EXIT_TASK_FAILED`].
#[derive(Debug, thiserror::Error)]
#[error("task {task_id} ended {status}{}", msg.as_deref().map(|msg| format!(": {msg}")).unwrap_or_default())]
pub struct TaskFailed {
    pub task_id: String,
    pub status: String,
    pub msg: Option<String>,
}

/// Which server and project the client commands talk to. Every flag overrides `iron.json`
/// files and `IRON_*` variables.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectionArgs {
    /// An iron.json to read (after ./iron.json, ~/.iron.json and IRON_* variables).
    #[arg(long, global = true, value_name = "FILE")]
    pub iron_json: Option<PathBuf>,
    /// The server's host name or address.
    #[arg(long, global = true)]
    pub host: Option<String>,
    /// The server's port.
    #[arg(long, global = true)]
    pub port: Option<u16>,
    /// `http` or `https`.
    #[arg(long, global = true)]
    pub protocol: Option<String>,
    /// The project to work in.
    #[arg(long, global = true)]
    pub project_id: Option<String>,
    /// The project's token.
    #[arg(long, global = true)]
    pub token: Option<String>,
}

/// What every client command has at hand.
pub struct Ctx {
    pub client: Client,
    pub format: Format,
}

impl Ctx {
    pub fn connect(
        data_dir: &Path,
        connection: &ConnectionArgs,
        format: Format,
    ) -> anyhow::Result<Self> {
        let flags = ClientFlags {
            iron_json: connection.iron_json.clone(),
            host: connection.host.clone(),
            port: connection.port,
            protocol: connection.protocol.clone(),
            project_id: connection.project_id.clone(),
            token: connection.token.clone(),
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let config = ClientConfig::discover(
            data_dir,
            home.as_deref(),
            &|name| std::env::var(name).ok(),
            &flags,
        )?;
        Ok(Self {
            client: Client::new(&config)?,
            format,
        })
    }

    pub fn json(&self) -> bool {
        self.format == Format::Json
    }
}

/// A payload from `--payload` or `--payload-file` (`-` is standard input); `{}` when neither.
pub fn read_payload(payload: Option<String>, file: Option<&Path>) -> anyhow::Result<String> {
    use anyhow::Context;
    match (payload, file) {
        (Some(_), Some(_)) => anyhow::bail!("give --payload or --payload-file, not both"),
        (Some(payload), None) => Ok(payload),
        (None, Some(path)) if path == Path::new("-") => {
            let mut payload = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut payload)
                .context("cannot read the payload from standard input")?;
            Ok(payload)
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the payload file {}", path.display())),
        (None, None) => Ok("{}".to_owned()),
    }
}

/// `stevedore stack ls`.
pub async fn stack_list(ctx: &Ctx) -> anyhow::Result<()> {
    let response = ctx
        .client
        .send(
            ctx.client
                .root_request(reqwest::Method::GET, "2/stacks?details=true"),
        )
        .await?;
    let stacks: Vec<stevedore_api_types::v2::StackInfo> = response.json().await?;
    if ctx.json() {
        return crate::output::print_json(&stacks);
    }
    let mut table = crate::output::Table::new(&["NAME", "ALIASES", "RUNTIMES", "IMAGE"]);
    for stack in &stacks {
        table.row(vec![
            stack.name.clone(),
            stack.aliases.join(","),
            stack.runtimes.join(","),
            stack.image.clone(),
        ]);
    }
    crate::output::print(&table.render())
}
