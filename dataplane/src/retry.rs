//! How long to wait before trying a failed write again.

use std::time::Duration;

/// How long to wait before trying again (a failed apply, a lost events stream): doubling from
/// 100 ms to 5 s, back to the
/// start after a success (as controllers requeue on error).
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub const fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The wait before the next try, after a failure.
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Backoff;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u128> = (0..8).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(100));
    }
}
