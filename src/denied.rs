//! What to add to an error when the kernel refused a path for lack of permission (EACCES,
//! EPERM). remapblk needs no privilege of its own, only access to its files, so this is the
//! error a user without privileges meets first, and its fix is in the files' modes.

use std::io;
use std::path::Path;

/// The tail of an error message about `path`: when `e` is a permission error, what the user
/// needs (`needs`, e.g. "read and write access to it") and how to look; else nothing.
pub fn advice(e: &io::Error, path: &Path, needs: &str) -> String {
    if !matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
        return String::new();
    }
    // SAFETY: geteuid(2) reads nothing from memory and cannot fail.
    let uid = unsafe { libc::geteuid() };
    format!(
        ". remapblk needs no privileges, but this user (uid {uid}) needs {needs}: check the \
         owner and mode of {} and of the directories above it (`namei -l {}` lists them), or \
         run remapblk as a user who has that access",
        path.display(),
        path.display()
    )
}

/// What a file remapblk opens for reading and writing needs.
pub const READ_WRITE: &str = "read and write access to it (read access alone with --readonly; \
     for a block device, membership in the group that owns it, often `disk`)";

/// What a file or socket remapblk creates needs.
pub const CREATE: &str = "write and search access to the directory it goes in";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permission_error_gets_what_is_needed_and_where_to_look() {
        let p = Path::new("/srv/disk.img");
        for errno in [libc::EACCES, libc::EPERM] {
            let a = advice(&io::Error::from_raw_os_error(errno), p, READ_WRITE);
            assert!(a.starts_with(". remapblk needs no privileges"), "{a}");
            assert!(a.contains("read and write access"), "{a}");
            assert!(a.contains("namei -l /srv/disk.img"), "{a}");
        }
    }

    #[test]
    fn other_errors_get_nothing() {
        let p = Path::new("/srv/disk.img");
        for e in [
            io::Error::from_raw_os_error(libc::ENOENT),
            io::Error::from_raw_os_error(libc::ENOSPC),
            io::Error::other("no errno"),
        ] {
            assert_eq!(advice(&e, p, CREATE), "");
        }
    }
}
