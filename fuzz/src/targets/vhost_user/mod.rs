//! The vhost-user handler as `serve` runs it for each connection
//! (`backend::handle_requests`), over a socket pair, fed arbitrary message streams: any
//! message code with a body of its natural shape (or any bytes), fds attached from a pool
//! (memfds of several sizes, eventfds, a pipe, /dev/null, a regular file, a socket), after a
//! setup that goes as far as the input says (nothing, owner, memory, running rings), mixed with
//! requests put in the rings, kicks, writes to the memfds and raw bytes.
//!
//! What must hold after each stream: no panic in any thread; the handler ends within its
//! patience once the frontend closes; a well-formed frontend on a fresh connection then sets
//! the device up and writes and reads back 4 KiB; the process has as many fds and threads as
//! before the stream.

mod guest;
mod wire;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use remapblk::backend::{handle_requests, Device, DeviceConfig, Live, Polling};
use remapblk::events::EventLog;
use remapblk::io::EngineKind;
use remapblk::storage::{Image, OpenOptions};
use vhost::vhost_user::message::{
    VhostUserConfig, VhostUserConfigFlags, VhostUserInflight, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64,
    VhostUserVirtioFeatures, VhostUserVringAddr, VhostUserVringAddrFlags, VhostUserVringState,
};
use vm_memory::ByteValued;

use super::scratch;
use guest::{Fds, Setup};
use wire::{Conn, End, NEED_REPLY, PATIENCE, VERSION};

const CAPACITY: u64 = 1 << 20;
const NUM_QUEUES: u16 = guest::RINGS as u16;
/// The first byte of an input that is raw bytes for the socket (the seeds of that kind are a
/// well-formed setup's bytes).
const RAW: u8 = b'R';
/// The event-idx feature bit: left out of the setup, so every completion signals.
const EVENT_IDX: u64 = 1 << 29;

/// The fds messages carry, by index (what `Pool::new` opens, in order).
struct Pool {
    fds: Vec<File>,
    /// Sizes of the memfds at indexes 0..MEMFDS.
    memfd_sizes: [u64; MEMFDS],
}

const MEMFDS: usize = 5;
impl Pool {
    /// The guest memory memfd.
    const GUEST: usize = 3;
    /// Eventfds: kick and call of ring 0, then of ring 1, then two spare.
    const EVENTFDS: usize = MEMFDS;
    const N_EVENTFDS: usize = 6;

