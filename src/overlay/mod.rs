//! `serve --overlay PATH`: the image stays as it is while the guest writes, so a lab can throw
//! away everything since start-up (or the last commit) with `overlay-reset`, or keep it with
//! `overlay-commit`. The overlay is the bottom layer of the block stack (under the fault and
//! remap layers), and the remap layer's spare file gets a copy of its own, so a reset reverts
//! remaps too.
//!
//! Two ways, picked at start-up:
//! - **reflink**: the filesystem shares extents (FICLONE: XFS with reflink, btrfs, bcachefs).
//!   PATH is a clone of the image and every request goes to it; a reset clones the image
//!   again, a commit clones PATH back onto the image. Cheap whatever the size.
//! - **map**: PATH is a sparse file of the image's size and [`map::BlockMap`] says which
//!   blocks it holds; reads take the others from the image, opened read-only. A write of part
//!   of a block the overlay lacks copies the block up first; discards and write-zeroes are
//!   written to the overlay (a hole there reads as zeros), so the image's copy is hidden.
//!   A reset forgets the map (and punches the file); a commit writes the held blocks into
//!   the image.
//!
//! The spare file is small (its header, table slots and spare blocks): it gets a full copy at
//! `PATH.spare` (a reflink, or a copy that writes only what differs, keeping holes), which the
//! remap table uses instead of the real spare; reset copies the real one over it again and
//! reloads the table, commit copies it back.
//!
//! Nothing in the overlay outlives the process: every start empties it. So a FLUSH has
//! nothing to make durable here (the image is not written), and the layer answers it at
//! once.

pub mod files;
pub mod lab;
mod layer;
pub mod map;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use thiserror::Error;

use crate::denied;
use crate::filemode::PRIVATE_FILE;
use crate::storage::{Image, ImageError, OpenOptions};
use map::BlockMap;

/// Copy-ups are serialised per stripe of blocks (block number modulo this), so two partial
/// writes of one block never both copy it up.
const COPY_UP_STRIPES: usize = 64;
/// The unit a commit copies in.
const COMMIT_CHUNK: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum OverlayError {
    #[error("--overlay: {path} is the {what} itself; give --overlay a path of its own (remapblk empties PATH and PATH.spare at every start)")]
    SameFile { path: PathBuf, what: &'static str },
    #[error("cannot create overlay file {path}: {source}{}", denied::advice(.source, .path, denied::CREATE))]
    Create { path: PathBuf, source: io::Error },
    #[error("overlay: {0}")]
    Image(#[from] ImageError),
    #[error("overlay: image {path} was replaced while it was being opened; start again")]
    Replaced { path: PathBuf },
    #[error("overlay: cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OverlayError + 'a {
    move |source| OverlayError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// How the overlay keeps the guest's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Reflink,
    Map,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Reflink => "reflink",
            Kind::Map => "map",
        }
    }
}

/// The spare file and its copy at `PATH.spare`, which the remap table uses while serving.
pub struct SpareCopy {
    real: File,
    copy: File,
    copy_path: PathBuf,
}

/// Where the spare's copy of the overlay at `overlay` goes: beside it.
pub fn spare_copy_path(overlay: &Path) -> PathBuf {
    let mut p = overlay.as_os_str().to_owned();
    p.push(".spare");
    p.into()
}

