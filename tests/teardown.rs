//! Teardown with a request that does not finish: a 30 s delay fault holds a read in flight
//! when the client goes away or the server is told to exit. The drain gives up after
//! --drain-timeout-ms, completes the request with IOERR, logs it, and the server goes on
//! (serves the next client, or exits 0 in time).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const HELPER_ENV: &str = "REMAPBLK_TEST_STUCK_SOCKET";

/// The body of a client process: submits one read of block 0, says so, and waits for it.
#[test]
#[ignore]
fn helper_stuck_reader() {
    let Ok(sock) = std::env::var(HELPER_ENV) else {
        return;
    };
    let mut c = Client::connect(std::path::Path::new(&sock), 1, false);
    let base = c.region.addr as *mut u8;
    c.queues[0].read(0, base, 4096, 0, blkio::ReqFlags::empty());
    let mut comps = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
    // Submits without waiting for completions.
    let _ = c.queues[0].do_io(&mut comps, 0, None, None);
    writeln!(std::io::stdout(), "submitted").unwrap();
    std::io::stdout().flush().unwrap();
    let _ = c.queues[0].do_io(&mut comps, 1, None, None);
}

fn stuck_client(s: &Server) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_stuck_reader",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, &s.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The test harness prints "test helper_stuck_reader ... " before the helper's own output.
    assert!(lines.any(|l| l.map(|l| l.ends_with("submitted")).unwrap_or(false)));
    wait_until("the read to be in flight", Duration::from_secs(10), || {
        s.ctl_ok("query-status", &[])["inflight"] == 1
    });
    child
}

fn server_with_stuck_block(events: &std::path::Path) -> Server {
    let s = Server::start(
        4 * MIB,
        &[
            "--drain-timeout-ms",
            "500",
            "--event-log",
            events.to_str().unwrap(),
        ],
    );
    s.ctl_ok("fault-add", &["lba=0", "mode=delay", "delay_ms=30000"]);
    s
}

#[test]
fn stuck_request_at_disconnect_is_abandoned_and_the_next_client_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let s = server_with_stuck_block(&events);
    let mut client = stuck_client(&s);
    let t0 = Instant::now();
    // SAFETY: kill(2) with a pid of our own child.
    unsafe { libc::kill(client.id() as i32, libc::SIGKILL) };
    client.wait().unwrap();
    wait_until("the drain to give up", Duration::from_secs(10), || {
        s.ctl_ok("query-status", &[])["connected"] == false
    });
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "drain gave up after {took:?}, before its timeout"
    );
    assert!(took < Duration::from_secs(5), "drain took {took:?}");
    assert!(
        s.log().contains("still in flight"),
        "the stuck request is named in the log"
    );
    assert_eq!(s.ctl_ok("query-stats", &[])["totals"]["abandoned"], 1);
    let drain = drain_event(&events, "disconnect");
    assert_eq!(drain["abandoned"], 1);
    assert_eq!(drain["waited_for"], 1);
    assert!(drain["duration_us"].as_u64().unwrap() >= 450_000, "{drain}");

    // The next client is served at once (away from the delayed block).
    let mut c = s.client(1);
    let data = pattern(3, MIB, 4096);
    assert_eq!(c.write(0, MIB, &data), 0);
    assert_eq!(c.read(0, MIB, 4096).unwrap(), data);
}

#[test]
fn sigterm_with_a_stuck_request_exits_0_within_the_drain_timeout_plus_1s() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut s = server_with_stuck_block(&events);
    let mut client = stuck_client(&s);
    let t0 = Instant::now();
    s.signal(libc::SIGTERM);
    let status = s.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_millis(1500), "exit took {took:?}");
    assert!(!s.socket.exists());
    // The event log has the exit drain: how long it waited, for how many, how many it gave up.
    let drain = drain_event(&events, "exit");
    assert_eq!(drain["waited_for"], 1, "{drain}");
    assert_eq!(drain["abandoned"], 1, "{drain}");
    let us = drain["duration_us"].as_u64().unwrap();
    assert!((450_000..1_500_000).contains(&us), "{drain}");
    assert!(drain["monotonic_ns"].as_u64().is_some(), "{drain}");
}

/// The first `drain` event with this reason in an event log.
fn drain_event(events: &std::path::Path, reason: &str) -> serde_json::Value {
    std::fs::read_to_string(events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["event"] == "drain" && v["reason"] == reason)
        .unwrap_or_else(|| panic!("no drain event for {reason}"))
}
