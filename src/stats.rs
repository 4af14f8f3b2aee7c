//! Counters kept per queue, so that no cache line is shared by all workers on the I/O path.
//! They live as long as the process: a reconnecting frontend does not reset them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::virtio::request::{Rejected, RequestError, RequestType};

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
    /// Reads and writes carried out by the io_uring engine.
    pub ring_io: AtomicU64,
    /// Of those, the ones done at once on the worker (page-cache hits, buffered writes)
    /// without a trip through the ring.
    pub ring_inline: AtomicU64,
    /// Of those, the ones done again on the synchronous path (ring I/O failed or came up
    /// short, or a remap moved the data meanwhile).
    pub ring_redone: AtomicU64,
    /// Times the queue's thread woke (a kick, or the engine's completions) to work.
    pub wakeups: AtomicU64,
    /// Times polling found work after the ring had gone quiet: a wakeup, and most often a
    /// guest kick, saved.
    pub poll_hits: AtomicU64,
    /// Time from pop to completion.
    pub latency: Histogram,
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

    /// The counter of requests of `kind`.
    fn of_kind(&self, kind: RequestType) -> &AtomicU64 {
        match kind {
            RequestType::In => &self.reads,
            RequestType::Out => &self.writes,
            RequestType::Flush => &self.flushes,
            RequestType::GetId => &self.get_ids,
            RequestType::Discard => &self.discards,
            RequestType::WriteZeroes => &self.write_zeroes,
        }
    }

    /// Counts a request of `kind` moving `bytes` that completed, well or not.
    pub fn count(&self, kind: RequestType, bytes: u64, ok: bool) {
        Self::inc(self.of_kind(kind));
        if !ok {
            Self::inc(&self.errors);
            return;
        }
        match kind {
            RequestType::In => Self::add(&self.bytes_read, bytes),
            RequestType::Out => Self::add(&self.bytes_written, bytes),
            _ => {}
        }
    }

    /// Counts a chain the parser refused.
    pub fn count_rejected(&self, rej: &Rejected) {
        if let Some(kind) = rej.kind {
            Self::inc(self.of_kind(kind));
        }
        Self::inc(&self.errors);
        if matches!(rej.error, RequestError::Unsupported(_)) {
            Self::inc(&self.unsupported);
        } else {
            Self::inc(&self.malformed);
        }
    }
}

/// Declares [`Counters`] with the named [`QueueStats`] counters as fields, so that the list of
/// what `query-stats` reports is written once: the snapshot and the sum follow it.
macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// One queue's counters (or their sum over the queues) at one moment, as
        /// `query-stats` reports them.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct Counters {
            $(pub $name: u64,)*
        }

        impl QueueStats {
            /// The counters now. Each is read on its own (relaxed), as the I/O path writes
            /// them: a snapshot under load is not one instant.
            pub fn snapshot(&self) -> Counters {
                Counters {
                    $($name: QueueStats::get(&self.$name),)*
                }
            }
        }

        impl std::ops::Add for Counters {
            type Output = Counters;

            /// Field by field, saturating: a total never wraps round to small.
            fn add(self, other: Counters) -> Counters {
                Counters {
                    $($name: self.$name.saturating_add(other.$name),)*
                }
            }
        }
    };
}

counters!(
    reads,
    writes,
    flushes,
    discards,
    write_zeroes,
    bytes_read,
    bytes_written,
    errors,
    malformed,
    unsupported,
    abandoned,
    ring_io,
    ring_inline,
    ring_redone,
    wakeups,
    poll_hits,
);

impl std::iter::Sum for Counters {
    fn sum<I: Iterator<Item = Counters>>(iter: I) -> Counters {
        iter.fold(Counters::default(), |a, b| a + b)
    }
}

/// A latency summary in microseconds, as `query-stats` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// Latency histogram with power-of-two microsecond buckets: bucket `i` holds samples in
/// `[2^(i-1), 2^i)` us (bucket 0: under 1 us). Recording is one relaxed atomic add; quantiles
/// are read as the upper bound of the bucket they fall in, which is within a factor of two.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; 40],
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = (64 - us.leading_zeros() as usize).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn max_us(&self) -> u64 {
        self.max_us.load(Ordering::Relaxed)
    }

    pub fn summary(&self) -> Latency {
        Latency {
            p50: self.quantile_us(0.5),
            p99: self.quantile_us(0.99),
            max: self.max_us(),
        }
    }

    /// The latency (us) below which a fraction `q` of the samples fall; 0 with no samples.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let upper = if i == 0 { 1 } else { 1u64 << i };
                return upper.min(self.max_us()).max(1);
            }
        }
        self.max_us()
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

    /// The counters summed over all queues.
    pub fn totals(&self) -> Counters {
        self.queues.iter().map(QueueStats::snapshot).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_quantiles_land_in_the_right_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile_us(0.5), 0);
        for _ in 0..98 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(200));
        h.record(Duration::from_millis(250));
        assert_eq!(h.count(), 100);
        // 10 us falls in [8, 16).
        assert_eq!(h.quantile_us(0.5), 16);
        assert!(
            h.quantile_us(0.99) >= 200_000,
            "p99 {}",
            h.quantile_us(0.99)
        );
        assert_eq!(h.max_us(), 250_000);
        assert!(h.quantile_us(0.99) <= 250_000);
        assert_eq!(
            h.summary(),
            Latency {
                p50: 16,
                p99: h.quantile_us(0.99),
                max: 250_000
            }
        );
    }

    #[test]
    fn totals_add_up_the_queues_under_the_names_query_stats_uses() {
        let s = Stats::new(2);
        QueueStats::inc(&s.queue(0).reads);
        QueueStats::add(&s.queue(1).reads, 2);
        QueueStats::add(&s.queue(1).bytes_written, 4096);
        QueueStats::inc(&s.queue(1).get_ids);
        let t = s.totals();
        assert_eq!((t.reads, t.bytes_written, t.writes), (3, 4096, 0));
        let v = serde_json::to_value(t).unwrap();
        let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "abandoned",
                "bytes_read",
                "bytes_written",
                "discards",
                "errors",
                "flushes",
                "malformed",
                "poll_hits",
                "reads",
                "ring_inline",
                "ring_io",
                "ring_redone",
                "unsupported",
                "wakeups",
                "write_zeroes",
                "writes"
            ]
        );
    }
}
