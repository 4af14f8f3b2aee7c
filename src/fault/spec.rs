//! A fault's description as `fault-add` takes it and `fault-list` shows it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[cfg(test)]
use super::trigger::Window;
use super::trigger::{Trigger, TriggerArgs};
use crate::fields::{ArgError, Args};

pub use super::latency::{Distribution, Jitter, MAX_DELAY_MS};

/// The requests a fault applies to (`op` of `fault-add`), and the kind of a request the fault
/// layer checks (never `Any`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultOp {
    Read,
    /// As a fault's op: writes, discards and write-zeroes (the kernel's `op_is_write`).
    Write,
    /// Takes no blocks: a flush fault applies to every flush.
    Flush,
    Discard,
    WriteZeroes,
    /// As a fault's op: reads, writes, discards and write-zeroes; not flushes, which have no
    /// blocks.
    #[default]
    Any,
}

impl FaultOp {
    /// Whether a fault of this op sees a request of kind `request`.
    pub fn covers(self, request: FaultOp) -> bool {
        match self {
            FaultOp::Any => request != FaultOp::Flush,
            FaultOp::Write => matches!(
                request,
                FaultOp::Write | FaultOp::Discard | FaultOp::WriteZeroes
            ),
            own => own == request,
        }
    }
}

/// What a fault does to a request. Serialized with its arguments' names:
/// `{"mode": "delay", "delay_ms": 200}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum FaultMode {
    /// The request fails as a media error (VIRTIO_BLK_S_IOERR).
    Error,
    /// The request is held this long (the median or base of a distribution, with `jitter`),
    /// then carried out. It waits off the queue's worker: nothing else waits with it.
    Delay {
        /// `delay_ms` on the wire; `ms` here because the I/O side matches on that name.
        #[serde(rename = "delay_ms")]
        ms: u64,
        /// None: every request waits exactly `ms`.
        #[serde(flatten)]
        jitter: Option<Jitter>,
    },
    /// The request fails with this probability, from a PRNG seeded with `seed`.
    Flaky { probability: f64, seed: u64 },
    /// The fault's blocks come back (reads) or are stored (writes) corrupted; the request
    /// completes OK. Not a media error: nothing is remapped.
    Corrupt(Corruption),
    /// The write completes OK; its blocks inside the fault are not written.
    LostWrite,
    /// The write's blocks inside the fault land `shift` blocks away instead.
    Misdirect { shift: i64 },
    /// Only the write's first `sectors` 512-byte sectors land; `report` says what the guest
    /// is told.
    Torn { sectors: u32, report: TornReport },
    /// The request is held until `fault-release`, the fault's removal or a drain's deadline,
    /// then carried out (or, at the deadline, failed). It waits off the queue's worker.
    Hang,
    /// The request is held this long inside the block stack, on the queue's worker: every
    /// request of the queue waits behind it, as behind a disk in error recovery. It also
    /// lands below the remap layer's look-up (a race test's tool).
    Stall {
        #[serde(rename = "delay_ms")]
        ms: u64,
    },
}

/// Every mode's name, as `fault-add` takes it; [`FaultMode::index`] is the position here.
pub const MODE_NAMES: [&str; 9] = [
    "error",
    "delay",
    "flaky",
    "corrupt",
    "lost-write",
    "misdirect",
    "torn",
    "hang",
    "stall",
];

impl FaultMode {
    /// The mode's place in [`MODE_NAMES`], for counting firings per mode without a map.
    pub fn index(&self) -> usize {
        match self {
            FaultMode::Error => 0,
            FaultMode::Delay { .. } => 1,
            FaultMode::Flaky { .. } => 2,
            FaultMode::Corrupt(_) => 3,
            FaultMode::LostWrite => 4,
            FaultMode::Misdirect { .. } => 5,
            FaultMode::Torn { .. } => 6,
            FaultMode::Hang => 7,
            FaultMode::Stall { .. } => 8,
        }
    }

    pub fn name(&self) -> &'static str {
        MODE_NAMES[self.index()]
    }

    /// Modes that hold a request back rather than decide what it does: the worker asks about
    /// these before it starts a request (`BlockIo::hold`), the data path about the others.
    pub fn holds(&self) -> bool {
        matches!(self, FaultMode::Delay { .. } | FaultMode::Hang)
    }

    /// Modes that only mean something for writes: a read passes them untouched.
    pub fn writes_only(&self) -> bool {
        matches!(
            self,
            FaultMode::LostWrite | FaultMode::Misdirect { .. } | FaultMode::Torn { .. }
        )
    }

    /// Whether this mode does something to a request of kind `request`: the write-only modes
    /// nothing to a read, `corrupt` nothing to a discard or write-zeroes (no data to damage).
    /// A request the mode cannot touch is not a match: it neither counts nor fires.
    pub fn touches(&self, request: FaultOp) -> bool {
        match request {
            FaultOp::Read => !self.writes_only(),
            FaultOp::Discard | FaultOp::WriteZeroes => !matches!(self, FaultMode::Corrupt(_)),
            _ => true,
        }
    }
}

/// How `corrupt` damages each block it covers. Untagged: `fault-list` shows the arguments
/// of the form chosen, as `fault-add` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Corruption {
    /// `bits` distinct bits flipped per block, the same ones each time for a block and seed.
    Bits { bits: u32, seed: u64 },
    /// The byte at `offset` within each block XORed with `xor`.
    Xor { xor: u8, offset: u32 },
}

