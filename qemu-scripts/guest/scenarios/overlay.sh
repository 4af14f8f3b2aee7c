# overlay: the host serves the disk with --overlay and resets or commits it between boots.
# args: off= (MiB), mode=write (1 MiB of random data there, read back, its md5 printed) or
# mode=read (the md5 of that MiB as the disk holds it now)
eval "$args"
case "$mode" in
write)
    head -c 1048576 /dev/urandom > /tmp/a
    dd if=/tmp/a of=$dev bs=1M seek="$off" oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write failed"
    sum=$(md5sum < /tmp/a | cut -c1-32)
    dd if=$dev of=/tmp/b bs=1M skip="$off" count=1 iflag=direct 2>/dev/null || fail "read back failed"
    [ "$(md5sum < /tmp/b | cut -c1-32)" = "$sum" ] || fail "data read back differs"
    log "WRITTEN $sum"
    ;;
read)
    dd if=$dev of=/tmp/b bs=1M skip="$off" count=1 iflag=direct 2>/dev/null || fail "read failed"
    log "READ $(md5sum < /tmp/b | cut -c1-32)"
    ;;
*) fail "mode=$mode: give write or read" ;;
esac
