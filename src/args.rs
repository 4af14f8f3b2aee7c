//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::backend::{Polling, DEFAULT_POLL_MAX_US, MAX_NUM_QUEUES, MAX_QUEUE_SIZE};
use crate::cache::CacheModel;
use crate::control::protocol::CommandName;
use crate::filemode::SocketMode;
use crate::io::EngineKind;
use crate::sandbox;
use crate::virtio::ID_BYTES;

#[derive(Debug, Parser)]
#[command(
    name = "remapblk",
    version,
    about = "A vhost-user-blk disk server with a bad-block remap layer and fault injection",
    long_about = "remapblk serves a disk image to QEMU, cloud-hypervisor and libblkio over a \
vhost-user unix socket. Start it with `remapblk serve`; it prints the command lines that attach \
a VM to it.\n\nExit codes: 0 success, 1 runtime failure, 2 bad usage."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk image over vhost-user-blk until SIGINT or SIGTERM.
    // Boxed: serve's flags outweigh the other commands' many times over.
    Serve(Box<ServeArgs>),
    /// Send one command to a running server's control socket and print its answer as JSON.
    Ctl(CtlArgs),
    /// Inspect a spare file offline.
    Metadata {
        #[command(subcommand)]
        action: MetadataAction,
    },
    /// Read, replay and check a write log (serve --write-log) offline.
    Log {
        #[command(subcommand)]
        action: LogAction,
    },
}

/// `remapblk log`. Logs are in dm-log-writes' format (xfstests' replay-log reads them too).
#[derive(Debug, Subcommand)]
pub enum LogAction {
    /// Print one JSON line per entry, in completion order.
    ///
    /// Fields: index (from 0), kind (write, discard, write-zeroes, flush, mark), lba (in
    /// 512-byte sectors), len (in bytes), mark (a mark's name, else null). Only entries the
    /// log made durable are listed.
    List {
        /// The log.
        log: PathBuf,
    },
    /// Replay the log onto a copy of the image, up to a mark, a flush or an entry.
    ///
    /// Entries from the first up to and including the point given are applied onto COPY in
    /// place. COPY must be a copy of the image as it was when the server started; it is left
    /// untouched when the log is damaged or lacks the point.
    Replay {
        /// The log.
        log: PathBuf,
        /// The file or block device to replay onto (changed in place).
        #[arg(long, value_name = "COPY")]
        image: PathBuf,
        #[command(flatten)]
        until: ReplayUntil,
    },
    /// Run a command on the disk at every flush (or mark, or entry) of the log.
    ///
    /// Replays the log into a scratch copy of BASE point by point (each point continues from
    /// the last) and runs CMD at each, {} standing for the copy's path. Prints one JSON line
    /// per point with CMD's exit status. Exit 0: every point passed; 1: CMD failed at a point
    /// (the copy is kept as it was there, and named) or the log is damaged; 2: bad usage.
    #[command(after_help = "Example: remapblk log check run.log --base base.img -- e2fsck -fn {}")]
    Check {
        /// The log.
        log: PathBuf,
        /// The image as it was when the server started (left untouched).
        #[arg(long, value_name = "IMAGE")]
        base: PathBuf,
        /// Which entries are points to check at.
        #[arg(long, value_enum, default_value = "flush")]
        each: crate::writelog::check::Each,
        /// Check only from the first mark of this name on; the entries before it are replayed
        /// but not checked (e.g. the flushes of a mkfs still under way).
        #[arg(long, value_name = "NAME")]
        from_mark: Option<String>,
        /// Directory for the scratch copy (a reflink of BASE where the filesystem allows).
        /// Default: BASE's directory.
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
}

/// Where `log replay` stops: exactly one of these.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReplayUntil {
    /// Up to and including the first mark of this name.
    #[arg(long, value_name = "NAME")]
    pub to_mark: Option<String>,
    /// Up to and including the Nth flush (counting from 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub to_flush: Option<u64>,
    /// Up to and including the entry of index N (as `log list` numbers them).
    #[arg(long, value_name = "N")]
    pub to_entry: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum MetadataAction {
    /// Print the header and the newest valid table as JSON.
    Dump {
        /// The spare file.
        spare: PathBuf,
    },
    /// Verify both metadata slots. Exit 0: healthy; 1: one slot is bad (it is rewritten on the
    /// next start); 2: both are bad or the file is unreadable (the server refuses to start).
    Check {
        /// The spare file.
        spare: PathBuf,
    },
}

#[derive(Debug, Args)]
#[command(after_help = ctl_after_help())]
pub struct CtlArgs {
    /// The server's control socket.
    #[arg(long, value_name = "PATH", default_value = "remapblk.sock.ctl")]
    pub control: PathBuf,

