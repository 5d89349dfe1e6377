//! The bytes queued for the clients of one hub, against one limit.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The bytes held for the clients of one hub and their limit (`[hub] outbox_total_bytes`):
/// every connection's outbox (the Python `Outbox` adds and frees what it queues) and the
/// fan-out's backlog (the fan-out made with it counts its own), shared through an `Arc`.
///
/// The counter is atomic so that it can be shared without a lock (the binding's
/// `OutboxBudget` is frozen); the fan-out's writer threads never touch it.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    held: AtomicUsize,
}

impl Default for Budget {
    /// No limit.
    fn default() -> Self {
        Budget::new(usize::MAX)
    }
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// The most bytes all outboxes and backlogs may hold together.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The bytes they hold now.
    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    /// Whether `size` more bytes stay within the limit.
    pub fn fits(&self, size: usize) -> bool {
        self.held().saturating_add(size) <= self.limit
    }

    /// Counts `size` more bytes as held (even past the limit: callers check `fits` first
    /// where the limit applies).
    pub fn add(&self, size: usize) {
        self.held.fetch_add(size, Relaxed);
    }

    /// Frees `size` bytes; false (and nothing changes) if fewer are held.
    pub fn sub(&self, size: usize) -> bool {
        self.held
            .fetch_update(Relaxed, Relaxed, |held| held.checked_sub(size))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_to_its_limit_and_refuses_to_free_what_it_does_not_hold() {
        let budget = Budget::new(100);
        assert!(budget.fits(100));
        budget.add(60);
        assert!(budget.fits(40));
        assert!(!budget.fits(41));
        budget.add(60); // past the limit: counted, so the excess is visible
        assert_eq!(budget.held(), 120);
        assert!(!budget.sub(121));
        assert_eq!(budget.held(), 120);
        assert!(budget.sub(120));
        assert_eq!(budget.held(), 0);
        assert!(!budget.fits(usize::MAX)); // saturates, does not wrap
        assert!(Budget::default().fits(usize::MAX));
    }
}
