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

# Writers: writers_start CHECK OFF... starts one lib/writer.sh per offset (MiB; writer K is the
# K-th), each rewriting its 1 MiB round after round (reading it back when CHECK is 1). Writer K
# runs on CPU (K-1) mod CPUs: blk-mq maps each CPU to its own queue, so with one CPU per queue
# every queue gets requests.
writers_start() {
    local check=$1 cpus off k=0
    shift
    cpus=$(nproc)
    rm -f /tmp/wstop /tmp/werr.* /tmp/wprog.*
    writer_pids=
    for off in "$@"; do
        k=$((k + 1))
        head -c 1048576 /dev/urandom > /tmp/wsrc.$k.0
        head -c 1048576 /dev/urandom > /tmp/wsrc.$k.1
        echo 0 > /tmp/wprog.$k
        echo "$off" > /tmp/woff.$k
        taskset -c $(( (k - 1) % cpus )) sh /lib/writer.sh "$dev" $k "$off" "$check" &
        writer_pids="$writer_pids $!"
    done
    writers=$k
}

# writers_check: fails with the first writer's error, if any.
writers_check() {
    local f
    for f in /tmp/werr.*; do
        [ -e "$f" ] && fail "$(cat "$f")"
    done
    return 0
}

# writers_advance N SECONDS: waits until every writer has finished N more rounds than it had
# when called; fails if one reports an error or one is still behind after SECONDS.
writers_advance() {
    local n=$1 tick=0 k want behind
    k=1
    while [ $k -le $writers ]; do
        eval "want_$k=$(( $(cat /tmp/wprog.$k) + n ))"
        k=$((k + 1))
    done
    while :; do
        writers_check
        behind=
        k=1
        while [ $k -le $writers ]; do
            eval "want=\$want_$k"
            [ "$(cat /tmp/wprog.$k)" -ge "$want" ] || behind="$behind $k"
            k=$((k + 1))
        done
        [ -z "$behind" ] && return 0
        [ $tick -ge $(( $2 * 10 )) ] && fail "writer(s)$behind did not finish $n more round(s) within $2 s"
        usleep 100000
        tick=$((tick + 1))
    done
}

# writers_stop_verify: ends the writers after their current round, then reads each region back
# (O_DIRECT) and compares it with its last round's data; prints WRITER-MD5 K OFF MD5 for the
# host to compare with the image.
writers_stop_verify() {
    local k=1 r off src
    touch /tmp/wstop
    wait $writer_pids
    writers_check
    while [ $k -le $writers ]; do
        r=$(cat /tmp/wprog.$k)
        off=$(cat /tmp/woff.$k)
        [ "$r" -gt 0 ] || fail "writer $k finished no round"
        src=/tmp/wsrc.$k.$((r % 2))
        dd if="$dev" of=/tmp/wback.$k bs=64k skip=$((off * 16)) count=16 iflag=direct 2>/dev/null || fail "writer $k: final read failed"
        cmp -s $src /tmp/wback.$k || fail "writer $k: its region differs from its last round ($r)"
        log "writer $k: $r rounds, region verified"
        echo "WRITER-MD5 $k $off $(md5sum < $src | cut -c1-32)"
        k=$((k + 1))
    done
}

[ -f "/scenarios/$script.sh" ] || fail "unknown scenario $script"
wait_disk PRESENT 20 || fail "no virtio disk after 20 s"
log "running scenario $script $args"
. "/scenarios/$script.sh"
exit 0
