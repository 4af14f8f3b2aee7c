//! What `--seccomp on` does with a call outside the allow-lists: the filter answers
//! SECCOMP_RET_TRAP, the kernel sends SIGSYS to the thread that made the call, and this
//! handler writes one line naming the call and the thread to stderr (the daemon's own log,
//! where whoever runs it looks first; the kernel's audit log needs privileges to read and
//! does not exist everywhere), then ends the process by SIGSYS, with a core dump where the
//! system keeps them, showing where the call was made.
//!
//! The handler may only make calls every list allows (write, prctl(PR_GET_NAME), getpid,
//! gettid, tgkill with SIGSYS) and must not allocate or lock: it runs in the middle of any
//! code, in any thread.

use std::cell::Cell;
use std::io;

use super::lists::{Call, GROUPS, NONE};

thread_local! {
    /// The list this thread narrowed itself to (`enter`), for the message.
    pub static LIST: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// `si_code` of a SIGSYS that a seccomp filter caused.
const SYS_SECCOMP: libc::c_int = 1;

/// `siginfo_t` as the kernel fills it for SIGSYS on 64-bit Linux (`_sigsys` in
/// `<asm-generic/siginfo.h>`): the union starts at 16, after three ints and padding.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Installs the handler. One-shot (SA_RESETHAND): on entry the kernel resets SIGSYS to its
/// default action, so the SIGSYS the handler sends itself (blocked until it returns) ends
/// the process before the thread runs another instruction.
pub fn install() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in (empty mask, no flags).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: sa is a valid sigaction whose handler only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: SA_SIGINFO handlers get a valid siginfo_t; for SIGSYS its layout is SigsysInfo.
    let (code, nr) = unsafe {
        let i = &*(info as *const SigsysInfo);
        (i.code, i.syscall)
    };
    if code == SYS_SECCOMP {
        let mut line = Line::default();
        line.push("remapblk: seccomp: thread '");
        let mut name = [0u8; 17];
        // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into a 17-byte buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        let len = name.iter().position(|&b| b == 0).unwrap_or(0);
        line.push_bytes(&name[..len]);
        line.push("' (");
        line.push(
            LIST.try_with(Cell::get)
                .ok()
                .flatten()
                .unwrap_or("process-wide or inherited"),
        );
        line.push(" list) made system call ");
        line.push_num(i64::from(nr));
        if let Some(call) = known(i64::from(nr)) {
            line.push(" (");
            line.push(call.name());
            line.push(")");
        }
        line.push(
            ", which its allow-list does not hold; stopping with SIGSYS. To find every such \
             call, run with --seccomp log and read the kernel log (dmesg | grep type=1326)\n",
        );
        line.write_stderr();
    }
    // SAFETY: getpid, gettid and tgkill take no pointers; SIGSYS is pending until we return,
    // and its action is the default (SA_RESETHAND), which ends the process.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// A call some list names: the name of the call a thread's own list lacks (the usual case,
/// since the process-wide list is the union of all) without a table of every call.
fn known(nr: i64) -> Option<&'static Call> {
    GROUPS
        .iter()
        .flat_map(|g| g.calls)
        .find(|c| c.nr == nr && c.nr != NONE)
}

/// A line built without allocating.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    fn push_bytes(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    fn push_num(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut rest = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if v < 0 {
            self.push("-");
        }
        self.push_bytes(&digits[i..]);
    }

    fn write_stderr(&self) {
        let mut done = 0;
        while done < self.len {
            // SAFETY: writes initialized bytes of our own buffer.
            let r = unsafe {
                libc::write(
                    libc::STDERR_FILENO,
                    self.buf[done..self.len].as_ptr().cast(),
                    self.len - done,
                )
            };
            if r <= 0 {
                return;
            }
            done += r as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names() {
        let mut l = Line::default();
        l.push("nr ");
        l.push_num(0);
        l.push(" ");
        l.push_num(435);
        l.push(" ");
        l.push_num(-12);
        assert_eq!(&l.buf[..l.len], b"nr 0 435 -12");
        assert_eq!(known(libc::SYS_clone3).map(Call::name), Some("clone3"));
        assert!(known(libc::SYS_execve).is_none());
    }

    #[test]
    fn a_long_line_is_cut_not_overflowed() {
        let mut l = Line::default();
        for _ in 0..100 {
            l.push("0123456789");
        }
        assert_eq!(l.len, 512);
    }
}