    /// Command name, e.g. query-status (the commands are listed below).
    pub name: String,

    /// Arguments as key=value.
    #[arg(value_name = "KEY=VALUE")]
    pub args: Vec<String>,
}

/// `remapblk ctl --help`'s text after the options: the commands, from the list the server
/// dispatches on, so the help cannot miss one.
fn ctl_after_help() -> String {
    use clap::ValueEnum;
    let commands: Vec<(String, String)> = CommandName::value_variants()
        .iter()
        .filter_map(|c| c.to_possible_value())
        .map(|v| {
            let help = v.get_help().map(ToString::to_string).unwrap_or_default();
            (v.get_name().to_string(), help)
        })
        .collect();
    let width = commands.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut text = String::from("Commands:\n");
    for (name, help) in &commands {
        text += &format!("  {name:width$}  {help}\n");
    }
    text + "\n\
Example: remapblk ctl fault-add op=read lba=1000 mode=error\n\
Example: remapblk ctl query-stats\n\
Values are JSON where they parse (lba=1000), else strings (op=read).\n\
Exit codes: 0 success, 1 the command failed or nothing listens, 2 bad usage."
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Disk image: a raw file (created sparse when missing) or a block device.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "remapblk.img",
        visible_alias = "blk-file"
    )]
    pub image: PathBuf,

    /// Size of a new image, or a larger size to grow an existing one (e.g. 512M, 20G, 1T;
    /// binary units). Never shrinks an image. Default for a new image: 1G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// vhost-user unix socket to listen on. A stale socket file is replaced; one a live
    /// process listens on is refused.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "remapblk.sock",
        visible_alias = "socket-path"
    )]
    pub socket: PathBuf,

    /// Serve the listening unix socket this process inherited as descriptor N instead of
    /// --socket (vhost-user's backend program convention; left in place at exit). Under
    /// systemd socket activation (LISTEN_FDS, LISTEN_PID) the activated socket is used
    /// without this flag.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    pub fd: Option<i32>,

    /// Mode of the vhost-user socket and the control socket this process creates, in octal
    /// as chmod takes it (e.g. 0660 lets the group connect). Whoever can connect to either
    /// can read, write or fail the disk. An inherited socket (--fd) keeps its own mode.
    #[arg(long, value_name = "MODE", default_value_t = SocketMode::default())]
    pub socket_mode: SocketMode,

    /// Print the backend's capabilities as vhost-user's backend program conventions define
    /// them (a JSON object, "type": "block") and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Number of virtqueues offered to the guest, each served by its own thread (1-16).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_NUM_QUEUES)))]
    pub num_queues: u16,

    /// Largest virtqueue size the frontend may pick (a power of two, 4-1024).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Logical block size the guest sees.
    #[arg(long, value_name = "BYTES", default_value = "512",
          value_parser = parse_block_size)]
    pub block_size: u32,

    /// Offer a read-only disk; writes, discards and write-zeroes fail with IOERR.
    #[arg(long, visible_alias = "read-only")]
    pub readonly: bool,

    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    pub direct: bool,

    /// Serial number the guest reads with GET_ID (at most 20 bytes). Default: derived from
    /// the image's path.
    #[arg(long, value_name = "STR", value_parser = parse_serial)]
    pub serial: Option<String>,

    /// I/O engine (see the values below). Default: io_uring where the kernel allows it, else
    /// sync (the start-up log says which). Also read from REMAPBLK_ENGINE.
    #[arg(long, value_name = "ENGINE", value_enum, env = "REMAPBLK_ENGINE")]
    pub engine: Option<EngineKind>,

    /// After work, keep polling the ring (guest notifications off) and the engine's
    /// completions before sleeping again: saves a wakeup and a guest kick per request at the
    /// cost of CPU time spent polling. `auto`: a window per queue that grows while requests
    /// come soon after the last (doubling from 4 us, up to --poll-max-us) and halves down to
    /// 0 when they do not, so an idle disk costs no CPU; `0`: never poll; `N`: poll until
    /// nothing happened for N microseconds, every time (at most 1000000).
    #[arg(long, value_name = "auto|0|US", default_value = "auto", value_parser = parse_poll_us)]
    pub poll_us: PollUs,

    /// The cap of the adaptive window of --poll-us auto, in microseconds (1-1000000).
    /// [default: 50]
    #[arg(long, value_name = "US",
          value_parser = clap::value_parser!(u64).range(1..=MAX_POLL_US))]
    pub poll_max_us: Option<u64>,

    /// How long a ring stop, reset, disconnect or exit waits for in-flight requests before
    /// completing them with IOERR.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,

    /// Control socket (QMP-shaped JSON; see `remapblk ctl --help`). Default: <socket>.ctl.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// JSON array of fault-add argument objects, applied before the first frontend connects,
    /// e.g. [{"op": "read", "lba": 1000, "mode": "error"}].
    #[arg(long, value_name = "FILE")]
    pub faults: Option<PathBuf>,

    /// Spare file holding remapped blocks and the remap table. Default: <image>.spare,
    /// created when missing.
    #[arg(long, value_name = "PATH")]
    pub spare: Option<PathBuf>,

    /// Spare blocks in a new spare file. Default: 1% of the image's blocks, at least 1024.
    /// Up to 256 MiB of spare blocks, those in use are also kept in memory (reads of remapped
    /// blocks skip a system call); a bigger spare is read from the file.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub spare_blocks: Option<u64>,

    /// Remap a block when a write to it fails on the main image (the guest sees no error).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set)]
    pub auto_remap: bool,

    /// Take over an image and spare file that another remapblk serves, for a migration (the
    /// destination, beside QEMU's -incoming on this host or another that shares the storage).
    /// Both files must exist; this process opens them without writing either, and takes them
    /// over (loading the remap table and pending list as the source left them) when its
    /// frontend starts the rings, which QEMU does after the source's rings stopped. Without
    /// it, a serve on an image or spare that another process holds refuses to start.
    #[arg(long, conflicts_with = "size")]
    pub incoming: bool,

    /// Keep the image (and spare file) as they are: every guest write, and every change the
    /// remap layer makes, goes to a copy-on-write overlay at PATH (a reflinked clone where the
    /// filesystem offers FICLONE, else a sparse file and a block map) and the spare's copy at
    /// PATH.spare. Emptied at every start; `ctl overlay-reset` drops the changes,
    /// `ctl overlay-commit` writes them into the image. Not with --readonly (nothing to keep),
    /// --incoming (a migration would carry the image, not the overlay) or --direct.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["readonly", "incoming", "direct"])]
    pub overlay: Option<PathBuf>,

    /// Append one JSON object per line for every fault that fires, quiesce, resume, connect,
    /// disconnect and drain, with a CLOCK_MONOTONIC timestamp (monotonic_ns).
    #[arg(long, value_name = "PATH")]
    pub event_log: Option<PathBuf>,

    /// The disk's write cache, for crash labs: none (a completed write is on the image at
    /// once) or volatile (a power cut, `ctl power-cut`, loses the completed writes no
    /// completed flush covers, as a drive's cache does). See the README's crash model.
    #[arg(long, value_name = "MODEL", value_enum, default_value = "none")]
    pub cache_model: CacheModel,

    /// With --cache-model volatile: how many bytes of unflushed writes the cache holds (it
    /// keeps what each overwrote, to undo it); past that the disk flushes by itself, as a
    /// drive does, and counts it (query-status: cache_auto_flushes). E.g. 64K, 64M, 1G.
    /// [default: 64M]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// Record every write, discard, write-zeroes and flush the guest completes, with its
    /// data, and the marks of `ctl log-mark`, in completion order, in dm-log-writes' format
    /// (read it with `remapblk log`). PATH is created, or truncated: one log per run. The
    /// log is made durable at every flush and mark.
    #[arg(long, value_name = "PATH")]
    pub write_log: Option<PathBuf>,

    /// System call filter (seccomp), installed once the image, spare, sockets and event log
    /// are open: on (a call outside the allow-list ends the process with SIGSYS and a line on
    /// stderr naming it), log (such calls are allowed and the kernel logs them: dmesg, audit
    /// type=1326), off. Also read from REMAPBLK_SECCOMP.
    #[arg(
        long,
        value_name = "MODE",
        value_enum,
        default_value = "on",
        env = "REMAPBLK_SECCOMP"
    )]
    pub seccomp: sandbox::Mode,
}

