//! A fault's description as `fault-add` takes it and `fault-list` shows it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fields::{one, ArgError, Args};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultOp {
    Read,
    Write,
    #[default]
    Any,
}

/// What a fault does to a request. Serialized with its arguments' names:
/// `{"mode": "delay", "delay_ms": 200}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum FaultMode {
    /// The request fails as a media error (VIRTIO_BLK_S_IOERR).
    Error,
    /// The request is held this long, then carried out.
    Delay {
        /// `delay_ms` on the wire; `ms` here because the I/O side matches on that name.
        #[serde(rename = "delay_ms")]
        ms: u64,
    },
    /// The request fails with this probability, from a PRNG seeded with `seed`.
    Flaky { probability: f64, seed: u64 },
}

/// What each mode takes besides the common arguments, picked by `mode`. Adding a mode: its
/// variant here, its variant in [`FaultMode`], and its arm in [`ModeArgs::check`].
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ModeArgs {
    Error,
    Delay {
        delay_ms: u64,
    },
    Flaky {
        probability: f64,
        #[serde(default)]
        seed: u64,
    },
}

impl ModeArgs {
    /// The ranges serde cannot check.
    fn check(self) -> Result<FaultMode, ArgError> {
        Ok(match self {
            ModeArgs::Error => FaultMode::Error,
            ModeArgs::Delay { delay_ms } => {
                if !(1..=3_600_000).contains(&delay_ms) {
                    return Err(ArgError::new(
                        "delay_ms",
                        format!("must be 1 to 3600000, got {delay_ms}"),
                    ));
                }
                FaultMode::Delay { ms: delay_ms }
            }
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
        })
    }
}

/// The arguments every mode takes.
#[derive(Deserialize)]
struct CommonArgs {
    #[serde(default)]
    op: FaultOp,
    lba: u64,
    #[serde(default = "one")]
    count: u64,
    times: Option<u64>,
}

/// One fault, serialized as the `fault-add` arguments that make it. Not `Deserialize` on
/// purpose: [`from_args`](Self::from_args) is the one way in, as it names the field at fault
/// and checks the ranges against the disk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultSpec {
    pub op: FaultOp,
    /// First logical block.
    pub lba: u64,
    /// Blocks covered.
    pub count: u64,
    #[serde(flatten)]
    pub mode: FaultMode,
    /// Fire this many times, then expire; None: forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
}

/// A bad `fault-add` argument; `field` names it.
pub type FaultArgError = ArgError;

impl FaultSpec {
    /// Validates `fault-add` arguments against a disk of `capacity_blocks` blocks.
    pub fn from_args(
        args: &Map<String, Value>,
        capacity_blocks: u64,
    ) -> Result<FaultSpec, FaultArgError> {
        let mut args = Args::new(args);
        let common: CommonArgs = args
            .take()
            .map_err(|e| e.explain_missing("lba", "the first logical block of the fault"))?;
        let mode: ModeArgs = args.take_tagged("mode", "error")?;
        args.finish("fault-add")?;
        let CommonArgs {
            op,
            lba,
            count,
            times,
        } = common;
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
        if times == Some(0) {
            return Err(ArgError::new(
                "times",
                "must be at least 1 (omit it for a fault that never expires)",
            ));
        }
        Ok(FaultSpec {
            op,
            lba,
            count,
            mode: mode.check()?,
            times,
        })
    }

    /// The arguments back, as `fault-list` shows them.
    pub fn to_json(&self) -> Value {
        // Cannot fail: a struct of numbers and names, no map with non-string keys.
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn applies_to(&self, op: FaultOp) -> bool {
        self.op == FaultOp::Any || self.op == op
    }

    /// Whether blocks `[first, last]` touch this fault's blocks.
    pub fn overlaps(&self, first: u64, last: u64) -> bool {
        first < self.lba + self.count && last >= self.lba
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
        FaultSpec::from_args(&args(v), 1000).unwrap_err().field
    }

    #[test]
    fn valid_specs_round_trip() {
        let s = FaultSpec::from_args(&args(json!({"op": "read", "lba": 10, "count": 4, "mode": "flaky", "probability": 0.25, "seed": 7, "times": 3})), 1000).unwrap();
        assert_eq!(
            s.mode,
            FaultMode::Flaky {
                probability: 0.25,
                seed: 7
            }
        );
        assert_eq!(
            FaultSpec::from_args(s.to_json().as_object().unwrap(), 1000).unwrap(),
            s
        );
        let d = FaultSpec::from_args(
            &args(json!({"lba": 0, "mode": "delay", "delay_ms": 200})),
            1000,
        )
        .unwrap();
        assert_eq!(
            (d.op, d.count, d.mode),
            (FaultOp::Any, 1, FaultMode::Delay { ms: 200 })
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
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "probability: only applies to mode flaky");
        let e = FaultSpec::from_args(&args(json!({"lba": 1, "seed": 3})), 1000).unwrap_err();
        assert_eq!(e.to_string(), "seed: only applies to mode flaky");
        let e = FaultSpec::from_args(&args(json!({"lba": 1, "colour": "red"})), 1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "colour: unknown argument; fault-add takes op, lba, count, times, mode, delay_ms, probability, seed"
        );
    }

    #[test]
    fn specs_serialize_as_fault_add_takes_them() {
        let spec = |mode, times| FaultSpec {
            op: FaultOp::Write,
            lba: 4,
            count: 2,
            mode,
            times,
        };
        assert_eq!(
            spec(FaultMode::Error, None).to_json(),
            json!({"op": "write", "lba": 4, "count": 2, "mode": "error"})
        );
        assert_eq!(
            spec(FaultMode::Delay { ms: 9 }, Some(3)).to_json(),
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
}
