//! Open-file-description byte-range locks (fcntl `F_OFD_SETLK`/`F_OFD_GETLK`), the kind QEMU
//! takes on its images, and finding which process holds one.
//!
//! OFD locks belong to an open file description, not to a process: two descriptions of one file
//! in the same process conflict like two processes do (which is what lets the handover be
//! tested in one process), a lock lives until it is released or the last descriptor of its
//! description is closed (a killed process leaves none behind), and they work over NFS. They
//! are advisory: I/O never waits for them, so a lock on a byte of an image's data does not
//! touch that byte, and a lock past the end of a file is allowed.
//!
//! `F_OFD_GETLK` reports `l_pid = -1` for an OFD lock, so [`LockFile::holders`] finds holders
//! in `/proc/*/fdinfo/*`, whose `lock:` lines list the locks each open file description holds.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Which lock to take or test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Shared: any number of descriptions hold it at once.
    Read,
    /// Exclusive: no other description holds any lock on the byte.
    Write,
}

impl Kind {
    fn raw(self) -> libc::c_short {
        match self {
            Kind::Read => libc::F_RDLCK as libc::c_short,
            Kind::Write => libc::F_WRLCK as libc::c_short,
        }
    }
}

/// A file opened only to hold locks on it. A description of its own, so the locks neither
/// depend on how the file is opened for I/O (read-only, `O_DIRECT`) nor go away with it.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Opened for writing: the kernel grants write locks only then.
    writable: bool,
}

/// A process holding a lock, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, arguments separated by spaces, shortened when long; empty when
    /// `/proc` would not say.
    pub cmdline: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.cmdline.is_empty() {
            write!(f, "process {}", self.pid)
        } else {
            write!(f, "process {} ({})", self.pid, self.cmdline)
        }
    }
}

/// Longest command line quoted in a message, in characters.
const CMDLINE_MAX: usize = 200;

