//! What each control command does. Commands act on the process-wide device and on the
//! frontend session being served, never on the I/O path's locks.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::protocol::{CommandError, CommandName, CommandResult, Request};
use crate::backend::{Device, Live, Polling};
use crate::cache::{CacheModel, CacheTarget};
use crate::fault::{FaultSpec, FaultTable};
use crate::fields::{one, ArgError, Args};
use crate::handover::WriterState;
use crate::io::EngineKind;
use crate::overlay::{self, lab::Lab, Overlay};
use crate::remap::RemapTarget;
use crate::stats::{Counters, Latency};
use crate::writelog::{self, LogWriter};

pub struct Commands {
    pub dev: Arc<Device>,
    pub live: Arc<Live>,
    pub faults: Arc<FaultTable>,
    pub remap: Arc<RemapTarget>,
    /// `serve --overlay`'s layer.
    pub overlay: Option<Arc<Overlay>>,
    /// The top of the block stack: the cache model and the power state.
    pub cache: Arc<CacheTarget>,
    /// `serve --write-log`'s writer, if any.
    pub write_log: Option<Arc<LogWriter>>,
}

/// `query-status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub state: &'static str,
    pub image: String,
    pub capacity_bytes: u64,
    pub block_size: u32,
    pub num_queues: u16,
    pub connected: bool,
    pub inflight: usize,
    /// The frontend's requests are recorded in an INFLIGHT_SHMFD region (they survive a crash
    /// of this process).
    pub inflight_tracking: bool,
    /// The pages the backend writes are logged for a migration (LOG_ALL with a log).
    pub dirty_logging: bool,
    pub readonly: bool,
    pub engine: EngineKind,
    /// `--poll-us`: `auto`, `fixed` or `off`.
    pub poll_mode: &'static str,
    /// `auto`: the cap of each queue's window (`--poll-max-us`); `fixed`: the window; `off`: 0.
    /// Each queue's window now is in `query-stats`.
    pub poll_max_us: u64,
    pub remaps: usize,
    pub spare_total: u64,
    pub spare_free: u64,
    pub pending: usize,
    /// Whether this process writes the image and spare, or waits for or gave them up in a
    /// migration.
    pub handover: WriterState,
    /// `serve --overlay`: where the changes go and how many there are; null without.
    pub overlay: Option<overlay::Status>,
    /// `--cache-model`.
    pub cache_model: CacheModel,
    /// Bytes of completed writes no completed flush covers: what a power cut may lose.
    pub unflushed_bytes: u64,
    /// Flushes the volatile cache did by itself (it was full, or a write's old data could not
    /// be read).
    pub cache_auto_flushes: u64,
    /// False between power-cut and power-on: every request fails or is held.
    pub powered: bool,
    /// The write log (`serve --write-log`): null, or its path, entries and bytes.
    pub write_log: Option<writelog::Status>,
}

/// `query-stats`.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub totals: Totals,
    pub queues: Vec<QueueReport>,
    /// Injected faults' firings per mode since start, every mode named.
    pub faults_fired: std::collections::BTreeMap<&'static str, u64>,
}

/// `query-stats`' totals: the counters summed over the queues.
#[derive(Debug, Serialize)]
pub struct Totals {
    #[serde(flatten)]
    pub counters: Counters,
    pub inflight: usize,
}

/// One queue in `query-stats`.
#[derive(Debug, Serialize)]
pub struct QueueReport {
    #[serde(flatten)]
    pub counters: Counters,
    pub inflight: usize,
    pub latency_us: Latency,
    /// How long the worker polls after its next work (`--poll-us`; with `auto` it adapts).
    /// 0 with no frontend.
    pub poll_window_us: u64,
}

/// `fault-remove`'s and `fault-release`'s arguments.
#[derive(Deserialize)]
struct FaultId {
    id: u64,
}

/// `log-mark`'s arguments.
#[derive(Deserialize)]
struct MarkArgs {
    name: Value,
}

