//! Command line of `remapblk-bench`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use remapblk::args::parse_size;

/// Largest virtqueue a vhost-user-blk backend offers (remapblk and libvhost-user both stop at
/// 1024). libblkio builds each request from 3 descriptors (header, data, status) and uses no
/// indirect descriptors, so a queue of 1024 holds at most 341 requests.
pub const MAX_QUEUE_SIZE: u32 = 1024;
pub const DESCS_PER_REQUEST: u32 = 3;
pub const MAX_IODEPTH: u32 = MAX_QUEUE_SIZE / DESCS_PER_REQUEST;

/// Load generator for vhost-user-blk backends (remapblk, qemu-storage-daemon, ...).
///
/// Connects to SOCKET with libblkio's virtio-blk-vhost-user driver (the client QEMU's
/// `virtio-blk-vhost-user` blockdev uses), opens --queues queues with one thread each, and keeps
/// --iodepth requests in flight on every queue: each completion is immediately replaced by a new
/// request (random offsets aligned to --bs for randread/randwrite, a per-queue cursor that wraps
/// around for read/write). Requests that complete during the first --ramp seconds are not
/// counted; then --runtime seconds are measured. All buffers live in one shared memory region.
///
/// Prints IOPS, MB/s (10^6 bytes) and completion latency (p50/p99/max from a log-linear histogram,
/// within 6.25%), or one JSON object with --json. Any failed request stops the run: exit 1 with
/// a message. Exit 2 on bad usage.
#[derive(Parser, Debug, Clone)]
#[command(name = "remapblk-bench", version)]
pub struct Args {
    /// vhost-user-blk socket of the backend under test.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,

    /// Request size in bytes, a multiple of 512 (K, M suffixes: 4k, 1M).
    #[arg(long, value_name = "BYTES", default_value = "4k", value_parser = parse_bs)]
    pub bs: u64,

    /// Requests kept in flight on each queue.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=MAX_IODEPTH as i64))]
    pub iodepth: u32,

    /// Virtqueues to use, each driven by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub queues: u32,

    /// Seconds measured (after the ramp).
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_runtime)]
    pub runtime: f64,

    /// Seconds of load before measuring starts (not counted).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_ramp)]
    pub ramp: f64,

    /// Bytes of the disk to use, from offset 0 (K, M, G, T suffixes). Default: the whole
    /// capacity.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Seed of the random offsets (the same seed gives the same offsets).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,

    /// Virtqueue size to ask for. Default: the smallest power of two, at least 256, that holds
    /// --iodepth requests of 3 descriptors each.
    #[arg(long, value_name = "N", value_parser = parse_queue_size)]
    pub queue_size: Option<u32>,

    /// Print one JSON object (iops, mb_per_s, lat_us {p50, p99, max, mean}, errors, ...).
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Rw {
    pub fn is_write(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write)
    }

    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }

    pub fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }
}

impl Args {
    /// The virtqueue size to request: --queue-size, or the default derived from --iodepth.
    /// Errors when an explicit size cannot hold --iodepth requests.
    pub fn queue_size(&self) -> Result<u32, String> {
        let need = self.iodepth * DESCS_PER_REQUEST;
        match self.queue_size {
            Some(q) if q < need => Err(format!(
                "--queue-size {q} holds fewer than --iodepth {} requests ({DESCS_PER_REQUEST} \
                 descriptors each); use at least {}",
                self.iodepth,
                need.next_power_of_two()
            )),
            Some(q) => Ok(q),
            None => Ok(need.next_power_of_two().max(256)),
        }
    }
}

fn parse_bs(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n % 512 != 0 || n > (64 << 20) {
        return Err(format!(
            "block size must be a multiple of 512 up to 64M, got {n}"
        ));
    }
    Ok(n)
}

fn parse_secs(s: &str, min_exclusive: bool) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    let ok = v.is_finite() && v <= 86_400.0 && if min_exclusive { v > 0.0 } else { v >= 0.0 };
    if !ok {
        return Err(format!(
            "seconds must be {} and at most 86400, got {s}",
            if min_exclusive { "> 0" } else { ">= 0" }
        ));
    }
    Ok(v)
}

fn parse_runtime(s: &str) -> Result<f64, String> {
    parse_secs(s, true)
}

fn parse_ramp(s: &str) -> Result<f64, String> {
    parse_secs(s, false)
}

fn parse_queue_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(4..=MAX_QUEUE_SIZE).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "queue size must be a power of two from 4 to {MAX_QUEUE_SIZE}, got {n}"
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["remapblk-bench", "--socket", "s"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v)
    }

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_and_suffixes() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            (a.rw, a.bs, a.iodepth, a.queues),
            (Rw::Randread, 4096, 1, 1)
        );
        assert_eq!((a.runtime, a.ramp), (5.0, 1.0));
        let a = parse(&["--bs", "1M", "--rw", "write", "--size", "512m"]).unwrap();
        assert_eq!((a.bs, a.rw, a.size), (1 << 20, Rw::Write, Some(512 << 20)));
    }

    #[test]
    fn bad_usage_is_refused() {
        for bad in [
            &["--bs", "1000"][..],
            &["--bs", "0"],
            &["--iodepth", "0"],
            &["--iodepth", "342"],
            &["--runtime", "0"],
            &["--ramp", "-1"],
            &["--rw", "trim"],
            &["--queue-size", "100"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn queue_size_fits_iodepth() {
        let qs = |extra: &[&str]| parse(extra).unwrap().queue_size();
        assert_eq!(qs(&["--iodepth", "1"]), Ok(256));
        assert_eq!(qs(&["--iodepth", "128"]), Ok(512));
        assert_eq!(qs(&["--iodepth", "341"]), Ok(1024));
        assert!(qs(&["--iodepth", "128", "--queue-size", "256"]).is_err());
    }
}