impl LockFile {
    /// Opens `path` (which must exist) for locking: read-write where permissions allow, so that
    /// write locks can be taken, else read-only ([`LockFile::writable`] tells which).
    pub fn open(path: &Path) -> io::Result<LockFile> {
        let file = match open(path, true) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
                ) =>
            {
                open(path, false)?
            }
            r => r?,
        };
        let meta = file.metadata()?;
        Ok(LockFile {
            writable: open_for_write(&file),
            dev: meta.dev(),
            ino: meta.ino(),
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether write locks can be taken (the file could be opened for writing).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Whether `other` is the file this one locks (same device and inode): a path may name
    /// another file by the time it is opened a second time.
    pub fn is_same_file(&self, other: &File) -> io::Result<bool> {
        let m = other.metadata()?;
        Ok(m.dev() == self.dev && m.ino() == self.ino)
    }

    /// Takes (or converts to) a `kind` lock on byte `byte` without waiting. False when another
    /// description holds a conflicting lock.
    pub fn try_lock(&self, byte: u64, kind: Kind) -> io::Result<bool> {
        let mut fl = flock(byte, kind.raw());
        match self.fcntl(libc::F_OFD_SETLK, &mut fl) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Releases whatever lock this description holds on byte `byte` (none is fine).
    pub fn unlock(&self, byte: u64) -> io::Result<()> {
        let mut fl = flock(byte, libc::F_UNLCK as libc::c_short);
        self.fcntl(libc::F_OFD_SETLK, &mut fl)
    }

    /// Whether another description holds a lock on byte `byte` that a `kind` lock would
    /// conflict with. This description's own locks never count.
    pub fn conflicts(&self, byte: u64, kind: Kind) -> io::Result<bool> {
        let mut fl = flock(byte, kind.raw());
        self.fcntl(libc::F_OFD_GETLK, &mut fl)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// fdatasync of the file: flushes what any descriptor of it wrote (the kernel's cache of a
    /// file is one per inode).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The processes whose open file descriptions, other than this one, hold a lock on byte
    /// `byte` of this file, by `/proc/*/fdinfo`. Empty when none is found: the holder may belong to another user
    /// (whose `fdinfo` we may not read), run on another host sharing the storage, or have
    /// gone.
    pub fn holders(&self, byte: u64) -> Vec<Holder> {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut out: Vec<Holder> = Vec::new();
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if self.held_by(pid, byte) {
                out.push(Holder {
                    pid,
                    cmdline: cmdline(pid),
                });
            }
        }
        out
    }

    /// Whether one of process `pid`'s open file descriptions holds a lock on byte `byte`.
    fn held_by(&self, pid: u32, byte: u64) -> bool {
        let dir = format!("/proc/{pid}/fdinfo");
        let Ok(fds) = std::fs::read_dir(&dir) else {
            return false;
        };
        let own = (pid == std::process::id()).then(|| self.file.as_raw_fd().to_string());
        fds.flatten().any(|fd| {
            if own.as_deref() == fd.file_name().to_str() {
                return false;
            }
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                return false;
            };
            info.lines().filter_map(LockLine::parse).any(|l| {
                l.covers(byte)
                    && l.ino == self.ino
                    && (l.dev == (libc::major(self.dev), libc::minor(self.dev))
                        // The lock line names the filesystem's device, which differs from what
                        // stat(2) says on btrfs subvolumes and some stacked filesystems: ask
                        // the descriptor itself.
                        || self.is_file_of(&format!("/proc/{pid}/fd/{}", fd.file_name().to_string_lossy())))
            })
        })
    }

    fn is_file_of(&self, fd_link: &str) -> bool {
        std::fs::metadata(fd_link).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    fn fcntl(&self, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
        // SAFETY: an fd we own and a flock the kernel reads (and, for GETLK, writes) in place.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, fl as *mut libc::flock) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

fn open(path: &Path, write: bool) -> io::Result<File> {
    // Never O_CREAT: a file to lock is one that someone serves, and creating it is not ours
    // to do here. O_NOCTTY: a terminal device named by mistake must not become ours.
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
}

fn open_for_write(file: &File) -> bool {
    // SAFETY: F_GETFL on an fd we own reads nothing from memory.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_ACCMODE == libc::O_RDWR
}

fn flock(byte: u64, kind: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        // Every byte we lock is below i64::MAX (see `handover`'s constants).
        l_start: byte as libc::off_t,
        l_len: 1,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// `/proc/PID/cmdline` with spaces between the arguments, shortened to `CMDLINE_MAX`.
fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let s: String = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if s.chars().count() > CMDLINE_MAX {
        let short: String = s.chars().take(CMDLINE_MAX).collect();
        format!("{short} ...")
    } else {
        s
    }
}

/// One `lock:` line of `/proc/PID/fdinfo/FD` (the format of `/proc/locks`, see proc(5)):
/// `lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10010859 100 100` (the last field may be `EOF`).
#[derive(Debug, PartialEq, Eq)]
struct LockLine {
    /// (major, minor) of the filesystem's device.
    dev: (u32, u32),
    ino: u64,
    start: u64,
    /// Last byte, None for `EOF` (to the end of any file).
    end: Option<u64>,
}

impl LockLine {
    /// The OFD lock a line describes; None for other lines and other kinds of lock.
    fn parse(line: &str) -> Option<LockLine> {
        let rest = line.strip_prefix("lock:")?;
        let mut fields = rest.split_whitespace().skip(1).skip_while(|f| *f == "->");
        if fields.next()? != "OFDLCK" {
            return None;
        }
        // ADVISORY, READ|WRITE, pid (-1)
        let mut fields = fields.skip(3);
        let mut id = fields.next()?.split(':');
        let major = u32::from_str_radix(id.next()?, 16).ok()?;
        let minor = u32::from_str_radix(id.next()?, 16).ok()?;
        let ino = id.next()?.parse().ok()?;
        let start = fields.next()?.parse().ok()?;
        let end = match fields.next()? {
            "EOF" => None,
            n => Some(n.parse().ok()?),
        };
        Some(LockLine {
            dev: (major, minor),
            ino,
            start,
            end,
        })
    }

    fn covers(&self, byte: u64) -> bool {
        self.start <= byte && self.end.is_none_or(|e| byte <= e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines_parse_as_proc_writes_them() {
        let l =
            LockLine::parse("lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10010859 100 100").unwrap();
        assert_eq!(
            l,
            LockLine {
                dev: (0xfe, 0),
                ino: 10010859,
                start: 100,
                end: Some(100)
            }
        );
        assert!(l.covers(100) && !l.covers(101) && !l.covers(99));
        let eof = LockLine::parse("lock:\t2: OFDLCK ADVISORY  READ -1 103:0a:7 5 EOF").unwrap();
        assert_eq!((eof.dev, eof.end), ((0x103, 0x0a), None));
        assert!(eof.covers(u64::MAX));
        for other in [
            "lock:\t1: POSIX  ADVISORY  WRITE 1234 fe:00:10010859 100 100",
            "lock:\t1: FLOCK  ADVISORY  WRITE 1234 fe:00:10010859 0 EOF",
            "pos:\t0",
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 zz:00:1 100 100",
        ] {
            assert_eq!(LockLine::parse(other), None, "{other}");
        }
    }

    /// Two descriptions of one file in one process conflict as two processes would, a lock
    /// past the end of the file is fine, and /proc names this process as the holder.
    #[test]
    fn descriptions_conflict_and_proc_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let a = LockFile::open(&path).unwrap();
        let b = LockFile::open(&path).unwrap();
        assert!(a.writable());
        let far = 1 << 62;
        assert!(a.try_lock(far, Kind::Write).unwrap());
        assert!(a.try_lock(far, Kind::Write).unwrap(), "a lock of one's own");
        assert!(!b.try_lock(far, Kind::Read).unwrap());
        assert!(b.conflicts(far, Kind::Read).unwrap());
        assert!(
            !a.conflicts(far, Kind::Write).unwrap(),
            "own locks never count"
        );
        let me = std::process::id();
        let holders = b.holders(far);
        assert_eq!(holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [me]);
        assert!(holders[0]
            .to_string()
            .starts_with(&format!("process {me} (")));
        assert!(b.holders(far + 1).is_empty(), "another byte");
        assert!(a.holders(far).is_empty(), "its own lock is not another's");

        // Converting to a read lock lets other readers in, not writers.
        assert!(a.try_lock(far, Kind::Read).unwrap());
        assert!(b.try_lock(far, Kind::Read).unwrap());
        assert!(!b.try_lock(far, Kind::Write).unwrap());
        a.unlock(far).unwrap();
        assert!(b.try_lock(far, Kind::Write).unwrap());
        drop(b);
        assert!(
            a.try_lock(far, Kind::Write).unwrap(),
            "closing the description releases its locks"
        );

        let other = dir.path().join("g");
        std::fs::write(&other, b"y").unwrap();
        assert!(a.is_same_file(&File::open(&path).unwrap()).unwrap());
        assert!(!a.is_same_file(&File::open(&other).unwrap()).unwrap());
        assert!(LockFile::open(&dir.path().join("missing")).is_err());
    }
}
