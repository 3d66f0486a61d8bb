//! SQLite: the embedded default store.

use std::path::PathBuf;

/// How hard SQLite works to make a commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// WAL with `synchronous=NORMAL`: a commit survives a crash of the process (kill -9) but
    /// may be lost to a power failure. The default.
    #[default]
    Normal,
    /// `synchronous=FULL`: a commit also survives a power failure, at the cost of an fsync
    /// per transaction.
    Full,
}

/// Where and how to open the database.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file; created with its directory when missing.
    pub path: PathBuf,
    pub sync: SyncMode,
}

/// The SQLite store.
pub struct SqliteStore {}
