use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use log::warn;

use remapblk::args::{Cli, Command, CtlArgs, MetadataAction, ServeArgs};
use remapblk::backend::device::default_serial;
use remapblk::backend::{serve, Device, DeviceConfig, Live};
use remapblk::control::client::{call, parse_arguments, CtlError};
use remapblk::control::commands::Commands;
use remapblk::control::ControlServer;
use remapblk::events::EventLog;
use remapblk::fault::{FaultSpec, FaultTable, FaultyTarget};
use remapblk::remap::metadata::Header;
use remapblk::remap::spare::{inspect, Spare};
use remapblk::remap::{RemapTable, RemapTarget};
use remapblk::storage::{Image, OpenOptions};
use remapblk::virtio::ID_BYTES;

const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Ctl(args) => return run_ctl(args),
        Command::Metadata { action } => return run_metadata(action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("remapblk: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run_metadata(action: MetadataAction) -> ExitCode {
    match action {
        MetadataAction::Dump { spare } => match inspect(&spare) {
            Ok(i) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&i.to_json()).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("remapblk metadata: {e}");
                ExitCode::from(2)
            }
        },
        MetadataAction::Check { spare } => {
            let i = match inspect(&spare) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("remapblk metadata: {e}");
                    return ExitCode::from(2);
                }
            };
            let bad: Vec<String> = i
                .slots
                .iter()
                .enumerate()
                .filter_map(|(n, s)| {
                    s.as_ref()
                        .err()
                        .map(|e| format!("slot {}: {e}", if n == 0 { 'A' } else { 'B' }))
                })
                .collect();
            match bad.len() {
                0 => {
                    println!("{}: healthy (both metadata slots valid)", spare.display());
                    ExitCode::SUCCESS
                }
                1 => {
                    println!("{}: {}; the other slot is valid and the bad one is rewritten on the next start", spare.display(), bad[0]);
                    ExitCode::from(1)
                }
                _ => {
                    println!("{}: both metadata slots are bad ({}); remapblk serve refuses to start with this spare", spare.display(), bad.join("; "));
                    ExitCode::from(2)
                }
            }
        }
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

fn run_serve(a: ServeArgs) -> Result<(), String> {
    let image = Image::open(&OpenOptions {
        path: a.image.clone(),
        size: a.size,
        default_size: DEFAULT_IMAGE_SIZE,
        readonly: a.readonly,
        direct: a.direct,
    })
    .map_err(|e| e.to_string())?;

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

    let cfg = DeviceConfig {
        image: a.image.clone(),
        capacity,
        block_size: a.block_size,
        readonly: a.readonly,
        serial,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        drain_timeout: Duration::from_millis(a.drain_timeout_ms),
    };
    let control_path = a.control.clone().unwrap_or_else(|| {
        let mut p = a.socket.clone().into_os_string();
        p.push(".ctl");
        p.into()
    });
    let events = Arc::new(match &a.event_log {
        Some(p) => {
            EventLog::open(p).map_err(|e| format!("cannot open event log {}: {e}", p.display()))?
        }
        None => EventLog::disabled(),
    });
    let faults = Arc::new(FaultTable::new(events.clone()));
    if let Some(path) = &a.faults {
        load_faults(path, &faults, capacity / bs)?;
    }
    let remap = Arc::new(open_spare(&a, capacity)?);
    print_banner(&a, capacity, &serial_str, &control_path);
    // Guest I/O goes remap -> faults -> image: faults apply to the main image only, so a
    // remapped block is healthy again.
    let faulty = Arc::new(FaultyTarget::new(
        Arc::new(image),
        faults.clone(),
        a.block_size,
    ));
    let target = Arc::new(RemapTarget::new(
        faulty,
        remap.clone(),
        a.block_size,
        a.auto_remap,
    ));
    let dev = Arc::new(Device::new(cfg, target.clone()));
    let live = Arc::new(Live::new(events));
    let commands = Arc::new(Commands {
        dev: dev.clone(),
        live: live.clone(),
        faults,
        remap: target,
    });
    let _control = ControlServer::start(&control_path, commands).map_err(|e| e.to_string())?;
    serve(dev, live, &a.socket).map_err(|e| e.to_string())
}

/// Opens the spare file (`--spare`, default `<image>.spare`) or creates it.
fn open_spare(a: &ServeArgs, capacity: u64) -> Result<RemapTable, String> {
    let path = a.spare.clone().unwrap_or_else(|| {
        let mut p = a.image.clone().into_os_string();
        p.push(".spare");
        p.into()
    });
    let bs = u64::from(a.block_size);
    let (spare, entries) = if path.exists() {
        let o = Spare::open(&path, a.block_size, capacity).map_err(|e| e.to_string())?;
        if let Some(slot) = o.repaired {
            warn!(
                "spare file {}: metadata slot {slot} was bad and has been rewritten from the other",
                path.display()
            );
        }
        if let Some(n) = a
            .spare_blocks
            .filter(|n| *n != o.spare.header().spare_blocks)
        {
            warn!("spare file {} has {} spare blocks; --spare-blocks {n} only applies to a new spare file", path.display(), o.spare.header().spare_blocks);
        }
        (o.spare, o.entries)
    } else {
        let blocks = a
            .spare_blocks
            .unwrap_or_else(|| (capacity / bs / 100).max(1024));
        let header = Header {
            block_size: a.block_size,
            image_size: capacity,
            spare_blocks: blocks,
        };
        log::info!(
            "created spare file {} with {blocks} spare blocks",
            path.display()
        );
        (
            Spare::create(&path, header).map_err(|e| e.to_string())?,
            Vec::new(),
        )
    };
    RemapTable::new(spare, entries)
}

/// Applies a `--faults` file: a JSON array of fault-add argument objects.
fn load_faults(path: &Path, table: &FaultTable, capacity_blocks: u64) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read faults file {}: {e}", path.display()))?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        format!(
            "faults file {} is not a JSON array of fault-add argument objects: {e}",
            path.display()
        )
    })?;
    for (i, entry) in list.iter().enumerate() {
        let args = entry
            .as_object()
            .ok_or_else(|| format!("faults file {}: entry {i} is not an object", path.display()))?;
        let spec = FaultSpec::from_args(args, capacity_blocks)
            .map_err(|e| format!("faults file {}: entry {i}: {e}", path.display()))?;
        let id = table.add(spec);
        log::info!("fault {id} from {}: {entry}", path.display());
    }
    Ok(())
}

fn print_banner(a: &ServeArgs, capacity: u64, serial: &str, control: &Path) {
    let sock = absolute(&a.socket);
    println!(
        "remapblk: serving {} ({} bytes = {} MiB, {}-byte blocks{}, serial {serial}) on {}",
        absolute(&a.image),
        capacity,
        capacity >> 20,
        a.block_size,
        if a.readonly { ", read-only" } else { "" },
        sock
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
