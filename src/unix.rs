//! Unix socket and file-descriptor helpers shared by the vhost-user server and the control
//! socket: claiming a socket path, and waiting for one of several descriptors.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::info;
use thiserror::Error;

use crate::denied;
use crate::filemode::{self, SocketMode};

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket {0} is in use by a running process; stop that process or choose another path")]
    InUse(PathBuf),
    #[error(
        "{0} exists and is not a socket; refusing to replace it. Remove it or choose another path"
    )]
    NotASocket(PathBuf),
    #[error("cannot remove stale socket {path}: {source}{}", denied::advice(.source, .path, denied::CREATE))]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}{}", denied::advice(.source, .path, denied::CREATE))]
    Listen { path: PathBuf, source: io::Error },
    #[error("descriptor {fd} is not a listening unix socket ({reason}); pass the descriptor of one (--fd, or systemd's socket activation), or use --socket PATH")]
    Inherited { fd: RawFd, reason: String },
}

/// Where the vhost-user socket comes from.
pub enum Listen {
    /// Claim this path and listen on it, the socket file made with this mode; the file is
    /// removed at exit.
    Path(PathBuf, SocketMode),
    /// A listening socket the process was handed (`--fd`, systemd socket activation); it is
    /// left as it is at exit, since whoever made it owns its file.
    Inherited(UnixListener),
}

impl Listen {
    /// The socket's path in the filesystem (None for an inherited socket that has none).
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Listen::Path(p, _) => Some(p.clone()),
            Listen::Inherited(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf)),
        }
    }

    /// The listener: claims and binds the path, or takes the inherited socket as it is.
    pub fn open(self) -> Result<UnixListener, SocketError> {
        match self {
            Listen::Path(p, mode) => listen(&p, mode),
            Listen::Inherited(l) => Ok(l),
        }
    }
}

/// Takes descriptor `fd`, which this process was handed by whoever started it, as a listening
/// unix socket, after checking that it is one.
pub fn inherited_listener(fd: RawFd) -> Result<UnixListener, SocketError> {
    let bad = |reason: String| SocketError::Inherited { fd, reason };
    // SAFETY: F_GETFD on any number is harmless; it fails for a descriptor that is not open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad("it is not open".to_string()));
    }
    let int_opt = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(v)
        }
    };
    match int_opt(libc::SO_DOMAIN) {
        Ok(libc::AF_UNIX) => {}
        Ok(d) => return Err(bad(format!("a socket of address family {d}"))),
        Err(e) => return Err(bad(format!("not a socket: {e}"))),
    }
    if int_opt(libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? == 0 {
        return Err(bad("a unix socket that does not listen".to_string()));
    }
    // SAFETY: the descriptor is open, and it was handed to this process to use (the caller's
    // word); nothing else here owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Children of ours (none today) need not hold the disk's socket.
    // SAFETY: F_SETFD on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(UnixListener::from(owned))
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

/// Claims `path` (see [`claim_socket`]) and listens on it, the socket file made with `mode`.
pub fn listen(path: &Path, mode: SocketMode) -> Result<UnixListener, SocketError> {
    claim_socket(path)?;
    filemode::bind_unix(path, mode).map_err(|source| SocketError::Listen {
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
