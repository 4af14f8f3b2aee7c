//! How long a queue's worker keeps polling its ring and its engine's completions after work,
//! before it sleeps on the kick eventfd again (`--poll-us`, `--poll-max-us`).
//!
//! Polling saves the wakeup, and the guest's kick, that each request would otherwise cost: at
//! queue depth 1 that is most of a request's time. It costs the CPU time spent polling when no
//! work comes. `auto` (the default) sizes the window to the gaps the guest actually leaves,
//! after QEMU's `util/aio-posix.c` (`adjust_polling_time`): the window starts at zero, so an
//! idle queue only sleeps; each time work arrives after the worker went idle, the gap since
//! decides:
//!
//! - a gap within the first half of the window: polling caught it with room to spare; keep;
//! - a gap in the second half: caught, narrowly; grow, so jitter does not turn it into a miss;
//! - longer than the window but within the cap: a longer window would have caught it; grow;
//! - longer than the cap: no window we may poll for would have; shrink (halve, and to zero
//!   below the starting step), so a guest that went quiet stops costing CPU time.
//!
//! Growing doubles, from [`START`], up to the cap. Unlike QEMU, whose default shrink drops the
//! window to zero at once, halving keeps a bursty guest's window over one long pause.
//!
//! An idle queue costs nothing either way: the window is only spent after work, and once it
//! runs out the worker sleeps in `epoll_wait` with no timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The default cap of the adaptive window (`--poll-max-us`). Measured over 25-200 us
/// (docs/benchmark.md): 25 us is too short for a libblkio client's round trip at queue depth 1,
/// 50, 100 and 200 us do equally well, and 50 us polls the least for nothing.
pub const DEFAULT_MAX_US: u64 = 50;

/// The first window an idle queue grows to, and the smallest that shrinking keeps (QEMU
/// starts at 4 us as well: about one wakeup's cost).
pub const START: Duration = Duration::from_micros(4);

/// What `--poll-us` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polling {
    /// `--poll-us 0`: never poll; every request comes with a wakeup.
    Off,
    /// `--poll-us N`: poll until nothing happened for this long, every time.
    Fixed(Duration),
    /// `--poll-us auto`: a window per queue that follows the gaps between requests, at most
    /// `max`.
    Adaptive { max: Duration },
}

impl Default for Polling {
    fn default() -> Polling {
        Polling::Adaptive {
            max: Duration::from_micros(DEFAULT_MAX_US),
        }
    }
}

/// The adaptive rule: the next window, given the current one, the gap between the worker
/// going idle and the work that ended it, and the cap.
pub fn adjust(window: Duration, gap: Duration, max: Duration) -> Duration {
    if gap > max {
        let half = window / 2;
        return if half < START.min(max) {
            Duration::ZERO
        } else {
            half
        };
    }
    if gap <= window / 2 {
        return window;
    }
    let grown = if window.is_zero() {
        START
    } else {
        window.saturating_mul(2)
    };
    grown.min(max)
}

/// One queue's polling state. Only the queue's thread changes it; the control socket reads
/// the window (relaxed atomics: a report, not a synchronisation).
#[derive(Debug)]
pub struct PollWindow {
    policy: Polling,
    /// The window now, in nanoseconds.
    window_ns: AtomicU64,
    /// When the worker last went idle, in nanoseconds since `epoch` plus one; 0: not idle.
    idle_since: AtomicU64,
    epoch: Instant,
}

