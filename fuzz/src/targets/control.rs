//! The control socket's JSON lines, two ways:
//! - in this process, each line through what the server does with it (`parse_request`, then
//!   `Commands::dispatch`, then `reply`), against a fresh device with a remap layer over a
//!   spare file and a fault table: lines of any text, JSON values of any shape, and commands
//!   of every name with arguments named as the commands name theirs, of any type;
//! - through the socket of a `ControlServer` (one for the process), raw bytes: invalid UTF-8,
//!   lines of megabytes, no final newline.
//!
//! What must hold: no panic; every reply is one line of JSON, `{"return": ...}` or
//! `{"error": {"class": ..., "desc": ...}}` with a class and a description; a fault that
//! `fault-add` accepted is in `fault-list`; through the socket, the connection ends when the
//! client ends it, and a fresh client is answered.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use remapblk::backend::{Device, DeviceConfig, Live, Polling};
use remapblk::cache::{CacheModel, CacheTarget};
use remapblk::control::commands::Commands;
use remapblk::control::protocol::{parse_request, reply, CommandName};
use remapblk::control::ControlServer;
use remapblk::events::EventLog;
use remapblk::fault::spec::MODE_NAMES;
use remapblk::fault::FaultTable;
use remapblk::io::EngineKind;
use remapblk::remap::{self, RemapTarget};
use remapblk::storage::{BlockIo, NullTarget};
use serde_json::{Map, Number, Value};

use super::scratch;

const CAPACITY: u64 = 1 << 20;
const BLOCK: u32 = 512;
/// The first byte of an input that is raw bytes for the socket, and of one that is chunks of
/// bytes, lines and long runs of one byte for it.
const RAW: u8 = b'S';
const CHUNKS: u8 = b'L';
/// The most a chunked input sends.
const MAX_SENT: usize = 4 << 20;
/// How long the socket may take to answer or end.
const PATIENCE: Duration = Duration::from_secs(10);
/// Argument names the commands take, and a few they do not.
const KEYS: &[&str] = &[
    "lba",
    "count",
    "stride",
    "id",
    "op",
    "mode",
    "delay_ms",
    "probability",
    "seed",
    "times",
    "bits",
    "xor",
    "offset",
    "shift",
    "sectors",
    "report",
    "jitter_ms",
    "distribution",
    "after",
    "every",
    "window",
    "execute",
    "arguments",
    "",
];
/// Words for argument values, besides the mode names ([`MODE_NAMES`]).
const WORDS: &[&str] = &[
    "read",
    "write",
    "any",
    "flush",
    "discard",
    "write-zeroes",
    "ok",
    "uniform",
    "exponential",
    "pareto",
    "fixed",
    "300:700",
    "0:1",
    "",
    "0",
    "1",
    "-1",
    "drop-all",
    "keep-all",
    "random",
    "sector",
    "off",
    "fail",
    "hold",
];

/// A device, fault table and remap layer as `serve` builds them, over the null target and a
/// spare file of 64 blocks in `dir`. The faults are not in the I/O path: a delay fault of an
/// hour is a valid command, and `remap-add` would wait it out.
fn commands(dir: &std::path::Path) -> Commands {
    let spare = dir.join("spare");
    let _ = std::fs::remove_file(&spare);
    let events = Arc::new(EventLog::disabled());
    let faults = Arc::new(FaultTable::new(events.clone()));
    let main: Arc<dyn BlockIo> = Arc::new(NullTarget);
    let table = match remap::create(&spare, BLOCK, CAPACITY, Some(64)) {
        Ok(t) => t,
        Err(e) => panic!("cannot create the spare file: {e}"),
    };
    let remap = Arc::new(RemapTarget::new(main, Arc::new(table), BLOCK, true));
    let cache = Arc::new(CacheTarget::new(
        remap.clone(),
        CacheModel::Volatile,
        BLOCK,
        1 << 20,
    ));
    let dev = Arc::new(Device::new(
        DeviceConfig {
            image: "fuzz".into(),
            capacity: CAPACITY,
            block_size: BLOCK,
            readonly: false,
            serial: [0; remapblk::virtio::ID_BYTES],
            num_queues: 2,
            queue_size: 64,
            drain_timeout: Duration::from_secs(1),
            engine: EngineKind::Null,
            poll: Polling::default(),
        },
        cache.clone(),
    ));
    Commands {
        dev,
        live: Arc::new(Live::new(events)),
        faults,
        remap,
        // overlay-reset and overlay-commit meet their refusal here: without --overlay.
        overlay: None,
        cache,
        write_log: None,
    }
}