/// The blocks `lba`, `lba + stride`, ... (`count` of them; stride 1 by default: a run) of
/// remap-add and remap-remove.
#[derive(Deserialize)]
struct BlockRange {
    lba: u64,
    #[serde(default = "one")]
    count: u64,
    #[serde(default = "one")]
    stride: u64,
}

impl BlockRange {
    /// The blocks, checked against a disk of `blocks` blocks.
    fn blocks(self, blocks: u64) -> Result<impl Iterator<Item = u64>, ArgError> {
        let BlockRange { lba, count, stride } = self;
        if lba >= blocks {
            return Err(ArgError::new(
                "lba",
                format!("{lba} is past the end of the disk ({blocks} blocks)"),
            ));
        }
        if stride == 0 {
            return Err(ArgError::new(
                "stride",
                "must be at least 1 (1 = consecutive blocks)",
            ));
        }
        let fits = count
            .checked_sub(1)
            .and_then(|n| n.checked_mul(stride))
            .and_then(|span| span.checked_add(lba))
            .is_some_and(|last| last < blocks);
        if !fits {
            return Err(ArgError::new(
                "count",
                format!("{count} blocks from lba {lba} every {stride} do not fit the disk ({blocks} blocks)"),
            ));
        }
        // No overflow: the last block, lba + (count - 1) * stride, was computed checked.
        Ok((0..count).map(move |i| lba + i * stride))
    }
}

impl Commands {
    pub fn dispatch(&self, req: &Request) -> CommandResult {
        let name = CommandName::parse(&req.execute)?;
        // Every command takes its arguments, refusing stray ones, before it acts; these take
        // none.
        let none = || {
            Args::new(&req.arguments)
                .finish(&name.name())
                .map_err(CommandError::from)
        };
        match name {
            CommandName::QueryStatus => none().and_then(|_| reply(self.query_status())),
            CommandName::QueryStats => none().and_then(|_| reply(self.query_stats())),
            CommandName::Quiesce => none().and_then(|_| reply(self.live.quiesce(&self.dev))),
            CommandName::Resume => {
                none().map(|_| json!({ "was_quiesced": self.live.resume(&self.dev) }))
            }
            CommandName::FaultAdd => {
                let spec =
                    FaultSpec::from_args(&req.arguments, self.blocks(), self.dev.cfg.block_size)?;
                Ok(json!({ "id": self.faults.add(spec) }))
            }
            CommandName::FaultList => none().and_then(|_| reply(self.faults.list())),
            CommandName::FaultRemove => self.fault_remove(&req.arguments),
            CommandName::FaultRelease => self.fault_release(&req.arguments),
            CommandName::FaultClear => none().map(|_| json!({ "removed": self.faults.clear() })),
            CommandName::RemapList => none().and_then(|_| reply(self.remap.table().entries())),
            CommandName::PendingList => none().and_then(|_| reply(self.remap.table().pending())),
            CommandName::RemapAdd => {
                let blocks = self.block_range(&req.arguments, name)?;
                self.dev.handover().check_writer().map_err(generic)?;
                reply(self.remap.remap_add(blocks).map_err(generic)?)
            }
            CommandName::RemapRemove => {
                let blocks = self.block_range(&req.arguments, name)?;
                self.dev.handover().check_writer().map_err(generic)?;
                reply(self.remap.remap_remove(blocks).map_err(generic)?)
            }
            CommandName::OverlayReset => none().and_then(|_| {
                let after = || self.after_overlay_reset();
                reply(self.lab(&after).reset().map_err(generic)?)
            }),
            CommandName::OverlayCommit => {
                none().and_then(|_| reply(self.lab(&|| {}).commit().map_err(generic)?))
            }
            CommandName::PowerCut => self.power_cut(&req.arguments),
            CommandName::PowerOn => none().and_then(|_| self.power_on()),
            CommandName::LogMark => self.log_mark(&req.arguments),
        }
    }

