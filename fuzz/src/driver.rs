//! The stable driver: runs one target on seeded random inputs and mutations of its seeds for a
//! time bound.
//!
//! A supervisor process starts the fuzzing process (the same binary, `child`) and watches it:
//! the child copies each input into memory the two share before running it, so whatever ends
//! the child (a panic, an abort, SIGSEGV or SIGBUS, a hang the supervisor kills) the
//! supervisor still has the input that did it and writes it to a file.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use remapblk_fuzz::{targets, Target};

use crate::mutate::mutate;
use crate::rng::Rng;

/// How one run goes.
pub struct Plan {
    pub target: &'static Target,
    pub seconds: f64,
    pub seed: u64,
    /// `DIR/TARGET/*`: inputs run first, then mutated (regressions: inputs that once failed).
    pub corpus: PathBuf,
    pub max_len: usize,
}

/// The input being run, shared between the fuzzing process and its supervisor: the number of
/// inputs started (8 bytes), the input's length (8 bytes), then its bytes.
struct Shared {
    ptr: *mut u8,
    cap: usize,
}

const SHARED_HEAD: usize = 16;

impl Shared {
    /// A new region for inputs of up to `max_len` bytes, in a memfd a child inherits.
    fn create(max_len: usize) -> io::Result<(Shared, File)> {
        // SAFETY: memfd_create with a NUL-terminated name; no CLOEXEC, so the child inherits it.
        let fd = unsafe { libc::memfd_create(c"remapblk-fuzz-input".as_ptr(), 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor memfd_create just returned, owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len((SHARED_HEAD + max_len) as u64)?;
        Ok((Shared::map(fd, max_len)?, file))
    }

    fn map(fd: RawFd, max_len: usize) -> io::Result<Shared> {
        let len = SHARED_HEAD + max_len;
        // SAFETY: a fresh shared mapping of a memfd at least `len` long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Shared {
            ptr: p.cast(),
            cap: max_len,
        })
    }

    fn started(&self) -> &AtomicU64 {
        // SAFETY: the first 8 bytes of the page-aligned mapping, which lives as long as `self`.
        unsafe { AtomicU64::from_ptr(self.ptr.cast()) }
    }

    /// Records `input` as the one about to run.
    fn set(&self, input: &[u8]) {
        let n = input.len().min(self.cap);
        // SAFETY: the mapping holds SHARED_HEAD + cap bytes; `n` is at most `cap`. Only this
        // process writes them; the supervisor reads them once this process is gone.
        unsafe {
            self.ptr.add(8).cast::<u64>().write_unaligned(n as u64);
            std::ptr::copy_nonoverlapping(input.as_ptr(), self.ptr.add(SHARED_HEAD), n);
        }
        self.started().fetch_add(1, Ordering::Release);
    }

    /// The input last recorded.
    fn get(&self) -> Vec<u8> {
        // SAFETY: as in `set`; the length was stored at most `cap`.
        unsafe {
            let n = (self.ptr.add(8).cast::<u64>().read_unaligned() as usize).min(self.cap);
            std::slice::from_raw_parts(self.ptr.add(SHARED_HEAD), n).to_vec()
        }
    }
}

/// Runs `plan` in a child process and reports. Exit code 0: no failure; 1: a failure, its
/// input written under `artifacts`.
pub fn supervise(plan: &Plan, artifacts: &Path, hang: Duration) -> ExitCode {
    let name = plan.target.name;
    let (shared, file) = match Shared::create(plan.max_len) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("remapblk-fuzz: cannot share inputs with the fuzzing process: {e}");
            return ExitCode::from(1);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("remapblk-fuzz: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    let child = Command::new(exe)
        .arg("child")
        .arg(name)
        .arg(plan.seconds.to_string())
        .arg(plan.seed.to_string())
        .arg(&plan.corpus)
        .arg(plan.max_len.to_string())
        .arg(file.as_raw_fd().to_string())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("remapblk-fuzz: cannot start the fuzzing process: {e}");
            return ExitCode::from(1);
        }
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    // The child makes progress as long as it starts inputs; one input that runs longer than
    // `hang` is a hang.
    let mut last = (shared.started().load(Ordering::Acquire), Instant::now());
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(status) => break Some(status),
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = shared.started().load(Ordering::Acquire);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= hang {
            eprintln!(
                "remapblk-fuzz: {name}: one input has run for {} s: a hang; stopping the fuzzing process",
                hang.as_secs()
            );
            // SAFETY: kill(2) on the child we started, which has not been reaped (the waiter
            // thread reaps it after this).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(10));
            let input = shared.get();
            report(plan, artifacts, "hang", &input);
            return ExitCode::from(1);
        }
    };
    match status {
        Some(Ok(s)) if s.success() => ExitCode::SUCCESS,
        Some(Ok(s)) => {
            use std::os::unix::process::ExitStatusExt;
            let how = match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (_, Some(sig)) => format!("signal {sig}"),
                _ => "an unknown status".to_string(),
            };
            eprintln!("remapblk-fuzz: {name}: the fuzzing process ended with {how}");
            if shared.started().load(Ordering::Acquire) == 0 {
                eprintln!("remapblk-fuzz: {name}: before its first input");
                return ExitCode::from(1);
            }
            report(plan, artifacts, "crash", &shared.get());
            ExitCode::from(1)
        }
        Some(Err(e)) => {
            eprintln!("remapblk-fuzz: cannot wait for the fuzzing process: {e}");
            ExitCode::from(1)
        }
        None => ExitCode::from(1),
    }
}

