//! A fault's description as `fault-add` takes it, validated field by field.

use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultMode {
    /// The request fails as a media error (VIRTIO_BLK_S_IOERR).
    Error,
    /// The request is held this long, then carried out.
    Delay { ms: u64 },
    /// The request fails with this probability, from a PRNG seeded with `seed`.
    Flaky { probability: f64, seed: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub op: FaultOp,
    /// First logical block.
    pub lba: u64,
    /// Blocks covered.
    pub count: u64,
    pub mode: FaultMode,
    /// Fire this many times, then expire; None: forever.
    pub times: Option<u64>,
}

/// A bad `fault-add` argument; `field` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {desc}")]
pub struct FaultArgError {
    pub field: String,
    pub desc: String,
}

fn bad(field: &str, desc: impl Into<String>) -> FaultArgError {
    FaultArgError {
        field: field.to_string(),
        desc: desc.into(),
    }
}

const FIELDS: [&str; 8] = [
    "op",
    "lba",
    "count",
    "mode",
    "delay_ms",
    "probability",
    "seed",
    "times",
];

fn uint(args: &Map<String, Value>, field: &str) -> Result<Option<u64>, FaultArgError> {
    match args.get(field) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(field, format!("must be a non-negative integer, got {v}"))),
    }
}

impl FaultSpec {
    /// Validates `fault-add` arguments against a disk of `capacity_blocks` blocks.
    pub fn from_args(
        args: &Map<String, Value>,
        capacity_blocks: u64,
    ) -> Result<FaultSpec, FaultArgError> {
        if let Some(k) = args.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(bad(
                k,
                format!("unknown argument; fault-add takes {}", FIELDS.join(", ")),
            ));
        }
        let op = match args.get("op").map(|v| v.as_str()) {
            None => FaultOp::Any,
            Some(Some("read")) => FaultOp::Read,
            Some(Some("write")) => FaultOp::Write,
            Some(Some("any")) => FaultOp::Any,
            Some(_) => {
                return Err(bad(
                    "op",
                    format!("must be read, write or any, got {}", args["op"]),
                ))
            }
        };
        let lba = uint(args, "lba")?
            .ok_or_else(|| bad("lba", "missing: the first logical block of the fault"))?;
        if lba >= capacity_blocks {
            return Err(bad(
                "lba",
                format!("{lba} is past the end of the disk ({capacity_blocks} blocks)"),
            ));
        }
        let count = uint(args, "count")?.unwrap_or(1);
        if count == 0 {
            return Err(bad("count", "must be at least 1"));
        }
        if lba
            .checked_add(count)
            .is_none_or(|end| end > capacity_blocks)
        {
            return Err(bad("count", format!("lba {lba} + count {count} reaches past the end of the disk ({capacity_blocks} blocks)")));
        }
        let times = uint(args, "times")?;
        if times == Some(0) {
            return Err(bad(
                "times",
                "must be at least 1 (omit it for a fault that never expires)",
            ));
        }
        let mode_name = match args.get("mode") {
            None => "error",
            Some(v) => v
                .as_str()
                .ok_or_else(|| bad("mode", format!("must be error, delay or flaky, got {v}")))?,
        };
        let only_for = |field: &str, mode: &str| -> Result<(), FaultArgError> {
            if args.contains_key(field) {
                Err(bad(field, format!("only applies to mode {mode}")))
            } else {
                Ok(())
            }
        };
        let mode = match mode_name {
            "error" => {
                only_for("delay_ms", "delay")?;
                only_for("probability", "flaky")?;
                only_for("seed", "flaky")?;
                FaultMode::Error
            }
            "delay" => {
                only_for("probability", "flaky")?;
                only_for("seed", "flaky")?;
                let ms = uint(args, "delay_ms")?
                    .ok_or_else(|| bad("delay_ms", "missing: mode delay needs delay_ms"))?;
                if ms == 0 || ms > 3_600_000 {
                    return Err(bad("delay_ms", format!("must be 1 to 3600000, got {ms}")));
                }
                FaultMode::Delay { ms }
            }
            "flaky" => {
                only_for("delay_ms", "delay")?;
                let p = args.get("probability").ok_or_else(|| {
                    bad(
                        "probability",
                        "missing: mode flaky needs a probability from 0 to 1",
                    )
                })?;
                let probability =
                    p.as_f64()
                        .filter(|p| (0.0..=1.0).contains(p))
                        .ok_or_else(|| {
                            bad(
                                "probability",
                                format!("must be a number from 0 to 1, got {p}"),
                            )
                        })?;
                FaultMode::Flaky {
                    probability,
                    seed: uint(args, "seed")?.unwrap_or(0),
                }
            }
            other => {
                return Err(bad(
                    "mode",
                    format!("must be error, delay or flaky, got \"{other}\""),
                ))
            }
        };
        Ok(FaultSpec {
            op,
            lba,
            count,
            mode,
            times,
        })
    }

    /// The arguments back, as `fault-list` shows them.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "op": match self.op { FaultOp::Read => "read", FaultOp::Write => "write", FaultOp::Any => "any" },
            "lba": self.lba,
            "count": self.count,
        });
        match self.mode {
            FaultMode::Error => v["mode"] = json!("error"),
            FaultMode::Delay { ms } => {
                v["mode"] = json!("delay");
                v["delay_ms"] = json!(ms);
            }
            FaultMode::Flaky { probability, seed } => {
                v["mode"] = json!("flaky");
                v["probability"] = json!(probability);
                v["seed"] = json!(seed);
            }
        }
        if let Some(t) = self.times {
            v["times"] = json!(t);
        }
        v
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
}
