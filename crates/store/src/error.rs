use stevedore_model::{QuotaExceeded, TransitionError};

/// What can go wrong in a store. The server maps each variant to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such thing in this project (or at all): `what` names it for the user.
    #[error("{what} not found")]
    NotFound { what: String },
    /// A revision's package was removed by `Store::prune_packages`; the revision itself
    /// stays. Answered like `NotFound`.
    #[error(
        "the package of revision {rev} of code {code} was removed by retention; push the code again or use a newer revision"
    )]
    PackageRemoved { code: String, rev: u32 },
    /// Retention removed it (a finished task's log): it existed and will not come back.
    #[error("{what} was removed by retention at {}", at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))]
    Removed {
        what: String,
        at: stevedore_model::Timestamp,
    },
    /// The request conflicts with the current state, e.g. cancelling a finished task.
    #[error("{0}")]
    Conflict(String),
    /// The lease token is not the task's current one: the task was rescued and leased again,
    /// or it already finished. The caller must stop acting on the task.
    #[error("the lease on task {task_id} is stale")]
    StaleLease { task_id: String },
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The write would take the project past one of its quotas; nothing was written.
    #[error(transparent)]
    QuotaExceeded(#[from] QuotaExceeded),
    /// Stored data that does not decode: a bug or a corrupted database.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A package file to store could not be read, or did not hold what it was described with
    /// (`PackageFile`'s size and checksum): the caller's fault, nothing was stored.
    #[error("the package file cannot be stored: {0}")]
    PackageFile(String),
    /// The operating system gave no random bytes (for a lease token).
    #[error("the system's random number generator failed: {0}")]
    Random(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub fn not_found(what: impl Into<String>) -> Self {
        StoreError::NotFound { what: what.into() }
    }
}
