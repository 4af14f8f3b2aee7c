//! A server that runs out of file descriptors (`serve` under RLIMIT_NOFILE 64, as
//! `prlimit --nofile=64` starts it) neither ends nor hangs: a connection it cannot serve is
//! closed with the reason in its log, and the next frontend is served once descriptors are free.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use common::raw::*;
use common::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostUserMemoryRegionInfo;

const LIMIT: u64 = 64;
const QSIZE: u16 = 64;
/// How long a frontend's session may take: a server that hangs fails the test instead of
/// hanging it.
const SESSION_WAIT: Duration = Duration::from_secs(10);

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs `f` (a frontend's work on `stream`) on a thread of its own, for at most
/// `SESSION_WAIT`: past that the connection is shut down, which ends any wait for a reply (the
/// vhost crate retries a receive that timed out, so a read timeout would not). Err says where
/// `f` stopped, or that the server did not answer in time.
fn bounded<T: Send + 'static>(
    stream: &UnixStream,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let guard = stream.try_clone().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let r = f();
        let _ = done_tx.send(());
        r
    });
    // Disconnected: `f` panicked, which the join below reports.
    let timed_out = matches!(
        done_rx.recv_timeout(SESSION_WAIT),
        Err(mpsc::RecvTimeoutError::Timeout)
    );
    if timed_out {
        let _ = guard.shutdown(Shutdown::Both);
    }
    let r = worker.join().map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    });
    if timed_out {
        return Err(format!("the server did not answer within {SESSION_WAIT:?}"));
    }
    r
}

/// A whole frontend session on `stream`: negotiation, memory, one ring, a 4 KiB write at
/// sector `8 * slot` and its read back, compared. Err says where it stopped.
fn session(stream: UnixStream, slot: u16) -> Result<(), String> {
    bounded(&stream.try_clone().unwrap(), move || {
        let mut g = RawGuest::on_stream(stream, 1, QSIZE);
        g.negotiate(false);
        g.set_mem_table();
        g.start_ring(0, 0);
        let data = pattern(u64::from(slot), 0, BUF);
        g.write_buf(0, slot, &data);
        g.add(0, slot, VIRTIO_BLK_T_OUT, u64::from(slot) * 8);
        g.publish_and_kick(0);
        g.wait("the write", SESSION_WAIT, |g| g.used_idx(0) == 1);
        assert_eq!(g.status(0, slot), 0, "write status");
        let reader = slot + 1;
        g.add(0, reader, VIRTIO_BLK_T_IN, u64::from(slot) * 8);
        g.publish_and_kick(0);
        g.wait("the read", SESSION_WAIT, |g| g.used_idx(0) == 2);
        assert_eq!(g.status(0, reader), 0, "read status");
        assert!(g.read_buf(0, reader) == data, "the data read back differs");
    })
}

