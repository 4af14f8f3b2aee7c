# verify: the disk's geometry as the guest sees it, then O_DIRECT random data written, read back
# and compared. Prints DATA-MD5 so the host can check the image file holds the same bytes.
# args: bytes= bs= queues= serial= off= (MiB) len= (MiB)
eval "$args"
size=$(( $(cat $sys/size) * 512 ))
[ "$size" = "$bytes" ] || fail "capacity is $size bytes, expected $bytes"
lbs=$(cat $sys/queue/logical_block_size)
[ "$lbs" = "$bs" ] || fail "logical block size is $lbs, expected $bs"
nq=$(ls $sys/mq | wc -l)
[ "$nq" = "$queues" ] || fail "$nq blk-mq queues, expected $queues"
if [ -n "$serial" ]; then
    got=$(cat $sys/serial)
    [ "$got" = "$serial" ] || fail "serial is '$got', expected '$serial'"
fi
log "capacity $size, block size $lbs, $nq queues, serial $(cat $sys/serial)"
head -c $((len * 1048576)) /dev/urandom > /tmp/data
dd if=/tmp/data of=$dev bs=1M seek="$off" oflag=direct conv=notrunc 2>/dev/null || fail "write"
dd if=$dev of=/tmp/back bs=1M skip="$off" count="$len" iflag=direct 2>/dev/null || fail "read"
cmp /tmp/data /tmp/back || fail "data read back differs from data written"
echo "DATA-MD5 $(md5sum < /tmp/data | cut -d' ' -f1)"
