# flush-discard: data, a flush, then a discard, a write-zeroes without and one with UNMAP over
# three consecutive MiB; they read back as zeros and the data around them is intact. Then the
# same under writethrough (the guest switches the cache with CONFIG_WCE).
# args: off= (MiB; the four MiB from there are used)
eval "$args"
mib=1048576
[ "$(cat $sys/queue/write_cache)" = "write back" ] || fail "cache is not write back"
[ "$(cat $sys/queue/discard_max_bytes)" != 0 ] || fail "no discard support seen"
[ "$(cat $sys/queue/write_zeroes_max_bytes)" != 0 ] || fail "no write-zeroes support seen"
head -c $((5 * mib)) /dev/urandom > /tmp/d
# conv=fsync makes the kernel send a FLUSH after the data.
dd if=/tmp/d of=$dev bs=1M seek="$off" oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write"
blkdiscard -o $(( (off + 1) * mib )) -l $mib $dev || fail "discard"
blkzero $dev $(( (off + 2) * mib )) $mib || fail "write-zeroes"
blkzero $dev $(( (off + 3) * mib )) $mib punch || fail "write-zeroes with unmap"
dd if=$dev of=/tmp/b bs=1M skip="$off" count=5 iflag=direct 2>/dev/null || fail "read"
cmp -n $mib /tmp/d /tmp/b || fail "data before the zeroed range changed"
head -c $((3 * mib)) /dev/zero > /tmp/z
dd if=/tmp/b of=/tmp/b3 bs=1M skip=1 count=3 2>/dev/null
cmp /tmp/z /tmp/b3 || fail "discarded or zeroed range does not read as zeros"
dd if=/tmp/b of=/tmp/b4 bs=1M skip=4 2>/dev/null
dd if=/tmp/d of=/tmp/d4 bs=1M skip=4 2>/dev/null
cmp /tmp/d4 /tmp/b4 || fail "data after the zeroed range changed"
log "discard and write-zeroes read back as zeros"

echo "write through" > $sys/cache_type || fail "cannot switch to writethrough"
[ "$(cat $sys/queue/write_cache)" = "write through" ] || fail "cache did not switch"
head -c $mib /dev/urandom > /tmp/w
dd if=/tmp/w of=$dev bs=1M seek=$((off + 5)) oflag=direct conv=notrunc 2>/dev/null || fail "writethrough write"
dd if=$dev of=/tmp/wb bs=1M skip=$((off + 5)) count=1 iflag=direct 2>/dev/null || fail "writethrough read"
cmp /tmp/w /tmp/wb || fail "writethrough data differs"
echo "WT-MD5 $(md5sum < /tmp/w | cut -c1-32)"
