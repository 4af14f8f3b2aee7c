//! Copies between flat buffers and a request's iovecs (guest memory).

/// Writes a byte stream across a list of iovecs, front to back, in as many pieces as the
/// caller likes.
pub struct IovWriter<'a> {
    iov: &'a [libc::iovec],
    /// Index of the current iovec and bytes of it already written.
    i: usize,
    done: usize,
    left: usize,
}

impl<'a> IovWriter<'a> {
    pub fn new(iov: &'a [libc::iovec]) -> IovWriter<'a> {
        IovWriter {
            iov,
            i: 0,
            done: 0,
            left: iov.iter().map(|v| v.iov_len).sum(),
        }
    }

    /// Bytes the iovecs still have room for.
    pub fn left(&self) -> usize {
        self.left
    }

    /// Copies `n` bytes (at most `left()`) from `src` to the next positions.
    ///
    /// # Safety
    /// `src` is valid for `n` bytes of reads; every iovec for writes of its length.
    pub unsafe fn fill(&mut self, mut src: *const u8, mut n: usize) {
        while n > 0 {
            let v = &self.iov[self.i];
            let k = (v.iov_len - self.done).min(n);
            // SAFETY: the caller's promises; k stays within this iovec and within src.
            unsafe {
                std::ptr::copy_nonoverlapping(src, v.iov_base.cast::<u8>().add(self.done), k);
                src = src.add(k);
            }
            n -= k;
            self.left -= k;
            self.done += k;
            if self.done == v.iov_len {
                self.i += 1;
                self.done = 0;
            }
        }
    }
}

/// The part `[at, at + len)` of the byte stream `iov` describes, into `out` (cleared first).
pub fn sub_iovecs(iov: &[libc::iovec], at: u64, len: u64, out: &mut Vec<libc::iovec>) {
    out.clear();
    let mut pos = 0u64;
    let end = at + len;
    for v in iov {
        let (start, stop) = (pos, pos + v.iov_len as u64);
        pos = stop;
        if stop <= at {
            continue;
        }
        if start >= end {
            break;
        }
        let skip = at.saturating_sub(start);
        let take = stop.min(end) - start - skip;
        out.push(libc::iovec {
            // Stays inside the same iovec: `skip` is less than its length. wrapping_add keeps
            // this free of unsafe code; nothing is dereferenced here.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip as usize).cast(),
            iov_len: take as usize,
        });
    }
}

/// Copies the front of `data` into the iovecs, filling them.
///
/// # Safety
/// Every iovec must point to memory valid for writes of its length; `data` holds at least
/// their total length.
pub unsafe fn scatter(iov: &[libc::iovec], data: &[u8]) {
    let mut w = IovWriter::new(iov);
    assert!(
        data.len() >= w.left(),
        "scatter: source shorter than the iovecs"
    );
    // SAFETY: checked just above; the caller vouches for the iovecs.
    unsafe { w.fill(data.as_ptr(), w.left()) };
}

/// Copies the iovecs' bytes, in order, to the front of `out`.
///
/// # Safety
/// Every iovec must point to memory valid for reads of its length; `out` holds at least
/// their total length.
pub unsafe fn gather(iov: &[libc::iovec], out: &mut [u8]) {
    let mut at = 0;
    for v in iov {
        // SAFETY: the caller vouches for the iovecs.
        let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        out[at..at + v.iov_len].copy_from_slice(src);
        at += v.iov_len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_and_gather_cross_buffers_of_any_size() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 253) as u8).collect();
        let mut bufs = [vec![0u8; 1], vec![0u8; 600], vec![0u8; 399]];
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the buffers behind the iovecs outlive the call.
        unsafe { scatter(&iov, &data) };
        assert_eq!(bufs.concat(), data);
        let mut back = vec![0u8; 1000];
        // SAFETY: the buffers behind the iovecs outlive the call.
        unsafe { gather(&iov, &mut back) };
        assert_eq!(back, data);
        // In pieces that do not line up with the buffers.
        let mut w = IovWriter::new(&iov);
        for chunk in data.rchunks(7).rev() {
            // SAFETY: the buffers behind the iovecs outlive the call.
            unsafe { w.fill(chunk.as_ptr(), chunk.len()) };
        }
        assert_eq!(w.left(), 0);
        assert_eq!(bufs.concat(), data);
    }
}
