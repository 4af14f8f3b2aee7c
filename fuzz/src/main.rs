//! `remapblk-fuzz`: runs remapblk's fuzz targets on stable Rust for a time bound (`ci/test.sh`
//! runs each for 60 s), replays inputs that failed, and writes the targets' seeds out for
//! libFuzzer. See docs/testing.md.

mod driver;
mod mutate;
mod rng;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use remapblk_fuzz::{target, Target, TARGETS};

#[derive(Parser)]
#[command(
    name = "remapblk-fuzz",
    about = "Fuzz targets of remapblk, on stable Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The targets and what each feeds to what.
    List,
    /// Runs TARGET for a time bound: its regression inputs (fuzz/corpus/TARGET/) and seeds
    /// first, then random inputs and mutants. Exit code 1 and the failing input written under
    /// --artifacts when something fails; with --input, runs those files once instead.
    Run {
        /// A target `list` names.
        target: String,
        /// How long to fuzz after the corpus ran.
        #[arg(long, env = "REMAPBLK_FUZZ_SECONDS", default_value_t = 60.0)]
        seconds: f64,
        /// Seed of the random inputs (printed when an input fails); default: from the clock.
        #[arg(long, env = "REMAPBLK_SEED")]
        seed: Option<u64>,
        /// Regression inputs: DIR/TARGET/*.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus"))]
        corpus: PathBuf,
        /// Where failing inputs go: DIR/TARGET/crash-HASH or hang-HASH.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/artifacts"))]
        artifacts: PathBuf,
        /// Longest input made (default: the target's own).
        #[arg(long)]
        max_len: Option<usize>,
        /// One input running this long is a hang.
        #[arg(long, default_value_t = 60)]
        hang_seconds: u64,
        /// Run these files once, in this process (a failure panics with a backtrace under
        /// RUST_BACKTRACE=1), instead of fuzzing.
        #[arg(long, num_args = 1..)]
        input: Vec<PathBuf>,
    },
    /// Writes each target's seeds to DIR/TARGET/NAME, a corpus for libFuzzer to start from.
    Corpus {
        /// A target, or `all`.
        target: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// The fuzzing process `run` starts and watches.
    #[command(hide = true)]
    Child {
        target: String,
        seconds: f64,
        seed: u64,
        corpus: PathBuf,
        max_len: usize,
        shm_fd: i32,
    },
}

fn find(name: &str) -> Result<&'static Target, ExitCode> {
    target(name).ok_or_else(|| {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        eprintln!(
            "remapblk-fuzz: no target \"{name}\"; there are: {}",
            names.join(", ")
        );
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    // The code under test logs what it refuses and gives up on: silent unless asked
    // (RUST_LOG=warn), or a run would print every refusal it provokes.
    if std::env::var_os("RUST_LOG").is_some() {
        env_logger::init();
    }
    match run(Cli::parse().command) {
        Ok(code) | Err(code) => code,
    }
}

fn run(cmd: Cmd) -> Result<ExitCode, ExitCode> {
    Ok(match cmd {
        Cmd::List => {
            for t in TARGETS {
                println!("{:<12} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Cmd::Run {
            target,
            seconds,
            seed,
            corpus,
            artifacts,
            max_len,
            hang_seconds,
            input,
        } => {
            let target = find(&target)?;
            if !input.is_empty() {
                return replay(target, &input);
            }
            if !(seconds >= 0.0 && seconds.is_finite()) {
                eprintln!("remapblk-fuzz: --seconds must be a number of seconds, 0 or more");
                return Err(ExitCode::from(2));
            }
            let seed = seed.unwrap_or_else(clock_seed);
            println!(
                "remapblk-fuzz: {}: fuzzing for {seconds} s with seed {seed} (REMAPBLK_SEED={seed} repeats it)",
                target.name
            );
            let plan = driver::Plan {
                target,
                seconds,
                seed,
                corpus,
                max_len: max_len.unwrap_or(target.max_len),
            };
            driver::supervise(&plan, &artifacts, Duration::from_secs(hang_seconds))
        }
        Cmd::Corpus { target, out } => {
            let targets: Vec<&Target> = if target == "all" {
                TARGETS.iter().collect()
            } else {
                vec![find(&target)?]
            };
            for t in targets {
                let dir = out.join(t.name);
                let seeds = (t.seeds)();
                let written = std::fs::create_dir_all(&dir).and_then(|()| {
                    seeds
                        .iter()
                        .try_for_each(|(name, b)| std::fs::write(dir.join(name), b))
                });
                if let Err(e) = written {
                    eprintln!("remapblk-fuzz: cannot write {}: {e}", dir.display());
                    return Err(ExitCode::from(1));
                }
                println!("{}: {} seeds in {}", t.name, seeds.len(), dir.display());
            }
            remapblk_fuzz::targets::scratch::cleanup();
            ExitCode::SUCCESS
        }
        Cmd::Child {
            target,
            seconds,
            seed,
            corpus,
            max_len,
            shm_fd,
        } => {
            let plan = driver::Plan {
                target: find(&target)?,
                seconds,
                seed,
                corpus,
                max_len,
            };
            driver::child(&plan, shm_fd)
        }
    })
}

/// Runs each file once; a failure panics here, with its backtrace.
fn replay(target: &Target, files: &[PathBuf]) -> Result<ExitCode, ExitCode> {
    for f in files {
        let input = std::fs::read(f).map_err(|e| {
            eprintln!("remapblk-fuzz: cannot read {}: {e}", f.display());
            ExitCode::from(2)
        })?;
        println!(
            "remapblk-fuzz: {}: {} ({} bytes): {}",
            target.name,
            f.display(),
            input.len(),
            driver::hex(&input)
        );
        (target.run)(&input);
    }
    remapblk_fuzz::targets::scratch::cleanup();
    println!(
        "remapblk-fuzz: {}: {} inputs passed",
        target.name,
        files.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}