/// `--poll-us`: `auto`, or a number of microseconds (0: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollUs {
    Auto,
    Micros(u64),
}

/// The longest fixed or adaptive polling window accepted: a second of spinning is already far
/// past anything that saves a wakeup.
const MAX_POLL_US: u64 = 1_000_000;

fn parse_poll_us(s: &str) -> Result<PollUs, String> {
    if s == "auto" {
        return Ok(PollUs::Auto);
    }
    match s.parse::<u64>() {
        Ok(n) if n <= MAX_POLL_US => Ok(PollUs::Micros(n)),
        _ => Err(format!(
            "expected auto, 0 (off) or microseconds up to {MAX_POLL_US}, got '{s}'"
        )),
    }
}

impl ServeArgs {
    /// `--cache-size`, or its default.
    pub fn cache_bytes(&self) -> u64 {
        self.cache_size.unwrap_or(64 << 20)
    }

    /// What clap cannot check: flags that mean nothing with the others given. The message is
    /// for a usage error (exit 2).
    pub fn check(&self) -> Result<(), String> {
        if self.cache_size.is_some() && self.cache_model != CacheModel::Volatile {
            return Err(
                "--cache-size sizes the volatile cache: add --cache-model volatile, or leave --cache-size out"
                    .into(),
            );
        }
        self.polling().map(|_| ())
    }

