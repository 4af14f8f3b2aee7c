//! Who the tests run as. CI runs the suite twice, as root and as a user without privileges
//! (`ci/unprivileged.sh`); a test that needs one of the two says so when it skips.

/// Whether this process runs as root (and so has every capability the tests might want).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) reads nothing from memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Says on the test run's output that `test` checked nothing, and why. Written to stderr
/// itself: the test harness keeps what `eprintln!` prints from a passing test to itself, and
/// a skip must be seen.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
