//! Crash consistency of the remap layer: the server is killed with SIGKILL at random moments
//! (seeded) during a storm of writes that trigger remaps (a write fault moves every cycle)
//! and of manual remaps. After every restart: each acknowledged write reads back, each remap
//! whose write or remap-add was acknowledged is in the table, no spare block is used twice
//! (the server refuses such a table) and none is leaked (free + used = total).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const CHUNK: usize = 4096;
const CHUNKS: u64 = 512; // the first 2 MiB
const CYCLES: u64 = 100;
const HELPER_ENV: &str = "REMAPBLK_TEST_STORM_SOCKET";

/// xorshift64*, for a seeded, repeatable storm.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The body of the writer process: distinct random chunks at queue depth 16, printing
/// "S chunk gen" before submitting and "A chunk gen" once acknowledged.
#[test]
#[ignore]
fn helper_storm_writer() {
    let Ok(sock) = std::env::var(HELPER_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("STORM_SEED").unwrap().parse().unwrap();
    let mut rng = Rng(seed | 1);
    let mut c = Client::connect(std::path::Path::new(&sock), 1, false);
    let out = std::io::stdout();
    let mut gen = seed * 1_000_000;
    loop {
        let mut chunks = BTreeSet::new();
        while chunks.len() < 16 {
            chunks.insert(rng.next() % CHUNKS);
        }
        let ops: Vec<Op> = chunks
            .iter()
            .enumerate()
            .map(|(slot, &k)| {
                gen += 1;
                let off = k * CHUNK as u64;
                c.slot_mut(slot, CHUNK)
                    .copy_from_slice(&pattern(gen, off, CHUNK));
                writeln!(out.lock(), "S {k} {gen}").unwrap();
                Op::Write {
                    offset: off,
                    len: CHUNK,
                }
            })
            .collect();
        out.lock().flush().unwrap();
        let first_gen = gen - 15;
        let res = c.batch(0, &ops);
        for (i, &k) in chunks.iter().enumerate() {
            if res[i] == 0 {
                writeln!(out.lock(), "A {k} {}", first_gen + i as u64).unwrap();
            }
        }
        out.lock().flush().unwrap();
    }
}

fn start_writer(socket: &std::path::Path, seed: u64) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_storm_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, socket)
        .env("STORM_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[derive(Default, Clone, Copy)]
struct ChunkState {
    acked: u64,
    pending: Option<u64>,
}

/// What block `b` holds after a write of generation `gen` to its chunk (0: never written).
fn expected_block(gen: u64, b: u64) -> Vec<u8> {
    if gen == 0 {
        return vec![0; 512];
    }
    let chunk = pattern(gen, (b / 8) * CHUNK as u64, CHUNK);
    chunk[((b % 8) * 512) as usize..((b % 8 + 1) * 512) as usize].to_vec()
}

#[test]
fn sigkill_during_remap_storms_loses_nothing_acknowledged() {
    let mut s = Server::start(8 * MIB, &["--spare-blocks", "8192"]);
    let faults_file = s.dir.path().join("faults.json");
    let mut rng = Rng(0x5eed_0007);
    // Per block: a write that was not acknowledged may have reached some of its blocks and
    // not others (the slow path writes block by block), which is allowed.
    let mut state: HashMap<u64, ChunkState> = HashMap::new();
    let mut must_be_remapped: BTreeSet<u64> = BTreeSet::new();

    for cycle in 1..=CYCLES {
        // A write fault over 32 blocks somewhere in the storm's area, new every cycle.
        let fault_lba = rng.next() % (CHUNKS * 8 - 32);
        s.ctl_ok("fault-clear", &[]);
        s.ctl_ok(
            "fault-add",
            &["op=write", &format!("lba={fault_lba}"), "count=32"],
        );
        let _ = &faults_file;

        let (mut writer, lines) = start_writer(&s.socket, cycle);
        // Wait until the storm is under way (the first acknowledgement), then a manual
        // remap, then kill the server at a seeded random moment.
        let mut log = Vec::new();
        loop {
            let l = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("writer started");
            let ack = l.starts_with('A');
            log.push(l);
            if ack {
                break;
            }
        }
        let manual = rng.next() % (CHUNKS * 8 - 8);
        let manual_ok = s.ctl("remap-add", &[&format!("lba={manual}"), "count=8"]).0 == 0;
        std::thread::sleep(Duration::from_millis(rng.next() % 40));
        s.signal(libc::SIGKILL);
        s.wait_exit(Duration::from_secs(5));
        let _ = writer.kill();
        let _ = writer.wait();
        while let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) {
            log.push(l);
        }

        for l in &log {
            let mut it = l.split_whitespace();
            let (kind, k, gen) = (it.next(), it.next(), it.next());
            let (Some(kind), Some(k), Some(gen)) = (kind, k, gen) else {
                continue;
            };
            let (Ok(k), Ok(gen)) = (k.parse::<u64>(), gen.parse::<u64>()) else {
                continue;
            };
            for b in k * 8..k * 8 + 8 {
                let st = state.entry(b).or_default();
                match kind {
                    "S" => st.pending = Some(gen),
                    "A" => {
                        st.acked = gen;
                        st.pending = None;
                    }
                    _ => {}
                }
            }
            if kind == "A" {
                // An acknowledged write over the faulty blocks succeeded only by remapping.
                must_be_remapped
                    .extend((k * 8..k * 8 + 8).filter(|b| (fault_lba..fault_lba + 32).contains(b)));
            }
        }
        if manual_ok {
            must_be_remapped.extend(manual..manual + 8);
        }

        s.spawn();
        let remapped: BTreeSet<u64> = s
            .ctl_ok("remap-list", &[])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["lba"].as_u64().unwrap())
            .collect();
        let missing: Vec<_> = must_be_remapped.difference(&remapped).collect();
        assert!(
            missing.is_empty(),
            "cycle {cycle}: acknowledged remaps missing: {missing:?}"
        );
        let st = s.ctl_ok("query-status", &[]);
        assert_eq!(
            st["spare_free"].as_u64().unwrap() + st["remaps"].as_u64().unwrap(),
            st["spare_total"].as_u64().unwrap(),
            "cycle {cycle}: a spare block leaked"
        );

        let mut c = s.client(1);
        let chunks: Vec<u64> = state
            .keys()
            .map(|b| b / 8)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for group in chunks.chunks(32) {
            let ops: Vec<Op> = group
                .iter()
                .map(|k| Op::Read {
                    offset: k * CHUNK as u64,
                    len: CHUNK,
                })
                .collect();
            let res = c.batch(0, &ops);
            for (i, k) in group.iter().enumerate() {
                assert_eq!(res[i], 0, "cycle {cycle}: read of chunk {k} failed");
                let got = c.slot_mut(i, CHUNK).to_vec();
                for b in k * 8..k * 8 + 8 {
                    let Some(st) = state.get_mut(&b) else {
                        continue;
                    };
                    let have = &got[((b % 8) * 512) as usize..((b % 8 + 1) * 512) as usize];
                    if let Some(p) = st.pending.take() {
                        if have == expected_block(p, b) {
                            // What was in flight landed: it is the block's value from now on.
                            st.acked = p;
                            continue;
                        }
                    }
                    assert!(
                        have == expected_block(st.acked, b),
                        "cycle {cycle}: block {b} does not hold its acknowledged write {}",
                        st.acked
                    );
                }
            }
        }
    }
    // The storm really remapped: write-error remaps from every cycle's fault, and manual ones.
    let list = s.ctl_ok("remap-list", &[]);
    let causes: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cause"].as_str().unwrap())
        .collect();
    assert!(
        causes.iter().filter(|c| **c == "write-error").count() >= 200,
        "{} remaps",
        causes.len()
    );
    assert!(causes.contains(&"manual"));
}
