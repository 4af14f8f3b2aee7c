//! What each control command does. Commands act on the process-wide device and on the
//! frontend session being served, never on the I/O path's locks.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::protocol::{CommandError, CommandResult, Request};
use crate::backend::{Device, Live};
use crate::fault::{FaultSpec, FaultTable};
use crate::remap::metadata::Entry;
use crate::remap::RemapTarget;
use crate::stats::QueueStats;

pub const COMMANDS: [&str; 12] = [
    "query-status",
    "query-stats",
    "quiesce",
    "resume",
    "fault-add",
    "fault-list",
    "fault-remove",
    "fault-clear",
    "remap-list",
    "pending-list",
    "remap-add",
    "remap-remove",
];

pub struct Commands {
    pub dev: Arc<Device>,
    pub live: Arc<Live>,
    pub faults: Arc<FaultTable>,
    pub remap: Arc<RemapTarget>,
}

impl Commands {
    pub fn dispatch(&self, req: &Request) -> CommandResult {
        let args = &req.arguments;
        match req.execute.as_str() {
            "query-status" => no_args(args).and_then(|_| self.query_status()),
            "query-stats" => no_args(args).and_then(|_| self.query_stats()),
            "quiesce" => no_args(args).and_then(|_| self.quiesce()),
            "resume" => no_args(args).and_then(|_| self.resume()),
            "fault-add" => self.fault_add(args),
            "fault-list" => no_args(args).and_then(|_| {
                serde_json::to_value(self.faults.list())
                    .map_err(|e| CommandError::generic(e.to_string()))
            }),
            "fault-remove" => self.fault_remove(args),
            "fault-clear" => no_args(args).map(|_| json!({ "removed": self.faults.clear() })),
            "remap-list" => no_args(args).map(|_| entries_json(&self.remap.table().entries())),
            "pending-list" => no_args(args).map(|_| json!(self.remap.table().pending())),
            "remap-add" => self.block_range(args).and_then(|blocks| {
                self.remap
                    .remap_add(blocks)
                    .map(|e| entries_json(&e))
                    .map_err(|e| CommandError::generic(e.to_string()))
            }),
            "remap-remove" => self.block_range(args).and_then(|blocks| {
                self.remap
                    .remap_remove(blocks)
                    .map(|e| entries_json(&e))
                    .map_err(|e| CommandError::generic(e.to_string()))
            }),
            other => Err(CommandError {
                class: "CommandNotFound",
                desc: format!(
                    "unknown command \"{other}\"; known: {}",
                    COMMANDS.join(", ")
                ),
            }),
        }
    }

    fn fault_add(&self, args: &Map<String, Value>) -> CommandResult {
        let blocks = self.dev.cfg.capacity / u64::from(self.dev.cfg.block_size);
        let spec =
            FaultSpec::from_args(args, blocks).map_err(|e| CommandError::generic(e.to_string()))?;
        Ok(json!({ "id": self.faults.add(spec) }))
    }

    fn fault_remove(&self, args: &Map<String, Value>) -> CommandResult {
        if let Some(k) = args.keys().find(|k| *k != "id") {
            return Err(CommandError::generic(format!(
                "{k}: unknown argument; fault-remove takes id"
            )));
        }
        let id = match args.get("id") {
            None => {
                return Err(CommandError::generic(
                    "id: missing: the fault's id from fault-add",
                ))
            }
            Some(v) => v.as_u64().ok_or_else(|| {
                CommandError::generic(format!("id: must be a non-negative integer, got {v}"))
            })?,
        };
        if self.faults.remove(id) {
            Ok(json!({}))
        } else {
            Err(CommandError::generic(format!(
                "id: no fault with id {id}; see fault-list"
            )))
        }
    }

    /// `lba=N [count=M]` of remap-add and remap-remove, checked against the capacity.
    /// The blocks `lba`, `lba + stride`, ... (`count` of them; stride 1 by default: a run).
    fn block_range(
        &self,
        args: &Map<String, Value>,
    ) -> Result<std::iter::StepBy<std::ops::Range<u64>>, CommandError> {
        if let Some(k) = args
            .keys()
            .find(|k| !["lba", "count", "stride"].contains(&k.as_str()))
        {
            return Err(CommandError::generic(format!(
                "{k}: unknown argument; this command takes lba, count and stride"
            )));
        }
        let num = |field: &str| -> Result<Option<u64>, CommandError> {
            match args.get(field) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    CommandError::generic(format!(
                        "{field}: must be a non-negative integer, got {v}"
                    ))
                }),
            }
        };
        let blocks = self.dev.cfg.capacity / u64::from(self.dev.cfg.block_size);
        let lba = num("lba")?
            .ok_or_else(|| CommandError::generic("lba: missing: the first logical block"))?;
        if lba >= blocks {
            return Err(CommandError::generic(format!(
                "lba: {lba} is past the end of the disk ({blocks} blocks)"
            )));
        }
        let count = num("count")?.unwrap_or(1);
        let stride = num("stride")?.unwrap_or(1);
        if stride == 0 {
            return Err(CommandError::generic(
                "stride: must be at least 1 (1 = consecutive blocks)",
            ));
        }
        let end = count
            .saturating_sub(1)
            .checked_mul(stride)
            .and_then(|span| span.checked_add(lba));
        if count == 0 || end.is_none_or(|last| last >= blocks) {
            return Err(CommandError::generic(format!(
                "count: {count} blocks from lba {lba} every {stride} do not fit the disk ({blocks} blocks)"
            )));
        }
        let last = end.unwrap_or(lba);
        Ok((lba..last + 1).step_by(stride as usize))
    }

    fn inflight(&self) -> usize {
        self.live.inflight()
    }

    fn query_status(&self) -> CommandResult {
        let cfg = &self.dev.cfg;
        Ok(json!({
            "state": self.live.state(&self.dev),
            "image": cfg.image.display().to_string(),
            "capacity_bytes": cfg.capacity,
            "block_size": cfg.block_size,
            "num_queues": cfg.num_queues,
            "connected": self.live.connected(),
            "inflight": self.inflight(),
            "readonly": cfg.readonly,
            "engine": cfg.engine,
            "remaps": self.remap.table().entries().len(),
            "spare_total": self.remap.table().spare_total(),
            "spare_free": self.remap.table().spare_free(),
            "pending": self.remap.table().pending().len(),
        }))
    }

    fn query_stats(&self) -> CommandResult {
        let queues: Vec<Value> = self
            .dev
            .stats
            .queues()
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut v = counters(|pick| QueueStats::get(pick(q)));
                v["inflight"] = json!(self.live.queue_inflight(i));
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
        Ok(json!(self.live.quiesce(&self.dev)))
    }

    fn resume(&self) -> CommandResult {
        Ok(json!({ "was_quiesced": self.live.resume(&self.dev) }))
    }
}

fn entries_json(entries: &[Entry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| json!({ "lba": e.lba, "spare_block": e.spare_block, "cause": e.cause.name(), "since": e.since }))
            .collect(),
    )
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
        "ring_io": get(&|q| &q.ring_io),
        "ring_inline": get(&|q| &q.ring_inline),
        "ring_redone": get(&|q| &q.ring_redone),
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
