//! The frontend's end of the socket: vhost-user messages framed by hand (the header, the body,
//! fds as SCM_RIGHTS with the header), so any message can be sent, well-formed or not; replies
//! read and dropped, with any fd they carry closed.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Header flags: the version every message carries, and "a reply is wanted".
pub const VERSION: u32 = 1;
pub const NEED_REPLY: u32 = 8;
pub const GET_FEATURES: u32 = 1;

/// How long one send or receive may take before the backend counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Why the stream cannot go on.
#[derive(Debug)]
pub enum End {
    /// The backend closed the connection (it refused something).
    Closed,
    /// The backend neither read nor answered within [`PATIENCE`].
    Hung(&'static str),
}

pub struct Conn {
    sock: UnixStream,
    /// GET_FEATURES sent whose replies have not come yet: replies arrive in order, so the
    /// backend has handled every message before the one whose reply is read last.
    features_asked: usize,
    /// Raw bytes went out: message boundaries are unknown, so no more barriers.
    desynced: bool,
}

impl Conn {
    pub fn new(sock: UnixStream) -> io::Result<Conn> {
        sock.set_read_timeout(Some(PATIENCE))?;
        sock.set_write_timeout(Some(PATIENCE))?;
        Ok(Conn {
            sock,
            features_asked: 0,
            desynced: false,
        })
    }

    /// Sends a message with `fds` attached to its header.
    pub fn send(&mut self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> Result<(), End> {
        let mut buf = Vec::with_capacity(12 + body.len());
        buf.extend_from_slice(&code.to_le_bytes());
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(body);
        if code == GET_FEATURES {
            self.features_asked += 1;
        }
        let sent = send_with_fds(&self.sock, &buf, fds).map_err(end("send a message"))?;
        self.write_all(&buf[sent..])
    }

    /// Bytes as they are, message boundaries or not.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.desynced = true;
        self.write_all(bytes)
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.sock.write_all(bytes).map_err(end("send a message"))
    }

    /// Returns once the backend has handled every message sent so far (it answered a
    /// GET_FEATURES sent after them), reading and dropping the replies before it.
    pub fn barrier(&mut self) -> Result<(), End> {
        if self.desynced {
            return Ok(());
        }
        self.send(GET_FEATURES, VERSION, &[], &[])?;
        while self.features_asked > 0 {
            if self.read_reply()? == GET_FEATURES {
                self.features_asked -= 1;
            }
        }
        Ok(())
    }

    /// One reply's code; any fd it carries (GET_INFLIGHT_FD's region) is closed.
    fn read_reply(&mut self) -> Result<u32, End> {
        let mut head = [0u8; 12];
        recv_closing_fds(&self.sock, &mut head).map_err(end("read a reply"))?;
        let code = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let size = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        let mut body = vec![0u8; size.min(1 << 16)];
        self.sock
            .read_exact(&mut body)
            .map_err(end("read a reply"))?;
        Ok(code)
    }
}

fn end(what: &'static str) -> impl Fn(io::Error) -> End {
    move |e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => End::Hung(what),
        _ => End::Closed,
    }
}

/// sendmsg(2) of `buf` with `fds` as SCM_RIGHTS, never raising SIGPIPE; how much was sent.
fn send_with_fds(sock: &UnixStream, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is a valid empty one; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one header and `fds` (CMSG_SPACE of their size),
        // 8-aligned; CMSG_FIRSTHDR returns its start, CMSG_DATA the data after the header.
        unsafe {
            let h = libc::CMSG_FIRSTHDR(&msg);
            (*h).cmsg_level = libc::SOL_SOCKET;
            (*h).cmsg_type = libc::SCM_RIGHTS;
            (*h).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(h), fd_bytes);
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` and `cmsg`, which outlive the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads exactly `buf.len()` bytes with recvmsg(2), closing any fd that comes with them.
fn recv_closing_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        let mut cmsg = [0u64; 32];
        // SAFETY: zeroed msghdr is a valid empty one; the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: `msg` points at `iov` (inside `buf`) and `cmsg`, which outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        close_fds(&msg);
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n as usize;
    }
    Ok(())
}

/// Closes the fds an SCM_RIGHTS message brought: they are ours now.
fn close_fds(msg: &libc::msghdr) {
    // SAFETY: walking the control messages recvmsg filled in, within msg_controllen.
    unsafe {
        let mut h = libc::CMSG_FIRSTHDR(msg);
        while !h.is_null() {
            if (*h).cmsg_level == libc::SOL_SOCKET && (*h).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(h);
                let n = ((*h).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..n {
                    let fd = data.add(i * 4).cast::<RawFd>().read_unaligned();
                    libc::close(fd);
                }
            }
            h = libc::CMSG_NXTHDR(msg, h);
        }
    }
}
