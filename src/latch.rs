//! A one-shot gate that held requests wait behind: released once, from any thread, it wakes
//! whoever registered a waker (a queue's event loop) and stays open. It also counts the
//! requests behind it, so `fault-release` can say how many it let go and `fault-list` how many
//! wait.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Called once when the latch opens. It must not block: it runs on the releasing thread (a
/// control command), typically writing an eventfd.
pub type Waker = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct Latch {
    released: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
    /// Requests behind the latch now: one per live [`Ticket`].
    held: AtomicUsize,
}

impl Latch {
    pub fn new() -> Arc<Latch> {
        Arc::new(Latch::default())
    }

    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Requests behind the latch now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Counts one more request behind the latch until the ticket is dropped.
    pub fn enter(self: &Arc<Self>) -> Ticket {
        self.held.fetch_add(1, Ordering::AcqRel);
        Ticket(self.clone())
    }

    /// Calls `waker` once the latch is released: now, if it already is.
    pub fn on_release(&self, waker: Waker) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock `release` takes: a release either sees this waker or happened
        // before, and then the flag says so here.
        if self.is_released() {
            drop(wakers);
            waker();
        } else {
            wakers.push(waker);
        }
    }

    /// Opens the latch and wakes every waiter. Returns how many requests were behind it
    /// (0 when it had been released already).
    pub fn release(&self) -> usize {
        let wakers = {
            let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
            if self.released.swap(true, Ordering::AcqRel) {
                return 0;
            }
            std::mem::take(&mut *w)
        };
        let held = self.held();
        for wake in wakers {
            wake();
        }
        held
    }
}

impl fmt::Debug for Latch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Latch")
            .field("released", &self.is_released())
            .field("held", &self.held())
            .finish()
    }
}

impl PartialEq for Latch {
    /// A latch is only ever itself: two are alike when they are the same one.
    fn eq(&self, other: &Latch) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Latch {}

/// One request behind a latch; dropping it (the request went on, or was given up on) takes
/// it out of the latch's count.
#[derive(Debug)]
pub struct Ticket(Arc<Latch>);

impl Ticket {
    pub fn latch(&self) -> &Arc<Latch> {
        &self.0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PartialEq for Ticket {
    /// Two tickets are alike when they wait behind the same latch.
    fn eq(&self, other: &Ticket) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Ticket {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn release_wakes_each_waiter_once_and_counts_the_tickets() {
        let l = Latch::new();
        let woken = Arc::new(AtomicU32::new(0));
        let (a, b) = (l.enter(), l.enter());
        for _ in 0..2 {
            let w = woken.clone();
            l.on_release(Box::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            }));
        }
        assert_eq!(l.held(), 2);
        drop(b);
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        assert_eq!(l.release(), 1);
        assert_eq!(woken.load(Ordering::SeqCst), 2);
        assert!(l.is_released());
        assert_eq!(l.release(), 0, "a second release lets nothing more go");
        // A waiter that comes after the release is woken at once.
        let w = woken.clone();
        l.on_release(Box::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(woken.load(Ordering::SeqCst), 3);
        drop(a);
        assert_eq!(l.held(), 0);
    }
}
