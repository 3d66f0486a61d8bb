//! A task's log, capped: at most a cap of bytes in all, the last of them the truncation
//! marker. The plan of an append is pure, so the store (which writes it into its tables) and a
//! local run (which keeps the log in memory) cut a log exactly alike.

/// How to add bytes to a log that may not grow past its cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAppendPlan {
    /// Cut the stored log back to this many bytes first (to make room for the marker).
    pub truncate_to: Option<u64>,
    /// Chunks to append, each with its byte offset in the log.
    pub chunks: Vec<(u64, Vec<u8>)>,
    /// The log's size afterwards.
    pub new_size: u64,
    /// Whether the log is now truncated.
    pub truncated: bool,
}

/// The line that ends a log cut at its cap.
pub fn truncation_marker(cap: u64) -> String {
    format!("\n[stevedore: log truncated at {cap} bytes]\n")
}

/// Where the truncation marker begins in a log that reached its cap: a truncated log is exactly
/// `cap` bytes long and ends with the marker (cut to the cap when the cap is smaller).
pub fn truncation_marker_start(size: u64) -> u64 {
    let marker = u64::try_from(truncation_marker(size).len()).unwrap_or(u64::MAX);
    size - marker.min(size)
}

/// Plans an append of `bytes` to a log of `size` bytes that may hold at most `cap` bytes in
/// total, marker included. Returns `None` when nothing is to be written.
pub fn plan_log_append(
    size: u64,
    truncated: bool,
    bytes: &[u8],
    cap: u64,
) -> Option<LogAppendPlan> {
    if truncated || bytes.is_empty() {
        return None;
    }
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if size.saturating_add(len) <= cap {
        return Some(LogAppendPlan {
            truncate_to: None,
            chunks: vec![(size, bytes.to_vec())],
            new_size: size + len,
            truncated: false,
        });
    }
    let marker = truncation_marker(cap);
    let marker = &marker.as_bytes()[..marker.len().min(usize::try_from(cap).unwrap_or(usize::MAX))];
    let marker_len = u64::try_from(marker.len()).unwrap_or(u64::MAX);
    // The user's bytes that fit in front of the marker.
    let kept = cap - marker_len;
    let mut plan = LogAppendPlan {
        truncate_to: None,
        chunks: Vec::with_capacity(2),
        new_size: cap,
        truncated: true,
    };
    if size > kept {
        plan.truncate_to = Some(kept);
    } else if size < kept {
        let room = usize::try_from(kept - size).unwrap_or(usize::MAX);
        plan.chunks
            .push((size, bytes[..room.min(bytes.len())].to_vec()));
    }
    if !marker.is_empty() {
        plan.chunks.push((kept, marker.to_vec()));
    }
    Some(plan)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn log_below_cap_is_appended_whole() {
        let plan = plan_log_append(10, false, b"hello", 100).unwrap();
        assert_eq!(plan.chunks, vec![(10, b"hello".to_vec())]);
        assert_eq!(plan.new_size, 15);
        assert!(!plan.truncated);
    }

    #[test]
    fn log_over_cap_ends_with_the_marker_at_exactly_the_cap() {
        let cap = 100;
        let marker = truncation_marker(cap);
        let plan = plan_log_append(0, false, &[b'x'; 500], cap).unwrap();
        let kept = cap - marker.len() as u64;
        assert_eq!(plan.truncate_to, None);
        assert_eq!(plan.chunks[0], (0, vec![b'x'; kept as usize]));
        assert_eq!(plan.chunks[1], (kept, marker.into_bytes()));
        assert_eq!(plan.new_size, cap);
        assert!(plan.truncated);
        assert_eq!(plan_log_append(cap, true, b"more", cap), None);
    }

    #[test]
    fn a_full_log_is_cut_back_to_make_room_for_the_marker() {
        let plan = plan_log_append(100, false, b"y", 100).unwrap();
        let kept = 100 - truncation_marker(100).len() as u64;
        assert_eq!(plan.truncate_to, Some(kept));
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.new_size, 100);
    }

    #[test]
    fn the_marker_start_matches_the_plan() {
        for (size, cap, bytes) in [(0, 100, 500), (100, 100, 1), (0, 5, 11), (10, 1000, 2000)] {
            let plan = plan_log_append(size, false, &vec![b'x'; bytes], cap).unwrap();
            let (marker_at, _) = plan.chunks.last().unwrap();
            assert_eq!(
                truncation_marker_start(plan.new_size),
                *marker_at,
                "cap {cap}"
            );
        }
    }

    #[test]
    fn a_cap_smaller_than_the_marker_keeps_part_of_the_marker() {
        let plan = plan_log_append(0, false, b"hello world", 5).unwrap();
        assert_eq!(plan.chunks, vec![(0, b"\n[ste".to_vec())]);
        assert_eq!(plan.new_size, 5);
    }
}