/// Whether `path` names the same file as `file` (false when it does not exist).
fn same_file(path: &Path, file: &File) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) => {
            let f = file.metadata()?;
            Ok(m.dev() == f.dev() && m.ino() == f.ino())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Refuses `path` when it is one of the `protect`ed files.
fn check_not(path: &Path, protect: &[(&File, &'static str)]) -> Result<(), OverlayError> {
    for (file, what) in protect {
        if same_file(path, file).map_err(io_err("look at", path))? {
            return Err(OverlayError::SameFile {
                path: path.to_path_buf(),
                what,
            });
        }
    }
    Ok(())
}

/// Opens (creating) `path` for the overlay, refusing the image's or the spare's own file:
/// the overlay is emptied at start, and that must never be done to them.
fn open_scratch(path: &Path, protect: &[(&File, &'static str)]) -> Result<File, OverlayError> {
    check_not(path, protect)?;
    FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(PRIVATE_FILE)
        .open(path)
        .map_err(|source| OverlayError::Create {
            path: path.to_path_buf(),
            source,
        })
}

impl SpareCopy {
    /// Copies the spare file at `real` (which must exist) to the copy beside the overlay at
    /// `overlay`, for the remap table to open. Neither the overlay's path nor the copy's may
    /// be the image or the spare file: both are emptied. Runs before the lock-down: both
    /// files are opened for writing here, once.
    pub fn prepare(real: &Path, overlay: &Path, image: &File) -> Result<SpareCopy, OverlayError> {
        let real_file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .open(real)
            .map_err(io_err("open the spare file", real))?;
        let protect = [(&real_file, "spare file"), (image, "image")];
        check_not(overlay, &protect)?;
        let copy = spare_copy_path(overlay);
        let copy_file = open_scratch(&copy, &protect)?;
        let copy = copy.as_path();
        files::sync_contents(&copy_file, &real_file)
            .map_err(io_err("copy the spare file to", copy))?;
        Ok(SpareCopy {
            real: real_file,
            copy: copy_file,
            copy_path: copy.to_path_buf(),
        })
    }

    pub fn copy_path(&self) -> &Path {
        &self.copy_path
    }

    /// The real spare file, for the lock's check that it is the file locked.
    pub fn real(&self) -> &File {
        &self.real
    }

    /// The copy gets the real spare's contents again.
    fn revert(&self) -> io::Result<()> {
        files::sync_contents(&self.copy, &self.real).map(drop)
    }

    /// The real spare gets the copy's contents, durably.
    fn commit(&self) -> io::Result<()> {
        files::sync_contents(&self.real, &self.copy)?;
        self.real.sync_all()
    }
}

/// What `overlay-reset` and `overlay-commit` did to the data (the spare and the table are
/// the lab's business, see `lab`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Applied {
    /// Blocks the overlay held before.
    pub blocks: u64,
    /// Bytes written into the image (commit), 0 for a reset or a reflink.
    pub bytes_written: u64,
}

/// `query-status`' `overlay`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub path: String,
    pub mode: Kind,
    pub spare_path: String,
    /// Blocks changed since start-up or the last reset or commit.
    pub blocks: u64,
    pub block_size: u64,
    pub resets: u64,
    pub commits: u64,
}

/// The overlay layer: see the module's doc.
pub struct Overlay {
    kind: Kind,
    path: PathBuf,
    /// The image, read-only: where reads of blocks the overlay lacks go (map mode).
    base: Image,
    /// The overlay file (map mode) or the image's clone (reflink mode).
    upper: Image,
    /// The image, read-write, opened at start-up because the sandbox lets no file be opened
    /// for writing later. Used by `commit` alone: guest I/O never touches it.
    image: Image,
    /// Map mode: the blocks the overlay holds. Reflink mode: the blocks written, for status.
    map: BlockMap,
    bs: u64,
    copy_up: Vec<Mutex<()>>,
    spare: SpareCopy,
    resets: AtomicU64,
    commits: AtomicU64,
    /// One reset or commit at a time.
    busy: Mutex<()>,
}

impl Overlay {
    /// Builds the overlay at `path` over `image` (opened read-write by the caller, and kept
    /// for commits), with blocks of `block_size` bytes over `capacity` bytes. Empties
    /// whatever `path` held.
    pub fn open(
        image: Image,
        path: &Path,
        block_size: u32,
        capacity: u64,
        spare: SpareCopy,
    ) -> Result<Overlay, OverlayError> {
        let base = Image::open(&OpenOptions {
            path: image.path().to_path_buf(),
            size: None,
            default_size: 0,
            readonly: true,
            direct: false,
        })?;
        if !same_file(base.path(), image.file()).map_err(io_err("look at", image.path()))? {
            return Err(OverlayError::Replaced {
                path: image.path().to_path_buf(),
            });
        }
        let file = open_scratch(
            path,
            &[
                (image.file(), "image"),
                (&spare.real, "spare file"),
                (&spare.copy, "spare file"),
            ],
        )?;
        // Emptied first: a clone does not shorten a longer file, and a sparse overlay must
        // hold nothing of a previous run.
        file.set_len(0)
            .map_err(io_err("empty the overlay file", path))?;
        let kind = match files::reflink(&file, base.file()) {
            Ok(()) => Kind::Reflink,
            Err(e) if files::no_reflink(&e) => {
                // Sparse: every block reads from the image until written.
                file.set_len(image.size())
                    .map_err(io_err("size the overlay file", path))?;
                Kind::Map
            }
            Err(e) => return Err(io_err("clone the image to", path)(e)),
        };
        drop(file);
        let upper = Image::open(&OpenOptions {
            path: path.to_path_buf(),
            size: None,
            default_size: 0,
            readonly: false,
            direct: false,
        })?;
        let bs = u64::from(block_size);
        Ok(Overlay {
            kind,
            path: path.to_path_buf(),
            base,
            upper,
            image,
            map: BlockMap::new(capacity / bs),
            bs,
            copy_up: (0..COPY_UP_STRIPES).map(|_| Mutex::new(())).collect(),
            spare,
            resets: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            busy: Mutex::new(()),
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn status(&self) -> Status {
        Status {
            path: self.path.display().to_string(),
            mode: self.kind,
            spare_path: self.spare.copy_path.display().to_string(),
            blocks: self.map.held(),
            block_size: self.bs,
            resets: self.resets.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
        }
    }

    /// Drops every change: the data reads as the image's again and the spare copy holds the
    /// real spare's contents (the caller reloads the table from it). Only while nothing runs
    /// on the stack (quiesced).
    pub fn reset(&self) -> io::Result<Applied> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let blocks = self.map.held();
        self.map.clear();
        match self.kind {
            Kind::Reflink => files::reflink(self.upper.file(), self.base.file())?,
            // Punched only to give the space back: the map alone decides what is read.
            Kind::Map => drop(files::punch(self.upper.file(), 0, self.upper.size())),
        }
        self.spare.revert()?;
        self.resets.fetch_add(1, Ordering::Relaxed);
        Ok(Applied {
            blocks,
            bytes_written: 0,
        })
    }

    /// Writes every change into the image and the spare copy into the spare file, each made
    /// durable, then starts an empty overlay. Only while nothing runs on the stack.
    ///
    /// The image goes first, then the spare: a crash in between leaves the new data with the
    /// old remap table (a block remapped since the last commit then reads from the image
    /// again, holding what the guest last wrote there before the remap).
    pub fn commit(&self) -> io::Result<Applied> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let blocks = self.map.held();
        let mut bytes_written = 0;
        match self.kind {
            Kind::Reflink => files::reflink(self.image.file(), self.upper.file())?,
            Kind::Map => {
                let last = self.map.blocks().saturating_sub(1);
                let mut buf = vec![0u8; COMMIT_CHUNK as usize];
                for run in self.map.runs(0, last).filter(|r| r.held) {
                    let (mut at, end) = (run.first * self.bs, run.end * self.bs);
                    while at < end {
                        let n = (end - at).min(COMMIT_CHUNK);
                        bytes_written += self.commit_chunk(at, &mut buf[..n as usize])?;
                        at += n;
                    }
                }
            }
        }
        self.image.file().sync_data()?;
        self.spare.commit()?;
        self.map.clear();
        if self.kind == Kind::Map {
            let _ = files::punch(self.upper.file(), 0, self.upper.size());
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(Applied {
            blocks,
            bytes_written,
        })
    }

    /// Copies `buf.len()` bytes at `at` from the overlay into the image; zeros as a discard,
    /// so a hole stays a hole. Returns the bytes written.
    fn commit_chunk(&self, at: u64, buf: &mut [u8]) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        self.upper.file().read_exact_at(buf, at)?;
        if buf.iter().all(|&b| b == 0) {
            crate::storage::BlockIo::discard(&self.image, at, buf.len() as u64)?;
            Ok(0)
        } else {
            self.image.file().write_all_at(buf, at)?;
            Ok(buf.len() as u64)
        }
    }
}

#[cfg(test)]
mod tests;
