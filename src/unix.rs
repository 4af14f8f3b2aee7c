//! Unix socket and file-descriptor helpers shared by the vhost-user server and the control
//! socket: claiming a socket path, and waiting for one of several descriptors.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use log::info;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket {0} is in use by a running process; stop that process or choose another path")]
    InUse(PathBuf),
    #[error(
        "{0} exists and is not a socket; refusing to replace it. Remove it or choose another path"
    )]
    NotASocket(PathBuf),
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
}

/// Claims `path` for listening: a socket file nobody answers on is a leftover of a killed
/// process and is replaced; one that accepts connections belongs to a live process and is not.
pub fn claim_socket(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Listen {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(SocketError::InUse(path.to_path_buf()));
    }
    info!("replacing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
        path: path.to_path_buf(),
        source,
    })
}

/// Claims `path` (see [`claim_socket`]) and listens on it.
pub fn listen(path: &Path) -> Result<std::os::unix::net::UnixListener, SocketError> {
    claim_socket(path)?;
    std::os::unix::net::UnixListener::bind(path).map_err(|source| SocketError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// Blocks until one of `fds` is readable; returns its index.
pub fn wait_any(fds: &[RawFd]) -> io::Result<usize> {
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
