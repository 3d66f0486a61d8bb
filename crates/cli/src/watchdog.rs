//! The watchdog process beside a runner (`stevedore watchdog`, started by `serve` and
//! `stevedore runner`, never by hand): it outlives the runner process and stops the runner's
//! containers once their leases surely ended, so a runner killed with SIGKILL leaves no task
//! running twice. What it does is `stevedore_runner::watchdog`; this is how it is started.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use stevedore_engine::oci::{OciRuntime, OciSettings, UnpackedImage, UnpackedImages};
use stevedore_engine::{ContainerRuntime, EngineError};
use stevedore_runner::watchdog::Watchdog;
use tokio_util::sync::CancellationToken;

/// How often the watchdog looks at the runner's containers.
const INTERVAL: Duration = Duration::from_secs(1);
/// How long before a lease's recorded end the watchdog stops the container of a runner that
/// is gone: more than `INTERVAL`, so the container is stopped before the lease ends.
const LEAD: Duration = Duration::from_secs(2);

/// The lease ledger of runner `runner_id` in `data_dir`.
pub fn ledger_dir(data_dir: &Path, runner_id: &str) -> PathBuf {
    let name: String = runner_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let dir = data_dir.join("leases").join(name);
    // Absolute: the path names the ledger on the containers' labels.
    std::path::absolute(&dir).unwrap_or(dir)
}

/// How the watchdog reaches the runner's containers: the Docker engine unless it is told the
/// OCI engine's root (its containers' bundles).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WatchedEngine {
    #[arg(long, value_enum)]
    pub engine: Option<crate::settings::EngineKind>,
    /// The OCI engine's root.
    #[arg(long)]
    pub oci_root: Option<PathBuf>,
    /// The OCI runtime binary.
    #[arg(long)]
    pub oci_runtime: Option<PathBuf>,
}

impl WatchedEngine {
    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        if self.engine == Some(crate::settings::EngineKind::Oci) {
            args.push("--engine".into());
            args.push("oci".into());
        }
        for (flag, value) in [
            ("--oci-root", &self.oci_root),
            ("--oci-runtime", &self.oci_runtime),
        ] {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value.clone().into_os_string());
            }
        }
        args
    }

    /// The runtime: on OCI one over the same bundles that creates nothing (it has no
    /// images and takes no network namespaces; the runner's next start returns those).
    async fn connect(&self) -> anyhow::Result<Arc<dyn ContainerRuntime>> {
        if self.engine != Some(crate::settings::EngineKind::Oci) {
            return Ok(Arc::new(crate::connect_engine().await?));
        }
        let state_root = self
            .oci_root
            .clone()
            .context("the watchdog of an OCI runner needs --oci-root")?;
        let runtime = OciRuntime::new(
            Arc::new(NoImages),
            None,
            OciSettings {
                state_root,
                runtime: self.oci_runtime.clone(),
            },
        )
        .await
        .context("cannot open the OCI engine's containers")?;
        Ok(Arc::new(runtime))
    }
}

/// The images of a runtime that only stops containers.
struct NoImages;

#[async_trait::async_trait]
impl UnpackedImages for NoImages {
    async fn unpacked(&self, _reference: &str) -> Result<Option<UnpackedImage>, EngineError> {
        Ok(None)
    }
}

/// Starts the watchdog of the ledger `ledger` unless one watches it already (an earlier
/// life's, still stopping what that life left). Its own process group: a Ctrl-C meant for
/// the runner does not stop it, and it ends by itself once the runner and its containers are
/// gone.
pub fn ensure_watchdog(
    runner_id: &str,
    ledger: &Path,
    engine: &WatchedEngine,
) -> anyhow::Result<()> {
    if Watchdog::is_watched(ledger)
        .with_context(|| format!("cannot open the lease ledger {}", ledger.display()))?
    {
        return Ok(());
    }
    let binary =
        std::env::current_exe().context("cannot find this program to start its watchdog")?;
    // Its own log, beside the ledger: it outlives whatever reads the runner's output.
    let log_path = ledger.join("watchdog.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the watchdog's log {}", log_path.display()))?;
    let mut command = Command::new(binary);
    command
        .args(["watchdog", "--runner-id", runner_id, "--ledger"])
        .arg(ledger)
        .args(engine.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command
        .spawn()
        .context("cannot start the runner's watchdog")?;
    tracing::debug!(pid = child.id(), "started the runner's watchdog");
    // Reaped when it ends, so it leaves no zombie behind while this process lives.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// `stevedore watchdog`: watches until the runner is gone and nothing of it is left.
pub async fn run(runner_id: String, ledger: PathBuf, engine: WatchedEngine) -> anyhow::Result<()> {
    let Some(_claim) = Watchdog::claim(&ledger)
        .with_context(|| format!("cannot open the lease ledger {}", ledger.display()))?
    else {
        tracing::debug!("another watchdog watches this ledger");
        return Ok(());
    };
    let engine = engine.connect().await?;
    let watchdog = Watchdog {
        runner_id,
        ledger_dir: ledger,
        interval: INTERVAL,
        lead: LEAD,
    };
    watchdog.run(engine, CancellationToken::new()).await;
    Ok(())
}
