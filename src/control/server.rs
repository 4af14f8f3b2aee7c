//! Listens on the control socket; one thread per client, so a slow `quiesce` never holds up
//! another client's `query-stats`.

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use log::{debug, info, warn};

use super::commands::Commands;
use super::lines::{Lines, MAX_LINE};
use super::protocol::{parse_request, reply, CommandError};
use crate::fdlimit::Acceptor;
use crate::filemode::SocketMode;
use crate::sandbox::{self, Role};
use crate::unix::{self, SocketError};

pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Claims `path` (replacing a stale socket, refusing a live one), makes the socket with
    /// `mode` and serves it from a background thread.
    pub fn start(
        path: &Path,
        mode: SocketMode,
        commands: Arc<Commands>,
    ) -> Result<ControlServer, SocketError> {
        let mut listener = Acceptor::new(unix::listen(path, mode)?);
        info!("control socket on {}", path.display());
        thread::Builder::new()
            .name("control".to_string())
            .spawn(move || loop {
                let conn = listener.accept();
                // Not at the thread's start: it starts before the process-wide filter, which
                // must come first (see `sandbox`).
                sandbox::enter(Role::Control);
                match conn {
                    Ok(stream) => {
                        let commands = commands.clone();
                        let spawned = thread::Builder::new()
                            .name("control-client".to_string())
                            .spawn(move || serve_client(stream, &commands));
                        if let Err(e) = spawned {
                            warn!("control socket: a client was closed unserved: cannot start its thread: {e}");
                        }
                    }
                    Err(e) if e.is_repeat() => {}
                    Err(e) => warn!("control socket: {e}"),
                }
            })
            .map_err(|source| SocketError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_client(stream: UnixStream, commands: &Commands) {
    // Reads and writes share the one descriptor (no clone to run out of).
    let out = &stream;
    let mut lines = Lines::new(BufReader::new(&stream), MAX_LINE);
    while let Ok(Some(line)) = lines.next_line() {
        let result = match line {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => parse_request(&line).and_then(|req| {
                debug!("control: {}", req.execute);
                commands.dispatch(&req)
            }),
            Err(refused) => {
                debug!("control: {refused}");
                Err(CommandError::generic(refused.to_string()))
            }
        };
        if write_line(out, &reply(&result)).is_err() {
            return;
        }
    }
}

fn write_line(mut out: &UnixStream, line: &str) -> io::Result<()> {
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")
}
