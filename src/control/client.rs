//! `remapblk ctl`: sends one command to the control socket and prints the answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Map, Value};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CtlError {
    #[error("nothing listens on {path} ({source}); is `remapblk serve` running? Its control socket is <socket>.ctl unless --control says otherwise")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("argument '{0}' is not key=value")]
    BadArgument(String),
    #[error("the control socket closed the connection without answering")]
    NoAnswer,
    #[error("talking to the control socket failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the control socket answered something that is not a reply: {0}")]
    BadReply(String),
    /// The command failed; `desc` is the server's explanation.
    #[error("{0}")]
    Command(String),
}

/// Builds the arguments object: each value is taken as JSON when it parses (`lba=1000`,
/// `probability=0.5`, `on=true`), else as a string (`op=read`).
pub fn parse_arguments(args: &[String]) -> Result<Map<String, Value>, CtlError> {
    let mut map = Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| CtlError::BadArgument(a.clone()))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        map.insert(k.to_string(), value);
    }
    Ok(map)
}

/// Sends `name` with `arguments`; returns the `return` object.
pub fn call(control: &Path, name: &str, arguments: Map<String, Value>) -> Result<Value, CtlError> {
    let stream = UnixStream::connect(control).map_err(|source| CtlError::Connect {
        path: control.display().to_string(),
        source,
    })?;
    let mut out = stream.try_clone()?;
    let req = json!({ "execute": name, "arguments": arguments });
    out.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line)? == 0 {
        return Err(CtlError::NoAnswer);
    }
    let v: Value = serde_json::from_str(&line).map_err(|_| CtlError::BadReply(line.clone()))?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    match v
        .get("error")
        .and_then(|e| e.get("desc"))
        .and_then(Value::as_str)
    {
        Some(desc) => Err(CtlError::Command(desc.to_string())),
        None => Err(CtlError::BadReply(line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_where_they_parse() {
        let m = parse_arguments(&[
            "lba=1000".into(),
            "op=read".into(),
            "probability=0.5".into(),
            "name=\"x\"".into(),
        ])
        .unwrap();
        assert_eq!(m["lba"], 1000);
        assert_eq!(m["op"], "read");
        assert_eq!(m["probability"], 0.5);
        assert_eq!(m["name"], "x");
        assert!(parse_arguments(&["novalue".into()]).is_err());
        assert!(parse_arguments(&["=3".into()]).is_err());
    }
}
