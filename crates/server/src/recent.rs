//! Recent answers of the store, kept for a short, fixed time so that the requests of a busy
//! client do not each read the same rows: which token a secret is, and the defaults a code
//! gives its tasks.
//!
//! What may be stale, and for how long, is decided where each cache is made (see
//! [`TOKEN_TTL`] and [`CODE_DEFAULTS_TTL`]); what this server changes itself it forgets at
//! once. Only answers found are kept: a secret or a code that does not exist is asked of the
//! store every time, so a token or a code created anywhere works at its first request.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stevedore_store::TokenRecord;

use crate::wire::CodeDefaults;

/// How long a token found stays trusted without asking the store again. Tokens are never
/// changed once made; a token removed from the store (with its project, or by an operator
/// in the database) keeps working for at most this long on a server that used it just before.
pub const TOKEN_TTL: Duration = Duration::from_secs(2);

/// How long a code's defaults (its priority and timeout) are used without reading the code
/// again. A code uploaded or deleted through this server is forgotten at once; through another
/// server sharing the database, tasks queued here may take the previous revision's defaults
/// for at most this long. Whether the code exists is not cached: the store checks it when the
/// tasks are queued.
pub const CODE_DEFAULTS_TTL: Duration = Duration::from_secs(1);

/// The recent answers one server keeps.
#[derive(Debug, Clone)]
pub struct RecentAnswers {
    /// Tokens found, by the SHA-256 of their secret ([`TOKEN_TTL`]).
    pub tokens: Arc<Recent<String, TokenRecord>>,
    /// Codes' task defaults, by project and code name ([`CODE_DEFAULTS_TTL`]).
    pub code_defaults: Arc<Recent<(String, String), CodeDefaults>>,
}

impl Default for RecentAnswers {
    fn default() -> Self {
        RecentAnswers {
            tokens: Arc::new(Recent::new(TOKEN_TTL)),
            code_defaults: Arc::new(Recent::new(CODE_DEFAULTS_TTL)),
        }
    }
}

/// The most answers one cache holds; past it the cache starts over.
const MAX_ENTRIES: usize = 16_384;

/// Answers by key, each for `ttl` after it was read from the store.
#[derive(Debug)]
pub struct Recent<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash, V: Clone> Recent<K, V> {
    pub fn new(ttl: Duration) -> Self {
        Recent {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The answer kept for `key`, unless it is older than the cache's time.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let entries = self.lock();
        let (value, read_at) = entries.get(key)?;
        (read_at.elapsed() < self.ttl).then(|| value.clone())
    }

    /// Keeps `value`, read from the store at `read_at` (before the read began, so that the
    /// time it is trusted counts from no later than what it says).
    pub fn insert(&self, key: K, value: V, read_at: Instant) {
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, (value, read_at));
    }

    /// Forgets every answer whose key `which` picks.
    pub fn forget(&self, which: impl Fn(&K) -> bool) {
        self.lock().retain(|key, _| !which(key));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_kept_for_its_time_and_forgotten_on_demand() {
        let recent: Recent<String, u32> = Recent::new(Duration::from_secs(60));
        recent.insert("a".to_owned(), 1, Instant::now());
        assert_eq!(recent.get("a"), Some(1));
        assert_eq!(recent.get("b"), None);
        recent.forget(|key| key == "a");
        assert_eq!(recent.get("a"), None);
    }

    #[test]
    fn an_answer_older_than_its_time_is_not_used() {
        let recent: Recent<String, u32> = Recent::new(Duration::from_millis(10));
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        recent.insert("a".to_owned(), 1, long_ago);
        assert_eq!(recent.get("a"), None);
    }
}
