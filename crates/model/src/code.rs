//! Codes: named worker definitions with revisions. A task pins the revision that was current
//! when it was queued, so pushing a new revision never changes what a queued task runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::limits::*;
use crate::retry::RetriesBackoff;
use crate::validation::{ValidationError, check_name, check_range};

/// What a code runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CodeKind {
    /// A Docker image, run with `sh -c command` when a command is set, else with the image's
    /// own entrypoint and cmd.
    Image {
        image: String,
        command: Option<String>,
    },
    /// A zip package: `file_name` is the entry point inside the zip, launched as `runtime`
    /// says on the image of `stack`.
    Runtime {
        runtime: String,
        file_name: String,
        /// The stack resolved when the revision was pushed (see [`crate::stack`]); absent from
        /// revisions stored before stacks were resolved, which run on their runtime's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stack: Option<String>,
    },
}

/// Resource limits of a task's container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Seconds from container start until the task is killed and ends `timeout`.
    pub timeout_secs: u32,
    /// Memory and memory+swap limit, MiB.
    pub memory_mib: u32,
    /// CPU quota in cores; `None` leaves the CPU unrestricted.
    pub cpus: Option<f64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: None,
        }
    }
}

/// A validated code definition, as pushed by a user. Becomes one revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeSpec {
    pub name: String,
    pub kind: CodeKind,
    pub env_vars: BTreeMap<String, String>,
    /// Handed to the task as the file behind `CONFIG_FILE`, verbatim.
    pub config: Option<String>,
    /// The most tasks of this code alive at once across all runners; `None` is unlimited.
    pub max_concurrency: Option<u32>,
    /// User retries of a task that ends `error` or `timeout`.
    pub retries: u32,
    /// Seconds from a failed task's end until its retry is due (the first retry's delay
    /// under exponential backoff).
    pub retries_delay_secs: u32,
    /// How the delay grows from one retry to the next. Absent from specs stored before it
    /// existed, which read as `fixed`.
    #[serde(default)]
    pub retries_backoff: RetriesBackoff,
    pub default_priority: u8,
    pub limits: Limits,
    /// The network the task's container is on: `bridge` (the default, IronWorker's name),
    /// which is the operator's isolated task network, `none`, or a network the operator
    /// lists by name (checked at upload against that list, see [`check_network`]).
    pub network: String,
}

/// One stored revision of a code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeRevision {
    pub id: String,
    pub project_id: String,
    pub rev: u32,
    pub spec: CodeSpec,
    /// SHA-256 of the zip package, when there is one.
    pub package_sha256: Option<String>,
    pub package_size: Option<u64>,
    /// When the code was first created.
    pub created_at: Timestamp,
    /// When this revision was pushed.
    pub updated_at: Timestamp,
    /// Whether the code's task queue is paused: queued tasks wait, nothing is leased.
    pub paused: bool,
}

/// Environment variables that belong to the in-container contract; a code may not set them.
pub const RESERVED_ENV_VARS: [&str; 4] = ["TASK_ID", "TASK_DIR", "PAYLOAD_FILE", "CONFIG_FILE"];

/// The network every code may choose: `bridge` (IronWorker's name for the default network),
/// which runs on the operator's isolated task network, and `none`. Others are accepted only
/// where the operator lists them ([`check_network`]); `host` never, as it would give user
/// code the runner's own network.
pub const NETWORK_MODES: [&str; 2] = [DEFAULT_NETWORK, NO_NETWORK];

/// A code's network by default: the operator's isolated task network.
pub const DEFAULT_NETWORK: &str = "bridge";

/// No network at all: only a loopback interface.
pub const NO_NETWORK: &str = "none";

/// Checks that `network` is one a code may use: [`NETWORK_MODES`] or one of the operator's
/// `named` networks. The error names every allowed value.
pub fn check_network(network: &str, named: &[String]) -> Result<(), ValidationError> {
    if NETWORK_MODES.contains(&network) || named.iter().any(|name| name == network) {
        return Ok(());
    }
    let allowed: Vec<&str> = NETWORK_MODES
        .into_iter()
        .chain(named.iter().map(String::as_str))
        .collect();
    Err(ValidationError::new(
        "network",
        format!("must be one of {allowed:?}, got {network:?}"),
    ))
}

