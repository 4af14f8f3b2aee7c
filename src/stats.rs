//! Counters kept per queue, so that no cache line is shared by all workers on the I/O path.
//! They live as long as the process: a reconnecting frontend does not reset them.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub get_ids: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests that completed with a status other than OK, for any reason.
    pub errors: AtomicU64,
    /// Chains the parser rejected (bad framing, out of range, wrong direction, ...).
    pub malformed: AtomicU64,
    /// Requests of a type the device does not implement (VIRTIO_BLK_S_UNSUPP).
    pub unsupported: AtomicU64,
    /// Requests a drain gave up on and completed with IOERR.
    pub abandoned: AtomicU64,
}

impl QueueStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct Stats {
    queues: Vec<QueueStats>,
}

impl Stats {
    pub fn new(num_queues: usize) -> Stats {
        Stats {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
        }
    }

    pub fn queue(&self, index: usize) -> &QueueStats {
        &self.queues[index.min(self.queues.len() - 1)]
    }

    pub fn queues(&self) -> &[QueueStats] {
        &self.queues
    }

    /// Sum of one counter over all queues.
    pub fn total(&self, pick: impl Fn(&QueueStats) -> &AtomicU64) -> u64 {
        self.queues.iter().map(|q| QueueStats::get(pick(q))).sum()
    }
}
