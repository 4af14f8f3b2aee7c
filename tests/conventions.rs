//! vhost-user's backend program conventions (vhost-user.rst, "Backend program conventions"):
//! `--print-capabilities`, `--socket-path`, `--fd` and systemd socket activation, each serving
//! a real client.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_remapblk");

/// A 4 MiB image in a fresh directory.
fn image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    (dir, img)
}

fn spawn(cmd: &mut Command, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .env("RUST_LOG", "debug")
        .spawn()
        .expect("spawn remapblk")
}

/// Data written through the socket reads back; then SIGTERM ends the server with exit 0.
fn serves_and_exits(mut child: Child, socket: &Path, dir: &Path) {
    let log = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    wait_until("the server to listen", Duration::from_secs(20), || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "server exited: {}",
            log()
        );
        log().contains("listening on")
    });
    let mut c = Client::connect(socket, 1, false);
    let data = pattern(9, 8192, 65536);
    assert_eq!(c.write(0, 8192, &data), 0);
    assert_eq!(c.read(0, 8192, 65536).unwrap(), data);
    drop(c);
    // SAFETY: kill(2) with a pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    wait_until("the server to exit", Duration::from_secs(15), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", log());
}

#[test]
fn print_capabilities_says_block_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--print-capabilities"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], "block");
    let features = caps["features"].as_array().unwrap();
    assert!(features.contains(&"read-only".into()) && features.contains(&"blk-file".into()));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no image, spare or socket was made"
    );
}

#[test]
fn socket_path_and_blk_file_are_the_conventions_names() {
    let (dir, img) = image();
    let socket = dir.path().join("conv.sock");
    let child = spawn(
        Command::new(BIN)
            .arg("serve")
            .arg("--blk-file")
            .arg(&img)
            .arg("--socket-path")
            .arg(&socket),
        dir.path(),
    );
    serves_and_exits(child, &socket, dir.path());
    assert!(!socket.exists(), "a socket it bound is removed at exit");
    assert_eq!(read_file_at(&img, 8192, 65536), pattern(9, 8192, 65536));
}

#[test]
fn an_inherited_listening_socket_is_served_and_left_in_place() {
    let (dir, img) = image();
    let socket = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--image")
        .arg(&img)
        .args(["--fd", "3"]);
    pass_as_fd3(&mut cmd, listener.as_raw_fd());
    let child = spawn(&mut cmd, dir.path());
    drop(listener);
    serves_and_exits(child, &socket, dir.path());
    assert!(
        socket.exists(),
        "the socket's owner removes it, not remapblk"
    );
    assert!(
        !dir.path().join("inherited.sock.ctl").exists(),
        "the control socket beside it is removed"
    );
}

#[test]
fn systemd_socket_activation_is_served() {
    let (dir, img) = image();
    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // As systemd does: LISTEN_PID is the pid of the process that execs remapblk (the shell's
    // `$$`, which exec keeps), LISTEN_FDS=1, the socket at descriptor 3.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve --image "$1""#)
        .arg(BIN)
        .arg(&img);
    pass_as_fd3(&mut cmd, listener.as_raw_fd());
    let child = spawn(&mut cmd, dir.path());
    drop(listener);
    serves_and_exits(child, &socket, dir.path());
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("socket systemd passed"), "{log}");
}

#[test]
fn a_descriptor_that_is_not_a_listening_socket_is_refused() {
    let (dir, img) = image();
    for (fd, why) in [("99", "not open"), ("0", "not a socket")] {
        let out = Command::new(BIN)
            .arg("serve")
            .arg("--image")
            .arg(&img)
            .args(["--fd", fd])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "--fd {fd}: {err}");
        assert!(
            err.contains(&format!("descriptor {fd} is not a listening unix socket"))
                && err.contains(why),
            "--fd {fd}: {err}"
        );
    }
    let out = Command::new(BIN)
        .args(["serve", "--fd", "3", "--socket", "x.sock"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "--fd with --socket is bad usage"
    );
}