    fn new() -> Pool {
        let memfd_sizes = [0, 4096, 0x1_0000, guest::MEM_SIZE, 0x20_1000];
        let mut fds = Vec::new();
        for size in memfd_sizes {
            // SAFETY: memfd_create with a NUL-terminated name.
            let fd =
                unsafe { libc::memfd_create(c"remapblk-fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: the descriptor memfd_create just returned, owned by nobody else.
            let f = unsafe { File::from_raw_fd(fd) };
            f.set_len(size).expect("size a memfd");
            fds.push(f);
        }
        for _ in 0..Self::N_EVENTFDS {
            // SAFETY: eventfd(2) with flags only.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
            // SAFETY: as above.
            fds.push(unsafe { File::from_raw_fd(fd) });
        }
        let mut pipe = [0; 2];
        // SAFETY: pipe2(2) fills the two ints.
        let made = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(made, 0, "pipe2: {}", std::io::Error::last_os_error());
        for fd in pipe {
            // SAFETY: the descriptors pipe2 just returned.
            fds.push(unsafe { File::from_raw_fd(fd) });
        }
        fds.push(File::open("/dev/null").expect("open /dev/null"));
        let regular = scratch::dir().join("regular");
        fds.push(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(regular)
                .expect("create a regular file"),
        );
        let (a, b) = UnixStream::pair().expect("socketpair");
        fds.push(File::from(std::os::fd::OwnedFd::from(a)));
        fds.push(File::from(std::os::fd::OwnedFd::from(b)));
        Pool { fds, memfd_sizes }
    }

    fn fd(&self, i: usize) -> RawFd {
        self.fds[i % self.fds.len()].as_raw_fd()
    }

    fn guest(&self) -> &File {
        &self.fds[Self::GUEST]
    }

    /// Zeroes the memfds and empties the eventfds and the pipe: each input starts alike.
    fn reset(&self) {
        for (f, &size) in self.fds.iter().zip(&self.memfd_sizes) {
            let _ = f.set_len(0);
            let _ = f.set_len(size);
        }
        let mut buf = [0u8; 64];
        for i in Self::EVENTFDS..Self::EVENTFDS + Self::N_EVENTFDS + 1 {
            // SAFETY: a non-blocking read(2) into a local buffer.
            unsafe { libc::read(self.fd(i), buf.as_mut_ptr().cast(), buf.len()) };
        }
    }

    fn ring_fds(&self) -> Fds {
        let e = |i: usize| self.fd(Self::EVENTFDS + i);
        Fds {
            guest: self.fd(Self::GUEST),
            kick: [e(0), e(2)],
            call: [e(1), e(3)],
        }
    }
}

struct State {
    dev: Arc<Device>,
    live: Arc<Live>,
    pool: Pool,
    features: u64,
    protocol: u64,
    /// One input at a time (libFuzzer may run several threads).
    lock: Mutex<u64>,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        // A frontend that disappears must not kill the process (as in `remapblk serve`, whose
        // Rust runtime ignores SIGPIPE; libFuzzer's does not).
        // SAFETY: setting a signal disposition to ignore.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let image = Image::open(&OpenOptions {
            path: scratch::dir().join("image"),
            size: Some(CAPACITY),
            default_size: CAPACITY,
            readonly: false,
            direct: false,
        })
        .expect("create the image");
        let engine = if EngineKind::IoUring.probe().is_ok() {
            EngineKind::IoUring
        } else {
            EngineKind::Sync
        };
        let mut serial = [0u8; remapblk::virtio::ID_BYTES];
        serial[..4].copy_from_slice(b"fuzz");
        let dev = Arc::new(Device::new(
            DeviceConfig {
                image: "fuzz".into(),
                capacity: CAPACITY,
                block_size: 512,
                readonly: false,
                serial,
                num_queues: NUM_QUEUES,
                queue_size: 256,
                drain_timeout: Duration::from_secs(1),
                engine,
                poll: Polling::default(),
            },
            Arc::new(image),
        ));
        let features = dev.features() & !EVENT_IDX & !VhostUserVirtioFeatures::LOG_ALL.bits();
        let protocol = dev.protocol_features().bits();
        State {
            live: Arc::new(Live::new(Arc::new(EventLog::disabled()))),
            dev,
            pool: Pool::new(),
            features,
            protocol,
            lock: Mutex::new(0),
        }
    })
}

/// A number likely to sit on a boundary of what the handler checks.
#[derive(Debug, Clone, Copy)]
struct Num(u64);

impl<'a> Arbitrary<'a> for Num {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Num> {
        let small = |u: &mut Unstructured<'a>| -> arbitrary::Result<u64> {
            Ok(u64::from(u8::arbitrary(u)?))
        };
        Ok(Num(match u8::arbitrary(u)? {
            0..=99 => small(u)?,
            100..=179 => {
                let shift = u8::arbitrary(u)? % 64;
                let v = 1u64 << shift;
                match u8::arbitrary(u)? % 3 {
                    0 => v,
                    1 => v - 1,
                    _ => v + 1,
                }
            }
            180..=219 => [guest::MEM_SIZE, guest::USER_ADDR, 4096, 0x1_0000, 0x20_1000]
                [usize::from(u8::arbitrary(u)?) % 5]
                .wrapping_add(small(u)?.wrapping_sub(128)),
            _ => u64::arbitrary(u)?,
        }))
    }
}