    fn lab<'a>(&'a self, after_reset: &'a dyn Fn()) -> Lab<'a> {
        Lab {
            overlay: self.overlay.as_deref(),
            dev: &self.dev,
            live: &self.live,
            table: self.remap.table(),
            after_reset,
        }
    }

    /// After an overlay-reset, still quiesced.
    fn after_overlay_reset(&self) {
        // The disk the unflushed writes were made on is gone: none of them can be lost any
        // more, and a cut must not write their pre-images onto the new one.
        self.cache.forget_unflushed();
        // A replay past this point would miss the reset: say where it happened (a log that
        // cannot take the mark has stopped, and says why in query-status).
        if let Some(log) = &self.write_log {
            let _ = log.mark("overlay-reset");
        }
    }

    /// Blocks on the disk.
    fn blocks(&self) -> u64 {
        self.dev.cfg.capacity / u64::from(self.dev.cfg.block_size)
    }

    fn fault_remove(&self, map: &Map<String, Value>) -> CommandResult {
        let mut args = Args::new(map);
        let FaultId { id } = args
            .take()
            .map_err(|e| e.explain_missing("id", "the fault's id from fault-add"))?;
        args.finish(&CommandName::FaultRemove.name())?;
        if self.faults.remove(id) {
            Ok(json!({}))
        } else {
            Err(ArgError::new("id", format!("no fault with id {id}; see fault-list")).into())
        }
    }

    fn fault_release(&self, map: &Map<String, Value>) -> CommandResult {
        let mut args = Args::new(map);
        let FaultId { id } = args
            .take()
            .map_err(|e| e.explain_missing("id", "the hang fault's id from fault-add"))?;
        args.finish(&CommandName::FaultRelease.name())?;
        match self.faults.release(id) {
            Some(n) => Ok(json!({ "released": n })),
            None => {
                Err(ArgError::new("id", format!("no fault with id {id}; see fault-list")).into())
            }
        }
    }

    fn log_mark(&self, map: &Map<String, Value>) -> CommandResult {
        let mut args = Args::new(map);
        let MarkArgs { name } = args
            .take()
            .map_err(|e| e.explain_missing("name", "the mark's name, e.g. name=after-mkfs"))?;
        args.finish(&CommandName::LogMark.name())?;
        // `ctl` sends name=42 as a number: a mark's name is its text all the same.
        let name = match name {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            v => return Err(ArgError::new("name", format!("must be a string, got {v}")).into()),
        };
        writelog::writer::check_mark_name(&name).map_err(|d| ArgError::new("name", d))?;
        let Some(log) = &self.write_log else {
            return Err(CommandError::generic(
                "this server keeps no write log: start it with --write-log PATH to record marks",
            ));
        };
        let entry = log.mark(&name).map_err(generic)?;
        Ok(json!({ "entry": entry }))
    }

    /// The `lba=N [count=M] [stride=S]` of remap-add and remap-remove.
    fn block_range(
        &self,
        map: &Map<String, Value>,
        name: CommandName,
    ) -> Result<impl Iterator<Item = u64>, ArgError> {
        let mut args = Args::new(map);
        let range: BlockRange = args
            .take()
            .map_err(|e| e.explain_missing("lba", "the first logical block"))?;
        args.finish(&name.name())?;
        range.blocks(self.blocks())
    }

