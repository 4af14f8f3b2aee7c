# read-fault: the host put a read fault on one sector; reading it fails in dd with an I/O error
# and the kernel logs an error for exactly that sector, while the pages around it read fine.
# The guest reads through its page cache in 4 KiB pages (busybox dd cannot align O_DIRECT
# buffers), so readahead is switched off and the reads around the fault avoid its page.
# args: sector= (a multiple of 8)
eval "$args"
page=$((sector / 8))
blockdev --setra 0 $dev || fail "cannot switch readahead off"
dd if=$dev of=/dev/null bs=4096 skip=$((page - 16)) count=16 2>/dev/null || fail "reading the 16 pages before the faulty sector failed"
dd if=$dev of=/dev/null bs=4096 skip=$((page + 1)) count=16 2>/dev/null || fail "reading the 16 pages after the faulty sector failed"
if dd if=$dev of=/dev/null bs=4096 skip="$page" count=1 2>/tmp/err; then
    fail "reading the faulty sector succeeded"
fi
log "dd said: $(head -n 1 /tmp/err)"
grep -q "Input/output error" /tmp/err || fail "dd did not report an I/O error (EIO)"
dmesg | grep "I/O error, dev ${dev##*/}, sector $sector " | head -n 1 | sed 's/^/guest: kernel: /'
dmesg | grep -q "I/O error, dev ${dev##*/}, sector $sector " || fail "the kernel logged no error for sector $sector"
