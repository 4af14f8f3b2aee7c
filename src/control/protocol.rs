//! The wire format: `{"execute": NAME, "arguments": {...}}` in, `{"return": {...}}` or
//! `{"error": {"class": ..., "desc": ...}}` out, one JSON object per line.

use serde_json::{json, Map, Value};

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
    fn replies_have_the_qmp_shape() {
        assert_eq!(reply(&Ok(json!({"a": 1}))), r#"{"return":{"a":1}}"#);
        let e = reply(&Err(CommandError::generic("no")));
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"]["class"], "GenericError");
        assert_eq!(v["error"]["desc"], "no");
    }
}
