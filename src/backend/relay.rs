//! The frontend's connection is relayed, message by message, to the backend session behind it
//! (the vhost-user-backend daemon on an internal socket). The relay only frames messages and
//! passes their file descriptors along; it looks at one thing: a second SET_OWNER on the same
//! connection. QEMU sends that when a vhost-user-blk device is re-added with `device_add` on a
//! chardev it kept open, and the backend crate refuses it ("already claimed"). Instead of
//! dropping the connection, which races with QEMU's own reconnect logic and can leave the new
//! device dead, the server ends the session (drained like any other) and starts a fresh one
//! for the same connection. QEMU negotiates features before SET_OWNER, so the fresh session
//! is first given the latest negotiation messages again, their replies swallowed.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size, all u32 little endian.
const HEADER_LEN: usize = 12;
/// The vhost crate's limit; anything longer is not a vhost-user message.
const MAX_PAYLOAD: usize = 0x1000;
const MAX_FDS: usize = 32;
const REQ_GET_FEATURES: u32 = 1;
const REQ_SET_OWNER: u32 = 3;
const REQ_GET_PROTOCOL_FEATURES: u32 = 15;
const REQ_SET_PROTOCOL_FEATURES: u32 = 16;
const REQ_SET_BACKEND_REQ_FD: u32 = 21;
/// Messages that set per-connection protocol state, in the order a fresh session needs them.
const NEGOTIATION: [u32; 4] = [
    REQ_GET_FEATURES,
    REQ_GET_PROTOCOL_FEATURES,
    REQ_SET_PROTOCOL_FEATURES,
    REQ_SET_BACKEND_REQ_FD,
];
const FLAG_NEED_REPLY: u32 = 0x8;

