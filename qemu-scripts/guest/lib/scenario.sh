# Runs one scenario (its name is $1) with the helpers scenarios share. Exits 0 on success;
# `fail` records the reason for init and exits 1.
script=$1

log() { echo "guest: $*"; }
fail() {
    log "FAIL: $*"
    echo "$*" > /tmp/fail-reason
    exit 1
}

# wait_disk PRESENT|ABSENT SECONDS: waits for a virtio disk to appear (and sets $dev and $sys
# to it: a re-plugged disk may get a new name while the old one is still being released) or
# for the current one to go away.
#
# A process that opens /dev/vda for writing just after the disk went away creates a plain
# file there (devtmpfs is a tmpfs), and devtmpfs then cannot make the node when the disk comes
# back. So the node is made from /sys/block/vdX/dev when it is missing or is not a device.
wait_disk() {
    local tick=0 d n
    while [ $tick -lt $(( $2 * 10 )) ]; do
        if [ "$1" = PRESENT ]; then
            for d in /sys/block/vd*; do
                [ -e "$d/dev" ] || continue
                n=/dev/${d##*/}
                if [ ! -b "$n" ]; then
                    rm -f "$n"
                    mknod "$n" b $(tr ':' ' ' < "$d/dev") || continue
                fi
                sys=$d
                dev=$n
                return 0
            done
        elif [ ! -e "$sys" ]; then
            return 0
        fi
        usleep 100000
        tick=$((tick + 1))
    done
    return 1
}

# What the kernel sees of PCI and virtio devices, for a failure report.
diag() {
    log "diagnostics: pci devices: $(ls /sys/bus/pci/devices | tr '\n' ' ')"
    for v in /sys/bus/virtio/devices/*; do
        [ -e "$v" ] && log "diagnostics: ${v##*/}: device $(cat "$v/device") status $(cat "$v/status") driver $(readlink "$v/driver")"
    done
    log "diagnostics: block devices: $(ls /sys/block | tr '\n' ' ')"
    dmesg | tail -n 15 | sed 's/^/guest dmesg: /'
}

[ -f "/scenarios/$script.sh" ] || fail "unknown scenario $script"
wait_disk PRESENT 20 || fail "no virtio disk after 20 s"
log "running scenario $script $args"
. "/scenarios/$script.sh"
exit 0
