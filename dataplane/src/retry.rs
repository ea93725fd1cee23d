//! How long to wait before trying a failed write again.

use std::time::Duration;

/// How long to wait before retrying a failed apply: doubling from 100 ms to 5 s, back to the
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
