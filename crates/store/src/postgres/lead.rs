//! Leadership among the servers sharing a database: a session-level advisory lock held by a
//! connection of its own, apart from the pool, which the guard owns.
//!
//! PostgreSQL releases a session-level lock when its session ends, however it ends: the guard
//! dropped (its connection closes), the process killed, the connection cut or terminated by an
//! administrator. So a leader only has to check that its connection is still alive; a dead
//! connection means the server has already let the lock go, and another server may hold it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::Mutex;

use crate::{Leadership, Result};

/// The key of the leader lock (`pg_try_advisory_lock(bigint)`): the bytes of "stvdlead", an
/// arbitrary constant that keeps it apart from any other application's advisory locks. Keys of
/// one `bigint` never meet the two-`int` keys of `leases::CODE_LOCK_CLASS`.
pub(super) const LEADER_LOCK_KEY: i64 = 0x7374_7664_6c65_6164;

/// How long opening the leader's connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `is_held` waits for the connection to answer before it counts it as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The leadership, held by the advisory lock of the connection inside.
pub(super) struct PgLeadership {
    conn: Mutex<PgConnection>,
    /// Set once the connection failed a check; a leadership lost is never regained.
    lost: AtomicBool,
}

/// Opens a connection and takes the leader lock on it: `None`, the connection closed, when
/// another session holds the lock.
pub(super) async fn try_lead(connect: &PgConnectOptions) -> Result<Option<PgLeadership>> {
    let options = connect.clone().application_name("stevedore leader");
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting for the leadership timed out",
            ))
        })??;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LEADER_LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        if let Err(error) = conn.close().await {
            tracing::debug!(%error, "closing the connection of a refused leadership failed");
        }
        return Ok(None);
    }
    Ok(Some(PgLeadership {
        conn: Mutex::new(conn),
        lost: AtomicBool::new(false),
    }))
}

#[async_trait]
impl Leadership for PgLeadership {
    async fn is_held(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return false;
        }
        let mut conn = self.conn.lock().await;
        let check = sqlx::query("SELECT 1").execute(&mut *conn);
        let failure = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(Ok(_)) => return true,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {CHECK_TIMEOUT:?}"),
        };
        // A failed query means the session is gone, and the lock with it. One cut short by the
        // timeout leaves the connection in an unknown state: the lock cannot be counted on
        // either, and the guard's drop closes the connection, which releases it if it was not.
        tracing::warn!(%failure, "the leader's database connection is lost");
        self.lost.store(true, Ordering::Release);
        false
    }
}
