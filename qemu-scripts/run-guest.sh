#!/usr/bin/env bash
# Boots the test guest under QEMU (TCG) attached to a running `remapblk serve`, prints the
# guest's console, and exits 0 only if the guest printed its success marker.
#
#   run-guest.sh --socket SOCK [--num-queues N] [--qmp PATH] [--reconnect] [--script NAME]
#                [--args K=V,K=V] [--timeout SECONDS] [--log FILE] [--allow-reset]
#                [--incoming URI]
#
# --script names a scenario in qemu-scripts/guest/scenarios/ (without .sh); without it the
# guest boots to a busybox shell on the console (stdin is the guest's serial console).
# --qmp exposes QEMU's QMP socket for hot-unplug and reset; --allow-reset lets a QMP
# system_reset reboot the guest instead of ending QEMU. --incoming URI starts QEMU waiting for
# a migration stream (QEMU's -incoming: unix:PATH, "exec:cat FILE"); the guest it receives
# carries on where the source left it, and its console is this QEMU's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
dir=${REMAPBLK_GUEST_DIR:-$root/target/guest}

socket= num_queues=1 qmp= reconnect= script= args= timeout=120 log= no_reboot=-no-reboot incoming=
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --socket) socket=$2; shift 2 ;;
        --num-queues) num_queues=$2; shift 2 ;;
        --qmp) qmp=$2; shift 2 ;;
        --reconnect) reconnect=1; shift ;;
        --script) script=$2; shift 2 ;;
        --args) args=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --allow-reset) no_reboot=; shift ;;
        --incoming) incoming=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run-guest: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$socket" ] || { echo "run-guest: --socket is required" >&2; usage; }
[ -S "$socket" ] || { echo "run-guest: $socket is not a socket; start remapblk serve first" >&2; exit 1; }
"$here/build-guest.sh" >&2

# init_on_alloc=0: the kernel does not zero a page it hands out, so a page-cache page the
# backend fills is written by the backend alone (the migrate scenario counts on that: only the
# dirty log can carry such a page).
append="console=ttyS0 panic=-1 loglevel=${REMAPBLK_GUEST_LOGLEVEL:-4} init_on_alloc=0"
[ -n "$script" ] && append="$append remapblk.script=$script"
# REMAPBLK_GUEST_DEBUG=1: the guest dumps its blocked tasks every 15 s.
[ -n "${REMAPBLK_GUEST_DEBUG:-}" ] && append="$append remapblk.debug=1"
[ -n "$args" ] && append="$append remapblk.args=$args"
chardev="socket,id=c0,path=$socket"
[ -n "$reconnect" ] && chardev="$chardev,reconnect=1"
qmp_opt=()
[ -n "$qmp" ] && qmp_opt=(-qmp "unix:$qmp,server=on,wait=off")
incoming_opt=()
[ -n "$incoming" ] && incoming_opt=(-incoming "$incoming")
# blk-mq gives a disk at most one queue per CPU, so the guest gets one CPU per queue.
cpus=$num_queues

log=${log:-$(mktemp)}
set +e
# The pc machine: ACPI PCI hotplug makes device_del immediate (PCIe native hotplug waits 5 s).
# No TSC-deadline timer: under TCG with several vCPUs a guest using it was seen to stop
# getting timer interrupts (all vCPUs halted, guest time frozen).
# timeout --foreground keeps QEMU in this script's process group, so that whoever kills the
# group (scenarios.py after a failure) ends QEMU too.
timeout --foreground --kill-after=5 "$timeout" qemu-system-x86_64 -accel tcg -machine pc -cpu "${REMAPBLK_GUEST_CPU:-max,-tsc-deadline}" \
    -smp "$cpus" -m 512M -nodefaults -no-user-config -display none $no_reboot \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev "$chardev" \
    -device vhost-user-blk-pci,chardev=c0,num-queues="$num_queues",id=disk0 \
    "${qmp_opt[@]}" "${incoming_opt[@]}" \
    -serial stdio -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.gz" -append "$append" \
    2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

if grep -q "REMAPBLK-GUEST-RESULT: ok" "$log"; then
    exit 0
fi
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "run-guest: FAILED: timed out after ${timeout}s" >&2
elif grep -q "Kernel panic" "$log"; then
    echo "run-guest: FAILED: kernel panic" >&2
elif grep -q "REMAPBLK-GUEST-RESULT:" "$log"; then
    echo "run-guest: FAILED: $(grep "REMAPBLK-GUEST-RESULT:" "$log" | tail -n 1)" >&2
elif [ -z "$script" ]; then
    exit "$rc"
else
    echo "run-guest: FAILED: QEMU exited ($rc) without the guest's success marker" >&2
fi
exit 1
