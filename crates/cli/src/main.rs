//! The `stevedore` binary: `serve` runs the server on an embedded SQLite store; `project` and
//! `token` administer tenants on the same data directory, and `gc` runs retention there now; `code`, `task`, `schedule` and
//! `stack` are the client commands; `run` runs a code locally, without a server.

#![forbid(unsafe_code)]

mod build;
mod client;
mod cmd;
mod embedded;
mod identity;
mod output;
mod remote;
mod secrets;
mod settings;
mod watchdog;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stevedore_engine::{ContainerEngine, DockerEngine};
use stevedore_model::{Clock, SystemClock};
use stevedore_runner::{Runner, WorkNotifier};
use stevedore_server::leader::{self, LeaderDuties};
use stevedore_server::rescuer::RescuerConfig;
use stevedore_server::scheduler::SchedulerConfig;
use stevedore_server::{AppState, EnqueueHook, LeaseDesk, auth, bootstrap};
use stevedore_store::{CredentialVault, NewToken, PgStore, SqliteStore, Store, TokenRole};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;

use crate::cmd::code::CodeCommand;
use crate::cmd::run::RunArgs;
use crate::cmd::schedule::ScheduleCommand;
use crate::cmd::task::TaskCommand;
use crate::cmd::{ConnectionArgs, Ctx, EXIT_TASK_FAILED, TaskFailed};
use crate::output::Format;
use crate::settings::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "stevedore",
    version,
    about = "Runs every task in its own Docker container, behind the IronWorker API"
)]
struct Cli {
    /// A TOML configuration file (default: ./stevedore.toml when it exists).
    #[arg(long, global = true, env = "STEVEDORE_CONFIG")]
    config: Option<PathBuf>,
    /// Where the database and iron.json live.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (and, with it, everything a single machine needs).
    Serve {
        /// The address to listen on.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// A postgres:// URL of a database several servers share (default: SQLite in the
        /// data directory).
        #[arg(long)]
        database: Option<String>,
        /// What runs the tasks: `docker` (default) or `oci`, an OCI runtime (crun or runc)
        /// driven directly (`engine` in the settings).
        #[arg(long, value_enum)]
        engine: Option<settings::EngineKind>,
    },
    /// Run tasks for a server elsewhere: lease over its runner protocol, run each task in a
    /// container on this machine's Docker engine.
    Runner(Box<RunnerArgs>),
    /// Started by a runner beside itself: stops the runner's containers once their leases
    /// ended, also after the runner was killed.
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        runner_id: String,
        /// The runner's lease ledger.
        #[arg(long)]
        ledger: PathBuf,
        #[command(flatten)]
        engine: watchdog::WatchedEngine,
    },
    /// Manage projects (tenants).
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Manage tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Codes: what tasks run.
    Code {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: CodeCommand,
    },
    /// Tasks: queue, list, follow logs, cancel, retry.
    Task {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Schedules: tasks on a timetable.
    Schedule {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// The project's credentials for private container registries.
    Registry {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: cmd::registry::RegistryCommand,
    },
    /// Runtimes for zip packages.
    Stack {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(subcommand)]
        command: StackCommand,
    },
    /// Finished tasks, compute time and queue waits over time, by code or by stack.
    Usage {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(flatten)]
        args: cmd::usage::UsageArgs,
    },
    /// Run a code here, once, in the same image with the same contract and limits as on a
    /// runner, without a server. Exit 3 unless the task completed.
    Run(Box<RunArgs>),
    /// Remove finished tasks' old logs and payloads and old revisions' packages now, as the
    /// server's retention does every `retention.interval_secs`; prints the sizes before and
    /// after. Works on the configured store, beside a running server or without one.
    Gc(cmd::gc::GcArgs),
}

