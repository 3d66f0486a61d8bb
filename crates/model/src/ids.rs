//! Identifiers in IronWorker's form: 24 lowercase hex digits, laid out as MongoDB's ObjectId
//! that IronWorker's ids were. Its official Ruby client refuses any project, code, task or
//! schedule id of another length.
//!
//! ```text
//! | 4 bytes: seconds since the epoch | 5 bytes: random, fixed per process | 3 bytes: counter |
//! ```
//!
//! The seconds make ids sort by creation time across servers; the process bytes keep two
//! servers (or two processes on one machine) from ever handing out the same id; the counter
//! keeps the ids one process makes within one second apart and in order. Unlike ObjectId's
//! counter it restarts at 0 each second and never wraps inside one: after 2^24 ids in a
//! second the process borrows the next second, so its ids stay strictly increasing, also when
//! the wall clock steps back.
//!
//! Ids stored by earlier versions (UUID v7, 32 hex digits) stay valid: ids are opaque
//! strings everywhere, and nothing depends on their length. An old id sorts before every new
//! one, as it is older.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How many hex digits a new id has.
pub const ID_LEN: usize = 24;

const COUNTER_LIMIT: u32 = 1 << 24;

/// A fresh, time-ordered identifier of [`ID_LEN`] lowercase hex digits.
///
/// Ids are the one place below the binary that reads the wall clock itself: an id is a name,
/// not a time anything is decided by, and callers everywhere need one without a clock.
pub fn new_id() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (seconds, counter) = next_sequence(u32::try_from(seconds).unwrap_or(u32::MAX));
    format_id(seconds, process_bytes(), counter)
}

/// Whether `text` has the shape of an id stevedore hands out now or handed out before (any
/// length up to 64 of letters, digits, `-` and `_`). Used to answer 404 early for garbage in a
/// path instead of querying for it.
pub fn looks_like_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `text` is an id in hex as stevedore makes them: 24 digits now, 32 in databases
/// made by earlier versions. Lets a client tell an id from a name.
pub fn is_hex_id(text: &str) -> bool {
    (text.len() == ID_LEN || text.len() == 32)
        && text
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

/// The last (seconds, counter) this process handed out.
static LAST: Mutex<(u32, u32)> = Mutex::new((0, 0));

/// The next (seconds, counter) after the last one, for a clock that reads `now_seconds`.
fn next_sequence(now_seconds: u32) -> (u32, u32) {
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let next = advance(*last, now_seconds);
    *last = next;
    next
}

/// The pure step of [`next_sequence`]: a later second starts the counter over; the same or an
/// earlier second (the clock stepped back) continues after the last id; a full counter moves
/// on to the next second.
fn advance((last_seconds, last_counter): (u32, u32), now_seconds: u32) -> (u32, u32) {
    if now_seconds > last_seconds {
        (now_seconds, 0)
    } else if last_counter + 1 < COUNTER_LIMIT {
        (last_seconds, last_counter + 1)
    } else {
        (last_seconds.saturating_add(1), 0)
    }
}

/// Five random bytes drawn once per process.
fn process_bytes() -> [u8; 5] {
    static BYTES: std::sync::OnceLock<[u8; 5]> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        let random = uuid::Uuid::new_v4();
        let mut bytes = [0; 5];
        bytes.copy_from_slice(&random.as_bytes()[..5]);
        bytes
    })
}

fn format_id(seconds: u32, process: [u8; 5], counter: u32) -> String {
    use std::fmt::Write;
    let mut id = String::with_capacity(ID_LEN);
    let counter = counter.to_be_bytes();
    for byte in seconds
        .to_be_bytes()
        .iter()
        .chain(process.iter())
        .chain(counter[1..].iter())
    {
        // Writing into a String cannot fail.
        let _ = write!(id, "{byte:02x}");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_24_hex_digits_and_ordered() {
        let ids: Vec<String> = (0..1000).map(|_| new_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), ID_LEN);
            assert!(is_hex_id(id), "{id}");
            assert!(looks_like_id(id));
        }
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
        }
        assert!(!looks_like_id("../etc"));
    }

    #[test]
    fn an_id_starts_with_its_seconds_and_ends_with_the_counter() {
        let id = format_id(0x6931_0a2b, [1, 2, 3, 4, 5], 7);
        assert_eq!(id, "69310a2b0102030405000007");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_secs())
            .unwrap_or_default();
        let fresh = new_id();
        let seconds = u64::from_str_radix(&fresh[..8], 16).unwrap();
        assert!(seconds.abs_diff(now) <= 2, "{fresh} vs {now}");
    }

    #[test]
    fn the_counter_restarts_each_second_and_never_goes_back() {
        assert_eq!(advance((10, 5), 11), (11, 0));
        assert_eq!(advance((10, 5), 10), (10, 6));
        // The clock stepped back: keep counting after the last id.
        assert_eq!(advance((10, 5), 9), (10, 6));
        // A full counter borrows the next second.
        assert_eq!(advance((10, COUNTER_LIMIT - 1), 10), (11, 0));
    }

    #[test]
    fn old_ids_still_count_as_ids_and_sort_before_new_ones() {
        let old = uuid::Uuid::now_v7().simple().to_string();
        assert!(is_hex_id(&old));
        assert!(looks_like_id(&old));
        assert!(old < new_id());
        assert!(!is_hex_id("hello"));
        assert!(!is_hex_id("69310A2B0102030405000007"));
    }
}
