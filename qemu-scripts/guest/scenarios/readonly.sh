# readonly: the disk is read-only in the guest, reads work, a write fails.
[ "$(cat $sys/ro)" = 1 ] || fail "$sys/ro is not 1"
dd if=$dev of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null || fail "read failed"
head -c 4096 /dev/urandom > /tmp/x
if dd if=/tmp/x of=$dev bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then
    fail "a write to the read-only disk succeeded"
fi
log "write refused as expected"
