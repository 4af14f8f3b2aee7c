//! What the server is doing right now, shared with the control socket: the frontend session
//! being served (if any) and whether a quiesce or an exit is under way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::device::Device;
use super::inflight::DrainReport;
use super::vhu_blk::BlkBackend;
use crate::events::EventLog;

pub struct Live {
    current: Mutex<Option<BlkBackend>>,
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
    pub fn drain_done(&self, why: &str, report: &DrainReport) {
        if report.abandoned.is_empty() {
            log::info!(
                "drain on {why}: waited for {} requests, {:?}",
                report.waited_for,
                report.duration
            );
        } else {
            log::error!(
                "drain on {why}: gave up on {} of {} requests after {:?} (completed with IOERR)",
                report.abandoned.len(),
                report.waited_for,
                report.duration
            );
        }
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

    pub fn set_current(&self, backend: Option<BlkBackend>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = backend;
    }

    /// The session being served; a clone, so no lock is held while it is used.
    pub fn current(&self) -> Option<BlkBackend> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub fn set_quiescing(&self, on: bool) {
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