/// One message: its code, header flags, body and fds.
#[derive(Debug)]
struct Msg {
    code: u32,
    flags: u32,
    body: Vec<u8>,
    /// Indexes into the pool.
    fds: Vec<usize>,
}

/// The fd a message about memory naturally carries, or an eventfd for a ring.
fn natural_memfd(u: &mut Unstructured) -> arbitrary::Result<usize> {
    Ok(match u8::arbitrary(u)? {
        0..=199 => Pool::GUEST,
        n => usize::from(n) % MEMFDS,
    })
}

fn ring(u: &mut Unstructured) -> arbitrary::Result<u32> {
    Ok(match u8::arbitrary(u)? {
        0..=239 => u32::from(u8::arbitrary(u)? % 3),
        _ => u32::arbitrary(u)?,
    })
}

fn region(u: &mut Unstructured) -> arbitrary::Result<VhostUserMemoryRegion> {
    // Mostly the guest memory as the setup gives it, one field changed.
    let mut f = [0, guest::MEM_SIZE, guest::USER_ADDR, 0];
    match u8::arbitrary(u)? {
        0..=63 => {}
        n => f[usize::from(n) % 4] = Num::arbitrary(u)?.0,
    }
    if bool::arbitrary(u)? {
        f[0] = Num::arbitrary(u)?.0;
    }
    Ok(VhostUserMemoryRegion::new(f[0], f[1], f[2], f[3]))
}

fn vring_fd(u: &mut Unstructured, fds: &mut Vec<usize>) -> arbitrary::Result<Vec<u8>> {
    let index = ring(u)?;
    let nofd = u8::arbitrary(u)? >= 224;
    if !nofd {
        fds.push(Pool::EVENTFDS + usize::from(u8::arbitrary(u)?) % Pool::N_EVENTFDS);
    }
    Ok(
        VhostUserU64::new(u64::from(index) | if nofd { 0x100 } else { 0 })
            .as_slice()
            .to_vec(),
    )
}