/// A JSON value of any shape, at most `depth` deep.
fn value(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Value> {
    Ok(match u8::arbitrary(u)? % if depth == 0 { 5 } else { 7 } {
        0 => Value::Null,
        1 => Value::Bool(bool::arbitrary(u)?),
        2 => match u8::arbitrary(u)? % 5 {
            0 => Value::from(u64::from(u8::arbitrary(u)?)),
            1 => Value::from(u64::arbitrary(u)?),
            2 => Value::from(i64::arbitrary(u)?),
            3 => Number::from_f64(f64::arbitrary(u)?).map_or(Value::Null, Value::Number),
            _ => Value::from(f64::from(u8::arbitrary(u)?) / 100.0),
        },
        3 => {
            // The mode names from the product's own list, so a new mode is fuzzed unasked.
            let i = usize::from(u8::arbitrary(u)?) % (WORDS.len() + MODE_NAMES.len());
            Value::from(match WORDS.get(i) {
                Some(w) => *w,
                None => MODE_NAMES[i - WORDS.len()],
            })
        }
        4 => Value::from(String::arbitrary(u)?),
        5 => Value::Array(
            (0..u8::arbitrary(u)? % 4)
                .map(|_| value(u, depth - 1))
                .collect::<arbitrary::Result<_>>()?,
        ),
        _ => Value::Object(object(u, depth - 1)?),
    })
}

fn key(u: &mut Unstructured) -> arbitrary::Result<String> {
    Ok(match u8::arbitrary(u)? {
        0..=229 => KEYS[usize::from(u8::arbitrary(u)?) % KEYS.len()].to_string(),
        _ => String::arbitrary(u)?,
    })
}

fn object(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Map<String, Value>> {
    (0..u8::arbitrary(u)? % 6)
        .map(|_| Ok((key(u)?, value(u, depth)?)))
        .collect()
}

/// One line for the dispatcher.
fn line(u: &mut Unstructured) -> arbitrary::Result<String> {
    Ok(match u8::arbitrary(u)? {
        // A command, named right (mostly) with arguments of the names commands take.
        0..=199 => {
            let names = CommandName::names();
            let name = match u8::arbitrary(u)? {
                0..=239 => names[usize::from(u8::arbitrary(u)?) % names.len()].clone(),
                _ => String::arbitrary(u)?,
            };
            let mut req = Map::new();
            req.insert("execute".into(), Value::from(name));
            match u8::arbitrary(u)? {
                0..=199 => {
                    req.insert("arguments".into(), Value::Object(object(u, 2)?));
                }
                200..=229 => {}
                _ => {
                    req.insert("arguments".into(), value(u, 2)?);
                }
            }
            if u8::arbitrary(u)? >= 240 {
                req.insert(key(u)?, value(u, 1)?);
            }
            Value::Object(req).to_string()
        }
        200..=229 => value(u, 3)?.to_string(),
        _ => String::arbitrary(u)?,
    })
}

/// A reply must be one line of QMP-shaped JSON.
fn check_reply(r: &str) -> Value {
    assert!(!r.contains('\n'), "a reply of more than one line: {r:?}");
    let v: Value = match serde_json::from_str(r) {
        Ok(v) => v,
        Err(e) => panic!("a reply that is not JSON ({e}): {r:?}"),
    };
    let obj = v.as_object().expect("a reply is an object");
    assert_eq!(obj.len(), 1, "a reply has one member: {r}");
    if let Some(e) = obj.get("error") {
        let class = e["class"].as_str().unwrap_or_default();
        let desc = e["desc"].as_str().unwrap_or_default();
        assert!(
            !class.is_empty() && !desc.is_empty(),
            "an error without class or desc: {r}"
        );
    } else {
        assert!(obj.contains_key("return"), "neither return nor error: {r}");
    }
    v
}

fn dispatch(c: &Commands, line: &str) -> Value {
    let result = parse_request(line).and_then(|req| c.dispatch(&req));
    check_reply(&reply(&result))
}

fn in_process(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let dir = scratch::dir().join("control");
    let _ = std::fs::create_dir_all(&dir);
    let c = commands(&dir);
    let mut lines = 0;
    while !u.is_empty() && lines < 32 {
        let Ok(l) = line(&mut u) else { break };
        lines += 1;
        let v = dispatch(&c, &l);
        let added = v["return"]["id"].as_u64();
        if let (Some(id), Ok(req)) = (added, parse_request(&l)) {
            if req.execute == "fault-add" {
                let list = dispatch(&c, r#"{"execute":"fault-list"}"#);
                let ids: Vec<u64> = list["return"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|f| f["id"].as_u64()).collect())
                    .unwrap_or_default();
                assert!(
                    ids.contains(&id),
                    "fault {id} was added but is not listed: {list}"
                );
            }
        }
    }
    // The device is still answered as before.
    let status = dispatch(&c, r#"{"execute":"query-status"}"#);
    assert!(status["return"]["capacity_bytes"] == CAPACITY, "{status}");
    let _ = c.live.resume(&c.dev);
}

/// The process's control socket, serving a device of its own.
fn socket() -> &'static PathBuf {
    static SOCKET: OnceLock<(PathBuf, ControlServer)> = OnceLock::new();
    &SOCKET
        .get_or_init(|| {
            let dir = scratch::dir().join("control-socket");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join("ctl.sock");
            let server =
                match ControlServer::start(&path, Default::default(), Arc::new(commands(&dir))) {
                    Ok(s) => s,
                    Err(e) => panic!("cannot start the control socket: {e}"),
                };
            (path, server)
        })
        .0
}

fn connect() -> UnixStream {
    let s = match UnixStream::connect(socket()) {
        Ok(s) => s,
        Err(e) => panic!("cannot connect to the control socket: {e}"),
    };
    let _ = s.set_read_timeout(Some(PATIENCE));
    let _ = s.set_write_timeout(Some(PATIENCE));
    s
}

/// What a raw input sends: bytes, and runs of one byte (megabyte lines).
#[derive(Arbitrary, Debug)]
enum Chunk {
    Bytes(Vec<u8>),
    Line(String),
    Run { byte: u8, kib: u16 },
}

fn chunks(data: &[u8]) -> Vec<u8> {
    let mut u = Unstructured::new(data);
    let mut out = Vec::new();
    while let Ok(c) = Chunk::arbitrary(&mut u) {
        match c {
            Chunk::Bytes(b) => out.extend_from_slice(&b),
            Chunk::Line(l) => {
                out.extend_from_slice(l.as_bytes());
                out.push(b'\n');
            }
            Chunk::Run { byte, kib } => {
                out.resize(out.len() + usize::from(kib % 2048) * 1024, byte);
            }
        }
        // Past the control socket's line bound (1 MiB) and twice more is enough.
        if u.is_empty() || out.len() >= MAX_SENT {
            break;
        }
    }
    out
}

fn through_socket(out: &[u8]) {
    let lines = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    let s = connect();
    let reader = s.try_clone().expect("clone the socket");
    // Replies are read while the bytes go out: a server that answers as it reads would fill
    // the socket otherwise.
    let replies = std::thread::spawn(move || {
        let mut n = 0;
        for r in BufReader::new(reader).lines() {
            match r {
                Ok(r) => {
                    check_reply(&r);
                    n += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("the control socket did not end the connection within {} s after the client did", PATIENCE.as_secs())
                }
                Err(_) => break,
            }
        }
        n
    });
    let mut w = &s;
    // A server that closed the connection (it may, on bytes it refuses) makes this fail.
    let _ = w.write_all(out);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let n = match replies.join() {
        Ok(n) => n,
        Err(_) => panic!("reading the replies failed"),
    };
    assert!(n <= lines, "{n} replies to {lines} lines");

    // A fresh client is answered.
    let mut s = connect();
    let _ = s.write_all(b"{\"execute\":\"query-status\"}\n");
    let mut r = String::new();
    let _ = BufReader::new(&s).read_line(&mut r);
    let v = check_reply(r.trim_end());
    assert!(v["return"]["capacity_bytes"] == CAPACITY, "{v}");
}

pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((&RAW, raw)) => through_socket(raw),
        Some((&CHUNKS, c)) => through_socket(&chunks(c)),
        _ => in_process(data),
    }
}

