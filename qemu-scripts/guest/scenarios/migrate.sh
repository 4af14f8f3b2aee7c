# migrate: live migration to a second remapblk (serve --incoming) on the same image and spare.
# The host remaps blocks of the known data (MiB 0-4) before, and of it and a writer's region
# during the migration, and puts a write fault on the other writer's region (auto-remap).
# From the host's "go" until the guest runs on the destination: two writers rewrite MiB 8 and
# 12, and a reader rereads MiB 20 and 22 (O_DIRECT: remapblk writes dd's buffer, which dd then
# copies) into tmpfs snapshots, so requests are in flight when the source stops.
# At "stop-reading" (QEMU has sent all of RAM once, the host's remaps are made, the host holds
# the migration back): the known data is rewritten (into the spare where remapped), and fresh
# data is written to MiB 24 (O_DIRECT) and read into the page cache, i.e. into guest pages that
# remapblk alone wrote after QEMU had sent them, which only the dirty log can carry. After
# "migrated" (on the destination) those pages must still be cached and hold the fresh data;
# the snapshots, the known data and the writers' regions must verify, and new data at MiB 28
# is written through the destination's remapblk for the host to find in the image.
mib=1048576
exec 3< "$dev"                # a block device's page cache is dropped at its last close
blockdev --setra 0 "$dev"     # no readahead: reads touch exactly the pages asked for
head -c $((4 * mib)) /dev/urandom > /tmp/known
head -c $mib /dev/urandom > /tmp/ra
head -c $mib /dev/urandom > /tmp/rb
dd if=/tmp/known of=$dev bs=1M oflag=direct conv=notrunc 2>/dev/null || fail "writing the known data"
dd if=/tmp/ra of=$dev bs=1M seek=20 oflag=direct conv=notrunc 2>/dev/null || fail "writing MiB 20"
dd if=/tmp/rb of=$dev bs=1M seek=22 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "writing MiB 22"
dd if=$dev of=/tmp/b bs=1M count=4 iflag=direct 2>/dev/null || fail "reading the known data"
cmp -s /tmp/known /tmp/b || fail "the known data read back differs (before the migration)"
log "READY"
read -r line || fail "console closed"

writers_start 0 8 12
(
    n=0
    while [ ! -e /tmp/rstop ]; do
        n=$((n + 1))
        if [ $((n % 2)) = 1 ]; then r=a at=20; else r=b at=22; fi
        dd if=$dev of=/tmp/snap.$n.$r bs=64k skip=$((at * 16)) count=16 iflag=direct 2>/dev/null || { echo "reader: read $n failed" > /tmp/werr.reader; exit 1; }
        rm -f /tmp/snap.$((n - 8)).*
    done
    echo $n > /tmp/reads
) &
reader=$!
writers_advance 1 60
log "IO-RUNNING"
read -r line || fail "console closed"

# The host's remaps during the migration are made; new data over them lives in the spare only,
# so the destination reads it back only if it took over the source's table.
head -c $((4 * mib)) /dev/urandom > /tmp/known
dd if=/tmp/known of=$dev bs=1M oflag=direct conv=notrunc 2>/dev/null || fail "rewriting the known data"
head -c $mib /dev/urandom > /tmp/fresh
dd if=/tmp/fresh of=$dev bs=64k seek=$((24 * 16)) oflag=direct conv=notrunc 2>/dev/null || fail "writing MiB 24"
echo 1 > /proc/sys/vm/drop_caches
dd if=$dev of=/dev/null bs=64k skip=$((24 * 16)) count=16 2>/dev/null || fail "reading MiB 24"
[ "$(incore $dev $((24 * mib)) $mib)" = 256 ] || fail "MiB 24 is not in the page cache after reading it"
log "READ-DONE"
read -r line || fail "console closed"

# Cached pages are read without asking the disk: what the read returns is what came along.
cached=$(incore $dev $((24 * mib)) $mib)
[ "$cached" = 256 ] || fail "only $cached of the 256 pages of MiB 24 are cached on the destination: the test needs them all"
dd if=$dev of=/tmp/cached bs=64k skip=$((24 * 16)) count=16 2>/dev/null || fail "rereading MiB 24"
cmp -s /tmp/fresh /tmp/cached || fail "page-cache pages remapblk filled during the migration are stale on the destination (missing from the dirty log)"
log "the page cache filled during the migration came along"
touch /tmp/rstop
wait $reader
writers_advance 1 60
writers_stop_verify
for s in /tmp/snap.*; do
    cmp -s /tmp/r${s##*.} $s || fail "snapshot $s differs from the data it read"
done
log "$(cat /tmp/reads) snapshot reads, the last $(ls /tmp/snap.* | wc -l) verified"
dd if=$dev of=/tmp/b bs=1M count=4 iflag=direct 2>/dev/null || fail "reading the known data on the destination"
cmp -s /tmp/known /tmp/b || fail "the known data differs on the destination"
head -c $mib /dev/urandom > /tmp/post
dd if=/tmp/post of=$dev bs=1M seek=28 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "writing on the destination"
dd if=$dev of=/tmp/b bs=1M skip=28 count=1 iflag=direct 2>/dev/null || fail "reading on the destination"
cmp -s /tmp/post /tmp/b || fail "data written on the destination reads back different"
echo "POST-MD5 $(md5sum < /tmp/post | cut -c1-32)"
