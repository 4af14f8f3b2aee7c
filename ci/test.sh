#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and integration tests, and the guest
# end-to-end scenarios. Installs what it needs when it is missing. Usage: ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

# The workspace: the daemon (remapblk) and the benchmark's load generator (bench/).
step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace"
cargo clippy --workspace --all-targets -- -D warnings

# Packages some integration tests need too (mkfs.xfs for the overlay's reflink test).
step "packages"
qemu-scripts/ensure-packages.sh

step "cargo test --workspace (io_uring engine)"
REMAPBLK_ENGINE=io_uring cargo test --workspace --all-targets 2>&1

# Each fuzz target (remapblk-fuzz list) for REMAPBLK_FUZZ_SECONDS (60 by default): its
# regression inputs (fuzz/corpus/TARGET/) and seeds first, then seeded random inputs and
# mutants. A failing input is written to fuzz/artifacts/TARGET/ and the step fails; the seed is
# printed, and REMAPBLK_SEED=N repeats a run. See docs/testing.md.
fuzz_seconds=${REMAPBLK_FUZZ_SECONDS:-60}
step "fuzz targets, $fuzz_seconds s each"
for target in $(cargo run -q -p remapblk-fuzz -- list | cut -d' ' -f1); do
    cargo run -q -p remapblk-fuzz -- run "$target" --seconds "$fuzz_seconds"
done

step "integration tests again on the sync engine"
REMAPBLK_ENGINE=sync cargo test --tests 2>&1

# CI runs as root; the same tests must pass for a user without privileges. As root this
# creates the user remapblk-ci and runs the test executables as that user, on both engines.
step "unit and integration tests as an unprivileged user, both engines"
ci/unprivileged.sh 2>&1

# The teardown-under-load tests are seeded (REMAPBLK_SEED, printed on failure); `cargo test`
# above ran them with their default seeds, these runs add three more (the stuck-request
# teardown tests are not seeded; they simply run three more times).
step "storm tests, seeds 1 2 3"
for seed in 1 2 3; do
    REMAPBLK_SEED=$seed cargo test --test storm --test ring_stop --test teardown 2>&1
    REMAPBLK_SEED=$seed cargo test --test remap -- --exact remap_churn_under_writes_loses_no_write 2>&1
    REMAPBLK_SEED=$seed cargo test --lib inflight_accounting 2>&1
done

# The README's first command, as written (cargo must know which binary `cargo run` means).
step "cargo run --release -- serve --help"
cargo run --release -- serve --help >/dev/null

step "guest end-to-end scenarios (QEMU, TCG)"
qemu-scripts/ensure-packages.sh
cargo build --release
REMAPBLK_SEED=1 python3 qemu-scripts/scenarios.py
for seed in 2 3; do
    REMAPBLK_SEED=$seed python3 qemu-scripts/scenarios.py --only hot-unplug-remaps
done

echo
echo "ci/test.sh: all steps passed"
