//! The load itself: one libblkio connection, one thread per queue, each keeping `iodepth`
//! requests in flight until the measured window ends.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::args::{Args, Rw};
use crate::hist::Histogram;

/// A queue that sees no completion for this long is reported as hung.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the measured window saw, all queues together.
pub struct Outcome {
    pub capacity: u64,
    pub size: u64,
    pub queue_size: u32,
    pub ios: u64,
    /// Every request completed on the connection, the ramp and the final drain included:
    /// what the server's CPU time over the whole connection was spent on.
    pub ios_total: u64,
    pub bytes: u64,
    pub window: Duration,
    pub lat: Histogram,
    pub errors: u64,
    /// The first failure, for the message.
    pub first_error: Option<String>,
}

/// Connects, runs the load and disconnects. Err: the connection or set-up failed.
pub fn run(args: &Args) -> Result<Outcome, String> {
    let queue_size = args.queue_size()?;
    let socket = args.socket.display().to_string();
    let ctx = |what: &str| {
        let socket = socket.clone();
        let what = what.to_string();
        move |e: blkio::Error| format!("{what} ({socket}): {e}")
    };

    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(ctx("libblkio"))?;
    b.set_str("path", &socket).map_err(ctx("set path"))?;
    b.connect().map_err(ctx("connect"))?;
    let max_queues = b.get_i32("max-queues").map_err(ctx("max-queues"))?;
    if i64::from(args.queues) > i64::from(max_queues) {
        return Err(format!(
            "--queues {} but the backend offers {max_queues} queue(s)",
            args.queues
        ));
    }
    b.set_i32("num-queues", args.queues as i32)
        .map_err(ctx("num-queues"))?;
    b.set_i32("queue-size", queue_size as i32)
        .map_err(ctx("queue-size"))?;
    let queues = b.start().map_err(ctx("start"))?.queues;
    if queues.len() != args.queues as usize {
        return Err(format!(
            "asked for {} queues, libblkio started {}",
            args.queues,
            queues.len()
        ));
    }

    let capacity = b.get_u64("capacity").map_err(ctx("capacity"))?;
    let size = args.size.unwrap_or(capacity);
    if size > capacity {
        return Err(format!(
            "--size {size} is larger than the disk ({capacity} bytes)"
        ));
    }
    let size = size - size % args.bs;
    if size == 0 {
        return Err(format!(
            "the region to use ({} bytes of a {capacity}-byte disk) is smaller than --bs {}",
            args.size.unwrap_or(capacity),
            args.bs
        ));
    }
    for prop in ["max-transfer", "max-segment-len"] {
        let limit = b.get_i32(prop).map_err(ctx(prop))?;
        if limit > 0 && args.bs > limit as u64 {
            return Err(format!(
                "--bs {} is larger than the backend's {prop} {limit}",
                args.bs
            ));
        }
    }

    let align = b
        .get_u64("mem-region-alignment")
        .map_err(ctx("mem-region-alignment"))?
        .max(1);
    let slots = args.queues as u64 * u64::from(args.iodepth);
    let per_queue = u64::from(args.iodepth) * args.bs;
    let len = (slots * args.bs).div_ceil(align) * align;
    let len = usize::try_from(len).map_err(|_| format!("buffer region of {len} bytes"))?;
    let region = b.alloc_mem_region(len).map_err(ctx("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(ctx("map_mem_region"))?;
    // Writes carry non-zero data, different per slot; reads overwrite it.
    // SAFETY: the region is `len` bytes of fresh read-write shared memory that nothing else uses
    // until the workers start.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, len) };
    let mut x = args.seed | 1;
    for chunk in buf.chunks_mut(8) {
        x = xorshift(x);
        let bytes = (x | 0x0101_0101_0101_0101).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let start = t0 + Duration::from_secs_f64(args.ramp);
    let window = Duration::from_secs_f64(args.runtime);
    let end = start + window;
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let w = Worker {
                q,
                rw: args.rw,
                bs: args.bs,
                iodepth: args.iodepth as usize,
                size,
                buf_base: region.addr + i * per_queue as usize,
                rng: xorshift(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1)) | 1,
                cursor: (size / args.bs / u64::from(args.queues)) * i as u64 * args.bs,
                start,
                end,
                stop: stop.clone(),
            };
            std::thread::Builder::new()
                .name(format!("queue{i}"))
                .spawn(move || w.run())
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("spawn worker thread: {e}"))?;

    let mut out = Outcome {
        capacity,
        size,
        queue_size,
        ios: 0,
        ios_total: 0,
        bytes: 0,
        window,
        lat: Histogram::default(),
        errors: 0,
        first_error: None,
    };
    for h in handles {
        let r = h
            .join()
            .map_err(|_| "a worker thread panicked".to_string())?;
        out.ios += r.ios;
        out.ios_total += r.ios_total;
        out.bytes += r.ios * args.bs;
        out.errors += r.errors;
        out.lat.merge(&r.lat);
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
    }
    Ok(out)
}

struct Worker {
    q: Blkioq,
    rw: Rw,
    bs: u64,
    iodepth: usize,
    size: u64,
    buf_base: usize,
    rng: u64,
    cursor: u64,
    start: Instant,
    end: Instant,
    /// Set by the first queue that sees a failure: everyone stops submitting and drains.
    stop: Arc<AtomicBool>,
}

struct QueueResult {
    ios: u64,
    ios_total: u64,
    errors: u64,
    lat: Histogram,
    first_error: Option<String>,
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

impl Worker {
    fn next_offset(&mut self) -> u64 {
        if self.rw.is_random() {
            self.rng = xorshift(self.rng);
            (self.rng % (self.size / self.bs)) * self.bs
        } else {
            if self.cursor + self.bs > self.size {
                self.cursor = 0;
            }
            let off = self.cursor;
            self.cursor += self.bs;
            off
        }
    }

    fn submit(&mut self, slot: usize, offset: u64) {
        let buf = (self.buf_base + slot * self.bs as usize) as *mut u8;
        let len = self.bs as usize;
        if self.rw.is_write() {
            self.q.write(offset, buf, len, slot, ReqFlags::empty());
        } else {
            self.q.read(offset, buf, len, slot, ReqFlags::empty());
        }
    }

    fn run(mut self) -> QueueResult {
        let mut res = QueueResult {
            ios: 0,
            ios_total: 0,
            errors: 0,
            lat: Histogram::default(),
            first_error: None,
        };
        let fail = |res: &mut QueueResult, stop: &AtomicBool, msg: String| {
            res.errors += 1;
            if res.first_error.is_none() {
                res.first_error = Some(msg);
            }
            stop.store(true, Ordering::SeqCst);
        };

        let mut issued = vec![Instant::now(); self.iodepth];
        let mut offsets = vec![0u64; self.iodepth];
        for slot in 0..self.iodepth {
            offsets[slot] = self.next_offset();
            issued[slot] = Instant::now();
            self.submit(slot, offsets[slot]);
        }
        let mut inflight = self.iodepth;
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..self.iodepth).map(|_| MaybeUninit::uninit()).collect();

        while inflight > 0 {
            let mut timeout = STALL_TIMEOUT;
            let n = match self.q.do_io(&mut comps, 1, Some(&mut timeout), None) {
                Ok(0) => {
                    fail(
                        &mut res,
                        &self.stop,
                        format!("{inflight} request(s) got no completion within {STALL_TIMEOUT:?}"),
                    );
                    break;
                }
                Ok(n) => n.min(comps.len()),
                Err(e) => {
                    fail(&mut res, &self.stop, format!("blkioq_do_io: {e}"));
                    break;
                }
            };
            let now = Instant::now();
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                inflight -= 1;
                let slot = c.user_data;
                if slot >= self.iodepth {
                    fail(
                        &mut res,
                        &self.stop,
                        format!("completion for unknown request {slot}"),
                    );
                    continue;
                }
                if c.ret != 0 {
                    let detail = if c.error_msg.is_null() {
                        String::new()
                    } else {
                        // SAFETY: libblkio's error messages are static NUL-terminated strings.
                        let m = unsafe { CStr::from_ptr(c.error_msg) };
                        format!(": {}", m.to_string_lossy())
                    };
                    let err = std::io::Error::from_raw_os_error(-c.ret);
                    fail(
                        &mut res,
                        &self.stop,
                        format!(
                            "{} of {} bytes at offset {} failed: {err}{detail}",
                            self.rw.name(),
                            self.bs,
                            offsets[slot]
                        ),
                    );
                    continue;
                }
                res.ios_total += 1;
                if now >= self.start && now < self.end {
                    res.ios += 1;
                    let ns = now.saturating_duration_since(issued[slot]).as_nanos();
                    res.lat.record(u64::try_from(ns).unwrap_or(u64::MAX));
                }
                if now < self.end && !self.stop.load(Ordering::Relaxed) {
                    offsets[slot] = self.next_offset();
                    issued[slot] = Instant::now();
                    self.submit(slot, offsets[slot]);
                    inflight += 1;
                }
            }
        }
        res
    }
}
