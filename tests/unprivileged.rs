//! What differs for a user without privileges: the kernel's refusals that root never sees
//! (file modes, io_uring's locked-memory limit) come back with what the user needs, and a
//! lock held by another user's process, which `/proc` will not name, is still refused. Each
//! test needs one side: CI runs the suite as root and as a user (`ci/unprivileged.sh`), and a
//! test says when it skips.

mod common;

use std::fs::{File, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::privilege::{is_root, skip};
use common::*;

const ROOT_BYPASSES_MODES: &str = "root reads and writes files whatever their mode";

/// `remapblk serve --image IMAGE --socket SOCKET EXTRA...` with stdout and stderr in
/// `DIR/serve.log`, `pre_exec` run in the child before it starts, and no REMAPBLK_ENGINE, so
/// the engine is the one `extra` asks for or the one the server picks.
fn spawn_serve(
    dir: &Path,
    image: &Path,
    socket: &Path,
    extra: &[&str],
    pre_exec: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
) -> (Child, PathBuf) {
    let log = dir.join("serve.log");
    let out = File::create(&log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_remapblk"));
    cmd.arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env_remove("REMAPBLK_ENGINE")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out);
    // SAFETY: every pre_exec closure here makes only async-signal-safe system calls
    // (setrlimit, setgroups, setgid, setuid) and allocates nothing.
    unsafe { cmd.pre_exec(pre_exec) };
    (cmd.spawn().expect("spawn remapblk serve"), log)
}

/// How a server that may or may not start ended up: exited with this code, or listening.
enum Outcome {
    Exited(Option<i32>),
    Listening,
}

fn outcome(child: &mut Child, log: &Path, socket: &Path) -> Outcome {
    let mut out = None;
    wait_until(
        "the server to listen or exit",
        Duration::from_secs(20),
        || {
            if let Some(st) = child.try_wait().expect("wait for remapblk") {
                out = Some(Outcome::Exited(st.code()));
            } else if std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains(&format!("listening on {}", socket.display()))
            {
                out = Some(Outcome::Listening);
            }
            out.is_some()
        },
    );
    out.expect("an outcome")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn no_locked_memory() -> io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit(2) reads one rlimit, which `none` is.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &none) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn image_of(dir: &Path, size: u64) -> PathBuf {
    let image = dir.join("disk.img");
    File::create(&image)
        .expect("create image")
        .set_len(size)
        .expect("size image");
    image
}

#[test]
fn io_uring_without_locked_memory_is_refused_when_asked_for_and_replaced_by_sync_when_not() {
    const TEST: &str = "io_uring_without_locked_memory";
    if is_root() {
        skip(
            TEST,
            "root has CAP_IPC_LOCK, which exempts its io_uring rings from RLIMIT_MEMLOCK",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = image_of(dir.path(), 4 * MIB);
    let socket = dir.path().join("disk.sock");

    let (mut child, log) = spawn_serve(
        dir.path(),
        &image,
        &socket,
        &["--engine", "io_uring"],
        no_locked_memory,
    );
    match outcome(&mut child, &log, &socket) {
        Outcome::Listening => {
            stop(child);
            skip(
                TEST,
                "this kernel does not count io_uring rings against RLIMIT_MEMLOCK",
            );
            return;
        }
        Outcome::Exited(code) => {
            let err = std::fs::read_to_string(&log).unwrap();
            assert_eq!(code, Some(1), "{err}");
            assert!(err.contains("--engine io_uring"), "{err}");
            assert!(err.contains("RLIMIT_MEMLOCK"), "{err}");
            assert!(err.contains("ulimit -l"), "{err}");
            assert!(err.contains("--engine sync"), "{err}");
        }
    }

    // Not asked for: the server serves on the sync engine and says why.
    let (mut child, log) = spawn_serve(dir.path(), &image, &socket, &[], no_locked_memory);
    let Outcome::Listening = outcome(&mut child, &log, &socket) else {
        panic!(
            "without --engine the server must start on sync: {}",
            std::fs::read_to_string(&log).unwrap()
        );
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("engine: sync"), "{text}");
    assert!(
        text.contains("io_uring is not available") && text.contains("RLIMIT_MEMLOCK"),
        "{text}"
    );
    let mut c = Client::connect(&socket, 1, false);
    let data = pattern(5, 4096, 64 << 10);
    assert_eq!(c.write(0, 4096, &data), 0);
    assert_eq!(c.read(0, 4096, data.len()).unwrap(), data);
    drop(c);
    stop(child);
    verify_file(&image, 5, 4096, 4096 + (64 << 10), 64 << 10);
}

#[test]
fn files_this_user_may_not_write_are_refused_with_what_it_needs() {
    if is_root() {
        skip("files_this_user_may_not_write", ROOT_BYPASSES_MODES);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = image_of(dir.path(), 4 * MIB);
    let data = pattern(6, 0, 8192);
    {
        use std::os::unix::fs::FileExt;
        let f = File::options().write(true).open(&image).unwrap();
        f.write_all_at(&data, 0).unwrap();
    }
    std::fs::set_permissions(&image, Permissions::from_mode(0o444)).unwrap();

    let (code, err) = serve_refused(&image, &dir.path().join("a.sock"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot open image"), "{err}");
    assert!(err.contains("read and write access"), "{err}");
    assert!(err.contains("--readonly"), "{err}");
    assert!(
        err.contains(&format!("namei -l {}", image.display())),
        "{err}"
    );

    // Read access is all --readonly needs: the data is served.
    let spare = dir.path().join("ro.spare");
    let sockets = dir.path().join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    let socket = sockets.join("disk.sock");
    let (mut child, log) = spawn_serve(
        dir.path(),
        &image,
        &socket,
        &["--readonly", "--spare", spare.to_str().unwrap()],
        || Ok(()),
    );
    let Outcome::Listening = outcome(&mut child, &log, &socket) else {
        panic!(
            "--readonly must serve a read-only image: {}",
            std::fs::read_to_string(&log).unwrap()
        );
    };
    let mut c = Client::connect(&socket, 1, true);
    assert_eq!(c.read(0, 0, data.len()).unwrap(), data);
    drop(c);
    stop(child);

    // A socket directory it may not write: refused, naming what it needs.
    std::fs::set_permissions(&sockets, Permissions::from_mode(0o555)).unwrap();
    let (code, err) = serve_refused(
        &dir.path().join("new.img"),
        &sockets.join("other.sock"),
        &["--size", "4M"],
    );
    std::fs::set_permissions(&sockets, Permissions::from_mode(0o755)).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(
        err.contains("write and search access to the directory"),
        "{err}"
    );
}

/// Runs the child as `nobody` (65534), a user that shares nothing with root.
fn become_nobody() -> io::Result<()> {
    // SAFETY: setgroups(2) with no groups reads no memory; setgid and setuid take a number.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(65534) != 0
            || libc::setuid(65534) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn an_image_another_users_process_serves_is_refused_though_proc_cannot_name_it() {
    if !is_root() {
        skip(
            "an_image_another_users_process_serves",
            "needs root, to run the second server as another user",
        );
        return;
    }
    let s = Server::start(4 * MIB, &[]);
    let spare = PathBuf::from(format!("{}.spare", s.image.display()));
    // The other user may open both files, but not look into root's processes in /proc.
    std::fs::set_permissions(s.dir.path(), Permissions::from_mode(0o755)).unwrap();
    for f in [&s.image, &spare] {
        std::fs::set_permissions(f, Permissions::from_mode(0o666)).unwrap();
    }
    let other = s.dir.path().join("nobody");
    std::fs::create_dir(&other).unwrap();
    std::fs::set_permissions(&other, Permissions::from_mode(0o777)).unwrap();

    let socket = other.join("disk.sock");
    let (mut child, log) = spawn_serve(&other, &s.image, &socket, &[], become_nobody);
    let Outcome::Exited(code) = outcome(&mut child, &log, &socket) else {
        stop(child);
        panic!(
            "a second server started on a held image: {}",
            std::fs::read_to_string(&log).unwrap()
        );
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is in use by another process (/proc does not say which"),
        "{err}"
    );
    assert!(!err.contains("in use by process"), "{err}");

    // The first server serves on.
    let mut c = s.client(1);
    assert_eq!(c.write(0, 0, &[9u8; 4096]), 0);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![9u8; 4096]);
}
