//! The runner's errors: why it cannot run at all ([`RunnerError`]), and what a task source
//! answered when it refused or failed a request ([`SourceError`]).

use stevedore_engine::EngineError;

/// Why [`crate::Runner::run`] refused to run, or why [`crate::run_local`] produced no
/// result. Failures of single tasks are not errors of a runner: they end or requeue the task
/// and the runner goes on. A local run has only its one task, so there they are errors.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The container engine did not answer at start-up.
    #[error("the container engine is not available: {0}")]
    EngineUnavailable(#[source] EngineError),
    /// The engine cannot enforce a limit the configuration needs (memory limits, unless the
    /// configuration explicitly allows running without them).
    #[error("refusing to run tasks: {0}")]
    EngineCannotEnforceLimits(#[source] EngineError),
    /// The task network cannot be had: the engine refused to create it, or one of its name
    /// exists with other settings.
    #[error("the task network cannot be set up: {0}")]
    TaskNetwork(#[source] EngineError),
    /// The task network cannot be isolated (no root, no iptables, an engine on another
    /// machine), and the operator did not opt for an unguarded network.
    #[error(
        "refusing to run tasks on a network that is not isolated: {0} (set \
         task_network.unguarded = true to run them anyway, able to reach this host, each other \
         and private ranges)"
    )]
    TaskNetworkUnguarded(#[source] EngineError),
    /// The lease ledger cannot be opened (another runner process holds it, or the disk
    /// refuses).
    #[error("the lease ledger cannot be opened: {0}")]
    LeaseLedger(#[source] std::io::Error),
    /// The work directory (`work_dir`) cannot be created or cleaned.
    #[error("the runner's work directory {path} cannot be used: {source}")]
    WorkDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The configuration makes no sense (no clusters, a zero capacity...).
    #[error("invalid runner configuration: {0}")]
    InvalidConfig(String),
    /// A local run's task did not run to an end of its own: it could not be set up (a
    /// missing image, an unknown runtime, a package without its entry point, an entry point
    /// the engine cannot start) or the infrastructure failed it (`infrastructure`). A local
    /// run never tries again.
    #[error("the task could not run: {reason}")]
    TaskNotRun {
        reason: String,
        infrastructure: bool,
    },
}

/// What a [`crate::TaskSource`] answered when it did not do what was asked.
///
/// The variants are what the runner acts on, whatever transport the source uses: the store
/// server's lease desk in the same process, or the server over HTTP (409 → `StaleLease`, 404 → `NotFound`, 5xx and transport
/// failures → `Unavailable`, other 4xx → `Refused`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The lease token is no longer the task's: it was rescued and leased again, or it has
    /// finished. The runner must stop acting on the task at once.
    #[error("the lease on task {task_id} is stale")]
    StaleLease { task_id: String },
    /// The thing asked for does not exist (a code package).
    #[error("{what} not found")]
    NotFound { what: String },
    /// The source could not be reached or failed internally; trying again later may work.
    #[error("the task source is unavailable: {message}")]
    Unavailable { message: String },
    /// The source refused the request as invalid for the task's current state; trying again
    /// will not help.
    #[error("the task source refused the request: {message}")]
    Refused { message: String },
}

// === impl SourceError ===

impl SourceError {
    /// Whether trying the same request again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Unavailable { .. })
    }
}
