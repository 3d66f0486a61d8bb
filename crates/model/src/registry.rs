//! Container registries: which registry an image reference names, a project's credentials for
//! one, and where the images that `code push --dockerfile` builds are kept.
//!
//! Registries are named by their normalized host, as Docker's own reference grammar reads an
//! image: the first path component is a registry when it contains a `.` or a `:` or is
//! `localhost`; otherwise the image is Docker Hub's (`docker.io`). The many spellings of
//! Docker Hub's address (`https://index.docker.io/v1/`, `registry-1.docker.io`, none at all)
//! all come to `docker.io`.

use serde::{Deserialize, Serialize};

use crate::validation::ValidationError;

/// Docker Hub, as a normalized registry name.
pub const DOCKER_HUB: &str = "docker.io";

/// The repository under which locally built code images are tagged when no registry is
/// configured: `stevedore-code/<project id>/<code>:<build time>`.
pub const LOCAL_CODE_REPOSITORY: &str = "stevedore-code";

/// A project's credentials for one registry, in clear: what a runner sends with a pull.
///
/// Travels to remote runners inside a lease; never printed (`Debug` hides the password), never
/// returned by the API.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RegistryCredential {
    /// The normalized registry host, e.g. `registry.example.com:5000` or `docker.io`.
    pub registry: String,
    pub username: String,
    pub password: String,
}

/// Where the images built by `code push --dockerfile` live: under a registry (so runners on
/// other machines can pull them) or only on the machine that built them.
///
/// Every image gets the project's id in its path: `[<registry>/]<repository>/<project>/<code>`.
/// Only that project's tasks may use an image under it (see [`CodeImages::owner_of`]), so one
/// project can never borrow another's image, pushed or local.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeImages {
    /// The registry the images are pushed to; `None` keeps them local.
    pub registry: Option<String>,
    /// The repository path under the registry, e.g. `stevedore`.
    pub repository: String,
}

// === impl RegistryCredential ===

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

// === impl CodeImages ===

impl CodeImages {
    /// Images kept on the machine that built them.
    pub fn local() -> Self {
        CodeImages {
            registry: None,
            repository: LOCAL_CODE_REPOSITORY.to_owned(),
        }
    }

    /// The repository (without tag) for code `repository_name` of `project_id`.
    pub fn repository_for(&self, project_id: &str, repository_name: &str) -> String {
        match &self.registry {
            Some(registry) => format!(
                "{registry}/{}/{project_id}/{repository_name}",
                self.repository
            ),
            None => format!("{}/{project_id}/{repository_name}", self.repository),
        }
    }

    /// Refuses an image that lies under another project's path of these code images, or of
    /// the local ones: a project names only its own built images.
    pub fn check_owner(&self, image: &str, project_id: &str) -> Result<(), ValidationError> {
        let owner = [self, &CodeImages::local()]
            .into_iter()
            .find_map(|images| images.owner_of(image));
        match owner {
            Some(owner) if owner != project_id => Err(ValidationError::new(
                "image",
                format!("{image:?} was built for another project's code"),
            )),
            _ => Ok(()),
        }
    }

    /// The project an image belongs to when it lies under these code images (`None` for any
    /// other image): the path component right after the repository.
    pub fn owner_of<'a>(&self, image: &'a str) -> Option<&'a str> {
        let prefix = match &self.registry {
            Some(registry) => {
                let rest = image.strip_prefix(registry.as_str())?.strip_prefix('/')?;
                rest.strip_prefix(self.repository.as_str())?
            }
            None => {
                // A local image has no registry part; one that names a registry is not local.
                if explicit_registry(image).is_some() {
                    return None;
                }
                image.strip_prefix(self.repository.as_str())?
            }
        };
        let rest = prefix.strip_prefix('/')?;
        let (owner, _) = rest.split_once('/')?;
        (!owner.is_empty()).then_some(owner)
    }
}

/// The normalized registry an image reference names: its first path component when that is a
/// registry host, else Docker Hub.
pub fn registry_of(image: &str) -> String {
    explicit_registry(image)
        .map(normalize_host)
        .unwrap_or_else(|| DOCKER_HUB.to_owned())
}