/// What a torn write tells the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TornReport {
    /// The write completes OK: the tear is silent.
    #[default]
    Ok,
    /// The write fails (`VIRTIO_BLK_S_IOERR`), but not as a media error: nothing is remapped.
    Error,
}

/// What each mode takes besides the common arguments, picked by `mode`. Adding a mode: its
/// variant here, its variant in [`FaultMode`], and its arm in [`ModeArgs::check`].
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ModeArgs {
    Error,
    /// `jitter_ms`, `distribution` and `seed` shape a delay: see [`Jitter`].
    Delay {
        delay_ms: u64,
        jitter_ms: Option<u64>,
        distribution: Option<Distribution>,
        seed: Option<u64>,
    },
    Flaky {
        probability: f64,
        #[serde(default)]
        seed: u64,
    },
    /// `bits` [`seed`] or `xor` [`offset`]: [`Corrupt::check`] refuses a mix.
    // u64 throughout: the parser's type errors then read "a non-negative integer", and the
    // ranges are checked with messages that say what fits.
    Corrupt {
        bits: Option<u64>,
        seed: Option<u64>,
        xor: Option<u64>,
        offset: Option<u64>,
    },
    LostWrite,
    Misdirect {
        shift: i64,
    },
    Torn {
        sectors: u64,
        #[serde(default)]
        report: TornReport,
    },
    Hang,
    Stall {
        delay_ms: u64,
    },
}

/// The blocks a fault covers and the disk it sits on, for the checks that depend on them.
struct Placement {
    blocks: Blocks,
    capacity_blocks: u64,
    block_size: u32,
}

impl ModeArgs {
    /// Refuses a mode that means nothing for requests of `op`, saying why.
    fn allows(&self, op: FaultOp) -> Result<(), ArgError> {
        let changes_writes = matches!(
            self,
            ModeArgs::LostWrite | ModeArgs::Misdirect { .. } | ModeArgs::Torn { .. }
        );
        if changes_writes && op == FaultOp::Read {
            return Err(ArgError::new(
                "op",
                "this mode changes writes: op must be write, discard, write-zeroes or any",
            ));
        }
        if changes_writes && op == FaultOp::Flush {
            return Err(ArgError::new(
                "op",
                "a flush carries no data to lose, misdirect or tear; a lost flush (acknowledged \
                 while the writes before it stay volatile) would need the fault above the cache \
                 model, which is not supported yet. A flush fault takes mode error, flaky, delay, hang or stall",
            ));
        }
        if matches!(self, ModeArgs::Corrupt { .. }) && !matches!(op, FaultOp::Read | FaultOp::Write)
        {
            // With any, the same flips on the way in and out would cancel: the guest would read
            // back good data from a damaged image. The other ops carry no data.
            return Err(ArgError::new(
                "op",
                "mode corrupt needs op=read (the guest reads damage, the image stays intact) or op=write (the damage is stored)",
            ));
        }
        Ok(())
    }

    /// The ranges serde cannot check; `at` is None for a flush fault, which has no blocks.
    fn check(self, at: Option<&Placement>) -> Result<FaultMode, ArgError> {
        Ok(match self {
            ModeArgs::Error => FaultMode::Error,
            ModeArgs::Delay {
                delay_ms,
                jitter_ms,
                distribution,
                seed,
            } => FaultMode::Delay {
                ms: checked_delay(delay_ms)?,
                jitter: Jitter::from_args(jitter_ms, distribution, seed)?,
            },
            ModeArgs::Flaky { probability, seed } => {
                if !(0.0..=1.0).contains(&probability) {
                    return Err(ArgError::new(
                        "probability",
                        format!(
                            "must be a number from 0 to 1, got {}",
                            Value::from(probability)
                        ),
                    ));
                }
                FaultMode::Flaky { probability, seed }
            }
            ModeArgs::Corrupt {
                bits,
                seed,
                xor,
                offset,
            } => {
                let Some(at) = at else {
                    // `allows` refused corrupt on flushes, the only faults without blocks.
                    return Err(ArgError::new(
                        "op",
                        "mode corrupt needs op=read or op=write",
                    ));
                };
                FaultMode::Corrupt(corruption(bits, seed, xor, offset, at.block_size)?)
            }
            ModeArgs::LostWrite => FaultMode::LostWrite,
            ModeArgs::Misdirect { shift } => {
                let Some(at) = at else {
                    // `allows` refused misdirect on flushes, the only faults without blocks.
                    return Err(ArgError::new("op", "mode misdirect needs blocks to move"));
                };
                let Blocks { lba, count } = at.blocks;
                let lands = i128::from(lba) + i128::from(shift);
                let end = lands + i128::from(count);
                if shift == 0 {
                    return Err(ArgError::new(
                        "shift",
                        "must not be 0 (that write would land where it belongs)",
                    ));
                }
                if lands < 0 || end > i128::from(at.capacity_blocks) {
                    return Err(ArgError::new(
                        "shift",
                        format!(
                            "{shift} moves blocks {lba}..{} to {lands}..{end}, off the disk ({} blocks)",
                            lba + count,
                            at.capacity_blocks
                        ),
                    ));
                }
                FaultMode::Misdirect { shift }
            }
            ModeArgs::Torn { sectors, report } => {
                if sectors == 0 {
                    return Err(ArgError::new(
                        "sectors",
                        "must be at least 1 (for a write of which nothing lands, use mode lost-write)",
                    ));
                }
                let Ok(sectors) = u32::try_from(sectors) else {
                    return Err(ArgError::new(
                        "sectors",
                        format!("must be at most {}, got {sectors}", u32::MAX),
                    ));
                };
                FaultMode::Torn { sectors, report }
            }
            ModeArgs::Hang => FaultMode::Hang,
            ModeArgs::Stall { delay_ms } => FaultMode::Stall {
                ms: checked_delay(delay_ms)?,
            },
        })
    }
}