/// Whether `network` could name a network at all: what a stored code may hold whatever the
/// operator lists today. `host` and another container's network are never one.
fn check_network_name(network: &str) -> Result<(), ValidationError> {
    let plausible = !network.is_empty()
        && network.len() <= 128
        && network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && network != "host";
    if plausible {
        Ok(())
    } else {
        Err(ValidationError::new(
            "network",
            format!("{network:?} is not a network a task may use"),
        ))
    }
}

impl CodeRevision {
    /// Whether the revision came with a zip package (a runtime code's, or one shipped beside
    /// an image).
    pub fn has_package(&self) -> bool {
        self.package_sha256.is_some() || self.package_size.is_some()
    }
}

impl CodeSpec {
    /// Checks every field; the first problem found is reported.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        match &self.kind {
            CodeKind::Image { image, command } => {
                check_image_reference(image)?;
                if command
                    .as_ref()
                    .is_some_and(|command| command.trim().is_empty())
                {
                    return Err(ValidationError::new(
                        "command",
                        "must not be empty when given",
                    ));
                }
            }
            CodeKind::Runtime {
                runtime, file_name, ..
            } => {
                check_name("runtime", runtime)?;
                check_package_path("file_name", file_name)?;
            }
        }
        for key in self.env_vars.keys() {
            check_env_name(key)?;
        }
        if let Some(max) = self.max_concurrency {
            check_range("max_concurrency", i64::from(max), 1, 100_000)?;
        }
        check_range(
            "retries",
            i64::from(self.retries),
            0,
            i64::from(MAX_RETRIES),
        )?;
        check_range(
            "retries_delay",
            i64::from(self.retries_delay_secs),
            0,
            i64::from(MAX_RETRIES_DELAY_SECS),
        )?;
        check_range(
            "default_priority",
            i64::from(self.default_priority),
            0,
            i64::from(MAX_PRIORITY),
        )?;
        check_range(
            "timeout",
            i64::from(self.limits.timeout_secs),
            1,
            i64::from(MAX_TIMEOUT_SECS),
        )?;
        check_range(
            "memory",
            i64::from(self.limits.memory_mib),
            i64::from(MIN_MEMORY_MIB),
            i64::from(MAX_MEMORY_MIB),
        )?;
        if let Some(cpus) = self.limits.cpus
            && !(0.01..=MAX_CPUS).contains(&cpus)
        {
            return Err(ValidationError::new(
                "cpus",
                format!("must be between 0.01 and {MAX_CPUS}, got {cpus}"),
            ));
        }
        check_network_name(&self.network)?;
        Ok(())
    }
}

/// A Docker image reference: `[registry/]name[:tag][@digest]`, lowercase repository path.
pub fn check_image_reference(image: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| {
        Err(ValidationError::new(
            "image",
            format!("{image:?} is not a valid image reference: {why}"),
        ))
    };
    if image.is_empty() {
        return bad("it is empty");
    }
    if image.len() > 512 {
        return bad("it is longer than 512 bytes");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it contains white space");
    }
    let (name, digest) = image.split_once('@').unwrap_or((image, ""));
    // A tag follows the last ':' that comes after the last '/', so `host:5000/app` has none.
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (path, tagged) = match name[last_slash..].split_once(':') {
        Some((base, tag)) => {
            if tag.is_empty() || tag.len() > 128 {
                return bad("its tag is empty or too long");
            }
            (&name[..last_slash + base.len()], true)
        }
        None => (name, false),
    };
    // Docker reads `sha256:<hex>`, and a bare hex name it has no image of, as (a prefix of)
    // the id of any image on the runner, whoever's it is.
    if path == "sha256" {
        return bad("it is an image id; name the image by repository and tag or digest");
    }
    if !tagged
        && digest.is_empty()
        && path
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return bad(&format!(
            "Docker would read it as the id of an image on the runner; add a tag ({image}:latest)"
        ));
    }
    if path.is_empty() || path.starts_with('/') || path.ends_with('/') || path.contains("//") {
        return bad("its repository path is malformed");
    }
    let repository = match path.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest
        }
        _ => path,
    };
    if repository
        .chars()
        .any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c)))
    {
        return bad(
            "a repository name may hold only lowercase letters, digits, '.', '_', '-' and '/'",
        );
    }
    Ok(())
}

