//! The seccomp sandbox (`serve --seccomp`): installed on every thread of a serving process,
//! narrower on the threads that face frontends, enforced (a call outside the lists ends the
//! process with SIGSYS and a line naming it), and `log` mode lets such calls through. The rest
//! of the integration suite runs under the default, `on`; `Server`'s drop fails a test whose
//! server died of SIGSYS.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use remapblk::sandbox::{self, Mode, Role};

/// A thread of the server, as /proc shows it.
#[derive(Debug)]
struct Task {
    comm: String,
    /// `Seccomp:` 0 none, 2 filter.
    mode: u32,
    filters: u32,
}

fn tasks(pid: i32) -> Vec<Task> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's tasks");
    dir.flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let field = |name: &str| -> u32 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().parse().expect("a number"))
                    .unwrap_or_else(|| panic!("no {name} in {status}"))
            };
            Some(Task {
                comm: comm.trim().to_string(),
                mode: field("Seccomp:"),
                filters: field("Seccomp_filters:"),
            })
        })
        .collect()
}

fn task<'t>(tasks: &'t [Task], comm: &str) -> &'t Task {
    tasks
        .iter()
        .find(|t| t.comm == comm)
        .unwrap_or_else(|| panic!("no thread {comm} in {tasks:?}"))
}

/// Writes, reads back and compares 1 MiB on each of two queues, so both queue threads have
/// run guest I/O under their filters.
fn io_round_trip(s: &Server) -> Client {
    let mut c = s.client(2);
    fill(&mut c, 3, 0, MIB, 64 << 10, 8);
    verify(&mut c, 3, 0, MIB, 64 << 10, 8);
    c
}

#[test]
fn serve_filters_every_thread_and_narrows_queue_session_and_control_threads() {
    // Explicitly on: REMAPBLK_SECCOMP=log may be set for a whole run of the suite.
    let mut s = Server::start(8 * MIB, &["--num-queues", "2", "--seccomp", "on"]);
    let c = io_round_trip(&s);
    s.ctl_ok("query-status", &[]);
    // The control thread narrows when it accepts a client; the next client sees it.
    s.ctl_ok("query-stats", &[]);
    let t = tasks(s.pid());
    assert!(t.iter().all(|t| t.mode == 2), "{t:?}");
    // The main thread: the clone3 filter and the process-wide list.
    let main = &t[0];
    assert_eq!(main.filters, 2, "{t:?}");
    // A queue thread: those, the session's list it inherited, its own.
    for q in ["queue0", "queue1"] {
        assert_eq!(task(&t, q).filters, 4, "{t:?}");
    }
    assert_eq!(task(&t, "control").filters, 3, "{t:?}");
    drop(c);
    // SIGTERM's drain, fdatasync and socket removal run under the filter too.
    s.signal(libc::SIGTERM);
    let st = s.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{st}: {}", s.log());
    assert!(!s.socket.exists(), "the socket file was left behind");
    assert!(s.log().contains("seccomp: on"), "{}", s.log());
}

#[test]
fn seccomp_off_installs_nothing() {
    let s = Server::start(8 * MIB, &["--num-queues", "2", "--seccomp", "off"]);
    let _c = io_round_trip(&s);
    let t = tasks(s.pid());
    assert!(t.iter().all(|t| t.mode == 0 && t.filters == 0), "{t:?}");
}

#[test]
fn log_mode_filters_and_serves() {
    let s = Server::start(8 * MIB, &["--num-queues", "2", "--seccomp", "log"]);
    let _c = io_round_trip(&s);
    let t = tasks(s.pid());
    assert!(t.iter().all(|t| t.mode == 2), "{t:?}");
    assert_eq!(task(&t, "queue0").filters, 4, "{t:?}");
    assert!(s.log().contains("seccomp: log"), "{}", s.log());
}

#[test]
fn a_bad_mode_is_bad_usage() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = serve_refused(
        &dir.path().join("disk.img"),
        &dir.path().join("disk.sock"),
        &["--seccomp", "strict"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("on") && err.contains("log") && err.contains("off"),
        "{err}"
    );
    assert!(
        !dir.path().join("disk.img").exists(),
        "bad usage created the image"
    );
}

const CASE_ENV: &str = "REMAPBLK_TEST_SANDBOX_CASE";

/// Not a test of its own: the body of a process the tests below start, which locks itself
/// down as `serve` does and then does what `REMAPBLK_TEST_SANDBOX_CASE` says.
#[test]
#[ignore]
fn helper_sandboxed_process() {
    let Ok(case) = std::env::var(CASE_ENV) else {
        return;
    };
    let mode = if case.starts_with("log-") {
        Mode::Log
    } else {
        Mode::On
    };
    println!("pid {}", std::process::id());
    sandbox::lock_down(mode, false).expect("lock down");
    println!("locked");
    match case.as_str() {
        // getppid: in no list.
        "on-getppid" | "log-getppid" => {
            println!("parent {}", std::os::unix::process::parent_id());
        }
        "worker-spawns" => {
            std::thread::spawn(|| {
                sandbox::enter(Role::Worker);
                println!("worker");
                let _ = std::thread::spawn(|| ()).join();
            })
            .join()
            .unwrap();
        }
        "session-spawns" => {
            std::thread::spawn(|| {
                sandbox::enter(Role::Session);
                std::thread::spawn(|| println!("spawned")).join().unwrap();
            })
            .join()
            .unwrap();
        }
        "fork" => {
            // SAFETY: the child, if there were one, would only exit.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
        }
        "open-read-then-write" => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            println!("read {}", status.lines().any(|l| l == "Seccomp:\t2"));
            let dir = std::env::var("REMAPBLK_TEST_SANDBOX_DIR").unwrap();
            let _ = std::fs::File::create(std::path::Path::new(&dir).join("new"));
        }
        "exec-memory" => {
            // SAFETY: a fresh anonymous mapping; nothing is touched.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        }
        "limit-read-then-raise" => {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit, which `r` is.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
            println!("limit {}", r.rlim_cur);
            r.rlim_cur = r.rlim_max;
            // SAFETY: setrlimit reads one rlimit.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
        }
        other => panic!("unknown case {other}"),
    }
    println!("survived");
}

