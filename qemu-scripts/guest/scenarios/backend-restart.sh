# backend-restart: twice, write and verify data, go idle and wait for the host (which restarts
# remapblk meanwhile) to send a line on the console; then the data must read back and new I/O
# must work.
mib=1048576
for round in 1 2; do
    head -c $((2 * mib)) /dev/urandom > /tmp/a
    dd if=/tmp/a of=$dev bs=1M seek=$((round * 8)) oflag=direct conv=notrunc,fsync 2>/dev/null || fail "round $round: write"
    sum=$(md5sum < /tmp/a | cut -c1-32)
    log "IDLE $round"
    read -r go || fail "round $round: console closed"
    dd if=$dev of=/tmp/b bs=1M skip=$((round * 8)) count=2 iflag=direct 2>/dev/null || fail "round $round: read after restart"
    [ "$(md5sum < /tmp/b | cut -c1-32)" = "$sum" ] || fail "round $round: data changed across the restart"
    head -c $mib /dev/urandom > /tmp/n
    dd if=/tmp/n of=$dev bs=1M seek=$((round * 8 + 4)) oflag=direct conv=notrunc 2>/dev/null || fail "round $round: write after restart"
    dd if=$dev of=/tmp/nb bs=1M skip=$((round * 8 + 4)) count=1 iflag=direct 2>/dev/null || fail "round $round: read after restart"
    cmp /tmp/n /tmp/nb || fail "round $round: new data differs"
    log "ROUND-OK $round"
done
