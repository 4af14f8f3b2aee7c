//! Whether this process may change the spare file and, for the remap layer's own moves, the
//! image: open while it is the writer of both (see `handover`), closed while it waits to take
//! over or after it handed them to another process.
//!
//! Guest I/O is kept from the files by the handover itself (no queue runs unless the process
//! is the writer, and the writer yields only once every queue is drained), so the I/O path only
//! looks at [`WriteGate::is_open`]. What changes the files outside guest I/O (remap-add,
//! remap-remove, auto-remap) holds a [`Permit`] while it does, and closing the gate waits for
//! those to finish: a control command cannot be half way through a table change when the
//! writer lock passes to another process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("this process is not the writer of the image and spare file (it waits to take over in a migration, or handed them to another process; see query-status), so it changes neither; nothing was changed")]
pub struct Closed;

pub struct WriteGate {
    /// The state for the I/O path: one load.
    open: AtomicBool,
    /// Permits out; `open` changes only under this lock.
    permits: Mutex<usize>,
    none_out: Condvar,
}

/// Leave to change the files until dropped.
pub struct Permit<'a>(&'a WriteGate);

impl WriteGate {
    pub fn new(open: bool) -> WriteGate {
        WriteGate {
            open: AtomicBool::new(open),
            permits: Mutex::new(0),
            none_out: Condvar::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Leave to change the files, held until the permit is dropped; refused while closed.
    pub fn permit(&self) -> Result<Permit<'_>, Closed> {
        let mut n = self.permits.lock().unwrap_or_else(|p| p.into_inner());
        if !self.is_open() {
            return Err(Closed);
        }
        *n += 1;
        Ok(Permit(self))
    }

    pub fn open(&self) {
        let _n = self.permits.lock().unwrap_or_else(|p| p.into_inner());
        self.open.store(true, Ordering::Release);
    }

    /// Closes the gate once no permit is out, waiting for them at most `timeout`. False, and
    /// the gate left open, when one is still out then.
    pub fn close(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = self.permits.lock().unwrap_or_else(|p| p.into_inner());
        // No new permit while we wait: closed now, opened again if the wait fails.
        self.open.store(false, Ordering::Release);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.open.store(true, Ordering::Release);
                return false;
            }
            n = self
                .none_out
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut n = self.0.permits.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.none_out.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn closing_waits_for_permits_and_refuses_new_ones() {
        let g = Arc::new(WriteGate::new(true));
        let p = g.permit().unwrap();
        assert!(
            !g.close(Duration::from_millis(20)),
            "a permit is out: still open"
        );
        assert!(g.is_open());
        let closer = {
            let g = Arc::clone(&g);
            std::thread::spawn(move || g.close(Duration::from_secs(30)))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.is_open() {
            assert!(Instant::now() < deadline, "close never started");
            std::thread::yield_now();
        }
        assert!(g.permit().is_err(), "no new permit while closing");
        drop(p);
        assert!(closer.join().unwrap());
        assert!(!g.is_open() && g.permit().is_err());
        g.open();
        assert!(g.permit().is_ok());
        assert!(!WriteGate::new(false).is_open());
    }
}
