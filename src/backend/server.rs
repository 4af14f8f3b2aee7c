//! The socket side: claiming the socket path, serving one frontend after another, and the
//! orderly exit on SIGINT/SIGTERM (drain, fdatasync, remove the socket file, exit 0).

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::device::Device;
use super::inflight::Phase;
use super::live::Live;
use super::relay;
use super::vhu_blk::BlkBackend;
use crate::unix::{self, Listen, SocketError};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("vhost-user socket: {0}")]
    Socket(#[from] SocketError),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot start serving a frontend: {0}")]
    Daemon(String),
    #[error("waiting for events failed: {0}")]
    Poll(io::Error),
    #[error("final fdatasync of the image failed: {0}")]
    FinalFlush(io::Error),
}

/// SIGINT and SIGTERM, turned into a readable fd so the accept loop can poll for them.
struct SignalPipe {
    read: UnixStream,
    ids: Vec<signal_hook::SigId>,
}

impl SignalPipe {
    fn new() -> io::Result<SignalPipe> {
        let (read, write) = UnixStream::pair()?;
        write.set_nonblocking(true)?;
        let mut ids = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            ids.push(signal_hook::low_level::pipe::register(
                sig,
                write.try_clone()?,
            )?);
        }
        Ok(SignalPipe { read, ids })
    }

    fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Serves frontends on the socket `listen` names, one after another, until SIGINT or SIGTERM.
pub fn serve(dev: Arc<Device>, live: Arc<Live>, listen: Listen) -> Result<(), ServeError> {
    let signals = SignalPipe::new().map_err(ServeError::Signals)?;
    let path = listen.path();
    // A socket we bound is ours to remove at exit; an inherited one belongs to whoever made it.
    let owned = matches!(listen, Listen::Path(_))
        .then(|| path.clone())
        .flatten();
    let listener = listen.open()?;
    // The sessions' directory sits beside the socket; an inherited socket without a path gets
    // one in the temporary directory.
    let base = path
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("remapblk-{}", std::process::id())));
    let internal = Internal::new(&base).map_err(|source| SocketError::Listen {
        path: base.clone(),
        source,
    })?;
    match &path {
        Some(p) => info!("listening on {}", p.display()),
        None => info!("listening on an inherited socket"),
    }
    let live = &*live;

    let result = (|| -> Result<(), ServeError> {
        loop {
            if unix::wait_any(&[listener.as_raw_fd(), signals.fd()]).map_err(ServeError::Poll)? == 1
            {
                info!("signal received while idle; exiting");
                live.set_stopping();
                return Ok(());
            }
            let frontend = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            };
            if serve_connection(&dev, live, frontend, &internal, &signals)? {
                return Ok(());
            }
        }
    })();

    let flushed = dev.target.stack.flush();
    if let Some(socket) = owned {
        if let Err(e) = std::fs::remove_file(&socket) {
            warn!("cannot remove socket {}: {e}", socket.display());
        }
    }
    result?;
    flushed.map_err(ServeError::FinalFlush)?;
    info!("image flushed; bye");
    Ok(())
}

/// The internal socket the backend sessions listen on. Whoever connects to it gets the disk,
/// so it lives in a directory only this user can enter (`<socket>.session/`, mode 0700), not in
/// the abstract namespace, where any local process could connect. A directory left by a killed
/// process is replaced, like the socket.
struct Internal {
    dir: PathBuf,
    path: PathBuf,
    listener: Mutex<Listener>,
}

