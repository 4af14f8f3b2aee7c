//! Running out of file descriptors. Every connection and session takes descriptors (the
//! connection, its rings' eventfds, guest memory, an epoll and an io_uring per queue), and a
//! process has a limit (RLIMIT_NOFILE). Reaching it must cost one connection, never the server:
//! [`Acceptor`] still takes a connection it cannot serve, so that its peer sees it closed
//! instead of waiting in the backlog and the accept loop does not spin on a listener that
//! stays readable; [`Reserve`] keeps descriptors free for a frontend's messages (the kernel
//! drops descriptors a message carries when the receiver has no room, and the vhost crate
//! then loses the message's framing); [`hint`] says in the log what ran out and what to do.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// Whether `e` says this process (EMFILE) or the system (ENFILE) has no descriptor to give.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// This process's descriptor limit (the soft RLIMIT_NOFILE), when it can be read.
pub fn limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `r` is.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}

/// What to add to the message of an error `e`: when it is a lack of descriptors, what the limit
/// is and what to do about it; else nothing.
pub fn hint(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) => format!(
            " (this process is out of file descriptors, limit {}: raise it with ulimit -n or systemd's LimitNOFILE=, or close other connections)",
            limit().map_or_else(|| "unknown".to_string(), |l| l.to_string())
        ),
        Some(libc::ENFILE) => {
            " (the system is out of file descriptors: see fs.file-max and what holds them)"
                .to_string()
        }
        _ => String::new(),
    }
}

/// Why a connection was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Out of descriptors: the waiting connection was taken and closed at once.
    #[error("a connection was closed unserved: {0}{hint}", hint = hint(.0))]
    Refused(io::Error),
    /// Out of descriptors with none in reserve either (something took the one let go): the
    /// connection waits in the backlog until one is free. `again` when the last accept said so
    /// too, so that the log says it once.
    #[error("cannot accept a connection until a file descriptor is free: {source}{hint}", hint = hint(.source))]
    Waiting { source: io::Error, again: bool },
    #[error("accept failed: {0}")]
    Other(io::Error),
}

impl AcceptError {
    /// Whether this says nothing the log does not have yet.
    pub fn is_repeat(&self) -> bool {
        matches!(self, AcceptError::Waiting { again: true, .. })
    }
}

/// A listening socket's accept with a descriptor kept in reserve for when the process has none
/// left.
pub struct Acceptor {
    listener: UnixListener,
    /// A duplicate of the listener: closed to make room for one accept when the limit is
    /// reached, and taken again after (dup needs no path, so this works in a sandbox too).
    reserve: Option<OwnedFd>,
    /// The last accept found no descriptor, in reserve or not.
    waiting: bool,
}

/// How long to wait before accepting again when there was no descriptor to make room with:
/// the listener stays readable, and retrying at once would spin.
const BACKOFF: Duration = Duration::from_millis(50);

impl Acceptor {
    pub fn new(listener: UnixListener) -> Acceptor {
        let reserve = listener.try_clone().ok().map(OwnedFd::from);
        Acceptor {
            listener,
            reserve,
            waiting: false,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The next connection. Out of descriptors, the waiting connection is accepted on the
    /// reserve's descriptor and closed (its peer learns at once), and the error says so.
    pub fn accept(&mut self) -> Result<UnixStream, AcceptError> {
        let e = match self.listener.accept() {
            Ok((s, _)) => {
                self.waiting = false;
                self.refill();
                return Ok(s);
            }
            Err(e) => e,
        };
        if !is_exhaustion(&e) {
            return Err(AcceptError::Other(e));
        }
        let Some(reserve) = self.reserve.take() else {
            std::thread::sleep(BACKOFF);
            let again = std::mem::replace(&mut self.waiting, true);
            return Err(AcceptError::Waiting { source: e, again });
        };
        drop(reserve);
        drop(self.listener.accept());
        self.refill();
        Err(AcceptError::Refused(e))
    }

    fn refill(&mut self) {
        if self.reserve.is_none() {
            self.reserve = self.listener.try_clone().ok().map(OwnedFd::from);
        }
    }
}

/// Descriptors held so that as many are free when let go: copies (dup) of one the holder owns,
/// so taking them again needs no path and no new kernel object. The copies keep what they copy
/// open (a connection stays connected) until the reserve is dropped.
pub struct Reserve {
    source: OwnedFd,
    held: Vec<OwnedFd>,
    want: usize,
}

impl Reserve {
    /// Takes `want` copies of `of` (and one more to copy from later); fails when the process
    /// has fewer free.
    pub fn take(of: BorrowedFd<'_>, want: usize) -> io::Result<Reserve> {
        let mut r = Reserve {
            source: of.try_clone_to_owned()?,
            held: Vec::with_capacity(want),
            want,
        };
        r.retake()?;
        Ok(r)
    }

    /// Frees them for whatever comes next (a message's descriptors).
    pub fn release(&mut self) {
        self.held.clear();
    }

    /// Takes them again; fails when the process has fewer free, and then holds none.
    pub fn retake(&mut self) -> io::Result<()> {
        while self.held.len() < self.want {
            match self.source.try_clone() {
                Ok(fd) => self.held.push(fd),
                Err(e) => {
                    self.held.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn hints_name_the_limit_only_for_a_lack_of_descriptors() {
        let h = hint(&io::Error::from_raw_os_error(libc::EMFILE));
        assert!(h.contains("out of file descriptors, limit ") && h.contains("ulimit -n"));
        assert!(hint(&io::Error::from_raw_os_error(libc::ENFILE)).contains("system"));
        assert_eq!(hint(&io::Error::from_raw_os_error(libc::EACCES)), "");
    }

    #[test]
    fn a_reserve_holds_its_descriptors_until_released() {
        let (a, _b) = UnixStream::pair().unwrap();
        let count = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        // Other tests open and close descriptors meanwhile: compare with margins.
        let before = count();
        let mut r = Reserve::take(a.as_fd(), 200).unwrap();
        assert!(count() >= before + 150);
        r.release();
        assert!(count() < before + 50);
        r.retake().unwrap();
        assert!(count() >= before + 150);
        drop(r);
        assert!(count() < before + 50);
    }
}