fn sandboxed(case: &str, dir: &std::path::Path) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_sandboxed_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE_ENV, case)
        .env("REMAPBLK_TEST_SANDBOX_DIR", dir)
        .output()
        .unwrap()
}

/// The process died of SIGSYS after locking down.
fn killed(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("locked"), "{stdout} {stderr}");
    assert!(!stdout.contains("survived"), "{stdout} {stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{stdout} {stderr}");
}

/// ... and said on stderr which call of which thread.
fn killed_naming(out: &Output, call: &str, list: &str) {
    killed(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("({list} list) made system call {call}")),
        "{stderr}"
    );
    assert!(stderr.contains("--seccomp log"), "{stderr}");
}

fn dmesg() -> Option<String> {
    Command::new("dmesg")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs `case` and checks its output with `check`; where the kernel log is readable (root),
/// also that it has the audit line of the process's call `nr`: what `log` mode is for, and
/// the way to find a call whose SIGSYS line never reached stderr.
fn sandboxed_and_logged(case: &str, nr: i64, check: impl Fn(&Output)) {
    let dir = tempfile::tempdir().unwrap();
    // The kernel rate-limits these lines (printk_ratelimit, 10 per 5 s for the whole kernel
    // when no audit daemon runs): a line missing once may have been dropped, so the case
    // runs once more past the interval; missing twice, the kernel did not log it.
    for attempt in 0..2 {
        let out = sandboxed(case, dir.path());
        check(&out);
        if dmesg().is_none() {
            return;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let pid = stdout
            .split("pid ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("the child's pid");
        let (pid, call) = (format!(" pid={pid} "), format!(" syscall={nr} "));
        let logged = || {
            dmesg()
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("type=1326") && l.contains(&pid) && l.contains(&call))
        };
        let deadline = Instant::now() + Duration::from_secs(6);
        while !logged() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if logged() {
            return;
        }
        eprintln!("attempt {attempt}: no audit line for {case} (rate-limited?)");
    }
    panic!("the kernel log has no audit line for system call {nr} of case {case}");
}

#[test]
fn on_ends_the_process_at_a_call_outside_the_list_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = sandboxed("on-getppid", dir.path());
    killed_naming(
        &out,
        &libc::SYS_getppid.to_string(),
        "process-wide or inherited",
    );
}

#[test]
fn log_lets_the_call_through_and_the_kernel_logs_it() {
    sandboxed_and_logged("log-getppid", libc::SYS_getppid, |out| {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout} {:?}", out.stderr);
        // The call ran and returned the truth.
        assert!(
            stdout.contains(&format!("parent {}", std::process::id())),
            "{stdout}"
        );
        assert!(stdout.contains("survived"), "{stdout}");
    });
}

#[test]
fn a_queue_thread_may_not_start_threads() {
    // glibc blocks signals around the clone, so the SIGSYS kills before the handler can
    // write its line; the kernel log names the call.
    sandboxed_and_logged("worker-spawns", libc::SYS_clone3, |out| {
        assert!(String::from_utf8_lossy(&out.stdout).contains("worker"));
        killed(out);
    });
}

#[test]
fn a_session_thread_starts_threads_through_clone() {
    let dir = tempfile::tempdir().unwrap();
    let out = sandboxed("session-spawns", dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", out.stderr);
    assert!(
        stdout.contains("spawned") && stdout.contains("survived"),
        "{stdout}"
    );
}

#[test]
fn no_thread_may_start_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = sandboxed("fork", dir.path());
    killed_naming(
        &out,
        &format!("{} (clone)", libc::SYS_clone),
        "process-wide or inherited",
    );
}

#[test]
fn files_open_for_reading_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = sandboxed("open-read-then-write", dir.path());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read true"),
        "{:?}",
        out
    );
    killed_naming(
        &out,
        &format!("{} (openat)", libc::SYS_openat),
        "process-wide or inherited",
    );
    assert!(!dir.path().join("new").exists());
}

#[test]
fn no_executable_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = sandboxed("exec-memory", dir.path());
    killed_naming(
        &out,
        &format!("{} (mmap)", libc::SYS_mmap),
        "process-wide or inherited",
    );
}

#[test]
fn limits_are_read_never_set() {
    let dir = tempfile::tempdir().unwrap();
    let out = sandboxed("limit-read-then-raise", dir.path());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("limit "),
        "{out:?}"
    );
    killed_naming(
        &out,
        &format!("{} (prlimit64)", libc::SYS_prlimit64),
        "process-wide or inherited",
    );
}
