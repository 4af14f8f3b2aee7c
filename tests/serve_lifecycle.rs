//! Connections coming and going, clients killed mid-I/O, signals, sockets left behind.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CHUNK: usize = 64 << 10;
const HELPER_ENV: &str = "REMAPBLK_TEST_WRITER_SOCKET";

/// Not a test of its own: the body of a client process that other tests start and kill. It
/// writes pattern(7) over the first 8 MiB at queue depth 32 forever, printing "pass" after
/// each round.
#[test]
#[ignore]
fn helper_writer_process() {
    let Ok(sock) = std::env::var(HELPER_ENV) else {
        return;
    };
    let mut c = Client::connect(std::path::Path::new(&sock), 1, false);
    let out = std::io::stdout();
    loop {
        fill(&mut c, 7, 0, 8 * MIB, CHUNK, 32);
        writeln!(out.lock(), "pass").unwrap();
    }
}

/// Starts the writer process and returns once it has completed one full round, so it is
/// certainly connected and in the middle of queue-depth-32 writes.
fn start_writer(socket: &std::path::Path) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_writer_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l == "pass" => break,
            Some(_) => {}
            None => panic!("writer process ended before its first round"),
        }
    }
    // Keep the pipe drained so the writer never blocks on stdout.
    std::thread::spawn(move || for _ in lines {});
    child
}

#[test]
fn twenty_connections_one_client_killed_mid_write_then_full_verify() {
    let mut s = Server::start(16 * MIB, &["--num-queues", "2"]);
    {
        let mut c = s.client(2);
        fill(&mut c, 7, 0, 8 * MIB, CHUNK, 32);
        fill(&mut c, 8, 8 * MIB, 16 * MIB, CHUNK, 32);
    }
    for cycle in 0..20 {
        if cycle == 10 {
            let mut w = start_writer(&s.socket);
            // SAFETY: kill(2) with a pid of our own child.
            unsafe { libc::kill(w.id() as i32, libc::SIGKILL) };
            w.wait().unwrap();
        } else {
            let mut c = s.client(if cycle % 2 == 0 { 1 } else { 2 });
            let off = (cycle as u64 % 8) * MIB;
            fill(&mut c, 7, off, off + MIB, CHUNK, 32);
            verify(&mut c, 7, off, off + MIB, CHUNK, 8);
        }
        assert!(s.is_alive(), "server died in cycle {cycle}: {}", s.log());
    }
    let mut c = s.client(2);
    verify(&mut c, 7, 0, 8 * MIB, CHUNK, 32);
    verify(&mut c, 8, 8 * MIB, 16 * MIB, CHUNK, 32);
    drop(c);
    wait_until("the last disconnect", Duration::from_secs(10), || {
        s.log().matches("frontend disconnected").count() >= 21
    });
}

#[test]
fn sigterm_under_load_exits_0_within_2s_with_data_intact() {
    let mut s = Server::start(16 * MIB, &[]);
    {
        let mut c = s.client(1);
        fill(&mut c, 7, 0, 8 * MIB, CHUNK, 32);
    }
    // A client thread writes generation after generation; it records which generation of each
    // chunk was acknowledged, and which one was in flight when the server went away.
    let socket = s.socket.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1, false);
        let chunks = (8 * MIB / CHUNK as u64) as usize;
        let mut acked = vec![7u64; chunks];
        let mut pending: Vec<Option<u64>> = vec![None; chunks];
        let mut ready = Some(ready_tx);
        'outer: for gen in 100u64.. {
            for group in (0..chunks).collect::<Vec<_>>().chunks(32) {
                let ops: Vec<Op> = group
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| {
                        let off = (k * CHUNK) as u64;
                        c.slot_mut(i, CHUNK)
                            .copy_from_slice(&pattern(gen, off, CHUNK));
                        pending[k] = Some(gen);
                        Op::Write {
                            offset: off,
                            len: CHUNK,
                        }
                    })
                    .collect();
                match c.try_batch(0, &ops, Duration::from_secs(3)) {
                    Some(res) if res.iter().all(|&r| r == 0) => {
                        for &k in group {
                            acked[k] = gen;
                            pending[k] = None;
                        }
                    }
                    _ => break 'outer,
                }
                if let Some(tx) = ready.take() {
                    tx.send(()).unwrap();
                }
            }
        }
        (acked, pending)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("writer started");
    let t0 = Instant::now();
    s.signal(libc::SIGTERM);
    let status = s.wait_exit(Duration::from_secs(5));
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", s.log());
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    assert!(!s.socket.exists(), "socket file left behind");
    let (acked, pending) = writer.join().unwrap();
    for (k, gen) in acked.iter().enumerate() {
        let off = (k * CHUNK) as u64;
        let got = read_file_at(&s.image, off, CHUNK);
        let ok = got == pattern(*gen, off, CHUNK)
            || pending[k].is_some_and(|p| got == pattern(p, off, CHUNK));
        assert!(
            ok,
            "chunk at {off}: acknowledged generation {gen} is not in the image"
        );
    }
}

#[test]
fn garbage_from_a_peer_closes_only_that_connection() {
    let mut s = Server::start(4 * MIB, &[]);
    let mut g = UnixStream::connect(&s.socket).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let junk: Vec<u8> = pattern(1, 0, 4096);
    let _ = g.write_all(&junk);
    let mut buf = [0u8; 64];
    // The server hangs up on it (EOF or reset), rather than hanging or dying.
    match g.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("server answered garbage with {n} bytes"),
    }
    drop(g);
    assert!(s.is_alive());
    let mut c = s.client(1);
    assert_eq!(c.write(0, 0, &pattern(2, 0, 4096)), 0);
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(2, 0, 4096));
}

#[test]
fn stale_socket_is_replaced_live_one_is_refused() {
    let mut s = Server::start(4 * MIB, &[]);
    // A second server on the same socket while the first lives: refused, exit 1.
    let (code, err) = serve_refused(&s.dir.path().join("second.img"), &s.socket, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("in use"), "{err}");
    assert!(s.is_alive());

    // SIGKILL leaves the socket file behind; a restart replaces it.
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(5));
    assert!(s.socket.exists());
    s.spawn();
    assert!(s.log().contains("replacing stale socket"));
    let mut c = s.client(1);
    assert!(c.read(0, 0, 4096).is_ok());
}

#[test]
fn sigint_while_idle_exits_0_and_removes_the_socket() {
    let mut s = Server::start(4 * MIB, &[]);
    s.signal(libc::SIGINT);
    assert_eq!(s.wait_exit(Duration::from_secs(5)).code(), Some(0));
    assert!(!s.socket.exists());
}
