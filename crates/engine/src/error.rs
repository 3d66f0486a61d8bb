//! The one error type of this crate, classified from the Engine API's structured answers.
//!
//! Every variant is decided by what the engine said in a machine-readable way: the HTTP status
//! code of an error response, a transport failure (the socket is gone, the connection dropped),
//! a client-side timeout, or a malformed answer. Message texts are carried along for humans and
//! logs, never matched on: engines reword them between versions.

use std::fmt;

/// What went wrong asking a container runtime (or an image store or builder) for something,
/// in the runtime's own terms: unreachable, not found, refused, conflict, a limit it cannot
/// enforce. No variant carries a transport detail such as an HTTP status: an implementation
/// decides the variant from its structured answers and keeps the rest in `message`, for logs.
///
/// The enum is `Clone` so one failed image pull can be handed to every caller that was waiting
/// on it; for the same reason the underlying errors are kept as their display text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The runtime could not be reached at all: no socket, connection refused, connection
    /// dropped mid-answer, a transport failure.
    #[error("container runtime unreachable: {message}")]
    Unreachable {
        /// The transport error, for logs.
        message: String,
    },

    /// The runtime accepted the connection but did not answer in time.
    #[error("container runtime did not answer in time")]
    Timeout,

    /// The runtime failed internally (storage driver, containerd, cgroups...).
    #[error("container runtime failed: {message}")]
    Failed {
        /// The runtime's error message, for logs.
        message: String,
    },

    /// The container does not exist: it was removed behind our back, or the id never existed.
    #[error("container not found: {id}")]
    ContainerNotFound {
        /// The id or name that was asked for.
        id: String,
    },

    /// The image does not exist: neither locally when a container is created from it, nor in
    /// its registry when it is pulled (the registry answered, and said so).
    ///
    /// This is the user's error: a retry will not make a misspelled or deleted image appear.
    #[error("image not found: {image}")]
    ImageNotFound {
        /// The image reference that was asked for.
        image: String,
    },

    /// The registry refused the credentials, or the lack of them, for a pull or push.
    ///
    /// This is the user's error (their registry auth is wrong), not the infrastructure's.
    #[error("registry refused access to {image}: {message}")]
    RegistryDenied {
        /// The image reference that was pulled.
        image: String,
        /// The runtime's error message, for logs.
        message: String,
    },

    /// Pulling an image failed for a reason that is not the user's: the registry is down or
    /// unreachable, or the pull broke off mid-stream.
    #[error("pulling {image} failed: {message}")]
    PullFailed {
        /// The image reference that was pulled.
        image: String,
        /// The runtime's error message, for logs.
        message: String,
    },

    /// Pushing an image failed for a reason that is not a refusal of the credentials: the
    /// registry is down or unreachable, or the push broke off mid-stream.
    #[error("pushing {image} failed: {message}")]
    PushFailed {
        /// The image reference that was pushed.
        image: String,
        /// The runtime's error message, for logs.
        message: String,
    },

    /// The runtime refused the request as invalid: a bad image reference, an impossible
    /// limit, an unknown network.
    #[error("container runtime refused the request: {message}")]
    Refused {
        /// The runtime's error message, for logs.
        message: String,
    },

    /// The request conflicts with the container's current state: the name is taken, a
    /// removal is already in progress, the container is not running.
    #[error("conflict with the container's state: {message}")]
    Conflict {
        /// The runtime's error message, for logs.
        message: String,
    },

    /// The runtime cannot enforce a limit that the configuration needs.
    #[error("the container runtime cannot enforce {capability}: {hint}")]
    LimitUnenforceable {
        /// Which limit, e.g. "memory limits".
        capability: String,
        /// What an operator can do about it.
        hint: String,
    },

    /// The container spec was refused before it reached the runtime (a relative file path, an
    /// environment variable name with `=`, ...).
    #[error("invalid container spec: {reason}")]
    InvalidSpec {
        /// What is wrong with it.
        reason: String,
    },

    /// A local file needed to build something for the engine could not be read (the host's
    /// busybox for the local image).
    #[error("cannot read {path}: {message}")]
    LocalIo {
        /// The path that failed.
        path: String,
        /// The IO error, for logs.
        message: String,
    },

    /// Building an image failed, as the builder reported it: a `RUN` that exited non-zero, a
    /// base image that cannot be found or pulled, a Dockerfile it cannot parse, a `COPY` of a
    /// file the context does not have.
    ///
    /// This is the user's error: the Dockerfile or its context must change.
    #[error("building the image failed: {message}")]
    BuildFailed {
        /// The builder's error message, for the user: e.g. "The command '/bin/sh -c make'
        /// returned a non-zero code: 2".
        message: String,
    },

    /// The build context cannot be sent: no Dockerfile, a directory that cannot be read, a
    /// broken `.dockerignore` pattern, more than the size limit. Refused before (or while)
    /// sending, and the user's to fix.
    #[error("invalid build context: {reason}")]
    InvalidBuildContext {
        /// What is wrong with it.
        reason: String,
    },

    /// A code package cannot be unpacked into the container: the zip cannot be read, or an
    /// entry holds fewer or more bytes than it declares (which would corrupt the archive the
    /// runtime is sent, so the upload is stopped instead).
    ///
    /// This is the user's error: the same package fails the same way on any runner.
    #[error("invalid code package: {reason}")]
    InvalidPackage {
        /// What is wrong with it.
        reason: String,
    },

    /// The runtime's answer could not be understood (bad JSON, an error reported mid-stream, a
    /// missing field that every runtime sends).
    #[error("unexpected answer from the container runtime: {message}")]
    Protocol {
        /// What was unexpected, for logs.
        message: String,
    },
}

