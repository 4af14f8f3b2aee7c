//! Load and bookkeeping shared by the storm tests: a seeded RNG (seed from `REMAPBLK_SEED`,
//! printed when a test fails), a persistent control-socket connection (much faster than one
//! `remapblk ctl` process per command), multi-queue write rounds in which every queue has its
//! requests in flight at once, and a per-block record of what was written and acknowledged.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};

use super::{pattern, Client, Op};

/// 4 KiB: the unit the storm tests write and track (8 blocks of 512 bytes).
pub const CHUNK: usize = 4096;
pub const BLOCK: u64 = 512;
const BLOCKS_PER_CHUNK: u64 = CHUNK as u64 / BLOCK;

/// The run's seed: `REMAPBLK_SEED`, or `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("REMAPBLK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Prints the seed (and how to re-run with it) when the test fails.
pub struct SeedGuard(pub u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "*** failed with REMAPBLK_SEED={} (re-run with that variable to repeat) ***",
                self.0
            );
        }
    }
}

/// xorshift64*, for seeded, repeatable runs.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Kills (SIGKILL) and reaps a helper process when dropped, so a failing test leaves none.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One connection to the control socket, reused for many commands.
pub struct Ctl {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Ctl {
    pub fn connect(path: &Path) -> Ctl {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        Ctl {
            input: BufReader::new(s.try_clone().unwrap()),
            out: s,
        }
    }

