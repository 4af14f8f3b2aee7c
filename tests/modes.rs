//! The modes of what `serve` creates: both sockets 0600 unless `--socket-mode` says otherwise,
//! a new spare file and event log 0600; files that exist and inherited sockets keep theirs.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A fresh directory with a 4 MiB image and where the event log goes.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let events = dir.path().join("events.jsonl");
    (dir, image, events)
}

fn spare_of(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".spare");
    p.into()
}

/// A write through the socket reads back: the socket works with the mode it has.
fn serves(s: &Server) {
    let mut c = s.client(1);
    let data = pattern(3, 0, 4096);
    assert_eq!(c.write(0, 4096, &data), 0);
    assert_eq!(c.read(0, 4096, 4096).unwrap(), data);
}

#[test]
fn sockets_spare_and_event_log_are_0600_by_default() {
    let (dir, image, events) = setup();
    let ev = events.display().to_string();
    let s = Server::start_on(dir, image.clone(), &["--event-log", &ev]);
    assert_eq!(mode_of(&s.socket), 0o600, "vhost-user socket");
    assert_eq!(mode_of(&s.control()), 0o600, "control socket");
    assert_eq!(mode_of(&spare_of(&image)), 0o600, "new spare file");
    assert_eq!(mode_of(&events), 0o600, "new event log");
    serves(&s);
    // The control socket answers too; the server sees the client's disconnect a moment
    // after the client is gone.
    wait_until(
        "the server to see the client go",
        Duration::from_secs(10),
        || s.ctl_ok("query-status", &[])["connected"] == false,
    );
}

#[test]
fn socket_mode_0660_applies_to_both_sockets() {
    let (dir, image, _) = setup();
    let s = Server::start_on(dir, image, &["--socket-mode", "0660"]);
    assert_eq!(mode_of(&s.socket), 0o660, "vhost-user socket");
    assert_eq!(mode_of(&s.control()), 0o660, "control socket");
    serves(&s);
}

#[test]
fn an_existing_spare_file_and_event_log_keep_their_modes() {
    let (dir, image, events) = setup();
    let ev = events.display().to_string();
    std::fs::write(&events, b"").unwrap();
    chmod(&events, 0o644);
    let mut s = Server::start_on(dir, image.clone(), &["--event-log", &ev]);
    assert_eq!(mode_of(&events), 0o644);
    let spare = spare_of(&image);
    assert_eq!(mode_of(&spare), 0o600);
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    chmod(&spare, 0o640);
    s.spawn();
    assert_eq!(mode_of(&spare), 0o640);
    serves(&s);
}

#[test]
fn a_bad_socket_mode_is_bad_usage_saying_what_a_mode_looks_like() {
    let (dir, image, _) = setup();
    let socket = dir.path().join("disk.sock");
    for bad in ["rw-------", "0690", "60", "0400"] {
        let (code, err) = serve_refused(&image, &socket, &["--socket-mode", bad]);
        assert_eq!(code, Some(2), "--socket-mode {bad}: {err}");
        assert!(err.contains("0600") && err.contains("0660"), "{bad}: {err}");
        assert!(!socket.exists());
    }
}

#[test]
fn an_inherited_socket_keeps_its_mode() {
    let (dir, image, _) = setup();
    let socket = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    chmod(&socket, 0o666);
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_remapblk"));
    cmd.arg("serve")
        .arg("--image")
        .arg(&image)
        .args(["--fd", "3"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    pass_as_fd3(&mut cmd, listener.as_raw_fd());
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let control = dir.path().join("inherited.sock.ctl");
    wait_until("the server to listen", Duration::from_secs(20), || {
        assert!(child.try_wait().unwrap().is_none(), "server exited");
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("listening on")
    });
    assert_eq!(mode_of(&socket), 0o666, "the inherited socket");
    assert_eq!(mode_of(&control), 0o600, "the control socket it made");
    let mut c = Client::connect(&socket, 1, false);
    assert_eq!(c.write(0, 0, &pattern(1, 0, 512)), 0);
    drop(c);
    let _ = child.kill();
    let _ = child.wait();
}
