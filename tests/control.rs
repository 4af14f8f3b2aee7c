//! The control socket and `remapblk ctl`: status, statistics, quiesce and resume.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

#[test]
fn status_and_stats_follow_what_the_client_did() {
    let s = Server::start(8 * MIB, &["--num-queues", "2"]);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["state"], "waiting");
    assert_eq!(st["connected"], false);
    assert_eq!(st["capacity_bytes"], 8 * MIB);
    assert_eq!(st["block_size"], 512);
    assert_eq!(st["num_queues"], 2);
    assert_eq!(st["readonly"], false);
    assert_eq!(st["image"], s.image.display().to_string());

    let mut c = s.client(2);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["state"], "running");
    assert_eq!(st["connected"], true);
    assert_eq!(st["inflight"], 0);

    let writes: Vec<Op> = (0..10)
        .map(|i| Op::Write {
            offset: i * 4096,
            len: 4096,
        })
        .collect();
    assert!(c.batch(0, &writes).iter().all(|&r| r == 0));
    let reads: Vec<Op> = (0..5)
        .map(|i| Op::Read {
            offset: i * 8192,
            len: 8192,
        })
        .collect();
    assert!(c.batch(1, &reads).iter().all(|&r| r == 0));
    assert_eq!(
        c.batch(
            1,
            &[
                Op::Flush,
                Op::Discard {
                    offset: 0,
                    len: 4096
                }
            ]
        ),
        vec![0, 0]
    );
    assert_eq!(
        c.batch(
            0,
            &[Op::Read {
                offset: 8 * MIB,
                len: 512
            }]
        ),
        vec![-libc::EIO]
    );

    let stats = s.ctl_ok("query-stats", &[]);
    let t = &stats["totals"];
    assert_eq!(t["writes"], 10);
    assert_eq!(t["reads"], 6);
    assert_eq!(t["flushes"], 1);
    assert_eq!(t["discards"], 1);
    assert_eq!(t["bytes_written"], 40960);
    assert_eq!(t["bytes_read"], 40960);
    assert_eq!(t["errors"], 1);
    assert_eq!(t["inflight"], 0);
    let q = stats["queues"].as_array().unwrap();
    assert_eq!(q.len(), 2);
    assert_eq!(q[0]["writes"], 10);
    assert_eq!(q[1]["reads"], 5);
    assert_eq!(q[1]["flushes"], 1);
    for queue in q {
        let l = &queue["latency_us"];
        let (p50, p99, max) = (
            l["p50"].as_u64().unwrap(),
            l["p99"].as_u64().unwrap(),
            l["max"].as_u64().unwrap(),
        );
        assert!(p50 >= 1 && p50 <= p99 && p99 <= max, "latency {l}");
    }
}

#[test]
fn bad_requests_get_named_errors_and_the_connection_stays_usable() {
    let s = Server::start(4 * MIB, &[]);
    let (code, _, err) = s.ctl("no-such-command", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("no-such-command"), "{err}");
    let (code, _, err) = s.ctl("query-status", &["verbose=1"]);
    assert_eq!(code, 1);
    assert!(err.contains("verbose"), "{err}");
    let (code, _, err) = s.ctl("query-status", &["oops"]);
    assert_eq!(code, 2, "{err}");

    let stream = UnixStream::connect(s.control()).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    w.write_all(b"this is not json\n").unwrap();
    r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["error"]["class"], "GenericError");
    line.clear();
    w.write_all(b"{\"execute\": \"query-status\"}\n").unwrap();
    r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["return"]["state"], "waiting");
}