/// `delay_ms` of `delay` and `stall`, in range.
fn checked_delay(delay_ms: u64) -> Result<u64, ArgError> {
    if (1..=MAX_DELAY_MS).contains(&delay_ms) {
        Ok(delay_ms)
    } else {
        Err(ArgError::new(
            "delay_ms",
            format!("must be 1 to {MAX_DELAY_MS}, got {delay_ms}"),
        ))
    }
}

/// `corrupt`'s two forms: `bits` [`seed`] or `xor` [`offset`], never a mix of them.
fn corruption(
    bits: Option<u64>,
    seed: Option<u64>,
    xor: Option<u64>,
    offset: Option<u64>,
    block_size: u32,
) -> Result<Corruption, ArgError> {
    let block_bits = u64::from(block_size) * 8;
    match (bits, xor) {
        (Some(_), Some(_)) => Err(ArgError::new(
            "xor",
            "cannot go with bits: give bits=N [seed=S] (random flips) or xor=BYTE [offset=K]",
        )),
        (None, None) => Err(ArgError::new(
            "bits",
            "mode corrupt needs bits=N [seed=S] (random flips per block) or xor=BYTE [offset=K]",
        )),
        (Some(bits), None) => {
            if offset.is_some() {
                return Err(ArgError::new("offset", "only applies with xor, not bits"));
            }
            if !(1..=block_bits).contains(&bits) {
                return Err(ArgError::new(
                    "bits",
                    format!("must be 1 to {block_bits} (the bits in a block), got {bits}"),
                ));
            }
            Ok(Corruption::Bits {
                // Fits: at most the bits of a block, and a block size is a u32.
                bits: u32::try_from(bits).unwrap_or(u32::MAX),
                seed: seed.unwrap_or(0),
            })
        }
        (None, Some(xor)) => {
            if seed.is_some() {
                return Err(ArgError::new(
                    "seed",
                    "only applies with bits: xor flips the same bits every time",
                ));
            }
            let Some(xor) = u8::try_from(xor).ok().filter(|&x| x != 0) else {
                return Err(ArgError::new(
                    "xor",
                    format!("must be a byte, 1 to 255 (0 changes nothing), got {xor}"),
                ));
            };
            let offset = offset.unwrap_or(0);
            let Some(offset) = u32::try_from(offset).ok().filter(|&o| o < block_size) else {
                return Err(ArgError::new(
                    "offset",
                    format!(
                        "must be a byte of the block, 0 to {}, got {offset}",
                        block_size.saturating_sub(1)
                    ),
                ));
            };
            Ok(Corruption::Xor { xor, offset })
        }
    }
}

/// The arguments every mode takes.
#[derive(Deserialize)]
struct CommonArgs {
    #[serde(default)]
    op: FaultOp,
    /// Required, except by a flush fault, which refuses it.
    lba: Option<u64>,
    /// 1 by default; a flush fault refuses it.
    count: Option<u64>,
    times: Option<u64>,
    after: Option<u64>,
    every: Option<u64>,
    /// `"UP_MS:DOWN_MS"`; any JSON value here, so that a number gets an error that shows the
    /// form.
    window: Option<Value>,
}

/// The blocks a fault covers: `count` from `lba`, in logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Blocks {
    /// First logical block.
    pub lba: u64,
    /// Blocks covered.
    pub count: u64,
}

impl Blocks {
    /// Checks `lba` and `count` against a disk of `capacity_blocks`.
    fn new(lba: Option<u64>, count: Option<u64>, capacity_blocks: u64) -> Result<Blocks, ArgError> {
        let Some(lba) = lba else {
            return Err(ArgError::new(
                "lba",
                "missing: the first logical block of the fault (only op=flush takes none)",
            ));
        };
        let count = count.unwrap_or(1);
        if lba >= capacity_blocks {
            return Err(ArgError::new(
                "lba",
                format!("{lba} is past the end of the disk ({capacity_blocks} blocks)"),
            ));
        }
        if count == 0 {
            return Err(ArgError::new("count", "must be at least 1"));
        }
        if lba
            .checked_add(count)
            .is_none_or(|end| end > capacity_blocks)
        {
            return Err(ArgError::new("count", format!("lba {lba} + count {count} reaches past the end of the disk ({capacity_blocks} blocks)")));
        }
        Ok(Blocks { lba, count })
    }

    /// The last block covered; `count` is at least 1 and `lba + count` fits the disk.
    fn last(&self) -> u64 {
        self.lba + self.count - 1
    }
}

