//! Rate limiting of the master's connection-limit log and audit lines.

use std::time::{Duration, Instant};

/// At most `burst` limit-refusal lines per second; the rest are counted and the count is
/// reported with the next line that gets through (A5).
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Instant,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(burst: u32) -> Self {
        RateLimit {
            burst,
            window: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(suppressed so far)` when this event may be logged.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_what_it_drops() {
        let mut r = RateLimit::new(2);
        let t0 = Instant::now();
        assert_eq!(r.admit(t0), Some(0));
        assert_eq!(r.admit(t0), Some(0));
        assert_eq!(r.admit(t0), None);
        assert_eq!(r.admit(t0), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.admit(t1), Some(2));
        assert_eq!(r.admit(t1), Some(0));
    }
}
