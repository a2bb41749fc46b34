//! Rate limiting of the master's connection-limit log and audit lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);

/// At most `burst` limit-refusal lines per second; the rest are counted per client uid and
/// limit, and each count is reported once its second is over (A5), so that a flood that
/// stops is still accounted for in full.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Instant,
    in_window: u32,
    suppressed: BTreeMap<(u32, &'static str), u64>,
}

impl RateLimit {
    pub fn new(burst: u32) -> Self {
        RateLimit {
            burst,
            window: Instant::now(),
            in_window: 0,
            suppressed: BTreeMap::new(),
        }
    }

    /// Whether this refusal may be logged; if not, it is counted. Take what is
    /// [`due`](Self::due) first, so that counts come out in order.
    pub fn admit(&mut self, now: Instant, uid: u32, limit: &'static str) -> bool {
        if now.duration_since(self.window) >= WINDOW {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            true
        } else {
            *self.suppressed.entry((uid, limit)).or_default() += 1;
            false
        }
    }

    /// When counts not yet reported are due (the end of their window).
    pub fn due(&self) -> Option<Instant> {
        (!self.suppressed.is_empty()).then(|| self.window + WINDOW)
    }

    /// The counts whose window is over: (uid, limit, refusals not logged).
    pub fn take_due(&mut self, now: Instant) -> Vec<(u32, &'static str, u64)> {
        match self.due() {
            Some(d) if now >= d => {}
            _ => return Vec::new(),
        }
        std::mem::take(&mut self.suppressed)
            .into_iter()
            .map(|((uid, limit), n)| (uid, limit, n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_what_it_drops_and_reports_it_when_its_second_is_over() {
        let mut r = RateLimit::new(2);
        // A second after it was made: the first refusal starts a window at t0.
        let t0 = Instant::now() + WINDOW;
        assert!(r.admit(t0, 7, "a"));
        assert!(r.admit(t0, 7, "a"));
        assert!(!r.admit(t0, 7, "a"));
        assert!(!r.admit(t0, 8, "b"));
        assert!(!r.admit(t0, 7, "a"));
        assert!(r.take_due(t0 + Duration::from_millis(999)).is_empty());
        let t1 = r.due().expect("counts are due");
        assert_eq!(t1, t0 + WINDOW);
        assert_eq!(r.take_due(t1), vec![(7, "a", 2), (8, "b", 1)]);
        assert_eq!(r.due(), None);
        assert!(r.admit(t1, 7, "a"));
        assert!(r.take_due(t1 + WINDOW).is_empty());
    }
}