/// The README's commands, each a line for the dispatcher, and the same as raw socket bytes.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let lines = [
        r#"{"execute":"query-status"}"#,
        r#"{"execute":"query-stats"}"#,
        r#"{"execute":"fault-add","arguments":{"lba":3,"count":2,"op":"write","mode":"flaky","probability":0.5,"seed":7,"times":3}}"#,
        r#"{"execute":"fault-add","arguments":{"lba":9,"mode":"delay","delay_ms":200}}"#,
        r#"{"execute":"fault-add","arguments":{"op":"flush","every":2,"times":5}}"#,
        r#"{"execute":"fault-add","arguments":{"lba":5,"op":"discard","after":3,"window":"300:700"}}"#,
        r#"{"execute":"fault-list"}"#,
        r#"{"execute":"fault-remove","arguments":{"id":1}}"#,
        r#"{"execute":"remap-add","arguments":{"lba":1,"count":3,"stride":4}}"#,
        r#"{"execute":"remap-list"}"#,
        r#"{"execute":"remap-remove","arguments":{"lba":1,"count":3,"stride":4}}"#,
        r#"{"execute":"quiesce"}"#,
        r#"{"execute":"resume"}"#,
    ];
    let mut raw = vec![RAW];
    for l in lines {
        raw.extend_from_slice(l.as_bytes());
        raw.push(b'\n');
    }
    vec![
        ("zeros".to_string(), vec![0u8; 64]),
        ("raw-commands".to_string(), raw),
    ]
}
