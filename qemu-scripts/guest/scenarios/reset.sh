# reset: first boot writes known data and a mark, then keeps writers busy until the host sends
# system_reset; the second boot finds the mark, verifies the known data, and verifies a fresh
# write. The mark lives at MiB 60.
mib=1048576
markblk=$((60 * 2048))
mark=$(dd if=$dev bs=512 skip=$markblk count=1 2>/dev/null | tr -d '\000' | head -c 48)
case "$mark" in
    RESET-MARK*)
        sum=${mark#RESET-MARK }
        dd if=$dev of=/tmp/b bs=1M count=4 iflag=direct 2>/dev/null || fail "read after reset"
        [ "$(md5sum < /tmp/b | cut -c1-32)" = "$sum" ] || fail "data written before the reset changed"
        head -c $((2 * mib)) /dev/urandom > /tmp/n
        dd if=/tmp/n of=$dev bs=1M seek=8 oflag=direct conv=notrunc 2>/dev/null || fail "write after reset"
        dd if=$dev of=/tmp/nb bs=1M skip=8 count=2 iflag=direct 2>/dev/null || fail "read after reset"
        cmp /tmp/n /tmp/nb || fail "fresh data after reset differs"
        log "SECOND-BOOT-OK"
        ;;
    *)
        head -c $((4 * mib)) /dev/urandom > /tmp/a
        dd if=/tmp/a of=$dev bs=1M oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write"
        printf 'RESET-MARK %s' "$(md5sum < /tmp/a | cut -c1-32)" > /tmp/m
        truncate -s 512 /tmp/m
        dd if=/tmp/m of=$dev bs=512 seek=$markblk oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write mark"
        head -c $mib /dev/urandom > /tmp/r
        for k in 1 2 3 4; do
            ( while [ -b $dev ] && dd if=/tmp/r of=$dev bs=64k seek=$((k * 160)) oflag=direct conv=notrunc 2>/dev/null; do :; done ) &
        done
        log "IO-RUNNING"
        sleep 300
        fail "no reset came"
        ;;
esac
