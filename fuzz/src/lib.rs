//! remapblk's fuzz targets: each a `fn(&[u8])` that builds what it feeds the code under test
//! from the bytes (mostly through `arbitrary`), checks what must hold, and panics when it does
//! not. Two drivers run them: `remapblk-fuzz` (this package's binary, stable Rust: seeded
//! random inputs and mutations of each target's seeds for a time bound, as `ci/test.sh` runs
//! it) and libFuzzer through `cargo +nightly fuzz` (`cargo-fuzz/`, for deeper runs with
//! coverage feedback). See docs/testing.md.

pub mod targets;

/// One fuzz target.
pub struct Target {
    /// The name `remapblk-fuzz run` and `cargo fuzz run` take.
    pub name: &'static str,
    /// What it feeds to what, for `remapblk-fuzz list`.
    pub about: &'static str,
    /// Runs one input; panics when something that must hold does not.
    pub run: fn(&[u8]),
    /// Inputs that get past the first checks of the code under test (valid data made by the
    /// project's own encoders, or a well-formed session), named. The driver mutates them;
    /// `remapblk-fuzz corpus` writes them out for libFuzzer.
    pub seeds: fn() -> Vec<(String, Vec<u8>)>,
    /// The longest input the stable driver makes (libFuzzer takes `-max_len`).
    pub max_len: usize,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "request",
        about: "the descriptor chain walker and the virtio-blk request parser over arbitrary guest memory, descriptor tables and limits",
        run: targets::request::run,
        seeds: targets::request::seeds,
        max_len: 4096,
    },
    Target {
        name: "vhost-user",
        about: "the vhost-user handler fed arbitrary message streams with fds from a pool, guest memory writes and kicks; then a fresh connection must serve a request",
        run: targets::vhost_user::run,
        seeds: targets::vhost_user::seeds,
        max_len: 16384,
    },
    Target {
        name: "control",
        about: "the control socket's JSON lines: arbitrary lines and JSON values through the command dispatcher, and raw bytes through the socket",
        run: targets::control::run,
        seeds: targets::control::seeds,
        max_len: 16384,
    },
    Target {
        name: "metadata",
        about: "the spare file's metadata decoders (header, slots, pending list) and whole spare files, raw or made by the encoder then mutated",
        run: targets::metadata::run,
        seeds: targets::metadata::seeds,
        max_len: 65536,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `remapblk-fuzz run` replays first, in `cargo test` too: every target's seeds and
    /// regression inputs (fuzz/corpus/TARGET/) pass. One test, so that nothing else in this
    /// process opens fds while the vhost-user target counts them.
    #[test]
    fn every_target_passes_its_seeds_and_regression_inputs() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for t in TARGETS {
            let mut inputs: Vec<Vec<u8>> = (t.seeds)().into_iter().map(|(_, b)| b).collect();
            assert!(!inputs.is_empty(), "{} has no seeds", t.name);
            if let Ok(dir) = std::fs::read_dir(corpus.join(t.name)) {
                for e in dir.flatten() {
                    inputs.push(std::fs::read(e.path()).unwrap());
                }
            }
            for input in &inputs {
                (t.run)(input);
            }
        }
        targets::scratch::cleanup();
    }
}
