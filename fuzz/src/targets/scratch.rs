//! A directory of the process's own for the files targets need (spare files, images, control
//! sockets): on tmpfs where there is one, so that the fdatasync calls the code under test makes
//! cost nothing and a target runs thousands of times a second.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory, made on first use.
pub fn dir() -> &'static Path {
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("remapblk-fuzz-{}", std::process::id()));
        // A directory left by an earlier process with this pid is stale: start empty.
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create the scratch directory {}: {e}", dir.display());
        }
        dir
    })
}

/// Removes the directory, if one was made (at the end of a run).
pub fn cleanup() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