/// Waits until the server holds at most `n` descriptors (a connection's are closed just after
/// its peer sees it end).
fn wait_fds_at_most(s: &Server, n: usize, what: &str) {
    let pid = s.pid();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while fd_count(pid) > n {
        if std::time::Instant::now() > end {
            let open: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| {
                    let target = std::fs::read_link(e.path()).unwrap_or_default();
                    format!(
                        "{} -> {}",
                        e.file_name().to_string_lossy(),
                        target.display()
                    )
                })
                .collect();
            panic!(
                "timed out waiting for {what}: {} open, at most {n} wanted: {open:#?}",
                open.len()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A control connection, checked to be served: Err(true) when the server closed it unserved,
/// Err(false) when it did not answer at all.
fn control_client(s: &Server) -> Result<(UnixStream, BufReader<UnixStream>), bool> {
    let c = UnixStream::connect(s.control()).map_err(|_| true)?;
    c.set_read_timeout(Some(SESSION_WAIT)).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    if (&c)
        .write_all(b"{\"execute\": \"query-status\"}\n")
        .is_err()
    {
        return Err(true);
    }
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(_) if line.contains("\"return\"") => Ok((c, r)),
        Ok(_) => Err(true),
        Err(e) => Err(e.kind() != std::io::ErrorKind::WouldBlock),
    }
}

#[test]
fn a_hundred_frontends_one_after_another_under_a_64_descriptor_limit() {
    let mut s = Server::start_with_fd_limit(4 * MIB, &[], LIMIT);
    session(UnixStream::connect(&s.socket).unwrap(), 0).unwrap();
    wait_until("the first session to end", SESSION_WAIT, || {
        s.ctl_ok("query-status", &[])["connected"] == false
    });
    let baseline = fd_count(s.pid());
    for n in 0..100u16 {
        let stream = UnixStream::connect(&s.socket).unwrap();
        if let Err(e) = session(stream, 2 * (n % 10)) {
            panic!("frontend {n}: {e}");
        }
    }
    wait_fds_at_most(&s, baseline, "the descriptors to come back");
    assert!(s.is_alive());
}

/// Control clients hold the server's descriptors until it has none; then they let go one at a
/// time, and at each step two frontends that connected at once try a session. Those that find
/// no descriptor are closed with the reason logged; the server lives, and serves a fresh
/// frontend once the descriptors are back.
#[test]
fn frontends_that_find_no_descriptor_are_closed_with_the_reason_and_the_next_is_served() {
    let mut s = Server::start_with_fd_limit(4 * MIB, &[], LIMIT);
    let pid = s.pid();
    session(UnixStream::connect(&s.socket).unwrap(), 0).unwrap();
    wait_until("the first session to end", SESSION_WAIT, || {
        s.ctl_ok("query-status", &[])["connected"] == false
    });
    let idle = fd_count(pid);

    let mut held = Vec::new();
    let closed = loop {
        match control_client(&s) {
            Ok(c) => held.push(c),
            Err(closed) => break closed,
        }
        assert!(held.len() < LIMIT as usize, "the server never ran out");
    };
    assert!(
        closed,
        "a control client was left waiting instead of closed"
    );
    wait_until("the reason in the log", SESSION_WAIT, || {
        s.log()
            .contains("control socket: a connection was closed unserved: Too many open files")
    });
    // Not a descriptor left: a frontend is closed unserved too, and says so at once.
    let seen = s.log().len();
    let e = session(UnixStream::connect(&s.socket).unwrap(), 0).unwrap_err();
    assert!(!e.contains("did not answer"), "{e}");
    wait_until("the reason in the log", SESSION_WAIT, || {
        s.log()[seen..].contains("vhost-user socket: a connection was closed unserved: Too many open files (os error 24) (this process is out of file descriptors, limit 64")
    });

    let (mut served, mut refused) = (0, 0);
    while !held.is_empty() {
        drop(held.pop());
        let level = idle + held.len();
        wait_fds_at_most(&s, level, "a control client's descriptor to be closed");
        // The server takes the first connection at once, the second once the first is over.
        let seen = s.log().len();
        let pair = [
            UnixStream::connect(&s.socket).unwrap(),
            UnixStream::connect(&s.socket).unwrap(),
        ];
        let mut refused_now = 0;
        for (i, stream) in pair.into_iter().enumerate() {
            match session(stream, 2 * i as u16) {
                Ok(()) => served += 1,
                Err(e) => {
                    refused_now += 1;
                    assert!(s.is_alive(), "the server ended after: {e}");
                }
            }
        }
        wait_fds_at_most(&s, level, "the frontends' descriptors to be closed");
        // Each refusal has its line, saying that descriptors ran out.
        wait_until("the reasons in the log", SESSION_WAIT, || {
            s.log()[seen..]
                .lines()
                .filter(|l| l.contains("out of file descriptors, limit 64"))
                .count()
                >= refused_now
        });
        refused += refused_now;
    }
    assert!(
        refused > 0 && served > 0,
        "{refused} refused, {served} served"
    );
    session(UnixStream::connect(&s.socket).unwrap(), 4).unwrap();
    assert!(s.is_alive());
}

/// A frontend that adds memory regions, each with a descriptor the server keeps, until the
/// server has too few left to receive another message's: that frontend's connection is closed
/// with the reason logged (before a message could lose its descriptors and the connection its
/// framing), its descriptors returned, and the next frontend served.
#[test]
fn a_frontend_that_sends_descriptors_until_none_are_left_loses_only_its_connection() {
    let mut s = Server::start_with_fd_limit(4 * MIB, &[], LIMIT);
    let idle = fd_count(s.pid());
    let stream = UnixStream::connect(&s.socket).unwrap();
    let added = bounded(&stream.try_clone().unwrap(), move || {
        let mut g = RawGuest::on_stream(stream, 1, QSIZE);
        g.negotiate_with(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        let page = memfd(4096);
        for added in 0..2 * LIMIT {
            let r = g.frontend.add_mem_region(&VhostUserMemoryRegionInfo {
                guest_phys_addr: added * 4096,
                memory_size: 4096,
                userspace_addr: 0x7000_0000_0000 + added * 4096,
                mmap_offset: 0,
                mmap_handle: page.as_raw_fd(),
            });
            if r.is_err() {
                return Ok(added);
            }
        }
        Err(2 * LIMIT)
    })
    .unwrap();
    assert!(
        added.is_ok(),
        "{added:?}: every region, each with a descriptor, was taken"
    );
    wait_until("the reason in the log", SESSION_WAIT, || {
        s.log()
            .contains("frontend connection closed: cannot keep 32 file descriptors free")
    });
    wait_fds_at_most(&s, idle, "the frontend's descriptors to be closed");
    session(UnixStream::connect(&s.socket).unwrap(), 0).unwrap();
    assert!(s.is_alive());
}
