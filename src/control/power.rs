//! `power-cut` and `power-on`: the steps around the cache layer's own cut (quiesce first,
//! resume or hold after, the event log), and what each takes and replies.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::commands::Commands;
use super::protocol::{CommandError, CommandName, CommandResult};
use crate::backend::QuiesceReport;
use crate::cache::{CutMode, CutPlan, CutReport, PowerError, Tearing};
use crate::fields::{ArgError, Args};

/// What the queues do once the power is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Then {
    /// They run again and every request fails with IOERR until power-on.
    #[default]
    Fail,
    /// They stay quiesced: requests wait in the ring until power-on.
    Hold,
}

/// `power-cut`'s arguments.
#[derive(Deserialize)]
struct CutArgs {
    #[serde(default)]
    mode: CutMode,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default = "half")]
    probability: f64,
    #[serde(default)]
    torn: Tearing,
    #[serde(default)]
    then: Then,
}

fn half() -> f64 {
    0.5
}

/// The cut as it ran: with the seed it drew, so that it can be run again.
#[derive(Debug, Serialize)]
struct PlanReply {
    #[serde(flatten)]
    plan: CutPlan,
    then: Then,
}

/// `power-cut`'s reply.
#[derive(Debug, Serialize)]
struct CutReply {
    plan: PlanReply,
    #[serde(flatten)]
    report: CutReport,
    /// The drain before the cut.
    quiesce: QuiesceReport,
    /// With --write-log: the index of the `power-cut` mark, logged after the drain and before
    /// the cut's own writes (`remapblk log replay --to-entry` it for the disk just before the
    /// cut, the whole log for the disk after it).
    #[serde(skip_serializing_if = "Option::is_none")]
    log_mark_entry: Option<u64>,
}

/// `power-on`'s reply.
#[derive(Debug, Serialize)]
struct OnReply {
    was_off: bool,
    /// The queues were held by `then=hold` and run again.
    resumed: bool,
    /// A session's cache mode went back to writeback (false: no frontend was connected; a
    /// new one starts in writeback anyway).
    cache_mode_reset: bool,
}

impl Commands {
    /// `power-cut`: quiesce, cut, then resume (failing requests) or hold.
    pub(super) fn power_cut(&self, map: &Map<String, Value>) -> CommandResult {
        let mut args = Args::new(map);
        let a: CutArgs = args.take()?;
        args.finish(&CommandName::PowerCut.name())?;
        if !(0.0..=1.0).contains(&a.probability) {
            return Err(ArgError::new(
                "probability",
                format!(
                    "must be a number from 0 to 1 (the chance each unflushed write is lost), got {}",
                    Value::from(a.probability)
                ),
            )
            .into());
        }
        if !self.cache.powered() {
            return Err(CommandError::generic(
                "the power is already off; send power-on first",
            ));
        }
        // The cut writes the image: only its writer may.
        self.dev
            .handover()
            .check_writer()
            .map_err(|e| CommandError::generic(e.to_string()))?;
        let plan = CutPlan {
            mode: a.mode,
            probability: a.probability,
            seed: a.seed.unwrap_or_else(clock_seed),
            torn: a.torn,
        };
        let was_quiesced = self.dev.is_quiesced();
        let quiesce = self.live.quiesce(&self.dev);
        let hold = a.then == Then::Hold && !was_quiesced;
        // A log that cannot take the mark has stopped by itself (query-status says why); the
        // cut goes on without it.
        let log_mark_entry = self
            .write_log
            .as_ref()
            .and_then(|log| log.mark("power-cut").ok());
        let result = self
            .cache
            .power_cut(&plan, hold, self.dev.cfg.drain_timeout);
        // Resumed also when the cut was refused (the power stays on then).
        let refused = matches!(result, Err(PowerError::Busy(_) | PowerError::AlreadyOff));
        if (a.then == Then::Fail || refused) && !was_quiesced {
            self.live.resume(&self.dev);
        }
        let plan = PlanReply { plan, then: a.then };
        let events = &self.live.events;
        match result {
            Ok(report) => {
                events.emit(
                    "power-cut",
                    json!({ "plan": &plan, "counts": report.counts }),
                );
                super::commands::reply(CutReply {
                    plan,
                    report,
                    quiesce,
                    log_mark_entry,
                })
            }
            Err(e) => {
                events.emit(
                    "power-cut",
                    json!({ "plan": &plan, "error": e.to_string() }),
                );
                Err(CommandError::generic(e.to_string()))
            }
        }
    }

    /// `power-on`: the power back, the queues resumed if the cut held them, the guest's cache
    /// mode back to its default.
    pub(super) fn power_on(&self) -> CommandResult {
        let on = self.cache.power_on();
        if on.resume {
            self.live.resume(&self.dev);
        }
        let cache_mode_reset = on.was_off && self.live.reset_cache_mode();
        let reply = OnReply {
            was_off: on.was_off,
            resumed: on.resume,
            cache_mode_reset,
        };
        self.live.events.emit(
            "power-on",
            json!({ "was_off": reply.was_off, "resumed": reply.resumed }),
        );
        super::commands::reply(reply)
    }
}

/// A seed for a cut that names none: the clock's nanoseconds (the reply shows it).
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