/// One request line on a raw control connection and its reply, parsed.
fn exchange(w: &mut UnixStream, r: &mut BufReader<UnixStream>, line: &[u8]) -> serde_json::Value {
    w.write_all(line).unwrap();
    w.write_all(b"\n").unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

/// The longest line the control socket takes (1 MiB).
const MAX_LINE: usize = 1 << 20;

#[test]
fn bad_utf8_and_over_long_lines_get_errors_and_the_connection_stays_usable() {
    let s = Server::start(4 * MIB, &[]);
    let stream = UnixStream::connect(s.control()).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let status = br#"{"execute": "query-status"}"#;

    let v = exchange(&mut w, &mut r, b"{\"execute\": \"query-\xff\xfestatus\"}");
    assert_eq!(v["error"]["class"], "GenericError", "{v}");
    let desc = v["error"]["desc"].as_str().unwrap();
    assert!(
        desc.contains("UTF-8") && desc.contains("offset 19"),
        "{desc}"
    );
    assert_eq!(
        exchange(&mut w, &mut r, status)["return"]["state"],
        "waiting"
    );

    // A line of exactly the bound is taken (JSON allows the trailing spaces)...
    let mut at_bound = status.to_vec();
    at_bound.resize(MAX_LINE, b' ');
    assert_eq!(
        exchange(&mut w, &mut r, &at_bound)["return"]["state"],
        "waiting"
    );
    // ... one byte more is refused, naming the bound, and so is a far longer one.
    for len in [MAX_LINE + 1, 5 * MAX_LINE] {
        let mut long = status.to_vec();
        long.resize(len, b' ');
        let v = exchange(&mut w, &mut r, &long);
        assert_eq!(v["error"]["class"], "GenericError", "{v}");
        let desc = v["error"]["desc"].as_str().unwrap();
        assert!(desc.contains("longer than 1048576 bytes"), "{desc}");
        assert_eq!(
            exchange(&mut w, &mut r, status)["return"]["state"],
            "waiting"
        );
    }
}

#[test]
fn ctl_says_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_remapblk"))
        .args(["ctl", "--control"])
        .arg(dir.path().join("none.ctl"))
        .arg("query-status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing listens"));
}

/// Quiesce under queue-depth-32 load: the reply comes with nothing in flight, nothing moves
/// while quiesced, and after resume every submitted request completes.
#[test]
fn quiesce_under_load_loses_no_request() {
    let s = Server::start(16 * MIB, &[]);
    let socket = s.socket.clone();
    let (started_tx, started_rx) = mpsc::channel();
    const BATCHES: usize = 40;
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1, false);
        let mut completed = 0usize;
        for b in 0..BATCHES {
            let ops: Vec<Op> = (0..32)
                .map(|i| Op::Write {
                    offset: ((b * 32 + i) % 256) as u64 * 65536,
                    len: 65536,
                })
                .collect();
            // Batches that straddle the quiesce wait for the resume: give them time.
            let res = c
                .try_batch(0, &ops, Duration::from_secs(60))
                .expect("a request was lost");
            assert!(res.iter().all(|&r| r == 0), "{res:?}");
            completed += res.len();
            if b == 2 {
                started_tx.send(()).unwrap();
            }
        }
        completed
    });
    started_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let q = s.ctl_ok("quiesce", &[]);
    assert_eq!(q["inflight"], 0, "{q}");
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["state"], "quiesced");
    assert_eq!(st["inflight"], 0);
    let before = s.ctl_ok("query-stats", &[])["totals"]["writes"]
        .as_u64()
        .unwrap();
    // Nothing is taken while quiesced, however long it lasts (here: a few hundred ms).
    std::thread::sleep(Duration::from_millis(300));
    let after = s.ctl_ok("query-stats", &[])["totals"]["writes"]
        .as_u64()
        .unwrap();
    assert_eq!(before, after, "requests were processed while quiesced");
    assert!(
        (before as usize) < BATCHES * 32,
        "the load finished before the quiesce"
    );
    assert_eq!(s.ctl_ok("resume", &[])["was_quiesced"], true);
    assert_ne!(s.ctl_ok("query-status", &[])["state"], "quiesced");
    assert_eq!(writer.join().unwrap(), BATCHES * 32);
    let t = &s.ctl_ok("query-stats", &[])["totals"];
    assert_eq!(t["writes"], BATCHES as u64 * 32);
}

#[test]
fn many_clients_at_once() {
    let s = Server::start(4 * MIB, &[]);
    let conns: Vec<(UnixStream, BufReader<UnixStream>)> = (0..8)
        .map(|_| {
            let c = UnixStream::connect(s.control()).unwrap();
            let r = BufReader::new(c.try_clone().unwrap());
            (c, r)
        })
        .collect();
    // Every client sends before any reads: each is served on its own.
    for (i, (w, _)) in conns.iter().enumerate() {
        let cmd = if i % 2 == 0 {
            "query-status"
        } else {
            "query-stats"
        };
        (&*w)
            .write_all(format!("{{\"execute\": \"{cmd}\"}}\n").as_bytes())
            .unwrap();
    }
    for (i, (_, r)) in conns.into_iter().enumerate().rev() {
        let mut r = r;
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if i % 2 == 0 {
            assert_eq!(v["return"]["state"], "waiting");
        } else {
            assert!(v["return"]["queues"].is_array());
        }
    }
}