/// Writes a failing input to `artifacts/TARGET/KIND-HASH` and says how to run it again.
fn report(plan: &Plan, artifacts: &Path, kind: &str, input: &[u8]) {
    let name = plan.target.name;
    let dir = artifacts.join(name);
    let path = dir.join(format!("{kind}-{:016x}", fnv1a(input)));
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input));
    eprintln!("remapblk-fuzz: {name}: seed {}", plan.seed);
    eprintln!(
        "remapblk-fuzz: {name}: failing input ({} bytes): {}",
        input.len(),
        hex(input)
    );
    match written {
        Ok(()) => {
            eprintln!("remapblk-fuzz: {name}: written to {}", path.display());
            eprintln!(
                "remapblk-fuzz: run it again with: cargo run -p remapblk-fuzz -- run {name} --input {}",
                path.display()
            );
            eprintln!("remapblk-fuzz: once fixed, keep it as a regression input: move it into fuzz/corpus/{name}/");
        }
        Err(e) => eprintln!(
            "remapblk-fuzz: {name}: cannot write it to {}: {e}",
            path.display()
        ),
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The first 4 KiB of `b` in hex (a longer input is in its file).
pub fn hex(b: &[u8]) -> String {
    let mut s: String = b.iter().take(4096).map(|x| format!("{x:02x}")).collect();
    if b.len() > 4096 {
        s.push_str("...");
    }
    s
}

/// Panics in any thread since start: a target's background thread (a queue worker, a
/// session) that panics fails the input as surely as the target's own.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
}

/// The fuzzing process: every input of the corpus and the seeds once, then random inputs and
/// mutants until the time is up. Exits 101 on the first failing input (the supervisor writes
/// it out), 0 when the time is up.
pub fn child(plan: &Plan, shm_fd: RawFd) -> ExitCode {
    let name = plan.target.name;
    let shared = match Shared::map(shm_fd, plan.max_len) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("remapblk-fuzz: {name}: cannot map the shared input: {e}");
            return ExitCode::from(1);
        }
    };
    count_panics();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(plan.seconds);
    let mut corpus = load_corpus(&plan.corpus.join(name));
    let regressions = corpus.len();
    corpus.extend((plan.target.seeds)().into_iter().map(|(_, b)| b));
    let mut rng = Rng::new(plan.seed);
    let mut execs = 0u64;
    let run = |input: &[u8], execs: &mut u64| -> bool {
        shared.set(input);
        *execs += 1;
        let before = PANICS.load(Ordering::SeqCst);
        let caught = panic::catch_unwind(AssertUnwindSafe(|| (plan.target.run)(input)));
        let ok = caught.is_ok() && PANICS.load(Ordering::SeqCst) == before;
        if !ok {
            eprintln!(
                "remapblk-fuzz: {name}: input {} of seed {} failed ({} bytes)",
                *execs,
                plan.seed,
                input.len(),
            );
        }
        ok
    };
    // The corpus first, whatever the time bound: the regressions must pass every run.
    for input in &corpus {
        if !run(input, &mut execs) {
            return finish(ExitCode::from(101));
        }
    }
    let mut buf = vec![0u8; plan.max_len];
    while Instant::now() < deadline {
        let input = if corpus.is_empty() || rng.one_in(4) {
            let n = rng.len(plan.max_len);
            rng.fill(&mut buf[..n]);
            buf[..n].to_vec()
        } else {
            let a = rng.below(corpus.len());
            let b = rng.below(corpus.len());
            mutate(&mut rng, &corpus[a], &corpus[b], plan.max_len)
        };
        if !run(&input, &mut execs) {
            return finish(ExitCode::from(101));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "remapblk-fuzz: {name}: {execs} inputs in {secs:.1} s ({:.0}/s), seed {}, {} seeds and {regressions} regression inputs, no failure",
        execs as f64 / secs,
        plan.seed,
        corpus.len() - regressions,
    );
    finish(ExitCode::SUCCESS)
}

fn finish(code: ExitCode) -> ExitCode {
    targets::scratch::cleanup();
    code
}

/// The files of `dir`, in name order (none when it does not exist).
pub fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}
