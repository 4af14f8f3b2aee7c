//! Why the kernel refused an io_uring, in words a user can act on. A user without privileges
//! meets these where root never does: rings count against its locked-memory limit (root has
//! CAP_IPC_LOCK, which exempts it), and `kernel.io_uring_disabled` may reserve io_uring for
//! root and one group.

use std::io;
use std::sync::OnceLock;

/// What the messages quote of this process's settings.
struct Limits {
    memlock_kib: Option<u64>,
    io_uring_disabled: String,
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Reads the settings the messages quote, once. The engine probe calls it at start-up: a
/// queue's ring is set up later, on a session's thread, where a sandbox may no longer allow
/// reading `/proc` just to word an error.
pub fn read_limits() {
    limits();
}

fn limits() -> &'static Limits {
    LIMITS.get_or_init(|| Limits {
        memlock_kib: memlock_kib(),
        io_uring_disabled: io_uring_disabled(),
    })
}

/// `e`, from io_uring_setup(2), with what it means and what to do about it when the cause is
/// one we know.
pub fn explain(e: io::Error) -> io::Error {
    let limits = limits();
    match advice(&e, limits.memlock_kib, &limits.io_uring_disabled) {
        Some(a) => io::Error::new(e.kind(), format!("{e}: {a}")),
        None => e,
    }
}

fn advice(e: &io::Error, memlock_kib: Option<u64>, disabled: &str) -> Option<String> {
    match e.raw_os_error()? {
        libc::ENOMEM => {
            let limit = memlock_kib.map_or_else(|| "unlimited".to_string(), |k| format!("{k} KiB"));
            Some(format!(
                "io_uring counts its rings against the locked-memory limit of a user without \
                 CAP_IPC_LOCK, summed over all that user's processes (RLIMIT_MEMLOCK: {limit} \
                 for this process; a queue of 256 entries takes about 28 KiB): raise it \
                 (`ulimit -l`, LimitMEMLOCK= in a systemd unit, memlock in \
                 /etc/security/limits.conf) or stop the user's other io_uring processes"
            ))
        }
        libc::EPERM => Some(match disabled {
            "2" => "io_uring is disabled on this host (sysctl kernel.io_uring_disabled = 2): \
                    only the administrator can allow it (0 for everyone, 1 for root and a group)"
                .to_string(),
            "1" => "io_uring is reserved to root and the group kernel.io_uring_group names \
                    (sysctl kernel.io_uring_disabled = 1): add this user to that group"
                .to_string(),
            _ => "a seccomp policy (a container's, say) forbids io_uring here; allow \
                  io_uring_setup, io_uring_enter and io_uring_register"
                .to_string(),
        }),
        libc::ENOSYS => {
            Some("this kernel has no io_uring (or a seccomp policy hides it)".to_string())
        }
        _ => None,
    }
}

/// This process's soft RLIMIT_MEMLOCK in KiB; None when unlimited (or unknown).
fn memlock_kib() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit, which `lim` is.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    (r == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur / 1024)
}

/// `kernel.io_uring_disabled` (Linux 6.6 and later), empty where the kernel has none.
fn io_uring_disabled() -> String {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn enomem_names_the_locked_memory_limit_and_its_value() {
        let a = advice(&os(libc::ENOMEM), Some(64), "0").unwrap();
        assert!(a.contains("RLIMIT_MEMLOCK"), "{a}");
        assert!(a.contains("64 KiB"), "{a}");
        assert!(a.contains("ulimit -l"), "{a}");
        let a = advice(&os(libc::ENOMEM), None, "0").unwrap();
        assert!(a.contains("unlimited"), "{a}");
    }

    #[test]
    fn eperm_says_which_setting_forbids_io_uring() {
        let all = advice(&os(libc::EPERM), None, "2").unwrap();
        assert!(all.contains("io_uring_disabled = 2"), "{all}");
        let group = advice(&os(libc::EPERM), None, "1").unwrap();
        assert!(group.contains("io_uring_group"), "{group}");
        for disabled in ["0", ""] {
            let seccomp = advice(&os(libc::EPERM), None, disabled).unwrap();
            assert!(seccomp.contains("seccomp"), "{seccomp}");
        }
    }

    #[test]
    fn other_errors_are_left_as_they_are() {
        assert!(advice(&os(libc::EINVAL), None, "0").is_none());
        assert!(advice(&io::Error::other("no errno"), None, "0").is_none());
        let e = explain(os(libc::EINVAL));
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn explain_keeps_the_system_error_and_adds_the_advice() {
        let e = explain(os(libc::ENOMEM)).to_string();
        assert!(e.starts_with(&os(libc::ENOMEM).to_string()), "{e}");
        assert!(e.contains("RLIMIT_MEMLOCK"), "{e}");
    }
}
