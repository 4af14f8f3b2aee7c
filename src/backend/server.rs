//! The socket side: claiming the socket path, serving one frontend after another, and the
//! orderly exit on SIGINT/SIGTERM (drain, fdatasync, remove the socket file, exit 0).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use super::device::Device;
use super::handler::Frontend;
use super::inflight::Phase;
use super::live::Live;
use crate::io::EngineKind;
use crate::sandbox::{self, Role, SandboxError};
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
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
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

/// Serves frontends on the socket `listen` names, one after another, until SIGINT or SIGTERM,
/// under the system call filter `seccomp` (installed once the socket listens).
pub fn serve(
    dev: Arc<Device>,
    live: Arc<Live>,
    listen: Listen,
    seccomp: sandbox::Mode,
) -> Result<(), ServeError> {
    let signals = SignalPipe::new().map_err(ServeError::Signals)?;
    let path = listen.path();
    // A socket we bound is ours to remove at exit; an inherited one belongs to whoever made it.
    let owned = matches!(listen, Listen::Path(_))
        .then(|| path.clone())
        .flatten();
    let listener = listen.open()?;
    // Start-up is over: everything the process opens for writing is open.
    sandbox::lock_down(seccomp, dev.cfg.engine == EngineKind::IoUring)?;
    match &path {
        Some(p) => info!("listening on {}", p.display()),
        None => info!("listening on an inherited socket"),
    }
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
            if serve_connection(&dev, &live, frontend, &signals)? {
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

/// Serves one frontend connection until it ends. Returns true when a signal asked the process
/// to exit. A frontend that breaks the protocol gets its connection closed; the server goes on.
fn serve_connection(
    dev: &Arc<Device>,
    live: &Arc<Live>,
    frontend: UnixStream,
    signals: &SignalPipe,
) -> Result<bool, ServeError> {
    info!("frontend connected");
    live.events.emit("connect", serde_json::json!({}));
    let front_ctl = frontend.try_clone().map_err(ServeError::Poll)?;
    let (done_rx, done_tx) = UnixStream::pair().map_err(ServeError::Poll)?;

    thread::scope(|s| {
        let requests = s.spawn(move || {
            let end = handle_requests(dev, live, frontend);
            drop(done_tx);
            end
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
        let end = requests
            .join()
            .map_err(|_| ServeError::Daemon("request handler thread panicked".to_string()))?;
        match end {
            None => {
                info!("frontend disconnected");
                live.events.emit("disconnect", serde_json::json!({}));
            }
            Some(e) => {
                warn!("frontend connection closed: {e}");
                live.events
                    .emit("disconnect", serde_json::json!({ "error": e.to_string() }));
            }
        }
        Ok(stop)
    })
}

/// Answers the frontend's requests until it disconnects (None) or sends something refused
/// (the reason). Either way the session is over and drained when this returns.
fn handle_requests(dev: &Arc<Device>, live: &Arc<Live>, frontend: UnixStream) -> Option<String> {
    sandbox::enter(Role::Session);
    let handler = match Frontend::new(dev.clone(), live.clone()) {
        Ok(h) => Arc::new(Mutex::new(h)),
        Err(e) => return Some(format!("cannot start serving it: {e}")),
    };
    let mut requests = BackendReqHandler::from_stream(frontend, handler.clone());
    let end = loop {
        match requests.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected | VuError::PartialMessage) => break None,
            Err(VuError::SocketBroken(e)) if is_disconnect(&e) => break None,
            Err(e) => break Some(e.to_string()),
        }
    };
    // The session ends here (drained), before the connection closes.
    handler
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .end_session("disconnect");
    drop(requests);
    end
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
}