/// One fault, serialized as the `fault-add` arguments that make it. Not `Deserialize` on
/// purpose: [`from_args`](Self::from_args) is the one way in, as it names the field at fault
/// and checks the ranges against the disk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultSpec {
    pub op: FaultOp,
    /// `lba` and `count`; None for a flush fault, which applies to every flush.
    #[serde(flatten)]
    pub blocks: Option<Blocks>,
    #[serde(flatten)]
    pub mode: FaultMode,
    /// Fire this many times, then expire; None: forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    /// `after`, `every`, `window`: which matching I/Os go on to the mode.
    #[serde(flatten)]
    pub trigger: Trigger,
}

/// A bad `fault-add` argument; `field` names it.
pub type FaultArgError = ArgError;

impl FaultSpec {
    /// Validates `fault-add` arguments against a disk of `capacity_blocks` blocks of
    /// `block_size` bytes.
    pub fn from_args(
        args: &Map<String, Value>,
        capacity_blocks: u64,
        block_size: u32,
    ) -> Result<FaultSpec, FaultArgError> {
        let mut args = Args::new(args);
        let common: CommonArgs = args.take()?;
        let mode: ModeArgs = args.take_tagged("mode", "error")?;
        args.finish("fault-add")?;
        let CommonArgs {
            op,
            lba,
            count,
            times,
            after,
            every,
            window,
        } = common;
        let blocks = if op == FaultOp::Flush {
            let no_blocks = |field: &str| {
                ArgError::new(
                    field,
                    "a flush fault applies to every flush, which has no blocks: omit lba and count with op=flush",
                )
            };
            if lba.is_some() {
                return Err(no_blocks("lba"));
            }
            if count.is_some() {
                return Err(no_blocks("count"));
            }
            None
        } else {
            Some(Blocks::new(lba, count, capacity_blocks)?)
        };
        if times == Some(0) {
            return Err(ArgError::new(
                "times",
                "must be at least 1 (omit it for a fault that never expires)",
            ));
        }
        let window = match window {
            None => None,
            Some(Value::String(w)) => Some(w),
            Some(other) => {
                return Err(ArgError::new(
                    "window",
                    format!("must be a string UP_MS:DOWN_MS, e.g. \"300:700\", got {other}"),
                ))
            }
        };
        let trigger = TriggerArgs {
            after,
            every,
            window,
        }
        .check()?;
        mode.allows(op)?;
        let at = blocks.map(|blocks| Placement {
            blocks,
            capacity_blocks,
            block_size,
        });
        Ok(FaultSpec {
            op,
            blocks,
            mode: mode.check(at.as_ref())?,
            times,
            trigger,
        })
    }

