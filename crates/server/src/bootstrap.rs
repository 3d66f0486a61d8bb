//! First start: make sure project `default` exists with a token, and write `iron.json`, the
//! file IronWorker's clients read, so they work against this server as they are.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stevedore_model::Timestamp;
use stevedore_store::{NewToken, Store, StoreError, TokenRole};

use crate::auth::{new_token_secret, token_digest};

/// The name of the project made on first start.
pub const DEFAULT_PROJECT: &str = "default";

/// IronWorker's client configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IronJson {
    pub project_id: String,
    pub token: String,
    pub host: String,
    pub port: u16,
    pub protocol: String,
    /// `protocol` again, under the name IronWorker's Node client (`iron_core` 0.2) reads: it
    /// knows no `protocol` and would otherwise speak HTTPS to this plain-HTTP server.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// A string (`"2"`): IronWorker's Go client (iron_go3, under the `iron` CLI) reads every
    /// setting but `port` as a string and cannot start on a number. Files written by earlier
    /// versions hold the number, and are read either way.
    #[serde(deserialize_with = "string_or_number")]
    pub api_version: String,
}

/// The API version `iron.json` names.
pub const API_VERSION: &str = "2";

fn string_or_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrNumber {
        String(String),
        Number(serde_json::Number),
    }
    Ok(match StringOrNumber::deserialize(deserializer)? {
        StringOrNumber::String(text) => text,
        StringOrNumber::Number(number) => number.to_string(),
    })
}

fn default_scheme() -> String {
    "http".to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Returns the `iron.json` for this data directory, creating the default project and a token
/// on first start. Later starts reuse the file as long as its token is still valid.
pub async fn ensure_default_project(
    store: &dyn Store,
    data_dir: &Path,
    host: &str,
    port: u16,
    now: Timestamp,
) -> Result<IronJson, BootstrapError> {
    let path = data_dir.join("iron.json");
    if let Some(existing) = read_iron_json(&path) {
        let valid = store
            .find_token(&token_digest(&existing.token))
            .await?
            .is_some_and(|token| token.project_id.as_deref() == Some(existing.project_id.as_str()));
        if valid {
            let iron = IronJson {
                host: host.to_owned(),
                port,
                scheme: existing.protocol.clone(),
                api_version: API_VERSION.to_owned(),
                ..existing
            };
            write_iron_json(&path, &iron)?;
            return Ok(iron);
        }
    }
    let project = match store.find_project_by_name(DEFAULT_PROJECT).await? {
        Some(project) => project,
        None => store.create_project(DEFAULT_PROJECT, now).await?,
    };
    let token = new_token_secret();
    store
        .create_token(
            &NewToken {
                project_id: Some(project.id.clone()),
                role: TokenRole::Project,
                clusters: None,
            },
            &token_digest(&token),
            now,
        )
        .await?;
    let iron = IronJson {
        project_id: project.id,
        token,
        host: host.to_owned(),
        port,
        protocol: "http".to_owned(),
        scheme: "http".to_owned(),
        api_version: API_VERSION.to_owned(),
    };
    write_iron_json(&path, &iron)?;
    Ok(iron)
}

fn read_iron_json(path: &Path) -> Option<IronJson> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_iron_json(path: &Path, iron: &IronJson) -> Result<(), BootstrapError> {
    let write_error = |source| BootstrapError::Write {
        path: path.to_owned(),
        source,
    };
    let mut text = serde_json::to_string_pretty(iron).map_err(|error| write_error(error.into()))?;
    text.push('\n');
    // Write beside and rename, so a crash never leaves a half-written file. The file holds a
    // token: it is created readable by its owner only, never wider for a moment.
    let temporary = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = owner_only()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .map_err(write_error)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(write_error)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(write_error)
}

#[cfg(unix)]
fn owner_only() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.mode(0o600);
    options
}

#[cfg(not(unix))]
fn owner_only() -> std::fs::OpenOptions {
    std::fs::OpenOptions::new()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn api_version_is_written_as_a_string_and_read_in_either_form() {
        let iron = IronJson {
            project_id: "p".into(),
            token: "t".into(),
            host: "127.0.0.1".into(),
            port: 8080,
            protocol: "http".into(),
            scheme: "http".into(),
            api_version: API_VERSION.into(),
        };
        let json = serde_json::to_value(&iron).unwrap();
        assert_eq!(json["api_version"], serde_json::json!("2"));
        assert_eq!(json["port"], serde_json::json!(8080));
        let old = r#"{"project_id":"p","token":"t","host":"h","port":1,"protocol":"http","api_version":2}"#;
        let read: IronJson = serde_json::from_str(old).unwrap();
        assert_eq!(read.api_version, "2");
        let new: IronJson = serde_json::from_str(&json.to_string()).unwrap();
        assert_eq!(new, iron);
    }

    #[cfg(unix)]
    #[test]
    fn iron_json_is_created_readable_by_its_owner_only_over_a_leftover() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iron.json");
        // A leftover of a crash, world-readable, is not reused.
        std::fs::write(path.with_extension("json.tmp"), "old").unwrap();
        std::fs::set_permissions(
            path.with_extension("json.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let iron = IronJson {
            project_id: "p".into(),
            token: "t".into(),
            host: "127.0.0.1".into(),
            port: 8080,
            protocol: "http".into(),
            scheme: "http".into(),
            api_version: API_VERSION.into(),
        };
        write_iron_json(&path, &iron).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_iron_json(&path), Some(iron));
    }
}