impl<'a> Arbitrary<'a> for Msg {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Msg> {
        const CODES: [u32; 27] = [
            8, 9, 10, 11, 12, 13, 18, 1, 2, 3, 4, 5, 6, 7, 14, 15, 16, 17, 24, 25, 31, 32, 34, 35,
            36, 37, 38,
        ];
        let code = match u8::arbitrary(u)? {
            0..=239 => CODES[usize::from(u8::arbitrary(u)?) % CODES.len()],
            250.. => u32::arbitrary(u)?,
            n => u32::from(n - 200),
        };
        let flags = match u8::arbitrary(u)? {
            0..=209 => VERSION,
            210..=249 => VERSION | NEED_REPLY,
            _ => u32::arbitrary(u)?,
        };
        let mut fds = Vec::new();
        let u64_body = |v: u64| VhostUserU64::new(v).as_slice().to_vec();
        let vring_state = |u: &mut Unstructured<'a>| -> arbitrary::Result<Vec<u8>> {
            Ok(
                VhostUserVringState::new(ring(u)?, Num::arbitrary(u)?.0 as u32)
                    .as_slice()
                    .to_vec(),
            )
        };
        let body = match code {
            2 => {
                let f = state().features;
                u64_body(match u8::arbitrary(u)? {
                    0..=199 => f & u64::arbitrary(u)? | f & !EVENT_IDX,
                    _ => u64::arbitrary(u)?,
                })
            }
            16 => u64_body(state().protocol & u64::arbitrary(u)?),
            39 => u64_body(Num::arbitrary(u)?.0),
            5 => {
                let n = usize::from(u8::arbitrary(u)? % 4);
                let mut b = VhostUserMemory::new(n as u32).as_slice().to_vec();
                for _ in 0..n {
                    b.extend_from_slice(region(u)?.as_slice());
                    fds.push(natural_memfd(u)?);
                }
                b
            }
            37 | 38 => {
                let r = region(u)?;
                if code == 37 {
                    fds.push(natural_memfd(u)?);
                }
                VhostUserSingleMemoryRegion::new(
                    r.guest_phys_addr,
                    r.memory_size,
                    r.user_addr,
                    r.mmap_offset,
                )
                .as_slice()
                .to_vec()
            }
            6 => {
                fds.push(natural_memfd(u)?);
                VhostUserLog::new(Num::arbitrary(u)?.0, Num::arbitrary(u)?.0)
                    .as_slice()
                    .to_vec()
            }
            7 => {
                fds.push(natural_memfd(u)?);
                Vec::new()
            }
            8 | 10 | 11 | 18 | 35 => vring_state(u)?,
            9 => {
                let mut a = [guest::desc(0), guest::used(0), guest::avail(0), 0]
                    .map(|x| x + guest::USER_ADDR);
                if bool::arbitrary(u)? {
                    let i = usize::from(u8::arbitrary(u)?) % 4;
                    a[i] = Num::arbitrary(u)?.0;
                }
                let flags = if u8::arbitrary(u)? >= 240 {
                    VhostUserVringAddrFlags::VHOST_VRING_F_LOG
                } else {
                    VhostUserVringAddrFlags::empty()
                };
                VhostUserVringAddr::new(ring(u)?, flags, a[0], a[1], a[2], a[3])
                    .as_slice()
                    .to_vec()
            }
            12..=14 => vring_fd(u, &mut fds)?,
            24 | 25 => {
                let offset = u32::from(u8::arbitrary(u)? % 64);
                let size = u32::from(u8::arbitrary(u)? % 64);
                let mut b = VhostUserConfig::new(
                    offset,
                    size,
                    VhostUserConfigFlags::from_bits_truncate(u32::from(u8::arbitrary(u)?)),
                )
                .as_slice()
                .to_vec();
                let mut payload = vec![0u8; size as usize];
                u.fill_buffer(&mut payload)?;
                b.extend_from_slice(&payload);
                b
            }
            31 | 32 => {
                if code == 32 {
                    fds.push(natural_memfd(u)?);
                }
                let q = u16::from(u8::arbitrary(u)? % 4);
                let qs = [64u16, 256, 0, 1024, 1025][usize::from(u8::arbitrary(u)?) % 5];
                VhostUserInflight::new(Num::arbitrary(u)?.0, Num::arbitrary(u)?.0, q, qs)
                    .as_slice()
                    .to_vec()
            }
            _ => Vec::new(),
        };
        // Sometimes any body or any fds instead.
        let body = match u8::arbitrary(u)? {
            0..=219 => body,
            220..=239 => {
                let mut b = body;
                b.truncate(usize::from(u8::arbitrary(u)?));
                b
            }
            _ => Vec::arbitrary(u)?,
        };
        if u8::arbitrary(u)? >= 224 {
            fds = (0..u8::arbitrary(u)? % 6)
                .map(|_| u8::arbitrary(u).map(usize::from))
                .collect::<arbitrary::Result<_>>()?;
        }
        Ok(Msg {
            code,
            flags,
            body,
            fds,
        })
    }
}

/// One step of a stream.
#[derive(Debug)]
enum Action {
    /// A request put in a ring and kicked, as a driver does.
    Request {
        ring: u8,
        slot: u16,
        write: bool,
        sector: u64,
        sectors: u8,
    },
    Msg(Msg),
    Kick(u8),
    /// The guest (or a hostile frontend) writes a memfd under the backend.
    Poke {
        memfd: u8,
        offset: u32,
        bytes: Vec<u8>,
    },
    Raw(Vec<u8>),
}

