//! Identifiers. Every id is a time-ordered UUID v7 written as 32 lowercase hex digits, so ids
//! sort by creation time and fit IronWorker clients that treat ids as opaque strings.

/// A fresh, time-ordered identifier.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Whether `text` has the shape of an id stevedore hands out. Used to answer 404 early for
/// garbage in a path instead of querying for it.
pub fn looks_like_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_time_ordered() {
        let first = new_id();
        let second = new_id();
        assert_eq!(first.len(), 32);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(first < second);
        assert!(looks_like_id(&first));
        assert!(!looks_like_id("../etc"));
    }
}
