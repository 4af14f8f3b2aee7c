//! What each control command does. Commands act on the process-wide device and on the
//! frontend session being served, never on the I/O path's locks.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::protocol::{CommandError, CommandResult, Request};
use crate::backend::inflight::Phase;
use crate::backend::{Device, Live};
use crate::stats::QueueStats;

pub struct Commands {
    pub dev: Arc<Device>,
    pub live: Arc<Live>,
}

impl Commands {
    pub fn dispatch(&self, req: &Request) -> CommandResult {
        let args = &req.arguments;
        match req.execute.as_str() {
            "query-status" => no_args(args).and_then(|_| self.query_status()),
            "query-stats" => no_args(args).and_then(|_| self.query_stats()),
            "quiesce" => no_args(args).and_then(|_| self.quiesce()),
            "resume" => no_args(args).and_then(|_| self.resume()),
            other => Err(CommandError {
                class: "CommandNotFound",
                desc: format!(
                    "unknown command \"{other}\"; known: query-status, query-stats, quiesce, resume"
                ),
            }),
        }
    }

    fn inflight(&self) -> usize {
        self.live.current().map_or(0, |b| b.inflight())
    }

    fn query_status(&self) -> CommandResult {
        let cfg = &self.dev.cfg;
        Ok(json!({
            "state": self.live.state(&self.dev),
            "image": cfg.image.display().to_string(),
            "capacity_bytes": cfg.capacity,
            "block_size": cfg.block_size,
            "num_queues": cfg.num_queues,
            "connected": self.live.current().is_some(),
            "inflight": self.inflight(),
            "readonly": cfg.readonly,
        }))
    }

    fn query_stats(&self) -> CommandResult {
        let current = self.live.current();
        let queues: Vec<Value> = self
            .dev
            .stats
            .queues()
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut v = counters(|pick| QueueStats::get(pick(q)));
                v["inflight"] = json!(current.as_ref().map_or(0, |b| b.queue_inflight(i)));
                v["latency_us"] = json!({
                    "p50": q.latency.quantile_us(0.5),
                    "p99": q.latency.quantile_us(0.99),
                    "max": q.latency.max_us(),
                });
                v
            })
            .collect();
        let mut totals = counters(|pick| self.dev.stats.total(pick));
        totals["inflight"] = json!(self.inflight());
        Ok(json!({ "totals": totals, "queues": queues }))
    }

    fn quiesce(&self) -> CommandResult {
        let start = Instant::now();
        self.dev.set_quiesced(true);
        let Some(backend) = self.live.current() else {
            return Ok(json!({ "duration_us": 0, "waited_for": 0, "abandoned": 0 }));
        };
        self.live.set_quiescing(true);
        let report = backend.drain_all(Phase::Stopped);
        self.live.set_quiescing(false);
        Ok(json!({
            "duration_us": start.elapsed().as_micros() as u64,
            "waited_for": report.waited_for,
            "abandoned": report.abandoned.len(),
            "inflight": backend.inflight(),
        }))
    }

    fn resume(&self) -> CommandResult {
        let was = self.dev.is_quiesced();
        self.dev.set_quiesced(false);
        if let Some(b) = self.live.current() {
            b.poke();
        }
        Ok(json!({ "was_quiesced": was }))
    }
}

/// The per-queue counters as JSON, read through `get`.
fn counters(get: impl Fn(&dyn Fn(&QueueStats) -> &std::sync::atomic::AtomicU64) -> u64) -> Value {
    json!({
        "reads": get(&|q| &q.reads),
        "writes": get(&|q| &q.writes),
        "flushes": get(&|q| &q.flushes),
        "discards": get(&|q| &q.discards),
        "write_zeroes": get(&|q| &q.write_zeroes),
        "bytes_read": get(&|q| &q.bytes_read),
        "bytes_written": get(&|q| &q.bytes_written),
        "errors": get(&|q| &q.errors),
        "malformed": get(&|q| &q.malformed),
        "unsupported": get(&|q| &q.unsupported),
        "abandoned": get(&|q| &q.abandoned),
    })
}

fn no_args(args: &Map<String, Value>) -> Result<(), CommandError> {
    match args.keys().next() {
        None => Ok(()),
        Some(k) => Err(CommandError::generic(format!(
            "unexpected argument \"{k}\": this command takes none"
        ))),
    }
}
