# remap: the guest writes through a write fault and sees no error; the host restarts remapblk
# (without the fault); the data reads back from the spare. args: off= (MiB)
eval "$args"
head -c 1048576 /dev/urandom > /tmp/a
dd if=/tmp/a of=$dev bs=1M seek="$off" oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write through the write fault failed"
sum=$(md5sum < /tmp/a | cut -c1-32)
dd if=$dev of=/tmp/b bs=1M skip="$off" count=1 iflag=direct 2>/dev/null || fail "read back failed"
[ "$(md5sum < /tmp/b | cut -c1-32)" = "$sum" ] || fail "data read back differs"
log "WRITTEN $sum"
read -r go || fail "console closed"
dd if=$dev of=/tmp/c bs=1M skip="$off" count=1 iflag=direct 2>/dev/null || fail "read after the restart failed"
[ "$(md5sum < /tmp/c | cut -c1-32)" = "$sum" ] || fail "data changed across the restart"
log "READ-BACK-OK"