impl<'a> Arbitrary<'a> for Action {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Action> {
        Ok(match u8::arbitrary(u)? {
            0..=89 => Action::Request {
                ring: u8::arbitrary(u)?,
                slot: u16::from(u8::arbitrary(u)?),
                write: bool::arbitrary(u)?,
                sector: match u8::arbitrary(u)? {
                    0..=239 => u64::from(u16::arbitrary(u)?) % (CAPACITY / 512),
                    _ => u64::arbitrary(u)?,
                },
                sectors: u8::arbitrary(u)?,
            },
            90..=219 => Action::Msg(Msg::arbitrary(u)?),
            220..=234 => Action::Kick(u8::arbitrary(u)?),
            235..=249 => Action::Poke {
                memfd: u8::arbitrary(u)?,
                offset: u32::arbitrary(u)?,
                bytes: Vec::arbitrary(u)?,
            },
            _ => Action::Raw(Vec::arbitrary(u)?),
        })
    }
}

#[derive(Debug)]
struct Input {
    setup: Setup,
    actions: Vec<Action>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Input> {
        let setup = match u8::arbitrary(u)? {
            0..=179 => Setup::Running,
            180..=219 => Setup::Memory,
            220..=239 => Setup::Owner,
            _ => Setup::Nothing,
        };
        let mut actions = Vec::new();
        // At most 64 steps: each may wait for the backend.
        while actions.len() < 64 && !u.is_empty() {
            actions.push(Action::arbitrary(u)?);
        }
        Ok(Input { setup, actions })
    }
}

/// Plays `input` on `c` as the frontend. Stops at the first refusal (the backend closed the
/// connection); panics if the backend stops answering.
fn play(st: &State, c: &mut Conn, input: &Input) {
    let pool = &st.pool;
    let fds = pool.ring_fds();
    if let Err(e) = guest::setup(c, input.setup, &fds, st.features, st.protocol) {
        return hung(e);
    }
    let mut avail = [0u16; guest::RINGS];
    for a in &input.actions {
        let sent = match a {
            Action::Request {
                ring,
                slot,
                write,
                sector,
                sectors,
            } => {
                let r = usize::from(*ring) % guest::RINGS;
                let len = (u32::from(*sectors % 8) + 1) * 512;
                guest::put_request(pool.guest(), r, avail[r], *slot, *write, *sector, len);
                avail[r] = avail[r].wrapping_add(1);
                guest::kick(fds.kick[r]);
                Ok(())
            }
            Action::Msg(m) => {
                let raw: Vec<RawFd> = m.fds.iter().map(|&i| pool.fd(i)).collect();
                c.send(m.code, m.flags, &m.body, &raw)
                    .and_then(|()| c.barrier())
            }
            Action::Kick(i) => {
                guest::kick(pool.fd(Pool::EVENTFDS + usize::from(*i) % Pool::N_EVENTFDS));
                Ok(())
            }
            Action::Poke {
                memfd,
                offset,
                bytes,
            } => {
                let i = usize::from(*memfd) % MEMFDS;
                let size = pool.memfd_sizes[i].max(1);
                let _ = pool.fds[i].write_all_at(bytes, u64::from(*offset) % size);
                // Growing the memfd past its size is not the point: put it back.
                let _ = pool.fds[i].set_len(pool.memfd_sizes[i]);
                Ok(())
            }
            Action::Raw(b) => c.send_raw(b),
        };
        if let Err(e) = sent {
            return hung(e);
        }
    }
}

/// A stream that ended because the backend closed the connection is over; one whose backend
/// stopped answering is a failure.
fn hung(e: End) {
    if let End::Hung(what) = e {
        panic!(
            "the backend did not {what} within {} s: a hang",
            PATIENCE.as_secs()
        );
    }
}

/// The fds of this process (what each is) and its threads.
fn counts() -> (Vec<(RawFd, String)>, usize) {
    let mut fds: Vec<(RawFd, String)> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let fd = e.file_name().to_str()?.parse().ok()?;
                let what = std::fs::read_link(e.path()).ok()?;
                Some((fd, what.display().to_string()))
            })
            .collect()
        })
        .unwrap_or_default();
    fds.sort();
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    (fds, threads)
}

