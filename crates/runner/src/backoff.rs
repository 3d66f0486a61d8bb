//! Exponential backoff for tasks the infrastructure failed.

use std::time::Duration;

/// How long a task waits before it runs again after its `failed_before + 1`-th
/// infrastructure failure: `base`, doubled for every earlier failure, at most `max`.
pub fn requeue_delay(failed_before: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(failed_before.min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        let delays: Vec<u64> = (0..7)
            .map(|n| requeue_delay(n, base, max).as_secs())
            .collect();
        assert_eq!(delays, vec![2, 4, 8, 16, 32, 60, 60]);
    }

    proptest! {
        #[test]
        fn never_exceeds_the_cap_and_never_shrinks(
            failed_before in 0u32..1000,
            base_ms in 0u64..100_000,
            max_ms in 0u64..10_000_000,
        ) {
            let base = Duration::from_millis(base_ms);
            let max = Duration::from_millis(max_ms);
            let delay = requeue_delay(failed_before, base, max);
            prop_assert!(delay <= max);
            prop_assert!(delay >= base.min(max));
            prop_assert!(requeue_delay(failed_before + 1, base, max) >= delay);
        }
    }
}
