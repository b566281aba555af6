//! Exponential backoff with jitter, for every retry loop on either side (the
//! client's reconnections and refetches, the server's object-store retries).
//!
//! Each delay is drawn uniformly from the upper half of the current step
//! ("equal jitter"): never shorter than half the step, so a failing peer is
//! never retried in a hot loop, and spread over the other half, so that many
//! clients failing together (64 pagers losing one server) do not come back
//! in lockstep. The step doubles per failure up to a cap and starts again
//! from the first after a success ([`Backoff::reset`]).
//!
//! The randomness is a small generator seeded per [`Backoff`] from the
//! standard library's per-process random hash keys and the clock: enough to
//! decorrelate retries, no cryptographic claim, no dependency.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

/// Exponential backoff with equal jitter (see the module docs).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
    attempts: u32,
    rng: u64,
}

impl Backoff {
    /// Steps from `initial`, doubling per failure up to `max` (at least
    /// `initial`); `initial` of zero is taken as one millisecond, so that no
    /// loop using this can spin.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let mut seed = RandomState::new().build_hasher();
        seed.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Self {
            initial,
            max: max.max(initial),
            step: initial,
            attempts: 0,
            rng: seed.finish() | 1,
        }
    }

    /// The pause before the next attempt, in `[step/2, step]`; then doubles
    /// the step (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        let half = step / 2;
        let span = (step - half).as_nanos().max(1) as u64;
        half + Duration::from_nanos(self.next_u64() % (span + 1))
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// A success: the next failure waits from the first step again.
    pub fn reset(&mut self) {
        self.step = self.initial;
        self.attempts = 0;
    }

    /// splitmix64.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays stay within [step/2, step], the step doubles to the cap, and a reset starts over.
    #[test]
    fn delays_double_within_jitter_bounds() {
        let (initial, max) = (Duration::from_millis(20), Duration::from_secs(1));
        let mut b = Backoff::new(initial, max);
        let mut step = initial;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(max);
        }
        assert_eq!(b.attempts(), 12);
        b.reset();
        assert!(b.next_delay() <= initial);
    }

    /// Two backoffs started together draw different delays: clients failing at once spread out.
    #[test]
    fn concurrent_backoffs_are_decorrelated() {
        let delays = |b: &mut Backoff| (0..8).map(|_| b.next_delay()).collect::<Vec<_>>();
        let mut a = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut c = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_ne!(delays(&mut a), delays(&mut c));
    }

    /// A zero initial step still pauses: no retry loop can spin.
    #[test]
    fn zero_initial_step_never_spins() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next_delay() >= Duration::from_micros(500));
    }
}
