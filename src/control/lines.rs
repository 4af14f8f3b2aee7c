//! A control client's request lines, read with a bound: a line that is not UTF-8 or is longer
//! than [`MAX_LINE`] is a refused line (its sender gets an error reply), not the end of the
//! connection. An over-long line is skipped up to its newline without being kept, so a client
//! cannot make the server hold more than the bound per connection.

use std::io::{self, BufRead};

use thiserror::Error;

/// The longest request line taken, without its newline.
pub const MAX_LINE: usize = 1 << 20;

/// Why a line was not taken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LineError {
    #[error("the request is not valid UTF-8 (the first bad byte is at offset {at} of the line); send JSON text encoded in UTF-8, one object per line")]
    NotUtf8 { at: usize },
    #[error("the request line is longer than {limit} bytes, the most a line may hold; it was skipped. Send one JSON object per line, at most {limit} bytes each")]
    TooLong { limit: usize },
}

/// Lines of at most `limit` bytes off `inner`.
pub struct Lines<R> {
    inner: R,
    limit: usize,
    /// The line being read; never grows past `limit`.
    line: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    pub fn new(inner: R, limit: usize) -> Lines<R> {
        Lines {
            inner,
            limit,
            line: Vec::new(),
        }
    }

    /// The next line without its line end (`\n` or `\r\n`), or why it was refused; None once
    /// the stream has ended. A last line without a newline counts as a line.
    pub fn next_line(&mut self) -> io::Result<Option<Result<String, LineError>>> {
        let line = &mut self.line;
        line.clear();
        let mut too_long = false;
        let mut read_any = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                if !read_any {
                    return Ok(None);
                }
                break;
            }
            read_any = true;
            let newline = avail.iter().position(|&b| b == b'\n');
            let part = &avail[..newline.unwrap_or(avail.len())];
            if !too_long {
                if line.len() + part.len() > self.limit {
                    too_long = true;
                    line.clear();
                } else {
                    line.extend_from_slice(part);
                }
            }
            let used = newline.map_or(avail.len(), |i| i + 1);
            self.inner.consume(used);
            if newline.is_some() {
                break;
            }
        }
        if too_long {
            return Ok(Some(Err(LineError::TooLong { limit: self.limit })));
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Some(match std::str::from_utf8(line) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(LineError::NotUtf8 {
                at: e.valid_up_to(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor, Read};

    fn all(input: &[u8], limit: usize, capacity: usize) -> Vec<Result<String, LineError>> {
        let mut lines = Lines::new(
            BufReader::with_capacity(capacity, Cursor::new(input)),
            limit,
        );
        let mut out = Vec::new();
        while let Some(l) = lines.next_line().unwrap() {
            out.push(l);
        }
        out
    }

    #[test]
    fn lines_up_to_the_bound_are_taken_and_longer_ones_refused_alone() {
        for capacity in [1, 3, 8, 4096] {
            let got = all(b"abcd\r\nabcde\nabcdef\n\nx\xffy\nlast", 5, capacity);
            assert_eq!(
                got,
                vec![
                    Ok("abcd".to_string()),
                    Ok("abcde".to_string()),
                    Err(LineError::TooLong { limit: 5 }),
                    Ok(String::new()),
                    Err(LineError::NotUtf8 { at: 1 }),
                    Ok("last".to_string()),
                ],
                "read buffer of {capacity} bytes"
            );
        }
        assert!(all(b"", 5, 8).is_empty());
    }

    #[test]
    fn an_over_long_line_is_skipped_without_being_kept() {
        const HUGE: u64 = 64 << 20;
        let input = io::repeat(b'x')
            .take(HUGE)
            .chain(&b"\n{\"execute\":\"x\"}\n"[..]);
        let mut lines = Lines::new(BufReader::new(input), 1024);
        assert_eq!(
            lines.next_line().unwrap(),
            Some(Err(LineError::TooLong { limit: 1024 }))
        );
        assert!(
            lines.line.capacity() <= 2048,
            "{} bytes kept for a refused line",
            lines.line.capacity()
        );
        assert_eq!(
            lines.next_line().unwrap(),
            Some(Ok("{\"execute\":\"x\"}".to_string()))
        );
        assert_eq!(lines.next_line().unwrap(), None);
    }

    #[test]
    fn the_errors_say_what_was_wrong_and_what_to_send() {
        let e = LineError::TooLong { limit: MAX_LINE }.to_string();
        assert!(e.contains("1048576 bytes"), "{e}");
        let e = LineError::NotUtf8 { at: 3 }.to_string();
        assert!(e.contains("UTF-8") && e.contains("offset 3"), "{e}");
    }
}
