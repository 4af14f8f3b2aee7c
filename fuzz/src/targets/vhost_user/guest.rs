//! The guest a well-behaved frontend drives: one memfd of guest memory with two split rings
//! laid out in it, the setup QEMU sends (owner, features, memory table, rings), requests put in
//! a ring and kicked, and their completion awaited through the used ring.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use vhost::vhost_user::message::{
    VhostUserMemory, VhostUserMemoryRegion, VhostUserU64, VhostUserVringAddr,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vm_memory::ByteValued;

use super::wire::{Conn, End, PATIENCE, VERSION};

/// Guest memory: the pool's memfd [`super::Pool::GUEST`], at guest address 0, mapped by the
/// "frontend" at [`USER_ADDR`] (ring addresses come as frontend addresses).
pub const MEM_SIZE: u64 = 1 << 20;
pub const USER_ADDR: u64 = 0x7f00_0000_0000;
pub const QSIZE: u16 = 64;
pub const RINGS: usize = 2;
/// Descriptors per request (header, data, status).
const PER_REQ: u16 = 3;
/// Requests a ring holds at once.
pub const SLOTS: u16 = QSIZE / PER_REQ;
pub const BUF: u64 = 4096;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

pub fn desc(r: usize) -> u64 {
    r as u64 * 0x1_0000
}
pub fn avail(r: usize) -> u64 {
    desc(r) + 0x4000
}
pub fn used(r: usize) -> u64 {
    desc(r) + 0x8000
}
fn header(r: usize, s: u16) -> u64 {
    0x2_0000 + r as u64 * 0x1000 + u64::from(s) * 16
}
fn status(r: usize, s: u16) -> u64 {
    0x3_0000 + r as u64 * 0x100 + u64::from(s)
}
pub fn data(r: usize, s: u16) -> u64 {
    0x4_0000 + r as u64 * 0x4_0000 + u64::from(s) * BUF
}

/// How far the setup goes before the fuzzed actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Setup {
    Nothing,
    Owner,
    /// Owner, features, protocol features, memory table.
    Memory,
    /// And both rings started and enabled.
    Running,
}

/// The fds of the pool the setup uses.
pub struct Fds {
    pub guest: RawFd,
    /// Kick and call eventfd of each ring.
    pub kick: [RawFd; RINGS],
    pub call: [RawFd; RINGS],
}

/// The messages of `setup`, each acknowledged (a barrier after each) before the next.
pub fn setup(
    c: &mut Conn,
    setup: Setup,
    fds: &Fds,
    features: u64,
    protocol: u64,
) -> Result<(), End> {
    if setup == Setup::Nothing {
        return Ok(());
    }
    c.send(3, VERSION, &[], &[])?; // SET_OWNER
    if setup == Setup::Owner {
        return c.barrier();
    }
    c.send(2, VERSION, VhostUserU64::new(features).as_slice(), &[])?; // SET_FEATURES
    c.send(16, VERSION, VhostUserU64::new(protocol).as_slice(), &[])?; // SET_PROTOCOL_FEATURES
    let mut table = VhostUserMemory::new(1).as_slice().to_vec();
    table.extend_from_slice(VhostUserMemoryRegion::new(0, MEM_SIZE, USER_ADDR, 0).as_slice());
    c.send(5, VERSION, &table, &[fds.guest])?; // SET_MEM_TABLE
    c.barrier()?;
    if setup == Setup::Memory {
        return Ok(());
    }
    for r in 0..RINGS {
        let state = |num: u32| VhostUserVringState::new(r as u32, num);
        c.send(8, VERSION, state(u32::from(QSIZE)).as_slice(), &[])?; // SET_VRING_NUM
        let addr = VhostUserVringAddr::new(
            r as u32,
            VhostUserVringAddrFlags::empty(),
            USER_ADDR + desc(r),
            USER_ADDR + used(r),
            USER_ADDR + avail(r),
            0,
        );
        c.send(9, VERSION, addr.as_slice(), &[])?; // SET_VRING_ADDR
        c.send(10, VERSION, state(0).as_slice(), &[])?; // SET_VRING_BASE
        let index = VhostUserU64::new(r as u64);
        c.send(13, VERSION, index.as_slice(), &[fds.call[r]])?; // SET_VRING_CALL
        c.send(12, VERSION, index.as_slice(), &[fds.kick[r]])?; // SET_VRING_KICK
        c.send(18, VERSION, state(1).as_slice(), &[])?; // SET_VRING_ENABLE
    }
    c.barrier()
}