/// A relative path inside a code package: no absolute paths, no `..`, no empty segments.
pub fn check_package_path(field: &str, path: &str) -> Result<(), ValidationError> {
    if path.is_empty() || path.len() > 1024 {
        return Err(ValidationError::new(
            field,
            "must be a path of 1 to 1024 bytes",
        ));
    }
    if path.starts_with('/') || path.starts_with('\\') || path.contains('\0') {
        return Err(ValidationError::new(
            field,
            format!("{path:?} must be a relative path"),
        ));
    }
    if path.split(['/', '\\']).any(|segment| segment == "..") {
        return Err(ValidationError::new(
            field,
            format!("{path:?} must not contain '..'"),
        ));
    }
    Ok(())
}

fn check_env_name(key: &str) -> Result<(), ValidationError> {
    let field = format!("env_vars.{key}");
    let mut chars = key.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(ValidationError::new(
            field,
            "an environment variable name must match [A-Za-z_][A-Za-z0-9_]*",
        ));
    }
    if RESERVED_ENV_VARS.contains(&key) {
        return Err(ValidationError::new(
            field,
            "is set by stevedore for every task and cannot be overridden",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_spec(image: &str) -> CodeSpec {
        CodeSpec {
            name: "hello".into(),
            kind: CodeKind::Image {
                image: image.into(),
                command: Some("echo hi".into()),
            },
            env_vars: BTreeMap::new(),
            config: None,
            max_concurrency: None,
            retries: 0,
            retries_delay_secs: DEFAULT_RETRIES_DELAY_SECS,
            retries_backoff: RetriesBackoff::Fixed,
            default_priority: 0,
            limits: Limits::default(),
            network: "bridge".into(),
        }
    }

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "stevedore/busybox:local",
            "registry.example.com:5000/team/app:1.2",
            "localhost/app@sha256:abc",
            "library/ubuntu:22.04",
            "cafe:latest",
            "team/cafe",
            "cafe@sha256:abc",
        ] {
            assert!(check_image_reference(good).is_ok(), "{good}");
        }
        for bad in ["", "Busybox", "a b", "app:", "/app", "app//x", "app/"] {
            assert!(check_image_reference(bad).is_err(), "{bad}");
        }
        // What Docker would take for the id of whatever image the runner has.
        for id in [
            "681c",
            "681c4496748f",
            "cafe",
            "sha256:681c4496748f",
            "sha256:x",
        ] {
            let refused = check_image_reference(id).unwrap_err();
            assert!(refused.message.contains("id"), "{id}: {refused}");
        }
    }

    #[test]
    fn package_paths() {
        assert!(check_package_path("f", "hello.sh").is_ok());
        assert!(check_package_path("f", "bin/run").is_ok());
        assert!(check_package_path("f", "../x").is_err());
        assert!(check_package_path("f", "/etc/passwd").is_err());
        assert!(check_package_path("f", "a/../../b").is_err());
    }

    #[test]
    fn spec_validation_names_the_field() {
        assert!(image_spec("busybox").validate().is_ok());
        let mut spec = image_spec("busybox");
        spec.default_priority = 3;
        assert_eq!(spec.validate().unwrap_err().field, "default_priority");
        let mut spec = image_spec("busybox");
        spec.env_vars.insert("TASK_ID".into(), "x".into());
        assert_eq!(spec.validate().unwrap_err().field, "env_vars.TASK_ID");
        let mut spec = image_spec("busybox");
        spec.limits.memory_mib = 1;
        assert_eq!(spec.validate().unwrap_err().field, "memory");
        let mut spec = image_spec("busybox");
        spec.network = "host".into();
        assert_eq!(spec.validate().unwrap_err().field, "network");
        spec.network = "container:other".into();
        assert_eq!(spec.validate().unwrap_err().field, "network");
    }

    #[test]
    fn networks_are_the_built_in_ones_or_the_operators() {
        let named = vec!["databases".to_owned()];
        assert!(check_network("bridge", &[]).is_ok());
        assert!(check_network("none", &[]).is_ok());
        assert!(check_network("databases", &named).is_ok());
        let refused = check_network("other", &named).unwrap_err();
        assert_eq!(refused.field, "network");
        assert!(
            refused
                .message
                .contains(r#"["bridge", "none", "databases"]"#),
            "{}",
            refused.message
        );
    }
}