/// What a failed request was about, so a 404 can be told apart as "no such container" or
/// "no such image" without reading the message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// A request about one container (inspect, start, wait, kill, remove, upload, logs).
    Container(&'a str),
    /// Creating a container from this image: a 404 means the image is missing locally.
    ImageForCreate(&'a str),
    /// Pulling this image from its registry (or asking the registry about it).
    Pull(&'a str),
    /// Pushing this local image to its registry.
    Push(&'a str),
    /// Building an image: every answer of the engine is about the user's Dockerfile.
    Build,
    /// Anything else (info, version, list, import).
    Engine,
}

// === impl EngineError ===

impl EngineError {
    /// The variant as a fixed snake_case name, for metrics labels and logs that group
    /// failures: a closed set ([`EngineError::KINDS`]), never the message. The names are a
    /// published interface (dashboards and alerts select on them), so they stayed when the
    /// variants were renamed into the runtime's terms: [`EngineError::Failed`] is `server`,
    /// [`EngineError::ContainerNotFound`] `no_such_container`, [`EngineError::Refused`]
    /// `rejected`, [`EngineError::LimitUnenforceable`] `missing_capability`.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Unreachable { .. } => "unreachable",
            EngineError::Timeout => "timeout",
            EngineError::Failed { .. } => "server",
            EngineError::ContainerNotFound { .. } => "no_such_container",
            EngineError::ImageNotFound { .. } => "image_not_found",
            EngineError::RegistryDenied { .. } => "registry_denied",
            EngineError::PullFailed { .. } => "pull_failed",
            EngineError::PushFailed { .. } => "push_failed",
            EngineError::Refused { .. } => "rejected",
            EngineError::Conflict { .. } => "conflict",
            EngineError::LimitUnenforceable { .. } => "missing_capability",
            EngineError::InvalidSpec { .. } => "invalid_spec",
            EngineError::LocalIo { .. } => "local_io",
            EngineError::BuildFailed { .. } => "build_failed",
            EngineError::InvalidBuildContext { .. } => "invalid_build_context",
            EngineError::InvalidPackage { .. } => "invalid_package",
            EngineError::Protocol { .. } => "protocol",
        }
    }

    /// Every name [`EngineError::kind`] can return: the closed set of metric label values.
    pub const KINDS: [&'static str; 17] = [
        "unreachable",
        "timeout",
        "server",
        "no_such_container",
        "image_not_found",
        "registry_denied",
        "pull_failed",
        "push_failed",
        "rejected",
        "conflict",
        "missing_capability",
        "invalid_spec",
        "local_io",
        "build_failed",
        "invalid_build_context",
        "invalid_package",
        "protocol",
    ];

    /// True when the failure is the infrastructure's, not the user's: the task should go back
    /// to the queue and run again without spending the user's retries.
    ///
    /// Infrastructure: the runtime unreachable, timing out or failing internally, a pull that
    /// failed because the registry is down, a container removed behind our back, a state
    /// conflict (our own bookkeeping raced the runtime), a limit the runtime cannot enforce, a
    /// local IO failure, an answer we could not parse.
    ///
    /// The user's: an image that does not exist ([`EngineError::ImageNotFound`]: the reference
    /// was well-formed and the registry answered), registry credentials that were refused, a
    /// request the runtime refused as invalid, a spec refused before sending, a failed image
    /// build or its unusable context, and a code package that cannot be unpacked.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            EngineError::Unreachable { .. }
            | EngineError::Timeout
            | EngineError::Failed { .. }
            | EngineError::ContainerNotFound { .. }
            | EngineError::PullFailed { .. }
            | EngineError::PushFailed { .. }
            | EngineError::Conflict { .. }
            | EngineError::LimitUnenforceable { .. }
            | EngineError::LocalIo { .. }
            | EngineError::Protocol { .. } => true,
            EngineError::ImageNotFound { .. }
            | EngineError::RegistryDenied { .. }
            | EngineError::Refused { .. }
            | EngineError::InvalidSpec { .. }
            | EngineError::BuildFailed { .. }
            | EngineError::InvalidBuildContext { .. }
            | EngineError::InvalidPackage { .. } => false,
        }
    }

    pub(crate) fn invalid_spec(reason: impl fmt::Display) -> Self {
        EngineError::InvalidSpec {
            reason: reason.to_string(),
        }
    }

    pub(crate) fn protocol(message: impl fmt::Display) -> Self {
        EngineError::Protocol {
            message: message.to_string(),
        }
    }

    /// Classifies one bollard error (the Docker implementation's answers). The decision uses
    /// only the error's kind and, for answers from the engine, its HTTP status code; the
    /// message is carried (with the status, for logs), never parsed.
    pub(crate) fn from_bollard(error: bollard::errors::Error, subject: Subject<'_>) -> Self {
        use bollard::errors::Error as B;
        match error {
            B::DockerResponseServerError {
                status_code,
                message,
            } => Self::from_status(status_code, message, subject),
            B::RequestTimeoutError => EngineError::Timeout,
            // Transport failures: the engine is not there, or went away mid-request.
            B::HyperResponseError { .. }
            | B::HyperLegacyError { .. }
            | B::IOError { .. }
            | B::SocketNotFoundError(_)
            | B::UnsupportedURISchemeError { .. } => EngineError::Unreachable {
                message: error.to_string(),
            },
            // An error reported inside a 200 stream: the operation started and then failed on
            // the engine's side (for a pull: the registry broke off).
            B::DockerStreamError { error } => match subject {
                Subject::Pull(image) => EngineError::PullFailed {
                    image: image.to_owned(),
                    message: error,
                },
                Subject::Build => EngineError::BuildFailed { message: error },
                Subject::Push(image) => EngineError::PushFailed {
                    image: image.to_owned(),
                    message: error,
                },
                _ => EngineError::Protocol { message: error },
            },
            other => EngineError::Protocol {
                message: other.to_string(),
            },
        }
    }

    /// The engine's answer `status` with its `message`, kept together for logs.
    pub(crate) fn answered(status: u16, message: &str) -> String {
        format!("HTTP {status}: {message}")
    }

    fn from_status(status: u16, message: String, subject: Subject<'_>) -> Self {
        match (status, subject) {
            // A build's own failures keep the engine's words alone: they are the user's to read.
            (_, Subject::Build) => EngineError::BuildFailed { message },
            (404, Subject::Container(id)) => EngineError::ContainerNotFound { id: id.to_owned() },
            (404, Subject::ImageForCreate(image) | Subject::Pull(image) | Subject::Push(image)) => {
                EngineError::ImageNotFound {
                    image: image.to_owned(),
                }
            }
            (401 | 403, Subject::Pull(image) | Subject::Push(image)) => {
                EngineError::RegistryDenied {
                    image: image.to_owned(),
                    message: Self::answered(status, &message),
                }
            }
            (409, _) => EngineError::Conflict {
                message: Self::answered(status, &message),
            },
            (500..=599, Subject::Pull(image)) => EngineError::PullFailed {
                image: image.to_owned(),
                message: Self::answered(status, &message),
            },
            (500..=599, Subject::Push(image)) => EngineError::PushFailed {
                image: image.to_owned(),
                message: Self::answered(status, &message),
            },
            (500..=599, _) => EngineError::Failed {
                message: Self::answered(status, &message),
            },
            _ => EngineError::Refused {
                message: Self::answered(status, &message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::errors::Error as B;

    fn answer(status_code: u16) -> B {
        B::DockerResponseServerError {
            status_code,
            message: "whatever the engine says today".to_owned(),
        }
    }

    #[test]
    fn kinds_are_fixed_names_without_the_message() {
        let error = EngineError::Failed {
            message: "whatever the engine says today".to_owned(),
        };
        assert_eq!(error.kind(), "server");
        assert!(EngineError::KINDS.contains(&error.kind()));
        assert_eq!(EngineError::Timeout.kind(), "timeout");
    }

    #[test]
    fn every_kind_is_in_the_closed_set_once() {
        let text = || "m".to_owned();
        let image = || "i:1".to_owned();
        let every = [
            EngineError::Unreachable { message: text() },
            EngineError::Timeout,
            EngineError::Failed { message: text() },
            EngineError::ContainerNotFound { id: text() },
            EngineError::ImageNotFound { image: image() },
            EngineError::RegistryDenied {
                image: image(),
                message: text(),
            },
            EngineError::PullFailed {
                image: image(),
                message: text(),
            },
            EngineError::PushFailed {
                image: image(),
                message: text(),
            },
            EngineError::Refused { message: text() },
            EngineError::Conflict { message: text() },
            EngineError::LimitUnenforceable {
                capability: text(),
                hint: text(),
            },
            EngineError::InvalidSpec { reason: text() },
            EngineError::LocalIo {
                path: text(),
                message: text(),
            },
            EngineError::BuildFailed { message: text() },
            EngineError::InvalidBuildContext { reason: text() },
            EngineError::InvalidPackage { reason: text() },
            EngineError::Protocol { message: text() },
        ];
        let kinds: std::collections::BTreeSet<_> = every.iter().map(EngineError::kind).collect();
        let closed: std::collections::BTreeSet<_> = EngineError::KINDS.into_iter().collect();
        assert_eq!(kinds, closed);
        assert_eq!(closed.len(), EngineError::KINDS.len());
    }

    #[test]
    fn a_404_on_a_container_is_container_not_found_and_infrastructure() {
        let error = EngineError::from_bollard(answer(404), Subject::Container("abc"));
        assert_eq!(error, EngineError::ContainerNotFound { id: "abc".into() });
        assert!(error.is_infrastructure());
    }

    #[test]
    fn a_404_on_a_pull_or_create_is_the_users_missing_image() {
        for subject in [Subject::Pull("nope:1"), Subject::ImageForCreate("nope:1")] {
            let error = EngineError::from_bollard(answer(404), subject);
            assert_eq!(
                error,
                EngineError::ImageNotFound {
                    image: "nope:1".into()
                }
            );
            assert!(!error.is_infrastructure());
        }
    }

    #[test]
    fn a_5xx_on_a_pull_is_a_failed_pull_and_infrastructure() {
        let error = EngineError::from_bollard(answer(500), Subject::Pull("x:1"));
        assert!(matches!(
            error,
            EngineError::PullFailed { ref message, .. } if message.starts_with("HTTP 500")
        ));
        assert!(error.is_infrastructure());
    }

    #[test]
    fn a_stream_error_mid_pull_is_a_failed_pull() {
        let error = EngineError::from_bollard(
            B::DockerStreamError {
                error: "unexpected EOF".into(),
            },
            Subject::Pull("x:1"),
        );
        assert!(matches!(error, EngineError::PullFailed { .. }));
        assert!(error.is_infrastructure());
    }

    #[test]
    fn a_400_is_the_users_and_a_5xx_is_infrastructure() {
        let rejected = EngineError::from_bollard(answer(400), Subject::Engine);
        assert!(matches!(rejected, EngineError::Refused { .. }));
        assert!(!rejected.is_infrastructure());

        let failed = EngineError::from_bollard(answer(503), Subject::Container("c"));
        assert!(matches!(failed, EngineError::Failed { .. }));
        assert!(failed.is_infrastructure());
    }

    #[test]
    fn registry_auth_refusals_are_the_users() {
        let error = EngineError::from_bollard(answer(401), Subject::Pull("private/x:1"));
        assert!(matches!(error, EngineError::RegistryDenied { .. }));
        assert!(!error.is_infrastructure());
    }

    #[test]
    fn push_refusals_are_the_users_and_a_broken_push_the_infrastructures() {
        let denied = EngineError::from_bollard(answer(401), Subject::Push("r:5000/x:1"));
        assert!(matches!(denied, EngineError::RegistryDenied { .. }));
        assert!(!denied.is_infrastructure());
        let missing = EngineError::from_bollard(answer(404), Subject::Push("r:5000/x:1"));
        assert!(matches!(missing, EngineError::ImageNotFound { .. }));
        for failed in [
            EngineError::from_bollard(answer(500), Subject::Push("r:5000/x:1")),
            EngineError::from_bollard(
                B::DockerStreamError {
                    error: "connection reset".into(),
                },
                Subject::Push("r:5000/x:1"),
            ),
        ] {
            assert!(
                matches!(failed, EngineError::PushFailed { .. }),
                "{failed:?}"
            );
            assert_eq!(failed.kind(), "push_failed");
            assert!(failed.is_infrastructure());
        }
    }

    #[test]
    fn transport_failures_and_timeouts_are_infrastructure() {
        let missing = EngineError::from_bollard(
            B::SocketNotFoundError("/var/run/docker.sock".into()),
            Subject::Engine,
        );
        assert!(matches!(missing, EngineError::Unreachable { .. }));
        assert!(missing.is_infrastructure());

        let timeout = EngineError::from_bollard(B::RequestTimeoutError, Subject::Engine);
        assert_eq!(timeout, EngineError::Timeout);
        assert!(timeout.is_infrastructure());
    }

    #[test]
    fn every_answer_to_a_build_is_the_users() {
        for status in [400, 404, 500] {
            let error = EngineError::from_bollard(answer(status), Subject::Build);
            assert!(matches!(error, EngineError::BuildFailed { .. }));
            assert!(!error.is_infrastructure());
        }
        let failed_step = EngineError::from_bollard(
            B::DockerStreamError {
                error: "The command '/bin/sh -c exit 3' returned a non-zero code: 3".into(),
            },
            Subject::Build,
        );
        assert!(matches!(
            failed_step,
            EngineError::BuildFailed { ref message } if message.contains("code: 3")
        ));
        assert!(!failed_step.is_infrastructure());
        // The engine out of reach is still the infrastructure's.
        let gone = EngineError::from_bollard(
            B::SocketNotFoundError("/var/run/docker.sock".into()),
            Subject::Build,
        );
        assert!(gone.is_infrastructure());
    }

    #[test]
    fn the_same_message_with_another_status_classifies_differently() {
        // Regression guard for "never parse the text": only the status decides.
        let as_400 = EngineError::from_bollard(answer(400), Subject::Container("c"));
        let as_409 = EngineError::from_bollard(answer(409), Subject::Container("c"));
        assert!(!as_400.is_infrastructure());
        assert!(as_409.is_infrastructure());
    }
}
