# writer.sh DEV K OFF CHECK: one writer of the writers_* helpers (lib/scenario.sh). Round after
# round, writes 1 MiB at OFF MiB of DEV with O_DIRECT from /tmp/wsrc.K.0 and /tmp/wsrc.K.1 in
# turn (so every block changes every round) and, when CHECK is 1, reads it back and compares.
# After each round /tmp/wprog.K holds the number of the last finished round; /tmp/wstop ends
# the writer after the round it is in. A failure is described in /tmp/werr.K and ends it.
dev=$1 k=$2 off=$3 check=$4
r=0
while [ ! -e /tmp/wstop ]; do
    r=$((r + 1))
    src=/tmp/wsrc.$k.$((r % 2))
    if ! dd if=$src of=$dev bs=64k seek=$((off * 16)) oflag=direct conv=notrunc 2>/tmp/wdd.$k; then
        echo "writer $k round $r: write failed: $(tail -n 1 /tmp/wdd.$k)" > /tmp/werr.$k
        exit 1
    fi
    if [ "$check" = 1 ]; then
        if ! dd if=$dev of=/tmp/wback.$k bs=64k skip=$((off * 16)) count=16 iflag=direct 2>/tmp/wdd.$k; then
            echo "writer $k round $r: read failed: $(tail -n 1 /tmp/wdd.$k)" > /tmp/werr.$k
            exit 1
        fi
        cmp -s $src /tmp/wback.$k || { echo "writer $k round $r: read back differs from what it wrote" > /tmp/werr.$k; exit 1; }
    fi
    echo $r > /tmp/wprog.$k.new
    mv /tmp/wprog.$k.new /tmp/wprog.$k
done