    fn query_status(&self) -> Status {
        let cfg = &self.dev.cfg;
        let table = self.remap.table();
        Status {
            state: self.live.state(&self.dev),
            image: cfg.image.display().to_string(),
            capacity_bytes: cfg.capacity,
            block_size: cfg.block_size,
            num_queues: cfg.num_queues,
            connected: self.live.connected(),
            inflight: self.live.inflight(),
            inflight_tracking: self.live.inflight_tracking(),
            dirty_logging: self.live.dirty_logging(),
            readonly: cfg.readonly,
            engine: cfg.engine,
            poll_mode: poll_mode(cfg.poll),
            poll_max_us: match cfg.poll {
                Polling::Off => 0,
                Polling::Fixed(d) | Polling::Adaptive { max: d } => micros(d),
            },
            remaps: table.entries().len(),
            spare_total: table.spare_total(),
            spare_free: table.spare_free(),
            pending: table.pending().len(),
            handover: self.dev.writer_state(),
            overlay: self.overlay.as_ref().map(|o| o.status()),
            cache_model: self.cache.model(),
            unflushed_bytes: self.cache.unflushed_bytes(),
            cache_auto_flushes: self.cache.auto_flushes(),
            powered: self.cache.powered(),
            write_log: self.write_log.as_ref().map(|w| w.status()),
        }
    }

    fn query_stats(&self) -> StatsReport {
        let stats = &self.dev.stats;
        StatsReport {
            totals: Totals {
                counters: stats.totals(),
                inflight: self.live.inflight(),
            },
            queues: stats
                .queues()
                .iter()
                .enumerate()
                .map(|(i, q)| QueueReport {
                    counters: q.snapshot(),
                    inflight: self.live.queue_inflight(i),
                    latency_us: q.latency.summary(),
                    poll_window_us: micros(self.live.queue_poll_window(i)),
                })
                .collect(),
            faults_fired: self.faults.fired_by_mode(),
        }
    }
}

fn poll_mode(p: Polling) -> &'static str {
    match p {
        Polling::Off => "off",
        Polling::Fixed(_) => "fixed",
        Polling::Adaptive { .. } => "auto",
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A command's reply object.
pub(super) fn reply(value: impl Serialize) -> CommandResult {
    // Replies are structs of numbers and strings: serde_json cannot fail on them (it fails
    // only on maps with non-string keys), but say so rather than panic if one ever does.
    serde_json::to_value(value)
        .map_err(|e| CommandError::generic(format!("internal error: the reply: {e}")))
}

fn generic(e: impl std::fmt::Display) -> CommandError {
    CommandError::generic(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remap::metadata::{Cause, Entry};

    fn range(v: Value, blocks: u64) -> Result<Vec<u64>, String> {
        let Value::Object(map) = v else {
            panic!("not an object")
        };
        let mut args = Args::new(&map);
        let r: BlockRange = args.take().map_err(|e| e.to_string())?;
        args.finish("remap-add").map_err(|e| e.to_string())?;
        r.blocks(blocks)
            .map(Iterator::collect)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn block_ranges_default_to_one_block_and_must_fit_the_disk() {
        assert_eq!(range(json!({"lba": 3}), 10), Ok(vec![3]));
        assert_eq!(
            range(json!({"lba": 1, "count": 3, "stride": 4}), 10),
            Ok(vec![1, 5, 9])
        );
        for (v, field) in [
            (json!({"count": 2}), "lba: missing"),
            (json!({"lba": 10}), "lba: 10 is past the end"),
            (
                json!({"lba": 1, "count": 3, "stride": 5}),
                "count: 3 blocks",
            ),
            (json!({"lba": 1, "count": 0}), "count: 0 blocks"),
            (json!({"lba": 1, "count": u64::MAX}), "count: "),
            (json!({"lba": 1, "stride": 0}), "stride: must be at least 1"),
            (
                json!({"lba": 1, "id": 0}),
                "id: unknown argument; remap-add takes lba, count, stride",
            ),
        ] {
            let e = range(v.clone(), 10).unwrap_err();
            assert!(e.starts_with(field), "{v}: {e}");
        }
    }

    #[test]
    fn entries_serialize_as_remap_list_shows_them() {
        for cause in [Cause::Manual, Cause::WriteError] {
            let e = Entry {
                lba: 7,
                spare_block: 2,
                cause,
                since: 100,
            };
            assert_eq!(
                serde_json::to_value(e).unwrap(),
                json!({"lba": 7, "spare_block": 2, "cause": cause.name(), "since": 100})
            );
        }
    }
}