impl PollWindow {
    pub fn new(policy: Polling) -> PollWindow {
        let window = match policy {
            Polling::Off | Polling::Adaptive { .. } => Duration::ZERO,
            Polling::Fixed(d) => d,
        };
        PollWindow {
            policy,
            window_ns: AtomicU64::new(nanos(window)),
            idle_since: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// How long the worker polls after its next work before it sleeps.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// Work arrived at `now` (a kick, a completion, or polling found some): if the worker was
    /// idle, the gap since adjusts an adaptive window. Returns the window to poll for next.
    pub fn work_at(&self, now: Instant) -> Duration {
        let Polling::Adaptive { max } = self.policy else {
            return self.window();
        };
        let since = self.idle_since.swap(0, Ordering::Relaxed);
        if since == 0 {
            return self.window();
        }
        let Some(idle_at) = self.epoch.checked_add(Duration::from_nanos(since - 1)) else {
            return self.window();
        };
        let gap = now.saturating_duration_since(idle_at);
        let next = adjust(self.window(), gap, max);
        self.window_ns.store(nanos(next), Ordering::Relaxed);
        next
    }

    /// [`PollWindow::work_at`] now; reads the clock only where the window adapts.
    pub fn woke(&self) -> Duration {
        match self.policy {
            Polling::Adaptive { .. } => self.work_at(Instant::now()),
            Polling::Off | Polling::Fixed(_) => self.window(),
        }
    }

    /// [`PollWindow::idle_from`] now; reads the clock only where the window adapts.
    pub fn went_idle(&self) {
        if let Polling::Adaptive { .. } = self.policy {
            self.idle_from(Instant::now());
        }
    }

    /// The worker found no more work from `at` on (it polled its window out, or did not poll):
    /// the next work's gap counts from here.
    pub fn idle_from(&self, at: Instant) {
        if let Polling::Adaptive { .. } = self.policy {
            let ns = nanos(at.saturating_duration_since(self.epoch));
            self.idle_since
                .store(ns.saturating_add(1), Ordering::Relaxed);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);
    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn an_idle_queue_starts_small_and_doubles_up_to_the_cap() {
        let mut w = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..6 {
            // A guest that comes back 40 us after each completion.
            w = adjust(w, 40 * US, MAX);
            seen.push(w.as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 50, 50]);
    }

    #[test]
    fn a_window_with_room_to_spare_stays() {
        assert_eq!(adjust(32 * US, 10 * US, MAX), 32 * US);
        assert_eq!(adjust(32 * US, 16 * US, MAX), 32 * US);
        // Caught, but in the second half: grow before jitter makes it a miss.
        assert_eq!(adjust(32 * US, 17 * US, MAX), 50 * US);
        assert_eq!(adjust(16 * US, 12 * US, MAX), 32 * US);
    }

    #[test]
    fn gaps_past_the_cap_halve_the_window_down_to_zero() {
        let mut w = MAX;
        let mut seen = Vec::new();
        for _ in 0..6 {
            w = adjust(w, Duration::from_secs(10), MAX);
            seen.push(w.as_micros());
        }
        assert_eq!(seen, [25, 12, 6, 0, 0, 0]);
        // An idle queue stays at zero: nothing to halve.
        assert_eq!(adjust(Duration::ZERO, MAX + US, MAX), Duration::ZERO);
    }

    #[test]
    fn a_cap_below_the_start_is_still_a_cap() {
        let max = 2 * US;
        assert_eq!(adjust(Duration::ZERO, US, max), max);
        assert_eq!(adjust(max, US, max), max);
        // Half of it is below the smallest window worth polling for.
        assert_eq!(adjust(max, 3 * US, max), Duration::ZERO);
    }

    #[test]
    fn the_window_adapts_only_in_auto_and_only_after_idleness() {
        let auto = PollWindow::new(Polling::default());
        let fixed = PollWindow::new(Polling::Fixed(30 * US));
        let off = PollWindow::new(Polling::Off);
        // After the windows' epochs, as every instant a worker passes them is.
        let t0 = Instant::now();
        assert_eq!(auto.window(), Duration::ZERO);
        // Work that did not follow idleness (the first, or one found while busy) changes
        // nothing.
        assert_eq!(auto.work_at(t0), Duration::ZERO);
        auto.idle_from(t0);
        assert_eq!(auto.work_at(t0 + 10 * US), START);
        // The gap was taken: the same work seen twice does not count twice.
        assert_eq!(auto.work_at(t0 + 20 * US), START);
        auto.idle_from(t0 + 20 * US);
        // Then a second of silence: half the starting step is not worth polling for.
        assert_eq!(
            auto.work_at(t0 + 20 * US + Duration::from_secs(1)),
            Duration::ZERO
        );

        fixed.idle_from(t0);
        assert_eq!(fixed.work_at(t0 + Duration::from_secs(1)), 30 * US);
        assert_eq!(fixed.window(), 30 * US);

        off.idle_from(t0);
        assert_eq!(off.work_at(t0 + 10 * US), Duration::ZERO);
    }
}
