#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and integration tests, and the guest
# end-to-end scenarios. Installs what it needs when it is missing. Usage: ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy"
cargo clippy --all-targets -- -D warnings

step "cargo test (io_uring engine)"
REMAPBLK_ENGINE=io_uring cargo test --all-targets 2>&1

step "integration tests again on the sync engine"
REMAPBLK_ENGINE=sync cargo test --tests 2>&1

step "guest end-to-end scenarios (QEMU, TCG)"
qemu-scripts/ensure-packages.sh
cargo build --release
python3 qemu-scripts/scenarios.py

echo
echo "ci/test.sh: all steps passed"
