//! `overlay-reset` and `overlay-commit` as the control socket runs them: with every queue
//! quiesced (the drain contract: no request is in flight while the files change under the
//! stack) and the remap table's gate closed (no remap-add or remap-remove half done), then
//! the table reloaded from the spare copy, which has just changed under it.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use thiserror::Error;

use super::{Applied, Overlay};
use crate::backend::{Device, Live};
use crate::remap::RemapTable;

/// How long a reset or commit waits for a running remap-add or remap-remove.
const GATE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum LabError {
    #[error(
        "this server runs without --overlay: there is nothing to {0}. Start it with --overlay PATH"
    )]
    NoOverlay(&'static str),
    #[error("{0}; nothing was changed")]
    NotWriter(String),
    #[error("{inflight} request(s) were still in flight after the drain timeout; nothing was changed. Try again once the device is idle")]
    Busy { inflight: usize },
    #[error("a remap-add or remap-remove was still running after {}s; nothing was changed. Try again when it is done", GATE_WAIT.as_secs())]
    Moving,
    #[error("{what} failed: {source}. The overlay may be half {what}: run {what} again")]
    Files {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("overlay-reset reverted the spare copy, but reloading the remap table from it failed: {0}. Restart the server")]
    Reload(String),
}

/// What `overlay-reset` and `overlay-commit` reply.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Blocks the overlay held: dropped by a reset, written into the image by a commit.
    pub blocks: u64,
    pub block_size: u64,
    /// Bytes a commit wrote into the image (zeros are discarded instead; 0 for a reflink).
    pub bytes_written: u64,
    /// Remaps before and after (a reset drops those made since the last commit).
    pub remaps_before: usize,
    pub remaps_after: usize,
    /// Requests the quiesce waited for.
    pub waited_for: usize,
    pub duration_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Reset,
    Commit,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Reset => "overlay-reset",
            Op::Commit => "overlay-commit",
        }
    }
}

/// The pieces a reset or commit acts on.
pub struct Lab<'a> {
    pub overlay: Option<&'a Overlay>,
    pub dev: &'a Device,
    pub live: &'a Live,
    pub table: &'a RemapTable,
    /// Run once a reset succeeded, still quiesced: what the layers above must forget of the
    /// disk that is gone (the volatile cache's unflushed writes, whose pre-images belong to
    /// it) or note (a mark in the write log).
    pub after_reset: &'a dyn Fn(),
}

impl Lab<'_> {
    /// `overlay-reset`: every change since start-up or the last commit is gone.
    pub fn reset(&self) -> Result<Report, LabError> {
        self.run(Op::Reset)
    }

    /// `overlay-commit`: every change is in the image and spare file, durably.
    pub fn commit(&self) -> Result<Report, LabError> {
        self.run(Op::Commit)
    }

    fn run(&self, op: Op) -> Result<Report, LabError> {
        let overlay = self.overlay.ok_or(LabError::NoOverlay(match op {
            Op::Reset => "reset",
            Op::Commit => "commit",
        }))?;
        self.dev
            .handover()
            .check_writer()
            .map_err(|e| LabError::NotWriter(e.to_string()))?;
        let start = Instant::now();
        let was_quiesced = self.dev.is_quiesced();
        let q = self.live.quiesce(self.dev);
        let result = if q.inflight > 0 {
            Err(LabError::Busy {
                inflight: q.inflight,
            })
        } else {
            self.with_gate_closed(|| self.apply(overlay, op))
        };
        if result.is_ok() && op == Op::Reset {
            (self.after_reset)();
        }
        if !was_quiesced {
            self.live.resume(self.dev);
        }
        let (applied, remaps_before, remaps_after) = match result {
            Ok(r) => r,
            Err(e) => {
                self.live
                    .events
                    .emit(op.name(), json!({ "ok": false, "error": e.to_string() }));
                return Err(e);
            }
        };
        let report = Report {
            blocks: applied.blocks,
            block_size: overlay.bs,
            bytes_written: applied.bytes_written,
            remaps_before,
            remaps_after,
            waited_for: q.waited_for,
            duration_us: start.elapsed().as_micros() as u64,
        };
        self.live.events.emit(
            op.name(),
            json!({
                "ok": true,
                "mode": overlay.kind().name(),
                "blocks": report.blocks,
                "bytes_written": report.bytes_written,
                "remaps_before": report.remaps_before,
                "remaps_after": report.remaps_after,
                "duration_us": report.duration_us,
            }),
        );
        Ok(report)
    }

    fn with_gate_closed<T>(
        &self,
        body: impl FnOnce() -> Result<T, LabError>,
    ) -> Result<T, LabError> {
        let gate = self.table.gate();
        if !gate.close(GATE_WAIT) {
            return Err(LabError::Moving);
        }
        let r = body();
        gate.open();
        r
    }

    fn apply(&self, overlay: &Overlay, op: Op) -> Result<(Applied, usize, usize), LabError> {
        let before = self.table.entries().len();
        let applied = match op {
            Op::Reset => overlay.reset(),
            Op::Commit => overlay.commit(),
        }
        .map_err(|source| LabError::Files {
            what: op.name(),
            source,
        })?;
        // A commit leaves the copy as the table has it; a reset put the real spare's contents
        // there, and the table (remaps, free blocks, the spare blocks kept in memory) follows.
        let after = match op {
            Op::Reset => self.table.reload().map_err(LabError::Reload)?.0,
            Op::Commit => before,
        };
        Ok((applied, before, after))
    }
}
