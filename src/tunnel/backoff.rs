//! Exponential backoff with full jitter.
//!
//! The delay grows `base * 2^attempt` up to `cap`, and the wait is drawn
//! uniformly from [delay/2, delay] so that a hub restart does not get every
//! agent back at the same instant. The attempt counter resets only after a
//! session has stayed up for `stable` — a tunnel that flaps right after the
//! handshake keeps backing off instead of hammering the hub.

use std::time::Duration;

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
            stable: Duration::from_secs(30),
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
        b.session_ended(Duration::from_secs(31));
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