impl Internal {
    fn new(socket: &Path) -> io::Result<Internal> {
        let mut dir = socket.as_os_str().to_owned();
        dir.push(".session");
        let dir = PathBuf::from(dir);
        let path = dir.join("sock");
        if dir.is_dir() {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let listener = Mutex::new(Listener::from(UnixListener::bind(&path)?));
        Ok(Internal {
            dir,
            path,
            listener,
        })
    }
}

impl Drop for Internal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Serves one frontend connection, through as many backend sessions as it asks for. Returns
/// true when a signal asked the process to exit.
fn serve_connection(
    dev: &Arc<Device>,
    live: &Live,
    frontend: UnixStream,
    internal: &Internal,
    signals: &SignalPipe,
) -> Result<bool, ServeError> {
    info!("frontend connected");
    live.events.emit("connect", serde_json::json!({}));
    let front_ctl = frontend.try_clone().map_err(ServeError::Poll)?;
    let (done_rx, mut done_tx) = UnixStream::pair().map_err(ServeError::Poll)?;

    thread::scope(|s| {
        let sessions = s.spawn(|| {
            let r = run_sessions(dev, &frontend, internal, live);
            let _ = done_tx.write_all(&[1]);
            r
        });
        let stop =
            unix::wait_any(&[done_rx.as_raw_fd(), signals.fd()]).map_err(ServeError::Poll)? == 1;
        if stop {
            // Drain before closing the connection: requests the guest already handed us
            // complete and are signalled while the frontend still listens.
            info!("signal received; draining in-flight requests");
            live.set_stopping();
            if let Some(b) = live.current() {
                let report = b.drain_all(Phase::Closed);
                live.drain_done("exit", &report);
            }
            let _ = front_ctl.shutdown(Shutdown::Both);
        }
        sessions
            .join()
            .map_err(|_| ServeError::Daemon("session thread panicked".to_string()))??;
        Ok(stop)
    })
}

/// Runs backend sessions for one frontend connection until it ends.
fn run_sessions(
    dev: &Arc<Device>,
    frontend: &UnixStream,
    internal: &Internal,
    live: &Live,
) -> Result<(), ServeError> {
    let daemon_err = |e: vhost_user_backend::Error| ServeError::Daemon(e.to_string());
    let mut replay: Option<relay::Message> = None;
    let mut negotiation = relay::Negotiation::default();
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(dev.clone(), mem.clone());
        let mut daemon = VhostUserDaemon::new("remapblk".to_string(), backend.clone(), mem)
            .map_err(daemon_err)?;
        let handlers = daemon.get_epoll_handlers();
        for (q, fd, token) in backend.engine_fds() {
            if let Some(h) = handlers.get(q) {
                h.register_listener(fd, EventSet::IN, token).map_err(|e| {
                    ServeError::Daemon(format!(
                        "queue {q}: cannot watch the engine's completions: {e}"
                    ))
                })?;
            }
        }
        let session = UnixStream::connect(&internal.path).map_err(ServeError::Poll)?;
        daemon
            .start(&mut internal.listener.lock().unwrap_or_else(|p| p.into_inner()))
            .map_err(daemon_err)?;
        live.set_current(Some(backend.clone()));

        let end = match replay.take() {
            Some(m) => relay::replay_and_relay(&m, frontend, &session, &mut negotiation),
            None => relay::relay(frontend, &session, &mut negotiation, false),
        };
        // Ending the session: the daemon sees its socket close and stops; whatever the
        // frontend left in flight completes before its memory and rings go away.
        let _ = session.shutdown(Shutdown::Both);
        let result = daemon.wait();
        let report = backend.drain_all(Phase::Closed);
        live.set_current(None);
        live.drain_done("disconnect", &report);
        teardown(daemon, &backend);

        match end {
            relay::SessionEnd::Restart(msg) => {
                info!("frontend re-initialised the device on its connection (SET_OWNER again, as QEMU does on device_add); starting a fresh session");
                replay = Some(msg);
            }
            relay::SessionEnd::FrontendClosed(None) => {
                info!("frontend disconnected");
                live.events.emit("disconnect", serde_json::json!({}));
                return Ok(());
            }
            relay::SessionEnd::FrontendClosed(Some(e)) => {
                warn!("frontend connection ended: {e}");
                live.events
                    .emit("disconnect", serde_json::json!({ "error": e.to_string() }));
                return Ok(());
            }
            relay::SessionEnd::BackendClosed => {
                match result {
                    Err(e) => warn!(
                        "frontend sent a request the backend refused ({e}); closing its connection"
                    ),
                    Ok(()) => warn!("backend session ended; closing the frontend connection"),
                }
                let _ = frontend.shutdown(Shutdown::Both);
                live.events.emit(
                    "disconnect",
                    serde_json::json!({ "error": "backend refused a request" }),
                );
                return Ok(());
            }
        }
    }
}

fn teardown(daemon: VhostUserDaemon<BlkBackend>, backend: &BlkBackend) {
    if !backend.abandoned_any() {
        drop(daemon);
    } else {
        // A worker may still sit in a system call that never returns; joining it would hang
        // the server. Let a detached thread wait for it instead.
        let _ = thread::Builder::new()
            .name("teardown".to_string())
            .spawn(move || drop(daemon));
    }
}
