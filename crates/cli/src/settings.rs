//! Settings of `stevedore serve` and the admin commands: defaults, then a TOML file, then
//! `STEVEDORE_*` environment variables, then command-line flags — each overriding the last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use stevedore_model::{Stack, limits};
use stevedore_server::ServerConfig;
use stevedore_store::{SqliteOptions, SyncMode};

/// Everything configurable, as read from files and the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Where the server listens.
    pub listen: SocketAddr,
    /// Where the database and `iron.json` live.
    pub data_dir: PathBuf,
    /// `normal` survives a crash of the process; `full` also a power failure.
    pub sync: String,
    pub max_payload_bytes: usize,
    pub max_package_bytes: usize,
    pub max_unpacked_bytes: u64,
    pub min_run_every_secs: u32,
    pub stacks: Vec<Stack>,
}

impl Default for Settings {
    fn default() -> Self {
        let server = ServerConfig::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("stevedore-data"),
            sync: "normal".to_owned(),
            max_payload_bytes: limits::DEFAULT_MAX_PAYLOAD_BYTES,
            max_package_bytes: server.package.max_bytes,
            max_unpacked_bytes: server.package.max_unpacked_bytes,
            min_run_every_secs: limits::DEFAULT_MIN_RUN_EVERY_SECS,
            stacks: Stack::defaults(),
        }
    }
}

impl Settings {
    /// Reads defaults, the file (when given or when `stevedore.toml` exists here) and the
    /// environment.
    pub fn load(config_file: Option<&Path>) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match config_file {
            Some(path) => {
                anyhow::ensure!(
                    path.exists(),
                    "the configuration file {} does not exist",
                    path.display()
                );
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file("stevedore.toml")),
        }
        figment
            .merge(Env::prefixed("STEVEDORE_").only(&[
                "listen",
                "data_dir",
                "sync",
                "max_payload_bytes",
                "max_package_bytes",
                "max_unpacked_bytes",
                "min_run_every_secs",
            ]))
            .extract()
            .context("invalid configuration")
    }

    pub fn store_options(&self) -> anyhow::Result<SqliteOptions> {
        let sync = match self.sync.as_str() {
            "normal" => SyncMode::Normal,
            "full" => SyncMode::Full,
            other => anyhow::bail!("sync must be \"normal\" or \"full\", not {other:?}"),
        };
        Ok(SqliteOptions {
            path: self.data_dir.join("stevedore.db"),
            sync,
        })
    }

    pub fn server_config(&self) -> ServerConfig {
        let mut config = ServerConfig {
            max_payload_bytes: self.max_payload_bytes,
            min_run_every_secs: self.min_run_every_secs,
            stacks: self.stacks.clone(),
            ..ServerConfig::default()
        };
        config.package.max_bytes = self.max_package_bytes;
        config.package.max_unpacked_bytes = self.max_unpacked_bytes;
        config
    }
}
