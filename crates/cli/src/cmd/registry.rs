//! `stevedore registry login|ls|logout`: the project's credentials for private registries,
//! as `iron docker login` stores them. The server keeps the password sealed and never shows
//! it again; the project's tasks pull their images with it.

use std::io::Read;

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use stevedore_api_types::v2;

use super::Ctx;
use crate::output::{self, Table};

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Store the project's credentials for a registry (replacing earlier ones for it).
    Login(LoginArgs),
    /// List the registries the project has credentials for (never their passwords).
    Ls,
    /// Forget the project's credentials for a registry.
    Logout {
        /// The registry (default: Docker Hub).
        server: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The registry, e.g. registry.example.com:5000 (default: Docker Hub).
    #[arg(long)]
    pub server: Option<String>,
    #[arg(long, short)]
    pub username: String,
    /// The password or access token (visible to other users of this machine; prefer
    /// --password-stdin).
    #[arg(long, short, conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

pub async fn run(ctx: &Ctx, command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Login(args) => login(ctx, args).await,
        RegistryCommand::Ls => {
            let list: v2::CredentialList = ctx.client.get_json("credentials").await?;
            if ctx.json() {
                return output::print_json(&list);
            }
            let mut table = Table::new(&["REGISTRY", "USERNAME", "UPDATED"]);
            for credential in &list.credentials {
                table.row(vec![
                    credential.registry.clone(),
                    credential.username.clone(),
                    output::time(&credential.updated_at),
                ]);
            }
            output::print(&table.render())
        }
        RegistryCommand::Logout { server } => {
            let registry = stevedore_model::registry::normalize_registry(
                server.as_deref().unwrap_or_default(),
            )?;
            let answer: v2::Message = ctx
                .client
                .send(
                    ctx.client
                        .project_request(Method::DELETE, &format!("credentials/{registry}")),
                )
                .await?
                .json()
                .await?;
            if ctx.json() {
                return output::print_json(&answer);
            }
            output::print(&format!("{}\n", answer.msg))
        }
    }
}

async fn login(ctx: &Ctx, args: LoginArgs) -> anyhow::Result<()> {
    let password = match (args.password, args.password_stdin) {
        (Some(password), false) => password,
        (None, true) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the password from standard input")?;
            text.trim_end_matches(['\n', '\r']).to_owned()
        }
        _ => anyhow::bail!("give the password with --password-stdin (or --password)"),
    };
    let upload = v2::CredentialsUpload {
        username: Some(args.username),
        password: Some(password),
        serveraddress: args.server,
        ..v2::CredentialsUpload::default()
    };
    let stored: v2::CredentialStored = ctx.client.post_json("credentials", &upload).await?;
    if ctx.json() {
        return output::print_json(&stored);
    }
    output::print(&format!(
        "stored the credentials for {} as {}\n",
        stored.registry, stored.username
    ))
}
