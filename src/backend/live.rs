//! What the server is doing right now, shared with the control socket: the frontend session
//! being served (if any) and whether a quiesce or an exit is under way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::device::Device;
use super::vhu_blk::BlkBackend;

#[derive(Default)]
pub struct Live {
    current: Mutex<Option<BlkBackend>>,
    stopping: AtomicBool,
    quiescing: AtomicBool,
}

impl Live {
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