/// Serves one connection on a thread, as `serve` does, with `play` as the frontend; returns
/// the handler's verdict once it ended, or panics if it does not end in time.
fn connection(st: &State, frontend: impl FnOnce(&mut Conn)) -> Option<String> {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (dev, live) = (st.dev.clone(), st.live.clone());
    let (tx, rx) = mpsc::channel();
    let server = std::thread::Builder::new()
        .name("fuzz-connection".to_string())
        .spawn(move || {
            let end = handle_requests(&dev, &live, theirs);
            let _ = tx.send(());
            end
        })
        .expect("spawn the connection's thread");
    let mut c = Conn::new(ours).expect("socket timeouts");
    frontend(&mut c);
    drop(c);
    // The drain timeout is 1 s; the handler has that and its patience to end.
    let bound = PATIENCE + Duration::from_secs(1);
    if rx.recv_timeout(bound).is_err() {
        panic!(
            "the handler did not end within {} s of the frontend closing its connection: a hang",
            bound.as_secs()
        );
    }
    match server.join() {
        Ok(end) => end,
        Err(_) => panic!("the handler's thread panicked"),
    }
}

pub fn run(data: &[u8]) {
    let st = state();
    let mut n = st.lock.lock().unwrap_or_else(|p| p.into_inner());
    *n += 1;
    let tag = *n;
    // Ok: a structured stream; Err: raw bytes.
    let input = match data.split_first() {
        Some((&RAW, raw)) => Err(raw),
        _ => match Input::arbitrary_take_rest(Unstructured::new(data)) {
            Ok(i) => Ok(i),
            Err(_) => return,
        },
    };
    st.pool.reset();
    let before = counts();

    let _ = connection(st, |c| match &input {
        Ok(i) => play(st, c, i),
        Err(raw) => {
            if let Err(e) = c.send_raw(raw) {
                hung(e);
            }
        }
    });

    // The next frontend is served as if nothing happened.
    st.pool.reset();
    let fds = st.pool.ring_fds();
    let mut verdict = Ok(());
    let end = connection(st, |c| {
        verdict = guest::serves_a_request(c, st.pool.guest(), &fds, st.features, st.protocol, tag);
    });
    if let Err(e) = verdict {
        panic!("after the stream, a well-formed frontend was not served: {e} (its connection ended with {end:?})");
    }

    // Everything a session took is given back (a detached teardown thread may take a moment).
    let start = Instant::now();
    let mut now = counts();
    while now != before && start.elapsed() < Duration::from_secs(5) {
        std::thread::yield_now();
        now = counts();
    }
    if now != before {
        let new: Vec<_> = now.0.iter().filter(|f| !before.0.contains(f)).collect();
        let gone: Vec<_> = before.0.iter().filter(|f| !now.0.contains(f)).collect();
        panic!(
            "the connections did not give back what they took: fds new {new:?}, gone {gone:?}; threads {} before, {} after",
            before.1, now.1
        );
    }
}

/// Zeros (a running setup and then requests read at sector 0: the usual case of every choice),
/// and a well-formed setup's messages as raw bytes.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = [8usize, 64, 512]
        .iter()
        .map(|&n| (format!("requests-{n}"), vec![0u8; n]))
        .collect();
    let mut raw = vec![RAW];
    for (code, body) in [
        (3u32, Vec::new()),
        (1, Vec::new()),
        (15, Vec::new()),
        (
            16,
            VhostUserU64::new(VhostUserProtocolFeatures::CONFIG.bits())
                .as_slice()
                .to_vec(),
        ),
        (
            24,
            VhostUserConfig::new(0, 8, VhostUserConfigFlags::empty())
                .as_slice()
                .iter()
                .copied()
                .chain([0u8; 8])
                .collect(),
        ),
        (17, Vec::new()),
    ] {
        raw.extend_from_slice(&code.to_le_bytes());
        raw.extend_from_slice(&VERSION.to_le_bytes());
        raw.extend_from_slice(&(body.len() as u32).to_le_bytes());
        raw.extend_from_slice(&body);
    }
    out.push(("raw-setup".to_string(), raw));
    out
}
