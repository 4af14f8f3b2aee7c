//! Polling (`--poll-us auto|0|N`, `--poll-max-us`): the adaptive window grows under a
//! queue-depth-1 load and shrinks after a pause, an attached but idle disk costs no CPU time
//! at all, and the settings show in `query-status` and `query-stats`.

mod common;

use std::time::Duration;

use common::*;

const BLOCK: usize = 4096;

/// The server's CPU time so far, in clock ticks (utime + stime of /proc/PID/stat: every
/// thread's, those that ended included).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let after = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the line (utime, stime) are 12 and 13 after the name and state.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Each thread's name and context switches (voluntary + not): a thread that woke up at all
/// switched in, so this names what woke when the ticks say something ran.
fn switches(pid: i32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let n: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.push((format!("{name} ({})", t.file_name().to_string_lossy()), n));
    }
    out.sort();
    out
}

/// Whether every thread of the process is asleep (state S in /proc/PID/task/TID/stat).
fn all_asleep(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|stat| Some(stat[stat.rfind(')')? + 2..].starts_with('S')))
            // A thread that ended between the listing and the read sleeps for good.
            .unwrap_or(true)
    })
}

/// Queue 0's polling window now, from `query-stats`.
fn window_us(s: &Server) -> u64 {
    queue_stat(s, "poll_window_us")
}

/// Queue 0's `name` in `query-stats`.
fn queue_stat(s: &Server, name: &str) -> u64 {
    s.ctl_ok("query-stats", &[])["queues"][0][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in query-stats"))
}

/// Writes one 4 KiB block at a time (queue depth 1) and reads each back, compared.
fn one_at_a_time(c: &mut Client, seed: u64, blocks: u64) {
    for b in 0..blocks {
        let off = b * BLOCK as u64;
        let data = pattern(seed, off, BLOCK);
        assert_eq!(c.write(0, off, &data), 0, "write at {off}");
        assert!(c.read(0, off, BLOCK).unwrap() == data, "data at {off}");
    }
}

/// With the default `--poll-us auto`: requests one at a time grow the window (the client
/// comes back within microseconds); then ten seconds with the client attached and no I/O
/// cost the server no CPU time at all (the window is spent only after work, and then every
/// thread sleeps without a timeout); and the first request after that pause halves the
/// window, because no window within the cap would have caught it.
#[test]
fn the_window_grows_under_load_costs_nothing_idle_and_shrinks_after_a_pause() {
    let s = Server::start(8 * MIB, &[]);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["poll_mode"], "auto");
    assert_eq!(st["poll_max_us"], 50);

    // Not asserted: the window is 0 right after the connection. The rings' start can wake the
    // worker twice within microseconds (a resume's poke, the first kick), which rightly grows
    // it a step before any I/O; the starting value is the unit tests' to check.
    let mut c = s.client(1);
    let mut seed = 1;
    wait_until(
        "the polling window to grow and polling to catch requests one at a time",
        Duration::from_secs(60),
        || {
            one_at_a_time(&mut c, seed, 256);
            seed += 1;
            queue_stat(&s, "poll_hits") > 0 && window_us(&s) > 0
        },
    );
    let grown = window_us(&s);
    assert!(grown <= 50, "window {grown} us is past the cap of 50");

    // The poll loop ends 50 us after the last work, and the control socket's thread for the
    // last `ctl` ends with it: measure from when every thread sleeps.
    let pid = s.pid();
    wait_until(
        "every server thread to sleep",
        Duration::from_secs(10),
        || all_asleep(pid),
    );
    let ticks = cpu_ticks(pid);
    let before = switches(pid);
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_ticks(pid) - ticks;
    let after = switches(pid);
    let woke: Vec<String> = after
        .iter()
        .filter(|t| !before.contains(t))
        .map(|(name, n)| format!("{name}: {n} switches"))
        .collect();
    assert_eq!(
        used, 0,
        "an idle server used {used} ticks of CPU time in 10 s; threads that woke: {woke:?}"
    );
    assert!(
        woke.is_empty(),
        "threads of an idle server woke up: {woke:?} (before: {before:?})"
    );

    // The client is still attached and served; the pause was longer than any window.
    let data = pattern(seed - 1, 0, BLOCK);
    assert!(c.read(0, 0, BLOCK).unwrap() == data);
    let halved = if grown / 2 < 4 { 0 } else { grown / 2 };
    assert_eq!(window_us(&s), halved, "after a pause the window halves");
}

#[test]
fn fixed_and_off_windows_show_as_set() {
    let s = Server::start(4 * MIB, &["--poll-us", "30"]);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["poll_mode"], "fixed");
    assert_eq!(st["poll_max_us"], 30);
    let mut c = s.client(1);
    one_at_a_time(&mut c, 7, 64);
    assert_eq!(window_us(&s), 30);
    drop(c);

    let s = Server::start(4 * MIB, &["--poll-us", "0"]);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["poll_mode"], "off");
    assert_eq!(st["poll_max_us"], 0);
    let mut c = s.client(1);
    one_at_a_time(&mut c, 8, 64);
    assert_eq!(window_us(&s), 0);
    // Every request came with a wakeup of its own: none was polled for.
    assert!(queue_stat(&s, "wakeups") > 0);
    assert_eq!(queue_stat(&s, "poll_hits"), 0);

    let s = Server::start(4 * MIB, &["--poll-max-us", "120"]);
    let st = s.ctl_ok("query-status", &[]);
    assert_eq!(st["poll_mode"], "auto");
    assert_eq!(st["poll_max_us"], 120);
}

#[test]
fn poll_flags_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("d.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(MIB))
        .expect("image");
    let sock = dir.path().join("d.sock");
    for (args, says) in [
        (
            &["--poll-us", "50", "--poll-max-us", "100"][..],
            "--poll-max-us caps",
        ),
        (
            &["--poll-us", "soon"],
            "expected auto, 0 (off) or microseconds",
        ),
        (&["--poll-us", "2000000"], "up to 1000000"),
        (&["--poll-max-us", "0"], "--poll-max-us"),
    ] {
        let (code, err) = serve_refused(&image, &sock, args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