/// A registry address as a user gives it (`https://registry.example.com/v2/`, `localhost:5000`,
/// empty for Docker Hub), normalized to its host and port. Refuses what cannot be a registry.
pub fn normalize_registry(address: &str) -> Result<String, ValidationError> {
    let trimmed = address.trim();
    let without_scheme = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .unwrap_or(trimmed);
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or(without_scheme)
        .to_ascii_lowercase();
    if host.is_empty() {
        return Ok(DOCKER_HUB.to_owned());
    }
    let valid = host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && !host.starts_with(['.', '-', ':']);
    if !valid {
        return Err(ValidationError::new(
            "serveraddress",
            format!("{address:?} is not a registry address (a host name with an optional port)"),
        ));
    }
    Ok(normalize_host(&host))
}

/// The registry part of a reference, when it has one.
fn explicit_registry(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

fn normalize_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" | "docker.io" => {
            DOCKER_HUB.to_owned()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_name_their_registry_or_docker_hub() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(registry_of("team/app"), "docker.io");
        assert_eq!(registry_of("docker.io/team/app"), "docker.io");
        assert_eq!(registry_of("index.docker.io/team/app"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/team/app:2"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/app"), "localhost");
        assert_eq!(
            registry_of("Registry.Example.com/app"),
            "registry.example.com"
        );
    }

    #[test]
    fn registry_addresses_are_normalized_or_refused() {
        assert_eq!(normalize_registry("").unwrap(), "docker.io");
        assert_eq!(
            normalize_registry("https://index.docker.io/v1/").unwrap(),
            "docker.io"
        );
        assert_eq!(
            normalize_registry("http://127.0.0.1:5000/v2/").unwrap(),
            "127.0.0.1:5000"
        );
        assert_eq!(
            normalize_registry("Registry.Example.com").unwrap(),
            "registry.example.com"
        );
        for bad in ["a b", "-x", "x?y", "über.example"] {
            assert!(normalize_registry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn code_images_carry_their_project_and_only_it_owns_them() {
        let pushed = CodeImages {
            registry: Some("127.0.0.1:5000".into()),
            repository: "stevedore".into(),
        };
        let image = format!("{}:1", pushed.repository_for("p1", "hello"));
        assert_eq!(image, "127.0.0.1:5000/stevedore/p1/hello:1");
        assert_eq!(pushed.owner_of(&image), Some("p1"));
        assert_eq!(
            pushed.owner_of("127.0.0.1:5000/stevedore/p2/x:1"),
            Some("p2")
        );
        assert_eq!(pushed.owner_of("127.0.0.1:5000/other/p1/x:1"), None);
        assert_eq!(pushed.owner_of("127.0.0.1:5001/stevedore/p1/x:1"), None);
        assert_eq!(pushed.owner_of("127.0.0.1:5000/stevedorex/p1/x:1"), None);
        assert_eq!(pushed.owner_of("stevedore/p1/x:1"), None);

        assert!(
            pushed
                .check_owner("127.0.0.1:5000/stevedore/p1/x:1", "p1")
                .is_ok()
        );
        assert!(
            pushed
                .check_owner("127.0.0.1:5000/stevedore/p2/x:1", "p1")
                .is_err()
        );
        assert!(pushed.check_owner("stevedore-code/p2/x:1", "p1").is_err());
        assert!(pushed.check_owner("busybox", "p1").is_ok());

        let local = CodeImages::local();
        let image = format!("{}:1", local.repository_for("p1", "hello"));
        assert_eq!(image, "stevedore-code/p1/hello:1");
        assert_eq!(local.owner_of(&image), Some("p1"));
        assert_eq!(local.owner_of("example.com/stevedore-code/p1/x"), None);
        assert_eq!(local.owner_of("stevedore-code/hello:1"), None);
    }

    #[test]
    fn credentials_never_print_their_password() {
        let credential = RegistryCredential {
            registry: "r".into(),
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{credential:?}").contains("hunter2"));
    }
}
