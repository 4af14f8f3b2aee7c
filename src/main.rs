use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use log::{info, warn};

use remapblk::args::{Cli, Command, CtlArgs, MetadataAction, ServeArgs};
use remapblk::backend::{default_serial, serve, Device, DeviceConfig, Live};
use remapblk::cache::CacheTarget;
use remapblk::control::client::{call, parse_arguments, CtlError};
use remapblk::control::commands::Commands;
use remapblk::control::ControlServer;
use remapblk::events::EventLog;
use remapblk::fault::{FaultTable, FaultyTarget};
use remapblk::handover::{Attachment, Handover, Mode, Role};
use remapblk::io::EngineKind;
use remapblk::overlay::{Overlay, SpareCopy};
use remapblk::remap::spare::inspect;
use remapblk::remap::{self, RemapTable, RemapTarget};
use remapblk::storage::{BlockIo, Image, NullTarget, OpenOptions};
use remapblk::unix::{self, Listen};
use remapblk::virtio::ID_BYTES;
use remapblk::writelog;

const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            if let Err(msg) = args.check() {
                usage_error("serve", msg);
            }
            run_serve(*args)
        }
        Command::Ctl(args) => return run_ctl(args),
        Command::Metadata { action } => return run_metadata(action),
        Command::Log { action } => return writelog::tool::run(action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("remapblk: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Exits 2 with `msg` and the usage of subcommand `sub`, as clap does for what it checks.
fn usage_error(sub: &str, msg: String) -> ! {
    let mut cli = Cli::command();
    cli.build();
    match cli.find_subcommand_mut(sub) {
        Some(cmd) => cmd
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit(),
        None => cli
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit(),
    }
}

fn run_metadata(action: MetadataAction) -> ExitCode {
    match action {
        MetadataAction::Dump { spare } => match inspect(&spare) {
            Ok(i) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&i.dump()).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("remapblk metadata: {e}");
                ExitCode::from(2)
            }
        },
        MetadataAction::Check { spare } => match inspect(&spare) {
            Ok(i) => {
                let (code, msg) = i.check(&spare);
                println!("{msg}");
                ExitCode::from(code)
            }
            Err(e) => {
                eprintln!("remapblk metadata: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn run_ctl(a: CtlArgs) -> ExitCode {
    let result = parse_arguments(&a.args).and_then(|args| call(&a.control, &a.name, args));
    match result {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e @ CtlError::BadArgument(_)) => {
            eprintln!("remapblk ctl: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("remapblk ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// What `serve --print-capabilities` prints (vhost-user.json, VHostUserBackendCapabilities).
#[derive(serde::Serialize)]
struct Capabilities {
    #[serde(rename = "type")]
    kind: &'static str,
    /// `--read-only` and `--blk-file`, which serve takes as aliases of its own flags.
    features: [&'static str; 2],
}

/// The socket to serve: `--fd N`, else a socket systemd activated this process with, else
/// `--socket PATH`.
fn listen_on(a: &ServeArgs) -> Result<Listen, String> {
    let fd = a.fd.or_else(|| {
        let fd = activated_socket()?;
        info!("serving the socket systemd passed (descriptor {fd})");
        Some(fd)
    });
    match fd {
        Some(fd) => unix::inherited_listener(fd)
            .map(Listen::Inherited)
            .map_err(|e| e.to_string()),
        None => Ok(Listen::Path(a.socket.clone(), a.socket_mode)),
    }
}

/// The first socket of systemd's socket activation (sd_listen_fds(3)): LISTEN_FDS sockets
/// from descriptor 3 on, when LISTEN_PID names this process. The variables are removed so
/// nothing this process starts takes them for its own.
fn activated_socket() -> Option<i32> {
    const SD_LISTEN_FDS_START: i32 = 3;
    let pid = std::env::var("LISTEN_PID").ok()?;
    let fds = std::env::var("LISTEN_FDS").ok()?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if pid.parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    match fds.parse::<i32>().ok()? {
        0 => None,
        1 => Some(SD_LISTEN_FDS_START),
        n => {
            warn!("systemd passed {n} sockets; serving the first");
            Some(SD_LISTEN_FDS_START)
        }
    }
}

fn run_serve(a: ServeArgs) -> Result<(), String> {
    // Checked with the rest of the usage (`ServeArgs::check`) before we get here.
    let poll = a.polling()?;
    if a.print_capabilities {
        let caps = Capabilities {
            kind: "block",
            features: ["read-only", "blk-file"],
        };
        println!(
            "{}",
            serde_json::to_string(&caps).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let listen = listen_on(&a)?;
    let socket = listen.path();
    let mode = if a.incoming {
        Mode::Incoming
    } else {
        Mode::Serve
    };
    let spare_path = a.spare.clone().unwrap_or_else(|| {
        let mut p = a.image.clone().into_os_string();
        p.push(".spare");
        p.into()
    });
    let (image, image_lock, spare_lock) = open_image(&a, &spare_path, mode)?;

    let bs = u64::from(a.block_size);
    let capacity = image.size() / bs * bs;
    if capacity == 0 {
        return Err(format!(
            "image {} holds {} bytes, less than one {}-byte block; give a larger --size",
            a.image.display(),
            image.size(),
            bs
        ));
    }
    if capacity != image.size() {
        warn!(
            "image size {} is not a multiple of the {bs}-byte block size; the guest sees {capacity} bytes",
            image.size()
        );
    }

    let serial_str = a.serial.clone().unwrap_or_else(|| default_serial(&a.image));
    let mut serial = [0u8; ID_BYTES];
    let n = serial_str.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&serial_str.as_bytes()[..n]);

    let engine = pick_engine(a.engine)?;
    if engine == EngineKind::Null && a.overlay.is_some() {
        return Err(
            "--overlay has nothing to keep with --engine null, whose writes go nowhere: drop one of them"
                .to_string(),
        );
    }
    let cfg = DeviceConfig {
        image: a.image.clone(),
        capacity,
        block_size: a.block_size,
        readonly: a.readonly,
        serial,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        drain_timeout: Duration::from_millis(a.drain_timeout_ms),
        engine,
        poll,
    };
    let control_path = match (&a.control, &socket) {
        (Some(c), _) => c.clone(),
        (None, Some(s)) => {
            let mut p = s.clone().into_os_string();
            p.push(".ctl");
            p.into()
        }
        (None, None) => {
            return Err(
                "the inherited socket has no path to put the control socket beside; give --control PATH"
                    .to_string(),
            )
        }
    };
    let events = Arc::new(match &a.event_log {
        Some(p) => {
            EventLog::open(p).map_err(|e| format!("cannot open event log {}: {e}", p.display()))?
        }
        None => EventLog::disabled(),
    });
    let faults = Arc::new(FaultTable::new(events.clone()));
    if let Some(path) = &a.faults {
        faults.load_file(path, capacity / bs, a.block_size)?;
    }
    let (remap, spare_lock, spare_copy) =
        open_spare(&spare_path, &a, capacity, spare_lock, &image)?;
    let remap = Arc::new(remap);
    let handover = Handover::new(mode, image_lock, spare_lock, remap.clone())
        .map_err(|e| e.to_string())?
        .with_events(events.clone());
    // A migration would hand over the image without the overlay: the guest's disk stays here.
    let handover = if a.overlay.is_some() {
        handover.never_yield()
    } else {
        handover
    };
    // Created once the image and spare are ours, so a refused start truncates no log.
    let write_log = writelog::open_for_serve(
        a.write_log.as_deref(),
        &a.image,
        &spare_path,
        events.clone(),
    )
    .map_err(|e| e.to_string())?;
    if mode == Mode::Incoming {
        info!(
            "waiting to take over {} and {} when the frontend starts the rings (serve --incoming)",
            a.image.display(),
            spare_path.display()
        );
    }
    print_banner(
        &a,
        socket.as_deref(),
        capacity,
        &serial_str,
        &control_path,
        engine,
    );
    // Guest I/O goes cache -> remap -> faults -> image (or its overlay): faults apply to the main
    // image only, so a remapped block is healthy again.
    let (base, overlay): (Arc<dyn BlockIo>, _) = match spare_copy {
        Some(copy) => {
            let o = open_overlay(&a, image, capacity, copy)?;
            (o.clone(), Some(o))
        }
        None if engine == EngineKind::Null => (Arc::new(NullTarget), None),
        None => (Arc::new(image), None),
    };
    let faulty = Arc::new(FaultyTarget::new(base, faults.clone(), a.block_size));
    let target = Arc::new(RemapTarget::new(
        faulty,
        remap.clone(),
        a.block_size,
        a.auto_remap,
    ));
    // The write log sits under the cache: it records the guest's own addresses and bytes, a
    // power cut's reverts included.
    let stack = writelog::layer(target.clone(), write_log.as_ref());
    // The cache layer is always on top: it owns the power state even with --cache-model none.
    let cache = Arc::new(CacheTarget::new(
        stack,
        a.cache_model,
        a.block_size,
        a.cache_bytes(),
    ));
    let dev = Arc::new(Device::new(cfg, cache.clone()).with_handover(Arc::new(handover)));
    let live = Arc::new(Live::new(events));
    let commands = Arc::new(Commands {
        dev: dev.clone(),
        live: live.clone(),
        faults,
        remap: target,
        overlay,
        cache,
        write_log,
    });
    let _control = ControlServer::start(&control_path, a.socket_mode, commands)
        .map_err(|e| format!("control socket: {e}"))?;
    serve(dev, live, listen, a.seccomp).map_err(|e| e.to_string())
}

/// Opens the image and attaches to it and to an existing spare file (see `handover`) before
/// anything changes either: an existing image is grown only once attached to, a missing one is
/// created only once an existing spare file is (a start refused for a spare another process
/// holds leaves nothing behind). An existing image is checked against `--size` first, so a bad
/// `--size` is what the user hears of first. An `--incoming` process attaches to both first,
/// which refuses missing ones: it creates nothing.
fn open_image(
    a: &ServeArgs,
    spare: &Path,
    mode: Mode,
) -> Result<(Image, Attachment, Option<Attachment>), String> {
    let attach_image =
        || Attachment::attach(Role::Image, &a.image, mode).map_err(|e| e.to_string());
    let attach_spare = || Attachment::attach(Role::Spare, spare, mode).map_err(|e| e.to_string());
    let open = || {
        Image::open_checked(&OpenOptions {
            path: a.image.clone(),
            size: a.size,
            default_size: DEFAULT_IMAGE_SIZE,
            readonly: a.readonly,
            direct: a.direct,
        })
        .map_err(|e| e.to_string())
    };
    let (checked, image_lock, spare_lock) = match mode {
        Mode::Incoming => {
            let image_lock = attach_image()?;
            let spare_lock = attach_spare()?;
            (open()?, image_lock, Some(spare_lock))
        }
        Mode::Serve if a.image.exists() => {
            let checked = open()?;
            let image_lock = attach_image()?;
            let spare_lock = spare.exists().then(attach_spare).transpose()?;
            (checked, image_lock, spare_lock)
        }
        Mode::Serve => {
            let spare_lock = spare.exists().then(attach_spare).transpose()?;
            let checked = open()?;
            (checked, attach_image()?, spare_lock)
        }
    };
    image_lock
        .check_file(checked.file())
        .map_err(|e| e.to_string())?;
    let image = checked.grow().map_err(|e| e.to_string())?;
    Ok((image, image_lock, spare_lock))
}

/// Opens the spare file attached to as `lock` (which may repair a metadata slot; an
/// `--incoming` process repairs nothing until it takes over), or creates a missing one and
/// attaches to it. With `--overlay`, the table lives in the spare's copy beside the overlay,
/// returned too.
fn open_spare(
    path: &Path,
    a: &ServeArgs,
    capacity: u64,
    lock: Option<Attachment>,
    image: &Image,
) -> Result<(RemapTable, Attachment, Option<SpareCopy>), String> {
    let (table, lock) = open_real_spare(path, a, capacity, lock)?;
    let Some(overlay) = &a.overlay else {
        return Ok((table, lock, None));
    };
    // The real spare was checked (a bad slot repaired) or created as without --overlay; from
    // here on it is left alone, and the table is loaded from its copy.
    drop(table);
    let copy = SpareCopy::prepare(path, overlay, image.file()).map_err(|e| e.to_string())?;
    lock.check_file(copy.real()).map_err(|e| e.to_string())?;
    let table = remap::open(copy.copy_path(), a.block_size, capacity, None)?;
    Ok((table, lock, Some(copy)))
}

/// [`open_spare`] of the spare file itself.
fn open_real_spare(
    path: &Path,
    a: &ServeArgs,
    capacity: u64,
    lock: Option<Attachment>,
) -> Result<(RemapTable, Attachment), String> {
    let (table, lock) = match lock {
        Some(lock) if a.incoming => (remap::open_untouched(path, a.block_size, capacity)?, lock),
        Some(lock) => (
            remap::open(path, a.block_size, capacity, a.spare_blocks)?,
            lock,
        ),
        // Created exclusively: one made meanwhile by another process is refused, not opened.
        None => (
            remap::create(path, a.block_size, capacity, a.spare_blocks)?,
            Attachment::attach(Role::Spare, path, Mode::Serve).map_err(|e| e.to_string())?,
        ),
    };
    lock.check_file(table.spare().file())
        .map_err(|e| e.to_string())?;
    Ok((table, lock))
}

/// `--overlay`: the bottom of the block stack, over the image (kept for commits only).
fn open_overlay(
    a: &ServeArgs,
    image: Image,
    capacity: u64,
    spare: SpareCopy,
) -> Result<Arc<Overlay>, String> {
    let Some(path) = &a.overlay else {
        return Err("internal error: an overlay without --overlay".to_string());
    };
    let spare_copy = spare.copy_path().to_path_buf();
    let o = Overlay::open(image, path, a.block_size, capacity, spare).map_err(|e| e.to_string())?;
    println!(
        "overlay: {} ({}), spare copy {}; the image and spare file are not written while serving (ctl overlay-reset drops the changes, ctl overlay-commit writes them)",
        absolute(path),
        o.kind().name(),
        absolute(&spare_copy)
    );
    Ok(Arc::new(o))
}

/// The engine to run: the one asked for, or io_uring when the kernel allows it.
fn pick_engine(asked: Option<EngineKind>) -> Result<EngineKind, String> {
    match asked {
        Some(e) => e.probe().map(|()| e).map_err(|err| {
            format!(
                "--engine {}: this kernel does not let us use it ({err}); use --engine sync",
                e.name()
            )
        }),
        None => Ok(match EngineKind::IoUring.probe() {
            Ok(()) => EngineKind::IoUring,
            Err(e) => {
                warn!("io_uring is not available ({e}); using the sync engine");
                EngineKind::Sync
            }
        }),
    }
}

fn print_banner(
    a: &ServeArgs,
    socket: Option<&Path>,
    capacity: u64,
    serial: &str,
    control: &Path,
    engine: EngineKind,
) {
    let sock = socket.map_or_else(|| "an inherited socket".to_string(), absolute);
    println!(
        "remapblk: serving {} ({} bytes = {} MiB, {}-byte blocks{}, serial {serial}) on {}",
        absolute(&a.image),
        capacity,
        capacity >> 20,
        a.block_size,
        if a.readonly { ", read-only" } else { "" },
        sock
    );
    println!(
        "engine: {}{}",
        engine.name(),
        if engine == EngineKind::Null {
            " (reads return zeros, writes are dropped)"
        } else {
            ""
        }
    );
    println!("attach QEMU (guest RAM must be shared memory for vhost-user):");
    println!(
        "  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    -chardev socket,id=disk0,path={sock} -device vhost-user-blk-pci,chardev=disk0,num-queues={} ...",
        a.num_queues
    );
    println!("attach cloud-hypervisor:");
    println!(
        "  cloud-hypervisor --memory size=1G,shared=on --disk vhost_user=true,socket={sock},num_queues={},queue_size={} ...",
        a.num_queues, a.queue_size
    );
    println!(
        "control: remapblk ctl --control {} query-status",
        absolute(control)
    );
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
