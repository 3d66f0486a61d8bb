//! Whose credentials pull a task's image, and when a cached image may be used.
//!
//! The rule, per image:
//!
//! * **Operator images** — the stack images of runtime codes, and the images `code push
//!   --dockerfile` built for the task's own project (under [`CodeImages`], with the project's
//!   id in the path) — are pulled with the operator's credentials (`runner.registries`,
//!   `code_registry`) and used from the cache as they are. An image under another project's
//!   path is refused outright: one project never runs another's built code.
//! * **Project images** (what an image code names) are pulled with the project's own
//!   credential for the image's registry, from the lease, or with none; never with the
//!   operator's. A cached copy is used only after the task proved access to it:
//!   - an image built or imported on this machine and never pushed (no `RepoDigests`) came
//!     from no registry, so there is nothing to prove and nothing is asked;
//!   - an image this runner already found pullable without credentials (public) is used at
//!     once;
//!   - any other cached image is checked with the registry first, with the task's own
//!     credential (the engine fetches the manifest's descriptor, no layers). A refusal ends
//!     the task `error` with the registry's reason; an unreachable registry requeues it.
//!
//! So public and locally built images cost nothing after the first use on a runner, and a
//! private image pulled for one project cannot run for another that cannot pull it itself.
//!
//! A local run (`stevedore run`) is its own project: the configured credentials for its image's
//! registry travel in its lease as the project's would ([`local_run_credential`]).

use std::collections::HashSet;
use std::sync::Mutex;

use stevedore_engine::{EngineError, ImageStore, RegistryAuth};
use stevedore_model::LeasedTask;
use stevedore_model::code::check_image_reference;
use stevedore_model::registry::registry_of;
use stevedore_model::{CodeImages, CodeKind, CodeRevision, RegistryCredential};

use crate::config::RunnerConfig;
use crate::container::registry_auth_for;

/// How one task's image is to be made present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageAccess {
    /// The credentials a pull (or a check) sends.
    pub auth: Option<RegistryAuth>,
    /// Whose image it is.
    pub owner: ImageOwner,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImageOwner {
    /// The operator's, or the project's own built code: the cache may be used as it is.
    Operator,
    /// The project's choice: a cached copy from a registry must be checked first.
    Project,
}

/// Images this runner has found pullable without credentials: their cached copies need no
/// check. Lives as long as the runner.
#[derive(Debug, Default)]
pub(crate) struct PublicImages(Mutex<HashSet<String>>);

// === impl ImageAccess ===

impl ImageAccess {
    /// Decides for the image `image` of a leased task. Fails, with a message for the user,
    /// when the image belongs to another project's built code.
    pub fn decide(leased: &LeasedTask, image: &str, config: &RunnerConfig) -> Result<Self, String> {
        let operator = || ImageAccess {
            auth: registry_auth_for(image, &config.registry_auth),
            owner: ImageOwner::Operator,
        };
        let CodeKind::Image { image: named, .. } = &leased.code.spec.kind else {
            // A runtime code runs on a stack image: the operator's.
            return Ok(operator());
        };
        if named != image {
            return Ok(operator());
        }
        // A code stored before such names were refused: never let Docker resolve it to the id
        // of an image some other project has on this runner.
        check_image_reference(image).map_err(|error| error.to_string())?;
        let project_id = &leased.task.project_id;
        config
            .code_images
            .check_owner(image, project_id)
            .map_err(|error| format!("{error}; a project runs only its own built images"))?;
        let own_built_image = [&config.code_images, &CodeImages::local()]
            .into_iter()
            .any(|images| images.owner_of(image).is_some());
        if own_built_image {
            return Ok(operator());
        }
        let registry = registry_of(image);
        let auth = leased
            .registry_credential
            .as_ref()
            .filter(|credential| credential.registry == registry)
            .map(|credential| RegistryAuth {
                username: Some(credential.username.clone()),
                password: Some(credential.password.clone()),
                identity_token: None,
                server_address: Some(credential.registry.clone()),
            });
        Ok(ImageAccess {
            auth,
            owner: ImageOwner::Project,
        })
    }

    /// Whether the cached copy of `image` may be used without a pull: `false` when there is
    /// none (or the image is the operator's, which `ensure_image` handles). For a project's
    /// image from a registry, asks the registry with the task's credentials first, so a
    /// refusal ends here.
    pub async fn cached_copy_usable(
        &self,
        engine: &dyn ImageStore,
        image: &str,
        public: &PublicImages,
    ) -> Result<bool, EngineError> {
        if self.owner == ImageOwner::Operator {
            return Ok(false);
        }
        let Some(local) = engine.local_image(image).await? else {
            return Ok(false);
        };
        if local.repo_digests.is_empty() || (self.auth.is_none() && public.contains(image)) {
            return Ok(true);
        }
        engine
            .check_registry_access(image, self.auth.clone())
            .await?;
        self.usable(image, public);
        Ok(true)
    }

