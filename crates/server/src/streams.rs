//! Live log streams held open per token in this process, counted against the project's
//! `log_streams_per_token` quota.
//!
//! Each stream polls the store for as long as it is open (up to a day), so one token must not
//! hold open more than a few. Streams exist only in the process that serves them, so the
//! count is this server's: a token may hold the limit on each server sharing a database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use stevedore_model::{Quota, QuotaExceeded};

/// The open streams of every token, shared by the handlers that open them.
#[derive(Debug, Clone, Default)]
pub struct OpenStreams(Arc<Mutex<HashMap<String, u64>>>);

/// One open stream, counted until dropped: keep it inside the response body's stream, so it
/// ends when the stream does (finished, cut short, or its client gone).
#[derive(Debug)]
pub struct StreamSlot {
    streams: OpenStreams,
    token_id: String,
}

// === impl OpenStreams ===

impl OpenStreams {
    /// Counts one more stream of `token_id`, or refuses it at `limit`.
    pub fn open(&self, token_id: &str, limit: u64) -> Result<StreamSlot, QuotaExceeded> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(token_id.to_owned()).or_insert(0);
        if *count >= limit {
            return Err(QuotaExceeded {
                quota: Quota::LogStreamsPerToken,
                limit,
                used: *count,
            });
        }
        *count += 1;
        Ok(StreamSlot {
            streams: self.clone(),
            token_id: token_id.to_owned(),
        })
    }

    /// The streams `token_id` holds open on this server.
    pub fn count(&self, token_id: &str) -> u64 {
        let open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(token_id).copied().unwrap_or(0)
    }
}

// === impl StreamSlot ===

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .streams
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.token_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.token_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_given_back_when_dropped() {
        let streams = OpenStreams::default();
        let first = streams.open("t", 2).unwrap();
        let _second = streams.open("t", 2).unwrap();
        let refused = streams.open("t", 2).unwrap_err();
        assert_eq!((refused.limit, refused.used), (2, 2));
        assert!(streams.open("other", 2).is_ok(), "per token");
        drop(first);
        assert_eq!(streams.count("t"), 1);
        assert!(streams.open("t", 2).is_ok());
    }
}