    /// What `--poll-us` and `--poll-max-us` ask for together; an error (bad usage) when
    /// `--poll-max-us` is given where it caps nothing.
    pub fn polling(&self) -> Result<Polling, String> {
        match (self.poll_us, self.poll_max_us) {
            (PollUs::Auto, max) => Ok(Polling::Adaptive {
                max: Duration::from_micros(max.unwrap_or(DEFAULT_POLL_MAX_US)),
            }),
            (PollUs::Micros(n), Some(_)) => Err(format!(
                "--poll-max-us caps the adaptive window of --poll-us auto; with --poll-us {n} \
                 the window is fixed: drop one of them"
            )),
            (PollUs::Micros(0), None) => Ok(Polling::Off),
            (PollUs::Micros(n), None) => Ok(Polling::Fixed(Duration::from_micros(n))),
        }
    }
}

/// Parses `4096`, `512K`, `512M`, `20G`, `1T` (also `20GiB`, `20g`): binary units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use a number with an optional K, M, G or T suffix, e.g. 512M or 20G"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "unknown size unit '{unit}' in '{s}'; use K, M, G or T"
            ))
        }
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))?;
    if bytes == 0 {
        return Err("size must be greater than zero".to_string());
    }
    Ok(bytes)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(4..=MAX_QUEUE_SIZE).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "queue size must be a power of two from 4 to {MAX_QUEUE_SIZE}, got {n}"
        ));
    }
    Ok(n)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("block size must be 512 or 4096, got '{s}'")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, got '{s}'")),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > ID_BYTES {
        return Err(format!(
            "serial is {} bytes; virtio allows at most {ID_BYTES}",
            s.len()
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("-5M").is_err());
    }

    #[test]
    fn poll_flags() {
        let polling = |args: &[&str]| {
            let cli = Cli::try_parse_from(
                [
                    &["remapblk", "serve", "--image", "i", "--socket", "s"],
                    args,
                ]
                .concat(),
            )
            .map_err(|e| e.to_string())?;
            let Command::Serve(a) = cli.command else {
                panic!("not serve")
            };
            a.polling()
        };
        let us = Duration::from_micros;
        assert_eq!(
            polling(&[]),
            Ok(Polling::Adaptive {
                max: us(DEFAULT_POLL_MAX_US)
            })
        );
        assert_eq!(
            polling(&["--poll-us", "auto", "--poll-max-us", "120"]),
            Ok(Polling::Adaptive { max: us(120) })
        );
        assert_eq!(
            polling(&["--poll-max-us", "25"]),
            Ok(Polling::Adaptive { max: us(25) })
        );
        assert_eq!(polling(&["--poll-us", "0"]), Ok(Polling::Off));
        assert_eq!(polling(&["--poll-us", "50"]), Ok(Polling::Fixed(us(50))));
        let err = polling(&["--poll-us", "50", "--poll-max-us", "100"]).unwrap_err();
        assert!(err.starts_with("--poll-max-us caps"), "{err}");
        for bad in [
            &["--poll-us", "fast"][..],
            &["--poll-us", "1000001"],
            &["--poll-max-us", "0"],
            &["--poll-max-us", "auto"],
        ] {
            let err = polling(bad).unwrap_err();
            assert!(err.contains(bad[0]), "{bad:?}: {err}");
        }
        assert!(polling(&["--poll-us", "-1"]).is_err());
        // The help states the cap's default in words: keep them the constant's.
        use clap::CommandFactory;
        let help = Cli::command()
            .find_subcommand_mut("serve")
            .expect("the serve subcommand")
            .render_long_help()
            .to_string();
        assert!(
            help.contains(&format!("[default: {DEFAULT_POLL_MAX_US}]")),
            "{help}"
        );
    }

    #[test]
    fn queue_sizes() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert!(parse_queue_size("2048").is_err());
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("2").is_err());
    }

    #[test]
    fn ctl_help_lists_every_command_and_names_still_reach_the_server() {
        use clap::{CommandFactory, ValueEnum};
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("ctl")
            .expect("the ctl subcommand")
            .render_long_help()
            .to_string();
        for c in CommandName::value_variants() {
            assert!(help.contains(&format!("  {}  ", c.name())), "{help}");
        }
        assert!(help.contains("Inject a fault"), "{help}");
        // An unknown name is the server's to refuse (exit 1), not clap's (exit 2).
        let cli = Cli::try_parse_from(["remapblk", "ctl", "no-such-command"]).unwrap();
        let Command::Ctl(a) = cli.command else {
            panic!("not ctl")
        };
        assert_eq!(a.name, "no-such-command");
    }

    #[test]
    fn log_commands_take_one_stop_and_a_command() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["remapblk", "log"], args].concat());
        let cli = parse(&["replay", "l", "--image", "c", "--to-flush", "2"]).unwrap();
        let Command::Log {
            action: LogAction::Replay { until, .. },
        } = cli.command
        else {
            panic!("not log replay")
        };
        assert_eq!(
            (until.to_flush, until.to_mark, until.to_entry),
            (Some(2), None, None)
        );
        assert!(
            parse(&["replay", "l", "--image", "c"]).is_err(),
            "a stop is required"
        );
        assert!(parse(&["replay", "l", "--image", "c", "--to-flush", "0"]).is_err());
        assert!(
            parse(&[
                "replay",
                "l",
                "--image",
                "c",
                "--to-entry",
                "1",
                "--to-mark",
                "m"
            ])
            .is_err(),
            "one stop only"
        );
        let cli = parse(&["check", "l", "--base", "b", "--", "e2fsck", "-fn", "{}"]).unwrap();
        let Command::Log {
            action: LogAction::Check { each, cmd, .. },
        } = cli.command
        else {
            panic!("not log check")
        };
        assert_eq!(each, crate::writelog::check::Each::Flush);
        assert_eq!(cmd, ["e2fsck", "-fn", "{}"]);
        assert!(
            parse(&["check", "l", "--base", "b"]).is_err(),
            "a command is required"
        );
    }

    #[test]
    fn cli_defaults_and_limits() {
        let cli = Cli::try_parse_from(["remapblk", "serve"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(a.num_queues, 1);
        assert_eq!(a.queue_size, 256);
        assert_eq!(a.block_size, 512);
        assert_eq!(a.drain_timeout_ms, 10_000);
        assert_eq!(
            (a.cache_model, a.cache_bytes()),
            (CacheModel::None, 64 << 20)
        );
        assert!(a.check().is_ok());
        if std::env::var_os("REMAPBLK_SECCOMP").is_none() {
            assert_eq!(a.seccomp, sandbox::Mode::On);
        }
        assert!(Cli::try_parse_from(["remapblk", "serve", "--num-queues", "17"]).is_err());
        assert!(Cli::try_parse_from(["remapblk", "serve", "--block-size", "1024"]).is_err());
        assert!(
            Cli::try_parse_from(["remapblk", "serve", "--serial", "x".repeat(21).as_str()])
                .is_err()
        );
        let cli = Cli::try_parse_from(["remapblk", "serve", "--block-size", "4096"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(a.block_size, 4096);
        assert!(
            Cli::try_parse_from(["remapblk", "serve", "--incoming", "--size", "1G"]).is_err(),
            "--incoming resizes nothing"
        );
    }
}
