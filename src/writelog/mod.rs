//! The write log (`serve --write-log PATH`) and the offline tools that read it (`remapblk
//! log list|replay|check`).
//!
//! The log uses dm-log-writes' on-disk format, so xfstests' `replay-log` reads it too:
//! `format` is the wire format alone; `writer` appends entries in completion order and makes
//! them durable at flushes and marks, its bytes gathered and written by `spool`; `target` is the block-stack layer that feeds it;
//! `reader`, `replay`, `check` and `copy` (the scratch copy) are the offline side; `tool`
//! runs the `log` subcommand.
//!
//! What a log records are the guest's own addresses and bytes (the layer sits above remap and
//! faults), so a replay onto a copy of the image the run started from gives the disk the
//! guest saw, whatever was remapped underneath.

pub mod check;
pub mod copy;
pub mod format;
pub mod reader;
pub mod replay;
mod spool;
pub mod target;
pub mod tool;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

pub use target::LoggedTarget;
pub use writer::{LogWriter, OpenError, Status};

use crate::events::EventLog;
use crate::storage::BlockIo;

/// Opens `serve --write-log PATH` (when given) before the sandbox locks file creation away;
/// `image` and `spare` are what PATH must not be.
pub fn open_for_serve(
    path: Option<&Path>,
    image: &Path,
    spare: &Path,
    events: Arc<EventLog>,
) -> Result<Option<Arc<LogWriter>>, OpenError> {
    path.map(|p| {
        LogWriter::create(p, &[("image", image), ("spare file", spare)], events).map(Arc::new)
    })
    .transpose()
}

/// `stack` with the log layer over it, when there is a log; `stack` itself otherwise (no
/// cost without `--write-log`).
pub fn layer(stack: Arc<dyn BlockIo>, log: Option<&Arc<LogWriter>>) -> Arc<dyn BlockIo> {
    match log {
        Some(log) => Arc::new(LoggedTarget::new(stack, log.clone())),
        None => stack,
    }
}
