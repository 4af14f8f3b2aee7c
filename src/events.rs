//! `--event-log`: one JSON object per line for everything a lab wants to line up with the
//! guest's console (faults firing, quiesce and resume, connects and disconnects, drains), each
//! with a monotonic timestamp.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use log::warn;
use serde_json::{Map, Value};

pub struct EventLog {
    file: Option<Mutex<File>>,
    start: Instant,
}

impl EventLog {
    /// A log that drops everything (no `--event-log`).
    pub fn disabled() -> EventLog {
        EventLog {
            file: None,
            start: Instant::now(),
        }
    }

    /// Appends to `path`, creating it readable by this process's user only (what a lab logs
    /// is its own business); an existing file keeps its mode.
    pub fn open(path: &Path) -> std::io::Result<EventLog> {
        let file = File::options()
            .create(true)
            .append(true)
            .mode(crate::filemode::PRIVATE_FILE)
            .open(path)?;
        Ok(EventLog {
            file: Some(Mutex::new(file)),
            start: Instant::now(),
        })
    }

    /// Writes `{"event": name, "monotonic_us": ..., "monotonic_ns": ..., fields...}`.
    pub fn emit(&self, name: &str, fields: Value) {
        let Some(file) = &self.file else { return };
        let mut obj = Map::new();
        obj.insert("event".into(), Value::from(name));
        obj.insert("monotonic_ns".into(), Value::from(monotonic_ns()));
        obj.insert(
            "since_start_us".into(),
            Value::from(self.start.elapsed().as_micros() as u64),
        );
        if let Value::Object(extra) = fields {
            obj.extend(extra);
        }
        let line = format!("{}\n", Value::Object(obj));
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            warn!("event log: {e}");
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `dmesg` and most tracing tools use on the host.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
