//! Where the client commands find the server and their credentials, the way IronWorker's own
//! tools do. Each source overrides the ones before it:
//!
//! 1. defaults: `http://127.0.0.1:8080`;
//! 2. `iron.json` in stevedore's data directory, which `stevedore serve` writes;
//! 3. `~/.iron.json`;
//! 4. `IRON_*` environment variables, then `IRON_WORKER_*`;
//! 5. `./iron.json`;
//! 6. the file named by `--iron-json`;
//! 7. flags: `--host`, `--port`, `--protocol`, `--project-id`, `--token`.
//!
//! In a file, the keys of an `"iron_worker": {...}` object override the top-level ones.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Map, Value};

/// The connection settings of the client commands.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    pub protocol: String,
    pub host: String,
    pub port: Option<u16>,
    pub project_id: Option<String>,
    pub token: Option<String>,
    /// Where each setting came from, for error messages.
    pub sources: Vec<String>,
}

/// What the command line says about the connection.
#[derive(Debug, Clone, Default)]
pub struct ClientFlags {
    pub iron_json: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    pub project_id: Option<String>,
    pub token: Option<String>,
}

const KEYS: [&str; 6] = [
    "host",
    "port",
    "protocol",
    "project_id",
    "token",
    "api_version",
];

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            protocol: "http".to_owned(),
            host: "127.0.0.1".to_owned(),
            port: Some(8080),
            project_id: None,
            token: None,
            sources: Vec::new(),
        }
    }
}

impl ClientConfig {
    /// Reads every source in order. `env` is the process environment, passed in for tests.
    pub fn discover(
        data_dir: &Path,
        home: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &ClientFlags,
    ) -> anyhow::Result<Self> {
        let mut config = ClientConfig::default();
        config.merge_file_if_exists(&data_dir.join("iron.json"))?;
        if let Some(home) = home {
            config.merge_file_if_exists(&home.join(".iron.json"))?;
        }
        for prefix in ["IRON_", "IRON_WORKER_"] {
            for key in KEYS {
                let name = format!("{prefix}{}", key.to_ascii_uppercase());
                if let Some(value) = env(&name).filter(|value| !value.is_empty()) {
                    config.set(key, &Value::String(value), &name)?;
                }
            }
        }
        config.merge_file_if_exists(Path::new("iron.json"))?;
        if let Some(path) = &flags.iron_json {
            anyhow::ensure!(path.exists(), "{} does not exist", path.display());
            config.merge_file(path)?;
        }
        let flag_values = [
            ("host", flags.host.clone().map(Value::String)),
            ("port", flags.port.map(Value::from)),
            ("protocol", flags.protocol.clone().map(Value::String)),
            ("project_id", flags.project_id.clone().map(Value::String)),
            ("token", flags.token.clone().map(Value::String)),
        ];
        for (key, value) in flag_values {
            if let Some(value) = value {
                config.set(key, &value, &format!("--{}", key.replace('_', "-")))?;
            }
        }
        Ok(config)
    }

    /// The API's base URL, without a trailing slash.
    pub fn base_url(&self) -> String {
        match self.port {
            Some(port) => format!("{}://{}:{port}", self.protocol, self.host),
            None => format!("{}://{}", self.protocol, self.host),
        }
    }

    /// The project id and token, or an error that says how to provide them.
    pub fn credentials(&self) -> anyhow::Result<(&str, &str)> {
        const HOW: &str = "run the command where `stevedore serve` keeps its data (it writes \
            stevedore-data/iron.json; see --data-dir), put an iron.json in this directory, set \
            IRON_PROJECT_ID and IRON_TOKEN, or pass --project-id and --token";
        let project_id = self
            .project_id
            .as_deref()
            .with_context(|| format!("no project id is configured: {HOW}"))?;
        let token = self
            .token
            .as_deref()
            .with_context(|| format!("no token is configured: {HOW}"))?;
        Ok((project_id, token))
    }

    fn merge_file_if_exists(&mut self, path: &Path) -> anyhow::Result<()> {
        if path.is_file() {
            self.merge_file(path)?;
        }
        Ok(())
    }

