//! What the server is doing right now, shared with the control socket: the frontend session
//! being served (if any) and whether a quiesce or an exit is under way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use super::device::Device;
use super::inflight::{DrainReport, Phase};
use super::session::Session;
use crate::events::EventLog;

/// What `quiesce` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct QuiesceReport {
    pub duration_us: u64,
    /// Requests in flight when the drain began.
    pub waited_for: usize,
    /// Requests still in flight at the drain timeout, completed with IOERR.
    pub abandoned: usize,
    /// Requests in flight once it returned (0 unless a stuck one is still running).
    pub inflight: usize,
}

pub struct Live {
    current: Mutex<Option<Arc<Session>>>,
    stopping: AtomicBool,
    quiescing: AtomicBool,
    pub events: Arc<EventLog>,
}

impl Live {
    pub fn new(events: Arc<EventLog>) -> Live {
        Live {
            current: Mutex::new(None),
            stopping: AtomicBool::new(false),
            quiescing: AtomicBool::new(false),
            events,
        }
    }

    /// Reports a finished drain, in the log and the event log: why, how long, how many
    /// requests, how many abandoned.
    pub(crate) fn drain_done(&self, why: &str, report: &DrainReport) {
        report.log(why);
        self.events.emit(
            "drain",
            json!({
                "reason": why,
                "duration_us": report.duration.as_micros() as u64,
                "waited_for": report.waited_for,
                "abandoned": report.abandoned.len(),
            }),
        );
    }

    /// `quiesce`: no queue takes descriptors any more (whichever frontend is connected, now or
    /// later) and every accepted request is complete, or was given up on at the drain timeout.
    pub fn quiesce(&self, dev: &Device) -> QuiesceReport {
        let start = Instant::now();
        dev.set_quiesced(true);
        let mut out = QuiesceReport::default();
        if let Some(backend) = self.current() {
            self.set_quiescing(true);
            let report = backend.drain_all(Phase::Stopped);
            self.set_quiescing(false);
            self.drain_done("quiesce", &report);
            out.waited_for = report.waited_for;
            out.abandoned = report.abandoned.len();
            out.inflight = backend.inflight();
        }
        out.duration_us = start.elapsed().as_micros() as u64;
        self.events.emit(
            "quiesce",
            json!({ "duration_us": out.duration_us, "waited_for": out.waited_for }),
        );
        out
    }

    /// `resume`: queues take descriptors again. Returns whether the device was quiesced.
    pub fn resume(&self, dev: &Device) -> bool {
        let was = dev.is_quiesced();
        dev.set_quiesced(false);
        if let Some(b) = self.current() {
            // A kick that came while quiesced was consumed without popping anything.
            b.poke();
        }
        self.events.emit("resume", json!({ "was_quiesced": was }));
        was
    }

    /// What a freshly powered disk resets (`power-on`): the guest's cache mode goes back to
    /// writeback, as a new session starts. Whether a session was there to reset.
    pub fn reset_cache_mode(&self) -> bool {
        self.current()
            .map(|s| s.writeback.store(true, Ordering::Relaxed))
            .is_some()
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        self.current().is_some()
    }

    /// Requests accepted and not yet completed, over all queues (0 with no frontend).
    pub fn inflight(&self) -> usize {
        self.current().map_or(0, |b| b.inflight())
    }

    /// Requests accepted and not yet completed on queue `q`.
    pub fn queue_inflight(&self, q: usize) -> usize {
        self.current().map_or(0, |b| b.queue_inflight(q))
    }

    /// How long queue `q`'s worker polls after its next work (0 with no frontend).
    pub fn queue_poll_window(&self, q: usize) -> std::time::Duration {
        self.current()
            .and_then(|b| b.poll_window(q))
            .unwrap_or_default()
    }

    pub(crate) fn set_current(&self, backend: Option<Arc<Session>>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = backend;
    }

    /// The session being served; a clone, so no lock is held while it is used.
    pub(crate) fn current(&self) -> Option<Arc<Session>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the connected frontend's requests are recorded in an inflight region
    /// (INFLIGHT_SHMFD), so that they survive a crash of this process.
    pub fn inflight_tracking(&self) -> bool {
        self.current().is_some_and(|s| s.inflight_tracking())
    }

    /// Whether the pages the backend writes are logged for a migration now.
    pub fn dirty_logging(&self) -> bool {
        self.current().is_some_and(|s| s.logging())
    }

    pub(crate) fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn set_quiescing(&self, on: bool) {
        self.quiescing.store(on, Ordering::Release);
    }

    /// `waiting` | `running` | `quiescing` | `quiesced` | `stopping`.
    pub fn state(&self, dev: &Device) -> &'static str {
        if self.stopping.load(Ordering::Acquire) {
            "stopping"
        } else if self.quiescing.load(Ordering::Acquire) {
            "quiescing"
        } else if dev.is_quiesced() {
            "quiesced"
        } else if self.current().is_some() {
            "running"
        } else {
            "waiting"
        }
    }
}
