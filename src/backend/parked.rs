//! A queue's parked requests: accepted and in flight, but waiting before they start (a delay
//! or hang fault, see `BlockIo::hold`). They wait here, not on the worker, so every other
//! request of the queue goes on; the queue's event loop sleeps at most until the earliest
//! deadline and starts each one once it is due or its latch opens.
//!
//! What must stay true: a parked request is in the queue's in-flight table (a drain waits for
//! it, or gives up on it and completes it), and one a drain gave up on never starts: the
//! worker checks [`Parked::run`] and the table first, and a drain that gave up clears the list.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::io::Job;
use crate::storage::Hold;

pub struct Parked {
    pub job: Job,
    /// The run of the queue it was popped in: a head a later run reuses is another request.
    pub run: u64,
    pub hold: Hold,
}

impl Parked {
    fn ready(&self, now: Instant) -> bool {
        match &self.hold {
            Hold::Until(t) => *t <= now,
            Hold::Released(ticket) => ticket.latch().is_released(),
        }
    }
}

/// One queue's parked list. Only the queue's thread parks and starts; a drain that gave up
/// clears it from another thread, hence the lock (never contended on the I/O path).
#[derive(Default)]
pub struct Parking {
    list: Mutex<Vec<Parked>>,
    /// How many are parked, so the event loop learns that none is without the lock.
    len: AtomicUsize,
}

impl Parking {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        // Every change is one push or one retain: a panic cannot leave the list half changed.
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn park(&self, p: Parked) {
        let mut list = self.lock();
        list.push(p);
        self.len.store(list.len(), Ordering::Release);
    }

    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// Takes out those due at `now` or whose latch opened, in the order they were parked.
    pub fn take_ready(&self, now: Instant) -> Vec<Parked> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut list = self.lock();
        let (ready, wait): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|p| p.ready(now));
        *list = wait;
        self.len.store(list.len(), Ordering::Release);
        ready
    }

    /// How long the event loop may sleep, in epoll's terms: ms until the earliest deadline,
    /// rounded up (so it wakes when the request is due, not a little before), or -1 when no
    /// parked request has one (a latch's release wakes the loop itself).
    pub fn timeout_ms(&self, now: Instant) -> i32 {
        if self.is_empty() {
            return -1;
        }
        let list = self.lock();
        let earliest = list
            .iter()
            .filter_map(|p| match p.hold {
                Hold::Until(t) => Some(t),
                Hold::Released(_) => None,
            })
            .min();
        match earliest {
            None => -1,
            Some(t) => {
                let ns = t.saturating_duration_since(now).as_nanos();
                i32::try_from(ns.div_ceil(1_000_000)).unwrap_or(i32::MAX)
            }
        }
    }

    /// Drops every parked request without starting it (a drain gave up on them and completed
    /// them already). Returns how many.
    pub fn clear(&self) -> usize {
        let mut list = self.lock();
        let n = list.len();
        list.clear();
        self.len.store(0, Ordering::Release);
        n
    }
}
