//! The crash-point checker: a scratch copy of the base image brought forward point by point
//! (each point continues from the last, never from the base again), a command run on it at
//! each, and the copy kept where the command first fails.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

use super::copy::clone_or_copy;
use super::format::Kind;
use super::reader::{Entry, LogError, LogFile};
use super::replay::{ReplayError, Replayer};

/// Which entries are points to check at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Each {
    /// After every flush (what a crash may leave once the disk's cache is written back).
    Flush,
    /// After every mark.
    Mark,
    /// After every entry.
    Entry,
}

impl Each {
    fn takes(self, e: &Entry) -> bool {
        match self {
            Each::Flush => e.header.is_flush(),
            Each::Mark => e.kind() == Kind::Mark,
            Each::Entry => true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("cannot copy {base} to the scratch copy {copy}: {source}; give --scratch DIR on a filesystem with room for it")]
    Copy {
        base: PathBuf,
        copy: PathBuf,
        source: io::Error,
    },
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error(
        "--from-mark {0}: the log has no mark of that name; `remapblk log list` shows its marks"
    )]
    NoSuchMark(String),
}

/// What `log check` does.
pub struct Check<'a> {
    pub log: &'a Path,
    pub base: &'a Path,
    pub each: Each,
    /// Check only the points from the first mark of this name on (the entries before it are
    /// replayed, not checked): a log that begins before the file system existed, say.
    pub from_mark: Option<&'a str>,
    /// Where the scratch copy goes; beside the base by default.
    pub scratch: Option<&'a Path>,
    /// The command, `{}` standing for the copy's path.
    pub cmd: &'a [String],
}

/// One point's line of output.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Counting from 1.
    pub point: usize,
    /// The log entry the copy was replayed up to (inclusive).
    pub entry: u64,
    pub kind: Kind,
    /// Which flush this is, counting from 1 (for `log replay --to-flush`).
    pub flush: Option<u64>,
    pub mark: Option<String>,
    /// The command's exit status; null when a signal ended it.
    pub status: Option<i32>,
    pub signal: Option<i32>,
    pub ok: bool,
}

/// How a check ended.
pub enum Outcome {
    /// Every point passed (`points` of them); the copy is removed.
    Passed { points: usize },
    /// The command failed at `point`; the copy is kept at `copy`, as it was then.
    Failed {
        point: Point,
        copy: PathBuf,
        output: Vec<u8>,
    },
}

/// Told of the run's progress (the terminal's progress bar, the lines on stdout).
pub trait Observer {
    fn start(&mut self, points: usize);
    /// A point is done; `replayed` is how many bytes of writes have been replayed so far.
    fn point(&mut self, p: &Point, replayed: u64);
}

impl Check<'_> {
    pub fn run(&self, obs: &mut dyn Observer) -> Result<Outcome, CheckError> {
        let log = LogFile::open(self.log)?;
        let entries = log.scan()?;
        let first = match self.from_mark {
            None => 0,
            Some(name) => entries
                .iter()
                .position(|e| e.mark.as_deref() == Some(name))
                .ok_or_else(|| CheckError::NoSuchMark(name.to_string()))?,
        };
        let points: Vec<usize> = (first..entries.len())
            .filter(|&i| self.each.takes(&entries[i]))
            .collect();
        obs.start(points.len());
        if points.is_empty() {
            return Ok(Outcome::Passed { points: 0 });
        }
        let copy = scratch_path(self.base, self.scratch);
        clone_or_copy(self.base, &copy).map_err(|source| CheckError::Copy {
            base: self.base.to_path_buf(),
            copy: copy.clone(),
            source,
        })?;
        let result = self.walk(&log, &entries, &points, &copy, obs);
        if !matches!(result, Ok(Outcome::Failed { .. })) {
            let _ = std::fs::remove_file(&copy);
        }
        result
    }

    fn walk(
        &self,
        log: &LogFile,
        entries: &[Entry],
        points: &[usize],
        copy: &Path,
        obs: &mut dyn Observer,
    ) -> Result<Outcome, CheckError> {
        let mut r = Replayer::open(copy)?;
        let mut next = 0;
        let mut flushes = 0u64;
        for (n, &at) in points.iter().enumerate() {
            for e in &entries[next..=at] {
                r.apply(log, e)?;
                flushes += u64::from(e.header.is_flush());
            }
            next = at + 1;
            let e = &entries[at];
            let (status, output) = self.run_cmd(copy)?;
            let point = Point {
                point: n + 1,
                entry: e.index,
                kind: e.kind(),
                flush: e.header.is_flush().then_some(flushes),
                mark: e.mark.clone(),
                status: status.code(),
                signal: status.signal(),
                ok: status.success(),
            };
            obs.point(&point, r.bytes);
            if !point.ok {
                return Ok(Outcome::Failed {
                    point,
                    copy: copy.to_path_buf(),
                    output,
                });
            }
        }
        Ok(Outcome::Passed {
            points: points.len(),
        })
    }

    /// Runs the command on `copy`; its output is kept for a failure's report.
    fn run_cmd(&self, copy: &Path) -> Result<(std::process::ExitStatus, Vec<u8>), CheckError> {
        let path = copy.display().to_string();
        let args: Vec<String> = self.cmd.iter().map(|a| a.replace("{}", &path)).collect();
        let (prog, rest) = args.split_first().ok_or_else(|| CheckError::Spawn {
            cmd: String::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no command given"),
        })?;
        let out = Command::new(prog)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CheckError::Spawn {
                cmd: prog.clone(),
                source,
            })?;
        let mut output = out.stdout;
        output.extend_from_slice(&out.stderr);
        Ok((out.status, output))
    }
}