#[derive(Debug, clap::Args)]
struct RunnerArgs {
    /// The server's URL, e.g. http://host:8080.
    #[arg(long, env = "STEVEDORE_API")]
    api: String,
    /// A runner token (`stevedore token create --role runner` on the server).
    #[arg(long, env = "STEVEDORE_RUNNER_TOKEN", hide_env_values = true)]
    token: String,
    /// A cluster whose tasks to run; repeat for several. Default: the configured clusters
    /// (`default`).
    #[arg(long = "cluster")]
    clusters: Vec<String>,
    /// The runner's id: at start-up it removes the containers and gives back the tasks an
    /// earlier life of the same id left behind, so no two runners may share one. Default:
    /// `remote-<hostname>-<random>`, made once and kept in the data directory.
    #[arg(long)]
    id: Option<String>,
    /// The most tasks at once (default: from the engine's cores and memory).
    #[arg(long)]
    capacity: Option<u32>,
    /// Serve this runner's Prometheus metrics at `http://ADDR/metrics` (default: not served).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// What runs the tasks: `docker` (default) or `oci` (`engine` in the settings).
    #[arg(long, value_enum)]
    engine: Option<settings::EngineKind>,
}

#[derive(Debug, Subcommand)]
enum StackCommand {
    /// List the server's stacks: name, aliases, the runtimes each launches, image.
    Ls,
    /// Build the stacks' local images without any container registry: `busybox` from the
    /// host's static busybox, every other stack on a Debian base image made from Debian's
    /// archive (mmdebstrap) with Debian's packages. An image whose recipe is unchanged is
    /// reused. `stack_images = "local"` in stevedore.toml runs the stacks on them.
    BuildLocal {
        /// The stacks to build (names or aliases); default: every stack.
        names: Vec<String>,
        /// The static busybox to build from.
        #[arg(long, default_value = stevedore_engine::HOST_BUSYBOX)]
        busybox: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Create a project and a token for it; prints JSON.
    Create { name: String },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; prints JSON holding the secret, which is shown only this once.
    Create {
        /// The project the token belongs to (required for project tokens). A runner token
        /// with a project serves only that project's own clusters.
        #[arg(long)]
        project: Option<String>,
        #[arg(long, value_enum, default_value_t = Role::Project)]
        role: Role,
        /// A runner token serves only these clusters (repeat for several); without, every
        /// shared cluster (or, with --project, every cluster the project owns).
        #[arg(long = "cluster", value_name = "NAME")]
        clusters: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Role {
    Project,
    Runner,
    Admin,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server reports what it does; a client command only warnings, so its output stays
    // its own.
    let default_filter = match cli.command {
        Command::Serve { .. } | Command::Runner(_) | Command::Watchdog { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("STEVEDORE_LOG")
                .unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a log written to a file or a collector stays text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The command has already said how the task ended.
        Err(error) if error.downcast_ref::<TaskFailed>().is_some() => {
            ExitCode::from(EXIT_TASK_FAILED)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(data_dir) = cli.data_dir {
        settings.data_dir = data_dir;
    }
    let format = if cli.json {
        Format::Json
    } else {
        Format::Human
    };
    match cli.command {
        Command::Code {
            connection,
            command,
        } => {
            let ctx = Ctx::connect(&settings.data_dir, &connection, format)?;
            cmd::code::run(&ctx, &settings, command).await
        }
        Command::Task {
            connection,
            command,
        } => {
            let ctx = Ctx::connect(&settings.data_dir, &connection, format)?;
            cmd::task::run(&ctx, command).await
        }
        Command::Registry {
            connection,
            command,
        } => {
            let ctx = Ctx::connect(&settings.data_dir, &connection, format)?;
            cmd::registry::run(&ctx, command).await
        }
        Command::Schedule {
            connection,
            command,
        } => {
            let ctx = Ctx::connect(&settings.data_dir, &connection, format)?;
            cmd::schedule::run(&ctx, command).await
        }
        Command::Stack {
            connection,
            command: StackCommand::Ls,
        } => {
            let ctx = Ctx::connect(&settings.data_dir, &connection, format)?;
            cmd::stack_list(&ctx).await
        }
        Command::Usage { connection, args } => {
            let ctx = Ctx::connect(&settings.data_dir, &connection, format)?;
            cmd::usage::run(&ctx, args).await
        }
        Command::Run(args) => cmd::run::run(&settings, *args, format).await,
        Command::Gc(args) => {
            // Checked before the store is opened: a broken setting is the first thing said.
            settings.retention.policy()?;
            let store = open_store(&settings).await?;
            let stop = CancellationToken::new();
            let signal = shutdown_signal();
            let stopping = stop.clone();
            tokio::spawn(async move {
                signal.await;
                stopping.cancel();
            });
            cmd::gc::run(store.as_ref(), &settings, args, format, stop).await
        }
        Command::Runner(args) => remote_runner(settings, *args).await,
        Command::Watchdog {
            runner_id,
            ledger,
            engine,
        } => watchdog::run(runner_id, ledger, engine).await,
        Command::Serve {
            listen,
            database,
            engine,
        } => {
            if let Some(listen) = listen {
                settings.listen = listen;
            }
            if database.is_some() {
                settings.database = database;
            }
            if let Some(engine) = engine {
                settings.engine = engine;
            }
            serve(settings).await
        }
        Command::Project {
            command: ProjectCommand::Create { name },
        } => {
            let store = open_store(&settings).await?;
            let now = SystemClock.now();
            anyhow::ensure!(
                store.find_project_by_name(&name).await?.is_none(),
                "a project named {name:?} already exists"
            );
            let project = store.create_project(&name, now).await?;
            let token = auth::new_token_secret();
            store
                .create_token(
                    &NewToken {
                        project_id: Some(project.id.clone()),
                        role: TokenRole::Project,
                        clusters: None,
                    },
                    &auth::token_digest(&token),
                    now,
                )
                .await?;
            print_json(&serde_json::json!({"id": project.id, "name": project.name, "token": token}))
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    project,
                    role,
                    clusters,
                },
        } => {
            let store = open_store(&settings).await?;
            let role = match role {
                Role::Project => TokenRole::Project,
                Role::Runner => TokenRole::Runner,
                Role::Admin => TokenRole::Admin,
            };
            let project = match (role, project) {
                (TokenRole::Project, None) => anyhow::bail!("a project token needs --project ID"),
                (_, Some(project)) => Some(
                    store
                        .get_project(&project)
                        .await
                        .with_context(|| format!("project {project}"))?
                        .id,
                ),
                (_, None) => None,
            };
            let clusters =
                runner_token_clusters(store.as_ref(), role, project.as_deref(), clusters).await?;
            let token = auth::new_token_secret();
            let record = store
                .create_token(
                    &NewToken {
                        project_id: project,
                        role,
                        clusters,
                    },
                    &auth::token_digest(&token),
                    SystemClock.now(),
                )
                .await?;
            let role_name = format!("{role:?}").to_lowercase();
            print_json(&serde_json::json!({
                "id": record.id,
                "project_id": record.project_id,
                "role": role_name,
                "clusters": record.clusters,
                "token": token,
            }))
        }
        Command::Stack {
            command: StackCommand::BuildLocal { names, busybox },
            ..
        } => {
            let engine = connect_engine().await?;
            let built = build::build_local_stacks(&engine, &names, &busybox, true).await?;
            print_json(&serde_json::to_value(built)?)
        }
    }
}

/// The clusters a new token is limited to: only a runner token may be; a project's runner
/// token only to clusters that project owns.
async fn runner_token_clusters(
    store: &dyn Store,
    role: TokenRole,
    project: Option<&str>,
    clusters: Vec<String>,
) -> anyhow::Result<Option<Vec<String>>> {
    if clusters.is_empty() {
        return Ok(None);
    }
    anyhow::ensure!(
        role == TokenRole::Runner,
        "--cluster limits a runner token; a {} token serves no clusters",
        format!("{role:?}").to_lowercase()
    );
    for name in &clusters {
        stevedore_model::validation::check_name("--cluster", name)?;
        if let Some(project) = project {
            let own = store
                .find_cluster_by_name(Some(project), name)
                .await?
                .is_some_and(|cluster| cluster.project_id.as_deref() == Some(project));
            anyhow::ensure!(
                own,
                "project {project} has no cluster named {name:?} of its own (POST /2/clusters creates one)"
            );
        }
    }
    Ok(Some(clusters))
}

/// What runs the tasks of this process's runner, by the settings' `engine`, and how its
/// watchdog reaches the same containers.
async fn task_engine(
    settings: &Settings,
) -> anyhow::Result<(Arc<dyn ContainerEngine>, watchdog::WatchedEngine)> {
    match settings.engine {
        settings::EngineKind::Docker => {
            let engine = connect_engine().await?;
            let engine = if settings.task_network.holders {
                engine
            } else {
                engine.without_network_holders()
            };
            Ok((Arc::new(engine), watchdog::WatchedEngine::default()))
        }
        settings::EngineKind::Oci => {
            let oci = settings.oci_engine_settings()?;
            let watched = watchdog::WatchedEngine {
                engine: Some(settings::EngineKind::Oci),
                oci_root: Some(oci.runtime.state_root.clone()),
                oci_runtime: oci.runtime.runtime.clone(),
            };
            let engine = stevedore_engine::oci::OciEngine::start(oci)
                .await
                .context("the OCI engine cannot start (engine = \"oci\")")?;
            Ok((Arc::new(engine), watched))
        }
    }
}

/// The Docker engine, each request about a task's container timed in the metrics.
pub(crate) async fn connect_engine() -> anyhow::Result<DockerEngine> {
    let engine = DockerEngine::connect().await.context(
        "cannot reach the Docker engine (scripts/ensure-docker.sh installs and starts one; DOCKER_HOST points elsewhere)",
    )?;
    Ok(engine.observe_requests(Arc::new(|request, took| {
        stevedore_metrics::engine_request(request.as_str(), took);
    })))
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// PostgreSQL when `database` names it, else SQLite in the data directory.
async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(options) = settings.postgres_options()? {
        // The URL is not repeated: it may hold a password.
        let store = PgStore::connect(options)
            .await
            .context("cannot connect to the PostgreSQL database")?;
        return Ok(Arc::new(store.with_quota_defaults(settings.quotas)));
    }
    let options = settings.store_options()?;
    let store = SqliteStore::open(options).await.with_context(|| {
        format!(
            "cannot open the database in {}",
            settings.data_dir.display()
        )
    })?;
    Ok(Arc::new(store.with_quota_defaults(settings.quotas)))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let signal = shutdown_signal();
    let retention = settings.retention.config()?;
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            settings.data_dir.display()
        )
    })?;
    remove_upload_leftovers(&settings.upload_dir());
    // First, so that everything from the start is counted.
    stevedore_metrics::install()?;
    let store = open_store(&settings).await?;
    let credentials = Arc::new(credential_vault(&settings)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let address = listener.local_addr()?;
    let metrics_listener = match settings.metrics.listen {
        Some(metrics_address) => Some(
            TcpListener::bind(metrics_address)
                .await
                .with_context(|| format!("cannot listen on {metrics_address} for metrics"))?,
        ),
        None => None,
    };
    let host = match address.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        ip => ip.to_string(),
    };
    let shutdown = CancellationToken::new();
    let background = TaskTracker::new();
    let server_config = settings.server_config()?;
    // Wakes the runner protocol's waiting lease requests and the embedded runner (once it
    // exists) whenever work may have become available: tasks queued through this server,
    // fired schedules, and completions and requeues at the lease desk.
    let lease_wake = Arc::new(tokio::sync::Notify::new());
    let embedded_wake = Arc::new(std::sync::OnceLock::<WorkNotifier>::new());
    let on_enqueue: Option<EnqueueHook> = Some({
        let embedded_wake = embedded_wake.clone();
        Arc::new(move || {
            if let Some(wake) = embedded_wake.get() {
                wake.notify();
            }
        })
    });
    let desk = LeaseDesk::new(
        store.clone(),
        clock.clone(),
        credentials.clone(),
        AppState::lease_wake_hook(lease_wake.clone(), on_enqueue.clone()),
    );
    if settings.runner.enabled {
        let (engine, watched) = task_engine(&settings).await?;
        // Recorded like a runner leasing over HTTP, often enough to stay online in cluster
        // statistics while it polls, seldom enough that idle polls do not write every time.
        let source = Arc::new(
            embedded::DeskTaskSource::new(desk.clone())
                .announcing(server_config.runner_api.online_window / 4)
                .online_window(server_config.runner_api.online_window),
        );
        let identity = identity::runner_identity(
            &settings.data_dir,
            identity::RunnerKind::Embedded,
            settings.runner.id.clone(),
        )?;
        let mut config = settings.embedded_runner_config(&server_config.stacks)?;
        config.runner_id = identity.id.clone();
        let ledger = watchdog::ledger_dir(&settings.data_dir, &identity.id);
        config.lease_ledger = Some(ledger.clone());
        let runner = Runner::new(config, source.clone(), engine);
        // Set once, before anything could be queued through this server.
        let _ = embedded_wake.set(runner.work_notifier());
        let started = runner
            .start()
            .await
            .context("the embedded runner cannot start (set runner.enabled = false to serve the API without running tasks)")?;
        watchdog::ensure_watchdog(&identity.id, &ledger, &watched)?;
        source.set_capacity(started.capacity());
        let runner_shutdown = shutdown.child_token();
        background.spawn(async move {
            runner.run_started(started, runner_shutdown).await;
            // The id stays this process's until its runner has stopped.
            drop(identity);
        });
    }
    let duties = LeaderDuties {
        scheduler: SchedulerConfig {
            interval: Duration::from_millis(settings.scheduler_interval_ms.max(10)),
            ..SchedulerConfig::default()
        },
        rescuer: RescuerConfig {
            max_infra_attempts: settings.runner.max_infra_attempts,
            ..RescuerConfig::default()
        },
        retention,
        on_enqueue: Some(AppState::lease_wake_hook(
            lease_wake.clone(),
            on_enqueue.clone(),
        )),
        check_interval: leader::DEFAULT_CHECK_INTERVAL,
    };
    background.spawn(leader::run(
        store.clone(),
        clock.clone(),
        duties,
        shutdown.child_token(),
    ));
    background.close();
    // Written last: iron.json appearing means the server is ready, its runner started and
    // the leftovers of an earlier life removed.
    let iron = bootstrap::ensure_default_project(
        store.as_ref(),
        &settings.data_dir,
        &host,
        address.port(),
        clock.now(),
    )
    .await
    .context("cannot set up the default project")?;
    let state = AppState {
        store,
        clock,
        config: Arc::new(server_config),
        on_enqueue,
        lease_wake,
        credentials,
        desk,
        streams: Default::default(),
        recent: Default::default(),
    };
    if let Some(metrics_listener) = metrics_listener {
        tracing::info!(address = %metrics_listener.local_addr()?, "serving /metrics without a token");
        let router = stevedore_server::metrics::scrape_router(state.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(metrics_listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the metrics listener failed");
            }
        });
    }
    tracing::info!(
        %address,
        project_id = %iron.project_id,
        iron_json = %settings.data_dir.join("iron.json").display(),
        dashboard = %format!("http://{address}/ui/"),
        runner = settings.runner.enabled,
        "stevedore is serving"
    );
    let stop = shutdown.clone();
    stevedore_server::serve(listener, state, async move {
        signal.await;
        stop.cancel();
    })
    .await?;
    // The runner finishes or requeues its tasks within its grace period.
    background.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Removes the spooled uploads an earlier life of the server left behind when it stopped
/// half-way through one (a crash, a kill): `upload-*` files older than an hour, so that a
/// server sharing the directory loses no upload in progress.
fn remove_upload_leftovers(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60 * 60);
    for entry in entries.flatten() {
        let leftover = entry.file_name().to_string_lossy().starts_with("upload-")
            && entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .is_ok_and(|modified| modified < hour_ago);
        if leftover && let Err(error) = std::fs::remove_file(entry.path()) {
            tracing::warn!(%error, path = %entry.path().display(), "cannot remove a leftover upload");
        }
    }
}

/// The vault for projects' registry passwords, with the configured key (or the data
/// directory's key file, created on the first start).
fn credential_vault(settings: &Settings) -> anyhow::Result<CredentialVault> {
    let (key, source) = secrets::credential_key(settings)?;
    match &source {
        secrets::KeySource::Setting => {
            tracing::info!(key_id = %key.id(), "registry credentials sealed with the configured key");
        }
        secrets::KeySource::File(path) | secrets::KeySource::Created(path) => {
            tracing::info!(
                key_id = %key.id(),
                key_file = %path.display(),
                created = matches!(source, secrets::KeySource::Created(_)),
                "registry credentials sealed with the key file's key"
            );
            if settings.postgres_options()?.is_some() && settings.credential_key_file.is_none() {
                tracing::warn!(
                    key_file = %path.display(),
                    "servers sharing this PostgreSQL database must share one credential key: \
                     set credential_key (STEVEDORE_CREDENTIAL_KEY) or credential_key_file to \
                     the same key on every server, or they cannot read each other's registry \
                     credentials"
                );
            }
        }
    }
    Ok(CredentialVault::new(&key))
}

/// `stevedore runner`: the runner of `serve`, leasing over HTTP instead of from the store.
async fn remote_runner(settings: Settings, args: RunnerArgs) -> anyhow::Result<()> {
    let signal = shutdown_signal();
    let mut config = settings.runner_config(&settings.stack_table()?)?;
    let identity = identity::runner_identity(
        &settings.data_dir,
        identity::RunnerKind::Remote,
        args.id.or_else(|| settings.runner.id.clone()),
    )?;
    config.runner_id = identity.id.clone();
    let ledger = watchdog::ledger_dir(&settings.data_dir, &identity.id);
    config.lease_ledger = Some(ledger.clone());
    if !args.clusters.is_empty() {
        config.clusters = args.clusters;
    }
    if args.capacity.is_some() {
        config.capacity = args.capacity;
    }
    let mut settings = settings;
    if let Some(engine) = args.engine {
        settings.engine = engine;
    }
    // The server holds a lease request until there is work, so the runner need not poll.
    config.idle_poll_interval = Duration::from_millis(250);
    let shutdown = CancellationToken::new();
    if let Some(address) = args.metrics_listen {
        serve_runner_metrics(address, shutdown.clone()).await?;
    }
    let source = Arc::new(remote::RemoteTaskSource::new(
        remote::RemoteOptions::new(&args.api, &args.token),
        shutdown.clone(),
    )?);
    source
        .probe(&config.runner_id, &config.clusters)
        .await
        .context("the runner cannot start")?;
    let (engine, watched) = task_engine(&settings).await?;
    let runner_id = config.runner_id.clone();
    let runner = Runner::new(config, source.clone(), engine);
    let started = runner.start().await.context("the runner cannot start")?;
    watchdog::ensure_watchdog(&runner_id, &ledger, &watched)?;
    source.set_capacity(started.capacity());
    tracing::info!(api = %args.api, %runner_id, "runner leasing from the server");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        stop.cancel();
    });
    runner.run_started(started, shutdown).await;
    Ok(())
}

/// Serves the remote runner's own `/metrics` on `address` until `shutdown`. Binds before it
/// returns, so a taken address stops the runner before it leases anything.
async fn serve_runner_metrics(
    address: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    stevedore_metrics::install()?;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for metrics"))?;
    tracing::info!(address = %listener.local_addr()?, "serving the runner's metrics");
    tokio::spawn(async move {
        let served = axum::serve(listener, stevedore_server::metrics::exporter_router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the metrics listener failed");
        }
    });
    Ok(())
}

/// This machine's name, for a default runner id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "runner".to_owned())
}

/// Registers for SIGINT and SIGTERM at once and returns a future that resolves at the first
/// of them. Registered before the process says it is ready, so a signal sent right after that
/// stops it cleanly instead of killing it the default way.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                (Ok(mut only), Err(_)) | (Err(_), Ok(mut only)) => {
                    only.recv().await;
                }
                (Err(_), Err(_)) => std::future::pending::<()>().await,
            }
            tracing::info!("shutting down");
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        }
    }
}
