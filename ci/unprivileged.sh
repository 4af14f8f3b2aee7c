#!/usr/bin/env bash
# Runs the unit and integration tests (what `cargo test --tests` runs) as a user without
# privileges, once per engine, so that nothing in them passes only because CI runs as root.
# Run as root: it creates the user remapblk-ci when missing, builds the tests as root (the
# toolchain and ~/.cargo stay root's) and runs the test executables as that user, with its own
# HOME. Run as another user, it has nothing to add: `cargo test --tests` already runs
# unprivileged. Usage: ci/unprivileged.sh [ENGINE...]   (default: io_uring sync)
set -euo pipefail
cd "$(dirname "$0")/.."

user=remapblk-ci
engines=("$@")
[ ${#engines[@]} -gt 0 ] || engines=(io_uring sync)

if [ "$(id -u)" -ne 0 ]; then
    echo "ci/unprivileged.sh: running as $(id -un), not root: cargo test --tests is already an unprivileged run"
    exit 0
fi

# setpriv and prlimit come with util-linux, losetup with mount (Debian).
if ! command -v setpriv >/dev/null || ! command -v prlimit >/dev/null; then
    apt-get install -y util-linux
fi

if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --create-home --home-dir "/var/lib/$user" --shell /usr/sbin/nologin "$user"
fi
home=$(getent passwd "$user" | cut -d: -f6)

# The test executables, built by root's toolchain. Each finds the server binary by the
# absolute path cargo compiled into it (CARGO_BIN_EXE_remapblk), in this checkout's target/.
mapfile -t tests < <(cargo test --tests --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
[ ${#tests[@]} -gt 0 ] || { echo "ci/unprivileged.sh: cargo built no test executables" >&2; exit 1; }

# Who the tests run as: no capabilities (setpriv drops them with the uid), a clean environment,
# and the locked-memory limit a user gets by default on current kernels (8 MiB), set here (by
# root, who may raise it) so that the run does not depend on the CI host's defaults: io_uring
# counts its rings against it.
as_user() {
    prlimit --memlock=8388608:8388608 \
        setpriv --reuid="$user" --regid="$user" --init-groups --reset-env \
        env HOME="$home" PATH=/usr/local/bin:/usr/bin:/bin RUST_BACKTRACE=1 \
        ${REMAPBLK_SEED:+REMAPBLK_SEED=$REMAPBLK_SEED} \
        ${REMAPBLK_TEST_BLOCK_DEVICE:+REMAPBLK_TEST_BLOCK_DEVICE=$REMAPBLK_TEST_BLOCK_DEVICE} \
        "$@"
}

for t in "${tests[@]}" "$(pwd)/target/debug/remapblk"; do
    if ! as_user test -x "$t"; then
        echo "ci/unprivileged.sh: $user cannot run $t: every directory above the checkout must be searchable by others (chmod o+x)" >&2
        exit 1
    fi
done

# A block device the user may read and write but does not own, as a disk group member has: a
# loop device whose node's group is the user's for this run (owner and mode restored at exit),
# so that tests/serve_basic.rs serves a real block device unprivileged too. Without loop
# devices (a container) that test says it skipped.
loop_dir=$(mktemp -d)
loop_dev=
loop_owner=
cleanup() {
    if [ -n "$loop_dev" ]; then
        if [ -n "$loop_owner" ]; then
            chown "${loop_owner% *}" "$loop_dev" || true
            chmod "${loop_owner#* }" "$loop_dev" || true
        fi
        losetup -d "$loop_dev" || true
    fi
    rm -rf "$loop_dir"
}
trap cleanup EXIT
truncate -s 16M "$loop_dir/backing.img"
if loop_dev=$(losetup --find --show "$loop_dir/backing.img" 2>/dev/null); then
    loop_owner=$(stat -c '%u:%g %a' "$loop_dev")
    chgrp "$user" "$loop_dev"
    chmod 0660 "$loop_dev"
    export REMAPBLK_TEST_BLOCK_DEVICE=$loop_dev
else
    loop_dev=
    echo "ci/unprivileged.sh: no loop device (losetup failed); the block-device test will skip"
fi

failed=()
for engine in "${engines[@]}"; do
    for t in "${tests[@]}"; do
        echo "--- as $user, REMAPBLK_ENGINE=$engine: $(basename "$t")"
        if ! as_user REMAPBLK_ENGINE="$engine" "$t"; then
            failed+=("$engine: $t")
        fi
    done
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "ci/unprivileged.sh: failed as $user:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "ci/unprivileged.sh: every test passed as $user (engines: ${engines[*]})"
