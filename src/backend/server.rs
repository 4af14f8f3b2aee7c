//! The socket side: claiming the socket path, serving one frontend after another, and the
//! orderly exit on SIGINT/SIGTERM (drain, fdatasync, remove the socket file, exit 0).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::device::Device;
use super::inflight::{DrainReport, Phase};
use super::vhu_blk::BlkBackend;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "socket {0} is in use by a running process; stop that process or choose another --socket"
    )]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it. Remove it or choose another --socket")]
    NotASocket(PathBuf),
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot start serving a frontend: {0}")]
    Daemon(String),
    #[error("waiting for events failed: {0}")]
    Poll(io::Error),
    #[error("final fdatasync of the image failed: {0}")]
    FinalFlush(io::Error),
}

/// Claims `path` for listening: a socket file nobody answers on is a leftover of a killed
/// process and is replaced; one that accepts connections belongs to a live process and is not.
pub fn claim_socket(path: &Path) -> Result<(), ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ServeError::Listen {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_path_buf()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ServeError::SocketInUse(path.to_path_buf()));
    }
    info!("replacing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale {
        path: path.to_path_buf(),
        source,
    })
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

/// Blocks until one of `fds` is readable; returns its index.
fn wait_any(fds: &[RawFd]) -> io::Result<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: pfds is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if let Some(i) = pfds.iter().position(|p| p.revents != 0) {
            return Ok(i);
        }
    }
}

/// Serves frontends on `socket` one after another until SIGINT or SIGTERM.
pub fn serve(dev: Arc<Device>, socket: &Path) -> Result<(), ServeError> {
    let signals = SignalPipe::new().map_err(ServeError::Signals)?;
    claim_socket(socket)?;
    let mut listener = Listener::new(socket, true).map_err(|e| ServeError::Listen {
        path: socket.to_path_buf(),
        reason: e.to_string(),
    })?;
    info!("listening on {}", socket.display());

    let result = (|| loop {
        if wait_any(&[listener.as_raw_fd(), signals.fd()]).map_err(ServeError::Poll)? == 1 {
            info!("signal received while idle; exiting");
            return Ok(());
        }
        if serve_one(&dev, &mut listener, &signals)? {
            return Ok(());
        }
    })();

    let flushed = dev.target.flush();
    if let Err(e) = std::fs::remove_file(socket) {
        warn!("cannot remove socket {}: {e}", socket.display());
    }
    result?;
    flushed.map_err(ServeError::FinalFlush)?;
    info!("image flushed; bye");
    Ok(())
}

/// Serves one frontend connection. Returns true when a signal asked the process to exit.
fn serve_one(
    dev: &Arc<Device>,
    listener: &mut Listener,
    signals: &SignalPipe,
) -> Result<bool, ServeError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = BlkBackend::new(dev.clone(), mem.clone());
    let mut daemon = VhostUserDaemon::new("remapblk".to_string(), backend.clone(), mem)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    daemon
        .start(listener)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    info!("frontend connected");

    let shutdown = daemon.shutdown_handle();
    let (done_rx, mut done_tx) = UnixStream::pair().map_err(ServeError::Poll)?;
    let waiter = thread::Builder::new()
        .name("vhost-user-conn".to_string())
        .spawn(move || {
            let result = daemon.wait();
            let _ = done_tx.write_all(&[1]);
            (daemon, result)
        })
        .map_err(|e| ServeError::Daemon(e.to_string()))?;

    let stop = wait_any(&[done_rx.as_raw_fd(), signals.fd()]).map_err(ServeError::Poll)? == 1;
    if stop {
        // Drain before closing the connection: requests the guest already handed us complete
        // and are signalled while the frontend still listens.
        info!("signal received; draining in-flight requests");
        let report = backend.drain_all(Phase::Closed);
        log_drain("exit", &report);
        if let Some(h) = shutdown {
            h.shutdown();
        }
    }

    let (daemon, result) = waiter
        .join()
        .map_err(|_| ServeError::Daemon("connection thread panicked".to_string()))?;
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => info!("frontend disconnected"),
        // Anything else is a protocol violation or a failed request handler: say which.
        Err(e) => warn!("frontend disconnected after an error: {e}"),
    }
    // Whatever the frontend left in flight completes before its memory and rings go away.
    let report = backend.drain_all(Phase::Closed);
    log_drain("disconnect", &report);
    if report.abandoned.is_empty() {
        drop(daemon);
    } else {
        // A worker may still sit in a system call that never returns; joining it would hang
        // the server. Let a detached thread wait for it instead.
        let _ = thread::Builder::new()
            .name("teardown".to_string())
            .spawn(move || drop(daemon));
    }
    Ok(stop)
}

fn log_drain(why: &str, report: &DrainReport) {
    if report.abandoned.is_empty() {
        info!(
            "drain on {why}: waited for {} requests, {:?}",
            report.waited_for, report.duration
        );
    } else {
        error!(
            "drain on {why}: gave up on {} of {} requests after {:?} (completed with IOERR)",
            report.abandoned.len(),
            report.waited_for,
            report.duration
        );
    }
}
