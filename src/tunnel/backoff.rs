//! Exponential backoff with "equal jitter" (half the delay fixed, half drawn).
//!
//! The delay grows `base * 2^attempt` up to `cap`, and the wait is drawn
//! uniformly from [delay/2, delay] so that a hub restart does not get every
//! agent back at the same instant. The attempt counter resets only after a
//! session has stayed up for `stable` (10 s) — a tunnel that flaps right
//! after the handshake keeps backing off instead of hammering the hub. Not
//! longer: a load balancer that ends every connection at a fixed lifetime
//! (GCP's backend timeout, 30 s by default) cut sessions just short of a
//! 30 s `stable`, and the backoff grew to its cap (a member down up to half
//! the time).

use std::time::Duration;

/// How long a session must have lasted for the next failure to start
/// the backoff over.
pub const STABLE: Duration = Duration::from_secs(10);

/// The lifetime at which something cuts every session, if the last three
/// (`uptimes`, oldest first) each lasted within a second or two of the
/// same length, of at least 3 s (shorter is a refusal after login, not a
/// lifetime): a load balancer's or proxy's connection lifetime, which the
/// agent cannot fix, but its operator can.
pub fn fixed_lifetime(uptimes: &[Duration]) -> Option<Duration> {
    let last: &[Duration] = uptimes.get(uptimes.len().checked_sub(3)?..)?;
    let (lo, hi) = (*last.iter().min()?, *last.iter().max()?);
    (lo >= Duration::from_secs(3) && hi - lo <= Duration::from_secs(2)).then_some(hi)
}

#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub stable: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            stable: STABLE,
            attempt: 0,
        }
    }

    /// Number of failed attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Upper bound of the next wait, without jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Next wait, with jitter in [ceiling/2, ceiling]; counts an attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceil = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let jitter: f64 = rand::random::<f64>();
        ceil.mul_f64(0.5 + 0.5 * jitter)
    }

    /// A session ended after having been up for `uptime`.
    pub fn session_ended(&mut self, uptime: Duration) {
        if uptime >= self.stable {
            self.attempt = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut last_ceiling = Duration::ZERO;
        for _ in 0..10 {
            let ceil = b.ceiling();
            let d = b.next_delay();
            assert!(
                d <= ceil && d >= ceil / 2,
                "{d:?} not in [{:?}, {ceil:?}]",
                ceil / 2
            );
            assert!(ceil >= last_ceiling);
            last_ceiling = ceil;
        }
        assert_eq!(last_ceiling, Duration::from_secs(2));
    }

    #[test]
    fn resets_only_after_a_stable_session() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..5 {
            b.next_delay();
        }
        b.session_ended(Duration::from_secs(1));
        assert_eq!(b.attempt(), 5, "a short session must not reset the backoff");
        b.session_ended(Duration::from_millis(9_900));
        assert_eq!(b.attempt(), 5, "under 10 s is not stable");
        // Cut at GCP's default backend timeout: long enough.
        b.session_ended(Duration::from_millis(29_800));
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn sessions_cut_at_one_length_are_told_apart() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(
            fixed_lifetime(&[ms(29_800), ms(29_900), ms(29_700)]),
            Some(ms(29_900))
        );
        assert_eq!(
            fixed_lifetime(&[s(400), ms(59_000), ms(60_100), ms(59_800)]),
            Some(ms(60_100))
        );
        assert_eq!(
            fixed_lifetime(&[s(30), s(30)]),
            None,
            "two are not a pattern"
        );
        assert_eq!(fixed_lifetime(&[s(30), s(95), s(31)]), None);
        assert_eq!(
            fixed_lifetime(&[s(2), s(2), s(2)]),
            None,
            "flapping, not a lifetime"
        );
        assert_eq!(
            fixed_lifetime(&[s(5), s(5), s(5)]),
            Some(s(5)),
            "short, but one age"
        );
    }
}