    /// Notes that `image` was pulled or checked with this access.
    pub fn usable(&self, image: &str, public: &PublicImages) {
        if self.owner == ImageOwner::Project && self.auth.is_none() {
            public.insert(image);
        }
    }
}

/// The credential a local run (`stevedore run`) uses for an image code's image: the
/// configured one for its registry, as if the project had stored it. Stack images need none
/// (the runner pulls them with the configured credentials anyway).
pub(crate) fn local_run_credential(
    code: &CodeRevision,
    auths: &[RegistryAuth],
) -> Option<RegistryCredential> {
    let CodeKind::Image { image, .. } = &code.spec.kind else {
        return None;
    };
    let auth = registry_auth_for(image, auths)?;
    Some(RegistryCredential {
        registry: registry_of(image),
        username: auth.username?,
        password: auth.password?,
    })
}

// === impl PublicImages ===

impl PublicImages {
    fn contains(&self, image: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(image)
    }

    fn insert(&self, image: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(image.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use stevedore_model::RegistryCredential;

    use super::*;

    fn leased(
        project_id: &str,
        kind: CodeKind,
        credential: Option<RegistryCredential>,
    ) -> LeasedTask {
        let mut leased = crate::container::tests::leased("t", kind);
        leased.task.project_id = project_id.into();
        leased.code.project_id = project_id.into();
        leased.registry_credential = credential;
        leased
    }

    fn image(name: &str) -> CodeKind {
        CodeKind::Image {
            image: name.into(),
            command: None,
        }
    }

    fn config() -> RunnerConfig {
        RunnerConfig {
            registry_auth: vec![RegistryAuth {
                username: Some("operator".into()),
                password: Some("op".into()),
                identity_token: None,
                server_address: Some("ops.example:5000".into()),
            }],
            code_images: CodeImages {
                registry: Some("ops.example:5000".into()),
                repository: "stevedore".into(),
            },
            ..RunnerConfig::default()
        }
    }

    #[test]
    fn a_project_image_gets_only_the_projects_credential_for_its_registry() {
        let credential = RegistryCredential {
            registry: "r.example:5000".into(),
            username: "alice".into(),
            password: "pw".into(),
        };
        let task = leased(
            "p1",
            image("r.example:5000/app:1"),
            Some(credential.clone()),
        );
        let access = ImageAccess::decide(&task, "r.example:5000/app:1", &config()).unwrap();
        assert_eq!(access.owner, ImageOwner::Project);
        assert_eq!(
            access.auth.and_then(|auth| auth.username),
            Some("alice".into())
        );

        // Even on the operator's registry, outside the code images, the operator's
        // credentials are not lent to a project.
        let task = leased("p1", image("ops.example:5000/private/app:1"), None);
        let access =
            ImageAccess::decide(&task, "ops.example:5000/private/app:1", &config()).unwrap();
        assert_eq!(
            access,
            ImageAccess {
                auth: None,
                owner: ImageOwner::Project
            }
        );
    }

    #[test]
    fn built_code_images_are_the_operators_for_their_own_project_only() {
        let own = "ops.example:5000/stevedore/p1/hello:1";
        let access = ImageAccess::decide(&leased("p1", image(own), None), own, &config()).unwrap();
        assert_eq!(access.owner, ImageOwner::Operator);
        assert_eq!(
            access.auth.and_then(|auth| auth.username),
            Some("operator".into())
        );
        assert!(ImageAccess::decide(&leased("p2", image(own), None), own, &config()).is_err());
        let local = "stevedore-code/p1/hello:1";
        assert!(ImageAccess::decide(&leased("p1", image(local), None), local, &config()).is_ok());
        assert!(ImageAccess::decide(&leased("p2", image(local), None), local, &config()).is_err());
    }

    #[test]
    fn a_name_docker_would_read_as_an_image_id_is_refused_even_if_stored() {
        for id in ["681c", "sha256:681c4496748f"] {
            let refused = ImageAccess::decide(&leased("p2", image(id), None), id, &config());
            assert!(refused.unwrap_err().contains("id"), "{id}");
        }
    }

    #[test]
    fn a_local_run_uses_the_configured_credential_as_its_projects() {
        let task = leased("p1", image("ops.example:5000/private/app:1"), None);
        let credential = local_run_credential(&task.code, &config().registry_auth).unwrap();
        assert_eq!(
            (credential.registry.as_str(), credential.username.as_str()),
            ("ops.example:5000", "operator")
        );
        let elsewhere = leased("p1", image("r.example/app:1"), None);
        assert_eq!(
            local_run_credential(&elsewhere.code, &config().registry_auth),
            None
        );
    }

    #[test]
    fn stack_images_are_the_operators() {
        let task = leased(
            "p1",
            CodeKind::Runtime {
                runtime: "sh".into(),
                file_name: "x.sh".into(),
                stack: None,
            },
            None,
        );
        let access = ImageAccess::decide(&task, "stevedore/busybox:local", &config()).unwrap();
        assert_eq!(access.owner, ImageOwner::Operator);
    }
}