/// `DIR/NAME.check-PID`, DIR being `--scratch` or the base's own directory.
fn scratch_path(base: &Path, dir: Option<&Path>) -> PathBuf {
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_string());
    let dir = dir
        .map(Path::to_path_buf)
        .or_else(|| base.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    dir.join(format!("{name}.check-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use crate::writelog::LogWriter;
    use std::sync::Arc;

    struct Seen(Vec<Point>, usize);
    impl Observer for Seen {
        fn start(&mut self, points: usize) {
            self.1 = points;
        }
        fn point(&mut self, p: &Point, _: u64) {
            self.0.push(p.clone());
        }
    }

    /// Writes byte `i` at offset 512 * i for i in 1..=5, each followed by a flush; a mark
    /// after the third.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 8192]).unwrap();
        let w = LogWriter::create(&log, &[], Arc::new(EventLog::disabled())).unwrap();
        for i in 1..=5u8 {
            let buf = [i; 512];
            let iov = [libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: 512,
            }];
            // SAFETY: `buf` outlives the call.
            unsafe { w.write(512 * u64::from(i), &iov) };
            w.flush();
            if i == 3 {
                w.mark("three").unwrap();
            }
        }
        (dir, log, base)
    }

    fn sh(script: &str) -> Vec<String> {
        ["sh", "-c", script, "sh", "{}"].map(String::from).to_vec()
    }

    #[test]
    fn the_first_failing_point_stops_the_check_and_keeps_its_copy() {
        let (dir, log, base) = setup();
        // Fails once byte 4 is at offset 2048: after the fourth flush.
        let cmd = sh("test \"$(od -An -tu1 -j2048 -N1 \"$1\" | tr -d ' ')\" != 4");
        let c = Check {
            log: &log,
            base: &base,
            each: Each::Flush,
            from_mark: None,
            scratch: Some(dir.path()),
            cmd: &cmd,
        };
        let mut seen = Seen(Vec::new(), 0);
        let Outcome::Failed { point, copy, .. } = c.run(&mut seen).unwrap() else {
            panic!("the check passed")
        };
        assert_eq!(seen.1, 5);
        assert_eq!(seen.0.len(), 4);
        assert!(seen.0[..3].iter().all(|p| p.ok));
        assert_eq!(
            (point.point, point.flush, point.status),
            (4, Some(4), Some(1))
        );
        // Entries: w f w f w f m w f: the fourth flush is entry 8.
        assert_eq!(point.entry, 8);
        let kept = std::fs::read(&copy).unwrap();
        for i in 1..=4usize {
            assert_eq!(kept[512 * i], i as u8);
        }
        assert_eq!(kept[512 * 5], 0, "the copy stops at the failing point");
        assert_eq!(
            std::fs::read(&base).unwrap(),
            vec![0u8; 8192],
            "the base is untouched"
        );
    }

    #[test]
    fn a_check_that_passes_everywhere_removes_its_copy() {
        let (dir, log, base) = setup();
        for (each, n) in [(Each::Flush, 5), (Each::Mark, 1), (Each::Entry, 11)] {
            let c = Check {
                log: &log,
                base: &base,
                each,
                from_mark: None,
                scratch: None,
                cmd: &sh("test -f \"$1\""),
            };
            let mut seen = Seen(Vec::new(), 0);
            assert!(matches!(c.run(&mut seen).unwrap(), Outcome::Passed { points } if points == n));
            assert_eq!(seen.0.len(), n);
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".check-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn from_mark_checks_only_the_points_after_it_on_a_copy_replayed_from_the_start() {
        let (dir, log, base) = setup();
        // Fails until byte 3 is in place: at every flush before the mark "three".
        let cmd = sh("test \"$(od -An -tu1 -j1536 -N1 \"$1\" | tr -d ' ')\" = 3");
        let c = Check {
            log: &log,
            base: &base,
            each: Each::Flush,
            from_mark: Some("three"),
            scratch: Some(dir.path()),
            cmd: &cmd,
        };
        let mut seen = Seen(Vec::new(), 0);
        assert!(matches!(
            c.run(&mut seen).unwrap(),
            Outcome::Passed { points: 2 }
        ));
        let flushes: Vec<_> = seen.0.iter().map(|p| p.flush).collect();
        assert_eq!(
            flushes,
            [Some(4), Some(5)],
            "the flushes after the mark, counted from the log's start"
        );

        let c = Check {
            from_mark: Some("four"),
            ..c
        };
        let err = c.run(&mut seen).err().expect("an unknown mark is an error");
        assert!(err.to_string().starts_with("--from-mark four"), "{err}");
    }
}
