//! The wire format: `{"execute": NAME, "arguments": {...}}` in, `{"return": {...}}` or
//! `{"error": {"class": ..., "desc": ...}}` out, one JSON object per line.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::fields::ArgError;

/// The commands the control socket knows. This is the one list: the server dispatches on it
/// and `remapblk ctl --help` prints it, each with the first line of its doc comment. serde
/// (the wire) and clap (the help) both spell the names in kebab-case, e.g. `query-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CommandName {
    /// State, image, geometry, connection, in-flight requests, engine and remap counts.
    QueryStatus,
    /// Request counters in total and per queue, with per-queue latency.
    QueryStats,
    /// Stop taking requests and return once none is in flight; lasts until resume.
    Quiesce,
    /// Take requests again after quiesce.
    Resume,
    /// Inject a fault: lba=N [count=N] [op=read|write|discard|write-zeroes|any] (or op=flush, no lba or count) [mode=error|delay delay_ms=N [jitter_ms=N] [distribution=fixed|uniform|exponential|pareto] [seed=N]|hang|stall delay_ms=N|flaky probability=P [seed=N]|corrupt (bits=N [seed=N] | xor=BYTE [offset=K])|lost-write|misdirect shift=N|torn sectors=N [report=ok|error]] [after=N] [every=N] [window=UP_MS:DOWN_MS] [times=N]; a matching I/O is counted, passes until after is reached, then only every Nth, only in the window's up phase, goes on to the mode; times caps the firings. A hang holds its requests until fault-release.
    FaultAdd,
    /// The faults in place: their arguments, matched, fired, armed, expired, window_up.
    FaultList,
    /// Remove one fault: id=N.
    FaultRemove,
    /// Let the requests a hang fault holds now go on (the fault stays and holds later ones): id=N.
    FaultRelease,
    /// Remove every fault.
    FaultClear,
    /// The remap table: lba, spare_block, cause and since of each remapped block.
    RemapList,
    /// Blocks whose read failed, waiting for a write to remap them.
    PendingList,
    /// Copy blocks to the spare and remap them: lba=N [count=N] [stride=N].
    RemapAdd,
    /// Copy remapped blocks back to the image and free their spare: lba=N [count=N] [stride=N].
    RemapRemove,
    /// With --overlay (quiesced): drop every change since start or the last commit, remaps too.
    OverlayReset,
    /// With --overlay (quiesced): write the overlay into the image and spare file, durably.
    OverlayCommit,
    /// Cut the power (quiesced): lose unflushed writes: [mode=drop-all|keep-all|random] [seed=S] [probability=P] [torn=off|sector] [then=fail|hold].
    PowerCut,
    /// Power the disk on again after power-cut: requests run again, as on a fresh disk.
    PowerOn,
    /// Add a mark to the write log (serve --write-log) and make the log durable: name=TEXT.
    LogMark,
}

impl CommandName {
    /// The command `name` names on the wire, or CommandNotFound listing those there are.
    pub fn parse(name: &str) -> Result<CommandName, CommandError> {
        use serde::de::value::{Error, StrDeserializer};
        CommandName::deserialize(StrDeserializer::<Error>::new(name)).map_err(|_| CommandError {
            class: "CommandNotFound",
            desc: format!(
                "unknown command \"{name}\"; known: {}",
                CommandName::names().join(", ")
            ),
        })
    }

    /// Every command's name, in the order of the enum.
    pub fn names() -> Vec<String> {
        use clap::ValueEnum;
        CommandName::value_variants()
            .iter()
            .map(CommandName::name)
            .collect()
    }

    /// The name, e.g. `query-status`.
    pub fn name(&self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// An error a command reports to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub class: &'static str,
    pub desc: String,
}

impl CommandError {
    pub fn generic(desc: impl Into<String>) -> CommandError {
        CommandError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl From<ArgError> for CommandError {
    fn from(e: ArgError) -> CommandError {
        CommandError::generic(e.to_string())
    }
}

pub type CommandResult = Result<Value, CommandError>;

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
}

/// Parses one line; the error says what was wrong with it.
pub fn parse_request(line: &str) -> Result<Request, CommandError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| CommandError::generic(format!("not a JSON object: {e}")))?;
    let Value::Object(mut obj) = v else {
        return Err(CommandError::generic(
            "a request is a JSON object with \"execute\" and optional \"arguments\"",
        ));
    };
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(CommandError::generic("\"execute\" must be a string")),
        None => return Err(CommandError::generic("missing \"execute\"")),
    };
    let arguments = match obj.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(CommandError::generic("\"arguments\" must be an object")),
    };
    if let Some(k) = obj.keys().next() {
        return Err(CommandError::generic(format!("unknown member \"{k}\"")));
    }
    Ok(Request { execute, arguments })
}

/// The line to send back for a command's result.
pub fn reply(result: &CommandResult) -> String {
    match result {
        Ok(v) => json!({ "return": v }).to_string(),
        Err(e) => json!({ "error": { "class": e.class, "desc": e.desc } }).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        let r = parse_request(r#"{"execute":"query-status"}"#).unwrap();
        assert_eq!(r.execute, "query-status");
        assert!(r.arguments.is_empty());
        let r = parse_request(r#"{"execute":"fault-add","arguments":{"lba":3}}"#).unwrap();
        assert_eq!(r.arguments["lba"], 3);
        assert!(parse_request("{").unwrap_err().desc.contains("JSON"));
        assert!(parse_request("[1]").is_err());
        assert!(parse_request(r#"{"arguments":{}}"#)
            .unwrap_err()
            .desc
            .contains("execute"));
        assert!(parse_request(r#"{"execute":1}"#).is_err());
        assert!(parse_request(r#"{"execute":"x","arguments":3}"#).is_err());
        assert!(parse_request(r#"{"execute":"x","bogus":3}"#)
            .unwrap_err()
            .desc
            .contains("bogus"));
    }

    #[test]
    fn command_names_are_the_same_on_the_wire_and_in_the_help() {
        use clap::ValueEnum;
        for c in CommandName::value_variants() {
            assert_eq!(serde_json::to_value(c).unwrap(), json!(c.name()));
            assert_eq!(CommandName::parse(&c.name()), Ok(*c));
        }
        assert_eq!(CommandName::QueryStatus.name(), "query-status");
        let e = CommandName::parse("query_status").unwrap_err();
        assert_eq!(e.class, "CommandNotFound");
        assert!(e.desc.contains("\"query_status\""), "{}", e.desc);
        assert!(
            e.desc.contains("query-status, query-stats, quiesce"),
            "{}",
            e.desc
        );
    }

    #[test]
    fn replies_have_the_qmp_shape() {
        assert_eq!(reply(&Ok(json!({"a": 1}))), r#"{"return":{"a":1}}"#);
        let e = reply(&Err(CommandError::generic("no")));
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"]["class"], "GenericError");
        assert_eq!(v["error"]["desc"], "no");
    }
}
