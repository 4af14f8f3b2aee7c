//! Listens on the control socket; one thread per client, so a slow `quiesce` never holds up
//! another client's `query-stats`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use log::{debug, info, warn};

use super::commands::Commands;
use super::protocol::{parse_request, reply};
use crate::sandbox::{self, Role};
use crate::unix::{self, SocketError};

pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Claims `path` (replacing a stale socket, refusing a live one) and serves it from a
    /// background thread.
    pub fn start(path: &Path, commands: Arc<Commands>) -> Result<ControlServer, SocketError> {
        let listener = unix::listen(path)?;
        info!("control socket on {}", path.display());
        thread::Builder::new()
            .name("control".to_string())
            .spawn(move || {
                for conn in listener.incoming() {
                    // Not at the thread's start: it starts before the process-wide filter,
                    // which must come first (see `sandbox`).
                    sandbox::enter(Role::Control);
                    match conn {
                        Ok(stream) => {
                            let commands = commands.clone();
                            let _ = thread::Builder::new()
                                .name("control-client".to_string())
                                .spawn(move || serve_client(stream, &commands));
                        }
                        Err(e) => warn!("control socket: accept failed: {e}"),
                    }
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
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut out = stream;
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let result = parse_request(&line).and_then(|req| {
            debug!("control: {}", req.execute);
            commands.dispatch(&req)
        });
        if write_line(&mut out, &reply(&result)).is_err() {
            return;
        }
    }
}

fn write_line(out: &mut UnixStream, line: &str) -> io::Result<()> {
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")
}
