//! `remapblk log list|replay|check`: the offline side of the write log, as the command line
//! runs it. Exit codes: 0 success, 1 a failure (a damaged log, a failing point), 2 bad usage.

use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::check::{Check, Observer, Outcome, Point};
use super::format::Kind;
use super::reader::LogFile;
use super::replay::{stop_index, Replayer, Until};
use crate::args::{LogAction, ReplayUntil};

pub fn run(action: LogAction) -> ExitCode {
    let result = match action {
        LogAction::List { log } => list(&log),
        LogAction::Replay { log, image, until } => replay(&log, &image, until),
        LogAction::Check {
            log,
            base,
            each,
            from_mark,
            scratch,
            cmd,
        } => {
            if !cmd.iter().any(|a| a.contains("{}")) {
                eprintln!(
                    "remapblk log check: the command never names the copy: put {{}} where its \
                     path goes, e.g. -- e2fsck -fn {{}}"
                );
                return ExitCode::from(2);
            }
            let c = Check {
                log: &log,
                base: &base,
                each,
                from_mark: from_mark.as_deref(),
                scratch: scratch.as_deref(),
                cmd: &cmd,
            };
            check(&c)
        }
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("remapblk log: {msg}");
            ExitCode::from(1)
        }
    }
}

/// One line of `log list`.
#[derive(Serialize)]
struct Line<'a> {
    index: u64,
    kind: Kind,
    /// In 512-byte sectors.
    lba: u64,
    /// In bytes.
    len: u64,
    mark: Option<&'a str>,
}

fn list(path: &Path) -> Result<ExitCode, String> {
    let log = LogFile::open(path).map_err(|e| e.to_string())?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    for e in log.entries() {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                let _ = out.flush();
                return Err(err.to_string());
            }
        };
        let line = Line {
            index: e.index,
            kind: e.kind(),
            lba: e.lba(),
            len: e.len(),
            mark: e.mark.as_deref(),
        };
        let text = serde_json::to_string(&line).map_err(|e| e.to_string())?;
        if let Err(err) = writeln!(out, "{text}") {
            return quiet_on_broken_pipe(err);
        }
    }
    match out.flush() {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => quiet_on_broken_pipe(err),
    }
}

/// A reader that went away (`| head`) is no failure of ours.
fn quiet_on_broken_pipe(err: io::Error) -> Result<ExitCode, String> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("writing the list: {err}"))
    }
}

fn replay(path: &Path, image: &Path, until: ReplayUntil) -> Result<ExitCode, String> {
    let until = match (until.to_mark, until.to_flush, until.to_entry) {
        (Some(m), _, _) => Until::Mark(m),
        (_, Some(n), _) => Until::Flush(n),
        (_, _, Some(n)) => Until::Entry(n),
        // clap requires exactly one of the three.
        (None, None, None) => return Ok(ExitCode::from(2)),
    };
    let log = LogFile::open(path).map_err(|e| e.to_string())?;
    // The whole log is read and the stop found before the copy is touched: a damaged log or
    // a missing mark leaves the copy as it was.
    let entries = log.scan().map_err(|e| e.to_string())?;
    let stop = stop_index(&entries, &until).map_err(|e| e.to_string())?;
    let mut r = Replayer::open(image).map_err(|e| e.to_string())?;
    let started = Instant::now();
    for e in &entries[..=stop] {
        r.apply(&log, e).map_err(|e| e.to_string())?;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "remapblk log: replayed entries 0 to {stop} onto {} ({} bytes of writes in {secs:.2} s, {:.0} MB/s)",
        image.display(),
        r.bytes,
        r.bytes as f64 / secs.max(1e-9) / 1e6
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints each point's line on stdout and, on a terminal, a progress bar on stderr.
struct Report {
    bar: Option<ProgressBar>,
    started: Instant,
    /// Whether a line could not be written (said once on stderr; the check goes on, its
    /// exit status and kept copy still tell the outcome).
    warned: bool,
}

impl Observer for Report {
    fn start(&mut self, points: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(points as u64);
        }
        self.started = Instant::now();
    }

    fn point(&mut self, p: &Point, replayed: u64) {
        let line = serde_json::to_string(p).unwrap_or_default();
        let print = || writeln!(io::stdout().lock(), "{line}");
        let written = match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        };
        if let Err(e) = written {
            if !self.warned && e.kind() != io::ErrorKind::BrokenPipe {
                eprintln!("remapblk log check: cannot print the points: {e}");
            }
            self.warned = true;
        }
        if let Some(bar) = &self.bar {
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.0} MB/s replayed", replayed as f64 / secs / 1e6));
            bar.inc(1);
        }
    }
}

fn check(c: &Check) -> Result<ExitCode, String> {
    let bar = io::stderr().is_terminal().then(|| {
        let style =
            ProgressStyle::with_template("{bar:40} {pos}/{len} points, {per_sec}, {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        ProgressBar::new(0).with_style(style)
    });
    let mut report = Report {
        bar,
        started: Instant::now(),
        warned: false,
    };
    let outcome = c.run(&mut report);
    if let Some(bar) = &report.bar {
        bar.finish_and_clear();
    }
    match outcome.map_err(|e| e.to_string())? {
        Outcome::Passed { points: 0 } => {
            let each = clap::ValueEnum::to_possible_value(&c.each)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            eprintln!(
                "remapblk log check: {} has no point to check at (--each {each}); nothing was run",
                c.log.display(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Passed { points } => {
            if points == 1 {
                eprintln!("remapblk log check: the one point passed");
            } else {
                eprintln!("remapblk log check: all {points} points passed");
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Failed {
            point,
            copy,
            output,
        } => {
            let _ = io::stderr().write_all(&output);
            let how = match (point.status, point.signal) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                (None, None) => "an unknown status".to_string(),
            };
            eprintln!(
                "remapblk log check: the command failed at point {} (entry {}) with {how}; the \
                 copy as it was then is kept at {} (remapblk log replay {} --image COPY \
                 --to-entry {} rebuilds it)",
                point.point,
                point.entry,
                copy.display(),
                c.log.display(),
                point.entry
            );
            Ok(ExitCode::from(1))
        }
    }
}