    /// The arguments back, as `fault-list` shows them.
    pub fn to_json(&self) -> Value {
        // Cannot fail: a struct of numbers and names, no map with non-string keys.
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Whether a request of kind `op` is this fault's: its op covers it and its mode can do
    /// something to it.
    pub fn applies_to(&self, op: FaultOp) -> bool {
        self.op.covers(op) && self.mode.touches(op)
    }

    /// Whether blocks `[first, last]` touch this fault's blocks (a flush fault has none, and
    /// applies to every flush).
    pub fn overlaps(&self, first: u64, last: u64) -> bool {
        self.blocks
            .is_none_or(|b| first <= b.last() && last >= b.lba)
    }

    /// The blocks of `[first, last]` inside this fault (all of them for a flush fault), for a
    /// request that [`overlaps`](Self::overlaps) it.
    pub fn covered(&self, first: u64, last: u64) -> std::ops::RangeInclusive<u64> {
        match self.blocks {
            Some(b) => first.max(b.lba)..=last.min(b.last()),
            None => first..=last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn field(v: Value) -> String {
        FaultSpec::from_args(&args(v), 1000, 512).unwrap_err().field
    }

    #[test]
    fn valid_specs_round_trip() {
        let s = FaultSpec::from_args(&args(json!({"op": "read", "lba": 10, "count": 4, "mode": "flaky", "probability": 0.25, "seed": 7, "times": 3})), 1000, 512).unwrap();
        assert_eq!(
            s.mode,
            FaultMode::Flaky {
                probability: 0.25,
                seed: 7
            }
        );
        assert_eq!(
            FaultSpec::from_args(s.to_json().as_object().unwrap(), 1000, 512).unwrap(),
            s
        );
        let d = FaultSpec::from_args(
            &args(json!({"lba": 0, "mode": "delay", "delay_ms": 200})),
            1000,
            512,
        )
        .unwrap();
        assert_eq!(
            (d.op, d.blocks, d.mode),
            (
                FaultOp::Any,
                Some(Blocks { lba: 0, count: 1 }),
                FaultMode::Delay {
                    ms: 200,
                    jitter: None
                }
            )
        );
        assert!(d.overlaps(0, 0) && !d.overlaps(1, 5));
    }

    #[test]
    fn every_bad_argument_is_named() {
        assert_eq!(field(json!({"op": "read"})), "lba");
        assert_eq!(field(json!({"lba": 1000})), "lba");
        assert_eq!(field(json!({"lba": -1})), "lba");
        assert_eq!(field(json!({"lba": 999, "count": 2})), "count");
        assert_eq!(field(json!({"lba": 1, "op": "erase"})), "op");
        assert_eq!(
            field(json!({"lba": 1, "mode": "flaky", "probability": 1.5})),
            "probability"
        );
        assert_eq!(field(json!({"lba": 1, "mode": "flaky"})), "probability");
        assert_eq!(field(json!({"lba": 1, "mode": "delay"})), "delay_ms");
        assert_eq!(field(json!({"lba": 1, "mode": "melt"})), "mode");
        assert_eq!(field(json!({"lba": 1, "times": 0})), "times");
        assert_eq!(field(json!({"lba": 1, "delay_ms": 5})), "delay_ms");
        assert_eq!(field(json!({"lba": 1, "colour": "red"})), "colour");
    }

    #[test]
    fn an_argument_of_another_mode_is_refused_by_name() {
        let e = FaultSpec::from_args(
            &args(json!({"lba": 1, "mode": "delay", "delay_ms": 5, "probability": 0.5})),
            1000,
            512,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "probability: only applies to mode flaky");
        let e = FaultSpec::from_args(&args(json!({"lba": 1, "seed": 3})), 1000, 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            "seed: only applies to mode delay, mode flaky or mode corrupt"
        );
        let e =
            FaultSpec::from_args(&args(json!({"lba": 1, "colour": "red"})), 1000, 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            "colour: unknown argument; fault-add takes op, lba, count, times, after, every, window, mode, delay_ms, jitter_ms, distribution, seed, probability, bits, xor, offset, shift, sectors, report"
        );
    }

    fn mode(v: Value) -> FaultMode {
        FaultSpec::from_args(&args(v), 1000, 512).unwrap().mode
    }

    #[test]
    fn the_data_modes_parse_and_round_trip() {
        for (v, want) in [
            (
                json!({"lba": 1, "op": "read", "mode": "corrupt", "bits": 3, "seed": 9}),
                FaultMode::Corrupt(Corruption::Bits { bits: 3, seed: 9 }),
            ),
            (
                json!({"lba": 1, "op": "write", "mode": "corrupt", "bits": 4096}),
                FaultMode::Corrupt(Corruption::Bits {
                    bits: 4096,
                    seed: 0,
                }),
            ),
            (
                json!({"lba": 1, "op": "read", "mode": "corrupt", "xor": 255, "offset": 511}),
                FaultMode::Corrupt(Corruption::Xor {
                    xor: 255,
                    offset: 511,
                }),
            ),
            (
                json!({"lba": 1, "op": "write", "mode": "lost-write"}),
                FaultMode::LostWrite,
            ),
            (
                json!({"lba": 10, "count": 5, "mode": "misdirect", "shift": -10}),
                FaultMode::Misdirect { shift: -10 },
            ),
            (
                json!({"lba": 10, "count": 5, "mode": "misdirect", "shift": 985}),
                FaultMode::Misdirect { shift: 985 },
            ),
            (
                json!({"lba": 1, "mode": "torn", "sectors": 2}),
                FaultMode::Torn {
                    sectors: 2,
                    report: TornReport::Ok,
                },
            ),
            (
                json!({"lba": 1, "mode": "torn", "sectors": 2, "report": "error"}),
                FaultMode::Torn {
                    sectors: 2,
                    report: TornReport::Error,
                },
            ),
        ] {
            assert_eq!(mode(v.clone()), want, "{v}");
            let s = FaultSpec::from_args(&args(v), 1000, 512).unwrap();
            assert_eq!(
                FaultSpec::from_args(s.to_json().as_object().unwrap(), 1000, 512).unwrap(),
                s
            );
        }
        assert_eq!(
            FaultSpec::from_args(
                &args(json!({"lba": 1, "op": "write", "mode": "corrupt", "xor": 1})),
                1000,
                512
            )
            .unwrap()
            .to_json(),
            json!({"op": "write", "lba": 1, "count": 1, "mode": "corrupt", "xor": 1, "offset": 0})
        );
        // The block size bounds bits and offset.
        assert_eq!(
            FaultSpec::from_args(
                &args(json!({"lba": 1, "op": "read", "mode": "corrupt", "bits": 32768})),
                1000,
                4096
            )
            .unwrap()
            .mode,
            FaultMode::Corrupt(Corruption::Bits {
                bits: 32768,
                seed: 0
            })
        );
    }

    #[test]
    fn every_bad_data_mode_argument_is_named() {
        let c = |extra: Value| {
            let mut v = json!({"lba": 1, "op": "read", "mode": "corrupt"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            field(v)
        };
        assert_eq!(c(json!({})), "bits");
        assert_eq!(c(json!({"bits": 1, "xor": 1})), "xor");
        assert_eq!(c(json!({"bits": 0})), "bits");
        assert_eq!(c(json!({"bits": 4097})), "bits");
        assert_eq!(c(json!({"bits": -1})), "bits");
        assert_eq!(c(json!({"bits": 1, "offset": 3})), "offset");
        assert_eq!(c(json!({"xor": 1, "seed": 3})), "seed");
        assert_eq!(c(json!({"xor": 0})), "xor");
        assert_eq!(c(json!({"xor": 256})), "xor");
        assert_eq!(c(json!({"xor": "0xff"})), "xor");
        assert_eq!(c(json!({"bits": 1u64 << 40})), "bits");
        assert_eq!(c(json!({"xor": 1, "offset": 1u64 << 40})), "offset");
        assert_eq!(
            field(json!({"lba": 1, "mode": "torn", "sectors": 1u64 << 40})),
            "sectors"
        );
        let e = FaultSpec::from_args(
            &args(json!({"lba": 1, "op": "read", "mode": "corrupt", "xor": 256})),
            1000,
            512,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "xor: must be a byte, 1 to 255 (0 changes nothing), got 256"
        );
        assert_eq!(c(json!({"xor": 1, "offset": 512})), "offset");
        assert_eq!(c(json!({"bits": 1, "shift": 3})), "shift");
        assert_eq!(
            field(json!({"lba": 1, "op": "read", "mode": "lost-write"})),
            "op"
        );
        assert_eq!(
            field(json!({"lba": 1, "mode": "lost-write", "sectors": 1})),
            "sectors"
        );
        assert_eq!(field(json!({"lba": 1, "mode": "misdirect"})), "shift");
        assert_eq!(
            field(json!({"lba": 1, "mode": "misdirect", "shift": 0})),
            "shift"
        );
        assert_eq!(
            field(json!({"lba": 10, "count": 5, "mode": "misdirect", "shift": -11})),
            "shift"
        );
        assert_eq!(
            field(json!({"lba": 10, "count": 5, "mode": "misdirect", "shift": 986})),
            "shift"
        );
        assert_eq!(
            field(json!({"lba": 1, "mode": "misdirect", "shift": i64::MIN})),
            "shift"
        );
        assert_eq!(
            field(json!({"lba": 1, "op": "read", "mode": "misdirect", "shift": 1})),
            "op"
        );
        assert_eq!(field(json!({"lba": 1, "mode": "torn"})), "sectors");
        assert_eq!(
            field(json!({"lba": 1, "mode": "torn", "sectors": 0})),
            "sectors"
        );
        assert_eq!(
            field(json!({"lba": 1, "mode": "torn", "sectors": 1, "report": "maybe"})),
            "report"
        );
        assert_eq!(
            field(json!({"lba": 1, "mode": "torn", "sectors": 1, "bits": 1})),
            "bits"
        );
    }

    #[test]
    fn write_only_modes_do_not_apply_to_reads() {
        let s = FaultSpec::from_args(&args(json!({"lba": 1, "mode": "lost-write"})), 1000, 512)
            .unwrap();
        assert!(s.applies_to(FaultOp::Write) && !s.applies_to(FaultOp::Read));
        let s = FaultSpec::from_args(
            &args(json!({"lba": 1, "op": "read", "mode": "corrupt", "bits": 1})),
            1000,
            512,
        )
        .unwrap();
        assert!(!s.applies_to(FaultOp::Write) && s.applies_to(FaultOp::Read));
    }

    #[test]
    fn corrupt_needs_a_direction() {
        let e = FaultSpec::from_args(
            &args(json!({"lba": 1, "mode": "corrupt", "bits": 1})),
            1000,
            512,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("op: mode corrupt needs op=read"),
            "{e}"
        );
    }

    #[test]
    fn mode_names_are_the_serialized_names() {
        let modes = [
            FaultMode::Error,
            FaultMode::Delay {
                ms: 1,
                jitter: None,
            },
            FaultMode::Flaky {
                probability: 0.5,
                seed: 0,
            },
            FaultMode::Corrupt(Corruption::Xor { xor: 1, offset: 0 }),
            FaultMode::LostWrite,
            FaultMode::Misdirect { shift: 1 },
            FaultMode::Torn {
                sectors: 1,
                report: TornReport::Ok,
            },
            FaultMode::Hang,
            FaultMode::Stall { ms: 1 },
        ];
        assert_eq!(modes.len(), MODE_NAMES.len());
        for (i, m) in modes.iter().enumerate() {
            assert_eq!(m.index(), i);
            assert_eq!(serde_json::to_value(m).unwrap()["mode"], m.name());
        }
    }

    #[test]
    fn specs_serialize_as_fault_add_takes_them() {
        let spec = |mode, times| FaultSpec {
            op: FaultOp::Write,
            blocks: Some(Blocks { lba: 4, count: 2 }),
            mode,
            times,
            trigger: Trigger::default(),
        };
        assert_eq!(
            spec(FaultMode::Error, None).to_json(),
            json!({"op": "write", "lba": 4, "count": 2, "mode": "error"})
        );
        assert_eq!(
            spec(
                FaultMode::Delay {
                    ms: 9,
                    jitter: None
                },
                Some(3)
            )
            .to_json(),
            json!({"op": "write", "lba": 4, "count": 2, "mode": "delay", "delay_ms": 9, "times": 3})
        );
        assert_eq!(
            spec(
                FaultMode::Flaky {
                    probability: 0.5,
                    seed: 1
                },
                None
            )
            .to_json(),
            json!({"op": "write", "lba": 4, "count": 2, "mode": "flaky", "probability": 0.5, "seed": 1})
        );
    }
    #[test]
    fn ops_flush_discard_and_write_zeroes() {
        let s = |v: Value| FaultSpec::from_args(&args(v), 1000, 512).unwrap();
        let f = s(json!({"op": "flush"}));
        assert_eq!(
            (f.op, f.blocks, f.mode),
            (FaultOp::Flush, None, FaultMode::Error)
        );
        // Without lba and count in the list, and back again.
        assert_eq!(f.to_json(), json!({"op": "flush", "mode": "error"}));
        assert_eq!(
            FaultSpec::from_args(f.to_json().as_object().unwrap(), 1000, 512).unwrap(),
            f
        );
        for mode in [
            json!({"mode": "flaky", "probability": 0.5}),
            json!({"mode": "delay", "delay_ms": 5}),
        ] {
            let mut v = mode.clone();
            v["op"] = json!("flush");
            assert_eq!(s(v).op, FaultOp::Flush, "{mode}");
        }
        let d = s(json!({"op": "discard", "lba": 3, "mode": "lost-write"}));
        assert_eq!(d.op, FaultOp::Discard);
        let z = s(json!({"op": "write-zeroes", "lba": 3, "mode": "torn", "sectors": 1}));
        assert_eq!(z.to_json()["op"], "write-zeroes");
        assert_eq!(
            s(json!({"op": "discard", "lba": 3, "mode": "misdirect", "shift": 2})).op,
            FaultOp::Discard
        );
    }

    #[test]
    fn what_a_flush_fault_cannot_take_is_refused_by_name() {
        assert_eq!(field(json!({"op": "flush", "lba": 0})), "lba");
        assert_eq!(field(json!({"op": "flush", "count": 2})), "count");
        let e =
            FaultSpec::from_args(&args(json!({"op": "flush", "lba": 0})), 1000, 512).unwrap_err();
        assert!(e.desc.contains("omit lba and count"), "{e}");
        for mode in [
            json!({"mode": "lost-write"}),
            json!({"mode": "misdirect", "shift": 1}),
            json!({"mode": "torn", "sectors": 1}),
            json!({"mode": "corrupt", "bits": 1}),
        ] {
            let mut v = mode.clone();
            v["op"] = json!("flush");
            assert_eq!(field(v), "op", "{mode}");
        }
        let e = FaultSpec::from_args(
            &args(json!({"op": "flush", "mode": "lost-write"})),
            1000,
            512,
        )
        .unwrap_err();
        assert!(e.desc.contains("not supported yet"), "{e}");
        // Every other op needs its blocks.
        let e = FaultSpec::from_args(&args(json!({"op": "discard"})), 1000, 512).unwrap_err();
        assert!(e.to_string().starts_with("lba: missing"), "{e}");
        // corrupt has no data to damage in a discard or write-zeroes.
        for op in ["discard", "write-zeroes"] {
            assert_eq!(
                field(json!({"op": op, "lba": 1, "mode": "corrupt", "bits": 1})),
                "op"
            );
        }
    }

    #[test]
    fn ops_cover_the_requests_of_their_kind() {
        use FaultOp::*;
        let all = [Read, Write, Flush, Discard, WriteZeroes];
        let covered =
            |op: FaultOp| -> Vec<FaultOp> { all.into_iter().filter(|&r| op.covers(r)).collect() };
        assert_eq!(covered(Any), [Read, Write, Discard, WriteZeroes]);
        assert_eq!(covered(Write), [Write, Discard, WriteZeroes]);
        assert_eq!(covered(Read), [Read]);
        assert_eq!(covered(Flush), [Flush]);
        assert_eq!(covered(Discard), [Discard]);
        assert_eq!(covered(WriteZeroes), [WriteZeroes]);
        // corrupt on writes does not match the requests without data.
        let c = FaultSpec::from_args(
            &args(json!({"op": "write", "lba": 1, "mode": "corrupt", "bits": 1})),
            1000,
            512,
        )
        .unwrap();
        assert!(c.applies_to(Write) && !c.applies_to(Discard) && !c.applies_to(WriteZeroes));
        let f = FaultSpec::from_args(&args(json!({"op": "flush"})), 1000, 512).unwrap();
        assert!(f.applies_to(Flush) && f.overlaps(0, 0) && f.covered(0, 0) == (0..=0));
    }

    #[test]
    fn triggers_parse_round_trip_and_go_with_every_mode() {
        let t = FaultSpec::from_args(
            &args(json!({"lba": 1, "after": 3, "every": 2, "window": "300:700", "times": 4})),
            1000,
            512,
        )
        .unwrap();
        assert_eq!(
            t.trigger,
            Trigger {
                after: Some(3),
                every: Some(2),
                window: Some(Window {
                    up_ms: 300,
                    down_ms: 700
                })
            }
        );
        assert_eq!(
            t.to_json(),
            json!({"op": "any", "lba": 1, "count": 1, "mode": "error", "times": 4,
                   "after": 3, "every": 2, "window": "300:700"})
        );
        assert_eq!(
            FaultSpec::from_args(t.to_json().as_object().unwrap(), 1000, 512).unwrap(),
            t
        );
        for mode in [
            json!({"mode": "error"}),
            json!({"mode": "delay", "delay_ms": 1}),
            json!({"mode": "flaky", "probability": 0.5}),
            json!({"mode": "corrupt", "op": "read", "bits": 1}),
            json!({"mode": "lost-write"}),
            json!({"mode": "misdirect", "shift": 1}),
            json!({"mode": "torn", "sectors": 1}),
            json!({"mode": "error", "op": "flush"}),
        ] {
            let mut v = mode.clone();
            if v.get("op").is_none_or(|o| o != "flush") {
                v["lba"] = json!(1);
            }
            v["after"] = json!(1);
            v["every"] = json!(1);
            v["window"] = json!("1:1");
            let s = FaultSpec::from_args(&args(v), 1000, 512).unwrap();
            assert_eq!(s.trigger.after, Some(1), "{mode}");
        }
    }

    #[test]
    fn every_bad_trigger_is_named() {
        assert_eq!(field(json!({"lba": 1, "after": 0})), "after");
        assert_eq!(field(json!({"lba": 1, "after": -1})), "after");
        assert_eq!(field(json!({"lba": 1, "every": 0})), "every");
        assert_eq!(field(json!({"lba": 1, "every": "x"})), "every");
        for w in [json!(300), json!("300"), json!("0:1"), json!("1:x")] {
            assert_eq!(field(json!({"lba": 1, "window": w})), "window", "{w}");
        }
        let e =
            FaultSpec::from_args(&args(json!({"lba": 1, "window": 300})), 1000, 512).unwrap_err();
        assert!(e.desc.contains("UP_MS:DOWN_MS"), "{e}");
    }

    #[test]
    fn a_stray_field_of_another_mode_is_refused_for_every_mode() {
        for (v, stray) in [
            (json!({"lba": 1, "mode": "error", "shift": 1}), "shift"),
            (
                json!({"lba": 1, "mode": "delay", "delay_ms": 1, "bits": 1}),
                "bits",
            ),
            (
                json!({"lba": 1, "mode": "flaky", "probability": 0.5, "sectors": 1}),
                "sectors",
            ),
            (
                json!({"lba": 1, "op": "read", "mode": "corrupt", "bits": 1, "delay_ms": 1}),
                "delay_ms",
            ),
            (
                json!({"lba": 1, "mode": "lost-write", "sectors": 1}),
                "sectors",
            ),
            (
                json!({"lba": 1, "mode": "misdirect", "shift": 1, "bits": 1}),
                "bits",
            ),
            (
                json!({"lba": 1, "mode": "torn", "sectors": 1, "probability": 0.5}),
                "probability",
            ),
            (json!({"op": "flush", "report": "ok"}), "report"),
        ] {
            let e = FaultSpec::from_args(&args(v.clone()), 1000, 512).unwrap_err();
            assert_eq!(e.field, stray, "{v}");
            assert!(e.desc.starts_with("only applies to mode"), "{v}: {e}");
        }
    }

    #[test]
    fn delays_take_a_distribution_and_hangs_take_nothing() {
        let v = json!({"lba": 1, "mode": "delay", "delay_ms": 50, "jitter_ms": 20,
                       "distribution": "pareto", "seed": 4});
        let s = FaultSpec::from_args(&args(v.clone()), 1000, 512).unwrap();
        assert_eq!(
            s.mode,
            FaultMode::Delay {
                ms: 50,
                jitter: Some(Jitter {
                    distribution: Distribution::Pareto,
                    jitter_ms: 20,
                    seed: 4
                })
            }
        );
        // fault-list shows what fault-add took, and takes it back.
        assert_eq!(
            s.to_json(),
            json!({"op": "any", "lba": 1, "count": 1, "mode": "delay", "delay_ms": 50,
                   "distribution": "pareto", "jitter_ms": 20, "seed": 4})
        );
        assert_eq!(
            FaultSpec::from_args(s.to_json().as_object().unwrap(), 1000, 512).unwrap(),
            s
        );
        // jitter_ms alone: uniform, seed 0.
        assert_eq!(
            mode(json!({"lba": 1, "mode": "delay", "delay_ms": 50, "jitter_ms": 20})),
            FaultMode::Delay {
                ms: 50,
                jitter: Some(Jitter {
                    distribution: Distribution::Uniform,
                    jitter_ms: 20,
                    seed: 0
                })
            }
        );
        assert_eq!(
            mode(json!({"lba": 1, "mode": "delay", "delay_ms": 50, "distribution": "fixed"})),
            FaultMode::Delay {
                ms: 50,
                jitter: None
            }
        );
        let h = FaultSpec::from_args(
            &args(json!({"lba": 1, "mode": "hang", "times": 2})),
            1000,
            512,
        )
        .unwrap();
        assert_eq!(h.mode, FaultMode::Hang);
        assert!(h.mode.holds() && !h.mode.writes_only());
        assert_eq!(
            h.to_json(),
            json!({"op": "any", "lba": 1, "count": 1, "mode": "hang", "times": 2})
        );
    }

    #[test]
    fn bad_delay_and_hang_arguments_are_named() {
        let d = |extra: Value| {
            let mut v = json!({"lba": 1, "mode": "delay", "delay_ms": 10});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            FaultSpec::from_args(&args(v), 1000, 512).unwrap_err()
        };
        let e = d(json!({"jitter_ms": 5, "distribution": "fixed"}));
        assert!(e.to_string().starts_with("jitter_ms: "), "{e}");
        assert_eq!(d(json!({"distribution": "uniform"})).field, "jitter_ms");
        assert_eq!(d(json!({"jitter_ms": 0})).field, "jitter_ms");
        assert_eq!(d(json!({"jitter_ms": 3_600_001})).field, "jitter_ms");
        assert_eq!(d(json!({"jitter_ms": -1})).field, "jitter_ms");
        assert_eq!(
            d(json!({"jitter_ms": 5, "distribution": "gauss"})).field,
            "distribution"
        );
        assert_eq!(d(json!({"seed": 1})).field, "seed");
        assert_eq!(d(json!({"delay_ms": 3_600_001})).field, "delay_ms");
        assert_eq!(
            field(json!({"lba": 1, "mode": "hang", "delay_ms": 5})),
            "delay_ms"
        );
        assert_eq!(
            field(json!({"lba": 1, "mode": "hang", "jitter_ms": 5})),
            "jitter_ms"
        );
        assert_eq!(
            field(json!({"lba": 1, "mode": "flaky", "probability": 0.1, "jitter_ms": 5})),
            "jitter_ms"
        );
    }
}
