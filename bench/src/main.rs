//! `remapblk-bench`: a libblkio load generator for vhost-user-blk backends, used by
//! `ci/bench.sh` to compare remapblk with qemu-storage-daemon. See `--help`.

mod args;
mod hist;
mod load;

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;

/// CPU time (user + system) this process has used so far, all threads: lets `ci/bench.sh` tell
/// the load generator's share of the machine from other processes'.
fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; on failure it stays zeroed.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() -> ExitCode {
    // clap exits 2 on bad usage and 0 for --help/--version.
    let args = args::Args::parse();
    if let Err(e) = args.queue_size() {
        eprintln!("remapblk-bench: {e}");
        return ExitCode::from(2);
    }
    let out = match load::run(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("remapblk-bench: {e}");
            return ExitCode::from(1);
        }
    };

    let secs = out.window.as_secs_f64();
    let iops = out.ios as f64 / secs;
    let mb_per_s = out.bytes as f64 / secs / 1e6;
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    let mut text = String::new();
    if args.json {
        let v = serde_json::json!({
            "socket": args.socket.display().to_string(),
            "rw": args.rw.name(),
            "bs": args.bs,
            "iodepth": args.iodepth,
            "queues": args.queues,
            "queue_size": out.queue_size,
            "runtime_s": secs,
            "ramp_s": args.ramp,
            "size": out.size,
            "capacity": out.capacity,
            "seed": args.seed,
            "ios": out.ios,
            "ios_total": out.ios_total,
            "iops": (iops * 10.0).round() / 10.0,
            "mb_per_s": (mb_per_s * 100.0).round() / 100.0,
            "lat_us": {
                "p50": us(out.lat.quantile(0.50)),
                "p99": us(out.lat.quantile(0.99)),
                "max": us(out.lat.max()),
                "mean": (out.lat.mean() / 100.0).round() / 10.0,
                "samples": out.lat.count(),
            },
            "errors": out.errors,
            "cpu_s": (cpu_seconds() * 1000.0).round() / 1000.0,
        });
        let _ = writeln!(text, "{v}");
    } else {
        let _ = writeln!(
            text,
            "{} bs={} iodepth={} queues={} ({} s measured after {} s ramp, {} of {} bytes used)",
            args.rw.name(),
            args.bs,
            args.iodepth,
            args.queues,
            secs,
            args.ramp,
            out.size,
            out.capacity
        );
        let _ = writeln!(text, "  iops     {iops:.0}");
        let _ = writeln!(text, "  MB/s     {mb_per_s:.1}");
        let _ = writeln!(
            text,
            "  lat_us   p50 {}  p99 {}  max {}  mean {:.1}",
            us(out.lat.quantile(0.50)),
            us(out.lat.quantile(0.99)),
            us(out.lat.max()),
            out.lat.mean() / 1000.0
        );
        let _ = writeln!(text, "  errors   {}", out.errors);
    }
    // A reader that went away (`| head`) is not an error of the run.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            eprintln!("remapblk-bench: cannot write the results: {e}");
            return ExitCode::from(1);
        }
    }
    if out.errors > 0 {
        eprintln!(
            "remapblk-bench: {} request(s) failed; first: {}",
            out.errors,
            out.first_error.as_deref().unwrap_or("(no message)")
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
