//! Test harness: the real `remapblk serve` binary on a temporary image, driven by the `blkio`
//! crate (libblkio's virtio-blk-vhost-user driver, an independent client).

#![allow(dead_code)]

pub mod load;
pub mod privilege;
pub mod raw;

use std::fs::File;
use std::io::Read;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub const MIB: u64 = 1 << 20;

pub struct Server {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    /// The process's descriptor limit (RLIMIT_NOFILE), when the test sets one.
    nofile: Option<u64>,
}

/// Runs `remapblk serve --image IMAGE --socket SOCKET EXTRA...` that is expected to stop at
/// start-up: (exit code, stderr).
pub fn serve_refused(image: &Path, socket: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_remapblk"))
        .arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .output()
        .expect("run remapblk serve");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Gives the child `fd` as its descriptor 3 (where socket activation puts the first socket,
/// and where `--fd 3` looks).
pub fn pass_as_fd3(cmd: &mut Command, fd: RawFd) {
    // SAFETY: dup2 and fcntl are async-signal-safe, and the closure touches nothing else
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the copy; a descriptor that is 3 already keeps its
            // flag, so clear it by hand.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Polls `cond` every few milliseconds until it holds or `deadline` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Server {
    /// Starts `remapblk serve` on a fresh image of `size` bytes with extra arguments.
    pub fn start(size: u64, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        let f = File::create(&image).expect("create image");
        f.set_len(size).expect("size image");
        Self::start_on(dir, image, extra)
    }

    /// As [`Server::start`], with the process's descriptor limit (RLIMIT_NOFILE, soft and
    /// hard) set to `nofile`, as `prlimit --nofile` would.
    pub fn start_with_fd_limit(size: u64, extra: &[&str], nofile: u64) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        Self::start_inner(dir, image, extra, Some(nofile))
    }

    pub fn start_on(dir: tempfile::TempDir, image: PathBuf, extra: &[&str]) -> Server {
        Self::start_inner(dir, image, extra, None)
    }

    fn start_inner(
        dir: tempfile::TempDir,
        image: PathBuf,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Server {
        let socket = dir.path().join("disk.sock");
        let log = dir.path().join("server.log");
        let mut args = vec![
            "serve".to_string(),
            "--image".to_string(),
            image.display().to_string(),
            "--socket".to_string(),
            socket.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Server {
            dir,
            image,
            socket,
            log,
            child: None,
            args,
            nofile,
        };
        s.spawn();
        s
    }

    /// (Re)starts the process with the same arguments and waits until it listens.
    pub fn spawn(&mut self) {
        self.check_not_killed_by_seccomp();
        // Earlier runs' lines stay in the log; only what this run adds counts.
        let seen = std::fs::metadata(&self.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_remapblk"));
        cmd.args(&self.args)
            .env("RUST_LOG", "debug")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .stdin(Stdio::null());
        if let Some(n) = self.nofile {
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and reads only `limit`, a copy the
            // closure owns; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn remapblk");
        self.child = Some(child);
        let sock = self.socket.clone();
        let log_path = self.log.clone();
        wait_until("the server to listen", Duration::from_secs(20), || {
            if let Some(st) = self.try_wait() {
                panic!("server exited early with {st}: {}", read_log(&log_path));
            }
            std::fs::read(&log_path)
                .map(|l| {
                    String::from_utf8_lossy(l.get(seen..).unwrap_or_default())
                        .contains(&format!("listening on {}", sock.display()))
                })
                .unwrap_or(false)
        });
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid of our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until("the server to exit", timeout, || {
            status = self.try_wait();
            status.is_some()
        });
        self.child = None;
        status.expect("exit status")
    }

    /// Fails the test if the process ended by SIGSYS: a system call outside the seccomp
    /// allow-list (its log names the call), which would otherwise pass unseen in a test that
    /// never asks how the server ended.
    fn check_not_killed_by_seccomp(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        if self.try_wait().and_then(|st| st.signal()) == Some(libc::SIGSYS) {
            self.child = None;
            panic!(
                "the server was killed by its seccomp filter: {}",
                self.log()
                    .lines()
                    .filter(|l| l.contains("seccomp"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    pub fn is_alive(&mut self) -> bool {
        self.try_wait().is_none()
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// The control socket (the default: the socket path plus ".ctl").
    pub fn control(&self) -> PathBuf {
        let mut p = self.socket.clone().into_os_string();
        p.push(".ctl");
        p.into()
    }

    /// Runs `remapblk ctl NAME ARGS...` against this server: (exit code, parsed stdout or
    /// Null, stderr).
    pub fn ctl(&self, name: &str, args: &[&str]) -> (i32, serde_json::Value, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_remapblk"))
            .arg("ctl")
            .arg("--control")
            .arg(self.control())
            .arg(name)
            .args(args)
            .output()
            .expect("run remapblk ctl");
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code().unwrap_or(-1),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `ctl` that must succeed; returns the `return` object.
    pub fn ctl_ok(&self, name: &str, args: &[&str]) -> serde_json::Value {
        let (code, v, err) = self.ctl(name, args);
        assert_eq!(code, 0, "ctl {name} failed: {err}");
        v
    }

    /// The remapped blocks `remap-list` names, in its order.
    pub fn remapped_lbas(&self) -> Vec<u64> {
        self.ctl_ok("remap-list", &[])
            .as_array()
            .expect("remap-list returns an array")
            .iter()
            .map(|e| e["lba"].as_u64().expect("an lba"))
            .collect()
    }

    pub fn client(&self, num_queues: usize) -> Client {
        Client::connect(&self.socket, num_queues, false)
    }
}

fn read_log(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let keep = std::env::temp_dir().join(format!("remapblk-failed-{}.log", self.pid()));
            if std::fs::write(&keep, &log).is_ok() {
                eprintln!("--- the whole server log: {} ---", keep.display());
            }
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the server log ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if !std::thread::panicking() {
            self.check_not_killed_by_seccomp();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A server starved of descriptors on purpose may fall back to sync for want of one
        // (the fd-limit tests): that is what it should do there, not a test that lies.
        if !std::thread::panicking() && self.nofile.is_none() {
            assert_no_engine_fallback(&self.log());
        }
    }
}

/// A queue whose io_uring the kernel refused runs on the sync engine, with a warning, and
/// serves as well: a test would pass while its io_uring run tested sync. A user without
/// CAP_IPC_LOCK meets this when RLIMIT_MEMLOCK cannot hold the rings of all its servers.
fn assert_no_engine_fallback(log: &str) {
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("cannot set up the io_uring engine"))
    {
        panic!(
            "a queue fell back from io_uring to sync, so this run did not test io_uring: {line}\n\
             raise the locked-memory limit (ulimit -l) or run with REMAPBLK_ENGINE=sync"
        );
    }
}

/// A libblkio connection with `num_queues` queues and one shared buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

/// One request of a batch.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, len: usize },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// Buffer space per in-flight request in the shared region.
pub const SLOT: usize = 256 << 10;
pub const SLOTS: usize = 64;

impl Client {
    pub fn try_connect(socket: &Path, num_queues: usize, read_only: bool) -> blkio::Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", &socket.display().to_string())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues as i32)?;
        let queues = b.start()?.queues;
        let capacity = b.get_u64("capacity")?;
        let region = b.alloc_mem_region(SLOT * SLOTS)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            blkio: b,
            queues,
            region,
            capacity,
        })
    }

    pub fn connect(socket: &Path, num_queues: usize, read_only: bool) -> Client {
        Self::try_connect(socket, num_queues, read_only)
            .unwrap_or_else(|e| panic!("blkio connect to {}: {e}", socket.display()))
    }

    pub fn slot(&self, i: usize) -> *mut u8 {
        assert!(i < SLOTS);
        (self.region.addr + i * SLOT) as *mut u8
    }

    pub fn slot_mut(&mut self, i: usize, len: usize) -> &mut [u8] {
        assert!(len <= SLOT);
        // SAFETY: a slot is SLOT bytes of the client's registered buffer, alive as long as the client.
        unsafe { std::slice::from_raw_parts_mut(self.slot(i), len) }
    }

    /// Submits `ops` on queue `q` (at most SLOTS at once: that is the queue depth), each using
    /// buffer slot = its index, and waits for all. Returns each op's result (0 or -errno).
    pub fn batch(&mut self, q: usize, ops: &[Op]) -> Vec<i32> {
        self.try_batch(q, ops, Duration::from_secs(30))
            .expect("requests did not complete within 30 s")
    }

    /// Like [`Client::batch`], but gives up (None) when not every request has completed within
    /// `timeout`, as happens when the server goes away.
    pub fn try_batch(&mut self, q: usize, ops: &[Op], timeout: Duration) -> Option<Vec<i32>> {
        assert!(ops.len() <= SLOTS);
        let base = self.region.addr;
        let queue = &mut self.queues[q];
        for (i, op) in ops.iter().enumerate() {
            let buf = (base + i * SLOT) as *mut u8;
            match *op {
                Op::Read { offset, len } => {
                    poison(buf, len);
                    queue.read(offset, buf, len, i, ReqFlags::empty())
                }
                Op::Write { offset, len } => queue.write(offset, buf, len, i, ReqFlags::empty()),
                Op::Flush => queue.flush(i, ReqFlags::empty()),
                Op::Discard { offset, len } => queue.discard(offset, len, i, ReqFlags::empty()),
                Op::WriteZeroes { offset, len, unmap } => queue.write_zeroes(
                    offset,
                    len,
                    i,
                    if unmap {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    },
                ),
            }
        }
        let mut results = vec![i32::MIN; ops.len()];
        let mut done = 0;
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..ops.len()).map(|_| MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + timeout;
        while done < ops.len() {
            let mut left = deadline.saturating_duration_since(Instant::now());
            let n = queue.do_io(&mut comps, 1, Some(&mut left), None).ok()?;
            if n == 0 {
                return None;
            }
            for c in &comps[..n] {
                // SAFETY: the client filled the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                results[c.user_data] = c.ret;
            }
            done += n;
        }
        Some(results)
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.slot_mut(0, data.len()).copy_from_slice(data);
        self.batch(
            q,
            &[Op::Write {
                offset,
                len: data.len(),
            }],
        )[0]
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let r = self.batch(q, &[Op::Read { offset, len }])[0];
        if r != 0 {
            return Err(r);
        }
        Ok(self.slot_mut(0, len).to_vec())
    }
}

/// Fills a read's buffer with junk before it is submitted, so that a read which leaves some
/// of its bytes unwritten fails the comparison instead of passing on what the buffer held from
/// an earlier read of the same data.
pub fn poison(buf: *mut u8, len: usize) {
    // SAFETY: every caller passes a slot of the client's shared region, at most SLOT bytes.
    unsafe { std::ptr::write_bytes(buf, 0xa5, len) };
}

/// Deterministic pseudo-random bytes for (seed, offset): any block's expected content can be
/// recomputed without keeping a copy.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed ^ offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `pattern(seed, ..)` over `[start, end)` in `chunk`-byte requests at queue depth
/// `depth`, spreading the chunks over all queues of the client.
pub fn fill(c: &mut Client, seed: u64, start: u64, end: u64, chunk: usize, depth: usize) {
    let nq = c.queues.len();
    let offsets: Vec<u64> = (start..end).step_by(chunk).collect();
    for (round, group) in offsets.chunks(depth * nq).enumerate() {
        for (q, part) in group.chunks(depth).enumerate() {
            let ops: Vec<Op> = part
                .iter()
                .enumerate()
                .map(|(i, &off)| {
                    let data = pattern(seed, off, chunk);
                    c.slot_mut(i, chunk).copy_from_slice(&data);
                    Op::Write {
                        offset: off,
                        len: chunk,
                    }
                })
                .collect();
            let res = c.batch((q + round) % nq, &ops);
            assert!(res.iter().all(|&r| r == 0), "writes failed: {res:?}");
        }
    }
}

/// Reads `[start, end)` back at queue depth `depth` and compares with `pattern(seed, ..)`.
pub fn verify(c: &mut Client, seed: u64, start: u64, end: u64, chunk: usize, depth: usize) {
    let nq = c.queues.len();
    let offsets: Vec<u64> = (start..end).step_by(chunk).collect();
    for (round, group) in offsets.chunks(depth).enumerate() {
        let ops: Vec<Op> = group
            .iter()
            .map(|&off| Op::Read {
                offset: off,
                len: chunk,
            })
            .collect();
        let res = c.batch(round % nq, &ops);
        for (i, &off) in group.iter().enumerate() {
            assert_eq!(res[i], 0, "read at {off} failed");
            let got = c.slot_mut(i, chunk).to_vec();
            assert!(
                got == pattern(seed, off, chunk),
                "data mismatch at offset {off}"
            );
        }
    }
}

/// Reads `len` bytes of a file at `offset` (the host's view of the image).
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("open image");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read image");
    buf
}

/// Overwrites 512-byte blocks `lbas` of the image file with junk (0xee), on disk too: a read
/// of a remapped block that still went to the image returns it.
pub fn spoil_blocks(path: &Path, lbas: impl IntoIterator<Item = u64>) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    for lba in lbas {
        f.write_all_at(&[0xee; 512], lba * 512)
            .expect("spoil image");
    }
    f.sync_all().expect("sync image");
}

/// Checks the image file itself holds `pattern(seed, ..)` over `[start, end)`.
pub fn verify_file(path: &Path, seed: u64, start: u64, end: u64, chunk: usize) {
    for off in (start..end).step_by(chunk) {
        assert!(
            read_file_at(path, off, chunk) == pattern(seed, off, chunk),
            "image file differs from what was written at offset {off}"
        );
    }
}
