# hot-unplug-under-io: each cycle writes known data, then keeps four O_DIRECT writers busy
# while the host unplugs the disk (device_del) and plugs it back (device_add); the known data
# must still be there. args: cycles=
eval "$args"
mib=1048576
i=1
while [ "$i" -le "$cycles" ]; do
    head -c $((4 * mib)) /dev/urandom > /tmp/a
    dd if=/tmp/a of=$dev bs=1M oflag=direct conv=notrunc,fsync 2>/dev/null || fail "cycle $i: writing the known data"
    sum=$(md5sum < /tmp/a | cut -c1-32)
    head -c $mib /dev/urandom > /tmp/r
    writers=
    for k in 1 2 3 4; do
        ( while [ -b $dev ] && dd if=/tmp/r of=$dev bs=64k seek=$((k * 128)) oflag=direct conv=notrunc 2>/dev/null; do :; done ) &
        writers="$writers $!"
    done
    log "IO-RUNNING $i"
    wait_disk ABSENT 120 || fail "cycle $i: the disk was not unplugged"
    # The writers stop once their disk is gone (only these: init may have other children).
    wait $writers
    log "UNPLUGGED $i"
    if ! wait_disk PRESENT 30; then
        diag
        fail "cycle $i: the disk did not come back within 30 s"
    fi
    dd if=$dev of=/tmp/b bs=1M count=4 iflag=direct 2>/dev/null || fail "cycle $i: reading after replug"
    [ "$(md5sum < /tmp/b | cut -c1-32)" = "$sum" ] || fail "cycle $i: data written before the unplug changed"
    log "REPLUGGED-OK $i as $dev"
    i=$((i + 1))
done