/// A request as a driver puts it in ring `r`: header, one data buffer, status, at the avail
/// ring's index `idx`; the caller kicks.
pub fn put_request(mem: &File, r: usize, idx: u16, slot: u16, write: bool, sector: u64, len: u32) {
    let slot = slot % SLOTS;
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    let _ = mem.write_all_at(&h, header(r, slot));
    let _ = mem.write_all_at(&[0xff], status(r, slot));
    let first = slot * PER_REQ;
    let parts = [
        (header(r, slot), 16, 0),
        (data(r, slot), len, if write { 0 } else { F_WRITE }),
        (status(r, slot), 1, F_WRITE),
    ];
    for (i, (addr, len, flags)) in parts.into_iter().enumerate() {
        let next = first + i as u16 + 1;
        let flags = if i < 2 { flags | F_NEXT } else { flags };
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_all_at(&d, desc(r) + u64::from(first + i as u16) * 16);
    }
    let at = avail(r) + 4 + u64::from(idx % QSIZE) * 2;
    let _ = mem.write_all_at(&first.to_le_bytes(), at);
    let _ = mem.write_all_at(&idx.wrapping_add(1).to_le_bytes(), avail(r) + 2);
}

pub fn kick(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: write(2) of 8 bytes from a local to an fd of the pool.
    unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
}

fn used_idx(mem: &File, r: usize) -> u16 {
    let mut b = [0u8; 2];
    let _ = mem.read_exact_at(&mut b, used(r) + 2);
    u16::from_le_bytes(b)
}

/// Waits until ring `r`'s used index reaches `want`, on its call eventfd, for at most
/// [`PATIENCE`].
fn wait_used(mem: &File, call: RawFd, r: usize, want: u16) -> Result<(), String> {
    let start = Instant::now();
    while used_idx(mem, r) != want {
        let left = PATIENCE.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!(
                "ring {r}: used index {} after {} s, the request made it {want}",
                used_idx(mem, r),
                PATIENCE.as_secs()
            ));
        }
        let mut p = libc::pollfd {
            fd: call,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd on the stack; then a read(2) into a local clears it.
        unsafe {
            libc::poll(&mut p, 1, left.as_millis().min(100) as i32);
            let mut v = [0u8; 8];
            libc::read(call, v.as_mut_ptr().cast(), 8);
        }
    }
    Ok(())
}

/// A fresh frontend on `c` sets the device up and writes then reads back 4 KiB on ring 0:
/// the data must come back, both statuses OK.
pub fn serves_a_request(
    c: &mut Conn,
    mem: &File,
    fds: &Fds,
    features: u64,
    protocol: u64,
    tag: u64,
) -> Result<(), String> {
    setup(c, Setup::Running, fds, features, protocol)
        .map_err(|e| format!("the setup of a well-formed frontend failed: {e:?}"))?;
    let pattern: Vec<u8> = (0..BUF).map(|i| (i.wrapping_mul(31) ^ tag) as u8).collect();
    let _ = mem.write_all_at(&pattern, data(0, 0));
    put_request(mem, 0, 0, 0, true, 8, BUF as u32);
    kick(fds.kick[0]);
    wait_used(mem, fds.call[0], 0, 1)?;
    put_request(mem, 0, 1, 1, false, 8, BUF as u32);
    kick(fds.kick[0]);
    wait_used(mem, fds.call[0], 0, 2)?;
    for slot in [0, 1] {
        let mut s = [0u8; 1];
        let _ = mem.read_exact_at(&mut s, status(0, slot));
        if s[0] != 0 {
            return Err(format!("request {slot} completed with status {}", s[0]));
        }
    }
    let mut back = vec![0u8; BUF as usize];
    let _ = mem.read_exact_at(&mut back, data(0, 1));
    if back != pattern {
        return Err("the data read back is not the data written".to_string());
    }
    Ok(())
}