    fn merge_file(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let Value::Object(top) = value else {
            anyhow::bail!("{} must hold a JSON object", path.display());
        };
        let source = path.display().to_string();
        self.merge_object(&top, &source)?;
        if let Some(Value::Object(worker)) = top.get("iron_worker") {
            self.merge_object(worker, &source)?;
        }
        Ok(())
    }

    fn merge_object(&mut self, object: &Map<String, Value>, source: &str) -> anyhow::Result<()> {
        for key in KEYS {
            if let Some(value) = object.get(key).filter(|value| !value.is_null()) {
                self.set(key, value, source)?;
            }
        }
        Ok(())
    }

    fn set(&mut self, key: &str, value: &Value, source: &str) -> anyhow::Result<()> {
        let text = match value {
            Value::String(text) => text.clone(),
            Value::Number(number) => number.to_string(),
            other => anyhow::bail!("{key} in {source} must be a string, not {other}"),
        };
        match key {
            "host" => self.host = text,
            "port" => {
                self.port = Some(text.parse().with_context(|| {
                    format!("port in {source} must be a number from 1 to 65535, not {text:?}")
                })?);
            }
            "protocol" => {
                anyhow::ensure!(
                    text == "http" || text == "https",
                    "protocol in {source} must be \"http\" or \"https\", not {text:?}"
                );
                self.protocol = text;
            }
            // IronWorker's tools write it as a number or a string; this client speaks v2 only.
            "api_version" => anyhow::ensure!(
                text == "2",
                "api_version in {source} must be 2 (the IronWorker API v2), not {text:?}"
            ),
            "project_id" => self.project_id = Some(text),
            "token" => self.token = Some(text),
            _ => {}
        }
        self.sources.push(format!("{key} from {source}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn later_sources_override_earlier_ones() {
        let data = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            data.path().join("iron.json"),
            r#"{"project_id":"p-data","token":"t-data","host":"10.0.0.1","port":9000,"protocol":"http"}"#,
        )
        .unwrap();
        std::fs::write(
            home.path().join(".iron.json"),
            r#"{"token":"t-home","iron_worker":{"host":"worker.example"}}"#,
        )
        .unwrap();
        let env = |name: &str| (name == "IRON_WORKER_PORT").then(|| "9100".to_owned());
        let flags = ClientFlags {
            project_id: Some("p-flag".into()),
            ..ClientFlags::default()
        };
        let config = ClientConfig::discover(data.path(), Some(home.path()), &env, &flags).unwrap();
        assert_eq!(config.base_url(), "http://worker.example:9100");
        assert_eq!(config.credentials().unwrap(), ("p-flag", "t-home"));
    }

    #[test]
    fn missing_credentials_say_how_to_provide_them() {
        let data = tempfile::tempdir().unwrap();
        let config =
            ClientConfig::discover(data.path(), None, &no_env, &ClientFlags::default()).unwrap();
        assert_eq!(config.base_url(), "http://127.0.0.1:8080");
        let error = config.credentials().unwrap_err().to_string();
        assert!(error.contains("IRON_PROJECT_ID"), "{error}");
    }

    #[test]
    fn api_version_is_read_as_a_number_or_a_string() {
        for text in [
            r#"{"project_id":"p","token":"t","api_version":2}"#,
            r#"{"project_id":"p","token":"t","api_version":"2"}"#,
        ] {
            let data = tempfile::tempdir().unwrap();
            std::fs::write(data.path().join("iron.json"), text).unwrap();
            let config =
                ClientConfig::discover(data.path(), None, &no_env, &ClientFlags::default())
                    .unwrap();
            assert_eq!(config.credentials().unwrap(), ("p", "t"), "{text}");
        }
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("iron.json"), r#"{"api_version":"3"}"#).unwrap();
        let error = ClientConfig::discover(data.path(), None, &no_env, &ClientFlags::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("api_version"), "{error}");
    }

    #[test]
    fn bad_values_are_named_with_their_source() {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("iron.json"), r#"{"port":"eighty"}"#).unwrap();
        let error = ClientConfig::discover(data.path(), None, &no_env, &ClientFlags::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("iron.json") && error.contains("eighty"),
            "{error}"
        );
    }
}
