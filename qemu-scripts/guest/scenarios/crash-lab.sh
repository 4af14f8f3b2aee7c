# crash-lab: the guest half of the crash-consistency scenarios. The host drives it: each line
# it sends on the console names a step (and its arguments); the guest runs it and answers
# "CL-DONE STEP RC [DETAIL]" (RC 0 when the step succeeded). The host cuts power, powers on,
# resets the overlay and marks the write log between steps; the guest only does what a VM's
# user would: make and mount file systems, write and fsync files, read the disk, check it.
#
# Steps:
#   setup                      load ext4 (which also mounts ext2); tune writeback so that
#                              dirty pages reach the disk within a second, flush or not
#   mkfs TYPE                  mke2fs -t TYPE on the disk (ext4 or ext2), every table written
#   mount TYPE [OPTS]          mount the disk on /mnt
#   umount                     unmount it (succeeds even when the disk fails every write)
#   write-sync NAME KIB        write /mnt/NAME (random data), fsync; DETAIL: its md5
#   write-nosync NAME KIB      the same with O_DIRECT and no fsync: on the disk, not flushed
#   md5 NAME                   DETAIL: the md5 of /mnt/NAME (or "missing")
#   churn-start                a file workload in the background: create, append, rename,
#                              delete, mkdir, with an fsync now and then
#   churn-stop                 end it (its errors after a power cut are expected)
#   forget                     drop every cached page of the disk (after an umount)
#   fsck                       e2fsck -fn on the disk; DETAIL: its exit status meaning
#   devsum                     DETAIL: md5 of the whole disk, read with O_DIRECT
#   sync                       sync
#   fill SECTOR KIB TAG        write KIB KiB of "TAG\n" repeated to the raw disk at SECTOR (a
#                              multiple of 8) through the page cache, then fsync
#   cmp SECTOR KIB TAG         drop the disk's cached pages, read KIB KiB at SECTOR and cmp them
#                              with "TAG\n" repeated; DETAIL: same|differ and the read's md5
#   end                        leave the loop (the scenario then succeeds)
mnt=/mnt
mkdir -p $mnt
stty -echo 2>/dev/null

# data KIB: KIB KiB of random bytes (the guest reports their md5; the host compares those).
data() { head -c $(( $1 * 1024 )) /dev/urandom; }

churn() {
    local n=0 d
    mkdir -p $mnt/churn 2>/dev/null
    while [ ! -e /tmp/churn-stop ]; do
        n=$((n + 1))
        d=$mnt/churn/d$((n % 7))
        mkdir -p $d 2>/dev/null
        data $(( (n % 5 + 1) * 4 )) > $d/f$n 2>/dev/null
        echo "append $n" >> $mnt/churn/log 2>/dev/null
        [ $((n % 3)) = 0 ] && mv $d/f$n $d/g$n 2>/dev/null
        [ $((n % 4)) = 0 ] && rm -f $mnt/churn/d$(((n + 3) % 7))/f* 2>/dev/null
        [ $((n % 9)) = 0 ] && sync $mnt/churn/log 2>/dev/null
    done
}

done_step() { echo "CL-DONE $*"; }

# Lines the host sent before the guest read the console are lost: it waits for this one.
echo "CL-READY"

while read -r step a1 a2 a3 a4; do
    case "$step" in
        setup)
            for m in crc16 mbcache jbd2 crc32c_generic ext4; do
                grep -q "^$m " /proc/modules || insmod /modules/$m.ko || break
            done
            echo 50 > /proc/sys/vm/dirty_writeback_centisecs
            echo 100 > /proc/sys/vm/dirty_expire_centisecs
            done_step setup $?
            ;;
        mkfs)
            /sbin/mke2fs -F -q -t "$a1" -E lazy_itable_init=0,lazy_journal_init=0 "$dev" >/tmp/mkfs.out 2>&1
            done_step mkfs $?
            ;;
        mount)
            if [ -n "$a2" ]; then mount -t "$a1" -o "$a2" "$dev" $mnt; else mount -t "$a1" "$dev" $mnt; fi
            done_step mount $?
            ;;
        umount)
            umount $mnt 2>/dev/null || umount -f $mnt 2>/dev/null || umount -l $mnt
            done_step umount $?
            ;;
        write-sync)
            data "$a2" > /tmp/w.$a1
            dd if=/tmp/w.$a1 of=$mnt/$a1 bs=64k conv=fsync 2>/dev/null
            rc=$?
            done_step write-sync $rc "$(md5sum < /tmp/w.$a1 | cut -c1-32)"
            ;;
        write-nosync)
            data "$a2" > /tmp/w.$a1
            dd if=/tmp/w.$a1 of=$mnt/$a1 bs=64k oflag=direct 2>/dev/null
            rc=$?
            done_step write-nosync $rc "$(md5sum < /tmp/w.$a1 | cut -c1-32)"
            ;;
        md5)
            if [ -e $mnt/$a1 ]; then
                done_step md5 0 "$(md5sum < $mnt/$a1 | cut -c1-32)"
            else
                done_step md5 0 missing
            fi
            ;;
        churn-start)
            rm -f /tmp/churn-stop
            churn &
            churn_pid=$!
            done_step churn-start 0
            ;;
        churn-stop)
            touch /tmp/churn-stop
            [ -n "$churn_pid" ] && wait $churn_pid 2>/dev/null
            churn_pid=
            done_step churn-stop 0
            ;;
        forget)
            sync 2>/dev/null
            echo 3 > /proc/sys/vm/drop_caches
            blockdev --flushbufs "$dev" 2>/dev/null
            done_step forget 0
            ;;
        fsck)
            /sbin/e2fsck -fn "$dev" >/tmp/fsck.out 2>&1
            rc=$?
            [ $rc = 0 ] || sed 's/^/guest fsck: /' /tmp/fsck.out | head -n 20
            done_step fsck 0 "$rc"
            ;;
        devsum)
            done_step devsum 0 "$(dd if="$dev" bs=1M iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
            ;;
        sync)
            sync
            done_step sync $?
            ;;
        fill)
            yes "$a3" | head -c $(( a2 * 1024 )) > /tmp/fill
            dd if=/tmp/fill of="$dev" bs=4096 seek=$(( a1 / 8 )) conv=fsync,notrunc 2>/dev/null
            done_step fill $?
            ;;
        cmp)
            sync
            echo 3 > /proc/sys/vm/drop_caches
            blockdev --flushbufs "$dev" 2>/dev/null
            dd if="$dev" of=/tmp/got bs=4096 skip=$(( a1 / 8 )) count=$(( a2 / 4 )) 2>/dev/null
            rc=$?
            yes "$a3" | head -c $(( a2 * 1024 )) > /tmp/want
            if cmp -s /tmp/want /tmp/got; then same=same; else same=differ; fi
            done_step cmp $rc "$same $(md5sum < /tmp/got | cut -c1-32)"
            ;;
        end)
            done_step end 0
            break
            ;;
        "") ;;
        *)
            done_step "$step" 127 unknown-step
            ;;
    esac
done