/// One whole message with the descriptors that came with it.
pub struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }

    /// A copy (descriptors duplicated) that asks for no acknowledgement.
    fn replayable(&self) -> io::Result<Message> {
        let mut bytes = self.bytes.clone();
        let flags = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) & !FLAG_NEED_REPLY;
        bytes[4..8].copy_from_slice(&flags.to_le_bytes());
        let fds = self
            .fds
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Message { bytes, fds })
    }

    /// Whether the backend answers this (replayable) message.
    fn has_reply(&self) -> bool {
        matches!(self.request(), REQ_GET_FEATURES | REQ_GET_PROTOCOL_FEATURES)
    }

    fn send(&self, to: &UnixStream) -> io::Result<()> {
        let raw: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut sent = to.send_with_fds(&[&self.bytes[..]], &raw)?;
        // The descriptors travelled with the first bytes; the rest (rare) goes plainly.
        while sent < self.bytes.len() {
            sent += (&*to).write(&self.bytes[sent..])?;
        }
        Ok(())
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream before a new message.
pub fn read_message(from: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `header`, valid for HEADER_LEN bytes.
    let (got, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg handed us ownership of the first `nfds` descriptors.
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    (&*from).read_exact(&mut header[got..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message claims a {size}-byte payload; not vhost-user"),
        ));
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + size);
    bytes.extend_from_slice(&header);
    bytes.resize(HEADER_LEN + size, 0);
    (&*from).read_exact(&mut bytes[HEADER_LEN..])?;
    Ok(Some(Message { bytes, fds }))
}

/// Why a relayed session ended.
pub enum SessionEnd {
    /// The frontend closed its connection (or sent something that is not vhost-user).
    FrontendClosed(Option<io::Error>),
    /// The backend closed its side: it refused a message.
    BackendClosed,
    /// The frontend started over with SET_OWNER; the message is to be replayed to a fresh
    /// session.
    Restart(Message),
}

/// The latest negotiation messages the frontend sent on its connection.
#[derive(Default)]
pub struct Negotiation {
    latest: Vec<Message>,
}

impl Negotiation {
    fn remember(&mut self, msg: &Message) {
        if !NEGOTIATION.contains(&msg.request()) {
            return;
        }
        match msg.replayable() {
            Ok(copy) => {
                self.latest.retain(|m| m.request() != msg.request());
                self.latest.push(copy);
                self.latest
                    .sort_by_key(|m| NEGOTIATION.iter().position(|r| *r == m.request()));
            }
            Err(e) => log::warn!("cannot keep a copy of negotiation message: {e}"),
        }
    }
}

/// Relays between `frontend` and `backend` until one side ends or the frontend re-sends
/// SET_OWNER. `owner_seen`: this session already got its SET_OWNER (a replayed one).
pub fn relay(
    frontend: &UnixStream,
    backend: &UnixStream,
    negotiation: &mut Negotiation,
    mut owner_seen: bool,
) -> SessionEnd {
    loop {
        let which = match crate::unix::wait_any(&[frontend.as_raw_fd(), backend.as_raw_fd()]) {
            Ok(i) => i,
            Err(e) => return SessionEnd::FrontendClosed(Some(e)),
        };
        if which == 0 {
            let msg = match read_message(frontend) {
                Ok(Some(m)) => m,
                Ok(None) => return SessionEnd::FrontendClosed(None),
                Err(e) => return SessionEnd::FrontendClosed(Some(e)),
            };
            if msg.request() == REQ_SET_OWNER {
                if owner_seen {
                    return SessionEnd::Restart(msg);
                }
                owner_seen = true;
            }
            negotiation.remember(&msg);
            log::debug!(
                "vhost-user: frontend request {} flags {:#x} ({} bytes, {} fds) {:02x?}",
                msg.request(),
                u32::from_le_bytes([msg.bytes[4], msg.bytes[5], msg.bytes[6], msg.bytes[7]]),
                msg.bytes.len() - HEADER_LEN,
                msg.fds.len(),
                &msg.bytes[HEADER_LEN..msg.bytes.len().min(HEADER_LEN + 16)]
            );
            if msg.send(backend).is_err() {
                return SessionEnd::BackendClosed;
            }
        } else {
            match read_message(backend) {
                Ok(Some(m)) => {
                    log::debug!("vhost-user: backend reply to request {}", m.request());
                    if let Err(e) = m.send(frontend) {
                        return SessionEnd::FrontendClosed(Some(e));
                    }
                }
                Ok(None) | Err(_) => return SessionEnd::BackendClosed,
            }
        }
    }
}

/// Gives a fresh session the connection's negotiation, then the message that ended the
/// previous session, then relays.
pub fn replay_and_relay(
    msg: &Message,
    frontend: &UnixStream,
    backend: &UnixStream,
    negotiation: &mut Negotiation,
) -> SessionEnd {
    for m in &negotiation.latest {
        if m.send(backend).is_err() {
            return SessionEnd::BackendClosed;
        }
        // The frontend had its answer long ago.
        if m.has_reply() && !matches!(read_message(backend), Ok(Some(_))) {
            return SessionEnd::BackendClosed;
        }
    }
    if msg.send(backend).is_err() {
        return SessionEnd::BackendClosed;
    }
    relay(
        frontend,
        backend,
        negotiation,
        msg.request() == REQ_SET_OWNER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn header(req: u32, size: u32) -> Vec<u8> {
        let mut h = req.to_le_bytes().to_vec();
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn message_with_fd_crosses_intact() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello").unwrap();
        let mut bytes = header(5, 8);
        bytes.extend_from_slice(&42u64.to_le_bytes());
        a.send_with_fds(&[&bytes[..]], &[f.as_raw_fd()]).unwrap();
        let m = read_message(&b).unwrap().unwrap();
        assert_eq!(m.bytes, bytes);
        assert_eq!(m.fds.len(), 1);
        let mut g = std::fs::File::from(m.fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn oversized_payload_is_rejected_and_eof_is_clean() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&header(1, 1 << 20)).unwrap();
        assert!(read_message(&b).is_err());
        drop(a);
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(read_message(&b).unwrap().is_none());
    }

    #[test]
    fn second_set_owner_restarts_the_session() {
        let (front, front_peer) = UnixStream::pair().unwrap();
        let (back, back_peer) = UnixStream::pair().unwrap();
        (&front_peer).write_all(&header(REQ_SET_OWNER, 0)).unwrap();
        (&front_peer).write_all(&header(1, 0)).unwrap();
        (&front_peer).write_all(&header(REQ_SET_OWNER, 0)).unwrap();
        let mut neg = Negotiation::default();
        match relay(&front, &back, &mut neg, false) {
            SessionEnd::Restart(m) => assert_eq!(m.request(), REQ_SET_OWNER),
            _ => panic!("expected a restart"),
        }
        // The first two messages reached the backend; GET_FEATURES is kept for a replay.
        assert_eq!(
            read_message(&back_peer).unwrap().unwrap().request(),
            REQ_SET_OWNER
        );
        assert_eq!(read_message(&back_peer).unwrap().unwrap().request(), 1);
        assert_eq!(neg.latest.len(), 1);
    }

    #[test]
    fn replay_gives_negotiation_first_and_swallows_replies() {
        let (front, _front_peer) = UnixStream::pair().unwrap();
        let (back, back_peer) = UnixStream::pair().unwrap();
        let mut neg = Negotiation::default();
        let mut set_pf = header(REQ_SET_PROTOCOL_FEATURES, 8);
        set_pf[4..8].copy_from_slice(&(1 | FLAG_NEED_REPLY).to_le_bytes());
        set_pf.extend_from_slice(&0x200u64.to_le_bytes());
        for bytes in [set_pf, header(REQ_GET_FEATURES, 0)] {
            neg.remember(&Message { bytes, fds: vec![] });
        }
        let owner = Message {
            bytes: header(REQ_SET_OWNER, 0),
            fds: vec![],
        };
        // A fake backend: answers GET_FEATURES, then closes after SET_OWNER.
        let peer = std::thread::spawn(move || {
            let mut seen = vec![];
            while let Ok(Some(m)) = read_message(&back_peer) {
                let flags = u32::from_le_bytes(m.bytes[4..8].try_into().unwrap());
                seen.push((m.request(), flags & FLAG_NEED_REPLY));
                if m.request() == REQ_GET_FEATURES {
                    (&back_peer)
                        .write_all(&header(REQ_GET_FEATURES, 8))
                        .unwrap();
                    (&back_peer).write_all(&[0; 8]).unwrap();
                }
                if m.request() == REQ_SET_OWNER {
                    break;
                }
            }
            seen
        });
        assert!(matches!(
            replay_and_relay(&owner, &front, &back, &mut neg),
            SessionEnd::BackendClosed
        ));
        assert_eq!(
            peer.join().unwrap(),
            vec![
                (REQ_GET_FEATURES, 0),
                (REQ_SET_PROTOCOL_FEATURES, 0),
                (REQ_SET_OWNER, 0)
            ]
        );
    }
}
