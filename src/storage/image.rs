//! Opening (or creating) the main image, and the synchronous engine: vectored positional I/O
//! straight between the file and guest memory, run on the queue's worker thread.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use log::info;
use thiserror::Error;

use super::iov::{gather, scatter};
use super::{open_noatime, BlockIo, Dir, Extent, MapIo, Mapping, Source};
use crate::denied;

/// `BLKGETSIZE64`, `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKDISCARD`, `_IO(0x12, 119)`.
pub const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`, `_IO(0x12, 127)`.
pub const BLKZEROOUT: libc::c_ulong = 0x127f;

/// O_DIRECT wants memory, offsets and lengths aligned; 4096 covers every logical block size.
const DIRECT_ALIGN: usize = 4096;
/// Size of the zero buffer used when a range has to be zeroed by writing.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    File,
    BlockDevice,
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub path: PathBuf,
    /// `--size`: create a missing image of this size, grow a smaller one, refuse to shrink.
    pub size: Option<u64>,
    /// Size of an image created when `--size` is absent.
    pub default_size: u64,
    pub readonly: bool,
    pub direct: bool,
}

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot open image {path}: {source}{}", denied::advice(.source, .path, denied::READ_WRITE))]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create image {path}: {source}{}", denied::advice(.source, .path, denied::CREATE))]
    Create { path: PathBuf, source: io::Error },
    #[error("image {path} does not exist, and --readonly will not create it; create it first or drop --readonly")]
    MissingReadonly { path: PathBuf },
    #[error("image {path} holds {current} bytes; --size {requested} would shrink it and destroy data. Pass --size {current} or more, or omit --size")]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("image {path} holds {current} bytes; growing it to --size {requested} needs write access: drop --readonly or --size")]
    GrowReadonly {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("{path} is a block device of {current} bytes; its size cannot be changed to --size {requested}. Omit --size")]
    BlockDeviceSize {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotAFile { path: PathBuf },
    #[error("cannot read the size of block device {path}: {source}")]
    DeviceSize { path: PathBuf, source: io::Error },
    #[error("cannot open {path} with O_DIRECT: {source}. The filesystem may not support direct I/O (tmpfs does not); drop --direct")]
    Direct { path: PathBuf, source: io::Error },
}

pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
    kind: ImageKind,
    direct: bool,
}

/// An image opened and checked against `--size` but not yet grown: everything [`Image::open`]
/// does before it changes an existing image, so that the caller can lock the image first.
pub struct Checked {
    image: Image,
    grow_to: Option<u64>,
}

impl Checked {
    /// The image's file, to check that a lock taken by path is on this file.
    pub fn file(&self) -> &File {
        &self.image.file
    }

    /// Grows the image to the size `--size` asked for, if larger.
    pub fn grow(self) -> Result<Image, ImageError> {
        let Checked { mut image, grow_to } = self;
        if let Some(requested) = grow_to {
            image
                .file
                .set_len(requested)
                .map_err(|source| ImageError::Create {
                    path: image.path.clone(),
                    source,
                })?;
            info!(
                "grew image {} from {} to {} bytes",
                image.path.display(),
                image.size,
                requested
            );
            image.size = requested;
        }
        Ok(image)
    }
}

impl Image {
    /// Opens the image (creating a missing one) and grows it to `--size`.
    pub fn open(opts: &OpenOptions) -> Result<Image, ImageError> {
        Image::open_checked(opts)?.grow()
    }

    /// Opens the image (creating a missing one) and checks `--size` against it, changing
    /// nothing of an existing image; [`Checked::grow`] does the rest.
    pub fn open_checked(opts: &OpenOptions) -> Result<Checked, ImageError> {
        let path = opts.path.clone();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(ImageError::Open { path, source }),
        };
        let kind = match &meta {
            None => {
                if opts.readonly {
                    return Err(ImageError::MissingReadonly { path });
                }
                let size = opts.size.unwrap_or(opts.default_size);
                create_sparse(&path, size)?;
                info!("created sparse image {} of {} bytes", path.display(), size);
                ImageKind::File
            }
            Some(m) if m.file_type().is_block_device() => ImageKind::BlockDevice,
            Some(m) if m.is_file() => ImageKind::File,
            Some(_) => return Err(ImageError::NotAFile { path }),
        };

        let mut fs_opts = FsOpenOptions::new();
        fs_opts.read(true).write(!opts.readonly);
        let flags = if opts.direct { libc::O_DIRECT } else { 0 };
        let file = open_noatime(&mut fs_opts, flags, &path).map_err(|source| {
            if opts.direct && source.raw_os_error() == Some(libc::EINVAL) {
                ImageError::Direct {
                    path: path.clone(),
                    source,
                }
            } else {
                ImageError::Open {
                    path: path.clone(),
                    source,
                }
            }
        })?;

        let mut grow_to = None;
        let size = match kind {
            ImageKind::BlockDevice => {
                let current =
                    block_device_size(&file).map_err(|source| ImageError::DeviceSize {
                        path: path.clone(),
                        source,
                    })?;
                if let Some(requested) = opts.size.filter(|s| *s != current) {
                    return Err(ImageError::BlockDeviceSize {
                        path,
                        current,
                        requested,
                    });
                }
                current
            }
            ImageKind::File => {
                let current = file
                    .metadata()
                    .map_err(|source| ImageError::Open {
                        path: path.clone(),
                        source,
                    })?
                    .len();
                match opts.size {
                    Some(requested) if requested < current => {
                        return Err(ImageError::Shrink {
                            path,
                            current,
                            requested,
                        })
                    }
                    Some(requested) if requested > current => {
                        if opts.readonly {
                            return Err(ImageError::GrowReadonly {
                                path,
                                current,
                                requested,
                            });
                        }
                        grow_to = Some(requested);
                        current
                    }
                    _ => current,
                }
            }
        };

        Ok(Checked {
            image: Image {
                file,
                path,
                size,
                kind,
                direct: opts.direct,
            },
            grow_to,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    /// The open file, for whole-file operations (the overlay's reflinks and commits).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    fn needs_bounce(&self, iov: &[libc::iovec]) -> bool {
        self.direct
            && iov.iter().any(|v| {
                !(v.iov_base as usize).is_multiple_of(DIRECT_ALIGN)
                    || !v.iov_len.is_multiple_of(DIRECT_ALIGN)
            })
    }

    fn write_zeros_by_hand(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = AlignedBuf::new(ZERO_CHUNK.min(len as usize).max(DIRECT_ALIGN))?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len as u64) as usize;
            let iov = [libc::iovec {
                iov_base: zeros.ptr.cast(),
                iov_len: n,
            }];
            // SAFETY: `zeros` is a live allocation of at least `n` bytes.
            unsafe { transfer(self.fd(), offset + done, &iov, Dir::Write)? };
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe { libc::fallocate(self.fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn blk_ioctl(&self, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64s from the pointer.
        let r = unsafe { libc::ioctl(self.fd(), req, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl BlockIo for Image {
    unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        if self.needs_bounce(iov) {
            let total: usize = iov.iter().map(|v| v.iov_len).sum();
            let buf = AlignedBuf::new(total.next_multiple_of(DIRECT_ALIGN))?;
            let biov = [libc::iovec {
                iov_base: buf.ptr.cast(),
                iov_len: total,
            }];
            // SAFETY: `buf` is a live allocation of at least `total` bytes; the caller vouches
            // for `iov`.
            unsafe {
                transfer(self.fd(), offset, &biov, Dir::Read)?;
                scatter(iov, std::slice::from_raw_parts(buf.ptr, total));
            }
            return Ok(());
        }
        // SAFETY: the caller vouches for `iov`.
        unsafe { transfer(self.fd(), offset, iov, Dir::Read) }
    }

    unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        if self.needs_bounce(iov) {
            let total: usize = iov.iter().map(|v| v.iov_len).sum();
            let buf = AlignedBuf::new(total.next_multiple_of(DIRECT_ALIGN))?;
            let biov = [libc::iovec {
                iov_base: buf.ptr.cast(),
                iov_len: total,
            }];
            // SAFETY: `buf` is a live allocation of at least `total` bytes; the caller vouches
            // for `iov`.
            unsafe {
                gather(iov, std::slice::from_raw_parts_mut(buf.ptr, total));
                return transfer(self.fd(), offset, &biov, Dir::Write);
            }
        }
        // SAFETY: the caller vouches for `iov`.
        unsafe { transfer(self.fd(), offset, iov, Dir::Write) }
    }

    fn map<'a>(&'a self, io: MapIo, out: &mut Mapping<'a>) -> bool {
        out.push(Extent {
            at: io.at,
            len: io.len,
            source: Source::File {
                fd: self.file.as_fd(),
                offset: io.offset,
                align: if self.direct { DIRECT_ALIGN as u64 } else { 1 },
            },
        });
        true
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.kind {
            // Reads after a discard must return zeros (the guest may rely on it after a
            // DISCARD when write_zeroes_may_unmap is set), so a device without discard support
            // gets an explicit zero-out instead of nothing.
            ImageKind::BlockDevice => self
                .blk_ioctl(BLKZEROOUT, offset, len)
                .or_else(|_| self.write_zeros_by_hand(offset, len)),
            ImageKind::File => self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .or_else(|e| {
                    if unsupported(&e) {
                        self.write_zeros_by_hand(offset, len)
                    } else {
                        Err(e)
                    }
                }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match self.kind {
            ImageKind::BlockDevice => {
                let first = if unmap {
                    self.blk_ioctl(BLKDISCARD, offset, len)
                        .and_then(|_| self.blk_ioctl(BLKZEROOUT, offset, len))
                } else {
                    self.blk_ioctl(BLKZEROOUT, offset, len)
                };
                first.or_else(|_| self.write_zeros_by_hand(offset, len))
            }
            ImageKind::File => {
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                self.fallocate(mode, offset, len).or_else(|e| {
                    if unsupported(&e) {
                        self.write_zeros_by_hand(offset, len)
                    } else {
                        Err(e)
                    }
                })
            }
        }
    }
}

fn create_sparse(path: &Path, size: u64) -> Result<(), ImageError> {
    let err = |source| ImageError::Create {
        path: path.to_path_buf(),
        source,
    };
    let f = FsOpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    f.set_len(size).map_err(err)?;
    f.sync_all().map_err(err)
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Moves all of `iov` at `offset`, retrying short transfers and EINTR.
///
/// # Safety
/// As for [`BlockIo::readv`]/[`BlockIo::writev`].
unsafe fn transfer(fd: libc::c_int, offset: u64, iov: &[libc::iovec], dir: Dir) -> io::Result<()> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    // Only a short transfer (rare) needs a mutable copy of the vector.
    let mut owned: Option<Vec<libc::iovec>> = None;
    while done < total {
        let cur: &[libc::iovec] = owned.as_deref().unwrap_or(iov);
        let n = cur.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let pos = (offset + done as u64) as libc::off_t;
        // SAFETY: `cur` holds `n` iovecs the caller vouches for (or a suffix of them).
        let r = unsafe {
            match dir {
                Dir::Read => libc::preadv(fd, cur.as_ptr(), n, pos),
                Dir::Write => libc::pwritev(fd, cur.as_ptr(), n, pos),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("image ends at offset {pos}, inside the request"),
            ));
        }
        done += r as usize;
        if done < total {
            let mut v = owned.take().unwrap_or_else(|| iov.to_vec());
            advance(&mut v, r as usize);
            owned = Some(v);
        }
    }
    Ok(())
}

fn advance(v: &mut Vec<libc::iovec>, mut n: usize) {
    let mut skip = 0;
    for io in v.iter_mut() {
        if n >= io.iov_len {
            n -= io.iov_len;
            skip += 1;
        } else {
            // SAFETY: stays inside the same buffer.
            io.iov_base = unsafe { io.iov_base.cast::<u8>().add(n).cast() };
            io.iov_len -= n;
            break;
        }
    }
    v.drain(..skip);
}

/// A zeroed, page-aligned heap buffer for O_DIRECT bounces and zero-outs.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "bounce buffer allocation failed",
            ));
        }
        Ok(AlignedBuf { ptr, len, layout })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(path: &Path) -> OpenOptions {
        OpenOptions {
            path: path.to_path_buf(),
            size: None,
            default_size: 1 << 20,
            readonly: false,
            direct: false,
        }
    }

    #[test]
    fn creates_sparse_and_refuses_to_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let img = Image::open(&opts(&p)).unwrap();
        assert_eq!(img.size(), 1 << 20);
        drop(img);
        let mut o = opts(&p);
        o.size = Some(4096);
        let e = Image::open(&o).err().unwrap();
        assert!(matches!(e, ImageError::Shrink { current, .. } if current == 1 << 20));
        assert!(e.to_string().contains("shrink"));
        o.size = Some(2 << 20);
        assert_eq!(Image::open(&o).unwrap().size(), 2 << 20);
    }

    #[test]
    fn reads_leave_the_access_time_alone() {
        let dir = tempfile::tempdir().unwrap();
        let img = Image::open(&opts(&dir.path().join("img"))).unwrap();
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(img.fd(), libc::F_GETFL) };
        // The tests run as the file's owner, so the kernel allows O_NOATIME.
        assert_ne!(flags & libc::O_NOATIME, 0, "flags {flags:o}");
    }

    #[test]
    fn readonly_refuses_to_create() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(&dir.path().join("missing"));
        o.readonly = true;
        assert!(matches!(
            Image::open(&o),
            Err(ImageError::MissingReadonly { .. })
        ));
    }

    #[test]
    fn vectored_round_trip_discard_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let img = Image::open(&opts(&dir.path().join("img"))).unwrap();
        let mut a = vec![0xaau8; 1024];
        let mut b = vec![0x55u8; 3072];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the buffers behind the iovecs outlive the call.
        unsafe { img.writev(8192, &iov).unwrap() };
        let mut back = vec![0u8; 4096];
        let riov = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        // SAFETY: the buffers behind the iovecs outlive the call.
        unsafe { img.readv(8192, &riov).unwrap() };
        assert!(back[..1024].iter().all(|&x| x == 0xaa));
        assert!(back[1024..].iter().all(|&x| x == 0x55));

        img.discard(8192, 4096).unwrap();
        // SAFETY: the buffers behind the iovecs outlive the call.
        unsafe { img.readv(8192, &riov).unwrap() };
        assert!(back.iter().all(|&x| x == 0));

        // SAFETY: the buffers behind the iovecs outlive the call.
        unsafe { img.writev(8192, &iov).unwrap() };
        img.write_zeroes(8192, 4096, false).unwrap();
        // SAFETY: the buffers behind the iovecs outlive the call.
        unsafe { img.readv(8192, &riov).unwrap() };
        assert!(back.iter().all(|&x| x == 0));
    }

    #[test]
    fn advance_skips_whole_and_partial_buffers() {
        let mut buf = [0u8; 64];
        let base = buf.as_mut_ptr();
        let mut v = vec![
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 16,
            },
            libc::iovec {
                // SAFETY: 16 bytes into the 64-byte `buf`.
                iov_base: unsafe { base.add(16) }.cast(),
                iov_len: 48,
            },
        ];
        advance(&mut v, 20);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 44);
        assert_eq!(v[0].iov_base as usize, base as usize + 20);
    }
}