    /// Sends one command; the `return` value, or the error's `desc` (also when the server
    /// went away).
    pub fn call(
        &mut self,
        name: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let req = serde_json::json!({ "execute": name, "arguments": args });
        self.out
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut line = String::new();
        match self.input.read_line(&mut line) {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("receive: {e}")),
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}"))?;
        match v.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(v["error"]["desc"].as_str().unwrap_or("?").to_string()),
        }
    }

    pub fn ok(&mut self, name: &str, args: serde_json::Value) -> serde_json::Value {
        self.call(name, args)
            .unwrap_or_else(|e| panic!("{name} failed: {e}"))
    }

    /// The set of remapped blocks.
    pub fn remapped(&mut self) -> BTreeSet<u64> {
        self.ok("remap-list", serde_json::json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["lba"].as_u64().unwrap())
            .collect()
    }

    /// Polls query-status until no frontend is connected and nothing is in flight.
    pub fn wait_idle(&mut self, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let st = self.ok("query-status", serde_json::json!({}));
            if st["connected"] == false && st["inflight"] == 0 {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < timeout,
                "still connected or in flight after {timeout:?}: {st}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Remaps `n` blocks of `[first, end)` in scattered runs of 1 to 8 blocks; returns them.
pub fn scatter_remaps(
    ctl: &mut Ctl,
    rng: &mut Rng,
    first: u64,
    end: u64,
    n: usize,
) -> BTreeSet<u64> {
    let mut done = BTreeSet::new();
    while done.len() < n {
        let count = rng.range(1, 9).min((n - done.len()) as u64);
        let lba = rng.range(first, end - count);
        if (lba..lba + count).any(|b| done.contains(&b)) {
            continue;
        }
        ctl.ok(
            "remap-add",
            serde_json::json!({ "lba": lba, "count": count }),
        );
        done.extend(lba..lba + count);
    }
    done
}

/// The buffer of request `i` (4 KiB each) in the client's shared region.
pub fn buf(c: &Client, i: usize) -> *mut u8 {
    assert!((i + 1) * CHUNK <= super::SLOT * super::SLOTS);
    (c.region.addr + i * CHUNK) as *mut u8
}

pub fn buf_mut(c: &mut Client, i: usize) -> &mut [u8] {
    // SAFETY: each slot is CHUNK bytes of the client's registered buffer, alive as long as the client.
    unsafe { std::slice::from_raw_parts_mut(buf(c, i), CHUNK) }
}

/// Submits `ops[q]` on queue `q` for every queue (4 KiB buffers; request `i` of queue `q`
/// uses buffer `q * depth + i`), so all queues have their requests in flight together, then
/// collects the completions queue by queue. `on_done(q, i, ret)` is called for each; `polled`
/// after every batch of completions (where a caller flushes what it reports). False when the
/// client gave up (an error from libblkio or nothing within `timeout`).
pub fn round(
    c: &mut Client,
    ops: &[Vec<Op>],
    depth: usize,
    timeout: Duration,
    mut on_done: impl FnMut(usize, usize, i32),
    mut polled: impl FnMut(),
) -> bool {
    let base: Vec<Vec<*mut u8>> = (0..ops.len())
        .map(|q| (0..ops[q].len()).map(|i| buf(c, q * depth + i)).collect())
        .collect();
    for (q, qops) in ops.iter().enumerate() {
        assert!(qops.len() <= depth);
        let queue = &mut c.queues[q];
        for (i, op) in qops.iter().enumerate() {
            let b = base[q][i];
            match *op {
                Op::Write { offset, len } => queue.write(offset, b, len, i, ReqFlags::empty()),
                Op::Read { offset, len } => {
                    super::poison(b, len);
                    queue.read(offset, b, len, i, ReqFlags::empty())
                }
                _ => unimplemented!("round: reads and writes only"),
            }
        }
        let mut none: [MaybeUninit<Completion>; 0] = [];
        if queue.do_io(&mut none, 0, None, None).is_err() {
            return false;
        }
    }
    let deadline = Instant::now() + timeout;
    for (q, qops) in ops.iter().enumerate() {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..qops.len()).map(|_| MaybeUninit::uninit()).collect();
        let mut done = 0;
        while done < qops.len() {
            let mut left = deadline.saturating_duration_since(Instant::now());
            let n = match c.queues[q].do_io(&mut comps, 1, Some(&mut left), None) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            for comp in &comps[..n] {
                // SAFETY: the client filled the first `n` completions.
                let comp = unsafe { comp.assume_init_ref() };
                on_done(q, comp.user_data, comp.ret);
            }
            done += n;
            polled();
        }
    }
    true
}

/// Per block: the generation of its last acknowledged write (0: never written, zeroes) and of
/// a write that was submitted and not acknowledged (it may or may not have landed, in whole or
/// in part: blocks are tracked one by one).
#[derive(Default, Clone, Copy, Debug)]
pub struct BlockState {
    pub acked: u64,
    pub pending: Option<u64>,
}

/// What every block written by a storm must hold. Writes are whole chunks of `pattern(gen,
/// chunk offset, CHUNK)`.
#[derive(Default)]
pub struct Tracker {
    pub blocks: HashMap<u64, BlockState>,
    pub acked_writes: u64,
}

/// What block `b` holds after a write of generation `gen` to its chunk.
pub fn expected_block(gen: u64, b: u64) -> Vec<u8> {
    if gen == 0 {
        return vec![0; BLOCK as usize];
    }
    let k = b / BLOCKS_PER_CHUNK;
    let chunk = pattern(gen, k * CHUNK as u64, CHUNK);
    let at = ((b % BLOCKS_PER_CHUNK) * BLOCK) as usize;
    chunk[at..at + BLOCK as usize].to_vec()
}

impl Tracker {
    /// A write of `gen` to chunk `k` was submitted.
    pub fn submitted(&mut self, k: u64, gen: u64) {
        for b in k * BLOCKS_PER_CHUNK..(k + 1) * BLOCKS_PER_CHUNK {
            let st = self.blocks.entry(b).or_default();
            assert!(st.pending.is_none(), "two writes of block {b} in flight");
            st.pending = Some(gen);
        }
    }

    /// The write of `gen` to chunk `k` was acknowledged.
    pub fn acked(&mut self, k: u64, gen: u64) {
        self.acked_writes += 1;
        for b in k * BLOCKS_PER_CHUNK..(k + 1) * BLOCKS_PER_CHUNK {
            let st = self.blocks.entry(b).or_default();
            assert_eq!(st.pending, Some(gen), "block {b}: ack without submission");
            st.acked = gen;
            st.pending = None;
        }
    }

    /// Takes one line of a storm client's report: `S chunk gen` (submitted), `A chunk gen`
    /// (acknowledged), `E chunk gen ret` (failed: returns the line as an error).
    pub fn apply(&mut self, line: &str) -> Result<(), String> {
        let mut it = line.split_whitespace();
        let (Some(kind), Some(k), Some(gen)) = (it.next(), it.next(), it.next()) else {
            return Ok(());
        };
        let (Ok(k), Ok(gen)) = (k.parse::<u64>(), gen.parse::<u64>()) else {
            return Ok(());
        };
        match kind {
            "S" => self.submitted(k, gen),
            "A" => self.acked(k, gen),
            "E" => return Err(format!("a write failed: {line}")),
            _ => {}
        }
        Ok(())
    }

    /// Chunks with a block that has a write in flight or acknowledged.
    pub fn chunks(&self) -> BTreeSet<u64> {
        self.blocks.keys().map(|b| b / BLOCKS_PER_CHUNK).collect()
    }

    /// Checks one block's content; a pending write that turns out to have landed becomes the
    /// block's value (it can no longer change: its request has been drained).
    pub fn check_block(&mut self, b: u64, have: &[u8]) -> Result<(), String> {
        let Some(st) = self.blocks.get_mut(&b) else {
            return Ok(());
        };
        if let Some(p) = st.pending.take() {
            if have == expected_block(p, b) {
                st.acked = p;
                return Ok(());
            }
        }
        if have != expected_block(st.acked, b) {
            return Err(format!(
                "block {b} does not hold its last acknowledged write (generation {})",
                st.acked
            ));
        }
        Ok(())
    }

    /// Reads `chunks` back through `c` (all queues, `depth` each) and checks every tracked
    /// block.
    pub fn verify(
        &mut self,
        c: &mut Client,
        chunks: &BTreeSet<u64>,
        depth: usize,
    ) -> Result<(), String> {
        let chunks: Vec<u64> = chunks.iter().copied().collect();
        let nq = c.queues.len();
        for group in chunks.chunks(depth * nq) {
            let ops: Vec<Vec<Op>> = group
                .chunks(depth)
                .map(|part| {
                    part.iter()
                        .map(|k| Op::Read {
                            offset: k * CHUNK as u64,
                            len: CHUNK,
                        })
                        .collect()
                })
                .collect();
            let mut failed = Vec::new();
            if !round(
                c,
                &ops,
                depth,
                Duration::from_secs(30),
                |q, i, ret| {
                    if ret != 0 {
                        failed.push((group[q * depth + i], ret));
                    }
                },
                || {},
            ) {
                return Err("the verifying client gave up".into());
            }
            if !failed.is_empty() {
                return Err(format!("reads failed: {failed:?}"));
            }
            for (j, &k) in group.iter().enumerate() {
                let (q, i) = (j / depth, j % depth);
                let data = buf_mut(c, q * depth + i).to_vec();
                for b in k * BLOCKS_PER_CHUNK..(k + 1) * BLOCKS_PER_CHUNK {
                    let at = ((b % BLOCKS_PER_CHUNK) * BLOCK) as usize;
                    self.check_block(b, &data[at..at + BLOCK as usize])?;
                }
            }
        }
        Ok(())
    }
}
