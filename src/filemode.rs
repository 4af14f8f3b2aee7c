//! The permissions of what remapblk creates. Whoever can connect to the vhost-user socket can
//! read and write the disk, and whoever can connect to the control socket can fail or freeze
//! it, so both sockets are made 0600 (only this process's user) unless `--socket-mode` says
//! otherwise; the spare file (guest data) and the event log are created 0600. Files and
//! sockets that already exist, or that this process inherited, keep the mode they have.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::str::FromStr;

/// The mode of the files remapblk creates (the spare file, the event log).
pub const PRIVATE_FILE: u32 = 0o600;

/// The mode of a socket remapblk binds (`--socket-mode`): permission bits only, and the owner
/// may always read and write (connecting needs write permission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    fn default() -> SocketMode {
        SocketMode(0o600)
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl FromStr for SocketMode {
    type Err = String;

    /// Three or four octal digits, as chmod takes them: `0600`, `660`.
    fn from_str(s: &str) -> Result<SocketMode, String> {
        let valid = "a mode is 3 or 4 octal digits as chmod takes them, e.g. 0600 (the owner only) or 0660 (owner and group)";
        let digits = s.trim();
        if !(3..=4).contains(&digits.len()) || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(format!("'{s}' is not a file mode; {valid}"));
        }
        let bits = u32::from_str_radix(digits, 8).map_err(|e| format!("'{s}': {e}; {valid}"))?;
        if bits > 0o777 {
            return Err(format!(
                "'{s}' sets bits beyond the permissions (setuid, setgid or sticky), which mean nothing on a socket; {valid}"
            ));
        }
        if bits & 0o600 != 0o600 {
            return Err(format!(
                "mode '{s}' does not let the owner read and write the socket, so the server's own user could not connect; give the owner 6, e.g. 0600 or 0660"
            ));
        }
        Ok(SocketMode(bits))
    }
}

/// Binds a unix socket at `path` with mode `mode` and listens on it. The socket file never has
/// more permissions than `mode`, not even for an instant: the mode is set on the socket before
/// bind (Linux creates the file with it, less the umask), and the umask's part after.
pub fn bind_unix(path: &Path, mode: SocketMode) -> io::Result<UnixListener> {
    let listener = bind_masked(path, mode)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.bits()))?;
    Ok(listener)
}

/// `bind_unix` up to the final chmod: the file has `mode` less the umask.
fn bind_masked(path: &Path, mode: SocketMode) -> io::Result<UnixListener> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, valid when zeroed.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a unix socket path must be 1 to {} bytes without NUL bytes; use a shorter path",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers.
    let fd =
        check(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on a descriptor we own reads no memory.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode.bits() as libc::mode_t) })?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a sockaddr_un whose first `len` bytes hold the family and the
    // NUL-terminated path; bind reads no more than `len` bytes of it.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on a descriptor we own takes no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn modes_parse_as_chmod_takes_them_and_bad_ones_say_what_a_mode_is() {
        assert_eq!("0600".parse(), Ok(SocketMode(0o600)));
        assert_eq!("660".parse(), Ok(SocketMode(0o660)));
        assert_eq!("0777".parse(), Ok(SocketMode(0o777)));
        assert_eq!(SocketMode(0o660).to_string(), "0660");
        assert_eq!(SocketMode::default().to_string(), "0600");
        for bad in ["", "60", "0o660", "0690", "rw-rw----", "00660", "-660"] {
            let e = bad.parse::<SocketMode>().unwrap_err();
            assert!(e.contains("3 or 4 octal digits"), "{bad}: {e}");
        }
        let e = "4660".parse::<SocketMode>().unwrap_err();
        assert!(e.contains("setuid"), "{e}");
        for no_owner in ["0060", "0400", "0200", "0066"] {
            let e = no_owner.parse::<SocketMode>().unwrap_err();
            assert!(e.contains("owner read and write"), "{no_owner}: {e}");
        }
    }

    #[test]
    fn a_socket_never_has_more_than_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        // Before the final chmod: at most the mode (a plain bind would give 0777 less the
        // umask).
        let p = dir.path().join("masked.sock");
        let _l = bind_masked(&p, SocketMode(0o600)).unwrap();
        assert_eq!(mode_of(&p) & !0o600, 0, "{:o}", mode_of(&p));
        // After it: exactly the mode, whatever the umask took away.
        for mode in [0o600, 0o660, 0o666] {
            let p = dir.path().join(format!("{mode:o}.sock"));
            let l = bind_unix(&p, SocketMode(mode)).unwrap();
            assert_eq!(mode_of(&p), mode);
            let _c = UnixStream::connect(&p).unwrap();
            l.accept().unwrap();
        }
        let long = dir.path().join("x".repeat(200));
        let e = bind_unix(&long, SocketMode::default()).unwrap_err();
        assert!(e.to_string().contains("shorter path"), "{e}");
    }
}
