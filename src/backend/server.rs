//! The socket side: claiming the socket path, serving one frontend after another, and the
//! orderly exit on SIGINT/SIGTERM (drain, fdatasync, remove the socket file, exit 0).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use super::device::Device;
use super::handler::Frontend;
use super::inflight::Phase;
use super::live::Live;
use crate::fdlimit::{self, Acceptor, Reserve};
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
    let owned = matches!(listen, Listen::Path(..))
        .then(|| path.clone())
        .flatten();
    let mut listener = Acceptor::new(listen.open()?);
    // Start-up is over: everything the process opens for writing is open.
    sandbox::lock_down(seccomp, dev.cfg.engine == EngineKind::IoUring)?;
    match &path {
        Some(p) => info!("listening on {}", p.display()),
        None => info!("listening on an inherited socket"),
    }
    let result = (|| -> Result<(), ServeError> {
        loop {
            if unix::wait_any(&[listener.fd(), signals.fd()]).map_err(ServeError::Poll)? == 1 {
                info!("signal received while idle; exiting");
                live.set_stopping();
                return Ok(());
            }
            let frontend = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    if !e.is_repeat() {
                        warn!("vhost-user socket: {e}");
                    }
                    continue;
                }
            };
            if serve_connection(&dev, &live, frontend, &signals)? {
                return Ok(());
            }
        }
    })();

    // After a lab's power cut nothing is left to flush: the cut flushed the layers below,
    // and every request since failed. The guest is gone: an injected flush fault, which
    // models what the guest sees, must not make the real image's last flush fail.
    let flushed = match crate::storage::medium::unfaulted(|| dev.target.stack.flush()) {
        Err(e) if crate::cache::is_powered_off(&e) => Ok(()),
        r => r,
    };
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
/// to exit. A frontend that breaks the protocol, or that this process lacks the resources to
/// serve (descriptors, a thread), gets its connection closed; the server goes on.
fn serve_connection(
    dev: &Arc<Device>,
    live: &Arc<Live>,
    frontend: UnixStream,
    signals: &SignalPipe,
) -> Result<bool, ServeError> {
    info!("frontend connected");
    live.events.emit("connect", serde_json::json!({}));
    // A handle to shut the connection down on a signal, and a pair whose end closes when the
    // requests' thread is done.
    let watch = frontend
        .try_clone()
        .and_then(|ctl| Ok((ctl, UnixStream::pair()?)));
    let (front_ctl, (done_rx, done_tx)) = match watch {
        Ok(w) => w,
        Err(e) => {
            connection_ended(
                live,
                Some(format!("cannot serve it: {e}{}", fdlimit::hint(&e))),
            );
            return Ok(false);
        }
    };

    thread::scope(|s| {
        let requests = thread::Builder::new().spawn_scoped(s, move || {
            let end = handle_requests(dev, live, frontend);
            drop(done_tx);
            end
        });
        let requests = match requests {
            Ok(r) => r,
            Err(e) => {
                connection_ended(live, Some(format!("cannot start its thread: {e}")));
                return Ok(false);
            }
        };
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
        connection_ended(live, end);
        Ok(stop)
    })
}

/// Logs the end of a connection: a clean close (None) or why it was closed.
fn connection_ended(live: &Live, end: Option<String>) {
    match end {
        None => {
            info!("frontend disconnected");
            live.events.emit("disconnect", serde_json::json!({}));
        }
        Some(e) => {
            warn!("frontend connection closed: {e}");
            live.events
                .emit("disconnect", serde_json::json!({ "error": e }));
        }
    }
}

/// Answers the frontend's requests until it disconnects (None) or sends something refused
/// (the reason). Either way the session is over and drained when this returns.
///
/// While the connection lives, as many descriptors as a message may carry are held in reserve
/// and let go only while a message is received: a message whose descriptors found no room
/// would lose them, and the vhost crate its framing (it reads on past the failed receive).
/// When they cannot be taken again, the connection is closed with that reason.
pub fn handle_requests(
    dev: &Arc<Device>,
    live: &Arc<Live>,
    frontend: UnixStream,
) -> Option<String> {
    sandbox::enter(Role::Session);
    let mut reserve = match Reserve::take(frontend.as_fd(), MAX_ATTACHED_FD_ENTRIES) {
        Ok(r) => r,
        Err(e) => return Some(no_reserve(&e)),
    };
    let handler = match Frontend::new(dev.clone(), live.clone()) {
        Ok(h) => Arc::new(Mutex::new(h)),
        Err(e) => return Some(format!("cannot start serving it: {e}{}", fdlimit::hint(&e))),
    };
    let mut requests = BackendReqHandler::from_stream(frontend, handler.clone());
    let end = loop {
        reserve.release();
        match requests.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected | VuError::PartialMessage) => break None,
            Err(VuError::SocketBroken(e)) if is_disconnect(&e) => break None,
            // Descriptors the kernel could not hand over (a message's body that carries some,
            // more than a message may carry) are dropped, and the receive says only ENOBUFS.
            Err(VuError::SocketRetry(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                break Some(format!(
                    "{e}: a message's file descriptors could not all be received: it carried more than a message may, or where it may not"
                ))
            }
            Err(e) => break Some(e.to_string()),
        }
        if let Err(e) = reserve.retake() {
            break Some(no_reserve(&e));
        }
    };
    // The session ends here (drained), before the connection closes.
    handler
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .end_session("disconnect");
    drop(reserve);
    drop(requests);
    end
}

fn no_reserve(e: &io::Error) -> String {
    format!(
        "cannot keep {MAX_ATTACHED_FD_ENTRIES} file descriptors free to receive its messages' descriptors: {e}{}",
        fdlimit::hint(e)
    )
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
}
