//! The work signal: one connection per store `LISTEN`s on `stevedore_work` and turns every
//! notification into a tick of a `watch` channel that `WorkSignal`s wait on.
//!
//! Notifications are not stored: one sent while the connection is down is lost. So the signal
//! ticks whenever listening (re)starts, and while it cannot listen it ticks on a timer, which
//! makes every waiter poll the store until the connection is back.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::tasks::WORK_CHANNEL;
use crate::WorkSignal;

/// The first pause before listening again after a failure; it doubles up to `POLL_WHILE_DOWN`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// While the store cannot listen, the signal ticks this often, so that waiters poll.
const POLL_WHILE_DOWN: Duration = Duration::from_secs(1);

/// The running `LISTEN` task.
pub(super) struct Listener {
    signal: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Starts listening in the background; `None` outside a Tokio runtime.
    pub(super) fn start(connect: PgConnectOptions) -> Option<Listener> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (sender, signal) = watch::channel(0);
        let task = runtime.spawn(listen_forever(connect, sender));
        Some(Listener { signal, task })
    }

    pub(super) fn signal(&self) -> WorkSignal {
        WorkSignal::new(self.signal.clone())
    }

    pub(super) fn abort(self) {
        self.task.abort();
    }

    pub(super) async fn stop(self) {
        self.task.abort();
        // Only the cancellation comes back from an aborted task.
        drop(self.task.await);
    }
}

fn tick(sender: &watch::Sender<u64>) {
    sender.send_modify(|count| *count = count.wrapping_add(1));
}

async fn listen_forever(connect: PgConnectOptions, sender: watch::Sender<u64>) {
    // A pool of one connection of its own, so that listening never takes one of the store's.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(connect);
    let mut pause = FIRST_RETRY;
    loop {
        if let Err(error) = listen(&pool, &sender, &mut pause).await {
            tracing::warn!(%error, "listening for queued work failed; polling until it works again");
        }
        tick(&sender);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_WHILE_DOWN);
    }
}

/// Listens until the connection fails for good. Ticks once listening, for whatever was sent
/// before, and once for every notification (or burst of them).
async fn listen(
    pool: &PgPool,
    sender: &watch::Sender<u64>,
    pause: &mut Duration,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(WORK_CHANNEL).await?;
    *pause = FIRST_RETRY;
    tick(sender);
    loop {
        // `None`: the connection was lost and made again, and what was sent meanwhile is lost.
        if listener.try_recv().await?.is_some() {
            while listener.next_buffered().is_some() {}
        }
        tick(sender);
    }
}
